//! Everything between the control plane and the worker.
//!
//! * Built: [`setup`] (a validated `Config` to the runner's and the worker's
//!   parts, at start-up and on every reload), [`serve()`] (`dcsupervisor
//!   run`, assembled), [`signals`] (signals and the reload file).
//! * Talking to the control plane: [`client`] (HTTP, TLS, retries; the wire
//!   types and paths are `crate::protocol`), [`delivery`] (output and
//!   completions, in order, until acknowledged), [`runner`] (heartbeat, sync,
//!   polling, slots, reload and shutdown), [`commands`] (what is synced).
//! * What may run: [`admission`] (the one pipeline: policy, signature,
//!   arguments, concurrency).
//! * One execution: [`execution`] (start to completion), [`supervise`] (while
//!   its job runs: output pump, cancel poller, stopper), [`output`] (bytes to
//!   timestamped segments and chunks), [`redact`] (secrets masked).
//! * Nothing lost: [`outbox`] (each execution's output log, followed by its
//!   delivery task), [`wal`] (the log's framed, checksummed records),
//!   [`replay`] (records to chunks, the same every time), [`journal`]
//!   (executions in flight, for crash recovery).
//! * The process: [`state`] (the state directory and instance lock),
//!   [`systemd`] (notify protocol).

pub mod admission;
pub mod client;
pub mod commands;
pub mod delivery;
pub mod execution;
pub mod journal;
pub mod outbox;
pub mod output;
pub mod proxy;
pub mod redact;
pub mod replay;
pub mod runner;
mod serve;
pub mod setup;
pub mod signals;
pub mod state;
pub mod supervise;
pub mod systemd;
pub mod wal;

pub use serve::{serve, ServeError};
