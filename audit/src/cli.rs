//! The auditor's commands, shared by `quorum-aggregator audit` and `quorum-client audit`.
//! They open the log read-only in spirit: nothing here appends.

use std::{io::Write, path::Path, process::ExitCode};

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};

use crate::{Filter, Kind, SledStore, export_jsonl, list, reconcile, render_line, show, verify};

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain and the signed heads; names the first bad record. Exit 1 if broken.
    Verify,
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
    /// Every record as one JSON object per line (with its hash), for a SIEM or `reconcile`.
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
    /// Check that every global-model digest this site recorded matches the aggregator's
    /// record for that round (the aggregator's `audit export` output).
    Reconcile {
        /// The aggregator's JSONL export.
        #[arg(long = "aggregator-export")]
        aggregator_export: std::path::PathBuf,
    },
}

/// Export formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
}

/// Runs an audit command against the log at `log`.
pub fn run(log: &Path, command: AuditCommand) -> anyhow::Result<ExitCode> {
    let store = SledStore::open_existing(log)
        .with_context(|| format!("cannot open the audit log at {} (is the node still running? sled allows one process at a time)", log.display()))?;
    match command {
        AuditCommand::Verify => match verify(&store, None) {
            Ok(report) => {
                println!(
                    "ok: {} records, {} signed heads, chain intact ({:.0} records/s)",
                    report.records,
                    report.heads,
                    report.records_per_sec()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("audit log {} is NOT intact: {e}", log.display());
                Ok(ExitCode::FAILURE)
            }
        },
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
            for record in list(&store, &filter)? {
                println!("{}", render_line(&record));
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Show { seq } => match show(&store, seq)? {
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
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            export_jsonl(&store, &mut out)?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Reconcile { aggregator_export } => {
            let text = std::fs::read_to_string(&aggregator_export)
                .with_context(|| format!("cannot read {}", aggregator_export.display()))?;
            let report = reconcile(&store, &text)?;
            print!("{report}");
            Ok(if report.is_consistent() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
