//! Sans-I/O cryptography for Quorum: secure aggregation (SecAgg+) state machines, the pinned
//! mask PRG, Shamir sharing, share encryption, bit packing and the distributed discrete Gaussian
//! encoding. Nothing here does I/O, reads a clock or spawns a task: callers feed messages in and
//! get messages out, which is what makes large simulations and fuzzing possible.

pub mod digest;
pub mod dp;
pub mod packing;
pub mod prg;
pub mod secagg;
pub mod shamir;
pub mod share_crypto;
pub mod upload;
