//! The control plane's state, in memory only: the executions and their
//! output, what the runner last reported, the synced commands, the operator's
//! runner-state setting, and the test hooks (seen nonces, request log,
//! faults, injected `/pending/` entries), and the key that signs the
//! executions handed out, if `serve` was given one.
//!
//! Every method is synchronous and quick: the server keeps the store behind
//! one mutex and never holds it across an `await`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::protocol::api::{
    CancelStatus, CompleteRequest, Execution, ExecutionId, HeartbeatRequest, HeartbeatResponse,
    OutputRequest, PendingResponse, RunnerState, Segment, SyncResponse,
};
use crate::protocol::commands::{commands_hash, SyncedCommand};
use crate::protocol::signed;
use ed25519_dalek::SigningKey;

use super::wire::{
    ChunkView, Endpoint, ExecutionDetail, ExecutionStatus, ExecutionSummary, FaultSpec, LoggedRequest,
    NewExecution, RunnerView, StateView,
};

/// Why the store refused an operation on an execution.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no execution with id {0}")]
    UnknownExecution(ExecutionId),
    /// The operation does not fit the execution's state (started twice,
    /// completed twice, ...).
    #[error("{0}")]
    Conflict(String),
}

/// Unix seconds, with sub-second precision.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[derive(Default)]
pub struct Store {
    /// In creation order, which is the order `/pending/` hands them out.
    executions: Vec<ExecutionRecord>,
    /// Lowercased id → index in `executions`: ids are UUIDs, which compare
    /// case-insensitively.
    index: HashMap<String, usize>,
    runner: RunnerView,
    heartbeats: u64,
    commands: Vec<SyncedCommand>,
    commands_hash: Option<String>,
    runner_state: RunnerState,
    suspension_reason: Option<String>,
    /// Every nonce ever accepted. Never pruned: requests are not signed, so a
    /// replay could come back with a fresh timestamp, and a test run is far
    /// too short for the set to matter.
    nonces: HashSet<String>,
    requests: Vec<LoggedRequest>,
    next_seq: u64,
    faults: Vec<ActiveFault>,
    injected_pending: Vec<serde_json::Value>,
    /// Signs every execution `/pending/` hands out (`serve --signing-key`).
    signing_key: Option<SigningKey>,
}

struct ExecutionRecord {
    id: ExecutionId,
    request: NewExecution,
    status: ExecutionStatus,
    exit_code: Option<i32>,
    created_at: f64,
    started_at: Option<f64>,
    completed_at: Option<f64>,
    /// Keyed by chunk number: the runner retries a chunk with the same
    /// number, so the first one stored wins and the map keeps them ordered.
    chunks: BTreeMap<u64, StoredChunk>,
    cancel: CancelStatus,
}

struct StoredChunk {
    is_stderr: bool,
    segments: Vec<Segment>,
}

struct ActiveFault {
    spec: FaultSpec,
    remaining: u64,
    /// Unix seconds after which it no longer applies.
    expires_at: Option<f64>,
}

impl ExecutionRecord {
    fn summary(&self) -> ExecutionSummary {
        ExecutionSummary {
            id: self.id.clone(),
            command: self.request.command.clone(),
            args: self.request.args.clone(),
            timeout: self.request.timeout,
            use_metadata_only_mode: self.request.use_metadata_only_mode,
            status: self.status,
            exit_code: self.exit_code,
            created_at: self.created_at,
            started_at: self.started_at,
            completed_at: self.completed_at,
        }
    }

    fn detail(&self) -> ExecutionDetail {
        let chunks = self
            .chunks
            .iter()
            .map(|(number, chunk)| ChunkView {
                chunk_number: *number,
                is_stderr: chunk.is_stderr,
                segments: chunk.segments.clone(),
            })
            .collect();
        ExecutionDetail {
            summary: self.summary(),
            chunks,
            cancel_requested: self.cancel.cancel_requested,
            force_kill: self.cancel.force_kill,
        }
    }

    /// The execution as `/pending/` lists it: signed with `key` (issued at
    /// its creation time), then the test's overrides applied.
    fn pending_entry(&self, key: Option<&SigningKey>) -> serde_json::Value {
        let mut execution = Execution {
            id: self.id.clone(),
            command: self.request.command.clone(),
            args: self.request.args.clone(),
            timeout: self.request.timeout,
            use_metadata_only_mode: self.request.use_metadata_only_mode,
            issued_at: None,
            signature: None,
        };
        if let Some(key) = key {
            let issued_at = self.created_at as i64;
            execution.signature = Some(signed::sign(key, &execution, issued_at));
            execution.issued_at = Some(issued_at);
        }
        let mut entry = serde_json::to_value(&execution).expect("an execution serializes");
        if let (Some(fields), Some(overrides)) = (entry.as_object_mut(), &self.request.pending_overrides) {
            for (name, value) in overrides {
                match value {
                    serde_json::Value::Null => fields.remove(name),
                    value => fields.insert(name.clone(), value.clone()),
                };
            }
        }
        entry
    }

    fn conflict(&self, action: &str) -> StoreError {
        StoreError::Conflict(format!(
            "cannot {action} execution {}: it is {}",
            self.id,
            match self.status {
                ExecutionStatus::Pending => "not started".to_string(),
                ExecutionStatus::Running => "already running".to_string(),
                finished => format!("already completed ({})", finished.as_str()),
            }
        ))
    }
}

// The runner API.
impl Store {
    pub fn heartbeat(&mut self, report: HeartbeatRequest, now: f64) -> HeartbeatResponse {
        let commands_in_sync = self.commands_hash.as_deref() == Some(report.commands_hash.as_str());
        self.runner = RunnerView {
            runner_version: Some(report.runner_version),
            python_version: Some(report.python_version),
            django_version: Some(report.django_version),
            last_heartbeat: Some(now),
        };
        self.heartbeats += 1;
        HeartbeatResponse {
            ok: true,
            commands_in_sync,
            pending_executions: self.queued().count() as u64,
            runner_state: self.runner_state,
            suspension_reason: self.suspension_reason.clone(),
        }
    }

    pub fn sync(&mut self, commands: Vec<SyncedCommand>) -> SyncResponse {
        let hash = commands_hash(&commands);
        let synced_count = commands.len() as u64;
        self.commands = commands;
        self.commands_hash = Some(hash.clone());
        SyncResponse { ok: true, synced_count, commands_hash: Some(hash) }
    }

    /// Queued executions, oldest first, then the injected raw entries (handed
    /// out once).
    pub fn pending(&mut self) -> PendingResponse {
        let key = self.signing_key.as_ref();
        let mut executions: Vec<serde_json::Value> = self.queued().map(|e| e.pending_entry(key)).collect();
        executions.append(&mut self.injected_pending);
        let executions =
            executions.iter().filter_map(|entry| serde_json::value::to_raw_value(entry).ok()).collect();
        PendingResponse { executions }
    }

    pub fn start(&mut self, id: &ExecutionId, now: f64) -> Result<(), StoreError> {
        let execution = self.execution_mut(id)?;
        if execution.status != ExecutionStatus::Pending {
            return Err(execution.conflict("start"));
        }
        execution.status = ExecutionStatus::Running;
        execution.started_at = Some(now);
        Ok(())
    }

    pub fn output(&mut self, id: &ExecutionId, chunk: OutputRequest) -> Result<(), StoreError> {
        let execution = self.execution_mut(id)?;
        execution
            .chunks
            .entry(chunk.chunk_number)
            .or_insert(StoredChunk { is_stderr: chunk.is_stderr, segments: chunk.segments });
        Ok(())
    }

    pub fn complete(&mut self, id: &ExecutionId, end: CompleteRequest, now: f64) -> Result<(), StoreError> {
        let execution = self.execution_mut(id)?;
        if execution.status.is_finished() {
            return Err(execution.conflict("complete"));
        }
        execution.status = end.status.into();
        execution.exit_code = Some(end.exit_code);
        execution.completed_at = Some(now);
        Ok(())
    }

    pub fn cancel_status(&self, id: &ExecutionId) -> Result<CancelStatus, StoreError> {
        Ok(self.execution(id)?.cancel)
    }

    /// Records a nonce; false if it was seen before (a replay).
    pub fn accept_nonce(&mut self, nonce: &str) -> bool {
        self.nonces.insert(nonce.to_ascii_lowercase())
    }

    fn queued(&self) -> impl Iterator<Item = &ExecutionRecord> {
        self.executions.iter().filter(|e| e.status == ExecutionStatus::Pending)
    }

    fn execution(&self, id: &ExecutionId) -> Result<&ExecutionRecord, StoreError> {
        self.index
            .get(&id.as_str().to_ascii_lowercase())
            .map(|&i| &self.executions[i])
            .ok_or_else(|| StoreError::UnknownExecution(id.clone()))
    }

    fn execution_mut(&mut self, id: &ExecutionId) -> Result<&mut ExecutionRecord, StoreError> {
        match self.index.get(&id.as_str().to_ascii_lowercase()) {
            Some(&i) => Ok(&mut self.executions[i]),
            None => Err(StoreError::UnknownExecution(id.clone())),
        }
    }
}

// The operator API.
impl Store {
    pub fn new(signing_key: Option<SigningKey>) -> Self {
        Self { signing_key, ..Self::default() }
    }

    pub fn queue(&mut self, request: NewExecution, now: f64) -> Result<ExecutionId, StoreError> {
        let id = match &request.id {
            Some(id) if self.execution(id).is_ok() => {
                return Err(StoreError::Conflict(format!("execution {id} already exists")))
            }
            Some(id) => id.clone(),
            None => ExecutionId::parse(&uuid::Uuid::new_v4().to_string())
                .expect("a v4 UUID is in the hyphenated form"),
        };
        self.index.insert(id.as_str().to_ascii_lowercase(), self.executions.len());
        self.executions.push(ExecutionRecord {
            id: id.clone(),
            request,
            status: ExecutionStatus::Pending,
            exit_code: None,
            created_at: now,
            started_at: None,
            completed_at: None,
            chunks: BTreeMap::new(),
            cancel: CancelStatus::default(),
        });
        Ok(id)
    }

    /// The entry `/pending/` hands out for this execution, exactly (signed
    /// if `serve` signs): a test can inject it again as a replay.
    pub fn pending_entry(&self, id: &ExecutionId) -> Result<serde_json::Value, StoreError> {
        Ok(self.execution(id)?.pending_entry(self.signing_key.as_ref()))
    }

    pub fn list(&self) -> Vec<ExecutionSummary> {
        self.executions.iter().map(ExecutionRecord::summary).collect()
    }

    pub fn detail(&self, id: &ExecutionId) -> Result<ExecutionDetail, StoreError> {
        Ok(self.execution(id)?.detail())
    }

    /// Asks the runner to stop the execution (it learns so by polling
    /// cancel-status). A queued execution stays queued: the runner that picks
    /// it up sees the request on its first poll, as with the hosted service.
    pub fn cancel(&mut self, id: &ExecutionId, force: bool) -> Result<CancelStatus, StoreError> {
        let execution = self.execution_mut(id)?;
        if execution.status.is_finished() {
            return Err(execution.conflict("cancel"));
        }
        execution.cancel.cancel_requested = true;
        execution.cancel.force_kill |= force;
        Ok(execution.cancel)
    }

    pub fn set_runner_state(&mut self, state: RunnerState, reason: Option<String>) {
        self.runner_state = state;
        // A reason only means something while suspended.
        self.suspension_reason = reason.filter(|_| state == RunnerState::Suspended);
    }

    pub fn state(&self) -> StateView {
        StateView {
            runner: self.runner.clone(),
            commands: self.commands.clone(),
            commands_hash: self.commands_hash.clone(),
            heartbeats: self.heartbeats,
            runner_state: self.runner_state,
            suspension_reason: self.suspension_reason.clone(),
        }
    }

    /// Logs a request on arrival (so the log is in arrival order even when a
    /// delayed one finishes last); its status is filled in by [`Self::log_answer`].
    pub fn log_arrival(&mut self, mut entry: LoggedRequest) -> u64 {
        self.next_seq += 1;
        entry.seq = self.next_seq;
        self.requests.push(entry);
        self.next_seq
    }

    pub fn log_answer(&mut self, seq: u64, status: u16) {
        // The log may have been cleared meanwhile; then there is nothing to fill in.
        if let Some(entry) = self.requests.iter_mut().rev().find(|e| e.seq == seq) {
            entry.status = Some(status);
        }
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.requests.clone()
    }

    pub fn clear_requests(&mut self) {
        self.requests.clear();
    }

    pub fn add_fault(&mut self, spec: FaultSpec, now: f64) {
        let remaining = spec.uses();
        let expires_at = spec.duration_ms.map(|ms| now + ms as f64 / 1000.0);
        self.faults.push(ActiveFault { spec, remaining, expires_at });
    }

    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// The oldest fault matching `path` (of `endpoint`) at `now`, using up
    /// one of its count. Expired faults are forgotten on the way.
    pub fn take_fault(&mut self, path: &str, endpoint: Option<Endpoint>, now: f64) -> Option<FaultSpec> {
        self.faults.retain(|f| f.expires_at.is_none_or(|end| now < end));
        let i = self.faults.iter().position(|f| {
            path.starts_with(&f.spec.path_prefix) && f.spec.endpoint.is_none_or(|e| Some(e) == endpoint)
        })?;
        let fault = &mut self.faults[i];
        fault.remaining -= 1;
        let spec = fault.spec.clone();
        if fault.remaining == 0 {
            self.faults.remove(i);
        }
        Some(spec)
    }

    pub fn inject_pending(&mut self, entries: Vec<serde_json::Value>) {
        self.injected_pending.extend(entries);
    }
}

#[cfg(test)]
mod tests {
    use crate::protocol::api::CompletionStatus;
    use serde_json::json;

    use super::*;

    fn request() -> NewExecution {
        NewExecution {
            command: "noop".into(),
            args: String::new(),
            timeout: 300,
            use_metadata_only_mode: false,
            id: None,
            pending_overrides: None,
        }
    }

    fn queue(store: &mut Store) -> ExecutionId {
        store.queue(request(), 1.0).unwrap()
    }

    fn chunk(number: u64, content: &str) -> OutputRequest {
        OutputRequest {
            chunk_number: number,
            segments: vec![Segment { timestamp: None, content: content.into() }],
            is_stderr: false,
        }
    }

    #[test]
    fn an_execution_goes_through_its_life_once() {
        let mut store = Store::default();
        let id = queue(&mut store);
        assert_eq!(store.pending().executions.len(), 1);
        store.start(&id, 2.0).unwrap();
        assert!(matches!(store.start(&id, 2.0), Err(StoreError::Conflict(_))));
        assert!(store.pending().executions.is_empty());
        for (n, text) in [(2, "b"), (1, "a"), (2, "again")] {
            store.output(&id, chunk(n, text)).unwrap();
        }
        let end = CompleteRequest { exit_code: 0, status: CompletionStatus::Success };
        store.complete(&id, end, 3.0).unwrap();
        assert!(matches!(store.complete(&id, end, 3.0), Err(StoreError::Conflict(_))));
        let detail = store.detail(&id).unwrap();
        let contents: Vec<&str> = detail.chunks.iter().map(|c| c.segments[0].content.as_str()).collect();
        assert_eq!(contents, ["a", "b"]);
        assert_eq!(detail.summary.status, ExecutionStatus::Success);
    }

    #[test]
    fn ids_are_found_whatever_their_case() {
        let mut store = Store::default();
        let id = queue(&mut store);
        let upper = ExecutionId::parse(&id.as_str().to_ascii_uppercase()).unwrap();
        assert!(store.cancel_status(&upper).is_ok());
    }

    fn fault(json: serde_json::Value) -> FaultSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_fault_is_used_up_after_count_matches() {
        let mut store = Store::default();
        store
            .add_fault(fault(json!({"path_prefix": "/api/runner/pending/", "status": 500, "count": 2})), 0.0);
        assert!(store.take_fault("/api/runner/heartbeat/", Some(Endpoint::Heartbeat), 0.0).is_none());
        assert!(store.take_fault("/api/runner/pending/", Some(Endpoint::Pending), 0.0).is_some());
        assert!(store.take_fault("/api/runner/pending/", Some(Endpoint::Pending), 0.0).is_some());
        assert!(store.take_fault("/api/runner/pending/", Some(Endpoint::Pending), 0.0).is_none());
    }

    #[test]
    fn faults_script_an_endpoint_attempt_by_attempt_and_outages_end() {
        let mut store = Store::default();
        let output = "/api/runner/executions/3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b/output/";
        store.add_fault(fault(json!({"endpoint": "output", "status": 307})), 0.0);
        store.add_fault(fault(json!({"endpoint": "output", "status": 0})), 0.0);
        store.add_fault(fault(json!({"endpoint": "output", "status": 200, "html": true})), 0.0);
        store.add_fault(fault(json!({"status": 503, "duration_ms": 1000})), 0.0);
        let statuses: Vec<u16> = (0..4)
            .map(|_| store.take_fault(output, Some(Endpoint::Output), 0.5).map_or(0, |f| f.status))
            .collect();
        assert_eq!(statuses, [307, 0, 200, 503]);
        assert_eq!(
            store.take_fault("/api/runner/pending/", Some(Endpoint::Pending), 0.9).unwrap().status,
            503
        );
        assert!(store.take_fault("/api/runner/pending/", Some(Endpoint::Pending), 1.0).is_none());
    }

    #[test]
    fn impossible_faults_are_refused() {
        for bad in [
            json!({"status": 99}),
            json!({"status": 600}),
            json!({"status": 500, "count": 0}),
            json!({"reset": true, "cut_body": true}),
            json!({"status": 200, "html": true, "body": "x"}),
        ] {
            assert!(fault(bad.clone()).problem().is_some(), "{bad}");
        }
        assert!(serde_json::from_value::<FaultSpec>(json!({"endpoint": "nope"})).is_err());
        assert_eq!(fault(json!({})).problem(), None);
    }

    #[test]
    fn injected_entries_are_handed_out_once() {
        let mut store = Store::default();
        store.inject_pending(vec![json!({"id": "../x"})]);
        assert_eq!(store.pending().executions.len(), 1);
        assert!(store.pending().executions.is_empty());
    }

    #[test]
    fn a_signing_store_signs_what_pending_hands_out() {
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let mut store = Store::new(Some(key.clone()));
        let id = queue(&mut store);
        let entry: serde_json::Value = serde_json::from_str(store.pending().executions[0].get()).unwrap();
        assert_eq!(entry, store.pending_entry(&id).unwrap());
        assert_eq!(entry["issued_at"], 1);
        let execution: Execution = serde_json::from_value(entry).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let checks =
            crate::supervisor::admission::signing::Signing::new(key.verifying_key(), 300, dir.path());
        assert_eq!(checks.accept(&execution, 2), Ok(()));

        // A chosen id, and fields replaced after signing.
        let chosen = ExecutionId::parse("3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b").unwrap();
        let overrides = json!({"args": "--evil", "signature": null});
        let request = NewExecution {
            id: Some(chosen.clone()),
            pending_overrides: overrides.as_object().cloned(),
            ..request()
        };
        assert_eq!(store.queue(request.clone(), 1.0).unwrap(), chosen);
        assert!(matches!(store.queue(request, 1.0), Err(StoreError::Conflict(_))));
        let entry = store.pending_entry(&chosen).unwrap();
        assert_eq!((entry["args"].as_str(), entry.get("signature")), (Some("--evil"), None));

        // Without a key, entries are as before.
        let mut plain = Store::default();
        let id = queue(&mut plain);
        let entry = plain.pending_entry(&id).unwrap();
        assert_eq!(entry.as_object().unwrap().len(), 5, "{entry}");
    }
}
