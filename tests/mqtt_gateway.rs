//! The gateway protocol (SPEC 4.1) end to end: a real MQTT device (rumqttc) receives the
//! command, downloads through the signed URL with Range, reports every state, and the task ends
//! with the right status and timestamps; failure, rollback, stall timeout, offline devices,
//! restarts, and bad reports.

mod common;

use common::mqtt::Device;
use common::*;
use serde_json::{Value, json};

const REPORT: &str = "hanqi/gateway/GW1/report";
const COMMAND: &str = "hanqi/gateway/GW1/command";

fn heartbeat(version: &str) -> Value {
    json!({"msgType":"heartbeat","uuid":"GW1","timestamp":1,"data":{"firmwareVersion":version,"deviceType":"gateway","deltaFormats":["bsdiff40"]}})
}

fn progress(msg_id: &str, state: &str, p: u8) -> Value {
    json!({"msgType":"ota_progress","msgId":msg_id,"uuid":"GW1","timestamp":1,
           "data":{"state":state,"progress":p,"currentVersion":"1.0.1","targetVersion":"1.0.2","errorCode":null,"errorMessage":null}})
}

async fn online_gateway(s: &Server) -> Device {
    let mut d = Device::connect(s.mqtt, "gw1-client", Some(("GW1", "gw1-secret")), None).await;
    d.expect_connected().await;
    d.subscribe(COMMAND).await;
    d.publish(REPORT, heartbeat("1.0.1")).await;
    s.wait_device(|d| d["firmwareVersion"] == "1.0.1" && d["online"] == true)
        .await;
    d
}

trait WaitDevice {
    async fn wait_device(&self, pred: impl Fn(&Value) -> bool) -> Value;
}

impl WaitDevice for Server {
    async fn wait_device(&self, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for("/api/ota/devices/GW1", 10, pred).await
    }
}

#[tokio::test]
async fn upgrade_one_gateway_end_to_end() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    let img = s.release("1.0.2", "gateway", 300_000).await;
    let mut d = online_gateway(&s).await;

    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["data"]["fromVersion"], "1.0.1");

    let (topic, cmd) = d.message(10).await;
    assert_eq!(topic, COMMAND);
    assert_eq!(cmd["msgType"], "ota_upgrade");
    assert_eq!(cmd["uuid"], "GW1");
    let msg_id = cmd["msgId"].as_str().unwrap().to_string();
    assert!(msg_id.starts_with("ota_"));
    let data = &cmd["data"];
    assert_eq!(data["version"], "1.0.2");
    assert_eq!(data["md5"], md5_hex(&img));
    assert_eq!(data["sha256"], sha256_hex(&img));
    assert_eq!(data["fileSize"], img.len() as u64);
    assert_eq!(data["forceUpgrade"], false);
    assert!(data.get("delta").is_none(), "no delta exists yet");

    // download through the signed URL, in two Range requests, with no admin token
    let url = data["firmwareUrl"].as_str().unwrap();
    assert!(url.contains("/firmware/gateway_v1.0.2.bin?token="), "{url}");
    let url = url.replace(&url[..url.find("/firmware/").unwrap()], &s.base);
    let a = s
        .client
        .get(&url)
        .header("range", "bytes=0-99999")
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 206);
    let mut got = a.bytes().await.unwrap().to_vec();
    let b2 = s
        .client
        .get(&url)
        .header("range", "bytes=100000-")
        .send()
        .await
        .unwrap();
    assert_eq!(b2.status(), 206);
    got.extend_from_slice(&b2.bytes().await.unwrap());
    assert_eq!(md5_hex(&got), md5_hex(&img));

    for (state, p) in [
        ("downloading", 10),
        ("downloading", 100),
        ("verifying", 100),
        ("installing", 50),
    ] {
        d.publish(REPORT, progress(&msg_id, state, p)).await;
    }
    let t = s
        .wait_task("GW1", |t| {
            t["status"] == "installing" && t["progress"] == 50
        })
        .await;
    assert!(t["startTime"].is_string());
    assert!(t["completeTime"].is_null());
    d.publish(REPORT, progress(&msg_id, "completed", 100)).await;
    let t = s.wait_task("GW1", |t| t["status"] == "completed").await;
    assert_eq!(t["progress"], 100);
    assert!(t["completeTime"].as_str().unwrap() >= t["startTime"].as_str().unwrap());
    let states: Vec<&str> = t["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "pending",
            "pending",
            "downloading",
            "downloading",
            "verifying",
            "installing",
            "completed"
        ]
    );

    // the device reboots on the new version: stays completed; device inventory follows
    d.publish(REPORT, heartbeat("1.0.2")).await;
    s.wait_device(|d| d["firmwareVersion"] == "1.0.2").await;
    let t = s.wait_task("GW1", |t| t["status"] == "completed").await;
    assert!(t["errorCode"].is_null());

    let (_, stats) = s.get_json("/api/ota/statistics").await;
    assert_eq!(stats["data"]["completed"], 1);
    assert_eq!(stats["data"]["successRate"], 100.0);
    assert_eq!(stats["data"]["byVersion"]["1.0.2"]["completed"], 1);
    let (_, tasks) = s
        .get_json("/api/ota/tasks?deviceId=GW1&status=completed")
        .await;
    assert_eq!(tasks["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn failure_rollback_and_stale_reports() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut d = online_gateway(&s).await;

    // failure with the device's code
    s.post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    let (_, cmd) = d.message(10).await;
    let id1 = cmd["msgId"].as_str().unwrap().to_string();
    d.publish(REPORT, progress(&id1, "downloading", 40)).await;
    let mut f = progress(&id1, "failed", 40);
    f["data"]["errorCode"] = json!("MD5_MISMATCH");
    f["data"]["errorMessage"] = json!("md5 of the download differs");
    d.publish(REPORT, f).await;
    let t = s.wait_task("GW1", |t| t["status"] == "failed").await;
    assert_eq!(t["errorCode"], "MD5_MISMATCH");
    assert!(t["completeTime"].is_string());
    // late reports for the finished task change nothing
    d.publish(REPORT, progress(&id1, "installing", 90)).await;

    // second attempt completes, then the device comes back on the old version
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    let (_, cmd) = d.message(10).await;
    let id2 = cmd["msgId"].as_str().unwrap().to_string();
    assert_ne!(id1, id2);
    d.publish(REPORT, progress(&id2, "installing", 60)).await;
    d.publish(REPORT, progress(&id2, "downloading", 99)).await; // backwards: ignored
    d.publish(REPORT, progress(&id2, "installing", 30)).await; // less progress: ignored
    d.publish(REPORT, progress(&id2, "completed", 100)).await;
    s.wait_task("GW1", |t| t["status"] == "completed").await;
    d.publish(REPORT, heartbeat("1.0.1")).await;
    let t = s.wait_task("GW1", |t| t["status"] == "failed").await;
    assert_eq!(t["errorCode"], "ROLLED_BACK");
    let notes: Vec<&str> = t["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        notes,
        ["pending", "pending", "installing", "completed", "failed"],
        "stale reports left no trace"
    );

    // the first task is untouched by everything after it
    let (_, all) = s.get_json("/api/ota/tasks?deviceId=GW1").await;
    let first = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["msgId"] == id1.as_str())
        .unwrap()
        .clone();
    assert_eq!(first["status"], "failed");
    assert_eq!(first["errorCode"], "MD5_MISMATCH");
}

#[tokio::test]
async fn api_refusals_for_upgrades() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    let (st, _) = s
        .post_json("/api/ota/upgrade/NOPE", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 404);
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 409, "missing firmware: {b}");
    let (st, _) = s.upload("1.0.2", None, image(100, 1)).await;
    assert_eq!(st, 201);
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 409, "draft firmware: {b}");
    assert!(b["message"].as_str().unwrap().contains("not released"));
    s.post_json("/api/ota/firmware/1.0.2/release", json!({}))
        .await;
    for bad in [
        json!({}),
        json!({"version": 5}),
        json!({"version": "../x"}),
        json!({"version": "1.0.2", "extra": 1}),
    ] {
        let (st, b) = s.post_json("/api/ota/upgrade/GW1", bad.clone()).await;
        assert_eq!(st, 400, "{bad}: {b}");
    }
    // the device is offline: the task waits (startTime null) and a second one is refused
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    assert!(b["data"]["startTime"].is_null());
    let (st, _) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 409);
    let (st, b) = s
        .post_json(
            "/api/ota/upgrade/GW1",
            json!({"version": "1.0.2", "force": true}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["data"]["force"], true);
    let (_, all) = s.get_json("/api/ota/tasks?deviceId=GW1").await;
    let statuses: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["pending", "cancelled"],
        "force replaced the first task"
    );
    // a firmware that an active task targets cannot be deleted
    let r = s
        .client
        .delete(s.url("/api/ota/firmware/1.0.2"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // cancel
    let (st, b) = s.post_json("/api/ota/task/GW1/cancel", json!({})).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["data"]["status"], "cancelled");
    let (st, _) = s.post_json("/api/ota/task/GW1/cancel", json!({})).await;
    assert_eq!(st, 409);
    let (st, _) = s.get_json("/api/ota/task/NOPE").await;
    assert_eq!(st, 404);
    let (st, _) = s.get_json("/api/ota/tasks?status=flying").await;
    assert_eq!(st, 400);
    // no active task any more: delete works
    let r = s
        .client
        .delete(s.url("/api/ota/firmware/1.0.2"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn offline_device_gets_its_command_when_it_connects() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let (st, _) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201);
    let mut d = Device::connect(s.mqtt, "late", Some(("GW1", "gw1-secret")), None).await;
    d.expect_connected().await;
    d.subscribe(COMMAND).await;
    let (_, cmd) = d.message(10).await;
    assert_eq!(cmd["msgType"], "ota_upgrade");
    let t = s.wait_task("GW1", |t| t["startTime"].is_string()).await;
    assert_eq!(t["msgId"], cmd["msgId"]);
}

#[tokio::test]
async fn stall_timeout_fails_the_task() {
    let s = Server::start_with(|c| c.tasks.stall_timeout_secs = 1).await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut d = online_gateway(&s).await;
    s.post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    let (_, cmd) = d.message(10).await;
    d.publish(
        REPORT,
        progress(cmd["msgId"].as_str().unwrap(), "downloading", 5),
    )
    .await;
    let t = s.wait_task("GW1", |t| t["status"] == "failed").await;
    assert_eq!(t["errorCode"], "TIMEOUT");
}

#[tokio::test]
async fn restart_mid_task_keeps_the_task_and_takes_later_reports() {
    let mut s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut d = online_gateway(&s).await;
    s.post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    let (_, cmd) = d.message(10).await;
    let msg_id = cmd["msgId"].as_str().unwrap().to_string();
    d.publish(REPORT, progress(&msg_id, "downloading", 30))
        .await;
    s.wait_task("GW1", |t| t["progress"] == 30).await;
    drop(d);
    s.restart().await;
    let t = s.wait_task("GW1", |t| t["status"] == "downloading").await;
    assert_eq!(t["progress"], 30);
    let mut d = Device::connect(s.mqtt, "gw1-again", Some(("GW1", "gw1-secret")), None).await;
    d.expect_connected().await;
    d.subscribe(COMMAND).await;
    d.publish(REPORT, progress(&msg_id, "installing", 80)).await;
    d.publish(REPORT, heartbeat("1.0.2")).await;
    let t = s.wait_task("GW1", |t| t["status"] == "completed").await;
    assert_eq!(t["msgId"], msg_id.as_str());
}

#[tokio::test]
async fn bad_reports_are_dropped_and_nothing_breaks() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.register("GW2", "gateway", "gw2-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut d = online_gateway(&s).await;
    s.post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    let (_, cmd) = d.message(10).await;
    let msg_id = cmd["msgId"].as_str().unwrap().to_string();
    d.publish(REPORT, progress(&msg_id, "downloading", 20))
        .await;
    s.wait_task("GW1", |t| t["progress"] == 20).await;

    let bad = [
        json!("not an object"),
        json!({"msgType":"reboot","data":{}}),
        json!({"msgType":"ota_progress","msgId":msg_id,"data":{"state":"downloading","progress":250}}),
        json!({"msgType":"ota_progress","msgId":msg_id,"data":{"state":"downloading","progress":-3}}),
        json!({"msgType":"ota_progress","msgId":msg_id,"data":{"state":"downloading","progress":"50"}}),
        json!({"msgType":"ota_progress","msgId":msg_id,"data":{"state":"exploding"}}),
        json!({"msgType":"ota_progress","msgId":"ota_0_unknown","data":{"state":"completed","progress":100}}),
        json!({"msgType":"heartbeat","data":{"firmwareVersion":"../../etc"}}),
    ];
    for _ in 0..50 {
        for b in &bad {
            d.publish(REPORT, b.clone()).await;
        }
    }
    d.client
        .publish(
            REPORT,
            rumqttc::QoS::AtLeastOnce,
            false,
            b"{{{{garbage".to_vec(),
        )
        .await
        .unwrap();
    // another device reporting GW1's msgId on its own topic is ignored too
    let mut d2 = Device::connect(s.mqtt, "gw2", Some(("GW2", "gw2-secret")), None).await;
    d2.expect_connected().await;
    d2.publish("hanqi/gateway/GW2/report", json!({"msgType":"ota_progress","msgId":msg_id,"data":{"state":"completed","progress":100}})).await;
    // a marker report proves everything before it was processed
    d.publish(REPORT, progress(&msg_id, "downloading", 21))
        .await;
    let t = s.wait_task("GW1", |t| t["progress"] == 21).await;
    assert_eq!(t["status"], "downloading");
    let (_, stats) = s.get_json("/api/ota/statistics").await;
    let dropped = &stats["data"]["droppedReports"];
    assert!(dropped["malformed"].as_u64().unwrap() >= 351, "{dropped}");
    assert!(dropped["unknownMsgId"].as_u64().unwrap() >= 51, "{dropped}");

    // an oversized packet (over mqtt.max_packet_bytes, 1 MiB) closes that connection; the
    // server keeps serving
    let big = vec![b'x'; 1024 * 1024 + 1];
    d.client
        .publish(REPORT, rumqttc::QoS::AtLeastOnce, false, big)
        .await
        .unwrap();
    d.expect_closed(10).await;
    let (st, _) = s.get_json("/healthz").await;
    assert_eq!(st, 200);
    let mut d = Device::connect(s.mqtt, "gw1-back", Some(("GW1", "gw1-secret")), None).await;
    d.expect_connected().await;
    d.publish(REPORT, progress(&msg_id, "verifying", 100)).await;
    s.wait_task("GW1", |t| t["status"] == "verifying").await;
}
