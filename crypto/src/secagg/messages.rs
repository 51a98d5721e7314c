//! Protocol messages, identity seams and the byte strings that get signed.

use super::{Error, RoundContext};
use crate::share_crypto::push_federation;

/// Domain label of the signed advertisement.
pub const ADVERTISE_LABEL: &[u8] = b"quorum/advertise/v2";
/// Domain label of the signed survivor set.
pub const SURVIVORS_LABEL: &[u8] = b"quorum/survivors/v2";

/// A client's fresh round keys, signed with its site key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertisement {
    /// Cohort index of the advertiser.
    pub client: u32,
    /// X25519 public key for share encryption.
    pub share_public_key: [u8; 32],
    /// X25519 public key for pairwise mask agreement.
    pub mask_public_key: [u8; 32],
    /// Signature over [`advertisement_message`].
    pub signature: Vec<u8>,
    /// The advertiser's certificate (DER), checked by the [`PeerAuthenticator`].
    pub certificate_der: Vec<u8>,
}

/// Shares from `sender` for `receiver`, encrypted so that only `receiver` can read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedShare {
    /// Owner of the shared secrets.
    pub sender: u32,
    /// Holder of the shares.
    pub receiver: u32,
    /// AES-256-GCM ciphertext of the share payload (see [`crate::share_crypto`]).
    pub ciphertext: Vec<u8>,
}

/// A client's signature over the survivor set it was shown.
///
/// Carries the signer's certificate because clients verify the signatures of survivors that are
/// not their neighbours, whose advertisements they never saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistencySignature {
    /// Signer.
    pub client: u32,
    /// Signature over [`survivors_message`].
    pub signature: Vec<u8>,
    /// The signer's certificate (DER).
    pub certificate_der: Vec<u8>,
}

/// Which secret a revealed share belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShareKind {
    /// The owner's self-mask seed: revealed when the owner survived.
    SelfMaskSeed,
    /// The owner's mask-agreement secret key: revealed when the owner dropped after sharing.
    MaskKey,
}

/// One share a client reveals in the unmask phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevealedShare {
    /// Owner of the secret.
    pub owner: u32,
    /// Which secret.
    pub kind: ShareKind,
    /// The 33-byte Shamir share `x ‖ y`.
    pub share: Vec<u8>,
}

/// A client's answer to the unmask request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmaskShares {
    /// The revealer.
    pub client: u32,
    /// One share per neighbour that shared keys with it.
    pub shares: Vec<RevealedShare>,
}

/// Signs with the site's certificate key (implemented by the identity layer).
pub trait Signer {
    /// Signature over `message`.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
    /// The certificate (DER) whose key makes the signatures.
    fn certificate_der(&self) -> Vec<u8>;
}

/// Why a peer's signature or certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct PeerAuthError {
    reason: String,
}

impl PeerAuthError {
    /// An error with a reason for the audit log.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Checks that a certificate belongs to the cohort member `client` and that it signed `message`
/// (implemented by the identity layer: chain to the federation CA, not revoked, names the site
/// at that cohort index).
pub trait PeerAuthenticator {
    /// `Ok` when `signed` is `client`'s valid signature.
    fn verify(&self, client: u32, signed: Signed<'_>) -> Result<(), PeerAuthError>;
}

/// A signature with the certificate that claims it, over `message`.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// The signer's certificate (DER).
    pub certificate_der: &'a [u8],
    /// What was signed.
    pub message: &'a [u8],
    /// The signature.
    pub signature: &'a [u8],
}

/// Checks that a certificate belongs to the named site and made the signature (implemented by
/// the identity layer: chain to the federation CA, not revoked, names the site).
///
/// Revocation travels with the round: the aggregator relays the list its verifier checks
/// against ([`SiteVerifier::revocation_list`]) inside every offer, and each site checks it and
/// adopts it ([`SiteVerifier::adopt_revocation_list`]) before it checks any peer of that
/// round, so a site revoked at the authority cannot be anyone's peer even when the aggregator
/// would rather keep it.
pub trait SiteVerifier {
    /// `Ok` when `signed` is `site`'s valid signature.
    fn verify_site(&self, site: &str, signed: Signed<'_>) -> Result<(), PeerAuthError>;

    /// The revocation list peers are checked against, exactly as its issuer signed it, to
    /// relay with an offer; empty when this verifier checks none.
    fn revocation_list(&self) -> Result<Vec<u8>, PeerAuthError>;

    /// Checks `list`, relayed with an offer: signed by the federation's issuer, current (not
    /// past its next update) and not older than the list in use. Peers are checked against it
    /// from then on. `Some` when it replaced the list in use, which the caller then keeps
    /// durably so that a restart cannot go back to an older one.
    fn adopt_revocation_list(&self, list: &[u8]) -> Result<Option<AdoptedList>, PeerAuthError>;

    /// Whether `site` still passes these checks with the certificate it connected with (it may
    /// have been revoked since): the aggregator leaves a site that does not out of its cohorts.
    fn check_member(&self, site: &str) -> Result<(), PeerAuthError>;
}

/// A revocation list a [`SiteVerifier`] newly adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedList {
    /// Its sequence number (the CRL number, in decimal).
    pub number: String,
    /// When its issuer will have published the next one (seconds since the Unix epoch); past
    /// that, the list is stale and refused.
    pub next_update: i64,
    /// How many certificates it revokes.
    pub revoked: usize,
}

/// Accepts a signature from cohort index `i` only if the site at position `i` of the round's
/// cohort made it, as its [`SiteVerifier`] judges.
#[derive(Clone, Copy)]
pub struct CohortAuthenticator<'a> {
    /// Checks certificates and signatures of named sites.
    pub verifier: &'a dyn SiteVerifier,
    /// Site names in cohort order.
    pub cohort: &'a [String],
}

impl PeerAuthenticator for CohortAuthenticator<'_> {
    fn verify(&self, client: u32, signed: Signed<'_>) -> Result<(), PeerAuthError> {
        let site = self
            .cohort
            .get(client as usize)
            .ok_or_else(|| PeerAuthError::new(format!("client {client} is not in the cohort")))?;
        self.verifier.verify_site(site, signed)
    }
}

/// The signed advertisement bytes: `"quorum/advertise/v2" ‖ len(fed) ‖ fed ‖ round ‖
/// offer_digest ‖ client ‖ share_pk ‖ mask_pk` (integers big-endian u32).
pub fn advertisement_message(
    federation: &str,
    round: u32,
    offer_digest: &[u8; 32],
    client: u32,
    share_public_key: &[u8; 32],
    mask_public_key: &[u8; 32],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(ADVERTISE_LABEL.len() + federation.len() + 108);
    out.extend_from_slice(ADVERTISE_LABEL);
    push_federation(&mut out, federation);
    out.extend_from_slice(&round.to_be_bytes());
    out.extend_from_slice(offer_digest);
    out.extend_from_slice(&client.to_be_bytes());
    out.extend_from_slice(share_public_key);
    out.extend_from_slice(mask_public_key);
    out
}

/// Checks that `adv` is signed, for this federation and round, by the certificate key of the
/// cohort member it names.
pub(crate) fn verify_advertisement(
    ctx: &RoundContext,
    adv: &Advertisement,
    auth: &dyn PeerAuthenticator,
) -> Result<(), Error> {
    let message = advertisement_message(
        &ctx.federation,
        ctx.round,
        &ctx.offer_digest,
        adv.client,
        &adv.share_public_key,
        &adv.mask_public_key,
    );
    verify_signature(
        auth,
        adv.client,
        &adv.certificate_der,
        &message,
        &adv.signature,
    )
}

/// Checks one client's signature over `message` with `auth`, as a protocol error.
pub(crate) fn verify_signature(
    auth: &dyn PeerAuthenticator,
    client: u32,
    certificate_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), Error> {
    let signed = Signed {
        certificate_der,
        message,
        signature,
    };
    auth.verify(client, signed)
        .map_err(|source| Error::BadSignature { client, source })
}

/// The signed survivor-set bytes: `"quorum/survivors/v2" ‖ len(fed) ‖ fed ‖ round ‖
/// offer_digest ‖ count ‖ ids…` with ids sorted ascending (integers big-endian u32). `survivors`
/// must already be sorted; the state machines check that before signing or verifying.
pub fn survivors_message(
    federation: &str,
    round: u32,
    offer_digest: &[u8; 32],
    survivors: &[u32],
) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(SURVIVORS_LABEL.len() + federation.len() + 44 + 4 * survivors.len());
    out.extend_from_slice(SURVIVORS_LABEL);
    push_federation(&mut out, federation);
    out.extend_from_slice(&round.to_be_bytes());
    out.extend_from_slice(offer_digest);
    // A cohort has at most u32::MAX members, so the count fits.
    let count = u32::try_from(survivors.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for s in survivors {
        out.extend_from_slice(&s.to_be_bytes());
    }
    out
}
