//! The crash harness: `kill -9` at random points while the real binary uploads, releases,
//! registers, creates tasks and campaigns, runs campaign rounds for devices that come online
//! and report (some finish, some stop half-way), builds deltas and streams a backup, then a
//! restart and the invariants: every acknowledged change is there (PUBACKed progress and
//! completions too); every listed firmware downloads with its md5 and sha256; the blobs on disk
//! are exactly the referenced hashes; nothing is left in `tmp/`; no device has more than one
//! active task and every task's state is a known one; every campaign member is counted once,
//! each in-flight state counts exactly the members whose newest campaign task is in it, the
//! completed count lies between the completed tasks and those plus the members that needed no
//! task, and every listed failure has a failed task with that error code.
//!
//! `cargo test` runs a few rounds; `bench/chaos.sh` runs 100 (`HANGAR_CHAOS_ROUNDS`) and prints
//! tried / survived. `HANGAR_CHAOS_SEED` repeats a run.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mqtt::Device;
use common::{Appliance, file_names, image, md5_hex, sha256_hex};
use serde_json::{Value, json};

/// What the appliance acknowledged (2xx) before it was killed.
#[derive(Default, Clone)]
struct Acked {
    firmware: BTreeSet<String>,
    released: BTreeSet<String>,
    devices: BTreeSet<String>,
    tasks: BTreeSet<String>,
    campaigns: BTreeSet<String>,
    /// Device -> (task id, highest progress whose report got its PUBACK).
    reports: HashMap<String, (String, i64)>,
    /// msgId -> device, of every task whose "completed" report got its PUBACK.
    completed: BTreeMap<String, String>,
    /// Device -> the version it runs after its last acknowledged completion.
    runs: HashMap<String, String>,
}

/// A small deterministic generator (xorshift), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const ACTIONS: [&str; 9] = [
    "upload", "release", "register", "upgrade", "report", "campaign", "online", "delta", "backup",
];

/// How long after its start an action may be killed: most act within tens of milliseconds;
/// "online" lasts while campaign rounds give its devices tasks and they report back.
fn kill_window_ms(action: &str) -> u64 {
    match action {
        "online" => 2500,
        _ => 60,
    }
}

/// Runs one action against the appliance, recording what it acknowledged.
async fn act(a: Arc<Appliance>, action: &str, round: u64, acked: Arc<Mutex<Acked>>) {
    let ok = |st: u16| (200..300).contains(&st);
    let released: Vec<String> = acked.lock().unwrap().released.iter().cloned().collect();
    let devices: Vec<String> = acked.lock().unwrap().devices.iter().cloned().collect();
    match action {
        "upload" => {
            let v = format!("1.{round}.0");
            let (st, _) = a
                .upload(&v, image(400_000 + round as usize * 997, round))
                .await;
            if ok(st) {
                acked.lock().unwrap().firmware.insert(v);
            }
        }
        "release" => {
            let drafts: Vec<String> = {
                let g = acked.lock().unwrap();
                g.firmware.difference(&g.released).cloned().collect()
            };
            for v in drafts {
                let (st, _) = a
                    .call("POST", &format!("/api/ota/firmware/{v}/release"), None)
                    .await;
                if ok(st) {
                    acked.lock().unwrap().released.insert(v);
                }
            }
        }
        "register" => {
            for i in 0..5 {
                let id = format!("CH{round:03}-{i}");
                let (st, _) = a
                    .call(
                        "POST",
                        "/api/ota/devices",
                        Some(json!({"id": id, "protocol": "gateway", "secret": "chaos-secret", "tags": ["chaos"]})),
                    )
                    .await;
                if ok(st) {
                    acked.lock().unwrap().devices.insert(id);
                }
            }
        }
        "upgrade" => {
            let Some(v) = released.last() else { return };
            for d in devices.iter().rev().take(3) {
                let (st, _) = a
                    .call(
                        "POST",
                        &format!("/api/ota/upgrade/{d}"),
                        Some(json!({"version": v, "force": true})),
                    )
                    .await;
                if ok(st) {
                    acked.lock().unwrap().tasks.insert(d.clone());
                }
            }
        }
        "report" => {
            // a device with a task in flight reports progress; a PUBACK acknowledges it
            let tasked: Vec<String> = acked.lock().unwrap().tasks.iter().cloned().collect();
            let Some(d) = tasked.last() else { return };
            let (st, t) = a.get(&format!("/api/ota/task/{d}")).await;
            let (Some(msg_id), Some(task_id)) =
                (t["data"]["msgId"].as_str(), t["data"]["id"].as_str())
            else {
                return;
            };
            if st != 200
                || t["data"]["status"] == "completed"
                || t["data"]["status"] == "failed"
                || t["data"]["status"] == "cancelled"
            {
                return;
            }
            let port = a.running().mqtt;
            let mut dev =
                Device::connect(port, &format!("chaos-{d}"), Some((d, "chaos-secret")), None).await;
            if !matches!(
                dev.next(5).await,
                common::mqtt::Seen::Connected(rumqttc::ConnectReturnCode::Success)
            ) {
                return;
            }
            let start = t["data"]["progress"].as_i64().unwrap_or(0);
            for (n, p) in (start + 1..=(start + 40).min(99)).step_by(3).enumerate() {
                dev.publish(
                    &format!("hanqi/gateway/{d}/report"),
                    json!({"msgType": "ota_progress", "msgId": msg_id,
                        "data": {"state": "downloading", "progress": p}}),
                )
                .await;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while dev.acked.load(std::sync::atomic::Ordering::SeqCst) < n as u64 + 1 {
                    if tokio::time::Instant::now() > deadline {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                acked
                    .lock()
                    .unwrap()
                    .reports
                    .insert(d.clone(), (task_id.to_string(), p));
            }
        }
        "campaign" => {
            let Some(v) = released.first() else { return };
            let (st, body) = a
                .call(
                    "POST",
                    "/api/ota/campaigns",
                    Some(json!({"name": format!("chaos {round}"), "version": v, "deviceType": "gateway",
                        "targets": {"tags": ["chaos"]}, "waves": [50, 100]})),
                )
                .await;
            if ok(st)
                && let Some(id) = body["data"]["id"].as_str()
            {
                acked.lock().unwrap().campaigns.insert(id.to_string());
            }
        }
        "online" => {
            // a few tagged devices come online: campaign rounds give them tasks, and each
            // reports its command completed; a PUBACK acknowledges the completion
            let port = a.running().mqtt;
            let mut online = Vec::new();
            for d in devices.iter().rev().take(6) {
                let mut dev = Device::connect(
                    port,
                    &format!("chaos-on-{d}"),
                    Some((d, "chaos-secret")),
                    None,
                )
                .await;
                if !matches!(
                    tokio::time::timeout(Duration::from_secs(5), dev.rx.recv()).await,
                    Ok(Some(common::mqtt::Seen::Connected(
                        rumqttc::ConnectReturnCode::Success
                    )))
                ) {
                    return;
                }
                if dev
                    .client
                    .subscribe(
                        format!("hanqi/gateway/{d}/command"),
                        rumqttc::QoS::AtLeastOnce,
                    )
                    .await
                    .is_err()
                {
                    return;
                }
                let runs = acked.lock().unwrap().runs.get(d).cloned();
                dev.publish(
                    &format!("hanqi/gateway/{d}/report"),
                    json!({"msgType": "heartbeat",
                        "data": {"firmwareVersion": runs.as_deref().unwrap_or("0.0.1"), "deviceType": "gateway"}}),
                )
                .await;
                online.push((d.clone(), dev));
            }
            // each device answers its commands on its own while the rounds go on
            let until = tokio::time::Instant::now() + Duration::from_secs(3);
            let mut answering = tokio::task::JoinSet::new();
            for (i, (d, mut dev)) in online.into_iter().enumerate() {
                let acked = acked.clone();
                let stop_half_way = (i as u64 + round).is_multiple_of(3);
                answering.spawn(async move {
                    let mut sent = dev.acked.load(std::sync::atomic::Ordering::SeqCst);
                    while let Ok(Some(seen)) = tokio::time::timeout_at(until, dev.rx.recv()).await {
                        let common::mqtt::Seen::Message { payload, .. } = seen else {
                            continue;
                        };
                        let Ok(cmd) = serde_json::from_slice::<Value>(&payload) else {
                            continue;
                        };
                        let (Some(msg_id), Some(version)) =
                            (cmd["msgId"].as_str(), cmd["data"]["version"].as_str())
                        else {
                            continue;
                        };
                        if cmd["msgType"] != "ota_upgrade" {
                            continue;
                        }
                        // some stop half-way (a task left in flight), the others finish
                        let (state, progress) = if stop_half_way {
                            ("downloading", 50)
                        } else {
                            ("completed", 100)
                        };
                        dev.publish(
                            &format!("hanqi/gateway/{d}/report"),
                            json!({"msgType": "ota_progress", "msgId": msg_id,
                                "data": {"state": state, "progress": progress}}),
                        )
                        .await;
                        sent += 1;
                        while dev.acked.load(std::sync::atomic::Ordering::SeqCst) < sent {
                            if tokio::time::Instant::now() > until {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        if !stop_half_way {
                            let mut g = acked.lock().unwrap();
                            g.completed.insert(msg_id.to_string(), d.clone());
                            g.runs.insert(d.clone(), version.to_string());
                        }
                    }
                });
            }
            while answering.join_next().await.is_some() {}
        }
        "delta" => {
            if released.len() < 2 {
                return;
            }
            let (from, to) = (&released[0], &released[released.len() - 1]);
            let _ = a
                .call(
                    "POST",
                    &format!("/api/ota/firmware/{to}/deltas"),
                    Some(json!({"fromVersion": from})),
                )
                .await;
        }
        "backup" => {
            if let Ok(r) = a.fetch("/api/ota/backup").await {
                let _ = r.bytes().await;
            }
        }
        _ => unreachable!(),
    }
}

/// A task's number, for "newest".
fn task_no(t: &Value) -> u64 {
    let id = t["id"].as_str().unwrap_or("");
    id.trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0)
}

/// The invariants after a restart; `Err` says which broke.
async fn check(a: &Appliance, acked: &Acked) -> Result<(), String> {
    let (_, fw) = a.get("/api/ota/firmware?limit=10000").await;
    let listed: Vec<Value> = fw["data"].as_array().cloned().unwrap_or_default();
    let versions: BTreeSet<String> = listed
        .iter()
        .filter_map(|f| f["version"].as_str().map(String::from))
        .collect();
    for v in &acked.firmware {
        if !versions.contains(v) {
            return Err(format!("acknowledged firmware {v} is gone"));
        }
    }
    let mut referenced = BTreeSet::new();
    for f in &listed {
        let v = f["version"].as_str().unwrap();
        if acked.released.contains(v) && f["status"] != "released" {
            return Err(format!("acknowledged release of {v} is gone: {f}"));
        }
        let body = a
            .fetch(&format!("/firmware/{}", f["fileName"].as_str().unwrap()))
            .await
            .map_err(|e| e.to_string())?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        if md5_hex(&body) != f["md5"] || sha256_hex(&body) != f["sha256"] {
            return Err(format!("firmware {v} does not download as listed"));
        }
        referenced.insert(f["sha256"].as_str().unwrap().to_string());
        let (_, deltas) = a.get(&format!("/api/ota/firmware/{v}/deltas")).await;
        for d in deltas["data"].as_array().into_iter().flatten() {
            if let Some(s) = d["sha256"].as_str() {
                referenced.insert(s.to_string());
            }
        }
    }
    let on_disk: BTreeSet<String> = file_names(&a.data().join("blobs")).into_iter().collect();
    if on_disk != referenced {
        return Err(format!(
            "blobs on disk {:?} are not the referenced {:?}",
            on_disk.difference(&referenced).collect::<Vec<_>>(),
            referenced.difference(&on_disk).collect::<Vec<_>>()
        ));
    }
    let tmp = file_names(&a.data().join("tmp"));
    if !tmp.is_empty() {
        return Err(format!("left in tmp/: {tmp:?}"));
    }
    for d in &acked.devices {
        if a.get(&format!("/api/ota/devices/{d}")).await.0 != 200 {
            return Err(format!("acknowledged device {d} is gone"));
        }
    }
    for d in &acked.tasks {
        if a.get(&format!("/api/ota/task/{d}")).await.0 != 200 {
            return Err(format!("acknowledged task of {d} is gone"));
        }
    }
    for (d, (task_id, progress)) in &acked.reports {
        let (_, t) = a.get(&format!("/api/ota/task/{d}")).await;
        let t = &t["data"];
        let same = t["id"].as_str() == Some(task_id.as_str());
        let active = matches!(
            t["status"].as_str(),
            Some("pending" | "downloading" | "verifying" | "installing")
        );
        if same && active && t["progress"].as_i64().unwrap_or(-1) < *progress {
            return Err(format!(
                "device {d}: a report of progress {progress} was acknowledged, the task says {t}"
            ));
        }
    }
    let (_, tasks) = a.get("/api/ota/tasks?limit=10000").await;
    for c in &acked.campaigns {
        let (st, body) = a.get(&format!("/api/ota/campaigns/{c}")).await;
        if st != 200 {
            return Err(format!("acknowledged campaign {c} is gone"));
        }
        // every member is counted once, in one state and one wave; no more in flight than
        // the campaign has active tasks
        let d = &body["data"];
        let total = d["total"].as_u64().unwrap_or(0);
        let counted: u64 = d["counts"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        let in_waves: u64 = d["waves"]
            .as_array()
            .map(|w| w.iter().filter_map(|w| w["devices"].as_u64()).sum())
            .unwrap_or(0);
        if counted != total || in_waves != total {
            return Err(format!(
                "campaign {c}: {total} members, {counted} counted, {in_waves} in waves: {d}"
            ));
        }
        // state by state: a member is counted in the state of its newest task in this
        // campaign while that task is in flight or completed; a failed device is failed (or
        // waits for its retry) with its task's error code
        let mut newest: BTreeMap<&str, &Value> = BTreeMap::new();
        for t in tasks["data"].as_array().into_iter().flatten() {
            if t["campaignId"] != c.as_str() {
                continue;
            }
            let dev = t["deviceId"].as_str().unwrap_or("");
            if newest.get(dev).is_none_or(|n| task_no(n) < task_no(t)) {
                newest.insert(dev, t);
            }
        }
        for s in ["pending", "downloading", "verifying", "installing"] {
            let by_tasks = newest.values().filter(|t| t["status"] == s).count() as u64;
            let counted = d["counts"][s].as_u64().unwrap_or(0);
            if by_tasks != counted {
                return Err(format!(
                    "campaign {c} counts {counted} {s} but {by_tasks} of its members' newest tasks are {s}: {d}"
                ));
            }
        }
        // completed: those whose task completed, and members that needed no task (they ran
        // the target version already)
        let completed = newest
            .values()
            .filter(|t| t["status"] == "completed")
            .count() as u64;
        let untasked = total.saturating_sub(newest.len() as u64);
        let counted = d["counts"]["completed"].as_u64().unwrap_or(0);
        if counted < completed || counted > completed + untasked {
            return Err(format!(
                "campaign {c} counts {counted} completed; {completed} of its members' tasks completed and {untasked} members have no task: {d}"
            ));
        }
        let failed_or_retrying = d["counts"]["failed"].as_u64().unwrap_or(0)
            + d["counts"]["retrying"].as_u64().unwrap_or(0)
            + d["counts"]["cancelled"].as_u64().unwrap_or(0);
        let ended_badly = newest
            .values()
            .filter(|t| t["status"] == "failed" || t["status"] == "cancelled")
            .count() as u64;
        if failed_or_retrying < ended_badly {
            return Err(format!(
                "campaign {c}: {ended_badly} members' tasks failed or were cancelled, {failed_or_retrying} counted so: {d}"
            ));
        }
        for g in d["failures"].as_array().into_iter().flatten() {
            let code = g["code"].as_str().unwrap_or("");
            for dev in g["devices"].as_array().into_iter().flatten() {
                let dev = dev.as_str().unwrap_or("");
                let t = newest.get(dev);
                let agrees = match t {
                    None => code == "NOT_STARTED",
                    Some(t) => t["status"] == "failed" && t["errorCode"] == code,
                };
                if !agrees {
                    return Err(format!(
                        "campaign {c} lists {dev} failed with {code}, its task is {t:?}"
                    ));
                }
            }
        }
    }
    for (msg_id, dev) in &acked.completed {
        let (_, ts) = a
            .get(&format!("/api/ota/tasks?deviceId={dev}&limit=10000"))
            .await;
        let t = ts["data"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["msgId"] == msg_id.as_str());
        if t.is_none_or(|t| t["status"] != "completed") {
            return Err(format!(
                "{dev}'s report that task {msg_id} completed was acknowledged, the task is {t:?}"
            ));
        }
    }
    let mut active: HashMap<String, u32> = HashMap::new();
    for t in tasks["data"].as_array().into_iter().flatten() {
        let status = t["status"].as_str().unwrap_or("");
        match status {
            "pending" | "downloading" | "verifying" | "installing" => {
                *active
                    .entry(t["deviceId"].as_str().unwrap_or("").to_string())
                    .or_default() += 1;
            }
            "completed" | "failed" | "cancelled" => {}
            other => return Err(format!("task in an unknown state {other:?}: {t}")),
        }
    }
    if let Some((d, n)) = active.iter().find(|(_, n)| **n > 1) {
        return Err(format!("device {d} has {n} active tasks"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_keeps_every_invariant() {
    let rounds: u64 = std::env::var("HANGAR_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(14);
    let seed: u64 = std::env::var("HANGAR_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let mut rng = Rng(seed);
    let mut a = Appliance::start().await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut survived = 0;
    for round in 0..rounds {
        // the first rounds build a fleet to act on, then anything goes
        let action = if round < ACTIONS.len() as u64 {
            ACTIONS[round as usize]
        } else {
            ACTIONS[rng.below(ACTIONS.len() as u64) as usize]
        };
        let delay = Duration::from_millis(rng.below(kill_window_ms(action)));
        let shared = Arc::new(a);
        let work = tokio::spawn(act(shared.clone(), action, round, acked.clone()));
        tokio::time::sleep(delay).await;
        // kill -9 wherever the action is now; the client side then fails (a failed call is no
        // acknowledgement) and lets go of the appliance
        let pid = shared.running().pid();
        // SAFETY: a plain syscall on our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = tokio::time::timeout(Duration::from_secs(60), work)
            .await
            .expect("the action did not end after the kill");
        let mut owned = Arc::try_unwrap(shared)
            .unwrap_or_else(|_| panic!("the action still holds the appliance"));
        owned.kill();
        owned.restart().await;
        a = owned;
        let snapshot = acked.lock().unwrap().clone();
        let result = check(&a, &snapshot).await;
        match result {
            Ok(()) => survived += 1,
            Err(e) => panic!("round {round} ({action}, killed after {delay:?}, seed {seed}): {e}"),
        }
    }
    use std::io::Write;
    let g = acked.lock().unwrap();
    let _ = writeln!(
        std::io::stderr().lock(),
        "chaos: seed {seed}: {rounds} kills tried, {survived} survived; acknowledged and checked: {} firmware, {} releases, {} devices, {} tasks, {} campaigns, reports of {} devices, {} completions",
        g.firmware.len(),
        g.released.len(),
        g.devices.len(),
        g.tasks.len(),
        g.campaigns.len(),
        g.reports.len(),
        g.completed.len(),
    );
    drop(g);
    assert_eq!(survived, rounds);
}
