//! Records, their canonical encoding and the chain hash (pure, no I/O).

use std::fmt;
use std::str::FromStr;

use ring::digest;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Error;

/// `prev_hash` of the record with sequence number 0.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// What a record is about. Encoded as the snake_case name, e.g. `model_digest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Kind {
    /// The node started.
    Start,
    /// The node stopped.
    Stop,
    /// A federation or site configuration was loaded.
    ConfigLoaded,
    /// A site policy was loaded.
    PolicyLoaded,
    /// A site joined (or asked to join) the federation.
    Join,
    /// Something was refused, with the reason in `details`.
    Refusal,
    /// Attestation evidence was presented or checked.
    Attestation,
    /// A round's cohort was selected.
    CohortSelected,
    /// A protocol phase completed; survivors and dropouts in `details`.
    PhaseCompleted,
    /// A masked upload was sent or received: `{"sha256": hex, "bytes": n}`.
    UploadDigest,
    /// Digest of an unmasked aggregate.
    AggregateDigest,
    /// Digest of a global model: `{"sha256": hex, "round": r}`.
    ModelDigest,
    /// Privacy budget spent: `{"rho": f, "epsilon": f, "delta": f}`.
    PrivacySpent,
    /// A checkpoint was written.
    Checkpoint,
    /// A round was aborted.
    RoundAborted,
    /// A round completed.
    RoundCompleted,
    /// An administrative action (certificate issue or revoke, release signing).
    AdminAction,
    /// A signed statement of the chain head; see the crate docs.
    SignedHead,
    /// The audit key that signs this log's heads was put in force; see the crate docs.
    AuditKey,
    /// Another node's signed head, received and checked: this node witnesses that log.
    Witness,
    /// Records before a seq were exported and removed from the store (retention).
    Pruned,
    /// A site adopted a newer revocation list relayed with an offer: `{"crl_number": "n",
    /// "next_update": unix, "revoked": n}`.
    RevocationList,
}

impl Kind {
    /// Every kind, in declaration order.
    pub const ALL: [Self; 22] = [
        Self::Start,
        Self::Stop,
        Self::ConfigLoaded,
        Self::PolicyLoaded,
        Self::Join,
        Self::Refusal,
        Self::Attestation,
        Self::CohortSelected,
        Self::PhaseCompleted,
        Self::UploadDigest,
        Self::AggregateDigest,
        Self::ModelDigest,
        Self::PrivacySpent,
        Self::Checkpoint,
        Self::RoundAborted,
        Self::RoundCompleted,
        Self::AdminAction,
        Self::SignedHead,
        Self::AuditKey,
        Self::Witness,
        Self::Pruned,
        Self::RevocationList,
    ];

    /// The encoded name, e.g. `"phase_completed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::ConfigLoaded => "config_loaded",
            Self::PolicyLoaded => "policy_loaded",
            Self::Join => "join",
            Self::Refusal => "refusal",
            Self::Attestation => "attestation",
            Self::CohortSelected => "cohort_selected",
            Self::PhaseCompleted => "phase_completed",
            Self::UploadDigest => "upload_digest",
            Self::AggregateDigest => "aggregate_digest",
            Self::ModelDigest => "model_digest",
            Self::PrivacySpent => "privacy_spent",
            Self::Checkpoint => "checkpoint",
            Self::RoundAborted => "round_aborted",
            Self::RoundCompleted => "round_completed",
            Self::AdminAction => "admin_action",
            Self::SignedHead => "signed_head",
            Self::AuditKey => "audit_key",
            Self::Witness => "witness",
            Self::Pruned => "pruned",
            Self::RevocationList => "revocation_list",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::KindUnknown {
                value: s.to_owned(),
                expected: Self::ALL.map(Self::as_str).join(", "),
            })
    }
}

/// Why stored bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The bytes are not JSON of the record shape.
    #[error("not a record: {0}")]
    Malformed(String),
    /// The `time` field is not an RFC 3339 timestamp.
    #[error("time {0:?} is not an RFC 3339 timestamp")]
    TimeInvalid(String),
    /// The bytes parse, but are not the canonical encoding of what they hold.
    #[error("bytes are not in canonical (RFC 8785) form")]
    NotCanonical,
    /// An integer beyond ±2^53, which RFC 8785 cannot encode exactly; write it as a string.
    #[error(
        "integer {0} is beyond ±2^53, which RFC 8785 cannot encode exactly; write it as a string"
    )]
    IntegerTooLarge(String),
}

/// One audit record. Its canonical bytes are what is stored and hashed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Position in the log, from 0, without gaps.
    pub seq: u64,
    /// When the record was written, RFC 3339 in UTC.
    pub time: String,
    /// Who wrote it: `"aggregator"` or `"site:<name>"`.
    pub actor: String,
    /// What it is about.
    pub kind: Kind,
    /// The training round it concerns, if any.
    pub round: Option<u32>,
    /// The site it concerns, if any.
    pub site: Option<String>,
    /// Kind-specific details.
    pub details: Value,
    /// Hash of the previous record ([`GENESIS_HASH`] for seq 0).
    #[serde(deserialize_with = "hash_from_hex")]
    pub prev_hash: [u8; 32],
}

impl Record {
    /// The record as a JSON object (the keys the canonical encoding sorts).
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        map.insert("seq".into(), Value::from(self.seq));
        map.insert("time".into(), Value::from(self.time.as_str()));
        map.insert("actor".into(), Value::from(self.actor.as_str()));
        map.insert("kind".into(), Value::from(self.kind.as_str()));
        map.insert("round".into(), self.round.map_or(Value::Null, Value::from));
        map.insert(
            "site".into(),
            self.site.as_deref().map_or(Value::Null, Value::from),
        );
        map.insert("details".into(), self.details.clone());
        map.insert("prev_hash".into(), Value::from(hex::encode(self.prev_hash)));
        Value::Object(map)
    }

    /// The canonical bytes: what is stored and hashed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        write_canonical(&self.to_value(), &mut out);
        out
    }

    /// This record's hash: `SHA-256(prev_hash || canonical bytes)`.
    pub fn hash(&self) -> [u8; 32] {
        chain_hash(&self.prev_hash, &self.canonical_bytes())
    }

    /// Parses stored bytes, insisting that they are canonical.
    pub fn from_canonical(bytes: &[u8]) -> Result<Self, RecordError> {
        let record: Self =
            serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
        if OffsetDateTime::parse(&record.time, &Rfc3339).is_err() {
            return Err(RecordError::TimeInvalid(record.time));
        }
        if record.canonical_bytes() != bytes {
            return Err(RecordError::NotCanonical);
        }
        Ok(record)
    }
}

/// `SHA-256(prev_hash || bytes)`, the hash that links a record to the next.
pub fn chain_hash(prev_hash: &[u8; 32], bytes: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(prev_hash);
    ctx.update(bytes);
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Appends the canonical encoding of `value` to `out`: RFC 8785, the JSON
/// Canonicalization Scheme (see the crate docs).
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    serde_json_canonicalizer::to_writer(value, out)
        .expect("a serde_json::Value has finite numbers only, and writing to a Vec cannot fail");
}

/// The largest integer magnitude RFC 8785 encodes exactly (I-JSON, RFC 7493):
/// every number is an IEEE 754 double.
pub const MAX_EXACT_INTEGER: u64 = 1 << 53;

/// Checks that `value` holds no integer beyond ±2^53, which JCS would round.
pub fn check_exact(value: &Value) -> Result<(), RecordError> {
    match value {
        Value::Number(n) => {
            let exact = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u <= MAX_EXACT_INTEGER,
                (None, Some(i)) => i.unsigned_abs() <= MAX_EXACT_INTEGER,
                (None, None) => true,
            };
            if exact {
                Ok(())
            } else {
                Err(RecordError::IntegerTooLarge(n.to_string()))
            }
        }
        Value::Array(items) => items.iter().try_for_each(check_exact),
        Value::Object(map) => map.values().try_for_each(check_exact),
        Value::Null | Value::Bool(_) | Value::String(_) => Ok(()),
    }
}

fn hash_from_hex<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
    let text = String::deserialize(d)?;
    parse_hash(&text).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
}

/// Parses 64 hex digits into a hash.
pub(crate) fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Record {
        Record {
            seq: 7,
            time: "2025-01-31T12:00:00Z".into(),
            actor: "aggregator".into(),
            kind: Kind::ModelDigest,
            round: Some(3),
            site: None,
            details: json!({"sha256": "ab", "round": 3}),
            prev_hash: [0x11; 32],
        }
    }

    /// Golden vector. The hash was computed outside Rust:
    /// `{ printf '\x11%.0s' $(seq 32); printf '%s' "$BYTES"; } | sha256sum`
    /// with `$BYTES` the expected string. Any change to the encoding breaks it.
    #[test]
    fn golden_vector_bytes_and_hash() {
        let expected = concat!(
            r#"{"actor":"aggregator","details":{"round":3,"sha256":"ab"},"#,
            r#""kind":"model_digest","#,
            r#""prev_hash":"1111111111111111111111111111111111111111111111111111111111111111","#,
            r#""round":3,"seq":7,"site":null,"time":"2025-01-31T12:00:00Z"}"#
        );
        let record = sample();
        assert_eq!(
            String::from_utf8(record.canonical_bytes()).unwrap(),
            expected
        );
        assert_eq!(
            hex::encode(record.hash()),
            "b8918536d495a706f74bb65c9630aa6d9556a6be7b8837b21723252d39562b00"
        );
    }

    #[test]
    fn canonical_sorts_nested_keys_and_escapes() {
        let value = json!({
            "z": [ {"b": 1, "a": -2}, "q\"\\\n\u{1}é/" ],
            "a": {"y": null, "x": true, "é": false},
            "f": 0.1,
            "g": 1.0,
            "h": 1.5e300,
            "i": -2.5e-7,
        });
        let mut out = Vec::new();
        write_canonical(&value, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":{"x":true,"y":null,"é":false},"f":0.1,"g":1,"h":1.5e+300,"i":-2.5e-7,"z":[{"a":-2,"b":1},"q\"\\\n\u0001é/"]}"#
        );
    }

    #[test]
    fn canonical_round_trips_through_parsing() {
        let mut record = sample();
        record.details = json!({
            "rho": 0.123_456_789_012_345_67,
            "epsilon": 3.2,
            "delta": 1e-9,
            "big": MAX_EXACT_INTEGER,
            "neg": -(MAX_EXACT_INTEGER as i64),
            "text": "tab\there \u{7f} ünïcode",
            "list": [1, 2.5, "x", null],
        });
        let bytes = record.canonical_bytes();
        assert_eq!(Record::from_canonical(&bytes).unwrap(), record);
    }

    #[test]
    fn integers_beyond_2_pow_53_are_not_exact() {
        assert_eq!(check_exact(&json!({"a": [MAX_EXACT_INTEGER]})), Ok(()));
        for big in [
            json!(MAX_EXACT_INTEGER + 1),
            json!(i64::MIN),
            json!({"x": [u64::MAX]}),
        ] {
            assert!(matches!(
                check_exact(&big),
                Err(RecordError::IntegerTooLarge(_))
            ));
        }
        // A stored record holding one is not canonical: JCS would have rounded it.
        let mut record = sample();
        record.details = json!({"big": u64::MAX});
        let text = String::from_utf8(record.canonical_bytes()).unwrap();
        let exact = text.replace("18446744073709552000", &u64::MAX.to_string());
        assert_eq!(
            Record::from_canonical(exact.as_bytes()),
            Err(RecordError::NotCanonical)
        );
    }

    #[test]
    fn non_canonical_bytes_are_rejected() {
        let bytes = sample().canonical_bytes();
        let text = String::from_utf8(bytes).unwrap();
        // Same content, different spelling: whitespace, key order, float form.
        let spaced = text.replacen(",", ", ", 1);
        assert_eq!(
            Record::from_canonical(spaced.as_bytes()),
            Err(RecordError::NotCanonical)
        );
        let reordered = text.replace(
            r#"{"round":3,"sha256":"ab"}"#,
            r#"{"sha256":"ab","round":3}"#,
        );
        assert_eq!(
            Record::from_canonical(reordered.as_bytes()),
            Err(RecordError::NotCanonical)
        );
        let upper = text.replace(&"1".repeat(64), &"A".repeat(64));
        assert_eq!(
            Record::from_canonical(upper.as_bytes()),
            Err(RecordError::NotCanonical)
        );
    }

    #[test]
    fn malformed_records_are_rejected() {
        let text = String::from_utf8(sample().canonical_bytes()).unwrap();
        let cases = [
            text.replace("model_digest", "no_such_kind"),
            text.replace(r#""seq":7,"#, ""),
            text.replace(r#""site":null"#, r#""site":null,"extra":1"#),
            text.replace(&"1".repeat(64), "11"),
            text[..text.len() - 1].to_owned(),
        ];
        for case in cases {
            assert!(
                matches!(
                    Record::from_canonical(case.as_bytes()),
                    Err(RecordError::Malformed(_))
                ),
                "accepted {case}"
            );
        }
        let bad_time = text.replace("2025-01-31T12:00:00Z", "yesterday");
        assert_eq!(
            Record::from_canonical(bad_time.as_bytes()),
            Err(RecordError::TimeInvalid("yesterday".into()))
        );
    }

    #[test]
    fn kind_names_agree_with_serde() {
        for kind in Kind::ALL {
            let parsed: Kind = serde_json::from_value(json!(kind.as_str())).unwrap();
            assert_eq!(parsed, kind);
            assert_eq!(kind.as_str().parse::<Kind>().unwrap(), kind);
        }
        assert!(matches!(
            "model".parse::<Kind>(),
            Err(Error::KindUnknown { .. })
        ));
    }
}
