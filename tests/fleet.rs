//! Several runners (separate state directories) draining one control
//! plane's queue, as several hosts of one project do (issue 10, "Fleet"):
//! every execution runs exactly once, the losers of a `start` race back
//! off, and a runner killed mid-job has its execution reported by the
//! runner that restarts on its state directory, not by another.

mod common;

use std::time::Duration;

use common::plane::{output, status_and_code, ControlPlane, Supervisor, LIMIT};
use dcsupervisor::local_plane::wire::{Endpoint, ExecutionStatus, FaultSpec, LoggedRequest};
use nix::sys::signal::Signal;
use serde_json::json;

fn answered(requests: &[LoggedRequest], status: u16) -> usize {
    requests.iter().filter(|r| r.status == Some(status)).count()
}

/// Starts `runners` runners on one control plane, then offers the same
/// `count` executions to every one of them (as a control plane does when
/// they poll at the same moment), so they race for each; waits for all and
/// checks each ran exactly once. Returns the races lost.
async fn drain(runners: usize, count: usize) -> usize {
    let plane = ControlPlane::start();
    let mut fleet: Vec<Supervisor> = (0..runners).map(|_| Supervisor::start(&plane.url, "", "")).collect();
    // Every runner is authenticated: its first heartbeat was answered.
    for runner in &fleet {
        runner.wait_notified("STATUS=connected to the control plane", LIMIT).await;
    }
    let nothing = FaultSpec {
        endpoint: Some(Endpoint::Pending),
        status: 200,
        body: Some("{\"executions\": []}".into()),
        count: Some(1_000_000),
        ..FaultSpec::default()
    };
    plane.fault(nothing.clone()).await;
    let mut ids = Vec::new();
    for n in 0..count {
        ids.push(plane.queue("say", &format!("'run {n}\\n'")).await);
    }
    let mut entries = Vec::new();
    for id in &ids {
        entries.push(plane.signed_entry(id).await);
    }
    // Every runner's next poll gets all of them (a runner with a backlog
    // does not poll again until it is nearly drained).
    plane.clear_faults().await;
    let everything = json!({"executions": entries}).to_string();
    plane.fault(FaultSpec { body: Some(everything), count: Some(runners as u64), ..nothing.clone() }).await;
    plane.fault(nothing).await;
    for (n, id) in ids.iter().enumerate() {
        let done = plane.wait_done(id, LIMIT).await;
        assert_eq!(status_and_code(&done), ("success", 0), "{done:#?}");
        assert_eq!(output(&done, false), format!("run {n}\n"), "ran once, output once");
    }
    let requests = plane.requests().await;
    let mut races = 0;
    for id in &ids {
        let starts = common::plane::requests_to(&requests, id, "start");
        assert_eq!(answered(&starts, 200), 1, "started exactly once: {starts:#?}");
        races += answered(&starts, 409);
        let completes = common::plane::requests_to(&requests, id, "complete");
        assert_eq!((completes.len(), answered(&completes, 200)), (1, 1), "{completes:#?}");
    }
    // Each loser logged its refusal once per execution, inside the
    // execution's span, and did not try that execution again.
    let mut refusals = 0;
    for runner in &mut fleet {
        assert!(runner.is_running());
        let log = runner.log();
        for id in &ids {
            let lost =
                log.lines().filter(|l| l.contains(id.as_str()) && l.contains("refused to start it")).count();
            assert!(lost <= 1, "{id} refused {lost} times to one runner:\n{log}");
            refusals += lost;
        }
    }
    assert_eq!(refusals, races, "every lost race was a refusal the loser logged");
    races
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_runners_run_every_execution_exactly_once() {
    let lost_by_two = drain(2, 12).await;
    let lost_by_three = drain(3, 12).await;
    println!("start races lost: {lost_by_two} with two runners, {lost_by_three} with three");
    assert!(lost_by_two > 0 && lost_by_three > 0, "the runners raced for the same executions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_mid_job_is_reported_by_itself_after_its_restart() {
    let plane = ControlPlane::start();
    let mut first = Supervisor::start(&plane.url, "", "");
    let long = plane.queue("sleep", "60").await;
    plane.wait_status(&long, LIMIT, |s| s == ExecutionStatus::Running).await;
    let mut second = Supervisor::start(&plane.url, "", "");

    first.signal(Signal::SIGKILL);
    assert!(first.wait_exit(Duration::from_secs(10)).await.is_some() || !first.is_running());
    // The other runner goes on draining the queue but never reports an
    // execution it did not run.
    for _ in 0..2 {
        let id = plane.queue("noop", "").await;
        assert_eq!(status_and_code(&plane.wait_done(&id, LIMIT).await).0, "success");
    }
    assert_eq!(
        plane.execution(&long).await.summary.status,
        ExecutionStatus::Running,
        "not touched by the other runner"
    );
    assert!(second.is_running());

    first.restart();
    let done = plane.wait_done(&long, LIMIT).await;
    assert_eq!(status_and_code(&done), ("failed", -1));
    assert!(output(&done, true).contains("the runner restarted while this command was running"), "{done:#?}");
    assert!(first.log().contains("reporting an execution interrupted by a runner restart"));
    assert!(!second.log().contains("reporting an execution interrupted"), "{}", second.log());
    let completes = common::plane::requests_to(&plane.requests().await, &long, "complete");
    assert_eq!(completes.len(), 1, "{completes:#?}");
}
