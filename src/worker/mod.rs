//! The Python side of the house, seen from the supervisor: a persistent
//! worker process with Django already set up, which forks a child per job.
//!
//! [`Worker`] hides the process's life cycle from its users. It starts the
//! worker, restarts it with backoff when it dies (jobs running at that moment
//! end as [`JobEnd::Lost`] with the reason), and recycles it after a number
//! of jobs or on request: the new worker takes new jobs while the old one
//! finishes its own and exits. Commands configured for the `spawn` isolation
//! mode bypass the worker and run as plain `manage.py` subprocesses.

mod connection;
mod foreground;
mod job;
mod process;
mod setup_options;
mod subprocess;

use crate::sync::LockExt;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};

pub use connection::RequestError;
pub use foreground::{die_like, wait_in_foreground, ForegroundEnd};
pub use job::{Job, JobEnd, Output, Stop};
pub use process::WORKER_SOURCE;
pub use setup_options::other_setup_asked;

use crate::backoff::Backoff;
use crate::ipc::{CommandInfo, ForkHazard, JobLimits, ParseOutcome};
use connection::Connection;
use job::{Control, JobOutputs};

/// Removes what belongs to the supervisor alone from a child's environment:
/// systemd's notify socket (only the main process speaks for the service)
/// and the supervisor's own configuration overrides. `DJANGOCOMMAND_API_KEY`
/// stays: a project's settings may read it, and commands run with the
/// project's settings anyway.
fn scrub_environment(command: &mut tokio::process::Command) {
    command.env_remove("NOTIFY_SOCKET");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DCSUPERVISOR_") {
            command.env_remove(name);
        }
    }
}

/// How a job is isolated from the supervisor and from other jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A fork of the preloaded worker (milliseconds per job).
    Fork,
    /// A fresh `python manage.py` subprocess (a full Django start per job).
    Spawn,
}

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub python: PathBuf,
    pub project_dir: PathBuf,
    pub settings_module: String,
    /// Extra environment for the worker and the jobs.
    pub env: BTreeMap<String, String>,
    /// Variables the worker needs while Django sets up (the API key, which
    /// `settings.py` may read), and that no job may see: they reach the
    /// worker over a pipe, it removes them from its environment after the
    /// set-up, and they are masked in its log lines.
    pub setup_env: BTreeMap<String, String>,
    pub startup_timeout: Duration,
    pub isolation: Isolation,
    /// Commands that always use [`Isolation::Spawn`].
    pub spawn_commands: BTreeSet<String>,
    /// Keep a job process forked ahead of time in the worker, so a job
    /// starts on a process that already exists (see docs/ipc.md, Jobs).
    pub prefork: bool,
    /// Start a fresh worker after this many jobs (`None`: never).
    pub recycle_after_jobs: Option<u64>,
    /// Start a fresh worker once the worker's own RSS exceeds this many
    /// bytes (`None`: never). Checked every [`RSS_CHECK_INTERVAL`].
    pub recycle_above_rss: Option<u64>,
    /// `Some(dir)` for a local `exec`: jobs run in the caller's directory
    /// with standard streams set up as a fresh interpreter would (buffered
    /// by file type, as `manage.py` run there). `None` for the runner: the
    /// project directory and unbuffered streams, so output streams live.
    pub caller_dir: Option<PathBuf>,
}

pub const RSS_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// What the worker said about itself in its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub pid: u32,
    pub python_version: String,
    pub django_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not start the Python interpreter {python:?}: {error}")]
    Spawn { python: String, error: std::io::Error },
    #[error("Django failed to set up in the worker:\n{traceback}")]
    DjangoSetup { traceback: String },
    #[error("the worker exited before saying hello ({status}); its output:\n{output}")]
    ExitedEarly { status: String, output: String },
    #[error("the worker did not finish starting within {0:?} (raise worker.startup_timeout if Django is slow to set up)")]
    Timeout(Duration),
    #[error("the worker speaks IPC protocol {theirs}, this supervisor {ours}")]
    ProtocolMismatch { theirs: u32, ours: u32 },
    #[error("protocol error during the worker's start: {0}")]
    Protocol(String),
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no worker is available: {0}")]
    NoWorker(String),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("could not set up the job's output pipes: {0}")]
    Pipes(std::io::Error),
    #[error("could not start the subprocess: {0}")]
    Subprocess(std::io::Error),
}

/// Handle to the worker; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    shared: Arc<Shared>,
}

struct Shared {
    /// Replaced on reload; a worker started after that uses the new options.
    opts: Mutex<WorkerOptions>,
    /// The worker taking new jobs; `None` while it is being (re)started.
    current: watch::Sender<Option<Arc<Connection>>>,
    /// Why the last start failed, for jobs that find no worker.
    last_start_error: Mutex<Option<String>>,
    next_job: AtomicU64,
    jobs_on_current: AtomicU64,
    recycle: Notify,
    shutdown: Notify,
    stopping: AtomicBool,
}

/// Backoff steps between restarts of a worker that keeps dying.
const RESTART_BACKOFF: [Duration; 6] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(15),
    Duration::from_secs(30),
];
/// A worker that lived this long is healthy again: its next restart is immediate.
const HEALTHY_UPTIME: Duration = Duration::from_secs(60);

impl Worker {
    /// Starts the first worker and waits for it, so start-up errors (a bad
    /// settings module, a missing interpreter) reach the caller directly.
    pub async fn start(opts: WorkerOptions) -> Result<Worker, StartError> {
        let first = Connection::open(&opts).await?;
        tracing::info!(
            pid = first.info.pid,
            python = %first.info.python_version,
            django = %first.info.django_version,
            "worker ready"
        );
        report_fork_hazards(&first, &opts).await;
        let (current, _) = watch::channel(Some(first.clone()));
        let shared = Arc::new(Shared {
            opts: Mutex::new(opts),
            current,
            last_start_error: Mutex::new(None),
            next_job: AtomicU64::new(1),
            jobs_on_current: AtomicU64::new(0),
            recycle: Notify::new(),
            shutdown: Notify::new(),
            stopping: AtomicBool::new(false),
        });
        tokio::spawn(keep_worker_alive(shared.clone(), first));
        Ok(Worker { shared })
    }

    /// The current worker's hello, if one is up.
    pub fn info(&self) -> Option<WorkerInfo> {
        self.shared.current.borrow().as_ref().map(|c| c.info.clone())
    }

    /// Every management command of the project, as the worker loaded them.
    pub async fn discover(&self) -> Result<Vec<CommandInfo>, JobError> {
        let connection = self.connection().await?;
        Ok(connection.discover(self.shared.opts().startup_timeout).await?)
    }

    /// How `command`'s own parser reads `args`, asked of the worker (which
    /// builds the parser exactly as a job would); nothing runs. Used by the
    /// argument rules, so abbreviations resolve as the command would.
    pub async fn parse_args(&self, command: &str, args: &[String]) -> Result<ParseOutcome, JobError> {
        let connection = self.connection().await?;
        Ok(connection.parse_args(command, args, self.shared.opts().startup_timeout).await?)
    }

    /// The values of the named Django settings (dotted paths, `*` for every
    /// key), as the worker's settings have them; used to mask secrets.
    pub async fn read_settings(&self, names: &[String]) -> Result<Vec<String>, JobError> {
        let connection = self.connection().await?;
        Ok(connection.read_settings(names, self.shared.opts().startup_timeout).await?)
    }

    /// What a fork of the worker would share with it or lose right now
    /// (open sockets and other descriptors, live threads, shared random
    /// generators); see docs/fidelity.md.
    pub async fn fork_hazards(&self) -> Result<Vec<ForkHazard>, JobError> {
        let connection = self.connection().await?;
        Ok(connection.fork_hazards(self.shared.opts().startup_timeout).await?)
    }

    /// Starts `command` with `args` (never through a shell).
    pub async fn spawn_job(&self, command: &str, args: &[String], output: Output) -> Result<Job, JobError> {
        self.spawn_limited(command, args, output, JobLimits::default()).await
    }

    /// [`Worker::spawn_job`] with resource limits on the job's process.
    pub async fn spawn_limited(
        &self,
        command: &str,
        args: &[String],
        output: Output,
        limits: JobLimits,
    ) -> Result<Job, JobError> {
        let id = self.shared.next_job.fetch_add(1, Ordering::Relaxed);
        let outputs = JobOutputs::new(output).map_err(JobError::Pipes)?;
        let opts = self.shared.opts();
        if opts.isolation == Isolation::Spawn || opts.spawn_commands.contains(command) {
            return subprocess::start(&opts, id, command, args, outputs, limits)
                .map_err(JobError::Subprocess);
        }
        // The preloaded worker has one set-up; a job asking for another
        // (`--settings`, `--pythonpath`) runs exactly as manage.py would.
        if let Some(asked) = other_setup_asked(args, &opts.settings_module) {
            tracing::info!(job = id, "{asked}: {command} runs as a fresh manage.py, not forked");
            return subprocess::start(&opts, id, command, args, outputs, limits)
                .map_err(JobError::Subprocess);
        }
        // A reload or recycle may retire the worker between our choosing it
        // and the job reaching it: the job then goes to its successor.
        loop {
            let connection = self.connection().await?;
            if let Some(hazard) = data_corrupting_hazard(&connection, &opts).await {
                tracing::warn!(
                    job = id,
                    "{command} runs as a fresh manage.py, not forked: the worker holds {}, which a fork would share",
                    hazard.detail
                );
                return subprocess::start(&opts, id, command, args, outputs, limits)
                    .map_err(JobError::Subprocess);
            }
            let stdio = [outputs.stdin.as_fd(), outputs.stdout_write.as_fd(), outputs.stderr_write.as_fd()];
            match connection.run(id, command, args, limits, stdio).await {
                Err(RequestError::Retired) => {
                    tracing::debug!(job = id, "the worker is retiring; the job goes to the next one");
                }
                Err(error) => return Err(error.into()),
                Ok((pid, end)) => {
                    // Our copies of the job's ends close here, so its pipes reach EOF.
                    let JobOutputs { stdout, stderr, .. } = outputs;
                    self.count_job_for_recycling();
                    return Ok(Job::new(id, pid, (stdout, stderr), end, Control::Worker(connection)));
                }
            }
        }
    }

    /// Starts a fresh worker for new jobs; the current one finishes its jobs
    /// and exits. Used on reload so newly deployed code is picked up: from
    /// this call on, new jobs wait for the fresh worker.
    pub fn recycle(&self) {
        self.shared.current.send_replace(None);
        self.shared.recycle.notify_one();
    }

    /// Uses `opts` from now on and recycles the worker, so freshly deployed
    /// code (and changed settings) are picked up; running jobs finish on the
    /// old worker.
    pub fn reconfigure(&self, opts: WorkerOptions) {
        *self.shared.opts.locked() = opts;
        self.recycle();
    }

    /// Stops the worker now; jobs still running on it are killed with it.
    pub async fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.shutdown.notify_one();
        if let Some(connection) = self.shared.current.send_replace(None) {
            connection.close().await;
        }
    }

    fn count_job_for_recycling(&self) {
        let done = self.shared.jobs_on_current.fetch_add(1, Ordering::Relaxed) + 1;
        if self.shared.opts().recycle_after_jobs.is_some_and(|limit| done >= limit) {
            self.shared.jobs_on_current.store(0, Ordering::Relaxed);
            self.recycle();
        }
    }

    /// The worker taking jobs, waiting (up to the start-up timeout) while it restarts.
    async fn connection(&self) -> Result<Arc<Connection>, JobError> {
        let mut current = self.shared.current.subscribe();
        let wait = current.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_closed()));
        let live = match tokio::time::timeout(self.shared.opts().startup_timeout, wait).await {
            Ok(Ok(connection)) => connection.clone(),
            _ => None,
        };
        match live {
            Some(connection) => Ok(connection),
            None => {
                let last = self.shared.last_start_error.locked().clone();
                Err(JobError::NoWorker(last.unwrap_or_else(|| "the worker is restarting".into())))
            }
        }
    }
}

impl Shared {
    fn opts(&self) -> WorkerOptions {
        self.opts.locked().clone()
    }
}

/// Watches the worker taking jobs: restarts it when it dies, replaces it on
/// recycle, and stops on shutdown.
async fn keep_worker_alive(shared: Arc<Shared>, mut connection: Arc<Connection>) {
    let mut restarts = Backoff::schedule(&RESTART_BACKOFF).without_jitter();
    // When the current worker came up (not when this loop last turned: the
    // memory check turns it every few seconds).
    let mut started = tokio::time::Instant::now();
    let mut rss_check = tokio::time::interval(RSS_CHECK_INTERVAL);
    loop {
        let rss_limit = shared.opts().recycle_above_rss;
        // Whether the worker crashed (then the restart waits its backoff step).
        let crashed = tokio::select! {
            _ = rss_check.tick(), if rss_limit.is_some() => {
                let pid = connection.info.pid;
                match (crate::procfs::resident_bytes(pid), rss_limit) {
                    (Some(rss), Some(limit)) if rss > limit => {
                        tracing::info!(pid, rss, limit, "worker above its memory limit; recycling it");
                        shared.current.send_replace(None);
                        connection.retire().await;
                        false
                    }
                    _ => continue,
                }
            }
            reason = connection.closed() => {
                stop_offering(&shared, &connection);
                tracing::warn!("{reason}; restarting the worker");
                if started.elapsed() >= HEALTHY_UPTIME {
                    restarts.reset();
                }
                true
            }
            _ = shared.recycle.notified() => {
                // A recycle asked for while this worker was starting finds it
                // offered to jobs: new ones must wait for its successor.
                stop_offering(&shared, &connection);
                let jobs = connection.running_jobs();
                tracing::info!(pid = connection.info.pid, jobs, "recycling the worker; it exits once its jobs end");
                connection.retire().await;
                restarts.reset();
                false
            }
            _ = shared.shutdown.notified() => return,
        };
        connection = start_with_backoff(&shared, &mut restarts, crashed).await;
        crate::health::metrics().worker_restarted();
        started = tokio::time::Instant::now();
        if shared.stopping.load(Ordering::Acquire) {
            connection.close().await;
            return;
        }
        shared.current.send_replace(Some(connection.clone()));
    }
}

/// Takes `connection` out of `current`, unless another (or none) is offered already.
fn stop_offering(shared: &Shared, connection: &Arc<Connection>) {
    shared.current.send_if_modified(|current| {
        let is_this = current.as_ref().is_some_and(|c| Arc::ptr_eq(c, connection));
        if is_this {
            *current = None;
        }
        is_this
    });
}

/// Logs, once per worker, what its forks would share or lose, with the fix.
async fn report_fork_hazards(connection: &Connection, opts: &WorkerOptions) {
    if opts.isolation == Isolation::Spawn {
        return;
    }
    match connection.fork_hazards(opts.startup_timeout).await {
        Ok(hazards) => {
            for hazard in hazards {
                tracing::warn!(kind = ?hazard.kind, "fork hazard: {}; {}", hazard.detail, FORK_HAZARD_FIX);
            }
        }
        Err(err) => tracing::warn!("could not inspect the worker for fork hazards: {err}"),
    }
}

/// What to do about a fork hazard; the details are in docs/fidelity.md.
pub const FORK_HAZARD_FIX: &str = "reinitialise it after fork with os.register_at_fork(after_in_child=...), \
     or run the commands concerned with worker.spawn_commands (or worker.isolation = \"spawn\"); see docs/fidelity.md";

/// A hazard that would corrupt data if the job were forked now (asked at
/// every job: a project can open a connection in the worker at any time).
async fn data_corrupting_hazard(connection: &Connection, opts: &WorkerOptions) -> Option<ForkHazard> {
    match connection.fork_hazards(opts.startup_timeout).await {
        Ok(hazards) => hazards.into_iter().find(|hazard| hazard.kind.corrupts_data()),
        // The job's own request will meet the same trouble and report it.
        Err(_) => None,
    }
}

/// Starts a worker (after a wait if `crashed`), waiting longer between
/// attempts the more have failed.
async fn start_with_backoff(shared: &Shared, restarts: &mut Backoff, crashed: bool) -> Arc<Connection> {
    let mut wait = crashed;
    loop {
        if wait {
            restarts.wait(None).await;
        }
        wait = true;
        match Connection::open(&shared.opts()).await {
            Ok(connection) => {
                *shared.last_start_error.locked() = None;
                tracing::info!(pid = connection.info.pid, "worker ready");
                report_fork_hazards(&connection, &shared.opts()).await;
                return connection;
            }
            Err(err) => {
                tracing::error!("worker failed to start: {err}");
                *shared.last_start_error.locked() = Some(err.to_string());
            }
        }
    }
}
