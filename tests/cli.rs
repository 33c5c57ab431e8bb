//! The `dcsupervisor` binary as a user runs it: `exec` and `commands` on the
//! demo project, the policy's refusals, configuration errors, and a
//! supervisor killed with SIGKILL taking its worker and jobs with it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

struct Setup {
    db: TestDb,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(extra: &str) -> Self {
        let db = TestDb::new();
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[django]\nproject_dir = {project:?}\nsettings_module = \"demo_project.settings\"\npython = {python:?}\n\
             env = {{ DEMO_DB_PATH = {db:?} }}\n\n{extra}\n",
            project = demo_project().display().to_string(),
            python = python().display().to_string(),
            db = db.path().display().to_string(),
        );
        write_file(&dir.path().join("dc.toml"), &config);
        Self { db, dir }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dcsupervisor"));
        command.arg("--config").arg(self.dir.path().join("dc.toml")).arg("-q").args(args);
        command.env_remove("DJANGOCOMMAND_API_KEY").env_remove("RUST_LOG");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().expect("run dcsupervisor")
    }
}

const DEMO_ALLOWED: &str = "[policy]\nadd_allowed_commands = [\"noisy\", \"exit_with\", \"sleep\", \"grandchild\", \"djangocommand\", \"say\", \"read_stdin\", \"noop\"]\n";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn exec_streams_the_output_and_exits_with_the_commands_code() {
    let setup = Setup::new(DEMO_ALLOWED);
    let out = setup.run(&["exec", "noisy", "--lines", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"out 0\nout 1\n");
    assert_eq!(out.stderr, b"err 0\nerr 1\n");

    let out = setup.run(&["exec", "exit_with", "5"]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(out.stdout, b"exiting with 5\n");
}

#[test]
fn arguments_never_reach_a_shell() {
    let setup = Setup::new(DEMO_ALLOWED);
    let marker = setup.dir.path().join("pwned");
    let hostile = format!("1; touch {}", marker.display());
    let out = setup.run(&["exec", "sleep", &hostile]);
    assert_eq!(out.status.code(), Some(2), "argparse refuses the value: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("invalid float value"), "{}", text(&out.stderr));
    assert!(!marker.exists());
}

#[test]
fn refused_commands_say_why_and_how_to_allow_them() {
    let setup = Setup::new(DEMO_ALLOWED);
    let out = setup.run(&["exec", "shell"]);
    assert_eq!(out.status.code(), Some(126));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("Command 'shell' rejected by runner security policy.\n"), "{stderr}");
    assert!(stderr.contains("Reason: not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist"), "{stderr}");
    assert!(stderr.contains("add_allowed_commands = [\"shell\"]"), "{stderr}");

    // Even when listed, the runner's own command is refused.
    let out = setup.run(&["exec", "djangocommand"]);
    assert_eq!(out.status.code(), Some(126));

    let blocklist = Setup::new("[policy]\nmode = \"blocklist\"\n");
    let out = blocklist.run(&["exec", "flush"]);
    assert_eq!(out.status.code(), Some(126));
    assert!(text(&out.stderr).contains("Reason: in DJANGOCOMMAND_DISALLOWED_COMMANDS blocklist"));
    assert_eq!(blocklist.run(&["exec", "noop"]).status.code(), Some(0));
}

#[test]
fn commands_hash_equals_pythons_canonical_json() {
    let setup = Setup::new(DEMO_ALLOWED);
    let out = setup.run(&["commands", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> =
        listing["commands"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"migrate") && names.contains(&"noisy"));
    assert!(!names.contains(&"shell") && !names.contains(&"djangocommand"));

    let script = "import hashlib, json, sys\n\
                  cmds = json.load(sys.stdin)['commands']\n\
                  text = json.dumps(sorted(cmds, key=lambda c: c['name']), sort_keys=True, separators=(',', ':'))\n\
                  print('sha256:' + hashlib.sha256(text.encode()).hexdigest())\n";
    let mut python = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(python.stdin.as_mut().unwrap(), &out.stdout).unwrap();
    let python = python.wait_with_output().unwrap();
    assert_eq!(text(&python.stdout).trim(), listing["commands_hash"].as_str().unwrap());

    let human = setup.run(&["commands"]);
    assert!(text(&human.stdout).contains(listing["commands_hash"].as_str().unwrap()));
    assert!(text(&human.stdout).contains("refused (not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist)"));
}

#[test]
fn invalid_configuration_names_the_field_the_value_and_the_fix() {
    let setup = Setup::new("[server]\nheartbeat_interval = 2\n");
    let out = setup.run(&["commands"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("server.heartbeat_interval") && stderr.contains("from 5 to 3600 seconds"),
        "{stderr}"
    );

    let setup = Setup::new("[worker]\nisolation = \"thread\"\n");
    let stderr = text(&setup.run(&["commands"]).stderr);
    assert!(stderr.contains("isolation") && stderr.contains("thread"), "{stderr}");

    // The environment overrides the file; unrelated DCSUPERVISOR_ variables are ignored.
    let setup = Setup::new("");
    let out = setup
        .command(&["commands"])
        .env("DCSUPERVISOR_SERVER__HEARTBEAT_INTERVAL", "3")
        .env("DCSUPERVISOR_SOMETHING_ELSE", "x")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(stderr.contains("server.heartbeat_interval") && stderr.contains('3'), "{stderr}");

    let setup = Setup::new("[polcy]\nmode = \"blocklist\"\n");
    let stderr = text(&setup.run(&["commands"]).stderr);
    assert!(stderr.contains("polcy"), "unknown sections are refused: {stderr}");
}

fn parent_of(pid: u32) -> u32 {
    dcsupervisor::procfs::stat(pid).expect("the process exists").parent
}

#[tokio::test]
async fn a_killed_supervisor_takes_its_worker_and_jobs_with_it() {
    let setup = Setup::new(DEMO_ALLOWED);
    let mut supervisor =
        setup.command(&["exec", "grandchild"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(supervisor.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let grandchild: u32 = line.trim().strip_prefix("grandchild ").unwrap().parse().unwrap();
    let job = parent_of(grandchild);
    let worker = parent_of(job);
    assert_ne!(worker, supervisor.id(), "the job is a fork of the worker");
    assert_eq!(parent_of(worker), supervisor.id());

    supervisor.kill().unwrap();
    supervisor.wait().unwrap();
    for (what, pid) in [("worker", worker), ("job", job), ("grandchild", grandchild)] {
        assert!(gone_within(pid, Duration::from_secs(10)).await, "{what} {pid} outlived the supervisor");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_once_report_what_a_deploy_broke() {
    let plane = common::plane::ControlPlane::start();
    let server = format!("[server]\nurl = {:?}\napi_key = {:?}\n", plane.url, common::plane::KEY);
    let setup = Setup::new(&format!("{server}{DEMO_ALLOWED}"));
    let out = setup.run(&["check"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("worker started: Python 3.") && stdout.contains("accepted the key"), "{stdout}");
    assert_eq!(setup.run(&["once"]).status.code(), Some(0));

    // A wrong key: check says so and fails, as does once.
    let wrong = Setup::new(&format!("[server]\nurl = {:?}\napi_key = \"dc_wrong\"\n", plane.url));
    let out = wrong.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("FAIL") && text(&out.stdout).contains("401"), "{}", text(&out.stdout));
    let out = wrong.run(&["once"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("authentication failed"), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("dc_wrong"), "the key never appears");

    // Plain HTTP to a host that is not allowed is refused before anything runs.
    let remote = Setup::new("[server]\nurl = \"http://example.com\"\napi_key = \"dc_x\"\n");
    let stderr = text(&remote.run(&["check"]).stderr);
    assert!(stderr.contains("HTTPS is required") && stderr.contains("allow_http_hosts"), "{stderr}");
    // A key without the dc_ prefix is a configuration error naming the field.
    let badkey = Setup::new(&format!("[server]\nurl = {:?}\napi_key = \"sk_live\"\n", plane.url));
    let stderr = text(&badkey.run(&["once"]).stderr);
    assert!(
        stderr.contains("server.api_key") && stderr.contains("dc_") && !stderr.contains("sk_live"),
        "{stderr}"
    );
}

#[test]
fn exec_gives_the_command_everything_after_its_name() {
    let setup = Setup::new(DEMO_ALLOWED);
    // -v belongs to the command (before: dcsupervisor's, and "0" became a part).
    let out = setup.run(&["exec", "say", "-v", "0", "hi"]);
    assert_eq!((out.status.code(), text(&out.stdout), text(&out.stderr)), (Some(0), "hi".into(), "".into()));
    let out = setup.run(&["exec", "check", "--help"]);
    assert!(text(&out.stdout).starts_with("usage: manage.py check"), "{}", text(&out.stdout));
    let out = setup.run(&["exec", "check", "--version"]);
    let django_version = run_manage_py(&setup.db, "check", &["--version"]).stdout;
    assert_eq!((out.status.code(), out.stdout), (Some(0), django_version));
    // A -c after the command is the command's: say has no -c, so argparse says so.
    let out = setup.run(&["exec", "say", "-c", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unrecognized arguments: -c"), "{}", text(&out.stderr));
    // Before the command name, options are dcsupervisor's.
    let out = setup.run(&["exec", "--version"]);
    assert!(text(&out.stdout).starts_with("dcsupervisor"), "{}", text(&out.stdout));
}

#[test]
fn exec_reads_its_stdin_and_runs_in_the_callers_directory() {
    let setup = Setup::new(DEMO_ALLOWED);
    let mut child = setup
        .command(&["exec", "read_stdin"])
        .current_dir(setup.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"piped\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "stdin: 'piped\\n'\n".into()));

    assert_eq!(setup.run(&["exec", "migrate", "-v", "0"]).status.code(), Some(0));
    let out = setup
        .command(&["exec", "dumpdata", "contenttypes", "-o", "rel.json"])
        .current_dir(setup.dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(setup.dir.path().join("rel.json").is_file(), "written where exec was run");
}

#[test]
fn exec_refuses_a_settings_module_from_the_environment_it_would_not_use() {
    let setup = Setup::new(DEMO_ALLOWED);
    let out =
        setup.command(&["exec", "noop"]).env("DJANGO_SETTINGS_MODULE", "other.settings").output().unwrap();
    assert_eq!(out.status.code(), Some(126));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("DJANGO_SETTINGS_MODULE=other.settings") && stderr.contains("demo_project.settings")
    );
    let out = setup
        .command(&["exec", "noop"])
        .env("DJANGO_SETTINGS_MODULE", "demo_project.settings")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
