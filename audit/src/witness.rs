//! Heads of other logs that a log witnessed: the auditor's way to catch a rewrite, truncation
//! or rollback of one node's log from another node's log.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::Error;
use crate::head::{Head, SignedHead};
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
            signed_by: Some(held.public_key),
        });
    }
    Ok(heads)
}

/// The latest head of each node that the log in `store` witnessed, by node name: what a
/// restarted node checks the next heads against (they must move forward).
pub fn last_witnessed(store: &dyn Store) -> Result<BTreeMap<String, Head>, Error> {
    let mut last: BTreeMap<String, Head> = BTreeMap::new();
    for record in records(store) {
        let record = record?;
        let Some(node) = record.details.get("node").and_then(Value::as_str) else {
            continue;
        };
        if record.kind != Kind::Witness {
            continue;
        }
        let Ok(held) = SignedHead::from_details(&record.details) else {
            continue;
        };
        let newer = last.get(node).is_none_or(|h| h.seq < held.head.seq);
        if newer {
            last.insert(node.to_owned(), held.head);
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditKey, AuditLog, MemoryStore};
    use serde_json::json;

    #[test]
    fn last_witnessed_keeps_the_latest_head_of_each_node() {
        let other = MemoryStore::new();
        let mut signer = AuditLog::with_store(
            Box::new(other),
            "memory",
            "site:alpha",
            Some(AuditKey::ephemeral()),
        )
        .unwrap();
        let store = MemoryStore::new();
        let mut log =
            AuditLog::with_store(Box::new(store.clone()), "memory", "aggregator", None).unwrap();
        let mut heads = Vec::new();
        for round in 1..=3 {
            signer
                .append(Kind::Join, Some(round), None, json!({}))
                .unwrap();
            let head = signer.append_signed_head(Some(round)).unwrap();
            let mut details = head.to_details();
            details["node"] = json!("site:alpha");
            log.append(Kind::Witness, Some(round), None, details)
                .unwrap();
            heads.push(head.head);
        }
        assert_eq!(
            last_witnessed(&store).unwrap(),
            BTreeMap::from([("site:alpha".to_owned(), heads[2])])
        );
    }
}
