//! The broker closes the connection where MQTT 3.1.1 says so, on both engines, and counts it:
//! each malformed packet below is sent on a raw socket by a device that logged in properly,
//! and the next thing the socket sees is its end — no answer, no effect.

mod common;

use std::time::Duration;

use common::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn strs(v: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in v {
        b.extend_from_slice(&(s.len() as u16).to_be_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    b
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut f = vec![first, body.len() as u8];
    f.extend_from_slice(body);
    f
}

/// CONNECT with these connect flags, user GW1 and its password when the flags say so.
fn connect(flags: u8) -> Vec<u8> {
    let mut b = strs(&["MQTT"]);
    b.extend_from_slice(&[4, flags, 0, 60]);
    b.extend(strs(&["strict-client"]));
    if flags & 0x80 != 0 {
        b.extend(strs(&["GW1"]));
    }
    if flags & 0x40 != 0 {
        b.extend(strs(&["gw1-secret"]));
    }
    frame(0x10, &b)
}

/// Reads what the server sends until it closes; `None` if it does not within 10 s.
async fn until_closed(c: &mut TcpStream) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(all),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

async fn dropped_for_protocol(s: &Server) -> u64 {
    s.metric("hangar_mqtt_messages_dropped_total{reason=\"protocol_error\"}")
        .await as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_close_the_connection() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    let sub = |first: u8, pkid: u16, filter: &str, qos: Option<u8>| {
        let mut b = pkid.to_be_bytes().to_vec();
        b.extend(strs(&[filter]));
        b.extend(qos);
        frame(first, &b)
    };
    let publish = |first: u8, pkid: Option<u16>| {
        let mut b = strs(&["hanqi/gateway/GW1/report"]);
        if let Some(p) = pkid {
            b.extend_from_slice(&p.to_be_bytes());
        }
        b.extend_from_slice(b"{}");
        frame(first, &b)
    };
    let after_login: Vec<(&str, Vec<u8>)> = vec![
        ("QoS 1 PUBLISH with packet id 0", publish(0x32, Some(0))),
        ("QoS 2 PUBLISH with packet id 0", publish(0x34, Some(0))),
        (
            "SUBSCRIBE with packet id 0",
            sub(0x82, 0, "hanqi/gateway/GW1/command", Some(0)),
        ),
        (
            "UNSUBSCRIBE with packet id 0",
            sub(0xA2, 0, "hanqi/gateway/GW1/command", None),
        ),
        (
            "SUBSCRIBE with flags 0000",
            sub(0x80, 1, "hanqi/gateway/GW1/command", Some(0)),
        ),
        (
            "UNSUBSCRIBE with flags 0000",
            sub(0xA0, 1, "hanqi/gateway/GW1/command", None),
        ),
        ("SUBSCRIBE with an empty filter", sub(0x82, 1, "", Some(0))),
        ("UNSUBSCRIBE with an empty filter", sub(0xA2, 1, "", None)),
        ("PINGREQ with a body", frame(0xC0, &[0])),
    ];
    let before = dropped_for_protocol(&s).await;
    let mut n = 0;
    for (what, bad) in &after_login {
        let mut c = TcpStream::connect(("127.0.0.1", s.mqtt)).await.unwrap();
        c.write_all(&connect(0xC2)).await.unwrap();
        let mut connack = [0u8; 4];
        c.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "{what}: login");
        c.write_all(bad).await.unwrap();
        let seen = until_closed(&mut c)
            .await
            .unwrap_or_else(|| panic!("{what}: the connection stayed open"));
        assert!(seen.is_empty(), "{what}: answered {seen:?}");
        n += 1;
    }
    // a CONNECT with its reserved flag set gets no CONNACK at all
    let mut c = TcpStream::connect(("127.0.0.1", s.mqtt)).await.unwrap();
    c.write_all(&connect(0xC3)).await.unwrap();
    let seen = until_closed(&mut c)
        .await
        .expect("CONNECT with the reserved flag: the connection stayed open");
    assert!(seen.is_empty(), "reserved flag: answered {seen:?}");
    n += 1;
    // every one was counted (the last close may be counted a moment after the socket ends)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dropped_for_protocol(&s).await < before + n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} protocol violations counted",
            dropped_for_protocol(&s).await - before
        );
        tokio::task::yield_now().await;
    }
    // and a well-behaved client is still served
    let mut c = TcpStream::connect(("127.0.0.1", s.mqtt)).await.unwrap();
    c.write_all(&connect(0xC2)).await.unwrap();
    c.write_all(&frame(0xC0, &[])).await.unwrap();
    let mut got = [0u8; 6];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(got, [0x20, 2, 0, 0, 0xD0, 0], "CONNACK then PINGRESP");
}

/// Strangers holding idle sockets cannot lock a device out: only logged-in connections count
/// against `mqtt.max_connections`, those not logged in yet have a budget of their own and one
/// per address, and a newcomer takes the place of the oldest silent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_strangers_never_lock_a_registered_device_out() {
    use common::mqtt::Device;
    let s = Server::start_with(|c| {
        c.mqtt.max_connections = 100;
        c.mqtt.max_pending_connections = 32;
        c.mqtt.max_pending_per_address = 16;
    })
    .await;
    s.register("GW1", "gateway", "gw1-secret").await;
    // 150 idle sockets on each port (more than max_connections), none sends a byte
    let mut idle = Vec::new();
    for port in [s.mqtt, s.mqtts] {
        for _ in 0..150 {
            idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
    }
    for (port, tls) in [(s.mqtt, None), (s.mqtts, Some(s.dir.path()))] {
        let mut d = Device::connect(
            port,
            &format!("gw1-{port}"),
            Some(("GW1", "gw1-secret")),
            tls,
        )
        .await;
        d.expect_connected().await;
        d.subscribe("hanqi/gateway/GW1/command").await;
    }
    // the oldest strangers were closed to make room: the very first one sees its end
    let first = &mut idle[0];
    let seen = until_closed(first)
        .await
        .expect("the oldest idle socket was not closed");
    assert!(seen.is_empty());
    assert!(s.metric("hangar_mqtt_pending_connections").await <= 64.0);
    assert!(s.metric("hangar_mqtt_pending_evicted_total").await >= 200.0);
}
