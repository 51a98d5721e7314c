//! Privacy accountant: zero-concentrated DP (zCDP) per round, composed over rounds and
//! converted to (ε, δ)-DP with OpenDP.
//!
//! Each round releases a sum noised with the (discrete) Gaussian mechanism, which is ρ-zCDP
//! with ρ = Δ²/(2σ²) for L2 sensitivity Δ and noise standard deviation σ. zCDP composes by
//! adding ρ over rounds (OpenDP's `CompositionMeasure` for `ZeroConcentratedDivergence`), and
//! a ρ-zCDP release is (ε, δ)-DP for the ε that OpenDP's zCDP-to-approximate-DP cast finds
//! for the given δ (the conversion of Canonne, Kamath & Steinke 2020, tighter than the
//! classical ε = ρ + 2·sqrt(ρ·ln(1/δ))).

use std::collections::BTreeMap;
use std::fmt;

use opendp::combinators::{CompositionMeasure, ConcentratedMeasure};
use opendp::measures::ZeroConcentratedDivergence;

/// An accounting error.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AccountantError {
    /// δ outside (0, 1).
    #[error("delta must be in (0, 1) (got {delta})")]
    DeltaInvalid {
        /// The value given.
        delta: f64,
    },
    /// A round's ρ is negative, NaN or infinite.
    #[error("round {round}: rho must be a finite number >= 0 (got {rho})")]
    RhoInvalid {
        /// The round.
        round: u32,
        /// The value given.
        rho: f64,
    },
    /// A round was recorded before with a different ρ.
    #[error(
        "round {round} is already recorded with rho = {recorded}, not {offered}; \
         a round is spent once, so investigate which value is true"
    )]
    RoundConflict {
        /// The round.
        round: u32,
        /// ρ already on record.
        recorded: f64,
        /// ρ offered now.
        offered: f64,
    },
}

/// The δ of (ε, δ)-DP: a number in the open interval (0, 1).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Delta(f64);

impl Delta {
    /// Checks that `delta` lies in (0, 1).
    pub fn new(delta: f64) -> Result<Self, AccountantError> {
        if delta > 0.0 && delta < 1.0 {
            Ok(Self(delta))
        } else {
            Err(AccountantError::DeltaInvalid { delta })
        }
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Delta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:e}", self.0)
    }
}

/// ρ of the Gaussian mechanism with L2 sensitivity `sensitivity_l2` and noise standard
/// deviation `sigma`: Δ²/(2σ²). Infinite when `sigma` is zero (no noise, no privacy).
pub fn gaussian_rho(sensitivity_l2: f64, sigma: f64) -> f64 {
    sensitivity_l2 * sensitivity_l2 / (2.0 * sigma * sigma)
}

/// The ε at which a ρ-zCDP release is (ε, δ)-DP, by OpenDP's conversion. Infinite when ρ is
/// infinite, negative or NaN: an unknown loss is treated as unbounded.
pub fn epsilon_from_rho(rho: f64, delta: Delta) -> f64 {
    if !rho_valid(rho) {
        return f64::INFINITY;
    }
    <ZeroConcentratedDivergence as ConcentratedMeasure>::convert(rho)
        .and_then(|profile| profile.epsilon(delta.0))
        // OpenDP's numerical search gives up for very large ρ (weak privacy); the classical
        // conversion (Bun & Steinke 2016, Prop. 1.3) is a valid, looser upper bound there.
        .unwrap_or_else(|_| classical_epsilon(rho, delta))
}

/// ε = ρ + 2·sqrt(ρ·ln(1/δ)): always a valid conversion, looser than OpenDP's.
pub fn classical_epsilon(rho: f64, delta: Delta) -> f64 {
    rho + 2.0 * (rho * (1.0 / delta.0).ln()).sqrt()
}

/// Sums per-round ρ by OpenDP's zCDP composition (rounding upwards).
fn compose(rhos: Vec<f64>) -> f64 {
    // Fails only when the sum overflows, which is an unbounded loss.
    ZeroConcentratedDivergence
        .compose(rhos)
        .unwrap_or(f64::INFINITY)
}

fn rho_valid(rho: f64) -> bool {
    rho.is_finite() && rho >= 0.0
}

/// Whether [`Accountant::record`] added a round or found it already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The round is new and now counts towards the total.
    New,
    /// The round was already recorded with the same ρ; nothing changed.
    Replayed,
}

/// Privacy spent over the rounds recorded so far, accounted at a fixed δ.
///
/// Rounds are keyed by number, so recording the same round twice never spends twice.
#[derive(Clone, Debug, PartialEq)]
pub struct Accountant {
    delta: Delta,
    rounds: BTreeMap<u32, f64>,
}

impl Accountant {
    /// An accountant with nothing spent, reporting ε at `delta`.
    pub fn new(delta: Delta) -> Self {
        Self {
            delta,
            rounds: BTreeMap::new(),
        }
    }

    /// An accountant holding `rounds`, whose ρ the caller has checked are valid.
    pub(crate) fn with_rounds(delta: Delta, rounds: BTreeMap<u32, f64>) -> Self {
        Self { delta, rounds }
    }

    /// The δ at which ε is reported.
    pub fn delta(&self) -> Delta {
        self.delta
    }

    /// ρ recorded for `round`, if any.
    pub fn rho_of(&self, round: u32) -> Option<f64> {
        self.rounds.get(&round).copied()
    }

    /// Number of rounds recorded.
    pub fn rounds(&self) -> usize {
        self.rounds.len()
    }

    /// Total ρ over all recorded rounds: zCDP composes additively.
    pub fn rho_total(&self) -> f64 {
        compose(self.rounds.values().copied().collect())
    }

    /// ε spent so far, at [`Accountant::delta`].
    pub fn epsilon(&self) -> f64 {
        epsilon_from_rho(self.rho_total(), self.delta)
    }

    /// ε that would be spent after one more round costing `extra_rho`. Infinite for an
    /// invalid `extra_rho`.
    pub fn epsilon_if(&self, extra_rho: f64) -> f64 {
        if !rho_valid(extra_rho) {
            return f64::INFINITY;
        }
        let mut rhos: Vec<f64> = self.rounds.values().copied().collect();
        rhos.push(extra_rho);
        epsilon_from_rho(compose(rhos), self.delta)
    }

    /// Records that `round` cost `rho`. Recording a round again with the same ρ changes
    /// nothing ([`Recorded::Replayed`]); with a different ρ it is an error.
    pub fn record(&mut self, round: u32, rho: f64) -> Result<Recorded, AccountantError> {
        if !rho_valid(rho) {
            return Err(AccountantError::RhoInvalid { round, rho });
        }
        match self.rounds.get(&round) {
            Some(&recorded) if recorded == rho => Ok(Recorded::Replayed),
            Some(&recorded) => Err(AccountantError::RoundConflict {
                round,
                recorded,
                offered: rho,
            }),
            None => {
                self.rounds.insert(round, rho);
                Ok(Recorded::New)
            }
        }
    }
}
