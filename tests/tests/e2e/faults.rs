//! Faults during a federation: a site killed mid-round, and the aggregator killed mid-round
//! and restarted from its state folder.

use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;

use crate::support::{Federation, Proc, Spec, heavy, must, poll, records};

fn trained_rounds(state: &Value) -> Vec<&Value> {
    state["history"]
        .as_array()
        .map(|h| h.iter().filter(|e| e["evaluation_only"] == false).collect())
        .unwrap_or_default()
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Five sites, cohorts of four with a SecAgg+ dropout allowance of one: a cohort member is
/// SIGKILLed while it trains; the round completes with the other three, the next round picks
/// the four sites left, and the federation ends normally.
#[test]
fn dropout_during_round() {
    let _heavy = heavy();
    let sites = ["alpha", "beta", "gamma", "delta", "epsilon"];
    let mut spec = Spec::new(&sites);
    spec.min_clients = 4;
    spec.max_clients = 4;
    spec.dropout_fraction = 0.25;
    // Long enough local training that the kill lands inside it; generous deadlines because
    // four trainers share the machine.
    spec.local_steps = 10;
    spec.phase_timeout_secs = 90;
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let mut clients: BTreeMap<String, Proc> = sites
        .iter()
        .map(|s| ((*s).to_owned(), fed.start_client(s)))
        .collect();

    aggregator.wait_for_stderr("round 1: local training", Duration::from_secs(120));
    // Four of the five sites train now; the one left out idles. Kill the busiest.
    let before: BTreeMap<String, u64> = clients
        .iter()
        .map(|(s, p)| (s.clone(), p.cpu_ticks()))
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let victim = clients
        .iter()
        .max_by_key(|(s, p)| p.cpu_ticks().saturating_sub(before[*s]))
        .map(|(s, _)| s.clone())
        .expect("five clients");
    clients.get_mut(&victim).expect("victim").kill();

    aggregator.wait_success(Duration::from_secs(240));
    for (site, client) in clients.iter_mut().filter(|(s, _)| **s != victim) {
        let status = client.wait(Duration::from_secs(30));
        assert!(status.success(), "{site} failed\n{}", client.describe());
    }
    let state = fed.state().expect("state.json");
    let rounds = trained_rounds(&state);
    assert_eq!(rounds.len(), 2, "{state}");
    let first = names(&rounds[0]["survivors"]);
    assert_eq!(first.len(), 3, "round 1 survivors: {first:?}");
    assert!(
        !first.contains(&victim),
        "{victim} cannot survive being killed"
    );
    assert_eq!(names(&rounds[0]["dropped"]), vec![victim.clone()]);
    let second = names(&rounds[1]["survivors"]);
    assert_eq!(second.len(), 4, "round 2 survivors: {second:?}");
    assert!(!second.contains(&victim));
    assert!(must(fed.aggregator_audit(&["verify"])).starts_with("ok:"));
}

/// Three rounds with two sites; the aggregator is SIGKILLed while round 2 runs and restarted
/// with the same configuration. The sites reconnect, the federation completes three rounds,
/// and nothing the aggregator acknowledged before the crash is lost.
#[test]
fn aggregator_crash_and_resume() {
    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta"]);
    spec.rounds = 3;
    spec.local_steps = 10;
    spec.phase_timeout_secs = 60;
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let reconnecting = |site: &str| {
        fed.spawn(
            site,
            fed.client_command(site, &crate::support::release().client, 120),
        )
    };
    let mut alpha = reconnecting("alpha");
    let mut beta = reconnecting("beta");

    let (round_one, next) = poll("round 1's checkpoint", Duration::from_secs(120), || {
        let state = fed.state()?;
        (state["last_checkpoint"].as_u64()? >= 1).then(|| {
            (
                state["history"][0]["model_sha256"]
                    .as_str()
                    .map(str::to_owned),
                // The round after round 1 (`next_round` may already name a later id: it is
                // saved as soon as a round starts).
                state["history"][0]["round"].as_u64().unwrap_or(0) + 1,
            )
        })
    });
    let round_one = round_one.expect("round 1 model digest");
    aggregator.wait_for_stderr(
        &format!("round {next}: local training"),
        Duration::from_secs(60),
    );
    aggregator.kill();
    let state = fed.state().expect("state.json");
    assert_eq!(
        state["last_checkpoint"].as_u64(),
        Some(1),
        "the kill must land inside round {next}; make the rounds longer"
    );

    let mut restarted = fed.start_aggregator("aggregator-restarted");
    restarted.wait_success(Duration::from_secs(300));
    alpha.wait_success(Duration::from_secs(30));
    beta.wait_success(Duration::from_secs(30));
    for site in [&alpha, &beta] {
        let stderr = site.stderr_text();
        assert!(
            stderr.contains("reconnecting") && stderr.matches("joined federation").count() >= 2,
            "the sites should have reconnected and joined again:\n{stderr}"
        );
    }

    let state = fed.state().expect("state.json");
    let rounds = trained_rounds(&state);
    assert_eq!(rounds.len(), 3, "three completed rounds: {state}");
    assert_eq!(rounds[0]["model_sha256"].as_str(), Some(round_one.as_str()));
    assert!(must(fed.aggregator_audit(&["verify"])).starts_with("ok:"));
    let all = fed.aggregator_records();
    let digests = records(&all, "model_digest", Some(1));
    assert!(
        digests
            .iter()
            .any(|r| r["details"]["sha256"] == round_one.as_str()),
        "round 1's model digest is missing after the restart"
    );
    assert_eq!(
        records(&all, "round_completed", None).len(),
        3,
        "one round_completed per completed round"
    );
    // A site never spends privacy twice under one round id.
    for site in ["alpha", "beta"] {
        let log = fed.site_records(site);
        let mut spent: Vec<u64> = records(&log, "privacy_spent", None)
            .iter()
            .filter_map(|r| r["round"].as_u64())
            .collect();
        let all_spent = spent.len();
        spent.dedup();
        assert_eq!(spent.len(), all_spent, "{site} spent twice on one round id");
    }
}
