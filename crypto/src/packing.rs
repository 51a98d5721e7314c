//! Bit packing of vectors over Z_(2^b) for upload.
//!
//! Format: element `j` occupies bits `[j·b, (j+1)·b)` of the bit stream, least significant bit
//! first; bit `i` of the stream is bit `i mod 8` of byte `i / 8`. The last byte is zero-padded.
//! For b = 8, 16 and 32 this is exactly the little-endian encoding of each element.

use crate::prg::{MAX_BITS, MIN_BITS, low_bits_mask};

/// Why a packed vector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The element width is not supported.
    #[error("element width {bits} is outside {MIN_BITS}..={MAX_BITS}")]
    BitsOutOfRange {
        /// Width given.
        bits: u32,
    },
    /// The byte string has the wrong length for `count` elements.
    #[error("packed vector is {got} bytes but {expected} are needed for the element count")]
    WrongLength {
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// The padding bits of the last byte are not zero.
    #[error("padding bits of the packed vector are not zero; the sender's encoder is broken")]
    NonzeroPadding,
}

/// Bytes needed for `count` elements of `bits` bits (saturating: a count whose packed size
/// does not fit in `usize` cannot match any buffer).
pub fn packed_len(bits: u32, count: usize) -> usize {
    count.saturating_mul(bits as usize).div_ceil(8)
}

/// Packs `values` at `bits` bits each; every value is taken mod 2^bits.
///
/// # Panics
/// If `bits` is outside `8..=32` (a programming error: widths come from validated parameters).
pub fn pack(bits: u32, values: &[u32]) -> Vec<u8> {
    let mask = low_bits_mask(bits);
    let mut out = Vec::with_capacity(packed_len(bits, values.len()));
    match bits {
        8 => out.extend(values.iter().map(|&v| v as u8)),
        16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as u16).to_le_bytes())),
        32 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&v.to_le_bytes())),
        _ => {
            // Fewer than 32 bits wait in `acc` before a value is added, so it never overflows;
            // whole 32-bit words leave at once.
            let mut acc = 0u64;
            let mut filled = 0u32;
            for &v in values {
                acc |= u64::from(v & mask) << filled;
                filled += bits;
                if filled >= 32 {
                    out.extend_from_slice(&(acc as u32).to_le_bytes());
                    acc >>= 32;
                    filled -= 32;
                }
            }
            out.extend_from_slice(&acc.to_le_bytes()[..filled.div_ceil(8) as usize]);
        }
    }
    out
}

/// Unpacks `count` elements of `bits` bits; rejects a wrong length or nonzero padding.
pub fn unpack(bits: u32, bytes: &[u8], count: usize) -> Result<Vec<u32>, Error> {
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(Error::BitsOutOfRange { bits });
    }
    let expected = packed_len(bits, count);
    if bytes.len() != expected {
        return Err(Error::WrongLength {
            expected,
            got: bytes.len(),
        });
    }
    let values = match bits {
        8 => bytes.iter().map(|&b| u32::from(b)).collect(),
        16 => bytes
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        32 => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => {
            // Element j starts at bit j·b: read the 8 bytes from its first byte (fewer, zero
            // filled, at the end) and shift. b ≤ 32 and the shift ≤ 7, so 8 bytes hold it.
            let mask = u64::from(low_bits_mask(bits));
            let width = bits as usize;
            let values = (0..count)
                .map(|j| {
                    let (byte, shift) = ((j * width) / 8, (j * width) % 8);
                    let word = match bytes.get(byte..byte + 8) {
                        Some(window) => u64::from_le_bytes(window.try_into().expect("8 bytes")),
                        None => {
                            let mut tail = [0u8; 8];
                            tail[..bytes.len() - byte].copy_from_slice(&bytes[byte..]);
                            u64::from_le_bytes(tail)
                        }
                    };
                    ((word >> shift) & mask) as u32
                })
                .collect();
            let used = (count * width) % 8;
            if used != 0 && bytes[expected - 1] >> used != 0 {
                return Err(Error::NonzeroPadding);
            }
            values
        }
    };
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twelve_bit_layout() {
        // 0xabc then 0x123: bits LSB first -> bytes bc, 3a, 12.
        assert_eq!(pack(12, &[0xabc, 0x123]), vec![0xbc, 0x3a, 0x12]);
        assert_eq!(pack(12, &[0xabc]), vec![0xbc, 0x0a]);
    }

    #[test]
    fn rejects_bad_length_padding_and_width() {
        assert_eq!(
            unpack(12, &[0xbc, 0x0a, 0x00], 1),
            Err(Error::WrongLength {
                expected: 2,
                got: 3
            })
        );
        assert_eq!(unpack(12, &[0xbc, 0x1a], 1), Err(Error::NonzeroPadding));
        assert_eq!(unpack(7, &[], 0), Err(Error::BitsOutOfRange { bits: 7 }));
        assert_eq!(unpack(12, &[0xbc, 0x0a], 1), Ok(vec![0xabc]));
    }

    /// Bit `i` of the stream is bit `i mod 8` of byte `i / 8`, one bit at a time.
    fn pack_bit_by_bit(bits: u32, values: &[u32]) -> Vec<u8> {
        let mut out = vec![0u8; packed_len(bits, values.len())];
        for (j, v) in values.iter().enumerate() {
            for k in 0..bits as usize {
                let i = j * bits as usize + k;
                out[i / 8] |= (((v >> k) & 1) as u8) << (i % 8);
            }
        }
        out
    }

    #[test]
    fn every_width_matches_the_bit_by_bit_layout_and_round_trips() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let values: Vec<u32> = (0..67)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 32) as u32
            })
            .collect();
        for bits in MIN_BITS..=MAX_BITS {
            let reduced: Vec<u32> = values.iter().map(|v| v & low_bits_mask(bits)).collect();
            for len in [0, 1, 2, 7, 8, 9, 31, 67] {
                let packed = pack(bits, &values[..len]);
                assert_eq!(
                    packed,
                    pack_bit_by_bit(bits, &values[..len]),
                    "b = {bits}, {len}"
                );
                assert_eq!(
                    unpack(bits, &packed, len).unwrap(),
                    reduced[..len],
                    "b = {bits}"
                );
            }
        }
    }

    #[test]
    fn values_are_reduced() {
        assert_eq!(pack(8, &[0x1ff]), vec![0xff]);
        assert_eq!(pack(9, &[0x3ff]), vec![0xff, 0x01]);
    }

    #[test]
    fn absurd_counts_are_rejected_not_overflowed() {
        // Found by the packing_unpack fuzz target (fuzz/regressions/packing_unpack).
        assert!(unpack(12, &[], 18_374_685_380_159_993_608).is_err());
        assert!(unpack(12, &[], 1 << 62).is_err());
        assert!(unpack(8, &[], 1 << 61).is_err());
    }
}
