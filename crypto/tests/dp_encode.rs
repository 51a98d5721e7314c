//! End-to-end tests of the distributed discrete Gaussian encoding: accuracy without noise,
//! noise variance, clipping, overflow, dropouts, parameter validation and the zCDP formula.

use proptest::prelude::*;
use quorum_crypto::dp::params::{
    MAX_ROTATION_BLOCK, MIN_ROTATION_BLOCK, overflow_stddevs, padded_dim, rotation_block,
};
use quorum_crypto::dp::{DpParams, Error, decode, encode, zcdp_rho};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

const SEED: [u8; 32] = [42; 32];

fn random_update(rng: &mut impl Rng, dim: usize, scale: f32) -> Vec<f32> {
    (0..dim)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect()
}

fn clipped(update: &[f32], c: f64) -> Vec<f64> {
    let norm = update
        .iter()
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt();
    let k = if norm > c { c / norm } else { 1.0 };
    update.iter().map(|&v| f64::from(v) * k).collect()
}

fn mod_sum(encodings: &[Vec<u32>], bits: u32) -> Vec<u32> {
    let mask = u32::MAX >> (32 - bits);
    let mut sum = vec![0u32; encodings[0].len()];
    for e in encodings {
        for (s, v) in sum.iter_mut().zip(e) {
            *s = s.wrapping_add(*v) & mask;
        }
    }
    sum
}

/// Encodes every update with its own client RNG, sums the encodings mod 2^b and decodes;
/// returns (decoded, exact sum of clipped updates).
fn round_trip(updates: &[Vec<f32>], params: &DpParams, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let encodings: Vec<Vec<u32>> = updates
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let mut rng = ChaCha12Rng::seed_from_u64(seed * 1000 + i as u64);
            encode(u, params, &SEED, &mut rng).unwrap()
        })
        .collect();
    let decoded = decode(&mod_sum(&encodings, params.bits), params, &SEED).unwrap();
    let mut truth = vec![0.0; params.dim];
    for u in updates {
        for (t, v) in truth.iter_mut().zip(clipped(u, params.clip_norm)) {
            *t += v;
        }
    }
    (decoded.into_iter().map(f64::from).collect(), truth)
}

/// The quantization error promised without noise, for `n` summed encodings: each decoded
/// coordinate's error is zero-mean, sub-Gaussian with variance at most n·γ²/4, so with
/// probability ≥ 1 − 10^-6, ‖err‖₂ ≤ γ·√(n/4)·(√d + √(2 ln 10^6)) and
/// ‖err‖∞ ≤ γ·√(n/4)·√(2 ln(2d/10^-6)); and always ‖err‖₂ < γ·n·√d.
fn assert_within_quantization(decoded: &[f64], truth: &[f64], params: &DpParams, n: usize) {
    let g = params.gamma;
    let d = params.padded_dim as f64;
    let err: Vec<f64> = decoded.iter().zip(truth).map(|(a, b)| a - b).collect();
    let l2 = err.iter().map(|e| e * e).sum::<f64>().sqrt();
    let linf = err.iter().fold(0.0f64, |m, e| m.max(e.abs()));
    let n = n as f64;
    // f32 output adds relative 2^-24 of the sum's magnitude.
    let f32_slack = truth.iter().fold(0.0f64, |m, t| m.max(t.abs())) * 1e-6 + 1e-12;
    let l2_bound =
        g * (n / 4.0).sqrt() * (d.sqrt() + (2.0 * 1e6f64.ln()).sqrt()) + f32_slack * d.sqrt();
    assert!(l2 <= l2_bound, "L2 error {l2} > {l2_bound} ({params:?})");
    assert!(
        l2 < g * n * d.sqrt() + f32_slack * d.sqrt(),
        "L2 error {l2} beyond hard bound"
    );
    let linf_bound = g * (n / 4.0).sqrt() * (2.0 * (2.0 * d / 1e-6f64).ln()).sqrt();
    assert!(
        linf <= linf_bound + f32_slack,
        "L∞ error {linf} > {linf_bound}"
    );
}

#[test]
fn noiseless_sum_matches_clipped_sum() {
    let mut rng = ChaCha12Rng::seed_from_u64(1);
    let params = DpParams::choose(1000, 8, 6, 1.0, 0.0, 16).unwrap();
    assert_eq!(params.padded_dim, 1024);
    // Some updates need clipping, some do not.
    let updates: Vec<Vec<f32>> = (0..8)
        .map(|i| random_update(&mut rng, 1000, if i % 2 == 0 { 0.01 } else { 1.0 }))
        .collect();
    let (decoded, truth) = round_trip(&updates, &params, 1);
    assert_within_quantization(&decoded, &truth, &params, 8);
    // The error is far below the signal: the test can tell a broken decoder.
    let signal = truth.iter().map(|t| t * t).sum::<f64>().sqrt();
    assert!(signal > 100.0 * params.gamma * (8.0f64 * 1024.0 / 4.0).sqrt());
}

#[test]
fn aligned_worst_case_cohort_does_not_overflow_a_small_modulus() {
    // 64 identical updates, each of norm exactly c, at 8 bits: the sum has norm 64·c.
    let params = DpParams::choose(256, 64, 64, 2.0, 0.0, 8).unwrap();
    let mut rng = ChaCha12Rng::seed_from_u64(2);
    let one = clipped(&random_update(&mut rng, 256, 1.0), 2.0);
    let one: Vec<f32> = one.iter().map(|&v| v as f32).collect();
    let updates = vec![one; 64];
    let (decoded, truth) = round_trip(&updates, &params, 2);
    assert_within_quantization(&decoded, &truth, &params, 64);
}

#[test]
fn dropouts_decode_to_the_survivors_sum() {
    let mut rng = ChaCha12Rng::seed_from_u64(3);
    let params = DpParams::choose(3000, 10, 6, 0.5, 0.0, 20).unwrap();
    let updates: Vec<Vec<f32>> = (0..10)
        .map(|_| random_update(&mut rng, 3000, 0.05))
        .collect();
    // Only 6 of the 10 clients survive; their encodings alone are summed.
    let survivors = &updates[2..8];
    let (decoded, truth) = round_trip(survivors, &params, 3);
    assert_within_quantization(&decoded, &truth, &params, 6);
}

#[test]
fn clipping_bounds_the_norm_and_keeps_the_direction() {
    let mut rng = ChaCha12Rng::seed_from_u64(4);
    let params = DpParams::choose(500, 1, 1, 1.5, 0.0, 24).unwrap();
    let update = random_update(&mut rng, 500, 3.0); // norm ≈ 38
    let enc = encode(&update, &params, &SEED, &mut rng).unwrap();
    let dec: Vec<f64> = decode(&enc, &params, &SEED)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let norm = dec.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!((norm - 1.5).abs() < 1e-3, "decoded norm {norm}");
    let cos = dec
        .iter()
        .zip(&update)
        .map(|(a, &b)| a * f64::from(b))
        .sum::<f64>()
        / (norm
            * update
                .iter()
                .map(|&v| f64::from(v).powi(2))
                .sum::<f64>()
                .sqrt());
    assert!(cos > 0.9999, "direction changed: cos = {cos}");
    // A small update passes unclipped.
    let small = random_update(&mut rng, 500, 0.01);
    let dec = decode(
        &encode(&small, &params, &SEED, &mut rng).unwrap(),
        &params,
        &SEED,
    )
    .unwrap();
    assert!(dec.iter().zip(&small).all(|(a, b)| (a - b).abs() < 1e-4));
}

#[test]
fn noise_of_the_sum_has_the_configured_variance() {
    let sigma = 0.5;
    let (dim, t) = (8192, 5);
    let params = DpParams::choose(dim, t, t, 1.0, sigma, 16).unwrap();
    let mut rng = ChaCha12Rng::seed_from_u64(5);
    let updates: Vec<Vec<f32>> = (0..t).map(|_| random_update(&mut rng, dim, 0.01)).collect();
    let (decoded, truth) = round_trip(&updates, &params, 5);
    let err: Vec<f64> = decoded.iter().zip(&truth).map(|(a, b)| a - b).collect();
    let n = err.len() as f64;
    let mean = err.iter().sum::<f64>() / n;
    let var = err.iter().map(|e| e * e).sum::<f64>() / n;
    // Expected per-coordinate variance: σ² from the noise plus at most t·γ²/4 from rounding.
    let lo = sigma * sigma;
    let hi = sigma * sigma + f64::from(t) * params.gamma * params.gamma / 4.0;
    // χ²(n) interval at z = 5 (Wilson–Hilferty) around the sample variance.
    let chi = |z: f64| n * (1.0 - 2.0 / (9.0 * n) + z * (2.0 / (9.0 * n)).sqrt()).powi(3);
    assert!(
        var <= hi * chi(5.0) / n && var >= lo * chi(-5.0) / n,
        "variance {var} not in [{lo}, {hi}]"
    );
    assert!(mean.abs() < 5.0 * (hi / n).sqrt(), "mean {mean}");
}

#[test]
fn wide_modulus_parameters_on_the_noise_floor_are_valid() {
    // At 32 bits the granularity sits on its floor (each client's noise exactly 2^20 units),
    // where rounding once made `choose` return parameters its own `validate` refused.
    for dim in [1_000, 421_888, 10_000_000] {
        for (clients, noised) in [(3, 2), (4, 3), (10, 8)] {
            for noise in [0.3, 1.0, 3.0, 7.0] {
                let params = DpParams::choose(dim, clients, noised, 1.0, noise, 32);
                assert!(params.is_ok(), "d {dim} n {clients} σ {noise}: {params:?}");
            }
        }
    }
}

#[test]
fn too_small_modulus_is_refused_with_the_needed_bits() {
    // Documented criterion: 4^b ≥ 2·k²·n with k = max(4, sqrt(2·ln(2d/10^-6))).
    let needed = |d: f64, n: f64| {
        let k = (2.0 * (2.0 * d / 1e-6).ln()).sqrt().max(4.0);
        (8u32..)
            .find(|&b| 4f64.powi(b as i32) >= 2.0 * k * k * n)
            .unwrap()
    };
    let needed_bits = needed(1024.0, 5000.0);
    assert!(needed_bits > 8);
    assert_eq!(
        overflow_stddevs(1024),
        (2.0 * (2048.0f64 / 1e-6).ln()).sqrt()
    );
    assert_eq!(
        DpParams::choose(1000, 5000, 100, 1.0, 1.0, 8),
        Err(Error::ModulusTooSmall {
            bits: 8,
            clients: 5000,
            needed_bits
        })
    );
    assert!(DpParams::choose(1000, 5000, 100, 1.0, 1.0, needed_bits).is_ok());
    assert!(DpParams::choose(1000, 5000, 100, 1.0, 1.0, needed_bits - 1).is_err());
    let msg = DpParams::choose(10, 1 << 20, 1, 1.0, 0.0, 10)
        .unwrap_err()
        .to_string();
    let want = format!("{} bits", needed(16.0, f64::from(1u32 << 20)));
    assert!(
        msg.contains("10-bit") && msg.contains("1048576") && msg.contains(&want),
        "{msg}"
    );
}

#[test]
fn rotation_blocks_pad_little_and_tile_the_vector() {
    assert_eq!(
        (rotation_block(10_000_000), padded_dim(10_000_000)),
        (1 << 20, 10 << 20)
    );
    assert_eq!(
        (rotation_block(1 << 30), padded_dim(1_000_000_000)),
        (MAX_ROTATION_BLOCK, 954 << 20)
    );
    assert_eq!((rotation_block(1000), padded_dim(1000)), (1024, 1024));
    for dim in (1..200_000)
        .step_by(997)
        .chain([1 << 20, (1 << 20) + 1, 459_648])
    {
        let (block, padded) = (rotation_block(dim), padded_dim(dim));
        assert!(block.is_power_of_two() && padded % block == 0, "{dim}");
        assert!(block <= MAX_ROTATION_BLOCK, "{dim}");
        assert!(padded >= dim && padded - dim < block, "{dim}");
        assert!(
            padded - dim <= dim / 16 || block == MIN_ROTATION_BLOCK || padded <= MIN_ROTATION_BLOCK,
            "{dim}: {padded} pads too much"
        );
    }
}

/// Several rotation blocks, and the worst case for their flatness: each client's whole norm
/// in the last, partly padded block. The sum of the encodings must not wrap.
#[test]
fn block_rotation_round_trips_with_the_norm_in_one_block() {
    let dim = 5000;
    let params = DpParams::choose(dim, 6, 4, 1.0, 0.0, 14).unwrap();
    assert_eq!((params.rotation_block(), params.padded_dim), (1024, 5120));
    let mut rng = ChaCha12Rng::seed_from_u64(11);
    // Aligned (the same update at every client), so the sum's norm is six clip norms.
    let mut concentrated = vec![0.0f32; dim];
    concentrated[4096..].copy_from_slice(&random_update(&mut rng, dim - 4096, 1.0));
    let updates = vec![concentrated; 6];
    let (decoded, truth) = round_trip(&updates, &params, 3);
    assert_within_quantization(&decoded, &truth, &params, 6);
    let spread: Vec<Vec<f32>> = (0..6).map(|_| random_update(&mut rng, dim, 1.0)).collect();
    let (decoded, truth) = round_trip(&spread, &params, 4);
    assert_within_quantization(&decoded, &truth, &params, 6);
}

#[test]
fn invalid_parameters_and_inputs_are_refused() {
    let good = DpParams::choose(100, 4, 2, 1.0, 0.5, 16).unwrap();
    let mut rng = ChaCha12Rng::seed_from_u64(6);
    let cases = [
        DpParams {
            padded_dim: 256,
            ..good
        },
        DpParams { bits: 33, ..good },
        DpParams { beta: 1.0, ..good },
        DpParams { gamma: 0.0, ..good },
        DpParams {
            clip_norm: f64::NAN,
            ..good
        },
        DpParams {
            min_clients: 0,
            ..good
        },
        DpParams {
            gamma: 1e-12,
            ..good
        },
    ];
    for bad in cases {
        assert!(
            matches!(bad.validate(), Err(Error::ParameterOutOfRange { .. })),
            "{bad:?}"
        );
        assert!(encode(&[0.0; 100], &bad, &SEED, &mut rng).is_err());
    }
    assert_eq!(
        encode(&[0.0; 99], &good, &SEED, &mut rng),
        Err(Error::DimensionMismatch {
            expected: 100,
            actual: 99
        })
    );
    let mut nan = vec![0.0f32; 100];
    nan[3] = f32::NAN;
    assert_eq!(
        encode(&nan, &good, &SEED, &mut rng),
        Err(Error::NonFiniteUpdate)
    );
    let mut sum = vec![0u32; 128];
    sum[7] = 1 << 16;
    assert_eq!(
        decode(&sum, &good, &SEED),
        Err(Error::SumValueOutOfRange {
            index: 7,
            value: 1 << 16,
            bits: 16
        })
    );
    assert!(decode(&[0; 100], &good, &SEED).is_err());
}

#[test]
fn encodings_are_reduced_and_params_serialize() {
    let params = DpParams::choose(300, 3, 3, 1.0, 2.0, 12).unwrap();
    let mut rng = ChaCha12Rng::seed_from_u64(7);
    let enc = encode(&random_update(&mut rng, 300, 1.0), &params, &SEED, &mut rng).unwrap();
    assert_eq!(enc.len(), 512);
    assert!(enc.iter().all(|&v| v < 1 << 12));
    let json = serde_json::to_string(&params).unwrap();
    assert_eq!(serde_json::from_str::<DpParams>(&json).unwrap(), params);
}

#[test]
fn zcdp_matches_the_closed_form() {
    let params = DpParams::choose(1000, 10, 8, 1.0, 0.8, 16).unwrap();
    for clients in [8u32, 10] {
        let (c, g, d) = (params.clip_norm, params.gamma, params.padded_dim as f64);
        let v = params.noise_stddev.powi(2) / (g * g * f64::from(params.min_clients));
        let s = (2.0 * (1.0 / params.beta).ln()).sqrt();
        let delta_sq = ((c + g * d.sqrt()).powi(2))
            .min(c * c + g * g * d / 4.0 + s * g * (c + g * d.sqrt() / 2.0));
        let mut tau = 0.0;
        for k in 1..clients {
            let k = f64::from(k);
            tau += (-2.0 * std::f64::consts::PI.powi(2) * v * k / (k + 1.0)).exp();
        }
        tau *= 10.0;
        let a = delta_sq / (f64::from(clients) * g * g * v);
        let expected = (a / 2.0 + tau * d).min((a.sqrt() + tau * d.sqrt()).powi(2) / 2.0);
        let rho = zcdp_rho(&params, clients);
        assert!(
            (rho - expected).abs() <= 1e-12 * expected,
            "{rho} vs {expected}"
        );
    }
    // With ample noise τ vanishes and γ is tiny, so ρ → c²/(2σ²) (the Gaussian mechanism).
    let rho = zcdp_rho(&params, params.min_clients);
    let gaussian = 1.0 / (2.0 * 0.8 * 0.8);
    assert!(
        (rho / gaussian - 1.0).abs() < 0.05,
        "ρ = {rho}, Gaussian {gaussian}"
    );
    assert!(zcdp_rho(&params, 10) < rho);
    assert_eq!(
        zcdp_rho(
            &DpParams {
                noise_stddev: 0.0,
                ..params
            },
            8
        ),
        f64::INFINITY
    );
    assert_eq!(zcdp_rho(&params, 0), f64::INFINITY);
    // Too little noise per client in integer units: the τ correction dominates.
    let coarse = DpParams {
        gamma: 0.8,
        ..params
    };
    assert!(zcdp_rho(&coarse, 8) > 10.0 * c_over_sigma_rho(&coarse));
}

fn c_over_sigma_rho(p: &DpParams) -> f64 {
    p.clip_norm.powi(2) / (2.0 * p.noise_stddev.powi(2))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        rng_seed: proptest::test_runner::RngSeed::Fixed(20_240_601),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn noiseless_round_trip(
        dim in 1usize..300,
        clients in 1u32..6,
        bits in 10u32..=32,
        clip in 0.01f64..10.0,
        seed in any::<u64>(),
    ) {
        let params = DpParams::choose(dim, clients, clients, clip, 0.0, bits).unwrap();
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        let updates: Vec<Vec<f32>> =
            (0..clients).map(|_| random_update(&mut rng, dim, clip as f32)).collect();
        let (decoded, truth) = round_trip(&updates, &params, seed % 1000);
        assert_within_quantization(&decoded, &truth, &params, clients as usize);
    }
}
