//! The server side: one struct with an internal phase, so a driver can feed it messages from
//! many clients as they arrive. Every `handle_*` refuses messages of another phase.

use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::{PublicKey, StaticSecret};

use super::client::apply_streams;
use super::messages::{
    Advertisement, ConsistencySignature, EncryptedShare, PeerAuthenticator, ShareKind,
    UnmaskShares, survivors_message, verify_advertisement, verify_signature,
};
use super::params::{Graph, RoundContext};
use super::{Error, Phase};
use crate::prg::{MaskPrg, default_threads, low_bits_mask, mask_parallel};
use crate::shamir::{self, Share};
use crate::share_crypto::{self, CIPHERTEXT_LEN};

/// The unmasked result of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregate {
    /// Sum mod 2^b of the survivors' inputs.
    pub sum: Vec<u32>,
    /// The clients whose inputs are in the sum, ascending.
    pub survivors: Vec<u32>,
}

/// The server's view of one round.
pub struct ServerRound {
    ctx: RoundContext,
    graph: Graph,
    phase: Phase,
    /// U1: clients that advertised keys.
    adverts: BTreeMap<u32, Advertisement>,
    /// Receivers each advertiser must send a share to: its neighbours in U1.
    expected_receivers: BTreeMap<u32, Vec<u32>>,
    /// U2: clients that sent their shares, with those shares.
    shares: BTreeMap<u32, Vec<EncryptedShare>>,
    /// Running sum mod 2^b of masked inputs.
    sum: Vec<u32>,
    /// U3: clients whose masked input is in the sum.
    uploaded: BTreeSet<u32>,
    /// Clients whose masked input is partly in the sum, with the elements added so far.
    partial: BTreeMap<u32, usize>,
    survivors: Vec<u32>,
    survivors_message: Vec<u8>,
    /// U4: valid signatures over the survivor set.
    signatures: BTreeMap<u32, ConsistencySignature>,
    /// U5: clients that revealed shares.
    unmasked: BTreeSet<u32>,
    /// Revealed shares by owner; their kind follows from whether the owner survived.
    revealed: BTreeMap<u32, Vec<Share>>,
}

impl std::fmt::Debug for ServerRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerRound")
            .field("federation", &self.ctx.federation)
            .field("round", &self.ctx.round)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl ServerRound {
    /// A round in the advertise phase.
    pub fn new(ctx: RoundContext) -> Result<Self, Error> {
        ctx.params.validate()?;
        Ok(Self {
            graph: ctx.graph(),
            ctx,
            phase: Phase::Advertise,
            adverts: BTreeMap::new(),
            expected_receivers: BTreeMap::new(),
            shares: BTreeMap::new(),
            sum: Vec::new(),
            uploaded: BTreeSet::new(),
            partial: BTreeMap::new(),
            survivors: Vec::new(),
            survivors_message: Vec::new(),
            signatures: BTreeMap::new(),
            unmasked: BTreeSet::new(),
            revealed: BTreeMap::new(),
        })
    }

    /// The phase the round is in.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The round's context.
    pub fn context(&self) -> &RoundContext {
        &self.ctx
    }

    fn expect(&self, got: Phase) -> Result<(), Error> {
        if self.phase == got {
            Ok(())
        } else {
            Err(Error::WrongPhase {
                expected: self.phase,
                got,
            })
        }
    }

    fn enough(&self, phase: Phase, survivors: usize) -> Result<(), Error> {
        let needed = self.ctx.params.min_survivors as usize;
        if survivors < needed {
            return Err(Error::BelowThreshold {
                phase,
                survivors,
                needed,
            });
        }
        Ok(())
    }

    /// Records a client's advertisement after checking it as its neighbours will: signed for
    /// this federation and round by the client's certificate key, with usable X25519 keys.
    ///
    /// The neighbours check again (they must not trust the server), and each refuses the whole
    /// set it is shown over one bad entry; so without this check one enrolled site sending a
    /// bad advertisement would abort the round for everyone. Refused here, it is a dropout.
    pub fn handle_advertisement(
        &mut self,
        adv: Advertisement,
        auth: &dyn PeerAuthenticator,
    ) -> Result<(), Error> {
        self.expect(Phase::Advertise)?;
        if adv.client >= self.ctx.params.clients {
            return Err(Error::UnknownClient {
                client: adv.client,
                clients: self.ctx.params.clients,
            });
        }
        if self.adverts.contains_key(&adv.client) {
            return Err(Error::DuplicateMessage { client: adv.client });
        }
        verify_advertisement(&self.ctx, &adv, auth)?;
        for key in [&adv.share_public_key, &adv.mask_public_key] {
            share_crypto::check_public_key(key).map_err(|source| Error::BadPeerKey {
                client: adv.client,
                source,
            })?;
        }
        self.adverts.insert(adv.client, adv);
        Ok(())
    }

    /// Ends the advertise phase: for each advertiser, its advertising neighbours'
    /// advertisements. Fails with [`Error::BelowThreshold`] when fewer than `min_survivors`
    /// clients advertised.
    pub fn close_advertise(&mut self) -> Result<Vec<(u32, Vec<Advertisement>)>, Error> {
        self.expect(Phase::Advertise)?;
        self.enough(Phase::Advertise, self.adverts.len())?;
        let mut out = Vec::with_capacity(self.adverts.len());
        let t = self.ctx.params.threshold as usize;
        for &client in self.adverts.keys() {
            let receivers: Vec<u32> = self
                .graph
                .neighbours(client)
                .into_iter()
                .filter(|n| self.adverts.contains_key(n))
                .collect();
            // A client left with fewer than t advertising neighbours cannot share its secrets
            // recoverably and would refuse the round; abort now rather than at the next deadline.
            if receivers.len() < t {
                return Err(Error::BelowThreshold {
                    phase: Phase::Advertise,
                    survivors: receivers.len(),
                    needed: t,
                });
            }
            out.push((
                client,
                receivers.iter().map(|n| self.adverts[n].clone()).collect(),
            ));
            self.expected_receivers.insert(client, receivers);
        }
        self.phase = Phase::ShareKeys;
        Ok(out)
    }

    /// Records the encrypted shares sent by client `from`: exactly one, of the right length, for
    /// each of its advertising neighbours, each naming `from` as sender.
    pub fn handle_share_keys(
        &mut self,
        from: u32,
        shares: Vec<EncryptedShare>,
    ) -> Result<(), Error> {
        self.expect(Phase::ShareKeys)?;
        let Some(receivers) = self.expected_receivers.get(&from) else {
            return Err(Error::NotAParticipant {
                client: from,
                phase: Phase::ShareKeys,
            });
        };
        if self.shares.contains_key(&from) {
            return Err(Error::DuplicateMessage { client: from });
        }
        let mut seen = BTreeSet::new();
        for share in &shares {
            if share.sender != from {
                return Err(Error::WrongSender {
                    from,
                    claimed: share.sender,
                });
            }
            if receivers.binary_search(&share.receiver).is_err() {
                return Err(Error::NotANeighbour {
                    client: from,
                    other: share.receiver,
                });
            }
            if !seen.insert(share.receiver) {
                return Err(Error::DuplicateMessage { client: from });
            }
            if share.ciphertext.len() != CIPHERTEXT_LEN {
                return Err(Error::WrongLength {
                    expected: CIPHERTEXT_LEN,
                    got: share.ciphertext.len(),
                });
            }
        }
        if let Some(&missing) = receivers.iter().find(|r| !seen.contains(r)) {
            return Err(Error::MissingShare {
                client: from,
                neighbour: missing,
            });
        }
        self.shares.insert(from, shares);
        Ok(())
    }

    /// Ends the share-keys phase: for each client that shared, the shares addressed to it by
    /// neighbours that also shared.
    pub fn close_share_keys(&mut self) -> Result<Vec<(u32, Vec<EncryptedShare>)>, Error> {
        self.expect(Phase::ShareKeys)?;
        self.enough(Phase::ShareKeys, self.shares.len())?;
        let mut inbox: BTreeMap<u32, Vec<EncryptedShare>> =
            self.shares.keys().map(|&c| (c, Vec::new())).collect();
        for sent in self.shares.values_mut() {
            for share in std::mem::take(sent) {
                if let Some(list) = inbox.get_mut(&share.receiver) {
                    list.push(share);
                }
            }
        }
        self.sum = vec![0; self.ctx.params.dim];
        self.phase = Phase::MaskedInput;
        Ok(inbox.into_iter().collect())
    }

    /// Adds a client's full masked vector into the running sum mod 2^b. Nothing is added when the
    /// vector is refused (wrong length, value ≥ 2^b, duplicate, client that did not share).
    pub fn add_masked_input(&mut self, client: u32, values: &[u32]) -> Result<(), Error> {
        if values.len() != self.sum.len() {
            self.expect(Phase::MaskedInput)?;
            return Err(Error::WrongLength {
                expected: self.sum.len(),
                got: values.len(),
            });
        }
        self.add_masked_input_part(client, 0, values).map(drop)
    }

    /// Adds `values`, the elements `offset..offset + values.len()` of a client's masked vector,
    /// into the running sum mod 2^b: a vector too large to hold whole, added as it is read.
    /// Parts come in order from offset 0; the vector counts as uploaded once its last element
    /// is in, and then this returns true. A refused part adds nothing, but the parts before it
    /// stay in the sum: a vector left partly added spoils the sum, and
    /// [`ServerRound::close_masked_input`] then refuses to go on.
    pub fn add_masked_input_part(
        &mut self,
        client: u32,
        offset: usize,
        values: &[u32],
    ) -> Result<bool, Error> {
        self.expect(Phase::MaskedInput)?;
        if !self.shares.contains_key(&client) {
            return Err(Error::NotAParticipant {
                client,
                phase: Phase::MaskedInput,
            });
        }
        if self.uploaded.contains(&client) {
            return Err(Error::DuplicateMessage { client });
        }
        let added = self.partial.get(&client).copied().unwrap_or(0);
        if offset != added {
            return Err(Error::PartOutOfOrder {
                client,
                offset,
                expected: added,
            });
        }
        let end = offset.saturating_add(values.len());
        if end > self.sum.len() {
            return Err(Error::WrongLength {
                expected: self.sum.len(),
                got: end,
            });
        }
        let bits = self.ctx.params.bits;
        let mask = low_bits_mask(bits);
        if values.iter().fold(0, |acc, v| acc | v) & !mask != 0 {
            return Err(Error::ValueOutOfRange { client, bits });
        }
        for (s, v) in self.sum[offset..end].iter_mut().zip(values) {
            *s = s.wrapping_add(*v) & mask;
        }
        if end < self.sum.len() {
            self.partial.insert(client, end);
            return Ok(false);
        }
        self.partial.remove(&client);
        self.uploaded.insert(client);
        Ok(true)
    }

    /// Ends the masked-input phase and returns the survivor set to send to every survivor.
    ///
    /// Fails with [`Error::BelowThreshold`] when fewer than `min_survivors` uploaded, or when a
    /// secret that must be rebuilt (a survivor's self-mask seed, or the mask key of a client that
    /// shared, dropped, and has surviving neighbours) has fewer than t surviving holders.
    pub fn close_masked_input(&mut self) -> Result<Vec<u32>, Error> {
        self.expect(Phase::MaskedInput)?;
        if let Some((&client, &added)) = self.partial.first_key_value() {
            return Err(Error::PartialInput {
                client,
                added,
                expected: self.sum.len(),
            });
        }
        self.enough(Phase::MaskedInput, self.uploaded.len())?;
        let t = self.ctx.params.threshold as usize;
        for &owner in self.shares.keys() {
            let holders = self
                .graph
                .neighbours(owner)
                .into_iter()
                .filter(|n| self.uploaded.contains(n))
                .count();
            let must_rebuild = self.uploaded.contains(&owner) || holders > 0;
            if must_rebuild && holders < t {
                return Err(Error::BelowThreshold {
                    phase: Phase::MaskedInput,
                    survivors: holders,
                    needed: t,
                });
            }
        }
        self.survivors = self.uploaded.iter().copied().collect();
        self.survivors_message = survivors_message(
            &self.ctx.federation,
            self.ctx.round,
            &self.ctx.offer_digest,
            &self.survivors,
        );
        self.phase = Phase::Consistency;
        Ok(self.survivors.clone())
    }

    /// Records a survivor's signature over the survivor set after checking it.
    pub fn handle_consistency(
        &mut self,
        sig: ConsistencySignature,
        auth: &dyn PeerAuthenticator,
    ) -> Result<(), Error> {
        self.expect(Phase::Consistency)?;
        if !self.uploaded.contains(&sig.client) {
            return Err(Error::NotAParticipant {
                client: sig.client,
                phase: Phase::Consistency,
            });
        }
        if self.signatures.contains_key(&sig.client) {
            return Err(Error::DuplicateMessage { client: sig.client });
        }
        verify_signature(
            auth,
            sig.client,
            &sig.certificate_der,
            &self.survivors_message,
            &sig.signature,
        )?;
        self.signatures.insert(sig.client, sig);
        Ok(())
    }

    /// Ends the consistency phase: the signatures to send to every signer.
    pub fn close_consistency(&mut self) -> Result<Vec<ConsistencySignature>, Error> {
        self.expect(Phase::Consistency)?;
        self.enough(Phase::Consistency, self.signatures.len())?;
        self.phase = Phase::Unmask;
        Ok(self.signatures.values().cloned().collect())
    }

    /// Records a signer's revealed shares. The whole message is refused if any share is for a
    /// non-neighbour or a client that did not share, is repeated, is of the kind the owner's
    /// status forbids, or does not sit at the revealer's x-coordinate.
    pub fn handle_unmask(&mut self, msg: UnmaskShares) -> Result<(), Error> {
        self.expect(Phase::Unmask)?;
        let client = msg.client;
        if !self.signatures.contains_key(&client) {
            return Err(Error::NotAParticipant {
                client,
                phase: Phase::Unmask,
            });
        }
        if self.unmasked.contains(&client) {
            return Err(Error::DuplicateMessage { client });
        }
        let mut accepted = BTreeMap::new();
        for revealed in msg.shares {
            let owner = revealed.owner;
            let x = self.graph.x_coordinate(owner, client);
            if x.is_none() || !self.shares.contains_key(&owner) {
                return Err(Error::NotANeighbour {
                    client,
                    other: owner,
                });
            }
            let allowed = if self.uploaded.contains(&owner) {
                ShareKind::SelfMaskSeed
            } else {
                ShareKind::MaskKey
            };
            if revealed.kind != allowed {
                return Err(Error::WrongShareKind {
                    client,
                    owner,
                    kind: revealed.kind,
                });
            }
            let share = Share::from_bytes(&revealed.share)
                .ok()
                .filter(|s| Some(s.x) == x)
                .ok_or(Error::MalformedShare {
                    holder: client,
                    owner,
                })?;
            if accepted.insert(owner, share).is_some() {
                return Err(Error::DuplicateMessage { client });
            }
        }
        for (owner, share) in accepted {
            self.revealed.entry(owner).or_default().push(share);
        }
        self.unmasked.insert(client);
        Ok(())
    }

    /// Rebuilds every needed secret, removes all masks from the sum and returns the aggregate.
    pub fn finish(self) -> Result<Aggregate, Error> {
        self.expect(Phase::Unmask)?;
        let t = self.ctx.params.threshold as usize;
        let (fed, round) = (&self.ctx.federation, self.ctx.round);
        let no_shares = Vec::new();
        let rebuild = |owner: u32, kind| {
            shamir::combine(t, self.revealed.get(&owner).unwrap_or(&no_shares)).map_err(|source| {
                Error::ReconstructionFailed {
                    owner,
                    kind,
                    source,
                }
            })
        };
        // Streams to remove: each survivor's self mask is subtracted; for each client that shared
        // and dropped, each pairwise mask with a surviving neighbour is undone.
        let mut streams = Vec::new();
        for &owner in &self.survivors {
            let seed = rebuild(owner, ShareKind::SelfMaskSeed)?;
            streams.push((MaskPrg::new(&seed, round), false));
        }
        for (&dropped, _) in self
            .shares
            .iter()
            .filter(|(c, _)| !self.uploaded.contains(c))
        {
            let surviving: Vec<u32> = self
                .graph
                .neighbours(dropped)
                .into_iter()
                .filter(|n| self.uploaded.contains(n))
                .collect();
            if surviving.is_empty() {
                continue;
            }
            let secret = StaticSecret::from(rebuild(dropped, ShareKind::MaskKey)?);
            // Invariant: every client in U2 advertised (U2 ⊆ U1), so its advertisement exists.
            let advertised = &self.adverts[&dropped];
            if PublicKey::from(&secret).to_bytes() != advertised.mask_public_key {
                return Err(Error::ReconstructedKeyMismatch { owner: dropped });
            }
            for survivor in surviving {
                let shared = share_crypto::agree(&secret, &self.adverts[&survivor].mask_public_key)
                    .map_err(|source| Error::BadPeerKey {
                        client: survivor,
                        source,
                    })?;
                let seed = share_crypto::pairwise_seed(&shared, fed, round, survivor, dropped);
                // The survivor added the mask if it has the lower index: undo with the opposite.
                streams.push((MaskPrg::new(&seed, round), survivor > dropped));
            }
        }
        let mut sum = self.sum;
        let bits = self.ctx.params.bits;
        mask_parallel(&mut sum, default_threads(), |offset, chunk| {
            apply_streams(&streams, offset, chunk, bits);
        });
        Ok(Aggregate {
            sum,
            survivors: self.survivors,
        })
    }
}
