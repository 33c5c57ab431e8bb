//! `[[policy.concurrency]]`: at most so many executions of a command at once
//! on this runner (e.g. one `migrate`). The runner asks when it takes an
//! execution from the pending list: one that must wait is left queued on the
//! server, one that must be refused goes through the rejection flow.

use std::collections::{BTreeMap, HashMap};

use super::{Rejection, Rule};
use crate::protocol::api::ExecutionId;

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

/// Whether an execution may be taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Free,
    /// Leave it queued on the server until one of the running ones ends.
    Wait,
}

/// `running`: the executions taken by this runner, with their command.
pub fn check(
    running: &HashMap<ExecutionId, String>,
    limits: &BTreeMap<String, CommandLimit>,
    command: &str,
) -> Result<Slot, Rejection> {
    let Some(limit) = limits.get(command) else {
        return Ok(Slot::Free);
    };
    let same = running.values().filter(|running| running.as_str() == command).count();
    match (same >= limit.max_running, limit.when_busy) {
        (false, _) => Ok(Slot::Free),
        (true, WhenBusy::Wait) => Ok(Slot::Wait),
        (true, WhenBusy::Refuse) => Err(Rejection::new(
            Rule::Concurrency,
            format!(
                "at most {} '{command}' may run at a time on this runner, and that many are running",
                limit.max_running
            ),
            "Run it again once they have finished, or change the rule in [[policy.concurrency]] in dc.toml.\n",
        )),
    }
}
