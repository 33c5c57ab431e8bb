//! The operator subcommands' HTTP client for the operator API: plain HTTP to
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

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A client of one control plane, with its key.
pub struct ControlClient {
    /// `http://host:port`, no trailing slash.
    base: String,
    authorization: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl ControlClient {
    pub fn new(url: &str, api_key: &str) -> Result<Self, ClientError> {
        Ok(Self {
            base: base_url(url)?,
            authorization: format!("Bearer {api_key}"),
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("requests are plain JSON data");
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, answer) = tokio::time::timeout(CALL_TIMEOUT, self.exchange(&method, path, body))
            .await
            .map_err(|_| ClientError::Timeout {
                url: self.base.clone(),
                method: method.clone(),
                path: path.to_string(),
            })??;
        if !status.is_success() {
            return Err(ClientError::Refused {
                method,
                path: path.to_string(),
                status,
                detail: error_detail(&answer),
            });
        }
        serde_json::from_slice(&answer).map_err(|e| ClientError::BadAnswer {
            method,
            path: path.to_string(),
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
