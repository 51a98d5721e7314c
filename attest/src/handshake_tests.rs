//! Real TLS handshakes over loopback TCP between `server_config` and `client_config`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::AttestError;
use crate::files;
use crate::pki::{SITE_CERT_FILE, SITE_KEY_FILE};
use crate::test_support::{Federation, federation};
use crate::tls::{client_config, exporter_value, server_config};

struct Outcome {
    /// The server's exporter value, or why it refused.
    server: io::Result<[u8; 32]>,
    /// The client's own exporter value and the one the server sent back.
    client: io::Result<([u8; 32], [u8; 32])>,
}

/// One connection with a request/response round trip, so that a refusal that TLS 1.3
/// reports only after the client's handshake completes is still observed.
async fn exchange(server: Arc<ServerConfig>, client: Arc<ClientConfig>, name: &str) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let exporter = exporter_value(tls.get_ref().1).map_err(io::Error::other)?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).await?;
        tls.write_all(&exporter).await?;
        tls.shutdown().await?;
        Ok::<_, io::Error>(exporter)
    });
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let client = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
        let own = exporter_value(tls.get_ref().1).map_err(io::Error::other)?;
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        let mut theirs = [0u8; 32];
        tls.read_exact(&mut theirs).await?;
        Ok::<_, io::Error>((own, theirs))
    };
    let limit = Duration::from_secs(20);
    let client = tokio::time::timeout(limit, client)
        .await
        .expect("client hung");
    let server = tokio::time::timeout(limit, server_task)
        .await
        .expect("server hung")
        .unwrap();
    Outcome { server, client }
}

fn server(fed: &Federation) -> Arc<ServerConfig> {
    let p = &fed.pki;
    server_config(
        &p.ca.cert_path,
        &p.server.cert_path,
        &p.server.key_path,
        Some(&p.crl.path),
    )
    .unwrap()
}

fn client(fed: &Federation, bundle: &std::path::Path) -> Arc<ClientConfig> {
    client_config(
        &fed.pki.ca.cert_path,
        &bundle.join(SITE_CERT_FILE),
        &bundle.join(SITE_KEY_FILE),
        Some(&fed.pki.crl.path),
    )
    .unwrap()
}

fn rustls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e}"))
}

/// Asserts that the server refused with an error satisfying `check`, and the client failed.
fn assert_refused(outcome: Outcome, check: impl FnOnce(&rustls::Error) -> bool) {
    let err = outcome.server.expect_err("server accepted");
    let inner = rustls_error(&err);
    assert!(check(inner), "unexpected server error: {inner:?}");
    assert!(outcome.client.is_err(), "client round trip succeeded");
}

#[tokio::test]
async fn valid_site_connects_and_both_sides_share_the_exporter() {
    let fed = federation("fed", &["alpha"]);
    let outcome = exchange(server(&fed), client(&fed, fed.bundle("alpha")), "localhost").await;
    let server_exporter = outcome.server.unwrap();
    let (own, echoed) = outcome.client.unwrap();
    assert_eq!(own, server_exporter);
    assert_eq!(echoed, server_exporter);
    // A second connection has a different exporter value.
    let again = exchange(server(&fed), client(&fed, fed.bundle("alpha")), "127.0.0.1").await;
    assert_ne!(again.server.unwrap(), server_exporter);
}

#[tokio::test]
async fn site_revoked_after_server_start_is_refused() {
    let fed = federation("fed", &["alpha", "beta"]);
    let server = server(&fed);
    let beta = client(&fed, fed.bundle("beta"));
    exchange(Arc::clone(&server), Arc::clone(&beta), "localhost")
        .await
        .server
        .unwrap();
    fed.revoke("beta");
    let outcome = exchange(Arc::clone(&server), beta, "localhost").await;
    assert_refused(outcome, |e| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        )
    });
    // The reloaded CRL still accepts everyone else.
    let alpha = client(&fed, fed.bundle("alpha"));
    exchange(server, alpha, "localhost").await.server.unwrap();
}

#[tokio::test]
async fn site_of_another_ca_is_refused() {
    let fed = federation("fed", &[]);
    let other = federation("fed", &["alpha"]);
    // The intruder trusts the real CA (to get past its own server check) but holds a
    // certificate from another CA.
    let intruder = client_config(
        &fed.pki.ca.cert_path,
        &other.bundle("alpha").join(SITE_CERT_FILE),
        &other.bundle("alpha").join(SITE_KEY_FILE),
        None,
    )
    .unwrap();
    let outcome = exchange(server(&fed), intruder, "localhost").await;
    // A CA of the same federation name has the same subject, so webpki finds it as issuer and
    // the signature check fails; a differently named CA is not found at all.
    assert_refused(outcome, |e| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        )
    });
    let unrelated = federation("elsewhere", &["alpha"]);
    let intruder = client_config(
        &fed.pki.ca.cert_path,
        &unrelated.bundle("alpha").join(SITE_CERT_FILE),
        &unrelated.bundle("alpha").join(SITE_KEY_FILE),
        None,
    )
    .unwrap();
    let outcome = exchange(server(&fed), intruder, "localhost").await;
    assert_refused(outcome, |e| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        )
    });
}

#[tokio::test]
async fn site_of_another_federation_is_refused() {
    let fed = federation("fed", &[]);
    let foreign = fed.foreign_federation_bundle("alpha", "other");
    let outcome = exchange(server(&fed), client(&fed, &foreign.dir), "localhost").await;
    assert_refused(outcome, |e| match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => matches!(
            other.0.downcast_ref::<AttestError>(),
            Some(AttestError::FederationMismatch { found, .. }) if found == "other"
        ),
        _ => false,
    });
}

fn roots(fed: &Federation) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots
        .add(files::load_cert(&fed.pki.ca.cert_path).unwrap())
        .unwrap();
    roots
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let fed = federation("fed", &[]);
    let anonymous =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(&fed))
            .with_no_client_auth();
    let outcome = exchange(server(&fed), Arc::new(anonymous), "localhost").await;
    assert_refused(outcome, |e| {
        matches!(e, rustls::Error::NoCertificatesPresented)
    });
}

#[tokio::test]
async fn tls12_client_is_refused() {
    let fed = federation("fed", &["alpha"]);
    let bundle = fed.bundle("alpha");
    let tls12 =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots(&fed))
            .with_client_auth_cert(
                files::load_certs(&bundle.join(SITE_CERT_FILE)).unwrap(),
                files::load_private_key(&bundle.join(SITE_KEY_FILE)).unwrap(),
            )
            .unwrap();
    let outcome = exchange(server(&fed), Arc::new(tls12), "localhost").await;
    assert_refused(outcome, |e| matches!(e, rustls::Error::PeerIncompatible(_)));
}

#[tokio::test]
async fn client_checks_server_name_and_revocation() {
    let fed = federation("fed", &["alpha"]);
    let outcome = exchange(
        server(&fed),
        client(&fed, fed.bundle("alpha")),
        "evil.example",
    )
    .await;
    let err = outcome.client.expect_err("wrong server name accepted");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
        ),
        "{err}"
    );
    fed.revoke("localhost");
    let outcome = exchange(server(&fed), client(&fed, fed.bundle("alpha")), "localhost").await;
    let err = outcome.client.expect_err("revoked server accepted");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn stale_crl_is_refused_by_server_and_client() {
    let fed = federation("fed", &["alpha"]);
    fed.publish_stale_crl();
    let expired = |e: &rustls::Error| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(
                CertificateError::ExpiredRevocationList
                    | CertificateError::ExpiredRevocationListContext { .. }
            )
        )
    };
    // The server checks the site against the stale CRL (the site checks nothing).
    let p = &fed.pki;
    let unchecking_site = client_config(
        &p.ca.cert_path,
        &fed.bundle("alpha").join(SITE_CERT_FILE),
        &fed.bundle("alpha").join(SITE_KEY_FILE),
        None,
    )
    .unwrap();
    assert_refused(
        exchange(server(&fed), unchecking_site, "localhost").await,
        expired,
    );
    // The site checks the server against it (the server checks nothing).
    let unchecking_server = server_config(
        &p.ca.cert_path,
        &p.server.cert_path,
        &p.server.key_path,
        None,
    )
    .unwrap();
    let outcome = exchange(
        unchecking_server,
        client(&fed, fed.bundle("alpha")),
        "localhost",
    )
    .await;
    let err = outcome.client.expect_err("stale CRL accepted by the site");
    assert!(expired(rustls_error(&err)), "{err}");
}
