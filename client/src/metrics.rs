//! What a site's monitoring sees: Prometheus metrics at `/metrics` and a health check at
//! `/healthz` on a loopback address (`quorum-client run --metrics-listen`), served by
//! [`quorum_observe::serve`]. Nothing here leaves the site's host: the round, its phase,
//! training progress, rounds taken part in and declined, bytes sent, the ε the site's own ledger
//! has spent, reconnects and the last error.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;

type Labels = Vec<(&'static str, &'static str)>;

/// The phases a site reports, in the order a round passes through them.
pub const PHASES: [&str; 5] = ["waiting", "evaluating", "training", "aggregating", "done"];

/// The site's metrics, updated by its session and read by the endpoint.
pub struct SiteMetrics {
    registry: Registry,
    connected: Gauge,
    round: Gauge,
    phase: Family<Labels, Gauge>,
    training_steps: Gauge,
    rounds_completed: Counter,
    rounds_declined: Counter,
    sent_bytes: Counter,
    epsilon: Gauge<f64, AtomicU64>,
    reconnects: Counter,
    errors: Counter,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    phase: &'static str,
    steps: Option<Arc<AtomicU32>>,
    last_error: Option<String>,
}

impl Default for SiteMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("quorum_site");
        let mut gauge = |name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let connected = gauge("connected", "1 while joined to the aggregator");
        let round = gauge("round", "Round being run (0: none yet)");
        let training_steps = gauge("training_steps", "Local steps done in this round");
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let rounds_completed = counter("rounds_completed", "Rounds whose sum included this site");
        let rounds_declined = counter("rounds_declined", "Rounds this site's policy declined");
        let sent_bytes = counter("sent_bytes", "Update bytes sent");
        let reconnects = counter("reconnects", "Lost links retried");
        let errors = counter("errors", "Rounds aborted or left, and failures");
        let phase = Family::<Labels, Gauge>::default();
        registry.register("phase", "1 for the phase the site is in", phase.clone());
        let epsilon = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "epsilon_spent",
            "ε this site's privacy ledger has spent, at its policy's δ",
            epsilon.clone(),
        );
        Self {
            registry,
            connected,
            round,
            phase,
            training_steps,
            rounds_completed,
            rounds_declined,
            sent_bytes,
            epsilon,
            reconnects,
            errors,
            state: Mutex::new(State::default()),
        }
    }
}

impl SiteMetrics {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update replaces whole fields: a poisoned lock holds consistent values.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joined (`true`) or lost the link (`false`).
    pub fn connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
        if connected {
            self.phase("waiting");
        }
    }

    /// A lost link is being retried.
    pub fn reconnecting(&self, reason: &str) {
        self.connected(false);
        self.reconnects.inc();
        self.state().last_error = Some(reason.to_owned());
    }

    /// Enters `phase` (one of [`PHASES`]) of `round`.
    pub fn round_phase(&self, round: u32, phase: &'static str) {
        self.round.set(i64::from(round));
        self.phase(phase);
    }

    fn phase(&self, phase: &'static str) {
        for known in PHASES {
            let value = i64::from(known == phase);
            self.phase.get_or_create(&vec![("phase", known)]).set(value);
        }
        self.state().phase = phase;
    }

    /// Local training of `round` has started; `steps` counts the steps done.
    pub fn training(&self, round: u32, steps: Arc<AtomicU32>) {
        self.round_phase(round, "training");
        self.state().steps = Some(steps);
    }

    /// Update bytes sent.
    pub fn sent(&self, bytes: u64) {
        self.sent_bytes.inc_by(bytes);
    }

    /// A round ended: included in the sum, declined by policy, or failed (`error`); `epsilon`
    /// is the ledger's total afterwards.
    pub fn round_ended(&self, included: bool, declined: bool, error: Option<&str>, epsilon: f64) {
        if included {
            self.rounds_completed.inc();
        }
        if declined {
            self.rounds_declined.inc();
        }
        if let Some(error) = error {
            self.errors.inc();
            self.state().last_error = Some(error.to_owned());
        }
        self.epsilon.set(epsilon);
        self.phase("waiting");
    }

    /// The session has ended.
    pub fn finished(&self) {
        self.connected.set(0);
        self.phase("done");
    }
}

impl quorum_observe::Endpoint for SiteMetrics {
    fn metrics(&self) -> String {
        let steps = self
            .state()
            .steps
            .as_ref()
            .map(|s| s.load(Ordering::Relaxed));
        self.training_steps.set(i64::from(steps.unwrap_or(0)));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    fn health(&self) -> String {
        let state = self.state();
        json!({
            "status": "ok",
            "connected": self.connected.get() == 1,
            "round": self.round.get(),
            "phase": state.phase,
            "epsilon_spent": self.epsilon.get(),
            "last_error": state.last_error,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use quorum_observe::Endpoint as _;

    use super::*;

    #[test]
    fn site_metrics_show_the_phase_steps_and_budget_and_health_the_last_error() {
        let metrics = SiteMetrics::default();
        metrics.connected(true);
        let steps = Arc::new(AtomicU32::new(0));
        metrics.training(4, Arc::clone(&steps));
        steps.store(120, Ordering::Relaxed);
        metrics.sent(4096);
        let text = metrics.metrics();
        for line in [
            "quorum_site_connected 1",
            "quorum_site_round 4",
            "quorum_site_phase{phase=\"training\"} 1",
            "quorum_site_phase{phase=\"waiting\"} 0",
            "quorum_site_training_steps 120",
            "quorum_site_sent_bytes_total 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        metrics.round_ended(
            false,
            false,
            Some("round 4 aborted: too few survivors"),
            1.25,
        );
        metrics.round_ended(false, true, None, 1.25);
        let text = metrics.metrics();
        for line in [
            "quorum_site_epsilon_spent 1.25",
            "quorum_site_rounds_declined_total 1",
            "quorum_site_errors_total 1",
            "quorum_site_phase{phase=\"waiting\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        let health: serde_json::Value = serde_json::from_str(&metrics.health()).unwrap();
        assert_eq!(health["phase"], "waiting");
        assert!(health["last_error"].as_str().unwrap().contains("aborted"));
    }
}
