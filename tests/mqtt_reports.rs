//! What happens to gateway reports that the tutorial's gateways really send: progress without a
//! msgId (matched to the device's one active task, or dropped and counted when it has none), a
//! device whose every report is dropped (its task's timeout says so, and its `lastSeen` still
//! moves), a lab device known only by its CONNECT user name, and heartbeats of healthy devices
//! (counted as heartbeats, never as dropped reports).

mod common;

use std::time::{Duration, Instant};

use common::Server;
use common::mqtt::Device;
use serde_json::{Value, json};

const REPORT: &str = "hanqi/gateway/GW1/report";
const COMMAND: &str = "hanqi/gateway/GW1/command";

fn no_msg_id(state: &str, p: u8) -> Value {
    json!({"msgType":"ota_progress","uuid":"GW1","timestamp":1,
           "data":{"state":state,"progress":p,"currentVersion":"1.0.1","targetVersion":"1.0.2"}})
}

async fn wait_reports(s: &Server, pred: impl Fn(&Value) -> bool) -> Value {
    s.wait_for("/api/ota/statistics", 10, |d| pred(&d["reports"]))
        .await["reports"]
        .clone()
}

async fn gateway(s: &Server) -> Device {
    let mut d = Device::connect(s.mqtt, "gw1", Some(("GW1", "gw1-secret")), None).await;
    d.expect_connected().await;
    d.subscribe(COMMAND).await;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_without_msg_id_goes_to_the_one_active_task() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut d = gateway(&s).await;

    // no active task: dropped and counted as such
    d.publish(REPORT, no_msg_id("downloading", 10)).await;
    wait_reports(&s, |r| r["dropped"]["noMsgId"] == 1).await;

    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    let (_, cmd) = d.message(10).await;
    // msgId at the top level and in data, as the tutorial's gateway reads it
    assert_eq!(cmd["data"]["msgId"], cmd["msgId"]);
    assert_eq!(cmd["data"]["msgId"], b["data"]["msgId"]);
    for (state, p) in [("downloading", 40), ("verifying", 95), ("completed", 100)] {
        d.publish(REPORT, no_msg_id(state, p)).await;
    }
    let t = s.wait_task("GW1", |t| t["status"] == "completed").await;
    assert_eq!(t["progress"], 100);
    let r = wait_reports(&s, |r| r["matchedWithoutMsgId"] == 3).await;
    assert_eq!(r["resetOnRestart"], true);
    // and the device runs the target version now, without any heartbeat
    let (_, dev) = s.get_json("/api/ota/devices/GW1").await;
    assert_eq!(dev["data"]["firmwareVersion"], "1.0.2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_while_reports_were_dropped_says_so() {
    let s = Server::start_with(|c| c.tasks.stall_timeout_secs = 1).await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut d = gateway(&s).await;
    let (st, _) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201);
    let _ = d.message(10).await;
    let before = s.get_json("/api/ota/devices/GW1").await.1["data"]["lastSeen"].clone();
    // a gateway reporting a msgId of its own invention: every report dropped
    let wrong = json!({"msgType":"ota_progress","msgId":"ota_123_mine","uuid":"GW1","timestamp":1,
                       "data":{"state":"downloading","progress":10}});
    let deadline = Instant::now() + Duration::from_secs(15);
    let t = loop {
        d.publish(REPORT, wrong.clone()).await;
        let (_, b) = s.get_json("/api/ota/task/GW1").await;
        if b["data"]["status"] == "failed" {
            break b["data"].clone();
        }
        assert!(Instant::now() < deadline, "the task never timed out: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(t["errorCode"], "TIMEOUT");
    let msg = t["errorMessage"].as_str().unwrap();
    assert!(
        msg.contains("reports dropped: unknown msgId"),
        "the timeout blames a silent device: {msg}"
    );
    // dropped reports still count as signs of life
    let after = s.get_json("/api/ota/devices/GW1").await.1["data"]["lastSeen"].clone();
    assert_ne!(before, after, "lastSeen did not move");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_device_is_registered_from_its_connect_user_name() {
    let s = Server::start_with(|c| c.mqtt.allow_anonymous = true).await;
    s.release("1.0.2", "gateway", 1000).await;
    // user name, no password, no publish, no subscribe
    let mut d = Device::connect(s.mqtt, "lab", Some(("LAB1", "")), None).await;
    d.expect_connected().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, b) = s
            .post_json("/api/ota/upgrade/LAB1", json!({"version": "1.0.2"}))
            .await;
        if st == 201 {
            break;
        }
        assert_eq!(st, 404, "{b}");
        assert!(Instant::now() < deadline, "LAB1 never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, b) = s.get_json("/api/ota/devices/LAB1").await;
    assert_eq!(b["data"]["registered"], false, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_healthy_devices_are_not_dropped_reports() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut d = gateway(&s).await;
    let hb = |v: &str| json!({"msgType":"heartbeat","uuid":"GW1","timestamp":1,"data":{"firmwareVersion":v}});
    d.publish(REPORT, hb("1.0.1")).await;
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    let _ = d.message(10).await;
    // the device boots the new version and keeps saying so
    for _ in 0..20 {
        d.publish(REPORT, hb("1.0.2")).await;
    }
    s.wait_task("GW1", |t| t["status"] == "completed").await;
    let r = wait_reports(&s, |r| r["heartbeats"] == 21).await;
    for (k, v) in r["dropped"].as_object().unwrap() {
        assert_eq!(v, 0, "{k}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_heartbeats_is_known_by_its_reports_version() {
    let mut s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut d = gateway(&s).await;
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    let (_, cmd) = d.message(10).await;
    let msg = cmd["data"]["msgId"].as_str().unwrap().to_string();
    let report = |state: &str| json!({"msgType":"ota_progress","msgId":msg,"data":{"state":state,"progress":10,"currentVersion":"1.0.1","errorCode":"E42"}});
    d.publish(REPORT, report("downloading")).await;
    s.wait_task("GW1", |t| t["status"] == "downloading").await;
    // while it upgrades, the API shows what its reports say it runs
    let (_, dev) = s.get_json("/api/ota/devices/GW1").await;
    assert_eq!(dev["data"]["firmwareVersion"], "1.0.1", "{dev}");
    d.publish(REPORT, report("failed")).await;
    s.wait_task("GW1", |t| t["status"] == "failed").await;
    drop(d);
    // the failure stored it: it is still known after a restart
    s.restart().await;
    let (_, dev) = s.get_json("/api/ota/devices/GW1").await;
    assert_eq!(dev["data"]["firmwareVersion"], "1.0.1", "{dev}");
}

/// An MQTT 3.1.1 string: length and bytes.
fn mqtt_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A fixed header and its body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// CONNECT with user and password, then at once (same write) a QoS 1 heartbeat.
fn connect_and_heartbeat(id: &str, secret: &str, version: &str) -> Vec<u8> {
    let mut c = Vec::new();
    mqtt_str(&mut c, "MQTT");
    c.extend_from_slice(&[4, 0b1100_0010, 0, 60]); // 3.1.1, user+password+clean, keep-alive 60
    mqtt_str(&mut c, &format!("hb-{id}"));
    mqtt_str(&mut c, id);
    mqtt_str(&mut c, secret);
    let mut p = Vec::new();
    mqtt_str(&mut p, &format!("hanqi/gateway/{id}/report"));
    p.extend_from_slice(&7u16.to_be_bytes());
    p.extend_from_slice(
        json!({"msgType":"heartbeat","uuid":id,"timestamp":1,
               "data":{"firmwareVersion":version,"deviceType":"gateway"}})
        .to_string()
        .as_bytes(),
    );
    let mut out = frame(0x10, &c);
    out.extend(frame(0x32, &p));
    out
}

/// A heartbeat sent in the same write as its CONNECT is in the device's record once its PUBACK
/// came: the connection being noted at the same moment (lastSeen, address) used to overwrite
/// the device record the heartbeat had just written, so an acknowledged version was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_sent_with_connect_is_kept_once_acknowledged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start().await;
    let n = 40;
    for i in 0..n {
        s.register(&format!("HB{i:02}"), "gateway", "hb-secret-1")
            .await;
    }
    for round in 0..5 {
        let version = format!("2.0.{round}");
        let mut all = Vec::new();
        for i in 0..n {
            let (port, version) = (s.mqtt, version.clone());
            all.push(tokio::spawn(async move {
                let id = format!("HB{i:02}");
                let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                c.write_all(&connect_and_heartbeat(&id, "hb-secret-1", &version))
                    .await
                    .unwrap();
                // CONNACK (4 bytes), then PUBACK of packet 7
                let mut got = [0u8; 8];
                tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut got))
                    .await
                    .expect("no CONNACK and PUBACK")
                    .unwrap();
                assert_eq!(got, [0x20, 2, 0, 0, 0x40, 2, 0, 7], "{id}");
                c.write_all(&[0xE0, 0]).await.unwrap();
                id
            }));
        }
        for t in all {
            let id = t.await.unwrap();
            let (_, d) = s.get_json(&format!("/api/ota/devices/{id}")).await;
            assert_eq!(
                d["data"]["firmwareVersion"], version,
                "round {round}: {id}'s acknowledged heartbeat is not in its record: {d}"
            );
        }
    }
}
