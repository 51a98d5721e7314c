//! The accountant against closed forms and against OpenDP's own mechanisms and combinators.

use opendp::combinators::{make_composition, make_fix_delta, make_zCDP_to_approxDP};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;
use quorum_policies::{
    Accountant, AccountantError, Delta, Recorded, epsilon_from_rho, gaussian_rho,
};

fn delta(d: f64) -> Delta {
    Delta::new(d).unwrap()
}

/// The classical zCDP to (ε, δ) bound of Bun & Steinke 2016, Proposition 1.3.
fn closed_form_epsilon(rho: f64, delta: f64) -> f64 {
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

/// Complementary error function, Numerical Recipes' Chebyshev fit (relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ]
    .iter()
    .rev()
    .fold(0.0, |acc, c| c + t * acc);
    let r = t * (-z * z + poly).exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Standard normal CDF.
fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Exact ε of the Gaussian mechanism with ρ = Δ²/(2σ²) at δ (Balle & Wang 2018, Theorem 8):
/// δ(ε) = Φ(μ/2 − ε/μ) − e^ε·Φ(−μ/2 − ε/μ) with μ = Δ/σ = sqrt(2ρ), solved by bisection.
fn gaussian_exact_epsilon(rho: f64, delta: f64) -> f64 {
    let mu = (2.0 * rho).sqrt();
    let delta_at = |eps: f64| phi(mu / 2.0 - eps / mu) - eps.exp() * phi(-mu / 2.0 - eps / mu);
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while delta_at(hi) > delta {
        hi *= 2.0;
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if delta_at(mid) > delta {
            lo = mid
        } else {
            hi = mid
        }
    }
    hi
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
fn gaussian_rho_is_sensitivity_squared_over_two_sigma_squared() {
    assert_eq!(gaussian_rho(1.0, 1.0), 0.5);
    assert_eq!(gaussian_rho(2.0, 1.0), 2.0);
    assert_eq!(gaussian_rho(3.0, 2.0), 9.0 / 8.0);
    assert_eq!(gaussian_rho(1.0, 0.0), f64::INFINITY);
}

#[test]
fn gaussian_rho_matches_opendp_gaussian_mechanism() {
    // OpenDP's discrete Gaussian on integer vectors is ρ-zCDP with ρ = Δ²/(2σ²) exactly.
    for (sensitivity, sigma) in [(1i64, 1.0), (3, 2.0), (5, 10.0), (1, 0.7)] {
        let meas = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L2Distance::<i64>::default(),
            sigma,
            None,
        )
        .unwrap();
        let opendp_rho = meas.map(&sensitivity).unwrap();
        let ours = gaussian_rho(sensitivity as f64, sigma);
        assert!(close(opendp_rho, ours, 1e-12), "{opendp_rho} vs {ours}");
    }
}

#[test]
fn opendp_conversion_is_tighter_than_the_closed_form_but_close() {
    for &rho in &[1e-4, 0.01, 0.1, 0.5, 1.0, 5.0, 50.0] {
        for &d in &[1e-3, 1e-6, 1e-9] {
            let ours = epsilon_from_rho(rho, delta(d));
            let classical = closed_form_epsilon(rho, d);
            assert!(
                ours <= classical,
                "rho {rho} delta {d}: {ours} > {classical}"
            );
            // Tightest at small ρ and loose δ; within 25% wherever ε >= 1.
            let ratio = ours / classical;
            let floor = if classical >= 1.0 { 0.75 } else { 0.35 };
            assert!(ratio > floor, "rho {rho} delta {d}: ratio {ratio}");
            // The Gaussian mechanism is ρ-zCDP, so no valid conversion can beat its exact ε.
            let exact = gaussian_exact_epsilon(rho, d);
            assert!(
                exact <= ours * (1.0 + 1e-6),
                "rho {rho} delta {d}: {exact} > {ours}"
            );
        }
    }
}

#[test]
fn conversion_is_monotone_and_zero_at_zero() {
    let d = delta(1e-6);
    assert_eq!(epsilon_from_rho(0.0, d), 0.0);
    let eps: Vec<f64> = [0.01, 0.1, 1.0, 10.0]
        .iter()
        .map(|&r| epsilon_from_rho(r, d))
        .collect();
    assert!(eps.windows(2).all(|w| w[0] < w[1]), "{eps:?}");
    // A looser δ buys a smaller ε for the same ρ.
    assert!(epsilon_from_rho(1.0, delta(1e-3)) < epsilon_from_rho(1.0, delta(1e-9)));
    assert_eq!(epsilon_from_rho(-1.0, d), f64::INFINITY);
    assert_eq!(epsilon_from_rho(f64::NAN, d), f64::INFINITY);
}

#[test]
fn rounds_compose_additively() {
    let mut acc = Accountant::new(delta(1e-6));
    assert_eq!(acc.rho_total(), 0.0);
    assert_eq!(acc.epsilon(), 0.0);
    for (round, rho) in [(0, 0.125), (1, 0.25), (7, 0.5)] {
        assert_eq!(acc.record(round, rho), Ok(Recorded::New));
    }
    assert!(close(acc.rho_total(), 0.875, 1e-12), "{}", acc.rho_total());
    assert_eq!(acc.rounds(), 3);
    assert!(close(
        acc.epsilon(),
        epsilon_from_rho(0.875, delta(1e-6)),
        1e-9
    ));
}

#[test]
fn epsilon_if_predicts_the_next_record() {
    let mut acc = Accountant::new(delta(1e-5));
    acc.record(0, 0.02).unwrap();
    let predicted = acc.epsilon_if(0.03);
    let before = acc.epsilon();
    acc.record(1, 0.03).unwrap();
    assert_eq!(acc.epsilon(), predicted);
    assert!(predicted > before);
    assert_eq!(acc.epsilon_if(0.0), acc.epsilon());
    assert_eq!(acc.epsilon_if(-0.1), f64::INFINITY);
    assert_eq!(acc.epsilon_if(f64::INFINITY), f64::INFINITY);
}

#[test]
fn replayed_round_is_not_counted_twice() {
    let mut acc = Accountant::new(delta(1e-6));
    acc.record(4, 0.3).unwrap();
    let eps = acc.epsilon();
    assert_eq!(acc.record(4, 0.3), Ok(Recorded::Replayed));
    assert_eq!(acc.rho_total(), 0.3);
    assert_eq!(acc.epsilon(), eps);
}

#[test]
fn conflicting_rho_for_a_recorded_round_is_an_error() {
    let mut acc = Accountant::new(delta(1e-6));
    acc.record(4, 0.3).unwrap();
    let err = acc.record(4, 0.1).unwrap_err();
    assert_eq!(
        err,
        AccountantError::RoundConflict {
            round: 4,
            recorded: 0.3,
            offered: 0.1
        }
    );
    assert!(err.to_string().contains("round 4"), "{err}");
    assert_eq!(acc.rho_of(4), Some(0.3));
}

#[test]
fn invalid_rho_and_delta_are_refused() {
    let mut acc = Accountant::new(delta(1e-6));
    for rho in [-0.1, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            acc.record(1, rho),
            Err(AccountantError::RhoInvalid { round: 1, .. })
        ));
    }
    assert_eq!(acc.rounds(), 0);
    for d in [0.0, 1.0, -1e-6, f64::NAN] {
        assert!(Delta::new(d).is_err(), "{d}");
    }
}

#[test]
fn composing_k_gaussians_in_opendp_gives_k_rho_and_the_same_epsilon() {
    let sigma = 4.0;
    let k = 12;
    let d = 1e-6;
    let gaussian = || {
        make_gaussian::<_, _, ZeroConcentratedDivergence>(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L2Distance::<i64>::default(),
            sigma,
            None,
        )
        .unwrap()
    };
    let composed = make_composition((0..k).map(|_| gaussian()).collect()).unwrap();
    let rho = gaussian_rho(1.0, sigma);
    let composed_rho = composed.map(&1).unwrap();
    assert!(close(composed_rho, k as f64 * rho, 1e-12), "{composed_rho}");

    // OpenDP's full pipeline: zCDP -> privacy profile -> ε at fixed δ.
    let approx = make_zCDP_to_approxDP(composed).unwrap();
    let (opendp_eps, opendp_delta) = make_fix_delta(&approx, d).unwrap().map(&1).unwrap();
    assert_eq!(opendp_delta, d);

    let mut acc = Accountant::new(delta(d));
    for round in 0..k {
        acc.record(round, rho).unwrap();
    }
    assert!(close(acc.rho_total(), composed_rho, 1e-12));
    assert!(
        close(acc.epsilon(), opendp_eps, 1e-9),
        "{} vs {opendp_eps}",
        acc.epsilon()
    );
    // ... and both sit below the classical bound.
    assert!(opendp_eps < closed_form_epsilon(k as f64 * rho, d));
}
