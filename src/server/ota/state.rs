//! The task state machine as a pure function: `(task, input, now) -> outcome`. No I/O, no tokio,
//! no clock of its own; every rule of SPEC 4 about ordering lives here and is unit-tested.
//!
//! Rules: reports never move a task backwards (an earlier state, or less progress in the same
//! state, is stale); final states take no more reports, except that a device which comes back
//! on the old version after `completed` turns the task `failed / ROLLED_BACK`; the device
//! reporting the target version completes an active task; an active task that hears nothing
//! for the stall timeout fails with `TIMEOUT`; a failure that may be the delta's, while a
//! delta was offered, re-sends the command with the full image instead of failing; a command
//! goes out again when its device subscribes, unless it got it since.

use crate::server::store::{TaskEvent, TaskRecord, TaskStatus};

/// Something that happened to a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The command went out (first time or re-sent).
    CommandSent,
    /// A progress report. `status` is never `Pending` or `Cancelled` here.
    Progress {
        status: TaskStatus,
        progress: Option<u8>,
        error_code: Option<String>,
        error_message: Option<String>,
        /// A failure the delta may have caused (see [`super::reports::Step::Failed`]).
        delta_may_be_why: bool,
    },
    /// The device reported the version it runs (heartbeat / inform). `settled`: it has had
    /// time to boot what it installed (the reboot grace passed since the task completed and
    /// since the device last connected); an old version before then is not yet a rollback.
    Version { version: String, settled: bool },
    /// The device answered without changing anything (e.g. `state: pending`): liveness only.
    Alive,
    /// An operator cancelled it.
    Cancel { reason: String },
    /// The stall sweep looked at it; `dropped` is how many of the device's reports were
    /// dropped since one was last used, and why (so a timeout can say so).
    StallCheck {
        timeout_ms: i64,
        dropped: Option<(u64, &'static str)>,
    },
}

/// What to do with the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Persist this new version of the task.
    Changed(TaskRecord),
    /// Nothing changes but liveness: persist `last_activity_ms` only (no history entry).
    Touched(TaskRecord),
    /// Persist this new version of the task and send its command again (a delta failed on
    /// the device: the task goes on with the full image, without operator action).
    Resend(TaskRecord),
    /// Drop the input, for this reason.
    Ignored(Why),
}

/// Why an input changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The task already ended (a repeated report, a late command).
    Finished,
    /// The target version confirmed again after completion.
    Confirmed,
    /// The report would move the task backwards (an earlier state or less progress).
    Backwards,
    /// A state no device reports (`pending`, `cancelled`).
    Impossible,
    /// Stall check: the command has not been sent yet.
    NotSent,
    /// Stall check: the task heard from its device recently.
    NotStalled,
    /// The old version, within the reboot grace: not (yet) a rollback.
    RebootGrace,
}

/// The error code of a device that came back on its old version.
pub const ROLLED_BACK: &str = "ROLLED_BACK";

/// How a task's history starts the entry of a device that installed the target after its task
/// was cancelled (its protocol has no cancel message, or the message came too late).
pub const INSTALLED_AFTER_CANCEL: &str = "installed after the task was cancelled";

/// Whether the device of a completed task installed it after the task had been cancelled.
pub fn installed_after_cancel(t: &TaskRecord) -> bool {
    t.status == TaskStatus::Completed
        && t.events
            .iter()
            .rev()
            .take(4)
            .any(|e| e.note.starts_with(INSTALLED_AFTER_CANCEL))
}

/// A task made before its device ever said which version it ran (the tutorial's gateway sends
/// no heartbeat, only its reports' `currentVersion`) learns its `fromVersion` from the first
/// report that names one: the task as it should be stored, if that changes it.
pub fn learn_from_version(t: &TaskRecord, running: Option<&str>) -> Option<TaskRecord> {
    let v = running?;
    if t.from_version.is_some() || !t.status.is_active() || v == t.to_version {
        return None;
    }
    let mut n = t.clone();
    n.from_version = Some(v.to_string());
    Some(n)
}

/// A cancelled task whose device shows it installed the target anyway: `completed`, with an
/// entry that says so (what really happened wins over what was asked).
fn installed_anyway(t: &TaskRecord, now: i64, how: &str) -> Outcome {
    let mut n = change(
        t,
        now,
        TaskStatus::Completed,
        100,
        format!("{INSTALLED_AFTER_CANCEL}: {how}"),
    );
    n.complete_time_ms = Some(now);
    n.error_code = None;
    n.error_message = None;
    Outcome::Changed(n)
}

impl Why {
    /// In words, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Finished => "the task already ended",
            Why::Confirmed => "target version confirmed again",
            Why::Backwards => "stale report (would move backwards)",
            Why::Impossible => "a state a device cannot report",
            Why::NotSent => "command not sent yet",
            Why::NotStalled => "not stalled",
            Why::RebootGrace => "old version within the reboot grace",
        }
    }
}

fn rank(s: TaskStatus) -> u8 {
    match s {
        TaskStatus::Pending => 0,
        TaskStatus::Downloading => 1,
        TaskStatus::Verifying => 2,
        TaskStatus::Installing => 3,
        TaskStatus::Completed => 4,
        TaskStatus::Failed | TaskStatus::Cancelled => 5,
    }
}

fn change(t: &TaskRecord, now: i64, status: TaskStatus, progress: u8, note: String) -> TaskRecord {
    let mut n = t.clone();
    n.status = status;
    n.progress = progress;
    n.updated_at_ms = now;
    n.last_activity_ms = now;
    if !status.is_active() && n.complete_time_ms.is_none() {
        n.complete_time_ms = Some(now);
    }
    n.events.push(TaskEvent {
        at_ms: now,
        status,
        progress,
        note,
    });
    n
}

fn touch(t: &TaskRecord, now: i64) -> Outcome {
    let mut n = t.clone();
    n.last_activity_ms = now;
    Outcome::Touched(n)
}

/// Applies one input to a task at time `now` (milliseconds since the epoch).
pub fn apply(t: &TaskRecord, input: &Input, now: i64) -> Outcome {
    match input {
        Input::CommandSent => {
            if !t.status.is_active() {
                return Outcome::Ignored(Why::Finished);
            }
            let mut n = change(t, now, t.status, t.progress, "command sent".into());
            if n.start_time_ms.is_none() {
                n.start_time_ms = Some(now);
            }
            Outcome::Changed(n)
        }
        Input::Progress {
            status,
            progress,
            error_code,
            error_message,
            delta_may_be_why,
        } => {
            if t.status == TaskStatus::Cancelled && *status == TaskStatus::Completed {
                return installed_anyway(t, now, "the device reported completed");
            }
            if !t.status.is_active() {
                return Outcome::Ignored(Why::Finished);
            }
            match status {
                TaskStatus::Failed => failed(
                    t,
                    now,
                    error_code.as_deref(),
                    error_message,
                    *delta_may_be_why,
                ),
                TaskStatus::Completed => Outcome::Changed(change(
                    t,
                    now,
                    TaskStatus::Completed,
                    100,
                    "device reported completed".into(),
                )),
                TaskStatus::Pending | TaskStatus::Cancelled => Outcome::Ignored(Why::Impossible),
                s => advanced(t, now, *s, *progress),
            }
        }
        Input::Version { version, settled } => runs(t, now, version, *settled),
        Input::Alive => {
            if t.status.is_active() {
                touch(t, now)
            } else {
                Outcome::Ignored(Why::Finished)
            }
        }
        Input::Cancel { reason } => {
            if !t.status.is_active() {
                return Outcome::Ignored(Why::Finished);
            }
            let mut n = change(
                t,
                now,
                TaskStatus::Cancelled,
                t.progress,
                format!("cancelled: {reason}"),
            );
            n.error_code = Some("CANCELLED".into());
            n.error_message = Some(reason.clone());
            Outcome::Changed(n)
        }
        Input::StallCheck {
            timeout_ms,
            dropped,
        } => stalled(t, now, *timeout_ms, *dropped),
    }
}

/// A failure report: the full image again when the delta may be why (and one was offered),
/// else `failed` with the device's code.
fn failed(
    t: &TaskRecord,
    now: i64,
    code: Option<&str>,
    message: &Option<String>,
    delta_may_be_why: bool,
) -> Outcome {
    if delta_may_be_why && t.delta.is_some() {
        let note = "the device failed with the delta: re-sending the full image";
        let mut n = change(t, now, t.status, t.progress, note.into());
        n.delta = None;
        n.start_time_ms = n.start_time_ms.or(Some(now));
        return Outcome::Resend(n);
    }
    let code = code.unwrap_or("FAILED");
    let mut n = change(
        t,
        now,
        TaskStatus::Failed,
        t.progress,
        format!("failed: {code}"),
    );
    n.error_code = Some(code.into());
    n.error_message = message.clone();
    Outcome::Changed(n)
}

/// A stage report (`downloading`, `verifying`, `installing`): forward only; a repeat touches.
fn advanced(t: &TaskRecord, now: i64, s: TaskStatus, progress: Option<u8>) -> Outcome {
    let p = progress.unwrap_or(if rank(s) > rank(t.status) {
        0
    } else {
        t.progress
    });
    if rank(s) < rank(t.status) || (s == t.status && p < t.progress) {
        return Outcome::Ignored(Why::Backwards);
    }
    if s == t.status && p == t.progress {
        return touch(t, now);
    }
    let mut n = change(t, now, s, p, stage_note(s, p));
    // A stage report in the same tenth of progress as the entry before it (a report of the same
    // stage) replaces that entry: a transfer that reports every percent keeps about ten entries
    // per stage — the last of each tenth, with its time — not a hundred, and each report
    // rewrites a record that stays small.
    if let [.., prev, _] = n.events.as_slice()
        && prev.status == s
        && prev.progress / 10 == p / 10
        && prev.note == stage_note(s, prev.progress)
    {
        let at = n.events.len() - 2;
        n.events.remove(at);
    }
    Outcome::Changed(n)
}

/// The history's note of a stage report.
fn stage_note(s: TaskStatus, progress: u8) -> String {
    format!("{} {progress}%", s.as_str())
}

/// The device says it runs `v`: the target completes (or undoes a rollback), the old version
/// after installing is a rollback once `settled`.
fn runs(t: &TaskRecord, now: i64, v: &str, settled: bool) -> Outcome {
    if *v == t.to_version {
        if t.status.is_active() {
            return Outcome::Changed(change(
                t,
                now,
                TaskStatus::Completed,
                100,
                format!("device runs {v}"),
            ));
        }
        if t.status == TaskStatus::Cancelled {
            return installed_anyway(t, now, &format!("the device runs {v}"));
        }
        if t.status == TaskStatus::Failed && t.error_code.as_deref() == Some(ROLLED_BACK) {
            // it took longer than the reboot grace to boot the new image, but did
            let mut n = change(
                t,
                now,
                TaskStatus::Completed,
                100,
                format!("device runs {v} after all"),
            );
            n.error_code = None;
            n.error_message = None;
            return Outcome::Changed(n);
        }
        return Outcome::Ignored(Why::Confirmed);
    }
    // the version the task started from; when it was not known yet (the device had not said
    // which it ran when the task was made), any version but the target is the old one
    let on_old = match t.from_version.as_deref() {
        Some(from) => from == v,
        None => v != t.to_version,
    };
    // Alibaba devices inform their version when they start: step 100 is "installed,
    // rebooting", so the next inform decides.
    let installed = t.status == TaskStatus::Completed
        || (t.protocol == crate::protocol::Protocol::Alibaba
            && t.status == TaskStatus::Installing
            && t.progress == 100);
    if installed && on_old {
        if !settled {
            // still booting, or not rebooted yet: decided when the grace ends
            return Outcome::Ignored(Why::RebootGrace);
        }
        let mut n = change(
            t,
            now,
            TaskStatus::Failed,
            t.progress,
            format!("device came back on {v}"),
        );
        n.error_code = Some(ROLLED_BACK.into());
        n.error_message = Some(format!(
            "the device reported version {v} after installing {} and having had time to boot it",
            t.to_version
        ));
        // a completed task keeps the moment it ended first
        return Outcome::Changed(n);
    }
    if t.status.is_active() {
        return touch(t, now);
    }
    Outcome::Ignored(Why::Finished)
}

/// The stall sweep: a sent, active task silent for `timeout_ms` fails with `TIMEOUT`.
fn stalled(
    t: &TaskRecord,
    now: i64,
    timeout_ms: i64,
    dropped: Option<(u64, &'static str)>,
) -> Outcome {
    let Some(_) = t.start_time_ms else {
        return Outcome::Ignored(Why::NotSent);
    };
    if !t.status.is_active() || now - t.last_activity_ms < timeout_ms {
        return Outcome::Ignored(Why::NotStalled);
    }
    let mut n = change(
        t,
        now,
        TaskStatus::Failed,
        t.progress,
        "no report within the stall timeout".into(),
    );
    n.error_code = Some("TIMEOUT".into());
    let silent = (now - t.last_activity_ms) / 1000;
    n.error_message = Some(match dropped {
        Some((count, why)) => {
            format!("{count} reports dropped: {why}; none usable for {silent} s")
        }
        None => format!("no report from the device for {silent} s"),
    });
    Outcome::Changed(n)
}
/// Whether a device that just subscribed to its command topic (at `ready_ms`; `ready`: the
/// registry counts it subscribed) is sent its pending task's command again: one never sent, or
/// sent before the subscription and not answered since, or sent before this process started
/// (`started_ms`) — not one sent since it subscribed (a `firmware/get` answered meanwhile, a
/// campaign that just started), which it got: a second copy could start a second attempt.
pub fn resend_on_ready(t: &TaskRecord, ready: bool, ready_ms: i64, started_ms: i64) -> bool {
    ready
        && t.status == TaskStatus::Pending
        && (t.start_time_ms.is_none() || t.last_activity_ms < ready_ms || ready_ms <= started_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskStatus::*;

    fn task() -> TaskRecord {
        crate::server::store::sample_task(1, "GW1")
    }

    fn prog(s: TaskStatus, p: Option<u8>) -> Input {
        Input::Progress {
            status: s,
            progress: p,
            error_code: None,
            error_message: None,
            delta_may_be_why: false,
        }
    }

    fn changed(o: Outcome) -> TaskRecord {
        match o {
            Outcome::Changed(t) => t,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn happy_path_records_history_and_times() {
        let t = changed(apply(&task(), &Input::CommandSent, 10));
        assert_eq!(t.start_time_ms, Some(10));
        let t = changed(apply(&t, &prog(Downloading, Some(45)), 20));
        let t = changed(apply(&t, &prog(Verifying, None), 30));
        assert_eq!(t.progress, 0);
        let t = changed(apply(&t, &prog(Installing, Some(10)), 40));
        let t = changed(apply(&t, &prog(Completed, None), 50));
        assert_eq!(
            (t.status, t.progress, t.complete_time_ms),
            (Completed, 100, Some(50))
        );
        assert_eq!(t.events.len(), 5);
        assert_eq!(t.start_time_ms, Some(10));
    }

    #[test]
    fn reports_within_a_tenth_of_progress_keep_one_history_entry() {
        let mut t = changed(apply(&task(), &Input::CommandSent, 1));
        for p in 1..=100u8 {
            t = changed(apply(&t, &prog(Downloading, Some(p)), 1 + i64::from(p)));
        }
        let notes: Vec<_> = t.events.iter().map(|e| e.note.as_str()).collect();
        // the last report of each tenth, with its time; the command's entry stays
        assert_eq!(
            notes,
            [
                "command sent",
                "downloading 9%",
                "downloading 19%",
                "downloading 29%",
                "downloading 39%",
                "downloading 49%",
                "downloading 59%",
                "downloading 69%",
                "downloading 79%",
                "downloading 89%",
                "downloading 99%",
                "downloading 100%"
            ]
        );
        assert_eq!(t.events[3].at_ms, 30);
        assert_eq!((t.progress, t.updated_at_ms), (100, 101));
        // another stage, or an entry that is not a stage report, is never folded into
        let v = changed(apply(&t, &prog(Verifying, Some(100)), 200));
        assert_eq!(v.events.len(), t.events.len() + 1);
        let mut r = t.clone();
        r.events.last_mut().unwrap().note =
            "the device failed with the delta: re-sending the full image".into();
        r.progress = 95;
        r.events.last_mut().unwrap().progress = 95;
        let r2 = changed(apply(&r, &prog(Downloading, Some(96)), 300));
        assert_eq!(r2.events.len(), r.events.len() + 1);
    }

    #[test]
    fn every_backwards_or_stale_input_is_ignored() {
        let t = changed(apply(&task(), &prog(Installing, Some(50)), 1));
        for (s, p) in [
            (Downloading, Some(99)),
            (Verifying, Some(100)),
            (Installing, Some(49)),
        ] {
            assert!(
                matches!(apply(&t, &prog(s, p), 2), Outcome::Ignored(_)),
                "{s:?} {p:?}"
            );
        }
        assert!(
            matches!(apply(&t, &prog(Installing, Some(50)), 2), Outcome::Touched(x) if x.last_activity_ms == 2)
        );
        assert!(matches!(
            apply(&t, &prog(Pending, None), 2),
            Outcome::Ignored(_)
        ));
        assert!(matches!(
            apply(&t, &prog(Cancelled, None), 2),
            Outcome::Ignored(_)
        ));
        // finished tasks take nothing (but a cancelled task's device that says it completed:
        // see installed_after_a_cancel_is_a_completion)
        for done in [Completed, Failed, Cancelled] {
            let mut f = t.clone();
            f.status = done;
            for s in [Downloading, Verifying, Installing, Completed, Failed] {
                if (done, s) == (Cancelled, Completed) {
                    continue;
                }
                assert!(
                    matches!(apply(&f, &prog(s, Some(100)), 3), Outcome::Ignored(_)),
                    "{done:?} <- {s:?}"
                );
            }
            assert!(matches!(
                apply(&f, &Input::Cancel { reason: "x".into() }, 3),
                Outcome::Ignored(_)
            ));
            assert!(matches!(
                apply(&f, &Input::CommandSent, 3),
                Outcome::Ignored(_)
            ));
        }
    }

    #[test]
    fn failure_carries_the_code() {
        let t = changed(apply(
            &task(),
            &Input::Progress {
                status: Failed,
                progress: None,
                error_code: Some("MD5_MISMATCH".into()),
                error_message: Some("bad".into()),
                delta_may_be_why: false,
            },
            5,
        ));
        assert_eq!(
            (t.status, t.error_code.as_deref(), t.complete_time_ms),
            (Failed, Some("MD5_MISMATCH"), Some(5))
        );
    }

    fn version(v: &str, settled: bool) -> Input {
        Input::Version {
            version: v.into(),
            settled,
        }
    }

    #[test]
    fn version_reports_complete_or_roll_back() {
        let t = changed(apply(&task(), &prog(Installing, Some(100)), 1));
        // a gateway still installing may report from its old image
        for settled in [false, true] {
            assert!(matches!(
                apply(&t, &version("1.0.1", settled), 2),
                Outcome::Touched(_)
            ));
        }
        let done = changed(apply(&t, &version("1.0.2", false), 3));
        assert_eq!((done.status, done.complete_time_ms), (Completed, Some(3)));
        assert!(matches!(
            apply(&done, &version("1.0.2", true), 4),
            Outcome::Ignored(Why::Confirmed)
        ));
        // the old version before the device had time to boot the new one: not yet
        assert!(matches!(
            apply(&done, &version("1.0.1", false), 5),
            Outcome::Ignored(Why::RebootGrace)
        ));
        let rb = changed(apply(&done, &version("1.0.1", true), 5));
        assert_eq!(
            (rb.status, rb.error_code.as_deref()),
            (Failed, Some(ROLLED_BACK))
        );
        assert_eq!(rb.complete_time_ms, Some(3));
        // it booted the new image after all, later than the grace: completed again
        let back = changed(apply(&rb, &version("1.0.2", true), 9));
        assert_eq!((back.status, back.error_code), (Completed, None));
        // an unrelated version after completion changes nothing
        assert!(matches!(
            apply(&done, &version("0.9", true), 6),
            Outcome::Ignored(Why::Finished)
        ));
        // a task made before the device said what it ran: back on anything but the target is
        // the old version too (it never rolled back before, found by tests/sim.rs once)
        let mut unknown = done.clone();
        unknown.from_version = None;
        assert!(matches!(
            apply(&unknown, &version("1.0.1", false), 5),
            Outcome::Ignored(Why::RebootGrace)
        ));
        let rb = changed(apply(&unknown, &version("1.0.1", true), 5));
        assert_eq!(
            (rb.status, rb.error_code.as_deref()),
            (Failed, Some(ROLLED_BACK))
        );
        // a failure of another kind is not undone by a version report
        let mut failed = done.clone();
        failed.status = Failed;
        failed.error_code = Some("DOWNLOAD_FAILED".into());
        assert!(matches!(
            apply(&failed, &version("1.0.2", true), 7),
            Outcome::Ignored(_)
        ));
    }

    #[test]
    fn an_alibaba_device_back_on_its_old_version_after_step_100_rolled_back() {
        let mut t = task();
        t.protocol = crate::protocol::Protocol::Alibaba;
        let t = changed(apply(&t, &prog(Downloading, Some(50)), 1));
        // before step 100 the inform of the old version is just a sign of life
        assert!(matches!(
            apply(&t, &version("1.0.1", true), 2),
            Outcome::Touched(_)
        ));
        let t = changed(apply(&t, &prog(Installing, Some(100)), 3));
        assert!(matches!(
            apply(&t, &version("1.0.1", false), 4),
            Outcome::Ignored(Why::RebootGrace)
        ));
        let rb = changed(apply(&t, &version("1.0.1", true), 5));
        assert_eq!(
            (rb.status, rb.error_code.as_deref(), rb.complete_time_ms),
            (Failed, Some(ROLLED_BACK), Some(5))
        );
    }

    const STALL: Input = Input::StallCheck {
        timeout_ms: 10,
        dropped: None,
    };

    #[test]
    fn stall_timeout_only_after_the_command_went_out() {
        let t = task();
        assert!(matches!(apply(&t, &STALL, 1000), Outcome::Ignored(_)));
        let t = changed(apply(&t, &Input::CommandSent, 100));
        assert!(matches!(apply(&t, &STALL, 109), Outcome::Ignored(_)));
        let f = changed(apply(&t, &STALL, 110));
        assert_eq!(
            (f.status, f.error_code.as_deref()),
            (Failed, Some("TIMEOUT"))
        );
        assert!(
            f.error_message
                .unwrap()
                .starts_with("no report from the device")
        );
        // a device whose reports were all dropped is not called silent
        let dropped = Input::StallCheck {
            timeout_ms: 10,
            dropped: Some((12, "no msgId")),
        };
        let f = changed(apply(&t, &dropped, 110));
        assert!(
            f.error_message
                .as_deref()
                .unwrap()
                .starts_with("12 reports dropped: no msgId"),
            "{f:?}"
        );
        let t = changed(apply(&t, &prog(Downloading, Some(5)), 200));
        assert!(matches!(apply(&t, &STALL, 205), Outcome::Ignored(_)));
    }

    #[test]
    fn alive_only_refreshes_active_tasks() {
        assert!(
            matches!(apply(&task(), &Input::Alive, 9), Outcome::Touched(t) if t.last_activity_ms == 9 && t.events.is_empty())
        );
        let mut done = task();
        done.status = Completed;
        assert!(matches!(
            apply(&done, &Input::Alive, 9),
            Outcome::Ignored(_)
        ));
    }

    #[test]
    fn cancel_ends_active_tasks() {
        let c = changed(apply(
            &task(),
            &Input::Cancel {
                reason: "operator".into(),
            },
            7,
        ));
        assert_eq!((c.status, c.complete_time_ms), (Cancelled, Some(7)));
    }

    fn with_delta() -> TaskRecord {
        let mut t = task();
        t.delta = Some(crate::server::store::TaskDelta {
            from_version: "1.0.1".into(),
            url: "d".into(),
            md5: "m".into(),
            size: 1,
        });
        t
    }

    fn fail(code: &str, delta_may_be_why: bool) -> Input {
        Input::Progress {
            status: Failed,
            progress: None,
            error_code: Some(code.into()),
            error_message: None,
            delta_may_be_why,
        }
    }

    #[test]
    fn a_delta_failure_retries_with_the_full_image_once() {
        let t = changed(apply(&with_delta(), &prog(Downloading, Some(40)), 10));
        let Outcome::Resend(r) = apply(&t, &fail("DOWNLOAD_FAILED", true), 20) else {
            panic!("not re-sent");
        };
        // the same stage and progress, the delta gone, said in the history; not ended
        assert_eq!(
            (r.status, r.progress, r.delta.is_none(), r.complete_time_ms),
            (Downloading, 40, true, None)
        );
        assert_eq!(r.last_activity_ms, 20);
        assert!(r.events.last().unwrap().note.contains("full image"));
        // a second failure (no delta now) fails the task
        assert_eq!(
            changed(apply(&r, &fail("DOWNLOAD_FAILED", true), 30)).status,
            Failed
        );
        // a failure the delta cannot have caused fails at once
        assert_eq!(
            changed(apply(&t, &fail("INSTALL_FAILED", false), 20)).status,
            Failed
        );
        // a never-sent task that fails gets a start time with its resend
        let Outcome::Resend(r) = apply(&with_delta(), &fail("FAILED", true), 5) else {
            panic!("not re-sent");
        };
        assert_eq!(r.start_time_ms, Some(5));
        // an ended task takes no failure
        let mut done = with_delta();
        done.status = Completed;
        assert_eq!(
            apply(&done, &fail("FAILED", true), 5),
            Outcome::Ignored(Why::Finished)
        );
    }

    #[test]
    fn a_pending_command_goes_out_again_on_subscribe_unless_it_was_got() {
        let never = task();
        let mut sent = task();
        sent.start_time_ms = Some(100);
        sent.last_activity_ms = 100;
        let mut running = sent.clone();
        running.status = Downloading;
        // (task, registry says subscribed, subscribed at, process started at, resend?)
        let table = [
            (&never, true, 50, 0, true),
            (&never, false, 50, 0, false),
            // sent before it subscribed, no answer since
            (&sent, true, 150, 0, true),
            // sent after it subscribed: it has it
            (&sent, true, 90, 0, false),
            (&sent, true, 100, 0, false),
            // subscribed before this process started: sent again regardless
            (&sent, true, 90, 95, true),
            (&sent, true, 95, 95, true),
            // it answered: no longer pending
            (&running, true, 150, 0, false),
        ];
        for (i, (t, ready, at, started, want)) in table.into_iter().enumerate() {
            assert_eq!(resend_on_ready(t, ready, at, started), want, "row {i}");
        }
    }

    #[test]
    fn installed_after_a_cancel_is_a_completion() {
        let t = changed(apply(&task(), &prog(Downloading, Some(40)), 1));
        let c = changed(apply(
            &t,
            &Input::Cancel {
                reason: "brake".into(),
            },
            2,
        ));
        assert_eq!(c.status, Cancelled);
        assert!(!installed_after_cancel(&c));
        // the device runs the target after all (an Alibaba inform, a heartbeat)
        let v = Input::Version {
            version: c.to_version.clone(),
            settled: false,
        };
        let done = changed(apply(&c, &v, 9));
        assert_eq!((done.status, done.progress), (Completed, 100));
        assert_eq!(done.complete_time_ms, Some(9));
        assert_eq!(done.error_code, None);
        assert!(installed_after_cancel(&done), "{:?}", done.events);
        // or reports it completed
        let done = changed(apply(&c, &prog(Completed, Some(100)), 9));
        assert!(installed_after_cancel(&done));
        // its old version, a failure or more progress change nothing
        let old = Input::Version {
            version: "1.0.1".into(),
            settled: true,
        };
        assert!(matches!(apply(&c, &old, 9), Outcome::Ignored(_)));
        assert!(matches!(
            apply(&c, &prog(Installing, Some(100)), 9),
            Outcome::Ignored(_)
        ));
        // a task completed the ordinary way is not marked
        let ok = changed(apply(&t, &prog(Completed, Some(100)), 3));
        assert!(!installed_after_cancel(&ok));
    }

    #[test]
    fn a_task_learns_the_version_it_starts_from_from_its_first_report() {
        let mut t = task();
        t.from_version = None;
        let n = learn_from_version(&t, Some("1.0.1")).expect("learned");
        assert_eq!(n.from_version.as_deref(), Some("1.0.1"));
        // once known it stays; the target, no version or a finished task teach nothing
        assert!(learn_from_version(&n, Some("0.9")).is_none());
        assert!(learn_from_version(&t, Some(&t.to_version.clone())).is_none());
        assert!(learn_from_version(&t, None).is_none());
        let done = changed(apply(&t, &prog(Completed, Some(100)), 3));
        assert!(learn_from_version(&done, Some("1.0.1")).is_none());
    }
}
