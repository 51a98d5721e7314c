//! `quorum-client`: a site's trainer and federation participant.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use quorum_client::{
    checkpoint, cuda,
    data::{BlockStream, TextSource},
    hf,
    model::ModelConfig,
    participant::{PrivateTraining, TchParticipant},
    session::{self, SiteOptions},
    tokenizer::Tokenizer,
    train::{LocalTrainer, TrainConfig, train_centralized},
};
use quorum_crypto::secagg::Phase;
use quorum_policies::config::site::Device;

/// Quorum client: trains the federation's model on this site's data and takes part in secure
/// rounds. Only clipped, noised and masked updates leave the site.
///
/// Typical use:
///   quorum-client keygen --federation demo --site alpha --out alpha
///   (send alpha/site.csr to the federation's authority; put the site.pem and ca.pem it
///    returns into alpha/)
///   quorum-client run --bundle alpha --config site.toml --server agg.example.org:7443
#[derive(Parser)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// How to write progress and events on stderr: text (bars on a terminal, timestamped
    /// lines otherwise) or json (one object per line, for a log collector).
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: quorum_observe::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// CUDA when available, else CPU.
    Auto,
    /// CPU.
    Cpu,
    /// CUDA (fails without a GPU).
    Cuda,
}

impl From<Device> for DeviceArg {
    fn from(device: Device) -> Self {
        match device {
            Device::Cpu => Self::Cpu,
            Device::Cuda => Self::Cuda,
            // Auto, and any kind this client does not know yet.
            _ => Self::Auto,
        }
    }
}

impl DeviceArg {
    fn resolve(self) -> anyhow::Result<tch::Device> {
        Ok(match self {
            Self::Cpu => tch::Device::Cpu,
            Self::Auto if cuda::driver_present() && cuda::load_backend().is_ok() => {
                tch::Device::cuda_if_available()
            }
            Self::Auto => tch::Device::Cpu,
            Self::Cuda => {
                cuda::load_backend().map_err(|e| {
                    anyhow::anyhow!(
                        "--device cuda needs LibTorch's CUDA backend: {e}; install the client's \
                         CUDA bundle, or build it against a CUDA LibTorch"
                    )
                })?;
                if !tch::Cuda::is_available() {
                    anyhow::bail!("--device cuda was asked for but no CUDA device is visible");
                }
                tch::Device::Cuda(0)
            }
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Join the federation and train until it ends.
    Run {
        /// The site's bundle folder: its key (`keygen`), its certificate and the CA's.
        #[arg(long)]
        bundle: PathBuf,
        /// The site's policy (site.toml): its federation and name, privacy limits, data and
        /// state folder. `policy check --config FILE` checks it.
        #[arg(long)]
        config: PathBuf,
        /// Training data, instead of site.toml's `[data] path`: a .txt/.jsonl/.gz file or
        /// folder, or builtin:<clinical|finance|academic|legal>.
        #[arg(long)]
        data: Option<String>,
        /// The aggregator's address, HOST:PORT, as its operator gives it.
        #[arg(long)]
        server: String,
        /// The name the aggregator's certificate must carry. Default: HOST of --server.
        #[arg(long)]
        server_name: Option<String>,
        /// Folder for the audit log and privacy ledger (overrides site.toml).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Compute device, instead of site.toml's `[training] device` (default auto).
        #[arg(long, value_enum)]
        device: Option<DeviceArg>,
        /// Seed for data order and local randomness.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Validation blocks evaluated each round.
        #[arg(long, default_value_t = 16)]
        validation_blocks: usize,
        /// Keep trying to reach a lost aggregator for this many seconds.
        #[arg(long, default_value_t = 300)]
        reconnect_for: u64,
        /// Accept a [policy.roster] that differs from the one this site last ran with; the
        /// change (members added, removed or pinned to another key) is recorded in the site's
        /// audit log. Without it, a site whose roster was edited refuses to start.
        #[arg(long)]
        accept_roster_change: bool,
        /// Serve /metrics (Prometheus) and /healthz on this loopback address, e.g.
        /// 127.0.0.1:9465: round, phase, training steps, ε spent, bytes, last error.
        #[arg(long, value_name = "ADDRESS")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Leave after this many rounds (for fault-injection tests).
        #[arg(long, hide = true)]
        exit_after_rounds: Option<u32>,
        /// Hang just before this secure-aggregation step (for fault-injection tests).
        #[arg(long, hide = true, value_parser = phase_name)]
        pause_before: Option<Phase>,
    },
    /// Write a freshly initialised model checkpoint (the federation's starting point).
    InitModel {
        /// Model preset: tiny, 75m, 125m, 350m, 1.3b.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Initialisation seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Tokenizer the model is built for: bytes (258 ids) or gpt2 (GPT-2 BPE, 50257 ids).
        #[arg(long, default_value = "bytes")]
        tokenizer: Tokenizer,
    },
    /// Centralized baseline: train the same model on the union of several sites' data.
    Train {
        /// Starting checkpoint (the federation's initial model).
        #[arg(long)]
        init: PathBuf,
        /// Data sources, one per site.
        #[arg(long = "data", required = true)]
        data: Vec<String>,
        /// Optimizer steps (match the federation's token budget: rounds × local steps × sites).
        #[arg(long)]
        steps: u64,
        /// Sequences per step.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Peak learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Warm-up steps.
        #[arg(long, default_value_t = 20)]
        warmup: u64,
        /// Evaluate every this many steps.
        #[arg(long, default_value_t = 50)]
        eval_every: u64,
        /// Where to write the curve (JSON list of {tokens, val_loss}).
        #[arg(long)]
        curve: PathBuf,
        /// Compute device.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
    },
    /// Plan record-level DP (DP-SGD) for this site's data: count its training sequences and
    /// print the sampling rate and the smallest noise multiplier that keep the record-level ε
    /// within a target over the local steps the site expects to train, as a `[record_dp]`
    /// table for site.toml.
    PlanRecordDp {
        /// Training data: a .txt/.jsonl/.gz file or folder, or builtin:<flavour>.
        #[arg(long)]
        data: String,
        /// Tokens per sequence (the federation's `seq_len`); one sequence is one record.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Sequences each local step samples on average; sampling rate = this / records.
        #[arg(long)]
        expected_batch: f64,
        /// Local steps over all the rounds the site will train (rounds × local steps).
        #[arg(long)]
        steps: u64,
        /// Record-level ε not to exceed.
        #[arg(long)]
        epsilon: f64,
        /// δ of the record-level ε; must be below 1 / records.
        #[arg(long, default_value_t = 1e-6)]
        delta: f64,
        /// Tokenizer of the federation's model: bytes (258 ids) or gpt2 (GPT-2 BPE).
        #[arg(long, default_value = "bytes")]
        tokenizer: Tokenizer,
    },
    /// Export a checkpoint as a Hugging Face LlamaForCausalLM folder.
    ExportHf {
        /// Checkpoint (safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Validate configuration files without running anything.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Create this site's Ed25519 key (site.key, mode 0600, never leaves DIR) and a certificate
    /// signing request (site.csr) to send to the federation's authority, which returns site.pem
    /// and ca.pem for this folder.
    Keygen {
        /// The federation to join.
        #[arg(long)]
        federation: String,
        /// This site's name, as it will appear in its certificate.
        #[arg(long)]
        site: String,
        /// The site's bundle folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a new certificate signing request (site.csr) for this site's existing key, to renew
    /// its certificate or have it re-issued: the key, and so the site's roster line, stay the
    /// same. The authority signs it as any request; put the site.pem it returns in place of the
    /// old one. The next start records the change in the site's audit log.
    Renew {
        /// The site's bundle folder (site.key and site.pem).
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Print this site's roster line: its name and the SHA-256 of its certificate key. Every
    /// member sends its line to the others, who pin it under [policy.roster] in site.toml.
    Fingerprint {
        /// The site bundle folder (certificate, key, CA).
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Inspect this site's tamper-evident audit log.
    Audit {
        /// The audit log folder.
        #[arg(long, default_value = "state/audit")]
        log: PathBuf,
        #[command(subcommand)]
        command: quorum_audit::cli::AuditCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a site.toml; errors name the file, the key and the reason.
    Check {
        /// The file to check.
        #[arg(long, default_value = "site.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    quorum_observe::init(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            bundle,
            config,
            data,
            server,
            server_name,
            state,
            device,
            seed,
            validation_blocks,
            reconnect_for,
            accept_roster_change,
            metrics_listen,
            exit_after_rounds,
            pause_before,
        } => {
            let mut policy = quorum_policies::load_site(&config)?;
            if let Some(state) = state {
                policy.storage.state_dir = state;
            }
            let device = match device {
                Some(device) => device,
                None => DeviceArg::from(policy.training.device),
            };
            let server_name = match server_name {
                Some(name) => name,
                None => server_host(&server)?,
            };
            let data = match data {
                Some(data) => data,
                None => match &policy.data {
                    quorum_policies::config::site::DataSource::Path(p) => p.display().to_string(),
                    quorum_policies::config::site::DataSource::Builtin(f) => format!("builtin:{f}"),
                    _ => anyhow::bail!("site.toml names a data source this client cannot read"),
                },
            };
            let mut participant =
                TchParticipant::new(data, device.resolve()?, seed, validation_blocks);
            if let Some(record) = policy.record_dp {
                participant = participant.with_record_dp(PrivateTraining::from_policy(&record));
            }
            let opts = SiteOptions {
                bundle,
                policy,
                server,
                server_name,
                exit_after_rounds,
                reconnect_for: std::time::Duration::from_secs(reconnect_for),
                pause_before,
                accept_roster_change,
                metrics_listen,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            let summary = runtime.block_on(session::run(opts, participant))?;
            let record_level = summary
                .record_level_epsilon
                .map_or(String::new(), |e| format!(", record-level ε {e:.3}"));
            println!(
                "site done: {} rounds contributed, {} declined, ε spent {:.3}{record_level}, last validation loss {}, {:.1} MB uploaded",
                summary.rounds,
                summary.declined.len(),
                summary.epsilon,
                summary
                    .last_val_loss
                    .map_or("-".into(), |l| format!("{l:.4}")),
                summary.upload_bytes as f64 / 1e6
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::InitModel {
            preset,
            out,
            seed,
            tokenizer,
        } => {
            let cfg = ModelConfig::preset(&preset, tokenizer.vocab_size())?;
            let bytes = checkpoint::init_checkpoint(&cfg, seed)?;
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{} -> {}", cfg.describe(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Train {
            init,
            data,
            steps,
            batch_size,
            seq_len,
            lr,
            warmup,
            eval_every,
            curve,
            device,
        } => {
            let bytes =
                std::fs::read(&init).with_context(|| format!("cannot read {}", init.display()))?;
            let (model_cfg, _) = checkpoint::decode(&bytes)?;
            let tokenizer = Tokenizer::for_vocab(model_cfg.vocab_size)?;
            let train_cfg = TrainConfig {
                batch_size,
                seq_len,
                lr,
                warmup_steps: warmup,
                total_steps: steps,
                ..TrainConfig::default()
            };
            let mut trainer = LocalTrainer::new(model_cfg, train_cfg, device.resolve()?, 0)?;
            trainer.load_global(&bytes)?;
            let mut sites = data
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    Ok(BlockStream::new(
                        TextSource::open(spec)?,
                        tokenizer,
                        seq_len,
                        i as u64,
                    ))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            // The same validation blocks the sites use, pooled.
            let mut val = Vec::new();
            for site in &sites {
                val.extend(site.validation_blocks(16)?);
            }
            let points = train_centralized(
                &mut trainer,
                &mut sites,
                steps,
                eval_every,
                &val,
                |tokens, loss| {
                    eprintln!("centralized: {tokens} tokens, validation loss {loss:.4}");
                },
            )?;
            let json: Vec<serde_json::Value> = points
                .iter()
                .map(|(tokens, loss)| serde_json::json!({ "tokens": tokens, "val_loss": loss }))
                .collect();
            std::fs::write(&curve, serde_json::to_vec_pretty(&json)?)?;
            println!("curve -> {}", curve.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::PlanRecordDp {
            data,
            seq_len,
            expected_batch,
            steps,
            epsilon,
            delta,
            tokenizer,
        } => {
            let stream = BlockStream::new(TextSource::open(&data)?, tokenizer, seq_len, 0);
            let records = stream.training_blocks()?.len();
            let sampling_rate = expected_batch / records as f64;
            if !(sampling_rate > 0.0 && sampling_rate <= 1.0) {
                anyhow::bail!(
                    "--expected-batch must be between 0 and the {records} training sequences"
                );
            }
            if delta * records as f64 >= 1.0 {
                anyhow::bail!(
                    "--delta {delta} is not below 1 / {records} records; choose a smaller one"
                );
            }
            let sigma = quorum_policies::rdp::noise_multiplier_for(epsilon, delta, sampling_rate, steps)
                .with_context(|| {
                    format!("no noise multiplier up to 1000 reaches ε = {epsilon} over {steps} steps; sample fewer sequences or train fewer steps")
                })?;
            eprintln!(
                "{records} training sequences of {seq_len} tokens in {data}: sampling rate \
                 {sampling_rate:.3e} draws {expected_batch} a step on average; noise multiplier \
                 {sigma:.4} keeps ε ≤ {epsilon} at δ = {delta} over {steps} steps"
            );
            println!(
                "[record_dp]\nunit = \"sequence\"\nsampling_rate = {sampling_rate:.6e}\n\
                 noise_multiplier = {sigma:.4}\nclip_norm = 1.0\nmax_epsilon = {epsilon}\n\
                 delta = {delta:e}"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::ExportHf { checkpoint, out } => {
            let bytes = std::fs::read(&checkpoint)
                .with_context(|| format!("cannot read {}", checkpoint.display()))?;
            hf::export_hf(&bytes, &out)?;
            println!("Hugging Face folder -> {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen {
            federation,
            site,
            out,
        } => {
            let request = quorum_attest::pki::request_site(&federation, &site, &out)?;
            println!("key:     {} (keep it here)", request.key_path.display());
            println!(
                "request: {} (send it to the authority)",
                request.csr_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Renew { bundle } => {
            let request = quorum_attest::pki::renew_site_request(&bundle)?;
            println!("key:     {} (unchanged)", request.key_path.display());
            println!(
                "request: {} (send it to the authority; install the site.pem it returns)",
                request.csr_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Fingerprint { bundle } => {
            let identity = quorum_attest::SiteIdentity::load(&bundle)?;
            let key = quorum_attest::key_fingerprint(identity.certificate_der())?;
            println!("{} = \"{}\"", identity.site(), hex::encode(key));
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Check { config }) => {
            let policy = quorum_policies::load_site(&config)?;
            if let quorum_policies::config::site::DataSource::Path(path) = &policy.data
                && !path.exists()
            {
                anyhow::bail!(
                    "{} parses, but data.path = {} is not there",
                    config.display(),
                    path.display()
                );
            }
            println!(
                "{}: ok (site '{}' of federation '{}', max ε {} at δ {}, min cohort {})",
                config.display(),
                policy.site.name,
                policy.site.federation,
                policy.policy.max_epsilon,
                policy.policy.delta.get(),
                policy.policy.min_cohort
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { log, command } => quorum_audit::cli::run(&log, command),
    }
}

/// The host part of `HOST:PORT` (`[v6]:PORT` too): the name the aggregator's certificate is
/// checked against unless `--server-name` says otherwise.
fn server_host(server: &str) -> anyhow::Result<String> {
    let host = match server.strip_prefix('[') {
        Some(rest) => rest.split_once("]:").map(|(host, _)| host),
        None => server.rsplit_once(':').map(|(host, _)| host),
    };
    match host {
        Some(host) if !host.is_empty() => Ok(host.to_owned()),
        _ => {
            anyhow::bail!("--server {server:?} is not HOST:PORT (for example agg.example.org:7443)")
        }
    }
}

/// Parses `--pause-before`: a SecAgg+ phase by its one name (see `Phase::name`).
fn phase_name(name: &str) -> Result<Phase, String> {
    name.parse()
        .map_err(|e: quorum_crypto::secagg::UnknownPhase| e.to_string())
}
