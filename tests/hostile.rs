//! Hostile clients all at once against the real binary: a pre-auth flood and slowloris senders on
//! both MQTT ports, TLS handshakes that never start, and headers that never end both after a
//! finished TLS handshake and on the plain listener, 1,000 concurrent uploads, download clients
//! that never read. Meanwhile a real device logs in and
//! gets its command, and the API answers; the server's peak memory stays bounded.

mod common;

use common::mqtt::Device;
use common::{Appliance, image};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Peak resident memory allowed for the whole episode (measured: 176 MiB on 2026-12-01).
const MAX_PEAK_RSS_KB: u64 = 384 * 1024;

/// Raises this process's open-file limit (the server inherits it) as far as allowed; the
/// number of files it may then open.
fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max.min(65_536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
    }
    l.rlim_cur
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_stop_real_devices_and_memory_stays_bounded() {
    // the full mix needs ~3,200 descriptors on each side; a tighter box gets a smaller mix
    let nofile = raise_nofile();
    let scale = |n: usize| ((n as u64 * nofile.min(8192) / 8192) as usize).max(1);
    if nofile < 8192 {
        common::skipped(format!(
            "hostile test: open-file limit {nofile}, the mix is scaled down to {}/8192",
            nofile
        ));
    }
    let a = Appliance::start().await;
    let p = a.running();
    let (mqtt, mqtts, https) = (p.mqtt, p.mqtts, p.https);
    let (st, b) = a
        .call(
            "POST",
            "/api/ota/devices",
            Some(json!({"id": "GW1", "secret": "gw1-secret", "protocol": "gateway"})),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let big = image(5 << 20, 1);
    assert_eq!(a.upload("1.0.0", big).await.0, 201);
    assert_eq!(
        a.call("POST", "/api/ota/firmware/1.0.0/release", None)
            .await
            .0,
        200
    );

    let mut held = Vec::new();
    // pre-auth flood and slowloris on both MQTT ports: idle sockets and a CONNECT one byte at a time
    for p in [mqtt, mqtts] {
        for _ in 0..scale(600) {
            held.push(TcpStream::connect(("127.0.0.1", p)).await.unwrap());
        }
    }
    for _ in 0..scale(100) {
        let mut c = TcpStream::connect(("127.0.0.1", mqtt)).await.unwrap();
        c.write_all(&[0x10, 0x20, 0x00]).await.unwrap();
        held.push(c);
    }
    // HTTPS: handshakes that never start, headers that never end (plain listener)
    for _ in 0..scale(300) {
        held.push(TcpStream::connect(("127.0.0.1", https)).await.unwrap());
    }
    // slowloris on HTTPS itself: the handshake done, then headers that never end
    let tls = tokio_rustls::TlsConnector::from(common::mqtt::tls_config(&a.data()));
    let mut held_tls = Vec::new();
    for _ in 0..scale(200) {
        let tcp = TcpStream::connect(("127.0.0.1", https)).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = tls.connect(name, tcp).await.expect("TLS handshake");
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .await
            .unwrap();
        c.flush().await.unwrap();
        held_tls.push(c);
    }
    let plain = a.base().trim_start_matches("http://").to_string();
    for _ in 0..scale(300) {
        let mut c = TcpStream::connect(&plain).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        held.push(c);
    }
    // downloads that are never read: the request is sent, the body never consumed
    for _ in 0..scale(50) {
        let mut c = TcpStream::connect(&plain).await.unwrap();
        c.write_all(
            format!(
                "GET /firmware/gateway_v1.0.0.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
                a.token()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        held.push(c);
    }
    // 1,000 concurrent uploads of 64 KiB
    let n_uploads = scale(1000);
    let uploads: Vec<_> = (0..n_uploads)
        .map(|i| {
            let http = a.http.clone();
            let url = format!("{}/api/ota/firmware/upload", a.base());
            let token = a.token();
            tokio::spawn(async move {
                let form = reqwest::multipart::Form::new()
                    .text("version", format!("2.0.{i}"))
                    .part(
                        "file",
                        reqwest::multipart::Part::bytes(image(64 << 10, 100 + i as u64))
                            .file_name("fw.bin"),
                    );
                http.post(url)
                    .bearer_auth(token)
                    .multipart(form)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();

    // meanwhile: a real device logs in on each port, subscribes and gets its command
    let mut devices = Vec::new();
    for (p, tls) in [(mqtt, None), (mqtts, Some(a.data()))] {
        let mut d = Device::connect(
            p,
            &format!("gw1-{p}"),
            Some(("GW1", "gw1-secret")),
            tls.as_deref(),
        )
        .await;
        d.expect_connected().await;
        d.subscribe("hanqi/gateway/GW1/command").await;
        devices.push(d);
    }
    let (st, b) = a
        .call(
            "POST",
            "/api/ota/upgrade/GW1",
            Some(json!({"version": "1.0.0"})),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let (topic, cmd) = devices[1].message(20).await;
    assert_eq!(topic, "hanqi/gateway/GW1/command");
    assert_eq!(cmd["msgType"], "ota_upgrade", "{cmd}");

    let mut created = 0;
    for u in uploads {
        if let Ok(Ok(201)) = u.await {
            created += 1;
        }
    }
    assert_eq!(created, n_uploads, "every upload was taken");
    let (st, list) = a.get("/api/ota/firmware?limit=2000").await;
    assert_eq!(st, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), n_uploads + 1);

    let peak = a.running().status_kb("VmHWM");
    assert!(
        peak < MAX_PEAK_RSS_KB,
        "peak RSS {peak} kB over {MAX_PEAK_RSS_KB} kB"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "hostile: {} hostile sockets held, {n_uploads} uploads taken, peak RSS {} MiB",
        held.len() + held_tls.len(),
        peak / 1024
    );
    drop(held);
    drop(held_tls);
}
