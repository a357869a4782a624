//! Campaign handlers: `POST/GET /api/ota/campaigns`, `GET /api/ota/campaigns/{id}`,
//! `POST /api/ota/campaigns/{id}/pause|resume|cancel`, `POST /api/ota/campaigns/dry-run`, with the
//! request body of SPEC section 3 and the read-back shape (counts per task state, per wave, rates,
//! bytes full vs delta, ETA).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::AppState;
use super::error::{ApiError, ok, ok_with};
use super::refusal::{ApiPath, JsonBody};
use super::wire::CampaignDto;
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

pub(super) fn dto(
    st: &AppState,
    c: &CampaignRecord,
    members: &[CampaignMember],
) -> Result<CampaignDto, ApiError> {
    let p = st
        .campaigns
        .progress(c, members)
        .map_err(ApiError::internal)?;
    Ok(CampaignDto::new(c, p))
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
    Ok(super::access::with_target(
        ok_with(StatusCode::CREATED, v),
        c.id,
    ))
}

/// POST /api/ota/campaigns/dry-run
pub async fn dry_run(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<CampaignBody>,
) -> Result<Response, ApiError> {
    let s = spec(b);
    let plan: Plan = st.campaigns.plan(&s)?;
    Ok(ok(super::wire::PlanDto::new(&plan, |id| {
        st.devices.is_online(id)
    })))
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
    if !matches!(action.as_str(), "pause" | "resume" | "cancel" | "retry") {
        return Err(ApiError::not_found(format!(
            "no campaign action {action:?}: pause, resume, cancel or retry"
        )));
    }
    let c = st.campaigns.act(&id, &action).await?.into_inner();
    let m = st.campaigns.members(&id)?;
    Ok(ok(dto(&st, &c, &m)?))
}

/// A campaign plan carried by a bundle: the same body as `POST /api/ota/campaigns`.
pub fn parse_plan(v: &serde_json::Value) -> Result<CampaignSpec, String> {
    serde_json::from_value::<CampaignBody>(v.clone())
        .map(spec)
        .map_err(|e| e.to_string())
}
