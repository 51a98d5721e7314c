//! Audit facts: what a node must write to its audit log, and flush, before it sends anything
//! else. Typed here so both machines and both drivers agree on every field; each serialises
//! (untagged) to the `details` object of its audit record.

use serde::Serialize;

/// One audit record to append: its round, the site it is about, and what happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fact {
    /// Round id, when the fact belongs to one.
    pub round: Option<u32>,
    /// Site the fact is about (the site itself, in a site's log).
    pub site: Option<String>,
    /// What happened.
    pub what: What,
}

/// Record-level privacy a site spent in one round through DP-SGD in its local training.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordLevelPrivacy {
    /// What one record is (`"sequence"`).
    pub unit: &'static str,
    /// Probability that a step sampled any one record.
    pub sampling_rate: f64,
    /// Noise standard deviation in units of `clip_norm`.
    pub noise_multiplier: f64,
    /// Largest contribution of one record's gradient (L2).
    pub clip_norm: f64,
    /// Local steps this round.
    pub steps: u64,
    /// Record-level ε spent in all after this round, at `delta`.
    pub epsilon: f64,
    /// δ of the record-level ε.
    pub delta: f64,
}

/// The fact's content. [`What::kind`] names the audit record kind it is stored as.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum What {
    /// The aggregator resumed a federation from its saved state.
    Resumed {
        /// Rounds completed before the restart.
        resumed_after_rounds: u32,
    },
    /// A site joined: its certificate serial and, where required, the release it attested.
    Joined {
        /// Certificate serial (hex).
        serial: String,
        /// The attestation verdict, or `"not required"`.
        #[serde(flatten)]
        attestation: Attested,
    },
    /// The aggregator chose a round's cohort and parameters.
    CohortSelected(Box<Offered>),
    /// A site accepted a round offer.
    Accepted {
        /// The cohort, in SecAgg+ index order.
        cohort: Vec<String>,
        /// Secure aggregation on.
        secure_aggregation: bool,
        /// DP noise on.
        dp_enabled: bool,
        /// The ρ this site computed for itself.
        rho: f64,
        /// Local steps (0: evaluation only).
        local_steps: u32,
    },
    /// Something was refused or abandoned.
    Refused {
        /// Why.
        reason: String,
        /// What was refused, where it is not the reason's subject.
        #[serde(skip_serializing_if = "Option::is_none")]
        what: Option<&'static str>,
    },
    /// The aggregator closed a SecAgg+ phase.
    PhaseCompleted {
        /// Phase name, as [`quorum_crypto::secagg::Phase::name`].
        phase: &'static str,
        /// Sites that answered.
        survivors: Vec<String>,
        /// Sites expected that did not.
        dropouts: Vec<String>,
    },
    /// An update was received (aggregator) or sent (site).
    Upload {
        /// SHA-256 of the packed bytes, hex.
        sha256: String,
        /// Payload bytes.
        bytes: u64,
    },
    /// The unmasked sum.
    AggregateDigest {
        /// SHA-256 of the sum as little-endian u32s, hex.
        sha256: String,
        /// Sites in the sum.
        survivors: Vec<String>,
    },
    /// A checkpoint of the new global model was written.
    Checkpoint {
        /// Where.
        path: String,
        /// SHA-256 of the file, hex.
        sha256: String,
    },
    /// The digest of a global model.
    ModelDigest {
        /// SHA-256, hex.
        sha256: String,
        /// Round that produced (or, with a direction, delivered) it.
        round: u32,
        /// `"received"` for a downloaded model.
        #[serde(skip_serializing_if = "Option::is_none")]
        direction: Option<&'static str>,
    },
    /// Privacy spent by a round, as the aggregator accounts the federation's guarantee.
    FederationPrivacy {
        /// zCDP ρ of the round.
        rho: f64,
        /// ε after it; `None` without DP.
        epsilon: Option<f64>,
        /// δ of the guarantee.
        delta: f64,
        /// DP on.
        dp_enabled: bool,
    },
    /// Privacy a site spent by releasing its update (written to its ledger first).
    SitePrivacy {
        /// zCDP ρ of the round, computed by the site.
        rho: f64,
        /// ε spent in all, by the site's own ledger.
        epsilon: f64,
        /// The site's δ.
        delta: f64,
        /// What the round's DP-SGD spent, for a site with `[record_dp]`.
        #[serde(skip_serializing_if = "Option::is_none")]
        record_level: Option<RecordLevelPrivacy>,
    },
    /// A site adopted a newer revocation list relayed with an offer, having checked it.
    RevocationListAdopted {
        /// Its CRL number, in decimal.
        crl_number: String,
        /// When the next list is due (Unix time); past that this one is refused as stale.
        next_update: i64,
        /// How many certificates it revokes.
        revoked: usize,
    },
    /// The aggregator aborted a round.
    RoundAborted {
        /// Why.
        reason: String,
        /// Failed attempts in a row, this one included (aggregator only).
        #[serde(skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
    /// A round completed (aggregator's view).
    RoundCompleted {
        /// Sites in the sum.
        survivors: Vec<String>,
        /// Cohort sites not in it.
        dropped: Vec<String>,
        /// Seconds the round took.
        seconds: f64,
        /// Update bytes received.
        upload_bytes: u64,
    },
    /// A round completed (a site's view of the result).
    ResultReceived {
        /// Sites in the sum, as announced.
        survivors: Vec<String>,
        /// Whether this site's update is in it.
        included: bool,
        /// The federation's ε as announced.
        epsilon: f64,
    },
    /// The federation ended.
    Stopped {
        /// SHA-256 of the final model, hex.
        final_model_sha256: String,
        /// Rounds the federation ran (a site's record of `Finished`).
        #[serde(skip_serializing_if = "Option::is_none")]
        rounds: Option<u32>,
    },
    /// Another node's signed audit head, received and checked (see [`crate::witness`]).
    Witnessed(Witnessed),
}

/// A join's attestation outcome, flattened into the `Joined` fact.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Attested {
    /// The release the site runs, verified.
    Release {
        /// Verifier that judged the evidence.
        verifier: String,
        /// Release version.
        release_version: String,
        /// Release commit.
        release_commit: String,
        /// Digest of the verified executable, hex.
        release_sha256: String,
        /// How many loaded libraries matched the release's (0 when it pins none).
        libraries_verified: usize,
    },
    /// The federation does not require attestation.
    NotRequired {
        /// Always `"not required"`.
        attestation: &'static str,
    },
}

/// Everything the aggregator offered for a round, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Offered {
    /// The cohort, in SecAgg+ index order.
    pub cohort: Vec<String>,
    /// Secure aggregation on.
    pub secure_aggregation: bool,
    /// The pass after the last round that only evaluates.
    pub evaluation_only: bool,
    /// SecAgg+ k.
    pub neighbours: u32,
    /// SecAgg+ t.
    pub threshold: u32,
    /// Fewest survivors accepted.
    pub min_survivors: u32,
    /// Bits per encoded element.
    pub modulus_bits: u32,
    /// DP on.
    pub dp_enabled: bool,
    /// zCDP ρ of the round.
    pub rho: f64,
    /// Global model the round starts from, hex.
    pub model_sha256: String,
    /// Public round randomness, hex.
    pub round_seed: String,
}

/// Another node's signed audit head, checked: the `details` of a `witness` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Witnessed {
    /// Whose head: `"aggregator"` or `"site:<name>"`.
    pub node: String,
    /// The record it vouches for.
    pub head_seq: u64,
    /// That record's hash, hex.
    pub head_hash: String,
    /// The signer's audit key, hex.
    pub public_key: String,
    /// The Ed25519 signature, hex.
    pub signature: String,
}

impl What {
    /// The audit record kind this fact is stored as (`quorum_audit::Kind` names).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Resumed { .. } => "start",
            Self::Joined { .. } => "join",
            Self::CohortSelected(_) | Self::Accepted { .. } => "cohort_selected",
            Self::Refused { .. } => "refusal",
            Self::PhaseCompleted { .. } => "phase_completed",
            Self::Upload { .. } => "upload_digest",
            Self::AggregateDigest { .. } => "aggregate_digest",
            Self::Checkpoint { .. } => "checkpoint",
            Self::ModelDigest { .. } => "model_digest",
            Self::FederationPrivacy { .. } | Self::SitePrivacy { .. } => "privacy_spent",
            Self::RoundAborted { .. } => "round_aborted",
            Self::RoundCompleted { .. } | Self::ResultReceived { .. } => "round_completed",
            Self::Stopped { .. } => "stop",
            Self::Witnessed(_) => "witness",
            Self::RevocationListAdopted { .. } => "revocation_list",
        }
    }

    /// A refusal with only a reason.
    pub fn refused(reason: impl Into<String>) -> Self {
        Self::Refused {
            reason: reason.into(),
            what: None,
        }
    }
}

impl Fact {
    /// The `details` object of the audit record.
    pub fn details(&self) -> serde_json::Value {
        serde_json::to_value(&self.what).expect("facts are plain data and always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_are_the_variant_fields_without_a_tag() {
        let fact = Fact {
            round: Some(3),
            site: Some("alpha".into()),
            what: What::Refused {
                reason: "late".into(),
                what: Some("message"),
            },
        };
        assert_eq!(
            fact.details(),
            serde_json::json!({ "reason": "late", "what": "message" })
        );
        let joined = What::Joined {
            serial: "01".into(),
            attestation: Attested::NotRequired {
                attestation: "not required",
            },
        };
        assert_eq!(
            serde_json::to_value(&joined).unwrap(),
            serde_json::json!({ "serial": "01", "attestation": "not required" })
        );
    }
}
