//! Load generator: a real `quorum-aggregator serve` process and N synthetic sites over loopback
//! mTLS. Each site is the production session (`quorum_client::session::run`: admission, DP
//! encoding, SecAgg+ masking, streamed upload, audit log, privacy ledger) driving a participant
//! that returns a random update instead of training, so the measurement is the protocol and
//! the aggregator, not LibTorch. All sites share one tokio runtime in this process.
//!
//! Prints one JSON line (also written to `<out>/result.json`): round wall times from the
//! aggregator's `state.json`, the aggregator's peak RSS (VmHWM) and CPU time (polled from /proc
//! every 100 ms), CPU-seconds of one steady-state round for the aggregator and per site, the
//! sites' peak memory, the update bytes each site uploaded, and the TCP bytes the aggregator received
//! on each connection (TLS, HTTP/2, gRPC and protobuf framing included; from `ss -E`, which
//! reports each socket's final counters as it closes).
//!
//! `cargo run --release -p quorum-client --example loadgen -- --sites 10 --dim 10000000
//! --rounds 2 --out bench-out/load/secure-n10-d10m [--plain]`

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use quorum_client::{
    participant::{LocalUpdate, Participant},
    session::{self, SiteOptions},
};
use quorum_policies::config::{
    federation::{
        FederationFile, FederationTable, ModelTable, OuterTable, PrivacyTable, ReleasesTable,
        SecureAggregationTable, ServerTable, TrainingTable,
    },
    site::{DataTable, PolicyTable, SiteFile, SiteTable, StorageTable},
};
use quorum_proto::v1 as pb;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    /// The aggregator binary.
    #[arg(long, default_value = "target/release/quorum-aggregator")]
    aggregator: PathBuf,
    /// Working folder (emptied first): PKI, configs, state, logs and result.json.
    #[arg(long)]
    out: PathBuf,
    /// Number of synthetic sites.
    #[arg(long, default_value_t = 10)]
    sites: usize,
    /// Model parameters (one f32 tensor).
    #[arg(long, default_value_t = 1_000_000)]
    dim: usize,
    /// Training rounds (the aggregator adds one evaluation-only pass after them).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Plain encoded uploads instead of SecAgg+ (sites must allow it, and do here).
    #[arg(long)]
    plain: bool,
    /// Bits per element of the encoded vector.
    #[arg(long, default_value_t = 20)]
    bits: u32,
    /// DP noise multiplier (DP stays on in both modes so only the masking differs).
    #[arg(long, default_value_t = 1.0)]
    noise: f64,
    /// No DP noise (federation and sites both agree), for comparison with systems without DP.
    #[arg(long)]
    no_dp: bool,
    /// Deadline of each protocol phase, seconds (a failed round is retried by the aggregator).
    #[arg(long, default_value_t = 300)]
    phase_timeout: u64,
    /// Uploads the aggregator receives at once (`server.upload_slots`; each is stored on disk
    /// as it arrives).
    #[arg(long, default_value_t = 8)]
    upload_slots: i64,
    /// Give up after this many seconds in total.
    #[arg(long, default_value_t = 1800)]
    deadline: u64,
}

/// Returns a fresh random update each round and keeps nothing between rounds: no training, no
/// model evaluation, so a site holds what the protocol makes it hold and no more.
struct SyntheticParticipant {
    rng: ChaCha8Rng,
    marks: Arc<CpuMarks>,
}

impl SyntheticParticipant {
    fn new(seed: u64, marks: Arc<CpuMarks>) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            marks,
        }
    }
}

/// CPU time (clock ticks) of the aggregator and of this process when the first site of each
/// round starts training. From one mark to the next is one whole round in steady state (the
/// upload, unmasking and sum of one round, the model download of the next), for both sides.
struct CpuMarks {
    aggregator_pid: u32,
    first_train: Mutex<BTreeMap<u32, (u64, u64)>>,
}

impl CpuMarks {
    fn mark(&self, round: u32) {
        let ticks = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_cpu_ticks)
                .unwrap_or(0)
        };
        let mut marks = self.first_train.lock().unwrap_or_else(|p| p.into_inner());
        marks
            .entry(round)
            .or_insert_with(|| (ticks(&self.aggregator_pid.to_string()), ticks("self")));
    }

    /// (aggregator, sites' process) CPU-seconds between the last two marks; `None` with fewer
    /// than two training rounds.
    fn last_round_cpu_s(&self) -> Option<(f64, f64)> {
        let marks = self.first_train.lock().unwrap_or_else(|p| p.into_inner());
        let mut last_two = marks.values().rev();
        let (agg_end, own_end) = *last_two.next()?;
        let (agg_start, own_start) = *last_two.next()?;
        let hz = clock_ticks_per_second();
        Some((
            agg_end.saturating_sub(agg_start) as f64 / hz,
            own_end.saturating_sub(own_start) as f64 / hz,
        ))
    }
}

impl Participant for SyntheticParticipant {
    fn load_and_evaluate(&mut self, _: &pb::RoundConfig, _: &[u8]) -> anyhow::Result<f64> {
        Ok(0.0)
    }

    fn train(
        &mut self,
        config: &pb::RoundConfig,
        _: &str,
        _: &AtomicU32,
    ) -> anyhow::Result<LocalUpdate> {
        self.marks.mark(config.round);
        let dim = usize::try_from(config.num_parameters).context("model too large")?;
        let rng = &mut self.rng;
        Ok(LocalUpdate {
            delta: (0..dim).map(|_| rng.random_range(-1e-3..1e-3)).collect(),
            ..LocalUpdate::default()
        })
    }
}

/// What the poller saw of the aggregator; each field is the largest value read.
#[derive(Debug, Default, Clone, Copy)]
struct ProcSample {
    peak_rss_kib: u64,
    cpu_ticks: u64,
}

/// `VmHWM` (peak resident set, KiB) from /proc/<pid>/status text.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    status_kib(status, "VmHWM:")
}

/// The KiB figure of `key` (e.g. `VmRSS:`) in /proc/<pid>/status text.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// utime + stime (clock ticks) from /proc/<pid>/stat text; the command name may hold spaces.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields after the name start at `state` (field 3); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// (peer address, bytes_received) per connection from `ss -tinH` output, where each
/// connection is a line ending in the peer address followed by a line of TCP statistics.
fn parse_ss(text: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut peer = None;
    for line in text.lines() {
        if let Some(rest) = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("bytes_received:"))
        {
            if let (Some(p), Ok(bytes)) = (peer.take(), rest.parse()) {
                out.push((p, bytes));
            }
        } else if !line.starts_with(char::is_whitespace) {
            peer = line.split_whitespace().last().map(str::to_owned);
        }
    }
    out
}

fn sample(pid: u32, last: &mut ProcSample) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    // A zombie has no memory map any more: keep the last live reading.
    if let Some(hwm) = parse_vm_hwm(&status) {
        last.peak_rss_kib = last.peak_rss_kib.max(hwm);
    }
    if let Some(t) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .as_deref()
        .and_then(parse_cpu_ticks)
    {
        last.cpu_ticks = last.cpu_ticks.max(t);
    }
    true
}

/// Polls the aggregator every 100 ms on a thread of its own, not a runtime worker, which site
/// tasks may keep busy.
fn start_poller(pid: u32, stop: Arc<AtomicBool>) -> Arc<Mutex<ProcSample>> {
    let shared = Arc::new(Mutex::new(ProcSample::default()));
    let out = shared.clone();
    std::thread::spawn(move || {
        let mut last = ProcSample::default();
        while !stop.load(Ordering::Relaxed) && sample(pid, &mut last) {
            *out.lock().unwrap_or_else(|p| p.into_inner()) = last;
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    shared
}

/// `ss -E` prints every TCP socket on the aggregator's port as it closes, with its final
/// counters; what it printed is read when the run is over. `None` where `ss` or `stdbuf` is
/// missing.
struct SocketWatch {
    child: Child,
    reader: std::thread::JoinHandle<String>,
}

impl SocketWatch {
    fn start(port: u16) -> Option<Self> {
        // Line-buffered, or the events would sit in a pipe buffer when `ss` is stopped.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "ss", "-tinEH", "sport", "=", &format!(":{port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut stdout = child.stdout.take()?;
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        Some(Self { child, reader })
    }

    /// Bytes received per closed connection.
    fn finish(mut self) -> Vec<(String, u64)> {
        // Give the last close events a moment to arrive.
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reader
            .join()
            .map(|text| parse_ss(&text))
            .unwrap_or_default()
    }
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A safetensors file with one f32 tensor `w` of `dim` small values.
fn write_model(path: &Path, dim: usize) -> anyhow::Result<u64> {
    let bytes: Vec<u8> = (0..dim)
        .flat_map(|i| (((i % 2001) as f32 - 1000.0) * 1e-5).to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![dim], &bytes)?;
    let file = safetensors::serialize([("w", view)], None)?;
    std::fs::write(path, &file).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(file.len() as u64)
}

fn federation_toml(args: &Args, port: u16) -> String {
    FederationFile {
        federation: FederationTable {
            name: "loadgen".into(),
            rounds: Some(args.rounds.into()),
            min_clients: Some(args.sites as i64),
            max_clients: Some(args.sites as i64),
            ..Default::default()
        },
        server: ServerTable {
            listen: Some(format!("127.0.0.1:{port}")),
            ca: "pki/ca/ca.pem".into(),
            cert: "pki/server/server.pem".into(),
            key: "pki/server/server.key".into(),
            crl: Some("pki/ca/crl.pem".into()),
            state_dir: Some("aggregator-state".into()),
            upload_slots: Some(args.upload_slots),
            ..Default::default()
        },
        model: ModelTable {
            initial_checkpoint: Some("initial.safetensors".into()),
        },
        training: TrainingTable {
            local_steps: Some(1),
            batch_size: Some(1),
            seq_len: Some(1),
            lr: Some(1e-3),
            warmup_steps: Some(0),
            reset_local_optimizer: Some(false),
            ..Default::default()
        },
        outer: OuterTable {
            optimizer: Some("fedavg".into()),
            lr: Some(1.0),
            ..Default::default()
        },
        secure_aggregation: SecureAggregationTable {
            enabled: Some(!args.plain),
            modulus_bits: Some(args.bits.into()),
            corrupt_fraction: Some(0.0),
            dropout_fraction: Some(0.0),
            phase_timeout_secs: Some(args.phase_timeout as i64),
        },
        privacy: PrivacyTable {
            enabled: Some(!args.no_dp),
            clip_norm: Some(1.0),
            noise_multiplier: Some(args.noise),
            delta: Some(1e-6),
        },
        // Synthetic sites run no signed release.
        releases: ReleasesTable {
            require_attestation: Some(false),
            ..Default::default()
        },
    }
    .to_toml()
}

fn site_toml(site: &str, state_dir: &Path, plain: bool, dp: bool) -> String {
    SiteFile {
        site: SiteTable {
            federation: "loadgen".into(),
            name: site.into(),
        },
        policy: PolicyTable {
            // Load tests measure cost, not privacy: no budget cap.
            max_epsilon: 1e9,
            delta: Some(1e-6),
            min_cohort: Some(2),
            require_secure_aggregation: Some(!plain),
            allow_plain_mode: plain.then_some(true),
            require_dp: Some(dp),
            // The reports and plots need each site's losses.
            share_metrics: Some(true),
            ..Default::default()
        },
        data: DataTable {
            path: "builtin:clinical".into(),
        },
        storage: StorageTable {
            state_dir: Some(state_dir.to_owned()),
        },
        ..Default::default()
    }
    .to_toml()
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

async fn wait_for_listener(port: u16, child: &mut Child) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the aggregator exited with {status} before listening; see aggregator.log");
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the aggregator did not listen on port {port} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills the aggregator if the run fails half-way.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// This process's `VmHWM:` or `VmRSS:` in KiB (0 if unreadable).
fn own_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| status_kib(&status, key))
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Every site of this process shares the runtime. The session moves DP encoding and
    // masking to blocking threads, but a site's participant and audit appends still run on a
    // worker; one worker per site keeps each site's I/O moving as in a process of its own.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.sites + 2)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.sites < 2 && !args.plain {
        bail!("secure aggregation needs at least 2 sites");
    }
    let aggregator = std::fs::canonicalize(&args.aggregator).with_context(|| {
        format!(
            "no aggregator binary at {}; run `cargo build --release --bins`",
            args.aggregator.display()
        )
    })?;
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("cannot empty {}", args.out.display()))?;
    }
    std::fs::create_dir_all(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;
    let names: Vec<String> = (0..args.sites).map(|i| format!("s{i}")).collect();

    let pki = Command::new(&aggregator)
        .args(["pki", "init", "--federation", "loadgen", "--out"])
        .arg(out.join("pki"))
        .stdout(Stdio::null())
        .status()?;
    if !pki.success() {
        bail!("`quorum-aggregator pki init` failed ({pki})");
    }
    // Each site's key made in its own bundle folder, its request signed by the CA.
    for site in &names {
        let bundle = out.join("bundles").join(site);
        let request = quorum_attest::pki::request_site("loadgen", site, &bundle)?;
        quorum_attest::pki::sign_site_request(&out.join("pki/ca"), &request.csr_path, &bundle, 30)?;
    }
    // Every node's audit key, made before it first runs.
    std::fs::create_dir_all(out.join("aggregator-state"))?;
    quorum_audit::AuditKey::generate(&out.join("aggregator-state/audit.key"), None)?;
    let model_bytes = write_model(&out.join("initial.safetensors"), args.dim)?;
    let port = free_port()?;
    std::fs::write(out.join("federation.toml"), federation_toml(&args, port))?;

    let sockets = SocketWatch::start(port);
    let started = Instant::now();
    let child = Command::new(&aggregator)
        .args(["serve", "--config"])
        .arg(out.join("federation.toml"))
        .current_dir(&out)
        .stdout(std::fs::File::create(out.join("aggregator.out"))?)
        .stderr(std::fs::File::create(out.join("aggregator.log"))?)
        .spawn()
        .context("cannot start the aggregator")?;
    let mut guard = ChildGuard(child);
    let pid = guard.0.id();
    let stop = Arc::new(AtomicBool::new(false));
    let proc_sample = start_poller(pid, stop.clone());
    wait_for_listener(port, &mut guard.0).await?;

    // What the sites add to this process is theirs: PKI and configs are made by now.
    let idle_kib = own_kib("VmRSS:");
    let marks = Arc::new(CpuMarks {
        aggregator_pid: pid,
        first_train: Mutex::default(),
    });
    let mut tasks = Vec::with_capacity(names.len());
    for (i, site) in names.iter().enumerate() {
        let state_dir = out.join("sites").join(site);
        let policy = quorum_policies::site_from_str(
            &site_toml(site, &state_dir, args.plain, !args.no_dp),
            &format!("{site}.toml"),
        )?;
        std::fs::create_dir_all(&state_dir)?;
        quorum_audit::AuditKey::generate(&policy.audit_key_path(), None)?;
        let opts = SiteOptions {
            bundle: out.join("bundles").join(site),
            policy,
            server: format!("127.0.0.1:{port}"),
            server_name: "localhost".into(),
            exit_after_rounds: None,
            reconnect_for: Duration::from_secs(10),
            pause_before: None,
            accept_roster_change: false,
            metrics_listen: None,
        };
        let participant = SyntheticParticipant::new(i as u64, marks.clone());
        tasks.push(tokio::spawn(session::run(opts, participant)));
    }
    let deadline = Duration::from_secs(args.deadline);
    let mut uploads = Vec::with_capacity(tasks.len());
    for (site, task) in names.iter().zip(tasks) {
        let remaining = deadline.saturating_sub(started.elapsed());
        let summary = tokio::time::timeout(remaining, task)
            .await
            .with_context(|| format!("site {site} did not finish within {deadline:?}"))?
            .with_context(|| format!("site {site} panicked"))?
            .with_context(|| format!("site {site} failed"))?;
        uploads.push(summary.upload_bytes);
    }
    let exit = loop {
        if let Some(status) = guard.0.try_wait()? {
            break status;
        }
        if started.elapsed() > deadline {
            bail!("the aggregator did not exit within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    if !exit.success() {
        bail!("the aggregator exited with {exit}; see aggregator.log");
    }
    let wall = started.elapsed().as_secs_f64();
    let agg = *proc_sample.lock().unwrap_or_else(|p| p.into_inner());
    let connections = sockets.map(SocketWatch::finish);

    let state: Value = serde_json::from_slice(
        &std::fs::read(out.join("aggregator-state/state.json"))
            .context("the aggregator left no state.json")?,
    )?;
    let history = state["history"]
        .as_array()
        .context("state.json has no history")?;
    let training: Vec<&Value> = history
        .iter()
        .filter(|r| r["evaluation_only"] == Value::Bool(false))
        .collect();
    let round_seconds: Vec<f64> = training
        .iter()
        .filter_map(|r| r["seconds"].as_f64())
        .collect();
    let round_upload: Vec<u64> = training
        .iter()
        .filter_map(|r| r["upload_bytes"].as_u64())
        .collect();
    if round_seconds.len() != args.rounds as usize {
        bail!(
            "expected {} training rounds in state.json, found {}",
            args.rounds,
            round_seconds.len()
        );
    }
    let rounds = f64::from(args.rounds);
    let round_cpu = marks.last_round_cpu_s();
    let per_site_upload = uploads.iter().sum::<u64>() as f64 / args.sites as f64 / rounds;
    // Every byte the sites sent (TLS records of every message of the session: join, keys,
    // shares, the update, signatures, reports) per site per training round.
    let wire_per_site = connections
        .as_ref()
        .map(|c| c.iter().map(|(_, bytes)| bytes).sum::<u64>() as f64 / args.sites as f64 / rounds);
    let result = json!({
        "mode": if args.plain { "plain" } else { "secure" },
        "sites": args.sites,
        "dim": args.dim,
        "bits": args.bits,
        "rounds": args.rounds,
        "dp": !args.no_dp,
        "noise_multiplier": if args.no_dp { 0.0 } else { args.noise },
        "round_seconds": round_seconds,
        // The last training round: every site is connected and its update already drawn.
        "round_s": round_seconds.last(),
        "round_upload_bytes": round_upload,
        "upload_bytes_per_site_round": per_site_upload,
        "payload_bytes_per_param": per_site_upload / args.dim as f64,
        "wire_bytes_per_site_round": wire_per_site,
        "wire_bytes_per_param": wire_per_site.map(|w| w / args.dim as f64),
        "connections_seen": connections.as_ref().map(Vec::len),
        "model_file_bytes": model_bytes,
        "aggregator_peak_rss_mib": agg.peak_rss_kib as f64 / 1024.0,
        "aggregator_cpu_s": agg.cpu_ticks as f64 / clock_ticks_per_second(),
        // One steady-state round (see `CpuMarks`); a site's share includes its TLS, HTTP/2,
        // audit appends and its part of this process's runtime.
        "aggregator_cpu_s_per_round": round_cpu.map(|(agg, _)| agg),
        "site_cpu_s_per_round": round_cpu.map(|(_, own)| own / args.sites as f64),
        "sites_process_peak_rss_mib": own_kib("VmHWM:") as f64 / 1024.0,
        // The sites' peak beyond this process's idle size, shared out: an upper bound on one
        // site's peak when they do not all peak at once. A synthetic site holds no model, so
        // this is what a real site holds beyond its model and optimizer.
        "site_peak_rss_mib_each": own_kib("VmHWM:").saturating_sub(idle_kib) as f64
            / 1024.0
            / args.sites as f64,
        "wall_s": wall,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    let line = serde_json::to_string(&result)?;
    let mut file = std::fs::File::create(out.join("result.json"))?;
    writeln!(file, "{line}")?;
    println!("{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let status = "Name:\tquorum\nVmPeak:\t 2000 kB\nVmHWM:\t  1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1234));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        let stat = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        let ss = "0 0 127.0.0.1:7443 127.0.0.1:50000\n\t cubic bytes_sent:10 bytes_received:4096 segs_out:3\n\
                  0 12 127.0.0.1:7443 127.0.0.1:50002\n\t cubic bytes_received:7\n";
        assert_eq!(
            parse_ss(ss),
            vec![
                ("127.0.0.1:50000".into(), 4096),
                ("127.0.0.1:50002".into(), 7)
            ]
        );
    }

    #[test]
    fn generated_configs_load() {
        let args = Args::parse_from(["loadgen", "--out", "x", "--sites", "3", "--plain"]);
        let fed = quorum_policies::federation_from_str(&federation_toml(&args, 7000), "f.toml")
            .expect("federation.toml loads");
        assert!(!fed.secure_aggregation.enabled);
        let site = quorum_policies::site_from_str(
            &site_toml("s0", Path::new("/tmp/s0"), true, false),
            "s.toml",
        )
        .expect("site.toml loads");
        assert!(site.policy.allow_plain_mode);
        assert!(!site.policy.require_secure_aggregation);
        assert!(!site.policy.require_dp);
    }
}
