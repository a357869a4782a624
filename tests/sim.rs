//! `hangar sim` against a real appliance: fleets of both protocols upgrade to completion, with
//! downloads cut mid-way and resumed (proven by the server's byte counts), and bad installs that
//! come back as ROLLED_BACK tasks.

mod common;

use common::{Server, sim_result};
use serde_json::{Value, json};

async fn upgrade_all(s: &Server, ids: impl Iterator<Item = String>, version: &str) {
    for id in ids {
        let (st, b) = s
            .post_json(
                &format!("/api/ota/upgrade/{}", id.replace('/', "%2F")),
                json!({"version": version}),
            )
            .await;
        assert_eq!(st, 201, "{id}: {b}");
    }
}

async fn tasks(s: &Server) -> Vec<Value> {
    let (_, b) = s.get_json("/api/ota/tasks?limit=10000").await;
    b["data"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_fleet_completes_through_dropped_downloads() {
    let s = Server::start().await;
    s.release("1.0.1", "gateway", 1000).await;
    let img = s.release("1.0.2", "gateway", 300_000).await;
    let n = 200;
    let sim = s.sim(&[
        "--devices",
        "200",
        "--protocol",
        "gateway",
        "--version",
        "1.0.1",
        "--register",
        "--until-idle",
        "--idle-secs",
        "2",
        "--timeout",
        "150",
        "--drop-rate",
        "0.3",
        "--id-prefix",
        "GW",
        "--no-delta",
    ]);
    s.wait_online(n).await;
    upgrade_all(&s, (1..=n).map(|i| format!("GW{i:04}")), "1.0.2").await;
    let (code, sum) = sim_result(sim, 200).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["completed"], n, "{sum}");
    assert!(
        sum["resumes"].as_u64().unwrap() > 20,
        "30 % should drop: {sum}"
    );
    let all = tasks(&s).await;
    assert_eq!(all.len(), n);
    assert!(all.iter().all(|t| t["status"] == "completed"), "{all:?}");
    // resumes fetched the rest, not the whole image again: under 2x the image per device
    let served = s.served("gateway", "1.0.2").await;
    let bytes = served["bytesFull"].as_u64().unwrap();
    let size = img.len() as u64;
    assert!(bytes >= n as u64 * size, "{served}");
    assert!(
        bytes < 2 * n as u64 * size,
        "{bytes} bytes for {n} x {size}"
    );
    let (_, d) = s.get_json("/api/ota/devices/GW0007").await;
    assert_eq!(d["data"]["firmwareVersion"], "1.0.2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alibaba_fleet_asks_firmware_get_and_completes() {
    let s = Server::start().await;
    s.release("1.0.1", "oven", 1000).await;
    s.release("1.0.2", "oven", 200_000).await;
    let n = 200;
    // nobody calls the upgrade API: each device asks thing.ota.firmware.get at start
    let sim = s.sim(&[
        "--devices",
        "200",
        "--protocol",
        "alibaba",
        "--device-type",
        "oven",
        "--version",
        "1.0.1",
        "--register",
        "--until-idle",
        "--idle-secs",
        "2",
        "--timeout",
        "150",
        "--tls",
    ]);
    let (code, sum) = sim_result(sim, 200).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["completed"], n, "{sum}");
    let all = tasks(&s).await;
    assert_eq!(all.len(), n);
    assert!(all.iter().all(|t| t["status"] == "completed"), "{all:?}");
    let (_, d) = s.get_json("/api/ota/devices/oven%2FSIM0042").await;
    assert_eq!(d["data"]["firmwareVersion"], "1.0.2");
    assert_eq!(d["data"]["protocol"], "alibaba");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_installs_roll_back_and_failures_carry_codes() {
    let s = Server::start().await;
    s.release("1.0.1", "gateway", 1000).await;
    s.release("1.0.2", "gateway", 50_000).await;
    // every device comes back on its old version: ROLLED_BACK, both protocols
    let sim = s.sim(&[
        "--devices",
        "20",
        "--protocol",
        "mixed",
        "--version",
        "1.0.1",
        "--register",
        "--until-idle",
        "--idle-secs",
        "2",
        "--timeout",
        "60",
        "--bad-install-rate",
        "1",
        "--id-prefix",
        "RB",
    ]);
    s.wait_online(20).await;
    // odd ids speak the gateway protocol and need the API; even ones ask firmware/get
    upgrade_all(
        &s,
        (1..=20).step_by(2).map(|i| format!("RB{i:04}")),
        "1.0.2",
    )
    .await;
    let (code, sum) = sim_result(sim, 90).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["rolledBack"], 20, "{sum}");
    // the appliance rolls a task back once the device's reboot grace has passed after it
    // announced the old version: on a loaded machine that may be after the simulator left
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let all = loop {
        let all = tasks(&s).await;
        if all.iter().all(|t| t["status"] != "completed") {
            break all;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tasks not rolled back: {all:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for t in all {
        assert_eq!(t["status"], "failed", "{t}");
        assert_eq!(t["errorCode"], "ROLLED_BACK", "{t}");
    }

    // every attempt fails at some stage, with the protocol's code
    let s = Server::start().await;
    s.release("1.0.1", "gateway", 1000).await;
    s.release("1.0.2", "gateway", 50_000).await;
    let sim = s.sim(&[
        "--devices",
        "30",
        "--protocol",
        "mixed",
        "--version",
        "1.0.1",
        "--register",
        "--until-idle",
        "--idle-secs",
        "2",
        "--timeout",
        "60",
        "--fail-rate",
        "1",
        "--id-prefix",
        "FL",
    ]);
    s.wait_online(30).await;
    upgrade_all(
        &s,
        (1..=30).step_by(2).map(|i| format!("FL{i:04}")),
        "1.0.2",
    )
    .await;
    let (code, sum) = sim_result(sim, 90).await;
    assert_eq!(code, 0, "{sum}");
    assert_eq!(sum["failed"], 30, "{sum}");
    let codes: std::collections::BTreeSet<String> = tasks(&s)
        .await
        .iter()
        .map(|t| {
            assert_eq!(t["status"], "failed", "{t}");
            t["errorCode"].as_str().unwrap().to_string()
        })
        .collect();
    for c in &codes {
        assert!(
            ["DOWNLOAD_FAILED", "VERIFY_FAILED", "INSTALL_FAILED"].contains(&c.as_str()),
            "{codes:?}"
        );
    }
    assert!(
        codes.len() >= 2,
        "30 random stages give more than one code: {codes:?}"
    );
}
