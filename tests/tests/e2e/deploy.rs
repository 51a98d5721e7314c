//! An operator's path: an aggregator reached by a name and an address that are not the
//! loopback defaults, and the client's start-up refusals that say what to change.

use std::time::Duration;

use crate::support::{Federation, Spec, heavy, release};

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
