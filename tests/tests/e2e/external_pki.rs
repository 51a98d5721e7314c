//! Certificates from an institution's own PKI: the `openssl` commands of
//! `docs/EXTERNAL-PKI.md`, run block by block exactly as written, make a root, an issuing
//! intermediate, the aggregator's certificate, sites with ECDSA P-256, RSA and Ed25519 keys,
//! and CRLs; Quorum signs, verifies, revokes and runs a round with them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quorum_attest::{AttestError, KeyAlgorithm, PeerVerifier, SiteIdentity};

use crate::support::{FEDERATION, Federation, Spec, binary, heavy, must, records, run, s};

const GUIDE: &str = include_str!("../../../docs/EXTERNAL-PKI.md");

const ECDSA: &str = "# site: an ECDSA P-256 key";
const RSA: &str = "# site: or an RSA key";
const ED25519: &str = "# site: or an Ed25519 key";

/// The guide's shell block whose first line is `title`.
fn block(title: &str) -> &'static str {
    let mut found = GUIDE
        .split("```sh\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(code, _)| code))
        .filter(|code| code.lines().next() == Some(title));
    let code = found
        .next()
        .unwrap_or_else(|| panic!("docs/EXTERNAL-PKI.md has no block {title:?}"));
    assert!(found.next().is_none(), "two blocks titled {title:?}");
    code
}

/// Runs the guide's block `title` in `dir` after its names block, `names` (shell assignments
/// such as `SITE=beta`) in between.
fn run_block(dir: &Path, title: &str, names: &str) {
    let script = format!(
        "{}{names}\n{}",
        block("# both: names used below"),
        block(title)
    );
    let done = run(Path::new("bash"), &["-euo", "pipefail", "-c", &script], dir);
    assert!(
        done.status.success(),
        "block {title:?} failed (is openssl installed?):\n{}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// The authority's folder after the guide's authority blocks: root, issuing CA, first CRL
/// and the aggregator's certificate.
fn authority(dir: &Path, federation: &str) -> PathBuf {
    let authority = dir.join("institution-ca");
    fs::create_dir_all(&authority).expect("the authority's folder");
    let names = format!("FED={federation}");
    for title in [
        "# authority: a stand-in for the institution's root CA",
        "# authority: the federation's issuing CA",
        "# authority: the revocation database and the first CRL",
        "# authority: the aggregator's certificate",
    ] {
        run_block(&authority, title, &names);
    }
    authority
}

/// Enrols `site` as the guide says: key (`key_block`) and request in `folder`, the request to
/// the authority, which checks and signs it; the certificate and `ca.pem` back to `folder`.
fn enroll(authority: &Path, folder: &Path, federation: &str, site: &str, key_block: &str) {
    fs::create_dir_all(folder).expect("the site's folder");
    let names = format!("FED={federation}\nSITE={site}");
    run_block(folder, key_block, &names);
    run_block(folder, "# site: the certificate signing request", &names);
    let request = authority.join(format!("{site}.csr"));
    fs::copy(folder.join("site.csr"), request).expect("send the request");
    run_block(
        authority,
        "# authority: check and sign a site's request",
        &names,
    );
    fs::copy(
        authority.join(format!("{site}.pem")),
        folder.join("site.pem"),
    )
    .expect("send the certificate back");
    fs::copy(authority.join("ca.pem"), folder.join("ca.pem")).expect("send ca.pem");
}

/// The authority's current CRL in DER, as the aggregator relays it.
fn crl_der(authority: &Path) -> Vec<u8> {
    let der = authority.join("crl.der");
    let args = ["crl", "-in", "crl.pem", "-outform", "DER", "-out", s(&der)];
    must(run(Path::new("openssl"), &args, authority));
    fs::read(der).expect("crl.der")
}

#[test]
fn interop_external_pki_sites_of_every_key_kind_sign_verify_and_are_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let authority = authority(dir.path(), "demo");
    let ca = authority.join("ca.pem");
    let crl = authority.join("crl.pem");
    let aggregator = PeerVerifier::new(&ca, "demo", Some(&crl)).expect("the anchor is usable");
    let site_view = PeerVerifier::relayed(&ca, "demo", None).expect("a site's verifier");
    let adopted = site_view.adopt_revocation_list(&crl_der(&authority));
    assert_eq!(adopted.expect("list 1").expect("new").number, "1");

    let mut sites = Vec::new();
    for (site, key_block, algorithm) in [
        ("alpha", ECDSA, KeyAlgorithm::EcdsaP256),
        ("beta", RSA, KeyAlgorithm::Rsa),
        ("gamma", ED25519, KeyAlgorithm::Ed25519),
    ] {
        let folder = dir.path().join(site);
        enroll(&authority, &folder, "demo", site, key_block);
        let id = SiteIdentity::load(&folder).expect("the site loads its openssl-made bundle");
        assert_eq!(id.identity().key_algorithm, algorithm);
        let signature = id.sign(b"round 1 keys");
        for verifier in [&aggregator, &site_view] {
            let peer = verifier
                .verify_signed(site, id.certificate_der(), b"round 1 keys", &signature)
                .expect("a genuine signature verifies");
            assert_eq!(peer.site, site);
            let forged = verifier.verify_signed(site, id.certificate_der(), b"round 2", &signature);
            assert!(
                matches!(forged, Err(AttestError::PeerSignatureInvalid { .. })),
                "{forged:?}"
            );
        }
        sites.push(id);
    }
    // The openssl key files Quorum read are owner-only, as the guide's umask made them.
    quorum_attest::check_key_permissions(&dir.path().join("beta/site.key")).unwrap();

    // beta is revoked with the guide's commands: list 2.
    run_block(
        &authority,
        "# authority: revoke a certificate and publish a new CRL",
        "SITE=beta",
    );
    let adopted = site_view.adopt_revocation_list(&crl_der(&authority));
    assert_eq!(adopted.expect("list 2").expect("new").number, "2");
    for verifier in [&aggregator, &site_view] {
        for id in &sites {
            let checked = verifier.verify_certificate(id.certificate_der());
            if id.site() == "beta" {
                assert!(
                    matches!(checked, Err(AttestError::CertificateRevoked { .. })),
                    "{checked:?}"
                );
            } else {
                checked.expect("alpha and gamma stay members");
            }
        }
    }
}

#[test]
fn interop_openssl_intermediate_ecdsa_and_rsa_sites_join_and_complete_a_round() {
    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta"]);
    spec.rounds = 1;
    let fed = Federation::new(spec);
    let root = fed.dir.path();
    // The institution's PKI replaces every certificate Quorum's own authority made.
    let authority = authority(root, FEDERATION);
    for (from, to) in [
        ("ca.pem", "pki/ca/ca.pem"),
        ("crl.pem", "pki/ca/crl.pem"),
        ("server.pem", "pki/server/server.pem"),
        ("server.key", "pki/server/server.key"),
    ] {
        fs::copy(authority.join(from), root.join(to)).expect("install the institution's files");
    }
    for (site, key_block) in [("alpha", ECDSA), ("beta", RSA)] {
        let folder = root.join("sites").join(site);
        fs::remove_dir_all(&folder).expect("remove the first bundle");
        enroll(&authority, &folder, FEDERATION, site, key_block);
    }

    let (aggregator, _sites) = fed.run_to_end(Duration::from_secs(300));
    let log = aggregator.stderr_text();
    assert!(
        log.contains("alpha joined") && log.contains("beta joined"),
        "{}",
        aggregator.describe()
    );
    let state = fed.state().expect("state.json");
    assert_eq!(
        state["history"][0]["survivors"],
        serde_json::json!(["alpha", "beta"])
    );
    // Each site adopted the institution's CRL (number 1), relayed with the offer.
    for site in ["alpha", "beta"] {
        let log = fed.site_records(site);
        let adopted: Vec<_> = records(&log, "revocation_list", None)
            .iter()
            .map(|r| r["details"]["crl_number"].clone())
            .collect();
        assert_eq!(adopted, [serde_json::json!("1")], "{site}");
    }
}

#[test]
fn interop_quorum_authority_signs_ecdsa_and_rsa_requests_and_refuses_other_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let aggregator = binary("quorum-aggregator");
    let init = ["pki", "init", "--federation", "demo", "--out", "pki"];
    must(run(&aggregator, &init, root));
    let sign = |site: &str| {
        let csr = format!("{site}/site.csr");
        let args = [
            "pki", "sign", "--ca", "pki/ca", "--csr", &csr, "--out", site,
        ];
        run(&aggregator, &args, root)
    };
    let verifier = PeerVerifier::new(&root.join("pki/ca/ca.pem"), "demo", None).expect("CA");
    for (site, key_block) in [("alpha", ECDSA), ("beta", RSA)] {
        let folder = root.join(site);
        fs::create_dir_all(&folder).expect("the site's folder");
        let names = format!("FED=demo\nSITE={site}");
        run_block(&folder, key_block, &names);
        run_block(&folder, "# site: the certificate signing request", &names);
        must(sign(site));
        let id = SiteIdentity::load(&folder).expect("the site loads its bundle");
        verifier
            .verify_signed(site, id.certificate_der(), b"m", &id.sign(b"m"))
            .expect("a peer verifies the site's signature");
    }
    // A P-384 key is a valid request, but no key a site can sign SecAgg+ messages with.
    let folder = root.join("gamma");
    fs::create_dir_all(&folder).expect("gamma's folder");
    let p384 = [
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
    ];
    must(run(
        Path::new("openssl"),
        &[&p384[..], &["-out", "site.key"]].concat(),
        &folder,
    ));
    run_block(
        &folder,
        "# site: the certificate signing request",
        "FED=demo\nSITE=gamma",
    );
    let refused = sign("gamma");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("the key must be Ed25519, ECDSA P-256 or RSA"),
        "{stderr}"
    );
    assert!(!folder.join("site.pem").exists());
}
