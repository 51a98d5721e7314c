//! Bad uploads inside an open SecAgg+ round. Site "alpha" is driven by the test with the real
//! client's round machine (`quorum_round::SiteRound`: admission, DP encoding, SecAgg+, the same
//! chunking) but uploads a zero update instead of training; "beta" is the real client. In round 2 alpha sends every kind
//! of bad upload before its good one: each is refused and audited, its session stays open, the
//! upload slot is freed, and both rounds complete with both sites.
//!
//! A second test checks that sites outside the cohort cannot take the upload slots: "gamma" and
//! "delta" (hand-driven, Join only) join once round 1 is offered to alpha and beta, and while
//! uploads are open each sends the start of an upload for that round and then stays idle with
//! its session open.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use quorum_attest::{PeerVerifier, SiteIdentity};
use quorum_crypto::{digest::sha256, packing};
use quorum_policies::{Ledger, SitePolicy, site_from_str};
use quorum_proto::v1::{
    self as pb, ClientMessage, ServerMessage, client_message::Body as Out,
    server_message::Body as In,
};
use quorum_round::{
    Outcome, SiteDurable, SiteEvent, SiteHistory, SiteKeys, SiteRound, SiteTransmit, TrainedUpdate,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{
    raw::{block_on, join, session},
    support::{FEDERATION, Federation, Spec, heavy, must, records, release},
};

/// The hand-driven site.
const ME: &str = "alpha";

/// Uploads the aggregator reassembles at once (`upload_slots` in `aggregator/src/server.rs`).
const UPLOAD_SLOTS: usize = 2;

/// How long alpha waits for any one message (beta trains within the 60 s phase deadline).
const PATIENCE: Duration = Duration::from_secs(180);

/// What the aggregator refuses an update chunk from a site outside the upload with.
const NOT_UPLOADING: &str = "from a site not uploading in it";

/// A message for a panic: model chunks would fill the screen.
fn brief(message: &In) -> String {
    format!("{message:?}").chars().take(300).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `values` cut into update chunks as the client uploads them.
fn chunks(round: u32, bits: u32, values: &[u32]) -> Vec<pb::UpdateChunk> {
    quorum_proto::update_chunks(round, bits, values).collect()
}

/// What alpha did in one training round.
struct Upload {
    round: u32,
    /// Its good upload, as sent.
    chunks: Vec<pb::UpdateChunk>,
    /// Refusal reasons the aggregator must have audited for this round's bad uploads, in order.
    refusals: Vec<String>,
}

impl Upload {
    fn sha256(&self) -> [u8; 32] {
        let packed: Vec<u8> = self.chunks.iter().flat_map(|c| c.packed.to_vec()).collect();
        sha256(&packed)
    }
}

/// Alpha's session, its policy and ledger, and the real client's round machine.
struct Site {
    outbound: mpsc::Sender<ClientMessage>,
    inbound: tonic::Streaming<ServerMessage>,
    policy: SitePolicy,
    ledger: Ledger,
    keys: SiteKeys,
    /// Sites outside the cohort that start uploads in the first training round.
    bystanders: Option<Bystanders>,
}

impl Site {
    async fn join(fed: &Federation) -> Self {
        let bundle = fed.path("sites/alpha");
        let client = &release().client;
        let opened = session(&fed.address(), &bundle, |e| {
            Some(join(&bundle, client, FEDERATION, e))
        })
        .await;
        let identity = SiteIdentity::load(&bundle).expect("alpha's bundle");
        let peers = PeerVerifier::relayed(&identity.ca_path(), FEDERATION, None).expect("verifier");
        let policy = site_from_str(
            &format!(
                "[site]\nfederation = \"{FEDERATION}\"\nname = \"{ME}\"\n\
                 [policy]\nmax_epsilon = 1e9\nmin_cohort = 1\nshare_metrics = true\n\
                 [data]\npath = \"builtin:tiny\"\n"
            ),
            "alpha.toml",
        )
        .expect("alpha's policy");
        let mut site = Self {
            outbound: opened.outbound,
            inbound: opened.response.expect("alpha's Join is accepted"),
            policy,
            ledger: Ledger::open(&fed.path("alpha-ledger.json")).expect("alpha's ledger"),
            keys: SiteKeys {
                signer: Arc::new(identity),
                verifier: Arc::new(peers),
            },
            bystanders: None,
        };
        match site.receive().await {
            In::Welcome(_) => site,
            other => panic!("expected Welcome, got {}", brief(&other)),
        }
    }

    /// Has `bystanders` join once the first training round is offered, start their uploads
    /// when uploads open, and leave once they have closed.
    fn with_bystanders(mut self, bystanders: Bystanders) -> Self {
        self.bystanders = Some(bystanders);
        self
    }

    async fn send(&self, body: Out) {
        self.outbound
            .send(ClientMessage { body: Some(body) })
            .await
            .expect("alpha's session is open");
    }

    async fn receive(&mut self) -> In {
        tokio::time::timeout(PATIENCE, self.inbound.message())
            .await
            .expect("a message from the aggregator in time")
            .expect("alpha's session is open")
            .expect("the aggregator kept alpha's session")
            .body
            .expect("a message with a body")
    }

    async fn send_chunks(&self, chunks: &[pb::UpdateChunk]) {
        for chunk in chunks {
            self.send(Out::UpdateChunk(chunk.clone())).await;
        }
    }

    /// Takes part in every round until Finished, driving the client's own `SiteRound` with a
    /// zero update instead of training; returns its training rounds. With the previous round's
    /// upload at hand, every bad upload goes before the good one.
    async fn run(mut self) -> Vec<Upload> {
        let mut uploads: Vec<Upload> = Vec::new();
        loop {
            let config = match self.receive().await {
                In::RoundConfig(config) => config,
                In::Finished(_) => return uploads,
                // This driver witnesses nothing; the aggregator's head needs no answer.
                In::AuditHead(_) => continue,
                other => panic!("expected a round or Finished, got {}", brief(&other)),
            };
            // The cohort is chosen by now: bystanders that join here are outside it.
            if config.local_steps > 0
                && let Some(bystanders) = &mut self.bystanders
            {
                bystanders.join().await;
            }
            let me = config
                .cohort
                .iter()
                .position(|s| s == ME)
                .expect("alpha in the cohort");
            let dim = config.num_parameters as usize;
            // The final evaluation goes through secure aggregation too: its masked metrics are
            // uploaded as they are, without bad uploads before them.
            let training = config.local_steps > 0;
            let mut machine = SiteRound::offer(
                config,
                ME,
                &self.policy,
                &self.ledger,
                SiteHistory::default(),
                self.keys.clone(),
                rand::random(),
            );
            let replay = uploads.last().map(|u| u.chunks.clone());
            loop {
                let mut ended = false;
                // Drain in contract order until the machine asks for nothing more.
                loop {
                    let mut busy = false;
                    while let Some(durable) = machine.poll_audit() {
                        busy = true;
                        if let SiteDurable::Ledger { round, rho, dpsgd } = durable {
                            let delta = self.policy.policy.delta;
                            self.ledger
                                .record(round, rho, dpsgd, delta, SystemTime::now())
                                .expect("alpha's ledger");
                        }
                    }
                    while let Some(event) = machine.poll_event() {
                        busy = true;
                        match event {
                            // Alpha does not evaluate: any finite loss will do.
                            SiteEvent::Evaluate { .. } => machine.evaluated(5.0),
                            SiteEvent::Train => machine.trained(TrainedUpdate {
                                delta: vec![0.0; dim],
                                ..Default::default()
                            }),
                            SiteEvent::Ended(outcome) => {
                                assert!(
                                    matches!(
                                        outcome,
                                        Outcome::Completed { .. } | Outcome::Evaluated
                                    ),
                                    "{outcome:?}"
                                );
                                ended = true;
                            }
                            SiteEvent::Note(_) => {}
                        }
                    }
                    while let Some(transmit) = machine.poll_transmit() {
                        busy = true;
                        match transmit {
                            SiteTransmit::Message(body) => self.send(body).await,
                            SiteTransmit::Update(update) => {
                                let (round, bits) = (update.round(), update.bits());
                                let mut good = Vec::new();
                                let receipt = update
                                    .send_chunks(|chunk| {
                                        good.push(chunk);
                                        Ok::<_, ()>(())
                                    })
                                    .expect("collecting chunks cannot fail");
                                machine.uploaded(receipt);
                                let values = update.values();
                                if !training {
                                    self.send_chunks(&good).await;
                                    continue;
                                }
                                if let Some(bystanders) = &self.bystanders {
                                    bystanders.start_uploads(round, bits).await;
                                }
                                let refusals = match &replay {
                                    Some(replay) => {
                                        self.bad_uploads(round, bits, me as u32, &values, replay)
                                            .await
                                    }
                                    None => Vec::new(),
                                };
                                self.send_chunks(&good).await;
                                uploads.push(Upload {
                                    round,
                                    chunks: good,
                                    refusals,
                                });
                            }
                        }
                    }
                    if !busy {
                        break;
                    }
                }
                if ended {
                    break;
                }
                let message = self.receive().await;
                match &message {
                    In::Survivors(survivors) => {
                        assert_eq!(survivors.clients.len(), 2);
                        // Uploads are closed. The bystanders leave while the round still needs
                        // alpha, so the final evaluation's cohort is alpha and beta again.
                        if let Some(bystanders) = self.bystanders.take() {
                            bystanders.leave().await;
                        }
                    }
                    In::Result(result) => assert_eq!(result.survivors, ["alpha", "beta"]),
                    _ => {}
                }
                machine.handle(message);
            }
        }
    }

    /// Sends each bad upload of `good` (the masked vector) for `round`; returns the refusal
    /// reasons the aggregator must audit, in order.
    async fn bad_uploads(
        &self,
        round: u32,
        bits: u32,
        me: u32,
        good: &[u32],
        replay: &[pb::UpdateChunk],
    ) -> Vec<String> {
        let n = good.len();
        let first = chunks(round, bits, good).swap_remove(0);
        let mut refusals = Vec::new();

        // The previous round's upload again, verbatim: each chunk is a replay.
        self.send_chunks(replay).await;
        for chunk in replay {
            refusals.push(format!(
                "update for round {} but round {round} is open (replayed or stale)",
                chunk.round
            ));
        }

        // A first chunk that does not start at offset 0.
        let mut shifted = first.clone();
        shifted.offset = 1;
        self.send_chunks(&[shifted]).await;
        refusals.push("upload must start at offset 0, got 1".into());

        // An empty chunk: no progress, so it must not hold a slot or reset the stall timer.
        let mut empty = first.clone();
        empty.elements = 0;
        empty.packed = Vec::new().into();
        self.send_chunks(&[empty]).await;
        refusals.push("an update chunk must carry at least one element".into());

        // Bad uploads that get as far as taking an upload slot: a whole upload one element
        // longer than the vector, packed bytes one short of elements × bits, a whole upload one
        // element short. Each goes once per slot, so a slot it failed to free would leave none
        // for the good upload and the round would abort.
        let mut longer = good.to_vec();
        longer.push(0);
        let mut truncated = first.clone();
        let expected = truncated.packed.len();
        truncated.packed.truncate(expected - 1);
        let slot_takers = [
            (
                chunks(round, bits, &longer),
                format!("update has more than the {n} elements of this round's vector"),
            ),
            (
                vec![truncated],
                format!(
                    "chunk of {} elements at {bits} bits must be {expected} bytes, got {}",
                    first.elements,
                    expected - 1
                ),
            ),
            (
                chunks(round, bits, &good[..n - 1]),
                format!("update has {} elements, expected {n}", n - 1),
            ),
        ];
        for (upload, reason) in &slot_takers {
            for _ in 0..UPLOAD_SLOTS {
                self.send_chunks(upload).await;
                refusals.push(reason.clone());
            }
        }

        // A message of the next phase while uploads are expected.
        let early = pb::ConsistencySignature {
            round,
            client: me,
            ..Default::default()
        };
        self.send(Out::Consistency(early)).await;
        refusals.push("message in the wrong phase (expected UpdateChunk)".into());
        refusals
    }
}

/// Hand-driven sites that join, each start an upload, and leave; they never answer a round.
struct Bystanders {
    address: String,
    /// Their names and PKI bundles.
    sites: Vec<(&'static str, PathBuf)>,
    /// The aggregator's stderr, where it logs each refusal as it makes it.
    log: PathBuf,
    /// Their open sessions, once joined.
    sessions: Vec<Bystander>,
}

/// One bystander's session.
struct Bystander {
    site: &'static str,
    outbound: mpsc::Sender<ClientMessage>,
    inbound: tonic::Streaming<ServerMessage>,
}

impl Bystanders {
    fn new(fed: &Federation, log: &Path, sites: &[&'static str]) -> Self {
        Self {
            address: fed.address(),
            sites: sites
                .iter()
                .map(|&site| (site, fed.path(&format!("sites/{site}"))))
                .collect(),
            log: log.to_owned(),
            sessions: Vec::new(),
        }
    }

    /// Each joins and is welcomed.
    async fn join(&mut self) {
        let client = &release().client;
        for (site, bundle) in &self.sites {
            let opened = session(&self.address, bundle, |e| {
                Some(join(bundle, client, FEDERATION, e))
            })
            .await;
            let mut inbound = opened
                .response
                .unwrap_or_else(|s| panic!("{site}'s Join is refused: {s:?}"));
            let welcome = tokio::time::timeout(PATIENCE, inbound.message()).await;
            assert!(
                matches!(
                    welcome,
                    Ok(Ok(Some(ServerMessage {
                        body: Some(In::Welcome(_))
                    })))
                ),
                "{site}: {welcome:?}"
            );
            self.sessions.push(Bystander {
                site,
                outbound: opened.outbound,
                inbound,
            });
        }
    }

    /// Each sends the first chunk of an upload for the open `round` (a few well-formed
    /// elements, not the last chunk) and then nothing. Waits until the aggregator has refused
    /// them all, or 20 s: chunks that were not refused hold the upload slots, and alpha's
    /// upload then shows whether they were freed.
    async fn start_uploads(&self, round: u32, bits: u32) {
        let elements = [0u32; 4];
        for bystander in &self.sessions {
            let chunk = pb::UpdateChunk {
                round,
                offset: 0,
                elements: elements.len() as u32,
                packed: packing::pack(bits, &elements).into(),
                last: false,
            };
            let message = ClientMessage {
                body: Some(Out::UpdateChunk(chunk)),
            };
            bystander
                .outbound
                .send(message)
                .await
                .unwrap_or_else(|_| panic!("{}'s session is open", bystander.site));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.matches(NOT_UPLOADING).count() >= self.sessions.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the aggregator did not refuse the {} bystanders' chunks within 60 s",
            self.sessions.len()
        );
    }

    /// Each ends its half of the session and waits until the aggregator has ended the other,
    /// i.e. has dropped the site from its registry.
    async fn leave(self) {
        for Bystander {
            site,
            outbound,
            mut inbound,
        } in self.sessions
        {
            drop(outbound);
            let end = tokio::time::timeout(Duration::from_secs(20), inbound.message()).await;
            assert!(matches!(end, Ok(Ok(None))), "{site}: {end:?}");
        }
    }
}

#[test]
fn bad_uploads_in_an_open_round() {
    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta"]);
    spec.phase_timeout_secs = 60;
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let mut beta = fed.start_client("beta");
    let uploads = block_on(async { Site::join(&fed).await.run().await });
    aggregator.wait_success(Duration::from_secs(60));
    beta.wait_success(Duration::from_secs(60));
    assert!(
        !aggregator.stderr_text().contains("panicked"),
        "{}",
        aggregator.describe()
    );
    assert_eq!(uploads.len(), 2, "alpha took part in two training rounds");

    // Both rounds completed with both sites; refused uploads added no bytes.
    let state = fed.state().expect("state.json");
    let history = state["history"].as_array().expect("history");
    let training: Vec<&Value> = history
        .iter()
        .filter(|h| h["evaluation_only"] == false)
        .collect();
    assert_eq!(training.len(), 2, "{history:?}");
    for (entry, upload) in training.iter().zip(&uploads) {
        assert_eq!(entry["round"], upload.round);
        assert_eq!(entry["survivors"], json!(["alpha", "beta"]), "{entry}");
        assert_eq!(entry["dropped"], json!([]), "{entry}");
    }
    assert_eq!(training[0]["upload_bytes"], training[1]["upload_bytes"]);

    // One audited refusal per bad upload, naming it, from alpha in round 2, and nothing else.
    let all = fed.aggregator_records();
    let refusals = records(&all, "refusal", None);
    let reasons: Vec<&str> = refusals
        .iter()
        .map(|r| r["details"]["reason"].as_str().unwrap_or_default())
        .collect();
    let expected: Vec<&str> = uploads
        .iter()
        .flat_map(|u| &u.refusals)
        .map(String::as_str)
        .collect();
    assert_eq!(reasons, expected);
    for refusal in &refusals {
        assert_eq!(refusal["site"], ME, "{refusal}");
        assert_eq!(refusal["round"], uploads[1].round, "{refusal}");
    }
    // What the aggregator summed for alpha is its good upload.
    for upload in &uploads {
        let digests = records(&all, "upload_digest", Some(upload.round));
        let ours: Vec<&&Value> = digests.iter().filter(|r| r["site"] == ME).collect();
        assert_eq!(ours.len(), 1, "{digests:?}");
        assert_eq!(ours[0]["details"]["sha256"], hex(&upload.sha256()));
    }
    must(fed.aggregator_audit(&["verify"]));
}

#[test]
fn uploads_from_outside_the_cohort_take_no_slot() {
    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta", "gamma", "delta"]);
    spec.min_clients = 2;
    spec.max_clients = 2;
    spec.rounds = 1;
    spec.phase_timeout_secs = 60;
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let mut beta = fed.start_client("beta");
    // As many bystanders as upload slots: had their uploads taken slots, none would be left.
    let bystanders = Bystanders::new(&fed, &aggregator.stderr, &["gamma", "delta"]);
    assert_eq!(bystanders.sites.len(), UPLOAD_SLOTS);
    let uploads = block_on(async {
        Site::join(&fed)
            .await
            .with_bystanders(bystanders)
            .run()
            .await
    });
    aggregator.wait_success(Duration::from_secs(60));
    beta.wait_success(Duration::from_secs(60));
    assert!(
        !aggregator.stderr_text().contains("panicked"),
        "{}",
        aggregator.describe()
    );
    assert_eq!(uploads.len(), 1, "alpha took part in one training round");
    let round = uploads[0].round;

    // The round completed with its cohort; the final evaluation had alpha and beta again.
    let state = fed.state().expect("state.json");
    let history = state["history"].as_array().expect("history");
    assert_eq!(history.len(), 2, "{history:?}");
    let (training, evaluation) = (&history[0], &history[1]);
    assert_eq!(training["evaluation_only"], false, "{training}");
    assert_eq!(training["round"], round, "{training}");
    assert_eq!(
        training["survivors"],
        json!(["alpha", "beta"]),
        "{training}"
    );
    assert_eq!(training["dropped"], json!([]), "{training}");
    assert_eq!(evaluation["evaluation_only"], true, "{evaluation}");
    let evaluated: Vec<&String> = evaluation["reports"]
        .as_object()
        .expect("reports")
        .keys()
        .collect();
    assert_eq!(evaluated, ["alpha", "beta"], "{evaluation}");

    // One audited refusal per bystander, in that round, and nothing else.
    let all = fed.aggregator_records();
    let mut refusals: Vec<(&str, &Value, &str)> = records(&all, "refusal", None)
        .iter()
        .map(|r| {
            (
                r["site"].as_str().unwrap_or_default(),
                &r["round"],
                r["details"]["reason"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    refusals.sort_by_key(|&(site, ..)| site);
    let reason = format!("update chunk for round {round} {NOT_UPLOADING}");
    assert_eq!(
        refusals,
        [
            ("delta", &json!(round), reason.as_str()),
            ("gamma", &json!(round), reason.as_str()),
        ]
    );
    let digests = records(&all, "upload_digest", Some(round));
    let mut sites: Vec<&str> = digests
        .iter()
        .map(|r| r["site"].as_str().unwrap_or_default())
        .collect();
    sites.sort_unstable();
    assert_eq!(sites, ["alpha", "beta"], "{digests:?}");
    let ours = digests
        .iter()
        .find(|r| r["site"] == ME)
        .expect("alpha's digest");
    assert_eq!(ours["details"]["sha256"], hex(&uploads[0].sha256()));
    // The bystanders' chunks were judged before alpha's upload arrived: had they taken the
    // slots, alpha's upload would have found none free.
    let position = |kind: &str, site: &str| {
        all.iter()
            .position(|r| r["kind"] == kind && r["site"] == site)
            .unwrap_or_else(|| panic!("no {kind} record for {site}"))
    };
    let alpha_upload = position("upload_digest", ME);
    for site in ["gamma", "delta"] {
        assert!(
            position("refusal", site) < alpha_upload,
            "{site}'s chunk was judged after alpha's upload"
        );
    }
    must(fed.aggregator_audit(&["verify"]));
}
