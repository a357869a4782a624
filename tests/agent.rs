//! `hangar agent` upgrading a real executable (a shell script written by the test) through a
//! real appliance over MQTTS: the new version runs; a broken one is rolled back with the old one
//! running again and INSTALL_FAILED reported; an agent killed between the swap and the health
//! check finishes the job when it starts again.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, bin};
use serde_json::{Value, json};

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn script(version: &str, marker: &Path, healthy: bool) -> Vec<u8> {
    let tail = if healthy { "exec sleep 600" } else { "exit 3" };
    format!(
        "#!/bin/sh\n# app {version}\necho {version} > {}\n{tail}\n",
        marker.display()
    )
    .into_bytes()
}

fn start_agent(config: &Path) -> AgentProc {
    AgentProc(
        Command::new(bin())
            .args(["agent", "--config"])
            .arg(config)
            .env("RUST_LOG", "hangar=info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

async fn release(s: &Server, version: &str, bytes: Vec<u8>) {
    let (st, b) = s.upload(version, Some("gateway"), bytes).await;
    assert_eq!(st, 201, "{b}");
    let (st, b) = s
        .post_json(
            &format!("/api/ota/firmware/{version}/release?deviceType=gateway"),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
}

async fn upgrade(s: &Server, version: &str) -> Value {
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW-A", json!({"version": version}))
        .await;
    assert_eq!(st, 201, "{b}");
    b
}

async fn wait_final(s: &Server, version: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (_, b) = s.get_json("/api/ota/task/GW-A").await;
        let t = &b["data"];
        if t["toVersion"] == version
            && ["completed", "failed", "cancelled"].contains(&t["status"].as_str().unwrap_or(""))
        {
            return t.clone();
        }
        assert!(Instant::now() < deadline, "task never ended: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn device_version(s: &Server) -> Value {
    s.get_json("/api/ota/devices/GW-A").await.1["data"]["firmwareVersion"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_upgrades_rolls_back_and_recovers() {
    let s = Server::start().await;
    s.register("GW-A", "gateway", "agent-secret").await;
    let work = tempfile::tempdir().unwrap();
    let app_dir = work.path().join("opt");
    std::fs::create_dir_all(&app_dir).unwrap();
    let app: PathBuf = app_dir.join("app");
    let marker = work.path().join("running");
    std::fs::write(&app, script("1.0.0", &marker, true)).unwrap();
    std::fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let state_dir = work.path().join("state");
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"GW-A\"\nsecret = \"agent-secret\"\nprotocol = \"gateway\"\ndevice_type = \"gateway\"\n\
             mqtt_url = \"mqtts://localhost:{}\"\nca_file = {:?}\napp_path = {:?}\ninitial_version = \"1.0.0\"\n\
             state_dir = {:?}\nrestart = \"supervise\"\nhealth_command = \"test -s {}\"\nhealth_secs = 2\n",
            s.mqtts,
            s.dir.path().join("certs/ca.pem"),
            app,
            state_dir,
            marker.display(),
        ),
    )
    .unwrap();

    let agent = start_agent(&config);
    wait_for("the app to run", 20, || read(&marker).trim() == "1.0.0").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while device_version(&s).await != "1.0.0" {
        assert!(Instant::now() < deadline, "the agent never announced 1.0.0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1. a good version: downloaded, verified, swapped, restarted, health-checked
    let v2 = script("1.1.0", &marker, true);
    release(&s, "1.1.0", v2.clone()).await;
    upgrade(&s, "1.1.0").await;
    let t = wait_final(&s, "1.1.0").await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(std::fs::read(&app).unwrap(), v2);
    assert_eq!(
        std::fs::read(app_dir.join("app.backup")).unwrap(),
        script("1.0.0", &marker, true)
    );
    wait_for("1.1.0 to run", 10, || read(&marker).trim() == "1.1.0").await;
    assert_eq!(device_version(&s).await, "1.1.0");

    // 2. a version that dies at start: rolled back, the old one runs again, INSTALL_FAILED
    release(&s, "1.2.0", script("1.2.0", &marker, false)).await;
    upgrade(&s, "1.2.0").await;
    let t = wait_final(&s, "1.2.0").await;
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["errorCode"], "INSTALL_FAILED", "{t}");
    assert_eq!(std::fs::read(&app).unwrap(), v2, "the old binary is back");
    wait_for("1.1.0 to run again", 10, || read(&marker).trim() == "1.1.0").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while device_version(&s).await != "1.1.0" {
        assert!(
            Instant::now() < deadline,
            "the agent did not report 1.1.0 again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 3. killed between the swap and the end of the health check: the next start finishes it
    let v3 = script("1.3.0", &marker, true);
    release(&s, "1.3.0", v3.clone()).await;
    upgrade(&s, "1.3.0").await;
    let state = state_dir.join("state.json");
    wait_for("the health check phase", 30, || {
        read(&state).contains("\"checking\"")
    })
    .await;
    let mut agent = agent;
    let pid = agent.0.id() as i32;
    // SAFETY: kill(2) on our child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let _ = agent.0.wait();
    assert!(read(&state).contains("\"checking\""), "{}", read(&state));
    assert_eq!(
        std::fs::read(&app).unwrap(),
        v3,
        "the new binary is in place"
    );
    let _agent = start_agent(&config);
    let t = wait_final(&s, "1.3.0").await;
    assert_eq!(t["status"], "completed", "{t}");
    wait_for("1.3.0 to run", 10, || read(&marker).trim() == "1.3.0").await;
    wait_for("state idle", 10, || read(&state).contains("\"idle\"")).await;
    assert!(
        read(&state).contains("\"running_version\": \"1.3.0\""),
        "{}",
        read(&state)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_resumes_its_download_after_its_own_restart() {
    let s = Server::start().await;
    s.register("GW-A", "gateway", "agent-secret").await;
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    let marker = work.path().join("running");
    std::fs::write(&app, script("1.0.0", &marker, true)).unwrap();
    std::fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let state_dir = work.path().join("state");
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"GW-A\"\nsecret = \"agent-secret\"\nmqtt_url = \"mqtt://127.0.0.1:{}\"\n\
             ca_file = {:?}\napp_path = {:?}\ninitial_version = \"1.0.0\"\nstate_dir = {:?}\n\
             health_secs = 1\nmax_download_kbps = 1000\n",
            s.mqtt,
            s.dir.path().join("certs/ca.pem"),
            app,
            state_dir,
        ),
    )
    .unwrap();
    // a 3 MB "binary": the script runs, the padding after `exec` is never read
    let mut v2 = script("2.0.0", &marker, true);
    v2.extend(std::iter::repeat_n(b'#', 3_000_000));
    v2.push(b'\n');
    release(&s, "2.0.0", v2.clone()).await;
    let mut agent = start_agent(&config);
    wait_for("the app to run", 20, || read(&marker).trim() == "1.0.0").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while device_version(&s).await != "1.0.0" {
        assert!(Instant::now() < deadline, "the agent never announced 1.0.0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    upgrade(&s, "2.0.0").await;
    // kill it a third of the way through (1 MB/s cap)
    let part = state_dir.join("download.part");
    wait_for("a third of the download", 20, || {
        std::fs::metadata(&part).is_ok_and(|m| m.len() > 1_000_000)
    })
    .await;
    // SAFETY: kill(2) on our child.
    unsafe {
        libc::kill(agent.0.id() as i32, libc::SIGKILL);
    }
    let _ = agent.0.wait();
    let had = std::fs::metadata(&part).unwrap().len();
    assert!(had < v2.len() as u64, "killed before the end");
    let sent_v2 = |stats: &Value| {
        stats["data"]["downloads"]["perFirmware"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["version"] == "2.0.0")
            .map_or(0, |f| f["bytesFull"].as_u64().unwrap())
    };
    // what the server had pushed into the socket before the kill (more than the agent wrote:
    // socket buffers), once it noticed the download ended; the resume is measured from here
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.metric("hangar_active_downloads").await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed download never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = sent_v2(&s.get_json("/api/ota/statistics").await.1);
    let _agent = start_agent(&config);
    let t = wait_final(&s, "2.0.0").await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(std::fs::read(&app).unwrap(), v2);
    wait_for("2.0.0 to run", 10, || read(&marker).trim() == "2.0.0").await;
    // it continued from the .part: after the restart the server sent only the rest
    let (_, stats) = s.get_json("/api/ota/statistics").await;
    let size = v2.len() as u64;
    let after = sent_v2(&stats) - before;
    assert!(
        after <= size - had + 1024,
        "{after} bytes sent after the restart; {had} of {size} were on disk"
    );
    assert!(
        stats["data"]["downloads"]["rangeRequests"]
            .as_u64()
            .unwrap()
            >= 1
    );
}
