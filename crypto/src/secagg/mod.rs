//! SecAgg+ secure aggregation (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020) as sans-I/O
//! state machines.
//!
//! The server learns the sum mod 2^b of the inputs of the clients that survive to the masked
//! input phase, and nothing else about any single input, as long as every neighbourhood keeps
//! fewer than `t` corrupted members. Clients are arranged on a k-regular graph
//! ([`RoundContext::neighbours`]); each client only exchanges keys and shares with its `k`
//! neighbours, so work per client is O(k + d) instead of O(n + d).
//!
//! Message flow (→ server, ← server; the server only relays and sums):
//!
//! 1. [`ClientRound::start`] → [`Advertisement`] (fresh X25519 keys, signed);
//!    [`ServerRound::close_advertise`] ← neighbours' advertisements.
//! 2. [`ExpectPeerKeys::handle_peer_keys`] → [`EncryptedShare`]s (Shamir shares of the self-mask
//!    seed and mask key, one per neighbour); [`ServerRound::close_share_keys`] ← the shares
//!    addressed to each client.
//! 3. [`ExpectForwardedShares::handle_forwarded_shares`] gives a [`Masker`]; the client masks its
//!    vector (any chunking, any threads) and uploads it; [`ServerRound::add_masked_input`] sums.
//! 4. [`ServerRound::close_masked_input`] ← survivor set; [`ExpectSurvivors::handle_survivors`] →
//!    [`ConsistencySignature`]; [`ServerRound::close_consistency`] ← all signatures.
//! 5. [`ExpectUnmaskRequest::handle_unmask_request`] → [`UnmaskShares`];
//!    [`ServerRound::finish`] reconstructs, removes the masks and returns the [`Aggregate`].
//!
//! Client states consume `self`, so a stale state cannot answer twice. In particular a client
//! answers exactly one unmask request, for exactly one survivor set:
//!
//! ```compile_fail,E0382
//! use quorum_crypto::secagg::{ConsistencySignature, ExpectUnmaskRequest, PeerAuthenticator};
//! fn answer_twice(
//!     state: ExpectUnmaskRequest,
//!     signatures: Vec<ConsistencySignature>,
//!     auth: &dyn PeerAuthenticator,
//! ) {
//!     let _first = state.handle_unmask_request(signatures.clone(), auth);
//!     let _second = state.handle_unmask_request(signatures, auth); // `state` was moved
//! }
//! ```

mod client;
mod error;
mod messages;
mod params;
mod server;

pub use client::{
    ClientRound, ExpectForwardedShares, ExpectPeerKeys, ExpectSurvivors, ExpectUnmaskRequest,
    InputMask, Masker,
};
pub use error::{Error, Phase, UnknownPhase};
pub use messages::{
    ADVERTISE_LABEL, AdoptedList, Advertisement, CohortAuthenticator, ConsistencySignature,
    EncryptedShare, PeerAuthError, PeerAuthenticator, RevealedShare, SURVIVORS_LABEL, ShareKind,
    Signed, Signer, SiteVerifier, UnmaskShares, advertisement_message, survivors_message,
};
pub use params::{GRAPH_LABEL, Graph, GraphSeed, Params, RoundContext, worst_case};
pub use server::{Aggregate, ServerRound};
