//! Key agreement and share encryption: X25519, HKDF-SHA256 and AES-256-GCM (ring).
//!
//! Byte formats (all integers big-endian u32; `fed` = federation name as UTF-8 bytes):
//!
//! * binding = `len(fed) ‖ fed ‖ round ‖ sender ‖ receiver`;
//! * share key = HKDF-SHA256(salt = empty, ikm = X25519(share keys), info = `"quorum/share/v1"` ‖
//!   binding), 32 bytes;
//! * ciphertext = AES-256-GCM(key, nonce = 12 zero bytes, aad = binding, plaintext) ‖ 16-byte tag;
//! * plaintext = `sender ‖ receiver ‖ self-mask-seed share (33) ‖ mask-key share (33)`;
//! * pairwise seed = HKDF-SHA256(salt = empty, ikm = X25519(mask keys), info =
//!   `"quorum/pairwise/v1"` ‖ `len(fed) ‖ fed ‖ round ‖ min(u, v) ‖ max(u, v)`), 32 bytes.
//!
//! The all-zero nonce is safe because each key encrypts exactly one message: the key pairs are
//! fresh every round and the key binds the direction (sender, receiver).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::shamir::{self, SHARE_LEN, Share};

/// HKDF info label for share-encryption keys.
pub const SHARE_LABEL: &[u8] = b"quorum/share/v1";
/// HKDF info label for pairwise mask seeds.
pub const PAIRWISE_LABEL: &[u8] = b"quorum/pairwise/v1";
/// Length of a share plaintext.
pub const PLAINTEXT_LEN: usize = 8 + 2 * SHARE_LEN;
/// Length of a share ciphertext including the GCM tag.
pub const CIPHERTEXT_LEN: usize = PLAINTEXT_LEN + 16;

/// Why key agreement or share decryption failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer's public key is a low-order point: the shared secret would be all zeros.
    #[error("peer public key is a low-order point; the peer must advertise a fresh X25519 key")]
    NonContributoryKey,
    /// Authentication of the ciphertext failed (wrong key, binding or tampered bytes).
    #[error("share ciphertext failed authentication")]
    DecryptFailed,
    /// The plaintext decrypted but names a different sender or receiver than its binding.
    #[error("share plaintext names sender {sender} -> receiver {receiver}, not its envelope")]
    PayloadMismatch {
        /// Sender named inside.
        sender: u32,
        /// Receiver named inside.
        receiver: u32,
    },
    /// A share inside the plaintext is malformed.
    #[error("share inside the plaintext is malformed: {0}")]
    MalformedShare(#[from] shamir::Error),
}

/// HKDF-SHA256 with an empty salt, `info` = concatenation of `info`, 32 bytes of output.
pub fn hkdf_sha256(ikm: &[u8], info: &[&[u8]]) -> [u8; 32] {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let mut out = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, &[])
        .extract(ikm)
        .expand(info, Len32)
        // Invariant: 32 bytes is far below HKDF-SHA256's limit of 255 * 32, so neither call fails.
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 can always produce 32 bytes");
    out
}

/// Appends `len(fed) ‖ fed` (length as big-endian u32).
pub fn push_federation(out: &mut Vec<u8>, federation: &str) {
    // Federation names come from validated configuration and are far below 4 GiB.
    let len = u32::try_from(federation.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(federation.as_bytes());
}

/// The binding bytes `len(fed) ‖ fed ‖ round ‖ sender ‖ receiver` (KDF info suffix and AAD).
pub fn share_binding(federation: &str, round: u32, sender: u32, receiver: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + federation.len());
    push_federation(&mut out, federation);
    for v in [round, sender, receiver] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// X25519 between our secret and a peer's public key; refuses low-order peer keys.
pub fn agree(secret: &StaticSecret, peer_public: &[u8; 32]) -> Result<[u8; 32], Error> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(Error::NonContributoryKey);
    }
    Ok(shared.to_bytes())
}

/// Refuses a low-order peer key, as [`agree`] would with any secret: clamping makes every
/// X25519 scalar a multiple of the cofactor and smaller than the group order, so agreement is
/// non-contributory exactly for low-order points, and one fixed secret decides it for all.
pub fn check_public_key(peer_public: &[u8; 32]) -> Result<(), Error> {
    agree(&StaticSecret::from([1; 32]), peer_public).map(drop)
}

/// The AES-256-GCM key for shares from `sender` to `receiver`.
pub fn share_key(
    shared_secret: &[u8; 32],
    federation: &str,
    round: u32,
    sender: u32,
    receiver: u32,
) -> [u8; 32] {
    let binding = share_binding(federation, round, sender, receiver);
    hkdf_sha256(shared_secret, &[SHARE_LABEL, &binding])
}

/// The pairwise mask seed shared by clients `u` and `v` (symmetric in `u`, `v`).
pub fn pairwise_seed(
    shared_secret: &[u8; 32],
    federation: &str,
    round: u32,
    u: u32,
    v: u32,
) -> [u8; 32] {
    let mut info = Vec::with_capacity(16 + federation.len());
    push_federation(&mut info, federation);
    for x in [round, u.min(v), u.max(v)] {
        info.extend_from_slice(&x.to_be_bytes());
    }
    hkdf_sha256(shared_secret, &[PAIRWISE_LABEL, &info])
}

/// What one client sends another in the share-keys phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharePayload {
    /// Sending client (owner of the shared secrets).
    pub sender: u32,
    /// Receiving client (holder of the shares).
    pub receiver: u32,
    /// Share of the sender's self-mask seed.
    pub self_mask_seed: Share,
    /// Share of the sender's mask-agreement secret key.
    pub mask_key: Share,
}

impl SharePayload {
    /// The plaintext encoding `sender ‖ receiver ‖ seed share ‖ key share`.
    pub fn to_bytes(&self) -> [u8; PLAINTEXT_LEN] {
        let mut out = [0u8; PLAINTEXT_LEN];
        out[..4].copy_from_slice(&self.sender.to_be_bytes());
        out[4..8].copy_from_slice(&self.receiver.to_be_bytes());
        out[8..8 + SHARE_LEN].copy_from_slice(&self.self_mask_seed.to_bytes());
        out[8 + SHARE_LEN..].copy_from_slice(&self.mask_key.to_bytes());
        out
    }

    /// Parses the plaintext encoding.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != PLAINTEXT_LEN {
            return Err(Error::DecryptFailed);
        }
        let word =
            |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Ok(Self {
            sender: word(0),
            receiver: word(4),
            self_mask_seed: Share::from_bytes(&bytes[8..8 + SHARE_LEN])?,
            mask_key: Share::from_bytes(&bytes[8 + SHARE_LEN..])?,
        })
    }
}

fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    // Invariant: AES-256-GCM keys are exactly 32 bytes, which the array type guarantees.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256-GCM key"))
}

/// Encrypts `payload` for its receiver under the X25519 secret both share.
pub fn seal_payload(
    shared_secret: &[u8; 32],
    federation: &str,
    round: u32,
    payload: &SharePayload,
) -> Vec<u8> {
    let binding = share_binding(federation, round, payload.sender, payload.receiver);
    let key = aead_key(&hkdf_sha256(shared_secret, &[SHARE_LABEL, &binding]));
    let mut buf = payload.to_bytes().to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0; 12]),
        Aad::from(&binding),
        &mut buf,
    )
    // Invariant: ring fails only for inputs longer than GCM's ~64 GiB limit; this one is 74 bytes.
    .expect("AES-GCM seals a 74-byte plaintext");
    buf
}

/// Decrypts a payload that `sender` encrypted to `receiver`; checks the names inside.
pub fn open_payload(
    shared_secret: &[u8; 32],
    federation: &str,
    round: u32,
    sender: u32,
    receiver: u32,
    ciphertext: &[u8],
) -> Result<SharePayload, Error> {
    let binding = share_binding(federation, round, sender, receiver);
    let key = aead_key(&hkdf_sha256(shared_secret, &[SHARE_LABEL, &binding]));
    let mut buf = ciphertext.to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&binding),
            &mut buf,
        )
        .map_err(|_| Error::DecryptFailed)?;
    let payload = SharePayload::from_bytes(plain)?;
    if payload.sender != sender || payload.receiver != receiver {
        return Err(Error::PayloadMismatch {
            sender: payload.sender,
            receiver: payload.receiver,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(sender: u32, receiver: u32) -> SharePayload {
        SharePayload {
            sender,
            receiver,
            self_mask_seed: Share { x: 1, y: [2; 32] },
            mask_key: Share { x: 1, y: [3; 32] },
        }
    }

    #[test]
    fn round_trip_and_binding() {
        let (a, b) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
        let (pa, pb) = (
            PublicKey::from(&a).to_bytes(),
            PublicKey::from(&b).to_bytes(),
        );
        let s_ab = agree(&a, &pb).unwrap();
        assert_eq!(s_ab, agree(&b, &pa).unwrap());
        let ct = seal_payload(&s_ab, "fed", 4, &payload(0, 1));
        assert_eq!(ct.len(), CIPHERTEXT_LEN);
        assert_eq!(open_payload(&s_ab, "fed", 4, 0, 1, &ct), Ok(payload(0, 1)));
        // Any change of federation, round or direction breaks authentication.
        for (fed, round, s, r) in [("fee", 4, 0, 1), ("fed", 5, 0, 1), ("fed", 4, 1, 0)] {
            assert_eq!(
                open_payload(&s_ab, fed, round, s, r, &ct),
                Err(Error::DecryptFailed)
            );
        }
    }

    #[test]
    fn mismatched_inner_names_are_refused() {
        // A sender who encrypts under the right envelope but names another receiver inside.
        let secret = [5; 32];
        let binding = share_binding("f", 1, 0, 1);
        let key = aead_key(&hkdf_sha256(&secret, &[SHARE_LABEL, &binding]));
        let mut buf = payload(0, 2).to_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&binding),
            &mut buf,
        )
        .unwrap();
        assert_eq!(
            open_payload(&secret, "f", 1, 0, 1, &buf),
            Err(Error::PayloadMismatch {
                sender: 0,
                receiver: 2
            })
        );
    }

    #[test]
    fn low_order_key_is_refused() {
        assert_eq!(
            agree(&StaticSecret::from([1; 32]), &[0; 32]),
            Err(Error::NonContributoryKey)
        );
    }

    #[test]
    fn pairwise_seed_is_symmetric() {
        assert_eq!(
            pairwise_seed(&[1; 32], "f", 2, 3, 9),
            pairwise_seed(&[1; 32], "f", 2, 9, 3)
        );
        assert_ne!(
            pairwise_seed(&[1; 32], "f", 2, 3, 9),
            pairwise_seed(&[1; 32], "f", 3, 3, 9)
        );
    }
}
