//! What an auditor does with a log: list, show, export, import, reconcile.

use quorum_audit::{
    AuditLog, Checks, Error, Filter, Kind, MemoryStore, Store, VerifyError, export_jsonl,
    import_jsonl, list, reconcile, render_line, show, verify,
};
use serde_json::json;

fn digest(round: u32) -> String {
    format!("{:064x}", u64::from(round) * 0x1111)
}

/// An aggregator log with two rounds; round 2's model digest is `round2`.
fn aggregator(round2: &str) -> MemoryStore {
    let store = MemoryStore::new();
    let mut log = AuditLog::with_store(Box::new(store.clone()), "mem", "aggregator", None).unwrap();
    log.append(Kind::Start, None, None, json!({})).unwrap();
    for (round, sha) in [(1, digest(1)), (2, round2.to_owned())] {
        log.append(Kind::Join, Some(round), Some("alpha"), json!({}))
            .unwrap();
        log.append(Kind::Join, Some(round), Some("beta"), json!({}))
            .unwrap();
        log.append(
            Kind::UploadDigest,
            Some(round),
            Some("alpha"),
            json!({"sha256": digest(99), "bytes": 4096}),
        )
        .unwrap();
        log.append(
            Kind::ModelDigest,
            Some(round),
            None,
            json!({"sha256": sha, "round": round}),
        )
        .unwrap();
        log.append(
            Kind::PrivacySpent,
            Some(round),
            None,
            json!({"rho": 0.01, "epsilon": 1.5, "delta": 1e-6}),
        )
        .unwrap();
    }
    store
}

/// A client log that recorded the model digests of rounds 1..=rounds.
fn client(rounds: u32) -> MemoryStore {
    let store = MemoryStore::new();
    let mut log = AuditLog::with_store(Box::new(store.clone()), "mem", "site:alpha", None).unwrap();
    for round in 1..=rounds {
        log.append(
            Kind::ModelDigest,
            Some(round),
            None,
            json!({"sha256": digest(round), "round": round}),
        )
        .unwrap();
    }
    store
}

fn export(store: &MemoryStore) -> String {
    let mut out = Vec::new();
    let count = export_jsonl(store, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(count as usize, text.lines().count());
    text
}

#[test]
fn list_filters_by_round_site_kind_and_time() {
    let store = aggregator(&digest(2));
    let seqs = |filter: Filter| -> Vec<u64> {
        list(&store, &filter)
            .unwrap()
            .into_iter()
            .map(|r| r.seq)
            .collect()
    };
    assert_eq!(seqs(Filter::default()), (0..11).collect::<Vec<_>>());
    assert_eq!(
        seqs(Filter {
            round: Some(2),
            ..Filter::default()
        }),
        [6, 7, 8, 9, 10]
    );
    assert_eq!(
        seqs(Filter {
            round: Some(1),
            site: Some("alpha".into()),
            ..Filter::default()
        }),
        [1, 3]
    );
    assert_eq!(
        seqs(Filter {
            kind: Some(Kind::ModelDigest),
            ..Filter::default()
        }),
        [4, 9]
    );
    let time_of_5 = show(&store, 5).unwrap().unwrap().time;
    let since = seqs(Filter {
        since: Some(time_of_5),
        ..Filter::default()
    });
    assert_eq!(since.first(), Some(&5), "{since:?}");
    assert!(
        seqs(Filter {
            since: Some("2999-01-01T00:00:00Z".into()),
            ..Filter::default()
        })
        .is_empty()
    );
    assert!(matches!(
        list(
            &store,
            &Filter {
                since: Some("yesterday".into()),
                ..Filter::default()
            }
        ),
        Err(Error::TimeInvalid { .. })
    ));
}

#[test]
fn rendered_round_reads_in_order() {
    let store = aggregator(&digest(2));
    let lines: Vec<String> = list(
        &store,
        &Filter {
            round: Some(1),
            ..Filter::default()
        },
    )
    .unwrap()
    .iter()
    .map(render_line)
    .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l.split(' ').nth(3).unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "join",
            "join",
            "upload_digest",
            "model_digest",
            "privacy_spent"
        ]
    );
    assert!(
        lines[2].contains("site=alpha bytes=4096 sha256="),
        "{}",
        lines[2]
    );
    assert!(
        lines[4].ends_with("delta=1e-6 epsilon=1.5 rho=0.01"),
        "{}",
        lines[4]
    );
}

#[test]
fn show_returns_the_record_or_nothing() {
    let store = aggregator(&digest(2));
    let record = show(&store, 4).unwrap().unwrap();
    assert_eq!(
        (record.seq, record.kind, record.round),
        (4, Kind::ModelDigest, Some(1))
    );
    assert_eq!(record.details["sha256"], digest(1));
    assert!(show(&store, 11).unwrap().is_none());
    store.tamper_put(3, b"junk".to_vec()).unwrap();
    assert!(matches!(
        show(&store, 3),
        Err(Error::RecordUnreadable { seq: 3, .. })
    ));
}

#[test]
fn export_lines_carry_hashes_and_import_back_to_the_same_chain() {
    let store = aggregator(&digest(2));
    let text = export(&store);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let record = show(&store, 0).unwrap().unwrap();
    assert_eq!(first["hash"], hex::encode(record.hash()));
    assert_eq!(first["kind"], "start");

    let imported = import_jsonl(&text).unwrap();
    let original = verify(&store, &Checks::default()).unwrap();
    let copy = verify(&imported, &Checks::default()).unwrap();
    assert_eq!(copy.last, original.last);
    for seq in 0..11 {
        assert_eq!(imported.get(seq).unwrap(), store.get(seq).unwrap());
    }

    // Dropping a line from the export is a gap once imported.
    let without_3: String = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    assert_eq!(
        verify(&import_jsonl(&without_3).unwrap(), &Checks::default()).unwrap_err(),
        VerifyError::Gap { seq: 3 }
    );
}

#[test]
fn reconcile_matches_client_digests_with_aggregator_rounds() {
    let report = reconcile(&client(2), &export(&aggregator(&digest(2)))).unwrap();
    assert!(report.is_consistent(), "{report}");
    let rounds: Vec<u32> = report.matched.iter().map(|m| m.round).collect();
    assert_eq!(rounds, [1, 2]);
    assert_eq!(report.matched[1].sha256, digest(2));
}

#[test]
fn reconcile_reports_a_different_or_missing_digest() {
    let forged = "f".repeat(64);
    let report = reconcile(&client(3), &export(&aggregator(&forged))).unwrap();
    assert!(!report.is_consistent());
    assert_eq!(report.matched.len(), 1);
    assert_eq!(report.mismatched.len(), 2);
    let round2 = &report.mismatched[0];
    assert_eq!((round2.round, round2.client_seq), (2, 1));
    assert_eq!(round2.client_sha256, digest(2));
    assert_eq!(round2.aggregator_sha256, [forged]);
    let round3 = &report.mismatched[1];
    assert_eq!(round3.round, 3);
    assert!(round3.aggregator_sha256.is_empty());
    let text = report.to_string();
    assert!(
        text.contains("round 3: MISMATCH") && text.contains("no record"),
        "{text}"
    );
}

#[test]
fn reconcile_refuses_a_doctored_export() {
    let text = export(&aggregator(&digest(2)));
    // Rewrite round 2's digest in the export, restating the line's hash too.
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if !line.contains("\"model_digest\"") || !line.contains(&digest(2)) {
                return line.to_owned();
            }
            let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["details"]["sha256"] = json!("e".repeat(64));
            value.as_object_mut().unwrap().remove("hash");
            let record = quorum_audit::Record::from_canonical(&{
                let mut b = Vec::new();
                quorum_audit::write_canonical(&value, &mut b);
                b
            })
            .unwrap();
            quorum_audit::export_line(&record)
        })
        .collect();
    let err = reconcile(&client(2), &lines.join("\n")).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ExportBroken(VerifyError::ChainBroken { seq: 9 })
        ),
        "{err}"
    );
}
