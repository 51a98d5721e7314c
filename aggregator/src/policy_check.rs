//! What `policy check` says about a federation before any site connects: for each cohort size
//! it may run, whether SecAgg+ parameters exist and how many dropouts a round survives; and,
//! given the sites' own `site.toml` files, whether each can take part and in which round its
//! privacy budget would make it decline.

use quorum_crypto::secagg::worst_case;
use quorum_policies::rdp::{RdpAccountant, SampledGaussian};
use quorum_policies::{Accountant, Dropouts, FederationPolicy, SiteLimits, SitePolicy};
use quorum_round::{CoordinatorConfig, secagg_params};

/// Cohort sizes checked one by one; above this many, only the smallest ones and the largest.
const SIZES_CHECKED: u32 = 64;

/// Findings of [`secure_aggregation`]: problems make the check fail, notes inform.
#[derive(Debug, Default, PartialEq)]
pub struct Findings {
    /// What stops rounds from running, each with what to change.
    pub problems: Vec<String>,
    /// What the operator should know.
    pub notes: Vec<String>,
}

/// Checks every cohort size from `min_clients` to `max_clients` (see [`SIZES_CHECKED`]).
pub fn secure_aggregation(policy: &FederationPolicy) -> Findings {
    let mut findings = Findings::default();
    let sa = &policy.secure_aggregation;
    if !sa.enabled {
        return findings;
    }
    let (min, max) = (policy.federation.min_clients, policy.federation.max_clients);
    let mut sizes: Vec<u32> = (min..=max).take(SIZES_CHECKED as usize).collect();
    if !sizes.contains(&max) {
        sizes.push(max);
    }
    let corrupt = sa.corrupt_fraction;
    let (mut impossible, mut fragile) = (Vec::new(), Vec::new());
    for n in sizes {
        let params = secagg_params(n, sa.modulus_bits, 1, corrupt, sa.dropouts);
        match params.map(|p| p.guaranteed_dropouts()) {
            Err(_) => impossible.push(n),
            Ok(Some(tolerated)) if tolerated < worst_case(n, sa.dropouts.fraction()) => {
                fragile.push((n, tolerated));
            }
            Ok(_) => {}
        }
    }
    if !impossible.is_empty() {
        let advice = match sa.dropouts {
            Dropouts::Stated(f) => format!(
                "lower secure_aggregation.dropout_fraction (now {f}) or remove it, so that \
                 small cohorts tolerate what they can; or lower corrupt_fraction (now \
                 {corrupt}); or raise federation.min_clients"
            ),
            Dropouts::UpTo(_) => format!(
                "lower secure_aggregation.corrupt_fraction (now {corrupt}: with so few sites \
                 one colluder is a majority of a site's neighbours) or raise \
                 federation.min_clients"
            ),
        };
        findings.problems.push(format!(
            "cohorts of {} sites have no secure-aggregation parameters, so such a cohort is \
             never offered a round: {advice}",
            list(&impossible)
        ));
    }
    for (n, tolerated) in fragile {
        findings.notes.push(format!(
            "a cohort of {n} sites tolerates {tolerated} dropout(s), fewer than \
             dropout_fraction {} asks for: a site lost mid-round beyond that aborts the round \
             (it is retried)",
            sa.dropouts.fraction()
        ));
    }
    findings
}

/// Costs every round's DP-SGD for a site with `[record_dp]`, as the site will at each offer:
/// a problem naming the round it would decline, or a note of its record-level ε at the end.
fn record_level(
    policy: &FederationPolicy,
    site: &SitePolicy,
    findings: &mut Findings,
) -> Option<String> {
    let record = site.record_dp?;
    let (name, rounds) = (&site.site.name, policy.federation.rounds);
    let step = SampledGaussian {
        sampling_rate: record.sampling_rate,
        noise_multiplier: record.noise_multiplier,
    };
    let steps = u64::from(policy.training.local_steps);
    let mut accountant = RdpAccountant::default();
    for round in 1..=rounds {
        accountant.compose(step, steps);
        let epsilon = accountant.epsilon(record.delta.get());
        if epsilon > record.max_epsilon {
            findings.problems.push(format!(
                "site {name} would decline round {round} of {rounds}: its record-level ε would \
                 reach {epsilon:.3}, past its record_dp.max_epsilon = {} (δ = {}); lower \
                 training.local_steps (now {steps}) or federation.rounds, or ask the site for \
                 a larger record_dp.noise_multiplier (now {})",
                record.max_epsilon,
                record.delta.get(),
                record.noise_multiplier
            ));
            return None;
        }
    }
    Some(format!(
        "site {name} protects each {} with DP-SGD: record-level ε = {:.3} of its \
         record_dp.max_epsilon = {} after all {rounds} rounds",
        record.unit.name(),
        accountant.epsilon(record.delta.get()),
        record.max_epsilon
    ))
}

/// Checks each site's policy against the federation's, as the site itself will at each offer:
/// federation name, secure aggregation, DP and cohort size, then its budget round by round
/// (and its record-level budget, for a site with `[record_dp]`). Rounds are costed for cohorts
/// of `min_clients` sites with a model of `parameters` values, the ρ the coordinator would
/// offer them.
pub fn sites(policy: &FederationPolicy, parameters: usize, sites: &[SitePolicy]) -> Findings {
    let mut findings = Findings::default();
    let (rounds, cohort) = (policy.federation.rounds, policy.federation.min_clients);
    let rho = if policy.privacy.enabled {
        match CoordinatorConfig::from_policy(policy).plan_round(parameters, cohort, false) {
            Ok(plan) => Some(plan.rho),
            Err(e) => {
                findings
                    .problems
                    .push(format!("rounds of {cohort} sites cannot be planned: {e}"));
                return findings;
            }
        }
    } else {
        None
    };
    for site in sites {
        let name = &site.site.name;
        if site.site.federation != policy.federation.name {
            findings.problems.push(format!(
                "site {name} accepts federation '{}', not '{}'",
                site.site.federation, policy.federation.name
            ));
            continue;
        }
        if let Err(e) = policy.check_site(&SiteLimits::from(site)) {
            findings.problems.push(format!("site {name}: {e}"));
            continue;
        }
        if let Some(note) = record_level(policy, site, &mut findings) {
            findings.notes.push(note);
        }
        let Some(rho) = rho else {
            continue;
        };
        let cap = site.policy.max_epsilon;
        let mut accountant = Accountant::new(site.policy.delta);
        let mut declines = None;
        for round in 1..=rounds {
            // Recording into a fresh accountant, round by round, cannot fail.
            if accountant.epsilon_if(rho) > cap || accountant.record(round, rho).is_err() {
                declines = Some(round);
                break;
            }
        }
        let raise = format!(
            "raise privacy.noise_multiplier (now {})",
            policy.privacy.noise_multiplier
        );
        match declines {
            Some(round) => findings.problems.push(format!(
                "site {name} would decline round {round} of {rounds}: at ρ = {rho:.4} a round, \
                 its ε would pass its max_epsilon = {cap} (δ = {}); {}",
                site.policy.delta.get(),
                if round == 1 {
                    raise
                } else {
                    format!("{raise}, or lower federation.rounds to {}", round - 1)
                }
            )),
            None => findings.notes.push(format!(
                "site {name} takes part in all {rounds} rounds: ε = {:.3} of its max_epsilon = \
                 {cap} at the end",
                accountant.epsilon()
            )),
        }
    }
    findings
}

fn list(sizes: &[u32]) -> String {
    let names: Vec<String> = sizes.iter().map(u32::to_string).collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(sites: u32, extra: &str) -> FederationPolicy {
        let text = format!(
            "[federation]\nname = \"f\"\nmin_clients = {sites}\nmax_clients = {sites}\n\
             [server]\nca = \"ca.pem\"\ncert = \"s.pem\"\nkey = \"s.key\"\ncrl = \"crl.pem\"\n\
             [model]\ninitial_checkpoint = \"m.safetensors\"\n\
             [releases]\nrequire_attestation = false\n\
             [secure_aggregation]\n{extra}\n"
        );
        quorum_policies::federation_from_str(&text, "federation.toml").unwrap()
    }

    fn site(name: &str, federation: &str, policy: &str) -> SitePolicy {
        let text = format!(
            "[site]\nfederation = \"{federation}\"\nname = \"{name}\"\n\
             [policy]\n{policy}\n[data]\npath = \"builtin:clinical\"\n"
        );
        quorum_policies::site_from_str(&text, "site.toml").unwrap()
    }

    #[test]
    fn pilot_sites_are_checked_as_they_will_check_each_offer() {
        let federation = policy(3, "");
        let sites = [
            site("roomy", "f", "max_epsilon = 1000.0"),
            site("tight", "f", "max_epsilon = 2.0"),
            site("lost", "other", "max_epsilon = 1000.0"),
            site("picky", "f", "max_epsilon = 1000.0\nmin_cohort = 5"),
        ];
        let findings = super::sites(&federation, 10_000, &sites);
        assert_eq!(findings.notes.len(), 1, "{findings:?}");
        assert!(findings.notes[0].starts_with("site roomy takes part in all 10 rounds"));
        let problems = findings.problems.join("\n");
        assert!(
            problems.contains("site tight would decline round "),
            "{problems}"
        );
        assert!(
            problems.contains("site lost accepts federation 'other'"),
            "{problems}"
        );
        assert!(problems.contains("site picky: the site requires cohorts of at least 5"));
        assert_eq!(findings.problems.len(), 3, "{problems}");
    }

    #[test]
    fn record_level_caps_are_costed_over_every_round_of_local_steps() {
        // The defaults: 10 rounds of 500 local steps. At q = 0.01 and σ = 1, 5,000 steps cost
        // ε ≈ 4.589 at δ = 1e-5 (dp_accounting), 4,500 steps 4.338: a cap of 5 holds, and a
        // cap of 4.4 is passed in the last round.
        let federation = policy(3, "");
        let record = |cap: f64| {
            format!(
                "max_epsilon = 1e9\n[record_dp]\nsampling_rate = 0.01\nnoise_multiplier = 1.0\n\
                 max_epsilon = {cap}\ndelta = 1e-5"
            )
        };
        let sites = [
            site("ample", "f", &record(5.0)),
            site("short", "f", &record(4.4)),
        ];
        let findings = super::sites(&federation, 10_000, &sites);
        let notes = findings.notes.join("\n");
        assert!(
            notes.contains("site ample protects each sequence with DP-SGD: record-level ε = 4.589"),
            "{notes}"
        );
        let problems = findings.problems.join("\n");
        assert!(
            problems.contains("site short would decline round 10 of 10")
                && problems.contains("record_dp.max_epsilon = 4.4"),
            "{problems}"
        );
        assert_eq!(findings.problems.len(), 1, "{problems}");
    }

    #[test]
    fn pilot_defaults_run_and_say_that_no_dropout_is_tolerated() {
        for sites in [3, 4] {
            let findings = secure_aggregation(&policy(sites, ""));
            assert!(findings.problems.is_empty(), "{findings:?}");
            assert_eq!(findings.notes.len(), 1, "{findings:?}");
            assert!(
                findings.notes[0].contains(&format!("{sites} sites tolerates 0 dropout")),
                "{findings:?}"
            );
        }
        assert_eq!(secure_aggregation(&policy(10, "")), Findings::default());
    }

    #[test]
    fn pilot_with_a_stated_dropout_it_cannot_meet_is_a_problem_with_advice() {
        let findings = secure_aggregation(&policy(3, "dropout_fraction = 0.1"));
        assert_eq!(findings.problems.len(), 1, "{findings:?}");
        let problem = &findings.problems[0];
        assert!(problem.contains("cohorts of 3 sites"), "{problem}");
        assert!(problem.contains("remove it"), "{problem}");
        // Two sites and one assumed colluder: nothing works, whatever the dropouts.
        let findings = secure_aggregation(&policy(2, ""));
        assert!(
            findings.problems[0].contains("lower secure_aggregation.corrupt_fraction"),
            "{findings:?}"
        );
    }
}
