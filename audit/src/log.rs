//! The writer: appends records durably and signs heads.

use std::fmt;
#[cfg(feature = "node")]
use std::path::Path;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Error;
use crate::head::{Head, SignedHead};
use crate::keys::{AuditKey, KeyRecord, endorsement_valid, fingerprint};
#[cfg(feature = "node")]
use crate::mirror::{Mirror, mirror_path};
#[cfg(feature = "node")]
use crate::query::{export_line, records};
use crate::record::{GENESIS_HASH, Kind, MAX_EXACT_INTEGER, Record, chain_hash, check_exact};
#[cfg(feature = "node")]
use crate::retention::{Pruned, start_of};
#[cfg(feature = "node")]
use crate::sled_store::SledStore;
use crate::store::Store;
use crate::verify::{Checks, verify};

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
    key: Option<AuditKey>,
    /// The public key the log's `audit_key` records put in force.
    in_force: Option<Vec<u8>>,
    head: Option<Head>,
    #[cfg(feature = "node")]
    mirror: Option<Mirror>,
    failure: Option<String>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("location", &self.location)
            .field("actor", &self.actor)
            .field("key", &self.key.as_ref().map(AuditKey::fingerprint))
            .field("head", &self.head)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or creates) the sled log at `path`, verifies its whole chain and resumes it.
    ///
    /// `actor` is written into every record (`"aggregator"`, `"site:alpha"`). With a `key`, the
    /// log signs heads with it: a new log records the key as its first record, and a log whose
    /// key in force is another one takes the new key only with that key's endorsement
    /// ([`AuditKey::generate`]). The log also keeps a live JSONL copy at [`mirror_path`], which
    /// auditors can read while the node runs.
    #[cfg(feature = "node")]
    pub fn open(
        path: impl AsRef<Path>,
        actor: impl Into<String>,
        key: Option<AuditKey>,
    ) -> Result<Self, Error> {
        let path = path.as_ref();
        let store = SledStore::open(path)?;
        let location = path.display().to_string();
        let mut log = Self::resume(Box::new(store), location, actor.into(), key)?;
        log.mirror = Some(Mirror::rebuild(&mirror_path(path), &*log.store)?);
        log.put_key_in_force()?;
        Ok(log)
    }

    /// Like [`AuditLog::open`] over any store, without a mirror; `location` names it in errors.
    pub fn with_store(
        store: BoxedStore,
        location: impl Into<String>,
        actor: impl Into<String>,
        key: Option<AuditKey>,
    ) -> Result<Self, Error> {
        let mut log = Self::resume(store, location.into(), actor.into(), key)?;
        log.put_key_in_force()?;
        Ok(log)
    }

    fn resume(
        store: BoxedStore,
        location: String,
        actor: String,
        key: Option<AuditKey>,
    ) -> Result<Self, Error> {
        let report = verify(&*store, &Checks::default()).map_err(|error| Error::LogDamaged {
            location: location.clone(),
            error,
        })?;
        if let Some(found) = report.actor.filter(|found| *found != actor) {
            return Err(Error::ActorMismatch {
                location,
                found,
                actor,
            });
        }
        Ok(Self {
            store,
            location,
            actor,
            key,
            in_force: report.key,
            head: report.last,
            #[cfg(feature = "node")]
            mirror: None,
            failure: None,
        })
    }

    /// Records this log's key as the one in force, unless it already is: the first key of a
    /// log, or a rotation the key in force endorsed.
    fn put_key_in_force(&mut self) -> Result<(), Error> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        let public_key = key.public_key();
        let rotation = match &self.in_force {
            Some(old) if *old == public_key => return Ok(()),
            None => None,
            Some(old) => {
                let refused = |why: &str| Error::KeyChanged {
                    location: self.location.clone(),
                    in_force: fingerprint(old),
                    offered: key.fingerprint(),
                    why: why.to_owned(),
                };
                let endorsement = key
                    .endorsement
                    .as_ref()
                    .ok_or_else(|| refused("it has no endorsement file beside it"))?;
                let signature = hex::decode(&endorsement.signature)
                    .ok()
                    .filter(|sig| endorsement_valid(old, &public_key, sig))
                    .ok_or_else(|| refused("its endorsement is not signed by the key in force"))?;
                Some((fingerprint(old), signature))
            }
        };
        let details = KeyRecord {
            public_key: public_key.clone(),
            rotation,
        }
        .to_details();
        self.append_record(Kind::AuditKey, None, None, details)?;
        self.in_force = Some(public_key);
        Ok(())
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
    /// `signed_head` and `audit_key` records are written only by the log itself
    /// ([`AuditLog::append_signed_head`], opening with a key); a `witness` record's details must
    /// be a head with a valid signature ([`SignedHead::to_details`] plus a `"node"`), since an
    /// invalid one would break this log's own verification.
    pub fn append(
        &mut self,
        kind: Kind,
        round: Option<u32>,
        site: Option<&str>,
        details: Value,
    ) -> Result<u64, Error> {
        match kind {
            Kind::SignedHead | Kind::AuditKey | Kind::Pruned => {
                return Err(Error::KindReserved(kind));
            }
            Kind::Witness => {
                let valid = SignedHead::from_details(&details).is_ok_and(|h| h.signature_valid());
                if !valid || details.get("node").and_then(Value::as_str).is_none() {
                    return Err(Error::WitnessInvalid);
                }
            }
            _ => {}
        }
        self.append_record(kind, round, site, details)
    }

    /// Retention: writes the records below `before` to a new file `export` (JSONL, as
    /// [`crate::export_jsonl`], synced), appends a `pruned` record naming them, the export's
    /// SHA-256, the hash of the last one and the audit key in force after it, signs a head,
    /// and only then removes them from the store. What is left verifies on its own; the
    /// export verifies as the log's beginning. Needs the log's key; holds the removed range
    /// in memory while it works.
    #[cfg(feature = "node")]
    pub fn prune(&mut self, before: u64, export: &Path) -> Result<Pruned, Error> {
        let location = self.location.clone();
        if self.key.is_none() {
            return Err(Error::HeadSignerMissing { location });
        }
        // Opening verified the whole chain, and only this writer has appended since.
        let last = self.head.ok_or(Error::LogEmpty {
            location: location.clone(),
        })?;
        let start = start_of(&*self.store);
        // The record an earlier prune left goes too, or the new export could not verify alone.
        let first = start.as_ref().map_or(0, |(seq, _)| *seq);
        if before <= first || before > last.seq {
            return Err(Error::PruneRange {
                location,
                before,
                first,
                last: last.seq,
            });
        }
        let mut key = start.and_then(|(_, p)| p.public_key);
        let mut bytes = Vec::new();
        let mut last_hash = GENESIS_HASH;
        for record in records(&*self.store) {
            let record = record?;
            if record.seq >= before {
                break;
            }
            if record.kind == Kind::AuditKey {
                key = KeyRecord::from_details(&record.details)
                    .ok()
                    .map(|k| k.public_key);
            }
            last_hash = record.hash();
            bytes.extend_from_slice(export_line(&record).as_bytes());
            bytes.push(b'\n');
        }
        quorum_durable::create_new(export, &bytes, quorum_durable::Mode::Public)
            .map_err(Error::ExportWriteFailed)?;
        let mut export_sha256 = [0; 32];
        export_sha256.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
        let pruned = Pruned {
            from: first,
            to: before - 1,
            export_sha256,
            last_hash,
            public_key: key,
        };
        self.append_record(Kind::Pruned, None, None, pruned.to_details())?;
        self.append_signed_head(None)?;
        if let Err(e) = self
            .store
            .remove_before(before)
            .and_then(|()| self.store.flush())
        {
            self.failure = Some(e.to_string());
            return Err(self.store_failed(e.to_string()));
        }
        if let Some(mirror) = &self.mirror {
            self.mirror = Some(Mirror::rebuild(&mirror.path.clone(), &*self.store)?);
        }
        Ok(pruned)
    }

    /// Appends a record, then a signed head over it: an act that must be vouched for at once
    /// (an authority's act, a stop). Returns the head.
    pub fn append_and_sign(
        &mut self,
        kind: Kind,
        site: Option<&str>,
        details: Value,
    ) -> Result<SignedHead, Error> {
        self.append(kind, None, site, details)?;
        self.append_signed_head(None)
    }

    /// Signs the current head, appends it as a `signed_head` record and returns it (for
    /// other nodes to witness).
    pub fn append_signed_head(&mut self, round: Option<u32>) -> Result<SignedHead, Error> {
        let location = || self.location.clone();
        let key = self.key.as_ref().ok_or_else(|| Error::HeadSignerMissing {
            location: location(),
        })?;
        let head = self.head.ok_or_else(|| Error::LogEmpty {
            location: location(),
        })?;
        let signed = SignedHead::sign(head, key);
        self.append_record(Kind::SignedHead, round, None, signed.to_details())?;
        Ok(signed)
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
                // Sequence numbers stay within what RFC 8785 encodes exactly.
                let seq = Some(head.seq + 1)
                    .filter(|&seq| seq <= MAX_EXACT_INTEGER)
                    .ok_or_else(|| Error::SeqExhausted {
                        location: self.location.clone(),
                    })?;
                (seq, head.hash)
            }
        };
        check_exact(&details).map_err(|e| Error::DetailsInexact { kind, reason: e })?;
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
        #[cfg(feature = "node")]
        if let Some(mirror) = &mut self.mirror
            && let Err(e) = mirror.append(&record)
        {
            let cause = format!(
                "the live copy {} could not be written: {e}",
                mirror.path.display()
            );
            self.failure = Some(cause.clone());
            return Err(self.store_failed(cause));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::AuditKey;
    use crate::store::{FailOn, FailingStore, MemoryStore};
    use crate::verify::{Checks, VerifyError, verify};
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
        assert_eq!(verify(&mem, &Checks::default()).unwrap().records, 3);
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
            Err(Error::KindReserved(Kind::SignedHead))
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
        assert_eq!(verify(&mem, &Checks::default()).unwrap().records, 3);
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
        let original = mem.get(1).unwrap().unwrap();
        let mut altered = Record::from_canonical(&original).unwrap();
        altered.actor = "mallory".into();
        mem.tamper_put(1, altered.canonical_bytes()).unwrap();
        let err =
            AuditLog::with_store(Box::new(mem.clone()), "memory", "site:alpha", None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LogDamaged {
                    error: VerifyError::ActorChanged { seq: 1, .. },
                    ..
                }
            ),
            "{err}"
        );

        // Last record moved to another key.
        mem.tamper_put(1, original).unwrap();
        let last = mem.tamper_remove(2).unwrap().unwrap();
        mem.tamper_put(5, last).unwrap();
        let err = AuditLog::with_store(Box::new(mem), "memory", "site:alpha", None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LogDamaged {
                    error: VerifyError::Gap { seq: 2 },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn another_nodes_log_is_refused() {
        let mem = MemoryStore::new();
        log_over(Box::new(mem.clone()))
            .append(Kind::Start, None, None, json!({}))
            .unwrap();
        let err = AuditLog::with_store(Box::new(mem), "memory", "aggregator", None).unwrap_err();
        assert!(matches!(err, Error::ActorMismatch { .. }), "{err}");
    }

    #[test]
    fn first_record_is_the_key_and_witnesses_must_be_signed() {
        let mem = MemoryStore::new();
        let key = AuditKey::ephemeral();
        let fingerprint = key.fingerprint();
        let mut log =
            AuditLog::with_store(Box::new(mem.clone()), "memory", "aggregator", Some(key)).unwrap();
        let first = Record::from_canonical(&mem.get(0).unwrap().unwrap()).unwrap();
        assert_eq!(
            (first.kind, first.details["fingerprint"].as_str()),
            (Kind::AuditKey, Some(fingerprint.as_str()))
        );
        let mut signed = log.append_signed_head(Some(1)).unwrap().to_details();
        assert!(matches!(
            log.append(Kind::Witness, Some(1), None, signed.clone()),
            Err(Error::WitnessInvalid)
        ));
        signed["node"] = json!("site:alpha");
        log.append(Kind::Witness, Some(1), None, signed.clone())
            .unwrap();
        signed["head_seq"] = json!(5);
        assert!(matches!(
            log.append(Kind::Witness, Some(1), None, signed),
            Err(Error::WitnessInvalid)
        ));
        assert!(matches!(
            log.append(Kind::AuditKey, None, None, json!({})),
            Err(Error::KindReserved(Kind::AuditKey))
        ));
        assert!(matches!(
            log.append(Kind::Join, None, None, json!({"n": u64::MAX})),
            Err(Error::DetailsInexact { .. })
        ));
        let report = verify(&mem, &Checks::trusting(fingerprint)).unwrap();
        assert_eq!((report.records, report.heads), (3, 1));
    }
}
