//! Shared fixtures for the crate's tests.

use std::path::Path;

use time::{Duration, OffsetDateTime};

use crate::pki::{self, Ca, FederationPki, SiteBundle};

/// A federation PKI in a temporary directory, each site enrolled as a real one is: its key and
/// request made in its own folder (`sites/<site>`), the certificate signed by the authority.
pub(crate) struct Federation {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) pki: FederationPki,
    pub(crate) sites: Vec<SiteBundle>,
}

pub(crate) fn federation(name: &str, sites: &[&str]) -> Federation {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::init_federation(name, &dir.path().join("pki")).unwrap();
    let sites = sites
        .iter()
        .map(|site| {
            let folder = dir.path().join("sites").join(site);
            let request = pki::request_site(name, site, &folder).unwrap();
            pki::sign_site_request(&pki.ca.dir, &request.csr_path, &folder, 30).unwrap()
        })
        .collect();
    Federation { dir, pki, sites }
}

impl Federation {
    pub(crate) fn bundle(&self, site: &str) -> &Path {
        &self.sites.iter().find(|b| b.site == site).unwrap().dir
    }

    /// A bundle the CA issues itself, key included, into `folder/<site>`, naming `federation`
    /// and valid from `days.0` to `days.1` days from now.
    fn operator_bundle(
        &self,
        site: &str,
        federation: &str,
        folder: &str,
        days: (i64, i64),
    ) -> SiteBundle {
        let now = OffsetDateTime::now_utc();
        Ca::open(&self.pki.ca.dir)
            .unwrap()
            .issue_site_bundle(
                site,
                federation,
                &self.dir.path().join(folder),
                now + Duration::days(days.0) - Duration::minutes(1),
                now + Duration::days(days.1),
            )
            .unwrap()
    }

    /// A bundle signed by this federation's CA but naming `federation` in its URI, as a CA
    /// shared between federations would produce.
    pub(crate) fn foreign_federation_bundle(&self, site: &str, federation: &str) -> SiteBundle {
        self.operator_bundle(site, federation, "foreign", (0, 1))
    }

    /// A second bundle for `site`, with a new key, as a CA minting a twin would issue it.
    pub(crate) fn second_bundle(&self, site: &str) -> SiteBundle {
        self.operator_bundle(site, &self.pki.ca.federation, "twin", (0, 1))
    }

    /// A bundle whose validity ended yesterday.
    pub(crate) fn expired_bundle(&self, site: &str) -> SiteBundle {
        self.operator_bundle(site, &self.pki.ca.federation, "expired", (-3, -1))
    }

    /// Revokes `query` and republishes the CRL in place.
    pub(crate) fn revoke(&self, query: &str) {
        pki::revoke(&self.pki.ca.dir, query).unwrap();
        pki::crl(&self.pki.ca.dir, &self.pki.crl.path).unwrap();
    }

    /// Replaces the CRL with one issued 31 days ago, past its 30-day next-update time.
    pub(crate) fn publish_stale_crl(&self) {
        let issued = OffsetDateTime::now_utc() - Duration::days(31);
        pki::crl_at(&self.pki.ca.dir, &self.pki.crl.path, issued).unwrap();
    }
}
