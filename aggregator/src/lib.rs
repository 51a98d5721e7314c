//! The Quorum aggregator: an mTLS gRPC service that runs federated rounds with secure
//! aggregation, decodes the noised sum, applies the outer optimizer and keeps checkpoints and a
//! tamper-evident audit log. It never links LibTorch: the model is just named f32 tensors.

pub mod admin_log;
pub mod engine;
pub mod init;
pub mod metrics;
pub mod model_store;
pub mod outer;
pub mod policy_check;
pub mod progress;
pub mod refusal_limit;
pub mod report;
pub mod server;
pub mod service;
pub mod state;
pub mod transport;
