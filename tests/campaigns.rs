//! Campaigns with `hangar sim` devices against a real appliance: canary waves gated on success,
//! dry runs with deltas and bytes, a failure gate that pauses, the emergency brake cancelling
//! in-flight downloads, bad input, and a `kill -9` of the appliance mid-campaign that neither
//! loses a device nor sends anyone a second command.

mod common;

use std::time::{Duration, Instant};

use common::{Appliance, Server, bin, fixture, image, sim_result};
use serde_json::{Value, json};

/// `n` simulated gateways on 1.0.1 that download slowly, online, and a campaign to 1.0.2 for
/// all of them with `max_in_flight`: (server, simulator, campaign id).
async fn slow_fleet_campaign(
    n: usize,
    prefix: &str,
    max_in_flight: u32,
) -> (Server, tokio::process::Child, String) {
    let s = Server::start().await;
    s.release("1.0.1", "gateway", 1000).await;
    s.release("1.0.2", "gateway", 400_000).await;
    let devices = n.to_string();
    let sim = s.sim(&[
        "--devices",
        &devices,
        "--version",
        "1.0.1",
        "--register",
        "--timeout",
        "30",
        "--id-prefix",
        prefix,
        "--slow",
        "40",
    ]);
    s.wait_online(n).await;
    let (_, c) = s
        .post_json(
            "/api/ota/campaigns",
            json!({"name": format!("brake {prefix}"), "version": "1.0.2",
            "targets": {"all": true}, "maxInFlight": max_in_flight}),
        )
        .await;
    let id = c["data"]["id"].as_str().unwrap().to_string();
    (s, sim, id)
}

async fn tasks(s: &Server) -> Vec<Value> {
    s.get_json("/api/ota/tasks?limit=10000").await.1["data"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_waves_with_deltas_complete_in_order() {
    let s = Server::start().await;
    s.release_bytes("1.0.1", "gateway", fixture("old.bin"))
        .await;
    let sim = s.sim(&[
        "--devices",
        "20",
        "--version",
        "1.0.1",
        "--register",
        "--until-idle",
        "--idle-secs",
        "3",
        "--timeout",
        "120",
        "--id-prefix",
        "CW",
    ]);
    s.wait_online(20).await;
    // every device has announced its version and delta formats (the dry run counts deltas)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, b) = s.get_json("/api/ota/devices?limit=100").await;
        let ready = b["data"].as_array().unwrap().iter().filter(|d| {
            d["firmwareVersion"] == "1.0.1" && d["deltaFormats"] == json!(["bsdiff40"])
        });
        if ready.count() == 20 {
            break;
        }
        assert!(Instant::now() < deadline, "{b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.release_bytes("1.0.2", "gateway", fixture("new.bin"))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, b) = s.get_json("/api/ota/firmware/1.0.2/deltas").await;
        if b["data"][0]["status"] == "ready" {
            break;
        }
        assert!(Instant::now() < deadline, "{b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = json!({"name": "line 3 to 1.0.2", "deviceType": "gateway", "version": "1.0.2",
        "targets": {"all": true}, "waves": [10, 50, 100], "successThreshold": 90,
        "failureThreshold": {"percent": 20, "minCount": 3}, "maxInFlight": 5});
    let (st, dry) = s
        .post_json("/api/ota/campaigns/dry-run", body.clone())
        .await;
    assert_eq!(st, 200, "{dry}");
    let w = dry["data"]["waves"].as_array().unwrap();
    let sizes: Vec<usize> = w
        .iter()
        .map(|w| w["devices"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![2, 8, 10]);
    assert_eq!(
        w.iter().map(|w| w["deltas"].as_u64().unwrap()).sum::<u64>(),
        20
    );
    assert!(
        w[0]["estimatedBytes"].as_u64().unwrap() < 2 * 60_000,
        "{dry}"
    );
    assert!(tasks(&s).await.is_empty(), "a dry run creates nothing");

    let (st, c) = s.post_json("/api/ota/campaigns", body).await;
    assert_eq!(st, 201, "{c}");
    let id = c["data"]["id"].as_str().unwrap().to_string();
    let done = s
        .wait_campaign(&id, 90, |c| c["status"] == "completed")
        .await;
    assert_eq!(done["counts"]["completed"], 20, "{done}");
    assert_eq!(done["successRate"], 100.0);
    assert_eq!(done["waves"][1]["devices"], 8);
    assert!(
        done["bytesDelta"].as_u64().unwrap() > 0 && done["bytesFull"] == 0,
        "{done}"
    );
    let (code, sum) = sim_result(sim, 60).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["deltaUsed"], 20, "{sum}");
    // wave 2 started only after wave 1 had completed (success gate 90 %)
    let all = tasks(&s).await;
    assert_eq!(all.len(), 20, "one task per device");
    let time = |t: &Value, k: &str| t[k].as_str().unwrap().to_string();
    let w1: Vec<&Value> = all
        .iter()
        .filter(|t| ["CW0001", "CW0002"].contains(&t["deviceId"].as_str().unwrap()))
        .collect();
    let last_w1 = w1.iter().map(|t| time(t, "completeTime")).max().unwrap();
    let first_w2 = all
        .iter()
        .filter(|t| !["CW0001", "CW0002"].contains(&t["deviceId"].as_str().unwrap()))
        .map(|t| time(t, "createdAt"))
        .min()
        .unwrap();
    assert!(
        first_w2 >= last_w1,
        "wave 2 began {first_w2}, wave 1 ended {last_w1}"
    );
    for t in &all {
        assert_eq!(t["campaignId"], id.as_str());
    }
    // maxInFlight 5 was never exceeded: at every task start, count the tasks in flight
    let spans: Vec<(String, String)> = all
        .iter()
        .map(|t| (time(t, "startTime"), time(t, "completeTime")))
        .collect();
    for (start, _) in &spans {
        let in_flight = spans
            .iter()
            .filter(|(a, b)| a <= start && start < b)
            .count();
        assert!(in_flight <= 5, "{in_flight} in flight at {start}");
    }
    let (_, stats) = s.get_json("/api/ota/statistics").await;
    assert_eq!(
        stats["data"]["byCampaign"][&id]["successRate"], 100.0,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_gate_pauses_and_the_brake_cancels_downloads() {
    let s = Server::start().await;
    s.release("1.0.1", "gateway", 1000).await;
    s.release("1.0.2", "gateway", 20_000).await;
    // every attempt fails: after 2 failures the gate (50 %, at least 2) pauses the campaign
    let sim = s.sim(&[
        "--devices",
        "10",
        "--version",
        "1.0.1",
        "--register",
        "--timeout",
        "60",
        "--id-prefix",
        "FG",
        "--fail-rate",
        "1",
    ]);
    s.wait_online(10).await;
    let (st, c) = s
        .post_json(
            "/api/ota/campaigns",
            json!({"name": "gate", "version": "1.0.2",
            "targets": {"all": true}, "failureThreshold": {"percent": 50, "minCount": 2},
            "maxInFlight": 2}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["data"]["id"].as_str().unwrap().to_string();
    let paused = s.wait_campaign(&id, 30, |c| c["status"] == "paused").await;
    assert!(
        paused["statusReason"]
            .as_str()
            .unwrap()
            .contains("failure threshold"),
        "{paused}"
    );
    s.campaign_rounds_pass(2).await;
    let n = tasks(&s).await.len();
    assert!(n <= 3, "a paused campaign starts nothing new: {n} tasks");
    let (st, b) = s
        .post_json(&format!("/api/ota/campaigns/{id}/cancel"), json!({}))
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["data"]["status"], "cancelled");
    let (st, _) = s
        .post_json(&format!("/api/ota/campaigns/{id}/resume"), json!({}))
        .await;
    assert_eq!(st, 409, "a cancelled campaign cannot resume");
    drop(sim);

    // the brake while devices download slowly: their tasks end cancelled, the gateways get
    // ota_cancel and stop, no new task starts
    let (s, sim, id) = slow_fleet_campaign(6, "BR", 3).await;
    s.wait_campaign(&id, 30, |c| c["counts"]["downloading"] == 3)
        .await;
    let (st, b) = s
        .post_json(&format!("/api/ota/campaigns/{id}/cancel"), json!({}))
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["data"]["counts"]["cancelled"], 6, "{b}");
    s.campaign_rounds_pass(2).await;
    let all = tasks(&s).await;
    assert_eq!(all.len(), 3, "no task started after the brake");
    for t in &all {
        assert_eq!(t["status"], "cancelled", "{t}");
    }
    let (_, sum) = sim_result(sim, 60).await;
    assert_eq!(
        sum["cancelled"], 3,
        "the devices stopped downloading: {sum}"
    );
    assert_eq!(sum["completed"], 0, "{sum}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_started_by_a_round_count_as_in_flight_at_once_and_the_brake_stops_them() {
    // A round writes the members it started only in the next round; until then the campaign
    // view and the brake must still see them in flight (their devices' newest tasks).
    let (s, sim, id) = slow_fleet_campaign(4, "QB", 2).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tasks(&s).await.len() < 2 {
        assert!(Instant::now() < deadline, "the campaign started no task");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, now) = s.get_json(&format!("/api/ota/campaigns/{id}")).await;
    assert_eq!(now["data"]["counts"]["queued"], 2, "{now}");
    let (st, b) = s
        .post_json(&format!("/api/ota/campaigns/{id}/cancel"), json!({}))
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["data"]["counts"]["cancelled"], 4, "{b}");
    let all = tasks(&s).await;
    assert_eq!(all.len(), 2, "no task started after the brake");
    for t in &all {
        assert_eq!(t["status"], "cancelled", "{t}");
    }
    let (_, sum) = sim_result(sim, 60).await;
    assert_eq!(sum["completed"], 0, "{sum}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_bodies_are_checked() {
    let s = Server::start().await;
    s.release("1.0.2", "gateway", 1000).await;
    let (st, b) = s.upload("1.0.3", Some("gateway"), image(1000, 3)).await;
    assert_eq!(st, 201, "{b}");
    s.register("GW1", "gateway", "secret-123").await;
    s.register("GW2", "gateway", "secret-123").await;
    let post = |body: Value| {
        let s = &s;
        async move { s.post_json("/api/ota/campaigns", body).await }
    };
    let base = json!({"name": "x", "version": "1.0.2", "targets": {"all": true}});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    assert_eq!(post(with("version", json!("9.9.9"))).await.0, 409);
    assert_eq!(
        post(with("version", json!("1.0.3"))).await.0,
        409,
        "not released"
    );
    assert_eq!(
        post(with("targets", json!({"deviceIds": ["NOPE"]})))
            .await
            .0,
        400
    );
    let (st, b) = post(with("targets", json!({"fromVersions": ["0.0.1"]}))).await;
    assert_eq!(st, 400);
    assert!(
        b["message"].as_str().unwrap().contains("empty target set"),
        "{b}"
    );
    assert_eq!(post(with("targets", json!({}))).await.0, 400);
    assert_eq!(post(with("waves", json!([50, 10, 100]))).await.0, 400);
    assert_eq!(post(with("waves", json!([10, 120]))).await.0, 400);
    assert_eq!(post(with("waves", json!([10, 50]))).await.0, 400);
    assert_eq!(post(with("successThreshold", json!(101))).await.0, 400);
    assert_eq!(
        post(with("failureThreshold", json!({"percent": -1})))
            .await
            .0,
        400
    );
    assert_eq!(post(with("maxInFlight", json!(0))).await.0, 400);
    assert_eq!(
        post(with(
            "window",
            json!({"start": "02:00", "durationMinutes": 0})
        ))
        .await
        .0,
        400
    );
    assert_eq!(
        post(with(
            "window",
            json!({"start": "25:00", "durationMinutes": 10})
        ))
        .await
        .0,
        400
    );
    assert_eq!(post(with("startAt", json!("yesterday"))).await.0, 400);
    assert_eq!(post(with("colour", json!("red"))).await.0, 400);
    let (st, b) = post(with("startAt", json!("2020-01-01T00:00:00Z"))).await;
    assert_eq!(st, 201, "{b}");
    assert!(
        b["data"]["notes"][0]
            .as_str()
            .unwrap()
            .contains("starting now"),
        "{b}"
    );
    // a second campaign claiming the same devices skips them and says why
    let (st, b) = post(with("targets", json!({"deviceIds": ["GW1", "GW2"]}))).await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["data"]["counts"]["skipped"], 2, "{b}");
    assert!(
        b["data"]["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("claimed"),
        "{b}"
    );
    // the target firmware of a live campaign cannot be deleted
    let (st, _) = s
        .delete_json("/api/ota/firmware/1.0.2?deviceType=gateway")
        .await;
    assert_eq!(st, 409);
    // scheduled: not before its start time, and not outside its window
    s.register("GW3", "gateway", "secret-123").await;
    let later = (chrono::Utc::now() + chrono::Duration::seconds(5)).to_rfc3339();
    let (st, b) = post(json!({"name": "later", "version": "1.0.2",
        "targets": {"deviceIds": ["GW3"]}, "startAt": later}))
    .await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["data"]["status"], "scheduled");
    let later_id = b["data"]["id"].as_str().unwrap().to_string();
    s.campaign_rounds_pass(2).await;
    assert_eq!(
        s.get_json(&format!("/api/ota/campaigns/{later_id}"))
            .await
            .1["data"]["status"],
        "scheduled"
    );
    s.wait_campaign(&later_id, 10, |c| c["status"] == "running")
        .await;
    s.register("GW4", "gateway", "secret-123").await;
    let now = chrono::Local::now();
    use chrono::Timelike;
    let start = (now.hour() * 60 + now.minute() + 120) % 1440;
    let (st, b) = post(json!({"name": "night", "version": "1.0.2",
        "targets": {"deviceIds": ["GW4"]},
        "window": {"start": format!("{:02}:{:02}", start / 60, start % 60), "durationMinutes": 60}}))
    .await;
    assert_eq!(st, 201, "{b}");
    let night = b["data"]["id"].as_str().unwrap().to_string();
    s.campaign_rounds_pass(2).await;
    assert_eq!(
        s.get_json(&format!("/api/ota/campaigns/{night}")).await.1["data"]["status"],
        "scheduled",
        "outside its window it waits"
    );
    let (st, _) = s.get_json("/api/ota/campaigns/c999").await;
    assert_eq!(st, 404);
    let (st, _) = s
        .post_json("/api/ota/campaigns/c1/explode", json!({}))
        .await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_mid_campaign_loses_nothing_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Appliance::start_in(dir.path(), "").await;
    let config = a.running().config.clone();
    let fw1 = dir.path().join("fw1");
    let fw2 = dir.path().join("fw2");
    std::fs::write(&fw1, image(1000, 1)).unwrap();
    std::fs::write(&fw2, image(200_000, 2)).unwrap();
    for (fw, v) in [(&fw1, "1.0.1"), (&fw2, "1.0.2")] {
        a.cli(&["firmware", "upload", fw.to_str().unwrap(), "--version", v]);
        a.cli(&["firmware", "release", v]);
    }
    let sim = tokio::process::Command::new(bin())
        .args(["--config"])
        .arg(&config)
        .args([
            "sim",
            "--devices",
            "12",
            "--version",
            "1.0.1",
            "--register",
            "--until-idle",
            "--idle-secs",
            "3",
            "--timeout",
            "120",
            "--id-prefix",
            "K",
            "--slow",
            "100",
            "--summary-every",
            "0",
        ])
        .env("RUST_LOG", "hangar=error")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let body = dir.path().join("campaign.json");
    std::fs::write(
        &body,
        json!({"name": "survives", "version": "1.0.2", "targets": {"all": true},
               "waves": [25, 100], "successThreshold": 100, "maxInFlight": 4})
        .to_string(),
    )
    .unwrap();
    // wait for the devices, then start the campaign through the CLI
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = a.cli(&["device", "list"]);
        if out.lines().filter(|l| l.contains(" yes ")).count() >= 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "devices did not come online: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let created: Value =
        serde_json::from_str(&a.cli(&["campaign", "create", body.to_str().unwrap()])).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    // kill -9 while the first tasks download (200 KB at 100 KB/s), restart on the same ports
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, c) = a.get(&format!("/api/ota/campaigns/{id}")).await;
        if c["data"]["counts"]["downloading"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing started downloading: {c}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill_and_restart().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let shown = loop {
        let c: Value = serde_json::from_str(&a.cli(&["campaign", "show", &id, "--json"])).unwrap();
        if c["status"] == "completed" {
            break c;
        }
        assert!(Instant::now() < deadline, "campaign did not complete: {c}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(shown["counts"]["completed"], 12, "no device lost: {shown}");
    // the same for people: the verdict, and a wave table whose columns line up
    let text = a.cli(&["campaign", "show", &id]);
    assert!(text.contains("12 succeeded, 0 failed"), "{text}");
    let table: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()) || l.starts_with("WAVE"))
        .collect();
    let done_col = table[0].find("DONE").unwrap() + 4;
    for row in &table[1..] {
        assert!(row.as_bytes()[done_col - 1].is_ascii_digit(), "{text}");
    }
    let list = a.cli(&["campaign", "list"]);
    let header = list.lines().next().unwrap();
    let status_col = header.find("STATUS").unwrap();
    assert!(
        list.lines().nth(1).unwrap()[status_col..].starts_with("completed"),
        "{list}"
    );
    let plan = a.cli(&["campaign", "dry-run", body.to_str().unwrap()]);
    assert!(
        plan.starts_with("WAVE") && plan.contains("devices in all"),
        "{plan}"
    );
    let plan: Value =
        serde_json::from_str(&a.cli(&["campaign", "dry-run", "--json", body.to_str().unwrap()]))
            .unwrap();
    assert!(plan["waves"].is_array(), "{plan}");
    let (code, sum) = sim_result(sim, 60).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["completed"], 12, "{sum}");
    assert_eq!(
        sum["attempts"], 12,
        "no device got a second command for its upgrade: {sum}"
    );
}
