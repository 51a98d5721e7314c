//! File helpers: private keys with owner-only permissions, atomic replacement, PEM loading.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use quorum_durable::Mode;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::error::{AttestError, Result};

/// Reads a whole file.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| AttestError::io("read", path, e))
}

/// Creates a directory and its parents.
pub(crate) fn create_dir_all(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| AttestError::io("create directory", path, e))
}

/// Creates `path` (which must not exist) with `contents`, owner-only if `secret`.
pub(crate) fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    let mode = if secret { Mode::Secret } else { Mode::Public };
    quorum_durable::create_new(path, contents, mode).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => AttestError::AlreadyExists {
            path: path.to_owned(),
        },
        _ => AttestError::io("create", path, e),
    })
}

/// Replaces `path` with `contents` atomically, so that readers (a server reloading its CRL)
/// never see a half-written file.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    quorum_durable::replace(path, contents, Mode::Public)
        .map_err(|e| AttestError::io("write", path, e))
}

/// Refuses a private key file that group or others may access.
pub fn check_key_permissions(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| AttestError::io("read", path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AttestError::KeyFilePermissive {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Loads all certificates of a PEM file (at least one).
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, "certificate", e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(
            path,
            "certificate",
            "no CERTIFICATE block".into(),
        ));
    }
    Ok(certs)
}

/// Loads the first certificate of a PEM file.
pub(crate) fn load_cert(path: &Path) -> Result<CertificateDer<'static>> {
    let mut certs = load_certs(path)?;
    // load_certs never returns an empty list.
    Ok(certs.swap_remove(0))
}

/// Loads a private key from a PEM file after checking its permissions.
pub(crate) fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    check_key_permissions(path)?;
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| pem_error(path, "private key", e.to_string()))
}

/// Loads a CRL from a PEM file.
pub(crate) fn load_crl(path: &Path) -> Result<CertificateRevocationListDer<'static>> {
    let bytes = read(path)?;
    parse_crl(path, &bytes)
}

/// Parses PEM bytes read from `path` as a CRL.
pub(crate) fn parse_crl(
    path: &Path,
    bytes: &[u8],
) -> Result<CertificateRevocationListDer<'static>> {
    CertificateRevocationListDer::from_pem_slice(bytes)
        .map_err(|e| pem_error(path, "CRL", e.to_string()))
}

fn pem_error(path: &Path, expected: &'static str, reason: String) -> AttestError {
    AttestError::PemMalformed {
        path: path.to_owned(),
        expected,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_owner_only_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new(&path, b"secret", true).unwrap();
        check_key_permissions(&path).unwrap();
        assert!(matches!(
            write_new(&path, b"other", true),
            Err(AttestError::AlreadyExists { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }

    #[test]
    fn group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new(&path, b"secret", true).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = check_key_permissions(&path).unwrap_err();
        assert!(
            matches!(err, AttestError::KeyFilePermissive { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn atomic_write_replaces_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
