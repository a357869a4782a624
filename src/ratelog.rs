//! Rate-limited warnings: a flood of bad input (malformed reports, refused logins) is counted
//! and logged at most once per second per call site, with how many were suppressed.

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

    /// Logs `msg` as a warning unless this site logged less than a second ago.
    pub fn warn(&self, msg: &str) {
        let now = crate::time::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            if suppressed > 0 {
                tracing::warn!(suppressed, "{msg}");
            } else {
                tracing::warn!("{msg}");
            }
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Default for RateLog {
    fn default() -> Self {
        Self::new()
    }
}
