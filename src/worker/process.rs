//! Starting the Python worker process: the interpreter, the private socket it
//! inherits as fd 3, the embedded worker source fed on stdin, the variables
//! it needs for Django's set-up only (the API key) over a pipe, and a task
//! that turns the worker's own stdout/stderr into log lines.

use crate::sync::LockExt;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::io::Write as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::WorkerOptions;
use crate::supervisor::redact::Redactor;

/// The worker's Python source, carried by the binary so the project only
/// needs Django installed.
pub const WORKER_SOURCE: &str = include_str!("../../python/djangocommand/_worker.py");

/// The descriptor number the worker finds its end of the socket on.
const WORKER_FD: RawFd = 3;

/// The variable naming the descriptor the set-up variables are read from.
pub(super) const SETUP_ENV_FD_VAR: &str = "DJANGOCOMMAND_SETUP_ENV_FD";
/// Descriptors below this may be the targets of the `dup2` calls below.
const FIRST_FREE_FD: RawFd = 10;

/// A longer line of the worker's output is logged in pieces of this size.
const MAX_LOG_LINE: u64 = 64 * 1024;

/// Lines of the worker's stderr kept to explain a failed start.
const STDERR_TAIL_LINES: usize = 40;

pub(super) struct Spawned {
    pub child: Child,
    pub socket: UnixStream,
    pub stderr_tail: StderrTail,
}

/// The last lines the worker wrote to its stdout/stderr.
#[derive(Clone, Default)]
pub(super) struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    fn push(&self, line: String) {
        let mut lines = self.0.locked();
        if lines.len() == STDERR_TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn text(&self) -> String {
        let lines = self.0.locked();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

pub(super) async fn spawn(opts: &WorkerOptions) -> std::io::Result<Spawned> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // The worker's end must be blocking for its plain Python socket loop.
    nix::fcntl::fcntl(&theirs, FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()))?;
    let (log_read, log_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;

    let mut command = Command::new(&opts.python);
    command
        .arg("-")
        .arg("--project-dir")
        .arg(&opts.project_dir)
        .arg("--settings")
        .arg(&opts.settings_module)
        .args((!opts.prefork).then_some("--no-prefork"))
        .current_dir(opts.caller_dir.as_ref().unwrap_or(&opts.project_dir))
        .env("DJANGOCOMMAND_WORKER_FD", WORKER_FD.to_string())
        .env("DJANGO_SETTINGS_MODULE", &opts.settings_module)
        .envs(&opts.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(log_write.try_clone()?))
        .stderr(Stdio::from(log_write))
        // Its own process group: a Ctrl-C in the terminal reaches the
        // supervisor, which decides what happens to jobs.
        .process_group(0)
        .kill_on_drop(true);
    if opts.caller_dir.is_some() {
        command.arg("--caller-mode");
    }
    super::scrub_environment(&mut command);
    for name in opts.setup_env.keys() {
        command.env_remove(name);
    }
    let setup_env = setup_env_pipe(opts)?;
    let setup_raw = setup_env.as_ref().map(|fd| fd.as_raw_fd());
    if let Some(raw) = setup_raw {
        command.env(SETUP_ENV_FD_VAR, raw.to_string());
    }
    let theirs_raw = theirs.as_raw_fd();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            inherit_as_fd3(theirs_raw)?;
            setup_raw.map_or(Ok(()), keep_across_exec)
        });
    }
    let mut child = command.spawn()?;
    drop((theirs, setup_env));

    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(WORKER_SOURCE.as_bytes()).await?;
    drop(stdin); // EOF: the interpreter compiles the source and runs it.

    let stderr_tail = StderrTail::default();
    let mask = Redactor::new(opts.setup_env.values().cloned());
    tokio::spawn(forward_worker_output(log_read, stderr_tail.clone(), mask));
    let socket = UnixStream::from_std(std::os::unix::net::UnixStream::from(ours))?;
    Ok(Spawned { child, socket, stderr_tail })
}

/// Runs in the forked child before exec: leaves the worker's socket end on
/// fd 3 without close-on-exec.
fn inherit_as_fd3(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: `fd` is open in this (child) process until exec.
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    if fd == WORKER_FD {
        // dup2 onto itself would leave close-on-exec set.
        fcntl(socket, FcntlArg::F_SETFD(FdFlag::empty()))?;
    } else {
        // SAFETY: fd 3 is not owned by anything in the child; the duplicate
        // must outlive this function, hence into_raw_fd.
        let _fd3 = unsafe { nix::unistd::dup2_raw(socket, WORKER_FD) }?.into_raw_fd();
    }
    Ok(())
}

/// The set-up variables (JSON), written into a pipe whose read end the
/// worker inherits: never in an environment, so neither the worker's nor a
/// job's `/proc/<pid>/environ` holds them. `None` when there are none.
pub(super) fn setup_env_pipe(opts: &WorkerOptions) -> std::io::Result<Option<OwnedFd>> {
    if opts.setup_env.is_empty() {
        return Ok(None);
    }
    let json = serde_json::to_vec(&opts.setup_env).map_err(std::io::Error::other)?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // A few hundred bytes: far below the pipe's buffer, so this never blocks.
    std::fs::File::from(write).write_all(&json)?;
    // Above the descriptors the child dup2s onto (fd 3), so none clobbers it.
    let high = fcntl(&read, FcntlArg::F_DUPFD_CLOEXEC(FIRST_FREE_FD))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(high) }))
}

/// Runs in the forked child before exec: `fd` stays open in the worker.
pub(super) fn keep_across_exec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: `fd` is open in this (child) process until exec.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

/// Logs the worker's own output line by line. Lines are bytes: a project
/// that logs Latin-1 (or any non-UTF-8) must not end the forwarding, which
/// would leave the worker writing into a closed pipe. The set-up secrets
/// are masked here too.
async fn forward_worker_output(read_end: OwnedFd, tail: StderrTail, mask: Option<Redactor>) {
    let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end) else {
        return;
    };
    let mut reader = BufReader::new(pipe);
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        match (&mut reader).take(MAX_LOG_LINE).read_until(b'\n', &mut bytes).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut line = String::from_utf8_lossy(&bytes).trim_end_matches(['\n', '\r']).to_string();
        if let Some(mask) = &mask {
            line = mask.take_safe(&mut line, true);
        }
        tracing::info!(target: "dcsupervisor::worker::python", "{line}");
        tail.push(line);
    }
}
