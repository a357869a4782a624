//! Delta handlers: `GET/POST /api/ota/firmware/{version}/deltas` (the patch downloads are in
//! [`super::downloads_api`]).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::AppState;
use super::error::{ApiError, ok, ok_with};
use super::firmware_api::{Q, device_type_param};
use super::refusal::{ApiPath, JsonBody};
use super::wire::DeltaDto;
use crate::server::store::DeltaStatus;

/// GET /api/ota/firmware/{version}/deltas?deviceType=
pub async fn list(
    State(st): State<AppState>,
    ApiPath(version): ApiPath<String>,
    Query(q): Q,
) -> Result<Response, ApiError> {
    let t = device_type_param(&q)?;
    if !crate::ids::valid_version(&version) {
        return Err(ApiError::bad_request(format!(
            "version {version:?} must match [0-9A-Za-z.+-]{{1,64}}"
        )));
    }
    let list = st.deltas.list(&t, &version)?;
    Ok(ok(list
        .iter()
        .map(|d| DeltaDto::from_record(d, &st.public_url))
        .collect::<Vec<_>>()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestBody {
    from_version: String,
}

/// POST /api/ota/firmware/{version}/deltas?deviceType= `{"fromVersion": "..."}`: 202 while it is
/// queued or building, 200 when it exists already.
pub async fn request(
    State(st): State<AppState>,
    ApiPath(version): ApiPath<String>,
    Query(q): Q,
    JsonBody(b): JsonBody<RequestBody>,
) -> Result<Response, ApiError> {
    let t = device_type_param(&q)?;
    if !crate::ids::valid_version(&version) {
        return Err(ApiError::bad_request(format!(
            "version {version:?} must match [0-9A-Za-z.+-]{{1,64}}"
        )));
    }
    let d = st
        .deltas
        .request(&t, &version, &b.from_version)
        .await?
        .into_inner();
    let status = match d.status {
        DeltaStatus::Queued | DeltaStatus::Building => StatusCode::ACCEPTED,
        _ => StatusCode::OK,
    };
    Ok(ok_with(status, DeltaDto::from_record(&d, &st.public_url)))
}
