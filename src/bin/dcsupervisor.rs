//! The `dcsupervisor` command line: parses arguments, sets up logging, loads
//! `dc.toml` and hands over to the library. Errors get their context here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dcsupervisor::config::Config;
use dcsupervisor::protocol::commands::commands_hash;
use dcsupervisor::supervisor::commands::synced_commands;
use dcsupervisor::supervisor::runner::Runner;
use dcsupervisor::supervisor::{self, setup, signals, state};
use dcsupervisor::worker::{
    die_like, wait_in_foreground, ForegroundEnd, Isolation, JobEnd, Output, Worker, FORK_HAZARD_FIX,
};
use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use std::os::unix::fs::OpenOptionsExt;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

/// Exit status of `exec` when the policy refuses the command (like a shell's
/// "found but not executable").
const REFUSED_EXIT_CODE: u8 = 126;
/// Exit status after a panic (EX_SOFTWARE): an internal error.
const PANIC_EXIT_CODE: i32 = 70;

#[derive(Parser)]
#[command(
    version,
    propagate_version = true,
    about = "DjangoCommand runner: runs Django management commands for the DjangoCommand control plane"
)]
struct Cli {
    /// Path to dc.toml.
    #[arg(long, short, env = "DCSUPERVISOR_CONFIG", default_value = "dc.toml", global = true)]
    config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less logging (-q: warnings and errors only, -qq: errors only).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    /// Log to this file instead of stderr, rotated by size (FILE.1 is the
    /// newest old one). For background runs without journald or a process
    /// manager (`manage.py djangocommand start -d` uses it).
    #[arg(long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// With --log-file: rotate once the file passes this many bytes.
    #[arg(long, global = true, default_value_t = 10 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    log_max_bytes: u64,
    /// With --log-file: rotated files kept besides the current one.
    #[arg(long, global = true, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    log_keep: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the control plane and run executions until stopped (the default).
    Run,
    /// One heartbeat (and a command sync if the control plane asks), then exit.
    Once,
    /// Check everything a deploy can break: the configuration, the worker,
    /// the commands and the policy, and whether the control plane accepts
    /// the key. Exits non-zero with the reason when anything is wrong.
    Check,
    /// Run one management command locally through the worker and the policy,
    /// streaming its output; exits with the command's exit code.
    Exec {
        /// Stop the command (SIGTERM, then SIGKILL after the grace) after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// The management command, then its arguments. Everything after the
        /// command's name is the command's own, `-v`, `-h`, `--help` and
        /// `--version` included; dcsupervisor's options go before it. Passed
        /// as they are, never through a shell.
        #[arg(
            required = true,
            value_name = "COMMAND [ARGS]",
            trailing_var_arg = true,
            allow_hyphen_values = true,
            num_args = 1..
        )]
        command_line: Vec<String>,
    },
    /// List the project's commands, which ones the policy lets through, and
    /// the commands hash sent to the control plane.
    Commands {
        /// Print the synced list and its hash as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = init_logging(&cli) {
        eprintln!("dcsupervisor: {err:#}");
        return ExitCode::FAILURE;
    }
    exit_on_panic();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("dcsupervisor: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("dcsupervisor: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// No panic is reachable from the configuration, the control plane or the
/// worker; should one happen anyway (a bug), in any task, the process exits
/// with a failure status at once, so the process manager restarts it (the
/// journal then recovers its executions). Without this a dead task could
/// leave the runner half-working, or let it shut down and exit 0, which
/// `Restart=on-failure` does not restart.
fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!("internal error (panic): exiting with status {PANIC_EXIT_CODE}");
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

fn init_logging(cli: &Cli) -> Result<()> {
    // One-shot local commands keep the terminal for the command's own
    // output; `exec` adds nothing to it but its own failures (warnings such
    // as fork hazards belong to the runner's log and to `check`).
    let quiet_by_default = matches!(cli.command, Some(Command::Commands { .. } | Command::Check));
    let silent_by_default = matches!(cli.command, Some(Command::Exec { .. }));
    let level = match (cli.verbose, cli.quiet) {
        (0, 0) if silent_by_default => "error",
        (0, 0) if quiet_by_default => "warn",
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only for a person at a terminal, not in journald or log files.
    let ansi = cli.log_file.is_none()
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let writer = match &cli.log_file {
        Some(path) => {
            BoxMakeWriter::new(std::sync::Mutex::new(rotating_log(path, cli.log_max_bytes, cli.log_keep)?))
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    // Every line is escaped: log lines carry data from the control plane and the worker.
    let writer = dcsupervisor::logging::Escaping::new(writer, ansi);
    // A log line that cannot be written (stderr on a full disk) is dropped:
    // reporting it with eprintln! would panic, wherever the event was logged.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// `path`, rotated once it passes `max_bytes`, keeping `keep` old files
/// (PATH.1 the newest), created 0600 like everything in the state directory.
fn rotating_log(path: &Path, max_bytes: u64, keep: u64) -> Result<FileRotate<AppendCount>> {
    let path = std::path::absolute(path).with_context(|| format!("log file {}", path.display()))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    // file-rotate panics when it cannot create the directory: check first.
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true).create(true).append(true).mode(0o600);
    options.open(&path).with_context(|| format!("cannot open the log file {}", path.display()))?;
    let max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    let keep = usize::try_from(keep).unwrap_or(usize::MAX);
    let limit = ContentLimit::BytesSurpassed(max_bytes);
    Ok(FileRotate::new(path, AppendCount::new(keep), limit, Compression::None, Some(options)))
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            // `serve` reads the configuration itself, and again on each
            // reload. SIGTERM and SIGINT stop it (signals.rs): nothing else
            // to wait for.
            supervisor::serve(&cli.config, std::future::pending()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Once => run_once(&load_config(&cli.config)?).await,
        Command::Check => check(&cli.config, &load_config(&cli.config)?).await,
        Command::Exec { timeout, command_line } => match command_line.split_first() {
            Some((command, _)) if command.starts_with('-') => {
                anyhow::bail!("exec: {command:?} is not a command name; dcsupervisor's options go before the command, the command's after it")
            }
            Some((command, args)) => exec(&load_config(&cli.config)?, command, args, timeout).await,
            None => anyhow::bail!("exec needs a command name"),
        },
        Command::Commands { json } => list_commands(&load_config(&cli.config)?, json).await,
    }
}

fn load_config(path: &Path) -> Result<Config> {
    Config::load(path).with_context(|| format!("configuration {} is not usable", path.display()))
}

/// `once`: one heartbeat (and sync), beside a running supervisor if there
/// is one, so without the instance lock and the journal.
async fn run_once(config: &Config) -> Result<ExitCode> {
    state::prepare(&config.runner.state_dir)?;
    signals::survive_file_size_limit().context("cannot handle SIGXFSZ")?;
    let setup = setup::build(config)?;
    let worker = Worker::start(setup.worker).await.context("the Python worker did not start")?;
    let runner = Runner::new(worker.clone(), setup.runner, None).await.context("command discovery failed")?;
    let result = runner.run_once().await;
    worker.shutdown().await;
    let answer = result.context("the heartbeat failed")?;
    println!(
        "heartbeat ok: commands in sync: {}, pending executions: {}, runner state: {:?}",
        answer.commands_in_sync, answer.pending_executions, answer.runner_state
    );
    Ok(ExitCode::SUCCESS)
}

/// Minimum free space `check` is happy with: output logs live there.
const LOW_DISK_BYTES: u64 = 256 * 1024 * 1024;

/// The state directory takes writes, and how much room it has.
fn check_state_dir(dir: &Path) -> bool {
    match state::probe(dir) {
        Ok(free) if free < LOW_DISK_BYTES => {
            println!(
                "WARN the state directory {} takes writes but only {} MiB are free: output logs may fill it",
                dir.display(),
                free / (1024 * 1024)
            );
            true
        }
        Ok(free) => {
            println!(
                "ok   the state directory {} takes writes ({} MiB free)",
                dir.display(),
                free / (1024 * 1024)
            );
            true
        }
        Err(error) => {
            println!("FAIL the state directory: {error}; output could not be logged before delivery");
            false
        }
    }
}

async fn check(config_path: &Path, config: &Config) -> Result<ExitCode> {
    println!("ok   configuration {} is valid", config_path.display());
    let state_ok = check_state_dir(&config.runner.state_dir);
    let setup = setup::build(config).context("the control-plane settings are not usable")?;
    let worker = Worker::start(setup.worker).await.context("the Python worker did not start")?;
    if let Some(info) = worker.info() {
        println!(
            "ok   worker started: Python {}, Django {} (pid {})",
            info.python_version, info.django_version, info.pid
        );
    }
    let policy = config.policy();
    let discovered = worker.discover().await.context("command discovery failed")?;
    let synced = synced_commands(&discovered, &policy);
    let names: Vec<&str> = synced.iter().map(|c| c.name.as_str()).collect();
    println!(
        "ok   {} commands discovered; the {:?} policy lets {} through: {}",
        discovered.len(),
        policy.mode,
        synced.len(),
        names.join(", ")
    );
    print_fork_hazards(&worker, config).await?;
    let runner = Runner::new(worker.clone(), setup.runner, None).await.context("command discovery failed")?;
    let heartbeat = runner.run_once().await;
    worker.shutdown().await;
    match heartbeat {
        Ok(_) if !state_ok => Ok(ExitCode::FAILURE),
        Ok(answer) => {
            println!(
                "ok   the control plane at {} accepted the key (commands in sync: {}, pending executions: {}, state: {:?})",
                config.server.url, answer.commands_in_sync, answer.pending_executions, answer.runner_state
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            println!("FAIL the control plane at {}: {error}", config.server.url);
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `check`'s report of what forked jobs would share with the worker or lose.
async fn print_fork_hazards(worker: &Worker, config: &Config) -> Result<()> {
    if config.worker.isolation == Isolation::Spawn {
        println!("ok   worker.isolation = \"spawn\": jobs are not forked");
        return Ok(());
    }
    let hazards = worker.fork_hazards().await.context("could not inspect the worker for fork hazards")?;
    if hazards.is_empty() {
        println!(
            "ok   no fork hazards: no open sockets, other descriptors, threads or shared random generators"
        );
        return Ok(());
    }
    for hazard in &hazards {
        let effect = match hazard.kind.corrupts_data() {
            true => "jobs run as fresh manage.py subprocesses, not forked",
            false => "forked jobs differ from manage.py",
        };
        println!("warn fork hazard ({:?}): {}; {effect}", hazard.kind, hazard.detail);
    }
    println!("     fix: {FORK_HAZARD_FIX}");
    Ok(())
}

async fn exec(config: &Config, command: &str, args: &[String], timeout: Option<u64>) -> Result<ExitCode> {
    let policy = config.policy();
    if let Err(refusal) = policy.check(command) {
        eprint!("{}", policy.rejection(command, &refusal).render(command));
        return Ok(ExitCode::from(REFUSED_EXIT_CODE));
    }
    let mut opts = setup::worker_options(config);
    if let Some(message) = settings_env_conflict(&opts.settings_module) {
        eprintln!("dcsupervisor: {message}");
        return Ok(ExitCode::from(REFUSED_EXIT_CODE));
    }
    // As `python manage.py` run here: the caller's directory, and the
    // caller's own stdin, stdout and stderr (no copy in between).
    opts.caller_dir = Some(std::env::current_dir().context("the current directory is not usable")?);
    let worker = Worker::start(opts).await.context("the Python worker did not start")?;
    // A job asking for other settings runs as a fresh manage.py (Worker::spawn_job).
    let started = worker.spawn_job(command, args, Output::Inherit).await;
    let mut job = started.context("could not start the command")?;
    // The caller's signals go to the job as they come (worker/foreground.rs).
    let end =
        wait_in_foreground(&mut job, timeout.map(Duration::from_secs), setup::cancel_grace(config)).await;
    worker.shutdown().await;
    let code = match end {
        // Stopped by `exec` itself: the shell's code, as `timeout` gives.
        ForegroundEnd::TimedOut(end) => end.shell_code(),
        ForegroundEnd::Ended(JobEnd::Lost(reason)) => {
            eprintln!("dcsupervisor: the command's worker died: {reason}");
            1
        }
        // Of the job's own signal, if it died of one.
        ForegroundEnd::Ended(end) => die_like(&end),
    };
    Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
}

/// `manage.py` lets `DJANGO_SETTINGS_MODULE` from the environment win over
/// its default; the worker is set up with `django.settings_module`. When
/// they differ, `exec` refuses rather than guess which one was meant.
fn settings_env_conflict(settings_module: &str) -> Option<String> {
    let from_env = std::env::var("DJANGO_SETTINGS_MODULE").ok()?;
    (from_env != settings_module).then(|| {
        format!(
            "DJANGO_SETTINGS_MODULE={from_env} in the environment differs from django.settings_module \
             ({settings_module}); the command was not run. Unset it, or point django.settings_module at it."
        )
    })
}

async fn list_commands(config: &Config, json: bool) -> Result<ExitCode> {
    let worker =
        Worker::start(setup::worker_options(config)).await.context("the Python worker did not start")?;
    let discovered = worker.discover().await.context("command discovery failed")?;
    worker.shutdown().await;
    let policy = config.policy();
    let synced = synced_commands(&discovered, &policy);
    let hash = commands_hash(&synced);
    let mut out = std::io::stdout().lock();
    if json {
        let document = serde_json::json!({ "commands": synced, "commands_hash": hash });
        writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let width = discovered.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let app_width = discovered.iter().map(|c| c.app_label.len()).max().unwrap_or(0);
    for command in &discovered {
        let verdict = match policy.check(&command.name) {
            Ok(()) => "allowed".to_string(),
            Err(refusal) => format!("refused ({refusal})"),
        };
        writeln!(out, "{:width$}  {:app_width$}  {verdict}", command.name, command.app_label)?;
    }
    writeln!(out, "\n{} of {} commands allowed; commands hash {hash}", synced.len(), discovered.len())?;
    Ok(ExitCode::SUCCESS)
}
