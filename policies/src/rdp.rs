//! Record-level privacy of DP-SGD: Rényi DP of Poisson-subsampled Gaussian steps, composed over
//! local steps and rounds and converted to (ε, δ).
//!
//! One DP-SGD step samples each record independently with probability `q`, clips each sampled
//! record's gradient to norm `C` and adds Gaussian noise of standard deviation `σ·C` to the sum.
//! Its Rényi divergence of order α (Mironov, Talwar & Zhang 2019, *Rényi Differential Privacy
//! of the Sampled Gaussian Mechanism*, Sections 3.3 and 3.4) is `ln A_α / (α − 1)` with
//!
//! ```text
//! integer α:     A_α = Σ_{i=0..α} C(α,i) (1−q)^(α−i) q^i exp((i² − i) / (2σ²))
//! fractional α:  A_α = Σ_{i≥0} C(α,i) [ (1−q)^(α−i) q^i exp((i² − i)/(2σ²)) · ½ erfc((i − z₀)/(√2 σ))
//!                                     + (1−q)^i q^(α−i) exp(((α−i)² − (α−i))/(2σ²)) · ½ erfc((z₀ − (α−i))/(√2 σ)) ]
//!                z₀ = σ² ln(1/q − 1) + ½
//! ```
//!
//! computed in log space, the fractional series until its terms fall and are below e^−30 of
//! the sum (summing the coefficients' magnitudes, as the reference does). Steps compose
//! by adding their RDP at each order. (ε, δ) follows from Balle et al. 2020 (*Hypothesis
//! testing interpretations and Rényi differential privacy*, Theorem 21), minimised over the
//! orders: `ε = min_α rdp(α) + ln((α − 1)/α) − (ln δ + ln α)/(α − 1)`. Orders, formulas and
//! conversion are those of Google's `dp_accounting` (`RdpAccountant`) and Opacus, whose values
//! the tests reproduce.

/// One kind of DP-SGD step: each record sampled with probability `sampling_rate`, Gaussian
/// noise of `noise_multiplier` × the clipping norm on the clipped sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledGaussian {
    /// Probability that a step samples a given record (batch size / records, for Poisson
    /// sampling), in [0, 1].
    pub sampling_rate: f64,
    /// Noise standard deviation in units of the clipping norm, ≥ 0.
    pub noise_multiplier: f64,
}

/// The Rényi orders tracked: 1.1 to 10.9 by 0.1, 11 to 63, and 128 to 1024 by powers of two.
pub fn default_orders() -> Vec<f64> {
    let fine = (1..100).map(|x| 1.0 + f64::from(x) / 10.0);
    let whole = (11..64).map(f64::from);
    let large = [128.0, 256.0, 512.0, 1024.0];
    fine.chain(whole).chain(large).collect()
}

/// RDP spent so far, at each of [`default_orders`].
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }
}

impl RdpAccountant {
    /// Adds `steps` steps of `step`.
    pub fn compose(&mut self, step: SampledGaussian, steps: u64) {
        for (rdp, &order) in self.rdp.iter_mut().zip(&self.orders) {
            *rdp += steps as f64 * step_rdp(step, order);
        }
    }

    /// Adds one round that released a site's update, as far as one record is concerned:
    /// `dpsgd` is the round's DP-SGD (`steps` steps of the given kind), `rho` the zCDP ρ of
    /// the site-level noise on the update (0: none).
    ///
    /// A round with DP-SGD costs its DP-SGD's RDP alone: that noise is the site's own, so the
    /// bound holds whatever the aggregator and the other sites do, whereas the site-level ρ
    /// assumes that enough other survivors add their share. A round without DP-SGD (run before
    /// the site turned it on) costs its site-level ρ·α (zCDP ρ is RDP ρ·α at every order α,
    /// and a record is part of its site), under that assumption; one with neither is unbounded.
    pub fn compose_round(&mut self, rho: f64, dpsgd: Option<(SampledGaussian, u64)>) {
        for (rdp, &order) in self.rdp.iter_mut().zip(&self.orders) {
            *rdp += match dpsgd {
                Some((step, steps)) => steps as f64 * step_rdp(step, order),
                None if rho > 0.0 => rho * order,
                None => f64::INFINITY,
            };
        }
    }

    /// The ε of everything composed so far at `delta` (∞ when nothing bounds it).
    pub fn epsilon(&self, delta: f64) -> f64 {
        self.orders
            .iter()
            .zip(&self.rdp)
            .map(|(&order, &rdp)| {
                if delta * delta + (-rdp).exp_m1() > 0.0 {
                    // Bounded through the KL divergence: δ ≤ sqrt(1 − e^−rdp).
                    0.0
                } else {
                    rdp + (-1.0 / order).ln_1p() - (delta * order).ln() / (order - 1.0)
                }
            })
            .filter(|eps| !eps.is_nan())
            .fold(f64::INFINITY, f64::min)
            .max(0.0)
    }
}

/// The smallest noise multiplier (to 0.1 %, rounded up) at which `steps` Poisson-sampled
/// steps at `sampling_rate` cost at most `target_epsilon` at `delta`; `None` when no σ up to
/// 1000 does.
pub fn noise_multiplier_for(
    target_epsilon: f64,
    delta: f64,
    sampling_rate: f64,
    steps: u64,
) -> Option<f64> {
    let epsilon = |noise_multiplier: f64| {
        let mut accountant = RdpAccountant::default();
        let step = SampledGaussian {
            sampling_rate,
            noise_multiplier,
        };
        accountant.compose(step, steps);
        accountant.epsilon(delta)
    };
    let (mut low, mut high) = (0.01, 1000.0);
    if epsilon(high) > target_epsilon {
        return None;
    }
    // ε falls as σ grows: bisect on a log scale, keeping `high` feasible.
    while high / low > 1.001 {
        let mid = (low * high).sqrt();
        if epsilon(mid) <= target_epsilon {
            high = mid;
        } else {
            low = mid;
        }
    }
    Some(high)
}

/// The RDP of one step at `order` (> 1).
pub fn step_rdp(step: SampledGaussian, order: f64) -> f64 {
    let (q, sigma) = (step.sampling_rate, step.noise_multiplier);
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 || order.is_infinite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return order / (2.0 * sigma * sigma);
    }
    let log_a = if order.fract() == 0.0 {
        log_a_integer(q, sigma, order)
    } else {
        log_a_fractional(q, sigma, order)
    };
    log_a / (order - 1.0)
}

fn log_a_integer(q: f64, sigma: f64, order: f64) -> f64 {
    // Orders are at most 1024, so the integer conversion is exact.
    let alpha = order as u32;
    (0..=alpha)
        .map(|i| {
            let i_f = f64::from(i);
            ln_binomial(order, i_f)
                + i_f * q.ln()
                + (order - i_f) * (-q).ln_1p()
                + (i_f * i_f - i_f) / (2.0 * sigma * sigma)
        })
        .fold(f64::NEG_INFINITY, log_add)
}

fn log_a_fractional(q: f64, sigma: f64, order: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    for step in 0..MAX_SERIES_TERMS {
        let i = f64::from(step);
        let j = order - i;
        let log_coef = ln_binomial(order, i);
        let log_t0 = log_coef + i * q.ln() + j * (-q).ln_1p();
        let log_t1 = log_coef + j * q.ln() + i * (-q).ln_1p();
        let log_e0 = 0.5_f64.ln() + log_erfc((i - z0) / (2.0_f64.sqrt() * sigma));
        let log_e1 = 0.5_f64.ln() + log_erfc((z0 - j) / (2.0_f64.sqrt() * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        // Both halves falling, and negligible next to the sum.
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        (last_s0, last_s1) = (log_s0, log_s1);
    }
    // The series did not settle: this order bounds nothing.
    f64::INFINITY
}

/// Terms of the fractional-order series before an order is given up on.
const MAX_SERIES_TERMS: u32 = 1000;

/// ln |C(n, k)| for real n and whole k ≥ 0 (the fractional series passes k > n, where the
/// coefficient alternates in sign; the reference sums magnitudes, and so does this).
fn ln_binomial(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x > y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return a;
    }
    a + (b - a).exp().ln_1p()
}

/// ln erfc(x), accurate where erfc underflows (x beyond about 26).
fn log_erfc(x: f64) -> f64 {
    let value = libm::erfc(x);
    if value > 0.0 && value.is_finite() && x < 25.0 {
        return value.ln();
    }
    // erfc(x) ~ e^(−x²) / (x √π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶)).
    let x2 = x * x;
    let series = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2);
    -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln() + series.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (q, σ, steps, δ, ε) from Google's `dp_accounting` 0.6.0: `RdpAccountant()` composed with
    /// `PoissonSampledDpEvent(q, GaussianDpEvent(σ))` `steps` times, then `get_epsilon(δ)`.
    const REFERENCE: [(f64, f64, u64, f64, f64); 6] = [
        (0.01, 1.1, 1000, 1e-5, 1.7117701662429012),
        (256.0 / 60000.0, 1.1, 60 * 235, 1e-5, 2.6003429394461106),
        (0.001, 0.8, 10000, 1e-6, 1.7036252861577152),
        (0.05, 2.0, 500, 1e-6, 3.1018682574376335),
        (0.1, 5.0, 100, 1e-5, 0.8348633051205401),
        (1.0, 10.0, 50, 1e-6, 3.5423612316217303),
    ];

    #[test]
    fn dpsgd_rdp_epsilon_matches_the_reference_accountant() {
        for (q, sigma, steps, delta, expected) in REFERENCE {
            let mut accountant = RdpAccountant::default();
            let step = SampledGaussian {
                sampling_rate: q,
                noise_multiplier: sigma,
            };
            accountant.compose(step, steps);
            let epsilon = accountant.epsilon(delta);
            assert!(
                (epsilon - expected).abs() <= 1e-9 * expected,
                "q {q} σ {sigma} steps {steps} δ {delta}: {epsilon} vs {expected}"
            );
        }
    }

    #[test]
    fn dpsgd_rdp_composes_across_rounds_and_bounds_the_edges() {
        let step = SampledGaussian {
            sampling_rate: 0.01,
            noise_multiplier: 1.1,
        };
        // Ten rounds of 100 local steps are 1,000 steps.
        let mut rounds = RdpAccountant::default();
        for _ in 0..10 {
            rounds.compose(step, 100);
        }
        let mut once = RdpAccountant::default();
        once.compose(step, 1000);
        assert!((rounds.epsilon(1e-5) - once.epsilon(1e-5)).abs() < 1e-12);
        // More steps never cost less; no noise is unbounded; no sampling costs nothing.
        let mut more = once.clone();
        more.compose(step, 1);
        assert!(more.epsilon(1e-5) > once.epsilon(1e-5));
        let mut noiseless = RdpAccountant::default();
        noiseless.compose(
            SampledGaussian {
                noise_multiplier: 0.0,
                ..step
            },
            1,
        );
        assert_eq!(noiseless.epsilon(1e-5), f64::INFINITY);
        let mut unsampled = RdpAccountant::default();
        unsampled.compose(
            SampledGaussian {
                sampling_rate: 0.0,
                ..step
            },
            1000,
        );
        assert_eq!(unsampled.epsilon(1e-5), 0.0);
    }

    #[test]
    fn dpsgd_noise_multiplier_for_a_target_epsilon_is_the_smallest_that_meets_it() {
        // dp_accounting: q = 0.01, σ = 1, 1000 steps, δ = 1e-5 costs ε = 2.1014; σ = 0.99
        // costs 2.1502 and σ = 1.01 costs 2.0549.
        let sigma = noise_multiplier_for(2.101_366_525_420_273, 1e-5, 0.01, 1000).unwrap();
        assert!((sigma - 1.0).abs() < 2e-3, "{sigma}");
        let epsilon = |s: f64| {
            let mut a = RdpAccountant::default();
            a.compose(
                SampledGaussian {
                    sampling_rate: 0.01,
                    noise_multiplier: s,
                },
                1000,
            );
            a.epsilon(1e-5)
        };
        for target in [0.5, 2.0, 8.0] {
            let sigma = noise_multiplier_for(target, 1e-5, 0.01, 1000).unwrap();
            assert!(epsilon(sigma) <= target);
            assert!(
                epsilon(sigma / 1.002) > target,
                "{target}: {sigma} is not the smallest"
            );
        }
        assert_eq!(noise_multiplier_for(1e-9, 1e-5, 1.0, 1_000_000), None);
    }
}
