//! Federations simulated in one process on a virtual clock: dropouts in every phase, every
//! deadline, retries under fresh round ids, restarts, and an aggregator that rewrites what it
//! sends. Each runs in milliseconds of real time, however long the virtual deadlines.

mod sim_support;

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    rc::Rc,
    time::Duration,
};

use quorum_crypto::secagg::Phase;
use quorum_policies::site_from_str;
use quorum_proto::v1::{client_message::Body as FromSite, server_message::Body as ToSite};
use quorum_round::{Event, Outcome, SiteTransmit, What};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha20Rng;
use sim_support::{
    Fault, Sends, Sim, SimList, federation_toml, policy, site_policy, site_policy_with,
};

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
        .replace("corrupt_fraction = 0.1", "corrupt_fraction = 0.0")
        .replace("dropout_fraction = 0.3", "dropout_fraction = 0.1");
    let fed = policy(&text);
    let mut sim = Sim::new(&fed, site_policy(false, false), 1000, 16);
    // 1% of the sites disconnect before each of the six messages a site sends.
    let mut order: Vec<String> = sim.sites.keys().cloned().collect();
    order.shuffle(&mut ChaCha20Rng::seed_from_u64(1));
    let mut dropped_at = Vec::new();
    for (kind, chunk) in Sends::ALL.iter().zip(order.chunks(10)) {
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
    assert_eq!(summary.survivors.len(), 960);
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
fn sim_uploads_added_in_pieces_sum_exactly_in_plain_and_secure_rounds() {
    for secure in [false, true] {
        let fed = policy(&federation_toml(10, secure, false));
        let mut sim = Sim::new(&fed, site_policy(!secure, false), 10, 40);
        sim.upload_pieces = 3;
        sim.connect_all();
        sim.run();
        let history = sim.history();
        assert_eq!(history[0].survivors.len(), 10, "secure: {secure}");
        let mean = sim.mean_update(&names(&sim, |_| true));
        assert!(
            max_gap(&sim.applied[&1], &mean) < ROUNDING,
            "secure: {secure}"
        );
        assert!(sim.facts("round_aborted").is_empty(), "secure: {secure}");
    }
}

#[test]
fn sim_an_upload_added_only_in_part_spoils_the_sum_and_the_round_is_redone() {
    for secure in [false, true] {
        // With DP: sites redo a round whose update left only under DP.
        let fed = policy(&federation_toml(10, secure, true));
        let mut sim = Sim::new(&fed, site_policy(!secure, true), 10, 40);
        sim.upload_pieces = 3;
        sim.upload_cut_short = Some("site-0002".into());
        sim.connect_all();
        sim.run();
        let aborted = sim.facts("round_aborted");
        assert_eq!(aborted.len(), 1, "secure: {secure}: {aborted:?}");
        assert_eq!(aborted[0].round, Some(1));
        let reason = format!("{:?}", aborted[0].what);
        assert!(reason.contains("only partly in the sum"), "{reason}");
        // Redone under a new id with every site.
        let rounds: Vec<(u32, bool)> = sim
            .history()
            .iter()
            .map(|s| (s.round, s.evaluation_only))
            .collect();
        assert_eq!(rounds, [(2, false), (3, true)], "secure: {secure}");
        assert_eq!(sim.history()[0].survivors.len(), 10, "secure: {secure}");
    }
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

/// How each site's round `round` ended.
fn outcomes(sim: &Sim, round: u32) -> Vec<(String, Option<Outcome>)> {
    sim.sites
        .values()
        .map(|s| {
            let outcome = s.outcomes.iter().find(|(r, _)| *r == round);
            (s.name.clone(), outcome.map(|(_, o)| o.clone()))
        })
        .collect()
}

/// Runs until round 1 aborts; every site must have declined it. Returns each one's reason.
fn declines_of_round_one(sim: &mut Sim) -> Vec<(String, String)> {
    sim.connect_all();
    sim.run_until(|s| !s.facts("round_aborted").is_empty());
    outcomes(sim, 1)
        .into_iter()
        .map(|(site, outcome)| match outcome {
            Some(Outcome::Declined(reason)) => (site, reason),
            other => panic!("{site} took part in round 1: {other:?}"),
        })
        .collect()
}

/// Ten sites, each assuming 10% of any cohort colludes with the aggregator.
fn ten_wary_sites() -> Sim {
    let federation = policy(&federation_toml(10, true, false));
    Sim::new(&federation, site_policy_with(false, false, 0.1, &[]), 10, 8)
}

#[test]
fn sim_hostile_low_threshold_or_min_survivors_is_refused_by_every_site() {
    // The attack as filed: n = 10, k = 9, one colluder; offer t = 5, m = 5 (valid by the old
    // coherence check alone); t alone low; m alone low (k = 8, where t = 5 is safe). Sites
    // assume 10% collude, so they need t ≥ ⌊(k + 1)/2⌋ + 1 and m ≥ 6, and decline, with the
    // reason audited, before revealing or sending anything.
    let attacks = [
        (9, 5, 5, "threshold 5 is below 6"),
        (9, 5, 7, "threshold 5 is below 6"),
        (8, 5, 5, "min_survivors 5 is below 6"),
    ];
    for (k, t, m, low) in attacks {
        let mut sim = ten_wary_sites();
        sim.rewrite = Some(Box::new(move |_, body| {
            if let ToSite::RoundConfig(config) = body
                && config.local_steps > 0
            {
                (config.neighbours, config.threshold, config.min_survivors) = (k, t, m);
            }
            true
        }));
        for (site, reason) in declines_of_round_one(&mut sim) {
            assert!(
                reason.contains("unsafe secure-aggregation parameters"),
                "{reason}"
            );
            assert!(reason.contains(low), "{reason}");
            assert_eq!(refusals(&sim.sites[&site].audit), [reason]);
            assert!(
                sim.sites[&site]
                    .sent
                    .iter()
                    .all(|(_, s)| *s == Sends::Decision)
            );
        }
    }
}

#[test]
fn sim_hostile_graph_seed_cannot_place_colluders_around_a_site() {
    // 500 sites, 10% assumed to collude: the aggregator's parameters (k = 106, t = 74) are safe
    // for a random neighbour graph, but the aggregator draws the graph's seed and could put all
    // 50 colluders next to one site. By default each site judges the threshold as if it had,
    // and declines; a site that trusts the seed (`assume_random_graph`) takes part.
    let text = federation_toml(500, true, false)
        .replace("dropout_fraction = 0.3", "dropout_fraction = 0.1");
    let mut sim = Sim::new(
        &policy(&text),
        site_policy_with(false, false, 0.1, &[]),
        500,
        8,
    );
    for (_, reason) in declines_of_round_one(&mut sim) {
        assert!(reason.contains("threshold 74 is below"), "{reason}");
        assert!(reason.contains("sparse graph"), "{reason}");
    }
    let mut trusting = site_policy_with(false, false, 0.1, &[]);
    trusting.policy.assume_random_graph = true;
    let mut sim = Sim::new(&policy(&text), trusting, 500, 8);
    sim.connect_all();
    sim.run_until(|s| {
        s.sites
            .values()
            .all(|site| site.sent.contains(&(1, Sends::Decision)))
    });
    assert!(
        outcomes(&sim, 1)
            .iter()
            .all(|(_, outcome)| outcome.is_none())
    );
}

#[test]
fn sim_hostile_split_views_of_the_offer_cannot_both_proceed() {
    // Three of ten sites are shown a different (still safe) offer: other t and m, another
    // min_survivors, another seed. The aggregator then relays every advertisement it received
    // to everyone, as a hostile one would, instead of dropping those that fail its own check.
    // Every signature covers the digest of the offer its signer saw, so the two groups cannot
    // verify each other: each site shown the real offer leaves on the first foreign
    // advertisement, and nobody shares keys. A cohort in another order is declined outright.
    type Change = fn(&mut quorum_proto::v1::RoundConfig);
    let variants: [(&str, Change); 4] = [
        ("threshold", |c| {
            (c.threshold, c.min_survivors) = (c.threshold + 1, c.min_survivors + 1)
        }),
        ("min_survivors", |c| c.min_survivors += 1),
        ("seed", |c| c.round_seed[0] ^= 1),
        ("cohort order", |c| c.cohort.swap(0, 1)),
    ];
    for (what, change) in variants {
        let mut sim = ten_wary_sites();
        let shown_other: BTreeSet<String> = (7..10).map(|i| format!("site-{i:04}")).collect();
        let adverts = Rc::new(RefCell::new(BTreeMap::new()));
        let seen = Rc::clone(&adverts);
        sim.observe = Some(Box::new(move |_, transmit| {
            if let SiteTransmit::Message(FromSite::Advertise(adv)) = transmit {
                seen.borrow_mut().insert(adv.client, adv.clone());
            }
        }));
        let other = shown_other.clone();
        sim.rewrite = Some(Box::new(move |to, body| {
            match body {
                ToSite::RoundConfig(config) if config.round == 1 && other.contains(to) => {
                    change(config)
                }
                ToSite::PeerKeys(keys) if keys.round == 1 => {
                    let me = to[5..].parse::<u32>().expect("site index");
                    keys.peers = adverts
                        .borrow()
                        .values()
                        .filter(|a| a.client != me)
                        .cloned()
                        .collect();
                }
                _ => {}
            }
            true
        }));
        sim.connect_all();
        sim.run_until(|s| !s.facts("round_aborted").is_empty() || !s.history().is_empty());
        assert!(sim.history().is_empty(), "{what}: round 1 completed");
        for site in sim.sites.values() {
            assert!(
                !site.sent.contains(&(1, Sends::ShareKeys)),
                "{what}: {} shared keys",
                site.name
            );
            let outcome = site.outcomes.iter().find(|(r, _)| *r == 1).map(|(_, o)| o);
            match (what, shown_other.contains(&site.name), outcome) {
                ("cohort order", true, Some(Outcome::Declined(reason))) => {
                    assert!(reason.contains("not sorted and unique"), "{reason}")
                }
                ("cohort order", ..) => {}
                (_, false, Some(Outcome::Left(reason))) => {
                    assert!(reason.contains("signature"), "{what}: {reason}")
                }
                (_, false, other) => panic!("{what}: {} did not leave: {other:?}", site.name),
                (_, true, _) => {}
            }
        }
    }
}

#[test]
fn sim_roster_refuses_a_cohort_with_an_unknown_member() {
    // The operator's CA certified an eleventh "site" that no member knows.
    let members: Vec<String> = (0..10).map(|i| format!("site-{i:04}")).collect();
    let roster: Vec<&str> = members.iter().map(String::as_str).collect();
    let text = federation_toml(11, true, false)
        .replace("dropout_fraction = 0.3", "dropout_fraction = 0.1");
    let mut sim = Sim::new(
        &policy(&text),
        site_policy_with(false, false, 0.0, &roster),
        11,
        8,
    );
    for (_, reason) in declines_of_round_one(&mut sim) {
        assert!(
            reason.contains("cohort member site-0010 is not in this site's roster"),
            "{reason}"
        );
    }
}

#[test]
fn sim_honest_minority_noise_survives_colluders_that_add_none() {
    // Plain rounds, so the sum is visible; 10 sites of which the federation and every site
    // assume 20% collude. The two colluders upload their update without noise. The noise left
    // in the sum must still be σ² = (0.5 · 10)² = 25 per coordinate: honest sites calibrated
    // theirs for 10 − 2 survivors, not 10 (which would leave 0.8 σ²).
    let text = federation_toml(10, false, true)
        .replace("corrupt_fraction = 0.1", "corrupt_fraction = 0.2");
    let dim = 4096;
    let mut sim = Sim::new(
        &policy(&text),
        site_policy_with(true, true, 0.2, &[]),
        10,
        dim,
    );
    sim.tamper_upload = Some(Box::new(|site, config, update, values| {
        if site == "site-0000" || site == "site-0001" {
            let mut silent = quorum_proto::secagg::dp_params(config).expect("valid offer");
            silent.noise_stddev = 0.0;
            let seed: [u8; 32] = config.round_seed.as_slice().try_into().expect("seed");
            let mut rng = ChaCha20Rng::seed_from_u64(9);
            // The same vector with the DP part replaced: the metric slots stay.
            let slots = values.split_off(silent.padded_dim);
            *values = quorum_crypto::dp::encode(update, &silent, &seed, &mut rng).expect("encode");
            values.extend(slots);
        }
    }));
    sim.connect_all();
    sim.run_until(|s| !s.history().is_empty());
    let everyone = names(&sim, |_| true);
    let sum_of_updates = sim.mean_update(&everyone);
    let noise: Vec<f64> = sim.applied[&1]
        .iter()
        .zip(&sum_of_updates)
        .map(|(mean, clean)| f64::from(10.0 * (mean - clean)))
        .collect();
    let variance = noise.iter().map(|x| x * x).sum::<f64>() / noise.len() as f64;
    // 4,096 coordinates: the sample variance is within ±10% of its expectation with
    // probability 1 − 10^-5.
    assert!(
        variance > 0.9 * 25.0,
        "noise variance {variance} below σ² = 25"
    );
    assert!(
        variance < 1.1 * 25.0 * 10.0 / 8.0,
        "noise variance {variance}"
    );
    // The published ρ is the closed form for σ² carried by the 8 honest survivors: Δ²/(2σ²)
    // with Δ = the clip norm 10, up to the discretisation terms.
    let offered = sim.facts("cohort_selected");
    let What::CohortSelected(offer) = &offered[0].what else {
        unreachable!()
    };
    assert!(
        (offer.rho - 100.0 / (2.0 * 25.0)).abs() < 0.01,
        "ρ = {}",
        offer.rho
    );
    let spent = sim.sites["site-0005"]
        .audit
        .iter()
        .find_map(|f| match f.what {
            What::SitePrivacy { rho, .. } => Some(rho),
            _ => None,
        });
    assert_eq!(spent, Some(offer.rho));
}

#[test]
fn sim_honest_minority_site_stricter_than_the_federation_never_adds_less_noise() {
    // The federation assumes nobody colludes and sizes the encoding for ten noisy survivors;
    // each site assumes two of ten collude, so it must add σ²/8 rather than σ²/10. Here that
    // noise no longer fits the encoding the offer chose (each site's noise is bounded in
    // integer units), so every site declines, with the reason audited, rather than add less.
    let text = federation_toml(10, false, true)
        .replace("corrupt_fraction = 0.1", "corrupt_fraction = 0.0");
    let mut sim = Sim::new(
        &policy(&text),
        site_policy_with(true, true, 0.2, &[]),
        10,
        4096,
    );
    for (site, reason) in declines_of_round_one(&mut sim) {
        assert!(
            reason.contains("invalid DP parameters for 8 honest survivors"),
            "{site}: {reason}"
        );
        assert_eq!(refusals(&sim.sites[&site].audit), [reason]);
    }
    assert!(sim.applied.is_empty());
}

/// The heads of `node` witnessed in `store`, as `(round, seq)`.
fn witnessed(store: &quorum_audit::MemoryStore, node: &str) -> Vec<(Option<u32>, u64)> {
    quorum_audit::witnessed_heads(store, node)
        .unwrap()
        .into_iter()
        .map(|e| (e.round, e.head.seq))
        .collect()
}

fn verify_with(
    log: &quorum_audit::MemoryStore,
    witness: &quorum_audit::MemoryStore,
    node: &str,
) -> Result<quorum_audit::VerifyReport, quorum_audit::VerifyError> {
    let checks = quorum_audit::Checks {
        trusted_keys: Vec::new(),
        expected: quorum_audit::witnessed_heads(witness, node).unwrap(),
    };
    quorum_audit::verify(log, &checks)
}

#[test]
fn sim_witness_heads_cross_every_round_and_catch_a_cut_aggregator_log() {
    let text = federation_toml(10, true, false).replace("rounds = 1", "rounds = 2");
    let mut sim = Sim::new(&policy(&text), site_policy(false, false), 10, 8);
    sim.connect_all();
    sim.run();
    assert!(matches!(sim.events.last(), Some(Event::Finished)));
    for (name, site) in &sim.sites {
        // Rounds 1 and 2, then the federation's end, before `Finished`.
        let rounds: Vec<_> = witnessed(&site.store, "aggregator")
            .into_iter()
            .map(|(round, _)| round)
            .collect();
        assert_eq!(rounds, [Some(1), Some(2), None], "{name}");
        // Each head arrives right after its round's result, before the next offer.
        let kinds: Vec<_> = site
            .audit
            .iter()
            .map(|f| (f.round, f.what.kind()))
            .collect();
        let witness_1 = kinds.iter().position(|k| *k == (Some(1), "witness"));
        let offer_2 = kinds
            .iter()
            .position(|k| *k == (Some(2), "cohort_selected"));
        assert!(witness_1 < offer_2, "{name}: {kinds:?}");
        // The aggregator witnessed the head each site sent back.
        let node = format!("site:{name}");
        assert_eq!(witnessed(&sim.store, &node).len(), 3, "{name}");
        // Each log verifies against the heads the other side holds.
        assert!(verify_with(&sim.store, &site.store, "aggregator").is_ok());
        assert!(verify_with(&site.store, &sim.store, &node).is_ok());
    }
    // The operator cuts its log back to round 1's signed head: any site names round 2.
    let round_1 = witnessed(&sim.sites["site-0000"].store, "aggregator")[0].1;
    let cut = quorum_audit::MemoryStore::new();
    for (seq, bytes) in quorum_audit::Store::iter(&sim.store).map(Result::unwrap) {
        if seq <= round_1 + 1 {
            quorum_audit::Store::append(&cut, seq, &bytes).unwrap();
        }
    }
    let err = verify_with(&cut, &sim.sites["site-0003"].store, "aggregator").unwrap_err();
    assert!(
        matches!(
            err,
            quorum_audit::VerifyError::Truncated { round: Some(2), .. }
        ),
        "{err}"
    );
}

#[test]
fn sim_witness_sites_refuse_an_aggregator_head_that_went_back() {
    let text = federation_toml(10, true, false).replace("rounds = 1", "rounds = 2");
    let mut sim = Sim::new(&policy(&text), site_policy(false, false), 10, 8);
    // A hostile aggregator shows its round-1 head again at the end of round 2, as a log rolled
    // back between the rounds would.
    let first = Rc::new(RefCell::new(None));
    let kept = first.clone();
    sim.rewrite = Some(Box::new(move |_, body| {
        if let ToSite::AuditHead(head) = body {
            let mut kept = kept.borrow_mut();
            match (&*kept, head.round) {
                (None, 1) => *kept = Some(head.clone()),
                (Some(old), 2) => *head = old.clone(),
                _ => {}
            }
        }
        true
    }));
    sim.connect_all();
    sim.run();
    for (name, site) in &sim.sites {
        let refused = refusals(&site.audit);
        assert!(
            refused
                .iter()
                .any(|r| r.contains("aggregator's audit log went back")),
            "{name}: {refused:?}"
        );
        // No site answers a head it refused: the aggregator holds no round-2 head from it.
        let rounds: Vec<_> = witnessed(&sim.store, &format!("site:{name}"))
            .into_iter()
            .map(|(round, _)| round)
            .collect();
        assert!(!rounds.contains(&Some(2)), "{name}: {rounds:?}");
    }
    // A head no one asked for is refused on the record, not stored as a witness.
    let unasked = quorum_round::witness::head_message(
        9,
        &sim.sites
            .get_mut("site-0000")
            .unwrap()
            .log
            .append_signed_head(Some(9))
            .unwrap(),
    );
    let before = witnessed(&sim.store, "site:site-0000").len();
    let now = sim.now;
    sim.coordinator
        .handle(now, "site-0000", FromSite::AuditHead(unasked));
    sim.drain_coordinator();
    assert_eq!(witnessed(&sim.store, "site:site-0000").len(), before);
    assert!(
        refusals(&sim.audit)
            .last()
            .is_some_and(|r| r.contains("did not ask for")),
        "{:?}",
        refusals(&sim.audit)
    );
}

#[test]
fn sim_witness_a_forged_site_head_is_refused_not_stored() {
    let text = federation_toml(10, true, false);
    let mut sim = Sim::new(&policy(&text), site_policy(false, false), 10, 8);
    sim.rewrite_sent = Some(Box::new(|name, transmit| {
        if let (true, SiteTransmit::Message(FromSite::AuditHead(head))) =
            (name == "site-0003", transmit)
        {
            head.seq += 1;
        }
    }));
    sim.connect_all();
    sim.run();
    assert!(matches!(sim.events.last(), Some(Event::Finished)));
    assert!(witnessed(&sim.store, "site:site-0003").is_empty());
    assert_eq!(witnessed(&sim.store, "site:site-0004").len(), 2);
    assert!(
        refusals(&sim.audit)
            .iter()
            .any(|r| r.contains("site:site-0003's audit head is invalid")),
        "{:?}",
        refusals(&sim.audit)
    );
}

/// Runs a federation of private sites (`share_metrics = false`) to the end, counting the
/// reports that left any site.
fn run_private_sites(text: &str, sites: usize) -> (Sim, usize) {
    let mut sim = Sim::new(
        &policy(text),
        sim_support::private_site_policy(true, false),
        sites,
        8,
    );
    let reports = Rc::new(RefCell::new(0));
    let seen = reports.clone();
    sim.observe = Some(Box::new(move |_, transmit| {
        if matches!(transmit, SiteTransmit::Message(FromSite::Report(_))) {
            *seen.borrow_mut() += 1;
        }
    }));
    sim.connect_all();
    sim.run();
    assert!(matches!(sim.events.last(), Some(Event::Finished)));
    let count = *reports.borrow();
    (sim, count)
}

#[test]
fn sim_private_sites_send_metrics_only_through_the_sum() {
    // Ten private sites, two secure rounds and the final evaluation: no report leaves any
    // site, yet each round's summary holds the survivors' mean losses and total tokens,
    // decoded from the masked sum alone. Sites 0..9 train to losses 1.0, 1.5, …, 5.5 (mean
    // 3.25); every model they receive evaluates to 1.0 and trains to 0.9.
    let text = federation_toml(10, true, false).replace("rounds = 1", "rounds = 2");
    let (sim, reports) = run_private_sites(&text, 10);
    assert_eq!(reports, 0);
    let history = sim.history();
    assert_eq!(history.len(), 3);
    for summary in history {
        assert!(summary.reports.is_empty() && summary.survivors.len() == 10);
        let m = summary.metrics.expect("metrics from the sum");
        assert_eq!(m.sites, 10);
        let expected = if summary.evaluation_only {
            [(m.val_loss_before, 1.0), (m.train_loss, 0.0)]
        } else {
            [(m.val_loss_before, 1.0), (m.train_loss, 3.25)]
        };
        for (found, expected) in expected {
            assert!((found - expected).abs() <= 1.0 / 256.0, "{m:?}");
        }
        let tokens = if summary.evaluation_only {
            0
        } else {
            10 * 4096
        };
        assert_eq!(m.tokens, tokens);
    }
    // The evaluation released no update: sites count it as evaluated, not as a contribution.
    for site in sim.sites.values() {
        assert!(matches!(
            site.outcomes.last(),
            Some((3, Outcome::Evaluated))
        ));
    }
}

#[test]
fn sim_private_sites_decline_an_evaluation_only_round_in_the_clear() {
    // Without secure aggregation the final evaluation could only be answered in the clear:
    // each private site declines it, on its record, and the federation still ends.
    let text = federation_toml(5, false, false).replace("rounds = 1", "rounds = 2");
    let (sim, reports) = run_private_sites(&text, 5);
    assert_eq!(reports, 0);
    let history = sim.history();
    assert_eq!(history.len(), 2, "no evaluation-only round completes");
    assert!(
        history
            .iter()
            .all(|s| s.metrics.is_some_and(|m| m.sites == 5))
    );
    for (name, site) in &sim.sites {
        assert!(
            refusals(&site.audit)
                .iter()
                .any(|r| r.contains("in the clear") && r.contains("share_metrics is off")),
            "{name}"
        );
    }
}

/// A secure round without DP that five of ten sites leave as they upload, so it aborts after
/// every site handed its update over for sending; then everyone is back for the retry.
fn redo_without_dp(allow: bool) -> Sim {
    let fed = policy(&federation_toml(10, true, false));
    let mut site = site_policy(false, false);
    site.policy.allow_redo_without_dp = allow;
    let mut sim = Sim::new(&fed, site, 10, 8);
    for name in names(&sim, |_| true).iter().take(5) {
        sim.fault(name, Fault::DisconnectBefore(Sends::Upload));
    }
    sim.connect_all();
    sim.run();
    sim
}

#[test]
fn sim_redo_without_dp_is_refused_by_sites_whose_update_left_unless_allowed() {
    let sim = redo_without_dp(false);
    assert_eq!(sim.facts("round_aborted")[0].round, Some(1));
    // Every site counts its update as released once the round handed it over (as the ledger
    // does), the five cut off while sending too: each declines the redo, on its record.
    for (name, site) in &sim.sites {
        let refused = site.audit.iter().any(|f| {
            f.round == Some(2)
                && matches!(&f.what, What::Refused { reason, .. }
                    if reason.contains("redoes a round whose update already left"))
        });
        assert!(refused, "{name}");
    }
    assert!(sim.history().iter().all(|s| s.evaluation_only));

    // Sites that allow it take part, and the retry completes with all ten. Each already put
    // its metrics on this model into the aborted attempt's sum, so it gives zeros this time:
    // two sums over cohorts that differ by one site would otherwise expose that site's losses.
    let sim = redo_without_dp(true);
    let retry = &sim.history()[0];
    assert!(!retry.evaluation_only && retry.survivors.len() == 10);
    assert_eq!(retry.metrics, None);
}

#[test]
fn sim_an_aborted_final_evaluation_ends_for_every_site_before_finished() {
    // The final evaluation (round 2) loses its keys: the aggregator withholds PeerKeys from six
    // of ten sites, so it cannot finish. Every site in it learns that it ended, on its record,
    // then the federation finishes.
    let mut sim = ten_wary_sites();
    sim.rewrite = Some(Box::new(|to, body| {
        let withheld = to[5..].parse::<u32>().expect("site index") < 6;
        !(withheld && matches!(body, ToSite::PeerKeys(keys) if keys.round == 2))
    }));
    sim.connect_all();
    sim.run();
    assert!(matches!(sim.events.last(), Some(Event::Finished)));
    assert_eq!(sim.history().len(), 1, "the evaluation did not complete");
    for (site, outcome) in outcomes(&sim, 2) {
        assert!(
            matches!(outcome, Some(Outcome::Aborted(_))),
            "{site}: {outcome:?}"
        );
    }
}

/// Ten sites, every one a neighbour of every other, nine enough for a round; the authority's
/// list 2 revokes `revoked`, which collude: they do not hold their revocation against
/// themselves.
fn ten_sites_with_list(revoked: &[&str]) -> Sim {
    let text = federation_toml(10, true, false).replace("min_clients = 10", "min_clients = 9");
    let sim = Sim::new(&policy(&text), site_policy(false, false), 10, 8);
    sim.authority.publish(SimList::new(2, revoked));
    for site in revoked {
        sim.sites[*site].verifier.ignore_revocation();
    }
    sim
}

#[test]
fn sim_crl_a_revoked_site_is_no_ones_peer_even_when_the_aggregator_relays_its_keys() {
    // An honest aggregator checks each connected site's certificate against the list it holds
    // before it draws a cohort: site-0003, revoked since it connected, is left out (audited
    // once) and never offered a round; the other nine complete it, each adopting list 2 and
    // keeping it.
    let mut sim = ten_sites_with_list(&["site-0003"]);
    sim.connect_all();
    sim.run_until(|s| !s.history().is_empty());
    let summary = &sim.history()[0];
    assert_eq!(summary.survivors.len(), 9);
    assert!(!summary.survivors.iter().any(|s| s == "site-0003"));
    let left_out: Vec<String> = refusals(&sim.audit)
        .into_iter()
        .filter(|r| r.contains("site-0003 is left out of every cohort"))
        .collect();
    assert_eq!(left_out.len(), 1, "{:?}", refusals(&sim.audit));
    assert!(left_out[0].contains("revoked"), "{left_out:?}");
    assert!(sim.sites["site-0003"].sent.is_empty());
    let list = SimList::new(2, &["site-0003"]).encode();
    for site in sim.sites.values().filter(|s| s.name != "site-0003") {
        assert_eq!(site.stored_list.as_ref(), Some(&list), "{}", site.name);
        assert!(site.audit.iter().any(|f| matches!(
            &f.what,
            What::RevocationListAdopted { crl_number, revoked: 1, .. } if crl_number == "2"
        )));
    }

    // A hostile one relays the same list (sites would refuse an older one, and it cannot
    // forge a newer one) but offers site-0003 the round and forwards its advertisement: every
    // other site leaves on it, and nobody shares keys with the revoked site.
    let mut sim = ten_sites_with_list(&["site-0003"]);
    sim.authority.ignore_revocation();
    sim.connect_all();
    sim.run_until(|s| !s.facts("round_aborted").is_empty() || !s.history().is_empty());
    assert!(
        sim.history().is_empty(),
        "a round with a revoked peer completed"
    );
    for site in sim.sites.values().filter(|s| s.name != "site-0003") {
        assert!(!site.sent.contains(&(1, Sends::ShareKeys)), "{}", site.name);
        match outcomes(&sim, 1).into_iter().find(|(n, _)| *n == site.name) {
            Some((_, Some(Outcome::Left(reason)))) => {
                assert!(reason.contains("site-0003 is revoked"), "{reason}")
            }
            other => panic!("{} did not leave: {other:?}", site.name),
        }
    }

    // An honest site that such an aggregator offers a round after it was revoked declines,
    // saying so, rather than being refused by every peer.
    let mut sim = ten_sites_with_list(&[]);
    sim.authority.publish(SimList::new(2, &["site-0003"]));
    sim.authority.ignore_revocation();
    sim.connect_all();
    sim.run_until(|s| !s.history().is_empty());
    match outcomes(&sim, 1)
        .into_iter()
        .find(|(n, _)| n == "site-0003")
    {
        Some((_, Some(Outcome::Declined(reason)))) => assert!(
            reason.contains("own certificate would be refused") && reason.contains("revoked"),
            "{reason}"
        ),
        other => panic!("the revoked site did not decline: {other:?}"),
    }
    assert_eq!(sim.history()[0].survivors.len(), 9);
}

#[test]
fn sim_crl_forged_rolled_back_or_missing_lists_are_refused_before_anything_is_revealed() {
    type Change = fn(&mut Vec<u8>);
    let variants: [(&str, Change, &str); 2] = [
        ("forged", |l| l[0] = b'9', "not signed by the authority"),
        ("missing", Vec::clear, "carries no revocation list"),
    ];
    for (what, change, expected) in variants {
        let mut sim = ten_sites_with_list(&[]);
        sim.rewrite = Some(Box::new(move |_, body| {
            if let ToSite::RoundConfig(config) = body {
                change(&mut config.revocation_list);
            }
            true
        }));
        for (site, reason) in declines_of_round_one(&mut sim) {
            assert!(reason.contains(expected), "{what}: {reason}");
            assert_eq!(refusals(&sim.sites[&site].audit), [reason]);
            assert!(sim.sites[&site].stored_list.is_none());
        }
    }

    // Once the sites hold list 2, the aggregator goes back to list 1, which revokes nobody:
    // every site declines the next offer (here the final evaluation), and keeps list 2.
    let mut sim = ten_sites_with_list(&["site-0003"]);
    sim.rewrite = Some(Box::new(|_, body| {
        if let ToSite::RoundConfig(config) = body
            && config.round > 1
        {
            config.revocation_list = SimList::new(1, &[]).encode();
        }
        true
    }));
    sim.connect_all();
    sim.run_until(|s| !s.facts("round_aborted").is_empty());
    let list = SimList::new(2, &["site-0003"]).encode();
    // (site-0003, revoked, is in no cohort.)
    for (site, outcome) in outcomes(&sim, 2)
        .into_iter()
        .filter(|(s, _)| s != "site-0003")
    {
        match outcome {
            Some(Outcome::Declined(reason)) => {
                assert!(reason.contains("older than the 2 in use"), "{reason}")
            }
            other => panic!("{site} took part in round 2: {other:?}"),
        }
        assert_eq!(sim.sites[&site].stored_list.as_ref(), Some(&list));
    }
}

#[test]
fn sim_heartbeat_keeps_a_slow_trainer_and_drops_a_silent_one() {
    // Phase deadline 30 s. site-0001 trains for 90 s (three deadlines) and sends heartbeats;
    // site-0002 hangs in training, connected but silent; the others train for 5 s.
    let text = federation_toml(10, true, false).replace("min_clients = 10", "min_clients = 8");
    let run = |text: &str| {
        let mut sim = Sim::new(&policy(text), site_policy(false, false), 10, 8);
        sim.sites.get_mut("site-0001").unwrap().train_time = Duration::from_secs(90);
        sim.fault("site-0002", Fault::HangWhileTraining);
        sim.connect_all();
        sim.run_until(|s| !s.history().is_empty());
        sim
    };
    let sim = run(&text);
    let summary = &sim.history()[0];
    assert!(summary.survivors.contains(&"site-0001".to_string()));
    assert!(!summary.survivors.contains(&"site-0002".to_string()));
    assert_eq!(summary.survivors.len(), 9);
    // The round waited for the slow trainer, not for a training deadline.
    assert_eq!(summary.seconds, 90.0);
    // Left out once, on the record, with the reason.
    let silent: Vec<_> = sim
        .audit
        .iter()
        .filter_map(|f| match &f.what {
            What::Refused { reason, .. } if reason.contains("heartbeat") => {
                Some((f.site.clone(), reason.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        silent,
        [(
            Some("site-0002".to_string()),
            "no heartbeat for 30s while training".to_string()
        )]
    );

    // A training budget shorter than the slow site's training leaves it out too, heartbeats
    // or not, at the budget.
    let budget = text.replace("total_steps = 100", "total_steps = 100\nmax_seconds = 60");
    let sim = run(&budget);
    let summary = &sim.history()[0];
    assert!(!summary.survivors.contains(&"site-0001".to_string()));
    assert_eq!(summary.survivors.len(), 8);
    assert_eq!(summary.seconds, 60.0);
}

#[test]
fn sim_record_level_cap_declines_the_round_before_training() {
    // Each site runs DP-SGD at q = 0.5, σ = 1 (ε ≈ 7.41 at δ = 1e-5 for one round of 4
    // steps, ≈ 10.33 for two) under a record-level cap of 9, with no site-level noise: it
    // takes part in round 1 and declines round 2 at the offer, before anything is trained.
    let text = federation_toml(10, true, false).replace("rounds = 1", "rounds = 3");
    let mut site = site_policy(false, false);
    site.record_dp = site_from_str(
        "[site]\nfederation = \"sim\"\nname = \"site\"\n[policy]\nmax_epsilon = 1\n\
         [data]\npath = \"builtin:tiny\"\n[record_dp]\nsampling_rate = 0.5\n\
         noise_multiplier = 1.0\nmax_epsilon = 9\ndelta = 1e-5\n",
        "site.toml",
    )
    .unwrap()
    .record_dp;
    let mut sim = Sim::new(&policy(&text), site, 10, 8);
    sim.connect_all();
    sim.run_until(|s| s.facts("round_aborted").iter().any(|f| f.round == Some(2)));
    for (name, outcome) in outcomes(&sim, 1) {
        assert!(
            matches!(outcome, Some(Outcome::Completed { included: true, .. })),
            "{name}: {outcome:?}"
        );
    }
    for (name, outcome) in outcomes(&sim, 2) {
        let Some(Outcome::Declined(reason)) = outcome else {
            panic!("{name} took part in round 2: {outcome:?}");
        };
        assert!(
            reason.contains("record-level epsilon from 7.4") && reason.contains("to 10.3"),
            "{name}: {reason}"
        );
        let site = &sim.sites[&name];
        assert_eq!(refusals(&site.audit), [reason]);
        // Round 1 is in the ledger with its DP-SGD and audited with its record-level ε.
        let entries = site.ledger.entries();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].dpsgd.map(|d| d.steps), Some(4));
        let spent = site.audit.iter().find_map(|f| match &f.what {
            What::SitePrivacy { record_level, .. } => record_level.clone(),
            _ => None,
        });
        let spent = spent.expect("round 1's record-level privacy is audited");
        assert_eq!((spent.unit, spent.steps), ("sequence", 4));
        assert!((spent.epsilon - 7.4099).abs() < 1e-3, "{}", spent.epsilon);
        // Nothing of round 1 left the site beyond its decision.
        assert!(
            site.sent
                .iter()
                .all(|(round, s)| *round != 2 || *s == Sends::Decision),
            "{name} sent round 2 data"
        );
    }
}
