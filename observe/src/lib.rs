//! What operators and sites watch, shared by `quorum-aggregator` and `quorum-client`:
//!
//! - [`init`] picks the output: human text on stderr (progress bars when attended, lines that
//!   begin with a UTC timestamp when not), or one JSON object per line for a log collector.
//! - [`line`] writes one event line in that format.
//! - [`serve`] answers `/metrics` (Prometheus text) and `/healthz` (JSON) over plain HTTP on a
//!   loopback address, for a local agent to scrape.

use std::convert::Infallible;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How a binary writes what it has to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human text on stderr: progress bars on a terminal, timestamped lines otherwise.
    #[default]
    Text,
    /// One JSON object per line on stderr (timestamp, level, target, message), progress
    /// included; `RUST_LOG` filters it (default: info).
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Sets up logging for the process; call once, first thing in `main`. `RUST_LOG` overrides the
/// default filter (warn for text, whose events are the lines themselves; info for JSON).
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let default = match format {
        LogFormat::Text => "warn",
        LogFormat::Json => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// Whether someone is watching a terminal: text output to a TTY. Progress bars only then.
pub fn attended() -> bool {
    format() == LogFormat::Text && std::io::stderr().is_terminal()
}

/// Writes one line: as a JSON event, as is on a terminal, or after a UTC timestamp when stderr
/// is a file or a pipe (so a log shows when each thing happened).
pub fn line(message: &str) {
    match format() {
        LogFormat::Json => tracing::info!(target: "quorum", "{message}"),
        LogFormat::Text if std::io::stderr().is_terminal() => eprintln!("{message}"),
        LogFormat::Text => eprintln!("{} {message}", timestamp()),
    }
}

/// The current UTC time, RFC 3339 to the second.
pub fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What an endpoint serves.
pub trait Endpoint: Send + Sync + 'static {
    /// The Prometheus text exposition for `/metrics`.
    fn metrics(&self) -> String;
    /// The JSON body of `/healthz`.
    fn health(&self) -> String;
}

/// Checks that `address` is a loopback address: the endpoint has no authentication.
pub fn check_loopback(address: SocketAddr, setting: &str) -> anyhow::Result<()> {
    if address.ip().is_loopback() {
        Ok(())
    } else {
        anyhow::bail!(
            "{setting} = {address} is not a loopback address: the metrics endpoint has no \
             authentication, so it serves on 127.0.0.1 or ::1 only; let a local agent scrape it"
        )
    }
}

/// Binds `address` and serves `/metrics` and `/healthz` from `endpoint` until the process
/// ends. `setting` names where the address came from, for the error if it cannot be bound.
pub async fn serve(
    address: SocketAddr,
    setting: &str,
    endpoint: Arc<dyn Endpoint>,
) -> anyhow::Result<()> {
    check_loopback(address, setting)?;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address} for metrics ({setting}): {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let endpoint = Arc::clone(&endpoint);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let response = respond(endpoint.as_ref(), request.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                // A scraper that goes away mid-request is no concern of the federation's.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

fn respond(endpoint: &dyn Endpoint, path: &str) -> Response<Full<Bytes>> {
    let (status, kind, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            endpoint.metrics(),
        ),
        "/healthz" => (StatusCode::OK, "application/json", endpoint.health()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = kind.parse() {
        response.headers_mut().insert("content-type", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Endpoint for Fixed {
        fn metrics(&self) -> String {
            "quorum_round 3\n".into()
        }
        fn health(&self) -> String {
            "{\"status\":\"ok\"}".into()
        }
    }

    #[test]
    fn metrics_paths_answer_and_others_say_where_to_look() {
        let ok = respond(&Fixed, "/metrics");
        assert_eq!(ok.status(), StatusCode::OK);
        assert!(
            ok.headers()["content-type"]
                .to_str()
                .unwrap()
                .contains("openmetrics")
        );
        assert_eq!(respond(&Fixed, "/healthz").status(), StatusCode::OK);
        assert_eq!(respond(&Fixed, "/").status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn metrics_endpoint_must_be_on_loopback() {
        assert!(check_loopback("127.0.0.1:9464".parse().unwrap(), "x").is_ok());
        assert!(check_loopback("[::1]:9464".parse().unwrap(), "x").is_ok());
        let err = check_loopback("0.0.0.0:9464".parse().unwrap(), "--metrics-listen");
        assert!(
            err.unwrap_err()
                .to_string()
                .starts_with("--metrics-listen = 0.0.0.0:9464")
        );
    }

    #[test]
    fn unattended_lines_begin_with_a_utc_timestamp_to_the_second() {
        let stamp = timestamp();
        assert_eq!(stamp.len(), "2026-01-01T00:00:00Z".len(), "{stamp}");
        assert!(stamp.ends_with('Z'), "{stamp}");
    }
}
