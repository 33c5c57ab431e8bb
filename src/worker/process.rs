//! Starting the Python worker process: the interpreter, the private socket it
//! inherits as fd 3, the embedded worker source fed on stdin, and a task that
//! turns the worker's own stdout/stderr into log lines.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::WorkerOptions;

/// The worker's Python source, carried by the binary so the project only
/// needs Django installed.
pub const WORKER_SOURCE: &str = include_str!("../../python/djangocommand/_worker.py");

/// The descriptor number the worker finds its end of the socket on.
const WORKER_FD: RawFd = 3;

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
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == STDERR_TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn text(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
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
        .current_dir(&opts.project_dir)
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
    super::scrub_environment(&mut command);
    let theirs_raw = theirs.as_raw_fd();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        command.pre_exec(move || inherit_as_fd3(theirs_raw));
    }
    let mut child = command.spawn()?;
    drop(theirs);

    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(WORKER_SOURCE.as_bytes()).await?;
    drop(stdin); // EOF: the interpreter compiles the source and runs it.

    let stderr_tail = StderrTail::default();
    tokio::spawn(forward_worker_output(log_read, stderr_tail.clone()));
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

async fn forward_worker_output(read_end: OwnedFd, tail: StderrTail) {
    let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end) else {
        return;
    };
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "dcsupervisor::worker::python", "{line}");
        tail.push(line);
    }
}
