//! Quorum policies: the operator's `federation.toml`, each site's `site.toml`, round
//! admission and the privacy accountant.
//!
//! * [`config`]: both files are parsed into raw structs that mirror the TOML (unknown keys are
//!   errors), then validated into [`FederationPolicy`] and [`SitePolicy`]. Errors name the
//!   file, the key and the reason.
//! * [`admission`]: [`SitePolicy::admit`] decides, without I/O, whether a site takes part in a
//!   round; [`FederationPolicy::check_site`] is the aggregator's side of the same agreement.
//! * [`accountant`]: per-round zCDP ρ, composed over rounds and converted to (ε, δ) by OpenDP.
//! * [`ledger`]: the site's durable record of the rounds it spent budget on.
//! * [`rdp`]: record-level privacy of DP-SGD (Poisson-subsampled Gaussian steps, RDP).
//!
//! ```
//! use quorum_policies::{Ledger, RoundOffer, Refusal, site_from_str};
//!
//! let site = site_from_str(
//!     r#"
//!     [site]
//!     federation = "hospitals"
//!     name = "st-mary"
//!     [policy]
//!     max_epsilon = 1.0
//!     [data]
//!     path = "builtin:tiny"
//!     "#,
//!     "site.toml",
//! )?;
//! let dir = std::env::temp_dir().join(format!("quorum-doc-{}", std::process::id()));
//! let ledger = Ledger::open(&dir.join("ledger.json"))?;
//! let offer = RoundOffer {
//!     federation: "hospitals".into(),
//!     round: 0,
//!     cohort_size: 8,
//!     secure_aggregation: true,
//!     dp_enabled: true,
//!     rho: 0.5, // ε ≈ 5.2 at δ = 1e-6: past this site's budget of 1
//!     local_steps: 100,
//! };
//! assert!(matches!(site.admit(&offer, &ledger), Err(Refusal::BudgetExceeded { .. })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod accountant;
pub mod admission;
pub mod config;
pub mod ledger;
pub mod rdp;

use std::path::Path;

pub use accountant::{
    Accountant, AccountantError, Delta, Recorded, epsilon_from_rho, gaussian_rho,
};
pub use admission::{Refusal, RoundOffer};
pub use config::ConfigError;
pub use config::federation::{Dropouts, FederationPolicy, SiteIncompatible, SiteLimits};
pub use config::site::SitePolicy;
pub use ledger::{DpSgdSpend, Ledger, LedgerEntry, LedgerError};

/// Reads and validates the `federation.toml` at `path`.
pub fn load_federation(path: &Path) -> Result<FederationPolicy, ConfigError> {
    FederationPolicy::load(path)
}

/// Reads and validates the `site.toml` at `path`.
pub fn load_site(path: &Path) -> Result<SitePolicy, ConfigError> {
    SitePolicy::load(path)
}

/// Validates `federation.toml` contents; `file` names it in errors and anchors relative paths.
pub fn federation_from_str(text: &str, file: &str) -> Result<FederationPolicy, ConfigError> {
    FederationPolicy::from_toml_str(text, file)
}

/// Validates `site.toml` contents; `file` names it in errors and anchors relative paths.
pub fn site_from_str(text: &str, file: &str) -> Result<SitePolicy, ConfigError> {
    SitePolicy::from_toml_str(text, file)
}
