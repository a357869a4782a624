//! The site broker's users and clients: `GET/POST /api/mqtt/users`,
//! `DELETE /api/mqtt/users/{name}`, `GET /api/mqtt/clients`.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::AppState;
use super::access;
use super::error::{ApiError, ok, ok_page, ok_with};
use super::firmware_api::paging;
use super::refusal::{ApiPath, JsonBody};
use super::wire::{MqttClientDto, MqttUserDto};
use crate::server::error::ServiceError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
/// Body of `POST /api/mqtt/users`.
pub struct NewMqttUserBody {
    name: String,
    password: String,
}

/// GET /api/mqtt/users — the store's users and those of `mqtt.password_file`.
pub async fn list_users(State(st): State<AppState>) -> Result<Response, ApiError> {
    let users: Vec<MqttUserDto> = st
        .broker
        .users
        .list()
        .iter()
        .map(MqttUserDto::from)
        .collect();
    Ok(ok(users))
}

/// POST /api/mqtt/users `{"name","password"}` — 201; 409 if the name exists.
pub async fn add_user(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<NewMqttUserBody>,
) -> Result<Response, ApiError> {
    let u = st
        .broker
        .users
        .add(&b.name, &b.password)
        .await
        .map_err(ServiceError::from)?;
    Ok(access::with_target(
        ok_with(StatusCode::CREATED, MqttUserDto::from(&*u)),
        u.name.clone(),
    ))
}

/// DELETE /api/mqtt/users/{name} — also closes the user's connections; 409 for a user of
/// `mqtt.password_file` (edit the file).
pub async fn delete_user(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    let u = st
        .broker
        .delete_user(&name)
        .await
        .map_err(ServiceError::from)?;
    Ok(ok(MqttUserDto::from(&*u)))
}

/// GET /api/mqtt/clients?limit&offset&kind — connected clients by client id, with their
/// subscriptions and queue depth; `kind` = device, user or anonymous.
pub async fn clients(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (limit, offset) = paging(&q)?;
    let kind = q.get("kind").map(String::as_str);
    if let Some(k) = kind
        && !["device", "user", "anonymous"].contains(&k)
    {
        return Err(ApiError::bad_request(format!(
            "kind {k:?} is not one of device, user, anonymous"
        )));
    }
    let all: Vec<_> = st
        .broker
        .router
        .clients()
        .into_iter()
        .filter(|c| kind.is_none_or(|k| c.identity.kind() == k))
        .collect();
    let total = all.len();
    let page: Vec<MqttClientDto> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(MqttClientDto::from)
        .collect();
    Ok(ok_page(page, total))
}
