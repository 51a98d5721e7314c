//! Heads of other logs that a log witnessed: the auditor's way to catch a rewrite, truncation
//! or rollback of one node's log from another node's log.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::Error;
use crate::head::{Head, SignedHead};
use crate::query::records;
use crate::record::{Kind, Record};
use crate::store::Store;
use crate::verify::Expected;

/// Every `witness` record in `store`: the node whose head it holds, the record, the head.
fn witnesses(
    store: &dyn Store,
) -> impl Iterator<Item = Result<(String, Record, SignedHead), Error>> + '_ {
    records(store).filter_map(|record| {
        let record = match record {
            Ok(record) if record.kind == Kind::Witness => record,
            Ok(_) => return None,
            Err(e) => return Some(Err(e)),
        };
        let node = record
            .details
            .get("node")
            .and_then(Value::as_str)?
            .to_owned();
        Some(match SignedHead::from_details(&record.details) {
            Ok(held) => Ok((node, record, held)),
            Err(reason) => Err(Error::RecordUnreadable {
                seq: record.seq,
                source: crate::RecordError::Malformed(reason),
            }),
        })
    })
}

/// Every head of `node`'s log (`"aggregator"`, `"site:alpha"`) that the log in `store` stored
/// as a `witness` record, with the round it was witnessed in: pass them as
/// [`crate::Checks::expected`] when verifying `node`'s log. Verify `store` itself first.
pub fn witnessed_heads(store: &dyn Store, node: &str) -> Result<Vec<Expected>, Error> {
    let mut heads = Vec::new();
    for witness in witnesses(store) {
        let (of, record, held) = witness?;
        if of == node {
            heads.push(Expected {
                head: held.head,
                round: record.round,
                held_by: format!("{}'s witness record {}", record.actor, record.seq),
                signed_by: Some(held.public_key),
            });
        }
    }
    Ok(heads)
}

/// The latest head of each node that the log in `store` witnessed, by node name: what a
/// restarted node checks the next heads against (they must move forward).
pub fn last_witnessed(store: &dyn Store) -> Result<BTreeMap<String, Head>, Error> {
    let mut last: BTreeMap<String, Head> = BTreeMap::new();
    for witness in witnesses(store) {
        let (node, _, held) = witness?;
        if last.get(&node).is_none_or(|h| h.seq < held.head.seq) {
            last.insert(node, held.head);
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
