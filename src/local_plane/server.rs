//! The local control plane's HTTP side. Accepts connections on a loopback
//! address, reads each request's body (capped), and runs it through what a
//! strict hosted control plane does before its views: the bearer key, the
//! replay checks (timestamp window, one-time nonce), then the test hooks
//! (request log, injected faults: see `wire::FaultSpec`), and finally
//! `routes`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, LengthLimitError, Limited, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::protocol::route::RUNNER_PREFIX;
use crate::sync::LockExt as _;

use super::reply::Reply;
use super::route::OPERATOR_PREFIX;
use super::routes;
use super::store::{unix_now, Store};
use super::wire::{FaultSpec, LoggedRequest};

/// Larger request bodies are refused with 413: the runner's biggest is an
/// output chunk of 1.5 s of output, far below this.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// How far `X-Request-Timestamp` may be from our clock, either way.
const TIMESTAMP_WINDOW_SECS: u64 = 300;

const TIMESTAMP_HEADER: &str = "x-request-timestamp";
const NONCE_HEADER: &str = "x-request-nonce";

/// What every connection shares.
struct App {
    api_key: String,
    store: Mutex<Store>,
}

impl App {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves plain data behind, still
        // usable: better to keep serving than to fail every later request.
        self.store.locked()
    }

    fn is_authorized(&self, headers: &HeaderMap) -> bool {
        let expected = format!("Bearer {}", self.api_key);
        headers.get(AUTHORIZATION).is_some_and(|value| value.as_bytes() == expected.as_bytes())
    }
}

/// Why the local control plane cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("the API key must not be empty")]
    EmptyApiKey,
    #[error(
        "{0} is not a loopback address: the local control plane is a test tool \
         and listens on 127.0.0.1 or ::1 only"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
}

/// A control plane bound to its address, not serving yet: the caller learns
/// the real port (when it asked for port 0) before any runner connects.
pub struct LocalPlane {
    listener: TcpListener,
    address: SocketAddr,
    app: Arc<App>,
}

impl LocalPlane {
    /// Binds `listen`, a loopback address (the operator API can queue
    /// commands: it must not be reachable from elsewhere). With `signing_key`, every execution `/pending/` hands
    /// out is signed.
    pub async fn bind(
        listen: SocketAddr,
        api_key: String,
        signing_key: Option<ed25519_dalek::SigningKey>,
    ) -> Result<Self, PlaneError> {
        if api_key.is_empty() {
            return Err(PlaneError::EmptyApiKey);
        }
        if !listen.ip().is_loopback() {
            return Err(PlaneError::NotLoopback(listen));
        }
        let bind_error = |source| PlaneError::Bind { address: listen, source };
        let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        let app = Arc::new(App { api_key, store: Mutex::new(Store::new(signing_key)) });
        Ok(Self { listener, address, app })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Answers requests until `shutdown` completes. State lives in memory
    /// only and is gone with it.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let local = self.address;
        tracing::info!(
            "runner API on http://{local}{RUNNER_PREFIX}, operator API on http://{local}{OPERATOR_PREFIX}"
        );
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => spawn_connection(Arc::clone(&self.app), stream),
                    Err(error) => {
                        // Typically out of file descriptors: wait instead of spinning.
                        tracing::warn!("accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        tracing::info!("stopping (state is not kept)");
    }
}

fn spawn_connection(app: Arc<App>, stream: TcpStream) {
    tokio::spawn(async move {
        let service = service_fn(move |request| handle(Arc::clone(&app), request));
        let served = http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
        if let Err(error) = served {
            tracing::debug!("connection ended: {error}");
        }
    });
}

/// The response body: whole, or cut short by a fault.
type Body = BoxBody<Bytes, std::io::Error>;

/// Returned instead of a response to make hyper drop the connection
/// without answering (an injected `reset`).
#[derive(Debug, thiserror::Error)]
#[error("injected connection reset")]
struct InjectedReset;

/// How the answer goes out.
enum Delivery {
    Whole(Reply),
    /// Headers announcing the whole body, half of it, then the connection closes.
    Cut(Reply),
    Reset,
}

async fn handle(app: Arc<App>, request: Request<Incoming>) -> Result<Response<Body>, InjectedReset> {
    let (parts, body) = request.into_parts();
    let body = read_body(&parts.headers, body).await;
    let delivery = if parts.uri.path().starts_with(OPERATOR_PREFIX) {
        Delivery::Whole(operator_request(&app, &parts, body))
    } else {
        runner_request(&app, &parts, body).await
    };
    match delivery {
        Delivery::Whole(reply) => {
            tracing::debug!("{} {} → {}", parts.method, parts.uri, reply.status.as_u16());
            Ok(reply.into_response().map(|full| full.map_err(|never| match never {}).boxed()))
        }
        Delivery::Cut(reply) => {
            tracing::debug!("{} {} → {} (body cut)", parts.method, parts.uri, reply.status.as_u16());
            Ok(cut_response(reply))
        }
        Delivery::Reset => {
            tracing::debug!("{} {} → connection reset", parts.method, parts.uri);
            Err(InjectedReset)
        }
    }
}

fn cut_response(reply: Reply) -> Response<Body> {
    let half = reply.body.slice(..reply.body.len() / 2);
    // The pause lets hyper flush the head and the half before the error
    // makes it drop the connection (it discards unflushed bytes).
    let cut = futures_util::stream::once(async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "injected cut body"))
    });
    let frames = futures_util::stream::iter([Ok(Frame::data(half))]).chain(cut);
    let body = BodyExt::boxed(StreamBody::new(frames));
    reply.head().body(body).expect("status and headers are valid")
}

async fn read_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, Reply> {
    let too_large = || {
        Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    // Refuse an announced oversize body before reading any of it.
    let announced =
        headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(too_large()),
        Err(error) => {
            Err(Reply::error(StatusCode::BAD_REQUEST, format!("cannot read the request body: {error}")))
        }
    }
}

fn operator_request(app: &App, parts: &Parts, body: Result<Bytes, Reply>) -> Reply {
    if !app.is_authorized(&parts.headers) {
        return invalid_key();
    }
    match body {
        Ok(body) => routes::operator(&mut app.store(), &parts.method, parts.uri.path(), &body, unix_now()),
        Err(refusal) => refusal,
    }
}

/// Everything outside the operator API is logged, answered, and the answer's
/// status added to the log entry before it is sent.
/// The log records what the runner got: the status sent, or 0 for a reset.
async fn runner_request(app: &App, parts: &Parts, body: Result<Bytes, Reply>) -> Delivery {
    let authorized = app.is_authorized(&parts.headers);
    let entry = log_entry(parts, body.as_ref().ok(), authorized);
    let seq = app.store().log_arrival(entry);
    let delivery = match body {
        Ok(body) => process_runner_request(app, parts, &body, authorized).await,
        Err(refusal) => Delivery::Whole(refusal),
    };
    let status = match &delivery {
        Delivery::Whole(reply) | Delivery::Cut(reply) => reply.status.as_u16(),
        Delivery::Reset => 0,
    };
    app.store().log_answer(seq, status);
    delivery
}

async fn process_runner_request(app: &App, parts: &Parts, body: &[u8], authorized: bool) -> Delivery {
    let path = parts.uri.path();
    if !path.starts_with(RUNNER_PREFIX) {
        return Delivery::Whole(Reply::not_found(&parts.method, path));
    }
    if !authorized {
        return Delivery::Whole(invalid_key());
    }
    let now = unix_now();
    if let Err(refusal) = check_replay(app, &parts.headers, now) {
        return Delivery::Whole(refusal);
    }
    // Taken in its own statement so the store's lock is released before the
    // delay: an `if let` would hold the guard through its body.
    let fault = app.store().take_fault(path, routes::endpoint(path), now);
    let process = || routes::runner(&mut app.store(), &parts.method, path, body, unix_now());
    match fault {
        None => Delivery::Whole(process()),
        Some(fault) => misbehave(fault, path, process).await,
    }
}

/// Applies a fault (see `wire::FaultSpec` for the order of its steps).
/// Unless `after_processing`, it stands in for the view: a fault that
/// answers or resets does so before any state changes.
async fn misbehave(fault: FaultSpec, path: &str, process: impl FnOnce() -> Reply) -> Delivery {
    let mut process = Some(process);
    let processed = if fault.after_processing { process.take().map(|process| process()) } else { None };
    if let Some(delay) = fault.delay_ms {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if fault.reset {
        return Delivery::Reset;
    }
    let reply = match (processed, process, fault.status) {
        (Some(reply), _, 0) => reply,
        (None, Some(process), 0) => process(),
        _ => fault_reply(&fault, path),
    };
    if fault.cut_body {
        Delivery::Cut(reply)
    } else {
        Delivery::Whole(reply)
    }
}

fn invalid_key() -> Reply {
    Reply::error(StatusCode::UNAUTHORIZED, "Invalid API key")
}

/// The replay protection of a strict server: a recent timestamp and a nonce
/// never seen before. The nonce is recorded once the timestamp is good, even
/// if a fault then answers: a retry must come with a fresh one.
fn check_replay(app: &App, headers: &HeaderMap, now: f64) -> Result<(), Reply> {
    let refuse = |detail: &str| Err(Reply::error(StatusCode::UNAUTHORIZED, detail));
    let Some(timestamp) = header_text(headers, TIMESTAMP_HEADER).and_then(|t| t.parse::<i64>().ok()) else {
        return refuse("Missing or invalid X-Request-Timestamp header (unix seconds, an integer)");
    };
    if (now as i64).saturating_sub(timestamp).unsigned_abs() > TIMESTAMP_WINDOW_SECS {
        return refuse("Request timestamp outside the allowed window of 300 s (stale or clock skew)");
    }
    let Some(nonce) = header_text(headers, NONCE_HEADER).filter(|n| is_hyphenated_uuid(n)) else {
        return refuse("Missing or invalid X-Request-Nonce header (a UUID)");
    };
    if !app.store().accept_nonce(nonce) {
        return refuse("Nonce already used (replayed request)");
    }
    Ok(())
}

fn is_hyphenated_uuid(text: &str) -> bool {
    // `Uuid::try_parse` also takes the simple, braced and URN forms.
    text.len() == 36 && uuid::Uuid::try_parse(text).is_ok()
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn fault_reply(fault: &FaultSpec, path: &str) -> Reply {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut reply = match &fault.body {
        Some(raw) => Reply::raw(status, raw.clone()),
        None if fault.html => Reply::html_error_page(status),
        None => Reply::error(status, "injected fault"),
    };
    reply.retry_after = fault.retry_after;
    reply.location =
        fault.location.clone().or_else(|| status.is_redirection().then(|| format!("/moved{path}")));
    reply
}

/// The request as the log shows it; the key itself is never kept.
fn log_entry(parts: &Parts, body: Option<&Bytes>, authorized: bool) -> LoggedRequest {
    let mut headers = std::collections::BTreeMap::new();
    for (name, value) in &parts.headers {
        let text = if *name == AUTHORIZATION {
            (if authorized { "Bearer <redacted>" } else { "<invalid>" }).to_string()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        // A repeated header is shown the way HTTP allows folding it.
        headers
            .entry(name.as_str().to_string())
            .and_modify(|existing: &mut String| {
                existing.push_str(", ");
                existing.push_str(&text);
            })
            .or_insert(text);
    }
    let (body, raw_body) = match body.filter(|b| !b.is_empty()) {
        None => (serde_json::Value::Null, None),
        Some(bytes) => match serde_json::from_slice(bytes) {
            Ok(value) => (value, None),
            Err(_) => (serde_json::Value::Null, Some(String::from_utf8_lossy(bytes).into_owned())),
        },
    };
    LoggedRequest {
        seq: 0,
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |pq| pq.to_string()),
        headers,
        body,
        raw_body,
        status: None,
        time: unix_now(),
    }
}
