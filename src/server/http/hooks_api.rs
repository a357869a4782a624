//! The hooks a site's broker calls ([`crate::server::hooks`] decides): EMQX 5's HTTP
//! authentication and authorization, VerneMQ's webhooks, in those brokers' documented shapes.
//! They carry their own credential (`[hooks] token_file`: `Authorization: Bearer`, a Basic
//! password, or `?token=`), never the admin token. When the appliance cannot decide (a body it
//! cannot read) it refuses: EMQX gets `deny`, never `ignore`; VerneMQ `not_allowed`. A user name
//! that is not a device is not ours: EMQX `ignore`, VerneMQ `next` (the site's own accounts).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use super::refusal::BodyBytes;
use crate::server::hooks::{Action, Hooks, Login, Verdict};

/// Whether the request carries the hook credential.
fn authorized(token: &str, headers: &HeaderMap, uri: &Uri) -> bool {
    let eq = |given: &str| -> bool { given.as_bytes().ct_eq(token.as_bytes()).into() };
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some(b) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return eq(b.trim());
        }
        if let Some(b) = v
            .strip_prefix("Basic ")
            .or_else(|| v.strip_prefix("basic "))
        {
            return base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|up| up.split_once(':').map(|(_, p)| eq(p)))
                .unwrap_or(false);
        }
        return false;
    }
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "token" && eq(&v)))
        .unwrap_or(false)
}

/// The hooks' decisions, once the caller proved it is the broker.
fn gate<'a>(st: &'a AppState, headers: &HeaderMap, uri: &Uri) -> Result<&'a Hooks, ApiError> {
    let Some((hooks, token)) = st.hooks.as_ref() else {
        return Err(ApiError::not_found(
            "the broker hooks are off: set [hooks] token_file to use them",
        ));
    };
    if !authorized(token, headers, uri) {
        return Err(ApiError::unauthorized(
            "broker hooks need the hook credential of [hooks] token_file (Authorization: Bearer ..., a Basic password, or ?token=...)",
        ));
    }
    Ok(hooks)
}

fn answer(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// A hook call: the caller proved it is the broker, then `decide` answers the request; a body
/// that cannot be read gets `refused` (never "not ours").
fn hook<T: for<'de> Deserialize<'de>>(
    st: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    body: &Bytes,
    name: &str,
    refused: fn() -> Response,
    decide: impl FnOnce(&Hooks, T) -> Response,
) -> Response {
    let hooks = match gate(st, headers, uri) {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    match serde_json::from_slice(body) {
        Ok(req) => decide(hooks, req),
        Err(e) => {
            tracing::warn!(hook = name, error = %e, "a broker hook call could not be read: refused");
            refused()
        }
    }
}

// ---- EMQX 5 ----

fn emqx_deny() -> Response {
    answer(json!({"result": "deny"}))
}

/// EMQX's authentication request (the body template a site configures; absent fields are "").
#[derive(Debug, Deserialize)]
struct EmqxAuthn {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// EMQX's authorization request.
#[derive(Debug, Deserialize)]
struct EmqxAuthz {
    #[serde(default)]
    username: String,
    action: String,
    topic: String,
}

/// POST /hooks/emqx/authn — `{"result":"allow"|"deny"|"ignore"}`; an allowed device also gets
/// its own topics as `acl` (EMQX 5.8+ checks them before the authorization chain).
pub async fn emqx_authn(
    State(st): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    BodyBytes(body): BodyBytes,
) -> Response {
    hook(
        &st,
        &headers,
        &uri,
        &body,
        "emqx/authn",
        emqx_deny,
        |hooks, req: EmqxAuthn| match hooks.login(&req.username, &req.password) {
            Login::Device { id, protocol } => {
                let own = hooks.own_topics(&id, protocol);
                let mut acl: Vec<Value> = own
                .publish
                .iter()
                .map(|(t, _)| json!({"permission": "allow", "action": "publish", "topic": format!("eq {t}")}))
                .collect();
                acl.extend(own.subscribe.iter().map(
                |t| json!({"permission": "allow", "action": "subscribe", "topic": format!("eq {t}")}),
            ));
                answer(json!({"result": "allow", "is_superuser": false, "acl": acl}))
            }
            Login::Refused(_) => emqx_deny(),
            Login::NotOurs => answer(json!({"result": "ignore"})),
        },
    )
}

/// POST /hooks/emqx/authz — `{"result":"allow"|"deny"|"ignore"}`.
pub async fn emqx_authz(
    State(st): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    BodyBytes(body): BodyBytes,
) -> Response {
    hook(
        &st,
        &headers,
        &uri,
        &body,
        "emqx/authz",
        emqx_deny,
        |hooks, req: EmqxAuthz| {
            let action = match req.action.as_str() {
                "publish" => Action::Publish,
                "subscribe" => Action::Subscribe,
                _ => return emqx_deny(),
            };
            let result = match hooks.topic(&req.username, action, &req.topic) {
                Verdict::Allow => "allow",
                Verdict::Deny(_) => "deny",
                Verdict::NotOurs => "ignore",
            };
            answer(json!({ "result": result }))
        },
    )
}

// ---- VerneMQ ----

#[derive(Debug, Deserialize)]
struct VmqRegister {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

#[derive(Debug, Deserialize)]
struct VmqTopic {
    topic: String,
}

#[derive(Debug, Deserialize)]
struct VmqSubscribe {
    #[serde(default)]
    username: Option<String>,
    topics: Vec<VmqTopic>,
}

#[derive(Debug, Deserialize)]
struct VmqPublish {
    #[serde(default)]
    username: Option<String>,
    topic: String,
}

fn vmq_ok() -> Response {
    answer(json!({"result": "ok"}))
}

fn vmq_next() -> Response {
    answer(json!({"result": "next"}))
}

fn vmq_refused() -> Response {
    answer(json!({"result": {"error": "not_allowed"}}))
}

fn vmq_verdict(v: Verdict) -> Response {
    match v {
        Verdict::Allow => vmq_ok(),
        Verdict::Deny(_) => vmq_refused(),
        Verdict::NotOurs => vmq_next(),
    }
}

/// POST /hooks/vernemq/auth_on_register
pub async fn vernemq_register(
    State(st): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    BodyBytes(body): BodyBytes,
) -> Response {
    hook(
        &st,
        &headers,
        &uri,
        &body,
        "vernemq/auth_on_register",
        vmq_refused,
        |hooks, req: VmqRegister| {
            let (user, pass) = (
                req.username.unwrap_or_default(),
                req.password.unwrap_or_default(),
            );
            match hooks.login(&user, &pass) {
                Login::Device { .. } => vmq_ok(),
                Login::Refused(_) => vmq_refused(),
                Login::NotOurs => vmq_next(),
            }
        },
    )
}

/// POST /hooks/vernemq/auth_on_subscribe — refused whole when any filter may not be
/// subscribed to; `next` when a filter is not ours (the site's ACL decides those).
pub async fn vernemq_subscribe(
    State(st): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    BodyBytes(body): BodyBytes,
) -> Response {
    hook(
        &st,
        &headers,
        &uri,
        &body,
        "vernemq/auth_on_subscribe",
        vmq_refused,
        |hooks, req: VmqSubscribe| {
            let user = req.username.unwrap_or_default();
            let verdicts: Vec<Verdict> = req
                .topics
                .iter()
                .map(|t| hooks.topic(&user, Action::Subscribe, &t.topic))
                .collect();
            if verdicts.is_empty() || verdicts.iter().any(|v| matches!(v, Verdict::Deny(_))) {
                vmq_refused()
            } else if verdicts.iter().all(|v| *v == Verdict::Allow) {
                vmq_ok()
            } else {
                vmq_next()
            }
        },
    )
}

/// POST /hooks/vernemq/auth_on_publish
pub async fn vernemq_publish(
    State(st): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    BodyBytes(body): BodyBytes,
) -> Response {
    hook(
        &st,
        &headers,
        &uri,
        &body,
        "vernemq/auth_on_publish",
        vmq_refused,
        |hooks, req: VmqPublish| {
            let user = req.username.unwrap_or_default();
            vmq_verdict(hooks.topic(&user, Action::Publish, &req.topic))
        },
    )
}
