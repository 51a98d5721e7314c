//! Federations simulated in one process on a virtual clock: dropouts in every phase, every
//! deadline, retries under fresh round ids, restarts, and an aggregator that rewrites what it
//! sends. Each runs in milliseconds of real time, however long the virtual deadlines.

mod sim_support;

use std::{collections::BTreeSet, time::Duration};

use quorum_crypto::secagg::Phase;
use quorum_proto::v1::server_message::Body as ToSite;
use quorum_round::{Event, Outcome, What};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha20Rng;
use sim_support::{Fault, Sends, Sim, federation_toml, policy, site_policy};

/// Largest error the DP encoding's rounding may leave in a decoded mean without noise.
const ROUNDING: f32 = 1e-3;

fn max_gap(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn names(sim: &Sim, pick: impl Fn(&str) -> bool) -> Vec<String> {
    sim.sites.keys().filter(|n| pick(n)).cloned().collect()
}

fn phase_dropouts(sim: &Sim, round: u32, phase: Phase) -> BTreeSet<String> {
    sim.facts("phase_completed")
        .into_iter()
        .filter(|f| f.round == Some(round))
        .find_map(|f| match &f.what {
            What::PhaseCompleted {
                phase: p, dropouts, ..
            } if *p == phase.name() => Some(dropouts.iter().cloned().collect()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {phase} record for round {round}"))
}

fn refusals(facts: &[quorum_round::Fact]) -> Vec<String> {
    facts
        .iter()
        .filter_map(|f| match &f.what {
            What::Refused { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn sim_thousand_sites_with_random_dropouts_in_every_phase() {
    let text = federation_toml(1000, true, false)
        .replace("min_clients = 1000", "min_clients = 900")
        .replace("corrupt_fraction = 0.1", "corrupt_fraction = 0.05")
        .replace("dropout_fraction = 0.3", "dropout_fraction = 0.15");
    let fed = policy(&text);
    let mut sim = Sim::new(&fed, site_policy(false, false), 1000, 16);
    // 2% of the sites disconnect before each of the six messages a site sends.
    let mut order: Vec<String> = sim.sites.keys().cloned().collect();
    order.shuffle(&mut ChaCha20Rng::seed_from_u64(1));
    let mut dropped_at = Vec::new();
    for (kind, chunk) in Sends::ALL.iter().zip(order.chunks(20)) {
        for name in chunk {
            sim.fault(name, Fault::DisconnectBefore(*kind));
        }
        dropped_at.push((*kind, chunk.iter().cloned().collect::<BTreeSet<_>>()));
    }
    sim.connect_all();
    sim.run();

    let summary = &sim.history()[0];
    assert_eq!(summary.round, 1);
    // An update is in the sum once uploaded: sites lost after the upload are still in it.
    let lost_before_upload: BTreeSet<String> = dropped_at
        .iter()
        .filter(|(kind, _)| *kind <= Sends::Upload)
        .flat_map(|(_, sites)| sites.iter().cloned())
        .collect();
    let expected = names(&sim, |n| !lost_before_upload.contains(n));
    assert_eq!(summary.survivors, expected);
    assert_eq!(summary.survivors.len(), 920);
    let gap = max_gap(&sim.applied[&1], &sim.mean_update(&expected));
    assert!(gap < ROUNDING, "decoded mean off by {gap}");
    // Each phase records exactly the sites lost in it.
    for (kind, sites) in &dropped_at {
        if let Some(phase) = kind.phase() {
            assert_eq!(&phase_dropouts(&sim, 1, phase), sites, "{phase}");
        }
    }
    // Sites that declined nothing and stayed to the end saw their update included.
    let kept = &sim.sites[&expected[0]];
    assert!(kept.outcomes.iter().any(|(round, outcome)| *round == 1
        && matches!(outcome, Outcome::Completed { included: true, .. })));
}

#[test]
fn sim_every_phase_deadline_closes_the_phase_on_the_virtual_clock() {
    // The phase deadline is 30 s, local training takes 5 s: a silent site costs the round
    // exactly one deadline in the phase it stalls in.
    for kind in Sends::ALL {
        let text = federation_toml(10, true, false).replace("min_clients = 10", "min_clients = 8");
        let mut sim = Sim::new(&policy(&text), site_policy(false, false), 10, 8);
        sim.fault("site-0003", Fault::StallBefore(kind));
        sim.connect_all();
        sim.run_until(|s| !s.history().is_empty());
        let summary = &sim.history()[0];
        let expected_seconds = match kind {
            // Decisions wait 30 s, then training takes 5.
            Sends::Decision => 35.0,
            // The training deadline (30 s from the model) covers training.
            Sends::Advertise => 30.0,
            _ => 35.0,
        };
        assert_eq!(summary.seconds, expected_seconds, "stalled before {kind:?}");
        let in_sum = summary.survivors.contains(&"site-0003".to_string());
        assert_eq!(in_sum, kind > Sends::Upload, "stalled before {kind:?}");
        if let Some(phase) = kind.phase() {
            assert_eq!(
                phase_dropouts(&sim, 1, phase),
                BTreeSet::from(["site-0003".to_string()]),
                "{phase}"
            );
        }
    }
}

#[test]
fn sim_a_short_cohort_times_out_and_every_attempt_spends_a_fresh_round_id() {
    let fed = policy(&federation_toml(10, true, false));
    let mut sim = Sim::new(&fed, site_policy(false, false), 10, 8);
    for name in names(&sim, |_| true).iter().take(5) {
        sim.connect(name);
    }
    sim.start();
    let elapsed = sim.run();
    // Three attempts of 120 s each, ids 1–3, then the federation stops.
    assert_eq!(elapsed, Duration::from_secs(360));
    let aborted: Vec<(Option<u32>, Option<u32>)> = sim
        .facts("round_aborted")
        .iter()
        .map(|f| match &f.what {
            What::RoundAborted { attempt, .. } => (f.round, *attempt),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        aborted,
        [(Some(1), Some(1)), (Some(2), Some(2)), (Some(3), Some(3))]
    );
    assert!(
        matches!(sim.events.last(), Some(Event::Failed(reason)) if reason.contains("3 attempts"))
    );
    assert_eq!(sim.saved.as_ref().map(|s| s.next_round), Some(4));
    assert!(sim.coordinator.is_done());
}

#[test]
fn sim_a_round_that_loses_too_many_sites_is_retried_under_a_new_id() {
    let fed = policy(&federation_toml(10, true, true));
    let mut sim = Sim::new(&fed, site_policy(false, true), 10, 8);
    // Five of ten vanish before uploading: fewer than the survivors the round needs.
    for name in names(&sim, |_| true).iter().take(5) {
        sim.fault(name, Fault::DisconnectBefore(Sends::Upload));
    }
    sim.connect_all();
    sim.run();
    let aborted = sim.facts("round_aborted");
    assert_eq!(aborted.len(), 1);
    assert_eq!(aborted[0].round, Some(1));
    // The retry is round 2, with everyone back; then the final evaluation is round 3.
    let rounds: Vec<(u32, bool)> = sim
        .history()
        .iter()
        .map(|s| (s.round, s.evaluation_only))
        .collect();
    assert_eq!(rounds, [(2, false), (3, true)]);
    // The retry starts as soon as enough sites are back.
    assert!(sim.history()[0].survivors.len() >= 6);
    assert!(
        sim.history()[0]
            .survivors
            .contains(&"site-0009".to_string())
    );
    // A site that uploaded in round 1 spent privacy on it and again on round 2, each time the
    // ρ it computed itself, which is the ρ the aggregator announced.
    let stayed = &sim.sites["site-0009"];
    assert!(stayed.ledger.contains(1) && stayed.ledger.contains(2));
    let offered: std::collections::BTreeMap<u32, f64> = sim
        .facts("cohort_selected")
        .iter()
        .filter_map(|f| match &f.what {
            What::CohortSelected(offer) => Some((f.round?, offer.rho)),
            _ => None,
        })
        .collect();
    let spent: Vec<(u32, f64)> = stayed
        .audit
        .iter()
        .filter_map(|f| match f.what {
            What::SitePrivacy { rho, .. } => Some((f.round?, rho)),
            _ => None,
        })
        .collect();
    assert_eq!(spent.len(), 2);
    for (round, rho) in spent {
        assert!(rho > 0.0);
        assert_eq!(rho, offered[&round], "round {round}");
    }
    // Every connected site heard of the abort, and recorded it.
    assert!(
        stayed
            .audit
            .iter()
            .any(|f| f.round == Some(1) && matches!(f.what, What::RoundAborted { .. }))
    );
}

#[test]
fn sim_a_restarted_coordinator_resumes_without_reoffering_a_spent_round_id() {
    let text = federation_toml(10, true, false).replace("rounds = 1", "rounds = 3");
    let fed = policy(&text);
    let mut sim = Sim::new(&fed, site_policy(false, false), 10, 8);
    sim.connect_all();
    // Stop in the middle of round 2: its id is spent, nothing of it completed.
    sim.run_until(|s| s.history().len() == 1 && s.coordinator.upload_window().is_some());
    let saved = sim.saved.clone().expect("state saved");
    assert_eq!(saved.next_round, 3);
    assert_eq!(saved.history.len(), 1);

    let mut resumed = Sim::resume(
        &fed,
        site_policy(false, false),
        10,
        8,
        saved,
        sim.model.clone(),
    );
    assert!(matches!(
        resumed.audit.first().map(|f| &f.what),
        Some(What::Resumed {
            resumed_after_rounds: 1
        })
    ));
    resumed.connect_all();
    resumed.run();
    let rounds: Vec<u32> = resumed.history().iter().map(|s| s.round).collect();
    assert_eq!(rounds, [1, 3, 4, 5], "round 2 is never offered again");
    assert!(resumed.coordinator.is_done());
    assert!(matches!(resumed.events.last(), Some(Event::Finished)));
}

#[test]
fn sim_plain_rounds_average_exactly_and_end_with_an_evaluation() {
    let text = federation_toml(5, false, false).replace("rounds = 1", "rounds = 3");
    let fed = policy(&text);
    let mut sim = Sim::new(&fed, site_policy(true, false), 5, 16);
    sim.connect_all();
    sim.run();
    let history = sim.history();
    assert_eq!(history.len(), 4);
    assert!(history[3].evaluation_only && history[3].reports.len() == 5);
    let everyone = names(&sim, |_| true);
    let mean = sim.mean_update(&everyone);
    for round in 1..=3 {
        assert!(max_gap(&sim.applied[&round], &mean) < ROUNDING);
    }
    // FedAvg with lr 1 moves the model by the mean update each round.
    let moved: Vec<f32> = mean.iter().map(|m| -3.0 * m).collect();
    assert!(max_gap(&sim.model, &moved) < 3.0 * ROUNDING);
    // The aggregator writes a signed head at every round's end and at the end.
    assert!(matches!(sim.events.last(), Some(Event::Finished)));
}

#[test]
fn sim_messages_out_of_phase_or_twice_are_refused_and_audited() {
    let fed = policy(&federation_toml(5, false, false));
    let mut sim = Sim::new(&fed, site_policy(true, false), 5, 8);
    sim.connect_all();
    sim.run_until(|s| s.coordinator.upload_window().is_some());
    let now = sim.now;
    // A decision while uploads are open, and the same upload twice.
    let decision = quorum_proto::v1::RoundDecision {
        round: 1,
        accept: true,
        reason: String::new(),
    };
    sim.coordinator.handle(
        now,
        "site-0001",
        quorum_proto::v1::client_message::Body::Decision(decision),
    );
    sim.run_until(|s| s.facts("upload_digest").len() == 1);
    let first = sim.facts("upload_digest")[0].site.clone().expect("a site");
    let values = sim.sites[&first]
        .update
        .iter()
        .map(|_| 0u32)
        .collect::<Vec<_>>();
    let upload = quorum_round::Upload {
        round: 1,
        values: &values,
        sha256: [0; 32],
        bytes: 0,
    };
    sim.coordinator.handle_upload(now, &first, upload);
    sim.drain_coordinator();
    let reasons = refusals(&sim.audit);
    assert!(reasons.contains(&"message in the wrong phase (expected UpdateChunk)".to_string()));
    assert!(reasons.contains(&"duplicate update for this round".to_string()));
    // Neither touched the sum.
    sim.run_until(|s| !s.history().is_empty());
    let everyone = names(&sim, |_| true);
    assert!(max_gap(&sim.applied[&1], &sim.mean_update(&everyone)) < ROUNDING);
}

#[test]
fn sim_sites_leave_a_round_whose_model_or_keys_the_aggregator_rewrote() {
    let text = federation_toml(10, true, false).replace("min_clients = 10", "min_clients = 9");
    let mut sim = Sim::new(&policy(&text), site_policy(false, false), 10, 8);
    // site-0001 gets a model that is not the announced one; site-0002 a neighbour's
    // advertisement with a forged signature; site-0003 a result whose digest is cut short;
    // site-0004 an offer whose round seed is cut short.
    sim.rewrite = Some(Box::new(|to, body| {
        match (to, body) {
            ("site-0001", ToSite::ModelChunk(chunk)) => {
                let mut data = chunk.data.to_vec();
                data[0] ^= 1;
                chunk.data = data.into();
            }
            ("site-0002", ToSite::PeerKeys(keys)) => keys.peers[0].signature[0] ^= 1,
            ("site-0003", ToSite::Result(result)) => result.new_model_sha256.truncate(31),
            ("site-0004", ToSite::RoundConfig(config)) => config.round_seed.truncate(31),
            _ => {}
        }
        true
    }));
    sim.connect_all();
    sim.run_until(|s| s.history().len() == 1 && s.sites["site-0003"].outcomes.len() == 1);
    let ended = |site: &str| sim.sites[site].outcomes.first().map(|(_, o)| o.clone());
    let left = |site: &str| match ended(site) {
        Some(Outcome::Left(reason)) => reason,
        other => panic!("{site} did not leave round 1: {other:?}"),
    };
    assert!(left("site-0001").contains("does not match the digest"));
    assert!(left("site-0002").contains("secure aggregation check failed"));
    assert!(left("site-0003").contains("must be 32 bytes, got 31"));
    assert!(matches!(
        ended("site-0004"),
        Some(Outcome::Declined(reason)) if reason.contains("round seed must be 32 bytes")
    ));
    // Each audited why, as its only refusal of the round, and revealed nothing more.
    for site in ["site-0001", "site-0002", "site-0003"] {
        let audit: Vec<_> = sim.sites[site]
            .audit
            .iter()
            .filter(|f| f.round == Some(1))
            .cloned()
            .collect();
        assert_eq!(refusals(&audit), [left(site)]);
    }
    // The round went on without the first two (site-0003's update was in before it left).
    let survivors = &sim.history()[0].survivors;
    assert_eq!(survivors.len(), 7);
    for site in ["site-0001", "site-0002", "site-0004"] {
        assert!(!survivors.contains(&site.to_string()));
    }
}

#[test]
fn sim_sites_refuse_to_unmask_for_a_survivor_set_that_differs_between_them() {
    let fed = policy(&federation_toml(10, true, false));
    let mut sim = Sim::new(&fed, site_policy(false, false), 10, 8);
    // The aggregator tells site-0004 that site-0005 did not survive, and everyone else that
    // it did: site-0004 signs a different set, so its signature fails the others' check and
    // nobody reveals both kinds of share for anyone.
    sim.rewrite = Some(Box::new(|to, body| {
        if let ("site-0004", ToSite::Survivors(set)) = (to, body) {
            set.clients.retain(|&c| c != 5);
        }
        true
    }));
    sim.connect_all();
    sim.run();
    let reasons = refusals(&sim.audit);
    assert!(
        reasons.iter().any(|r| r.contains("signature")),
        "the aggregator's own check refuses site-0004's signature: {reasons:?}"
    );
    // The round still completes with every upload in the sum.
    assert_eq!(sim.history()[0].survivors.len(), 10);
    // site-0004 never got an unmask request, so it revealed no share, and left.
    assert!(
        sim.sites["site-0004"]
            .outcomes
            .iter()
            .any(|(round, o)| *round == 1 && matches!(o, Outcome::Left(_)))
    );
}
