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

/// Largest payload carried by one `ModelChunk` or `UpdateChunk`: 4 MiB, far below gRPC's limits.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;

/// Largest encoded gRPC message either side accepts: one chunk plus framing headroom.
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_BYTES + (64 << 10);
