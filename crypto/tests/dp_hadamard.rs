//! Walsh–Hadamard transform and randomized rotation: orthonormality, inverse, sign derivation.

use proptest::prelude::*;
use quorum_crypto::dp::Error;
use quorum_crypto::dp::hadamard::{SIGN_DOMAIN, fwht, rotate, rotation_signs, unrotate};
use ring::digest::{SHA256, digest};

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Dense reference: H[i][j] = (-1)^popcount(i & j) / √n.
fn dense_hadamard(x: &[f64]) -> Vec<f64> {
    let n = x.len();
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    if (i & j).count_ones() % 2 == 0 {
                        x[j]
                    } else {
                        -x[j]
                    }
                })
                .sum::<f64>()
                / (n as f64).sqrt()
        })
        .collect()
}

fn vector() -> impl Strategy<Value = Vec<f64>> {
    (0u32..=10).prop_flat_map(|k| prop::collection::vec(-1e3f64..1e3, 1usize << k))
}

proptest! {
    #![proptest_config(ProptestConfig {
        rng_seed: proptest::test_runner::RngSeed::Fixed(7),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn fwht_is_orthonormal_and_self_inverse(x in vector()) {
        let mut y = x.clone();
        fwht(&mut y).unwrap();
        prop_assert!((norm(&y) - norm(&x)).abs() <= 1e-9 * (1.0 + norm(&x)));
        fwht(&mut y).unwrap();
        for (a, b) in x.iter().zip(&y) {
            prop_assert!((a - b).abs() <= 1e-9 * (1.0 + a.abs()));
        }
    }

    #[test]
    fn rotation_preserves_norm_and_inverts(x in vector(), seed in any::<[u8; 32]>()) {
        let mut y = x.clone();
        rotate(&mut y, &seed).unwrap();
        prop_assert!((norm(&y) - norm(&x)).abs() <= 1e-9 * (1.0 + norm(&x)));
        unrotate(&mut y, &seed).unwrap();
        for (a, b) in x.iter().zip(&y) {
            prop_assert!((a - b).abs() <= 1e-9 * (1.0 + a.abs()));
        }
    }
}

#[test]
fn fwht_matches_the_dense_matrix() {
    for k in 0..=9 {
        let x: Vec<f64> = (0..1usize << k)
            .map(|i| ((i * 7919) % 101) as f64 - 50.0)
            .collect();
        let mut fast = x.clone();
        fwht(&mut fast).unwrap();
        for (a, b) in fast.iter().zip(dense_hadamard(&x)) {
            assert!((a - b).abs() < 1e-9, "n = {}: {a} vs {b}", x.len());
        }
    }
    // Beyond the cache block (2^13), the out-of-cache levels are used.
    let x: Vec<f64> = (0..1usize << 15).map(|i| ((i * 31) % 17) as f64).collect();
    let mut fast = x.clone();
    fwht(&mut fast).unwrap();
    let n = x.len() as f64;
    for i in [0usize, 1, 4097, 8192, 20000, 32767] {
        let expected: f64 = x
            .iter()
            .enumerate()
            .map(|(j, v)| {
                if (i & j).count_ones() % 2 == 0 {
                    *v
                } else {
                    -*v
                }
            })
            .sum::<f64>()
            / n.sqrt();
        assert!((fast[i] - expected).abs() < 1e-7, "row {i}");
    }
}

#[test]
fn rotation_is_signs_then_hadamard() {
    let seed = [3u8; 32];
    let x: Vec<f64> = (0..64).map(|i| i as f64).collect();
    let signs = rotation_signs(&seed, 64);
    let signed: Vec<f64> = x
        .iter()
        .zip(&signs)
        .map(|(v, &neg)| if neg { -v } else { *v })
        .collect();
    let mut rotated = x.clone();
    rotate(&mut rotated, &seed).unwrap();
    for (a, b) in rotated.iter().zip(dense_hadamard(&signed)) {
        assert!((a - b).abs() < 1e-9);
    }
}

#[test]
fn signs_follow_the_documented_sha256_counter_mode() {
    let seed: [u8; 32] = core::array::from_fn(|i| i as u8);
    let signs = rotation_signs(&seed, 700);
    for (block, chunk) in signs.chunks(256).enumerate() {
        let mut input = SIGN_DOMAIN.to_vec();
        input.extend_from_slice(&seed);
        input.extend_from_slice(&(block as u64).to_be_bytes());
        let hash = digest(&SHA256, &input);
        for (j, &neg) in chunk.iter().enumerate() {
            assert_eq!(
                neg,
                hash.as_ref()[j / 8] >> (j % 8) & 1 == 1,
                "sign {}",
                block * 256 + j
            );
        }
    }
    // A prefix does not depend on the requested length, and about half the signs are negative.
    assert_eq!(rotation_signs(&seed, 100), signs[..100]);
    let negatives = signs.iter().filter(|&&s| s).count();
    assert!(
        (280..420).contains(&negatives),
        "{negatives} of 700 negative"
    );
    assert_ne!(rotation_signs(&[4; 32], 700), signs);
}

#[test]
fn non_power_of_two_lengths_are_refused() {
    let mut x = vec![0.0; 12];
    assert_eq!(fwht(&mut x), Err(Error::LengthNotPowerOfTwo { len: 12 }));
    assert_eq!(
        rotate(&mut x, &[0; 32]),
        Err(Error::LengthNotPowerOfTwo { len: 12 })
    );
    assert_eq!(
        unrotate(&mut x, &[0; 32]),
        Err(Error::LengthNotPowerOfTwo { len: 12 })
    );
}
