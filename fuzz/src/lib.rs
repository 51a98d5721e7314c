//! Shared pieces of the SecAgg+ fuzz targets: cheap identities, valid small parameters drawn
//! from fuzz input, and attacker-chosen identifiers and byte strings.
//!
//! Signatures are not what these targets test (the identity layer has its own tests), so the
//! authenticator accepts any non-empty signature: forged messages then get past the signature
//! check and reach the state machines' own rules, while an empty signature still exercises the
//! refusal path.

use arbitrary::Arbitrary;
use quorum_crypto::secagg::{
    Params, PeerAuthError, PeerAuthenticator, RoundContext, Signed, Signer,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Largest cohort the targets build: big enough for non-complete graphs (k < n − 1), small
/// enough that the honest parties' key agreements stay cheap.
pub const MAX_CLIENTS: u32 = 7;
/// Largest vector length the targets use.
pub const MAX_DIM: usize = 8;

/// Accepts every non-empty signature (see the crate docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct TrivialAuth;

impl PeerAuthenticator for TrivialAuth {
    fn verify(&self, _client: u32, signed: Signed<'_>) -> Result<(), PeerAuthError> {
        if signed.signature.is_empty() {
            Err(PeerAuthError::new("empty signature"))
        } else {
            Ok(())
        }
    }
}

/// Signs with a fixed non-empty byte string that [`TrivialAuth`] accepts.
#[derive(Debug, Clone, Copy)]
pub struct TrivialSigner {
    /// The signer's cohort index, named in its certificate.
    pub client: u32,
}

impl Signer for TrivialSigner {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        // Message length and signer: enough to tell signatures apart in a crash report.
        let mut sig = self.client.to_be_bytes().to_vec();
        sig.extend_from_slice(&(message.len() as u64).to_be_bytes());
        sig
    }

    fn certificate_der(&self) -> Vec<u8> {
        format!("certificate of client {}", self.client).into_bytes()
    }
}

/// A deterministic RNG, so that a crashing input replays exactly.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Round parameters drawn from fuzz input, always valid (the targets treat a refusal by
/// `Params::validate` as a harness bug and panic): n ≤ [`MAX_CLIENTS`], any degree with
/// a k-regular graph, any strict-majority threshold, any `min_survivors` in `t..=n`, any width
/// in 8..=32 and d ≤ [`MAX_DIM`].
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct ParamChoice {
    clients: u8,
    degree: u8,
    threshold: u8,
    min_survivors: u8,
    bits: u8,
    dim: u8,
    round: u8,
    round_seed: u8,
}

impl ParamChoice {
    /// The round context these choices describe.
    pub fn context(&self) -> RoundContext {
        let n = 2 + u32::from(self.clients) % (MAX_CLIENTS - 1);
        let mut k = 1 + u32::from(self.degree) % (n - 1);
        if !(n * k).is_multiple_of(2) {
            // n is odd here, so n ≥ 3 and an even degree in 2..n exists.
            k = if k + 1 < n { k + 1 } else { k - 1 };
        }
        let t = k / 2 + 1 + u32::from(self.threshold) % (k - k / 2);
        let min_survivors = t + u32::from(self.min_survivors) % (n - t + 1);
        RoundContext {
            federation: "fuzz".into(),
            round: u32::from(self.round),
            round_seed: [self.round_seed; 32],
            offer_digest: [0; 32],
            params: Params {
                clients: n,
                neighbours: k,
                threshold: t,
                min_survivors,
                bits: 8 + u32::from(self.bits) % 25,
                dim: 1 + usize::from(self.dim) % MAX_DIM,
            },
        }
    }
}

/// A client index as an attacker writes it: usually inside the cohort, sometimes anywhere.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Id {
    /// An index in `0..16` (inside or just past a small cohort).
    Small(u8),
    /// Any u32.
    Raw(u32),
}

impl Id {
    /// The index this stands for.
    pub fn get(self) -> u32 {
        match self {
            Self::Small(v) => u32::from(v % 16),
            Self::Raw(v) => v,
        }
    }
}
