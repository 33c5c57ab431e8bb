//! Admission: whether an execution the control plane hands out may run on
//! this runner, decided here and nowhere else, whatever the server asks.
//!
//! One ordered pipeline ([`admit`]): the command policy ([`policy`]), the
//! signature ([`signing`], opt-in), reading the arguments (size, shell-like
//! splitting), options that load code ([`loading`]), the bound argument
//! sets, and the argument rules ([`arguments`], read by the command's own
//! parser in the worker). Per-command concurrency ([`concurrency`]) comes
//! last; the runner asks it when it takes the execution, because a command
//! that must wait stays queued on the server. Every step answers [`Admitted`] or a typed [`Rejection`]
//! naming its [`Rule`]; the text the execution's stderr shows is rendered
//! once, by [`Rejection::render`].

pub mod arguments;
pub mod concurrency;
pub mod loading;
pub mod policy;
pub mod signing;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use self::arguments::ArgumentRules;
use self::policy::Policy;
use self::signing::Signing;
use crate::ipc::ParseOutcome;
use crate::protocol::api::{Execution, ExecutionId};
use crate::worker::Worker;

/// The longest `args` string an execution may have (a management command's
/// arguments are a few hundred bytes; megabytes are an attack on memory and
/// on the logs).
pub const MAX_ARGS_BYTES: usize = 16 * 1024;

/// The step of the pipeline that refused an execution; its name is the
/// `rule` field of the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The allowlist or blocklist (and never the runner's own command).
    Policy,
    /// `[policy.signing]`.
    Signature,
    /// The `args` string is longer than [`MAX_ARGS_BYTES`].
    ArgumentSize,
    /// The `args` string could not be split into arguments.
    ArgumentSyntax,
    /// `--settings`, `--pythonpath` and the like ([`loading`]).
    CodeLoadingOption,
    /// `[[policy.bound_args]]`.
    BoundArguments,
    /// `[[policy.arguments]]`.
    ArgumentRules,
    /// `[[policy.concurrency]]` with `when_busy = "refuse"`.
    Concurrency,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::Policy => "policy",
            Rule::Signature => "signature",
            Rule::ArgumentSize => "argument_size",
            Rule::ArgumentSyntax => "argument_syntax",
            Rule::CodeLoadingOption => "code_loading_option",
            Rule::BoundArguments => "bound_arguments",
            Rule::ArgumentRules => "argument_rules",
            Rule::Concurrency => "concurrency",
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an execution may not run: the rule, the reason (one line), and a
/// hint saying how to allow it (may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub rule: Rule,
    pub reason: String,
    pub hint: String,
}

impl Rejection {
    pub fn new(rule: Rule, reason: impl Into<String>, hint: impl Into<String>) -> Self {
        Self { rule, reason: reason.into(), hint: hint.into() }
    }

    /// The text whoever asked for `command` reads (the execution's stderr,
    /// `exec`'s stderr).
    pub fn render(&self, command: &str) -> String {
        let mut text =
            format!("Command '{command}' rejected by runner security policy.\nReason: {}\n", self.reason);
        if !self.hint.is_empty() {
            text.push('\n');
            text.push_str(&self.hint);
        }
        text
    }
}

/// An execution that passed the pipeline: its arguments, split.
#[derive(Debug)]
pub struct Admitted {
    pub args: Vec<String>,
    /// The signature check that recorded the id, to undo if the execution
    /// is not started after all.
    claimed: Option<(Arc<Signing>, ExecutionId)>,
}

impl Admitted {
    /// The execution was not started (it stays queued on the server and
    /// will be handed out again): its id must not count as a replay then.
    pub fn release(self) {
        if let Some((signing, id)) = self.claimed {
            signing.forget(&id);
        }
    }
}

/// What the pipeline checks; fixed for the runner's lifetime (or a reload).
#[derive(Debug, Clone)]
pub struct Admission {
    pub policy: Policy,
    /// `[policy.signing]`: only signed executions run (None: any).
    pub signing: Option<Arc<Signing>>,
    /// Commands restricted to listed argument sets (already split).
    pub bound_args: BTreeMap<String, Vec<Vec<String>>>,
    /// `[[policy.arguments]]` by command.
    pub argument_rules: BTreeMap<String, ArgumentRules>,
    /// `policy.allow_code_loading_options`: let `--settings` and the like through.
    pub allow_code_loading_options: bool,
}

/// Runs the pipeline, in order, on one execution. A refusal after the
/// signature check keeps the id it recorded: the rejection flow answers the
/// execution, so it must not run later either.
pub async fn admit(
    admission: &Admission,
    worker: &Worker,
    execution: &Execution,
) -> Result<Admitted, Rejection> {
    let command = execution.command.as_str();
    admission.policy.check(command).map_err(|refusal| admission.policy.rejection(command, &refusal))?;
    let claimed = check_signature(admission, execution)?;
    let args = check_arguments(admission, execution)?;
    if let Some(rules) = admission.argument_rules.get(command) {
        check_argument_rules(worker, command, &args, rules).await?;
    }
    Ok(Admitted { args, claimed })
}

fn check_signature(
    admission: &Admission,
    execution: &Execution,
) -> Result<Option<(Arc<Signing>, ExecutionId)>, Rejection> {
    let Some(signing) = &admission.signing else {
        return Ok(None);
    };
    match signing.accept(execution, unix_now()) {
        Ok(()) => Ok(Some((signing.clone(), execution.id.clone()))),
        Err(refusal) => Err(signing.rejection(&refusal)),
    }
}

/// Splits `args` like a POSIX shell would (never running one), then checks
/// for options that load code and the bound argument sets.
fn check_arguments(admission: &Admission, execution: &Execution) -> Result<Vec<String>, Rejection> {
    if execution.args.len() > MAX_ARGS_BYTES {
        let reason = format!(
            "its arguments are {} bytes long, above the {MAX_ARGS_BYTES}-byte limit",
            execution.args.len()
        );
        return Err(Rejection::new(Rule::ArgumentSize, reason, ""));
    }
    let Some(args) = shlex::split(&execution.args) else {
        let reason = format!("its arguments could not be parsed (unbalanced quotes): {:?}", execution.args);
        return Err(Rejection::new(Rule::ArgumentSyntax, reason, ""));
    };
    if !admission.allow_code_loading_options {
        if let Some(arg) = loading::find(&execution.command, &args) {
            return Err(loading::rejection(&arg, admission.policy.configured_in));
        }
    }
    if let Some(allowed) = admission.bound_args.get(&execution.command) {
        if !allowed.contains(&args) {
            return Err(bound_args_rejection(&execution.args, allowed));
        }
    }
    Ok(args)
}

fn bound_args_rejection(given: &str, allowed: &[Vec<String>]) -> Rejection {
    let listed: Vec<String> = allowed
        .iter()
        .map(|set| shlex::try_join(set.iter().map(String::as_str)).unwrap_or_default())
        .map(|joined| format!("{joined:?}"))
        .collect();
    Rejection::new(
        Rule::BoundArguments,
        format!("arguments {given:?} are not one of the argument sets bound to this command"),
        format!(
            "Allowed argument sets: {}\nTo allow others, add them to [[policy.bound_args]] in dc.toml.\n",
            listed.join(", ")
        ),
    )
}

/// `[[policy.arguments]]`: the worker reads `args` with the command's own
/// parser (so abbreviations resolve as they would in the job), then the
/// rules judge what it read.
async fn check_argument_rules(
    worker: &Worker,
    command: &str,
    args: &[String],
    rules: &ArgumentRules,
) -> Result<(), Rejection> {
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
    Err(arguments::rejection(reason))
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn execution(command: &str, args: &str) -> Execution {
        let value = serde_json::json!({
            "id": "3f2b8c1e-0a4d-4e5f-9b6a-7c8d9e0f1a2b", "command": command, "args": args,
        });
        serde_json::from_value(value).unwrap()
    }

    proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        /// Any `args` the control plane sends (quotes, escapes, NUL, huge
        /// or unbalanced) is split and checked, or refused with a rule.
        #[test]
        fn any_args_string_is_split_or_refused(
            command in "migrate|test|[a-z_]{1,8}",
            args in r#"[a-z =\-'"\\\n\t\x00é]{0,64}|.{0,64}"#,
            huge in proptest::bool::weighted(0.05),
        ) {
            let args = if huge { args.repeat(MAX_ARGS_BYTES / args.len().max(1) + 1) } else { args };
            let admission = Admission {
                policy: Policy::default_allowlist(),
                signing: None,
                bound_args: BTreeMap::from([("migrate".to_string(), vec![vec!["--plan".to_string()]])]),
                argument_rules: BTreeMap::new(),
                allow_code_loading_options: false,
            };
            let execution = execution(&command, &args);
            match check_arguments(&admission, &execution) {
                Ok(split) => prop_assert!(args.len() <= MAX_ARGS_BYTES && split.iter().all(|a| a.len() <= args.len())),
                Err(rejection) => {
                    let _ = rejection.render(&command);
                    if args.len() > MAX_ARGS_BYTES {
                        prop_assert_eq!(rejection.rule, Rule::ArgumentSize);
                    }
                }
            }
        }
    }
}
