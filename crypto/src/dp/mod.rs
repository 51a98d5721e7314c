//! Distributed differential privacy: the distributed discrete Gaussian mechanism of Kairouz, Liu
//! & Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
//! Aggregation" (ICML 2021, arXiv:2102.06387), referred to below as KLS21.
//!
//! Each client clips its update, rotates it with a randomized Hadamard transform, scales it to
//! integer units, rounds it randomly (conditioned on a norm bound), adds discrete Gaussian noise
//! and wraps it into `Z_(2^b)`. Secure aggregation sums the wrapped vectors; the aggregator
//! centres, rescales and un-rotates the sum. Everything here is a pure function: randomness comes
//! in through an injected CSPRNG, the rotation from the public round seed.
//!
//! * [`sampler`]: exact discrete Gaussian sampler (Canonne, Kamath & Steinke 2020).
//! * [`hadamard`]: fast Walsh–Hadamard transform and the seeded randomized rotation.
//! * [`params`]: [`DpParams`], the choice of the granularity γ, and the zCDP of a round.
//! * [`encode`]: the client encoding and the aggregator decoding.

pub mod encode;
pub mod hadamard;
mod parallel;
pub mod params;
pub mod sampler;

pub use encode::{Segments, StreamEncoder, decode, decode_in_place, encode};
pub use params::{DpParams, zcdp_rho};
pub use sampler::DiscreteGaussian;

/// Why a DP encoding operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The modulus `2^bits` cannot hold the sum of `clients` encoded updates.
    #[error(
        "a {bits}-bit modulus cannot hold the sum of {clients} clients' encoded updates; \
         use at least {needed_bits} bits or fewer clients per round"
    )]
    ModulusTooSmall {
        /// The requested bit width.
        bits: u32,
        /// The number of clients whose encodings are summed.
        clients: u32,
        /// The smallest bit width that works for this cohort.
        needed_bits: u32,
    },
    /// A parameter lies outside the range the encoding supports.
    #[error("DP parameter `{name}` = {value} is out of range: it must be {expected}")]
    ParameterOutOfRange {
        /// The parameter's name.
        name: &'static str,
        /// The offending value (as f64 for display).
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// A vector's length differs from the one the parameters fix.
    #[error("vector has {actual} coordinates but the DP parameters expect {expected}")]
    DimensionMismatch {
        /// The length the parameters require.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// The update holds a NaN or an infinity, so it cannot be clipped.
    #[error("the model update contains a NaN or infinite value; fix the training step")]
    NonFiniteUpdate,
    /// A value of the aggregated sum is not reduced modulo `2^bits`.
    #[error("sum coordinate {index} is {value}, not below 2^{bits}; the aggregate is malformed")]
    SumValueOutOfRange {
        /// The coordinate's index.
        index: usize,
        /// Its value.
        value: u32,
        /// The modulus bit width.
        bits: u32,
    },
    /// The Walsh–Hadamard transform needs a power-of-two length.
    #[error("the Hadamard transform needs a power-of-two length, got {len}; pad the vector")]
    LengthNotPowerOfTwo {
        /// The length given.
        len: usize,
    },
}
