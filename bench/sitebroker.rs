//! Load generator for `bench/sitebroker.sh`: the site broker's general traffic, the same way
//! against mosquitto and Hangar (rumqttc, TCP_NODELAY). Prints one JSON line.
//!
//! - `telemetry`: N devices connect (with `--device-password`, user name = device id, or
//!   anonymously) and each publishes one message per second at QoS 1 on `site/{id}/telemetry`,
//!   spread evenly over the second; one application client subscribed to `site/+/telemetry`
//!   (QoS 1) receives them. After a warm-up, for `--secs` seconds: messages delivered per
//!   second, the latency of each (publish to receipt; the payload carries the send time) as
//!   p50/p99/max, and the server's RSS at the end of the window.
//! - `fanout`: N subscribers of `fan/topic` (QoS 0); one retained publish; the time until every
//!   subscriber has it. Then N new subscribers of the same topic: the time until every one got
//!   the retained message. And the server's RSS with the N subscribers connected.
//!
//! Usage: cargo bench --bench sitebroker -- --scenario telemetry|fanout --port P --clients N
//!        [--secs S] [--warmup S] [--server-pid PID] [--device-password PW]
//!        [--app-user U --app-password PW]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};

struct Args {
    scenario: String,
    port: u16,
    clients: usize,
    secs: u64,
    warmup: u64,
    server_pid: u32,
    device_password: Option<String>,
    app: Option<(String, String)>,
    id_prefix: String,
}

fn args() -> Args {
    let mut a = Args {
        scenario: "telemetry".into(),
        port: 1883,
        clients: 1000,
        secs: 20,
        warmup: 5,
        server_pid: 0,
        device_password: None,
        app: None,
        id_prefix: "B".into(),
    };
    let v: Vec<String> = std::env::args().collect();
    let mut app_user = None;
    let mut app_password = None;
    let mut i = 1;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--scenario" => a.scenario = val,
            "--port" => a.port = val.parse().expect("--port"),
            "--clients" => a.clients = val.parse().expect("--clients"),
            "--secs" => a.secs = val.parse().expect("--secs"),
            "--warmup" => a.warmup = val.parse().expect("--warmup"),
            "--server-pid" => a.server_pid = val.parse().expect("--server-pid"),
            "--device-password" => a.device_password = Some(val),
            "--app-user" => app_user = Some(val),
            "--app-password" => app_password = Some(val),
            "--id-prefix" => a.id_prefix = val,
            "--bench" => {
                i += 1;
                continue;
            }
            _ => {}
        }
        i += 2;
    }
    a.app = app_user.zip(app_password);
    a
}

/// (VmRSS, VmHWM) of a process in kB (0 if unknown).
fn memory_kb(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS"), field("VmHWM"))
}

fn client(
    id: &str,
    port: u16,
    creds: Option<(String, String)>,
    cap: usize,
) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(120));
    o.set_inflight(100);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    let (c, mut ev) = AsyncClient::new(o, cap);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(60);
    ev.set_network_options(net);
    (c, ev)
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

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    subscribed: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
}

/// Runs an event loop, counting CONNACKs, SUBACKs and received publishes (handing each to `on`).
fn drive(mut ev: rumqttc::EventLoop, c: Arc<Counts>, on: impl Fn(&[u8]) + Send + 'static) {
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    c.connected.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    c.subscribed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    on(&p.payload);
                    c.received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn telemetry(a: &Args) -> serde_json::Value {
    let t0 = Instant::now();
    let rss_base = memory_kb(a.server_pid).0;
    // the application: one subscriber of every device's telemetry
    let app_counts = Arc::new(Counts::default());
    let latencies: Arc<std::sync::Mutex<Vec<u32>>> = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recording = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (app, ev) = client("bench-app", a.port, a.app.clone(), 100_000);
    {
        let (lat, rec) = (latencies.clone(), recording.clone());
        drive(ev, app_counts.clone(), move |payload| {
            if !rec.load(Ordering::Relaxed) {
                return;
            }
            // the payload starts with the send time in microseconds since t0
            let sent: u64 = std::str::from_utf8(&payload[..payload.len().min(20)])
                .ok()
                .and_then(|s| s.split(',').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let now = t0.elapsed().as_micros() as u64;
            lat.lock()
                .unwrap()
                .push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
        });
    }
    wait_for("app connect", &app_counts.connected, 1, 60).await;
    app.subscribe("site/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_for("app subscribe", &app_counts.subscribed, 1, 60).await;

    // the devices
    let dev_counts = Arc::new(Counts::default());
    let n = a.clients;
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{}{i:05}", a.id_prefix);
        let creds = a
            .device_password
            .as_ref()
            .map(|p| (id.clone(), format!("{p}-{i}")));
        let (c, ev) = client(&format!("c-{id}"), a.port, creds, 16);
        drive(ev, dev_counts.clone(), |_| {});
        devices.push((id, c));
    }
    let connect_s = wait_for("devices connect", &dev_counts.connected, n as u64, 300).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = memory_kb(a.server_pid).0;

    // each device publishes once a second, the fleet spread evenly over the second
    let published = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    for (i, (id, c)) in devices.iter().enumerate() {
        let (c, topic) = (c.clone(), format!("site/{id}/telemetry"));
        let (published, stop) = (published.clone(), stop.clone());
        let offset = Duration::from_micros((i as u64 * 1_000_000) / n as u64);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start + offset, Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                seq += 1;
                let sent = t0.elapsed().as_micros() as u64;
                let payload = format!("{sent},{seq},{{\"t\":21.5,\"rpm\":1450,\"state\":\"run\"}}");
                if c.publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                    .is_ok()
                {
                    published.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let (r0, p0) = (
        app_counts.received.load(Ordering::Relaxed),
        published.load(Ordering::Relaxed),
    );
    recording.store(true, Ordering::Relaxed);
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.secs)).await;
    recording.store(false, Ordering::Relaxed);
    let window = w0.elapsed().as_secs_f64();
    let (r1, p1) = (
        app_counts.received.load(Ordering::Relaxed),
        published.load(Ordering::Relaxed),
    );
    let (rss_end, hwm) = memory_kb(a.server_pid);
    stop.store(true, Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort_unstable();
    serde_json::json!({
        "scenario": "telemetry",
        "devices": n,
        "connect_s": connect_s,
        "published_per_s": (p1 - p0) as f64 / window,
        "delivered_per_s": (r1 - r0) as f64 / window,
        "latency_ms_p50": percentile(&lat, 0.50),
        "latency_ms_p99": percentile(&lat, 0.99),
        "latency_ms_max": percentile(&lat, 1.0),
        "latency_samples": lat.len(),
        "server_rss_base_kb": rss_base,
        "server_rss_connected_kb": rss_connected,
        "server_rss_kb": rss_end,
        "server_hwm_kb": hwm,
        "errors": dev_counts.errors.load(Ordering::Relaxed) + app_counts.errors.load(Ordering::Relaxed),
    })
}

async fn fanout(a: &Args) -> serde_json::Value {
    let n = a.clients;
    let rss_base = memory_kb(a.server_pid).0;
    let counts = Arc::new(Counts::default());
    let mut subs = Vec::with_capacity(n);
    for i in 0..n {
        let (c, ev) = client(&format!("fan-{i}"), a.port, a.app.clone(), 16);
        drive(ev, counts.clone(), |_| {});
        subs.push(c);
    }
    wait_for("subscribers connect", &counts.connected, n as u64, 300).await;
    for c in &subs {
        c.subscribe("fan/topic", QoS::AtMostOnce).await.unwrap();
    }
    wait_for("subscribe", &counts.subscribed, n as u64, 300).await;
    let rss_connected = memory_kb(a.server_pid).0;
    let pub_counts = Arc::new(Counts::default());
    let (publisher, ev) = client("fan-publisher", a.port, a.app.clone(), 16);
    drive(ev, pub_counts.clone(), |_| {});
    wait_for("publisher", &pub_counts.connected, 1, 60).await;
    publisher
        .publish("fan/topic", QoS::AtLeastOnce, true, vec![b'r'; 64])
        .await
        .unwrap();
    let fanout_s = wait_for("fan-out", &counts.received, n as u64, 120).await;
    // N newcomers subscribe to the retained topic
    let late = Arc::new(Counts::default());
    let mut late_subs = Vec::with_capacity(n);
    for i in 0..n {
        let (c, ev) = client(&format!("late-{i}"), a.port, a.app.clone(), 16);
        drive(ev, late.clone(), |_| {});
        late_subs.push(c);
    }
    wait_for("newcomers connect", &late.connected, n as u64, 300).await;
    let t = Instant::now();
    for c in &late_subs {
        c.subscribe("fan/topic", QoS::AtMostOnce).await.unwrap();
    }
    wait_for("retained to newcomers", &late.received, n as u64, 120).await;
    let retained_s = t.elapsed().as_secs_f64();
    // clear the retained message for the next run
    publisher
        .publish("fan/topic", QoS::AtLeastOnce, true, Vec::<u8>::new())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    serde_json::json!({
        "scenario": "fanout",
        "subscribers": n,
        "fanout_s": fanout_s,
        "retained_to_newcomers_s": retained_s,
        "server_rss_base_kb": rss_base,
        "server_rss_subscribed_kb": rss_connected,
        "server_hwm_kb": memory_kb(a.server_pid).1,
        "errors": counts.errors.load(Ordering::Relaxed) + late.errors.load(Ordering::Relaxed),
    })
}

#[tokio::main]
async fn main() {
    let a = args();
    let out = match a.scenario.as_str() {
        "telemetry" => telemetry(&a).await,
        "fanout" => fanout(&a).await,
        other => panic!("--scenario {other}: telemetry or fanout"),
    };
    println!("{out}");
}
