//! The runner API as a module both sides use: the runner's client
//! (`supervisor::client`) and the local control plane (`dccontrol`).
//!
//! * [`api`] — the JSON bodies of every request and answer.
//! * [`route`] — the endpoints' paths and methods.
//! * [`commands`] — the command catalog and its hash.
//! * [`signed`] — the signed-message format of `[policy.signing]` and its keys
//!   (the runner's check is `supervisor::admission::signing`).

pub mod api;
pub mod commands;
pub mod route;
pub mod signed;
