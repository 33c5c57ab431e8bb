//! `dc.toml`: the one schema of the supervisor's configuration, with its
//! defaults and validation. `config/dc.example.toml` documents every field.
//!
//! Relative paths are resolved against the directory of the config file, so
//! a `dc.toml` next to `manage.py` can say `project_dir = "."`. The
//! environment overrides the file: `DJANGOCOMMAND_API_KEY` for the key (so
//! it need not sit in a file), and `DCSUPERVISOR_<SECTION>__<FIELD>` for
//! anything else (e.g. `DCSUPERVISOR_SERVER__URL`).
//!
//! Schema and validation only: what the runner is built from a `Config` is
//! `supervisor::setup`. This module uses the supervisor's vocabulary it
//! parses into (policy, argument rules, keys, isolation), never what runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ipc::JobLimits;
use crate::protocol::signed;
use crate::supervisor::admission::arguments::{AllowedOption, ArgumentRules};
use crate::supervisor::admission::concurrency::WhenBusy;
use crate::supervisor::admission::policy::{self, ConfiguredIn, Mode, Policy};
use crate::supervisor::admission::signing;
use crate::supervisor::client::ApiKey;
use crate::worker::Isolation;

/// The variable that carries the API key (to the supervisor, and to the
/// worker while Django sets up, since `settings.py` may read it).
pub const API_KEY_ENV: &str = "DJANGOCOMMAND_API_KEY";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Load { path: String, message: String },
    #[error("invalid value for `{field}`: {value}: {fix}")]
    Invalid { field: &'static str, value: String, fix: String },
}

pub(crate) fn invalid(
    field: &'static str,
    value: impl std::fmt::Display,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid { field, value: value.to_string(), fix: fix.into() }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub django: DjangoConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub worker: WorkerConfig,
    #[serde(default)]
    pub runner: RunnerConfig,
    #[serde(default)]
    pub redaction: RedactionConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[limits]`: resource limits of every job, with per-command overrides
/// (`[limits.commands.<name>]`). 0 means no limit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    #[serde(flatten)]
    pub all: LimitValues,
    pub commands: BTreeMap<String, LimitValues>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitValues {
    /// CPU seconds before SIGXCPU (RLIMIT_CPU).
    pub cpu_seconds: Option<u64>,
    /// Virtual memory in MiB, the preloaded interpreter included (RLIMIT_AS).
    pub memory_mb: Option<u64>,
    /// Lower priority: 0 (none) to 19.
    pub nice: Option<i32>,
}

impl LimitValues {
    pub fn over(self, base: JobLimits) -> JobLimits {
        JobLimits {
            cpu_seconds: self.cpu_seconds.unwrap_or(base.cpu_seconds),
            address_space_bytes: self.memory_mb.map_or(base.address_space_bytes, |mb| mb * 1024 * 1024),
            nice: self.nice.unwrap_or(base.nice),
        }
    }
}

/// `[redaction]`: values masked as `[REDACTED]` before output leaves the host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedactionConfig {
    /// Secret values, literally.
    pub values: Vec<String>,
    /// Names of environment variables (the supervisor's, or `django.env`)
    /// whose values are secrets.
    pub from_env: Vec<String>,
    /// Django settings whose values are secrets, as dotted paths with `*`
    /// for every key (`SECRET_KEY`, `DATABASES.*.PASSWORD`); the worker
    /// reports their values at start and on each reload.
    pub from_django_settings: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub url: String,
    /// Never logged; `Debug` of the whole config is never printed.
    pub api_key: Option<String>,
    pub heartbeat_interval: u64,
    pub request_timeout: u64,
    pub max_retries: u32,
    pub allow_http_hosts: Vec<String>,
    /// PEM file of extra CAs to trust (a self-hosted control plane).
    pub ca_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            url: "https://app.djangocommand.com".into(),
            api_key: None,
            heartbeat_interval: 30,
            request_timeout: 30,
            max_retries: 3,
            allow_http_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DjangoConfig {
    /// The directory holding `manage.py`.
    pub project_dir: PathBuf,
    /// e.g. `mysite.settings`.
    pub settings_module: String,
    #[serde(default = "default_python")]
    pub python: PathBuf,
    /// Extra environment variables for the worker and every job.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_python() -> PathBuf {
    PathBuf::from("python3")
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub mode: Mode,
    /// Replaces the default allowlist when set.
    pub allowed_commands: Option<Vec<String>>,
    pub add_allowed_commands: Vec<String>,
    pub remove_allowed_commands: Vec<String>,
    /// Replaces the default blocklist when set.
    pub disallowed_commands: Option<Vec<String>>,
    pub add_disallowed_commands: Vec<String>,
    pub remove_disallowed_commands: Vec<String>,
    /// Commands whose output never leaves the host.
    pub metadata_only_commands: Vec<String>,
    /// Where refusals tell the operator to change the policy.
    pub configured_in: ConfiguredIn,
    /// Commands restricted to listed argument sets.
    pub bound_args: Vec<BoundArgsConfig>,
    /// Limits on how many executions of a command run at once.
    pub concurrency: Vec<ConcurrencyConfig>,
    /// Options and positionals a command may or may not be given.
    pub arguments: Vec<ArgumentsConfig>,
    /// `[policy.signing]`: run only executions signed by this key.
    pub signing: Option<SigningConfig>,
    /// Let the control plane give `--settings`, `--pythonpath` and other
    /// options that change which code a command loads (refused by default).
    pub allow_code_loading_options: bool,
}

/// `[policy.signing]`: the control plane's pinned Ed25519 public key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// Base64 of the 32-byte public key.
    pub public_key: String,
    /// Seconds an execution stays valid after its issue time.
    #[serde(default = "default_max_age")]
    pub max_age: u64,
}

fn default_max_age() -> u64 {
    signing::DEFAULT_MAX_AGE
}

impl SigningConfig {
    pub fn verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey, ConfigError> {
        signed::parse_public_key(&self.public_key).map_err(|error| {
            invalid(
                "policy.signing.public_key",
                format!("{:?} ({error})", self.public_key),
                "set it to the base64 of the control plane's 32-byte Ed25519 public key \
                 (`dccontrol keygen` prints one for the local control plane)",
            )
        })
    }
}

/// `[[policy.concurrency]]`: e.g. one `migrate` at a time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    pub command: String,
    /// 1 makes the command exclusive.
    pub max_running: usize,
    /// "wait" (stay queued on the server) or "refuse".
    #[serde(default = "wait")]
    pub when_busy: WhenBusy,
}

fn wait() -> WhenBusy {
    WhenBusy::Wait
}

/// `[[policy.arguments]]`: the argument rules of one command, checked
/// against the arguments as the command's own parser reads them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgumentsConfig {
    pub command: String,
    /// Destinations (`database`) or option strings (`--database`) always refused.
    #[serde(default)]
    pub refuse_options: Vec<String>,
    /// Positional lists refused, element by element (`"*"`: any one value),
    /// e.g. `[["*", "zero"]]` for `migrate <app> zero`.
    #[serde(default)]
    pub refuse_positionals: Vec<Vec<String>>,
    /// When set, the only options allowed: name → regex each value must
    /// match in full ("" for any value).
    #[serde(default)]
    pub allow_options: Option<BTreeMap<String, String>>,
    /// When set, a regex every positional value must match in full (e.g.
    /// fixture names without a path for `loaddata`).
    #[serde(default)]
    pub allow_positionals: Option<String>,
}

impl ArgumentsConfig {
    pub fn rules(&self) -> Result<ArgumentRules, ConfigError> {
        let bad_name =
            |name: &String| name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '=');
        let names = self.refuse_options.iter().chain(self.allow_options.iter().flat_map(|map| map.keys()));
        if let Some(name) = names.into_iter().find(|name| bad_name(name)) {
            return Err(invalid(
                "policy.arguments",
                format!("{name:?} (command {:?})", self.command),
                "name an option by its destination (\"database\") or an option string (\"--database\")",
            ));
        }
        let allow_options = match &self.allow_options {
            None => None,
            Some(map) => Some(
                map.iter()
                    .map(|(name, pattern)| {
                        AllowedOption::new(name, pattern).map_err(|error| {
                            invalid(
                                "policy.arguments.allow_options",
                                format!("{pattern:?} for {name:?} of {:?}", self.command),
                                format!("not a regular expression: {error}"),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let allow_positionals = match &self.allow_positionals {
            None => None,
            Some(pattern) => Some(AllowedOption::new("", pattern).map_err(|error| {
                invalid(
                    "policy.arguments.allow_positionals",
                    format!("{pattern:?} of {:?}", self.command),
                    format!("not a regular expression: {error}"),
                )
            })?),
        };
        Ok(ArgumentRules {
            refuse_options: self.refuse_options.clone(),
            refuse_positionals: self.refuse_positionals.clone(),
            allow_options,
            allow_positionals,
        })
    }
}

/// One permitted argument set of a command (`[[policy.bound_args]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundArgsConfig {
    pub command: String,
    /// Split like a POSIX shell would (never run by one).
    pub args: String,
    pub label: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub isolation: Isolation,
    pub spawn_commands: Vec<String>,
    /// Seconds Django may take to set up in a fresh worker.
    pub startup_timeout: u64,
    /// Keep a job process forked ahead of time (see docs/ipc.md, Jobs).
    pub prefork: bool,
    /// Recycle the worker after this many jobs (0: never).
    pub recycle_after_jobs: u64,
    /// Recycle the worker once its RSS exceeds this many MiB (0: never).
    pub recycle_above_rss_mb: u64,
    /// Seconds between SIGTERM and SIGKILL when a job is cancelled.
    pub cancel_grace: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            isolation: Isolation::Fork,
            spawn_commands: Vec::new(),
            startup_timeout: 60,
            prefork: true,
            recycle_after_jobs: 0,
            recycle_above_rss_mb: 0,
            cancel_grace: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    pub max_concurrent: usize,
    /// Seconds between polls for executions (sooner when a slot frees up).
    pub poll_interval: f64,
    /// Seconds between output chunks of a running execution.
    pub output_flush_interval: f64,
    /// A stream's buffer is sent early once it holds this many bytes.
    pub chunk_max_bytes: usize,
    /// Per-execution output cap in bytes, head and tail kept (0: no cap).
    pub output_cap_bytes: usize,
    /// Seconds running executions get to finish on shutdown before they are cancelled.
    pub shutdown_grace: u64,
    /// Where the supervisor keeps its lock and undelivered output (0700).
    pub state_dir: PathBuf,
    /// Reload when this file's modification time changes (deploy scripts `touch` it).
    pub reload_touch_file: Option<PathBuf>,
    /// Output kept in memory per execution while it cannot go to its log
    /// (disk full, caps reached); beyond it, the middle is dropped.
    pub outbox_memory_bytes: usize,
    /// Bytes one execution's output log may take on disk.
    pub spool_max_bytes: u64,
    /// Bytes all output logs together may take in the state directory.
    pub state_dir_max_bytes: u64,
    /// Serve /healthz, /readyz and /metrics on this address (off when unset).
    pub health_listen: Option<std::net::SocketAddr>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 4,
            poll_interval: 2.0,
            output_flush_interval: 1.5,
            chunk_max_bytes: 64 * 1024,
            output_cap_bytes: 0,
            shutdown_grace: 30,
            state_dir: PathBuf::from(".dcsupervisor"),
            reload_touch_file: None,
            outbox_memory_bytes: 4 * 1024 * 1024,
            spool_max_bytes: 256 * 1024 * 1024,
            state_dir_max_bytes: 1024 * 1024 * 1024,
            health_listen: None,
        }
    }
}

impl Config {
    /// Reads, merges the environment into, and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let load_error = |message: String| ConfigError::Load { path: path.display().to_string(), message };
        let mut builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml).required(true))
            .add_source(
                config::Environment::with_prefix("DCSUPERVISOR")
                    .prefix_separator("_")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("server.allow_http_hosts")
                    .try_parsing(true)
                    .source(Some(section_overrides())),
            );
        if let Ok(key) = std::env::var(API_KEY_ENV) {
            builder = builder.set_override("server.api_key", key).map_err(|e| load_error(e.to_string()))?;
        }
        let merged = builder.build().map_err(|e| load_error(e.to_string()))?;
        let mut config: Config = merged.try_deserialize().map_err(|e| load_error(e.to_string()))?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // Absolute, because the worker runs with the project as its cwd.
        let base = std::path::absolute(base).map_err(|e| load_error(e.to_string()))?;
        config.resolve_paths(&base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if self.django.project_dir.is_relative() {
            self.django.project_dir = base.join(&self.django.project_dir);
        }
        // A bare interpreter name is looked up on PATH; a relative path is the file's.
        if self.django.python.components().count() > 1 && self.django.python.is_relative() {
            self.django.python = base.join(&self.django.python);
        }
        if self.runner.state_dir.is_relative() {
            self.runner.state_dir = base.join(&self.runner.state_dir);
        }
        if let Some(touch) = self.runner.reload_touch_file.as_mut().filter(|p| p.is_relative()) {
            *touch = base.join(&*touch);
        }
        if let Some(ca_file) = self.server.ca_file.as_mut().filter(|p| p.is_relative()) {
            *ca_file = base.join(&*ca_file);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let django = &self.django;
        if !django.project_dir.join("manage.py").is_file() {
            return Err(invalid(
                "django.project_dir",
                django.project_dir.display(),
                "point it at the directory that holds manage.py (relative paths start at dc.toml's directory)",
            ));
        }
        let module_ok = !django.settings_module.is_empty()
            && django.settings_module.split('.').all(|part| {
                !part.is_empty()
                    && !part.starts_with(|c: char| c.is_ascii_digit())
                    && part.chars().all(|c| c.is_alphanumeric() || c == '_')
            });
        if !module_ok {
            return Err(invalid(
                "django.settings_module",
                format!("{:?}", django.settings_module),
                "use a dotted Python module path such as \"mysite.settings\"",
            ));
        }
        for name in self.policy.named_commands() {
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(invalid("policy", format!("{name:?}"), "command names are single words"));
            }
        }
        self.validate_numbers()?;
        for bound in &self.policy.bound_args {
            if shlex::split(&bound.args).is_none() {
                return Err(invalid(
                    "policy.bound_args.args",
                    format!("{:?} (command {:?})", bound.args, bound.command),
                    "balance the quotes: the arguments are split like a POSIX shell would",
                ));
            }
        }
        self.argument_rules()?;
        if let Some(signing) = &self.policy.signing {
            signing.verifying_key()?;
        }
        Ok(())
    }

    /// Every number and duration of the file, against [`ranges`]: a value
    /// out of range would otherwise panic or misbehave far from its cause
    /// (a negative interval, a zero-length tick, an overflowing size).
    fn validate_numbers(&self) -> Result<(), ConfigError> {
        use ranges::*;
        let (server, runner, worker) = (&self.server, &self.runner, &self.worker);
        server.validate_numbers()?;
        whole("worker.startup_timeout", worker.startup_timeout, STARTUP_TIMEOUT)?;
        whole("worker.cancel_grace", worker.cancel_grace, CANCEL_GRACE)?;
        whole("worker.recycle_above_rss_mb", worker.recycle_above_rss_mb, MEGABYTES)?;
        whole("runner.max_concurrent", runner.max_concurrent as u64, MAX_CONCURRENT)?;
        seconds("runner.poll_interval", runner.poll_interval, POLL_INTERVAL)?;
        seconds("runner.output_flush_interval", runner.output_flush_interval, FLUSH_INTERVAL)?;
        whole("runner.chunk_max_bytes", runner.chunk_max_bytes as u64, CHUNK_MAX_BYTES)?;
        if runner.output_cap_bytes != 0 {
            whole("runner.output_cap_bytes", runner.output_cap_bytes as u64, OUTPUT_CAP_BYTES)?;
        }
        whole("runner.outbox_memory_bytes", runner.outbox_memory_bytes as u64, OUTBOX_MEMORY_BYTES)?;
        whole("runner.shutdown_grace", runner.shutdown_grace, SHUTDOWN_GRACE)?;
        for values in std::iter::once(&self.limits.all).chain(self.limits.commands.values()) {
            whole("limits.cpu_seconds", values.cpu_seconds.unwrap_or(0), CPU_SECONDS)?;
            whole("limits.memory_mb", values.memory_mb.unwrap_or(0), MEGABYTES)?;
            let nice = values.nice.unwrap_or(0);
            if !(0..=NICE_MAX).contains(&nice) {
                return Err(invalid("limits.nice", nice, format!("use a value from 0 to {NICE_MAX}")));
            }
        }
        for rule in &self.policy.concurrency {
            whole("policy.concurrency.max_running", rule.max_running as u64, MAX_RUNNING)?;
        }
        if let Some(signing) = &self.policy.signing {
            whole("policy.signing.max_age", signing.max_age, SIGNING_MAX_AGE)?;
        }
        Ok(())
    }

    pub fn policy(&self) -> Policy {
        self.policy.build()
    }

    /// `[[policy.arguments]]` by command (one entry per command).
    pub fn argument_rules(&self) -> Result<BTreeMap<String, ArgumentRules>, ConfigError> {
        let mut rules = BTreeMap::new();
        for entry in &self.policy.arguments {
            if rules.insert(entry.command.clone(), entry.rules()?).is_some() {
                return Err(invalid(
                    "policy.arguments",
                    format!("{:?}", entry.command),
                    "give each command one [[policy.arguments]] entry",
                ));
            }
        }
        Ok(rules)
    }
}

/// The `DCSUPERVISOR_<SECTION>__<FIELD>` variables only: other variables
/// with the prefix (`DCSUPERVISOR_CONFIG`, a test's own) are not config keys.
fn section_overrides() -> config::Map<String, String> {
    std::env::vars()
        .filter(|(name, _)| name.strip_prefix("DCSUPERVISOR_").is_some_and(|key| key.contains("__")))
        .collect()
}

/// What the control-plane client needs, checked.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Without a trailing slash.
    pub base_url: String,
    pub api_key: ApiKey,
}

impl ServerConfig {
    /// The URL and key, checked against the protocol's rules: a `dc_` key,
    /// HTTPS unless the host is allowed plain HTTP.
    pub fn settings(&self) -> Result<ServerSettings, ConfigError> {
        let key = match &self.api_key {
            Some(key) if key.starts_with("dc_") && key.bytes().all(|b| b.is_ascii_graphic()) => key.clone(),
            Some(key) if key.starts_with("dc_") => {
                // It travels in an HTTP header: a stray newline from a
                // secrets file would break it far from its cause.
                return Err(invalid(
                    "server.api_key",
                    "<hidden>",
                    "the key contains whitespace, control or non-ASCII characters; copy it again",
                ));
            }
            Some(_) => {
                return Err(invalid(
                    "server.api_key",
                    "<hidden>",
                    "API keys start with dc_; copy it again from the DjangoCommand dashboard",
                ))
            }
            None => {
                return Err(invalid(
                    "server.api_key",
                    "(not set)",
                    "set the DJANGOCOMMAND_API_KEY environment variable (or server.api_key in dc.toml)",
                ))
            }
        };
        let base_url = self.url.trim_end_matches('/').to_string();
        let uri: http::Uri =
            base_url.parse().map_err(|e| invalid("server.url", &self.url, format!("not a URL ({e})")))?;
        let host =
            uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let host = host.as_str();
        let query_or_fragment =
            uri.path_and_query().is_some_and(|p| p.query().is_some()) || base_url.contains('#');
        if host.is_empty() || query_or_fragment || !port_fits(&uri) {
            return Err(invalid("server.url", &self.url, "use a URL like https://app.djangocommand.com"));
        }
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if self.allow_http_hosts.iter().any(|allowed| allowed == host) => {}
            Some("http") => {
                return Err(invalid(
                    "server.url",
                    &self.url,
                    format!(
                        "HTTPS is required; to allow plain HTTP to {host}, add it to server.allow_http_hosts"
                    ),
                ))
            }
            _ => return Err(invalid("server.url", &self.url, "the URL must start with https://")),
        }
        Ok(ServerSettings { base_url, api_key: ApiKey::new(key) })
    }

    /// The numbers of `[server]`; the Python package applies the same
    /// ranges to the `DJANGOCOMMAND_*` settings (tests/server_settings_vectors.json).
    pub fn validate_numbers(&self) -> Result<(), ConfigError> {
        use ranges::*;
        whole("server.heartbeat_interval", self.heartbeat_interval, HEARTBEAT_INTERVAL)?;
        whole("server.request_timeout", self.request_timeout, REQUEST_TIMEOUT)?;
        whole("server.max_retries", u64::from(self.max_retries), MAX_RETRIES)
    }
}

/// Whether the URL's port, if it has one, is a number from 0 to 65535.
fn port_fits(uri: &http::Uri) -> bool {
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    let host_and_port = authority.rsplit_once('@').map_or(authority, |(_, rest)| rest);
    let after_host = host_and_port.rsplit_once(']').map_or(host_and_port, |(_, rest)| rest);
    match after_host.split_once(':') {
        Some((_, port)) => port.is_empty() || port.parse::<u16>().is_ok(),
        None => true,
    }
}

impl PolicyConfig {
    fn named_commands(&self) -> impl Iterator<Item = &String> {
        [
            self.allowed_commands.as_deref().unwrap_or_default(),
            &self.add_allowed_commands,
            &self.remove_allowed_commands,
            self.disallowed_commands.as_deref().unwrap_or_default(),
            &self.add_disallowed_commands,
            &self.remove_disallowed_commands,
            &self.metadata_only_commands,
        ]
        .into_iter()
        .flatten()
    }

    pub fn build(&self) -> Policy {
        Policy {
            mode: self.mode,
            allowed: combine(
                self.allowed_commands.as_deref(),
                policy::default_allowed_commands(),
                &self.add_allowed_commands,
                &self.remove_allowed_commands,
            ),
            disallowed: combine(
                self.disallowed_commands.as_deref(),
                policy::default_disallowed_commands(),
                &self.add_disallowed_commands,
                &self.remove_disallowed_commands,
            ),
            configured_in: self.configured_in,
        }
    }

    pub fn metadata_only(&self) -> BTreeSet<String> {
        self.metadata_only_commands.iter().cloned().collect()
    }
}

/// `replacement` or the defaults, plus `add`, minus `remove`.
fn combine(
    replacement: Option<&[String]>,
    defaults: &[String],
    add: &[String],
    remove: &[String],
) -> BTreeSet<String> {
    let base = replacement.unwrap_or(defaults);
    base.iter().chain(add).filter(|name| !remove.contains(name)).cloned().collect()
}

/// The allowed range of every number in `dc.toml` (inclusive, in the
/// field's unit), the one place they are written; README.md and
/// config/dc.example.toml quote them.
pub mod ranges {
    use super::{invalid, ConfigError};

    /// An inclusive range and the unit the message names.
    #[derive(Debug, Clone, Copy)]
    pub struct Range<T> {
        pub min: T,
        pub max: T,
        pub unit: &'static str,
    }

    const fn range<T>(min: T, max: T, unit: &'static str) -> Range<T> {
        Range { min, max, unit }
    }

    pub const HEARTBEAT_INTERVAL: Range<u64> = range(5, 3600, "seconds");
    pub const REQUEST_TIMEOUT: Range<u64> = range(1, 600, "seconds");
    pub const MAX_RETRIES: Range<u64> = range(0, 20, "retries");
    pub const STARTUP_TIMEOUT: Range<u64> = range(1, 3600, "seconds");
    pub const CANCEL_GRACE: Range<u64> = range(0, 3600, "seconds");
    pub const SHUTDOWN_GRACE: Range<u64> = range(0, 86_400, "seconds");
    pub const POLL_INTERVAL: Range<f64> = range(0.05, 3600.0, "seconds");
    pub const FLUSH_INTERVAL: Range<f64> = range(0.01, 60.0, "seconds");
    pub const MAX_CONCURRENT: Range<u64> = range(1, 256, "executions");
    pub const MAX_RUNNING: Range<u64> = range(1, 256, "executions");
    pub const CHUNK_MAX_BYTES: Range<u64> = range(256, 8 * 1024 * 1024, "bytes");
    pub const OUTPUT_CAP_BYTES: Range<u64> = range(1024, 1 << 40, "bytes (or 0: no cap)");
    pub const OUTBOX_MEMORY_BYTES: Range<u64> = range(0, 1 << 30, "bytes");
    /// MiB; the largest keeps `* 1024 * 1024` far from overflowing.
    pub const MEGABYTES: Range<u64> = range(0, 1 << 24, "MiB (0: no limit)");
    pub const CPU_SECONDS: Range<u64> = range(0, 1 << 31, "seconds (0: no limit)");
    pub const SIGNING_MAX_AGE: Range<u64> = range(1, 86_400, "seconds");
    pub const NICE_MAX: i32 = 19;

    pub fn whole(field: &'static str, value: u64, range: Range<u64>) -> Result<(), ConfigError> {
        if (range.min..=range.max).contains(&value) {
            return Ok(());
        }
        Err(invalid(
            field,
            value,
            format!("use a whole number from {} to {} {}", range.min, range.max, range.unit),
        ))
    }

    /// Seconds as a number that may have a fraction: finite, in range.
    pub fn seconds(field: &'static str, value: f64, range: Range<f64>) -> Result<(), ConfigError> {
        if value.is_finite() && (range.min..=range.max).contains(&value) {
            return Ok(());
        }
        Err(invalid(field, value, format!("use a number from {} to {} {}", range.min, range.max, range.unit)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads a dc.toml made of the demo project's [django] table and `extra`.
    fn load(extra: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo");
        let text =
            format!("[django]\nproject_dir = {demo:?}\nsettings_module = \"demo_project.settings\"\n{extra}");
        let path = dir.path().join("dc.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn every_number_out_of_range_is_refused_naming_its_field() {
        let cases = [
            ("[server]\nheartbeat_interval = 4", "server.heartbeat_interval"),
            ("[server]\nrequest_timeout = 0", "server.request_timeout"),
            ("[server]\nmax_retries = 21", "server.max_retries"),
            ("[worker]\nstartup_timeout = 0", "worker.startup_timeout"),
            ("[worker]\ncancel_grace = 3601", "worker.cancel_grace"),
            ("[worker]\nrecycle_above_rss_mb = 9223372036854775807", "worker.recycle_above_rss_mb"),
            ("[runner]\nmax_concurrent = 0", "runner.max_concurrent"),
            ("[runner]\npoll_interval = -1.0", "runner.poll_interval"),
            ("[runner]\npoll_interval = inf", "runner.poll_interval"),
            ("[runner]\noutput_flush_interval = 0", "runner.output_flush_interval"),
            ("[runner]\nchunk_max_bytes = 0", "runner.chunk_max_bytes"),
            ("[runner]\noutput_cap_bytes = 10", "runner.output_cap_bytes"),
            ("[runner]\noutbox_memory_bytes = 9223372036854775807", "runner.outbox_memory_bytes"),
            ("[runner]\nshutdown_grace = 9223372036854775807", "runner.shutdown_grace"),
            ("[limits]\nmemory_mb = 9223372036854775807", "limits.memory_mb"),
            ("[limits.commands.migrate]\ncpu_seconds = 9223372036854775807", "limits.cpu_seconds"),
            ("[limits]\nnice = -5", "limits.nice"),
            (
                "[[policy.concurrency]]\ncommand = \"migrate\"\nmax_running = 0",
                "policy.concurrency.max_running",
            ),
            (
                "[[policy.bound_args]]\ncommand = \"migrate\"\nargs = \"'open\"\nlabel = \"x\"",
                "policy.bound_args.args",
            ),
            (
                "[[policy.arguments]]\ncommand = \"loaddata\"\nallow_positionals = \"[\"",
                "policy.arguments.allow_positionals",
            ),
        ];
        for (extra, field) in cases {
            match load(extra) {
                Err(ConfigError::Invalid { field: named, .. }) => assert_eq!(named, field, "{extra}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
        let defaults = load("").unwrap();
        assert_eq!(defaults.runner.poll_interval, 2.0);
    }

    /// Plain HTTP goes only to a host of `allow_http_hosts`, spelled exactly
    /// (any case): names that start like one, userinfo that names one, and
    /// other spellings of loopback are refused, whatever follows the host.
    #[test]
    fn plain_http_only_to_an_allowed_host_however_the_url_is_spelled() {
        let url = |url: &str| ServerConfig {
            url: url.into(),
            api_key: Some("dc_k".into()),
            ..ServerConfig::default()
        };
        for allowed in
            ["http://localhost:8765", "http://LOCALHOST", "http://127.0.0.1:1/api", "http://[::1]:8765/"]
        {
            assert!(url(allowed).settings().is_ok(), "{allowed}");
        }
        for refused in [
            "http://localhost.example.com",
            "http://127.0.0.1.nip.io:8765",
            "http://localhost@control.example.com",
            "http://localhost:8765@control.example.com",
            "http://[::ffff:127.0.0.1]:8765",
            "http://127.1:8765",
            "http://0.0.0.0:8765",
            "ftp://localhost",
            "localhost:8765",
        ] {
            match url(refused).settings() {
                Err(ConfigError::Invalid { field: "server.url", .. }) => {}
                other => panic!("{refused}: {other:?}"),
            }
        }
    }

    /// The TOML parser's recursion limit refuses a deeply nested value: an
    /// error naming the file, not a stack overflow (which would abort).
    #[test]
    fn deeply_nested_values_are_refused() {
        let depth = 100_000;
        for value in [
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
            format!("{}1{}", "{ a = ".repeat(depth), " }".repeat(depth)),
        ] {
            assert!(matches!(
                load(&format!("[runner]\npoll_interval = {value}\n")),
                Err(ConfigError::Load { .. })
            ));
        }
    }

    /// A TOML value where a number is expected: any integer TOML holds,
    /// floats with NaN and infinities, and what is no number at all.
    fn toml_number() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            prop_oneof![Just(0i64), Just(-1), Just(1), Just(i64::MAX), Just(i64::MIN), 0i64..100_000]
                .prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            prop_oneof![
                Just("nan"),
                Just("inf"),
                Just("-inf"),
                Just("+inf"),
                Just("-nan"),
                Just("1e308"),
                Just("-0.0"),
                Just("1e-320")
            ]
            .prop_map(String::from),
            prop_oneof![Just("\"5\""), Just("true"), Just("[1]"), Just("{}"), Just("\"\"")]
                .prop_map(String::from),
        ]
    }

    const NUMBERS: &[(&str, &str)] = &[
        ("server", "heartbeat_interval"),
        ("server", "request_timeout"),
        ("server", "max_retries"),
        ("worker", "startup_timeout"),
        ("worker", "recycle_after_jobs"),
        ("worker", "recycle_above_rss_mb"),
        ("worker", "cancel_grace"),
        ("runner", "max_concurrent"),
        ("runner", "poll_interval"),
        ("runner", "output_flush_interval"),
        ("runner", "chunk_max_bytes"),
        ("runner", "output_cap_bytes"),
        ("runner", "shutdown_grace"),
        ("runner", "outbox_memory_bytes"),
        ("runner", "spool_max_bytes"),
        ("runner", "state_dir_max_bytes"),
        ("limits", "cpu_seconds"),
        ("limits", "memory_mb"),
        ("limits", "nice"),
        ("limits.commands.migrate", "cpu_seconds"),
        ("limits.commands.migrate", "memory_mb"),
        ("limits.commands.migrate", "nice"),
        ("policy.signing", "max_age"),
    ];

    /// What a loaded configuration is built into, without the TLS set-up
    /// (slow, and independent of the numbers).
    fn build_parts(config: &Config) {
        use crate::supervisor::setup;
        let _ = setup::worker_options(config);
        let _ = setup::runner_options(config);
        let _ = setup::client_options(config);
        let _ = setup::job_limits(config);
        let _ = setup::execution_settings(config);
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(256))]

        /// Any value in any numeric field (several at once): the file is
        /// refused naming a field, or loads and builds, never a panic.
        #[test]
        fn any_numbers_in_dc_toml_are_refused_or_built(
            values in proptest::collection::vec((proptest::sample::select(NUMBERS), toml_number()), 1..5),
        ) {
            let mut sections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for ((section, field), value) in &values {
                sections.entry(section).or_default().push(format!("{field} = {value}"));
            }
            let mut extra = String::new();
            for (section, mut lines) in sections {
                if section == "policy.signing" {
                    lines.push(format!("public_key = {:?}", crate::protocol::signed::encode_public_key(
                        &ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key(),
                    )));
                }
                lines.dedup_by(|a, b| a.split('=').next() == b.split('=').next());
                extra.push_str(&format!("[{section}]\n{}\n", lines.join("\n")));
            }
            match load(&extra) {
                Ok(config) => build_parts(&config),
                Err(ConfigError::Invalid { .. } | ConfigError::Load { .. }) => {}
            }
        }

        /// The example configuration with bytes changed: read or refused.
        #[test]
        fn a_damaged_example_config_is_read_or_refused(changes in crate::proptest_support::mutations()) {
            let example = include_str!("../config/dc.example.toml")
                .replace("project_dir = \".\"", &format!("project_dir = {:?}", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo")))
                .replace("mysite.settings", "demo_project.settings");
            let damaged = crate::proptest_support::mutate(example.into_bytes(), &changes);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("dc.toml");
            std::fs::write(&path, damaged).unwrap();
            if let Ok(config) = Config::load(&path) {
                build_parts(&config);
            }
        }
    }
}
