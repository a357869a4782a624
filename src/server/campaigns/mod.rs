//! Campaigns: batch and canary rollouts in waves, with a success gate between waves, a failure
//! gate that pauses, `maxInFlight`, a start time and a daily window, forced upgrades, retries
//! with backoff, dynamic membership, and an emergency brake.
//!
//! Everything lives in the store (the campaign and one member record per device), and the engine
//! is a loop that re-derives what to do from it every second (or when woken): so after `kill -9`
//! a campaign continues where it was. A member is marked in flight only after its task was
//! created; if the process dies in between, the next round finds the device's active task
//! carrying this campaign's id and adopts it instead of sending a second command.
//!
//! Pure cores decide: [`spec`] (a spec checked into the record it creates), [`plan`] (the dry
//! run), [`round`] (one engine round), [`progress`] (where a campaign stands). [`Campaigns`]
//! gathers their facts from the store and the other services and writes what they decided.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[cfg(test)]
mod fixtures;
pub mod plan;
pub mod progress;
pub mod round;
pub mod spec;

pub use plan::Plan;
pub use spec::{CampaignSpec, in_window, next_window_opening};

use round::backoff_ms;

use crate::server::firmware::FirmwareService;
use crate::server::ota::{Ota, OtaError};
use crate::server::registry::Devices;
use crate::server::store::{
    CAMPAIGN_SCHEMA, CampaignMember, CampaignRecord, CampaignStatus, DeviceRecord, Durable,
    FirmwareStatus, MemberStatus, QueuedMembers, Store, StoreError,
};
use crate::time::now_ms;

/// Why a campaign request failed: the one service error ([`crate::server::error::ServiceError`]).
pub type CampaignError = crate::server::error::ServiceError;

/// The campaign engine.
pub struct Campaigns {
    store: Store,
    devices: Arc<Devices>,
    firmware: Arc<FirmwareService>,
    deltas: Arc<crate::server::deltas::Deltas>,
    ota: Arc<Ota>,
    wake: Notify,
    lock: tokio::sync::Mutex<()>,
    /// Engine rounds over every live campaign finished so far (what tests and operators wait
    /// for instead of a time: "two more rounds and it still did not start").
    rounds: std::sync::atomic::AtomicU64,
    /// Campaigns whose queued members this process has checked against their devices' latest
    /// tasks ([`Campaigns::members_now`]); rounds write the members they start themselves, so
    /// once is enough: for a task created just before a crash, whose member was not written.
    checked: std::sync::Mutex<HashSet<String>>,
    /// The devices a round is starting, by campaign, from before their tasks are created until
    /// their members are written: a view read in between looks those devices' tasks up (the
    /// tasks are visible before the members say so).
    starting: std::sync::Mutex<std::collections::HashMap<String, Arc<HashSet<String>>>>,
}

/// Takes a round's devices out of [`Campaigns::starting`] however the round ends.
struct Starting<'a> {
    engine: &'a Campaigns,
    campaign: String,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.engine
            .starting
            .lock()
            .expect("starting lock")
            .remove(&self.campaign);
    }
}

impl Campaigns {
    /// Creates the engine.
    pub fn new(
        store: Store,
        devices: Arc<Devices>,
        firmware: Arc<FirmwareService>,
        deltas: Arc<crate::server::deltas::Deltas>,
        ota: Arc<Ota>,
    ) -> Arc<Campaigns> {
        Arc::new(Campaigns {
            store,
            devices,
            firmware,
            deltas,
            ota,
            wake: Notify::new(),
            lock: tokio::sync::Mutex::new(()),
            rounds: std::sync::atomic::AtomicU64::new(0),
            checked: std::sync::Mutex::new(HashSet::new()),
            starting: Default::default(),
        })
    }

    /// Starts the engine loop.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken, tracker: &TaskTracker) {
        let me = self.clone();
        let ended = self.ota.ended();
        tracker.spawn(async move {
            // The engine's own records (members, the campaign's state, its audit lines) are
            // re-derived from the tasks after a crash, so a round does not wait for them to be
            // on disk: one flush at a time runs beside the rounds, and writes made while it runs
            // are owed to the next. (Tasks are flushed before their commands go out, and an
            // operator's action before it is answered; neither waits here.)
            let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
            let mut owed = false;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = me.wake.notified() => {}
                    // tasks ended or were confirmed (on disk): a wave may be done
                    _ = ended.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                match me.tick().await {
                    Ok(dirty) => owed |= dirty,
                    Err(e) => {
                        owed = true;
                        tracing::error!(error = %e, "campaign round failed");
                    }
                }
                if owed && flushing.as_ref().is_none_or(|f| f.is_finished()) {
                    owed = false;
                    let store = me.store.clone();
                    flushing = Some(tokio::spawn(async move {
                        if let Err(e) = store.flush().await {
                            tracing::error!(error = %e, "campaign records could not be flushed");
                        }
                    }));
                }
                me.rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // at most ten rounds a second, however fast devices finish
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// Engine rounds finished since the start (failed ones included).
    pub fn rounds(&self) -> u64 {
        self.rounds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the engine look now (a device connected, a task ended).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Devices claimed by live campaigns other than `except`.
    fn claimed(&self, except: Option<&str>) -> Result<BTreeMap<String, String>, StoreError> {
        let mut m = BTreeMap::new();
        for c in self.store.list_campaigns()? {
            if !c.status.is_live() || Some(c.id.as_str()) == except {
                continue;
            }
            for mem in self.store.list_members(&c.id)? {
                if matches!(mem.status, MemberStatus::Queued | MemberStatus::InFlight) {
                    m.insert(mem.device_id, c.id.clone());
                }
            }
        }
        Ok(m)
    }

    /// Whether a spec is valid on its own (names, targets, waves, gates, times), before the
    /// firmware it targets exists.
    pub fn validate_spec_only(s: &CampaignSpec) -> Result<(), CampaignError> {
        spec::validate(s, now_ms()).map(|_| ())
    }

    /// Validates a spec and works out waves, deltas and bytes, without creating anything.
    pub fn plan(&self, s: &CampaignSpec) -> Result<Plan, CampaignError> {
        self.plan_with(s, plan::Empty::Refuse)
    }

    fn plan_with(&self, s: &CampaignSpec, empty: plan::Empty) -> Result<Plan, CampaignError> {
        let (c, notes) = spec::validate(s, now_ms())?;
        let fw = match self.firmware.get(&c.device_type, &c.version) {
            Ok(f) if f.status == FirmwareStatus::Released => f,
            Ok(f) => {
                return Err(CampaignError::Conflict(format!(
                    "firmware {} for {} is {}, not released",
                    c.version,
                    c.device_type,
                    f.status.as_str()
                )));
            }
            Err(_) => {
                return Err(CampaignError::Conflict(format!(
                    "firmware {} for device type {} does not exist",
                    c.version, c.device_type
                )));
            }
        };
        let (device_type, version) = (fw.device_type, fw.version);
        let offer = |d: &DeviceRecord| {
            let from = d.firmware_version.as_deref()?;
            Some(self.deltas.offer(&device_type, from, &version)?.size)
        };
        let (devices, claimed) = (self.store.list_devices()?, self.claimed(None)?);
        plan::plan_with(c, notes, devices, &claimed, offer, fw.size, empty)
    }

    /// Creates a campaign from a spec; returns it with its plan and its members as created
    /// (queued, or skipped for a conflict).
    pub async fn create(
        &self,
        s: &CampaignSpec,
    ) -> Result<Durable<(CampaignRecord, Plan, Vec<CampaignMember>)>, CampaignError> {
        self.create_with(s, None).await
    }

    /// As [`Campaigns::create`], but a campaign without `startAt` is created `paused` with
    /// `why` as its reason, for an operator to start (a bundle's plans); with `startAt` it is
    /// `scheduled` as usual. It is created even when no registered device matches yet (nor a
    /// device id it names): it is then dynamic, and its devices join as they register.
    pub async fn create_held(
        &self,
        s: &CampaignSpec,
        why: String,
    ) -> Result<Durable<(CampaignRecord, Plan, Vec<CampaignMember>)>, CampaignError> {
        self.create_with(s, Some(why)).await
    }

    async fn create_with(
        &self,
        s: &CampaignSpec,
        hold: Option<String>,
    ) -> Result<Durable<(CampaignRecord, Plan, Vec<CampaignMember>)>, CampaignError> {
        let _g = self.lock.lock().await;
        let empty = match hold {
            Some(_) => plan::Empty::Wait,
            None => plan::Empty::Refuse,
        };
        let mut plan = self.plan_with(s, empty)?;
        let mut c = plan.record.take().expect("planned");
        c.id = self.store.next_campaign_id()?;
        let waits = plan.total == 0 && plan.conflicts.is_empty();
        if waits || !c.targets.device_ids.is_empty() && plan.total < c.targets.device_ids.len() {
            // its devices join as they register
            c.dynamic = true;
        }
        if let Some(why) = hold
            && s.start_at.is_none()
        {
            c.status = CampaignStatus::Paused;
            c.status_reason = Some(why);
        }
        let now = now_ms();
        // the planned devices in one record; the conflicts (usually few) as skipped members
        self.store.put_queued_members(&QueuedMembers {
            schema: CAMPAIGN_SCHEMA,
            campaign_id: c.id.clone(),
            queued_at_ms: now,
            devices: plan
                .waves
                .iter()
                .enumerate()
                .flat_map(|(k, w)| w.devices.iter().map(move |d| (d.id.clone(), k as u32)))
                .collect(),
        })?;
        let skipped: Vec<CampaignMember> = plan
            .conflicts
            .iter()
            .map(|conflict| CampaignMember {
                status: MemberStatus::Skipped,
                note: Some(conflict.reason.clone()),
                ..CampaignMember::queued(
                    &c.id,
                    &conflict.device_id,
                    (c.waves.len() - 1) as u32,
                    now,
                )
            })
            .collect();
        self.put_members(skipped.clone()).await?;
        self.store.put_campaign(&c)?;
        let stored = self.store.durable(()).await?;
        tracing::info!(
            campaign = c.id,
            name = c.name,
            devices = plan.total,
            version = c.version,
            "campaign created"
        );
        drop(_g);
        self.wake();
        let cid = &c.id;
        let mut members: Vec<CampaignMember> = plan
            .waves
            .iter()
            .enumerate()
            .flat_map(|(k, w)| {
                w.devices
                    .iter()
                    .map(move |d| CampaignMember::queued(cid, &d.id, k as u32, now))
            })
            .collect();
        members.extend(skipped);
        members.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        Ok(stored.map(|()| (c, plan, members)))
    }

    /// Holds this service's write lock (backups take a consistent snapshot under it).
    pub async fn quiesce(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// One campaign.
    pub fn get(&self, id: &str) -> Result<CampaignRecord, CampaignError> {
        self.store
            .get_campaign(id)?
            .ok_or_else(|| CampaignError::NotFound(format!("campaign {id:?} does not exist")))
    }

    /// Every campaign, newest first.
    pub fn list(&self) -> Result<Vec<CampaignRecord>, CampaignError> {
        let mut v = self.store.list_campaigns()?;
        v.sort_by_key(|c| std::cmp::Reverse(c.created_at_ms));
        Ok(v)
    }

    /// The ids of the campaigns not finished (scheduled, running, paused): the task archive
    /// leaves their tasks in the store.
    pub fn unfinished(&self) -> Result<std::collections::HashSet<String>, CampaignError> {
        Ok(self
            .store
            .list_campaigns()?
            .into_iter()
            .filter(|c| {
                !matches!(
                    c.status,
                    CampaignStatus::Completed | CampaignStatus::Cancelled
                )
            })
            .map(|c| c.id)
            .collect())
    }

    /// Members of a campaign, as they stand ([`Campaigns::members_now`]).
    pub fn members(&self, id: &str) -> Result<Vec<CampaignMember>, CampaignError> {
        let c = self.get(id)?;
        Ok(self.members_now(&c, now_ms())?.0)
    }

    /// Where a campaign stands ([`progress::compute`] over its members, their tasks, whether
    /// their devices are online and whether completed ones showed the new version).
    pub fn progress(
        &self,
        c: &CampaignRecord,
        members: &[CampaignMember],
    ) -> Result<progress::Progress, StoreError> {
        let now = now_ms();
        let tasks: Vec<Option<crate::server::store::TaskRecord>> = members
            .iter()
            .map(|m| match m.task_id {
                Some(id) => self.store.get_task(id),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let views: Vec<progress::MemberView> = members
            .iter()
            .zip(&tasks)
            .map(|(m, t)| progress::MemberView {
                member: m,
                task: t.as_ref(),
                online: self.devices.is_online(&m.device_id),
                settled: t.as_ref().is_none_or(|t| self.ota.settled(t, now)),
            })
            .collect();
        Ok(progress::compute(c, &views, now))
    }

    /// Whether a live campaign targets this firmware (it may not be deleted).
    pub fn uses(&self, device_type: &str, version: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .store
            .list_campaigns()?
            .into_iter()
            .find(|c| c.status.is_live() && c.device_type == device_type && c.version == version)
            .map(|c| c.id))
    }

    /// pause / resume / cancel (the brake) / retry (failed members queued again). The brake
    /// cancels every in-flight task (a cancel message where the protocol has one; the task's
    /// download URLs revoked and its transfers ended in every case) and records what it could
    /// do ([`crate::server::store::Brake`]).
    pub async fn act(
        &self,
        id: &str,
        action: &str,
    ) -> Result<Durable<CampaignRecord>, CampaignError> {
        let _g = self.lock.lock().await;
        let mut c = self.get(id)?;
        let now = now_ms();
        match action {
            "pause" => {
                if !matches!(
                    c.status,
                    CampaignStatus::Running | CampaignStatus::Scheduled
                ) {
                    return Err(CampaignError::Conflict(format!(
                        "campaign {id} is {}: only a running or scheduled campaign can be paused",
                        c.status.as_str()
                    )));
                }
                c.status = CampaignStatus::Paused;
                c.status_reason = Some("paused by an operator".into());
            }
            "resume" => {
                if c.status != CampaignStatus::Paused {
                    return Err(CampaignError::Conflict(format!(
                        "campaign {id} is {}: only a paused campaign can be resumed",
                        c.status.as_str()
                    )));
                }
                let failed = self
                    .store
                    .list_members(id)?
                    .iter()
                    .filter(|m| m.status == MemberStatus::Failed)
                    .count() as u32;
                c.failures_acknowledged = failed;
                c.status = if c.started_at_ms.is_some() {
                    CampaignStatus::Running
                } else {
                    CampaignStatus::Scheduled
                };
                c.status_reason = Some(format!(
                    "resumed by an operator ({failed} failures acknowledged)"
                ));
            }
            "cancel" => {
                if !c.status.is_live() {
                    return Err(CampaignError::Conflict(format!(
                        "campaign {id} is already {}",
                        c.status.as_str()
                    )));
                }
                c.status = CampaignStatus::Cancelled;
                c.status_reason = Some("cancelled by an operator (emergency brake)".into());
                c.ended_at_ms = Some(now);
                // persist the brake first: no new task may start from here on
                c.updated_at_ms = now;
                self.store.put_campaign(&c)?;
                self.store.flush().await?;
                let mut brake = crate::server::store::Brake {
                    at_ms: now,
                    in_flight: 0,
                    stopped: 0,
                    no_cancel: 0,
                    not_listening: 0,
                    transfers_cut: 0,
                    queued: 0,
                };
                let reason = format!("stopped by the emergency brake of campaign {id}");
                for mut m in self.members_now(&c, now)?.0 {
                    match m.status {
                        MemberStatus::InFlight => {
                            if let Some(tid) = m.task_id
                                && let Ok(Some(t)) = self.store.get_task(tid)
                                && t.status.is_active()
                                && t.campaign_id.as_deref() == Some(id)
                            {
                                brake.in_flight += 1;
                                match self.ota.cancel(&m.device_id, &reason).await {
                                    Ok(done) => {
                                        let done = done.into_inner();
                                        brake.transfers_cut += done.transfers_cut as u32;
                                        if done.told {
                                            brake.stopped += 1;
                                        } else if crate::server::ota::commands::has_cancel(
                                            done.task.protocol,
                                        ) {
                                            brake.not_listening += 1;
                                        } else {
                                            brake.no_cancel += 1;
                                        }
                                    }
                                    Err(e) => {
                                        // it ended meanwhile (completed or failed): nothing to stop
                                        brake.in_flight -= 1;
                                        tracing::warn!(device = m.device_id, error = %e, "cancelling a campaign task");
                                    }
                                }
                            }
                            m.status = MemberStatus::Cancelled;
                        }
                        MemberStatus::Queued => {
                            brake.queued += 1;
                            m.status = MemberStatus::Cancelled;
                        }
                        _ => continue,
                    }
                    m.updated_at_ms = now;
                    self.store.put_member(&m)?;
                }
                c.status_reason = Some(format!(
                    "cancelled by an operator (emergency brake): {}",
                    brake_words(&brake)
                ));
                c.brake = Some(brake);
                self.store.put_campaign(&c)?;
                tracing::warn!(
                    campaign = id,
                    in_flight = brake.in_flight,
                    stopped = brake.stopped,
                    no_cancel = brake.no_cancel,
                    not_listening = brake.not_listening,
                    "campaign cancelled (emergency brake)"
                );
                return Ok(self.store.durable(c).await?);
            }
            "retry" => {
                if !matches!(
                    c.status,
                    CampaignStatus::Running | CampaignStatus::Paused | CampaignStatus::Completed
                ) {
                    return Err(CampaignError::Conflict(format!(
                        "campaign {id} is {}: only a running, paused or completed campaign can retry its failed devices",
                        c.status.as_str()
                    )));
                }
                let failed: Vec<CampaignMember> = self
                    .store
                    .list_members(id)?
                    .into_iter()
                    .filter(|m| m.status == MemberStatus::Failed)
                    .map(|mut m| {
                        // queued again with a full retry budget; the failed task stays its
                        // last, so it is not adopted back as in flight
                        m.status = MemberStatus::Queued;
                        m.attempts = 0;
                        m.next_attempt_ms = now;
                        m.note = Some("retried by an operator".into());
                        m.updated_at_ms = now;
                        m
                    })
                    .collect();
                if failed.is_empty() {
                    return Err(CampaignError::Conflict(format!(
                        "campaign {id} has no failed devices to retry"
                    )));
                }
                let n = failed.len();
                self.put_members(failed).await?;
                c.failures_acknowledged = 0;
                if c.status == CampaignStatus::Completed {
                    c.status = CampaignStatus::Running;
                    c.ended_at_ms = None;
                }
                c.status_reason = Some(format!("{n} failed devices retried by an operator"));
            }
            other => {
                return Err(CampaignError::NotFound(format!("no action {other:?}")));
            }
        }
        c.updated_at_ms = now;
        self.store.put_campaign(&c)?;
        let c = self.store.durable(c).await?;
        drop(_g);
        self.wake();
        Ok(c)
    }

    /// Writes members in one batch on the blocking pool (a fleet's worth of sled inserts would
    /// hold a runtime worker for tens of milliseconds).
    async fn put_members(&self, members: Vec<CampaignMember>) -> Result<(), StoreError> {
        if members.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.put_members(&members))
            .await
            .map_err(|e| StoreError::Engine(format!("member write task: {e}")))?
    }

    /// The members of a campaign as they stand: as stored, with every queued member whose
    /// device has a newer task of this campaign than the member records taken as in flight
    /// with it — a task created just before a crash, before its member was written. Rounds
    /// write the members they start in the same round, so the devices' tasks are looked up only
    /// until a round of this process has written what it adopted (once per campaign, not a
    /// fleet's worth of lookups every round). Returns the members and the indexes of those
    /// adopted.
    fn members_now(
        &self,
        c: &CampaignRecord,
        now: i64,
    ) -> Result<(Vec<CampaignMember>, Vec<usize>), StoreError> {
        let starting = self
            .starting
            .lock()
            .expect("starting lock")
            .get(&c.id)
            .cloned();
        let checked = self.checked.lock().expect("checked lock").contains(&c.id);
        if checked && starting.is_none() {
            return Ok((self.store.list_members(&c.id)?, Vec::new()));
        }
        let mut members = self.store.list_members(&c.id)?;
        let mut adopted = Vec::new();
        for (i, m) in members.iter_mut().enumerate() {
            if m.status != MemberStatus::Queued {
                continue;
            }
            // checked already: only the devices a round is starting right now
            if checked && !starting.as_ref().is_some_and(|s| s.contains(&m.device_id)) {
                continue;
            }
            let Some(t) = self.store.latest_task(&m.device_id)? else {
                continue;
            };
            if t.campaign_id.as_deref() == Some(c.id.as_str()) && t.id > m.task_id.unwrap_or(0) {
                m.status = MemberStatus::InFlight;
                m.task_id = Some(t.id);
                m.attempts += 1;
                m.note = None;
                m.updated_at_ms = now;
                adopted.push(i);
            }
        }
        Ok((members, adopted))
    }

    /// One engine round over every live campaign; true when it wrote something (not flushed).
    pub async fn tick(&self) -> Result<bool, CampaignError> {
        let _g = self.lock.lock().await;
        let started = std::time::Instant::now();
        let now = now_ms();
        let mut dirty = false;
        for c in self.store.list_campaigns()? {
            if matches!(
                c.status,
                CampaignStatus::Scheduled | CampaignStatus::Running | CampaignStatus::Paused
            ) {
                let span = tracing::info_span!("campaign_round", campaign = %c.id);
                dirty |= tracing::Instrument::instrument(self.round(c, now), span).await?;
            }
        }
        tracing::debug!(
            took_ms = started.elapsed().as_millis() as u64,
            dirty,
            "campaign engine round"
        );
        Ok(dirty)
    }

    /// One round of one campaign: gather the facts, [`round::decide`], write what changed in
    /// one batch, then create the tasks of the members it starts.
    async fn round(&self, c: CampaignRecord, now: i64) -> Result<bool, CampaignError> {
        if round::waits_to_start(&c, now) {
            return Ok(false);
        }
        let (members, adopted) = self.members_now(&c, now)?;
        if !adopted.is_empty() {
            tracing::debug!(
                campaign = c.id,
                members = adopted.len(),
                "members in flight recorded"
            );
        }
        let plan = round::decide(&c, members, &EngineFacts(self), now)?;
        // what the engine decides by itself goes to the audit log as the system's doing
        // (flushed with the round's writes)
        let reason = plan
            .campaign
            .as_ref()
            .and_then(|c| c.status_reason.clone())
            .unwrap_or_default();
        for e in &plan.events {
            let action = match e {
                round::Event::Running => "campaign.started",
                round::Event::Paused => "campaign.paused",
                round::Event::Completed { .. } => "campaign.completed",
                round::Event::Joined(_) => continue,
            };
            self.store
                .append_audit(&crate::server::store::AuditRecord {
                    schema: crate::server::store::AUDIT_SCHEMA,
                    seq: 0,
                    at_ms: now,
                    actor: "system".into(),
                    via: "system".into(),
                    action: action.into(),
                    target: c.id.clone(),
                    result: reason.clone(),
                    status: 0,
                })?;
        }
        for e in &plan.events {
            match e {
                round::Event::Running => tracing::info!(campaign = c.id, "campaign running"),
                round::Event::Joined(d) => {
                    tracing::info!(campaign = c.id, device = d, "device joined the campaign")
                }
                round::Event::Paused => {
                    let reason = plan
                        .campaign
                        .as_ref()
                        .and_then(|c| c.status_reason.as_deref());
                    tracing::warn!(campaign = c.id, reason, "campaign paused")
                }
                round::Event::Completed { succeeded, failed } => {
                    tracing::info!(campaign = c.id, succeeded, failed, "campaign completed")
                }
            }
        }
        let mut dirty = plan.is_dirty() || !adopted.is_empty();
        let mut write: Vec<usize> = plan.changed.clone();
        write.extend(adopted);
        write.sort_unstable();
        write.dedup();
        let round::RoundPlan {
            campaign,
            mut members,
            start: to_start,
            ..
        } = plan;
        self.put_members(write.iter().map(|&i| members[i].clone()).collect())
            .await?;
        // what the lookups found is written: later rounds need not look again
        self.checked
            .lock()
            .expect("checked lock")
            .insert(c.id.clone());
        let c = match campaign {
            Some(c) => {
                self.store.put_campaign(&c)?;
                c
            }
            None => c,
        };
        // create the tasks in one batch (durable in chunks, commands out as each chunk is);
        // a member is recorded in flight only with its task id
        let _starting;
        if !to_start.is_empty() {
            // (views read while the tasks are created see these devices' tasks: see
            // [`Campaigns::starting`])
            self.starting.lock().expect("starting lock").insert(
                c.id.clone(),
                Arc::new(to_start.iter().map(|(_, d)| d.id.clone()).collect()),
            );
            _starting = Starting {
                engine: self,
                campaign: c.id.clone(),
            };
            let (idx, devs): (Vec<usize>, Vec<_>) =
                to_start.into_iter().map(|(i, d)| (i, Ok(d))).unzip();
            let results = self
                .ota
                .create_upgrades_of(
                    devs,
                    &crate::server::ota::Upgrade {
                        version: c.version.clone(),
                        force: c.force,
                        // a forced campaign may also take devices back to an older version
                        allow_downgrade: c.force,
                        campaign_id: Some(c.id.clone()),
                    },
                )
                .await
                .map_err(|e| match e {
                    OtaError::Store(e) => CampaignError::Store(e),
                    other => CampaignError::Conflict(other.to_string()),
                })?
                .into_inner();
            // the members started are in flight with their (durable) tasks, the others wait
            // or are skipped; written now, flushed with the round (a crash before that: the
            // next process's first round adopts the tasks, see [`Campaigns::members_now`])
            let mut written = Vec::with_capacity(idx.len());
            for (&i, r) in idx.iter().zip(results) {
                let m = &mut members[i];
                match r {
                    Ok(t) => {
                        m.status = MemberStatus::InFlight;
                        m.task_id = Some(t.id);
                        m.attempts += 1;
                        m.note = None;
                    }
                    Err(OtaError::Conflict(why)) => {
                        m.status = MemberStatus::Skipped;
                        m.note = Some(format!("conflict: {why}"));
                    }
                    Err(e) => {
                        m.next_attempt_ms = now + backoff_ms(0);
                        m.note = Some(format!("could not start: {e}"));
                    }
                }
                m.updated_at_ms = now;
                written.push(m.clone());
            }
            if !written.is_empty() {
                self.put_members(written).await?;
                dirty = true;
            }
        }
        Ok(dirty)
    }
}

/// The engine's view of the world, for [`round::decide`].
struct EngineFacts<'a>(&'a Campaigns);

impl round::Facts for EngineFacts<'_> {
    type Error = StoreError;

    fn task(&self, id: u64) -> Result<Option<crate::server::store::TaskRecord>, StoreError> {
        self.0.store.get_task(id)
    }

    fn settled(&self, task: &crate::server::store::TaskRecord, now: i64) -> bool {
        self.0.ota.settled(task, now)
    }

    fn device(&self, id: &str) -> Result<Option<round::DeviceFacts>, StoreError> {
        let record = match self.0.devices.get(id) {
            Ok(d) => d,
            Err(crate::server::registry::DeviceError::Store(e)) => return Err(e),
            Err(_) => return Ok(None),
        };
        Ok(Some(round::DeviceFacts {
            active_task: self.0.store.active_task(id)?,
            ready: self.0.devices.ready(id),
            record,
        }))
    }

    fn joining(
        &self,
        c: &CampaignRecord,
        members: &HashSet<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let claimed = self.0.claimed(Some(&c.id))?;
        Ok(self
            .0
            .store
            .list_devices()?
            .into_iter()
            .filter(|d| {
                !members.contains(d.id.as_str())
                    && !claimed.contains_key(&d.id)
                    && plan::targets(&c.targets, &c.device_type, d)
            })
            .map(|d| d.id)
            .collect())
    }
}

/// What a brake did, in the words the console, the CLI and the API use: "N of M stopped, K
/// could not be told to stop (protocol has no cancel)".
pub fn brake_words(b: &crate::server::store::Brake) -> String {
    let mut out = format!("{} of {} in flight stopped", b.stopped, b.in_flight);
    if b.no_cancel > 0 {
        out.push_str(&format!(
            ", {} could not be told to stop (protocol has no cancel: their downloads were revoked, but one that already had the image may still install it)",
            b.no_cancel
        ));
    }
    if b.not_listening > 0 {
        out.push_str(&format!(
            ", {} not connected to be told (their downloads were revoked)",
            b.not_listening
        ));
    }
    if b.queued > 0 {
        out.push_str(&format!(", {} not started", b.queued));
    }
    out
}
