//! `dcsupervisor run`, assembled: the state directory and its lock, the set-up
//! from `dc.toml`, the worker, the journal, the health listener, and the
//! events (signals, the reload file, and the caller's own shutdown) that
//! drive the runner until it stops.

use std::future::Future;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use super::journal::Journal;
use super::runner::{Event, Runner};
use super::state::{self, StateError};
use super::{setup, signals, systemd};
use crate::config::{Config, ConfigError};
use crate::health::{self, HealthError};
use crate::worker::{JobError, StartError, Worker};

/// Why the runner could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("configuration {} is not usable", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    /// A part the set-up builds (the HTTP client) is not usable.
    #[error(transparent)]
    Setup(ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot handle SIGXFSZ")]
    FileSizeSignal(#[source] std::io::Error),
    #[error("the Python worker did not start")]
    Worker(#[source] StartError),
    #[error("cannot open the journal")]
    Journal(#[source] std::io::Error),
    #[error("command discovery failed")]
    Discovery(#[source] JobError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error("cannot listen for signals")]
    Signals(#[source] std::io::Error),
}

/// Runs executions from `config_path`'s control plane until SIGTERM/SIGINT
/// or `shutdown` resolves (then gracefully, as for SIGTERM). SIGHUP and the
/// reload file rebuild the set-up from the file again.
pub async fn serve(
    config_path: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let config = Config::load(config_path)
        .map_err(|source| ServeError::Config { path: config_path.to_path_buf(), source })?;
    let state_dir = state::prepare(&config.runner.state_dir)?;
    signals::survive_file_size_limit().map_err(ServeError::FileSizeSignal)?;
    let _lock = state::InstanceLock::acquire(&state_dir)?;
    let setup = setup::build(&config).map_err(ServeError::Setup)?;
    let worker = Worker::start(setup.worker).await.map_err(ServeError::Worker)?;
    let journal = Journal::open(&state_dir).map_err(ServeError::Journal)?;
    let runner =
        Runner::new(worker.clone(), setup.runner, Some(journal)).await.map_err(ServeError::Discovery)?;
    if let Some(addr) = config.runner.health_listen {
        // The runner spills undelivered output to <state_dir>/outbox.
        let probe = health::Probe { worker, spill_dir: state_dir.join("outbox") };
        health::start(addr, probe).await?;
    }
    let (events, receiver) = mpsc::channel(8);
    signals::listen(config_path.to_path_buf(), config.runner.reload_touch_file.clone(), events.clone())
        .map_err(ServeError::Signals)?;
    tokio::spawn(async move {
        shutdown.await;
        let _ = events.send(Event::Shutdown).await;
    });
    systemd::spawn_watchdog();
    runner.run(receiver).await;
    tracing::info!("stopped");
    Ok(())
}
