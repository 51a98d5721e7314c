//! Attestation evidence that a client presents when it joins, and its verification.
//!
//! The site signs, with its certificate key, the byte string
//! ```text
//! "quorum/evidence/v2"
//! || u32be(len(site))     || site (UTF-8)
//! || u32be(len(manifest)) || manifest canonical bytes (see crate::release)
//! || executable SHA-256 (32 bytes)
//! || TLS exporter value (32 bytes)
//! || u32be(count of libraries)
//! || for each library: u32be(len(path)) || path (UTF-8) || its SHA-256 (32 bytes)
//! ```
//! The exporter value ties the evidence to one TLS connection: evidence captured on one
//! connection is useless on another. Libraries are measured only when the release pins them
//! (a release bundle, [`crate::bundle`]); otherwise the count is 0.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bundle::measure_loaded_libraries;
use crate::error::{AttestError, Result};
use crate::identity::{SiteIdentity, peer_identity, verify_site_signature};
use crate::release::{FileDigest, ReleaseManifest, SignedRelease, decode_hex, sha256_file};

const EVIDENCE_DOMAIN: &[u8] = b"quorum/evidence/v2";

/// What a client sends to prove which release it runs, bound to the current TLS session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The signed release the client claims to run.
    pub release: SignedRelease,
    /// SHA-256 of the client's own executable, hex.
    pub executable_sha256: String,
    /// The non-system shared libraries the client had loaded, with their digests; measured
    /// only when its release pins libraries, empty otherwise.
    #[serde(default)]
    pub libraries: Vec<FileDigest>,
    /// The TLS exporter value of the connection the evidence is sent on, hex (32 bytes).
    pub tls_exporter: String,
    /// The site that produced the evidence.
    pub site: String,
    /// Signature by the site's certificate key over [`Evidence::signed_bytes`], hex (the
    /// scheme follows from the key: [`crate::KeyAlgorithm`]).
    pub signature: String,
}

impl Evidence {
    /// Measures `executable` (normally `std::env::current_exe()`) and, when the release pins
    /// libraries, every non-system library this process has loaded; then signs the evidence
    /// for the connection whose exporter value is `exporter`.
    pub fn collect(
        identity: &SiteIdentity,
        release: SignedRelease,
        executable: &Path,
        exporter: [u8; 32],
    ) -> Result<Self> {
        let libraries = if release.manifest.libraries.is_empty() {
            Vec::new()
        } else {
            measure_loaded_libraries()?
        };
        Self::sign(
            identity,
            release,
            sha256_file(executable)?,
            libraries,
            exporter,
        )
    }

    /// Signs evidence for an executable (and libraries) measured earlier with
    /// [`sha256_file`](crate::release::sha256_file), for the connection whose exporter value
    /// is `exporter`.
    pub fn sign(
        identity: &SiteIdentity,
        release: SignedRelease,
        executable_sha256: String,
        libraries: Vec<FileDigest>,
        exporter: [u8; 32],
    ) -> Result<Self> {
        let mut evidence = Self {
            release,
            executable_sha256,
            libraries,
            tls_exporter: hex::encode(exporter),
            site: identity.site().to_owned(),
            signature: String::new(),
        };
        evidence.signature = hex::encode(identity.sign(&evidence.signed_bytes()?));
        Ok(evidence)
    }

    /// The bytes covered by the site's signature (layout in the module documentation).
    pub fn signed_bytes(&self) -> Result<Vec<u8>> {
        let executable = decode_hex::<32>("executable_sha256", &self.executable_sha256)?;
        let exporter = decode_hex::<32>("tls_exporter", &self.tls_exporter)?;
        let manifest = self.release.manifest.canonical_bytes();
        let mut out =
            Vec::with_capacity(EVIDENCE_DOMAIN.len() + 8 + self.site.len() + manifest.len() + 64);
        out.extend_from_slice(EVIDENCE_DOMAIN);
        for field in [self.site.as_bytes(), &manifest] {
            out.extend_from_slice(&length_prefix(field.len()));
            out.extend_from_slice(field);
        }
        out.extend_from_slice(&executable);
        out.extend_from_slice(&exporter);
        out.extend_from_slice(&length_prefix(self.libraries.len()));
        for library in &self.libraries {
            out.extend_from_slice(&length_prefix(library.path.len()));
            out.extend_from_slice(library.path.as_bytes());
            out.extend_from_slice(&decode_hex::<32>("library sha256", &library.sha256)?);
        }
        Ok(out)
    }
}

/// A big-endian u32 length. Fields come from messages far below 4 GiB; saturating keeps this
/// total anyway.
fn length_prefix(len: usize) -> [u8; 4] {
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}

/// What the verifier knows about the connection the evidence arrived on, and the federation's
/// release policy.
#[derive(Debug, Clone, Copy)]
pub struct VerificationContext<'a> {
    /// This side's exporter value of the connection ([`crate::tls::exporter_value`]).
    pub exporter: [u8; 32],
    /// The client certificate presented on the connection (already verified by TLS).
    pub peer_certificate: &'a [u8],
    /// Trusted release public keys, hex.
    pub trusted_release_keys: &'a [String],
    /// Allowed release versions.
    pub allowed_versions: &'a [String],
}

/// The outcome of a successful verification, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Name of the verifier that accepted the evidence.
    pub verifier: &'static str,
    /// The attested site.
    pub site: String,
    /// Verified release version.
    pub release_version: String,
    /// Verified release commit.
    pub release_commit: String,
    /// SHA-256 of the verified release binary, hex.
    pub release_sha256: String,
    /// Public key that signed the release, hex.
    pub release_key: String,
    /// How many loaded libraries matched the release's (0 for a release of the executable
    /// alone).
    pub libraries: usize,
}

/// A way of judging attestation evidence. Hardware-backed verifiers (TPM quotes, SEV-SNP,
/// TDX, GPU confidential computing) implement this next to [`SelfMeasurementVerifier`].
pub trait Verifier: Send + Sync {
    /// Accepts or refuses `evidence` received on the connection described by `context`.
    fn verify(&self, evidence: &Evidence, context: &VerificationContext<'_>) -> Result<Verdict>;
    /// Short name recorded in verdicts and logs.
    fn name(&self) -> &'static str;
}

/// Checks the client's own measurement of its executable against a signed release.
///
/// This binds the evidence to the site, to the TLS session and to a trusted release. It does
/// not prove what code runs: a modified binary can report the digest of the genuine one.
#[derive(Debug, Clone, Copy, Default)]
pub struct SelfMeasurementVerifier;

impl Verifier for SelfMeasurementVerifier {
    fn verify(&self, evidence: &Evidence, context: &VerificationContext<'_>) -> Result<Verdict> {
        let signer = peer_identity(context.peer_certificate)?;
        let site = signer.site.clone();
        if evidence.site != site {
            return Err(AttestError::SiteMismatch {
                expected: site,
                found: evidence.site.clone(),
            });
        }
        let invalid = || AttestError::PeerSignatureInvalid { site: site.clone() };
        // Its length depends on the key (64 bytes for Ed25519, up to 512 for RSA-4096).
        let signature = hex::decode(evidence.signature.trim()).map_err(|_| invalid())?;
        let message = evidence.signed_bytes().map_err(|_| invalid())?;
        verify_site_signature(context.peer_certificate, &signer, &message, &signature)?;
        if decode_hex::<32>("tls_exporter", &evidence.tls_exporter)? != context.exporter {
            return Err(AttestError::EvidenceReplayed);
        }
        let manifest = evidence
            .release
            .verify_signature(context.trusted_release_keys, context.allowed_versions)?;
        if !evidence
            .executable_sha256
            .eq_ignore_ascii_case(&manifest.binary_sha256)
        {
            return Err(AttestError::ClientBinaryMismatch {
                version: manifest.version.clone(),
                expected: manifest.binary_sha256.clone(),
                actual: evidence.executable_sha256.clone(),
            });
        }
        let libraries = check_libraries(manifest, &evidence.libraries)?;
        Ok(Verdict {
            verifier: self.name(),
            libraries,
            site,
            release_version: manifest.version.clone(),
            release_commit: manifest.commit.clone(),
            release_sha256: manifest.binary_sha256.clone(),
            release_key: evidence.release.public_key.clone(),
        })
    }

    fn name(&self) -> &'static str {
        "self-measurement"
    }
}

/// Checks the libraries a client loaded against those its release pins: each must be one of
/// them, with the pinned digest. Returns how many were checked.
fn check_libraries(manifest: &ReleaseManifest, loaded: &[FileDigest]) -> Result<usize> {
    if manifest.libraries.is_empty() {
        return Ok(0);
    }
    if loaded.is_empty() {
        return Err(AttestError::LibrariesNotMeasured {
            version: manifest.version.clone(),
            count: manifest.libraries.len(),
        });
    }
    for library in loaded {
        let pinned = manifest
            .libraries
            .iter()
            .find(|p| p.file_name() == library.file_name())
            .ok_or_else(|| AttestError::LibraryNotInRelease {
                version: manifest.version.clone(),
                path: library.path.clone(),
            })?;
        if !pinned.sha256.eq_ignore_ascii_case(&library.sha256) {
            return Err(AttestError::LibraryMismatch {
                version: manifest.version.clone(),
                path: library.path.clone(),
                expected: pinned.sha256.clone(),
                actual: library.sha256.clone(),
            });
        }
    }
    Ok(loaded.len())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use super::*;
    use crate::release::{ReleaseKey, generate_release_key, sign_release};
    use crate::test_support::{Federation, federation};

    struct Fixture {
        fed: Federation,
        alpha: SiteIdentity,
        binary: PathBuf,
        key: ReleaseKey,
        release: SignedRelease,
        trusted: Vec<String>,
        allowed: Vec<String>,
    }

    const EXPORTER: [u8; 32] = [7; 32];

    fn fixture() -> Fixture {
        let fed = federation("fed", &["alpha", "beta"]);
        let alpha = SiteIdentity::load(fed.bundle("alpha")).unwrap();
        let binary = fed.dir.path().join("quorum-client");
        fs::write(&binary, b"genuine client build").unwrap();
        let key = generate_release_key(&fed.dir.path().join("release.key")).unwrap();
        let release = sign_release(&binary, "0.3.1", "deadbeef", &key.key_path).unwrap();
        Fixture {
            trusted: vec![key.public_key.clone()],
            allowed: vec!["0.3.1".into()],
            fed,
            alpha,
            binary,
            key,
            release,
        }
    }

    impl Fixture {
        fn context<'a>(&'a self, exporter: [u8; 32], cert: &'a [u8]) -> VerificationContext<'a> {
            VerificationContext {
                exporter,
                peer_certificate: cert,
                trusted_release_keys: &self.trusted,
                allowed_versions: &self.allowed,
            }
        }

        fn genuine(&self) -> Evidence {
            Evidence::collect(&self.alpha, self.release.clone(), &self.binary, EXPORTER).unwrap()
        }
    }

    #[test]
    fn genuine_evidence_is_accepted() {
        let f = fixture();
        let evidence = f.genuine();
        let json = serde_json::to_string(&evidence).unwrap();
        let received: Evidence = serde_json::from_str(&json).unwrap();
        let verdict = SelfMeasurementVerifier
            .verify(&received, &f.context(EXPORTER, f.alpha.certificate_der()))
            .unwrap();
        assert_eq!(verdict.site, "alpha");
        assert_eq!(verdict.release_version, "0.3.1");
        assert_eq!(verdict.release_commit, "deadbeef");
        assert_eq!(verdict.release_sha256, sha256_file(&f.binary).unwrap());
        assert_eq!(verdict.release_key, f.key.public_key);
        assert_eq!(verdict.verifier, "self-measurement");
    }

    #[test]
    fn replayed_evidence_is_refused() {
        let f = fixture();
        let mut other_session = EXPORTER;
        other_session[31] ^= 1;
        let err = SelfMeasurementVerifier
            .verify(
                &f.genuine(),
                &f.context(other_session, f.alpha.certificate_der()),
            )
            .unwrap_err();
        assert!(matches!(err, AttestError::EvidenceReplayed), "{err}");
        assert_eq!(
            err.to_string(),
            "evidence was produced for another TLS session (replay)"
        );
    }

    #[test]
    fn modified_binary_is_refused() {
        let f = fixture();
        let modified = f.binary.with_file_name("patched");
        let mut bytes = fs::read(&f.binary).unwrap();
        bytes[3] ^= 0x20;
        fs::write(&modified, bytes).unwrap();
        let evidence = Evidence::collect(&f.alpha, f.release.clone(), &modified, EXPORTER).unwrap();
        let err = SelfMeasurementVerifier
            .verify(&evidence, &f.context(EXPORTER, f.alpha.certificate_der()))
            .unwrap_err();
        let expected = format!(
            "client binary does not match signed release 0.3.1: expected {}, got {}",
            f.release.manifest.binary_sha256,
            sha256_file(&modified).unwrap()
        );
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn tampered_or_foreign_evidence_is_refused() {
        let f = fixture();
        let ctx = f.context(EXPORTER, f.alpha.certificate_der());
        // Field changed after signing.
        let mut tampered = f.genuine();
        tampered.executable_sha256 = "00".repeat(32);
        assert!(matches!(
            SelfMeasurementVerifier.verify(&tampered, &ctx),
            Err(AttestError::PeerSignatureInvalid { .. })
        ));
        // Signed by beta's key while claiming to be alpha on alpha's connection.
        let beta = SiteIdentity::load(f.fed.bundle("beta")).unwrap();
        let mut forged = Evidence::collect(&beta, f.release.clone(), &f.binary, EXPORTER).unwrap();
        forged.site = "alpha".into();
        assert!(matches!(
            SelfMeasurementVerifier.verify(&forged, &ctx),
            Err(AttestError::PeerSignatureInvalid { .. })
        ));
        // Alpha's evidence presented on beta's connection.
        let on_beta = f.context(EXPORTER, beta.certificate_der());
        assert!(matches!(
            SelfMeasurementVerifier.verify(&f.genuine(), &on_beta),
            Err(AttestError::SiteMismatch { .. })
        ));
        // Garbage signature.
        let mut garbled = f.genuine();
        garbled.signature = "zz".into();
        assert!(matches!(
            SelfMeasurementVerifier.verify(&garbled, &ctx),
            Err(AttestError::PeerSignatureInvalid { .. })
        ));
    }

    #[test]
    fn release_policy_is_enforced() {
        let f = fixture();
        let cert = f.alpha.certificate_der();
        let evidence = f.genuine();
        let untrusted = vec!["11".repeat(32)];
        let ctx = VerificationContext {
            trusted_release_keys: &untrusted,
            ..f.context(EXPORTER, cert)
        };
        assert!(matches!(
            SelfMeasurementVerifier.verify(&evidence, &ctx),
            Err(AttestError::ReleaseKeyUntrusted { .. })
        ));
        let newer = vec!["0.4.0".to_owned()];
        let ctx = VerificationContext {
            allowed_versions: &newer,
            ..f.context(EXPORTER, cert)
        };
        assert!(matches!(
            SelfMeasurementVerifier.verify(&evidence, &ctx),
            Err(AttestError::VersionNotAllowed { .. })
        ));
        // Re-labelled release, re-signed by the site (which has no release key): bad signature.
        let mut relabelled = f.release.clone();
        relabelled.manifest.binary_sha256 = sha256_file(&f.fed.pki.ca.cert_path).unwrap();
        let lying =
            Evidence::collect(&f.alpha, relabelled, &f.fed.pki.ca.cert_path, EXPORTER).unwrap();
        assert!(matches!(
            SelfMeasurementVerifier.verify(&lying, &f.context(EXPORTER, cert)),
            Err(AttestError::ReleaseSignatureInvalid { .. })
        ));
    }

    #[test]
    fn signed_bytes_follow_the_documented_layout() {
        let f = fixture();
        let evidence = f.genuine();
        let bytes = evidence.signed_bytes().unwrap();
        let manifest = f.release.manifest.canonical_bytes();
        let mut expected = b"quorum/evidence/v2".to_vec();
        expected.extend_from_slice(&5u32.to_be_bytes());
        expected.extend_from_slice(b"alpha");
        expected.extend_from_slice(&(manifest.len() as u32).to_be_bytes());
        expected.extend_from_slice(&manifest);
        expected.extend_from_slice(&hex::decode(sha256_file(&f.binary).unwrap()).unwrap());
        expected.extend_from_slice(&EXPORTER);
        expected.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(bytes, expected);

        // Each measured library adds its path and digest.
        let library = FileDigest {
            path: "/opt/q/lib/libc10.so".into(),
            sha256: "ab".repeat(32),
        };
        let with_library = Evidence {
            libraries: vec![library.clone()],
            ..evidence
        };
        let mut expected = expected[..expected.len() - 4].to_vec();
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(&(library.path.len() as u32).to_be_bytes());
        expected.extend_from_slice(library.path.as_bytes());
        expected.extend_from_slice(&[0xab; 32]);
        assert_eq!(with_library.signed_bytes().unwrap(), expected);
    }

    #[test]
    fn libraries_pinned_by_a_bundle_release_must_match_what_the_client_loaded() {
        let f = fixture();
        let pinned = |name: &str, byte: &str| FileDigest {
            path: format!("lib/{name}"),
            sha256: byte.repeat(32),
        };
        let mut manifest = f.release.manifest.clone();
        manifest.libraries = vec![pinned("libtorch_cpu.so", "11"), pinned("libc10.so", "22")];
        let release = crate::release::sign_manifest(manifest, &f.key.key_path).unwrap();
        let loaded = |name: &str, byte: &str| FileDigest {
            path: format!("/opt/quorum-client/lib/{name}"),
            sha256: byte.repeat(32),
        };
        let judge = |libraries: Vec<FileDigest>| {
            let digest = sha256_file(&f.binary).unwrap();
            let evidence =
                Evidence::sign(&f.alpha, release.clone(), digest, libraries, EXPORTER).unwrap();
            SelfMeasurementVerifier
                .verify(&evidence, &f.context(EXPORTER, f.alpha.certificate_der()))
        };
        let verdict = judge(vec![
            loaded("libc10.so", "22"),
            loaded("libtorch_cpu.so", "11"),
        ]);
        assert_eq!(verdict.unwrap().libraries, 2);

        let err = judge(vec![loaded("libc10.so", "33")]).unwrap_err();
        assert!(matches!(err, AttestError::LibraryMismatch { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "client loaded /opt/quorum-client/lib/libc10.so with SHA-256 {}, but release \
                 0.3.1 has {} for it",
                "33".repeat(32),
                "22".repeat(32)
            )
        );
        let err = judge(vec![
            loaded("libc10.so", "22"),
            loaded("libpreload.so", "44"),
        ]);
        assert!(matches!(err, Err(AttestError::LibraryNotInRelease { .. })));
        let err = judge(Vec::new());
        assert!(matches!(
            err,
            Err(AttestError::LibrariesNotMeasured { count: 2, .. })
        ));

        // A release of the executable alone checks no library.
        let digest = sha256_file(&f.binary).unwrap();
        let evidence = Evidence::sign(
            &f.alpha,
            f.release.clone(),
            digest,
            vec![loaded("libc10.so", "33")],
            EXPORTER,
        )
        .unwrap();
        let verdict = SelfMeasurementVerifier
            .verify(&evidence, &f.context(EXPORTER, f.alpha.certificate_der()))
            .unwrap();
        assert_eq!(verdict.libraries, 0);
    }
}
