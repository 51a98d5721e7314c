//! A site's part in the federation: join with attestation evidence, then for each round check
//! the offer against the site's own policy, download the global model, train locally, encode
//! the update with distributed DP, mask it with SecAgg+ and stream it, and answer the consistency
//! and unmask requests. Every step that matters to a compliance officer goes to the site's audit
//! log before it is acted on.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use quorum_attest::{CohortAuthenticator, Evidence, PeerVerifier, SignedRelease, SiteIdentity};
use quorum_audit::{AuditLog, Kind};
use quorum_crypto::{
    digest::sha256,
    dp::{self, DpParams},
    packing,
    secagg::{self, ClientRound, Phase},
};
use quorum_policies::{Ledger, RoundOffer, SitePolicy};
use quorum_proto::{
    MAX_MESSAGE_BYTES, secagg as wire,
    v1::{
        self as pb, ClientMessage, client_message::Body as Out,
        federation_client::FederationClient, server_message::Body as In,
    },
};
use rand::SeedableRng;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{participant::Participant, transport};

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
    /// Last validation loss of a global model.
    pub last_val_loss: Option<f64>,
    /// Bytes uploaded.
    pub upload_bytes: u64,
}

/// Live state of a site across rounds.
struct Site<P> {
    opts: SiteOptions,
    participant: P,
    identity: SiteIdentity,
    peers: PeerVerifier,
    audit: AuditLog,
    ledger: Ledger,
    tls: Arc<rustls::ClientConfig>,
    link: Option<Link>,
    expected_model: Option<[u8; 32]>,
    summary: SiteSummary,
    rng: rand_chacha::ChaCha20Rng,
}

/// One open session with the aggregator.
struct Link {
    outbound: mpsc::Sender<ClientMessage>,
    inbound: tonic::Streaming<pb::ServerMessage>,
}

/// The connection went away; the site reconnects and carries on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LinkLost(String);

/// Classifies a failed RPC: refusals end the session, transport failures are retried.
fn status_error(status: &tonic::Status) -> anyhow::Error {
    let (message, refused) = transport::explain(status);
    if refused {
        anyhow::anyhow!(message)
    } else {
        LinkLost(message).into()
    }
}

/// One round's offer, decoded.
struct Offer {
    config: pb::RoundConfig,
    dp: DpParams,
    rho: f64,
    seed: [u8; 32],
}

impl<P: Participant> Site<P> {
    async fn send(&self, body: Out) -> anyhow::Result<()> {
        let link = self.link.as_ref().ok_or(LinkLost("not connected".into()))?;
        link.outbound
            .send(ClientMessage { body: Some(body) })
            .await
            .map_err(|_| LinkLost("the connection to the aggregator closed".into()).into())
    }

    async fn receive(&mut self) -> anyhow::Result<In> {
        let link = self.link.as_mut().ok_or(LinkLost("not connected".into()))?;
        match link.inbound.message().await {
            Ok(Some(pb::ServerMessage { body: Some(body) })) => Ok(body),
            Ok(Some(_)) => bail!("the aggregator sent an empty message"),
            Ok(None) => Err(LinkLost("the aggregator closed the session".into()).into()),
            Err(status) => Err(status_error(&status)),
        }
    }

    /// Hangs forever when `phase` is the configured fault-injection point.
    async fn fault_point(&self, phase: Phase, round: u32) {
        if self.opts.pause_before == Some(phase) {
            eprintln!(
                "{}: pausing before {phase} in round {round} (--pause-before)",
                self.identity.site()
            );
            std::future::pending::<()>().await;
        }
    }

    fn record(
        &mut self,
        kind: Kind,
        round: Option<u32>,
        details: serde_json::Value,
    ) -> anyhow::Result<()> {
        self.audit
            .append(kind, round, Some(self.identity.site()), details)
            .map(drop)
            .context("audit log write failed; stopping rather than acting unaudited")
    }
}

/// Joins the federation and takes part until it finishes.
pub async fn run<P: Participant>(opts: SiteOptions, participant: P) -> anyhow::Result<SiteSummary> {
    let identity = SiteIdentity::load(&opts.bundle)?;
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
    let mut audit = AuditLog::open(
        opts.policy.audit_dir(),
        format!("site:{}", identity.site()),
        None,
    )
    .context("cannot open the site's audit log")?;
    let ledger = Ledger::open(&opts.policy.ledger_path())?;
    audit.append(
        Kind::Start,
        None,
        Some(identity.site()),
        json!({ "version": env!("CARGO_PKG_VERSION"), "server": opts.server }),
    )?;
    let policy = &opts.policy.policy;
    audit.append(
        Kind::PolicyLoaded,
        None,
        Some(identity.site()),
        json!({ "federation": opts.policy.site.federation, "max_epsilon": policy.max_epsilon,
                "delta": policy.delta.get(), "min_cohort": policy.min_cohort,
                "require_secure_aggregation": policy.require_secure_aggregation,
                "require_dp": policy.require_dp, "spent_epsilon": ledger.spent_epsilon(policy.delta) }),
    )?;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = quorum_attest::tls::client_config(
        &identity.ca_path(),
        &identity.cert_path(),
        &identity.key_path(),
        None,
    )?;
    let peers = PeerVerifier::new(&identity.ca_path(), identity.federation(), None)?;
    let mut site = Site {
        opts,
        participant,
        identity,
        peers,
        audit,
        ledger,
        tls,
        link: None,
        expected_model: None,
        summary: SiteSummary::default(),
        rng: rand_chacha::ChaCha20Rng::from_os_rng(),
    };
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
            Err(e) if e.is::<LinkLost>() && Instant::now() + backoff < give_up => {
                site.link = None;
                eprintln!("{}: {e}; reconnecting in {backoff:?}", site.identity.site());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
    site.summary.epsilon = site.ledger.spent_epsilon(site.opts.policy.policy.delta);
    Ok(site.summary)
}

impl<P: Participant> Site<P> {
    /// Opens a session: TLS, attestation evidence bound to it, Join, Welcome.
    async fn connect_and_join(&mut self) -> anyhow::Result<()> {
        let connection =
            transport::connect(&self.opts.server, &self.opts.server_name, self.tls.clone())
                .await
                .map_err(|e| LinkLost(format!("{e:#}")))?;
        let evidence = collect_evidence(&self.identity, connection.exporter)?;
        let mut client = FederationClient::new(connection.channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (outbound, rx) = mpsc::channel(8);
        let policy = &self.opts.policy.policy;
        let join = pb::Join {
            federation: self.identity.federation().to_owned(),
            evidence,
            max_epsilon: policy.max_epsilon,
            min_cohort: policy.min_cohort,
            require_secure_aggregation: policy.require_secure_aggregation
                || !policy.allow_plain_mode,
        };
        outbound
            .send(ClientMessage {
                body: Some(Out::Join(join)),
            })
            .await?;
        let inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|status| status_error(&status))?
            .into_inner();
        self.link = Some(Link { outbound, inbound });
        match self.receive().await? {
            In::Welcome(welcome) => {
                self.record(
                    Kind::Join,
                    None,
                    json!({ "federation": welcome.federation, "rounds": welcome.total_rounds }),
                )?;
                eprintln!(
                    "{}: joined federation '{}' ({} rounds)",
                    welcome.site, welcome.federation, welcome.total_rounds
                );
                Ok(())
            }
            other => bail!("expected Welcome, got {}", name_of(&other)),
        }
    }
}

/// Evidence for this connection: the signed release next to our executable, our own digest,
/// and the TLS exporter value, signed with the site key. Without a signed release the site
/// joins without evidence, which federations that require attestation refuse.
fn collect_evidence(identity: &SiteIdentity, exporter: [u8; 32]) -> anyhow::Result<Vec<u8>> {
    let exe = std::env::current_exe().context("cannot locate the client executable")?;
    let manifest = SignedRelease::path_for(&exe);
    if !manifest.exists() {
        eprintln!(
            "warning: no signed release manifest at {}; joining without attestation evidence \
             (run `make release` to sign this build)",
            manifest.display()
        );
        return Ok(Vec::new());
    }
    let release = SignedRelease::load(&manifest)?;
    let evidence = Evidence::collect(identity, release, &exe, exporter)?;
    Ok(serde_json::to_vec(&evidence)?)
}

fn name_of(body: &In) -> &'static str {
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
    }
}

/// A round ended early, for a reason that does not end the session.
enum RoundEnd {
    /// The aggregator aborted it.
    Aborted(String),
    /// This site abandoned it: a secure-aggregation check failed (audited).
    Refused(String),
}

impl<P: Participant> Site<P> {
    async fn run_rounds(&mut self) -> anyhow::Result<()> {
        let mut rounds_done = 0;
        loop {
            match self.receive().await? {
                In::RoundConfig(config) => {
                    let round = config.round;
                    match self.round(config).await? {
                        Ok(()) => rounds_done += 1,
                        Err(RoundEnd::Aborted(reason)) => {
                            eprintln!("{}: round {round} aborted: {reason}", self.identity.site());
                        }
                        Err(RoundEnd::Refused(reason)) => {
                            eprintln!("{}: left round {round}: {reason}", self.identity.site());
                        }
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
                    self.record(
                        Kind::Stop,
                        None,
                        json!({ "rounds": finished.rounds, "final_model_sha256": hex::encode(&finished.final_model_sha256) }),
                    )?;
                    return Ok(());
                }
                In::Aborted(a) => {
                    self.record(
                        Kind::RoundAborted,
                        Some(a.round),
                        json!({ "reason": a.reason }),
                    )?;
                }
                other => {
                    tracing::warn!("ignoring {} outside a round", name_of(&other));
                }
            }
        }
    }

    /// Decodes and checks an offer; `Err` is the site's refusal reason.
    fn evaluate_offer(&self, config: &pb::RoundConfig) -> Result<Offer, String> {
        let params = wire::dp_params(config).map_err(|e| format!("invalid DP parameters: {e}"))?;
        let seed: [u8; 32] = config.round_seed.as_slice().try_into().map_err(|_| {
            format!(
                "the round seed must be 32 bytes, got {}",
                config.round_seed.len()
            )
        })?;
        let dp_enabled = config.dp.as_ref().is_some_and(|d| d.enabled);
        // The site computes its privacy cost itself rather than trusting the aggregator's.
        let rho = if dp_enabled && config.local_steps > 0 {
            dp::zcdp_rho(&params, config.min_survivors)
        } else {
            0.0
        };
        if config.local_steps > 0 {
            let offer = RoundOffer {
                federation: config.federation.clone(),
                round: config.round,
                cohort_size: config.cohort.len() as u32,
                secure_aggregation: config.secure_aggregation,
                dp_enabled,
                rho,
            };
            self.opts
                .policy
                .admit(&offer, &self.ledger)
                .map_err(|r| r.to_string())?;
        }
        Ok(Offer {
            config: config.clone(),
            dp: params,
            rho,
            seed,
        })
    }

    async fn round(&mut self, config: pb::RoundConfig) -> anyhow::Result<Result<(), RoundEnd>> {
        let round = config.round;
        let me = self.identity.site().to_owned();
        let Some(index) = config.cohort.iter().position(|s| *s == me) else {
            bail!("the aggregator offered round {round} to a cohort without this site");
        };
        let offer = match self.evaluate_offer(&config) {
            Ok(offer) => offer,
            Err(reason) => {
                self.record(Kind::Refusal, Some(round), json!({ "reason": reason }))?;
                eprintln!("{me}: declining round {round}: {reason}");
                self.summary.declined.push((round, reason.clone()));
                self.send(Out::Decision(pb::RoundDecision {
                    round,
                    accept: false,
                    reason,
                }))
                .await?;
                return Ok(Ok(()));
            }
        };
        self.record(
            Kind::CohortSelected,
            Some(round),
            json!({ "cohort": config.cohort, "secure_aggregation": config.secure_aggregation,
                    "dp_enabled": offer.config.dp.as_ref().is_some_and(|d| d.enabled), "rho": offer.rho,
                    "local_steps": config.local_steps }),
        )?;
        self.send(Out::Decision(pb::RoundDecision {
            round,
            accept: true,
            reason: String::new(),
        }))
        .await?;

        let model = match self.download_model(&config).await? {
            Ok(model) => model,
            Err(end) => return Ok(Err(end)),
        };
        let val_before = self.participant.load_and_evaluate(&config, &model)?;
        self.summary.last_val_loss = Some(val_before);

        if config.local_steps == 0 {
            let report = pb::RoundReport {
                round,
                val_loss_before: val_before,
                ..Default::default()
            };
            self.send(Out::Report(report)).await?;
            eprintln!("{me}: final model validation loss {val_before:.4}");
            return Ok(Ok(()));
        }

        let update = self.participant.train(&config, &me)?;
        // Privacy is spent when the update leaves the site: record it first.
        let policy_delta = self.opts.policy.policy.delta;
        if offer.rho > 0.0 {
            self.ledger
                .record(round, offer.rho, policy_delta, SystemTime::now())?;
        }
        let epsilon = self.ledger.spent_epsilon(policy_delta);
        self.record(
            Kind::PrivacySpent,
            Some(round),
            json!({ "rho": offer.rho, "epsilon": epsilon, "delta": policy_delta.get() }),
        )?;
        self.send(Out::Report(pb::RoundReport {
            round,
            train_loss: update.train_loss,
            val_loss_before: val_before,
            val_loss_after: update.val_loss_after,
            tokens: update.tokens,
            seconds: update.seconds,
            epsilon_spent: epsilon,
        }))
        .await?;

        let seed = offer.seed;
        // Encoding takes seconds for large models: keep it off the runtime's workers, which
        // drive this site's connection (keepalives included) meanwhile.
        let mut rng = rand_chacha::ChaCha20Rng::from_rng(&mut self.rng);
        let params = offer.dp;
        let encoded = tokio::task::spawn_blocking(move || {
            dp::encode(&update.delta, &params, &seed, &mut rng)
        })
        .await
        .context("the DP encoding task failed")??;
        let outcome = if config.secure_aggregation {
            self.secure_upload(&config, index as u32, seed, encoded)
                .await?
        } else {
            self.upload(round, config.modulus_bits, &encoded).await?;
            Ok(())
        };
        if let Err(end) = outcome {
            return Ok(Err(end));
        }
        self.await_result(round).await
    }

    async fn download_model(
        &mut self,
        config: &pb::RoundConfig,
    ) -> anyhow::Result<Result<Vec<u8>, RoundEnd>> {
        let total = usize::try_from(config.model_bytes).context("model too large")?;
        let mut bytes = model_buffer(total);
        loop {
            match self.receive().await? {
                In::ModelChunk(chunk) => {
                    if chunk.round != config.round || chunk.offset != bytes.len() as u64 {
                        bail!(
                            "model chunk out of order (round {}, offset {})",
                            chunk.round,
                            chunk.offset
                        );
                    }
                    if bytes.len() + chunk.data.len() > total {
                        bail!("the aggregator sent more model bytes than announced");
                    }
                    bytes.extend_from_slice(&chunk.data);
                    if chunk.last {
                        break;
                    }
                }
                In::Aborted(a) => return Ok(Err(RoundEnd::Aborted(a.reason))),
                other => bail!("expected the model, got {}", name_of(&other)),
            }
        }
        let digest = sha256(&bytes);
        if digest.as_slice() != config.model_sha256.as_slice() {
            bail!(
                "the downloaded model does not match the digest announced for round {}",
                config.round
            );
        }
        if let Some(expected) = self.expected_model.filter(|e| *e != digest) {
            self.record(
                Kind::Refusal,
                Some(config.round),
                json!({ "reason": "global model differs from the one announced in the last result",
                        "expected": hex::encode(expected), "got": hex::encode(digest) }),
            )?;
            bail!(
                "the aggregator sent a different global model than it announced after the last round"
            );
        }
        self.record(
            Kind::ModelDigest,
            Some(config.round),
            json!({ "sha256": hex::encode(digest), "round": config.round, "direction": "received" }),
        )?;
        Ok(Ok(bytes))
    }

    /// Streams an encoded (and possibly masked) vector in ≤ 1 MiB chunks.
    async fn upload(&mut self, round: u32, bits: u32, values: &[u32]) -> anyhow::Result<()> {
        let per_chunk = quorum_proto::elements_per_chunk(bits);
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut sent = 0u64;
        let chunks = values.len().div_ceil(per_chunk);
        for (i, chunk) in values.chunks(per_chunk).enumerate() {
            let packed = packing::pack(bits, chunk);
            hasher.update(&packed);
            sent += packed.len() as u64;
            let message = pb::UpdateChunk {
                round,
                offset: (i * per_chunk) as u64,
                elements: chunk.len() as u32,
                packed: packed.into(),
                last: i + 1 == chunks,
            };
            self.send(Out::UpdateChunk(message)).await?;
        }
        self.summary.upload_bytes += sent;
        self.record(
            Kind::UploadDigest,
            Some(round),
            json!({ "sha256": hex::encode(hasher.finish().as_ref()), "bytes": sent }),
        )?;
        Ok(())
    }

    async fn secure_upload(
        &mut self,
        config: &pb::RoundConfig,
        me: u32,
        round_seed: [u8; 32],
        mut encoded: Vec<u32>,
    ) -> anyhow::Result<Result<(), RoundEnd>> {
        let round = config.round;
        let ctx = wire::round_context(config, round_seed, encoded.len());
        let cohort = config.cohort.clone();
        let (expect_peers, advert) =
            match ClientRound::start(ctx, me, &self.identity, &mut self.rng) {
                Ok(value) => value,
                Err(e) => return Ok(Err(self.refuse_peer(round, e)?)),
            };
        self.fault_point(Phase::Advertise, round).await;
        self.send(Out::Advertise(wire::advertisement_to_pb(round, advert)))
            .await?;

        let peers = match self.receive().await? {
            In::PeerKeys(m) if m.round == round => {
                let peers = m.peers.into_iter().map(wire::advertisement_from_pb);
                match peers.collect::<Result<Vec<_>, _>>() {
                    Ok(peers) => peers,
                    Err(e) => {
                        let reason = format!("malformed peer keys from the aggregator: {e}");
                        return Ok(Err(self.refuse(round, reason)?));
                    }
                }
            }
            In::Aborted(a) => return Ok(Err(RoundEnd::Aborted(a.reason))),
            other => bail!("expected PeerKeys, got {}", name_of(&other)),
        };
        let auth = CohortAuthenticator {
            verifier: &self.peers,
            cohort: &cohort,
        };
        let (expect_shares, shares) =
            match expect_peers.handle_peer_keys(peers, &auth, &mut self.rng) {
                Ok(value) => value,
                Err(e) => return Ok(Err(self.refuse_peer(round, e)?)),
            };
        self.fault_point(Phase::ShareKeys, round).await;
        self.send(Out::ShareKeys(pb::ShareKeys {
            round,
            shares: wire::shares_to_pb(shares),
        }))
        .await?;

        let forwarded = match self.receive().await? {
            In::ForwardedShares(m) if m.round == round => wire::shares_from_pb(m.shares),
            In::Aborted(a) => return Ok(Err(RoundEnd::Aborted(a.reason))),
            other => bail!("expected ForwardedShares, got {}", name_of(&other)),
        };
        let masker = match expect_shares.handle_forwarded_shares(forwarded) {
            Ok(value) => value,
            Err(e) => return Ok(Err(self.refuse_peer(round, e)?)),
        };
        let (masker, encoded) = tokio::task::spawn_blocking(move || {
            mask_in_parallel(&masker, &mut encoded);
            (masker, encoded)
        })
        .await
        .context("the masking task failed")?;
        self.fault_point(Phase::MaskedInput, round).await;
        self.upload(round, config.modulus_bits, &encoded).await?;
        let expect_survivors = masker.finish();

        let survivors = match self.receive().await? {
            In::Survivors(m) if m.round == round => m.clients,
            In::Aborted(a) => return Ok(Err(RoundEnd::Aborted(a.reason))),
            other => bail!("expected SurvivorSet, got {}", name_of(&other)),
        };
        let (expect_unmask, signature) =
            match expect_survivors.handle_survivors(&survivors, &self.identity) {
                Ok(value) => value,
                Err(e) => return Ok(Err(self.refuse_peer(round, e)?)),
            };
        self.fault_point(Phase::Consistency, round).await;
        self.send(Out::Consistency(wire::consistency_to_pb(round, signature)))
            .await?;

        let signatures = match self.receive().await? {
            In::UnmaskRequest(m) if m.round == round => m
                .signatures
                .into_iter()
                .map(wire::consistency_from_pb)
                .collect(),
            In::Aborted(a) => return Ok(Err(RoundEnd::Aborted(a.reason))),
            other => bail!("expected UnmaskRequest, got {}", name_of(&other)),
        };
        let auth = CohortAuthenticator {
            verifier: &self.peers,
            cohort: &cohort,
        };
        let shares = match expect_unmask.handle_unmask_request(signatures, &auth) {
            Ok(value) => value,
            Err(e) => return Ok(Err(self.refuse_peer(round, e)?)),
        };
        self.fault_point(Phase::Unmask, round).await;
        self.send(Out::Unmask(wire::unmask_to_pb(round, shares)))
            .await?;
        Ok(Ok(()))
    }

    /// Logs a protocol violation by the aggregator or a peer, or a round that fell below its
    /// threshold; the site abandons the round (revealing nothing more) and waits for the next.
    fn refuse_peer(&mut self, round: u32, error: secagg::Error) -> anyhow::Result<RoundEnd> {
        self.refuse(round, format!("secure aggregation check failed: {error}"))
    }

    /// Audits why the site abandons `round` (a malformed or failed check of what the aggregator
    /// sent); the session goes on with the next round.
    fn refuse(&mut self, round: u32, reason: String) -> anyhow::Result<RoundEnd> {
        self.record(Kind::Refusal, Some(round), json!({ "reason": reason }))?;
        Ok(RoundEnd::Refused(reason))
    }

    async fn await_result(&mut self, round: u32) -> anyhow::Result<Result<(), RoundEnd>> {
        let result = match self.receive().await? {
            In::Result(result) if result.round == round => result,
            In::Aborted(a) => return Ok(Err(RoundEnd::Aborted(a.reason))),
            other => bail!("expected RoundResult, got {}", name_of(&other)),
        };
        let Ok(sha) = <[u8; 32]>::try_from(result.new_model_sha256.as_slice()) else {
            let reason = format!(
                "the new model digest must be 32 bytes, got {}",
                result.new_model_sha256.len()
            );
            return Ok(Err(self.refuse(round, reason)?));
        };
        self.expected_model = Some(sha);
        let included = result.survivors.iter().any(|s| s == self.identity.site());
        self.record(
            Kind::RoundCompleted,
            Some(round),
            json!({ "survivors": result.survivors, "included": included, "epsilon": result.epsilon }),
        )?;
        self.record(
            Kind::ModelDigest,
            Some(round),
            json!({ "sha256": hex::encode(sha), "round": round }),
        )?;
        if included {
            self.summary.rounds += 1;
        }
        Ok(Ok(()))
    }
}

/// The most memory reserved up front for a model download: the announced size comes from the
/// aggregator, so a hostile one could otherwise make the site reserve any amount and abort.
const MAX_MODEL_PREALLOCATION: usize = 64 << 20;

/// A buffer for a model announced as `announced` bytes; it grows past the reservation as
/// chunks arrive (each checked against the announced total).
fn model_buffer(announced: usize) -> Vec<u8> {
    Vec::with_capacity(announced.min(MAX_MODEL_PREALLOCATION))
}

/// Adds this site's masks to the encoded vector, one slice per core (the PRG is seekable).
fn mask_in_parallel(masker: &secagg::Masker, values: &mut [u32]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = values.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (i, slice) in values.chunks_mut(per_thread).enumerate() {
            scope.spawn(move || masker.mask(i * per_thread, slice));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announced_model_size_reserves_at_most_the_cap() {
        assert_eq!(model_buffer(1000).capacity(), 1000);
        // A hostile announcement of the largest size must not abort the site.
        assert!(model_buffer(usize::MAX).capacity() <= MAX_MODEL_PREALLOCATION);
    }
}
