//! The JSON bodies of the DjangoCommand runner API (see docs/protocol.md;
//! the paths are [`super::route`]):
//! the one definition of the wire messages, used by the runner's client and
//! by `dccontrol`, the local control plane.
//!
//! Answers from the server are read leniently (unknown fields ignored,
//! missing optional fields defaulted), because a control plane newer than
//! this runner must not break it; what we send is exact.

use serde::{Deserialize, Serialize};

use super::commands::SyncedCommand;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub runner_version: String,
    pub python_version: String,
    pub django_version: String,
    pub commands_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    #[serde(default)]
    pub ok: bool,
    #[serde(default = "yes")]
    pub commands_in_sync: bool,
    #[serde(default)]
    pub pending_executions: u64,
    #[serde(default)]
    pub runner_state: RunnerState,
    #[serde(default)]
    pub suspension_reason: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerState {
    #[default]
    Active,
    Suspended,
    /// A state this runner does not know: treated as active.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub commands: Vec<SyncedCommand>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    #[serde(default)]
    pub ok: bool,
    #[serde(default)]
    pub synced_count: u64,
    #[serde(default)]
    pub commands_hash: Option<String>,
}

/// `/pending/`'s answer. Executions stay raw JSON here so that one malformed
/// entry is refused on its own instead of failing the whole poll, and so
/// that entries beyond the free slots are never parsed.
#[derive(Debug, Serialize, Deserialize)]
pub struct PendingResponse {
    pub executions: Vec<Box<serde_json::value::RawValue>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    pub id: ExecutionId,
    pub command: String,
    #[serde(default)]
    pub args: String,
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    #[serde(default)]
    pub use_metadata_only_mode: bool,
    /// Unix seconds when the control plane issued it (signed executions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<i64>,
    /// Base64 Ed25519 signature over the canonical message (see
    /// `supervisor::admission::signing`); checked when `[policy.signing]` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

pub const DEFAULT_EXECUTION_TIMEOUT: u64 = 300;

fn default_timeout() -> u64 {
    DEFAULT_EXECUTION_TIMEOUT
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputRequest {
    pub chunk_number: u64,
    pub segments: Vec<Segment>,
    pub is_stderr: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Unix seconds when the line's first character arrived; `None` for the
    /// continuation of a line whose start went in an earlier chunk.
    pub timestamp: Option<f64>,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub exit_code: i32,
    pub status: CompletionStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompletionStatus {
    Success,
    Failed,
    Cancelled,
    TimedOut,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelStatus {
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default)]
    pub force_kill: bool,
}

/// An execution id: a UUID in its 8-4-4-4-12 hyphenated form (any case),
/// checked before it is ever put into a URL path. The text is kept as the
/// server sent it (paths use it as is), but ids compare, hash and sort in
/// their canonical lowercase form: UUIDs are case-insensitive, and the same
/// execution handed out in two spellings must never run twice.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExecutionId(String);

impl ExecutionId {
    /// The lowercase form every comparison uses.
    pub fn canonical(&self) -> String {
        self.0.to_ascii_lowercase()
    }

    fn canonical_bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.0.bytes().map(|b| b.to_ascii_lowercase())
    }
}

impl PartialEq for ExecutionId {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl Eq for ExecutionId {}

impl std::hash::Hash for ExecutionId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for byte in self.canonical_bytes() {
            state.write_u8(byte);
        }
    }
}

impl Ord for ExecutionId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.canonical_bytes().cmp(other.canonical_bytes())
    }
}

impl PartialOrd for ExecutionId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("execution id {0:?} is not a UUID (8-4-4-4-12 hex digits)")]
pub struct InvalidExecutionId(pub String);

impl ExecutionId {
    pub fn parse(text: &str) -> Result<Self, InvalidExecutionId> {
        let well_formed = text.len() == 36
            && text.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        if well_formed {
            Ok(Self(text.to_string()))
        } else {
            Err(InvalidExecutionId(text.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ExecutionId {
    type Error = InvalidExecutionId;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text)
    }
}

impl From<ExecutionId> for String {
    fn from(id: ExecutionId) -> String {
        id.0
    }
}

impl std::fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execution_ids_must_be_hyphenated_uuids() {
        assert!(ExecutionId::parse("3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b").is_ok());
        assert!(ExecutionId::parse("3F2B8C1E-0A4D-4E5F-9B6A-7C8D9E0F1A2B").is_ok());
        for bad in [
            "../../admin",
            "3f2b8c1e0a4d4e5f9b6a7c8d9e0f1a2b",
            "{3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b}",
            "3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2/",
            "",
        ] {
            assert!(ExecutionId::parse(bad).is_err(), "{bad}");
        }
        let execution: Result<Execution, _> = serde_json::from_str(r#"{"id": "../x", "command": "noop"}"#);
        assert!(execution.is_err());
    }

    #[test]
    fn ids_compare_in_canonical_form() {
        use std::collections::HashSet;
        let lower = ExecutionId::parse("3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b").unwrap();
        let upper = ExecutionId::parse("3F2B8C1E-0A4D-4E5F-9B6A-7C8D9E0F1A2B").unwrap();
        assert_eq!(lower, upper);
        assert_eq!(lower.cmp(&upper), std::cmp::Ordering::Equal);
        assert_eq!(HashSet::from([lower.clone(), upper.clone()]).len(), 1);
        assert_eq!(upper.as_str(), "3F2B8C1E-0A4D-4E5F-9B6A-7C8D9E0F1A2B", "the text is kept as sent");
        assert_eq!(upper.canonical(), lower.as_str());
    }

    #[test]
    fn server_answers_are_read_leniently() {
        let answer: HeartbeatResponse =
            serde_json::from_str(r#"{"ok": true, "runner_state": "paused", "extra": 1}"#).unwrap();
        assert_eq!(answer.runner_state, RunnerState::Unknown);
        assert!(answer.commands_in_sync);
        let execution: Execution = serde_json::from_str(
            r#"{"id": "3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b", "command": "noop", "new_field": []}"#,
        )
        .unwrap();
        assert_eq!((execution.timeout, execution.args.as_str()), (300, ""));
    }

    /// Parses `text` as every answer the runner reads; the result is not
    /// the point, the absence of a panic is.
    fn parse_as_every_answer(text: &[u8]) {
        let _ = serde_json::from_slice::<HeartbeatResponse>(text);
        let _ = serde_json::from_slice::<SyncResponse>(text);
        let _ = serde_json::from_slice::<CancelStatus>(text);
        let _ = serde_json::from_slice::<Execution>(text);
        if let Ok(pending) = serde_json::from_slice::<PendingResponse>(text) {
            for raw in pending.executions {
                let _ = serde_json::from_str::<Execution>(raw.get());
            }
        }
    }

    fn valid_answer() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let id = "3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b";
        let execution = serde_json::json!({
            "id": id, "command": "migrate", "args": "--plan 'a b'", "timeout": 30,
            "use_metadata_only_mode": false, "issued_at": 1_750_000_000, "signature": "AAAA",
        });
        prop::sample::select(vec![
            serde_json::json!({"ok": true, "commands_in_sync": false, "pending_executions": 2,
                               "runner_state": "suspended", "suspension_reason": "billing"}),
            serde_json::json!({"ok": true, "synced_count": 12, "commands_hash": "sha256:00"}),
            serde_json::json!({"executions": [execution.clone(), execution]}),
            serde_json::json!({"cancel_requested": true, "force_kill": false}),
        ])
        .prop_map(|value| serde_json::to_vec(&value).unwrap())
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        /// Any JSON value where an answer was expected is read or refused.
        #[test]
        fn any_json_value_as_any_answer_never_panics(value in crate::proptest_support::json_value()) {
            parse_as_every_answer(&serde_json::to_vec(&value).unwrap());
            // And each value as one execution of a poll's answer.
            let pending = serde_json::json!({ "executions": [value] });
            parse_as_every_answer(&serde_json::to_vec(&pending).unwrap());
        }

        /// Valid answers, cut short or with bytes changed (a proxy, a bug).
        #[test]
        fn mutated_answers_never_panic(
            answer in valid_answer(),
            changes in crate::proptest_support::mutations(),
        ) {
            parse_as_every_answer(&crate::proptest_support::mutate(answer, &changes));
        }

        #[test]
        fn random_bytes_as_answers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            parse_as_every_answer(&bytes);
        }

        /// An accepted id is a UUID's text, so it can go into a URL path as is.
        #[test]
        fn an_accepted_id_is_36_hex_digits_and_hyphens(text in "[0-9a-fA-F-]{30,40}|.{0,40}") {
            if let Ok(id) = ExecutionId::parse(&text) {
                proptest::prop_assert_eq!(id.as_str().len(), 36);
                proptest::prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
            }
        }
    }

    /// serde_json's recursion limit refuses a deeply nested answer; no stack overflow.
    #[test]
    fn deeply_nested_answers_are_refused() {
        let depth = 100_000;
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        parse_as_every_answer(nested.as_bytes());
        let in_field = format!("{{\"executions\": [{}{}]}}", "{\"a\":".repeat(depth), "}".repeat(depth));
        parse_as_every_answer(in_field.as_bytes());
        assert!(serde_json::from_str::<PendingResponse>(&in_field).is_err());
    }
}
