//! Sign-in, users, the audit log and the live event stream: `POST /api/auth/login|logout`,
//! `GET /api/auth/session`, `GET/POST /api/users`, `PATCH/DELETE /api/users/{name}`,
//! `GET /api/audit`, `GET /api/events`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::access::{self, SESSION_COOKIE};
use super::error::{ApiError, ok, ok_page, ok_with};
use super::firmware_api::paging;
use super::refusal::{ApiPath, JsonBody};
use super::wire::{AuditDto, SessionDto, UserDto, batch_event};
use crate::server::accounts::{AuditFilter, Principal, Via};
use crate::server::error::ServiceError;
use crate::server::events::Batch;
use crate::server::store::Role;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
/// Body of `POST /api/auth/login`.
pub struct LoginBody {
    username: String,
    password: String,
}

/// Whether the request came over TLS (the session cookie is then `Secure`).
#[derive(Clone, Copy)]
pub struct Tls(pub bool);

fn session_cookie(value: &str, max_age_secs: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}"
    ))
    .expect("cookie characters are plain")
}

/// POST /api/auth/login `{"username","password"}` — a session cookie, or 401 with one message
/// for every wrong combination, or 429 (with `Retry-After`) after repeated failures or while
/// the appliance checks as many passwords as it allows at once.
///
/// A sign-in is audited when it succeeds; refused ones are counted
/// (`hangar_auth_sign_ins_total`) and sampled: at most one entry every ten seconds, naming how
/// many were refused since the entry before, so a flood of guesses cannot fill the log.
pub async fn login(
    State(st): State<AppState>,
    Extension(Tls(secure)): Extension<Tls>,
    Extension(ConnectInfo(peer)): Extension<ConnectInfo<SocketAddr>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    JsonBody(b): JsonBody<LoginBody>,
) -> Result<Response, ApiError> {
    // a sign-in form posted from another site (login CSRF) is refused like any other
    // cross-site request, by the same rule (Origin, else Referer) — but a client that sends
    // neither (curl, scripts) may sign in
    let authority = uri.authority().map(|a| a.as_str());
    if access::claims_origin(&headers) && !access::same_origin(&headers, authority) {
        return Err(ApiError::forbidden("cross-site sign-in refused").with_code("CSRF"));
    }
    let peer = peer.ip().to_string();
    let who = Principal {
        actor: b.username.chars().take(64).collect(),
        via: Via::Session,
        role: Role::Viewer,
        csrf: None,
    };
    let r = st.accounts.login(&b.username, &b.password, &peer).await;
    let (status, audited) = match &r {
        Ok(_) => (200, Some(peer.clone())),
        Err(e) => {
            let status = match e {
                ServiceError::Unauthorized(_) => 401,
                ServiceError::Throttled { .. } => 429,
                _ => 500,
            };
            let target = st.accounts.sample_refused().map(|more| match more {
                0 => peer.clone(),
                n => format!("{peer} (+{n} refused sign-ins since the last entry)"),
            });
            (status, target)
        }
    };
    if let Some(target) = audited
        && let Err(e) = st.accounts.audit(&who, "auth.login", &target, status).await
    {
        tracing::error!(error = %e, "the audit log could not be written");
    }
    let s = r?;
    let ttl = (s.record.expires_at_ms - s.record.created_at_ms) / 1000;
    let mut resp = ok(SessionDto::new(
        &s.record.user,
        s.role,
        Some(&s.record.csrf),
        s.record.expires_at_ms,
    ));
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&s.cookie, ttl, secure));
    Ok(resp)
}

/// POST /api/auth/logout — ends this session (the token has none: a no-op).
pub async fn logout(
    State(st): State<AppState>,
    Extension(Tls(secure)): Extension<Tls>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(c) = access::cookie(&headers, SESSION_COOKIE) {
        let _gone = st.accounts.logout(c).await?;
    }
    let mut resp = ok(serde_json::json!({}));
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0, secure));
    Ok(resp)
}

/// GET /api/auth/session — who this is, their role and the CSRF token for their changes.
pub async fn session(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let expires = match access::cookie(&headers, SESSION_COOKIE) {
        Some(c) if who.via == Via::Session => st
            .accounts
            .session(c)?
            .map(|(_, s)| s.expires_at_ms)
            .unwrap_or(0),
        _ => 0,
    };
    Ok(ok(SessionDto::new(
        &who.actor,
        who.role,
        who.csrf.as_deref(),
        expires,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
/// Body of `POST /api/users`.
pub struct NewUserBody {
    name: String,
    role: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
/// Body of `PATCH /api/users/{name}`.
pub struct ChangeUserBody {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn role(s: &str) -> Result<Role, ApiError> {
    Role::parse(s).ok_or_else(|| {
        ApiError::bad_request(format!("role {s:?} is not one of admin, operator, viewer"))
    })
}

/// GET /api/users
pub async fn list_users(State(st): State<AppState>) -> Result<Response, ApiError> {
    let users: Vec<UserDto> = st.accounts.list()?.iter().map(UserDto::from).collect();
    Ok(ok(users))
}

/// POST /api/users `{"name","role","password"}`
pub async fn add_user(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<NewUserBody>,
) -> Result<Response, ApiError> {
    let role = role(&b.role)?;
    let u = st.accounts.add(&b.name, role, b.password).await?;
    Ok(access::with_target(
        ok_with(StatusCode::CREATED, UserDto::from(&*u)),
        u.name.clone(),
    ))
}

/// PATCH /api/users/{name} `{"role"?, "password"?}` — a new password signs the user out
/// everywhere.
pub async fn change_user(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
    JsonBody(b): JsonBody<ChangeUserBody>,
) -> Result<Response, ApiError> {
    let role = b.role.as_deref().map(role).transpose()?;
    if role.is_none() && b.password.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give role or password",
        ));
    }
    let u = st.accounts.change(&name, b.password, role).await?;
    Ok(ok(UserDto::from(&*u)))
}

/// DELETE /api/users/{name}
pub async fn delete_user(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    let u = st.accounts.delete(&name).await?;
    Ok(ok(UserDto::from(&*u)))
}

/// Parses `since`: RFC 3339 or milliseconds since the epoch.
fn since(q: &HashMap<String, String>) -> Result<Option<i64>, ApiError> {
    let Some(s) = q.get("since") else {
        return Ok(None);
    };
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(Some(ms));
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| Some(t.timestamp_millis()))
        .map_err(|_| {
            ApiError::bad_request(format!(
                "since {s:?} is neither RFC 3339 nor milliseconds since the epoch"
            ))
        })
}

/// GET /api/audit?limit&offset&actor&action&since — newest first; `action` may be a prefix
/// ending in `.` (`campaign.`).
pub async fn audit(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (limit, offset) = paging(&q)?;
    let filter = AuditFilter {
        actor: q.get("actor").cloned(),
        action: q.get("action").cloned(),
        since_ms: since(&q)?,
    };
    let (page, total) = st.accounts.audit_log(&filter, limit, offset)?;
    let page: Vec<AuditDto> = page.iter().map(AuditDto::from).collect();
    Ok(ok_page(page, total))
}

/// GET /api/events — `text/event-stream` of [`Batch`]es: `event: changes` with what changed
/// (at most four a second), `event: resync` when this client fell behind what the appliance
/// keeps; `Last-Event-ID` resumes. A comment line every 15 s keeps proxies from closing it; the
/// stream ends when the appliance shuts down (the browser reconnects to the next one).
pub async fn events(State(st): State<AppState>, req: Request) -> Response {
    let resume = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let feed = st.store.events();
    // follow before reading the cursor: no change after it goes unkept; the stream holds the
    // follower for as long as it is open
    let follower = feed.follow();
    let cursor = resume.unwrap_or_else(|| feed.latest());
    let stream = futures_util::stream::unfold((cursor, true), move |(cursor, first)| {
        let feed = feed.clone();
        let _open = &follower;
        async move {
            let hello = format!("retry: 2000\nid: {cursor}\nevent: hello\ndata: {{}}\n\n");
            if first {
                // an explicit first frame: the browser's `open` fires now, and a resumed
                // client with nothing missed sees where it stands
                let pending = resume.and_then(|c| feed.since(c));
                return match pending {
                    Some(b) => Some((Ok::<_, Infallible>(frame(&b)), (last(&b), false))),
                    None => Some((Ok(Bytes::from(hello)), (cursor, false))),
                };
            }
            let batch = tokio::select! {
                // `None`: the appliance is shutting down; the stream ends
                b = feed.next_batch(cursor) => b?,
                _ = tokio::time::sleep(std::time::Duration::from_secs(15)) => {
                    return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), (cursor, false)));
                }
            };
            Some((Ok(frame(&batch)), (last(&batch), false)))
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn last(b: &Batch) -> u64 {
    match b {
        Batch::Changes { last, .. } | Batch::Resync { last } => *last,
    }
}

fn frame(b: &Batch) -> Bytes {
    let (name, data) = batch_event(b);
    Bytes::from(format!("id: {}\nevent: {name}\ndata: {data}\n\n", last(b)))
}
