//! The campaign engine on tokio's paused clock: retries with backoff, daily windows and dynamic
//! joins, over the real appliance (in-process, real HTTPS and MQTT on ephemeral ports). Virtual
//! time advances whenever every task waits, so a 30 s backoff or a window that opens in ten
//! minutes takes a moment of real time, and nothing is asserted by sleeping.
//!
//! Keep images small here: the blob writer is a thread of its own, not a tokio task, so while it
//! writes the runtime may look idle and the clock jump to the next timer (a long upload could
//! see its client time out in virtual time).

mod common;

use std::time::Duration;

use common::Server;
use common::mqtt::Device;
use serde_json::{Value, json};

const SECRET: &str = "s3cret-s3cret";

/// A registered gateway on 1.0.1, connected and subscribed to its commands.
async fn gateway(s: &Server, id: &str) -> Device {
    tagged(s, id, &[]).await
}

/// [`gateway`] with tags.
async fn tagged(s: &Server, id: &str, tags: &[&str]) -> Device {
    let (st, b) = s
        .post_json(
            "/api/ota/devices",
            json!({"id":id,"protocol":"gateway","secret":SECRET,"tags":tags}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let mut d = Device::connect(s.mqtt, id, Some((id, SECRET)), None).await;
    d.expect_connected().await;
    d.subscribe(&format!("hanqi/gateway/{id}/command")).await;
    heartbeat(&d, id, "1.0.1").await;
    d
}

async fn heartbeat(d: &Device, id: &str, version: &str) {
    d.publish(
        &format!("hanqi/gateway/{id}/report"),
        json!({"msgType":"heartbeat","data":{"firmwareVersion":version}}),
    )
    .await;
}

async fn progress(d: &Device, id: &str, msg_id: &str, state: &str) {
    d.publish(
        &format!("hanqi/gateway/{id}/report"),
        json!({"msgType":"ota_progress","msgId":msg_id,
               "data":{"state":state,"progress":100,"errorCode":"DOWNLOAD_FAILED"}}),
    )
    .await;
}

/// The next upgrade command's msgId.
async fn command(d: &mut Device, secs: u64) -> String {
    let (_, c) = d.message(secs).await;
    assert_eq!(c["msgType"], "ota_upgrade", "{c}");
    c["msgId"].as_str().unwrap().to_string()
}

async fn campaign(s: &Server, body: Value) -> String {
    let (st, c) = s.post_json("/api/ota/campaigns", body).await;
    assert_eq!(st, 201, "{c}");
    c["data"]["id"].as_str().unwrap().to_string()
}

async fn released(s: &Server) {
    s.release("1.0.1", "gateway", 1000).await;
    s.release("1.0.2", "gateway", 2000).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_failed_member_is_retried_after_its_backoff_and_then_fails_for_good() {
    let s = Server::start().await;
    released(&s).await;
    let mut d = gateway(&s, "GW1").await;
    let id = campaign(
        &s,
        json!({"name":"retry","version":"1.0.2","targets":{"deviceIds":["GW1"]},"retries":2,
               "failureThreshold":{"percent":100,"minCount":5}}),
    )
    .await;
    let mut commands = vec![command(&mut d, 10).await];
    let mut waited = Vec::new();
    // every attempt fails; the retries wait 30 s, then 60 s
    for _ in 0..2 {
        progress(&d, "GW1", commands.last().unwrap(), "failed").await;
        let failed_at = tokio::time::Instant::now();
        commands.push(command(&mut d, 600).await);
        waited.push(failed_at.elapsed());
    }
    assert!(
        (Duration::from_secs(30)..Duration::from_secs(33)).contains(&waited[0])
            && (Duration::from_secs(60)..Duration::from_secs(63)).contains(&waited[1]),
        "backoff between attempts: {waited:?}"
    );
    assert!(commands[0] != commands[1] && commands[1] != commands[2]);
    progress(&d, "GW1", &commands[2], "failed").await;
    let c = s
        .wait_campaign(&id, 600, |c| c["status"] == "completed")
        .await;
    assert_eq!(c["counts"]["failed"], 1, "{c}");
    // three attempts, no fourth however long one waits
    let before = tokio::time::Instant::now();
    s.campaign_rounds_pass(20).await;
    assert!(before.elapsed() >= Duration::from_secs(10));
    let (_, tasks) = s.get_json("/api/ota/tasks?deviceId=GW1").await;
    assert_eq!(tasks["data"].as_array().unwrap().len(), 3, "{tasks}");
}

/// "HH:MM" of the local time `minutes` from now on the appliance's (paused) clock.
fn local_hhmm_in(minutes: i64) -> String {
    let at = hangar::time::now_ms() + minutes * 60_000;
    chrono::DateTime::from_timestamp_millis(at)
        .unwrap()
        .with_timezone(&chrono::Local)
        .format("%H:%M")
        .to_string()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_start_time_and_a_daily_window_hold_the_campaign_back_until_they_come() {
    let s = Server::start().await;
    released(&s).await;
    let mut a = gateway(&s, "GW-A").await;
    let mut b = gateway(&s, "GW-B").await;
    // starts in an hour, and only in a two-minute window that opens ten minutes after that
    // (at the start of its minute: 9 to 10 minutes after the start time)
    let start_at = chrono::DateTime::from_timestamp_millis(hangar::time::now_ms() + 3_600_000)
        .unwrap()
        .to_rfc3339();
    let id = campaign(
        &s,
        json!({"name":"window","version":"1.0.2","targets":{"deviceIds":["GW-A","GW-B"]},
               "maxInFlight":1,"startAt":start_at,
               "window":{"start":local_hhmm_in(70),"durationMinutes":2}}),
    )
    .await;
    let t0 = tokio::time::Instant::now();
    let first = command(&mut a, 2 * 3600).await;
    let waited = t0.elapsed();
    assert!(
        (Duration::from_secs(69 * 60)..Duration::from_secs(70 * 60 + 5)).contains(&waited),
        "the first command came {waited:?} after the create"
    );
    let c = s.wait_campaign(&id, 10, |c| c["status"] == "running").await;
    assert_eq!(
        c["counts"]["downloading"].as_u64().unwrap_or(0) + c["counts"]["pending"].as_u64().unwrap(),
        1,
        "{c}"
    );
    // A takes three minutes: the window has closed by then, so B waits for tomorrow's
    tokio::time::sleep(Duration::from_secs(180)).await;
    progress(&a, "GW-A", &first, "completed").await;
    heartbeat(&a, "GW-A", "1.0.2").await;
    let c = s
        .wait_campaign(&id, 30, |c| c["counts"]["completed"] == 1)
        .await;
    s.campaign_rounds_pass(30).await;
    let c2 = s.wait_campaign(&id, 1, |_| true).await;
    assert_eq!(c2["counts"]["queued"], 1, "B is still queued: {c2}");
    assert!(
        c2["statusReason"]
            .as_str()
            .is_some_and(|r| r.contains("window")),
        "the campaign says it waits for its window: {c2} (before: {c})"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(3000), b.message(3600))
            .await
            .is_err(),
        "B got a command outside the window"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_dynamic_campaign_takes_in_a_device_registered_after_it_started() {
    let s = Server::start().await;
    released(&s).await;
    let mut first = tagged(&s, "L1", &["line-a"]).await;
    let id = campaign(
        &s,
        json!({"name":"dyn","version":"1.0.2","targets":{"tags":["line-a"]},"dynamic":true}),
    )
    .await;
    let m1 = command(&mut first, 10).await;
    // a device of another line does not join; one of line a does, once it is there
    let _other = tagged(&s, "L9", &["line-b"]).await;
    let mut late = tagged(&s, "L2", &["line-a"]).await;
    let m2 = command(&mut late, 30).await;
    for (d, dev, m) in [(&first, "L1", &m1), (&late, "L2", &m2)] {
        progress(d, dev, m, "completed").await;
        heartbeat(d, dev, "1.0.2").await;
    }
    let c = s
        .wait_campaign(&id, 60, |c| c["status"] == "completed")
        .await;
    assert_eq!(
        (c["total"].as_u64(), c["counts"]["completed"].as_u64()),
        (Some(2), Some(2)),
        "{c}"
    );
    let (_, t) = s.get_json("/api/ota/tasks?deviceId=L9").await;
    assert_eq!(t["data"].as_array().unwrap().len(), 0, "{t}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_old_version_within_the_reboot_grace_is_no_rollback_but_after_it_is() {
    let s = Server::start_with(|c| c.tasks.reboot_grace_secs = 120).await;
    released(&s).await;
    let mut d = gateway(&s, "GW1").await;
    let id = campaign(
        &s,
        json!({"name":"grace","version":"1.0.2","targets":{"deviceIds":["GW1"]}}),
    )
    .await;
    let m = command(&mut d, 10).await;
    progress(&d, "GW1", &m, "completed").await;
    // still on the old image a minute later (not rebooted yet): completed, not settled
    tokio::time::sleep(Duration::from_secs(60)).await;
    heartbeat(&d, "GW1", "1.0.1").await;
    s.campaign_rounds_pass(5).await;
    let (_, t) = s.get_json("/api/ota/task/GW1").await;
    assert_eq!(t["data"]["status"], "completed", "{t}");
    let c = s.wait_campaign(&id, 1, |_| true).await;
    assert_eq!(c["status"], "running", "a success only once settled: {c}");
    // the grace ends with no sign of the new image: rolled back, and the campaign says so
    let t = s
        .wait_for("/api/ota/task/GW1", 300, |t| t["status"] == "failed")
        .await;
    assert_eq!(t["errorCode"], "ROLLED_BACK", "{t}");
    let c = s.wait_campaign(&id, 60, |c| c["status"] != "running").await;
    assert_eq!(c["counts"]["failed"], 1, "{c}");
}
