//! Every typed audit fact of the round machines is stored under a kind the audit log knows,
//! so a new fact cannot first fail at the audit write of a running federation.

use quorum_audit::Kind;
use quorum_round::{Attested, Offered, What};

/// One fact of every kind, so that a kind name the audit log does not know fails here
/// rather than at the first audit write of a running federation.
fn one_of_each() -> Vec<What> {
    let offered = Offered {
        cohort: Vec::new(),
        secure_aggregation: true,
        evaluation_only: false,
        neighbours: 1,
        threshold: 1,
        min_survivors: 1,
        modulus_bits: 32,
        dp_enabled: true,
        rho: 0.0,
        model_sha256: String::new(),
        round_seed: String::new(),
    };
    let not_required = Attested::NotRequired {
        attestation: "not required",
    };
    vec![
        What::Resumed {
            resumed_after_rounds: 1,
        },
        What::Joined {
            serial: String::new(),
            attestation: not_required,
        },
        What::CohortSelected(Box::new(offered)),
        What::Accepted {
            cohort: Vec::new(),
            secure_aggregation: true,
            dp_enabled: true,
            rho: 0.0,
            local_steps: 1,
        },
        What::refused("r"),
        What::PhaseCompleted {
            phase: "advertise",
            survivors: Vec::new(),
            dropouts: Vec::new(),
        },
        What::Upload {
            sha256: String::new(),
            bytes: 0,
        },
        What::AggregateDigest {
            sha256: String::new(),
            survivors: Vec::new(),
        },
        What::Checkpoint {
            path: String::new(),
            sha256: String::new(),
        },
        What::ModelDigest {
            sha256: String::new(),
            round: 1,
            direction: None,
        },
        What::FederationPrivacy {
            rho: 0.0,
            epsilon: None,
            delta: 1e-6,
            dp_enabled: false,
        },
        What::SitePrivacy {
            rho: 0.0,
            epsilon: 0.0,
            delta: 1e-6,
            record_level: None,
        },
        What::RoundAborted {
            reason: String::new(),
            attempt: None,
        },
        What::RoundCompleted {
            survivors: Vec::new(),
            dropped: Vec::new(),
            seconds: 0.0,
            upload_bytes: 0,
        },
        What::ResultReceived {
            survivors: Vec::new(),
            included: true,
            epsilon: 0.0,
        },
        What::Stopped {
            final_model_sha256: String::new(),
            rounds: None,
        },
    ]
}

#[test]
fn every_fact_kind_is_an_audit_record_kind() {
    for what in one_of_each() {
        let kind: Kind = what.kind().parse().expect("a known audit kind");
        assert_ne!(kind, Kind::SignedHead, "facts never forge signed heads");
    }
}
