//! Measures durable appends per second (each append flushed to disk before it
//! returns) and verification throughput on a sled log.
//!
//! `cargo run --release -p quorum-audit --example audit_throughput [N] [DIR]`
//! (N records, default 5000; DIR holds the temporary logs, default the system
//! temp dir; put it on the disk you care about). Runs once per [`Durability`].

use std::time::Instant;

use quorum_audit::{AuditKey, AuditLog, Checks, Durability, Kind, SledStore, verify};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(Ok(5000), |s| s.parse())?;
    let parent = args.next().map_or_else(std::env::temp_dir, Into::into);
    for durability in [Durability::SyncData, Durability::SledFlush] {
        run(n, &parent, durability)?;
    }
    Ok(())
}

fn run(
    n: u64,
    parent: &std::path::Path,
    durability: Durability,
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir_in(parent)?;
    let path = dir.path().join("audit");
    let store = SledStore::open_with(&path, durability)?;
    let location = path.display().to_string();
    let mut log = AuditLog::with_store(
        Box::new(store),
        location,
        "aggregator",
        Some(AuditKey::ephemeral()),
    )?;
    let started = Instant::now();
    for i in 0..n {
        let round = u32::try_from(i / 100)?;
        if i % 100 == 99 {
            log.append_signed_head(Some(round))?;
        } else {
            log.append(
                Kind::UploadDigest,
                Some(round),
                Some("alpha"),
                json!({"sha256": format!("{i:064x}"), "bytes": 1 << 20}),
            )?;
        }
    }
    let append_secs = started.elapsed().as_secs_f64();
    drop(log);

    let store = SledStore::open_existing(&path)?;
    let report = verify(&store, &Checks::default())?;
    println!(
        "{durability:?}: durable appends: {n} in {append_secs:.3} s = {:.0}/s",
        n as f64 / append_secs
    );
    println!(
        "{durability:?}: verify: {} records ({} signed heads) in {:.3} s = {:.0} records/s",
        report.records,
        report.heads,
        report.elapsed.as_secs_f64(),
        report.records_per_sec()
    );
    Ok(())
}
