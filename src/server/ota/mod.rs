//! Upgrade tasks as pure cores and their driver: [`state`] (the task state machine), [`reports`]
//! (what a device report means), [`commands`] (what a command looks like) decide; [`Ota`]
//! drives them, and counts in [`counters`]. It creates tasks and
//! sends commands through the broker, ingests device reports in batches (one store flush per
//! batch, and only then the devices' PUBACKs), re-sends a pending command when its device
//! subscribes again, answers Alibaba `firmware/get`, and fails stalled tasks with `TIMEOUT`.
//! Every task read-modify-write runs under one lock, so API calls and reports never race.

pub mod commands;
pub mod counters;
pub mod reports;
pub mod settling;
pub mod state;

use crate::server::store::TaskDelta;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ids;
use crate::protocol::alibaba;
use crate::ratelog::RateLog;
use crate::server::broker::{DeviceLink, InboundMessage, Presence};
use crate::server::firmware::{FirmwareError, FirmwareService};
use crate::server::links::Group;
use crate::server::registry::{DeviceError, Devices};
use crate::server::store::{
    Durable, FirmwareRecord, FirmwareStatus, Store, StoreError, TASK_SCHEMA, TaskRecord, TaskStatus,
};
use crate::time::{now_ms, now_secs};
use counters::{Dropped, ReportCounters, Used};
use reports::Report;
use settling::Settling;
use state::{Input, Outcome, Why};

static SEND_LOG: RateLog = RateLog::new();

/// Why a task operation failed: the one service error ([`crate::server::error::ServiceError`]).
pub type OtaError = crate::server::error::ServiceError;

/// Static settings of the service.
#[derive(Clone)]
pub struct OtaSettings {
    pub public_url: String,
    pub topic_prefix: String,
    pub stall_timeout: Duration,
    pub reboot_grace: Duration,
    pub allow_anonymous: bool,
}

/// The task engine.
pub struct Ota {
    store: Store,
    devices: Arc<Devices>,
    firmware: Arc<FirmwareService>,
    deltas: Arc<crate::server::deltas::Deltas>,
    broker: DeviceLink,
    links: Arc<crate::server::links::Links>,
    settings: OtaSettings,
    lock: tokio::sync::Mutex<()>,
    /// What became of device reports since the start.
    pub reports: ReportCounters,
    settling: std::sync::Mutex<Settling>,
    /// A task ended or a completion was confirmed since the last flush ([`Ota::ended`]).
    task_ended: std::sync::atomic::AtomicBool,
    /// Notified once such a change is on disk: the campaign engine looks then.
    ended: Arc<tokio::sync::Notify>,
    commands_sent: AtomicU64,
    /// When [`Ota::spawn`] ran (ms since the epoch): it moves every active task's last
    /// activity to then, so a device that subscribed before is re-sent its command anyway.
    started_ms: std::sync::atomic::AtomicI64,
    /// Downloads under way per task, ended when their task is cancelled.
    transfers: Arc<crate::server::traffic::Transfers>,
}

static DROP_LOG: RateLog = RateLog::new();

fn new_msg_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = [0u8; 6];
    rand::fill(&mut r);
    let tail: String = r
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    format!("ota_{}_{tail}", now_ms())
}

/// A cancelled task and what could be done about its device.
#[derive(Debug, Clone)]
pub struct Cancelled {
    /// The task, as stored.
    pub task: TaskRecord,
    /// The device was sent a cancel message (the gateway protocol has one; Alibaba's has not,
    /// and a device not listening gets none).
    pub told: bool,
    /// Downloads of its image that were under way and were ended.
    pub transfers_cut: usize,
}

/// Statistics of a set of tasks.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub active: u64,
    pub success_rate: f64,
    pub failure_rate: f64,
    pub avg_duration_secs: Option<f64>,
    duration_sum_ms: i64,
}

impl Stats {
    fn add(&mut self, t: &TaskRecord) {
        if t.status.is_active() {
            self.total += 1;
            self.active += 1;
        } else {
            let mut c = crate::server::store::TaskCounts::default();
            c.add(t);
            self.merge(&c);
        }
    }

    /// Adds tasks counted in the archive (all finished).
    fn merge(&mut self, c: &crate::server::store::TaskCounts) {
        self.total += c.total;
        self.completed += c.completed;
        self.failed += c.failed;
        self.cancelled += c.cancelled;
        self.duration_sum_ms += c.duration_sum_ms;
    }

    fn finish(mut self) -> Self {
        if self.total > 0 {
            let pct = |n: u64| ((n as f64) * 10_000.0 / self.total as f64).round() / 100.0;
            self.success_rate = pct(self.completed);
            self.failure_rate = pct(self.failed);
        }
        if self.completed > 0 {
            self.avg_duration_secs = Some(
                ((self.duration_sum_ms as f64) / self.completed as f64 / 10.0).round() / 100.0,
            );
        }
        self
    }
}

/// `GET /api/ota/statistics`
#[derive(Debug)]
pub struct Statistics {
    pub all: Stats,
    pub by_version: BTreeMap<String, Stats>,
    pub by_campaign: BTreeMap<String, Stats>,
    pub devices: usize,
    pub online_devices: usize,
    pub reports: counters::ReportCounts,
}

/// One chunk of [`Ota::create_upgrades_of`]: a result per device, and whether its command
/// goes out once the chunk is durable.
struct Chunk {
    results: Vec<Result<TaskRecord, OtaError>>,
    send: Vec<bool>,
}

/// What every task of one [`Ota::create_upgrades_of`] call shares, and what it has seen so far.
struct Batch<'a> {
    ask: &'a Upgrade,
    /// Released firmware by device type, read once.
    firmware: BTreeMap<String, FirmwareRecord>,
    /// Devices given a task by this call (a device listed twice is refused).
    seen: std::collections::HashSet<String>,
}

/// What an upgrade asks for: the target version and how insistently.
#[derive(Debug, Clone, Default)]
pub struct Upgrade {
    /// Target version (released).
    pub version: String,
    /// Replace an active task (cancelled), and reinstall the version the device runs.
    pub force: bool,
    /// Install a version older than the device runs.
    pub allow_downgrade: bool,
    /// The campaign on whose behalf (the task carries its id).
    pub campaign_id: Option<String>,
}

/// A batch of reports [`Ota::ingest`] has stored (not yet flushed).
struct Handled {
    /// The devices' PUBACKs, released after the flush.
    done: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Every report of the batch was stored.
    ok: bool,
    /// Replies to publish after the flush.
    out: Vec<(String, Vec<u8>)>,
    /// Tasks whose command goes out (again) after the flush.
    sends: Vec<u64>,
}

/// Filters of the task list.
#[derive(Debug, Default, Clone)]
pub struct TaskFilter {
    pub device_id: Option<String>,
    pub status: Option<TaskStatus>,
    pub campaign_id: Option<String>,
}

impl TaskFilter {
    /// Whether `t` passes.
    pub fn matches(&self, t: &TaskRecord) -> bool {
        self.device_id.as_ref().is_none_or(|d| &t.device_id == d)
            && self.status.is_none_or(|s| t.status == s)
            && self
                .campaign_id
                .as_ref()
                .is_none_or(|c| t.campaign_id.as_ref() == Some(c))
    }
}

impl Ota {
    /// The engine; call [`Ota::spawn`] to start its workers.
    pub fn new(
        store: Store,
        devices: Arc<Devices>,
        firmware: Arc<FirmwareService>,
        deltas: Arc<crate::server::deltas::Deltas>,
        broker: DeviceLink,
        links: Arc<crate::server::links::Links>,
        settings: OtaSettings,
    ) -> Ota {
        Ota {
            store,
            devices,
            firmware,
            deltas,
            broker,
            links,
            settings,
            lock: tokio::sync::Mutex::new(()),
            reports: ReportCounters::default(),
            settling: Default::default(),
            task_ended: Default::default(),
            ended: Default::default(),
            commands_sent: AtomicU64::new(0),
            started_ms: std::sync::atomic::AtomicI64::new(0),
            transfers: Default::default(),
        }
    }

    /// Downloads of task images under way.
    pub fn transfers(&self) -> &Arc<crate::server::traffic::Transfers> {
        &self.transfers
    }

    /// Why a download whose URL is bound to task `id` is refused now, if it is: the task was
    /// cancelled (an operator, the emergency brake), so its device must not get the image by
    /// that URL any more, a resume by Range included.
    pub fn download_refusal(&self, id: u64) -> Option<String> {
        let t = self.store.get_task(id).ok().flatten()?;
        (t.status == TaskStatus::Cancelled).then(|| {
            format!(
                "upgrade task {id} of {} was cancelled ({}): its download URL is revoked",
                t.device_id,
                t.error_message.as_deref().unwrap_or("by an operator")
            )
        })
    }

    /// Starts the ingest, presence and stall workers on `tracker`.
    pub fn spawn(
        self: &Arc<Self>,
        messages: mpsc::Receiver<InboundMessage>,
        presence: mpsc::UnboundedReceiver<Presence>,
        shutdown: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Result<(), StoreError> {
        // A restart is not the devices' fault: give every active task a fresh stall window.
        let now = now_ms();
        self.started_ms.store(now, Ordering::SeqCst);
        for id in self.store.active_task_ids()? {
            if let Some(mut t) = self.store.get_task(id)? {
                t.last_activity_ms = t.last_activity_ms.max(now);
                self.store.put_task(&t)?;
            }
        }
        self.store.flush_blocking()?;
        tracker.spawn(self.clone().ingest(messages, shutdown.clone()));
        tracker.spawn(self.clone().presence(presence, shutdown.clone()));
        tracker.spawn(self.clone().stall_sweeper(shutdown));
        Ok(())
    }

    /// The download URL of an image for task `task`: signed, and bound to the task, so it
    /// stops working when the task is cancelled; on the download edge of the device's group
    /// when there is one that is up ([`crate::server::links`]).
    fn signed_url(&self, file_name: &str, task: u64, group: Option<Group<'_>>) -> String {
        self.signed_path(&format!("/firmware/{file_name}"), task, group)
    }

    fn signed_path(&self, path: &str, task: u64, group: Option<Group<'_>>) -> String {
        self.links.url(path, task, group, now_secs())
    }

    /// The delta a command may offer: a ready patch from exactly the version the device reports,
    /// to a device that declared bsdiff40 (SPEC 4.1). Never waits for one to be built.
    fn delta_for(
        &self,
        task: u64,
        group: Option<Group<'_>>,
        device_type: &str,
        from: Option<&str>,
        to: &str,
        accepts: bool,
    ) -> Option<TaskDelta> {
        if !accepts {
            return None;
        }
        let d = self.deltas.offer(device_type, from?, to)?;
        Some(TaskDelta {
            url: self.signed_path(&crate::server::deltas::url_path(&d), task, group),
            from_version: d.from_version,
            md5: d.md5?,
            size: d.size?,
        })
    }

    /// Creates a task for `device_id` to `version` and sends the command if the device listens;
    /// returns once the task is on disk.
    pub async fn create_upgrade(
        &self,
        device_id: &str,
        ask: &Upgrade,
    ) -> Result<Durable<TaskRecord>, OtaError> {
        let device = self.devices.get(device_id);
        self.create_upgrades_of(vec![device], ask)
            .await?
            .map(|mut r| r.pop().expect("one result per device"))
            .transpose()
    }

    /// Checks that the firmware a new task for `device` needs is released (cached per type).
    fn upgrade_inputs(
        &self,
        device: &crate::server::store::DeviceRecord,
        version: &str,
        firmware: &mut BTreeMap<String, FirmwareRecord>,
    ) -> Result<(), OtaError> {
        if !firmware.contains_key(&device.device_type) {
            let fw = match self.firmware.get(&device.device_type, version) {
                Ok(f) => f,
                Err(FirmwareError::NotFound(_)) => {
                    return Err(OtaError::Conflict(format!(
                        "firmware {version} for device type {} does not exist: upload and release it first",
                        device.device_type
                    )));
                }
                Err(e) => return Err(e),
            };
            firmware.insert(device.device_type.clone(), fw);
        }
        let fw = &firmware[&device.device_type];
        if fw.status != FirmwareStatus::Released {
            return Err(OtaError::Conflict(format!(
                "firmware {version} for device type {} is {}, not released: release it first",
                device.device_type,
                fw.status.as_str()
            )));
        }
        Ok(())
    }

    /// Creates one task per device (read by the caller, or the error of reading it, returned
    /// in its place) to `version` and sends the commands to the devices that listen. Tasks are written in chunks (one atomic batch each: 250 first, then 1,000) and a
    /// chunk's commands go out as soon as a group-committed flush has made it durable; chunks
    /// are built while earlier ones flush, so devices start on their upgrade while later
    /// chunks are written. A task whose device listens is stored
    /// already marked "command sent" (startTime), so the command costs no second write; its
    /// startTime precedes delivery by the flush, and if the device vanished in those
    /// milliseconds the command goes out when it subscribes again (the task is still pending).
    /// Per-device refusals (unknown device, firmware not released, an active task without
    /// `force`) come back in place; the outer error is the store failing.
    pub async fn create_upgrades_of(
        &self,
        devices: Vec<Result<crate::server::store::DeviceRecord, OtaError>>,
        ask: &Upgrade,
    ) -> Result<Durable<Vec<Result<TaskRecord, OtaError>>>, OtaError> {
        let version = ask.version.as_str();
        const FIRST_CHUNK: usize = 250;
        const CHUNK: usize = 1000;
        if !ids::valid_version(version) {
            let e = || {
                OtaError::Invalid(format!(
                    "version {version:?} must match [0-9A-Za-z.+-]{{1,64}}"
                ))
            };
            return Ok(self
                .store
                .durable(devices.iter().map(|_| Err(e())).collect())
                .await?);
        }
        let mut batch = Batch {
            ask,
            firmware: BTreeMap::new(),
            seen: std::collections::HashSet::new(),
        };
        let total = devices.len();
        // The first chunk is small so the first devices start at once; the rest go 1,000 at a
        // time.
        let mut devices = devices.into_iter().peekable();
        let mut size = FIRST_CHUNK;
        let chunks = std::iter::from_fn(move || {
            devices.peek()?;
            let c: Vec<_> = devices.by_ref().take(size).collect();
            size = CHUNK;
            Some(c)
        });
        // Two halves run at once: one builds and writes chunks, the other makes what was written
        // durable and sends its commands. A flush covers every chunk written before it started,
        // so while one runs the builder goes on, and the next flush takes all it wrote meanwhile.
        let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
        let build = async move {
            for chunk in chunks {
                let c = self.write_chunk(chunk, &mut batch).await?;
                if tx.send(c).is_err() {
                    break; // the other half failed; its error is returned
                }
            }
            Ok::<_, OtaError>(())
        };
        let publish = async {
            let mut results = Vec::with_capacity(total);
            let mut flushed = None;
            while let Some(first) = rx.recv().await {
                let mut written = vec![first];
                while let Ok(c) = rx.try_recv() {
                    written.push(c);
                }
                flushed = Some(self.store.durable(()).await?);
                for c in written {
                    for t in c.results.iter().flatten() {
                        tracing::info!(device = %t.device_id, task = t.id, version = %version, "upgrade task created");
                    }
                    // Durable: tell the devices that listen.
                    for (r, send) in c.results.iter().zip(&c.send) {
                        if let (Ok(t), true) = (r, send) {
                            self.publish_command(t).await;
                        }
                    }
                    results.extend(c.results);
                }
            }
            // the last flush covers every chunk
            Ok::<_, OtaError>(match flushed {
                Some(d) => d.map(|()| results),
                None => self.store.durable(results).await?,
            })
        };
        let (built, published) = tokio::join!(build, publish);
        let results = published?;
        built?;
        Ok(results)
    }

    /// Builds the tasks of one chunk of [`Ota::create_upgrades_of`] and writes them (not
    /// flushed), under the lock.
    async fn write_chunk(
        &self,
        chunk: Vec<Result<crate::server::store::DeviceRecord, OtaError>>,
        batch: &mut Batch<'_>,
    ) -> Result<Chunk, OtaError> {
        let _g = self.lock.lock().await;
        let mut c = Chunk {
            results: Vec::with_capacity(chunk.len()),
            send: Vec::with_capacity(chunk.len()),
        };
        for device in chunk {
            let mut send = false;
            match self.new_task_for(device, batch) {
                Ok(mut t) => {
                    if self.devices.ready(&t.device_id)
                        && let Outcome::Changed(n) = state::apply(&t, &Input::CommandSent, now_ms())
                    {
                        t = n;
                        send = true;
                    }
                    c.results.push(Ok(t));
                }
                Err(OtaError::Store(e)) => return Err(e.into()),
                Err(e) => c.results.push(Err(e)),
            }
            c.send.push(send);
        }
        // on the blocking pool: ~10 ms of sled work, and the other half of
        // create_upgrades_of gets to run meanwhile
        let store = self.store.clone();
        let c = tokio::task::spawn_blocking(move || {
            store.put_new_tasks(c.results.iter().flatten()).map(|_| c)
        })
        .await
        .map_err(|e| StoreError::Engine(format!("task write: {e}")))??;
        Ok(c)
    }

    /// A new task (not stored) for one device of a batch, after the checks of
    /// [`Ota::create_upgrades_of`]; cancels a replaced active task when forced. Call under the
    /// lock.
    fn new_task_for(
        &self,
        device: Result<crate::server::store::DeviceRecord, OtaError>,
        batch: &mut Batch<'_>,
    ) -> Result<TaskRecord, OtaError> {
        let device = device?;
        let device_id = device.id.as_str();
        let ask = batch.ask;
        self.upgrade_inputs(&device, &ask.version, &mut batch.firmware)?;
        if let Some(running) = device.firmware_version.as_deref() {
            let order = ids::compare_versions(&ask.version, running);
            if order.is_eq() && !ask.force {
                return Err(OtaError::Conflict(format!(
                    "device {device_id} already runs {running}: pass force to install it again"
                )));
            }
            if order.is_lt() && !ask.allow_downgrade {
                return Err(OtaError::Conflict(format!(
                    "device {device_id} runs {running}, newer than {}: pass allowDowngrade (a campaign: force) to go back",
                    ask.version
                )));
            }
        }
        if !batch.seen.insert(device.id.clone()) {
            return Err(OtaError::Conflict(format!(
                "device {device_id} is listed twice"
            )));
        }
        if let Some(active) = self.store.active_task(device_id)? {
            if !ask.force {
                return Err(OtaError::Conflict(format!(
                    "device {device_id} already has an active task ({} to {}, {}): wait, cancel it, or pass force",
                    active.from_version.as_deref().unwrap_or("?"),
                    active.to_version,
                    active.status.as_str()
                )));
            }
            if let Outcome::Changed(t) = state::apply(
                &active,
                &Input::Cancel {
                    reason: "replaced by a forced upgrade".into(),
                },
                now_ms(),
            ) {
                self.store.put_task(&t)?;
            }
        }
        let mut t = self.new_task(&device, &batch.firmware[&device.device_type], ask.force)?;
        t.campaign_id = ask.campaign_id.clone();
        Ok(t)
    }

    fn new_task(
        &self,
        device: &crate::server::store::DeviceRecord,
        fw: &FirmwareRecord,
        force: bool,
    ) -> Result<TaskRecord, OtaError> {
        let (device_id, protocol, device_type) = (&device.id, device.protocol, &device.device_type);
        let from = device.firmware_version.clone();
        let group = Some(Group {
            device_type,
            tags: &device.tags,
        });
        let now = now_ms();
        let id = self.store.next_task_id()?;
        let accepts = device
            .delta_formats
            .iter()
            .any(|f| f == crate::bsdiff::FORMAT);
        let delta = self.delta_for(
            id,
            group,
            device_type,
            from.as_deref(),
            &fw.version,
            accepts,
        );
        Ok(TaskRecord {
            schema: TASK_SCHEMA,
            id,
            device_id: device_id.to_string(),
            protocol,
            device_type: device_type.to_string(),
            from_version: from,
            to_version: fw.version.clone(),
            firmware_url: self.signed_url(
                &ids::firmware_file_name(&fw.device_type, &fw.version),
                id,
                group,
            ),
            md5: fw.md5.clone(),
            sha256: fw.sha256.clone(),
            file_size: fw.size,
            msg_id: new_msg_id(),
            status: TaskStatus::Pending,
            progress: 0,
            error_code: None,
            error_message: None,
            campaign_id: None,
            delta,
            force: force || fw.force_upgrade,
            start_time_ms: None,
            complete_time_ms: None,
            last_activity_ms: now,
            created_at_ms: now,
            updated_at_ms: now,
            events: vec![crate::server::store::TaskEvent {
                at_ms: now,
                status: TaskStatus::Pending,
                progress: 0,
                note: "created".into(),
            }],
        })
    }

    /// Publishes a task's command (with a freshly signed URL) and records it as sent. A device
    /// that stopped listening gets it when it subscribes again.
    async fn send_command(&self, task_id: u64) -> Result<TaskRecord, OtaError> {
        let g = self.lock.lock().await;
        let Some(mut t) = self.store.get_task(task_id)? else {
            return Err(OtaError::NotFound(format!("task {task_id} vanished")));
        };
        if !t.status.is_active() {
            return Ok(t);
        }
        // the device's tags choose its download edge (read only when edges are configured)
        let tags = if self.links.has_edges() {
            self.devices
                .get(&t.device_id)
                .map(|d| d.tags)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let group = Some(Group {
            device_type: &t.device_type,
            tags: &tags,
        });
        t.firmware_url = self.signed_url(
            &ids::firmware_file_name(&t.device_type, &t.to_version),
            t.id,
            group,
        );
        if t.delta.is_some() {
            // re-signed, and dropped if the patch was withdrawn meanwhile
            t.delta = self.delta_for(
                t.id,
                group,
                &t.device_type,
                t.from_version.as_deref(),
                &t.to_version,
                true,
            );
        }
        if !self.publish_command(&t).await {
            return Ok(t);
        }
        if let Outcome::Changed(n) = state::apply(&t, &Input::CommandSent, now_ms()) {
            t = n;
            self.store.put_task(&t)?;
            drop(g);
            self.store.flush().await?;
        }
        Ok(t)
    }

    /// Publishes a task's command; false (logged at most once a second) if it did not go out —
    /// the device gets it when it subscribes again.
    async fn publish_command(&self, t: &TaskRecord) -> bool {
        let signature = self.firmware.signature_text(&t.device_type, &t.to_version);
        let (topic, payload) =
            commands::upgrade(&self.settings.topic_prefix, t, signature, now_ms());
        match self.broker.publish(topic, payload).await {
            Ok(()) => {
                self.commands_sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                if let Some(suppressed) = SEND_LOG.admit() {
                    tracing::warn!(
                        device = %t.device_id,
                        task = t.id,
                        error = %e,
                        suppressed,
                        "command not sent; it is re-sent when the device subscribes again"
                    );
                }
                false
            }
        }
    }

    /// Cancels the device's active task.
    pub async fn cancel(
        &self,
        device_id: &str,
        reason: &str,
    ) -> Result<Durable<Cancelled>, OtaError> {
        self.devices.get(device_id)?;
        let t = {
            let _g = self.lock.lock().await;
            let Some(active) = self.store.active_task(device_id)? else {
                return Err(OtaError::Conflict(format!(
                    "device {device_id} has no active task to cancel"
                )));
            };
            let Outcome::Changed(t) = state::apply(
                &active,
                &Input::Cancel {
                    reason: reason.into(),
                },
                now_ms(),
            ) else {
                return Err(OtaError::Conflict(format!(
                    "the task of {device_id} already finished"
                )));
            };
            self.store.put_task(&t)?;
            t
        };
        let done = self.store.durable(t).await?;
        let t = &*done;
        // its URLs are refused from now on (the task is stored cancelled); a transfer under
        // way ends here
        let cut = self.transfers.stop(t.id);
        let told = match commands::cancel(&self.settings.topic_prefix, t, reason, now_ms()) {
            Some((topic, payload)) => self.broker.publish(topic, payload).await.is_ok(),
            None => false,
        };
        if !told {
            tracing::info!(device = %t.device_id, task = t.id, transfers_cut = cut, "task cancelled; its device could not be told (no cancel message in its protocol, or not listening): its download URLs are revoked");
        }
        Ok(done.map(|task| Cancelled {
            task,
            told,
            transfers_cut: cut,
        }))
    }

    /// The device's newest task.
    pub fn latest_task(&self, device_id: &str) -> Result<TaskRecord, OtaError> {
        if !ids::valid_device_id(device_id) {
            return Err(OtaError::Invalid(format!(
                "device id {device_id:?} is not valid"
            )));
        }
        self.store
            .latest_task(device_id)?
            .ok_or_else(|| OtaError::NotFound(format!("device {device_id} has no task")))
    }

    /// Tasks newest first: one page, and how many match in all.
    pub fn list_tasks(
        &self,
        f: &TaskFilter,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<TaskRecord>, usize), OtaError> {
        Ok(self.store.list_tasks(|t| f.matches(t), limit, offset)?)
    }

    /// Holds this service's write lock (backups take a consistent snapshot under it).
    pub async fn quiesce(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Commands published to devices since the start.
    pub fn commands_sent(&self) -> u64 {
        self.commands_sent.load(Ordering::Relaxed)
    }

    /// Totals and per-version figures: the tasks in the store (read one at a time) and those
    /// moved to the task archive (counted when they moved).
    pub fn statistics(&self) -> Result<Statistics, OtaError> {
        let mut all = Stats::default();
        let mut by_version: BTreeMap<String, Stats> = BTreeMap::new();
        let mut by_campaign: BTreeMap<String, Stats> = BTreeMap::new();
        self.store.each_task(|t| {
            all.add(&t);
            by_version.entry(t.to_version.clone()).or_default().add(&t);
            if let Some(c) = &t.campaign_id {
                by_campaign.entry(c.clone()).or_default().add(&t);
            }
            Ok::<(), OtaError>(())
        })?;
        let archived = self.store.task_archive()?;
        all.merge(&archived.all);
        for (v, c) in &archived.by_version {
            by_version.entry(v.clone()).or_default().merge(c);
        }
        for (id, c) in &archived.by_campaign {
            by_campaign.entry(id.clone()).or_default().merge(c);
        }
        Ok(Statistics {
            all: all.finish(),
            by_version: by_version
                .into_iter()
                .map(|(k, v)| (k, v.finish()))
                .collect(),
            by_campaign: by_campaign
                .into_iter()
                .map(|(k, v)| (k, v.finish()))
                .collect(),
            devices: self.devices.list()?.len(),
            online_devices: self.devices.online_count(),
            reports: self.reports.snapshot(),
        })
    }

    /// Counts and logs (at most once a second) a report dropped for `why`.
    fn drop_report(&self, device: &str, why: Dropped, detail: &str) {
        self.reports.dropped(device, why);
        if let Some(suppressed) = DROP_LOG.admit() {
            tracing::warn!(
                device,
                reason = why.key(),
                why = why.says(),
                detail,
                suppressed,
                "dropped a report"
            );
        }
    }

    /// Notified when tasks ended or were confirmed, once that is on disk (after the flush):
    /// the campaign engine waits on it rather than only on its timer.
    pub fn ended(&self) -> Arc<tokio::sync::Notify> {
        self.ended.clone()
    }

    /// After a flush: tells [`Ota::ended`]'s waiters if a task ended meanwhile.
    fn announce_ended(&self) {
        if self.task_ended.swap(false, Ordering::SeqCst) {
            self.ended.notify_one();
        }
    }

    /// Applies an input to a task and persists the result (no flush). A task that completes
    /// also sets its device's version to the target: a gateway that never sends a heartbeat
    /// (the tutorial's) shows the version it now runs.
    fn apply_and_put(&self, t: &TaskRecord, input: &Input) -> Result<Outcome, StoreError> {
        let o = state::apply(t, input, now_ms());
        match &o {
            // A report that changes nothing but liveness, in a transfer, when the stored
            // liveness is recent: not written again (a gateway repeating its progress would
            // otherwise rewrite the whole task, history included, many times a second).
            Outcome::Touched(n)
                if t.status != TaskStatus::Pending
                    && n.last_activity_ms - t.last_activity_ms < self.touch_interval_ms() => {}
            Outcome::Changed(n) | Outcome::Touched(n) | Outcome::Resend(n) => {
                self.store.update_task(t, n)?;
                // it ended, or its end changed (rolled back, or back from a rollback)
                if !n.status.is_active() && n.status != t.status {
                    self.task_ended.store(true, Ordering::SeqCst);
                }
                if n.status == TaskStatus::Completed && t.status != TaskStatus::Completed {
                    self.devices.note_version(&n.device_id, &n.to_version)?;
                } else if t.status.is_active() && !n.status.is_active() {
                    // failed or cancelled: it runs what its reports said
                    self.devices.store_reported(&n.device_id)?;
                }
            }
            Outcome::Ignored(why) => {
                tracing::debug!(task = t.id, why = why.as_str(), "input ignored");
            }
        }
        Ok(o)
    }

    /// How stale a transferring task's stored liveness may get before a report that changes
    /// nothing else is written: a tenth of the stall timeout, at most 5 s.
    fn touch_interval_ms(&self) -> i64 {
        (self.settings.stall_timeout.as_millis() as i64 / 10).min(5_000)
    }

    /// When a device that reported its old version after installing `t` has had time to boot
    /// the new image: the reboot grace after the install ended and after its newest connection
    /// (after a reconnect a gateway first delivers "completed", then announces the version it
    /// runs until it reboots).
    fn boot_deadline(&self, t: &TaskRecord) -> i64 {
        let installed = t.complete_time_ms.unwrap_or(t.updated_at_ms);
        let connected = self.devices.connected_ms(&t.device_id).unwrap_or(0);
        installed.max(connected) + self.settings.reboot_grace.as_millis() as i64
    }

    /// Applies the version a device says it runs to its newest task: completes it, confirms a
    /// completed one, or — the old version — rolls it back once the device has had time to
    /// boot the new image, and until then keeps it as a suspicion for the sweeper to decide.
    fn apply_version(&self, t: &TaskRecord, version: String) -> Result<(), StoreError> {
        let deadline = self.boot_deadline(t);
        let settled = now_ms() >= deadline;
        let o = self.apply_and_put(
            t,
            &Input::Version {
                version: version.clone(),
                settled,
            },
        )?;
        let mut s = self.settling.lock().expect("settling lock");
        match o {
            Outcome::Ignored(Why::RebootGrace) => s.suspect(t.id, deadline, version),
            // a confirmation is news for the campaign engine
            Outcome::Ignored(Why::Confirmed) if s.confirm(t.id) => {
                self.task_ended.store(true, Ordering::SeqCst);
            }
            Outcome::Changed(n) if n.status == TaskStatus::Completed => {
                s.confirm(t.id);
            }
            Outcome::Changed(n) if !n.status.is_active() => s.rolled_back(t.id),
            _ => {}
        }
        Ok(())
    }

    /// Whether a completed task's device has shown it runs the new image: it reported the
    /// target version since, or the reboot grace after completion passed with no sign of the
    /// old one. Campaigns count a member as succeeded only then.
    pub fn settled(&self, t: &TaskRecord, now: i64) -> bool {
        t.status == TaskStatus::Completed
            && self.settling.lock().expect("settling lock").settled(
                t.id,
                t.complete_time_ms.unwrap_or(t.updated_at_ms),
                self.settings.reboot_grace.as_millis() as i64,
                now,
            )
    }

    /// Rolls back every suspect whose grace ended without the device confirming (under the
    /// lock, no flush); returns whether anything changed.
    fn decide_suspects(&self, now: i64) -> Result<bool, StoreError> {
        let due = self.settling.lock().expect("settling lock").take_due(now);
        let mut changed = false;
        for (id, version) in due {
            let outcome = match self.store.get_task(id) {
                Ok(Some(t)) => self.apply_and_put(
                    &t,
                    &Input::Version {
                        version,
                        settled: true,
                    },
                ),
                Ok(None) => Ok(Outcome::Ignored(Why::Finished)),
                Err(e) => Err(e),
            };
            let rolled_back = matches!(outcome, Ok(Outcome::Changed(_)));
            (self.settling.lock().expect("settling lock")).decided(id, rolled_back);
            if let Outcome::Changed(n) = outcome? {
                tracing::warn!(device = %n.device_id, task = n.id, "rolled back: the device did not report the new version within tasks.reboot_grace_secs");
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Handles one report; persists without flushing. Replies to send after the flush are
    /// pushed to `out`, tasks whose command goes out again to `sends`. Every report from a
    /// registered device refreshes its `lastSeen`, also one that is then dropped.
    fn handle(
        &self,
        m: &InboundMessage,
        out: &mut Vec<(String, Vec<u8>)>,
        sends: &mut Vec<u64>,
    ) -> Result<(), StoreError> {
        let id = m.device_id.as_str();
        self.reports.received();
        self.devices.heard_from(id);
        match reports::interpret(&m.kind, &m.payload) {
            Report::Malformed(why) => {
                if self.devices_seen(m, None)? {
                    self.drop_report(id, Dropped::Malformed, &why);
                }
            }
            Report::Version {
                version,
                device_type,
                delta_formats,
            } => {
                let noted = self.devices_note(
                    m,
                    Some(&version),
                    device_type.as_deref(),
                    delta_formats.as_deref(),
                )?;
                if noted.is_some() {
                    self.reports.used(id, Used::Heartbeat);
                    if let Some(t) = self.store.latest_task(id)? {
                        self.apply_version(&t, version)?;
                    }
                }
            }
            Report::Progress {
                target,
                step,
                running,
            } => {
                if self.devices_seen(m, None)? {
                    self.progress(id, &target, &step, running.as_deref(), sends)?;
                }
            }
            Report::Get { request_id } => {
                if let Some(dev) = self.devices_note(m, None, None, None)? {
                    self.reports.used(id, Used::Request);
                    out.push(self.answer_get(&dev, request_id, sends)?);
                }
            }
        }
        Ok(())
    }

    /// A progress report of a known device: applied to the task it is for ([`reports::pick`]).
    /// While that task runs, `running` is the version the device runs.
    fn progress(
        &self,
        id: &str,
        target: &reports::Target,
        step: &reports::Step,
        running: Option<&str>,
        sends: &mut Vec<u64>,
    ) -> Result<(), StoreError> {
        let active = self.store.active_task(id)?;
        let (t, how) = match reports::pick(target, active, || self.store.latest_task(id))? {
            Ok(found) => found,
            Err((why, detail)) => {
                self.drop_report(id, why, &detail);
                return Ok(());
            }
        };
        if let Some(v) = running
            && t.status.is_active()
        {
            // in memory while the upgrade runs; stored when it ends (see apply_and_put)
            self.devices.note_running(id, v);
        }
        let t = match state::learn_from_version(&t, running) {
            Some(n) => {
                self.store.put_task(&n)?;
                n
            }
            None => t,
        };
        match self.apply_and_put(&t, &step.input())? {
            Outcome::Resend(_) => {
                self.reports.used(id, how);
                tracing::info!(device = %id, task = t.id, "delta failed on the device; falling back to the full image");
                sends.push(t.id);
            }
            Outcome::Changed(_) | Outcome::Touched(_) => self.reports.used(id, how),
            Outcome::Ignored(Why::Backwards) => {
                self.drop_report(id, Dropped::Backwards, "an earlier state or less progress")
            }
            Outcome::Ignored(_) => self.reports.used(id, Used::Repeat),
        }
        Ok(())
    }

    /// The reply to an Alibaba `firmware/get`: the device's active task (its command goes out
    /// too if it never did), or a new task to the newest release above the version it runs, or
    /// an empty `data`.
    fn answer_get(
        &self,
        dev: &crate::server::store::DeviceRecord,
        request_id: String,
        sends: &mut Vec<u64>,
    ) -> Result<(String, Vec<u8>), StoreError> {
        let id = dev.id.as_str();
        let mut data = serde_json::json!({});
        if let Some(t) = self.store.active_task(id)? {
            let signature = self.firmware.signature_text(&t.device_type, &t.to_version);
            data = serde_json::to_value(commands::alibaba_data(&t, signature)).expect("json");
            if t.start_time_ms.is_none() {
                sends.push(t.id);
            }
        } else if let Ok(fw) = self.firmware.latest(&dev.device_type)
            && dev
                .firmware_version
                .as_deref()
                .is_none_or(|v| ids::compare_versions(&fw.version, v).is_gt())
            && !self.braked(&fw.device_type, &fw.version)?
        {
            let t = self.new_task(dev, &fw, false).map_err(|e| match e {
                OtaError::Store(e) => e,
                other => StoreError::Engine(other.to_string()),
            })?;
            if let Outcome::Changed(t) = state::apply(&t, &Input::CommandSent, now_ms()) {
                self.store.put_task(&t)?;
                let signature = fw.signature.as_ref().map(|s| s.text.clone());
                data = serde_json::to_value(commands::alibaba_data(&t, signature)).expect("json");
            }
        }
        let (pk, dn) = id.split_once('/').unwrap_or((id, ""));
        let reply = alibaba::GetReply {
            code: 200,
            data,
            id: request_id,
        };
        Ok((
            alibaba::get_reply_topic(pk, dn),
            serde_json::to_vec(&reply).expect("json"),
        ))
    }

    /// Whether a version was stopped by an emergency brake: a campaign to it was braked and no
    /// campaign to it runs now. A device asking `firmware/get` is then not given it (the brake
    /// would otherwise be undone by every device that asks again, e.g. after reconnecting);
    /// a new campaign to it, or an upgrade of one device, still sends it.
    fn braked(&self, device_type: &str, version: &str) -> Result<bool, StoreError> {
        let mut braked = false;
        for c in self.store.list_campaigns()? {
            if c.device_type != device_type || c.version != version {
                continue;
            }
            if c.status.is_live() {
                return Ok(false);
            }
            braked |= c.brake.is_some();
        }
        Ok(braked)
    }

    /// [`Ota::devices_note`] for a report that says nothing about the device: false (counted)
    /// for an unknown device; no store access when the device was noted recently.
    fn devices_seen(&self, m: &InboundMessage, version: Option<&str>) -> Result<bool, StoreError> {
        if self.devices.seen_recently(&m.device_id, version) {
            return Ok(true);
        }
        Ok(self.devices_note(m, version, None, None)?.is_some())
    }

    fn devices_note(
        &self,
        m: &InboundMessage,
        version: Option<&str>,
        device_type: Option<&str>,
        formats: Option<&[String]>,
    ) -> Result<Option<crate::server::store::DeviceRecord>, StoreError> {
        let auto = !m.authenticated && self.settings.allow_anonymous;
        match self.devices.note_report(
            &m.device_id,
            m.protocol,
            version,
            device_type,
            formats,
            auto,
        ) {
            Ok(Some(d)) => Ok(Some(d)),
            Ok(None) => {
                self.drop_report(&m.device_id, Dropped::UnknownDevice, "not registered");
                Ok(None)
            }
            Err(DeviceError::Store(e)) => Err(e),
            Err(e) => {
                self.drop_report(&m.device_id, Dropped::UnknownDevice, &e.to_string());
                Ok(None)
            }
        }
    }

    /// Takes reports in batches: handles a batch under the lock (writes, no flush) and hands it
    /// to [`Ota::commit`], which releases its PUBACKs after a flush; the next batch is handled
    /// while that flush runs, and the flush after it covers every batch handled meanwhile.
    async fn ingest(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<InboundMessage>,
        shutdown: CancellationToken,
    ) {
        const BATCH: usize = 1024;
        let (tx, handled) = mpsc::unbounded_channel::<Handled>();
        let committer = tokio::spawn(self.clone().commit(handled));
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = rx.recv_many(&mut batch, BATCH) => n,
            };
            if n == 0 {
                break;
            }
            let mut h = Handled {
                done: Vec::with_capacity(n),
                ok: true,
                out: Vec::new(),
                sends: Vec::new(),
            };
            {
                let _g = self.lock.lock().await;
                for m in &batch {
                    // a span per report (debug level: free at the default filter, 50k a second)
                    let _span = tracing::debug_span!("report", device = %m.device_id).entered();
                    if let Err(e) = self.handle(m, &mut h.out, &mut h.sends) {
                        tracing::error!(error = %e, device = %m.device_id, "storing a report failed; the device will retry");
                        h.ok = false;
                        break;
                    }
                }
            }
            h.done.extend(batch.drain(..).filter_map(|m| m.done));
            if tx.send(h).is_err() {
                break;
            }
        }
        drop(tx);
        let _ = committer.await;
    }

    /// The second half of [`Ota::ingest`]: one flush for every batch handled so far, then their
    /// PUBACKs (only for batches stored whole), replies and re-sent commands.
    async fn commit(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Handled>) {
        let mut ready = Vec::new();
        while rx.recv_many(&mut ready, 64).await > 0 {
            let flushed = match self.store.flush().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "store flush failed; reports are not acknowledged");
                    false
                }
            };
            if flushed {
                self.announce_ended();
            }
            for h in ready.drain(..) {
                if flushed && h.ok {
                    for done in h.done {
                        let _ = done.send(());
                    }
                }
                for (topic, payload) in h.out {
                    let _ = self.broker.publish(topic, payload).await;
                }
                for id in h.sends {
                    let _ = self.send_command(id).await;
                }
            }
        }
    }

    /// The presence worker: connections, SUBACKs of command topics (Ready) and disconnects,
    /// in order, a batch of whatever is queued at a time. A batch with a Ready is handled under
    /// the task lock (taken once for the batch): a task being created right now either sees the
    /// device ready (and sends its command itself) or is in the store before the Ready looks
    /// (and is sent from here) — never neither.
    async fn presence(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Presence>,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(1024);
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = rx.recv_many(&mut batch, 1024) => n,
            };
            if n == 0 {
                return;
            }
            let locked = if batch.iter().any(|p| matches!(p, Presence::Ready { .. })) {
                Some(self.lock.lock().await)
            } else {
                None
            };
            let mut resend = Vec::new();
            for p in batch.drain(..) {
                if let Some(task) = self.on_presence(&p) {
                    resend.push((task, p));
                }
            }
            drop(locked);
            for (task, p) in resend {
                if let Err(e) = self.send_command(task).await {
                    let id = match &p {
                        Presence::Ready { id, .. } => id.as_str(),
                        _ => "",
                    };
                    tracing::warn!(device = %id, error = %e, "re-sending the command failed");
                }
            }
        }
    }

    /// One presence event; for a Ready, the task whose command goes out again, if any.
    fn on_presence(&self, p: &Presence) -> Option<u64> {
        let ready = self.devices.on_presence(p);
        match p {
            Presence::Connected {
                id,
                ip,
                protocol,
                anonymous,
            } => {
                tracing::debug!(device = %id, ip = %ip, "device connected");
                if *anonymous
                    && self.settings.allow_anonymous
                    && let Err(e) = self.devices.admit_anonymous(id, *protocol)
                {
                    tracing::warn!(device = %id, error = %e, "admitting an anonymous device failed");
                }
                // the site's broker does not say where a device connects from
                if !ip.is_empty()
                    && let Err(e) = self.devices.note_connected(id, ip)
                {
                    tracing::warn!(device = %id, error = %e, "recording the connection failed");
                }
                None
            }
            Presence::Ready { id, at_ms, .. } => match self.store.active_task(id) {
                Ok(Some(t))
                    if state::resend_on_ready(
                        &t,
                        ready,
                        *at_ms,
                        self.started_ms.load(Ordering::SeqCst),
                    ) =>
                {
                    Some(t.id)
                }
                _ => None,
            },
            Presence::Disconnected { .. } => None,
        }
    }

    async fn stall_sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        let timeout_ms = self.settings.stall_timeout.as_millis() as i64;
        let period = (self.settings.stall_timeout.min(self.settings.reboot_grace) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let _g = self.lock.lock().await;
            let mut changed = match self.decide_suspects(now_ms()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "deciding suspected rollbacks failed");
                    false
                }
            };
            for id in self.store.active_task_ids().unwrap_or_default() {
                let Ok(Some(t)) = self.store.get_task(id) else {
                    continue;
                };
                let dropped = self
                    .reports
                    .recent_drops(&t.device_id)
                    .map(|(n, why)| (n, why.says()));
                if let Outcome::Changed(n) = state::apply(
                    &t,
                    &Input::StallCheck {
                        timeout_ms,
                        dropped,
                    },
                    now_ms(),
                ) {
                    tracing::warn!(device = %n.device_id, task = n.id, "task failed: no report within tasks.stall_timeout_secs");
                    if self.store.put_task(&n).is_ok() {
                        changed = true;
                    }
                }
            }
            if changed {
                match self.store.flush().await {
                    Ok(()) => self.announce_ended(),
                    Err(e) => tracing::error!(error = %e, "flush after stall sweep failed"),
                }
            }
        }
    }
}
