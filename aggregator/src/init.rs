//! `quorum-aggregator init`: a `federation.toml` that matches the layout `pki init` writes,
//! made from the documented example so that every key keeps its explanation.

/// The documented example every generated file starts from.
const EXAMPLE: &str = include_str!("../../policies/examples/federation.toml");

/// What the operator chooses at `init`; everything else keeps the example's value.
#[derive(Debug, Clone)]
pub struct InitChoices {
    /// Federation name.
    pub federation: String,
    /// The folder `pki init --out` wrote (`ca/`, `server/`), as the file should name it.
    pub pki: String,
    /// Address the aggregator listens on.
    pub listen: String,
    /// Sites per round (`min_clients` and `max_clients`).
    pub sites: u32,
    /// Trusted release public key, hex.
    pub release_key: String,
    /// Allowed client versions; empty allows any version the key signed.
    pub allowed_versions: Vec<String>,
}

/// The `federation.toml` text for `choices`.
pub fn federation_toml(choices: &InitChoices) -> Result<String, String> {
    let string = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let pki = |file: &str| string(&format!("{}/{file}", choices.pki.trim_end_matches('/')));
    let versions = toml::Value::Array(
        choices
            .allowed_versions
            .iter()
            .map(|v| toml::Value::String(v.clone()))
            .collect(),
    );
    let settings = [
        ("federation", "name", string(&choices.federation)),
        ("federation", "min_clients", choices.sites.to_string()),
        ("federation", "max_clients", choices.sites.to_string()),
        ("server", "listen", string(&choices.listen)),
        ("server", "ca", pki("ca/ca.pem")),
        ("server", "cert", pki("server/server.pem")),
        ("server", "key", pki("server/server.key")),
        ("server", "crl", pki("ca/crl.pem")),
        ("model", "initial_checkpoint", string("initial.safetensors")),
        (
            "releases",
            "trusted_keys",
            format!("[{}]", string(&choices.release_key)),
        ),
        ("releases", "allowed_versions", versions.to_string()),
    ];
    let mut text = EXAMPLE.to_owned();
    for (table, key, value) in settings {
        text = set(&text, table, key, Some(&value))?;
    }
    // Left out, a cohort tolerates the dropouts it can (up to 10 %): a stated fraction would
    // leave pilots of 3 or 4 sites without secure-aggregation parameters.
    set(&text, "secure_aggregation", "dropout_fraction", None)
}

/// Replaces the value of `key` in `[table]` (or comments the line out, for `None`), keeping
/// every other line, comments included.
fn set(text: &str, table: &str, key: &str, value: Option<&str>) -> Result<String, String> {
    let header = format!("[{table}]");
    let mut in_table = false;
    let mut done = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.starts_with('[') {
                in_table = line.trim() == header;
            } else if in_table && !done && line.split('=').next().map(str::trim) == Some(key) {
                done = true;
                return match value {
                    Some(value) => format!("{key} = {value}"),
                    None => format!("# {line}"),
                };
            }
            line.to_owned()
        })
        .collect();
    if !done {
        return Err(format!("the example federation.toml has no {table}.{key}"));
    }
    Ok(lines.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices() -> InitChoices {
        InitChoices {
            federation: "consortium".into(),
            pki: "pki/".into(),
            listen: "0.0.0.0:7443".into(),
            sites: 4,
            release_key: "ab".repeat(32),
            allowed_versions: vec!["0.2.0".into()],
        }
    }

    #[test]
    fn init_writes_a_valid_federation_naming_the_pki_layout() {
        let text = federation_toml(&choices()).unwrap();
        let policy = quorum_policies::federation_from_str(&text, "federation.toml").unwrap();
        assert_eq!(policy.federation.name, "consortium");
        assert_eq!(
            (policy.federation.min_clients, policy.federation.max_clients),
            (4, 4)
        );
        assert_eq!(policy.server.ca, std::path::Path::new("pki/ca/ca.pem"));
        assert_eq!(
            policy.server.key,
            std::path::Path::new("pki/server/server.key")
        );
        assert_eq!(policy.releases.trusted_keys, [[0xab; 32]]);
        assert_eq!(policy.releases.allowed_versions, ["0.2.0"]);
        assert_eq!(
            policy.secure_aggregation.dropouts,
            quorum_policies::Dropouts::UpTo(0.1)
        );
        // The explanations stay.
        assert!(text.contains("# (required) Name of the federation."));
    }

    #[test]
    fn init_refuses_a_key_the_example_lacks() {
        let err = set("[server]\nlisten = \"x\"\n", "server", "port", Some("1")).unwrap_err();
        assert_eq!(err, "the example federation.toml has no server.port");
        // A key of the same name in another table is not touched.
        let text = set("[a]\nname = 1\n[b]\nname = 2\n", "b", "name", Some("3")).unwrap();
        assert_eq!(text, "[a]\nname = 1\n[b]\nname = 3\n");
        let text = set(&text, "a", "name", None).unwrap();
        assert_eq!(text, "[a]\n# name = 1\n[b]\nname = 3\n");
    }
}
