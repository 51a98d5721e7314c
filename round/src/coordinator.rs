//! The aggregator's side of the federation as a sans-I/O state machine.
//!
//! A [`Coordinator`] runs every round of a federation: it waits for a cohort, offers the round,
//! collects decisions, has the model sent, collects plain uploads or drives the SecAgg+ server
//! through its phases (each with a deadline), decodes the noised sum and hands the mean update to
//! its driver, which applies the outer optimizer and writes the checkpoint. It retries aborted
//! rounds under fresh round ids, runs a final evaluation pass, and ends the federation.
//!
//! It reads no clock and touches no socket or file: the driver feeds it what happened
//! ([`Coordinator::handle`], [`Coordinator::handle_upload`], [`Coordinator::site_connected`],
//! [`Coordinator::site_disconnected`], [`Coordinator::handle_timeout`],
//! [`Coordinator::model_updated`]) and carries out what it asks, in this order after every
//! input: every [`Durable`] from [`Coordinator::poll_audit`] (written and flushed), every
//! [`Event`], the upload window ([`Coordinator::upload_window`]), then every [`Transmit`]. So no
//! message goes out before the facts that record it are durable.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use quorum_crypto::{
    digest::{Sha256, sha256},
    dp::{self, DpParams},
    secagg::{self, CohortAuthenticator, Phase, ServerRound, SiteVerifier},
};
use quorum_policies::{
    Accountant, Dropouts, FederationPolicy,
    config::federation::{PrivacySettings, TrainingSettings},
};
use quorum_proto::{
    secagg as wire,
    v1::{self as pb, client_message::Body as In, server_message::Body as Out},
};
use rand::{RngCore as _, SeedableRng as _};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::fact::{Fact, Offered, What};
use crate::metrics::{self, SummedMetrics};
use crate::witness::HeadWitness;

/// Everything the coordinator needs, resolved from `federation.toml`.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Federation name.
    pub federation: String,
    /// Training rounds to run.
    pub rounds: u32,
    /// Smallest cohort a round starts with.
    pub min_clients: usize,
    /// Largest cohort.
    pub max_clients: usize,
    /// How long to wait for `min_clients` sites before the attempt is aborted.
    pub cohort_timeout: Duration,
    /// Deadline for each protocol phase.
    pub phase_timeout: Duration,
    /// Deadline for local training (model download to the first message after it). A
    /// training site silent for a whole `phase_timeout` is dropped before it.
    pub training_timeout: Duration,
    /// Local training settings sent to the sites.
    pub training: TrainingSettings,
    /// Secure aggregation on (default) or plain encoded uploads.
    pub secure_aggregation: bool,
    /// Bits per element of the encoded vector.
    pub modulus_bits: u32,
    /// Fraction of clients assumed to collude with the aggregator.
    pub corrupt_fraction: f64,
    /// How many clients may drop out.
    pub dropouts: Dropouts,
    /// Differential privacy.
    pub dp: PrivacySettings,
    /// Failed attempts in a row before the federation stops.
    pub max_round_attempts: u32,
}

impl CoordinatorConfig {
    /// The settings of a validated `federation.toml`.
    pub fn from_policy(policy: &FederationPolicy) -> Self {
        let fed = &policy.federation;
        let sa = &policy.secure_aggregation;
        Self {
            federation: fed.name.clone(),
            rounds: fed.rounds,
            min_clients: fed.min_clients as usize,
            max_clients: fed.max_clients as usize,
            cohort_timeout: fed.cohort_timeout,
            phase_timeout: sa.phase_timeout,
            training_timeout: policy.training.max_duration,
            training: policy.training.clone(),
            secure_aggregation: sa.enabled,
            modulus_bits: sa.modulus_bits,
            corrupt_fraction: sa.corrupt_fraction,
            dropouts: sa.dropouts,
            dp: policy.privacy.clone(),
            max_round_attempts: fed.max_round_attempts,
        }
    }
}

/// What a round's offer commits to, given the cohort's size: [`CoordinatorConfig::plan_round`].
#[derive(Debug, Clone)]
pub struct RoundPlan {
    /// SecAgg+ parameters (none in plain mode).
    pub secagg: Option<secagg::Params>,
    /// Survivors the round needs.
    pub min_survivors: u32,
    /// Survivors whose noise the DP calibration relies on (the honest part).
    pub noised: u32,
    /// DP encoding parameters.
    pub dp_params: DpParams,
    /// zCDP ρ the round costs each site (0 without DP and for the evaluation pass).
    pub rho: f64,
}

impl CoordinatorConfig {
    /// The parameters the coordinator offers a cohort of `clients` sites for a model of
    /// `parameters` values, and what the round costs in privacy: the same numbers a site
    /// checks against its budget, so `policy check` can tell when a site would decline.
    pub fn plan_round(
        &self,
        parameters: usize,
        clients: u32,
        evaluation_only: bool,
    ) -> Result<RoundPlan, String> {
        let n = clients;
        let padded = dp::params::padded_dim(parameters);
        let secagg = if self.secure_aggregation {
            let (bits, dim) = (self.modulus_bits, vector_len(evaluation_only, padded));
            let params = secagg_params(n, bits, dim, self.corrupt_fraction, self.dropouts)
                .map_err(|e| format!("no secure-aggregation parameters for {n} sites: {e}"))?;
            Some(params)
        } else {
            None
        };
        let min_survivors = secagg.as_ref().map_or(n, |p| p.min_survivors);
        // Colluding sites may add no noise: calibrate it for the honest part of the survivors.
        let noised = honest_survivors(min_survivors, n, self.corrupt_fraction);
        if noised == 0 {
            return Err(format!(
                "none of the {min_survivors} survivors needed is assumed honest \
                 (corrupt_fraction {})",
                self.corrupt_fraction
            ));
        }
        let dp_cfg = &self.dp;
        let noise = if dp_cfg.enabled {
            dp_cfg.noise_multiplier * dp_cfg.clip_norm
        } else {
            0.0
        };
        let dp_params = DpParams::choose(
            parameters,
            n,
            noised,
            dp_cfg.clip_norm,
            noise,
            self.modulus_bits,
        )
        .map_err(|e| format!("no DP encoding parameters: {e}"))?;
        let rho = if dp_cfg.enabled && !evaluation_only {
            dp::zcdp_rho(&dp_params, noised)
        } else {
            0.0
        };
        Ok(RoundPlan {
            secagg,
            min_survivors,
            noised,
            dp_params,
            rho,
        })
    }
}

/// A snapshot of [`Coordinator::status`].
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The round being offered or run, if any.
    pub round: Option<u32>,
    /// What the coordinator waits for: "waiting for sites", "decisions", "training", a
    /// SecAgg+ phase ("advertise", ...), "evaluation", "done", ...
    pub phase: &'static str,
    /// Sites with an open session.
    pub sites_connected: usize,
    /// Training rounds completed.
    pub completed_rounds: u32,
    /// Training rounds the federation runs.
    pub rounds: u32,
}

/// The global model as the coordinator sees it: a digest and a size. The driver holds the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelInfo {
    /// SHA-256 of the serialised model.
    pub sha256: [u8; 32],
    /// Serialised size in bytes.
    pub bytes: u64,
    /// Number of parameters (the update's dimension).
    pub parameters: usize,
}

/// Where a restarted federation resumes.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// The next unspent round id.
    pub next_round: u32,
    /// ρ of every round that spent privacy.
    pub rhos: Vec<(u32, f64)>,
    /// Rounds completed so far.
    pub history: Vec<RoundSummary>,
}

/// What one site reported about a round.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SiteReport {
    /// Mean training loss over the local steps.
    pub train_loss: f64,
    /// Validation loss of the global model it received.
    pub val_loss_before: f64,
    /// Validation loss after local training.
    pub val_loss_after: f64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Seconds of local training.
    pub seconds: f64,
    /// The site's own ε ledger after this round.
    pub epsilon_spent: f64,
}

/// The outcome of one completed round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundSummary {
    /// Round id.
    pub round: u32,
    /// True for the evaluation-only pass after the last round.
    pub evaluation_only: bool,
    /// Sites whose updates are in the sum.
    pub survivors: Vec<String>,
    /// Sites of the cohort that dropped or refused.
    pub dropped: Vec<String>,
    /// Seconds the round took.
    pub seconds: f64,
    /// Update bytes received.
    pub upload_bytes: u64,
    /// Model bytes sent (all sites).
    pub download_bytes: u64,
    /// ε of the federation's published guarantee after this round; `None` without DP.
    pub epsilon: Option<f64>,
    /// zCDP ρ this round cost.
    pub rho: f64,
    /// Digest of the new global model.
    pub model_sha256: String,
    /// What each site reported in the clear (only sites with `share_metrics`).
    pub reports: BTreeMap<String, SiteReport>,
    /// The survivors' mean losses and total tokens, from the masked sum (training rounds).
    #[serde(default)]
    pub metrics: Option<SummedMetrics>,
}

/// Something the driver must make durable before it sends anything else.
#[derive(Debug, Clone, PartialEq)]
pub enum Durable {
    /// Append this fact to the audit log.
    Audit(Fact),
    /// Save the state a restart resumes from ([`Coordinator::resume_state`]): a round id was
    /// spent, or a round ended.
    SaveState,
    /// Append a signed statement of the audit log's head (at a round's end; `None` at the end of
    /// the federation), then hand it to [`Coordinator::head_signed`] for the sites to witness.
    SignedHead(Option<u32>),
}

/// A message to send.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // short-lived queue entries, most of them messages
pub enum Transmit {
    /// One protocol message to one site.
    Message {
        /// Site name.
        to: String,
        /// The message.
        body: Out,
    },
    /// Stream the current global model to these sites as `ModelChunk`s of `round`.
    Model {
        /// Round.
        round: u32,
        /// Sites.
        to: Vec<String>,
    },
}

/// What the coordinator tells its driver, beyond facts and messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// What the federation is doing now (for progress displays).
    Phase(String),
    /// Something an operator should see.
    Note(String),
    /// Apply `mean` (the decoded mean update) to the global model with the outer optimizer,
    /// save it, then call [`Coordinator::model_updated`].
    ApplyUpdate {
        /// Round.
        round: u32,
        /// Mean of the survivors' noised updates, one value per parameter.
        mean: Vec<f32>,
    },
    /// A round (or the final evaluation) completed.
    RoundDone(RoundSummary),
    /// The federation ended: every round ran and the final model was announced.
    Finished,
    /// The federation stopped: too many attempts in a row failed, or the privacy ledger refused.
    Failed(String),
}

/// A complete upload, reassembled and checked for shape by the driver.
#[derive(Debug, Clone, Copy)]
pub struct Upload<'a> {
    /// Round it was sent for.
    pub round: u32,
    /// The encoded (and in secure mode masked) vector.
    pub values: &'a [u32],
    /// SHA-256 of the packed bytes as received.
    pub sha256: [u8; 32],
    /// Payload bytes on the wire.
    pub bytes: u64,
}

/// A piece of a complete upload, for drivers that read uploads back in pieces rather than
/// hold them whole: the pieces of one upload come one after the other, in order.
#[derive(Debug, Clone, Copy)]
pub struct UploadPart<'a> {
    /// Round it was sent for.
    pub round: u32,
    /// Position of `values` in the vector.
    pub offset: u64,
    /// Elements `offset..offset + values.len()` of the vector.
    pub values: &'a [u32],
    /// On the last piece only: what the whole upload was on the wire.
    pub complete: Option<UploadDigest>,
}

/// What a whole upload was on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadDigest {
    /// SHA-256 of the packed bytes as received.
    pub sha256: [u8; 32],
    /// Payload bytes.
    pub bytes: u64,
}

/// Which update the coordinator accepts now, and from whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadWindow {
    /// Round.
    pub round: u32,
    /// Elements in the encoded vector.
    pub elements: u64,
    /// Bits per element on the wire.
    pub bits: u32,
    /// Sites expected to upload.
    pub sites: BTreeSet<String>,
}

/// The aggregator's state machine; see the [module docs](self).
pub struct Coordinator {
    cfg: CoordinatorConfig,
    verifier: Arc<dyn SiteVerifier + Send + Sync>,
    rng: ChaCha20Rng,
    connected: BTreeSet<String>,
    /// Connected sites left out of cohorts because their certificate no longer passes (revoked
    /// since they connected), each recorded once.
    left_out: BTreeSet<String>,
    model: ModelInfo,
    accountant: Accountant,
    next_round: u32,
    history: Vec<RoundSummary>,
    attempts: u32,
    stage: Stage,
    audit: VecDeque<Durable>,
    events: VecDeque<Event>,
    transmits: VecDeque<Transmit>,
    /// Who receives each signed head asked for, in order.
    head_deliveries: VecDeque<HeadDelivery>,
    /// The sites' heads witnessed so far.
    witness: HeadWitness,
    /// Sites sent this node's head and not yet answered with theirs.
    awaiting_heads: BTreeSet<String>,
}

/// The sites a signed head goes to, where in the transmit queue (after the round's result,
/// before the next offer), and the end of the federation it precedes, if so.
struct HeadDelivery {
    to: Vec<String>,
    at: usize,
    then: Option<pb::Finished>,
}

enum Stage {
    /// Not started: sites that connect are only noted.
    Idle,
    /// Waiting for `min_clients` connected sites.
    Cohort {
        round: u32,
        evaluation_only: bool,
        deadline: Instant,
    },
    /// A round is under way.
    Round(Box<Round>),
    /// The federation is over.
    Done,
}

/// One round attempt.
struct Round {
    id: u32,
    evaluation_only: bool,
    started: Instant,
    cohort: Vec<String>,
    active: BTreeSet<String>,
    reports: BTreeMap<String, SiteReport>,
    /// The survivors' metrics, once the sum is decoded.
    metrics: Option<SummedMetrics>,
    upload_bytes: u64,
    download_bytes: u64,
    dp: DpParams,
    rho: f64,
    seed: [u8; 32],
    deadline: Instant,
    step: Step,
    /// What follows the decisions, prepared with the offer.
    after_decisions: Option<Step>,
    /// While the sites train (the step after the decisions): when each was last heard from.
    heard: Option<BTreeMap<String, Instant>>,
}

enum Step {
    Decisions {
        pending: BTreeSet<String>,
    },
    Reports,
    Plain {
        sum: Vec<u32>,
        received: BTreeSet<u32>,
        /// Sites whose update is partly in the sum, with the elements added so far.
        partial: BTreeMap<u32, usize>,
    },
    Secure {
        server: Box<ServerRound>,
        phase: Phase,
        expected: BTreeSet<u32>,
        responded: BTreeSet<u32>,
        /// Sites whose message this phase refused: out of the round, not waited for.
        refused: BTreeSet<u32>,
    },
    /// The mean update is with the driver.
    Applying {
        survivors: Vec<String>,
    },
}

impl Round {
    fn index(&self, site: &str) -> Option<u32> {
        self.cohort.iter().position(|s| s == site).map(|i| i as u32)
    }

    fn name(&self, index: u32) -> String {
        self.cohort[index as usize].clone()
    }

    /// Whether a live site of `expected` has not answered yet: a phase ends as soon as every
    /// live site has, instead of holding out for the dead until the deadline.
    fn awaiting(&self, expected: &BTreeSet<u32>, responded: &BTreeSet<u32>) -> bool {
        expected
            .difference(responded)
            .any(|&i| self.active.contains(&self.cohort[i as usize]))
    }

    /// Whether the current step still waits for `site`'s message.
    fn awaits(&self, site: &str) -> bool {
        if !self.active.contains(site) {
            return false;
        }
        let index = self.index(site);
        match &self.step {
            Step::Decisions { pending } => pending.contains(site),
            Step::Reports => !self.reports.contains_key(site),
            Step::Plain { received, .. } => index.is_some_and(|i| !received.contains(&i)),
            Step::Secure {
                expected,
                responded,
                refused,
                ..
            } => index.is_some_and(|i| {
                expected.contains(&i) && !responded.contains(&i) && !refused.contains(&i)
            }),
            Step::Applying { .. } => false,
        }
    }

    /// When each site still training was last heard from (none outside training).
    fn training_heard(&self) -> impl Iterator<Item = (&String, Instant)> {
        self.heard
            .iter()
            .flatten()
            .filter(|(site, _)| self.awaits(site))
            .map(|(site, &at)| (site, at))
    }

    /// Whether the current step has everything it waits for.
    fn complete(&self) -> bool {
        match &self.step {
            Step::Decisions { pending } => pending.is_empty(),
            Step::Reports => self.active.iter().all(|s| self.reports.contains_key(s)),
            Step::Plain { received, .. } => !self
                .active
                .iter()
                .any(|s| self.index(s).is_some_and(|i| !received.contains(&i))),
            Step::Secure {
                expected,
                responded,
                refused,
                ..
            } => !self.awaiting(&(expected - refused), responded),
            Step::Applying { .. } => false,
        }
    }

    /// The message kind the current step waits for, named in refusals.
    fn expects(&self) -> &'static str {
        match &self.step {
            Step::Decisions { .. } => "Decision",
            Step::Reports => "Report",
            Step::Plain { .. } => "UpdateChunk",
            Step::Secure { phase, .. } => match phase {
                Phase::MaskedInput => "UpdateChunk",
                other => other.name(),
            },
            Step::Applying { .. } => "nothing",
        }
    }
}

/// Elements of each site's vector: its encoded update and metrics, or the metrics alone in
/// the final evaluation.
fn vector_len(evaluation_only: bool, padded_dim: usize) -> usize {
    if evaluation_only {
        metrics::SLOTS
    } else {
        padded_dim + metrics::SLOTS
    }
}

/// The survivors DP noise can rely on: `min_survivors` less the worst case of `clients` a
/// `corrupt_fraction` may collude (and add no noise). The aggregator sizes the noise with its
/// fraction, each site again with its own.
pub(crate) fn honest_survivors(min_survivors: u32, clients: u32, corrupt_fraction: f64) -> u32 {
    min_survivors.saturating_sub(secagg::worst_case(clients, corrupt_fraction))
}

/// SecAgg+ parameters for a cohort of `clients`, as the coordinator offers them: `dropouts`
/// stated are a requirement ([`secagg::Params::choose`]); otherwise the cohort tolerates what it
/// can up to the fraction ([`secagg::Params::choose_up_to`]).
pub fn secagg_params(
    clients: u32,
    bits: u32,
    dim: usize,
    corrupt_fraction: f64,
    dropouts: Dropouts,
) -> Result<secagg::Params, secagg::Error> {
    match dropouts {
        Dropouts::Stated(f) => secagg::Params::choose(clients, bits, dim, corrupt_fraction, f),
        Dropouts::UpTo(f) => secagg::Params::choose_up_to(clients, bits, dim, corrupt_fraction, f),
    }
}

/// How often a training site sends a heartbeat: four times per phase deadline, so one lost
/// or late heartbeat does not get a live site dropped.
fn heartbeat_interval(phase_timeout: Duration) -> u32 {
    u32::try_from((phase_timeout / 4).as_millis())
        .unwrap_or(u32::MAX)
        .max(1)
}

/// SHA-256 of a vector of u32 as little-endian bytes, without materialising all the bytes.
fn digest_u32(values: &[u32]) -> [u8; 32] {
    let mut ctx = Sha256::new();
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in values.chunks(1 << 14) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
        ctx.update(&buf);
    }
    ctx.finish()
}

impl Coordinator {
    /// A coordinator for a federation whose global model is `model`, resuming from `resume`
    /// where a previous run saved state. `seed` seeds the cohort draws and round seeds;
    /// `verifier` checks the sites' SecAgg+ signatures. Nothing happens before
    /// [`Coordinator::start`].
    pub fn new(
        cfg: CoordinatorConfig,
        model: ModelInfo,
        resume: Resume,
        verifier: Arc<dyn SiteVerifier + Send + Sync>,
        seed: [u8; 32],
    ) -> Result<Self, quorum_policies::AccountantError> {
        let mut accountant = Accountant::new(cfg.dp.delta);
        for &(round, rho) in &resume.rhos {
            accountant.record(round, rho)?;
        }
        let mut coordinator = Self {
            cfg,
            verifier,
            rng: ChaCha20Rng::from_seed(seed),
            connected: BTreeSet::new(),
            left_out: BTreeSet::new(),
            model,
            accountant,
            next_round: resume.next_round.max(1),
            history: resume.history,
            attempts: 0,
            stage: Stage::Idle,
            audit: VecDeque::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            head_deliveries: VecDeque::new(),
            witness: HeadWitness::default(),
            awaiting_heads: BTreeSet::new(),
        };
        let done = coordinator.completed_rounds();
        if done > 0 {
            coordinator.record(
                None,
                None,
                What::Resumed {
                    resumed_after_rounds: done,
                },
            );
        }
        Ok(coordinator)
    }

    /// Starts the federation: the first round waits for its cohort from `now`. Sites that
    /// connected before are candidates at once.
    pub fn start(&mut self, now: Instant) {
        if matches!(self.stage, Stage::Idle) {
            self.next(now);
        }
    }

    /// Training rounds the federation runs.
    pub fn rounds(&self) -> u32 {
        self.cfg.rounds
    }

    /// Where the federation stands, for an operator's metrics and health check.
    pub fn status(&self) -> Status {
        let phase = match &self.stage {
            Stage::Idle => "idle",
            Stage::Cohort { .. } => "waiting for sites",
            Stage::Done => "done",
            Stage::Round(r) if r.heard.is_some() => "training",
            Stage::Round(r) => match &r.step {
                Step::Decisions { .. } => "decisions",
                Step::Reports => "evaluation",
                Step::Plain { .. } => "plain uploads",
                Step::Secure { phase, .. } => phase.name(),
                Step::Applying { .. } => "applying",
            },
        };
        Status {
            round: self.current_round(),
            phase,
            sites_connected: self.connected.len(),
            completed_rounds: self.completed_rounds(),
            rounds: self.cfg.rounds,
        }
    }

    /// Training rounds completed.
    pub fn completed_rounds(&self) -> u32 {
        self.history.iter().filter(|s| !s.evaluation_only).count() as u32
    }

    /// The next unspent round id (told to sites at join).
    pub fn next_round(&self) -> u32 {
        self.next_round
    }

    /// Rounds completed so far, the final evaluation included once it ran.
    pub fn history(&self) -> &[RoundSummary] {
        &self.history
    }

    /// What a restart resumes from, as of now.
    pub fn resume_state(&self) -> Resume {
        Resume {
            next_round: self.next_round,
            rhos: (1..self.next_round)
                .filter_map(|r| self.accountant.rho_of(r).map(|rho| (r, rho)))
                .collect(),
            history: self.history.clone(),
        }
    }

    /// Whether the federation is over.
    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    /// The next fact or state save to make durable.
    pub fn poll_audit(&mut self) -> Option<Durable> {
        self.audit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next message to send; none while a durable write is pending, so that a driver
    /// that carries out an event (which may raise facts) before sending cannot act unaudited.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.audit.is_empty() {
            self.transmits.pop_front()
        } else {
            None
        }
    }

    /// When [`Coordinator::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.stage {
            Stage::Cohort { deadline, .. } => Some(*deadline),
            Stage::Round(r) if !matches!(r.step, Step::Applying { .. }) => {
                // A training site silent for a phase deadline is due before the step's end.
                let silence = self.cfg.phase_timeout;
                let earliest = r.training_heard().map(|(_, at)| at + silence).min();
                Some(earliest.map_or(r.deadline, |due| due.min(r.deadline)))
            }
            _ => None,
        }
    }

    /// The round whose update is accepted now, if any (cheap: no site set is built).
    pub fn upload_round(&self) -> Option<u32> {
        match &self.stage {
            Stage::Round(r) => match r.step {
                Step::Plain { .. }
                | Step::Secure {
                    phase: Phase::MaskedInput,
                    ..
                } => Some(r.id),
                _ => None,
            },
            _ => None,
        }
    }

    /// The update accepted now, if any.
    pub fn upload_window(&self) -> Option<UploadWindow> {
        let Stage::Round(r) = &self.stage else {
            return None;
        };
        let sites = match &r.step {
            Step::Plain { .. } => r.active.clone(),
            Step::Secure {
                phase: Phase::MaskedInput,
                expected,
                ..
            } => expected.iter().map(|&i| r.name(i)).collect(),
            _ => return None,
        };
        Some(UploadWindow {
            round: r.id,
            elements: vector_len(r.evaluation_only, r.dp.padded_dim) as u64,
            bits: self.cfg.modulus_bits,
            sites,
        })
    }

    /// A site joined.
    pub fn site_connected(&mut self, now: Instant, site: &str) {
        self.connected.insert(site.to_owned());
        // It may come back with a new certificate: judge it afresh.
        self.left_out.remove(site);
        if matches!(self.stage, Stage::Cohort { .. }) {
            self.try_start(now);
        }
    }

    /// A site's session ended.
    pub fn site_disconnected(&mut self, now: Instant, site: &str) {
        self.connected.remove(site);
        if let Stage::Round(r) = &mut self.stage
            && r.active.remove(site)
        {
            if let Step::Decisions { pending } = &mut r.step {
                pending.remove(site);
            }
            self.events.push_back(Event::Note(format!(
                "{site} disconnected during round {}",
                r.id
            )));
        }
        self.advance(now);
    }

    /// The deadline of the current step passed (if `now` is past it).
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.stage {
            Stage::Cohort {
                round, deadline, ..
            } if now >= *deadline => {
                let reason = format!(
                    "only {} of the {} sites needed connected within {:?}",
                    self.connected.len(),
                    self.cfg.min_clients,
                    self.cfg.cohort_timeout
                );
                let round = *round;
                self.abort(now, round, reason);
            }
            Stage::Round(r) if now >= r.deadline && !matches!(r.step, Step::Applying { .. }) => {
                self.close_step(now);
                self.advance(now);
            }
            Stage::Round(r) if r.heard.is_some() => self.drop_silent_trainers(now),
            _ => {}
        }
    }

    /// Leaves out of the round every training site not heard from for a phase deadline: it
    /// died or lost its link, and the others need not wait out the training budget for it.
    fn drop_silent_trainers(&mut self, now: Instant) {
        let silence = self.cfg.phase_timeout;
        let Stage::Round(r) = &mut self.stage else {
            return;
        };
        let silent: Vec<String> = r
            .training_heard()
            .filter(|&(_, at)| at + silence <= now)
            .map(|(site, _)| site.clone())
            .collect();
        for site in &silent {
            r.active.remove(site);
        }
        let round = r.id;
        for site in silent {
            self.events.push_back(Event::Note(format!(
                "{site} sent no heartbeat for {silence:?} while training; left out of round \
                 {round}"
            )));
            self.record(
                Some(round),
                Some(&site),
                What::Refused {
                    reason: format!("no heartbeat for {silence:?} while training"),
                    what: Some("site left out of the round"),
                },
            );
        }
        self.advance(now);
    }

    /// A malformed or out-of-place message from `site` that its session already dropped.
    pub fn rejected(&mut self, site: &str, reason: &str) {
        let round = self.current_round();
        self.record(
            round,
            Some(site),
            What::Refused {
                reason: reason.to_owned(),
                what: Some("message"),
            },
        );
    }

    /// A protocol message from a joined site.
    pub fn handle(&mut self, now: Instant, site: &str, message: In) {
        if let In::AuditHead(head) = &message {
            self.site_head(site, head);
            return;
        }
        let Stage::Round(r) = &mut self.stage else {
            return; // between rounds: a previous round's leftovers
        };
        match message {
            In::Report(report) => {
                if report.round == r.id && r.index(site).is_some() {
                    r.reports.insert(site.to_owned(), report_of(&report));
                }
            }
            // A training site's heartbeat; late or stray ones are harmless and ignored.
            In::Progress(p) => {
                if p.round == r.id
                    && let Some(heard) = &mut r.heard
                    && let Some(at) = heard.get_mut(site)
                {
                    *at = now;
                }
                return;
            }
            In::Decision(d) if d.round != r.id => {} // a late answer to an earlier offer
            In::Decision(d) => {
                let awaited = match &mut r.step {
                    Step::Decisions { pending } => pending.remove(site),
                    _ => false,
                };
                if !awaited {
                    self.unexpected(site);
                } else if !d.accept {
                    r.active.remove(site);
                    let note = format!("{site} declined round {}: {}", d.round, d.reason);
                    self.events.push_back(Event::Note(note));
                    let round = r.id;
                    self.record(
                        Some(round),
                        Some(site),
                        What::Refused {
                            reason: d.reason,
                            what: Some("round declined by site policy"),
                        },
                    );
                }
            }
            message => self.phase_message(site, message),
        }
        self.advance(now);
    }

    /// A head of `node` (`"site:<name>"`) witnessed before a restart, read back from this
    /// node's own log: that site's next head must move on from it.
    pub fn remember_witnessed(&mut self, node: &str, head: quorum_audit::Head) {
        self.witness.remember(node, head);
    }

    /// The audit head the driver signed for the latest [`Durable::SignedHead`]: sent to the
    /// round's sites (or, at the end, to every connected site before `Finished`) to witness.
    pub fn head_signed(&mut self, head: pb::AuditHead) {
        let Some(delivery) = self.head_deliveries.pop_front() else {
            return;
        };
        let at = delivery.at.min(self.transmits.len());
        for (i, site) in delivery.to.iter().enumerate() {
            let transmit = Transmit::Message {
                to: site.clone(),
                body: Out::AuditHead(head.clone()),
            };
            self.transmits.insert(at + i, transmit);
        }
        for later in &mut self.head_deliveries {
            later.at += delivery.to.len();
        }
        self.awaiting_heads.extend(delivery.to);
        if let Some(finished) = delivery.then {
            self.broadcast(Out::Finished(finished));
        }
    }

    /// A site's signed head, sent back at a round end: stored as a witness if it was asked for
    /// and checks out, recorded as a refusal if not (one site cannot stop the aggregator this
    /// way, nor fill its log with witnesses).
    fn site_head(&mut self, site: &str, head: &pb::AuditHead) {
        let round = Some(head.round).filter(|&r| r > 0);
        let what = if !self.awaiting_heads.remove(site) {
            What::Refused {
                reason: "an audit head this node did not ask for (one per head it sends)".into(),
                what: Some("site audit head"),
            }
        } else {
            match self.witness.observe(&format!("site:{site}"), head) {
                Ok(witnessed) => What::Witnessed(witnessed),
                Err(e) => What::Refused {
                    reason: e.to_string(),
                    what: Some("site audit head"),
                },
            }
        };
        self.record(round, Some(site), what);
    }

    /// A complete upload from `site`, whole in memory.
    pub fn handle_upload(&mut self, now: Instant, site: &str, upload: Upload<'_>) {
        let part = UploadPart {
            round: upload.round,
            offset: 0,
            values: upload.values,
            complete: Some(UploadDigest {
                sha256: upload.sha256,
                bytes: upload.bytes,
            }),
        };
        self.handle_upload_part(now, site, part);
    }

    /// A piece of a complete upload from `site`, added to the sum as it comes; false when it
    /// was refused, and the driver should not offer the rest. An upload refused after some of
    /// its pieces were added has spoilt the sum: the round then fails when its uploads close,
    /// and is redone.
    pub fn handle_upload_part(&mut self, now: Instant, site: &str, part: UploadPart<'_>) -> bool {
        let bits = self.cfg.modulus_bits;
        let Stage::Round(r) = &mut self.stage else {
            return false;
        };
        let open = matches!(r.step, Step::Plain { .. })
            || matches!(
                r.step,
                Step::Secure {
                    phase: Phase::MaskedInput,
                    ..
                }
            );
        if !open || part.round != r.id {
            self.unexpected(site);
            return false;
        }
        let Some(index) = r.index(site).filter(|_| r.active.contains(site)) else {
            return false;
        };
        let len = vector_len(r.evaluation_only, r.dp.padded_dim);
        let offset = usize::try_from(part.offset).unwrap_or(usize::MAX);
        let end = offset.saturating_add(part.values.len());
        // A last piece must end the vector, and no piece may run past it.
        let wrong_length = (part.complete.is_some() != (end == len) || end > len)
            .then(|| format!("update has {end} elements, expected {len}"));
        let outcome = {
            match &mut r.step {
                Step::Plain {
                    sum,
                    received,
                    partial,
                } => {
                    let added = partial.get(&index).copied().unwrap_or(0);
                    if received.contains(&index) {
                        Err("duplicate update for this round".to_owned())
                    } else if offset != added {
                        Err(format!("update part at offset {offset}, expected {added}"))
                    } else if let Some(reason) = wrong_length {
                        Err(reason)
                    } else {
                        let mask = if bits == 32 {
                            u32::MAX
                        } else {
                            (1u32 << bits) - 1
                        };
                        for (s, v) in sum[offset..end].iter_mut().zip(part.values) {
                            *s = s.wrapping_add(*v) & mask;
                        }
                        if end == len {
                            partial.remove(&index);
                            received.insert(index);
                            Ok(true)
                        } else {
                            partial.insert(index, end);
                            Ok(false)
                        }
                    }
                }
                Step::Secure {
                    server,
                    responded,
                    refused,
                    ..
                } => match wrong_length.filter(|_| !responded.contains(&index)) {
                    // The server's own refusal names a repeat as such.
                    Some(reason) => {
                        refused.insert(index);
                        Err(reason)
                    }
                    None => match server.add_masked_input_part(index, offset, part.values) {
                        Ok(done) => {
                            if done {
                                responded.insert(index);
                            }
                            Ok(done)
                        }
                        Err(e) => {
                            // Out of this phase at once, as for any refused SecAgg+ message.
                            refused.insert(index);
                            Err(e.to_string())
                        }
                    },
                },
                _ => unreachable!("checked above"),
            }
        };
        let round = r.id;
        match (outcome, part.complete) {
            // More pieces to come.
            (Ok(false), _) => return true,
            (Ok(true), Some(digest)) => {
                r.upload_bytes += digest.bytes;
                let what = What::Upload {
                    sha256: hex::encode(digest.sha256),
                    bytes: digest.bytes,
                };
                self.record(Some(round), Some(site), what);
            }
            (Ok(true), None) => unreachable!("the last piece is checked to be complete"),
            (Err(reason), _) => {
                self.record(Some(round), Some(site), What::refused(reason));
                self.advance(now);
                return false;
            }
        }
        self.advance(now);
        true
    }

    /// The driver applied round `round`'s update: `model` is the new global model, saved at
    /// `checkpoint`.
    pub fn model_updated(&mut self, now: Instant, round: u32, model: ModelInfo, checkpoint: &str) {
        let Stage::Round(r) = &self.stage else {
            return;
        };
        let Step::Applying { survivors } = &r.step else {
            return;
        };
        if r.id != round {
            return;
        }
        let (rho, survivors) = (r.rho, survivors.clone());
        if self.cfg.dp.enabled
            && let Err(e) = self.accountant.record(round, rho)
        {
            self.fail(format!("privacy accountant: {e}"));
            return;
        }
        let epsilon = self.cfg.dp.enabled.then(|| self.accountant.epsilon());
        let sha = hex::encode(model.sha256);
        self.record(
            Some(round),
            None,
            What::Checkpoint {
                path: checkpoint.to_owned(),
                sha256: sha.clone(),
            },
        );
        self.record(
            Some(round),
            None,
            What::ModelDigest {
                sha256: sha.clone(),
                round,
                direction: None,
            },
        );
        self.record(
            Some(round),
            None,
            What::FederationPrivacy {
                rho,
                epsilon,
                delta: self.cfg.dp.delta.get(),
                dp_enabled: self.cfg.dp.enabled,
            },
        );
        self.model = model;
        let Stage::Round(r) = std::mem::replace(&mut self.stage, Stage::Done) else {
            unreachable!("matched above")
        };
        let dropped: Vec<String> = r
            .cohort
            .iter()
            .filter(|s| !survivors.contains(s))
            .cloned()
            .collect();
        let summary = RoundSummary {
            round,
            evaluation_only: false,
            survivors: survivors.clone(),
            dropped: dropped.clone(),
            seconds: now.saturating_duration_since(r.started).as_secs_f64(),
            upload_bytes: r.upload_bytes,
            download_bytes: r.download_bytes,
            epsilon,
            rho,
            model_sha256: sha,
            reports: r.reports,
            metrics: r.metrics,
        };
        self.history.push(summary.clone());
        self.audit.push_back(Durable::SaveState);
        self.record(
            Some(round),
            None,
            What::RoundCompleted {
                survivors: summary.survivors.clone(),
                dropped,
                seconds: summary.seconds,
                upload_bytes: summary.upload_bytes,
            },
        );
        self.audit.push_back(Durable::SignedHead(Some(round)));
        let result = pb::RoundResult {
            round,
            survivors,
            new_model_sha256: model.sha256.to_vec(),
            epsilon: epsilon.unwrap_or(f64::INFINITY),
            delta: self.cfg.dp.delta.get(),
        };
        for site in &r.cohort {
            self.send(site, Out::Result(result.clone()));
        }
        self.head_deliveries.push_back(HeadDelivery {
            to: r.cohort.clone(),
            at: self.transmits.len(),
            then: None,
        });
        self.events.push_back(Event::RoundDone(summary));
        self.attempts = 0;
        self.next(now);
    }

    fn current_round(&self) -> Option<u32> {
        match &self.stage {
            Stage::Cohort { round, .. } => Some(*round),
            Stage::Round(r) => Some(r.id),
            Stage::Idle | Stage::Done => None,
        }
    }

    fn record(&mut self, round: Option<u32>, site: Option<&str>, what: What) {
        self.audit.push_back(Durable::Audit(Fact {
            round,
            site: site.map(str::to_owned),
            what,
        }));
    }

    fn send(&mut self, site: &str, body: Out) {
        self.transmits.push_back(Transmit::Message {
            to: site.to_owned(),
            body,
        });
    }

    fn broadcast(&mut self, body: Out) {
        for site in self.connected.clone() {
            self.send(&site, body.clone());
        }
    }

    /// Starts the next round attempt, the final evaluation, or ends the federation.
    fn next(&mut self, now: Instant) {
        let evaluation_only = if self.completed_rounds() < self.cfg.rounds {
            false
        } else if !self.history.last().is_some_and(|s| s.evaluation_only) {
            true
        } else {
            self.finish();
            return;
        };
        // Every attempt gets a fresh round id, so a retried round is a new release of (noised)
        // data in every ledger rather than a replay of the old one.
        let round = self.next_round;
        self.next_round += 1;
        if !evaluation_only {
            self.attempts += 1;
        }
        self.stage = Stage::Cohort {
            round,
            evaluation_only,
            deadline: now + self.cfg.cohort_timeout,
        };
        self.try_start(now);
    }

    fn try_start(&mut self, now: Instant) {
        let Stage::Cohort {
            round,
            evaluation_only,
            ..
        } = self.stage
        else {
            return;
        };
        // Certificates are checked only once enough sites are there to start.
        let eligible = if self.connected.len() < self.cfg.min_clients {
            Vec::new()
        } else {
            self.eligible_sites(round)
        };
        if eligible.len() < self.cfg.min_clients {
            self.events.push_back(Event::Phase(format!(
                "waiting for sites ({}/{} connected)",
                eligible.len(),
                self.cfg.min_clients
            )));
            return;
        }
        let mut cohort = eligible;
        if cohort.len() > self.cfg.max_clients {
            // A fresh random cohort each round, so no site is systematically left out.
            rand::seq::SliceRandom::shuffle(cohort.as_mut_slice(), &mut self.rng);
            cohort.truncate(self.cfg.max_clients);
            cohort.sort();
        }
        if let Err(reason) = self.offer(now, round, evaluation_only, cohort) {
            self.abort(now, round, reason);
        }
    }

    /// The connected sites whose certificates still pass the verifier's checks. A site revoked
    /// since it connected is left out (recorded once), so it is no one's peer in any round.
    fn eligible_sites(&mut self, round: u32) -> Vec<String> {
        let mut eligible = Vec::new();
        for site in self.connected.clone() {
            match self.verifier.check_member(&site) {
                Ok(()) => eligible.push(site),
                Err(e) => {
                    if self.left_out.insert(site.clone()) {
                        let reason = format!("{site} is left out of every cohort: {e}");
                        self.events.push_back(Event::Note(reason.clone()));
                        self.record(Some(round), Some(&site), What::refused(reason));
                    }
                }
            }
        }
        eligible
    }

    fn offer(
        &mut self,
        now: Instant,
        round: u32,
        evaluation_only: bool,
        cohort: Vec<String>,
    ) -> Result<(), String> {
        let n = cohort.len() as u32;
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        // The final evaluation runs through secure aggregation too, on the metrics alone: the
        // aggregator learns the mean validation loss, not any one site's.
        let secure = self.cfg.secure_aggregation;
        let RoundPlan {
            secagg,
            min_survivors,
            noised,
            dp_params,
            rho,
        } = self
            .cfg
            .plan_round(self.model.parameters, n, evaluation_only)?;
        let dp_cfg = &self.cfg.dp;
        // The CA's list goes with the offer: sites check their peers and this aggregator
        // against it, whoever the aggregator would rather keep.
        let revocation_list = self
            .verifier
            .revocation_list()
            .map_err(|e| format!("the revocation list cannot be relayed: {e}"))?;
        let training = &self.cfg.training;
        let completed = self.completed_rounds();
        let config = pb::RoundConfig {
            round,
            federation: self.cfg.federation.clone(),
            cohort: cohort.clone(),
            model_sha256: self.model.sha256.to_vec(),
            model_bytes: self.model.bytes,
            num_parameters: self.model.parameters as u64,
            local_steps: if evaluation_only {
                0
            } else {
                training.local_steps
            },
            global_step: u64::from(completed) * u64::from(training.local_steps),
            total_steps: training.total_steps,
            secure_aggregation: secure,
            neighbours: secagg.as_ref().map_or(0, |p| p.neighbours),
            threshold: secagg.as_ref().map_or(0, |p| p.threshold),
            modulus_bits: self.cfg.modulus_bits,
            round_seed: seed.to_vec(),
            dp: Some(pb::DpParams {
                enabled: dp_cfg.enabled,
                clip_norm: dp_params.clip_norm,
                noise_stddev: dp_params.noise_stddev,
                gamma: dp_params.gamma,
                delta: dp_cfg.delta.get(),
                rho,
                padded_dim: dp_params.padded_dim as u64,
                beta: dp_params.beta,
                noised_clients: noised,
            }),
            batch_size: training.batch_size,
            seq_len: training.seq_len,
            lr: training.lr,
            warmup_steps: training.warmup_steps,
            reset_local_optimizer: training.reset_local_optimizer,
            heartbeat_interval_ms: heartbeat_interval(self.cfg.phase_timeout),
            min_survivors,
            completed_rounds: completed,
            revocation_list,
        };
        // The id is spent from here on: a restart must not offer it again.
        self.audit.push_back(Durable::SaveState);
        let offered = Offered {
            cohort: cohort.clone(),
            secure_aggregation: secure,
            evaluation_only,
            neighbours: config.neighbours,
            threshold: config.threshold,
            min_survivors,
            modulus_bits: config.modulus_bits,
            dp_enabled: dp_cfg.enabled,
            rho,
            model_sha256: hex::encode(self.model.sha256),
            round_seed: hex::encode(seed),
        };
        self.record(Some(round), None, What::CohortSelected(Box::new(offered)));
        self.events.push_back(Event::Phase(format!(
            "round {round}: offering to {n} sites: {}",
            cohort.join(", ")
        )));
        if secagg
            .as_ref()
            .and_then(secagg::Params::guaranteed_dropouts)
            == Some(0)
        {
            self.events.push_back(Event::Note(format!(
                "round {round}: with {n} sites secure aggregation tolerates no dropout: a site \
                 lost mid-round aborts it (it is retried)"
            )));
        }
        for site in &cohort {
            self.send(site, Out::RoundConfig(config.clone()));
        }
        self.events.push_back(Event::Phase(format!(
            "round {round}: waiting for site decisions"
        )));
        let after_decisions = match secagg {
            Some(params) => Step::Secure {
                server: Box::new(
                    ServerRound::new(wire::round_context(&config, seed, params.dim))
                        .map_err(|e| e.to_string())?,
                ),
                phase: Phase::Advertise,
                expected: BTreeSet::new(),
                responded: BTreeSet::new(),
                refused: BTreeSet::new(),
            },
            None if evaluation_only => Step::Reports,
            None => Step::Plain {
                sum: vec![0; vector_len(false, dp_params.padded_dim)],
                received: BTreeSet::new(),
                partial: BTreeMap::new(),
            },
        };
        self.stage = Stage::Round(Box::new(Round {
            id: round,
            evaluation_only,
            started: now,
            active: cohort.iter().cloned().collect(),
            step: Step::Decisions {
                pending: cohort.iter().cloned().collect(),
            },
            after_decisions: Some(after_decisions),
            heard: None,
            cohort,
            reports: BTreeMap::new(),
            metrics: None,
            upload_bytes: 0,
            download_bytes: 0,
            dp: dp_params,
            rho,
            seed,
            deadline: now + self.cfg.phase_timeout,
        }));
        Ok(())
    }
}

impl Coordinator {
    /// A SecAgg+ message: judged by the server state machine in its phase.
    fn phase_message(&mut self, site: &str, message: In) {
        let verifier = Arc::clone(&self.verifier);
        let Stage::Round(r) = &mut self.stage else {
            return;
        };
        let (round, index) = (r.id, r.index(site));
        let Step::Secure {
            server,
            phase,
            responded,
            refused,
            ..
        } = &mut r.step
        else {
            self.unexpected(site);
            return;
        };
        let Some(index) = index else {
            self.unexpected(site);
            return;
        };
        let auth = CohortAuthenticator {
            verifier: verifier.as_ref(),
            cohort: &r.cohort,
        };
        // A late message of an earlier attempt is refused without costing the site this one.
        let this_round = match &message {
            In::Advertise(m) => m.round,
            In::ShareKeys(m) => m.round,
            In::Consistency(m) => m.round,
            In::Unmask(m) => m.round,
            _ => 0,
        } == round;
        let judged: Result<(), String> = match (*phase, message) {
            // Advertisements are checked here as the neighbours will check them, so one bad
            // advertisement makes its sender a dropout rather than every neighbour's reason to
            // refuse the round.
            (Phase::Advertise, In::Advertise(adv)) if adv.round == round && adv.client == index => {
                wire::advertisement_from_pb(adv)
                    .map_err(|e| e.to_string())
                    .and_then(|a| {
                        server
                            .handle_advertisement(a, &auth)
                            .map_err(|e| e.to_string())
                    })
            }
            (Phase::Advertise, In::Advertise(_)) => {
                Err("advertisement for another round or client index".into())
            }
            (Phase::ShareKeys, In::ShareKeys(m)) if m.round == round => server
                .handle_share_keys(index, wire::shares_from_pb(m.shares))
                .map_err(|e| e.to_string()),
            (Phase::ShareKeys, In::ShareKeys(_)) => Err("shares for another round".into()),
            (Phase::Consistency, In::Consistency(sig))
                if sig.round == round && sig.client == index =>
            {
                server
                    .handle_consistency(wire::consistency_from_pb(sig), &auth)
                    .map_err(|e| e.to_string())
            }
            (Phase::Consistency, In::Consistency(_)) => {
                Err("consistency signature for another round or client".into())
            }
            (Phase::Unmask, In::Unmask(m)) if m.round == round && m.client == index => {
                wire::unmask_from_pb(m)
                    .map_err(|e| e.to_string())
                    .and_then(|u| server.handle_unmask(u).map_err(|e| e.to_string()))
            }
            (Phase::Unmask, In::Unmask(_)) => {
                Err("unmask shares for another round or client".into())
            }
            _ => {
                self.unexpected(site);
                return;
            }
        };
        match judged {
            Ok(()) => {
                responded.insert(index);
            }
            Err(reason) => {
                if this_round {
                    refused.insert(index);
                }
                self.record(Some(round), Some(site), What::refused(reason));
            }
        }
    }

    /// Audits a message that does not belong in the current step.
    fn unexpected(&mut self, site: &str) {
        let Stage::Round(r) = &self.stage else {
            return;
        };
        let (round, expected) = (r.id, r.expects());
        self.record(
            Some(round),
            Some(site),
            What::refused(format!("message in the wrong phase (expected {expected})")),
        );
    }

    /// Closes every step that has what it waits for.
    fn advance(&mut self, now: Instant) {
        while let Stage::Round(r) = &self.stage {
            if !r.complete() {
                return;
            }
            self.close_step(now);
        }
    }

    /// Ends the current step (complete, or at its deadline) and starts the next.
    fn close_step(&mut self, now: Instant) {
        let Stage::Round(r) = &mut self.stage else {
            return;
        };
        let round = r.id;
        let step = std::mem::replace(
            &mut r.step,
            Step::Applying {
                survivors: Vec::new(),
            },
        );
        // Training ends with the step that follows the decisions.
        r.heard = None;
        let outcome = match step {
            Step::Decisions { pending } => self.close_decisions(now, pending),
            Step::Reports => {
                self.close_evaluation(now, None);
                Ok(())
            }
            Step::Plain {
                sum,
                received,
                partial,
            } => self.close_plain(now, sum, received, partial),
            Step::Secure {
                server,
                phase,
                expected,
                responded,
                ..
            } => self.close_phase(now, server, phase, &expected, responded),
            Step::Applying { .. } => Ok(()),
        };
        if let Err(reason) = outcome {
            self.abort(now, round, reason);
        }
    }

    fn round_mut(&mut self) -> &mut Round {
        match &mut self.stage {
            Stage::Round(r) => r,
            _ => unreachable!("only called during a round"),
        }
    }

    fn close_decisions(&mut self, now: Instant, pending: BTreeSet<String>) -> Result<(), String> {
        let min_clients = self.cfg.min_clients;
        let (phase_timeout, training_timeout) = (self.cfg.phase_timeout, self.cfg.training_timeout);
        let model_bytes = self.model.bytes;
        let r = self.round_mut();
        for site in &pending {
            r.active.remove(site);
        }
        if r.active.len() < min_clients {
            return Err(format!(
                "{} sites accepted round {}, {} needed",
                r.active.len(),
                r.id,
                min_clients
            ));
        }
        let to: Vec<String> = r.active.iter().cloned().collect();
        r.download_bytes = model_bytes * to.len() as u64;
        let (round, active) = (r.id, to.len());
        let mut next = r.after_decisions.take().expect("prepared with the offer");
        let phase = match &mut next {
            Step::Reports => format!("final evaluation by {active} sites"),
            Step::Plain { .. } => format!("round {round}: local training and plain uploads"),
            Step::Secure { expected, .. } => {
                *expected = r.active.iter().filter_map(|s| r.index(s)).collect();
                format!("round {round}: local training, then key advertisement")
            }
            _ => unreachable!("prepared with the offer"),
        };
        r.step = next;
        // Local training happens between the model download and the next message.
        r.deadline = now + training_timeout.max(phase_timeout);
        r.heard = Some(r.active.iter().map(|s| (s.clone(), now)).collect());
        self.transmits.push_back(Transmit::Model { round, to });
        self.events.push_back(Event::Phase(phase));
        Ok(())
    }

    /// Ends the final evaluation: with the survivors of its secure sum, or (plain) every site
    /// still there.
    fn close_evaluation(&mut self, now: Instant, secure: Option<Vec<String>>) {
        let epsilon = self.cfg.dp.enabled.then(|| self.accountant.epsilon());
        let model_sha256 = hex::encode(self.model.sha256);
        let Stage::Round(r) = std::mem::replace(&mut self.stage, Stage::Done) else {
            unreachable!("only called during a round")
        };
        let survivors = secure
            .clone()
            .unwrap_or_else(|| r.active.iter().cloned().collect());
        let dropped = r
            .cohort
            .iter()
            .filter(|s| !survivors.contains(s))
            .cloned()
            .collect();
        let summary = RoundSummary {
            round: r.id,
            evaluation_only: true,
            survivors: survivors.clone(),
            dropped,
            seconds: now.saturating_duration_since(r.started).as_secs_f64(),
            upload_bytes: r.upload_bytes,
            download_bytes: r.download_bytes,
            epsilon,
            rho: 0.0,
            model_sha256,
            reports: r.reports,
            metrics: r.metrics,
        };
        if secure.is_some() {
            // The cohort learns that the sum closed, on the model it evaluated.
            let result = pb::RoundResult {
                round: r.id,
                survivors: survivors.clone(),
                new_model_sha256: self.model.sha256.to_vec(),
                epsilon: epsilon.unwrap_or(f64::INFINITY),
                delta: self.cfg.dp.delta.get(),
            };
            for site in &r.cohort {
                self.send(site, Out::Result(result.clone()));
            }
        }
        self.history.push(summary.clone());
        self.audit.push_back(Durable::SaveState);
        self.events.push_back(Event::RoundDone(summary));
        self.next(now);
    }

    fn close_plain(
        &mut self,
        now: Instant,
        sum: Vec<u32>,
        received: BTreeSet<u32>,
        partial: BTreeMap<u32, usize>,
    ) -> Result<(), String> {
        if let Some((&index, &added)) = partial.first_key_value() {
            let site = self.round_mut().name(index);
            return Err(format!(
                "{site}'s update is only partly in the sum ({added} elements); the sum is spoilt"
            ));
        }
        let needed = self.cfg.min_clients.max(1);
        if received.len() < needed {
            return Err(format!(
                "{} updates arrived, {} needed",
                received.len(),
                self.cfg.min_clients
            ));
        }
        self.aggregate(now, sum, received.into_iter().collect())
    }

    fn phase_done(&mut self, phase: Phase, expected: &BTreeSet<u32>, responded: &BTreeSet<u32>) {
        let r = self.round_mut();
        let round = r.id;
        let survivors: Vec<String> = responded.iter().map(|&i| r.name(i)).collect();
        let dropouts: Vec<String> = expected.difference(responded).map(|&i| r.name(i)).collect();
        if !dropouts.is_empty() {
            let note = format!("round {round}: {phase}: dropped {}", dropouts.join(", "));
            self.events.push_back(Event::Note(note));
        }
        let what = What::PhaseCompleted {
            phase: phase.name(),
            survivors,
            dropouts,
        };
        self.record(Some(round), None, what);
    }

    /// Closes a SecAgg+ phase: the server's answers go out and the next phase begins.
    fn close_phase(
        &mut self,
        now: Instant,
        mut server: Box<ServerRound>,
        phase: Phase,
        expected: &BTreeSet<u32>,
        responded: BTreeSet<u32>,
    ) -> Result<(), String> {
        self.phase_done(phase, expected, &responded);
        let fail = |e: secagg::Error| e.to_string();
        let round = self.round_mut().id;
        let cohort = self.round_mut().cohort.clone();
        let (next, message) = match phase {
            Phase::Advertise => {
                for (client, adverts) in server.close_advertise().map_err(fail)? {
                    let peers = adverts
                        .into_iter()
                        .map(|a| wire::advertisement_to_pb(round, a))
                        .collect();
                    self.send(
                        &cohort[client as usize],
                        Out::PeerKeys(pb::PeerKeys { round, peers }),
                    );
                }
                (Phase::ShareKeys, "sharing keys")
            }
            Phase::ShareKeys => {
                for (client, shares) in server.close_share_keys().map_err(fail)? {
                    let shares = wire::shares_to_pb(shares);
                    let msg = Out::ForwardedShares(pb::ForwardedShares { round, shares });
                    self.send(&cohort[client as usize], msg);
                }
                (Phase::MaskedInput, "receiving masked updates")
            }
            Phase::MaskedInput => {
                let survivors = server.close_masked_input().map_err(fail)?;
                let msg = Out::Survivors(pb::SurvivorSet {
                    round,
                    clients: survivors.clone(),
                });
                for &client in &survivors {
                    self.send(&cohort[client as usize], msg.clone());
                }
                let phase_timeout = self.cfg.phase_timeout;
                let r = self.round_mut();
                r.step = Step::Secure {
                    server,
                    phase: Phase::Consistency,
                    expected: survivors.into_iter().collect(),
                    responded: BTreeSet::new(),
                    refused: BTreeSet::new(),
                };
                r.deadline = now + phase_timeout;
                self.events
                    .push_back(Event::Phase(format!("round {round}: consistency check")));
                return Ok(());
            }
            Phase::Consistency => {
                let signatures = server.close_consistency().map_err(fail)?;
                let request = pb::UnmaskRequest {
                    round,
                    signatures: signatures
                        .into_iter()
                        .map(|s| wire::consistency_to_pb(round, s))
                        .collect(),
                };
                for &client in &responded {
                    self.send(
                        &cohort[client as usize],
                        Out::UnmaskRequest(request.clone()),
                    );
                }
                (Phase::Unmask, "unmasking")
            }
            Phase::Unmask => {
                let aggregate = server.finish().map_err(fail)?;
                return self.aggregate(now, aggregate.sum, aggregate.survivors);
            }
        };
        let phase_timeout = self.cfg.phase_timeout;
        let r = self.round_mut();
        r.step = Step::Secure {
            server,
            phase: next,
            expected: responded,
            responded: BTreeSet::new(),
            refused: BTreeSet::new(),
        };
        r.deadline = now + phase_timeout;
        self.events
            .push_back(Event::Phase(format!("round {round}: {message}")));
        Ok(())
    }

    /// Records the sum, decodes it and hands the mean update to the driver.
    fn aggregate(
        &mut self,
        now: Instant,
        mut sum: Vec<u32>,
        survivors: Vec<u32>,
    ) -> Result<(), String> {
        let r = self.round_mut();
        let round = r.id;
        let names: Vec<String> = survivors.iter().map(|&i| r.name(i)).collect();
        let (update, tail) = sum.split_at(sum.len().saturating_sub(metrics::SLOTS));
        let update_len = update.len();
        r.metrics = metrics::decode(tail);
        if r.evaluation_only {
            self.record(
                Some(round),
                None,
                What::AggregateDigest {
                    sha256: hex::encode(digest_u32(&sum)),
                    survivors: names.clone(),
                },
            );
            self.close_evaluation(now, Some(names));
            return Ok(());
        }
        let sha256 = hex::encode(digest_u32(&sum));
        // Decoded in the sum's own memory: the mean takes its place rather than joining it.
        sum.truncate(update_len);
        let mut mean = dp::decode_in_place(sum, &r.dp, &r.seed)
            .map_err(|e| format!("could not decode the aggregate: {e}"))?;
        let count = survivors.len() as f32;
        mean.iter_mut().for_each(|v| *v /= count);
        r.step = Step::Applying {
            survivors: names.clone(),
        };
        self.record(
            Some(round),
            None,
            What::AggregateDigest {
                sha256,
                survivors: names,
            },
        );
        self.events.push_back(Event::ApplyUpdate { round, mean });
        Ok(())
    }

    /// Ends attempt `round`; retries under a fresh id unless attempts are used up.
    fn abort(&mut self, now: Instant, round: u32, reason: String) {
        let evaluation_only = match &self.stage {
            Stage::Cohort {
                evaluation_only, ..
            } => *evaluation_only,
            Stage::Round(r) => r.evaluation_only,
            Stage::Idle | Stage::Done => return,
        };
        self.stage = Stage::Done;
        if evaluation_only {
            self.events.push_back(Event::Note(format!(
                "final evaluation incomplete: {reason}"
            )));
            // Sites still in its secure sum learn it ended before `Finished` reaches them.
            self.record(
                Some(round),
                None,
                What::RoundAborted {
                    reason: reason.clone(),
                    attempt: None,
                },
            );
            self.broadcast(Out::Aborted(pb::RoundAborted { round, reason }));
            self.finish();
            return;
        }
        self.events
            .push_back(Event::Note(format!("round {round} aborted: {reason}")));
        self.record(
            Some(round),
            None,
            What::RoundAborted {
                reason: reason.clone(),
                attempt: Some(self.attempts),
            },
        );
        self.audit.push_back(Durable::SaveState);
        self.broadcast(Out::Aborted(pb::RoundAborted {
            round,
            reason: reason.clone(),
        }));
        if self.attempts >= self.cfg.max_round_attempts {
            self.fail(format!(
                "{} attempts in a row failed; last reason: {reason}",
                self.attempts
            ));
        } else {
            self.next(now);
        }
    }

    fn fail(&mut self, reason: String) {
        self.stage = Stage::Done;
        self.events.push_back(Event::Failed(reason));
    }

    /// Announces the final model to every connected site.
    fn finish(&mut self) {
        self.stage = Stage::Done;
        let sha = self.model.sha256;
        self.record(
            None,
            None,
            What::Stopped {
                final_model_sha256: hex::encode(sha),
                rounds: None,
            },
        );
        self.audit.push_back(Durable::SignedHead(None));
        // Finished follows the final head, so that every site witnesses it before it stops.
        self.head_deliveries.push_back(HeadDelivery {
            to: self.connected.iter().cloned().collect(),
            at: self.transmits.len(),
            then: Some(pb::Finished {
                rounds: self.cfg.rounds,
                final_model_sha256: sha.to_vec(),
            }),
        });
        self.events.push_back(Event::Finished);
    }
}

fn report_of(report: &pb::RoundReport) -> SiteReport {
    SiteReport {
        train_loss: report.train_loss,
        val_loss_before: report.val_loss_before,
        val_loss_after: report.val_loss_after,
        tokens: report.tokens,
        seconds: report.seconds,
        epsilon_spent: report.epsilon_spent,
    }
}

/// SHA-256 of a serialised model, for [`ModelInfo`].
pub fn model_info(bytes: &[u8], parameters: usize) -> ModelInfo {
    ModelInfo {
        sha256: sha256(bytes),
        bytes: bytes.len() as u64,
        parameters,
    }
}
