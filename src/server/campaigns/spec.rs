//! What an operator asks of a campaign, checked: [`validate`] turns a [`CampaignSpec`] into the
//! campaign record it would create (every default filled in, every range checked), and the
//! daily window's clock arithmetic. Pure: the time is an argument.

use crate::ids;
use crate::server::store::{CAMPAIGN_SCHEMA, CampaignRecord, CampaignStatus, CampaignTargets};

use super::CampaignError;

/// What an operator asks for (checked by [`validate`]).
#[derive(Debug, Clone, Default)]
pub struct CampaignSpec {
    /// Name.
    pub name: String,
    /// Device type.
    pub device_type: String,
    /// Target version.
    pub version: String,
    /// Targets.
    pub targets: CampaignTargets,
    /// Cumulative percentages; default `[100]`.
    pub waves: Option<Vec<f64>>,
    /// Default 100.
    pub success_threshold: Option<f64>,
    /// Default (100 %, 1): never pauses unless everything fails.
    pub failure_threshold: Option<(f64, u32)>,
    /// Default 50.
    pub max_in_flight: Option<u32>,
    /// RFC 3339; default now.
    pub start_at: Option<String>,
    /// ("HH:MM", minutes).
    pub window: Option<(String, u32)>,
    /// Forced upgrade.
    pub force: bool,
    /// Default 0.
    pub retries: Option<u32>,
    /// Default false.
    pub dynamic: bool,
}

/// The campaign a spec describes (no id yet, `scheduled`), and remarks for the operator (a
/// start time in the past, a window that is closed now); or why the spec is invalid.
pub fn validate(
    s: &CampaignSpec,
    now: i64,
) -> Result<(CampaignRecord, Vec<String>), CampaignError> {
    let bad = |m: String| Err(CampaignError::Invalid(m));
    if s.name.trim().is_empty() || s.name.len() > 200 {
        return bad("name must be 1-200 characters".into());
    }
    if !ids::valid_device_type(&s.device_type) {
        return bad(format!("deviceType {:?} is not valid", s.device_type));
    }
    if !ids::valid_version(&s.version) {
        return bad(format!("version {:?} is not valid", s.version));
    }
    let t = &s.targets;
    let kinds = t.all as u8
        + (!t.device_ids.is_empty()) as u8
        + (!t.from_versions.is_empty() || !t.tags.is_empty()) as u8;
    if kinds != 1 {
        return bad("targets must be exactly one of {\"all\":true}, {\"deviceIds\":[...]} or {\"fromVersions\":[...],\"tags\":[...]}".into());
    }
    for id in &t.device_ids {
        if !ids::valid_device_id(id) {
            return bad(format!("device id {id:?} is not valid"));
        }
    }
    for v in &t.from_versions {
        if !ids::valid_version(v) {
            return bad(format!("fromVersions entry {v:?} is not valid"));
        }
    }
    let waves = s.waves.clone().unwrap_or_else(|| vec![100.0]);
    if waves.is_empty() || waves.len() > 100 {
        return bad("waves must list 1 to 100 cumulative percentages, e.g. [10, 50, 100]".into());
    }
    let mut prev = 0.0;
    for w in &waves {
        if !(w.is_finite() && *w > prev && *w <= 100.0) {
            return bad(format!(
                "waves must increase strictly within (0, 100]: {waves:?}"
            ));
        }
        prev = *w;
    }
    if prev != 100.0 {
        return bad(format!(
            "the last wave must be 100 (the whole target set): {waves:?}"
        ));
    }
    let success = s.success_threshold.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&success) {
        return bad("successThreshold must be between 0 and 100".into());
    }
    let (fail_pct, fail_min) = s.failure_threshold.unwrap_or((100.0, 1));
    if !(0.0..=100.0).contains(&fail_pct) {
        return bad("failureThreshold.percent must be between 0 and 100".into());
    }
    let max_in_flight = s.max_in_flight.unwrap_or(50);
    if max_in_flight == 0 || max_in_flight > 100_000 {
        return bad("maxInFlight must be between 1 and 100000".into());
    }
    let retries = s.retries.unwrap_or(0);
    if retries > 10 {
        return bad("retries must be between 0 and 10".into());
    }
    let window = match &s.window {
        None => None,
        Some((start, dur)) => {
            let st = parse_hhmm(start).ok_or_else(|| {
                CampaignError::Invalid(format!("window.start {start:?} is not HH:MM"))
            })?;
            if *dur == 0 || *dur > 1440 {
                return bad("window.durationMinutes must be between 1 and 1440".into());
            }
            Some((st, *dur))
        }
    };
    let mut notes = Vec::new();
    let start_at_ms = match &s.start_at {
        None => now,
        Some(t) => {
            let at = chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| CampaignError::Invalid(format!("startAt {t:?}: {e}")))?
                .timestamp_millis();
            if at < now {
                notes.push(format!("startAt {t} is in the past: starting now"));
                now
            } else {
                at
            }
        }
    };
    let record = CampaignRecord {
        schema: CAMPAIGN_SCHEMA,
        id: String::new(),
        name: s.name.trim().to_string(),
        device_type: s.device_type.clone(),
        version: s.version.clone(),
        targets: t.clone(),
        waves,
        success_threshold: success,
        failure_percent: fail_pct,
        failure_min_count: fail_min,
        max_in_flight,
        start_at_ms,
        window,
        force: s.force,
        retries,
        dynamic: s.dynamic,
        status: CampaignStatus::Scheduled,
        status_reason: None,
        failures_acknowledged: 0,
        started_at_ms: None,
        ended_at_ms: None,
        created_at_ms: now,
        updated_at_ms: now,
        brake: None,
    };
    if let Some(why) = super::progress::waiting_for_start(&record, now) {
        notes.push(why);
    }
    Ok((record, notes))
}

pub(super) fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

/// Whether `now_ms` falls in the daily window (local time of the box).
pub fn in_window(window: Option<(u32, u32)>, now_ms: i64) -> bool {
    let Some((start, dur)) = window else {
        return true;
    };
    use chrono::Timelike;
    let local = chrono::DateTime::from_timestamp_millis(now_ms)
        .unwrap_or_default()
        .with_timezone(&chrono::Local);
    let m = local.hour() * 60 + local.minute();
    (m + 1440 - start) % 1440 < dur
}

/// When the daily window is next open at or after `now_ms` (local time of the box): `now_ms`
/// itself while it is open; `None` without a window.
pub fn next_window_opening(window: Option<(u32, u32)>, now_ms: i64) -> Option<i64> {
    use chrono::TimeZone;
    let (start, _) = window?;
    if in_window(window, now_ms) {
        return Some(now_ms);
    }
    let now = chrono::DateTime::from_timestamp_millis(now_ms)?.with_timezone(&chrono::Local);
    // today or the next days (a start inside a DST gap does not exist that day)
    (0..3).find_map(|day| {
        let date = now.date_naive() + chrono::Days::new(day);
        let naive = date.and_hms_opt(start / 60, start % 60, 0)?;
        let at = chrono::Local
            .from_local_datetime(&naive)
            .earliest()?
            .timestamp_millis();
        (at > now_ms).then_some(at)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::now_ms;

    #[test]
    fn windows_wrap_midnight() {
        assert!(in_window(None, 0));
        assert_eq!(parse_hhmm("02:00"), Some(120));
        assert_eq!(parse_hhmm("24:00"), None);
        assert_eq!(parse_hhmm("2:00"), None);
        // a window covering the whole day always matches
        assert!(in_window(Some((0, 1440)), now_ms()));
        // a window that opens in two hours opens in two hours, and one open now is open now
        use chrono::Timelike;
        let now = now_ms();
        let local = chrono::Local::now();
        let minute = local.hour() * 60 + local.minute();
        let later = next_window_opening(Some(((minute + 120) % 1440, 30)), now).unwrap();
        assert!((later - now - 7_200_000).abs() <= 60_000, "{}", later - now);
        assert_eq!(next_window_opening(Some((minute, 10)), now), Some(now));
        assert_eq!(next_window_opening(None, now), None);
    }
}

#[cfg(test)]
mod validate_tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn spec() -> CampaignSpec {
        CampaignSpec {
            name: " rollout ".into(),
            device_type: "gateway".into(),
            version: "1.0.2".into(),
            targets: CampaignTargets {
                all: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_the_record() {
        let (c, notes) = validate(&spec(), NOW).unwrap();
        assert_eq!(c.name, "rollout");
        assert_eq!(c.waves, [100.0]);
        assert_eq!(
            (c.success_threshold, c.failure_percent, c.failure_min_count),
            (100.0, 100.0, 1)
        );
        assert_eq!((c.max_in_flight, c.retries, c.window), (50, 0, None));
        assert_eq!((c.start_at_ms, c.created_at_ms), (NOW, NOW));
        assert_eq!(c.status, CampaignStatus::Scheduled);
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn start_times_and_windows() {
        let at = |rfc: &str| CampaignSpec {
            start_at: Some(rfc.into()),
            ..spec()
        };
        // in the past: now, with a remark; in the future: then, with a remark
        let (c, notes) = validate(&at("2020-01-01T00:00:00Z"), NOW).unwrap();
        assert_eq!(c.start_at_ms, NOW);
        assert!(notes[0].contains("in the past"), "{notes:?}");
        let later = chrono::DateTime::from_timestamp_millis(NOW + 3_600_000)
            .unwrap()
            .to_rfc3339();
        let (c, notes) = validate(&at(&later), NOW).unwrap();
        assert_eq!(c.start_at_ms, NOW + 3_600_000);
        assert!(notes[0].starts_with("scheduled: starts at"), "{notes:?}");
        let w = CampaignSpec {
            window: Some(("23:30".into(), 90)),
            ..spec()
        };
        assert_eq!(
            validate(&w, NOW).unwrap().0.window,
            Some((23 * 60 + 30, 90))
        );
    }

    #[test]
    fn every_bad_field_says_which() {
        let targets = |t: CampaignTargets| CampaignSpec {
            targets: t,
            ..spec()
        };
        let table: Vec<(CampaignSpec, &str)> = vec![
            (
                CampaignSpec {
                    name: "  ".into(),
                    ..spec()
                },
                "name",
            ),
            (
                CampaignSpec {
                    device_type: "a b".into(),
                    ..spec()
                },
                "deviceType",
            ),
            (
                CampaignSpec {
                    version: "1.0 beta".into(),
                    ..spec()
                },
                "version",
            ),
            (targets(CampaignTargets::default()), "exactly one of"),
            (
                targets(CampaignTargets {
                    all: true,
                    tags: vec!["x".into()],
                    ..Default::default()
                }),
                "exactly one of",
            ),
            (
                targets(CampaignTargets {
                    device_ids: vec!["a/b/c".into()],
                    ..Default::default()
                }),
                "device id",
            ),
            (
                targets(CampaignTargets {
                    from_versions: vec!["x y".into()],
                    ..Default::default()
                }),
                "fromVersions",
            ),
            (
                CampaignSpec {
                    waves: Some(vec![]),
                    ..spec()
                },
                "1 to 100",
            ),
            (
                CampaignSpec {
                    waves: Some(vec![50.0, 50.0, 100.0]),
                    ..spec()
                },
                "increase strictly",
            ),
            (
                CampaignSpec {
                    waves: Some(vec![0.0, 100.0]),
                    ..spec()
                },
                "increase strictly",
            ),
            (
                CampaignSpec {
                    waves: Some(vec![f64::NAN, 100.0]),
                    ..spec()
                },
                "increase strictly",
            ),
            (
                CampaignSpec {
                    waves: Some(vec![10.0, 90.0]),
                    ..spec()
                },
                "last wave must be 100",
            ),
            (
                CampaignSpec {
                    success_threshold: Some(100.5),
                    ..spec()
                },
                "successThreshold",
            ),
            (
                CampaignSpec {
                    failure_threshold: Some((-1.0, 1)),
                    ..spec()
                },
                "failureThreshold",
            ),
            (
                CampaignSpec {
                    max_in_flight: Some(0),
                    ..spec()
                },
                "maxInFlight",
            ),
            (
                CampaignSpec {
                    max_in_flight: Some(100_001),
                    ..spec()
                },
                "maxInFlight",
            ),
            (
                CampaignSpec {
                    retries: Some(11),
                    ..spec()
                },
                "retries",
            ),
            (
                CampaignSpec {
                    window: Some(("24:00".into(), 60)),
                    ..spec()
                },
                "HH:MM",
            ),
            (
                CampaignSpec {
                    window: Some(("02:00".into(), 0)),
                    ..spec()
                },
                "durationMinutes",
            ),
            (
                CampaignSpec {
                    window: Some(("02:00".into(), 1441)),
                    ..spec()
                },
                "durationMinutes",
            ),
            (
                CampaignSpec {
                    start_at: Some("tomorrow".into()),
                    ..spec()
                },
                "startAt",
            ),
        ];
        for (s, says) in table {
            match validate(&s, NOW) {
                Err(CampaignError::Invalid(m)) => assert!(m.contains(says), "{says}: {m}"),
                other => panic!("{says}: {other:?}"),
            }
        }
        // edges that are fine
        for ok in [
            CampaignSpec {
                waves: Some(vec![0.5, 100.0]),
                ..spec()
            },
            CampaignSpec {
                max_in_flight: Some(100_000),
                retries: Some(10),
                ..spec()
            },
            CampaignSpec {
                window: Some(("00:00".into(), 1440)),
                ..spec()
            },
            CampaignSpec {
                success_threshold: Some(0.0),
                ..spec()
            },
        ] {
            assert!(validate(&ok, NOW).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn window_edges_in_local_time() {
        use chrono::TimeZone;
        let at = |h, m| {
            chrono::Local
                .with_ymd_and_hms(2026, 6, 10, h, m, 0)
                .earliest()
                .unwrap()
                .timestamp_millis()
        };
        // 23:30 for an hour: open 23:30..00:29, closed at 00:30 and at 23:29
        let w = Some((23 * 60 + 30, 60));
        let table = [
            ((23, 29), false),
            ((23, 30), true),
            ((23, 59), true),
            ((0, 0), true),
            ((0, 29), true),
            ((0, 30), false),
            ((12, 0), false),
        ];
        for ((h, m), open) in table {
            assert_eq!(in_window(w, at(h, m)), open, "{h:02}:{m:02}");
        }
        // closed at 00:30: it opens next at 23:30 the same day; open: now
        assert_eq!(next_window_opening(w, at(0, 30)), Some(at(23, 30)));
        assert_eq!(next_window_opening(w, at(23, 45)), Some(at(23, 45)));
        // the whole day: always open
        assert!(in_window(Some((600, 1440)), at(9, 59)));
    }
}
