//! A CRL file that is re-read when it changes, without restarting the process.
//!
//! Each lookup costs one `stat`. The file is read again when its modification time, size or
//! inode changed, or while its modification time is so recent that a second write within the
//! same timestamp tick could go unnoticed (then the contents are compared by SHA-256). An
//! unreadable or malformed file makes lookups fail, so revocation fails closed, and so does a
//! file replaced by a CRL with a lower CRL number (a rollback that could un-revoke a site).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use quorum_crypto::digest::sha256;
use rustls_pki_types::CertificateRevocationListDer;
use x509_parser::num_bigint::BigUint;
use x509_parser::prelude::{CertificateRevocationList, FromDer};

use crate::error::{AttestError, Result};
use crate::files;

/// How recent a modification must be for the file to be re-read on every lookup.
const RACY_WINDOW: Duration = Duration::from_secs(2);

type Build<T> = Box<dyn Fn(CertificateRevocationListDer<'static>) -> Result<T> + Send + Sync>;

/// A value built from a CRL file, rebuilt whenever the file changes.
pub(crate) struct WatchedCrl<T> {
    path: PathBuf,
    build: Build<T>,
    current: Mutex<Snapshot<T>>,
}

struct Snapshot<T> {
    stamp: Stamp,
    digest: [u8; 32],
    /// The CRL number of the list loaded, if it carries one.
    number: Option<BigUint>,
    racy: bool,
    value: Arc<T>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    ino: u64,
}

impl<T> std::fmt::Debug for WatchedCrl<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedCrl")
            .field("path", &self.path)
            .finish()
    }
}

impl<T> WatchedCrl<T> {
    /// Loads the CRL at `path` (which must exist and parse) and builds the first value.
    pub(crate) fn new(
        path: &Path,
        build: impl Fn(CertificateRevocationListDer<'static>) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        let build: Build<T> = Box::new(build);
        let stamp = stamp(path)?;
        let bytes = files::read(path)?;
        let der = files::parse_crl(path, &bytes)?;
        let number = crl_number(&der);
        let value = Arc::new(build(der)?);
        Ok(Self {
            path: path.to_owned(),
            current: Mutex::new(Snapshot {
                stamp,
                digest: sha256(&bytes),
                number,
                racy: is_racy(stamp.modified),
                value,
            }),
            build,
        })
    }

    /// The value for the file's current contents.
    pub(crate) fn current(&self) -> Result<Arc<T>> {
        let stamp = stamp(&self.path)?;
        // Every update replaces the snapshot's fields together after all fallible work, so a
        // panic elsewhere cannot leave it half-written and the poison can be ignored.
        let mut snap = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if stamp == snap.stamp && !snap.racy {
            return Ok(Arc::clone(&snap.value));
        }
        let bytes = files::read(&self.path)?;
        let digest = sha256(&bytes);
        if digest != snap.digest {
            let der = files::parse_crl(&self.path, &bytes)?;
            let number = crl_number(&der);
            if let (Some(previous), Some(found)) = (&snap.number, &number)
                && found < previous
            {
                return Err(AttestError::CrlRolledBack {
                    path: self.path.clone(),
                    previous: previous.to_string(),
                    found: found.to_string(),
                });
            }
            let value = (self.build)(der)?;
            snap.value = Arc::new(value);
            snap.digest = digest;
            snap.number = number;
        }
        snap.stamp = stamp;
        snap.racy = is_racy(stamp.modified);
        Ok(Arc::clone(&snap.value))
    }
}

fn stamp(path: &Path) -> Result<Stamp> {
    let meta = fs::metadata(path).map_err(|e| AttestError::io("read", path, e))?;
    let modified = meta
        .modified()
        .map_err(|e| AttestError::io("read modification time of", path, e))?;
    Ok(Stamp {
        modified,
        len: meta.len(),
        ino: meta.ino(),
    })
}

/// The CRL number extension of `der`, if it parses and carries one.
fn crl_number(der: &CertificateRevocationListDer<'_>) -> Option<BigUint> {
    let (_, crl) = CertificateRevocationList::from_der(der.as_ref()).ok()?;
    crl.crl_number().cloned()
}

fn is_racy(modified: SystemTime) -> bool {
    // A modification time in the future also counts as recent.
    SystemTime::now()
        .duration_since(modified)
        .map_or(true, |age| age < RACY_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn rebuilds_only_when_contents_change() {
        let fed = crate::test_support::federation("fed", &["a"]);
        let pki = &fed.pki;
        let builds = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&builds);
        let watched = WatchedCrl::new(&pki.crl.path, move |der| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(der.as_ref().len())
        })
        .unwrap();
        let first = watched.current().unwrap();
        assert_eq!(builds.load(Ordering::SeqCst), 1, "unchanged file rebuilt");
        pki::revoke(&pki.ca.dir, "a").unwrap();
        pki::crl(&pki.ca.dir, &pki.crl.path).unwrap();
        let second = watched.current().unwrap();
        assert_eq!(builds.load(Ordering::SeqCst), 2);
        assert!(*second > *first, "CRL with an entry should be longer");
    }

    #[test]
    fn crl_rolled_back_to_an_older_number_fails_closed() {
        let fed = crate::test_support::federation("fed", &["a"]);
        let pki = &fed.pki;
        let older = fs::read(&pki.crl.path).unwrap();
        pki::revoke(&pki.ca.dir, "a").unwrap();
        pki::crl(&pki.ca.dir, &pki.crl.path).unwrap();
        let watched = WatchedCrl::new(&pki.crl.path, |der| Ok(der.as_ref().len())).unwrap();
        let newer = watched.current().unwrap();
        // Someone puts back the list from before "a" was revoked.
        fs::write(&pki.crl.path, &older).unwrap();
        match watched.current() {
            Err(e @ AttestError::CrlRolledBack { .. }) => {
                assert!(e.to_string().contains("number 1, older than the 2"), "{e}");
            }
            other => panic!("expected CrlRolledBack, got {other:?}"),
        }
        // A fresh list (number 3) is accepted again.
        pki::crl(&pki.ca.dir, &pki.crl.path).unwrap();
        assert!(*watched.current().unwrap() >= *newer);
    }

    #[test]
    fn missing_or_garbled_file_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki::init_federation("fed", dir.path()).unwrap();
        let watched = WatchedCrl::new(&pki.crl.path, |_| Ok(())).unwrap();
        fs::write(&pki.crl.path, b"not a crl").unwrap();
        assert!(matches!(
            watched.current(),
            Err(AttestError::PemMalformed { .. })
        ));
        fs::remove_file(&pki.crl.path).unwrap();
        assert!(matches!(watched.current(), Err(AttestError::Io { .. })));
    }
}
