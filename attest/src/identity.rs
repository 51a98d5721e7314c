//! A site's own identity (certificate and signing key) and verification of other sites'
//! signatures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use quorum_crypto::secagg::AdoptedList;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use webpki::{
    EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList, RevocationOptionsBuilder,
};
use x509_parser::extensions::GeneralName;

use crate::crl::WatchedCrl;
use crate::error::{AttestError, Result};
use crate::files;
use crate::names::{FederationUri, Role};
use crate::pki::{CA_CERT_FILE, SITE_CERT_FILE, SITE_KEY_FILE};
use crate::relayed_crl::{self, CheckedCrl, SignedList};
use crate::site_key::{KeyAlgorithm, SigningKey};

/// Who a verified site certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Site name (the certificate's common name).
    pub site: String,
    /// Federation named by the certificate's URI.
    pub federation: String,
    /// Serial number in lowercase hex.
    pub serial_hex: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The certificate's key algorithm, which decides how the site signs.
    pub key_algorithm: KeyAlgorithm,
}

/// Reads the identity from a site certificate. This only parses: it does not check the chain,
/// revocation or validity period (see [`PeerVerifier`] and the TLS verifier for that).
pub fn peer_identity(cert_der: &[u8]) -> Result<PeerIdentity> {
    let parsed = parse_certificate(cert_der)?;
    let key_algorithm = parsed.signing_algorithm()?;
    let (federation, site) = match parsed.uri {
        Some(FederationUri {
            federation,
            role: Role::Site(site),
        }) => (federation, site),
        _ => return Err(malformed("no urn:quorum:federation:<f>:site:<s> URI")),
    };
    if parsed.common_name.as_deref() != Some(site.as_str()) {
        return Err(malformed("common name differs from the site in the URI"));
    }
    Ok(PeerIdentity {
        site,
        federation,
        serial_hex: hex::encode(&parsed.serial),
        not_after: parsed.not_after,
        key_algorithm,
    })
}

/// This site's certificate and private key, loaded from a bundle folder.
pub struct SiteIdentity {
    dir: PathBuf,
    identity: PeerIdentity,
    cert: CertificateDer<'static>,
    key: SigningKey,
}

impl std::fmt::Debug for SiteIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("SiteIdentity")
            .field("dir", &self.dir)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl SiteIdentity {
    /// Loads `site.pem`, `site.key` and `ca.pem` from `bundle_dir`. Refuses a key file that
    /// others can read, a key that does not match the certificate, and a certificate that the
    /// bundle's CA did not issue or that is outside its validity period.
    pub fn load(bundle_dir: &Path) -> Result<Self> {
        let cert_path = bundle_dir.join(SITE_CERT_FILE);
        let key_path = bundle_dir.join(SITE_KEY_FILE);
        let cert = files::load_cert(&cert_path)?;
        let identity = peer_identity(&cert)?;
        let key_der = files::load_private_key(&key_path)?;
        let key = SigningKey::parse(&key_der, identity.key_algorithm).map_err(|reason| {
            AttestError::KeyUnusable {
                path: key_path.clone(),
                reason,
            }
        })?;
        if parse_certificate(&cert)?.public_key != key.public_key() {
            return Err(AttestError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        let ca = files::load_cert(&bundle_dir.join(CA_CERT_FILE))?;
        verify_chain(
            &ca,
            &cert,
            &identity.site,
            None,
            KeyUsage::client_auth(),
            now(),
        )?;
        Ok(Self {
            dir: bundle_dir.to_owned(),
            identity,
            cert,
            key,
        })
    }

    /// Signs `msg` with the site's key (the scheme follows from its algorithm).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.key.sign(msg)
    }

    /// The site certificate, DER.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Site name.
    pub fn site(&self) -> &str {
        &self.identity.site
    }

    /// Federation name.
    pub fn federation(&self) -> &str {
        &self.identity.federation
    }

    /// Serial number, validity and names of the certificate.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// The site certificate file, for [`crate::tls::client_config`].
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(SITE_CERT_FILE)
    }

    /// The site key file, for [`crate::tls::client_config`].
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(SITE_KEY_FILE)
    }

    /// The federation CA certificate shipped in the bundle.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }
}

/// Checks certificates and signatures of other sites of one federation.
#[derive(Debug)]
pub struct PeerVerifier {
    ca: CertificateDer<'static>,
    federation: String,
    revocation: Revocation,
    roster: BTreeMap<String, [u8; 32]>,
    /// The certificate each connected site presented (aggregator side).
    members: Mutex<BTreeMap<String, Vec<u8>>>,
}

/// Where a [`PeerVerifier`] learns who is revoked.
#[derive(Debug)]
enum Revocation {
    /// Nowhere: chain and validity checks only.
    Off,
    /// The authority's CRL file, re-read when it changes (the aggregator).
    File(WatchedCrl<SignedList>),
    /// The newest list relayed with an offer (a site), and the aggregator's certificate as the
    /// site last saw it over TLS, which every new list must not revoke.
    Relayed {
        current: Mutex<Option<Arc<CheckedCrl>>>,
        server: Mutex<Option<CertificateDer<'static>>>,
    },
}

impl PeerVerifier {
    /// Trusts the CA in `ca_pem` for `federation` (which must be the CA's own federation),
    /// checking revocation against the CRL file `crl` if given, re-read when it changes.
    pub fn new(ca_pem: &Path, federation: &str, crl: Option<&Path>) -> Result<Self> {
        let revocation = match crl {
            None => Revocation::Off,
            Some(path) => {
                let owned = path.to_owned();
                Revocation::File(WatchedCrl::new(path, move |der| {
                    let list = OwnedCertRevocationList::from_der(&der).map_err(|e| {
                        AttestError::CrlUnusable {
                            path: owned.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    Ok(SignedList {
                        list,
                        der: der.as_ref().to_vec(),
                    })
                })?)
            }
        };
        Self::with_revocation(ca_pem, federation, revocation)
    }

    /// A site's verifier: revocation comes from the lists the aggregator relays with its offers
    /// ([`PeerVerifier::adopt_revocation_list`]), never older than `stored`, the last list this
    /// site adopted (read back from its own store; its signature is checked, its age is not).
    pub fn relayed(ca_pem: &Path, federation: &str, stored: Option<&[u8]>) -> Result<Self> {
        let verifier = Self::with_revocation(
            ca_pem,
            federation,
            Revocation::Relayed {
                current: Mutex::new(None),
                server: Mutex::new(None),
            },
        )?;
        if let (Some(der), Revocation::Relayed { current, .. }) = (stored, &verifier.revocation) {
            let checked = relayed_crl::check(&verifier.ca, der, None)?;
            *lock(current) = Some(Arc::new(checked));
        }
        Ok(verifier)
    }

    fn with_revocation(ca_pem: &Path, federation: &str, revocation: Revocation) -> Result<Self> {
        let ca = files::load_cert(ca_pem)?;
        let ca_federation = ca_federation(&ca)?;
        if ca_federation != federation {
            return Err(AttestError::FederationMismatch {
                expected: federation.to_owned(),
                found: ca_federation,
            });
        }
        Ok(Self {
            ca,
            federation: federation.to_owned(),
            revocation,
            roster: BTreeMap::new(),
            members: Mutex::default(),
        })
    }

    /// Records the certificate `site` connected with, for [`PeerVerifier::check_member`].
    pub fn site_joined(&self, site: &str, certificate_der: &[u8]) {
        lock(&self.members).insert(site.to_owned(), certificate_der.to_vec());
    }

    /// Whether `site`'s certificate, as it connected, still passes
    /// [`PeerVerifier::verify_certificate`] (the CRL may have changed since); a site that never
    /// joined through [`PeerVerifier::site_joined`] passes.
    pub fn check_member(&self, site: &str) -> Result<()> {
        let certificate = lock(&self.members).get(site).cloned();
        match certificate {
            Some(der) => self.verify_certificate(&der).map(drop),
            None => Ok(()),
        }
    }

    /// The CA-signed list peers are checked against (DER), for the aggregator to relay with
    /// its offers; empty when revocation is off or no list was relayed yet.
    pub fn revocation_list_der(&self) -> Result<Vec<u8>> {
        Ok(self
            .list_in_use()?
            .map(|signed| signed.der.clone())
            .unwrap_or_default())
    }

    /// The list peers are checked against now, if any.
    fn list_in_use(&self) -> Result<Option<Arc<SignedList>>> {
        Ok(match &self.revocation {
            Revocation::Off => None,
            Revocation::File(watched) => Some(watched.current()?),
            Revocation::Relayed { current, .. } => {
                lock(current).as_ref().map(|c| Arc::clone(&c.signed))
            }
        })
    }

    /// Checks a list the aggregator relayed (see [`relayed_crl`](crate::relayed_crl)) and
    /// checks peers against it from now on if it is newer than the one in use; refuses a list
    /// that revokes the aggregator's own certificate. `Some` when adopted: the caller stores
    /// [`PeerVerifier::revocation_list_der`] so that a restart cannot go back.
    pub fn adopt_revocation_list(&self, der: &[u8]) -> Result<Option<AdoptedList>> {
        let Revocation::Relayed { current, server } = &self.revocation else {
            return Err(AttestError::RelayedCrlRefused {
                reason: "this verifier reads the authority's CRL file, not relayed lists".into(),
            });
        };
        let found = relayed_crl::check(&self.ca, der, Some(now()))?;
        let mut current = lock(current);
        if let Some(in_use) = current.as_deref()
            && !relayed_crl::replaces(in_use, &found)?
        {
            return Ok(None);
        }
        if let Some(server) = lock(server).as_ref() {
            verify_server_chain(&self.ca, server, Some(&found.signed.list))?;
        }
        let adopted = AdoptedList {
            number: found.number.to_string(),
            next_update: found.next_update,
            revoked: found.revoked,
        };
        *current = Some(Arc::new(found));
        Ok(Some(adopted))
    }

    /// Checks the aggregator's certificate, as this site's TLS connection presented it, against
    /// the list in use, and keeps it so that every list adopted later is checked against it.
    pub fn server_connected(&self, certificate: CertificateDer<'static>) -> Result<()> {
        let Revocation::Relayed { current, server } = &self.revocation else {
            return Err(AttestError::RelayedCrlRefused {
                reason: "only a site's verifier, fed relayed lists, checks the aggregator".into(),
            });
        };
        // A stale list (a site long offline) vouches neither way: the next offer brings a
        // current one, checked against this certificate before it is adopted.
        let current = lock(current).clone();
        let now = now().as_secs() as i64;
        let list = current
            .as_deref()
            .filter(|c| c.next_update > now)
            .map(|c| &c.signed.list);
        verify_server_chain(&self.ca, &certificate, list)?;
        *lock(server) = Some(certificate);
        Ok(())
    }

    /// Accepts signatures only from the sites in `roster`, each with the key whose
    /// [`key_fingerprint`] is pinned there: a certificate the CA issued to anyone else, or a
    /// second certificate for a member, is refused. An empty roster pins nothing.
    pub fn with_roster(mut self, roster: BTreeMap<String, [u8; 32]>) -> Self {
        self.roster = roster;
        self
    }

    /// Checks that `certificate_der` is a valid, unrevoked site certificate of this federation
    /// for client authentication, and returns its identity.
    pub fn verify_certificate(&self, certificate_der: &[u8]) -> Result<PeerIdentity> {
        let identity = peer_identity(certificate_der)?;
        let cert = CertificateDer::from(certificate_der);
        let list = self.list_in_use()?;
        let list = list.as_deref().map(|signed| &signed.list);
        let usage = KeyUsage::client_auth();
        verify_chain(&self.ca, &cert, &identity.site, list, usage, now())?;
        if identity.federation != self.federation {
            return Err(AttestError::FederationMismatch {
                expected: self.federation.clone(),
                found: identity.federation,
            });
        }
        Ok(identity)
    }

    /// Checks that `signature` over `message` was made by site `expected_site`, whose
    /// certificate is `certificate_der` (chained to the CA, unrevoked, of this federation).
    pub fn verify_signed(
        &self,
        expected_site: &str,
        certificate_der: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<PeerIdentity> {
        let identity = self.verify_certificate(certificate_der)?;
        if identity.site != expected_site {
            return Err(AttestError::SiteMismatch {
                expected: expected_site.to_owned(),
                found: identity.site,
            });
        }
        if !self.roster.is_empty() {
            let pinned =
                self.roster
                    .get(&identity.site)
                    .ok_or_else(|| AttestError::NotInRoster {
                        site: identity.site.clone(),
                    })?;
            if key_fingerprint(certificate_der)? != *pinned {
                return Err(AttestError::RosterKeyMismatch {
                    site: identity.site.clone(),
                });
            }
        }
        verify_site_signature(certificate_der, &identity, message, signature)?;
        Ok(identity)
    }
}

/// SHA-256 of a site certificate's public key (the subject public key's bits): what a roster
/// pins, unchanged when the certificate is renewed for the same key.
pub fn key_fingerprint(certificate_der: &[u8]) -> Result<[u8; 32]> {
    let parsed = parse_certificate(certificate_der)?;
    Ok(quorum_crypto::digest::sha256(&parsed.public_key))
}

/// Verifies a signature with the public key of `certificate_der`, whose identity (read by
/// [`peer_identity`]) is `signer`, in the scheme its key algorithm implies
/// ([`KeyAlgorithm::verification`]).
pub(crate) fn verify_site_signature(
    certificate_der: &[u8],
    signer: &PeerIdentity,
    message: &[u8],
    signature: &[u8],
) -> Result<()> {
    let cert = CertificateDer::from(certificate_der);
    let invalid = || AttestError::PeerSignatureInvalid {
        site: signer.site.clone(),
    };
    EndEntityCert::try_from(&cert)
        .map_err(|_| invalid())?
        .verify_signature(signer.key_algorithm.verification(), message, signature)
        .map_err(|_| invalid())
}

/// Path validation of the aggregator's certificate against `ca` for server authentication.
fn verify_server_chain(
    ca: &CertificateDer<'_>,
    cert: &CertificateDer<'_>,
    crl: Option<&OwnedCertRevocationList>,
) -> Result<()> {
    let usage = KeyUsage::server_auth();
    verify_chain(ca, cert, "the aggregator", crl, usage, now())
}

/// Path validation of a certificate against `ca` for `usage`; a CRL, when given, must be
/// current (past its next update it fails closed).
pub(crate) fn verify_chain(
    ca: &CertificateDer<'_>,
    cert: &CertificateDer<'_>,
    subject: &str,
    crl: Option<&OwnedCertRevocationList>,
    usage: KeyUsage,
    now: UnixTime,
) -> Result<()> {
    let anchor =
        webpki::anchor_from_trusted_cert(ca).map_err(|e| AttestError::CertificateMalformed {
            reason: format!("CA certificate: {e}"),
        })?;
    let end_entity = EndEntityCert::try_from(cert).map_err(|e| rejected(subject, e))?;
    let crl = crl.map(|crl| webpki::CertRevocationList::from(crl.clone()));
    let crls: Vec<&webpki::CertRevocationList<'_>> = crl.iter().collect();
    let revocation = RevocationOptionsBuilder::new(&crls)
        .ok()
        .map(|b| b.with_expiration_policy(ExpirationPolicy::Enforce).build());
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            now,
            usage,
            revocation,
            None,
        )
        .map(|_| ())
        .map_err(|e| match e {
            webpki::Error::CertRevoked => AttestError::CertificateRevoked {
                subject: subject.to_owned(),
                serial: parse_certificate(cert)
                    .map(|p| hex::encode(p.serial))
                    .unwrap_or_default(),
            },
            webpki::Error::CrlExpired { .. } => AttestError::RelayedCrlRefused {
                reason: format!("the list in use is stale, so {subject} cannot be checked"),
            },
            webpki::Error::CertExpired { not_after, .. } => AttestError::CertificateExpired {
                subject: subject.to_owned(),
                not_after: OffsetDateTime::from_unix_timestamp(not_after.as_secs() as i64)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            },
            // A CA with the same name but another key shows up as a bad signature.
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                AttestError::CertificateFromAnotherCa {
                    subject: subject.to_owned(),
                }
            }
            other => rejected(subject, other),
        })
}

fn rejected(subject: &str, source: webpki::Error) -> AttestError {
    AttestError::CertificateRejected {
        subject: subject.to_owned(),
        source,
    }
}

/// The federation a CA certificate was created for.
pub(crate) fn ca_federation(ca: &[u8]) -> Result<String> {
    match parse_certificate(ca)?.uri {
        Some(FederationUri {
            federation,
            role: Role::Ca,
        }) => Ok(federation),
        _ => Err(malformed(
            "CA certificate has no urn:quorum:federation:<f> URI",
        )),
    }
}

/// Every update of a guarded value replaces it whole, so a poisoned lock holds a consistent one.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn now() -> UnixTime {
    UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// The fields of a certificate that Quorum uses.
pub(crate) struct ParsedCert {
    pub(crate) common_name: Option<String>,
    pub(crate) uri: Option<FederationUri>,
    pub(crate) serial: Vec<u8>,
    pub(crate) not_after: OffsetDateTime,
    /// The subject public key's bits (raw Ed25519 key, EC point, or PKCS#1 RSA key).
    pub(crate) public_key: Vec<u8>,
    /// `None` for a key Quorum cannot sign or verify with (fine for a CA's or a server's).
    pub(crate) algorithm: Option<KeyAlgorithm>,
}

impl ParsedCert {
    /// The key algorithm of a certificate whose key signs Quorum messages.
    pub(crate) fn signing_algorithm(&self) -> Result<KeyAlgorithm> {
        self.algorithm.ok_or_else(|| {
            malformed("its key is neither Ed25519, ECDSA P-256 nor RSA (2048 to 4096 bits)")
        })
    }
}

/// Parses a DER certificate, requiring at most one Quorum URI.
pub(crate) fn parse_certificate(der: &[u8]) -> Result<ParsedCert> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| malformed(&format!("not DER X.509: {e}")))?;
    if !rest.is_empty() {
        return Err(malformed("trailing bytes after the certificate"));
    }
    let spki = cert.public_key();
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| malformed(&format!("subject alternative names: {e}")))?;
    let mut uris = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => FederationUri::parse(uri),
            _ => None,
        });
    let uri = uris.next();
    if uris.next().is_some() {
        return Err(malformed("more than one federation URI"));
    }
    Ok(ParsedCert {
        common_name,
        uri,
        serial: cert.raw_serial().to_vec(),
        not_after: cert.validity().not_after.to_datetime(),
        public_key: spki.subject_public_key.data.to_vec(),
        algorithm: KeyAlgorithm::of(spki),
    })
}

fn malformed(reason: &str) -> AttestError {
    AttestError::CertificateMalformed {
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::test_support::{Federation, federation};

    fn verifier(fed: &Federation) -> PeerVerifier {
        PeerVerifier::new(&fed.pki.ca.cert_path, "fed", Some(&fed.pki.crl.path)).unwrap()
    }

    fn cert_of(bundle: &Path) -> Vec<u8> {
        files::load_cert(&bundle.join(SITE_CERT_FILE))
            .unwrap()
            .to_vec()
    }

    #[test]
    fn site_signature_verifies() {
        let fed = federation("fed", &["alpha", "beta"]);
        let id = SiteIdentity::load(fed.bundle("alpha")).unwrap();
        assert_eq!((id.site(), id.federation()), ("alpha", "fed"));
        let sig = id.sign(b"round 7 keys");
        let peer = verifier(&fed)
            .verify_signed("alpha", id.certificate_der(), b"round 7 keys", &sig)
            .unwrap();
        assert_eq!(&peer, id.identity());
    }

    #[test]
    fn roster_pins_refuse_outsiders_and_a_second_certificate_for_a_member() {
        let fed = federation("fed", &["alpha", "beta", "gamma"]);
        let alpha = SiteIdentity::load(fed.bundle("alpha")).unwrap();
        let gamma = SiteIdentity::load(fed.bundle("gamma")).unwrap();
        let pin = |id: &SiteIdentity| key_fingerprint(id.certificate_der()).unwrap();
        // The site knows alpha and beta; the CA also certified gamma, and a second "alpha".
        let beta = SiteIdentity::load(fed.bundle("beta")).unwrap();
        let roster = BTreeMap::from([
            ("alpha".to_owned(), pin(&alpha)),
            ("beta".into(), pin(&beta)),
        ]);
        let v = verifier(&fed).with_roster(roster);
        let signed = |id: &SiteIdentity| {
            v.verify_signed(id.site(), id.certificate_der(), b"m", &id.sign(b"m"))
        };
        assert!(signed(&alpha).is_ok());
        assert!(matches!(
            signed(&gamma),
            Err(AttestError::NotInRoster { .. })
        ));
        let twin = fed.second_bundle("alpha");
        let twin = SiteIdentity::load(&twin.dir).unwrap();
        assert!(matches!(
            signed(&twin),
            Err(AttestError::RosterKeyMismatch { .. })
        ));
        // Without a roster the same twin passes: the CA alone vouches for it.
        assert!(
            verifier(&fed)
                .verify_signed("alpha", twin.certificate_der(), b"m", &twin.sign(b"m"))
                .is_ok()
        );
    }

    /// The federation's current CRL as it travels with an offer (DER).
    fn relayed_list(fed: &Federation) -> Vec<u8> {
        files::load_crl(&fed.pki.crl.path).unwrap().to_vec()
    }

    fn refused_for(result: Result<Option<AdoptedList>>, reason: &str) {
        match result {
            Err(AttestError::RelayedCrlRefused { reason: found }) => {
                assert!(found.contains(reason), "{found}")
            }
            other => panic!("expected a refusal for {reason:?}, got {other:?}"),
        }
    }

    #[test]
    fn crl_relayed_is_adopted_revokes_peers_and_survives_a_restart() {
        let fed = federation("fed", &["alpha", "beta"]);
        let beta = SiteIdentity::load(fed.bundle("beta")).unwrap();
        let signed = |v: &PeerVerifier| {
            v.verify_signed("beta", beta.certificate_der(), b"m", &beta.sign(b"m"))
        };
        let site = PeerVerifier::relayed(&fed.pki.ca.cert_path, "fed", None).unwrap();
        let first = site.adopt_revocation_list(&relayed_list(&fed)).unwrap();
        assert_eq!(first.map(|l| (l.number, l.revoked)), Some(("1".into(), 0)));
        assert!(signed(&site).is_ok());
        // The same list again changes nothing.
        assert_eq!(
            site.adopt_revocation_list(&relayed_list(&fed)).unwrap(),
            None
        );

        fed.revoke("beta");
        let adopted = site
            .adopt_revocation_list(&relayed_list(&fed))
            .unwrap()
            .unwrap();
        assert_eq!((adopted.number.as_str(), adopted.revoked), ("2", 1));
        assert!(matches!(
            signed(&site),
            Err(AttestError::CertificateRevoked { .. })
        ));
        // Restarted from what it stored, the site still refuses beta and list 1.
        let stored = site.revocation_list_der().unwrap();
        let site = PeerVerifier::relayed(&fed.pki.ca.cert_path, "fed", Some(&stored)).unwrap();
        assert!(matches!(
            signed(&site),
            Err(AttestError::CertificateRevoked { .. })
        ));
    }

    #[test]
    fn crl_relayed_stale_rolled_back_foreign_or_revoking_the_aggregator_is_refused() {
        let fed = federation("fed", &["alpha"]);
        let site = PeerVerifier::relayed(&fed.pki.ca.cert_path, "fed", None).unwrap();
        let server = files::load_cert(&fed.pki.server.cert_path).unwrap();
        site.server_connected(server).unwrap();
        let old = relayed_list(&fed);
        fed.revoke("alpha");
        site.adopt_revocation_list(&relayed_list(&fed))
            .unwrap()
            .unwrap();
        refused_for(
            site.adopt_revocation_list(&old),
            "older than the 2 already in use",
        );

        let other = federation("fed", &[]);
        refused_for(
            site.adopt_revocation_list(&relayed_list(&other)),
            "does not verify with the CA key",
        );
        let mut garbled = relayed_list(&fed);
        let last = garbled.len() - 1;
        garbled[last] ^= 1;
        refused_for(site.adopt_revocation_list(&garbled), "does not verify");
        refused_for(site.adopt_revocation_list(b"not a crl"), "not a DER CRL");

        fed.publish_stale_crl();
        let stale = relayed_list(&fed);
        refused_for(site.adopt_revocation_list(&stale), "stale");
        // A site restarted from a list that went stale while it was offline still reaches the
        // aggregator, to be brought a current one.
        let offline = PeerVerifier::relayed(&fed.pki.ca.cert_path, "fed", Some(&stale)).unwrap();
        offline
            .server_connected(files::load_cert(&fed.pki.server.cert_path).unwrap())
            .unwrap();

        // A current list that revokes the aggregator it came from.
        fed.revoke("localhost");
        let refused = site.adopt_revocation_list(&relayed_list(&fed));
        assert!(
            matches!(refused, Err(AttestError::CertificateRevoked { ref subject, .. }) if subject == "the aggregator"),
            "{refused:?}"
        );
        // Nothing refused was adopted: list 2 is still the one in use.
        let in_use = site.revocation_list_der().unwrap();
        assert_eq!(
            relayed_crl::check(&site.ca, &in_use, None)
                .unwrap()
                .number
                .to_string(),
            "2"
        );
    }

    #[test]
    fn csr_renewal_keeps_the_key_and_so_the_roster_place() {
        let fed = federation("fed", &["alpha"]);
        let bundle = fed.bundle("alpha");
        let old = SiteIdentity::load(bundle).unwrap();
        let pinned = key_fingerprint(old.certificate_der()).unwrap();
        // The site asks again for its own key; the authority signs it as any request.
        let request = crate::pki::renew_site_request(bundle).unwrap();
        let issued = fed.dir.path().join("renewed");
        let renewed =
            crate::pki::sign_site_request(&fed.pki.ca.dir, &request.csr_path, &issued, 30).unwrap();
        assert_ne!(renewed.issued.serial_hex, old.identity().serial_hex);
        fs::copy(issued.join(SITE_CERT_FILE), bundle.join(SITE_CERT_FILE)).unwrap();
        let new = SiteIdentity::load(bundle).unwrap();
        assert_eq!(key_fingerprint(new.certificate_der()).unwrap(), pinned);

        // The authority revokes the old certificate by serial: a verifier pinning alpha's key
        // refuses the old certificate and takes the new one.
        fed.revoke(&old.identity().serial_hex);
        let roster = BTreeMap::from([("alpha".to_owned(), pinned)]);
        let v = verifier(&fed).with_roster(roster);
        let signed = |id: &SiteIdentity| {
            v.verify_signed("alpha", id.certificate_der(), b"m", &id.sign(b"m"))
        };
        assert!(matches!(
            signed(&old),
            Err(AttestError::CertificateRevoked { .. })
        ));
        signed(&new).unwrap();
    }

    #[test]
    fn crl_change_makes_a_connected_member_fail_its_check() {
        let fed = federation("fed", &["alpha", "beta"]);
        let v = verifier(&fed);
        v.site_joined("alpha", &cert_of(fed.bundle("alpha")));
        v.site_joined("beta", &cert_of(fed.bundle("beta")));
        v.check_member("alpha").unwrap();
        fed.revoke("beta");
        assert!(matches!(
            v.check_member("beta"),
            Err(AttestError::CertificateRevoked { .. })
        ));
        v.check_member("alpha").unwrap();
        // A site the verifier never saw join is not its to judge.
        v.check_member("gamma").unwrap();
    }

    #[test]
    fn forged_signature_is_refused() {
        let fed = federation("fed", &["alpha", "beta"]);
        let alpha = SiteIdentity::load(fed.bundle("alpha")).unwrap();
        let beta = SiteIdentity::load(fed.bundle("beta")).unwrap();
        let v = verifier(&fed);
        // beta signs, but presents alpha's certificate.
        let sig = beta.sign(b"msg");
        assert!(matches!(
            v.verify_signed("alpha", alpha.certificate_der(), b"msg", &sig),
            Err(AttestError::PeerSignatureInvalid { .. })
        ));
        // alpha's genuine signature over a different message.
        let sig = alpha.sign(b"msg");
        assert!(matches!(
            v.verify_signed("alpha", alpha.certificate_der(), b"msg2", &sig),
            Err(AttestError::PeerSignatureInvalid { .. })
        ));
        // Truncated signature.
        assert!(matches!(
            v.verify_signed("alpha", alpha.certificate_der(), b"msg", &sig[..10]),
            Err(AttestError::PeerSignatureInvalid { .. })
        ));
        // A valid signature, but claimed for another site.
        assert!(matches!(
            v.verify_signed("beta", alpha.certificate_der(), b"msg", &sig),
            Err(AttestError::SiteMismatch { .. })
        ));
    }

    #[test]
    fn certificate_of_another_ca_is_refused() {
        let fed = federation("fed", &["alpha"]);
        // Same federation name (same CA subject, other key), and another name entirely.
        for other in [
            federation("fed", &["alpha"]),
            federation("other", &["alpha"]),
        ] {
            let intruder = SiteIdentity::load(other.bundle("alpha")).unwrap();
            let sig = intruder.sign(b"m");
            let err = verifier(&fed)
                .verify_signed("alpha", intruder.certificate_der(), b"m", &sig)
                .unwrap_err();
            assert!(
                matches!(err, AttestError::CertificateFromAnotherCa { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn certificate_of_another_federation_is_refused() {
        let fed = federation("fed", &[]);
        let bundle = fed.foreign_federation_bundle("alpha", "other");
        let id = SiteIdentity::load(&bundle.dir).unwrap();
        assert_eq!(id.federation(), "other");
        let err = verifier(&fed)
            .verify_signed("alpha", id.certificate_der(), b"m", &id.sign(b"m"))
            .unwrap_err();
        assert!(
            matches!(&err, AttestError::FederationMismatch { found, .. } if found == "other"),
            "{err}"
        );
        assert!(matches!(
            PeerVerifier::new(&fed.pki.ca.cert_path, "other", None),
            Err(AttestError::FederationMismatch { .. })
        ));
    }

    #[test]
    fn revoked_certificate_is_refused_after_crl_update() {
        let fed = federation("fed", &["alpha", "beta"]);
        let v = verifier(&fed);
        let alpha = SiteIdentity::load(fed.bundle("alpha")).unwrap();
        let sig = alpha.sign(b"m");
        v.verify_signed("alpha", alpha.certificate_der(), b"m", &sig)
            .unwrap();
        fed.revoke("alpha");
        let err = v
            .verify_signed("alpha", alpha.certificate_der(), b"m", &sig)
            .unwrap_err();
        assert!(
            matches!(&err, AttestError::CertificateRevoked { serial, .. } if *serial == alpha.identity().serial_hex),
            "{err}"
        );
        let beta = SiteIdentity::load(fed.bundle("beta")).unwrap();
        v.verify_certificate(beta.certificate_der()).unwrap();
    }

    #[test]
    fn crl_of_another_ca_fails_closed() {
        let fed = federation("fed", &["alpha"]);
        let alpha = SiteIdentity::load(fed.bundle("alpha")).unwrap();
        for (other, expected) in [
            (
                federation("fed", &[]),
                webpki::Error::InvalidCrlSignatureForPublicKey,
            ),
            (
                federation("other", &[]),
                webpki::Error::UnknownRevocationStatus,
            ),
        ] {
            let v =
                PeerVerifier::new(&fed.pki.ca.cert_path, "fed", Some(&other.pki.crl.path)).unwrap();
            let err = v.verify_certificate(alpha.certificate_der()).unwrap_err();
            assert!(
                matches!(&err, AttestError::CertificateRejected { source, .. } if *source == expected),
                "{err}"
            );
        }
    }

    #[test]
    fn expired_certificate_is_refused() {
        let fed = federation("fed", &[]);
        let bundle = fed.expired_bundle("old");
        let err = verifier(&fed)
            .verify_certificate(&cert_of(&bundle.dir))
            .unwrap_err();
        assert!(
            matches!(err, AttestError::CertificateExpired { .. }),
            "{err}"
        );
        // The site's own client notices too, before it ever connects.
        assert!(matches!(
            SiteIdentity::load(&bundle.dir),
            Err(AttestError::CertificateExpired { .. })
        ));
    }

    #[test]
    fn world_readable_key_is_refused() {
        let fed = federation("fed", &["alpha"]);
        let key = fed.bundle("alpha").join(SITE_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SiteIdentity::load(fed.bundle("alpha")).unwrap_err();
        assert!(
            matches!(err, AttestError::KeyFilePermissive { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn key_from_another_bundle_is_refused() {
        let fed = federation("fed", &["alpha", "beta"]);
        let alpha_key = fed.bundle("alpha").join(SITE_KEY_FILE);
        fs::remove_file(&alpha_key).unwrap();
        fs::copy(fed.bundle("beta").join(SITE_KEY_FILE), &alpha_key).unwrap();
        assert!(matches!(
            SiteIdentity::load(fed.bundle("alpha")),
            Err(AttestError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn server_certificate_is_not_a_site_identity() {
        let fed = federation("fed", &[]);
        let server = files::load_cert(&fed.pki.server.cert_path).unwrap();
        assert!(matches!(
            peer_identity(&server),
            Err(AttestError::CertificateMalformed { .. })
        ));
        assert!(matches!(
            peer_identity(b"garbage"),
            Err(AttestError::CertificateMalformed { .. })
        ));
    }
}
