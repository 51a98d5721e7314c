//! What the operator watches: a progress bar over rounds with the current phase, and one line
//! per notable event (joins, dropouts, refusals, round results).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::RoundSummary;

/// Progress display; plain lines when stderr is not a terminal.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: ProgressBar,
    interactive: bool,
}

impl Progress {
    /// A display on stderr.
    pub fn new() -> Self {
        let interactive = std::io::stderr().is_terminal();
        let bar = if interactive {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} rounds {pos}/{len} [{bar:30}] {elapsed} {msg}")
                .expect("static template is valid")
                .progress_chars("=> "),
        );
        Self { bar, interactive }
    }

    /// Starts counting rounds.
    pub fn start(&self, rounds: u32, done: u32) {
        self.bar.set_length(u64::from(rounds));
        self.bar.set_position(u64::from(done));
        self.bar
            .enable_steady_tick(std::time::Duration::from_millis(200));
    }

    /// Shows the current phase: on the bar when attended, as a timestamped line when not (a
    /// log file then shows where each round spent its time).
    pub fn phase(&self, message: &str) {
        if self.interactive {
            self.bar.set_message(message.to_owned());
        } else {
            eprintln!("{} {message}", timestamp());
        }
        tracing::debug!("{message}");
    }

    /// Prints one line above the bar, or a timestamped line when stderr is not a terminal.
    pub fn note(&self, message: &str) {
        if self.interactive {
            self.bar.println(message);
        } else {
            eprintln!("{} {message}", timestamp());
        }
        tracing::info!("{message}");
    }

    /// Records a completed round.
    pub fn round_done(&self, s: &RoundSummary) {
        let mut losses: Vec<String> = s
            .metrics
            .map(|m| format!("mean {:.3} (from the sum)", m.val_loss_before))
            .into_iter()
            .collect();
        losses.extend(
            s.reports
                .iter()
                .map(|(site, r)| format!("{site} {:.3}", r.val_loss_before)),
        );
        if s.evaluation_only {
            self.note(&format!(
                "final evaluation: validation loss {}",
                losses.join(", ")
            ));
            return;
        }
        let epsilon = if let Some(epsilon) = s.epsilon {
            format!("ε={epsilon:.2}")
        } else {
            "no DP".into()
        };
        self.note(&format!(
            "round {} done in {:.1}s: {} survivors, {} dropped, {:.1} MB up, {epsilon}; val loss of model in: {}",
            s.round,
            s.seconds,
            s.survivors.len(),
            s.dropped.len(),
            s.upload_bytes as f64 / 1e6,
            losses.join(", ")
        ));
        self.bar.inc(1);
    }

    /// Clears the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The current UTC time, RFC 3339 to the second, as unattended lines begin with it.
fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0);
    now.unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unattended_lines_begin_with_a_utc_timestamp_to_the_second() {
        let stamp = super::timestamp();
        // e.g. 2026-12-02T19:13:10Z
        assert_eq!(stamp.len(), 20, "{stamp}");
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
        let parsed =
            time::OffsetDateTime::parse(&stamp, &time::format_description::well_known::Rfc3339);
        assert!(parsed.is_ok(), "{stamp}");
    }
}
