//! The audit trail as an auditor meets it: a running aggregator's log read from its live copy
//! mid-round, a SIGTERM that ends the log with a signed head, each log checked against its
//! node's pinned key and the heads the other processes witnessed; and a flood of garbage
//! connections that must neither stop the node nor fill its log.

use std::time::Duration;

use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use crate::{
    raw::block_on,
    support::{Federation, Spec, binary, heavy, must, poll, release, run},
};

/// `quorum-audit --log <log> <args>` in the federation folder.
fn quorum_audit(fed: &Federation, log: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--log", log];
    all.extend_from_slice(args);
    run(&binary("quorum-audit"), &all, fed.dir.path())
}

#[test]
fn live_audit_of_a_running_aggregator_then_sigterm_ends_with_a_signed_head() {
    let _heavy = heavy();
    let fed = Federation::new(Spec::new(&["alpha", "beta"]));
    let mut aggregator = fed.start_aggregator("aggregator");
    // Alpha keeps trying to reconnect once the aggregator is gone, until it is told to stop.
    let mut alpha = fed.spawn("alpha", fed.client_command("alpha", &release().client, 120));
    // Beta leaves after round 1, so round 2 waits for its cohort (120 s): the aggregator is
    // mid-federation, deterministically, while it is audited.
    let mut beta_command = fed.client_command("beta", &release().client, 5);
    beta_command.args(["--exit-after-rounds", "1"]);
    let _beta = fed.spawn("beta", beta_command);
    aggregator.wait_for_stderr("round 1 done", Duration::from_secs(180));

    // The store is the running node's: the error says where to read instead.
    let locked = fed.aggregator_audit(&["verify"]);
    let said = String::from_utf8_lossy(&locked.stderr);
    assert!(
        !locked.status.success() && said.contains("audit.jsonl"),
        "{said}"
    );

    // The live copy can be read while round 2 waits: it verifies pinned to the aggregator's
    // key, and soon holds alpha's round-1 head (beta left before answering).
    let pinned = fed.audit_keys["aggregator"].clone();
    let live = "aggregator-state/audit.jsonl";
    let export = poll("alpha's round-1 head", Duration::from_secs(60), || {
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
        (witnessed == 1).then_some(export)
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

    // The stopped log against its pinned key and the sites' witness records (alpha's read from
    // its live copy: it still runs), and each site's log against the aggregator's.
    let verified = must(fed.aggregator_audit(&[
        "verify",
        "--trusted-key",
        &pinned,
        "--witness",
        "alpha-state/audit.jsonl",
        "--witness",
        "beta-state/audit",
    ]));
    assert!(verified.starts_with("ok:"), "{verified}");
    // A site asked to stop does the same.
    alpha.terminate();
    assert!(!alpha.wait(Duration::from_secs(60)).success());
    assert!(
        alpha.stderr_text().contains("stopped by SIGTERM"),
        "{}",
        alpha.describe()
    );
    let export = must(fed.site_audit("alpha", &["export"]));
    let kinds: Vec<serde_json::Value> = export
        .lines()
        .rev()
        .take(2)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].clone())
        .collect();
    assert_eq!(kinds, ["signed_head", "stop"], "{export}");

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

#[test]
fn handshake_flood_leaves_the_node_serving_and_the_log_small() {
    let _heavy = heavy();
    // Two sites needed, one started: the aggregator waits for its cohort throughout.
    let fed = Federation::new(Spec::new(&["alpha", "beta"]));
    let mut aggregator = fed.start_aggregator("aggregator");
    let live = fed.path("aggregator-state/audit.jsonl");
    let before = std::fs::metadata(&live).expect("live copy").len();

    // 10,000 connections in a burst, 50 at a time, each sending garbage instead of a
    // ClientHello and hanging up.
    let address = fed.address();
    let connected: u64 = block_on(async {
        let workers: Vec<_> = (0..50)
            .map(|_| {
                let address = address.clone();
                tokio::spawn(async move {
                    let mut connected = 0;
                    for _ in 0..200 {
                        if let Ok(mut tcp) = TcpStream::connect(&address).await {
                            connected += 1;
                            let _ = tcp.write_all(b"\x16\x03\x01\x00\x05garbage").await;
                        }
                    }
                    connected
                })
            })
            .collect();
        let mut total = 0;
        for worker in workers {
            total += worker.await.expect("flood worker");
        }
        total
    });
    assert!(connected >= 9_900, "only {connected} connections were made");

    // Still serving: a genuine site joins right after.
    let _alpha = fed.start_client("alpha");
    aggregator.wait_for_stderr("alpha joined", Duration::from_secs(60));
    assert!(aggregator.running());

    // Every refused connection is accounted for, most of them in per-source summaries at each
    // 10 s interval's end; the log grew by a few kilobytes, not by 10,000 records.
    let refused = |records: &[serde_json::Value]| {
        let mut one_by_one = 0;
        let mut summarised = 0;
        for record in records {
            let reason = record["details"]["reason"].as_str().unwrap_or_default();
            let site = record["site"].as_str().unwrap_or_default();
            if site.starts_with("(handshakes from") {
                let count = reason.split_whitespace().next().unwrap_or("0");
                summarised += count
                    .parse::<u64>()
                    .expect("a summary starts with its count");
            } else if site.starts_with("(handshake from") {
                one_by_one += 1;
            }
        }
        (one_by_one, summarised)
    };
    let (one_by_one, summarised) = poll(
        "every refused connection to be on the record",
        Duration::from_secs(60),
        || {
            let export = must(quorum_audit(
                &fed,
                "aggregator-state/audit.jsonl",
                &["export"],
            ));
            let records: Vec<serde_json::Value> = export
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let (one, summarised) = refused(&records);
            (one + summarised >= connected).then_some((one, summarised))
        },
    );
    assert_eq!(one_by_one + summarised, connected);
    assert!(one_by_one <= 16 * 10, "{one_by_one} records one by one");
    let grown = std::fs::metadata(&live).unwrap().len() - before;
    eprintln!(
        "{connected} connections: {one_by_one} refusals recorded one by one, {summarised} summarised; the log grew by {grown} bytes"
    );
    assert!(grown < 128 * 1024, "the log grew by {grown} bytes");
    assert!(
        !aggregator.stderr_text().contains("panicked"),
        "{}",
        aggregator.describe()
    );
}
