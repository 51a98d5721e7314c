//! The pinned mask PRG: AES-256-CTR keyed through HKDF-SHA256.
//!
//! Byte-exact definition (also in `crypto/testdata/README.md`):
//!
//! * key = HKDF-SHA256(salt = empty, ikm = seed, info = `"quorum/mask/v1"` ‖ round as u32
//!   big-endian), 32 bytes of output;
//! * keystream = AES-256 in counter mode, the 128-bit counter block big-endian and starting at 0;
//! * element `i` = little-endian u32 of keystream bytes `[4i, 4i + 4)`, reduced mod 2^b.
//!
//! The stream is seekable: element `i` depends only on the key and `i`, so a vector can be masked
//! chunk by chunk, in any order and on several threads, with the same result as masking it whole.

use aes::Aes256;
use aes::cipher::{InnerIvInit, KeyInit, StreamCipher};

use crate::share_crypto::hkdf_sha256;

/// HKDF info label for mask keys.
pub const MASK_LABEL: &[u8] = b"quorum/mask/v1";

/// Elements generated per keystream batch; 4 KiB of keystream stays in L1 cache.
const BATCH: usize = 1024;

/// Smallest supported element width in bits.
pub const MIN_BITS: u32 = 8;
/// Largest supported element width in bits.
pub const MAX_BITS: u32 = 32;

/// A seekable mask generator over Z_(2^b).
#[derive(Clone)]
pub struct MaskPrg {
    cipher: Aes256,
}

impl std::fmt::Debug for MaskPrg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key schedule is secret: never print it.
        f.write_str("MaskPrg { .. }")
    }
}

/// The AES-256 key the PRG uses for `seed` in `round` (exposed for known-answer tests).
pub fn mask_key(seed: &[u8; 32], round: u32) -> [u8; 32] {
    hkdf_sha256(seed, &[MASK_LABEL, &round.to_be_bytes()])
}

/// The bit mask selecting the low `bits` bits.
///
/// # Panics
/// If `bits` is outside `8..=32`; callers pass a width from validated parameters.
pub fn low_bits_mask(bits: u32) -> u32 {
    assert!(
        (MIN_BITS..=MAX_BITS).contains(&bits),
        "element width {bits} outside {MIN_BITS}..={MAX_BITS}"
    );
    u32::MAX >> (32 - bits)
}

impl MaskPrg {
    /// The mask stream for `seed` in `round`.
    pub fn new(seed: &[u8; 32], round: u32) -> Self {
        Self::from_key(&mask_key(seed, round))
    }

    /// A stream keyed directly with an AES-256 key (for streams with another derivation label).
    pub fn from_key(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256::new(key.into()),
        }
    }

    /// Adds element `offset + j` to `data[j]` mod 2^bits, for every `j`.
    ///
    /// # Panics
    /// If `bits` is outside `8..=32`.
    pub fn add_to(&self, offset: usize, data: &mut [u32], bits: u32) {
        let mask = low_bits_mask(bits);
        self.for_each_batch(offset, data, |d, k| *d = d.wrapping_add(k) & mask);
    }

    /// Subtracts element `offset + j` from `data[j]` mod 2^bits, for every `j`.
    ///
    /// # Panics
    /// If `bits` is outside `8..=32`.
    pub fn sub_from(&self, offset: usize, data: &mut [u32], bits: u32) {
        let mask = low_bits_mask(bits);
        self.for_each_batch(offset, data, |d, k| *d = d.wrapping_sub(k) & mask);
    }

    /// Writes elements `offset..offset + out.len()` (reduced mod 2^bits) into `out`.
    ///
    /// # Panics
    /// If `bits` is outside `8..=32`.
    pub fn fill(&self, offset: usize, out: &mut [u32], bits: u32) {
        let mask = low_bits_mask(bits);
        self.for_each_batch(offset, out, |d, k| *d = k & mask);
    }

    /// Runs `op(&mut data[j], raw element offset + j)` in keystream batches; `op` is inlined so
    /// the inner loop has no branches and vectorizes.
    #[inline(always)]
    fn for_each_batch(&self, offset: usize, data: &mut [u32], op: impl Fn(&mut u32, u32)) {
        if data.is_empty() {
            return;
        }
        // Four u32 elements per 16-byte AES block: start at the block holding `offset` and
        // discard the elements before it.
        let first_block = (offset / 4) as u128;
        let skip = (offset % 4) * 4;
        let mut ctr = ctr::Ctr128BE::<Aes256>::from_core(ctr::CtrCore::inner_iv_init(
            self.cipher.clone(),
            &first_block.to_be_bytes().into(),
        ));
        let mut buf = [0u8; BATCH * 4];
        ctr.apply_keystream(&mut buf[..skip]);
        for chunk in data.chunks_mut(BATCH) {
            let bytes = &mut buf[..chunk.len() * 4];
            bytes.fill(0);
            ctr.apply_keystream(bytes);
            for (d, k) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
                op(d, u32::from_le_bytes([k[0], k[1], k[2], k[3]]));
            }
        }
    }
}

/// Splits `data` into about `threads` contiguous chunks and runs `f(offset, chunk)` on each in a
/// scoped thread; `offset` is the chunk's position in `data`. With `threads <= 1` (or a short
/// vector) it runs inline. Because the mask stream is seekable, `f` can be
/// `|off, c| prg.add_to(base + off, c, bits)` or [`crate::secagg::Masker::mask`].
pub fn mask_parallel(data: &mut [u32], threads: usize, f: impl Fn(usize, &mut [u32]) + Sync) {
    // Below this many elements a thread costs more than it saves.
    const MIN_CHUNK: usize = 1 << 14;
    let threads = threads.clamp(1, data.len().div_ceil(MIN_CHUNK).max(1));
    if threads == 1 {
        f(0, data);
        return;
    }
    let chunk_len = data.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (i, chunk) in data.chunks_mut(chunk_len).enumerate() {
            let f = &f;
            scope.spawn(move || f(i * chunk_len, chunk));
        }
    });
}

/// The number of threads worth using for masking on this machine.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_sub_restores_input() {
        let prg = MaskPrg::new(&[7; 32], 3);
        let orig: Vec<u32> = (0..5000).map(|i| i & 0xfff).collect();
        let mut v = orig.clone();
        prg.add_to(13, &mut v, 12);
        assert_ne!(v, orig);
        assert!(v.iter().all(|&x| x < 1 << 12));
        prg.sub_from(13, &mut v, 12);
        assert_eq!(v, orig);
    }

    #[test]
    fn different_rounds_give_different_streams() {
        let (a, b) = (MaskPrg::new(&[1; 32], 1), MaskPrg::new(&[1; 32], 2));
        let (mut x, mut y) = (vec![0; 16], vec![0; 16]);
        a.fill(0, &mut x, 32);
        b.fill(0, &mut y, 32);
        assert_ne!(x, y);
    }

    #[test]
    fn parallel_masking_equals_serial() {
        let prg = MaskPrg::new(&[9; 32], 0);
        let mut serial = vec![5u32; 100_000];
        let mut parallel = serial.clone();
        prg.add_to(0, &mut serial, 20);
        mask_parallel(&mut parallel, 4, |off, c| prg.add_to(off, c, 20));
        assert_eq!(serial, parallel);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn rejects_width_above_32() {
        low_bits_mask(33);
    }
}
