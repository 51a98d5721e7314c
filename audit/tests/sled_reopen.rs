//! Reopening a sled log right after closing it, as a restarted node, a test
//! or an auditor does. sled releases its file lock only when its background
//! thread lets go of the database, so without waiting this failed about one
//! time in twenty on a loaded machine ("could not acquire lock ... WouldBlock").

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use quorum_audit::{AuditLog, Error, Kind, SledStore, verify};
use serde_json::json;

const REOPENS: u32 = 150;

/// Busy threads on every core, so sled's threads are scheduled late, as on a
/// loaded CI machine. Stopped when dropped.
struct CpuLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuLoad {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..cores)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[test]
fn reopen_a_just_closed_log_many_times_under_load() {
    let _load = CpuLoad::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    for i in 0..REOPENS {
        // The writer: open, resume the chain, append durably, close.
        let mut log = AuditLog::open(&path, "aggregator", None)
            .unwrap_or_else(|e| panic!("writer reopen {i} failed: {e}"));
        let seq = log
            .append(Kind::Start, None, None, json!({"reopen": i}))
            .unwrap();
        assert_eq!(seq, u64::from(i));
        drop(log);
        // The auditor, right behind it.
        let store = SledStore::open_existing(&path)
            .unwrap_or_else(|e| panic!("auditor reopen {i} failed: {e}"));
        let report = verify(&store, &quorum_audit::Checks::default()).unwrap();
        assert_eq!(report.records, u64::from(i) + 1);
    }
}

/// The race made deterministic: sled's lock is still held in this process (a raw handle, as
/// sled's own threads hold it after the last `SledStore` is dropped) and is released a little
/// later; opening waits for it instead of failing.
#[test]
fn reopen_waits_for_a_handle_that_is_still_closing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    let lingering = sled::open(&path).unwrap();
    let (about_to_open, opening) = std::sync::mpsc::channel::<()>();
    let closer = std::thread::spawn(move || {
        opening.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(lingering);
    });
    about_to_open.send(()).unwrap();
    let mut log = AuditLog::open(&path, "aggregator", None)
        .expect("opening waits until the lingering handle is gone");
    log.append(Kind::Start, None, None, json!({})).unwrap();
    closer.join().unwrap();
}

#[test]
fn reopen_while_another_process_holds_the_log_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    let mut log = AuditLog::open(&path, "aggregator", None).unwrap();
    log.append(Kind::Start, None, None, json!({})).unwrap();
    drop(log);
    SledStore::wait_until_closed(&path).unwrap();

    // A foreign process takes sled's lock (an exclusive flock on `db`) and
    // keeps it until its stdin closes.
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import fcntl,sys\n\
             f=open(sys.argv[1],'rb')\n\
             fcntl.flock(f,fcntl.LOCK_EX)\n\
             print('locked',flush=True)\n\
             sys.stdin.read()",
        ])
        .arg(path.join("db"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the lock holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");

    let err = AuditLog::open(&path, "aggregator", None).unwrap_err();
    assert!(matches!(err, Error::LogLocked { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("process {}", holder.id())),
        "the error names the holder's pid: {message}"
    );
    assert!(message.contains("python"), "and its name: {message}");

    // Once the holder exits, the log opens and is intact.
    holder.stdin.take().unwrap().write_all(b"").unwrap();
    assert!(holder.wait().unwrap().success());
    let store = SledStore::open_existing(&path).unwrap();
    assert_eq!(
        verify(&store, &quorum_audit::Checks::default())
            .unwrap()
            .records,
        1
    );
}
