//! A job in the foreground, for `dcsupervisor exec`: the caller (a terminal,
//! a shell script, a service manager, `timeout`) sees it as it would see
//! `python manage.py`.
//!
//! A job leads its own session and process group (so a stop reaches all it
//! started), so the signals a terminal or a shell sends to the foreground
//! reach `exec`, never the job. `exec` therefore relays each of them to the
//! job's group as it comes, one for one, the way sudo does: Ctrl-C as many
//! times as it is pressed (a REPL survives two), SIGTERM to a command that
//! shuts down gracefully, SIGWINCH to one that redraws. Ctrl-Z stops the job
//! and then `exec` itself, so the shell gets the terminal back, and `fg`
//! continues both. When the job dies of a signal, `exec` dies of the same
//! one ([`die_like`]): a shell tells "killed by SIGINT" from "exited 130",
//! and stops a loop only on the former.

use std::time::Duration;

use futures_util::StreamExt as _;
use nix::sys::signal::Signal;
use signal_hook::consts::{
    SIGCONT, SIGHUP, SIGINT, SIGQUIT, SIGSTOP, SIGTERM, SIGTSTP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2, SIGWINCH,
};
use signal_hook_tokio::Signals;

use super::{Job, JobEnd, Stop};
use crate::ipc::ExitStatus;

/// What the terminal, a shell or a service manager sends the foreground
/// command, relayed to the job. SIGTSTP and SIGCONT are handled apart.
const RELAYED: [i32; 7] = [SIGINT, SIGQUIT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH];

/// How a foreground job ended.
pub enum ForegroundEnd {
    /// It ended by itself, or of a signal relayed to it.
    Ended(JobEnd),
    /// `exec --timeout` stopped it.
    TimedOut(JobEnd),
}

/// Waits for `job`, relaying the caller's signals to it, and stops it
/// (SIGTERM, `grace`, SIGKILL) after `timeout`.
pub async fn wait_in_foreground(job: &mut Job, timeout: Option<Duration>, grace: Duration) -> ForegroundEnd {
    let mut signals = match Signals::new(RELAYED.iter().copied().chain([SIGTSTP, SIGCONT])) {
        Ok(signals) => Some(signals),
        Err(err) => {
            // Without handlers the signals keep their default effect on
            // `exec`, whose worker then takes the job down with it.
            tracing::warn!("cannot relay signals to the command: {err}");
            None
        }
    };
    let deadline = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let end = loop {
        let next_signal = async {
            match signals.as_mut() {
                Some(signals) => signals.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            end = job.wait() => break ForegroundEnd::Ended(end),
            _ = &mut deadline => {
                eprintln!("dcsupervisor: timed out; stopping the command");
                break ForegroundEnd::TimedOut(job.stop(Stop::Graceful(grace)).await);
            }
            Some(number) = next_signal => relay(job, number).await,
        }
    };
    if let Some(signals) = signals {
        signals.handle().close();
    }
    end
}

async fn relay(job: &Job, number: i32) {
    if number == SIGTSTP {
        // The job leads a session of its own: the kernel drops a SIGTSTP
        // sent to it (an orphaned process group), so it gets SIGSTOP. Then
        // `exec` stops as the shell expects, until SIGCONT.
        job.signal(Signal::SIGSTOP).await;
        let _ = signal_hook::low_level::emulate_default_handler(SIGTSTP);
        return;
    }
    if let Ok(signal) = Signal::try_from(number) {
        job.signal(signal).await;
    }
}

/// Ends `exec` the way its job ended: of the same signal, or (for an exit
/// code, a lost worker, or a signal `exec` cannot die of) with the shell's
/// code, which the caller returns.
pub fn die_like(end: &JobEnd) -> i32 {
    // A process cannot end of a stop signal (a worker that reports one lies):
    // raising it would only stop `exec`.
    const STOPS: [i32; 4] = [SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU];
    if let JobEnd::Exited(ExitStatus::Signal { signal }) = *end {
        if STOPS.contains(&signal) {
            return end.shell_code();
        }
        // The job dumped its core, if the limits let it; `exec`'s own
        // would only mislead.
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_CORE) {
            let _ = setrlimit(Resource::RLIMIT_CORE, 0, hard);
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // Returns only for a signal that does not end a process (none a
        // job dies of), or one this platform does not know.
        let _ = signal_hook::low_level::emulate_default_handler(signal);
    }
    end.shell_code()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn killed_by(signal: i32) -> JobEnd {
        JobEnd::Exited(ExitStatus::Signal { signal })
    }

    #[test]
    fn a_stop_signal_reported_as_a_death_does_not_stop_exec() {
        for signal in [SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU] {
            assert_eq!(die_like(&killed_by(signal)), 128 + signal);
        }
    }

    #[test]
    fn a_signal_that_ends_no_process_gives_the_shells_code() {
        assert_eq!(die_like(&killed_by(SIGWINCH)), 128 + SIGWINCH);
        assert_eq!(die_like(&JobEnd::Exited(ExitStatus::Code { code: 3 })), 3);
    }
}
