//! Production operation with real processes and real signals: graceful
//! shutdown, reload on SIGHUP (broken config, changed policy, new code),
//! recovery after SIGKILL, the instance lock, and systemd notifications.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::plane::{demo_config, output, status_and_code, ControlPlane, Supervisor, LIMIT};
use dcsupervisor::local_plane::wire::ExecutionStatus;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_executions_finish_then_exits_zero() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", "");
    let id = plane.queue("sleep", "2").await;
    plane.wait_status(&id, LIMIT, |s| s == ExecutionStatus::Running).await;
    assert_eq!(runner.terminate(LIMIT).await, Some(0));
    let done = plane.execution(&id).await;
    assert_eq!(status_and_code(&done), ("success", 0), "finished within the grace and delivered");
    assert_eq!(output(&done, false), "sleeping 2\ndone\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_grace_period_executions_are_cancelled_and_reported() {
    let plane = ControlPlane::start();
    let extra = "[runner]\npoll_interval = 0.1\noutput_flush_interval = 0.2\nshutdown_grace = 1\n";
    let mut runner = Supervisor::start(&plane.url, "", extra);
    let id = plane.queue("sleep", "60").await;
    plane.wait_status(&id, LIMIT, |s| s == ExecutionStatus::Running).await;
    assert_eq!(runner.terminate(LIMIT).await, Some(0));
    assert_eq!(status_and_code(&plane.execution(&id).await), ("cancelled", -15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", "");
    let id = plane.queue("sleep", "60").await;
    plane.wait_status(&id, LIMIT, |s| s == ExecutionStatus::Running).await;
    runner.signal(Signal::SIGTERM);
    runner.wait_notified("STOPPING=1", LIMIT).await;
    runner.signal(Signal::SIGINT);
    assert_eq!(runner.wait_exit(Duration::from_secs(20)).await, Some(0));
    assert!(runner.log().contains("stopping at once"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_on_reload_keeps_the_old_one() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", "");
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    std::fs::write(runner.config_path(), "[server]\nheartbeat_interval = 1\n[policy]\nmode = \"anything\"\n")
        .unwrap();
    runner.signal(Signal::SIGHUP);
    runner.wait_reload_refused(1).await;
    assert!(runner.is_running());
    // The old policy is still in force: noop runs, shell is still refused.
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    assert_eq!(
        status_and_code(&plane.wait_done(&plane.queue("shell", "").await, LIMIT).await),
        ("failed", -1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_allowlist_applies_on_reload_without_harming_running_executions() {
    let plane = ControlPlane::start();
    let runner = Supervisor::start(&plane.url, "", "");
    let long = plane.queue("sleep", "3").await;
    plane.wait_status(&long, LIMIT, |s| s == ExecutionStatus::Running).await;
    let before = plane.state().await;

    // check becomes refused, dbshell... stays refused, diffsettings stays allowed.
    runner.write_config("remove_allowed_commands = [\"check\"]", "");
    runner.signal(Signal::SIGHUP);
    runner.wait_reloaded(1).await;

    let check = plane.wait_done(&plane.queue("check", "").await, LIMIT).await;
    assert_eq!(status_and_code(&check), ("failed", -1));
    assert!(output(&check, true).contains("not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist"));
    let long = plane.wait_done(&long, LIMIT).await;
    assert_eq!(status_and_code(&long), ("success", 0), "{long:#?}\n{}", runner.log());

    // The new list was synced: the hash changed and `check` is gone.
    plane
        .wait_state(LIMIT, |state| {
            state.commands_hash != before.commands_hash && state.commands.iter().all(|c| c.name != "check")
        })
        .await;
}

fn write_hello(project: &std::path::Path, version: &str) {
    let code = format!(
        "from django.core.management.base import BaseCommand\n\n\nclass Command(BaseCommand):\n    \
         def handle(self, *args, **options):\n        self.stdout.write(\"hello {version}\")\n"
    );
    std::fs::write(project.join("demo/management/commands/hello.py"), code).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_deploy_sighup_runs_the_new_code() {
    let project = common::project_copy();
    write_hello(project.path(), "v1");
    let plane = ControlPlane::start();
    let runner = Supervisor::start_with(&plane.url, "", "", project.path().to_path_buf(), &[]);
    let first = plane.wait_done(&plane.queue("hello", "").await, LIMIT).await;
    assert_eq!(output(&first, false), "hello v1\n");

    write_hello(project.path(), "v2");
    // Without a reload the preloaded worker still has the old code.
    let stale = plane.wait_done(&plane.queue("hello", "").await, LIMIT).await;
    assert_eq!(output(&stale, false), "hello v1\n");
    runner.signal(Signal::SIGHUP);
    runner.wait_reloaded(1).await;
    let fresh = plane.wait_done(&plane.queue("hello", "").await, LIMIT).await;
    assert_eq!(output(&fresh, false), "hello v2\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touching_the_reload_file_reloads() {
    let project = common::project_copy();
    write_hello(project.path(), "v1");
    let plane = ControlPlane::start();
    let extra =
        "[runner]\npoll_interval = 0.1\noutput_flush_interval = 0.2\nreload_touch_file = \"deployed\"\n";
    let runner = Supervisor::start_with(&plane.url, "", extra, project.path().to_path_buf(), &[]);
    assert_eq!(output(&plane.wait_done(&plane.queue("hello", "").await, LIMIT).await, false), "hello v1\n");
    write_hello(project.path(), "v2");
    std::fs::write(runner.dir.path().join("deployed"), "now").unwrap();
    runner.wait_reloaded(1).await;
    assert_eq!(output(&plane.wait_done(&plane.queue("hello", "").await, LIMIT).await, false), "hello v2\n");
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if dcsupervisor::procfs::stat(child).is_some_and(|stat| stat.parent == pid) {
            children.push(child);
        }
    }
    children
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_a_restart_reports_the_interrupted_execution_and_kills_its_orphan() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", "");
    let id = plane.queue("grandchild", "").await;
    plane.wait_status(&id, LIMIT, |s| s == ExecutionStatus::Running).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let job = loop {
        let execution = plane.execution(&id).await;
        if let Some(pid) = output(&execution, false).trim().strip_prefix("grandchild ") {
            let grandchild: u32 = pid.parse().unwrap();
            break (grandchild, common::alive(grandchild));
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (grandchild, _) = job;
    // Freeze the supervisor, kill its worker, then kill it: nobody is left
    // to clean up, as after a power cut of the supervisor alone.
    runner.signal(Signal::SIGSTOP);
    for worker in children_of(runner.pid()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker as i32), Signal::SIGKILL);
    }
    runner.signal(Signal::SIGKILL);
    assert!(runner.wait_exit(Duration::from_secs(10)).await.is_none() || !runner.is_running());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(common::alive(grandchild), "the orphan survived the crash, as it would");

    runner.restart();
    let done = plane.wait_done(&id, LIMIT).await;
    assert_eq!(status_and_code(&done), ("failed", -1));
    assert!(output(&done, true).contains("the runner restarted while this command was running"), "{done:#?}");
    assert!(
        common::gone_within(grandchild, Duration::from_secs(10)).await,
        "orphan killed after the restart"
    );
    // And the runner goes on working.
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_is_refused_with_the_running_pid() {
    let plane = ControlPlane::start();
    let runner = Supervisor::start(&plane.url, "", "");
    plane.wait_state(LIMIT, |state| state.commands_hash.is_some()).await;
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_dcsupervisor"))
        .arg("--config")
        .arg(runner.config_path())
        .env_remove("DJANGOCOMMAND_API_KEY")
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("pid {}", runner.pid())) && stderr.contains("already running"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_reloading_and_stopping() {
    let socket_dir = tempfile::tempdir().unwrap();
    let socket_path = socket_dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let plane = ControlPlane::start();
    let notify = socket_path.display().to_string();
    let mut runner =
        Supervisor::start_with(&plane.url, "", "", common::demo_project(), &[("NOTIFY_SOCKET", &notify)]);
    let mut received = String::new();
    let read_until = |received: &mut String, needle: &str, runner: &Supervisor| {
        let mut buffer = [0u8; 4096];
        while !received.contains(needle) {
            let n = match socket.recv(&mut buffer) {
                Ok(n) => n,
                // A signal reached this thread (the test sends some): try again.
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => panic!("no notification: {error}; got {received:?}\n{}", runner.log()),
            };
            received.push_str(&String::from_utf8_lossy(&buffer[..n]));
            received.push('\n');
        }
    };
    read_until(&mut received, "READY=1", &runner);
    runner.signal(Signal::SIGHUP);
    read_until(&mut received, "RELOADING=1", &runner);
    assert!(received.contains("MONOTONIC_USEC="), "{received}");
    read_until(&mut received, "READY=1\nSTATUS=reloaded", &runner);
    runner.signal(Signal::SIGTERM);
    read_until(&mut received, "STOPPING=1", &runner);
    assert_eq!(runner.wait_exit(LIMIT).await, Some(0));

    // The worker never inherits the notify socket.
    let mut quiet =
        Supervisor::start_with(&plane.url, "", "", common::demo_project(), &[("NOTIFY_SOCKET", &notify)]);
    let heartbeats = plane.state().await.heartbeats;
    plane.wait_heartbeat_after(heartbeats, LIMIT).await;
    for worker in children_of(quiet.pid()) {
        let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"),
            "worker {worker} inherited NOTIFY_SOCKET"
        );
    }
    let _ = quiet.terminate(LIMIT).await;
}

/// `supervisor::serve` is the whole of `dcsupervisor run`, callable
/// in-process: its shutdown future stops it as SIGTERM would, letting the
/// running execution finish and deliver first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_in_process_until_its_shutdown_future_resolves() {
    let plane = ControlPlane::start();
    let dir = tempfile::tempdir().unwrap();
    let db = common::TestDb::new();
    let config = dir.path().join("dc.toml");
    common::write_file(&config, &demo_config(&plane.url, &common::demo_project(), &db, "", ""));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let serving = tokio::spawn(async move { dcsupervisor::supervisor::serve(&config, shutdown).await });
    let id = plane.queue("sleep", "1").await;
    plane.wait_status(&id, LIMIT, |s| s == ExecutionStatus::Running).await;
    stop.send(()).unwrap();
    let served = tokio::time::timeout(LIMIT, serving).await.expect("serve returned").unwrap();
    assert!(served.is_ok(), "{served:?}");
    let done = plane.execution(&id).await;
    assert_eq!(status_and_code(&done), ("success", 0), "finished and delivered before serve returned");
    assert_eq!(output(&done, false), "sleeping 1\ndone\n");
}

/// A service manager that does not read its notifications (hung, or slow)
/// fills the datagram queue of NOTIFY_SOCKET (10 by default); the runner
/// must go on running jobs, reloading and stopping all the same. The
/// harness binds the socket and reads it only when a test asks: this one
/// never does, and sends far more than ten notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_manager_that_does_not_read_its_notifications_never_stalls_the_runner() {
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", "");
    plane.wait_heartbeat_after(0, LIMIT).await;
    // Each reload says RELOADING=1, then READY=1 with its status.
    for round in 0..8 {
        runner.signal(Signal::SIGHUP);
        let id = plane.queue("noop", "").await;
        let done = tokio::time::timeout(LIMIT, plane.wait_done(&id, LIMIT * 2)).await;
        let done = done.unwrap_or_else(|_| panic!("round {round}: the job did not run\n{}", runner.log()));
        assert_eq!(status_and_code(&done).0, "success");
    }
    assert_eq!(runner.terminate(LIMIT).await, Some(0), "{}", runner.log());
    assert!(runner.log().matches("reload applied").count() >= 5, "{}", runner.log());
}

/// A copy of the demo project whose settings take `seconds` to import: a
/// worker that takes that long to start.
fn slow_to_start(seconds: u32) -> tempfile::TempDir {
    let project = common::project_copy();
    let settings = project.path().join("demo_project/settings.py");
    let code = std::fs::read_to_string(&settings).unwrap();
    std::fs::write(&settings, format!("import time\ntime.sleep({seconds})\n{code}")).unwrap();
    project
}

/// A SIGHUP while the worker starts (Django's set-up can take seconds;
/// supervisord does not wait for readiness before signalling) neither kills
/// the runner nor is lost: the reload is applied once it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_during_start_up_is_applied_once_the_runner_runs() {
    let project = slow_to_start(2);
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start_with(&plane.url, "", "", project.path().to_path_buf(), &[]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    runner.signal(Signal::SIGHUP);
    runner.wait_reloaded(1).await;
    assert!(runner.is_running(), "{}", runner.log());
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    assert_eq!(runner.terminate(LIMIT).await, Some(0), "{}", runner.log());
}

/// A stop asked for while the worker starts ends the process at once: no
/// execution was taken, nothing is left to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_start_up_stops_at_once() {
    let project = slow_to_start(30);
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start_with(&plane.url, "", "", project.path().to_path_buf(), &[]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let workers = children_of(runner.pid());
    assert_eq!(runner.terminate(Duration::from_secs(10)).await, Some(0), "{}", runner.log());
    assert!(runner.log().contains("stopped during start-up"), "{}", runner.log());
    for worker in workers {
        assert!(common::gone_within(worker, Duration::from_secs(10)).await, "worker {worker} outlived it");
    }
}
