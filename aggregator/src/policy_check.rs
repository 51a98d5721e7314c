//! What `policy check` says about a federation's secure-aggregation settings before any site
//! connects: for each cohort size the federation may run, whether SecAgg+ parameters exist and
//! how many dropouts a round survives.

use quorum_crypto::secagg::worst_case;
use quorum_policies::{Dropouts, FederationPolicy};
use quorum_round::secagg_params;

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
