//! A real sled log, closed and then altered with sled directly, as someone
//! with disk access would; `verify` must name the first altered record.

use std::path::Path;

use quorum_audit::{
    AuditLog, Ed25519Signer, Error, HeadSigner, Kind, SledStore, VerifyError, verify,
    verify_against,
};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use serde_json::json;

fn signer() -> Ed25519Signer {
    let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519Signer::from_pkcs8(der.as_ref()).unwrap()
}

/// Writes seq 0 start; rounds 1 and 2 each: cohort, phase, model digest,
/// round completed, signed head (seqs 1..=5 and 6..=10). Returns the head key.
fn write_log(path: &Path) -> Vec<u8> {
    let signer = signer();
    let key = signer.public_key();
    let mut log = AuditLog::open(path, "aggregator", Some(Box::new(signer))).unwrap();
    log.append(Kind::Start, None, None, json!({"version": "0.1.0"}))
        .unwrap();
    for round in 1..=2 {
        log.append(
            Kind::CohortSelected,
            Some(round),
            None,
            json!({"sites": ["alpha", "beta"]}),
        )
        .unwrap();
        log.append(
            Kind::PhaseCompleted,
            Some(round),
            None,
            json!({"phase": "unmask", "survivors": ["alpha", "beta"], "dropouts": []}),
        )
        .unwrap();
        log.append(
            Kind::ModelDigest,
            Some(round),
            None,
            json!({"sha256": format!("{round:064x}"), "round": round}),
        )
        .unwrap();
        log.append(Kind::RoundCompleted, Some(round), None, json!({}))
            .unwrap();
        log.append_signed_head(Some(round)).unwrap();
    }
    key
}

/// Runs `f` on the closed log's sled database, then flushes and closes it.
fn tamper(path: &Path, f: impl FnOnce(&sled::Db)) {
    SledStore::wait_until_closed(path).unwrap();
    let db = sled::open(path).unwrap();
    f(&db);
    db.flush().unwrap();
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn check(path: &Path, trusted: &[u8]) -> Result<quorum_audit::VerifyReport, VerifyError> {
    let store = SledStore::open_existing(path).unwrap();
    verify(&store, Some(&[trusted.to_vec()]))
}

fn fresh() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    let key = write_log(&path);
    (dir, path, key)
}

#[test]
fn untouched_log_verifies() {
    let (_dir, path, key) = fresh();
    let report = check(&path, &key).unwrap();
    assert_eq!((report.records, report.heads), (11, 2));
    assert_eq!(report.last_signed, Some(9));
}

#[test]
fn flipped_byte_names_that_record() {
    let (_dir, path, key) = fresh();
    SledStore::wait_until_closed(&path).unwrap();
    let original = sled::open(&path)
        .unwrap()
        .get(seq_key(3))
        .unwrap()
        .unwrap()
        .to_vec();
    // A spread of positions: structure, keys, hex digest, seq digit, time, prev_hash.
    let step = original.len() / 9;
    for offset in (0..original.len()).step_by(step) {
        let mut flipped = original.clone();
        flipped[offset] ^= 0x01;
        tamper(&path, |db| {
            db.insert(seq_key(3), flipped).unwrap();
        });
        let err = check(&path, &key).unwrap_err();
        let named = match err {
            VerifyError::ChainBroken { seq }
            | VerifyError::RecordInvalid { seq, .. }
            | VerifyError::OutOfOrder { seq, .. } => seq,
            other => panic!("offset {offset}: {other}"),
        };
        assert_eq!(named, 3, "offset {offset}: {err}");
    }
    tamper(&path, |db| {
        db.insert(seq_key(3), original).unwrap();
    });
    assert!(check(&path, &key).is_ok());
}

#[test]
fn deleted_record_names_the_gap() {
    let (_dir, path, key) = fresh();
    tamper(&path, |db| {
        db.remove(seq_key(7)).unwrap();
    });
    assert_eq!(check(&path, &key).unwrap_err(), VerifyError::Gap { seq: 7 });
}

#[test]
fn reordered_records_name_the_first() {
    let (_dir, path, key) = fresh();
    tamper(&path, |db| {
        let a = db.get(seq_key(2)).unwrap().unwrap();
        let b = db.get(seq_key(8)).unwrap().unwrap();
        db.insert(seq_key(2), b).unwrap();
        db.insert(seq_key(8), a).unwrap();
    });
    assert_eq!(
        check(&path, &key).unwrap_err(),
        VerifyError::OutOfOrder { seq: 2, found: 8 }
    );
}

#[test]
fn tampered_head_signature_fails() {
    let (_dir, path, key) = fresh();
    tamper(&path, |db| {
        let text = String::from_utf8(db.get(seq_key(5)).unwrap().unwrap().to_vec()).unwrap();
        let at = text.find("\"signature\":\"").unwrap() + 13;
        let digit = if &text[at..=at] == "0" { "1" } else { "0" };
        let forged = format!("{}{digit}{}", &text[..at], &text[at + 1..]);
        db.insert(seq_key(5), forged.into_bytes()).unwrap();
    });
    assert_eq!(
        check(&path, &key).unwrap_err(),
        VerifyError::HeadSignatureInvalid { seq: 5 }
    );
}

#[test]
fn truncation_after_signed_head_fails_against_expected_head() {
    let (_dir, path, key) = fresh();
    let expected = check(&path, &key).unwrap().last.unwrap();
    tamper(&path, |db| {
        for seq in 6..=10 {
            db.remove(seq_key(seq)).unwrap();
        }
    });
    // The shorter chain is internally valid...
    assert_eq!(check(&path, &key).unwrap().records, 6);
    let store = SledStore::open_existing(&path).unwrap();
    assert_eq!(
        verify_against(&store, None, expected).unwrap_err(),
        VerifyError::Truncated {
            expected: 10,
            last: Some(5)
        }
    );
    drop(store);

    // ...and so is one regrown past the cut, but its hashes differ.
    let mut log = AuditLog::open(&path, "aggregator", None).unwrap();
    for _ in 0..5 {
        log.append(Kind::RoundAborted, Some(2), None, json!({}))
            .unwrap();
    }
    drop(log);
    let store = SledStore::open_existing(&path).unwrap();
    assert_eq!(
        verify_against(&store, None, expected).unwrap_err(),
        VerifyError::ExpectedHeadMismatch { seq: 10 }
    );
}

#[test]
fn reopen_after_drop_continues_and_verifies() {
    let (_dir, path, key) = fresh();
    let before = check(&path, &key).unwrap().last.unwrap();
    let mut log = AuditLog::open(&path, "aggregator", Some(Box::new(signer()))).unwrap();
    assert_eq!(log.head(), Some(before));
    assert_eq!(log.append(Kind::Stop, None, None, json!({})).unwrap(), 11);
    assert_eq!(log.append_signed_head(None).unwrap(), 12);
    drop(log);
    let store = SledStore::open_existing(&path).unwrap();
    let report = verify_against(&store, None, before).unwrap();
    assert_eq!((report.records, report.heads), (13, 3));
    let record = quorum_audit::show(&store, 11).unwrap().unwrap();
    assert_eq!(record.prev_hash, before.hash);
}

#[test]
fn open_refuses_to_extend_a_damaged_tail() {
    let (_dir, path, _) = fresh();
    tamper(&path, |db| {
        db.insert(seq_key(10), b"not json".to_vec()).unwrap();
    });
    let err = AuditLog::open(&path, "aggregator", None).unwrap_err();
    assert!(matches!(err, Error::TailDamaged { seq: 10, .. }), "{err}");
    assert!(err.to_string().contains("audit verify"));
}

#[test]
fn second_writer_cannot_open_a_held_log() {
    let (_dir, path, _) = fresh();
    let _held = AuditLog::open(&path, "aggregator", None).unwrap();
    let err = AuditLog::open(&path, "aggregator", None).unwrap_err();
    assert!(matches!(err, Error::LogLocked { .. }), "{err}");
    assert!(err.to_string().contains("already has it open"), "{err}");
}
