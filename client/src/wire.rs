//! Conversions between protocol messages and the secure-aggregation state machines' types,
//! for the directions a site needs.

use anyhow::Context as _;
use quorum_crypto::secagg::{
    Advertisement, ConsistencySignature, EncryptedShare, ShareKind, UnmaskShares,
};
use quorum_proto::v1 as pb;

/// Writes this site's key advertisement.
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

/// Reads the neighbours' advertisements forwarded by the aggregator.
pub fn advertisements_from_pb(peers: Vec<pb::AdvertiseKeys>) -> anyhow::Result<Vec<Advertisement>> {
    peers
        .into_iter()
        .map(|m| {
            Ok(Advertisement {
                client: m.client,
                share_public_key: m
                    .share_public_key
                    .as_slice()
                    .try_into()
                    .context("share key must be 32 bytes")?,
                mask_public_key: m
                    .mask_public_key
                    .as_slice()
                    .try_into()
                    .context("mask key must be 32 bytes")?,
                signature: m.signature,
                certificate_der: m.certificate_der,
            })
        })
        .collect()
}

/// Writes this site's encrypted shares.
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

/// Reads the shares forwarded to this site.
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

/// Writes this site's consistency signature.
pub fn consistency_to_pb(round: u32, s: ConsistencySignature) -> pb::ConsistencySignature {
    pb::ConsistencySignature {
        round,
        client: s.client,
        signature: s.signature,
        certificate_der: s.certificate_der,
    }
}

/// Reads the survivors' consistency signatures from an unmask request.
pub fn consistency_list_from_pb(list: Vec<pb::ConsistencySignature>) -> Vec<ConsistencySignature> {
    list.into_iter()
        .map(|m| ConsistencySignature {
            client: m.client,
            signature: m.signature,
            certificate_der: m.certificate_der,
        })
        .collect()
}

/// Writes this site's revealed shares.
pub fn unmask_to_pb(round: u32, u: UnmaskShares) -> pb::UnmaskShares {
    pb::UnmaskShares {
        round,
        client: u.client,
        shares: u
            .shares
            .into_iter()
            .map(|s| pb::RevealedShare {
                owner: s.owner,
                kind: match s.kind {
                    ShareKind::SelfMaskSeed => pb::revealed_share::Kind::SelfMaskSeed,
                    ShareKind::MaskKey => pb::revealed_share::Kind::MaskKey,
                } as i32,
                share: s.share,
            })
            .collect(),
    }
}
