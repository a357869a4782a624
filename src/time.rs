//! The one clock. Everything that needs the time of day (task deadlines, campaign windows and
//! backoff, `lastSeen`, record stamps, rate-limited logs) reads it here, never from `chrono` or
//! `SystemTime` directly, so that a test running on tokio's paused clock
//! (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) moves the whole appliance's
//! sense of time with it: the wall clock plus however far tokio's clock is from the real
//! monotonic one. Outside paused time the two agree and this is simply the wall clock.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    ((wall + skew_ns()) / 1_000_000) as i64
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    (now_ms() / 1000).max(0) as u64
}

/// Now, as a date-time in UTC.
pub fn now_utc() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(now_ms()).unwrap_or_default()
}

/// A time in ms since the epoch as RFC 3339 in UTC with milliseconds
/// (`2026-12-01T02:00:00.000Z`): how the API and the signed report write times.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// How far tokio's clock is ahead of the real monotonic clock, in nanoseconds (0 unless paused
/// and advanced).
fn skew_ns() -> i128 {
    let real = Instant::now();
    let tokio = tokio::time::Instant::now().into_std();
    if tokio >= real {
        (tokio - real).as_nanos() as i128
    } else {
        -((real - tokio).as_nanos() as i128)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn outside_a_runtime_it_is_the_wall_clock() {
        let wall = chrono::Utc::now().timestamp_millis();
        assert!((now_ms() - wall).abs() < 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_moves_it() {
        let before = now_ms();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let after = now_ms();
        assert!(
            (after - before - 3_600_000).abs() < 1000,
            "{before} -> {after}"
        );
        // and a sleep on the paused clock lands where the clock says
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        assert!((now_ms() - after - 86_400_000).abs() < 1000);
    }
}
