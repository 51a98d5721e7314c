//! Conversions between the protocol messages and the secure-aggregation state machines' types
//! in `quorum_crypto::secagg`, in both directions (the aggregator and the client each use half),
//! and the DP encoding parameters a round offer carries.

use quorum_crypto::{
    dp::DpParams,
    secagg::{
        Advertisement, ConsistencySignature, EncryptedShare, Params, RevealedShare, RoundContext,
        ShareKind, UnmaskShares,
    },
};

use crate::v1 as pb;

/// A message field that does not have the shape the protocol requires.
#[derive(Debug, thiserror::Error)]
#[error("malformed {field}: {reason}")]
pub struct Malformed {
    field: &'static str,
    reason: String,
}

fn key(bytes: &[u8], field: &'static str) -> Result<[u8; 32], Malformed> {
    bytes.try_into().map_err(|_| Malformed {
        field,
        reason: format!("must be 32 bytes, got {}", bytes.len()),
    })
}

/// The DP encoding parameters a round offer announces, checked with [`DpParams::validate`]
/// (a site must not encode with parameters it has not checked).
pub fn dp_params(config: &pb::RoundConfig) -> Result<DpParams, Malformed> {
    let malformed = |reason: String| Malformed {
        field: "dp",
        reason,
    };
    let d = config
        .dp
        .as_ref()
        .ok_or_else(|| malformed("the round offer has no DP parameters".into()))?;
    let too_large = |_| malformed("model too large for this machine".into());
    let params = DpParams {
        dim: usize::try_from(config.num_parameters).map_err(too_large)?,
        padded_dim: usize::try_from(d.padded_dim).map_err(too_large)?,
        clip_norm: d.clip_norm,
        gamma: d.gamma,
        bits: config.modulus_bits,
        noise_stddev: d.noise_stddev,
        min_clients: match d.noised_clients {
            0 => config.min_survivors,
            honest => honest,
        },
        beta: d.beta,
    };
    params.validate().map_err(|e| malformed(e.to_string()))?;
    Ok(params)
}

/// The SecAgg+ parameters a round offer announces, for a masked vector `dim` long.
pub fn secagg_params(config: &pb::RoundConfig, dim: usize) -> Params {
    Params {
        clients: config.cohort.len() as u32,
        neighbours: config.neighbours,
        threshold: config.threshold,
        min_survivors: config.min_survivors,
        bits: config.modulus_bits,
        dim,
    }
}

/// The secure-aggregation context of a round offer, its masked vector `dim` long. Its
/// `offer_digest` is SHA-256 of the offer's protobuf encoding, so every signature of the round
/// covers everything the offer fixed.
pub fn round_context(config: &pb::RoundConfig, round_seed: [u8; 32], dim: usize) -> RoundContext {
    RoundContext {
        federation: config.federation.clone(),
        round: config.round,
        round_seed,
        offer_digest: quorum_crypto::digest::sha256(&prost::Message::encode_to_vec(config)),
        params: secagg_params(config, dim),
    }
}

/// Writes a key advertisement.
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

/// Reads a key advertisement.
pub fn advertisement_from_pb(m: pb::AdvertiseKeys) -> Result<Advertisement, Malformed> {
    Ok(Advertisement {
        client: m.client,
        share_public_key: key(&m.share_public_key, "share public key")?,
        mask_public_key: key(&m.mask_public_key, "mask public key")?,
        signature: m.signature,
        certificate_der: m.certificate_der,
    })
}

/// Writes encrypted shares.
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

/// Writes a consistency signature.
pub fn consistency_to_pb(round: u32, s: ConsistencySignature) -> pb::ConsistencySignature {
    pb::ConsistencySignature {
        round,
        client: s.client,
        signature: s.signature,
        certificate_der: s.certificate_der,
    }
}

/// Reads a consistency signature.
pub fn consistency_from_pb(m: pb::ConsistencySignature) -> ConsistencySignature {
    ConsistencySignature {
        client: m.client,
        signature: m.signature,
        certificate_der: m.certificate_der,
    }
}

/// Writes revealed shares.
pub fn unmask_to_pb(round: u32, u: UnmaskShares) -> pb::UnmaskShares {
    let shares = u
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
        .collect();
    pb::UnmaskShares {
        round,
        client: u.client,
        shares,
    }
}

/// Reads revealed shares.
pub fn unmask_from_pb(m: pb::UnmaskShares) -> Result<UnmaskShares, Malformed> {
    let shares = m
        .shares
        .into_iter()
        .map(|s| {
            let kind = match pb::revealed_share::Kind::try_from(s.kind) {
                Ok(pb::revealed_share::Kind::SelfMaskSeed) => ShareKind::SelfMaskSeed,
                Ok(pb::revealed_share::Kind::MaskKey) => ShareKind::MaskKey,
                Err(_) => {
                    return Err(Malformed {
                        field: "share kind",
                        reason: format!("unknown value {}", s.kind),
                    });
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let adv = Advertisement {
            client: 3,
            share_public_key: [1; 32],
            mask_public_key: [2; 32],
            signature: vec![9; 64],
            certificate_der: vec![7; 10],
        };
        assert_eq!(
            advertisement_from_pb(advertisement_to_pb(5, adv.clone())).unwrap(),
            adv
        );
        let unmask = UnmaskShares {
            client: 1,
            shares: vec![
                RevealedShare {
                    owner: 2,
                    kind: ShareKind::MaskKey,
                    share: vec![1; 33],
                },
                RevealedShare {
                    owner: 4,
                    kind: ShareKind::SelfMaskSeed,
                    share: vec![2; 33],
                },
            ],
        };
        assert_eq!(
            unmask_from_pb(unmask_to_pb(5, unmask.clone())).unwrap(),
            unmask
        );
    }

    #[test]
    fn short_keys_and_unknown_kinds_are_malformed() {
        let mut m = advertisement_to_pb(
            1,
            Advertisement {
                client: 0,
                share_public_key: [0; 32],
                mask_public_key: [0; 32],
                signature: vec![],
                certificate_der: vec![],
            },
        );
        m.mask_public_key.pop();
        assert!(
            advertisement_from_pb(m)
                .unwrap_err()
                .to_string()
                .contains("mask public key")
        );
        let bad = pb::UnmaskShares {
            round: 1,
            client: 0,
            shares: vec![pb::RevealedShare {
                owner: 0,
                kind: 7,
                share: vec![],
            }],
        };
        assert!(unmask_from_pb(bad).is_err());
    }
}
