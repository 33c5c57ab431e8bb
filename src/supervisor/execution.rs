//! One execution from the control plane, start to completion: admission
//! (refusals go through the rejection flow), `start`,
//! the job on the worker, its output cut into chunks, cancel-status polling,
//! the timeout, and `complete` once every chunk has been acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::admission::{self, Admission, Rejection};
use super::client::Client;
use super::delivery::AuthGate;
use super::journal::{kill_leftover, process_start_time, Entry, Journal};
use super::outbox::{Outbox, Recovered, SpoolOptions};
use super::redact::Redactor;
use super::replay::Shaping;
use super::supervise::supervise;
use crate::backoff::Backoff;
use crate::ipc::JobLimits;
use crate::protocol::api::{CompleteRequest, CompletionStatus, Execution};
use crate::worker::{Output, Worker};

/// What metadata-only executions send instead of their output.
pub const METADATA_ONLY_NOTICE: &str = "(metadata-only mode, no output captured)\n";

/// How executions are run; fixed for the runner's lifetime (or a reload).
#[derive(Debug, Clone)]
pub struct ExecutionSettings {
    /// What decides whether an execution may run.
    pub admission: Admission,
    pub metadata_only: BTreeSet<String>,
    pub cancel_grace: Duration,
    pub cancel_poll_interval: Duration,
    /// Retries of a `start` that failed transiently (5xx, timeout…) before
    /// the execution is left to a later poll (`server.max_retries`).
    pub start_retries: u32,
    pub flush_interval: Duration,
    pub chunk_max_bytes: usize,
    pub output_cap: Option<usize>,
    /// Masks configured secrets in the output (None: nothing to mask).
    pub redactor: Option<Arc<Redactor>>,
    /// The secrets the redactor was built from (config values and variables)…
    pub secrets: Vec<String>,
    /// …and the Django settings whose values the worker adds to them.
    pub secret_settings: Vec<String>,
    /// Resource limits of the jobs.
    pub limits: CommandLimits,
}

impl ExecutionSettings {
    /// How the output becomes chunks.
    pub fn shaping(&self) -> Shaping {
        Shaping {
            chunk_max_bytes: self.chunk_max_bytes,
            output_cap: self.output_cap,
            redactor: self.redactor.clone(),
        }
    }
}

/// Resource limits for every job, and per command.
#[derive(Debug, Clone, Default)]
pub struct CommandLimits {
    pub all: JobLimits,
    pub commands: BTreeMap<String, JobLimits>,
}

impl CommandLimits {
    pub fn of(&self, command: &str) -> JobLimits {
        self.commands.get(command).copied().unwrap_or(self.all)
    }
}

/// What an execution needs from the runner around it.
#[derive(Clone)]
pub struct ExecutionContext {
    pub client: Client,
    pub worker: Worker,
    pub gate: AuthGate,
    pub settings: Arc<ExecutionSettings>,
    /// Turns true when running executions must be cancelled (shutdown).
    pub abort: watch::Receiver<bool>,
    /// Where undelivered output beyond the memory limit waits.
    pub spool: SpoolOptions,
    /// Records executions in flight (absent for one-off runs).
    pub journal: Option<Journal>,
}

/// How far an execution got; the runner paces its polling on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Started and reported (run, or refused by our policy).
    Ran,
    /// The control plane refused `start` (typically 409: another runner
    /// took it, or it was cancelled): do not ask again soon.
    StartRefused,
    /// `start` kept failing (outage, authentication): it stays queued on the
    /// server for a later poll.
    StartFailed,
}

/// Runs one execution. The caller wraps it in a span carrying the
/// execution's id and command, so the log lines here do not repeat them.
pub async fn run(ctx: ExecutionContext, execution: Execution) -> Outcome {
    let started_at = Instant::now();
    let mut tracked = crate::health::metrics().track_execution();
    let id = execution.id.clone();
    let command = execution.command.clone();
    let settings = ctx.settings.clone();
    let admitted = match admission::admit(&settings.admission, &ctx.worker, &execution).await {
        Ok(admitted) => admitted,
        Err(rejection) => return reject(&ctx, &execution, rejection).await,
    };
    let args = admitted.args.clone();
    // Journalled before `start`: a runner stopped while the control plane
    // handles it finds the entry and settles the execution (see `recover`).
    let mut entry = Entry { id: id.clone(), command: command.clone(), pid: None, pid_start_time: None };
    let journal = ctx.journal.as_ref();
    if let Some(journal) = journal {
        journal.record(&entry);
    }
    let started = start(&ctx, &execution).await;
    if started != Outcome::Ran {
        // Not started: the control plane will hand it out again.
        if let Some(journal) = journal {
            journal.remove(&id);
        }
        admitted.release();
        return started;
    }
    let metadata_only = execution.use_metadata_only_mode || settings.metadata_only.contains(&command);
    tracing::info!(args = %mask(&settings, &execution.args), metadata_only, "execution started");
    let outbox =
        Outbox::new(ctx.client.clone(), ctx.gate.clone(), id.clone(), &ctx.spool, settings.shaping());
    if metadata_only {
        outbox.note(false, METADATA_ONLY_NOTICE);
        outbox.note(true, METADATA_ONLY_NOTICE);
    }
    let output = if metadata_only { Output::Discard } else { Output::Capture };
    let limits = settings.limits.of(&command);
    let completion = match ctx.worker.spawn_limited(&command, &args, output, limits).await {
        Ok(job) => {
            tracked.job_started();
            entry.pid = Some(job.pid);
            entry.pid_start_time = process_start_time(job.pid);
            if let Some(journal) = journal {
                journal.record(&entry);
            }
            supervise(&ctx, job, Duration::from_secs(execution.timeout), limits, &outbox).await
        }
        Err(error) => {
            outbox.note(true, &format!("[dcsupervisor] the command could not be started: {error}\n"));
            CompleteRequest { exit_code: -1, status: CompletionStatus::Failed }
        }
    };
    tracked.finished(completion.status);
    outbox.finish(completion).await;
    if let Some(journal) = journal {
        journal.remove(&id);
    }
    ctx.spool.remove_log(&id);
    tracing::info!(
        status = ?completion.status,
        exit_code = completion.exit_code,
        duration_ms = started_at.elapsed().as_millis() as u64,
        "execution finished"
    );
    Outcome::Ran
}

/// `start`, retried with backoff through transient failures (up to
/// `start_retries` times). A refusal, or an authentication failure, is not
/// retried: the execution stays queued on the server.
async fn start(ctx: &ExecutionContext, execution: &Execution) -> Outcome {
    let mut backoff = Backoff::exponential(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        let error = match ctx.client.start(&execution.id).await {
            Ok(()) => return Outcome::Ran,
            Err(error) => error,
        };
        ctx.gate.observe(&error);
        if error.is_refusal() {
            tracing::warn!("the control plane refused to start it: {error}");
            return Outcome::StartRefused;
        }
        if !error.is_retryable() || backoff.failures() >= ctx.settings.start_retries {
            tracing::warn!("could not start it: {error}; leaving it queued");
            return Outcome::StartFailed;
        }
        let delay = backoff.next_delay(error.retry_after());
        tracing::debug!("could not start it ({error}); retrying in {delay:?}");
        tokio::time::sleep(delay).await;
    }
}

/// What a restarted runner says about a command it lost track of.
pub const RESTART_NOTICE: &str =
    "[dcsupervisor] the runner restarted while this command was running; its outcome is unknown\n";

/// Finishes an execution a previous run of the supervisor left in the
/// journal: kills what is left of its job, then delivers from its output
/// log what the control plane had not acknowledged, ending with the real
/// completion if the log holds it, else a notice and `failed`.
pub async fn recover(
    client: Client,
    gate: AuthGate,
    journal: Journal,
    spool: SpoolOptions,
    shaping: Shaping,
    entry: Entry,
) {
    let id = entry.id.clone();
    if kill_leftover(&entry) {
        tracing::warn!(
            pid = entry.pid,
            "killed the leftover processes of an execution from before the restart"
        );
    }
    tracing::warn!("reporting an execution interrupted by a runner restart");
    match Outbox::recover(client.clone(), gate.clone(), id.clone(), &spool, shaping.clone(), RESTART_NOTICE) {
        Recovered::Delivering(outbox) => outbox.delivered().await,
        Recovered::AlreadyDelivered => {}
        Recovered::NoLog if entry.pid.is_none() && still_offered(&client, &gate, &id).await => {
            // `start` comes before the job: none ran. The poller takes it
            // again (it skips it only while this recovery lasts).
            tracing::info!("the control plane had not started it; it stays queued there and runs now");
        }
        Recovered::NoLog => {
            let outbox = Outbox::new(client, gate, id.clone(), &spool, shaping);
            outbox.note(true, RESTART_NOTICE);
            outbox.finish(CompleteRequest { exit_code: -1, status: CompletionStatus::Failed }).await;
        }
    }
    journal.remove(&id);
    spool.remove_log(&id);
}

/// Whether an execution the runner was starting when it stopped is still
/// offered by the control plane, that is, its `start` never got there. Asked
/// of `/pending/` rather than by starting it again: a start accepted now
/// would leave a command that never ran to be reported as failed.
async fn still_offered(client: &Client, gate: &AuthGate, id: &crate::protocol::api::ExecutionId) -> bool {
    #[derive(serde::Deserialize)]
    struct Offered {
        id: crate::protocol::api::ExecutionId,
    }
    let mut backoff = Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        gate.wait_valid().await;
        let error = match client.pending().await {
            Ok(pending) => {
                let offered = |raw: &serde_json::value::RawValue| {
                    serde_json::from_str::<Offered>(raw.get()).is_ok_and(|offered| offered.id == *id)
                };
                return pending.executions.iter().any(|raw| offered(raw));
            }
            Err(error) => error,
        };
        gate.observe(&error);
        if !error.is_auth() {
            tokio::time::sleep(backoff.next_delay(error.retry_after())).await;
        }
    }
}

/// Text for the log with the configured secrets masked.
fn mask(settings: &ExecutionSettings, text: &str) -> String {
    match &settings.redactor {
        Some(redactor) => redactor.take_safe(&mut text.to_string(), true),
        None => text.to_string(),
    }
}

/// The rejection flow: start, one stderr chunk saying why, complete as failed.
pub async fn reject(ctx: &ExecutionContext, execution: &Execution, rejection: Rejection) -> Outcome {
    crate::health::metrics().execution_rejected();
    tracing::warn!(rule = %rejection.rule, reason = rejection.reason, "rejected by the runner's policy");
    let message = rejection.render(&execution.command);
    let started = start(ctx, execution).await;
    if started != Outcome::Ran {
        return started;
    }
    let outbox = Outbox::new(
        ctx.client.clone(),
        ctx.gate.clone(),
        execution.id.clone(),
        &ctx.spool,
        ctx.settings.shaping(),
    );
    outbox.note(true, &message);
    outbox.finish(CompleteRequest { exit_code: -1, status: CompletionStatus::Failed }).await;
    ctx.spool.remove_log(&execution.id);
    Outcome::Ran
}
