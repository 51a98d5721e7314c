//! Quorum's tamper-evident audit log.
//!
//! The aggregator and every client keep one. Each action is appended as a
//! [`Record`] and flushed to disk before the action is acknowledged; if the
//! log cannot be written, [`AuditLog::append`] returns [`Error::StoreFailed`]
//! and the node stops rather than act unaudited. Records form a SHA-256 hash
//! chain, and signed heads (Ed25519) commit to the chain at each round end.
//! An auditor checks a log offline with [`verify`], reads it with [`list`],
//! [`show`] and [`render_line`], exports it with [`export_jsonl`], and
//! cross-checks a client against the aggregator with [`reconcile`].
//!
//! ```
//! use quorum_audit::{AuditLog, Kind, MemoryStore, verify};
//! use serde_json::json;
//!
//! let store = MemoryStore::new();
//! let mut log = AuditLog::with_store(Box::new(store.clone()), "memory", "aggregator", None)?;
//! log.append(Kind::Start, None, None, json!({"version": "0.1.0"}))?;
//! log.append(Kind::ModelDigest, Some(1), None, json!({"sha256": "00".repeat(32), "round": 1}))?;
//! assert_eq!(verify(&store, None)?.records, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Format (version 1)
//!
//! This section is the specification; an independent verifier needs nothing else.
//!
//! **Storage.** A sled database; default tree; key = sequence number as
//! 8 bytes big-endian (so key order is numeric order); value = the record's
//! canonical bytes. Sequence numbers start at 0 and have no gaps.
//!
//! **Record.** A JSON object with exactly these members, shown in canonical
//! (sorted) order:
//!
//! | key | value |
//! |-----|-------|
//! | `actor` | string: `"aggregator"` or `"site:<name>"` |
//! | `details` | any JSON value, kind-specific (below) |
//! | `kind` | string, one of [`Kind::ALL`] by [`Kind::as_str`], e.g. `"model_digest"` |
//! | `prev_hash` | 64 lower-case hex digits: the hash of record `seq - 1`, or 32 zero bytes for seq 0 |
//! | `round` | integer in `0..2^32`, or `null` |
//! | `seq` | integer in `0..2^64`, equal to the storage key |
//! | `site` | string or `null` |
//! | `time` | string, RFC 3339, written in UTC (`Z`) |
//!
//! **Canonical bytes.** UTF-8 JSON with no whitespace outside strings:
//! - objects: `{`, members sorted by key compared as UTF-8 byte strings,
//!   each `"key":value`, separated by `,`, then `}`; keys are unique;
//! - arrays: `[`, elements in order separated by `,`, `]`;
//! - `true`, `false`, `null`;
//! - strings: `"`, then each character as itself except `"` → `\"`,
//!   `\` → `\\`, U+000A → `\n`, U+000D → `\r`, U+0009 → `\t`, U+0008 → `\b`,
//!   U+000C → `\f`, any other U+0000..U+001F → `\u00xx` (lower-case hex);
//!   `/`, U+007F and non-ASCII are written raw; then `"`;
//! - integers (values that fit an i64 or u64): decimal, `-` if negative, no
//!   leading zeros or `+`;
//! - other numbers (finite f64): the shortest digit string that parses back
//!   to the same f64 (the nearest such if several), in exponent form
//!   `d[.ddd]e<exp>` with no `+` and no leading zeros in the exponent:
//!   `0.1` → `1e-1`, `1.0` → `1e0`, `-2.5e-7` → `-2.5e-7`, `1.5e300` → `1.5e300`.
//!
//! A verifier rejects stored bytes that are not the canonical encoding of
//! what they parse to. Example (seq 7, prev hash = 32 bytes of `0x11`):
//!
//! ```text
//! {"actor":"aggregator","details":{"round":3,"sha256":"ab"},"kind":"model_digest","prev_hash":"1111…1111","round":3,"seq":7,"site":null,"time":"2025-01-31T12:00:00Z"}
//! ```
//!
//! **Chain.** `hash(n) = SHA-256(prev_hash(n) ‖ canonical_bytes(n))`, where
//! `prev_hash(n)` is the 32 raw bytes (not hex), and `prev_hash(n + 1) = hash(n)`.
//!
//! **Signed head.** A record of kind `signed_head` at seq `S ≥ 1` with
//! `details = {"head_hash": hex(hash(S-1)), "head_seq": S-1, "public_key":
//! hex(32-byte Ed25519 key), "signature": hex(64-byte Ed25519 signature)}`.
//! The signed message is the 60 bytes `"quorum-audit/head/v1"` (ASCII) ‖
//! `head_seq` (u64 big-endian) ‖ `head_hash` (32 raw bytes). A head's own
//! `prev_hash` equals `head_hash` in an untouched log; a rewritten and
//! re-linked chain keeps the old signed `head_hash` and is caught.
//!
//! **Export.** One line per record: the record object with an added member
//! `"hash"` (hex of `hash(n)`), in canonical form, then `\n`.
//!
//! **Details by kind** (agreed between the writers and [`reconcile`]):
//! `model_digest` = `{"sha256": hex, "round": r}`; `upload_digest` =
//! `{"sha256": hex, "bytes": n}`; `privacy_spent` = `{"rho": f, "epsilon": f,
//! "delta": f}`; `phase_completed` names its survivors and dropouts.
//!
//! # What is and is not detected
//!
//! [`verify`] names the first bad sequence number for an edited, deleted,
//! reordered or unparsable record, and for a forged, untrusted or stale
//! signed head. Cutting records off the end, or editing the very last
//! record, leaves a valid shorter chain: only a head obtained earlier and
//! kept elsewhere exposes it ([`verify_against`]). Without trusted keys, a
//! head proves only that its own key's holder signed it; whoever can write
//! the log and sign with a key the auditor accepts can rewrite it.

pub mod cli;
mod head;
mod log;
mod query;
mod reconcile;
mod record;
mod sled_lock;
mod store;
mod verify;

pub use head::{Ed25519Signer, HEAD_LABEL, Head, HeadSigner, head_message};
pub use log::{AuditLog, BoxedStore};
pub use query::{Filter, export_jsonl, export_line, import_jsonl, list, render_line, show};
pub use reconcile::{DigestMismatch, ReconcileReport, RoundDigest, reconcile};
pub use record::{GENESIS_HASH, Kind, Record, RecordError, chain_hash, write_canonical};
pub use store::{Durability, MemoryStore, SledStore, Store, StoreError, StoreIter};
#[cfg(any(test, feature = "failing-store"))]
pub use store::{FailOn, FailingStore};
pub use verify::{VerifyError, VerifyReport, verify, verify_against};

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
    /// The log's last record is damaged, so appending would extend a broken chain.
    #[error(
        "audit log at {location} has a damaged record at seq {seq}: {reason}; run `audit verify` on it and keep it as evidence before starting a new log"
    )]
    TailDamaged {
        /// Where the log is.
        location: String,
        /// The damaged record.
        seq: u64,
        /// What is wrong with it.
        reason: String,
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
    /// `append` was asked to write a `signed_head` record.
    #[error("signed_head records are written only by AuditLog::append_signed_head")]
    KindReserved,
    /// A signed head was requested from a log opened without a signer.
    #[error("the audit log at {location} has no head signer; open it with one to sign heads")]
    HeadSignerMissing {
        /// Where the log is.
        location: String,
    },
    /// A signed head was requested before any record was written.
    #[error("the audit log at {location} is empty; there is no head to sign yet")]
    LogEmpty {
        /// Where the log is.
        location: String,
    },
    /// The head signing key is not a usable Ed25519 key.
    #[error("head signing key rejected: {0}; supply an Ed25519 private key in PKCS#8 DER form")]
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
