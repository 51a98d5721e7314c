//! `quorum-aggregator`: runs a federation and administers its PKI, releases and audit log.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use quorum_aggregator::{
    admin_log::{self, AdminLog},
    policy_check, report, server,
};
use serde_json::json;

/// Quorum aggregator: runs secure federated pre-training rounds over mTLS.
///
/// Typical first use:
///   quorum-aggregator pki init --federation demo --out pki
///   (each site: quorum-client keygen --federation demo --site alpha --out alpha; it sends
///    alpha/site.csr)
///   quorum-aggregator pki sign --ca pki/ca --csr alpha.csr --out issued/alpha
///   quorum-aggregator policy check --config federation.toml
///   quorum-aggregator serve --config federation.toml
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

#[derive(Subcommand)]
enum Command {
    /// Run the federation in `federation.toml` until its last round, then print a summary.
    Serve {
        /// The operator's federation configuration.
        #[arg(long, default_value = "federation.toml")]
        config: PathBuf,
    },
    /// Write a federation.toml for the PKI that `pki init` made, from the documented example
    /// (every key keeps its explanation; edit the rest there).
    Init {
        /// Federation name, as in `pki init --federation`; sites name it in their site.toml.
        #[arg(long)]
        federation: String,
        /// The folder `pki init --out` wrote, as the new file should name it (relative to the
        /// file's own folder, or absolute).
        #[arg(long, default_value = "pki")]
        pki: String,
        /// Address to listen on: 0.0.0.0:PORT for every interface, or one address sites reach.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: String,
        /// Sites per round (min_clients and max_clients).
        #[arg(long, default_value_t = 3)]
        sites: u32,
        /// The release public key file (`release keygen --out KEY` writes KEY.pub).
        #[arg(long)]
        release_key: PathBuf,
        /// Allowed client versions (repeat); none allows any version the key signed.
        #[arg(long = "allowed-version")]
        allowed_versions: Vec<String>,
        /// Where to write it; an existing file is never replaced.
        #[arg(long, default_value = "federation.toml")]
        out: PathBuf,
    },
    /// Certificate authority: create it, issue certificates, revoke them.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Sign and verify client releases.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Validate configuration files without running anything.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Inspect the aggregator's tamper-evident audit log.
    Audit {
        /// The audit log folder (default: <state_dir>/audit).
        #[arg(long, default_value = "state/audit")]
        log: PathBuf,
        #[command(subcommand)]
        command: quorum_audit::cli::AuditCommand,
    },
    /// Draw validation loss against tokens (PNG) and write a markdown table from a state folder.
    Report {
        /// The aggregator's state folder.
        #[arg(long, default_value = "state")]
        state: PathBuf,
        /// Output folder for report.md and loss.png.
        #[arg(long, default_value = "report")]
        out: PathBuf,
        /// A centralized baseline curve (JSON from `quorum-client train`) to draw alongside.
        #[arg(long)]
        baseline: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA, its (empty) CRL and the aggregator's certificate, for the names and
    /// addresses sites will reach it by (default localhost and 127.0.0.1). Each site makes its
    /// own key and request with `quorum-client keygen`.
    Init {
        /// Federation name, written into every certificate.
        #[arg(long)]
        federation: String,
        /// Output folder (ca/, server/).
        #[arg(long)]
        out: PathBuf,
        /// A DNS name sites use to reach the aggregator (repeatable); the first is the
        /// certificate's common name.
        #[arg(long = "server-name", default_value = "localhost")]
        server_names: Vec<String>,
        /// An IP address sites use to reach the aggregator (repeatable).
        #[arg(long = "server-ip", default_value = "127.0.0.1")]
        server_ips: Vec<std::net::IpAddr>,
    },
    /// Issue a server certificate for the given DNS names or IP addresses.
    IssueServer {
        /// The CA folder made by `pki init`.
        #[arg(long)]
        ca: PathBuf,
        /// Names the certificate is valid for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        names: Vec<String>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Sign a site's certificate signing request (`quorum-client keygen` makes it at the site).
    /// Checks that it names one site of this federation and carries a key the site signed it
    /// with (Ed25519, ECDSA P-256 or RSA 2048-4096); writes site.pem, ca.pem and README.md to
    /// hand back. No site key is involved.
    Sign {
        /// The CA folder.
        #[arg(long)]
        ca: PathBuf,
        /// The site's request (site.csr).
        #[arg(long)]
        csr: PathBuf,
        /// Folder for the certificate to return.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke every certificate of a site, or one certificate by serial; then run `pki crl`.
    Revoke {
        /// The CA folder.
        #[arg(long)]
        ca: PathBuf,
        /// Site name or serial (hex).
        target: String,
    },
    /// Write the signed CRL; the server reloads it on the next connection.
    Crl {
        /// The CA folder.
        #[arg(long)]
        ca: PathBuf,
        /// Output file (default: <ca>/crl.pem).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List issued certificates and their status.
    List {
        /// The CA folder.
        #[arg(long)]
        ca: PathBuf,
    },
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Create an Ed25519 release key (KEY, mode 0600) and its public half (KEY.pub).
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a client binary: writes <binary>.release.json.
    Sign(#[command(flatten)] ReleaseArgs),
    /// Build a release bundle a site can install anywhere: bin/ with the binary (its RUNPATH
    /// reduced to $ORIGIN/../lib), lib/ with every library it loads from outside the system's
    /// folders, and a manifest signing each file. Writes OUT/<name>-<version>-<arch>-linux.tar.gz.
    Bundle {
        #[command(flatten)]
        release: ReleaseArgs,
        /// Folder the archive is written to.
        #[arg(long, default_value = "dist")]
        out: PathBuf,
        /// Also ship LibTorch's CUDA backend and the NVIDIA libraries it needs (several GB),
        /// for sites that train on GPUs.
        #[arg(long)]
        cuda: bool,
    },
    /// Verify a release bundle (its .tar.gz, or the folder it was extracted to) or a binary
    /// against its signed manifest.
    Verify {
        /// The bundle to verify.
        #[arg(required_unless_present = "binary", conflicts_with = "binary")]
        bundle: Option<PathBuf>,
        /// A binary with its <binary>.release.json, instead of a bundle.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Trusted release public keys (hex, as in the key's .pub file).
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<String>,
        /// Allowed versions (any version the trusted keys signed when none is given).
        #[arg(long = "allowed-version")]
        allowed_versions: Vec<String>,
    },
}

/// What a release names: the binary (built in this tree, `make build`), its version and
/// commit, and the key that signs it.
#[derive(clap::Args)]
struct ReleaseArgs {
    /// The binary.
    #[arg(long)]
    binary: PathBuf,
    /// Release version.
    #[arg(long)]
    version: String,
    /// Source commit.
    #[arg(long, default_value = "unknown")]
    commit: String,
    /// Release key.
    #[arg(long)]
    key: PathBuf,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a federation.toml; errors name the file, the key and the reason. With the
    /// sites' site.toml files, also check that each can take part and say in which round its
    /// privacy budget would make it decline.
    Check {
        /// The file to check.
        #[arg(long, default_value = "federation.toml")]
        config: PathBuf,
        /// A site's site.toml (repeat for each site).
        #[arg(long = "site")]
        sites: Vec<PathBuf>,
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
        Command::Serve { config } => serve(config),
        Command::Pki(cmd) => pki(cmd),
        Command::Release(cmd) => release(cmd),
        Command::Init {
            federation,
            pki,
            listen,
            sites,
            release_key,
            allowed_versions,
            out,
        } => {
            let key = std::fs::read_to_string(&release_key).with_context(|| {
                format!("read the release public key {}", release_key.display())
            })?;
            let text =
                quorum_aggregator::init::federation_toml(&quorum_aggregator::init::InitChoices {
                    federation,
                    pki,
                    listen,
                    sites,
                    release_key: key.trim().to_owned(),
                    allowed_versions,
                })
                .map_err(anyhow::Error::msg)?;
            quorum_durable::create_new(&out, text.as_bytes(), quorum_durable::Mode::Public)
                .with_context(|| format!("create {} (an existing file is kept)", out.display()))?;
            let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
            let dir = dir.map_or_else(|| ".".into(), |d| d.display().to_string());
            println!("wrote {}; next, in {dir}:", out.display());
            println!("  quorum-client init-model --preset tiny --out initial.safetensors");
            println!("  quorum-aggregator audit keygen --out state/audit.key");
            println!(
                "  quorum-aggregator policy check --config {} --site <each site's site.toml>",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Check { config, sites }) => {
            let policy = quorum_policies::load_federation(&config)?;
            let server = &policy.server;
            let files = [
                ("server.ca", Some(&server.ca)),
                ("server.cert", Some(&server.cert)),
                ("server.key", Some(&server.key)),
                ("server.crl", server.crl.as_ref()),
                (
                    "model.initial_checkpoint",
                    policy.model.initial_checkpoint.as_ref(),
                ),
            ];
            let missing: Vec<String> = files
                .into_iter()
                .filter_map(|(key, path)| Some((key, path?)))
                .filter(|(_, path)| !path.exists())
                .map(|(key, path)| format!("  {key} = {}: no such file", path.display()))
                .collect();
            if !missing.is_empty() {
                anyhow::bail!(
                    "{} parses, but names files that are not there:\n{}",
                    config.display(),
                    missing.join("\n")
                );
            }
            let mut findings = policy_check::secure_aggregation(&policy);
            if !sites.is_empty() && findings.problems.is_empty() {
                let site_policies = sites
                    .iter()
                    .map(|path| quorum_policies::load_site(path))
                    .collect::<Result<Vec<_>, _>>()?;
                let parameters = initial_parameters(&policy)?;
                let checked = policy_check::sites(&policy, parameters, &site_policies);
                findings.problems.extend(checked.problems);
                findings.notes.extend(checked.notes);
            }
            if !findings.problems.is_empty() {
                anyhow::bail!(
                    "{} parses, but:\n  {}",
                    config.display(),
                    findings.problems.join("\n  ")
                );
            }
            for note in &findings.notes {
                println!("note: {note}");
            }
            println!(
                "{}: ok (federation '{}', {} rounds, {}-{} sites, secure aggregation {}, DP {})",
                config.display(),
                policy.federation.name,
                policy.federation.rounds,
                policy.federation.min_clients,
                policy.federation.max_clients,
                on_off(policy.secure_aggregation.enabled),
                on_off(policy.privacy.enabled),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { log, command } => quorum_audit::cli::run(&log, command),
        Command::Report {
            state,
            out,
            baseline,
        } => {
            let written = report::write(&state, &out, baseline.as_deref())?;
            for path in written {
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

fn serve(config: PathBuf) -> anyhow::Result<ExitCode> {
    // rustls needs a process-wide provider; Quorum pins ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let policy = quorum_policies::load_federation(&config)?;
    let text = std::fs::read(&config)?;
    let digest = hex::encode(quorum_aggregator::model_store::sha256(&text));
    let initial = policy.model.initial_checkpoint.clone().context(
        "federation.toml has no model.initial_checkpoint; create one with \
         `quorum-client init-model --preset tiny --out initial.safetensors`",
    )?;
    let model = std::fs::read(&initial)
        .with_context(|| format!("cannot read the initial model {}", initial.display()))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let history = runtime.block_on(server::serve(policy.clone(), digest, model))?;
    print!("{}", report::summary_table(&history));
    println!(
        "state, checkpoints and audit log: {}",
        policy.server.state_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Actor of the certificate authority's log.
const AUTHORITY: &str = "authority";
/// Actor of the release log.
const RELEASES: &str = "releases";

fn pki(cmd: PkiCommand) -> anyhow::Result<ExitCode> {
    use quorum_attest::pki;
    match cmd {
        PkiCommand::Init {
            federation,
            out,
            server_names,
            server_ips,
        } => {
            let ips: Vec<String> = server_ips.iter().map(ToString::to_string).collect();
            let names: Vec<&str> = server_names
                .iter()
                .chain(&ips)
                .map(String::as_str)
                .collect();
            let made = pki::init_federation_for(&federation, &out, &names)?;
            let log = admin_log::pki_log(&made.ca.dir);
            let (audit, fingerprint) = AdminLog::create(&log, AUTHORITY)?;
            let details = json!({ "federation": federation,
                "server": { "name": made.server.issued.name, "serial": made.server.issued.serial_hex } });
            audit.record("pki_init", details)?;
            println!("CA:      {}", made.ca.cert_path.display());
            println!("CRL:     {}", made.crl.path.display());
            println!("server:  {}", made.server.cert_path.display());
            println!("audit:   {} (key fingerprint {fingerprint})", log.display());
            println!(
                "sites enrol themselves: `quorum-client keygen --federation {federation} --site \
                 NAME --out DIR` at the site, then `quorum-aggregator pki sign --csr DIR/site.csr`"
            );
        }
        PkiCommand::IssueServer {
            ca,
            names,
            out,
            days,
        } => {
            let audit = AdminLog::open(&admin_log::pki_log(&ca), AUTHORITY)?;
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let cert = pki::issue_server(&ca, &names, &out, days)?;
            let details = json!({ "names": names, "serial": cert.issued.serial_hex, "days": days });
            audit.record("pki_issue_server", details)?;
            println!(
                "server certificate {} (serial {})",
                cert.cert_path.display(),
                cert.issued.serial_hex
            );
        }
        PkiCommand::Sign { ca, csr, out, days } => {
            let audit = AdminLog::open(&admin_log::pki_log(&ca), AUTHORITY)?;
            let bundle = pki::sign_site_request(&ca, &csr, &out, days)?;
            let request =
                std::fs::read(&csr).with_context(|| format!("cannot read {}", csr.display()))?;
            let details = json!({ "site": bundle.site, "serial": bundle.issued.serial_hex, "days": days,
                "csr_sha256": hex::encode(quorum_crypto::digest::sha256(&request)) });
            audit.record("pki_sign", details)?;
            println!(
                "certificate for site {} in {} (serial {}); return the folder to the site",
                bundle.site,
                bundle.dir.display(),
                bundle.issued.serial_hex
            );
        }
        PkiCommand::Revoke { ca, target } => {
            let audit = AdminLog::open(&admin_log::pki_log(&ca), AUTHORITY)?;
            let revoked = pki::revoke(&ca, &target)?;
            let serials: Vec<&str> = revoked.iter().map(|c| c.serial_hex.as_str()).collect();
            let details = json!({ "target": target, "serials": serials });
            audit.record("pki_revoke", details)?;
            for cert in revoked {
                println!("revoked {} (serial {})", cert.name, cert.serial_hex);
            }
            println!(
                "now run `quorum-aggregator pki crl --ca {}` to publish the CRL",
                ca.display()
            );
        }
        PkiCommand::Crl { ca, out } => {
            let out = out.unwrap_or_else(|| ca.join("crl.pem"));
            let audit = AdminLog::open(&admin_log::pki_log(&ca), AUTHORITY)?;
            let crl = pki::crl(&ca, &out)?;
            let details = json!({ "number": crl.number, "revoked": crl.revoked_serials,
                "path": crl.path.display().to_string() });
            audit.record("pki_crl", details)?;
            println!(
                "CRL #{} with {} revoked -> {}",
                crl.number,
                crl.revoked_serials.len(),
                crl.path.display()
            );
        }
        PkiCommand::List { ca } => {
            println!(
                "{:<8} {:<20} {:<34} {:<10}",
                "kind", "name", "serial", "status"
            );
            for cert in pki::list(&ca)? {
                let status = if cert.is_revoked() {
                    "revoked"
                } else {
                    "valid"
                };
                println!(
                    "{:<8} {:<20} {:<34} {status}",
                    format!("{:?}", cert.kind).to_lowercase(),
                    cert.name,
                    cert.serial_hex
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The parameter count of the federation's initial model, which the privacy cost of a round
/// depends on.
fn initial_parameters(policy: &quorum_policies::FederationPolicy) -> anyhow::Result<usize> {
    let path = policy.model.initial_checkpoint.as_ref().ok_or_else(|| {
        anyhow::anyhow!("model.initial_checkpoint is needed to cost the rounds for the sites")
    })?;
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let model = quorum_aggregator::model_store::FlatModel::from_safetensors(&bytes)
        .with_context(|| format!("{} is not a model checkpoint", path.display()))?;
    Ok(model.len())
}

fn release(cmd: ReleaseCommand) -> anyhow::Result<ExitCode> {
    use quorum_attest::release;
    match cmd {
        ReleaseCommand::Keygen { out } => {
            let log = admin_log::release_log(&out);
            let (audit, fingerprint) = AdminLog::create(&log, RELEASES)?;
            let key = release::generate_release_key(&out)?;
            let details = json!({ "public_key": key.public_key });
            audit.record("release_keygen", details)?;
            println!(
                "audit log {} (key fingerprint {fingerprint})",
                log.display()
            );
            println!(
                "release key {} (public key {})",
                key.key_path.display(),
                key.public_key
            );
        }
        ReleaseCommand::Sign(ReleaseArgs {
            binary,
            version,
            commit,
            key,
        }) => {
            let audit = AdminLog::open(&admin_log::release_log(&key), RELEASES)?;
            let signed = release::sign_release(&binary, &version, &commit, &key)?;
            let details = json!({ "version": signed.manifest.version, "commit": signed.manifest.commit,
                "binary_sha256": signed.manifest.binary_sha256, "name": signed.manifest.name });
            audit.record("release_sign", details)?;
            println!(
                "signed {} version {} sha256 {} -> {}",
                binary.display(),
                signed.manifest.version,
                signed.manifest.binary_sha256,
                quorum_attest::SignedRelease::path_for(&binary).display()
            );
        }
        ReleaseCommand::Bundle {
            release:
                ReleaseArgs {
                    binary,
                    version,
                    commit,
                    key,
                },
            out,
            cuda,
        } => {
            let audit = AdminLog::open(&admin_log::release_log(&key), RELEASES)?;
            let bundle =
                quorum_attest::bundle::build_bundle(&quorum_attest::bundle::BundleRequest {
                    binary: &binary,
                    version: &version,
                    commit: &commit,
                    key: &key,
                    out_dir: &out,
                    cuda,
                })?;
            let manifest = &bundle.release.manifest;
            let details = json!({ "version": manifest.version, "commit": manifest.commit,
                "binary_sha256": manifest.binary_sha256, "name": manifest.name,
                "libraries": manifest.libraries });
            audit.record("release_bundle", details)?;
            println!(
                "bundled {} version {} with {} libraries -> {}",
                manifest.name,
                manifest.version,
                manifest.libraries.len(),
                bundle.archive.display()
            );
        }
        ReleaseCommand::Verify {
            bundle,
            binary,
            trusted_keys,
            allowed_versions,
        } => {
            let manifest = match (bundle, binary) {
                (Some(bundle), _) => {
                    quorum_attest::bundle::verify_bundle(&bundle, &trusted_keys, &allowed_versions)?
                }
                (None, Some(binary)) => {
                    let signed = quorum_attest::SignedRelease::load(
                        &quorum_attest::SignedRelease::path_for(&binary),
                    )?;
                    release::verify_release(&signed, &binary, &trusted_keys, &allowed_versions)?
                }
                (None, None) => anyhow::bail!("name a bundle, or a binary with --binary"),
            };
            println!(
                "ok: {} version {} sha256 {} ({} libraries)",
                manifest.name,
                manifest.version,
                manifest.binary_sha256,
                manifest.libraries.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
