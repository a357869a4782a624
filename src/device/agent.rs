//! `hangar agent`: the device-side updater for one application binary on a Linux gateway
//! (SPEC section 1). On a command it downloads with resume (state beside the `.part`, so it
//! also resumes after its own restart), verifies size/md5/sha256, applies a delta when offered
//! (falling back to the full image), keeps `<app>.backup`, swaps the new binary in with an
//! atomic rename on the same filesystem (directory fsynced), restarts the application, runs the
//! health check, and on failure restores the backup, restarts the old version and reports
//! `INSTALL_FAILED` / `-4` followed by the old version.
//!
//! Power-cut safety: the state file (`state.json`, written atomically) says which step was in
//! progress. `app_path` is only ever replaced by `rename`, so it is always either the old or the
//! new binary; the backup is a hard link made before the swap. At start the agent finishes what
//! the state says was interrupted: a swap whose rename happened is health-checked, one whose
//! rename did not is abandoned (the old binary is still there), a health check is re-run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command as Proc};
use tokio::sync::mpsc;

use crate::device::client::{
    Command, Failure, Identity, Link, LinkEvent, MqttTarget, Offer, Stage, announce,
    failure_report, firmware_get, stage_report,
};
use crate::device::fetch::{self, Expect, FetchError, Received};
use crate::protocol::Protocol;

fn default_protocol() -> String {
    "gateway".into()
}
fn default_device_type() -> String {
    "gateway".into()
}
fn default_restart() -> String {
    "supervise".into()
}
fn default_health_secs() -> u64 {
    10
}
fn default_prefix() -> String {
    "hanqi".into()
}
fn default_get_interval() -> u64 {
    3600
}
fn default_true() -> bool {
    true
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/hangar-agent")
}

/// `agent.toml` (SPEC section 1, plus the documented extras at the end).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Device id; Alibaba: `{productKey}/{deviceName}`.
    pub device_id: String,
    /// MQTT password.
    pub secret: String,
    /// `gateway` or `alibaba`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Device type (Alibaba: the productKey).
    #[serde(default = "default_device_type")]
    pub device_type: String,
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub mqtt_url: String,
    /// CA (PEM) trusted for MQTTS and HTTPS; "" = the system's roots.
    #[serde(default)]
    pub ca_file: String,
    /// The binary that is upgraded.
    pub app_path: PathBuf,
    /// The version of `app_path` before the agent's first upgrade.
    pub initial_version: String,
    /// Where the agent keeps its state and downloads.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `supervise`, `exec`, `systemd:UNIT` or `command:SHELL CMD`.
    #[serde(default = "default_restart")]
    pub restart: String,
    /// Optional command; exit 0 = healthy.
    #[serde(default)]
    pub health_command: String,
    /// The new version must stay up (and pass the health command) this long.
    #[serde(default = "default_health_secs")]
    pub health_secs: u64,
    /// Extra: arguments for the application in `supervise` mode.
    #[serde(default)]
    pub app_args: Vec<String>,
    /// Extra: the gateway protocol's topic prefix.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Extra: Alibaba devices ask `firmware/get` at start and every this many seconds (0: start only).
    #[serde(default = "default_get_interval")]
    pub get_interval_secs: u64,
    /// Extra: declare and use bsdiff40 deltas.
    #[serde(default = "default_true")]
    pub delta: bool,
    /// Extra: download speed cap in KB/s for slow or shared links (0 = none).
    #[serde(default)]
    pub max_download_kbps: u64,
    /// minisign public keys whose signatures this device accepts (base64 lines or `.pub`
    /// texts). With keys, a signed image must verify against one of them.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Refuse (VERIFY_FAILED / -3) any image without a valid signature by a trusted key.
    #[serde(default)]
    pub require_signed: bool,
}

/// How the application is restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// The agent runs `app_path` as its child.
    Supervise,
    /// The agent is the application: it re-executes itself.
    Exec,
    /// `systemctl restart UNIT`.
    Systemd(String),
    /// `sh -c CMD`.
    Command(String),
}

impl AgentConfig {
    /// Reads and validates a config file; errors name the key and the reason.
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let c: AgentConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        c.validate()
            .map_err(|(key, why)| anyhow::anyhow!("{}: key `{key}`: {why}", path.display()))?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let p = Protocol::parse(&self.protocol)
            .ok_or(("protocol", "must be \"gateway\" or \"alibaba\"".to_string()))?;
        if !crate::ids::valid_device_id(&self.device_id)
            || (p == Protocol::Alibaba) != self.device_id.contains('/')
        {
            return Err((
                "device_id",
                "not a valid id (Alibaba devices: productKey/deviceName)".into(),
            ));
        }
        if !crate::ids::valid_device_type(&self.device_type) {
            return Err(("device_type", "not a valid device type".into()));
        }
        crate::device::client::parse_mqtt_url(&self.mqtt_url).map_err(|e| ("mqtt_url", e))?;
        if !crate::ids::valid_version(&self.initial_version) {
            return Err(("initial_version", "not a valid version".into()));
        }
        if self.app_path.file_name().is_none() || !self.app_path.is_absolute() {
            return Err(("app_path", "must be an absolute path to a file".into()));
        }
        self.restart_mode().map_err(|e| ("restart", e))?;
        if self.health_secs > 3600 {
            return Err(("health_secs", "at most 3600".into()));
        }
        Ok(())
    }

    /// The parsed `restart`.
    pub fn restart_mode(&self) -> Result<Restart, String> {
        match self.restart.as_str() {
            "supervise" => Ok(Restart::Supervise),
            "exec" => Ok(Restart::Exec),
            r => {
                if let Some(u) = r.strip_prefix("systemd:")
                    && !u.is_empty()
                {
                    Ok(Restart::Systemd(u.to_string()))
                } else if let Some(c) = r.strip_prefix("command:")
                    && !c.trim().is_empty()
                {
                    Ok(Restart::Command(c.to_string()))
                } else {
                    Err(format!(
                        "{r:?} is not supervise, exec, systemd:UNIT or command:CMD"
                    ))
                }
            }
        }
    }
}

/// What the agent was doing, persisted in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// Nothing in progress.
    Idle,
    /// The new binary is being put in place (rename may or may not have happened).
    Swapping {
        /// The upgrade.
        target: Target,
    },
    /// The new binary is in place and being health-checked.
    Checking {
        /// The upgrade.
        target: Target,
        /// How many times the agent started in this phase (exec mode: boots of the new binary).
        boots: u32,
    },
}

/// The upgrade being installed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    /// Target version.
    pub version: String,
    /// Version before it.
    pub from_version: String,
    /// sha256 of the new binary.
    pub sha256: String,
    /// md5 of the new binary.
    pub md5: String,
    /// Size.
    pub size: u64,
    /// Gateway protocol msgId.
    pub msg_id: Option<String>,
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// Format version.
    pub schema: u32,
    /// The version `app_path` holds when idle.
    pub running_version: String,
    /// The step in progress.
    #[serde(flatten)]
    pub phase: Phase,
    /// Reports (topic, payload) still to send, e.g. a rollback's failure when the agent
    /// re-executed the old binary before it could send them.
    #[serde(default)]
    pub pending: Vec<(String, String)>,
}

/// The resumable download's bookkeeping, beside `download.part`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct PartMeta {
    version: String,
    md5: String,
    size: u64,
    etag: Option<String>,
    /// The command being downloaded, so a restarted agent carries on by itself.
    #[serde(default)]
    offer: Option<SavedOffer>,
}

/// A full-image command as saved beside the `.part`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct SavedOffer {
    url: String,
    sha256: Option<String>,
    force: bool,
    msg_id: Option<String>,
    #[serde(default)]
    signature: Option<String>,
}

struct Paths {
    state: PathBuf,
    part: PathBuf,
    part_meta: PathBuf,
    patched: PathBuf,
    new: PathBuf,
    backup: PathBuf,
    restore: PathBuf,
}

impl Paths {
    fn new(c: &AgentConfig) -> Paths {
        let name = c
            .app_path
            .file_name()
            .expect("validated")
            .to_string_lossy()
            .into_owned();
        let dir = c.app_path.parent().expect("absolute").to_path_buf();
        Paths {
            state: c.state_dir.join("state.json"),
            part: c.state_dir.join("download.part"),
            part_meta: c.state_dir.join("download.json"),
            patched: c.state_dir.join("patched.bin"),
            new: dir.join(format!(".{name}.new")),
            backup: dir.join(format!("{name}.backup")),
            restore: dir.join(format!(".{name}.restore")),
        }
    }
}

fn fsync_dir(p: &Path) -> std::io::Result<()> {
    std::fs::File::open(p.parent().unwrap_or(Path::new("/")))?.sync_all()
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?;
    crate::bsdiff::write_atomically(path, |w| {
        use std::io::Write;
        w.write_all(&bytes)?;
        Ok(bytes.len() as u64)
    })
    .map(|_| ())
}

fn sha256_file(p: &Path) -> std::io::Result<(String, String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut rx = Received::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        rx.feed(&buf[..n]);
    }
    let (md5, sha) = rx.digests();
    Ok((sha, md5, rx.have))
}

/// A `.part` file on disk: appended, fsynced at checkpoints, with its metadata beside it.
struct PartFile {
    file: std::fs::File,
    meta_path: PathBuf,
    meta: PartMeta,
}

impl fetch::Sink for PartFile {
    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.file.write_all(b)
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        use std::io::Seek;
        self.file.seek(std::io::SeekFrom::Start(0))?;
        Ok(())
    }
    fn checkpoint(&mut self, etag: Option<&str>) -> std::io::Result<()> {
        self.file.sync_data()?;
        if self.meta.etag.as_deref() != etag {
            self.meta.etag = etag.map(str::to_string);
            write_json(&self.meta_path, &self.meta)?;
        }
        Ok(())
    }
}

/// The supervised application (restart = supervise).
struct Supervisor {
    child: Option<Child>,
    path: PathBuf,
    args: Vec<String>,
    started: Instant,
}

impl Supervisor {
    fn start(&mut self) -> std::io::Result<()> {
        let mut cmd = Proc::new(&self.path);
        cmd.args(&self.args).stdin(Stdio::null()).kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the child
        // when the agent dies, so a killed agent does not leave a second copy running.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn()?);
        self.started = Instant::now();
        tracing::info!(app = %self.path.display(), "application started");
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }

    fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// The agent.
pub struct Agent {
    cfg: AgentConfig,
    ident: Identity,
    paths: Paths,
    restart: Restart,
    http: reqwest::Client,
    target: MqttTarget,
    state: State,
    sup: Supervisor,
    trusted: crate::trust::Keyring,
}

/// Why an upgrade attempt ended without the new version running.
struct AttemptError(Failure, String);

impl Agent {
    /// Loads the config and state, and recovers from an interrupted upgrade.
    pub fn new(cfg: AgentConfig) -> anyhow::Result<Agent> {
        let restart = cfg.restart_mode().map_err(anyhow::Error::msg)?;
        let protocol = Protocol::parse(&cfg.protocol).expect("validated");
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", cfg.state_dir.display()))?;
        let (tls, host, port) =
            crate::device::client::parse_mqtt_url(&cfg.mqtt_url).map_err(anyhow::Error::msg)?;
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60));
        let mut tls_config = None;
        if !cfg.ca_file.is_empty() {
            let pem = std::fs::read(&cfg.ca_file)
                .map_err(|e| anyhow::anyhow!("ca_file {}: {e}", cfg.ca_file))?;
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
            if tls {
                tls_config = Some(
                    crate::device::client::tls_client_config(&pem).map_err(anyhow::Error::msg)?,
                );
            }
        } else if tls {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_native_roots()? {
                let _ = roots.add(c);
            }
            tls_config = Some(Arc::new(
                rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ));
        }
        let trusted = crate::trust::Keyring::parse_unnamed(&cfg.trusted_keys)
            .map_err(|e| anyhow::anyhow!("trusted_keys: {e}"))?;
        if cfg.require_signed && trusted.is_empty() {
            anyhow::bail!("require_signed = true needs at least one key in trusted_keys");
        }
        let paths = Paths::new(&cfg);
        let state = match std::fs::read(&paths.state) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{}: {e}", paths.state.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                schema: 1,
                running_version: cfg.initial_version.clone(),
                phase: Phase::Idle,
                pending: vec![],
            },
            Err(e) => anyhow::bail!("{}: {e}", paths.state.display()),
        };
        let ident = Identity {
            id: cfg.device_id.clone(),
            secret: cfg.secret.clone(),
            protocol,
            device_type: cfg.device_type.clone(),
            prefix: cfg.topic_prefix.clone(),
            delta: cfg.delta,
        };
        Ok(Agent {
            sup: Supervisor {
                child: None,
                path: cfg.app_path.clone(),
                args: cfg.app_args.clone(),
                started: Instant::now(),
            },
            target: MqttTarget {
                host,
                port,
                tls: tls_config,
            },
            http: http.build()?,
            ident,
            paths,
            restart,
            state,
            cfg,
            trusted,
        })
    }

    /// The persisted state.
    pub fn state(&self) -> &State {
        &self.state
    }

    fn save(&self) -> std::io::Result<()> {
        write_json(&self.paths.state, &self.state)
    }

    /// Runs until SIGTERM/SIGINT.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let (link, mut rx) = Link::start(
            &self.ident,
            &self.target,
            &format!("agent-{}", self.ident.username()),
            Duration::from_secs(60),
        );
        // reports made before the link is up are queued by the MQTT client
        let pending = self.recover(&link).await?;
        if self.restart == Restart::Supervise && !self.sup.alive() {
            self.sup.start()?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let get_every = Duration::from_secs(self.cfg.get_interval_secs.max(1));
        let mut get_timer = tokio::time::interval(get_every);
        get_timer.tick().await;
        let mut watch = tokio::time::interval(Duration::from_secs(1));
        let mut up = false;
        let mut backlog = pending;
        let mut interrupted = self.interrupted_download();
        loop {
            let ev = tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = watch.tick() => {
                    if self.restart == Restart::Supervise && !self.sup.alive() {
                        tracing::warn!("the application exited; restarting it");
                        self.sup.child = None;
                        if let Err(e) = self.sup.start() {
                            tracing::error!(error = %e, "cannot start the application");
                        }
                    }
                    continue;
                }
                _ = get_timer.tick(), if up && self.cfg.get_interval_secs > 0 => {
                    if let Some(m) = firmware_get(&self.ident) { link.send(m).await; }
                    continue;
                }
                ev = rx.recv() => match ev { Some(e) => e, None => break },
            };
            match ev {
                LinkEvent::Up => {
                    up = true;
                    for m in backlog.drain(..) {
                        link.send(m).await;
                    }
                    link.send(announce(&self.ident, &self.state.running_version))
                        .await;
                    if let Some(m) = firmware_get(&self.ident) {
                        link.send(m).await;
                    }
                    if let Some(offer) = interrupted.take() {
                        tracing::info!(
                            version = offer.version,
                            "continuing the download a previous run started"
                        );
                        up = self
                            .upgrade_draining(&link, &mut rx, offer)
                            .await
                            .unwrap_or(up);
                    }
                }
                LinkEvent::Down(why) => {
                    up = false;
                    tracing::warn!(why, "MQTT connection lost; reconnecting");
                }
                LinkEvent::Dropped(why) => tracing::warn!(why, "message dropped"),
                LinkEvent::Command(Command::NothingNewer | Command::Cancel { .. }) => {}
                LinkEvent::Command(Command::Upgrade(offer)) => {
                    interrupted = None;
                    up = self
                        .upgrade_draining(&link, &mut rx, *offer)
                        .await
                        .unwrap_or(up);
                }
            }
        }
        if self.restart == Restart::Supervise {
            self.sup.stop().await;
        }
        Ok(())
    }

    /// The download a previous run was in the middle of (its `.part` and command are on disk).
    fn interrupted_download(&self) -> Option<Offer> {
        if self.state.phase != Phase::Idle {
            return None;
        }
        let meta: PartMeta =
            serde_json::from_slice(&std::fs::read(&self.paths.part_meta).ok()?).ok()?;
        let saved = meta.offer?;
        (meta.version != self.state.running_version).then_some(Offer {
            version: meta.version,
            url: saved.url,
            size: meta.size,
            md5: meta.md5,
            sha256: saved.sha256,
            force: saved.force,
            msg_id: saved.msg_id,
            delta: None,
            signature: saved.signature,
        })
    }

    /// After a reported failure the next start must not carry on by itself (the `.part` stays for
    /// a resume when the command comes again).
    fn forget_interrupted(&self) {
        if let Ok(b) = std::fs::read(&self.paths.part_meta)
            && let Ok(mut m) = serde_json::from_slice::<PartMeta>(&b)
            && m.offer.is_some()
        {
            m.offer = None;
            let _ = write_json(&self.paths.part_meta, &m);
        }
    }

    /// Runs one upgrade while still reading the link, so the MQTT session stays alive through a
    /// long download; commands arriving meanwhile are ignored. Returns the last link state seen.
    async fn upgrade_draining(
        &mut self,
        link: &Link,
        rx: &mut mpsc::Receiver<LinkEvent>,
        offer: Offer,
    ) -> Option<bool> {
        let ident = self.ident.clone();
        let version = self.state.running_version.clone();
        let mut up = None;
        let fut = self.upgrade(link, offer);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                _ = &mut fut => break,
                ev = rx.recv() => match ev {
                    Some(LinkEvent::Up) => {
                        up = Some(true);
                        link.send(announce(&ident, &version)).await;
                    }
                    Some(LinkEvent::Down(why)) => {
                        up = Some(false);
                        tracing::warn!(why, "MQTT connection lost during the upgrade");
                    }
                    Some(LinkEvent::Command(c)) => {
                        tracing::info!(?c, "command during an upgrade: ignored");
                    }
                    Some(LinkEvent::Dropped(why)) => tracing::warn!(why, "message dropped"),
                    None => {}
                }
            }
        }
        up
    }

    /// Finishes what a previous run left in progress; returns reports to send.
    async fn recover(
        &mut self,
        _link: &Link,
    ) -> anyhow::Result<Vec<crate::device::client::Outgoing>> {
        let mut out: Vec<crate::device::client::Outgoing> = std::mem::take(&mut self.state.pending)
            .into_iter()
            .map(|(t, p)| (t, p.into_bytes()))
            .collect();
        if !out.is_empty() {
            self.save()?;
        }
        let _ = std::fs::remove_file(&self.paths.new);
        let _ = std::fs::remove_file(&self.paths.restore);
        if !self.cfg.app_path.exists() && self.paths.backup.exists() {
            tracing::warn!("the application binary is missing; restoring the backup");
            self.restore_backup()?;
        }
        match self.state.phase.clone() {
            Phase::Idle => {}
            Phase::Swapping { target } => {
                let (sha, _, _) = sha256_file(&self.cfg.app_path)?;
                if sha.eq_ignore_ascii_case(&target.sha256) {
                    tracing::info!(
                        version = target.version,
                        "resuming after a swap: checking the new version"
                    );
                    self.state.phase = Phase::Checking { target, boots: 0 };
                    self.save()?;
                    out.extend(self.check_new().await?);
                    return Ok(out);
                }
                tracing::warn!(
                    version = target.version,
                    "the swap was interrupted before the rename: the old version stays"
                );
                self.state.phase = Phase::Idle;
                self.save()?;
                out.push(failure_report(
                    &self.ident,
                    &offer_of(&target),
                    Failure::Install,
                    "the install was interrupted (power cut or agent killed) before the swap",
                    &self.state.running_version,
                ));
            }
            Phase::Checking { target, boots } => {
                tracing::info!(
                    version = target.version,
                    "resuming an interrupted health check"
                );
                self.state.phase = Phase::Checking {
                    target,
                    boots: boots + 1,
                };
                self.save()?;
                out.extend(self.check_new().await?);
                return Ok(out);
            }
        }
        Ok(out)
    }

    /// Restarts into the new version (already at app_path), health-checks it, and completes or
    /// rolls back. Returns the reports to send.
    async fn check_new(&mut self) -> anyhow::Result<Vec<crate::device::client::Outgoing>> {
        let Phase::Checking { target, boots } = self.state.phase.clone() else {
            return Ok(vec![]);
        };
        let offer = offer_of(&target);
        let healthy = if self.restart == Restart::Exec && boots > 2 {
            Err("the new version did not stay up across restarts".to_string())
        } else {
            self.restart_and_check(boots).await
        };
        match healthy {
            Ok(()) => {
                self.state.running_version = target.version.clone();
                self.state.phase = Phase::Idle;
                self.save()?;
                let _ = std::fs::remove_file(&self.paths.part);
                let _ = std::fs::remove_file(&self.paths.part_meta);
                let _ = std::fs::remove_file(&self.paths.patched);
                tracing::info!(version = target.version, "upgrade completed");
                let mut out = Vec::new();
                if self.ident.protocol == Protocol::Gateway {
                    out.push(stage_report(
                        &self.ident,
                        &offer,
                        Stage::Completed,
                        &target.version,
                    ));
                }
                out.push(announce(&self.ident, &target.version));
                Ok(out)
            }
            Err(why) => {
                tracing::error!(
                    version = target.version,
                    why,
                    "the new version is not healthy: rolling back"
                );
                self.restore_backup()?;
                let reports = vec![
                    failure_report(
                        &self.ident,
                        &offer,
                        Failure::Install,
                        &format!("rolled back: {why}"),
                        &target.from_version,
                    ),
                    announce(&self.ident, &target.from_version),
                ];
                self.state.running_version = target.from_version.clone();
                self.state.phase = Phase::Idle;
                if self.restart == Restart::Exec {
                    // become the old binary again; it sends the reports when it connects
                    self.state.pending = reports
                        .iter()
                        .map(|(t, p)| (t.clone(), String::from_utf8_lossy(p).into_owned()))
                        .collect();
                    self.save()?;
                    let err = exec_self(&self.cfg.app_path);
                    tracing::error!(error = %err, "cannot execute the restored binary");
                    self.state.pending.clear();
                }
                self.save()?;
                if let Err(e) = self.restart_app().await {
                    tracing::error!(error = e, "restarting the old version failed");
                }
                Ok(reports)
            }
        }
    }

    fn restore_backup(&self) -> std::io::Result<()> {
        let _ = std::fs::remove_file(&self.paths.restore);
        std::fs::hard_link(&self.paths.backup, &self.paths.restore)
            .or_else(|_| std::fs::copy(&self.paths.backup, &self.paths.restore).map(|_| ()))?;
        std::fs::File::open(&self.paths.restore)?.sync_all()?;
        std::fs::rename(&self.paths.restore, &self.cfg.app_path)?;
        fsync_dir(&self.cfg.app_path)
    }

    async fn restart_app(&mut self) -> Result<(), String> {
        match &self.restart {
            Restart::Supervise => {
                self.sup.stop().await;
                self.sup.start().map_err(|e| e.to_string())
            }
            Restart::Exec => Ok(()), // handled by the caller (re-exec)
            Restart::Systemd(unit) => run_shell(&format!("systemctl restart {unit}")).await,
            Restart::Command(c) => run_shell(c).await,
        }
    }

    async fn restart_and_check(&mut self, boots: u32) -> Result<(), String> {
        if self.restart == Restart::Exec && boots == 0 {
            // The agent is the application: become the new binary. The new process finds
            // the Checking phase and runs the health check (boots counts its starts).
            self.state.phase = match self.state.phase.clone() {
                Phase::Checking { target, .. } => Phase::Checking { target, boots: 1 },
                p => p,
            };
            self.save().map_err(|e| e.to_string())?;
            let err = exec_self(&self.cfg.app_path);
            return Err(format!("cannot execute the new binary: {err}"));
        }
        self.restart_app().await?;
        let deadline = Instant::now() + Duration::from_secs(self.cfg.health_secs);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match &self.restart {
                Restart::Supervise if !self.sup.alive() => {
                    return Err(format!(
                        "the application exited {:.1} s after start",
                        self.sup.started.elapsed().as_secs_f64()
                    ));
                }
                Restart::Systemd(unit)
                    if run_shell(&format!("systemctl is-active --quiet {unit}"))
                        .await
                        .is_err() =>
                {
                    return Err(format!("unit {unit} is not active"));
                }
                _ => {}
            }
        }
        if !self.cfg.health_command.trim().is_empty() {
            run_shell(&self.cfg.health_command)
                .await
                .map_err(|e| format!("health command: {e}"))?;
        }
        Ok(())
    }

    /// One upgrade, start to end. Commands arriving meanwhile are answered by the same run
    /// (duplicates) or wait.
    async fn upgrade(&mut self, link: &Link, offer: Offer) {
        let current = self.state.running_version.clone();
        if offer.version == current {
            link.send(announce(&self.ident, &current)).await;
            return;
        }
        if let Some(why) = offer.refused_by(&current) {
            link.send(failure_report(
                &self.ident,
                &offer,
                Failure::Refused,
                &why,
                &current,
            ))
            .await;
            return;
        }
        if offer.sha256.is_none() && offer.md5.len() != 32 {
            link.send(failure_report(
                &self.ident,
                &offer,
                Failure::Verify,
                "the command carries no usable hash",
                &current,
            ))
            .await;
            return;
        }
        match self.obtain(link, &offer, &current).await {
            Ok(image) => {
                link.send(stage_report(
                    &self.ident,
                    &offer,
                    Stage::Verifying,
                    &current,
                ))
                .await;
                link.send(stage_report(
                    &self.ident,
                    &offer,
                    Stage::Installing,
                    &current,
                ))
                .await;
                match self.install(&offer, &current, &image).await {
                    Ok(reports) => {
                        for m in reports {
                            link.send(m).await;
                        }
                    }
                    Err(AttemptError(f, why)) => {
                        self.forget_interrupted();
                        tracing::error!(why, "install failed");
                        link.send(failure_report(&self.ident, &offer, f, &why, &current))
                            .await;
                        link.send(announce(&self.ident, &current)).await;
                    }
                }
            }
            Err(AttemptError(f, why)) => {
                self.forget_interrupted();
                tracing::error!(why, "upgrade to {} failed", offer.version);
                link.send(failure_report(&self.ident, &offer, f, &why, &current))
                    .await;
            }
        }
    }

    /// Gets the verified new image onto local disk: the delta when it applies, else the full
    /// image (resumable). Returns its path.
    async fn obtain(
        &mut self,
        link: &Link,
        offer: &Offer,
        current: &str,
    ) -> Result<PathBuf, AttemptError> {
        link.send(stage_report(
            &self.ident,
            offer,
            Stage::Downloading(0),
            current,
        ))
        .await;
        if let Some(d) = &offer.delta
            && self.cfg.delta
            && d.from_version == current
        {
            match self.try_delta(offer, d).await {
                Ok(p) => return Ok(p),
                Err(why) => tracing::warn!(why, "delta failed; downloading the full image"),
            }
        }
        // resume a previous .part of the same image, else start a new one
        let meta = PartMeta {
            version: offer.version.clone(),
            md5: offer.md5.to_ascii_lowercase(),
            size: offer.size,
            etag: None,
            offer: Some(SavedOffer {
                url: offer.url.clone(),
                sha256: offer.sha256.clone(),
                force: offer.force,
                msg_id: offer.msg_id.clone(),
                signature: offer.signature.clone(),
            }),
        };
        let old_meta: Option<PartMeta> = std::fs::read(&self.paths.part_meta)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut rx = Received::default();
        let resumable = old_meta
            .as_ref()
            .is_some_and(|m| m.version == meta.version && m.md5 == meta.md5 && m.size == meta.size);
        let io = |e: std::io::Error| AttemptError(Failure::Install, format!("local storage: {e}"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.paths.part)
            .map_err(io)?;
        let meta = if resumable {
            let m = old_meta.expect("checked");
            // hash what is already there (bounded by the announced size)
            use std::io::Read;
            let mut f = std::fs::File::open(&self.paths.part).map_err(io)?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                rx.feed(&buf[..n]);
            }
            rx.etag = m.etag.clone();
            if rx.have > 0 {
                tracing::info!(bytes = rx.have, "resuming the download after a restart");
            }
            m
        } else {
            file.set_len(0).map_err(io)?;
            write_json(&self.paths.part_meta, &meta).map_err(io)?;
            meta
        };
        let mut sink = PartFile {
            file,
            meta_path: self.paths.part_meta.clone(),
            meta,
        };
        let opts = fetch::Options {
            max_attempts: 8,
            timeout: Some(Duration::from_secs(6 * 3600)),
            rate_limit: (self.cfg.max_download_kbps > 0)
                .then_some(self.cfg.max_download_kbps * 1000),
            ..Default::default()
        };
        let (sender, ident) = (&link.sender(), &self.ident);
        let r = fetch::fetch_reporting(
            &self.http,
            &offer.url,
            &Expect::of(offer),
            &mut sink,
            &mut rx,
            &opts,
            |_, _| {},
            |p| async move {
                (sender.send(stage_report(ident, offer, Stage::Downloading(p), current))).await
            },
        )
        .await;
        match r {
            Ok(()) => Ok(self.paths.part.clone()),
            Err(e) => {
                if matches!(e, FetchError::Verify(_)) {
                    // a bad file is not worth resuming
                    let _ = std::fs::remove_file(&self.paths.part);
                    let _ = std::fs::remove_file(&self.paths.part_meta);
                }
                let (why, msg) = e.failure();
                Err(AttemptError(why, msg))
            }
        }
    }

    /// The delta: downloaded, applied to the running binary, verified, written beside it.
    async fn try_delta(
        &self,
        offer: &Offer,
        d: &crate::device::client::DeltaOffer,
    ) -> Result<PathBuf, String> {
        let patch = fetch::fetch_patch(&self.http, d, None).await?;
        let (app, out, full) = (
            self.cfg.app_path.clone(),
            self.paths.patched.clone(),
            Expect::of(offer),
        );
        tokio::task::spawn_blocking(move || {
            let old = std::fs::read(&app).map_err(|e| format!("reading {}: {e}", app.display()))?;
            let img = fetch::patched(&old, &patch, &full)?;
            crate::bsdiff::write_atomically(&out, |w| {
                use std::io::Write;
                w.write_all(&img)?;
                Ok(img.len() as u64)
            })
            .map_err(|e| e.to_string())?;
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Backup, swap, restart, health check; returns the reports to send.
    async fn install(
        &mut self,
        offer: &Offer,
        current: &str,
        image: &Path,
    ) -> Result<Vec<crate::device::client::Outgoing>, AttemptError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| AttemptError(Failure::Install, format!("{what}: {e}"))
        };
        let (sha, md5, size) = sha256_file(image).map_err(io("re-reading the image"))?;
        if size != offer.size
            || offer
                .sha256
                .as_ref()
                .is_some_and(|s| !s.eq_ignore_ascii_case(&sha))
        {
            return Err(AttemptError(
                Failure::Verify,
                "the image changed on disk after verification".into(),
            ));
        }
        // the signature is the vendor's word on the full image (a patched one too)
        match offer.check_signature(
            &self.trusted,
            self.cfg.require_signed,
            &self.cfg.device_type,
            image,
            &sha,
        ) {
            Ok(Some(signer)) => tracing::info!(signer, "signature verified"),
            Ok(None) => {}
            Err(why) => {
                let _ = std::fs::remove_file(image);
                return Err(AttemptError(
                    Failure::Verify,
                    format!("signature check failed: {why}"),
                ));
            }
        }
        // the new binary, beside the old one (same filesystem), with the old one's mode
        let mode = std::fs::metadata(&self.cfg.app_path)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
            .unwrap_or(0o755);
        std::fs::copy(image, &self.paths.new).map_err(io("copying the new binary"))?;
        std::fs::set_permissions(
            &self.paths.new,
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .map_err(io("setting its mode"))?;
        std::fs::File::open(&self.paths.new)
            .and_then(|f| f.sync_all())
            .map_err(io("fsync of the new binary"))?;
        // the backup: a hard link to the old binary (atomic; a copy where links fail)
        let tmp_backup = self.paths.backup.with_extension("backup.tmp");
        let _ = std::fs::remove_file(&tmp_backup);
        std::fs::hard_link(&self.cfg.app_path, &tmp_backup)
            .or_else(|_| std::fs::copy(&self.cfg.app_path, &tmp_backup).map(|_| ()))
            .map_err(io("making the backup"))?;
        std::fs::rename(&tmp_backup, &self.paths.backup).map_err(io("placing the backup"))?;
        fsync_dir(&self.cfg.app_path).map_err(io("fsync of the app directory"))?;
        let target = Target {
            version: offer.version.clone(),
            from_version: current.to_string(),
            sha256: sha,
            md5,
            size,
            msg_id: offer.msg_id.clone(),
        };
        self.state.phase = Phase::Swapping {
            target: target.clone(),
        };
        self.save().map_err(io("saving the state"))?;
        std::fs::rename(&self.paths.new, &self.cfg.app_path).map_err(io("swapping the binary"))?;
        fsync_dir(&self.cfg.app_path).map_err(io("fsync of the app directory"))?;
        self.state.phase = Phase::Checking { target, boots: 0 };
        self.save().map_err(io("saving the state"))?;
        tracing::info!(
            version = offer.version,
            "new binary in place; restarting and checking"
        );
        self.check_new()
            .await
            .map_err(|e| AttemptError(Failure::Install, e.to_string()))
    }
}

fn offer_of(t: &Target) -> Offer {
    Offer {
        version: t.version.clone(),
        url: String::new(),
        size: t.size,
        md5: t.md5.clone(),
        sha256: Some(t.sha256.clone()),
        force: false,
        msg_id: t.msg_id.clone(),
        delta: None,
        signature: None,
    }
}

async fn run_shell(cmd: &str) -> Result<(), String> {
    let out = Proc::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Replaces this process with `path`, same arguments. Returns only on failure.
fn exec_self(path: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::Command::new(path).args(args).exec()
}

fn rustls_native_roots() -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    for p in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ] {
        if let Ok(b) = std::fs::read(p) {
            return Ok(rustls_pki_types::CertificateDer::pem_slice_iter(&b)
                .filter_map(Result::ok)
                .map(|c| c.into_owned())
                .collect());
        }
    }
    anyhow::bail!("ca_file is empty and no system CA bundle was found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_key() {
        let ok = r#"device_id = "GW7"
secret = "s"
mqtt_url = "mqtts://hangar.local:8883"
app_path = "/opt/app/bin/app"
initial_version = "1.0.0"
"#;
        let c: AgentConfig = toml::from_str(ok).unwrap();
        c.validate().unwrap();
        assert_eq!(c.restart_mode().unwrap(), Restart::Supervise);
        for (bad, key) in [
            ("protocol = \"coap\"", "protocol"),
            ("restart = \"reboot\"", "restart"),
            ("restart = \"systemd:\"", "restart"),
        ] {
            let c: AgentConfig = toml::from_str(&format!("{ok}{bad}\n")).unwrap();
            assert_eq!(c.validate().unwrap_err().0, key, "{bad}");
        }
        let c: AgentConfig = toml::from_str(&ok.replace("GW7", "pk/dn")).unwrap();
        assert_eq!(c.validate().unwrap_err().0, "device_id");
        assert!(toml::from_str::<AgentConfig>(&format!("{ok}colour = 1\n")).is_err());
    }

    #[test]
    fn the_example_config_is_valid() {
        let c: AgentConfig =
            toml::from_str(include_str!("../../config/agent.toml")).expect("example parses");
        c.validate().expect("example validates");
    }

    #[test]
    fn state_round_trips() {
        let s = State {
            schema: 1,
            running_version: "1.0.0".into(),
            phase: Phase::Checking {
                target: Target {
                    version: "1.0.1".into(),
                    from_version: "1.0.0".into(),
                    sha256: "a".into(),
                    md5: "b".into(),
                    size: 3,
                    msg_id: None,
                },
                boots: 1,
            },
            pending: vec![],
        };
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"phase\":\"checking\""), "{j}");
        assert_eq!(serde_json::from_str::<State>(&j).unwrap(), s);
    }
}
