//! The Quorum wire protocol, version 1: generated from `proto/federation.proto`.
//!
//! One bidirectional `Session` stream per site carries the join, every round's configuration,
//! the streamed global model, the secure-aggregation messages and the streamed masked update.

/// Protocol messages for `quorum.v1`, and with the `grpc` feature its gRPC client and server.
#[allow(missing_docs, clippy::all)] // generated code
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/quorum.v1.rs"));
}

pub mod secagg;

/// Largest payload carried by one `ModelChunk` or `UpdateChunk`: 256 KiB, far below gRPC's
/// limits. gRPC keeps a buffer as large as the largest message each way for the life of every
/// stream, so this bounds what the aggregator holds per connected site (1 MiB chunks cost it
/// about 2.5 MiB a site).
pub const MAX_CHUNK_BYTES: usize = 1 << 18;

/// Elements of a `bits`-bit packed vector per `UpdateChunk` (a whole [`MAX_CHUNK_BYTES`]).
pub fn elements_per_chunk(bits: u32) -> usize {
    (MAX_CHUNK_BYTES * 8 / bits.max(1) as usize).max(1)
}

/// Largest encoded gRPC message either side accepts: one chunk, or a control message of a large
/// cohort (a 1,000-site `UnmaskRequest`, certificates included, is about 0.7 MB).
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_BYTES + (1 << 20);

/// The `UpdateChunk`s that carry `values` for `round`, each at most [`MAX_CHUNK_BYTES`] packed.
pub fn update_chunks(
    round: u32,
    bits: u32,
    values: &[u32],
) -> impl Iterator<Item = v1::UpdateChunk> + '_ {
    let per_chunk = elements_per_chunk(bits);
    let chunks = values.len().div_ceil(per_chunk);
    values
        .chunks(per_chunk)
        .enumerate()
        .map(move |(i, chunk)| v1::UpdateChunk {
            round,
            offset: (i * per_chunk) as u64,
            elements: chunk.len() as u32,
            packed: quorum_crypto::packing::pack(bits, chunk).into(),
            last: i + 1 == chunks,
        })
}

/// SHA-256 of the packed bytes [`update_chunks`] carries, and their total length: what both
/// ends record of an upload.
pub fn update_digest(bits: u32, values: &[u32]) -> ([u8; 32], u64) {
    let mut hasher = quorum_crypto::digest::Sha256::new();
    let mut bytes = 0u64;
    for chunk in values.chunks(elements_per_chunk(bits)) {
        let packed = quorum_crypto::packing::pack(bits, chunk);
        hasher.update(&packed);
        bytes += packed.len() as u64;
    }
    (hasher.finish(), bytes)
}

/// The `ModelChunk`s that carry a serialised model for `round` (one empty chunk for no bytes).
pub fn model_chunks(round: u32, model: bytes::Bytes) -> impl Iterator<Item = v1::ModelChunk> {
    let total = model.len();
    let count = total.div_ceil(MAX_CHUNK_BYTES).max(1);
    (0..count).map(move |i| {
        let start = i * MAX_CHUNK_BYTES;
        let end = (start + MAX_CHUNK_BYTES).min(total);
        v1::ModelChunk {
            round,
            offset: start as u64,
            data: model.slice(start..end),
            last: i + 1 == count,
        }
    })
}
