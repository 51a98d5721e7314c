//! One open session with the aggregator: mTLS, attestation evidence bound to the connection,
//! `Join` and `Welcome`, then protocol messages each way. Transport failures surface as
//! [`LinkLost`], which the session retries; refusals as plain errors, which end it.

use anyhow::{Context as _, bail};
use quorum_attest::{Evidence, PeerVerifier, SignedRelease, SiteIdentity};
use quorum_proto::{
    MAX_MESSAGE_BYTES,
    v1::{
        self as pb, ClientMessage, client_message::Body as Out,
        federation_client::FederationClient, server_message::Body as In,
    },
};
use quorum_round::message_name;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::transport;

/// One open session with the aggregator.
pub struct Link {
    outbound: mpsc::Sender<ClientMessage>,
    inbound: tonic::Streaming<pb::ServerMessage>,
}

/// The connection went away; the site reconnects and carries on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LinkLost(pub String);

/// Classifies a failed RPC: refusals end the session, transport failures are retried.
fn status_error(status: &tonic::Status) -> anyhow::Error {
    let (message, refused) = transport::explain(status);
    if refused {
        anyhow::anyhow!(message)
    } else {
        LinkLost(message).into()
    }
}

impl Link {
    /// Connects, checks the aggregator's certificate against the newest revocation list this
    /// site holds, binds attestation evidence to this TLS session, sends `join` with it and
    /// waits for the welcome.
    pub async fn open(
        server: &str,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        identity: &SiteIdentity,
        peers: &PeerVerifier,
        mut join: pb::Join,
    ) -> anyhow::Result<(Self, pb::Welcome)> {
        let connection = transport::connect(server, server_name, tls)
            .await
            .map_err(|e| match transport::certificate_refused(&e) {
                Some(reason) => anyhow::anyhow!(
                    "the aggregator at {server} presented a certificate this site refuses \
                     ({reason}); check --server and --server-name: the name must be one the \
                     aggregator's certificate carries"
                ),
                None => LinkLost(format!("{e:#}")).into(),
            })?;
        peers
            .server_connected(connection.server_certificate)
            .context("the aggregator's certificate is refused")?;
        join.evidence = collect_evidence(identity, connection.exporter)?;
        let mut client = FederationClient::new(connection.channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (outbound, rx) = mpsc::channel(8);
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
        let mut link = Self { outbound, inbound };
        match link.receive().await? {
            In::Welcome(welcome) => Ok((link, welcome)),
            other => bail!("expected Welcome, got {}", message_name(&other)),
        }
    }

    /// Sends one message.
    pub async fn send(&self, body: Out) -> anyhow::Result<()> {
        self.outbound
            .send(ClientMessage { body: Some(body) })
            .await
            .map_err(|_| LinkLost("the connection to the aggregator closed".into()).into())
    }

    /// Sends `TrainingProgress` for `config`'s round every `heartbeat_interval_ms` (none when
    /// it is zero), with the steps `done` so far, until the returned guard is dropped. It runs
    /// beside the evaluating or training thread, so the aggregator knows a slow site from a
    /// dead one.
    pub fn heartbeat(&self, config: &pb::RoundConfig, done: Arc<AtomicU32>) -> Heartbeat {
        let interval = Duration::from_millis(config.heartbeat_interval_ms.into());
        let (round, steps_total) = (config.round, config.local_steps);
        let outbound = self.outbound.clone();
        let task = (!interval.is_zero()).then(|| {
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(interval);
                ticks.tick().await; // the first tick is immediate: training just began
                loop {
                    ticks.tick().await;
                    let progress = pb::TrainingProgress {
                        round,
                        steps_done: done.load(Ordering::Relaxed),
                        steps_total,
                    };
                    let message = ClientMessage {
                        body: Some(Out::Progress(progress)),
                    };
                    // Never wait behind a full queue: the next beat carries newer progress.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = outbound.try_send(message) {
                        return;
                    }
                }
            })
        });
        Heartbeat(task)
    }

    /// The next message.
    pub async fn receive(&mut self) -> anyhow::Result<In> {
        match self.inbound.message().await {
            Ok(Some(pb::ServerMessage { body: Some(body) })) => Ok(body),
            Ok(Some(_)) => bail!("the aggregator sent an empty message"),
            Ok(None) => Err(LinkLost("the aggregator closed the session".into()).into()),
            Err(status) => Err(status_error(&status)),
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
        quorum_observe::line(&format!(
            "warning: no signed release manifest at {}; joining without attestation evidence \
             (install a release bundle, or sign this build: quorum-aggregator release sign)",
            manifest.display()
        ));
        return Ok(Vec::new());
    }
    let release = SignedRelease::load(&manifest)?;
    let evidence = Evidence::collect(identity, release, &exe, exporter)?;
    Ok(serde_json::to_vec(&evidence)?)
}

/// Heartbeats of one model download, evaluation or local training; they stop when this is
/// dropped.
pub struct Heartbeat(Option<tokio::task::JoinHandle<()>>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}
