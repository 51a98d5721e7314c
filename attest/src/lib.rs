//! Identity for Quorum federations: the federation PKI, mutual-TLS configuration, site
//! signatures, signed client releases and attestation evidence.
//!
//! - [`pki`]: CA, server and site certificates (Ed25519), site bundles, revocation and CRLs.
//! - [`tls`]: rustls server and client configurations (TLS 1.3 only, *ring*, client
//!   certificates required, CRL reloaded on change, federation checked) and the
//!   keying-material exporter.
//! - [`identity`]: a site's own key ([`SiteIdentity`]) and checks of other sites' certificates
//!   and signatures ([`PeerVerifier`]).
//! - [`release`]: Ed25519-signed release manifests naming the SHA-256 of the client binary.
//! - [`bundle`]: release bundles, the binary with the libraries it loads, signed file by file.
//! - [`evidence`]: the evidence a client presents at join, bound to its TLS session, and the
//!   [`Verifier`] trait with [`SelfMeasurementVerifier`].
//!
//! ```no_run
//! # fn main() -> Result<(), quorum_attest::AttestError> {
//! use std::path::Path;
//! let out = Path::new("pki");
//! let pki = quorum_attest::pki::init_federation("demo", out)?;
//! // At the site, on its own machine; only the request travels to the authority.
//! let site_dir = Path::new("hospital-a");
//! let request = quorum_attest::pki::request_site("demo", "hospital-a", site_dir)?;
//! let bundle = quorum_attest::pki::sign_site_request(&pki.ca.dir, &request.csr_path, site_dir, 365)?;
//! let server = quorum_attest::tls::server_config(
//!     &pki.ca.cert_path,
//!     &pki.server.cert_path,
//!     &pki.server.key_path,
//!     Some(&pki.crl.path),
//! )?;
//! let site = quorum_attest::SiteIdentity::load(&bundle.dir)?;
//! let client = quorum_attest::tls::client_config(
//!     &site.ca_path(),
//!     &site.cert_path(),
//!     &site.key_path(),
//!     None,
//! )?;
//! # let _ = (server, client);
//! # Ok(())
//! # }
//! ```

pub mod bundle;
mod crl;
mod error;
pub mod evidence;
mod files;
pub mod identity;
pub mod names;
pub mod pki;
mod relayed_crl;
pub mod release;
pub mod secagg;
mod site_key;
pub mod tls;

#[cfg(test)]
mod handshake_tests;
#[cfg(test)]
mod test_support;

pub use error::{AttestError, Result};
pub use evidence::{Evidence, SelfMeasurementVerifier, Verdict, VerificationContext, Verifier};
pub use files::check_key_permissions;
pub use identity::{PeerIdentity, PeerVerifier, SiteIdentity, key_fingerprint, peer_identity};
pub use quorum_crypto::secagg::CohortAuthenticator;
pub use release::{
    FileDigest, ReleaseManifest, SignedRelease, sha256_file, sign_release, verify_release,
};
pub use site_key::KeyAlgorithm;
