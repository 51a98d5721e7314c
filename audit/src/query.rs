//! Reading a log for people and tools: list, show, render, export, import.

use std::io::Write;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Error;
use crate::record::{Kind, Record, chain_hash, parse_hash, write_canonical};
use crate::store::{MemoryStore, Store, StoreError};

/// Which records [`list`] returns; `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only records about this round.
    pub round: Option<u32>,
    /// Only records about this site.
    pub site: Option<String>,
    /// Only records of this kind.
    pub kind: Option<Kind>,
    /// Only records written at or after this RFC 3339 time.
    pub since: Option<String>,
}

fn parse_time(value: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(value, &Rfc3339).ok()
}

/// Reads and parses every record in order.
pub(crate) fn records(store: &dyn Store) -> impl Iterator<Item = Result<Record, Error>> + '_ {
    store.iter().map(|entry| {
        let (seq, bytes) = entry.map_err(Error::StoreUnreadable)?;
        Record::from_canonical(&bytes).map_err(|source| Error::RecordUnreadable { seq, source })
    })
}

/// The records that match `filter`, in sequence order.
pub fn list(store: &dyn Store, filter: &Filter) -> Result<Vec<Record>, Error> {
    let since = filter
        .since
        .as_deref()
        .map(|s| {
            parse_time(s).ok_or_else(|| Error::TimeInvalid {
                value: s.to_owned(),
            })
        })
        .transpose()?;
    let mut out = Vec::new();
    for record in records(store) {
        let record = record?;
        let keep = filter.round.is_none_or(|r| record.round == Some(r))
            && filter.site.as_deref().is_none_or(|s| record.site.as_deref() == Some(s))
            && filter.kind.is_none_or(|k| record.kind == k)
            // Record times are checked to be RFC 3339 when parsed.
            && since.is_none_or(|since| parse_time(&record.time).is_some_and(|t| t >= since));
        if keep {
            out.push(record);
        }
    }
    Ok(out)
}

/// The record at `seq`, if present.
pub fn show(store: &dyn Store, seq: u64) -> Result<Option<Record>, Error> {
    let Some(bytes) = store.get(seq).map_err(Error::StoreUnreadable)? else {
        return Ok(None);
    };
    Record::from_canonical(&bytes)
        .map(Some)
        .map_err(|source| Error::RecordUnreadable { seq, source })
}

/// One export line: the record's canonical object with a `"hash"` member
/// (its hash in hex) added, encoded canonically, without the newline.
pub fn export_line(record: &Record) -> String {
    let mut value = record.to_value();
    if let Value::Object(map) = &mut value {
        map.insert("hash".into(), Value::from(hex::encode(record.hash())));
    }
    let mut out = Vec::new();
    write_canonical(&value, &mut out);
    // The canonical encoding writes only UTF-8 (strings come from `String`s).
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes every record as one JSON line (see [`export_line`]) and returns how
/// many were written.
pub fn export_jsonl(store: &dyn Store, writer: &mut dyn Write) -> Result<u64, Error> {
    let mut count = 0;
    for record in records(store) {
        let mut line = export_line(&record?);
        line.push('\n');
        writer
            .write_all(line.as_bytes())
            .map_err(Error::ExportWriteFailed)?;
        count += 1;
    }
    writer.flush().map_err(Error::ExportWriteFailed)?;
    Ok(count)
}

/// Rebuilds a store from [`export_jsonl`] output (or a node's live copy), so it can be
/// verified. Each line's stated hash must match its record. A last line that lacks its newline
/// and is not even JSON is a write in progress (a live copy read mid-append) and is left out.
pub fn import_jsonl(text: &str) -> Result<MemoryStore, Error> {
    let store = MemoryStore::new();
    let count = text.lines().count();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let invalid = |reason: String| Error::ExportLineInvalid {
            line: index + 1,
            reason,
        };
        let parsed = serde_json::from_str::<Value>(line);
        if parsed.is_err() && index + 1 == count && !text.ends_with('\n') {
            break;
        }
        let mut value = parsed.map_err(|e| invalid(e.to_string()))?;
        let stated = value
            .as_object_mut()
            .and_then(|map| map.remove("hash"))
            .and_then(|hash| hash.as_str().and_then(parse_hash))
            .ok_or_else(|| invalid("no \"hash\" of 64 hex digits".into()))?;
        let mut bytes = Vec::new();
        write_canonical(&value, &mut bytes);
        let record = Record::from_canonical(&bytes).map_err(|e| invalid(e.to_string()))?;
        if chain_hash(&record.prev_hash, &bytes) != stated {
            return Err(invalid("its hash does not match its record".into()));
        }
        store.append(record.seq, &bytes).map_err(|e| match e {
            StoreError::SeqTaken { seq } => invalid(format!("seq {seq} appears twice")),
            other => Error::StoreUnreadable(other),
        })?;
    }
    Ok(store)
}

/// A one-line summary for `audit list`:
/// `#<seq> <time> <actor> <kind> [round=<r>] [site=<s>] [details]`.
/// Long strings and hex digests are shortened; the full record is in `show`.
pub fn render_line(record: &Record) -> String {
    let mut line = format!(
        "#{} {} {} {}",
        record.seq, record.time, record.actor, record.kind
    );
    if let Some(round) = record.round {
        line.push_str(&format!(" round={round}"));
    }
    if let Some(site) = &record.site {
        line.push_str(&format!(" site={site}"));
    }
    let details = match &record.details {
        Value::Null => String::new(),
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            entries
                .into_iter()
                .map(|(k, v)| format!("{k}={}", short(v)))
                .collect::<Vec<_>>()
                .join(" ")
        }
        other => short(other),
    };
    if !details.is_empty() {
        line.push(' ');
        line.push_str(&truncate(&details, 160));
    }
    line
}

fn short(value: &Value) -> String {
    match value {
        Value::String(s) if s.len() > 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            truncate(s, 12)
        }
        Value::String(s) => truncate(s, 40),
        Value::Array(items) => {
            let shown: Vec<_> = items.iter().take(8).map(short).collect();
            let more = items.len().saturating_sub(8);
            if more > 0 {
                format!("[{},…+{more}]", shown.join(","))
            } else {
                format!("[{}]", shown.join(","))
            }
        }
        other => truncate(&other.to_string(), 40),
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(details: Value) -> Record {
        Record {
            seq: 12,
            time: "2025-01-31T12:00:00Z".into(),
            actor: "aggregator".into(),
            kind: Kind::PhaseCompleted,
            round: Some(1),
            site: None,
            details,
            prev_hash: [0; 32],
        }
    }

    #[test]
    fn render_line_reads_like_a_story() {
        let line = render_line(&record(json!({
            "survivors": ["alpha", "beta"],
            "dropouts": ["gamma"],
            "phase": "unmask",
        })));
        assert_eq!(
            line,
            "#12 2025-01-31T12:00:00Z aggregator phase_completed round=1 \
             dropouts=[gamma] phase=unmask survivors=[alpha,beta]"
        );
    }

    #[test]
    fn render_line_shortens_digests_and_long_values() {
        let mut r = record(json!({"sha256": "ab".repeat(32), "bytes": 1024}));
        r.kind = Kind::UploadDigest;
        r.round = None;
        r.site = Some("alpha".into());
        assert_eq!(
            render_line(&r),
            "#12 2025-01-31T12:00:00Z aggregator upload_digest site=alpha bytes=1024 sha256=abababababab…"
        );
        let many: Vec<u32> = (0..10).collect();
        let line = render_line(&record(json!({"ids": many, "note": "é".repeat(50)})));
        assert!(
            line.ends_with(&format!(
                "ids=[0,1,2,3,4,5,6,7,…+2] note={}…",
                "é".repeat(40)
            )),
            "{line}"
        );
        assert!(render_line(&record(Value::Null)).ends_with("round=1"));
    }

    #[test]
    fn import_rejects_damaged_lines() {
        let good = export_line(&record(json!({"a": 1})));
        assert_eq!(
            import_jsonl(&format!("\n{good}\n")).unwrap().iter().count(),
            1
        );
        let cases = [
            ("not json".to_owned(), 1),
            (good.replace("\"hash\"", "\"hush\""), 1),
            (good.replace("\"a\":1", "\"a\":2"), 1),
            (format!("{good}\n{good}"), 2),
        ];
        for (text, line) in cases {
            let text = format!("{text}\n");
            match import_jsonl(&text) {
                Err(Error::ExportLineInvalid { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        // A live copy read mid-write: the unfinished last line is left out.
        let partial = format!("{good}\n{}", &good[..good.len() / 2]);
        assert_eq!(import_jsonl(&partial).unwrap().iter().count(), 1);
    }
}
