//! A federated round as sans-I/O state machines: the aggregator's [`Coordinator`] and each
//! site's [`SiteRound`].
//!
//! Neither reads a clock, opens a socket or touches a file. Inputs go in with the time they
//! happened (`handle(now, …)`, `handle_timeout(now)`); randomness is passed in as seeds; outputs
//! come out of queues the driver drains after every input, in this order:
//!
//! 1. `poll_audit()`: facts (and, on the aggregator, state saves and signed heads) the driver
//!    must make durable first. The rule "an audit fact is durable before the message it records
//!    goes out" is the drain order, not a convention each call site has to keep.
//! 2. `poll_event()`: work for the driver (train, evaluate, apply an update) and notes for
//!    people.
//! 3. `poll_transmit()`: messages to send.
//! 4. `poll_timeout()`: when to call `handle_timeout` next (no fixed-interval polling).
//!
//! Message flow of one secure round (→ aggregator, ← site):
//!
//! ```text
//! Coordinator                                  SiteRound (each cohort member)
//!   cohort chosen, RoundConfig        ─────▶   admission against site.toml
//!                                     ◀─────   RoundDecision
//!   model streamed (ModelChunk…)      ─────▶   digest checked, evaluate, train, DP-encode,
//!                                              append losses and tokens (`metrics`)
//!                                     ◀─────   AdvertiseKeys (RoundReport: opt-in only)
//!   PeerKeys                          ─────▶   ShareKeys
//!   ForwardedShares                   ─────▶   masked update (UpdateChunk…)
//!   SurvivorSet                       ─────▶   ConsistencySignature
//!   UnmaskRequest                     ─────▶   UnmaskShares
//!   sum unmasked, decoded, outer step
//!   RoundResult                       ─────▶   new model digest recorded
//!   AuditHead (its signed log head)   ─────▶   checked, stored as a witness
//!                                     ◀─────   AuditHead (the site's own), stored likewise
//! ```
//!
//! The head exchange ([`witness`]) lets an auditor catch a node's log that was later cut,
//! rolled back or rewritten from any other node's log that witnessed it.
//!
//! The network drivers (`quorum-aggregator`'s engine, `quorum-client`'s session) move these
//! messages over mTLS gRPC; `tests/sim.rs` moves them between a thousand sites in one process on
//! a virtual clock.

#![deny(missing_docs)]

pub mod coordinator;
pub mod fact;
pub mod metrics;
pub mod site;
pub mod witness;

pub use coordinator::{
    Coordinator, CoordinatorConfig, Durable, Event, ModelInfo, Resume, RoundPlan, RoundSummary,
    SiteReport, Status, Transmit, Upload, UploadDigest, UploadPart, UploadWindow, model_info,
    secagg_params,
};
pub use fact::{Attested, Fact, Offered, What, Witnessed};
pub use metrics::SummedMetrics;
pub use site::{
    MAX_MODEL_PREALLOCATION, Outcome, OutgoingUpdate, SiteDurable, SiteEvent, SiteHistory,
    SiteKeys, SiteRound, SiteTransmit, TrainedUpdate, UploadReceipt, message_name,
};
pub use witness::{HeadWitness, WitnessError};
