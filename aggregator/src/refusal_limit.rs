//! Keeps failed TLS handshakes from turning the audit log into a lever. Every refusal is a
//! durable, fsynced record, and a failed audit write stops the node by design; so a flood of
//! garbage connections from anyone on the network must neither fill the disk nor stop the node.
//!
//! [`RefusalLimit`] (pure, time passed in) lets the first [`PER_SOURCE`] refusals from each
//! source address in an interval through as records of their own, so a real misconfiguration
//! is on the record at once, and counts the rest; at the interval's end each source with
//! counted refusals gets one summary record. At most [`MAX_SOURCES`] sources are tracked per
//! interval; refusals from others are counted together. So an interval adds at most
//! `MAX_SOURCES × (PER_SOURCE + 1) + 1` records, however many connections arrive.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

/// How long one summary interval lasts.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Refusals from one source recorded one by one in an interval; the rest are counted.
pub const PER_SOURCE: u32 = 16;
/// Sources tracked in one interval; refusals from more are counted together.
pub const MAX_SOURCES: usize = 64;

/// One summary record: refusals counted but not recorded one by one during an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The source, or `None` for sources beyond [`MAX_SOURCES`].
    pub source: Option<IpAddr>,
    /// Refusals counted.
    pub count: u64,
    /// The last reason seen.
    pub last_reason: String,
}

impl Summary {
    /// Who the record is about: `(handshakes from <ip>)`.
    pub fn site(&self) -> String {
        match self.source {
            Some(ip) => format!("(handshakes from {ip})"),
            None => "(handshakes from other sources)".into(),
        }
    }

    /// The refusal reason to record.
    pub fn reason(&self) -> String {
        let from = self
            .source
            .map_or_else(|| "other sources".to_owned(), |ip| ip.to_string());
        format!(
            "{} more TLS handshakes from {from} refused in the last {}s (summarised, not recorded one by one); last: {}",
            self.count,
            INTERVAL.as_secs(),
            self.last_reason
        )
    }
}

#[derive(Debug, Default)]
struct Source {
    recorded: u32,
    counted: u64,
    last_reason: String,
}

/// Which handshake refusals are recorded one by one, and the summaries of the rest.
#[derive(Debug, Default)]
pub struct RefusalLimit {
    interval_end: Option<Instant>,
    sources: BTreeMap<IpAddr, Source>,
    others: Source,
}

impl RefusalLimit {
    /// A refusal from `source` at `now`: true when it is to be recorded on its own.
    pub fn refused(&mut self, now: Instant, source: IpAddr, reason: &str) -> bool {
        self.interval_end.get_or_insert(now + INTERVAL);
        let tracked = self.sources.contains_key(&source) || self.sources.len() < MAX_SOURCES;
        let entry = if tracked {
            self.sources.entry(source).or_default()
        } else {
            &mut self.others
        };
        if tracked && entry.recorded < PER_SOURCE {
            entry.recorded += 1;
            return true;
        }
        entry.counted += 1;
        reason.clone_into(&mut entry.last_reason);
        false
    }

    /// When [`RefusalLimit::flush`] is due, if anything is pending.
    pub fn next_flush(&self) -> Option<Instant> {
        self.interval_end
    }

    /// Ends the interval if it is over: the summaries to record, one per source with counted
    /// refusals (sources beyond the limit last, together).
    pub fn flush(&mut self, now: Instant) -> Vec<Summary> {
        if self.interval_end.is_none_or(|end| now < end) {
            return Vec::new();
        }
        self.interval_end = None;
        let summarise = |source, s: Source| {
            (s.counted > 0).then_some(Summary {
                source,
                count: s.counted,
                last_reason: s.last_reason,
            })
        };
        let mut out: Vec<Summary> = std::mem::take(&mut self.sources)
            .into_iter()
            .filter_map(|(ip, s)| summarise(Some(ip), s))
            .collect();
        out.extend(summarise(None, std::mem::take(&mut self.others)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn a_flood_from_one_source_is_a_few_records_and_one_summary() {
        let mut limit = RefusalLimit::default();
        let start = Instant::now();
        let recorded = (0..10_000)
            .filter(|_| limit.refused(start, ip(1), "TLS handshake failed: garbage"))
            .count();
        assert_eq!(recorded, PER_SOURCE as usize);
        assert!(limit.flush(start + INTERVAL / 2).is_empty(), "not yet");
        let summaries = limit.flush(start + INTERVAL);
        assert_eq!(
            summaries,
            [Summary {
                source: Some(ip(1)),
                count: 10_000 - u64::from(PER_SOURCE),
                last_reason: "TLS handshake failed: garbage".into(),
            }]
        );
        assert!(
            summaries[0]
                .reason()
                .starts_with("9984 more TLS handshakes from 10.0.0.1")
        );
        // A new interval starts afresh.
        assert!(limit.refused(start + INTERVAL * 2, ip(1), "again"));
        assert_eq!(limit.next_flush(), Some(start + INTERVAL * 3));
    }

    #[test]
    fn many_sources_are_bounded_too() {
        let mut limit = RefusalLimit::default();
        let start = Instant::now();
        let mut recorded = 0;
        for n in 0..1_000 {
            for _ in 0..20 {
                recorded += usize::from(limit.refused(start, ip(n), "x"));
            }
        }
        assert_eq!(recorded, MAX_SOURCES * PER_SOURCE as usize);
        let summaries = limit.flush(start + INTERVAL);
        assert_eq!(summaries.len(), MAX_SOURCES + 1);
        let counted: u64 = summaries.iter().map(|s| s.count).sum();
        assert_eq!(counted as usize + recorded, 20_000);
        assert_eq!(summaries.last().unwrap().source, None);
    }

    #[test]
    fn a_few_refusals_are_all_recorded_and_nothing_is_summarised() {
        let mut limit = RefusalLimit::default();
        let start = Instant::now();
        assert!((0..3).all(|_| limit.refused(start, ip(7), "revoked")));
        assert!(limit.flush(start + INTERVAL).is_empty());
        assert_eq!(limit.next_flush(), None);
    }
}
