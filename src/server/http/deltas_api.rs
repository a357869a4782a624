//! Delta handlers: `GET/POST /api/ota/firmware/{version}/deltas` and the patch downloads at
//! `/firmware/deltas/{deviceType}_v{from}_to_v{to}.bsdiff` (same Range-capable path and
//! authorisation as images; the patch is re-hashed before it is served).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::download::{self, BlobMeta};
use super::error::{ApiError, ok, ok_with};
use super::firmware_api::{Q, device_type_param, download_authorised};
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

/// GET/HEAD /firmware/deltas/{file}
pub async fn download(
    State(st): State<AppState>,
    ApiPath(file): ApiPath<String>,
    req: axum::extract::Request,
) -> Response {
    let (method, uri, headers) = (req.method(), req.uri(), req.headers());
    if !download_authorised(&st, uri, headers) {
        return ApiError::unauthorized(
            "downloads need the admin token (Authorization: Bearer ...) or a valid signed URL (?token=...)",
        )
        .into_response();
    }
    let Some((dt, from, to)) = crate::server::deltas::parse_file_name(&file) else {
        return ApiError::bad_request(format!(
            "{file:?} is not a delta file name: expected {{deviceType}}_v{{from}}_to_v{{to}}.bsdiff"
        ))
        .into_response();
    };
    let d = match st.deltas.offer(dt, from, to) {
        Some(d) => d,
        None => {
            return ApiError::not_found(format!("no ready delta {from} -> {to} for {dt}"))
                .into_response();
        }
    };
    let path = match st.deltas.verified_path(&d).await {
        Ok(p) => p,
        Err(e) => {
            if let Some(p) = st.deltas.patch_path(&d) {
                st.fds.forget(&p);
            }
            return ApiError::from(e).into_response();
        }
    };
    let (sha, size) = (d.sha256.clone().unwrap_or_default(), d.size.unwrap_or(0));
    download::serve(
        BlobMeta {
            path,
            size,
            sha256: sha,
            modified_ms: d.updated_at_ms,
            file_name: file.clone(),
            counter: Some(st.traffic.counter(
                crate::server::traffic::Served::Delta(
                    d.device_type.clone(),
                    d.from_version,
                    d.to_version,
                ),
                (d.full_size, size),
            )),
        },
        &st.fds,
        method,
        headers,
    )
    .await
}
