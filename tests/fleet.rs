//! Several runners (separate state directories) draining one control
//! plane's queue, as several hosts of one project do (issue 10, "Fleet"):
//! every execution runs exactly once, the losers of a `start` race back
//! off, and a runner killed mid-job has its execution reported by the
//! runner that restarts on its state directory, not by another.

mod common;

use std::time::Duration;

use common::plane::{output, status_and_code, ControlPlane, Supervisor, LIMIT};
use nix::sys::signal::Signal;
use serde_json::Value;

fn requests_to(requests: &[Value], id: &str, endpoint: &str) -> Vec<Value> {
    let suffix = format!("{}/{endpoint}/", id.to_ascii_lowercase());
    requests
        .iter()
        .filter(|r| r["path"].as_str().unwrap().to_ascii_lowercase().ends_with(&suffix))
        .cloned()
        .collect()
}

fn answered(requests: &[Value], status: u64) -> usize {
    requests.iter().filter(|r| r["status"].as_u64() == Some(status)).count()
}

/// Queues `count` executions at once (so the runners race for them), waits
/// for all, and checks each ran exactly once. Returns the lost races.
async fn drain(plane: &ControlPlane, runners: usize, count: usize) -> usize {
    let mut ids = Vec::new();
    for n in 0..count {
        ids.push(plane.queue("say", &format!("'run {n}\\n'")).await);
    }
    for (n, id) in ids.iter().enumerate() {
        let done = plane.wait_done(id, LIMIT).await;
        assert_eq!(status_and_code(&done), ("success".into(), 0), "{done:#}");
        assert_eq!(output(&done, false), format!("run {n}\n"), "ran once, output once");
    }
    let requests = plane.requests().await;
    let mut races = 0;
    for id in &ids {
        let starts = requests_to(&requests, id, "start");
        assert_eq!(answered(&starts, 200), 1, "started exactly once: {starts:#?}");
        // A loser tries once and backs off: never more attempts than runners.
        assert!(starts.len() <= runners, "{starts:#?}");
        races += answered(&starts, 409);
        let completes = requests_to(&requests, id, "complete");
        assert_eq!((completes.len(), answered(&completes, 200)), (1, 1), "{completes:#?}");
    }
    races
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_then_three_runners_run_every_execution_exactly_once() {
    let plane = ControlPlane::start();
    let mut fleet = vec![Supervisor::start(&plane.url, "", ""), Supervisor::start(&plane.url, "", "")];
    let lost_by_two = drain(&plane, 2, 12).await;
    fleet.push(Supervisor::start(&plane.url, "", ""));
    let lost_by_three = drain(&plane, 3, 12).await;
    println!("start races lost: {lost_by_two} with two runners, {lost_by_three} with three");
    for runner in &mut fleet {
        assert!(runner.is_running());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_mid_job_is_reported_by_itself_after_its_restart() {
    let plane = ControlPlane::start();
    let mut first = Supervisor::start(&plane.url, "", "");
    let long = plane.queue("sleep", "60").await;
    plane.wait_status(&long, LIMIT, |s| s == "running").await;
    let mut second = Supervisor::start(&plane.url, "", "");

    first.signal(Signal::SIGKILL);
    assert!(first.wait_exit(Duration::from_secs(10)).await.is_some() || !first.is_running());
    // The other runner goes on draining the queue but never reports an
    // execution it did not run.
    for _ in 0..2 {
        let id = plane.queue("noop", "").await;
        assert_eq!(status_and_code(&plane.wait_done(&id, LIMIT).await).0, "success");
    }
    assert_eq!(plane.execution(&long).await["status"], "running", "not touched by the other runner");
    assert!(second.is_running());

    first.restart();
    let done = plane.wait_done(&long, LIMIT).await;
    assert_eq!(status_and_code(&done), ("failed".into(), -1));
    assert!(output(&done, true).contains("the runner restarted while this command was running"), "{done:#}");
    assert!(first.log().contains("reporting an execution interrupted by a runner restart"));
    assert!(!second.log().contains("reporting an execution interrupted"), "{}", second.log());
    let completes = requests_to(&plane.requests().await, &long, "complete");
    assert_eq!(completes.len(), 1, "{completes:#?}");
}
