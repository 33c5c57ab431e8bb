//! The runner API as a module both sides use: the runner's client
//! (`supervisor::client`) and the local control plane (`dccontrol`).
//!
//! * [`api`] — the JSON bodies of every request and answer.
//! * [`route`] — the endpoints' paths and methods.
//! * [`commands`] — the command catalog and its hash.
//!
//! The signed-message format of `[policy.signing]` is
//! `supervisor::admission::signing` (the check and its canonical message).

pub mod api;
pub mod commands;
pub mod route;
