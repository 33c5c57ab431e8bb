//! The HTTP client for the control plane's runner API: TLS (rustls with the
//! ring provider named explicitly, system roots plus an optional extra CA),
//! the authentication and replay-protection headers, timeouts, a cap on
//! response size, and the classification of every answer.
//!
//! Each call is ONE attempt: the caller decides whether and when to try again
//! (with [`crate::backoff::Backoff`]), from what [`ApiError`] says about the
//! failure. Every attempt is built afresh, so a retry carries a new
//! timestamp and a new nonce (a strict replay check refuses a reused one).
//! Redirects are never followed. The API key lives
//! in [`ApiKey`], whose `Debug` and `Display` never show it, and it is never
//! part of an error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT,
};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::proxy::{Egress, EgressConnector, ProxyError};
use crate::protocol::api::{self, CancelStatus, ExecutionId};
use crate::protocol::route::{ExecutionAction, Route};

/// Answers above this size are refused rather than buffered.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Idle connections are closed before a typical load balancer (60 s) would.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The project's API key. Never printed.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> Self {
        Self(key)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Base URL without a trailing slash, already checked against the HTTPS rule.
    pub base_url: String,
    pub api_key: ApiKey,
    pub request_timeout: Duration,
    /// PEM file of extra trusted CAs (self-hosted control planes).
    pub ca_file: Option<PathBuf>,
    pub user_agent: String,
}

/// Why a call did not succeed; [`ApiError::is_retryable`] is the one place
/// that decides what is worth another attempt.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication failed (HTTP {status}): {detail}")]
    Auth { status: u16, detail: String },
    /// Any other answer that is not a 2xx; a 3xx is a redirect, never followed.
    #[error("the control plane answered HTTP {status}: {detail}")]
    Status { status: u16, detail: String, retry_after: Option<Duration> },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the control plane: {0}")]
    Connect(String),
    /// The control plane's certificate was refused (an issuer nobody here
    /// trusts, another name, expired...): the handshake stopped, nothing
    /// was sent. Retried: a certificate can be fixed on the other side.
    #[error("the control plane's TLS certificate was refused, nothing was sent: {0}")]
    Certificate(String),
    /// TLS failed for another reason (no common protocol version or
    /// cipher, an alert from the server, e.g. one that wants a client
    /// certificate, which TLS 1.3 may send after the first request).
    #[error("TLS with the control plane failed: {0}")]
    Tls(String),
    /// The answer's body was cut short (or was too large to read).
    #[error("the answer could not be read: {0}")]
    BodyRead(String),
    /// A 2xx whose body does not parse, on a call that needs its body (a
    /// proxy's HTML page, a truncated document): retried like a 5xx.
    #[error("unusable answer from the control plane: {0}")]
    BadResponse(String),
    /// The request could not even be built (never retried).
    #[error("invalid request: {0}")]
    Request(String),
}

impl ApiError {
    /// Whether another attempt may succeed: every 5xx, 408, 425, 429 and 3xx
    /// answer (a redirect is never followed, and never a reason to drop),
    /// timeouts, connection and body-read errors, unusable 2xx bodies.
    /// What remains is definitive: 401/403 (authentication, handled by
    /// pausing everything), other 4xx, and requests we could not build.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => is_retryable_status(*status),
            ApiError::Timeout(_)
            | ApiError::Connect(_)
            | ApiError::Certificate(_)
            | ApiError::Tls(_)
            | ApiError::BodyRead(_)
            | ApiError::BadResponse(_) => true,
            ApiError::Auth { .. } | ApiError::Request(_) => false,
        }
    }

    /// A definitive refusal of this request: not retried, not an auth problem.
    pub fn is_refusal(&self) -> bool {
        !self.is_retryable() && !self.is_auth()
    }

    pub fn is_auth(&self) -> bool {
        matches!(self, ApiError::Auth { .. })
    }

    /// How long the server asked us to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn is_retryable_status(status: u16) -> bool {
    matches!(status, 300..=399 | 408 | 425 | 429 | 500..=599)
}

#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    /// `server.ca_file` is not usable; the path is the caller's to say.
    #[error(transparent)]
    CaFile(#[from] CaFileError),
    #[error("TLS set-up failed: {0}")]
    Tls(String),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("server.url is not a URL: {0}")]
    Url(String),
}

/// Why `server.ca_file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    /// A directory, a FIFO, a device (`/dev/zero` would never end).
    #[error("not a regular file")]
    NotAFile,
    #[error("larger than {} MiB: not a CA file", MAX_CA_FILE_BYTES / (1024 * 1024))]
    TooLarge,
    #[error("no PEM certificate in it (a PEM file has -----BEGIN CERTIFICATE----- lines)")]
    NoCertificate,
    #[error("not a valid PEM file: {0}")]
    Pem(#[source] rustls_pki_types::pem::Error),
    #[error("certificate {number} in it is not usable: {error}")]
    Certificate {
        number: usize,
        #[source]
        error: rustls::Error,
    },
}

/// The largest `server.ca_file` read (a full system bundle is under 1 MiB).
pub const MAX_CA_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct Client {
    http: HyperClient<HttpsConnector<EgressConnector>, Full<Bytes>>,
    opts: Arc<ClientOptions>,
    /// Through which proxy, if any, the control plane is reached.
    egress: Option<Arc<str>>,
}

impl Client {
    pub fn new(opts: ClientOptions) -> Result<Self, ClientSetupError> {
        let tls = tls_config(opts.ca_file.as_ref())?;
        let mut tcp = HttpConnector::new();
        // The HTTPS rule is enforced on the configured URL, not here.
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(opts.request_timeout));
        tcp.set_nodelay(true);
        let base_url: Uri = opts.base_url.parse().map_err(|e| ClientSetupError::Url(format!("{e}")))?;
        let egress = Egress::from_env(&base_url, tcp.clone())?;
        let described = egress.describe().map(Arc::from);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(EgressConnector::new(tcp, egress));
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Ok(Self { http, opts: Arc::new(opts), egress: described })
    }

    /// "through the proxy http://host:port (HTTPS_PROXY)", or None when the
    /// control plane is reached directly.
    pub fn egress(&self) -> Option<&str> {
        self.egress.as_deref()
    }

    pub async fn heartbeat(&self, body: &api::HeartbeatRequest) -> Result<api::HeartbeatResponse, ApiError> {
        let (method, path) = endpoint(Route::Heartbeat);
        self.call(method, &path, Some(body)).await
    }

    pub async fn sync_commands(&self, body: &api::SyncRequest) -> Result<api::SyncResponse, ApiError> {
        let (method, path) = endpoint(Route::Sync);
        self.call(method, &path, Some(body)).await
    }

    pub async fn pending(&self) -> Result<api::PendingResponse, ApiError> {
        let (method, path) = endpoint(Route::Pending);
        self.call::<(), _>(method, &path, None).await
    }

    /// Any 2xx counts: what `start`, `output` and `complete` answer is not
    /// needed, so a body a proxy mangled does not undo a delivery.
    pub async fn start(&self, id: &ExecutionId) -> Result<(), ApiError> {
        let (method, path) = endpoint(Route::Execution(&id.to_string(), ExecutionAction::Start));
        self.send::<()>(method, &path, None).await.map(drop)
    }

    pub async fn output(&self, id: &ExecutionId, body: &api::OutputRequest) -> Result<(), ApiError> {
        let (method, path) = endpoint(Route::Execution(&id.to_string(), ExecutionAction::Output));
        self.send(method, &path, Some(body)).await.map(drop)
    }

    pub async fn complete(&self, id: &ExecutionId, body: &api::CompleteRequest) -> Result<(), ApiError> {
        let (method, path) = endpoint(Route::Execution(&id.to_string(), ExecutionAction::Complete));
        self.send(method, &path, Some(body)).await.map(drop)
    }

    pub async fn cancel_status(&self, id: &ExecutionId) -> Result<CancelStatus, ApiError> {
        let (method, path) = endpoint(Route::Execution(&id.to_string(), ExecutionAction::CancelStatus));
        self.call::<(), _>(method, &path, None).await
    }

    /// One attempt whose 2xx answer must parse as `T`.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let answer = self.send(method, path, body).await?;
        serde_json::from_slice(&answer).map_err(|e| ApiError::BadResponse(format!("{path}: {e}")))
    }

    /// One attempt; the 2xx answer's body as it came.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Bytes, ApiError> {
        let body = match body {
            Some(body) => {
                Some(Bytes::from(serde_json::to_vec(body).map_err(|e| ApiError::Request(e.to_string()))?))
            }
            None => None,
        };
        self.attempt(&method, path, body).await
    }

    /// One HTTP exchange; the timeout covers sending and reading the body.
    async fn attempt(&self, method: &Method, path: &str, body: Option<Bytes>) -> Result<Bytes, ApiError> {
        let request = self.build_request(method, path, body)?;
        let timeout = self.opts.request_timeout;
        let exchange = async {
            let response =
                self.http.request(request).await.map_err(|e| connect_error(&e, self.egress.as_deref()))?;
            let status = response.status();
            let retry_after = retry_after(response.headers().get(RETRY_AFTER));
            let location =
                response.headers().get(LOCATION).map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| ApiError::BodyRead(error_chain(e.as_ref())))?
                .to_bytes();
            Ok::<_, ApiError>((status, retry_after, location, bytes))
        };
        let (status, retry_after, location, bytes) =
            tokio::time::timeout(timeout, exchange).await.map_err(|_| ApiError::Timeout(timeout))??;
        if status.is_success() {
            return Ok(bytes);
        }
        let detail = match location {
            Some(location) if status.is_redirection() => format!("a redirect to {location:?}, not followed"),
            _ => error_detail(&bytes),
        };
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                ApiError::Auth { status: status.as_u16(), detail }
            }
            _ => ApiError::Status { status: status.as_u16(), detail, retry_after },
        })
    }

    fn build_request(
        &self,
        method: &Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        let uri: Uri = format!("{}{}", self.opts.base_url, path)
            .parse()
            .map_err(|e| ApiError::Request(format!("{e}")))?;
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {}", self.opts.api_key.0)).map_err(|_| {
                ApiError::Request("the API key contains characters not allowed in a header".into())
            })?;
        authorization.set_sensitive(true);
        let body = body.unwrap_or_default();
        let mut request = Request::builder();
        if method == Method::POST {
            // Said even when 0: hyper omits it for an empty body, and some
            // front ends answer a bodiless POST with 411 Length Required.
            request = request.header(CONTENT_LENGTH, body.len());
        }
        request
            .method(method.clone())
            .uri(uri)
            .header(AUTHORIZATION, authorization)
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, &self.opts.user_agent)
            .header("X-Request-Timestamp", timestamp.to_string())
            .header("X-Request-Nonce", uuid::Uuid::new_v4().to_string())
            .body(Full::new(body))
            .map_err(|e| ApiError::Request(e.to_string()))
    }
}

/// The method and path of one runner-API endpoint.
fn endpoint(route: Route<'_>) -> (Method, String) {
    (route.method(), route.path())
}

fn tls_config(ca_file: Option<&PathBuf>) -> Result<rustls::ClientConfig, ClientSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!("could not load a system CA certificate: {error}");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "system CA certificates loaded");
    if let Some(path) = ca_file {
        for cert in read_ca_file(path)? {
            roots.add(cert.der).map_err(|error| CaFileError::Certificate { number: cert.number, error })?;
        }
    }
    // Named explicitly: relying on a process-wide default provider panics
    // when none, or more than one, is compiled in.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One certificate of a CA file, numbered from 1 in the file's order.
struct CaCert {
    number: usize,
    der: rustls_pki_types::CertificateDer<'static>,
}

/// The certificates of a PEM file (other PEM sections, such as keys, are
/// skipped). Only a regular file is read, and at most
/// [`MAX_CA_FILE_BYTES`]: `/dev/zero` or a FIFO named by mistake must not
/// hang the start or a reload.
fn read_ca_file(path: &std::path::Path) -> Result<Vec<CaCert>, CaFileError> {
    use rustls_pki_types::pem::PemObject;
    use std::io::Read as _;
    let metadata = std::fs::metadata(path).map_err(CaFileError::Read)?;
    if !metadata.is_file() {
        return Err(CaFileError::NotAFile);
    }
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_CA_FILE_BYTES + 1).read_to_end(&mut text))
        .map_err(CaFileError::Read)?;
    if text.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(CaFileError::TooLarge);
    }
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&text)
        .enumerate()
        .map(|(index, cert)| cert.map(|der| CaCert { number: index + 1, der }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CaFileError::Pem)?;
    if certs.is_empty() {
        return Err(CaFileError::NoCertificate);
    }
    Ok(certs)
}

/// A failed exchange: a refused certificate or another TLS failure is said
/// as such (nothing was sent, and the fix is not on the network); anything
/// else is a connection problem.
fn connect_error(error: &hyper_util::client::legacy::Error, egress: Option<&str>) -> ApiError {
    match tls_error(error) {
        Some(rustls::Error::InvalidCertificate(problem)) => {
            ApiError::Certificate(certificate_problem(problem))
        }
        Some(other) => ApiError::Tls(other.to_string()),
        // Through a proxy, say so: its refusals ("tunnel error: proxy
        // authorization required") are its own, not the control plane's.
        None => match egress {
            Some(egress) => ApiError::Connect(format!("{egress}: {}", error_chain(error))),
            None => ApiError::Connect(error_chain(error)),
        },
    }
}

/// The rustls error behind a failed connection, if TLS is what failed. It
/// travels inside `io::Error`s (two: tokio-rustls's, wrapped by
/// hyper-rustls), whose `source()` skips what they wrap: look inside.
fn tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        current = match error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    None
}

/// What is wrong with the certificate, and for an unknown issuer the fix.
fn certificate_problem(problem: &rustls::CertificateError) -> String {
    match problem {
        rustls::CertificateError::UnknownIssuer => "it is signed by an unknown issuer (UnknownIssuer): \
            no CA of this host, nor server.ca_file's, vouches for it; if the control plane uses a \
            private CA, set server.ca_file to that CA's PEM certificate"
            .into(),
        other => rustls::Error::InvalidCertificate(other.clone()).to_string(),
    }
}

/// The longest error text kept from an answer, in characters: it goes into
/// log lines, once per retry, so a control plane must not flood them.
const MAX_DETAIL_CHARS: usize = 500;

/// The error text rule: the answer's `detail` or `error` field, else the
/// raw body; either cut at [`MAX_DETAIL_CHARS`].
fn error_detail(body: &[u8]) -> String {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<serde_json::Value>(body) {
        for key in ["detail", "error"] {
            match fields.get(key) {
                Some(serde_json::Value::String(text)) => return shortened(text),
                Some(other) if !other.is_null() => return shortened(&other.to_string()),
                _ => {}
            }
        }
    }
    shortened(String::from_utf8_lossy(body).trim())
}

fn shortened(text: &str) -> String {
    match text.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let seconds: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

/// An error with its causes, e.g. "client error (Connect): tcp connect error: Connection refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_follows_the_protocol_rule() {
        assert_eq!(error_detail(br#"{"detail": "Invalid API key"}"#), "Invalid API key");
        assert_eq!(error_detail(br#"{"error": "quota exceeded"}"#), "quota exceeded");
        assert_eq!(error_detail(b"<html>Bad Gateway</html>"), "<html>Bad Gateway</html>");
        // Failed before: a `detail` field was kept whole, however long.
        let huge = serde_json::to_vec(&serde_json::json!({ "detail": "é".repeat(100_000) })).unwrap();
        assert_eq!(error_detail(&huge), format!("{}…", "é".repeat(MAX_DETAIL_CHARS)));
    }

    #[test]
    fn the_key_is_never_printed() {
        let key = ApiKey::new("dc_secret_value".into());
        assert!(!format!("{key:?}").contains("secret"));
    }

    #[test]
    fn every_5xx_3xx_and_transient_4xx_is_retried_other_4xx_are_definitive() {
        let status = |status| ApiError::Status { status, detail: String::new(), retry_after: None };
        for retried in [500, 502, 503, 504, 520, 524, 599, 301, 302, 307, 308, 408, 425, 429] {
            assert!(status(retried).is_retryable(), "{retried}");
        }
        for refused in [400, 404, 405, 409, 410, 413, 422] {
            assert!(status(refused).is_refusal(), "{refused}");
        }
        let auth = ApiError::Auth { status: 401, detail: String::new() };
        assert!(!auth.is_retryable() && !auth.is_refusal());
        for transient in [
            ApiError::Timeout(Duration::from_secs(1)),
            ApiError::Connect("reset".into()),
            ApiError::BodyRead("cut".into()),
            ApiError::BadResponse("<html>".into()),
        ] {
            assert!(transient.is_retryable(), "{transient}");
        }
        assert!(ApiError::Request("bad key".into()).is_refusal());
    }

    #[test]
    fn a_ca_file_is_read_for_its_certificates_only_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (made.cert.pem(), made.signing_key.serialize_pem());
        // Keys and other sections beside the certificates are skipped.
        let mixed = write("mixed.pem", format!("{key}{cert}junk line\n{cert}").as_bytes());
        let numbers: Vec<_> = read_ca_file(&mixed).unwrap().iter().map(|c| c.number).collect();
        assert_eq!(numbers, [1, 2]);
        assert!(tls_config(Some(&mixed)).is_ok());

        let refusal = |path: &std::path::Path| read_ca_file(path).err().unwrap().to_string();
        assert!(refusal(&dir.path().join("missing")).starts_with("cannot read it: "));
        assert_eq!(refusal(dir.path()), "not a regular file");
        assert_eq!(refusal(std::path::Path::new("/dev/zero")), "not a regular file");
        assert!(refusal(&write("key.pem", key.as_bytes())).starts_with("no PEM certificate in it"));
        let cut = write("cut.pem", cert.lines().take(3).collect::<Vec<_>>().join("\n").as_bytes());
        assert!(refusal(&cut).starts_with("not a valid PEM file"), "{}", refusal(&cut));
        let huge = dir.path().join("huge.pem");
        std::fs::File::create(&huge).unwrap().set_len(MAX_CA_FILE_BYTES + 1).unwrap();
        assert_eq!(refusal(&huge), "larger than 16 MiB: not a CA file");
        let garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
        let garbage = write("garbage.pem", format!("{cert}{garbage}").as_bytes());
        let error = tls_config(Some(&garbage)).err().unwrap().to_string();
        assert!(error.starts_with("certificate 2 in it is not usable"), "{error}");
    }

    #[test]
    fn a_refused_certificate_is_found_inside_the_io_errors_that_carry_it() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As hyper-rustls hands it over: tokio-rustls's io::Error inside another.
        let wrapped = std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, refused));
        let Some(rustls::Error::InvalidCertificate(problem)) = tls_error(&wrapped) else {
            panic!("not found in {wrapped:?}");
        };
        let text = certificate_problem(problem);
        assert!(text.contains("unknown issuer") && text.contains("server.ca_file"), "{text}");
        let expired = certificate_problem(&rustls::CertificateError::Expired);
        assert!(expired.to_lowercase().contains("expired"), "{expired}");
        assert!(tls_error(&std::io::Error::other("connection refused")).is_none());
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        /// Any `Retry-After` a server sends (digits of any size, dates,
        /// bytes) is a wait or ignored, never a panic.
        #[test]
        fn any_retry_after_is_a_wait_or_ignored(
            text in "[0-9]{1,30}| *[0-9]{1,25} *|-[0-9]{1,5}|.{0,30}",
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            for value in [HeaderValue::from_str(&text).ok(), HeaderValue::from_bytes(&bytes).ok()] {
                let _ = retry_after(value.as_ref());
            }
        }

        /// Any status and body of a refusal is classified once: retried,
        /// an authentication problem or a definitive refusal.
        #[test]
        fn any_status_and_body_are_classified(
            status in 100u16..1000,
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700),
            json in crate::proptest_support::json_value(),
            long_text in ".{400,700}",
        ) {
            let detail = error_detail(&body);
            let json_detail = error_detail(&serde_json::to_vec(&json).unwrap());
            let long = error_detail(&serde_json::to_vec(&serde_json::json!({ "detail": long_text })).unwrap());
            for text in [&detail, &json_detail, &long] {
                proptest::prop_assert!(text.chars().count() <= MAX_DETAIL_CHARS + 1, "{} chars", text.chars().count());
            }
            let error = match status {
                401 | 403 => ApiError::Auth { status, detail },
                _ => ApiError::Status { status, detail, retry_after: None },
            };
            let kinds = [error.is_retryable(), error.is_auth(), error.is_refusal()];
            proptest::prop_assert_eq!(kinds.iter().filter(|kind| **kind).count(), 1);
        }
    }
}
