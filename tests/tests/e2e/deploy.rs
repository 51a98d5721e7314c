//! An operator's path: `init` and `policy check` against the sites' files, an aggregator
//! reached by a name and an address that are not the loopback defaults, and the client's
//! start-up refusals that say what to change.

use std::time::Duration;

use crate::support::{Federation, Spec, binary, free_port, heavy, must, poll, release, run};

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

    // alpha serves its own endpoint and logs JSON; beta writes timestamped text to its file.
    let site_port = free_port();
    let mut alpha = fed.client_command("alpha", &release().client, 5);
    alpha.args(["--metrics-listen", &format!("127.0.0.1:{site_port}")]);
    alpha.args(["--log-format", "json"]);
    let mut sites = [fed.spawn("alpha", alpha), fed.start_client("beta")];
    // A round is seconds long here: any scrape from the first offer on, while joined.
    let site_in_round = poll(
        "a scrape of alpha in a round",
        Duration::from_secs(120),
        || {
            let (_, text) = http_get(site_port, "/metrics")?;
            let in_round = text.lines().any(|l| l == "quorum_site_connected 1")
                && !text.lines().any(|l| l == "quorum_site_round 0");
            in_round.then_some(text)
        },
    );
    let phase = site_in_round.lines().find_map(|l| {
        l.strip_prefix("quorum_site_phase{phase=\"")?
            .strip_suffix("\"} 1")
    });
    assert!(
        matches!(
            phase,
            Some("waiting" | "evaluating" | "training" | "aggregating")
        ),
        "{site_in_round}"
    );
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
    // Every line alpha wrote is a JSON event; beta's lines begin with a UTC timestamp.
    let json = sites[0].stderr_text();
    let events: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("joined federation"))
            && e["timestamp"].is_string()),
        "{json}"
    );
    let text = sites[1].stderr_text();
    let joined = text
        .lines()
        .find(|l| l.contains("joined federation"))
        .unwrap_or_default();
    assert!(
        joined.starts_with("20") && joined.as_bytes().get(19) == Some(&b'Z'),
        "{text}"
    );
}

/// `policies/examples/site.toml` for `site` of federation `demo`, with the ε cap `max_epsilon`.
fn example_site(site: &str, max_epsilon: f64) -> String {
    let example = include_str!("../../../policies/examples/site.toml");
    example
        .lines()
        .map(|line| match line.split(" = ").next() {
            Some("federation") => "federation = \"demo\"".to_owned(),
            Some("name") => format!("name = \"{site}\""),
            Some("max_epsilon") => format!("max_epsilon = {max_epsilon:?}"),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn deploy_operator_init_then_policy_check_names_the_round_a_site_declines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (agg, client) = (binary("quorum-aggregator"), binary("quorum-client"));
    must(run(
        &agg,
        &["pki", "init", "--federation", "demo", "--out", "pki"],
        root,
    ));
    must(run(
        &agg,
        &["release", "keygen", "--out", "release.key"],
        root,
    ));
    let init = [
        "init",
        "--federation",
        "demo",
        "--release-key",
        "release.key.pub",
        "--sites",
        "3",
    ];
    let said = must(run(&agg, &init, root));
    assert!(said.contains("wrote federation.toml"), "{said}");
    // An existing file is kept.
    let again = run(&agg, &init, root);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("an existing file is kept"));
    let model = [
        "init-model",
        "--preset",
        "tiny",
        "--out",
        "initial.safetensors",
    ];
    must(run(&client, &model, root));

    let check = |caps: [f64; 2]| {
        for (site, cap) in ["alpha", "beta"].into_iter().zip(caps) {
            std::fs::write(root.join(format!("{site}.toml")), example_site(site, cap))
                .expect("write site.toml");
        }
        let args = [
            "policy",
            "check",
            "--config",
            "federation.toml",
            "--site",
            "alpha.toml",
            "--site",
            "beta.toml",
        ];
        run(&agg, &args, root)
    };
    // As written, three sites with the example's caps run every round.
    let ok = must(check([8.0, 20.0]));
    assert!(
        ok.contains("site alpha takes part in all 10 rounds")
            && ok.contains("site beta takes part in all 10 rounds")
            && ok.contains("federation.toml: ok"),
        "{ok}"
    );
    // A site whose cap one round nearly spends would decline the second.
    let refused = check([8.0, 2.0]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("site beta would decline round 2 of 10")
            && said.contains("lower federation.rounds to 1")
            && !said.contains("site alpha would decline"),
        "{said}"
    );
}
