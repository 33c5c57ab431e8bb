//! A local DjangoCommand control plane, for tests and demos: the runner API
//! answered the way the hosted service does (same paths, bodies,
//! authentication and replay checks), with state in memory, plus an operator
//! API to queue commands, read their output back and inject faults.
//!
//! `dccontrol` (`src/bin/dccontrol`) is its command line; the integration
//! tests drive it with the same typed [`OperatorClient`]. The runner API's
//! types and paths are the runner's own (`crate::protocol`), so the two
//! sides cannot disagree; the operator API's are [`wire`] and [`route`].
//!
//! * `server` — HTTP: bearer key, replay checks, request log, faults;
//! * `routes` — what each endpoint does to the `store`;
//! * `client` — the typed operator client.

mod client;
mod reply;
pub mod route;
mod routes;
mod server;
mod store;
pub mod wire;

pub use client::{ClientError, OperatorClient};
pub use server::{LocalPlane, PlaneError};
pub use store::unix_now;
