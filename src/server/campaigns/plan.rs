//! A campaign's dry run as a pure function: which registered devices it targets, which of them
//! another live campaign claims, how they split into waves, and what each wave downloads.

use std::collections::{BTreeMap, HashSet};

use crate::server::store::{CampaignRecord, CampaignTargets, DeviceRecord};

use super::CampaignError;

/// A device of a plan.
#[derive(Debug, Clone)]
pub struct PlannedDevice {
    /// Device id.
    pub id: String,
    /// Version it reports.
    pub firmware_version: Option<String>,
    /// Whether it would get a delta.
    pub delta: bool,
    /// Bytes it would download.
    pub bytes: u64,
}

/// A wave of a plan.
#[derive(Debug, Clone)]
pub struct PlannedWave {
    /// Cumulative percent.
    pub percent: f64,
    /// Devices in this wave.
    pub devices: Vec<PlannedDevice>,
    /// How many of them get a delta.
    pub deltas: usize,
    /// Estimated bytes.
    pub estimated_bytes: u64,
}

/// A device left out of a plan, and why.
#[derive(Debug, Clone)]
pub struct Conflict {
    /// Device id.
    pub device_id: String,
    /// Why.
    pub reason: String,
}

/// The result of planning (dry run, or the start of a create).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Target set size (after conflicts).
    pub total: usize,
    /// Waves.
    pub waves: Vec<PlannedWave>,
    /// Devices another live campaign already claims (skipped).
    pub conflicts: Vec<Conflict>,
    /// Remarks (e.g. a start time in the past).
    pub notes: Vec<String>,
    pub(super) record: Option<CampaignRecord>,
}

/// Whether a device is in a campaign's target set (before conflicts).
pub fn targets(t: &CampaignTargets, dt: &str, d: &DeviceRecord) -> bool {
    if d.device_type != dt {
        return false;
    }
    if t.all {
        return true;
    }
    if !t.device_ids.is_empty() {
        return t.device_ids.contains(&d.id);
    }
    let version_ok = t.from_versions.is_empty()
        || d.firmware_version
            .as_ref()
            .is_some_and(|v| t.from_versions.contains(v));
    let tags_ok = t.tags.iter().all(|tag| d.tags.contains(tag));
    version_ok && tags_ok
}

/// Plans campaign `c` (as [`super::spec::validate`] made it) over the registered `devices`:
/// `claimed` maps the devices other live campaigns hold to their campaign, `delta_size` says
/// for a device that applies deltas whether one is offered to it (and its size, once built),
/// `full_size` is the image's. Refuses an empty target set and device ids that are not
/// registered with the campaign's type.
pub fn plan(
    c: CampaignRecord,
    notes: Vec<String>,
    devices: Vec<DeviceRecord>,
    claimed: &BTreeMap<String, String>,
    delta_size: impl Fn(&DeviceRecord) -> Option<Option<u64>>,
    full_size: u64,
) -> Result<Plan, CampaignError> {
    plan_with(
        c,
        notes,
        devices,
        claimed,
        delta_size,
        full_size,
        Empty::Refuse,
    )
}

/// What to do when no registered device matches (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Empty {
    /// Refuse the plan (an operator asking for a campaign now).
    Refuse,
    /// Plan it anyway, with the devices that match now (maybe none), and a note: a campaign
    /// held for later (a bundle's plan, imported before its devices registered) takes them in
    /// as they register.
    Wait,
}

/// [`plan`], with what to do about an empty target set.
pub fn plan_with(
    c: CampaignRecord,
    mut notes: Vec<String>,
    devices: Vec<DeviceRecord>,
    claimed: &BTreeMap<String, String>,
    delta_size: impl Fn(&DeviceRecord) -> Option<Option<u64>>,
    full_size: u64,
    empty: Empty,
) -> Result<Plan, CampaignError> {
    let bad = |m: String| Err(CampaignError::Invalid(m));
    let t = &c.targets;
    let mut matched: Vec<DeviceRecord> = devices
        .into_iter()
        .filter(|d| targets(t, &c.device_type, d))
        .collect();
    if !t.device_ids.is_empty() {
        let known: HashSet<&str> = matched.iter().map(|d| d.id.as_str()).collect();
        let missing: Vec<&String> = t
            .device_ids
            .iter()
            .filter(|i| !known.contains(i.as_str()))
            .collect();
        if !missing.is_empty() && empty == Empty::Refuse {
            return bad(format!(
                "devices not registered with device type {}: {missing:?}",
                c.device_type
            ));
        }
        if !missing.is_empty() {
            notes.push(format!(
                "not registered yet with device type {}: {missing:?}; they join as they register",
                c.device_type
            ));
        }
    }
    matched.sort_by(|a, b| a.id.cmp(&b.id));
    let mut conflicts = Vec::new();
    matched.retain(|d| match claimed.get(&d.id) {
        Some(c) => {
            conflicts.push(Conflict {
                device_id: d.id.clone(),
                reason: format!("claimed by running campaign {c}"),
            });
            false
        }
        None => true,
    });
    if matched.is_empty() && conflicts.is_empty() {
        if empty == Empty::Refuse {
            return bad(format!(
                "empty target set: no registered device of type {} matches the targets",
                c.device_type
            ));
        }
        notes.push(format!(
            "no registered device of type {} matches the targets yet: they join as they register",
            c.device_type
        ));
    }
    if matched.is_empty() && !conflicts.is_empty() {
        notes.push(format!(
            "every matching device ({}) is claimed by another running campaign: nothing to do",
            conflicts.len()
        ));
    }
    let n = matched.len();
    let mut planned = Vec::new();
    let mut i = 0usize;
    for (k, w) in c.waves.iter().enumerate() {
        let upto = if k + 1 == c.waves.len() {
            n
        } else {
            ((w * n as f64 / 100.0).ceil() as usize).clamp(n.min(1), n)
        };
        let mut devs = Vec::new();
        while i < upto {
            let d = &matched[i];
            let delta = d
                .delta_formats
                .iter()
                .any(|f| f == crate::bsdiff::FORMAT)
                .then(|| delta_size(d))
                .flatten();
            devs.push(PlannedDevice {
                id: d.id.clone(),
                firmware_version: d.firmware_version.clone(),
                delta: delta.is_some(),
                bytes: delta.flatten().unwrap_or(full_size),
            });
            i += 1;
        }
        planned.push(PlannedWave {
            percent: *w,
            deltas: devs.iter().filter(|d| d.delta).count(),
            estimated_bytes: devs.iter().map(|d| d.bytes).sum(),
            devices: devs,
        });
    }
    Ok(Plan {
        total: n,
        waves: planned,
        conflicts,
        notes,
        record: Some(c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::campaigns::fixtures;

    fn campaign(waves: &[f64], targets: CampaignTargets) -> CampaignRecord {
        CampaignRecord {
            waves: waves.to_vec(),
            targets,
            ..fixtures::campaign(crate::server::store::CampaignStatus::Scheduled)
        }
    }

    fn all() -> CampaignTargets {
        CampaignTargets {
            all: true,
            ..Default::default()
        }
    }

    fn fleet(n: usize) -> Vec<DeviceRecord> {
        // listed out of order: plans sort by id
        (0..n)
            .rev()
            .map(|i| fixtures::device(&format!("GW{i:02}"), "1.0.1"))
            .collect()
    }

    fn no_delta(_: &DeviceRecord) -> Option<Option<u64>> {
        None
    }

    fn sizes(p: &Plan) -> Vec<usize> {
        p.waves.iter().map(|w| w.devices.len()).collect()
    }

    #[test]
    fn waves_round_up_and_never_start_empty() {
        // (devices, waves, devices per wave)
        let table: [(usize, &[f64], &[usize]); 6] = [
            // 3.5 devices round up
            (7, &[50.0, 100.0], &[4, 3]),
            (10, &[10.0, 50.0, 100.0], &[1, 4, 5]),
            (3, &[10.0, 100.0], &[1, 2]),
            (1, &[10.0, 50.0, 100.0], &[1, 0, 0]),
            (7, &[100.0], &[7]),
            (1000, &[0.5, 100.0], &[5, 995]),
        ];
        for (n, waves, want) in table {
            let p = plan(
                campaign(waves, all()),
                vec![],
                fleet(n),
                &BTreeMap::new(),
                no_delta,
                9,
            )
            .unwrap();
            assert_eq!(
                (p.total, sizes(&p).as_slice()),
                (n, want),
                "{n} devices in {waves:?}"
            );
            assert_eq!(p.waves[0].devices[0].id, "GW00");
        }
    }

    #[test]
    fn targets_select_by_id_version_and_tags() {
        let mut devices = fleet(4);
        devices[0].firmware_version = Some("0.9".into()); // GW03
        devices[1].tags = vec!["line-a".into(), "north".into()]; // GW02
        devices[2].tags = vec!["line-a".into()]; // GW01
        let mut other = fixtures::device("CAM1", "1.0.1");
        other.device_type = "camera".into();
        devices.push(other);
        let ids = |t: CampaignTargets| -> Vec<String> {
            let p = plan(
                campaign(&[100.0], t),
                vec![],
                devices.clone(),
                &BTreeMap::new(),
                no_delta,
                9,
            )
            .unwrap();
            p.waves[0].devices.iter().map(|d| d.id.clone()).collect()
        };
        assert_eq!(ids(all()), ["GW00", "GW01", "GW02", "GW03"]);
        let t = |ids: &[&str], versions: &[&str], tags: &[&str]| CampaignTargets {
            all: false,
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            from_versions: versions.iter().map(|s| s.to_string()).collect(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(ids(t(&["GW03", "GW01"], &[], &[])), ["GW01", "GW03"]);
        assert_eq!(ids(t(&[], &["1.0.1"], &[])), ["GW00", "GW01", "GW02"]);
        assert_eq!(ids(t(&[], &[], &["line-a"])), ["GW01", "GW02"]);
        // every tag, and the version too
        assert_eq!(ids(t(&[], &["1.0.1"], &["line-a", "north"])), ["GW02"]);
        // an id of another type is not registered with this one
        let r = plan(
            campaign(&[100.0], t(&["GW00", "CAM1"], &[], &[])),
            vec![],
            devices.clone(),
            &BTreeMap::new(),
            no_delta,
            9,
        );
        assert!(matches!(r, Err(CampaignError::Invalid(m)) if m.contains("CAM1")));
        let r = plan(
            campaign(&[100.0], t(&[], &["7.0"], &[])),
            vec![],
            devices,
            &BTreeMap::new(),
            no_delta,
            9,
        );
        assert!(matches!(r, Err(CampaignError::Invalid(m)) if m.contains("empty target set")));
    }

    #[test]
    fn claimed_devices_are_conflicts() {
        let claimed: BTreeMap<String, String> = [("GW01".to_string(), "c7".to_string())].into();
        let p = plan(
            campaign(&[50.0, 100.0], all()),
            vec![],
            fleet(3),
            &claimed,
            no_delta,
            9,
        )
        .unwrap();
        assert_eq!((p.total, sizes(&p)), (2, vec![1, 1]));
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].device_id, "GW01");
        assert!(p.conflicts[0].reason.contains("c7"));
        // all claimed: a plan with nothing to do, and a remark saying so
        let claimed: BTreeMap<String, String> = [("GW00".to_string(), "c7".to_string())].into();
        let p = plan(
            campaign(&[100.0], all()),
            vec!["kept".into()],
            fleet(1),
            &claimed,
            no_delta,
            9,
        )
        .unwrap();
        assert_eq!((p.total, p.conflicts.len()), (0, 1));
        assert_eq!(p.notes[0], "kept");
        assert!(p.notes[1].contains("nothing to do"), "{:?}", p.notes);
    }

    #[test]
    fn bytes_per_wave_count_deltas() {
        let mut devices = fleet(3);
        for d in &mut devices[..2] {
            d.delta_formats = vec![crate::bsdiff::FORMAT.into()];
        }
        // GW02 and GW01 apply deltas: GW02's is built (100 bytes), GW01's is offered but not
        // built yet (counted at full size); GW00 takes the full image
        let offer = |d: &DeviceRecord| match d.id.as_str() {
            "GW02" => Some(Some(100)),
            "GW01" => Some(None),
            _ => Some(Some(1)),
        };
        let p = plan(
            campaign(&[100.0], all()),
            vec![],
            devices,
            &BTreeMap::new(),
            offer,
            5000,
        )
        .unwrap();
        let w = &p.waves[0];
        let got: Vec<(bool, u64)> = w.devices.iter().map(|d| (d.delta, d.bytes)).collect();
        assert_eq!(got, [(false, 5000), (true, 5000), (true, 100)]);
        assert_eq!((w.deltas, w.estimated_bytes), (2, 10_100));
    }
}
