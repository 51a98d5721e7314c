//! The client's side of mTLS: a TLS 1.3 connector for tonic that presents the site certificate,
//! checks the aggregator's name, and keeps the session's exporter value so attestation evidence
//! can be bound to this very connection.

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// An open channel to the aggregator, the TLS exporter value of its connection and the
/// certificate the aggregator presented.
pub struct Connection {
    /// The gRPC channel.
    pub channel: Channel,
    /// Keying-material exporter value of this TLS session.
    pub exporter: [u8; 32],
    /// The aggregator's certificate, which the site checks against every revocation list it
    /// adopts later.
    pub server_certificate: CertificateDer<'static>,
}

/// Why TLS refused the aggregator's certificate (a name it does not carry, another CA,
/// expired, revoked), if that is what `error` is: unlike a lost connection, retrying cannot
/// help.
pub fn certificate_refused(error: &anyhow::Error) -> Option<String> {
    // An io::Error reports its inner error's source, not the inner error: look inside.
    error.chain().find_map(|cause| {
        let inner = cause.downcast_ref::<std::io::Error>()?.get_ref()?;
        match inner.downcast_ref::<rustls::Error>()? {
            refused @ rustls::Error::InvalidCertificate(_) => Some(refused.to_string()),
            _ => None,
        }
    })
}

/// Connects to `address` (host:port), verifying that the server certificate names `server_name`.
pub async fn connect(
    address: &str,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Connection> {
    let name = ServerName::try_from(server_name.to_owned())
        .with_context(|| format!("'{server_name}' is not a valid server name"))?;
    let session = Arc::new(Mutex::new(None));
    let slot = session.clone();
    let connector = TlsConnector::from(tls);
    let address = address.to_owned();
    let target = address.clone();
    let service = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let name = name.clone();
        let slot = slot.clone();
        let address = target.clone();
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            let session = tls.get_ref().1;
            let value = quorum_attest::tls::exporter_value(session)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let certificate = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c| c.clone().into_owned())
                .ok_or_else(|| std::io::Error::other("the aggregator presented no certificate"))?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((value, certificate));
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    // The URI only names the authority for HTTP/2; TLS is done by the connector above.
    let channel = Endpoint::from_shared(format!("http://{address}"))?
        .connect_with_connector(service)
        .await
        .with_context(|| format!("cannot connect to the aggregator at {address}"))?;
    let (exporter, server_certificate) =
        session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .context("TLS session established without an exporter value")?;
    Ok(Connection {
        channel,
        exporter,
        server_certificate,
    })
}

/// Explains a failed RPC in terms a site operator can act on, and says whether it was a
/// refusal (true) rather than a transport failure worth retrying. With TLS 1.3 the server's
/// verdict on the client certificate arrives after `connect()` succeeds, so a refusal shows
/// up here, at the first RPC.
pub fn explain(status: &tonic::Status) -> (String, bool) {
    let mut detail = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    let lower = detail.to_lowercase();
    let tls_refusal = ["alert", "certificate", "handshake", "unknownca", "revoked"]
        .iter()
        .any(|w| lower.contains(w));
    if tls_refusal {
        let message = format!(
            "the aggregator refused this site's TLS connection ({detail}). Check that the bundle's \
             certificate was issued by this federation's CA, has not expired and is not revoked"
        );
        (message, true)
    } else if matches!(
        status.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    ) {
        (
            format!("the aggregator refused this site: {}", status.message()),
            true,
        )
    } else {
        (
            format!("connection to the aggregator failed: {detail}"),
            false,
        )
    }
}
