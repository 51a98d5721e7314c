//! A change of the roster a site pins (`[policy.roster]`): who may be its SecAgg+ peers. A site
//! does not take an edited roster silently; it must be accepted on purpose, and the change goes
//! on the site's record.

use std::collections::BTreeMap;

use serde::Serialize;

/// What changed between the roster a site last ran with and the one in its `site.toml`
/// (names mapped to hex key fingerprints).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RosterChange {
    /// Members new to the roster.
    pub added: Vec<String>,
    /// Members no longer in it.
    pub removed: Vec<String>,
    /// Members pinned to another key.
    pub rekeyed: Vec<String>,
}

impl RosterChange {
    /// The change from `before` to `after`; `None` when they are the same.
    pub fn between(
        before: &BTreeMap<String, String>,
        after: &BTreeMap<String, String>,
    ) -> Option<Self> {
        let change = Self {
            added: after
                .keys()
                .filter(|s| !before.contains_key(*s))
                .cloned()
                .collect(),
            removed: before
                .keys()
                .filter(|s| !after.contains_key(*s))
                .cloned()
                .collect(),
            rekeyed: after
                .iter()
                .filter(|(s, key)| before.get(*s).is_some_and(|k| k != *key))
                .map(|(s, _)| s.clone())
                .collect(),
        };
        (change != Self::default()).then_some(change)
    }
}

impl std::fmt::Display for RosterChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("added", &self.added),
            ("removed", &self.removed),
            ("pinned to another key", &self.rekeyed),
        ]
        .into_iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("{what}: {}", names.join(", ")))
        .collect();
        f.write_str(&parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(s, k)| (s.to_string(), k.to_string()))
            .collect()
    }

    #[test]
    fn names_each_member_added_removed_or_rekeyed() {
        let before = roster(&[("alpha", "aa"), ("beta", "bb"), ("gamma", "cc")]);
        let after = roster(&[("alpha", "aa"), ("beta", "b2"), ("delta", "dd")]);
        let change = RosterChange::between(&before, &after).unwrap();
        assert_eq!(change.added, ["delta"]);
        assert_eq!(change.removed, ["gamma"]);
        assert_eq!(change.rekeyed, ["beta"]);
        assert_eq!(
            change.to_string(),
            "added: delta; removed: gamma; pinned to another key: beta"
        );
        assert_eq!(RosterChange::between(&before, &before), None);
    }
}
