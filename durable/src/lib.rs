//! Crash-safe file writes, in one place for every crate that keeps state on disk
//! (checkpoints and round state, privacy ledgers, CRLs, keys).
//!
//! [`replace`] writes a temporary file beside the target, syncs it, renames it
//! over the target and syncs the directory, so that after a crash or power cut
//! the target holds either its old or its new content, never a mix, and the
//! rename itself is durable. [`Mode::Secret`] files are created owner-only
//! (0600): they are never readable by others, not even between creation and a
//! later `chmod`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Who may read the file written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 0644 (before the umask): state and public material.
    Public,
    /// 0600 from creation: private keys and other secrets.
    Secret,
}

impl Mode {
    #[cfg(unix)]
    fn bits(self) -> u32 {
        match self {
            Self::Public => 0o644,
            Self::Secret => 0o600,
        }
    }
}

/// Replaces `path` with `contents` atomically and durably (see the crate docs).
/// The parent folder must exist. On failure the target is untouched and the
/// temporary file is removed.
pub fn replace(path: &Path, contents: &[u8], mode: Mode) -> io::Result<()> {
    replace_with(path, mode, |w| w.write_all(contents))
}

/// [`replace`] with the contents written by `write`, through a buffer: a file far larger than
/// memory can be replaced as safely as a small one.
pub fn replace_with(
    path: &Path,
    mode: Mode,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temporary_path(path)?;
    let written = (|| {
        // A leftover from a crash may have other permissions: start afresh.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = io::BufWriter::new(create(&tmp, mode, false)?);
        write(&mut file)?;
        let file = file.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        // Best effort: a leftover temporary file is harmless but untidy.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_parent(path)
}

/// Creates `path`, which must not exist, with `contents`, synced to disk.
/// Fails with [`io::ErrorKind::AlreadyExists`] rather than overwrite.
pub fn create_new(path: &Path, contents: &[u8], mode: Mode) -> io::Result<()> {
    let mut file = create(path, mode, true)?;
    file.write_all(contents)?;
    file.sync_all()?;
    sync_parent(path)
}

fn create(path: &Path, mode: Mode, exclusive: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true);
    if exclusive {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode.bits());
    #[cfg(not(unix))]
    let _ = mode;
    options.open(path)
}

/// `<name>.tmp` beside `path`.
fn temporary_path(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let mut tmp = name.to_os_string();
    tmp.push(".tmp");
    Ok(path.with_file_name(tmp))
}

/// Syncs the folder holding `path`, so a rename or creation in it survives a crash.
fn sync_parent(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
    // Folders cannot be opened for syncing elsewhere; the rename is as durable as the OS makes it.
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn replace_swaps_contents_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"one", Mode::Public).unwrap();
        replace(&path, b"two", Mode::Public).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_are_owner_only_even_over_a_permissive_leftover() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.key");
        // A temporary file left world-readable by an earlier crash.
        fs::write(dir.path().join("head.key.tmp"), b"old").unwrap();
        fs::set_permissions(
            dir.path().join("head.key.tmp"),
            fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        replace(&path, b"secret", Mode::Secret).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        create_new(&dir.path().join("other.key"), b"k", Mode::Secret).unwrap();
        assert_eq!(mode_of(&dir.path().join("other.key")), 0o600);
    }

    #[test]
    fn create_new_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.key");
        create_new(&path, b"first", Mode::Secret).unwrap();
        let err = create_new(&path, b"second", Mode::Secret).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"first");
    }

    #[test]
    fn a_failed_replace_leaves_the_target_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a folder holding a file: the rename fails.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("kept"), b"kept").unwrap();
        assert!(replace(&blocked, b"new", Mode::Public).is_err());
        assert!(!dir.path().join("blocked.tmp").exists());
        assert_eq!(fs::read(blocked.join("kept")).unwrap(), b"kept");
    }
}
