//! Debian's real mosquitto 2 with its dynamic-security plugin as the site's broker
//! (`mqtt.engine = "external"`, `sync = "mosquitto-dynsec"`): Hangar keeps the broker's device
//! accounts, the devices (`hangar sim`, mosquitto_pub/sub) connect to mosquitto only, and the
//! OTA guarantees hold across a `kill -9` of Hangar and a restart of mosquitto.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::mosquitto::Mosquitto;
use common::{Appliance, bin, image, sim_result};

async fn until<F: AsyncFnMut() -> Option<T>, T>(secs: u64, what: &str, mut f: F) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sim(
    a: &Appliance,
    m: &Mosquitto,
    devices: usize,
    prefix: &str,
    slow: Option<u64>,
) -> tokio::process::Child {
    let mut args: Vec<String> = [
        "sim",
        "--devices",
        &devices.to_string(),
        "--version",
        "1.0.1",
        "--register",
        "--secret",
        "device-secret-1",
        "--until-idle",
        "--idle-secs",
        "4",
        "--timeout",
        "240",
        "--id-prefix",
        prefix,
        "--summary-every",
        "0",
        "--mqtt",
        &m.url(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(kbs) = slow {
        args.extend(["--slow".to_string(), kbs.to_string()]);
    }
    tokio::process::Command::new(bin())
        .arg("--config")
        .arg(&a.running().config)
        .args(args)
        .env("RUST_LOG", "hangar=error")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn release_two(a: &Appliance, dir: &Path, size: usize) {
    for (v, seed, len) in [("1.0.1", 1, 1000), ("1.0.2", 2, size)] {
        let f = dir.join(format!("fw-{v}"));
        std::fs::write(&f, image(len, seed)).unwrap();
        a.cli(&["firmware", "upload", f.to_str().unwrap(), "--version", v]);
        a.cli(&["firmware", "release", v]);
    }
}

async fn online(a: &Appliance, n: usize) {
    until(120, &format!("{n} devices online"), async || {
        let (_, d) = a.get("/api/ota/devices?limit=10000").await;
        let on = d["data"]
            .as_array()
            .map(|l| l.iter().filter(|x| x["online"] == true).count())
            .unwrap_or(0);
        (on >= n).then_some(())
    })
    .await;
}

async fn campaign(a: &Appliance, dir: &Path, max_in_flight: u64) -> String {
    let body = dir.join("campaign.json");
    std::fs::write(
        &body,
        json!({"name": "on mosquitto", "version": "1.0.2", "targets": {"all": true},
               "waves": [100], "successThreshold": 100, "maxInFlight": max_in_flight})
        .to_string(),
    )
    .unwrap();
    let created: Value =
        serde_json::from_str(&a.cli(&["campaign", "create", body.to_str().unwrap()])).unwrap();
    created["id"].as_str().unwrap().to_string()
}

async fn completed(a: &Appliance, id: &str, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (_, c) = a.get(&format!("/api/ota/campaigns/{id}")).await;
        if c["data"]["status"] == "completed" {
            break;
        }
        if Instant::now() > deadline {
            let (_, t) = a.get("/api/ota/tasks?limit=1000").await;
            panic!("the campaign did not complete: {c}\ntasks: {t}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, c) = a.get(&format!("/api/ota/campaigns/{id}")).await;
    assert_eq!(c["data"]["counts"]["completed"], n, "{c}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_devices_on_mosquitto_with_synced_accounts_finish_a_campaign() {
    let dir = tempfile::tempdir().unwrap();
    let Some(m) = Mosquitto::start(dir.path()) else {
        return;
    };
    // behind a shared subscription, as a site with a standby Hangar runs it
    let toml = format!("{}share_group = \"ota\"\n", m.hangar_toml(dir.path()));
    let a = Appliance::start_with(dir.path(), "", &toml).await;
    let (_, h) = until(30, "the link to mosquitto is up", async || {
        let (st, h) = a.get("/healthz").await;
        (h["data"]["broker"]["connected"] == true).then_some((st, h["data"].clone()))
    })
    .await;
    assert_eq!(h["broker"]["engine"], "external", "{h}");
    release_two(&a, dir.path(), 50_000).await;
    let sim = sim(&a, &m, 500, "M", None);
    online(&a, 500).await;
    let id = campaign(&a, dir.path(), 500).await;
    completed(&a, &id, 500).await;
    let (code, sum) = sim_result(sim, 120).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["completed"], 500, "{sum}");
    assert_eq!(sum["attempts"], 500, "one command per device: {sum}");
    // every account is Hangar's, made through $CONTROL, with the device's own role
    let dynsec: Value =
        serde_json::from_str(&std::fs::read_to_string(m.dir.join("dynsec.json")).unwrap()).unwrap();
    let managed = dynsec["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["textname"] == "hangar device")
        .count();
    assert_eq!(managed, 500, "one managed client per device");
    let h = a.get("/healthz").await.1["data"].clone();
    assert_eq!(h["state"], "ok", "{h}");
    assert_eq!(h["broker"]["accountSync"]["queued"], 0, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_device_is_refused_by_mosquitto_and_a_device_cannot_report_for_another() {
    let dir = tempfile::tempdir().unwrap();
    let Some(m) = Mosquitto::start(dir.path()) else {
        return;
    };
    let a = Appliance::start_with(dir.path(), "", &m.hangar_toml(dir.path())).await;
    for id in ["GW-A", "GW-B"] {
        let (st, b) = a
            .call(
                "POST",
                "/api/ota/devices",
                Some(json!({"id": id, "protocol": "gateway", "secret": format!("{id}-secret")})),
            )
            .await;
        assert_eq!(st, 201, "{b}");
    }
    until(30, "the account of GW-A works on mosquitto", async || {
        m.connects("GW-A", "GW-A-secret").ok()
    })
    .await;
    assert!(m.connects("GW-A", "wrong-secret").is_err());
    // A reports as B: mosquitto's ACL drops it; A's own report right after it arrives alone
    let forged = json!({"msgType": "heartbeat", "uuid": "GW-B", "timestamp": 1,
        "data": {"firmwareVersion": "6.6.6", "deviceType": "gateway"}});
    let own = json!({"msgType": "heartbeat", "uuid": "GW-A", "timestamp": 1,
        "data": {"firmwareVersion": "1.0.1", "deviceType": "gateway"}});
    let pub_as_a = |topic: &str, msg: &Value| {
        let st = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &m.port.to_string()])
            .args(["-u", "GW-A", "-P", "GW-A-secret", "-q", "1", "-i", "GW-A"])
            .args(["-t", topic, "-m", &msg.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    pub_as_a("hanqi/gateway/GW-B/report", &forged);
    pub_as_a("hanqi/gateway/GW-A/report", &own);
    until(30, "A's heartbeat is stored", async || {
        let (_, d) = a.get("/api/ota/devices/GW-A").await;
        (d["data"]["firmwareVersion"] == "1.0.1").then_some(())
    })
    .await;
    let (_, b) = a.get("/api/ota/devices/GW-B").await;
    assert!(
        b["data"]["firmwareVersion"].is_null(),
        "B never reported: {b}"
    );
    // a connected device is cut and refused once it is deleted
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &m.port.to_string()])
        .args(["-u", "GW-A", "-P", "GW-A-secret", "-i", "GW-A-listener"])
        .args(["-t", "hanqi/gateway/GW-A/command"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (st, b) = a.call("DELETE", "/api/ota/devices/GW-A", None).await;
    assert_eq!(st, 200, "{b}");
    until(30, "mosquitto refuses the deleted device", async || {
        m.connects("GW-A", "GW-A-secret").err()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sub.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the connected device was not cut"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // B's account is untouched
    assert!(m.connects("GW-B", "GW-B-secret").is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_of_hangar_and_a_mosquitto_restart_lose_no_report_and_repeat_no_command() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut m) = Mosquitto::start(dir.path()) else {
        return;
    };
    let mut a = Appliance::start_with(dir.path(), "", &m.hangar_toml(dir.path())).await;
    release_two(&a, dir.path(), 200_000).await;
    let sim = sim(&a, &m, 16, "R", Some(100));
    online(&a, 16).await;
    let id = campaign(&a, dir.path(), 6).await;
    until(60, "downloads under way", async || {
        let (_, c) = a.get(&format!("/api/ota/campaigns/{id}")).await;
        (c["data"]["counts"]["downloading"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    a.kill_and_restart().await;
    until(60, "downloads under way again", async || {
        let (_, c) = a.get(&format!("/api/ota/campaigns/{id}")).await;
        (c["data"]["counts"]["completed"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    m.restart();
    completed(&a, &id, 16).await;
    let (code, sum) = sim_result(sim, 120).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["completed"], 16, "{sum}");
    assert_eq!(
        sum["attempts"], 16,
        "no device got a second command for its upgrade: {sum}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangar_starts_without_its_broker_says_so_and_connects_when_it_comes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut m) = Mosquitto::start(dir.path()) else {
        return;
    };
    m.stop();
    let a = Appliance::start_with(dir.path(), "", &m.hangar_toml(dir.path())).await;
    let (st, h) = a.get("/healthz").await;
    assert_eq!(st, 200);
    let h = &h["data"];
    assert_eq!(h["state"], "degraded", "{h}");
    assert_eq!(h["broker"]["connected"], false, "{h}");
    assert!(h["reasons"].to_string().contains("site broker"), "{h}");
    m.run();
    until(60, "the link comes up", async || {
        let h = a.get("/healthz").await.1["data"].clone();
        (h["state"] == "ok" && h["broker"]["connected"] == true).then_some(())
    })
    .await;
    // wrong credentials: a clear reason
    let dir2 = tempfile::tempdir().unwrap();
    let toml = m
        .hangar_toml(dir2.path())
        .replace("username = \"admin\"", "username = \"nobody\"");
    let b = Appliance::start_with(dir2.path(), "", &toml).await;
    let h = until(30, "the refusal is on /healthz", async || {
        let h = b.get("/healthz").await.1["data"].clone();
        h["broker"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("credentials"))
            .then_some(h)
    })
    .await;
    assert_eq!(h["state"], "degraded", "{h}");
}
