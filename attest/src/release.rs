//! Signed releases: an Ed25519 signature over a manifest naming the SHA-256 of a client binary
//! and, for a release bundle ([`crate::bundle`]), of every shared library it ships.
//!
//! Signed bytes: `"quorum/release/v1\n"` followed by the manifest's canonical JSON, that is the
//! compact serde_json encoding of [`ReleaseManifest`] with its fields in declaration order.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::error::{AttestError, Result};
use crate::files;

const RELEASE_DOMAIN: &[u8] = b"quorum/release/v1\n";
/// Suffix of the signed-release file written next to a binary.
pub const RELEASE_SUFFIX: &str = ".release.json";

/// A file and its SHA-256: a library a bundle carries, or one a client has loaded.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileDigest {
    /// In a manifest, the path inside the bundle (`lib/libc10.so`); in evidence, the absolute
    /// path the client loaded it from.
    pub path: String,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

impl FileDigest {
    /// The file name, which is what a loaded library and a bundled one are matched by.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// What a release signature vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseManifest {
    /// Binary name (its file name when signed).
    pub name: String,
    /// Release version.
    pub version: String,
    /// Source commit.
    pub commit: String,
    /// SHA-256 of the binary, lowercase hex.
    pub binary_sha256: String,
    /// Signing time, Unix seconds.
    pub created: i64,
    /// The shared libraries a release bundle ships in its `lib/` ([`crate::bundle`]). Empty
    /// for a release of the executable alone, whose manifest then reads as it always has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub libraries: Vec<FileDigest>,
}

impl ReleaseManifest {
    /// The canonical bytes of the manifest (compact JSON, fields in declaration order).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn signed_bytes(&self) -> Vec<u8> {
        [RELEASE_DOMAIN, &self.canonical_bytes()].concat()
    }
}

/// A manifest with its signature and the signer's public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRelease {
    /// The signed manifest.
    pub manifest: ReleaseManifest,
    /// Ed25519 signature, hex.
    pub signature: String,
    /// Signer's Ed25519 public key, hex.
    pub public_key: String,
}

impl SignedRelease {
    /// The file next to `binary` where [`sign_release`] writes the signed release.
    pub fn path_for(binary: &Path) -> PathBuf {
        let mut name = binary.as_os_str().to_owned();
        name.push(RELEASE_SUFFIX);
        PathBuf::from(name)
    }

    /// Reads a signed release JSON file.
    pub fn load(path: &Path) -> Result<Self> {
        serde_json::from_slice(&files::read(path)?).map_err(|source| AttestError::Json {
            what: "signed release",
            source,
        })
    }

    /// Checks that the signer is trusted, the signature is valid and the version allowed (any
    /// version when `allowed_versions` is empty).
    /// Does not look at any binary; [`verify_release`] does.
    pub fn verify_signature(
        &self,
        trusted_keys: &[String],
        allowed_versions: &[String],
    ) -> Result<&ReleaseManifest> {
        let key = decode_hex::<32>("release public key", &self.public_key)?;
        let trusted = trusted_keys
            .iter()
            .any(|k| decode_hex::<32>("trusted release key", k).is_ok_and(|k| k == key));
        if !trusted {
            return Err(AttestError::ReleaseKeyUntrusted {
                key: hex::encode(key),
            });
        }
        let bad_signature = || AttestError::ReleaseSignatureInvalid {
            key: hex::encode(key),
        };
        let signature =
            decode_hex::<64>("release signature", &self.signature).map_err(|_| bad_signature())?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&self.manifest.signed_bytes(), &signature)
            .map_err(|_| bad_signature())?;
        // An empty list allows any version the trusted keys signed.
        if !allowed_versions.is_empty() && !allowed_versions.contains(&self.manifest.version) {
            return Err(AttestError::VersionNotAllowed {
                version: self.manifest.version.clone(),
                allowed: allowed_versions.to_vec(),
            });
        }
        Ok(&self.manifest)
    }
}

/// A generated release signing key.
#[derive(Debug, Clone)]
pub struct ReleaseKey {
    /// PKCS#8 private key (PEM, 0600).
    pub key_path: PathBuf,
    /// Public key file (hex, one line).
    pub public_key_path: PathBuf,
    /// Public key, hex: what `federation.toml` lists as trusted.
    pub public_key: String,
}

/// Generates an Ed25519 release key at `out` and its hex public key at `out.pub`.
pub fn generate_release_key(out: &Path) -> Result<ReleaseKey> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|source| {
        AttestError::Generation {
            what: "Ed25519 key",
            source,
        }
    })?;
    let public_key = hex::encode(key.public_key_raw());
    let mut pub_path = out.as_os_str().to_owned();
    pub_path.push(".pub");
    let public_key_path = PathBuf::from(pub_path);
    if public_key_path.exists() {
        return Err(AttestError::AlreadyExists {
            path: public_key_path,
        });
    }
    files::write_new(out, key.serialize_pem().as_bytes(), true)?;
    files::write_new(
        &public_key_path,
        format!("{public_key}\n").as_bytes(),
        false,
    )?;
    Ok(ReleaseKey {
        key_path: out.to_owned(),
        public_key_path,
        public_key,
    })
}

/// Signs a manifest for `binary_path` with the key at `key_path` and writes it as JSON to
/// [`SignedRelease::path_for`]`(binary_path)` (replacing an older one).
pub fn sign_release(
    binary_path: &Path,
    version: &str,
    commit: &str,
    key_path: &Path,
) -> Result<SignedRelease> {
    let name = binary_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let manifest = ReleaseManifest {
        name,
        version: version.to_owned(),
        commit: commit.to_owned(),
        binary_sha256: sha256_file(binary_path)?,
        created: time::OffsetDateTime::now_utc().unix_timestamp(),
        libraries: Vec::new(),
    };
    let signed = sign_manifest(manifest, key_path)?;
    write_signed_release(&signed, &SignedRelease::path_for(binary_path))?;
    Ok(signed)
}

/// Signs `manifest` with the Ed25519 key at `key_path`.
pub(crate) fn sign_manifest(manifest: ReleaseManifest, key_path: &Path) -> Result<SignedRelease> {
    let key_der = files::load_private_key(key_path)?;
    let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(key_der.secret_der()).map_err(|e| {
        AttestError::KeyUnusable {
            path: key_path.to_owned(),
            reason: e.to_string(),
        }
    })?;
    Ok(SignedRelease {
        signature: hex::encode(key.sign(&manifest.signed_bytes())),
        public_key: hex::encode(key.public_key()),
        manifest,
    })
}

/// Writes a signed release as pretty JSON, replacing `path` atomically.
pub(crate) fn write_signed_release(signed: &SignedRelease, path: &Path) -> Result<()> {
    let json = serde_json::to_vec_pretty(signed).map_err(|source| AttestError::Json {
        what: "signed release",
        source,
    })?;
    files::write_atomic(path, &json)
}

/// Verifies a signed release against the binary at `binary_path`: trusted signer, valid
/// signature, allowed version, and matching SHA-256.
pub fn verify_release(
    signed: &SignedRelease,
    binary_path: &Path,
    trusted_keys: &[String],
    allowed_versions: &[String],
) -> Result<ReleaseManifest> {
    let manifest = signed.verify_signature(trusted_keys, allowed_versions)?;
    let actual = sha256_file(binary_path)?;
    if actual != manifest.binary_sha256 {
        return Err(AttestError::BinaryDigestMismatch {
            path: binary_path.to_owned(),
            expected: manifest.binary_sha256.clone(),
            actual,
        });
    }
    Ok(manifest.clone())
}

/// SHA-256 of a file, lowercase hex, read in 64 KiB blocks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = fs::File::open(path).map_err(|e| AttestError::io("read", path, e))?;
    sha256_reader(file).map_err(|e| AttestError::io("read", path, e))
}

/// SHA-256 of everything `reader` yields, lowercase hex, read in 64 KiB blocks.
pub(crate) fn sha256_reader(mut reader: impl Read) -> std::io::Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish()))
}

/// Decodes exactly `N` bytes of hex.
pub(crate) fn decode_hex<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s.trim(), &mut out).map_err(|_| AttestError::HexMalformed {
        field,
        expected_len: 2 * N,
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        binary: PathBuf,
        key: ReleaseKey,
        signed: SignedRelease,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("quorum-client");
        // A binary larger than one read block, so streaming crosses block boundaries.
        let contents: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&binary, &contents).unwrap();
        let key = generate_release_key(&dir.path().join("release.key")).unwrap();
        let signed = sign_release(&binary, "1.2.0", "abc123", &key.key_path).unwrap();
        Fixture {
            _dir: dir,
            binary,
            key,
            signed,
        }
    }

    fn versions(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn signed_release_verifies_and_round_trips() {
        let f = fixture();
        let loaded = SignedRelease::load(&SignedRelease::path_for(&f.binary)).unwrap();
        assert_eq!(loaded, f.signed);
        let manifest = verify_release(
            &loaded,
            &f.binary,
            std::slice::from_ref(&f.key.public_key),
            &versions(&["1.2.0"]),
        )
        .unwrap();
        assert_eq!(manifest.name, "quorum-client");
        assert_eq!(manifest.commit, "abc123");
        let expected = hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            &fs::read(&f.binary).unwrap(),
        ));
        assert_eq!(manifest.binary_sha256, expected);
        let pub_file = fs::read_to_string(&f.key.public_key_path).unwrap();
        assert_eq!(pub_file.trim(), f.key.public_key);
        files::check_key_permissions(&f.key.key_path).unwrap();
    }

    #[test]
    fn flipped_byte_is_a_digest_mismatch() {
        let f = fixture();
        let copy = f.binary.with_file_name("copy");
        let mut bytes = fs::read(&f.binary).unwrap();
        bytes[150_000] ^= 0x01;
        fs::write(&copy, &bytes).unwrap();
        let err = verify_release(
            &f.signed,
            &copy,
            std::slice::from_ref(&f.key.public_key),
            &versions(&["1.2.0"]),
        )
        .unwrap_err();
        match &err {
            AttestError::BinaryDigestMismatch {
                expected, actual, ..
            } => {
                assert_eq!(expected, &f.signed.manifest.binary_sha256);
                assert_eq!(actual, &sha256_file(&copy).unwrap());
                assert!(err.to_string().contains(expected) && err.to_string().contains(actual));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn untrusted_key_is_refused() {
        let f = fixture();
        let other = generate_release_key(&f.binary.with_file_name("other.key")).unwrap();
        let err = verify_release(
            &f.signed,
            &f.binary,
            &[other.public_key],
            &versions(&["1.2.0"]),
        )
        .unwrap_err();
        assert!(
            matches!(err, AttestError::ReleaseKeyUntrusted { .. }),
            "{err}"
        );
    }

    #[test]
    fn altered_manifest_has_bad_signature() {
        let f = fixture();
        let mut forged = f.signed.clone();
        forged.manifest.version = "1.3.0".into();
        let err = verify_release(
            &forged,
            &f.binary,
            std::slice::from_ref(&f.key.public_key),
            &versions(&["1.3.0"]),
        )
        .unwrap_err();
        assert!(
            matches!(err, AttestError::ReleaseSignatureInvalid { .. }),
            "{err}"
        );
        // A manifest re-signed by another key but claiming the trusted key also fails.
        let other = generate_release_key(&f.binary.with_file_name("o.key")).unwrap();
        let resigned = sign_release(&f.binary, "1.2.0", "abc123", &other.key_path).unwrap();
        let mut swapped = resigned;
        swapped.public_key = f.key.public_key.clone();
        assert!(matches!(
            verify_release(
                &swapped,
                &f.binary,
                std::slice::from_ref(&f.key.public_key),
                &versions(&["1.2.0"])
            ),
            Err(AttestError::ReleaseSignatureInvalid { .. })
        ));
    }

    #[test]
    fn version_not_allowed_is_refused_and_an_empty_list_allows_any() {
        let f = fixture();
        let err = verify_release(
            &f.signed,
            &f.binary,
            std::slice::from_ref(&f.key.public_key),
            &versions(&["1.1.0", "2.0.0"]),
        )
        .unwrap_err();
        assert!(
            matches!(&err, AttestError::VersionNotAllowed { version, .. } if version == "1.2.0"),
            "{err}"
        );
        let any = verify_release(
            &f.signed,
            &f.binary,
            std::slice::from_ref(&f.key.public_key),
            &[],
        )
        .unwrap();
        assert_eq!(any.version, "1.2.0");
    }

    #[test]
    fn permissive_release_key_is_refused_and_keys_are_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let f = fixture();
        assert!(matches!(
            generate_release_key(&f.key.key_path),
            Err(AttestError::AlreadyExists { .. })
        ));
        fs::set_permissions(&f.key.key_path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            sign_release(&f.binary, "1.2.0", "x", &f.key.key_path),
            Err(AttestError::KeyFilePermissive { .. })
        ));
    }
}
