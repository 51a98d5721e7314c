//! Shared harness: a federation in a temporary folder (PKI, signed client release, initial model,
//! `federation.toml` and one `site.toml` per site), real `quorum-aggregator` / `quorum-client`
//! processes with their output in files, waits with deadlines, and cleanup that kills every
//! process a test started.

use std::{
    collections::BTreeMap,
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use quorum_policies::config::{
    federation::{
        FederationFile, FederationTable, ModelTable, OuterTable, PrivacyTable, ReleasesTable,
        SecureAggregationTable, ServerTable, TrainingTable,
    },
    site::{DataTable, PolicyTable, SiteFile, SiteTable, StorageTable},
};
use serde_json::Value;

/// Federation name used by every test.
pub const FEDERATION: &str = "e2e";

/// Built-in corpora, assigned to sites in turn so that their data differ.
const FLAVOURS: [&str; 4] = ["clinical", "finance", "academic", "legal"];

/// The cargo workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// A debug binary of the workspace; `make test` builds them before running the tests.
pub fn binary(name: &str) -> PathBuf {
    let path = workspace().join("target/debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` before these tests (`make test` does)",
        path.display()
    );
    path
}

/// Serialises the tests that train (several LibTorch processes each); the light ones run
/// alongside. The machine may have two cores.
pub fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A signed client release shared by all tests of this process: a hard link (or copy) of the
/// debug client next to its manifest, in a folder of its own so that the manifest in
/// `target/debug` is never rewritten under a running test.
pub struct Release {
    /// The signed client executable.
    pub client: PathBuf,
    /// Hex public key to list as trusted.
    pub public_key: String,
    /// The client's version (from `--version`).
    pub version: String,
    /// A `tiny` initial model made once by `quorum-client init-model`, copied into each
    /// federation (making it loads LibTorch: half a second per federation otherwise).
    pub initial_model: PathBuf,
}

/// The signed release, made once per test process.
pub fn release() -> &'static Release {
    static RELEASE: OnceLock<Release> = OnceLock::new();
    RELEASE.get_or_init(make_release)
}

fn make_release() -> Release {
    let root = workspace().join("target/quorum-tests");
    fs::create_dir_all(&root).expect("create target/quorum-tests");
    // Links left by earlier runs keep old binaries alive on disk; drop those of dead processes.
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("release-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(format!("release-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create the release folder");
    let client = dir.join("quorum-client");
    let original = binary("quorum-client");
    if fs::hard_link(&original, &client).is_err() {
        fs::copy(&original, &client).expect("copy the client binary");
    }
    let key = dir.join("release.key");
    let agg = binary("quorum-aggregator");
    must(run(&agg, &["release", "keygen", "--out", s(&key)], &dir));
    let public_key = fs::read_to_string(dir.join("release.key.pub"))
        .expect("release.key.pub")
        .trim()
        .to_owned();
    let version_out = must(run(&client, &["--version"], &dir));
    let version = version_out
        .split_whitespace()
        .nth(1)
        .expect("`quorum-client --version` prints `quorum-client X.Y.Z`")
        .to_owned();
    must(run(
        &agg,
        &[
            "release",
            "sign",
            "--binary",
            s(&client),
            "--version",
            &version,
            "--key",
            s(&key),
        ],
        &dir,
    ));
    let initial_model = dir.join("initial.safetensors");
    let init = ["init-model", "--preset", "tiny", "--out", s(&initial_model)];
    must(run(&client, &init, &dir));
    Release {
        client,
        public_key,
        version,
        initial_model,
    }
}

/// A path as `&str` (every path here is made by the tests, so UTF-8).
pub fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// Runs a command to completion with a deadline of two minutes.
pub fn run(program: &Path, args: &[&str], cwd: &Path) -> Output {
    let child = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(output) => output.expect("wait for the command"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{} {args:?} did not finish within 120 s", program.display());
        }
    }
}

/// Stdout of a successful command; panics with its output otherwise.
pub fn must(output: Output) -> String {
    assert!(
        output.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A free loopback port (bound and released; the aggregator binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Federation settings, small enough for CPU tests.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Site names.
    pub sites: Vec<String>,
    /// Training rounds.
    pub rounds: u32,
    /// Smallest cohort.
    pub min_clients: u32,
    /// Largest cohort.
    pub max_clients: u32,
    /// Phase deadline (also the training deadline; cohorts wait twice as long).
    pub phase_timeout_secs: u64,
    /// SecAgg+ dropout allowance.
    pub dropout_fraction: f64,
    /// Local steps per round.
    pub local_steps: u32,
    /// Client versions allowed to join; `None`: the signed release's version.
    pub allowed_versions: Option<Vec<String>>,
    /// Distributed DP on (federation) and required (sites).
    pub dp: bool,
    /// Fresh local AdamW moments every round.
    pub reset_local_optimizer: bool,
    /// The loopback address the aggregator listens on (its certificate names it too).
    pub host: String,
    /// The DNS name in the aggregator's certificate.
    pub server_name: String,
    /// Loopback port of the aggregator's `/metrics` and `/healthz`, if served.
    pub metrics_port: Option<u16>,
}

impl Spec {
    /// `sites` sites, all needed for a round, two rounds.
    pub fn new(sites: &[&str]) -> Self {
        let n = sites.len() as u32;
        Self {
            sites: sites.iter().map(|s| (*s).to_owned()).collect(),
            rounds: 2,
            min_clients: n,
            max_clients: n,
            phase_timeout_secs: 60,
            dropout_fraction: 0.0,
            local_steps: 5,
            allowed_versions: None,
            dp: true,
            reset_local_optimizer: false,
            host: "127.0.0.1".into(),
            server_name: "localhost".into(),
            metrics_port: None,
        }
    }
}

/// A federation laid out in a temporary folder (kept, and named on stderr, if the test fails).
pub struct Federation {
    /// The folder; every relative path below is inside it.
    pub dir: tempfile::TempDir,
    /// The settings it was made with.
    pub spec: Spec,
    /// Aggregator port.
    pub port: u16,
    /// Fingerprint of each node's audit key (`"aggregator"`, then site names).
    pub audit_keys: BTreeMap<String, String>,
}

impl Federation {
    /// PKI, initial model, `federation.toml` and a permissive `site.toml` per site.
    pub fn new(spec: Spec) -> Self {
        let release = release();
        let dir = tempfile::Builder::new()
            .prefix("quorum-e2e-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        let agg = binary("quorum-aggregator");
        let init = [
            "pki",
            "init",
            "--federation",
            FEDERATION,
            "--out",
            "pki",
            "--server-name",
            &spec.server_name,
            "--server-ip",
            &spec.host,
        ];
        must(run(&agg, &init, root));
        // Each site makes its key in its own folder; only the request reaches the authority.
        for site in &spec.sites {
            enroll(&root.join("pki/ca"), &root.join("sites"), FEDERATION, site);
        }
        // Every node's audit key is made on purpose, before the node first runs; the
        // fingerprints it prints are what an auditor pins.
        let mut audit_keys = BTreeMap::new();
        let made = must(run(
            &agg,
            &["audit", "keygen", "--out", "aggregator-state/audit.key"],
            root,
        ));
        audit_keys.insert("aggregator".to_owned(), made.trim().to_owned());
        let client = binary("quorum-client");
        for site in &spec.sites {
            let key = format!("{site}-state/audit.key");
            let made = must(run(&client, &["audit", "keygen", "--out", &key], root));
            audit_keys.insert(site.clone(), made.trim().to_owned());
        }
        fs::copy(&release.initial_model, root.join("initial.safetensors"))
            .expect("copy the initial model");
        let port = free_port();
        let fed = Self {
            dir,
            spec,
            port,
            audit_keys,
        };
        fed.write_federation_toml();
        for site in &fed.spec.sites {
            fed.write_site_toml(site, 1e9);
        }
        fed
    }

    /// A path inside the federation folder.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// The aggregator's address.
    pub fn address(&self) -> String {
        format!("{}:{}", self.spec.host, self.port)
    }

    fn write_federation_toml(&self) {
        let spec = &self.spec;
        let release = release();
        let file = FederationFile {
            federation: FederationTable {
                name: FEDERATION.into(),
                rounds: Some(spec.rounds.into()),
                min_clients: Some(spec.min_clients.into()),
                max_clients: Some(spec.max_clients.into()),
                ..Default::default()
            },
            server: ServerTable {
                listen: Some(self.address()),
                ca: "pki/ca/ca.pem".into(),
                cert: "pki/server/server.pem".into(),
                key: "pki/server/server.key".into(),
                crl: Some("pki/ca/crl.pem".into()),
                state_dir: Some("aggregator-state".into()),
                metrics_listen: spec.metrics_port.map(|port| format!("127.0.0.1:{port}")),
                ..Default::default()
            },
            model: ModelTable {
                initial_checkpoint: Some("initial.safetensors".into()),
            },
            training: TrainingTable {
                local_steps: Some(spec.local_steps.into()),
                batch_size: Some(4),
                seq_len: Some(64),
                lr: Some(3e-3),
                warmup_steps: Some(2),
                total_steps: Some(i64::from(spec.rounds) * i64::from(spec.local_steps)),
                reset_local_optimizer: Some(spec.reset_local_optimizer),
                max_seconds: None,
            },
            outer: OuterTable {
                optimizer: Some("fedavg".into()),
                lr: Some(1.0),
                ..Default::default()
            },
            secure_aggregation: SecureAggregationTable {
                enabled: Some(true),
                modulus_bits: Some(24),
                corrupt_fraction: Some(0.0),
                dropout_fraction: Some(spec.dropout_fraction),
                phase_timeout_secs: Some(spec.phase_timeout_secs as i64),
            },
            privacy: PrivacyTable {
                enabled: Some(spec.dp),
                clip_norm: Some(5.0),
                noise_multiplier: Some(0.001),
                delta: Some(1e-6),
            },
            releases: ReleasesTable {
                trusted_keys: Some(vec![release.public_key.clone()]),
                allowed_versions: Some(
                    spec.allowed_versions
                        .clone()
                        .unwrap_or_else(|| vec![release.version.clone()]),
                ),
                require_attestation: Some(true),
            },
        };
        fs::write(self.path("federation.toml"), file.to_toml()).expect("write federation.toml");
    }

    /// (Re)writes `<site>.toml` with the given ε budget.
    pub fn write_site_toml(&self, site: &str, max_epsilon: f64) {
        let index = self.spec.sites.iter().position(|s| s == site).unwrap_or(0);
        let flavour = FLAVOURS[index % FLAVOURS.len()];
        let file = SiteFile {
            site: SiteTable {
                federation: FEDERATION.into(),
                name: site.into(),
            },
            policy: PolicyTable {
                max_epsilon,
                delta: Some(1e-6),
                min_cohort: Some(2),
                require_secure_aggregation: Some(true),
                require_dp: Some(self.spec.dp),
                // The reports and plots need each site's losses.
                share_metrics: Some(true),
                // Without noise, the crash tests redo an interrupted round on purpose.
                allow_redo_without_dp: Some(!self.spec.dp),
                ..Default::default()
            },
            data: DataTable {
                path: format!("builtin:{flavour}"),
            },
            storage: StorageTable {
                state_dir: Some(format!("{site}-state").into()),
            },
            ..Default::default()
        };
        fs::write(self.path(&format!("{site}.toml")), file.to_toml()).expect("write site.toml");
    }

    /// Starts the aggregator (stdout/stderr to `logs/<name>.out|err`) and waits until it listens.
    pub fn start_aggregator(&self, name: &str) -> Proc {
        let mut command = Command::new(binary("quorum-aggregator"));
        command
            .args(["serve", "--config", "federation.toml"])
            .env("RUST_LOG", "quorum_aggregator=debug");
        let mut proc = self.spawn(name, command);
        // The engine reports its first phase only once the listener is bound.
        proc.wait_for_stderr("waiting for sites", Duration::from_secs(60));
        proc
    }

    /// A `quorum-client run` command for `site` (CPU, short validation, and a reconnect window
    /// of `reconnect_secs`).
    pub fn client_command(&self, site: &str, client: &Path, reconnect_secs: u64) -> Command {
        let seed = self.spec.sites.iter().position(|s| s == site).unwrap_or(0);
        let mut command = Command::new(client);
        command.args([
            "run",
            "--bundle",
            &format!("sites/{site}"),
            "--config",
            &format!("{site}.toml"),
            "--server",
            &self.address(),
            "--device",
            "cpu",
            "--seed",
            &seed.to_string(),
            "--validation-blocks",
            "4",
            "--reconnect-for",
            &reconnect_secs.to_string(),
        ]);
        command
    }

    /// Starts the signed client for `site`.
    pub fn start_client(&self, site: &str) -> Proc {
        self.spawn(site, self.client_command(site, &release().client, 5))
    }

    /// Runs the whole federation (the aggregator and every site) until each exits successfully;
    /// returns the aggregator's and the sites' processes, for their output.
    pub fn run_to_end(&self, timeout: Duration) -> (Proc, Vec<Proc>) {
        let mut aggregator = self.start_aggregator("aggregator");
        let mut sites: Vec<Proc> = self
            .spec
            .sites
            .iter()
            .map(|s| self.start_client(s))
            .collect();
        aggregator.wait_success(timeout);
        for site in &mut sites {
            site.wait_success(Duration::from_secs(30));
        }
        (aggregator, sites)
    }

    /// The aggregator's checkpoint after round id `round`.
    pub fn checkpoint(&self, round: u64) -> Vec<u8> {
        let path = self.path(&format!(
            "aggregator-state/checkpoints/round-{round:04}.safetensors"
        ));
        fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    /// Starts `command` in the federation folder with its output in `logs/`.
    pub fn spawn(&self, name: &str, mut command: Command) -> Proc {
        let logs = self.path("logs");
        fs::create_dir_all(&logs).expect("create logs/");
        let stdout = logs.join(format!("{name}.out"));
        let stderr = logs.join(format!("{name}.err"));
        let child = command
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("create stdout log"))
            .stderr(fs::File::create(&stderr).expect("create stderr log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            logs,
        }
    }

    /// The aggregator's `state.json`, if written yet.
    pub fn state(&self) -> Option<Value> {
        let text = fs::read(self.path("aggregator-state/state.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Runs `quorum-aggregator audit --log aggregator-state/audit <args>`.
    pub fn aggregator_audit(&self, args: &[&str]) -> Output {
        let mut all = vec!["audit", "--log", "aggregator-state/audit"];
        all.extend_from_slice(args);
        run(&binary("quorum-aggregator"), &all, self.dir.path())
    }

    /// Runs `quorum-client audit --log <site>-state/audit <args>`.
    pub fn site_audit(&self, site: &str, args: &[&str]) -> Output {
        let log = format!("{site}-state/audit");
        let mut all = vec!["audit", "--log", log.as_str()];
        all.extend_from_slice(args);
        run(&release().client, &all, self.dir.path())
    }

    /// The aggregator's audit records (parsed `audit export`); the aggregator must be stopped.
    pub fn aggregator_records(&self) -> Vec<Value> {
        parse_jsonl(&must(self.aggregator_audit(&["export"])))
    }

    /// The refusal reasons in the aggregator's audit log; the aggregator must be stopped.
    pub fn refusal_reasons(&self) -> Vec<String> {
        let all = self.aggregator_records();
        records(&all, "refusal", None)
            .iter()
            .map(|r| {
                r["details"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    /// A site's audit records; the site must be stopped.
    pub fn site_records(&self, site: &str) -> Vec<Value> {
        parse_jsonl(&must(self.site_audit(site, &["export"])))
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "federation folder kept for inspection: {}",
                self.dir.path().display()
            );
        }
    }
}

fn parse_jsonl(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("audit export lines are JSON"))
        .collect()
}

/// The last 60 lines of `text`.
/// Enrols `site` of `federation` as a site would: its key and request made in
/// `sites/<site>`, the certificate signed by the CA in `ca`.
pub fn enroll(ca: &Path, sites: &Path, federation: &str, site: &str) -> PathBuf {
    let folder = sites.join(site);
    let request = quorum_attest::pki::request_site(federation, site, &folder).expect("site key");
    quorum_attest::pki::sign_site_request(ca, &request.csr_path, &folder, 30)
        .expect("the authority signs the request");
    folder
}

pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Records of `kind` (and `round`, when given).
pub fn records<'a>(all: &'a [Value], kind: &str, round: Option<u32>) -> Vec<&'a Value> {
    all.iter()
        .filter(|r| r["kind"] == kind)
        .filter(|r| round.is_none_or(|n| r["round"] == n))
        .collect()
}

/// A process started by a test; killed (SIGKILL) when dropped.
pub struct Proc {
    name: String,
    child: Child,
    /// Its stdout file.
    pub stdout: PathBuf,
    /// Its stderr file.
    pub stderr: PathBuf,
    logs: PathBuf,
}

impl Proc {
    /// Waits for the process to exit; panics with its logs after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "{} still running after {timeout:?}\n{}",
                    self.name,
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks the process to stop with SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits for a successful exit.
    pub fn wait_success(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(
            status.success(),
            "{} exited with {status}\n{}",
            self.name,
            self.describe()
        );
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything it wrote to stdout.
    pub fn stdout_text(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything it wrote to stderr.
    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stderr contains `needle`; panics if the process exits first or on timeout.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stderr_text().contains(needle) {
                return;
            }
            // An exited process prints nothing more: say so now, not at the deadline.
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) without printing {needle:?}\n{}",
                    self.name,
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{} did not print {needle:?} within {timeout:?}\n{}",
            self.name,
            self.describe()
        );
    }

    /// Its output and the other logs of its federation.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail(&self.stdout_text()),
            self.name,
            tail(&self.stderr_text())
        );
        if let Ok(entries) = fs::read_dir(&self.logs) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path != self.stdout && path != self.stderr {
                    let text = fs::read_to_string(&path).unwrap_or_default();
                    out.push_str(&format!("\n--- {} ---\n{}", path.display(), tail(&text)));
                }
            }
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mean of the sites' `val_loss_before` in one `state.json` history entry.
pub fn mean_val_loss_before(entry: &Value) -> f64 {
    let reports = entry["reports"]
        .as_object()
        .expect("history entries have reports");
    assert!(!reports.is_empty(), "no site reports in {entry}");
    let sum: f64 = reports
        .values()
        .map(|r| r["val_loss_before"].as_f64().expect("val_loss_before"))
        .sum();
    sum / reports.len() as f64
}
