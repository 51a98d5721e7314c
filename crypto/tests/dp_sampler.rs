//! Statistical validation of the exact discrete Gaussian sampler: goodness of fit against the
//! exact pmf, moments, the parallel fill, and a two-sample comparison with OpenDP's sampler.

use std::num::NonZeroUsize;

use quorum_crypto::dp::DiscreteGaussian;
use quorum_crypto::dp::Error;
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;

/// Unnormalized weights exp(-x²/(2σ²)) for |x| ≤ 12σ + 2, normalized.
fn pmf(sigma: f64) -> (i64, Vec<f64>) {
    let reach = (12.0 * sigma).ceil() as i64 + 2;
    let weights: Vec<f64> = (-reach..=reach)
        .map(|x| (-((x * x) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    (-reach, weights.into_iter().map(|w| w / total).collect())
}

/// Consecutive-value bins of width `width` from the pmf, merging tails until each bin
/// expects at least `min_expected` of `n` samples. Returns bin upper edges and probabilities.
fn bins(sigma: f64, width: i64, n: usize, min_expected: f64) -> (Vec<i64>, Vec<f64>) {
    let (lo, p) = pmf(sigma);
    let mut edges = Vec::new();
    let mut probs = Vec::new();
    let mut acc = 0.0;
    let mut count = 0;
    for (i, &pi) in p.iter().enumerate() {
        acc += pi;
        count += 1;
        if count >= width && acc * n as f64 >= min_expected {
            edges.push(lo + i as i64);
            probs.push(acc);
            acc = 0.0;
            count = 0;
        }
    }
    // The remaining upper tail joins the last bin; the lower tail joined the first.
    *probs.last_mut().unwrap() += acc;
    *edges.last_mut().unwrap() = i64::MAX;
    (edges, probs)
}

fn histogram(edges: &[i64], samples: &[i64]) -> Vec<f64> {
    let mut counts = vec![0.0; edges.len()];
    for &s in samples {
        counts[edges.partition_point(|&e| e < s)] += 1.0;
    }
    counts
}

/// Upper quantile of χ²(df) at standard-normal level z (Wilson–Hilferty).
fn chi2_critical(df: f64, z: f64) -> f64 {
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + z * a.sqrt()).powi(3)
}

fn goodness_of_fit(sigma: f64, samples: &[i64], width: i64) -> (f64, f64) {
    let (edges, probs) = bins(sigma, width, samples.len(), 20.0);
    let counts = histogram(&edges, samples);
    let n = samples.len() as f64;
    let stat: f64 = counts
        .iter()
        .zip(&probs)
        .map(|(o, p)| (o - n * p).powi(2) / (n * p))
        .sum();
    (stat, chi2_critical((edges.len() - 1) as f64, 4.75))
}

fn draw(sigma_squared: f64, n: usize, seed: u64) -> Vec<i64> {
    let dg = DiscreteGaussian::new(sigma_squared).unwrap();
    let mut out = vec![0; n];
    dg.fill(&mut ChaCha12Rng::seed_from_u64(seed), &mut out);
    out
}

#[test]
fn fits_exact_pmf_at_small_medium_and_large_sigma() {
    for (sigma, width) in [(0.5, 1), (10.0, 1), (2000.0, 100)] {
        let samples = draw(sigma * sigma, 400_000, 11);
        let (stat, crit) = goodness_of_fit(sigma, &samples, width);
        assert!(stat < crit, "σ = {sigma}: χ² = {stat:.1} exceeds {crit:.1}");
    }
}

#[test]
fn goodness_of_fit_rejects_a_wrong_variance() {
    // The test above must be able to fail: samples at σ = 10.5 do not fit σ = 10.
    let samples = draw(10.5 * 10.5, 400_000, 12);
    let (stat, crit) = goodness_of_fit(10.0, &samples, 1);
    assert!(stat > crit, "χ² = {stat:.1} should exceed {crit:.1}");
}

#[test]
fn mean_and_variance_match_the_exact_moments() {
    for sigma in [0.5f64, 3.3, 10.0, 2000.0] {
        let n = 300_000;
        let samples = draw(sigma * sigma, n, 13);
        let (lo, p) = pmf(sigma);
        let moment = |k: i32| -> f64 {
            p.iter()
                .enumerate()
                .map(|(i, pi)| pi * ((lo + i as i64) as f64).powi(k))
                .sum()
        };
        let (var, m4) = (moment(2), moment(4));
        let mean = samples.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let sample_var = samples.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 5.0 * (var / n as f64).sqrt(),
            "σ = {sigma}: mean {mean}"
        );
        let var_sd = ((m4 - var * var) / n as f64).sqrt();
        assert!(
            (sample_var - var).abs() < 5.0 * var_sd,
            "σ = {sigma}: variance {sample_var} vs {var}"
        );
        if sigma >= 1.0 {
            // For σ ≥ 1 the discrete Gaussian's variance is σ² to within 1e-6 relative.
            assert!((var / (sigma * sigma) - 1.0).abs() < 1e-6);
        }
    }
}

#[test]
fn non_dyadic_variance_uses_its_exact_rational() {
    // 1234.5678 has a 2^-42 denominator: exercises the wide-denominator arithmetic.
    let sigma_sq = 1234.5678f64;
    let dg = DiscreteGaussian::new(sigma_sq).unwrap();
    let (num, den) = dg.sigma_squared_rational();
    assert_eq!(num as f64 / den as f64, sigma_sq);
    assert!(den.is_power_of_two() && den > 1 << 30);
    let samples = draw(sigma_sq, 300_000, 14);
    let (stat, crit) = goodness_of_fit(sigma_sq.sqrt(), &samples, 1);
    assert!(stat < crit, "χ² = {stat:.1} exceeds {crit:.1}");
}

#[test]
fn rational_and_f64_constructors_agree() {
    assert_eq!(
        DiscreteGaussian::new(0.25).unwrap(),
        DiscreteGaussian::from_rational(2, 8).unwrap()
    );
    assert_eq!(
        DiscreteGaussian::new(100.0)
            .unwrap()
            .sigma_squared_rational(),
        (100, 1)
    );
    let third = DiscreteGaussian::from_rational(1, 3).unwrap();
    assert_eq!(third.sigma_squared_rational(), (1, 3));
    let samples = {
        let mut out = vec![0; 300_000];
        third.fill(&mut ChaCha12Rng::seed_from_u64(15), &mut out);
        out
    };
    let (stat, crit) = goodness_of_fit((1.0f64 / 3.0).sqrt(), &samples, 1);
    assert!(stat < crit, "χ² = {stat:.1} exceeds {crit:.1}");
}

#[test]
fn zero_variance_is_the_point_mass() {
    let dg = DiscreteGaussian::new(0.0).unwrap();
    assert!(draw(0.0, 1000, 1).iter().all(|&x| x == 0));
    assert_eq!(dg.sample(&mut ChaCha12Rng::seed_from_u64(2)), 0);
}

#[test]
fn unsupported_variances_are_refused() {
    for bad in [-1.0, f64::NAN, f64::INFINITY, 2f64.powi(41), 1e-300] {
        assert!(
            matches!(
                DiscreteGaussian::new(bad),
                Err(Error::ParameterOutOfRange { .. })
            ),
            "{bad} accepted"
        );
    }
    assert!(DiscreteGaussian::from_rational(1, 0).is_err());
    assert!(DiscreteGaussian::new(2f64.powi(40)).is_ok());
    assert!(DiscreteGaussian::new(2f64.powi(-8)).is_ok());
}

#[test]
fn parallel_fill_is_independent_of_thread_count_and_fits() {
    let dg = DiscreteGaussian::new(100.0).unwrap();
    let n = 300_000;
    let mut one = vec![0; n];
    let mut three = vec![0; n];
    dg.fill_parallel(&[5; 32], &mut one, NonZeroUsize::MIN);
    dg.fill_parallel(&[5; 32], &mut three, NonZeroUsize::new(3).unwrap());
    assert_eq!(one, three);
    let mut other_seed = vec![0; n];
    dg.fill_parallel(&[6; 32], &mut other_seed, NonZeroUsize::MIN);
    assert_ne!(one, other_seed);
    let (stat, crit) = goodness_of_fit(10.0, &one, 1);
    assert!(stat < crit, "χ² = {stat:.1} exceeds {crit:.1}");
}

/// Two-sample χ² homogeneity test against OpenDP's CKS20 sampler. OpenDP draws from the OS
/// RNG (it cannot be seeded), so this test's outcome is random on that side; the threshold
/// (z = 6, false alarm below 1e-9) makes a spurious failure negligible.
#[test]
fn matches_opendp_two_sample() {
    let sigma = 4.5f64;
    let n = 40_000;
    let ours = draw(sigma * sigma, n, 16);
    let theirs: Vec<i64> = (0..n)
        .map(|_| {
            let scale = sigma
                .try_into()
                .expect("finite scale converts to a rational");
            let x =
                opendp::traits::samplers::sample_discrete_gaussian(scale).expect("sampler runs");
            i64::try_from(x).expect("sample fits i64")
        })
        .collect();
    let (edges, _) = bins(sigma, 1, n, 20.0);
    let a = histogram(&edges, &ours);
    let b = histogram(&edges, &theirs);
    let stat: f64 = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| **x + **y > 0.0)
        .map(|(x, y)| (x - y).powi(2) / (x + y))
        .sum();
    let crit = chi2_critical((edges.len() - 1) as f64, 6.0);
    assert!(stat < crit, "two-sample χ² = {stat:.1} exceeds {crit:.1}");
    // Sanity: the test separates σ = 4.5 from σ = 5.
    let wider = histogram(&edges, &draw(25.0, n, 17));
    let stat_wrong: f64 = wider
        .iter()
        .zip(&b)
        .filter(|(x, y)| **x + **y > 0.0)
        .map(|(x, y)| (x - y).powi(2) / (x + y))
        .sum();
    assert!(
        stat_wrong > crit,
        "σ = 5 not told apart from σ = 4.5: {stat_wrong:.1}"
    );
}
