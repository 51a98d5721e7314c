//! `federation.toml`: the operator's settings for one federation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Check, ConfigError, base_dir, parse_raw, read_file};
use crate::accountant::Delta;
use crate::config::site::SitePolicy;

/// Default server listen address: loopback only, so nothing is exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

// ---- the file: mirrors the TOML exactly ----

/// `federation.toml` as written: every key optional where the file may leave it out, unknown
/// keys refused. [`FederationFile::to_toml`] writes one (the demo, the load generator and the
/// tests generate theirs this way, so a renamed key breaks their build, not their run);
/// [`FederationPolicy::from_toml_str`] reads one and validates it. Each key, its range and its
/// default are documented in `policies/examples/federation.toml`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationFile {
    /// `[federation]`
    pub federation: FederationTable,
    /// `[server]`
    pub server: ServerTable,
    /// `[model]`
    #[serde(default)]
    pub model: ModelTable,
    /// `[training]`
    #[serde(default)]
    pub training: TrainingTable,
    /// `[outer]`
    #[serde(default)]
    pub outer: OuterTable,
    /// `[secure_aggregation]`
    #[serde(default)]
    pub secure_aggregation: SecureAggregationTable,
    /// `[privacy]`
    #[serde(default)]
    pub privacy: PrivacyTable,
    /// `[releases]`
    #[serde(default)]
    pub releases: ReleasesTable,
}

/// `[federation]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationTable {
    /// `name` (required).
    pub name: String,
    /// `rounds`.
    pub rounds: Option<i64>,
    /// `min_clients`.
    pub min_clients: Option<i64>,
    /// `max_clients`.
    pub max_clients: Option<i64>,
    /// `cohort_timeout_secs`.
    pub cohort_timeout_secs: Option<i64>,
    /// `max_round_attempts`.
    pub max_round_attempts: Option<i64>,
}

/// `[server]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTable {
    /// `listen`.
    pub listen: Option<String>,
    /// `ca` (required).
    pub ca: PathBuf,
    /// `cert` (required).
    pub cert: PathBuf,
    /// `key` (required).
    pub key: PathBuf,
    /// `crl` (required unless `require_revocation = false`).
    pub crl: Option<PathBuf>,
    /// `require_revocation`.
    pub require_revocation: Option<bool>,
    /// `state_dir`.
    pub state_dir: Option<PathBuf>,
    /// `upload_slots`.
    pub upload_slots: Option<i64>,
    /// `metrics_listen`.
    pub metrics_listen: Option<String>,
}

/// `[model]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTable {
    /// `initial_checkpoint`.
    pub initial_checkpoint: Option<PathBuf>,
}

/// `[training]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingTable {
    /// `local_steps`.
    pub local_steps: Option<i64>,
    /// `batch_size`.
    pub batch_size: Option<i64>,
    /// `seq_len`.
    pub seq_len: Option<i64>,
    /// `lr`.
    pub lr: Option<f64>,
    /// `warmup_steps`.
    pub warmup_steps: Option<i64>,
    /// `total_steps`.
    pub total_steps: Option<i64>,
    /// `reset_local_optimizer`.
    pub reset_local_optimizer: Option<bool>,
    /// `max_seconds`.
    pub max_seconds: Option<i64>,
}

/// `[outer]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OuterTable {
    /// `optimizer`: "fedavg", "fedmom", "nesterov" or "fedadam".
    pub optimizer: Option<String>,
    /// `lr`.
    pub lr: Option<f64>,
    /// `momentum` (fedmom, nesterov).
    pub momentum: Option<f64>,
    /// `beta1` (fedadam).
    pub beta1: Option<f64>,
    /// `beta2` (fedadam).
    pub beta2: Option<f64>,
    /// `eps` (fedadam).
    pub eps: Option<f64>,
}

/// `[secure_aggregation]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationTable {
    /// `enabled`.
    pub enabled: Option<bool>,
    /// `modulus_bits`.
    pub modulus_bits: Option<i64>,
    /// `corrupt_fraction`.
    pub corrupt_fraction: Option<f64>,
    /// `dropout_fraction`.
    pub dropout_fraction: Option<f64>,
    /// `phase_timeout_secs`.
    pub phase_timeout_secs: Option<i64>,
}

/// `[privacy]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyTable {
    /// `enabled`.
    pub enabled: Option<bool>,
    /// `clip_norm`.
    pub clip_norm: Option<f64>,
    /// `noise_multiplier`.
    pub noise_multiplier: Option<f64>,
    /// `delta`.
    pub delta: Option<f64>,
}

/// `[releases]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasesTable {
    /// `trusted_keys`: Ed25519 public keys, hex.
    pub trusted_keys: Option<Vec<String>>,
    /// `allowed_versions`.
    pub allowed_versions: Option<Vec<String>>,
    /// `require_attestation`.
    pub require_attestation: Option<bool>,
}

impl FederationFile {
    /// The file as TOML text; keys left `None` are left out (their defaults apply).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a federation file always serializes to TOML")
    }
}

// ---- validated ----

/// A validated `federation.toml`. Only [`FederationPolicy::load`] and
/// [`FederationPolicy::from_toml_str`] build one, so every value is in range.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct FederationPolicy {
    /// `[federation]`
    pub federation: FederationSettings,
    /// `[server]`
    pub server: ServerSettings,
    /// `[model]`
    pub model: ModelSettings,
    /// `[training]`: local training on each site.
    pub training: TrainingSettings,
    /// `[outer]`: the aggregator's optimizer over averaged pseudo-gradients.
    pub outer: OuterOptimizer,
    /// `[secure_aggregation]`
    pub secure_aggregation: SecureAggregationSettings,
    /// `[privacy]`
    pub privacy: PrivacySettings,
    /// `[releases]`
    pub releases: ReleaseSettings,
}

/// `[federation]`: identity and size.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FederationSettings {
    /// Name sites check against their `site.federation`.
    pub name: String,
    /// Number of rounds to run.
    pub rounds: u32,
    /// Cohort size the aggregator waits for before starting a round.
    pub min_clients: u32,
    /// Largest cohort of one round.
    pub max_clients: u32,
    /// How long a round waits for `min_clients` connected sites before the attempt is
    /// aborted (`cohort_timeout_secs`; default twice the phase timeout).
    pub cohort_timeout: Duration,
    /// Failed attempts at one round, in a row, after which the aggregator stops.
    pub max_round_attempts: u32,
}

/// `[server]`: where the aggregator listens and what it proves itself with.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerSettings {
    /// Socket address to listen on.
    pub listen: SocketAddr,
    /// Federation CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// Signed certificate revocation list; `None` only where the operator opted out in writing
    /// (`require_revocation = false`).
    pub crl: Option<PathBuf>,
    /// Directory for checkpoints, the audit log and round state.
    pub state_dir: PathBuf,
    /// Uploads received at the same time (each stored on disk as it arrives, 4 bytes per
    /// element, with about one chunk of it in memory).
    pub upload_slots: usize,
    /// Loopback address of the Prometheus `/metrics` and `/healthz` endpoint, if any.
    pub metrics_listen: Option<SocketAddr>,
}

/// `[model]`
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModelSettings {
    /// Checkpoint (safetensors) the federation starts from; `None` leaves the choice to the
    /// aggregator (a fresh initialisation).
    pub initial_checkpoint: Option<PathBuf>,
}

/// `[training]`: local training settings sent to every site with each round.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TrainingSettings {
    /// Optimizer steps each site takes per round.
    pub local_steps: u32,
    /// Sequences per local step.
    pub batch_size: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// Peak learning rate of the local optimizer.
    pub lr: f64,
    /// Linear warm-up length, in global steps.
    pub warmup_steps: u64,
    /// Length of the learning-rate schedule, in global steps.
    pub total_steps: u64,
    /// Whether each site resets its local optimizer state at the start of every round.
    pub reset_local_optimizer: bool,
    /// The longest a site may take from the model's download to its first message after
    /// training. While it trains it sends heartbeats; one silent for a whole phase deadline is
    /// dropped sooner, one that is slow but alive is not.
    pub max_duration: Duration,
}

/// `[outer]`: the optimizer the aggregator applies to the averaged pseudo-gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
// Exhaustive on purpose: every match on it must handle a new optimizer.
pub enum OuterOptimizer {
    /// Plain averaging, scaled by `lr`.
    FedAvg {
        /// Outer learning rate.
        lr: f64,
    },
    /// Heavy-ball momentum on the pseudo-gradient.
    FedMom {
        /// Outer learning rate.
        lr: f64,
        /// Momentum coefficient in [0, 1).
        momentum: f64,
    },
    /// Nesterov momentum (the seed work's choice).
    Nesterov {
        /// Outer learning rate.
        lr: f64,
        /// Momentum coefficient in [0, 1).
        momentum: f64,
    },
    /// Adam on the pseudo-gradient (Reddi et al. 2021).
    FedAdam {
        /// Outer learning rate.
        lr: f64,
        /// First-moment decay in [0, 1).
        beta1: f64,
        /// Second-moment decay in [0, 1).
        beta2: f64,
        /// Adaptivity floor, > 0.
        eps: f64,
    },
}

impl OuterOptimizer {
    /// The outer learning rate, whatever the optimizer.
    pub fn lr(&self) -> f64 {
        match *self {
            Self::FedAvg { lr }
            | Self::FedMom { lr, .. }
            | Self::Nesterov { lr, .. }
            | Self::FedAdam { lr, .. } => lr,
        }
    }
}

/// `[secure_aggregation]`
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SecureAggregationSettings {
    /// Whether updates are masked (SecAgg+). Off only if every site also allows plain mode.
    pub enabled: bool,
    /// Element width b of the masked vectors, in 8..=32.
    pub modulus_bits: u32,
    /// Fraction of a cohort assumed to collude with the aggregator, in [0, 1).
    pub corrupt_fraction: f64,
    /// How many sites of a cohort may drop out within a round.
    pub dropouts: Dropouts,
    /// Deadline of each protocol phase.
    pub phase_timeout: Duration,
}

/// How many sites of a cohort may drop out within a round and leave it able to unmask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dropouts {
    /// `dropout_fraction` as written, in [0, 1): a cohort too small to tolerate it (with the
    /// corrupt fraction) is not offered a round.
    Stated(f64),
    /// Not written: up to this fraction (10 %), fewer, down to none, where a small cohort
    /// cannot tolerate more. With 3 or 4 sites and one assumed colluder no dropout can be
    /// tolerated: a site's masks need every neighbour's share, so a site lost mid-round
    /// aborts it (and the round is retried).
    UpTo(f64),
}

impl Dropouts {
    /// The fraction stated or aimed for.
    pub fn fraction(self) -> f64 {
        match self {
            Self::Stated(f) | Self::UpTo(f) => f,
        }
    }
}

/// The dropout fraction aimed for where `dropout_fraction` is not written.
const DEFAULT_DROPOUT_FRACTION: f64 = 0.1;

/// `[privacy]`: distributed discrete Gaussian noise on the sum of clipped updates.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PrivacySettings {
    /// Whether updates are noised. Off only if every site's policy allows it.
    pub enabled: bool,
    /// L2 norm each site's update is clipped to.
    pub clip_norm: f64,
    /// Noise standard deviation of the summed update, in units of `clip_norm`.
    pub noise_multiplier: f64,
    /// δ at which the aggregator publishes ε.
    pub delta: Delta,
}

impl PrivacySettings {
    /// Standard deviation σ of the noise in the summed update: `noise_multiplier × clip_norm`.
    pub fn noise_stddev(&self) -> f64 {
        self.noise_multiplier * self.clip_norm
    }
}

/// `[releases]`: which client binaries may join.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReleaseSettings {
    /// Ed25519 public keys whose release signatures are trusted.
    pub trusted_keys: Vec<[u8; 32]>,
    /// Client versions allowed to join; empty allows any version signed by a trusted key.
    pub allowed_versions: Vec<String>,
    /// Whether a client must present attestation evidence at join.
    pub require_attestation: bool,
}

impl FederationPolicy {
    /// Reads and validates `federation.toml` at `path`. Relative paths in the file are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_file(path)?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `file` names it in errors and is the base of relative
    /// paths (its parent directory; a bare file name leaves them relative).
    pub fn from_toml_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let raw: FederationFile = parse_raw(file, text)?;
        validate(raw, &Check { file }, &base_dir(file))
    }

    /// Checks, on the aggregator, that a joining site's announced limits let it take part:
    /// plain mode runs only if the federation turns secure aggregation off *and* the site
    /// allows it; likewise for rounds without differential privacy.
    pub fn check_site(&self, site: &SiteLimits) -> Result<(), SiteIncompatible> {
        if !self.secure_aggregation.enabled && site.require_secure_aggregation {
            return Err(SiteIncompatible::SecureAggregationRequired);
        }
        if !self.privacy.enabled && site.require_dp {
            return Err(SiteIncompatible::DpRequired);
        }
        if site.min_cohort > self.federation.max_clients {
            return Err(SiteIncompatible::CohortUnreachable {
                min_cohort: site.min_cohort,
                max_clients: self.federation.max_clients,
            });
        }
        Ok(())
    }
}

/// The limits a site announces when it joins, taken from its `site.toml`.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteLimits {
    /// The site's `policy.max_epsilon`.
    pub max_epsilon: f64,
    /// The site's `policy.min_cohort`.
    pub min_cohort: u32,
    /// False only when the site's policy allows plain mode (both
    /// `require_secure_aggregation = false` and `allow_plain_mode = true`).
    pub require_secure_aggregation: bool,
    /// The site's `policy.require_dp`.
    pub require_dp: bool,
}

impl From<&SitePolicy> for SiteLimits {
    fn from(site: &SitePolicy) -> Self {
        Self {
            max_epsilon: site.policy.max_epsilon,
            min_cohort: site.policy.min_cohort,
            require_secure_aggregation: !site.policy.plain_mode_allowed(),
            require_dp: site.policy.require_dp,
        }
    }
}

/// Why a federation cannot run rounds with a site.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SiteIncompatible {
    /// The federation runs without secure aggregation and the site does not allow plain mode.
    #[error(
        "the federation runs without secure aggregation but the site requires it; \
         enable secure_aggregation or leave the site out"
    )]
    SecureAggregationRequired,
    /// The federation runs without differential privacy and the site requires it.
    #[error(
        "the federation runs without differential privacy but the site requires it; \
         enable privacy or leave the site out"
    )]
    DpRequired,
    /// The site's minimum cohort exceeds the federation's largest cohort.
    #[error(
        "the site requires cohorts of at least {min_cohort} but federation.max_clients is \
         {max_clients}; it would refuse every round"
    )]
    CohortUnreachable {
        /// The site's minimum cohort.
        min_cohort: u32,
        /// The federation's largest cohort.
        max_clients: u32,
    },
}

fn validate(
    raw: FederationFile,
    check: &Check<'_>,
    base: &Path,
) -> Result<FederationPolicy, ConfigError> {
    let secure_aggregation = secure_aggregation(raw.secure_aggregation, check)?;
    let federation = federation(
        raw.federation,
        secure_aggregation.enabled,
        secure_aggregation.phase_timeout,
        check,
    )?;
    let training = training(raw.training, federation.rounds, check)?;
    Ok(FederationPolicy {
        server: server(raw.server, check, base)?,
        model: ModelSettings {
            initial_checkpoint: raw
                .model
                .initial_checkpoint
                .map(|p| check.path("model.initial_checkpoint", base, p))
                .transpose()?,
        },
        outer: outer(raw.outer, check)?,
        privacy: privacy(raw.privacy, check)?,
        releases: releases(raw.releases, check)?,
        federation,
        training,
        secure_aggregation,
    })
}

fn federation(
    raw: FederationTable,
    secure_aggregation: bool,
    phase_timeout: Duration,
    check: &Check<'_>,
) -> Result<FederationSettings, ConfigError> {
    let name = check.name("federation.name", raw.name)?;
    let rounds = check.int("federation.rounds", raw.rounds.unwrap_or(10), 1..=i64::MAX)?;
    // Masking a single update hides nothing: the sum is the update.
    let floor = if secure_aggregation { 2 } else { 1 };
    let min_clients: u32 = check.int(
        "federation.min_clients",
        raw.min_clients.unwrap_or(8),
        floor..=i64::from(u32::MAX),
    )?;
    let max_clients: u32 = check.int(
        "federation.max_clients",
        raw.max_clients.unwrap_or(i64::from(min_clients)),
        1..=i64::from(u32::MAX),
    )?;
    if max_clients < min_clients {
        return Err(check.invalid(
            "federation.max_clients",
            format!("must be >= federation.min_clients = {min_clients} (got {max_clients})"),
        ));
    }
    let cohort_timeout = match raw.cohort_timeout_secs {
        Some(secs) => {
            Duration::from_secs(check.int("federation.cohort_timeout_secs", secs, 1..=i64::MAX)?)
        }
        None => phase_timeout * 2,
    };
    let max_round_attempts = check.int(
        "federation.max_round_attempts",
        raw.max_round_attempts.unwrap_or(3),
        1..=i64::from(u32::MAX),
    )?;
    Ok(FederationSettings {
        name,
        rounds,
        min_clients,
        max_clients,
        cohort_timeout,
        max_round_attempts,
    })
}

fn server(raw: ServerTable, check: &Check<'_>, base: &Path) -> Result<ServerSettings, ConfigError> {
    let listen = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen = listen.parse().map_err(|e| {
        check.invalid(
            "server.listen",
            format!("must be an address such as \"0.0.0.0:7443\" (got {listen:?}: {e})"),
        )
    })?;
    // A revoked site must not keep taking part because a file was left out: running without a
    // CRL is an explicit, visible choice.
    let crl = match (raw.crl, raw.require_revocation.unwrap_or(true)) {
        (Some(path), _) => Some(check.path("server.crl", base, path)?),
        (None, false) => None,
        (None, true) => {
            return Err(check.invalid(
                "server.crl",
                "is required: the CRL every site is checked against (`quorum-aggregator pki \
                 init` writes ca/crl.pem). To run without revocation, set \
                 require_revocation = false",
            ));
        }
    };
    let metrics_listen = match raw.metrics_listen {
        None => None,
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(_) => {
                return Err(check.invalid(
                    "server.metrics_listen",
                    format!(
                        "must be a loopback address such as \"127.0.0.1:9464\" (got {text:?}): \
                         the endpoint has no authentication; let a local Prometheus agent \
                         scrape it"
                    ),
                ));
            }
            Err(e) => {
                return Err(check.invalid(
                    "server.metrics_listen",
                    format!("must be an address such as \"127.0.0.1:9464\" (got {text:?}: {e})"),
                ));
            }
        },
    };
    Ok(ServerSettings {
        listen,
        metrics_listen,
        ca: check.path("server.ca", base, raw.ca)?,
        cert: check.path("server.cert", base, raw.cert)?,
        key: check.path("server.key", base, raw.key)?,
        crl,
        state_dir: check.path(
            "server.state_dir",
            base,
            raw.state_dir.unwrap_or_else(|| "state".into()),
        )?,
        upload_slots: check.int(
            "server.upload_slots",
            raw.upload_slots.unwrap_or(8),
            1..=1024,
        )?,
    })
}

fn training(
    raw: TrainingTable,
    rounds: u32,
    check: &Check<'_>,
) -> Result<TrainingSettings, ConfigError> {
    let local_steps: u32 = check.int(
        "training.local_steps",
        raw.local_steps.unwrap_or(500),
        1..=i64::from(u32::MAX),
    )?;
    let batch_size = check.int(
        "training.batch_size",
        raw.batch_size.unwrap_or(8),
        1..=i64::from(u32::MAX),
    )?;
    let seq_len = check.int(
        "training.seq_len",
        raw.seq_len.unwrap_or(1024),
        1..=i64::from(u32::MAX),
    )?;
    let lr = check.positive("training.lr", raw.lr.unwrap_or(3e-4))?;
    let derived_total = u64::from(rounds) * u64::from(local_steps);
    let total_steps: u64 = match raw.total_steps {
        Some(v) => check.int("training.total_steps", v, 1..=i64::MAX)?,
        None => derived_total,
    };
    let warmup_steps: u64 = match raw.warmup_steps {
        Some(v) => check.int("training.warmup_steps", v, 0..=i64::MAX)?,
        None => total_steps / 10,
    };
    if warmup_steps > total_steps {
        return Err(check.invalid(
            "training.warmup_steps",
            format!("must be <= training.total_steps = {total_steps} (got {warmup_steps})"),
        ));
    }
    Ok(TrainingSettings {
        local_steps,
        batch_size,
        seq_len,
        lr,
        warmup_steps,
        total_steps,
        reset_local_optimizer: raw.reset_local_optimizer.unwrap_or(true),
        max_duration: Duration::from_secs(check.int(
            "training.max_seconds",
            raw.max_seconds.unwrap_or(DEFAULT_TRAINING_SECONDS),
            1..=i64::MAX,
        )?),
    })
}

/// A day: local training of a large model on CPU takes hours; heartbeats catch dead sites.
const DEFAULT_TRAINING_SECONDS: i64 = 24 * 60 * 60;

fn outer(raw: OuterTable, check: &Check<'_>) -> Result<OuterOptimizer, ConfigError> {
    let name = raw.optimizer.as_deref().unwrap_or("nesterov");
    // Keys of another optimizer are refused: they would be silently ignored otherwise.
    let unused = |key: &str, set: bool| -> Result<(), ConfigError> {
        if set {
            Err(check.invalid(
                key,
                format!("does not apply to outer.optimizer = \"{name}\"; remove it"),
            ))
        } else {
            Ok(())
        }
    };
    let lr = |default: f64| check.positive("outer.lr", raw.lr.unwrap_or(default));
    let momentum =
        |default: f64| check.half_open("outer.momentum", raw.momentum.unwrap_or(default), 0.0, 1.0);
    let adam_keys_unused = || -> Result<(), ConfigError> {
        unused("outer.beta1", raw.beta1.is_some())?;
        unused("outer.beta2", raw.beta2.is_some())?;
        unused("outer.eps", raw.eps.is_some())
    };
    match name {
        "fedavg" => {
            unused("outer.momentum", raw.momentum.is_some())?;
            adam_keys_unused()?;
            Ok(OuterOptimizer::FedAvg { lr: lr(1.0)? })
        }
        "fedmom" => {
            adam_keys_unused()?;
            Ok(OuterOptimizer::FedMom {
                lr: lr(1.0)?,
                momentum: momentum(0.9)?,
            })
        }
        "nesterov" => {
            adam_keys_unused()?;
            Ok(OuterOptimizer::Nesterov {
                lr: lr(0.7)?,
                momentum: momentum(0.7)?,
            })
        }
        "fedadam" => {
            unused("outer.momentum", raw.momentum.is_some())?;
            Ok(OuterOptimizer::FedAdam {
                lr: lr(1e-2)?,
                beta1: check.half_open("outer.beta1", raw.beta1.unwrap_or(0.9), 0.0, 1.0)?,
                beta2: check.half_open("outer.beta2", raw.beta2.unwrap_or(0.99), 0.0, 1.0)?,
                eps: check.positive("outer.eps", raw.eps.unwrap_or(1e-3))?,
            })
        }
        other => Err(check.invalid(
            "outer.optimizer",
            format!(
                "must be one of \"fedavg\", \"fedmom\", \"nesterov\", \"fedadam\" (got {other:?})"
            ),
        )),
    }
}

fn secure_aggregation(
    raw: SecureAggregationTable,
    check: &Check<'_>,
) -> Result<SecureAggregationSettings, ConfigError> {
    Ok(SecureAggregationSettings {
        enabled: raw.enabled.unwrap_or(true),
        modulus_bits: check.int(
            "secure_aggregation.modulus_bits",
            raw.modulus_bits.unwrap_or(32),
            8..=32,
        )?,
        corrupt_fraction: check.half_open(
            "secure_aggregation.corrupt_fraction",
            raw.corrupt_fraction.unwrap_or(0.1),
            0.0,
            1.0,
        )?,
        dropouts: match raw.dropout_fraction {
            Some(f) => Dropouts::Stated(check.half_open(
                "secure_aggregation.dropout_fraction",
                f,
                0.0,
                1.0,
            )?),
            None => Dropouts::UpTo(DEFAULT_DROPOUT_FRACTION),
        },
        phase_timeout: Duration::from_secs(check.int(
            "secure_aggregation.phase_timeout_secs",
            raw.phase_timeout_secs.unwrap_or(300),
            1..=i64::MAX,
        )?),
    })
}

fn privacy(raw: PrivacyTable, check: &Check<'_>) -> Result<PrivacySettings, ConfigError> {
    let delta = raw.delta.unwrap_or(1e-6);
    Ok(PrivacySettings {
        enabled: raw.enabled.unwrap_or(true),
        clip_norm: check.positive("privacy.clip_norm", raw.clip_norm.unwrap_or(1.0))?,
        noise_multiplier: check.positive(
            "privacy.noise_multiplier",
            raw.noise_multiplier.unwrap_or(1.0),
        )?,
        delta: Delta::new(delta).map_err(|_| {
            check.invalid("privacy.delta", format!("must be in (0, 1) (got {delta})"))
        })?,
    })
}

/// The public keys of RFC 8032's Ed25519 test vectors (section 7.1: tests 1, 2, 3, 1024 and
/// SHA(abc)): their private keys are in the RFC, so a signature under them proves nothing.
const PUBLISHED_TEST_KEYS: [&str; 5] = [
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
    "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
    "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
    "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
];

fn releases(raw: ReleasesTable, check: &Check<'_>) -> Result<ReleaseSettings, ConfigError> {
    let trusted_keys = raw
        .trusted_keys
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let mut out = [0u8; 32];
            let name = format!("releases.trusted_keys[{i}]");
            hex::decode_to_slice(key.trim(), &mut out).map_err(|e| {
                check.invalid(
                    &name,
                    format!("must be 64 hex digits, an Ed25519 public key (got {key:?}: {e})"),
                )
            })?;
            if PUBLISHED_TEST_KEYS.contains(&hex::encode(out).as_str()) {
                return Err(check.invalid(
                    &name,
                    "is an RFC 8032 test key, whose private key is published: anyone could sign \
                     a release with it; trust your own key (`quorum-aggregator release keygen`)",
                ));
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let allowed_versions = raw.allowed_versions.unwrap_or_default();
    if let Some(i) = allowed_versions.iter().position(|v| v.trim().is_empty()) {
        return Err(check.invalid(
            &format!("releases.allowed_versions[{i}]"),
            "must not be empty",
        ));
    }
    let require_attestation = raw.require_attestation.unwrap_or(true);
    if require_attestation && trusted_keys.is_empty() {
        return Err(check.invalid(
            "releases.trusted_keys",
            "must list at least one key while releases.require_attestation = true",
        ));
    }
    Ok(ReleaseSettings {
        trusted_keys,
        allowed_versions,
        require_attestation,
    })
}
