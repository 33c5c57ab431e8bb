//! The stopper: the one place that decides a job must stop before it ends
//! on its own, and stops it. Three things can ask — the execution's timeout,
//! the operator's cancel (from the cancel poller) and the runner's shutdown
//! — and the first one is the reason reported. Stopping is SIGTERM to the
//! job's process group, the grace period, then SIGKILL; a forced cancel (or
//! one that turns forced during the grace) is SIGKILL at once.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::watch;

use super::cancel::CancelRequest;
use crate::worker::{Job, JobEnd};

/// Why the runner stopped a job before it ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    TimedOut,
}

/// What may ask the job to stop.
pub struct StopTriggers {
    pub timeout: Duration,
    pub grace: Duration,
    pub cancel: watch::Receiver<Option<CancelRequest>>,
    /// Turns true when the runner shuts down.
    pub abort: watch::Receiver<bool>,
}

/// Waits for the job to end, stopping it if a trigger fires first. Returns
/// how it ended and, if the runner stopped it, why.
pub async fn run_to_end(job: &mut Job, mut triggers: StopTriggers) -> (JobEnd, Option<StopReason>) {
    let reason = tokio::select! {
        end = job.wait() => return (end, None),
        reason = first_trigger(&mut triggers) => reason,
    };
    let forced = current_force(&triggers.cancel) && reason == StopReason::Cancelled;
    match reason {
        StopReason::TimedOut => tracing::info!("timed out after {:?}; stopping it", triggers.timeout),
        StopReason::Cancelled => tracing::info!(force = forced, "stopping it on request"),
    }
    (stop(job, forced, &mut triggers).await, Some(reason))
}

async fn first_trigger(triggers: &mut StopTriggers) -> StopReason {
    let deadline = tokio::time::sleep(triggers.timeout);
    tokio::select! {
        _ = deadline => StopReason::TimedOut,
        _ = wait_until(&mut triggers.cancel, |request| request.is_some()) => StopReason::Cancelled,
        _ = wait_until(&mut triggers.abort, |aborting| *aborting) => StopReason::Cancelled,
    }
}

/// SIGTERM, the grace period (cut short by a forced cancel), SIGKILL.
async fn stop(job: &mut Job, forced: bool, triggers: &mut StopTriggers) -> JobEnd {
    if !forced {
        job.signal(Signal::SIGTERM).await;
        let ended = tokio::select! {
            end = job.wait() => Some(end),
            _ = tokio::time::sleep(triggers.grace) => None,
            _ = wait_until(&mut triggers.cancel, |request| request.is_some_and(|r| r.force)) => None,
        };
        if let Some(end) = ended {
            return end;
        }
    }
    job.signal(Signal::SIGKILL).await;
    job.wait().await
}

fn current_force(cancel: &watch::Receiver<Option<CancelRequest>>) -> bool {
    cancel.borrow().is_some_and(|request| request.force)
}

/// Resolves once `wanted` holds; never if the sender is gone first.
async fn wait_until<T>(receiver: &mut watch::Receiver<T>, wanted: impl FnMut(&T) -> bool) {
    if receiver.wait_for(wanted).await.is_err() {
        std::future::pending::<()>().await;
    }
}
