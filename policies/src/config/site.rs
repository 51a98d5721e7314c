//! `site.toml`: a site's own policy, which the aggregator can never override.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{Check, ConfigError, base_dir, parse_raw, read_file};
use crate::accountant::Delta;
use crate::ledger::DpSgdSpend;

/// Prefix of a `data.path` naming a corpus built into the client.
pub const BUILTIN_PREFIX: &str = "builtin:";
/// File name of the privacy ledger inside `storage.state_dir`.
pub const LEDGER_FILE: &str = "privacy-ledger.json";
/// Directory of the audit log inside `storage.state_dir`.
pub const AUDIT_DIR: &str = "audit";
/// File name of the site's audit key inside its state folder.
pub const AUDIT_KEY_FILE: &str = "audit.key";
/// File name, inside the state folder, of the newest revocation list the site adopted (DER).
pub const REVOCATION_LIST_FILE: &str = "revocation.crl";

// ---- the file: mirrors the TOML exactly ----

/// `site.toml` as written, unknown keys refused: [`SiteFile::to_toml`] writes one,
/// [`SitePolicy::from_toml_str`] reads and validates one. Each key, its range and its default
/// are documented in `policies/examples/site.toml`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    /// `[site]`
    pub site: SiteTable,
    /// `[policy]`
    pub policy: PolicyTable,
    /// `[data]`
    pub data: DataTable,
    /// `[training]`
    #[serde(default)]
    pub training: TrainingTable,
    /// `[storage]`
    #[serde(default)]
    pub storage: StorageTable,
    /// `[record_dp]`
    pub record_dp: Option<RecordDpTable>,
}

/// `[record_dp]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordDpTable {
    /// `unit`.
    pub unit: Option<String>,
    /// `sampling_rate` (required).
    pub sampling_rate: f64,
    /// `noise_multiplier` (required).
    pub noise_multiplier: f64,
    /// `clip_norm`.
    pub clip_norm: Option<f64>,
    /// `max_epsilon` (required).
    pub max_epsilon: f64,
    /// `delta`.
    pub delta: Option<f64>,
}

/// `[site]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteTable {
    /// `federation` (required): the one federation this site accepts.
    pub federation: String,
    /// `name` (required): the site's name in its certificate.
    pub name: String,
}

/// `[policy]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTable {
    /// `max_epsilon` (required).
    pub max_epsilon: f64,
    /// `delta`.
    pub delta: Option<f64>,
    /// `min_cohort`.
    pub min_cohort: Option<i64>,
    /// `require_secure_aggregation`.
    pub require_secure_aggregation: Option<bool>,
    /// `allow_plain_mode`.
    pub allow_plain_mode: Option<bool>,
    /// `require_dp`.
    pub require_dp: Option<bool>,
    /// `corrupt_fraction`.
    pub corrupt_fraction: Option<f64>,
    /// `assume_random_graph`.
    pub assume_random_graph: Option<bool>,
    /// `share_metrics`.
    pub share_metrics: Option<bool>,
    /// `sum_metrics`.
    pub sum_metrics: Option<bool>,
    /// `allow_redo_without_dp`.
    pub allow_redo_without_dp: Option<bool>,
    /// `require_revocation`.
    pub require_revocation: Option<bool>,
    /// `[policy.roster]`: site name → SHA-256 of its certificate key, hex.
    pub roster: Option<BTreeMap<String, String>>,
}

/// `[data]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataTable {
    /// `path` (required): a file or folder, or `builtin:NAME`.
    pub path: String,
}

/// `[training]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingTable {
    /// `device`.
    pub device: Option<String>,
}

/// `[storage]` as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageTable {
    /// `state_dir`.
    pub state_dir: Option<PathBuf>,
}

impl SiteFile {
    /// The file as TOML text; keys left `None` are left out (their defaults apply).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a site file always serializes to TOML")
    }
}

// ---- validated ----

/// A validated `site.toml`. Only [`SitePolicy::load`] and [`SitePolicy::from_toml_str`] build
/// one, so every value is in range.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SitePolicy {
    /// `[site]`
    pub site: SiteSettings,
    /// `[policy]`: what this site agrees to.
    pub policy: PolicySettings,
    /// `[data]`
    pub data: DataSource,
    /// `[training]`
    pub training: SiteTraining,
    /// `[storage]`
    pub storage: StorageSettings,
    /// `[record_dp]`: DP-SGD in local training, protecting each record; `None` when absent.
    pub record_dp: Option<RecordDp>,
    /// SHA-256 of the text this policy was parsed from: the site's audit log records the
    /// digest of the configuration in force.
    pub source_sha256: [u8; 32],
}

/// `[site]`: identity.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SiteSettings {
    /// The one federation this site takes part in.
    pub federation: String,
    /// This site's name (as in its certificate).
    pub name: String,
}

/// `[policy]`: the limits this site enforces on every round, whatever the aggregator says.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PolicySettings {
    /// Total privacy loss ε (at `delta`) this site will ever spend.
    pub max_epsilon: f64,
    /// δ at which this site accounts ε.
    pub delta: Delta,
    /// Smallest cohort this site's update may be aggregated in.
    pub min_cohort: u32,
    /// Whether rounds must use secure aggregation.
    pub require_secure_aggregation: bool,
    /// Whether rounds without secure aggregation are acceptable (needs
    /// `require_secure_aggregation = false` too).
    pub allow_plain_mode: bool,
    /// Whether rounds must add differential-privacy noise.
    pub require_dp: bool,
    /// Fraction of any cohort this site assumes may collude with the aggregator: it refuses
    /// SecAgg+ parameters that are unsafe for it, and adds noise as if that many survivors added
    /// none, whatever the federation assumed.
    pub corrupt_fraction: f64,
    /// Whether this site relies on the SecAgg+ neighbour graph being random when it judges a
    /// sparse graph's threshold. The aggregator draws the graph's seed, so off (the default)
    /// the site assumes every colluder may be its neighbour and refuses thresholds that would
    /// not survive that.
    pub assume_random_graph: bool,
    /// Whether this site tells the aggregator, in the clear, its training and validation
    /// losses, token count and training time each round, and answers evaluation-only rounds
    /// that run without secure aggregation (whose only output is its validation loss on a model
    /// the aggregator picks). Off: only the masked update (with the metrics of `sum_metrics`)
    /// leaves the site.
    pub share_metrics: bool,
    /// Whether this site puts its losses and token count, as fixed-point values, into its
    /// masked update, so that the aggregator learns their sums over the round's survivors (not
    /// noised). Off: it adds zeros, and nothing but the noised update leaves the site.
    pub sum_metrics: bool,
    /// Whether this site takes part again, without DP noise, in a round that redoes one whose
    /// update already left it (same model, same data): two noiseless sums over the same data
    /// let the aggregator subtract them.
    pub allow_redo_without_dp: bool,
    /// Whether offers must carry the federation CA's current revocation list, against which
    /// the site checks its SecAgg+ peers and the aggregator. Off only for federations that
    /// run without revocation: then a revoked site can still be a peer.
    pub require_revocation: bool,
    /// The federation's members as this site knows them: name → SHA-256 of the certificate's
    /// Ed25519 key. Empty: any site the CA certifies. Otherwise a cohort with anyone else, or a
    /// peer whose key is not the pinned one, is refused.
    pub roster: BTreeMap<String, [u8; 32]>,
}

impl PolicySettings {
    /// Whether this site accepts rounds without secure aggregation.
    pub fn plain_mode_allowed(&self) -> bool {
        !self.require_secure_aggregation && self.allow_plain_mode
    }
}

/// Validates `[policy.roster]`: site names, each pinned to a 64-hex-digit key digest.
fn roster(
    raw: BTreeMap<String, String>,
    check: &Check<'_>,
) -> Result<BTreeMap<String, [u8; 32]>, ConfigError> {
    raw.into_iter()
        .map(|(site, pin)| {
            let key = format!("policy.roster.{site}");
            let site = check.name(&key, site)?;
            let digest = hex::decode(&pin)
                .ok()
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or_else(|| {
                    check.invalid(
                        &key,
                        format!(
                            "must be the SHA-256 of the site's certificate key as 64 hex digits \
                             (`quorum-client fingerprint` prints it); got {pin:?}"
                        ),
                    )
                })?;
            Ok((site, digest))
        })
        .collect()
}

/// The unit record-level privacy protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrivacyUnit {
    /// One training sequence: a block of `seq_len + 1` tokens packed from the site's text.
    Sequence,
}

impl PrivacyUnit {
    /// The name used in `site.toml`, the audit log and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sequence => "sequence",
        }
    }
}

/// `[record_dp]`: DP-SGD on every local step, so that each record's influence on what leaves
/// the site is bounded and noised by the site itself, whatever the aggregator and the other
/// sites do.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct RecordDp {
    /// What one record is.
    pub unit: PrivacyUnit,
    /// Probability that a local step samples any one record (Poisson sampling), in (0, 1].
    pub sampling_rate: f64,
    /// Noise standard deviation as a multiple of `clip_norm`, > 0.
    pub noise_multiplier: f64,
    /// Largest L2 norm of one record's gradient, > 0.
    pub clip_norm: f64,
    /// Record-level ε this site will ever spend, at `delta`.
    pub max_epsilon: f64,
    /// δ of the record-level ε; must be below 1 / (the site's training records).
    pub delta: Delta,
}

impl RecordDp {
    /// What `steps` local steps of this site's DP-SGD cost, for the ledger.
    pub fn spend(&self, steps: u32) -> DpSgdSpend {
        DpSgdSpend {
            sampling_rate: self.sampling_rate,
            noise_multiplier: self.noise_multiplier,
            steps: u64::from(steps),
        }
    }
}

/// `[data]`: where the site's training text comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataSource {
    /// A file or directory of `.txt`, `.jsonl` or `.gz` files.
    Path(PathBuf),
    /// A corpus built into the client, by flavour name (`builtin:<flavour>`).
    Builtin(String),
}

/// `[training]`: local hardware.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SiteTraining {
    /// Device local training runs on.
    pub device: Device,
}

/// Compute device for local training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Device {
    /// CUDA when available, else CPU.
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA; fails if none is available.
    Cuda,
}

/// `[storage]`
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageSettings {
    /// Directory holding the privacy ledger and the audit log.
    pub state_dir: PathBuf,
}

impl SitePolicy {
    /// Reads and validates `site.toml` at `path`. Relative paths in the file are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_file(path)?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `file` names it in errors and is the base of relative
    /// paths (its parent directory; a bare file name leaves them relative).
    pub fn from_toml_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let raw: SiteFile = parse_raw(file, text)?;
        let mut policy = validate(raw, &Check { file }, &base_dir(file))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        policy.source_sha256.copy_from_slice(digest.as_ref());
        Ok(policy)
    }

    /// Path of the privacy ledger.
    pub fn ledger_path(&self) -> PathBuf {
        self.storage.state_dir.join(LEDGER_FILE)
    }

    /// Directory of the site's audit log.
    pub fn audit_dir(&self) -> PathBuf {
        self.storage.state_dir.join(AUDIT_DIR)
    }

    /// The key that signs the site's audit heads, made once with `quorum-client audit keygen`.
    pub fn audit_key_path(&self) -> PathBuf {
        self.storage.state_dir.join(AUDIT_KEY_FILE)
    }

    /// The newest revocation list this site adopted from an offer: offers must not go back
    /// from it, across restarts too.
    pub fn revocation_list_path(&self) -> PathBuf {
        self.storage.state_dir.join(REVOCATION_LIST_FILE)
    }
}

fn validate(raw: SiteFile, check: &Check<'_>, base: &Path) -> Result<SitePolicy, ConfigError> {
    let site = SiteSettings {
        federation: check.name("site.federation", raw.site.federation)?,
        name: check.name("site.name", raw.site.name)?,
    };
    let p = raw.policy;
    let require_secure_aggregation = p.require_secure_aggregation.unwrap_or(true);
    let allow_plain_mode = p.allow_plain_mode.unwrap_or(false);
    if require_secure_aggregation && allow_plain_mode {
        return Err(check.invalid(
            "policy.allow_plain_mode",
            "contradicts policy.require_secure_aggregation = true; set that to false as well \
             to accept rounds without secure aggregation",
        ));
    }
    let delta = p.delta.unwrap_or(1e-6);
    let delta = Delta::new(delta)
        .map_err(|_| check.invalid("policy.delta", format!("must be in (0, 1) (got {delta})")))?;
    let policy = PolicySettings {
        max_epsilon: check.positive("policy.max_epsilon", p.max_epsilon)?,
        delta,
        min_cohort: check.int(
            "policy.min_cohort",
            p.min_cohort.unwrap_or(3),
            1..=i64::from(u32::MAX),
        )?,
        require_secure_aggregation,
        allow_plain_mode,
        require_dp: p.require_dp.unwrap_or(true),
        corrupt_fraction: check.half_open(
            "policy.corrupt_fraction",
            p.corrupt_fraction.unwrap_or(0.0),
            0.0,
            1.0,
        )?,
        assume_random_graph: p.assume_random_graph.unwrap_or(false),
        share_metrics: p.share_metrics.unwrap_or(false),
        sum_metrics: p.sum_metrics.unwrap_or(true),
        allow_redo_without_dp: p.allow_redo_without_dp.unwrap_or(false),
        require_revocation: p.require_revocation.unwrap_or(true),
        roster: roster(p.roster.unwrap_or_default(), check)?,
    };
    let record_dp = raw.record_dp.map(|r| record_dp(r, check)).transpose()?;
    Ok(SitePolicy {
        source_sha256: [0; 32],
        record_dp,
        site,
        policy,
        data: data(raw.data, check, base)?,
        training: SiteTraining {
            device: device(raw.training.device.as_deref().unwrap_or("auto"), check)?,
        },
        storage: StorageSettings {
            state_dir: check.path(
                "storage.state_dir",
                base,
                raw.storage.state_dir.unwrap_or_else(|| "state".into()),
            )?,
        },
    })
}

fn record_dp(raw: RecordDpTable, check: &Check<'_>) -> Result<RecordDp, ConfigError> {
    let unit = match raw.unit.as_deref().unwrap_or("sequence") {
        "sequence" => PrivacyUnit::Sequence,
        "document" => {
            return Err(check.invalid(
                "record_dp.unit",
                "document-level privacy is not supported: training text is packed into \
                 sequences across document boundaries, and per-document contribution bounding \
                 is not built; use \"sequence\" (a document of k sequences is then protected \
                 as a group of k)",
            ));
        }
        other => {
            return Err(check.invalid(
                "record_dp.unit",
                format!("must be \"sequence\" (got {other:?})"),
            ));
        }
    };
    let sampling_rate = raw.sampling_rate;
    if !(sampling_rate > 0.0 && sampling_rate <= 1.0) {
        return Err(check.invalid(
            "record_dp.sampling_rate",
            format!("must be in (0, 1] (got {sampling_rate})"),
        ));
    }
    let delta = raw.delta.unwrap_or(1e-6);
    Ok(RecordDp {
        unit,
        sampling_rate,
        noise_multiplier: check.positive("record_dp.noise_multiplier", raw.noise_multiplier)?,
        clip_norm: check.positive("record_dp.clip_norm", raw.clip_norm.unwrap_or(1.0))?,
        max_epsilon: check.positive("record_dp.max_epsilon", raw.max_epsilon)?,
        delta: Delta::new(delta).map_err(|_| {
            check.invalid(
                "record_dp.delta",
                format!("must be in (0, 1) (got {delta})"),
            )
        })?,
    })
}

fn data(raw: DataTable, check: &Check<'_>, base: &Path) -> Result<DataSource, ConfigError> {
    match raw.path.strip_prefix(BUILTIN_PREFIX) {
        Some(flavour) => {
            let flavour = check.name("data.path", flavour.to_owned()).map_err(|_| {
                check.invalid(
                    "data.path",
                    format!(
                        "builtin flavour must be 1 to 64 characters from [A-Za-z0-9._-] \
                         (got {:?})",
                        raw.path
                    ),
                )
            })?;
            Ok(DataSource::Builtin(flavour))
        }
        None => Ok(DataSource::Path(check.path(
            "data.path",
            base,
            raw.path.into(),
        )?)),
    }
}

fn device(value: &str, check: &Check<'_>) -> Result<Device, ConfigError> {
    match value {
        "auto" => Ok(Device::Auto),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda),
        other => Err(check.invalid(
            "training.device",
            format!("must be one of \"auto\", \"cpu\", \"cuda\" (got {other:?})"),
        )),
    }
}
