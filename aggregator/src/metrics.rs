//! What an operator's monitoring sees: Prometheus metrics at `/metrics` and a health check at
//! `/healthz`, served over plain HTTP on a loopback address (`[server] metrics_listen`) for a
//! local agent to scrape. Nothing here is private: the round, its phase, how many sites are
//! connected, bytes moved, ε spent, refusals and the last error.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use quorum_round::{RoundSummary, Status};
use serde_json::json;

type Labels = Vec<(&'static str, &'static str)>;

/// The aggregator's metrics, updated by the engine and read by the HTTP endpoint.
pub struct Metrics {
    registry: Registry,
    round: Gauge,
    rounds_completed: Gauge,
    rounds_total: Gauge,
    phase: Family<Labels, Gauge>,
    sites_connected: Gauge,
    bytes_received: Counter,
    bytes_sent: Counter,
    epsilon: Gauge<f64, AtomicU64>,
    refusals: Counter,
    errors: Counter,
    health: Mutex<Health>,
}

/// What `/healthz` reports besides the metrics.
#[derive(Default)]
struct Health {
    status: Option<Status>,
    last_error: Option<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("quorum");
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let round = gauge(
            &mut registry,
            "round",
            "Round being offered or run (0: none)",
        );
        let rounds_completed = gauge(
            &mut registry,
            "rounds_completed",
            "Training rounds completed",
        );
        let rounds_total = gauge(
            &mut registry,
            "rounds",
            "Training rounds the federation runs",
        );
        let sites_connected = gauge(
            &mut registry,
            "sites_connected",
            "Sites with an open session",
        );
        let bytes_received = counter(&mut registry, "received_bytes", "Update bytes from sites");
        let bytes_sent = counter(&mut registry, "sent_bytes", "Model bytes sent to sites");
        let refusals = counter(
            &mut registry,
            "refusals",
            "Connections, joins and messages refused (each is on the audit record)",
        );
        let errors = counter(
            &mut registry,
            "errors",
            "Rounds aborted and federation failures",
        );
        let phase = Family::default();
        registry.register(
            "phase",
            "1 for what the aggregator waits for now (phase label), 0 for earlier phases",
            phase.clone(),
        );
        let epsilon = Gauge::default();
        registry.register(
            "epsilon_spent",
            "Federation-level epsilon spent at its delta (0 without DP)",
            epsilon.clone(),
        );
        Self {
            registry,
            round,
            rounds_completed,
            rounds_total,
            phase,
            sites_connected,
            bytes_received,
            bytes_sent,
            epsilon,
            refusals,
            errors,
            health: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Takes in the coordinator's latest status (cheap: the engine calls it after every
    /// batch of work).
    pub fn observe(&self, status: Status) {
        self.round.set(status.round.map_or(0, i64::from));
        self.rounds_completed
            .set(i64::from(status.completed_rounds));
        self.rounds_total.set(i64::from(status.rounds));
        self.sites_connected
            .set(i64::try_from(status.sites_connected).unwrap_or(i64::MAX));
        let mut health = self.lock_health();
        if health.status.as_ref().map(|s| s.phase) != Some(status.phase) {
            if let Some(previous) = &health.status {
                self.phase
                    .get_or_create(&vec![("phase", previous.phase)])
                    .set(0);
            }
            self.phase
                .get_or_create(&vec![("phase", status.phase)])
                .set(1);
        }
        health.status = Some(status);
    }

    /// Counts the bytes a completed round moved and takes the ε it published.
    pub fn round_done(&self, summary: &RoundSummary) {
        self.bytes_received.inc_by(summary.upload_bytes);
        self.bytes_sent.inc_by(summary.download_bytes);
        self.resumed(summary);
    }

    /// Takes the ε published with `last`, the latest round before a restart (or just now).
    pub fn resumed(&self, last: &RoundSummary) {
        self.epsilon.set(last.epsilon.unwrap_or(0.0));
    }

    /// Counts a refusal.
    pub fn refused(&self) {
        self.refusals.inc();
    }

    /// Counts an error and keeps it as the last one.
    pub fn error(&self, message: &str) {
        self.errors.inc();
        self.lock_health().last_error = Some(message.to_owned());
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        // Every update replaces whole fields: a poisoned lock holds consistent values.
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl quorum_observe::Endpoint for Metrics {
    fn metrics(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    fn health(&self) -> String {
        let health = self.lock_health();
        let status = health.status.as_ref();
        json!({
            "status": "ok",
            "round": status.and_then(|s| s.round),
            "phase": status.map(|s| s.phase),
            "sites_connected": status.map(|s| s.sites_connected),
            "completed_rounds": status.map(|s| s.completed_rounds),
            "last_error": health.last_error,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use quorum_observe::Endpoint as _;

    use super::*;

    fn status(phase: &'static str, connected: usize) -> Status {
        Status {
            round: Some(3),
            phase,
            sites_connected: connected,
            completed_rounds: 2,
            rounds: 5,
        }
    }

    fn summary(epsilon: f64) -> RoundSummary {
        RoundSummary {
            round: 2,
            evaluation_only: false,
            survivors: vec!["alpha".into(), "beta".into()],
            dropped: Vec::new(),
            seconds: 1.0,
            upload_bytes: 300,
            download_bytes: 700,
            epsilon: Some(epsilon),
            rho: 0.1,
            model_sha256: String::new(),
            reports: Default::default(),
            metrics: None,
        }
    }

    #[test]
    fn metrics_show_the_current_phase_and_sites_and_health_the_last_error() {
        let metrics = Metrics::default();
        metrics.observe(status("training", 4));
        metrics.observe(status("advertise", 3));
        metrics.round_done(&summary(1.5));
        metrics.refused();
        metrics.error("round 3 aborted: 1 sites accepted round 3, 2 needed");
        let text = metrics.metrics();
        for line in [
            "quorum_round 3",
            "quorum_sites_connected 3",
            "quorum_phase{phase=\"advertise\"} 1",
            "quorum_phase{phase=\"training\"} 0",
            "quorum_epsilon_spent 1.5",
            "quorum_received_bytes_total 300",
            "quorum_sent_bytes_total 700",
            "quorum_refusals_total 1",
            "quorum_errors_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        let health: serde_json::Value = serde_json::from_str(&metrics.health()).unwrap();
        assert_eq!(health["phase"], "advertise");
        assert_eq!(health["sites_connected"], 3);
        assert!(health["last_error"].as_str().unwrap().contains("aborted"));
    }
}
