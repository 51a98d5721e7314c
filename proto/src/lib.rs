//! The Quorum wire protocol, version 1: generated from `proto/federation.proto`.
//!
//! One bidirectional `Session` stream per site carries the join, every round's configuration,
//! the streamed global model, the secure-aggregation messages and the streamed masked update.

/// Protocol messages and the gRPC client and server for `quorum.v1`.
#[allow(missing_docs, clippy::all)] // generated code
pub mod v1 {
    tonic::include_proto!("quorum.v1");
}

pub mod secagg;

/// Largest payload carried by one `ModelChunk` or `UpdateChunk`: 1 MiB, far below gRPC's limits.
/// Small chunks keep what the aggregator buffers per connected site (one message each way)
/// small, so its memory grows little with the number of sites.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Elements of a `bits`-bit packed vector per `UpdateChunk` (a whole [`MAX_CHUNK_BYTES`]).
pub fn elements_per_chunk(bits: u32) -> usize {
    (MAX_CHUNK_BYTES * 8 / bits.max(1) as usize).max(1)
}

/// Largest encoded gRPC message either side accepts: one chunk, or a control message of a large
/// cohort (a 1,000-site `UnmaskRequest`, certificates included, is about 0.7 MB).
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_BYTES + (1 << 20);
