//! The `spawn` isolation mode: `python manage.py <command> <args>` as a plain
//! subprocess, as the published runner does. Slower (a fresh interpreter and
//! `django.setup()` per job) but right for projects where forking a process
//! that imported the project is unsafe. When the worker has set-up variables
//! (the API key), `python/djangocommand/_spawn.py` runs `manage.py` instead,
//! so the command gets them for Django's set-up only, as forked jobs do.

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use super::job::{Control, Job, JobOutputs};
use super::process::{keep_across_exec, setup_env_pipe, SETUP_ENV_FD_VAR};
use super::{JobEnd, WorkerOptions};
use crate::ipc::{ExitStatus, JobId, JobLimits};

/// Runs `manage.py` with the set-up variables read from a pipe.
const SPAWN_BOOTSTRAP: &str = include_str!("../../python/djangocommand/_spawn.py");

/// Seconds between RLIMIT_CPU's SIGXCPU (soft) and its SIGKILL (hard), as the worker does.
const CPU_HARD_MARGIN: u64 = 5;

/// Runs in the forked child before exec.
fn apply_limits(limits: JobLimits) -> std::io::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    if limits.cpu_seconds > 0 {
        setrlimit(Resource::RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + CPU_HARD_MARGIN)?;
    }
    if limits.address_space_bytes > 0 {
        setrlimit(Resource::RLIMIT_AS, limits.address_space_bytes, limits.address_space_bytes)?;
    }
    if limits.nice > 0 {
        // SAFETY: nice(2) only changes this (child) process's priority.
        unsafe { nix::libc::nice(limits.nice) };
    }
    Ok(())
}

pub(super) fn start(
    opts: &WorkerOptions,
    id: JobId,
    command: &str,
    args: &[String],
    outputs: JobOutputs,
    limits: JobLimits,
) -> std::io::Result<Job> {
    let setup_env = setup_env_pipe(opts)?;
    let setup_raw = setup_env.as_ref().map(|fd| fd.as_raw_fd());
    let mut child = {
        let mut process = tokio::process::Command::new(&opts.python);
        if setup_env.is_some() {
            process.arg("-c").arg(SPAWN_BOOTSTRAP);
        }
        process
            .arg(opts.project_dir.join("manage.py"))
            .arg(command)
            .args(args)
            .current_dir(opts.caller_dir.as_ref().unwrap_or(&opts.project_dir))
            .env("DJANGO_SETTINGS_MODULE", &opts.settings_module)
            .envs(&opts.env)
            .stdin(Stdio::from(outputs.stdin))
            .stdout(Stdio::from(outputs.stdout_write))
            .stderr(Stdio::from(outputs.stderr_write));
        if opts.caller_dir.is_none() {
            // Output streams to the control plane as it is written.
            process.env("PYTHONUNBUFFERED", "1");
        }
        super::scrub_environment(&mut process);
        for name in opts.setup_env.keys() {
            process.env_remove(name);
        }
        if let Some(raw) = setup_raw {
            process.env(SETUP_ENV_FD_VAR, raw.to_string());
        }
        // SAFETY: setsid, setrlimit, nice and fcntl are async-signal-safe.
        unsafe {
            process.pre_exec(move || {
                // Its own session, as a forked job: a stop reaches all it
                // starts, and at a terminal it is not a background group
                // (stopped by SIGTTIN at its first read); `exec` relays the
                // terminal's signals to it (worker/foreground.rs).
                nix::unistd::setsid()?;
                apply_limits(limits)?;
                setup_raw.map_or(Ok(()), keep_across_exec)
            });
        }
        process.spawn()?
        // `process` drops here, closing our copies of the write ends.
    };
    drop(setup_env);
    let pid = child.id().unwrap_or_default();
    let exited = Arc::new(AtomicBool::new(false));
    let (end_tx, end_rx) = oneshot::channel();
    let reaped = exited.clone();
    tokio::spawn(async move {
        let end = match child.wait().await {
            Ok(status) => {
                reaped.store(true, Ordering::Release);
                // Like the worker does for forked jobs: nothing the command
                // started outlives it (leftovers would also hold the pipes).
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                match (status.code(), status.signal()) {
                    (Some(code), _) => JobEnd::Exited(ExitStatus::Code { code }),
                    (None, Some(signal)) => JobEnd::Exited(ExitStatus::Signal { signal }),
                    (None, None) => JobEnd::Lost(format!("unexpected wait status {status}")),
                }
            }
            Err(err) => JobEnd::Lost(format!("could not wait for the subprocess: {err}")),
        };
        let _ = end_tx.send(end);
    });
    Ok(Job::new(id, pid, (outputs.stdout, outputs.stderr), end_rx, Control::Subprocess { exited }))
}
