//! A site's session: the network driver of the sans-I/O [`SiteRound`]. It joins with
//! attestation evidence, hands each round's messages to a `SiteRound`, and carries out what the
//! machine asks in its contract order: audit facts and ledger entries first (durable), then
//! evaluation and training, then messages. Lost links are retried with backoff.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, atomic::AtomicU32},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use quorum_attest::{PeerVerifier, SiteIdentity, key_fingerprint};
use quorum_audit::{AuditKey, AuditLog, Filter, Kind, last_witnessed};
use quorum_crypto::secagg::Phase;
use quorum_policies::{Ledger, SitePolicy};
use quorum_proto::v1::{self as pb, client_message::Body as Out, server_message::Body as In};
use quorum_round::{
    Fact, HeadWitness, Outcome, OutgoingUpdate, SiteDurable, SiteEvent, SiteHistory, SiteKeys,
    SiteRound, SiteTransmit, UploadReceipt, What, WitnessError, message_name, witness,
};
use rand::{Rng as _, SeedableRng};
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    link::{Heartbeat, Link, LinkLost},
    metrics::SiteMetrics,
    participant::Participant,
    roster::RosterChange,
};

/// How a site runs.
pub struct SiteOptions {
    /// The site bundle folder (certificate, key, CA).
    pub bundle: PathBuf,
    /// The site's policy (site.toml, or the defaults).
    pub policy: SitePolicy,
    /// Aggregator address (host:port).
    pub server: String,
    /// Name the aggregator's certificate must carry.
    pub server_name: String,
    /// Stop after this many rounds (for fault-injection tests; `None`: until the federation ends).
    pub exit_after_rounds: Option<u32>,
    /// How long to keep trying to reach the aggregator after losing it.
    pub reconnect_for: Duration,
    /// Fault injection: stop making progress just before this secure-aggregation step, so a
    /// test can SIGKILL the process in a known phase (`None` in production).
    pub pause_before: Option<Phase>,
    /// Take a `[policy.roster]` that differs from the one this site last ran with (the change
    /// is recorded); without it such a site refuses to start.
    pub accept_roster_change: bool,
    /// Loopback address of the site's `/metrics` and `/healthz`, if served.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What the site did, for the final report.
#[derive(Debug, Default)]
pub struct SiteSummary {
    /// Rounds this site's update was part of.
    pub rounds: u32,
    /// Rounds it declined, with reasons.
    pub declined: Vec<(u32, String)>,
    /// ε spent according to its own ledger.
    pub epsilon: f64,
    /// Record-level ε spent according to its own ledger, for a site with `[record_dp]`.
    pub record_level_epsilon: Option<f64>,
    /// Last validation loss of a global model.
    pub last_val_loss: Option<f64>,
    /// Bytes uploaded.
    pub upload_bytes: u64,
}

/// Live state of a site across rounds.
struct Site<P> {
    opts: SiteOptions,
    participant: P,
    identity: Arc<SiteIdentity>,
    peers: Arc<PeerVerifier>,
    audit: AuditLog,
    ledger: Ledger,
    tls: Arc<rustls::ClientConfig>,
    link: Option<Link>,
    /// What the next offer is judged with (kept current, so a lost link keeps it too).
    history: SiteHistory,
    summary: SiteSummary,
    rng: rand_chacha::ChaCha20Rng,
    witness: HeadWitness,
    terminate: Signal,
    metrics: Arc<SiteMetrics>,
    /// Heartbeats from accepting a round until evaluation starts its own, so that a large
    /// model's download is not mistaken for silence.
    download_heartbeat: Option<Heartbeat>,
}

/// The session was asked to stop (SIGTERM); its log ends with a stop record and a signed head.
#[derive(Debug, thiserror::Error)]
#[error("stopped by SIGTERM; this site's audit log ends with a signed head")]
struct Terminated;

/// The aggregator's node name in witness records.
const AGGREGATOR: &str = "aggregator";

impl<P: Participant> Site<P> {
    async fn send(&self, body: Out) -> anyhow::Result<()> {
        let link = self.link.as_ref().ok_or(LinkLost("not connected".into()))?;
        link.send(body).await
    }

    /// Makes the update on a blocking thread, chunk by chunk, and sends each chunk as it comes:
    /// two chunks wait at most, so memory stays one segment and a few chunks.
    async fn send_update(&mut self, update: OutgoingUpdate) -> anyhow::Result<UploadReceipt> {
        let (chunks, mut next) = tokio::sync::mpsc::channel(2);
        let maker = tokio::task::spawn_blocking(move || {
            update.send_chunks(|chunk| chunks.blocking_send(chunk))
        });
        while let Some(chunk) = next.recv().await {
            let bytes = chunk.packed.len() as u64;
            // On an error `next` is dropped, and the maker stops at its next chunk.
            self.send(Out::UpdateChunk(chunk)).await?;
            self.summary.upload_bytes += bytes;
            self.metrics.sent(bytes);
        }
        match maker.await {
            Ok(Ok(receipt)) => Ok(receipt),
            Ok(Err(_)) => bail!("the update's chunks stopped before the last"),
            Err(e) => bail!("making the update failed: {e}"),
        }
    }

    /// The next message; a SIGTERM while waiting for it ends the session ([`Terminated`]).
    async fn receive(&mut self) -> anyhow::Result<In> {
        let link = self.link.as_mut().ok_or(LinkLost("not connected".into()))?;
        tokio::select! {
            message = link.receive() => message,
            _ = self.terminate.recv() => Err(Terminated.into()),
        }
    }

    /// Ends the log for SIGTERM: a `stop` record and a signed head.
    fn stop_on_signal(&mut self) -> anyhow::Result<()> {
        let site = self.identity.site().to_owned();
        let details = json!({ "signal": "SIGTERM" });
        self.audit
            .append_and_sign(Kind::Stop, Some(&site), details)?;
        Ok(())
    }

    /// Opens a session and records the welcome.
    async fn connect_and_join(&mut self) -> anyhow::Result<()> {
        let policy = &self.opts.policy.policy;
        let join = pb::Join {
            federation: self.identity.federation().to_owned(),
            // Filled in by `Link::open`, bound to the TLS session it opens.
            evidence: Vec::new(),
            max_epsilon: policy.max_epsilon,
            min_cohort: policy.min_cohort,
            require_secure_aggregation: policy.require_secure_aggregation
                || !policy.allow_plain_mode,
        };
        let (link, welcome) = Link::open(
            &self.opts.server,
            &self.opts.server_name,
            self.tls.clone(),
            &self.identity,
            &self.peers,
            join,
        )
        .await?;
        self.link = Some(link);
        let details = json!({ "federation": welcome.federation, "rounds": welcome.total_rounds });
        self.audit
            .append(Kind::Join, None, Some(self.identity.site()), details)
            .context("audit log write failed; stopping rather than acting unaudited")?;
        quorum_observe::line(&format!(
            "{}: joined federation '{}' ({} rounds)",
            welcome.site, welcome.federation, welcome.total_rounds
        ));
        self.metrics.connected(true);
        Ok(())
    }

    /// Hangs forever when `phase` is the configured fault-injection point.
    async fn fault_point(&self, phase: Phase, round: u32) {
        if self.opts.pause_before == Some(phase) {
            quorum_observe::line(&format!(
                "{}: pausing before {phase} in round {round} (--pause-before)",
                self.identity.site()
            ));
            std::future::pending::<()>().await;
        }
    }

    fn write(&mut self, round: Option<u32>, what: What) -> anyhow::Result<()> {
        let fact = Fact {
            round,
            site: Some(self.identity.site().to_owned()),
            what,
        };
        let kind: Kind = fact.what.kind().parse()?;
        self.audit
            .append(kind, round, fact.site.as_deref(), fact.details())
            .map(drop)
            .context("audit log write failed; stopping rather than acting unaudited")
    }
}

/// The details of this site's last record of `kind`, if it has one.
fn last_details(audit: &AuditLog, kind: Kind) -> anyhow::Result<Option<serde_json::Value>> {
    let filter = Filter {
        kind: Some(kind),
        ..Default::default()
    };
    Ok(quorum_audit::list(audit.store(), &filter)?
        .pop()
        .map(|record| record.details))
}

/// The roster in this site's last `policy_loaded` record, if it has one.
fn last_roster(audit: &AuditLog) -> anyhow::Result<Option<BTreeMap<String, String>>> {
    last_details(audit, Kind::PolicyLoaded)?
        .map(|details| {
            serde_json::from_value(details["roster"].clone())
                .context("the roster in this site's last policy_loaded record is unreadable")
        })
        .transpose()
}

/// What changed in `roster` since this site last ran; refused unless `accepted`, since a site
/// does not take an edited roster silently.
fn roster_change(
    audit: &AuditLog,
    roster: &BTreeMap<String, String>,
    accepted: bool,
) -> anyhow::Result<Option<RosterChange>> {
    let change = last_roster(audit)?.and_then(|last| RosterChange::between(&last, roster));
    if let Some(change) = &change
        && !accepted
    {
        bail!(
            "[policy.roster] in site.toml differs from the roster this site last ran with ({change}); \
             if that is intended, start once with --accept-roster-change, which puts the change on \
             this site's audit record"
        );
    }
    Ok(change)
}

/// Records this start with the site's certificate serial and key, and, when the certificate
/// changed since the last start (renewed, or replaced with a new key), that change.
fn record_start(audit: &mut AuditLog, identity: &SiteIdentity, server: &str) -> anyhow::Result<()> {
    let serial = identity.identity().serial_hex.clone();
    let key_sha256 = hex::encode(key_fingerprint(identity.certificate_der())?);
    let last_start = last_details(audit, Kind::Start)?;
    audit.append(
        Kind::Start,
        None,
        Some(identity.site()),
        json!({ "version": env!("CARGO_PKG_VERSION"), "server": server,
                "certificate_serial": serial, "key_sha256": key_sha256 }),
    )?;
    let Some(previous) = last_start
        .as_ref()
        .and_then(|last| last["certificate_serial"].as_str())
        .filter(|previous| *previous != serial)
    else {
        return Ok(());
    };
    let key_kept = last_start
        .as_ref()
        .and_then(|last| last["key_sha256"].as_str())
        == Some(key_sha256.as_str());
    let details = json!({ "action": "certificate_changed", "from_serial": previous,
                          "to_serial": serial, "key_kept": key_kept });
    audit.append(Kind::AdminAction, None, Some(identity.site()), details)?;
    quorum_observe::line(&format!(
        "{}: certificate changed since the last start ({previous} -> {serial}){}",
        identity.site(),
        if key_kept {
            ", same key: roster lines stay valid"
        } else {
            "; new key: every member must pin the new roster line (quorum-client fingerprint)"
        }
    ));
    Ok(())
}

/// Joins the federation and takes part until it finishes.
pub async fn run<P: Participant>(opts: SiteOptions, participant: P) -> anyhow::Result<SiteSummary> {
    let identity = Arc::new(SiteIdentity::load(&opts.bundle)?);
    if identity.federation() != opts.policy.site.federation {
        bail!(
            "the bundle is for federation '{}' but site.toml accepts only '{}'",
            identity.federation(),
            opts.policy.site.federation
        );
    }
    let state_dir = &opts.policy.storage.state_dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let key_path = opts.policy.audit_key_path();
    let key = AuditKey::load(&key_path).with_context(|| {
        format!(
            "cannot load this site's audit key; make it once with `quorum-client audit keygen --out {}` and give auditors the fingerprint it prints",
            key_path.display()
        )
    })?;
    let mut audit = AuditLog::open(
        opts.policy.audit_dir(),
        format!("site:{}", identity.site()),
        Some(key),
    )
    .context("cannot open the site's audit log")?;
    // The aggregator's heads witnessed before: its log must move on from the last one.
    let mut witness = HeadWitness::default();
    if let Some(&head) = last_witnessed(audit.store())?.get(AGGREGATOR) {
        witness.remember(AGGREGATOR, head);
    }
    let ledger = Ledger::open(&opts.policy.ledger_path())?;
    let roster: BTreeMap<String, String> = opts
        .policy
        .policy
        .roster
        .iter()
        .map(|(s, k)| (s.clone(), hex::encode(k)))
        .collect();
    let change = roster_change(&audit, &roster, opts.accept_roster_change)?;
    record_start(&mut audit, &identity, &opts.server)?;
    let policy = &opts.policy.policy;
    audit.append(
        Kind::PolicyLoaded,
        None,
        Some(identity.site()),
        json!({ "federation": opts.policy.site.federation, "sha256": hex::encode(opts.policy.source_sha256),
                "max_epsilon": policy.max_epsilon,
                "delta": policy.delta.get(), "min_cohort": policy.min_cohort,
                "require_secure_aggregation": policy.require_secure_aggregation,
                "require_dp": policy.require_dp, "spent_epsilon": ledger.spent_epsilon(policy.delta),
                "corrupt_fraction": policy.corrupt_fraction,
                "share_metrics": policy.share_metrics, "sum_metrics": policy.sum_metrics,
                "require_revocation": policy.require_revocation,
                "roster": roster,
                "record_dp": opts.policy.record_dp.map(|r| json!({
                    "unit": r.unit.name(), "sampling_rate": r.sampling_rate,
                    "noise_multiplier": r.noise_multiplier, "clip_norm": r.clip_norm,
                    "max_epsilon": r.max_epsilon, "delta": r.delta.get(),
                    "spent_epsilon": ledger.record_level_epsilon(r.delta, None) })) }),
    )?;
    if let Some(change) = change {
        quorum_observe::line(&format!(
            "{}: roster changed ({change}), as accepted",
            identity.site()
        ));
        let mut details = serde_json::to_value(&change)?;
        details["action"] = json!("roster_change");
        audit.append(Kind::AdminAction, None, Some(identity.site()), details)?;
    }

    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = quorum_attest::tls::client_config(
        &identity.ca_path(),
        &identity.cert_path(),
        &identity.key_path(),
        None,
    )?;
    // Revocation comes with each offer; the newest list adopted so far is the floor.
    let stored_list = opts.policy.revocation_list_path();
    let stored = match std::fs::read(&stored_list) {
        Ok(der) => Some(der),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", stored_list.display())),
    };
    let peers = PeerVerifier::relayed(&identity.ca_path(), identity.federation(), stored.as_deref())
        .with_context(|| format!("the revocation list kept at {} is unusable; it is written only from checked lists, so restore it from a backup", stored_list.display()))?
        .with_roster(opts.policy.policy.roster.clone());
    let peers = Arc::new(peers);
    let mut site = Site {
        opts,
        participant,
        identity,
        peers,
        audit,
        ledger,
        tls,
        link: None,
        history: SiteHistory::default(),
        summary: SiteSummary::default(),
        rng: rand_chacha::ChaCha20Rng::from_os_rng(),
        witness,
        terminate: signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?,
        metrics: Arc::default(),
        download_heartbeat: None,
    };
    if let Some(address) = site.opts.metrics_listen {
        let endpoint: Arc<dyn quorum_observe::Endpoint> = site.metrics.clone();
        quorum_observe::serve(address, "--metrics-listen", endpoint).await?;
    }
    // Transport failures (aggregator restarting, network blips) are retried with exponential
    // backoff; refusals (TLS, attestation, policy) and local failures end the session.
    let mut backoff = Duration::from_millis(500);
    let mut give_up = Instant::now() + site.opts.reconnect_for;
    loop {
        let attempt = match site.connect_and_join().await {
            Ok(()) => {
                backoff = Duration::from_millis(500);
                give_up = Instant::now() + site.opts.reconnect_for;
                site.run_rounds().await
            }
            Err(e) => Err(e),
        };
        match attempt {
            Ok(()) => break,
            Err(e) if e.is::<Terminated>() => {
                site.stop_on_signal()?;
                return Err(e);
            }
            Err(e) if e.is::<LinkLost>() && Instant::now() + backoff < give_up => {
                site.link = None;
                // Jittered, so sites that lost the same aggregator do not all come back at once.
                let wait = backoff.mul_f64(site.rng.random_range(0.5..=1.0));
                quorum_observe::line(&format!(
                    "{}: {e}; reconnecting in {wait:.1?}",
                    site.identity.site()
                ));
                site.metrics.reconnecting(&e.to_string());
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = site.terminate.recv() => {
                        site.stop_on_signal()?;
                        return Err(Terminated.into());
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
    site.summary.epsilon = site.ledger.spent_epsilon(site.opts.policy.policy.delta);
    site.summary.record_level_epsilon = site
        .opts
        .policy
        .record_dp
        .map(|r| site.ledger.record_level_epsilon(r.delta, None));
    site.metrics.finished();
    Ok(site.summary)
}

impl<P: Participant> Site<P> {
    async fn run_rounds(&mut self) -> anyhow::Result<()> {
        let mut rounds_done = 0;
        loop {
            match self.receive().await? {
                In::RoundConfig(config) => {
                    if self.round(config).await? {
                        rounds_done += 1;
                    }
                    if self
                        .opts
                        .exit_after_rounds
                        .is_some_and(|n| rounds_done >= n)
                    {
                        return Ok(());
                    }
                }
                In::Finished(finished) => {
                    let what = What::Stopped {
                        final_model_sha256: hex::encode(&finished.final_model_sha256),
                        rounds: Some(finished.rounds),
                    };
                    self.write(None, what)?;
                    self.audit
                        .append_signed_head(None)
                        .context("audit log write failed")?;
                    return Ok(());
                }
                In::AuditHead(head) => self.witness_aggregator(head).await?,
                In::Aborted(a) => {
                    let what = What::RoundAborted {
                        reason: a.reason,
                        attempt: None,
                    };
                    self.write(Some(a.round), what)?;
                }
                other => tracing::warn!("ignoring {} outside a round", message_name(&other)),
            }
        }
    }

    /// Stores the aggregator's signed head and answers with this site's own. A head that does
    /// not move past one witnessed before means the aggregator's log went back: recorded, and
    /// the site stops taking part.
    async fn witness_aggregator(&mut self, head: pb::AuditHead) -> anyhow::Result<()> {
        let round = Some(head.round).filter(|&r| r > 0);
        match self.witness.observe(AGGREGATOR, &head) {
            Ok(witnessed) => {
                self.write(round, What::Witnessed(witnessed))?;
                let own = self
                    .audit
                    .append_signed_head(round)
                    .context("audit log write failed")?;
                self.send(Out::AuditHead(witness::head_message(head.round, &own)))
                    .await
            }
            Err(e @ WitnessError::WentBack { .. }) => {
                self.write(round, What::refused(e.to_string()))?;
                bail!("{e}; the evidence is in this site's audit log; stopping");
            }
            Err(e) => {
                tracing::warn!("{e}");
                self.write(round, What::refused(e.to_string()))
            }
        }
    }

    /// Takes part in the round `config` offers until it ends for this site; true when it ran
    /// to its end (completed, evaluated or declined) rather than being aborted or left.
    async fn round(&mut self, config: pb::RoundConfig) -> anyhow::Result<bool> {
        let keys = SiteKeys {
            signer: self.identity.clone(),
            verifier: self.peers.clone(),
        };
        let mut machine = SiteRound::offer(
            config,
            self.identity.site(),
            &self.opts.policy,
            &self.ledger,
            self.history,
            keys,
            self.rng.random(),
        );
        loop {
            let outcome = self.drive(&mut machine).await;
            self.history = machine.history();
            if let Some(outcome) = outcome? {
                self.download_heartbeat = None;
                return Ok(self.ended(machine.round(), outcome));
            }
            let message = match self.receive().await? {
                // The previous round's head may still be on its way.
                In::AuditHead(head) => {
                    self.witness_aggregator(head).await?;
                    continue;
                }
                message => message,
            };
            // Masking a large update takes a while: let the runtime move other work off this
            // thread meanwhile.
            tokio::task::block_in_place(|| machine.handle(message));
        }
    }

    /// Carries out what the machine asks, in its contract order, until it asks for nothing
    /// more; returns the round's outcome once it has ended.
    async fn drive(&mut self, machine: &mut SiteRound) -> anyhow::Result<Option<Outcome>> {
        let mut outcome = None;
        loop {
            let mut busy = false;
            while let Some(durable) = machine.poll_audit() {
                busy = true;
                match durable {
                    SiteDurable::Audit(fact) => self.write(fact.round, fact.what)?,
                    SiteDurable::Ledger { round, rho, dpsgd } => {
                        let delta = self.opts.policy.policy.delta;
                        self.ledger
                            .record(round, rho, dpsgd, delta, SystemTime::now())?;
                    }
                    SiteDurable::RevocationList(der) => {
                        let path = self.opts.policy.revocation_list_path();
                        quorum_durable::replace(&path, &der, quorum_durable::Mode::Public)
                            .with_context(|| {
                                format!("cannot keep the revocation list at {}", path.display())
                            })?;
                    }
                }
            }
            while let Some(event) = machine.poll_event() {
                busy = true;
                match event {
                    SiteEvent::Note(note) => quorum_observe::line(&note),
                    // Evaluating and training block this thread; the runtime's other workers
                    // drive the connection (keepalives and heartbeats) meanwhile.
                    SiteEvent::Evaluate { model } => {
                        self.download_heartbeat = None;
                        let link = self.link.as_ref().ok_or(LinkLost("not connected".into()))?;
                        let heartbeat = link.heartbeat(machine.config(), Arc::default());
                        self.metrics.round_phase(machine.round(), "evaluating");
                        let loss = tokio::task::block_in_place(|| {
                            self.participant.load_and_evaluate(machine.config(), &model)
                        })?;
                        drop(heartbeat);
                        self.summary.last_val_loss = Some(loss);
                        machine.evaluated(loss);
                    }
                    SiteEvent::Train => {
                        let site = self.identity.site().to_owned();
                        let done = Arc::new(AtomicU32::new(0));
                        let link = self.link.as_ref().ok_or(LinkLost("not connected".into()))?;
                        let heartbeat = link.heartbeat(machine.config(), Arc::clone(&done));
                        self.metrics.training(machine.round(), Arc::clone(&done));
                        let update = tokio::task::block_in_place(|| {
                            self.participant.train(machine.config(), &site, &done)
                        })?;
                        // Encoding (clip, rotate, noise) is part of the training budget too.
                        tokio::task::block_in_place(|| machine.trained(update));
                        drop(heartbeat);
                        self.metrics.round_phase(machine.round(), "aggregating");
                    }
                    SiteEvent::Ended(end) => outcome = Some(end),
                }
            }
            while let Some(transmit) = machine.poll_transmit() {
                busy = true;
                let secure = machine.config().secure_aggregation;
                if let Some(phase) = transmit.phase().filter(|_| secure) {
                    self.fault_point(phase, machine.round()).await;
                }
                match transmit {
                    SiteTransmit::Message(body) => {
                        if matches!(&body, Out::Decision(d) if d.accept) {
                            let link =
                                self.link.as_ref().ok_or(LinkLost("not connected".into()))?;
                            let beats = link.heartbeat(machine.config(), Arc::default());
                            self.download_heartbeat = Some(beats);
                        }
                        self.send(body).await?;
                    }
                    SiteTransmit::Update(update) => {
                        let receipt = self.send_update(*update).await?;
                        machine.uploaded(receipt);
                    }
                }
            }
            if !busy {
                return Ok(outcome);
            }
        }
    }

    /// Notes how a round ended; true when it counts as taken part in.
    fn ended(&mut self, round: u32, outcome: Outcome) -> bool {
        let site = self.identity.site().to_owned();
        let epsilon = self.ledger.spent_epsilon(self.opts.policy.policy.delta);
        let (counts, included, declined, error) = match outcome {
            Outcome::Completed { included, .. } => {
                self.summary.rounds += u32::from(included);
                (true, included, false, None)
            }
            Outcome::Evaluated => (true, false, false, None),
            Outcome::Declined(reason) => {
                self.summary.declined.push((round, reason));
                (true, false, true, None)
            }
            Outcome::Aborted(reason) => (
                false,
                false,
                false,
                Some(format!("round {round} aborted: {reason}")),
            ),
            Outcome::Left(reason) => (
                false,
                false,
                false,
                Some(format!("left round {round}: {reason}")),
            ),
        };
        if let Some(error) = &error {
            quorum_observe::line(&format!("{site}: {error}"));
        }
        self.metrics
            .round_ended(included, declined, error.as_deref(), epsilon);
        counts
    }
}
