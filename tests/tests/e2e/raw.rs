//! Hand-built peers of the aggregator: TLS clients with or without a certificate and with
//! chosen protocol versions, a gRPC session over such a connection (the way
//! `client/src/transport.rs` builds one) that sends whatever a test wants, typed or as raw
//! bytes, and a session written frame by frame in HTTP/2 for what tonic cannot send.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::BufMut;
use hyper_util::rt::TokioIo;
use prost::Message;
use quorum_attest::{Evidence, SignedRelease, SiteIdentity, sha256_file};
use quorum_proto::{
    MAX_MESSAGE_BYTES,
    v1::{ClientMessage, ServerMessage, client_message::Body, federation_client::FederationClient},
};
use rustls::{
    ClientConfig, RootCertStore, SupportedProtocolVersion,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint, Uri},
};

/// HTTP/2 client preface followed by an empty SETTINGS frame.
pub const H2_PREFACE: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Runs a future on a fresh runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(future)
}

/// A client certificate and key (PEM files).
pub struct ClientCert<'a> {
    /// Certificate.
    pub cert: &'a Path,
    /// PKCS#8 key.
    pub key: &'a Path,
}

/// A rustls client that trusts `ca`, offers `versions` and ALPN h2, and presents `cert` if given.
pub fn client_config(
    ca: &Path,
    cert: Option<ClientCert<'_>>,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(der.expect("CA PEM")).expect("add CA");
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(c) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(c.cert)
                .expect("read certificate")
                .map(|d| d.expect("certificate PEM"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(c.key).expect("read key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// What the aggregator did with a connection.
#[derive(Debug)]
pub enum Outcome {
    /// It answered the HTTP/2 preface (the connection was accepted).
    Served,
    /// The handshake, or the first read after it, failed or hit end of stream.
    Refused(String),
}

/// Connects with `config`, sends the HTTP/2 preface and reads the answer. With TLS 1.3 the
/// server's verdict on the client certificate arrives after the client considers the
/// handshake done, so the refusal shows at this first read.
pub async fn probe(address: &str, config: Arc<ClientConfig>) -> Outcome {
    let tcp = TcpStream::connect(address).await.expect("TCP connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let mut tls = match TlsConnector::from(config).connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return Outcome::Refused(format!("handshake: {e}")),
    };
    if let Err(e) = tls.write_all(H2_PREFACE).await {
        return Outcome::Refused(format!("write: {e}"));
    }
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_secs(15), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Outcome::Refused("end of stream".into()),
        Ok(Ok(_)) => Outcome::Served,
        Ok(Err(e)) => Outcome::Refused(format!("read: {e}")),
        Err(_) => Outcome::Refused("no answer within 15 s".into()),
    }
}

/// An open gRPC `Session` stream with the aggregator.
pub struct Session {
    /// Messages to the aggregator.
    pub outbound: mpsc::Sender<ClientMessage>,
    /// The aggregator's answer to opening the stream.
    pub response: Result<tonic::Streaming<ServerMessage>, tonic::Status>,
}

/// The TLS client configuration of `bundle`'s site, as the real client builds it.
fn site_tls(bundle: &Path) -> Arc<ClientConfig> {
    let identity = SiteIdentity::load(bundle).expect("site bundle");
    quorum_attest::tls::client_config(
        &identity.ca_path(),
        &identity.cert_path(),
        &identity.key_path(),
        None,
    )
    .expect("client TLS config")
}

/// Opens an mTLS gRPC channel as `bundle`'s site (the way `client/src/transport.rs` does) and
/// returns it with the connection's exporter value, which attestation evidence must carry.
pub async fn channel(address: &str, bundle: &Path) -> (Channel, [u8; 32]) {
    let config = site_tls(bundle);
    let connector = TlsConnector::from(config);
    let slot = Arc::new(Mutex::new(None));
    let exporter_slot = slot.clone();
    let target = address.to_owned();
    let service = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let slot = exporter_slot.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            let value = quorum_attest::tls::exporter_value(tls.get_ref().1)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect_with_connector(service)
        .await
        .expect("gRPC channel");
    let exporter = slot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .expect("exporter value after the handshake");
    (channel, exporter)
}

/// Opens a gRPC channel as `bundle`'s site and starts a `Session` whose first message is made
/// by `first` from the connection's exporter value (`None`: send nothing yet).
pub async fn session(
    address: &str,
    bundle: &Path,
    first: impl FnOnce([u8; 32]) -> Option<Body>,
) -> Session {
    let (channel, exporter) = channel(address, bundle).await;
    let (outbound, rx) = mpsc::channel(16);
    if let Some(body) = first(exporter) {
        outbound
            .send(ClientMessage { body: Some(body) })
            .await
            .expect("queue the first message");
    }
    // Whole model chunks, as the real client accepts them (tonic's default limit is 4 MiB).
    let mut client = FederationClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let response = client
        .session(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    Session { outbound, response }
}

/// A codec that sends each message as the bytes it is given, protobuf or not, and reads the
/// aggregator's answers as usual.
#[derive(Debug, Clone, Copy)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Vec<u8>;
    type Decode = ServerMessage;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        *self
    }

    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for BytesCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = ServerMessage;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ServerMessage>, Self::Error> {
        ServerMessage::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// Starts a `Session` as `bundle`'s site that sends `messages(exporter)` as raw gRPC messages
/// and then ends its half of the stream.
pub async fn bytes_session(
    address: &str,
    bundle: &Path,
    messages: impl FnOnce([u8; 32]) -> Vec<Vec<u8>>,
) -> Result<tonic::Streaming<ServerMessage>, tonic::Status> {
    let (channel, exporter) = channel(address, bundle).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("gRPC channel ready");
    let path = PathAndQuery::from_static("/quorum.v1.Federation/Session");
    let outbound = tokio_stream::iter(messages(exporter));
    grpc.streaming(tonic::Request::new(outbound), path, BytesCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// `message` as protobuf bytes.
pub fn encode(message: Body) -> Vec<u8> {
    ClientMessage {
        body: Some(message),
    }
    .encode_to_vec()
}

/// A `Join` for `federation` with attestation evidence from the signed `client` binary.
pub fn join(bundle: &Path, client: &Path, federation: &str, exporter: [u8; 32]) -> Body {
    let identity = SiteIdentity::load(bundle).expect("site bundle");
    let release =
        SignedRelease::load(&SignedRelease::path_for(client)).expect("signed release manifest");
    // Hashing the debug client takes seconds on a loaded machine and would stall this
    // single-threaded runtime's timers: measure each binary once.
    static DIGESTS: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());
    let digest = DIGESTS
        .lock()
        .expect("digest cache")
        .entry(client.to_owned())
        .or_insert_with(|| sha256_file(client).expect("measure the client"))
        .clone();
    let evidence =
        Evidence::sign(&identity, release, digest, Vec::new(), exporter).expect("evidence");
    Body::Join(quorum_proto::v1::Join {
        federation: federation.to_owned(),
        evidence: serde_json::to_vec(&evidence).expect("evidence JSON"),
        max_epsilon: 1e9,
        min_cohort: 2,
        require_secure_aggregation: true,
    })
}

/// HTTP/2 frame types and flags used below (RFC 9113 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// How the aggregator ended a hand-written HTTP/2 request.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// Headers that end the stream: a gRPC answer without messages, i.e. an error status.
    Answered,
    /// The stream was reset.
    Reset,
    /// The connection was closed (GOAWAY or end of stream).
    Closed,
}

/// Opens a `Session` as `bundle`'s site in HTTP/2 written by hand and sends the message that
/// `message` makes from the exporter value one byte per DATA frame, one frame every `every`
/// (tonic always sends a message whole). Returns how the aggregator ended the stream, and when.
pub async fn trickle_session(
    address: &str,
    bundle: &Path,
    every: Duration,
    message: impl FnOnce([u8; 32]) -> Vec<u8>,
) -> (StreamEnd, Duration) {
    let config = site_tls(bundle);
    let tcp = TcpStream::connect(address).await.expect("TCP connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let message = message(quorum_attest::tls::exporter_value(tls.get_ref().1).expect("exporter"));
    // gRPC framing: not compressed, big-endian length, the message.
    let mut body = vec![0];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(message);

    let (mut reader, mut writer) = tokio::io::split(tls);
    let mut opening = H2_PREFACE.to_vec();
    opening.extend(h2_frame(HEADERS, END_HEADERS, 1, &session_headers()));
    writer
        .write_all(&opening)
        .await
        .expect("send the request headers");
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for byte in body {
            tokio::time::sleep(every).await;
            if writer
                .write_all(&h2_frame(DATA, 0, 1, &[byte]))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let end = loop {
        let mut header = [0u8; 9];
        if reader.read_exact(&mut header).await.is_err() {
            break StreamEnd::Closed;
        }
        let mut payload =
            vec![0; u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize];
        if reader.read_exact(&mut payload).await.is_err() {
            break StreamEnd::Closed;
        }
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & !(1 << 31);
        match (header[3], stream) {
            (HEADERS, 1) if header[4] & END_STREAM != 0 => break StreamEnd::Answered,
            (RST_STREAM, 1) => break StreamEnd::Reset,
            (GOAWAY, _) => break StreamEnd::Closed,
            // Settings, window updates, pings: a stalled peer need not answer them.
            _ => {}
        }
    };
    trickle.abort();
    (end, started.elapsed())
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// The request headers of a `Session` call as HPACK literals (no table, no Huffman coding).
fn session_headers() -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/quorum.v1.Federation/Session"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        // Literal header field without indexing, new name.
        block.push(0);
        for text in [name, value] {
            block.push(text.len() as u8);
            block.extend(text.as_bytes());
        }
    }
    block
}
