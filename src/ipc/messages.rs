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
