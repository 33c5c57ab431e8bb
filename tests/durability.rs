//! Nothing lost whatever the disk or a signal does: each execution's
//! output log, against a real runner stopped with SIGTERM and `kill -9`, a
//! "disk" that fills and frees (RLIMIT_FSIZE, set on the running runner with
//! prlimit, works everywhere), and the caps on the logs.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::plane::{output, status_and_code, ControlPlane, Supervisor, LIMIT};
use dcsupervisor::local_plane::wire::{Endpoint, ExecutionStatus, FaultSpec};
use dcsupervisor::protocol::api::ExecutionId;
use nix::sys::signal::Signal;
use serde_json::Value;

const RUNNER: &str = "[runner]\npoll_interval = 0.1\noutput_flush_interval = 0.2\nshutdown_grace = 1\n";

fn lines(prefix: &str, count: usize) -> String {
    (0..count).map(|i| format!("{prefix} {i}\n")).collect()
}

fn log_path(runner: &Supervisor, id: &ExecutionId) -> PathBuf {
    runner.dir.path().join(".dcsupervisor/outbox").join(format!("{id}.wal"))
}

/// Refuses every output chunk until the faults are cleared.
async fn output_outage(plane: &ControlPlane) {
    plane
        .fault(FaultSpec {
            endpoint: Some(Endpoint::Output),
            status: 503,
            duration_ms: Some(600_000),
            ..FaultSpec::default()
        })
        .await;
}

/// Waits until the execution's job has run and exited (its pid is in the
/// journal), or the execution is over.
async fn wait_job_ended(plane: &ControlPlane, runner: &Supervisor, id: &ExecutionId) {
    let entry = runner.dir.path().join(".dcsupervisor/journal").join(format!("{id}.json"));
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let pid = std::fs::read(&entry)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .and_then(|entry| entry["pid"].as_u64());
        if pid.is_some_and(|pid| !common::alive(pid as u32)) {
            return;
        }
        if !entry.exists()
            && !matches!(
                plane.execution(id).await.summary.status,
                ExecutionStatus::Pending | ExecutionStatus::Running
            )
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job of {id} did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the output log of `id` holds `needle`.
async fn wait_for_record(runner: &Supervisor, id: &ExecutionId, needle: &[u8]) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !std::fs::read(log_path(runner, id)).unwrap_or_default().windows(needle.len()).any(|w| w == needle)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?} never reached the log of {id}",
            String::from_utf8_lossy(needle)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The bodies of every `complete` request the runner made for `id`.
async fn completions(plane: &ControlPlane, id: &ExecutionId) -> Vec<Value> {
    let suffix = format!("{id}/complete/");
    plane.requests().await.into_iter().filter(|r| r.path.ends_with(&suffix)).map(|r| r.body).collect()
}

/// Every completion sent for `id` says the same: never a contradicting one.
async fn assert_one_completion(plane: &ControlPlane, id: &ExecutionId, status: &str) {
    let sent = completions(plane, id).await;
    assert!(!sent.is_empty());
    assert!(sent.iter().all(|c| c["status"] == status), "contradicting completions: {sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_output_fails_keeps_every_line_and_the_real_exit() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", RUNNER);
    output_outage(&plane).await;
    let id = plane.queue("noisy", "--lines 200").await;
    wait_job_ended(&plane, &runner, &id).await;
    // Stop now: a second signal skips the wait for delivery.
    runner.signal(Signal::SIGTERM);
    runner.wait_notified("STOPPING=1", LIMIT).await;
    runner.signal(Signal::SIGTERM);
    assert!(runner.wait_exit(LIMIT).await.is_some(), "the runner stopped");
    assert_eq!(
        plane.execution(&id).await.summary.status,
        ExecutionStatus::Running,
        "nothing was completed before the restart"
    );

    plane.clear_faults().await;
    runner.restart();
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0), "the real exit, not a made-up failure");
    assert_eq!(output(&done, false), lines("out", 200));
    assert_eq!(output(&done, true), lines("err", 200));
    assert_one_completion(&plane, &id, "success").await;
    assert!(
        common::removed_within(&log_path(&runner, &id), LIMIT).await,
        "the log is removed once delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_a_restart_sends_the_rest_in_order_and_exactly_one_completion() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", RUNNER);
    // The first two chunks get through (slowly), then output fails.
    plane
        .fault(FaultSpec {
            endpoint: Some(Endpoint::Output),
            status: 0,
            delay_ms: Some(300),
            count: Some(2),
            ..FaultSpec::default()
        })
        .await;
    output_outage(&plane).await;
    let ended = plane.queue("noisy", "--lines 300 --flush").await;
    let running = plane.queue("sleep", "30").await;
    wait_job_ended(&plane, &runner, &ended).await;
    // The job's exit is in its log (a moment after the process ended): only
    // then is there a real completion for the restart to send.
    wait_for_record(&runner, &ended, br#""kind":"end""#).await;
    wait_for_record(&runner, &running, b"sleeping").await;
    runner.signal(Signal::SIGKILL);
    assert!(runner.wait_exit(LIMIT).await.is_none() || !runner.is_running());

    plane.clear_faults().await;
    runner.restart();
    let done = plane.wait_done(&ended, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0));
    assert_eq!(output(&done, false), lines("out", 300), "every line once, in order");
    assert_eq!(output(&done, true), lines("err", 300));
    assert_one_completion(&plane, &ended, "success").await;

    let stopped = plane.wait_done(&running, LIMIT).await;
    assert_eq!(status_and_code(&stopped), ("failed", -1));
    assert_eq!(output(&stopped, false), "sleeping 30\n", "what it printed before the kill is kept");
    assert!(output(&stopped, true).contains("the runner restarted while this command was running"));
    assert_one_completion(&plane, &running, "failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_output_in_memory_in_order_and_writes_it_when_space_returns() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", RUNNER);
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    output_outage(&plane).await;
    // Room for the runner's own log to grow a little, not for the output.
    let room = std::fs::metadata(runner.log_path()).unwrap().len() + 48 * 1024;
    assert!(common::set_file_size_limit(runner.pid(), Some(room)), "prlimit");
    let id = plane.queue("noisy", "--lines 4000 --flush").await;
    // systemd hears of it (STATUS=), and the log says it.
    runner.wait_notified("STATUS=DEGRADED: cannot write to the state directory", LIMIT).await;
    let log = runner.log();
    assert!(log.contains("cannot write output logs in the state directory"), "{log}");
    wait_job_ended(&plane, &runner, &id).await;
    assert!(std::fs::metadata(log_path(&runner, &id)).unwrap().len() <= room);

    assert!(common::set_file_size_limit(runner.pid(), None), "prlimit");
    runner.wait_notified("STATUS=active", LIMIT).await;
    let log = runner.log();
    assert!(log.contains("the state directory takes writes again"), "{log}");
    // Everything held is on disk now, after the cut-off torn record: a
    // runner killed here loses nothing.
    runner.signal(Signal::SIGKILL);
    assert!(runner.wait_exit(LIMIT).await.is_none() || !runner.is_running());
    plane.clear_faults().await;
    runner.restart();
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0));
    assert!(output(&done, false) == lines("out", 4000), "stdout incomplete or out of order");
    assert!(output(&done, true) == lines("err", 4000), "stderr incomplete or out of order");
    assert_one_completion(&plane, &id, "success").await;
}

/// With the server away, the log stays within its cap: the head is on
/// disk, the tail in memory, and a notice says what was left out.
async fn capped(runner_config: &str) {
    let plane = ControlPlane::start();
    let runner = Supervisor::start(&plane.url, "", runner_config);
    output_outage(&plane).await;
    let id = plane.queue("noisy", "--lines 20000").await;
    let path = log_path(&runner, &id);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !runner.log().contains("reached its cap") {
        assert!(std::fs::metadata(&path).map_or(0, |m| m.len()) <= 32 * 1024, "over the cap");
        assert!(tokio::time::Instant::now() < deadline, "the cap was never reached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_job_ended(&plane, &runner, &id).await;
    assert!(std::fs::metadata(&path).unwrap().len() <= 32 * 1024);
    plane.clear_faults().await;
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0));
    let (out, err) = (output(&done, false), output(&done, true));
    // Head and tail of the output as read, whichever stream they were on.
    let starts = |text: &str| text.chars().take(80).collect::<String>();
    assert!(
        out.starts_with("out 0\nout 1\n") || err.starts_with("err 0\nerr 1\n"),
        "the head is kept: {:?} {:?}",
        starts(&out),
        starts(&err)
    );
    assert!(out.contains("bytes of output left out here") || err.contains("bytes of output left out here"));
    let ends = |text: &str| text[text.len().saturating_sub(60)..].to_string();
    assert!(
        out.ends_with("out 19999\n") || err.ends_with("err 19999\n"),
        "the tail is kept: {:?} {:?}",
        ends(&out),
        ends(&err)
    );
    assert!(out.len() + err.len() < 100_000, "most of the middle was left out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_logs_are_capped_per_execution_and_per_state_directory() {
    let memory = "outbox_memory_bytes = 16384\n";
    capped(&format!("{RUNNER}{memory}spool_max_bytes = 32768\n")).await;
    capped(&format!("{RUNNER}{memory}state_dir_max_bytes = 32768\n")).await;
}

/// A runner killed after taking an execution and before the control plane
/// got its `start` leaves it journalled (no job yet) and still queued there.
/// The next start must handle it once, and since it never ran, run it. Before,
/// the recovery started it again itself (then reported it `failed` with the
/// restart line, although it never ran), racing the poller, which took it
/// from the queue too and ran it: two completions that contradict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_whose_start_never_got_there_runs_once_after_a_restart() {
    let plane = ControlPlane::start();
    // A long grace: stopping it at the end waits for whatever it still does.
    let runner_config = "[runner]\npoll_interval = 0.1\noutput_flush_interval = 0.2\nshutdown_grace = 20\n";
    let mut runner = Supervisor::start(&plane.url, "", runner_config);
    plane.wait_heartbeat_after(0, LIMIT).await;
    // The start stalls: the runner journals the execution and waits.
    let stall =
        FaultSpec { endpoint: Some(Endpoint::Start), delay_ms: Some(600_000), ..FaultSpec::default() };
    plane.fault(FaultSpec { count: Some(1), ..stall.clone() }).await;
    let id = plane.queue("say", "'ran once\n'").await;
    let journal = runner.dir.path().join(format!(".dcsupervisor/journal/{id}.json"));
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !journal.exists() {
        assert!(tokio::time::Instant::now() < deadline, "never journalled:\n{}", runner.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runner.signal(Signal::SIGKILL);
    assert!(runner.wait_exit(LIMIT).await.is_none() || !runner.is_running());
    plane.clear_faults().await;
    // After the restart the first `start` is held back a while: were the
    // recovery to start it, the poller, taking it too, would overtake it.
    plane.fault(FaultSpec { count: Some(1), delay_ms: Some(2000), ..stall }).await;
    runner.restart();
    plane.wait_done(&id, LIMIT).await;
    // Everything it was doing about the execution is over once it stops.
    assert_eq!(runner.terminate(LIMIT).await, Some(0), "{}", runner.log());
    let done = plane.execution(&id).await;
    assert_eq!(status_and_code(&done), ("success", 0), "{done:#?}\n{}", runner.log());
    assert_eq!(output(&done, false), "ran once\n");
    assert_eq!(output(&done, true), "");
    let starts = plane.requests().await.into_iter().filter(|r| r.path.ends_with(&format!("{id}/start/")));
    assert_eq!(starts.filter(|r| r.status == Some(200)).count(), 1, "started once");
    assert_one_completion(&plane, &id, "success").await;
}
