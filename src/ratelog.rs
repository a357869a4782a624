//! Rate-limited warnings: a flood of bad input (malformed reports, refused logins) is logged at
//! most once per second per call site, with how many were suppressed. [`RateLog::admit`] guards
//! an ordinary structured `tracing` event, so suppressed ones cost no formatting.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// One call site's limiter; use as a `static`.
pub struct RateLog {
    last_ms: AtomicI64,
    suppressed: AtomicU64,
}

impl RateLog {
    /// A limiter that has not logged yet.
    pub const fn new() -> RateLog {
        RateLog {
            last_ms: AtomicI64::new(i64::MIN),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether this call site may log now (it has not for a second): `Some(suppressed)` with
    /// how many events it swallowed since its last one, `None` to stay quiet (counted). Guards
    /// a normal structured event, so nothing is formatted while suppressed:
    /// `if let Some(suppressed) = LOG.admit() { tracing::warn!(device, suppressed, "...") }`.
    pub fn admit(&self) -> Option<u64> {
        let now = crate::time::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLog {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_event_a_second_with_the_count_of_those_swallowed() {
        let log = RateLog::new();
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        // (not 999 ms: `time::now_ms` reads the wall clock and the monotonic one a few
        // microseconds apart, which under load can cross a millisecond boundary)
        tokio::time::advance(std::time::Duration::from_millis(990)).await;
        assert_eq!(log.admit(), None);
        tokio::time::advance(std::time::Duration::from_millis(10)).await;
        assert_eq!(log.admit(), Some(3));
        assert_eq!(log.admit(), None);
    }
}
