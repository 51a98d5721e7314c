//! Enrolment by certificate signing request: a site's key is born in the site's folder and
//! never reaches the authority, which signs a request and hands back only a certificate; keys
//! Quorum writes are read by standard tools, and keys and requests standard tools write are
//! accepted by Quorum.

use std::{path::Path, time::Duration};

use quorum_attest::{PeerVerifier, SiteIdentity};

use crate::support::{FEDERATION, Federation, Spec, binary, heavy, must, release, run, s};

/// `quorum-client keygen` for `site` of `federation` into `out`, run in `root`.
fn keygen(root: &Path, federation: &str, site: &str, out: &str) {
    let args = [
        "keygen",
        "--federation",
        federation,
        "--site",
        site,
        "--out",
        out,
    ];
    must(run(&release().client, &args, root));
}

/// `quorum-aggregator pki sign` of `folder/site.csr` into `folder`, run in `root`.
fn sign(root: &Path, folder: &str) -> std::process::Output {
    let csr = format!("{folder}/site.csr");
    let args = [
        "pki", "sign", "--ca", "pki/ca", "--csr", &csr, "--out", folder,
    ];
    run(&binary("quorum-aggregator"), &args, root)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("readable folder") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn enroll_by_csr_with_the_real_commands_then_join_and_complete_a_round() {
    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta"]);
    spec.rounds = 1;
    let fed = Federation::new(spec);
    let root = fed.dir.path();
    // alpha enrols again, with the commands a site and its authority run.
    std::fs::remove_dir_all(root.join("sites/alpha")).expect("remove alpha's first bundle");
    keygen(root, FEDERATION, "alpha", "sites/alpha");
    let signed = must(sign(root, "sites/alpha"));
    assert!(signed.contains("certificate for site alpha"), "{signed}");
    // The CA is held by a separate authority: its keys leave the aggregator's folder before the
    // aggregator runs, which needs only the CA certificate, the CRL and its server certificate.
    let authority = tempfile::tempdir().expect("the authority's folder");
    for key in ["ca.key", "audit.key"] {
        std::fs::rename(root.join("pki/ca").join(key), authority.path().join(key))
            .expect("move the authority's key out");
    }

    let (aggregator, _sites) = fed.run_to_end(Duration::from_secs(300));
    assert!(
        aggregator.stderr_text().contains("alpha joined"),
        "{}",
        aggregator.describe()
    );
    let state = fed.state().expect("state.json");
    let history = state["history"].as_array().expect("history");
    assert_eq!(
        history[0]["survivors"],
        serde_json::json!(["alpha", "beta"])
    );

    // What the aggregator holds is its server key alone: no site's, and not the CA's (the
    // authority's CA and audit keys are elsewhere).
    let mut keys: Vec<String> = files_under(&root.join("pki"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .map(|p| p.strip_prefix(root).expect("inside").display().to_string())
        .collect();
    keys.sort();
    assert_eq!(keys, ["pki/server/server.key"], "{keys:?}");
    // And `pki init` no longer speaks of site keys.
    let help = must(run(
        &binary("quorum-aggregator"),
        &["pki", "init", "--help"],
        root,
    ));
    assert!(
        !help.contains("--sites") && !help.contains("site key"),
        "{help}"
    );
}

#[test]
fn csr_naming_another_federation_is_refused_at_signing() {
    let fed = Federation::new(Spec::new(&["alpha"]));
    let root = fed.dir.path();
    keygen(root, "another", "mallory", "mallory");
    let refused = sign(root, "mallory");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("asks for federation 'another', but this CA is for 'e2e'"),
        "{stderr}"
    );
    assert!(!root.join("mallory/site.pem").exists());
}

#[test]
fn interop_keys_and_requests_cross_openssl_python_and_quorum() {
    let fed = Federation::new(Spec::new(&["alpha"]));
    let root = fed.dir.path();
    let key = root.join("sites/alpha/site.key");
    // OpenSSL 3.0 reads the key Quorum wrote (it refuses ring's PKCS#8 v2).
    if which("openssl") {
        must(run(
            Path::new("openssl"),
            &["pkey", "-in", s(&key), "-noout"],
            root,
        ));
    } else {
        eprintln!("openssl is not installed; skipping the OpenSSL checks");
    }
    // Python's `cryptography` too.
    let python = "import sys\n\
                  from cryptography.hazmat.primitives.serialization import load_pem_private_key\n\
                  load_pem_private_key(open(sys.argv[1], 'rb').read(), None)\n";
    let probe = run(Path::new("python3"), &["-c", "import cryptography"], root);
    if probe.status.success() {
        must(run(Path::new("python3"), &["-c", python, s(&key)], root));
    } else {
        eprintln!("python3 has no `cryptography` module; skipping the Python check");
    }
    if !which("openssl") {
        return;
    }
    // A site that makes its key and request with OpenSSL alone is signed and can sign SecAgg+
    // messages its peers verify.
    std::fs::create_dir_all(root.join("gamma")).expect("gamma's folder");
    must(run(
        Path::new("openssl"),
        &["genpkey", "-algorithm", "ed25519", "-out", "gamma/site.key"],
        root,
    ));
    let san = format!("subjectAltName=URI:urn:quorum:federation:{FEDERATION}:site:gamma");
    let subject = format!("/CN=gamma/O={FEDERATION}");
    must(run(
        Path::new("openssl"),
        &[
            "req",
            "-new",
            "-key",
            "gamma/site.key",
            "-subj",
            &subject,
            "-addext",
            &san,
            "-out",
            "gamma/site.csr",
        ],
        root,
    ));
    let sign = [
        "pki",
        "sign",
        "--ca",
        "pki/ca",
        "--csr",
        "gamma/site.csr",
        "--out",
        "gamma",
    ];
    must(run(&binary("quorum-aggregator"), &sign, root));
    std::fs::set_permissions(
        root.join("gamma/site.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let gamma = SiteIdentity::load(&root.join("gamma")).expect("Quorum loads OpenSSL's key");
    let verifier = PeerVerifier::new(&fed.path("pki/ca/ca.pem"), FEDERATION, None).expect("CA");
    let signature = gamma.sign(b"round 1 keys");
    verifier
        .verify_signed(
            "gamma",
            gamma.certificate_der(),
            b"round 1 keys",
            &signature,
        )
        .expect("a peer verifies gamma's signature");
}

fn which(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn csr_renewal_keeps_the_key_and_is_on_both_records() {
    // alpha starts once (no aggregator runs: it gives up after 1 s), renews its certificate
    // for the same key, the authority signs it and revokes the old one by serial, and alpha
    // starts again: both acts are on the authority's record, the change on alpha's.
    let fed = Federation::new(Spec::new(&["alpha"]));
    let root = fed.dir.path();
    let client = &release().client;
    let start = || {
        let mut site = fed.spawn("alpha", fed.client_command("alpha", client, 1));
        assert!(
            !site.wait(Duration::from_secs(60)).success(),
            "no aggregator"
        );
        site.stderr_text()
    };
    start();
    let old = SiteIdentity::load(&fed.path("sites/alpha")).expect("alpha's bundle");
    let renewed = must(run(client, &["renew", "--bundle", "sites/alpha"], root));
    assert!(renewed.contains("(unchanged)"), "{renewed}");
    must(run(
        &binary("quorum-aggregator"),
        &[
            "pki",
            "sign",
            "--ca",
            "pki/ca",
            "--csr",
            "sites/alpha/site.csr",
            "--out",
            "renewed",
        ],
        root,
    ));
    std::fs::copy(
        fed.path("renewed/site.pem"),
        fed.path("sites/alpha/site.pem"),
    )
    .expect("install the renewed certificate");
    let serial = old.identity().serial_hex.clone();
    must(run(
        &binary("quorum-aggregator"),
        &["pki", "revoke", "--ca", "pki/ca", &serial],
        root,
    ));
    let stderr = start();
    assert!(
        stderr.contains("certificate changed since the last start")
            && stderr.contains("same key: roster lines stay valid"),
        "{stderr}"
    );
    let new = SiteIdentity::load(&fed.path("sites/alpha")).expect("renewed bundle");
    assert_eq!(
        quorum_attest::key_fingerprint(new.certificate_der()).unwrap(),
        quorum_attest::key_fingerprint(old.certificate_der()).unwrap()
    );

    let log = fed.site_records("alpha");
    let changes = crate::support::records(&log, "admin_action", None);
    assert_eq!(changes.len(), 1, "{changes:?}");
    let details = &changes[0]["details"];
    assert_eq!(details["action"], "certificate_changed");
    assert_eq!(details["from_serial"], serial.as_str());
    assert_eq!(details["to_serial"], new.identity().serial_hex.as_str());
    assert_eq!(details["key_kept"], true);
    let authority = must(run(
        &binary("quorum-aggregator"),
        &["audit", "--log", "pki/ca/audit", "export"],
        root,
    ));
    let acts: Vec<String> = authority
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|r| r["kind"] == "admin_action")
        .map(|r| {
            r["details"]["action"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert!(
        acts.ends_with(&["pki_sign".to_owned(), "pki_revoke".to_owned()]),
        "{acts:?}"
    );
}
