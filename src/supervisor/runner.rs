//! The runner: what keeps this host in touch with the control plane.
//!
//! Two loops share the [`AuthGate`]. The heartbeat loop reports versions and
//! the commands hash, syncs the command list when the server says it is out
//! of sync, follows suspension, and walks the authentication backoff
//! schedule after a 401/403. The poll loop fetches pending executions while
//! authenticated and active, but only when a slot is free, so executions
//! this runner cannot take stay queued on the server; it polls at once when
//! a slot frees up or a heartbeat reports pending work. Each execution runs
//! in its own task ([`execution::run`]).
//!
//! Everything a reload may change lives in [`Live`], swapped as a whole:
//! loops read the current one at each turn, while a running execution keeps
//! the settings it started with.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use super::api::{Execution, ExecutionId, HeartbeatRequest, HeartbeatResponse, RunnerState, SyncRequest};
use super::client::{ApiError, Client};
use super::commands::{commands_hash, synced_commands, BoundArgs, SyncedCommand};
use super::delivery::{AuthGate, AuthState, SpillOptions};
use super::execution::{self, ExecutionContext, ExecutionSettings};
use super::journal::Journal;
use super::redact::{Redactor, MIN_SECRET_LEN};
use super::systemd;
use crate::ipc::CommandInfo;
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
    /// Bytes of undelivered output kept in memory per execution before spilling.
    pub outbox_memory_bytes: usize,
    /// Per-command limits on executions running at once (e.g. one `migrate`).
    pub command_limits: BTreeMap<String, CommandLimit>,
}

/// At most `max_running` executions of a command at once on this runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandLimit {
    pub max_running: usize,
    pub when_busy: WhenBusy,
}

/// What happens to an execution that would break its command's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenBusy {
    /// Left queued on the server; taken once one of the running ones ends.
    Wait,
    /// Refused at once through the rejection flow, with the rule in its output.
    Refuse,
}

/// The limit `command` has reached, if any.
fn busy(
    running: &HashMap<ExecutionId, String>,
    limits: &BTreeMap<String, CommandLimit>,
    command: &str,
) -> Option<(usize, WhenBusy)> {
    let limit = limits.get(command)?;
    let same = running.values().filter(|running| running.as_str() == command).count();
    (same >= limit.max_running).then_some((limit.max_running, limit.when_busy))
}

fn busy_refusal(command: &str, limit: usize) -> String {
    format!(
        "Command '{command}' rejected by runner security policy.\n\
         Reason: at most {limit} '{command}' may run at a time on this runner, and that many are running\n\n\
         Run it again once they have finished, or change the rule in [[policy.concurrency]] in dc.toml.\n"
    )
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
    suspended: watch::Sender<bool>,
    /// Executions taken by this runner, with their command.
    running: Mutex<HashMap<ExecutionId, String>>,
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
        let live = Live::new(setup, &discovered);
        Ok(Arc::new(Self {
            worker,
            gate: AuthGate::default(),
            live: RwLock::new(Arc::new(live)),
            discovered: Mutex::new(discovered),
            journal,
            suspended: watch::channel(false).0,
            running: Mutex::new(HashMap::new()),
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
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(live);
        if changed {
            self.heartbeat_now.notify_one();
        }
        self.poll_now.notify_one();
        systemd::ready("reloaded");
        tracing::info!(commands_changed = changed, "reload applied");
    }

    /// Reports executions a previous run left unfinished.
    fn recover_journal(&self) {
        let Some(journal) = &self.journal else { return };
        for entry in journal.entries() {
            let live = self.live();
            let spill = SpillOptions {
                dir: live.opts.state_dir.join("spill"),
                memory_limit: live.opts.outbox_memory_bytes,
            };
            let (client, gate, journal) = (live.client.clone(), self.gate.clone(), journal.clone());
            self.lock_tasks().spawn(execution::recover(client, gate, journal, spill, entry));
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut failures = 0usize;
        let mut last_auth_log: Option<Instant> = None;
        let mut auth = self.gate.subscribe();
        let mut announced = false;
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
                    failures = 0;
                    interval
                }
                Err(error) if error.is_auth() => {
                    let wait = AUTH_BACKOFF[failures.min(AUTH_BACKOFF.len() - 1)];
                    failures += 1;
                    if last_auth_log.is_none_or(|at| at.elapsed() >= AUTH_LOG_EVERY) {
                        tracing::warn!("not authenticated ({error}); next heartbeat in {wait:?}");
                        last_auth_log = Some(Instant::now());
                    }
                    wait
                }
                Err(error) => {
                    tracing::warn!("heartbeat failed: {error}");
                    interval
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
        if self.gate.set(AuthState::Valid) {
            tracing::info!("authenticated with the control plane");
        }
        self.follow_runner_state(&answer);
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
            if self.free_slots() > 0 {
                self.poll().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.live().opts.poll_interval) => {}
                _ = self.poll_now.notified() => {}
            }
        }
    }

    fn free_slots(&self) -> usize {
        self.live().opts.max_concurrent.saturating_sub(self.lock_running().len())
    }

    async fn poll(self: &Arc<Self>) {
        let live = self.live();
        let pending = match live.client.pending().await {
            Ok(pending) => pending,
            Err(error) => {
                self.gate.observe(&error);
                tracing::warn!("polling for executions failed: {error}");
                return;
            }
        };
        for raw in pending.executions {
            let execution: Execution = match serde_json::from_str(raw.get()) {
                Ok(execution) => execution,
                Err(error) => {
                    tracing::warn!("ignoring an execution the control plane sent: {error}");
                    continue;
                }
            };
            let refusal = {
                let mut running = self.lock_running();
                if running.contains_key(&execution.id) {
                    continue; // already running here
                }
                if running.len() >= live.opts.max_concurrent {
                    break; // full: leave it (and the rest) queued on the server
                }
                let refusal = match busy(&running, &live.opts.command_limits, &execution.command) {
                    Some((_, WhenBusy::Wait)) => continue, // stays queued until one ends
                    Some((limit, WhenBusy::Refuse)) => Some(busy_refusal(&execution.command, limit)),
                    None => None,
                };
                running.insert(execution.id.clone(), execution.command.clone());
                refusal
            };
            let runner = self.clone();
            let ctx = self.execution_context(&live);
            self.lock_tasks().spawn(async move {
                let id = execution.id.clone();
                match refusal {
                    Some(message) => execution::reject(&ctx, &execution, message).await,
                    None => execution::run(ctx, execution).await,
                }
                runner.lock_running().remove(&id);
                runner.poll_now.notify_one();
            });
        }
        // Reap finished tasks so the set does not grow.
        let mut tasks = self.lock_tasks();
        while tasks.try_join_next().is_some() {}
    }

    fn execution_context(&self, live: &Live) -> ExecutionContext {
        ExecutionContext {
            client: live.client.clone(),
            worker: self.worker.clone(),
            gate: self.gate.clone(),
            settings: live.settings.clone(),
            abort: self.abort.subscribe(),
            spill: SpillOptions {
                dir: live.opts.state_dir.join("spill"),
                memory_limit: live.opts.outbox_memory_bytes,
            },
            journal: self.journal.clone(),
        }
    }

    fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_discovered(&self) -> std::sync::MutexGuard<'_, Vec<CommandInfo>> {
        self.discovered.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<ExecutionId, String>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Live {
    fn new(setup: RunnerSetup, discovered: &[CommandInfo]) -> Self {
        let spill_dir = setup.opts.state_dir.join("spill");
        if let Err(error) = std::fs::create_dir_all(&spill_dir) {
            tracing::error!(
                "cannot create {}: {error}; undelivered output will stay in memory",
                spill_dir.display()
            );
        }
        let mut synced = synced_commands(discovered, &setup.settings.policy);
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
        self.hash.lock().unwrap_or_else(|e| e.into_inner())
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

async fn join_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}
