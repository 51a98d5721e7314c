//! The round engine: the network driver of the sans-I/O [`Coordinator`]. It feeds the
//! coordinator what the sessions report, sleeps until the next message or the coordinator's next
//! deadline, and carries out what the coordinator asks, in the order its contract requires:
//! audit facts and state saves first (written and flushed), then events (applying the outer
//! optimizer, writing checkpoints, progress), then the upload gate, then messages.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Instant,
};

use anyhow::{Context as _, bail};
use quorum_attest::PeerVerifier;
use quorum_audit::{AuditLog, Kind};
use quorum_crypto::secagg::SiteVerifier;
use quorum_policies::config::federation::OuterOptimizer;
use quorum_proto::v1::server_message::Body as Out;
use quorum_round::{
    Attested, Coordinator, CoordinatorConfig, Durable, Event as Asked, Fact, ModelInfo, Resume,
    Transmit, UploadDigest, UploadPart, What, model_info, witness,
};
use rand::Rng as _;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

pub use quorum_round::{RoundSummary, SiteReport};

use crate::{
    metrics::Metrics,
    model_store::FlatModel,
    outer::{OuterState, OuterStep as _},
    progress::Progress,
    service::{Event, Registry, UploadGate, UploadSpec},
    state::{PersistedState, StateDir, write_atomic},
};

/// Everything the engine needs, resolved from `federation.toml`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The rounds' protocol settings.
    pub rounds: CoordinatorConfig,
    /// Outer optimizer.
    pub outer: OuterOptimizer,
    /// Where checkpoints, state and metrics go.
    pub state_dir: PathBuf,
}

/// Sites the global model is streamed to at the same time.
const MODEL_SEND_CONCURRENCY: usize = 8;

/// Elements of a stored upload added to the sum at a time (4 MiB).
const UPLOAD_READ_WINDOW: usize = 1 << 20;

/// The round engine.
pub struct Engine {
    coordinator: Coordinator,
    /// The coordinator's verifier, told which certificate each site joined with.
    peers: Arc<PeerVerifier>,
    outer: OuterOptimizer,
    registry: Arc<Registry>,
    gate: Arc<UploadGate>,
    events: mpsc::Receiver<Event>,
    audit: AuditLog,
    state_dir: StateDir,
    model: FlatModel,
    /// The file holding the global model as sites download it: sends stream from it, so the
    /// aggregator keeps no serialised copy in memory.
    model_file: PathBuf,
    outer_state: OuterState,
    /// Round id of the checkpoint the global model comes from (0: the initial model).
    last_checkpoint: u32,
    next_round: Arc<AtomicU32>,
    progress: Progress,
    metrics: Arc<Metrics>,
}

/// How the federation ended.
enum End {
    Finished,
    Failed(String),
}

impl Engine {
    /// An engine resuming from the state folder if it holds a completed round, else starting
    /// from `initial_model`.
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
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let state_dir = StateDir::new(&cfg.state_dir)?;
        let (model_bytes, outer_state, resume, last_checkpoint) = match state_dir.load()? {
            Some(saved) => {
                let model = match saved.last_checkpoint {
                    0 => initial_model,
                    round => state_dir.read_checkpoint(round)?,
                };
                let resume = Resume {
                    next_round: saved.next_round,
                    rhos: saved.rhos,
                    history: saved.history,
                };
                (model, saved.outer_state, resume, saved.last_checkpoint)
            }
            None => (initial_model, OuterState::default(), Resume::default(), 0),
        };
        let model = FlatModel::from_safetensors(&model_bytes).context("global model")?;
        let info = model_info(&model_bytes, model.len());
        let model_file = match last_checkpoint {
            0 => {
                let path = state_dir.initial_model_path();
                write_atomic(&path, &model_bytes)?;
                path
            }
            round => state_dir.checkpoint_path(round),
        };
        drop(model_bytes);
        let peers = Arc::new(peers);
        let mut coordinator = Coordinator::new(
            cfg.rounds,
            info,
            resume,
            Arc::clone(&peers) as Arc<dyn SiteVerifier + Send + Sync>,
            rand::rng().random(),
        )
        .context("replaying the privacy ledger")?;
        // The sites' heads witnessed before a restart: their next ones must move on.
        for (node, head) in quorum_audit::last_witnessed(audit.store())? {
            coordinator.remember_witnessed(&node, head);
        }
        next_round.store(coordinator.next_round(), Ordering::Relaxed);
        Ok(Self {
            coordinator,
            peers,
            outer: cfg.outer,
            registry,
            gate,
            events,
            audit,
            state_dir,
            model,
            model_file,
            outer_state,
            last_checkpoint,
            next_round,
            progress,
            metrics,
        })
    }

    /// Runs the remaining rounds and the final evaluation, then tells every site it is done.
    pub async fn run(mut self) -> anyhow::Result<Vec<RoundSummary>> {
        let (rounds, done) = (
            self.coordinator.rounds(),
            self.coordinator.completed_rounds(),
        );
        self.progress.start(rounds, done);
        if let Some(last) = self.coordinator.history().last() {
            self.metrics.resumed(last);
        }
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
        self.coordinator.start(Instant::now());
        loop {
            match self.drain().await? {
                Some(End::Finished) => break,
                Some(End::Failed(reason)) => bail!(reason),
                None => {}
            }
            let deadline = self.coordinator.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = self.events.recv() => {
                    let event = event.context("the federation service stopped")?;
                    self.on_event(event)?;
                }
                () = sleep => self.coordinator.handle_timeout(Instant::now()),
                _ = terminate.recv() => return Err(self.stop_on_signal()),
            }
        }
        self.progress.finish();
        Ok(self.coordinator.history().to_vec())
    }

    /// Ends the log for SIGTERM: a `stop` record and a signed head, so that what the node did
    /// up to here is vouched for. The state saved at the last round end is where a restart
    /// resumes; a round in flight is given up (its id stays spent).
    fn stop_on_signal(&mut self) -> anyhow::Error {
        let done = self.coordinator.completed_rounds();
        let details = json!({ "signal": "SIGTERM", "completed_rounds": done });
        let written = self.audit.append_and_sign(Kind::Stop, None, details);
        match written {
            Ok(_) => anyhow::anyhow!(
                "stopped by SIGTERM after {done} completed rounds; the audit log ends with a signed head; start again with the same configuration to resume"
            ),
            Err(e) => anyhow::Error::from(e)
                .context("stopped by SIGTERM, but the audit log could not record it"),
        }
    }

    /// Feeds one report from the sessions to the coordinator.
    fn on_event(&mut self, event: Event) -> anyhow::Result<()> {
        let now = Instant::now();
        match event {
            Event::Joined {
                site,
                serial,
                certificate_der,
                verdict,
            } => {
                self.peers.site_joined(&site, &certificate_der);
                let attestation = match verdict {
                    Some(v) => {
                        self.progress.note(&format!(
                            "{site} joined: release {} verified, sha256 {}, {} libraries",
                            v.release_version,
                            &v.release_sha256[..16.min(v.release_sha256.len())],
                            v.libraries
                        ));
                        Attested::Release {
                            verifier: v.verifier.to_owned(),
                            release_version: v.release_version,
                            release_commit: v.release_commit,
                            release_sha256: v.release_sha256,
                            libraries_verified: v.libraries,
                        }
                    }
                    None => Attested::NotRequired {
                        attestation: "not required",
                    },
                };
                let what = What::Joined {
                    serial,
                    attestation,
                };
                self.write(&fact(None, Some(&site), what))?;
                self.coordinator.site_connected(now, &site);
            }
            // Audited first: the note (and the peer's answer) only after the record is durable.
            Event::Refused {
                site,
                reason,
                audited,
            } => {
                self.write(&fact(None, Some(&site), What::refused(reason.clone())))?;
                self.metrics.refused();
                self.progress.note(&format!("{site} refused: {reason}"));
                if let Some(audited) = audited {
                    let _ = audited.send(());
                }
            }
            Event::Rejected { site, reason } => {
                tracing::warn!(%site, "rejected message: {reason}");
                self.metrics.refused();
                self.coordinator.rejected(&site, &reason);
            }
            Event::Message { site, message } => self.coordinator.handle(now, &site, message),
            Event::Upload {
                site,
                round,
                values,
                sha256,
                bytes,
                slot,
            } => {
                // Added to the sum a window at a time: the upload is never in memory whole.
                let elements = values.elements();
                let coordinator = &mut self.coordinator;
                values
                    .read_parts(UPLOAD_READ_WINDOW, |offset, values| {
                        let last = offset + values.len() as u64 == elements;
                        let part = UploadPart {
                            round,
                            offset,
                            values,
                            complete: last.then_some(UploadDigest { sha256, bytes }),
                        };
                        coordinator.handle_upload_part(now, &site, part)
                    })
                    .with_context(|| {
                        format!(
                            "cannot read back {site}'s stored upload; stopping, and the round \
                             is redone when the aggregator restarts"
                        )
                    })?;
                drop(slot);
            }
            Event::Disconnected { site } => self.coordinator.site_disconnected(now, &site),
        }
        Ok(())
    }

    /// Carries out everything the coordinator asked for, in contract order, until it asks for
    /// nothing more; returns how the federation ended, once it has.
    async fn drain(&mut self) -> anyhow::Result<Option<End>> {
        let mut end = None;
        loop {
            let mut busy = false;
            while let Some(durable) = self.coordinator.poll_audit() {
                busy = true;
                match durable {
                    Durable::Audit(fact) => {
                        if let What::RoundAborted { reason, .. } = &fact.what {
                            self.metrics.error(reason);
                        }
                        self.write(&fact)?;
                    }
                    Durable::SaveState => self.persist()?,
                    Durable::SignedHead(round) => {
                        let signed = self.audit.append_signed_head(round).map_err(|e| {
                            anyhow::Error::from(e).context("audit log write failed")
                        })?;
                        // The round's sites witness it, and answer with their own heads.
                        self.coordinator
                            .head_signed(witness::head_message(round.unwrap_or(0), &signed));
                    }
                }
            }
            while let Some(asked) = self.coordinator.poll_event() {
                busy = true;
                match asked {
                    Asked::Phase(phase) => self.progress.phase(&phase),
                    Asked::Note(note) => self.progress.note(&note),
                    Asked::ApplyUpdate { round, mean } => self.apply(round, &mean)?,
                    Asked::RoundDone(summary) => {
                        self.metrics.round_done(&summary);
                        self.progress.round_done(&summary);
                    }
                    Asked::Finished => end = Some(End::Finished),
                    Asked::Failed(reason) => {
                        self.metrics.error(&reason);
                        end = Some(End::Failed(reason));
                    }
                }
            }
            self.sync_upload_gate();
            while let Some(transmit) = self.coordinator.poll_transmit() {
                busy = true;
                match transmit {
                    Transmit::Message { to, body } => {
                        self.registry.send(&to, body).await;
                    }
                    Transmit::Model { round, to } => self.send_model(round, to).await,
                }
            }
            self.next_round
                .store(self.coordinator.next_round(), Ordering::Relaxed);
            if !busy {
                self.metrics.observe(self.coordinator.status());
                return Ok(end);
            }
        }
    }

    fn write(&mut self, fact: &Fact) -> anyhow::Result<()> {
        let kind: Kind = fact.what.kind().parse()?;
        self.audit
            .append(kind, fact.round, fact.site.as_deref(), fact.details())
            .map(drop)
            .context("audit log write failed; stopping rather than acting unaudited")
    }

    /// Saves what a restart needs.
    fn persist(&self) -> anyhow::Result<()> {
        let resume = self.coordinator.resume_state();
        self.state_dir.save(&PersistedState {
            last_checkpoint: self.last_checkpoint,
            next_round: resume.next_round,
            rhos: resume.rhos,
            outer_state: self.outer_state.clone(),
            history: resume.history,
        })
    }

    /// Applies the outer optimizer to the mean update and saves the new model.
    ///
    /// The step runs on the model's own values, not a copy: a failure after it stops the
    /// aggregator, which restarts from the checkpoint saved before.
    fn apply(&mut self, round: u32, mean: &[f32]) -> anyhow::Result<()> {
        let mut params = std::mem::take(&mut self.model.values);
        self.outer.step(&mut params, mean, &mut self.outer_state);
        self.model = self.model.with_values(params)?;
        let (file, sha256, bytes) = self.state_dir.write_model(round, &self.model)?;
        let info = ModelInfo {
            sha256,
            bytes,
            parameters: self.model.len(),
        };
        let path = file.display().to_string();
        self.model_file = file;
        self.last_checkpoint = round;
        self.coordinator
            .model_updated(Instant::now(), round, info, &path);
        Ok(())
    }

    /// Opens the gate when an upload phase starts and closes it when it ends. Only then: the
    /// site set shrinking as sites drop must not change the spec, which would void the other
    /// sites' half-received uploads (and cloning the set on every event costs O(n)).
    fn sync_upload_gate(&self) {
        let open = self.coordinator.upload_round();
        if self.gate.current().map(|s| s.round) == open {
            return;
        }
        let spec = self.coordinator.upload_window().map(|w| UploadSpec {
            round: w.round,
            elements: w.elements,
            bits: w.bits,
            sites: Arc::new(w.sites),
        });
        self.gate.set(spec);
    }

    /// Streams the global model from its file to `sites`, a bounded number at a time: each
    /// in-flight stream buffers a chunk, so unbounded fan-out would make memory grow with the
    /// sites.
    async fn send_model(&self, round: u32, sites: Vec<String>) {
        use futures::StreamExt as _;
        let sends = sites.into_iter().map(|site| {
            let registry = self.registry.clone();
            let file = self.model_file.clone();
            async move {
                if let Err(e) = send_file(&registry, &site, round, &file).await {
                    // The site misses its download and drops out of the round, as on a broken link.
                    tracing::warn!("cannot send the model in {} to {site}: {e}", file.display());
                }
            }
        });
        futures::stream::iter(sends)
            .buffer_unordered(MODEL_SEND_CONCURRENCY)
            .collect::<()>()
            .await;
    }
}

/// Sends the model file at `path` to `site` as `ModelChunk`s read one at a time; stops early
/// (without error) when the site is gone.
async fn send_file(
    registry: &Registry,
    site: &str,
    round: u32,
    path: &Path,
) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let mut file = tokio::fs::File::open(path).await?;
    let total = file.metadata().await?.len();
    let mut offset = 0u64;
    loop {
        let len = (total - offset).min(quorum_proto::MAX_CHUNK_BYTES as u64) as usize;
        let mut data = vec![0; len];
        file.read_exact(&mut data).await?;
        let last = offset + len as u64 == total;
        let chunk = quorum_proto::v1::ModelChunk {
            round,
            offset,
            data: data.into(),
            last,
        };
        if !registry.send(site, Out::ModelChunk(chunk)).await || last {
            return Ok(());
        }
        offset += len as u64;
    }
}

fn fact(round: Option<u32>, site: Option<&str>, what: What) -> Fact {
    Fact {
        round,
        site: site.map(str::to_owned),
        what,
    }
}
