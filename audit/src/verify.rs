//! Verification of a stored chain: pure over a [`Store`].

use std::time::{Duration, Instant};

use crate::head::{Head, SignedHead};
use crate::record::{GENESIS_HASH, Kind, Record, RecordError, chain_hash};
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
    /// A signed head was made with a key that is not trusted.
    #[error("signed head at seq {seq} is signed by a key that is not trusted")]
    HeadKeyUntrusted {
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
    /// The log ends before the expected head: records were cut off its end.
    #[error(
        "log ends at seq {last:?} but the expected head is at seq {expected}: records were truncated"
    )]
    Truncated {
        /// Sequence number of the expected head.
        expected: u64,
        /// Last sequence number present, if any.
        last: Option<u64>,
    },
    /// The record at the expected head's seq has another hash.
    #[error("record {seq} does not have the expected head hash: the log was rewritten")]
    ExpectedHeadMismatch {
        /// Sequence number of the expected head.
        seq: u64,
    },
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

/// Checks the whole chain: no gaps, each key holds its own record, records
/// parse and are canonical, each `prev_hash` is the hash of the record before,
/// and every signed head is well-formed, signed, vouches for the hash the
/// record before it really has, and (if `trusted_head_keys` is given) was
/// signed by one of those Ed25519 public keys.
///
/// Without trusted keys a head only proves that whoever signed it saw that
/// chain; pass the node's public key to rule out a re-signed rewrite.
/// Records after the last signed head can be cut off or edited undetectably
/// unless an external head is checked with [`verify_against`].
pub fn verify(
    store: &dyn Store,
    trusted_head_keys: Option<&[Vec<u8>]>,
) -> Result<VerifyReport, VerifyError> {
    run(store, trusted_head_keys, None)
}

/// Like [`verify`], and also checks that the log still reaches `expected`
/// (a head obtained earlier, out of band: a previous `verify` report, a
/// peer's copy, a SIEM export) with the same hash, which detects truncation
/// and edits of the tail.
pub fn verify_against(
    store: &dyn Store,
    trusted_head_keys: Option<&[Vec<u8>]>,
    expected: Head,
) -> Result<VerifyReport, VerifyError> {
    run(store, trusted_head_keys, Some(expected))
}

fn run(
    store: &dyn Store,
    trusted: Option<&[Vec<u8>]>,
    expected: Option<Head>,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let mut verifier = Verifier::new(trusted, expected.map(|h| h.seq));
    for entry in store.iter() {
        let (seq, bytes) = entry.map_err(|cause| VerifyError::Unreadable {
            after: verifier.last_seq(),
            cause,
        })?;
        verifier.feed(seq, &bytes)?;
    }
    verifier.finish(expected, started.elapsed())
}

/// Streaming chain checker. Fed records in key order; reports the first error.
struct Verifier<'a> {
    trusted: Option<&'a [Vec<u8>]>,
    next_seq: u64,
    /// Hash of the last record fed (what the next `prev_hash` must be).
    prev_hash: [u8; 32],
    /// A record whose `prev_hash` did not match; which of it and its
    /// predecessor was altered is decided by the record after it.
    pending_break: Option<u64>,
    records: u64,
    heads: u64,
    last_signed: Option<u64>,
    /// Seq of an expected head, and the hash found there.
    expected_seq: Option<u64>,
    expected_found: Option<[u8; 32]>,
}

impl<'a> Verifier<'a> {
    fn new(trusted: Option<&'a [Vec<u8>]>, expected_seq: Option<u64>) -> Self {
        Self {
            trusted,
            next_seq: 0,
            prev_hash: GENESIS_HASH,
            pending_break: None,
            records: 0,
            heads: 0,
            last_signed: None,
            expected_seq,
            expected_found: None,
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
            if seq == 0 {
                return Err(VerifyError::ChainBroken { seq });
            }
            self.pending_break = Some(seq);
        } else if record.kind == Kind::SignedHead {
            self.check_head(seq, &record)?;
        }
        self.prev_hash = hash;
        if self.expected_seq == Some(seq) {
            self.expected_found = Some(hash);
        }
        self.records += 1;
        self.next_seq = seq.saturating_add(1);
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
        if let Some(keys) = self.trusted
            && !keys.contains(&signed.public_key)
        {
            return Err(VerifyError::HeadKeyUntrusted { seq });
        }
        if !signed.signature_valid() {
            return Err(VerifyError::HeadSignatureInvalid { seq });
        }
        self.heads += 1;
        self.last_signed = Some(signed.head.seq);
        Ok(())
    }

    fn finish(
        self,
        expected: Option<Head>,
        elapsed: Duration,
    ) -> Result<VerifyReport, VerifyError> {
        if let Some(broken) = self.pending_break {
            return Err(Self::blame_without_successor(broken));
        }
        let last = self.last_seq();
        if let Some(expected) = expected {
            match self.expected_found {
                None => {
                    return Err(VerifyError::Truncated {
                        expected: expected.seq,
                        last,
                    });
                }
                Some(hash) if hash != expected.hash => {
                    return Err(VerifyError::ExpectedHeadMismatch { seq: expected.seq });
                }
                Some(_) => {}
            }
        }
        Ok(VerifyReport {
            records: self.records,
            heads: self.heads,
            last: last.map(|seq| Head {
                seq,
                hash: self.prev_hash,
            }),
            last_signed: self.last_signed,
            elapsed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::{Ed25519Signer, HeadSigner};
    use crate::log::AuditLog;
    use crate::store::MemoryStore;
    use ring::rand::SystemRandom;
    use ring::signature::Ed25519KeyPair;
    use serde_json::json;

    fn signer() -> Ed25519Signer {
        let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519Signer::from_pkcs8(der.as_ref()).unwrap()
    }

    /// Records 0..=3 events, 4 signed head, 5..=8 events, 9 signed head.
    fn build() -> (MemoryStore, Vec<u8>) {
        let store = MemoryStore::new();
        let signer = signer();
        let key = signer.public_key();
        let mut log = AuditLog::with_store(
            Box::new(store.clone()),
            "memory",
            "aggregator",
            Some(Box::new(signer)),
        )
        .unwrap();
        for round in 1..=2 {
            for i in 0..4 {
                log.append(Kind::PhaseCompleted, Some(round), None, json!({"phase": i}))
                    .unwrap();
            }
            log.append_signed_head(Some(round)).unwrap();
        }
        (store, key)
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
        let report = verify(&store, Some(&[key])).unwrap();
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
            (Edit(0), VerifyError::ChainBroken { seq: 0 }),
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
            assert_eq!(verify(&store, Some(&[key])).unwrap_err(), expected);
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
                let named = match verify(&store, Some(std::slice::from_ref(&key))) {
                    Err(
                        VerifyError::ChainBroken { seq }
                        | VerifyError::RecordInvalid { seq, .. }
                        | VerifyError::OutOfOrder { seq, .. },
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
            verify(&store, None),
            Err(VerifyError::RecordInvalid {
                seq: 3,
                source: RecordError::Malformed(_)
            })
        ));
        let (store, _) = build();
        apply(&store, &Corruption::RepointHead(9));
        assert!(matches!(
            verify(&store, None),
            Err(VerifyError::HeadMalformed { seq: 9, .. })
        ));
    }

    #[test]
    fn heads_by_untrusted_keys_are_rejected() {
        let (store, key) = build();
        let other = signer().public_key();
        assert_eq!(
            verify(&store, Some(std::slice::from_ref(&other))).unwrap_err(),
            VerifyError::HeadKeyUntrusted { seq: 4 }
        );
        assert!(verify(&store, Some(&[other, key])).is_ok());
    }

    #[test]
    fn tail_changes_need_an_expected_head() {
        let (store, _) = build();
        let head = verify(&store, None).unwrap().last.unwrap();
        store.tamper_remove(9).unwrap();
        store.tamper_remove(8).unwrap();
        // Truncation leaves a valid shorter chain...
        assert_eq!(verify(&store, None).unwrap().records, 8);
        // ...which the earlier head exposes.
        assert_eq!(
            verify_against(&store, None, head).unwrap_err(),
            VerifyError::Truncated {
                expected: 9,
                last: Some(7)
            }
        );

        let (store, _) = build();
        let head = verify(&store, None).unwrap().last.unwrap();
        // The last record is a signed head: change a field its signature does not cover.
        let mut last = read(&store, 9);
        last.round = Some(99);
        put(&store, &last);
        assert!(verify(&store, None).is_ok());
        assert_eq!(
            verify_against(&store, None, head).unwrap_err(),
            VerifyError::ExpectedHeadMismatch { seq: 9 }
        );
        let earlier = Head {
            seq: 3,
            hash: read(&store, 3).hash(),
        };
        assert!(verify_against(&store, None, earlier).is_ok());
    }

    #[test]
    fn empty_log_verifies_but_not_against_a_head() {
        let store = MemoryStore::new();
        let report = verify(&store, None).unwrap();
        assert_eq!((report.records, report.last), (0, None));
        assert_eq!(
            verify_against(
                &store,
                None,
                Head {
                    seq: 0,
                    hash: [0; 32]
                }
            )
            .unwrap_err(),
            VerifyError::Truncated {
                expected: 0,
                last: None
            }
        );
    }
}
