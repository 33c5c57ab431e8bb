//! `dcsupervisor run`, assembled: the state directory and its lock, the set-up
//! from `dc.toml`, the worker, the journal, the health listener, and the
//! events (signals, the reload file, and the caller's own shutdown) that
//! drive the runner until it stops.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    // Signals are heard from here on: a SIGHUP sent while the worker starts
    // (supervisord does not wait for readiness) must not kill the process.
    let (events, mut receiver) = mpsc::channel(8);
    signals::listen(config_path.to_path_buf(), config.runner.reload_touch_file.clone(), events.clone())
        .map_err(ServeError::Signals)?;
    let start_up = async {
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
        Ok::<_, ServeError>(runner)
    };
    let Some((runner, reload)) = start_up_unless_stopped(start_up, &mut receiver).await? else {
        tracing::info!("stopped during start-up, before any execution was taken");
        systemd::flush(std::time::Duration::from_secs(1));
        return Ok(());
    };
    if let Some(reload) = reload {
        // Asked for while starting: the file may have changed since it was read.
        let _ = events.send(reload).await;
    }
    tokio::spawn(async move {
        shutdown.await;
        let _ = events.send(Event::Shutdown).await;
    });
    systemd::spawn_watchdog();
    runner.run(receiver).await;
    tracing::info!("stopped");
    // STOPPING=1 and the like go out before the process ends.
    systemd::flush(std::time::Duration::from_secs(1));
    Ok(())
}

/// Runs the start-up unless a stop is asked for first (`None`: the start-up
/// was dropped, killing the worker it was starting). The last reload asked
/// for meanwhile is returned, to be applied once the runner runs.
async fn start_up_unless_stopped(
    start_up: impl Future<Output = Result<Arc<Runner>, ServeError>>,
    events: &mut mpsc::Receiver<Event>,
) -> Result<Option<(Arc<Runner>, Option<Event>)>, ServeError> {
    tokio::pin!(start_up);
    let mut reload = None;
    loop {
        tokio::select! {
            started = &mut start_up => return started.map(|runner| Some((runner, reload))),
            event = events.recv() => match event {
                Some(Event::Reload(..)) => reload = event,
                Some(Event::Shutdown) | None => return Ok(None),
            },
        }
    }
}
