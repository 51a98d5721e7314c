//! The audit trail as an auditor meets it: a running aggregator's log read from its live copy
//! mid-round, a SIGTERM that ends the log with a signed head, and each log checked against its
//! node's pinned key and the heads the other processes witnessed.

use std::time::Duration;

use crate::support::{Federation, Spec, binary, heavy, must, poll, run};

/// `quorum-audit --log <log> <args>` in the federation folder.
fn quorum_audit(fed: &Federation, log: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--log", log];
    all.extend_from_slice(args);
    run(&binary("quorum-audit"), &all, fed.dir.path())
}

#[test]
fn live_audit_of_a_running_aggregator_then_sigterm_ends_with_a_signed_head() {
    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta"]);
    spec.rounds = 3;
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let _alpha = fed.start_client("alpha");
    let _beta = fed.start_client("beta");
    aggregator.wait_for_stderr("round 1 done", Duration::from_secs(180));

    // The store is the running node's: the error says where to read instead.
    let locked = fed.aggregator_audit(&["verify"]);
    let said = String::from_utf8_lossy(&locked.stderr);
    assert!(
        !locked.status.success() && said.contains("audit.jsonl"),
        "{said}"
    );

    // The live copy can be read while round 2 runs: it verifies pinned to the aggregator's
    // key, and soon holds both sites' round-1 heads.
    let pinned = fed.audit_keys["aggregator"].clone();
    let live = "aggregator-state/audit.jsonl";
    let export = poll("both sites' round-1 heads", Duration::from_secs(60), || {
        let verified = must(quorum_audit(
            &fed,
            live,
            &["verify", "--trusted-key", &pinned],
        ));
        assert!(verified.starts_with("ok:"), "{verified}");
        let export = must(quorum_audit(&fed, live, &["export"]));
        let witnessed = export
            .lines()
            .filter(|l| l.contains(r#""kind":"witness""#) && l.contains(r#""round":1,"#))
            .count();
        (witnessed == 2).then_some(export)
    });
    assert!(export.contains(r#""kind":"signed_head""#), "{export}");
    assert!(
        aggregator.running(),
        "the aggregator kept running while it was audited"
    );

    // SIGTERM: the log ends with a stop record and a signed head, and the process says how
    // to resume.
    aggregator.terminate();
    let status = aggregator.wait(Duration::from_secs(60));
    assert!(!status.success());
    let said = aggregator.stderr_text();
    assert!(said.contains("stopped by SIGTERM"), "{said}");
    let export = must(fed.aggregator_audit(&["export"]));
    let last: Vec<serde_json::Value> = export
        .lines()
        .rev()
        .take(2)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(last[0]["kind"], "signed_head", "{export}");
    assert_eq!(last[1]["kind"], "stop");
    assert_eq!(last[1]["details"]["signal"], "SIGTERM");

    // The stopped log against its pinned key and both sites' witness records (read from their
    // live copies: the sites still run), and each site's log against the aggregator's.
    let verified = must(fed.aggregator_audit(&[
        "verify",
        "--trusted-key",
        &pinned,
        "--witness",
        "alpha-state/audit.jsonl",
        "--witness",
        "beta-state/audit.jsonl",
    ]));
    assert!(verified.starts_with("ok:"), "{verified}");
    for site in ["alpha", "beta"] {
        let log = format!("{site}-state/audit.jsonl");
        let key = &fed.audit_keys[site];
        let args = [
            "verify",
            "--trusted-key",
            key,
            "--witness",
            "aggregator-state/audit",
        ];
        let verified = must(quorum_audit(&fed, &log, &args));
        assert!(verified.contains("heads held elsewhere"), "{verified}");
    }
}
