//! The store: the only module that names sled. Typed methods over typed records; no `Tree`
//! leaves this module, so the engine can be swapped (sled 0.34 has known space-growth issues).
//!
//! Durability: sled buffers writes for up to ~500 ms. Every mutation that the caller reports as
//! saved must be followed by [`Store::flush`], which runs on the blocking pool.

mod records;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use crate::server::events::Change;

mod accounts;
mod accounts_out;
mod archive;
mod bridges;
mod mqtt;
mod trust;

pub use trust::BundleCommit;

pub use mqtt::{MqttWrite, StoredSession};
pub use records::{
    AUDIT_CHECKPOINT_SCHEMA, AUDIT_SCHEMA, ArchiveFile, AuditCheckpoint, AuditRecord, Brake,
    BridgeMessageRecord, BrokerAccountRecord, BundleRecord, CAMPAIGN_SCHEMA, CampaignMember,
    CampaignRecord, CampaignStatus, CampaignTargets, DELTA_SCHEMA, DEVICE_SCHEMA, DeltaRecord,
    DeltaStatus, DeviceRecord, FIRMWARE_SCHEMA, FirmwareRecord, FirmwareSignature, FirmwareStatus,
    MQTT_SCHEMA, MemberStatus, MqttMessageRecord, MqttSessionRecord, MqttUserRecord, QueuedMembers,
    RetainedRecord, Role, SESSION_SCHEMA, SessionRecord, SignatureStatus, TASK_ARCHIVE_SCHEMA,
    TASK_SCHEMA, TRUST_SCHEMA, TaskArchiveRecord, TaskCounts, TaskDelta, TaskEvent, TaskHead,
    TaskRecord, TaskStatus, TrustKeyRecord, USER_SCHEMA, UserRecord,
};

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (I/O, corruption).
    #[error("store engine: {0}")]
    Engine(String),
    /// The filesystem of the store is full: nothing was written. The store recovers by itself
    /// once space is freed ([`Store::recover`]).
    #[error("the data directory's disk is full ({free_bytes} bytes free)")]
    DiskFull {
        /// Bytes free for the appliance on that filesystem when the write failed.
        free_bytes: u64,
    },
    /// The store is being reopened after a failure; try again in a moment.
    #[error("the store is reopening after a failure: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded.
    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The decoding error.
        reason: String,
    },
    /// The record already exists (insert) or changed under us (update).
    #[error("record {0} already exists or was changed concurrently")]
    Conflict(String),
}

impl StoreError {
    /// The engine can no longer write: its I/O failed (a full disk or worse).
    fn breaks_engine(&self) -> bool {
        matches!(self, StoreError::Engine(_) | StoreError::DiskFull { .. })
    }
}

/// Whether an I/O error says the filesystem (or the quota) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        // sled wraps the OS error in a custom one and keeps only its text
        || e.to_string().contains("No space left on device")
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if is_disk_full(&io) => StoreError::DiskFull { free_bytes: 0 },
            other => StoreError::Engine(other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// A value whose writes are on disk. Only [`Store::durable`] makes one, after a flush that covers
/// every write issued before it. Every mutation of a service returns one, so whoever answers a
/// client ("201 Created", a PUBACK) has by its type waited for the flush: the rule "answer only
/// after the covering flush" lives in the services, not in each handler.
#[must_use = "a mutation answers with its durable result"]
#[derive(Debug)]
pub struct Durable<T>(T);

impl<T> Durable<T> {
    /// The value.
    pub fn into_inner(self) -> T {
        self.0
    }

    /// A durable result built from this one (nothing new was written since the flush).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Durable<U> {
        Durable(f(self.0))
    }
}

impl<T, E> Durable<std::result::Result<T, E>> {
    /// A durable outcome as a result: the flush covered the refusal as much as the success.
    pub fn transpose(self) -> std::result::Result<Durable<T>, E> {
        self.0.map(Durable)
    }
}

impl<T> std::ops::Deref for Durable<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Handle to the on-disk store. Cheap to clone: clones share the engine, its health and its
/// group commit.
///
/// After an I/O failure (a full disk) sled refuses every later write until it is reopened,
/// and what it still reads may include writes that were never flushed. So the first failure
/// marks the store degraded ([`Store::health`]); [`Store::recover`] then reopens the engine from
/// disk — which holds exactly what was flushed, i.e. everything ever acknowledged — once there
/// is room again, and bumps [`Store::generation`] so caches of what was stored are dropped.
#[derive(Clone)]
pub struct Store {
    slot: std::sync::Arc<std::sync::RwLock<Option<std::sync::Arc<Engine>>>>,
    group: std::sync::Arc<GroupCommit>,
    health: std::sync::Arc<HealthState>,
    dir: std::sync::Arc<std::path::PathBuf>,
    events: std::sync::Arc<crate::server::events::Feed>,
}

/// The open sled database and its trees.
struct Engine {
    db: sled::Db,
    firmware: sled::Tree,
    devices: sled::Tree,
    tasks: sled::Tree,
    index: std::sync::Mutex<TaskIndex>,
    deltas: sled::Tree,
    campaigns: sled::Tree,
    members: sled::Tree,
    queued: sled::Tree,
    users: sled::Tree,
    sessions: sled::Tree,
    audit: sled::Tree,
    audit_retention: sled::Tree,
    task_archive: sled::Tree,
    trust_keys: sled::Tree,
    bundles: sled::Tree,
    sequences: sled::Tree,
    mqtt_users: sled::Tree,
    mqtt_retained: sled::Tree,
    mqtt_sessions: sled::Tree,
    mqtt_messages: sled::Tree,
    broker_accounts: sled::Tree,
    bridge_queue: sled::Tree,
}

/// Why the store cannot write, since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degraded {
    /// What failed, for `/healthz` and the log.
    pub reason: String,
    /// It was the disk being full (recovery waits for free space).
    pub disk_full: bool,
    /// When it started, ms since the epoch.
    pub since_ms: i64,
}

#[derive(Default)]
struct HealthState {
    degraded: std::sync::Mutex<Option<Degraded>>,
    generation: std::sync::atomic::AtomicU64,
    /// Times the engine was reopened after a failure.
    recoveries: std::sync::atomic::AtomicU64,
}

/// Group commit: every `flush()` caller takes a ticket; one flush on the blocking pool covers
/// every ticket issued before it started, so concurrent callers share an fsync.
struct GroupCommit {
    /// Tickets issued so far.
    issued: std::sync::atomic::AtomicU64,
    /// (highest ticket covered by a finished flush, that flush's error). The lock is fair, so
    /// waiters are served in order and most find their ticket already covered.
    round: tokio::sync::Mutex<(u64, Option<StoreError>)>,
}

fn firmware_key(device_type: &str, version: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(device_type.len() + version.len() + 1);
    k.extend_from_slice(device_type.as_bytes());
    k.push(0);
    k.extend_from_slice(version.as_bytes());
    k
}

/// First byte of a record in the binary encoding. Records written before it are JSON objects
/// (first byte `{`), and both are read; every write uses the binary one.
const BINARY: u8 = 0xB1;

/// Encodes a record: [`BINARY`], then postcard (serde's field order, varints; about a third of
/// the JSON and several times faster both ways — tasks are written on every report). Field
/// order and enum variant order are therefore part of the stored format: add fields to a
/// record only with a new schema number and a reader for the old one.
fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(BINARY);
    postcard::to_io(v, &mut out).expect("records always serialize");
    out
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason,
    };
    match bytes.first() {
        Some(&BINARY) => postcard::from_bytes(&bytes[1..]).map_err(|e| corrupt(e.to_string())),
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string())),
        _ => Err(corrupt("neither a binary nor a JSON record".into())),
    }
}

/// A firmware record in either schema: 1 (before signatures) is read and upgraded.
fn decode_firmware(key: &[u8], bytes: &[u8]) -> Result<FirmwareRecord> {
    decode::<FirmwareRecord>(key, bytes).or_else(|e| {
        decode::<records::FirmwareRecordV1>(key, bytes)
            .map(FirmwareRecord::from)
            .map_err(|_| e)
    })
}

/// A campaign record in either schema. Schema 2 only added `brake` (an `Option`) as the last
/// field, and postcard writes `None` as one zero byte: a schema 1 record is a schema 2 record
/// without that byte. (JSON records of older builds get the field's serde default.)
fn decode_campaign(key: &[u8], bytes: &[u8]) -> Result<CampaignRecord> {
    decode::<CampaignRecord>(key, bytes).or_else(|e| {
        if bytes.first() != Some(&BINARY) {
            return Err(e);
        }
        let mut v1 = bytes.to_vec();
        v1.push(0);
        decode::<CampaignRecord>(key, &v1).map_err(|_| e)
    })
}

/// Decodes a firmware record as [`Store::export`] writes it (hex-decoded), for the backup.
pub fn decode_firmware_record(bytes: &[u8]) -> Result<FirmwareRecord> {
    decode_firmware(b"(exported)", bytes)
}

/// Decodes a record value as [`Store::export`] writes it (hex-decoded), for the backup.
pub fn decode_record<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    decode(b"(exported)", bytes)
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl Store {
    /// Opens (or creates) the store in `dir`. Blocking; call at start-up.
    pub fn open(dir: &Path) -> Result<Store> {
        let engine = Engine::open(dir)?;
        Ok(Store {
            slot: std::sync::Arc::new(std::sync::RwLock::new(Some(std::sync::Arc::new(engine)))),
            group: std::sync::Arc::new(GroupCommit {
                issued: std::sync::atomic::AtomicU64::new(0),
                round: tokio::sync::Mutex::new((0, None)),
            }),
            health: std::sync::Arc::default(),
            dir: std::sync::Arc::new(dir.to_path_buf()),
            events: std::sync::Arc::default(),
        })
    }

    /// The feed of changes written through this store (and of presence, which the registry
    /// publishes there): what the console's live views follow.
    pub fn events(&self) -> std::sync::Arc<crate::server::events::Feed> {
        self.events.clone()
    }

    fn engine(&self) -> Result<std::sync::Arc<Engine>> {
        self.slot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable("reopening".into()))
    }

    /// Runs `f` on the engine; an I/O failure marks the store degraded and a full disk is
    /// reported with the free bytes.
    fn with<T>(&self, f: impl FnOnce(&Engine) -> Result<T>) -> Result<T> {
        let r = f(&*self.engine()?);
        r.map_err(|e| self.failed(e))
    }

    /// Notes a failure: degrade on I/O errors, fill in the free bytes of a full disk.
    fn failed(&self, e: StoreError) -> StoreError {
        if !e.breaks_engine() {
            return e;
        }
        let e = match e {
            StoreError::DiskFull { .. } => StoreError::DiskFull {
                free_bytes: free_bytes(&self.dir).unwrap_or(0),
            },
            other => other,
        };
        let mut d = self
            .health
            .degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            tracing::error!(error = %e, dir = %self.dir.display(),
                "store: a write failed; writes are refused until the store is reopened");
            *d = Some(Degraded {
                reason: match &e {
                    StoreError::DiskFull { .. } => {
                        "disk full: writes are refused until space is freed".into()
                    }
                    other => other.to_string(),
                },
                disk_full: matches!(e, StoreError::DiskFull { .. }),
                since_ms: crate::time::now_ms(),
            });
        }
        e
    }

    /// Why the store cannot write now, if it cannot.
    pub fn health(&self) -> Option<Degraded> {
        self.health
            .degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bumped each time the engine is reopened: whatever a caller remembers of what it stored
    /// under an older generation may have been lost with the unflushed writes.
    pub fn generation(&self) -> u64 {
        self.health
            .generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Times the engine was reopened after a failure since the start.
    pub fn recoveries(&self) -> u64 {
        self.health
            .recoveries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes free on the store's filesystem.
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.dir)
    }

    /// If the store is degraded and (for a full disk) at least `min_free` bytes are free again,
    /// reopens the engine from disk; `Ok(true)` once it is healthy again. Writes never flushed
    /// before the failure are gone with it — none of them was acknowledged.
    pub async fn recover(&self, min_free: u64) -> Result<bool> {
        let Some(d) = self.health() else {
            return Ok(true);
        };
        if d.disk_full && self.free_bytes().unwrap_or(0) < min_free {
            return Ok(false);
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.reopen_blocking())
            .await
            .map_err(|e| StoreError::Unavailable(format!("reopen task: {e}")))??;
        Ok(true)
    }

    fn reopen_blocking(&self) -> Result<()> {
        use std::time::{Duration, Instant};
        // Block new operations while the old engine drains, then drop it: sled locks its
        // directory, so the old handles must be gone before it opens again.
        let taken = self.slot.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut old) = taken {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match std::sync::Arc::try_unwrap(old) {
                    Ok(engine) => {
                        drop(engine);
                        break;
                    }
                    Err(still) if Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(still) => {
                        // a long operation (a backup) holds it: try again later
                        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Some(still);
                        return Err(StoreError::Unavailable("the store is busy".into()));
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let engine = loop {
            match Engine::open(&self.dir) {
                Ok(e) => break e,
                // sled's own threads may hold the directory lock a moment after the last handle
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        };
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(engine));
        self.health
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.health
            .recoveries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self
            .health
            .degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        tracing::warn!(dir = %self.dir.display(), "store reopened: writes are accepted again");
        Ok(())
    }

    /// Makes every previous write durable. Concurrent callers share one flush (group commit);
    /// the flush itself runs on the blocking pool.
    pub async fn flush(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let ticket = self.group.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut round = self.group.round.lock().await;
        if round.0 < ticket {
            // Everything written before this point is covered by the flush we start now.
            let target = self.group.issued.load(Ordering::SeqCst);
            let r = match self.engine() {
                Ok(engine) => tokio::task::spawn_blocking(move || engine.flush_blocking())
                    .await
                    .map_err(|e| StoreError::Engine(format!("flush task: {e}")))
                    .and_then(|r| r),
                Err(e) => Err(e),
            };
            *round = (target, r.err().map(|e| self.failed(e)));
        }
        match &round.1 {
            None => Ok(()),
            Some(e) => Err(e.clone()),
        }
    }

    /// Flushes (see [`Store::flush`]) and hands `value` back as [`Durable`]: what a service
    /// returns from a mutation once everything it wrote is on disk.
    pub async fn durable<T>(&self, value: T) -> Result<Durable<T>> {
        self.flush().await?;
        Ok(Durable(value))
    }

    /// Writes every record of every tree as JSON lines `{"tree","key","value"}` (hex), for
    /// backups. The caller quiesces writers for a consistent snapshot.
    pub fn export(&self, w: &mut dyn std::io::Write) -> std::io::Result<u64> {
        self.engine().map_err(std::io::Error::other)?.export(w)
    }

    /// Loads lines written by [`Store::export`] into this (empty) store and flushes.
    pub fn import(&self, r: impl std::io::BufRead) -> std::io::Result<u64> {
        self.engine().map_err(std::io::Error::other)?.import(r)
    }

    /// Inserts new tasks in one batch (atomic: after a crash all of them or none are there).
    pub fn put_new_tasks<'a>(&self, recs: impl IntoIterator<Item = &'a TaskRecord>) -> Result<()> {
        let recs: Vec<&TaskRecord> = recs.into_iter().collect();
        self.with(|e| e.put_new_tasks(recs.iter().copied()))?;
        for t in recs {
            self.events.publish_with(|| task_change(t));
        }
        Ok(())
    }

    /// Tasks newest first that pass `keep`, skipping `offset` and returning at most `limit`;
    /// and how many pass `keep` in all.
    pub fn list_tasks(
        &self,
        keep: impl Fn(&TaskRecord) -> bool,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<TaskRecord>, usize)> {
        self.with(|e| e.list_tasks(keep, limit, offset))
    }

    /// Calls `f` with every device, in id order, reading as it goes (an export of a large
    /// fleet holds one record at a time).
    pub fn each_device<E: From<StoreError>>(
        &self,
        mut f: impl FnMut(DeviceRecord) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let engine = self.engine()?;
        for kv in engine.devices.iter() {
            let (k, v) = kv.map_err(|e| self.failed(e.into()))?;
            f(decode(&k, &v)?)?;
        }
        Ok(())
    }

    /// Calls `f` with every task, oldest first, reading as it goes.
    pub fn each_task<E: From<StoreError>>(
        &self,
        mut f: impl FnMut(TaskRecord) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let engine = self.engine()?;
        for kv in engine.tasks.iter() {
            let (k, v) = kv.map_err(|e| self.failed(e.into()))?;
            f(decode(&k, &v)?)?;
        }
        Ok(())
    }
}

/// The typed operations of [`Store`]: each runs on the engine through [`Store::with`].
macro_rules! delegate {
    ($( $(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $(
                $(#[$doc])*
                pub fn $name(&self $(, $arg: $ty)*) -> Result<$ret> {
                    self.with(|e| e.$name($($arg),*))
                }
            )*
        }
    };
}

delegate! {
    /// Blocking flush, for shutdown paths outside the runtime.
    fn flush_blocking(&self) -> ();
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> u64;
    /// One firmware record.
    fn get_firmware(&self, device_type: &str, version: &str) -> Option<FirmwareRecord>;
    /// Every firmware record, in key order.
    fn list_firmware(&self) -> Vec<FirmwareRecord>;
    /// The sha256 of every blob some record refers to (for orphan collection): firmware images
    /// and built deltas.
    fn referenced_blobs(&self) -> HashSet<String>;
    /// One delta record.
    fn get_delta(&self, device_type: &str, from: &str, to: &str) -> Option<DeltaRecord>;
    /// Delta records: all, or those to one target `(deviceType, version)`.
    fn list_deltas(&self, target: Option<(&str, &str)>) -> Vec<DeltaRecord>;
    /// Removes one delta record.
    fn delete_delta(&self, device_type: &str, from: &str, to: &str) -> ();
    /// One device.
    fn get_device(&self, id: &str) -> Option<DeviceRecord>;
    /// Every device, by id.
    fn list_devices(&self) -> Vec<DeviceRecord>;
    /// A new task id, larger than every earlier one (also across restarts).
    fn next_task_id(&self) -> u64;
    /// One task.
    fn get_task(&self, id: u64) -> Option<TaskRecord>;
    /// The device's active task, if any.
    fn active_task(&self, device: &str) -> Option<TaskRecord>;
    /// The ids of every active task, oldest first.
    fn active_task_ids(&self) -> Vec<u64>;
    /// Active tasks whose target is (device type, version).
    fn active_tasks_for(&self, device_type: &str, version: &str) -> Vec<TaskRecord>;
    /// The device's newest task, if any.
    fn latest_task(&self, device: &str) -> Option<TaskRecord>;
    /// A new campaign id (`c1`, `c2`, ...).
    fn next_campaign_id(&self) -> String;
    /// One campaign.
    fn get_campaign(&self, id: &str) -> Option<CampaignRecord>;
    /// Every campaign.
    fn list_campaigns(&self) -> Vec<CampaignRecord>;
    /// Inserts or replaces a campaign member.
    fn put_member(&self, m: &CampaignMember) -> ();
    /// Records the devices a campaign starts with, all queued (one insert; see
    /// [`QueuedMembers`]).
    fn put_queued_members(&self, q: &QueuedMembers) -> ();
    /// Inserts or replaces many campaign members in one batch (blocking: sled work for a whole
    /// fleet; call it from the blocking pool).
    fn put_members(&self, members: &[CampaignMember]) -> ();
    /// The members of a campaign, in device-id order: its queued devices as queued members,
    /// each replaced by its member record once it has one.
    fn list_members(&self, campaign: &str) -> Vec<CampaignMember>;
}

/// The writes the console follows: each publishes its change once it is written.
impl Store {
    /// Inserts a new firmware record; `Conflict` if (deviceType, version) exists.
    pub fn insert_firmware(&self, rec: &FirmwareRecord) -> Result<()> {
        self.with(|e| e.insert_firmware(rec))?;
        self.events.publish_with(|| Change::Firmware);
        Ok(())
    }

    /// Replaces `old` by `new` atomically; `Conflict` if the stored record is no longer `old`.
    /// Compares decoded records, so a record stored in the older JSON encoding updates too.
    pub fn update_firmware(&self, old: &FirmwareRecord, new: &FirmwareRecord) -> Result<()> {
        self.with(|e| e.update_firmware(old, new))?;
        self.events.publish_with(|| Change::Firmware);
        Ok(())
    }

    /// Removes a firmware record, returning it.
    pub fn delete_firmware(
        &self,
        device_type: &str,
        version: &str,
    ) -> Result<Option<FirmwareRecord>> {
        let r = self.with(|e| e.delete_firmware(device_type, version))?;
        self.events.publish_with(|| Change::Firmware);
        Ok(r)
    }

    /// Inserts or replaces a delta record.
    pub fn put_delta(&self, rec: &DeltaRecord) -> Result<()> {
        self.with(|e| e.put_delta(rec))?;
        self.events.publish_with(|| Change::Delta);
        Ok(())
    }

    /// Registers a new device; `Conflict` if the id exists.
    pub fn insert_device(&self, rec: &DeviceRecord) -> Result<()> {
        self.with(|e| e.insert_device(rec))?;
        self.events
            .publish_with(|| Change::Device { id: rec.id.clone() });
        Ok(())
    }

    /// Changes a device record in place: `f` is given the stored record and says whether it
    /// changed it; the write is a compare-and-swap against what `f` was given, retried on a
    /// concurrent write, so two read-modify-writes of one device (a report's version and a
    /// connection's address, a tag change) never lose each other. `None` if there is no such
    /// device; else the record as stored (or as it was, when `f` changed nothing).
    pub fn update_device(
        &self,
        id: &str,
        mut f: impl FnMut(&mut DeviceRecord) -> bool,
    ) -> Result<Option<DeviceRecord>> {
        let r = self.with(|e| {
            loop {
                let Some(old) = e.devices.get(id.as_bytes())? else {
                    return Ok(None);
                };
                let mut rec: DeviceRecord = decode(id.as_bytes(), &old)?;
                if !f(&mut rec) {
                    return Ok(Some((rec, false)));
                }
                if e.devices
                    .compare_and_swap(id.as_bytes(), Some(&old), Some(encode(&rec)))?
                    .is_ok()
                {
                    return Ok(Some((rec, true)));
                }
            }
        })?;
        Ok(r.map(|(rec, changed)| {
            if changed {
                self.events
                    .publish_with(|| Change::Device { id: rec.id.clone() });
            }
            rec
        }))
    }

    /// Writes a device record (insert or replace).
    pub fn put_device(&self, rec: &DeviceRecord) -> Result<()> {
        self.with(|e| e.put_device(rec))?;
        self.events
            .publish_with(|| Change::Device { id: rec.id.clone() });
        Ok(())
    }

    /// Removes a device, returning it.
    pub fn delete_device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        let r = self.with(|e| e.delete_device(id))?;
        self.events
            .publish_with(|| Change::Device { id: id.to_string() });
        Ok(r)
    }

    /// Writes a task (one insert) and notes it in the in-memory indexes.
    pub fn put_task(&self, rec: &TaskRecord) -> Result<()> {
        self.with(|e| e.put_task(rec))?;
        self.events.publish_with(|| task_change(rec));
        Ok(())
    }

    /// Replaces `old` by `new` (the same task).
    pub fn update_task(&self, old: &TaskRecord, new: &TaskRecord) -> Result<()> {
        self.with(|e| e.update_task(old, new))?;
        self.events.publish_with(|| task_change(new));
        Ok(())
    }

    /// Inserts or replaces a campaign.
    pub fn put_campaign(&self, c: &CampaignRecord) -> Result<()> {
        self.with(|e| e.put_campaign(c))?;
        self.events
            .publish_with(|| Change::Campaign { id: c.id.clone() });
        Ok(())
    }
}

fn task_change(t: &TaskRecord) -> crate::server::events::Change {
    crate::server::events::Change::Task {
        device_id: t.device_id.clone(),
        campaign_id: t.campaign_id.clone(),
        status: t.status.as_str(),
        progress: t.progress,
    }
}

impl Engine {
    fn open(dir: &Path) -> Result<Engine> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let firmware = db.open_tree("firmware")?;
        let devices = db.open_tree("devices")?;
        let tasks = db.open_tree("tasks")?;
        // indexes of earlier versions, now kept in memory
        for old in ["device_tasks", "active_tasks"] {
            if db.tree_names().iter().any(|n| n == old.as_bytes()) {
                db.drop_tree(old)?;
            }
        }
        let index = TaskIndex::build(&tasks)?;
        let deltas = db.open_tree("deltas")?;
        let campaigns = db.open_tree("campaigns")?;
        let members = db.open_tree("campaign_members")?;
        let queued = db.open_tree("campaign_queued")?;
        let users = db.open_tree("users")?;
        let sessions = db.open_tree("sessions")?;
        let audit = db.open_tree("audit")?;
        let audit_retention = db.open_tree("audit_retention")?;
        let task_archive = db.open_tree("task_archive")?;
        let trust_keys = db.open_tree("trust_keys")?;
        let bundles = db.open_tree("bundles")?;
        let sequences = db.open_tree("bundle_sequences")?;
        let mqtt_users = db.open_tree("mqtt_users")?;
        let mqtt_retained = db.open_tree("mqtt_retained")?;
        let mqtt_sessions = db.open_tree("mqtt_sessions")?;
        let mqtt_messages = db.open_tree("mqtt_messages")?;
        let broker_accounts = db.open_tree("broker_accounts")?;
        let bridge_queue = db.open_tree("bridge_queue")?;
        Ok(Engine {
            bridge_queue,
            broker_accounts,
            mqtt_users,
            mqtt_retained,
            mqtt_sessions,
            mqtt_messages,
            trust_keys,
            bundles,
            sequences,
            db,
            firmware,
            devices,
            tasks,
            index: std::sync::Mutex::new(index),
            deltas,
            campaigns,
            members,
            queued,
            users,
            sessions,
            audit,
            audit_retention,
            task_archive,
        })
    }

    fn flush_blocking(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    fn insert_firmware(&self, rec: &FirmwareRecord) -> Result<()> {
        let key = firmware_key(&rec.device_type, &rec.version);
        match self
            .firmware
            .compare_and_swap(&key, None::<&[u8]>, Some(encode(rec)))?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::Conflict(format!(
                "{}/{}",
                rec.device_type, rec.version
            ))),
        }
    }

    fn get_firmware(&self, device_type: &str, version: &str) -> Result<Option<FirmwareRecord>> {
        let key = firmware_key(device_type, version);
        self.firmware
            .get(&key)?
            .map(|v| decode_firmware(&key, &v))
            .transpose()
    }

    fn list_firmware(&self) -> Result<Vec<FirmwareRecord>> {
        self.firmware
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode_firmware(&k, &v)
            })
            .collect()
    }

    fn update_firmware(&self, old: &FirmwareRecord, new: &FirmwareRecord) -> Result<()> {
        let key = firmware_key(&old.device_type, &old.version);
        let conflict = || StoreError::Conflict(format!("{}/{}", old.device_type, old.version));
        let Some(raw) = self.firmware.get(&key)? else {
            return Err(conflict());
        };
        if decode_firmware(&key, &raw)? != *old {
            return Err(conflict());
        }
        match self
            .firmware
            .compare_and_swap(&key, Some(raw), Some(encode(new)))?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(conflict()),
        }
    }

    fn delete_firmware(&self, device_type: &str, version: &str) -> Result<Option<FirmwareRecord>> {
        let key = firmware_key(device_type, version);
        self.firmware
            .remove(&key)?
            .map(|v| decode_firmware(&key, &v))
            .transpose()
    }

    fn referenced_blobs(&self) -> Result<HashSet<String>> {
        let mut set: HashSet<String> = self
            .list_firmware()?
            .into_iter()
            .map(|r| r.sha256)
            .collect();
        set.extend(self.list_deltas(None)?.into_iter().filter_map(|d| d.sha256));
        Ok(set)
    }
}

fn delta_key(device_type: &str, to: &str, from: &str) -> Vec<u8> {
    let mut k = firmware_key(device_type, to);
    k.push(0);
    k.extend_from_slice(from.as_bytes());
    k
}

impl Engine {
    fn put_delta(&self, rec: &DeltaRecord) -> Result<()> {
        self.deltas.insert(
            delta_key(&rec.device_type, &rec.to_version, &rec.from_version),
            encode(rec),
        )?;
        Ok(())
    }

    fn get_delta(&self, device_type: &str, from: &str, to: &str) -> Result<Option<DeltaRecord>> {
        let key = delta_key(device_type, to, from);
        self.deltas.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    fn list_deltas(&self, target: Option<(&str, &str)>) -> Result<Vec<DeltaRecord>> {
        let iter = match target {
            Some((dt, v)) => {
                let mut prefix = firmware_key(dt, v);
                prefix.push(0);
                self.deltas.scan_prefix(prefix)
            }
            None => self.deltas.iter(),
        };
        iter.map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
        .collect()
    }

    fn delete_delta(&self, device_type: &str, from: &str, to: &str) -> Result<()> {
        self.deltas.remove(delta_key(device_type, to, from))?;
        Ok(())
    }
}

impl Engine {
    fn insert_device(&self, rec: &DeviceRecord) -> Result<()> {
        match self
            .devices
            .compare_and_swap(rec.id.as_bytes(), None::<&[u8]>, Some(encode(rec)))?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::Conflict(rec.id.clone())),
        }
    }

    fn put_device(&self, rec: &DeviceRecord) -> Result<()> {
        self.devices.insert(rec.id.as_bytes(), encode(rec))?;
        Ok(())
    }

    fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        self.devices
            .get(id.as_bytes())?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    fn list_devices(&self) -> Result<Vec<DeviceRecord>> {
        self.devices
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn delete_device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        self.devices
            .remove(id.as_bytes())?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    fn next_task_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()? + 1)
    }

    fn put_task(&self, rec: &TaskRecord) -> Result<()> {
        self.tasks.insert(rec.id.to_be_bytes(), encode(rec))?;
        self.index().note(&rec.device_id, rec.id, rec.status);
        Ok(())
    }

    fn put_new_tasks<'a>(&self, recs: impl IntoIterator<Item = &'a TaskRecord>) -> Result<()> {
        let recs: Vec<&TaskRecord> = recs.into_iter().collect();
        let mut batch = sled::Batch::default();
        for rec in &recs {
            batch.insert(&rec.id.to_be_bytes(), encode(*rec));
        }
        self.tasks.apply_batch(batch)?;
        let mut index = self.index();
        for rec in recs {
            index.note(&rec.device_id, rec.id, rec.status);
        }
        Ok(())
    }

    fn update_task(&self, old: &TaskRecord, new: &TaskRecord) -> Result<()> {
        debug_assert_eq!((old.id, &old.device_id), (new.id, &new.device_id));
        self.put_task(new)
    }

    fn get_task(&self, id: u64) -> Result<Option<TaskRecord>> {
        let key = id.to_be_bytes();
        self.tasks.get(key)?.map(|v| decode(&key, &v)).transpose()
    }

    fn active_task(&self, device: &str) -> Result<Option<TaskRecord>> {
        let id = {
            let index = self.index();
            match index.latest.get(device) {
                Some(id) if index.active.contains(id) => *id,
                _ => return Ok(None),
            }
        };
        self.get_task(id)
    }

    fn active_task_ids(&self) -> Result<Vec<u64>> {
        Ok(self.index().active.iter().copied().collect())
    }

    fn active_tasks_for(&self, device_type: &str, version: &str) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::new();
        for id in self.active_task_ids()? {
            if let Some(t) = self.get_task(id)?
                && t.device_type == device_type
                && t.to_version == version
            {
                out.push(t);
            }
        }
        Ok(out)
    }

    fn latest_task(&self, device: &str) -> Result<Option<TaskRecord>> {
        let id = self.index().latest.get(device).copied();
        match id {
            Some(id) => self.get_task(id),
            None => Ok(None),
        }
    }

    fn list_tasks(
        &self,
        keep: impl Fn(&TaskRecord) -> bool,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<TaskRecord>, usize)> {
        let mut out = Vec::new();
        let mut matching = 0;
        for kv in self.tasks.iter().rev() {
            let (k, v) = kv?;
            let t: TaskRecord = decode(&k, &v)?;
            if !keep(&t) {
                continue;
            }
            matching += 1;
            if matching > offset && out.len() < limit {
                out.push(t);
            }
        }
        Ok((out, matching))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, TaskIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Which task is each device's newest, and which tasks are active — kept in memory, derived
/// from the tasks tree when the store opens ([`TaskIndex::build`]) and updated on every task
/// write, so a task costs one insert and the indexes can never disagree with the tasks after a
/// crash. A device has at most one active task and it is its newest (a new task is refused
/// while one is active, or replaces it only after cancelling it), so "active" is "newest and
/// not final".
#[derive(Default)]
struct TaskIndex {
    /// Device id -> its newest task id.
    latest: HashMap<String, u64>,
    /// Ids of active tasks.
    active: BTreeSet<u64>,
}

impl TaskIndex {
    /// Notes a written task.
    fn note(&mut self, device: &str, id: u64, status: TaskStatus) {
        let newest = match self.latest.get_mut(device) {
            Some(l) if *l > id => false,
            Some(l) => {
                if *l != id {
                    // a newer task: whatever the older one was, it is no longer the active one
                    self.active.remove(l);
                    *l = id;
                }
                true
            }
            None => {
                self.latest.insert(device.to_string(), id);
                true
            }
        };
        if newest && status.is_active() {
            self.active.insert(id);
        } else {
            self.active.remove(&id);
        }
    }

    /// Reads the leading fields of every task (~0.5 µs a task): the two halves of the id range
    /// on two threads, merged.
    fn build(tasks: &sled::Tree) -> Result<TaskIndex> {
        let id_of = |k: &[u8]| <[u8; 8]>::try_from(k).map_or(0, u64::from_be_bytes);
        let (Some((first, _)), Some((last, _))) = (tasks.first()?, tasks.last()?) else {
            return Ok(TaskIndex::default());
        };
        let (first, last) = (id_of(&first), id_of(&last));
        if last.saturating_sub(first) < 4096 {
            return TaskIndex::build_range::<_, &[u8]>(tasks, ..);
        }
        let mid = (first / 2 + last / 2).to_be_bytes();
        let (low, high) = std::thread::scope(|s| {
            let low = s.spawn(|| TaskIndex::build_range(tasks, ..mid.as_slice()));
            let high = TaskIndex::build_range(tasks, mid.as_slice()..);
            (low.join(), high)
        });
        let mut index = low.map_err(|_| StoreError::Engine("task index thread".into()))??;
        index.merge(high?);
        Ok(index)
    }

    /// Adds the index of tasks all newer than this one's: a device's newest task is the later
    /// index's, and this one's newest of that device is no longer active.
    fn merge(&mut self, later: TaskIndex) {
        for (device, id) in later.latest {
            if let Some(older) = self.latest.insert(device, id) {
                self.active.remove(&older);
            }
        }
        self.active.extend(later.active);
    }

    fn build_range<R: std::ops::RangeBounds<K>, K: AsRef<[u8]>>(
        tasks: &sled::Tree,
        range: R,
    ) -> Result<TaskIndex> {
        let mut index = TaskIndex::default();
        for kv in tasks.range(range) {
            let (k, v) = kv?;
            if v.first() == Some(&BINARY) {
                let head: TaskHead<'_> =
                    postcard::from_bytes(&v[1..]).map_err(|e| StoreError::Corrupt {
                        key: format!("task {}", hex::encode(&k)),
                        reason: e.to_string(),
                    })?;
                index.note(&head.device_id, head.id, head.status);
            } else {
                let t: TaskRecord = decode(&k, &v)?;
                index.note(&t.device_id, t.id, t.status);
            }
        }
        Ok(index)
    }
}

fn member_key(campaign: &str, device: &str) -> Vec<u8> {
    firmware_key(campaign, device)
}

impl Engine {
    fn next_campaign_id(&self) -> Result<String> {
        Ok(format!("c{}", self.db.generate_id()? + 1))
    }

    fn put_campaign(&self, c: &CampaignRecord) -> Result<()> {
        self.campaigns.insert(c.id.as_bytes(), encode(c))?;
        Ok(())
    }

    fn get_campaign(&self, id: &str) -> Result<Option<CampaignRecord>> {
        self.campaigns
            .get(id.as_bytes())?
            .map(|v| decode_campaign(id.as_bytes(), &v))
            .transpose()
    }

    fn list_campaigns(&self) -> Result<Vec<CampaignRecord>> {
        self.campaigns
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode_campaign(&k, &v)
            })
            .collect()
    }

    fn put_member(&self, m: &CampaignMember) -> Result<()> {
        self.members
            .insert(member_key(&m.campaign_id, &m.device_id), encode(m))?;
        Ok(())
    }

    fn put_queued_members(&self, q: &QueuedMembers) -> Result<()> {
        self.queued.insert(q.campaign_id.as_bytes(), encode(q))?;
        Ok(())
    }

    fn put_members(&self, members: &[CampaignMember]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for m in members {
            batch.insert(member_key(&m.campaign_id, &m.device_id), encode(m));
        }
        self.members.apply_batch(batch)?;
        Ok(())
    }

    fn list_members(&self, campaign: &str) -> Result<Vec<CampaignMember>> {
        let mut all = std::collections::BTreeMap::new();
        if let Some(v) = self.queued.get(campaign.as_bytes())? {
            let q: QueuedMembers = decode(campaign.as_bytes(), &v)?;
            for (device_id, wave) in q.devices {
                let mut m =
                    CampaignMember::queued(&q.campaign_id, &device_id, wave, q.queued_at_ms);
                m.schema = q.schema;
                all.insert(device_id, m);
            }
        }
        let mut prefix = campaign.as_bytes().to_vec();
        prefix.push(0);
        for kv in self.members.scan_prefix(prefix) {
            let (k, v) = kv?;
            let m: CampaignMember = decode(&k, &v)?;
            all.insert(m.device_id.clone(), m);
        }
        Ok(all.into_values().collect())
    }
}

impl Engine {
    fn export(&self, w: &mut dyn std::io::Write) -> std::io::Result<u64> {
        let mut n = 0;
        for name in self.db.tree_names() {
            let tree = self.db.open_tree(&name).map_err(std::io::Error::other)?;
            let tname = String::from_utf8_lossy(&name).into_owned();
            for kv in tree.iter() {
                let (k, v) = kv.map_err(std::io::Error::other)?;
                let line = serde_json::json!({"tree": tname, "key": hex::encode(&k), "value": hex::encode(&v)});
                serde_json::to_writer(&mut *w, &line)?;
                w.write_all(b"\n")?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn import(&self, r: impl std::io::BufRead) -> std::io::Result<u64> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let mut n = 0;
        for line in r.lines() {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| bad(format!("store line {n}: {e}")))?;
            let (Some(t), Some(k), Some(val)) =
                (v["tree"].as_str(), v["key"].as_str(), v["value"].as_str())
            else {
                return Err(bad(format!("store line {n} lacks tree/key/value")));
            };
            let k = hex::decode(k).map_err(|e| bad(e.to_string()))?;
            let val = hex::decode(val).map_err(|e| bad(e.to_string()))?;
            if t == "device_tasks" || t == "active_tasks" {
                // an earlier version's indexes (backups from before they moved into memory)
                continue;
            }
            let tree = self.db.open_tree(t).map_err(std::io::Error::other)?;
            tree.insert(k, val).map_err(std::io::Error::other)?;
            n += 1;
        }
        self.db.flush().map_err(std::io::Error::other)?;
        *self.index() = TaskIndex::build(&self.tasks).map_err(std::io::Error::other)?;
        Ok(n)
    }
}

/// Opens a store a test has just dropped: sled's own threads may hold the directory lock a
/// moment after the last handle goes, so this retries for up to 10 s.
#[cfg(test)]
pub(crate) fn reopen(dir: &Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("reopening the store: {e}"),
        }
    }
}

/// A pending gateway task for unit tests (no I/O).
#[cfg(test)]
pub(crate) fn sample_task(id: u64, device: &str) -> TaskRecord {
    TaskRecord {
        schema: 1,
        id,
        device_id: device.into(),
        protocol: crate::protocol::Protocol::Gateway,
        device_type: "gateway".into(),
        from_version: Some("1.0.1".into()),
        to_version: "1.0.2".into(),
        firmware_url: "u".into(),
        md5: "m".into(),
        sha256: "s".into(),
        file_size: 1,
        msg_id: format!("ota_{id}"),
        status: TaskStatus::Pending,
        progress: 0,
        error_code: None,
        error_message: None,
        campaign_id: None,
        delta: None,
        force: false,
        start_time_ms: None,
        complete_time_ms: None,
        last_activity_ms: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
        events: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: &str) -> FirmwareRecord {
        FirmwareRecord {
            signature: None,
            schema: FIRMWARE_SCHEMA,
            device_type: "gateway".into(),
            version: v.into(),
            sha256: format!("{:064}", 1),
            md5: format!("{:032}", 1),
            size: 1,
            description: String::new(),
            status: FirmwareStatus::Draft,
            force_upgrade: false,
            release_date_ms: None,
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_share_rounds_and_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut handles = Vec::new();
        for i in 0..200u32 {
            let s = store.clone();
            handles.push(tokio::spawn(async move {
                let mut r = rec(&format!("1.0.{i}"));
                r.sha256 = format!("{i:064}");
                s.insert_firmware(&r).unwrap();
                s.flush().await.unwrap();
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.list_firmware().unwrap().len(), 200);
    }

    #[tokio::test]
    async fn insert_is_unique_and_update_is_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = rec("1.0.0");
        store.insert_firmware(&a).unwrap();
        assert!(matches!(
            store.insert_firmware(&a),
            Err(StoreError::Conflict(_))
        ));
        let mut b = a.clone();
        b.status = FirmwareStatus::Released;
        store.update_firmware(&a, &b).unwrap();
        assert!(matches!(
            store.update_firmware(&a, &b),
            Err(StoreError::Conflict(_))
        ));
        store.flush().await.unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.get_firmware("gateway", "1.0.0").unwrap(), Some(b));
        assert_eq!(store.referenced_blobs().unwrap().len(), 1);
        assert!(store.delete_firmware("gateway", "1.0.0").unwrap().is_some());
        assert!(store.list_firmware().unwrap().is_empty());
    }

    #[tokio::test]
    async fn records_written_as_json_by_earlier_versions_still_read_and_update() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = rec("1.0.0");
        let key = firmware_key("gateway", "1.0.0");
        store
            .engine()
            .unwrap()
            .firmware
            .insert(&key, serde_json::to_vec(&a).unwrap())
            .unwrap();
        let t = sample_task(7, "GW7");
        store
            .engine()
            .unwrap()
            .tasks
            .insert(7u64.to_be_bytes(), serde_json::to_vec(&t).unwrap())
            .unwrap();
        assert_eq!(
            store.get_firmware("gateway", "1.0.0").unwrap(),
            Some(a.clone())
        );
        assert_eq!(store.get_task(7).unwrap(), Some(t));
        let mut b = a.clone();
        b.status = FirmwareStatus::Released;
        store.update_firmware(&a, &b).unwrap();
        let raw = store.engine().unwrap().firmware.get(&key).unwrap().unwrap();
        assert_eq!(raw[0], BINARY, "rewritten in the binary encoding");
        assert_eq!(store.get_firmware("gateway", "1.0.0").unwrap(), Some(b));
        // neither encoding: a clear error naming the key, not a panic
        store
            .engine()
            .unwrap()
            .firmware
            .insert(&key, &b"garbage"[..])
            .unwrap();
        assert!(matches!(
            store.get_firmware("gateway", "1.0.0"),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(decode_firmware_record(&encode(&a)).unwrap(), a);
    }

    #[tokio::test]
    async fn schema_1_firmware_records_read_without_a_signature_and_update() {
        #[derive(serde::Serialize)]
        struct V1<'a> {
            schema: u32,
            device_type: &'a str,
            version: &'a str,
            sha256: &'a str,
            md5: &'a str,
            size: u64,
            description: &'a str,
            status: FirmwareStatus,
            force_upgrade: bool,
            release_date_ms: Option<i64>,
            created_at_ms: i64,
            updated_at_ms: i64,
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut a = rec("1.0.0");
        a.schema = 1;
        let old = V1 {
            schema: 1,
            device_type: &a.device_type,
            version: &a.version,
            sha256: &a.sha256,
            md5: &a.md5,
            size: a.size,
            description: &a.description,
            status: a.status,
            force_upgrade: a.force_upgrade,
            release_date_ms: a.release_date_ms,
            created_at_ms: a.created_at_ms,
            updated_at_ms: a.updated_at_ms,
        };
        let key = firmware_key("gateway", "1.0.0");
        store
            .engine()
            .unwrap()
            .firmware
            .insert(&key, encode(&old))
            .unwrap();
        assert_eq!(
            store.get_firmware("gateway", "1.0.0").unwrap(),
            Some(a.clone())
        );
        assert_eq!(decode_firmware_record(&encode(&old)).unwrap(), a);
        let mut b = a.clone();
        b.status = FirmwareStatus::Released;
        store.update_firmware(&a, &b).unwrap();
        assert_eq!(store.get_firmware("gateway", "1.0.0").unwrap(), Some(b));
    }

    #[tokio::test]
    async fn task_indexes_follow_writes_and_are_rebuilt_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // an earlier version's index trees are dropped on open
        store
            .engine()
            .unwrap()
            .db
            .open_tree("active_tasks")
            .unwrap();
        store
            .put_new_tasks(&[sample_task(1, "GW1"), sample_task(2, "GW2")])
            .unwrap();
        assert_eq!(store.active_task("GW1").unwrap().unwrap().id, 1);
        assert_eq!(store.latest_task("GW2").unwrap().unwrap().id, 2);
        assert_eq!(store.active_task_ids().unwrap(), vec![1, 2]);

        // GW1's task ends: still its latest, no longer active
        let mut done = sample_task(1, "GW1");
        done.status = TaskStatus::Completed;
        store.update_task(&sample_task(1, "GW1"), &done).unwrap();
        assert!(store.active_task("GW1").unwrap().is_none());
        assert_eq!(store.latest_task("GW1").unwrap().unwrap().id, 1);
        // a newer task for GW2 replaces the older one as latest and active
        store.put_task(&sample_task(5, "GW2")).unwrap();
        assert_eq!(store.active_task("GW2").unwrap().unwrap().id, 5);
        assert_eq!(store.active_task_ids().unwrap(), vec![5]);
        // rewriting an older task (its cancellation) does not move the device back to it
        let mut old = sample_task(2, "GW2");
        old.status = TaskStatus::Cancelled;
        store.put_task(&old).unwrap();
        assert_eq!(store.latest_task("GW2").unwrap().unwrap().id, 5);
        assert_eq!(store.active_task_ids().unwrap(), vec![5]);
        // a record written as JSON by an earlier version is indexed too
        let legacy = sample_task(9, "GW9");
        store
            .engine()
            .unwrap()
            .tasks
            .insert(9u64.to_be_bytes(), serde_json::to_vec(&legacy).unwrap())
            .unwrap();
        store.flush().await.unwrap();
        drop(store);

        let store = reopen(dir.path());
        assert!(
            !store
                .engine()
                .unwrap()
                .db
                .tree_names()
                .iter()
                .any(|n| n == b"active_tasks")
        );
        assert_eq!(
            store.latest_task("GW1").unwrap().unwrap().status,
            TaskStatus::Completed
        );
        assert!(store.active_task("GW1").unwrap().is_none());
        assert_eq!(store.latest_task("GW2").unwrap().unwrap().id, 5);
        assert_eq!(store.active_task("GW9").unwrap().unwrap(), legacy);
        assert_eq!(store.active_task_ids().unwrap(), vec![5, 9]);
    }

    #[tokio::test]
    async fn queued_members_expand_and_member_records_win() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .put_queued_members(&QueuedMembers {
                schema: CAMPAIGN_SCHEMA,
                campaign_id: "c1".into(),
                queued_at_ms: 5,
                devices: vec![("GW3".into(), 1), ("GW1".into(), 0)],
            })
            .unwrap();
        let mut moved = store.list_members("c1").unwrap().remove(1);
        assert_eq!((moved.device_id.as_str(), moved.wave), ("GW3", 1));
        moved.status = MemberStatus::InFlight;
        moved.task_id = Some(9);
        let mut joined = moved.clone();
        joined.device_id = "GW2".into();
        store.put_members(&[moved.clone(), joined]).unwrap();
        let all = store.list_members("c1").unwrap();
        let ids: Vec<&str> = all.iter().map(|m| m.device_id.as_str()).collect();
        assert_eq!(ids, ["GW1", "GW2", "GW3"], "device-id order");
        assert_eq!(all[0].status, MemberStatus::Queued);
        assert_eq!(all[0].updated_at_ms, 5);
        assert_eq!(all[2], moved, "the member record replaces the queued entry");
        assert!(store.list_members("c2").unwrap().is_empty());
    }

    #[test]
    fn task_head_is_the_leading_fields_of_a_task() {
        let mut t = sample_task(42, "GW42");
        t.status = TaskStatus::Verifying;
        let bytes = encode(&t);
        let head: TaskHead<'_> = postcard::from_bytes(&bytes[1..]).unwrap();
        assert_eq!(
            (head.schema, head.id, &*head.device_id, head.status),
            (t.schema, 42, "GW42", TaskStatus::Verifying)
        );
    }
}
/// The task indexes rebuilt from a store of many tasks (10,000 here; `HANGAR_INDEX_TASKS` sets
/// another count). With `--nocapture` it prints how long the open and the rebuild took — the
/// figure in BENCHMARKS.md: `HANGAR_INDEX_TASKS=100000 cargo test --release --lib
/// indexes_are_rebuilt_for_a_large_store -- --nocapture`. It checks the result, not the speed.
#[cfg(test)]
mod large {
    #[test]
    fn indexes_are_rebuilt_for_a_large_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::Store::open(dir.path()).unwrap();
        let n: u64 = std::env::var("HANGAR_INDEX_TASKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        let devices = (n / 10).max(1);
        let recs: Vec<_> = (1..=n)
            .map(|i| super::sample_task(i, &format!("GW{}", i % devices)))
            .collect();
        for c in recs.chunks(1000) {
            store.put_new_tasks(c).unwrap();
        }
        store.flush_blocking().unwrap();
        drop(store);
        let t = std::time::Instant::now();
        let store = super::reopen(dir.path());
        eprintln!("open with {n} tasks: {:?}", t.elapsed());
        let t = std::time::Instant::now();
        let _ = super::TaskIndex::build(&store.engine().unwrap().tasks).unwrap();
        eprintln!("index rebuild alone: {:?}", t.elapsed());
        // every device's newest task is the active one, older ones are not
        let active = store.active_task_ids().unwrap();
        assert_eq!(active.len() as u64, devices);
        assert!(
            active.iter().all(|&id| id > n - devices),
            "{:?}",
            &active[..3]
        );
        assert_eq!(
            store.latest_task("GW1").unwrap().unwrap().id,
            n - devices + 1
        );
    }
}
