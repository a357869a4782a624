//! `[[mqtt.bridge]]` with a real mosquitto 2 as the plant's broker: telemetry published on
//! Hangar's broker reaches the plant through an outage of the plant's broker and a `kill -9` of
//! Hangar, each message once; plant commands come in; OTA topics never cross.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Appliance;
use common::mosquitto::Mosquitto;

async fn metric_is(a: &Appliance, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = a.metric(name).await;
        if v == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {v}, not {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `mosquitto_pub -l`: one QoS 1 message per line on `topic`, as an anonymous client of
/// Hangar's broker.
fn publish_lines(port: u16, topic: &str, lines: std::ops::Range<usize>) {
    let mut p = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", topic, "-l", "-i", "line-1"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = p.stdin.take().unwrap();
    for i in lines {
        writeln!(stdin, "m{i}").unwrap();
    }
    drop(stdin);
    assert!(p.wait().unwrap().success());
}

/// The plant's application: `mosquitto_sub` with its persistent session on `site/#`.
fn plant_app(port: &str) -> Command {
    let mut c = Command::new("mosquitto_sub");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-c",
        "-i",
        "plant-app",
        "-q",
        "1",
    ])
    .args(["-t", "site/#"]);
    c
}

/// The plant's application subscribes (made before anything flows).
fn plant_app_subscribes(port: &str) {
    assert!(plant_app(port).arg("-E").status().unwrap().success());
}

/// What the plant's application receives: `n` messages, in order.
fn plant_app_reads(port: &str, n: usize) -> Vec<String> {
    let out = plant_app(port)
        .args(["-C", &n.to_string(), "-W", "30"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn hangar_toml(root: &Path, plant: &Mosquitto) -> String {
    let acl = root.join("acl");
    std::fs::write(&acl, "topic readwrite #\n").unwrap();
    format!(
        "allow_anonymous = true\nacl_file = {:?}\n[[mqtt.bridge]]\nname = \"plant\"\nurl = \"{}\"\nqueue_max_messages = 1000\ntopics = [ {{ pattern = \"site/#\", direction = \"out\", qos = 1 }}, {{ pattern = \"plant/cmd/#\", direction = \"in\", qos = 1 }}, {{ pattern = \"hanqi/#\", direction = \"both\", qos = 1 }} ]\n",
        acl.display(),
        plant.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_crosses_the_bridge_through_an_outage_and_a_kill_9_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut plant) = Mosquitto::plain(dir.path(), "plant") else {
        return;
    };
    let port = plant.port.to_string();
    plant_app_subscribes(&port);
    let mut a = Appliance::start_with(dir.path(), "", &hangar_toml(dir.path(), &plant)).await;
    metric_is(
        &a,
        "hangar_bridge_up{bridge=\"plant\",direction=\"out\"}",
        1.0,
    )
    .await;
    let mqtt = a.running().mqtt;
    publish_lines(mqtt, "site/line1/temp", 0..100);
    metric_is(
        &a,
        "hangar_bridge_messages_total{bridge=\"plant\",result=\"forwarded\"}",
        100.0,
    )
    .await;
    // the plant's broker goes away: what is published meanwhile waits on Hangar's disk
    plant.stop();
    publish_lines(mqtt, "site/line1/temp", 100..200);
    metric_is(&a, "hangar_bridge_queued{bridge=\"plant\"}", 100.0).await;
    // and survives Hangar's own crash
    a.kill_and_restart().await;
    metric_is(&a, "hangar_bridge_queued{bridge=\"plant\"}", 100.0).await;
    plant.run();
    metric_is(&a, "hangar_bridge_queued{bridge=\"plant\"}", 0.0).await;
    let got = plant_app_reads(&port, 200);
    let want: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message once, in order");

    // the plant's commands come in
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &a.running().mqtt.to_string()])
        .args(["-t", "plant/cmd/#", "-C", "1", "-W", "30", "-q", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let before = a
        .metric("hangar_bridge_messages_total{bridge=\"plant\",result=\"received\"}")
        .await;
    // retained, so the subscriber gets it whenever it subscribed
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-r"])
        .args(["-t", "plant/cmd/line1", "-m", "stop-line"])
        .status()
        .unwrap();
    assert!(st.success());
    metric_is(
        &a,
        "hangar_bridge_messages_total{bridge=\"plant\",result=\"received\"}",
        before + 1.0,
    )
    .await;
    let out = sub.wait().unwrap();
    assert!(out.success());
    let mut text = String::new();
    std::io::Read::read_to_string(&mut sub.stdout.take().unwrap(), &mut text).unwrap();
    assert_eq!(text.trim(), "stop-line");

    // an OTA command published on the plant never enters Hangar, even under a rule that
    // covers it
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1"])
        .args([
            "-t",
            "hanqi/gateway/GW-1/command",
            "-m",
            "{\"msgType\":\"ota_upgrade\"}",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    metric_is(
        &a,
        "hangar_bridge_messages_total{bridge=\"plant\",result=\"refused_ota\"}",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_the_oldest_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut plant) = Mosquitto::plain(dir.path(), "plant") else {
        return;
    };
    let port = plant.port.to_string();
    plant_app_subscribes(&port);
    plant.stop();
    let toml = hangar_toml(dir.path(), &plant)
        .replace("queue_max_messages = 1000", "queue_max_messages = 50");
    let a = Appliance::start_with(dir.path(), "", &toml).await;
    publish_lines(a.running().mqtt, "site/line2/count", 0..80);
    metric_is(&a, "hangar_bridge_queued{bridge=\"plant\"}", 50.0).await;
    metric_is(
        &a,
        "hangar_bridge_messages_total{bridge=\"plant\",result=\"dropped_queue_full\"}",
        30.0,
    )
    .await;
    plant.run();
    metric_is(&a, "hangar_bridge_queued{bridge=\"plant\"}", 0.0).await;
    let got = plant_app_reads(&port, 50);
    let want: Vec<String> = (30..80).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "the newest 50, in order");
}
