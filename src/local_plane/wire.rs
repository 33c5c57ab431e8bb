//! The JSON bodies of the operator API (`/api/operator/...`): how a person or
//! a test queues executions, reads them back, steers the runner and injects
//! faults. Shared by the server (`routes`) and the client subcommands
//! (`operator`), so both sides always agree on the field names.
//!
//! The runner API's bodies are not here: they are the library's
//! `crate::protocol::api` types, the same ones the runner sends.

use std::collections::BTreeMap;

use crate::protocol::api::{CompletionStatus, ExecutionId, RunnerState, Segment, DEFAULT_EXECUTION_TIMEOUT};
use crate::protocol::commands::SyncedCommand;
use serde::{Deserialize, Serialize};

/// `POST /api/operator/executions`: queue a command for the runner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewExecution {
    pub command: String,
    /// One string, split by the runner like a POSIX shell would.
    #[serde(default)]
    pub args: String,
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    #[serde(default)]
    pub use_metadata_only_mode: bool,
    /// The id to give it (a test that signs the entry itself needs it
    /// beforehand); a new UUID v4 when absent. Taken ids are refused (409).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ExecutionId>,
    /// Fields replaced in the entry `/pending/` hands out, after signing
    /// (`null` removes one): how a test plays a tampering or forging control
    /// plane while the execution still exists here to be started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_overrides: Option<serde_json::Map<String, serde_json::Value>>,
}

impl NewExecution {
    /// `command` with its arguments (one string, split like a POSIX shell
    /// would) and the defaults: the default timeout, output captured, a new id.
    pub fn new(command: &str, args: &str) -> Self {
        Self {
            command: command.into(),
            args: args.into(),
            timeout: DEFAULT_EXECUTION_TIMEOUT,
            use_metadata_only_mode: false,
            id: None,
            pending_overrides: None,
        }
    }
}

fn default_timeout() -> u64 {
    DEFAULT_EXECUTION_TIMEOUT
}

/// The answer to queueing: the new execution's id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    pub id: ExecutionId,
}

/// Where an execution is in its life, as the operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    /// Queued, not started by a runner yet.
    Pending,
    Running,
    Success,
    Failed,
    Cancelled,
    TimedOut,
}

impl ExecutionStatus {
    pub fn is_finished(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

impl From<CompletionStatus> for ExecutionStatus {
    fn from(status: CompletionStatus) -> Self {
        match status {
            CompletionStatus::Success => Self::Success,
            CompletionStatus::Failed => Self::Failed,
            CompletionStatus::Cancelled => Self::Cancelled,
            CompletionStatus::TimedOut => Self::TimedOut,
        }
    }
}

/// One execution in `GET /api/operator/executions`. Times are unix seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionSummary {
    pub id: ExecutionId,
    pub command: String,
    pub args: String,
    pub timeout: u64,
    pub use_metadata_only_mode: bool,
    pub status: ExecutionStatus,
    pub exit_code: Option<i32>,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub completed_at: Option<f64>,
}

/// `GET /api/operator/executions`: oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionList {
    pub executions: Vec<ExecutionSummary>,
}

/// `GET /api/operator/executions/<id>`: the summary plus the output, one
/// entry per chunk number (duplicates already dropped), sorted by number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionDetail {
    #[serde(flatten)]
    pub summary: ExecutionSummary,
    pub chunks: Vec<ChunkView>,
    pub cancel_requested: bool,
    pub force_kill: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkView {
    pub chunk_number: u64,
    pub is_stderr: bool,
    pub segments: Vec<Segment>,
}

/// `POST /api/operator/executions/<id>/cancel`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CancelRequest {
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelAnswer {
    pub ok: bool,
    pub cancel_requested: bool,
    pub force_kill: bool,
}

/// `POST /api/operator/runner-state`: what the next heartbeats answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerStateRequest {
    pub state: RunnerState,
    #[serde(default)]
    pub reason: Option<String>,
}

/// `GET /api/operator/state`: what the runner last told us.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateView {
    pub runner: RunnerView,
    /// The last synced list, as the runner sent it (empty before any sync).
    pub commands: Vec<SyncedCommand>,
    /// The hash of that list, `null` before any sync.
    pub commands_hash: Option<String>,
    /// Heartbeats processed (those a fault answered are not counted).
    pub heartbeats: u64,
    pub runner_state: RunnerState,
    pub suspension_reason: Option<String>,
}

/// The versions from the last heartbeat; all `null` before the first one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunnerView {
    pub runner_version: Option<String>,
    pub python_version: Option<String>,
    pub django_version: Option<String>,
    pub last_heartbeat: Option<f64>,
}

/// One runner-API request as it arrived, for tests that check what the
/// runner sent on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedRequest {
    pub seq: u64,
    pub method: String,
    /// Path and query, exactly as sent.
    pub path: String,
    /// Lowercased names; the bearer key is never logged.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON; `null` if empty or not JSON.
    pub body: serde_json::Value,
    /// The body as text when it was not JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_body: Option<String>,
    /// What we answered; `null` while the request is still being handled.
    pub status: Option<u16>,
    pub time: f64,
}

/// `GET /api/operator/requests`: in arrival order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestLog {
    pub requests: Vec<LoggedRequest>,
}

/// `POST /api/operator/faults`: a scripted misbehaviour of the runner API.
///
/// This is the fault-spec format (also in docs/protocol.md, "Testing against
/// dccontrol"); tests and the chaos test build these as JSON, so fields are
/// only ever added, with defaults that keep older specs meaning the same.
///
/// Matching: a runner request matches when its path starts with
/// `path_prefix` and, if `endpoint` is given, is that endpoint. Faults are
/// kept in the order they were added and the OLDEST matching one is used, so
/// adding several for one endpoint scripts its attempts one by one (a spec
/// with `status: 0` and nothing else lets one attempt through untouched).
/// A fault is used up after `count` matches, or when `duration_ms` (counted
/// from when it was added) has passed, whichever comes first.
///
/// What it does to a matched request, in this order:
/// 1. `after_processing`: the request is processed normally first (the
///    store changes), and the steps below apply to its answer: the server
///    did the work but the runner never learns it, or learns it late;
/// 2. waits `delay_ms` (a stall; the runner's `request_timeout` may fire);
/// 3. `reset`: closes the connection without any answer;
/// 4. answers `status` (any code from 200 to 599; redirects carry
///    `Location`, never followed here) with `body`, or an HTML error page
///    with `html`, or `{"detail": "injected fault"}`, plus `Retry-After` if
///    given — without touching the store; `status: 0` gives the normal
///    answer instead (processing the request now, unless step 1 did);
/// 5. `cut_body`: the answer's headers announce the whole body but only half
///    of it is sent before the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSpec {
    #[serde(default = "every_runner_path")]
    pub path_prefix: String,
    /// Only this endpoint of the runner API, whatever the execution id.
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    /// 0: no answer of our own (the request is processed normally, after
    /// `delay_ms`, and may still be `reset` or `cut_body`).
    #[serde(default)]
    pub status: u16,
    /// How many matching requests it takes; 1 when absent, unlimited when
    /// absent and `duration_ms` is given (an outage).
    #[serde(default)]
    pub count: Option<u64>,
    /// Milliseconds from now during which it is active.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// The raw answer body; `{"detail": "injected fault"}` when absent.
    #[serde(default)]
    pub body: Option<String>,
    /// Answer an HTML error page (`text/html`), as a proxy or CDN does.
    #[serde(default)]
    pub html: bool,
    /// The `Location` header; a 3xx without it points to `/moved` + the path.
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Seconds, sent as the `Retry-After` header.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// Close the connection without answering.
    #[serde(default)]
    pub reset: bool,
    /// Send half of the announced body, then close the connection.
    #[serde(default)]
    pub cut_body: bool,
    /// Process the request first, then misbehave on its answer.
    #[serde(default)]
    pub after_processing: bool,
}

impl Default for FaultSpec {
    /// Matches every runner request once and changes nothing: set the fields
    /// that make it a fault.
    fn default() -> Self {
        Self {
            path_prefix: every_runner_path(),
            endpoint: None,
            status: 0,
            count: None,
            duration_ms: None,
            body: None,
            html: false,
            location: None,
            delay_ms: None,
            retry_after: None,
            reset: false,
            cut_body: false,
            after_processing: false,
        }
    }
}

impl FaultSpec {
    /// How many requests it may take (`u64::MAX`: until its time is up).
    pub fn uses(&self) -> u64 {
        match (self.count, self.duration_ms) {
            (Some(count), _) => count,
            (None, Some(_)) => u64::MAX,
            (None, None) => 1,
        }
    }

    /// Why this spec cannot be honoured, if it cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if self.status != 0 && !(200..=599).contains(&self.status) {
            return Some("status must be 0 (no answer of our own) or an HTTP status from 200 to 599");
        }
        if self.uses() == 0 {
            return Some("count must be at least 1");
        }
        if self.reset && self.cut_body {
            return Some("reset and cut_body exclude each other");
        }
        if self.location.as_deref().is_some_and(|l| http::HeaderValue::from_str(l).is_err()) {
            return Some("location must be a valid header value");
        }
        if self.html && self.body.is_some() {
            return Some("html and body exclude each other");
        }
        None
    }
}

/// The runner API's endpoints, as a fault names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Endpoint {
    Heartbeat,
    Sync,
    Pending,
    Start,
    Output,
    Complete,
    CancelStatus,
}

fn every_runner_path() -> String {
    crate::protocol::route::RUNNER_PREFIX.into()
}

/// `POST /api/operator/inject-pending`: raw entries the next `/pending/`
/// answer carries once, malformed or not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InjectPending {
    pub executions: Vec<serde_json::Value>,
}
