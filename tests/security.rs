//! The runner's security model, tried as an attacker (issue 11): a hostile
//! control plane (through `dccontrol`), a hostile worker (a stand-in speaking
//! the IPC protocol), and an operator with bad values. docs/security.md
//! names the test that shows each promise.

mod common;

use std::time::Duration;

use common::plane::{output, status_and_code, ControlPlane, Supervisor, KEY, LIMIT};
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
        runner.wait_reload_refused(round + 1).await;
        assert!(runner.log().contains(field), "{field} not named:\n{}", runner.log());
        assert!(runner.is_running());
    }
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    assert!(!runner.log().contains("panicked"), "{}", runner.log());
}

/// A private copy of the demo project, with `settings` appended to its settings.py.
fn project_with_settings(settings: &str) -> tempfile::TempDir {
    let copy = common::project_copy();
    let path = copy.path().join("demo_project/settings.py");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(settings);
    std::fs::write(path, text).unwrap();
    copy
}

/// A database password with a quote of each kind, a backslash, non-ASCII
/// and a space: every escaping a command may apply changes it.
const PASSWORD_SETTING: &str = r#"DATABASES["default"]["PASSWORD"] = "pa'ss\\wo\"rd-é 4242/zz""#;
const PASSWORD_CORE: &str = "4242";

/// The shell, allowed for the probes below (never by default).
const SHELL_ALLOWED: &str = "mode = \"blocklist\"\nremove_disallowed_commands = [\"shell\"]\n";

/// Runs `python` through `manage.py shell -c` on the runner; its stdout.
async fn shell(plane: &ControlPlane, python: &str) -> String {
    let args = shlex::try_quote(python).unwrap().to_string();
    let execution = plane.wait_done(&plane.queue("shell", &format!("-v 0 -c {args}")).await, LIMIT).await;
    assert_eq!(status_and_code(&execution), ("success", 0), "{execution:#?}");
    output(&execution, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_never_leaves_the_host_nor_reaches_a_job_environment() {
    let plane = ControlPlane::start();
    // The settings line the README recommends: settings.py needs the key.
    let project = project_with_settings("\nDJANGOCOMMAND_API_KEY = os.environ[\"DJANGOCOMMAND_API_KEY\"]\n");
    let env = [("DJANGOCOMMAND_API_KEY", KEY)];
    let runner = Supervisor::start_with(&plane.url, SHELL_ALLOWED, "", project.path().to_path_buf(), &env);

    // Masked although [redaction] does not name it.
    let diff = plane.wait_done(&plane.queue("diffsettings", "").await, LIMIT).await;
    assert_eq!(status_and_code(&diff).0, "success", "{diff:#?}");
    let out = output(&diff, false);
    assert!(out.contains("DJANGOCOMMAND_API_KEY = '[REDACTED]'"), "{out}");
    assert!(!out.contains(KEY), "{out}");

    let probe = "import os\n\
        mine = open('/proc/self/environ', 'rb').read()\n\
        worker = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n\
        print('os.environ:', 'DJANGOCOMMAND_API_KEY' in os.environ)\n\
        print('/proc/self/environ:', b'DJANGOCOMMAND_API_KEY' in mine)\n\
        print('/proc/worker/environ:', b'DJANGOCOMMAND_API_KEY' in worker)\n";
    assert_eq!(
        shell(&plane, probe).await,
        "os.environ: False\n/proc/self/environ: False\n/proc/worker/environ: False\n"
    );
    assert!(!runner.log().contains(KEY), "{}", runner.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_masked_in_their_escaped_and_encoded_forms() {
    let plane = ControlPlane::start();
    let project = project_with_settings(&format!("\n{PASSWORD_SETTING}\n"));
    let redaction = "[redaction]\nfrom_django_settings = [\"DATABASES.*.PASSWORD\"]\n";
    let _runner =
        Supervisor::start_with(&plane.url, SHELL_ALLOWED, redaction, project.path().to_path_buf(), &[]);

    // diffsettings prints repr(): the quote and the backslash come out escaped.
    let diff = plane.wait_done(&plane.queue("diffsettings", "").await, LIMIT).await;
    let out = output(&diff, false);
    assert!(out.contains("'PASSWORD': '[REDACTED]'"), "{out}");
    assert!(!out.contains(PASSWORD_CORE), "{out}");

    let probe = "import base64, json, urllib.parse\n\
        from django.conf import settings\n\
        p = settings.DATABASES['default']['PASSWORD']\n\
        print(repr(p), json.dumps(p), json.dumps(p, ensure_ascii=False))\n\
        print('postgres://u:' + urllib.parse.quote(p, safe='') + '@db/x', urllib.parse.quote(p), urllib.parse.quote_plus(p))\n\
        for prefix in ('', 'a', 'ab'):\n    print(base64.b64encode((prefix + 'user:' + p + ':x').encode()).decode())\n";
    let out = shell(&plane, probe).await;
    assert!(!out.contains(PASSWORD_CORE), "{out}");
    assert_eq!(out.matches("[REDACTED]").count(), 9, "{out}");
}

/// A stand-in for the worker that speaks the IPC protocol (with the codec of
/// python/djangocommand/_worker.py) and answers every `Run` with the pid
/// `STANDIN_JOB_PID` names: "supervisor" (its parent) or "itself".
fn hostile_worker(dir: &std::path::Path) -> std::path::PathBuf {
    const SCRIPT: &str = r#"
import os, socket, sys
sys.stdin.buffer.read()
sys.path.insert(0, os.environ["STANDIN_CODEC_DIR"])
import _worker as w
sock = socket.socket(fileno=int(os.environ["DJANGOCOMMAND_WORKER_FD"]))
hello = {"protocol": w.PROTOCOL_VERSION, "pid": os.getpid(), "python_version": "3", "django_version": "5"}
w.send_frame(sock, "Event", {"Hello": hello})
frames = w.FrameDecoder()
while data := sock.recv(65536):
    for payload in frames.feed(data):
        request = w.decode("Request", payload)
        if request == "Discover":
            noop = {"name": "noop", "app_label": "demo", "help_text": ""}
            w.send_frame(sock, "Event", {"Commands": {"commands": [noop]}})
        elif "InspectFork" in request:
            inspected = {"request": request["InspectFork"]["request"], "hazards": []}
            w.send_frame(sock, "Event", {"ForkHazards": inspected})
        elif "Run" in request:
            pid = {"supervisor": os.getppid(), "itself": os.getpid()}[os.environ["STANDIN_JOB_PID"]]
            w.send_frame(sock, "Event", {"JobStarted": {"job": request["Run"]["job"], "pid": pid}})
"#;
    let path = dir.join("hostile-worker");
    std::fs::write(&path, format!("#!{}{SCRIPT}", common::python().display())).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reporting_a_pid_that_is_not_its_child_is_restarted_not_trusted() {
    let plane = ControlPlane::start();
    let dir = tempfile::tempdir().unwrap();
    let worker = hostile_worker(dir.path());
    for claim in ["supervisor", "itself"] {
        let codec = common::repo_root().join("python/djangocommand");
        let env = [
            ("DCSUPERVISOR_DJANGO__PYTHON", worker.to_str().unwrap()),
            ("STANDIN_CODEC_DIR", codec.to_str().unwrap()),
            ("STANDIN_JOB_PID", claim),
        ];
        let mut runner = Supervisor::start_with(&plane.url, "", "", common::demo_project(), &env);
        runner.wait_for_log("worker ready", LIMIT).await;
        let failed = plane.wait_done(&plane.queue("noop", "").await, LIMIT).await;
        assert_eq!(status_and_code(&failed), ("failed", -1), "{failed:#?}");
        let stderr = output(&failed, true);
        assert!(stderr.contains("protocol violation by worker"), "{claim}: {stderr}");
        // The worker was killed and a fresh one started; the supervisor lives on.
        wait_for_log_count(&runner, "worker ready", 2).await;
        assert!(runner.is_running(), "{claim}: {}", runner.log());
        assert_eq!(runner.terminate(LIMIT).await, Some(0), "{}", runner.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_logs_latin_1_keeps_its_log_and_keeps_working() {
    let plane = ControlPlane::start();
    let project = project_with_settings(
        "\nimport sys\nsys.stdout.buffer.write(b'caf\\xe9 au lait\\n')\nsys.stdout.flush()\n\
         print('after the Latin-1 line', flush=True)\n",
    );
    let runner = Supervisor::start_with(&plane.url, "", "", project.path().to_path_buf(), &[]);
    runner.wait_for_log("after the Latin-1 line", LIMIT).await;
    assert!(runner.log().contains("caf\u{fffd} au lait"), "{}", runner.log());
    let noop = plane.wait_done(&plane.queue("noop", "").await, LIMIT).await;
    assert_eq!(status_and_code(&noop), ("success", 0), "{noop:#?}");
}

/// Queues `command args` and waits for it to be refused: its stderr.
async fn refused(plane: &ControlPlane, command: &str, args: &str) -> String {
    let execution = plane.wait_done(&plane.queue(command, args).await, LIMIT).await;
    assert_eq!(status_and_code(&execution), ("failed", -1), "{execution:#?}");
    assert_eq!(output(&execution, false), "", "a refused command never runs: {execution:#?}");
    output(&execution, true)
}

/// A directory holding a settings module that leaves a marker when imported.
fn evil_settings(dir: &std::path::Path) -> std::path::PathBuf {
    let marker = dir.join("imported");
    let module = format!(
        "open({:?}, 'w').write('ran')\nfrom demo_project.settings import *\n",
        marker.display().to_string()
    );
    std::fs::write(dir.join("evil_settings.py"), module).unwrap();
    marker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_that_load_code_are_refused_unless_allowed() {
    let plane = ControlPlane::start();
    let evil = tempfile::tempdir().unwrap();
    let marker = evil_settings(evil.path());
    let dir = evil.path().display();
    let mut runner = Supervisor::start(&plane.url, "", "");
    let attempts = [
        ("migrate", format!("--pythonpath={dir} --settings=evil_settings --plan"), "--pythonpath="),
        ("check", "--sett=evil_settings".to_string(), "--sett=evil_settings"),
        ("diffsettings", format!("--pythonp {dir} --default=evil_settings"), "--pythonp"),
        ("diffsettings", "--default=evil_settings".to_string(), "--default=evil_settings"),
        ("test", "--testrunner=evil_settings.Runner".to_string(), "--testrunner"),
        ("test", format!("-t {dir} evil_settings"), "\"-t\""),
    ];
    for (command, args, named) in &attempts {
        let stderr = refused(&plane, command, args).await;
        assert!(stderr.contains("changes which code or settings the command loads"), "{stderr}");
        assert!(stderr.contains(named), "{named}: {stderr}");
        assert!(stderr.contains("allow_code_loading_options = true"), "{stderr}");
    }
    assert!(!marker.exists(), "the module was imported");
    assert!(runner.log().contains("rule=code_loading_option"), "{}", runner.log());

    // Allowed by the operator, the same arguments import the module: the
    // refusal was what stood in the way.
    runner.write_config("allow_code_loading_options = true", "");
    runner.signal(Signal::SIGHUP);
    runner.wait_reloaded(1).await;
    let args = format!("--pythonpath={dir} --default=evil_settings");
    let diff = plane.wait_done(&plane.queue("diffsettings", &args).await, LIMIT).await;
    assert_eq!(status_and_code(&diff), ("success", 0), "{diff:#?}");
    assert!(marker.exists());
    assert_eq!(runner.terminate(LIMIT).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_args_are_refused_and_control_characters_never_reach_the_log_raw() {
    let plane = ControlPlane::start();
    let runner = Supervisor::start(&plane.url, "", "");
    let huge = "x".repeat(1024 * 1024);
    let stderr = refused(&plane, "noop", &huge).await;
    assert!(
        stderr.contains("Reason: its arguments are 1048576 bytes long, above the 16384-byte limit"),
        "{stderr}"
    );
    assert!(runner.log().len() < 200 * 1024, "the arguments went to the log");

    // A newline, a carriage return, NUL, an escape sequence and a C1 control.
    let hostile = "'one\nFAKE LINE\r\u{0}\u{1b}[31mred\u{9b}'";
    let said = plane.wait_done(&plane.queue("say", hostile).await, LIMIT).await;
    assert_eq!(status_and_code(&said).0, "success", "{said:#?}");
    let refused_too = plane.wait_done(&plane.queue("shell", hostile).await, LIMIT).await;
    assert_eq!(status_and_code(&refused_too).0, "failed");
    let log = runner.log();
    assert!(log.contains("one\\nFAKE LINE\\r\\x00\\x1b[31mred\\u{9b}"), "{log}");
    assert!(!log.lines().any(|line| line.starts_with("FAKE")), "{log}");
    for raw in ['\r', '\u{0}', '\u{1b}', '\u{9b}'] {
        assert!(!log.contains(raw), "{raw:?} in the log:\n{log}");
    }
}

/// The recommended file-path rules of config/dc.example.toml, uncommented.
fn recommended_path_rules() -> String {
    let example = std::fs::read_to_string(common::repo_root().join("config/dc.example.toml")).unwrap();
    let block = example
        .split("# --- recommended file-path rules ---\n")
        .nth(1)
        .and_then(|rest| rest.split("# --- end of recommended file-path rules ---").next())
        .expect("the example has the recommended rules");
    block.lines().map(|line| line.trim_start_matches("# ")).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recommended_rules_keep_file_paths_out_of_the_control_planes_hands() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, &recommended_path_rules(), "");
    let target = tempfile::tempdir().unwrap();
    let written = target.path().join("dump.json");
    let stderr = refused(&plane, "dumpdata", &format!("--output {}", written.display())).await;
    assert!(stderr.contains("option --output is refused for 'dumpdata'"), "{stderr}");
    assert!(!written.exists());
    for path in ["/etc/passwd.json", "../../secrets.json"] {
        let stderr = refused(&plane, "loaddata", path).await;
        assert!(stderr.contains(&format!("positional argument {path:?} does not match")), "{stderr}");
    }
    let stderr = refused(&plane, "test", &target.path().display().to_string()).await;
    assert!(stderr.contains("does not match"), "{stderr}");
    // What the rules leave alone runs (a fixture name; there is no such fixture).
    let load = plane.wait_done(&plane.queue("loaddata", "no_such_fixture.json").await, LIMIT).await;
    assert_eq!(status_and_code(&load), ("failed", 1), "{load:#?}");
    assert!(output(&load, true).contains("No fixture named 'no_such_fixture'"), "{load:#?}");
}

/// Every entry under `dir` whose mode gives anything to group or others.
fn not_private(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut wide = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            wide.push(format!("{} {mode:o}", entry.path().display()));
        }
        if entry.file_type().unwrap().is_dir() {
            wide.extend(not_private(&entry.path()));
        }
    }
    wide
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_directory_and_everything_in_it_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let plane = ControlPlane::start();
    let mut runner = Supervisor::start(&plane.url, "", "");
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
    let state = runner.dir.path().join(".dcsupervisor");
    assert!(state.join("journal").is_dir() && state.join("outbox").is_dir());
    assert_eq!(not_private(&state), Vec::<String>::new());

    // What an older version left wide open is narrowed at the next start.
    assert_eq!(runner.terminate(LIMIT).await, Some(0));
    for (path, mode) in [(state.join("journal"), 0o755), (state.join("outbox"), 0o755)] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::write(state.join("left-by-an-older-version.log"), "").unwrap();
    std::fs::set_permissions(
        state.join("left-by-an-older-version.log"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    runner.restart();
    wait_for_log_count(&runner, "worker ready", 2).await;
    assert_eq!(not_private(&state), Vec::<String>::new());
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_commands_get_the_key_for_set_up_only_and_the_same_tracebacks() {
    let plane = ControlPlane::start();
    let project = project_with_settings("\nDJANGOCOMMAND_API_KEY = os.environ[\"DJANGOCOMMAND_API_KEY\"]\n");
    let env = [("DJANGOCOMMAND_API_KEY", KEY)];
    let spawn = "[worker]\nisolation = \"spawn\"\n";
    let _runner =
        Supervisor::start_with(&plane.url, SHELL_ALLOWED, spawn, project.path().to_path_buf(), &env);
    let probe = "import os, sys\n\
        from django.conf import settings\n\
        print('argv:', sys.argv[1:], 'path0:', sys.path[0] == os.getcwd())\n\
        print('os.environ:', 'DJANGOCOMMAND_API_KEY' in os.environ)\n\
        print('/proc/self/environ:', b'DJANGOCOMMAND_API_KEY' in open('/proc/self/environ', 'rb').read())\n\
        print('settings:', settings.DJANGOCOMMAND_API_KEY)\n";
    assert_eq!(
        shell(&plane, probe).await,
        "argv: ['shell', '-v', '0', '-c', '[REDACTED]'] path0: True\n"
            .replace("'[REDACTED]'", &format!("{probe:?}"))
            + "os.environ: False\n/proc/self/environ: False\nsettings: [REDACTED]\n"
    );
    // An uncaught exception prints the traceback `python manage.py` prints.
    let boom = plane.wait_done(&plane.queue("boom", "").await, LIMIT).await;
    let reference = std::process::Command::new(common::python())
        .args(["manage.py", "boom"])
        .current_dir(project.path())
        .env("DJANGOCOMMAND_API_KEY", KEY)
        .env("DEMO_DB_PATH", project.path().join("unused.sqlite3"))
        .output()
        .unwrap();
    assert_eq!(output(&boom, true), String::from_utf8_lossy(&reference.stderr), "{boom:#?}");
    assert_eq!(status_and_code(&boom).1, i64::from(reference.status.code().unwrap()));
    // sys.exit() codes pass through.
    let failed = plane.wait_done(&plane.queue("fail", "--code 5").await, LIMIT).await;
    assert_eq!(status_and_code(&failed), ("failed", 5), "{failed:#?}");
}
