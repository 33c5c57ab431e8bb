//! The supervisor's decisions, independent of how work reaches it: which
//! commands may run ([`policy`]) and what is synced to the control plane
//! ([`commands`]).

pub mod api;
pub mod client;
pub mod commands;
pub mod control;
pub mod delivery;
pub mod execution;
pub mod journal;
pub mod output;
pub mod policy;
pub mod redact;
pub mod runner;
pub mod signing;
pub mod state;
pub mod systemd;
