//! A job as its consumer sees it: the command's stdout and stderr pipes, a
//! way to signal it, and how it ended. The same type covers both isolation
//! modes, a fork of the preloaded worker and a plain `manage.py` subprocess.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use super::connection::Connection;
use crate::ipc::{ExitStatus, JobId};

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// The command's process was reaped with this status.
    Exited(ExitStatus),
    /// The worker running it died or broke the protocol; the job's process
    /// group has been killed and its real status is unknown.
    Lost(String),
}

impl JobEnd {
    /// The exit code a shell would report: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match self {
            JobEnd::Exited(ExitStatus::Code { code }) => *code,
            JobEnd::Exited(ExitStatus::Signal { signal }) => 128 + signal,
            JobEnd::Lost(_) => 1,
        }
    }

    pub fn success(&self) -> bool {
        matches!(self, JobEnd::Exited(ExitStatus::Code { code: 0 }))
    }
}

impl std::fmt::Display for JobEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobEnd::Exited(ExitStatus::Code { code }) => write!(f, "exit code {code}"),
            JobEnd::Exited(ExitStatus::Signal { signal }) => match Signal::try_from(*signal) {
                Ok(name) => write!(f, "killed by {name}"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            JobEnd::Lost(reason) => write!(f, "lost: {reason}"),
        }
    }
}

/// Where the job's standard streams go: captured or thrown away (metadata-only
/// runs), both with `/dev/null` as stdin, or the caller's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Capture,
    Discard,
    /// The caller's own stdin, stdout and stderr (`exec`): the command reads
    /// and writes them directly, as under `manage.py`, with no copy in
    /// between (so a terminal stays a terminal and large output costs nothing).
    Inherit,
}

/// Why a job is being stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM to the process group, SIGKILL if still alive after the grace.
    Graceful(Duration),
    /// SIGKILL at once.
    Kill,
}

pub struct Job {
    pub id: JobId,
    pub pid: u32,
    /// The command's stdout; `None` when output is discarded.
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    end: Option<oneshot::Receiver<JobEnd>>,
    ended: Option<JobEnd>,
    control: Control,
}

pub(super) enum Control {
    /// Forked by the worker, which signals it on our behalf.
    Worker(Arc<Connection>),
    /// A subprocess of ours; `exited` is set once it has been reaped.
    Subprocess { exited: Arc<AtomicBool> },
}

/// Descriptors for one job: what the command reads and writes, and what we
/// read from (`None` when nothing is captured).
pub(super) struct JobOutputs {
    pub stdin: OwnedFd,
    pub stdout_write: OwnedFd,
    pub stderr_write: OwnedFd,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

impl JobOutputs {
    pub fn new(output: Output) -> std::io::Result<Self> {
        let null_stdin = || std::fs::File::open("/dev/null").map(OwnedFd::from);
        match output {
            Output::Capture => {
                let (stdout_read, stdout_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                let (stderr_read, stderr_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                Ok(Self {
                    stdin: null_stdin()?,
                    stdout_write,
                    stderr_write,
                    stdout: Some(pipe::Receiver::from_owned_fd(stdout_read)?),
                    stderr: Some(pipe::Receiver::from_owned_fd(stderr_read)?),
                })
            }
            Output::Discard => {
                let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
                Ok(Self {
                    stdin: null_stdin()?,
                    stdout_write: OwnedFd::from(null.try_clone()?),
                    stderr_write: OwnedFd::from(null),
                    stdout: None,
                    stderr: None,
                })
            }
            Output::Inherit => Ok(Self {
                // Duplicates (close-on-exec): the job gets the very same open
                // files; one we were started without is /dev/null for it too.
                stdin: inherited(std::io::stdin().as_fd(), false)?,
                stdout_write: inherited(std::io::stdout().as_fd(), true)?,
                stderr_write: inherited(std::io::stderr().as_fd(), true)?,
                stdout: None,
                stderr: None,
            }),
        }
    }
}

/// A duplicate of one of our standard descriptors, or `/dev/null` if it is closed.
fn inherited(fd: std::os::fd::BorrowedFd<'_>, write: bool) -> std::io::Result<OwnedFd> {
    fd.try_clone_to_owned().or_else(|_| {
        std::fs::OpenOptions::new().read(!write).write(write).open("/dev/null").map(OwnedFd::from)
    })
}

impl Job {
    pub(super) fn new(
        id: JobId,
        pid: u32,
        outputs: (Option<pipe::Receiver>, Option<pipe::Receiver>),
        end: oneshot::Receiver<JobEnd>,
        control: Control,
    ) -> Self {
        Self { id, pid, stdout: outputs.0, stderr: outputs.1, end: Some(end), ended: None, control }
    }

    /// Waits for the job to end. Safe to call again, and to cancel (e.g.
    /// under a timeout): the outcome is kept once known.
    pub async fn wait(&mut self) -> JobEnd {
        if let Some(ended) = &self.ended {
            return ended.clone();
        }
        let outcome = match self.end.as_mut() {
            Some(end) => end.await.unwrap_or_else(|_| JobEnd::Lost("job tracking was dropped".into())),
            None => JobEnd::Lost("job tracking was dropped".into()),
        };
        self.ended = Some(outcome.clone());
        outcome
    }

    /// Sends `signal` to the job's whole process group (the command and
    /// anything it started), unless the job has already ended.
    pub async fn signal(&self, signal: Signal) {
        if self.ended.is_some() {
            return;
        }
        match &self.control {
            Control::Worker(connection) => {
                if let Err(err) = connection.signal(self.id, signal).await {
                    // The worker is gone; its reader task kills the group.
                    tracing::debug!(job = self.id, "could not signal through the worker: {err}");
                }
            }
            Control::Subprocess { exited } => {
                if !exited.load(Ordering::Acquire) {
                    let _ = killpg(Pid::from_raw(self.pid as i32), signal);
                }
            }
        }
    }

    /// Stops the job and waits for it to end.
    pub async fn stop(&mut self, how: Stop) -> JobEnd {
        match how {
            Stop::Kill => self.signal(Signal::SIGKILL).await,
            Stop::Graceful(grace) => {
                self.signal(Signal::SIGTERM).await;
                if let Ok(end) = tokio::time::timeout(grace, self.wait()).await {
                    return end;
                }
                self.signal(Signal::SIGKILL).await;
            }
        }
        self.wait().await
    }

    /// Waits for the job, stopping it if it runs past `timeout`. The flag
    /// says whether the timeout fired.
    pub async fn wait_or_stop_after(&mut self, timeout: Duration, how: Stop) -> (JobEnd, bool) {
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(end) => (end, false),
            Err(_) => (self.stop(how).await, true),
        }
    }
}
