//! `quorum-audit`: the auditor's tool for any Quorum node's audit log (aggregator or site),
//! without LibTorch or a node's configuration.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use quorum_audit::cli::{AuditCommand, run};

/// Verify, read and export a Quorum audit log, and make audit keys.
///
/// LOG is a node's `audit` folder (stop the node first: its store allows one process), the
/// live copy `audit.jsonl` the node keeps beside it (readable while it runs), or an export.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// The log to read.
    #[arg(long, global = true, default_value = "state/audit", value_name = "LOG")]
    log: PathBuf,
    #[command(subcommand)]
    command: AuditCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli.log, cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
