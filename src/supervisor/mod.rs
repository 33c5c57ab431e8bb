//! Everything between the control plane and the worker.
//!
//! * Talking to the control plane: [`api`] (the wire messages), [`client`]
//!   (HTTP, TLS, retries), [`delivery`] (output and completions, in order,
//!   until acknowledged), [`runner`] (heartbeat, sync, polling, slots,
//!   reload and shutdown).
//! * One execution: [`execution`] (start to completion), [`supervise`] (while
//!   its job runs: output pump, cancel poller, stopper), [`output`] (bytes to
//!   timestamped segments and chunks), [`redact`] (secrets masked).
//! * Nothing lost: [`outbox`] (each execution's output log, followed by its
//!   delivery task), [`wal`] (the log's framed, checksummed records),
//!   [`replay`] (records to chunks, the same every time).
//! * What may run: [`admission`] (the one pipeline: policy, signature,
//!   arguments, concurrency), [`commands`] (what is synced, the hash).
//! * The process: [`signals`] (signals and the reload file), [`state`] (the
//!   state directory and instance lock), [`journal`] (executions in flight,
//!   for crash recovery), [`systemd`] (notify protocol).

pub mod admission;
pub mod client;
pub mod commands;
pub mod delivery;
pub mod execution;
pub mod journal;
pub mod outbox;
pub mod output;
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
