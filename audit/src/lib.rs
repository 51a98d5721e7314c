//! Quorum's tamper-evident audit log.
//!
//! The aggregator and every site keep one. Each action is appended as a [`Record`] and flushed
//! to disk before the action is acknowledged; if the log cannot be written,
//! [`AuditLog::append`] returns [`Error::StoreFailed`] and the node stops rather than act
//! unaudited. Records form a SHA-256 hash chain over their RFC 8785 encoding. Each node signs
//! its head at every round end with an audit key its operator made on purpose
//! ([`AuditKey::generate`], `quorum-audit keygen`), whose fingerprint is the log's first
//! record; the aggregator and the sites of a round store each other's signed heads
//! (`witness` records). An auditor checks a log with [`verify`], pinning the key's fingerprint
//! and passing the heads other logs witnessed ([`witnessed_heads`]), so that a rewrite,
//! truncation or rollback is named by round; reads it with [`list`], [`show`] and
//! [`render_line`], exports it with [`export_jsonl`], and re-checks an export with no Quorum
//! code at all (`audit/testdata/verify_export.py`, `docs/AUDIT.md`).
//!
//! ```
//! use quorum_audit::{AuditKey, AuditLog, Checks, Kind, MemoryStore, verify};
//! use serde_json::json;
//!
//! let store = MemoryStore::new();
//! let key = AuditKey::ephemeral();
//! let pinned = Checks::trusting(key.fingerprint());
//! let mut log = AuditLog::with_store(Box::new(store.clone()), "memory", "aggregator", Some(key))?;
//! log.append(Kind::Start, None, None, json!({"version": "0.1.0"}))?;
//! log.append(Kind::ModelDigest, Some(1), None, json!({"sha256": "00".repeat(32), "round": 1}))?;
//! let head = log.append_signed_head(Some(1))?;
//! // audit_key, start, model_digest, signed_head
//! assert_eq!(verify(&store, &pinned)?.records, 4);
//! assert_eq!(head.head.seq, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Format (version 2)
//!
//! This section is the specification; an independent verifier needs nothing else
//! (`audit/testdata/verify_export.py` is one, in Python, sharing no code with this crate).
//!
//! **Storage.** A sled database; default tree; key = sequence number as 8 bytes big-endian (so
//! key order is numeric order); value = the record's canonical bytes. Sequence numbers start at
//! 0 and have no gaps. Beside it, `<log>.jsonl` holds the same records as export lines, appended
//! and synced after each record: the copy auditors read while the node runs.
//!
//! **Record.** A JSON object with exactly these members:
//!
//! | key | value |
//! |-----|-------|
//! | `actor` | string naming the node: `"aggregator"`, `"site:<name>"`, or for the operator's own acts `"authority"` (certificates) and `"releases"`; the same in every record of a log |
//! | `details` | any JSON value, kind-specific (below) |
//! | `kind` | string, one of [`Kind::ALL`] by [`Kind::as_str`], e.g. `"model_digest"` |
//! | `prev_hash` | 64 lower-case hex digits: the hash of record `seq - 1`, or 32 zero bytes for seq 0 |
//! | `round` | integer in `0..2^32`, or `null` |
//! | `seq` | integer in `0..=2^53`, equal to the storage key |
//! | `site` | string or `null` |
//! | `time` | string, RFC 3339, written in UTC (`Z`) |
//!
//! **Canonical bytes.** RFC 8785, the JSON Canonicalization Scheme: members sorted by key (as
//! UTF-16 code units), no whitespace, minimal string escapes, numbers as ECMAScript writes
//! doubles (`0.1`, `1`, `1e-7`, `1.5e+300`). Every number is an IEEE double, so integers stay
//! within ±2^53 (a writer refuses others: [`Error::DetailsInexact`]). A verifier rejects stored
//! bytes that are not the canonical encoding of what they parse to. Example (seq 7, prev hash =
//! 32 bytes of `0x11`):
//!
//! ```text
//! {"actor":"aggregator","details":{"round":3,"sha256":"ab"},"kind":"model_digest","prev_hash":"1111…1111","round":3,"seq":7,"site":null,"time":"2025-01-31T12:00:00Z"}
//! ```
//!
//! **Chain.** `hash(n) = SHA-256(prev_hash(n) ‖ canonical_bytes(n))`, where `prev_hash(n)` is
//! the 32 raw bytes (not hex), and `prev_hash(n + 1) = hash(n)`.
//!
//! **Audit key.** A record of kind `audit_key` with `details = {"public_key": hex(32-byte
//! Ed25519 key), "fingerprint": hex(SHA-256(public key)), "previous": null, "endorsement":
//! null}` puts a key in force; a node writes it as its log's first record. A later one rotates
//! the key: `previous` is the fingerprint of the key in force and `endorsement` is that key's
//! Ed25519 signature over `"quorum-audit/rotate/v1"` (ASCII) ‖ the new public key (32 bytes).
//!
//! **Signed head.** A record of kind `signed_head` at seq `S ≥ 1` with `details = {"head_hash":
//! hex(hash(S-1)), "head_seq": S-1, "public_key": hex(key), "signature": hex(64 bytes)}`, signed
//! by the key in force. The signed message is the 60 bytes `"quorum-audit/head/v1"` (ASCII) ‖
//! `head_seq` (u64 big-endian) ‖ `head_hash` (32 raw bytes). A rewritten and re-linked chain
//! keeps the old signed `head_hash` and is caught.
//!
//! **Witness.** A record of kind `witness` holds another node's signed head, received at a
//! round end and checked: the signed-head details plus `"node"` (whose head it is). Verifying
//! node X's log with the `witness` records other logs hold for X ([`Checks::expected`]) catches
//! a log cut, rolled back or rewritten behind any witnessed head, naming the round.
//!
//! **Export.** One line per record: the record object with an added member `"hash"` (hex of
//! `hash(n)`), in canonical form, then `\n`.
//!
//! **Details by kind** (agreed between the writers and [`reconcile`]):
//! `model_digest` = `{"sha256": hex, "round": r}`; `upload_digest` =
//! `{"sha256": hex, "bytes": n}`; `privacy_spent` = `{"rho": f, "epsilon": f,
//! "delta": f}`; `phase_completed` names its survivors and dropouts.
//!
//! # What is and is not detected
//!
//! [`verify`] names the first bad sequence number for an edited, deleted, reordered or
//! unparsable record, for a head not signed by the key in force, and for a key change the
//! previous key did not endorse. [`AuditLog::open`] runs it over the whole chain before
//! appending. Whoever holds a node's audit key and can write its state folder can still write a
//! different log that verifies on its own terms; that is caught only from outside: by a pinned
//! fingerprint (a log re-signed with another key), and by heads held elsewhere (`--expect-head`,
//! other nodes' `witness` records): a cut, rollback, fresh start or rewrite behind a witnessed
//! head. Records after the last head anyone else holds can still be dropped or changed.

#[cfg(feature = "node")]
pub mod cli;
mod head;
mod keys;
mod log;
#[cfg(feature = "node")]
mod mirror;
mod query;
mod reconcile;
mod record;
mod retention;
#[cfg(feature = "node")]
mod sled_lock;
#[cfg(feature = "node")]
mod sled_store;
mod store;
mod verify;
mod witness;

pub use head::{HEAD_LABEL, Head, SignedHead, head_message};
pub use keys::{
    AuditKey, Endorsement, ROTATE_LABEL, endorsement_valid, fingerprint, rotation_message,
};
#[cfg(feature = "node")]
pub use keys::{endorsement_path, key_path};
pub use log::{AuditLog, BoxedStore};
#[cfg(feature = "node")]
pub use mirror::mirror_path;
pub use query::{Filter, export_jsonl, export_line, import_jsonl, list, render_line, show};
pub use reconcile::{DigestMismatch, ReconcileReport, RoundDigest, reconcile};
pub use record::{
    GENESIS_HASH, Kind, MAX_EXACT_INTEGER, Record, RecordError, chain_hash, check_exact,
    write_canonical,
};
pub use retention::Pruned;
#[cfg(feature = "node")]
pub use sled_store::{Durability, SledStore};
#[cfg(any(test, feature = "failing-store"))]
pub use store::{FailOn, FailingStore};
pub use store::{MemoryStore, Store, StoreError, StoreIter};
pub use verify::{Checks, Expected, VerifyError, VerifyReport, verify};
pub use witness::{last_witnessed, witnessed_heads};

/// `path` with `suffix` added to its file name: the files that go with a log or a key.
#[cfg(feature = "node")]
pub(crate) fn suffixed(path: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    std::path::PathBuf::from(name)
}

/// Why an audit log operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The log could not be opened or its tail read.
    #[error(
        "audit log could not be opened at {location}: {cause}; check the path and that no other process has it open"
    )]
    OpenFailed {
        /// Where the log is.
        location: String,
        /// What failed.
        cause: String,
    },
    /// Another handle or process holds the log's lock.
    #[error(
        "audit log at {location} is locked by {holder} (waited {waited_ms} ms); stop that process, or read a copy of the log folder"
    )]
    LogLocked {
        /// Where the log is.
        location: String,
        /// Who holds the lock, as far as the platform says.
        holder: String,
        /// How long opening waited for it.
        waited_ms: u128,
    },
    /// An auditor asked for a log that does not exist.
    #[error("no audit log exists at {location}; check the path")]
    LogMissing {
        /// The path given.
        location: String,
    },
    /// A record could not be written or flushed. The node must stop.
    #[error(
        "audit log could not be written at {location}: {cause}; refusing to continue unaudited"
    )]
    StoreFailed {
        /// Where the log is.
        location: String,
        /// What failed.
        cause: String,
    },
    /// The store could not be read.
    #[error("audit log could not be read: {0}")]
    StoreUnreadable(StoreError),
    /// The log does not verify, so appending would extend a broken chain.
    #[error(
        "audit log at {location} does not verify: {error}; keep it as evidence (`quorum-audit verify`) and start a new log elsewhere"
    )]
    LogDamaged {
        /// Where the log is.
        location: String,
        /// The first thing wrong with it.
        error: VerifyError,
    },
    /// The log belongs to another node.
    #[error("audit log at {location} is written by {found:?}, not {actor:?}; check the path")]
    ActorMismatch {
        /// Where the log is.
        location: String,
        /// Who wrote it.
        found: String,
        /// Who tried to open it.
        actor: String,
    },
    /// The node's audit key is not the one in force, and nothing hands the log over to it.
    #[error(
        "audit log at {location} is signed by key {in_force}, and key {offered} cannot take over: {why}; use the old key, or make the new one with `quorum-audit keygen --out NEW --endorse-with OLD`"
    )]
    KeyChanged {
        /// Where the log is.
        location: String,
        /// Fingerprint of the key in force.
        in_force: String,
        /// Fingerprint of the key offered.
        offered: String,
        /// What is missing.
        why: String,
    },
    /// An audit key file could not be read or written.
    #[error("audit key file {path}: {cause}")]
    KeyFile {
        /// The file.
        path: String,
        /// What failed.
        cause: String,
    },
    /// Every sequence number has been used.
    #[error("audit log at {location} has used every sequence number; start a new log")]
    SeqExhausted {
        /// Where the log is.
        location: String,
    },
    /// A stored record does not parse.
    #[error("record {seq} is unreadable: {source}; run `audit verify` for a diagnosis")]
    RecordUnreadable {
        /// The record.
        seq: u64,
        /// Why.
        source: RecordError,
    },
    /// `append` was asked to write a record only the log itself writes.
    #[error("{0} records are written only by the audit log itself")]
    KindReserved(Kind),
    /// `append` was asked to store a witness that is not a validly signed head.
    #[error("a witness record must hold a node name and a head with a valid signature")]
    WitnessInvalid,
    /// Record details hold a number RFC 8785 cannot encode exactly.
    #[error("{kind} details cannot be recorded exactly: {reason}")]
    DetailsInexact {
        /// The record kind.
        kind: Kind,
        /// Which number.
        reason: RecordError,
    },
    /// A signed head was requested from a log opened without a signer.
    #[error("the audit log at {location} has no head signer; open it with one to sign heads")]
    HeadSignerMissing {
        /// Where the log is.
        location: String,
    },
    /// A prune range that does not leave a verifiable log.
    #[error(
        "cannot prune {location} before seq {before}: the log holds seqs {first}..={last}; prune a range that starts at its first record and keeps at least its last"
    )]
    PruneRange {
        /// Where the log is.
        location: String,
        /// The seq asked for.
        before: u64,
        /// The first seq in the store.
        first: u64,
        /// The last seq in the store.
        last: u64,
    },
    /// A signed head was requested before any record was written.
    #[error("the audit log at {location} is empty; there is no head to sign yet")]
    LogEmpty {
        /// Where the log is.
        location: String,
    },
    /// The head signing key is not a usable Ed25519 key.
    #[error("audit key rejected: {0}; supply an Ed25519 private key in PKCS#8 form")]
    SigningKeyRejected(String),
    /// The system clock cannot be written as RFC 3339.
    #[error("the system clock cannot be written as an RFC 3339 time: {0}; check the clock")]
    ClockUnformattable(String),
    /// A time given by the user is not RFC 3339.
    #[error("{value:?} is not an RFC 3339 time; write it like 2025-01-31T12:00:00Z")]
    TimeInvalid {
        /// The text given.
        value: String,
    },
    /// A kind name given by the user is unknown.
    #[error("{value:?} is not a record kind; use one of: {expected}")]
    KindUnknown {
        /// The text given.
        value: String,
        /// The valid names.
        expected: String,
    },
    /// A head given by the user is not `<seq>:<64 hex digits>`.
    #[error("{value:?} is not a head; write it as <seq>:<64 hex digits>")]
    HeadInvalid {
        /// The text given.
        value: String,
    },
    /// A line of a JSONL export is not a valid record.
    #[error("export line {line} is not a valid record: {reason}")]
    ExportLineInvalid {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The export could not be written.
    #[error("export could not be written: {0}")]
    ExportWriteFailed(std::io::Error),
    /// An imported export is not an intact chain.
    #[error("the export does not verify: {0}")]
    ExportBroken(VerifyError),
    /// A `model_digest` record lacks the agreed details.
    #[error(
        "{origin} model_digest record {seq} lacks details {{\"sha256\": <64 hex digits>, \"round\": <u32>}}"
    )]
    ModelDigestInvalid {
        /// `"client"` or `"aggregator"`.
        origin: &'static str,
        /// The record.
        seq: u64,
    },
}
