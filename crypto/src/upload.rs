//! A client's input to secure aggregation, made, masked and packed one segment at a time.
//!
//! The input is the DP encoding of the update ([`StreamEncoder`]) followed by a short tail of
//! other values (the round's metric slots). [`InputStream::for_each_chunk`] hands out the
//! packed upload chunk by chunk, with exactly the bytes that encoding the whole vector,
//! masking it and packing it in chunks of the same length give; beyond the update, a client
//! holds one encoder segment and one chunk, whatever the model's size.

use crate::dp::StreamEncoder;
use crate::packing;
use crate::prg::{default_threads, mask_parallel};
use crate::secagg::InputMask;

/// One packed piece of the input: `elements` values from `offset`, packed at the input's width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedChunk {
    /// Position of the first value in the whole input.
    pub offset: u64,
    /// Values in this chunk.
    pub elements: u32,
    /// The values, packed ([`packing::pack`]).
    pub packed: Vec<u8>,
    /// Whether this is the input's last chunk.
    pub last: bool,
}

/// A client's input, ready to be streamed: the encoded update (if any) then the tail, masked
/// with the client's masks in secure rounds.
#[derive(Debug)]
pub struct InputStream {
    encoder: Option<StreamEncoder>,
    tail: Vec<u32>,
    masks: Option<InputMask>,
    bits: u32,
}

impl InputStream {
    /// The input `encoder`'s values followed by `tail` (values already in `[0, 2^bits)`),
    /// unmasked.
    pub fn new(encoder: Option<StreamEncoder>, tail: Vec<u32>, bits: u32) -> Self {
        Self {
            encoder,
            tail,
            masks: None,
            bits,
        }
    }

    /// The same input, masked with `masks` as it is streamed.
    pub fn masked(self, masks: InputMask) -> Self {
        Self {
            masks: Some(masks),
            ..self
        }
    }

    /// Values in the whole input.
    pub fn len(&self) -> usize {
        self.encoder.as_ref().map_or(0, StreamEncoder::len) + self.tail.len()
    }

    /// True when the input holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bits per value.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Calls `f(offset, values)` on consecutive pieces of the (masked) input, in order,
    /// stopping at its first error.
    pub fn try_for_each_segment<E>(
        &self,
        mut f: impl FnMut(usize, &[u32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let threads = default_threads();
        let mask = |offset: usize, values: &mut [u32]| {
            if let Some(masks) = &self.masks {
                mask_parallel(values, threads, |at, chunk| masks.mask(offset + at, chunk));
            }
        };
        let mut offset = 0;
        if let Some(encoder) = &self.encoder {
            let mut segments = encoder.segments();
            while let Some((at, values)) = segments.next_segment() {
                mask(at, values);
                f(at, values)?;
            }
            offset = encoder.len();
        }
        let mut tail = self.tail.clone();
        mask(offset, &mut tail);
        f(offset, &tail)
    }

    /// The whole (masked) input in memory, for callers that hold inputs whole.
    pub fn values(&self) -> Vec<u32> {
        let mut values = Vec::with_capacity(self.len());
        let Ok(()) = self.try_for_each_segment(|_, segment| {
            values.extend_from_slice(segment);
            Ok::<(), std::convert::Infallible>(())
        });
        values
    }

    /// Packs the input in chunks of `per_chunk` values (the last may be shorter) and calls
    /// `send` on each, in order, stopping at its first error.
    pub fn for_each_chunk<E>(
        &self,
        per_chunk: usize,
        mut send: impl FnMut(PackedChunk) -> Result<(), E>,
    ) -> Result<(), E> {
        let per_chunk = per_chunk.max(1);
        let total = self.len();
        let mut pending: Vec<u32> = Vec::with_capacity(per_chunk.min(total));
        let mut sent = 0usize;
        let mut emit = |values: &[u32]| {
            let chunk = PackedChunk {
                offset: sent as u64,
                // At most `per_chunk`, which the caller sizes for one message.
                elements: values.len() as u32,
                packed: packing::pack(self.bits, values),
                last: sent + values.len() == total,
            };
            sent += values.len();
            send(chunk)
        };
        self.try_for_each_segment(|_, mut segment| {
            while !segment.is_empty() {
                if pending.is_empty() && segment.len() >= per_chunk {
                    // Whole chunks straight from the segment, without a copy.
                    let (chunk, rest) = segment.split_at(per_chunk);
                    emit(chunk)?;
                    segment = rest;
                    continue;
                }
                let take = (per_chunk - pending.len()).min(segment.len());
                pending.extend_from_slice(&segment[..take]);
                segment = &segment[take..];
                if pending.len() == per_chunk {
                    emit(&pending)?;
                    pending.clear();
                }
            }
            Ok(())
        })?;
        if pending.is_empty() {
            Ok(())
        } else {
            emit(&pending)
        }
    }
}
