//! In-process SecAgg+ simulation: all clients and the server in one thread, with scripted
//! dropouts, and cheap test identities.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::cell::RefCell;

use quorum_crypto::secagg::{
    Advertisement, Aggregate, ClientRound, Error, ExpectPeerKeys, ExpectSurvivors,
    ExpectUnmaskRequest, Params, PeerAuthError, PeerAuthenticator, RoundContext, ServerRound,
    Signed, Signer,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::hmac;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// HMAC-SHA256 "signatures" over SHA-256(message) with a per-client key: a fast stand-in for
/// certificate keys.
pub struct HmacSigner {
    pub client: u32,
}

fn hmac_key(client: u32) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, format!("test key {client}").as_bytes())
}

fn fake_certificate(client: u32) -> Vec<u8> {
    format!("test certificate {client}").into_bytes()
}

impl Signer for HmacSigner {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        hmac::sign(&hmac_key(self.client), digest.as_ref())
            .as_ref()
            .to_vec()
    }
    fn certificate_der(&self) -> Vec<u8> {
        fake_certificate(self.client)
    }
}

/// Verifies [`HmacSigner`] signatures and that the certificate names the claimed client.
///
/// Every survivor verifies every other survivor's signature over the same O(n) message, so the
/// last message's digest is cached: a 1,000-client simulation would otherwise spend most of its
/// time hashing the same bytes.
pub struct HmacAuth {
    keys: Vec<hmac::Key>,
    certificates: Vec<Vec<u8>>,
    last: RefCell<(Vec<u8>, Vec<u8>)>,
}

impl HmacAuth {
    /// An authenticator for clients `0..n` (keys derived once, so verifying stays cheap).
    pub fn new(n: u32) -> Self {
        Self {
            keys: (0..n).map(hmac_key).collect(),
            certificates: (0..n).map(fake_certificate).collect(),
            last: RefCell::new((Vec::new(), Vec::new())),
        }
    }
}

impl PeerAuthenticator for HmacAuth {
    fn verify(&self, client: u32, signed: Signed<'_>) -> Result<(), PeerAuthError> {
        let Signed {
            certificate_der,
            message,
            signature,
        } = signed;
        let (Some(key), Some(certificate)) = (
            self.keys.get(client as usize),
            self.certificates.get(client as usize),
        ) else {
            return Err(PeerAuthError::new("unknown client"));
        };
        if certificate_der != certificate.as_slice() {
            return Err(PeerAuthError::new("certificate names another client"));
        }
        let mut last = self.last.borrow_mut();
        if last.1.is_empty() || last.0 != message {
            let digest = ring::digest::digest(&ring::digest::SHA256, message);
            *last = (message.to_vec(), digest.as_ref().to_vec());
        }
        hmac::verify(key, &last.1, signature).map_err(|_| PeerAuthError::new("bad signature"))
    }
}

/// Real Ed25519 signatures; the "certificate" is the raw public key.
pub struct Ed25519Signer {
    pair: Ed25519KeyPair,
}

impl Ed25519Signer {
    pub fn new(client: u32) -> Self {
        let seed = ring::digest::digest(&ring::digest::SHA256, &client.to_be_bytes());
        Self {
            pair: Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).expect("32-byte seed"),
        }
    }
}

impl Signer for Ed25519Signer {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
    fn certificate_der(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }
}

/// Checks Ed25519 signatures against the key registered for each client.
pub struct Ed25519Auth;

impl PeerAuthenticator for Ed25519Auth {
    fn verify(&self, client: u32, signed: Signed<'_>) -> Result<(), PeerAuthError> {
        if signed.certificate_der != Ed25519Signer::new(client).certificate_der() {
            return Err(PeerAuthError::new(
                "key is not the one enrolled for this client",
            ));
        }
        UnparsedPublicKey::new(&ED25519, signed.certificate_der)
            .verify(signed.message, signed.signature)
            .map_err(|_| PeerAuthError::new("bad Ed25519 signature"))
    }
}

/// A round context with explicit parameters.
pub fn context(n: u32, k: u32, t: u32, min_survivors: u32, bits: u32, dim: usize) -> RoundContext {
    RoundContext {
        federation: "sim".into(),
        round: 3,
        round_seed: [n as u8; 32],
        offer_digest: [0; 32],
        params: Params {
            clients: n,
            neighbours: k,
            threshold: t,
            min_survivors,
            bits,
            dim,
        },
    }
}

/// When a simulated client vanishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropAt {
    Never,
    /// Never advertises.
    BeforeAdvertise,
    /// Advertises, never sends shares.
    AfterAdvertise,
    /// Sends shares, then vanishes before receiving the forwarded ones.
    DuringShareKeys,
    /// Masks its input but never uploads it.
    BeforeUpload,
    /// Uploads, never signs the survivor set.
    AfterUpload,
    /// Signs, never answers the unmask request.
    AfterConsistency,
}

/// What a simulated round produced.
pub struct Outcome {
    pub result: Result<Aggregate, Error>,
    /// Clients whose upload the server accepted.
    pub uploaded: Vec<u32>,
    /// Errors honest clients returned (they then behave as dropouts).
    pub client_errors: Vec<(u32, Error)>,
}

/// Random inputs in Z_(2^b).
pub fn random_inputs(ctx: &RoundContext, rng: &mut impl Rng) -> Vec<Vec<u32>> {
    let mask = u32::MAX >> (32 - ctx.params.bits);
    (0..ctx.params.clients)
        .map(|_| {
            (0..ctx.params.dim)
                .map(|_| rng.random::<u32>() & mask)
                .collect()
        })
        .collect()
}

/// Exact sum mod 2^b of the listed clients' inputs, computed in u64.
pub fn exact_sum(ctx: &RoundContext, inputs: &[Vec<u32>], clients: &[u32]) -> Vec<u32> {
    let modulus = 1u64 << ctx.params.bits;
    (0..ctx.params.dim)
        .map(|i| {
            let s: u64 = clients
                .iter()
                .map(|&c| u64::from(inputs[c as usize][i]))
                .sum();
            (s % modulus) as u32
        })
        .collect()
}

/// Runs one round with every client honest except for the scripted dropouts.
pub fn run(ctx: &RoundContext, inputs: &[Vec<u32>], drops: &[DropAt], seed: u64) -> Outcome {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut client_errors = Vec::new();
    let mut uploaded = Vec::new();
    let result = (|| {
        let n = ctx.params.clients as usize;
        let drop_at = |c: u32| drops.get(c as usize).copied().unwrap_or(DropAt::Never);
        let mut server = ServerRound::new(ctx.clone())?;
        let auth = HmacAuth::new(ctx.params.clients);

        let mut s1: Vec<_> = (0..n).map(|_| None).collect();
        for c in 0..n as u32 {
            if drop_at(c) == DropAt::BeforeAdvertise {
                continue;
            }
            let (state, adv) =
                ClientRound::start(ctx.clone(), c, &HmacSigner { client: c }, &mut rng)?;
            server.handle_advertisement(adv, &auth)?;
            s1[c as usize] = Some(state);
        }
        let mut s2: Vec<_> = (0..n).map(|_| None).collect();
        for (c, adverts) in server.close_advertise()? {
            let Some(state) = s1[c as usize].take() else {
                continue;
            };
            if drop_at(c) == DropAt::AfterAdvertise {
                continue;
            }
            match state.handle_peer_keys(adverts, &auth, &mut rng) {
                Ok((next, shares)) => {
                    server.handle_share_keys(c, shares)?;
                    s2[c as usize] = Some(next);
                }
                Err(e) => client_errors.push((c, e)),
            }
        }
        let mut s3: Vec<_> = (0..n).map(|_| None).collect();
        for (c, shares) in server.close_share_keys()? {
            let Some(state) = s2[c as usize].take() else {
                continue;
            };
            if drop_at(c) == DropAt::DuringShareKeys {
                continue;
            }
            let masker = match state.handle_forwarded_shares(shares) {
                Ok(m) => m,
                Err(e) => {
                    client_errors.push((c, e));
                    continue;
                }
            };
            // Mask in two uneven chunks, the second first, to exercise seekability.
            let mut data = inputs[c as usize].clone();
            let split = data.len() / 3;
            let (head, tail) = data.split_at_mut(split);
            masker.mask(split, tail);
            masker.mask(0, head);
            if drop_at(c) == DropAt::BeforeUpload {
                continue;
            }
            if c % 2 == 0 {
                server.add_masked_input(c, &data)?;
            } else {
                // Odd clients' inputs go in as a server reads a stored upload back: in parts.
                let part = data.len().div_ceil(3);
                for (i, piece) in data.chunks(part).enumerate() {
                    let complete = server.add_masked_input_part(c, i * part, piece)?;
                    assert_eq!(complete, (i + 1) * part >= data.len());
                }
            }
            uploaded.push(c);
            s3[c as usize] = Some(masker.finish());
        }
        let survivors = server.close_masked_input()?;
        let mut s4: Vec<Option<ExpectUnmaskRequest>> = (0..n).map(|_| None).collect();
        for &c in &survivors {
            let Some(state) = s3[c as usize].take() else {
                continue;
            };
            if drop_at(c) == DropAt::AfterUpload {
                continue;
            }
            match state.handle_survivors(&survivors, &HmacSigner { client: c }) {
                Ok((next, sig)) => {
                    server.handle_consistency(sig, &auth)?;
                    s4[c as usize] = Some(next);
                }
                Err(e) => client_errors.push((c, e)),
            }
        }
        let signatures = server.close_consistency()?;
        for (c, slot) in s4.iter_mut().enumerate() {
            let Some(state) = slot.take() else { continue };
            if drop_at(c as u32) == DropAt::AfterConsistency {
                continue;
            }
            match state.handle_unmask_request(signatures.clone(), &auth) {
                Ok(shares) => server.handle_unmask(shares)?,
                Err(e) => client_errors.push((c as u32, e)),
            }
        }
        server.finish()
    })();
    Outcome {
        result,
        uploaded,
        client_errors,
    }
}

/// Clients that have advertised, and the server's per-client advertisement lists.
pub struct Advertised {
    pub server: ServerRound,
    pub clients: Vec<ExpectPeerKeys>,
    pub lists: Vec<(u32, Vec<Advertisement>)>,
    pub rng: ChaCha20Rng,
    pub auth: HmacAuth,
}

/// Every client advertises; the server closes the phase.
pub fn advertised(ctx: &RoundContext, seed: u64) -> Advertised {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut server = ServerRound::new(ctx.clone()).unwrap();
    let auth = HmacAuth::new(ctx.params.clients);
    let clients = (0..ctx.params.clients)
        .map(|c| {
            let (state, adv) =
                ClientRound::start(ctx.clone(), c, &HmacSigner { client: c }, &mut rng).unwrap();
            server.handle_advertisement(adv, &auth).unwrap();
            state
        })
        .collect();
    let lists = server.close_advertise().unwrap();
    Advertised {
        server,
        clients,
        lists,
        rng,
        auth,
    }
}

/// Everyone honest up to the survivor set: returns the server (consistency phase), each
/// client's state and the survivor set.
pub fn masked(
    ctx: &RoundContext,
    inputs: &[Vec<u32>],
    seed: u64,
) -> (ServerRound, Vec<ExpectSurvivors>, Vec<u32>, HmacAuth) {
    let Advertised {
        mut server,
        clients,
        lists,
        mut rng,
        auth,
    } = advertised(ctx, seed);
    let mut next = Vec::new();
    for ((c, list), state) in lists.into_iter().zip(clients) {
        let (s, shares) = state.handle_peer_keys(list, &auth, &mut rng).unwrap();
        server.handle_share_keys(c, shares).unwrap();
        next.push(s);
    }
    let mut out = Vec::new();
    for ((c, shares), state) in server.close_share_keys().unwrap().into_iter().zip(next) {
        let masker = state.handle_forwarded_shares(shares).unwrap();
        let mut data = inputs[c as usize].clone();
        masker.mask(0, &mut data);
        server.add_masked_input(c, &data).unwrap();
        out.push(masker.finish());
    }
    let survivors = server.close_masked_input().unwrap();
    (server, out, survivors, auth)
}
