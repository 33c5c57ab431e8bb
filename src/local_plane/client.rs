//! The typed client of the operator API: plain HTTP to
//! a loopback address only (dccontrol is a local tool and the key would
//! otherwise travel in clear), a 10 s limit per call, and errors that say
//! what went wrong in words rather than in hyper's types.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::route::OperatorRoute;
use super::wire::{
    CancelAnswer, CancelRequest, Created, ExecutionDetail, ExecutionList, ExecutionSummary, FaultSpec,
    InjectPending, LoggedRequest, NewExecution, RequestLog, RunnerStateRequest, StateView,
};
use crate::protocol::api::{ExecutionId, RunnerState};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of a request that has none.
const NO_BODY: Option<&()> = None;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url:?} is not a usable control plane URL: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("cannot reach the control plane at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the control plane at {url} did not answer {method} {path} within {} s", CALL_TIMEOUT.as_secs())]
    Timeout { url: String, method: Method, path: String },
    #[error("the control plane refused {method} {path}: {status}: {detail}")]
    Refused { method: Method, path: String, status: StatusCode, detail: String },
    #[error("unexpected answer to {method} {path}: {reason}")]
    BadAnswer { method: Method, path: String, reason: String },
}

/// A typed client of one local control plane's operator API, with its key:
/// what the `dccontrol` subcommands and the integration tests use.
#[derive(Clone)]
pub struct OperatorClient {
    /// `http://host:port`, no trailing slash.
    base: String,
    authorization: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl OperatorClient {
    pub fn new(url: &str, api_key: &str) -> Result<Self, ClientError> {
        Ok(Self {
            base: base_url(url)?,
            authorization: format!("Bearer {api_key}"),
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// The control plane's origin, `http://host:port`.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Queues a command; its id.
    pub async fn queue(&self, request: &NewExecution) -> Result<ExecutionId, ClientError> {
        let created: Created = self.request(OperatorRoute::Queue, Some(request)).await?;
        Ok(created.id)
    }

    /// Every execution, oldest first.
    pub async fn list(&self) -> Result<Vec<ExecutionSummary>, ClientError> {
        let list: ExecutionList = self.request(OperatorRoute::List, NO_BODY).await?;
        Ok(list.executions)
    }

    /// One execution with its output.
    pub async fn detail(&self, id: &ExecutionId) -> Result<ExecutionDetail, ClientError> {
        self.request(OperatorRoute::Detail(id.as_str()), NO_BODY).await
    }

    /// The entry `/pending/` hands out for the execution (signed, when the
    /// plane signs), as raw JSON: tests tamper with it.
    pub async fn signed_entry(&self, id: &ExecutionId) -> Result<serde_json::Value, ClientError> {
        self.request(OperatorRoute::SignedEntry(id.as_str()), NO_BODY).await
    }

    pub async fn cancel(&self, id: &ExecutionId, force: bool) -> Result<CancelAnswer, ClientError> {
        self.request(OperatorRoute::Cancel(id.as_str()), Some(&CancelRequest { force })).await
    }

    /// What the next heartbeats answer.
    pub async fn set_runner_state(
        &self,
        state: RunnerState,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        let request = RunnerStateRequest { state, reason: reason.map(str::to_string) };
        self.request::<serde_json::Value>(OperatorRoute::SetRunnerState, Some(&request)).await.map(drop)
    }

    /// What the runner last reported.
    pub async fn state(&self) -> Result<StateView, ClientError> {
        self.request(OperatorRoute::State, NO_BODY).await
    }

    /// The runner-API requests, in arrival order.
    pub async fn requests(&self) -> Result<Vec<LoggedRequest>, ClientError> {
        let log: RequestLog = self.request(OperatorRoute::Requests, NO_BODY).await?;
        Ok(log.requests)
    }

    pub async fn clear_requests(&self) -> Result<(), ClientError> {
        self.request::<serde_json::Value>(OperatorRoute::ClearRequests, NO_BODY).await.map(drop)
    }

    pub async fn add_fault(&self, fault: &FaultSpec) -> Result<(), ClientError> {
        self.request::<serde_json::Value>(OperatorRoute::AddFault, Some(fault)).await.map(drop)
    }

    pub async fn clear_faults(&self) -> Result<(), ClientError> {
        self.request::<serde_json::Value>(OperatorRoute::ClearFaults, NO_BODY).await.map(drop)
    }

    /// Raw entries the next `/pending/` answer carries once.
    pub async fn inject_pending(&self, executions: Vec<serde_json::Value>) -> Result<(), ClientError> {
        let request = InjectPending { executions };
        self.request::<serde_json::Value>(OperatorRoute::InjectPending, Some(&request)).await.map(drop)
    }

    /// One call, its answer read as `T` (`serde_json::Value` for the raw JSON).
    pub async fn request<T: DeserializeOwned>(
        &self,
        route: OperatorRoute<'_>,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let method = route.method();
        let path = route.path();
        let body = body.map(|body| serde_json::to_vec(body).expect("requests are plain JSON data"));
        let (status, answer) = tokio::time::timeout(CALL_TIMEOUT, self.exchange(&method, &path, body))
            .await
            .map_err(|_| ClientError::Timeout {
                url: self.base.clone(),
                method: method.clone(),
                path: path.clone(),
            })??;
        if !status.is_success() {
            return Err(ClientError::Refused { method, path, status, detail: error_detail(&answer) });
        }
        serde_json::from_slice(&answer).map_err(|e| ClientError::BadAnswer {
            method,
            path,
            reason: e.to_string(),
        })
    }

    /// One request and its whole answer.
    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(AUTHORIZATION, &self.authorization)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::BadAnswer {
                method: method.clone(),
                path: path.to_string(),
                reason: format!("cannot build the request: {e}"),
            })?;
        let unreachable = |error: &(dyn std::error::Error + 'static)| ClientError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(error),
        };
        let response = self.http.request(request).await.map_err(|e| unreachable(&e))?;
        let status = response.status();
        let answer = response.into_body().collect().await.map_err(|e| unreachable(&e))?.to_bytes();
        Ok((status, answer))
    }
}

/// Checks the URL is plain HTTP to a loopback host, and keeps its origin.
fn base_url(url: &str) -> Result<String, ClientError> {
    let bad = |reason| ClientError::BadUrl { url: url.to_string(), reason };
    let uri: Uri = url.parse().map_err(|_| bad("expected http://127.0.0.1:PORT"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("dccontrol speaks plain http:// to a local control plane only"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(bad("the host must be a loopback address (127.0.0.1, ::1, localhost)"));
    }
    if !matches!(uri.path(), "" | "/") {
        return Err(bad("give the server's origin only, without a path"));
    }
    Ok(format!("http://{authority}"))
}

/// The most useful words in an error chain: the I/O error at its root if any
/// ("connection refused"), else the innermost message.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    loop {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                _ => io.to_string(),
            };
        }
        match current.source() {
            Some(next) => current = next,
            None => return current.to_string(),
        }
    }
}

/// The text of an error answer: its `detail` or `error` field, else the body.
fn error_detail(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = parsed
        .as_ref()
        .and_then(|value| ["detail", "error"].iter().find_map(|key| value.get(key).and_then(|v| v.as_str())));
    match field {
        Some(text) => text.to_string(),
        None => String::from_utf8_lossy(body).trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_to_loopback_is_accepted() {
        assert_eq!(base_url("http://127.0.0.1:8765").unwrap(), "http://127.0.0.1:8765");
        assert_eq!(base_url("http://[::1]:8765/").unwrap(), "http://[::1]:8765");
        assert_eq!(base_url("http://localhost:1").unwrap(), "http://localhost:1");
        for bad in [
            "https://127.0.0.1:8765",
            "http://example.com",
            "http://10.0.0.1:80",
            "http://127.0.0.1:1/api",
            "nonsense",
        ] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_text_prefers_the_detail_field() {
        assert_eq!(error_detail(br#"{"detail": "Invalid API key"}"#), "Invalid API key");
        assert_eq!(error_detail(br#"{"error": "quota"}"#), "quota");
        assert_eq!(error_detail(b"Bad Gateway\n"), "Bad Gateway");
    }
}
