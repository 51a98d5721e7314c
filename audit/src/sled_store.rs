//! The sled [`Store`]: how nodes keep their logs on disk.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::Error;
use crate::sled_lock::{self, LockWaitError, Registration, wait_unlocked};
use crate::store::{Store, StoreError, StoreIter};

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

    fn remove_before(&self, seq: u64) -> Result<(), StoreError> {
        // One batch: sled applies it atomically, so a crash leaves all or none removed.
        let mut batch = sled::Batch::default();
        for key in self.db.range(..seq.to_be_bytes()).keys() {
            batch.remove(key.map_err(backend)?);
        }
        self.db.apply_batch(batch).map_err(backend)
    }
}
