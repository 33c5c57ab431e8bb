//! An answer the server is about to send: status, JSON body, and the one
//! optional header (`Retry-After`, for injected faults). Errors are
//! `{"detail": "..."}` like the hosted service (Django REST framework), which
//! is the field the runner shows to its user.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use serde_json::json;

use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    pub retry_after: Option<u64>,
}

impl Reply {
    pub fn json(status: StatusCode, value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).expect("answers are plain JSON data");
        Self { status, body: body.into(), retry_after: None }
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
        Self { status, body: body.into(), retry_after: None }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut builder = Response::builder().status(self.status).header(CONTENT_TYPE, "application/json");
        if let Some(seconds) = self.retry_after {
            builder = builder.header(RETRY_AFTER, seconds);
        }
        builder.body(Full::new(self.body)).expect("status and headers are valid")
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
