//! The cancel poller: asks the control plane every `cancel_poll_interval`
//! whether the operator wants the execution stopped, in a task of its own,
//! so a stalled or failing `cancel-status` call never delays the output,
//! the timeout or a kill. Each attempt is bounded; failures back off (a
//! `Retry-After` is honoured) and are otherwise ignored: the next poll may
//! succeed.

use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument as _;

use crate::backoff::Backoff;
use crate::protocol::api::ExecutionId;
use crate::supervisor::client::Client;
use crate::supervisor::delivery::AuthGate;

/// Longest one `cancel-status` call may take (the client's own
/// `request_timeout` may cut it sooner).
const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait between polls while they fail.
const MAX_FAILURE_WAIT: Duration = Duration::from_secs(30);

/// What the control plane asked for, once it asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelRequest {
    /// SIGKILL at once rather than SIGTERM and a grace period.
    pub force: bool,
}

/// The running poller; it stops when dropped.
pub struct CancelPoller {
    task: tokio::task::JoinHandle<()>,
    requested: watch::Receiver<Option<CancelRequest>>,
}

impl CancelPoller {
    pub fn spawn(client: Client, gate: AuthGate, id: ExecutionId, interval: Duration) -> Self {
        let (sender, requested) = watch::channel(None);
        let task = tokio::spawn(poll(client, gate, id, interval, sender).in_current_span());
        Self { task, requested }
    }

    /// Changes each time the request does (none → graceful → forced).
    pub fn requests(&self) -> watch::Receiver<Option<CancelRequest>> {
        self.requested.clone()
    }
}

impl Drop for CancelPoller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll(
    client: Client,
    gate: AuthGate,
    id: ExecutionId,
    interval: Duration,
    requested: watch::Sender<Option<CancelRequest>>,
) {
    let mut failures = Backoff::exponential(interval, MAX_FAILURE_WAIT.max(interval));
    let mut wait = interval;
    loop {
        tokio::time::sleep(wait).await;
        gate.wait_valid().await;
        wait = match tokio::time::timeout(ATTEMPT_LIMIT, client.cancel_status(&id)).await {
            Ok(Ok(status)) => {
                failures.reset();
                if status.cancel_requested {
                    let request = CancelRequest { force: status.force_kill };
                    if requested.send_if_modified(|current| current.replace(request) != Some(request)) {
                        tracing::info!(force = request.force, "cancel requested");
                    }
                    if request.force {
                        return; // nothing stronger can come
                    }
                }
                interval
            }
            Ok(Err(error)) => {
                gate.observe(&error);
                tracing::debug!("cancel-status check failed: {error}");
                failures.next_delay(error.retry_after())
            }
            Err(_) => {
                tracing::debug!("cancel-status check abandoned after {ATTEMPT_LIMIT:?}");
                failures.next_delay(None)
            }
        };
    }
}
