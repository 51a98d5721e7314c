//! Parameters of the distributed discrete Gaussian encoding and its privacy guarantee.

use serde::{Deserialize, Serialize};

use super::Error;
use super::sampler::{DiscreteGaussian, MAX_SIGMA_SQUARED};

/// Target probability that any coordinate of a round's sum wraps around the modulus.
pub const OVERFLOW_PROBABILITY: f64 = 1e-6;

/// Standard deviations of head-room in the modulus (`k` in KLS21 §4.2/§4.4) for a padded
/// dimension `d`: `k = max(4, sqrt(2·ln(2d/δ)))` with `δ` = [`OVERFLOW_PROBABILITY`]. KLS21 use
/// a fixed `k` of 3–4, which lets about `d·e^{-k²/2}` coordinates wrap when the updates are
/// aligned; the union bound over the `d` sub-Gaussian coordinates makes a wrap anywhere in
/// the round at most `δ` likely, for about one extra bit.
pub fn overflow_stddevs(padded_dim: usize) -> f64 {
    (2.0 * (2.0 * padded_dim as f64 / OVERFLOW_PROBABILITY).ln())
        .sqrt()
        .max(4.0)
}

/// KLS21's default conditional-rounding parameter `β = e^{-1/2}`.
pub const DEFAULT_BETA: f64 = 0.606_530_659_712_633_4;

/// The largest padded dimension accepted (2^30 coordinates).
pub const MAX_PADDED_DIM: usize = 1 << 30;

/// Rotation blocks are never shorter than this: below it the whole vector is one block.
pub const MIN_ROTATION_BLOCK: usize = 1 << 10;

/// Rotation blocks are never longer than this (2^20 coordinates, 8 MiB of `f64`): a site
/// encodes its update one group of blocks at a time, so its memory beyond the update grows
/// with the block, not with the model.
pub const MAX_ROTATION_BLOCK: usize = 1 << 20;

/// Length of the Hadamard rotation's blocks for a `dim`-long update: the longest power of two
/// up to [`MAX_ROTATION_BLOCK`] whose padding ([`padded_dim`]` − dim`) is at most `dim / 16`,
/// or [`MIN_ROTATION_BLOCK`].
///
/// The rotation is block-diagonal (`H_B` on each block, signs over the whole vector), which
/// is orthonormal like a single `H`, so norms and the privacy analysis are unchanged. A single
/// power-of-two block would pad 10M coordinates to 2^24 (+68 % of every cost, bytes on the
/// wire included); blocks pad it to 10 × 2^20 (+4.9 %). The price is flatness: a block holding
/// all of a vector's norm spreads it over `B` coordinates instead of `d`, which
/// [`DpParams::choose`] pays for with a coarser `γ`. Capping the block costs nothing with
/// meaningful noise, which dominates `γ`; with almost none, at 32 bits, the rounding error of
/// 100 sites' sum at `d = 2^30` stays below `10^-6` of the sum's norm.
pub fn rotation_block(dim: usize) -> usize {
    let mut block = dim.max(1).next_power_of_two().min(MAX_ROTATION_BLOCK);
    while block > MIN_ROTATION_BLOCK && whole_blocks(dim, block) - dim > dim / 16 {
        block /= 2;
    }
    block
}

/// The length of every encoded vector for a `dim`-long update: `dim` rounded up to a whole
/// number of [`rotation_block`]s.
pub fn padded_dim(dim: usize) -> usize {
    whole_blocks(dim, rotation_block(dim))
}

/// `dim` (at least 1) rounded up to a multiple of `block`.
fn whole_blocks(dim: usize, block: usize) -> usize {
    dim.max(1).div_ceil(block) * block
}

/// Granularity is never finer than needed to make each client's noise at most this many
/// integer units (σ ≤ 2^20): rounding noise is then negligible next to DP noise, and the
/// exact sampler stays in range.
const MAX_LOCAL_NOISE_STDDEV_INT: f64 = (1u64 << 20) as f64;

/// Clipped norms above this many integer units would overflow the integer arithmetic.
const MAX_CLIP_INT: f64 = (1u64 << 40) as f64;

/// Parameters of one round's DP encoding, published in the round configuration. Clients and
/// the aggregator must use identical values; [`DpParams::validate`] checks the invariants.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpParams {
    /// Length of the model update.
    pub dim: usize,
    /// [`padded_dim`]`(dim)`: the length of each encoded vector.
    pub padded_dim: usize,
    /// L2 clipping norm `c` of each client's update (model units).
    pub clip_norm: f64,
    /// Granularity `γ`: one integer unit of the encoding is `γ` model units.
    pub gamma: f64,
    /// Modulus bit width `b` (8..=32); encoded values lie in `[0, 2^b)`.
    pub bits: u32,
    /// Standard deviation `σ` of the noise in the sum of `min_clients` clients (model units);
    /// 0 disables noise.
    pub noise_stddev: f64,
    /// Number `t` of clients the round is guaranteed to have (the SecAgg threshold).
    pub min_clients: u32,
    /// Conditional-rounding parameter `β ∈ [0, e^{-1/2}]` (0 disables the tighter norm bound).
    pub beta: f64,
}

impl DpParams {
    /// Chooses `γ` so that the sum of `expected_clients` encodings fits the `bits`-bit modulus
    /// with high probability, following KLS21 §4.2/§4.4: the sum's rotated coordinates are
    /// treated as sub-Gaussian with standard deviation (integer units, `n` clients, `d` padded
    /// dimension, `σ_l² = σ²/t` each client's noise variance in model units)
    ///
    /// ```text
    /// s = sqrt(n²c²/B + n·γ²/4 + n·σ_l²) / γ      and require      2^b ≥ 2·k·s
    /// ⇒ γ = 2k·sqrt(n²c²/B + n·σ_l²) / sqrt(4^b − k²·n)
    /// ```
    ///
    /// (`n²c²/B` bounds the rotated signal, `B` the [`rotation_block`]: the sum of clipped
    /// updates has norm ≤ `n·c`, in the worst case all of it in one block; `1/4`
    /// bounds each client's rounding variance; `k` is [`overflow_stddevs`]`(d)`, so the sum of
    /// up to `n` encodings wraps nowhere with probability at least `1 − 10^-6`.) The modulus is
    /// refused
    /// ([`Error::ModulusTooSmall`]) unless `4^b ≥ 2·k²·n`, i.e. unless rounding takes at most half
    /// the squared range. `γ` is also kept at least `σ_l / 2^20` (each client's noise at most
    /// 2^20 integer units). `β` is set to `e^{-1/2}`.
    pub fn choose(
        dim: usize,
        expected_clients: u32,
        min_clients: u32,
        clip_norm: f64,
        noise_stddev: f64,
        bits: u32,
    ) -> Result<Self, Error> {
        if !(8..=32).contains(&bits) {
            return Err(out_of_range("bits", f64::from(bits), "between 8 and 32"));
        }
        if min_clients == 0 || expected_clients < min_clients {
            return Err(out_of_range(
                "expected_clients",
                f64::from(expected_clients),
                "at least min_clients, which must be at least 1",
            ));
        }
        if dim == 0 || dim > MAX_PADDED_DIM {
            return Err(out_of_range("dim", dim as f64, "between 1 and 2^30"));
        }
        let padded_dim = padded_dim(dim);
        let n = f64::from(expected_clients);
        let k = overflow_stddevs(padded_dim);
        let range_sq = 4f64.powi(bits as i32);
        if range_sq < 2.0 * k * k * n {
            let needed_bits = (bits..)
                .find(|&b| 4f64.powi(b as i32) >= 2.0 * k * k * n)
                .unwrap_or(u32::MAX); // The range is unbounded: some b satisfies 4^b ≥ 2k²n.
            return Err(Error::ModulusTooSmall {
                bits,
                clients: expected_clients,
                needed_bits,
            });
        }
        let local_variance = noise_stddev * noise_stddev / f64::from(min_clients);
        let signal = n * n * clip_norm * clip_norm / rotation_block(dim) as f64;
        let gamma = (2.0 * k * (signal + n * local_variance).sqrt()
            / (range_sq - k * k * n).sqrt())
        // The floor's rounding must not put the noise a hair above 2^20 units, which
        // `validate` would refuse: wide moduli (32 bits) land on the floor nearly always.
        .max(local_variance.sqrt() / MAX_LOCAL_NOISE_STDDEV_INT * (1.0 + 1e-9));
        let params = Self {
            dim,
            padded_dim,
            clip_norm,
            gamma,
            bits,
            noise_stddev,
            min_clients,
            beta: DEFAULT_BETA,
        };
        params.validate()?;
        Ok(params)
    }

    /// Checks every invariant the encoder and decoder rely on. Parameters received from a
    /// peer must pass this before use.
    pub fn validate(&self) -> Result<(), Error> {
        if !(8..=32).contains(&self.bits) {
            return Err(out_of_range(
                "bits",
                f64::from(self.bits),
                "between 8 and 32",
            ));
        }
        if self.dim == 0 || self.dim > MAX_PADDED_DIM {
            return Err(out_of_range("dim", self.dim as f64, "between 1 and 2^30"));
        }
        if self.padded_dim != padded_dim(self.dim) {
            return Err(out_of_range(
                "padded_dim",
                self.padded_dim as f64,
                "dim rounded up to whole rotation blocks (dp::params::padded_dim)",
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(out_of_range(
                "clip_norm",
                self.clip_norm,
                "finite and positive",
            ));
        }
        if !(self.gamma.is_finite() && self.gamma > 0.0) {
            return Err(out_of_range("gamma", self.gamma, "finite and positive"));
        }
        if self.clip_norm / self.gamma > MAX_CLIP_INT {
            return Err(out_of_range(
                "gamma",
                self.gamma,
                "at least clip_norm / 2^40",
            ));
        }
        if !(self.noise_stddev.is_finite() && self.noise_stddev >= 0.0) {
            return Err(out_of_range(
                "noise_stddev",
                self.noise_stddev,
                "finite and non-negative",
            ));
        }
        if self.min_clients == 0 {
            return Err(out_of_range("min_clients", 0.0, "at least 1"));
        }
        if !(0.0..=DEFAULT_BETA).contains(&self.beta) {
            return Err(out_of_range("beta", self.beta, "in [0, e^-1/2]"));
        }
        let local = self.local_noise_variance_int();
        if local > MAX_SIGMA_SQUARED {
            return Err(out_of_range(
                "gamma",
                self.gamma,
                "large enough that each client's noise is at most 2^20 integer units",
            ));
        }
        self.noise_sampler().map(|_| ())
    }

    /// The rotation's block length, [`rotation_block`]`(dim)`.
    pub fn rotation_block(&self) -> usize {
        rotation_block(self.dim)
    }

    /// Each client's discrete Gaussian noise variance in integer units, `σ² / (γ²·t)`. The
    /// sampler uses the exact rational value of this `f64`.
    pub fn local_noise_variance_int(&self) -> f64 {
        self.noise_stddev * self.noise_stddev
            / (self.gamma * self.gamma * f64::from(self.min_clients))
    }

    /// The exact sampler for each client's noise.
    pub fn noise_sampler(&self) -> Result<DiscreteGaussian, Error> {
        DiscreteGaussian::new(self.local_noise_variance_int())
    }

    /// The bound `B` on the L2 norm of a client's rounded vector in integer units (KLS21
    /// Algorithm 1, conditional randomized rounding), with `c' = c/γ` and `d` = `padded_dim`:
    ///
    /// ```text
    /// B² = min( (c' + √d)²,  c'² + d/4 + sqrt(2·ln(1/β))·(c' + √d/2) )      (second term if β > 0)
    /// ```
    pub fn rounded_norm_bound_sq(&self) -> f64 {
        let c = self.clip_norm / self.gamma;
        let sqrt_d = (self.padded_dim as f64).sqrt();
        let loose = (c + sqrt_d) * (c + sqrt_d);
        if self.beta == 0.0 {
            return loose;
        }
        let tight = c * c
            + self.padded_dim as f64 / 4.0
            + (2.0 * (1.0 / self.beta).ln()).sqrt() * (c + sqrt_d / 2.0);
        loose.min(tight)
    }
}

fn out_of_range(name: &'static str, value: f64, expected: &'static str) -> Error {
    Error::ParameterOutOfRange {
        name,
        value,
        expected,
    }
}

/// The zCDP parameter ρ of one round in which the noise of `clients` honest clients is summed,
/// for neighbouring inputs that differ in one client's update (that client's clipped update is
/// replaced by zero; its noise stays). Replacing one update by another doubles the
/// sensitivity, i.e. multiplies ρ by 4.
///
/// From KLS21 Proposition 14 (Rényi DP of a sum of `n` discrete Gaussians of variance `σ_c²/γ²`
/// each, in integer units), with `Δ` the L2 sensitivity `γ·B` (see
/// [`DpParams::rounded_norm_bound_sq`]), `d` = `padded_dim`, `n` = `clients`,
/// `σ_c² = γ²·v` where `v` is [`DpParams::local_noise_variance_int`]:
///
/// ```text
/// τ = 10 · Σ_{k=1}^{n-1} exp(-2π²·(σ_c²/γ²)·k/(k+1))
/// A = Δ² / (n·σ_c²)
/// ρ = min( A/2 + τ·d,  (√A + τ·√d)² / 2 )
/// ```
///
/// Proposition 14 bounds the Rényi divergence of order α by `α·A/2 + τ·d` and by
/// `α·(√A + τ√d)²/2`; since `α ≥ 1`, both are at most `α·ρ`, which is ρ-zCDP. (KLS21 Theorem 1
/// states the slightly tighter `A/2 + τd/4` for the first term; the conservative form is
/// used.) The τ term accounts for the sum of discrete Gaussians not being a discrete Gaussian;
/// it is negligible once each client's noise exceeds about 2 integer units.
///
/// Returns `+∞` without noise or with no clients.
pub fn zcdp_rho(params: &DpParams, clients: u32) -> f64 {
    let local_int = params.local_noise_variance_int();
    if clients == 0 || local_int == 0.0 {
        return f64::INFINITY;
    }
    let n = f64::from(clients);
    let d = params.padded_dim as f64;
    let sensitivity_sq = params.gamma * params.gamma * params.rounded_norm_bound_sq();
    let client_variance = params.gamma * params.gamma * local_int;
    let tau = 10.0
        * (1..clients)
            .map(|k| {
                let k = f64::from(k);
                (-2.0 * std::f64::consts::PI.powi(2) * local_int * k / (k + 1.0)).exp()
            })
            .sum::<f64>();
    let a = sensitivity_sq / (n * client_variance);
    (a / 2.0 + tau * d).min((a.sqrt() + tau * d.sqrt()).powi(2) / 2.0)
}
