//! The live copy of a log that auditors read while the node runs.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::query::{export_jsonl, export_line};
use crate::record::Record;
use crate::store::Store;

/// Where [`AuditLog::open`] keeps the live JSONL copy of the log at `path`: `<path>.jsonl`.
pub fn mirror_path(path: &Path) -> PathBuf {
    crate::suffixed(path, ".jsonl")
}

/// The live copy: every record as an export line ([`export_line`]), appended and synced right
/// after the store's flush. Readers need no lock: the file only grows while the node runs, and
/// a reader ignores a last line without its newline (a write in progress). It is rebuilt from
/// the store on open, so a crash between the two writes leaves nothing missing.
#[derive(Debug)]
pub(crate) struct Mirror {
    pub(crate) path: PathBuf,
    file: std::fs::File,
}

impl Mirror {
    pub(crate) fn rebuild(path: &Path, store: &dyn Store) -> Result<Self, Error> {
        let failed = |e: std::io::Error| Error::OpenFailed {
            location: path.display().to_string(),
            cause: e.to_string(),
        };
        let mut text = Vec::new();
        export_jsonl(store, &mut text)?;
        let current = std::fs::read(path).ok();
        if current.as_deref() != Some(text.as_slice()) {
            quorum_durable::replace(path, &text, quorum_durable::Mode::Public).map_err(failed)?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(failed)?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    pub(crate) fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let mut line = export_line(record);
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()
    }
}
