//! Download traffic counters: bytes served per firmware image and per delta, so statistics can
//! say how much went out as full images, how much as deltas, and how much the deltas saved.
//! Counted as the bytes leave the body stream (a dropped connection counts what was sent).
//! In memory since the start of the process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What a counter counts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Served {
    /// A full image `(deviceType, version)`.
    Full(String, String),
    /// A delta `(deviceType, fromVersion, toVersion)`.
    Delta(String, String, String),
}

/// Counters of one served file.
#[derive(Debug, Default)]
pub struct Counter {
    /// Body bytes sent.
    pub bytes: AtomicU64,
    /// Requests answered with a body (GET).
    pub requests: AtomicU64,
    /// Of those, answered 206.
    pub ranged: AtomicU64,
    /// For deltas: the size of the full image it replaces and of the delta itself.
    sizes: (u64, u64),
    /// Bodies of this file being sent now.
    pub active: std::sync::atomic::AtomicI64,
}

impl Counter {
    /// Adds sent bytes.
    pub fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

/// All counters.
#[derive(Debug, Default)]
pub struct Traffic {
    map: Mutex<BTreeMap<Served, Arc<Counter>>>,
}

/// Totals and per-firmware figures (camelCase in JSON).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TrafficSummary {
    /// Bytes of full images sent.
    pub bytes_full: u64,
    /// Bytes of deltas sent.
    pub bytes_delta: u64,
    /// Full-image bytes that deltas made unnecessary.
    pub bytes_saved: u64,
    /// Download requests with a body.
    pub requests: u64,
    /// Of those, Range requests answered 206.
    pub range_requests: u64,
    /// Per target firmware.
    pub per_firmware: Vec<FirmwareTraffic>,
}

/// One firmware's traffic.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FirmwareTraffic {
    /// Device type.
    pub device_type: String,
    /// Version.
    pub version: String,
    /// Full-image bytes sent.
    pub bytes_full: u64,
    /// Delta bytes sent (deltas to this version).
    pub bytes_delta: u64,
    /// Bytes saved by those deltas.
    pub bytes_saved: u64,
}

impl Traffic {
    /// The counter of a file; `sizes` = (full image size, delta size) for deltas.
    pub fn counter(&self, what: Served, sizes: (u64, u64)) -> Arc<Counter> {
        let mut m = self.map.lock().expect("poisoned");
        m.entry(what)
            .or_insert_with(|| {
                Arc::new(Counter {
                    sizes,
                    ..Counter::default()
                })
            })
            .clone()
    }

    /// Download bodies being sent now.
    pub fn active(&self) -> i64 {
        let m = self.map.lock().expect("poisoned");
        m.values().map(|c| c.active.load(Ordering::Relaxed)).sum()
    }

    /// Totals and per-firmware figures.
    pub fn summary(&self) -> TrafficSummary {
        let m = self.map.lock().expect("poisoned");
        let mut per: BTreeMap<(String, String), FirmwareTraffic> = BTreeMap::new();
        let mut s = TrafficSummary::default();
        for (k, c) in m.iter() {
            let bytes = c.bytes.load(Ordering::Relaxed);
            s.requests += c.requests.load(Ordering::Relaxed);
            s.range_requests += c.ranged.load(Ordering::Relaxed);
            let (dt, v) = match k {
                Served::Full(dt, v) => (dt, v),
                Served::Delta(dt, _, v) => (dt, v),
            };
            let e = per
                .entry((dt.clone(), v.clone()))
                .or_insert_with(|| FirmwareTraffic {
                    device_type: dt.clone(),
                    version: v.clone(),
                    ..Default::default()
                });
            match k {
                Served::Full(..) => {
                    e.bytes_full += bytes;
                    s.bytes_full += bytes;
                }
                Served::Delta(..) => {
                    let (full, delta) = c.sizes;
                    // every delta byte sent stands for full/delta image bytes not sent
                    let saved = if delta == 0 {
                        0
                    } else {
                        (bytes as u128 * full.saturating_sub(delta) as u128 / delta as u128) as u64
                    };
                    e.bytes_delta += bytes;
                    e.bytes_saved += saved;
                    s.bytes_delta += bytes;
                    s.bytes_saved += saved;
                }
            }
        }
        s.per_firmware = per.into_values().collect();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_full_and_delta() {
        let t = Traffic::default();
        t.counter(Served::Full("gw".into(), "2".into()), (0, 0))
            .add(1000);
        let d = t.counter(
            Served::Delta("gw".into(), "1".into(), "2".into()),
            (1000, 100),
        );
        d.add(100);
        d.add(50);
        let s = t.summary();
        assert_eq!((s.bytes_full, s.bytes_delta), (1000, 150));
        assert_eq!(s.bytes_saved, 1350);
        assert_eq!(s.per_firmware.len(), 1);
    }
}

/// Downloads in progress per upgrade task, so that cancelling a task (the emergency brake)
/// ends the transfers of its image at once: a device that had not finished downloading cannot
/// finish. Each transfer holds a [`Transfer`] for as long as its body is being sent; the last
/// one of a task removes its entry.
#[derive(Debug, Default)]
pub struct Transfers {
    tasks: Mutex<std::collections::HashMap<u64, (tokio_util::sync::CancellationToken, usize)>>,
    /// Transfers ended because their task was cancelled.
    pub cut: AtomicU64,
}

/// One transfer of a task's image: `stop` fires when the task is cancelled.
#[derive(Debug)]
pub struct Transfer {
    owner: Arc<Transfers>,
    task: u64,
    /// Cancelled when the task is.
    pub stop: tokio_util::sync::CancellationToken,
}

impl Transfers {
    /// Registers a transfer of task `task`'s image.
    pub fn start(self: &Arc<Self>, task: u64) -> Transfer {
        let mut m = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let e = m
            .entry(task)
            .or_insert_with(|| (tokio_util::sync::CancellationToken::new(), 0));
        e.1 += 1;
        Transfer {
            owner: self.clone(),
            task,
            stop: e.0.clone(),
        }
    }

    /// Ends every transfer of task `task` now; how many there were.
    pub fn stop(&self, task: u64) -> usize {
        let gone = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&task);
        match gone {
            Some((token, n)) => {
                token.cancel();
                self.cut.fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            None => 0,
        }
    }

    /// Transfers of task images being sent now.
    pub fn open(&self) -> usize {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(_, n)| n)
            .sum()
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        let mut m = self.owner.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = m.get_mut(&self.task)
            && !self.stop.is_cancelled()
        {
            e.1 -= 1;
            if e.1 == 0 {
                m.remove(&self.task);
            }
        }
    }
}
