//! Round admission: a site checks each round the aggregator offers against its own policy and
//! ledger before it touches its data. Pure: no I/O, no clock.

use crate::accountant::Delta;
use crate::config::site::SitePolicy;
use crate::ledger::Ledger;

/// What the aggregator announces about a round, as far as the site's policy is concerned.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundOffer {
    /// Federation running the round.
    pub federation: String,
    /// Round number.
    pub round: u32,
    /// Number of sites in the cohort.
    pub cohort_size: u32,
    /// Whether updates are masked by secure aggregation.
    pub secure_aggregation: bool,
    /// Whether updates carry differential-privacy noise.
    pub dp_enabled: bool,
    /// zCDP ρ the round costs each site (ignored when `dp_enabled` is false).
    pub rho: f64,
    /// Local training steps the round asks for.
    pub local_steps: u32,
}

/// Why a site refuses a round. The message names the rule and the numbers, for the audit log
/// and for the aggregator.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The round belongs to another federation.
    #[error("federation '{offered}' is not the one this site accepts ('{accepted}')")]
    UnknownFederation {
        /// Federation named in the offer.
        offered: String,
        /// The site's `site.federation`.
        accepted: String,
    },
    /// The cohort is smaller than the site's minimum.
    #[error("cohort of {offered} sites is below this site's policy.min_cohort = {min}")]
    CohortTooSmall {
        /// Cohort size offered.
        offered: u32,
        /// The site's `policy.min_cohort`.
        min: u32,
    },
    /// The round runs without secure aggregation and the site does not allow plain mode.
    #[error(
        "round runs without secure aggregation; this site's policy requires it \
         (policy.require_secure_aggregation / policy.allow_plain_mode)"
    )]
    SecureAggregationRequired,
    /// The round runs without differential privacy and the site requires it.
    #[error("round runs without differential privacy; this site's policy.require_dp = true")]
    DpRequired,
    /// The site's ledger already holds this round: contributing again would spend again.
    #[error(
        "round {round} is already in this site's privacy ledger; a second contribution to \
         it would spend budget again"
    )]
    RoundAlreadySpent {
        /// The round.
        round: u32,
    },
    /// The round's privacy cost is not a finite non-negative number.
    #[error("round's privacy cost rho = {rho} is not a finite number >= 0")]
    PrivacyCostInvalid {
        /// ρ offered.
        rho: f64,
    },
    /// The round's DP-SGD would push the site's record-level ε past its `[record_dp]` cap.
    #[error(
        "round would raise record-level epsilon from {spent_epsilon:.4} to \
         {round_epsilon_after:.4}, past this site's record_dp.max_epsilon = {max_epsilon} \
         (delta = {delta})"
    )]
    RecordLevelBudgetExceeded {
        /// Record-level ε spent before this round.
        spent_epsilon: f64,
        /// Record-level ε after it.
        round_epsilon_after: f64,
        /// The site's `record_dp.max_epsilon`.
        max_epsilon: f64,
        /// The site's `record_dp.delta`.
        delta: Delta,
    },
    /// The round would push the site's total ε past its budget.
    #[error(
        "round would raise epsilon from {spent_epsilon:.4} to {round_epsilon_after:.4}, past \
         this site's policy.max_epsilon = {max_epsilon} (delta = {delta})"
    )]
    BudgetExceeded {
        /// ε spent before this round.
        spent_epsilon: f64,
        /// ε the site would have spent after it.
        round_epsilon_after: f64,
        /// The site's `policy.max_epsilon`.
        max_epsilon: f64,
        /// The δ of both ε values.
        delta: Delta,
    },
}

impl SitePolicy {
    /// Decides whether this site takes part in `offer`, given the rounds already in `ledger`.
    ///
    /// Rules, in order: the federation must be this site's; the cohort must reach
    /// `policy.min_cohort`; a round without secure aggregation needs plain mode allowed; a
    /// round without DP needs `policy.require_dp = false`; a round already in the ledger is
    /// refused; and with DP on, the total ε after the round (OpenDP's conversion at
    /// `policy.delta`) must not exceed `policy.max_epsilon`. Rounds without DP are not
    /// accounted: their loss is unbounded, which is what `require_dp = false` accepts.
    ///
    /// A site with `[record_dp]` also refuses a round whose DP-SGD would push its
    /// record-level ε (at `record_dp.delta`, over every round in the ledger, see
    /// [`Ledger::record_level_epsilon`]) past `record_dp.max_epsilon`, whether or not the
    /// round adds site-level noise.
    pub fn admit(&self, offer: &RoundOffer, ledger: &Ledger) -> Result<(), Refusal> {
        let policy = &self.policy;
        if offer.federation != self.site.federation {
            return Err(Refusal::UnknownFederation {
                offered: offer.federation.clone(),
                accepted: self.site.federation.clone(),
            });
        }
        if offer.cohort_size < policy.min_cohort {
            return Err(Refusal::CohortTooSmall {
                offered: offer.cohort_size,
                min: policy.min_cohort,
            });
        }
        if !offer.secure_aggregation && !policy.plain_mode_allowed() {
            return Err(Refusal::SecureAggregationRequired);
        }
        if !offer.dp_enabled && policy.require_dp {
            return Err(Refusal::DpRequired);
        }
        if ledger.contains(offer.round) {
            return Err(Refusal::RoundAlreadySpent { round: offer.round });
        }
        if let Some(record) = &self.record_dp {
            let spend = record.spend(offer.local_steps);
            let round_epsilon_after = ledger.record_level_epsilon(record.delta, Some(spend));
            if round_epsilon_after > record.max_epsilon {
                return Err(Refusal::RecordLevelBudgetExceeded {
                    spent_epsilon: ledger.record_level_epsilon(record.delta, None),
                    round_epsilon_after,
                    max_epsilon: record.max_epsilon,
                    delta: record.delta,
                });
            }
        }
        if !offer.dp_enabled {
            return Ok(());
        }
        if !(offer.rho.is_finite() && offer.rho >= 0.0) {
            return Err(Refusal::PrivacyCostInvalid { rho: offer.rho });
        }
        let accountant = ledger.accountant(policy.delta);
        let round_epsilon_after = accountant.epsilon_if(offer.rho);
        if round_epsilon_after > policy.max_epsilon {
            return Err(Refusal::BudgetExceeded {
                spent_epsilon: accountant.epsilon(),
                round_epsilon_after,
                max_epsilon: policy.max_epsilon,
                delta: policy.delta,
            });
        }
        Ok(())
    }
}
