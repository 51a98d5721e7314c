//! Configuration files: `federation.toml` (operator) and `site.toml` (site).
//!
//! Each file is read in two phases. A raw struct mirrors the TOML exactly
//! (`#[serde(deny_unknown_fields)]`, so a misspelt key is an error, not a silently ignored
//! setting); validation then turns it into a policy whose values are known to be in range.
//! Every error names the file, the key and the reason, and carries the line and column when
//! the TOML itself is at fault.

pub mod federation;
pub mod site;

use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

/// A configuration file that could not be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the file ({source}); check the path and its permissions")]
    FileUnreadable {
        /// The file, as named by the caller.
        file: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{file}: TOML syntax error at line {line}, column {column}: {message}")]
    SyntaxInvalid {
        /// The file, as named by the caller.
        file: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the TOML parser expected.
        message: String,
    },
    /// Valid TOML that does not fit the schema: an unknown key, a value of the wrong type or a
    /// missing required key.
    #[error("{file}: key '{key}': {message} (line {line}, column {column})")]
    SchemaMismatch {
        /// The file, as named by the caller.
        file: String,
        /// Dotted path of the key at fault (the enclosing table for a missing key).
        key: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the schema expected.
        message: String,
    },
    /// A key holds a value of the right type but outside its allowed range, or contradicting
    /// another key.
    #[error("{file}: key '{key}': {reason}")]
    ValueInvalid {
        /// The file, as named by the caller.
        file: String,
        /// Dotted path of the key at fault.
        key: String,
        /// Why the value is refused, with the value itself.
        reason: String,
    },
}

impl ConfigError {
    /// Dotted path of the key at fault, when the error concerns one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::SchemaMismatch { key, .. } | Self::ValueInvalid { key, .. } => Some(key),
            Self::FileUnreadable { .. } | Self::SyntaxInvalid { .. } => None,
        }
    }
}

/// Reads a whole configuration file, naming it in the error.
fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::FileUnreadable {
        file: path.display().to_string(),
        source,
    })
}

/// Parses `text` into the raw struct `T`, mapping TOML and schema errors to [`ConfigError`].
fn parse_raw<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    let doc = DeTable::parse(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map_or((1, 1), |span| line_column(text, span.start));
        ConfigError::SyntaxInvalid {
            file: file.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let (line, column) = line_column(text, span.start);
        let message = e.message().trim().to_owned();
        let key = match missing_field(&message) {
            // serde reports a missing key at the span of its enclosing table.
            Some(field) => {
                let mut path = if doc.span() == span {
                    Vec::new()
                } else {
                    table_with_span(doc.get_ref(), &span).unwrap_or_default()
                };
                path.push(field.to_owned());
                path
            }
            None => key_at(doc.get_ref(), span.start).unwrap_or_default(),
        };
        ConfigError::SchemaMismatch {
            file: file.to_owned(),
            key: if key.is_empty() {
                "<top level>".to_owned()
            } else {
                key.join(".")
            },
            line,
            column,
            message,
        }
    })
}

/// 1-based line and character column of byte offset `pos` in `text`.
fn line_column(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = text.get(..pos).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// The innermost key whose name or value spans byte offset `pos`, as a path from the root.
fn key_at(table: &DeTable<'_>, pos: usize) -> Option<Vec<String>> {
    for (key, value) in table {
        let name = key.get_ref().to_string();
        let inner = match value.get_ref() {
            DeValue::Table(t) => key_at(t, pos),
            DeValue::Array(items) => items.iter().find_map(|item| match item.get_ref() {
                DeValue::Table(t) => key_at(t, pos),
                _ => None,
            }),
            _ => None,
        };
        if let Some(mut path) = inner {
            path.insert(0, name);
            return Some(path);
        }
        if key.span().contains(&pos) || value.span().contains(&pos) {
            return Some(vec![name]);
        }
    }
    None
}

/// Path of the table whose value spans exactly `span`.
fn table_with_span(table: &DeTable<'_>, span: &Range<usize>) -> Option<Vec<String>> {
    table.iter().find_map(|(key, value)| {
        let DeValue::Table(inner) = value.get_ref() else {
            return None;
        };
        let name = key.get_ref().to_string();
        if value.span() == *span {
            return Some(vec![name]);
        }
        let mut path = table_with_span(inner, span)?;
        path.insert(0, name);
        Some(path)
    })
}

/// The field name in serde's "missing field `name`" message.
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split('`')
        .next()
        .filter(|f| !f.is_empty())
}

/// Resolves a configured path against the directory of the file that names it.
fn resolve(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

/// The directory relative paths in `file` are resolved against.
fn base_dir(file: &str) -> PathBuf {
    Path::new(file)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Validation helpers that know which file they report on.
struct Check<'a> {
    file: &'a str,
}

impl Check<'_> {
    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::ValueInvalid {
            file: self.file.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    /// An integer within `range`, converted to the width the policy stores.
    fn int<T: TryFrom<i64>>(
        &self,
        key: &str,
        value: i64,
        range: RangeInclusive<i64>,
    ) -> Result<T, ConfigError> {
        let (lo, hi) = (*range.start(), *range.end());
        // Bounds that only reflect the stored width are not worth spelling out when too low.
        let open_ended = hi >= i64::from(u32::MAX);
        let reason = if value < lo && open_ended {
            format!("must be >= {lo} (got {value})")
        } else if !range.contains(&value) {
            format!("must be in {lo}..={hi} (got {value})")
        } else {
            // Callers pass ranges that fit `T`; a range that does not is reported, not panicked on.
            return T::try_from(value)
                .map_err(|_| self.invalid(key, format!("must fit in {lo}..={hi} (got {value})")));
        };
        Err(self.invalid(key, reason))
    }

    /// A finite number strictly greater than zero.
    fn positive(&self, key: &str, value: f64) -> Result<f64, ConfigError> {
        if value.is_finite() && value > 0.0 {
            Ok(value)
        } else {
            Err(self.invalid(key, format!("must be > 0 (got {value})")))
        }
    }

    /// A number in the half-open interval `[lo, hi)`.
    fn half_open(&self, key: &str, value: f64, lo: f64, hi: f64) -> Result<f64, ConfigError> {
        if value >= lo && value < hi {
            Ok(value)
        } else {
            Err(self.invalid(key, format!("must be in [{lo}, {hi}) (got {value})")))
        }
    }

    /// A name that travels in protocol messages and audit records: 1 to 64 characters from
    /// `[A-Za-z0-9._-]`.
    fn name(&self, key: &str, value: String) -> Result<String, ConfigError> {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(value)
        } else {
            Err(self.invalid(
                key,
                format!("must be 1 to 64 characters from [A-Za-z0-9._-] (got {value:?})"),
            ))
        }
    }

    /// A non-empty path.
    fn path(&self, key: &str, base: &Path, value: PathBuf) -> Result<PathBuf, ConfigError> {
        if value.as_os_str().is_empty() {
            Err(self.invalid(key, "must not be empty"))
        } else {
            Ok(resolve(base, value))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_characters_after_the_last_newline() {
        let text = "a = 1\nbé = x\n";
        assert_eq!(line_column(text, 0), (1, 1));
        // byte 6 is 'b', byte 9 is ' ' after the two-byte 'é'
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 9), (2, 3));
    }

    #[test]
    fn missing_field_extracts_the_name() {
        assert_eq!(missing_field("missing field `name`"), Some("name"));
        assert_eq!(missing_field("invalid type: string"), None);
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let base = base_dir("/etc/quorum/site.toml");
        assert_eq!(
            resolve(&base, "state".into()),
            PathBuf::from("/etc/quorum/state")
        );
        assert_eq!(resolve(&base, "/var/q".into()), PathBuf::from("/var/q"));
        assert_eq!(
            resolve(&base_dir("site.toml"), "state".into()),
            PathBuf::from("state")
        );
    }
}
