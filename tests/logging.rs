//! `--log-file`: the supervisor's own log file, rotated by size, as
//! `manage.py djangocommand start -d` runs it (no journald, no process
//! manager to rotate it). Real runs of the binary against the demo project.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use common::*;

#[test]
fn the_log_file_rotates_by_size_and_keeps_a_few_files() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[django]\nproject_dir = {project:?}\nsettings_module = \"demo_project.settings\"\npython = {python:?}\n\
         env = {{ DEMO_DB_PATH = {db:?} }}\n\n[policy]\nadd_allowed_commands = [\"noisy\"]\n",
        project = demo_project().display().to_string(),
        python = python().display().to_string(),
        db = db.path().display().to_string(),
    );
    write_file(&dir.path().join("dc.toml"), &config);
    // A directory that does not exist yet, as on a first start.
    let log = dir.path().join("state").join("dcsupervisor.log");
    // Each run logs "worker ready" (about 100 bytes), past the 50-byte limit.
    for _ in 0..4 {
        let out = Command::new(env!("CARGO_BIN_EXE_dcsupervisor"))
            .arg("--config")
            .arg(dir.path().join("dc.toml"))
            .arg("--log-file")
            .arg(&log)
            .args(["--log-max-bytes", "50", "--log-keep", "2", "exec", "noisy", "--lines", "1"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        // The command's own output still goes to the terminal; the log does not.
        assert_eq!(out.stdout, b"out 0\n");
        assert_eq!(out.stderr, b"err 0\n");
    }
    let mut names: Vec<String> = std::fs::read_dir(log.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["dcsupervisor.log", "dcsupervisor.log.1", "dcsupervisor.log.2"]);
    for name in &names {
        let path = log.parent().unwrap().join(name);
        assert!(std::fs::read_to_string(&path).unwrap().contains("worker ready"), "{name}");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "{name}");
    }
}

#[test]
fn an_unusable_log_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-directory");
    write_file(&blocker, "");
    let out = Command::new(env!("CARGO_BIN_EXE_dcsupervisor"))
        .arg("--log-file")
        .arg(blocker.join("dcsupervisor.log"))
        .args(["--config", "/nonexistent/dc.toml", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("dcsupervisor: cannot create "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
