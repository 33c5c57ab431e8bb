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

/// What the sending thread is handed.
enum Note {
    Send(String),
    /// Answered once everything handed over before it was sent.
    Flush(SyncSender<()>),
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let message = states.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    match sender().try_send(Note::Send(message)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            tracing::debug!("the service manager is not reading its notifications; one dropped");
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}

/// Waits (at most `limit`) until what was handed over is sent: the process
/// is about to exit, which would drop the last ones (`STOPPING=1`).
pub fn flush(limit: Duration) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let (done, sent) = sync_channel(1);
    if sender().try_send(Note::Flush(done)).is_ok() {
        let _ = sent.recv_timeout(limit);
    }
}

/// The queue of the sending thread, started on first use.
fn sender() -> &'static SyncSender<Note> {
    static SENDER: OnceLock<SyncSender<Note>> = OnceLock::new();
    SENDER.get_or_init(|| {
        let (sender, queue) = sync_channel::<Note>(QUEUED);
        let spawned = std::thread::Builder::new().name("sd-notify".into()).spawn(move || {
            for note in queue {
                match note {
                    Note::Send(message) => {
                        if let Err(error) = sd_notify::notify(&[NotifyState::Custom(&message)]) {
                            tracing::debug!("systemd notification failed: {error}");
                        }
                    }
                    Note::Flush(done) => {
                        let _ = done.try_send(());
                    }
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
