//! Cross-checking a client's log against the aggregator's export.

use std::collections::BTreeMap;
use std::fmt;

use crate::Error;
use crate::query::import_jsonl;
use crate::record::{Kind, Record};
use crate::store::Store;
use crate::verify::Checks;
use crate::verify::verify;

/// A round whose global-model digest both sides recorded identically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundDigest {
    /// The round.
    pub round: u32,
    /// Lower-case hex SHA-256 of the global model.
    pub sha256: String,
}

/// A client digest the aggregator's log does not confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestMismatch {
    /// The round.
    pub round: u32,
    /// Sequence number of the client's record.
    pub client_seq: u64,
    /// What the client recorded.
    pub client_sha256: String,
    /// What the aggregator recorded for the round: empty if nothing, several
    /// if it recorded conflicting digests.
    pub aggregator_sha256: Vec<String>,
}

/// Outcome of [`reconcile`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Client digests the aggregator confirmed.
    pub matched: Vec<RoundDigest>,
    /// Client digests it did not.
    pub mismatched: Vec<DigestMismatch>,
}

impl ReconcileReport {
    /// True when every client digest was confirmed.
    pub fn is_consistent(&self) -> bool {
        self.mismatched.is_empty()
    }
}

impl fmt::Display for ReconcileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matched {
            writeln!(f, "round {}: match {}", m.round, m.sha256)?;
        }
        for m in &self.mismatched {
            let aggregator = if m.aggregator_sha256.is_empty() {
                "no record".to_owned()
            } else {
                m.aggregator_sha256.join(" and ")
            };
            writeln!(
                f,
                "round {}: MISMATCH client #{} {} vs aggregator {}",
                m.round, m.client_seq, m.client_sha256, aggregator
            )?;
        }
        write!(
            f,
            "{} matched, {} mismatched",
            self.matched.len(),
            self.mismatched.len()
        )
    }
}

/// `(round, lower-case sha256)` from a `model_digest` record's details
/// (`{"sha256": hex, "round": r}`).
fn model_digest(record: &Record, origin: &'static str) -> Result<(u32, String), Error> {
    let invalid = || Error::ModelDigestInvalid {
        origin,
        seq: record.seq,
    };
    let sha256 = record
        .details
        .get("sha256")
        .and_then(|v| v.as_str())
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(invalid)?;
    let round = record
        .details
        .get("round")
        .and_then(|v| v.as_u64())
        .and_then(|r| u32::try_from(r).ok())
        .ok_or_else(invalid)?;
    Ok((round, sha256.to_ascii_lowercase()))
}

fn model_digests<'a>(
    store: &'a dyn Store,
    origin: &'static str,
) -> impl Iterator<Item = Result<(u64, u32, String), Error>> + 'a {
    store.iter().filter_map(move |entry| {
        let result = entry
            .map_err(Error::StoreUnreadable)
            .and_then(|(seq, bytes)| {
                Record::from_canonical(&bytes)
                    .map_err(|source| Error::RecordUnreadable { seq, source })
            });
        match result {
            // A client's `"direction": "received"` record names the model a round started
            // from, not the one it produced, which is what the aggregator records per round.
            Ok(record)
                if record.kind == Kind::ModelDigest
                    && record.details.get("direction").is_none() =>
            {
                Some(model_digest(&record, origin).map(|(round, sha)| (record.seq, round, sha)))
            }
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    })
}

/// Checks every `model_digest` record in the client's log against the
/// aggregator's `model_digest` record for the same round in its JSONL export.
/// The export must itself verify as a chain (its signed heads included).
pub fn reconcile(
    client: &dyn Store,
    aggregator_export_jsonl: &str,
) -> Result<ReconcileReport, Error> {
    let aggregator = import_jsonl(aggregator_export_jsonl)?;
    verify(&aggregator, &Checks::default()).map_err(Error::ExportBroken)?;
    let mut by_round: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for digest in model_digests(&aggregator, "aggregator") {
        let (_, round, sha256) = digest?;
        let seen = by_round.entry(round).or_default();
        if !seen.contains(&sha256) {
            seen.push(sha256);
        }
    }
    let mut report = ReconcileReport::default();
    for digest in model_digests(client, "client") {
        let (client_seq, round, sha256) = digest?;
        let aggregator_sha256 = by_round.get(&round).cloned().unwrap_or_default();
        if aggregator_sha256 == [sha256.clone()] {
            report.matched.push(RoundDigest { round, sha256 });
        } else {
            report.mismatched.push(DigestMismatch {
                round,
                client_seq,
                client_sha256: sha256,
                aggregator_sha256,
            });
        }
    }
    Ok(report)
}
