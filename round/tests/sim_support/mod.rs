//! Whole federations in one process on a virtual clock: one [`Coordinator`], N [`SiteRound`]
//! machines, synchronous message delivery, scripted faults, and a hook that rewrites what the
//! coordinator sends (the hostile aggregator the sites must catch).
//!
//! Time only moves when nothing is in flight: the clock jumps to the next deadline or the next
//! site that finishes training. Sites "train" by returning a fixed update of their own, so a
//! test knows what the decoded sum must be.

#![allow(dead_code)] // Each test uses a different part of this harness.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use quorum_audit::{AuditKey, AuditLog, Kind, MemoryStore};
use quorum_crypto::secagg::{AdoptedList, PeerAuthError, Phase, Signed, Signer, SiteVerifier};
use quorum_policies::{FederationPolicy, Ledger, SitePolicy, federation_from_str, site_from_str};
use quorum_proto::v1::{
    RoundConfig, TrainingProgress, client_message::Body as FromSite, server_message::Body as ToSite,
};
use quorum_round::{
    Coordinator, CoordinatorConfig, Durable, Event, Fact, HeadWitness, Outcome, Resume,
    RoundSummary, SiteDurable, SiteEvent, SiteHistory, SiteKeys, SiteRound, SiteTransmit,
    TrainedUpdate, Transmit, Upload, UploadDigest, UploadPart, UploadReceipt, What, model_info,
    witness::head_message,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::hmac;

/// HMAC "signatures" keyed by site name: a fast stand-in for certificate keys.
pub struct SimSigner(pub String);

fn key(site: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, format!("sim key {site}").as_bytes())
}

impl Signer for SimSigner {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        hmac::sign(&key(&self.0), digest.as_ref()).as_ref().to_vec()
    }
    fn certificate_der(&self) -> Vec<u8> {
        self.0.as_bytes().to_vec()
    }
}

/// A revocation list as the simulated authority issues it: "signed" with an HMAC under the
/// authority's key, so a site can tell a forged one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimList {
    /// Its number; a site refuses one lower than the list it uses.
    pub number: u64,
    /// The sites it revokes.
    pub revoked: BTreeSet<String>,
}

impl SimList {
    /// List `number`, revoking `revoked`.
    pub fn new(number: u64, revoked: &[&str]) -> Self {
        Self {
            number,
            revoked: revoked.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `number;site,site;mac`.
    pub fn encode(&self) -> Vec<u8> {
        let names: Vec<&str> = self.revoked.iter().map(String::as_str).collect();
        let body = format!("{};{}", self.number, names.join(","));
        let mac = hmac::sign(&key("authority"), body.as_bytes());
        format!("{body};{}", hex::encode(mac.as_ref())).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?;
        let (body, mac) = text.rsplit_once(';').ok_or("no signature")?;
        let mac = hex::decode(mac).map_err(|_| "signature not hex".to_string())?;
        hmac::verify(&key("authority"), body.as_bytes(), &mac)
            .map_err(|_| "not signed by the authority".to_string())?;
        let (number, names) = body.split_once(';').ok_or("no names")?;
        Ok(Self {
            number: number.parse().map_err(|_| "bad number".to_string())?,
            revoked: names
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// Checks [`SimSigner`] signatures: the "certificate" is the site name, and a site on the list
/// in use is refused. The aggregator's verifier holds the authority's list and relays it; a
/// site's adopts what is relayed, as the real one does.
///
/// Every survivor checks every other survivor's signature over the same O(n) survivor set, so
/// the last message's digest is kept: a 1,000-site round would otherwise spend most of its time
/// hashing the same bytes.
#[derive(Default)]
pub struct SimVerifier {
    last: Mutex<(Vec<u8>, Vec<u8>)>,
    list: Mutex<Option<SimList>>,
    /// A hostile aggregator's: relays the list but does not check its own peers against it.
    ignores_revocation: AtomicBool,
}

impl SimVerifier {
    /// The authority's current list, as the aggregator holds it.
    pub fn holding(list: SimList) -> Self {
        let verifier = Self::default();
        verifier.publish(list);
        verifier
    }

    /// Replaces the list held (a new one from the authority, or an aggregator's own choice).
    pub fn publish(&self, list: SimList) {
        *self.list.lock().expect("not poisoned") = Some(list);
    }

    /// Stops checking peers against the list, while still relaying it.
    pub fn ignore_revocation(&self) {
        self.ignores_revocation.store(true, Ordering::Relaxed);
    }
}

impl SiteVerifier for SimVerifier {
    fn verify_site(&self, site: &str, signed: Signed<'_>) -> Result<(), PeerAuthError> {
        if signed.certificate_der != site.as_bytes() {
            return Err(PeerAuthError::new(format!("certificate is not {site}'s")));
        }
        self.check_member(site)?;
        let mut last = self.last.lock().expect("not poisoned");
        if last.1.is_empty() || last.0 != signed.message {
            let digest = ring::digest::digest(&ring::digest::SHA256, signed.message);
            *last = (signed.message.to_vec(), digest.as_ref().to_vec());
        }
        hmac::verify(&key(site), &last.1, signed.signature)
            .map_err(|_| PeerAuthError::new("bad signature"))
    }

    fn check_member(&self, site: &str) -> Result<(), PeerAuthError> {
        match self.list.lock().expect("not poisoned").as_ref() {
            Some(list)
                if !self.ignores_revocation.load(Ordering::Relaxed)
                    && list.revoked.contains(site) =>
            {
                Err(PeerAuthError::new(format!(
                    "certificate of {site} is revoked (list {})",
                    list.number
                )))
            }
            _ => Ok(()),
        }
    }

    fn revocation_list(&self) -> Result<Vec<u8>, PeerAuthError> {
        let list = self.list.lock().expect("not poisoned");
        Ok(list.as_ref().map(SimList::encode).unwrap_or_default())
    }

    fn adopt_revocation_list(&self, list: &[u8]) -> Result<Option<AdoptedList>, PeerAuthError> {
        let found = SimList::decode(list)
            .map_err(|e| PeerAuthError::new(format!("revocation list refused: {e}")))?;
        let mut current = self.list.lock().expect("not poisoned");
        if let Some(in_use) = current.as_ref() {
            if found.number < in_use.number {
                return Err(PeerAuthError::new(format!(
                    "revocation list refused: number {} is older than the {} in use",
                    found.number, in_use.number
                )));
            }
            if found.number == in_use.number {
                return if found == *in_use {
                    Ok(None)
                } else {
                    Err(PeerAuthError::new(format!(
                        "revocation list refused: it differs from the list in use under the same \
                         number {}",
                        found.number
                    )))
                };
            }
        }
        let adopted = AdoptedList {
            number: found.number.to_string(),
            next_update: 0,
            revoked: found.revoked.len(),
        };
        *current = Some(found);
        Ok(Some(adopted))
    }
}

/// The federation settings every simulation starts from (every site needed); tests edit the
/// text.
pub fn federation_toml(sites: usize, secure: bool, dp: bool) -> String {
    format!(
        r#"
[federation]
name = "sim"
rounds = 1
min_clients = {sites}
max_clients = {sites}
cohort_timeout_secs = 120
max_round_attempts = 3
[server]
listen = "127.0.0.1:1"
ca = "ca.pem"
cert = "server.pem"
key = "server.key"
crl = "crl.pem"
state_dir = "state"
[model]
initial_checkpoint = "initial.safetensors"
[training]
local_steps = 4
batch_size = 1
seq_len = 8
lr = 1e-3
warmup_steps = 0
total_steps = 100
[outer]
optimizer = "fedavg"
lr = 1.0
[secure_aggregation]
enabled = {secure}
modulus_bits = 32
corrupt_fraction = 0.1
dropout_fraction = 0.3
phase_timeout_secs = 30
[privacy]
enabled = {dp}
clip_norm = 10.0
noise_multiplier = 0.5
delta = 1e-6
[releases]
trusted_keys = []
allowed_versions = ["0.1.0"]
require_attestation = false
"#,
    )
}

/// The policy every simulated site runs under.
pub fn site_policy(plain_allowed: bool, require_dp: bool) -> SitePolicy {
    site_policy_with(plain_allowed, require_dp, 0.0, &[])
}

/// [`site_policy`], keeping its losses, tokens and time from the aggregator.
pub fn private_site_policy(plain_allowed: bool, require_dp: bool) -> SitePolicy {
    let mut policy = site_policy(plain_allowed, require_dp);
    policy.policy.share_metrics = false;
    policy
}

/// A site policy assuming `corrupt_fraction` and, unless `roster` is empty, pinning those
/// members (with placeholder key digests: simulated signatures are not certificate keys).
pub fn site_policy_with(
    plain_allowed: bool,
    require_dp: bool,
    corrupt_fraction: f64,
    roster: &[&str],
) -> SitePolicy {
    let pins: String = roster
        .iter()
        .map(|site| format!("{site} = \"{}\"\n", "ab".repeat(32)))
        .collect();
    let roster = if pins.is_empty() {
        String::new()
    } else {
        format!("[policy.roster]\n{pins}")
    };
    site_from_str(
        &format!(
            r#"
[site]
federation = "sim"
name = "site"
[policy]
max_epsilon = 1e9
min_cohort = 1
allow_plain_mode = {plain_allowed}
require_secure_aggregation = false
require_dp = {require_dp}
corrupt_fraction = {corrupt_fraction}
share_metrics = true
{roster}
[data]
path = "builtin:tiny"
"#
        ),
        "site.toml",
    )
    .expect("valid site policy")
}

/// Parses federation settings.
pub fn policy(toml: &str) -> FederationPolicy {
    federation_from_str(toml, "federation.toml").expect("valid federation policy")
}

/// Where a simulated site stops taking part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Disconnects instead of sending its first message of this kind.
    DisconnectBefore(Sends),
    /// Stays connected but never sends a message of this kind (or anything after it).
    StallBefore(Sends),
    /// Hangs in local training: connected, but it never finishes nor sends a heartbeat.
    HangWhileTraining,
}

/// The kinds of message a site sends, in protocol order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sends {
    /// Its decision on the offer.
    Decision,
    /// Its SecAgg+ advertisement (or plain upload) after training.
    Advertise,
    /// Its encrypted shares.
    ShareKeys,
    /// Its masked update.
    Upload,
    /// Its consistency signature.
    Consistency,
    /// Its unmask shares.
    Unmask,
}

impl Sends {
    /// Every kind.
    pub const ALL: [Self; 6] = [
        Self::Decision,
        Self::Advertise,
        Self::ShareKeys,
        Self::Upload,
        Self::Consistency,
        Self::Unmask,
    ];

    fn of(transmit: &SiteTransmit) -> Option<Self> {
        match transmit {
            SiteTransmit::Message(FromSite::Decision(_)) => Some(Self::Decision),
            SiteTransmit::Message(FromSite::Advertise(_)) => Some(Self::Advertise),
            SiteTransmit::Message(FromSite::ShareKeys(_)) => Some(Self::ShareKeys),
            SiteTransmit::Update(_) => Some(Self::Upload),
            SiteTransmit::Message(FromSite::Consistency(_)) => Some(Self::Consistency),
            SiteTransmit::Message(FromSite::Unmask(_)) => Some(Self::Unmask),
            SiteTransmit::Message(_) => None,
        }
    }

    /// The SecAgg+ phase in which the coordinator waits for this message.
    pub fn phase(self) -> Option<Phase> {
        match self {
            Self::Decision => None,
            Self::Advertise => Some(Phase::Advertise),
            Self::ShareKeys => Some(Phase::ShareKeys),
            Self::Upload => Some(Phase::MaskedInput),
            Self::Consistency => Some(Phase::Consistency),
            Self::Unmask => Some(Phase::Unmask),
        }
    }
}

/// Rewrites (or, returning `false`, drops) a message the coordinator sends to a site.
pub type Rewrite = Box<dyn FnMut(&str, &mut ToSite) -> bool>;

/// Sees every message a site sends, before the coordinator does.
pub type Observe = Box<dyn FnMut(&str, &SiteTransmit)>;

/// Rewrites a message a site sends, before the coordinator sees it.
pub type RewriteSent = Box<dyn FnMut(&str, &mut SiteTransmit)>;

/// What a site sent, on its way to the coordinator: a simulated site sends its update whole.
enum Sent {
    Message(FromSite),
    Update {
        round: u32,
        bits: u32,
        values: Vec<u32>,
    },
}

/// Replaces what a site uploads: `(site, the round's offer, the site's update, the values)`.
pub type TamperUpload = Box<dyn FnMut(&str, &RoundConfig, &[f32], &mut Vec<u32>)>;

/// One simulated site.
pub struct SimSite {
    /// Its name.
    pub name: String,
    /// Connected to the coordinator.
    pub connected: bool,
    /// Its fault, if any.
    pub fault: Option<Fault>,
    /// The round in progress.
    pub round: Option<SiteRound>,
    /// Its audit facts.
    pub audit: Vec<Fact>,
    /// The same facts in a real audit log (in memory), which signs heads.
    pub log: AuditLog,
    /// Its store.
    pub store: MemoryStore,
    /// The aggregator's heads it witnessed.
    pub witness: HeadWitness,
    /// How each round ended for it.
    pub outcomes: Vec<(u32, Outcome)>,
    /// Its privacy ledger.
    pub ledger: Ledger,
    /// The update it "trains" every round.
    pub update: Vec<f32>,
    /// What it sent, by round.
    pub sent: Vec<(u32, Sends)>,
    /// Virtual time its training takes.
    pub train_time: Duration,
    /// Its verifier, with the revocation list it adopted.
    pub verifier: Arc<SimVerifier>,
    /// The revocation list it keeps durably.
    pub stored_list: Option<Vec<u8>>,
    history: SiteHistory,
    training_done_at: Option<Instant>,
    /// The next heartbeat while it trains.
    heartbeat_at: Option<Instant>,
    reconnect_at: Option<Instant>,
    stalled: bool,
}

/// How long a disconnected site waits before it reconnects.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// A federation in one process.
pub struct Sim {
    /// The virtual clock.
    pub now: Instant,
    /// When the simulation started.
    pub start: Instant,
    /// The aggregator's state machine.
    pub coordinator: Coordinator,
    /// Sites by name.
    pub sites: BTreeMap<String, SimSite>,
    /// The aggregator's audit facts.
    pub audit: Vec<Fact>,
    /// The same facts in a real audit log (in memory), which signs heads.
    pub log: AuditLog,
    /// Its store.
    pub store: MemoryStore,
    /// Events the coordinator raised.
    pub events: Vec<Event>,
    /// State saved at every `SaveState`.
    pub saved: Option<Resume>,
    /// The global model's parameters.
    pub model: Vec<f32>,
    /// Mean updates applied, by round.
    pub applied: BTreeMap<u32, Vec<f32>>,
    /// Rewrites messages to sites.
    pub rewrite: Option<Rewrite>,
    /// Replaces sites' uploads (colluding sites).
    pub tamper_upload: Option<TamperUpload>,
    /// Uploads reach the coordinator in this many pieces, as the aggregator reads them back
    /// from storage (1: whole).
    pub upload_pieces: usize,
    /// This site's next upload stops after its first piece (its stored copy could not be read).
    pub upload_cut_short: Option<String>,
    /// Watches what sites send (an aggregator that keeps what it was sent).
    pub observe: Option<Observe>,
    /// Rewrites what sites send (a hostile site).
    pub rewrite_sent: Option<RewriteSent>,
    /// The aggregator's verifier, holding the authority's revocation list it relays.
    pub authority: Arc<SimVerifier>,
    policy: SitePolicy,
    to_sites: VecDeque<(String, ToSite)>,
    to_coordinator: VecDeque<(String, Sent)>,
    rng: ChaCha20Rng,
    _ledgers: tempfile::TempDir,
}

/// An audit log in memory with a fresh key, and its store.
fn memory_log(actor: &str) -> (AuditLog, MemoryStore) {
    let store = MemoryStore::new();
    let log = AuditLog::with_store(
        Box::new(store.clone()),
        "memory",
        actor,
        Some(AuditKey::ephemeral()),
    )
    .expect("a fresh log opens");
    (log, store)
}

/// Keeps `fact` as a node's driver does: in its list and in its audit log.
fn write(facts: &mut Vec<Fact>, log: &mut AuditLog, fact: Fact) {
    let kind: Kind = fact
        .what
        .kind()
        .parse()
        .expect("every fact kind is a record kind");
    log.append(kind, fact.round, fact.site.as_deref(), fact.details())
        .expect("audit append");
    facts.push(fact);
}

fn model_bytes(model: &[f32]) -> Vec<u8> {
    model.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Sim {
    /// `sites` connected sites named `site-0000`…, each with its own random update of `dim`
    /// values, under `federation` (from [`federation_toml`]) and `site` policy.
    pub fn new(federation: &FederationPolicy, site: SitePolicy, sites: usize, dim: usize) -> Self {
        Self::resume(
            federation,
            site,
            sites,
            dim,
            Resume::default(),
            vec![0.0; dim],
        )
    }

    /// Like [`Sim::new`], resuming from `resume` with global model `model`.
    pub fn resume(
        federation: &FederationPolicy,
        site: SitePolicy,
        sites: usize,
        dim: usize,
        resume: Resume,
        model: Vec<f32>,
    ) -> Self {
        let start = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let ledgers = tempfile::tempdir().expect("temp dir");
        let cfg = CoordinatorConfig::from_policy(federation);
        let info = model_info(&model_bytes(&model), dim);
        let authority = Arc::new(SimVerifier::holding(SimList::new(1, &[])));
        let coordinator = Coordinator::new(
            cfg,
            info,
            resume,
            Arc::clone(&authority) as Arc<dyn SiteVerifier + Send + Sync>,
            rng.random(),
        )
        .expect("valid resume state");
        let sites = (0..sites)
            .map(|i| {
                let name = format!("site-{i:04}");
                let (log, store) = memory_log(&format!("site:{name}"));
                let site = SimSite {
                    name: name.clone(),
                    connected: false,
                    fault: None,
                    round: None,
                    audit: Vec::new(),
                    log,
                    store,
                    witness: HeadWitness::default(),
                    outcomes: Vec::new(),
                    ledger: Ledger::open(&ledgers.path().join(&name)).expect("ledger"),
                    update: (0..dim).map(|_| rng.random_range(-0.5..0.5)).collect(),
                    sent: Vec::new(),
                    train_time: Duration::from_secs(5),
                    verifier: Arc::default(),
                    stored_list: None,
                    history: SiteHistory::default(),
                    training_done_at: None,
                    heartbeat_at: None,
                    reconnect_at: None,
                    stalled: false,
                };
                (name, site)
            })
            .collect();
        let (log, store) = memory_log("aggregator");
        let mut sim = Self {
            now: start,
            start,
            coordinator,
            sites,
            audit: Vec::new(),
            log,
            store,
            events: Vec::new(),
            saved: None,
            model,
            applied: BTreeMap::new(),
            rewrite: None,
            tamper_upload: None,
            upload_pieces: 1,
            upload_cut_short: None,
            observe: None,
            rewrite_sent: None,
            authority,
            policy: site,
            to_sites: VecDeque::new(),
            to_coordinator: VecDeque::new(),
            rng,
            _ledgers: ledgers,
        };
        sim.drain_coordinator();
        sim
    }

    /// Seconds of virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Connects every site, then starts the federation.
    pub fn connect_all(&mut self) {
        let names: Vec<String> = self.sites.keys().cloned().collect();
        for name in names {
            self.connect(&name);
        }
        self.start();
    }

    /// Starts the federation with the sites connected so far.
    pub fn start(&mut self) {
        self.coordinator.start(self.now);
        self.drain_coordinator();
    }

    /// Connects one site.
    pub fn connect(&mut self, name: &str) {
        let site = self.sites.get_mut(name).expect("known site");
        site.connected = true;
        site.stalled = false;
        self.coordinator.site_connected(self.now, name);
        self.drain_coordinator();
    }

    /// Gives `name` a fault; it fires once (a disconnected site reconnects
    /// [`RECONNECT_AFTER`] later, a stalled one stays stalled).
    pub fn fault(&mut self, name: &str, fault: Fault) {
        self.sites.get_mut(name).expect("known site").fault = Some(fault);
    }

    /// Runs until the federation is over or nothing more can happen; returns the virtual time
    /// that passed.
    pub fn run(&mut self) -> Duration {
        self.run_until(|_| false)
    }

    /// Runs until `stop` holds (checked after every delivery and clock step), the federation is
    /// over, or nothing more can happen; returns the virtual time that passed.
    pub fn run_until(&mut self, mut stop: impl FnMut(&Self) -> bool) -> Duration {
        let from = self.now;
        while !stop(self) {
            if self.deliver_one() {
                continue;
            }
            if self.coordinator.is_done() {
                break;
            }
            let site_work = self
                .sites
                .values()
                .flat_map(|s| [s.training_done_at, s.heartbeat_at, s.reconnect_at])
                .flatten()
                .min();
            let next = [site_work, self.coordinator.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next else { break };
            self.now = self.now.max(next);
            self.reconnect_due();
            self.send_heartbeats();
            self.finish_training();
            self.coordinator.handle_timeout(self.now);
            self.drain_coordinator();
        }
        self.now - from
    }

    /// Sites whose `when` has come.
    fn due(&self, when: impl Fn(&SimSite) -> Option<Instant>) -> Vec<String> {
        let now = self.now;
        let due = self
            .sites
            .values()
            .filter(|s| when(s).is_some_and(|t| t <= now));
        due.map(|s| s.name.clone()).collect()
    }

    fn reconnect_due(&mut self) {
        for name in self.due(|s| s.reconnect_at) {
            self.sites.get_mut(&name).expect("known site").reconnect_at = None;
            self.connect(&name);
        }
    }

    /// Round summaries the coordinator completed.
    pub fn history(&self) -> &[RoundSummary] {
        self.coordinator.history()
    }

    /// The aggregator's facts of one audit kind.
    pub fn facts(&self, kind: &str) -> Vec<&Fact> {
        self.audit
            .iter()
            .filter(|f| f.what.kind() == kind)
            .collect()
    }

    /// The mean of the named sites' updates.
    pub fn mean_update(&self, sites: &[String]) -> Vec<f32> {
        let dim = self.model.len();
        let mut mean = vec![0f32; dim];
        for name in sites {
            for (m, u) in mean.iter_mut().zip(&self.sites[name].update) {
                *m += u / sites.len() as f32;
            }
        }
        mean
    }

    /// Carries out everything the coordinator asked for so far.
    pub fn drain_coordinator(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(durable) = self.coordinator.poll_audit() {
                progressed = true;
                match durable {
                    Durable::Audit(fact) => write(&mut self.audit, &mut self.log, fact),
                    Durable::SaveState => self.saved = Some(self.coordinator.resume_state()),
                    Durable::SignedHead(round) => {
                        let signed = self.log.append_signed_head(round).expect("head signed");
                        let head = head_message(round.unwrap_or(0), &signed);
                        self.coordinator.head_signed(head);
                    }
                }
            }
            while let Some(event) = self.coordinator.poll_event() {
                progressed = true;
                if let Event::ApplyUpdate { round, mean } = &event {
                    for (p, m) in self.model.iter_mut().zip(mean) {
                        *p -= m;
                    }
                    self.applied.insert(*round, mean.clone());
                    let info = model_info(&model_bytes(&self.model), self.model.len());
                    self.coordinator
                        .model_updated(self.now, *round, info, "sim://checkpoint");
                }
                self.events.push(event);
            }
            while let Some(transmit) = self.coordinator.poll_transmit() {
                progressed = true;
                match transmit {
                    Transmit::Message { to, body } => self.to_sites.push_back((to, body)),
                    Transmit::Model { round, to } => {
                        let bytes = bytes::Bytes::from(model_bytes(&self.model));
                        for site in to {
                            for chunk in quorum_proto::model_chunks(round, bytes.clone()) {
                                self.to_sites
                                    .push_back((site.clone(), ToSite::ModelChunk(chunk)));
                            }
                        }
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// Delivers one message in flight; false when none is.
    fn deliver_one(&mut self) -> bool {
        if let Some((site, transmit)) = self.to_coordinator.pop_front() {
            match transmit {
                Sent::Message(body) => self.coordinator.handle(self.now, &site, body),
                Sent::Update {
                    round,
                    bits,
                    values,
                } => {
                    let (sha256, bytes) = quorum_proto::update_digest(bits, &values);
                    if self.upload_pieces <= 1 && self.upload_cut_short.is_none() {
                        let upload = Upload {
                            round,
                            values: &values,
                            sha256,
                            bytes,
                        };
                        self.coordinator.handle_upload(self.now, &site, upload);
                    } else {
                        let piece = values.len().div_ceil(self.upload_pieces.max(2));
                        let cut = self.upload_cut_short.as_deref() == Some(site.as_str());
                        if cut {
                            self.upload_cut_short = None;
                        }
                        for (i, chunk) in values.chunks(piece).enumerate() {
                            let last = i * piece + chunk.len() == values.len();
                            let part = UploadPart {
                                round,
                                offset: (i * piece) as u64,
                                values: chunk,
                                complete: last.then_some(UploadDigest { sha256, bytes }),
                            };
                            let accepted =
                                self.coordinator.handle_upload_part(self.now, &site, part);
                            if !accepted || cut {
                                break;
                            }
                        }
                    }
                }
            }
            self.drain_coordinator();
            return true;
        }
        let Some((name, mut body)) = self.to_sites.pop_front() else {
            return false;
        };
        if let Some(rewrite) = self.rewrite.as_mut()
            && !rewrite(&name, &mut body)
        {
            return true;
        }
        let policy = self.policy.clone();
        let seed: [u8; 32] = self.rng.random();
        let site = self.sites.get_mut(&name).expect("known site");
        if !site.connected || site.stalled {
            return true;
        }
        match body {
            ToSite::RoundConfig(config) => {
                let keys = SiteKeys {
                    signer: Arc::new(SimSigner(name.clone())),
                    verifier: Arc::clone(&site.verifier) as Arc<dyn SiteVerifier + Send + Sync>,
                };
                site.round = Some(SiteRound::offer(
                    config,
                    &name,
                    &policy,
                    &site.ledger,
                    site.history,
                    keys,
                    seed,
                ));
            }
            ToSite::AuditHead(head) => {
                // What the site's driver does: witness the aggregator's head, then sign and
                // send back its own.
                let round = Some(head.round).filter(|&r| r > 0);
                let what = match site.witness.observe("aggregator", &head) {
                    Ok(witnessed) => What::Witnessed(witnessed),
                    Err(e) => What::refused(e.to_string()),
                };
                let reply = matches!(what, What::Witnessed(_));
                let fact = Fact {
                    round,
                    site: Some(name.clone()),
                    what,
                };
                write(&mut site.audit, &mut site.log, fact);
                if reply {
                    let signed = site.log.append_signed_head(round).expect("head signed");
                    let body = FromSite::AuditHead(head_message(head.round, &signed));
                    let mut transmit = SiteTransmit::Message(body);
                    if let Some(rewrite) = self.rewrite_sent.as_mut() {
                        rewrite(&name, &mut transmit);
                    }
                    let SiteTransmit::Message(body) = transmit else {
                        unreachable!("a rewrite keeps a message a message")
                    };
                    self.to_coordinator.push_back((name, Sent::Message(body)));
                }
                return true;
            }
            ToSite::Finished(_) | ToSite::Aborted(_) if site.round.is_none() => {}
            body => match site.round.as_mut() {
                Some(round) => round.handle(body),
                None => return true,
            },
        }
        self.drain_site(&name);
        true
    }

    fn drain_site(&mut self, name: &str) {
        let now = self.now;
        let site = self.sites.get_mut(name).expect("known site");
        let Some(round) = site.round.as_mut() else {
            return;
        };
        let id = round.round();
        while let Some(durable) = round.poll_audit() {
            match durable {
                SiteDurable::Audit(fact) => write(&mut site.audit, &mut site.log, fact),
                SiteDurable::Ledger { round, rho, dpsgd } => {
                    site.ledger
                        .record(
                            round,
                            rho,
                            dpsgd,
                            self.policy.policy.delta,
                            std::time::SystemTime::UNIX_EPOCH,
                        )
                        .expect("ledger write");
                }
                SiteDurable::RevocationList(der) => site.stored_list = Some(der),
            }
        }
        while let Some(event) = round.poll_event() {
            match event {
                SiteEvent::Evaluate { .. } => round.evaluated(1.0),
                SiteEvent::Train if site.fault == Some(Fault::HangWhileTraining) => {}
                SiteEvent::Train => {
                    site.training_done_at = Some(now + site.train_time);
                    let interval = heartbeat_interval(round.config());
                    site.heartbeat_at = interval.map(|every| now + every);
                }
                SiteEvent::Ended(outcome) => site.outcomes.push((id, outcome)),
                SiteEvent::Note(_) => {}
            }
        }
        // Facts raised by the events above (evaluation) are drained before any transmit.
        while let Some(SiteDurable::Audit(fact)) = round.poll_audit() {
            write(&mut site.audit, &mut site.log, fact);
        }
        let mut disconnect = false;
        while let Some(transmit) = round.poll_transmit() {
            let kind = Sends::of(&transmit);
            match (site.fault, kind) {
                (Some(Fault::DisconnectBefore(at)), Some(k)) if k == at => {
                    site.fault = None;
                    disconnect = true;
                    break;
                }
                (Some(Fault::StallBefore(at)), Some(k)) if k == at => {
                    site.stalled = true;
                    break;
                }
                _ => {
                    if let Some(kind) = kind {
                        site.sent.push((id, kind));
                    }
                    if let Some(observe) = self.observe.as_mut() {
                        observe(name, &transmit);
                    }
                    let sent = match transmit {
                        SiteTransmit::Message(body) => Sent::Message(body),
                        SiteTransmit::Update(update) => {
                            let mut values = update.values();
                            if let Some(tamper) = self.tamper_upload.as_mut() {
                                tamper(name, round.config(), &site.update, &mut values);
                            }
                            let (sha256, bytes) =
                                quorum_proto::update_digest(update.bits(), &values);
                            round.uploaded(UploadReceipt { sha256, bytes });
                            Sent::Update {
                                round: update.round(),
                                bits: update.bits(),
                                values,
                            }
                        }
                    };
                    self.to_coordinator.push_back((name.to_owned(), sent));
                }
            }
        }
        site.history = round.history();
        if disconnect {
            site.connected = false;
            site.round = None;
            site.training_done_at = None;
            site.heartbeat_at = None;
            site.reconnect_at = Some(now + RECONNECT_AFTER);
            self.coordinator.site_disconnected(self.now, name);
            self.drain_coordinator();
        }
    }

    /// What the client's heartbeat task does beside its training thread.
    fn send_heartbeats(&mut self) {
        for name in self.due(|s| s.heartbeat_at) {
            let site = self.sites.get_mut(&name).expect("known site");
            let (Some(round), true) = (site.round.as_ref(), site.connected) else {
                site.heartbeat_at = None;
                continue;
            };
            let progress = TrainingProgress {
                round: round.round(),
                steps_done: 0,
                steps_total: round.config().local_steps,
            };
            site.heartbeat_at = heartbeat_interval(round.config()).map(|every| self.now + every);
            let body = FromSite::Progress(progress);
            self.to_coordinator.push_back((name, Sent::Message(body)));
        }
    }

    fn finish_training(&mut self) {
        for name in self.due(|s| s.training_done_at) {
            let site = self.sites.get_mut(&name).expect("known site");
            site.training_done_at = None;
            site.heartbeat_at = None;
            // Site i reports a training loss of 1 + i/2, so a test can tell means from values.
            let index: f64 = site.name[5..].parse().expect("site index");
            let update = TrainedUpdate {
                delta: site.update.clone(),
                train_loss: 1.0 + index / 2.0,
                val_loss_after: 0.9,
                tokens: 4096,
                seconds: site.train_time.as_secs_f64(),
            };
            if let Some(round) = site.round.as_mut() {
                round.trained(update);
            }
            self.drain_site(&name);
        }
    }
}

/// How often a site sends heartbeats in the round `config` offers, if at all.
fn heartbeat_interval(config: &RoundConfig) -> Option<Duration> {
    Some(Duration::from_millis(config.heartbeat_interval_ms.into())).filter(|d| !d.is_zero())
}

/// Names of sites whose fault keeps them out of a round's sum.
pub fn faulty(sim: &Sim) -> BTreeSet<String> {
    sim.sites
        .values()
        .filter(|s| s.fault.is_some())
        .map(|s| s.name.clone())
        .collect()
}
