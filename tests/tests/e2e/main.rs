//! End-to-end and fault tests: a real aggregator and real clients over loopback mTLS.
//!
//! Needs the debug binaries (`cargo build --bins`; `make test` builds them first). The tests
//! that train take a global lock so that at most one federation trains at a time; the
//! refusal and wire tests run alongside.

mod attestation;
mod audit;
mod bundle;
mod deploy;
mod enroll;
mod external_pki;
mod faults;
mod federation;
mod mtls;
mod policy;
mod raw;
mod support;
mod uploads;
mod wire;
