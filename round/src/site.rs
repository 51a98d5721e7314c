//! A site's side of one round as a sans-I/O state machine.
//!
//! [`SiteRound::offer`] judges the aggregator's offer against the site's own policy and privacy
//! ledger and answers it. Then the machine checks the streamed model against the announced
//! digest (and the one the last result announced), asks its driver to evaluate and train
//! ([`SiteEvent::Evaluate`], [`SiteEvent::Train`]), encodes the update with distributed DP,
//! runs the SecAgg+ client through its phases and records the result. Anything the aggregator
//! sends that fails a check makes the site leave the round (audited) and reveal nothing more.
//!
//! The driver drains, after every input: [`SiteRound::poll_audit`] (facts, and ledger entries
//! that must be durable before the update leaves the site), [`SiteRound::poll_event`], then
//! [`SiteRound::poll_transmit`]. The site keeps no deadlines of its own: the aggregator's
//! deadlines end a round, and its `RoundAborted` reaches the site.

use std::{collections::VecDeque, sync::Arc};

use quorum_crypto::{
    digest::sha256,
    dp::{self, DpParams},
    secagg::{
        self, AdoptedList, ClientRound, CohortAuthenticator, ExpectForwardedShares, ExpectPeerKeys,
        ExpectSurvivors, ExpectUnmaskRequest, GraphSeed, Phase, Signed, Signer, SiteVerifier,
    },
    upload::InputStream,
};
use quorum_policies::{Delta, DpSgdSpend, Ledger, RoundOffer, SitePolicy};
use quorum_proto::{
    secagg as wire,
    v1::{self as pb, client_message::Body as Out, server_message::Body as In},
};
use rand::SeedableRng as _;
use rand_chacha::ChaCha20Rng;

use crate::{
    coordinator::honest_survivors,
    fact::{Fact, RecordLevelPrivacy, What},
    metrics,
};

/// The result of local training.
#[derive(Debug, Clone, Default)]
pub struct TrainedUpdate {
    /// θ_global − θ_local in canonical order.
    pub delta: Vec<f32>,
    /// Mean training loss.
    pub train_loss: f64,
    /// Validation loss after training.
    pub val_loss_after: f64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Seconds of training.
    pub seconds: f64,
}

/// Something the driver must make durable before it sends anything else.
#[derive(Debug, Clone, PartialEq)]
pub enum SiteDurable {
    /// Append this fact to the site's audit log.
    Audit(Fact),
    /// Record in the privacy ledger that `round` spent `rho` (and ran `dpsgd`): the update is
    /// about to leave.
    Ledger {
        /// Round id.
        round: u32,
        /// zCDP ρ.
        rho: f64,
        /// The round's DP-SGD, for a site with `[record_dp]`.
        dpsgd: Option<DpSgdSpend>,
    },
    /// Keep this revocation list (DER), newly adopted, in place of the one stored: the site
    /// reads it back when it restarts, so an aggregator cannot take it back to an older one.
    RevocationList(Vec<u8>),
}

/// A message to the aggregator.
#[derive(Debug)]
pub enum SiteTransmit {
    /// One protocol message.
    Message(Out),
    /// The encoded (and possibly masked) update: the driver streams it in chunks
    /// ([`OutgoingUpdate::send_chunks`]), then tells the site ([`SiteRound::uploaded`]).
    Update(Box<OutgoingUpdate>),
}

/// A site's update, made (DP-encoded, masked, packed) as it is sent, one segment at a time:
/// beyond its update, the site holds one encoder segment and one chunk.
#[derive(Debug)]
pub struct OutgoingUpdate {
    round: u32,
    input: InputStream,
}

/// What a site sent as its update: SHA-256 of the packed bytes and their length, as both ends
/// record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadReceipt {
    /// SHA-256 of the packed bytes, in order.
    pub sha256: [u8; 32],
    /// Packed bytes sent.
    pub bytes: u64,
}

impl OutgoingUpdate {
    /// The round it is for.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Bits per element on the wire.
    pub fn bits(&self) -> u32 {
        self.input.bits()
    }

    /// Makes the update and calls `send` with each of its chunks (at most
    /// [`quorum_proto::MAX_CHUNK_BYTES`] packed, as [`quorum_proto::update_chunks`] cuts a whole
    /// vector), stopping at the first error. Seconds of work for large models: call it off
    /// network threads.
    pub fn send_chunks<E>(
        &self,
        mut send: impl FnMut(pb::UpdateChunk) -> Result<(), E>,
    ) -> Result<UploadReceipt, E> {
        let mut hasher = quorum_crypto::digest::Sha256::new();
        let mut bytes = 0;
        let per_chunk = quorum_proto::elements_per_chunk(self.bits());
        self.input.for_each_chunk(per_chunk, |chunk| {
            hasher.update(&chunk.packed);
            bytes += chunk.packed.len() as u64;
            send(pb::UpdateChunk {
                round: self.round,
                offset: chunk.offset,
                elements: chunk.elements,
                packed: chunk.packed.into(),
                last: chunk.last,
            })
        })?;
        Ok(UploadReceipt {
            sha256: hasher.finish(),
            bytes,
        })
    }

    /// The whole vector in memory, for drivers that handle updates whole (simulations).
    pub fn values(&self) -> Vec<u32> {
        self.input.values()
    }
}

impl SiteTransmit {
    /// The SecAgg+ step this message belongs to (the masked input for any update).
    pub fn phase(&self) -> Option<Phase> {
        match self {
            Self::Message(Out::Advertise(_)) => Some(Phase::Advertise),
            Self::Message(Out::ShareKeys(_)) => Some(Phase::ShareKeys),
            Self::Update(_) => Some(Phase::MaskedInput),
            Self::Message(Out::Consistency(_)) => Some(Phase::Consistency),
            Self::Message(Out::Unmask(_)) => Some(Phase::Unmask),
            Self::Message(_) => None,
        }
    }
}

/// How a round ended for this site.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The result arrived; `included` when this site's update is in the sum.
    Completed {
        /// Whether this site's update is in the sum.
        included: bool,
        /// Digest of the new global model, which the next round's model must match.
        model_sha256: [u8; 32],
    },
    /// An evaluation-only round: the final model's validation loss, given through the masked
    /// sum (secure rounds) and, with `share_metrics`, reported in the clear.
    Evaluated,
    /// The site declined the offer.
    Declined(String),
    /// The aggregator aborted the round.
    Aborted(String),
    /// The site left the round: a check of what the aggregator sent failed (audited).
    Left(String),
}

/// What the site tells its driver, beyond facts and messages.
#[derive(Debug, Clone, PartialEq)]
pub enum SiteEvent {
    /// Something the site's operator should see.
    Note(String),
    /// Load this global model and evaluate it; then call [`SiteRound::evaluated`].
    Evaluate {
        /// The serialised model, digest checked.
        model: Vec<u8>,
    },
    /// Train from the loaded model; then call [`SiteRound::trained`].
    Train,
    /// The round is over for this site.
    Ended(Outcome),
}

/// What a site carries from one round to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SiteHistory {
    /// The model digest the last result announced: the next round's model must match it.
    pub expected_model: Option<[u8; 32]>,
    /// The model this site last released an update from, while no result has followed: an
    /// offer on that same model redoes that round, on the same data.
    pub released_from: Option<[u8; 32]>,
    /// The model whose losses this site last put into a masked sum: the metrics it would give
    /// on that model again are the same, so two sums over cohorts differing by this site would
    /// expose them; it gives zeros instead.
    pub summed_from: Option<[u8; 32]>,
}

/// The keys a site signs and checks SecAgg+ messages with.
#[derive(Clone)]
pub struct SiteKeys {
    /// Signs this site's advertisements and survivor sets.
    pub signer: Arc<dyn Signer + Send + Sync>,
    /// Checks the peers' signatures.
    pub verifier: Arc<dyn SiteVerifier + Send + Sync>,
}

/// The most memory reserved up front for a model download: the announced size comes from the
/// aggregator, so a hostile one could otherwise make the site reserve any amount and abort.
pub const MAX_MODEL_PREALLOCATION: usize = 64 << 20;

enum Step {
    Download(Vec<u8>),
    Evaluating,
    Training { val_loss_before: f64 },
    PeerKeys(ExpectPeerKeys, InputStream),
    Shares(ExpectForwardedShares, InputStream),
    Survivors(ExpectSurvivors),
    Unmask(ExpectUnmaskRequest),
    Result,
    Done,
}

impl Step {
    /// A download buffer for the model `config` announces: the size comes from the aggregator,
    /// so at most [`MAX_MODEL_PREALLOCATION`] is reserved up front.
    fn download(config: &pb::RoundConfig) -> Self {
        let announced = usize::try_from(config.model_bytes).unwrap_or(usize::MAX);
        Self::Download(Vec::with_capacity(announced.min(MAX_MODEL_PREALLOCATION)))
    }

    fn expects(&self) -> &'static str {
        match self {
            Self::Download(_) => "ModelChunk",
            Self::Evaluating | Self::Training { .. } => "nothing while training",
            Self::PeerKeys(..) => "PeerKeys",
            Self::Shares(..) => "ForwardedShares",
            Self::Survivors(_) => "SurvivorSet",
            Self::Unmask(_) => "UnmaskRequest",
            Self::Result => "RoundResult",
            Self::Done => "nothing",
        }
    }
}

/// The name of a message from the aggregator, for errors.
pub fn message_name(body: &In) -> &'static str {
    match body {
        In::Welcome(_) => "Welcome",
        In::RoundConfig(_) => "RoundConfig",
        In::ModelChunk(_) => "ModelChunk",
        In::PeerKeys(_) => "PeerKeys",
        In::ForwardedShares(_) => "ForwardedShares",
        In::Survivors(_) => "SurvivorSet",
        In::UnmaskRequest(_) => "UnmaskRequest",
        In::Result(_) => "RoundResult",
        In::Aborted(_) => "RoundAborted",
        In::Finished(_) => "Finished",
        In::AuditHead(_) => "AuditHead",
    }
}

/// A site's state machine for one round; see the [module docs](self).
pub struct SiteRound {
    config: pb::RoundConfig,
    site: String,
    index: u32,
    keys: SiteKeys,
    rng: ChaCha20Rng,
    dp: Option<DpParams>,
    rho: f64,
    seed: [u8; 32],
    epsilon_after: f64,
    delta: Delta,
    /// What this round's DP-SGD spends, for a site with `[record_dp]`.
    record_level: Option<(DpSgdSpend, RecordLevelPrivacy)>,
    history: SiteHistory,
    /// Whether losses, tokens and time go to the aggregator in the clear (site policy).
    share_metrics: bool,
    /// Whether losses and tokens go into the masked sum (site policy).
    sum_metrics: bool,
    step: Step,
    audit: VecDeque<SiteDurable>,
    events: VecDeque<SiteEvent>,
    transmits: VecDeque<SiteTransmit>,
}

/// An offer decoded and admitted.
struct Admitted {
    index: u32,
    dp: DpParams,
    rho: f64,
    seed: [u8; 32],
    record_level: Option<(DpSgdSpend, RecordLevelPrivacy)>,
}

impl SiteRound {
    /// Judges `config` as site `site` under `policy` with the privacy already spent in `ledger`,
    /// and answers it. `history` is what the site's previous rounds left (see
    /// [`SiteRound::history`]); `seed` seeds
    /// this round's keys and noise.
    pub fn offer(
        config: pb::RoundConfig,
        site: &str,
        policy: &SitePolicy,
        ledger: &Ledger,
        history: SiteHistory,
        keys: SiteKeys,
        seed: [u8; 32],
    ) -> Self {
        let delta = policy.policy.delta;
        // The list comes first: every peer of this round is checked against it.
        let adopted = adopt_revocation_list(&config, policy, &keys);
        let admitted = adopted
            .clone()
            .and_then(|_| check_own_certificate(site, &keys))
            .and_then(|_| admit(&config, site, policy, ledger, &history));
        let accountant = ledger.accountant(delta);
        let mut machine = Self {
            site: site.to_owned(),
            index: 0,
            keys,
            rng: ChaCha20Rng::from_seed(seed),
            dp: None,
            rho: 0.0,
            seed: [0; 32],
            epsilon_after: accountant.epsilon(),
            delta,
            record_level: None,
            history,
            share_metrics: policy.policy.share_metrics,
            sum_metrics: policy.policy.sum_metrics,
            step: Step::Done,
            audit: VecDeque::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            config,
        };
        let round = machine.config.round;
        if let Ok(Some(list)) = adopted {
            let der = machine.config.revocation_list.clone();
            machine.audit.push_back(SiteDurable::RevocationList(der));
            machine.record(What::RevocationListAdopted {
                crl_number: list.number,
                next_update: list.next_update,
                revoked: list.revoked,
            });
        }
        match admitted {
            Err(reason) => {
                machine.record(What::refused(reason.clone()));
                machine.events.push_back(SiteEvent::Note(format!(
                    "{site}: declining round {round}: {reason}"
                )));
                machine.decide(false, reason.clone());
                machine.end(Outcome::Declined(reason));
            }
            Ok(a) => {
                if a.rho > 0.0 {
                    machine.epsilon_after = accountant.epsilon_if(a.rho);
                }
                (machine.index, machine.dp, machine.rho, machine.seed) =
                    (a.index, Some(a.dp), a.rho, a.seed);
                machine.record_level = a.record_level;
                let c = &machine.config;
                machine.record(What::Accepted {
                    cohort: c.cohort.clone(),
                    secure_aggregation: c.secure_aggregation,
                    dp_enabled: c.dp.as_ref().is_some_and(|d| d.enabled),
                    rho: a.rho,
                    local_steps: c.local_steps,
                });
                machine.decide(true, String::new());
                machine.step = Step::download(&machine.config);
            }
        }
        machine
    }

    /// The round id.
    pub fn round(&self) -> u32 {
        self.config.round
    }

    /// The offer this round runs under.
    pub fn config(&self) -> &pb::RoundConfig {
        &self.config
    }

    /// What the next round's offer is judged with: the model the result announced, and the
    /// model this site released an update from if no result followed.
    pub fn history(&self) -> SiteHistory {
        self.history
    }

    /// Whether the round is over for this site.
    pub fn is_done(&self) -> bool {
        matches!(self.step, Step::Done)
    }

    /// The next fact or ledger entry to make durable.
    pub fn poll_audit(&mut self) -> Option<SiteDurable> {
        self.audit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SiteEvent> {
        self.events.pop_front()
    }

    /// The next message to send; none while a durable write is pending, so that a driver
    /// that carries out an event (which may raise facts) before sending cannot act unaudited.
    pub fn poll_transmit(&mut self) -> Option<SiteTransmit> {
        if self.audit.is_empty() {
            self.transmits.pop_front()
        } else {
            None
        }
    }

    /// A message from the aggregator.
    pub fn handle(&mut self, message: In) {
        // Audit heads belong to the driver's witness ([`crate::witness`]), not to the round: the
        // previous round's head may arrive after this offer.
        if matches!(message, In::AuditHead(_)) {
            return;
        }
        let round = self.config.round;
        if let In::Aborted(a) = &message
            && a.round == round
            && !self.is_done()
        {
            let reason = a.reason.clone();
            self.record(What::RoundAborted {
                reason: reason.clone(),
                attempt: None,
            });
            self.end(Outcome::Aborted(reason));
            return;
        }
        let step = std::mem::replace(&mut self.step, Step::Done);
        let outcome = match (step, message) {
            (Step::Download(bytes), In::ModelChunk(chunk)) => self.model_chunk(bytes, chunk),
            (Step::PeerKeys(state, encoded), In::PeerKeys(m)) if m.round == round => {
                self.peer_keys(state, encoded, m)
            }
            (Step::Shares(state, encoded), In::ForwardedShares(m)) if m.round == round => {
                self.forwarded_shares(state, encoded, m)
            }
            (Step::Survivors(state), In::Survivors(m)) if m.round == round => {
                let signer = Arc::clone(&self.keys.signer);
                state
                    .handle_survivors(&m.clients, signer.as_ref())
                    .map(|(next, signature)| {
                        self.send(Out::Consistency(wire::consistency_to_pb(round, signature)));
                        self.step = Step::Unmask(next);
                    })
                    .map_err(check_failed)
            }
            (Step::Unmask(state), In::UnmaskRequest(m)) if m.round == round => {
                let signatures = m
                    .signatures
                    .into_iter()
                    .map(wire::consistency_from_pb)
                    .collect();
                let verifier = Arc::clone(&self.keys.verifier);
                let auth = CohortAuthenticator {
                    verifier: verifier.as_ref(),
                    cohort: &self.config.cohort,
                };
                state
                    .handle_unmask_request(signatures, &auth)
                    .map(|shares| {
                        self.send(Out::Unmask(wire::unmask_to_pb(round, shares)));
                        self.step = Step::Result;
                    })
                    .map_err(check_failed)
            }
            (Step::Result, In::Result(result)) if result.round == round => self.result(result),
            (Step::Done, _) => return,
            (step, other) => Err(format!(
                "expected {}, got {} for round {}",
                step.expects(),
                message_name(&other),
                round
            )),
        };
        if let Err(reason) = outcome {
            self.leave(reason);
        }
    }

    /// The driver evaluated the downloaded model: `val_loss` on this site's validation data.
    pub fn evaluated(&mut self, val_loss: f64) {
        if !matches!(self.step, Step::Evaluating) {
            return;
        }
        if self.config.local_steps == 0 {
            self.events.push_back(SiteEvent::Note(format!(
                "{}: final model validation loss {val_loss:.4}",
                self.site
            )));
            if self.share_metrics {
                self.send(Out::Report(pb::RoundReport {
                    round: self.config.round,
                    val_loss_before: val_loss,
                    ..Default::default()
                }));
            }
            if !self.config.secure_aggregation {
                self.end(Outcome::Evaluated);
                return;
            }
            // Only the loss, masked: the aggregator learns the cohort's mean.
            let slots = self.metric_slots(&TrainedUpdate::default(), val_loss);
            let bits = self.config.modulus_bits;
            self.start_secure(InputStream::new(None, slots.to_vec(), bits));
            return;
        }
        self.step = Step::Training {
            val_loss_before: val_loss,
        };
        self.events.push_back(SiteEvent::Train);
    }

    /// The driver trained: DP-encodes `update` and sends it (masked, in secure rounds).
    ///
    /// Encoding and masking take seconds for large models; drivers call this off their
    /// network threads.
    pub fn trained(&mut self, update: TrainedUpdate) {
        let Step::Training { val_loss_before } = self.step else {
            return;
        };
        let round = self.config.round;
        // Privacy is spent when the update leaves the site: record it first.
        let dpsgd = self.record_level.as_ref().map(|(spend, _)| *spend);
        if self.rho > 0.0 || dpsgd.is_some() {
            self.audit.push_back(SiteDurable::Ledger {
                round,
                rho: self.rho,
                dpsgd,
            });
        }
        let record_level = self.record_level.as_ref().map(|(_, fact)| fact.clone());
        let record_level_epsilon = record_level.as_ref().map(|r| r.epsilon);
        self.record(What::SitePrivacy {
            rho: self.rho,
            epsilon: self.epsilon_after,
            delta: self.delta.get(),
            record_level,
        });
        if self.share_metrics {
            self.send(Out::Report(pb::RoundReport {
                round,
                train_loss: update.train_loss,
                val_loss_before,
                val_loss_after: update.val_loss_after,
                tokens: update.tokens,
                seconds: update.seconds,
                epsilon_spent: self.epsilon_after,
                record_level_epsilon,
            }));
        }
        let params = self.dp.expect("set when the offer was admitted");
        // Losses and tokens ride in the masked vector: the aggregator learns only their sums.
        let slots = self.metric_slots(&update, val_loss_before);
        // The rounding is fixed now, over the whole update; the encoding itself is made as
        // the update is sent.
        let encoder = match dp::StreamEncoder::new(update.delta, &params, &self.seed, &mut self.rng)
        {
            Ok(encoder) => encoder,
            Err(e) => return self.leave(format!("the update could not be encoded: {e}")),
        };
        let input = InputStream::new(Some(encoder), slots.to_vec(), self.config.modulus_bits);
        if !self.config.secure_aggregation {
            self.upload(input);
            self.step = Step::Result;
            return;
        }
        self.start_secure(input);
    }

    /// The driver sent the whole update ([`OutgoingUpdate::send_chunks`]): its digest goes into
    /// the audit log, where the aggregator's record of the same upload can be matched with it.
    pub fn uploaded(&mut self, receipt: UploadReceipt) {
        self.record(What::Upload {
            sha256: hex::encode(receipt.sha256),
            bytes: receipt.bytes,
        });
    }

    /// This round's metric slots: zeros if the site keeps its metrics back, or already put
    /// this model's into a sum (a second sum over another cohort could be subtracted).
    fn metric_slots(
        &mut self,
        update: &TrainedUpdate,
        val_loss_before: f64,
    ) -> [u32; metrics::SLOTS] {
        let model: Option<[u8; 32]> = self.config.model_sha256.as_slice().try_into().ok();
        let shared = self.sum_metrics && model.is_some() && self.history.summed_from != model;
        if shared {
            self.history.summed_from = model;
        }
        let cohort = self.config.cohort.len() as u32;
        metrics::encode(
            update,
            val_loss_before,
            cohort,
            self.config.modulus_bits,
            shared,
        )
    }

    /// Starts the SecAgg+ client for `input`: the advertisement goes out.
    fn start_secure(&mut self, input: InputStream) {
        let round = self.config.round;
        let ctx = wire::round_context(&self.config, self.seed, input.len());
        let signer = Arc::clone(&self.keys.signer);
        match ClientRound::start(ctx, self.index, signer.as_ref(), &mut self.rng) {
            Ok((state, advert)) => {
                self.send(Out::Advertise(wire::advertisement_to_pb(round, advert)));
                self.step = Step::PeerKeys(state, input);
            }
            Err(e) => self.leave(check_failed(e)),
        }
    }

    fn model_chunk(&mut self, mut bytes: Vec<u8>, chunk: pb::ModelChunk) -> Result<(), String> {
        let round = self.config.round;
        if chunk.round != round || chunk.offset != bytes.len() as u64 {
            return Err(format!(
                "model chunk out of order (round {}, offset {})",
                chunk.round, chunk.offset
            ));
        }
        if (bytes.len() + chunk.data.len()) as u64 > self.config.model_bytes {
            return Err("the aggregator sent more model bytes than announced".into());
        }
        bytes.extend_from_slice(&chunk.data);
        if !chunk.last {
            self.step = Step::Download(bytes);
            return Ok(());
        }
        let digest = sha256(&bytes);
        if digest.as_slice() != self.config.model_sha256.as_slice() {
            return Err(format!(
                "the downloaded model does not match the digest announced for round {round}"
            ));
        }
        if let Some(expected) = self.history.expected_model.filter(|e| *e != digest) {
            return Err(format!(
                "the aggregator sent a different global model ({}) than it announced after the \
                 last round ({})",
                hex::encode(digest),
                hex::encode(expected)
            ));
        }
        self.record(What::ModelDigest {
            sha256: hex::encode(digest),
            round,
            direction: Some("received"),
        });
        self.step = Step::Evaluating;
        self.events.push_back(SiteEvent::Evaluate { model: bytes });
        Ok(())
    }

    fn peer_keys(
        &mut self,
        state: ExpectPeerKeys,
        input: InputStream,
        m: pb::PeerKeys,
    ) -> Result<(), String> {
        let peers = m
            .peers
            .into_iter()
            .map(wire::advertisement_from_pb)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("malformed peer keys from the aggregator: {e}"))?;
        let verifier = Arc::clone(&self.keys.verifier);
        let auth = CohortAuthenticator {
            verifier: verifier.as_ref(),
            cohort: &self.config.cohort,
        };
        let (next, shares) = state
            .handle_peer_keys(peers, &auth, &mut self.rng)
            .map_err(check_failed)?;
        self.send(Out::ShareKeys(pb::ShareKeys {
            round: self.config.round,
            shares: wire::shares_to_pb(shares),
        }));
        self.step = Step::Shares(next, input);
        Ok(())
    }

    fn forwarded_shares(
        &mut self,
        state: ExpectForwardedShares,
        input: InputStream,
        m: pb::ForwardedShares,
    ) -> Result<(), String> {
        let masker = state
            .handle_forwarded_shares(wire::shares_from_pb(m.shares))
            .map_err(check_failed)?;
        self.upload(input.masked(masker.input_mask()));
        self.step = Step::Survivors(masker.finish());
        Ok(())
    }

    fn result(&mut self, result: pb::RoundResult) -> Result<(), String> {
        let round = self.config.round;
        let sha: [u8; 32] = result.new_model_sha256.as_slice().try_into().map_err(|_| {
            format!(
                "the new model digest must be 32 bytes, got {}",
                result.new_model_sha256.len()
            )
        })?;
        let included = result.survivors.contains(&self.site);
        self.record(What::ResultReceived {
            survivors: result.survivors,
            included,
            epsilon: result.epsilon,
        });
        // An evaluation made no new model: nothing to reconcile with the aggregator's digests.
        if self.config.local_steps > 0 {
            self.record(What::ModelDigest {
                sha256: hex::encode(sha),
                round,
                direction: None,
            });
        }
        if self.config.local_steps == 0 && sha.as_slice() != self.config.model_sha256.as_slice() {
            return Err(format!(
                "the evaluation's result names another model ({}) than the one evaluated",
                hex::encode(sha)
            ));
        }
        self.history = SiteHistory {
            expected_model: Some(sha),
            released_from: None,
            ..self.history
        };
        if self.config.local_steps == 0 {
            self.end(Outcome::Evaluated);
        } else {
            self.end(Outcome::Completed {
                included,
                model_sha256: sha,
            });
        }
        Ok(())
    }

    fn upload(&mut self, input: InputStream) {
        // Checked against the download before training. An evaluation releases no update.
        if self.config.local_steps > 0 {
            self.history.released_from = self.config.model_sha256.as_slice().try_into().ok();
        }
        self.transmits
            .push_back(SiteTransmit::Update(Box::new(OutgoingUpdate {
                round: self.config.round,
                input,
            })));
    }

    fn decide(&mut self, accept: bool, reason: String) {
        self.send(Out::Decision(pb::RoundDecision {
            round: self.config.round,
            accept,
            reason,
        }));
    }

    /// Abandons the round, revealing nothing more; audited.
    fn leave(&mut self, reason: String) {
        self.record(What::refused(reason.clone()));
        self.end(Outcome::Left(reason));
    }

    fn end(&mut self, outcome: Outcome) {
        self.step = Step::Done;
        self.events.push_back(SiteEvent::Ended(outcome));
    }

    fn send(&mut self, body: Out) {
        self.transmits.push_back(SiteTransmit::Message(body));
    }

    fn record(&mut self, what: What) {
        self.audit.push_back(SiteDurable::Audit(Fact {
            round: Some(self.config.round),
            site: Some(self.site.clone()),
            what,
        }));
    }
}

fn check_failed(error: secagg::Error) -> String {
    format!("secure aggregation check failed: {error}")
}

/// Checks the revocation list relayed with `config` and adopts it if it is newer than the one
/// in use; `Some` when adopted.
fn adopt_revocation_list(
    config: &pb::RoundConfig,
    policy: &SitePolicy,
    keys: &SiteKeys,
) -> Result<Option<AdoptedList>, String> {
    if config.revocation_list.is_empty() {
        return if policy.policy.require_revocation {
            Err(
                "the offer carries no revocation list, so a revoked peer could not be told; \
                 [policy] require_revocation is on"
                    .into(),
            )
        } else {
            Ok(None)
        };
    }
    keys.verifier
        .adopt_revocation_list(&config.revocation_list)
        .map_err(|e| e.to_string())
}

/// Whether this site's own certificate still passes the checks its peers make (under the list
/// just adopted: revoked, say), so that it declines, saying why, rather than being refused by
/// every peer later.
fn check_own_certificate(site: &str, keys: &SiteKeys) -> Result<(), String> {
    let probe = b"quorum/self-check/v1";
    let own = Signed {
        certificate_der: &keys.signer.certificate_der(),
        message: probe,
        signature: &keys.signer.sign(probe),
    };
    keys.verifier
        .verify_site(site, own)
        .map_err(|e| format!("this site's own certificate would be refused by its peers: {e}"))
}

/// Decodes `config` and checks it against the site's policy; `Err` is the refusal reason.
fn admit(
    config: &pb::RoundConfig,
    site: &str,
    policy: &SitePolicy,
    ledger: &Ledger,
    history: &SiteHistory,
) -> Result<Admitted, String> {
    let index = config
        .cohort
        .iter()
        .position(|s| s == site)
        .ok_or_else(|| format!("the offer's cohort does not include this site ({site})"))?;
    // One order for everyone: a cohort the aggregator arranged per site would not verify anyway,
    // but sorted and unique leaves it no say over who sits next to whom beyond the seed.
    if !config.cohort.windows(2).all(|w| w[0] < w[1]) {
        return Err("the offer's cohort is not sorted and unique".into());
    }
    let roster = &policy.policy.roster;
    if let Some(stranger) = config
        .cohort
        .iter()
        .find(|s| !roster.is_empty() && !roster.contains_key(*s))
    {
        return Err(format!(
            "cohort member {stranger} is not in this site's roster ([policy.roster])"
        ));
    }
    let n = config.cohort.len() as u32;
    let corrupt = policy.policy.corrupt_fraction;
    if config.secure_aggregation {
        // The site judges the SecAgg+ parameters by its own assumption, not the aggregator's.
        let seed = if policy.policy.assume_random_graph {
            GraphSeed::Random
        } else {
            GraphSeed::Adversarial
        };
        wire::secagg_params(config, 1)
            .check_safe_against(corrupt, seed)
            .map_err(|e| format!("unsafe secure-aggregation parameters: {e}"))?;
    }
    let mut dp = wire::dp_params(config).map_err(|e| format!("invalid DP parameters: {e}"))?;
    // Noise as if the colluding share of the survivors added none, by this site's count.
    let honest = honest_survivors(config.min_survivors, n, corrupt);
    if honest == 0 {
        return Err(format!(
            "none of the {} survivors the round needs is honest by this site's corrupt_fraction \
             {corrupt}",
            config.min_survivors
        ));
    }
    dp.min_clients = dp.min_clients.min(honest);
    dp.validate()
        .map_err(|e| format!("invalid DP parameters for {honest} honest survivors: {e}"))?;
    let seed: [u8; 32] = config.round_seed.as_slice().try_into().map_err(|_| {
        format!(
            "the round seed must be 32 bytes, got {}",
            config.round_seed.len()
        )
    })?;
    let dp_enabled = config.dp.as_ref().is_some_and(|d| d.enabled);
    // The site computes its privacy cost itself rather than trusting the aggregator's.
    let rho = if dp_enabled && config.local_steps > 0 {
        dp::zcdp_rho(&dp, dp.min_clients)
    } else {
        0.0
    };
    // A redo trains on the same data as the attempt whose update already left: without noise
    // the aggregator could subtract the two sums.
    let redo = history
        .released_from
        .is_some_and(|m| m.as_slice() == config.model_sha256.as_slice());
    if redo && !dp_enabled && config.local_steps > 0 && !policy.policy.allow_redo_without_dp {
        return Err(
            "this offer redoes a round whose update already left this site (same model, same \
             data) without DP noise, so the aggregator could subtract the two sums; \
             [policy] allow_redo_without_dp is off"
                .into(),
        );
    }
    let p = &policy.policy;
    if config.local_steps == 0 && !config.secure_aggregation && !p.share_metrics {
        return Err(
            "an evaluation-only round without secure aggregation reveals this site's \
             validation loss in the clear, and [policy] share_metrics is off"
                .into(),
        );
    }
    if config.local_steps == 0 && !p.sum_metrics && !p.share_metrics {
        return Err(
            "an evaluation-only round asks only for this site's validation loss, and \
             [policy] sum_metrics and share_metrics are off"
                .into(),
        );
    }
    if config.local_steps > 0 {
        let offer = RoundOffer {
            federation: config.federation.clone(),
            round: config.round,
            cohort_size: config.cohort.len() as u32,
            secure_aggregation: config.secure_aggregation,
            dp_enabled,
            rho,
            local_steps: config.local_steps,
        };
        policy.admit(&offer, ledger).map_err(|r| r.to_string())?;
    }
    let record_level = policy
        .record_dp
        .filter(|_| config.local_steps > 0)
        .map(|r| {
            let spend = r.spend(config.local_steps);
            let epsilon = ledger.record_level_epsilon(r.delta, Some(spend));
            let fact = RecordLevelPrivacy {
                unit: r.unit.name(),
                sampling_rate: r.sampling_rate,
                noise_multiplier: r.noise_multiplier,
                clip_norm: r.clip_norm,
                steps: spend.steps,
                epsilon,
                delta: r.delta.get(),
            };
            (spend, fact)
        });
    Ok(Admitted {
        index: index as u32,
        dp,
        rho,
        seed,
        record_level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announced_model_size_reserves_at_most_the_cap() {
        let capacity = |announced: u64| {
            let offer = pb::RoundConfig {
                model_bytes: announced,
                ..Default::default()
            };
            let reserved = Step::download(&offer);
            match reserved {
                Step::Download(buffer) => buffer.capacity(),
                _ => unreachable!(),
            }
        };
        assert_eq!(capacity(1000), 1000);
        // A hostile announcement of the largest size must not abort the site.
        assert!(capacity(u64::MAX) <= MAX_MODEL_PREALLOCATION);
    }
}
