//! The writer: appends records durably and signs heads.

use std::fmt;
use std::path::Path;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Error;
use crate::head::{Head, HeadSigner, SignedHead};
use crate::record::{GENESIS_HASH, Kind, Record, chain_hash};
use crate::store::{SledStore, Store};

/// A store the log can own and hand to other threads.
pub type BoxedStore = Box<dyn Store + Send + Sync>;

/// An open audit log that appends records to the end of its chain.
///
/// Every append is flushed before it returns, so a caller that acknowledges
/// an action only after `append` succeeds never acknowledges an unaudited one.
/// After the store fails once, every later append fails too: the node must stop.
pub struct AuditLog {
    store: BoxedStore,
    location: String,
    actor: String,
    signer: Option<Box<dyn HeadSigner>>,
    head: Option<Head>,
    failure: Option<String>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("location", &self.location)
            .field("actor", &self.actor)
            .field("signs_heads", &self.signer.is_some())
            .field("head", &self.head)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or creates) the sled log at `path` and resumes its chain.
    ///
    /// `actor` is written into every record (`"aggregator"`, `"site:alpha"`).
    /// Fails with [`Error::TailDamaged`] if the last record does not parse or
    /// does not link to the one before it.
    pub fn open(
        path: impl AsRef<Path>,
        actor: impl Into<String>,
        signer: Option<Box<dyn HeadSigner>>,
    ) -> Result<Self, Error> {
        let path = path.as_ref();
        let store = SledStore::open(path)?;
        Self::with_store(Box::new(store), path.display().to_string(), actor, signer)
    }

    /// Like [`AuditLog::open`] over any store; `location` names it in errors.
    pub fn with_store(
        store: BoxedStore,
        location: impl Into<String>,
        actor: impl Into<String>,
        signer: Option<Box<dyn HeadSigner>>,
    ) -> Result<Self, Error> {
        let location = location.into();
        let head = resume(&*store, &location)?;
        Ok(Self {
            store,
            location,
            actor: actor.into(),
            signer,
            head,
            failure: None,
        })
    }

    /// The last record written, if any.
    pub fn head(&self) -> Option<Head> {
        self.head
    }

    /// The store, for verifying or querying the open log.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// Appends a record stamped with the current UTC time and returns its seq.
    /// It is durable when this returns `Ok`.
    ///
    /// `signed_head` records are written only by [`AuditLog::append_signed_head`].
    pub fn append(
        &mut self,
        kind: Kind,
        round: Option<u32>,
        site: Option<&str>,
        details: Value,
    ) -> Result<u64, Error> {
        if kind == Kind::SignedHead {
            return Err(Error::KindReserved);
        }
        self.append_record(kind, round, site, details)
    }

    /// Signs the current head and appends it as a `signed_head` record.
    pub fn append_signed_head(&mut self, round: Option<u32>) -> Result<u64, Error> {
        let location = || self.location.clone();
        let signer = self
            .signer
            .as_deref()
            .ok_or_else(|| Error::HeadSignerMissing {
                location: location(),
            })?;
        let head = self.head.ok_or_else(|| Error::LogEmpty {
            location: location(),
        })?;
        let details = SignedHead::sign(head, signer).to_details();
        self.append_record(Kind::SignedHead, round, None, details)
    }

    fn append_record(
        &mut self,
        kind: Kind,
        round: Option<u32>,
        site: Option<&str>,
        details: Value,
    ) -> Result<u64, Error> {
        if let Some(cause) = &self.failure {
            return Err(self.store_failed(format!("an earlier write failed ({cause})")));
        }
        let (seq, prev_hash) = match self.head {
            None => (0, GENESIS_HASH),
            Some(head) => {
                let seq = head.seq.checked_add(1).ok_or_else(|| Error::SeqExhausted {
                    location: self.location.clone(),
                })?;
                (seq, head.hash)
            }
        };
        let time = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .map_err(|e| Error::ClockUnformattable(e.to_string()))?;
        let record = Record {
            seq,
            time,
            actor: self.actor.clone(),
            kind,
            round,
            site: site.map(str::to_owned),
            details,
            prev_hash,
        };
        let bytes = record.canonical_bytes();
        if let Err(e) = self
            .store
            .append(seq, &bytes)
            .and_then(|()| self.store.flush())
        {
            // Whether the record reached the disk is now unknown: stop for good.
            self.failure = Some(e.to_string());
            return Err(self.store_failed(e.to_string()));
        }
        self.head = Some(Head {
            seq,
            hash: chain_hash(&prev_hash, &bytes),
        });
        Ok(seq)
    }

    fn store_failed(&self, cause: String) -> Error {
        Error::StoreFailed {
            location: self.location.clone(),
            cause,
        }
    }
}

/// Finds the head to continue from, checking that the last record parses,
/// sits at its own seq and links to the record before it.
fn resume(store: &dyn Store, location: &str) -> Result<Option<Head>, Error> {
    let unreadable = |e: crate::StoreError| Error::OpenFailed {
        location: location.to_owned(),
        cause: e.to_string(),
    };
    let Some((seq, bytes)) = store.last().map_err(unreadable)? else {
        return Ok(None);
    };
    let damaged = |reason: String| Error::TailDamaged {
        location: location.to_owned(),
        seq,
        reason,
    };
    let record = Record::from_canonical(&bytes).map_err(|e| damaged(e.to_string()))?;
    if record.seq != seq {
        return Err(damaged(format!(
            "it holds the record for seq {}",
            record.seq
        )));
    }
    let expected_prev = match seq.checked_sub(1) {
        None => GENESIS_HASH,
        Some(prev_seq) => {
            let prev = store
                .get(prev_seq)
                .map_err(unreadable)?
                .ok_or_else(|| damaged(format!("record {prev_seq} before it is missing")))?;
            let prev_record = Record::from_canonical(&prev)
                .map_err(|e| damaged(format!("record {prev_seq} before it: {e}")))?;
            chain_hash(&prev_record.prev_hash, &prev)
        }
    };
    if record.prev_hash != expected_prev {
        return Err(damaged(
            "its prev_hash does not match the record before it".into(),
        ));
    }
    Ok(Some(Head {
        seq,
        hash: chain_hash(&record.prev_hash, &bytes),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FailOn, FailingStore, MemoryStore};
    use crate::verify::verify;
    use serde_json::json;

    fn log_over(store: BoxedStore) -> AuditLog {
        AuditLog::with_store(store, "memory", "site:alpha", None).unwrap()
    }

    fn failing_run(fail_on: FailOn) -> (MemoryStore, AuditLog) {
        let mem = MemoryStore::new();
        let mut log = log_over(Box::new(FailingStore::new(mem.clone(), 3, fail_on)));
        for i in 0..3 {
            assert_eq!(
                log.append(Kind::Join, Some(1), None, json!({"i": i}))
                    .unwrap(),
                i
            );
        }
        let err = log
            .append(Kind::Join, Some(1), None, json!({}))
            .unwrap_err();
        assert!(matches!(err, Error::StoreFailed { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("memory") && text.contains("refusing to continue unaudited"),
            "{text}"
        );
        (mem, log)
    }

    #[test]
    fn failed_append_stops_the_log() {
        let (mem, mut log) = failing_run(FailOn::Append);
        // The store would accept this write again; the log must not try.
        let later = log.append(Kind::Stop, None, None, json!({})).unwrap_err();
        assert!(matches!(later, Error::StoreFailed { .. }));
        assert!(later.to_string().contains("an earlier write failed"));
        assert_eq!(mem.iter().count(), 3);
        assert_eq!(verify(&mem, None).unwrap().records, 3);
    }

    #[test]
    fn failed_flush_stops_the_log() {
        let (mem, mut log) = failing_run(FailOn::Flush);
        // The unflushed record reached the store; nothing after it does.
        assert_eq!(mem.iter().count(), 4);
        assert!(log.append_signed_head(None).is_err());
        assert!(log.append(Kind::Stop, None, None, json!({})).is_err());
        assert_eq!(mem.iter().count(), 4);
    }

    #[test]
    fn log_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<AuditLog>();
    }

    #[test]
    fn signed_head_is_reserved_and_needs_a_signer() {
        let mut log = log_over(Box::new(MemoryStore::new()));
        assert!(matches!(
            log.append(Kind::SignedHead, None, None, json!({})),
            Err(Error::KindReserved)
        ));
        assert!(matches!(
            log.append_signed_head(None),
            Err(Error::HeadSignerMissing { .. })
        ));
        assert!(log.store().last().unwrap().is_none());
    }

    #[test]
    fn resume_continues_from_the_stored_head() {
        let mem = MemoryStore::new();
        let mut first = log_over(Box::new(mem.clone()));
        first.append(Kind::Start, None, None, json!({})).unwrap();
        first
            .append(Kind::Join, Some(1), Some("beta"), json!({}))
            .unwrap();
        let head = first.head().unwrap();
        drop(first);
        let mut second = log_over(Box::new(mem.clone()));
        assert_eq!(second.head(), Some(head));
        assert_eq!(second.append(Kind::Stop, None, None, json!({})).unwrap(), 2);
        assert_eq!(verify(&mem, None).unwrap().records, 3);
    }

    #[test]
    fn resume_refuses_a_broken_tail() {
        let mem = MemoryStore::new();
        let mut log = log_over(Box::new(mem.clone()));
        for _ in 0..3 {
            log.append(Kind::Join, None, None, json!({})).unwrap();
        }
        drop(log);
        // Record 1 altered: record 2 no longer links to it.
        let mut altered = Record::from_canonical(&mem.get(1).unwrap().unwrap()).unwrap();
        altered.actor = "mallory".into();
        mem.tamper_put(1, altered.canonical_bytes()).unwrap();
        let err = AuditLog::with_store(Box::new(mem.clone()), "memory", "x", None).unwrap_err();
        assert!(matches!(err, Error::TailDamaged { seq: 2, .. }), "{err}");

        // Last record moved to another key.
        let last = mem.tamper_remove(2).unwrap().unwrap();
        mem.tamper_put(5, last).unwrap();
        let err = AuditLog::with_store(Box::new(mem), "memory", "x", None).unwrap_err();
        assert!(matches!(err, Error::TailDamaged { seq: 5, .. }), "{err}");
    }
}
