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
//! the output depends on the seeds drawn from `rng`, not on the number of threads. For the same
//! reason the client can compute its encoding in segments ([`StreamEncoder`]) and upload each
//! as it is made, holding no more than its update and one segment.

use std::num::NonZeroUsize;

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;

use super::Error;
use super::hadamard::{apply_signs_from, fwht_unnormalized};
use super::parallel::in_parallel;
use super::params::DpParams;
use super::sampler::DiscreteGaussian;

/// Noise samples drawn per parallel batch (8 MiB of `i64` scratch), each batch from its own
/// secret seed.
const NOISE_BATCH: usize = 1 << 20;

/// Coordinates rounded per ChaCha12 stream.
const ROUNDING_CHUNK: usize = 1 << 16;

/// Encodes one client's update into `padded_dim` values in `[0, 2^bits)`, ready for secure
/// aggregation. `rng` supplies the rounding and noise randomness and must be secret.
///
/// The whole encoding in memory; [`StreamEncoder`] makes the same values segment by segment.
pub fn encode<R: CryptoRng + ?Sized>(
    update: &[f32],
    params: &DpParams,
    round_seed: &[u8; 32],
    rng: &mut R,
) -> Result<Vec<u32>, Error> {
    let encoder = StreamEncoder::new(update.to_vec(), params, round_seed, rng)?;
    let mut out = Vec::with_capacity(encoder.len());
    let mut segments = encoder.segments();
    while let Some((_, values)) = segments.next_segment() {
        out.extend_from_slice(values);
    }
    Ok(out)
}

/// An update whose encoding is fixed (clipping, and every secret seed drawn) but not yet
/// computed: [`StreamEncoder::segments`] computes it one segment of `threads × 2^20`
/// coordinates at a time, so memory beyond the update is about 20 bytes per segment
/// coordinate (rotation in `f64`, output, noise), whatever the model's size.
///
/// Conditional rounding needs the norm of the whole rounded vector before any of it may leave:
/// [`StreamEncoder::new`] rotates and rounds every segment once to find a rounding seed that
/// meets the bound, and the segments are rotated and rounded again, with that seed, as they
/// are read. Rotation costs twice what it costs in one piece; memory is what this buys.
///
/// The values are those [`encode`] returns for the same randomness: `rng` is drawn from in
/// the same order (each rounding attempt's seed, then one seed per noise batch).
pub struct StreamEncoder {
    update: Vec<f32>,
    params: DpParams,
    round_seed: [u8; 32],
    /// Clipping, the rotation's `1/√B` and the `1/γ` scaling in one factor.
    scale: f64,
    mask: u32,
    rounding_seed: [u8; 32],
    noise: DiscreteGaussian,
    /// One per [`NOISE_BATCH`] coordinates; empty without noise.
    noise_seeds: Vec<[u8; 32]>,
    threads: NonZeroUsize,
    segment_len: usize,
}

impl StreamEncoder {
    /// Clips `update`, finds a rounding seed that meets the norm bound and draws the noise
    /// seeds. `rng` must be secret.
    pub fn new<R: CryptoRng + ?Sized>(
        update: Vec<f32>,
        params: &DpParams,
        round_seed: &[u8; 32],
        rng: &mut R,
    ) -> Result<Self, Error> {
        let threads = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        Self::on(update, params, round_seed, rng, threads)
    }

    /// [`StreamEncoder::new`] computing on `threads` threads.
    fn on<R: CryptoRng + ?Sized>(
        update: Vec<f32>,
        params: &DpParams,
        round_seed: &[u8; 32],
        rng: &mut R,
        threads: NonZeroUsize,
    ) -> Result<Self, Error> {
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
        let block = params.rotation_block();
        // Whole rotation blocks and whole noise batches: both are powers of two, and
        // `padded_dim` is a whole number of blocks.
        let unit = block.max(NOISE_BATCH);
        let mut encoder = Self {
            update,
            params: *params,
            round_seed: *round_seed,
            scale: clip / (params.gamma * (block as f64).sqrt()),
            mask: modulus_mask(params.bits),
            rounding_seed: [0; 32],
            noise: params.noise_sampler()?,
            noise_seeds: Vec::new(),
            threads,
            segment_len: (unit * threads.get()).min(params.padded_dim),
        };
        // A 1e-14 relative margin absorbs the f64 error of the bound and of the integer norm's
        // conversion, so the check can only be stricter than the exact one; it stays far below
        // the bound's slack of `sqrt(2·ln(1/β))·c'` because `c' ≤ 2^40` and `β ≤ e^{-1/2}`.
        let bound_sq = params.rounded_norm_bound_sq() * (1.0 - 1e-14);
        // Each attempt meets the bound with probability at least 1 − β (KLS21, conditional
        // randomized rounding), so this ends after 1/(1 − β) attempts on average.
        loop {
            rng.fill_bytes(&mut encoder.rounding_seed);
            if encoder.rounded_norm_sq() as f64 <= bound_sq {
                break;
            }
        }
        if encoder.noise.sigma_squared() > 0.0 {
            encoder.noise_seeds = (0..params.padded_dim.div_ceil(NOISE_BATCH))
                .map(|_| {
                    let mut seed = [0u8; 32];
                    rng.fill_bytes(&mut seed);
                    seed
                })
                .collect();
        }
        Ok(encoder)
    }

    /// Coordinates in the encoding (`padded_dim`).
    pub fn len(&self) -> usize {
        self.params.padded_dim
    }

    /// Always false: an encoding has at least one rotation block.
    pub fn is_empty(&self) -> bool {
        self.params.padded_dim == 0
    }

    /// The encoding's segments, in order.
    pub fn segments(&self) -> Segments<'_> {
        Segments {
            encoder: self,
            offset: 0,
            x: Vec::new(),
            out: Vec::new(),
            noise: Vec::new(),
        }
    }

    /// The squared norm of the whole vector rounded with the current rounding seed.
    fn rounded_norm_sq(&self) -> u128 {
        let (mut x, mut out) = (Vec::new(), Vec::new());
        (0..self.len())
            .step_by(self.segment_len)
            .map(|offset| {
                self.rotate(offset, &mut x);
                self.round(offset, &x, &mut out)
            })
            .sum()
    }

    /// Scales, signs and rotates the segment at `offset` into `x`.
    fn rotate(&self, offset: usize, x: &mut Vec<f64>) {
        let len = self.segment_len.min(self.len() - offset);
        let present = self.update.get(offset..).unwrap_or(&[]);
        x.clear();
        x.extend(present.iter().take(len).map(|&u| f64::from(u)));
        x.resize(len, 0.0);
        let block = self.params.rotation_block();
        in_parallel(x, block, self.threads, |i, b| {
            apply_signs_from(b, &self.round_seed, offset + i * block, self.scale);
            fwht_unnormalized(b);
        });
    }

    /// Rounds the rotated segment `x` at `offset` into `out` (mod 2^b) and returns its squared
    /// norm. Rounding chunk `i` of the whole vector uses stream `i` of the rounding seed.
    fn round(&self, offset: usize, x: &[f64], out: &mut Vec<u32>) -> u128 {
        const TWO_POW_32: f64 = 4_294_967_296.0;
        out.resize(x.len(), 0);
        let first = offset / ROUNDING_CHUNK;
        let norms = in_parallel(out, ROUNDING_CHUNK, self.threads, |i, out| {
            let mut stream = ChaCha12Rng::from_seed(self.rounding_seed);
            stream.set_stream((first + i) as u64);
            let x = &x[i * ROUNDING_CHUNK..];
            let mut norm_sq: u128 = 0;
            for (o, &v) in out.iter_mut().zip(x) {
                let floor = v.floor();
                let up = f64::from(stream.next_u32()) < (v - floor) * TWO_POW_32;
                // |v| ≤ c/γ ≤ 2^40 (validated), so the cast is exact.
                let r = floor as i64 + i64::from(up);
                norm_sq += u128::from(r.unsigned_abs()) * u128::from(r.unsigned_abs());
                *o = r as u32 & self.mask;
            }
            norm_sq
        });
        norms.into_iter().sum()
    }
}

impl std::fmt::Debug for StreamEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The update and the seeds are secret: show only the shape.
        f.debug_struct("StreamEncoder")
            .field("dim", &self.params.dim)
            .field("padded_dim", &self.params.padded_dim)
            .field("segment_len", &self.segment_len)
            .finish_non_exhaustive()
    }
}

/// A cursor over a [`StreamEncoder`]'s segments, holding one segment's scratch.
pub struct Segments<'a> {
    encoder: &'a StreamEncoder,
    offset: usize,
    x: Vec<f64>,
    out: Vec<u32>,
    noise: Vec<i64>,
}

impl Segments<'_> {
    /// The next segment's offset and values in `[0, 2^bits)`, or `None` after the last. The
    /// values may be changed in place (masked) before the next call.
    pub fn next_segment(&mut self) -> Option<(usize, &mut [u32])> {
        let encoder = self.encoder;
        let offset = self.offset;
        if offset >= encoder.len() {
            return None;
        }
        encoder.rotate(offset, &mut self.x);
        encoder.round(offset, &self.x, &mut self.out);
        if !encoder.noise_seeds.is_empty() {
            let first = offset / NOISE_BATCH;
            for (i, chunk) in self.out.chunks_mut(NOISE_BATCH).enumerate() {
                self.noise.resize(chunk.len(), 0);
                let seed = &encoder.noise_seeds[first + i];
                encoder
                    .noise
                    .fill_parallel(seed, &mut self.noise, encoder.threads);
                for (o, &z) in chunk.iter_mut().zip(&self.noise) {
                    // `as u32` keeps the value modulo 2^32; the mask reduces it modulo 2^b.
                    *o = o.wrapping_add(z as u32) & encoder.mask;
                }
            }
        }
        self.offset += self.out.len();
        Some((offset, &mut self.out))
    }
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
    use crate::dp::hadamard::apply_signs;

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

    /// The encoding computed whole, as it was before segments: the reference the segmented
    /// encoder must match bit for bit.
    fn encode_whole(
        update: &[f32],
        params: &DpParams,
        round_seed: &[u8; 32],
        rng: &mut ChaCha20Rng,
    ) -> Vec<u32> {
        use rand::RngCore as _;
        let norm = update
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        let clip = (params.clip_norm / norm).min(1.0);
        let block = params.rotation_block();
        let mut x = vec![0.0f64; params.padded_dim];
        x.iter_mut()
            .zip(update)
            .for_each(|(x, &u)| *x = f64::from(u));
        apply_signs(
            &mut x,
            round_seed,
            clip / (params.gamma * (block as f64).sqrt()),
        );
        x.chunks_mut(block).for_each(fwht_unnormalized);
        let (mask, bound_sq) = (modulus_mask(params.bits), params.rounded_norm_bound_sq());
        let mut out = vec![0u32; params.padded_dim];
        loop {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            let mut norm_sq = 0u128;
            for (i, (out, x)) in out
                .chunks_mut(ROUNDING_CHUNK)
                .zip(x.chunks(ROUNDING_CHUNK))
                .enumerate()
            {
                let mut stream = ChaCha12Rng::from_seed(seed);
                stream.set_stream(i as u64);
                for (o, &v) in out.iter_mut().zip(x) {
                    let up = f64::from(stream.next_u32()) < (v - v.floor()) * 4_294_967_296.0;
                    let r = v.floor() as i64 + i64::from(up);
                    norm_sq += u128::from(r.unsigned_abs()).pow(2);
                    *o = r as u32 & mask;
                }
            }
            if norm_sq as f64 <= bound_sq * (1.0 - 1e-14) {
                break;
            }
        }
        let noise = params.noise_sampler().unwrap();
        for chunk in out.chunks_mut(NOISE_BATCH) {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            let mut samples = vec![0i64; chunk.len()];
            noise.fill_parallel(&seed, &mut samples, NonZeroUsize::MIN);
            for (o, &z) in chunk.iter_mut().zip(&samples) {
                *o = o.wrapping_add(z as u32) & mask;
            }
        }
        out
    }

    #[test]
    fn streamed_segments_are_the_whole_encoding() {
        // More coordinates than one segment of one, two or three threads; several rotation
        // blocks and noise batches per segment, the last segment shorter.
        let dim = 5_300_000;
        let params = DpParams::choose(dim, 3, 2, 1.0, 0.5, 24).unwrap();
        let update: Vec<f32> = (0..dim).map(|i| ((i % 89) as f32 - 44.0) * 1e-4).collect();
        let seed = [9u8; 32];
        let expected = encode_whole(
            &update,
            &params,
            &seed,
            &mut ChaCha20Rng::from_seed([5; 32]),
        );
        for threads in [1, 2, 3] {
            let mut rng = ChaCha20Rng::from_seed([5; 32]);
            let threads = NonZeroUsize::new(threads).unwrap();
            let encoder = StreamEncoder::on(update.clone(), &params, &seed, &mut rng, threads);
            let encoder = encoder.unwrap();
            assert!(
                encoder.segment_len < encoder.len()
                    && !encoder.len().is_multiple_of(encoder.segment_len)
            );
            let (mut streamed, mut segments) = (Vec::new(), encoder.segments());
            while let Some((offset, values)) = segments.next_segment() {
                assert_eq!(offset, streamed.len());
                streamed.extend_from_slice(values);
            }
            assert!(streamed == expected, "{threads} threads");
        }
        // Other secret randomness, another encoding.
        let mut rng = ChaCha20Rng::from_seed([6; 32]);
        assert!(encode(&update, &params, &seed, &mut rng).unwrap() != expected);
    }
}
