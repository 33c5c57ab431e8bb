//! An answer the server is about to send: status, body, and the optional
//! headers injected faults add (`Retry-After`, `Location`, an HTML content
//! type). Errors are
//! `{"detail": "..."}` like the hosted service (Django REST framework), which
//! is the field the runner shows to its user.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use serde_json::json;

use super::store::StoreError;

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    pub retry_after: Option<u64>,
    pub location: Option<String>,
    pub content_type: &'static str,
}

const JSON: &str = "application/json";

/// What a misbehaving proxy answers instead of the API's JSON.
const HTML_ERROR_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n\
    <body><h1>Bad Gateway</h1><p>The upstream server sent an invalid response.</p></body></html>\n";

impl Reply {
    pub fn json(status: StatusCode, value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).expect("answers are plain JSON data");
        Self { status, body: body.into(), retry_after: None, location: None, content_type: JSON }
    }

    pub fn ok() -> Self {
        Self::json(StatusCode::OK, &json!({"ok": true}))
    }

    pub fn error(status: StatusCode, detail: impl std::fmt::Display) -> Self {
        Self::json(status, &json!({"detail": detail.to_string()}))
    }

    pub fn not_found(method: &http::Method, path: &str) -> Self {
        Self::error(StatusCode::NOT_FOUND, format!("no endpoint {method} {path}"))
    }

    pub fn raw(status: StatusCode, body: String) -> Self {
        Self { status, body: body.into(), retry_after: None, location: None, content_type: JSON }
    }

    pub fn html_error_page(status: StatusCode) -> Self {
        Self { content_type: "text/html; charset=utf-8", ..Self::raw(status, HTML_ERROR_PAGE.into()) }
    }

    /// The response's head: status and headers, `Content-Length` included.
    pub fn head(&self) -> http::response::Builder {
        let mut builder = Response::builder()
            .status(self.status)
            .header(CONTENT_TYPE, self.content_type)
            .header(CONTENT_LENGTH, self.body.len());
        if let Some(seconds) = self.retry_after {
            builder = builder.header(RETRY_AFTER, seconds);
        }
        if let Some(location) = &self.location {
            builder = builder.header(LOCATION, location);
        }
        builder
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        self.head().body(Full::new(self.body)).expect("status and headers are valid")
    }
}

impl From<StoreError> for Reply {
    fn from(error: StoreError) -> Self {
        let status = match error {
            StoreError::UnknownExecution(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
        };
        Self::error(status, error)
    }
}
