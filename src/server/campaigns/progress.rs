//! Where a campaign stands, as a pure function of its record, its members with their tasks and
//! presence, and the time: one state per member (counts add up to the total), per wave too;
//! devices waiting for a retry and failures grouped by error code, by name; bytes and rates; an
//! ETA that counts down from the last device that finished and never grows while nothing moves;
//! and, for a campaign that waits, when it will go on and why. The API, the CLI and the console
//! all show this, so they cannot disagree. No I/O, no clock of its own.

use std::collections::BTreeMap;

use crate::server::store::{
    CampaignMember, CampaignRecord, CampaignStatus, MemberStatus, TaskRecord,
};

/// One member with what the caller found out about it.
#[derive(Debug, Clone, Copy)]
pub struct MemberView<'a> {
    /// The member.
    pub member: &'a CampaignMember,
    /// Its current or last task, if it has one.
    pub task: Option<&'a TaskRecord>,
    /// Its device is connected now.
    pub online: bool,
    /// Its task completed and the device showed it runs the new image (`Ota::settled`).
    pub settled: bool,
}

/// The states a member is counted in, in the order they are listed.
pub const STATES: [&str; 11] = [
    "queued",
    "offline",
    "retrying",
    "pending",
    "downloading",
    "verifying",
    "installing",
    "completed",
    "failed",
    "cancelled",
    "skipped",
];

/// Counts per state.
pub type Counts = BTreeMap<&'static str, u64>;

fn empty() -> Counts {
    STATES.iter().map(|s| (*s, 0)).collect()
}

/// A device waiting for another attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrying {
    /// The device.
    pub device_id: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Not before (ms since the epoch).
    pub next_attempt_ms: i64,
    /// What the last attempt ended with.
    pub last_error: String,
}

/// The failed devices of one error code.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureGroup {
    /// The task's `errorCode` (`ROLLED_BACK`, `DOWNLOAD_FAILED`, `TIMEOUT`, ...).
    pub code: String,
    /// The error message of one of them (the first by device id), as its device said it.
    pub message: Option<String>,
    /// Their device ids, sorted.
    pub devices: Vec<String>,
}

/// One wave.
#[derive(Debug, Clone)]
pub struct WaveProgress {
    /// 1-based.
    pub wave: u32,
    /// Cumulative percent of the target set.
    pub percent: f64,
    /// Devices in it.
    pub devices: usize,
    /// Per state.
    pub counts: Counts,
}

/// Where a campaign stands.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Every member.
    pub total: usize,
    /// Per state (they add up to `total`).
    pub counts: Counts,
    /// Completed, but the device has not shown yet that it runs the new image.
    pub unconfirmed: u64,
    /// Per wave.
    pub waves: Vec<WaveProgress>,
    /// The first wave with a device not finished, while the campaign is live.
    pub current_wave: Option<u32>,
    /// Percent of the eligible (not skipped) members.
    pub success_rate: f64,
    /// Percent of the eligible members.
    pub failure_rate: f64,
    /// Bytes of full images the members downloaded (the whole file once a device got past
    /// downloading, else the share it reported: a cut-off download counts what it got).
    pub bytes_full: u64,
    /// The same for patches.
    pub bytes_delta: u64,
    /// Seconds until the last device should finish, at the pace so far; `None` when unknown
    /// (nothing finished yet, or the campaign waits, is paused or ended).
    pub eta_secs: Option<u64>,
    /// Devices waiting for a retry.
    pub retrying: Vec<Retrying>,
    /// Failed devices by error code, most frequent first.
    pub failures: Vec<FailureGroup>,
    /// Skipped devices and why.
    pub skipped: Vec<(String, String)>,
    /// Why the campaign is where it is, in words: what it waits for and until when, or its
    /// verdict once completed.
    pub status_reason: Option<String>,
    /// Members the brake cancelled whose device installed the target anyway (counted as
    /// completed).
    pub installed_after_brake: u64,
}

/// The state a member is counted in.
fn state(v: &MemberView<'_>) -> &'static str {
    let m = v.member;
    let task_state = || v.task.map(|t| t.status.as_str());
    match m.status {
        MemberStatus::Queued if m.attempts > 0 => "retrying",
        MemberStatus::Queued if !v.online => "offline",
        MemberStatus::Queued => "queued",
        MemberStatus::InFlight => task_state().unwrap_or("pending"),
        // a device that came back on its old version after completing is a failure, whether
        // or not the engine has followed it yet
        MemberStatus::Succeeded => match task_state() {
            Some("failed") => "failed",
            _ => "completed",
        },
        MemberStatus::Failed => "failed",
        MemberStatus::Skipped => "skipped",
        // a device that installed the target although the brake cancelled its task (its
        // protocol has no cancel message) runs the new version: that is what counts
        MemberStatus::Cancelled => match v.task {
            Some(t) if crate::server::ota::state::installed_after_cancel(t) => "completed",
            _ => "cancelled",
        },
    }
}

/// The bytes a task's device downloaded, as far as its reports say: the whole file (the patch
/// when a delta was offered) once it got past downloading, else the share it reported — also
/// for a task that failed or was cancelled on the way.
fn downloaded(t: &TaskRecord) -> (u64, bool) {
    use crate::server::store::TaskStatus as S;
    let (size, delta) = match &t.delta {
        Some(d) => (d.size, true),
        None => (t.file_size, false),
    };
    let past = |s: S| matches!(s, S::Verifying | S::Installing | S::Completed);
    let whole = past(t.status) || t.events.iter().any(|e| past(e.status));
    let share = if whole {
        100
    } else {
        t.events
            .iter()
            .filter(|e| e.status == S::Downloading)
            .map(|e| e.progress)
            .max()
            .unwrap_or(0)
            .min(100)
    };
    (size * share as u64 / 100, delta)
}

/// The error code of a failed member.
fn failure_code(v: &MemberView<'_>) -> String {
    v.task
        .filter(|t| !t.status.is_active())
        .and_then(|t| t.error_code.clone())
        .unwrap_or_else(|| "NOT_STARTED".into())
}

/// A duration in words: "3 h 12 min", "45 s".
pub fn in_words(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// Local time of the appliance, RFC 3339 with its offset.
pub fn local_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .with_timezone(&chrono::Local)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

/// `HH:MM–HH:MM` of a window (start minute of the day, duration in minutes).
pub fn window_words((start, dur): (u32, u32)) -> String {
    let end = (start + dur) % 1440;
    format!(
        "{:02}:{:02}–{:02}:{:02}",
        start / 60,
        start % 60,
        end / 60,
        end % 60
    )
}

/// Why a live campaign waits, if it does: for its start time, for its window to open.
pub fn waiting_for_start(c: &CampaignRecord, now: i64) -> Option<String> {
    if c.status == CampaignStatus::Scheduled && now < c.start_at_ms {
        let mut why = format!(
            "scheduled: starts at {} (in {}), its startAt",
            local_time(c.start_at_ms),
            in_words((c.start_at_ms - now) / 1000)
        );
        if let Some(w) = c.window
            && let Some(open) = super::next_window_opening(Some(w), c.start_at_ms)
            && open > c.start_at_ms
        {
            why.push_str(&format!(
                ", then waits for its daily window {} (local time), which opens at {}",
                window_words(w),
                local_time(open)
            ));
        }
        return Some(why);
    }
    let w = c.window?;
    let open = super::next_window_opening(Some(w), now)?;
    if open <= now {
        return None;
    }
    let what = match c.status {
        CampaignStatus::Scheduled => "scheduled: waits for",
        CampaignStatus::Running => "outside",
        _ => return None,
    };
    let rest = if c.status == CampaignStatus::Running {
        "; starts no device until then, devices already upgrading finish"
    } else {
        ""
    };
    Some(format!(
        "{what} its daily window {} (local time of the appliance): opens at {} (in {}){rest}",
        window_words(w),
        local_time(open),
        in_words((open - now) / 1000)
    ))
}

/// Where the campaign stands at `now`.
pub fn compute(c: &CampaignRecord, members: &[MemberView<'_>], now: i64) -> Progress {
    let mut t = Tally::new(c);
    for v in members {
        t.add(v);
    }
    let total = members.len();
    let eligible = total as u64 - t.counts["skipped"];
    let pct = |n: u64| {
        if eligible == 0 {
            0.0
        } else {
            (n as f64 * 10_000.0 / eligible as f64).round() / 100.0
        }
    };
    let waiting = waiting_for_start(c, now);
    let eta_secs = eta(c, &t, eligible, waiting.is_some(), now);
    let current_wave = c
        .status
        .is_live()
        .then(|| {
            t.waves
                .iter()
                .find(|w| STATES[..7].iter().map(|s| w.counts[*s]).sum::<u64>() > 0)
                .map(|w| w.wave)
        })
        .flatten();
    let status_reason = reason(c, &t, total, waiting, now);
    Progress {
        installed_after_brake: t.installed_after_brake,
        total,
        success_rate: pct(t.counts["completed"]),
        failure_rate: pct(t.counts["failed"]),
        failures: t.failure_groups(),
        counts: t.counts,
        unconfirmed: t.unconfirmed,
        waves: t.waves,
        current_wave,
        bytes_full: t.bytes_full,
        bytes_delta: t.bytes_delta,
        eta_secs,
        retrying: t.retrying,
        skipped: t.skipped,
        status_reason,
    }
}

/// What the members add up to, member by member.
struct Tally {
    counts: Counts,
    waves: Vec<WaveProgress>,
    bytes_full: u64,
    bytes_delta: u64,
    unconfirmed: u64,
    retrying: Vec<Retrying>,
    by_code: BTreeMap<String, Vec<(String, Option<String>)>>,
    installed_after_brake: u64,
    skipped: Vec<(String, String)>,
    last_finish: Option<i64>,
    rolled_back_late: u64,
}

impl Tally {
    fn new(c: &CampaignRecord) -> Tally {
        Tally {
            counts: empty(),
            waves: c
                .waves
                .iter()
                .enumerate()
                .map(|(i, p)| WaveProgress {
                    wave: i as u32 + 1,
                    percent: *p,
                    devices: 0,
                    counts: empty(),
                })
                .collect(),
            bytes_full: 0,
            bytes_delta: 0,
            unconfirmed: 0,
            retrying: Vec::new(),
            by_code: BTreeMap::new(),
            installed_after_brake: 0,
            skipped: Vec::new(),
            last_finish: None,
            rolled_back_late: 0,
        }
    }

    /// One member: its state counted (in all and in its wave), its bytes, and what its state
    /// says more (a retry, a failure's code and message, an unconfirmed completion, a skip).
    fn add(&mut self, v: &MemberView<'_>) {
        let m = v.member;
        let st = state(v);
        *self.counts.get_mut(st).expect("listed") += 1;
        if let Some(t) = v.task {
            match downloaded(t) {
                (n, true) => self.bytes_delta += n,
                (n, false) => self.bytes_full += n,
            }
        }
        if let Some(w) = self.waves.get_mut(m.wave as usize) {
            w.devices += 1;
            *w.counts.get_mut(st).expect("listed") += 1;
        }
        match st {
            "retrying" => self.retrying.push(Retrying {
                device_id: m.device_id.clone(),
                attempts: m.attempts,
                next_attempt_ms: m.next_attempt_ms,
                last_error: m
                    .note
                    .as_deref()
                    .unwrap_or("")
                    .trim_start_matches("retrying after ")
                    .to_string(),
            }),
            "failed" => {
                self.by_code.entry(failure_code(v)).or_default().push((
                    m.device_id.clone(),
                    v.task
                        .filter(|t| !t.status.is_active())
                        .and_then(|t| t.error_message.clone()),
                ));
                if m.status == MemberStatus::Succeeded {
                    self.rolled_back_late += 1;
                }
            }
            "completed" => {
                if v.task.is_some() && !v.settled {
                    self.unconfirmed += 1;
                }
                if m.status == MemberStatus::Cancelled {
                    self.installed_after_brake += 1;
                }
            }
            "skipped" => self
                .skipped
                .push((m.device_id.clone(), m.note.clone().unwrap_or_default())),
            _ => {}
        }
        if matches!(st, "completed" | "failed") {
            let at = v
                .task
                .and_then(|t| t.complete_time_ms)
                .unwrap_or(m.updated_at_ms);
            self.last_finish = Some(self.last_finish.map_or(at, |l| l.max(at)));
        }
    }

    /// Failed devices by error code (with one of their messages), most frequent first.
    fn failure_groups(&mut self) -> Vec<FailureGroup> {
        let mut out: Vec<FailureGroup> = std::mem::take(&mut self.by_code)
            .into_iter()
            .map(|(code, mut devices)| {
                devices.sort();
                let message = devices.iter().find_map(|(_, m)| m.clone());
                FailureGroup {
                    code,
                    message,
                    devices: devices.into_iter().map(|(d, _)| d).collect(),
                }
            })
            .collect();
        out.sort_by_key(|f| std::cmp::Reverse(f.devices.len()));
        out
    }
}

/// Seconds to go at the pace up to the last finish, counted down since: it only shrinks while
/// nothing moves, and is gone (unknown) once that pace is overdue; 0 when nothing remains.
fn eta(c: &CampaignRecord, t: &Tally, eligible: u64, waiting: bool, now: i64) -> Option<u64> {
    let finished = t.counts["completed"] + t.counts["failed"];
    let remaining = eligible.saturating_sub(finished + t.counts["cancelled"]);
    match (c.status, c.started_at_ms, t.last_finish) {
        _ if remaining == 0 && c.status.is_live() => Some(0),
        (CampaignStatus::Running, Some(start), Some(last)) if !waiting && finished > 0 => {
            let per_device = (last - start).max(1) as f64 / finished as f64;
            let end = last as f64 + per_device * remaining as f64;
            let left = ((end - now as f64) / 1000.0).ceil();
            (left > 0.0).then_some(left as u64)
        }
        _ => None,
    }
}

/// Why the campaign is where it is: the verdict of a completed one, what a live one waits for,
/// what the brake could do.
fn reason(
    c: &CampaignRecord,
    t: &Tally,
    total: usize,
    waiting: Option<String>,
    now: i64,
) -> Option<String> {
    let counts = &t.counts;
    match c.status {
        CampaignStatus::Completed => {
            let mut v = format!(
                "{} succeeded, {} failed",
                counts["completed"], counts["failed"]
            );
            if counts["skipped"] > 0 {
                v.push_str(&format!(", {} skipped", counts["skipped"]));
            }
            if t.rolled_back_late > 0 {
                v.push_str(&format!(
                    " ({} came back on their old version after the campaign ended)",
                    t.rolled_back_late
                ));
            }
            Some(v)
        }
        _ if c.status.is_live() && c.dynamic && total == 0 => Some(format!(
            "{}waits for devices of type {} matching its targets: none is registered yet, they join as they register",
            c.status_reason
                .as_ref()
                .map(|r| format!("{r}; "))
                .unwrap_or_default(),
            c.device_type
        )),
        CampaignStatus::Scheduled | CampaignStatus::Running => waiting
            .or_else(|| running_reason(c, counts, t.unconfirmed, &t.retrying, now))
            .or_else(|| c.status_reason.clone()),
        CampaignStatus::Cancelled if t.installed_after_brake > 0 => {
            c.status_reason.as_ref().map(|r| {
                format!(
                    "{r}; {} of them installed the new version anyway",
                    t.installed_after_brake
                )
            })
        }
        _ => c.status_reason.clone(),
    }
}

/// What a running campaign with nothing in flight waits for.
fn running_reason(
    c: &CampaignRecord,
    counts: &Counts,
    unconfirmed: u64,
    retrying: &[Retrying],
    now: i64,
) -> Option<String> {
    if c.status != CampaignStatus::Running {
        return None;
    }
    let in_flight: u64 = STATES[3..7].iter().map(|s| counts[*s]).sum();
    if in_flight > 0 || counts["queued"] > 0 {
        return None;
    }
    let mut parts = Vec::new();
    if counts["offline"] > 0 {
        parts.push(format!("{} offline devices to connect", counts["offline"]));
    }
    if let Some(next) = retrying.iter().map(|r| r.next_attempt_ms).min() {
        parts.push(format!(
            "{} devices to be retried (the next in {})",
            retrying.len(),
            in_words((next - now) / 1000)
        ));
    }
    if unconfirmed > 0 {
        parts.push(format!(
            "{unconfirmed} devices to show they run the new version after their reboot"
        ));
    }
    (!parts.is_empty()).then(|| format!("waiting for {}", parts.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::campaigns::fixtures::{campaign, member};
    use crate::server::store::TaskStatus;

    fn task(status: TaskStatus, code: Option<&str>, done_at: i64) -> TaskRecord {
        let mut t = crate::server::store::sample_task(1, "x");
        t.status = status;
        t.error_code = code.map(Into::into);
        t.complete_time_ms = (!status.is_active()).then_some(done_at);
        t
    }

    #[test]
    fn every_member_is_counted_once_and_truthfully() {
        let c = campaign(CampaignStatus::Running);
        let ms = [
            member("A", 0, MemberStatus::Succeeded, 1),
            member("B", 0, MemberStatus::Succeeded, 1),
            member("C", 0, MemberStatus::Queued, 1),
            member("D", 1, MemberStatus::Queued, 0),
            member("E", 1, MemberStatus::Queued, 0),
            member("F", 1, MemberStatus::Failed, 2),
            member("G", 1, MemberStatus::InFlight, 1),
        ];
        let done = task(TaskStatus::Completed, None, 10_000);
        let rolled = task(TaskStatus::Failed, Some("ROLLED_BACK"), 10_000);
        let cut = task(TaskStatus::Failed, Some("DOWNLOAD_FAILED"), 20_000);
        let dl = task(TaskStatus::Downloading, None, 0);
        let views = [
            (Some(&done), true, true),
            // completed, then came back on the old version: failed, not completed
            (Some(&rolled), true, false),
            (None, true, false),
            (None, false, false),
            (None, true, false),
            (Some(&cut), true, false),
            (Some(&dl), true, false),
        ];
        let mv: Vec<MemberView> = ms
            .iter()
            .zip(views)
            .map(|(m, (task, online, settled))| MemberView {
                member: m,
                task,
                online,
                settled,
            })
            .collect();
        let p = compute(&c, &mv, 30_000);
        let get = |s: &str| p.counts[s];
        assert_eq!(
            (
                get("completed"),
                get("failed"),
                get("retrying"),
                get("offline"),
                get("queued"),
                get("downloading")
            ),
            (1, 2, 1, 1, 1, 1)
        );
        assert_eq!(p.counts.values().sum::<u64>(), 7);
        assert_eq!(p.retrying[0].device_id, "C");
        assert_eq!(p.retrying[0].last_error, "DOWNLOAD_FAILED: cut");
        let codes: Vec<(&str, usize)> = p
            .failures
            .iter()
            .map(|f| (f.code.as_str(), f.devices.len()))
            .collect();
        assert!(codes.contains(&("ROLLED_BACK", 1)) && codes.contains(&("DOWNLOAD_FAILED", 1)));
        assert_eq!(p.waves[0].counts["failed"], 1);
        assert_eq!(p.current_wave, Some(1));
    }

    #[test]
    fn the_eta_counts_down_and_never_grows_while_nothing_moves() {
        let c = campaign(CampaignStatus::Running);
        let ms = [
            member("A", 0, MemberStatus::Succeeded, 1),
            member("B", 0, MemberStatus::InFlight, 1),
            member("C", 0, MemberStatus::InFlight, 1),
        ];
        let done = task(TaskStatus::Completed, None, 10_000);
        let dl = task(TaskStatus::Downloading, None, 0);
        let mv: Vec<MemberView> = ms
            .iter()
            .enumerate()
            .map(|(i, m)| MemberView {
                member: m,
                task: Some(if i == 0 { &done } else { &dl }),
                online: true,
                settled: true,
            })
            .collect();
        // one device took 10 s: two more take 20 s from the last finish
        let etas: Vec<Option<u64>> = [10_000, 15_000, 29_000, 31_000, 600_000]
            .iter()
            .map(|now| compute(&c, &mv, *now).eta_secs)
            .collect();
        assert_eq!(etas, vec![Some(20), Some(15), Some(1), None, None]);
        // paused: no ETA at all
        let mut paused = c.clone();
        paused.status = CampaignStatus::Paused;
        assert_eq!(compute(&paused, &mv, 15_000).eta_secs, None);
    }

    #[test]
    fn a_completed_campaign_s_verdict_counts_late_rollbacks() {
        let c = campaign(CampaignStatus::Completed);
        let ms = [
            member("A", 0, MemberStatus::Succeeded, 1),
            member("B", 0, MemberStatus::Succeeded, 1),
        ];
        let done = task(TaskStatus::Completed, None, 1);
        let rolled = task(TaskStatus::Failed, Some("ROLLED_BACK"), 1);
        let mv = [
            MemberView {
                member: &ms[0],
                task: Some(&done),
                online: true,
                settled: true,
            },
            MemberView {
                member: &ms[1],
                task: Some(&rolled),
                online: true,
                settled: false,
            },
        ];
        let p = compute(&c, &mv, 5);
        assert_eq!(
            p.status_reason.as_deref(),
            Some(
                "1 succeeded, 1 failed (1 came back on their old version after the campaign ended)"
            )
        );
        assert_eq!(p.success_rate, 50.0);
    }

    #[test]
    fn a_waiting_campaign_says_until_when_and_why() {
        let mut c = campaign(CampaignStatus::Scheduled);
        c.start_at_ms = 3_600_000 * 5;
        let p = compute(&c, &[], 3_600_000);
        let why = p.status_reason.unwrap();
        assert!(why.starts_with("scheduled: starts at "), "{why}");
        assert!(why.contains("(in 4 h 0 min)"), "{why}");
        // a window that is closed now, whatever the local zone: opening in the future
        c.start_at_ms = 0;
        let now = crate::time::now_ms();
        use chrono::Timelike;
        let local = chrono::Local::now();
        let minute = local.hour() * 60 + local.minute();
        c.window = Some(((minute + 120) % 1440, 60));
        let why = compute(&c, &[], now).status_reason.unwrap();
        assert!(
            why.starts_with("scheduled: waits for its daily window "),
            "{why}"
        );
        assert!(
            why.contains("(in 1 h 59 min)") || why.contains("(in 2 h 0 min)"),
            "{why}"
        );
        c.status = CampaignStatus::Running;
        let why = compute(&c, &[], now).status_reason.unwrap();
        assert!(why.starts_with("outside its daily window"), "{why}");
    }
}
