//! Drives the round's two state machines with arbitrary event sequences: a `Coordinator` with
//! five sites that connect, disconnect, send any decodable message or upload and let deadlines
//! pass; and a `SiteRound` fed any offer and then any sequence of aggregator messages, trained
//! and evaluated whenever it asks.
//!
//! Properties: nothing panics; the coordinator only ever addresses sites that connected and
//! opens uploads only to cohort members that are connected; a site sends nothing once its
//! round has ended, and never reveals unmask shares without having uploaded first.

#![no_main]

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use quorum_crypto::secagg::{AdoptedList, PeerAuthError, Signed, SiteVerifier};
use quorum_fuzz::TrivialSigner;
use quorum_policies::{Ledger, federation_from_str, site_from_str};
use quorum_proto::v1::{ClientMessage, RoundConfig, ServerMessage, client_message};
use quorum_round::{
    Coordinator, CoordinatorConfig, Event, Resume, SiteEvent, SiteKeys, SiteRound,
    SiteTransmit, TrainedUpdate, Transmit, Upload, model_info,
};

const SITES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];
const DIM: usize = 8;

/// Accepts any non-empty signature (signatures are the identity layer's business).
struct AnySignature;

impl SiteVerifier for AnySignature {
    fn verify_site(&self, _site: &str, signed: Signed<'_>) -> Result<(), PeerAuthError> {
        if signed.signature.is_empty() {
            Err(PeerAuthError::new("empty signature"))
        } else {
            Ok(())
        }
    }

    /// A fixed list, so offers carry one.
    fn revocation_list(&self) -> Result<Vec<u8>, PeerAuthError> {
        Ok(b"list".to_vec())
    }

    /// Every site stays a member.
    fn check_member(&self, _site: &str) -> Result<(), PeerAuthError> {
        Ok(())
    }

    /// Any non-empty list is adopted each time.
    fn adopt_revocation_list(&self, list: &[u8]) -> Result<Option<AdoptedList>, PeerAuthError> {
        if list.is_empty() {
            return Err(PeerAuthError::new("empty list"));
        }
        Ok(Some(AdoptedList {
            number: "1".into(),
            next_update: 0,
            revoked: 0,
        }))
    }
}

#[derive(Arbitrary, Debug)]
enum CoordinatorOp {
    Connect(u8),
    Disconnect(u8),
    /// A protobuf-encoded `ClientMessage` from a site.
    Message(u8, Vec<u8>),
    /// An upload of `len` elements for `round`.
    Upload { site: u8, round: u8, len: u8 },
    /// Seconds pass, then the deadline check.
    Wait(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    secure: bool,
    coordinator: Vec<CoordinatorOp>,
    /// A protobuf-encoded `RoundConfig`; sanitised fields make it admissible more often.
    offer: Vec<u8>,
    plausible_offer: bool,
    /// Protobuf-encoded `ServerMessage`s for the site.
    to_site: Vec<Vec<u8>>,
}

fn federation(secure: bool) -> CoordinatorConfig {
    let text = format!(
        "[federation]\nname = \"fuzz\"\nrounds = 2\nmin_clients = 3\nmax_clients = 5\n\
         [server]\nlisten = \"127.0.0.1:1\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\ncrl = \"d\"\n\
         [model]\ninitial_checkpoint = \"m\"\n[training]\nlocal_steps = 1\n\
         [secure_aggregation]\nenabled = {secure}\ncorrupt_fraction = 0.0\ndropout_fraction = 0.0\n\
         [privacy]\nenabled = true\n[releases]\ntrusted_keys = []\nrequire_attestation = false\n"
    );
    let policy = federation_from_str(&text, "federation.toml").expect("valid federation");
    CoordinatorConfig::from_policy(&policy)
}

fn drive_coordinator(secure: bool, ops: &[CoordinatorOp]) {
    let start = Instant::now();
    let mut now = start;
    let model = vec![0u8; DIM * 4];
    let mut coordinator = Coordinator::new(
        federation(secure),
        model_info(&model, DIM),
        Resume::default(),
        Arc::new(AnySignature),
        [7; 32],
    )
    .expect("fresh state");
    coordinator.start(now);
    let mut connected = BTreeSet::new();
    for op in ops.iter().take(64) {
        match op {
            CoordinatorOp::Connect(i) => {
                let site = SITES[*i as usize % SITES.len()];
                connected.insert(site);
                coordinator.site_connected(now, site);
            }
            CoordinatorOp::Disconnect(i) => {
                let site = SITES[*i as usize % SITES.len()];
                connected.remove(site);
                coordinator.site_disconnected(now, site);
            }
            CoordinatorOp::Message(i, bytes) => {
                let site = SITES[*i as usize % SITES.len()];
                if let Ok(ClientMessage { body: Some(body) }) = ClientMessage::decode(&bytes[..])
                    && !matches!(body, client_message::Body::Join(_))
                {
                    coordinator.handle(now, site, body);
                }
            }
            CoordinatorOp::Upload { site, round, len } => {
                let site = SITES[*site as usize % SITES.len()];
                let values = vec![1u32; *len as usize];
                let upload = Upload {
                    round: u32::from(*round),
                    values: &values,
                    sha256: [0; 32],
                    bytes: values.len() as u64,
                };
                // The service checks the shape before the coordinator sees an upload.
                if coordinator
                    .upload_window()
                    .is_some_and(|w| w.elements == values.len() as u64)
                {
                    coordinator.handle_upload(now, site, upload);
                }
            }
            CoordinatorOp::Wait(seconds) => {
                now += Duration::from_secs(u64::from(*seconds));
                coordinator.handle_timeout(now);
            }
        }
        loop {
            let mut busy = false;
            while coordinator.poll_audit().is_some() {
                busy = true;
            }
            while let Some(event) = coordinator.poll_event() {
                busy = true;
                if let Event::ApplyUpdate { round, mean } = event {
                    assert_eq!(mean.len(), DIM);
                    coordinator.model_updated(now, round, model_info(&model, DIM), "checkpoint");
                }
            }
            if let Some(window) = coordinator.upload_window() {
                for site in &window.sites {
                    assert!(SITES.contains(&site.as_str()), "upload window for {site}");
                }
            }
            while let Some(transmit) = coordinator.poll_transmit() {
                busy = true;
                let to = match &transmit {
                    Transmit::Message { to, .. } => vec![to.clone()],
                    Transmit::Model { to, .. } => to.clone(),
                };
                for site in to {
                    assert!(SITES.contains(&site.as_str()), "message to {site}");
                }
            }
            if !busy {
                break;
            }
        }
    }
}

fn drive_site(offer: &[u8], plausible: bool, messages: &[Vec<u8>]) {
    let Ok(mut config) = RoundConfig::decode(offer) else {
        return;
    };
    if plausible {
        config.federation = "fuzz".into();
        config.cohort = vec!["me".into(), "peer".into(), "other".into()];
        config.round_seed.resize(32, 0);
        config.model_bytes = config.model_bytes.min(1 << 16);
    }
    let policy = site_from_str(
        "[site]\nfederation = \"fuzz\"\nname = \"me\"\n[policy]\nmax_epsilon = 1e9\n\
         min_cohort = 1\nrequire_dp = false\nallow_plain_mode = true\n[data]\npath = \"builtin:tiny\"\n",
        "site.toml",
    )
    .expect("valid site policy");
    let ledger = Ledger::open(std::path::Path::new("/nonexistent/quorum-fuzz-ledger.json"))
        .expect("a missing ledger is empty");
    let keys = SiteKeys {
        signer: Arc::new(TrivialSigner { client: 0 }),
        verifier: Arc::new(AnySignature),
    };
    let dim = usize::try_from(config.num_parameters).unwrap_or(0).min(1 << 12);
    let history = quorum_round::SiteHistory::default();
    let mut machine = SiteRound::offer(config, "me", &policy, &ledger, history, keys, [3; 32]);
    let mut ended = false;
    let mut uploaded = false;
    let mut messages = messages.iter().take(32);
    loop {
        while machine.poll_audit().is_some() {}
        while let Some(event) = machine.poll_event() {
            match event {
                SiteEvent::Evaluate { .. } => machine.evaluated(1.0),
                SiteEvent::Train => machine.trained(TrainedUpdate {
                    delta: vec![0.01; dim],
                    ..Default::default()
                }),
                SiteEvent::Ended(_) => ended = true,
                SiteEvent::Note(_) => {}
            }
        }
        while let Some(transmit) = machine.poll_transmit() {
            if let SiteTransmit::Update(update) = &transmit {
                let receipt = update.send_chunks(|_| Ok::<_, ()>(()));
                machine.uploaded(receipt.expect("nothing to fail"));
                uploaded = true;
            }
            if let SiteTransmit::Message(client_message::Body::Unmask(_)) = transmit {
                assert!(uploaded, "unmask shares revealed before any upload");
            }
        }
        if ended {
            assert!(machine.poll_transmit().is_none());
        }
        let Some(bytes) = messages.next() else {
            return;
        };
        if let Ok(ServerMessage { body: Some(body) }) = ServerMessage::decode(&bytes[..]) {
            machine.handle(body);
        }
    }
}

fuzz_target!(|input: Input| {
    drive_coordinator(input.secure, &input.coordinator);
    drive_site(&input.offer, input.plausible_offer, &input.to_site);
});
