//! Client encoding (KLS21 Algorithm 1) and aggregator decoding (Algorithm 2).
//!
//! Client, for an update `Δ ∈ R^dim`:
//! 1. clip: `x = Δ · min(1, c / ‖Δ‖₂)`;
//! 2. pad with zeros to `d = padded_dim` and rotate: `x ← H·D·x` ([`super::hadamard`]), `H`
//!    block-diagonal with blocks of [`DpParams::rotation_block`] coordinates;
//! 3. scale to integer units: `x ← x / γ`;
//! 4. round each coordinate to `⌊x_j⌋` or `⌈x_j⌉` with probabilities making it unbiased
//!    (probabilities resolved to 2^-32), repeating the whole rounding until
//!    `‖x̃‖₂² ≤ B²` ([`DpParams::rounded_norm_bound_sq`], enforced with a 10^-14 relative
//!    margin so float rounding can only make the check stricter);
//! 5. add `N_Z(0, σ²/(γ²·t))` noise to each coordinate ([`super::sampler`]);
//! 6. reduce modulo `2^b`.
//!
//! Aggregator, for the sum modulo `2^b` of any set of encodings: centre each value into
//! `(-2^(b-1), 2^(b-1)]`, multiply by `γ`, apply the inverse rotation, keep the first `dim`
//! coordinates. The result is the sum of the clipped updates plus the noise plus the rounding
//! error (unbiased, variance at most `γ²/4` per coordinate per client); the caller divides by
//! the number of survivors.
//!
//! Rotation, rounding and noise run on every core: the blocks rotate independently, and the
//! rounding and noise of chunk `i` come from a ChaCha12 stream `i` of a fresh secret seed, so
//! the output depends on the seeds drawn from `rng`, not on the number of threads.

use std::num::NonZeroUsize;

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;

use super::Error;
use super::hadamard::{apply_signs, apply_signs_from, fwht_unnormalized};
use super::parallel::in_parallel;
use super::params::DpParams;

/// Noise samples drawn per parallel batch (8 MiB of `i64` scratch).
const NOISE_BATCH: usize = 1 << 20;

/// Coordinates rounded per ChaCha12 stream.
const ROUNDING_CHUNK: usize = 1 << 16;

/// Encodes one client's update into `padded_dim` values in `[0, 2^bits)`, ready for secure
/// aggregation. `rng` supplies the rounding and noise randomness and must be secret.
pub fn encode<R: CryptoRng + ?Sized>(
    update: &[f32],
    params: &DpParams,
    round_seed: &[u8; 32],
    rng: &mut R,
) -> Result<Vec<u32>, Error> {
    let threads = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    encode_on(update, params, round_seed, rng, threads)
}

/// [`encode`] on `threads` threads.
fn encode_on<R: CryptoRng + ?Sized>(
    update: &[f32],
    params: &DpParams,
    round_seed: &[u8; 32],
    rng: &mut R,
    threads: NonZeroUsize,
) -> Result<Vec<u32>, Error> {
    params.validate()?;
    if update.len() != params.dim {
        return Err(Error::DimensionMismatch {
            expected: params.dim,
            actual: update.len(),
        });
    }
    let norm_sq: f64 = update.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    if !norm_sq.is_finite() {
        return Err(Error::NonFiniteUpdate);
    }
    let norm = norm_sq.sqrt();
    let clip = if norm > params.clip_norm {
        params.clip_norm / norm
    } else {
        1.0
    };
    let d = params.padded_dim;
    let block = params.rotation_block();
    // Fold clipping, the rotation's 1/√B and the 1/γ scaling into one multiplication.
    let scale = clip / (params.gamma * (block as f64).sqrt());
    let mut x = vec![0.0f64; d];
    x.iter_mut()
        .zip(update)
        .for_each(|(x, &u)| *x = f64::from(u));
    apply_signs(&mut x, round_seed, scale);
    in_parallel(&mut x, block, threads, |_, b| fwht_unnormalized(b));

    let mask = modulus_mask(params.bits);
    // A 1e-14 relative margin absorbs the f64 error of the bound and of the integer norm's
    // conversion, so the check can only be stricter than the exact one; it stays far below the
    // bound's slack of `sqrt(2·ln(1/β))·c'` because `c' ≤ 2^40` and `β ≤ e^{-1/2}`.
    let bound_sq = params.rounded_norm_bound_sq() * (1.0 - 1e-14);
    let mut out = vec![0u32; d];
    // Each attempt meets the bound with probability at least 1 − β (KLS21, conditional
    // randomized rounding), so this ends after 1/(1 − β) attempts on average.
    while !round_into(&x, &mut out, mask, bound_sq, rng, threads) {}

    let noise = params.noise_sampler()?;
    if noise.sigma_squared() > 0.0 {
        // Each batch from a fresh secret seed (see `fill_parallel`).
        let mut samples = vec![0i64; NOISE_BATCH.min(d)];
        for chunk in out.chunks_mut(NOISE_BATCH) {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            let samples = &mut samples[..chunk.len()];
            noise.fill_parallel(&seed, samples, threads);
            for (o, &z) in chunk.iter_mut().zip(samples.iter()) {
                // `as u32` keeps the value modulo 2^32; the mask reduces it modulo 2^b.
                *o = o.wrapping_add(z as u32) & mask;
            }
        }
    }
    Ok(out)
}

/// Randomized rounding of `x` into `out` (mod 2^b); true when `‖x̃‖₂² ≤ bound_sq`. Each
/// attempt draws a fresh secret seed; chunk `i` rounds with its stream `i`.
fn round_into<R: RngCore + ?Sized>(
    x: &[f64],
    out: &mut [u32],
    mask: u32,
    bound_sq: f64,
    rng: &mut R,
    threads: NonZeroUsize,
) -> bool {
    const TWO_POW_32: f64 = 4_294_967_296.0;
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let norms = in_parallel(out, ROUNDING_CHUNK, threads, |i, out| {
        let mut stream = ChaCha12Rng::from_seed(seed);
        stream.set_stream(i as u64);
        let x = &x[i * ROUNDING_CHUNK..];
        let mut norm_sq: u128 = 0;
        for (o, &v) in out.iter_mut().zip(x) {
            let floor = v.floor();
            let up = f64::from(stream.next_u32()) < (v - floor) * TWO_POW_32;
            // |v| ≤ c/γ ≤ 2^40 (validated), so the cast is exact.
            let r = floor as i64 + i64::from(up);
            norm_sq += u128::from(r.unsigned_abs()) * u128::from(r.unsigned_abs());
            *o = r as u32 & mask;
        }
        norm_sq
    });
    norms.into_iter().sum::<u128>() as f64 <= bound_sq
}

/// Decodes the modular sum of any set of encodings made with `params` and `round_seed` into
/// the sum of their clipped updates (plus noise and rounding error), of length `dim`.
pub fn decode(sum: &[u32], params: &DpParams, round_seed: &[u8; 32]) -> Result<Vec<f32>, Error> {
    decode_in_place(sum.to_vec(), params, round_seed)
}

/// [`decode`] in the sum's own memory: each value's f32 takes the place of its u32, so beyond
/// the sum, decoding needs one rotation block of f64 scratch per thread and no more. Threads
/// are capped so that their scratch stays within half the sum's size (one thread for the
/// largest models, whose blocks are a large share of the vector).
pub fn decode_in_place(
    mut sum: Vec<u32>,
    params: &DpParams,
    round_seed: &[u8; 32],
) -> Result<Vec<f32>, Error> {
    params.validate()?;
    if sum.len() != params.padded_dim {
        return Err(Error::DimensionMismatch {
            expected: params.padded_dim,
            actual: sum.len(),
        });
    }
    let mask = modulus_mask(params.bits);
    if let Some((index, &value)) = sum.iter().enumerate().find(|(_, v)| **v & !mask != 0) {
        return Err(Error::SumValueOutOfRange {
            index,
            value,
            bits: params.bits,
        });
    }
    let block = params.rotation_block();
    let scale = params.gamma / (block as f64).sqrt();
    let cap = NonZeroUsize::new(sum.len() / (4 * block)).unwrap_or(NonZeroUsize::MIN);
    let threads = std::thread::available_parallelism()
        .unwrap_or(NonZeroUsize::MIN)
        .min(cap);
    in_parallel(&mut sum, block, threads, |i, values| {
        let mut x: Vec<f64> = values.iter().map(|&v| signed(v, params.bits)).collect();
        fwht_unnormalized(&mut x);
        apply_signs_from(&mut x, round_seed, i * block, scale);
        values
            .iter_mut()
            .zip(&x)
            .for_each(|(out, &v)| *out = (v as f32).to_bits());
    });
    // Every value now holds its f32's bits; the padding is dropped.
    sum.truncate(params.dim);
    Ok(bytemuck::allocation::cast_vec(sum))
}

/// The value of a sum element mod `2^bits`, taken in `(−2^(bits−1), 2^(bits−1)]`.
fn signed(value: u32, bits: u32) -> f64 {
    let (v, half) = (i64::from(value), 1i64 << (bits - 1));
    (if v > half { v - (1i64 << bits) } else { v }) as f64
}

/// `2^bits − 1` for `bits ≤ 32`.
fn modulus_mask(bits: u32) -> u32 {
    u32::MAX >> (32 - bits)
}

#[cfg(test)]
mod tests {
    use rand::Rng as _;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn decoding_block_by_block_equals_rotating_the_whole_vector_back() {
        // Several rotation blocks, the last cut by `dim`: every value as the whole padded
        // vector, rotated back at once and cut, gives it (the earlier decoder, bit for bit).
        let dim = 300_000;
        let params = DpParams::choose(dim, 3, 2, 1.0, 0.5, 24).unwrap();
        assert!(params.padded_dim / params.rotation_block() > 2 && params.padded_dim > dim);
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        let mask = modulus_mask(params.bits);
        let sum: Vec<u32> = (0..params.padded_dim)
            .map(|_| rng.random::<u32>() & mask)
            .collect();
        let seed = [4u8; 32];
        let mut whole: Vec<f64> = sum.iter().map(|&v| signed(v, params.bits)).collect();
        let block = params.rotation_block();
        whole.chunks_mut(block).for_each(fwht_unnormalized);
        apply_signs(&mut whole, &seed, params.gamma / (block as f64).sqrt());
        let expected: Vec<f32> = whole[..dim].iter().map(|&v| v as f32).collect();
        assert_eq!(decode(&sum, &params, &seed).unwrap(), expected);
    }

    #[test]
    fn encoding_does_not_depend_on_the_number_of_threads() {
        // Several rotation blocks and rounding chunks, with noise.
        let dim = 300_000;
        let params = DpParams::choose(dim, 3, 2, 1.0, 0.5, 24).unwrap();
        let update: Vec<f32> = (0..dim).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        let seed = [9u8; 32];
        let on = |threads: usize| {
            let mut rng = ChaCha20Rng::from_seed([5; 32]);
            let threads = NonZeroUsize::new(threads).unwrap();
            encode_on(&update, &params, &seed, &mut rng, threads).unwrap()
        };
        let one = on(1);
        assert_eq!(one, on(3));
        assert_eq!(one, on(8));
        // Other secret randomness, another encoding.
        let mut rng = ChaCha20Rng::from_seed([6; 32]);
        let other = encode_on(&update, &params, &seed, &mut rng, NonZeroUsize::MIN).unwrap();
        assert_ne!(one, other);
    }
}
