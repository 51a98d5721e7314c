//! Conversions between protocol messages and the secure-aggregation state machines' types,
//! for the directions the aggregator needs.

use quorum_crypto::secagg::{
    Advertisement, ConsistencySignature, EncryptedShare, RevealedShare, ShareKind, UnmaskShares,
};
use quorum_proto::v1 as pb;

/// Why a protocol message could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(String);

fn key(bytes: &[u8], what: &str) -> Result<[u8; 32], Malformed> {
    bytes
        .try_into()
        .map_err(|_| Malformed(format!("{what} must be 32 bytes, got {}", bytes.len())))
}

/// Reads a client's key advertisement.
pub fn advertisement_from_pb(m: pb::AdvertiseKeys) -> Result<Advertisement, Malformed> {
    Ok(Advertisement {
        client: m.client,
        share_public_key: key(&m.share_public_key, "share public key")?,
        mask_public_key: key(&m.mask_public_key, "mask public key")?,
        signature: m.signature,
        certificate_der: m.certificate_der,
    })
}

/// Writes an advertisement for forwarding to neighbours.
pub fn advertisement_to_pb(round: u32, a: Advertisement) -> pb::AdvertiseKeys {
    pb::AdvertiseKeys {
        round,
        client: a.client,
        share_public_key: a.share_public_key.to_vec(),
        mask_public_key: a.mask_public_key.to_vec(),
        signature: a.signature,
        certificate_der: a.certificate_der,
    }
}

/// Reads encrypted shares.
pub fn shares_from_pb(shares: Vec<pb::EncryptedShare>) -> Vec<EncryptedShare> {
    shares
        .into_iter()
        .map(|s| EncryptedShare {
            sender: s.sender,
            receiver: s.receiver,
            ciphertext: s.ciphertext,
        })
        .collect()
}

/// Writes encrypted shares for forwarding.
pub fn shares_to_pb(shares: Vec<EncryptedShare>) -> Vec<pb::EncryptedShare> {
    shares
        .into_iter()
        .map(|s| pb::EncryptedShare {
            sender: s.sender,
            receiver: s.receiver,
            ciphertext: s.ciphertext,
        })
        .collect()
}

/// Reads a consistency signature.
pub fn consistency_from_pb(m: pb::ConsistencySignature) -> ConsistencySignature {
    ConsistencySignature {
        client: m.client,
        signature: m.signature,
        certificate_der: m.certificate_der,
    }
}

/// Writes a consistency signature for the unmask request.
pub fn consistency_to_pb(round: u32, s: ConsistencySignature) -> pb::ConsistencySignature {
    pb::ConsistencySignature {
        round,
        client: s.client,
        signature: s.signature,
        certificate_der: s.certificate_der,
    }
}

/// Reads a client's revealed shares.
pub fn unmask_from_pb(m: pb::UnmaskShares) -> Result<UnmaskShares, Malformed> {
    let shares = m
        .shares
        .into_iter()
        .map(|s| {
            let kind = match pb::revealed_share::Kind::try_from(s.kind) {
                Ok(pb::revealed_share::Kind::SelfMaskSeed) => ShareKind::SelfMaskSeed,
                Ok(pb::revealed_share::Kind::MaskKey) => ShareKind::MaskKey,
                Err(_) => return Err(Malformed(format!("unknown share kind {}", s.kind))),
            };
            Ok(RevealedShare {
                owner: s.owner,
                kind,
                share: s.share,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(UnmaskShares {
        client: m.client,
        shares,
    })
}
