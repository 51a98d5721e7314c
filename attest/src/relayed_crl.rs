//! A revocation list as it travels with an offer: the aggregator relays the CA's CRL (DER) and
//! each site checks it for itself before adopting it. The aggregator cannot forge a list (it
//! must verify under the CA's key), cannot serve one past its next update (stale lists are
//! refused), and cannot go back to an older one once a site has seen a newer one (CRL numbers
//! only move forward; sites keep the newest durably).

use std::cmp::Ordering;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::OwnedCertRevocationList;
use x509_parser::num_bigint::BigUint;
use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

use crate::error::{AttestError, Result};

/// A revocation list as webpki checks certificates against it, with its bytes as the CA signed
/// them (to relay, or to keep): what a verifier uses, whether it read the list from the
/// authority's file or had it relayed.
#[derive(Debug)]
pub(crate) struct SignedList {
    pub(crate) list: OwnedCertRevocationList,
    pub(crate) der: Vec<u8>,
}

/// A relayed list that passed [`check`].
#[derive(Debug)]
pub(crate) struct CheckedCrl {
    pub(crate) signed: Arc<SignedList>,
    pub(crate) number: BigUint,
    /// Seconds since the Unix epoch.
    pub(crate) next_update: i64,
    pub(crate) revoked: usize,
}

/// Checks that `der` is a CRL signed by `ca`, carrying a CRL number and a next-update time
/// that is still ahead of `now` (`None`: do not judge freshness, for a list read back from
/// the site's own store, which is only a floor for the numbers to come).
pub(crate) fn check(
    ca: &CertificateDer<'_>,
    der: &[u8],
    now: Option<UnixTime>,
) -> Result<CheckedCrl> {
    let (_, ca) =
        X509Certificate::from_der(ca).map_err(|e| refused(format!("CA certificate: {e}")))?;
    let (rest, crl) = CertificateRevocationList::from_der(der)
        .map_err(|e| refused(format!("not a DER CRL: {e}")))?;
    if !rest.is_empty() {
        return Err(refused("trailing bytes after the CRL"));
    }
    if crl.issuer().as_raw() != ca.subject().as_raw() {
        return Err(refused(format!(
            "issued by {}, not by the federation CA {}",
            crl.issuer(),
            ca.subject()
        )));
    }
    crl.verify_signature(ca.public_key()).map_err(|e| {
        refused(format!(
            "its signature does not verify with the CA key ({e})"
        ))
    })?;
    let number = crl
        .crl_number()
        .cloned()
        .ok_or_else(|| refused("it carries no CRL number, so a rollback could not be told"))?;
    let next_update = crl
        .next_update()
        .ok_or_else(|| refused("it has no next-update time, so staleness could not be told"))?
        .timestamp();
    if let Some(now) = now
        && next_update <= now.as_secs() as i64
    {
        return Err(refused(format!(
            "it is stale: its next update was due at {} (Unix time); the authority must publish \
             a new one (`pki crl`)",
            next_update
        )));
    }
    let revoked = crl.iter_revoked_certificates().count();
    let list = OwnedCertRevocationList::from_der(der)
        .map_err(|e| refused(format!("not usable for revocation checks: {e}")))?;
    Ok(CheckedCrl {
        signed: Arc::new(SignedList {
            list,
            der: der.to_vec(),
        }),
        number,
        next_update,
        revoked,
    })
}

/// Whether `found` may replace `current`: a higher number, or the very same list again.
pub(crate) fn replaces(current: &CheckedCrl, found: &CheckedCrl) -> Result<bool> {
    match found.number.cmp(&current.number) {
        Ordering::Greater => Ok(true),
        Ordering::Equal if found.signed.der == current.signed.der => Ok(false),
        Ordering::Equal => Err(refused(format!(
            "it differs from the list in use under the same CRL number {}",
            found.number
        ))),
        Ordering::Less => Err(refused(format!(
            "its CRL number {} is older than the {} already in use (a rollback could un-revoke \
             a site)",
            found.number, current.number
        ))),
    }
}

fn refused(reason: impl Into<String>) -> AttestError {
    AttestError::RelayedCrlRefused {
        reason: reason.into(),
    }
}
