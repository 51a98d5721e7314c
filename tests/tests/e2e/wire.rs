//! Bad input on the wire: each is refused or dropped without taking the aggregator down.

use std::time::{Duration, Instant};

use quorum_proto::v1::{RoundDecision, UpdateChunk, client_message::Body, server_message};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    raw::{block_on, join, session},
    support::{FEDERATION, Federation, Spec, release},
};

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

#[test]
fn wire_bad_input() {
    let fed = Federation::new(Spec::new(&["alpha", "beta"]));
    let mut aggregator = fed.start_aggregator("aggregator");
    let address = fed.address();
    let alpha = fed.path("pki/sites/alpha");
    let beta = fed.path("pki/sites/beta");
    let client = release().client.clone();

    block_on(async {
        // A TCP peer that never starts TLS is dropped at the handshake deadline (10 s).
        let mut silent = TcpStream::connect(&address).await.expect("connect");
        let silent =
            tokio::spawn(async move { closed_within(&mut silent, Duration::from_secs(20)).await });
        // A site that opens its session but never sends Join is refused after 30 s.
        let no_join = tokio::spawn({
            let (address, alpha) = (address.clone(), alpha.clone());
            async move { session(&address, &alpha, |_| None).await.response }
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

        let waited = silent.await.expect("silent peer task");
        assert!(
            waited <= Duration::from_secs(15),
            "silent peer held {waited:?}"
        );
        let status = no_join
            .await
            .expect("no-Join task")
            .expect_err("a session without Join");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("no Join"), "{status:?}");

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
    aggregator.kill();

    let reasons = fed.refusal_reasons();
    for expected in [
        "first message must be Join",
        "not-this-federation",
        "already connected",
        "no Join within",
        "while no upload is open",
        "TLS handshake",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "no audited refusal mentioning {expected:?} in {reasons:?}"
        );
    }
}
