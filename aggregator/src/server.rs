//! Composes the aggregator from a validated `federation.toml`: TLS, audit log, gRPC service and
//! round engine.

use std::{
    path::Path,
    sync::{Arc, atomic::AtomicU32},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use quorum_attest::{PeerVerifier, SelfMeasurementVerifier};
use quorum_audit::{AuditKey, AuditLog, Kind};
use quorum_policies::FederationPolicy;
use quorum_proto::{MAX_MESSAGE_BYTES, v1::federation_server::FederationServer};
use quorum_round::CoordinatorConfig;
use serde_json::json;
use tokio::{net::TcpListener, sync::mpsc};

use crate::{
    engine::{Engine, EngineConfig, RoundSummary},
    metrics::Metrics,
    progress::Progress,
    refusal_limit::RefusalLimit,
    service::{Event, FederationService, JoinPolicy, Registry, UploadGate},
    transport,
};

/// Resolves the engine settings from the federation policy.
pub fn engine_config(policy: &FederationPolicy) -> EngineConfig {
    EngineConfig {
        rounds: CoordinatorConfig::from_policy(policy),
        outer: policy.outer,
        state_dir: policy.server.state_dir.clone(),
    }
}

/// Path of the aggregator's audit log inside its state folder.
pub fn audit_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("audit")
}

/// Path of the aggregator's audit key inside its state folder: made once, on purpose, with
/// `quorum-aggregator audit keygen`, so that its fingerprint can be given to auditors.
pub fn audit_key_path(state_dir: &Path) -> std::path::PathBuf {
    quorum_audit::key_path(&audit_path(state_dir))
}

/// Loads the key that signs the audit log's heads.
fn audit_key(state_dir: &Path) -> anyhow::Result<AuditKey> {
    let path = audit_key_path(state_dir);
    AuditKey::load(&path).with_context(|| {
        format!(
            "cannot load the aggregator's audit key; make it once with `quorum-aggregator audit keygen --out {}` and give auditors the fingerprint it prints",
            path.display()
        )
    })
}

/// Hands handshake refusals to the engine to audit, as [`RefusalLimit`] allows, and the
/// summaries of the rest at each interval's end.
async fn forward_refusals(
    mut refusals: mpsc::UnboundedReceiver<transport::RefusedConnection>,
    events: mpsc::Sender<Event>,
) {
    let mut limit = RefusalLimit::default();
    loop {
        let flush_at = limit.next_flush();
        let flush = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let records = tokio::select! {
            refused = refusals.recv() => {
                let Some(refused) = refused else { return };
                let remote = refused.remote;
                if !limit.refused(Instant::now(), remote.ip(), &refused.reason) {
                    continue;
                }
                vec![(format!("(handshake from {remote})"), refused.reason)]
            }
            () = flush => limit
                .flush(Instant::now())
                .into_iter()
                .map(|summary| (summary.site(), summary.reason()))
                .collect(),
        };
        for (site, reason) in records {
            let audited = None;
            if events
                .send(Event::Refused {
                    site,
                    reason,
                    audited,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Runs the federation described by `policy` until its last round; returns the summaries.
pub async fn serve(
    policy: FederationPolicy,
    policy_digest: String,
    initial_model: Vec<u8>,
) -> anyhow::Result<Vec<RoundSummary>> {
    let cfg = engine_config(&policy);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create {}", cfg.state_dir.display()))?;
    let mut audit = AuditLog::open(
        audit_path(&cfg.state_dir),
        "aggregator",
        Some(audit_key(&cfg.state_dir)?),
    )
    .context("cannot open the audit log")?;
    audit
        .append(
            Kind::Start,
            None,
            None,
            json!({ "version": env!("CARGO_PKG_VERSION"), "listen": policy.server.listen.to_string() }),
        )
        .context("audit log")?;
    audit
        .append(
            Kind::ConfigLoaded,
            None,
            None,
            json!({ "federation": cfg.rounds.federation, "sha256": policy_digest, "rounds": cfg.rounds.rounds,
                    "secure_aggregation": cfg.rounds.secure_aggregation, "dp_enabled": cfg.rounds.dp.enabled }),
        )
        .context("audit log")?;

    let server = &policy.server;
    let tls = quorum_attest::tls::server_config(
        &server.ca,
        &server.cert,
        &server.key,
        server.crl.as_deref(),
    )
    .context("TLS configuration")?;
    let peers = PeerVerifier::new(&server.ca, &cfg.rounds.federation, server.crl.as_deref())
        .context("peer verifier")?;
    let listener = TcpListener::bind(server.listen)
        .await
        .with_context(|| format!("cannot listen on {} (port in use?)", server.listen))?;

    let registry = Arc::new(Registry::default());
    // Uploads in flight are stored beside the checkpoints (unnamed files, gone on exit).
    let spool_dir = cfg.state_dir.join("uploads");
    std::fs::create_dir_all(&spool_dir)
        .with_context(|| format!("cannot create {}", spool_dir.display()))?;
    let gate = Arc::new(UploadGate::new(policy.server.upload_slots, spool_dir));
    let next_round = Arc::new(AtomicU32::new(1));
    let (events_tx, events_rx) = mpsc::channel(1024);
    let join_policy = JoinPolicy {
        federation: cfg.rounds.federation.clone(),
        total_rounds: cfg.rounds.rounds,
        require_attestation: policy.releases.require_attestation,
        verifier: Box::new(SelfMeasurementVerifier),
        trusted_release_keys: policy
            .releases
            .trusted_keys
            .iter()
            .map(hex::encode)
            .collect(),
        allowed_versions: policy.releases.allowed_versions.clone(),
    };
    let service = FederationService::new(
        registry.clone(),
        gate.clone(),
        events_tx.clone(),
        join_policy,
        next_round.clone(),
    );

    let (refusals_tx, refusals_rx) = mpsc::unbounded_channel();
    let incoming = transport::accept_authenticated(listener, tls, refusals_tx);
    // Handshake refusals become audit records through the engine's event stream, a bounded
    // number per source and interval; the rest are summarised (see `refusal_limit`).
    tokio::spawn(forward_refusals(refusals_rx, events_tx.clone()));
    let grpc = FederationServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .add_service(grpc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            }),
    );

    let metrics = Arc::new(Metrics::default());
    if let Some(address) = server.metrics_listen {
        let endpoint: Arc<dyn quorum_observe::Endpoint> = metrics.clone();
        quorum_observe::serve(address, "server.metrics_listen", endpoint).await?;
        eprintln!("metrics: http://{address}/metrics, health: http://{address}/healthz");
    }
    let engine = Engine::new(
        cfg,
        registry.clone(),
        gate,
        events_rx,
        audit,
        peers,
        initial_model,
        next_round,
        Progress::new(),
        metrics,
    )?;
    let result = engine.run().await;
    // Let the Finished messages drain before the connections close.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = shutdown_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server_task).await;
    result
}
