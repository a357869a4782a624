//! One engine round of one campaign, decided without I/O: given the campaign, its members as
//! they stand, what the world says about their tasks and devices ([`Facts`]) and the time,
//! [`decide`] says what changes — the campaign's state, which member records to write, which
//! devices to start now — and why ([`Event`]). The engine ([`super::Campaigns`]) gathers the
//! facts, writes the plan in one batch and creates the tasks; tests drive `decide` with tables.
//!
//! The order inside a round: a scheduled campaign starts once its start time has come and its
//! window is open; a dynamic campaign takes in devices that joined the target set; the members'
//! tasks are followed (completed, failed — retried with backoff while retries are left — or
//! rolled back after completing); the failure gate pauses; the success gate of every wave
//! before the current one pauses; the campaign completes once every member has ended; and, in
//! the window, queued members of the open waves start, up to `maxInFlight`.

use std::collections::HashSet;

use crate::server::store::{
    CampaignMember, CampaignRecord, CampaignStatus, DeviceRecord, MemberStatus, TaskRecord,
    TaskStatus,
};

use super::in_window;

/// Backoff before the next attempt after `attempts` failed ones beyond the first: 30 s, 60 s,
/// 120 s, ... capped at 30 min.
pub fn backoff_ms(attempts: u32) -> i64 {
    (30_000i64 << attempts.min(6)).min(30 * 60_000)
}

/// What a round may ask about the world. Asked lazily: the devices of queued members only
/// until `maxInFlight` is reached, the joining devices only for a running dynamic campaign.
pub trait Facts {
    /// Why a fact could not be had (a store failure).
    type Error;
    /// A task by id.
    fn task(&self, id: u64) -> Result<Option<TaskRecord>, Self::Error>;
    /// The task completed and its device has shown it runs the new image.
    fn settled(&self, task: &TaskRecord, now: i64) -> bool;
    /// A member's device; `None` once it was deleted.
    fn device(&self, id: &str) -> Result<Option<DeviceFacts>, Self::Error>;
    /// Devices that match the campaign's targets now, are not among `members` and are in no
    /// other live campaign.
    fn joining(
        &self,
        c: &CampaignRecord,
        members: &HashSet<&str>,
    ) -> Result<Vec<String>, Self::Error>;
}

/// What a round needs to know about a queued member's device.
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    /// Its record (the task is created for it).
    pub record: DeviceRecord,
    /// Its active task, if any.
    pub active_task: Option<TaskRecord>,
    /// Connected and subscribed to its commands.
    pub ready: bool,
}

/// What happened, for the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A scheduled campaign started.
    Running,
    /// A device joined a dynamic campaign.
    Joined(String),
    /// A gate paused the campaign (the reason is in its `status_reason`).
    Paused,
    /// Every member ended.
    Completed {
        /// Members that succeeded.
        succeeded: u32,
        /// Members that failed.
        failed: u32,
    },
}

/// What a round decided.
#[derive(Debug, Default)]
pub struct RoundPlan {
    /// The campaign as it is to be stored, if it changed.
    pub campaign: Option<CampaignRecord>,
    /// Every member as it stands after the round (joined ones appended).
    pub members: Vec<CampaignMember>,
    /// Indexes into `members` of the records to write.
    pub changed: Vec<usize>,
    /// Members to start now (index into `members`, the device), in order.
    pub start: Vec<(usize, DeviceRecord)>,
    /// What happened.
    pub events: Vec<Event>,
}

impl RoundPlan {
    /// Whether the round changes anything on disk.
    pub fn is_dirty(&self) -> bool {
        self.campaign.is_some() || !self.changed.is_empty()
    }
}

/// A scheduled campaign whose start time has not come or whose window is closed: its round
/// does nothing (checked before the engine reads any member).
pub fn waits_to_start(c: &CampaignRecord, now: i64) -> bool {
    c.status == CampaignStatus::Scheduled && (now < c.start_at_ms || !in_window(c.window, now))
}

/// One round of `c` over `members` at `now`, phase by phase (see the module docs).
pub fn decide<F: Facts>(
    c: &CampaignRecord,
    members: Vec<CampaignMember>,
    facts: &F,
    now: i64,
) -> Result<RoundPlan, F::Error> {
    if waits_to_start(c, now) {
        return Ok(RoundPlan {
            members,
            ..RoundPlan::default()
        });
    }
    let mut r = Round {
        changed: vec![false; members.len()],
        plan: RoundPlan {
            members,
            ..RoundPlan::default()
        },
        c: c.clone(),
        campaign_changed: false,
        settled: HashSet::new(),
        facts,
        now,
    };
    r.start_if_scheduled();
    r.take_in_joiners()?;
    r.follow_tasks()?;
    if r.failure_gate() {
        return Ok(r.finish());
    }
    let Some(current) = r.current_wave() else {
        // a dynamic campaign no device has joined yet waits for its first
        if !(r.c.dynamic && r.plan.members.is_empty()) {
            r.complete();
        }
        return Ok(r.finish());
    };
    if r.success_gates(current) || r.c.status != CampaignStatus::Running {
        return Ok(r.finish());
    }
    if in_window(r.c.window, now) {
        r.start_queued(current)?;
    }
    Ok(r.finish())
}

/// A round in the making.
struct Round<'a, F> {
    c: CampaignRecord,
    plan: RoundPlan,
    /// Per member: its record is to be written.
    changed: Vec<bool>,
    campaign_changed: bool,
    /// Members that succeeded and whose device showed the new image (or needed no task).
    settled: HashSet<usize>,
    facts: &'a F,
    now: i64,
}

impl<F: Facts> Round<'_, F> {
    fn finish(mut self) -> RoundPlan {
        self.plan.campaign = self.campaign_changed.then_some(self.c);
        self.plan.changed = (self.changed.iter().enumerate())
            .filter_map(|(i, ch)| ch.then_some(i))
            .collect();
        self.plan
    }

    /// The campaign changes state (and says why).
    fn set_status(&mut self, status: CampaignStatus, reason: Option<String>, event: Event) {
        self.c.status = status;
        self.c.status_reason = reason;
        self.c.updated_at_ms = self.now;
        self.campaign_changed = true;
        self.plan.events.push(event);
    }

    /// Member `i` changes state.
    fn set_member(&mut self, i: usize, status: MemberStatus, note: Option<String>) {
        let m = &mut self.plan.members[i];
        m.status = status;
        m.note = note;
        m.updated_at_ms = self.now;
        self.changed[i] = true;
    }

    fn count(&self, st: MemberStatus) -> u32 {
        self.plan.members.iter().filter(|m| m.status == st).count() as u32
    }

    /// A scheduled campaign whose time came starts.
    fn start_if_scheduled(&mut self) {
        if self.c.status == CampaignStatus::Scheduled {
            self.c.started_at_ms = Some(self.now);
            self.set_status(CampaignStatus::Running, None, Event::Running);
        }
    }

    /// Dynamic: devices that joined the target set since, into the last wave (also while
    /// paused: they wait there like the others).
    fn take_in_joiners(&mut self) -> Result<(), F::Error> {
        if !self.c.dynamic
            || !matches!(
                self.c.status,
                CampaignStatus::Running | CampaignStatus::Paused
            )
        {
            return Ok(());
        }
        let have: HashSet<&str> = (self.plan.members.iter())
            .map(|m| m.device_id.as_str())
            .collect();
        let joining = self.facts.joining(&self.c, &have)?;
        let last = (self.c.waves.len() - 1) as u32;
        for d in joining {
            let mut m = CampaignMember::queued(&self.c.id, &d, last, self.now);
            m.note = Some("joined later (dynamic campaign)".into());
            self.plan.members.push(m);
            self.changed.push(true);
            self.plan.events.push(Event::Joined(d));
        }
        Ok(())
    }

    /// Follows the members' tasks — also of members that succeeded: a device that comes back
    /// on its old version after completing is a failure (retried if it has retries left).
    fn follow_tasks(&mut self) -> Result<(), F::Error> {
        for i in 0..self.plan.members.len() {
            let m = &self.plan.members[i];
            if !matches!(m.status, MemberStatus::InFlight | MemberStatus::Succeeded) {
                continue;
            }
            let Some(t) = (match m.task_id {
                Some(id) => self.facts.task(id)?,
                None => None,
            }) else {
                if m.status == MemberStatus::Succeeded {
                    self.settled.insert(i); // it ran the target version already
                }
                continue;
            };
            if let Some((st, note, next_attempt)) = after_task(m, &t, self.c.retries, self.now) {
                if let Some(at) = next_attempt {
                    self.plan.members[i].next_attempt_ms = at;
                }
                self.set_member(i, st, note);
            }
            if self.plan.members[i].status == MemberStatus::Succeeded
                && self.facts.settled(&t, self.now)
            {
                self.settled.insert(i);
            }
        }
        Ok(())
    }

    /// The failure gate: failures since the last resume at or above both thresholds pause.
    fn failure_gate(&mut self) -> bool {
        let (failed, succeeded) = (
            self.count(MemberStatus::Failed),
            self.count(MemberStatus::Succeeded),
        );
        let c = &self.c;
        let new_failures = failed.saturating_sub(c.failures_acknowledged);
        let finished = failed + succeeded;
        if c.status != CampaignStatus::Running
            || new_failures < c.failure_min_count.max(1)
            || (new_failures as f64) * 100.0 < c.failure_percent * finished.max(1) as f64
        {
            return false;
        }
        let why = format!(
            "failure threshold crossed: {failed} of {finished} finished devices failed (threshold {}% and at least {}); resume to continue",
            c.failure_percent, c.failure_min_count
        );
        self.set_status(CampaignStatus::Paused, Some(why), Event::Paused);
        true
    }

    /// Member `i` has ended: a success only once the device showed it runs the new image.
    fn ended(&self, i: usize) -> bool {
        match self.plan.members[i].status {
            MemberStatus::Succeeded => self.settled.contains(&i),
            MemberStatus::Failed | MemberStatus::Skipped | MemberStatus::Cancelled => true,
            MemberStatus::Queued | MemberStatus::InFlight => false,
        }
    }

    /// The first wave with a member that has not ended; none once all have.
    fn current_wave(&self) -> Option<u32> {
        let members = &self.plan.members;
        (0..self.c.waves.len() as u32)
            .find(|w| (0..members.len()).any(|i| members[i].wave == *w && !self.ended(i)))
    }

    /// Every member ended: a running campaign completes.
    fn complete(&mut self) {
        if self.c.status != CampaignStatus::Running {
            return;
        }
        let (failed, succeeded) = (
            self.count(MemberStatus::Failed),
            self.count(MemberStatus::Succeeded),
        );
        self.c.ended_at_ms = Some(self.now);
        let why = format!("{succeeded} succeeded, {failed} failed");
        self.set_status(
            CampaignStatus::Completed,
            Some(why),
            Event::Completed { succeeded, failed },
        );
    }

    /// The success gate of every wave before `current`: one below the threshold stops the
    /// round (and pauses a running campaign). Returns whether it stopped.
    fn success_gates(&mut self, current: u32) -> bool {
        for w in 0..current {
            let members = &self.plan.members;
            let in_wave = (members.iter())
                .filter(|m| m.wave == w && m.status != MemberStatus::Skipped)
                .count();
            let ok = (0..members.len())
                .filter(|i| members[*i].wave == w && self.settled.contains(i))
                .count();
            if in_wave == 0 || (ok as f64) * 100.0 >= self.c.success_threshold * in_wave as f64 {
                continue;
            }
            if self.c.status == CampaignStatus::Running {
                let why = format!(
                    "wave {} reached {ok} of {in_wave} succeeded, below the success threshold of {}%; resume to continue",
                    w + 1,
                    self.c.success_threshold
                );
                self.c.failures_acknowledged = self.count(MemberStatus::Failed);
                self.set_status(CampaignStatus::Paused, Some(why), Event::Paused);
            }
            return true;
        }
        false
    }

    /// Starts queued members of the open waves (up to `current`) whose backoff ended, up to
    /// `maxInFlight`; settles those that need no task or cannot have one.
    fn start_queued(&mut self, current: u32) -> Result<(), F::Error> {
        let mut in_flight = self.count(MemberStatus::InFlight);
        for idx in 0..self.plan.members.len() {
            if in_flight >= self.c.max_in_flight {
                break;
            }
            let m = &self.plan.members[idx];
            if m.status != MemberStatus::Queued || m.wave > current || m.next_attempt_ms > self.now
            {
                continue;
            }
            let Some(dev) = self.facts.device(&m.device_id)? else {
                self.set_member(
                    idx,
                    MemberStatus::Skipped,
                    Some("the device was deleted".into()),
                );
                continue;
            };
            if dev.record.firmware_version.as_deref() == Some(self.c.version.as_str()) {
                let note = Some("already runs the target version".into());
                self.set_member(idx, MemberStatus::Succeeded, note);
                continue;
            }
            // a task of ours may exist already (created before a crash): adopt it
            if let Some(t) = &dev.active_task {
                if t.campaign_id.as_deref() == Some(self.c.id.as_str()) {
                    let m = &mut self.plan.members[idx];
                    m.task_id = Some(t.id);
                    m.attempts = m.attempts.max(1);
                    let note = m.note.take();
                    self.set_member(idx, MemberStatus::InFlight, note);
                    in_flight += 1;
                    continue;
                }
                if !self.c.force {
                    let note = format!(
                        "conflict: the device has active task {} (to {}) not from this campaign",
                        t.id, t.to_version
                    );
                    self.set_member(idx, MemberStatus::Skipped, Some(note));
                    continue;
                }
            }
            // offline devices wait for their connection
            if !dev.ready {
                continue;
            }
            self.plan.start.push((idx, dev.record));
            in_flight += 1;
        }
        Ok(())
    }
}

/// What an in-flight or succeeded member becomes after its task `t`: succeeded once it
/// completed; after a failure (also one after completing: a rollback) queued again with the
/// next attempt's time while retries are left, else failed; after a cancel, failed. `None`:
/// no change.
fn after_task(
    m: &CampaignMember,
    t: &TaskRecord,
    retries: u32,
    now: i64,
) -> Option<(MemberStatus, Option<String>, Option<i64>)> {
    match (m.status, t.status) {
        (MemberStatus::InFlight, TaskStatus::Completed) => {
            Some((MemberStatus::Succeeded, None, None))
        }
        (_, TaskStatus::Failed | TaskStatus::Cancelled) => {
            let mut why = format!(
                "{}: {}",
                t.error_code.as_deref().unwrap_or("FAILED"),
                t.error_message.as_deref().unwrap_or_default()
            );
            if m.status == MemberStatus::Succeeded {
                why = format!("after completing: {why}");
            }
            if m.attempts <= retries && t.status == TaskStatus::Failed {
                let at = now + backoff_ms(m.attempts.saturating_sub(1));
                Some((
                    MemberStatus::Queued,
                    Some(format!("retrying after {why}")),
                    Some(at),
                ))
            } else {
                Some((MemberStatus::Failed, Some(why), None))
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::server::campaigns::fixtures::{campaign, device, member};

    /// The world as a table: tasks by id, settled task ids, devices (version, active task
    /// id, ready), the devices that would join.
    #[derive(Default)]
    struct World {
        tasks: BTreeMap<u64, TaskRecord>,
        settled: BTreeSet<u64>,
        devices: BTreeMap<String, (String, Option<u64>, bool)>,
        joining: Vec<String>,
    }

    impl World {
        fn task(mut self, id: u64, dev: &str, status: TaskStatus, campaign: Option<&str>) -> World {
            let mut t = crate::server::store::sample_task(id, dev);
            t.status = status;
            t.campaign_id = campaign.map(Into::into);
            if status == TaskStatus::Failed {
                t.error_code = Some("DOWNLOAD_FAILED".into());
                t.error_message = Some("cut".into());
            }
            self.tasks.insert(id, t);
            self
        }
        fn settled(mut self, id: u64) -> World {
            self.settled.insert(id);
            self
        }
        fn device(mut self, id: &str, version: &str, active: Option<u64>, ready: bool) -> World {
            self.devices
                .insert(id.into(), (version.into(), active, ready));
            self
        }
    }

    impl Facts for World {
        type Error = ();
        fn task(&self, id: u64) -> Result<Option<TaskRecord>, ()> {
            Ok(self.tasks.get(&id).cloned())
        }
        fn settled(&self, t: &TaskRecord, _now: i64) -> bool {
            self.settled.contains(&t.id)
        }
        fn device(&self, id: &str) -> Result<Option<DeviceFacts>, ()> {
            Ok(self.devices.get(id).map(|(v, active, ready)| DeviceFacts {
                record: device(id, v),
                active_task: active.and_then(|a| self.tasks.get(&a).cloned()),
                ready: *ready,
            }))
        }
        fn joining(&self, _c: &CampaignRecord, have: &HashSet<&str>) -> Result<Vec<String>, ()> {
            Ok(self
                .joining
                .iter()
                .filter(|d| !have.contains(d.as_str()))
                .cloned()
                .collect())
        }
    }

    fn queued(id: &str, wave: u32) -> CampaignMember {
        let mut m = member(id, wave, MemberStatus::Queued, 0);
        m.task_id = None;
        m.next_attempt_ms = 0;
        m.note = None;
        m
    }

    fn in_flight(id: &str, wave: u32, task: u64) -> CampaignMember {
        let mut m = member(id, wave, MemberStatus::InFlight, 1);
        m.task_id = Some(task);
        m.note = None;
        m
    }

    fn started(p: &RoundPlan) -> Vec<&str> {
        p.start.iter().map(|(_, d)| d.id.as_str()).collect()
    }

    const NOW: i64 = 1_000_000;

    /// A one-minute daily window `offset` minutes after NOW's minute of the (local) day.
    fn window_from_now(offset: u32) -> Option<(u32, u32)> {
        use chrono::Timelike;
        let local = chrono::DateTime::from_timestamp_millis(NOW)
            .unwrap()
            .with_timezone(&chrono::Local);
        Some(((local.hour() * 60 + local.minute() + offset) % 1440, 1))
    }

    #[test]
    fn a_scheduled_campaign_waits_for_its_start_and_its_window() {
        let mut c = campaign(CampaignStatus::Scheduled);
        c.start_at_ms = NOW + 1;
        let w = World::default().device("a", "1.0.1", None, true);
        let p = decide(&c, vec![queued("a", 0)], &w, NOW).unwrap();
        assert!(!p.is_dirty() && p.start.is_empty() && p.events.is_empty());
        // the start time has come, the window is not open
        c.start_at_ms = 0;
        c.window = window_from_now(720);
        let p = decide(&c, vec![queued("a", 0)], &w, NOW).unwrap();
        assert!(!p.is_dirty() && p.start.is_empty());
        // and once it is, the campaign runs and starts its first wave at once
        c.window = window_from_now(0);
        let p = decide(&c, vec![queued("a", 0)], &w, NOW).unwrap();
        assert_eq!(p.events, vec![Event::Running]);
        let c2 = p.campaign.as_ref().unwrap();
        assert_eq!(
            (c2.status, c2.started_at_ms),
            (CampaignStatus::Running, Some(NOW))
        );
        assert_eq!(started(&p), ["a"]);
    }

    #[test]
    fn the_start_phase_respects_waves_max_in_flight_presence_and_backoff() {
        let mut c = campaign(CampaignStatus::Running);
        c.max_in_flight = 2;
        let mut retry_later = queued("r", 0);
        retry_later.attempts = 1;
        retry_later.next_attempt_ms = NOW + 1;
        let members = vec![
            in_flight("f", 0, 7),
            queued("off", 0),
            retry_later,
            queued("a", 0),
            queued("b", 0),
            queued("w2", 1),
        ];
        let w = World::default()
            .task(7, "f", TaskStatus::Downloading, Some("c1"))
            .device("off", "1.0.1", None, false)
            .device("r", "1.0.1", None, true)
            .device("a", "1.0.1", None, true)
            .device("b", "1.0.1", None, true)
            .device("w2", "1.0.1", None, true);
        let p = decide(&c, members, &w, NOW).unwrap();
        // one in flight already: one more; the offline one waits, the retry is not due, wave 2 not open
        assert_eq!(started(&p), ["a"]);
        assert!(!p.is_dirty());
    }

    #[test]
    fn queued_members_that_need_no_task_or_cannot_have_one_are_settled_without_one() {
        let c = campaign(CampaignStatus::Running);
        let members = vec![
            queued("gone", 0),
            queued("there", 0),
            queued("ours", 0),
            queued("busy", 0),
        ];
        let w = World::default()
            .task(5, "ours", TaskStatus::Pending, Some("c1"))
            .task(6, "busy", TaskStatus::Downloading, None)
            .device("there", "1.0.2", None, true)
            .device("ours", "1.0.1", Some(5), true)
            .device("busy", "1.0.1", Some(6), true);
        let p = decide(&c, members, &w, NOW).unwrap();
        let m = &p.members;
        assert_eq!(m[0].status, MemberStatus::Skipped);
        assert_eq!(m[0].note.as_deref(), Some("the device was deleted"));
        assert_eq!(m[1].status, MemberStatus::Succeeded);
        assert_eq!(
            m[1].note.as_deref(),
            Some("already runs the target version")
        );
        // a task of this campaign created before a crash is adopted, not sent again
        assert_eq!(
            (m[2].status, m[2].task_id, m[2].attempts),
            (MemberStatus::InFlight, Some(5), 1)
        );
        assert_eq!(m[3].status, MemberStatus::Skipped);
        assert!(
            m[3].note
                .as_deref()
                .unwrap()
                .starts_with("conflict: the device has active task 6")
        );
        assert_eq!(p.changed, [0, 1, 2, 3]);
        assert!(p.start.is_empty());
        // forced, the busy device is started anyway
        let mut c = c;
        c.force = true;
        let p = decide(&c, vec![queued("busy", 0)], &w, NOW).unwrap();
        assert_eq!(started(&p), ["busy"]);
    }

    #[test]
    fn failures_are_retried_with_growing_backoff_until_retries_run_out() {
        let mut c = campaign(CampaignStatus::Running);
        c.retries = 2;
        c.failure_min_count = 100; // the gate stays out of it
        let w = World::default()
            .task(1, "a", TaskStatus::Failed, Some("c1"))
            .device("a", "1.0.1", None, true);
        let mut next = Vec::new();
        for attempts in 1..=3 {
            let mut m = in_flight("a", 0, 1);
            m.attempts = attempts;
            let p = decide(&c, vec![m], &w, NOW).unwrap();
            let m = &p.members[0];
            next.push((m.status, m.next_attempt_ms - NOW));
            assert_eq!(p.changed, [0]);
            assert!(p.start.is_empty(), "a retry waits for its backoff");
        }
        assert_eq!(next[0], (MemberStatus::Queued, 30_000));
        assert_eq!(next[1], (MemberStatus::Queued, 60_000));
        assert_eq!(next[2].0, MemberStatus::Failed, "retries ran out");
        // the retry note names the failure; once due, the member starts again
        let mut m = in_flight("a", 0, 1);
        m.attempts = 1;
        let p = decide(&c, vec![m], &w, NOW).unwrap();
        assert_eq!(
            p.members[0].note.as_deref(),
            Some("retrying after DOWNLOAD_FAILED: cut")
        );
        let due = p.members[0].next_attempt_ms;
        let p = decide(&c, p.members, &w, due).unwrap();
        assert_eq!(started(&p), ["a"]);
        // a cancelled task is not retried
        let w = World::default().task(1, "a", TaskStatus::Cancelled, Some("c1"));
        let p = decide(&c, vec![in_flight("a", 0, 1)], &w, NOW).unwrap();
        assert_eq!(p.members[0].status, MemberStatus::Failed);
        assert_eq!(backoff_ms(6), backoff_ms(60));
        assert_eq!(backoff_ms(60), 30 * 60_000);
    }

    #[test]
    fn a_completed_member_that_rolls_back_is_a_failure() {
        let mut c = campaign(CampaignStatus::Running);
        c.retries = 0;
        let mut m = in_flight("a", 0, 1);
        m.status = MemberStatus::Succeeded;
        let w = World::default().task(1, "a", TaskStatus::Failed, Some("c1"));
        let p = decide(&c, vec![m, in_flight("b", 1, 2)], &w, NOW).unwrap();
        assert_eq!(p.members[0].status, MemberStatus::Failed);
        assert_eq!(
            p.members[0].note.as_deref(),
            Some("after completing: DOWNLOAD_FAILED: cut")
        );
        // one of one finished devices failed: the failure gate pauses
        assert_eq!(p.events, vec![Event::Paused]);
        let c2 = p.campaign.unwrap();
        assert_eq!(c2.status, CampaignStatus::Paused);
        assert!(
            c2.status_reason
                .unwrap()
                .starts_with("failure threshold crossed: 1 of 1")
        );
    }

    #[test]
    fn the_failure_gate_counts_only_failures_since_the_last_resume() {
        let mut c = campaign(CampaignStatus::Running);
        c.failure_percent = 50.0;
        c.failure_min_count = 2;
        c.retries = 0;
        c.success_threshold = 0.0; // the success gate stays out of it
        let w = World::default()
            .task(1, "a", TaskStatus::Failed, Some("c1"))
            .task(2, "b", TaskStatus::Failed, Some("c1"))
            .task(3, "c", TaskStatus::Completed, Some("c1"))
            .settled(3);
        let members = || {
            vec![
                in_flight("a", 0, 1),
                in_flight("b", 0, 2),
                in_flight("c", 0, 3),
                in_flight("d", 1, 4),
            ]
        };
        // 2 of 3 finished failed: at least 2 and 67 % >= 50 %
        let p = decide(&c, members(), &w, NOW).unwrap();
        assert_eq!(p.events, vec![Event::Paused]);
        // after a resume that acknowledged one of them, 1 new failure is under the minimum
        c.failures_acknowledged = 1;
        let p = decide(&c, members(), &w, NOW).unwrap();
        assert!(p.events.is_empty(), "{:?}", p.events);
        assert!(p.campaign.is_none());
    }

    #[test]
    fn a_wave_opens_only_when_the_one_before_met_the_success_threshold() {
        let mut c = campaign(CampaignStatus::Running);
        c.success_threshold = 90.0;
        c.failure_min_count = 100;
        c.retries = 0;
        // wave 1: ten devices; nine completed and settled, one failed
        let mut members = Vec::new();
        let mut w = World::default();
        for i in 0..10u64 {
            let id = format!("w1-{i}");
            let mut m = in_flight(&id, 0, i + 1);
            if i < 9 {
                m.status = MemberStatus::Succeeded;
                w = w
                    .task(i + 1, &id, TaskStatus::Completed, Some("c1"))
                    .settled(i + 1);
            } else {
                m.status = MemberStatus::Failed;
            }
            members.push(m);
        }
        members.push(queued("w2", 1));
        w = w.device("w2", "1.0.1", None, true);
        // 9 of 10 = 90 % >= 90 %: wave 2 starts
        let p = decide(&c, members.clone(), &w, NOW).unwrap();
        assert_eq!(started(&p), ["w2"]);
        // while a completed device has not shown the new image yet, wave 1 is not over
        let unsettled = World {
            tasks: w.tasks.clone(),
            devices: w.devices.clone(),
            settled: w.settled.iter().copied().filter(|&t| t != 9).collect(),
            joining: Vec::new(),
        };
        let p = decide(&c, members.clone(), &unsettled, NOW).unwrap();
        assert!(p.start.is_empty());
        // one of the nine failed after all: 8 of 10 < 90 %, the gate pauses
        let w = w.task(1, "w1-0", TaskStatus::Failed, Some("c1"));
        let p = decide(&c, members, &w, NOW).unwrap();
        let c2 = p.campaign.as_ref().unwrap();
        assert_eq!(c2.status, CampaignStatus::Paused);
        assert_eq!(
            c2.status_reason.as_deref(),
            Some(
                "wave 1 reached 8 of 10 succeeded, below the success threshold of 90%; resume to continue"
            )
        );
        assert_eq!(c2.failures_acknowledged, 2);
        assert!(p.start.is_empty());
    }

    #[test]
    fn a_campaign_completes_once_every_member_ended_and_successes_are_settled() {
        let c = campaign(CampaignStatus::Running);
        let mut done = in_flight("a", 0, 1);
        done.status = MemberStatus::Succeeded;
        let mut skipped = queued("b", 1);
        skipped.status = MemberStatus::Skipped;
        let w = World::default().task(1, "a", TaskStatus::Completed, Some("c1"));
        // completed, not yet shown to run the new image: not the end
        let p = decide(&c, vec![done.clone(), skipped.clone()], &w, NOW).unwrap();
        assert!(p.campaign.is_none());
        let w = w.settled(1);
        let p = decide(&c, vec![done, skipped], &w, NOW).unwrap();
        assert_eq!(
            p.events,
            vec![Event::Completed {
                succeeded: 1,
                failed: 0
            }]
        );
        let c2 = p.campaign.unwrap();
        assert_eq!(
            (c2.status, c2.ended_at_ms),
            (CampaignStatus::Completed, Some(NOW))
        );
        assert_eq!(c2.status_reason.as_deref(), Some("1 succeeded, 0 failed"));
    }

    #[test]
    fn an_in_flight_member_whose_task_completed_succeeds() {
        let c = campaign(CampaignStatus::Running);
        let w = World::default().task(1, "a", TaskStatus::Completed, Some("c1"));
        let p = decide(&c, vec![in_flight("a", 0, 1), queued("b", 1)], &w, NOW).unwrap();
        assert_eq!(p.members[0].status, MemberStatus::Succeeded);
        assert_eq!(p.changed, [0]);
    }

    #[test]
    fn a_dynamic_campaign_takes_in_devices_into_its_last_wave_while_running() {
        let mut c = campaign(CampaignStatus::Running);
        c.dynamic = true;
        let mut w = World::default()
            .device("new", "1.0.1", None, true)
            .device("a", "1.0.1", None, false);
        w.joining = vec!["a".into(), "new".into()];
        let p = decide(&c, vec![queued("a", 0)], &w, NOW).unwrap();
        assert_eq!(p.events, vec![Event::Joined("new".into())]);
        let m = &p.members[1];
        assert_eq!(
            (m.device_id.as_str(), m.wave, m.status),
            ("new", 1, MemberStatus::Queued)
        );
        assert_eq!(m.note.as_deref(), Some("joined later (dynamic campaign)"));
        assert_eq!(p.changed, [1]);
        // wave 2 is not open while "a" (offline) has not ended
        assert!(p.start.is_empty());
        // paused: devices join (and wait there like the others), nobody starts
        c.status = CampaignStatus::Paused;
        let p = decide(&c, vec![queued("a", 0)], &w, NOW).unwrap();
        assert_eq!(p.events, vec![Event::Joined("new".into())]);
        assert!(p.start.is_empty());
        // scheduled or ended: nobody joins
        for st in [CampaignStatus::Completed, CampaignStatus::Cancelled] {
            c.status = st;
            let p = decide(&c, vec![queued("a", 0)], &w, NOW).unwrap();
            assert!(p.events.is_empty() && p.members.len() == 1, "{st:?}");
        }
    }

    #[test]
    fn a_dynamic_campaign_no_device_joined_yet_waits_for_its_first() {
        let mut c = campaign(CampaignStatus::Running);
        c.dynamic = true;
        let w = World::default();
        let p = decide(&c, vec![], &w, NOW).unwrap();
        assert!(
            p.campaign.is_none() && p.events.is_empty(),
            "{:?}",
            p.events
        );
        // one that is not dynamic has nothing to wait for
        c.dynamic = false;
        let p = decide(&c, vec![], &w, NOW).unwrap();
        assert_eq!(
            p.campaign.map(|c| c.status),
            Some(CampaignStatus::Completed)
        );
    }

    #[test]
    fn outside_its_window_a_running_campaign_follows_tasks_but_starts_nobody() {
        let mut c = campaign(CampaignStatus::Running);
        c.window = window_from_now(720);
        let w = World::default()
            .task(1, "a", TaskStatus::Completed, Some("c1"))
            .device("b", "1.0.1", None, true);
        let p = decide(&c, vec![in_flight("a", 0, 1), queued("b", 0)], &w, NOW).unwrap();
        assert_eq!(p.members[0].status, MemberStatus::Succeeded);
        assert!(p.start.is_empty());
    }

    #[test]
    fn failure_gate_edges() {
        // (failed, succeeded, percent, at least, acknowledged, pauses)
        let table = [
            (1, 1, 50.0, 1, 0, true), // exactly the percentage
            (1, 2, 50.0, 1, 0, false),
            (2, 2, 50.0, 3, 0, false), // under the minimum count
            (3, 3, 50.0, 3, 0, true),
            (3, 3, 50.0, 3, 1, false), // one acknowledged by a resume
            (1, 99, 1.0, 1, 0, true),
            (1, 0, 100.0, 0, 0, true), // a minimum of 0 counts as 1
            (0, 5, 0.0, 0, 0, false),
        ];
        for (i, (failed, ok, percent, min, acked, pauses)) in table.into_iter().enumerate() {
            let mut c = campaign(CampaignStatus::Running);
            (
                c.failure_percent,
                c.failure_min_count,
                c.failures_acknowledged,
            ) = (percent, min, acked);
            c.success_threshold = 0.0;
            let mut members: Vec<CampaignMember> = (0..failed + ok)
                .map(|k| {
                    let mut m = in_flight(&format!("d{k}"), 0, 0);
                    m.task_id = None;
                    m.status = if k < failed {
                        MemberStatus::Failed
                    } else {
                        MemberStatus::Succeeded
                    };
                    m
                })
                .collect();
            members.push(queued("later", 1));
            let p = decide(&c, members, &World::default(), NOW).unwrap();
            assert_eq!(
                p.events == [Event::Paused],
                pauses,
                "row {i}: {:?}",
                p.events
            );
        }
    }
}
