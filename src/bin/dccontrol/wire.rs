//! The JSON bodies of the operator API (`/api/operator/...`): how a person or
//! a test queues executions, reads them back, steers the runner and injects
//! faults. Shared by the server (`routes`) and the client subcommands
//! (`operator`), so both sides always agree on the field names.
//!
//! The runner API's bodies are not here: they are the library's
//! `dcsupervisor::supervisor::api` types, the same ones the runner sends.

use std::collections::BTreeMap;

use dcsupervisor::supervisor::api::{
    CompletionStatus, ExecutionId, RunnerState, Segment, DEFAULT_EXECUTION_TIMEOUT,
};
use dcsupervisor::supervisor::commands::SyncedCommand;
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// `POST /api/operator/faults`: answer the next `count` runner requests whose
/// path starts with `path_prefix` with `status` instead of processing them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSpec {
    #[serde(default = "every_runner_path")]
    pub path_prefix: String,
    /// 0: no answer of our own, only `delay_ms`, then normal processing.
    pub status: u16,
    #[serde(default = "one")]
    pub count: u64,
    /// The raw answer body; `{"detail": "injected fault"}` when absent.
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Seconds, sent as the `Retry-After` header.
    #[serde(default)]
    pub retry_after: Option<u64>,
}

fn every_runner_path() -> String {
    "/api/runner/".into()
}

fn one() -> u64 {
    1
}

/// `POST /api/operator/inject-pending`: raw entries the next `/pending/`
/// answer carries once, malformed or not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InjectPending {
    pub executions: Vec<serde_json::Value>,
}
