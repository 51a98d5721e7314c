//! Who may connect: a certificate from another CA, no certificate, TLS 1.2 and a revoked site
//! are all refused at the TLS layer, while a valid site certificate is served.

use std::{fs, path::Path, process::Command, time::Duration};

use rustls::version::{TLS12, TLS13};

use crate::{
    raw::{ClientCert, Outcome, block_on, client_config, probe},
    support::{Federation, Spec, binary, must, poll, records, release, run, s},
};

fn site_cert(
    fed: &Federation,
    sites: &str,
    site: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        fed.path(&format!("{sites}/{site}/site.pem")),
        fed.path(&format!("{sites}/{site}/site.key")),
    )
}

fn probe_as(fed: &Federation, cert: Option<(&Path, &Path)>) -> Outcome {
    let config = client_config(
        &fed.path("pki/ca/ca.pem"),
        cert.map(|(cert, key)| ClientCert { cert, key }),
        &[&TLS13],
    );
    block_on(probe(&fed.address(), config))
}

fn assert_refused(outcome: Outcome, what: &str) -> String {
    match outcome {
        Outcome::Refused(reason) => reason,
        Outcome::Served => panic!("{what} was served"),
    }
}

#[test]
fn mtls_refusals() {
    let fed = Federation::new(Spec::new(&["alpha", "beta"]));
    let mut aggregator = fed.start_aggregator("aggregator");
    let (alpha_cert, alpha_key) = site_cert(&fed, "sites", "alpha");
    let (beta_cert, beta_key) = site_cert(&fed, "sites", "beta");

    // Control: a valid site certificate gets an HTTP/2 answer.
    let served = probe_as(&fed, Some((&alpha_cert, &alpha_key)));
    assert!(matches!(served, Outcome::Served), "valid site: {served:?}");

    // No client certificate: the TLS 1.3 handshake looks done, the first read fails.
    let reason = assert_refused(probe_as(&fed, None), "a client without certificate");
    assert!(
        reason.to_lowercase().contains("certificate"),
        "no-certificate refusal should say so: {reason}"
    );

    // TLS 1.2 only, even with a valid certificate.
    let config = client_config(
        &fed.path("pki/ca/ca.pem"),
        Some(ClientCert {
            cert: &alpha_cert,
            key: &alpha_key,
        }),
        &[&TLS12],
    );
    let reason = assert_refused(block_on(probe(&fed.address(), config)), "a TLS 1.2 client");
    assert!(reason.starts_with("handshake"), "TLS 1.2: {reason}");

    // A certificate from another CA of a federation with the same name and site name.
    let agg = binary("quorum-aggregator");
    must(run(
        &agg,
        &[
            "pki",
            "init",
            "--federation",
            crate::support::FEDERATION,
            "--out",
            "other-pki",
        ],
        fed.dir.path(),
    ));
    crate::support::enroll(
        &fed.path("other-pki/ca"),
        &fed.path("other-sites"),
        crate::support::FEDERATION,
        "alpha",
    );
    let (other_cert, other_key) = site_cert(&fed, "other-sites", "alpha");
    // (The server names the failure in its audit log; the alert the client sees depends on
    // where webpki stops, e.g. a bad signature by the look-alike issuer.)
    assert_refused(
        probe_as(&fed, Some((&other_cert, &other_key))),
        "a certificate from another CA",
    );
    // The real client with that bundle trusts the other CA, so it refuses the aggregator too.
    let mut foreign = fed.client_command("alpha", &crate::support::release().client, 5);
    replace_arg(&mut foreign, "sites/alpha", "other-sites/alpha");
    let mut foreign = fed.spawn("foreign-alpha", foreign);
    let status = foreign.wait(Duration::from_secs(60));
    assert!(!status.success(), "client with a foreign bundle succeeded");
    let stderr = foreign.stderr_text().to_lowercase();
    assert!(
        stderr.contains("certificate") || stderr.contains("tls"),
        "foreign bundle error should name the certificate problem:\n{stderr}"
    );

    // Revocation takes effect on the next connection, without a restart.
    let served = probe_as(&fed, Some((&beta_cert, &beta_key)));
    assert!(
        matches!(served, Outcome::Served),
        "beta before revocation: {served:?}"
    );
    revoke_with_the_authority(&fed, "beta");
    // Both acts are on the authority's record, each followed by a signed head, and so is the
    // release the sites run.
    let acts = admin_actions(&agg, &fed.path("pki/ca/audit"));
    assert_eq!(
        acts.first().map(String::as_str),
        Some("pki_init"),
        "{acts:?}"
    );
    assert!(
        acts.ends_with(&["pki_revoke".to_owned(), "pki_crl".to_owned()]),
        "{acts:?}"
    );
    // The bundle tests of this process may append their `release_bundle` meanwhile.
    let release_log = release().client.with_file_name("release-audit");
    let releases = admin_actions(&agg, &release_log);
    assert!(
        releases.starts_with(&["release_keygen".to_owned(), "release_sign".to_owned()]),
        "{releases:?}"
    );
    let reason = assert_refused(
        probe_as(&fed, Some((&beta_cert, &beta_key))),
        "a revoked site",
    );
    assert!(
        reason.to_lowercase().contains("revoked"),
        "revocation refusal should say revoked: {reason}"
    );
    let mut revoked = fed.start_client("beta");
    let status = revoked.wait(Duration::from_secs(60));
    assert!(!status.success(), "revoked client succeeded");
    let stderr = revoked.stderr_text();
    assert!(
        stderr.contains("refused this site's TLS connection") && stderr.contains("revoked"),
        "revoked client should be told it was refused:\n{stderr}"
    );
    // alpha is still welcome.
    let served = probe_as(&fed, Some((&alpha_cert, &alpha_key)));
    assert!(
        matches!(served, Outcome::Served),
        "alpha after revoking beta: {served:?}"
    );

    openssl_checks(&fed, &alpha_cert, &alpha_key);

    // The aggregator audited the refused handshakes. They are reported after the connection is
    // closed and announced on stderr once audited: wait for them before stopping it.
    poll(
        "the handshake refusals to be audited",
        Duration::from_secs(60),
        || {
            let stderr = aggregator.stderr_text();
            (stderr.matches(" refused: ").count() >= 4 && stderr.to_lowercase().contains("revoked"))
                .then_some(())
        },
    );
    aggregator.kill();
    let refusals = fed.refusal_reasons();
    assert!(
        refusals
            .iter()
            .any(|r| r.to_lowercase().contains("revoked")),
        "no audited revocation refusal in {refusals:?}"
    );
    assert!(
        refusals.len() >= 4,
        "expected the handshake refusals to be audited: {refusals:?}"
    );
}

#[test]
fn crl_a_site_revoked_while_connected_is_no_ones_secagg_peer() {
    // delta joins, then the authority revokes it; its session stays open. The aggregator
    // checks every connected site's certificate against the new CRL before it draws a cohort,
    // so delta is left out (audited) and never offered a round. The offer carries the new
    // list: alpha, beta and gamma check it and keep it, and complete the round without delta.
    // (A delta offered a round by a careless or hostile aggregator declines, or, pressing on,
    // is refused by every peer: `sim_crl_*`.)
    let mut spec = Spec::new(&["alpha", "beta", "gamma", "delta"]);
    (spec.rounds, spec.dp, spec.min_clients) = (1, false, 3);
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let mut delta = fed.start_client("delta");
    aggregator.wait_for_stderr("delta joined", Duration::from_secs(60));
    revoke_with_the_authority(&fed, "delta");
    let mut others: Vec<_> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|site| fed.start_client(site))
        .collect();
    aggregator.wait_success(Duration::from_secs(240));
    for site in &mut others {
        site.wait_success(Duration::from_secs(60));
    }
    delta.wait(Duration::from_secs(60));

    let all = fed.aggregator_records();
    for offer in records(&all, "cohort_selected", None) {
        let cohort = &offer["details"]["cohort"];
        assert_eq!(
            *cohort,
            serde_json::json!(["alpha", "beta", "gamma"]),
            "{offer}"
        );
    }
    let completed = records(&all, "round_completed", Some(1));
    let survivors = &completed.first().expect("round 1 completed")["details"]["survivors"];
    assert_eq!(*survivors, serde_json::json!(["alpha", "beta", "gamma"]));
    let left_out: Vec<String> = fed
        .refusal_reasons()
        .into_iter()
        .filter(|r| r.contains("delta is left out of every cohort"))
        .collect();
    assert_eq!(left_out.len(), 1, "{left_out:?}");
    assert!(left_out[0].contains("revoked"), "{left_out:?}");
    for site in ["alpha", "beta", "gamma"] {
        let site_log = fed.site_records(site);
        let adopted = records(&site_log, "revocation_list", None);
        let numbers: Vec<_> = adopted
            .iter()
            .map(|r| {
                (
                    r["details"]["crl_number"].clone(),
                    r["details"]["revoked"].clone(),
                )
            })
            .collect();
        assert_eq!(
            numbers,
            [(serde_json::json!("2"), serde_json::json!(1))],
            "{site} adopts list 2 once and keeps it"
        );
        let kept = fed.path(&format!("{site}-state/revocation.crl"));
        assert!(
            fs::metadata(&kept).is_ok_and(|m| m.len() > 0),
            "{site} kept no list"
        );
    }
    let delta_log = fed.site_records("delta");
    assert!(
        records(&delta_log, "cohort_selected", None).is_empty(),
        "delta was offered a round"
    );
}

/// `pki revoke` of `site` and a fresh `pki crl` in place, as the authority runs them; the
/// aggregator re-reads the CRL without a restart.
fn revoke_with_the_authority(fed: &Federation, site: &str) {
    let agg = binary("quorum-aggregator");
    must(run(
        &agg,
        &["pki", "revoke", "--ca", "pki/ca", site],
        fed.dir.path(),
    ));
    let crl = ["pki", "crl", "--ca", "pki/ca", "--out", "pki/ca/crl.pem"];
    must(run(&agg, &crl, fed.dir.path()));
}

fn replace_arg(command: &mut Command, from: &str, to: &str) {
    let args: Vec<String> = command
        .get_args()
        .map(|a| {
            let a = a.to_string_lossy();
            if a == from {
                to.to_owned()
            } else {
                a.into_owned()
            }
        })
        .collect();
    let mut fresh = Command::new(command.get_program());
    fresh.args(args);
    *command = fresh;
}

/// `openssl s_client` sees the same: no certificate gets a "certificate required" alert, a
/// valid one a verified TLS 1.3 session with ALPN h2 that stays open.
fn openssl_checks(fed: &Federation, cert: &Path, key: &Path) {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl is not installed; skipping the s_client checks");
        return;
    }
    let preface = fed.path("h2-preface.bin");
    fs::write(&preface, crate::raw::H2_PREFACE).expect("write preface");
    // OpenSSL 3.0 cannot read the PKCS#8 v2 keys the PKI writes; give it the v1 form.
    let v1_key = fed.path("alpha-v1.key");
    fs::write(&v1_key, pkcs8_v1(key)).expect("write key");
    let s_client = |with_cert: bool, seconds: &str| {
        let mut args = vec![
            seconds.to_owned(),
            "openssl".into(),
            "s_client".into(),
            "-connect".into(),
            fed.address(),
            "-tls1_3".into(),
            "-alpn".into(),
            "h2".into(),
            "-servername".into(),
            "localhost".into(),
            "-CAfile".into(),
            "pki/ca/ca.pem".into(),
            "-ign_eof".into(),
        ];
        if with_cert {
            args.extend([
                "-cert".into(),
                cert.display().to_string(),
                "-key".into(),
                v1_key.display().to_string(),
            ]);
        }
        let output = Command::new("timeout")
            .args(&args)
            .current_dir(fed.dir.path())
            .stdin(fs::File::open(&preface).expect("preface"))
            .output()
            .expect("run openssl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code(), text)
    };
    let (code, text) = s_client(false, "10");
    assert_eq!(code, Some(1), "s_client without a certificate:\n{text}");
    assert!(
        text.contains("alert certificate required"),
        "s_client without a certificate:\n{text}"
    );
    // With a certificate the session stays open until `timeout` ends it (exit 124).
    let (code, text) = s_client(true, "10");
    assert_eq!(code, Some(124), "s_client with a certificate:\n{text}");
    for expected in ["Verify return code: 0 (ok)", "ALPN protocol: h2", "TLSv1.3"] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
}

/// The RFC 8410 PKCS#8 v1 PEM of an Ed25519 key given as PKCS#8 (v1 or v2) PEM.
fn pkcs8_v1(key: &Path) -> String {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    let der = PrivateKeyDer::from_pem_file(key).expect("read key");
    let der = der.secret_der();
    // The seed is the OCTET STRING wrapped in the privateKey OCTET STRING: 04 22 04 20 <32>.
    let at = der
        .windows(4)
        .position(|w| w == [0x04, 0x22, 0x04, 0x20])
        .expect("Ed25519 PKCS#8 key");
    let mut v1 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    v1.extend_from_slice(&der[at + 4..at + 36]);
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64(&v1)
    )
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `action` of every `admin_action` record in the log at `log`, after checking that the log
/// verifies.
fn admin_actions(agg: &Path, log: &Path) -> Vec<String> {
    let verified = must(run(
        agg,
        &["audit", "--log", s(log), "verify"],
        log.parent().unwrap(),
    ));
    assert!(verified.starts_with("ok:"), "{verified}");
    let export = must(run(
        agg,
        &["audit", "--log", s(log), "export"],
        log.parent().unwrap(),
    ));
    export
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|record| record["kind"] == "admin_action")
        .map(|record| record["details"]["action"].as_str().unwrap().to_owned())
        .collect()
}
