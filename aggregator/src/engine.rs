//! The round engine: one task that runs the federation's rounds. It selects a cohort, announces
//! the round, streams the global model, drives the secure-aggregation state machine through its
//! phases (each with a deadline), decodes the noised sum, applies the outer optimizer and writes
//! a checkpoint. Every decision is written to the audit log before it is acted on.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use quorum_attest::{CohortAuthenticator, PeerVerifier};
use quorum_audit::{AuditLog, Kind};
use quorum_crypto::{
    dp::{self, DpParams},
    secagg::{self, Phase, RoundContext, ServerRound},
};
use quorum_policies::{
    accountant::Accountant,
    config::federation::{PrivacySettings, TrainingSettings},
};
use quorum_proto::{
    MAX_CHUNK_BYTES, secagg as wire,
    v1::{self as pb, client_message::Body, server_message::Body as Out},
};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::{
    model_store::{FlatModel, sha256},
    outer::{OuterOptimizer, OuterState, OuterStep as _},
    progress::Progress,
    service::{Event, Registry, UploadGate, UploadSpec},
    state::{PersistedState, StateDir},
};

/// Everything the engine needs, resolved from `federation.toml`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Federation name.
    pub federation: String,
    /// Training rounds to run.
    pub rounds: u32,
    /// Smallest cohort a round starts with.
    pub min_clients: usize,
    /// Largest cohort.
    pub max_clients: usize,
    /// How long to wait for `min_clients` sites before giving up.
    pub cohort_timeout: Duration,
    /// Deadline for each protocol phase.
    pub phase_timeout: Duration,
    /// Deadline for local training (until the first message after the model download).
    pub training_timeout: Duration,
    /// Local training settings sent to the sites.
    pub training: TrainingSettings,
    /// Secure aggregation on (default) or plain encoded uploads.
    pub secure_aggregation: bool,
    /// Bits per element of the encoded vector.
    pub modulus_bits: u32,
    /// Fraction of clients assumed to collude with the aggregator.
    pub corrupt_fraction: f64,
    /// Fraction of clients assumed to drop out.
    pub dropout_fraction: f64,
    /// Differential privacy.
    pub dp: PrivacySettings,
    /// Outer optimizer.
    pub outer: OuterOptimizer,
    /// Where checkpoints, state and metrics go.
    pub state_dir: PathBuf,
    /// Failed attempts at one round before the federation stops.
    pub max_round_attempts: u32,
    /// Concurrent upload reassembly buffers.
    pub upload_slots: usize,
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundSummary {
    /// Round number (the final evaluation has `local_steps == 0`).
    pub round: u32,
    /// True for the evaluation-only pass after the last round.
    pub evaluation_only: bool,
    /// Sites whose updates are in the sum.
    pub survivors: Vec<String>,
    /// Sites of the cohort that dropped or refused.
    pub dropped: Vec<String>,
    /// Wall-clock seconds.
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
    /// What each site reported.
    pub reports: BTreeMap<String, SiteReport>,
}

enum RoundError {
    /// The round could not complete; a new attempt may.
    Aborted(String),
    /// The node must stop (e.g. the audit log cannot be written).
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for RoundError {
    fn from(e: anyhow::Error) -> Self {
        Self::Fatal(e)
    }
}

/// SHA-256 of a vector of u32 as little-endian bytes, without materialising all the bytes.
fn digest_u32(values: &[u32]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in values.chunks(1 << 14) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
        ctx.update(&buf);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Sites the global model is streamed to at the same time.
const MODEL_SEND_CONCURRENCY: usize = 8;

/// What a phase made of one message.
enum Handled {
    /// Counted as the site's answer in this phase.
    Accepted,
    /// Refused (logged and audited); the site may still answer correctly before the deadline.
    Rejected(String),
    /// Not a message of this phase.
    NotMine(Body),
}

fn aborted(reason: impl Into<String>) -> RoundError {
    RoundError::Aborted(reason.into())
}

/// Per-round bookkeeping shared by the phase handlers.
struct RoundState {
    round: u32,
    cohort: Vec<String>,
    active: BTreeSet<String>,
    reports: BTreeMap<String, SiteReport>,
    upload_bytes: u64,
}

impl RoundState {
    /// Whether a site of `expected` that is still connected has not answered yet: a phase
    /// ends as soon as every live site has, instead of holding out for the dead until the
    /// deadline.
    fn awaiting(&self, expected: &BTreeSet<u32>, responded: &BTreeSet<u32>) -> bool {
        expected.difference(responded).any(|&i| {
            self.cohort
                .get(i as usize)
                .is_some_and(|site| self.active.contains(site))
        })
    }

    fn index(&self, site: &str) -> Option<u32> {
        self.cohort.iter().position(|s| s == site).map(|i| i as u32)
    }
}

/// The round engine.
pub struct Engine {
    cfg: EngineConfig,
    registry: Arc<Registry>,
    gate: Arc<UploadGate>,
    events: mpsc::Receiver<Event>,
    audit: AuditLog,
    peers: std::sync::Arc<PeerVerifier>,
    state_dir: StateDir,
    model: FlatModel,
    model_bytes: Vec<u8>,
    outer_state: OuterState,
    accountant: Accountant,
    next_round: Arc<AtomicU32>,
    progress: Progress,
    history: Vec<RoundSummary>,
    /// Round id of the checkpoint the global model comes from (0: the initial model).
    last_checkpoint: u32,
}

impl Engine {
    /// An engine resuming from `state_dir` if it holds a completed round, else starting from
    /// `initial_model`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: EngineConfig,
        registry: Arc<Registry>,
        gate: Arc<UploadGate>,
        events: mpsc::Receiver<Event>,
        audit: AuditLog,
        peers: PeerVerifier,
        initial_model: Vec<u8>,
        next_round: Arc<AtomicU32>,
        progress: Progress,
    ) -> anyhow::Result<Self> {
        let state_dir = StateDir::new(&cfg.state_dir)?;
        let mut accountant = Accountant::new(cfg.dp.delta);
        let (model_bytes, outer_state, history, last_checkpoint) = match state_dir.load()? {
            Some(PersistedState {
                last_checkpoint,
                next_round: next,
                rhos,
                outer_state,
                history,
            }) => {
                for (round, rho) in rhos {
                    accountant
                        .record(round, rho)
                        .context("replaying the privacy ledger")?;
                }
                next_round.store(next, Ordering::Relaxed);
                let model = match last_checkpoint {
                    0 => initial_model,
                    round => state_dir.read_checkpoint(round)?,
                };
                (model, outer_state, history, last_checkpoint)
            }
            None => {
                next_round.store(1, Ordering::Relaxed);
                (initial_model, OuterState::default(), Vec::new(), 0)
            }
        };
        let model = FlatModel::from_safetensors(&model_bytes).context("global model")?;
        Ok(Self {
            cfg,
            registry,
            gate,
            events,
            audit,
            peers: std::sync::Arc::new(peers),
            state_dir,
            model,
            model_bytes,
            outer_state,
            accountant,
            next_round,
            progress,
            history,
            last_checkpoint,
        })
    }

    /// Runs the remaining rounds and the final evaluation, then tells every site it is done.
    pub async fn run(mut self) -> anyhow::Result<Vec<RoundSummary>> {
        let done = self.completed_rounds();
        if done > 0 {
            self.record(
                Kind::Start,
                None,
                None,
                json!({ "resumed_after_rounds": done }),
            )?;
        }
        self.progress.start(self.cfg.rounds, done);
        let mut attempts = 0;
        while self.completed_rounds() < self.cfg.rounds {
            // Every attempt gets a fresh round id, so a retried round is a new release of
            // (noised) data in every ledger rather than a replay of the old one.
            let round = self.next_round.fetch_add(1, Ordering::Relaxed);
            attempts += 1;
            match self.run_round(round, false).await {
                Ok(summary) => {
                    attempts = 0;
                    self.progress.round_done(&summary);
                    self.history.push(summary);
                }
                Err(RoundError::Fatal(e)) => return Err(e),
                Err(RoundError::Aborted(reason)) => {
                    self.gate.set(None);
                    self.progress
                        .note(&format!("round {round} aborted: {reason}"));
                    self.record(
                        Kind::RoundAborted,
                        Some(round),
                        None,
                        json!({ "reason": reason, "attempt": attempts }),
                    )?;
                    self.persist(round)?;
                    self.broadcast(Out::Aborted(pb::RoundAborted {
                        round,
                        reason: reason.clone(),
                    }))
                    .await;
                    if attempts >= self.cfg.max_round_attempts {
                        bail!("{attempts} attempts in a row failed; last reason: {reason}");
                    }
                }
            }
        }
        // One more pass without training: every site evaluates the final model. It is saved
        // like a round, so a restart after it goes straight to the end.
        if !self.history.last().is_some_and(|s| s.evaluation_only) {
            let round = self.next_round.fetch_add(1, Ordering::Relaxed);
            match self.run_round(round, true).await {
                Ok(summary) => {
                    self.progress.round_done(&summary);
                    self.history.push(summary);
                    self.persist(round)?;
                }
                Err(RoundError::Fatal(e)) => return Err(e),
                Err(RoundError::Aborted(reason)) => {
                    self.progress
                        .note(&format!("final evaluation incomplete: {reason}"));
                }
            }
        }
        let final_sha = sha256(&self.model_bytes);
        self.broadcast(Out::Finished(pb::Finished {
            rounds: self.cfg.rounds,
            final_model_sha256: final_sha.to_vec(),
        }))
        .await;
        self.record(
            Kind::Stop,
            None,
            None,
            json!({ "final_model_sha256": hex::encode(final_sha) }),
        )?;
        self.audit
            .append_signed_head(None)
            .map_err(anyhow::Error::from)?;
        self.progress.finish();
        Ok(self.history)
    }

    fn record(
        &mut self,
        kind: Kind,
        round: Option<u32>,
        site: Option<&str>,
        details: serde_json::Value,
    ) -> anyhow::Result<()> {
        self.audit
            .append(kind, round, site, details)
            .map(drop)
            .context("audit log write failed; stopping rather than acting unaudited")
    }

    async fn broadcast(&self, body: Out) {
        for site in self.registry.sites() {
            self.registry.send(&site, body.clone()).await;
        }
    }

    /// Handles events that may arrive in any phase; returns those the current phase must see.
    fn triage(
        &mut self,
        state: &mut RoundState,
        event: Event,
    ) -> Result<Option<Event>, RoundError> {
        match event {
            Event::Joined {
                site,
                serial,
                verdict,
            } => {
                let details = match &verdict {
                    Some(v) => json!({
                        "serial": serial, "verifier": v.verifier, "release_version": v.release_version,
                        "release_commit": v.release_commit, "release_sha256": v.release_sha256,
                    }),
                    None => json!({ "serial": serial, "attestation": "not required" }),
                };
                if let Some(v) = &verdict {
                    self.progress.note(&format!(
                        "{site} joined: release {} verified, sha256 {}",
                        v.release_version,
                        &v.release_sha256[..16.min(v.release_sha256.len())]
                    ));
                }
                self.record(Kind::Join, None, Some(&site), details)?;
                Ok(None)
            }
            // Audited first: the note (and the peer's answer) only after the record is durable.
            Event::Refused {
                site,
                reason,
                audited,
            } => {
                self.record(
                    Kind::Refusal,
                    None,
                    Some(&site),
                    json!({ "reason": reason }),
                )?;
                self.progress.note(&format!("{site} refused: {reason}"));
                if let Some(audited) = audited {
                    let _ = audited.send(());
                }
                Ok(None)
            }
            Event::Rejected { site, reason } => {
                self.record(
                    Kind::Refusal,
                    Some(state.round),
                    Some(&site),
                    json!({ "reason": reason, "what": "message" }),
                )?;
                tracing::warn!(%site, "rejected message: {reason}");
                Ok(None)
            }
            Event::Message {
                site,
                message: Body::Report(report),
            } => {
                if report.round == state.round && state.index(&site).is_some() {
                    state.reports.insert(
                        site,
                        SiteReport {
                            train_loss: report.train_loss,
                            val_loss_before: report.val_loss_before,
                            val_loss_after: report.val_loss_after,
                            tokens: report.tokens,
                            seconds: report.seconds,
                            epsilon_spent: report.epsilon_spent,
                        },
                    );
                }
                Ok(None)
            }
            Event::Message {
                site,
                message: Body::Decision(d),
            } if d.round != state.round => {
                tracing::debug!(%site, "late decision for round {}", d.round);
                Ok(None)
            }
            Event::Disconnected { site } => {
                if state.active.remove(&site) {
                    self.progress
                        .note(&format!("{site} disconnected during round {}", state.round));
                }
                Ok(Some(Event::Disconnected { site }))
            }
            other => Ok(Some(other)),
        }
    }

    /// The next event for the current phase, or `None` at the deadline.
    async fn next_event(
        &mut self,
        state: &mut RoundState,
        deadline: Instant,
    ) -> Result<Option<Event>, RoundError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let event = match tokio::time::timeout(deadline - now, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => return Err(RoundError::Fatal(anyhow::anyhow!("service stopped"))),
                Err(_) => return Ok(None),
            };
            if let Some(event) = self.triage(state, event)? {
                return Ok(Some(event));
            }
        }
    }

    async fn wait_for_cohort(&mut self, state: &mut RoundState) -> Result<Vec<String>, RoundError> {
        let deadline = Instant::now() + self.cfg.cohort_timeout;
        loop {
            let sites = self.registry.sites();
            if sites.len() >= self.cfg.min_clients {
                let mut cohort = sites;
                if cohort.len() > self.cfg.max_clients {
                    // A fresh random cohort each round, so no site is systematically left out.
                    let mut rng = rand::rng();
                    rand::seq::SliceRandom::shuffle(cohort.as_mut_slice(), &mut rng);
                    cohort.truncate(self.cfg.max_clients);
                    cohort.sort();
                }
                return Ok(cohort);
            }
            self.progress.phase(&format!(
                "waiting for sites ({}/{} connected)",
                sites.len(),
                self.cfg.min_clients
            ));
            let step = Instant::now() + Duration::from_millis(200);
            if step >= deadline {
                return Err(aborted(format!(
                    "only {} of the {} sites needed connected within {:?}",
                    sites.len(),
                    self.cfg.min_clients,
                    self.cfg.cohort_timeout
                )));
            }
            // Events other than joins are stale here (a previous round's leftovers).
            let _ = self.next_event(state, step).await?;
        }
    }

    fn dp_params(&self, cohort: usize, min_clients: u32) -> anyhow::Result<DpParams> {
        let dp = &self.cfg.dp;
        let noise = if dp.enabled {
            dp.noise_multiplier * dp.clip_norm
        } else {
            0.0
        };
        DpParams::choose(
            self.model.len(),
            cohort as u32,
            min_clients,
            dp.clip_norm,
            noise,
            self.cfg.modulus_bits,
        )
        .context("choosing the DP encoding parameters")
    }

    async fn run_round(
        &mut self,
        round: u32,
        evaluation_only: bool,
    ) -> Result<RoundSummary, RoundError> {
        let started = Instant::now();
        let training = self.cfg.training.clone();
        let completed = self.completed_rounds();
        let mut state = RoundState {
            round,
            cohort: Vec::new(),
            active: BTreeSet::new(),
            reports: BTreeMap::new(),
            upload_bytes: 0,
        };
        state.cohort = self.wait_for_cohort(&mut state).await?;
        state.active = state.cohort.iter().cloned().collect();
        let n = state.cohort.len() as u32;

        let mut round_seed = [0u8; 32];
        rand::rng().fill_bytes(&mut round_seed);
        let secure = self.cfg.secure_aggregation && !evaluation_only;
        let (secagg_params, min_clients) = if secure {
            let padded = dp::params::padded_dim(self.model.len());
            let params = secagg::Params::choose(
                n,
                self.cfg.modulus_bits,
                padded,
                self.cfg.corrupt_fraction,
                self.cfg.dropout_fraction,
            )
            .map_err(|e| {
                aborted(format!(
                    "no secure-aggregation parameters for {n} sites: {e}"
                ))
            })?;
            let t = params.min_survivors;
            (Some(params), t)
        } else {
            (None, n)
        };
        let dp_params = self
            .dp_params(state.cohort.len(), min_clients)
            .map_err(RoundError::Fatal)?;
        let rho = if self.cfg.dp.enabled && !evaluation_only {
            dp::zcdp_rho(&dp_params, min_clients)
        } else {
            0.0
        };
        let model_sha = sha256(&self.model_bytes);
        let config = pb::RoundConfig {
            round,
            federation: self.cfg.federation.clone(),
            cohort: state.cohort.clone(),
            model_sha256: model_sha.to_vec(),
            model_bytes: self.model_bytes.len() as u64,
            num_parameters: self.model.len() as u64,
            local_steps: if evaluation_only {
                0
            } else {
                training.local_steps
            },
            global_step: u64::from(completed) * u64::from(training.local_steps),
            total_steps: training.total_steps,
            secure_aggregation: secure,
            neighbours: secagg_params.as_ref().map_or(0, |p| p.neighbours),
            threshold: secagg_params.as_ref().map_or(0, |p| p.threshold),
            modulus_bits: self.cfg.modulus_bits,
            round_seed: round_seed.to_vec(),
            dp: Some(pb::DpParams {
                enabled: self.cfg.dp.enabled,
                clip_norm: dp_params.clip_norm,
                noise_stddev: dp_params.noise_stddev,
                gamma: dp_params.gamma,
                delta: self.cfg.dp.delta.get(),
                rho,
                padded_dim: dp_params.padded_dim as u64,
                beta: dp_params.beta,
            }),
            batch_size: training.batch_size,
            seq_len: training.seq_len,
            lr: training.lr,
            warmup_steps: training.warmup_steps,
            reset_local_optimizer: training.reset_local_optimizer,
            min_survivors: min_clients,
            completed_rounds: completed,
        };
        // The id is spent from here on: a restart must not offer it again.
        self.persist(round).map_err(RoundError::Fatal)?;
        self.record(
            Kind::CohortSelected,
            Some(round),
            None,
            json!({
                "cohort": state.cohort, "secure_aggregation": secure, "evaluation_only": evaluation_only,
                "neighbours": config.neighbours, "threshold": config.threshold, "min_survivors": min_clients,
                "modulus_bits": config.modulus_bits, "dp_enabled": self.cfg.dp.enabled, "rho": rho,
                "model_sha256": hex::encode(model_sha), "round_seed": hex::encode(round_seed),
            }),
        )?;
        self.progress.phase(&format!(
            "round {round}: offering to {n} sites: {}",
            state.cohort.join(", ")
        ));
        for site in &state.cohort {
            self.registry
                .send(site, Out::RoundConfig(config.clone()))
                .await;
        }

        self.collect_decisions(&mut state).await?;
        let download_bytes = self.send_model(&state).await;

        if evaluation_only {
            self.collect_reports(&mut state).await?;
            return Ok(RoundSummary {
                round,
                evaluation_only,
                survivors: state.active.iter().cloned().collect(),
                dropped: Vec::new(),
                seconds: started.elapsed().as_secs_f64(),
                upload_bytes: 0,
                download_bytes,
                epsilon: self.cfg.dp.enabled.then(|| self.accountant.epsilon()),
                rho: 0.0,
                model_sha256: hex::encode(model_sha),
                reports: state.reports,
            });
        }

        let (sum, survivors) = match secagg_params {
            Some(params) => {
                let ctx = RoundContext {
                    federation: self.cfg.federation.clone(),
                    round,
                    round_seed,
                    params,
                };
                self.secure_aggregate(&mut state, ctx).await?
            }
            None => self.plain_aggregate(&mut state, &dp_params).await?,
        };
        let survivor_sites: Vec<String> = survivors
            .iter()
            .map(|&i| state.cohort[i as usize].clone())
            .collect();
        self.record(
            Kind::AggregateDigest,
            Some(round),
            None,
            json!({
                "sha256": hex::encode(digest_u32(&sum)),
                "survivors": survivor_sites,
            }),
        )?;

        let decoded = dp::decode(&sum, &dp_params, &round_seed)
            .map_err(|e| aborted(format!("could not decode the aggregate: {e}")))?;
        let count = survivors.len() as f32;
        let mean: Vec<f32> = decoded.iter().map(|v| v / count).collect();
        let mut params = self.model.values.clone();
        self.cfg
            .outer
            .step(&mut params, &mean, &mut self.outer_state);
        let new_model = self
            .model
            .with_values(params)
            .map_err(|e| RoundError::Fatal(e.into()))?;
        let new_bytes = new_model.to_safetensors();
        let new_sha = sha256(&new_bytes);

        if self.cfg.dp.enabled {
            self.accountant
                .record(round, rho)
                .map_err(|e| RoundError::Fatal(anyhow::anyhow!("privacy accountant: {e}")))?;
        }
        let epsilon = self.cfg.dp.enabled.then(|| self.accountant.epsilon());
        let path = self
            .state_dir
            .write_checkpoint(round, &new_bytes)
            .map_err(RoundError::Fatal)?;
        self.record(
            Kind::Checkpoint,
            Some(round),
            None,
            json!({ "path": path, "sha256": hex::encode(new_sha) }),
        )?;
        self.record(
            Kind::ModelDigest,
            Some(round),
            None,
            json!({ "sha256": hex::encode(new_sha), "round": round }),
        )?;
        self.record(
            Kind::PrivacySpent,
            Some(round),
            None,
            json!({ "rho": rho, "epsilon": epsilon, "delta": self.cfg.dp.delta.get(), "dp_enabled": self.cfg.dp.enabled }),
        )?;
        self.model = new_model;
        self.model_bytes = new_bytes;

        let dropped: Vec<String> = state
            .cohort
            .iter()
            .filter(|s| !survivor_sites.contains(s))
            .cloned()
            .collect();
        let result = pb::RoundResult {
            round,
            survivors: survivor_sites.clone(),
            new_model_sha256: new_sha.to_vec(),
            epsilon: epsilon.unwrap_or(f64::INFINITY),
            delta: self.cfg.dp.delta.get(),
        };
        for site in &state.cohort {
            self.registry.send(site, Out::Result(result.clone())).await;
        }
        let summary = RoundSummary {
            round,
            evaluation_only,
            survivors: survivor_sites,
            dropped,
            seconds: started.elapsed().as_secs_f64(),
            upload_bytes: state.upload_bytes,
            download_bytes,
            epsilon,
            rho,
            model_sha256: hex::encode(new_sha),
            reports: state.reports,
        };
        self.last_checkpoint = round;
        self.history.push(summary.clone());
        let persisted = self.persist(round);
        self.history.pop();
        persisted?;
        self.record(
            Kind::RoundCompleted,
            Some(round),
            None,
            json!({ "survivors": summary.survivors, "dropped": summary.dropped, "seconds": summary.seconds,
                    "upload_bytes": summary.upload_bytes }),
        )?;
        self.audit
            .append_signed_head(Some(round))
            .map_err(|e| RoundError::Fatal(e.into()))?;
        Ok(summary)
    }

    fn completed_rounds(&self) -> u32 {
        self.history.iter().filter(|s| !s.evaluation_only).count() as u32
    }

    /// Saves what a restart needs after round id `round` ended (completed or aborted).
    fn persist(&self, round: u32) -> anyhow::Result<()> {
        let rhos = (1..=round)
            .filter_map(|r| self.accountant.rho_of(r).map(|rho| (r, rho)))
            .collect();
        self.state_dir.save(&PersistedState {
            last_checkpoint: self.last_checkpoint,
            next_round: round + 1,
            rhos,
            outer_state: self.outer_state.clone(),
            history: self.history.clone(),
        })
    }

    async fn collect_decisions(&mut self, state: &mut RoundState) -> Result<(), RoundError> {
        self.progress.phase(&format!(
            "round {}: waiting for site decisions",
            state.round
        ));
        let deadline = Instant::now() + self.cfg.phase_timeout;
        let mut pending = state.active.clone();
        while !pending.is_empty() {
            let Some(event) = self.next_event(state, deadline).await? else {
                break;
            };
            match event {
                Event::Message {
                    site,
                    message: Body::Decision(d),
                } if pending.contains(&site) => {
                    pending.remove(&site);
                    if !d.accept {
                        state.active.remove(&site);
                        self.progress
                            .note(&format!("{site} declined round {}: {}", d.round, d.reason));
                        self.record(
                            Kind::Refusal,
                            Some(state.round),
                            Some(&site),
                            json!({ "reason": d.reason, "what": "round declined by site policy" }),
                        )?;
                    }
                }
                Event::Disconnected { site } => {
                    pending.remove(&site);
                }
                other => self.unexpected(state, other, "Decision")?,
            }
        }
        for site in pending {
            state.active.remove(&site);
        }
        if state.active.len() < self.cfg.min_clients {
            return Err(aborted(format!(
                "{} sites accepted round {}, {} needed",
                state.active.len(),
                state.round,
                self.cfg.min_clients
            )));
        }
        Ok(())
    }

    fn unexpected(
        &mut self,
        state: &RoundState,
        event: Event,
        expected: &str,
    ) -> Result<(), RoundError> {
        let (site, what) = match event {
            Event::Message { site, message } => {
                (site, format!("{message:?}").chars().take(60).collect())
            }
            Event::Upload { site, .. } => (site, "an update".to_string()),
            _ => return Ok(()),
        };
        tracing::warn!(%site, "out-of-phase message: {what}");
        self.record(
            Kind::Refusal,
            Some(state.round),
            Some(&site),
            json!({ "reason": format!("message in the wrong phase (expected {expected})") }),
        )?;
        Ok(())
    }

    /// Streams the global model to every site still active, concurrently.
    async fn send_model(&mut self, state: &RoundState) -> u64 {
        self.progress
            .phase(&format!("round {}: sending the model", state.round));
        let bytes = bytes::Bytes::from(self.model_bytes.clone());
        let sends = state.active.iter().map(|site| {
            let bytes = bytes.clone();
            let registry = self.registry.clone();
            let round = state.round;
            let site = site.clone();
            async move {
                let total = bytes.len();
                let mut offset = 0;
                loop {
                    let end = (offset + MAX_CHUNK_BYTES).min(total);
                    let chunk = pb::ModelChunk {
                        round,
                        offset: offset as u64,
                        data: bytes.slice(offset..end),
                        last: end == total,
                    };
                    if !registry.send(&site, Out::ModelChunk(chunk)).await {
                        return 0;
                    }
                    offset = end;
                    if offset == total {
                        return total as u64;
                    }
                }
            }
        });
        // A bounded number of concurrent downloads: each in-flight stream buffers an encoded
        // chunk, so unbounded fan-out would make memory grow with the number of sites.
        use futures::StreamExt as _;
        futures::stream::iter(sends)
            .buffer_unordered(MODEL_SEND_CONCURRENCY)
            .fold(0, |total, sent| async move { total + sent })
            .await
    }

    async fn collect_reports(&mut self, state: &mut RoundState) -> Result<(), RoundError> {
        self.progress
            .phase(&format!("final evaluation by {} sites", state.active.len()));
        let deadline = Instant::now() + self.cfg.training_timeout;
        // Reports are absorbed by `triage`, so wait in short steps and re-check.
        while Instant::now() < deadline
            && state.active.iter().any(|s| !state.reports.contains_key(s))
        {
            let step = deadline.min(Instant::now() + Duration::from_millis(100));
            if let Some(event) = self.next_event(state, step).await? {
                self.unexpected(state, event, "Report")?;
            }
        }
        Ok(())
    }

    async fn plain_aggregate(
        &mut self,
        state: &mut RoundState,
        dp_params: &DpParams,
    ) -> Result<(Vec<u32>, Vec<u32>), RoundError> {
        let bits = self.cfg.modulus_bits;
        let mask = if bits == 32 {
            u32::MAX
        } else {
            (1u32 << bits) - 1
        };
        let mut sum = vec![0u32; dp_params.padded_dim];
        let mut survivors = BTreeSet::new();
        self.gate.set(Some(UploadSpec {
            round: state.round,
            elements: dp_params.padded_dim as u64,
            bits,
            sites: Arc::new(state.active.clone()),
        }));
        self.progress.phase(&format!(
            "round {}: local training and plain uploads",
            state.round
        ));
        let deadline = Instant::now() + self.cfg.training_timeout;
        while state
            .active
            .iter()
            .any(|s| state.index(s).is_some_and(|i| !survivors.contains(&i)))
        {
            let Some(event) = self.next_event(state, deadline).await? else {
                break;
            };
            match event {
                Event::Upload {
                    site,
                    round,
                    values,
                    sha256,
                    bytes,
                    slot,
                } if round == state.round => {
                    let Some(index) = state.index(&site).filter(|_| state.active.contains(&site))
                    else {
                        drop(slot);
                        continue;
                    };
                    if !survivors.insert(index) {
                        self.reject(state, &site, "duplicate update for this round")?;
                        continue;
                    }
                    for (s, v) in sum.iter_mut().zip(&values) {
                        *s = s.wrapping_add(*v) & mask;
                    }
                    drop(slot);
                    state.upload_bytes += bytes;
                    self.record_upload(state.round, &site, sha256, bytes)?;
                }
                Event::Disconnected { .. } => {}
                other => self.unexpected(state, other, "UpdateChunk")?,
            }
        }
        self.gate.set(None);
        if survivors.len() < self.cfg.min_clients.max(1) {
            return Err(aborted(format!(
                "{} updates arrived, {} needed",
                survivors.len(),
                self.cfg.min_clients
            )));
        }
        Ok((sum, survivors.into_iter().collect()))
    }

    fn reject(&mut self, state: &RoundState, site: &str, reason: &str) -> Result<(), RoundError> {
        tracing::warn!(%site, "{reason}");
        self.record(
            Kind::Refusal,
            Some(state.round),
            Some(site),
            json!({ "reason": reason }),
        )?;
        Ok(())
    }

    fn record_upload(
        &mut self,
        round: u32,
        site: &str,
        sha: [u8; 32],
        bytes: u64,
    ) -> Result<(), RoundError> {
        self.record(
            Kind::UploadDigest,
            Some(round),
            Some(site),
            json!({ "sha256": hex::encode(sha), "bytes": bytes }),
        )?;
        Ok(())
    }

    fn phase_done(
        &mut self,
        state: &RoundState,
        phase: Phase,
        responded: &BTreeSet<u32>,
        expected: &BTreeSet<u32>,
    ) -> Result<(), RoundError> {
        let name = |i: &u32| state.cohort[*i as usize].clone();
        let survivors: Vec<String> = responded.iter().map(name).collect();
        let dropped: Vec<String> = expected.difference(responded).map(name).collect();
        if !dropped.is_empty() {
            self.progress.note(&format!(
                "round {}: {phase}: dropped {}",
                state.round,
                dropped.join(", ")
            ));
        }
        self.record(
            Kind::PhaseCompleted,
            Some(state.round),
            None,
            json!({ "phase": phase.name(), "survivors": survivors, "dropouts": dropped }),
        )?;
        Ok(())
    }

    /// Runs the SecAgg+ phases and returns the unmasked sum and the survivors' indices.
    /// Collects one message-driven phase: `handle` judges each message from a cohort site;
    /// the phase ends when every expected site has answered or at the deadline.
    async fn collect_messages(
        &mut self,
        state: &mut RoundState,
        phase: Phase,
        expected: &BTreeSet<u32>,
        timeout: Duration,
        mut handle: impl FnMut(u32, Body) -> Handled,
    ) -> Result<BTreeSet<u32>, RoundError> {
        let deadline = Instant::now() + timeout;
        let mut responded = BTreeSet::new();
        while state.awaiting(expected, &responded) {
            let Some(event) = self.next_event(state, deadline).await? else {
                break;
            };
            match event {
                Event::Message { site, message } => match state.index(&site) {
                    None => {
                        self.unexpected(state, Event::Message { site, message }, phase.name())?
                    }
                    Some(index) => match handle(index, message) {
                        Handled::Accepted => {
                            responded.insert(index);
                        }
                        Handled::Rejected(reason) => self.reject(state, &site, &reason)?,
                        Handled::NotMine(message) => {
                            self.unexpected(state, Event::Message { site, message }, phase.name())?
                        }
                    },
                },
                Event::Disconnected { .. } => {}
                other => self.unexpected(state, other, phase.name())?,
            }
        }
        self.phase_done(state, phase, &responded, expected)?;
        Ok(responded)
    }

    /// Runs the SecAgg+ phases and returns the unmasked sum and the survivors' indices.
    async fn secure_aggregate(
        &mut self,
        state: &mut RoundState,
        ctx: RoundContext,
    ) -> Result<(Vec<u32>, Vec<u32>), RoundError> {
        let round = state.round;
        let padded = ctx.params.dim;
        let bits = ctx.params.bits;
        let mut server = ServerRound::new(ctx).map_err(|e| aborted(e.to_string()))?;
        let cohort = state.cohort.clone();
        let fail = |e: secagg::Error| aborted(e.to_string());
        let judge = |result: Result<(), String>| match result {
            Ok(()) => Handled::Accepted,
            Err(reason) => Handled::Rejected(reason),
        };

        // Advertise keys (after local training, hence the training deadline).
        self.progress.phase(&format!(
            "round {round}: local training, then key advertisement"
        ));
        let expected: BTreeSet<u32> = state.active.iter().filter_map(|s| state.index(s)).collect();
        let timeout = self.cfg.training_timeout;
        // Advertisements are checked here as the neighbours will check them, so one bad
        // advertisement makes its sender a dropout rather than every neighbour's reason to
        // refuse the round; survivor-set signatures are checked with the same authenticator.
        let peers = Arc::clone(&self.peers);
        let auth = CohortAuthenticator {
            verifier: &peers,
            cohort: &cohort,
        };
        let responded = self
            .collect_messages(
                state,
                Phase::Advertise,
                &expected,
                timeout,
                |index, message| match message {
                    Body::Advertise(adv) if adv.round == round && adv.client == index => judge(
                        wire::advertisement_from_pb(adv)
                            .map_err(|e| e.to_string())
                            .and_then(|a| {
                                server
                                    .handle_advertisement(a, &auth)
                                    .map_err(|e| e.to_string())
                            }),
                    ),
                    Body::Advertise(_) => {
                        Handled::Rejected("advertisement for another round or client index".into())
                    }
                    other => Handled::NotMine(other),
                },
            )
            .await?;
        for (client, adverts) in server.close_advertise().map_err(fail)? {
            let peers = adverts
                .into_iter()
                .map(|a| wire::advertisement_to_pb(round, a))
                .collect();
            let msg = Out::PeerKeys(pb::PeerKeys { round, peers });
            self.registry.send(&cohort[client as usize], msg).await;
        }

        // Share keys.
        self.progress.phase(&format!("round {round}: sharing keys"));
        let timeout = self.cfg.phase_timeout;
        let responded = self
            .collect_messages(
                state,
                Phase::ShareKeys,
                &responded,
                timeout,
                |index, message| match message {
                    Body::ShareKeys(m) if m.round == round => judge(
                        server
                            .handle_share_keys(index, wire::shares_from_pb(m.shares))
                            .map_err(|e| e.to_string()),
                    ),
                    Body::ShareKeys(_) => Handled::Rejected("shares for another round".into()),
                    other => Handled::NotMine(other),
                },
            )
            .await?;
        // Open uploads before forwarding the shares: a fast site may start streaming at once.
        self.gate.set(Some(UploadSpec {
            round,
            elements: padded as u64,
            bits,
            sites: Arc::new(
                responded
                    .iter()
                    .map(|&i| cohort[i as usize].clone())
                    .collect(),
            ),
        }));
        for (client, shares) in server.close_share_keys().map_err(fail)? {
            let shares = wire::shares_to_pb(shares);
            let msg = Out::ForwardedShares(pb::ForwardedShares { round, shares });
            self.registry.send(&cohort[client as usize], msg).await;
        }

        // Masked input: whole vectors from the upload slots, added into the running sum.
        self.progress
            .phase(&format!("round {round}: receiving masked updates"));
        let expected = responded;
        let mut responded = BTreeSet::new();
        let deadline = Instant::now() + self.cfg.phase_timeout;
        while state.awaiting(&expected, &responded) {
            let Some(event) = self.next_event(state, deadline).await? else {
                break;
            };
            match event {
                Event::Upload {
                    site,
                    round: r,
                    values,
                    sha256,
                    bytes,
                    slot,
                } if r == round => {
                    let Some(index) = state.index(&site) else {
                        continue;
                    };
                    let added = server.add_masked_input(index, &values);
                    drop(slot);
                    match added {
                        Ok(()) => {
                            responded.insert(index);
                            state.upload_bytes += bytes;
                            self.record_upload(round, &site, sha256, bytes)?;
                        }
                        Err(e) => self.reject(state, &site, &e.to_string())?,
                    }
                }
                Event::Disconnected { .. } => {}
                other => self.unexpected(state, other, "UpdateChunk")?,
            }
        }
        self.gate.set(None);
        self.phase_done(state, Phase::MaskedInput, &responded, &expected)?;
        let survivors = server.close_masked_input().map_err(fail)?;
        for &client in &survivors {
            let msg = Out::Survivors(pb::SurvivorSet {
                round,
                clients: survivors.clone(),
            });
            self.registry.send(&cohort[client as usize], msg).await;
        }

        // Consistency check.
        self.progress
            .phase(&format!("round {round}: consistency check"));
        let expected: BTreeSet<u32> = survivors.iter().copied().collect();
        let responded = self
            .collect_messages(
                state,
                Phase::Consistency,
                &expected,
                timeout,
                |index, message| match message {
                    Body::Consistency(sig) if sig.round == round && sig.client == index => judge(
                        server
                            .handle_consistency(wire::consistency_from_pb(sig), &auth)
                            .map_err(|e| e.to_string()),
                    ),
                    Body::Consistency(_) => Handled::Rejected(
                        "consistency signature for another round or client".into(),
                    ),
                    other => Handled::NotMine(other),
                },
            )
            .await?;
        let signatures = server.close_consistency().map_err(fail)?;
        let request = pb::UnmaskRequest {
            round,
            signatures: signatures
                .into_iter()
                .map(|s| wire::consistency_to_pb(round, s))
                .collect(),
        };
        for &client in &responded {
            let msg = Out::UnmaskRequest(request.clone());
            self.registry.send(&cohort[client as usize], msg).await;
        }

        // Unmask.
        self.progress.phase(&format!("round {round}: unmasking"));
        self.collect_messages(
            state,
            Phase::Unmask,
            &responded,
            timeout,
            |index, message| match message {
                Body::Unmask(m) if m.round == round && m.client == index => judge(
                    wire::unmask_from_pb(m)
                        .map_err(|e| e.to_string())
                        .and_then(|u| server.handle_unmask(u).map_err(|e| e.to_string())),
                ),
                Body::Unmask(_) => {
                    Handled::Rejected("unmask shares for another round or client".into())
                }
                other => Handled::NotMine(other),
            },
        )
        .await?;
        let aggregate = server.finish().map_err(fail)?;
        Ok((aggregate.sum, aggregate.survivors))
    }
}
