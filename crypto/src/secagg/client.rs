//! The client side: one `Expect*` state per phase, each consumed by its handler.

use std::collections::{BTreeMap, BTreeSet};

use rand::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};

use super::messages::{
    Advertisement, ConsistencySignature, EncryptedShare, PeerAuthenticator, RevealedShare,
    ShareKind, Signer, UnmaskShares, advertisement_message, survivors_message,
    verify_advertisement, verify_signature,
};
use super::params::{Graph, RoundContext};
use super::{Error, Phase};
use crate::prg::MaskPrg;
use crate::shamir;
use crate::share_crypto::{self, SharePayload};

/// Elements masked per pass over all streams, so a chunk stays in cache across streams.
const MASK_BLOCK: usize = 4096;

/// What every client state knows.
struct Common {
    ctx: RoundContext,
    graph: Graph,
    me: u32,
    neighbours: Vec<u32>,
}

impl Common {
    fn threshold(&self) -> usize {
        self.ctx.params.threshold as usize
    }
}

/// Entry point of the client state machine.
#[derive(Debug)]
pub enum ClientRound {}

impl ClientRound {
    /// Starts a round as client `me`: draws fresh X25519 key pairs and a self-mask seed, and
    /// returns the signed advertisement to send.
    pub fn start(
        ctx: RoundContext,
        me: u32,
        signer: &dyn Signer,
        rng: &mut impl CryptoRng,
    ) -> Result<(ExpectPeerKeys, Advertisement), Error> {
        ctx.params.validate()?;
        if me >= ctx.params.clients {
            return Err(Error::UnknownClient {
                client: me,
                clients: ctx.params.clients,
            });
        }
        let mut draw = || {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            b
        };
        let share_secret = StaticSecret::from(draw());
        let mask_secret = StaticSecret::from(draw());
        let self_seed = draw();
        let share_public_key = PublicKey::from(&share_secret).to_bytes();
        let mask_public_key = PublicKey::from(&mask_secret).to_bytes();
        let message = advertisement_message(
            &ctx.federation,
            ctx.round,
            &ctx.offer_digest,
            me,
            &share_public_key,
            &mask_public_key,
        );
        let advertisement = Advertisement {
            client: me,
            share_public_key,
            mask_public_key,
            signature: signer.sign(&message),
            certificate_der: signer.certificate_der(),
        };
        let graph = ctx.graph();
        let neighbours = graph.neighbours(me);
        let state = ExpectPeerKeys {
            common: Common {
                ctx,
                graph,
                me,
                neighbours,
            },
            share_secret,
            mask_secret,
            self_seed,
        };
        Ok((state, advertisement))
    }
}

/// Waiting for the neighbours' advertisements.
pub struct ExpectPeerKeys {
    common: Common,
    share_secret: StaticSecret,
    mask_secret: StaticSecret,
    self_seed: [u8; 32],
}

/// Per-neighbour secrets established from a verified advertisement.
struct Peer {
    share_shared_secret: [u8; 32],
    pairwise_seed: [u8; 32],
}

impl ExpectPeerKeys {
    /// Verifies the neighbours' advertisements and returns one encrypted share per advertising
    /// neighbour.
    ///
    /// Refuses the whole set when any advertisement is from a non-neighbour, repeated, or not
    /// validly signed for this federation and round (a replay from another round fails the
    /// signature check), and when fewer than t neighbours advertised.
    pub fn handle_peer_keys(
        self,
        peers: Vec<Advertisement>,
        auth: &dyn PeerAuthenticator,
        rng: &mut impl CryptoRng,
    ) -> Result<(ExpectForwardedShares, Vec<EncryptedShare>), Error> {
        let c = &self.common;
        let mut verified = BTreeMap::new();
        for adv in peers {
            if c.neighbours.binary_search(&adv.client).is_err() {
                return Err(Error::NotANeighbour {
                    client: c.me,
                    other: adv.client,
                });
            }
            if verified.contains_key(&adv.client) {
                return Err(Error::DuplicateMessage { client: adv.client });
            }
            verify_advertisement(&c.ctx, &adv, auth)?;
            let bad_key = |source| Error::BadPeerKey {
                client: adv.client,
                source,
            };
            let share_shared_secret =
                share_crypto::agree(&self.share_secret, &adv.share_public_key).map_err(bad_key)?;
            let mask_shared =
                share_crypto::agree(&self.mask_secret, &adv.mask_public_key).map_err(bad_key)?;
            let pairwise_seed = share_crypto::pairwise_seed(
                &mask_shared,
                &c.ctx.federation,
                c.ctx.round,
                c.me,
                adv.client,
            );
            verified.insert(
                adv.client,
                Peer {
                    share_shared_secret,
                    pairwise_seed,
                },
            );
        }
        if verified.len() < c.threshold() {
            return Err(Error::BelowThreshold {
                phase: Phase::Advertise,
                survivors: verified.len(),
                needed: c.threshold(),
            });
        }
        // Shares are indexed by position in the full neighbour list (x = index + 1), so the
        // server and every holder can check where each share belongs. Validated parameters keep
        // k <= 254 and t <= k, so the conversions cannot fail.
        let k = u8::try_from(c.neighbours.len()).map_err(|_| invalid_degree())?;
        let t = u8::try_from(c.threshold()).map_err(|_| invalid_degree())?;
        let seed_shares =
            shamir::split(&self.self_seed, t, k, rng).map_err(|_| invalid_degree())?;
        let key_shares =
            shamir::split(&self.mask_secret.to_bytes(), t, k, rng).map_err(|_| invalid_degree())?;
        let mut out = Vec::with_capacity(verified.len());
        for (i, &neighbour) in c.neighbours.iter().enumerate() {
            let Some(peer) = verified.get(&neighbour) else {
                continue;
            };
            let payload = SharePayload {
                sender: c.me,
                receiver: neighbour,
                self_mask_seed: seed_shares[i].clone(),
                mask_key: key_shares[i].clone(),
            };
            out.push(EncryptedShare {
                sender: c.me,
                receiver: neighbour,
                ciphertext: share_crypto::seal_payload(
                    &peer.share_shared_secret,
                    &c.ctx.federation,
                    c.ctx.round,
                    &payload,
                ),
            });
        }
        let state = ExpectForwardedShares {
            common: self.common,
            peers: verified,
            self_seed: self.self_seed,
        };
        Ok((state, out))
    }
}

fn invalid_degree() -> Error {
    Error::InvalidParams {
        reason: "degree or threshold outside the Shamir range".into(),
    }
}

/// Waiting for the shares the neighbours sent to this client.
pub struct ExpectForwardedShares {
    common: Common,
    peers: BTreeMap<u32, Peer>,
    self_seed: [u8; 32],
}

impl ExpectForwardedShares {
    /// Decrypts the shares forwarded by the server and returns the [`Masker`].
    ///
    /// Rule: every share must be addressed to this client, come from a neighbour whose
    /// advertisement it verified, appear once, decrypt, and sit at the x-coordinate of this
    /// client in the sender's neighbour list. At least t neighbours must have shared: the
    /// neighbours that shared are the ones that hold this client's shares, and with fewer than t
    /// of them its input could never be unmasked.
    pub fn handle_forwarded_shares(self, shares: Vec<EncryptedShare>) -> Result<Masker, Error> {
        let c = &self.common;
        let mut held = BTreeMap::new();
        for share in shares {
            if share.receiver != c.me {
                return Err(Error::WrongReceiver {
                    me: c.me,
                    receiver: share.receiver,
                });
            }
            let Some(peer) = self.peers.get(&share.sender) else {
                return Err(Error::NotANeighbour {
                    client: c.me,
                    other: share.sender,
                });
            };
            if held.contains_key(&share.sender) {
                return Err(Error::DuplicateMessage {
                    client: share.sender,
                });
            }
            let payload = share_crypto::open_payload(
                &peer.share_shared_secret,
                &c.ctx.federation,
                c.ctx.round,
                share.sender,
                c.me,
                &share.ciphertext,
            )
            .map_err(|source| Error::ShareDecryptFailed {
                sender: share.sender,
                source,
            })?;
            let x = c.graph.x_coordinate(share.sender, c.me);
            if x != Some(payload.self_mask_seed.x) || x != Some(payload.mask_key.x) {
                return Err(Error::MalformedShare {
                    holder: c.me,
                    owner: share.sender,
                });
            }
            held.insert(share.sender, payload);
        }
        if held.len() < c.threshold() {
            return Err(Error::BelowThreshold {
                phase: Phase::ShareKeys,
                survivors: held.len(),
                needed: c.threshold(),
            });
        }
        let mut streams = vec![(MaskPrg::new(&self.self_seed, c.ctx.round), true)];
        streams.extend(held.keys().map(|&v| {
            // The pair's lower index adds the shared mask, the higher one subtracts it.
            let add = c.me < v;
            (
                MaskPrg::new(&self.peers[&v].pairwise_seed, c.ctx.round),
                add,
            )
        }));
        let bits = c.ctx.params.bits;
        Ok(Masker {
            common: self.common,
            masks: InputMask { streams, bits },
            held,
        })
    }
}

/// Masks this client's input: self mask plus ± pairwise masks with the neighbours that shared.
pub struct Masker {
    common: Common,
    masks: InputMask,
    held: BTreeMap<u32, SharePayload>,
}

/// This client's masks for its input, apart from the round's state: what a streamed upload
/// needs while the client goes on to the survivor set. Secret: it holds mask keys.
#[derive(Clone)]
pub struct InputMask {
    /// (stream, add?) — the self mask first.
    streams: Vec<(MaskPrg, bool)>,
    bits: u32,
}

impl InputMask {
    /// Masks `data`, the elements `offset..offset + data.len()` of the input vector, in place.
    /// Values must already lie in Z_(2^b). Chunks may be masked in any order and concurrently
    /// (see [`crate::prg::mask_parallel`]); each element must be masked exactly once.
    pub fn mask(&self, offset: usize, data: &mut [u32]) {
        apply_streams(&self.streams, offset, data, self.bits);
    }
}

impl std::fmt::Debug for InputMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputMask")
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl Masker {
    /// Masks `data`, the elements `offset..offset + data.len()` of the input vector, in place
    /// (see [`InputMask::mask`]).
    pub fn mask(&self, offset: usize, data: &mut [u32]) {
        self.masks.mask(offset, data);
    }

    /// A copy of the masks, to mask the input after [`Masker::finish`].
    pub fn input_mask(&self) -> InputMask {
        self.masks.clone()
    }

    /// Vector length d.
    pub fn dim(&self) -> usize {
        self.common.ctx.params.dim
    }

    /// Element width b.
    pub fn bits(&self) -> u32 {
        self.common.ctx.params.bits
    }

    /// The neighbours whose pairwise masks are included (those that shared keys).
    pub fn pairwise_neighbours(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// Done masking; the upload can be sent. Waits for the survivor set next.
    pub fn finish(self) -> ExpectSurvivors {
        ExpectSurvivors {
            common: self.common,
            held: self.held,
        }
    }
}

/// Adds (`true`) or subtracts (`false`) each stream over `data` at `offset`, block by block.
pub(super) fn apply_streams(
    streams: &[(MaskPrg, bool)],
    offset: usize,
    data: &mut [u32],
    bits: u32,
) {
    for (i, block) in data.chunks_mut(MASK_BLOCK).enumerate() {
        let at = offset + i * MASK_BLOCK;
        for (prg, add) in streams {
            if *add {
                prg.add_to(at, block, bits);
            } else {
                prg.sub_from(at, block, bits);
            }
        }
    }
}

/// Waiting for the survivor set.
pub struct ExpectSurvivors {
    common: Common,
    held: BTreeMap<u32, SharePayload>,
}

impl ExpectSurvivors {
    /// Checks the survivor set and signs it.
    ///
    /// The set must be strictly ascending, within the cohort, contain this client, have at least
    /// `min_survivors` members, list no neighbour that did not share keys with this client, and
    /// keep at least t of this client's neighbours.
    pub fn handle_survivors(
        self,
        survivors: &[u32],
        signer: &dyn Signer,
    ) -> Result<(ExpectUnmaskRequest, ConsistencySignature), Error> {
        let c = &self.common;
        let p = &c.ctx.params;
        let refuse = |reason: String| Err(Error::InconsistentSurvivorSet { reason });
        if !survivors.windows(2).all(|w| w[0] < w[1]) {
            return refuse("survivor ids are not strictly ascending".into());
        }
        if survivors.last().is_some_and(|&s| s >= p.clients) {
            return refuse(format!("survivor ids exceed the cohort of {}", p.clients));
        }
        if survivors.binary_search(&c.me).is_err() {
            return refuse(format!("client {} is not in the set", c.me));
        }
        if survivors.len() < p.min_survivors as usize {
            return Err(Error::BelowThreshold {
                phase: Phase::MaskedInput,
                survivors: survivors.len(),
                needed: p.min_survivors as usize,
            });
        }
        let mut surviving_neighbours = 0;
        for n in &c.neighbours {
            if survivors.binary_search(n).is_ok() {
                if !self.held.contains_key(n) {
                    return refuse(format!("neighbour {n} survived but never shared keys"));
                }
                surviving_neighbours += 1;
            }
        }
        if surviving_neighbours < c.threshold() {
            return Err(Error::BelowThreshold {
                phase: Phase::MaskedInput,
                survivors: surviving_neighbours,
                needed: c.threshold(),
            });
        }
        let message = survivors_message(
            &c.ctx.federation,
            c.ctx.round,
            &c.ctx.offer_digest,
            survivors,
        );
        let signature = ConsistencySignature {
            client: c.me,
            signature: signer.sign(&message),
            certificate_der: signer.certificate_der(),
        };
        let state = ExpectUnmaskRequest {
            common: self.common,
            held: self.held,
            survivors: survivors.iter().copied().collect(),
            message,
        };
        Ok((state, signature))
    }
}

/// Waiting for the other survivors' signatures; answers exactly once.
pub struct ExpectUnmaskRequest {
    common: Common,
    held: BTreeMap<u32, SharePayload>,
    survivors: BTreeSet<u32>,
    message: Vec<u8>,
}

impl ExpectUnmaskRequest {
    /// Checks that at least `min_survivors` distinct survivors signed the very set this client
    /// signed, then reveals, for each neighbour that shared with it, the self-mask-seed share if
    /// the neighbour survived and the mask-key share if it did not — never both.
    pub fn handle_unmask_request(
        self,
        signatures: Vec<ConsistencySignature>,
        auth: &dyn PeerAuthenticator,
    ) -> Result<UnmaskShares, Error> {
        let c = &self.common;
        let mut signers = BTreeSet::new();
        for sig in &signatures {
            if !self.survivors.contains(&sig.client) {
                return Err(Error::InconsistentSurvivorSet {
                    reason: format!("client {} signed but is not a survivor", sig.client),
                });
            }
            if !signers.insert(sig.client) {
                return Err(Error::DuplicateMessage { client: sig.client });
            }
            verify_signature(
                auth,
                sig.client,
                &sig.certificate_der,
                &self.message,
                &sig.signature,
            )?;
        }
        let needed = c.ctx.params.min_survivors as usize;
        if signers.len() < needed {
            return Err(Error::BelowThreshold {
                phase: Phase::Consistency,
                survivors: signers.len(),
                needed,
            });
        }
        let shares = self
            .held
            .iter()
            .map(|(&owner, payload)| {
                let (kind, share) = if self.survivors.contains(&owner) {
                    (ShareKind::SelfMaskSeed, &payload.self_mask_seed)
                } else {
                    (ShareKind::MaskKey, &payload.mask_key)
                };
                RevealedShare {
                    owner,
                    kind,
                    share: share.to_bytes().to_vec(),
                }
            })
            .collect();
        Ok(UnmaskShares {
            client: c.me,
            shares,
        })
    }
}

macro_rules! opaque_debug {
    ($($t:ty),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // Holds secret keys and shares: show only who and where.
                f.debug_struct(stringify!($t))
                    .field("federation", &self.common.ctx.federation)
                    .field("round", &self.common.ctx.round)
                    .field("client", &self.common.me)
                    .finish_non_exhaustive()
            }
        }
    )*};
}
opaque_debug!(
    ExpectPeerKeys,
    ExpectForwardedShares,
    Masker,
    ExpectSurvivors,
    ExpectUnmaskRequest
);
