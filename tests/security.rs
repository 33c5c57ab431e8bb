//! The runner's security model, tried as an attacker (issue 11): a hostile
//! control plane (through `dccontrol`), a hostile worker (a stand-in speaking
//! the IPC protocol), and an operator with bad values. docs/security.md
//! names the test that shows each promise.

mod common;

use std::time::Duration;

use common::plane::{status_and_code, ControlPlane, Supervisor, LIMIT};
use nix::sys::signal::Signal;

/// Waits until `needle` occurs `times` times in the supervisor's log.
async fn wait_for_log_count(runner: &Supervisor, needle: &str, times: usize) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while runner.log().matches(needle).count() < times {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {times}× {needle:?} in the log:\n{}",
            runner.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_numbers_are_refused_naming_the_field_at_start_and_on_reload() {
    let plane = ControlPlane::start();
    // At start-up: a zero flush interval used to make every execution panic.
    let mut runner = Supervisor::start(&plane.url, "", "[runner]\noutput_flush_interval = 0\n");
    assert_eq!(runner.wait_exit(LIMIT).await, Some(1), "{}", runner.log());
    assert!(runner.log().contains("invalid value for `runner.output_flush_interval`: 0"), "{}", runner.log());

    // On reload: a negative poll interval used to panic the signal task and
    // exit 0; now the reload is refused and the old configuration runs on.
    runner.write_config("", "");
    runner.restart();
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    let bad = [
        ("[runner]\npoll_interval = -1\n", "`runner.poll_interval`: -1"),
        ("[runner]\npoll_interval = nan\n", "`runner.poll_interval`: NaN"),
        ("[worker]\ncancel_grace = 9223372036854775807\n", "`worker.cancel_grace`"),
        ("[limits]\nmemory_mb = 9223372036854775807\n", "`limits.memory_mb`"),
        (
            "[[policy.concurrency]]\ncommand = \"noop\"\nmax_running = 0\n",
            "`policy.concurrency.max_running`: 0",
        ),
    ];
    for (round, (extra, field)) in bad.iter().enumerate() {
        runner.write_config("", extra);
        runner.signal(Signal::SIGHUP);
        wait_for_log_count(&runner, "reload refused", round + 1).await;
        assert!(runner.log().contains(field), "{field} not named:\n{}", runner.log());
        assert!(runner.is_running());
    }
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    assert!(!runner.log().contains("panicked"), "{}", runner.log());
}
