//! Attestation at join: a modified client binary and a release version the federation does not
//! allow are refused, with the reason told to the site and written to the aggregator's log.

use std::{fs, time::Duration};

use crate::support::{Federation, Proc, Spec, release};

fn expect_refused(client: &mut Proc, needle: &str) -> String {
    let status = client.wait(Duration::from_secs(60));
    assert!(!status.success(), "a client that must be refused succeeded");
    let stderr = client.stderr_text();
    assert!(
        stderr.contains("the aggregator refused this site") && stderr.contains(needle),
        "expected a refusal naming {needle:?}:\n{stderr}"
    );
    stderr
}

#[test]
fn tampered_binary_is_refused() {
    let fed = Federation::new(Spec::new(&["alpha", "beta"]));
    let mut aggregator = fed.start_aggregator("aggregator");

    // A copy of the signed client with its manifest, one byte flipped near the end.
    let signed = &release().client;
    let dir = fed.path("tampered");
    fs::create_dir_all(&dir).expect("mkdir");
    let tampered = dir.join("quorum-client");
    fs::copy(signed, &tampered).expect("copy the client");
    fs::copy(
        quorum_attest::SignedRelease::path_for(signed),
        quorum_attest::SignedRelease::path_for(&tampered),
    )
    .expect("copy the manifest");
    let mut bytes = fs::read(&tampered).expect("read copy");
    let at = bytes.len() - 64;
    bytes[at] ^= 0x01;
    fs::write(&tampered, bytes).expect("write copy");

    let mut client = fed.spawn("tampered-alpha", fed.client_command("alpha", &tampered, 5));
    expect_refused(&mut client, "does not match signed release");

    // The untampered release of the same site is accepted (the refusal was the byte).
    let mut honest = fed.start_client("alpha");
    aggregator.wait_for_stderr("alpha joined: release", Duration::from_secs(60));
    honest.kill();
    aggregator.kill();
    let reasons = fed.refusal_reasons();
    assert!(
        reasons.iter().any(
            |r| r.contains("attestation failed") && r.contains("does not match signed release")
        ),
        "no audited attestation refusal in {reasons:?}"
    );
}

#[test]
fn disallowed_version_is_refused() {
    let mut spec = Spec::new(&["alpha", "beta"]);
    spec.allowed_versions = Some(vec!["999.0.0".into()]);
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let mut client = fed.start_client("alpha");
    expect_refused(&mut client, "is not allowed");
    aggregator.kill();
    let reasons = fed.refusal_reasons();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("attestation failed") && r.contains("999.0.0")),
        "no audited version refusal in {reasons:?}"
    );
}
