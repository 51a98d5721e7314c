//! Heads of other logs that a log witnessed: the auditor's way to catch a rewrite, truncation
//! or rollback of one node's log from another node's log.

use serde_json::Value;

use crate::Error;
use crate::head::SignedHead;
use crate::query::records;
use crate::record::Kind;
use crate::store::Store;
use crate::verify::Expected;

/// Every head of `node`'s log (`"aggregator"`, `"site:alpha"`) that the log in `store` stored
/// as a `witness` record, with the round it was witnessed in: pass them as
/// [`crate::Checks::expected`] when verifying `node`'s log. Verify `store` itself first.
pub fn witnessed_heads(store: &dyn Store, node: &str) -> Result<Vec<Expected>, Error> {
    let mut heads = Vec::new();
    for record in records(store) {
        let record = record?;
        if record.kind != Kind::Witness
            || record.details.get("node").and_then(Value::as_str) != Some(node)
        {
            continue;
        }
        let held = SignedHead::from_details(&record.details).map_err(|reason| {
            Error::RecordUnreadable {
                seq: record.seq,
                source: crate::RecordError::Malformed(reason),
            }
        })?;
        heads.push(Expected {
            head: held.head,
            round: record.round,
            held_by: format!("{}'s witness record {}", record.actor, record.seq),
        });
    }
    Ok(heads)
}
