//! Exact sampling from the discrete Gaussian `N_Z(0, σ²)`, whose probability of `x ∈ Z` is
//! proportional to `exp(-x² / (2σ²))`.
//!
//! The algorithm is Canonne, Kamath & Steinke, "The Discrete Gaussian for Differential Privacy"
//! (NeurIPS 2020, arXiv:2004.00010): Algorithm 3 (rejection from a discrete Laplace proposal with
//! scale `t = ⌊σ⌋ + 1`), Algorithm 2 (the discrete Laplace), and Algorithm 1 (Bernoulli(exp(-γ))
//! for rational γ). σ² is held as an exact rational `num / den`; every decision is an integer
//! comparison, so no floating-point rounding touches the distribution.
//!
//! Each Bernoulli(a/b) is decided lazily: a 32-bit uniform word `r` is compared with `a/b`; when
//! `[r, r+1) / 2^32` straddles `a/b` (probability `< 2^-32`), the next word refines the
//! comparison. This is exact and costs one 32-bit word almost always.
//!
//! Range and the one truncation: σ² must lie in `[0, 2^40]`, and its rational form must keep
//! the integer arithmetic within 128 bits (true for every `f64` with `σ² ≥ 2^-8`, and for any
//! rational with a small enough denominator; others are refused at construction). Candidates
//! with `|x| > y_max = ⌈40σ⌉ + 1` are rejected, so the output is `N_Z(0, σ²)` conditioned on
//! `|x| ≤ y_max`, an event of probability at least `1 - 2^-1000`; no test, and no privacy
//! accounting, can tell the difference.

use std::num::NonZeroUsize;

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;

use super::Error;
use super::parallel::in_parallel;

/// The largest σ² accepted (σ ≤ 2^20 integer units).
pub const MAX_SIGMA_SQUARED: f64 = (1u64 << 40) as f64;

/// Candidates beyond `Y_MAX_SIGMAS · σ` are rejected (see the module docs).
const Y_MAX_SIGMAS: u128 = 40;

/// Samples per ChaCha stream in [`DiscreteGaussian::fill_parallel`].
pub const PARALLEL_CHUNK: usize = 1 << 16;

/// An exact sampler for `N_Z(0, σ²)` with σ² fixed at construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscreteGaussian {
    /// σ² = num / den, reduced; `num == 0` means the point mass at 0.
    num: u64,
    den: u64,
    /// Scale of the discrete Laplace proposal, `⌊σ⌋ + 1`.
    t: u64,
    /// Candidates with a larger magnitude are rejected.
    y_max: u64,
    /// `2 · num · t² · den`: the denominator of the acceptance exponent.
    q: u128,
}

impl DiscreteGaussian {
    /// A sampler for the exact rational value of `sigma_squared` (every finite `f64` is a
    /// dyadic rational, which is what is used: no rounding).
    pub fn new(sigma_squared: f64) -> Result<Self, Error> {
        let out_of_range = Error::ParameterOutOfRange {
            name: "sigma_squared",
            value: sigma_squared,
            expected: "0, or finite in (0, 2^40] with a short enough binary expansion (any value >= 2^-8 is)",
        };
        if !(sigma_squared.is_finite() && (0.0..=MAX_SIGMA_SQUARED).contains(&sigma_squared)) {
            return Err(out_of_range);
        }
        if sigma_squared == 0.0 {
            return Self::from_rational(0, 1);
        }
        let (num, den) = exact_dyadic(sigma_squared).ok_or(out_of_range)?;
        Self::from_rational(num, den)
    }

    /// A sampler for σ² = `num / den`.
    pub fn from_rational(num: u64, den: u64) -> Result<Self, Error> {
        let refuse = |expected| Error::ParameterOutOfRange {
            name: "sigma_squared",
            value: num as f64 / den as f64,
            expected,
        };
        if den == 0 {
            return Err(refuse("a rational with a non-zero denominator"));
        }
        let g = gcd(num, den);
        let (num, den) = if num == 0 { (0, 1) } else { (num / g, den / g) };
        if num / den > 1 << 40 || (num / den == 1 << 40 && num % den != 0) {
            return Err(refuse("at most 2^40"));
        }
        let t = u128::from(num / den).isqrt() as u64 + 1;
        // Smallest y with y² ≥ 1600 σ², plus one: ⌈40σ⌉ + 1.
        let y_max = (Y_MAX_SIGMAS * Y_MAX_SIGMAS * u128::from(num) / u128::from(den)).isqrt() + 2;
        let y_max = u64::try_from(y_max).map_err(|_| refuse("at most 2^40"))?;
        let q = 2u128
            .checked_mul(u128::from(num))
            .and_then(|v| v.checked_mul(u128::from(t) * u128::from(t)))
            .and_then(|v| v.checked_mul(u128::from(den)));
        // The acceptance test squares |y·t·den − num| in 128 bits, so it must stay below 2^64.
        let a_max = u128::from(y_max) * u128::from(t) * u128::from(den) + u128::from(num);
        match q {
            Some(q) if a_max < 1 << 64 => Ok(Self {
                num,
                den,
                t,
                y_max,
                q,
            }),
            _ => Err(refuse(
                "representable with 128-bit arithmetic (use σ² ≥ 2^-8 or a smaller denominator)",
            )),
        }
    }

    /// σ² as an `f64` (for display and accounting; sampling uses the exact rational).
    pub fn sigma_squared(&self) -> f64 {
        self.num as f64 / self.den as f64
    }

    /// σ² as the exact reduced rational `(num, den)` the sampler uses.
    pub fn sigma_squared_rational(&self) -> (u64, u64) {
        (self.num, self.den)
    }

    /// One sample.
    pub fn sample<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        self.sample_bits(&mut Bits::new(rng))
    }

    /// Fills `out` with independent samples.
    pub fn fill<R: CryptoRng + ?Sized>(&self, rng: &mut R, out: &mut [i64]) {
        let mut bits = Bits::new(rng);
        for o in out {
            *o = self.sample_bits(&mut bits);
        }
    }

    /// Fills `out` using `threads` OS threads. Chunk `i` (of [`PARALLEL_CHUNK`] samples) is
    /// drawn from `ChaCha12Rng::from_seed(*seed)` with stream `i`, so the output depends on the
    /// seed only, not on the number of threads. The seed must be secret and used once.
    pub fn fill_parallel(&self, seed: &[u8; 32], out: &mut [i64], threads: NonZeroUsize) {
        in_parallel(out, PARALLEL_CHUNK, threads, |i, chunk| {
            let mut rng = ChaCha12Rng::from_seed(*seed);
            rng.set_stream(i as u64);
            self.fill(&mut rng, chunk);
        });
    }

    /// CKS20 Algorithm 3.
    pub(crate) fn sample_bits<R: RngCore + ?Sized>(&self, bits: &mut Bits<'_, R>) -> i64 {
        if self.num == 0 {
            return 0;
        }
        let (t, den, num) = (
            u128::from(self.t),
            u128::from(self.den),
            u128::from(self.num),
        );
        loop {
            let Some(y) = self.discrete_laplace(bits) else {
                continue;
            };
            // exp(-(|y| − σ²/t)² / (2σ²)) = exp(-a² / q) with a = |y|·t·den − num.
            let a = (u128::from(y.unsigned_abs()) * t * den).abs_diff(num);
            // a < 2^64 because |y| ≤ y_max (checked at construction), so a² fits.
            let a2 = a * a;
            let accept = match (u64::try_from(a2), u64::try_from(self.q)) {
                // Common case: 64-bit division and comparisons.
                (Ok(a2), Ok(q)) => {
                    bern_exp_int(bits, u128::from(a2 / q)) && bern_exp_ratio(bits, a2 % q, q)
                }
                _ => bern_exp_int(bits, a2 / self.q) && bern_exp_frac(bits, a2 % self.q, self.q),
            };
            if accept {
                return y;
            }
        }
    }

    /// CKS20 Algorithm 2 with scale `t`; `None` when the candidate exceeds `y_max` (the
    /// caller rejects it, exactly as Algorithm 3 would with overwhelming probability).
    fn discrete_laplace<R: RngCore + ?Sized>(&self, bits: &mut Bits<'_, R>) -> Option<i64> {
        loop {
            let u = bits.uniform_below(self.t);
            if !bern_exp_ratio(bits, u, self.t) {
                continue;
            }
            let mut x = u;
            while bern_exp_minus_one(bits) {
                x += self.t;
                if x > self.y_max {
                    return None;
                }
            }
            if x > self.y_max {
                return None;
            }
            let negative = bits.bit();
            if negative && x == 0 {
                continue;
            }
            // x ≤ y_max < 2^63.
            let x = x as i64;
            return Some(if negative { -x } else { x });
        }
    }
}

/// A random-bit source over a CSPRNG that hands out single bits from a cached word.
pub(crate) struct Bits<'r, R: ?Sized> {
    rng: &'r mut R,
    cache: u64,
    left: u32,
}

impl<'r, R: RngCore + ?Sized> Bits<'r, R> {
    pub(crate) fn new(rng: &'r mut R) -> Self {
        Self {
            rng,
            cache: 0,
            left: 0,
        }
    }

    fn bit(&mut self) -> bool {
        if self.left == 0 {
            self.cache = self.rng.next_u64();
            self.left = 64;
        }
        let b = self.cache & 1 == 1;
        self.cache >>= 1;
        self.left -= 1;
        b
    }

    pub(crate) fn word(&mut self) -> u32 {
        self.rng.next_u32()
    }

    /// Uniform in `[0, n)` for `0 < n < 2^32` (Lemire's method, exact).
    fn uniform_below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0 && n < 1 << 32);
        if n == 1 {
            return 0;
        }
        let mut m = u64::from(self.word()) * n;
        if (m as u32 as u64) < n {
            let threshold = (1u64 << 32).wrapping_sub(n) % n;
            while (m as u32 as u64) < threshold {
                m = u64::from(self.word()) * n;
            }
        }
        m >> 32
    }
}

/// Bernoulli(a / b) for `a ≤ b`, `0 < b < 2^64`, by lazy comparison of a uniform real.
fn bern_ratio<R: RngCore + ?Sized>(bits: &mut Bits<'_, R>, mut a: u64, b: u64) -> bool {
    if a == 0 {
        return false;
    }
    if a >= b {
        return true;
    }
    let b = u128::from(b);
    loop {
        let target = u128::from(a) << 32;
        let drawn = u128::from(bits.word()) * b;
        if drawn + b <= target {
            return true;
        }
        if drawn >= target {
            return false;
        }
        // The word's interval straddles a/b: compare the next word with the remainder.
        a = (target - drawn) as u64;
    }
}

/// Bernoulli(a / b) for `a ≤ b`, `0 < b < 2^128`; as [`bern_ratio`] with 160-bit products.
fn bern_ratio_wide<R: RngCore + ?Sized>(bits: &mut Bits<'_, R>, mut a: u128, b: u128) -> bool {
    if a == 0 {
        return false;
    }
    if a >= b {
        return true;
    }
    loop {
        let target = ((a >> 96) as u64, a << 32);
        let drawn = mul_wide(b, bits.word());
        let (lo, carry) = drawn.1.overflowing_add(b);
        let drawn_plus_b = (drawn.0 + u64::from(carry), lo);
        if drawn_plus_b <= target {
            return true;
        }
        if drawn >= target {
            return false;
        }
        // target − drawn < b < 2^128, so the low words' wrapping difference is exact.
        a = target.1.wrapping_sub(drawn.1);
    }
}

/// `b · r` as (high 64 bits, low 128 bits).
fn mul_wide(b: u128, r: u32) -> (u64, u128) {
    let r = u128::from(r);
    let low = (b & u128::from(u64::MAX)) * r;
    let high = (b >> 64) * r;
    let (lo, carry) = low.overflowing_add(high << 64);
    ((high >> 64) as u64 + u64::from(carry), lo)
}

/// Bernoulli(exp(-1)) (Algorithm 1 with γ = 1; the first trial, Bernoulli(1), always succeeds).
fn bern_exp_minus_one<R: RngCore + ?Sized>(bits: &mut Bits<'_, R>) -> bool {
    // K = 1 → 2 always; a failed Bernoulli(1/2) stops at the even K = 2.
    if !bits.bit() {
        return false;
    }
    let mut k = 3u64;
    while bern_ratio(bits, 1, k) {
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(-a/b)) for `a ≤ b < 2^64` (Algorithm 1).
fn bern_exp_ratio<R: RngCore + ?Sized>(bits: &mut Bits<'_, R>, a: u64, b: u64) -> bool {
    let mut k = 1u64;
    loop {
        let success = match b.checked_mul(k) {
            Some(bk) => bern_ratio(bits, a, bk),
            None => bern_ratio(bits, a, b) && bern_ratio(bits, 1, k),
        };
        if !success {
            return k % 2 == 1;
        }
        k += 1;
    }
}

/// Bernoulli(exp(-a/b)) for `a < b < 2^128` (Algorithm 1).
fn bern_exp_frac<R: RngCore + ?Sized>(bits: &mut Bits<'_, R>, a: u128, b: u128) -> bool {
    let mut k = 1u128;
    loop {
        let success = match b.checked_mul(k) {
            Some(bk) => bern_ratio_wide(bits, a, bk),
            None => bern_ratio_wide(bits, a, b) && bern_ratio_wide(bits, 1, k),
        };
        if !success {
            return k % 2 == 1;
        }
        k += 1;
    }
}

/// Bernoulli(exp(-n)) for an integer n: n independent Bernoulli(exp(-1)) must all succeed.
fn bern_exp_int<R: RngCore + ?Sized>(bits: &mut Bits<'_, R>, n: u128) -> bool {
    let mut i = 0;
    while i < n {
        if !bern_exp_minus_one(bits) {
            return false;
        }
        i += 1;
    }
    true
}

/// The exact value of a positive finite `f64` as `num / 2^k`, if both fit in `u64`.
fn exact_dyadic(x: f64) -> Option<(u64, u64)> {
    let bits = x.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1 << 52) - 1);
    let (mut mantissa, mut exp2) = if exponent == 0 {
        (fraction, -1074)
    } else {
        (fraction | 1 << 52, exponent - 1075)
    };
    let zeros = mantissa.trailing_zeros().min(63) as i32;
    mantissa >>= zeros;
    exp2 += zeros;
    if exp2 >= 0 {
        mantissa
            .checked_shl(exp2 as u32)
            .filter(|m| m >> exp2 == mantissa)
            .map(|m| (m, 1))
    } else if exp2 >= -63 {
        Some((mantissa, 1 << (-exp2)))
    } else {
        None
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_dyadic_matches_f64_value() {
        assert_eq!(exact_dyadic(0.25), Some((1, 4)));
        assert_eq!(exact_dyadic(100.0), Some((100, 1)));
        assert_eq!(exact_dyadic(0.1), Some((3602879701896397, 1 << 55)));
        assert_eq!(exact_dyadic(1e-300), None);
    }

    #[test]
    fn wide_product_is_exact() {
        let b = u128::MAX - 12345;
        let r = u32::MAX - 7;
        let (hi, lo) = mul_wide(b, r);
        // Check b·r = hi·2^128 + lo via b·r mod 2^128 and the high part from f64 magnitude.
        assert_eq!(lo, b.wrapping_mul(u128::from(r)));
        assert_eq!(hi, u64::from(r) - 1);
    }
}
