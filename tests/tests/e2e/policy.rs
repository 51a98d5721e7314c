//! A site's own policy outranks the aggregator: a site whose ε budget cannot pay for a round
//! declines it, says why, and the federation stops cleanly when too few sites accept.

use std::time::Duration;

use crate::support::{Federation, Spec, heavy, records, release};

#[test]
fn policy_refusal() {
    let _heavy = heavy();
    let fed = Federation::new(Spec::new(&["alpha", "beta"]));
    // One round costs far more than ε = 1 at this noise level.
    fed.write_site_toml("beta", 1.0);
    let mut aggregator = fed.start_aggregator("aggregator");
    let mut alpha = fed.start_client("alpha");
    let mut beta = fed.start_client("beta");

    let status = aggregator.wait(Duration::from_secs(120));
    assert!(
        !status.success(),
        "the aggregator cannot finish with one willing site"
    );
    let agg_err = aggregator.stderr_text();
    assert!(
        agg_err.contains("beta declined round 1")
            && agg_err.contains("3 attempts in a row failed")
            && agg_err.contains("1 sites accepted round"),
        "aggregator should say why it stopped:\n{agg_err}"
    );
    // The sites notice the aggregator is gone and give up after their reconnect window.
    alpha.wait(Duration::from_secs(60));
    beta.wait(Duration::from_secs(60));
    let beta_err = beta.stderr_text();
    assert!(
        beta_err.contains("declining round 1") && beta_err.contains("policy.max_epsilon = 1"),
        "beta should say it declined and why:\n{beta_err}"
    );
    assert!(
        !alpha.stderr_text().contains("declining"),
        "alpha has budget and must not decline"
    );
    for text in [&agg_err, &alpha.stderr_text(), &beta_err] {
        assert!(!text.contains("panicked"), "a process panicked:\n{text}");
    }

    // Both sides audited it; beta spent nothing.
    let all = fed.aggregator_records();
    let declined = records(&all, "refusal", None)
        .into_iter()
        .filter(|r| r["site"] == "beta" && r["details"]["what"] == "round declined by site policy")
        .count();
    assert_eq!(declined, 3, "one audited refusal per attempt");
    assert_eq!(records(&all, "round_aborted", None).len(), 3);
    assert!(records(&all, "checkpoint", None).is_empty());
    let beta_log = fed.site_records("beta");
    assert_eq!(records(&beta_log, "refusal", None).len(), 3);
    assert!(records(&beta_log, "privacy_spent", None).is_empty());
}

#[test]
fn roster_change_needs_an_explicit_audited_act() {
    // No aggregator runs: each start records the policy, then gives up reaching it after 1 s.
    let fed = Federation::new(Spec::new(&["alpha"]));
    let site_toml = fed.path("alpha.toml");
    let base = std::fs::read_to_string(&site_toml).expect("alpha.toml");
    let pin = |members: &[&str]| {
        let lines: String = members
            .iter()
            .map(|m| format!("{m} = \"{}\"\n", "ab".repeat(32)))
            .collect();
        std::fs::write(&site_toml, format!("{base}\n[policy.roster]\n{lines}")).expect("write");
    };
    let start = |extra: &[&str]| {
        let mut command = fed.client_command("alpha", &release().client, 1);
        command.args(extra);
        let mut site = fed.spawn("alpha", command);
        let status = site.wait(Duration::from_secs(60));
        assert!(!status.success(), "no aggregator to reach");
        site.stderr_text()
    };
    pin(&["alpha"]);
    let first = start(&[]);
    assert!(!first.contains("differs"), "{first}");

    // beta added to site.toml behind the site's back: it refuses to start, recording nothing.
    pin(&["alpha", "beta"]);
    let refused = start(&[]);
    assert!(
        refused.contains("differs from the roster this site last ran with (added: beta)")
            && refused.contains("--accept-roster-change"),
        "{refused}"
    );
    // Accepted on purpose: recorded, and from then on the roster it runs with.
    let accepted = start(&["--accept-roster-change"]);
    assert!(
        accepted.contains("roster changed (added: beta)"),
        "{accepted}"
    );
    let again = start(&[]);
    assert!(!again.contains("differs"), "{again}");

    let log = fed.site_records("alpha");
    assert_eq!(records(&log, "policy_loaded", None).len(), 3);
    let changes = records(&log, "admin_action", None);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["details"]["action"], "roster_change");
    assert_eq!(changes[0]["details"]["added"], serde_json::json!(["beta"]));
}

#[test]
fn policy_check_names_files_that_are_not_there() {
    let fed = Federation::new(Spec::new(&["alpha", "beta"]));
    let agg = crate::support::binary("quorum-aggregator");
    let check = || {
        crate::support::run(
            &agg,
            &["policy", "check", "--config", "federation.toml"],
            fed.dir.path(),
        )
    };
    let ok = crate::support::must(check());
    assert!(ok.contains(": ok (federation"), "{ok}");
    std::fs::remove_file(fed.path("pki/ca/crl.pem")).expect("remove the CRL");
    std::fs::remove_file(fed.path("initial.safetensors")).expect("remove the model");
    let refused = check();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("names files that are not there")
            && stderr.contains("server.crl = ")
            && stderr.contains("model.initial_checkpoint = ")
            && !stderr.contains("server.ca = "),
        "{stderr}"
    );
    // A site's data folder is checked the same way.
    let site = std::fs::read_to_string(fed.path("alpha.toml")).expect("alpha.toml");
    let elsewhere = site.replace("builtin:", "corpus-not-copied-");
    std::fs::write(fed.path("alpha-moved.toml"), elsewhere).expect("write");
    let args = ["policy", "check", "--config", "alpha-moved.toml"];
    let refused = crate::support::run(&release().client, &args, fed.dir.path());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("data.path = ")
            && stderr.contains("is not there"),
        "{stderr}"
    );
}
