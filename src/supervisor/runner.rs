//! The runner: what keeps this host in touch with the control plane.
//!
//! Two loops share the [`AuthGate`]. The heartbeat loop reports versions and
//! the commands hash, syncs the command list when the server says it is out
//! of sync, follows suspension, and walks the authentication backoff
//! schedule after a 401/403. The poll loop fetches pending executions while
//! authenticated and active, and only when a slot is free; it polls at once
//! when a slot frees up or a heartbeat reports pending work. What a poll
//! hands out beyond the free slots (or what a per-command limit holds back)
//! is kept in a backlog and started when a slot frees, never dropped: a
//! control plane may offer an execution only once. A refused `start` (another
//! runner won the race) backs off both that execution and the polling.
//! Every wait between retries is a [`Backoff`]. Each execution runs in its
//! own task ([`execution::run`]) inside a span carrying its id and command.
//!
//! Everything a reload may change lives in [`Live`], swapped as a whole:
//! loops read the current one at each turn, while a running execution keeps
//! the settings it started with.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use super::admission::concurrency::{self, CommandLimit, Slot};
use super::admission::Rejection;
use super::client::{ApiError, Client};
use super::commands::synced_commands;
use super::delivery::{AuthGate, AuthState};
use super::execution::{self, ExecutionContext, ExecutionSettings, Outcome};
use super::journal::Journal;
use super::outbox::{SpoolOptions, SpoolUsage, COMPLETION_EXTENSION, LOG_EXTENSION};
use super::redact::{Redactor, MIN_SECRET_LEN};
use super::systemd;
use crate::backoff::Backoff;
use crate::ipc::CommandInfo;
use crate::protocol::api::{
    Execution, ExecutionId, HeartbeatRequest, HeartbeatResponse, RunnerState, SyncRequest,
};
use crate::protocol::commands::{commands_hash, BoundArgs, SyncedCommand};
use crate::sync::{LockExt as _, RwLockExt as _};
use crate::worker::{JobError, Worker, WorkerOptions};

/// Retry schedule of the heartbeat after an authentication failure.
const AUTH_BACKOFF: [Duration; 7] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(300),
];
/// While authentication is failing, its state is logged at most this often.
const AUTH_LOG_EVERY: Duration = Duration::from_secs(300);
/// Longest pause of the polling after failed polls or refused starts.
const MAX_POLL_BACKOFF: Duration = Duration::from_secs(60);
/// Longest an execution whose `start` was refused is left alone.
const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(300);
/// Executions kept waiting for a slot beyond this are left to the server
/// (a bound on memory, far above any sane queue of one runner).
const MAX_BACKLOG: usize = 1000;

#[derive(Debug, Clone)]
pub struct RunnerOptions {
    pub runner_version: String,
    pub heartbeat_interval: Duration,
    pub poll_interval: Duration,
    pub max_concurrent: usize,
    /// How long running executions may go on after a shutdown request
    /// before they are cancelled.
    pub shutdown_grace: Duration,
    /// Upper bound on delivering the last output and completions at shutdown.
    pub delivery_deadline: Duration,
    /// The state directory (already created, private).
    pub state_dir: std::path::PathBuf,
    /// Output kept in memory per execution while it cannot go to its log.
    pub outbox_memory_bytes: usize,
    /// Caps of one execution's output log and of all of them.
    pub spool_max_bytes: u64,
    pub state_dir_max_bytes: u64,
    /// Per-command limits on executions running at once (e.g. one `migrate`).
    pub command_limits: BTreeMap<String, CommandLimit>,
}

/// Everything the runner is built from; a reload brings a new one.
pub struct RunnerSetup {
    pub client: Client,
    pub settings: ExecutionSettings,
    pub opts: RunnerOptions,
    pub bound_args_labels: BTreeMap<String, Vec<BoundArgs>>,
}

/// What the process asks of a running runner.
pub enum Event {
    /// Apply a new configuration and start a fresh worker.
    Reload(Box<RunnerSetup>, Box<WorkerOptions>),
    /// Stop: gracefully the first time, at once the second.
    Shutdown,
}

/// The part of the runner a reload replaces.
struct Live {
    client: Client,
    opts: RunnerOptions,
    settings: Arc<ExecutionSettings>,
    synced: Vec<SyncedCommand>,
    hash: Mutex<String>,
}

pub struct Runner {
    worker: Worker,
    gate: AuthGate,
    live: RwLock<Arc<Live>>,
    /// The last successful discovery, reused if a reload's worker cannot start.
    discovered: Mutex<Vec<CommandInfo>>,
    journal: Option<Journal>,
    /// What the output logs take, against `state_dir_max_bytes`.
    spool_usage: Arc<SpoolUsage>,
    suspended: watch::Sender<bool>,
    /// Executions taken by this runner, with their command.
    running: Mutex<HashMap<ExecutionId, String>>,
    /// Offered by the control plane, not started yet (no free slot, or a
    /// per-command limit), oldest first.
    backlog: Mutex<VecDeque<Execution>>,
    /// Paces polling and starting after failures and refusals.
    pacing: Mutex<Pacing>,
    poll_now: Notify,
    heartbeat_now: Notify,
    abort: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

impl Runner {
    /// Discovers the project's commands and prepares what is synced. With a
    /// journal, executions in flight are recorded so a restart can report them.
    pub async fn new(
        worker: Worker,
        setup: RunnerSetup,
        journal: Option<Journal>,
    ) -> Result<Arc<Self>, JobError> {
        let discovered = worker.discover().await?;
        let mut setup = setup;
        add_setting_secrets(&worker, &mut setup.settings).await;
        let spool_usage = Arc::new(SpoolUsage::scan(&spool_dir(&setup.opts), setup.opts.state_dir_max_bytes));
        let live = Live::new(setup, &discovered);
        Ok(Arc::new(Self {
            spool_usage,
            worker,
            gate: AuthGate::default(),
            live: RwLock::new(Arc::new(live)),
            discovered: Mutex::new(discovered),
            journal,
            suspended: watch::channel(false).0,
            running: Mutex::new(HashMap::new()),
            backlog: Mutex::new(VecDeque::new()),
            pacing: Mutex::new(Pacing::new()),
            poll_now: Notify::new(),
            heartbeat_now: Notify::new(),
            abort: watch::channel(false).0,
            tasks: Mutex::new(JoinSet::new()),
        }))
    }

    /// One heartbeat (and a sync if the server asks for one).
    pub async fn run_once(&self) -> Result<HeartbeatResponse, ApiError> {
        self.heartbeat().await
    }

    /// Runs until a shutdown event: recovers what a previous run left in the
    /// journal, heartbeats, polls and executes, and applies reloads. On the
    /// first shutdown it stops polling, lets running executions finish
    /// within the grace period (cancelling the rest) and delivers their
    /// output and completions; a second shutdown stops at once.
    pub async fn run(self: Arc<Self>, mut events: mpsc::Receiver<Event>) {
        self.recover_journal();
        let heartbeats = tokio::spawn(self.clone().heartbeat_loop());
        let polling = tokio::spawn(self.clone().poll_loop());
        // Until a shutdown (or every sender is gone).
        while let Some(Event::Reload(setup, worker_opts)) = events.recv().await {
            self.reload(*setup, *worker_opts).await;
        }
        systemd::stopping();
        polling.abort();
        self.shut_down(&mut events).await;
        heartbeats.abort();
        self.worker.shutdown().await;
    }

    async fn shut_down(&self, events: &mut mpsc::Receiver<Event>) {
        let mut tasks = std::mem::take(&mut *self.lock_tasks());
        let opts = self.live().opts.clone();
        if !tasks.is_empty() {
            tracing::info!(running = tasks.len(), grace = ?opts.shutdown_grace, "shutting down: waiting for running executions");
        }
        let at_once = async {
            while let Some(event) = events.recv().await {
                if matches!(event, Event::Shutdown) {
                    return;
                }
            }
            std::future::pending().await
        };
        tokio::pin!(at_once);
        tokio::select! {
            _ = tokio::time::timeout(opts.shutdown_grace, join_all(&mut tasks)) => {}
            _ = &mut at_once => {
                tracing::warn!(running = tasks.len(), "second stop request: stopping at once");
                return;
            }
        }
        if tasks.is_empty() {
            return;
        }
        tracing::warn!(running = tasks.len(), "grace period over: cancelling the remaining executions");
        self.abort.send_replace(true);
        let bound = self.live().settings.cancel_grace + opts.delivery_deadline;
        tokio::select! {
            finished = tokio::time::timeout(bound, join_all(&mut tasks)) => {
                if finished.is_err() {
                    tracing::error!("gave up delivering the last results of {} executions", tasks.len());
                }
            }
            _ = &mut at_once => tracing::warn!("second stop request: stopping at once"),
        }
    }

    /// Applies a new configuration: a fresh worker (running jobs finish on
    /// the old one), a new command list and hash, new policy and limits.
    async fn reload(&self, setup: RunnerSetup, worker_opts: WorkerOptions) {
        systemd::reloading();
        tracing::info!("reloading: starting a fresh worker with the new configuration");
        self.worker.reconfigure(worker_opts);
        let discovered = match self.worker.discover().await {
            Ok(discovered) => {
                *self.lock_discovered() = discovered.clone();
                discovered
            }
            Err(error) => {
                tracing::error!(
                    "the new worker could not list the commands ({error}); keeping the previous list"
                );
                self.lock_discovered().clone()
            }
        };
        let mut setup = setup;
        add_setting_secrets(&self.worker, &mut setup.settings).await;
        let live = Live::new(setup, &discovered);
        let changed = *live.lock_hash() != *self.live().lock_hash();
        *self.live.write_locked() = Arc::new(live);
        // Always: the new URL, key or CA is tried at once (a reload that
        // fixed `server.ca_file` must not wait out the failed heartbeats'
        // backoff, up to `heartbeat_interval`), and a changed list synced.
        self.heartbeat_now.notify_one();
        self.poll_now.notify_one();
        systemd::ready("reloaded");
        crate::health::metrics().reload_ended(true);
        tracing::info!(commands_changed = changed, "reload applied");
    }

    /// Reports executions a previous run left unfinished.
    fn recover_journal(self: &Arc<Self>) {
        let Some(journal) = &self.journal else { return };
        let live = self.live();
        let entries = journal.entries();
        self.remove_orphan_logs(&live, &entries);
        for entry in entries {
            let spool = self.spool_options(&live);
            let (client, gate, journal) = (live.client.clone(), self.gate.clone(), journal.clone());
            let shaping = live.settings.shaping();
            let span = execution_span(&entry.id, &entry.command);
            // Counted as running while it is recovered, so the poller never
            // takes it too (an execution whose `start` never got there is
            // still offered).
            self.lock_running().insert(entry.id.clone(), entry.command.clone());
            let (runner, id) = (self.clone(), entry.id.clone());
            let recovery = execution::recover(client, gate, journal, spool, shaping, entry);
            self.lock_tasks().spawn(
                async move {
                    recovery.await;
                    runner.lock_running().remove(&id);
                    runner.poll_now.notify_one();
                }
                .instrument(span),
            );
        }
    }

    /// A log without a journal entry belongs to an execution whose
    /// completion was delivered (the entry goes last): nothing to recover.
    fn remove_orphan_logs(&self, live: &Live, entries: &[super::journal::Entry]) {
        let dir = spool_dir(&live.opts);
        let Ok(listing) = std::fs::read_dir(&dir) else { return };
        for file in listing.flatten() {
            let path = file.path();
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let known = entries.iter().any(|entry| entry.id.as_str() == stem);
            let ours = path.extension().is_some_and(|e| e == LOG_EXTENSION || e == COMPLETION_EXTENSION);
            if !known && ours {
                tracing::info!("removing the output log {} (its execution was completed)", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
        self.spool_usage.recount(&dir);
    }

    fn spool_options(&self, live: &Live) -> SpoolOptions {
        SpoolOptions {
            dir: spool_dir(&live.opts),
            memory_limit: live.opts.outbox_memory_bytes,
            max_bytes: live.opts.spool_max_bytes,
            usage: self.spool_usage.clone(),
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut auth_backoff = Backoff::schedule(&AUTH_BACKOFF);
        let mut last_auth_log: Option<Instant> = None;
        let mut auth = self.gate.subscribe();
        let mut announced = false;
        let mut failures = Backoff::exponential(Duration::from_secs(1), self.live().opts.heartbeat_interval);
        loop {
            let interval = self.live().opts.heartbeat_interval;
            let result = self.heartbeat().await;
            if !announced {
                // Ready once the first heartbeat was tried, whatever its outcome:
                // an unreachable control plane must not fail the service's start.
                announced = true;
                systemd::ready(match &result {
                    Ok(_) => "connected to the control plane",
                    Err(_) => "running; the control plane has not answered yet",
                });
            }
            let wait = match result {
                Ok(_) => {
                    auth_backoff.reset();
                    failures.reset();
                    interval
                }
                Err(error) if error.is_auth() => {
                    let wait = auth_backoff.next_delay(None);
                    if last_auth_log.is_none_or(|at| at.elapsed() >= AUTH_LOG_EVERY) {
                        tracing::warn!("not authenticated ({error}); next heartbeat in {wait:?}");
                        last_auth_log = Some(Instant::now());
                    }
                    wait
                }
                Err(error) => {
                    // Soon, then less and less often, never later than the interval.
                    let wait = failures.next_delay(error.retry_after()).min(interval);
                    tracing::warn!("heartbeat failed: {error}; next one in {wait:?}");
                    wait
                }
            };
            let valid_now = self.gate.get() == AuthState::Valid;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.heartbeat_now.notified() => {}
                // Another call was refused: start the backoff schedule now.
                _ = auth.wait_for(|state| *state == AuthState::Failed), if valid_now => {}
            }
        }
    }

    async fn heartbeat(&self) -> Result<HeartbeatResponse, ApiError> {
        let live = self.live();
        let info = self.worker.info();
        let request = HeartbeatRequest {
            runner_version: live.opts.runner_version.clone(),
            python_version: info.as_ref().map(|i| i.python_version.clone()).unwrap_or_default(),
            django_version: info.as_ref().map(|i| i.django_version.clone()).unwrap_or_default(),
            commands_hash: live.lock_hash().clone(),
        };
        let answer = live.client.heartbeat(&request).await.inspect_err(|e| self.gate.observe(e))?;
        crate::health::metrics().heartbeat_answered(live.opts.heartbeat_interval);
        // The runner state first: the poller waits for authentication, then
        // for not being suspended, and must not slip through in between.
        self.follow_runner_state(&answer);
        if self.gate.set(AuthState::Valid) {
            tracing::info!("authenticated with the control plane");
        }
        if !answer.commands_in_sync {
            self.sync(&live).await?;
        }
        if answer.pending_executions > 0 {
            self.poll_now.notify_one();
        }
        Ok(answer)
    }

    fn follow_runner_state(&self, answer: &HeartbeatResponse) {
        let suspended = answer.runner_state == RunnerState::Suspended;
        if self.suspended.send_if_modified(|current| std::mem::replace(current, suspended) != suspended) {
            let reason = answer.suspension_reason.as_deref().unwrap_or("no reason given");
            if suspended {
                tracing::warn!("runner suspended by the control plane ({reason}); polling paused");
                systemd::status(&format!("suspended by the control plane: {reason}"));
            } else {
                tracing::info!("runner active again; polling resumed");
                systemd::status("active");
            }
        }
    }

    async fn sync(&self, live: &Live) -> Result<(), ApiError> {
        let request = SyncRequest { commands: live.synced.clone() };
        let answer = live.client.sync_commands(&request).await.inspect_err(|e| self.gate.observe(e))?;
        let mut hash = live.lock_hash();
        if let Some(theirs) = answer.commands_hash.filter(|theirs| *theirs != *hash) {
            // Adopting it stops a disagreement from syncing on every heartbeat.
            tracing::warn!(ours = %hash, %theirs, "the control plane hashed our commands differently; using its hash");
            *hash = theirs;
        }
        tracing::info!(synced = answer.synced_count, "commands synced");
        Ok(())
    }

    async fn poll_loop(self: Arc<Self>) {
        let mut auth = self.gate.subscribe();
        let mut suspended = self.suspended.subscribe();
        loop {
            let _ = auth.wait_for(|state| *state == AuthState::Valid).await;
            let _ = suspended.wait_for(|suspended| !suspended).await;
            self.start_from_backlog();
            let mut wait = self.live().opts.poll_interval;
            let paused_until =
                self.lock_pacing().paused_until.filter(|until| *until > tokio::time::Instant::now());
            match paused_until {
                // Refused or failed starts: no polling until the pause ends
                // (what is already in the backlog may still start).
                Some(until) => wait = until - tokio::time::Instant::now(),
                None if self.free_slots() > self.lock_backlog().len() => {
                    if let Err(delay) = self.poll().await {
                        wait = delay;
                    }
                    self.start_from_backlog();
                }
                None => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.poll_now.notified() => {}
            }
        }
    }

    fn free_slots(&self) -> usize {
        self.live().opts.max_concurrent.saturating_sub(self.lock_running().len())
    }

    /// Fetches pending executions into the backlog. `Err(wait)`: the poll
    /// failed; try again after `wait`.
    async fn poll(&self) -> Result<(), Duration> {
        let live = self.live();
        let pending = match live.client.pending().await {
            Ok(pending) => {
                self.lock_pacing().polls.reset();
                pending
            }
            Err(error) => {
                self.gate.observe(&error);
                let wait = self.lock_pacing().polls.next_delay(error.retry_after());
                tracing::warn!("polling for executions failed: {error}; next poll in {wait:?}");
                return Err(wait);
            }
        };
        let mut offered = Vec::new();
        for raw in pending.executions {
            match serde_json::from_str::<Execution>(raw.get()) {
                Ok(execution) => offered.push(execution),
                Err(error) => tracing::warn!("ignoring an execution the control plane sent: {error}"),
            }
        }
        self.add_to_backlog(offered);
        Ok(())
    }

    /// Keeps what was offered and is neither running, waiting already, nor
    /// refused recently (ids compared in canonical form).
    fn add_to_backlog(&self, offered: Vec<Execution>) {
        let running = self.lock_running();
        let mut backlog = self.lock_backlog();
        let mut pacing = self.lock_pacing();
        let now = tokio::time::Instant::now();
        pacing.forget_old_refusals(now);
        for execution in offered {
            let known = running.contains_key(&execution.id) || backlog.iter().any(|e| e.id == execution.id);
            if known || pacing.is_refused(&execution.id, now) {
                continue;
            }
            if backlog.len() >= MAX_BACKLOG {
                tracing::warn!(
                    "{MAX_BACKLOG} executions already wait for a slot; leaving the rest queued on the server"
                );
                break;
            }
            backlog.push_back(execution);
        }
    }

    /// Starts waiting executions, oldest first, while slots are free; those a
    /// per-command limit holds back keep their place.
    fn start_from_backlog(self: &Arc<Self>) {
        let live = self.live();
        loop {
            let (execution, refusal) = {
                let mut running = self.lock_running();
                let mut backlog = self.lock_backlog();
                if running.len() >= live.opts.max_concurrent {
                    return;
                }
                let mut chosen = None;
                for (index, execution) in backlog.iter().enumerate() {
                    match concurrency::check(&running, &live.opts.command_limits, &execution.command) {
                        Ok(Slot::Wait) => continue, // keeps its place until one ends
                        Ok(Slot::Free) => chosen = Some((index, None)),
                        Err(rejection) => chosen = Some((index, Some(rejection))),
                    }
                    break;
                }
                let Some((index, refusal)) = chosen else { return };
                let Some(execution) = backlog.remove(index) else { return };
                running.insert(execution.id.clone(), execution.command.clone());
                (execution, refusal)
            };
            self.spawn_execution(&live, execution, refusal);
        }
    }

    fn spawn_execution(self: &Arc<Self>, live: &Live, execution: Execution, refusal: Option<Rejection>) {
        let runner = self.clone();
        let ctx = self.execution_context(live);
        let span = execution_span(&execution.id, &execution.command);
        let task = async move {
            let id = execution.id.clone();
            let outcome = match refusal {
                Some(rejection) => execution::reject(&ctx, &execution, rejection).await,
                None => execution::run(ctx, execution).await,
            };
            runner.lock_running().remove(&id);
            runner.after_execution(&id, &outcome);
        };
        let mut tasks = self.lock_tasks();
        tasks.spawn(task.instrument(span));
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }

    /// A slot is free again: poll at once, unless the control plane refused
    /// the start (then this execution and the polling back off, so a runner
    /// that keeps losing a race does not hammer the server).
    fn after_execution(&self, id: &ExecutionId, outcome: &Outcome) {
        let mut pacing = self.lock_pacing();
        match outcome {
            Outcome::Ran => pacing.starts.reset(),
            Outcome::StartRefused => pacing.refused(id),
            Outcome::StartFailed => pacing.pause(None),
        }
        drop(pacing);
        self.poll_now.notify_one();
    }

    fn execution_context(&self, live: &Live) -> ExecutionContext {
        ExecutionContext {
            client: live.client.clone(),
            worker: self.worker.clone(),
            gate: self.gate.clone(),
            settings: live.settings.clone(),
            abort: self.abort.subscribe(),
            spool: self.spool_options(live),
            journal: self.journal.clone(),
        }
    }

    fn live(&self) -> Arc<Live> {
        self.live.read_locked().clone()
    }

    fn lock_discovered(&self) -> std::sync::MutexGuard<'_, Vec<CommandInfo>> {
        self.discovered.locked()
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<ExecutionId, String>> {
        self.running.locked()
    }

    fn lock_backlog(&self) -> std::sync::MutexGuard<'_, VecDeque<Execution>> {
        self.backlog.locked()
    }

    fn lock_pacing(&self) -> std::sync::MutexGuard<'_, Pacing> {
        self.pacing.locked()
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.tasks.locked()
    }
}

/// The span every log line of one execution is written in.
fn execution_span(id: &ExecutionId, command: &str) -> tracing::Span {
    tracing::info_span!("execution", id = %id, command = %command)
}

/// How the poll loop slows down after failures: polls that failed, starts
/// the control plane refused (overall), and each refused execution.
struct Pacing {
    polls: Backoff,
    starts: Backoff,
    /// No polling before this (after a refused or failed start); the
    /// backlog still starts, each execution under its own backoff.
    paused_until: Option<tokio::time::Instant>,
    /// Executions whose start was refused: not taken again before the instant.
    refused: HashMap<ExecutionId, (Backoff, tokio::time::Instant)>,
}

impl Pacing {
    fn new() -> Self {
        let first = Duration::from_secs(1);
        Self {
            polls: Backoff::exponential(first, MAX_POLL_BACKOFF),
            starts: Backoff::exponential(first, MAX_POLL_BACKOFF),
            paused_until: None,
            refused: HashMap::new(),
        }
    }

    /// Pauses polling for the next step of the overall start backoff.
    fn pause(&mut self, retry_after: Option<Duration>) {
        let wait = self.starts.next_delay(retry_after);
        self.paused_until = Some(tokio::time::Instant::now() + wait);
    }

    fn refused(&mut self, id: &ExecutionId) {
        self.pause(None);
        let now = tokio::time::Instant::now();
        let (backoff, until) = self
            .refused
            .entry(id.clone())
            .or_insert_with(|| (Backoff::exponential(Duration::from_secs(2), MAX_REFUSED_BACKOFF), now));
        *until = now + backoff.next_delay(None);
    }

    fn is_refused(&self, id: &ExecutionId, now: tokio::time::Instant) -> bool {
        self.refused.get(id).is_some_and(|(_, until)| now < *until)
    }

    /// Refusals long past are forgotten, so the map stays small.
    fn forget_old_refusals(&mut self, now: tokio::time::Instant) {
        self.refused.retain(|_, (_, until)| now < *until + MAX_REFUSED_BACKOFF);
    }
}

impl Live {
    fn new(setup: RunnerSetup, discovered: &[CommandInfo]) -> Self {
        let spool_dir = spool_dir(&setup.opts);
        if let Err(error) = super::state::private_dir(&spool_dir) {
            tracing::error!("cannot create {}: {error}; output will be held in memory", spool_dir.display());
        }
        let mut synced = synced_commands(discovered, &setup.settings.admission.policy);
        for command in &mut synced {
            command.bound_args = setup.bound_args_labels.get(&command.name).cloned();
        }
        let hash = commands_hash(&synced);
        tracing::info!(discovered = discovered.len(), synced = synced.len(), %hash, "commands discovered");
        Self {
            client: setup.client,
            opts: setup.opts,
            settings: Arc::new(setup.settings),
            synced,
            hash: Mutex::new(hash),
        }
    }

    fn lock_hash(&self) -> std::sync::MutexGuard<'_, String> {
        self.hash.locked()
    }
}

/// Adds the values of the configured Django settings to the secrets masked
/// in the output. Unreadable settings are logged, never a reason not to run.
async fn add_setting_secrets(worker: &Worker, settings: &mut ExecutionSettings) {
    if settings.secret_settings.is_empty() {
        return;
    }
    match worker.read_settings(&settings.secret_settings).await {
        Ok(values) => {
            let usable: Vec<String> = values.into_iter().filter(|v| v.len() >= MIN_SECRET_LEN).collect();
            tracing::info!(values = usable.len(), "masking the values of the named Django settings");
            let secrets = settings.secrets.iter().cloned().chain(usable);
            settings.redactor = Redactor::new(secrets).map(Arc::new);
        }
        Err(error) => tracing::error!("cannot read the Django settings to mask: {error}"),
    }
}

/// Where the executions' output logs are.
fn spool_dir(opts: &RunnerOptions) -> std::path::PathBuf {
    opts.state_dir.join("outbox")
}

async fn join_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_refused_execution_waits_longer_each_time_and_is_forgotten_eventually() {
        let mut pacing = Pacing::new();
        let id = ExecutionId::parse("3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b").unwrap();
        let same_upper = ExecutionId::parse("3F2B8C1E-0A4D-4E5F-9B6A-7C8D9E0F1A2B").unwrap();
        let start = tokio::time::Instant::now();
        pacing.refused(&id);
        assert!(pacing.is_refused(&same_upper, start), "whatever the id's case");
        assert!(pacing.paused_until.is_some_and(|until| until >= start + SECOND), "polling paused too");
        assert!(!pacing.is_refused(&id, start + 3 * SECOND), "first wait: 2 s (+ jitter)");
        tokio::time::advance(3 * SECOND).await;
        pacing.refused(&id);
        let now = tokio::time::Instant::now();
        assert!(pacing.is_refused(&id, now + 3 * SECOND), "second wait: 4 s");
        pacing.forget_old_refusals(now + MAX_REFUSED_BACKOFF + 5 * SECOND);
        assert!(pacing.refused.is_empty());
    }
}
