//! Waiting for sled's file lock.
//!
//! sled takes an exclusive `flock` on `<dir>/db` when it opens a database and
//! releases it only when its background flusher thread lets go of the
//! database: up to one flush interval (500 ms), more on a loaded machine,
//! after the last handle was dropped. A node restarted in the same process, a
//! test, or an auditor that reopens a log right after it was closed would
//! otherwise fail at random with "could not acquire lock ... WouldBlock".
//!
//! So [`SledStore::open`](crate::SledStore::open) waits, and how long depends
//! on who holds the lock:
//!
//! | holder | wait |
//! |---|---|
//! | a live handle in this process | none: a second writer is a bug |
//! | this process, no live handle (sled's threads finishing) | [`CLOSING_WAIT`] |
//! | another process | [`OTHER_PROCESS_WAIT`], then an error naming it |
//! | unknown (no `/proc/locks`) | [`CLOSING_WAIT`] |

use std::collections::BTreeSet;
use std::fs::{File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long to wait for sled's threads in this process to release a closed
/// database. Generous: a loaded machine can delay them by seconds.
pub(crate) const CLOSING_WAIT: Duration = Duration::from_secs(30);

/// How long to wait for another process: one that is exiting (a node being
/// restarted) releases its lock within moments; one that keeps running won't.
pub(crate) const OTHER_PROCESS_WAIT: Duration = Duration::from_secs(2);

/// Databases this process has open through a live `SledStore`, by canonical path.
static OPEN_HERE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn with_open_here<T>(f: impl FnOnce(&mut BTreeSet<PathBuf>) -> T) -> T {
    f(&mut OPEN_HERE.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Marks a database as open in this process until dropped. `SledStore` clones
/// share one registration, so it ends with the last handle.
#[derive(Debug)]
pub(crate) struct Registration(Option<PathBuf>);

impl Registration {
    pub(crate) fn new(dir: &Path) -> Self {
        let canonical = dir.canonicalize().ok();
        if let Some(path) = &canonical {
            with_open_here(|open| open.insert(path.clone()));
        }
        Self(canonical)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            with_open_here(|open| open.remove(path));
        }
    }
}

/// Who holds the lock on a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Holder {
    /// A `SledStore` in this process still has it open.
    OpenHere,
    /// This process, with no live handle: sled's threads are still closing it.
    Closing,
    /// Another process, by pid and name (`/proc/<pid>/comm`).
    Process { pid: u32, name: String },
    /// Someone: the platform does not say who.
    Unknown,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OpenHere => f.write_str("this process, which already has it open"),
            Self::Closing => f.write_str("this process, still closing an earlier handle"),
            Self::Process { pid, name } => write!(f, "process {pid} ({name})"),
            Self::Unknown => f.write_str("another process"),
        }
    }
}

/// Why the lock could not be had.
#[derive(Debug)]
pub(crate) enum LockWaitError {
    /// Still held after waiting `waited`.
    Held { holder: Holder, waited: Duration },
    /// The lock file could not be probed.
    Io(io::Error),
}

/// Whether some open file description holds an exclusive or shared flock on
/// `db_file`. Probing takes the lock for an instant and releases it.
pub(crate) fn is_locked(db_file: &Path) -> io::Result<bool> {
    let file = match File::open(db_file) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => Ok(false), // released when `file` is dropped
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Who holds the lock on `db_file` right now.
fn holder(dir: &Path, db_file: &Path) -> Holder {
    let open_here = dir
        .canonicalize()
        .is_ok_and(|path| with_open_here(|open| open.contains(&path)));
    if open_here {
        return Holder::OpenHere;
    }
    match flock_holder_pid(db_file) {
        Some(pid) if pid == std::process::id() => Holder::Closing,
        Some(pid) => Holder::Process {
            pid,
            name: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|name| name.trim().to_string())
                .unwrap_or_else(|_| "name unknown".into()),
        },
        None => Holder::Unknown,
    }
}

/// The pid that `/proc/locks` names for a flock on `db_file`'s inode (Linux only).
fn flock_holder_pid(db_file: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(db_file).ok()?.ino();
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        parse_proc_locks(&locks, inode)
    }
    #[cfg(not(unix))]
    {
        let _ = db_file;
        None
    }
}

/// From `/proc/locks` lines such as
/// `1: FLOCK  ADVISORY  WRITE 4242 08:01:131090 0 EOF`, the pid holding a
/// flock on `inode` (device ignored: inode collisions across devices only
/// make the error message name the wrong process).
fn parse_proc_locks(locks: &str, inode: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts "1: ->"; skip it.
        let [_, kind, _, _, pid, dev_inode, ..] = fields.as_slice() else {
            return None;
        };
        let line_inode: u64 = dev_inode.rsplit(':').next()?.parse().ok()?;
        (*kind == "FLOCK" && line_inode == inode)
            .then(|| pid.parse().ok())
            .flatten()
    })
}

/// Waits until nobody holds sled's lock on the database in `dir`, for as long
/// as the holder warrants (see the module docs).
pub(crate) fn wait_unlocked(dir: &Path) -> Result<(), LockWaitError> {
    let db_file = dir.join("db");
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if !is_locked(&db_file).map_err(LockWaitError::Io)? {
            return Ok(());
        }
        let holder = holder(dir, &db_file);
        let limit = match holder {
            Holder::OpenHere => Duration::ZERO,
            Holder::Process { .. } => OTHER_PROCESS_WAIT,
            Holder::Closing | Holder::Unknown => CLOSING_WAIT,
        };
        let waited = start.elapsed();
        if waited >= limit {
            return Err(LockWaitError::Held { holder, waited });
        }
        std::thread::sleep(pause.min(limit - waited));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS: &str = "\
1: POSIX  ADVISORY  WRITE 100 00:2a:555 0 EOF
2: FLOCK  ADVISORY  WRITE 4242 08:01:131090 0 EOF
2: -> FLOCK  ADVISORY  WRITE 4343 08:01:131090 0 EOF
3: FLOCK  ADVISORY  WRITE 77 08:01:999 0 EOF
";

    #[test]
    fn proc_locks_names_the_flock_holder_of_an_inode() {
        assert_eq!(parse_proc_locks(LOCKS, 131090), Some(4242));
        assert_eq!(parse_proc_locks(LOCKS, 999), Some(77));
        // A POSIX lock on the inode is not sled's flock.
        assert_eq!(parse_proc_locks(LOCKS, 555), None);
        assert_eq!(parse_proc_locks(LOCKS, 1), None);
    }

    #[test]
    fn a_live_handle_in_this_process_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let _db = sled::open(&path).unwrap();
        let _registration = Registration::new(&path);
        match wait_unlocked(&path) {
            Err(LockWaitError::Held { holder, .. }) => assert_eq!(holder, Holder::OpenHere),
            other => panic!("expected Held, got {other:?}"),
        }
    }

    #[test]
    fn an_unregistered_handle_in_this_process_counts_as_closing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let _db = sled::open(&path).unwrap();
        assert_eq!(holder(&path, &path.join("db")), Holder::Closing);
    }
}
