//! Property tests: packing round-trips, any t Shamir shares reconstruct, the PRG is seekable.

use proptest::prelude::*;
use quorum_crypto::packing::{pack, packed_len, unpack};
use quorum_crypto::prg::MaskPrg;
use quorum_crypto::shamir::{combine, split};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

proptest! {
    #[test]
    fn packing_round_trips(bits in 8u32..=32, raw in prop::collection::vec(any::<u32>(), 0..200)) {
        let mask = u32::MAX >> (32 - bits);
        let values: Vec<u32> = raw.iter().map(|v| v & mask).collect();
        let packed = pack(bits, &values);
        prop_assert_eq!(packed.len(), packed_len(bits, values.len()));
        prop_assert_eq!(unpack(bits, &packed, values.len()).unwrap(), values.clone());
        // One byte too many or too few is refused.
        let mut longer = packed.clone();
        longer.push(0);
        prop_assert!(unpack(bits, &longer, values.len()).is_err());
        if !packed.is_empty() {
            prop_assert!(unpack(bits, &packed[..packed.len() - 1], values.len()).is_err());
        }
    }

    #[test]
    fn any_threshold_subset_reconstructs(
        secret in any::<[u8; 32]>(),
        k in 1u8..=20,
        t_frac in 0.0f64..1.0,
        seed in any::<u64>(),
        order in any::<[u8; 32]>(),
    ) {
        let t = 1 + ((f64::from(k) * t_frac) as u8).min(k - 1);
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut shares = split(&secret, t, k, &mut rng).unwrap();
        // A pseudo-random permutation of the shares, then any t of them (plus all).
        for (i, o) in order.iter().enumerate().take(shares.len()) {
            let j = usize::from(*o) % shares.len();
            shares.swap(i, j);
        }
        prop_assert_eq!(combine(usize::from(t), &shares[..usize::from(t)]).unwrap(), secret);
        prop_assert_eq!(combine(usize::from(t), &shares).unwrap(), secret);
        if t > 1 {
            // t - 1 shares are refused (not silently interpolated to a wrong value).
            prop_assert!(combine(usize::from(t), &shares[..usize::from(t) - 1]).is_err());
        }
    }

    #[test]
    fn prg_chunk_at_offset_equals_slice_of_full_mask(
        seed in any::<[u8; 32]>(),
        round in any::<u32>(),
        bits in 8u32..=32,
        start in 0usize..3000,
        len in 0usize..3000,
    ) {
        let prg = MaskPrg::new(&seed, round);
        let mut full = vec![0u32; start + len];
        prg.fill(0, &mut full, bits);
        let mut chunk = vec![0u32; len];
        prg.add_to(start, &mut chunk, bits);
        prop_assert_eq!(&chunk[..], &full[start..]);
        prg.sub_from(start, &mut chunk, bits);
        prop_assert!(chunk.iter().all(|&v| v == 0));
    }
}
