//! The health and metrics listener (`[runner] health_listen`), end to end: a
//! real dcsupervisor against a real `dccontrol serve`, probed over HTTP on
//! loopback the way Kubernetes and Prometheus would.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::plane::{status_and_code, ControlPlane, Supervisor, LIMIT};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// An ephemeral loopback port, set through the environment like any field.
const LISTEN_ON_ANY_PORT: (&str, &str) = ("DCSUPERVISOR_RUNNER__HEALTH_LISTEN", "127.0.0.1:0");
const ANNOUNCED: &str = "health and metrics on http://";

/// A method and path against the listener: the status, content type and body.
async fn call(base: &str, method: &str, path: &str) -> (u16, String, String) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request =
        http::Request::builder().method(method).uri(format!("{base}{path}")).body(Empty::new()).unwrap();
    let response = client.request(request).await.expect("the health listener answers");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, content_type, String::from_utf8_lossy(&body).into_owned())
}

async fn get(base: &str, path: &str) -> (u16, String) {
    let (status, _, body) = call(base, "GET", path).await;
    (status, body)
}

/// The listener's base URL, from the supervisor's log line.
async fn health_url(runner: &Supervisor) -> String {
    runner.wait_for_log(ANNOUNCED, LIMIT).await;
    let log = runner.log();
    let rest = &log[log.find(ANNOUNCED).unwrap() + ANNOUNCED.len()..];
    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    format!("http://{addr}")
}

/// Polls `path` until `wanted` holds for its answer; the last answer.
async fn until(base: &str, path: &str, wanted: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (status, body) = get(base, path).await;
        if wanted(status, &body) {
            return (status, body);
        }
        assert!(tokio::time::Instant::now() < deadline, "{path} stayed at {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the sample `name` (with its labels, exactly as written).
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_follow_a_working_runner() {
    let plane = ControlPlane::start();
    let runner = Supervisor::start_with(&plane.url, "", "", common::demo_project(), &[LISTEN_ON_ANY_PORT]);
    let base = health_url(&runner).await;
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    assert_eq!(get(&base, "/healthz").await, (200, "ok\n".into()));
    until(&base, "/readyz", |status, _| status == 200).await;

    let ran = plane.queue("noop", "").await;
    assert_eq!(status_and_code(&plane.wait_done(&ran, LIMIT).await), ("success", 0));
    let refused = plane.queue("shell", "").await;
    assert_eq!(status_and_code(&plane.wait_done(&refused, LIMIT).await).0, "failed");

    // Delivery ends just after the control plane records the completion.
    let (_, metrics) = until(&base, "/metrics", |_, text| {
        sample(text, "dcsupervisor_delivery_backlog_messages") == Some(0.0)
            && sample(text, "dcsupervisor_executions_running") == Some(0.0)
    })
    .await;
    let value = |name: &str| sample(&metrics, name).unwrap_or_else(|| panic!("no {name} in:\n{metrics}"));
    assert_eq!(value("dcsupervisor_executions_total{status=\"success\"}"), 1.0);
    assert_eq!(value("dcsupervisor_executions_total{status=\"rejected\"}"), 1.0);
    assert_eq!(value("dcsupervisor_executions_queued"), 0.0);
    assert_eq!(value("dcsupervisor_job_start_latency_seconds_count"), 1.0);
    assert_eq!(value("dcsupervisor_delivery_backlog_bytes"), 0.0);
    assert_eq!(value("dcsupervisor_spill_bytes"), 0.0);
    assert_eq!(value("dcsupervisor_worker_up"), 1.0);
    assert_eq!(value("dcsupervisor_worker_restarts_total"), 0.0);
    assert!(value("dcsupervisor_worker_resident_bytes") > 1_000_000.0, "a Python process with Django");
    assert!(value("dcsupervisor_last_heartbeat_age_seconds") >= 0.0);
    assert!(metrics.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");

    let (status, content_type, _) = call(&base, "GET", "/metrics").await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert_eq!(get(&base, "/nothing").await.0, 404);
    assert_eq!(call(&base, "POST", "/metrics").await.0, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_key_is_alive_but_not_ready() {
    let plane = ControlPlane::start();
    let env = [LISTEN_ON_ANY_PORT, ("DJANGOCOMMAND_API_KEY", "dc_refused_key")];
    let runner = Supervisor::start_with(&plane.url, "", "", common::demo_project(), &env);
    let base = health_url(&runner).await;
    // Its first heartbeat was tried (and refused).
    runner.wait_notified("READY=1", LIMIT).await;
    assert_eq!(get(&base, "/healthz").await, (200, "ok\n".into()));
    let (status, body) = get(&base, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("not authenticated with the control plane"), "{body}");
    assert!(body.contains("no heartbeat answered yet"), "{body}");
    assert!(!body.contains("dc_refused_key") && !runner.log().contains("dc_refused_key"));
}

/// An operator who deployed and sent SIGHUP can tell from /metrics whether
/// the new configuration is in force or was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_are_counted_by_outcome_and_a_refused_one_is_flagged() {
    let plane = ControlPlane::start();
    let runner = Supervisor::start_with(&plane.url, "", "", common::demo_project(), &[LISTEN_ON_ANY_PORT]);
    let base = health_url(&runner).await;
    let metrics = get(&base, "/metrics").await.1;
    assert_eq!(sample(&metrics, "dcsupervisor_config_last_reload_successful"), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "dcsupervisor_reloads_total{outcome=\"applied\"}"), None, "{metrics}");

    std::fs::write(runner.config_path(), "[server]\nheartbeat_interval = 1\n").unwrap();
    runner.signal(nix::sys::signal::Signal::SIGHUP);
    runner.wait_reload_refused(1).await;
    let metrics = get(&base, "/metrics").await.1;
    assert_eq!(sample(&metrics, "dcsupervisor_reloads_total{outcome=\"refused\"}"), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "dcsupervisor_config_last_reload_successful"), Some(0.0), "{metrics}");

    runner.write_config("", "");
    runner.signal(nix::sys::signal::Signal::SIGHUP);
    runner.wait_reloaded(1).await;
    let metrics = get(&base, "/metrics").await.1;
    assert_eq!(sample(&metrics, "dcsupervisor_reloads_total{outcome=\"applied\"}"), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "dcsupervisor_config_last_reload_successful"), Some(1.0), "{metrics}");
}
