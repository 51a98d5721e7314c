//! The SecAgg error type.

use super::messages::{PeerAuthError, ShareKind};
use crate::{shamir, share_crypto};

/// A SecAgg+ phase. Its name ([`Phase::name`]) is the one spelling used in errors, the
/// audit log (`phase_completed` records) and on the command line (`--pause-before`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Collecting key advertisements.
    Advertise,
    /// Collecting encrypted shares.
    ShareKeys,
    /// Collecting masked inputs.
    MaskedInput,
    /// Collecting signatures over the survivor set.
    Consistency,
    /// Collecting revealed shares.
    Unmask,
}

impl Phase {
    /// Every phase, in protocol order.
    pub const ALL: [Phase; 5] = [
        Phase::Advertise,
        Phase::ShareKeys,
        Phase::MaskedInput,
        Phase::Consistency,
        Phase::Unmask,
    ];

    /// The phase's name: `advertise`, `share-keys`, `masked-input`, `consistency`, `unmask`.
    pub const fn name(self) -> &'static str {
        match self {
            Phase::Advertise => "advertise",
            Phase::ShareKeys => "share-keys",
            Phase::MaskedInput => "masked-input",
            Phase::Consistency => "consistency",
            Phase::Unmask => "unmask",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`Phase`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no SecAgg+ phase is named {0:?}; the phases are advertise, share-keys, masked-input, consistency, unmask"
)]
pub struct UnknownPhase(pub String);

impl std::str::FromStr for Phase {
    type Err = UnknownPhase;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|phase| phase.name() == name)
            .ok_or_else(|| UnknownPhase(name.to_owned()))
    }
}

/// Why a SecAgg step was refused. Every variant leaves the caller's state untouched or consumed;
/// none leaves a partially updated round behind except where documented on the method.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The parameters are inconsistent.
    #[error("invalid SecAgg parameters: {reason}")]
    InvalidParams {
        /// What is wrong.
        reason: String,
    },
    /// No degree and threshold satisfy the requested corruption and dropout fractions.
    #[error(
        "no SecAgg+ degree/threshold tolerates {corrupt_fraction} corrupt and {dropout_fraction} \
         dropped clients out of {clients}; lower the fractions or enlarge the cohort"
    )]
    NoValidParams {
        /// Cohort size.
        clients: u32,
        /// Requested corrupt fraction.
        corrupt_fraction: f64,
        /// Requested dropout fraction.
        dropout_fraction: f64,
    },
    /// Too few participants remain for the round to continue; the round must be aborted.
    #[error(
        "{phase}: only {survivors} participants remain but {needed} are needed; abort the round"
    )]
    BelowThreshold {
        /// Phase in which it happened.
        phase: Phase,
        /// Participants left (or, for a neighbourhood, neighbours left).
        survivors: usize,
        /// Minimum required.
        needed: usize,
    },
    /// A message came in a phase that does not accept it.
    #[error("message for the {got} phase arrived while the round is in the {expected} phase")]
    WrongPhase {
        /// Phase the round is in.
        expected: Phase,
        /// Phase the message belongs to.
        got: Phase,
    },
    /// A client index is not part of the cohort.
    #[error("client {client} is not in the cohort of {clients}")]
    UnknownClient {
        /// The index.
        client: u32,
        /// Cohort size.
        clients: u32,
    },
    /// A message names a client that is not a neighbour of the party concerned.
    #[error("client {other} is not an eligible neighbour of client {client} in this round")]
    NotANeighbour {
        /// The party whose neighbourhood was checked.
        client: u32,
        /// The party that is not in it.
        other: u32,
    },
    /// A message from this client (or for this pair) was already received.
    #[error("duplicate message from client {client}")]
    DuplicateMessage {
        /// Sender of the duplicate.
        client: u32,
    },
    /// A signature did not verify: forged, for another round or federation, or over another
    /// survivor set.
    #[error("signature of client {client} does not verify: {source}")]
    BadSignature {
        /// Claimed signer.
        client: u32,
        /// Why the authenticator refused it.
        source: PeerAuthError,
    },
    /// A message addressed or attributed to someone else.
    #[error("message claims sender {claimed} but came from client {from}")]
    WrongSender {
        /// Actual origin.
        from: u32,
        /// Sender named in the message.
        claimed: u32,
    },
    /// A share was addressed to another client.
    #[error("share addressed to client {receiver} was delivered to client {me}")]
    WrongReceiver {
        /// The receiving client.
        me: u32,
        /// The receiver named in the share.
        receiver: u32,
    },
    /// A client did not send a share to one of its advertised neighbours.
    #[error("client {client} sent no share for its neighbour {neighbour}")]
    MissingShare {
        /// The sender.
        client: u32,
        /// The neighbour left out.
        neighbour: u32,
    },
    /// A vector, ciphertext or share has the wrong length.
    #[error("wrong length: expected {expected}, got {got}")]
    WrongLength {
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A part of a masked input does not start where the client's previous part ended.
    #[error("part of client {client}'s masked input at offset {offset}, expected {expected}")]
    PartOutOfOrder {
        /// The uploader.
        client: u32,
        /// Where the part starts.
        offset: usize,
        /// Elements of its input added so far.
        expected: usize,
    },
    /// A masked input was added only in part, so the sum holds a fraction of it and cannot be
    /// unmasked.
    #[error(
        "client {client}'s masked input is only partly in the sum ({added} of {expected} \
         elements); the sum is spoilt and the round must be redone"
    )]
    PartialInput {
        /// The uploader.
        client: u32,
        /// Elements added.
        added: usize,
        /// Elements in a whole input.
        expected: usize,
    },
    /// A masked input holds a value of 2^b or more.
    #[error("masked input of client {client} has a value outside Z_(2^{bits})")]
    ValueOutOfRange {
        /// The uploader.
        client: u32,
        /// Element width.
        bits: u32,
    },
    /// A client that missed an earlier phase sent a message for a later one.
    #[error("client {client} is not taking part in the {phase} phase: it missed an earlier phase")]
    NotAParticipant {
        /// The client.
        client: u32,
        /// The phase it tried to take part in.
        phase: Phase,
    },
    /// A share is malformed or carries an x-coordinate other than the holder's.
    #[error("share of client {owner}'s secrets held by client {holder} is malformed or misplaced")]
    MalformedShare {
        /// Holder (receiver, or revealer) of the share.
        holder: u32,
        /// Owner of the shared secret.
        owner: u32,
    },
    /// A share from `sender` could not be decrypted or parsed.
    #[error("share from client {sender} is unusable: {source}")]
    ShareDecryptFailed {
        /// The sender.
        sender: u32,
        /// The cause.
        source: share_crypto::Error,
    },
    /// A peer advertised a key that cannot be used.
    #[error("client {client} advertised an unusable key: {source}")]
    BadPeerKey {
        /// The advertiser.
        client: u32,
        /// The cause.
        source: share_crypto::Error,
    },
    /// A survivor set is malformed (unsorted, repeated or unknown ids, or the receiving client
    /// itself missing) or disagrees with what this client knows.
    #[error("survivor set refused: {reason}")]
    InconsistentSurvivorSet {
        /// What is wrong.
        reason: String,
    },
    /// A revealed share is of the wrong kind for the owner's survival status.
    #[error(
        "client {client} revealed a {kind:?} share of client {owner}, which its status forbids"
    )]
    WrongShareKind {
        /// The revealer.
        client: u32,
        /// The owner of the secret.
        owner: u32,
        /// The kind revealed.
        kind: ShareKind,
    },
    /// A secret could not be reconstructed.
    #[error("cannot reconstruct the {kind:?} of client {owner}: {source}")]
    ReconstructionFailed {
        /// The owner of the secret.
        owner: u32,
        /// Which secret.
        kind: ShareKind,
        /// The cause.
        source: shamir::Error,
    },
    /// A reconstructed mask key does not match the key its owner advertised.
    #[error("reconstructed mask key of client {owner} does not match its advertisement")]
    ReconstructedKeyMismatch {
        /// The owner.
        owner: u32,
    },
}
