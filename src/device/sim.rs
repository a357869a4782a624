//! `hangar sim`: a fleet of simulated devices in one process (tokio tasks, one shared HTTPS
//! connection pool, no thread per device) speaking both protocols through the shared device
//! client ([`crate::device`]). Each device downloads with Range resume, verifies md5/sha256,
//! "installs" by taking the verified version as its running version, "reboots" after a delay
//! and announces it. Faults are injected on request; a live summary goes to stderr and a JSON
//! summary is the last line of stdout.
//!
//! Simulated devices keep hashes, not bytes: a full image is hashed as it streams and then
//! dropped. For deltas the base image (the version a device runs) is fetched once per version
//! with the admin token and shared by every device on that version.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Mutex, OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::device::client::{
    Command, Failure, Identity, Link, LinkEvent, MqttTarget, Offer, Sender, Stage, announce,
    failure_report, firmware_get, stage_report,
};
use crate::device::fetch::{self, Expect, FetchError, Received};
use crate::protocol::Protocol;

/// Which protocol the fleet speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FleetProtocol {
    /// The backend tutorial's gateways ({prefix}/gateway/{id}/command|report).
    Gateway,
    /// Alibaba-style devices (/ota/device/... topics, productKey/deviceName).
    Alibaba,
    /// Every other device.
    Mixed,
}

/// `hangar sim` options.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Protocol of the devices.
    #[arg(long, value_enum, default_value = "gateway")]
    pub protocol: FleetProtocol,
    /// Version the devices run at start.
    #[arg(long)]
    pub version: String,
    /// Device type (Alibaba: the productKey).
    #[arg(long, default_value = "gateway")]
    pub device_type: String,
    /// Device ids are PREFIX0001, PREFIX0002, ...
    #[arg(long, default_value = "SIM")]
    pub id_prefix: String,
    /// MQTT password of every simulated device.
    #[arg(long, default_value = "hangar-sim", env = "HANGAR_SIM_SECRET")]
    pub secret: String,
    /// Register the devices through the admin API first (existing ones are kept).
    #[arg(long)]
    pub register: bool,
    /// Exit once every device finished an attempt and nothing moved for 10 s.
    #[arg(long)]
    pub until_idle: bool,
    /// Exit after this many seconds (status 1 unless every device finished its attempts).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Probability that an attempt fails at a random stage (download, verify, install).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Probability that a download is cut mid-way (it resumes with Range).
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Probability that a device comes back on its old version after installing (rollback).
    #[arg(long, default_value_t = 0.0)]
    pub bad_install_rate: f64,
    /// Probability that a downloaded patch is corrupted (the device must fall back).
    #[arg(long, default_value_t = 0.0)]
    pub corrupt_delta_rate: f64,
    /// Download speed limit per device, KB/s.
    #[arg(long)]
    pub slow: Option<u64>,
    /// Milliseconds a device "reboots" after installing.
    #[arg(long, default_value_t = 300)]
    pub reboot_ms: u64,
    /// Do not declare bsdiff40 support.
    #[arg(long)]
    pub no_delta: bool,
    /// Use MQTTS (the appliance's CA) instead of plain MQTT.
    #[arg(long)]
    pub tls: bool,
    /// Check each image's minisign signature before "installing" it, as `hangar agent` does:
    /// a missing or bad one is VERIFY_FAILED (-3). The keys are `--trusted-key`s, else the
    /// appliance's trusted keys (GET /api/site).
    #[arg(long)]
    pub verify_signatures: bool,
    /// A minisign public key (base64 line or .pub file) the devices trust; repeatable.
    #[arg(long = "trusted-key")]
    pub trusted_keys: Vec<String>,
    /// Alibaba devices ask firmware/get at start and every this many seconds (0: only at start).
    #[arg(long, default_value_t = 0)]
    pub get_interval: u64,
    /// Every device also publishes one telemetry message this often, in seconds (0: none), at
    /// QoS 1 on --telemetry-topic: what a site's gateways send beside their OTA traffic.
    #[arg(long, default_value_t = 0.0)]
    pub telemetry: f64,
    /// Topic of the telemetry; `{id}` is the device's MQTT user name (`pk&dn` for Alibaba).
    #[arg(long, default_value = "site/{id}/telemetry")]
    pub telemetry_topic: String,
    /// Seconds without movement that count as idle for --until-idle.
    #[arg(long, default_value_t = 10, hide = true)]
    pub idle_secs: u64,
    /// Seconds between live summary lines on stderr (0: none).
    #[arg(long, default_value_t = 2)]
    pub summary_every: u64,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    ever_connected: AtomicU64,
    downloading: AtomicU64,
    attempts: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    rolled_back: AtomicU64,
    refused: AtomicU64,
    cancelled: AtomicU64,
    devices_done: AtomicU64,
    bytes: AtomicU64,
    bytes_full: AtomicU64,
    bytes_delta: AtomicU64,
    bytes_saved: AtomicU64,
    delta_used: AtomicU64,
    delta_fallbacks: AtomicU64,
    resumes: AtomicU64,
    dropped_messages: AtomicU64,
    telemetry: AtomicU64,
    last_move_ms: AtomicI64,
}

/// Base images for deltas, fetched once per version and shared by the fleet.
type ImageCache = Mutex<HashMap<String, Arc<OnceCell<Option<Arc<Vec<u8>>>>>>>;

/// Outcomes of applying a patch (by base version, the patch's md5 when its bytes are the checked
/// ones or its sha256 when not, target md5 and sha256): a thousand
/// devices receiving the same bytes need not all run the same CPU-heavy bspatch; a patch that
/// differs in one byte (e.g. `--corrupt-delta-rate`) is applied on its own.
type PatchCache = Mutex<HashMap<(String, String, String), Arc<OnceCell<Result<(), String>>>>>;

struct Shared {
    args: SimArgs,
    /// With `--verify-signatures`: the keys images must be signed by.
    trusted: Option<crate::trust::Keyring>,
    http: reqwest::Client,
    /// Firmware and patch downloads (see [`download_client`]).
    downloads: reqwest::Client,
    admin: Option<(String, String)>,
    target: MqttTarget,
    stats: Stats,
    images: ImageCache,
    patches: PatchCache,
    /// Patches already checked against their md5, by that md5.
    verified_patches: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    connect_gate: Semaphore,
    start: Instant,
}

impl Shared {
    fn moved(&self) {
        self.stats
            .last_move_ms
            .store(self.start.elapsed().as_millis() as i64, Ordering::Relaxed);
    }

    /// The image of `version`, fetched once with the admin token and shared.
    async fn image(&self, version: &str) -> Option<Arc<Vec<u8>>> {
        let (base, token) = self.admin.as_ref()?;
        let cell = self
            .images
            .lock()
            .await
            .entry(version.to_string())
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            let name = crate::ids::firmware_file_name(&self.args.device_type, version);
            let r = self
                .http
                .get(format!("{base}/firmware/{name}"))
                .bearer_auth(token)
                .send()
                .await
                .ok()?;
            if !r.status().is_success() {
                return None;
            }
            Some(Arc::new(r.bytes().await.ok()?.to_vec()))
        })
        .await
        .clone()
    }
}

fn chance(p: f64) -> bool {
    if p <= 0.0 {
        return false;
    }
    let mut b = [0u8; 8];
    rand::fill(&mut b);
    ((u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64) < p
}

fn uniform(lo: f64, hi: f64) -> f64 {
    let mut b = [0u8; 8];
    rand::fill(&mut b);
    lo + (hi - lo) * ((u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64)
}

/// The device ids and protocols of a fleet.
pub fn fleet(args: &SimArgs) -> Vec<Identity> {
    (1..=args.devices)
        .map(|n| {
            let protocol = match args.protocol {
                FleetProtocol::Gateway => Protocol::Gateway,
                FleetProtocol::Alibaba => Protocol::Alibaba,
                FleetProtocol::Mixed if n % 2 == 0 => Protocol::Alibaba,
                FleetProtocol::Mixed => Protocol::Gateway,
            };
            let name = format!("{}{n:04}", args.id_prefix);
            let id = match protocol {
                Protocol::Gateway => name,
                Protocol::Alibaba => format!("{}/{name}", args.device_type),
            };
            Identity {
                id,
                secret: args.secret.clone(),
                protocol,
                device_type: args.device_type.clone(),
                prefix: "hanqi".into(),
                delta: !args.no_delta,
            }
        })
        .collect()
}

/// The final summary.
fn summary(sh: &Shared, finished: bool) -> serde_json::Value {
    let s = &sh.stats;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "devices": sh.args.devices,
        "connected": g(&s.connected),
        "everConnected": g(&s.ever_connected),
        "attempts": g(&s.attempts),
        "completed": g(&s.completed),
        "failed": g(&s.failed),
        "rolledBack": g(&s.rolled_back),
        "refused": g(&s.refused),
        "cancelled": g(&s.cancelled),
        "devicesFinished": g(&s.devices_done),
        "downloading": g(&s.downloading),
        "bytesDownloaded": g(&s.bytes),
        "bytesFull": g(&s.bytes_full),
        "bytesDelta": g(&s.bytes_delta),
        "bytesSavedByDeltas": g(&s.bytes_saved),
        "deltaUsed": g(&s.delta_used),
        "deltaFallbacks": g(&s.delta_fallbacks),
        "resumes": g(&s.resumes),
        "droppedMessages": g(&s.dropped_messages),
        "telemetrySent": g(&s.telemetry),
        "elapsedSecs": (sh.start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "finished": finished,
    })
}

/// Where the simulated fleet finds the appliance: its admin API (to register the fleet and read
/// images for deltas) and its broker.
pub struct Appliance {
    /// An HTTPS client trusting the appliance's CA.
    pub http: reqwest::Client,
    /// The API's base URL.
    pub base: String,
    /// The admin token.
    pub token: String,
    /// The broker's URL (`mqtt://` or `mqtts://`).
    pub mqtt_url: String,
    /// The CA's PEM, for MQTTS.
    pub ca_pem: Option<Vec<u8>>,
}

/// The simulated devices' download client. Each real gateway fetches its image over a
/// connection of its own; the admin client (HTTP/2 when the appliance offers it) would carry
/// every simulated device's download as a stream of one connection — one TLS stream and one
/// task on each side, which measures the multiplexing rather than the appliance. So downloads
/// go over HTTP/1.1, as many connections as downloads under way, kept for the next download
/// (`HANGAR_SIM_FRESH_CONNECTIONS=1`: a new connection and TLS handshake for every download).
/// With `--slow` they stay on the admin client: HTTP/2's flow control keeps the appliance from
/// running ahead of a slow reader as a slow link would, where over loopback the kernel's socket
/// buffers would take a small image whole at once.
fn download_client(ca_pem: Option<&[u8]>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .http1_only()
        .user_agent(concat!("hangar-sim/", env!("CARGO_PKG_VERSION")));
    if std::env::var_os("HANGAR_SIM_FRESH_CONNECTIONS").is_some() {
        b = b.pool_max_idle_per_host(0);
    }
    if let Some(pem) = ca_pem {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
    }
    Ok(b.build()?)
}

/// Registers the fleet through the admin API (409 = already there: kept).
async fn register(client: &Appliance, fleet: &[Identity]) -> anyhow::Result<()> {
    let sem = Arc::new(Semaphore::new(16));
    let mut set = tokio::task::JoinSet::new();
    for d in fleet {
        let body = json!({"id": d.id, "deviceType": d.device_type,
                          "protocol": d.protocol.as_str(), "secret": d.secret});
        let url = format!("{}/api/ota/devices", client.base);
        let (http, token) = (client.http.clone(), client.token.clone());
        let permit = sem.clone().acquire_owned().await?;
        set.spawn(async move {
            let _p = permit;
            let r = http.post(url).bearer_auth(token).json(&body).send().await?;
            let st = r.status().as_u16();
            if st != 200 && st != 201 && st != 409 {
                anyhow::bail!("registering {}: {st} {}", body["id"], r.text().await?);
            }
            Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// Runs the fleet until `--until-idle`, `--timeout` or Ctrl-C; returns the exit status.
pub async fn run(client: Appliance, args: SimArgs) -> anyhow::Result<i32> {
    if args.devices == 0 {
        anyhow::bail!("--devices must be at least 1");
    }
    if !crate::ids::valid_version(&args.version) {
        anyhow::bail!("--version {:?} is not a valid version", args.version);
    }
    if !crate::ids::valid_device_type(&args.device_type) {
        anyhow::bail!("--device-type {:?} is not valid", args.device_type);
    }
    for (name, p) in [
        ("--fail-rate", args.fail_rate),
        ("--drop-rate", args.drop_rate),
        ("--bad-install-rate", args.bad_install_rate),
        ("--corrupt-delta-rate", args.corrupt_delta_rate),
    ] {
        if !(0.0..=1.0).contains(&p) {
            anyhow::bail!("{name} must be between 0 and 1");
        }
    }
    let (tls, host, port) =
        crate::device::client::parse_mqtt_url(&client.mqtt_url).map_err(anyhow::Error::msg)?;
    let tls_config = if tls {
        let pem = (client.ca_pem.as_deref())
            .ok_or_else(|| anyhow::anyhow!("MQTTS needs the appliance's CA (--ca)"))?;
        Some(crate::device::client::tls_client_config(pem).map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    let devices = fleet(&args);
    if args.register {
        register(&client, &devices).await?;
    }
    let trusted = if args.verify_signatures {
        Some(sim_keyring(&client, &args).await?)
    } else {
        None
    };
    let sh = Arc::new(Shared {
        trusted,
        http: client.http.clone(),
        downloads: match args.slow {
            Some(_) => client.http.clone(),
            None => download_client(client.ca_pem.as_deref())?,
        },
        admin: Some((client.base.clone(), client.token.clone())),
        target: MqttTarget {
            host,
            port,
            tls: tls_config,
        },
        stats: Stats::default(),
        images: Mutex::new(HashMap::new()),
        patches: Mutex::new(HashMap::new()),
        verified_patches: Mutex::new(HashMap::new()),
        connect_gate: Semaphore::new(256),
        start: Instant::now(),
        args,
    });
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (n, ident) in devices.into_iter().enumerate() {
        tasks.spawn(device(sh.clone(), ident, n, stop.clone()));
    }
    let n = sh.args.devices as u64;
    let deadline = sh
        .args
        .timeout
        .map(|t| Instant::now() + Duration::from_secs(t));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_line = Instant::now();
    // `kill` (SIGTERM) ends it like Ctrl-C: the summary is still printed
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let interrupted = loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break true,
            _ = term.recv() => break true,
        }
        let st = &sh.stats;
        if sh.args.summary_every > 0
            && last_line.elapsed() >= Duration::from_secs(sh.args.summary_every)
        {
            last_line = Instant::now();
            eprintln!(
                "sim: connected {}/{n}, downloading {}, completed {}, failed {}, rolled back {}, {:.1} MB, saved by deltas {:.1} MB",
                st.connected.load(Ordering::Relaxed),
                st.downloading.load(Ordering::Relaxed),
                st.completed.load(Ordering::Relaxed),
                st.failed.load(Ordering::Relaxed),
                st.rolled_back.load(Ordering::Relaxed),
                st.bytes.load(Ordering::Relaxed) as f64 / 1e6,
                st.bytes_saved.load(Ordering::Relaxed) as f64 / 1e6,
            );
        }
        let all_done = st.devices_done.load(Ordering::Relaxed) >= n
            && st.downloading.load(Ordering::Relaxed) == 0;
        let quiet = sh.start.elapsed().as_millis() as i64 - st.last_move_ms.load(Ordering::Relaxed)
            >= sh.args.idle_secs as i64 * 1000;
        if sh.args.until_idle && all_done && quiet {
            break false;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break false;
        }
    };
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let st = &sh.stats;
    let finished = st.devices_done.load(Ordering::Relaxed) >= n;
    println!("{}", summary(&sh, finished));
    Ok(if finished && !interrupted { 0 } else { 1 })
}

/// One simulated device: connects, announces, and runs one upgrade at a time.
async fn device(sh: Arc<Shared>, ident: Identity, n: usize, stop: CancellationToken) {
    let permit = sh.connect_gate.acquire().await.ok();
    let client_id = format!("sim-{}-{n}", std::process::id());
    let (link, mut rx) = Link::start(&ident, &sh.target, &client_id, Duration::from_secs(60));
    let mut permit = permit;
    let running = Arc::new(std::sync::Mutex::new(Running {
        version: sh.args.version.clone(),
        rebooting: false,
    }));
    let done_once = Arc::new(AtomicBool::new(false));
    let mut current: Option<(String, CancellationToken, tokio::task::JoinHandle<()>)> = None;
    let mut up = false;
    let get_every = (sh.args.get_interval > 0).then(|| Duration::from_secs(sh.args.get_interval));
    let mut get_timer = tokio::time::interval(get_every.unwrap_or(Duration::from_secs(86400)));
    get_timer.tick().await;
    let telemetry_every =
        (sh.args.telemetry > 0.0).then(|| Duration::from_secs_f64(sh.args.telemetry));
    let mut telemetry_timer =
        tokio::time::interval(telemetry_every.unwrap_or(Duration::from_secs(86400)));
    telemetry_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let telemetry_topic = sh.args.telemetry_topic.replace("{id}", &ident.username());
    let mut seq = 0u64;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            _ = get_timer.tick(), if get_every.is_some() && up => {
                if let Some(m) = firmware_get(&ident) { link.send(m).await; }
                continue;
            }
            _ = telemetry_timer.tick(), if telemetry_every.is_some() && up => {
                seq += 1;
                let version = running.lock().expect("poisoned").version.clone();
                let body = json!({"device": ident.id, "seq": seq, "at": crate::time::now_ms(), "version": version});
                link.send((telemetry_topic.clone(), body.to_string().into_bytes())).await;
                sh.stats.telemetry.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            ev = rx.recv() => match ev { Some(e) => e, None => break },
        };
        match ev {
            LinkEvent::Up => {
                permit.take();
                if !up {
                    up = true;
                    sh.stats.connected.fetch_add(1, Ordering::Relaxed);
                    sh.stats.ever_connected.fetch_add(1, Ordering::Relaxed);
                }
                // a device between "completed" and its reboot says nothing now: it announces
                // the version it runs once it has rebooted
                let (v, rebooting) = {
                    let r = running.lock().expect("poisoned");
                    (r.version.clone(), r.rebooting)
                };
                if !rebooting {
                    link.send(announce(&ident, &v)).await;
                }
                if let Some(m) = firmware_get(&ident) {
                    link.send(m).await;
                }
            }
            LinkEvent::Down(why) => {
                if up {
                    up = false;
                    sh.stats.connected.fetch_sub(1, Ordering::Relaxed);
                }
                tracing::debug!(device = ident.id, why, "disconnected");
            }
            LinkEvent::Dropped(why) => {
                sh.stats.dropped_messages.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = ident.id, why, "message dropped");
            }
            LinkEvent::Command(Command::NothingNewer) => {}
            LinkEvent::Command(Command::Cancel { version }) => {
                if let Some((v, token, _)) = &current
                    && (*v == version || version.is_empty())
                {
                    token.cancel();
                }
            }
            LinkEvent::Command(Command::Upgrade(offer)) => {
                sh.moved();
                if let Some((v, _, h)) = &current
                    && !h.is_finished()
                {
                    if *v == offer.version {
                        continue; // the same command again (re-sent, or get_reply): busy with it
                    }
                    // a newer command (force) replaces the running attempt
                    current.take().expect("some").1.cancel();
                }
                let now = running.lock().expect("poisoned").version.clone();
                if offer.version == now {
                    // already there (e.g. after a reboot the server re-sent): say so
                    link.send(announce(&ident, &now)).await;
                    continue;
                }
                let token = CancellationToken::new();
                let h = tokio::spawn(attempt(
                    sh.clone(),
                    ident.clone(),
                    link.sender(),
                    (*offer).clone(),
                    running.clone(),
                    done_once.clone(),
                    token.clone(),
                ));
                current = Some((offer.version, token, h));
            }
        }
    }
    if up {
        sh.stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
    if let Some((_, t, h)) = current {
        t.cancel();
        let _ = h.await;
    }
}

/// What a simulated device runs.
struct Running {
    version: String,
    /// Between reporting "completed" and having rebooted.
    rebooting: bool,
}

enum End {
    Completed,
    RolledBack,
    Failed,
    Refused,
    Cancelled,
}

async fn attempt(
    sh: Arc<Shared>,
    ident: Identity,
    link: Sender,
    offer: Offer,
    running: Arc<std::sync::Mutex<Running>>,
    done_once: Arc<AtomicBool>,
    token: CancellationToken,
) {
    let st = &sh.stats;
    st.attempts.fetch_add(1, Ordering::Relaxed);
    st.downloading.fetch_add(1, Ordering::Relaxed);
    let end = tokio::select! {
        e = upgrade(&sh, &ident, &link, &offer, &running) => e,
        _ = token.cancelled() => End::Cancelled,
    };
    // a cancelled attempt may have been rebooting
    running.lock().expect("poisoned").rebooting = false;
    st.downloading.fetch_sub(1, Ordering::Relaxed);
    match end {
        End::Completed => st.completed.fetch_add(1, Ordering::Relaxed),
        End::RolledBack => st.rolled_back.fetch_add(1, Ordering::Relaxed),
        End::Failed => st.failed.fetch_add(1, Ordering::Relaxed),
        End::Refused => st.refused.fetch_add(1, Ordering::Relaxed),
        End::Cancelled => st.cancelled.fetch_add(1, Ordering::Relaxed),
    };
    if !done_once.swap(true, Ordering::Relaxed) {
        st.devices_done.fetch_add(1, Ordering::Relaxed);
    }
    sh.moved();
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FaultAt {
    Download,
    Verify,
    Install,
}

async fn upgrade(
    sh: &Shared,
    ident: &Identity,
    link: &Sender,
    offer: &Offer,
    running: &std::sync::Mutex<Running>,
) -> End {
    let args = &sh.args;
    let current = running.lock().expect("poisoned").version.clone();
    if let Some(why) = offer.refused_by(&current) {
        link.send(failure_report(
            ident,
            offer,
            Failure::Refused,
            &why,
            &current,
        ))
        .await;
        return End::Refused;
    }
    let fault = chance(args.fail_rate).then(|| match (uniform(0.0, 3.0)) as u32 {
        0 => FaultAt::Download,
        1 => FaultAt::Verify,
        _ => FaultAt::Install,
    });
    let step = Step {
        sh,
        ident,
        link,
        offer,
        current: &current,
    };
    link.send(stage_report(ident, offer, Stage::Downloading(0), &current))
        .await;
    sh.moved();
    // 1. the delta, when offered for exactly our version; 2. else the full image, resumable
    let patched = fault != Some(FaultAt::Download) && step.delta().await;
    if !patched && let Err(e) = step.full_image(fault == Some(FaultAt::Download)).await {
        let (why, msg) = e.failure();
        return step.fail(why, msg).await;
    }
    // 3. verify (md5, and the signature when the devices check them)
    link.send(stage_report(ident, offer, Stage::Verifying, &current))
        .await;
    if fault == Some(FaultAt::Verify) {
        return step
            .fail(
                Failure::Verify,
                "simulated failure: md5 mismatch after download".into(),
            )
            .await;
    }
    if let Some(keys) = &sh.trusted
        && let Err(why) = check_signature(sh, keys, offer).await
    {
        return step
            .fail(Failure::Verify, format!("signature check failed: {why}"))
            .await;
    }
    // 4. install, reboot, announce what runs
    link.send(stage_report(ident, offer, Stage::Installing, &current))
        .await;
    if fault == Some(FaultAt::Install) {
        return step
            .fail(
                Failure::Install,
                "simulated failure: flash write error".into(),
            )
            .await;
    }
    link.send(stage_report(ident, offer, Stage::Completed, &current))
        .await;
    step.reboot(running).await
}

/// One upgrade attempt of one simulated device.
struct Step<'a> {
    sh: &'a Shared,
    ident: &'a Identity,
    link: &'a Sender,
    offer: &'a Offer,
    current: &'a str,
}

impl Step<'_> {
    /// Reports a failure; the attempt ends.
    async fn fail(&self, why: Failure, msg: String) -> End {
        self.link
            .send(failure_report(
                self.ident,
                self.offer,
                why,
                &msg,
                self.current,
            ))
            .await;
        End::Failed
    }

    /// Tries the offered delta (for exactly the version it runs); true when the patched image
    /// verified, false to fall back to the full image.
    async fn delta(&self) -> bool {
        let (sh, offer) = (self.sh, self.offer);
        let Some(d) = &offer.delta else {
            return false;
        };
        if !self.ident.delta || d.from_version != self.current {
            return false;
        }
        let st = &sh.stats;
        match try_delta(sh, offer, d, self.current).await {
            Ok(()) => {
                st.delta_used.fetch_add(1, Ordering::Relaxed);
                st.bytes.fetch_add(d.size, Ordering::Relaxed);
                st.bytes_delta.fetch_add(d.size, Ordering::Relaxed);
                st.bytes_saved
                    .fetch_add(offer.size.saturating_sub(d.size), Ordering::Relaxed);
                self.link
                    .send(stage_report(
                        self.ident,
                        offer,
                        Stage::Downloading(100),
                        self.current,
                    ))
                    .await;
                true
            }
            Err(why) => {
                st.delta_fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    device = self.ident.id,
                    why,
                    "delta failed; falling back to the full image"
                );
                false
            }
        }
    }

    /// Downloads the full image, resuming with Range (`--drop-rate` cuts it mid-way; `faulty`
    /// fails it part-way the way a broken link does), reporting progress as it goes.
    async fn full_image(&self, faulty: bool) -> Result<(), FetchError> {
        let (sh, offer, link, ident, cur) =
            (self.sh, self.offer, self.link, self.ident, self.current);
        let (args, st) = (&sh.args, &sh.stats);
        let drop_at = chance(args.drop_rate)
            .then(|| ((offer.size as f64) * uniform(0.2, 0.8)) as u64)
            .filter(|&a| a > 0);
        if drop_at.is_some() {
            st.resumes.fetch_add(1, Ordering::Relaxed);
        }
        let opts = fetch::Options {
            max_attempts: 6,
            drop_at,
            rate_limit: args.slow.map(|k| k * 1000),
            timeout: Some(Duration::from_secs(3600)),
        };
        let expect = Expect::of(offer);
        let mut rx = Received::default();
        let mut counted = 0u64;
        let count = |have: u64, _| {
            st.bytes.fetch_add(have - counted, Ordering::Relaxed);
            counted = have;
        };
        let report = |p| async move {
            (link.send(stage_report(ident, offer, Stage::Downloading(p), cur))).await;
            sh.moved();
        };
        let (sink, url) = (&mut fetch::Discard, &offer.url);
        if faulty {
            // download part of it, then fail the way a broken storage or link does
            let at = ((offer.size as f64) * uniform(0.1, 0.9)) as u64;
            let partial = Expect {
                size: at.max(1),
                ..expect.clone()
            };
            let once = fetch::Options {
                max_attempts: 1,
                ..opts
            };
            let _ = fetch::fetch_reporting(
                &sh.downloads,
                url,
                &partial,
                sink,
                &mut rx,
                &once,
                count,
                report,
            )
            .await;
            return Err(FetchError::Download(
                "simulated failure: the connection died and did not come back".into(),
            ));
        }
        fetch::fetch_reporting(
            &sh.downloads,
            url,
            &expect,
            sink,
            &mut rx,
            &opts,
            count,
            report,
        )
        .await?;
        st.bytes_full.fetch_add(offer.size, Ordering::Relaxed);
        Ok(())
    }

    /// Reboots into the new image (or, with `--bad-install-rate`, back into the old one) and
    /// announces the version it runs.
    async fn reboot(&self, running: &std::sync::Mutex<Running>) -> End {
        running.lock().expect("poisoned").rebooting = true;
        tokio::time::sleep(Duration::from_millis(self.sh.args.reboot_ms)).await;
        running.lock().expect("poisoned").rebooting = false;
        if chance(self.sh.args.bad_install_rate) {
            // the new image did not boot: the bootloader went back to the old one
            self.link.send(announce(self.ident, self.current)).await;
            return End::RolledBack;
        }
        running.lock().expect("poisoned").version = self.offer.version.clone();
        self.link
            .send(announce(self.ident, &self.offer.version))
            .await;
        End::Completed
    }
}

/// The keys of `--verify-signatures`: the `--trusted-key`s, else the appliance's.
async fn sim_keyring(client: &Appliance, args: &SimArgs) -> anyhow::Result<crate::trust::Keyring> {
    let mut texts = Vec::new();
    for k in &args.trusted_keys {
        texts.push(crate::trust::key_arg(k)?);
    }
    if texts.is_empty() {
        let v: serde_json::Value = client
            .http
            .get(format!("{}/api/site", client.base))
            .bearer_auth(&client.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        for k in v["data"]["trustedKeys"].as_array().into_iter().flatten() {
            texts.push(k["key"].as_str().unwrap_or("").to_string());
        }
    }
    if texts.is_empty() {
        anyhow::bail!(
            "--verify-signatures: no trusted key (give --trusted-key, or add [trust] keys to the appliance)"
        );
    }
    crate::trust::Keyring::parse_unnamed(&texts).map_err(anyhow::Error::msg)
}

/// A simulated device's signature check: the image it verified by sha256 (the shared copy of
/// that version, same bytes) against the command's signature.
async fn check_signature(
    sh: &Shared,
    keys: &crate::trust::Keyring,
    offer: &Offer,
) -> Result<(), String> {
    let text = offer
        .signature
        .as_ref()
        .ok_or("the command carries no signature")?;
    let img = sh
        .image(&offer.version)
        .await
        .ok_or("the image is not available to check")?;
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&img[..]))
    };
    if offer
        .sha256
        .as_ref()
        .is_some_and(|s| !s.eq_ignore_ascii_case(&sha))
    {
        return Err("the image changed".into());
    }
    let sig = crate::trust::Signature::parse(text).map_err(|e| e.to_string())?;
    let key = keys.signer_of(&sig).map_err(|e| e.to_string())?;
    key.verify_bytes(&sig, &img).map_err(|e| e.to_string())?;
    crate::trust::check_firmware_comment(
        sig.trusted_comment(),
        &sh.args.device_type,
        &offer.version,
        &sha,
    )
    .map_err(|e| e.to_string())
}

/// Downloads the patch, applies it to the shared base image and verifies the result against
/// the full image's md5/sha256.
async fn try_delta(
    sh: &Shared,
    offer: &Offer,
    d: &crate::device::client::DeltaOffer,
    current: &str,
) -> Result<(), String> {
    let base = sh
        .image(current)
        .await
        .ok_or_else(|| format!("no base image of {current} available to the simulator"))?;
    // the first device to fetch a patch hashes it; the others compare their bytes with its
    // (a real fleet's CPUs are its own: the simulator's are the appliance's neighbours)
    let known = sh.verified_patches.lock().await.get(&d.md5).cloned();
    let mut bytes =
        fetch::fetch_patch(&sh.downloads, d, known.as_deref().map(Vec::as_slice)).await?;
    let known = match known {
        Some(k) => k,
        None => {
            let k = Arc::new(bytes.clone());
            sh.verified_patches
                .lock()
                .await
                .insert(d.md5.clone(), k.clone());
            k
        }
    };
    if chance(sh.args.corrupt_delta_rate) && bytes.len() > 40 {
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        bytes[at + 1] ^= 0xff;
    }
    let expect = Expect::of(offer);
    let key = {
        use sha2::Digest;
        let patch = if *known == bytes {
            format!("md5:{}", d.md5)
        } else {
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        (
            current.to_string(),
            patch,
            format!("{}:{}", offer.md5, offer.sha256.clone().unwrap_or_default()),
        )
    };
    let cell = sh.patches.lock().await.entry(key).or_default().clone();
    cell.get_or_init(|| async move {
        tokio::task::spawn_blocking(move || fetch::patched(&base, &bytes, &expect).map(|_| ()))
            .await
            .map_err(|e| e.to_string())?
    })
    .await
    .clone()
}
