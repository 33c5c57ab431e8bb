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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::wire::{ExecutionStatus, FaultSpec, NewExecution};
    use super::*;
    use crate::protocol::api::RunnerState;

    const KEY: &str = "dc_local_plane_test";

    /// A plane served in this process until the returned sender is dropped.
    async fn plane() -> (OperatorClient, tokio::sync::oneshot::Sender<()>) {
        let plane = LocalPlane::bind(SocketAddr::from(([127, 0, 0, 1], 0)), KEY.into(), None).await.unwrap();
        let url = format!("http://{}", plane.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(plane.serve(async {
            let _ = stopped.await;
        }));
        (OperatorClient::new(&url, KEY).unwrap(), stop)
    }

    /// Every typed call reaches the endpoint it means: the client's paths and
    /// the server's parsing come from the same `OperatorRoute`.
    #[tokio::test]
    async fn the_typed_client_and_the_server_agree_on_every_operator_route() {
        let (client, _stop) = plane().await;
        let id = client.queue(&NewExecution::new("noop", "--verbosity 0")).await.unwrap();
        let listed = client.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].command.as_str(), listed[0].args.as_str()), ("noop", "--verbosity 0"));
        let detail = client.detail(&id).await.unwrap();
        assert_eq!(detail.summary.status, ExecutionStatus::Pending);
        assert!(detail.chunks.is_empty());
        assert_eq!(client.signed_entry(&id).await.unwrap()["command"], "noop");
        let cancel = client.cancel(&id, true).await.unwrap();
        assert!(cancel.cancel_requested && cancel.force_kill);
        client.set_runner_state(RunnerState::Suspended, Some("maintenance")).await.unwrap();
        let state = client.state().await.unwrap();
        assert_eq!(state.runner_state, RunnerState::Suspended);
        assert_eq!(state.suspension_reason.as_deref(), Some("maintenance"));
        client.add_fault(&FaultSpec { status: 503, ..FaultSpec::default() }).await.unwrap();
        client.clear_faults().await.unwrap();
        client.inject_pending(vec![serde_json::json!({"id": "raw"})]).await.unwrap();
        assert!(client.requests().await.unwrap().is_empty(), "operator calls are not logged");
        client.clear_requests().await.unwrap();
    }

    #[tokio::test]
    async fn refusals_carry_the_status_and_the_servers_words() {
        let (client, _stop) = plane().await;
        let wrong_key = OperatorClient::new(client.url(), "not the key").unwrap();
        match wrong_key.list().await {
            Err(ClientError::Refused { status, detail, .. }) => {
                assert_eq!(status, http::StatusCode::UNAUTHORIZED);
                assert_eq!(detail, "Invalid API key");
            }
            other => panic!("expected a refusal, got {:?}", other.map(|list| list.len())),
        }
        let bad_fault = FaultSpec { status: 99, ..FaultSpec::default() };
        assert!(matches!(
            client.add_fault(&bad_fault).await,
            Err(ClientError::Refused { status, .. }) if status == http::StatusCode::BAD_REQUEST
        ));
    }

    #[tokio::test]
    async fn only_loopback_addresses_and_a_real_key_are_served() {
        let outside = SocketAddr::from(([0, 0, 0, 0], 0));
        assert!(matches!(LocalPlane::bind(outside, KEY.into(), None).await, Err(PlaneError::NotLoopback(_))));
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        assert!(matches!(
            LocalPlane::bind(loopback, String::new(), None).await,
            Err(PlaneError::EmptyApiKey)
        ));
    }

    #[test]
    fn the_default_fault_is_the_empty_json_spec() {
        let empty: FaultSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(FaultSpec::default(), empty);
    }
}
