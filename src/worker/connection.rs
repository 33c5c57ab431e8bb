//! One live worker process and the conversation with it: the handshake, the
//! requests we send, and a reader task that routes its events to whoever is
//! waiting (a job's start, a job's exit, a discovery).
//!
//! The worker is not trusted with anything that could hurt the supervisor:
//! the pids it reports must be its own (hello) or its children's (jobs),
//! never 0, 1 or ours, or `killpg` could hit the supervisor's own group or
//! the whole system. A worker that breaks the protocol is killed and its
//! jobs failed; the manager starts a fresh one.
//!
//! When the conversation ends for any reason (the worker died, sent a frame
//! we cannot decode, or was told to shut down), every job still waiting is
//! told so with the reason, and the job's process groups are killed so
//! nothing the dead worker started keeps running unsupervised.

use crate::sync::LockExt;
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::net::unix::OwnedReadHalf;
use tokio::process::Child;
use tokio::sync::{oneshot, watch};

use super::process::{self, StderrTail};
use super::{JobEnd, StartError, WorkerInfo, WorkerOptions};
use crate::ipc::{
    CommandInfo, Event, ExitStatus, ForkHazard, FrameError, FrameReader, FrameWriter, JobId, JobLimits,
    LogLevel, ParseOutcome, Request, PROTOCOL_VERSION,
};

/// How long a worker has to answer a `Run` with `JobStarted`.
const JOB_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the worker is gone: {0}")]
    WorkerGone(String),
    #[error("could not send to the worker: {0}")]
    Send(#[from] FrameError),
    #[error("the worker did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("the worker could not start the job: {0}")]
    JobFailed(String),
    /// The worker was asked to exit once its jobs end (a reload or a
    /// recycle) before this job reached it: the job belongs to its successor.
    #[error("the worker is retiring")]
    Retired,
}

pub(super) struct Connection {
    pub info: WorkerInfo,
    writer: tokio::sync::Mutex<FrameWriter>,
    state: Arc<Mutex<State>>,
    /// `Some(reason)` once the conversation is over.
    closed: watch::Receiver<Option<String>>,
    /// Ids of `ParseArgs` requests, so answers reach the right caller.
    next_request: AtomicU64,
    /// Set, under the writer's lock, when `Shutdown` is sent: a `Run` is
    /// either written before it (and runs here) or not sent at all.
    retired: AtomicBool,
}

#[derive(Default)]
struct State {
    jobs: HashMap<JobId, JobSlot>,
    discovery: Option<oneshot::Sender<Vec<CommandInfo>>>,
    /// `ParseArgs` requests waiting for their answer, by request id.
    parses: HashMap<u64, oneshot::Sender<ParseOutcome>>,
    /// `ReadSettings` requests waiting for their answer, by request id.
    setting_reads: HashMap<u64, oneshot::Sender<Vec<String>>>,
    /// `InspectFork` requests waiting for their answer, by request id.
    inspections: HashMap<u64, oneshot::Sender<Vec<ForkHazard>>>,
    ended: Option<String>,
}

#[derive(Default)]
struct JobSlot {
    pid: Option<u32>,
    started: Option<oneshot::Sender<Result<u32, String>>>,
    exited: Option<oneshot::Sender<JobEnd>>,
}

impl Connection {
    /// Starts a worker and waits for its hello.
    pub async fn open(opts: &WorkerOptions) -> Result<Arc<Self>, StartError> {
        let spawned = process::spawn(opts)
            .await
            .map_err(|error| StartError::Spawn { python: opts.python.display().to_string(), error })?;
        let (read, write) = spawned.socket.into_split();
        let mut reader = FrameReader::new(read);
        let mut child = spawned.child;

        let first = tokio::time::timeout(opts.startup_timeout, reader.next::<Event>()).await;
        let info = match first {
            Ok(Ok(Some(Event::Hello { protocol, pid, python_version, django_version }))) => {
                if protocol != PROTOCOL_VERSION {
                    return Err(StartError::ProtocolMismatch { theirs: protocol, ours: PROTOCOL_VERSION });
                }
                if Some(pid) != child.id() {
                    let _ = child.start_kill();
                    return Err(StartError::Protocol(format!(
                        "the worker says its pid is {pid}, but it is {}",
                        child.id().unwrap_or_default()
                    )));
                }
                WorkerInfo { pid, python_version, django_version }
            }
            Ok(Ok(Some(Event::StartupFailed { error, .. }))) => {
                let _ = child.wait().await;
                return Err(StartError::DjangoSetup { traceback: error });
            }
            Ok(Ok(Some(other))) => {
                return Err(StartError::Protocol(format!("expected a hello, got {other:?}")));
            }
            Ok(Ok(None)) => {
                let status = child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                // Let the output forwarder catch the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(StartError::ExitedEarly { status, output: spawned.stderr_tail.text() });
            }
            Ok(Err(err)) => return Err(StartError::Protocol(err.to_string())),
            Err(_) => return Err(StartError::Timeout(opts.startup_timeout)),
        };

        let state = Arc::new(Mutex::new(State::default()));
        let (closed_tx, closed) = watch::channel(None);
        tokio::spawn(read_events(reader, child, state.clone(), closed_tx, spawned.stderr_tail));
        Ok(Arc::new(Self {
            info,
            writer: tokio::sync::Mutex::new(FrameWriter::new(write)),
            state,
            closed,
            next_request: AtomicU64::new(1),
            retired: AtomicBool::new(false),
        }))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// Resolves with the reason once the conversation with this worker is over.
    pub async fn closed(&self) -> String {
        let mut closed = self.closed.clone();
        let reason = match closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "worker connection dropped".to_string(),
        };
        reason
    }

    pub fn running_jobs(&self) -> usize {
        self.lock().jobs.len()
    }

    pub async fn discover(&self, timeout: Duration) -> Result<Vec<CommandInfo>, RequestError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.lock();
            if let Some(reason) = &state.ended {
                return Err(RequestError::WorkerGone(reason.clone()));
            }
            state.discovery = Some(tx);
        }
        self.send(&Request::Discover, &[]).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(commands)) => Ok(commands),
            Ok(Err(_)) => Err(RequestError::WorkerGone(self.closed().await)),
            Err(_) => Err(RequestError::NoAnswer(timeout)),
        }
    }

    /// Asks the worker how `command`'s own parser reads `args` (nothing runs).
    pub async fn parse_args(
        &self,
        command: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<ParseOutcome, RequestError> {
        let make =
            |request| Request::ParseArgs { request, command: command.to_string(), args: args.to_vec() };
        self.ask(make, |state| &mut state.parses, timeout).await
    }

    /// The values of the named Django settings in the worker.
    pub async fn read_settings(
        &self,
        names: &[String],
        timeout: Duration,
    ) -> Result<Vec<String>, RequestError> {
        let make = |request| Request::ReadSettings { request, names: names.to_vec() };
        self.ask(make, |state| &mut state.setting_reads, timeout).await
    }

    /// What a fork of the worker would share or lose, looked at now.
    pub async fn fork_hazards(&self, timeout: Duration) -> Result<Vec<ForkHazard>, RequestError> {
        let make = |request| Request::InspectFork { request };
        self.ask(make, |state| &mut state.inspections, timeout).await
    }

    /// Sends a request carrying a fresh request id and waits for the answer
    /// the reader routes back through `waiting` (the map for that kind).
    async fn ask<T>(
        &self,
        make: impl FnOnce(u64) -> Request,
        waiting: fn(&mut State) -> &mut HashMap<u64, oneshot::Sender<T>>,
        timeout: Duration,
    ) -> Result<T, RequestError> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.lock();
            if let Some(reason) = &state.ended {
                return Err(RequestError::WorkerGone(reason.clone()));
            }
            waiting(&mut state).insert(request, tx);
        }
        if let Err(err) = self.send(&make(request), &[]).await {
            waiting(&mut self.lock()).remove(&request);
            return Err(err);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(RequestError::WorkerGone(self.closed().await)),
            Err(_) => {
                waiting(&mut self.lock()).remove(&request);
                Err(RequestError::NoAnswer(timeout))
            }
        }
    }

    /// Asks the worker to fork `command`; the three descriptors become the
    /// child's stdin, stdout and stderr. Returns the child's pid and a receiver for
    /// how the job ends.
    pub async fn run(
        &self,
        job: JobId,
        command: &str,
        args: &[String],
        limits: JobLimits,
        stdio: [BorrowedFd<'_>; 3],
    ) -> Result<(u32, oneshot::Receiver<JobEnd>), RequestError> {
        // First: a retired worker may already have exited (it does once its
        // jobs end), and that is no reason to fail a job its successor takes.
        if self.retired.load(Ordering::Acquire) {
            return Err(RequestError::Retired);
        }
        let (started_tx, started_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        {
            let mut state = self.lock();
            if let Some(reason) = &state.ended {
                return Err(RequestError::WorkerGone(reason.clone()));
            }
            let slot = JobSlot { pid: None, started: Some(started_tx), exited: Some(exited_tx) };
            state.jobs.insert(job, slot);
        }
        let request = Request::Run { job, command: command.to_string(), args: args.to_vec(), limits };
        let sent = {
            let mut writer = self.writer.lock().await;
            if self.retired.load(Ordering::Acquire) {
                Err(RequestError::Retired)
            } else {
                writer.send(&request, &stdio).await.map_err(RequestError::Send)
            }
        };
        if let Err(err) = sent {
            self.lock().jobs.remove(&job);
            return Err(err);
        }
        match tokio::time::timeout(JOB_START_TIMEOUT, started_rx).await {
            Ok(Ok(Ok(pid))) => Ok((pid, exited_rx)),
            Ok(Ok(Err(error))) => Err(RequestError::JobFailed(error)),
            Ok(Err(_)) => Err(RequestError::WorkerGone(self.closed().await)),
            Err(_) => {
                self.lock().jobs.remove(&job);
                // Should it start after all, it must not run unsupervised.
                let _ = self.signal(job, Signal::SIGKILL).await;
                Err(RequestError::NoAnswer(JOB_START_TIMEOUT))
            }
        }
    }

    /// Signals the job's process group through the worker, which knows
    /// whether the job is still alive (so a recycled pid is never hit).
    pub async fn signal(&self, job: JobId, signal: Signal) -> Result<(), RequestError> {
        self.send(&Request::Signal { job, signal: signal as i32 }, &[]).await
    }

    /// Asks the worker to exit once its running jobs have ended. A job on
    /// its way here is refused with [`RequestError::Retired`] instead of
    /// meeting a worker that would refuse it.
    pub async fn retire(&self) {
        let mut writer = self.writer.lock().await;
        self.retired.store(true, Ordering::Release);
        if let Err(err) = writer.send(&Request::Shutdown, &[]).await {
            tracing::debug!("retiring worker {}: {err}", self.info.pid);
        }
    }

    /// Ends the conversation now: the worker kills its jobs and exits.
    pub async fn close(&self) {
        if let Err(err) = self.writer.lock().await.close().await {
            tracing::debug!("closing worker {}: {err}", self.info.pid);
        }
    }

    async fn send(&self, request: &Request, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<(), RequestError> {
        self.writer.lock().await.send(request, fds).await.map_err(RequestError::Send)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }
}

async fn read_events(
    mut reader: FrameReader<OwnedReadHalf>,
    mut child: Child,
    state: Arc<Mutex<State>>,
    closed: watch::Sender<Option<String>>,
    stderr_tail: StderrTail,
) {
    let pid = child.id().unwrap_or_default();
    let reason = loop {
        match reader.next::<Event>().await {
            Ok(Some(event)) => {
                if let Err(violation) = route(event, &state, pid) {
                    break Some(format!("protocol violation by worker {pid}: {violation}"));
                }
            }
            Ok(None) => break None,
            Err(err) => break Some(format!("protocol error from worker {pid}: {err}")),
        }
    };
    // A worker that broke the protocol cannot be trusted with its jobs.
    if reason.is_some() {
        let _ = child.start_kill();
    }
    let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        Ok(Err(err)) => err.to_string(),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            "killed after closing its socket without exiting".to_string()
        }
    };
    let reason = reason.unwrap_or_else(|| {
        let tail = stderr_tail.text();
        let tail = tail.trim_end();
        if tail.is_empty() {
            format!("worker {pid} exited ({status})")
        } else {
            format!("worker {pid} exited ({status}); its last output:\n{tail}")
        }
    });
    end_all_jobs(&state, &reason);
    let _ = closed.send(Some(reason));
}

/// Hands an event to whoever waits for it; `Err` when the worker broke the
/// protocol (the conversation then ends).
fn route(event: Event, state: &Mutex<State>, worker_pid: u32) -> Result<(), String> {
    let mut state = state.locked();
    match event {
        Event::JobStarted { job, pid } => {
            check_job_pid(pid, worker_pid)?;
            if let Some(slot) = state.jobs.get_mut(&job) {
                slot.pid = Some(pid);
                if let Some(started) = slot.started.take() {
                    let _ = started.send(Ok(pid));
                }
            }
        }
        Event::JobFailed { job, error } => {
            if let Some(mut slot) = state.jobs.remove(&job) {
                if let Some(started) = slot.started.take() {
                    let _ = started.send(Err(error));
                }
            }
        }
        Event::JobExited { job, status } => {
            check_exit_status(status)?;
            if let Some(mut slot) = state.jobs.remove(&job) {
                if let Some(exited) = slot.exited.take() {
                    let _ = exited.send(JobEnd::Exited(status));
                }
            }
        }
        Event::Commands { commands } => {
            if let Some(waiting) = state.discovery.take() {
                let _ = waiting.send(commands);
            }
        }
        Event::ParsedArgs { request, result } => {
            if let Some(waiting) = state.parses.remove(&request) {
                let _ = waiting.send(result);
            }
        }
        Event::SettingValues { request, values } => {
            if let Some(waiting) = state.setting_reads.remove(&request) {
                let _ = waiting.send(values);
            }
        }
        Event::ForkHazards { request, hazards } => {
            if let Some(waiting) = state.inspections.remove(&request) {
                let _ = waiting.send(hazards);
            }
        }
        Event::Log { level, message } => log_from_worker(level, &message),
        Event::Hello { .. } | Event::StartupFailed { .. } => {
            tracing::warn!("worker sent a second hello; ignored");
        }
    }
    Ok(())
}

/// A job's pid must be a process the worker forked: above 1, neither the
/// worker nor the supervisor, and the worker's child. A job already reaped
/// (gone from /proc) passes: it ran and ended before we looked.
fn check_job_pid(pid: u32, worker_pid: u32) -> Result<(), String> {
    if pid <= 1 || pid == worker_pid || pid == std::process::id() || i32::try_from(pid).is_err() {
        return Err(format!("job pid {pid} cannot be a job of this worker"));
    }
    match crate::procfs::stat(pid).map(|stat| stat.parent) {
        Some(parent) if parent != worker_pid => {
            Err(format!("job pid {pid} is not a child of the worker (its parent is {parent})"))
        }
        _ => Ok(()),
    }
}

/// An exit status is what `waitpid` can report: a code of 0 to 255, or a
/// signal number (the supervisor negates it and adds 128 to it).
fn check_exit_status(status: ExitStatus) -> Result<(), String> {
    match status {
        ExitStatus::Code { code } if (0..=255).contains(&code) => Ok(()),
        ExitStatus::Signal { signal } if (1..=64).contains(&signal) => Ok(()),
        other => Err(format!("{other:?} is not an exit status a process can have")),
    }
}

fn log_from_worker(level: LogLevel, message: &str) {
    match level {
        LogLevel::Debug => tracing::debug!(target: "dcsupervisor::worker::python", "{message}"),
        LogLevel::Info => tracing::info!(target: "dcsupervisor::worker::python", "{message}"),
        LogLevel::Warning => tracing::warn!(target: "dcsupervisor::worker::python", "{message}"),
        LogLevel::Error => tracing::error!(target: "dcsupervisor::worker::python", "{message}"),
    }
}

/// Fails every job still waiting on this worker and kills what it left.
fn end_all_jobs(state: &Mutex<State>, reason: &str) {
    let mut state = state.locked();
    state.ended = Some(reason.to_string());
    state.discovery = None;
    state.parses.clear();
    state.setting_reads.clear();
    state.inspections.clear();
    for (job, mut slot) in state.jobs.drain() {
        if let Some(pid) = slot.pid {
            // The job led its own process group; without the worker nobody
            // else would end it.
            if let Ok(pid) = i32::try_from(pid) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Some(started) = slot.started.take() {
            let _ = started.send(Err(reason.to_string()));
        }
        if let Some(exited) = slot.exited.take() {
            tracing::debug!(job, "job lost with its worker");
            let _ = exited.send(JobEnd::Lost(reason.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_those_of_real_processes() {
        assert_eq!(check_exit_status(ExitStatus::Code { code: 0 }), Ok(()));
        assert_eq!(check_exit_status(ExitStatus::Code { code: 255 }), Ok(()));
        assert_eq!(check_exit_status(ExitStatus::Signal { signal: 9 }), Ok(()));
        for bad in [
            ExitStatus::Code { code: -1 },
            ExitStatus::Code { code: 256 },
            ExitStatus::Signal { signal: i32::MIN },
        ] {
            assert!(check_exit_status(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_job_pid_must_be_a_child_of_the_worker() {
        let worker = std::process::id();
        for pid in [0, 1, worker, u32::MAX] {
            assert!(check_job_pid(pid, worker).is_err(), "{pid}");
        }
        // Our parent is not our child.
        let parent = crate::procfs::stat(worker).unwrap().parent;
        assert!(check_job_pid(parent, worker).unwrap_err().contains("not a child of the worker"));
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        assert_eq!(check_job_pid(child.id(), worker), Ok(()));
        let _ = child.kill();
        let _ = child.wait();
        // Reaped already: it was a job that ended before we looked.
        assert_eq!(check_job_pid(child.id(), worker), Ok(()));
    }

    /// Failed before: an `InspectFork` waiting when the worker died kept
    /// its sender, so its caller waited out the timeout instead of hearing
    /// that the worker is gone.
    #[test]
    fn every_waiting_request_hears_that_the_worker_is_gone() {
        let state = Mutex::new(State::default());
        let (parse, mut parse_rx) = oneshot::channel();
        let (settings, mut settings_rx) = oneshot::channel();
        let (inspection, mut inspection_rx) = oneshot::channel();
        {
            let mut state = state.locked();
            state.parses.insert(1, parse);
            state.setting_reads.insert(2, settings);
            state.inspections.insert(3, inspection);
        }
        end_all_jobs(&state, "gone");
        assert!(parse_rx.try_recv().is_err() && settings_rx.try_recv().is_err());
        assert_eq!(inspection_rx.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(256))]

        /// Whatever a (possibly compromised) worker says, routing it never
        /// panics: it reaches its waiter, is ignored, or ends the conversation.
        #[test]
        fn any_event_is_routed_or_refused_never_a_panic(
            events in proptest::collection::vec(crate::ipc::strategies::event(), 1..8),
        ) {
            let state = Mutex::new(State::default());
            for event in events {
                let exit = match &event {
                    Event::JobExited { status, .. } => Some(*status),
                    _ => None,
                };
                let routed = route(event, &state, std::process::id());
                if let Some(status) = exit {
                    proptest::prop_assert_eq!(routed.is_ok(), check_exit_status(status).is_ok());
                }
            }
        }
    }
}
