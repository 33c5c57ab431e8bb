//! What happens while a job runs, in three parts that never wait on each
//! other: the [`pump`] reads the output and sends it as chunks (adaptive
//! flush), the [`cancel`] poller asks the control plane whether to stop, in
//! its own task, and the [`stopper`] stops the job on a timeout, a cancel or
//! a shutdown. A stalled control plane can slow the chunks' delivery, never
//! the reading of the output, the timeout or a kill.

pub mod cancel;
pub mod pump;
pub mod stopper;

use std::time::Duration;

use self::cancel::CancelPoller;
use self::pump::Pump;
use self::stopper::{StopReason, StopTriggers};
use super::execution::ExecutionContext;
use super::outbox::Outbox;
use crate::ipc::{ExitStatus, JobLimits};
use crate::protocol::api::{CompleteRequest, CompletionStatus};
use crate::worker::{Job, JobEnd};

/// Output still arriving this long after the command ended is abandoned (a
/// process that escaped the job's process group may hold the pipes).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

/// Runs the job to its end, streaming its output, honouring cancel
/// requests, the timeout and shutdown; returns the completion to report.
pub async fn supervise(
    ctx: &ExecutionContext,
    mut job: Job,
    timeout: Duration,
    limits: JobLimits,
    outbox: &Outbox,
) -> CompleteRequest {
    let settings = &ctx.settings;
    let poller = CancelPoller::spawn(
        ctx.client.clone(),
        ctx.gate.clone(),
        outbox.id().clone(),
        settings.cancel_poll_interval,
    );
    let triggers = StopTriggers {
        timeout,
        grace: settings.cancel_grace,
        cancel: poller.requests(),
        abort: ctx.abort.clone(),
    };
    let pipes = (job.stdout.take(), job.stderr.take());
    let mut pump = Pump::new(outbox, pipes, settings.flush_interval);
    let (end, stop) = {
        let ended = stopper::run_to_end(&mut job, triggers);
        let pumping = pump.run();
        tokio::pin!(ended, pumping);
        tokio::select! {
            result = &mut ended => {
                if tokio::time::timeout(DRAIN_AFTER_EXIT, &mut pumping).await.is_err() {
                    tracing::warn!("output still open {DRAIN_AFTER_EXIT:?} after the command ended; stopped reading");
                }
                result
            }
            () = &mut pumping => ended.await,
        }
    };
    drop(poller);
    pump.finish();
    // A job the runner stopped was not killed by its limits.
    let limits = if stop.is_some() { JobLimits::default() } else { limits };
    if let Some(line) = explain_end(&end, limits) {
        outbox.note(true, &line);
    }
    completion(stop, &end)
}

/// A line for the output when the way the job ended needs explaining.
fn explain_end(end: &JobEnd, limits: JobLimits) -> Option<String> {
    use nix::sys::signal::Signal;
    match end {
        JobEnd::Lost(reason) => {
            Some(format!("[dcsupervisor] the worker running this command died: {reason}\n"))
        }
        JobEnd::Exited(ExitStatus::Signal { signal }) if limits.cpu_seconds > 0 => {
            let hit = *signal == Signal::SIGXCPU as i32 || *signal == Signal::SIGKILL as i32;
            hit.then(|| {
                format!("[dcsupervisor] the command reached its CPU time limit ({} s)\n", limits.cpu_seconds)
            })
        }
        JobEnd::Exited(_) => None,
    }
}

fn completion(stop: Option<StopReason>, end: &JobEnd) -> CompleteRequest {
    // Like Python's subprocess: a signal death is the negative signal number.
    let exit_code = match end {
        JobEnd::Exited(ExitStatus::Code { code }) => *code,
        JobEnd::Exited(ExitStatus::Signal { signal }) => -signal,
        JobEnd::Lost(_) => -1,
    };
    let status = match (stop, exit_code) {
        (Some(StopReason::TimedOut), _) => {
            return CompleteRequest { exit_code: -1, status: CompletionStatus::TimedOut }
        }
        (Some(StopReason::Cancelled), _) => CompletionStatus::Cancelled,
        (None, 0) => CompletionStatus::Success,
        (None, _) => CompletionStatus::Failed,
    };
    CompleteRequest { exit_code, status }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_exit_codes() {
        let exited = |code| JobEnd::Exited(ExitStatus::Code { code });
        let killed = |signal| JobEnd::Exited(ExitStatus::Signal { signal });
        assert_eq!(
            completion(None, &exited(0)),
            CompleteRequest { exit_code: 0, status: CompletionStatus::Success }
        );
        assert_eq!(
            completion(None, &exited(3)),
            CompleteRequest { exit_code: 3, status: CompletionStatus::Failed }
        );
        assert_eq!(completion(None, &killed(11)).exit_code, -11);
        assert_eq!(
            completion(Some(StopReason::Cancelled), &killed(15)),
            CompleteRequest { exit_code: -15, status: CompletionStatus::Cancelled }
        );
        assert_eq!(
            completion(Some(StopReason::TimedOut), &killed(9)),
            CompleteRequest { exit_code: -1, status: CompletionStatus::TimedOut }
        );
    }
}
