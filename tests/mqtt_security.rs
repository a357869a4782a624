//! MQTT security (SPEC 5): wrong or missing credentials are refused, a device cannot subscribe to
//! or publish on another device's topics, lab mode admits and auto-registers unknown devices,
//! and one idle TCP connection to the MQTTS port does not stop another TLS client.

mod common;

use std::time::{Duration, Instant};

use common::mqtt::{Device, Seen};
use common::*;
use serde_json::json;

async fn refused(port: u16, creds: Option<(&str, &str)>) -> bool {
    let mut d = Device::connect(port, "x", creds, None).await;
    match d.next(10).await {
        Seen::Connected(rumqttc::ConnectReturnCode::Success) => false,
        Seen::Connected(_) | Seen::Closed(_) => true,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn logins_are_checked() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.register("pk/dn", "alibaba", "dn-secret!").await;
    assert!(refused(s.mqtt, None).await, "anonymous refused");
    assert!(refused(s.mqtt, Some(("GW1", "wrong"))).await);
    assert!(refused(s.mqtt, Some(("GW9", "gw1-secret"))).await);
    assert!(
        refused(s.mqtt, Some(("pk/dn", "dn-secret!"))).await,
        "Alibaba devices log in as pk&dn"
    );
    assert!(!refused(s.mqtt, Some(("GW1", "gw1-secret"))).await);
    assert!(!refused(s.mqtt, Some(("pk&dn", "dn-secret!"))).await);
}

#[tokio::test]
async fn devices_stay_on_their_own_topics() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.register("GW2", "gateway", "gw2-secret").await;
    s.release("1.0.2", "gateway", 1000).await;

    // GW2 listens on its own topic; GW1 tries everything it must not do
    let mut gw2 = Device::connect(s.mqtt, "gw2", Some(("GW2", "gw2-secret")), None).await;
    gw2.expect_connected().await;
    gw2.subscribe("hanqi/gateway/GW2/command").await;

    for filter in [
        "hanqi/gateway/GW2/command",
        "hanqi/gateway/+/command",
        "#",
        "hanqi/gateway/GW2/report",
        "$SYS/#",
    ] {
        let mut d = Device::connect(s.mqtt, "gw1", Some(("GW1", "gw1-secret")), None).await;
        d.expect_connected().await;
        d.expect_subscribe_refused(filter).await;
        // refused, still connected, and its own topic still works
        d.subscribe("hanqi/gateway/GW1/command").await;
    }
    // a refused publish is acknowledged, dropped and counted; the connection stays
    let denied = "hangar_mqtt_messages_dropped_total{reason=\"acl_denied\"}";
    let before = s.metric(denied).await;
    let mut d = Device::connect(s.mqtt, "gw1", Some(("GW1", "gw1-secret")), None).await;
    d.expect_connected().await;
    for topic in [
        "hanqi/gateway/GW2/command",
        "hanqi/gateway/GW2/report",
        "other/topic",
    ] {
        d.publish_refused(topic, json!({"msgType":"ota_upgrade","data":{}}))
            .await;
    }
    assert_eq!(s.metric(denied).await, before + 3.0);
    // a forged command never reached GW2, and nothing was counted as GW2's report
    assert!(
        tokio::time::timeout(Duration::from_millis(300), gw2.message(1))
            .await
            .is_err()
    );
    let (_, dev) = s.get_json("/api/ota/devices/GW2").await;
    assert!(dev["data"]["firmwareVersion"].is_null());

    // the same client id for two devices does not kick either (ids are scoped per device)
    let mut a = Device::connect(s.mqtt, "same-id", Some(("GW1", "gw1-secret")), None).await;
    a.expect_connected().await;
    let mut b = Device::connect(s.mqtt, "same-id", Some(("GW2", "gw2-secret")), None).await;
    b.expect_connected().await;
    a.subscribe("hanqi/gateway/GW1/command").await;
    b.subscribe("hanqi/gateway/GW2/command").await;
    s.post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    let (topic, _) = a.message(10).await;
    assert_eq!(topic, "hanqi/gateway/GW1/command");
}

#[tokio::test]
async fn lab_mode_admits_and_auto_registers() {
    let s = Server::start_with(|c| c.mqtt.allow_anonymous = true).await;
    let mut d = Device::connect(s.mqtt, "lab", None, None).await;
    d.expect_connected().await;
    d.subscribe("hanqi/gateway/LAB7/command").await;
    d.publish(
        "hanqi/gateway/LAB7/report",
        json!({"msgType":"heartbeat","data":{"firmwareVersion":"0.9","deviceType":"gateway"}}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, b) = s.get_json("/api/ota/devices/LAB7").await;
        if st == 200 && b["data"]["firmwareVersion"] == "0.9" {
            assert_eq!(b["data"]["registered"], false);
            break;
        }
        assert!(Instant::now() < deadline, "{b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // still only protocol topics: general topics are closed without an acl_file
    d.publish_refused("not/a/report", json!({})).await;
}

#[tokio::test]
async fn idle_tcp_connection_does_not_block_tls_clients() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    // a client that opens TCP and never starts the TLS handshake
    let _idle = tokio::net::TcpStream::connect(("127.0.0.1", s.mqtts))
        .await
        .unwrap();
    let started = Instant::now();
    let mut d = Device::connect(
        s.mqtts,
        "tls",
        Some(("GW1", "gw1-secret")),
        Some(s.dir.path()),
    )
    .await;
    d.expect_connected().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}
