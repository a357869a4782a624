//! The backend tutorial's own gateway simulator (`tests/fixtures/tutorial/sim_gateway_ota.js`,
//! Node.js + the npm `mqtt` package) upgraded by the appliance exactly as the tutorial says:
//! it connects without credentials and only subscribes, reads `msgId` from the command's
//! `data`, never sends a heartbeat, and reports `currentVersion` — and the upgrade completes,
//! with the device on the new version and no report dropped.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Server, tool};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

/// The npm `mqtt` package, installed once per target dir (the tutorial's only dependency).
fn mqtt_js(npm: &std::path::Path) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tutorial-node");
    let module = dir.join("node_modules/mqtt/package.json");
    if !module.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new(npm)
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .arg("mqtt@5")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "npm install mqtt: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir.join("node_modules")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorials_own_gateway_completes_its_upgrade() {
    let (Some(node), Some(npm)) = (tool("node", "nodejs"), tool("npm", "npm")) else {
        return;
    };
    let modules = mqtt_js(&npm);
    let s = Server::start_with(|c| c.mqtt.allow_anonymous = true).await;
    s.release("1.0.2", "gateway", 50_000).await;
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tutorial/sim_gateway_ota.js"
    ))
    .unwrap();
    assert!(src.contains("mqtt://localhost:1885"));
    let script = s.dir.path().join("sim_gateway_ota.js");
    std::fs::write(
        &script,
        src.replace(
            "mqtt://localhost:1885",
            &format!("mqtt://127.0.0.1:{}", s.mqtt),
        ),
    )
    .unwrap();
    let mut sim = tokio::process::Command::new(node)
        .arg(&script)
        .env("NODE_PATH", &modules)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // its console: it says when it is connected (and subscribes right then)
    let mut out = tokio::io::BufReader::new(sim.stdout.take().unwrap()).lines();
    let mut said = Vec::new();
    let connected = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = out.next_line().await {
            said.push(line.clone());
            if line.contains("MQTT") && line.starts_with('✅') {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(connected, Ok(true)),
        "the tutorial's gateway did not connect: {said:?}"
    );
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    // it only connected and subscribed: that is enough to be upgraded
    let deadline = Instant::now() + Duration::from_secs(20);
    let task = loop {
        let (st, b) = s
            .post_json(
                "/api/ota/upgrade/SIM_GATEWAY_001",
                json!({"version": "1.0.2"}),
            )
            .await;
        if st == 201 {
            break b["data"].clone();
        }
        assert_eq!(st, 404, "{b}");
        assert!(
            Instant::now() < deadline,
            "the gateway was never registered: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(task["status"], "pending");
    // its reports (msgId read from data) take the task to completed: ~16 s of its sleeps
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let (_, b) = s.get_json("/api/ota/task/SIM_GATEWAY_001").await;
        let t = b["data"].clone();
        if !matches!(
            t["status"].as_str(),
            Some("pending" | "downloading" | "verifying" | "installing")
        ) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the tutorial's upgrade never finished: {t}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"], 100);
    // it never said which version it ran before the task was made: its first report did
    assert_eq!(done["fromVersion"], "1.0.1", "{done}");
    let notes: Vec<&str> = done["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["note"].as_str().unwrap())
        .collect();
    for want in [
        "downloading 10%",
        "downloading 90%",
        "verifying 95%",
        "installing 98%",
    ] {
        assert!(notes.contains(&want), "{want} missing from {notes:?}");
    }
    // no heartbeat ever: the version comes from its reports and from the completion
    let (_, d) = s.get_json("/api/ota/devices/SIM_GATEWAY_001").await;
    assert_eq!(d["data"]["firmwareVersion"], "1.0.2", "{d}");
    assert_eq!(d["data"]["online"], true);
    let (_, stats) = s.get_json("/api/ota/statistics").await;
    let r = &stats["data"]["reports"];
    assert!(r["applied"].as_u64().unwrap() >= 12, "{r}");
    for (k, v) in r["dropped"].as_object().unwrap() {
        assert_eq!(v, 0, "{k} reports dropped: {r}");
    }
    let _ = sim.kill().await;
}
