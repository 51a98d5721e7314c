//! Fast Walsh–Hadamard transform and the randomized Hadamard rotation `x ↦ H·D·x`.
//!
//! `H` is the Sylvester–Hadamard matrix of order `n = 2^k` scaled by `1/√n`, so it is
//! orthonormal, symmetric and its own inverse. `D = diag(s)` holds random signs derived from the
//! public 32-byte round seed, byte-exactly:
//!
//! ```text
//! block_i = SHA-256("quorum/dp/hadamard-signs/v1" || round_seed || u64_be(i))   i = 0, 1, ...
//! stream  = block_0 || block_1 || ...
//! s_j     = -1 if bit (j mod 8) (least significant first) of stream[j / 8] is 1, else +1
//! ```
//!
//! The sign of coordinate `j` does not depend on the vector length. The inverse rotation is
//! `x ↦ D·H·x`. The DP encoding applies `H` block by block (see
//! [`super::params::rotation_block`]), with the signs taken over the whole vector.

use ring::digest::{SHA256, digest};

use super::Error;

/// Domain-separation prefix of the sign derivation.
pub const SIGN_DOMAIN: &[u8] = b"quorum/dp/hadamard-signs/v1";

/// Butterflies up to this span run block by block, inside the cache.
const CACHE_BLOCK: usize = 1 << 13;

/// In-place orthonormal Walsh–Hadamard transform (`O(n log n)`); `x.len()` must be a power of
/// two. Applying it twice returns the input (up to rounding).
pub fn fwht(x: &mut [f64]) -> Result<(), Error> {
    check_len(x.len())?;
    fwht_unnormalized(x);
    let scale = 1.0 / (x.len() as f64).sqrt();
    x.iter_mut().for_each(|v| *v *= scale);
    Ok(())
}

/// The randomized Hadamard rotation `H·D·x` with signs from `round_seed`.
pub fn rotate(x: &mut [f64], round_seed: &[u8; 32]) -> Result<(), Error> {
    check_len(x.len())?;
    apply_signs(x, round_seed, 1.0);
    fwht_unnormalized(x);
    let scale = 1.0 / (x.len() as f64).sqrt();
    x.iter_mut().for_each(|v| *v *= scale);
    Ok(())
}

/// The inverse rotation `D·H·x`.
pub fn unrotate(x: &mut [f64], round_seed: &[u8; 32]) -> Result<(), Error> {
    check_len(x.len())?;
    fwht_unnormalized(x);
    apply_signs(x, round_seed, 1.0 / (x.len() as f64).sqrt());
    Ok(())
}

/// The first `len` rotation signs for `round_seed`; `true` means the coordinate is negated.
pub fn rotation_signs(round_seed: &[u8; 32], len: usize) -> Vec<bool> {
    let mut out = Vec::with_capacity(len);
    for_each_sign_block(round_seed, 0, len, |_, block| {
        out.extend(
            block
                .iter()
                .flat_map(|byte| (0..8).map(move |b| byte >> b & 1 == 1)),
        );
    });
    out.truncate(len);
    out
}

/// Multiplies `x[j]` by `scale · s_j`.
pub(crate) fn apply_signs(x: &mut [f64], round_seed: &[u8; 32], scale: f64) {
    apply_signs_from(x, round_seed, 0, scale);
}

/// Multiplies `x[j]` by `scale · s_{first + j}`: the signs of a slice that starts at coordinate
/// `first` of the whole vector (a multiple of 256, as every rotation block's start is).
pub(crate) fn apply_signs_from(x: &mut [f64], round_seed: &[u8; 32], first: usize, scale: f64) {
    debug_assert_eq!(first % 256, 0, "sign blocks are 256 coordinates");
    let len = x.len();
    for_each_sign_block(round_seed, first / 256, len, |start, block| {
        let end = (start + 256).min(len);
        for (j, v) in x[start..end].iter_mut().enumerate() {
            let negate = block[j / 8] >> (j % 8) & 1 == 1;
            *v *= if negate { -scale } else { scale };
        }
    });
}

/// Calls `f(first_coordinate, block)` for each 32-byte block covering `len` coordinates, the
/// first being sign block `first_block` of the whole vector.
fn for_each_sign_block(
    round_seed: &[u8; 32],
    first_block: usize,
    len: usize,
    mut f: impl FnMut(usize, &[u8]),
) {
    let mut input = Vec::with_capacity(SIGN_DOMAIN.len() + 40);
    input.extend_from_slice(SIGN_DOMAIN);
    input.extend_from_slice(round_seed);
    let counter_at = input.len();
    input.extend_from_slice(&[0; 8]);
    for (i, start) in (0..len).step_by(256).enumerate() {
        input[counter_at..].copy_from_slice(&((first_block + i) as u64).to_be_bytes());
        f(start, digest(&SHA256, &input).as_ref());
    }
}

pub(crate) fn check_len(len: usize) -> Result<(), Error> {
    if len.is_power_of_two() {
        Ok(())
    } else {
        Err(Error::LengthNotPowerOfTwo { len })
    }
}

/// Unnormalized in-place transform (the result is `√n · H·x`); `x.len()` is a power of two.
pub(crate) fn fwht_unnormalized(x: &mut [f64]) {
    let n = x.len();
    let block = n.min(CACHE_BLOCK);
    for chunk in x.chunks_exact_mut(block) {
        transform_levels(chunk, 1, block);
    }
    transform_levels(x, block, n);
}

/// Applies the butterfly levels with spans `h = from, 2·from, ... < to`, two levels per pass
/// where possible (halving the passes over memory).
fn transform_levels(x: &mut [f64], from: usize, to: usize) {
    let mut h = from;
    if h == 1 && to >= 4 {
        for q in x.chunks_exact_mut(4) {
            let (a, b, c, d) = (q[0], q[1], q[2], q[3]);
            let (s0, d0, s1, d1) = (a + b, a - b, c + d, c - d);
            q[0] = s0 + s1;
            q[1] = d0 + d1;
            q[2] = s0 - s1;
            q[3] = d0 - d1;
        }
        h = 4;
    }
    while h * 4 <= to {
        for group in x.chunks_exact_mut(4 * h) {
            let (left, right) = group.split_at_mut(2 * h);
            let (a, b) = left.split_at_mut(h);
            let (c, d) = right.split_at_mut(h);
            for (((a, b), c), d) in a
                .iter_mut()
                .zip(b.iter_mut())
                .zip(c.iter_mut())
                .zip(d.iter_mut())
            {
                let (s0, d0, s1, d1) = (*a + *b, *a - *b, *c + *d, *c - *d);
                *a = s0 + s1;
                *b = d0 + d1;
                *c = s0 - s1;
                *d = d0 - d1;
            }
        }
        h *= 4;
    }
    if h * 2 <= to {
        for group in x.chunks_exact_mut(2 * h) {
            let (a, b) = group.split_at_mut(h);
            for (a, b) in a.iter_mut().zip(b.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
    }
}
