//! Storage seam: an ordered map from sequence number to record bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::Error;
use crate::sled_lock::{self, LockWaitError, Registration, wait_unlocked};

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
}

/// How hard [`SledStore::flush`] pushes records to the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// sled's flush, then `fdatasync` on sled's data file: survives a power
    /// cut. On Linux sled's own flush is only `sync_file_range`, which flushes
    /// neither the drive's write cache nor the file's new size.
    #[default]
    SyncData,
    /// sled's flush only: survives a crash of the process, maybe not a power cut.
    SledFlush,
}

/// A [`Store`] in a sled database: key = sequence number as 8 big-endian
/// bytes (so sled's byte order is numeric order), value = record bytes.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    /// sled's data file, synced after each flush under [`Durability::SyncData`].
    sync_file: Option<Arc<File>>,
    /// Marks the database open in this process while any clone lives.
    _registration: Arc<Registration>,
}

impl SledStore {
    /// Opens the database at `path`, creating it if absent (for writers),
    /// with [`Durability::SyncData`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with(path, Durability::default())
    }

    /// Opens the database at `path`, creating it if absent.
    ///
    /// A database that was just closed in this process (sled releases its
    /// file lock a moment after the last handle is dropped) or by a process
    /// that is exiting is waited for; one held by a live handle or a running
    /// process fails with [`Error::LogLocked`], naming the holder.
    pub fn open_with(path: impl AsRef<Path>, durability: Durability) -> Result<Self, Error> {
        let path = path.as_ref();
        let failed = |cause: String| Error::OpenFailed {
            location: path.display().to_string(),
            cause,
        };
        let db = loop {
            Self::wait_until_closed(path)?;
            match sled::open(path) {
                Ok(db) => break db,
                // Taken between the probe and sled's own attempt: wait again.
                Err(_) if sled_lock::is_locked(&path.join("db")).unwrap_or(false) => {}
                Err(e) => return Err(failed(e.to_string())),
            }
        };
        let sync_file = match durability {
            Durability::SledFlush => None,
            Durability::SyncData => {
                // sled keeps its whole log in this one file.
                let file = File::open(path.join("db")).map_err(|e| failed(e.to_string()))?;
                // Make the (possibly new) file's directory entry durable too.
                #[cfg(unix)]
                File::open(path)
                    .and_then(|dir| dir.sync_all())
                    .map_err(|e| failed(e.to_string()))?;
                Some(Arc::new(file))
            }
        };
        let registration = Arc::new(Registration::new(path));
        Ok(Self {
            db,
            sync_file,
            _registration: registration,
        })
    }

    /// Waits, as [`SledStore::open`] does, until nobody holds the lock on the
    /// sled database at `path`: for tools that open the database directly.
    pub fn wait_until_closed(path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        wait_unlocked(path).map_err(|e| lock_error(path, e))
    }

    /// Opens an existing database at `path` (for auditors: a mistyped path
    /// must not read as an empty, valid log).
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        if !path.join("db").is_file() {
            return Err(Error::LogMissing {
                location: path.display().to_string(),
            });
        }
        Self::open(path)
    }
}

fn lock_error(path: &Path, e: LockWaitError) -> Error {
    let location = path.display().to_string();
    match e {
        LockWaitError::Held { holder, waited } => Error::LogLocked {
            location,
            holder: holder.to_string(),
            waited_ms: waited.as_millis(),
        },
        LockWaitError::Io(e) => Error::OpenFailed {
            location,
            cause: format!("cannot probe the lock: {e}"),
        },
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<(u64, Vec<u8>), StoreError> {
    let seq: [u8; 8] = key
        .try_into()
        .map_err(|_| StoreError::KeyMalformed { len: key.len() })?;
    Ok((u64::from_be_bytes(seq), value.to_vec()))
}

impl Store for SledStore {
    fn append(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        match self
            .db
            .compare_and_swap(seq.to_be_bytes(), None::<&[u8]>, Some(bytes))
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(StoreError::SeqTaken { seq }),
            Err(e) => Err(backend(e)),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        match &self.sync_file {
            Some(file) => file
                .sync_data()
                .map_err(|e| StoreError::Backend(format!("fdatasync failed: {e}"))),
            None => Ok(()),
        }
    }

    fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get(seq.to_be_bytes())
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(backend)
    }

    fn iter(&self) -> StoreIter<'_> {
        Box::new(self.db.iter().map(|entry| {
            entry
                .map_err(backend)
                .and_then(|(k, v)| decode_entry(&k, &v))
        }))
    }

    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        match self.db.last().map_err(backend)? {
            Some((k, v)) => decode_entry(&k, &v).map(Some),
            None => Ok(None),
        }
    }
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
}
