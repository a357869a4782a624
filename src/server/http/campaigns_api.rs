//! Campaign handlers: `POST/GET /api/ota/campaigns`, `GET /api/ota/campaigns/{id}`,
//! `POST /api/ota/campaigns/{id}/pause|resume|cancel`, `POST /api/ota/campaigns/dry-run`, with the
//! request body of SPEC section 3 and the read-back shape (counts per task state, per wave, rates,
//! bytes full vs delta, ETA).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::{ApiError, ok, ok_with};
use super::refusal::{ApiPath, JsonBody};
use super::wire::rfc3339_ms;
use crate::server::campaigns::{CampaignSpec, Plan};
use crate::server::store::{CampaignMember, CampaignRecord, CampaignTargets};

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TargetsBody {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    device_ids: Vec<String>,
    #[serde(default)]
    from_versions: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FailureBody {
    percent: f64,
    #[serde(default)]
    min_count: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WindowBody {
    start: String,
    duration_minutes: u32,
}

/// The campaign body of SPEC section 3.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CampaignBody {
    name: String,
    #[serde(default = "gateway")]
    device_type: String,
    version: String,
    targets: TargetsBody,
    #[serde(default)]
    waves: Option<Vec<f64>>,
    #[serde(default)]
    success_threshold: Option<f64>,
    #[serde(default)]
    failure_threshold: Option<FailureBody>,
    #[serde(default)]
    max_in_flight: Option<u32>,
    #[serde(default)]
    start_at: Option<String>,
    #[serde(default)]
    window: Option<WindowBody>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    dynamic: bool,
}

fn gateway() -> String {
    "gateway".into()
}

fn spec(b: CampaignBody) -> CampaignSpec {
    CampaignSpec {
        name: b.name,
        device_type: b.device_type,
        version: b.version,
        targets: CampaignTargets {
            all: b.targets.all,
            device_ids: b.targets.device_ids,
            from_versions: b.targets.from_versions,
            tags: b.targets.tags,
        },
        waves: b.waves,
        success_threshold: b.success_threshold,
        failure_threshold: b
            .failure_threshold
            .map(|f| (f.percent, f.min_count.unwrap_or(1))),
        max_in_flight: b.max_in_flight,
        start_at: b.start_at,
        window: b.window.map(|w| (w.start, w.duration_minutes)),
        force: b.force,
        retries: b.retries,
        dynamic: b.dynamic,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WaveDto {
    wave: u32,
    percent: f64,
    devices: usize,
    counts: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SkippedDto {
    device_id: String,
    reason: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RetryingDto {
    device_id: String,
    attempts: u32,
    next_attempt_at: String,
    last_error: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FailureDto {
    code: String,
    count: usize,
    devices: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CampaignDto {
    id: String,
    name: String,
    device_type: String,
    version: String,
    status: &'static str,
    status_reason: Option<String>,
    targets: serde_json::Value,
    total: usize,
    counts: BTreeMap<&'static str, u64>,
    unconfirmed: u64,
    waves: Vec<WaveDto>,
    current_wave: Option<u32>,
    success_rate: f64,
    failure_rate: f64,
    bytes_full: u64,
    bytes_delta: u64,
    eta_secs: Option<u64>,
    retrying: Vec<RetryingDto>,
    failures: Vec<FailureDto>,
    success_threshold: f64,
    failure_threshold: serde_json::Value,
    max_in_flight: u32,
    start_at: String,
    window: Option<serde_json::Value>,
    force: bool,
    retries: u32,
    dynamic: bool,
    skipped: Vec<SkippedDto>,
    created_at: String,
    updated_at: String,
    started_at: Option<String>,
    ended_at: Option<String>,
}

fn dto(
    st: &AppState,
    c: &CampaignRecord,
    members: &[CampaignMember],
) -> Result<CampaignDto, ApiError> {
    let p = st
        .campaigns
        .progress(c, members)
        .map_err(ApiError::internal)?;
    Ok(CampaignDto {
        id: c.id.clone(),
        name: c.name.clone(),
        device_type: c.device_type.clone(),
        version: c.version.clone(),
        status: c.status.as_str(),
        status_reason: p.status_reason,
        targets: serde_json::json!({"all": c.targets.all, "deviceIds": c.targets.device_ids,
            "fromVersions": c.targets.from_versions, "tags": c.targets.tags}),
        total: p.total,
        counts: p.counts,
        unconfirmed: p.unconfirmed,
        waves: p
            .waves
            .into_iter()
            .map(|w| WaveDto {
                wave: w.wave,
                percent: w.percent,
                devices: w.devices,
                counts: w.counts,
            })
            .collect(),
        current_wave: p.current_wave,
        success_rate: p.success_rate,
        failure_rate: p.failure_rate,
        bytes_full: p.bytes_full,
        bytes_delta: p.bytes_delta,
        eta_secs: p.eta_secs,
        retrying: p
            .retrying
            .into_iter()
            .map(|r| RetryingDto {
                device_id: r.device_id,
                attempts: r.attempts,
                next_attempt_at: rfc3339_ms(r.next_attempt_ms),
                last_error: r.last_error,
            })
            .collect(),
        failures: p
            .failures
            .into_iter()
            .map(|f| FailureDto {
                code: f.code,
                count: f.devices.len(),
                devices: f.devices,
            })
            .collect(),
        success_threshold: c.success_threshold,
        failure_threshold: serde_json::json!({"percent": c.failure_percent, "minCount": c.failure_min_count}),
        max_in_flight: c.max_in_flight,
        start_at: rfc3339_ms(c.start_at_ms),
        window: c.window.map(|(s, d)| {
            serde_json::json!({"start": format!("{:02}:{:02}", s / 60, s % 60), "durationMinutes": d})
        }),
        force: c.force,
        retries: c.retries,
        dynamic: c.dynamic,
        skipped: p
            .skipped
            .into_iter()
            .map(|(device_id, reason)| SkippedDto { device_id, reason })
            .collect(),
        created_at: rfc3339_ms(c.created_at_ms),
        updated_at: rfc3339_ms(c.updated_at_ms),
        started_at: c.started_at_ms.map(rfc3339_ms),
        ended_at: c.ended_at_ms.map(rfc3339_ms),
    })
}

/// POST /api/ota/campaigns
pub async fn create(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<CampaignBody>,
) -> Result<Response, ApiError> {
    let s = spec(b);
    // the campaign as created; its engine is already starting devices (GET shows them)
    let (c, plan, members) = st.campaigns.create(&s).await?.into_inner();
    let mut v = serde_json::to_value(dto(&st, &c, &members)?).map_err(ApiError::internal)?;
    v["notes"] = serde_json::json!(plan.notes);
    Ok(ok_with(StatusCode::CREATED, v))
}

/// POST /api/ota/campaigns/dry-run
pub async fn dry_run(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<CampaignBody>,
) -> Result<Response, ApiError> {
    let s = spec(b);
    let plan: Plan = st.campaigns.plan(&s)?;
    Ok(ok(super::wire::PlanDto::from(&plan)))
}

/// GET /api/ota/campaigns
pub async fn list(State(st): State<AppState>) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for c in st.campaigns.list()? {
        let m = st.campaigns.members(&c.id)?;
        out.push(dto(&st, &c, &m)?);
    }
    Ok(ok(out))
}

/// GET /api/ota/campaigns/{id}
pub async fn get_one(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let c = st.campaigns.get(&id)?;
    let m = st.campaigns.members(&id)?;
    Ok(ok(dto(&st, &c, &m)?))
}

/// POST /api/ota/campaigns/{id}/{action} (pause, resume, cancel)
pub async fn act(
    State(st): State<AppState>,
    ApiPath((id, action)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    if !matches!(action.as_str(), "pause" | "resume" | "cancel") {
        return Err(ApiError::not_found(format!(
            "no campaign action {action:?}: pause, resume or cancel"
        )));
    }
    let c = st.campaigns.act(&id, &action).await?.into_inner();
    let m = st.campaigns.members(&id)?;
    Ok(ok(dto(&st, &c, &m)?))
}
