//! Refusals reach the client. When the answer to a request is an error (4xx/5xx) while the
//! client is still sending its body, the rest of the body is read and thrown away — within a
//! budget — before the answer goes out. Over HTTP/2 an answer sent with the request body unread
//! is followed by RST_STREAM (allowed by RFC 9113, but curl 7.88 then shows no status at all);
//! over HTTP/1.1, closing a socket with unread data resets the connection and can destroy the
//! answer in flight. The one exception: an HTTP/1.1 client that asked `Expect: 100-continue`
//! and whose body nobody read has not sent it — it gets the answer and the connection closes.
//!
//! How: [`drain_refused`] wraps every request body in a [`Tap`]; whoever drops a tap before the
//! end of the body (a handler returning early, the auth check refusing, a size limit) hands the
//! rest back through the tap's slot, and the middleware drains it after the inner service
//! answered. Nothing is copied on the way: reading through a tap is reading the body.
//!
//! Also here: [`JsonBody`], the JSON-body extractor whose every refusal (413 over the limit,
//! 400 not JSON, 400 wrong shape) is the envelope rather than axum's plain-text rejection.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as _, Frame, SizeHint};

use super::error::ApiError;

/// How much of a refused request's body is read before answering, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct DrainBudget {
    /// Bytes at most; a body declared larger is not read at all.
    pub bytes: u64,
    /// Time at most.
    pub time: Duration,
}

/// The budget for a client that did not authenticate: enough for any form or JSON body a
/// script may send by mistake, small enough that strangers cannot make us read much.
pub const STRANGER: DrainBudget = DrainBudget {
    bytes: 16 * 1024 * 1024,
    time: Duration::from_secs(10),
};

/// Marks a refusal of an unauthenticated request (the auth check puts it on its answer), so
/// that only [`STRANGER`]'s budget is spent on its body.
#[derive(Debug, Clone, Copy)]
pub struct Unauthenticated;

struct Shared {
    /// The rest of a body whose tap was dropped before its end.
    rest: Mutex<Option<Body>>,
    /// Someone polled the body (for `Expect: 100-continue`: the client was told to send).
    polled: AtomicBool,
}

/// A request body that hands itself back to [`drain_refused`] when dropped unfinished.
pub struct Tap {
    inner: Option<Body>,
    ended: bool,
    shared: Arc<Shared>,
    idle: IdleLimit,
    /// Armed while the client sends nothing.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How long a client may send nothing in the middle of a request body, and the count of
/// bodies abandoned for it (`hangar_http_body_timeouts_total`).
#[derive(Clone)]
pub struct IdleLimit {
    /// Longest pause between two chunks.
    pub after: Duration,
    /// Bodies cut off so far.
    pub count: Arc<std::sync::atomic::AtomicU64>,
}

impl http_body::Body for Tap {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.shared.polled.store(true, Ordering::Relaxed);
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.ended = true,
            Poll::Ready(Some(Ok(_))) => self.stall = None,
            Poll::Pending => {
                let after = self.idle.after;
                let stall = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
                if stall.as_mut().poll(cx).is_ready() {
                    self.ended = true;
                    self.inner = None;
                    self.idle.count.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(axum::Error::new(format!(
                        "the client sent nothing of the request body for {} s",
                        after.as_secs()
                    )))));
                }
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(b) = self.inner.take()
            && !self.ended
            && !b.is_end_stream()
        {
            *self.shared.rest.lock().expect("tap lock") = Some(b);
        }
    }
}

/// The middleware (outermost on every listener's router).
pub async fn drain_refused(
    budget: DrainBudget,
    idle: IdleLimit,
    req: Request,
    next: Next,
) -> Response {
    if req.body().is_end_stream() {
        // no body (a download, a GET): nothing can be left unread
        return next.run(req).await;
    }
    let waits_for_continue = req.version() <= Version::HTTP_11
        && req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let shared = Arc::new(Shared {
        rest: Mutex::new(None),
        polled: AtomicBool::new(false),
    });
    let (parts, body) = req.into_parts();
    let tap = Tap {
        inner: Some(body),
        ended: false,
        shared: shared.clone(),
        idle,
        stall: None,
    };
    let resp = next.run(Request::from_parts(parts, Body::new(tap))).await;
    if !(resp.status().is_client_error() || resp.status().is_server_error()) {
        return resp;
    }
    let rest = shared.rest.lock().expect("tap lock").take();
    let Some(rest) = rest else {
        return resp;
    };
    if waits_for_continue && !shared.polled.load(Ordering::Relaxed) {
        // the client has not sent the body and will not: tell it, and close
        let mut resp = resp;
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let budget = if resp.extensions().get::<Unauthenticated>().is_some() {
        STRANGER
    } else {
        budget
    };
    drain(rest, budget).await;
    resp
}

/// Reads and discards `body` until its end, `budget.bytes` or `budget.time`.
async fn drain(mut body: Body, budget: DrainBudget) {
    use http_body_util::BodyExt;
    if body.size_hint().lower() > budget.bytes {
        return;
    }
    let mut left = budget.bytes;
    let _ = tokio::time::timeout(budget.time, async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            if let Some(d) = frame.data_ref() {
                let n = d.len() as u64;
                if n > left {
                    return;
                }
                left -= n;
            }
        }
    })
    .await;
}

/// A JSON request body as `T`, read within the route's body limit (axum's
/// `DefaultBodyLimit`, 2 MiB unless the route sets another), every refusal as the envelope.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let BodyBytes(bytes) = BodyBytes::from_request(req, state).await?;
        Ok(JsonBody(json_body(&bytes)?))
    }
}

/// A request body as bytes, read within the route's body limit, its refusal the envelope.
pub struct BodyBytes(pub Bytes);

impl<S> FromRequest<S> for BodyBytes
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(BodyBytes)
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large("the body is larger than this endpoint accepts")
                } else {
                    ApiError::bad_request(format!("could not read the body: {}", r.body_text()))
                }
            })
    }
}

/// The path-parameter extractor whose refusal (a percent-encoded parameter that is not UTF-8,
/// `/api/ota/devices/%FF`) is the envelope rather than axum's plain-text rejection.
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|e| path_refused(&e))
    }
}

/// A path parameter that could not be read, as the envelope.
pub fn path_refused(e: &axum::extract::rejection::PathRejection) -> ApiError {
    ApiError::bad_request(format!(
        "the request path is not valid: {}: percent-encode UTF-8 text",
        e.body_text().trim_start_matches("Invalid URL: ")
    ))
}

/// Parses a JSON request body into `T`, with envelope errors instead of axum's plain text.
pub(super) fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}
