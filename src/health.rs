//! Health and metrics for operators: the opt-in `[runner] health_listen`
//! HTTP listener with `/healthz` (liveness), `/readyz` (readiness) and
//! `/metrics` (Prometheus, OpenMetrics text via `prometheus-client`).
//!
//! The rest of the code reports what happens through [`metrics()`], one
//! process-wide handle of lock-free counters, with one-line calls: an
//! execution taken, started or finished, a message queued or delivered, a
//! heartbeat answered, a worker restarted. Values that are a reading of the
//! present (the worker's RSS, the age of the last heartbeat, the bytes
//! spilled to disk) are read when `/metrics` is asked for, not tracked.
//! Nothing here ever holds a secret: no key, no arguments, no output.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::protocol::api::CompletionStatus;
use crate::supervisor::outbox::LOG_EXTENSION;
use crate::sync::LockExt as _;
use crate::worker::Worker;

/// The content type of the OpenMetrics text format, which Prometheus reads.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A heartbeat older than this many intervals makes the runner not ready.
const HEARTBEAT_INTERVALS_FOR_READY: u32 = 2;
/// Spilled output files (see `delivery.rs`).

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot listen for health and metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// How an execution ended, as a metric label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Outcome {
    success,
    failed,
    cancelled,
    timed_out,
    /// Refused by the runner's own checks (policy, signature, arguments, ...).
    rejected,
}

impl From<CompletionStatus> for Outcome {
    fn from(status: CompletionStatus) -> Self {
        match status {
            CompletionStatus::Success => Outcome::success,
            CompletionStatus::Failed => Outcome::failed,
            CompletionStatus::Cancelled => Outcome::cancelled,
            CompletionStatus::TimedOut => Outcome::timed_out,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: Outcome,
}

/// How a reload (SIGHUP, the reload file) ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values, as Prometheus shows them
enum ReloadOutcome {
    applied,
    /// The new configuration was not valid; the previous one stays.
    refused,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabel {
    outcome: ReloadOutcome,
}

/// Everything `/metrics` shows and `/readyz` decides on.
pub struct Metrics {
    registry: Registry,
    executions: Family<StatusLabel, Counter>,
    running: Gauge,
    queued: Gauge,
    backlog_messages: Gauge,
    backlog_bytes: Gauge,
    spill_bytes: Gauge,
    heartbeat_age: Gauge<f64, AtomicU64>,
    worker_restarts: Counter,
    worker_rss: Gauge,
    worker_up: Gauge,
    reloads: Family<ReloadLabel, Counter>,
    last_reload_successful: Gauge,
    start_latency: Histogram,
    authenticated: AtomicBool,
    last_heartbeat: Mutex<Option<(Instant, Duration)>>,
}

/// The process-wide metrics handle.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("dcsupervisor");
        let metrics = Self {
            executions: Family::default(),
            running: Gauge::default(),
            queued: Gauge::default(),
            backlog_messages: Gauge::default(),
            backlog_bytes: Gauge::default(),
            spill_bytes: Gauge::default(),
            heartbeat_age: Gauge::default(),
            worker_restarts: Counter::default(),
            worker_rss: Gauge::default(),
            worker_up: Gauge::default(),
            reloads: Family::default(),
            last_reload_successful: Gauge::default(),
            // 5 ms .. about 20 s.
            start_latency: Histogram::new(exponential_buckets(0.005, 2.0, 13)),
            authenticated: AtomicBool::new(false),
            last_heartbeat: Mutex::new(None),
            registry: Registry::default(),
        };
        // No reload yet: the configuration in force is the one asked for.
        metrics.last_reload_successful.set(1);
        let m = &metrics;
        registry.register("executions", "Executions ended, by status", m.executions.clone());
        registry.register("executions_running", "Executions whose command is running", m.running.clone());
        registry.register(
            "executions_queued",
            "Executions taken from the control plane and not running yet (checks, start, waiting for the worker)",
            m.queued.clone(),
        );
        registry.register(
            "delivery_backlog_messages",
            "Output chunks and completions not yet acknowledged by the control plane",
            m.backlog_messages.clone(),
        );
        registry.register(
            "delivery_backlog_bytes",
            "Approximate bytes of the messages not yet acknowledged",
            m.backlog_bytes.clone(),
        );
        registry.register(
            "spill_bytes",
            "Bytes of the output logs in the state directory (output is written there first; a log is removed once delivered)",
            m.spill_bytes.clone(),
        );
        registry.register(
            "last_heartbeat_age_seconds",
            "Seconds since the control plane last answered a heartbeat (-1: never)",
            m.heartbeat_age.clone(),
        );
        registry.register(
            "worker_restarts",
            "Times the Python worker was started again",
            m.worker_restarts.clone(),
        );
        registry.register(
            "worker_resident_bytes",
            "Resident set size of the Python worker",
            m.worker_rss.clone(),
        );
        registry.register("worker_up", "1 when a Python worker is ready to take jobs", m.worker_up.clone());
        registry.register("reloads", "Reloads (SIGHUP, the reload file), by outcome", m.reloads.clone());
        registry.register(
            "config_last_reload_successful",
            "0 when the last reload was refused (the previous configuration still runs), else 1",
            m.last_reload_successful.clone(),
        );
        registry.register(
            "job_start_latency_seconds",
            "From taking an execution to its command running",
            m.start_latency.clone(),
        );
        Self { registry, ..metrics }
    }

    /// Call when an execution is taken from the control plane; the returned
    /// guard counts it as queued, then running, until dropped.
    pub fn track_execution(&'static self) -> TrackedExecution {
        self.queued.inc();
        TrackedExecution { metrics: self, taken: Instant::now(), running: false, ended: false }
    }

    /// An execution refused by the runner's own checks.
    pub fn execution_rejected(&self) {
        self.executions.get_or_create(&StatusLabel { status: Outcome::rejected }).inc();
    }

    /// A message for the control plane was queued (`weight`: its size).
    pub fn message_queued(&self, weight: usize) {
        self.backlog_messages.inc();
        self.backlog_bytes.inc_by(saturating_i64(weight));
    }

    /// A queued message was delivered (or definitively refused).
    pub fn message_done(&self, weight: usize) {
        self.backlog_messages.dec();
        self.backlog_bytes.dec_by(saturating_i64(weight));
    }

    /// The control plane answered a heartbeat; `interval` is the configured one.
    pub fn heartbeat_answered(&self, interval: Duration) {
        *self.last_heartbeat.locked() = Some((Instant::now(), interval));
    }

    /// Whether the control plane currently accepts our key.
    pub fn set_authenticated(&self, authenticated: bool) {
        self.authenticated.store(authenticated, Ordering::Relaxed);
    }

    /// A reload ended: the new configuration is in force (`applied`) or
    /// was refused and the previous one still runs.
    pub fn reload_ended(&self, applied: bool) {
        let outcome = if applied { ReloadOutcome::applied } else { ReloadOutcome::refused };
        self.reloads.get_or_create(&ReloadLabel { outcome }).inc();
        self.last_reload_successful.set(i64::from(applied));
    }

    /// The Python worker was started again (after a crash or a recycle).
    pub fn worker_restarted(&self) {
        self.worker_restarts.inc();
    }

    fn heartbeat(&self) -> Option<(Instant, Duration)> {
        *self.last_heartbeat.locked()
    }

    /// Sets the gauges that are readings of the present, then encodes.
    fn render(&self, probe: &Probe) -> String {
        let age = self.heartbeat().map_or(-1.0, |(at, _)| at.elapsed().as_secs_f64());
        self.heartbeat_age.set(age);
        let worker_pid = probe.worker.info().map(|info| info.pid);
        self.worker_up.set(i64::from(worker_pid.is_some()));
        let rss = worker_pid.and_then(crate::procfs::resident_bytes).unwrap_or(0);
        self.worker_rss.set(saturating_i64(rss));
        self.spill_bytes.set(saturating_i64(spilled_bytes(&probe.spill_dir)));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Why the runner is not ready, or nothing when it is.
    fn not_ready(&self, probe: &Probe) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.authenticated.load(Ordering::Relaxed) {
            reasons.push("not authenticated with the control plane".to_string());
        }
        match self.heartbeat() {
            None => reasons.push("no heartbeat answered yet".to_string()),
            Some((at, interval)) if at.elapsed() > interval * HEARTBEAT_INTERVALS_FOR_READY => {
                reasons.push(format!("last heartbeat answered {}s ago", at.elapsed().as_secs()))
            }
            Some(_) => {}
        }
        if probe.worker.info().is_none() {
            reasons.push("the Python worker is not ready".to_string());
        }
        reasons
    }
}

/// One execution's place in the queued/running gauges; see
/// [`Metrics::track_execution`].
pub struct TrackedExecution {
    metrics: &'static Metrics,
    taken: Instant,
    running: bool,
    ended: bool,
}

impl TrackedExecution {
    /// Its command is running: records the start latency.
    pub fn job_started(&mut self) {
        if !self.running {
            self.running = true;
            self.metrics.queued.dec();
            self.metrics.running.inc();
            self.metrics.start_latency.observe(self.taken.elapsed().as_secs_f64());
        }
    }

    /// It ended with `status`.
    pub fn finished(&mut self, status: CompletionStatus) {
        if !self.ended {
            self.ended = true;
            self.metrics.executions.get_or_create(&StatusLabel { status: status.into() }).inc();
        }
    }
}

impl Drop for TrackedExecution {
    fn drop(&mut self) {
        if self.running {
            self.metrics.running.dec();
        } else {
            self.metrics.queued.dec();
        }
    }
}

fn saturating_i64(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// Bytes of the output logs in `spill_dir` (0 when unreadable).
fn spilled_bytes(spill_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(spill_dir) else { return 0 };
    let lengths = entries
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == LOG_EXTENSION))
        .filter_map(|entry| entry.metadata().ok())
        .filter(|meta| meta.is_file())
        .map(|meta| meta.len());
    crate::supervisor::outbox::total_len(lengths)
}

/// What the listener looks at besides the counters.
#[derive(Clone)]
pub struct Probe {
    pub worker: Worker,
    /// Where undelivered output is spilled (`<state_dir>/spill`).
    pub spill_dir: PathBuf,
}

/// Binds `addr` and serves the endpoints in the background; returns the
/// bound address (a port of 0 picks a free one).
pub async fn start(addr: SocketAddr, probe: Probe) -> Result<SocketAddr, HealthError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| HealthError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| HealthError::Bind { addr, source })?;
    tracing::info!("health and metrics on http://{local} (/healthz, /readyz, /metrics)");
    tokio::spawn(accept_loop(listener, Arc::new(probe)));
    Ok(local)
}

async fn accept_loop(listener: TcpListener, probe: Arc<Probe>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::debug!("health listener: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let probe = probe.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let probe = probe.clone();
                async move { Ok::<_, Infallible>(respond(&probe, &request)) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!("health listener: connection ended: {error}");
            }
        });
    }
}

fn respond(probe: &Probe, request: &http::Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    let metrics = metrics();
    match request.uri().path() {
        "/healthz" => match probe.worker.info() {
            Some(_) => plain(StatusCode::OK, "ok\n".into()),
            None => plain(StatusCode::SERVICE_UNAVAILABLE, "the Python worker is not ready\n".into()),
        },
        "/readyz" => match metrics.not_ready(probe) {
            reasons if reasons.is_empty() => plain(StatusCode::OK, "ready\n".into()),
            reasons => plain(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; "))),
        },
        "/metrics" => with_type(StatusCode::OK, METRICS_CONTENT_TYPE, metrics.render(probe)),
        _ => plain(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n".into()),
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body)
}

fn with_type(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_the_wire_names() {
        let fresh = Metrics::new();
        fresh.executions.get_or_create(&StatusLabel { status: CompletionStatus::TimedOut.into() }).inc();
        fresh.execution_rejected();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &fresh.registry).unwrap();
        assert!(text.contains("dcsupervisor_executions_total{status=\"timed_out\"} 1"), "{text}");
        assert!(text.contains("dcsupervisor_executions_total{status=\"rejected\"} 1"), "{text}");
        assert!(text.contains("# TYPE dcsupervisor_job_start_latency_seconds histogram"), "{text}");
    }

    #[test]
    fn spill_bytes_count_only_output_logs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.wal"), b"12345").unwrap();
        std::fs::write(dir.path().join("journal.json"), b"1234567890").unwrap();
        assert_eq!(spilled_bytes(dir.path()), 5);
        assert_eq!(spilled_bytes(&dir.path().join("missing")), 0);
    }

    /// Failed before the fix (a plain sum overflowed, and /metrics
    /// panicked): three sparse logs of 2^63 - 1 bytes on tmpfs.
    #[test]
    fn huge_sparse_logs_are_counted_without_overflow() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else { return };
        for name in ["a.wal", "b.wal", "c.wal"] {
            let file = std::fs::File::create(dir.path().join(name)).unwrap();
            if file.set_len(i64::MAX as u64).is_err() {
                return;
            }
        }
        assert_eq!(spilled_bytes(dir.path()), u64::MAX);
    }
}
