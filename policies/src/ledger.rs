//! A site's privacy ledger: the rounds it took part in and what each cost, kept on disk so
//! the budget survives crashes and restarts.
//!
//! The file is JSON, rewritten whole on every record: written to a temporary file in the same
//! directory, flushed to disk, renamed over the ledger, then the directory is flushed, so a
//! crash leaves either the old ledger or the new one. A file that does not decode is an error,
//! never an empty ledger: losing the ledger must not restore the budget.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::accountant::{Accountant, AccountantError, Delta, Recorded};
use crate::rdp::{RdpAccountant, SampledGaussian};

/// Value of the `format` field that identifies a ledger file.
pub const LEDGER_FORMAT: &str = "quorum-privacy-ledger";
/// Ledger file version this crate reads and writes.
pub const LEDGER_VERSION: u32 = 1;

/// A ledger that could not be read, written or extended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The ledger exists but could not be read.
    #[error("cannot read the privacy ledger {path}: {source}; check its permissions")]
    Unreadable {
        /// The ledger file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The ledger does not decode or is inconsistent.
    #[error(
        "the privacy ledger {path} is corrupt ({reason}); it is never reset automatically: \
         restore it from a backup or rebuild it from the audit log before taking part in \
         further rounds"
    )]
    Corrupt {
        /// The ledger file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The ledger could not be written; the round must not go ahead.
    #[error("cannot write the privacy ledger {path}: {source}; do not release the update")]
    WriteFailed {
        /// The ledger file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The round would make the privacy loss unbounded.
    #[error("round {round}: rho = {rho} makes epsilon unbounded; refusing to record it")]
    LossUnbounded {
        /// The round.
        round: u32,
        /// Its ρ.
        rho: f64,
    },
    /// The round's ρ is invalid or conflicts with the one on record.
    #[error(transparent)]
    Accounting(#[from] AccountantError),
}

/// One round a site took part in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    /// Round number.
    pub round: u32,
    /// zCDP ρ the round cost.
    pub rho: f64,
    /// δ at which `epsilon_after` is stated.
    pub delta: f64,
    /// Total ε spent after this round, at `delta`.
    pub epsilon_after: f64,
    /// When the round was recorded, in seconds since the Unix epoch.
    pub time: u64,
    /// The round's DP-SGD, for sites that protect each record with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpsgd: Option<DpSgdSpend>,
}

/// The DP-SGD a site ran in one round: `steps` Poisson-sampled Gaussian steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSgdSpend {
    /// Probability that a step sampled any one record.
    pub sampling_rate: f64,
    /// Noise standard deviation in units of the clipping norm.
    pub noise_multiplier: f64,
    /// Local steps.
    pub steps: u64,
}

impl DpSgdSpend {
    fn step(self) -> (SampledGaussian, u64) {
        let step = SampledGaussian {
            sampling_rate: self.sampling_rate,
            noise_multiplier: self.noise_multiplier,
        };
        (step, self.steps)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    format: String,
    version: u32,
    entries: Vec<LedgerEntry>,
}

/// The privacy ledger of one site.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    entries: Vec<LedgerEntry>,
}

impl Ledger {
    /// Opens the ledger at `path`; a missing file is an empty ledger (created on the first
    /// record), an unreadable or corrupt one is an error.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let entries = match fs::read(path) {
            Ok(bytes) => decode(&bytes).map_err(|reason| LedgerError::Corrupt {
                path: path.to_path_buf(),
                reason,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(LedgerError::Unreadable {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rounds recorded, in the order they were recorded.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    /// Whether `round` is on record.
    pub fn contains(&self, round: u32) -> bool {
        self.entries.iter().any(|e| e.round == round)
    }

    /// An accountant holding every recorded round, reporting ε at `delta`.
    pub fn accountant(&self, delta: Delta) -> Accountant {
        // Rounds are unique and every ρ valid: `decode` and `record` both check it.
        Accountant::with_rounds(
            delta,
            self.entries.iter().map(|e| (e.round, e.rho)).collect(),
        )
    }

    /// Record-level ε over all recorded rounds at `delta`, with a next round's DP-SGD added
    /// when given: a round costs its DP-SGD, or its site-level noise where it ran none
    /// ([`RdpAccountant::compose_round`]).
    pub fn record_level_epsilon(&self, delta: Delta, next: Option<DpSgdSpend>) -> f64 {
        let mut accountant = RdpAccountant::default();
        let rounds = self.entries.iter().map(|e| (e.rho, e.dpsgd));
        for (rho, dpsgd) in rounds.chain(next.map(|spend| (0.0, Some(spend)))) {
            accountant.compose_round(rho, dpsgd.map(DpSgdSpend::step));
        }
        accountant.epsilon(delta.get())
    }

    /// ε spent over all recorded rounds, at `delta`.
    pub fn spent_epsilon(&self, delta: Delta) -> f64 {
        self.accountant(delta).epsilon()
    }

    /// Records that `round` cost `rho` (and ran `dpsgd`) and makes it durable before
    /// returning. Recording a round again with the same ρ changes nothing
    /// ([`Recorded::Replayed`]).
    pub fn record(
        &mut self,
        round: u32,
        rho: f64,
        dpsgd: Option<DpSgdSpend>,
        delta: Delta,
        now: SystemTime,
    ) -> Result<Recorded, LedgerError> {
        let mut accountant = self.accountant(delta);
        if accountant.record(round, rho)? == Recorded::Replayed {
            return Ok(Recorded::Replayed);
        }
        let epsilon_after = accountant.epsilon();
        if !epsilon_after.is_finite() {
            return Err(LedgerError::LossUnbounded { round, rho });
        }
        self.entries.push(LedgerEntry {
            round,
            rho,
            delta: delta.get(),
            epsilon_after,
            time: now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            dpsgd,
        });
        if let Err(source) = encode(&self.entries).and_then(|b| write_atomically(&self.path, &b)) {
            // Keep memory equal to disk: the caller must not release this round.
            self.entries.pop();
            return Err(LedgerError::WriteFailed {
                path: self.path.clone(),
                source,
            });
        }
        Ok(Recorded::New)
    }
}

/// Serialises the ledger file.
fn encode(entries: &[LedgerEntry]) -> io::Result<Vec<u8>> {
    let file = LedgerFile {
        format: LEDGER_FORMAT.to_owned(),
        version: LEDGER_VERSION,
        entries: entries.to_vec(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Parses and checks a ledger file.
fn decode(bytes: &[u8]) -> Result<Vec<LedgerEntry>, String> {
    let file: LedgerFile =
        serde_json::from_slice(bytes).map_err(|e| format!("not a ledger: {e}"))?;
    if file.format != LEDGER_FORMAT {
        return Err(format!(
            "format is {:?}, expected {LEDGER_FORMAT:?}",
            file.format
        ));
    }
    if file.version != LEDGER_VERSION {
        return Err(format!(
            "version {} is not supported (this build reads version {LEDGER_VERSION})",
            file.version
        ));
    }
    let mut seen = BTreeMap::new();
    for entry in &file.entries {
        if !(entry.rho.is_finite() && entry.rho >= 0.0) {
            return Err(format!("round {} has rho = {}", entry.round, entry.rho));
        }
        if seen.insert(entry.round, entry.rho).is_some() {
            return Err(format!("round {} appears twice", entry.round));
        }
    }
    Ok(file.entries)
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    quorum_durable::replace(path, bytes, quorum_durable::Mode::Public)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(round: u32, rho: f64) -> LedgerEntry {
        LedgerEntry {
            round,
            rho,
            delta: 1e-6,
            epsilon_after: 1.0,
            time: 0,
            dpsgd: None,
        }
    }

    #[test]
    fn encode_then_decode_is_identity() {
        let entries = vec![entry(0, 0.125), entry(3, 1.0 / 3.0)];
        assert_eq!(decode(&encode(&entries).unwrap()), Ok(entries));
    }

    #[test]
    fn decode_refuses_duplicate_rounds_and_foreign_formats() {
        let dup = encode(&[entry(1, 0.5), entry(1, 0.5)]).unwrap();
        assert!(decode(&dup).unwrap_err().contains("round 1 appears twice"));
        let foreign = br#"{"format":"other","version":1,"entries":[]}"#;
        assert!(decode(foreign).unwrap_err().contains("format"));
        let future = br#"{"format":"quorum-privacy-ledger","version":2,"entries":[]}"#;
        assert!(decode(future).unwrap_err().contains("version 2"));
        let negative = encode(&[entry(1, -0.5)]).unwrap();
        assert!(decode(&negative).unwrap_err().contains("rho = -0.5"));
    }
}
