//! Federation and site names, and the URIs that carry them in certificates.
//!
//! A certificate names its federation in a URI subject alternative name:
//! - CA: `urn:quorum:federation:<federation>`
//! - site: `urn:quorum:federation:<federation>:site:<site>`
//! - server: `urn:quorum:federation:<federation>:server`
//!
//! Names are restricted so that they are safe as directory names and cannot contain the `:`
//! separator.

use crate::error::{AttestError, Result};

const PREFIX: &str = "urn:quorum:federation:";

/// Checks that `name` can be used as a federation or site name.
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 64 {
        Some("it is longer than 64 characters")
    } else if name.starts_with(['.', '-']) {
        Some("it starts with . or -")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("it contains a character outside A-Z a-z 0-9 . _ -")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(AttestError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The role a certificate's URI gives it inside a federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The federation's certificate authority.
    Ca,
    /// The aggregator's TLS server.
    Server,
    /// A participating site, by name.
    Site(String),
}

/// A parsed `urn:quorum:federation:...` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationUri {
    /// The federation name.
    pub federation: String,
    /// What the certificate is within the federation.
    pub role: Role,
}

impl FederationUri {
    /// The URI of a site certificate.
    pub fn site(federation: &str, site: &str) -> String {
        format!("{PREFIX}{federation}:site:{site}")
    }

    /// The URI of the server certificate.
    pub fn server(federation: &str) -> String {
        format!("{PREFIX}{federation}:server")
    }

    /// The URI of the CA certificate.
    pub fn ca(federation: &str) -> String {
        format!("{PREFIX}{federation}")
    }

    /// Parses a URI, returning `None` if it is not a well-formed Quorum federation URI.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(PREFIX)?;
        let mut parts = rest.split(':');
        let federation = parts.next()?.to_owned();
        validate_name(&federation).ok()?;
        let role = match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => Role::Ca,
            (Some("server"), None, _) => Role::Server,
            (Some("site"), Some(site), None) => {
                validate_name(site).ok()?;
                Role::Site(site.to_owned())
            }
            _ => return None,
        };
        Some(Self { federation, role })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        assert_eq!(
            FederationUri::parse(&FederationUri::site("fed-1", "st.mary_2")),
            Some(FederationUri {
                federation: "fed-1".into(),
                role: Role::Site("st.mary_2".into())
            })
        );
        assert_eq!(
            FederationUri::parse(&FederationUri::server("f")).map(|u| u.role),
            Some(Role::Server)
        );
        assert_eq!(
            FederationUri::parse(&FederationUri::ca("f")).map(|u| u.role),
            Some(Role::Ca)
        );
    }

    #[test]
    fn malformed_uris_are_rejected() {
        for uri in [
            "urn:quorum:federation:",
            "urn:quorum:federation:f:site:",
            "urn:quorum:federation:f:site:a:b",
            "urn:quorum:federation:f:server:x",
            "urn:quorum:federation:f:admin",
            "urn:other:federation:f",
            "urn:quorum:federation:f:site:../x",
        ] {
            assert_eq!(FederationUri::parse(uri), None, "{uri}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("hospital-a.eu_1").is_ok());
        for bad in ["", ".hidden", "-x", "a/b", "a:b", "é", &"x".repeat(65)] {
            assert!(
                matches!(validate_name(bad), Err(AttestError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }
}
