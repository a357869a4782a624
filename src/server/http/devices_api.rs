//! Handlers of the device registry, upgrade tasks and statistics (`/api/ota/devices`,
//! `/api/ota/upgrade`, `/api/ota/task(s)`, `/api/ota/statistics`), with their JSON shapes.
//! Alibaba device ids (`pk/dn`) arrive URL-encoded as one path segment.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::AppState;
use super::error::{ApiError, ok, ok_page, ok_with};
use super::firmware_api::paging;
use super::refusal::{ApiPath, BodyBytes, JsonBody, json_body};
use super::wire::{DeviceDto, ImportResult, rfc3339_ms, task_dto};
use crate::protocol::Protocol;
use crate::server::ota::TaskFilter;
use crate::server::registry::{DeviceChange, DeviceError, NewDevice};
use crate::server::store::{DeviceRecord, TaskStatus};

pub(super) fn device_dto(st: &AppState, d: &DeviceRecord) -> DeviceDto {
    let live = st.devices.live(&d.id);
    DeviceDto {
        id: d.id.clone(),
        protocol: d.protocol.as_str(),
        device_type: d.device_type.clone(),
        firmware_version: live
            .version(d.firmware_version.as_deref())
            .map(str::to_string),
        delta_formats: d.delta_formats.clone(),
        tags: d.tags.clone(),
        online: live.connections > 0,
        last_seen: live.last_seen(d.last_seen_ms).map(rfc3339_ms),
        ip: live
            .ip
            .map(|ip| ip.to_string())
            .or_else(|| d.last_ip.clone()),
        registered: d.registered,
        created_at: rfc3339_ms(d.created_at_ms),
    }
}

/// Body of `POST /api/ota/devices`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterBody {
    pub id: String,
    #[serde(default)]
    pub device_type: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    /// Required to register; with `import?update=true` an existing device keeps its secret
    /// when this is absent.
    #[serde(default)]
    pub secret: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

fn new_device(b: RegisterBody) -> Result<NewDevice, ApiError> {
    let protocol = match b.protocol.as_deref() {
        None => Protocol::Gateway,
        Some(p) => Protocol::parse(p).ok_or_else(|| {
            ApiError::bad_request(format!("protocol {p:?} is not one of gateway, alibaba"))
        })?,
    };
    Ok(NewDevice {
        id: b.id,
        device_type: b.device_type,
        protocol,
        secret: b.secret,
        tags: b.tags,
    })
}

/// POST /api/ota/devices
pub async fn register(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<RegisterBody>,
) -> Result<Response, ApiError> {
    let d = st.devices.register(new_device(b)?).await?.into_inner();
    tracing::info!(device = %d.id, protocol = d.protocol.as_str(), "device registered");
    let target = d.id.clone();
    Ok(super::access::with_target(
        ok_with(StatusCode::CREATED, device_dto(&st, &d)),
        target,
    ))
}

/// POST /api/ota/devices/import[?update=true] — a JSON array of registration bodies; each is
/// reported. With `update`, devices that exist get the entry's tags (and secret, if given).
pub async fn import(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    JsonBody(list): JsonBody<Vec<serde_json::Value>>,
) -> Result<Response, ApiError> {
    let update = super::firmware_api::flag(&q, "update")?;
    if list.len() > 100_000 {
        return Err(ApiError::too_large("at most 100000 devices per import"));
    }
    let ids: Vec<String> = list
        .iter()
        .map(|v| {
            v.get("id")
                .and_then(|i| i.as_str())
                .unwrap_or("")
                .to_string()
        })
        .collect();
    let parsed = list
        .into_iter()
        .map(|v| {
            let b = serde_json::from_value::<RegisterBody>(v)
                .map_err(|e| DeviceError::Invalid(e.to_string()))?;
            new_device(b).map_err(|e| DeviceError::Invalid(e.message().to_string()))
        })
        .collect();
    let stored = st.devices.register_all(parsed, update).await?.into_inner();
    let results: Vec<ImportResult> = ids
        .into_iter()
        .zip(stored)
        .map(|(id, r)| ImportResult {
            id,
            ok: r.is_ok(),
            error: r.err().map(|e| e.to_string()),
        })
        .collect();
    let imported = results.iter().filter(|r| r.ok).count();
    Ok(ok(
        serde_json::json!({"imported": imported, "failed": results.len() - imported, "results": results}),
    ))
}

/// GET /api/ota/devices?deviceType=&protocol=&online=&limit=&offset=
pub async fn list_devices(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (limit, offset) = paging(&q)?;
    let online = match q.get("online").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "online {o:?} must be true or false"
            )));
        }
    };
    let all = st.devices.list()?;
    let matching: Vec<_> = all
        .iter()
        .map(|d| device_dto(&st, d))
        .filter(|d| q.get("deviceType").is_none_or(|t| &d.device_type == t))
        .filter(|d| q.get("protocol").is_none_or(|p| d.protocol == p))
        .filter(|d| online.is_none_or(|o| d.online == o))
        .filter(|d| q.get("tag").is_none_or(|t| d.tags.contains(t)))
        .collect();
    let total = matching.len();
    let page: Vec<_> = matching.into_iter().skip(offset).take(limit).collect();
    Ok(ok_page(page, total))
}

/// Body of `PATCH /api/ota/devices/{id}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeBody {
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    add_tags: Vec<String>,
    #[serde(default)]
    remove_tags: Vec<String>,
    #[serde(default)]
    secret: Option<String>,
}

/// PATCH /api/ota/devices/{id} `{"tags":[...]}` (replace) and/or `{"addTags":[...],
/// "removeTags":[...]}`, `{"secret":"..."}`
pub async fn change_device(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(b): JsonBody<ChangeBody>,
) -> Result<Response, ApiError> {
    if b.tags.is_none() && b.add_tags.is_empty() && b.remove_tags.is_empty() && b.secret.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: send tags, addTags, removeTags or secret",
        ));
    }
    let d = st
        .devices
        .change(
            &id,
            DeviceChange {
                tags: b.tags,
                add_tags: b.add_tags,
                remove_tags: b.remove_tags,
                secret: b.secret,
            },
        )
        .await?
        .into_inner();
    tracing::info!(device = %d.id, tags = ?d.tags, "device changed");
    Ok(ok(device_dto(&st, &d)))
}

/// GET /api/ota/devices/{id}
pub async fn get_device(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(ok(device_dto(&st, &st.devices.get(&id)?)))
}

/// DELETE /api/ota/devices/{id}
pub async fn delete_device(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let d = st.devices.delete(&id).await?;
    Ok(ok(device_dto(&st, &d)))
}

/// Body of `POST /api/ota/upgrade/{deviceId}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpgradeBody {
    version: String,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    allow_downgrade: bool,
}

/// POST /api/ota/upgrade/{deviceId} `{"version":"1.0.2","force":false}`
pub async fn upgrade(
    State(st): State<AppState>,
    ApiPath(device): ApiPath<String>,
    JsonBody(b): JsonBody<UpgradeBody>,
) -> Result<Response, ApiError> {
    let t = st
        .ota
        .create_upgrade(
            &device,
            &crate::server::ota::Upgrade {
                version: b.version,
                force: b.force,
                allow_downgrade: b.allow_downgrade,
                campaign_id: None,
            },
        )
        .await?
        .into_inner();
    Ok(ok_with(StatusCode::CREATED, task_dto(&t)))
}

/// GET /api/ota/task/{deviceId}
pub async fn latest_task(
    State(st): State<AppState>,
    ApiPath(device): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(ok(task_dto(&st.ota.latest_task(&device)?)))
}

/// POST /api/ota/task/{deviceId}/cancel
pub async fn cancel(
    State(st): State<AppState>,
    ApiPath(device): ApiPath<String>,
) -> Result<Response, ApiError> {
    let t = st
        .ota
        .cancel(&device, "cancelled by an operator")
        .await?
        .into_inner()
        .task;
    tracing::info!(device = %device, task = t.id, "task cancelled");
    Ok(ok(task_dto(&t)))
}

/// GET /api/ota/tasks?deviceId=&status=&campaignId=&limit=&offset=
pub async fn list_tasks(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (limit, offset) = paging(&q)?;
    let status = match q.get("status") {
        None => None,
        Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status {s:?} is not one of pending, downloading, verifying, installing, completed, failed, cancelled"
            ))
        })?),
    };
    let f = TaskFilter {
        device_id: q.get("deviceId").cloned(),
        status,
        campaign_id: q.get("campaignId").cloned(),
    };
    let (tasks, total) = if super::firmware_api::flag(&q, "archived")? {
        st.archive
            .list(move |t| f.matches(t), limit, offset)
            .await?
    } else {
        st.ota.list_tasks(&f, limit, offset)?
    };
    Ok(ok_page(
        tasks.iter().map(task_dto).collect::<Vec<_>>(),
        total,
    ))
}

/// Body of `POST /api/ota/tasks/archive` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArchiveBody {
    keep_finished_per_device: Option<u32>,
}

/// POST /api/ota/tasks/archive `{"keepFinishedPerDevice": N}` (optional; default
/// `tasks.keep_finished_per_device`): one pass of the task archive now.
pub async fn archive_tasks(
    State(st): State<AppState>,
    BodyBytes(body): BodyBytes,
) -> Result<Response, ApiError> {
    let b: ArchiveBody = if body.iter().all(u8::is_ascii_whitespace) {
        ArchiveBody::default()
    } else {
        json_body(&body)?
    };
    let keep = b
        .keep_finished_per_device
        .unwrap_or(st.keep_finished_per_device);
    if keep == 0 {
        return Err(ApiError::bad_request(
            "keepFinishedPerDevice must be at least 1 (tasks.keep_finished_per_device is 0: the archive is off unless a number is given)",
        ));
    }
    let pass = st
        .archive
        .pass(keep as usize, st.campaigns.unfinished()?)
        .await?;
    Ok(ok(super::wire::ArchivePassDto {
        archived: pass.archived,
        kept_per_device: keep,
        files: pass.files.iter().map(Into::into).collect(),
        leftovers_removed: pass.leftovers,
    }))
}

/// GET /api/ota/statistics
pub async fn statistics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let s = st.ota.statistics()?;
    let r = &s.reports;
    let dropped: serde_json::Map<String, serde_json::Value> = r
        .dropped
        .iter()
        .map(|(d, n)| (d.key().to_string(), (*n).into()))
        .collect();
    let mut v =
        serde_json::to_value(super::wire::StatisticsDto::from(&s)).map_err(ApiError::internal)?;
    v["reports"] = serde_json::json!({
        "countingSince": rfc3339_ms(r.since_ms),
        "resetOnRestart": true,
        "received": r.received,
        "applied": r.applied,
        "heartbeats": r.heartbeats,
        "matchedWithoutMsgId": r.matched_without_msg_id,
        "requests": r.requests,
        "repeats": r.repeats,
        "dropped": dropped,
    });
    v["droppedReports"] = v["reports"]["dropped"].clone();
    v["downloads"] = serde_json::to_value(super::wire::TrafficDto::from(&st.traffic.summary()))
        .map_err(ApiError::internal)?;
    Ok(ok(v))
}
