//! TLS 1.3 mTLS in front of the gRPC server. The handshake is done here rather than inside tonic
//! so that each connection carries what the service needs to authenticate the peer: its verified
//! certificate and the TLS exporter value that binds attestation evidence to this very session.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use quorum_attest::{PeerIdentity, peer_identity, tls::exporter_value};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// A handshake that takes longer than this is dropped, so a peer that connects and never speaks
/// (or speaks garbage) holds nothing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; a connection beyond this is closed at once (and refused on
/// the record), so a flood of slow or garbage connections cannot exhaust tasks and memory.
pub const MAX_HANDSHAKES: usize = 256;

/// What the service learns about the peer of an authenticated connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Identity from the verified client certificate.
    pub identity: PeerIdentity,
    /// The client certificate (DER).
    pub certificate_der: Vec<u8>,
    /// Keying-material exporter value of this TLS session.
    pub exporter: [u8; 32],
    /// Remote address.
    pub remote: SocketAddr,
}

/// A TLS stream whose client certificate chained to the federation CA.
pub struct AuthenticatedStream {
    inner: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for AuthenticatedStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for AuthenticatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A refused connection, reported so that it can be logged and audited.
#[derive(Debug, Clone)]
pub struct RefusedConnection {
    /// Remote address.
    pub remote: SocketAddr,
    /// Why the handshake failed.
    pub reason: String,
}

/// Accepts TCP connections and completes TLS handshakes concurrently (one task each, with a
/// deadline, at most [`MAX_HANDSHAKES`] at once), yielding only authenticated streams.
/// Refusals go to `refusals`.
pub fn accept_authenticated(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    refusals: mpsc::UnboundedSender<RefusedConnection>,
) -> ReceiverStream<io::Result<AuthenticatedStream>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                drop(tcp);
                let reason = format!(
                    "{MAX_HANDSHAKES} TLS handshakes already in progress; connection closed"
                );
                let _ = refusals.send(RefusedConnection { remote, reason });
                continue;
            };
            let acceptor = acceptor.clone();
            let accepted = tx.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let handshake = handshake(acceptor, tcp, remote).await;
                drop(permit);
                match handshake {
                    Ok(stream) => {
                        let _ = accepted.send(Ok(stream)).await;
                    }
                    Err(reason) => {
                        tracing::warn!(%remote, "connection refused: {reason}");
                        let _ = refusals.send(RefusedConnection { remote, reason });
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// How long a refused connection is kept half-open so the alert reaches the peer.
const ALERT_LINGER: Duration = Duration::from_millis(500);

/// Closes a connection whose handshake failed so that the peer reads why (e.g. "certificate
/// revoked"): a TLS 1.3 client writes before the server has judged its certificate, and closing
/// with that data unread resets the connection, and the reset can overtake the alert. So:
/// half-close, then read and discard what the peer sends, briefly.
async fn close_after_alert(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async { while let Ok(1..) = tcp.read(&mut sink).await {} };
    let _ = tokio::time::timeout(ALERT_LINGER, drain).await;
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
) -> Result<AuthenticatedStream, String> {
    let _ = tcp.set_nodelay(true);
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp).into_fallible())
        .await
        .map_err(|_| format!("TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}"))?;
    let tls = match accepted {
        Ok(tls) => tls,
        Err((e, tcp)) => {
            close_after_alert(tcp).await;
            return Err(format!("TLS handshake failed: {e}"));
        }
    };
    let (_, conn) = tls.get_ref();
    let certificate_der = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| cert.as_ref().to_vec())
        .ok_or("no client certificate")?;
    let identity = peer_identity(&certificate_der).map_err(|e| e.to_string())?;
    let exporter = exporter_value(conn).map_err(|e| e.to_string())?;
    Ok(AuthenticatedStream {
        inner: tls,
        peer: PeerInfo {
            identity,
            certificate_der,
            exporter,
            remote,
        },
    })
}
