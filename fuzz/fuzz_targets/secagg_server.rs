//! Drives `ServerRound` with honest clients' messages mixed with replayed, re-labelled,
//! corrupted and forged ones, in any order.
//!
//! Properties:
//! * no input makes the server (or an honest client) panic;
//! * every phase's output respects the protocol's invariants (neighbours only, right
//!   addressee, sorted survivor set, enough distinct signers);
//! * while the server has accepted nothing but honest messages, it accepts every honest message
//!   delivered in its phase, refuses a verbatim replay, and a successful `finish` returns exactly
//!   the sum mod 2^b of the inputs of the clients whose upload it accepted.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quorum_crypto::prg::low_bits_mask;
use quorum_crypto::secagg::{
    Advertisement, ClientRound, ConsistencySignature, EncryptedShare, Error, ExpectForwardedShares,
    ExpectPeerKeys, ExpectSurvivors, ExpectUnmaskRequest, Phase, RevealedShare, RoundContext,
    ServerRound, ShareKind, UnmaskShares,
};
use quorum_crypto::share_crypto::CIPHERTEXT_LEN;
use quorum_fuzz::{Id, ParamChoice, TrivialAuth, TrivialSigner, rng};
use rand_chacha::ChaCha8Rng;

/// Operations beyond this many are ignored, so one input stays fast.
const MAX_OPS: usize = 48;

#[derive(Arbitrary, Debug)]
struct Input {
    params: ParamChoice,
    /// Seeds the honest inputs and where each honest client splits its masking.
    seed: u32,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Honest client `n % clients` takes its next step if the server's phase allows it.
    Honest(u8),
    /// Every honest client takes its next step.
    HonestAll,
    /// Closes the server's current phase (`finish` in the unmask phase).
    Close,
    /// Closes a given phase, whatever phase the server is in.
    CloseAdvertise,
    CloseShareKeys,
    CloseMaskedInput,
    CloseConsistency,
    Finish,
    /// Resends an honest client's last message, optionally under another identity and with one
    /// byte changed.
    Replay {
        client: u8,
        claim: Option<Id>,
        flip: Option<(u16, u8)>,
    },
    Advertise {
        client: Id,
        share_public_key: [u8; 32],
        mask_public_key: [u8; 32],
        signature: Vec<u8>,
    },
    ShareKeys {
        from: Id,
        shares: Vec<ForgedShare>,
    },
    MaskedInput {
        client: Id,
        values: Values,
    },
    Consistency {
        client: Id,
        signature: Vec<u8>,
    },
    Unmask {
        client: Id,
        shares: Vec<ForgedReveal>,
    },
}

#[derive(Arbitrary, Debug)]
struct ForgedShare {
    sender: Id,
    receiver: Id,
    ciphertext: Ciphertext,
}

#[derive(Arbitrary, Debug)]
enum Ciphertext {
    Raw(Vec<u8>),
    /// A ciphertext of the expected length, every byte this value.
    Full(u8),
}

#[derive(Arbitrary, Debug)]
struct ForgedReveal {
    owner: Id,
    mask_key: bool,
    share: ShareBytes,
}

#[derive(Arbitrary, Debug)]
enum ShareBytes {
    Raw(Vec<u8>),
    /// A well-formed 33-byte share `x ‖ y`.
    Point {
        x: u8,
        y: [u8; 32],
    },
}

#[derive(Arbitrary, Debug)]
enum Values {
    Raw(Vec<u32>),
    /// A vector of the round's length, every element this value.
    Fill(u32),
}

/// What an honest client sent last.
#[derive(Clone)]
enum Sent {
    Advert(Advertisement),
    Shares(Vec<EncryptedShare>),
    Masked(Vec<u32>),
    Signature(ConsistencySignature),
    Unmask(UnmaskShares),
}

enum State {
    PeerKeys(ExpectPeerKeys),
    Forwarded(ExpectForwardedShares),
    Survivors(ExpectSurvivors),
    Unmask(ExpectUnmaskRequest),
    Spent,
}

struct Honest {
    input: Vec<u32>,
    /// Where masking is split into two chunks (chunking must not change the result).
    split: usize,
    advertisement: Advertisement,
    state: State,
    sent: Option<Sent>,
}

struct Harness {
    ctx: RoundContext,
    server: Option<ServerRound>,
    clients: Vec<Honest>,
    peer_adverts: BTreeMap<u32, Vec<Advertisement>>,
    inbox: BTreeMap<u32, Vec<EncryptedShare>>,
    survivors: Vec<u32>,
    signatures: Vec<ConsistencySignature>,
    /// Clients whose honest upload the server accepted.
    uploaded: BTreeSet<u32>,
    /// The server has accepted a message that no honest client sent as it stands.
    tainted: bool,
    rng: ChaCha8Rng,
}

impl Harness {
    fn new(input: &Input) -> Self {
        let ctx = input.params.context();
        let server = ServerRound::new(ctx.clone()).expect("ParamChoice gives valid parameters");
        let mut rng = rng(u64::from(input.seed));
        let (n, dim) = (ctx.params.clients, ctx.params.dim);
        let mask = low_bits_mask(ctx.params.bits);
        let clients = (0..n)
            .map(|me| {
                let (state, advertisement) =
                    ClientRound::start(ctx.clone(), me, &TrivialSigner { client: me }, &mut rng)
                        .expect("valid parameters and index");
                let values = (0..dim as u32)
                    .map(|j| (input.seed.wrapping_mul(me + 1) ^ j.wrapping_mul(0x9e37_79b9)) & mask)
                    .collect();
                Honest {
                    input: values,
                    split: (input.seed as usize + me as usize) % (dim + 1),
                    advertisement,
                    state: State::PeerKeys(state),
                    sent: None,
                }
            })
            .collect();
        Self {
            ctx,
            server: Some(server),
            clients,
            peer_adverts: BTreeMap::new(),
            inbox: BTreeMap::new(),
            survivors: Vec::new(),
            signatures: Vec::new(),
            uploaded: BTreeSet::new(),
            tainted: false,
            rng,
        }
    }

    fn run(&mut self, op: Op) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        match op {
            Op::Honest(i) => self.honest(usize::from(i) % self.clients.len()),
            Op::HonestAll => (0..self.clients.len()).for_each(|i| self.honest(i)),
            Op::Close => {
                let phase = server.phase();
                self.close(phase);
            }
            Op::CloseAdvertise => self.close(Phase::Advertise),
            Op::CloseShareKeys => self.close(Phase::ShareKeys),
            Op::CloseMaskedInput => self.close(Phase::MaskedInput),
            Op::CloseConsistency => self.close(Phase::Consistency),
            Op::Finish => self.close(Phase::Unmask),
            Op::Replay {
                client,
                claim,
                flip,
            } => {
                let i = usize::from(client) % self.clients.len();
                let Some(mut msg) = self.clients[i].sent.clone() else {
                    return;
                };
                let verbatim = claim.is_none() && flip.is_none();
                let claimed = claim.map_or(i as u32, Id::get);
                relabel(&mut msg, claimed);
                if let Some((at, xor)) = flip {
                    corrupt(&mut msg, usize::from(at), xor);
                }
                let accepted = deliver(server, claimed, msg).is_ok();
                assert!(
                    !(accepted && verbatim && !self.tainted),
                    "server accepted a verbatim replay of client {i}'s message"
                );
                self.tainted |= accepted;
            }
            Op::Advertise {
                client,
                share_public_key,
                mask_public_key,
                signature,
            } => {
                let adv = Advertisement {
                    client: client.get(),
                    share_public_key,
                    mask_public_key,
                    signature,
                    certificate_der: Vec::new(),
                };
                self.tainted |= server.handle_advertisement(adv, &TrivialAuth).is_ok();
            }
            Op::ShareKeys { from, shares } => {
                let shares = shares
                    .into_iter()
                    .map(|s| EncryptedShare {
                        sender: s.sender.get(),
                        receiver: s.receiver.get(),
                        ciphertext: match s.ciphertext {
                            Ciphertext::Raw(bytes) => bytes,
                            Ciphertext::Full(b) => vec![b; CIPHERTEXT_LEN],
                        },
                    })
                    .collect();
                self.tainted |= server.handle_share_keys(from.get(), shares).is_ok();
            }
            Op::MaskedInput { client, values } => {
                let values = match values {
                    Values::Raw(v) => v,
                    Values::Fill(v) => vec![v; self.ctx.params.dim],
                };
                self.tainted |= server.add_masked_input(client.get(), &values).is_ok();
            }
            Op::Consistency { client, signature } => {
                let sig = ConsistencySignature {
                    client: client.get(),
                    signature,
                    certificate_der: Vec::new(),
                };
                self.tainted |= server.handle_consistency(sig, &TrivialAuth).is_ok();
            }
            Op::Unmask { client, shares } => {
                let shares = shares
                    .into_iter()
                    .map(|r| RevealedShare {
                        owner: r.owner.get(),
                        kind: if r.mask_key {
                            ShareKind::MaskKey
                        } else {
                            ShareKind::SelfMaskSeed
                        },
                        share: match r.share {
                            ShareBytes::Raw(bytes) => bytes,
                            ShareBytes::Point { x, y } => [&[x][..], &y].concat(),
                        },
                    })
                    .collect();
                let msg = UnmaskShares {
                    client: client.get(),
                    shares,
                };
                self.tainted |= server.handle_unmask(msg).is_ok();
            }
        }
    }

    /// Client `i`'s next honest step, if the server's phase calls for one.
    fn honest(&mut self, i: usize) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let me = i as u32;
        let client = &mut self.clients[i];
        let state = std::mem::replace(&mut client.state, State::Spent);
        let (next, sent) = match (server.phase(), state) {
            (Phase::Advertise, state @ State::PeerKeys(_)) if client.sent.is_none() => {
                (Some(state), Sent::Advert(client.advertisement.clone()))
            }
            (Phase::ShareKeys, State::PeerKeys(state)) if self.peer_adverts.contains_key(&me) => {
                let peers = self.peer_adverts[&me].clone();
                match state.handle_peer_keys(peers, &TrivialAuth, &mut self.rng) {
                    Ok((next, shares)) => (Some(State::Forwarded(next)), Sent::Shares(shares)),
                    Err(_) => return,
                }
            }
            (Phase::MaskedInput, State::Forwarded(state)) if self.inbox.contains_key(&me) => {
                let Ok(masker) = state.handle_forwarded_shares(self.inbox[&me].clone()) else {
                    return;
                };
                let mut values = client.input.clone();
                let (head, tail) = values.split_at_mut(client.split);
                masker.mask(0, head);
                masker.mask(client.split, tail);
                (
                    Some(State::Survivors(masker.finish())),
                    Sent::Masked(values),
                )
            }
            (Phase::Consistency, State::Survivors(state)) => {
                let signer = TrivialSigner { client: me };
                let Ok((next, sig)) = state.handle_survivors(&self.survivors, &signer) else {
                    return;
                };
                (Some(State::Unmask(next)), Sent::Signature(sig))
            }
            (Phase::Unmask, State::Unmask(state)) => {
                let Ok(reveal) = state.handle_unmask_request(self.signatures.clone(), &TrivialAuth)
                else {
                    return;
                };
                (None, Sent::Unmask(reveal))
            }
            (_, state) => {
                client.state = state;
                return;
            }
        };
        client.state = next.unwrap_or(State::Spent);
        let masked = matches!(sent, Sent::Masked(_));
        let result = deliver(server, me, sent.clone());
        client.sent = Some(sent);
        if let Err(e) = &result {
            assert!(
                self.tainted,
                "server refused honest client {me}'s message in an untainted round: {e}"
            );
        } else if masked {
            self.uploaded.insert(me);
        }
    }

    fn close(&mut self, phase: Phase) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let p = &self.ctx.params;
        match phase {
            Phase::Advertise => {
                if let Ok(out) = server.close_advertise() {
                    for (client, peers) in &out {
                        let neighbours = self.ctx.neighbours(*client);
                        for a in peers {
                            assert!(neighbours.contains(&a.client), "non-neighbour advert");
                        }
                    }
                    self.peer_adverts = out.into_iter().collect();
                }
            }
            Phase::ShareKeys => {
                if let Ok(out) = server.close_share_keys() {
                    for (client, shares) in &out {
                        assert!(shares.iter().all(|s| s.receiver == *client), "misaddressed");
                    }
                    self.inbox = out.into_iter().collect();
                }
            }
            Phase::MaskedInput => {
                if let Ok(survivors) = server.close_masked_input() {
                    assert!(
                        survivors.windows(2).all(|w| w[0] < w[1]),
                        "unsorted survivors"
                    );
                    assert!(survivors.len() >= p.min_survivors as usize);
                    assert!(survivors.iter().all(|&s| s < p.clients));
                    self.survivors = survivors;
                }
            }
            Phase::Consistency => {
                if let Ok(signatures) = server.close_consistency() {
                    let signers: BTreeSet<u32> = signatures.iter().map(|s| s.client).collect();
                    assert_eq!(signers.len(), signatures.len(), "repeated signer");
                    assert!(signers.len() >= p.min_survivors as usize);
                    assert!(signers.iter().all(|s| self.survivors.contains(s)));
                    self.signatures = signatures;
                }
            }
            Phase::Unmask => {
                // `finish` consumes the server whatever it returns.
                let Some(server) = self.server.take() else {
                    return;
                };
                if let Ok(aggregate) = server.finish()
                    && !self.tainted
                {
                    self.check_sum(&aggregate.sum, &aggregate.survivors);
                }
            }
        }
    }

    fn check_sum(&self, sum: &[u32], survivors: &[u32]) {
        let expected: Vec<u32> = self.uploaded.iter().copied().collect();
        assert_eq!(
            survivors, expected,
            "survivors differ from accepted uploads"
        );
        let mask = low_bits_mask(self.ctx.params.bits);
        let mut want = vec![0u32; self.ctx.params.dim];
        for &s in survivors {
            for (w, v) in want.iter_mut().zip(&self.clients[s as usize].input) {
                *w = w.wrapping_add(*v) & mask;
            }
        }
        assert_eq!(sum, want, "unmasked sum is wrong");
    }
}

/// Puts `claimed` in the message's identity field.
fn relabel(msg: &mut Sent, claimed: u32) {
    match msg {
        Sent::Advert(a) => a.client = claimed,
        Sent::Shares(_) | Sent::Masked(_) => {} // the identity travels beside these
        Sent::Signature(s) => s.client = claimed,
        Sent::Unmask(u) => u.client = claimed,
    }
}

/// Flips bits of one byte (or element) of the message's payload.
fn corrupt(msg: &mut Sent, at: usize, xor: u8) {
    match msg {
        Sent::Advert(a) => a.mask_public_key[at % 32] ^= xor,
        Sent::Shares(shares) => {
            let count = shares.len().max(1);
            if let Some(s) = shares.get_mut(at % count) {
                let len = s.ciphertext.len().max(1);
                if let Some(b) = s.ciphertext.get_mut(at / count % len) {
                    *b ^= xor;
                }
            }
        }
        Sent::Masked(values) => {
            let len = values.len().max(1);
            if let Some(v) = values.get_mut(at % len) {
                *v ^= u32::from(xor);
            }
        }
        Sent::Signature(s) => s.signature.push(xor),
        Sent::Unmask(u) => {
            let len = u.shares.len().max(1);
            if let Some(r) = u.shares.get_mut(at % len) {
                let bytes = r.share.len().max(1);
                if let Some(b) = r.share.get_mut(at / len % bytes) {
                    *b ^= xor;
                }
            }
        }
    }
}

fn deliver(server: &mut ServerRound, from: u32, msg: Sent) -> Result<(), Error> {
    match msg {
        Sent::Advert(a) => server.handle_advertisement(a, &TrivialAuth),
        Sent::Shares(shares) => server.handle_share_keys(from, shares),
        Sent::Masked(values) => server.add_masked_input(from, &values),
        Sent::Signature(sig) => server.handle_consistency(sig, &TrivialAuth),
        Sent::Unmask(reveal) => server.handle_unmask(reveal),
    }
}

fuzz_target!(|input: Input| {
    let mut harness = Harness::new(&input);
    for op in input.ops.into_iter().take(MAX_OPS) {
        harness.run(op);
    }
});
