//! systemd's notify protocol (`Type=notify` / `Type=notify-reload`): ready,
//! reloading, stopping, status and watchdog pings. Every call is a no-op when
//! `NOTIFY_SOCKET` is unset, and the worker never inherits the variable
//! (see `worker::process`), so only the supervisor speaks for the service.
//!
//! A notification is a datagram, and sending one blocks while the service
//! manager's queue is full (`net.unix.max_dgram_qlen`, 10 by default): a
//! manager that is slow, hung or not reading would stall whatever thread
//! sends. So notifications go out from a thread of their own, in order, and
//! the runner only hands them over; past [`QUEUED`] waiting, new ones are
//! dropped (the manager is not listening anyway).

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use sd_notify::NotifyState;

/// Notifications waiting for the sending thread.
const QUEUED: usize = 64;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let message = states.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    match sender().try_send(message) {
        Ok(()) => {}
        Err(TrySendError::Full(message)) => {
            tracing::debug!("the service manager is not reading its notifications; dropped {message:?}");
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}

/// The queue of the sending thread, started on first use.
fn sender() -> &'static SyncSender<String> {
    static SENDER: OnceLock<SyncSender<String>> = OnceLock::new();
    SENDER.get_or_init(|| {
        let (sender, queue) = sync_channel::<String>(QUEUED);
        let spawned = std::thread::Builder::new().name("sd-notify".into()).spawn(move || {
            for message in queue {
                if let Err(error) = sd_notify::notify(&[NotifyState::Custom(&message)]) {
                    tracing::debug!("systemd notification failed: {error}");
                }
            }
        });
        if let Err(error) = spawned {
            // The queue's end is dropped with the closure: sends are no-ops.
            tracing::warn!("cannot start the systemd notification thread: {error}");
        }
        sender
    })
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Before a reload; `Type=notify-reload` requires the monotonic timestamp.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(error) => {
            tracing::debug!("no monotonic clock for the reload notification: {error}");
            send(&[NotifyState::Reloading]);
        }
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// Pings the watchdog at half its interval for as long as the runtime runs,
/// if systemd asked for it (`WatchdogSec=`).
pub fn spawn_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}
