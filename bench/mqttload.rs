//! MQTT load generator for `bench/mqtt.sh`: the same N simulated gateways (rumqttc, QoS 1,
//! TCP_NODELAY on) against mosquitto or Hangar, measuring connect time, command fan-out, the
//! command -> report round trip and a burst of progress reports. Prints one JSON line.
//!
//! mosquitto: a collector client subscribes to `{prefix}/gateway/+/report` and publishes one
//! command per device; each device answers with a report; done when the collector has them all.
//! Hangar: the bench creates one upgrade task per device through the HTTPS API; each device
//! answers the command with an `ota_progress` report; done when every report's PUBACK is back —
//! Hangar acknowledges a report only after it is persisted, so that is "task created + persisted
//! + command delivered + report persisted".
//!
//! Usage: cargo bench --bench mqttload -- --target mosquitto|hangar --port P --devices N
//!        [--api URL --token T --ca FILE --version V] [--burst K]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    subscribed: AtomicU64,
    commands: AtomicU64,
    acked: AtomicU64,
    collected: AtomicU64,
    errors: AtomicU64,
}

struct Args {
    target: String,
    port: u16,
    devices: usize,
    api: String,
    token: String,
    ca: String,
    version: String,
    burst: usize,
    prefix: String,
    server_pid: u32,
    /// Hangar: "api" (one upgrade call per device) or "campaign" (one campaign for all).
    create: String,
    /// Hangar's mqtt.engine, echoed into the result.
    engine: String,
    /// Each device announces itself (a heartbeat) once connected, as real gateways do, and
    /// the appliance has stored every announcement before the clock starts.
    announce: bool,
    /// Connect, subscribe, print the idle memory and hold the connections (for profiling).
    connect_only: bool,
    /// The burst is sent this many times, one after the other (each round's reports all
    /// persisted before the next); progress climbs to 99 and then repeats.
    rounds: usize,
}

/// VmRSS of a process in kB (0 if unknown).
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn args() -> Args {
    let mut a = Args {
        target: "mosquitto".into(),
        port: 1883,
        devices: 1000,
        api: String::new(),
        token: String::new(),
        ca: String::new(),
        version: "1.0.2".into(),
        burst: 5,
        prefix: "hanqi".into(),
        server_pid: 0,
        create: "campaign".into(),
        engine: String::new(),
        announce: false,
        connect_only: false,
        rounds: 1,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--target" => a.target = val,
            "--port" => a.port = val.parse().expect("--port"),
            "--devices" => a.devices = val.parse().expect("--devices"),
            "--api" => a.api = val,
            "--token" => a.token = val,
            "--ca" => a.ca = val,
            "--version" => a.version = val,
            "--burst" => a.burst = val.parse().expect("--burst"),
            "--rounds" => a.rounds = val.parse().expect("--rounds"),
            "--prefix" => a.prefix = val,
            "--server-pid" => a.server_pid = val.parse().expect("--server-pid"),
            "--create" => a.create = val,
            "--engine" => a.engine = val,
            "--connect-only" => {
                a.connect_only = true;
                i += 1;
                continue;
            }
            "--announce" => {
                a.announce = true;
                i += 1;
                continue;
            }
            "--bench" => {
                i += 1;
                continue;
            }
            _ => {}
        }
        i += 2;
    }
    a
}

fn opts(id: &str, port: u16, creds: Option<(String, String)>) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(120));
    o.set_inflight(100);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    o
}

async fn wait_for(label: &str, c: &AtomicU64, n: u64, secs: u64) -> f64 {
    let start = Instant::now();
    while c.load(Ordering::Relaxed) < n {
        if start.elapsed() > Duration::from_secs(secs) {
            eprintln!(
                "{label}: only {} of {n} after {secs} s",
                c.load(Ordering::Relaxed)
            );
            return f64::NAN;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    start.elapsed().as_secs_f64()
}

/// With `--engine external` the site's broker answers the devices' PUBACKs itself: a report
/// counts once Hangar acknowledged it to the broker, after storing it
/// (`hangar_site_broker_acks_sent` on the appliance's /metrics).
async fn wait_persisted(a: &Args, want: u64, secs: u64) {
    if a.engine != "external" {
        return;
    }
    let http = api_client(&a.ca);
    let start = Instant::now();
    loop {
        let got = match http
            .get(format!("{}/metrics", a.api))
            .bearer_auth(&a.token)
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
        .lines()
        .find(|l| l.starts_with("hangar_site_broker_acks_sent_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
        if got >= want {
            return;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            eprintln!("persisted: only {got} of {want} after {secs} s");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An HTTPS client trusting the appliance's CA.
fn api_client(ca: &str) -> reqwest::Client {
    let pem = std::fs::read(ca).expect("--ca");
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

fn report(msg_id: &str, id: &str, p: u64) -> Vec<u8> {
    format!(
        r#"{{"msgType":"ota_progress","msgId":"{msg_id}","uuid":"{id}","timestamp":1,"data":{{"state":"downloading","progress":{p},"currentVersion":"1.0.1","targetVersion":"1.0.2","errorCode":null,"errorMessage":null}}}}"#
    )
    .into_bytes()
}

#[tokio::main]
async fn main() {
    let a = args();
    let hangar = a.target == "hangar";
    let counts = Arc::new(Counts::default());
    let burst = a.burst as u64;
    let msg_ids: Arc<std::sync::Mutex<Vec<String>>> =
        Arc::new(std::sync::Mutex::new(vec![String::new(); a.devices]));
    let rss_base = rss_kb(a.server_pid);
    let t0 = Instant::now();
    let mut clients = Vec::with_capacity(a.devices);
    for i in 0..a.devices {
        let id = format!("B{i:05}");
        let creds = hangar.then(|| (id.clone(), format!("bench-secret-{i}")));
        let (client, mut ev) = AsyncClient::new(opts(&format!("c-{id}"), a.port, creds), 32);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(60);
        ev.set_network_options(net);
        let c = counts.clone();
        let ids = msg_ids.clone();
        let me = client.clone();
        let report_topic = format!("{}/gateway/{id}/report", a.prefix);
        let command_topic = format!("{}/gateway/{id}/command", a.prefix);
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.connected.fetch_add(1, Ordering::Relaxed);
                        let _ = me.try_subscribe(command_topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        c.subscribed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        c.commands.fetch_add(1, Ordering::Relaxed);
                        let msg_id = serde_json::from_slice::<serde_json::Value>(&p.payload)
                            .ok()
                            .and_then(|v| v["msgId"].as_str().map(String::from))
                            .unwrap_or_default();
                        // one report answers the command; the burst comes later, from main
                        if me
                            .try_publish(
                                report_topic.clone(),
                                QoS::AtLeastOnce,
                                false,
                                report(&msg_id, &id, 1),
                            )
                            .is_err()
                        {
                            c.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        ids.lock().unwrap()[i] = msg_id;
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        c.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        clients.push(client);
    }
    let n = a.devices as u64;
    let connect_s = wait_for("connect", &counts.connected, n, 120).await;
    let _ = t0;
    let subscribe_s = wait_for("subscribe", &counts.subscribed, n, 120).await;
    // the idle state: every server has had time to settle (Hangar hands the login wave's
    // freed memory back within two seconds of the last connection)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_connected = rss_kb(a.server_pid);
    if a.connect_only {
        // profiling the idle fleet: report and hold the connections until killed
        println!(
            "{}",
            serde_json::json!({
                "devices": a.devices,
                "connect_s": connect_s,
                "server_rss_base_kb": rss_base,
                "server_rss_connected_kb": rss_connected,
                "server_bytes_per_idle_device": (rss_connected.saturating_sub(rss_base) * 1024) / n.max(1),
            })
        );
        std::future::pending::<()>().await;
    }
    if a.announce {
        for (i, c) in clients.iter().enumerate() {
            let id = format!("B{i:05}");
            let body = format!(
                r#"{{"msgType":"heartbeat","uuid":"{id}","timestamp":1,"data":{{"firmwareVersion":"1.0.1","deviceType":"gateway"}}}}"#
            );
            let _ = c.try_publish(
                format!("{}/gateway/{id}/report", a.prefix),
                QoS::AtLeastOnce,
                false,
                body.into_bytes(),
            );
        }
        wait_for("announce", &counts.acked, n, 120).await;
        wait_persisted(&a, n, 120).await;
    }
    // what the announcements counted
    let base = if hangar {
        counts.acked.load(Ordering::Relaxed)
    } else {
        0
    };

    // collector (mosquitto only): subscribes to every report
    let collector = if !hangar {
        let (client, mut ev) = AsyncClient::new(opts("collector", a.port, None), 100_000);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        ev.set_network_options(net);
        let c = counts.clone();
        let ready = Arc::new(AtomicU64::new(0));
        let r2 = ready.clone();
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        r2.store(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        c.collected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("collector: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        client
            .subscribe(format!("{}/gateway/+/report", a.prefix), QoS::AtLeastOnce)
            .await
            .unwrap();
        wait_for("collector", &ready, 1, 30).await;
        Some(client)
    } else {
        None
    };

    let start = Instant::now();
    if let Some(col) = &collector {
        for i in 0..a.devices {
            let topic = format!("{}/gateway/B{i:05}/command", a.prefix);
            let body = format!(
                r#"{{"msgType":"ota_upgrade","msgId":"m{i}","data":{{"version":"{}"}}}}"#,
                a.version
            );
            col.publish(topic, QoS::AtLeastOnce, false, body.into_bytes())
                .await
                .unwrap();
        }
    } else if a.create == "campaign" {
        // one campaign, one wave with the whole fleet: the site engineer's way to upgrade many
        let http = api_client(&a.ca);
        let r = http
            .post(format!("{}/api/ota/campaigns", a.api))
            .bearer_auth(&a.token)
            .json(&serde_json::json!({
                "name": "bench", "deviceType": "gateway", "version": a.version,
                "targets": {"all": true}, "waves": [100], "maxInFlight": a.devices,
            }))
            .send()
            .await
            .expect("campaign");
        assert!(r.status().is_success(), "campaign: {}", r.status());
    } else {
        let http = api_client(&a.ca);
        let next = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for _ in 0..64 {
            let (http, next, api, token, version) = (
                http.clone(),
                next.clone(),
                a.api.clone(),
                a.token.clone(),
                a.version.clone(),
            );
            let total = n;
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let r = http
                        .post(format!("{api}/api/ota/upgrade/B{i:05}"))
                        .bearer_auth(&token)
                        .json(&serde_json::json!({"version": version}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => {}
                        Ok(r) => eprintln!("upgrade B{i:05}: {}", r.status()),
                        Err(e) => eprintln!("upgrade B{i:05}: {e}"),
                    }
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
    }
    let issued_s = start.elapsed().as_secs_f64();
    let fanout_s = wait_for("fan-out", &counts.commands, n, 300).await + 0.0;
    let fanout_total = start.elapsed().as_secs_f64().min(issued_s.max(fanout_s));
    // round trip: one report per device back at the server (collector / persisted PUBACK)
    let done_counter = if hangar {
        &counts.acked
    } else {
        &counts.collected
    };
    let first_reports = wait_for("round trip", done_counter, base + n, 300).await;
    wait_persisted(&a, base + n, 300).await;
    let round_trip_s = start.elapsed().as_secs_f64();
    let _ = first_reports;
    // burst: every device sends `burst` more progress reports at once (`rounds` times)
    let total_reports = n * (1 + burst * a.rounds as u64);
    let burst_start = Instant::now();
    let ids = msg_ids.lock().unwrap().clone();
    for round in 0..a.rounds as u64 {
        for (i, c) in clients.iter().enumerate() {
            let id = format!("B{i:05}");
            let topic = format!("{}/gateway/{id}/report", a.prefix);
            for k in 2..=1 + burst {
                let progress = (round * burst + k).min(99);
                if c.try_publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    report(&ids[i], &id, progress),
                )
                .is_err()
                {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let sent = base + n * (1 + burst * (round + 1));
        let _ = wait_for("burst", done_counter, sent, 300).await;
    }
    wait_persisted(&a, base + total_reports, 300).await;
    let burst_s = burst_start.elapsed().as_secs_f64();
    let out = serde_json::json!({
        "target": a.target,
        "engine": a.engine,
        "create": a.create,
        "devices": n,
        "connect_s": connect_s,
        "subscribe_s": subscribe_s,
        "commands_issued_s": issued_s,
        "fanout_s": fanout_total,
        "round_trip_s": round_trip_s,
        "reports_total": done_counter.load(Ordering::Relaxed),
        "reports_per_s": ((n * burst * a.rounds as u64) as f64) / burst_s,
        "burst_tail_s": burst_s,
        "errors": counts.errors.load(Ordering::Relaxed),
        "server_rss_base_kb": rss_base,
        "server_rss_connected_kb": rss_connected,
        "server_bytes_per_idle_device": (rss_connected.saturating_sub(rss_base) * 1024) / n.max(1),
        "server_rss_end_kb": rss_kb(a.server_pid),
    });
    println!("{out}");
    std::process::exit(0);
}
