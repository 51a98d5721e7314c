//! The site certificate as the identity of secure aggregation: signing advertisements and
//! survivor sets with the site key, and checking peers' signatures against the federation CA
//! and the round's cohort.

use quorum_crypto::secagg::{PeerAuthError, PeerAuthenticator, Signer};

use crate::{PeerVerifier, SiteIdentity};

impl Signer for SiteIdentity {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        SiteIdentity::sign(self, message)
    }

    fn certificate_der(&self) -> Vec<u8> {
        SiteIdentity::certificate_der(self).as_ref().to_vec()
    }
}

/// Accepts a signature from cohort index `i` only if it was made with the certificate key of
/// the site at position `i` of the round's cohort, chained to the CA and not revoked.
#[derive(Debug, Clone, Copy)]
pub struct CohortAuthenticator<'a> {
    /// Checks chains, revocation, federation and signatures.
    pub verifier: &'a PeerVerifier,
    /// Site names in cohort order.
    pub cohort: &'a [String],
}

impl PeerAuthenticator for CohortAuthenticator<'_> {
    fn verify(
        &self,
        client: u32,
        certificate_der: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), PeerAuthError> {
        let site = self
            .cohort
            .get(client as usize)
            .ok_or_else(|| PeerAuthError::new(format!("client {client} is not in the cohort")))?;
        self.verifier
            .verify_signed(site, certificate_der, message, signature)
            .map(drop)
            .map_err(|e| PeerAuthError::new(e.to_string()))
    }
}
