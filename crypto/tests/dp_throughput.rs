//! Throughput measurements of the DP encoding, ignored by default. Run with
//! `cargo test --release -p quorum-crypto --test dp_throughput -- --ignored --nocapture`.

use std::num::NonZeroUsize;
use std::time::Instant;

use quorum_crypto::dp::{DiscreteGaussian, DpParams, decode, encode};
use rand::SeedableRng;
use rand_chacha::{ChaCha8Rng, ChaCha12Rng};

#[test]
#[ignore = "timing measurement; run in release"]
fn sampler_throughput() {
    let n = 20_000_000;
    let mut out = vec![0i64; n];
    for sigma in [0.5f64, 10.0, 2000.0, 3.7e5] {
        let dg = DiscreteGaussian::new(sigma * sigma).unwrap();
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        let start = Instant::now();
        dg.fill(&mut rng, &mut out);
        let chacha12 = n as f64 / start.elapsed().as_secs_f64();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let start = Instant::now();
        dg.fill(&mut rng, &mut out);
        let chacha8 = n as f64 / start.elapsed().as_secs_f64();
        let threads = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        let start = Instant::now();
        dg.fill_parallel(&[7; 32], &mut out, threads);
        let par = n as f64 / start.elapsed().as_secs_f64();
        println!(
            "sigma {sigma}: {:.1} M/s (ChaCha12), {:.1} M/s (ChaCha8), {:.1} M/s ({threads} threads)",
            chacha12 / 1e6,
            chacha8 / 1e6,
            par / 1e6
        );
    }
}

#[test]
#[ignore = "timing measurement; run in release"]
fn encode_decode_10m() {
    let dim = 10_000_000;
    let update: Vec<f32> = (0..dim)
        .map(|i| ((i % 1000) as f32 - 500.0) * 1e-6)
        .collect();
    for noise in [0.0, 0.5] {
        let params = DpParams::choose(dim, 8, 6, 1.0, noise, 20).unwrap();
        let mut rng = ChaCha12Rng::seed_from_u64(3);
        let start = Instant::now();
        let enc = encode(&update, &params, &[9; 32], &mut rng).unwrap();
        let t_enc = start.elapsed();
        let start = Instant::now();
        let dec = decode(&enc, &params, &[9; 32]).unwrap();
        let t_dec = start.elapsed();
        assert_eq!(dec.len(), dim);
        println!(
            "d = {dim} (padded {}), noise {noise}: encode {t_enc:?}, decode {t_dec:?}",
            params.padded_dim
        );
    }
}
