//! rustls configurations for the aggregator (server) and the sites (clients): TLS 1.3 only, the
//! *ring* provider, mutual authentication against the federation CA, CRL-based revocation and
//! ALPN `h2`; and the keying-material exporter that binds attestation evidence to a connection.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, ConnectionCommon, DigitallySignedStruct, DistinguishedName,
    OtherError, ProtocolVersion, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, UnixTime};

pub use crate::identity::{PeerIdentity, peer_identity};

use crate::crl::WatchedCrl;
use crate::error::{AttestError, Result};
use crate::files;
use crate::identity::{ca_federation, parse_certificate};
use crate::names::{FederationUri, Role};

/// The only ALPN protocol offered and accepted (gRPC runs over HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";
/// Label of the keying-material exporter used for attestation evidence.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-quorum-attestation-v1";

/// Builds the aggregator's TLS configuration.
///
/// Clients must present a certificate chained to the CA in `ca_pem`, valid for client
/// authentication, not listed in the CRL file `crl` (re-read whenever it changes, checked on
/// every handshake), and naming the CA's federation. Session resumption is disabled, so these
/// checks run on every connection.
pub fn server_config(
    ca_pem: &Path,
    server_cert: &Path,
    server_key: &Path,
    crl: Option<&Path>,
) -> Result<Arc<ServerConfig>> {
    let provider = provider();
    let ca = files::load_cert(ca_pem)?;
    let federation = ca_federation(&ca)?;
    let certs = files::load_certs(server_cert)?;
    let leaf = certs.first().map(|c| parse_certificate(c)).transpose()?;
    match leaf.and_then(|p| p.uri) {
        Some(FederationUri {
            federation: found,
            role: Role::Server,
        }) if found == federation => {}
        Some(FederationUri {
            federation: found, ..
        }) if found != federation => {
            return Err(AttestError::FederationMismatch {
                expected: federation,
                found,
            });
        }
        _ => {
            return Err(AttestError::CertificateMalformed {
                reason: format!("{} is not a server certificate", server_cert.display()),
            });
        }
    }
    let key = files::load_private_key(server_key)?;
    let verifier = FederationClientVerifier::new(ca, federation, Arc::clone(&provider), crl)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed session skips client certificate verification, so a revoked site could come
    // back on an old ticket: every connection gets a full handshake instead.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Builds a site's TLS configuration: presents the site certificate, accepts only a server
/// certificate from the federation CA that matches the server name, unrevoked per `crl` if
/// given.
pub fn client_config(
    ca_pem: &Path,
    site_cert: &Path,
    site_key: &Path,
    crl: Option<&Path>,
) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let roots = roots(files::load_cert(ca_pem)?)?;
    let mut builder = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider));
    if let Some(crl) = crl {
        builder = builder
            .with_crls([files::load_crl(crl)?])
            .enforce_revocation_expiration();
    }
    let verifier = builder.build()?;
    let certs = files::load_certs(site_cert)?;
    let key = files::load_private_key(site_key)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The 32-byte keying-material exporter value ([`EXPORTER_LABEL`], no context) of an
/// established TLS 1.3 connection. Both ends of one connection obtain the same value; any
/// other connection yields a different one. Works for `ClientConnection` and
/// `ServerConnection` alike (both dereference to `ConnectionCommon`).
pub fn exporter_value<D>(conn: &ConnectionCommon<D>) -> Result<[u8; 32]> {
    if conn.is_handshaking() {
        return Err(AttestError::ExporterUnavailable {
            reason: "the handshake has not completed".into(),
        });
    }
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(AttestError::ExporterUnavailable {
            reason: "the connection is not TLS 1.3".into(),
        });
    }
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| AttestError::ExporterUnavailable {
            reason: e.to_string(),
        })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: CertificateDer<'static>) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    Ok(Arc::new(roots))
}

/// webpki client verification with a CRL that is reloaded on change, plus a check that the
/// certificate names this federation.
#[derive(Debug)]
struct FederationClientVerifier {
    federation: String,
    provider: Arc<CryptoProvider>,
    hints: Vec<DistinguishedName>,
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    /// No CRL configured: chain and validity checks only.
    Fixed(Arc<dyn ClientCertVerifier>),
    /// Rebuilt whenever the CRL file changes.
    Watched(WatchedCrl<Arc<dyn ClientCertVerifier>>),
}

impl FederationClientVerifier {
    fn new(
        ca: CertificateDer<'static>,
        federation: String,
        provider: Arc<CryptoProvider>,
        crl: Option<&Path>,
    ) -> Result<Self> {
        let roots = roots(ca)?;
        let hints = roots.subjects();
        let build = {
            let provider = Arc::clone(&provider);
            move |crls: Vec<_>| -> Result<Arc<dyn ClientCertVerifier>> {
                Ok(WebPkiClientVerifier::builder_with_provider(
                    Arc::clone(&roots),
                    Arc::clone(&provider),
                )
                .with_crls(crls)
                // A CRL past its next-update time is stale: refuse rather than trust it.
                .enforce_revocation_expiration()
                .build()?)
            }
        };
        let inner = match crl {
            None => Inner::Fixed(build(Vec::new())?),
            Some(path) => Inner::Watched(WatchedCrl::new(path, move |der| build(vec![der]))?),
        };
        Ok(Self {
            federation,
            provider,
            hints,
            inner,
        })
    }

    fn inner(&self) -> std::result::Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        match &self.inner {
            Inner::Fixed(v) => Ok(Arc::clone(v)),
            Inner::Watched(w) => w.current().map(|v| Arc::clone(&*v)).map_err(cert_error),
        }
    }
}

impl ClientCertVerifier for FederationClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.inner()?
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = peer_identity(end_entity).map_err(cert_error)?;
        if identity.federation != self.federation {
            return Err(cert_error(AttestError::FederationMismatch {
                expected: self.federation.clone(),
                found: identity.federation,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn cert_error(e: AttestError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}
