//! An auditor re-verifies real exports with `audit/testdata/verify_export.py`: RFC 8785, the
//! chain, the audit keys, the signed heads and the witnesses, in Python with no Quorum code in
//! the loop. Each check is also made to fail on a tampered export.

use std::path::{Path, PathBuf};
use std::process::Command;

use quorum_audit::{AuditKey, AuditLog, Kind, SledStore, export_jsonl};
use serde_json::json;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/verify_export.py")
}

/// Runs the script; `(exit code, stdout + stderr)`.
fn python(args: &[&str]) -> (i32, String) {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn has_cryptography() -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import cryptography"])
        .status();
    if probe.is_ok_and(|s| s.success()) {
        return true;
    }
    // .ci/run installs python3-cryptography; a bare developer machine may lack it.
    eprintln!("python3 has no `cryptography` module; skipping the independent check");
    false
}

fn export(path: &Path, out: &Path) -> String {
    let store = SledStore::open_existing(path).unwrap();
    let mut bytes = Vec::new();
    export_jsonl(&store, &mut bytes).unwrap();
    std::fs::write(out, &bytes).unwrap();
    String::from_utf8(bytes).unwrap()
}

/// An aggregator log (key rotated once, floats and nested details, heads) and a site log that
/// witnessed its heads; returns the two export paths and the aggregator's first fingerprint.
fn logs(dir: &Path) -> (PathBuf, PathBuf, String) {
    let key = AuditKey::generate(&dir.join("agg.key"), None).unwrap();
    let first = key.fingerprint();
    let mut agg = AuditLog::open(dir.join("agg"), "aggregator", Some(key)).unwrap();
    let mut site = AuditLog::open(
        dir.join("site"),
        "site:alpha",
        Some(AuditKey::generate(&dir.join("site.key"), None).unwrap()),
    )
    .unwrap();
    let witness = |site: &mut AuditLog, round, head: quorum_audit::SignedHead| {
        let mut details = head.to_details();
        details["node"] = json!("aggregator");
        site.append(Kind::Witness, Some(round), None, details)
            .unwrap();
    };
    agg.append(
        Kind::PrivacySpent,
        Some(1),
        None,
        json!({"rho": 0.1, "epsilon": 1e-7, "delta": 1e21, "big": 9_007_199_254_740_992_u64,
               "text": "é\n\u{1}\"", "nested": {"b": [1.5, -0.0, 2], "a": null}}),
    )
    .unwrap();
    let head = agg.append_signed_head(Some(1)).unwrap();
    witness(&mut site, 1, head);
    drop(agg);
    let rotated = AuditKey::generate(
        &dir.join("agg2.key"),
        Some(&AuditKey::load(&dir.join("agg.key")).unwrap()),
    )
    .unwrap();
    let mut agg = AuditLog::open(dir.join("agg"), "aggregator", Some(rotated)).unwrap();
    agg.append(
        Kind::RoundCompleted,
        Some(2),
        None,
        json!({"seconds": 12.25}),
    )
    .unwrap();
    let head = agg.append_signed_head(Some(2)).unwrap();
    witness(&mut site, 2, head);
    site.append_signed_head(Some(2)).unwrap();
    drop((agg, site));
    let agg_export = dir.join("agg.jsonl");
    let site_export = dir.join("site.jsonl");
    export(&dir.join("agg"), &agg_export);
    export(&dir.join("site"), &site_export);
    (agg_export, site_export, first)
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn jcs_exports_verify_independently_and_tampering_fails() {
    if !has_cryptography() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (agg, site, fingerprint) = logs(dir.path());
    let (code, text) = python(&[
        s(&agg),
        "--trusted-key",
        &fingerprint,
        "--witness",
        s(&site),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("ok:"), "{text}");
    let (code, text) = python(&[s(&site)]);
    assert_eq!(code, 0, "{text}");

    // Pinned to another key.
    let other = AuditKey::ephemeral().fingerprint();
    let (code, text) = python(&[s(&agg), "--trusted-key", &other]);
    assert_eq!(code, 1, "{text}");
    assert!(text.starts_with("FAIL:"), "{text}");

    // A record edited in place (its hash restated cannot help: the next prev_hash differs).
    let original = std::fs::read_to_string(&agg).unwrap();
    let edited = dir.path().join("edited.jsonl");
    std::fs::write(&edited, original.replacen("12.25", "13.25", 1)).unwrap();
    let (code, text) = python(&[s(&edited)]);
    assert_eq!(code, 1, "{text}");

    // Cut after round 1: the site's witness of round 2 names the round.
    let cut = dir.path().join("cut.jsonl");
    let lines: Vec<&str> = original.lines().collect();
    std::fs::write(&cut, format!("{}\n", lines[..3].join("\n"))).unwrap();
    let (code, text) = python(&[s(&cut), "--witness", s(&site)]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("round 2"), "{text}");

    // Not canonical: the same record with a space after its first comma.
    let spaced = dir.path().join("spaced.jsonl");
    let rest = lines[1..].join("\n");
    std::fs::write(
        &spaced,
        format!("{}\n{rest}\n", lines[0].replacen(',', ", ", 1)),
    )
    .unwrap();
    let (code, text) = python(&[s(&spaced)]);
    assert_eq!(code, 1, "{text}");
}

#[test]
fn jcs_encoding_matches_rfc_8785_number_vectors() {
    // RFC 8785 Appendix B, and the spellings an ECMAScript engine gives.
    let cases = [
        (json!(0.0), "0"),
        (json!(-0.0), "0"),
        (json!(1.0), "1"),
        (json!(0.1), "0.1"),
        (json!(1e-7), "1e-7"),
        (json!(1e21), "1e+21"),
        (json!(1e20), "100000000000000000000"),
        (json!(5e-324), "5e-324"),
        (json!(333_333_333.333_333_3), "333333333.3333333"),
        (json!(9_007_199_254_740_992_u64), "9007199254740992"),
        (json!(-1.5e300), "-1.5e+300"),
    ];
    for (value, expected) in cases {
        let mut out = Vec::new();
        quorum_audit::write_canonical(&value, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), expected, "{value}");
    }
    let mut out = Vec::new();
    quorum_audit::write_canonical(
        &json!({"b": 1, "a": {"d": [true, null], "c": "\u{7f}"}}),
        &mut out,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"a\":{\"c\":\"\u{7f}\",\"d\":[true,null]},\"b\":1}"
    );
}

#[test]
fn jcs_pruned_log_and_its_export_verify_independently() {
    if !has_cryptography() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, site, fingerprint) = logs(dir.path());
    // Round 1 (seqs 0..=2) moved out, signed by the rotated key now in force.
    let key = AuditKey::load(&dir.path().join("agg2.key")).unwrap();
    let mut agg = AuditLog::open(dir.path().join("agg"), "aggregator", Some(key)).unwrap();
    agg.prune(3, &dir.path().join("early.jsonl")).unwrap();
    drop(agg);
    let kept = dir.path().join("kept.jsonl");
    export(&dir.path().join("agg"), &kept);
    let early = dir.path().join("early.jsonl");
    let (code, text) = python(&[
        s(&kept),
        "--trusted-key",
        &fingerprint,
        "--pruned-export",
        s(&early),
        "--witness",
        s(&site),
    ]);
    assert_eq!(code, 0, "{text}");
    // Another file in place of the export the log signed.
    let other = dir.path().join("other.jsonl");
    let mut bytes = std::fs::read(&early).unwrap();
    bytes.extend_from_slice(b"\n");
    std::fs::write(&other, bytes).unwrap();
    let (code, text) = python(&[s(&kept), "--pruned-export", s(&other)]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not the one the log signed"), "{text}");
}
