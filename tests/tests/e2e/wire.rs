//! Bad input on the wire: each is refused or dropped without taking the aggregator down.

use std::time::{Duration, Instant};

use quorum_proto::{
    MAX_MESSAGE_BYTES,
    v1::{RoundDecision, ServerMessage, UpdateChunk, client_message::Body, server_message},
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    raw::{
        StreamEnd, block_on, bytes_session, client_config, encode, join, session, trickle_session,
    },
    support::{FEDERATION, Federation, Spec, poll, release},
};

/// Not protobuf: field 1 with wire type 7, which does not exist.
const NOT_PROTOBUF: &[u8] = b"\x0f\xffnot protobuf";

/// Waits until the server closes `tcp` (end of stream or reset); returns how long it took.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(limit, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the aggregator kept an unusable connection open for {limit:?}"),
        }
    }
}

/// A genuine TLS 1.3 ClientHello, so that the aggregator waits for the rest of it.
fn client_hello(ca: &std::path::Path) -> Vec<u8> {
    let config = client_config(ca, None, &[&rustls::version::TLS13]);
    let name = ServerName::try_from("localhost").expect("server name");
    let mut tls = rustls::ClientConnection::new(config, name).expect("TLS client");
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).expect("ClientHello");
    hello
}

/// Sends `bytes` one at a time, one every `every`, until the server closes the connection or
/// `limit` has passed; returns how long that took.
async fn trickle_until_closed(
    address: &str,
    bytes: Vec<u8>,
    every: Duration,
    limit: Duration,
) -> Duration {
    let mut tcp = TcpStream::connect(address).await.expect("connect");
    let started = Instant::now();
    let mut buf = [0u8; 512];
    for byte in bytes {
        if started.elapsed() >= limit || tcp.write_all(&[byte]).await.is_err() {
            break;
        }
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(every, tcp.read(&mut buf)).await {
            break;
        }
    }
    started.elapsed()
}

/// The next message on a session, or how it ended: `Ok(None)` for a clean end of stream.
async fn next_message(
    inbound: &mut tonic::Streaming<ServerMessage>,
) -> Result<Option<ServerMessage>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(20), inbound.message())
        .await
        .expect("the aggregator neither answered nor closed the session within 20 s")
}

/// Reads the session until it fails; returns the error status it ended with (a clean end of
/// stream, which tells the site nothing, fails the test).
async fn ended_with_error(inbound: &mut tonic::Streaming<ServerMessage>) -> tonic::Status {
    loop {
        match next_message(inbound).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the session ended without an error status"),
            Err(status) => return status,
        }
    }
}

/// Asserts that the session's first message is a Welcome.
async fn welcomed(inbound: &mut tonic::Streaming<ServerMessage>) {
    let welcome = next_message(inbound).await.expect("a session stream");
    assert!(
        matches!(
            welcome,
            Some(ServerMessage {
                body: Some(server_message::Body::Welcome(_))
            })
        ),
        "{welcome:?}"
    );
}

#[test]
fn wire_bad_input() {
    // Four sites, all needed for a round, so that none starts while the test runs; a long phase
    // deadline keeps the aggregator waiting for them (three cohort timeouts end it).
    let mut spec = Spec::new(&["alpha", "beta", "gamma", "delta"]);
    spec.phase_timeout_secs = 60;
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let address = fed.address();
    let alpha = fed.path("sites/alpha");
    let beta = fed.path("sites/beta");
    let gamma = fed.path("sites/gamma");
    let delta = fed.path("sites/delta");
    let client = release().client.clone();
    let hello = client_hello(&fed.path("pki/ca/ca.pem"));

    block_on(async {
        // A TCP peer that never starts TLS is dropped at the handshake deadline (10 s).
        let mut silent = TcpStream::connect(&address).await.expect("connect");
        let silent =
            tokio::spawn(async move { closed_within(&mut silent, Duration::from_secs(30)).await });
        // A site that opens its session but never sends Join is refused after 30 s.
        let no_join = tokio::spawn({
            let (address, alpha) = (address.clone(), alpha.clone());
            async move { session(&address, &alpha, |_| None).await.response }
        });
        // A ClientHello one byte a second is dropped at the same handshake deadline.
        let slow_hello = tokio::spawn({
            let address = address.clone();
            async move {
                let (every, limit) = (Duration::from_secs(1), Duration::from_secs(40));
                trickle_until_closed(&address, hello, every, limit).await
            }
        });
        // A Join one byte a second (one HTTP/2 DATA frame each) is refused at the join deadline.
        let slow_join = tokio::spawn({
            let (address, beta, client) = (address.clone(), beta.clone(), client.clone());
            async move {
                trickle_session(&address, &beta, Duration::from_secs(1), |e| {
                    encode(join(&beta, &client, FEDERATION, e))
                })
                .await
            }
        });

        // Garbage instead of a TLS ClientHello: closed.
        let mut garbage = TcpStream::connect(&address).await.expect("connect");
        garbage
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x13\x37")
            .await
            .expect("write garbage");
        closed_within(&mut garbage, Duration::from_secs(15)).await;

        // (a) The first message is not Join.
        let decision = Body::Decision(RoundDecision {
            round: 1,
            accept: true,
            reason: String::new(),
        });
        let status = session(&address, &alpha, |_| Some(decision))
            .await
            .response
            .expect_err("a session that does not start with Join");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("first message must be Join"),
            "{status:?}"
        );

        // (b) Join for another federation.
        let status = session(&address, &alpha, |e| {
            Some(join(&alpha, &client, "not-this-federation", e))
        })
        .await
        .response
        .expect_err("a Join for another federation");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("not-this-federation"),
            "{status:?}"
        );

        // Bytes that are not protobuf instead of Join: the stream fails with tonic's decoding
        // error, and the refusal is audited.
        let status = bytes_session(&address, &gamma, |_| vec![NOT_PROTOBUF.to_vec()])
            .await
            .expect_err("a first message that is not protobuf");
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(
            status
                .message()
                .contains("failed to decode Protobuf message"),
            "{status:?}"
        );

        // The same after a valid Join: the session is welcomed, then closed with
        // InvalidArgument naming tonic's decoding error; audited.
        let mut inbound = bytes_session(&address, &gamma, |e| {
            vec![
                encode(join(&gamma, &client, FEDERATION, e)),
                NOT_PROTOBUF.to_vec(),
            ]
        })
        .await
        .expect("gamma's Join is accepted");
        welcomed(&mut inbound).await;
        let status = ended_with_error(&mut inbound).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .contains("malformed message: failed to decode Protobuf message"),
            "{status:?}"
        );

        // A message over the size limit after a valid Join: closed the same way, naming the
        // limit; audited; the site may join again.
        let oversized = session(&address, &delta, |e| {
            Some(join(&delta, &client, FEDERATION, e))
        })
        .await;
        let mut inbound = oversized.response.expect("delta's Join is accepted");
        welcomed(&mut inbound).await;
        oversized
            .outbound
            .send(quorum_proto::v1::ClientMessage {
                body: Some(Body::UpdateChunk(UpdateChunk {
                    round: 1,
                    offset: 0,
                    elements: 1,
                    packed: vec![0; MAX_MESSAGE_BYTES].into(),
                    last: true,
                })),
            })
            .await
            .expect("send an oversized update");
        let status = ended_with_error(&mut inbound).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .contains("malformed message: Error, decoded message length too large"),
            "{status:?}"
        );
        let again = session(&address, &delta, |e| {
            Some(join(&delta, &client, FEDERATION, e))
        })
        .await;
        welcomed(&mut again.response.expect("delta joins again")).await;

        // A proper Join (valid evidence from the signed release) is welcomed.
        let first = session(&address, &alpha, |e| {
            Some(join(&alpha, &client, FEDERATION, e))
        })
        .await;
        let mut inbound = first.response.expect("a valid Join is accepted");
        let welcome = inbound.message().await.expect("stream").expect("a message");
        assert!(
            matches!(welcome.body, Some(server_message::Body::Welcome(ref w)) if w.site == "alpha"),
            "{welcome:?}"
        );
        // An update while no upload is open is dropped (and audited), the session survives.
        first
            .outbound
            .send(quorum_proto::v1::ClientMessage {
                body: Some(Body::UpdateChunk(UpdateChunk {
                    round: 99,
                    offset: 0,
                    elements: 1,
                    packed: vec![0, 0, 0].into(),
                    last: true,
                })),
            })
            .await
            .expect("send a stray update");

        // (e) A second session for the same site is refused while the first is open.
        let status = session(&address, &alpha, |e| {
            Some(join(&alpha, &client, FEDERATION, e))
        })
        .await
        .response
        .expect_err("a duplicate session");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("already connected"), "{status:?}");

        // Upper bounds leave room for a loaded machine; the audited refusals below show which
        // deadline closed each connection.
        let waited = silent.await.expect("silent peer task");
        assert!(
            waited <= Duration::from_secs(25),
            "silent peer held {waited:?}"
        );
        let status = no_join
            .await
            .expect("no-Join task")
            .expect_err("a session without Join");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("no Join"), "{status:?}");
        let waited = slow_hello.await.expect("slow ClientHello task");
        assert!(
            (Duration::from_secs(9)..=Duration::from_secs(25)).contains(&waited),
            "a ClientHello trickled one byte a second was closed after {waited:?}"
        );
        let (end, waited) = slow_join.await.expect("slow Join task");
        assert_eq!(end, StreamEnd::Answered, "after {waited:?}");
        assert!(
            (Duration::from_secs(29)..=Duration::from_secs(50)).contains(&waited),
            "a Join trickled one byte a second was answered after {waited:?}"
        );

        // After all that the aggregator still serves: another site joins.
        let other = session(&address, &beta, |e| {
            Some(join(&beta, &client, FEDERATION, e))
        })
        .await;
        let mut inbound_b = other.response.expect("beta's Join is accepted");
        let welcome = inbound_b
            .message()
            .await
            .expect("stream")
            .expect("a message");
        assert!(matches!(
            welcome.body,
            Some(server_message::Body::Welcome(_))
        ));
        drop(inbound);
        drop(first.outbound);
    });
    assert!(
        aggregator.running(),
        "the aggregator died:\n{}",
        aggregator.describe()
    );
    // The aggregator announces each refusal on stderr only after its record is durable; the
    // handshake refusals are reported after the connection is closed, so wait for all of them
    // before stopping it and reading its log.
    let announced = [
        ("did not finish within", 2),
        ("no Join within", 2),
        ("while no upload is open", 1),
        ("TLS handshake failed", 1),
    ];
    poll(
        "every refusal to be audited",
        Duration::from_secs(60),
        || {
            let stderr = aggregator.stderr_text();
            announced
                .iter()
                .all(|(needle, n)| stderr.matches(needle).count() >= *n)
                .then_some(())
        },
    );
    aggregator.kill();

    assert!(
        !aggregator.stderr_text().contains("panicked"),
        "{}",
        aggregator.describe()
    );

    let reasons = fed.refusal_reasons();
    let count = |needle: &str| reasons.iter().filter(|r| r.contains(needle)).count();
    // The silent and the slow TCP peers; the session without Join and the slow Join.
    assert_eq!(count("did not finish within"), 2, "{reasons:?}");
    assert_eq!(count("no Join within"), 2, "{reasons:?}");
    // Gamma's bytes that are not protobuf, before and after its Join; delta's oversized update.
    assert_eq!(
        count("the first message could not be read: failed to decode Protobuf message"),
        1,
        "{reasons:?}"
    );
    assert_eq!(
        count("malformed message: failed to decode Protobuf message"),
        1,
        "{reasons:?}"
    );
    assert_eq!(
        count("malformed message: Error, decoded message length too large"),
        1,
        "{reasons:?}"
    );
    for expected in [
        "first message must be Join",
        "not-this-federation",
        "already connected",
        "no Join within",
        "while no upload is open",
        "TLS handshake",
        "malformed message",
        "the first message could not be read",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "no audited refusal mentioning {expected:?} in {reasons:?}"
        );
    }
}
