//! Retention: a long federation's log exported and pruned by range, with a signed record of
//! what was removed, so that what is left still verifies on its own.
//!
//! [`crate::AuditLog::prune`] writes the records below a seq to an export, appends a `pruned`
//! record that names the range, the export's SHA-256, the hash of the last record removed and
//! the audit key in force at that point, signs a head over it, and only then removes the range
//! from the store. A verifier that finds a log starting at seq S > 0 looks for the `pruned`
//! record with `to = S - 1` and continues the chain from its `last_hash`, with its key in
//! force; the removed records are checked from the export (whose digest the log signs).

use serde_json::{Value, json};

use crate::record::{Kind, Record, parse_hash};
use crate::store::Store;

/// The `details` of a `pruned` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// First seq removed.
    pub from: u64,
    /// Last seq removed.
    pub to: u64,
    /// SHA-256 of the export that holds them (its exact bytes).
    pub export_sha256: [u8; 32],
    /// Hash of record `to`: the `prev_hash` the kept chain starts from.
    pub last_hash: [u8; 32],
    /// The audit key in force after record `to` (raw), if any.
    pub public_key: Option<Vec<u8>>,
}

impl Pruned {
    pub(crate) fn to_details(&self) -> Value {
        json!({
            "from": self.from,
            "to": self.to,
            "export_sha256": hex::encode(self.export_sha256),
            "last_hash": hex::encode(self.last_hash),
            "public_key": self.public_key.as_ref().map(hex::encode),
        })
    }

    /// Parses record details; the error says which field is wrong.
    pub(crate) fn from_details(details: &Value) -> Result<Self, String> {
        let seq = |name: &str| {
            details
                .get(name)
                .and_then(Value::as_u64)
                .ok_or(format!("{name} is not an unsigned integer"))
        };
        let hash = |name: &str| {
            details
                .get(name)
                .and_then(Value::as_str)
                .and_then(parse_hash)
                .ok_or(format!("{name} is not 64 hex digits"))
        };
        let public_key = match details.get("public_key") {
            Some(Value::Null) => None,
            Some(Value::String(key)) => Some(
                hex::decode(key)
                    .ok()
                    .filter(|k| k.len() == 32)
                    .ok_or("public_key is not 32 bytes of hex")?,
            ),
            _ => return Err("public_key is missing".into()),
        };
        let pruned = Self {
            from: seq("from")?,
            to: seq("to")?,
            export_sha256: hash("export_sha256")?,
            last_hash: hash("last_hash")?,
            public_key,
        };
        if pruned.from > pruned.to {
            return Err("from is after to".into());
        }
        Ok(pruned)
    }
}

/// Where a pruned log's chain starts: the `pruned` record (and its seq) that removed
/// everything before the store's first record, if the store does not start at seq 0.
pub(crate) fn start_of(store: &dyn Store) -> Option<(u64, Pruned)> {
    let first = store.iter().next()?.ok()?.0;
    if first == 0 {
        return None;
    }
    store
        .iter()
        .filter_map(Result::ok)
        .find_map(|(seq, bytes)| {
            let record = Record::from_canonical(&bytes).ok()?;
            let pruned = (record.kind == Kind::Pruned)
                .then(|| Pruned::from_details(&record.details).ok())??;
            (pruned.to + 1 == first).then_some((seq, pruned))
        })
}
