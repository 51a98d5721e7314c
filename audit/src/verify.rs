//! Verification of a stored chain: pure over a [`Store`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::head::{Head, SignedHead};
use crate::keys::{KeyRecord, endorsement_valid, fingerprint};
use crate::record::{GENESIS_HASH, Kind, Record, RecordError, chain_hash};
use crate::retention::{Pruned, start_of};
use crate::store::{Store, StoreError};

/// The first thing wrong with a log, naming the sequence number where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The store could not be read.
    #[error("the log could not be read after seq {after:?}: {cause}")]
    Unreadable {
        /// Last sequence number read successfully, if any.
        after: Option<u64>,
        /// What the store reported.
        cause: StoreError,
    },
    /// The store returned keys out of ascending order (a broken store).
    #[error("the store returned seq {seq} out of ascending order")]
    KeysNotAscending {
        /// The key that came too late.
        seq: u64,
    },
    /// A sequence number is missing: the record was deleted.
    #[error("record {seq} is missing (deleted)")]
    Gap {
        /// The first missing sequence number.
        seq: u64,
    },
    /// The record stored under a key says it has another seq: records were
    /// reordered or moved.
    #[error("key {seq} holds the record for seq {found} (records reordered or moved)")]
    OutOfOrder {
        /// The key.
        seq: u64,
        /// The `seq` field of the record stored there.
        found: u64,
    },
    /// The record's bytes are not a canonical record.
    #[error("record {seq} is unreadable: {source}")]
    RecordInvalid {
        /// Sequence number of the record.
        seq: u64,
        /// Why it does not parse.
        source: RecordError,
    },
    /// The record no longer hashes to what the chain committed to: it was
    /// edited after it was written.
    #[error("hash chain broken at seq {seq}: the record was altered after it was written")]
    ChainBroken {
        /// Sequence number of the altered record.
        seq: u64,
    },
    /// A `signed_head` record's details are malformed.
    #[error("signed head at seq {seq} is malformed: {reason}")]
    HeadMalformed {
        /// Sequence number of the head record.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// A signed head's signature does not verify.
    #[error("signed head at seq {seq} has a bad signature")]
    HeadSignatureInvalid {
        /// Sequence number of the head record.
        seq: u64,
    },
    /// A signed head was made with a key other than the one in force.
    #[error("signed head at seq {seq} is signed by a key other than the audit key in force")]
    HeadKeyNotInForce {
        /// Sequence number of the head record.
        seq: u64,
    },
    /// A signed head comes before any `audit_key` record put a key in force.
    #[error("signed head at seq {seq} comes before any audit_key record")]
    HeadWithoutKey {
        /// Sequence number of the head record.
        seq: u64,
    },
    /// A signed head vouches for a hash that the records before it no longer
    /// have: the chain was rewritten and re-linked after it was signed.
    #[error(
        "signed head at seq {seq} no longer matches record {head_seq}: records after seq {since:?} were rewritten after they were signed"
    )]
    HeadMismatch {
        /// Sequence number of the head record.
        seq: u64,
        /// The record it vouches for.
        head_seq: u64,
        /// The record vouched for by the previous good signed head, if any:
        /// everything up to it is still covered by a signature.
        since: Option<u64>,
    },
    /// An `audit_key`, `witness` or `pruned` record's details are malformed.
    #[error("{kind} record at seq {seq} is malformed: {reason}")]
    DetailsMalformed {
        /// Sequence number of the record.
        seq: u64,
        /// Its kind.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
    /// The log's first audit key is not one the auditor pinned.
    #[error(
        "the audit key put in force at seq {seq} has fingerprint {fingerprint}, which is not a trusted key: the log was re-signed by someone else, or the wrong fingerprint was given"
    )]
    KeyUntrusted {
        /// Sequence number of the `audit_key` record.
        seq: u64,
        /// Its fingerprint.
        fingerprint: String,
    },
    /// A key was rotated without a valid endorsement by the key in force.
    #[error("audit key rotation at seq {seq} is not endorsed by the key in force: {reason}")]
    KeyRotationInvalid {
        /// Sequence number of the `audit_key` record.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// The `pruned` record a log starts from is not covered by a signed head: whoever wrote it
    /// did not hold the log's key (anyone who can write the store can append such a record and
    /// delete what it names).
    #[error(
        "the log starts from the pruned record at seq {seq}, which no signed head covers: the prune was not made with the log's key"
    )]
    PruneUnsigned {
        /// Sequence number of the `pruned` record.
        seq: u64,
    },
    /// A witness holds a head of this log, with the right hash, signed by a key this log never
    /// put in force: someone other than the log's key holder signed it.
    #[error(
        "{}{held_by} holds head {seq} of this log signed by a key this log never put in force",
        round_prefix(*round)
    )]
    WitnessKeyUnknown {
        /// Sequence number of the head.
        seq: u64,
        /// The round it was witnessed in, if known.
        round: Option<u32>,
        /// Who holds it.
        held_by: String,
    },
    /// Trusted keys were given, but the log never puts any key in force.
    #[error("the log has no audit_key record, so none of the trusted keys signed it")]
    NoKeyRecord,
    /// A stored witness (another node's head) has a bad signature.
    #[error("witness record at seq {seq} holds a head with a bad signature")]
    WitnessSignatureInvalid {
        /// Sequence number of the witness record.
        seq: u64,
    },
    /// Records of one log name different actors.
    #[error("record {seq} is written by {found:?}, but the log belongs to {actor:?}")]
    ActorChanged {
        /// Sequence number of the record.
        seq: u64,
        /// The log's actor (from record 0).
        actor: String,
        /// The actor this record names.
        found: String,
    },
    /// The log ends before a head held elsewhere: records were cut off its end,
    /// or the log was rolled back or started afresh.
    #[error(
        "{}log ends at seq {last:?} but {held_by} holds its head at seq {expected}: the log was truncated, rolled back or started afresh",
        round_prefix(*round)
    )]
    Truncated {
        /// Sequence number of the expected head.
        expected: u64,
        /// Last sequence number present, if any.
        last: Option<u64>,
        /// The round the head was witnessed in, if known.
        round: Option<u32>,
        /// Who holds the head (`--expect-head`, or a witness log).
        held_by: String,
    },
    /// The record at a head held elsewhere has another hash.
    #[error(
        "{}record {seq} does not have the hash {held_by} holds for it: the log was rewritten",
        round_prefix(*round)
    )]
    ExpectedHeadMismatch {
        /// Sequence number of the expected head.
        seq: u64,
        /// The round the head was witnessed in, if known.
        round: Option<u32>,
        /// Who holds the head.
        held_by: String,
    },
}

fn round_prefix(round: Option<u32>) -> String {
    round.map_or_else(String::new, |r| format!("round {r}: "))
}

/// A head of this log held somewhere else, which the log must still reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The head.
    pub head: Head,
    /// The round in which it was witnessed, if known.
    pub round: Option<u32>,
    /// Who holds it, for messages: `"--expect-head"`, `"site:alpha's witness record 41"`.
    pub held_by: String,
    /// The key that signed it, where a witness holds it: one this log put in force.
    pub signed_by: Option<Vec<u8>>,
}

/// What an auditor checks beyond the chain itself.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// Fingerprints of audit keys the auditor pinned (see [`crate::fingerprint`]). When
    /// non-empty, the log's first `audit_key` record must name one of them; later keys must be
    /// endorsed by their predecessor either way.
    pub trusted_keys: Vec<String>,
    /// Heads of this log held elsewhere (`--expect-head`, other nodes' witness records): each
    /// must still be in the log with the same hash. Missing or different ones are reported
    /// lowest seq first, so the first disagreeing round is named.
    pub expected: Vec<Expected>,
}

impl Checks {
    /// Checks pinned to one key.
    pub fn trusting(fingerprint: impl Into<String>) -> Self {
        Self {
            trusted_keys: vec![fingerprint.into()],
            expected: Vec::new(),
        }
    }
}

/// What a successful verification saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records.
    pub records: u64,
    /// Number of signed heads checked.
    pub heads: u64,
    /// The last record, if any.
    pub last: Option<Head>,
    /// The record vouched for by the last signed head, if any. Records after it
    /// are protected only by an external head (see [`verify_against`]).
    pub last_signed: Option<u64>,
    /// The node that wrote the log (record 0's actor), if any record exists.
    pub actor: Option<String>,
    /// The audit key in force at the end (raw Ed25519 public key), if any; pin it by
    /// [`crate::fingerprint`].
    pub key: Option<Vec<u8>>,
    /// Where the log starts when older records were pruned (exported, then removed); the
    /// chain is checked from the signed `pruned` record's `last_hash` on.
    pub pruned_before: Option<u64>,
    /// Heads held elsewhere that fall in the pruned range: check them against the export.
    pub expected_pruned: usize,
    /// Time spent verifying.
    pub elapsed: Duration,
}

impl VerifyReport {
    /// Verification throughput.
    pub fn records_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.records as f64 / secs
        } else {
            f64::INFINITY
        }
    }
}

/// Checks the whole chain: no gaps, each key holds its own record, records parse and are
/// canonical (RFC 8785), each `prev_hash` is the hash of the record before, every record names
/// the same actor, every `audit_key` record after the first is endorsed by the key in force,
/// every signed head is well-formed, signed by the key in force and vouches for the hash the
/// record before it really has, every stored witness carries a valid signature, and whatever
/// `checks` adds: pinned keys and heads held elsewhere.
///
/// Without pinned keys a head only proves that whoever holds the log's own key saw that chain.
/// Records after the last head held elsewhere can be cut off or edited undetectably.
pub fn verify(store: &dyn Store, checks: &Checks) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let start = start_of(store);
    if let Some(key) = start.as_ref().and_then(|(_, p)| p.public_key.as_deref()) {
        let fingerprint = fingerprint(key);
        if !checks.trusted_keys.is_empty() && !checks.trusted_keys.contains(&fingerprint) {
            let seq = start.as_ref().map_or(0, |(_, p)| p.to + 1);
            return Err(VerifyError::KeyUntrusted { seq, fingerprint });
        }
    }
    let mut verifier = Verifier::new(checks, start);
    for entry in store.iter() {
        let (seq, bytes) = entry.map_err(|cause| VerifyError::Unreadable {
            after: verifier.last_seq(),
            cause,
        })?;
        verifier.feed(seq, &bytes)?;
    }
    verifier.finish(started.elapsed())
}

/// Streaming chain checker. Fed records in key order; reports the first error.
struct Verifier<'a> {
    trusted: &'a [String],
    /// The first seq the store holds: 0, or where retention left it.
    first: u64,
    /// The `pruned` record a pruned log starts from: a signed head must cover it.
    start_record: Option<u64>,
    /// Heads held elsewhere that fall in the pruned range (checked against the export).
    expected_pruned: usize,
    next_seq: u64,
    /// Hash of the last record fed (what the next `prev_hash` must be).
    prev_hash: [u8; 32],
    /// A record whose `prev_hash` did not match; which of it and its
    /// predecessor was altered is decided by the record after it.
    pending_break: Option<u64>,
    records: u64,
    heads: u64,
    last_signed: Option<u64>,
    actor: Option<String>,
    /// The audit key in force (raw public key).
    key: Option<Vec<u8>>,
    /// Heads held elsewhere, by seq (several witnesses may hold the same seq).
    expected: BTreeMap<u64, Vec<&'a Expected>>,
    /// Held heads found in the log whose signer is to be checked once every key is known.
    signed_heads_held: Vec<&'a Expected>,
    /// Every key this log put in force.
    keys_in_force: Vec<Vec<u8>>,
}

impl<'a> Verifier<'a> {
    /// A verifier for a log that starts at seq 0, or where `pruned` left it.
    fn new(checks: &'a Checks, start: Option<(u64, Pruned)>) -> Self {
        let (start_record, pruned) = start.unzip();
        let first = pruned.as_ref().map_or(0, |p| p.to + 1);
        let mut expected: BTreeMap<u64, Vec<&Expected>> = BTreeMap::new();
        let mut expected_pruned = 0;
        for e in &checks.expected {
            if e.head.seq < first {
                expected_pruned += 1;
            } else {
                expected.entry(e.head.seq).or_default().push(e);
            }
        }
        Self {
            trusted: &checks.trusted_keys,
            first,
            start_record,
            expected_pruned,
            next_seq: first,
            prev_hash: pruned.as_ref().map_or(GENESIS_HASH, |p| p.last_hash),
            pending_break: None,
            records: 0,
            heads: 0,
            last_signed: None,
            actor: None,
            keys_in_force: pruned.iter().filter_map(|p| p.public_key.clone()).collect(),
            key: pruned.and_then(|p| p.public_key),
            expected,
            signed_heads_held: Vec::new(),
        }
    }

    fn last_seq(&self) -> Option<u64> {
        self.next_seq.checked_sub(1).filter(|_| self.records > 0)
    }

    /// The record to blame for a pending break when the record after it
    /// cannot tell: most edits change content, not `prev_hash`.
    fn blame_without_successor(seq: u64) -> VerifyError {
        VerifyError::ChainBroken {
            seq: seq.saturating_sub(1),
        }
    }

    /// Reports a pending break first: it concerns an earlier seq.
    fn fail(&self, err: VerifyError) -> VerifyError {
        self.pending_break
            .map_or(err, Self::blame_without_successor)
    }

    fn feed(&mut self, seq: u64, bytes: &[u8]) -> Result<(), VerifyError> {
        if seq != self.next_seq {
            let err = if seq > self.next_seq {
                VerifyError::Gap { seq: self.next_seq }
            } else {
                VerifyError::KeysNotAscending { seq }
            };
            return Err(self.fail(err));
        }
        let record = Record::from_canonical(bytes)
            .map_err(|source| self.fail(VerifyError::RecordInvalid { seq, source }))?;
        if record.seq != seq {
            return Err(self.fail(VerifyError::OutOfOrder {
                seq,
                found: record.seq,
            }));
        }
        let hash = chain_hash(&record.prev_hash, bytes);
        let linked = record.prev_hash == self.prev_hash;
        if let Some(broken) = self.pending_break {
            // The previous record did not link to its predecessor. If this one
            // still links to it, its bytes are intact and its predecessor was
            // edited; otherwise it was edited itself (its prev_hash at least).
            let seq = if linked {
                broken.saturating_sub(1)
            } else {
                broken
            };
            return Err(VerifyError::ChainBroken { seq });
        }
        if !linked {
            if seq == self.first {
                return Err(VerifyError::ChainBroken { seq });
            }
            self.pending_break = Some(seq);
        } else {
            self.check_record(seq, &record)?;
        }
        self.prev_hash = hash;
        if let Some(held) = self.expected.remove(&seq) {
            if let Some(e) = held.iter().find(|e| e.head.hash != hash) {
                return Err(self.fail(VerifyError::ExpectedHeadMismatch {
                    seq,
                    round: e.round,
                    held_by: e.held_by.clone(),
                }));
            }
            self.signed_heads_held
                .extend(held.into_iter().filter(|e| e.signed_by.is_some()));
        }
        self.records += 1;
        self.next_seq = seq.saturating_add(1);
        Ok(())
    }

    /// Checks a linked record's actor and, by kind, its key, head or witness.
    fn check_record(&mut self, seq: u64, record: &Record) -> Result<(), VerifyError> {
        match &self.actor {
            None => self.actor = Some(record.actor.clone()),
            Some(actor) if *actor != record.actor => {
                return Err(VerifyError::ActorChanged {
                    seq,
                    actor: actor.clone(),
                    found: record.actor.clone(),
                });
            }
            Some(_) => {}
        }
        let malformed = |reason: String| VerifyError::DetailsMalformed {
            seq,
            kind: record.kind,
            reason,
        };
        match record.kind {
            Kind::SignedHead => self.check_head(seq, record),
            Kind::AuditKey => {
                let key = KeyRecord::from_details(&record.details).map_err(malformed)?;
                self.check_key(seq, key)
            }
            Kind::Pruned => match Pruned::from_details(&record.details) {
                Ok(pruned) if pruned.to < seq => Ok(()),
                Ok(_) => Err(malformed("it prunes records after itself".into())),
                Err(reason) => Err(malformed(reason)),
            },
            Kind::Witness => {
                let held = SignedHead::from_details(&record.details).map_err(malformed)?;
                if held.signature_valid() {
                    Ok(())
                } else {
                    Err(VerifyError::WitnessSignatureInvalid { seq })
                }
            }
            _ => Ok(()),
        }
    }

    fn check_key(&mut self, seq: u64, record: KeyRecord) -> Result<(), VerifyError> {
        let invalid = |reason: String| VerifyError::KeyRotationInvalid { seq, reason };
        match (&self.key, &record.rotation) {
            (None, None) => {
                let fingerprint = fingerprint(&record.public_key);
                if !self.trusted.is_empty() && !self.trusted.contains(&fingerprint) {
                    return Err(VerifyError::KeyUntrusted { seq, fingerprint });
                }
            }
            (None, Some(_)) => return Err(invalid("no key is in force to endorse it".into())),
            (Some(_), None) => {
                return Err(invalid(
                    "a key is already in force, and this record names no endorsement".into(),
                ));
            }
            (Some(old), Some((previous, endorsement))) => {
                if *previous != fingerprint(old) {
                    return Err(invalid(format!(
                        "it names {previous} as the previous key, but {} is in force",
                        fingerprint(old)
                    )));
                }
                if !endorsement_valid(old, &record.public_key, endorsement) {
                    return Err(invalid("the endorsement signature does not verify".into()));
                }
            }
        }
        self.keys_in_force.push(record.public_key.clone());
        self.key = Some(record.public_key);
        Ok(())
    }

    fn check_head(&mut self, seq: u64, record: &Record) -> Result<(), VerifyError> {
        let malformed = |reason: String| VerifyError::HeadMalformed { seq, reason };
        let signed = SignedHead::from_details(&record.details).map_err(malformed)?;
        if seq.checked_sub(1) != Some(signed.head.seq) {
            return Err(malformed(format!(
                "it vouches for seq {}, not for the record just before it",
                signed.head.seq
            )));
        }
        if signed.head.hash != self.prev_hash {
            return Err(VerifyError::HeadMismatch {
                seq,
                head_seq: signed.head.seq,
                since: self.last_signed,
            });
        }
        match &self.key {
            None => return Err(VerifyError::HeadWithoutKey { seq }),
            Some(key) if *key != signed.public_key => {
                return Err(VerifyError::HeadKeyNotInForce { seq });
            }
            Some(_) => {}
        }
        if !signed.signature_valid() {
            return Err(VerifyError::HeadSignatureInvalid { seq });
        }
        self.heads += 1;
        self.last_signed = Some(signed.head.seq);
        Ok(())
    }

    fn finish(self, elapsed: Duration) -> Result<VerifyReport, VerifyError> {
        if let Some(broken) = self.pending_break {
            return Err(Self::blame_without_successor(broken));
        }
        let last = self.last_seq();
        if let Some(e) = self.expected.values().flatten().next() {
            return Err(VerifyError::Truncated {
                expected: e.head.seq,
                last,
                round: e.round,
                held_by: e.held_by.clone(),
            });
        }
        if !self.trusted.is_empty() && self.key.is_none() {
            return Err(VerifyError::NoKeyRecord);
        }
        if let Some(e) = self.signed_heads_held.iter().find(|e| {
            e.signed_by
                .as_ref()
                .is_some_and(|k| !self.keys_in_force.contains(k))
        }) {
            return Err(VerifyError::WitnessKeyUnknown {
                seq: e.head.seq,
                round: e.round,
                held_by: e.held_by.clone(),
            });
        }
        if let Some(seq) = self
            .start_record
            .filter(|&seq| self.last_signed.is_none_or(|signed| signed < seq))
        {
            return Err(VerifyError::PruneUnsigned { seq });
        }
        Ok(VerifyReport {
            records: self.records,
            heads: self.heads,
            last: last.map(|seq| Head {
                seq,
                hash: self.prev_hash,
            }),
            last_signed: self.last_signed,
            actor: self.actor,
            key: self.key,
            pruned_before: (self.first > 0).then_some(self.first),
            expected_pruned: self.expected_pruned,
            elapsed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::AuditKey;
    use crate::log::AuditLog;
    use crate::store::MemoryStore;
    use serde_json::json;

    /// Record 0 the audit key, 1..=3 events, 4 signed head, 5..=8 events, 9 signed head.
    /// Returns the key's fingerprint.
    fn build() -> (MemoryStore, String) {
        let store = MemoryStore::new();
        let key = AuditKey::ephemeral();
        let fingerprint = key.fingerprint();
        let mut log =
            AuditLog::with_store(Box::new(store.clone()), "memory", "aggregator", Some(key))
                .unwrap();
        for round in 1..=2 {
            for i in u32::from(round == 1)..4 {
                log.append(Kind::PhaseCompleted, Some(round), None, json!({"phase": i}))
                    .unwrap();
            }
            log.append_signed_head(Some(round)).unwrap();
        }
        (store, fingerprint)
    }

    fn pinned(fingerprint: &str) -> Checks {
        Checks::trusting(fingerprint)
    }

    fn expecting(head: Head) -> Checks {
        Checks {
            trusted_keys: Vec::new(),
            expected: vec![Expected {
                head,
                round: Some(7),
                held_by: "a witness".into(),
                signed_by: None,
            }],
        }
    }

    fn read(store: &MemoryStore, seq: u64) -> Record {
        Record::from_canonical(&store.get(seq).unwrap().unwrap()).unwrap()
    }

    fn put(store: &MemoryStore, record: &Record) {
        store
            .tamper_put(record.seq, record.canonical_bytes())
            .unwrap();
    }

    /// Ways a dishonest operator can change a stored log.
    enum Corruption {
        /// Change a record's content, leaving it well-formed.
        Edit(u64),
        /// Change a record's prev_hash.
        EditPrevHash(u64),
        /// Replace a record with bytes that do not parse.
        Garbage(u64),
        Delete(u64),
        Swap(u64, u64),
        /// Edit a record and recompute every later prev_hash.
        Rewrite(u64),
        /// Change a signed head's signature.
        ForgeSignature(u64),
        /// Point a signed head at an older record and re-link.
        RepointHead(u64),
    }

    fn apply(store: &MemoryStore, corruption: &Corruption) {
        match *corruption {
            Corruption::Edit(seq) => {
                let mut r = read(store, seq);
                r.details = json!({"phase": "forged"});
                put(store, &r);
            }
            Corruption::EditPrevHash(seq) => {
                let mut r = read(store, seq);
                r.prev_hash[0] ^= 1;
                put(store, &r);
            }
            Corruption::Garbage(seq) => store.tamper_put(seq, b"{\"seq\":".to_vec()).unwrap(),
            Corruption::Delete(seq) => {
                store.tamper_remove(seq).unwrap();
            }
            Corruption::Swap(a, b) => {
                let ra = store.get(a).unwrap().unwrap();
                let rb = store.get(b).unwrap().unwrap();
                store.tamper_put(a, rb).unwrap();
                store.tamper_put(b, ra).unwrap();
            }
            Corruption::Rewrite(from) => {
                apply(store, &Corruption::Edit(from));
                relink(store, from);
            }
            Corruption::ForgeSignature(seq) => {
                let mut r = read(store, seq);
                let mut sig = hex::decode(r.details["signature"].as_str().unwrap()).unwrap();
                sig[10] ^= 0x40;
                r.details["signature"] = json!(hex::encode(sig));
                put(store, &r);
            }
            Corruption::RepointHead(seq) => {
                let mut r = read(store, seq);
                r.details["head_seq"] = json!(seq - 2);
                put(store, &r);
                relink(store, seq);
            }
        }
    }

    /// Recomputes prev_hash for every record from `from` on, as an attacker would.
    fn relink(store: &MemoryStore, from: u64) {
        let mut prev = read(store, from - 1).hash();
        let last = store.last().unwrap().unwrap().0;
        for seq in from..=last {
            let mut r = read(store, seq);
            r.prev_hash = prev;
            put(store, &r);
            prev = r.hash();
        }
    }

    #[test]
    fn honest_log_verifies() {
        let (store, key) = build();
        let report = verify(&store, &pinned(&key)).unwrap();
        assert_eq!(report.records, 10);
        assert_eq!(report.heads, 2);
        assert_eq!(report.last_signed, Some(8));
        assert_eq!(report.last.unwrap().seq, 9);
        assert_eq!(report.last.unwrap().hash, read(&store, 9).hash());
        assert!(report.records_per_sec() > 0.0);
    }

    #[test]
    fn each_corruption_names_the_first_bad_seq() {
        use Corruption::*;
        let cases = [
            (Edit(1), VerifyError::ChainBroken { seq: 1 }),
            (Edit(2), VerifyError::ChainBroken { seq: 2 }),
            (Edit(5), VerifyError::ChainBroken { seq: 5 }),
            (Edit(8), VerifyError::ChainBroken { seq: 8 }),
            (EditPrevHash(0), VerifyError::ChainBroken { seq: 0 }),
            (EditPrevHash(6), VerifyError::ChainBroken { seq: 6 }),
            (Delete(0), VerifyError::Gap { seq: 0 }),
            (Delete(5), VerifyError::Gap { seq: 5 }),
            (Swap(2, 6), VerifyError::OutOfOrder { seq: 2, found: 6 }),
            (Swap(7, 3), VerifyError::OutOfOrder { seq: 3, found: 7 }),
            (
                Rewrite(2),
                VerifyError::HeadMismatch {
                    seq: 4,
                    head_seq: 3,
                    since: None,
                },
            ),
            (
                Rewrite(6),
                VerifyError::HeadMismatch {
                    seq: 9,
                    head_seq: 8,
                    since: Some(3),
                },
            ),
            (
                ForgeSignature(4),
                VerifyError::HeadSignatureInvalid { seq: 4 },
            ),
        ];
        for (corruption, expected) in cases {
            let (store, key) = build();
            apply(&store, &corruption);
            assert_eq!(verify(&store, &pinned(&key)).unwrap_err(), expected);
        }
    }

    #[test]
    fn every_single_bit_flip_names_its_record() {
        let (store, key) = build();
        let original = store.get(6).unwrap().unwrap();
        for offset in 0..original.len() {
            for bit in [0x01, 0x20] {
                let mut flipped = original.clone();
                flipped[offset] ^= bit;
                store.tamper_put(6, flipped).unwrap();
                let named = match verify(&store, &pinned(&key)) {
                    Err(
                        VerifyError::ChainBroken { seq }
                        | VerifyError::RecordInvalid { seq, .. }
                        | VerifyError::OutOfOrder { seq, .. }
                        | VerifyError::ActorChanged { seq, .. },
                    ) => seq,
                    other => panic!("offset {offset} bit {bit:#x}: {other:?}"),
                };
                assert_eq!(named, 6, "offset {offset} bit {bit:#x}");
            }
        }
    }

    #[test]
    fn unparsable_and_repointed_records_are_named() {
        let (store, _) = build();
        apply(&store, &Corruption::Garbage(3));
        assert!(matches!(
            verify(&store, &Checks::default()),
            Err(VerifyError::RecordInvalid {
                seq: 3,
                source: RecordError::Malformed(_)
            })
        ));
        let (store, _) = build();
        apply(&store, &Corruption::RepointHead(9));
        assert!(matches!(
            verify(&store, &Checks::default()),
            Err(VerifyError::HeadMalformed { seq: 9, .. })
        ));
    }

    #[test]
    fn logs_signed_by_untrusted_keys_are_rejected() {
        let (store, key) = build();
        let other = AuditKey::ephemeral().fingerprint();
        assert_eq!(
            verify(&store, &pinned(&other)).unwrap_err(),
            VerifyError::KeyUntrusted {
                seq: 0,
                fingerprint: key.clone()
            }
        );
        let either = Checks {
            trusted_keys: vec![other, key],
            expected: Vec::new(),
        };
        assert!(verify(&store, &either).is_ok());
    }

    #[test]
    fn heads_must_be_signed_by_the_key_in_force() {
        // A head re-signed with another key, its public key swapped in.
        let (store, _) = build();
        let mut head = read(&store, 4);
        let signed = SignedHead::from_details(&head.details).unwrap();
        head.details = SignedHead::sign(signed.head, &AuditKey::ephemeral()).to_details();
        put(&store, &head);
        relink(&store, 5);
        assert_eq!(
            verify(&store, &Checks::default()).unwrap_err(),
            VerifyError::HeadKeyNotInForce { seq: 4 }
        );
        // A head with no key record before it.
        let (store, _) = build();
        store.tamper_remove(0).unwrap();
        assert_eq!(
            verify(&store, &Checks::default()).unwrap_err(),
            VerifyError::Gap { seq: 0 }
        );
    }

    #[test]
    fn tail_changes_need_an_expected_head() {
        let (store, _) = build();
        let head = verify(&store, &Checks::default()).unwrap().last.unwrap();
        store.tamper_remove(9).unwrap();
        store.tamper_remove(8).unwrap();
        // Truncation leaves a valid shorter chain...
        assert_eq!(verify(&store, &Checks::default()).unwrap().records, 8);
        // ...which the earlier head exposes, naming the round it was witnessed in.
        let err = verify(&store, &expecting(head)).unwrap_err();
        assert_eq!(
            err,
            VerifyError::Truncated {
                expected: 9,
                last: Some(7),
                round: Some(7),
                held_by: "a witness".into(),
            }
        );
        assert!(err.to_string().starts_with("round 7: "), "{err}");

        let (store, _) = build();
        let head = verify(&store, &Checks::default()).unwrap().last.unwrap();
        // The last record is a signed head: change a field its signature does not cover.
        let mut last = read(&store, 9);
        last.round = Some(99);
        put(&store, &last);
        assert!(verify(&store, &Checks::default()).is_ok());
        assert_eq!(
            verify(&store, &expecting(head)).unwrap_err(),
            VerifyError::ExpectedHeadMismatch {
                seq: 9,
                round: Some(7),
                held_by: "a witness".into(),
            }
        );
        let earlier = Head {
            seq: 3,
            hash: read(&store, 3).hash(),
        };
        assert!(verify(&store, &expecting(earlier)).is_ok());
    }

    #[test]
    fn a_witnessed_head_signed_by_a_key_the_log_never_had_is_named() {
        let (store, _) = build();
        let head = Head {
            seq: 3,
            hash: read(&store, 3).hash(),
        };
        let held = |signed_by: Vec<u8>| Checks {
            trusted_keys: Vec::new(),
            expected: vec![Expected {
                head,
                round: Some(1),
                held_by: "site:alpha's witness record 5".into(),
                signed_by: Some(signed_by),
            }],
        };
        let own = SignedHead::from_details(&read(&store, 4).details).unwrap();
        assert!(verify(&store, &held(own.public_key)).is_ok());
        let err = verify(&store, &held(AuditKey::ephemeral().public_key())).unwrap_err();
        assert_eq!(
            err,
            VerifyError::WitnessKeyUnknown {
                seq: 3,
                round: Some(1),
                held_by: "site:alpha's witness record 5".into(),
            }
        );
    }

    #[test]
    fn the_lowest_disagreeing_head_is_named_first() {
        // No signed heads in this log: only the heads held elsewhere protect it.
        let store = MemoryStore::new();
        let mut log =
            AuditLog::with_store(Box::new(store.clone()), "memory", "site:alpha", None).unwrap();
        for i in 0..10 {
            log.append(Kind::Join, Some(i / 4 + 1), None, json!({"i": i}))
                .unwrap();
        }
        let at = |seq: u64, round: u32| Expected {
            head: Head {
                seq,
                hash: read(&store, seq).hash(),
            },
            round: Some(round),
            held_by: format!("witness of round {round}"),
            signed_by: None,
        };
        let checks = Checks {
            trusted_keys: Vec::new(),
            expected: vec![at(7, 2), at(3, 1)],
        };
        assert!(verify(&store, &checks).is_ok());
        apply(&store, &Corruption::Rewrite(2));
        assert_eq!(verify(&store, &Checks::default()).unwrap().records, 10);
        assert_eq!(
            verify(&store, &checks).unwrap_err(),
            VerifyError::ExpectedHeadMismatch {
                seq: 3,
                round: Some(1),
                held_by: "witness of round 1".into()
            }
        );
    }

    #[test]
    fn empty_log_verifies_but_not_against_a_head() {
        let store = MemoryStore::new();
        let report = verify(&store, &Checks::default()).unwrap();
        assert_eq!((report.records, report.last), (0, None));
        assert_eq!(
            verify(
                &store,
                &expecting(Head {
                    seq: 0,
                    hash: [0; 32]
                })
            )
            .unwrap_err(),
            VerifyError::Truncated {
                expected: 0,
                last: None,
                round: Some(7),
                held_by: "a witness".into(),
            }
        );
    }
}
