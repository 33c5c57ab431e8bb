//! Which commands may run here, decided by this runner whatever the control
//! plane asks: allowlist mode (the default) or blocklist mode, with the
//! default lists from `python/djangocommand/default_commands.json`, the same
//! file the Python package reads.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use super::{Rejection, Rule};

/// The runner's own management command: never synced, never run remotely.
pub const RUNNER_COMMAND: &str = "djangocommand";

const DEFAULTS_JSON: &str = include_str!("../../../python/djangocommand/default_commands.json");

#[derive(Deserialize)]
struct Defaults {
    allowed: Vec<String>,
    disallowed: Vec<String>,
    runner_command: String,
}

static DEFAULTS: LazyLock<Defaults> = LazyLock::new(|| {
    let defaults: Defaults =
        serde_json::from_str(DEFAULTS_JSON).expect("default_commands.json is valid (tested)");
    assert_eq!(defaults.runner_command, RUNNER_COMMAND);
    defaults
});

pub fn default_allowed_commands() -> &'static [String] {
    &DEFAULTS.allowed
}

pub fn default_disallowed_commands() -> &'static [String] {
    &DEFAULTS.disallowed
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only listed commands run (the default, and the safe choice).
    #[default]
    Allowlist,
    /// Every command runs except the listed ones.
    Blocklist,
}

/// Where the operator configures the policy, so refusals say what to edit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfiguredIn {
    #[default]
    DcToml,
    DjangoSettings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub allowed: BTreeSet<String>,
    pub disallowed: BTreeSet<String>,
    pub configured_in: ConfiguredIn,
}

/// Why a command may not run. The texts are the ones clients show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotAllowlisted,
    Blocklisted,
    RunnerCommand,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::NotAllowlisted => "not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist",
            Refusal::Blocklisted => "in DJANGOCOMMAND_DISALLOWED_COMMANDS blocklist",
            Refusal::RunnerCommand => "the runner's own command is never run remotely",
        })
    }
}

impl Policy {
    /// The defaults: allowlist mode with the default allowlist.
    pub fn default_allowlist() -> Self {
        Self {
            mode: Mode::Allowlist,
            allowed: default_allowed_commands().iter().cloned().collect(),
            disallowed: default_disallowed_commands().iter().cloned().collect(),
            configured_in: ConfiguredIn::DcToml,
        }
    }

    pub fn check(&self, command: &str) -> Result<(), Refusal> {
        if command == RUNNER_COMMAND {
            return Err(Refusal::RunnerCommand);
        }
        match self.mode {
            Mode::Allowlist if !self.allowed.contains(command) => Err(Refusal::NotAllowlisted),
            Mode::Blocklist if self.disallowed.contains(command) => Err(Refusal::Blocklisted),
            _ => Ok(()),
        }
    }

    /// The names among `discovered` that this policy lets through, sorted.
    pub fn filter<'a>(&self, discovered: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        let mut allowed: Vec<&str> = discovered.into_iter().filter(|name| self.check(name).is_ok()).collect();
        allowed.sort_unstable();
        allowed
    }

    /// Why a refused command may not run, and how to allow it.
    pub fn rejection(&self, command: &str, refusal: &Refusal) -> Rejection {
        let how = match (refusal, self.configured_in) {
            (Refusal::RunnerCommand, _) => {
                "The runner does not run its own management command remotely.\n".to_string()
            }
            (Refusal::Blocklisted, ConfiguredIn::DjangoSettings) => {
                "To allow this command, remove it from DJANGOCOMMAND_DISALLOWED_COMMANDS\n\
                 in your Django settings.\n"
                    .to_string()
            }
            (Refusal::Blocklisted, ConfiguredIn::DcToml) => format!(
                "To allow this command, remove it from the blocklist in dc.toml:\n\n  \
                 [policy]\n  remove_disallowed_commands = [\"{command}\"]\n"
            ),
            (Refusal::NotAllowlisted, ConfiguredIn::DjangoSettings) => format!(
                "To allow this command, add it to DJANGOCOMMAND_ALLOWED_COMMANDS\n\
                 in your Django settings:\n\n  \
                 from djangocommand import DEFAULT_ALLOWED_COMMANDS\n  \
                 DJANGOCOMMAND_ALLOWED_COMMANDS = DEFAULT_ALLOWED_COMMANDS + ('{command}',)\n"
            ),
            (Refusal::NotAllowlisted, ConfiguredIn::DcToml) => format!(
                "To allow this command, add it to the allowlist in dc.toml:\n\n  \
                 [policy]\n  add_allowed_commands = [\"{command}\"]\n"
            ),
        };
        Rejection::new(Rule::Policy, refusal.to_string(), how)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_seed_readme() {
        let policy = Policy::default_allowlist();
        for name in ["migrate", "dbrestore", "loaddata", "print_settings", "clear_index"] {
            assert_eq!(policy.check(name), Ok(()), "{name}");
        }
        assert_eq!(policy.check("shell"), Err(Refusal::NotAllowlisted));
        assert_eq!(policy.check(RUNNER_COMMAND), Err(Refusal::RunnerCommand));
        // The seed's blocklist table does not list dbrestore or loaddata.
        assert!(!policy.disallowed.contains("loaddata"));
    }

    #[test]
    fn blocklist_mode_refuses_only_listed_commands() {
        let policy = Policy { mode: Mode::Blocklist, ..Policy::default_allowlist() };
        assert_eq!(policy.check("my_custom"), Ok(()));
        assert_eq!(policy.check("flush"), Err(Refusal::Blocklisted));
        assert_eq!(policy.check(RUNNER_COMMAND), Err(Refusal::RunnerCommand));
    }

    #[test]
    fn refusal_explains_how_to_allow() {
        let policy = Policy { configured_in: ConfiguredIn::DjangoSettings, ..Policy::default_allowlist() };
        let text = policy.rejection("shell", &Refusal::NotAllowlisted).render("shell");
        assert!(text.starts_with("Command 'shell' rejected by runner security policy.\n"));
        assert!(text.contains("Reason: not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist\n"));
        assert!(text.contains("DEFAULT_ALLOWED_COMMANDS + ('shell',)"));
    }
}
