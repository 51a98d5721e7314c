//! The `Store` contract, run against every implementation.

use quorum_audit::{Durability, MemoryStore, SledStore, Store, StoreError};
use tempfile::TempDir;

fn collect(store: &dyn Store) -> Vec<(u64, Vec<u8>)> {
    store.iter().map(Result::unwrap).collect()
}

fn empty_store_has_nothing(store: &dyn Store) {
    assert_eq!(store.last().unwrap(), None);
    assert_eq!(store.get(0).unwrap(), None);
    assert!(collect(store).is_empty());
    store.flush().unwrap();
}

fn appended_bytes_read_back(store: &dyn Store) {
    store.append(0, b"zero").unwrap();
    store.append(1, b"").unwrap();
    store.flush().unwrap();
    assert_eq!(store.get(0).unwrap().as_deref(), Some(&b"zero"[..]));
    assert_eq!(store.get(1).unwrap().as_deref(), Some(&b""[..]));
    assert_eq!(store.get(2).unwrap(), None);
    assert_eq!(store.last().unwrap(), Some((1, Vec::new())));
}

fn iteration_is_numeric_order(store: &dyn Store) {
    // Little-endian or decimal keys would put 256 before 255 or 1000 before 2.
    for seq in [256u64, 2, 1000, 255, 1, u64::MAX - 1] {
        store.append(seq, &seq.to_le_bytes()).unwrap();
    }
    let seqs: Vec<u64> = collect(store).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, [1, 2, 255, 256, 1000, u64::MAX - 1]);
    for (seq, bytes) in collect(store) {
        assert_eq!(bytes, seq.to_le_bytes());
    }
    assert_eq!(store.last().unwrap().unwrap().0, u64::MAX - 1);
}

fn existing_seq_is_never_overwritten(store: &dyn Store) {
    store.append(3, b"original").unwrap();
    assert_eq!(
        store.append(3, b"forged"),
        Err(StoreError::SeqTaken { seq: 3 })
    );
    assert_eq!(store.get(3).unwrap().as_deref(), Some(&b"original"[..]));
    assert_eq!(collect(store).len(), 1);
}

fn remove_before_drops_only_lower_seqs(store: &dyn Store) {
    for seq in [1u64, 2, 255, 256, 1000] {
        store.append(seq, b"r").unwrap();
    }
    store.remove_before(256).unwrap();
    store.flush().unwrap();
    let seqs: Vec<u64> = collect(store).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, [256, 1000]);
    assert_eq!(store.get(255).unwrap(), None);
    // Removing below the first seq kept removes nothing.
    store.remove_before(0).unwrap();
    assert_eq!(collect(store).len(), 2);
}

macro_rules! conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn remove_before_drops_only_lower_seqs() {
                let (store, _guard) = $make;
                super::remove_before_drops_only_lower_seqs(&store);
            }

            #[test]
            fn empty_store_has_nothing() {
                let (store, _guard) = $make;
                super::empty_store_has_nothing(&store);
            }

            #[test]
            fn appended_bytes_read_back() {
                let (store, _guard) = $make;
                super::appended_bytes_read_back(&store);
            }

            #[test]
            fn iteration_is_numeric_order() {
                let (store, _guard) = $make;
                super::iteration_is_numeric_order(&store);
            }

            #[test]
            fn existing_seq_is_never_overwritten() {
                let (store, _guard) = $make;
                super::existing_seq_is_never_overwritten(&store);
            }
        }
    };
}

fn sled_store_with(durability: Durability) -> (SledStore, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        SledStore::open_with(dir.path().join("log"), durability).unwrap(),
        dir,
    )
}

fn sled_store() -> (SledStore, TempDir) {
    sled_store_with(Durability::SyncData)
}

conformance!(on_memory, (MemoryStore::new(), ()));
conformance!(on_sled, sled_store());
conformance!(on_sled_flush_only, sled_store_with(Durability::SledFlush));

#[test]
fn sled_records_survive_reopen() {
    let (store, dir) = sled_store();
    store.append(0, b"kept").unwrap();
    store.flush().unwrap();
    drop(store);
    let store = SledStore::open_existing(dir.path().join("log")).unwrap();
    assert_eq!(collect(&store), [(0, b"kept".to_vec())]);
}

#[test]
fn sled_rejects_keys_that_are_not_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let db = sled::open(&path).unwrap();
    db.insert(b"abc", b"x".to_vec()).unwrap();
    db.flush().unwrap();
    drop(db);
    let store = SledStore::open_existing(&path).unwrap();
    assert_eq!(store.last(), Err(StoreError::KeyMalformed { len: 3 }));
    assert_eq!(collect_err(&store), StoreError::KeyMalformed { len: 3 });
}

fn collect_err(store: &dyn Store) -> StoreError {
    store.iter().find_map(Result::err).unwrap()
}

#[test]
fn open_existing_refuses_a_missing_log() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let err = SledStore::open_existing(&missing).unwrap_err();
    assert!(
        matches!(err, quorum_audit::Error::LogMissing { .. }),
        "{err}"
    );
    assert!(!missing.exists(), "the auditor must not create a log");
}
