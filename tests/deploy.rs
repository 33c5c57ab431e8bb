//! The deployment files under `deploy/`: the systemd unit, the supervisord
//! program and its key-reading wrapper, and the Docker example. They are
//! parsed and checked against what the binary needs (the stop deadline
//! against the configuration's grace periods, the state directory, the
//! subcommands they run), and the unit goes through `systemd-analyze verify`
//! and `systemd-analyze security` when that tool is on PATH.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dcsupervisor::config::Config;
use dcsupervisor::supervisor::setup;

const BIN: &str = env!("CARGO_BIN_EXE_dcsupervisor");

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// An INI-like file (systemd unit or supervisord config): section → key → values,
/// in order (systemd allows a key more than once).
type Sections = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// Parses a systemd unit file: `#`/`;` comment lines, `[Section]`, `Key=value`,
/// backslash continuation lines.
fn parse_unit(text: &str) -> Sections {
    let mut sections = Sections::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            sections.entry(section.clone()).or_default();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not Key=value: {line:?}"));
        assert!(!section.is_empty(), "{key} outside a section");
        let keys = sections.entry(section.clone()).or_default();
        keys.entry(key.trim().to_string()).or_default().push(value.trim().to_string());
    }
    sections
}

/// Parses a supervisord config: `;`/`#` comment lines, inline ` ;` comments.
fn parse_ini(text: &str) -> Sections {
    let mut sections = Sections::new();
    let mut section = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let line = line.split(" ;").next().unwrap_or("").trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line:?}"));
        let keys = sections.entry(section.clone()).or_default();
        keys.entry(key.trim().to_string()).or_default().push(value.trim().to_string());
    }
    sections
}

/// The one (last) value of `key` in `section`.
fn value<'a>(sections: &'a Sections, section: &str, key: &str) -> &'a str {
    sections
        .get(section)
        .and_then(|keys| keys.get(key))
        .and_then(|values| values.last())
        .unwrap_or_else(|| panic!("[{section}] {key} is not set"))
}

/// A systemd time span: "90", "90s", "1min 30s", "2m", "500ms".
fn parse_timespan(text: &str) -> Duration {
    let text = text.trim();
    assert_ne!(text, "infinity", "an infinite stop timeout would never SIGKILL leftovers");
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().unwrap_or_else(|_| panic!("bad time span {text:?}"));
        rest = rest[digits..].trim_start();
        let unit_len = rest.find(|c: char| !c.is_alphabetic()).unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "" | "s" | "sec" | "second" | "seconds" => 1.0,
            "ms" | "msec" => 0.001,
            "us" | "usec" | "µs" => 0.000_001,
            "m" | "min" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            other => panic!("unknown time unit {other:?} in {text:?}"),
        };
        total += Duration::from_secs_f64(number * seconds_per_unit);
        rest = rest[unit_len..].trim_start();
    }
    total
}

#[test]
fn timespans_parse_like_systemd() {
    assert_eq!(parse_timespan("90"), Duration::from_secs(90));
    assert_eq!(parse_timespan("90s"), Duration::from_secs(90));
    assert_eq!(parse_timespan("1min 30s"), Duration::from_secs(90));
    assert_eq!(parse_timespan("1m30s"), Duration::from_secs(90));
    assert_eq!(parse_timespan("1.5min"), Duration::from_secs(90));
    assert_eq!(parse_timespan("500ms"), Duration::from_millis(500));
}

/// Loads an example dc.toml as dcsupervisor would, with its project
/// directory (`project_dir`, absent on this machine) swapped for a temporary
/// one holding a manage.py.
fn load_example_config(path: &str, project_dir: &str) -> (Config, tempfile::TempDir) {
    let text = read(path);
    assert!(text.contains(&format!("project_dir = \"{project_dir}\"")), "{path}: project_dir");
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("manage.py"), "").unwrap();
    let config_path = dir.path().join("dc.toml");
    let text = text.replace(&format!("\"{project_dir}"), &format!("\"{}", project.display()));
    std::fs::write(&config_path, text).unwrap();
    let config = Config::load(&config_path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (config, dir)
}

/// The longest orderly stop of a configuration: running executions' grace,
/// then the cancel grace, then the delivery deadline.
fn orderly_stop_bound(config: &Config) -> Duration {
    let opts = setup::runner_options(config);
    opts.shutdown_grace + setup::cancel_grace(config) + opts.delivery_deadline
}

fn unit() -> Sections {
    parse_unit(&read("deploy/systemd/dcsupervisor.service"))
}

/// The same unit for systemd < 253 (no `Type=notify-reload`).
const UNIT_BEFORE_253: &str = "deploy/systemd/systemd-before-253/dcsupervisor.service";

#[test]
fn the_unit_for_systemd_before_253_differs_only_in_how_it_reloads() {
    let mut current = unit();
    let mut before_253 = parse_unit(&read(UNIT_BEFORE_253));
    assert_eq!(value(&current, "Service", "Type"), "notify-reload");
    assert!(!current["Service"].contains_key("ExecReload"), "notify-reload sends SIGHUP itself");
    assert_eq!(value(&before_253, "Service", "Type"), "notify");
    assert_eq!(value(&before_253, "Service", "ExecReload"), "/bin/kill -HUP $MAINPID");
    for sections in [&mut current, &mut before_253] {
        let service = sections.get_mut("Service").unwrap();
        service.remove("Type");
        service.remove("ExecReload");
    }
    assert_eq!(current, before_253, "everything else is the same in both units");
}

#[test]
fn unit_file_has_the_essentials() {
    let unit = unit();
    let service = |key: &str| value(&unit, "Service", key).to_string();
    assert_eq!(service("Type"), "notify-reload");
    assert_eq!(service("NotifyAccess"), "main");
    assert_eq!(service("ExecStart"), "/usr/local/bin/dcsupervisor --config /etc/dcsupervisor/dc.toml");
    // Reload is SIGHUP: no ReloadSignal= other than the default.
    assert!(unit["Service"].get("ReloadSignal").is_none_or(|v| v.iter().all(|s| s == "SIGHUP")));
    assert_eq!(service("KillMode"), "mixed");
    assert_eq!(service("KillSignal"), "SIGTERM");
    assert_eq!(service("Restart"), "on-failure");
    assert!(parse_timespan(&service("WatchdogSec")) >= Duration::from_secs(10));
    assert_eq!(service("NoNewPrivileges"), "yes");
    assert_eq!(service("ProtectSystem"), "strict");
    assert_eq!(service("ProtectHome"), "read-only");
    assert_eq!(service("PrivateTmp"), "yes");
    assert_eq!(service("UMask"), "0077");
    assert_eq!(service("StateDirectory"), "dcsupervisor");
    assert_eq!(service("StateDirectoryMode"), "0700");
    assert_eq!(service("CapabilityBoundingSet"), "");
    assert_eq!(service("MemoryDenyWriteExecute"), "no");
    assert_eq!(service("EnvironmentFile"), "-/etc/dcsupervisor/env");
    assert!(!service("User").is_empty() && service("User") != "root", "a dedicated user");
    assert!(!service("Group").is_empty());
    assert!(service("WorkingDirectory").starts_with('/'));

    // The defaults: 30 s grace + 5 s cancel grace + 30 s delivery = 65 s.
    let stop = parse_timespan(&service("TimeoutStopSec"));
    assert!(stop >= Duration::from_secs(30 + 5 + 30), "TimeoutStopSec={stop:?}");
}

#[test]
fn unit_file_matches_its_example_config() {
    let unit = unit();
    let (config, _dir) = load_example_config("deploy/systemd/dc.toml", "/srv/app");
    // The example states the defaults; the unit's stop timeout must cover them.
    let stop = parse_timespan(value(&unit, "Service", "TimeoutStopSec"));
    let bound = orderly_stop_bound(&config);
    assert_eq!(bound, Duration::from_secs(65));
    assert!(stop > bound, "TimeoutStopSec={stop:?} is not above the orderly stop ({bound:?})");
    // The start timeout covers at least the worker's start-up.
    let start = parse_timespan(value(&unit, "Service", "TimeoutStartSec"));
    assert!(start > setup::worker_options(&config).startup_timeout, "TimeoutStartSec={start:?}");
    // runner.state_dir is the unit's StateDirectory=.
    let state_dir = Path::new("/var/lib").join(value(&unit, "Service", "StateDirectory"));
    assert_eq!(config.runner.state_dir, state_dir);
    assert_eq!(value(&unit, "Service", "WorkingDirectory"), "/srv/app");
    assert!(config.runner.reload_touch_file.is_none(), "the touch file is an example, commented out");
    assert_eq!(read("deploy/systemd/env.example").lines().last(), Some("DJANGOCOMMAND_API_KEY=dc_..."));
}

fn systemd_analyze_version() -> Option<u32> {
    let output = Command::new("systemd-analyze").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `systemd-analyze` with plain output; (success, stdout, stderr).
fn systemd_analyze(args: &[&str], unit: &Path) -> (bool, String, String) {
    let output = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

/// Asserts that `systemd-analyze verify` accepts `unit`: a zero exit and no
/// complaint about the file, except `Type=notify-reload` on systemd < 253,
/// which predates it (the unit says what to use there).
fn assert_verifies(unit: &Path, version: u32) {
    let (ok, stdout, stderr) = systemd_analyze(&["verify"], unit);
    assert!(ok, "systemd-analyze verify failed:\n{stdout}{stderr}");
    let name = unit.file_name().unwrap().to_string_lossy().into_owned();
    let complaints: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|line| line.contains(&name))
        .filter(|line| {
            !(version < 253 && line.ends_with("Failed to parse service type, ignoring: notify-reload"))
        })
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze verify complains:\n{}", complaints.join("\n"));
}

#[test]
fn systemd_analyze_accepts_the_unit() {
    let Some(version) = systemd_analyze_version() else {
        println!("skipped: systemd-analyze is not on PATH; the unit file was not verified by systemd");
        return;
    };
    println!("systemd-analyze from systemd {version}");
    if version < 253 {
        println!("systemd {version} < 253 does not know Type=notify-reload (it ignores it with a warning)");
    }
    let dir = tempfile::tempdir().unwrap();
    let text = read("deploy/systemd/dcsupervisor.service");
    let exec_start = "ExecStart=/usr/local/bin/dcsupervisor ";
    assert!(text.contains(exec_start));
    // verify checks that the binary exists and is executable: use the one just built.
    let unit = dir.path().join("dcsupervisor.service");
    std::fs::write(&unit, text.replace(exec_start, &format!("ExecStart={BIN} "))).unwrap();
    assert_verifies(&unit, version);

    // The commented alternative: the key from a systemd credential.
    let credential = dir.path().join("dcsupervisor-credential.service");
    let alternative = text
        .replace("\nEnvironmentFile=", "\n#EnvironmentFile=")
        .replace(&format!("\n{exec_start}"), &format!("\n#{exec_start}"))
        .replace("\n#LoadCredential=", "\nLoadCredential=")
        .replace("\n#ExecStart=/bin/sh", "\nExecStart=/bin/sh");
    assert_eq!(parse_unit(&alternative)["Service"]["ExecStart"].len(), 1);
    std::fs::write(&credential, alternative).unwrap();
    assert_verifies(&credential, version);

    // The unit for systemd < 253: accepted as it is, with no warning at all.
    let before_253 = dir.path().join("dcsupervisor-before-253.service");
    let legacy_text = read(UNIT_BEFORE_253).replace(exec_start, &format!("ExecStart={BIN} "));
    std::fs::write(&before_253, legacy_text).unwrap();
    let (ok, stdout, stderr) = systemd_analyze(&["verify"], &before_253);
    assert!(ok, "systemd-analyze verify failed:\n{stdout}{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("dcsupervisor-before-253"), "{stdout}{stderr}");

    let (ok, stdout, stderr) = systemd_analyze(&["security", "--offline=true"], &unit);
    let overall = stdout.lines().chain(stderr.lines()).find(|l| l.contains("Overall exposure level"));
    match (ok, overall) {
        (true, Some(line)) => {
            println!("systemd-analyze security: {}", line.trim_start_matches(['→', ' ']));
            let score: f64 = line
                .split(':')
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|number| number.parse().ok())
                .unwrap_or_else(|| panic!("no score in {line:?}"));
            // 1.6 ("OK") with systemd 252; 10 is an unhardened service.
            assert!(score <= 3.0, "the unit lost its hardening: exposure {score}\n{stdout}");
        }
        _ => println!("skipped: `systemd-analyze security --offline=true` is not supported here:\n{stderr}"),
    }
}

#[test]
fn supervisord_program_stops_gracefully() {
    let ini = parse_ini(&read("deploy/supervisord/dcsupervisor.conf"));
    let program = |key: &str| value(&ini, "program:dcsupervisor", key).to_string();
    let command = program("command");
    assert!(command.ends_with("/usr/local/bin/dcsupervisor --config /etc/dcsupervisor/dc.toml"), "{command}");
    assert!(command.starts_with("/usr/local/bin/dcsupervisor-env "), "{command}");
    assert_eq!(program("stopsignal"), "TERM");
    assert_eq!(program("stopasgroup"), "false");
    assert_eq!(program("killasgroup"), "true");
    assert_eq!(program("autostart"), "true");
    assert_eq!(program("autorestart"), "true");
    assert!(!program("user").is_empty() && program("user") != "root");
    assert!(program("directory").starts_with('/'));
    assert!(!program("stderr_logfile").is_empty() && !program("stdout_logfile").is_empty());
    assert!(!program("environment").contains("DJANGOCOMMAND_API_KEY"), "the key belongs in the 0600 file");

    let stopwaitsecs = Duration::from_secs(program("stopwaitsecs").parse().unwrap());
    assert!(stopwaitsecs >= Duration::from_secs(30 + 5 + 30), "stopwaitsecs={stopwaitsecs:?}");
    // The same dc.toml serves the supervisord layout.
    let (config, _dir) = load_example_config("deploy/systemd/dc.toml", "/srv/app");
    assert!(stopwaitsecs > orderly_stop_bound(&config));
}

fn wrapper() -> Command {
    let mut command = Command::new("sh");
    command.arg(repo_file("deploy/supervisord/dcsupervisor-env")).env_remove("DJANGOCOMMAND_API_KEY");
    command
}

#[test]
fn supervisord_wrapper_exports_the_key_and_execs() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("env");
    std::fs::write(&env_file, "# the key\n\nDJANGOCOMMAND_API_KEY=dc_abc=def\nOTHER=two words").unwrap();

    let output = wrapper().env("DC_ENV_FILE", &env_file).arg("env").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let env = String::from_utf8_lossy(&output.stdout);
    assert!(env.lines().any(|l| l == "DJANGOCOMMAND_API_KEY=dc_abc=def"), "{env}");
    assert!(env.lines().any(|l| l == "OTHER=two words"), "{env}");

    // `exec`: the program keeps the pid supervisord signals.
    let child = wrapper()
        .env("DC_ENV_FILE", &env_file)
        .args(["sh", "-c", "echo $$"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), pid.to_string());

    // A line that is not KEY=value (a bare key, say) stops it, without echoing the line.
    std::fs::write(&env_file, "dc_secret_pasted_alone\n").unwrap();
    let output = wrapper().env("DC_ENV_FILE", &env_file).arg("true").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(":1: not a KEY=value line"), "{stderr}");
    assert!(!stderr.contains("dc_secret"), "{stderr}");

    let output = wrapper().env("DC_ENV_FILE", dir.path().join("missing")).arg("true").output().unwrap();
    assert!(!output.status.success());
}

/// The Dockerfile's instructions, continuation lines joined.
fn dockerfile_instructions() -> Vec<String> {
    let text = read("deploy/docker/Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

#[test]
fn dockerfile_builds_and_runs_the_supervisor() {
    let instructions = dockerfile_instructions();
    let has = |wanted: &str| instructions.iter().any(|i| i == wanted);
    let find = |prefix: &str| -> Vec<&str> {
        instructions.iter().map(String::as_str).filter(|i| i.starts_with(prefix)).collect()
    };
    assert!(find("FROM rust:1-slim").len() == 1 && find("FROM python:").len() == 1);
    assert!(find("RUN").iter().any(|i| i.contains("cargo build --release --locked --bin dcsupervisor")));
    assert!(has("STOPSIGNAL SIGTERM"));
    assert!(has(r#"CMD ["dcsupervisor", "--config", "/app/dc.toml"]"#));
    assert!(has(r#"ENTRYPOINT ["/usr/bin/tini", "--"]"#));
    assert!(find("RUN apt-get").iter().any(|i| i.contains(" tini ")));
    let user = *find("USER ").last().expect("USER");
    assert!(user != "USER root" && user != "USER 0", "{user}");
    let health = *find("HEALTHCHECK").first().expect("HEALTHCHECK");
    assert!(health.contains(r#"CMD ["dcsupervisor", "--config", "/app/dc.toml", "-q", "once"]"#), "{health}");

    // The named build context `dcsupervisor` is this repository: what the build
    // copies from it exists, and it is enough to build (the manifest's targets).
    for copy in find("COPY --from=dcsupervisor ") {
        let words: Vec<&str> = copy.split_whitespace().collect();
        for source in &words[2..words.len() - 1] {
            assert!(repo_file(source).exists(), "{copy}: {source} is not in the repository");
        }
    }
    let copied: Vec<&str> =
        find("COPY --from=dcsupervisor ").into_iter().flat_map(|c| c.split_whitespace().skip(2)).collect();
    for needed in ["Cargo.toml", "Cargo.lock", "src", "python", "benches"] {
        assert!(copied.contains(&needed), "the build needs {needed}");
    }

    // The subcommand and flags the image runs exist.
    let status = Command::new(BIN)
        .args(["--config", "/app/dc.toml", "-q", "once", "--help"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "`dcsupervisor --config ... -q once` is not a valid command line");

    let (config, _dir) = load_example_config("deploy/docker/dc.toml", "/app");
    assert_eq!(config.runner.state_dir, Path::new("/var/lib/dcsupervisor"));
    assert!(orderly_stop_bound(&config) < Duration::from_secs(90), "docker stop -t 90 is documented");
    assert!(read("deploy/docker/Dockerfile").contains("docker stop -t 90"));
}

/// hadolint from the test venv (requirements-dev.txt installs it), else PATH.
fn hadolint() -> Option<PathBuf> {
    let venv_bin = std::env::var_os("DCSUPERVISOR_TEST_PYTHON")
        .map(|python| PathBuf::from(python).with_file_name("hadolint"))
        .unwrap_or_else(|| repo_file(".venv/bin/hadolint"));
    if venv_bin.is_file() {
        return Some(venv_bin);
    }
    Command::new("hadolint").arg("--version").output().ok().map(|_| PathBuf::from("hadolint"))
}

/// No container engine here can pull the base images (only package
/// registries are reachable), so the Dockerfile is linted rather than built;
/// each rule it ignores says why on the line above.
#[test]
fn hadolint_accepts_the_dockerfile() {
    let Some(hadolint) = hadolint() else {
        println!("skipped: hadolint is not installed (scripts/venv installs it)");
        return;
    };
    let output = Command::new(&hadolint)
        .args(["--no-color", "--failure-threshold", "info"])
        .arg(repo_file("deploy/docker/Dockerfile"))
        .output()
        .expect("run hadolint");
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "hadolint:\n{text}");
    let dockerfile = read("deploy/docker/Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().collect();
    for (index, line) in lines.iter().enumerate().filter(|(_, line)| line.starts_with("# hadolint ")) {
        let above = if index > 0 { lines[index - 1] } else { "" };
        assert!(
            above.starts_with('#') && !above.starts_with("# hadolint"),
            "{line}: say why on the line above"
        );
    }
}
