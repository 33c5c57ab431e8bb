//! The messages exchanged between the supervisor and its Python worker.
//!
//! This file is the source of truth for the IPC vocabulary. The Python side
//! (`python/djangocommand/_worker.py`) mirrors it in a small schema table, and
//! `tests/ipc_vectors.json` pins the exact bytes of every message so the two
//! sides cannot drift: if you change anything here, bump [`PROTOCOL_VERSION`],
//! update the Python schema and regenerate the vectors
//! (`cargo test --test ipc_vectors -- --ignored regenerate`).
//!
//! Variant order matters: bincode encodes a variant as its index.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// Sent by the worker in its first frame; the supervisor refuses any other.
pub const PROTOCOL_VERSION: u32 = 5;

/// Identifies a job within one supervisor process (never reused).
pub type JobId = u64;

/// Supervisor → worker.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum Request {
    /// Describe every management command the project has.
    Discover,
    /// Fork a child that runs `manage.py <command> <args...>`. The frame
    /// carries three file descriptors (SCM_RIGHTS): the child's stdin,
    /// stdout and stderr, in that order.
    Run { job: JobId, command: String, args: Vec<String>, limits: JobLimits },
    /// Send `signal` to the job's process group (ignored if the job ended).
    Signal { job: JobId, signal: i32 },
    /// Take no new jobs; exit once the running ones have ended. (Closing
    /// the socket instead makes the worker kill its jobs and exit at once.)
    Shutdown,
    /// Parse `args` with `command`'s own parser (as a job would) and report
    /// the arguments actually given; answered by [`Event::ParsedArgs`] with
    /// the same `request`. Nothing runs.
    ParseArgs { request: u64, command: String, args: Vec<String> },
    /// The values of named Django settings, to mask in the output. A name is
    /// a dotted path where `*` matches every key (`DATABASES.*.PASSWORD`);
    /// answered by [`Event::SettingValues`].
    ReadSettings { request: u64, names: Vec<String> },
    /// What the worker holds that a forked job would share or lose (see
    /// [`ForkHazard`]), looked at now; answered by [`Event::ForkHazards`].
    InspectFork { request: u64 },
}

/// Worker → supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum Event {
    /// First frame after a successful `django.setup()`.
    Hello { protocol: u32, pid: u32, python_version: String, django_version: String },
    /// First frame when the worker could not set Django up; `error` is the
    /// Python traceback.
    StartupFailed { protocol: u32, error: String },
    /// Answer to [`Request::Discover`].
    Commands { commands: Vec<CommandInfo> },
    /// The job's child process exists; it leads its own process group.
    JobStarted { job: JobId, pid: u32 },
    /// The job could not be started at all (fork failed, bad descriptors).
    JobFailed { job: JobId, error: String },
    /// The job's child has been reaped and the rest of its process group killed.
    JobExited { job: JobId, status: ExitStatus },
    /// Something the operator should see in the supervisor's log.
    Log { level: LogLevel, message: String },
    /// Answer to [`Request::ParseArgs`].
    ParsedArgs { request: u64, result: ParseOutcome },
    /// Answer to [`Request::ReadSettings`]: the non-empty string values found.
    SettingValues { request: u64, values: Vec<String> },
    /// Answer to [`Request::InspectFork`]; empty when forking is safe.
    ForkHazards { request: u64, hazards: Vec<ForkHazard> },
}

/// Something in the preloaded worker that a forked job would share with
/// the worker and its other jobs, or silently lose.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct ForkHazard {
    pub kind: HazardKind,
    /// What it is, for people: `fd 7: socket 127.0.0.1:5432`, a thread's name.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum HazardKind {
    /// An open socket (a database or cache connection opened outside the
    /// ORM): every job would talk over the same connection and corrupt its
    /// protocol. Jobs then run as fresh `manage.py` subprocesses.
    Socket,
    /// Another inherited descriptor (a file, a pipe): shared offsets and locks.
    Descriptor,
    /// A live thread (an APM agent, a scheduler): it does not exist in a job.
    Thread,
    /// A `random.Random` instance besides the module's own: every job
    /// starts from the same state and draws the same numbers.
    SharedRandom,
}

impl HazardKind {
    /// Whether forking with it would corrupt data, not only differ.
    pub fn corrupts_data(self) -> bool {
        matches!(self, HazardKind::Socket)
    }
}

/// How a command's parser read a list of arguments.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum ParseOutcome {
    /// Every argument the list actually gave (defaults left out), in
    /// command-line order; a repeated option once per occurrence.
    Parsed { given: Vec<GivenArg> },
    /// The parser refused the list (or the command could not be loaded);
    /// `message` is its error text.
    Refused { message: String },
}

/// One argument as the command's parser resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct GivenArg {
    /// The argparse destination, e.g. `database` (for `--database`, `--datab`).
    pub dest: String,
    /// The action's option strings, e.g. `["--database"]`; empty for a positional.
    pub flags: Vec<String>,
    /// `str()` of the parsed value(s), lists flattened; empty for a flag
    /// without a value (`store_true`).
    pub values: Vec<String>,
}

/// Resource limits the job's process starts with (0: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct JobLimits {
    /// RLIMIT_CPU: SIGXCPU at this many seconds of CPU time (SIGKILL 5 s later).
    pub cpu_seconds: u64,
    /// RLIMIT_AS: total virtual memory, the preloaded interpreter included.
    pub address_space_bytes: u64,
    /// Added to the job's niceness (lower priority), 0 to 19.
    pub nice: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct CommandInfo {
    pub name: String,
    /// What Django's `get_commands()` maps the name to (`django.core`, an app name).
    pub app_label: String,
    /// Full `--help` text (prog `manage.py <name>`); empty if the command failed to load.
    pub help_text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum ExitStatus {
    Code { code: i32 },
    Signal { signal: i32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

/// Any message of the protocol, for the property tests of the decoder and
/// of what the supervisor does with what a (possibly compromised) worker says.
#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        ".{0,24}"
    }

    fn texts() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(text(), 0..4)
    }

    /// Any `i32`, and the ones an exit status check must get right.
    fn status_number() -> impl Strategy<Value = i32> {
        prop_oneof![
            any::<i32>(),
            Just(i32::MIN),
            Just(-1),
            Just(0),
            Just(1),
            Just(64),
            Just(65),
            Just(255),
            Just(256)
        ]
    }

    /// Pids, with those that would hit the supervisor's group or every process.
    fn pid() -> impl Strategy<Value = u32> {
        prop_oneof![any::<u32>(), Just(0u32), Just(1), Just(u32::MAX), Just(i32::MAX as u32 + 1)]
    }

    pub fn exit_status() -> impl Strategy<Value = ExitStatus> {
        prop_oneof![
            status_number().prop_map(|code| ExitStatus::Code { code }),
            status_number().prop_map(|signal| ExitStatus::Signal { signal }),
        ]
    }

    fn log_level() -> impl Strategy<Value = LogLevel> {
        prop_oneof![
            Just(LogLevel::Debug),
            Just(LogLevel::Info),
            Just(LogLevel::Warning),
            Just(LogLevel::Error)
        ]
    }

    fn hazard_kind() -> impl Strategy<Value = HazardKind> {
        prop_oneof![
            Just(HazardKind::Socket),
            Just(HazardKind::Descriptor),
            Just(HazardKind::Thread),
            Just(HazardKind::SharedRandom),
        ]
    }

    fn given_arg() -> impl Strategy<Value = GivenArg> {
        (text(), texts(), texts()).prop_map(|(dest, flags, values)| GivenArg { dest, flags, values })
    }

    fn parse_outcome() -> impl Strategy<Value = ParseOutcome> {
        prop_oneof![
            prop::collection::vec(given_arg(), 0..4).prop_map(|given| ParseOutcome::Parsed { given }),
            text().prop_map(|message| ParseOutcome::Refused { message }),
        ]
    }

    pub fn event() -> impl Strategy<Value = Event> {
        let command = (text(), text(), text()).prop_map(|(name, app_label, help_text)| CommandInfo {
            name,
            app_label,
            help_text,
        });
        let hazard = (hazard_kind(), text()).prop_map(|(kind, detail)| ForkHazard { kind, detail });
        prop_oneof![
            (any::<u32>(), pid(), text(), text()).prop_map(
                |(protocol, pid, python_version, django_version)| {
                    Event::Hello { protocol, pid, python_version, django_version }
                }
            ),
            (any::<u32>(), text()).prop_map(|(protocol, error)| Event::StartupFailed { protocol, error }),
            prop::collection::vec(command, 0..4).prop_map(|commands| Event::Commands { commands }),
            (any::<u64>(), pid()).prop_map(|(job, pid)| Event::JobStarted { job, pid }),
            (any::<u64>(), text()).prop_map(|(job, error)| Event::JobFailed { job, error }),
            (any::<u64>(), exit_status()).prop_map(|(job, status)| Event::JobExited { job, status }),
            (log_level(), text()).prop_map(|(level, message)| Event::Log { level, message }),
            (any::<u64>(), parse_outcome())
                .prop_map(|(request, result)| Event::ParsedArgs { request, result }),
            (any::<u64>(), texts()).prop_map(|(request, values)| Event::SettingValues { request, values }),
            (any::<u64>(), prop::collection::vec(hazard, 0..3))
                .prop_map(|(request, hazards)| Event::ForkHazards { request, hazards }),
        ]
    }

    pub fn request() -> impl Strategy<Value = Request> {
        let limits = (any::<u64>(), any::<u64>(), any::<i32>()).prop_map(
            |(cpu_seconds, address_space_bytes, nice)| JobLimits { cpu_seconds, address_space_bytes, nice },
        );
        prop_oneof![
            Just(Request::Discover),
            (any::<u64>(), text(), texts(), limits).prop_map(|(job, command, args, limits)| Request::Run {
                job,
                command,
                args,
                limits
            }),
            (any::<u64>(), any::<i32>()).prop_map(|(job, signal)| Request::Signal { job, signal }),
            Just(Request::Shutdown),
            (any::<u64>(), text(), texts()).prop_map(|(request, command, args)| Request::ParseArgs {
                request,
                command,
                args
            }),
            (any::<u64>(), texts()).prop_map(|(request, names)| Request::ReadSettings { request, names }),
            any::<u64>().prop_map(|request| Request::InspectFork { request }),
        ]
    }
}
