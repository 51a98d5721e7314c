//! Walks one client through a round's typestates, feeding each handler a fuzzer-built mix of
//! honest peers' messages and replayed, corrupted, misaddressed and forged ones.
//!
//! Properties: no input makes the client panic, and whatever it accepts, its outputs keep the
//! protocol's promises: one share per verified neighbour, masks only for neighbours whose shares
//! it holds (and independent of chunking), a signature only for a well-formed survivor set that
//! contains it, and an unmask answer that reveals exactly one share per holder-owner pair, of
//! the kind the survivor set dictates, at its own x-coordinate.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quorum_crypto::secagg::{
    Advertisement, ClientRound, ConsistencySignature, EncryptedShare, Error, ExpectPeerKeys,
    RoundContext, ShareKind, Signer,
};
use quorum_crypto::shamir::SHARE_LEN;
use quorum_crypto::share_crypto::CIPHERTEXT_LEN;
use quorum_fuzz::{Id, ParamChoice, TrivialAuth, TrivialSigner, rng};
use rand_chacha::ChaCha8Rng;

#[derive(Arbitrary, Debug)]
struct Input {
    params: ParamChoice,
    me: Id,
    seed: u32,
    peers: Vec<PeerItem>,
    forwarded: Vec<ForwardedItem>,
    survivors: SurvivorChoice,
    signatures: Vec<SignatureItem>,
}

#[derive(Arbitrary, Debug)]
enum PeerItem {
    /// Every neighbour's honest advertisement.
    AllHonest,
    /// Client `n % clients`'s honest advertisement.
    Honest(u8),
    /// Client `of`'s honest advertisement, claiming to be from `as_client`.
    Relabelled { of: u8, as_client: Id },
    Forged {
        client: Id,
        share_public_key: [u8; 32],
        mask_public_key: [u8; 32],
        signature: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum ForwardedItem {
    /// Every neighbour's honest share for this client.
    AllHonest,
    Honest(u8),
    /// An honest share with one ciphertext byte changed.
    Corrupted {
        from: u8,
        at: u8,
        xor: u8,
    },
    /// An honest share with other sender and receiver labels.
    Relabelled {
        from: u8,
        sender: Id,
        receiver: Id,
    },
    Forged {
        sender: Id,
        receiver: Id,
        ciphertext: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum SurvivorChoice {
    /// Every client except neighbours this client holds no shares of.
    Honest,
    /// The honest set filtered by a bit mask over client indices.
    Subset(u8),
    Raw(Vec<Id>),
}

#[derive(Arbitrary, Debug)]
enum SignatureItem {
    /// A signature from every member of the survivor set.
    AllHonest,
    Honest(u8),
    Forged {
        client: Id,
        signature: Vec<u8>,
    },
}

/// The other clients, playing honestly around the client under test.
struct Peers {
    ctx: RoundContext,
    me: u32,
    my_advertisement: Advertisement,
    advertisements: Vec<Advertisement>,
    states: Vec<Option<ExpectPeerKeys>>,
    /// Each peer's share for the client under test, computed on first use.
    shares: BTreeMap<u32, Option<EncryptedShare>>,
    rng: ChaCha8Rng,
}

impl Peers {
    fn new(ctx: &RoundContext, me: u32, my_advertisement: Advertisement, rng: ChaCha8Rng) -> Self {
        let mut rng = rng;
        let (states, advertisements) = (0..ctx.params.clients)
            .map(|c| {
                let (state, adv) =
                    ClientRound::start(ctx.clone(), c, &TrivialSigner { client: c }, &mut rng)
                        .expect("valid parameters and index");
                (Some(state), adv)
            })
            .unzip();
        Self {
            ctx: ctx.clone(),
            me,
            my_advertisement,
            advertisements,
            states,
            shares: BTreeMap::new(),
            rng,
        }
    }

    fn index(&self, n: u8) -> u32 {
        u32::from(n) % self.ctx.params.clients
    }

    /// Peer `c`'s honest share for the client under test, if `c` is its neighbour.
    fn share(&mut self, c: u32) -> Option<EncryptedShare> {
        if let Some(share) = self.shares.get(&c) {
            return share.clone();
        }
        let share = self.states[c as usize].take().and_then(|state| {
            let peers = self
                .ctx
                .neighbours(c)
                .into_iter()
                .map(|v| {
                    if v == self.me {
                        self.my_advertisement.clone()
                    } else {
                        self.advertisements[v as usize].clone()
                    }
                })
                .collect();
            let (_, shares) = state
                .handle_peer_keys(peers, &TrivialAuth, &mut self.rng)
                .expect("honest peers accept honest advertisements");
            shares.into_iter().find(|s| s.receiver == self.me)
        });
        self.shares.insert(c, share.clone());
        share
    }
}

fn run(input: Input) {
    let ctx = input.params.context();
    let me = match input.me {
        Id::Small(v) => u32::from(v) % ctx.params.clients,
        Id::Raw(v) => v,
    };
    let mut rng = rng(u64::from(input.seed));
    let started = ClientRound::start(ctx.clone(), me, &TrivialSigner { client: me }, &mut rng);
    let (state, my_advertisement) = match started {
        Ok(started) => started,
        Err(Error::UnknownClient { .. }) if me >= ctx.params.clients => return,
        Err(e) => panic!("start refused valid parameters: {e}"),
    };
    let peer_rng = quorum_fuzz::rng(u64::from(input.seed) | 1 << 40);
    let mut peers = Peers::new(&ctx, me, my_advertisement, peer_rng);
    let neighbours = ctx.neighbours(me);
    let threshold = ctx.params.threshold as usize;

    // Peer keys.
    let mut adverts = Vec::new();
    for item in input.peers {
        match item {
            PeerItem::AllHonest => adverts.extend(
                neighbours
                    .iter()
                    .map(|&v| peers.advertisements[v as usize].clone()),
            ),
            PeerItem::Honest(n) => {
                adverts.push(peers.advertisements[peers.index(n) as usize].clone());
            }
            PeerItem::Relabelled { of, as_client } => {
                let mut adv = peers.advertisements[peers.index(of) as usize].clone();
                adv.client = as_client.get();
                adverts.push(adv);
            }
            PeerItem::Forged {
                client,
                share_public_key,
                mask_public_key,
                signature,
            } => adverts.push(Advertisement {
                client: client.get(),
                share_public_key,
                mask_public_key,
                signature,
                certificate_der: Vec::new(),
            }),
        }
    }
    let Ok((state, my_shares)) = state.handle_peer_keys(adverts, &TrivialAuth, &mut rng) else {
        return;
    };
    let receivers: BTreeSet<u32> = my_shares.iter().map(|s| s.receiver).collect();
    assert_eq!(
        receivers.len(),
        my_shares.len(),
        "two shares for one neighbour"
    );
    assert!(
        receivers.len() >= threshold,
        "shared with fewer than t neighbours"
    );
    for s in &my_shares {
        assert_eq!(s.sender, me);
        assert!(
            neighbours.binary_search(&s.receiver).is_ok(),
            "share for a stranger"
        );
        assert_eq!(s.ciphertext.len(), CIPHERTEXT_LEN);
    }

    // Forwarded shares.
    let mut forwarded = Vec::new();
    for item in input.forwarded {
        match item {
            ForwardedItem::AllHonest => {
                forwarded.extend(neighbours.iter().filter_map(|&v| peers.share(v)));
            }
            ForwardedItem::Honest(n) => {
                let c = peers.index(n);
                forwarded.extend(peers.share(c));
            }
            ForwardedItem::Corrupted { from, at, xor } => {
                let c = peers.index(from);
                if let Some(mut share) = peers.share(c) {
                    let len = share.ciphertext.len();
                    share.ciphertext[usize::from(at) % len] ^= xor;
                    forwarded.push(share);
                }
            }
            ForwardedItem::Relabelled {
                from,
                sender,
                receiver,
            } => {
                let c = peers.index(from);
                if let Some(mut share) = peers.share(c) {
                    share.sender = sender.get();
                    share.receiver = receiver.get();
                    forwarded.push(share);
                }
            }
            ForwardedItem::Forged {
                sender,
                receiver,
                ciphertext,
            } => forwarded.push(EncryptedShare {
                sender: sender.get(),
                receiver: receiver.get(),
                ciphertext,
            }),
        }
    }
    let senders: BTreeSet<u32> = forwarded.iter().map(|s| s.sender).collect();
    let Ok(masker) = state.handle_forwarded_shares(forwarded) else {
        return;
    };
    let held: BTreeSet<u32> = masker.pairwise_neighbours().into_iter().collect();
    assert_eq!(held, senders, "masks do not match the shares held");
    assert!(held.len() >= threshold);
    let dim = masker.dim();
    let mut whole = vec![0u32; dim];
    masker.mask(0, &mut whole);
    let mut chunked = vec![0u32; dim];
    let split = input.seed as usize % (dim + 1);
    let (head, tail) = chunked.split_at_mut(split);
    masker.mask(split, tail);
    masker.mask(0, head);
    assert_eq!(whole, chunked, "masking depends on chunking");
    let limit = quorum_crypto::prg::low_bits_mask(masker.bits());
    assert!(whole.iter().all(|&v| v & !limit == 0), "mask left Z_(2^b)");
    let state = masker.finish();

    // Survivor set.
    let honest: Vec<u32> = (0..ctx.params.clients)
        .filter(|c| held.contains(c) || neighbours.binary_search(c).is_err())
        .collect();
    let survivors: Vec<u32> = match input.survivors {
        SurvivorChoice::Honest => honest,
        SurvivorChoice::Subset(bits) => honest
            .into_iter()
            .filter(|&c| bits >> (c % 8) & 1 == 1)
            .collect(),
        SurvivorChoice::Raw(ids) => ids.into_iter().map(Id::get).collect(),
    };
    let signer = TrivialSigner { client: me };
    let Ok((state, signature)) = state.handle_survivors(&survivors, &signer) else {
        return;
    };
    assert_eq!(signature.client, me);
    assert!(
        survivors.windows(2).all(|w| w[0] < w[1]),
        "signed an unsorted set"
    );
    assert!(
        survivors.binary_search(&me).is_ok(),
        "signed a set without itself"
    );
    assert!(survivors.len() >= ctx.params.min_survivors as usize);

    // Unmask request.
    let honest_signature = |c: u32| ConsistencySignature {
        client: c,
        signature: TrivialSigner { client: c }.sign(b"survivors"),
        certificate_der: TrivialSigner { client: c }.certificate_der(),
    };
    let mut signatures = Vec::new();
    for item in input.signatures {
        match item {
            SignatureItem::AllHonest => signatures.extend(survivors.iter().map(|&c| {
                if c == me {
                    signature.clone()
                } else {
                    honest_signature(c)
                }
            })),
            SignatureItem::Honest(n) => signatures.push(honest_signature(peers.index(n))),
            SignatureItem::Forged { client, signature } => signatures.push(ConsistencySignature {
                client: client.get(),
                signature,
                certificate_der: Vec::new(),
            }),
        }
    }
    let signers: BTreeSet<u32> = signatures.iter().map(|s| s.client).collect();
    let Ok(reveal) = state.handle_unmask_request(signatures, &TrivialAuth) else {
        return;
    };
    assert!(signers.len() >= ctx.params.min_survivors as usize);
    assert!(signers.iter().all(|s| survivors.contains(s)));
    assert_eq!(reveal.client, me);
    let owners: BTreeSet<u32> = reveal.shares.iter().map(|r| r.owner).collect();
    assert_eq!(owners.len(), reveal.shares.len(), "two shares of one owner");
    assert_eq!(owners, held, "revealed for other owners than those held");
    let graph = ctx.graph();
    for r in &reveal.shares {
        let survived = survivors.binary_search(&r.owner).is_ok();
        let want = if survived {
            ShareKind::SelfMaskSeed
        } else {
            ShareKind::MaskKey
        };
        assert_eq!(r.kind, want, "wrong secret revealed for owner {}", r.owner);
        assert_eq!(r.share.len(), SHARE_LEN);
        assert_eq!(Some(r.share[0]), graph.x_coordinate(r.owner, me));
    }
}

fuzz_target!(|input: Input| run(input));
