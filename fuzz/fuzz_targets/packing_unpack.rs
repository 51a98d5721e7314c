//! `packing::unpack` on any width, byte string and element count.
//!
//! Properties: it never panics; when it accepts, it returns `count` values below 2^bits that
//! pack back to exactly the bytes given (the encoding is canonical).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quorum_crypto::packing::{pack, packed_len, unpack};

#[derive(Arbitrary, Debug)]
struct Input {
    bits: u8,
    count: Count,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Count {
    /// As many whole elements as the bytes hold, the bytes cut to their packed length.
    Fit,
    Raw(usize),
}

fuzz_target!(|input: Input| {
    let bits = u32::from(input.bits);
    let mut bytes = input.bytes;
    let count = match input.count {
        Count::Fit if (8..=32).contains(&bits) => {
            let count = bytes.len() * 8 / bits as usize;
            bytes.truncate(packed_len(bits, count));
            count
        }
        Count::Fit => bytes.len(),
        Count::Raw(count) => count,
    };
    if let Ok(values) = unpack(bits, &bytes, count) {
        assert_eq!(values.len(), count, "unpack returned another element count");
        let limit = if bits == 32 {
            u32::MAX
        } else {
            (1 << bits) - 1
        };
        assert!(
            values.iter().all(|&v| v <= limit),
            "value wider than {bits} bits"
        );
        assert_eq!(pack(bits, &values), bytes, "pack(unpack(x)) != x");
    }
});
