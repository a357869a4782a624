//! The Alibaba-style protocol (SPEC 4.2) end to end with a real MQTT client logging in as
//! `{productKey}&{deviceName}`: upgrade push, progress steps, failure steps, completion by the
//! next inform, rollback, and `firmware/get` with its `get_reply`.

mod common;

use common::mqtt::Device;
use common::*;
use serde_json::json;

const ID: &str = "a1Oven/oven-01";
const PATH_ID: &str = "a1Oven%2Foven-01";
const UPGRADE: &str = "/ota/device/upgrade/a1Oven/oven-01";
const INFORM: &str = "/ota/device/inform/a1Oven/oven-01";
const PROGRESS: &str = "/ota/device/progress/a1Oven/oven-01";
const GET: &str = "/sys/a1Oven/oven-01/thing/ota/firmware/get";
const GET_REPLY: &str = "/sys/a1Oven/oven-01/thing/ota/firmware/get_reply";

async fn oven(s: &Server, version: &str) -> Device {
    let mut d = Device::connect(
        s.mqtts,
        "oven-client",
        Some(("a1Oven&oven-01", "oven-secret")),
        Some(s.dir.path()),
    )
    .await;
    d.expect_connected().await;
    d.subscribe(UPGRADE).await;
    d.subscribe(GET_REPLY).await;
    d.publish(INFORM, json!({"id": "1", "params": {"version": version}}))
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, b) = s.get_json(&format!("/api/ota/devices/{PATH_ID}")).await;
        if b["data"]["firmwareVersion"] == version && b["data"]["online"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{b}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    d
}

#[tokio::test]
async fn upgrade_an_alibaba_device_over_mqtts() {
    let s = Server::start().await;
    s.register(ID, "alibaba", "oven-secret").await;
    let (_, dev) = s.get_json(&format!("/api/ota/devices/{PATH_ID}")).await;
    assert_eq!(
        dev["data"]["deviceType"], "a1Oven",
        "the productKey is the device type"
    );
    let img = s.release("1.0.7", "a1Oven", 200_000).await;
    let mut d = oven(&s, "1.0.0").await;

    let (st, b) = s
        .post_json(
            &format!("/api/ota/upgrade/{PATH_ID}"),
            json!({"version": "1.0.7"}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let (topic, up) = d.message(10).await;
    assert_eq!(topic, UPGRADE);
    assert_eq!(up["code"], "1000");
    assert_eq!(up["message"], "success");
    let data = &up["data"];
    assert_eq!(data["version"], "1.0.7");
    assert_eq!(data["size"], img.len() as u64);
    assert_eq!(data["md5"], md5_hex(&img));
    assert_eq!(data["sign"], md5_hex(&img));
    assert_eq!(data["signMethod"], "Md5");
    assert_eq!(data["isDiff"], 0);
    let url = data["url"].as_str().unwrap();
    let url = url.replace(&url[..url.find("/firmware/").unwrap()], &s.base);
    let got = s
        .client
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(md5_hex(&got), md5_hex(&img));

    for step in ["10", "50", "100"] {
        d.publish(
            PROGRESS,
            json!({"id": "2", "params": {"step": step, "desc": "downloading"}}),
        )
        .await;
    }
    let t = s.wait_task(ID, |t| t["status"] == "installing").await;
    assert_eq!(t["progress"], 100);
    // the oven swaps its binary, re-executes, and informs the new version
    d.publish(INFORM, json!({"id": "3", "params": {"version": "1.0.7"}}))
        .await;
    let t = s.wait_task(ID, |t| t["status"] == "completed").await;
    assert!(t["startTime"].is_string() && t["completeTime"].is_string());

    // nothing newer now: get answers {}
    d.publish(GET, json!({"id": "77", "version": "1.0", "params": {"module": "default"}, "method": "thing.ota.firmware.get"})).await;
    let (topic, reply) = d.message(10).await;
    assert_eq!(topic, GET_REPLY);
    assert_eq!(reply, json!({"code": 200, "data": {}, "id": "77"}));
}

#[tokio::test]
async fn failure_steps_rollback_and_firmware_get() {
    let s = Server::start().await;
    s.register(ID, "alibaba", "oven-secret").await;
    s.release("1.0.7", "a1Oven", 1000).await;
    let mut d = oven(&s, "1.0.0").await;

    // the device pulls: firmware/get creates the task and answers with the upgrade data
    d.publish(GET, json!({"id": "123", "version": "1.0", "params": {"module": "default"}, "method": "thing.ota.firmware.get"})).await;
    let (topic, reply) = d.message(10).await;
    assert_eq!(topic, GET_REPLY);
    assert_eq!(reply["code"], 200);
    assert_eq!(reply["id"], "123");
    assert_eq!(reply["data"]["version"], "1.0.7");
    let t = s.wait_task(ID, |t| t["status"] == "pending").await;
    assert!(t["startTime"].is_string(), "the reply is the command");

    for (step, code) in [("-2", "DOWNLOAD_FAILED")] {
        d.publish(
            PROGRESS,
            json!({"id": "5", "params": {"step": step, "desc": "download failed"}}),
        )
        .await;
        let t = s.wait_task(ID, |t| t["status"] == "failed").await;
        assert_eq!(t["errorCode"], code);
    }
    // steps outside the table are dropped; no task moves
    d.publish(PROGRESS, json!({"id": "6", "params": {"step": "-9"}}))
        .await;
    d.publish(PROGRESS, json!({"id": "6", "params": {"step": "0"}}))
        .await;

    // an upgrade that comes back on the old version is a rollback
    let (st, _) = s
        .post_json(
            &format!("/api/ota/upgrade/{PATH_ID}"),
            json!({"version": "1.0.7"}),
        )
        .await;
    assert_eq!(st, 201);
    let _ = d.message(10).await;
    d.publish(PROGRESS, json!({"id": "7", "params": {"step": "100"}}))
        .await;
    s.wait_task(ID, |t| t["status"] == "installing").await;
    d.publish(INFORM, json!({"id": "8", "params": {"version": "1.0.0"}}))
        .await;
    let t = s.wait_task(ID, |t| t["status"] == "failed").await;
    assert_eq!(t["errorCode"], "ROLLED_BACK");
}
