//! Cross-witnessing of audit logs: at each round end the aggregator sends its signed head to
//! the round's sites and each site answers with its own; each side checks what it receives and
//! stores it in its own log (`witness`). A log later cut, rolled back or rewritten is then
//! caught from any other node's log (`quorum-audit verify --witness`).
//!
//! [`HeadWitness`] is the receiving side's check, pure: a head must be well formed, carry a
//! valid signature, and move forward: every round end appends records, so a head at or before
//! one already witnessed from the same node means that node's log went back (or was forked
//! and regrown to the same length). A log rolled back and regrown past the witnessed seq is
//! caught offline instead, by `quorum-audit verify --witness`.

use std::collections::HashMap;

use quorum_audit::{Head, SignedHead};
use quorum_proto::v1 as pb;

use crate::fact::Witnessed;

/// Why a received head was not stored as a witness.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    /// The head is malformed or its signature does not verify.
    #[error("{node}'s audit head is invalid: {reason}")]
    Invalid {
        /// Whose head.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// The node's head did not move past one it showed before: its log was rolled back,
    /// truncated or rewritten.
    #[error(
        "{node}'s audit log went back: it now shows head {now}, after head {before} was witnessed; its log was rolled back, truncated or rewritten"
    )]
    WentBack {
        /// Whose head.
        node: String,
        /// The head witnessed before.
        before: Head,
        /// The head shown now.
        now: Head,
    },
}

/// The last head witnessed from each node.
#[derive(Debug, Clone, Default)]
pub struct HeadWitness {
    last: HashMap<String, Head>,
}

impl HeadWitness {
    /// Remembers a head witnessed earlier (read back from this node's own log on start).
    pub fn remember(&mut self, node: &str, head: Head) {
        let newer = self.last.get(node).is_none_or(|h| h.seq < head.seq);
        if newer {
            self.last.insert(node.to_owned(), head);
        }
    }

    /// Checks `message` from `node`; on success, returns the `witness` details to store.
    pub fn observe(
        &mut self,
        node: &str,
        message: &pb::AuditHead,
    ) -> Result<Witnessed, WitnessError> {
        let invalid = |reason: &str| WitnessError::Invalid {
            node: node.to_owned(),
            reason: reason.to_owned(),
        };
        let hash: [u8; 32] = message
            .hash
            .as_slice()
            .try_into()
            .map_err(|_| invalid("the hash is not 32 bytes"))?;
        let signed = SignedHead {
            head: Head {
                seq: message.seq,
                hash,
            },
            public_key: message.public_key.clone(),
            signature: message.signature.clone(),
        };
        if !signed.signature_valid() {
            return Err(invalid("the signature does not verify"));
        }
        if let Some(&before) = self.last.get(node)
            && signed.head.seq <= before.seq
        {
            return Err(WitnessError::WentBack {
                node: node.to_owned(),
                before,
                now: signed.head,
            });
        }
        self.remember(node, signed.head);
        Ok(Witnessed {
            node: node.to_owned(),
            head_seq: signed.head.seq,
            head_hash: hex::encode(hash),
            public_key: hex::encode(&signed.public_key),
            signature: hex::encode(&signed.signature),
        })
    }
}

/// The wire form of a head this node signed at the end of `round` (0: the federation's end).
pub fn head_message(round: u32, signed: &SignedHead) -> pb::AuditHead {
    pb::AuditHead {
        round,
        seq: signed.head.seq,
        hash: signed.head.hash.to_vec(),
        public_key: signed.public_key.clone(),
        signature: signed.signature.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorum_audit::{AuditKey, AuditLog, Kind, MemoryStore};
    use serde_json::json;

    /// A log signing a head after each of `rounds` records; returns the heads.
    fn heads(rounds: u32) -> Vec<SignedHead> {
        let mut log = AuditLog::with_store(
            Box::new(MemoryStore::new()),
            "memory",
            "aggregator",
            Some(AuditKey::ephemeral()),
        )
        .unwrap();
        (1..=rounds)
            .map(|round| {
                log.append(Kind::RoundCompleted, Some(round), None, json!({}))
                    .unwrap();
                log.append_signed_head(Some(round)).unwrap()
            })
            .collect()
    }

    #[test]
    fn forward_heads_are_witnessed_and_stored_as_the_log_expects() {
        let heads = heads(3);
        let mut witness = HeadWitness::default();
        for (round, head) in (1..).zip(&heads) {
            let stored = witness
                .observe("aggregator", &head_message(round, head))
                .unwrap();
            let mut details = serde_json::to_value(&stored).unwrap();
            // What the receiving log stores must be what quorum_audit accepts as a witness.
            assert_eq!(SignedHead::from_details(&details).unwrap(), *head);
            details["node"] = json!("aggregator");
            let mut log =
                AuditLog::with_store(Box::new(MemoryStore::new()), "memory", "site:alpha", None)
                    .unwrap();
            log.append(Kind::Witness, Some(round), None, details)
                .unwrap();
        }
        // The same head again, for a later round: nothing was appended since.
        assert!(matches!(
            witness.observe("aggregator", &head_message(4, &heads[2])),
            Err(WitnessError::WentBack { .. })
        ));
    }

    #[test]
    fn a_head_behind_or_beside_a_witnessed_one_is_a_log_gone_back() {
        let heads = heads(3);
        let mut witness = HeadWitness::default();
        witness
            .observe("aggregator", &head_message(2, &heads[1]))
            .unwrap();
        let err = witness
            .observe("aggregator", &head_message(1, &heads[0]))
            .unwrap_err();
        assert!(matches!(err, WitnessError::WentBack { .. }), "{err}");
        // A fresh log, signed with the same key, shows the same seq with another hash.
        let other = self::heads(2);
        let mut remembered = HeadWitness::default();
        remembered.remember("aggregator", heads[1].head);
        let err = remembered
            .observe("aggregator", &head_message(2, &other[1]))
            .unwrap_err();
        assert!(matches!(err, WitnessError::WentBack { .. }), "{err}");
        // Other nodes are tracked apart.
        assert!(
            witness
                .observe("site:beta", &head_message(1, &heads[0]))
                .is_ok()
        );
    }

    #[test]
    fn forged_or_malformed_heads_are_invalid() {
        let heads = heads(1);
        let mut witness = HeadWitness::default();
        let mut forged = head_message(1, &heads[0]);
        forged.seq += 1;
        let mut short = head_message(1, &heads[0]);
        short.hash.pop();
        let mut keyless = head_message(1, &heads[0]);
        keyless.public_key.clear();
        for bad in [forged, short, keyless] {
            assert!(matches!(
                witness.observe("site:alpha", &bad),
                Err(WitnessError::Invalid { .. })
            ));
        }
    }
}
