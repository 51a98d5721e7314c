//! The persisted ledger and round admission against it.

use std::fs;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use quorum_policies::rdp::{RdpAccountant, SampledGaussian};
use quorum_policies::{
    AccountantError, Delta, Ledger, LedgerError, Recorded, Refusal, RoundOffer, SitePolicy,
    epsilon_from_rho, site_from_str,
};

fn delta() -> Delta {
    Delta::new(1e-6).unwrap()
}

fn at(secs: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

// ---- ledger ----

#[test]
fn missing_ledger_opens_empty_and_is_created_on_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/privacy-ledger.json");
    let mut ledger = Ledger::open(&path).unwrap();
    assert!(ledger.entries().is_empty());
    assert_eq!(ledger.spent_epsilon(delta()), 0.0);
    assert!(!path.exists());
    assert_eq!(
        ledger.record(0, 0.1, None, delta(), at(100)).unwrap(),
        Recorded::New
    );
    assert!(path.exists());
    // No temporary file is left behind.
    let names: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["privacy-ledger.json"]);
}

#[test]
fn ledger_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.json");
    let mut ledger = Ledger::open(&path).unwrap();
    ledger.record(0, 0.05, None, delta(), at(1000)).unwrap();
    ledger.record(1, 0.07, None, delta(), at(1060)).unwrap();
    let spent = ledger.spent_epsilon(delta());
    drop(ledger);

    let mut reopened = Ledger::open(&path).unwrap();
    assert_eq!(reopened.spent_epsilon(delta()), spent);
    let entries = reopened.entries();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        (entries[1].round, entries[1].rho, entries[1].time),
        (1, 0.07, 1060)
    );
    assert_eq!(entries[1].epsilon_after, spent);
    assert_eq!(entries[0].epsilon_after, epsilon_from_rho(0.05, delta()));
    assert_eq!(entries[0].delta, 1e-6);
    // ρ survives the JSON round trip bit for bit, so replaying a round after a restart
    // matches the record instead of conflicting with it.
    assert_eq!(
        reopened.record(1, 0.07, None, delta(), at(2000)).unwrap(),
        Recorded::Replayed
    );
}

#[test]
fn replayed_record_is_idempotent_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.json");
    let mut ledger = Ledger::open(&path).unwrap();
    ledger.record(3, 0.2, None, delta(), at(5)).unwrap();
    let before = fs::read(&path).unwrap();
    assert_eq!(
        ledger.record(3, 0.2, None, delta(), at(9)).unwrap(),
        Recorded::Replayed
    );
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(Ledger::open(&path).unwrap().entries().len(), 1);
}

#[test]
fn conflicting_record_is_refused_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.json");
    let mut ledger = Ledger::open(&path).unwrap();
    ledger.record(3, 0.2, None, delta(), at(5)).unwrap();
    let err = ledger.record(3, 0.4, None, delta(), at(6)).unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::Accounting(AccountantError::RoundConflict { round: 3, .. })
        ),
        "{err:?}"
    );
    assert_eq!(Ledger::open(&path).unwrap().entries()[0].rho, 0.2);
}

#[test]
fn unbounded_loss_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open(&dir.path().join("ledger.json")).unwrap();
    // Each ρ alone converts to a huge but finite ε; enough of them overflow the composition,
    // and the round that would do so is refused without being written.
    let huge = f64::MAX / 50.0;
    let refused = (0..100u32)
        .find_map(
            |round| match ledger.record(round, huge, None, delta(), at(u64::from(round))) {
                Ok(_) => None,
                Err(err) => Some((round, err)),
            },
        )
        .expect("the composition overflows within 100 rounds");
    assert!(
        matches!(refused.1, LedgerError::LossUnbounded { .. }),
        "{:?}",
        refused.1
    );
    assert_eq!(ledger.entries().len(), refused.0 as usize);
}

fn write_and_open(contents: &[u8]) -> LedgerError {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.json");
    fs::write(&path, contents).unwrap();
    Ledger::open(&path).unwrap_err()
}

#[test]
fn torn_or_corrupt_ledger_is_an_error_not_a_fresh_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.json");
    let mut ledger = Ledger::open(&path).unwrap();
    ledger.record(0, 0.1, None, delta(), at(1)).unwrap();
    ledger.record(1, 0.1, None, delta(), at(2)).unwrap();
    let good = fs::read(&path).unwrap();

    for torn in [&good[..good.len() / 2], &good[..1], &b""[..]] {
        let err = write_and_open(torn);
        assert!(matches!(err, LedgerError::Corrupt { .. }), "{err:?}");
        let shown = err.to_string();
        assert!(
            shown.contains("corrupt") && shown.contains("never reset"),
            "{shown}"
        );
    }
    let garbage = write_and_open(b"\x00\xff not json");
    assert!(matches!(garbage, LedgerError::Corrupt { .. }));
    let text = String::from_utf8(good).unwrap();
    let duplicated = text.replace("\"round\": 1", "\"round\": 0");
    let err = write_and_open(duplicated.as_bytes());
    assert!(err.to_string().contains("round 0 appears twice"), "{err}");
}

#[test]
fn unreadable_ledger_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be cannot be read as one.
    let path = dir.path().join("ledger.json");
    fs::create_dir(&path).unwrap();
    let err = Ledger::open(&path).unwrap_err();
    assert!(matches!(err, LedgerError::Unreadable { .. }), "{err:?}");
}

#[test]
fn failed_write_leaves_memory_equal_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut ledger = Ledger::open(&state.join("ledger.json")).unwrap();
    // A regular file where the ledger's directory should be makes the write fail.
    fs::write(&state, b"x").unwrap();
    let err = ledger.record(0, 0.1, None, delta(), at(0)).unwrap_err();
    assert!(matches!(err, LedgerError::WriteFailed { .. }), "{err:?}");
    assert!(ledger.entries().is_empty());
    assert_eq!(ledger.spent_epsilon(delta()), 0.0);
}

// ---- admission ----

fn site(policy: &str) -> SitePolicy {
    site_from_str(
        &format!(
            "[site]\nfederation = \"fed\"\nname = \"a\"\n[policy]\n{policy}\n\
             [data]\npath = \"builtin:tiny\"\n"
        ),
        "site.toml",
    )
    .unwrap()
}

fn offer(round: u32, rho: f64) -> RoundOffer {
    RoundOffer {
        federation: "fed".into(),
        round,
        cohort_size: 8,
        secure_aggregation: true,
        dp_enabled: true,
        rho,
        local_steps: 100,
    }
}

fn empty_ledger(dir: &Path) -> Ledger {
    Ledger::open(&dir.join("ledger.json")).unwrap()
}

#[test]
fn a_round_within_every_limit_is_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let site = site("max_epsilon = 4.0");
    assert_eq!(
        site.admit(&offer(0, 0.05), &empty_ledger(dir.path())),
        Ok(())
    );
}

#[test]
fn other_federation_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = offer(0, 0.05);
    o.federation = "evil".into();
    let refusal = site("max_epsilon = 4.0")
        .admit(&o, &empty_ledger(dir.path()))
        .unwrap_err();
    assert_eq!(
        refusal,
        Refusal::UnknownFederation {
            offered: "evil".into(),
            accepted: "fed".into()
        }
    );
    assert!(refusal.to_string().contains("'evil'") && refusal.to_string().contains("'fed'"));
}

#[test]
fn small_cohort_is_refused_with_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = offer(0, 0.05);
    o.cohort_size = 4;
    let refusal = site("max_epsilon = 4.0\nmin_cohort = 5")
        .admit(&o, &empty_ledger(dir.path()))
        .unwrap_err();
    assert_eq!(refusal, Refusal::CohortTooSmall { offered: 4, min: 5 });
    assert!(refusal.to_string().contains("cohort of 4") && refusal.to_string().contains("= 5"));
    o.cohort_size = 5;
    assert_eq!(
        site("max_epsilon = 4.0\nmin_cohort = 5").admit(&o, &empty_ledger(dir.path())),
        Ok(())
    );
}

#[test]
fn plain_mode_is_refused_unless_the_site_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = empty_ledger(dir.path());
    let mut o = offer(0, 0.05);
    o.secure_aggregation = false;
    assert_eq!(
        site("max_epsilon = 4.0").admit(&o, &ledger),
        Err(Refusal::SecureAggregationRequired)
    );
    // Not requiring it is not enough: plain mode must also be allowed explicitly.
    assert_eq!(
        site("max_epsilon = 4.0\nrequire_secure_aggregation = false").admit(&o, &ledger),
        Err(Refusal::SecureAggregationRequired)
    );
    let relaxed =
        site("max_epsilon = 4.0\nrequire_secure_aggregation = false\nallow_plain_mode = true");
    assert_eq!(relaxed.admit(&o, &ledger), Ok(()));
}

#[test]
fn rounds_without_dp_are_refused_unless_the_site_opts_out() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = empty_ledger(dir.path());
    let mut o = offer(0, 0.0);
    o.dp_enabled = false;
    let refusal = site("max_epsilon = 4.0").admit(&o, &ledger).unwrap_err();
    assert_eq!(refusal, Refusal::DpRequired);
    assert!(refusal.to_string().contains("require_dp"));
    assert_eq!(
        site("max_epsilon = 4.0\nrequire_dp = false").admit(&o, &ledger),
        Ok(())
    );
}

#[test]
fn round_already_in_the_ledger_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = empty_ledger(dir.path());
    ledger.record(2, 0.05, None, delta(), at(0)).unwrap();
    let refusal = site("max_epsilon = 4.0")
        .admit(&offer(2, 0.05), &ledger)
        .unwrap_err();
    assert_eq!(refusal, Refusal::RoundAlreadySpent { round: 2 });
    assert_eq!(
        site("max_epsilon = 4.0").admit(&offer(3, 0.05), &ledger),
        Ok(())
    );
}

#[test]
fn invalid_privacy_cost_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = empty_ledger(dir.path());
    for rho in [-1.0, f64::NAN, f64::INFINITY] {
        let refusal = site("max_epsilon = 4.0")
            .admit(&offer(0, rho), &ledger)
            .unwrap_err();
        assert!(
            matches!(refusal, Refusal::PrivacyCostInvalid { .. }),
            "{refusal:?}"
        );
    }
}

#[test]
fn budget_is_enforced_across_rounds_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.json");
    let site = site("max_epsilon = 3.0\ndelta = 1e-6");
    let rho = 0.04;
    let mut admitted = 0u32;
    loop {
        // Reopen every round, as a restarted client would.
        let mut ledger = Ledger::open(&path).unwrap();
        match site.admit(&offer(admitted, rho), &ledger) {
            Ok(()) => {
                ledger
                    .record(admitted, rho, None, site.policy.delta, at(0))
                    .unwrap();
                admitted += 1;
            }
            Err(Refusal::BudgetExceeded {
                spent_epsilon,
                round_epsilon_after,
                max_epsilon,
                delta,
            }) => {
                assert_eq!(max_epsilon, 3.0);
                assert_eq!(delta.get(), 1e-6);
                assert!(spent_epsilon <= 3.0 && round_epsilon_after > 3.0);
                assert_eq!(spent_epsilon, ledger.spent_epsilon(site.policy.delta));
                break;
            }
            Err(other) => panic!("unexpected refusal {other}"),
        }
        assert!(admitted < 1000, "budget never ran out");
    }
    // The number of rounds is what OpenDP's conversion allows, independently computed.
    let fits = |n: u32| epsilon_from_rho(f64::from(n) * rho, delta()) <= 3.0;
    assert!(fits(admitted) && !fits(admitted + 1), "admitted {admitted}");
    assert!(admitted > 1);
}

#[test]
fn budget_refusal_names_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let refusal = site("max_epsilon = 1.0")
        .admit(&offer(0, 0.5), &empty_ledger(dir.path()))
        .unwrap_err();
    let Refusal::BudgetExceeded {
        spent_epsilon,
        round_epsilon_after,
        ..
    } = refusal
    else {
        panic!("expected BudgetExceeded, got {refusal:?}");
    };
    assert_eq!(spent_epsilon, 0.0);
    assert_eq!(round_epsilon_after, epsilon_from_rho(0.5, delta()));
    let shown = refusal.to_string();
    assert!(shown.contains("from 0.0000 to"), "{shown}");
    assert!(shown.contains("max_epsilon = 1"), "{shown}");
    assert!(shown.contains("delta = 1e-6"), "{shown}");
}

// ---- record level ----

const RECORD_DP: &str = "max_epsilon = 1000\n[record_dp]\nsampling_rate = 0.01\n\
                         noise_multiplier = 1.0\nmax_epsilon = 2.0\ndelta = 1e-5";

#[test]
fn record_level_cap_refuses_the_round_that_would_pass_it_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = empty_ledger(dir.path());
    let site = site(RECORD_DP);
    let record = site.record_dp.unwrap();
    let step = SampledGaussian {
        sampling_rate: 0.01,
        noise_multiplier: 1.0,
    };
    let mut reference = RdpAccountant::default();
    let mut admitted = 0;
    for round in 0..100 {
        // Site-level noise far weaker than the DP-SGD, so that the DP-SGD binds.
        let offer = offer(round, 50.0);
        reference.compose(step, 100);
        match site.admit(&offer, &ledger) {
            Ok(()) => {
                assert!(reference.epsilon(1e-5) <= 2.0);
                let spend = record.spend(offer.local_steps);
                ledger
                    .record(round, 50.0, Some(spend), delta(), at(0))
                    .unwrap();
                admitted += 1;
            }
            Err(refusal) => {
                let after = reference.epsilon(1e-5);
                assert!(after > 2.0, "refused at {after}");
                let Refusal::RecordLevelBudgetExceeded {
                    spent_epsilon,
                    round_epsilon_after,
                    ..
                } = refusal
                else {
                    panic!("{refusal:?}");
                };
                assert!((round_epsilon_after - after).abs() < 1e-9);
                assert!(
                    spent_epsilon <= 2.0 && spent_epsilon > 1.0,
                    "{spent_epsilon}"
                );
                assert!(refusal.to_string().contains("record_dp.max_epsilon = 2"));
                break;
            }
        }
    }
    assert!(admitted >= 2, "{admitted} rounds admitted");
    // The ledger keeps the DP-SGD of every round, across a reopen.
    let reopened = empty_ledger(dir.path());
    assert_eq!(reopened.entries().len(), admitted);
    let record_delta = Delta::new(1e-5).unwrap();
    assert_eq!(
        reopened.record_level_epsilon(record_delta, None),
        ledger.record_level_epsilon(record_delta, None)
    );
}

#[test]
fn record_level_epsilon_counts_the_sites_own_dpsgd_not_the_shared_noise() {
    let dir = tempfile::tempdir().unwrap();
    let record_delta = Delta::new(1e-5).unwrap();
    // A round before DP-SGD was turned on counts by its site-level noise alone.
    let mut ledger = empty_ledger(dir.path());
    ledger.record(0, 0.01, None, delta(), at(0)).unwrap();
    let site_only = ledger.record_level_epsilon(record_delta, None);
    assert!(site_only.is_finite() && site_only > 0.0);
    // A round with DP-SGD counts by its DP-SGD alone, even where the site-level bound (which
    // assumes the other survivors add their noise) would be tighter.
    let spend = quorum_policies::DpSgdSpend {
        sampling_rate: 0.01,
        noise_multiplier: 1.0,
        steps: 1000,
    };
    ledger.record(1, 1e-9, Some(spend), delta(), at(0)).unwrap();
    let mut reference = RdpAccountant::default();
    reference.compose_round(0.01, None);
    let step = SampledGaussian {
        sampling_rate: 0.01,
        noise_multiplier: 1.0,
    };
    reference.compose(step, 1000);
    let both = ledger.record_level_epsilon(record_delta, None);
    assert!((both - reference.epsilon(1e-5)).abs() < 1e-12, "{both}");
    assert!(
        both > 2.1,
        "{both}: the shared noise's tiny ρ must not lower it"
    );
}

#[test]
fn record_level_settings_are_validated() {
    let with = |table: &str| {
        site_from_str(
            &format!(
                "[site]\nfederation = \"fed\"\nname = \"a\"\n[policy]\nmax_epsilon = 1\n\
                 [data]\npath = \"builtin:tiny\"\n[record_dp]\n{table}\n"
            ),
            "site.toml",
        )
    };
    let ok = with("sampling_rate = 0.01\nnoise_multiplier = 1.0\nmax_epsilon = 8").unwrap();
    let record = ok.record_dp.unwrap();
    assert_eq!(record.unit.name(), "sequence");
    assert_eq!((record.clip_norm, record.delta.get()), (1.0, 1e-6));
    let err =
        with("unit = \"document\"\nsampling_rate = 0.01\nnoise_multiplier = 1\nmax_epsilon = 8")
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("record_dp.unit") && err.contains("not supported"),
        "{err}"
    );
    let err = with("sampling_rate = 1.5\nnoise_multiplier = 1\nmax_epsilon = 8")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("record_dp.sampling_rate") && err.contains("(0, 1]"),
        "{err}"
    );
    let err = with("sampling_rate = 0.1\nnoise_multiplier = 0\nmax_epsilon = 8")
        .unwrap_err()
        .to_string();
    assert!(err.contains("record_dp.noise_multiplier"), "{err}");
    assert!(with("sampling_rate = 0.1\nnoise_multiplier = 1").is_err());
}
