//! What each endpoint does, once the request is known to be authentic:
//! the runner API exactly as the published protocol (docs/protocol.md) describes it, and the operator API.
//! Pure functions of (store, method, path, body) → answer; HTTP plumbing,
//! authentication and faults live in `server`.

use crate::protocol::api::{
    CompleteRequest, ExecutionId, HeartbeatRequest, OutputRequest, RunnerState, SyncRequest,
};
use crate::protocol::route::{ExecutionAction, Route};
use http::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::reply::Reply;
use super::route::OperatorRoute;
use super::store::Store;
use super::wire::{
    CancelAnswer, CancelRequest, Created, Endpoint, ExecutionList, FaultSpec, InjectPending, NewExecution,
    RequestLog, RunnerStateRequest,
};

/// Either outcome is an answer; `Err` lets `?` end an endpoint early.
type Answer = Result<Reply, Reply>;

/// The fault-matching name of a runner-API endpoint.
fn endpoint_of(route: Route<'_>) -> Endpoint {
    match route {
        Route::Heartbeat => Endpoint::Heartbeat,
        Route::Sync => Endpoint::Sync,
        Route::Pending => Endpoint::Pending,
        Route::Execution(_, ExecutionAction::Start) => Endpoint::Start,
        Route::Execution(_, ExecutionAction::Output) => Endpoint::Output,
        Route::Execution(_, ExecutionAction::Complete) => Endpoint::Complete,
        Route::Execution(_, ExecutionAction::CancelStatus) => Endpoint::CancelStatus,
    }
}

/// Which endpoint of the runner API `path` is, if any (for matching faults).
pub fn endpoint(path: &str) -> Option<Endpoint> {
    Route::parse(path).map(endpoint_of)
}

/// A runner-API request that passed authentication and replay checks.
pub fn runner(store: &mut Store, method: &Method, path: &str, body: &[u8], now: f64) -> Reply {
    let Some(route) = Route::parse(path) else {
        return Reply::not_found(method, path);
    };
    if *method != route.method() {
        return method_not_allowed(method);
    }
    let answer = match route {
        Route::Heartbeat => parse_body(body)
            .map(|report: HeartbeatRequest| Reply::json(StatusCode::OK, &store.heartbeat(report, now))),
        Route::Sync => {
            parse_body(body).map(|sync: SyncRequest| Reply::json(StatusCode::OK, &store.sync(sync.commands)))
        }
        Route::Pending => Ok(Reply::json(StatusCode::OK, &store.pending())),
        Route::Execution(id, action) => execution(store, id, action, body, now),
    };
    answer.unwrap_or_else(|refusal| refusal)
}

fn execution(store: &mut Store, id: &str, action: ExecutionAction, body: &[u8], now: f64) -> Answer {
    let id = parse_id(id)?;
    match action {
        // The protocol's start has no body; whatever came is ignored.
        ExecutionAction::Start => store.start(&id, now)?,
        ExecutionAction::Output => store.output(&id, parse_body::<OutputRequest>(body)?)?,
        ExecutionAction::Complete => store.complete(&id, parse_body::<CompleteRequest>(body)?, now)?,
        ExecutionAction::CancelStatus => {
            return Ok(Reply::json(StatusCode::OK, &store.cancel_status(&id)?));
        }
    }
    Ok(Reply::ok())
}

/// An operator-API request with a valid key.
pub fn operator(store: &mut Store, method: &Method, path: &str, body: &[u8], now: f64) -> Reply {
    let Some(route) = OperatorRoute::parse(method, path) else {
        return Reply::not_found(method, path);
    };
    let answer = match route {
        OperatorRoute::Queue => parse_body(body).and_then(|request: NewExecution| queue(store, request, now)),
        OperatorRoute::List => Ok(Reply::json(StatusCode::OK, &ExecutionList { executions: store.list() })),
        OperatorRoute::Detail(id) => parse_id(id)
            .and_then(|id| Ok(store.detail(&id)?))
            .map(|detail| Reply::json(StatusCode::OK, &detail)),
        OperatorRoute::SignedEntry(id) => parse_id(id)
            .and_then(|id| Ok(store.pending_entry(&id)?))
            .map(|entry| Reply::json(StatusCode::OK, &entry)),
        OperatorRoute::Cancel(id) => cancel(store, id, body),
        OperatorRoute::SetRunnerState => set_runner_state(store, body),
        OperatorRoute::State => Ok(Reply::json(StatusCode::OK, &store.state())),
        OperatorRoute::Requests => {
            Ok(Reply::json(StatusCode::OK, &RequestLog { requests: store.requests() }))
        }
        OperatorRoute::ClearRequests => {
            store.clear_requests();
            Ok(Reply::ok())
        }
        OperatorRoute::AddFault => add_fault(store, body, now),
        OperatorRoute::ClearFaults => {
            store.clear_faults();
            Ok(Reply::ok())
        }
        OperatorRoute::InjectPending => parse_body(body).map(|inject: InjectPending| {
            store.inject_pending(inject.executions);
            Reply::ok()
        }),
    };
    answer.unwrap_or_else(|refusal| refusal)
}

fn queue(store: &mut Store, request: NewExecution, now: f64) -> Answer {
    if request.command.trim().is_empty() {
        return Err(Reply::error(StatusCode::BAD_REQUEST, "command must not be empty"));
    }
    let id = store.queue(request, now)?;
    Ok(Reply::json(StatusCode::CREATED, &Created { id }))
}

fn cancel(store: &mut Store, id: &str, body: &[u8]) -> Answer {
    let id = parse_id(id)?;
    // An empty body is a plain (not forced) cancel.
    let request: CancelRequest = if body.is_empty() { CancelRequest::default() } else { parse_body(body)? };
    let status = store.cancel(&id, request.force)?;
    Ok(Reply::json(
        StatusCode::OK,
        &CancelAnswer { ok: true, cancel_requested: status.cancel_requested, force_kill: status.force_kill },
    ))
}

fn set_runner_state(store: &mut Store, body: &[u8]) -> Answer {
    let request: RunnerStateRequest = parse_body(body)?;
    // The library type reads unknown states leniently (it is made for reading
    // servers' answers); an operator asking for one is a mistake.
    if request.state == RunnerState::Unknown {
        return Err(Reply::error(StatusCode::BAD_REQUEST, "state must be \"active\" or \"suspended\""));
    }
    store.set_runner_state(request.state, request.reason);
    Ok(Reply::ok())
}

fn add_fault(store: &mut Store, body: &[u8], now: f64) -> Answer {
    let spec: FaultSpec = parse_body(body)?;
    if let Some(problem) = spec.problem() {
        return Err(Reply::error(StatusCode::BAD_REQUEST, problem));
    }
    store.add_fault(spec, now);
    Ok(Reply::json(StatusCode::CREATED, &json!({"ok": true})))
}

fn parse_id(text: &str) -> Result<ExecutionId, Reply> {
    ExecutionId::parse(text).map_err(|e| Reply::error(StatusCode::BAD_REQUEST, e))
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body)
        .map_err(|e| Reply::error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")))
}

fn method_not_allowed(method: &Method) -> Reply {
    Reply::error(StatusCode::METHOD_NOT_ALLOWED, format!("Method \"{method}\" not allowed."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_uuid_id_is_a_bad_request_that_changes_nothing() {
        let mut store = Store::default();
        let reply = runner(&mut store, &Method::POST, "/api/runner/executions/not-a-uuid/start/", b"", 0.0);
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(store.list().is_empty());
    }

    #[test]
    fn the_wrong_method_is_refused() {
        let mut store = Store::default();
        let reply = runner(&mut store, &Method::GET, "/api/runner/heartbeat/", b"", 0.0);
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    }
}
