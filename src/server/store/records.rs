//! Stored record types. They carry a schema version and are never sent on the wire as they are:
//! `http` maps them to its own JSON types.

use serde::{Deserialize, Serialize};

/// Current schema version of [`FirmwareRecord`].
pub const FIRMWARE_SCHEMA: u32 = 2;

/// Lifecycle of a firmware image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareStatus {
    /// Uploaded, not offered to devices.
    Draft,
    /// Being tried on test devices.
    Testing,
    /// Offered to devices; the newest released version is "latest".
    Released,
    /// No longer offered.
    Deprecated,
}

impl FirmwareStatus {
    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "draft" => Some(Self::Draft),
            "testing" => Some(Self::Testing),
            "released" => Some(Self::Released),
            "deprecated" => Some(Self::Deprecated),
            _ => None,
        }
    }

    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Testing => "testing",
            Self::Released => "released",
            Self::Deprecated => "deprecated",
        }
    }
}

/// One firmware image as stored. The image itself is a blob named by `sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// `[A-Za-z0-9_-]{1,64}`
    pub device_type: String,
    /// `[0-9A-Za-z.+-]{1,64}`
    pub version: String,
    /// Hex sha256 of the image; also the blob's name.
    pub sha256: String,
    /// Hex md5 of the image.
    pub md5: String,
    /// Size in bytes.
    pub size: u64,
    /// Free text from the uploader.
    pub description: String,
    /// Lifecycle state.
    pub status: FirmwareStatus,
    /// Devices must install it even when they would defer.
    pub force_upgrade: bool,
    /// Milliseconds since the epoch of the first release.
    pub release_date_ms: Option<i64>,
    /// Milliseconds since the epoch of the upload.
    pub created_at_ms: i64,
    /// Milliseconds since the epoch of the last change.
    pub updated_at_ms: i64,
    /// The minisign signature that came with the image, and what checking it found (schema 2).
    #[serde(default)]
    pub signature: Option<FirmwareSignature>,
}

/// What checking a firmware's signature found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureStatus {
    /// Made by a trusted key over these bytes, for this device type and version.
    Valid,
    /// Does not verify, was made for another firmware, or by a key not trusted.
    Invalid,
}

/// A firmware's signature as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareSignature {
    /// The `.minisig` text.
    pub text: String,
    /// The key id that made it (16 hex digits).
    pub key_id: String,
    /// The trusted key's name, when the key was trusted.
    pub signer: Option<String>,
    /// What the check found.
    pub status: SignatureStatus,
    /// Why it is invalid ("" when valid).
    pub reason: String,
}

/// [`FirmwareRecord`] as schema 1 wrote it (no signature); read and upgraded on load.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct FirmwareRecordV1 {
    pub schema: u32,
    pub device_type: String,
    pub version: String,
    pub sha256: String,
    pub md5: String,
    pub size: u64,
    pub description: String,
    pub status: FirmwareStatus,
    pub force_upgrade: bool,
    pub release_date_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl From<FirmwareRecordV1> for FirmwareRecord {
    fn from(r: FirmwareRecordV1) -> FirmwareRecord {
        FirmwareRecord {
            schema: r.schema,
            device_type: r.device_type,
            version: r.version,
            sha256: r.sha256,
            md5: r.md5,
            size: r.size,
            description: r.description,
            status: r.status,
            force_upgrade: r.force_upgrade,
            release_date_ms: r.release_date_ms,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            signature: None,
        }
    }
}

/// Current schema version of [`DeltaRecord`].
pub const DELTA_SCHEMA: u32 = 1;

/// Where a delta stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeltaStatus {
    /// Waiting for a worker.
    Queued,
    /// Being computed.
    Building,
    /// Stored and offered.
    Ready,
    /// Could not be built (see `error`).
    Failed,
    /// Built but not worth it (not smaller than `delta.max_ratio` of the image); not offered.
    Skipped,
}

impl DeltaStatus {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Building => "building",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

/// A BSDIFF40 patch from one version to another of the same device type. The patch is a blob
/// named by `sha256` once `Ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// Device type of both images.
    pub device_type: String,
    /// The version the patch applies to.
    pub from_version: String,
    /// The version it produces.
    pub to_version: String,
    /// sha256 of the source image.
    pub from_sha256: String,
    /// sha256 of the target image.
    pub to_sha256: String,
    /// Where it stands.
    pub status: DeltaStatus,
    /// Patch sha256 (blob name), when built.
    pub sha256: Option<String>,
    /// Patch md5, when built.
    pub md5: Option<String>,
    /// Patch size, when built.
    pub size: Option<u64>,
    /// Size of the target image (for ratios and savings).
    pub full_size: u64,
    /// Why it failed or was skipped.
    pub error: Option<String>,
    /// Milliseconds spent computing it.
    pub build_ms: Option<u64>,
    /// Milliseconds since the epoch.
    pub created_at_ms: i64,
    /// Milliseconds since the epoch.
    pub updated_at_ms: i64,
}

/// Current schema version of [`CampaignRecord`] and [`CampaignMember`]. Schema 2 added
/// [`CampaignRecord::brake`] as the record's last field; schema 1 records are read with it
/// `None`.
pub const CAMPAIGN_SCHEMA: u32 = 2;

/// What an emergency brake could do, counted when it was pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Brake {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Members with an active task then.
    pub in_flight: u32,
    /// Of those, devices sent a cancel message.
    pub stopped: u32,
    /// Of those, devices whose protocol has no cancel message (Alibaba): their download URLs
    /// were revoked and transfers ended, but one that had the image may still install it.
    pub no_cancel: u32,
    /// Of those, devices of a protocol with a cancel message that were not listening.
    pub not_listening: u32,
    /// Downloads under way that were ended.
    pub transfers_cut: u32,
    /// Members that had not started, now cancelled.
    pub queued: u32,
}

/// Lifecycle of a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CampaignStatus {
    /// Waiting for `startAt` (or its window).
    Scheduled,
    /// Starting devices wave by wave.
    Running,
    /// Stopped starting devices (operator or failure gate); in-flight tasks go on.
    Paused,
    /// Every device finished.
    Completed,
    /// Emergency brake pulled.
    Cancelled,
}

impl CampaignStatus {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Still claims its devices.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Scheduled | Self::Running | Self::Paused)
    }
}

/// Which devices a campaign targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CampaignTargets {
    /// Every device of the device type.
    pub all: bool,
    /// Exactly these devices.
    pub device_ids: Vec<String>,
    /// Devices reporting one of these versions.
    pub from_versions: Vec<String>,
    /// Devices carrying every one of these tags.
    pub tags: Vec<String>,
}

/// A rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignRecord {
    /// Schema version.
    pub schema: u32,
    /// `c` + a number.
    pub id: String,
    /// Operator's name for it.
    pub name: String,
    /// Device type of the targets.
    pub device_type: String,
    /// Target version (released).
    pub version: String,
    /// Target selection.
    pub targets: CampaignTargets,
    /// Cumulative wave sizes in percent of the target set, increasing, last 100.
    pub waves: Vec<f64>,
    /// Percent of a wave completed before the next starts.
    pub success_threshold: f64,
    /// Failure gate: percent of finished devices...
    pub failure_percent: f64,
    /// ... and at least this many failures.
    pub failure_min_count: u32,
    /// Devices upgrading at once.
    pub max_in_flight: u32,
    /// Start time, ms since the epoch.
    pub start_at_ms: i64,
    /// Daily window: (start minute of the day, local time; duration in minutes).
    pub window: Option<(u32, u32)>,
    /// Forced upgrade (also replaces a device's active task).
    pub force: bool,
    /// Retries per device after a failure.
    pub retries: u32,
    /// Devices that join the target set later join the campaign.
    pub dynamic: bool,
    /// Where it stands.
    pub status: CampaignStatus,
    /// Why it is paused / what happened last.
    pub status_reason: Option<String>,
    /// Failures the operator acknowledged by resuming (the gate counts failures beyond these).
    pub failures_acknowledged: u32,
    /// When it started running.
    pub started_at_ms: Option<i64>,
    /// When it completed or was cancelled.
    pub ended_at_ms: Option<i64>,
    /// Milliseconds since the epoch.
    pub created_at_ms: i64,
    /// Milliseconds since the epoch.
    pub updated_at_ms: i64,
    /// What the emergency brake did, once pulled (schema 2; keep it the last field).
    #[serde(default)]
    pub brake: Option<Brake>,
}

/// Where one device of a campaign stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberStatus {
    /// Not started (its wave has not come, it is offline, or it waits for a retry).
    Queued,
    /// Has a task.
    InFlight,
    /// Runs the target version.
    Succeeded,
    /// Failed after its retries.
    Failed,
    /// Not upgraded by this campaign (conflict, deleted device); see `note`.
    Skipped,
    /// The campaign was cancelled before it finished.
    Cancelled,
}

/// One device of a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignMember {
    /// Schema version.
    pub schema: u32,
    /// Campaign id.
    pub campaign_id: String,
    /// Device id.
    pub device_id: String,
    /// Wave index (0-based).
    pub wave: u32,
    /// Where it stands.
    pub status: MemberStatus,
    /// Its current or last task.
    pub task_id: Option<u64>,
    /// Tasks started for it.
    pub attempts: u32,
    /// Not before this time (retry backoff), ms since the epoch.
    pub next_attempt_ms: i64,
    /// Why it was skipped, or the last failure.
    pub note: Option<String>,
    /// Milliseconds since the epoch.
    pub updated_at_ms: i64,
}

impl CampaignMember {
    /// A member of `campaign_id` that waits for its first attempt, as of `at_ms`.
    pub fn queued(campaign_id: &str, device_id: &str, wave: u32, at_ms: i64) -> CampaignMember {
        CampaignMember {
            schema: CAMPAIGN_SCHEMA,
            campaign_id: campaign_id.to_string(),
            device_id: device_id.to_string(),
            wave,
            status: MemberStatus::Queued,
            task_id: None,
            attempts: 0,
            next_attempt_ms: 0,
            note: None,
            updated_at_ms: at_ms,
        }
    }
}

/// The devices a campaign was created with, each queued in its wave: one record instead of a
/// member record per device (a fleet campaign is created with one insert). [`Store::list_members`]
/// expands it; a member record of the same device, written when the member moves on, wins.
///
/// [`Store::list_members`]: crate::server::store::Store::list_members
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMembers {
    /// Schema version.
    pub schema: u32,
    /// Campaign id.
    pub campaign_id: String,
    /// When they were queued, ms since the epoch.
    pub queued_at_ms: i64,
    /// (device id, wave index).
    pub devices: Vec<(String, u32)>,
}

/// Current schema version of [`DeviceRecord`].
pub const DEVICE_SCHEMA: u32 = 1;

/// One registered device. Online state is not stored (it is a property of live connections).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// Gateway id, or `{productKey}/{deviceName}` for Alibaba devices.
    pub id: String,
    /// Protocol spoken.
    pub protocol: crate::protocol::Protocol,
    /// Device type (the productKey for Alibaba devices).
    pub device_type: String,
    /// `salt$sha256(salt || secret)` in hex; empty for devices admitted anonymously.
    pub secret_hash: String,
    /// Free labels for campaign targeting.
    pub tags: Vec<String>,
    /// Last version the device reported.
    pub firmware_version: Option<String>,
    /// Patch formats the device declared.
    pub delta_formats: Vec<String>,
    /// Milliseconds since the epoch of the last message or connection.
    pub last_seen_ms: Option<i64>,
    /// Address of the last connection.
    pub last_ip: Option<String>,
    /// Registered by an admin (false: auto-registered in anonymous mode).
    pub registered: bool,
    /// Milliseconds since the epoch of registration.
    pub created_at_ms: i64,
}

/// Current schema version of [`TaskRecord`].
pub const TASK_SCHEMA: u32 = 1;

/// States of an upgrade task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Created; command not yet acknowledged by any report.
    Pending,
    /// The device downloads.
    Downloading,
    /// The device verifies the image.
    Verifying,
    /// The device installs.
    Installing,
    /// Done (final unless the device comes back on the old version).
    Completed,
    /// Failed with an error code (final).
    Failed,
    /// Cancelled by an operator (final).
    Cancelled,
}

impl TaskStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Pending,
        TaskStatus::Downloading,
        TaskStatus::Verifying,
        TaskStatus::Installing,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Downloading => "downloading",
            TaskStatus::Verifying => "verifying",
            TaskStatus::Installing => "installing",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Still in flight (not completed, failed or cancelled).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            TaskStatus::Pending
                | TaskStatus::Downloading
                | TaskStatus::Verifying
                | TaskStatus::Installing
        )
    }
}

/// One entry of a task's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// Milliseconds since the epoch.
    pub at_ms: i64,
    /// Status after the event.
    pub status: TaskStatus,
    /// Progress after the event.
    pub progress: u8,
    /// What happened (e.g. "command sent", "report", "heartbeat 1.0.2").
    pub note: String,
}

/// Counts of finished tasks, summed (what the statistics need of tasks no longer in the store).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Tasks.
    pub total: u64,
    /// Of which completed.
    pub completed: u64,
    /// Of which failed.
    pub failed: u64,
    /// Of which cancelled.
    pub cancelled: u64,
    /// Sum of the completed ones' durations (command to completion), milliseconds.
    pub duration_sum_ms: i64,
}

impl TaskCounts {
    /// Counts one finished task.
    pub fn add(&mut self, t: &TaskRecord) {
        self.total += 1;
        match t.status {
            TaskStatus::Completed => {
                self.completed += 1;
                if let (Some(a), Some(b)) = (t.start_time_ms, t.complete_time_ms) {
                    self.duration_sum_ms += b - a;
                }
            }
            TaskStatus::Failed => self.failed += 1,
            TaskStatus::Cancelled => self.cancelled += 1,
            _ => {}
        }
    }

    /// Adds `other` to these counts.
    pub fn merge(&mut self, other: &TaskCounts) {
        self.total += other.total;
        self.completed += other.completed;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
        self.duration_sum_ms += other.duration_sum_ms;
    }
}

/// Current schema version of [`TaskArchiveRecord`].
pub const TASK_ARCHIVE_SCHEMA: u32 = 1;

/// One file of the task archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveFile {
    /// File name in `<data_dir>/archive/`.
    pub name: String,
    /// Tasks in it.
    pub tasks: u64,
    /// Its size, bytes.
    pub bytes: u64,
    /// sha256 of the file.
    pub sha256: String,
    /// When it was written, milliseconds since the epoch.
    pub at_ms: i64,
}

/// What the store knows of the finished tasks it moved to the archive: the files (written and
/// synced before the tasks left the store, in the same atomic write as their removal, so a
/// file not named here is a leftover of an interrupted pass) and the counts the statistics
/// add to the tasks still in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskArchiveRecord {
    /// Schema version.
    pub schema: u32,
    /// The archive's files, oldest first.
    pub files: Vec<ArchiveFile>,
    /// Every archived task.
    pub all: TaskCounts,
    /// Per target version.
    pub by_version: std::collections::BTreeMap<String, TaskCounts>,
    /// Per campaign.
    pub by_campaign: std::collections::BTreeMap<String, TaskCounts>,
}

/// A delta offered with a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDelta {
    /// Version the patch applies to.
    pub from_version: String,
    /// Signed URL of the patch.
    pub url: String,
    /// md5 of the patch.
    pub md5: String,
    /// Size of the patch.
    pub size: u64,
}

/// The leading fields of a stored [`TaskRecord`], decoded without the rest.
#[derive(Debug, Deserialize)]
pub struct TaskHead<'a> {
    /// Schema version of the record.
    pub schema: u32,
    /// Task id.
    pub id: u64,
    /// The device.
    #[serde(borrow)]
    pub device_id: std::borrow::Cow<'a, str>,
    /// Current state.
    pub status: TaskStatus,
}

/// One upgrade task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// Monotonic id (newer tasks have larger ids).
    pub id: u64,
    /// The device.
    pub device_id: String,
    /// Current state. (schema, id, device_id, status) lead the record: the store reads just
    /// them to build its indexes at start ([`TaskHead`]).
    pub status: TaskStatus,
    /// Protocol of the device when the task was created.
    pub protocol: crate::protocol::Protocol,
    /// Device type / productKey.
    pub device_type: String,
    /// Version the device reported when the task was created.
    pub from_version: Option<String>,
    /// Target version.
    pub to_version: String,
    /// Signed download URL sent in the command.
    pub firmware_url: String,
    /// md5 of the full image.
    pub md5: String,
    /// sha256 of the full image.
    pub sha256: String,
    /// Size of the full image.
    pub file_size: u64,
    /// Message id of the command.
    pub msg_id: String,
    /// 0..=100
    pub progress: u8,
    /// Error code when failed.
    pub error_code: Option<String>,
    /// Error text when failed.
    pub error_message: Option<String>,
    /// Campaign that created it.
    pub campaign_id: Option<String>,
    /// Delta offered, if any.
    pub delta: Option<TaskDelta>,
    /// Forced upgrade flag sent to the device.
    pub force: bool,
    /// When the command was first sent.
    pub start_time_ms: Option<i64>,
    /// When the task reached a final state.
    pub complete_time_ms: Option<i64>,
    /// Last report or command activity (for the stall timeout).
    pub last_activity_ms: i64,
    /// Milliseconds since the epoch.
    pub created_at_ms: i64,
    /// Milliseconds since the epoch.
    pub updated_at_ms: i64,
    /// History, oldest first.
    pub events: Vec<TaskEvent>,
}

/// Current schema version of [`UserRecord`].
pub const USER_SCHEMA: u32 = 1;

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything but secrets.
    Viewer,
    /// Also uploads, releases, upgrades, runs and brakes campaigns.
    Operator,
    /// Also manages users, devices, trust keys and backups.
    Admin,
}

impl Role {
    /// Every role, least privileged first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// One console user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// Sign-in name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// argon2id hash in PHC string form.
    pub password_hash: String,
    /// Milliseconds since the epoch of creation.
    pub created_at_ms: i64,
    /// Milliseconds since the epoch of the last password change.
    pub password_changed_at_ms: i64,
}

/// Current schema version of [`SessionRecord`]. Schema 1 had no `credential`: such sessions
/// (made before an upgrade) are read as absent, so their users sign in again.
pub const SESSION_SCHEMA: u32 = 2;

/// One signed-in browser. Stored under the sha256 of its cookie value, so a stolen backup or
/// store holds no usable cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// The user.
    pub user: String,
    /// The CSRF token state-changing requests of this session must carry.
    pub csrf: String,
    /// Milliseconds since the epoch of sign-in.
    pub created_at_ms: i64,
    /// Milliseconds since the epoch after which the session is refused.
    pub expires_at_ms: i64,
    /// A digest of the password hash the sign-in was checked against; the session is dead once
    /// the user's differs.
    pub credential: String,
}

/// Current schema version of [`AuditRecord`].
pub const AUDIT_SCHEMA: u32 = 1;

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// Position in the log (1, 2, ...).
    pub seq: u64,
    /// Milliseconds since the epoch.
    pub at_ms: i64,
    /// A user name, `admin-token`, or `system`.
    pub actor: String,
    /// `token`, `session`, `cli` or `system`.
    pub via: String,
    /// What was done (e.g. `firmware.release`).
    pub action: String,
    /// What it was done to (e.g. `gateway/1.0.2`); empty if nothing in particular.
    pub target: String,
    /// `ok`, or the refusal (`refused 409`).
    pub result: String,
    /// The HTTP status of the answer (0: not an HTTP request).
    pub status: u16,
}

/// Current schema version of [`AuditCheckpoint`].
pub const AUDIT_CHECKPOINT_SCHEMA: u32 = 1;

/// Where the audit log's hash chain stands after entries were dropped by retention: the chain
/// hash of the last dropped entry, so the chain goes on from it (and a report says what was
/// dropped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCheckpoint {
    /// Schema version of this record.
    pub schema: u32,
    /// The last dropped entry's sequence number; every entry up to it is gone.
    pub seq: u64,
    /// The chain hash of that entry (as a report computes it from the first entry ever).
    pub hash: String,
    /// Entries dropped since the log began.
    pub dropped: u64,
    /// When the last of them was dropped, ms since the epoch.
    pub at_ms: i64,
}

/// Current schema version of [`TrustKeyRecord`] and [`BundleRecord`].
pub const TRUST_SCHEMA: u32 = 1;

/// A public key trusted because a bundle signed by an already trusted key carried it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustKeyRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// The name signatures by it are recorded under.
    pub name: String,
    /// The minisign public key's base64 line.
    pub key: String,
    /// Its key id (16 hex digits).
    pub key_id: String,
    /// The bundle that added it.
    pub bundle_id: String,
    /// The name of the trusted key that signed that bundle.
    pub signed_by: String,
    /// Milliseconds since the epoch.
    pub added_at_ms: i64,
}

/// An imported offline bundle (what it brought, for idempotence and the audit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// The manifest's bundle id.
    pub id: String,
    /// sha256 of the signed manifest bytes.
    pub manifest_sha256: String,
    /// The signing key's name and id.
    pub signer: String,
    /// Key id of the signer.
    pub key_id: String,
    /// The signer's sequence number of this bundle.
    pub sequence: u64,
    /// Milliseconds since the epoch.
    pub imported_at_ms: i64,
    /// `deviceType/version` of each firmware it added (not those already there).
    pub firmware: Vec<String>,
    /// `deviceType/from->to` of each delta it added.
    pub deltas: Vec<String>,
    /// Names of the keys it added.
    pub keys: Vec<String>,
    /// Campaign bodies (JSON) still to be created; emptied as they are.
    pub campaigns_pending: Vec<String>,
    /// Ids of the campaigns it created.
    pub campaigns: Vec<String>,
}

/// Current schema version of the broker's records ([`MqttUserRecord`], [`RetainedRecord`],
/// [`MqttSessionRecord`], [`MqttMessageRecord`]).
pub const MQTT_SCHEMA: u32 = 1;

/// An application user of the broker (a non-device MQTT client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttUserRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// The MQTT user name.
    pub name: String,
    /// Password hash in `mosquitto_passwd`'s format (`$7$...`), so it can be exported as one.
    pub hash: String,
    /// Milliseconds since the epoch.
    pub created_at_ms: i64,
}

/// A retained message, stored under its topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// The topic.
    pub topic: String,
    /// The payload (never empty: an empty retained publish deletes the record).
    pub payload: Vec<u8>,
    /// Its QoS as published.
    pub qos: u8,
    /// When it was published, ms since the epoch.
    pub at_ms: i64,
}

/// A persistent MQTT session (`clean_session = false`), stored under its key (a hash of the
/// client's identity and client id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttSessionRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// The client id.
    pub client_id: String,
    /// Who owns it: `device:ID`, `user:NAME` or `anonymous`.
    pub owner: String,
    /// General subscriptions with their granted QoS.
    pub subscriptions: Vec<(String, u8)>,
    /// A device's own OTA command topics it listens on, with their QoS.
    pub commands: Vec<(String, u8)>,
    /// Milliseconds since the epoch the session was created.
    pub created_at_ms: i64,
}

/// A QoS 1/2 message waiting in (or in flight to) a persistent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttMessageRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// QoS it is delivered with.
    pub qos: u8,
    /// Retain flag as delivered.
    pub retain: bool,
    /// Packet id once sent (0: not sent yet).
    pub pkid: u16,
    /// QoS 2: the client acknowledged it with PUBREC; PUBREL is what is left to send.
    pub released: bool,
}

/// A device account change the site's broker has not confirmed yet (`[mqtt.external] sync`),
/// stored under the device id; the newest change of a device replaces an older one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerAccountRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// Orders the changes: the worker removes a record only if it is still the one it sent.
    pub seq: u64,
    /// The device's MQTT user name (`pk&dn` for Alibaba devices).
    pub login: String,
    /// Its protocol (which topics its role opens).
    pub protocol: crate::protocol::Protocol,
    /// The secret to set; `None`: the account is to be deleted. Kept only until the broker
    /// confirmed the change.
    pub secret: Option<String>,
}

/// A message kept for a bridge's other broker (`[[mqtt.bridge]]`) until it acknowledged it,
/// stored under the bridge's name and a sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeMessageRecord {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}
