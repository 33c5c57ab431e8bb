//! What a hostile network does to the runner, scripted with dccontrol's
//! fault injection (docs/protocol.md, "Testing against dccontrol"): odd
//! statuses, cut bodies, redirects, HTML pages, resets, stalled calls,
//! refused starts, a control plane that offers each execution once, ids in
//! two spellings, and the adaptive flush. Each test names the defect it
//! pins (issue 10 and issue 13, part 1).

mod common;

use std::time::Duration;

use common::plane::{chunks, output, status_and_code, ControlPlane, Supervisor, LIMIT};
use dcsupervisor::local_plane::wire::{Endpoint, FaultSpec, LoggedRequest, NewExecution};
use dcsupervisor::protocol::api::ExecutionId;
use serde_json::json;

/// What each request was answered (0 for a reset, `u64::MAX` while unanswered).
fn statuses(requests: &[LoggedRequest]) -> Vec<u64> {
    requests.iter().map(|r| r.status.map_or(u64::MAX, u64::from)).collect()
}

/// A fault on one endpoint; the other fields as `FaultSpec::default()`.
fn on(endpoint: Endpoint) -> FaultSpec {
    FaultSpec { endpoint: Some(endpoint), ..FaultSpec::default() }
}

/// A new random id, chosen before queueing (the tests sign entries by hand).
fn new_id() -> ExecutionId {
    ExecutionId::parse(&uuid::Uuid::new_v4().to_string()).expect("a UUID")
}

async fn warmed_up(plane: &ControlPlane, extra: &str) -> Supervisor {
    let runner = Supervisor::start(&plane.url, "", extra);
    let warm = plane.queue("noop", "").await;
    assert_eq!(status_and_code(&plane.wait_done(&warm, LIMIT).await).0, "success");
    runner
}

/// Defect 10.1: a 524 or 520 (CDN), a 503 whose body is cut short, a 307,
/// a reset, and a `start` the server did but answered with a proxy's HTML
/// page each lost output or left the execution running forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_answers_are_retried_and_nothing_is_lost() {
    let plane = ControlPlane::start();
    let mut runner = warmed_up(&plane, "").await;
    for fault in [
        FaultSpec { status: 200, html: true, ..on(Endpoint::Pending) },
        FaultSpec { status: 200, html: true, after_processing: true, ..on(Endpoint::Start) },
        FaultSpec { status: 524, ..on(Endpoint::Output) },
        FaultSpec { status: 520, ..on(Endpoint::Output) },
        FaultSpec { status: 503, cut_body: true, ..on(Endpoint::Output) },
        FaultSpec { status: 307, ..on(Endpoint::Output) },
        FaultSpec { reset: true, ..on(Endpoint::Output) },
        FaultSpec { status: 200, after_processing: true, cut_body: true, ..on(Endpoint::Output) },
        FaultSpec { status: 408, ..on(Endpoint::Complete) },
        FaultSpec { status: 502, html: true, ..on(Endpoint::Complete) },
        FaultSpec { status: 425, retry_after: Some(1), ..on(Endpoint::Complete) },
    ] {
        plane.fault(fault).await;
    }
    let id = plane.queue("noisy", "--lines 3").await;
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0));
    assert_eq!(output(&done, false), "out 0\nout 1\nout 2\n");
    assert_eq!(output(&done, true), "err 0\nerr 1\nerr 2\n");

    let requests = plane.requests().await;
    assert_eq!(
        statuses(&common::plane::requests_to(&requests, &id, "start")),
        [200],
        "started once, on the HTML answer"
    );
    let outputs = statuses(&common::plane::requests_to(&requests, &id, "output"));
    assert_eq!(outputs[..6], [524, 520, 503, 307, 0, 200], "every fault was met and retried: {outputs:?}");
    let completes = statuses(&common::plane::requests_to(&requests, &id, "complete"));
    assert_eq!(completes, [408, 502, 425, 200]);
    assert!(runner.is_running());
    let log = runner.log();
    assert!(log.contains("a redirect to \"/moved/api/runner/executions/"), "{log}");
    // A 2xx whose body is needed but unusable is an error, retried, and said so.
    assert!(log.contains("polling for executions failed: unusable answer from the control plane"), "{log}");
}

/// Only a definitive 4xx drops a message, and the log says so with the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definitive_refusal_drops_one_message_and_logs_the_execution() {
    let plane = ControlPlane::start();
    let runner = warmed_up(&plane, "").await;
    let body = "{\"detail\": \"bad chunk\"}";
    plane.fault(FaultSpec { status: 422, body: Some(body.into()), ..on(Endpoint::Output) }).await;
    let id = plane.queue("noisy", "--lines 1").await;
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("success", 0), "the completion still arrives");
    runner.wait_for_log("dropped, not retrying", LIMIT).await;
    let line = runner.log().lines().find(|l| l.contains("dropped, not retrying")).unwrap().to_string();
    assert!(
        line.contains(id.as_str()) && line.contains("bad chunk") && line.contains("command=noisy"),
        "{line}"
    );
}

/// Defect 10.5: a stalled `cancel-status` was awaited inside the job's loop,
/// so a 3 s timeout was enforced only once the stall ended. Now the
/// completion arrives while the first cancel-status call is still stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_cancel_status_never_delays_the_timeout_or_the_output() {
    const STALL: f64 = 4.5; // below the runner's request_timeout (5 s): answered, late
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, "", "");
    plane.wait_heartbeat_after(0, LIMIT).await;
    let stall = FaultSpec {
        status: 0,
        delay_ms: Some((STALL * 1000.0) as u64),
        count: Some(100),
        ..on(Endpoint::CancelStatus)
    };
    plane.fault(stall).await;
    let id = plane.queue_with(NewExecution { timeout: 3, ..NewExecution::new("sleep", "30") }).await;
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("timed_out", -1));
    assert_eq!(output(&done, false), "sleeping 30\n");
    let requests = plane.requests().await;
    let first_poll = common::plane::requests_to(&requests, &id, "cancel-status")[0].time;
    let completed = common::plane::requests_to(&requests, &id, "complete")[0].time;
    assert!(
        completed < first_poll + STALL,
        "the completion ({completed}) must arrive before the stalled cancel-status ({first_poll}) is answered"
    );
}

/// Defect 10.6: with 409 on every start the runner re-polled and re-started
/// at once (146 starts in 10 s). Now the execution and the polling back off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_starts_back_off() {
    let plane = ControlPlane::start();
    let _runner = warmed_up(&plane, "").await;
    let body = "{\"detail\": \"already started by another runner\"}";
    plane
        .fault(FaultSpec {
            status: 409,
            body: Some(body.into()),
            count: Some(100_000),
            ..on(Endpoint::Start)
        })
        .await;
    let id = plane.queue("noop", "").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let starts = common::plane::requests_to(&plane.requests().await, &id, "start").len();
    // Backing off (1 s, 2 s, 4 s… per execution, plus a pause of the
    // polling) allows about three in 4 s; re-polling at once allowed dozens.
    assert!((1..=5).contains(&starts), "{starts} starts in 4 s");
}

/// Defect 10.7: a control plane that offers each pending execution once;
/// with 2 slots and 8 offered, the runner dropped 6. Now it keeps them and
/// starts them as slots free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offered_executions_wait_for_a_slot_instead_of_being_dropped() {
    let plane = ControlPlane::start();
    let mut ids = Vec::new();
    for _ in 0..8 {
        let id = new_id();
        plane.queue_with(NewExecution { id: Some(id.clone()), ..NewExecution::new("sleep", "0.3") }).await;
        ids.push(id);
    }
    offer_once(&plane, &ids).await;
    let extra = "[runner]\nmax_concurrent = 2\npoll_interval = 0.1\noutput_flush_interval = 0.2\n";
    let _runner = Supervisor::start(&plane.url, "", extra);
    for id in &ids {
        assert_eq!(status_and_code(&plane.wait_done(id, LIMIT).await), ("success", 0), "{id}");
    }
    let requests = plane.requests().await;
    for id in &ids {
        assert_eq!(statuses(&common::plane::requests_to(&requests, id, "start")), [200], "{id}");
    }
}

/// Defect 10.8: the same execution id in upper and lower case ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_in_two_spellings_runs_once() {
    let plane = ControlPlane::start();
    let id = new_id();
    plane.queue_with(NewExecution { id: Some(id.clone()), ..NewExecution::new("sleep", "0.5") }).await;
    let upper = ExecutionId::parse(&id.as_str().to_ascii_uppercase()).expect("a UUID");
    offer_once(&plane, &[id.clone(), upper]).await;
    let _runner = Supervisor::start(&plane.url, "", "");
    assert_eq!(status_and_code(&plane.wait_done(&id, LIMIT).await), ("success", 0));
    let starts = common::plane::requests_to(&plane.requests().await, &id, "start");
    assert_eq!(starts.len(), 1, "{starts:#?}");
}

/// The next `/pending/` answer offers `ids` (as `sleep 0.3`… entries built by
/// hand, the ids spelled as given); every later one offers nothing.
async fn offer_once(plane: &ControlPlane, ids: &[ExecutionId]) {
    let mut entries = Vec::new();
    for id in ids {
        let mut entry = plane.signed_entry(id).await;
        entry["id"] = json!(id.as_str());
        entries.push(entry);
    }
    let once = json!({"executions": entries}).to_string();
    plane.fault(FaultSpec { status: 200, body: Some(once), ..on(Endpoint::Pending) }).await;
    let empty = json!({"executions": []}).to_string();
    plane
        .fault(FaultSpec { status: 200, body: Some(empty), count: Some(1_000_000), ..on(Endpoint::Pending) })
        .await;
}

/// Issue 13, part 1: a line printed after a quiet spell reaches the control
/// plane at once — before the command prints its next line, although the
/// flush interval (30 s) is far longer than the whole run — and sustained
/// output is sent in few, growing chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_after_a_quiet_spell_is_sent_at_once_and_sustained_output_is_paced() {
    let plane = ControlPlane::start();
    let extra = "[runner]\npoll_interval = 0.1\noutput_flush_interval = 30\n";
    let _runner = warmed_up(&plane, extra).await;

    let sparse = plane.queue("say", "'one\\n' 'two\\n' 'three\\n' --delay 0.7").await;
    let done = plane.wait_done(&sparse, LIMIT).await;
    assert_eq!(output(&done, false), "one\ntwo\nthree\n");
    let lines: Vec<(String, f64)> = chunks(&done)
        .iter()
        .flat_map(|c| &c.segments)
        .map(|s| (s.content.clone(), s.timestamp.expect("a line's first segment has a timestamp")))
        .collect();
    assert_eq!(chunks(&done).len(), 3, "one chunk per line: {done:#?}");
    let arrivals: Vec<f64> = common::plane::requests_to(&plane.requests().await, &sparse, "output")
        .iter()
        .map(|r| r.time)
        .collect();
    for (index, line) in lines.iter().enumerate().skip(1) {
        assert!(
            arrivals[index - 1] < line.1,
            "line {index} was received before line {} was printed: {arrivals:?} {lines:?}",
            index + 1
        );
    }

    let noisy = plane.queue("noisy", "--lines 40000 --flush").await;
    let done = plane.wait_done(&noisy, LIMIT).await;
    let expected: String = (0..40000).map(|i| format!("out {i}\n")).collect();
    assert!(output(&done, false) == expected, "stdout complete and in order");
    let stamps: Vec<f64> =
        chunks(&done).iter().flat_map(|c| &c.segments).filter_map(|s| s.timestamp).collect();
    let span =
        stamps.iter().cloned().fold(f64::MIN, f64::max) - stamps.iter().cloned().fold(f64::MAX, f64::min);
    // At most one flush per 250 ms, each one chunk per stream, plus the
    // first flush and the last one at the end, plus the chunks cut because
    // a stream reached chunk_max_bytes (64 KiB by default).
    let bytes = output(&done, false).len() + output(&done, true).len();
    let bound = 2 * ((span / 0.25).ceil() as usize + 2) + bytes / (64 * 1024) + 2;
    let sent = chunks(&done).len();
    assert!(sent <= bound, "{sent} chunks for {span:.2} s of output (bound {bound})");

    // A throttling control plane (429, Retry-After: 1 s, twice) gets fewer,
    // bigger chunks: while a chunk waits, the next ones grow instead of
    // queueing up one per line.
    plane
        .fault(FaultSpec { status: 429, retry_after: Some(1), count: Some(2), ..on(Endpoint::Output) })
        .await;
    let parts: Vec<String> = (0..20).map(|i| format!("'line {i}\\n'")).collect();
    let throttled = plane.queue("say", &format!("{} --delay 0.1", parts.join(" "))).await;
    let done = plane.wait_done(&throttled, LIMIT).await;
    let expected: String = (0..20).map(|i| format!("line {i}\n")).collect();
    assert_eq!(output(&done, false), expected);
    assert!(chunks(&done).len() <= 4, "20 lines over 2 s, throttled: {done:#?}");
}
