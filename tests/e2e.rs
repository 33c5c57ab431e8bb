//! dcsupervisor against the local control plane, over real HTTP on
//! loopback: every path of the runner protocol, and the failures a real
//! network and a real control plane produce.

mod common;

use std::time::Duration;

use common::plane::{chunks, output, status_and_code, ControlPlane, Supervisor, LIMIT};
use dcsupervisor::local_plane::wire::{ExecutionDetail, ExecutionStatus, FaultSpec, NewExecution};
use dcsupervisor::protocol::api::RunnerState;
use dcsupervisor::protocol::commands::BoundArgs;
use serde_json::json;

fn assert_numbered_from_one(execution: &ExecutionDetail) {
    let numbers: Vec<u64> = chunks(execution).iter().map(|c| c.chunk_number).collect();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>(), "{execution:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_executions_and_reports_output_and_exit_codes() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, "", "");

    let noisy = plane.queue("noisy", "--lines 3").await;
    let fail = plane.queue("fail", "--code 3").await;
    let boom = plane.queue("boom", "").await;
    let bad = plane.queue("bad_utf8", "").await;

    let noisy = plane.wait_done(&noisy, LIMIT).await;
    assert_eq!(status_and_code(&noisy), ("success", 0));
    assert_eq!(output(&noisy, false), "out 0\nout 1\nout 2\n");
    assert_eq!(output(&noisy, true), "err 0\nerr 1\nerr 2\n");
    assert_numbered_from_one(&noisy);
    for chunk in chunks(&noisy) {
        for segment in &chunk.segments {
            assert!(segment.timestamp.is_some(), "whole lines carry their timestamp: {segment:?}");
        }
    }

    let fail = plane.wait_done(&fail, LIMIT).await;
    assert_eq!(status_and_code(&fail), ("failed", 3));
    assert_eq!(output(&fail, true), "CommandError: demo failure\n");

    let boom = plane.wait_done(&boom, LIMIT).await;
    assert_eq!(status_and_code(&boom), ("failed", 1));
    assert!(output(&boom, true).ends_with("ValueError: kaboom\n"));

    // Invalid UTF-8 is replaced, and what follows it is kept.
    let bad = plane.wait_done(&bad, LIMIT).await;
    assert_eq!(output(&bad, false), "héllo wörld ✓\nbad \u{FFFD}\u{FFFD} bytes\nafter\n");

    let state = plane.state().await;
    let names: Vec<&str> = state.commands.iter().map(|c| c.name.as_str()).collect();
    assert!(names.contains(&"migrate") && names.contains(&"noisy"));
    assert!(!names.contains(&"shell") && !names.contains(&"djangocommand"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_while_the_command_runs() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, "", "");
    let id = plane.queue("sleep", "3").await;
    let running = plane.wait_status(&id, LIMIT, |_| true).await;
    let _ = running;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let execution = plane.execution(&id).await;
        if output(&execution, false).contains("sleeping 3") {
            assert_eq!(
                execution.summary.status,
                ExecutionStatus::Running,
                "the first line arrived before the end"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(output(&done, false), "sleeping 3\ndone\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_cancels() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, "", "");

    let timed = plane.queue_with(NewExecution { timeout: 1, ..NewExecution::new("spin", "") }).await;
    let soft = plane.queue("sleep", "60").await;
    let hard = plane.queue("spin", "").await;

    let timed = plane.wait_done(&timed, LIMIT).await;
    assert_eq!(status_and_code(&timed), ("timed_out", -1));

    plane.wait_status(&soft, LIMIT, |s| s == ExecutionStatus::Running).await;
    plane.wait_status(&hard, LIMIT, |s| s == ExecutionStatus::Running).await;
    plane.cancel(&soft, false).await;
    plane.cancel(&hard, true).await;
    assert_eq!(status_and_code(&plane.wait_done(&soft, LIMIT).await), ("cancelled", -15));
    assert_eq!(status_and_code(&plane.wait_done(&hard, LIMIT).await), ("cancelled", -9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_enforced_whatever_the_server_asks() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, "configured_in = \"django-settings\"", "");
    let shell = plane.wait_done(&plane.queue("shell", "").await, LIMIT).await;
    assert_eq!(status_and_code(&shell), ("failed", -1));
    assert_eq!(chunks(&shell).len(), 1);
    assert_eq!(
        output(&shell, true),
        "Command 'shell' rejected by runner security policy.\n\
         Reason: not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist\n\n\
         To allow this command, add it to DJANGOCOMMAND_ALLOWED_COMMANDS\n\
         in your Django settings:\n\n  \
         from djangocommand import DEFAULT_ALLOWED_COMMANDS\n  \
         DJANGOCOMMAND_ALLOWED_COMMANDS = DEFAULT_ALLOWED_COMMANDS + ('shell',)\n"
    );
    let own = plane.wait_done(&plane.queue("djangocommand", "start").await, LIMIT).await;
    assert_eq!(status_and_code(&own), ("failed", -1));

    let blocklist_plane = ControlPlane::start();
    let _blocklist = Supervisor::start(&blocklist_plane.url, "mode = \"blocklist\"", "");
    let flush = blocklist_plane.wait_done(&blocklist_plane.queue("flush", "--no-input").await, LIMIT).await;
    assert_eq!(status_and_code(&flush), ("failed", -1));
    assert!(output(&flush, true).contains("Reason: in DJANGOCOMMAND_DISALLOWED_COMMANDS blocklist\n"));
    assert!(output(&flush, true).contains("remove_disallowed_commands = [\"flush\"]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_only_never_sends_the_output() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, "metadata_only_commands = [\"exit_with\"]", "");
    let flagged = plane
        .queue_with(NewExecution { use_metadata_only_mode: true, ..NewExecution::new("noisy", "") })
        .await;
    let configured = plane.queue("exit_with", "4").await;
    for (id, expected) in [(flagged, ("success", 0)), (configured, ("failed", 4))] {
        let execution = plane.wait_done(&id, LIMIT).await;
        assert_eq!(status_and_code(&execution), expected);
        let notice = "(metadata-only mode, no output captured)\n";
        assert_eq!((output(&execution, false), output(&execution, true)), (notice.into(), notice.into()));
        let shape: Vec<(u64, bool)> =
            chunks(&execution).iter().map(|c| (c.chunk_number, c.is_stderr)).collect();
        assert_eq!(shape, [(1, false), (2, true)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_arguments_restrict_what_a_command_may_be_given() {
    let plane = ControlPlane::start();
    let bound = "[[policy.bound_args]]\ncommand = \"noisy\"\nargs = \"--lines 2\"\nlabel = \"Two lines\"\n";
    let _runner = Supervisor::start(&plane.url, "", bound);
    let allowed = plane.wait_done(&plane.queue("noisy", "--lines  '2'").await, LIMIT).await;
    assert_eq!(status_and_code(&allowed), ("success", 0));
    let refused = plane.wait_done(&plane.queue("noisy", "--lines 3").await, LIMIT).await;
    assert_eq!(status_and_code(&refused), ("failed", -1));
    assert!(output(&refused, true).contains("not one of the argument sets"), "{}", output(&refused, true));

    let state = plane.state().await;
    let noisy = state.commands.iter().find(|c| c.name == "noisy").unwrap();
    assert_eq!(
        noisy.bound_args,
        Some(vec![BoundArgs { args: "--lines 2".into(), label: "Two lines".into() }])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_slots_leave_executions_queued_on_the_server() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, "", "[runner]\nmax_concurrent = 2\npoll_interval = 0.1\n");
    let ids = [
        plane.queue("sleep", "2").await,
        plane.queue("sleep", "2").await,
        plane.queue("sleep", "2").await,
        plane.queue("sleep", "2").await,
    ];
    let mut max_running = 0;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let statuses: Vec<ExecutionStatus> = plane.executions().await.iter().map(|e| e.status).collect();
        max_running = max_running.max(statuses.iter().filter(|s| **s == ExecutionStatus::Running).count());
        if statuses.iter().all(|s| *s == ExecutionStatus::Success) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(max_running <= 2, "at most max_concurrent at once, saw {max_running}");
    // Nothing was started and dropped: exactly one start per execution.
    let starts = plane.requests().await.iter().filter(|r| r.path.ends_with("/start/")).count();
    assert_eq!(starts, ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_pauses_polling_until_the_runner_is_active_again() {
    let plane = ControlPlane::start();
    plane.set_state(RunnerState::Suspended, Some("billing")).await;
    let mut runner = Supervisor::start(&plane.url, "", "");
    let id = plane.queue("noop", "").await;
    // Two heartbeats while suspended: the execution is never fetched.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while plane.requests().await.iter().filter(|r| r.path == "/api/runner/heartbeat/").count() < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(plane.requests().await.iter().all(|r| r.path != "/api/runner/pending/"));
    assert_eq!(plane.execution(&id).await.summary.status, ExecutionStatus::Pending);
    plane.set_state(RunnerState::Active, None).await;
    assert_eq!(status_and_code(&plane.wait_done(&id, LIMIT).await), ("success", 0));
    assert!(runner.is_running());
    assert!(runner.log().contains("billing"), "the reason is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures_back_off_and_recover() {
    let plane = ControlPlane::start();
    plane
        .fault(FaultSpec {
            status: 401,
            count: Some(3),
            body: Some("{\"detail\": \"Invalid API key\"}".into()),
            ..FaultSpec::default()
        })
        .await;
    let mut runner = Supervisor::start(&plane.url, "", "");
    let id = plane.queue("noop", "").await;
    assert_eq!(status_and_code(&plane.wait_done(&id, LIMIT).await), ("success", 0));
    let requests = plane.requests().await;
    let first_ok = requests.iter().position(|r| r.status == Some(200)).unwrap();
    let before: Vec<&str> = requests[..first_ok].iter().map(|r| r.path.as_str()).collect();
    assert_eq!(before, ["/api/runner/heartbeat/"; 3], "only heartbeats while not authenticated");
    // The backoff schedule: 1 s, then 2 s between the refused heartbeats.
    let times: Vec<f64> = requests[..=first_ok].iter().map(|r| r.time).collect();
    assert!(times[1] - times[0] >= 0.9 && times[2] - times[1] >= 1.9, "{times:?}");
    assert!(runner.is_running());

    // A 403 on any later call pauses everything but heartbeats too.
    plane
        .fault(FaultSpec {
            status: 403,
            count: Some(1),
            path_prefix: "/api/runner/pending/".into(),
            ..FaultSpec::default()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = plane.queue("noop", "").await;
    assert_eq!(status_and_code(&plane.wait_done(&second, LIMIT).await), ("success", 0));
    assert!(runner.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_outages_lose_nothing() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", "");
    // Warm up: authenticated and synced.
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");

    // The command prints while every answer is a 503 for several seconds.
    let id = plane.queue("sleep", "2").await;
    plane.wait_status(&id, LIMIT, |s| s == ExecutionStatus::Running).await;
    plane.fault(FaultSpec { status: 503, count: Some(100000), ..FaultSpec::default() }).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    plane.clear_faults().await;
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0));
    assert_eq!(output(&done, false), "sleeping 2\ndone\n");
    assert_numbered_from_one(&done);

    // Bursts of 500 and timeouts on the polling and heartbeat never end the process.
    plane
        .fault(FaultSpec {
            status: 500,
            count: Some(8),
            path_prefix: "/api/runner/pending/".into(),
            ..FaultSpec::default()
        })
        .await;
    let after = plane.queue("noisy", "--lines 2").await;
    assert_eq!(status_and_code(&plane.wait_done(&after, LIMIT).await).0, "success");
    assert!(runner.is_running());

    // Every retry carries a fresh nonce.
    let requests = plane.requests().await;
    let nonces: std::collections::HashSet<&str> =
        requests.iter().map(|r| r.headers["x-request-nonce"].as_str()).collect();
    assert_eq!(nonces.len(), requests.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_is_down_then_back() {
    // Reserve a port, start the runner against it while nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let mut runner = Supervisor::start(&url, "", "");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(runner.is_running(), "connection refused does not end the runner");
    let plane = ControlPlane::start_on(&format!("127.0.0.1:{port}"));
    let id = plane.queue("noop", "").await;
    assert_eq!(status_and_code(&plane.wait_done(&id, LIMIT).await).0, "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_and_hostile_ids_are_refused() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", "");
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");

    plane
        .fault(FaultSpec {
            status: 200,
            count: Some(3),
            path_prefix: "/api/runner/pending/".into(),
            body: Some("this is not json".into()),
            ..FaultSpec::default()
        })
        .await;
    let injected = plane
        .inject_pending(vec![
            json!({"id": "../../admin", "command": "noop"}),
            json!({"id": "3f2b8c1e0a4d4e5f9b6a7c8d9e0f1a2b", "command": "noop"}),
            json!({"command": "noop"}),
            json!("not an object"),
        ])
        .await;
    assert!(injected.is_ok(), "{injected:?}");
    let id = plane.queue("noisy", "--lines 1").await;
    assert_eq!(status_and_code(&plane.wait_done(&id, LIMIT).await).0, "success");
    let paths: Vec<String> = plane.requests().await.into_iter().map(|r| r.path).collect();
    assert!(paths.iter().all(|p| !p.contains("admin") && !p.contains("3f2b8c1e0a4d4e5f")), "{paths:?}");
    assert!(runner.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_spills_output_to_disk_and_delivers_it_all() {
    let plane = ControlPlane::start();
    let runner_config =
        "[runner]\npoll_interval = 0.1\noutput_flush_interval = 0.2\noutbox_memory_bytes = 16384\n";
    let runner = Supervisor::start(&plane.url, "", runner_config);
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");

    let lines = 20_000;
    let id = plane.queue("noisy", &format!("--lines {lines} --delay 1")).await;
    plane.wait_status(&id, LIMIT, |s| s == ExecutionStatus::Running).await;
    plane.fault(FaultSpec { status: 503, count: Some(1_000_000), ..FaultSpec::default() }).await;
    // The command writes everything during the outage, into its output log.
    let log = runner.dir.path().join(".dcsupervisor/outbox").join(format!("{id}.wal"));
    let deadline = tokio::time::Instant::now() + LIMIT;
    while std::fs::metadata(&log).map_or(0, |m| m.len()) < 200_000 {
        assert!(tokio::time::Instant::now() < deadline, "the output log did not grow: {}", runner.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    plane.clear_faults().await;
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0));
    let expected_out: String = (0..lines).map(|i| format!("out {i}\n")).collect();
    let expected_err: String = (0..lines).map(|i| format!("err {i}\n")).collect();
    assert!(output(&done, false) == expected_out, "stdout incomplete or out of order");
    assert!(output(&done, true) == expected_err, "stderr incomplete or out of order");
    assert_numbered_from_one(&done);
    assert!(common::removed_within(&log, LIMIT).await, "the output log is removed once delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_output_is_chunked_early_and_capped_head_and_tail() {
    let plane = ControlPlane::start();
    let extra = "[runner]\npoll_interval = 0.1\noutput_flush_interval = 5.0\nchunk_max_bytes = 1024\n";
    let runner = Supervisor::start(&plane.url, "", extra);
    // 30000 lines per stream (~260 KB each), written in well under the 5 s
    // flush interval: only the size threshold can cut it into many chunks.
    let id = plane.queue("noisy", "--lines 30000").await;
    let done = plane.wait_done(&id, LIMIT).await;
    let expected: String = (0..30000).map(|i| format!("out {i}\n")).collect();
    assert_eq!(output(&done, false), expected);
    let sizes: Vec<usize> =
        chunks(&done).iter().map(|c| c.segments.iter().map(|s| s.content.len()).sum()).collect();
    assert!(sizes.len() >= 8, "flushed early, not once per 5 s: {} chunks", sizes.len());
    // chunk_max_bytes is a real maximum.
    assert!(sizes.iter().all(|size| *size <= 1024), "{sizes:?}");
    assert!(!runner.log().contains(common::plane::KEY), "the API key never appears in the logs");

    let capped_plane = ControlPlane::start();
    let extra = "[runner]\npoll_interval = 0.1\noutput_cap_bytes = 2000\n";
    let _capped = Supervisor::start(&capped_plane.url, "", extra);
    let id = capped_plane.queue("noisy", "--lines 3000").await;
    let done = capped_plane.wait_done(&id, LIMIT).await;
    let (out, err) = (output(&done, false), output(&done, true));
    assert!(out.starts_with("out 0\nout 1\n"), "the head is kept");
    assert!(err.contains("bytes of output left out"), "a notice says what was cut");
    assert!(out.ends_with("out 2999\n") || err.ends_with("err 2999\n"), "the tail is kept");
    assert!(out.len() + err.len() < 4000, "the cap holds: {} bytes", out.len() + err.len());
    assert_eq!(status_and_code(&done), ("success", 0));
}
