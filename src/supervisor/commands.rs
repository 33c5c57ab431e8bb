//! What this runner syncs to the control plane: the discovered commands
//! the policy lets through. The catalog's wire form and its hash are
//! `protocol::commands`.

use super::admission::policy::Policy;
use crate::ipc::CommandInfo;
use crate::protocol::commands::SyncedCommand;

/// The discovered commands the policy lets through, sorted by name.
pub fn synced_commands(discovered: &[CommandInfo], policy: &Policy) -> Vec<SyncedCommand> {
    let mut synced: Vec<SyncedCommand> = discovered
        .iter()
        .filter(|c| policy.check(&c.name).is_ok())
        .map(|c| SyncedCommand {
            name: c.name.clone(),
            app_label: c.app_label.clone(),
            help_text: c.help_text.clone(),
            bound_args: None,
        })
        .collect();
    synced.sort_by(|a, b| a.name.cmp(&b.name));
    synced
}
