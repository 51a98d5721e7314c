//! The authority's own audit trail. Every act that changes who may take part (a CA made, a
//! certificate issued or revoked, a CRL published) or what sites may run (a release key made, a
//! release signed) is an `admin_action` record, followed by a signed head, in a log beside the
//! key that performed it: `<ca>/audit` for the PKI, `<release key's folder>/release-audit` for
//! releases. Each log is signed by its own audit key (`<log>.key`), made together with the key
//! it watches, whose fingerprint the command prints for auditors to pin.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use quorum_audit::{AuditKey, AuditLog, Kind, key_path};
use serde_json::Value;

/// The authority's log of certificate acts, in the CA folder.
pub fn pki_log(ca: &Path) -> PathBuf {
    ca.join("audit")
}

/// The log of release acts, beside the release key.
pub fn release_log(release_key: &Path) -> PathBuf {
    release_key
        .parent()
        .unwrap_or(Path::new("."))
        .join("release-audit")
}

/// An authority's log, opened before the act it will record, so that an act is never done
/// when its record could not be written.
#[derive(Debug)]
pub struct AdminLog {
    audit: AuditLog,
}

impl AdminLog {
    /// Makes the log's audit key (with a new CA or release key), opens the log and returns the
    /// key's fingerprint for auditors to pin.
    pub fn create(log: &Path, actor: &str) -> anyhow::Result<(Self, String)> {
        let key = AuditKey::generate(&key_path(log), None)?;
        let fingerprint = key.fingerprint();
        Ok((Self::with_key(log, actor, key)?, fingerprint))
    }

    /// Opens the log at `log` with its audit key.
    pub fn open(log: &Path, actor: &str) -> anyhow::Result<Self> {
        let key_path = key_path(log);
        let key = AuditKey::load(&key_path).with_context(|| {
            format!(
                "the authority's audit key {} is missing, so this act could not be recorded and was not done; it is made with the CA (`pki init`) or the release key (`release keygen`), or by `quorum-aggregator audit keygen --out {}`",
                key_path.display(),
                key_path.display()
            )
        })?;
        Self::with_key(log, actor, key)
    }

    fn with_key(log: &Path, actor: &str, key: AuditKey) -> anyhow::Result<Self> {
        let audit = AuditLog::open(log, actor, Some(key))
            .with_context(|| format!("cannot open the audit log {}", log.display()))?;
        Ok(Self { audit })
    }

    /// Appends `action` with `details`, then a signed head: durable before the command reports
    /// success.
    pub fn record(mut self, action: &str, mut details: Value) -> anyhow::Result<()> {
        if let Value::Object(map) = &mut details {
            map.insert("action".into(), Value::from(action));
        }
        self.audit
            .append_and_sign(Kind::AdminAction, None, details)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn acts_are_recorded_with_a_signed_head_and_need_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let log = pki_log(dir.path());
        let err = AdminLog::open(&log, "authority").unwrap_err();
        assert!(format!("{err:#}").contains("was not done"), "{err:#}");
        let (first, fingerprint) = AdminLog::create(&log, "authority").unwrap();
        drop(first);
        let act = |action, details| {
            AdminLog::open(&log, "authority")
                .unwrap()
                .record(action, details)
                .unwrap()
        };
        act("pki_revoke", json!({"target": "beta"}));
        act("pki_crl", json!({"number": 2}));
        let store = quorum_audit::SledStore::open_existing(&log).unwrap();
        let report =
            quorum_audit::verify(&store, &quorum_audit::Checks::trusting(fingerprint)).unwrap();
        // audit_key, then each act with its head.
        assert_eq!((report.records, report.heads), (5, 2));
        let act = quorum_audit::show(&store, 1).unwrap().unwrap();
        assert_eq!(act.kind, Kind::AdminAction);
        assert_eq!(
            act.details,
            json!({"action": "pki_revoke", "target": "beta"})
        );
    }
}
