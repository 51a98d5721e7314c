//! The gRPC face of the aggregator. Each site holds one `Session` stream. This layer checks who
//! the peer is (certificate, attestation), keeps the registry of connected sites, reassembles
//! streamed uploads within a fixed number of upload slots, and hands everything else to the
//! round engine as events. It makes no protocol decisions of its own.

use std::{
    collections::{BTreeSet, HashMap},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use quorum_attest::{Evidence, Verdict, VerificationContext, Verifier};
use quorum_crypto::packing;
use quorum_proto::v1::{
    ClientMessage, ServerMessage, UpdateChunk, Welcome, client_message::Body,
    federation_server::Federation, server_message,
};
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::transport::PeerInfo;

/// A site whose stream accepts nothing for this long is disconnected.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// A site must send its `Join` within this long after connecting.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A half-received upload with no new chunk for this long is voided, freeing its slot.
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the round engine hears from the sessions.
#[derive(Debug)]
pub enum Event {
    /// A protocol message from a joined site.
    Message {
        /// Site name (from its certificate).
        site: String,
        /// The message.
        message: Body,
    },
    /// A complete, well-formed masked (or plain) update.
    Upload {
        /// Site name.
        site: String,
        /// Round it was sent for.
        round: u32,
        /// The encoded vector, read back from where it was stored as it arrived.
        values: SpooledUpload,
        /// SHA-256 of the packed bytes as received (for the audit log).
        sha256: [u8; 32],
        /// Bytes received on the wire for this update (payload only).
        bytes: u64,
        /// Holds an upload slot until the engine has added the values into its sum.
        slot: OwnedSemaphorePermit,
    },
    /// A site sent something malformed or out of place; it was dropped without effect.
    Rejected {
        /// Site name.
        site: String,
        /// Why.
        reason: String,
    },
    /// A joined site's stream ended.
    Disconnected {
        /// Site name.
        site: String,
    },
    /// A site was refused at join (attestation, federation, duplicate).
    Refused {
        /// Site name, if known.
        site: String,
        /// Why.
        reason: String,
        /// Signalled once the refusal is in the audit log: the session answers the peer only
        /// then, so no refusal goes out unaudited. `None` where the peer is already gone.
        audited: Option<oneshot::Sender<()>>,
    },
    /// A site joined and passed attestation.
    Joined {
        /// Site name.
        site: String,
        /// Certificate serial.
        serial: String,
        /// The certificate it connected with (DER).
        certificate_der: Vec<u8>,
        /// Attestation verdict, when attestation is required.
        verdict: Option<Verdict>,
    },
}

/// Shape of the update the engine is currently accepting, and from whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSpec {
    /// Round.
    pub round: u32,
    /// Elements in the encoded vector.
    pub elements: u64,
    /// Bits per element on the wire.
    pub bits: u32,
    /// The sites expected to upload; chunks from any other site are refused before they can
    /// take a slot.
    pub sites: Arc<BTreeSet<String>>,
}

/// Gate for uploads: which update is open, and how many may be received at once. Each upload
/// in flight is stored in a file in `spool_dir` as it arrives (4 bytes per element on disk)
/// and holds one chunk in memory, so memory does not grow with the model or the sites.
#[derive(Debug)]
pub struct UploadGate {
    spec: watch::Sender<Option<UploadSpec>>,
    slots: Arc<Semaphore>,
    spool_dir: PathBuf,
}

impl UploadGate {
    /// A gate with `slots` concurrent uploads, stored in unnamed files in `spool_dir`.
    pub fn new(slots: usize, spool_dir: PathBuf) -> Self {
        Self {
            spec: watch::Sender::new(None),
            slots: Arc::new(Semaphore::new(slots.max(1))),
            spool_dir,
        }
    }

    /// Opens (or with `None`, closes) uploads. Half-received uploads of the previous spec are
    /// voided by their readers, which frees their slots.
    pub fn set(&self, spec: Option<UploadSpec>) {
        self.spec.send_replace(spec);
    }

    /// The update open now, if any.
    pub fn current(&self) -> Option<UploadSpec> {
        self.spec.borrow().clone()
    }
}

/// One joined site's outbound half.
#[derive(Debug, Clone)]
struct SessionHandle {
    connection: u64,
    outbound: mpsc::Sender<Result<ServerMessage, Status>>,
}

/// Connected, joined sites.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    changed: Notify,
}

impl Registry {
    /// Names of the connected sites, sorted.
    pub fn sites(&self) -> Vec<String> {
        let mut sites: Vec<String> = self.lock().keys().cloned().collect();
        sites.sort();
        sites
    }

    /// Waits until the set of connected sites changes.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Sends a message to a site; false if it is gone. A site that does not read its stream
    /// for [`SEND_TIMEOUT`] is disconnected, so a stalled peer cannot stall the round.
    pub async fn send(&self, site: &str, body: server_message::Body) -> bool {
        let Some(handle) = self.lock().get(site).cloned() else {
            return false;
        };
        let message = Ok(ServerMessage { body: Some(body) });
        match handle.outbound.send_timeout(message, SEND_TIMEOUT).await {
            Ok(()) => true,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                tracing::warn!(%site, "site stopped reading its stream; disconnecting it");
                self.close(
                    site,
                    Status::deadline_exceeded("stopped reading the stream"),
                )
                .await;
                false
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        }
    }

    /// Ends a site's session with an error status it will see.
    pub async fn close(&self, site: &str, status: Status) {
        let handle = self.lock().remove(site);
        if let Some(handle) = handle {
            // Best effort: a full channel means the site is not reading anyway.
            let _ = handle.outbound.try_send(Err(status));
            self.changed.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionHandle>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, site: &str, handle: SessionHandle) -> bool {
        let mut sessions = self.lock();
        if sessions.contains_key(site) {
            return false;
        }
        sessions.insert(site.to_owned(), handle);
        drop(sessions);
        self.changed.notify_waiters();
        true
    }

    /// Forgets `connection` of `site` as its stream ends; true when the site is gone (not
    /// replaced by a newer session), including when [`Registry::close`] removed it already.
    fn end_connection(&self, site: &str, connection: u64) -> bool {
        let mut sessions = self.lock();
        match sessions.get(site) {
            Some(h) if h.connection == connection => {
                sessions.remove(site);
                drop(sessions);
                self.changed.notify_waiters();
                true
            }
            Some(_) => false,
            None => true,
        }
    }
}

/// Join-time checks configured by the operator.
pub struct JoinPolicy {
    /// Federation name every site must name.
    pub federation: String,
    /// Rounds in the federation (told to sites at join).
    pub total_rounds: u32,
    /// Whether sites must present attestation evidence.
    pub require_attestation: bool,
    /// The attestation verifier.
    pub verifier: Box<dyn Verifier>,
    /// Release keys (hex) the operator trusts.
    pub trusted_release_keys: Vec<String>,
    /// Client versions allowed.
    pub allowed_versions: Vec<String>,
}

/// The `Federation` gRPC service.
pub struct FederationService {
    registry: Arc<Registry>,
    gate: Arc<UploadGate>,
    events: mpsc::Sender<Event>,
    policy: Arc<JoinPolicy>,
    next_round: Arc<std::sync::atomic::AtomicU32>,
    connections: AtomicU64,
}

impl FederationService {
    /// A service feeding `events`.
    pub fn new(
        registry: Arc<Registry>,
        gate: Arc<UploadGate>,
        events: mpsc::Sender<Event>,
        policy: JoinPolicy,
        next_round: Arc<std::sync::atomic::AtomicU32>,
    ) -> Self {
        Self {
            registry,
            gate,
            events,
            policy: Arc::new(policy),
            next_round,
            connections: AtomicU64::new(0),
        }
    }
}

type ServerStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    type SessionStream = ServerStream;

    async fn session(
        &self,
        request: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
        let mut inbound = request.into_inner();
        let site = peer.identity.site.clone();

        let join = match tokio::time::timeout(JOIN_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(ClientMessage {
                body: Some(Body::Join(join)),
            }))) => join,
            Ok(Ok(_)) => return Err(self.refuse(&site, "the first message must be Join").await),
            Ok(Err(status)) => {
                let reason = format!("the first message could not be read: {}", status.message());
                self.refuse(&site, &reason).await;
                return Err(status);
            }
            Err(_) => return Err(self.refuse(&site, "no Join within 30 s").await),
        };
        if join.federation != self.policy.federation || peer.identity.federation != join.federation
        {
            let reason = format!(
                "site asked for federation '{}' (certificate: '{}') but this is '{}'",
                join.federation, peer.identity.federation, self.policy.federation
            );
            return Err(self.refuse(&site, &reason).await);
        }
        let verdict = if self.policy.require_attestation {
            match self.attest(&join.evidence, &peer) {
                Ok(verdict) => Some(verdict),
                Err(reason) => {
                    return Err(self
                        .refuse(&site, &format!("attestation failed: {reason}"))
                        .await);
                }
            }
        } else {
            None
        };

        let (outbound, rx) = mpsc::channel(16);
        let connection = self.connections.fetch_add(1, Ordering::Relaxed);
        if !self.registry.insert(
            &site,
            SessionHandle {
                connection,
                outbound: outbound.clone(),
            },
        ) {
            let reason = "another session for this site is already connected";
            return Err(self.refuse(&site, reason).await);
        }
        let welcome = Welcome {
            site: site.clone(),
            federation: self.policy.federation.clone(),
            total_rounds: self.policy.total_rounds,
            next_round: self.next_round.load(Ordering::Relaxed),
        };
        let _ = outbound
            .send(Ok(ServerMessage {
                body: Some(server_message::Body::Welcome(welcome)),
            }))
            .await;
        let _ = self
            .events
            .send(Event::Joined {
                site: site.clone(),
                serial: peer.identity.serial_hex,
                certificate_der: peer.certificate_der,
                verdict,
            })
            .await;

        let reader = SessionReader {
            site,
            connection,
            registry: self.registry.clone(),
            gate: self.gate.clone(),
            events: self.events.clone(),
        };
        tokio::spawn(reader.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl FederationService {
    /// Audits a refusal, then returns the status that tells the peer. If the engine has
    /// stopped (the aggregator is shutting down) the status goes out unaudited.
    async fn refuse(&self, site: &str, reason: &str) -> Status {
        let (audited, done) = oneshot::channel();
        let event = Event::Refused {
            site: site.to_owned(),
            reason: reason.to_owned(),
            audited: Some(audited),
        };
        if self.events.send(event).await.is_ok() {
            let _ = done.await;
        }
        Status::permission_denied(reason.to_owned())
    }

    fn attest(&self, evidence: &[u8], peer: &PeerInfo) -> Result<Verdict, String> {
        let evidence: Evidence = serde_json::from_slice(evidence)
            .map_err(|e| format!("evidence is not valid JSON: {e}"))?;
        let context = VerificationContext {
            exporter: peer.exporter,
            peer_certificate: &peer.certificate_der,
            trusted_release_keys: &self.policy.trusted_release_keys,
            allowed_versions: &self.policy.allowed_versions,
        };
        self.policy
            .verifier
            .verify(&evidence, &context)
            .map_err(|e| e.to_string())
    }
}

/// Reads one site's stream: forwards protocol messages, reassembles uploads.
struct SessionReader {
    site: String,
    connection: u64,
    registry: Arc<Registry>,
    gate: Arc<UploadGate>,
    events: mpsc::Sender<Event>,
}

/// An upload's values, stored as they arrived in an unnamed file (gone when it is dropped,
/// or when the process dies): 4 bytes per element, little-endian.
#[derive(Debug)]
pub struct SpooledUpload {
    file: std::fs::File,
    elements: u64,
}

impl SpooledUpload {
    /// Elements stored.
    pub fn elements(&self) -> u64 {
        self.elements
    }

    /// Reads the values back in order, up to `window` at a time, calling `f(offset, values)`
    /// on each piece until it returns false.
    pub fn read_parts(
        self,
        window: usize,
        mut f: impl FnMut(u64, &[u32]) -> bool,
    ) -> std::io::Result<()> {
        let mut file = self.file;
        file.seek(SeekFrom::Start(0))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut values = vec![0u32; window.max(1)];
        let mut offset = 0u64;
        while offset < self.elements {
            let n = usize::try_from(self.elements - offset)
                .unwrap_or(usize::MAX)
                .min(values.len());
            let part = &mut values[..n];
            reader.read_exact(bytemuck::cast_slice_mut(part))?;
            // Stored little-endian; a no-op on the machines this runs on.
            part.iter_mut().for_each(|v| *v = u32::from_le(*v));
            if !f(offset, part) {
                break;
            }
            offset += n as u64;
        }
        Ok(())
    }
}

/// An upload being received into a slot.
struct PartialUpload {
    spec: UploadSpec,
    spool: std::io::BufWriter<std::fs::File>,
    received: u64,
    hasher: ring::digest::Context,
    bytes: u64,
    slot: OwnedSemaphorePermit,
}

/// Whether a failed read means the peer sent something undecodable (or too large), rather
/// than the connection going away.
fn is_malformed(status: &Status) -> bool {
    match status.code() {
        tonic::Code::OutOfRange => true,
        tonic::Code::Internal => status.message().starts_with("failed to decode"),
        _ => false,
    }
}

impl SessionReader {
    async fn run(self, mut inbound: Streaming<ClientMessage>) {
        let mut upload: Option<PartialUpload> = None;
        let mut gate = self.gate.spec.subscribe();
        // Only chunks keep a half-received upload alive.
        let mut upload_idle_at = Instant::now();
        loop {
            let next = tokio::select! {
                next = inbound.message() => next,
                // A half-received upload of a closed (or other) round can never be added:
                // free its slot now rather than at this site's next message.
                Ok(()) = gate.changed(), if upload.is_some() => {
                    let open = gate.borrow_and_update().clone();
                    if upload.as_ref().is_some_and(|u| Some(&u.spec) != open.as_ref()) {
                        upload = None;
                    }
                    continue;
                }
                () = tokio::time::sleep_until(upload_idle_at), if upload.is_some() => {
                    upload = None;
                    let idle = UPLOAD_IDLE_TIMEOUT.as_secs();
                    self.reject(&format!("upload stalled: no chunk for {idle} s; its slot was freed"))
                        .await;
                    continue;
                }
            };
            let message = match next {
                Ok(Some(ClientMessage { body: Some(body) })) => body,
                Ok(Some(ClientMessage { body: None })) => {
                    self.reject("empty message (no body)").await;
                    continue;
                }
                Ok(None) => break,
                Err(status) if is_malformed(&status) => {
                    // The stream cannot be read past a message that does not decode: end the
                    // session with the reason, so the site learns what it did wrong.
                    let reason = format!("malformed message: {}", status.message());
                    self.reject(&reason).await;
                    self.registry
                        .close(&self.site, Status::invalid_argument(reason))
                        .await;
                    break;
                }
                Err(status) => {
                    tracing::info!(site = %self.site, "stream ended: {}", status.message());
                    break;
                }
            };
            match message {
                Body::UpdateChunk(chunk) => {
                    let result = self.on_chunk(&mut upload, chunk).await;
                    upload_idle_at = Instant::now() + UPLOAD_IDLE_TIMEOUT;
                    if let Err(reason) = result {
                        // A bad chunk voids the whole upload; the running sum was never touched.
                        upload = None;
                        self.reject(&reason).await;
                    }
                }
                Body::Join(_) => self.reject("Join sent twice").await,
                message => {
                    let site = self.site.clone();
                    if self
                        .events
                        .send(Event::Message { site, message })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        if self.registry.end_connection(&self.site, self.connection) {
            let _ = self
                .events
                .send(Event::Disconnected {
                    site: self.site.clone(),
                })
                .await;
        }
    }

    async fn reject(&self, reason: &str) {
        let event = Event::Rejected {
            site: self.site.clone(),
            reason: reason.to_owned(),
        };
        let _ = self.events.send(event).await;
    }

    async fn on_chunk(
        &self,
        upload: &mut Option<PartialUpload>,
        chunk: UpdateChunk,
    ) -> Result<(), String> {
        let spec = self.gate.current().ok_or_else(|| {
            format!(
                "update chunk for round {} while no upload is open",
                chunk.round
            )
        })?;
        if chunk.round != spec.round {
            return Err(format!(
                "update for round {} but round {} is open (replayed or stale)",
                chunk.round, spec.round
            ));
        }
        if !spec.sites.contains(&self.site) {
            return Err(format!(
                "update chunk for round {} from a site not uploading in it",
                chunk.round
            ));
        }
        // An empty chunk would make no progress yet keep an upload slot alive past its stall
        // timer, chunk after chunk.
        if chunk.elements == 0 {
            return Err("an update chunk must carry at least one element".into());
        }
        if upload.as_ref().is_some_and(|u| u.spec != spec) {
            *upload = None;
        }
        if upload.is_none() {
            if chunk.offset != 0 {
                return Err(format!(
                    "upload must start at offset 0, got {}",
                    chunk.offset
                ));
            }
            // Waiting here stops reading this stream, so HTTP/2 flow control holds the client
            // back until a slot frees: memory stays bounded whatever the number of clients.
            let slot = self
                .gate
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| "aggregator is shutting down".to_string())?;
            let file = tempfile::tempfile_in(&self.gate.spool_dir).map_err(|e| {
                tracing::error!(
                    "cannot store an upload in {}: {e}",
                    self.gate.spool_dir.display()
                );
                format!("the aggregator cannot store the upload ({e}); send it again later")
            })?;
            *upload = Some(PartialUpload {
                spec: spec.clone(),
                spool: std::io::BufWriter::with_capacity(1 << 20, file),
                received: 0,
                hasher: ring::digest::Context::new(&ring::digest::SHA256),
                bytes: 0,
                slot,
            });
        }
        let Some(partial) = upload.as_mut() else {
            unreachable!("set above")
        };
        if chunk.offset != partial.received {
            return Err(format!(
                "update chunk at offset {} but {} elements were received so far",
                chunk.offset, partial.received
            ));
        }
        let count = u64::from(chunk.elements);
        if partial.received + count > spec.elements {
            return Err(format!(
                "update has more than the {} elements of this round's vector",
                spec.elements
            ));
        }
        let expected_bytes = packing::packed_len(spec.bits, chunk.elements as usize);
        if chunk.packed.len() != expected_bytes {
            return Err(format!(
                "chunk of {} elements at {} bits must be {expected_bytes} bytes, got {}",
                chunk.elements,
                spec.bits,
                chunk.packed.len()
            ));
        }
        let mut values = packing::unpack(spec.bits, &chunk.packed, chunk.elements as usize)
            .map_err(|e| format!("malformed packed chunk: {e}"))?;
        // Stored little-endian; a no-op on the machines this runs on.
        values.iter_mut().for_each(|v| *v = v.to_le());
        partial
            .spool
            .write_all(bytemuck::cast_slice(&values))
            .map_err(|e| {
                tracing::error!("cannot store an upload: {e}");
                format!("the aggregator cannot store the upload ({e}); send it again later")
            })?;
        partial.hasher.update(&chunk.packed);
        partial.bytes += chunk.packed.len() as u64;
        partial.received += count;
        if chunk.last {
            let Some(done) = upload.take() else {
                unreachable!("checked above")
            };
            if done.received != spec.elements {
                return Err(format!(
                    "update has {} elements, expected {}",
                    done.received, spec.elements
                ));
            }
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(done.hasher.finish().as_ref());
            let file = done.spool.into_inner().map_err(|e| {
                tracing::error!("cannot store an upload: {e}");
                format!(
                    "the aggregator cannot store the upload ({}); send it again later",
                    e.error()
                )
            })?;
            let event = Event::Upload {
                site: self.site.clone(),
                round: spec.round,
                values: SpooledUpload {
                    file,
                    elements: done.received,
                },
                sha256,
                bytes: done.bytes,
                slot: done.slot,
            };
            self.events
                .send(event)
                .await
                .map_err(|_| "aggregator is shutting down")?;
        }
        Ok(())
    }
}
