//! What happened to device reports, counted by what it was — applied, heartbeat, matched without
//! a msgId, a harmless repeat, or dropped with a reason — since this process started (they reset
//! on restart; the API says so). A device whose reports are being dropped is remembered until
//! one of its reports is used again, so that a task timing out can say why ("12 reports
//! dropped: no msgId") instead of blaming a silent device.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a report was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Not JSON, an unknown message type, a field outside its pattern.
    Malformed,
    /// From a device that is not registered.
    UnknownDevice,
    /// A msgId that is not the device's active or newest task's.
    UnknownMsgId,
    /// Progress without a msgId while the device has no active task to give it to.
    NoMsgId,
    /// Alibaba progress while the device has no active task.
    NoActiveTask,
    /// It would move its task backwards (an earlier state, less progress).
    Backwards,
}

impl Dropped {
    /// Every reason, in the order the API lists them.
    pub const ALL: [Dropped; 6] = [
        Dropped::Malformed,
        Dropped::UnknownDevice,
        Dropped::UnknownMsgId,
        Dropped::NoMsgId,
        Dropped::NoActiveTask,
        Dropped::Backwards,
    ];

    /// The API key (camelCase).
    pub fn key(self) -> &'static str {
        match self {
            Dropped::Malformed => "malformed",
            Dropped::UnknownDevice => "unknownDevice",
            Dropped::UnknownMsgId => "unknownMsgId",
            Dropped::NoMsgId => "noMsgId",
            Dropped::NoActiveTask => "noActiveTask",
            Dropped::Backwards => "backwards",
        }
    }

    /// The metrics label (snake_case).
    pub fn label(self) -> &'static str {
        match self {
            Dropped::Malformed => "malformed",
            Dropped::UnknownDevice => "unknown_device",
            Dropped::UnknownMsgId => "unknown_msg_id",
            Dropped::NoMsgId => "no_msg_id",
            Dropped::NoActiveTask => "no_active_task",
            Dropped::Backwards => "backwards",
        }
    }

    /// In words, for a task's error message.
    pub fn says(self) -> &'static str {
        match self {
            Dropped::Malformed => "malformed",
            Dropped::UnknownDevice => "device not registered",
            Dropped::UnknownMsgId => "unknown msgId",
            Dropped::NoMsgId => "no msgId",
            Dropped::NoActiveTask => "no active task",
            Dropped::Backwards => "would move the task backwards",
        }
    }
}

/// Reports that were not dropped, by what they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Used {
    /// Changed a task (progress, a final state).
    Applied,
    /// A heartbeat or an inform (the device's version), whether or not a task moved.
    Heartbeat,
    /// Progress without a msgId given to the device's one active task.
    MatchedWithoutMsgId,
    /// An Alibaba `firmware/get` answered.
    Request,
    /// A repeat that changes nothing: a report for a task that already ended (a QoS 1
    /// redelivery, the tutorial's "completed" twice), the target version confirmed again.
    Repeat,
}

/// The counters of one process.
#[derive(Debug)]
pub struct ReportCounters {
    /// When counting started (ms since the epoch): the process start.
    pub since_ms: i64,
    received: AtomicU64,
    applied: AtomicU64,
    heartbeats: AtomicU64,
    matched_without_msg_id: AtomicU64,
    requests: AtomicU64,
    repeats: AtomicU64,
    dropped: [AtomicU64; 6],
    /// Devices whose reports were dropped since one was last used: (count, last reason).
    recent: Mutex<HashMap<String, (u64, Dropped)>>,
}

impl Default for ReportCounters {
    fn default() -> Self {
        ReportCounters {
            since_ms: crate::time::now_ms(),
            received: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            matched_without_msg_id: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            dropped: Default::default(),
            recent: Mutex::new(HashMap::new()),
        }
    }
}

/// A snapshot for the API and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportCounts {
    /// See [`ReportCounters::since_ms`].
    pub since_ms: i64,
    /// Every report handed to the engine.
    pub received: u64,
    /// See [`Used::Applied`].
    pub applied: u64,
    /// See [`Used::Heartbeat`].
    pub heartbeats: u64,
    /// See [`Used::MatchedWithoutMsgId`].
    pub matched_without_msg_id: u64,
    /// See [`Used::Request`].
    pub requests: u64,
    /// See [`Used::Repeat`].
    pub repeats: u64,
    /// Per reason, in [`Dropped::ALL`] order.
    pub dropped: Vec<(Dropped, u64)>,
}

impl ReportCounters {
    /// A report arrived.
    pub fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// A report was used as `how`; the device's run of dropped reports ends.
    pub fn used(&self, device: &str, how: Used) {
        let c = match how {
            Used::Applied => &self.applied,
            Used::Heartbeat => &self.heartbeats,
            Used::MatchedWithoutMsgId => &self.matched_without_msg_id,
            Used::Request => &self.requests,
            Used::Repeat => &self.repeats,
        };
        c.fetch_add(1, Ordering::Relaxed);
        if how != Used::Repeat {
            let mut recent = self.recent.lock().expect("counters lock");
            if !recent.is_empty() {
                recent.remove(device);
            }
        }
    }

    /// A report of `device` was dropped for `why`.
    pub fn dropped(&self, device: &str, why: Dropped) {
        let i = Dropped::ALL.iter().position(|d| *d == why).expect("listed");
        self.dropped[i].fetch_add(1, Ordering::Relaxed);
        let mut recent = self.recent.lock().expect("counters lock");
        let e = recent.entry(device.to_string()).or_insert((0, why));
        e.0 += 1;
        e.1 = why;
    }

    /// How many of the device's reports were dropped since one was last used, and the last
    /// reason.
    pub fn recent_drops(&self, device: &str) -> Option<(u64, Dropped)> {
        self.recent
            .lock()
            .expect("counters lock")
            .get(device)
            .copied()
    }

    /// Forgets a device's run of dropped reports (its task ended).
    pub fn forget(&self, device: &str) {
        self.recent.lock().expect("counters lock").remove(device);
    }

    /// The counts now.
    pub fn snapshot(&self) -> ReportCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReportCounts {
            since_ms: self.since_ms,
            received: g(&self.received),
            applied: g(&self.applied),
            heartbeats: g(&self.heartbeats),
            matched_without_msg_id: g(&self.matched_without_msg_id),
            requests: g(&self.requests),
            repeats: g(&self.repeats),
            dropped: Dropped::ALL
                .iter()
                .zip(&self.dropped)
                .map(|(d, c)| (*d, g(c)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_drops_is_remembered_until_a_report_is_used() {
        let c = ReportCounters::default();
        for _ in 0..12 {
            c.dropped("GW1", Dropped::NoMsgId);
        }
        c.used("GW1", Used::Repeat);
        assert_eq!(c.recent_drops("GW1"), Some((12, Dropped::NoMsgId)));
        c.used("GW1", Used::Applied);
        assert_eq!(c.recent_drops("GW1"), None);
        let s = c.snapshot();
        assert_eq!((s.applied, s.repeats), (1, 1));
        assert_eq!(s.dropped[3], (Dropped::NoMsgId, 12));
    }
}
