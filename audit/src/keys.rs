//! Audit keys: made by an explicit command, pinned by fingerprint, rotated only with the old
//! key's endorsement.
//!
//! A node's audit key signs its heads. Its fingerprint (hex SHA-256 of the 32-byte Ed25519
//! public key) is printed when the key is made and recorded as the log's first record
//! (`audit_key`), so an auditor can pin it (`verify --trusted-key FP`). A new key takes over
//! only with an endorsement: the old key's signature over [`ROTATE_LABEL`] ‖ new public key,
//! recorded in the `audit_key` record that puts the new key in force.

#[cfg(feature = "node")]
use std::path::{Path, PathBuf};

#[cfg(feature = "node")]
use ring::rand::SecureRandom;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::Error;

/// Domain label of a key-rotation endorsement.
pub const ROTATE_LABEL: &[u8; 22] = b"quorum-audit/rotate/v1";

/// The fingerprint an auditor pins: hex SHA-256 of the raw 32-byte Ed25519 public key.
pub fn fingerprint(public_key: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, public_key))
}

/// What the old key signs to hand over to `new_public_key`.
pub fn rotation_message(new_public_key: &[u8]) -> Vec<u8> {
    [ROTATE_LABEL.as_slice(), new_public_key].concat()
}

/// Whether `endorsement` is `old_public_key`'s signature handing over to `new_public_key`.
pub fn endorsement_valid(old_public_key: &[u8], new_public_key: &[u8], endorsement: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, old_public_key)
        .verify(&rotation_message(new_public_key), endorsement)
        .is_ok()
}

/// The `details` of an `audit_key` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyRecord {
    pub(crate) public_key: Vec<u8>,
    /// Fingerprint of the key this one replaces, with its endorsement.
    pub(crate) rotation: Option<(String, Vec<u8>)>,
}

impl KeyRecord {
    pub(crate) fn to_details(&self) -> Value {
        let (previous, endorsement) = match &self.rotation {
            Some((previous, endorsement)) => (json!(previous), json!(hex::encode(endorsement))),
            None => (Value::Null, Value::Null),
        };
        json!({
            "public_key": hex::encode(&self.public_key),
            "fingerprint": fingerprint(&self.public_key),
            "previous": previous,
            "endorsement": endorsement,
        })
    }

    /// Parses record details; the error says which field is wrong.
    pub(crate) fn from_details(details: &Value) -> Result<Self, String> {
        let text = |name: &str| details.get(name).and_then(Value::as_str);
        let public_key = text("public_key")
            .and_then(|s| hex::decode(s).ok())
            .filter(|k| k.len() == 32)
            .ok_or("public_key is not 32 bytes of hex")?;
        if text("fingerprint") != Some(fingerprint(&public_key).as_str()) {
            return Err("fingerprint is not the SHA-256 of public_key".into());
        }
        let rotation = match (details.get("previous"), details.get("endorsement")) {
            (Some(Value::Null), Some(Value::Null)) => None,
            (Some(Value::String(previous)), Some(Value::String(endorsement))) => Some((
                previous.clone(),
                hex::decode(endorsement).map_err(|_| "endorsement is not hex")?,
            )),
            _ => return Err("previous and endorsement must both be strings or both null".into()),
        };
        Ok(Self {
            public_key,
            rotation,
        })
    }
}

/// A handover from one audit key to the next, as written next to the new key file
/// (`<key>.endorsement`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endorsement {
    /// Fingerprint of the key that signed the handover.
    pub previous: String,
    /// Fingerprint of the key handed over to.
    pub fingerprint: String,
    /// Hex Ed25519 signature by the previous key over [`rotation_message`].
    pub signature: String,
}

/// Where the endorsement of the key at `key_path` is kept.
#[cfg(feature = "node")]
pub fn endorsement_path(key_path: &Path) -> PathBuf {
    crate::suffixed(key_path, ".endorsement")
}

/// Where the audit key of the log at `log` is kept: `<log>.key` (a node's `audit` folder has
/// its key at `audit.key` beside it).
#[cfg(feature = "node")]
pub fn key_path(log: &Path) -> PathBuf {
    crate::suffixed(log, ".key")
}

/// A node's audit key, with the endorsement that hands the log over to it if there is one.
#[derive(Debug)]
pub struct AuditKey {
    key: Ed25519KeyPair,
    pub(crate) endorsement: Option<Endorsement>,
}

/// RFC 8410 §7 PKCS#8 v1 prefix before a 32-byte Ed25519 seed: the form OpenSSL and Python's
/// `cryptography` read (ring itself writes v2, which both refuse).
#[cfg(feature = "node")]
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

impl AuditKey {
    #[cfg(feature = "node")]
    /// Makes a new key and writes it to `out` (PKCS#8 v1 PEM, mode 0600, never overwriting).
    /// With `endorse_with`, that key signs the handover, written to [`endorsement_path`].
    pub fn generate(out: &Path, endorse_with: Option<&AuditKey>) -> Result<Self, Error> {
        let failed = |e: std::io::Error| Error::KeyFile {
            path: out.display().to_string(),
            cause: e.to_string(),
        };
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| Error::SigningKeyRejected("the system random generator failed".into()))?;
        let der = [PKCS8_V1_PREFIX.as_slice(), &seed].concat();
        let key = key_pair(&der)?;
        let public_key = key.public_key().as_ref();
        let endorsement = endorse_with.map(|old| Endorsement {
            previous: old.fingerprint(),
            fingerprint: fingerprint(public_key),
            signature: hex::encode(old.sign(&rotation_message(public_key))),
        });
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der));
        quorum_durable::create_new(out, pem.as_bytes(), quorum_durable::Mode::Secret)
            .map_err(failed)?;
        if let Some(endorsement) = &endorsement {
            let text = serde_json::to_string_pretty(endorsement)
                .map_err(|e| Error::SigningKeyRejected(e.to_string()))?;
            quorum_durable::create_new(
                &endorsement_path(out),
                text.as_bytes(),
                quorum_durable::Mode::Public,
            )
            .map_err(failed)?;
        }
        Ok(Self { key, endorsement })
    }

    #[cfg(feature = "node")]
    /// Loads the key at `path` (PKCS#8 PEM or DER) and its endorsement, if one lies beside it.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let file_error = |cause: String| Error::KeyFile {
            path: path.display().to_string(),
            cause,
        };
        let bytes = std::fs::read(path).map_err(|e| {
            file_error(if e.kind() == std::io::ErrorKind::NotFound {
                "no such file; make the key with `quorum-audit keygen --out FILE` and note the fingerprint it prints".into()
            } else {
                e.to_string()
            })
        })?;
        let der = if bytes.starts_with(b"-----BEGIN") {
            pem::parse(&bytes)
                .map_err(|e| file_error(e.to_string()))?
                .into_contents()
        } else {
            bytes
        };
        let key = key_pair(&der)?;
        let endorsement = match std::fs::read(endorsement_path(path)) {
            Ok(text) => Some(serde_json::from_slice(&text).map_err(|e| {
                file_error(format!(
                    "{} is not an endorsement: {e}",
                    endorsement_path(path).display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(file_error(e.to_string())),
        };
        Ok(Self { key, endorsement })
    }

    /// A key held only in memory, for tests and simulations.
    pub fn ephemeral() -> Self {
        let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .expect("the system random generator works");
        Self {
            key: key_pair(der.as_ref()).expect("ring reads its own keys"),
            endorsement: None,
        }
    }

    /// This key's fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_key())
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// Signs `msg` (a head message) with this key.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.key.sign(msg).as_ref().to_vec()
    }
}

/// Reads a PKCS#8 (v1 or v2) Ed25519 private key in DER form.
fn key_pair(der: &[u8]) -> Result<Ed25519KeyPair, Error> {
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
        .map_err(|e| Error::SigningKeyRejected(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_pkcs8_v1_pem_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let key = AuditKey::generate(&path, None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        let der = pem::parse(&text).unwrap().into_contents();
        assert_eq!(der.len(), 48);
        assert_eq!(der[..16], PKCS8_V1_PREFIX);
        assert_eq!(
            AuditKey::load(&path).unwrap().fingerprint(),
            key.fingerprint()
        );
        // Never overwritten.
        assert!(matches!(
            AuditKey::generate(&path, None),
            Err(Error::KeyFile { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn endorsement_hands_over_only_to_the_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let old = AuditKey::generate(&dir.path().join("old.key"), None).unwrap();
        let new_path = dir.path().join("new.key");
        let new = AuditKey::generate(&new_path, Some(&old)).unwrap();
        let loaded = AuditKey::load(&new_path).unwrap();
        let endorsement = loaded.endorsement.unwrap();
        assert_eq!(endorsement.previous, old.fingerprint());
        assert_eq!(endorsement.fingerprint, new.fingerprint());
        let sig = hex::decode(&endorsement.signature).unwrap();
        assert!(endorsement_valid(
            &old.public_key(),
            &new.public_key(),
            &sig
        ));
        assert!(!endorsement_valid(
            &new.public_key(),
            &new.public_key(),
            &sig
        ));
        assert!(!endorsement_valid(
            &old.public_key(),
            &old.public_key(),
            &sig
        ));
    }

    #[test]
    fn key_record_details_round_trip_and_name_bad_fields() {
        let key = AuditKey::ephemeral();
        let record = KeyRecord {
            public_key: key.public_key(),
            rotation: Some(("ab".repeat(32), vec![7; 64])),
        };
        assert_eq!(KeyRecord::from_details(&record.to_details()), Ok(record));
        let mut details = KeyRecord {
            public_key: key.public_key(),
            rotation: None,
        }
        .to_details();
        details["fingerprint"] = json!("00".repeat(32));
        assert_eq!(
            KeyRecord::from_details(&details),
            Err("fingerprint is not the SHA-256 of public_key".into())
        );
    }

    #[test]
    fn rejects_non_ed25519_key() {
        assert!(matches!(
            key_pair(b"not a key"),
            Err(Error::SigningKeyRejected(_))
        ));
    }

    #[test]
    fn missing_key_file_says_how_to_make_one() {
        let err = AuditKey::load(Path::new("/nonexistent/audit.key")).unwrap_err();
        assert!(err.to_string().contains("quorum-audit keygen"), "{err}");
    }
}
