//! An operator's path: an aggregator reached by a name and an address that are not the
//! loopback defaults, and the client's start-up refusals that say what to change.

use std::time::Duration;

use crate::support::{Federation, Spec, free_port, heavy, poll, release};

#[test]
fn deploy_aggregator_on_another_address_and_name_serves_sites_that_name_it() {
    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta"]);
    spec.rounds = 1;
    spec.host = "127.0.0.2".into();
    spec.server_name = "agg.example.test".into();
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");

    // A site naming a host the certificate does not carry is told so, at once, not retried.
    let mut wrong = fed.client_command("alpha", &release().client, 60);
    wrong.args(["--server-name", "localhost"]);
    let mut wrong = fed.spawn("alpha-wrong-name", wrong);
    let status = wrong.wait(Duration::from_secs(30));
    assert!(!status.success(), "{}", wrong.describe());
    let said = wrong.stderr_text();
    assert!(
        said.contains("presented a certificate this site refuses")
            && said.contains("--server-name"),
        "{said}"
    );
    assert!(!said.contains("reconnecting"), "{said}");

    // alpha names it by address (the default: the host of --server), beta by its DNS name.
    let mut alpha = fed.start_client("alpha");
    let mut beta = fed.client_command("beta", &release().client, 5);
    beta.args(["--server-name", "agg.example.test"]);
    let mut beta = fed.spawn("beta", beta);
    aggregator.wait_success(Duration::from_secs(300));
    alpha.wait_success(Duration::from_secs(30));
    beta.wait_success(Duration::from_secs(30));
    let state = fed.state().expect("state.json");
    assert_eq!(
        state["history"][0]["survivors"],
        serde_json::json!(["alpha", "beta"])
    );
}

/// `GET path` over plain HTTP/1.1 on loopback: the status line's code and the body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

#[test]
fn metrics_endpoint_shows_the_phase_and_connected_sites_during_a_round() {
    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta"]);
    let port = free_port();
    spec.metrics_port = Some(port);
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let (code, health) = http_get(port, "/healthz").expect("healthz answers");
    assert_eq!(code, 200);
    let health: serde_json::Value = serde_json::from_str(&health).expect("healthz is JSON");
    assert_eq!(health["status"], "ok");
    assert_eq!(http_get(port, "/other").map(|(code, _)| code), Some(404));

    let mut sites = [fed.start_client("alpha"), fed.start_client("beta")];
    // Scrape while the federation runs: one scrape must show both sites connected and a round
    // in one of its phases.
    let in_round = poll("a scrape during a round", Duration::from_secs(120), || {
        let (_, text) = http_get(port, "/metrics")?;
        let phase = text.lines().find_map(|line| {
            let phase = line
                .strip_prefix("quorum_phase{phase=\"")?
                .strip_suffix("\"} 1")?;
            (!["idle", "waiting for sites"].contains(&phase)).then(|| phase.to_owned())
        })?;
        text.lines()
            .any(|l| l == "quorum_sites_connected 2")
            .then_some((phase, text))
    });
    let (phase, text) = in_round;
    assert!(text.contains("quorum_round "), "{text}");
    assert!(!phase.is_empty());
    aggregator.wait_success(Duration::from_secs(300));
    for site in &mut sites {
        site.wait_success(Duration::from_secs(30));
    }
}
