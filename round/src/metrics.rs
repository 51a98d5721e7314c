//! Round metrics through the masked sum: each site appends its losses and token count to its
//! update as fixed-point values, so the aggregator learns only their sums over the survivors,
//! never one site's values (unless the site opts in to clear reports, `share_metrics`). A site
//! whose policy keeps even those sums back (`sum_metrics = false`) appends zeros, and a count
//! slot says how many sites' metrics the sums hold.
//!
//! Every slot of one site is capped at `(2^bits − 1) / n` for a cohort of `n`, so the sum of
//! any survivors' slots never wraps the modulus. A value above its cap saturates. Where the
//! cap cannot hold a loss of 16 (elements too narrow for the cohort: 16-bit elements and more
//! than 16 sites, say), sites give no metrics at all rather than clipped ones; with 24-bit
//! elements and up to 1,024 sites the cap is at least 16,383 units (a loss of 64, or 16.7M
//! tokens). The metrics carry no DP noise: a sum of losses over the
//! survivors is what the aggregator learns, as it learns the summed update.

use serde::{Deserialize, Serialize};

use crate::site::TrainedUpdate;

/// Elements appended to every encoded update.
pub const SLOTS: usize = 5;

/// Fixed-point units per unit of loss.
const LOSS_SCALE: f64 = 256.0;
/// Tokens per unit of the token slot.
const TOKEN_UNIT: f64 = 1024.0;
/// The least slot cap metrics are given under: a loss of 16.
const MIN_CAP: u32 = 16 * LOSS_SCALE as u32;

/// The survivors' metrics, recovered from the sum.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct SummedMetrics {
    /// Sites whose metrics are in the sum (survivors that keep them back are not).
    pub sites: u32,
    /// Mean of their training losses.
    pub train_loss: f64,
    /// Mean validation loss of the global model they received.
    pub val_loss_before: f64,
    /// Mean validation loss after local training.
    pub val_loss_after: f64,
    /// Tokens trained on, in all (to the nearest 1,024 per site).
    pub tokens: u64,
}

/// The largest value one of `cohort` sites may put in a slot so that no sum wraps.
fn cap(cohort: u32, bits: u32) -> u32 {
    let max = if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    max / cohort.max(1)
}

fn fixed(value: f64, scale: f64, cap: u32) -> u32 {
    if value.is_finite() && value > 0.0 {
        (value * scale).round().min(f64::from(cap)) as u32
    } else {
        0
    }
}

/// One site's slots for `update`, whose global model had validation loss `val_loss_before`;
/// all zero unless `shared`, or where the elements are too narrow for the cohort.
pub fn encode(
    update: &TrainedUpdate,
    val_loss_before: f64,
    cohort: u32,
    bits: u32,
    shared: bool,
) -> [u32; SLOTS] {
    let cap = cap(cohort, bits);
    if !shared || cap < MIN_CAP {
        return [0; SLOTS];
    }
    [
        1,
        fixed(update.train_loss, LOSS_SCALE, cap),
        fixed(val_loss_before, LOSS_SCALE, cap),
        fixed(update.val_loss_after, LOSS_SCALE, cap),
        fixed(update.tokens as f64, 1.0 / TOKEN_UNIT, cap),
    ]
}

/// The means of the slots summed into `tail`; `None` when no site's metrics are in it.
pub fn decode(tail: &[u32]) -> Option<SummedMetrics> {
    let [sites, train, before, after, tokens]: [u32; SLOTS] = tail.try_into().ok()?;
    if sites == 0 {
        return None;
    }
    let n = f64::from(sites);
    let mean = |sum: u32| f64::from(sum) / LOSS_SCALE / n;
    Some(SummedMetrics {
        sites,
        train_loss: mean(train),
        val_loss_before: mean(before),
        val_loss_after: mean(after),
        tokens: (f64::from(tokens) * TOKEN_UNIT) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(train: f64, after: f64, tokens: u64) -> TrainedUpdate {
        TrainedUpdate {
            train_loss: train,
            val_loss_after: after,
            tokens,
            ..Default::default()
        }
    }

    #[test]
    fn sums_of_slots_decode_to_means_within_one_unit() {
        let sites = [(2.5, 3.0, 2.25, 40_960), (3.5, 3.0, 2.75, 81_920)];
        let mut sum = [0u32; SLOTS];
        for (train, before, after, tokens) in sites {
            let slots = encode(&update(train, after, tokens), before, 3, 24, true);
            for (s, v) in sum.iter_mut().zip(slots) {
                *s += v;
            }
        }
        // A third site keeps its metrics back: it adds zeros, and the means are over two.
        let withheld = encode(&update(9.0, 9.0, 1 << 20), 9.0, 3, 24, false);
        assert_eq!(withheld, [0; SLOTS]);
        let m = decode(&sum).unwrap();
        assert_eq!(m.sites, 2);
        assert!((m.train_loss - 3.0).abs() < 1.0 / LOSS_SCALE, "{m:?}");
        assert!((m.val_loss_before - 3.0).abs() < 1.0 / LOSS_SCALE, "{m:?}");
        assert!((m.val_loss_after - 2.5).abs() < 1.0 / LOSS_SCALE, "{m:?}");
        assert_eq!(m.tokens, 122_880);
    }

    #[test]
    fn slots_saturate_so_a_full_cohort_never_wraps() {
        // 1,024 sites at 24 bits: each slot at most 16,383; a loss of 1e9, NaN or a negative
        // loss cannot push the sum past the modulus.
        let cohort = 1024;
        let slots = encode(&update(1e9, f64::NAN, u64::MAX), -1.0, cohort, 24, true);
        assert_eq!(slots, [1, 16_383, 0, 0, 16_383]);
        let total: u64 = u64::from(slots[1]) * u64::from(cohort);
        assert!(total < 1 << 24);
        assert!(decode(&[0; SLOTS]).is_none());
        // 16-bit elements cannot hold a loss of 16 from each of 100 sites: no metrics at all,
        // rather than clipped ones.
        let narrow = encode(&update(2.0, 2.0, 1000), 2.0, 100, 16, true);
        assert_eq!(narrow, [0; SLOTS]);
        assert!(decode(&[1; 3]).is_none());
    }
}
