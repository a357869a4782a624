//! The one place where errors become HTTP answers: status code + the source document's JSON
//! envelope `{"status": false, "message": "<why>", "error": "<CODE>"}`.

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::server::error::ServiceError;
use crate::server::store::StoreError;

/// An API error: HTTP status, machine-readable code, human message (lower-case, says what to do).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Extra members of the envelope (e.g. `freeBytes` of a 507).
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl ApiError {
    /// Any status/code/message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
            fields: Vec::new(),
        }
    }

    /// 400 BAD_REQUEST.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    /// 401 UNAUTHORIZED.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message).with_header(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        )
    }

    /// 403 FORBIDDEN.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", message)
    }

    /// 404 NOT_FOUND.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    /// 413 PAYLOAD_TOO_LARGE.
    pub fn too_large(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", message)
    }

    /// 500 INTERNAL; the cause is logged, the client gets a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "internal error: see the server log",
        )
    }

    /// 507 DISK_FULL: the data directory's filesystem has no room; says how much there is.
    pub fn disk_full(free_bytes: u64, what: &str) -> ApiError {
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "DISK_FULL",
            format!(
                "{what}: the data directory's disk is full ({free_bytes} bytes free); free space \
                 there and retry — the appliance recovers by itself"
            ),
        )
        .with_field("freeBytes", free_bytes.into())
    }

    /// Replaces the envelope's `error` code.
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = code;
        self
    }

    /// Adds a member to the envelope.
    pub fn with_field(mut self, name: &'static str, value: serde_json::Value) -> ApiError {
        self.fields.push((name, value));
        self
    }

    /// Adds a response header (e.g. `Content-Range` on 416).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"status": false, "message": self.message, "error": self.code});
        for (k, v) in self.fields {
            body[k] = v;
        }
        let body = Json(body);
        let mut resp = (self.status, body).into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::DiskFull { free_bytes } => {
                ApiError::disk_full(free_bytes, "nothing was changed")
            }
            StoreError::Unavailable(m) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!("the store is reopening after a failure ({m}); retry in a moment"),
            )
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1")),
            other => ApiError::internal(other),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        match e {
            ServiceError::Invalid(m) => ApiError::bad_request(m),
            ServiceError::NotFound(m) => ApiError::not_found(m),
            ServiceError::Unverified(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "UNVERIFIED", m)
            }
            ServiceError::TooLarge(m) => ApiError::too_large(m),
            ServiceError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "CONFLICT", m),
            ServiceError::Busy(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "BUSY", m),
            ServiceError::Unauthorized(m) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m)
            }
            ServiceError::Forbidden(m) => ApiError::forbidden(m),
            ServiceError::Throttled {
                message,
                retry_after_secs,
            } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "THROTTLED", message).with_header(
                http::header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs),
            ),
            ServiceError::Store(e) => e.into(),
            other @ (ServiceError::Corrupt(_) | ServiceError::Io(_)) => ApiError::internal(other),
        }
    }
}

/// `{"status": true, "message": "Success", "data": ...}` with 200.
pub fn ok<T: serde::Serialize>(data: T) -> Response {
    ok_with(StatusCode::OK, data)
}

/// One page of a list: the success envelope with the page as `data`, and the number of items
/// across all pages (after the filters) in an `X-Total-Count` header.
pub fn ok_page<T: serde::Serialize>(page: T, total: usize) -> Response {
    let mut r = ok(page);
    r.headers_mut().insert(
        HeaderName::from_static("x-total-count"),
        HeaderValue::from(total),
    );
    r
}

/// The success envelope with another status (e.g. 201).
pub fn ok_with<T: serde::Serialize>(status: StatusCode, data: T) -> Response {
    (
        status,
        Json(json!({"status": true, "message": "Success", "data": data})),
    )
        .into_response()
}
