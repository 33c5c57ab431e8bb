//! One execution from the control plane, start to completion: the policy
//! and argument checks (refusals go through the rejection flow), `start`,
//! the job on the worker, its output cut into chunks, cancel-status polling,
//! the timeout, and `complete` once every chunk has been acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::watch;

use super::api::{CompleteRequest, CompletionStatus, Execution, OutputRequest, Segment};
use super::arguments::{self, ArgumentRules};
use super::client::Client;
use super::delivery::{AuthGate, AuthState, Message, Outbox, SpillOptions};
use super::journal::{kill_leftover, process_start_time, Entry, Journal};
use super::output::{OutputCap, StreamBuffer};
use super::policy::Policy;
use super::redact::Redactor;
use super::signing::Signing;
use crate::ipc::{ExitStatus, JobLimits, ParseOutcome};
use crate::worker::{Job, JobEnd, Output, Worker};

/// What metadata-only executions send instead of their output.
pub const METADATA_ONLY_NOTICE: &str = "(metadata-only mode, no output captured)\n";
/// Output still arriving this long after the command ended is abandoned (a
/// process that escaped the job's process group may hold the pipes).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);
const READ_BUFFER: usize = 64 * 1024;

/// How executions are run; fixed for the runner's lifetime (or a reload).
#[derive(Debug, Clone)]
pub struct ExecutionSettings {
    pub policy: Policy,
    pub metadata_only: BTreeSet<String>,
    /// Commands restricted to listed argument sets (already split).
    pub bound_args: BTreeMap<String, Vec<Vec<String>>>,
    pub cancel_grace: Duration,
    pub cancel_poll_interval: Duration,
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
    /// `[policy.signing]`: only signed executions run (None: any).
    pub signing: Option<Arc<Signing>>,
    /// `[[policy.arguments]]` by command.
    pub argument_rules: BTreeMap<String, ArgumentRules>,
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
    pub spill: SpillOptions,
    /// Records executions in flight (absent for one-off runs).
    pub journal: Option<Journal>,
}

/// Why the runner stopped a job before it ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Cancelled,
    TimedOut,
}

pub async fn run(ctx: ExecutionContext, execution: Execution) {
    let started_at = Instant::now();
    let mut tracked = crate::health::metrics().track_execution();
    let id = execution.id.clone();
    let command = execution.command.clone();
    let settings = ctx.settings.clone();
    let args = match refusal(&settings, &execution) {
        Err(message) => return reject(&ctx, &execution, message).await,
        Ok(args) => args,
    };
    if let Some(rules) = settings.argument_rules.get(&command) {
        if let Err(message) = check_arguments(&ctx.worker, &command, &args, rules).await {
            return reject(&ctx, &execution, message).await;
        }
    }
    if let Err(error) = ctx.client.start(&id).await {
        ctx.gate.observe(&error);
        // Not started: it stays queued on the server for a later poll.
        if let Some(signing) = &settings.signing {
            signing.forget(&id);
        }
        tracing::warn!(execution = %id, command, "could not start the execution: {error}");
        return;
    }
    let mut entry =
        Entry { id: id.clone(), command: command.clone(), pid: None, pid_start_time: None, next_chunk: 1 };
    let journal = ctx.journal.as_ref();
    if let Some(journal) = journal {
        journal.record(&entry);
    }
    let metadata_only = execution.use_metadata_only_mode || settings.metadata_only.contains(&command);
    tracing::info!(execution = %id, command, args = %mask(&settings, &execution.args), metadata_only, "execution started");
    let outbox = Outbox::new(ctx.client.clone(), ctx.gate.clone(), id.clone(), &ctx.spill);
    let mut chunks = ChunkWriter::new(&outbox, settings.output_cap, journal.map(|j| (j, entry.clone())));
    if metadata_only {
        chunks.send_as_is(false, vec![segment_now(METADATA_ONLY_NOTICE)]).await;
        chunks.send_as_is(true, vec![segment_now(METADATA_ONLY_NOTICE)]).await;
    }
    let output = if metadata_only { Output::Discard } else { Output::Capture };
    let limits = settings.limits.of(&command);
    let completion = match ctx.worker.spawn_limited(&command, &args, output, limits).await {
        Ok(job) => {
            tracked.job_started();
            entry.pid = Some(job.pid);
            entry.pid_start_time = process_start_time(job.pid);
            chunks.remember_job(&entry);
            supervise(&ctx, job, Duration::from_secs(execution.timeout), limits, &mut chunks).await
        }
        Err(error) => {
            let line = format!("[dcsupervisor] the command could not be started: {error}\n");
            chunks.send_as_is(true, vec![segment_now(&line)]).await;
            CompleteRequest { exit_code: -1, status: CompletionStatus::Failed }
        }
    };
    chunks.finish().await;
    tracked.finished(completion.status);
    outbox.push(Message::Complete(completion)).await;
    outbox.flush_and_close().await;
    if let Some(journal) = journal {
        journal.remove(&id);
    }
    tracing::info!(
        execution = %id,
        command,
        status = ?completion.status,
        exit_code = completion.exit_code,
        duration_ms = started_at.elapsed().as_millis() as u64,
        "execution finished"
    );
}

/// Finishes an execution a previous run of the supervisor left in the
/// journal: kills what is left of its job, delivers the output that had been
/// spilled to disk, and reports it failed with a line saying why.
pub async fn recover(client: Client, gate: AuthGate, journal: Journal, spill: SpillOptions, entry: Entry) {
    let id = entry.id.clone();
    if kill_leftover(&entry) {
        tracing::warn!(execution = %id, pid = entry.pid, "killed the leftover processes of an execution from before the restart");
    }
    let spilled = read_spilled(&spill.dir.join(format!("{id}.jsonl")));
    tracing::warn!(execution = %id, command = entry.command, spilled = spilled.len(), "reporting an execution interrupted by a runner restart");
    let outbox = Outbox::new(client, gate, id.clone(), &spill);
    for message in spilled {
        outbox.push(message).await;
    }
    let line = "[dcsupervisor] the runner restarted while this command was running; its outcome is unknown\n";
    let chunk =
        OutputRequest { chunk_number: entry.next_chunk, segments: vec![segment_now(line)], is_stderr: true };
    outbox.push(Message::Output(chunk)).await;
    outbox.push(Message::Complete(CompleteRequest { exit_code: -1, status: CompletionStatus::Failed })).await;
    outbox.flush_and_close().await;
    journal.remove(&id);
}

/// Messages a previous run spilled (some may have been delivered already:
/// the server de-duplicates chunks by number and refuses a second completion).
fn read_spilled(path: &std::path::Path) -> Vec<Message> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let _ = std::fs::remove_file(path);
    text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

/// Text for the log with the configured secrets masked.
fn mask(settings: &ExecutionSettings, text: &str) -> String {
    match &settings.redactor {
        Some(redactor) => redactor.take_safe(&mut text.to_string(), true),
        None => text.to_string(),
    }
}

/// `Ok(arguments)` if this runner may run the execution, else the text
/// explaining the refusal.
fn refusal(settings: &ExecutionSettings, execution: &Execution) -> Result<Vec<String>, String> {
    let command = &execution.command;
    if let Err(refusal) = settings.policy.check(command) {
        return Err(settings.policy.refusal_message(command, &refusal));
    }
    if let Some(signing) = &settings.signing {
        if let Err(refusal) = signing.accept(execution, unix_now() as i64) {
            return Err(signing.refusal_message(command, &refusal));
        }
    }
    let Some(args) = shlex::split(&execution.args) else {
        return Err(format!(
            "Command '{command}' rejected by runner security policy.\n\
             Reason: its arguments could not be parsed (unbalanced quotes): {:?}\n",
            execution.args
        ));
    };
    if let Some(allowed) = settings.bound_args.get(command) {
        if !allowed.contains(&args) {
            let listed: Vec<String> = allowed
                .iter()
                .map(|set| shlex::try_join(set.iter().map(String::as_str)).unwrap_or_default())
                .collect();
            return Err(format!(
                "Command '{command}' rejected by runner security policy.\n\
                 Reason: arguments {:?} are not one of the argument sets bound to this command\n\n\
                 Allowed argument sets: {}\n\
                 To allow others, add them to [[policy.bound_args]] in dc.toml.\n",
                execution.args,
                listed.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(args)
}

/// `[[policy.arguments]]`: the worker reads `args` with the command's own
/// parser (so abbreviations resolve as they would in the job), then the
/// rules judge what it read. `Err` is the rejection text.
async fn check_arguments(
    worker: &Worker,
    command: &str,
    args: &[String],
    rules: &ArgumentRules,
) -> Result<(), String> {
    let reason = match worker.parse_args(command, args).await {
        Ok(ParseOutcome::Parsed { given }) => match rules.check(args, &given) {
            Ok(()) => return Ok(()),
            Err(violation) => violation.reason(command),
        },
        Ok(ParseOutcome::Refused { message }) => {
            format!("the command's parser refused the arguments: {}", message.trim_end())
        }
        Err(error) => format!("the arguments could not be checked against [[policy.arguments]]: {error}"),
    };
    Err(arguments::refusal_message(command, &reason))
}

/// The rejection flow: start, one stderr chunk saying why, complete as failed.
pub async fn reject(ctx: &ExecutionContext, execution: &Execution, message: String) {
    let id = &execution.id;
    crate::health::metrics().execution_rejected();
    tracing::warn!(execution = %id, command = execution.command, "rejected by the runner's policy: {}", message.lines().nth(1).unwrap_or(""));
    if let Err(error) = ctx.client.start(id).await {
        ctx.gate.observe(&error);
        tracing::warn!(execution = %id, "could not start the rejected execution: {error}");
        return;
    }
    let outbox = Outbox::new(ctx.client.clone(), ctx.gate.clone(), id.clone(), &ctx.spill);
    let chunk = OutputRequest { chunk_number: 1, segments: vec![segment_now(&message)], is_stderr: true };
    outbox.push(Message::Output(chunk)).await;
    outbox.push(Message::Complete(CompleteRequest { exit_code: -1, status: CompletionStatus::Failed })).await;
    outbox.flush_and_close().await;
}

/// Runs the job to its end, streaming its output, honouring cancel requests,
/// the timeout and shutdown.
async fn supervise(
    ctx: &ExecutionContext,
    mut job: Job,
    timeout: Duration,
    limits: JobLimits,
    chunks: &mut ChunkWriter<'_>,
) -> CompleteRequest {
    let settings = &ctx.settings;
    let mut stdout = job.stdout.take();
    let mut stderr = job.stderr.take();
    let (mut out_buf, mut err_buf) =
        (StreamBuffer::new(settings.redactor.clone()), StreamBuffer::new(settings.redactor.clone()));
    let (mut out_read, mut err_read) = (vec![0u8; READ_BUFFER], vec![0u8; READ_BUFFER]);
    let mut flush = tokio::time::interval(settings.flush_interval);
    flush.reset();
    let mut cancel_poll = tokio::time::interval(settings.cancel_poll_interval);
    cancel_poll.reset();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut abort = ctx.abort.clone();

    let mut stop: Option<StopReason> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut end: Option<JobEnd> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;

    while end.is_none() || stdout.is_some() || stderr.is_some() {
        tokio::select! {
            read = read_some(&mut stdout, &mut out_read) => {
                match read {
                    Some(bytes) => out_buf.push(&out_read[..bytes], unix_now()),
                    None => { stdout = None; out_buf.finish(unix_now()); }
                }
                if out_buf.len() >= settings.chunk_max_bytes { chunks.flush(false, &mut out_buf).await; }
            }
            read = read_some(&mut stderr, &mut err_read) => {
                match read {
                    Some(bytes) => err_buf.push(&err_read[..bytes], unix_now()),
                    None => { stderr = None; err_buf.finish(unix_now()); }
                }
                if err_buf.len() >= settings.chunk_max_bytes { chunks.flush(true, &mut err_buf).await; }
            }
            _ = flush.tick() => {
                chunks.flush(false, &mut out_buf).await;
                chunks.flush(true, &mut err_buf).await;
            }
            ended = job.wait(), if end.is_none() => {
                end = Some(ended);
                drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)), if drain_until.is_some() => {
                tracing::warn!(job = job.id, "output still open {DRAIN_AFTER_EXIT:?} after the command ended; stopped reading");
                break;
            }
            _ = &mut deadline, if end.is_none() && stop != Some(StopReason::TimedOut) => {
                tracing::info!(job = job.id, "timed out after {timeout:?}; stopping it");
                stop = Some(StopReason::TimedOut);
                job.signal(Signal::SIGTERM).await;
                kill_at = Some(tokio::time::Instant::now() + settings.cancel_grace);
            }
            _ = cancel_poll.tick(), if end.is_none() && stop.is_none() && ctx.gate.get() == AuthState::Valid => {
                if let Some(force) = cancel_requested(ctx, &chunks.outbox_id()).await {
                    stop = Some(StopReason::Cancelled);
                    if force {
                        job.signal(Signal::SIGKILL).await;
                    } else {
                        job.signal(Signal::SIGTERM).await;
                        kill_at = Some(tokio::time::Instant::now() + settings.cancel_grace);
                    }
                }
            }
            _ = wait_for_abort(&mut abort), if end.is_none() && stop.is_none() => {
                stop = Some(StopReason::Cancelled);
                job.signal(Signal::SIGTERM).await;
                kill_at = Some(tokio::time::Instant::now() + settings.cancel_grace);
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)), if kill_at.is_some() && end.is_none() => {
                kill_at = None;
                job.signal(Signal::SIGKILL).await;
            }
        }
    }
    chunks.flush(false, &mut out_buf).await;
    chunks.flush(true, &mut err_buf).await;
    let end = match end {
        Some(end) => end,
        None => job.wait().await,
    };
    // A job the runner stopped was not killed by its limits.
    let limits = if stop.is_some() { JobLimits::default() } else { limits };
    if let Some(line) = explain_end(&end, limits) {
        chunks.send_as_is(true, vec![segment_now(&line)]).await;
    }
    completion(stop, &end)
}

/// A line for the output when the way the job ended needs explaining.
fn explain_end(end: &JobEnd, limits: JobLimits) -> Option<String> {
    match end {
        JobEnd::Lost(reason) => {
            Some(format!("[dcsupervisor] the worker running this command died: {reason}\n"))
        }
        JobEnd::Exited(ExitStatus::Signal { signal }) if limits.cpu_seconds > 0 => {
            let hit = *signal == Signal::SIGXCPU as i32 || *signal == Signal::SIGKILL as i32;
            hit.then(|| {
                format!("[dcsupervisor] the command reached its CPU time limit ({} s)\n", limits.cpu_seconds)
            })
        }
        JobEnd::Exited(_) => None,
    }
}

fn completion(stop: Option<StopReason>, end: &JobEnd) -> CompleteRequest {
    // Like Python's subprocess: a signal death is the negative signal number.
    let exit_code = match end {
        JobEnd::Exited(ExitStatus::Code { code }) => *code,
        JobEnd::Exited(ExitStatus::Signal { signal }) => -signal,
        JobEnd::Lost(_) => -1,
    };
    let status = match (stop, exit_code) {
        (Some(StopReason::TimedOut), _) => {
            return CompleteRequest { exit_code: -1, status: CompletionStatus::TimedOut }
        }
        (Some(StopReason::Cancelled), _) => CompletionStatus::Cancelled,
        (None, 0) => CompletionStatus::Success,
        (None, _) => CompletionStatus::Failed,
    };
    CompleteRequest { exit_code, status }
}

async fn wait_for_abort(abort: &mut watch::Receiver<bool>) {
    // The guard wait_for returns must not live across the branch's awaits.
    let _ = abort.wait_for(|aborting| *aborting).await.map(|_| ());
}

/// `Some(force)` when the control plane asks to cancel.
async fn cancel_requested(ctx: &ExecutionContext, id: &super::api::ExecutionId) -> Option<bool> {
    match ctx.client.cancel_status(id).await {
        Ok(status) if status.cancel_requested => {
            tracing::info!(execution = %id, force = status.force_kill, "cancel requested");
            Some(status.force_kill)
        }
        Ok(_) => None,
        Err(error) => {
            ctx.gate.observe(&error);
            tracing::debug!(execution = %id, "cancel-status check failed: {error}");
            None
        }
    }
}

/// Reads from a pipe that may already be closed (then waits forever, so the
/// `select!` branch simply never fires). `None` at EOF or on error.
async fn read_some(pipe: &mut Option<pipe::Receiver>, buffer: &mut [u8]) -> Option<usize> {
    match pipe {
        Some(pipe) => match pipe.read(buffer).await {
            Ok(0) | Err(_) => None,
            Ok(bytes) => Some(bytes),
        },
        None => std::future::pending().await,
    }
}

/// Numbers chunks across both streams and applies the output cap.
struct ChunkWriter<'a> {
    outbox: &'a Outbox,
    next_number: u64,
    cap: Option<OutputCap>,
    /// Kept up to date so a restart knows the next free chunk number.
    journal: Option<(&'a Journal, Entry)>,
}

impl<'a> ChunkWriter<'a> {
    fn new(outbox: &'a Outbox, cap: Option<usize>, journal: Option<(&'a Journal, Entry)>) -> Self {
        Self { outbox, next_number: 1, cap: cap.map(OutputCap::new), journal }
    }

    fn remember_job(&mut self, entry: &Entry) {
        if let Some((journal, recorded)) = &mut self.journal {
            recorded.pid = entry.pid;
            recorded.pid_start_time = entry.pid_start_time;
            journal.record(recorded);
        }
    }

    fn outbox_id(&self) -> super::api::ExecutionId {
        self.outbox.id().clone()
    }

    async fn flush(&mut self, is_stderr: bool, buffer: &mut StreamBuffer) {
        if buffer.is_empty() {
            return;
        }
        let segments = buffer.take();
        let segments = match &mut self.cap {
            Some(cap) => cap.admit(is_stderr, segments),
            None => segments,
        };
        self.send_as_is(is_stderr, segments).await;
    }

    async fn send_as_is(&mut self, is_stderr: bool, segments: Vec<Segment>) {
        if segments.is_empty() {
            return;
        }
        let chunk = OutputRequest { chunk_number: self.next_number, segments, is_stderr };
        self.next_number += 1;
        if let Some((journal, recorded)) = &mut self.journal {
            recorded.next_chunk = self.next_number;
            journal.record(recorded);
        }
        self.outbox.push(Message::Output(chunk)).await;
    }

    /// Sends what the cap held back for the end.
    async fn finish(&mut self) {
        if let Some(mut cap) = self.cap.take() {
            for (is_stderr, segments) in cap.finish(unix_now()) {
                self.send_as_is(is_stderr, segments).await;
            }
        }
    }
}

fn segment_now(text: &str) -> Segment {
    Segment { timestamp: Some(unix_now()), content: text.to_string() }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_exit_codes() {
        let exited = |code| JobEnd::Exited(ExitStatus::Code { code });
        let killed = |signal| JobEnd::Exited(ExitStatus::Signal { signal });
        assert_eq!(
            completion(None, &exited(0)),
            CompleteRequest { exit_code: 0, status: CompletionStatus::Success }
        );
        assert_eq!(
            completion(None, &exited(3)),
            CompleteRequest { exit_code: 3, status: CompletionStatus::Failed }
        );
        assert_eq!(completion(None, &killed(11)).exit_code, -11);
        assert_eq!(
            completion(Some(StopReason::Cancelled), &killed(15)),
            CompleteRequest { exit_code: -15, status: CompletionStatus::Cancelled }
        );
        assert_eq!(
            completion(Some(StopReason::TimedOut), &killed(9)),
            CompleteRequest { exit_code: -1, status: CompletionStatus::TimedOut }
        );
    }
}
