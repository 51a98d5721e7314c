//! Hand-built peers of the aggregator: TLS clients with or without a certificate and with
//! chosen protocol versions, and a gRPC session over such a connection (the way
//! `client/src/transport.rs` builds one) that sends whatever a test wants.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use quorum_attest::{Evidence, SignedRelease, SiteIdentity};
use quorum_proto::v1::{
    ClientMessage, ServerMessage, client_message::Body, federation_client::FederationClient,
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
use tonic::transport::{Endpoint, Uri};

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

/// Opens a gRPC channel as `bundle`'s site and starts a `Session` whose first message is made
/// by `first` from the connection's exporter value (`None`: send nothing yet).
pub async fn session(
    address: &str,
    bundle: &Path,
    first: impl FnOnce([u8; 32]) -> Option<Body>,
) -> Session {
    let identity = SiteIdentity::load(bundle).expect("site bundle");
    let config = quorum_attest::tls::client_config(
        &identity.ca_path(),
        &identity.cert_path(),
        &identity.key_path(),
        None,
    )
    .expect("client TLS config");
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
    let (outbound, rx) = mpsc::channel(16);
    if let Some(body) = first(exporter) {
        outbound
            .send(ClientMessage { body: Some(body) })
            .await
            .expect("queue the first message");
    }
    let mut client = FederationClient::new(channel);
    let response = client
        .session(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    Session { outbound, response }
}

/// A `Join` for `federation` with attestation evidence from the signed `client` binary.
pub fn join(bundle: &Path, client: &Path, federation: &str, exporter: [u8; 32]) -> Body {
    let identity = SiteIdentity::load(bundle).expect("site bundle");
    let release =
        SignedRelease::load(&SignedRelease::path_for(client)).expect("signed release manifest");
    let evidence = Evidence::collect(&identity, release, client, exporter).expect("evidence");
    Body::Join(quorum_proto::v1::Join {
        federation: federation.to_owned(),
        evidence: serde_json::to_vec(&evidence).expect("evidence JSON"),
        max_epsilon: 1e9,
        min_cohort: 2,
        require_secure_aggregation: true,
    })
}
