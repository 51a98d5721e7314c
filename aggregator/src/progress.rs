//! What the operator watches: a progress bar over rounds with the current phase, and one line
//! per notable event (joins, dropouts, refusals, round results).

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::RoundSummary;

/// Progress display; plain lines ([`quorum_observe::line`]) when nobody watches a terminal.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: ProgressBar,
    interactive: bool,
}

impl Progress {
    /// A display on stderr.
    pub fn new() -> Self {
        let interactive = quorum_observe::attended();
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

    /// Shows the current phase: on the bar when attended, as a line when not (a log file then
    /// shows where each round spent its time).
    pub fn phase(&self, message: &str) {
        if self.interactive {
            self.bar.set_message(message.to_owned());
        } else {
            quorum_observe::line(message);
        }
    }

    /// Prints one line above the bar, or a line of the log when nobody watches.
    pub fn note(&self, message: &str) {
        if self.interactive {
            self.bar.println(message);
        } else {
            quorum_observe::line(message);
        }
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

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}
