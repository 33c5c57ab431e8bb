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

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use super::api::{Execution, ExecutionId, HeartbeatRequest, HeartbeatResponse, RunnerState, SyncRequest};
use super::client::{ApiError, Client};
use super::commands::{commands_hash, synced_commands, BoundArgs, SyncedCommand};
use super::delivery::{AuthGate, AuthState, SpillOptions};
use super::execution::{self, ExecutionContext, ExecutionSettings};
use crate::worker::{JobError, Worker};

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
}

pub struct Runner {
    client: Client,
    worker: Worker,
    gate: AuthGate,
    opts: RunnerOptions,
    settings: Arc<ExecutionSettings>,
    synced: Vec<SyncedCommand>,
    hash: Mutex<String>,
    suspended: watch::Sender<bool>,
    running: Mutex<HashSet<ExecutionId>>,
    slots: Arc<Semaphore>,
    poll_now: Notify,
    abort: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

impl Runner {
    /// Discovers the project's commands and prepares what is synced.
    pub async fn new(
        client: Client,
        worker: Worker,
        settings: ExecutionSettings,
        opts: RunnerOptions,
        bound_args_labels: &BTreeMap<String, Vec<BoundArgs>>,
    ) -> Result<Arc<Self>, JobError> {
        let spill_dir = opts.state_dir.join("spill");
        if let Err(error) = std::fs::create_dir_all(&spill_dir) {
            tracing::error!(
                "cannot create {}: {error}; output beyond memory limits will stay in memory",
                spill_dir.display()
            );
        }
        let discovered = worker.discover().await?;
        let mut synced = synced_commands(&discovered, &settings.policy);
        for command in &mut synced {
            command.bound_args = bound_args_labels.get(&command.name).cloned();
        }
        let hash = commands_hash(&synced);
        tracing::info!(discovered = discovered.len(), synced = synced.len(), %hash, "commands discovered");
        Ok(Arc::new(Self {
            client,
            worker,
            gate: AuthGate::default(),
            slots: Arc::new(Semaphore::new(opts.max_concurrent)),
            opts,
            settings: Arc::new(settings),
            synced,
            hash: Mutex::new(hash),
            suspended: watch::channel(false).0,
            running: Mutex::new(HashSet::new()),
            poll_now: Notify::new(),
            abort: watch::channel(false).0,
            tasks: Mutex::new(JoinSet::new()),
        }))
    }

    /// One heartbeat (and a sync if the server asks for one).
    pub async fn run_once(&self) -> Result<HeartbeatResponse, ApiError> {
        self.heartbeat().await
    }

    /// Runs until `shutdown` resolves, then stops polling, lets running
    /// executions finish within the grace period (cancelling the rest) and
    /// delivers their output and completions.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            _ = self.clone().heartbeat_loop() => {}
            _ = self.clone().poll_loop() => {}
            _ = shutdown => {}
        }
        self.shut_down().await;
    }

    async fn shut_down(&self) {
        let mut tasks = std::mem::take(&mut *self.lock_tasks());
        if !tasks.is_empty() {
            tracing::info!(
                running = tasks.len(),
                grace = ?self.opts.shutdown_grace,
                "shutting down: waiting for running executions"
            );
        }
        let finished = tokio::time::timeout(self.opts.shutdown_grace, join_all(&mut tasks)).await;
        if finished.is_err() {
            tracing::warn!(
                running = tasks.len(),
                "grace period over: cancelling the remaining executions"
            );
            self.abort.send_replace(true);
            let bound = self.settings.cancel_grace + self.opts.delivery_deadline;
            if tokio::time::timeout(bound, join_all(&mut tasks)).await.is_err() {
                tracing::error!(
                    "gave up delivering the last results of {} executions",
                    tasks.len()
                );
            }
        }
        self.worker.shutdown().await;
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut failures = 0usize;
        let mut last_auth_log: Option<Instant> = None;
        let mut auth = self.gate.subscribe();
        loop {
            let wait = match self.heartbeat().await {
                Ok(_) => {
                    failures = 0;
                    self.opts.heartbeat_interval
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
                    self.opts.heartbeat_interval
                }
            };
            let valid_now = self.gate.get() == AuthState::Valid;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // Another call was refused: start the backoff schedule now.
                _ = auth.wait_for(|state| *state == AuthState::Failed), if valid_now => {}
            }
        }
    }

    async fn heartbeat(&self) -> Result<HeartbeatResponse, ApiError> {
        let info = self.worker.info();
        let request = HeartbeatRequest {
            runner_version: self.opts.runner_version.clone(),
            python_version: info
                .as_ref()
                .map(|i| i.python_version.clone())
                .unwrap_or_default(),
            django_version: info
                .as_ref()
                .map(|i| i.django_version.clone())
                .unwrap_or_default(),
            commands_hash: self.lock_hash().clone(),
        };
        let answer = match self.client.heartbeat(&request).await {
            Ok(answer) => answer,
            Err(error) => {
                self.gate.observe(&error);
                return Err(error);
            }
        };
        if self.gate.set(AuthState::Valid) {
            tracing::info!("authenticated with the control plane");
        }
        self.follow_runner_state(&answer);
        if !answer.commands_in_sync {
            self.sync().await?;
        }
        if answer.pending_executions > 0 {
            self.poll_now.notify_one();
        }
        Ok(answer)
    }

    fn follow_runner_state(&self, answer: &HeartbeatResponse) {
        let suspended = answer.runner_state == RunnerState::Suspended;
        if self
            .suspended
            .send_if_modified(|current| std::mem::replace(current, suspended) != suspended)
        {
            let reason = answer.suspension_reason.as_deref().unwrap_or("no reason given");
            if suspended {
                tracing::warn!("runner suspended by the control plane ({reason}); polling paused");
            } else {
                tracing::info!("runner active again; polling resumed");
            }
        }
    }

    async fn sync(&self) -> Result<(), ApiError> {
        let answer = self
            .client
            .sync_commands(&SyncRequest {
                commands: self.synced.clone(),
            })
            .await
            .inspect_err(|e| self.gate.observe(e))?;
        let mut hash = self.lock_hash();
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
            if self.slots.available_permits() > 0 {
                self.poll().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.opts.poll_interval) => {}
                _ = self.poll_now.notified() => {}
            }
        }
    }

    async fn poll(self: &Arc<Self>) {
        let pending = match self.client.pending().await {
            Ok(pending) => pending,
            Err(error) => {
                self.gate.observe(&error);
                tracing::warn!("polling for executions failed: {error}");
                return;
            }
        };
        for raw in pending.executions {
            let execution: Execution = match serde_json::from_value(raw) {
                Ok(execution) => execution,
                Err(error) => {
                    tracing::warn!("ignoring an execution the control plane sent: {error}");
                    continue;
                }
            };
            if !self.lock_running().insert(execution.id.clone()) {
                continue; // already running here
            }
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                // Full: leave it (and the rest) queued on the server.
                self.lock_running().remove(&execution.id);
                break;
            };
            let runner = self.clone();
            let ctx = self.execution_context();
            self.lock_tasks().spawn(async move {
                let id = execution.id.clone();
                execution::run(ctx, execution).await;
                runner.lock_running().remove(&id);
                drop(slot);
                runner.poll_now.notify_one();
            });
        }
        // Reap finished tasks so the set does not grow.
        let mut tasks = self.lock_tasks();
        while tasks.try_join_next().is_some() {}
    }

    fn execution_context(&self) -> ExecutionContext {
        ExecutionContext {
            client: self.client.clone(),
            worker: self.worker.clone(),
            gate: self.gate.clone(),
            settings: self.settings.clone(),
            abort: self.abort.subscribe(),
            spill: SpillOptions {
                dir: self.opts.state_dir.join("spill"),
                memory_limit: self.opts.outbox_memory_bytes,
            },
        }
    }

    fn lock_hash(&self) -> std::sync::MutexGuard<'_, String> {
        self.hash.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashSet<ExecutionId>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn join_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}
