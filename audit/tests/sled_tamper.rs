//! A real sled log, closed and then altered with sled directly, as someone with write access to
//! the node's state folder would: rewritten, re-signed, truncated, rolled back, started afresh.
//! `verify` must name the first altered record, or, given what an auditor holds elsewhere (a
//! pinned key fingerprint, an expected head, another node's witness log), the first bad round.

use std::path::{Path, PathBuf};

use quorum_audit::{
    AuditKey, AuditLog, Checks, Error, Expected, Head, Kind, MemoryStore, SignedHead, SledStore,
    VerifyError, verify, witnessed_heads,
};
use serde_json::json;

/// The node's audit key file beside the log.
fn key_path(path: &Path) -> PathBuf {
    path.with_file_name("audit.key")
}

fn key(path: &Path) -> AuditKey {
    AuditKey::load(&key_path(path)).unwrap()
}

/// Writes seq 0 audit_key (by `open`); rounds 1 and 2 each: cohort, phase, model digest,
/// round completed, signed head (seqs 1..=5 and 6..=10). Returns the key's fingerprint and
/// the signed heads, which a witness would hold.
fn write_log(path: &Path) -> (String, Vec<SignedHead>) {
    let key = AuditKey::generate(&key_path(path), None).unwrap();
    let fingerprint = key.fingerprint();
    let mut log = AuditLog::open(path, "aggregator", Some(key)).unwrap();
    let mut heads = Vec::new();
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
        heads.push(log.append_signed_head(Some(round)).unwrap());
    }
    (fingerprint, heads)
}

/// A site's log that witnessed `heads` of the aggregator, one per round from 1.
fn witness_log(heads: &[SignedHead]) -> MemoryStore {
    let store = MemoryStore::new();
    let mut log = AuditLog::with_store(
        Box::new(store.clone()),
        "memory",
        "site:alpha",
        Some(AuditKey::ephemeral()),
    )
    .unwrap();
    for (round, head) in (1..).zip(heads) {
        let mut details = head.to_details();
        details["node"] = json!("aggregator");
        log.append(Kind::Witness, Some(round), None, details)
            .unwrap();
    }
    store
}

/// What `verify --witness` checks: the log reaches every head the witness holds.
fn check_with_witness(path: &Path, witness: &MemoryStore) -> Result<u64, VerifyError> {
    let checks = Checks {
        trusted_keys: Vec::new(),
        expected: witnessed_heads(witness, "aggregator").unwrap(),
    };
    let store = SledStore::open_existing(path).unwrap();
    verify(&store, &checks).map(|report| report.records)
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

fn check(path: &Path, trusted: &str) -> Result<quorum_audit::VerifyReport, VerifyError> {
    let store = SledStore::open_existing(path).unwrap();
    verify(&store, &Checks::trusting(trusted))
}

fn check_against(path: &Path, head: Head) -> Result<quorum_audit::VerifyReport, VerifyError> {
    let store = SledStore::open_existing(path).unwrap();
    let checks = Checks {
        trusted_keys: Vec::new(),
        expected: vec![Expected {
            head,
            round: None,
            held_by: "--expect-head".into(),
            signed_by: None,
        }],
    };
    verify(&store, &checks)
}

fn fresh() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    let (key, _) = write_log(&path);
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
fn tamper_truncated_tail_fails_against_expected_head() {
    let (_dir, path, key) = fresh();
    let expected = check(&path, &key).unwrap().last.unwrap();
    tamper(&path, |db| {
        for seq in 6..=10 {
            db.remove(seq_key(seq)).unwrap();
        }
    });
    // The shorter chain is internally valid...
    assert_eq!(check(&path, &key).unwrap().records, 6);
    assert_eq!(
        check_against(&path, expected).unwrap_err(),
        VerifyError::Truncated {
            expected: 10,
            last: Some(5),
            round: None,
            held_by: "--expect-head".into(),
        }
    );

    // ...and so is one regrown past the cut, but its hashes differ.
    let mut log = AuditLog::open(&path, "aggregator", Some(self::key(&path))).unwrap();
    for _ in 0..5 {
        log.append(Kind::RoundAborted, Some(2), None, json!({}))
            .unwrap();
    }
    drop(log);
    assert_eq!(
        check_against(&path, expected).unwrap_err(),
        VerifyError::ExpectedHeadMismatch {
            seq: 10,
            round: None,
            held_by: "--expect-head".into(),
        }
    );
}

#[test]
fn tamper_rewritten_and_resigned_log_fails_against_the_pinned_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    let (pinned, heads) = write_log(&path);
    let witness = witness_log(&heads);
    // The operator rewrites round 1's model digest, re-links the chain and re-signs every head
    // with a key of its own: a log that verifies on its own terms.
    let forged_path = dir.path().join("forged").join("audit");
    std::fs::create_dir_all(forged_path.parent().unwrap()).unwrap();
    let mut forged = AuditLog::open(
        &forged_path,
        "aggregator",
        Some(AuditKey::generate(&key_path(&forged_path), None).unwrap()),
    )
    .unwrap();
    let original = SledStore::open_existing(&path).unwrap();
    for record in quorum_audit::list(&original, &Default::default()).unwrap() {
        match record.kind {
            Kind::AuditKey => {}
            Kind::SignedHead => {
                forged.append_signed_head(record.round).unwrap();
            }
            kind => {
                let mut details = record.details;
                if kind == Kind::ModelDigest && record.round == Some(1) {
                    details["sha256"] = json!("66".repeat(32));
                }
                forged.append(kind, record.round, None, details).unwrap();
            }
        }
    }
    drop((forged, original));
    let unpinned = SledStore::open_existing(&forged_path).unwrap();
    assert!(verify(&unpinned, &Checks::default()).is_ok());
    drop(unpinned);
    assert!(matches!(
        check(&forged_path, &pinned).unwrap_err(),
        VerifyError::KeyUntrusted { seq: 0, .. }
    ));
    // A site that witnessed round 1's head names round 1.
    assert!(matches!(
        check_with_witness(&forged_path, &witness).unwrap_err(),
        VerifyError::ExpectedHeadMismatch {
            round: Some(1),
            seq: 4,
            ..
        }
    ));
    assert_eq!(check_with_witness(&path, &witness), Ok(11));
}

#[test]
fn tamper_rollback_to_an_earlier_signed_head_is_named_by_a_witness() {
    let (_dir, path, key) = fresh();
    let witness = witness_log(&signed_heads_of(&path));
    // Back to the state after round 1: a prefix of the chain, signed, with the pinned key.
    tamper(&path, |db| {
        for seq in 6..=10 {
            db.remove(seq_key(seq)).unwrap();
        }
    });
    assert_eq!(check(&path, &key).unwrap().records, 6);
    assert_eq!(
        check_with_witness(&path, &witness).unwrap_err(),
        VerifyError::Truncated {
            expected: 9,
            last: Some(5),
            round: Some(2),
            held_by: "site:alpha's witness record 2".into(),
        }
    );
}

#[test]
fn tamper_deleted_log_started_afresh_is_named_by_a_witness() {
    let (_dir, path, key) = fresh();
    let witness = witness_log(&signed_heads_of(&path));
    SledStore::wait_until_closed(&path).unwrap();
    std::fs::remove_dir_all(&path).unwrap();
    // Same key, same kinds of records, a fresh chain: on its own it is flawless.
    let mut log = AuditLog::open(&path, "aggregator", Some(self::key(&path))).unwrap();
    for round in 1..=3 {
        log.append(Kind::RoundCompleted, Some(round), None, json!({}))
            .unwrap();
        log.append_signed_head(Some(round)).unwrap();
    }
    drop(log);
    assert!(check(&path, &key).is_ok());
    assert!(matches!(
        check_with_witness(&path, &witness).unwrap_err(),
        VerifyError::ExpectedHeadMismatch {
            seq: 4,
            round: Some(1),
            ..
        }
    ));
}

#[test]
fn rotated_key_needs_the_old_keys_endorsement() {
    let (dir, path, key) = fresh();
    // A new key without an endorsement cannot take over the log.
    let stranger = AuditKey::generate(&dir.path().join("stranger.key"), None).unwrap();
    let err = AuditLog::open(&path, "aggregator", Some(stranger)).unwrap_err();
    assert!(matches!(err, Error::KeyChanged { .. }), "{err}");
    assert!(err.to_string().contains("--endorse-with"), "{err}");
    // One endorsed by the key in force does, on the record, and heads switch to it.
    let new_path = dir.path().join("new.key");
    let new = AuditKey::generate(&new_path, Some(&self::key(&path))).unwrap();
    let new_fingerprint = new.fingerprint();
    let mut log = AuditLog::open(&path, "aggregator", Some(new)).unwrap();
    log.append(Kind::Stop, None, None, json!({})).unwrap();
    log.append_signed_head(None).unwrap();
    drop(log);
    let report = check(&path, &key).unwrap();
    assert_eq!(
        report.key.as_deref().map(quorum_audit::fingerprint),
        Some(new_fingerprint)
    );
    let rotation = quorum_audit::show(&SledStore::open_existing(&path).unwrap(), 11)
        .unwrap()
        .unwrap();
    assert_eq!(rotation.kind, Kind::AuditKey);
    assert_eq!(rotation.details["previous"], json!(key));
}

/// The signed heads stored in the log at `path`, as a witness received them.
fn signed_heads_of(path: &Path) -> Vec<SignedHead> {
    quorum_audit::list(
        &SledStore::open_existing(path).unwrap(),
        &Default::default(),
    )
    .unwrap()
    .into_iter()
    .filter(|r| r.kind == Kind::SignedHead)
    .map(|r| SignedHead::from_details(&r.details).unwrap())
    .collect()
}

#[test]
fn reopen_after_drop_continues_and_verifies() {
    let (_dir, path, key) = fresh();
    let before = check(&path, &key).unwrap().last.unwrap();
    let mut log = AuditLog::open(&path, "aggregator", Some(self::key(&path))).unwrap();
    assert_eq!(log.head(), Some(before));
    assert_eq!(log.append(Kind::Stop, None, None, json!({})).unwrap(), 11);
    assert_eq!(log.append_signed_head(None).unwrap().head.seq, 11);
    drop(log);
    let report = check_against(&path, before).unwrap();
    assert_eq!((report.records, report.heads), (13, 3));
    let store = SledStore::open_existing(&path).unwrap();
    let record = quorum_audit::show(&store, 11).unwrap().unwrap();
    assert_eq!(record.prev_hash, before.hash);
}

#[test]
fn open_verifies_the_whole_chain_not_only_the_tail() {
    let (_dir, path, _) = fresh();
    tamper(&path, |db| {
        db.insert(seq_key(10), b"not json".to_vec()).unwrap();
    });
    let err = AuditLog::open(&path, "aggregator", None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LogDamaged {
                error: VerifyError::RecordInvalid { seq: 10, .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("quorum-audit verify"));
    // An edit deep inside the chain, not only at its end, keeps the log from opening.
    let (_dir, path, _) = fresh();
    tamper(&path, |db| {
        let text = String::from_utf8(db.get(seq_key(2)).unwrap().unwrap().to_vec()).unwrap();
        db.insert(seq_key(2), text.replace("unmask", "mask").into_bytes())
            .unwrap();
    });
    let err = AuditLog::open(&path, "aggregator", None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LogDamaged {
                error: VerifyError::ChainBroken { seq: 2 },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn second_writer_cannot_open_a_held_log() {
    let (_dir, path, _) = fresh();
    let _held = AuditLog::open(&path, "aggregator", None).unwrap();
    let err = AuditLog::open(&path, "aggregator", None).unwrap_err();
    assert!(matches!(err, Error::LogLocked { .. }), "{err}");
    assert!(err.to_string().contains("already has it open"), "{err}");
}
