//! A whole federation: two sites, two rounds, secure aggregation and DP, then the audit trail.

use std::{fs, time::Duration};

use crate::support::{
    self, Federation, Spec, binary, heavy, mean_val_loss_before, must, records, run,
};

#[test]
fn federation_end_to_end() {
    let _heavy = heavy();
    let fed = Federation::new(Spec::new(&["alpha", "beta"]));
    let (aggregator, sites) = fed.run_to_end(Duration::from_secs(240));
    for site in &sites {
        let out = site.stdout_text();
        assert!(
            out.contains("site done: 2 rounds contributed, 0 declined"),
            "unexpected site summary: {out}"
        );
    }

    // The model moved, and it got better on the sites' validation data.
    let state = fed.state().expect("state.json after the run");
    let last = state["last_checkpoint"].as_u64().expect("last_checkpoint");
    assert!(last >= 2, "last checkpoint {last}: {state}");
    let initial = fs::read(fed.path("initial.safetensors")).expect("initial model");
    let final_model = fs::read(fed.path(&format!(
        "aggregator-state/checkpoints/round-{last:04}.safetensors"
    )))
    .expect("final checkpoint");
    assert_ne!(initial, final_model, "the global model did not change");
    let history = state["history"].as_array().expect("history");
    let trained: Vec<_> = history
        .iter()
        .filter(|h| h["evaluation_only"] == false)
        .collect();
    assert_eq!(trained.len(), 2, "two training rounds: {state}");
    for round in &trained {
        assert_eq!(round["survivors"].as_array().map(Vec::len), Some(2));
    }
    // The final evaluation is in the aggregator's summary table (not in state.json, see
    // tests/README.md): its "global val" column is the sites' mean loss of the final model.
    let report = aggregator.stdout_text();
    let final_loss: f64 = report
        .lines()
        .find_map(|l| l.strip_prefix("final"))
        .and_then(|row| row.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no final evaluation row in the summary:\n{report}"));
    let before = mean_val_loss_before(trained[0]);
    assert!(
        final_loss < before,
        "validation loss did not fall: {before} -> {final_loss}"
    );
    must(support::run(
        &support::binary("quorum-aggregator"),
        &["report", "--state", "aggregator-state", "--out", "report"],
        fed.dir.path(),
    ));
    assert!(fed.path("report/report.md").exists() && fed.path("report/loss.png").exists());

    // Every audit log is intact, and the sites agree with the aggregator on each model.
    assert!(must(fed.aggregator_audit(&["verify"])).starts_with("ok:"));
    for site in ["alpha", "beta"] {
        assert!(must(fed.site_audit(site, &["verify"])).starts_with("ok:"));
    }
    let export = must(fed.aggregator_audit(&["export"]));
    let export_path = fed.path("aggregator-audit.jsonl");
    fs::write(&export_path, &export).expect("write export");
    for site in ["alpha", "beta"] {
        must(fed.site_audit(
            site,
            &["reconcile", "--aggregator-export", "aggregator-audit.jsonl"],
        ));
    }
    let listing = must(fed.aggregator_audit(&["list", "--round", "1"]));
    for kind in ["cohort_selected", "upload_digest", "model_digest"] {
        assert!(listing.contains(kind), "no {kind} in round 1:\n{listing}");
    }
    let all = fed.aggregator_records();
    assert_eq!(records(&all, "upload_digest", Some(1)).len(), 2);

    // Reconciliation notices an aggregator record that disagrees with the site's.
    let digest = records(&all, "model_digest", Some(1))[0]["details"]["sha256"]
        .as_str()
        .expect("model digest")
        .to_owned();
    let forged = export.replace(&digest, &"0".repeat(64));
    fs::write(&export_path, forged).expect("write forged export");
    let refused = fed.site_audit(
        "alpha",
        &["reconcile", "--aggregator-export", "aggregator-audit.jsonl"],
    );
    assert!(
        !refused.status.success(),
        "reconcile accepted an export with a forged model digest"
    );
}

#[test]
fn pilot_three_and_four_sites_complete_with_default_secure_aggregation() {
    let _heavy = heavy();
    for sites in [
        &["alpha", "beta", "gamma"][..],
        &["alpha", "beta", "gamma", "delta"],
    ] {
        let mut spec = Spec::new(sites);
        spec.rounds = 1;
        let fed = Federation::new(spec);
        // The fractions as a pilot leaves them: not written, so their defaults apply.
        let path = fed.path("federation.toml");
        let text = fs::read_to_string(&path).expect("federation.toml");
        let pilot: String = text
            .lines()
            .filter(|l| !l.starts_with("corrupt_fraction") && !l.starts_with("dropout_fraction"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_ne!(
            pilot, text,
            "the test must remove the fractions it claims to"
        );
        fs::write(&path, pilot).expect("rewrite federation.toml");
        let checked = must(run(
            &binary("quorum-aggregator"),
            &["policy", "check", "--config", "federation.toml"],
            fed.dir.path(),
        ));
        let n = sites.len();
        assert!(
            checked.contains(&format!("a cohort of {n} sites tolerates 0 dropout")),
            "{checked}"
        );

        let (aggregator, _sites) = fed.run_to_end(Duration::from_secs(300));
        let state = fed.state().expect("state.json");
        let survivors = state["history"][0]["survivors"]
            .as_array()
            .expect("survivors");
        assert_eq!(survivors.len(), n, "{}", aggregator.describe());
        assert!(
            aggregator.stderr_text().contains(&format!(
                "with {n} sites secure aggregation tolerates no dropout"
            )),
            "{}",
            aggregator.describe()
        );
    }
}

#[test]
fn heartbeat_keeps_sites_whose_training_outlasts_three_phase_deadlines() {
    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta"]);
    spec.rounds = 1;
    spec.phase_timeout_secs = 3;
    spec.local_steps = 250;
    let fed = Federation::new(spec);
    let (aggregator, _sites) = fed.run_to_end(Duration::from_secs(300));
    let state = fed.state().expect("state.json");
    let round = &state["history"][0];
    assert_eq!(
        round["survivors"],
        serde_json::json!(["alpha", "beta"]),
        "{}",
        aggregator.describe()
    );
    // Each site trained for longer than three phase deadlines, sending heartbeats meanwhile.
    for site in ["alpha", "beta"] {
        let seconds = round["reports"][site]["seconds"].as_f64().expect("seconds");
        assert!(seconds > 9.0, "{site} trained for {seconds} s only");
    }
    assert!(!aggregator.stderr_text().contains("no heartbeat"));
}
