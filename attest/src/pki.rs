//! The federation's certificate authority: CA, server and site certificates, revocation, CRL;
//! and a site's side of enrolment.
//!
//! Layout written by [`init_federation`] (the authority):
//! ```text
//! <out>/ca/ca.pem        CA certificate (public; every party needs it)
//! <out>/ca/ca.key        CA private key (0600; the operator's most valuable secret)
//! <out>/ca/state.json    issued certificates, revocations, CRL number
//! <out>/ca/crl.pem       signed certificate revocation list
//! <out>/server/server.pem, server.key   aggregator TLS certificate and key
//! ```
//! A site's key is born at the site and never leaves it: [`request_site`] writes `site.key`
//! (0600 from the start) and `site.csr` into the site's folder; the authority checks the
//! request and returns only a certificate ([`sign_site_request`]: `site.pem`, `ca.pem`,
//! `README.md`). The keys Quorum makes are Ed25519, written as PKCS#8 v1 so that OpenSSL and
//! Python's `cryptography` read them; a request may also carry an ECDSA P-256 or RSA key made
//! by other tools ([`KeyAlgorithm`]). Each certificate carries a random 128-bit serial number, the
//! federation name as organisation, and a URI naming federation and role (see
//! [`crate::names`]).

#[cfg(test)]
use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData as _, RevokedCertParams, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::error::{AttestError, Result};
use crate::files;
use crate::identity::{parse_certificate, peer_identity};
use crate::names::{FederationUri, Role, validate_name};
use crate::site_key::KeyAlgorithm;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer as _;

/// CA certificate file name inside the CA directory and inside site bundles.
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file name inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// CA state file name inside the CA directory.
pub const CA_STATE_FILE: &str = "state.json";
/// CRL file name written by [`init_federation`] inside the CA directory.
pub const CRL_FILE: &str = "crl.pem";
/// Server certificate file name.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// Server private key file name.
pub const SERVER_KEY_FILE: &str = "server.key";
/// Site certificate file name inside a bundle.
pub const SITE_CERT_FILE: &str = "site.pem";
/// Site private key file name inside a bundle.
pub const SITE_KEY_FILE: &str = "site.key";
/// Certificate signing request a site sends to the authority.
pub const SITE_CSR_FILE: &str = "site.csr";
/// Explanatory file inside a bundle.
pub const BUNDLE_README_FILE: &str = "README.md";
/// Validity used by [`init_federation`].
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// Names put in the server certificate by [`init_federation`].
pub const DEFAULT_SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// How far back `not_before` is set, to tolerate clocks that run slightly behind.
const CLOCK_SKEW: Duration = Duration::minutes(5);
/// Interval until a CRL's `nextUpdate`. Informational: the server re-reads the file on change.
const CRL_NEXT_UPDATE: Duration = Duration::days(30);
const STATE_FORMAT: u32 = 1;

/// What a certificate issued by the CA is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertKind {
    /// The aggregator's TLS server certificate.
    Server,
    /// A site's client certificate.
    Site,
}

/// One certificate the CA has issued, as recorded in its state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Server or site.
    pub kind: CertKind,
    /// Site name, or the server's first name.
    pub name: String,
    /// Serial number in lowercase hex.
    pub serial_hex: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Time of revocation, Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
}

impl IssuedCert {
    /// Whether the certificate has been revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

/// The CA created by [`init`].
#[derive(Debug, Clone)]
pub struct CaInfo {
    /// Federation name.
    pub federation: String,
    /// CA directory.
    pub dir: PathBuf,
    /// CA certificate (PEM).
    pub cert_path: PathBuf,
    /// CA private key (PEM, 0600).
    pub key_path: PathBuf,
    /// End of the CA's validity.
    pub not_after: OffsetDateTime,
}

/// A server certificate written by [`issue_server`].
#[derive(Debug, Clone)]
pub struct ServerCert {
    /// Certificate (PEM).
    pub cert_path: PathBuf,
    /// Private key (PEM, 0600).
    pub key_path: PathBuf,
    /// The certificate's record in the CA state.
    pub issued: IssuedCert,
}

/// A site's key and certificate signing request, written by [`request_site`].
#[derive(Debug, Clone)]
pub struct SiteRequest {
    /// The private key (PKCS#8 v1 PEM, 0600): it stays at the site.
    pub key_path: PathBuf,
    /// The request (PEM) to send to the authority.
    pub csr_path: PathBuf,
}

/// A site bundle folder completed by [`sign_site_request`].
#[derive(Debug, Clone)]
pub struct SiteBundle {
    /// Site name.
    pub site: String,
    /// The bundle folder.
    pub dir: PathBuf,
    /// The certificate's record in the CA state.
    pub issued: IssuedCert,
}

/// A CRL written by [`crl`].
#[derive(Debug, Clone)]
pub struct CrlInfo {
    /// The CRL file (PEM).
    pub path: PathBuf,
    /// The CRL number (increases with each CRL).
    pub number: u64,
    /// Serial numbers listed as revoked.
    pub revoked_serials: Vec<String>,
}

/// Everything [`init_federation`] created.
#[derive(Debug, Clone)]
pub struct FederationPki {
    /// The CA.
    pub ca: CaInfo,
    /// The CRL (initially empty).
    pub crl: CrlInfo,
    /// The server certificate.
    pub server: ServerCert,
}

/// Creates a new CA for `federation` in `out/ca`.
pub fn init(federation: &str, out: &Path, validity_days: u32) -> Result<CaInfo> {
    validate_name(federation)?;
    let (not_before, not_after) = validity(validity_days, None)?;
    let dir = out.join("ca");
    files::create_dir_all(&dir)?;
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    let state_path = dir.join(CA_STATE_FILE);
    refuse_existing(&[&key_path, &cert_path, &state_path])?;
    let key = generate_key()?;
    let mut params = ca_params(federation);
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    let cert = params
        .self_signed(&key)
        .map_err(|source| AttestError::Generation {
            what: "CA certificate",
            source,
        })?;
    files::write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    files::write_new(&cert_path, cert.pem().as_bytes(), false)?;
    let state = CaState {
        format: STATE_FORMAT,
        federation: federation.to_owned(),
        crl_number: 0,
        issued: Vec::new(),
    };
    save_state(&state_path, &state)?;
    Ok(CaInfo {
        federation: federation.to_owned(),
        dir,
        cert_path,
        key_path,
        not_after,
    })
}

/// Issues the aggregator's server certificate for `names` (DNS names or IP addresses) and
/// writes `out/server.pem` and `out/server.key`.
pub fn issue_server(
    ca_dir: &Path,
    names: &[&str],
    out: &Path,
    validity_days: u32,
) -> Result<ServerCert> {
    let mut ca = Ca::open(ca_dir)?;
    let (not_before, not_after) = validity(validity_days, Some(ca.not_after))?;
    let first = names.first().ok_or_else(|| AttestError::InvalidName {
        name: String::new(),
        reason: "the server certificate needs at least one name",
    })?;
    let federation = ca.state.federation.clone();
    let mut sans = vec![uri_san(&FederationUri::server(&federation))?];
    for name in names {
        sans.push(match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(ia5(name)?),
        });
    }
    let key = generate_key()?;
    let spec = LeafSpec {
        kind: CertKind::Server,
        name: first,
        federation: &federation,
        sans,
        not_before,
        not_after,
    };
    let (cert_pem, issued) = ca.issue(spec, &key)?;
    files::create_dir_all(out)?;
    let cert_path = out.join(SERVER_CERT_FILE);
    let key_path = out.join(SERVER_KEY_FILE);
    files::write_new(&key_path, pkcs8_v1_pem(&key)?.as_bytes(), true)?;
    files::write_new(&cert_path, cert_pem.as_bytes(), false)?;
    Ok(ServerCert {
        cert_path,
        key_path,
        issued,
    })
}

/// Creates a site's Ed25519 key and a certificate signing request for it in `dir`, on the
/// site's own machine. The key is written 0600 from the start and never leaves the folder; the
/// request names the site and its federation, and is all the authority needs.
pub fn request_site(federation: &str, site: &str, dir: &Path) -> Result<SiteRequest> {
    validate_name(federation)?;
    validate_name(site)?;
    files::create_dir_all(dir)?;
    let key_path = dir.join(SITE_KEY_FILE);
    let csr_path = dir.join(SITE_CSR_FILE);
    refuse_existing(&[&key_path, &csr_path])?;
    let key = generate_key()?;
    let csr_pem = site_csr(federation, site, &key)?;
    files::write_new(&key_path, pkcs8_v1_pem(&key)?.as_bytes(), true)?;
    files::write_new(&csr_path, csr_pem.as_bytes(), false)?;
    Ok(SiteRequest { key_path, csr_path })
}

/// A new certificate signing request for the key already in `dir` (`site.key`), naming the site
/// and federation of the certificate there (`site.pem`); it replaces `site.csr`. For renewal,
/// or any re-issue that keeps the key, and with it the site's roster line: the authority signs
/// it as any request, the site puts the new `site.pem` in place of the old, and the authority
/// revokes the old certificate by serial.
pub fn renew_site_request(dir: &Path) -> Result<SiteRequest> {
    let key_path = dir.join(SITE_KEY_FILE);
    let cert_path = dir.join(SITE_CERT_FILE);
    let key = load_key_pair(&key_path)?;
    let cert = files::load_cert(&cert_path)?;
    if parse_certificate(&cert)?.public_key != key.public_key_raw() {
        return Err(AttestError::KeyMismatch {
            cert: cert_path,
            key: key_path,
        });
    }
    let identity = peer_identity(&cert)?;
    let csr_path = dir.join(SITE_CSR_FILE);
    let csr_pem = site_csr(&identity.federation, &identity.site, &key)?;
    files::write_atomic(&csr_path, csr_pem.as_bytes())?;
    Ok(SiteRequest { key_path, csr_path })
}

/// A PEM certificate signing request for `site` of `federation`, signed with `key`.
fn site_csr(federation: &str, site: &str, key: &KeyPair) -> Result<String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, site);
    params
        .distinguished_name
        .push(DnType::OrganizationName, federation);
    params.subject_alt_names = vec![uri_san(&FederationUri::site(federation, site))?];
    let generation = |source| AttestError::Generation {
        what: "certificate signing request",
        source,
    };
    let csr = params.serialize_request(key).map_err(generation)?;
    csr.pem().map_err(generation)
}

/// Reads a private key file (owner-only permissions required) for rcgen.
fn load_key_pair(path: &Path) -> Result<KeyPair> {
    files::check_key_permissions(path)?;
    let malformed = |reason: String| AttestError::PemMalformed {
        path: path.to_owned(),
        expected: "private key",
        reason,
    };
    let pem = String::from_utf8(files::read(path)?).map_err(|_| malformed("not UTF-8".into()))?;
    KeyPair::from_pem(&pem).map_err(|e| malformed(e.to_string()))
}

/// Checks a site's certificate signing request and, if it names a site of this CA's
/// federation with a key it signed itself (Ed25519, ECDSA P-256 or RSA), issues its certificate into `out`
/// (`site.pem`, `ca.pem`, `README.md`; no key: the authority never holds one).
pub fn sign_site_request(
    ca_dir: &Path,
    csr_path: &Path,
    out: &Path,
    validity_days: u32,
) -> Result<SiteBundle> {
    let mut ca = Ca::open(ca_dir)?;
    let (not_before, not_after) = validity(validity_days, Some(ca.not_after))?;
    let federation = ca.state.federation.clone();
    let refuse = |reason: String| AttestError::CsrRefused {
        path: csr_path.to_owned(),
        reason,
    };
    let pem =
        String::from_utf8(files::read(csr_path)?).map_err(|_| refuse("not a PEM file".into()))?;
    let request = rcgen::CertificateSigningRequestParams::from_pem(&pem)
        .map_err(|e| refuse(format!("not a valid, self-signed request: {e}")))?;
    request_key_algorithm(&pem, &request.public_key).map_err(refuse)?;
    let site = match request.params.distinguished_name.get(&DnType::CommonName) {
        Some(rcgen::DnValue::Utf8String(name)) => name.clone(),
        Some(rcgen::DnValue::PrintableString(name)) => name.as_str().to_owned(),
        _ => return Err(refuse("it names no site (common name)".into())),
    };
    validate_name(&site)?;
    let uris: Vec<Option<FederationUri>> = request
        .params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::URI(uri) => FederationUri::parse(uri.as_str()),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [Some(uri)] if uri.federation != federation => {
            return Err(refuse(format!(
                "it asks for federation '{}', but this CA is for '{federation}'",
                uri.federation
            )));
        }
        [
            Some(FederationUri {
                role: Role::Site(name),
                ..
            }),
        ] if *name == site => {}
        _ => {
            return Err(refuse(format!(
                "it must carry exactly one name, the site URI {}",
                FederationUri::site(&federation, &site)
            )));
        }
    }
    files::create_dir_all(out)?;
    let cert_path = out.join(SITE_CERT_FILE);
    let ca_path = out.join(CA_CERT_FILE);
    refuse_existing(&[&cert_path, &ca_path])?;
    let spec = LeafSpec {
        kind: CertKind::Site,
        name: &site,
        federation: &federation,
        sans: vec![uri_san(&FederationUri::site(&federation, &site))?],
        not_before,
        not_after,
    };
    let (cert_pem, issued) = ca.issue(spec, &request.public_key)?;
    let ca_pem = files::read(&ca.dir.join(CA_CERT_FILE))?;
    files::write_new(&cert_path, cert_pem.as_bytes(), false)?;
    files::write_new(&ca_path, &ca_pem, false)?;
    let readme = bundle_readme(&federation, &site, &issued);
    files::write_atomic(&out.join(BUNDLE_README_FILE), readme.as_bytes())?;
    Ok(SiteBundle {
        site,
        dir: out.to_owned(),
        issued,
    })
}

/// The algorithm of a request's key, which must be one a site can sign with; and a check that
/// the certificate will carry that very key (rcgen infers the key's kind from the request's
/// signature algorithm, which could otherwise name, say, a P-384 key as P-256).
fn request_key_algorithm(
    pem: &str,
    key: &rcgen::PublicKey,
) -> std::result::Result<KeyAlgorithm, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM request: {e}"))?;
    let (_, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| format!("not a DER request: {e}"))?;
    let spki = &csr.certification_request_info.subject_pki;
    let algorithm = KeyAlgorithm::of(spki).ok_or(
        "the key must be Ed25519, ECDSA P-256 or RSA (2048 to 4096 bits); `quorum-client keygen` \
         makes an Ed25519 one",
    )?;
    let encoded_as = key.algorithm();
    let consistent = match algorithm {
        KeyAlgorithm::Ed25519 => *encoded_as == rcgen::PKCS_ED25519,
        KeyAlgorithm::EcdsaP256 => *encoded_as == rcgen::PKCS_ECDSA_P256_SHA256,
        KeyAlgorithm::Rsa => [
            &rcgen::PKCS_RSA_SHA256,
            &rcgen::PKCS_RSA_SHA384,
            &rcgen::PKCS_RSA_SHA512,
        ]
        .contains(&encoded_as),
    };
    if !consistent || key.der_bytes() != spki.subject_public_key.data.as_ref() {
        return Err(format!(
            "it is signed with a scheme that does not fit its {} key",
            algorithm.name()
        ));
    }
    Ok(algorithm)
}

/// `key` as an unencrypted PKCS#8 v1 PEM document (RFC 8410): the form OpenSSL 3.0 and Python's
/// `cryptography` load. ring writes v2 (with the public key), which both refuse.
fn pkcs8_v1_pem(key: &KeyPair) -> Result<String> {
    // RFC 8410 §7: SEQUENCE { INTEGER 0, AlgorithmIdentifier id-Ed25519, OCTET STRING { OCTET
    // STRING seed } }; ring's v2 document holds the 32-byte seed at this offset.
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let v2 = key.serialize_der();
    let seed = v2.get(16..48).ok_or(AttestError::Generation {
        what: "Ed25519 key",
        source: rcgen::Error::RingUnspecified,
    })?;
    let mut der = V1_PREFIX.to_vec();
    der.extend_from_slice(seed);
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der));
    // The seed must give back the very key that was generated.
    let reread = KeyPair::from_pem(&pem).map_err(|source| AttestError::Generation {
        what: "Ed25519 key",
        source,
    })?;
    if reread.public_key_raw() != key.public_key_raw() {
        return Err(AttestError::Generation {
            what: "Ed25519 key",
            source: rcgen::Error::RingUnspecified,
        });
    }
    Ok(pem)
}

/// Marks every unrevoked certificate whose serial (hex) or name equals `serial_or_site` as
/// revoked. Publish the change with [`crl`]. Returns the certificates newly revoked.
pub fn revoke(ca_dir: &Path, serial_or_site: &str) -> Result<Vec<IssuedCert>> {
    let state_path = ca_dir.join(CA_STATE_FILE);
    let mut state = load_state(&state_path)?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut revoked = Vec::new();
    for cert in state.issued.iter_mut().filter(|c| !c.is_revoked()) {
        if cert.name == serial_or_site || cert.serial_hex.eq_ignore_ascii_case(serial_or_site) {
            cert.revoked_at = Some(now);
            revoked.push(cert.clone());
        }
    }
    if revoked.is_empty() {
        return Err(AttestError::NoMatchingCertificate {
            query: serial_or_site.to_owned(),
        });
    }
    save_state(&state_path, &state)?;
    Ok(revoked)
}

/// Writes a CRL signed by the CA, listing every revoked certificate, to `out` (replaced
/// atomically, so a running server never reads a partial file).
pub fn crl(ca_dir: &Path, out: &Path) -> Result<CrlInfo> {
    crl_at(ca_dir, out, OffsetDateTime::now_utc())
}

/// [`crl`] as issued at `now`: valid from `now` until `now` + 30 days.
pub(crate) fn crl_at(ca_dir: &Path, out: &Path, now: OffsetDateTime) -> Result<CrlInfo> {
    let mut ca = Ca::open(ca_dir)?;
    ca.state.crl_number += 1;
    let mut revoked_certs = Vec::new();
    let mut revoked_serials = Vec::new();
    for cert in ca.state.issued.iter().filter(|c| c.is_revoked()) {
        let serial = hex::decode(&cert.serial_hex).map_err(|_| ca.invalid_state("bad serial"))?;
        let revocation_time = cert
            .revoked_at
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .unwrap_or(now);
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time,
            reason_code: None,
            invalidity_date: None,
        });
        revoked_serials.push(cert.serial_hex.clone());
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + CRL_NEXT_UPDATE,
        crl_number: SerialNumber::from(ca.state.crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let generation = |source| AttestError::Generation {
        what: "CRL",
        source,
    };
    let pem = params
        .signed_by(&ca.issuer)
        .and_then(|crl| crl.pem())
        .map_err(generation)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        files::create_dir_all(parent)?;
    }
    files::write_atomic(out, pem.as_bytes())?;
    save_state(&ca.dir.join(CA_STATE_FILE), &ca.state)?;
    Ok(CrlInfo {
        path: out.to_owned(),
        number: ca.state.crl_number,
        revoked_serials,
    })
}

/// Lists every certificate the CA has issued, in order of issue.
pub fn list(ca_dir: &Path) -> Result<Vec<IssuedCert>> {
    Ok(load_state(&ca_dir.join(CA_STATE_FILE))?.issued)
}

/// Creates the authority's side of a federation's PKI: CA and empty CRL in `out/ca`, a server
/// certificate for [`DEFAULT_SERVER_NAMES`] in `out/server`. Sites enrol themselves
/// ([`request_site`], [`sign_site_request`]).
pub fn init_federation(federation: &str, out: &Path) -> Result<FederationPki> {
    init_federation_for(federation, out, &DEFAULT_SERVER_NAMES)
}

/// [`init_federation`] with a server certificate for `server_names` (DNS names and IP
/// addresses, as sites will reach the aggregator) instead of localhost and 127.0.0.1.
pub fn init_federation_for(
    federation: &str,
    out: &Path,
    server_names: &[&str],
) -> Result<FederationPki> {
    let ca = init(federation, out, DEFAULT_VALIDITY_DAYS)?;
    let crl = crl(&ca.dir, &ca.dir.join(CRL_FILE))?;
    let server = issue_server(
        &ca.dir,
        server_names,
        &out.join("server"),
        DEFAULT_VALIDITY_DAYS,
    )?;
    Ok(FederationPki { ca, crl, server })
}

/// The CA's persistent state.
#[derive(Debug, Serialize, Deserialize)]
struct CaState {
    format: u32,
    federation: String,
    crl_number: u64,
    issued: Vec<IssuedCert>,
}

/// A CA opened for signing.
pub(crate) struct Ca {
    dir: PathBuf,
    state: CaState,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

/// What to put in a leaf certificate.
pub(crate) struct LeafSpec<'a> {
    kind: CertKind,
    name: &'a str,
    federation: &'a str,
    sans: Vec<SanType>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Ca {
    /// Loads the CA state, key and certificate, checking that they belong together.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let state = load_state(&dir.join(CA_STATE_FILE))?;
        let key_path = dir.join(CA_KEY_FILE);
        let key = load_key_pair(&key_path)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let cert = files::load_cert(&cert_path)?;
        let parsed = parse_certificate(&cert)?;
        let mismatch = |reason: &str| AttestError::CaStateInvalid {
            path: dir.join(CA_STATE_FILE),
            reason: reason.to_owned(),
        };
        if parsed.public_key != key.public_key_raw() {
            return Err(AttestError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        match parsed.uri {
            Some(FederationUri {
                federation,
                role: Role::Ca,
            }) if federation == state.federation => {}
            _ => return Err(mismatch("the CA certificate names another federation")),
        }
        // The issuer's name must be byte-identical to the CA certificate's subject, which holds
        // because both come from `ca_params`; the issue tests check chains with webpki.
        let issuer = Issuer::new(ca_params(&state.federation), key);
        Ok(Self {
            dir: dir.to_owned(),
            state,
            issuer,
            not_after: parsed.not_after,
        })
    }

    /// Issues a site certificate naming `federation`, with a key made here, and writes its
    /// bundle under `out_dir`: what a careless or hostile operator could do, for tests.
    #[cfg(test)]
    pub(crate) fn issue_site_bundle(
        &mut self,
        site: &str,
        federation: &str,
        out_dir: &Path,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<SiteBundle> {
        validate_name(site)?;
        let dir = out_dir.join(site);
        files::create_dir_all(out_dir)?;
        fs::create_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => AttestError::AlreadyExists { path: dir.clone() },
            _ => AttestError::io("create directory", &dir, e),
        })?;
        let key = generate_key()?;
        let spec = LeafSpec {
            kind: CertKind::Site,
            name: site,
            federation,
            sans: vec![uri_san(&FederationUri::site(federation, site))?],
            not_before,
            not_after,
        };
        let (cert_pem, issued) = self.issue(spec, &key)?;
        let ca_pem = files::read(&self.dir.join(CA_CERT_FILE))?;
        files::write_new(
            &dir.join(SITE_KEY_FILE),
            pkcs8_v1_pem(&key)?.as_bytes(),
            true,
        )?;
        files::write_new(&dir.join(SITE_CERT_FILE), cert_pem.as_bytes(), false)?;
        files::write_new(&dir.join(CA_CERT_FILE), &ca_pem, false)?;
        Ok(SiteBundle {
            site: site.to_owned(),
            dir,
            issued,
        })
    }

    /// Signs a leaf certificate and records it in the state file before anything else is
    /// written, so that every certificate that may exist can be revoked.
    fn issue(
        &mut self,
        spec: LeafSpec<'_>,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<(String, IssuedCert)> {
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, spec.federation);
        params.subject_alt_names = spec.sans;
        params.serial_number = Some(serial.clone());
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match spec.kind {
            CertKind::Server => ExtendedKeyUsagePurpose::ServerAuth,
            CertKind::Site => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let cert =
            params
                .signed_by(key, &self.issuer)
                .map_err(|source| AttestError::Generation {
                    what: "certificate",
                    source,
                })?;
        let issued = IssuedCert {
            kind: spec.kind,
            name: spec.name.to_owned(),
            serial_hex: hex::encode(serial.to_bytes()),
            not_before: spec.not_before.unix_timestamp(),
            not_after: spec.not_after.unix_timestamp(),
            revoked_at: None,
        };
        self.state.issued.push(issued.clone());
        save_state(&self.dir.join(CA_STATE_FILE), &self.state)?;
        Ok((cert.pem(), issued))
    }

    fn invalid_state(&self, reason: &str) -> AttestError {
        AttestError::CaStateInvalid {
            path: self.dir.join(CA_STATE_FILE),
            reason: reason.to_owned(),
        }
    }
}

/// The CA's certificate parameters, apart from validity and serial. Also used to rebuild the
/// issuer from the state file, so it must stay deterministic.
fn ca_params(federation: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Quorum CA for federation {federation}"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, federation);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // ca_params is only called with validated names, which are valid IA5 strings.
    if let Ok(uri) = ia5(&FederationUri::ca(federation)) {
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params
}

/// `(not_before, not_after)` for a certificate valid `days` from now, never beyond `cap`.
fn validity(days: u32, cap: Option<OffsetDateTime>) -> Result<(OffsetDateTime, OffsetDateTime)> {
    if days == 0 {
        return Err(AttestError::ValidityTooShort { days });
    }
    let now = OffsetDateTime::now_utc();
    let mut not_after = now + Duration::days(i64::from(days));
    if let Some(cap) = cap {
        not_after = not_after.min(cap);
    }
    Ok((now - CLOCK_SKEW, not_after))
}

/// Fails on the first of `paths` that exists: nothing here is ever overwritten.
fn refuse_existing(paths: &[&Path]) -> Result<()> {
    match paths.iter().find(|p| p.exists()) {
        Some(path) => Err(AttestError::AlreadyExists {
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

fn generate_key() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|source| AttestError::Generation {
        what: "Ed25519 key",
        source,
    })
}

/// A random positive 128-bit serial whose top byte is non-zero, so that its DER encoding is
/// exactly these 16 bytes and its hex form is stable.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AttestError::Generation {
            what: "serial number",
            source: rcgen::Error::RingUnspecified,
        })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String> {
    s.try_into().map_err(|source| AttestError::Generation {
        what: "certificate name",
        source,
    })
}

fn uri_san(uri: &str) -> Result<SanType> {
    Ok(SanType::URI(ia5(uri)?))
}

fn load_state(path: &Path) -> Result<CaState> {
    let bytes = files::read(path)?;
    let state: CaState =
        serde_json::from_slice(&bytes).map_err(|e| AttestError::CaStateInvalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if state.format != STATE_FORMAT {
        return Err(AttestError::CaStateInvalid {
            path: path.to_owned(),
            reason: format!("unknown format {}", state.format),
        });
    }
    Ok(state)
}

fn save_state(path: &Path, state: &CaState) -> Result<()> {
    let json = serde_json::to_vec_pretty(state).map_err(|source| AttestError::Json {
        what: "CA state",
        source,
    })?;
    files::write_atomic(path, &json)
}

fn bundle_readme(federation: &str, site: &str, issued: &IssuedCert) -> String {
    let not_after = OffsetDateTime::from_unix_timestamp(issued.not_after)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| issued.not_after.to_string());
    format!(
        "# Quorum site bundle: {site}\n\
         \n\
         Identity of site `{site}` in federation `{federation}`: a certificate the federation's\n\
         authority issued for the key this site made itself (`quorum-client keygen`).\n\
         \n\
         | File | What it is |\n\
         |------|------------|\n\
         | `{SITE_CERT_FILE}` | this site's certificate (serial {serial}, valid until {not_after}) |\n\
         | `{SITE_KEY_FILE}` | this site's Ed25519 private key: keep it secret, mode 0600 |\n\
         | `{CA_CERT_FILE}` | the federation CA certificate, used to check the aggregator and other sites |\n\
         \n\
         `quorum-client` loads all three files from this folder: point the client's identity\n\
         bundle setting at the folder's path. The client refuses a key file that other users can\n\
         read; if you copy the folder, run `chmod 600 {SITE_KEY_FILE}` afterwards.\n\
         \n\
         The certificate authenticates this site to the aggregator over mutual TLS 1.3 and signs\n\
         the site's round messages. If the key leaks, ask the operator to revoke serial {serial}.\n",
        serial = issued.serial_hex,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::peer_identity;

    /// A site's key and request made in `root/<site>`, signed by the CA in `ca`.
    fn enroll(ca: &Path, root: &Path, site: &str) -> SiteBundle {
        let folder = root.join(site);
        let request = request_site("fed", site, &folder).unwrap();
        sign_site_request(ca, &request.csr_path, &folder, 30).unwrap()
    }

    #[test]
    fn federation_layout_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init_federation("fed", dir.path()).unwrap();
        for rel in [
            "ca/ca.pem",
            "ca/ca.key",
            "ca/state.json",
            "ca/crl.pem",
            "server/server.pem",
            "server/server.key",
        ] {
            assert!(dir.path().join(rel).is_file(), "{rel} missing");
        }
        for key in ["ca/ca.key", "server/server.key"] {
            files::check_key_permissions(&dir.path().join(key)).unwrap();
        }
        let listed = list(&pki.ca.dir).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].kind, CertKind::Server);
    }

    #[test]
    fn enroll_by_csr_keeps_the_key_at_the_site() {
        let dir = tempfile::tempdir().unwrap();
        let authority = dir.path().join("authority");
        let pki = init_federation("fed", &authority).unwrap();
        let sites = dir.path().join("sites");
        let alpha = enroll(&pki.ca.dir, &sites, "alpha");
        let beta = enroll(&pki.ca.dir, &sites, "beta");
        for rel in ["site.key", "site.csr", "site.pem", "ca.pem", "README.md"] {
            assert!(alpha.dir.join(rel).is_file(), "{rel} missing");
        }
        // 0600 from the start (the e2e enrolment test checks that the authority holds no
        // site key).
        files::check_key_permissions(&alpha.dir.join(SITE_KEY_FILE)).unwrap();
        // The certificate carries the site's own key and identity.
        let cert = files::load_cert(&alpha.dir.join(SITE_CERT_FILE)).unwrap();
        let id = peer_identity(&cert).unwrap();
        assert_eq!((id.site.as_str(), id.federation.as_str()), ("alpha", "fed"));
        assert_eq!(id.serial_hex, alpha.issued.serial_hex);
        let key =
            KeyPair::from_pem(&fs::read_to_string(alpha.dir.join(SITE_KEY_FILE)).unwrap()).unwrap();
        assert_eq!(
            parse_certificate(&cert).unwrap().public_key,
            key.public_key_raw()
        );
        let listed = list(&pki.ca.dir).unwrap();
        assert_eq!(listed.len(), 3);
        assert_ne!(alpha.issued.serial_hex, beta.issued.serial_hex);
        let readme = fs::read_to_string(alpha.dir.join("README.md")).unwrap();
        assert!(readme.contains(&alpha.issued.serial_hex));
    }

    #[test]
    fn site_key_is_pkcs8_v1() {
        let dir = tempfile::tempdir().unwrap();
        let request = request_site("fed", "alpha", dir.path()).unwrap();
        let pem = fs::read_to_string(&request.key_path).unwrap();
        let der = pem::parse(&pem).unwrap().into_contents();
        // RFC 8410 v1: 48 bytes, version 0, no public key field.
        assert_eq!(der.len(), 48);
        assert_eq!(&der[..5], &[0x30, 0x2e, 0x02, 0x01, 0x00]);
    }

    #[test]
    fn csr_for_another_federation_or_site_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init_federation("fed", &dir.path().join("authority")).unwrap();
        let other = dir.path().join("other");
        let request = request_site("other-fed", "alpha", &other).unwrap();
        match sign_site_request(&pki.ca.dir, &request.csr_path, &other, 30) {
            Err(e @ AttestError::CsrRefused { .. }) => {
                assert!(e.to_string().contains("federation 'other-fed'"), "{e}")
            }
            other => panic!("expected CsrRefused, got {other:?}"),
        }
        // A request whose name and URI disagree (CN beta, URI for alpha).
        let key = generate_key().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "beta");
        params.subject_alt_names = vec![uri_san(&FederationUri::site("fed", "alpha")).unwrap()];
        let forged = dir.path().join("forged.csr");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        fs::write(&forged, csr).unwrap();
        assert!(matches!(
            sign_site_request(&pki.ca.dir, &forged, &dir.path().join("f"), 30),
            Err(AttestError::CsrRefused { .. })
        ));
        // Garbage, and a request whose signature does not match its key.
        fs::write(
            &forged,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )
        .unwrap();
        assert!(matches!(
            sign_site_request(&pki.ca.dir, &forged, &dir.path().join("f"), 30),
            Err(AttestError::CsrRefused { .. })
        ));
        let good = fs::read_to_string(&request.csr_path).unwrap();
        let mut der = pem::parse(&good).unwrap().into_contents();
        let last = der.len() - 1;
        der[last] ^= 1;
        fs::write(
            &forged,
            pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der)),
        )
        .unwrap();
        assert!(matches!(
            sign_site_request(&pki.ca.dir, &forged, &dir.path().join("f"), 30),
            Err(AttestError::CsrRefused { .. })
        ));
        // Nothing was issued for any of them.
        assert_eq!(list(&pki.ca.dir).unwrap().len(), 1);
    }

    #[test]
    fn revoke_by_name_and_serial_then_crl_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init_federation("fed", &dir.path().join("authority")).unwrap();
        let ca = &pki.ca.dir;
        let sites: Vec<SiteBundle> = ["a", "b", "c"]
            .iter()
            .map(|s| enroll(ca, &dir.path().join("sites"), s))
            .collect();
        assert_eq!(revoke(ca, "a").unwrap().len(), 1);
        let serial_b = sites[1].issued.serial_hex.to_uppercase();
        assert_eq!(revoke(ca, &serial_b).unwrap()[0].name, "b");
        assert!(matches!(
            revoke(ca, "a"),
            Err(AttestError::NoMatchingCertificate { .. })
        ));
        let info = crl(ca, &ca.join(CRL_FILE)).unwrap();
        assert_eq!(info.number, 2);
        assert_eq!(
            info.revoked_serials,
            vec![
                sites[0].issued.serial_hex.clone(),
                sites[1].issued.serial_hex.clone()
            ]
        );
        let der = files::load_crl(&ca.join(CRL_FILE)).unwrap();
        let parsed = webpki::OwnedCertRevocationList::from_der(&der).unwrap();
        let listed = |i: usize| {
            let serial = hex::decode(&sites[i].issued.serial_hex).unwrap();
            webpki::CertRevocationList::from(parsed.clone())
                .find_serial(&serial)
                .unwrap()
                .is_some()
        };
        assert!(listed(0) && listed(1) && !listed(2));
        let states: Vec<bool> = list(ca)
            .unwrap()
            .iter()
            .map(IssuedCert::is_revoked)
            .collect();
        assert_eq!(states, [false, true, true, false]);
    }

    #[test]
    fn refuses_to_overwrite_and_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init("fed", dir.path(), 10).unwrap();
        assert!(matches!(
            init("fed", dir.path(), 10),
            Err(AttestError::AlreadyExists { .. })
        ));
        let sites = dir.path().join("sites");
        let a = enroll(&ca.dir, &sites, "a");
        assert!(matches!(
            request_site("fed", "a", &a.dir),
            Err(AttestError::AlreadyExists { .. })
        ));
        assert!(matches!(
            sign_site_request(&ca.dir, &a.dir.join(SITE_CSR_FILE), &a.dir, 5),
            Err(AttestError::AlreadyExists { .. })
        ));
        assert!(matches!(
            request_site("fed", "../x", &sites.join("x")),
            Err(AttestError::InvalidName { .. })
        ));
        let b = request_site("fed", "b", &sites.join("b")).unwrap();
        assert!(matches!(
            sign_site_request(&ca.dir, &b.csr_path, &sites.join("b"), 0),
            Err(AttestError::ValidityTooShort { .. })
        ));
    }

    #[test]
    fn leaf_validity_is_capped_by_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init("fed", dir.path(), 2).unwrap();
        let folder = dir.path().join("s");
        let request = request_site("fed", "a", &folder).unwrap();
        let bundle = sign_site_request(&ca.dir, &request.csr_path, &folder, 400).unwrap();
        assert_eq!(bundle.issued.not_after, ca.not_after.unix_timestamp());
    }

    #[test]
    fn ca_with_permissive_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = init("fed", dir.path(), 10).unwrap();
        fs::set_permissions(&ca.key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let request = request_site("fed", "a", &dir.path().join("a")).unwrap();
        assert!(matches!(
            sign_site_request(&ca.dir, &request.csr_path, dir.path(), 5),
            Err(AttestError::KeyFilePermissive { .. })
        ));
    }
}
