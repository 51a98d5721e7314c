//! Chain heads and their Ed25519 signatures.

use std::fmt;
use std::str::FromStr;

use ring::signature;
use serde_json::{Value, json};

use crate::Error;
use crate::keys::AuditKey;
use crate::record::parse_hash;

/// Domain label that starts every signed head message.
pub const HEAD_LABEL: &[u8; 20] = b"quorum-audit/head/v1";

/// A point in a chain: a sequence number and the hash of the record there.
/// Written and parsed as `<seq>:<64 hex digits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Head {
    /// Sequence number of the record.
    pub seq: u64,
    /// Its hash (see [`crate::chain_hash`]).
    pub hash: [u8; 32],
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, hex::encode(self.hash))
    }
}

impl FromStr for Head {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = || Error::HeadInvalid {
            value: s.to_owned(),
        };
        let (seq, hash) = s.split_once(':').ok_or_else(invalid)?;
        Ok(Self {
            seq: seq.parse().map_err(|_| invalid())?,
            hash: parse_hash(hash).ok_or_else(invalid)?,
        })
    }
}

/// The message a signed head signs: [`HEAD_LABEL`] ‖ seq (u64 big-endian) ‖ hash.
pub fn head_message(head: &Head) -> [u8; 60] {
    let mut msg = [0; 60];
    msg[..20].copy_from_slice(HEAD_LABEL);
    msg[20..28].copy_from_slice(&head.seq.to_be_bytes());
    msg[28..].copy_from_slice(&head.hash);
    msg
}

/// A head signed with a node's audit key: the `details` of a `signed_head` record, and what
/// nodes send each other to witness (stored as a `witness` record, with a `"node"` added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// The head.
    pub head: Head,
    /// The signer's raw 32-byte Ed25519 public key.
    pub public_key: Vec<u8>,
    /// The 64-byte Ed25519 signature over [`head_message`].
    pub signature: Vec<u8>,
}

impl SignedHead {
    pub(crate) fn sign(head: Head, key: &AuditKey) -> Self {
        Self {
            head,
            public_key: key.public_key(),
            signature: key.sign(&head_message(&head)),
        }
    }

    /// The record details: `head_seq`, `head_hash`, `public_key`, `signature` (hex).
    pub fn to_details(&self) -> Value {
        json!({
            "head_seq": self.head.seq,
            "head_hash": hex::encode(self.head.hash),
            "public_key": hex::encode(&self.public_key),
            "signature": hex::encode(&self.signature),
        })
    }

    /// Parses record details; the error says which field is wrong.
    pub fn from_details(details: &Value) -> Result<Self, String> {
        let field = |name: &str| {
            details
                .get(name)
                .ok_or_else(|| format!("{name} is missing"))
        };
        let hex_field = |name: &str| {
            field(name)?
                .as_str()
                .and_then(|s| hex::decode(s).ok())
                .ok_or_else(|| format!("{name} is not hex"))
        };
        let seq = field("head_seq")?
            .as_u64()
            .ok_or("head_seq is not an unsigned integer")?;
        let hash = field("head_hash")?
            .as_str()
            .and_then(parse_hash)
            .ok_or("head_hash is not 64 hex digits")?;
        Ok(Self {
            head: Head { seq, hash },
            public_key: hex_field("public_key")?,
            signature: hex_field("signature")?,
        })
    }

    /// Checks the Ed25519 signature against the embedded public key.
    pub fn signature_valid(&self) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.public_key)
            .verify(&head_message(&self.head), &self.signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> AuditKey {
        AuditKey::ephemeral()
    }

    #[test]
    fn head_text_round_trips() {
        let head = Head {
            seq: 41,
            hash: [0xab; 32],
        };
        let text = head.to_string();
        assert_eq!(text, format!("41:{}", "ab".repeat(32)));
        assert_eq!(text.parse::<Head>().unwrap(), head);
        for bad in ["41", "x:00", &format!("41:{}", "ab".repeat(31))] {
            assert!(matches!(
                bad.parse::<Head>(),
                Err(Error::HeadInvalid { .. })
            ));
        }
    }

    #[test]
    fn message_layout_is_label_seq_hash() {
        let msg = head_message(&Head {
            seq: 0x0102,
            hash: [7; 32],
        });
        assert_eq!(&msg[..20], b"quorum-audit/head/v1");
        assert_eq!(&msg[20..28], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&msg[28..], &[7; 32]);
    }

    #[test]
    fn signed_head_details_round_trip_and_verify() {
        let head = Head {
            seq: 5,
            hash: [3; 32],
        };
        let signed = SignedHead::sign(head, &signer());
        let parsed = SignedHead::from_details(&signed.to_details()).unwrap();
        assert_eq!(parsed, signed);
        assert!(parsed.signature_valid());

        let mut other = parsed.clone();
        other.head.seq = 6;
        assert!(!other.signature_valid());
        let mut foreign = parsed;
        foreign.public_key = signer().public_key();
        assert!(!foreign.signature_valid());
    }

    #[test]
    fn malformed_details_name_the_field() {
        let mut details = SignedHead::sign(
            Head {
                seq: 1,
                hash: [0; 32],
            },
            &signer(),
        )
        .to_details();
        details["head_hash"] = Value::from("zz");
        assert_eq!(
            SignedHead::from_details(&details),
            Err("head_hash is not 64 hex digits".into())
        );
        details.as_object_mut().unwrap().remove("signature");
        details["head_hash"] = Value::from("00".repeat(32));
        assert_eq!(
            SignedHead::from_details(&details),
            Err("signature is missing".into())
        );
    }
}
