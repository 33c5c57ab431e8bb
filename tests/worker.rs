//! The preloaded worker end to end: real Python, real Django (the demo
//! project), real forks, real pipes. Each example command's exit status and
//! exact output bytes are checked, most against `python manage.py` itself.

mod common;

use std::time::Duration;

use common::*;
use dcsupervisor::ipc::{ExitStatus, GivenArg, ParseOutcome};
use dcsupervisor::worker::{Isolation, JobEnd, Output, StartError, Stop, Worker};
use tokio::io::AsyncBufReadExt;

fn code(code: i32) -> JobEnd {
    JobEnd::Exited(ExitStatus::Code { code })
}

async fn start(db: &TestDb) -> Worker {
    Worker::start(options(db)).await.expect("worker starts")
}

#[tokio::test]
async fn hello_reports_versions_and_discovery_lists_every_command() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let info = worker.info().expect("worker is up");
    assert!(info.django_version.chars().next().unwrap().is_ascii_digit(), "{info:?}");
    assert!(info.python_version.starts_with('3'), "{info:?}");

    let commands = worker.discover().await.expect("discovery");
    let noop = commands.iter().find(|c| c.name == "noop").expect("noop discovered");
    assert_eq!(noop.app_label, "demo");
    assert!(noop.help_text.starts_with("usage: manage.py noop"), "{}", noop.help_text);
    let migrate = commands.iter().find(|c| c.name == "migrate").expect("migrate discovered");
    assert_eq!(migrate.app_label, "django.core");
    let auth = commands.iter().find(|c| c.name == "changepassword").expect("changepassword");
    assert_eq!(auth.app_label, "django.contrib.auth");
}

#[tokio::test]
async fn help_text_equals_what_manage_py_help_prints() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let commands = worker.discover().await.unwrap();
    for name in ["noisy", "sleep", "migrate"] {
        let ours = &commands.iter().find(|c| c.name == name).unwrap().help_text;
        let reference = run_manage_py(&db, name, &["--help"]);
        assert_eq!(ours.as_bytes(), reference.stdout.as_slice(), "help of {name}");
    }
}

#[tokio::test]
async fn output_and_exit_codes_match_manage_py_exactly() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let cases: &[(&str, &[&str])] = &[
        ("noop", &[]),
        ("noisy", &["--lines", "5"]),
        ("fail", &[]),
        ("fail", &["--code", "3"]),
        ("exit_with", &["7"]),
        ("hard_exit", &["4"]),
        ("bad_utf8", &[]),
        ("read_stdin", &[]),
        ("sleep", &[]),               // argparse error: missing argument, exit 2
        ("noisy", &["--lines", "x"]), // argparse error: invalid int
        ("no_such_command", &[]),     // Django's "Unknown command"
        ("noop", &["--settings", "demo_project.settings"]),
    ];
    for (command, args) in cases {
        let ours = run(&worker, command, args).await;
        let reference = run_manage_py(&db, command, args);
        let label = format!("{command} {args:?}");
        assert_eq!(ours.stdout_text(), String::from_utf8_lossy(&reference.stdout), "stdout of {label}");
        assert_eq!(ours.stdout, reference.stdout, "stdout bytes of {label}");
        assert_eq!(ours.stderr_text(), String::from_utf8_lossy(&reference.stderr), "stderr of {label}");
        assert_eq!(ours.end, code(reference.status.code().unwrap()), "exit of {label}");
    }
}

#[tokio::test]
async fn exact_bytes_of_the_demo_commands() {
    let db = TestDb::new();
    let worker = start(&db).await;

    let noisy = run(&worker, "noisy", &["--lines", "3"]).await;
    assert_eq!(noisy.stdout, b"out 0\nout 1\nout 2\n");
    assert_eq!(noisy.stderr, b"err 0\nerr 1\nerr 2\n");
    assert_eq!(noisy.end, code(0));

    let bad = run(&worker, "bad_utf8", &[]).await;
    assert_eq!(
        bad.stdout,
        "héllo wörld ✓\n".bytes().chain(*b"bad \xff\xfe bytes\nafter\n").collect::<Vec<u8>>()
    );

    let fail = run(&worker, "fail", &["--code", "3"]).await;
    assert_eq!((fail.end.clone(), fail.stderr_text()), (code(3), "CommandError: demo failure\n".to_string()));

    let boom = run(&worker, "boom", &[]).await;
    assert_eq!(boom.end, code(1));
    assert!(boom.stderr_text().starts_with("Traceback (most recent call last):\n"), "{}", boom.stderr_text());
    assert!(boom.stderr_text().ends_with("ValueError: kaboom\n"), "{}", boom.stderr_text());

    // stdin is /dev/null: a prompt fails at once instead of hanging.
    let prompt = run(&worker, "prompt", &[]).await;
    assert_eq!(prompt.end, code(1));
    assert!(prompt.stderr_text().contains("EOFError"), "{}", prompt.stderr_text());
    assert_eq!(run(&worker, "read_stdin", &[]).await.stdout, b"stdin: ''\n");
}

#[tokio::test]
async fn the_worker_survives_every_kind_of_crash() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let pid = worker.info().unwrap().pid;

    let segfault = run(&worker, "segfault", &[]).await;
    assert_eq!(segfault.end, JobEnd::Exited(ExitStatus::Signal { signal: 11 }));
    assert_eq!(segfault.stdout, b"about to crash\n");
    assert_eq!(run(&worker, "hard_exit", &["9"]).await.end, code(9));
    assert_eq!(run(&worker, "boom", &[]).await.end, code(1));

    // A command whose reader went away: its writes fail, not the worker.
    let args = vec!["--lines".to_string(), "100000".to_string()];
    let mut job = worker.spawn_job("noisy", &args, Output::Capture).await.unwrap();
    drop(job.stdout.take());
    let stderr = tokio::spawn(read_all(job.stderr.take()));
    assert_ne!(job.wait().await, code(0), "writing to a closed stdout fails the command");
    stderr.await.unwrap();

    assert_eq!(run(&worker, "noop", &[]).await.end, code(0));
    assert_eq!(worker.info().unwrap().pid, pid, "still the same worker");
}

#[tokio::test]
async fn the_database_works_after_fork() {
    let db = TestDb::new();
    let worker = start(&db).await;
    assert_eq!(run(&worker, "migrate", &["--verbosity", "0"]).await.end, code(0));
    assert_eq!(run(&worker, "db_query", &[]).await.stdout, b"notes: 1\n");
    assert_eq!(run(&worker, "db_query", &["--text", "again"]).await.stdout, b"notes: 2\n");
}

/// Reads the `grandchild <pid>` line the demo command prints.
async fn grandchild_pid(job: &mut dcsupervisor::worker::Job) -> u32 {
    let stdout = job.stdout.as_mut().unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(stdout).read_line(&mut line).await.unwrap();
    line.trim().strip_prefix("grandchild ").expect("grandchild line").parse().unwrap()
}

#[tokio::test]
async fn cancel_kills_the_whole_process_group() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let mut job = worker.spawn_job("grandchild", &[], Output::Capture).await.unwrap();
    let grandchild = grandchild_pid(&mut job).await;
    assert!(alive(grandchild) && alive(job.pid));

    let end = job.stop(Stop::Graceful(Duration::from_secs(5))).await;
    assert_eq!(end, JobEnd::Exited(ExitStatus::Signal { signal: 15 }));
    assert!(gone_within(grandchild, Duration::from_secs(10)).await, "grandchild {grandchild} survived");
}

#[tokio::test]
async fn forced_cancel_and_timeout() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let mut job = worker.spawn_job("spin", &[], Output::Capture).await.unwrap();
    assert_eq!(job.stop(Stop::Kill).await, JobEnd::Exited(ExitStatus::Signal { signal: 9 }));

    let mut job = worker.spawn_job("grandchild", &[], Output::Capture).await.unwrap();
    let grandchild = grandchild_pid(&mut job).await;
    let (end, timed_out) =
        job.wait_or_stop_after(Duration::from_millis(200), Stop::Graceful(Duration::from_secs(5))).await;
    assert!(timed_out);
    assert_eq!(end, JobEnd::Exited(ExitStatus::Signal { signal: 15 }));
    assert!(gone_within(grandchild, Duration::from_secs(10)).await);

    // A command that ignores nothing but never ends on its own: SIGTERM ends it.
    let mut job = worker.spawn_job("sleep", &["60".to_string()], Output::Capture).await.unwrap();
    let (end, timed_out) =
        job.wait_or_stop_after(Duration::from_millis(100), Stop::Graceful(Duration::from_secs(5))).await;
    assert!(timed_out);
    assert_eq!(end, JobEnd::Exited(ExitStatus::Signal { signal: 15 }));
}

#[tokio::test]
async fn eight_jobs_run_at_once() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let mut jobs = Vec::new();
    for _ in 0..8 {
        jobs.push(worker.spawn_job("sleep", &["60".to_string()], Output::Capture).await.unwrap());
    }
    let pids: std::collections::BTreeSet<u32> = jobs.iter().map(|j| j.pid).collect();
    assert_eq!(pids.len(), 8);
    assert!(pids.iter().all(|pid| alive(*pid)), "all eight alive at the same time");
    for job in &mut jobs {
        assert_eq!(job.stop(Stop::Kill).await, JobEnd::Exited(ExitStatus::Signal { signal: 9 }));
    }
    assert_eq!(run(&worker, "noop", &[]).await.end, code(0));
}

#[tokio::test]
async fn a_dead_worker_fails_its_jobs_and_is_replaced() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let old = worker.info().unwrap().pid;
    let mut job = worker.spawn_job("grandchild", &[], Output::Capture).await.unwrap();
    let grandchild = grandchild_pid(&mut job).await;

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    match job.wait().await {
        JobEnd::Lost(reason) => assert!(reason.contains("exited"), "{reason}"),
        other => panic!("expected a lost job, got {other:?}"),
    }
    assert!(gone_within(job.pid, Duration::from_secs(10)).await, "orphaned job killed");
    assert!(gone_within(grandchild, Duration::from_secs(10)).await, "its grandchild too");

    // The next job waits for the replacement worker.
    assert_eq!(run(&worker, "noop", &[]).await.end, code(0));
    assert_ne!(worker.info().unwrap().pid, old);
}

#[tokio::test]
async fn the_worker_exits_with_its_jobs_when_the_supervisor_lets_go() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let pid = worker.info().unwrap().pid;
    let job = worker.spawn_job("sleep", &["60".to_string()], Output::Capture).await.unwrap();
    worker.shutdown().await;
    drop(worker);
    assert!(gone_within(pid, Duration::from_secs(10)).await, "worker {pid} outlived its socket");
    assert!(gone_within(job.pid, Duration::from_secs(10)).await, "job outlived the worker");
}

#[tokio::test]
async fn recycling_moves_new_jobs_to_a_fresh_worker() {
    let db = TestDb::new();
    let mut opts = options(&db);
    opts.recycle_after_jobs = Some(2);
    let worker = Worker::start(opts).await.unwrap();
    let first = worker.info().unwrap().pid;
    let mut long = worker.spawn_job("sleep", &["1".to_string()], Output::Capture).await.unwrap();
    assert_eq!(run(&worker, "noop", &[]).await.end, code(0));
    // The second job triggered the recycle; the next one goes to the new worker.
    assert_eq!(run(&worker, "noop", &[]).await.end, code(0));
    assert_ne!(worker.info().unwrap().pid, first);
    // The job on the retired worker finishes normally.
    assert_eq!(long.wait().await, code(0));
    assert!(gone_within(first, Duration::from_secs(10)).await, "retired worker exits after its jobs");
}

#[tokio::test]
async fn spawn_isolation_runs_manage_py_with_the_same_results() {
    let db = TestDb::new();
    let mut opts = options(&db);
    opts.isolation = Isolation::Spawn;
    let worker = Worker::start(opts).await.unwrap();
    let noisy = run(&worker, "noisy", &["--lines", "2"]).await;
    assert_eq!(
        (noisy.stdout.as_slice(), noisy.stderr.as_slice()),
        (&b"out 0\nout 1\n"[..], &b"err 0\nerr 1\n"[..])
    );
    assert_eq!(run(&worker, "fail", &["--code", "5"]).await.end, code(5));

    let mut job = worker.spawn_job("grandchild", &[], Output::Capture).await.unwrap();
    let grandchild = grandchild_pid(&mut job).await;
    assert_eq!(
        job.stop(Stop::Graceful(Duration::from_secs(5))).await,
        JobEnd::Exited(ExitStatus::Signal { signal: 15 })
    );
    assert!(gone_within(grandchild, Duration::from_secs(10)).await);
}

#[tokio::test]
async fn spawn_can_be_chosen_per_command() {
    let db = TestDb::new();
    let mut opts = options(&db);
    opts.spawn_commands.insert("noop".into());
    let worker = Worker::start(opts).await.unwrap();
    let worker_pid = worker.info().unwrap().pid;
    let job = worker.spawn_job("noop", &[], Output::Capture).await.unwrap();
    let parent = dcsupervisor::procfs::stat(job.pid).map(|stat| stat.parent);
    assert_eq!(finish(job).await.end, code(0));
    // A spawned job is our child, not the worker's (when we caught it alive).
    if let Some(ppid) = parent {
        assert_ne!(ppid, worker_pid);
    }
}

#[tokio::test]
async fn discarded_output_still_reports_the_exit() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let job = worker.spawn_job("exit_with", &["3".to_string()], Output::Discard).await.unwrap();
    assert!(job.stdout.is_none() && job.stderr.is_none());
    assert_eq!(finish(job).await.end, code(3));
}

#[tokio::test]
async fn a_broken_settings_module_is_a_clear_startup_error() {
    let db = TestDb::new();
    let mut opts = options(&db);
    opts.settings_module = "demo_project.settings_broken".into();
    match Worker::start(opts).await {
        Err(StartError::DjangoSetup { traceback }) => {
            assert!(traceback.contains("Traceback"), "{traceback}");
            assert!(traceback.contains("does_not_exist_module"), "{traceback}");
        }
        Err(other) => panic!("expected a Django set-up error, got {other}"),
        Ok(_) => panic!("the broken settings started"),
    }
}

#[tokio::test]
async fn a_missing_interpreter_is_a_clear_startup_error() {
    let db = TestDb::new();
    let mut opts = options(&db);
    opts.python = "/nonexistent/python3".into();
    let err = Worker::start(opts).await.err().expect("must fail");
    assert!(err.to_string().contains("/nonexistent/python3"), "{err}");
}

#[tokio::test]
async fn garbage_from_the_worker_is_a_protocol_error_not_a_panic() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("oversized", r"printf '\377\377\377\177' >&3; sleep 5"),
        ("undecodable", r"printf '\004\000\000\000\011\000\000\000' >&3; sleep 5"),
        ("silent_exit", "echo 'no hello from me' >&2; exit 3"),
    ];
    for (name, script) in cases {
        let fake = dir.path().join(name);
        write_file(&fake, &format!("#!/bin/sh\ncat >/dev/null\n{script}\n"));
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut opts = options(&db);
        opts.python = fake;
        opts.startup_timeout = Duration::from_secs(20);
        let err = Worker::start(opts).await.err().expect("a fake worker must be refused");
        let text = err.to_string();
        match name {
            "oversized" => assert!(text.contains("limit"), "{text}"),
            "undecodable" => assert!(text.contains("protocol error"), "{text}"),
            _ => assert!(text.contains("no hello from me") && text.contains("exit status: 3"), "{text}"),
        }
    }
}

#[tokio::test]
async fn parse_args_resolves_abbreviations_as_the_commands_parser_does() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    // Several requests in flight at once: each answer reaches its caller.
    let (migrate, lines, bad_lines) =
        (args(&["--datab=default", "--pl"]), args(&["--lines", "5"]), args(&["--lines", "x"]));
    let (abbreviated, plain, bad) = tokio::join!(
        worker.parse_args("migrate", &migrate),
        worker.parse_args("noisy", &lines),
        worker.parse_args("noisy", &bad_lines),
    );
    let given = |dest: &str, flags: &[&str], values: &[&str]| GivenArg {
        dest: dest.into(),
        flags: args(flags),
        values: args(values),
    };
    assert_eq!(
        abbreviated.unwrap(),
        ParseOutcome::Parsed {
            given: vec![given("database", &["--database"], &["default"]), given("plan", &["--plan"], &[])]
        }
    );
    assert_eq!(plain.unwrap(), ParseOutcome::Parsed { given: vec![given("lines", &["--lines"], &["5"])] });
    assert_eq!(
        bad.unwrap(),
        ParseOutcome::Refused { message: "Error: argument --lines: invalid int value: 'x'".into() }
    );
}

#[tokio::test]
async fn a_job_asking_for_other_settings_never_runs_on_the_workers() {
    let db = TestDb::new();
    let worker = start(&db).await;
    // Another settings module: the job runs as a fresh manage.py on the
    // settings it asked for (here a module whose import fails), never on
    // the worker's (where `exit_with 0` would have succeeded).
    let other = run(&worker, "exit_with", &["0", "--settings=demo_project.settings_broken"]).await;
    assert_eq!(other.end, code(1), "{}", other.stderr_text());
    assert!(
        other.stderr_text().contains("No module named 'does_not_exist_module'"),
        "{}",
        other.stderr_text()
    );
    assert_eq!(other.stdout_text(), "", "the command never ran on the worker's settings");
    // Abbreviated, or --pythonpath: a fresh manage.py too, which then does
    // exactly what manage.py does with them.
    for asked in ["--sett=demo_project.other", "--pythonpath=/tmp"] {
        let done = run(&worker, "exit_with", &["0", asked]).await;
        assert_eq!(done.end, code(0), "{asked}: {}", done.stderr_text());
    }
    // The worker's own settings module is fine.
    let same = run(&worker, "exit_with", &["0", "--settings=demo_project.settings"]).await;
    assert_eq!(same.end, code(0), "{}", same.stderr_text());
}

#[tokio::test]
async fn a_job_sees_the_whole_heap_though_the_worker_froze_it() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let code_line = "import gc; from django.apps import AppConfig; \
                     print(sum(isinstance(o, AppConfig) for o in gc.get_objects()))";
    let done = run(&worker, "shell", &["-c", code_line]).await;
    // contenttypes, auth, sessions, demo: every AppConfig, as in a fresh interpreter.
    assert_eq!(done.stdout_text().trim_end().lines().last(), Some("4"), "{}", done.stderr_text());
}

/// The live children of `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            fields.len() > 1 && fields[0] != "Z" && fields[1] == pid.to_string()
        })
        .collect()
}

/// The worker's spare: the one child it forked ahead of time for the next job.
async fn spare_of(worker: &Worker) -> u32 {
    let pid = worker.info().expect("worker is up").pid;
    for _ in 0..3000 {
        if let [spare] = children_of(pid)[..] {
            return spare;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("worker {pid} has no single spare child: {:?}", children_of(pid));
}

#[tokio::test]
async fn a_settings_change_discards_the_spare_and_the_next_job_sees_the_new_settings() {
    let (old_db, new_db) = (TestDb::new(), TestDb::new());
    let worker = start(&old_db).await;
    let before = run(&worker, "diffsettings", &[]).await;
    assert_eq!(before.end, code(0));
    assert!(before.stdout_text().contains(&old_db.path().display().to_string()), "{}", before.stdout_text());

    // What a reload does: new options, so a fresh worker with its own spare.
    let spare = spare_of(&worker).await;
    worker.reconfigure(options(&new_db));
    assert!(gone_within(spare, Duration::from_secs(20)).await, "the old spare {spare} was not discarded");
    let after = run(&worker, "diffsettings", &[]).await;
    assert_eq!(after.end, code(0));
    assert!(after.stdout_text().contains(&new_db.path().display().to_string()), "{}", after.stdout_text());
    assert!(!after.stdout_text().contains(&old_db.path().display().to_string()), "{}", after.stdout_text());
}

#[tokio::test]
async fn recycling_discards_the_spare_and_jobs_start_on_the_new_workers_spare() {
    let db = TestDb::new();
    let worker = start(&db).await;
    let old_worker = worker.info().unwrap().pid;
    let old_spare = spare_of(&worker).await;
    worker.recycle();
    assert!(
        gone_within(old_spare, Duration::from_secs(20)).await,
        "the old spare {old_spare} outlived its worker"
    );
    assert!(gone_within(old_worker, Duration::from_secs(20)).await, "retired worker exits");
    let _ = worker.discover().await.expect("the new worker is up");
    let new_spare = spare_of(&worker).await;
    let job = worker.spawn_job("noop", &[], Output::Capture).await.unwrap();
    assert_eq!(job.pid, new_spare, "the job did not start on the spare");
    assert_eq!(finish(job).await.end, code(0));
}

#[tokio::test]
async fn without_prefork_each_job_is_forked_when_it_comes() {
    let db = TestDb::new();
    let mut opts = options(&db);
    opts.prefork = false;
    let worker = Worker::start(opts).await.unwrap();
    let pid = worker.info().unwrap().pid;
    assert_eq!(run(&worker, "noisy", &["--lines", "1"]).await.stdout_text(), "out 0\n");
    assert_eq!(run(&worker, "noop", &[]).await.end, code(0));
    // Once the jobs are reaped the worker has no child: nothing waits ahead of time.
    for _ in 0..3000 {
        if children_of(pid).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("worker {pid} keeps children without prefork: {:?}", children_of(pid));
}

/// A job on its way to a worker that a reload retires meanwhile (its fork
/// hazard check, then its `Run`, land after the `Shutdown`, or after the
/// idle worker already exited) starts on the next worker: it is never
/// refused with "worker is shutting down" nor failed as "the worker is gone".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_sent_while_the_worker_is_retired_start_on_its_successor() {
    let db = TestDb::new();
    let worker = std::sync::Arc::new(start(&db).await);
    // A lone job meets an idle worker that exits at once; many meet one busy
    // with their siblings.
    for (round, jobs) in [1, 2, 4, 12, 1, 2, 4, 12].into_iter().enumerate() {
        let jobs: Vec<_> = (0..jobs)
            .map(|_| {
                let worker = worker.clone();
                tokio::spawn(async move { worker.spawn_job("noop", &[], Output::Capture).await })
            })
            .collect();
        // Let some reach the old worker, then retire it under the others.
        tokio::task::yield_now().await;
        worker.recycle();
        for job in jobs {
            let job = job.await.unwrap().unwrap_or_else(|e| panic!("round {round}: a job was refused: {e}"));
            assert_eq!(finish(job).await.end, code(0));
        }
    }
}
