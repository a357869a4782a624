//! MQTT sessions on the direct engine (the default): a second connection with the same client id
//! takes the session over, a `clean_session = false` device that reconnects without subscribing
//! again still gets its command, a will is delivered to the server when a device vanishes, and
//! keep-alive is enforced.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const COMMAND: &str = "hanqi/gateway/GW1/command";
const REPORT: &str = "hanqi/gateway/GW1/report";

#[derive(Debug)]
enum Ev {
    ConnAck { present: bool },
    SubAck,
    Message(Value),
    Closed,
}

/// A raw rumqttc connection as GW1: (client, events, event-loop task).
fn connect(
    port: u16,
    client_id: &str,
    clean: bool,
    will: Option<LastWill>,
    keep_alive: u64,
) -> (
    AsyncClient,
    mpsc::UnboundedReceiver<Ev>,
    tokio::task::JoinHandle<()>,
) {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_credentials("GW1", "gw1-secret");
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(keep_alive));
    if let Some(w) = will {
        o.set_last_will(w);
    }
    let (client, mut ev) = AsyncClient::new(o, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let e = match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) => Ev::ConnAck {
                    present: c.session_present,
                },
                Ok(Event::Incoming(Packet::SubAck(_))) => Ev::SubAck,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    Ev::Message(serde_json::from_slice(&p.payload).unwrap_or(Value::Null))
                }
                Ok(_) => continue,
                Err(_) => {
                    let _ = tx.send(Ev::Closed);
                    return;
                }
            };
            let _ = tx.send(e);
        }
    });
    (client, rx, task)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Ev>) -> Ev {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no MQTT event in time")
        .expect("event loop ended")
}

async fn wait_for(rx: &mut mpsc::UnboundedReceiver<Ev>, want: impl Fn(&Ev) -> bool) -> Ev {
    loop {
        let e = next(rx).await;
        if want(&e) {
            return e;
        }
    }
}

async fn online(s: &Server, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, b) = s.get_json("/api/ota/devices/GW1").await;
        if b["data"]["online"] == want {
            return;
        }
        assert!(Instant::now() < deadline, "online never became {want}: {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn same_client_id_takes_the_session_over() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let (c1, mut rx1, _t1) = connect(s.mqtt, "gw1-main", true, None, 30);
    assert!(matches!(
        next(&mut rx1).await,
        Ev::ConnAck { present: false }
    ));
    c1.subscribe(COMMAND, QoS::AtLeastOnce).await.unwrap();
    wait_for(&mut rx1, |e| matches!(e, Ev::SubAck)).await;

    // the device comes back on a new connection while the old one looks alive
    let (c2, mut rx2, _t2) = connect(s.mqtt, "gw1-main", true, None, 30);
    assert!(matches!(
        next(&mut rx2).await,
        Ev::ConnAck { present: false }
    ));
    wait_for(&mut rx1, |e| matches!(e, Ev::Closed)).await;
    c2.subscribe(COMMAND, QoS::AtLeastOnce).await.unwrap();
    wait_for(&mut rx2, |e| matches!(e, Ev::SubAck)).await;
    online(&s, true).await;
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    let Ev::Message(cmd) = wait_for(&mut rx2, |e| matches!(e, Ev::Message(_))).await else {
        unreachable!()
    };
    assert_eq!(cmd["data"]["version"], "1.0.2");
}

#[tokio::test]
async fn persistent_session_keeps_the_subscription() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    s.release("1.0.2", "gateway", 1000).await;
    let (c, mut rx, task) = connect(s.mqtt, "gw1-persist", false, None, 30);
    assert!(matches!(
        next(&mut rx).await,
        Ev::ConnAck { present: false }
    ));
    c.subscribe(COMMAND, QoS::AtLeastOnce).await.unwrap();
    wait_for(&mut rx, |e| matches!(e, Ev::SubAck)).await;
    c.disconnect().await.unwrap();
    wait_for(&mut rx, |e| matches!(e, Ev::Closed)).await;
    task.abort();
    online(&s, false).await;

    // a task created while it is away waits for it
    let (st, b) = s
        .post_json("/api/ota/upgrade/GW1", json!({"version": "1.0.2"}))
        .await;
    assert_eq!(st, 201, "{b}");
    assert!(b["data"]["startTime"].is_null(), "{b}");

    // back without subscribing: the session is there and the command arrives
    let (_c, mut rx, _t) = connect(s.mqtt, "gw1-persist", false, None, 30);
    assert!(matches!(next(&mut rx).await, Ev::ConnAck { present: true }));
    let Ev::Message(cmd) = wait_for(&mut rx, |e| matches!(e, Ev::Message(_))).await else {
        unreachable!()
    };
    assert_eq!(cmd["msgType"], "ota_upgrade");

    // a clean connection forgets it
    drop(_c);
    let (_c, mut rx, _t) = connect(s.mqtt, "gw1-persist", true, None, 30);
    assert!(matches!(
        next(&mut rx).await,
        Ev::ConnAck { present: false }
    ));
}

#[tokio::test]
async fn will_reaches_the_server_when_a_device_vanishes() {
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    let will = LastWill::new(
        REPORT,
        serde_json::to_vec(&json!({"msgType":"heartbeat","uuid":"GW1","timestamp":1,
            "data":{"firmwareVersion":"0.9.9","deviceType":"gateway"}}))
        .unwrap(),
        QoS::AtLeastOnce,
        false,
    );
    let (_c, mut rx, task) = connect(s.mqtt, "gw1-will", true, Some(will), 30);
    assert!(matches!(next(&mut rx).await, Ev::ConnAck { .. }));
    online(&s, true).await;
    task.abort(); // the socket closes without DISCONNECT
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, b) = s.get_json("/api/ota/devices/GW1").await;
        if b["data"]["firmwareVersion"] == "0.9.9" {
            break;
        }
        assert!(Instant::now() < deadline, "will not delivered: {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn silent_connection_is_closed_after_one_and_a_half_keep_alives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start().await;
    s.register("GW1", "gateway", "gw1-secret").await;
    // a raw CONNECT with keep-alive 1 s, then silence
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", s.mqtt))
        .await
        .unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0010, 0, 1];
    for field in ["k", "GW1", "gw1-secret"] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend_from_slice(&body);
    sock.write_all(&pkt).await.unwrap();
    let mut connack = [0u8; 4];
    sock.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let started = Instant::now();
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut rest))
        .await
        .expect("still open after 10 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the connection to be closed");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}
