//! Shared set-up for the integration tests: the Python interpreter with
//! Django (the venv `scripts/test` creates, or `DCSUPERVISOR_TEST_PYTHON`),
//! a private copy of the demo project's database, and helpers to run jobs.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dcsupervisor::worker::{Isolation, Job, JobEnd, Output, Worker, WorkerOptions};
use tokio::io::AsyncReadExt;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn demo_project() -> PathBuf {
    repo_root().join("examples/demo")
}

/// The interpreter with Django installed. Missing is a set-up error, not a
/// reason to skip: `scripts/test` creates it.
pub fn python() -> PathBuf {
    if let Ok(path) = std::env::var("DCSUPERVISOR_TEST_PYTHON") {
        return PathBuf::from(path);
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with Django: run scripts/test (it creates .venv) or set DCSUPERVISOR_TEST_PYTHON"
    );
    venv
}

/// A test's own SQLite file, so tests running in parallel never share one.
pub struct TestDb {
    pub dir: tempfile::TempDir,
}

impl TestDb {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("db.sqlite3")
    }
}

pub fn options(db: &TestDb) -> WorkerOptions {
    WorkerOptions {
        python: python(),
        project_dir: demo_project(),
        settings_module: "demo_project.settings".into(),
        env: BTreeMap::from([("DEMO_DB_PATH".to_string(), db.path().display().to_string())]),
        setup_env: BTreeMap::new(),
        startup_timeout: Duration::from_secs(60),
        isolation: Isolation::Fork,
        spawn_commands: BTreeSet::new(),
        prefork: true,
        recycle_after_jobs: None,
        recycle_above_rss: None,
        caller_dir: None,
    }
}

/// What a finished job produced.
#[derive(Debug)]
pub struct Finished {
    pub end: JobEnd,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Finished {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Reads both pipes to EOF while waiting for the job.
pub async fn finish(mut job: Job) -> Finished {
    let stdout = tokio::spawn(read_all(job.stdout.take()));
    let stderr = tokio::spawn(read_all(job.stderr.take()));
    let end = job.wait().await;
    Finished { end, stdout: stdout.await.unwrap(), stderr: stderr.await.unwrap() }
}

pub async fn read_all(pipe: Option<tokio::net::unix::pipe::Receiver>) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_end(&mut bytes).await.expect("read pipe");
    }
    bytes
}

pub async fn run(worker: &Worker, command: &str, args: &[&str]) -> Finished {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let job = worker.spawn_job(command, &args, Output::Capture).await.expect("job starts");
    finish(job).await
}

/// `python manage.py <command> <args>` as a plain subprocess: the reference
/// the worker's behaviour must match.
pub fn run_manage_py(db: &TestDb, command: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(python())
        .arg("manage.py")
        .arg(command)
        .args(args)
        .current_dir(demo_project())
        .env("DEMO_DB_PATH", db.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run manage.py")
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    dcsupervisor::procfs::stat(pid).is_some_and(|stat| !stat.is_zombie())
}

/// Polls until `pid` is gone; true if it went within `limit`.
pub async fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !alive(pid)
}

/// Polls until `path` is gone; true if it went within `limit`. The runner
/// removes a delivered output log only after the control plane answered its
/// completion, so a test that saw the completion must wait for the removal.
pub async fn removed_within(path: &Path, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while path.exists() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

pub fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

/// A private copy of the demo project, whose code a test may change.
pub fn project_copy() -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", demo_project().display()))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    copy
}

/// Sets the soft file size limit of process `pid` (None: back to the hard
/// limit), like a disk that fills (writes fail with EFBIG, possibly half-way)
/// and frees. Raising it again needs no privilege. `false` if the process is
/// gone.
pub fn set_file_size_limit(pid: u32, bytes: Option<u64>) -> bool {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a null new limit only reads the current one into `old`.
    unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_FSIZE, std::ptr::null(), &mut old) };
    let soft = bytes.map_or(old.rlim_max, |bytes| bytes.min(old.rlim_max));
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: old.rlim_max };
    // SAFETY: prlimit reads `limit` and writes nothing (null old-limit pointer).
    unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) == 0 }
}

pub mod egress_proxy;
pub mod plane;
pub mod tls;
