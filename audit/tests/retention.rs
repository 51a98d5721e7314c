//! Retention on a real sled log: records exported and pruned by range with a signed `pruned`
//! record; what is left verifies on its own (pinned, against witnesses), the export verifies as
//! the log's beginning, and a prune cannot be used to hide a change.

use std::path::Path;

use quorum_audit::{
    AuditKey, AuditLog, Checks, Error, Expected, Kind, SignedHead, SledStore, VerifyError,
    import_jsonl, verify,
};
use serde_json::json;

/// seq 0 audit_key; rounds 1..=3 each: two records and a signed head (seqs 1..=9). Returns the
/// fingerprint and the heads (what a witness holds), one per round.
fn write_log(dir: &Path) -> (String, Vec<SignedHead>) {
    let key = AuditKey::generate(&dir.join("audit.key"), None).unwrap();
    let fingerprint = key.fingerprint();
    let mut log = AuditLog::open(dir.join("audit"), "aggregator", Some(key)).unwrap();
    let heads = (1..=3)
        .map(|round| {
            log.append(Kind::CohortSelected, Some(round), None, json!({"n": round}))
                .unwrap();
            log.append(Kind::RoundCompleted, Some(round), None, json!({}))
                .unwrap();
            log.append_signed_head(Some(round)).unwrap()
        })
        .collect();
    (fingerprint, heads)
}

fn witnessed(heads: &[SignedHead]) -> Vec<Expected> {
    (1..)
        .zip(heads)
        .map(|(round, h)| Expected {
            head: h.head,
            round: Some(round),
            held_by: format!("site:alpha's witness of round {round}"),
            signed_by: Some(h.public_key.clone()),
        })
        .collect()
}

fn prune(dir: &Path, before: u64, export: &str) -> Result<quorum_audit::Pruned, Error> {
    let key = AuditKey::load(&dir.join("audit.key")).unwrap();
    let mut log = AuditLog::open(dir.join("audit"), "aggregator", Some(key)).unwrap();
    log.prune(before, &dir.join(export))
}

#[test]
fn prune_leaves_a_log_that_verifies_and_an_export_that_does_too() {
    let dir = tempfile::tempdir().unwrap();
    let (fingerprint, heads) = write_log(dir.path());
    // Rounds 1 and 2 (seqs 0..=6) go to the export.
    let pruned = prune(dir.path(), 7, "rounds-1-2.jsonl").unwrap();
    assert_eq!((pruned.from, pruned.to), (0, 6));

    let store = SledStore::open_existing(dir.path().join("audit")).unwrap();
    let checks = Checks {
        trusted_keys: vec![fingerprint.clone()],
        expected: witnessed(&heads),
    };
    let report = verify(&store, &checks).unwrap();
    assert_eq!(report.pruned_before, Some(7));
    // Seqs 7..=9, then the pruned record and its head.
    assert_eq!(report.records, 5);
    assert_eq!(
        report.expected_pruned, 2,
        "rounds 1 and 2 are the export's to answer for"
    );
    assert_eq!(
        quorum_audit::show(&store, 10).unwrap().unwrap().kind,
        Kind::Pruned
    );

    // The export is the log's beginning: it verifies, pinned, against the same witnesses, and
    // it is the file whose digest the log signed.
    let bytes = std::fs::read(dir.path().join("rounds-1-2.jsonl")).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    assert_eq!(digest.as_ref(), pruned.export_sha256);
    let export = import_jsonl(std::str::from_utf8(&bytes).unwrap()).unwrap();
    let early = Checks {
        trusted_keys: vec![fingerprint],
        expected: witnessed(&heads[..2]),
    };
    assert_eq!(verify(&export, &early).unwrap().records, 7);
    drop(store);

    // The log reopens (verified whole on open), appends and prunes again.
    let key = AuditKey::load(&dir.path().join("audit.key")).unwrap();
    let mut log = AuditLog::open(dir.path().join("audit"), "aggregator", Some(key)).unwrap();
    log.append(Kind::Stop, None, None, json!({})).unwrap();
    // Round 3 and the first prune's record and head (seqs 7..=11) go to a second export.
    log.prune(12, &dir.path().join("round-3.jsonl")).unwrap();
    drop(log);
    let store = SledStore::open_existing(dir.path().join("audit")).unwrap();
    let report = verify(&store, &Checks::default()).unwrap();
    assert_eq!(report.pruned_before, Some(12));
    let second = std::fs::read_to_string(dir.path().join("round-3.jsonl")).unwrap();
    let second = import_jsonl(&second).unwrap();
    assert_eq!(verify(&second, &Checks::default()).unwrap().records, 5);
}

#[test]
fn prune_cannot_hide_a_change_or_a_removal() {
    let dir = tempfile::tempdir().unwrap();
    let (_, heads) = write_log(dir.path());
    prune(dir.path(), 7, "early.jsonl").unwrap();
    let path = dir.path().join("audit");
    SledStore::wait_until_closed(&path).unwrap();

    // A record removed after the prune: the chain no longer starts where the record says.
    let db = sled::open(&path).unwrap();
    let first = db.remove(7u64.to_be_bytes()).unwrap().unwrap();
    db.flush().unwrap();
    drop(db);
    let store = SledStore::open_existing(&path).unwrap();
    assert!(matches!(
        verify(&store, &Checks::default()),
        Err(VerifyError::Gap { seq: 0 })
    ));
    drop(store);

    // Put back but altered: the kept chain no longer links to the signed last hash.
    SledStore::wait_until_closed(&path).unwrap();
    let db = sled::open(&path).unwrap();
    let altered = String::from_utf8(first.to_vec())
        .unwrap()
        .replace(r#""n":3"#, r#""n":4"#);
    db.insert(7u64.to_be_bytes(), altered.into_bytes()).unwrap();
    db.flush().unwrap();
    drop(db);
    let store = SledStore::open_existing(&path).unwrap();
    let err = verify(
        &store,
        &Checks {
            trusted_keys: Vec::new(),
            expected: witnessed(&heads),
        },
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::ChainBroken { seq: 7 }), "{err}");
}

#[test]
fn prune_refuses_ranges_that_leave_nothing_to_verify() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    for before in [0, 10, 99] {
        let err = prune(dir.path(), before, &format!("x{before}.jsonl")).unwrap_err();
        assert!(matches!(err, Error::PruneRange { .. }), "{err}");
        assert!(!dir.path().join(format!("x{before}.jsonl")).exists());
    }
    // A second prune must take the first one's record along (seq 10), or its export would
    // not verify alone.
    prune(dir.path(), 7, "first.jsonl").unwrap();
    let err = prune(dir.path(), 9, "second.jsonl").unwrap_err();
    assert!(matches!(err, Error::PruneRange { first: 10, .. }), "{err}");
    // Without the key there is nothing to sign the record with.
    let mut log = AuditLog::open(dir.path().join("audit"), "aggregator", None).unwrap();
    assert!(matches!(
        log.prune(5, &dir.path().join("y.jsonl")),
        Err(Error::HeadSignerMissing { .. })
    ));
}

#[test]
fn prune_forged_without_the_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (fingerprint, _) = write_log(dir.path());
    let path = dir.path().join("audit");
    SledStore::wait_until_closed(&path).unwrap();
    // Someone who can write the store, but has no key, appends a `pruned` record naming seqs
    // 0..=6 (everything it needs is in the log itself) and deletes them.
    let db = sled::open(&path).unwrap();
    let read = |seq: u64| {
        let bytes = db.get(seq.to_be_bytes()).unwrap().unwrap();
        quorum_audit::Record::from_canonical(&bytes).unwrap()
    };
    let (first_key, sixth, last) = (read(0), read(6), read(9));
    let forged = quorum_audit::Record {
        seq: 10,
        time: last.time.clone(),
        actor: "aggregator".into(),
        kind: Kind::Pruned,
        round: None,
        site: None,
        details: json!({
            "from": 0, "to": 6,
            "export_sha256": "00".repeat(32),
            "last_hash": hex::encode(sixth.hash()),
            "public_key": first_key.details["public_key"],
        }),
        prev_hash: last.hash(),
    };
    db.insert(10u64.to_be_bytes(), forged.canonical_bytes())
        .unwrap();
    for seq in 0..=6u64 {
        db.remove(seq.to_be_bytes()).unwrap();
    }
    db.flush().unwrap();
    drop(db);
    let store = SledStore::open_existing(&path).unwrap();
    assert_eq!(
        verify(&store, &Checks::trusting(fingerprint)).unwrap_err(),
        VerifyError::PruneUnsigned { seq: 10 }
    );
}
