//! Records, their canonical encoding and the chain hash (pure, no I/O).

use std::fmt;
use std::str::FromStr;

use ring::digest;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Number, Value};
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
}

impl Kind {
    /// Every kind, in declaration order.
    pub const ALL: [Self; 18] = [
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
    #[error("bytes are not in canonical form")]
    NotCanonical,
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

/// Appends the canonical encoding of `value` (see the crate docs) to `out`.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
    }
}

fn write_number(n: &Number, out: &mut Vec<u8>) {
    let text = if let Some(u) = n.as_u64() {
        u.to_string()
    } else if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(f) = n.as_f64() {
        // Shortest round-trip digits in exponent form: fixed by the value alone,
        // not by any JSON library's choice of notation.
        format!("{f:e}")
    } else {
        // serde_json numbers are always one of the three above; JSON null is
        // the only faithful fallback for a representation this crate cannot know.
        "null".to_owned()
    };
    out.extend_from_slice(text.as_bytes());
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0x0f)]);
            }
            // Bytes of multi-byte UTF-8 sequences never fall in the ranges above.
            _ => out.push(b),
        }
    }
    out.push(b'"');
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
            r#"{"a":{"x":true,"y":null,"é":false},"f":1e-1,"g":1e0,"h":1.5e300,"i":-2.5e-7,"z":[{"a":-2,"b":1},"q\"\\\n\u0001é/"]}"#
        );
    }

    #[test]
    fn canonical_round_trips_through_parsing() {
        let mut record = sample();
        record.details = json!({
            "rho": 0.123_456_789_012_345_67,
            "epsilon": 3.2,
            "delta": 1e-9,
            "big": u64::MAX,
            "neg": i64::MIN,
            "text": "tab\there \u{7f} ünïcode",
            "list": [1, 2.5, "x", null],
        });
        let bytes = record.canonical_bytes();
        assert_eq!(Record::from_canonical(&bytes).unwrap(), record);
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
