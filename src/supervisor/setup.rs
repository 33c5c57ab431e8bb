//! Set-up: from a validated [`Config`] to what the runner and the worker
//! are built from (the HTTP client, the signing checks, the redactor, the
//! admission settings, the runner's and the worker's options). Start-up and
//! every reload come through here, so a reload is a second call to
//! [`load`]; `config.rs` stays the schema and its validation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::admission::concurrency::CommandLimit;
use super::admission::signing::Signing;
use super::admission::Admission;
use super::client::{Client, ClientOptions, ClientSetupError};
use super::execution::{CommandLimits, ExecutionSettings};
use super::redact::{Redactor, MIN_SECRET_LEN};
use super::runner::{RunnerOptions, RunnerSetup};
use crate::config::{invalid, Config, ConfigError, API_KEY_ENV};
use crate::ipc::JobLimits;
use crate::protocol::commands::BoundArgs;
use crate::worker::WorkerOptions;

/// Everything a (re)start builds from one configuration.
pub struct Setup {
    pub runner: RunnerSetup,
    pub worker: WorkerOptions,
}

/// Reads `path` and builds from it: what a reload does.
pub fn load(path: &Path) -> Result<(Config, Setup), ConfigError> {
    let config = Config::load(path)?;
    let setup = build(&config)?;
    Ok((config, setup))
}

/// Builds the runner's and the worker's parts from `config`; fails only
/// where building goes further than validating (the CA file's contents).
pub fn build(config: &Config) -> Result<Setup, ConfigError> {
    Ok(Setup { runner: runner_setup(config)?, worker: worker_options(config) })
}

pub fn worker_options(config: &Config) -> WorkerOptions {
    WorkerOptions {
        python: config.django.python.clone(),
        project_dir: config.django.project_dir.clone(),
        settings_module: config.django.settings_module.clone(),
        env: config
            .django
            .env
            .iter()
            .filter(|(name, _)| *name != API_KEY_ENV)
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect(),
        setup_env: setup_env(config),
        startup_timeout: Duration::from_secs(config.worker.startup_timeout),
        isolation: config.worker.isolation,
        spawn_commands: config.worker.spawn_commands.iter().cloned().collect(),
        prefork: config.worker.prefork,
        recycle_after_jobs: (config.worker.recycle_after_jobs > 0)
            .then_some(config.worker.recycle_after_jobs),
        recycle_above_rss: (config.worker.recycle_above_rss_mb > 0)
            .then_some(config.worker.recycle_above_rss_mb * 1024 * 1024),
        caller_dir: None,
    }
}

/// What the worker needs for Django's set-up only: the API key (from
/// the supervisor's environment, dc.toml or `django.env`).
fn setup_env(config: &Config) -> BTreeMap<String, String> {
    let key = config.server.api_key.clone().or_else(|| config.django.env.get(API_KEY_ENV).cloned());
    key.map(|key| (API_KEY_ENV.to_string(), key)).into_iter().collect()
}

pub fn cancel_grace(config: &Config) -> Duration {
    Duration::from_secs(config.worker.cancel_grace)
}

/// What the control-plane client needs; fails if the key or URL is unusable.
pub fn client_options(config: &Config) -> Result<ClientOptions, ConfigError> {
    let server = config.server.settings()?;
    Ok(ClientOptions {
        base_url: server.base_url,
        api_key: server.api_key,
        request_timeout: Duration::from_secs(config.server.request_timeout),
        ca_file: config.server.ca_file.clone(),
        user_agent: format!("dcsupervisor/{}", env!("CARGO_PKG_VERSION")),
    })
}

/// The limits of every job and of each named command.
pub fn job_limits(config: &Config) -> CommandLimits {
    let all = config.limits.all.over(JobLimits::default());
    let commands =
        config.limits.commands.iter().map(|(name, values)| (name.clone(), values.over(all))).collect();
    CommandLimits { all, commands }
}

/// Every secret to mask: the listed values and the named variables' values.
pub fn redactor(config: &Config) -> Option<Arc<Redactor>> {
    Redactor::new(secrets(config)).map(Arc::new)
}

/// The secrets known without asking the worker: the listed values and
/// the named environment variables' values.
/// The API key is always one of them, whatever `[redaction]` says.
pub fn secrets(config: &Config) -> Vec<String> {
    let mut secrets = config.redaction.values.clone();
    secrets.extend(setup_env(config).into_values().filter(|key| key.len() >= MIN_SECRET_LEN));
    for name in &config.redaction.from_env {
        let value = config.django.env.get(name).cloned().or_else(|| std::env::var(name).ok());
        match value {
            Some(value) if value.len() >= MIN_SECRET_LEN => secrets.push(value),
            Some(_) => {
                tracing::warn!(variable = %name, "not masking a value shorter than {MIN_SECRET_LEN} characters")
            }
            None => {
                tracing::warn!(variable = %name, "redaction.from_env names a variable that is not set")
            }
        }
    }
    secrets
}

pub fn execution_settings(config: &Config) -> Result<ExecutionSettings, ConfigError> {
    let mut bound_args: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for bound in &config.policy.bound_args {
        // Validated at load: the split succeeds.
        let args = shlex::split(&bound.args).unwrap_or_default();
        bound_args.entry(bound.command.clone()).or_default().push(args);
    }
    Ok(ExecutionSettings {
        admission: Admission {
            policy: config.policy(),
            signing: signing(config)?,
            bound_args,
            argument_rules: config.argument_rules()?,
            allow_code_loading_options: config.policy.allow_code_loading_options,
        },
        metadata_only: config.policy.metadata_only(),
        cancel_grace: cancel_grace(config),
        cancel_poll_interval: Duration::from_secs(2),
        start_retries: config.server.max_retries,
        flush_interval: Duration::from_secs_f64(config.runner.output_flush_interval),
        chunk_max_bytes: config.runner.chunk_max_bytes,
        output_cap: (config.runner.output_cap_bytes > 0).then_some(config.runner.output_cap_bytes),
        redactor: redactor(config),
        secrets: secrets(config),
        secret_settings: config.redaction.from_django_settings.clone(),
        limits: job_limits(config),
    })
}

/// The checks of `[policy.signing]`, if it is set.
pub fn signing(config: &Config) -> Result<Option<Arc<Signing>>, ConfigError> {
    let Some(signing) = &config.policy.signing else {
        return Ok(None);
    };
    let key = signing.verifying_key()?;
    Ok(Some(Arc::new(Signing::new(key, signing.max_age, &config.runner.state_dir))))
}

/// The labelled argument sets synced for bound commands.
pub fn bound_args_labels(config: &Config) -> BTreeMap<String, Vec<BoundArgs>> {
    let mut labels: BTreeMap<String, Vec<BoundArgs>> = BTreeMap::new();
    for bound in &config.policy.bound_args {
        let entry = BoundArgs { args: bound.args.clone(), label: bound.label.clone() };
        labels.entry(bound.command.clone()).or_default().push(entry);
    }
    labels
}

/// Everything the runner is built from (and rebuilt from on reload).
pub fn runner_setup(config: &Config) -> Result<RunnerSetup, ConfigError> {
    let client = Client::new(client_options(config)?).map_err(|error| match error {
        ClientSetupError::Proxy(proxy) => invalid(
            proxy.variable(),
            "(in the environment; not shown: it may hold a password)",
            proxy.to_string(),
        ),
        ClientSetupError::Url(message) => invalid("server.url", &config.server.url, message),
        other => invalid(
            "server.ca_file",
            config.server.ca_file.as_deref().unwrap_or(Path::new("")).display(),
            other.to_string(),
        ),
    })?;
    if let Some(egress) = client.egress() {
        tracing::info!("the control plane is reached {egress}");
    }
    Ok(RunnerSetup {
        client,
        settings: execution_settings(config)?,
        opts: runner_options(config),
        bound_args_labels: bound_args_labels(config),
    })
}

pub fn runner_options(config: &Config) -> RunnerOptions {
    RunnerOptions {
        runner_version: format!("{}+dcsupervisor", env!("CARGO_PKG_VERSION")),
        heartbeat_interval: Duration::from_secs(config.server.heartbeat_interval),
        poll_interval: Duration::from_secs_f64(config.runner.poll_interval),
        max_concurrent: config.runner.max_concurrent,
        shutdown_grace: Duration::from_secs(config.runner.shutdown_grace),
        delivery_deadline: Duration::from_secs(30),
        state_dir: config.runner.state_dir.clone(),
        outbox_memory_bytes: config.runner.outbox_memory_bytes,
        spool_max_bytes: config.runner.spool_max_bytes,
        state_dir_max_bytes: config.runner.state_dir_max_bytes,
        command_limits: config
            .policy
            .concurrency
            .iter()
            .map(|rule| {
                let limit = CommandLimit { max_running: rule.max_running, when_busy: rule.when_busy };
                (rule.command.clone(), limit)
            })
            .collect(),
    }
}
