//! JSON shapes of the HTTP API (camelCase, as in the source document). Built from store records
//! and domain values, never stored themselves; nothing outside `http` derives `Serialize` for
//! the API, so a rename in the domain cannot change a response.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::ids;
use crate::server::campaigns::progress::Progress;
use crate::server::store::{CampaignRecord, FirmwareRecord, TaskRecord};

pub use crate::time::rfc3339_ms;

/// A firmware as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareDto {
    pub version: String,
    pub device_type: String,
    pub file_name: String,
    pub file_url: String,
    pub file_size: u64,
    pub md5: String,
    pub sha256: String,
    pub description: String,
    pub status: &'static str,
    pub force_upgrade: bool,
    pub release_date: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// The `.minisig` text that came with the image.
    pub signature: Option<String>,
    /// Name of the trusted key that made it.
    pub signer: Option<String>,
    /// `none`, `valid` or `invalid`.
    pub signature_status: &'static str,
    /// Why it is invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_error: Option<String>,
}

impl FirmwareDto {
    /// `public_url` is the base for `fileUrl` (no trailing slash); `signature_status` and
    /// `why` are what the keyring says of its signature now.
    pub fn from_record(
        r: &FirmwareRecord,
        public_url: &str,
        signature_status: &'static str,
        why: Option<String>,
    ) -> FirmwareDto {
        let file_name = ids::firmware_file_name(&r.device_type, &r.version);
        FirmwareDto {
            file_url: format!("{public_url}/firmware/{file_name}"),
            file_name,
            version: r.version.clone(),
            device_type: r.device_type.clone(),
            file_size: r.size,
            md5: r.md5.clone(),
            sha256: r.sha256.clone(),
            description: r.description.clone(),
            status: r.status.as_str(),
            force_upgrade: r.force_upgrade,
            release_date: r.release_date_ms.map(rfc3339_ms),
            created_at: rfc3339_ms(r.created_at_ms),
            updated_at: rfc3339_ms(r.updated_at_ms),
            signature: r.signature.as_ref().map(|s| s.text.clone()),
            signer: r.signature.as_ref().and_then(|s| s.signer.clone()),
            signature_status,
            signature_error: why,
        }
    }
}

/// A delta as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeltaDto {
    pub device_type: String,
    pub from_version: String,
    pub to_version: String,
    pub status: &'static str,
    pub format: &'static str,
    pub url: Option<String>,
    pub size: Option<u64>,
    pub md5: Option<String>,
    pub sha256: Option<String>,
    pub full_size: u64,
    pub ratio: Option<f64>,
    pub error: Option<String>,
    pub build_ms: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
}

impl DeltaDto {
    /// `public_url` is the base for `url` (no trailing slash); the URL needs the admin token.
    pub fn from_record(d: &crate::server::store::DeltaRecord, public_url: &str) -> DeltaDto {
        let ready = d.status == crate::server::store::DeltaStatus::Ready;
        DeltaDto {
            device_type: d.device_type.clone(),
            from_version: d.from_version.clone(),
            to_version: d.to_version.clone(),
            status: d.status.as_str(),
            format: crate::bsdiff::FORMAT,
            url: ready.then(|| format!("{public_url}{}", crate::server::deltas::url_path(d))),
            size: d.size,
            md5: d.md5.clone(),
            sha256: d.sha256.clone(),
            full_size: d.full_size,
            ratio: d
                .size
                .map(|s| (s as f64 / d.full_size.max(1) as f64 * 10000.0).round() / 10000.0),
            error: d.error.clone(),
            build_ms: d.build_ms,
            created_at: rfc3339_ms(d.created_at_ms),
            updated_at: rfc3339_ms(d.updated_at_ms),
        }
    }
}

/// A campaign plan as the dry run shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanDto {
    pub total: usize,
    pub waves: Vec<PlannedWaveDto>,
    pub conflicts: Vec<ConflictDto>,
    pub notes: Vec<String>,
}

/// A wave of a plan.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedWaveDto {
    pub percent: f64,
    pub devices: Vec<PlannedDeviceDto>,
    /// Devices of the wave not connected now (they start once they are).
    pub offline: usize,
    pub deltas: usize,
    pub estimated_bytes: u64,
}

/// A device of a plan.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedDeviceDto {
    pub id: String,
    pub firmware_version: Option<String>,
    pub delta: bool,
    pub bytes: u64,
    pub online: bool,
}

/// A device a plan leaves out, and why.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictDto {
    pub device_id: String,
    pub reason: String,
}

impl PlanDto {
    /// A plan, with whether each device is online now.
    pub fn new(p: &crate::server::campaigns::Plan, online: impl Fn(&str) -> bool) -> PlanDto {
        PlanDto {
            total: p.total,
            waves: p
                .waves
                .iter()
                .map(|w| PlannedWaveDto {
                    percent: w.percent,
                    devices: w
                        .devices
                        .iter()
                        .map(|d| PlannedDeviceDto {
                            id: d.id.clone(),
                            firmware_version: d.firmware_version.clone(),
                            delta: d.delta,
                            bytes: d.bytes,
                            online: online(&d.id),
                        })
                        .collect(),
                    offline: w.devices.iter().filter(|d| !online(&d.id)).count(),
                    deltas: w.deltas,
                    estimated_bytes: w.estimated_bytes,
                })
                .collect(),
            conflicts: p
                .conflicts
                .iter()
                .map(|c| ConflictDto {
                    device_id: c.device_id.clone(),
                    reason: c.reason.clone(),
                })
                .collect(),
            notes: p.notes.clone(),
        }
    }
}

/// Task figures of a set of tasks (all, one version, one campaign).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsDto {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub active: u64,
    pub success_rate: f64,
    pub failure_rate: f64,
    pub avg_duration_secs: Option<f64>,
}

impl From<&crate::server::ota::Stats> for StatsDto {
    fn from(s: &crate::server::ota::Stats) -> StatsDto {
        StatsDto {
            total: s.total,
            completed: s.completed,
            failed: s.failed,
            cancelled: s.cancelled,
            active: s.active,
            success_rate: s.success_rate,
            failure_rate: s.failure_rate,
            avg_duration_secs: s.avg_duration_secs,
        }
    }
}

/// `GET /api/ota/statistics` without its `reports` and `downloads` members.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatisticsDto {
    #[serde(flatten)]
    pub all: StatsDto,
    pub by_version: BTreeMap<String, StatsDto>,
    pub by_campaign: BTreeMap<String, StatsDto>,
    pub devices: usize,
    pub online_devices: usize,
}

impl From<&crate::server::ota::Statistics> for StatisticsDto {
    fn from(s: &crate::server::ota::Statistics) -> StatisticsDto {
        let each = |m: &BTreeMap<String, crate::server::ota::Stats>| {
            m.iter().map(|(k, v)| (k.clone(), v.into())).collect()
        };
        StatisticsDto {
            all: (&s.all).into(),
            by_version: each(&s.by_version),
            by_campaign: each(&s.by_campaign),
            devices: s.devices,
            online_devices: s.online_devices,
        }
    }
}

/// Download traffic: totals and per firmware.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficDto {
    pub bytes_full: u64,
    pub bytes_delta: u64,
    pub bytes_saved: u64,
    pub requests: u64,
    pub range_requests: u64,
    pub per_firmware: Vec<FirmwareTrafficDto>,
}

/// One firmware's download traffic.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareTrafficDto {
    pub device_type: String,
    pub version: String,
    pub bytes_full: u64,
    pub bytes_delta: u64,
    pub bytes_saved: u64,
}

impl From<&crate::server::traffic::TrafficSummary> for TrafficDto {
    fn from(t: &crate::server::traffic::TrafficSummary) -> TrafficDto {
        TrafficDto {
            bytes_full: t.bytes_full,
            bytes_delta: t.bytes_delta,
            bytes_saved: t.bytes_saved,
            requests: t.requests,
            range_requests: t.range_requests,
            per_firmware: t
                .per_firmware
                .iter()
                .map(|f| FirmwareTrafficDto {
                    device_type: f.device_type.clone(),
                    version: f.version.clone(),
                    bytes_full: f.bytes_full,
                    bytes_delta: f.bytes_delta,
                    bytes_saved: f.bytes_saved,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaveDto {
    pub wave: u32,
    pub percent: f64,
    pub devices: usize,
    pub counts: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SkippedDto {
    pub device_id: String,
    pub reason: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryingDto {
    pub device_id: String,
    pub attempts: u32,
    pub next_attempt_at: String,
    pub last_error: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureDto {
    pub code: String,
    pub message: Option<String>,
    pub count: usize,
    pub devices: Vec<String>,
}

/// What the emergency brake did.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BrakeDto {
    pub at: String,
    /// Devices with a task under way when it was pulled.
    pub in_flight: u32,
    /// Of those, told to stop (a cancel message went out).
    pub stopped: u32,
    /// Of those, whose protocol has no cancel message (their downloads were revoked).
    pub could_not_be_told: u32,
    /// Of those, not connected to be told (their downloads were revoked).
    pub not_listening: u32,
    /// Downloads under way that were ended.
    pub transfers_cut: u32,
    /// Members that had not started.
    pub not_started: u32,
    /// Members whose device installed the new version anyway (counted as completed).
    pub installed_anyway: u64,
    /// All of it in words.
    pub summary: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CampaignDto {
    pub id: String,
    pub name: String,
    pub device_type: String,
    pub version: String,
    pub status: &'static str,
    pub status_reason: Option<String>,
    pub targets: serde_json::Value,
    pub total: usize,
    pub counts: BTreeMap<&'static str, u64>,
    pub unconfirmed: u64,
    pub waves: Vec<WaveDto>,
    pub current_wave: Option<u32>,
    pub success_rate: f64,
    pub failure_rate: f64,
    pub bytes_full: u64,
    pub bytes_delta: u64,
    pub eta_secs: Option<u64>,
    pub retrying: Vec<RetryingDto>,
    pub failures: Vec<FailureDto>,
    pub success_threshold: f64,
    pub failure_threshold: serde_json::Value,
    pub max_in_flight: u32,
    pub start_at: String,
    pub window: Option<serde_json::Value>,
    pub force: bool,
    pub retries: u32,
    pub dynamic: bool,
    pub skipped: Vec<SkippedDto>,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub brake: Option<BrakeDto>,
}

impl CampaignDto {
    /// A campaign and where it stands.
    pub fn new(c: &CampaignRecord, p: Progress) -> CampaignDto {
        CampaignDto {
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
                    message: f.message,
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
            brake: c.brake.map(|b| {
                let mut summary = crate::server::campaigns::brake_words(&b);
                if p.installed_after_brake > 0 {
                    summary.push_str(&format!(
                        "; {} of them installed the new version anyway",
                        p.installed_after_brake
                    ));
                }
                BrakeDto {
                    at: rfc3339_ms(b.at_ms),
                    in_flight: b.in_flight,
                    stopped: b.stopped,
                    could_not_be_told: b.no_cancel,
                    not_listening: b.not_listening,
                    transfers_cut: b.transfers_cut,
                    not_started: b.queued,
                    installed_anyway: p.installed_after_brake,
                    summary,
                }
            }),
        }
    }
}

/// One history entry.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventDto {
    pub at: String,
    pub status: &'static str,
    pub progress: u8,
    pub note: String,
}

/// The `delta` of a task.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskDeltaDto {
    pub from_version: String,
    pub url: String,
    pub md5: String,
    pub size: u64,
}

/// A task as the API shows it (SPEC 3; `gatewayId` repeats `deviceId` as in the source document).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskDto {
    pub id: String,
    pub device_id: String,
    pub gateway_id: String,
    pub protocol: &'static str,
    pub device_type: String,
    pub from_version: Option<String>,
    pub to_version: String,
    pub firmware_url: String,
    pub md5: String,
    pub sha256: String,
    pub file_size: u64,
    pub msg_id: String,
    pub status: &'static str,
    pub progress: u8,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// Completed by a device that installed the target after its task was cancelled.
    pub installed_after_cancel: bool,
    pub campaign_id: Option<String>,
    pub delta: Option<TaskDeltaDto>,
    pub force: bool,
    pub start_time: Option<String>,
    pub complete_time: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub events: Vec<EventDto>,
}

/// A device as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceDto {
    pub id: String,
    pub protocol: &'static str,
    pub device_type: String,
    pub firmware_version: Option<String>,
    pub delta_formats: Vec<String>,
    pub tags: Vec<String>,
    pub online: bool,
    pub last_seen: Option<String>,
    pub ip: Option<String>,
    pub registered: bool,
    pub created_at: String,
}

/// One line of the import result.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportResult {
    pub id: String,
    pub ok: bool,
    pub error: Option<String>,
}

/// The answer of `POST /api/ota/tasks/archive`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchivePassDto {
    pub archived: u64,
    pub kept_per_device: u32,
    pub files: Vec<ArchiveFileDto>,
    pub leftovers_removed: usize,
}

/// One file of the task archive.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveFileDto {
    pub name: String,
    pub tasks: u64,
    pub bytes: u64,
    pub sha256: String,
    pub written_at: String,
}

impl From<&crate::server::store::ArchiveFile> for ArchiveFileDto {
    fn from(f: &crate::server::store::ArchiveFile) -> Self {
        ArchiveFileDto {
            name: f.name.clone(),
            tasks: f.tasks,
            bytes: f.bytes,
            sha256: f.sha256.clone(),
            written_at: rfc3339_ms(f.at_ms),
        }
    }
}

/// Builds the API shape of a task.
pub fn task_dto(t: &TaskRecord) -> TaskDto {
    TaskDto {
        id: t.id.to_string(),
        device_id: t.device_id.clone(),
        gateway_id: t.device_id.clone(),
        protocol: t.protocol.as_str(),
        device_type: t.device_type.clone(),
        from_version: t.from_version.clone(),
        to_version: t.to_version.clone(),
        firmware_url: t.firmware_url.clone(),
        md5: t.md5.clone(),
        sha256: t.sha256.clone(),
        file_size: t.file_size,
        msg_id: t.msg_id.clone(),
        status: t.status.as_str(),
        progress: t.progress,
        error_code: t.error_code.clone(),
        error_message: t.error_message.clone(),
        installed_after_cancel: crate::server::ota::state::installed_after_cancel(t),
        campaign_id: t.campaign_id.clone(),
        delta: t.delta.as_ref().map(|d| TaskDeltaDto {
            from_version: d.from_version.clone(),
            url: d.url.clone(),
            md5: d.md5.clone(),
            size: d.size,
        }),
        force: t.force,
        start_time: t.start_time_ms.map(rfc3339_ms),
        complete_time: t.complete_time_ms.map(rfc3339_ms),
        created_at: rfc3339_ms(t.created_at_ms),
        updated_at: rfc3339_ms(t.updated_at_ms),
        events: t
            .events
            .iter()
            .map(|e| EventDto {
                at: rfc3339_ms(e.at_ms),
                status: e.status.as_str(),
                progress: e.progress,
                note: e.note.clone(),
            })
            .collect(),
    }
}

/// A console user (never their hash).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserDto {
    pub name: String,
    pub role: &'static str,
    pub created_at: String,
    pub password_changed_at: String,
}

impl From<&crate::server::store::UserRecord> for UserDto {
    fn from(u: &crate::server::store::UserRecord) -> UserDto {
        UserDto {
            name: u.name.clone(),
            role: u.role.as_str(),
            created_at: rfc3339_ms(u.created_at_ms),
            password_changed_at: rfc3339_ms(u.password_changed_at_ms),
        }
    }
}

/// Who a request is, for the console (`GET /api/auth/session`, the sign-in answer).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionDto {
    pub user: String,
    pub role: &'static str,
    /// The value for `X-CSRF-Token` (null for the admin token, which needs none).
    pub csrf_token: Option<String>,
    /// Null for the admin token.
    pub expires_at: Option<String>,
}

impl SessionDto {
    /// The shape of a session (`expires_ms` 0: none).
    pub fn new(
        user: &str,
        role: crate::server::store::Role,
        csrf: Option<&str>,
        expires_ms: i64,
    ) -> SessionDto {
        SessionDto {
            user: user.into(),
            role: role.as_str(),
            csrf_token: csrf.map(str::to_string),
            expires_at: (expires_ms > 0).then(|| rfc3339_ms(expires_ms)),
        }
    }
}

/// One audit log entry.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditDto {
    pub seq: u64,
    pub at: String,
    pub actor: String,
    pub via: String,
    pub action: String,
    pub target: String,
    pub result: String,
    pub status: u16,
}

impl From<&crate::server::store::AuditRecord> for AuditDto {
    fn from(r: &crate::server::store::AuditRecord) -> AuditDto {
        AuditDto {
            seq: r.seq,
            at: rfc3339_ms(r.at_ms),
            actor: r.actor.clone(),
            via: r.via.clone(),
            action: r.action.clone(),
            target: r.target.clone(),
            result: r.result.clone(),
            status: r.status,
        }
    }
}

/// Tasks listed in one `changes` event at most; beyond that only their count.
pub const EVENT_TASKS_MAX: usize = 200;

/// One live task change in an event.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TaskChangeDto<'a> {
    device_id: &'a str,
    campaign_id: Option<&'a str>,
    status: &'static str,
    progress: u8,
}

/// The SSE event name and JSON data of a batch: `changes` `{"tasks":[...latest per device],
/// "tasksTotal", "devices":[ids], "campaigns":[ids], "firmware", "deltas"}`, or `resync` `{}`.
pub fn batch_event(b: &crate::server::events::Batch) -> (&'static str, String) {
    use crate::server::events::{Batch, Change};
    use std::collections::BTreeSet;
    let Batch::Changes { changes, .. } = b else {
        return ("resync", "{}".into());
    };
    // the latest change per device, in device order
    let mut tasks: BTreeMap<&str, TaskChangeDto> = BTreeMap::new();
    let mut devices = BTreeSet::new();
    let mut campaigns = BTreeSet::new();
    let (mut firmware, mut deltas) = (false, false);
    for c in changes {
        match c {
            Change::Task {
                device_id,
                campaign_id,
                status,
                progress,
            } => {
                if let Some(c) = campaign_id {
                    campaigns.insert(c.as_str());
                }
                tasks.insert(
                    device_id,
                    TaskChangeDto {
                        device_id,
                        campaign_id: campaign_id.as_deref(),
                        status,
                        progress: *progress,
                    },
                );
            }
            Change::Device { id } => {
                devices.insert(id.as_str());
            }
            Change::Campaign { id } => {
                campaigns.insert(id.as_str());
            }
            Change::Firmware => firmware = true,
            Change::Delta => deltas = true,
        }
    }
    let total = tasks.len();
    let tasks: Vec<_> = tasks.into_values().take(EVENT_TASKS_MAX).collect();
    let devices: Vec<_> = devices.into_iter().take(EVENT_TASKS_MAX).collect();
    let data = serde_json::json!({
        "tasks": tasks, "tasksTotal": total, "devices": devices,
        "campaigns": campaigns, "firmware": firmware, "deltas": deltas,
    });
    ("changes", data.to_string())
}

/// An MQTT application user (never its hash).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MqttUserDto {
    pub name: String,
    /// `hangar` (made with `hangar mqtt-user add` or the API) or `password_file`.
    pub source: &'static str,
    /// Null for users of the password file.
    pub created_at: Option<String>,
}

impl From<&crate::server::broker::users::UserView> for MqttUserDto {
    fn from(u: &crate::server::broker::users::UserView) -> MqttUserDto {
        use crate::server::broker::users::Source;
        MqttUserDto {
            name: u.name.clone(),
            source: match u.source {
                Source::Store => "hangar",
                Source::File => "password_file",
            },
            created_at: u.created_at_ms.map(rfc3339_ms),
        }
    }
}

/// One subscription of an MQTT client.
#[derive(Debug, Serialize)]
pub struct MqttSubscriptionDto {
    pub filter: String,
    pub qos: u8,
}

/// A connected MQTT client.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MqttClientDto {
    pub client_id: String,
    /// `device`, `user` or `anonymous`.
    pub kind: &'static str,
    /// The device id or the user name (null for an anonymous client).
    pub identity: Option<String>,
    pub address: String,
    /// `3.1.1` or `3.1`.
    pub protocol: &'static str,
    pub connected_at: String,
    /// `clean_session = false`: the session outlives the connection.
    pub persistent: bool,
    pub subscriptions: Vec<MqttSubscriptionDto>,
    /// Messages waiting to be sent.
    pub queued: usize,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: usize,
}

impl From<&crate::server::broker::router::ClientView> for MqttClientDto {
    fn from(c: &crate::server::broker::router::ClientView) -> MqttClientDto {
        use crate::server::broker::router::Identity;
        MqttClientDto {
            client_id: c.client_id.clone(),
            kind: c.identity.kind(),
            identity: match &c.identity {
                Identity::Device { id, .. } => Some(id.clone()),
                Identity::User(n) => Some(n.clone()),
                Identity::Anonymous => None,
            },
            address: c.peer.to_string(),
            protocol: if c.level == 3 { "3.1" } else { "3.1.1" },
            connected_at: rfc3339_ms(c.since_ms),
            persistent: c.persistent,
            subscriptions: c
                .subscriptions
                .iter()
                .map(|(f, q)| MqttSubscriptionDto {
                    filter: f.clone(),
                    qos: *q,
                })
                .collect(),
            queued: c.queued,
            inflight: c.inflight,
        }
    }
}
