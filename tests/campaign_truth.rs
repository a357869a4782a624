//! Campaigns tell the truth: devices that completed and came back on their old version are
//! failures (in the counts, the verdict, the failures by code and the statistics); an appliance
//! restart between a device's "completed" and its reboot is no rollback; devices waiting for a
//! retry, and queued devices that are offline, are shown as such; a campaign that waits for
//! its start time or its window says until when.

mod common;

use std::time::Duration;

use common::Server;
use common::mqtt::Device;
use serde_json::{Value, json};

fn sim_args<'a>(prefix: &'a str, n: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--devices",
        n,
        "--version",
        "1.0.1",
        "--register",
        "--timeout",
        "60",
        "--id-prefix",
        prefix,
    ];
    a.extend_from_slice(extra);
    a
}

/// 5 healthy devices and 5 whose new image does not boot (back on 1.0.1 `reboot_ms` after
/// reporting "completed"), one campaign over all ten that never pauses: (server, id).
async fn half_rolled_back(
    grace: u64,
    reboot_ms: &str,
) -> (Server, String, Vec<tokio::process::Child>) {
    let s = Server::start_with(|c| c.tasks.reboot_grace_secs = grace).await;
    s.release("1.0.1", "gateway", 1000).await;
    s.release("1.0.2", "gateway", 20_000).await;
    let ok = s.sim(&sim_args("OK", "5", &[]));
    let rb = s.sim(&sim_args(
        "RB",
        "5",
        &["--bad-install-rate", "1", "--reboot-ms", reboot_ms],
    ));
    s.wait_online(10).await;
    let (st, c) = s
        .post_json(
            "/api/ota/campaigns",
            json!({"name": "truth", "version": "1.0.2", "targets": {"all": true},
                   "failureThreshold": {"percent": 100, "minCount": 100}}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["data"]["id"].as_str().unwrap().to_string();
    (s, id, vec![ok, rb])
}

fn assert_five_rolled_back(s: &Value) {
    assert_eq!(s["counts"]["completed"], 5, "{s}");
    assert_eq!(s["counts"]["failed"], 5, "{s}");
    assert_eq!(s["successRate"], 50.0);
    let f = &s["failures"][0];
    assert_eq!(f["code"], "ROLLED_BACK", "{s}");
    assert_eq!(f["count"], 5);
    assert_eq!(
        f["devices"],
        json!(["RB0001", "RB0002", "RB0003", "RB0004", "RB0005"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_waits_for_its_devices_to_boot_the_new_version() {
    // the grace (3 s) outlasts the reboot (0.3 s): the bad devices announce 1.0.1 within it,
    // and the campaign may not call them succeeded while they might still roll back
    let (s, id, _sims) = half_rolled_back(3, "300").await;
    let done = s
        .wait_campaign(&id, 60, |c| c["status"] == "completed")
        .await;
    assert_five_rolled_back(&done);
    assert_eq!(done["statusReason"], "5 succeeded, 5 failed", "{done}");
    let (_, stats) = s.get_json("/api/ota/statistics").await;
    assert_eq!(stats["data"]["byCampaign"][&id]["successRate"], 50.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_after_the_campaign_ended_changes_its_counts_and_verdict() {
    // the reboot (2.5 s) outlasts the grace (1 s): the campaign ends, then they come back old
    let (s, id, _sims) = half_rolled_back(1, "2500").await;
    s.wait_campaign(&id, 60, |c| c["status"] == "completed")
        .await;
    let after = s
        .wait_campaign(&id, 30, |c| c["counts"]["failed"] == 5)
        .await;
    assert_eq!(after["status"], "completed");
    assert_five_rolled_back(&after);
    assert_eq!(
        after["statusReason"],
        "5 succeeded, 5 failed (5 came back on their old version after the campaign ended)",
        "{after}"
    );
}

/// A gateway that reported "completed" and then, after the appliance restarted, reconnects
/// announcing the version it still runs until it reboots, then the new one: no rollback. One
/// that never shows the new version is rolled back once the grace has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_completed_and_reboot_is_no_rollback() {
    let grace = 2;
    let mut s = Server::start_with(|c| c.tasks.reboot_grace_secs = grace).await;
    s.release("1.0.2", "gateway", 1000).await;
    let mut msg = Vec::new();
    for id in ["GW1", "GW2"] {
        s.register(id, "gateway", "gw-secret-1").await;
        let mut d = Device::connect(s.mqtt, id, Some((id, "gw-secret-1")), None).await;
        d.expect_connected().await;
        d.subscribe(&format!("hanqi/gateway/{id}/command")).await;
        d.publish(
            &format!("hanqi/gateway/{id}/report"),
            json!({"msgType":"heartbeat","data":{"firmwareVersion":"1.0.1"}}),
        )
        .await;
        s.wait_task_absent_or(id).await;
        let (st, b) = s
            .post_json(
                &format!("/api/ota/upgrade/{id}"),
                json!({"version": "1.0.2"}),
            )
            .await;
        assert_eq!(st, 201, "{b}");
        let (_, cmd) = d.message(10).await;
        let m = cmd["msgId"].as_str().unwrap().to_string();
        d.publish(
            &format!("hanqi/gateway/{id}/report"),
            json!({"msgType":"ota_progress","msgId":m,"data":{"state":"completed","progress":100}}),
        )
        .await;
        s.wait_task(id, |t| t["status"] == "completed").await;
        msg.push(d);
    }
    drop(msg);
    s.restart_with(|c| c.tasks.reboot_grace_secs = grace).await;
    // the appliance was down longer than the grace since the completions: wait until the
    // later completion is more than the grace ago
    let (_, t) = s.get_json("/api/ota/task/GW2").await;
    let done = chrono::DateTime::parse_from_rfc3339(t["data"]["completeTime"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    while chrono::Utc::now().timestamp_millis() - done <= grace as i64 * 1000 + 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut back = Vec::new();
    for id in ["GW1", "GW2"] {
        let mut d = Device::connect(s.mqtt, id, Some((id, "gw-secret-1")), None).await;
        d.expect_connected().await;
        // still the old image: it has not rebooted yet
        d.publish(
            &format!("hanqi/gateway/{id}/report"),
            json!({"msgType":"heartbeat","data":{"firmwareVersion":"1.0.1"}}),
        )
        .await;
        back.push(d);
    }
    // GW1 reboots into the new image; GW2 never shows it
    back[0]
        .publish(
            "hanqi/gateway/GW1/report",
            json!({"msgType":"heartbeat","data":{"firmwareVersion":"1.0.2"}}),
        )
        .await;
    let gw2 = s.wait_task("GW2", |t| t["status"] == "failed").await;
    assert_eq!(gw2["errorCode"], "ROLLED_BACK", "{gw2}");
    let (_, gw1) = s.get_json("/api/ota/task/GW1").await;
    let gw1 = &gw1["data"];
    assert_eq!(gw1["status"], "completed", "{gw1}");
    let notes = gw1["events"].to_string();
    assert!(!notes.contains("came back"), "GW1 was rolled back: {notes}");
    let (_, d) = s.get_json("/api/ota/devices/GW1").await;
    assert_eq!(d["data"]["firmwareVersion"], "1.0.2");
}

trait Waits {
    async fn wait_task_absent_or(&self, id: &str);
}

impl Waits for Server {
    /// Waits until the device's heartbeat was stored (its version is known).
    async fn wait_task_absent_or(&self, id: &str) {
        self.wait_for(&format!("/api/ota/devices/{id}"), 10, |d| {
            d["firmwareVersion"] == "1.0.1"
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_offline_devices_and_waits_are_shown_as_such() {
    let s = Server::start().await;
    s.release("1.0.1", "gateway", 1000).await;
    s.release("1.0.2", "gateway", 20_000).await;
    // three devices that fail every attempt, with retries to come; two that never connect
    let _sim = s.sim(&sim_args("FL", "3", &["--fail-rate", "1"]));
    s.wait_online(3).await;
    for id in ["OFF1", "OFF2"] {
        s.register(id, "gateway", "secret-123").await;
    }
    let (st, c) = s
        .post_json(
            "/api/ota/campaigns",
            json!({"name": "retries", "version": "1.0.2", "targets": {"all": true}, "retries": 2,
                   "failureThreshold": {"percent": 100, "minCount": 100}}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["data"]["id"].as_str().unwrap().to_string();
    let c = s
        .wait_campaign(&id, 30, |c| c["counts"]["retrying"] == 3)
        .await;
    assert_eq!(c["counts"]["failed"], 0, "{c}");
    assert_eq!(c["counts"]["offline"], 2, "{c}");
    assert_eq!(c["counts"]["queued"], 0, "{c}");
    let retrying: Vec<&str> = c["retrying"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(retrying, ["FL0001", "FL0002", "FL0003"], "{c}");
    assert!(
        c["retrying"][0]["lastError"]
            .as_str()
            .unwrap()
            .contains("FAILED"),
        "{c}"
    );
    let why = c["statusReason"].as_str().unwrap();
    assert!(
        why.contains("2 offline devices to connect") && why.contains("3 devices to be retried"),
        "{why}"
    );
    assert!(c["failures"].as_array().unwrap().is_empty(), "{c}");

    // a campaign for later says when
    let (st, c) = s
        .post_json(
            "/api/ota/campaigns",
            json!({"name": "later", "version": "1.0.2", "targets": {"deviceIds": ["OFF1"]},
                   "startAt": "2099-01-01T02:00:00Z"}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let why = c["data"]["statusReason"].as_str().unwrap();
    assert!(why.starts_with("scheduled: starts at 2099-01-01"), "{why}");
    assert!(
        c["data"]["notes"]
            .to_string()
            .contains("scheduled: starts at"),
        "{c}"
    );
}

/// The emergency brake tells the truth about devices it cannot stop: Alibaba-protocol ovens have
/// no cancel message. The brake revokes their tasks' download URLs and ends the transfers under
/// way (a device still downloading cannot finish, its resume by Range is refused); one that had
/// the image already and installs it is recorded as installed after the brake and counts as
/// completed; the campaign says how many it could stop and how many it could not tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brake_says_which_devices_it_could_not_stop_and_what_they_did() {
    let s = Server::start().await;
    s.release("1.0.1", "oven", 1000).await;
    let ali = |prefix: &'static str, extra: &[&'static str]| {
        let mut a = vec![
            "--protocol",
            "alibaba",
            "--device-type",
            "oven",
            "--devices",
            "10",
            "--version",
            "1.0.1",
            "--register",
            "--id-prefix",
            prefix,
            "--no-delta",
            "--until-idle",
            "--idle-secs",
            "3",
            "--timeout",
            "120",
        ];
        a.extend_from_slice(extra);
        s.sim(&a)
    };
    // ten that download at once and take 6 s to reboot into the new image; ten that download
    // at 100 KB/s (2 MB: 20 s)
    let fast = ali("FAST", &["--reboot-ms", "6000"]);
    let slow = ali("SLOW", &["--slow", "100"]);
    s.wait_online(20).await;
    // released once they asked firmware/get at start (or they would take it by themselves)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s
        .metric("hangar_reports_used_total{outcome=\"request\"}")
        .await
        < 20.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the ovens did not ask firmware/get"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.release("1.0.2", "oven", 2_000_000).await;
    let (st, c) = s
        .post_json(
            "/api/ota/campaigns",
            json!({"name": "ovens", "deviceType": "oven", "version": "1.0.2",
                   "targets": {"all": true}, "maxInFlight": 20}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["data"]["id"].as_str().unwrap().to_string();
    // the fast ones installed (step 100, rebooting), the slow ones are downloading
    s.wait_campaign(&id, 60, |c| {
        c["counts"]["installing"] == 10 && c["counts"]["downloading"] == 10
    })
    .await;
    let (_, slow_task) = s.get_json("/api/ota/task/oven%2FSLOW0001").await;
    let url = slow_task["data"]["firmwareUrl"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(url.contains("task="), "{url}");

    let (st, braked) = s
        .post_json(&format!("/api/ota/campaigns/{id}/cancel"), json!({}))
        .await;
    assert_eq!(st, 200, "{braked}");
    let brake = &braked["data"]["brake"];
    assert_eq!(brake["inFlight"], 20, "{braked}");
    assert_eq!(brake["stopped"], 0, "{braked}");
    assert_eq!(brake["couldNotBeTold"], 20, "{braked}");
    assert!(
        brake["summary"].as_str().unwrap().contains(
            "0 of 20 in flight stopped, 20 could not be told to stop (protocol has no cancel"
        ),
        "{brake}"
    );
    assert!(brake["transfersCut"].as_u64().unwrap() >= 1, "{brake}");

    // a resume of the revoked URL is refused
    let path = url.split_once("/firmware/").unwrap().1;
    let r = s
        .client
        .get(s.url(&format!("/firmware/{path}")))
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"], "TASK_CANCELLED", "{b}");
    // an oven that asks for firmware again (after reconnecting, say) is not given the braked
    // version: the brake is not undone by the next firmware/get
    let mut oven = Device::connect(
        s.mqtt,
        "asks-again",
        Some(("oven&SLOW0002", "hangar-sim")),
        None,
    )
    .await;
    oven.expect_connected().await;
    oven.subscribe("/sys/oven/SLOW0002/thing/ota/firmware/get_reply")
        .await;
    oven.publish(
        "/sys/oven/SLOW0002/thing/ota/firmware/get",
        json!({"id":"9","version":"1.0","params":{"module":"default"},"method":"thing.ota.firmware.get"}),
    )
    .await;
    let (_, reply) = oven.message(10).await;
    assert_eq!(
        reply["data"],
        json!({}),
        "the braked version was handed out again: {reply}"
    );
    drop(oven);

    // the slow ones could not finish (a cut cannot recall the bytes already in the kernel's
    // socket buffers, so one that was nearly done may still get its image: the record must
    // then say so); the fast ones rebooted into 1.0.2
    let (_, slow_sum) = common::sim_result(slow, 90).await;
    let slow_done = slow_sum["completed"].as_u64().unwrap();
    assert!(
        slow_done <= 3,
        "the brake stopped few downloads: {slow_sum}"
    );
    let (_, fast_sum) = common::sim_result(fast, 90).await;
    assert_eq!(fast_sum["completed"], 10, "{fast_sum}");
    let installed = 10 + slow_done;
    let done = s
        .wait_campaign(&id, 30, |c| c["counts"]["completed"] == installed)
        .await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["counts"]["cancelled"], 20 - installed, "{done}");
    assert_eq!(done["brake"]["installedAnyway"], installed, "{done}");
    assert!(
        done["statusReason"].as_str().unwrap().contains(&format!(
            "{installed} of them installed the new version anyway"
        )),
        "{done}"
    );
    assert!(
        done["bytesFull"].as_u64().unwrap() > 20_000_000,
        "the bytes the devices downloaded: {done}"
    );
    // every device's record says what it runs, and its task agrees
    let (_, devices) = s.get_json("/api/ota/devices?limit=100").await;
    for d in devices["data"].as_array().unwrap() {
        let dev = d["id"].as_str().unwrap();
        let (_, t) = s
            .get_json(&format!("/api/ota/task/{}", dev.replace('/', "%2F")))
            .await;
        let t = &t["data"];
        match d["firmwareVersion"].as_str().unwrap() {
            "1.0.2" => {
                assert_eq!(t["status"], "completed", "{dev}: {t}");
                assert_eq!(t["installedAfterCancel"], true, "{dev}: {t}");
            }
            "1.0.1" => {
                assert!(dev.contains("SLOW"), "{dev} stayed on 1.0.1");
                assert_eq!(t["status"], "cancelled", "{dev}: {t}");
            }
            v => panic!("{dev} runs {v}"),
        }
    }
}
