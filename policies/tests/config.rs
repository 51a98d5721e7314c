//! federation.toml and site.toml: defaults, the shipped examples, and every error path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quorum_policies::config::federation::OuterOptimizer;
use quorum_policies::config::site::{DataSource, Device};
use quorum_policies::{
    ConfigError, FederationPolicy, SiteIncompatible, SiteLimits, SitePolicy, epsilon_from_rho,
    federation_from_str, load_federation, load_site, site_from_str,
};

const KEY_HEX: &str = "e5bf6d7325656183e8bdfa178a6bc31cf0044ece324ed64bb35c02f4480685f6";

/// Smallest valid federation.toml, with `extra` appended.
fn federation(extra: &str) -> String {
    format!(
        "[federation]\nname = \"fed\"\n\n[server]\nca = \"ca.pem\"\ncert = \"s.pem\"\n\
         key = \"s.key\"\ncrl = \"crl.pem\"\n\n[releases]\ntrusted_keys = [\"{KEY_HEX}\"]\n{extra}"
    )
}

/// Smallest valid site.toml, with `extra` appended.
fn site(extra: &str) -> String {
    format!(
        "[site]\nfederation = \"fed\"\nname = \"site-a\"\n\n[policy]\nmax_epsilon = 4.0\n\n\
         [data]\npath = \"builtin:tiny\"\n{extra}"
    )
}

fn fed_err(text: &str) -> ConfigError {
    federation_from_str(text, "federation.toml").expect_err("config must be refused")
}

fn site_err(text: &str) -> ConfigError {
    site_from_str(text, "site.toml").expect_err("config must be refused")
}

/// Asserts a validation error names `key` and says `reason` (a substring).
#[track_caller]
fn assert_invalid(err: &ConfigError, file: &str, key: &str, reason: &str) {
    match err {
        ConfigError::ValueInvalid {
            file: f, key: k, ..
        } => {
            assert_eq!((f.as_str(), k.as_str()), (file, key), "{err}");
        }
        other => panic!("expected ValueInvalid for {key}, got {other:?}"),
    }
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{file}: key '{key}': ")),
        "{shown}"
    );
    assert!(shown.contains(reason), "{shown:?} lacks {reason:?}");
}

/// Asserts a schema error names `key` at `line` and its message contains `message`.
#[track_caller]
fn assert_schema(err: &ConfigError, key: &str, line: usize, message: &str) {
    match err {
        ConfigError::SchemaMismatch {
            key: k,
            line: l,
            message: m,
            ..
        } => {
            assert_eq!((k.as_str(), *l), (key, line), "{err}");
            assert!(m.contains(message), "{m:?} lacks {message:?}");
        }
        other => panic!("expected SchemaMismatch for {key}, got {other:?}"),
    }
    assert!(err.to_string().contains(&format!("key '{key}'")), "{err}");
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

// ---- examples and defaults ----

#[test]
fn example_federation_toml_parses_with_its_documented_values() {
    let dir = examples();
    let fed = load_federation(&dir.join("federation.toml")).unwrap();
    assert_eq!(fed.federation.name, "example-federation");
    assert_eq!(fed.federation.min_clients, 8);
    // The layout `quorum-aggregator pki init --out pki` writes.
    assert_eq!(fed.server.ca, dir.join("pki/ca/ca.pem"));
    assert_eq!(fed.server.crl, Some(dir.join("pki/ca/crl.pem")));
    assert_eq!(fed.server.cert, dir.join("pki/server/server.pem"));
    assert_eq!(fed.training.total_steps, 5000);
    assert_eq!(
        fed.outer,
        OuterOptimizer::Nesterov {
            lr: 0.7,
            momentum: 0.7
        }
    );
    assert_eq!(fed.releases.trusted_keys[0][0], 0xe5);
    assert_eq!(fed.releases.allowed_versions, ["0.1.0"]);
    assert_eq!(fed.privacy.noise_stddev(), 3.0);
}

#[test]
fn example_site_toml_parses_with_its_documented_values() {
    let dir = examples();
    let site = load_site(&dir.join("site.toml")).unwrap();
    assert_eq!(site.site.federation, "example-federation");
    assert_eq!(site.policy.max_epsilon, 8.0);
    assert_eq!(site.policy.delta.get(), 1e-6);
    assert_eq!(site.data, DataSource::Path(dir.join("data/corpus.jsonl")));
    assert_eq!(site.ledger_path(), dir.join("state/privacy-ledger.json"));
    assert_eq!(site.audit_dir(), dir.join("state/audit"));
    assert!(!site.policy.plain_mode_allowed());
}

#[test]
fn example_record_level_table_uncommented_parses_with_its_documented_values() {
    let text = std::fs::read_to_string(examples().join("site.toml")).unwrap();
    let (head, tail) = text.split_once("# [record_dp]").unwrap();
    let keys = tail.lines().filter_map(|line| {
        let setting = line.strip_prefix("# ")?;
        let (key, _) = setting.split_once(" = ")?;
        key.chars()
            .all(|c| c.is_ascii_lowercase() || c == '_')
            .then_some(setting)
    });
    let table: Vec<&str> = std::iter::once("[record_dp]").chain(keys).collect();
    let site = site_from_str(&format!("{head}{}\n", table.join("\n")), "site.toml").unwrap();
    let record = site.record_dp.expect("the table is read");
    assert_eq!(table.len(), 7, "{table:?}");
    assert_eq!(record.unit.name(), "sequence");
    assert_eq!(
        (
            record.sampling_rate,
            record.noise_multiplier,
            record.clip_norm
        ),
        (0.001, 0.8, 1.0)
    );
    assert_eq!((record.max_epsilon, record.delta.get()), (8.0, 1e-6));
}

#[test]
fn examples_agree_with_each_other() {
    let dir = examples();
    let fed = load_federation(&dir.join("federation.toml")).unwrap();
    let site = load_site(&dir.join("site.toml")).unwrap();
    assert_eq!(fed.federation.name, site.site.federation);
    assert_eq!(fed.check_site(&SiteLimits::from(&site)), Ok(()));
    // The example site can take part in every round: each costs about 1/(2z²) in zCDP, scaled
    // by n/(n - colluders) where the site assumes colluders add no noise; 10 % on top for the
    // discretisation.
    let n = f64::from(fed.federation.min_clients);
    let colluders = (site.policy.corrupt_fraction * n).ceil();
    let z = fed.privacy.noise_multiplier;
    let per_round = 1.0 / (2.0 * z * z) * n / (n - colluders) * 1.1;
    let rho = per_round * f64::from(fed.federation.rounds);
    let epsilon = epsilon_from_rho(rho, site.policy.delta);
    assert!(
        epsilon <= site.policy.max_epsilon,
        "the example site would decline: ε ≈ {epsilon:.2} over {} rounds, cap {}",
        fed.federation.rounds,
        site.policy.max_epsilon
    );
}

#[test]
fn missing_crl_is_refused_unless_revocation_is_explicitly_off() {
    let without = federation("").replace("crl = \"crl.pem\"\n", "");
    assert_invalid(
        &fed_err(&without),
        "federation.toml",
        "server.crl",
        "set require_revocation = false",
    );
    let opted_out = without.replace("[server]\n", "[server]\nrequire_revocation = false\n");
    let fed = federation_from_str(&opted_out, "federation.toml").unwrap();
    assert_eq!(fed.server.crl, None);
}

#[test]
fn minimal_federation_gets_the_documented_defaults() {
    let fed = federation_from_str(&federation(""), "federation.toml").unwrap();
    assert_eq!(fed.federation.rounds, 10);
    assert_eq!(fed.federation.max_clients, 8);
    assert_eq!(
        fed.server.listen,
        "127.0.0.1:7443".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(fed.server.state_dir, PathBuf::from("state"));
    assert_eq!(fed.server.crl, Some(PathBuf::from("crl.pem")));
    assert_eq!(fed.training.total_steps, 10 * 500);
    assert_eq!(fed.training.warmup_steps, 500);
    assert!(fed.training.reset_local_optimizer);
    assert_eq!(fed.outer.lr(), 0.7);
    assert!(fed.secure_aggregation.enabled);
    assert_eq!(fed.secure_aggregation.modulus_bits, 32);
    assert_eq!(
        fed.secure_aggregation.phase_timeout,
        Duration::from_secs(300)
    );
    assert!(fed.privacy.enabled);
    assert_eq!(fed.privacy.delta.get(), 1e-6);
    assert!(fed.releases.require_attestation);
}

/// A federation.toml whose `[federation]` and `[server]` tables end with the given keys.
fn federation_with(federation_keys: &str, server_keys: &str) -> String {
    format!(
        "[federation]\nname = \"fed\"\n{federation_keys}\n\n[server]\nca = \"ca.pem\"\n\
         cert = \"s.pem\"\nkey = \"s.key\"\ncrl = \"crl.pem\"\n{server_keys}\n\n[secure_aggregation]\n\
         phase_timeout_secs = 10\n\n[releases]\ntrusted_keys = [\"{KEY_HEX}\"]\n"
    )
}

#[test]
fn round_pacing_keys_have_documented_defaults_and_ranges() {
    let fed = federation_from_str(&federation(""), "federation.toml").unwrap();
    // Twice the default phase timeout of 300 s.
    assert_eq!(fed.federation.cohort_timeout, Duration::from_secs(600));
    assert_eq!(fed.federation.max_round_attempts, 3);
    assert_eq!(fed.server.upload_slots, 8);

    let derived = federation_from_str(&federation_with("", ""), "f.toml").unwrap();
    assert_eq!(derived.federation.cohort_timeout, Duration::from_secs(20));
    let set = federation_with(
        "cohort_timeout_secs = 45\nmax_round_attempts = 7",
        "upload_slots = 4",
    );
    let fed = federation_from_str(&set, "f.toml").unwrap();
    assert_eq!(fed.federation.cohort_timeout, Duration::from_secs(45));
    assert_eq!(fed.federation.max_round_attempts, 7);
    assert_eq!(fed.server.upload_slots, 4);

    for (federation_keys, server_keys, key) in [
        (
            "cohort_timeout_secs = 0",
            "",
            "federation.cohort_timeout_secs",
        ),
        (
            "max_round_attempts = 0",
            "",
            "federation.max_round_attempts",
        ),
        ("", "upload_slots = 0", "server.upload_slots"),
        ("", "upload_slots = 5000", "server.upload_slots"),
    ] {
        let text = federation_with(federation_keys, server_keys);
        assert_invalid(&fed_err(&text), "federation.toml", key, "must be");
    }
}

#[test]
fn total_steps_derive_from_rounds_and_local_steps() {
    let fed = federation_from_str(
        &federation("[training]\nlocal_steps = 7\n")
            .replace("name = \"fed\"", "name = \"fed\"\nrounds = 3"),
        "federation.toml",
    )
    .unwrap();
    assert_eq!(fed.training.total_steps, 21);
    assert_eq!(fed.training.warmup_steps, 2);
}

#[test]
fn outer_optimizers_take_their_own_defaults() {
    let parse = |body: &str| {
        federation_from_str(&federation(&format!("[outer]\n{body}")), "federation.toml")
            .unwrap()
            .outer
    };
    assert_eq!(
        parse("optimizer = \"fedavg\""),
        OuterOptimizer::FedAvg { lr: 1.0 }
    );
    assert_eq!(
        parse("optimizer = \"fedmom\"\nlr = 0.5"),
        OuterOptimizer::FedMom {
            lr: 0.5,
            momentum: 0.9
        }
    );
    assert_eq!(
        parse("optimizer = \"fedadam\"\nbeta2 = 0.999"),
        OuterOptimizer::FedAdam {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-3
        }
    );
}

#[test]
fn relative_paths_follow_the_file_and_absolute_ones_stay() {
    let text = federation("[model]\ninitial_checkpoint = \"/abs/init.safetensors\"\n");
    let fed = federation_from_str(&text, "/etc/quorum/federation.toml").unwrap();
    assert_eq!(fed.server.ca, PathBuf::from("/etc/quorum/ca.pem"));
    assert_eq!(
        fed.model.initial_checkpoint,
        Some(PathBuf::from("/abs/init.safetensors"))
    );
}

// ---- federation.toml errors ----

#[test]
fn unknown_key_is_named_with_its_line() {
    let text = federation("[privacy]\nclip_norm = 1.0\nnoise_multiplyer = 2.0\n");
    let line = text
        .lines()
        .position(|l| l.starts_with("noise_multiplyer"))
        .unwrap()
        + 1;
    let err = fed_err(&text);
    assert_schema(
        &err,
        "privacy.noise_multiplyer",
        line,
        "unknown field `noise_multiplyer`",
    );
    assert!(err.to_string().starts_with("federation.toml: "), "{err}");
}

#[test]
fn unknown_section_is_named() {
    let text = federation("[extras]\nx = 1\n");
    let line = text.lines().position(|l| l == "[extras]").unwrap() + 1;
    assert_schema(&fed_err(&text), "extras", line, "unknown field `extras`");
}

#[test]
fn wrong_type_is_named_with_its_line() {
    let text = federation("").replace("name = \"fed\"", "name = \"fed\"\nrounds = \"ten\"");
    assert_schema(
        &fed_err(&text),
        "federation.rounds",
        3,
        "invalid type: string",
    );
}

#[test]
fn missing_required_keys_and_sections_are_named() {
    let no_name = federation("").replace("name = \"fed\"\n", "");
    assert_schema(
        &fed_err(&no_name),
        "federation.name",
        1,
        "missing field `name`",
    );
    let no_server = "[federation]\nname = \"fed\"\n";
    let err = fed_err(no_server);
    assert!(
        matches!(&err, ConfigError::SchemaMismatch { key, .. } if key == "server"),
        "{err:?}"
    );
}

#[test]
fn syntax_error_reports_line_and_column() {
    let text = federation("[training]\nlr = = 3\n");
    let line = text.lines().position(|l| l == "lr = = 3").unwrap() + 1;
    let err = fed_err(&text);
    match &err {
        ConfigError::SyntaxInvalid {
            file,
            line: l,
            column,
            ..
        } => {
            assert_eq!(
                (file.as_str(), *l, *column),
                ("federation.toml", line, 6),
                "{err}"
            );
        }
        other => panic!("expected SyntaxInvalid, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&format!("line {line}, column 6")),
        "{err}"
    );
}

#[test]
fn modulus_bits_out_of_range_are_refused() {
    for bits in [7, 33, -8] {
        let err = fed_err(&federation(&format!(
            "[secure_aggregation]\nmodulus_bits = {bits}\n"
        )));
        assert_invalid(
            &err,
            "federation.toml",
            "secure_aggregation.modulus_bits",
            &format!("must be in 8..=32 (got {bits})"),
        );
    }
    for bits in [8, 32] {
        let text = federation(&format!("[secure_aggregation]\nmodulus_bits = {bits}\n"));
        assert!(
            federation_from_str(&text, "federation.toml").is_ok(),
            "{bits}"
        );
    }
}

#[test]
fn out_of_range_values_are_refused_with_key_and_value() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[secure_aggregation]\ncorrupt_fraction = 1.0",
            "secure_aggregation.corrupt_fraction",
            "must be in [0, 1) (got 1)",
        ),
        (
            "[secure_aggregation]\ndropout_fraction = -0.1",
            "secure_aggregation.dropout_fraction",
            "(got -0.1)",
        ),
        (
            "[secure_aggregation]\nphase_timeout_secs = 0",
            "secure_aggregation.phase_timeout_secs",
            "must be >= 1 (got 0)",
        ),
        (
            "[privacy]\ndelta = 0.0",
            "privacy.delta",
            "must be in (0, 1) (got 0)",
        ),
        (
            "[privacy]\nnoise_multiplier = 0",
            "privacy.noise_multiplier",
            "must be > 0 (got 0)",
        ),
        (
            "[privacy]\nclip_norm = -1.5",
            "privacy.clip_norm",
            "must be > 0 (got -1.5)",
        ),
        (
            "[training]\nlr = -0.001",
            "training.lr",
            "must be > 0 (got -0.001)",
        ),
        (
            "[training]\nlocal_steps = 0",
            "training.local_steps",
            "must be >= 1 (got 0)",
        ),
        (
            "[training]\nbatch_size = 5000000000",
            "training.batch_size",
            "got 5000000000",
        ),
        (
            "[training]\nwarmup_steps = 11\ntotal_steps = 10",
            "training.warmup_steps",
            "must be <= training.total_steps = 10 (got 11)",
        ),
        (
            "[outer]\noptimizer = \"sgd\"",
            "outer.optimizer",
            "(got \"sgd\")",
        ),
        (
            "[outer]\nmomentum = 1.0",
            "outer.momentum",
            "must be in [0, 1) (got 1)",
        ),
        (
            "[outer]\nbeta1 = 0.9",
            "outer.beta1",
            "does not apply to outer.optimizer = \"nesterov\"",
        ),
        (
            "[outer]\noptimizer = \"fedavg\"\nmomentum = 0.5",
            "outer.momentum",
            "does not apply",
        ),
        (
            "[outer]\noptimizer = \"fedadam\"\neps = 0",
            "outer.eps",
            "must be > 0 (got 0)",
        ),
    ];
    for (extra, key, reason) in cases {
        assert_invalid(&fed_err(&federation(extra)), "federation.toml", key, reason);
    }
}

#[test]
fn cohort_bounds_depend_on_secure_aggregation() {
    let with =
        |body: &str| federation("").replace("name = \"fed\"", &format!("name = \"fed\"\n{body}"));
    assert_invalid(
        &fed_err(&with("min_clients = 1")),
        "federation.toml",
        "federation.min_clients",
        "must be >= 2 (got 1)",
    );
    let plain = with("min_clients = 1") + "[secure_aggregation]\nenabled = false\n";
    assert_eq!(
        federation_from_str(&plain, "federation.toml")
            .unwrap()
            .federation
            .min_clients,
        1
    );
    assert_invalid(
        &fed_err(&with("min_clients = 4\nmax_clients = 3")),
        "federation.toml",
        "federation.max_clients",
        "must be >= federation.min_clients = 4 (got 3)",
    );
}

#[test]
fn names_are_restricted_to_a_safe_alphabet() {
    let text = federation("").replace("name = \"fed\"", "name = \"fed one\"");
    assert_invalid(
        &fed_err(&text),
        "federation.toml",
        "federation.name",
        "\"fed one\"",
    );
}

#[test]
fn listen_address_must_parse() {
    let text = federation("").replace("[server]\n", "[server]\nlisten = \"localhost\"\n");
    assert_invalid(
        &fed_err(&text),
        "federation.toml",
        "server.listen",
        "(got \"localhost\"",
    );
}

#[test]
fn metrics_endpoint_must_be_on_loopback() {
    let with = |address: &str| {
        federation("").replace(
            "[server]\n",
            &format!("[server]\nmetrics_listen = \"{address}\"\n"),
        )
    };
    let fed = federation_from_str(&with("127.0.0.1:9464"), "federation.toml").unwrap();
    assert_eq!(
        fed.server.metrics_listen,
        Some("127.0.0.1:9464".parse::<SocketAddr>().unwrap())
    );
    assert_invalid(
        &fed_err(&with("0.0.0.0:9464")),
        "federation.toml",
        "server.metrics_listen",
        "must be a loopback address",
    );
    assert_eq!(
        federation_from_str(&federation(""), "federation.toml")
            .unwrap()
            .server
            .metrics_listen,
        None
    );
}

#[test]
fn release_keys_must_be_hex_and_present_under_attestation() {
    let short = federation("").replace(KEY_HEX, "abcd");
    assert_invalid(
        &fed_err(&short),
        "federation.toml",
        "releases.trusted_keys[0]",
        "must be 64 hex digits",
    );
    // RFC 8032's test key: its private key is published, so it vouches for nothing.
    let published = federation("").replace(
        KEY_HEX,
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    );
    assert_invalid(
        &fed_err(&published),
        "federation.toml",
        "releases.trusted_keys[0]",
        "RFC 8032 test key",
    );
    let none = federation("").replace(&format!("\"{KEY_HEX}\""), "");
    assert_invalid(
        &fed_err(&none),
        "federation.toml",
        "releases.trusted_keys",
        "require_attestation = true",
    );
    let unattested = none.replace(
        "trusted_keys = []",
        "trusted_keys = []\nrequire_attestation = false",
    );
    assert!(federation_from_str(&unattested, "federation.toml").is_ok());
    let empty_version = federation("allowed_versions = [\"0.1.0\", \" \"]\n");
    assert_invalid(
        &fed_err(&empty_version),
        "federation.toml",
        "releases.allowed_versions[1]",
        "must not be empty",
    );
}

#[test]
fn missing_federation_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere/federation.toml");
    let err = load_federation(&path).unwrap_err();
    assert!(matches!(err, ConfigError::FileUnreadable { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(err.key(), None);
}

// ---- site.toml errors ----

#[test]
fn minimal_site_gets_the_documented_defaults() {
    let site = site_from_str(&site(""), "site.toml").unwrap();
    assert_eq!(site.site.name, "site-a");
    assert_eq!(site.policy.min_cohort, 3);
    assert!(site.policy.require_secure_aggregation);
    assert!(!site.policy.allow_plain_mode);
    assert!(site.policy.require_dp);
    assert_eq!(site.data, DataSource::Builtin("tiny".into()));
    assert_eq!(site.training.device, Device::Auto);
    assert_eq!(site.storage.state_dir, PathBuf::from("state"));
}

#[test]
fn negative_epsilon_message_names_file_key_and_value() {
    let err = site_err(&site("").replace("max_epsilon = 4.0", "max_epsilon = -1"));
    assert_eq!(
        err.to_string(),
        "site.toml: key 'policy.max_epsilon': must be > 0 (got -1)"
    );
    assert_eq!(err.key(), Some("policy.max_epsilon"));
}

#[test]
fn site_values_out_of_range_are_refused() {
    let policy =
        |body: &str| site("").replace("max_epsilon = 4.0", &format!("max_epsilon = 4.0\n{body}"));
    assert_invalid(
        &site_err(&policy("delta = 1.5")),
        "site.toml",
        "policy.delta",
        "must be in (0, 1) (got 1.5)",
    );
    assert_invalid(
        &site_err(&policy("min_cohort = 0")),
        "site.toml",
        "policy.min_cohort",
        "must be >= 1 (got 0)",
    );
    assert_invalid(
        &site_err(&policy("allow_plain_mode = true")),
        "site.toml",
        "policy.allow_plain_mode",
        "contradicts policy.require_secure_aggregation = true",
    );
    assert_invalid(
        &site_err(&site("[training]\ndevice = \"tpu\"\n")),
        "site.toml",
        "training.device",
        "(got \"tpu\")",
    );
    assert_invalid(
        &site_err(&site("").replace("builtin:tiny", "builtin:")),
        "site.toml",
        "data.path",
        "builtin flavour",
    );
    assert_invalid(
        &site_err(&site("").replace("builtin:tiny", "")),
        "site.toml",
        "data.path",
        "must not be empty",
    );
    assert_invalid(
        &site_err(&site("").replace("site-a", "")),
        "site.toml",
        "site.name",
        "1 to 64 characters",
    );
    assert_invalid(
        &site_err(&site("[storage]\nstate_dir = \"\"\n")),
        "site.toml",
        "storage.state_dir",
        "must not be empty",
    );
}

#[test]
fn plain_mode_needs_both_site_settings() {
    let text = site("").replace(
        "max_epsilon = 4.0",
        "max_epsilon = 4.0\nrequire_secure_aggregation = false\nallow_plain_mode = true",
    );
    assert!(
        site_from_str(&text, "site.toml")
            .unwrap()
            .policy
            .plain_mode_allowed()
    );
    let only_one = site("").replace(
        "max_epsilon = 4.0",
        "max_epsilon = 4.0\nrequire_secure_aggregation = false",
    );
    assert!(
        !site_from_str(&only_one, "site.toml")
            .unwrap()
            .policy
            .plain_mode_allowed()
    );
}

#[test]
fn site_schema_errors_name_the_key() {
    let text = site("").replace("max_epsilon = 4.0", "max_epsilon = 4.0\nmax_epsilom = 5.0");
    assert_schema(&site_err(&text), "policy.max_epsilom", 7, "unknown field");
    let text = site("").replace("max_epsilon = 4.0", "max_epsilon = \"lots\"");
    assert_schema(
        &site_err(&text),
        "policy.max_epsilon",
        6,
        "invalid type: string",
    );
    let text = site("").replace("max_epsilon = 4.0\n", "");
    assert_schema(
        &site_err(&text),
        "policy.max_epsilon",
        5,
        "missing field `max_epsilon`",
    );
    let text = site("").replace("[data]\npath = \"builtin:tiny\"\n", "");
    let err = site_err(&text);
    assert!(
        matches!(&err, ConfigError::SchemaMismatch { key, .. } if key == "data"),
        "{err:?}"
    );
}

#[test]
fn missing_site_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.toml");
    let err = load_site(&path).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("cannot read"), "{err}");
}

// ---- federation-side check of a site ----

fn limits(require_secure_aggregation: bool, require_dp: bool, min_cohort: u32) -> SiteLimits {
    SiteLimits {
        max_epsilon: 4.0,
        min_cohort,
        require_secure_aggregation,
        require_dp,
    }
}

fn fed_with(extra: &str) -> FederationPolicy {
    federation_from_str(&federation(extra), "federation.toml").unwrap()
}

#[test]
fn plain_mode_runs_only_when_federation_and_site_both_allow_it() {
    let masked = fed_with("");
    let plain = fed_with("[secure_aggregation]\nenabled = false\n");
    assert_eq!(masked.check_site(&limits(true, true, 3)), Ok(()));
    assert_eq!(masked.check_site(&limits(false, true, 3)), Ok(()));
    assert_eq!(
        plain.check_site(&limits(true, true, 3)),
        Err(SiteIncompatible::SecureAggregationRequired)
    );
    assert_eq!(plain.check_site(&limits(false, true, 3)), Ok(()));
}

#[test]
fn site_limits_carry_the_effective_plain_mode_setting() {
    let strict = SitePolicy::from_toml_str(&site(""), "site.toml").unwrap();
    assert!(SiteLimits::from(&strict).require_secure_aggregation);
    let relaxed = site("").replace(
        "max_epsilon = 4.0",
        "max_epsilon = 4.0\nrequire_secure_aggregation = false\nallow_plain_mode = true\nrequire_dp = false",
    );
    let relaxed = SiteLimits::from(&SitePolicy::from_toml_str(&relaxed, "site.toml").unwrap());
    assert!(!relaxed.require_secure_aggregation);
    assert!(!relaxed.require_dp);
    let plain_no_dp =
        fed_with("[secure_aggregation]\nenabled = false\n[privacy]\nenabled = false\n");
    assert_eq!(plain_no_dp.check_site(&relaxed), Ok(()));
}

#[test]
fn dp_off_and_unreachable_cohorts_are_incompatible() {
    let no_dp = fed_with("[privacy]\nenabled = false\n");
    assert_eq!(
        no_dp.check_site(&limits(true, true, 3)),
        Err(SiteIncompatible::DpRequired)
    );
    assert_eq!(no_dp.check_site(&limits(true, false, 3)), Ok(()));
    let err = fed_with("").check_site(&limits(true, true, 9)).unwrap_err();
    assert_eq!(
        err,
        SiteIncompatible::CohortUnreachable {
            min_cohort: 9,
            max_clients: 8
        }
    );
    assert!(err.to_string().contains("at least 9") && err.to_string().contains("is 8"));
}

// ---- writing files ----

/// The example files read into their file types and written back validate to the same
/// policies: what the demo, the load generator and the tests write is what operators write.
#[test]
fn example_files_survive_a_round_trip_through_their_types() {
    use quorum_policies::config::{federation::FederationFile, site::SiteFile};
    let dir = examples();
    let fed_path = dir.join("federation.toml");
    let fed_file: FederationFile =
        toml::from_str(&std::fs::read_to_string(&fed_path).unwrap()).unwrap();
    let written = fed_file.to_toml();
    let reread = federation_from_str(&written, &fed_path.display().to_string()).unwrap();
    assert_eq!(reread, load_federation(&fed_path).unwrap());

    let site_path = dir.join("site.toml");
    let site_file: SiteFile =
        toml::from_str(&std::fs::read_to_string(&site_path).unwrap()).unwrap();
    let written = site_file.to_toml();
    let mut reread = site_from_str(&written, &site_path.display().to_string()).unwrap();
    let loaded = load_site(&site_path).unwrap();
    // The texts differ (comments, layout), so their digests do; the policies must not.
    assert_ne!(reread.source_sha256, loaded.source_sha256);
    reread.source_sha256 = loaded.source_sha256;
    assert_eq!(reread, loaded);
    // Keys left out stay out, so their documented defaults apply.
    assert!(!SiteFile::default().to_toml().contains("device"));
}
