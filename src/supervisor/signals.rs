//! What the process is asked from outside, turned into runner events:
//! SIGTERM and SIGINT stop it (a second one stops it at once), SIGHUP
//! reloads it, and so does a change of the optional touch file's
//! modification time (deploy scripts `touch` it). A reload re-reads dc.toml;
//! an invalid file is refused with the reason, and the runner goes on with
//! the configuration it has. What is rebuilt is `setup`'s to say.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;

use super::runner::Event;
use super::setup;

const TOUCH_FILE_CHECK: Duration = Duration::from_secs(2);

/// Past a file-size limit (RLIMIT_FSIZE) the kernel sends SIGXFSZ, whose
/// default kills the process: with a handler the write fails with EFBIG
/// instead, which the output log survives like a full disk. A handler, not
/// SIG_IGN, so processes the runner execs get the default back.
pub fn survive_file_size_limit() -> std::io::Result<()> {
    let hit = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGXFSZ, hit).map(drop)
}

/// Starts listening; what is heard is sent to `events` as runner events.
pub fn listen(
    config_path: PathBuf,
    touch_file: Option<PathBuf>,
    events: mpsc::Sender<Event>,
) -> std::io::Result<()> {
    let signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    tokio::spawn(forward_signals(signals, config_path.clone(), events.clone()));
    if let Some(touch_file) = touch_file {
        tokio::spawn(watch_touch_file(touch_file, config_path, events));
    }
    Ok(())
}

async fn forward_signals(mut signals: Signals, config_path: PathBuf, events: mpsc::Sender<Event>) {
    while let Some(signal) = signals.next().await {
        let event = match signal {
            SIGHUP => {
                tracing::info!("SIGHUP: reloading {}", config_path.display());
                reload_event(&config_path)
            }
            other => {
                tracing::info!(signal = other, "stop requested");
                Some(Event::Shutdown)
            }
        };
        if let Some(event) = event {
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

async fn watch_touch_file(path: PathBuf, config_path: PathBuf, events: mpsc::Sender<Event>) {
    let mut seen = modified(&path);
    let mut tick = tokio::time::interval(TOUCH_FILE_CHECK);
    loop {
        tick.tick().await;
        let now = modified(&path);
        if now != seen && now.is_some() {
            seen = now;
            tracing::info!("{} changed: reloading", path.display());
            if let Some(event) = reload_event(&config_path) {
                if events.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A reload event for a valid configuration; `None` (logged) otherwise.
fn reload_event(config_path: &Path) -> Option<Event> {
    match setup::load(config_path) {
        Ok((_, setup)) => Some(Event::Reload(Box::new(setup.runner), Box::new(setup.worker))),
        Err(error) => {
            tracing::error!("reload refused, still running with the previous configuration: {error}");
            // Under Type=notify-reload, systemd waits for the reload to end.
            super::systemd::reloading();
            super::systemd::ready(&format!("reload refused: {error}"));
            crate::health::metrics().reload_ended(false);
            None
        }
    }
}
