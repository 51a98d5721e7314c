//! Protobuf decoding of both directions' messages from arbitrary bytes (the first byte picks
//! the direction), then the conversion of their secure-aggregation bodies into
//! `quorum_crypto::secagg` types (`quorum_proto::secagg::*_from_pb`).
//!
//! Properties: nothing panics; a decoded message re-encodes to `encoded_len` bytes that decode
//! and re-encode to the same bytes (unknown fields are dropped on the first decode); a body the conversion
//! accepts converts back to the very message it came from.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use quorum_proto::secagg::{
    advertisement_from_pb, advertisement_to_pb, consistency_from_pb, consistency_to_pb,
    shares_from_pb, shares_to_pb, unmask_from_pb, unmask_to_pb,
};
use quorum_proto::v1::{
    AdvertiseKeys, ClientMessage, ServerMessage, client_message, server_message,
};

fn round_trip<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    let message = M::decode(bytes).ok()?;
    let encoded = message.encode_to_vec();
    assert_eq!(encoded.len(), message.encoded_len(), "encoded_len is wrong");
    let again = M::decode(encoded.as_slice()).expect("re-encoded message decodes");
    // Compared as bytes: a NaN double is not equal to itself.
    assert_eq!(
        again.encode_to_vec(),
        encoded,
        "re-encoding changed the message"
    );
    Some(message)
}

fn advertisement(m: &AdvertiseKeys) {
    if let Ok(adv) = advertisement_from_pb(m.clone()) {
        assert_eq!(&advertisement_to_pb(m.round, adv), m, "advertisement");
    }
}

fn client(message: ClientMessage) {
    use client_message::Body;
    match message.body {
        Some(Body::Advertise(m)) => advertisement(&m),
        Some(Body::ShareKeys(m)) => {
            let back = shares_to_pb(shares_from_pb(m.shares.clone()));
            assert_eq!(back, m.shares, "shares");
        }
        Some(Body::Consistency(m)) => {
            let back = consistency_to_pb(m.round, consistency_from_pb(m.clone()));
            assert_eq!(back, m, "consistency signature");
        }
        Some(Body::Unmask(m)) => {
            if let Ok(u) = unmask_from_pb(m.clone()) {
                assert_eq!(unmask_to_pb(m.round, u), m, "unmask shares");
            }
        }
        _ => {}
    }
}

fn server(message: ServerMessage) {
    use server_message::Body;
    match message.body {
        Some(Body::PeerKeys(m)) => m.peers.iter().for_each(advertisement),
        Some(Body::ForwardedShares(m)) => {
            let back = shares_to_pb(shares_from_pb(m.shares.clone()));
            assert_eq!(back, m.shares, "forwarded shares");
        }
        Some(Body::UnmaskRequest(m)) => {
            for sig in m.signatures {
                let back = consistency_to_pb(sig.round, consistency_from_pb(sig.clone()));
                assert_eq!(back, sig, "signature in unmask request");
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&direction, bytes)) = data.split_first() else {
        return;
    };
    if direction & 1 == 0 {
        if let Some(message) = round_trip::<ClientMessage>(bytes) {
            client(message);
        }
    } else if let Some(message) = round_trip::<ServerMessage>(bytes) {
        server(message);
    }
});
