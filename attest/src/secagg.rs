//! The site certificate as the identity of secure aggregation: signing advertisements and
//! survivor sets with the site key, and checking a named peer's signature against the federation CA
//! (`quorum_crypto::secagg::CohortAuthenticator` maps cohort indices to names).

use quorum_crypto::secagg::{AdoptedList, PeerAuthError, Signed, Signer, SiteVerifier};

use crate::{PeerVerifier, SiteIdentity};

impl Signer for SiteIdentity {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        SiteIdentity::sign(self, message)
    }

    fn certificate_der(&self) -> Vec<u8> {
        SiteIdentity::certificate_der(self).as_ref().to_vec()
    }
}

impl SiteVerifier for PeerVerifier {
    fn verify_site(&self, site: &str, s: Signed<'_>) -> Result<(), PeerAuthError> {
        self.verify_signed(site, s.certificate_der, s.message, s.signature)
            .map(drop)
            .map_err(|e| PeerAuthError::new(e.to_string()))
    }

    fn revocation_list(&self) -> Result<Vec<u8>, PeerAuthError> {
        self.revocation_list_der()
            .map_err(|e| PeerAuthError::new(e.to_string()))
    }

    fn check_member(&self, site: &str) -> Result<(), PeerAuthError> {
        PeerVerifier::check_member(self, site).map_err(|e| PeerAuthError::new(e.to_string()))
    }

    fn adopt_revocation_list(&self, list: &[u8]) -> Result<Option<AdoptedList>, PeerAuthError> {
        PeerVerifier::adopt_revocation_list(self, list)
            .map_err(|e| PeerAuthError::new(e.to_string()))
    }
}
