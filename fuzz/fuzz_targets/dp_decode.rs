//! `dp::decode` on any modular sum, with parameters either chosen by `DpParams::choose` from
//! fuzzed inputs or written field by field.
//!
//! Properties: it never panics; an accepted sum decodes to `dim` values; with parameters from
//! `choose` the values are finite, and the all-zero sum decodes to all zeros.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quorum_crypto::dp::{DpParams, decode};

/// Largest vector length tried: decoding is O(d log d) and d comes from the input.
const MAX_DIM: usize = 1 << 12;

#[derive(Arbitrary, Debug)]
struct Input {
    params: ParamsChoice,
    round_seed: [u8; 32],
    sum: SumChoice,
}

#[derive(Arbitrary, Debug)]
enum ParamsChoice {
    Chosen {
        dim: u16,
        expected_clients: u16,
        min_clients: u16,
        /// Clip norm and noise in 1/1024 units, so they stay in the range a federation uses.
        clip_norm: u32,
        noise_stddev: u32,
        bits: u8,
    },
    Raw {
        dim: u16,
        padded_dim: u16,
        clip_norm: f64,
        gamma: f64,
        bits: u32,
        noise_stddev: f64,
        min_clients: u32,
        beta: f64,
    },
}

#[derive(Arbitrary, Debug)]
enum SumChoice {
    Raw(Vec<u32>),
    /// The values cycled to the padded length, optionally reduced below 2^bits.
    Fitted {
        values: Vec<u32>,
        reduce: bool,
    },
    Zero,
}

fuzz_target!(|input: Input| {
    let (params, chosen) = match input.params {
        ParamsChoice::Chosen {
            dim,
            expected_clients,
            min_clients,
            clip_norm,
            noise_stddev,
            bits,
        } => {
            let dim = usize::from(dim) % MAX_DIM + 1;
            let chosen = DpParams::choose(
                dim,
                u32::from(expected_clients),
                u32::from(min_clients),
                f64::from(clip_norm) / 1024.0,
                f64::from(noise_stddev) / 1024.0,
                u32::from(bits),
            );
            match chosen {
                Ok(params) => (params, true),
                Err(_) => return,
            }
        }
        ParamsChoice::Raw {
            dim,
            padded_dim,
            clip_norm,
            gamma,
            bits,
            noise_stddev,
            min_clients,
            beta,
        } => (
            DpParams {
                dim: usize::from(dim),
                padded_dim: usize::from(padded_dim),
                clip_norm,
                gamma,
                bits,
                noise_stddev,
                min_clients,
                beta,
            },
            false,
        ),
    };
    let padded = params.padded_dim.min(MAX_DIM);
    let reduce_mask = if (1..32).contains(&params.bits) {
        (1u32 << params.bits) - 1
    } else {
        u32::MAX
    };
    let (sum, zero) = match input.sum {
        SumChoice::Raw(values) => (values, false),
        SumChoice::Fitted { values, reduce } if !values.is_empty() => {
            let mask = if reduce { reduce_mask } else { u32::MAX };
            let sum = values
                .iter()
                .cycle()
                .take(padded)
                .map(|v| v & mask)
                .collect();
            (sum, false)
        }
        SumChoice::Fitted { .. } | SumChoice::Zero => (vec![0; padded], true),
    };
    if let Ok(decoded) = decode(&sum, &params, &input.round_seed) {
        assert_eq!(decoded.len(), params.dim, "decoded length is not dim");
        if chosen {
            assert!(decoded.iter().all(|v| v.is_finite()), "non-finite decode");
        }
        if zero {
            assert!(
                decoded.iter().all(|&v| v == 0.0),
                "zero sum decoded to non-zero"
            );
        }
    }
});
