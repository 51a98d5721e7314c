//! Storage seam: an ordered map from sequence number to record bytes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend (disk, database) reported an error.
    #[error("{0}")]
    Backend(String),
    /// A record already exists at this sequence number; records are never overwritten.
    #[error("sequence number {seq} is already taken")]
    SeqTaken {
        /// The sequence number that was appended twice.
        seq: u64,
    },
    /// A stored key is not an 8-byte big-endian sequence number.
    #[error("stored key of {len} bytes is not an 8-byte sequence number")]
    KeyMalformed {
        /// Length of the offending key.
        len: usize,
    },
}

/// What [`Store::iter`] returns: `(seq, bytes)` in ascending seq order.
pub type StoreIter<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + 'a>;

/// An append-only map from sequence number to record bytes.
///
/// Implementations must iterate in ascending sequence order and must refuse
/// to overwrite an existing sequence number ([`StoreError::SeqTaken`]).
/// `append` need not be durable until `flush` returns.
pub trait Store {
    /// Stores `bytes` at `seq`, failing if `seq` is already present.
    fn append(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError>;
    /// Makes every earlier append durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// The bytes at `seq`, if present.
    fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every record, in ascending sequence order.
    fn iter(&self) -> StoreIter<'_>;
    /// The record with the highest sequence number, if any.
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Removes every record below `seq`: retention, once they are exported and the log has
    /// recorded it ([`crate::AuditLog::prune`]). Durable once `flush` returns.
    fn remove_before(&self, seq: u64) -> Result<(), StoreError>;
}

/// An in-memory [`Store`] for tests, fuzzing and imported exports.
/// Clones share the same records.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    records: Arc<Mutex<BTreeMap<u64, Vec<u8>>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, BTreeMap<u64, Vec<u8>>>, StoreError> {
        self.records
            .lock()
            .map_err(|_| StoreError::Backend("memory store lock poisoned".into()))
    }

    /// Overwrites or inserts `bytes` at `seq`, bypassing the append-only rule:
    /// for building damaged logs in tests.
    pub fn tamper_put(&self, seq: u64, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.lock()?.insert(seq, bytes);
        Ok(())
    }

    /// Removes the record at `seq`: for building damaged logs in tests.
    pub fn tamper_remove(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.remove(&seq))
    }
}

impl Store for MemoryStore {
    fn append(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let mut records = self.lock()?;
        if records.contains_key(&seq) {
            return Err(StoreError::SeqTaken { seq });
        }
        records.insert(seq, bytes.to_vec());
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.get(&seq).cloned())
    }

    fn iter(&self) -> StoreIter<'_> {
        // A snapshot, so no lock is held while the caller iterates.
        match self.lock() {
            Ok(records) => {
                let snapshot: Vec<_> = records.iter().map(|(k, v)| Ok((*k, v.clone()))).collect();
                Box::new(snapshot.into_iter())
            }
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self.lock()?.last_key_value().map(|(k, v)| (*k, v.clone())))
    }

    fn remove_before(&self, seq: u64) -> Result<(), StoreError> {
        let mut records = self.lock()?;
        let kept = records.split_off(&seq);
        *records = kept;
        Ok(())
    }
}

/// Which operation a [`FailingStore`] breaks.
#[cfg(any(test, feature = "failing-store"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOn {
    /// Appends past the limit fail and write nothing.
    Append,
    /// Appends past the limit are written, but the flush after them fails
    /// (a disk that accepts a write and then cannot sync it).
    Flush,
}

/// A store that behaves like its inner store for `ok_appends` appends and
/// then fails, to prove that a node stops rather than act unaudited.
#[cfg(any(test, feature = "failing-store"))]
#[derive(Debug)]
pub struct FailingStore<S> {
    inner: S,
    ok_appends: u64,
    fail_on: FailOn,
    appends: Mutex<u64>,
}

#[cfg(any(test, feature = "failing-store"))]
impl<S: Store> FailingStore<S> {
    /// Wraps `inner`; the first `ok_appends` appends (and their flushes) succeed.
    pub fn new(inner: S, ok_appends: u64, fail_on: FailOn) -> Self {
        Self {
            inner,
            ok_appends,
            fail_on,
            appends: Mutex::new(0),
        }
    }

    fn past_limit(&self) -> Result<bool, StoreError> {
        let appends = self
            .appends
            .lock()
            .map_err(|_| StoreError::Backend("failing store lock poisoned".into()))?;
        Ok(*appends > self.ok_appends)
    }

    fn injected() -> StoreError {
        StoreError::Backend("simulated disk failure".into())
    }
}

#[cfg(any(test, feature = "failing-store"))]
impl<S: Store> Store for FailingStore<S> {
    fn append(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        {
            let mut appends = self
                .appends
                .lock()
                .map_err(|_| StoreError::Backend("failing store lock poisoned".into()))?;
            *appends += 1;
            if *appends > self.ok_appends && self.fail_on == FailOn::Append {
                return Err(Self::injected());
            }
        }
        self.inner.append(seq, bytes)
    }

    fn flush(&self) -> Result<(), StoreError> {
        if self.fail_on == FailOn::Flush && self.past_limit()? {
            return Err(Self::injected());
        }
        self.inner.flush()
    }

    fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(seq)
    }

    fn iter(&self) -> StoreIter<'_> {
        self.inner.iter()
    }

    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.inner.last()
    }

    fn remove_before(&self, seq: u64) -> Result<(), StoreError> {
        self.inner.remove_before(seq)
    }
}
