//! Quorum client: trains the shared model on the site's own data with LibTorch (through `tch`)
//! and takes part in secure federated rounds.

pub mod checkpoint;
pub mod corpus;
pub mod cuda;
pub mod data;
pub mod dpsgd;
pub mod hf;
pub mod link;
pub mod metrics;
pub mod model;
pub mod participant;
pub mod roster;
pub mod session;
pub mod tokenizer;
pub mod train;
pub mod transport;
