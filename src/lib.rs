//! dcsupervisor: the DjangoCommand runner.
//!
//! Data flows one way: the control plane queues executions, the
//! [`supervisor`] decides what may run and schedules it, the [`worker`] runs
//! it in a fork of a preloaded Django process, and output flows back the same
//! way. [`protocol`] is the runner API the supervisor and the control plane
//! share; [`ipc`] is the language the supervisor and the worker speak;
//! [`config`] is `dc.toml`; [`local_plane`] is `dccontrol`, the control plane
//! the tests and the demo run against; [`backoff`] is the one retry rhythm all of
//! them use; [`logging`] keeps log lines unforgeable; [`health`] is what
//! operators' probes and Prometheus read; [`procfs`] reads `/proc/<pid>/stat`
//! and [`sync`] holds locks that survive a panicked holder.

pub mod backoff;
pub mod config;
pub mod health;
pub mod ipc;
pub mod local_plane;
pub mod logging;
pub mod procfs;
#[cfg(test)]
pub(crate) mod proptest_support;
pub mod protocol;
pub mod supervisor;
pub mod sync;
pub mod worker;
