//! The crate's error type: one variant per fact, each message saying what to do next.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in identity, PKI, TLS configuration, releases and attestation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// A file or directory could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done ("read", "write", "create directory", ...).
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: io::Error,
    },
    /// A private key file is readable or writable by group or others.
    #[error(
        "private key {path} has mode {mode:o}, which lets other users read it; run `chmod 600 {path}`"
    )]
    KeyFilePermissive {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A site's certificate signing request was refused.
    #[error(
        "refusing the certificate signing request {path}: {reason}; the site makes a new one with \
         `quorum-client keygen --federation FEDERATION --site NAME --out DIR`"
    )]
    CsrRefused {
        /// The request file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Something that must not be overwritten is already there.
    #[error("{path} already exists; remove it or choose another output location")]
    AlreadyExists {
        /// The existing file or directory.
        path: PathBuf,
    },
    /// A federation or site name is not usable in file names and certificate URIs.
    #[error(
        "invalid name {name:?}: {reason} (use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with . or -)"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A PEM file holds no usable object of the expected kind.
    #[error("{path} does not contain a valid {expected}: {reason}")]
    PemMalformed {
        /// The file.
        path: PathBuf,
        /// What was expected ("certificate", "private key", "CRL").
        expected: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// The CA state file is missing fields or inconsistent with the CA files.
    #[error("CA state {path} is unusable: {reason}; restore it from backup or re-run `pki init`")]
    CaStateInvalid {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificate or CRL generation failed inside rcgen.
    #[error("cannot generate {what}: {source}")]
    Generation {
        /// What was being generated.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// Validity must be at least one day.
    #[error("validity of {days} days is not allowed; give at least 1 day")]
    ValidityTooShort {
        /// The requested number of days.
        days: u32,
    },
    /// No issued certificate matched a serial number or site name.
    #[error("no unrevoked certificate has serial or name {query:?}; run `pki list` to see them")]
    NoMatchingCertificate {
        /// The serial number or name that was asked for.
        query: String,
    },
    /// A certificate could not be parsed or lacks a Quorum identity.
    #[error("certificate is not a Quorum certificate: {reason}")]
    CertificateMalformed {
        /// What is wrong with it.
        reason: String,
    },
    /// A private key does not belong to the certificate it was paired with.
    #[error(
        "private key {key} does not match certificate {cert}; the bundle mixes files from different issues"
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A private key is not a usable Ed25519 PKCS#8 key.
    #[error("{path} is not an Ed25519 PKCS#8 private key: {reason}")]
    KeyUnusable {
        /// The key file.
        path: PathBuf,
        /// ring's complaint.
        reason: String,
    },
    /// The certificate was not issued by the federation's CA.
    #[error("certificate of {subject:?} was not issued by this federation's CA")]
    CertificateFromAnotherCa {
        /// The certificate's common name, as claimed.
        subject: String,
    },
    /// The certificate is on the CA's revocation list.
    #[error("certificate of {subject:?} (serial {serial}) has been revoked")]
    CertificateRevoked {
        /// The certificate's common name.
        subject: String,
        /// Its serial number in hex.
        serial: String,
    },
    /// The certificate's validity period is over.
    #[error("certificate of {subject:?} expired at {not_after}; issue a new bundle")]
    CertificateExpired {
        /// The certificate's common name.
        subject: String,
        /// Its end of validity.
        not_after: time::OffsetDateTime,
    },
    /// The certificate failed another check of the path validation.
    #[error("certificate of {subject:?} is not acceptable: {source}")]
    CertificateRejected {
        /// The certificate's common name.
        subject: String,
        /// webpki's reason.
        #[source]
        source: webpki::Error,
    },
    /// The certificate belongs to a different federation.
    #[error("certificate belongs to federation {found:?}, not {expected:?}")]
    FederationMismatch {
        /// This side's federation.
        expected: String,
        /// The certificate's federation.
        found: String,
    },
    /// A roster is pinned and the site is not on it.
    #[error("site {site:?} is not in this site's roster ([policy.roster] in site.toml)")]
    NotInRoster {
        /// The site the certificate names.
        site: String,
    },
    /// The certificate's key is not the one the roster pins for its site.
    #[error(
        "the certificate of {site:?} has a key other than the one pinned in the roster; a \
         second certificate for a member is refused"
    )]
    RosterKeyMismatch {
        /// The site the certificate names.
        site: String,
    },
    /// The certificate names a different site than the one that was expected.
    #[error("certificate is for site {found:?}, but the message claims to come from {expected:?}")]
    SiteMismatch {
        /// The site the caller expected.
        expected: String,
        /// The site in the certificate.
        found: String,
    },
    /// A signature made with a site's certificate key does not verify.
    #[error("signature by site {site:?} does not verify with its certificate key")]
    PeerSignatureInvalid {
        /// The site that supposedly signed.
        site: String,
    },
    /// A CRL replaced by one with a lower CRL number: an older list that may un-revoke
    /// certificates. Every connection is refused until a list at least as new is in place.
    #[error(
        "CRL {path} has number {found}, older than the {previous} already loaded; refusing connections until a CRL at least as new is in place (regenerate it with `pki crl`)"
    )]
    CrlRolledBack {
        /// The CRL file.
        path: PathBuf,
        /// The number of the CRL loaded before.
        previous: String,
        /// The number of the CRL now in the file.
        found: String,
    },
    /// The CRL file could not be parsed or is not signed by the CA.
    #[error("CRL {path} is unusable: {reason}; regenerate it with `pki crl`")]
    CrlUnusable {
        /// The CRL file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A revocation list relayed by the aggregator failed a check: not the CA's, stale, older
    /// than the one in use, or revoking the aggregator itself.
    #[error("the revocation list relayed by the aggregator is refused: {reason}")]
    RelayedCrlRefused {
        /// What is wrong.
        reason: String,
    },
    /// rustls refused a configuration.
    #[error("TLS configuration rejected: {0}")]
    TlsConfig(#[from] rustls::Error),
    /// rustls could not build a certificate verifier.
    #[error("cannot build certificate verifier: {0}")]
    VerifierBuild(#[from] rustls::server::VerifierBuilderError),
    /// The keying-material exporter could not be used on a connection.
    #[error("cannot export keying material from the TLS connection: {reason}")]
    ExporterUnavailable {
        /// Why not.
        reason: String,
    },
    /// A release manifest is signed by a key that is not in the trusted list.
    #[error("release is signed by key {key}, which is not among the trusted release keys")]
    ReleaseKeyUntrusted {
        /// The signer's public key in hex.
        key: String,
    },
    /// A release manifest's signature does not verify.
    #[error("release signature does not verify with key {key}; the manifest was altered")]
    ReleaseSignatureInvalid {
        /// The claimed signer's public key in hex.
        key: String,
    },
    /// The binary on disk does not match the signed manifest.
    #[error("{path} has SHA-256 {actual}, but the signed release says {expected}")]
    BinaryDigestMismatch {
        /// The binary that was hashed.
        path: PathBuf,
        /// The digest in the manifest.
        expected: String,
        /// The digest of the file.
        actual: String,
    },
    /// The release version is not on the allowed list.
    #[error("release version {version:?} is not allowed (allowed: {allowed:?})")]
    VersionNotAllowed {
        /// The manifest's version.
        version: String,
        /// The allowed versions.
        allowed: Vec<String>,
    },
    /// A JSON document could not be read or written.
    #[error("{what} is not valid JSON of the expected shape: {source}")]
    Json {
        /// What was being (de)serialized.
        what: &'static str,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// A hex field has the wrong length or characters.
    #[error("{field} must be {expected_len} hex characters")]
    HexMalformed {
        /// The field.
        field: &'static str,
        /// Its required length in hex characters.
        expected_len: usize,
    },
    /// Evidence was bound to another TLS session than the one it arrived on.
    #[error("evidence was produced for another TLS session (replay)")]
    EvidenceReplayed,
    /// The client's executable digest differs from the signed release.
    #[error(
        "client binary does not match signed release {version}: expected {expected}, got {actual}"
    )]
    ClientBinaryMismatch {
        /// The release version.
        version: String,
        /// The digest in the signed manifest.
        expected: String,
        /// The digest the client reported.
        actual: String,
    },
    /// A release pins shared libraries, but the client measured none of them.
    #[error(
        "release {version} pins {count} shared libraries but the client reported none; run the \
         client from its release bundle"
    )]
    LibrariesNotMeasured {
        /// The release version.
        version: String,
        /// How many libraries the release pins.
        count: usize,
    },
    /// The client loaded a shared library that its release does not contain.
    #[error(
        "client loaded {path}, which release {version} does not contain (a library from outside \
         the bundle, for example through LD_PRELOAD or LD_LIBRARY_PATH)"
    )]
    LibraryNotInRelease {
        /// The release version.
        version: String,
        /// Where the client loaded it from.
        path: String,
    },
    /// A shared library the client loaded differs from the one in its release.
    #[error(
        "client loaded {path} with SHA-256 {actual}, but release {version} has {expected} for it"
    )]
    LibraryMismatch {
        /// The release version.
        version: String,
        /// Where the client loaded it from.
        path: String,
        /// The digest in the signed manifest.
        expected: String,
        /// The digest the client reported.
        actual: String,
    },
    /// A release bundle is not what its signed manifest lists.
    #[error("release bundle {bundle}: {problem}")]
    BundleInvalid {
        /// The bundle (archive or folder).
        bundle: PathBuf,
        /// What is wrong, naming the file.
        problem: String,
    },
    /// An external tool the bundler runs failed.
    #[error("{tool} failed on {path}: {reason}")]
    ToolFailed {
        /// The tool (`ldd`).
        tool: &'static str,
        /// The file it ran on.
        path: PathBuf,
        /// Its error output.
        reason: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = AttestError> = std::result::Result<T, E>;

impl AttestError {
    /// An I/O error on `path` while doing `action`.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
