//! The auditor's commands: the `quorum-audit` binary, and `quorum-aggregator audit` and
//! `quorum-client audit`, which delegate here. Only `keygen` writes anything.
//!
//! A log is read from its sled folder (the node must be stopped: sled allows one process) or,
//! while the node runs, from the live JSONL copy the node keeps beside it (`<log>.jsonl`), or
//! from any export.

use std::{io::Write, path::Path, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};

use crate::{
    AuditKey, AuditLog, Checks, Expected, Filter, Head, Kind, SledStore, Store, export_jsonl,
    fingerprint, import_jsonl, list, mirror_path, reconcile, render_line, show, verify,
    witnessed_heads,
};

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Make a node's audit key (PKCS#8 PEM, mode 0600) and print its fingerprint for auditors
    /// to pin. The node records the fingerprint as its log's first record.
    Keygen {
        /// Where to write the key; never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// Rotate: the old key signs a handover to the new one (written to `<out>.endorsement`),
        /// which the log records when the node next starts with the new key.
        #[arg(long, value_name = "OLD_KEY")]
        endorse_with: Option<PathBuf>,
    },
    /// Check the hash chain, the audit keys and the signed heads, and anything held elsewhere;
    /// names the first bad record (or round). Exit 1 if the log does not verify.
    Verify {
        /// Fingerprint of the node's audit key, pinned out of band: a log re-signed with any
        /// other key fails. Repeat to accept several.
        #[arg(long = "trusted-key", value_name = "FINGERPRINT")]
        trusted_keys: Vec<String>,
        /// A head of this log held elsewhere (`SEQ:HASH`, e.g. from an earlier `verify`): the
        /// log must still reach it with the same hash.
        #[arg(long = "expect-head", value_name = "SEQ:HASH")]
        expected_heads: Vec<Head>,
        /// Another node's log or export: every head of this log it witnessed must still be
        /// here. A log cut, rolled back or rewritten behind a witnessed head is named by round.
        #[arg(long = "witness", value_name = "LOG")]
        witnesses: Vec<PathBuf>,
    },
    /// One line per record, oldest first.
    List {
        /// Only records about this round.
        #[arg(long)]
        round: Option<u32>,
        /// Only records about this site.
        #[arg(long)]
        site: Option<String>,
        /// Only records of this kind (e.g. join, refusal, model_digest, privacy_spent).
        #[arg(long)]
        kind: Option<Kind>,
        /// Only records at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// One record in full, as JSON.
    Show {
        /// Sequence number.
        seq: u64,
    },
    /// Every record as one RFC 8785 JSON object per line (with its hash): for a SIEM, for
    /// `--witness`, or for an independent check (docs/AUDIT.md).
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
    /// Retention: move the records before SEQ into a new export FILE and remove them from the
    /// log, leaving a signed `pruned` record (the range, the export's SHA-256, the last hash,
    /// the key in force) so that what is left still verifies. The node must be stopped.
    Prune {
        /// First seq to keep.
        #[arg(long, value_name = "SEQ")]
        before: u64,
        /// The export to write (never overwritten); keep it with the audit papers.
        #[arg(long, value_name = "FILE")]
        export: PathBuf,
        /// The log's audit key (the node's `audit.key`): the `pruned` record is signed.
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
    },
    /// Check that every global-model digest this site recorded matches the aggregator's
    /// record for that round (the aggregator's `audit export` output).
    Reconcile {
        /// The aggregator's JSONL export.
        #[arg(long = "aggregator-export")]
        aggregator_export: PathBuf,
    },
}

/// Export formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
}

/// Opens a log for reading: a sled folder, or a JSONL file (live copy or export).
pub fn open_log(path: &Path) -> anyhow::Result<Box<dyn Store>> {
    if path.is_dir() {
        let store = SledStore::open_existing(path).with_context(|| {
            format!(
                "cannot open the audit log at {}; while its node runs, read the live copy {} instead",
                path.display(),
                mirror_path(path).display()
            )
        })?;
        return Ok(Box::new(store));
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the audit log or export {}", path.display()))?;
    let store = import_jsonl(&text).with_context(|| format!("in {}", path.display()))?;
    Ok(Box::new(store))
}

/// Who wrote the log: its first record's actor (every record names the same one, which
/// `verify` checks).
fn actor_of(store: &dyn Store) -> Option<String> {
    crate::query::records(store)
        .next()?
        .ok()
        .map(|record| record.actor)
}

/// Runs an audit command against the log at `log`.
pub fn run(log: &Path, command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Keygen { out, endorse_with } => {
            let old = endorse_with.as_deref().map(AuditKey::load).transpose()?;
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            let key = AuditKey::generate(&out, old.as_ref())?;
            println!("{}", key.fingerprint());
            eprintln!(
                "audit key written to {}; give auditors its fingerprint (above) to pin with `verify --trusted-key`",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            trusted_keys,
            expected_heads,
            witnesses,
        } => {
            let mut checks = Checks {
                trusted_keys,
                expected: expected_heads
                    .into_iter()
                    .map(|head| Expected {
                        head,
                        round: None,
                        held_by: "--expect-head".into(),
                        signed_by: None,
                    })
                    .collect(),
            };
            let store = &*open_log(log)?;
            // Whose heads to look for in the witnesses: this log's own actor.
            let actor = actor_of(store);
            for witness in &witnesses {
                let other = open_log(witness)?;
                let report = verify(&*other, &Checks::default()).with_context(|| {
                    format!("the witness log {} does not verify", witness.display())
                })?;
                let Some(actor) = &actor else { break };
                let held = witnessed_heads(&*other, actor)?;
                eprintln!(
                    "{}: {} heads of {actor} witnessed by {}",
                    witness.display(),
                    held.len(),
                    report.actor.as_deref().unwrap_or("an empty log")
                );
                checks.expected.extend(held);
            }
            match verify(store, &checks) {
                Ok(report) => {
                    let key = report
                        .key
                        .as_deref()
                        .map_or_else(|| "none".to_owned(), fingerprint);
                    let last = report
                        .last
                        .map_or_else(|| "empty".to_owned(), |h| h.to_string());
                    println!(
                        "ok: {} records, {} signed heads, {} heads held elsewhere, chain intact; audit key {key}; last {last}",
                        report.records,
                        report.heads,
                        checks.expected.len() - report.expected_pruned,
                    );
                    if let Some(first) = report.pruned_before {
                        println!(
                            "records before seq {first} were pruned: verify their export (its sha256 is in the `pruned` record) with the same --trusted-key, or with `verify_export.py --pruned-export`; {} heads held elsewhere fall there",
                            report.expected_pruned
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("audit log {} is NOT intact: {e}", log.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCommand::List {
            round,
            site,
            kind,
            since,
        } => {
            let filter = Filter {
                round,
                site,
                kind,
                since,
            };
            for record in list(&*open_log(log)?, &filter)? {
                println!("{}", render_line(&record));
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Show { seq } => match show(&*open_log(log)?, seq)? {
            Some(record) => {
                println!("{}", serde_json::to_string_pretty(&record.to_value())?);
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("no record #{seq}");
                Ok(ExitCode::FAILURE)
            }
        },
        AuditCommand::Export {
            format: ExportFormat::Jsonl,
        } => {
            let store = open_log(log)?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            export_jsonl(&*store, &mut out)?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Prune {
            before,
            export,
            key,
        } => {
            if !log.is_dir() {
                anyhow::bail!(
                    "prune works on a node's audit folder, not on {}",
                    log.display()
                );
            }
            // Opening the log for writing verifies it whole.
            let actor = actor_of(&*open_log(log)?).context("the log is empty")?;
            let mut audit = AuditLog::open(log, actor, Some(AuditKey::load(&key)?))?;
            let pruned = audit.prune(before, &export)?;
            println!(
                "records {}..={} moved to {} (sha256 {}); the log keeps a signed `pruned` record",
                pruned.from,
                pruned.to,
                export.display(),
                hex::encode(pruned.export_sha256)
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Reconcile { aggregator_export } => {
            let text = std::fs::read_to_string(&aggregator_export)
                .with_context(|| format!("cannot read {}", aggregator_export.display()))?;
            let report = reconcile(&*open_log(log)?, &text)?;
            print!("{report}");
            Ok(if report.is_consistent() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
