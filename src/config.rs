//! The one configuration struct of the appliance: serde defaults, validation with file/key/reason,
//! and the rules for finding the config file and the data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where `hangar serve` looks for a config file when `--config` is not given.
pub const SYSTEM_CONFIG: &str = "/etc/hangar/hangar.toml";

/// The documented default configuration; `hangar config default` prints it.
pub const DEFAULT_TOML: &str = include_str!("../config/hangar.toml");

/// A configuration that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    /// The file the value came from (or "<defaults>").
    pub file: String,
    /// The dotted key, e.g. `http.listen`.
    pub key: String,
    /// What is wrong and what to do about it.
    pub reason: String,
}

/// A listen address: `IP:port` (port 0 = any free port), or `""` where a listener may be off.
/// Parsed when the config is read: a bad address is refused with its key, never at bind time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Listen(Option<SocketAddr>);

impl Listen {
    /// No listener.
    pub const OFF: Listen = Listen(None);

    /// A listener on `addr`.
    pub fn at(addr: SocketAddr) -> Listen {
        Listen(Some(addr))
    }

    /// Any free port on 127.0.0.1 (tests, tools).
    pub fn loopback_any_port() -> Listen {
        Listen::at(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The address, unless the listener is off.
    pub fn addr(self) -> Option<SocketAddr> {
        self.0
    }

    /// Whether this is a fixed port (not off, not port 0).
    fn fixed(self) -> bool {
        self.0.is_some_and(|a| a.port() != 0)
    }
}

/// A listen address that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP:port address (e.g. \"0.0.0.0:8443\"; port 0 = any free port)")]
pub struct ListenError(pub String);

impl std::str::FromStr for Listen {
    type Err = ListenError;
    fn from_str(s: &str) -> Result<Listen, ListenError> {
        if s.is_empty() {
            return Ok(Listen::OFF);
        }
        s.parse()
            .map(Listen::at)
            .map_err(|_| ListenError(s.to_string()))
    }
}

impl TryFrom<String> for Listen {
    type Error = ListenError;
    fn try_from(s: String) -> Result<Listen, ListenError> {
        s.parse()
    }
}

impl From<Listen> for String {
    fn from(l: Listen) -> String {
        l.to_string()
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => Ok(()),
        }
    }
}

/// Which broker carries MQTT traffic (`mqtt.engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttEngine {
    /// The built-in broker: OTA and the site's general traffic, one socket per client.
    #[default]
    Direct,
    /// Removed (the embedded rumqttd): refused at start with the reason.
    Rumqttd,
    /// The site's own broker carries the devices; Hangar is its client (`[mqtt.external]`).
    External,
}

/// `[mqtt.external] sync`: who keeps the external broker's device accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AccountSync {
    /// Nobody here: the broker asks Hangar's hooks (EMQX, VerneMQ) or the site manages them.
    #[default]
    #[serde(rename = "")]
    None,
    /// mosquitto 2's dynamic-security plugin, through `$CONTROL/dynamic-security/v1`.
    #[serde(rename = "mosquitto-dynsec")]
    MosquittoDynsec,
}

/// `[mqtt.external]`: the site's broker Hangar is a client of (`mqtt.engine = "external"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// Hangar's client id (its persistent session on the broker).
    pub client_id: String,
    /// Hangar's user name on the broker ("" = none).
    pub username: String,
    /// File whose first line is Hangar's password ("" = none).
    pub password_file: String,
    /// PEM file of the CA that signs the broker's certificate (mqtts://).
    pub ca_file: String,
    /// `$share/<group>/` in front of Hangar's subscriptions ("" = none).
    pub share_group: String,
    /// Who keeps the broker's device accounts.
    pub sync: AccountSync,
}

impl Default for ExternalConfig {
    fn default() -> Self {
        ExternalConfig {
            url: String::new(),
            client_id: "hangar".into(),
            username: String::new(),
            password_file: String::new(),
            ca_file: String::new(),
            share_group: String::new(),
            sync: AccountSync::None,
        }
    }
}

impl ExternalConfig {
    /// (TLS, host, port) of `url`.
    pub fn endpoint(&self) -> Result<(bool, String, u16), String> {
        let (tls, host, port) = crate::net::parse_mqtt_url(&self.url)?;
        if port == 0 {
            return Err(format!("bad port 0 in {:?}", self.url));
        }
        if host.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!("bad host {host:?}"));
        }
        Ok((tls, host, port))
    }

    fn check(&self) -> Check {
        self.endpoint()
            .map_err(|reason| ("mqtt.external.url", reason))?;
        ensure(
            !self.client_id.is_empty()
                && self.client_id.len() <= 23 * 4
                && !self.client_id.contains(['+', '#', '/']),
            "mqtt.external.client_id",
            "must be 1 to 92 characters without '+', '#' or '/'",
        )?;
        ensure(
            self.share_group.len() <= 64 && !self.share_group.contains(['+', '#', '/']),
            "mqtt.external.share_group",
            "must be at most 64 characters without '+', '#' or '/'",
        )?;
        ensure(
            !self.url.starts_with("mqtts://") || !self.ca_file.is_empty(),
            "mqtt.external.ca_file",
            "is required with mqtts:// (the CA that signs the broker's certificate)",
        )
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole appliance configuration. Every field has a default (see `config/hangar.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Store, blobs, certificates, token. "" = `$STATE_DIRECTORY` or `./hangar-data`.
    pub data_dir: String,
    /// HTTPS / HTTP listeners and upload limits.
    pub http: HttpConfig,
    /// Certificate and key files; empty = generated.
    pub tls: TlsConfig,
    /// Device broker listeners and protocol options.
    pub mqtt: MqttConfig,
    /// Admin token and signed-URL lifetime.
    pub auth: AuthConfig,
    /// Retention of the audit log.
    pub audit: AuditConfig,
    /// Upgrade task timing.
    pub tasks: TasksConfig,
    /// Delta generation.
    pub delta: DeltaConfig,
    /// Prometheus metrics listener.
    pub metrics: MetricsConfig,
    /// Free-space threshold of the data directory.
    pub store: StoreConfig,
    /// Log output format.
    pub log: LogConfig,
    /// Keys trusted for firmware signatures and bundles.
    pub trust: TrustConfig,
    /// Download URLs nginx can verify, and the edges that serve them.
    pub downloads: DownloadsConfig,
    /// The HTTP hooks a site's broker (EMQX, VerneMQ) asks about device logins and topics.
    pub hooks: HooksConfig,
}

/// `[hooks]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// A file holding the credential the broker's hook calls carry (not the admin token);
    /// "" = the hook endpoints are off.
    pub token_file: String,
}

/// `[downloads]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadsConfig {
    /// The secret of nginx's `secure_link_md5 "$secure_link_expires$uri <secret>"`; when set,
    /// command URLs carry `md5` and `expires` too and are answered cacheably. "" = off.
    pub secure_link_secret: String,
    /// Download edges (nginx caches or mirrors), the first whose group a device is in.
    pub edge: Vec<EdgeConfig>,
}

/// One `[[downloads.edge]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// The devices it serves: `{ tags = [...] }` (a device with any of them) or
    /// `{ deviceType = "..." }`.
    #[serde(rename = "match")]
    pub matches: EdgeMatch,
    /// Where those devices download from instead of `http.public_url`: scheme, host and port.
    pub base_url: String,
}

/// `[[downloads.edge]] match`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EdgeMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(
        default,
        rename = "deviceType",
        skip_serializing_if = "Option::is_none"
    )]
    pub device_type: Option<String>,
}

impl DownloadsConfig {
    fn check(&self) -> Check {
        let secret = &self.secure_link_secret;
        ensure(
            secret.is_empty()
                || (secret.len() >= 16
                    && secret
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"\"$;{}'\\".contains(&b))),
            "downloads.secure_link_secret",
            "must be 16 or more printable characters without spaces, quotes, '$', ';', '{', '}' or '\\' (it is written into nginx's secure_link_md5 line), or \"\" for none",
        )?;
        for e in &self.edge {
            ensure(
                !secret.is_empty(),
                "downloads.edge",
                "an edge verifies the URLs it serves with downloads.secure_link_secret: set it (and the same secret in the edge's nginx)",
            )?;
            let u = &e.base_url;
            let host = u
                .strip_prefix("https://")
                .or_else(|| u.strip_prefix("http://"))
                .map(|h| h.strip_suffix('/').unwrap_or(h));
            ensure(
                host.is_some_and(|h| {
                    !h.is_empty() && !h.contains(|c: char| c.is_whitespace() || "/?#@".contains(c))
                }),
                "downloads.edge",
                format!(
                    "base_url {u:?} must be scheme, host and port only, e.g. \"https://edge-hall-2:8443\" (nginx checks the path the device asks for, so the edge serves the appliance's paths)"
                ),
            )?;
            let m = &e.matches;
            ensure(
                m.tags.is_empty() != m.device_type.is_none(),
                "downloads.edge",
                format!(
                    "the edge {u:?} needs match = {{ tags = [...] }} or match = {{ deviceType = \"...\" }}, one of them"
                ),
            )?;
        }
        Ok(())
    }
}

/// `[trust]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// Public keys (minisign) whose firmware signatures and bundles are trusted, by name.
    pub keys: Vec<TrustKeyConfig>,
    /// Only firmware with a valid signature by a trusted key can be released.
    pub require_signed: bool,
}

/// One `[[trust.keys]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrustKeyConfig {
    /// The name signatures by this key are recorded under.
    pub name: String,
    /// The minisign public key: its base64 line (`RW…`) or the whole `.pub` file.
    pub key: String,
}

impl TrustConfig {
    /// The configured keys, parsed.
    pub fn keyring(&self) -> Result<crate::trust::Keyring, crate::trust::TrustError> {
        crate::trust::Keyring::parse(self.keys.iter().map(|k| (k.name.as_str(), k.key.as_str())))
    }

    fn check(&self) -> Check {
        for k in &self.keys {
            ensure(
                crate::ids::valid_device_type(&k.name),
                "trust.keys",
                format!("key name {:?} must match [A-Za-z0-9_-]{{1,64}}", k.name),
            )?;
        }
        self.keyring()
            .map(|_| ())
            .map_err(|e| ("trust.keys", e.to_string()))
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// HTTPS listen address (API + downloads).
    pub listen: Listen,
    /// Plain HTTP listen address; "" disables it.
    pub plain_listen: Listen,
    /// Base URL for links handed to devices; "" = derived from the first non-loopback IP.
    pub public_url: String,
    /// Largest accepted firmware upload in bytes.
    pub max_upload_bytes: u64,
    /// Largest accepted offline bundle (`POST /api/ota/bundles`) in bytes.
    pub max_bundle_bytes: u64,
    /// Longest pause (seconds) of a client in the middle of a request body before the request
    /// is abandoned and the connection closed.
    pub body_idle_timeout_secs: u64,
    /// Longest time (seconds) a client may take no byte of an answer (a download, the event
    /// stream) before its connection is closed, as nginx's `send_timeout`.
    pub send_timeout_secs: u64,
}

/// `[tls]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; "" = generated.
    pub cert: String,
    /// PEM private key; "" = generated.
    pub key: String,
}

/// `[mqtt]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Plain MQTT listen address.
    pub listen: Listen,
    /// MQTTS listen address; "" disables it.
    pub tls_listen: Listen,
    /// First topic level of the gateway protocol.
    pub topic_prefix: String,
    /// Admit devices without credentials (labs only).
    pub allow_anonymous: bool,
    /// Most device connections at once (both listeners together), counting logged-in ones.
    pub max_connections: usize,
    /// Most connections at once that have not logged in yet; a newcomer beyond it takes the
    /// place of the oldest.
    pub max_pending_connections: usize,
    /// Most of those from one source address.
    pub max_pending_per_address: usize,
    /// Largest MQTT packet a client may send, bytes.
    pub max_packet_bytes: usize,
    /// Which broker carries MQTT traffic.
    pub engine: MqttEngine,
    /// A `mosquitto_passwd` file of application users, besides those in the store ("" = none).
    pub password_file: String,
    /// A mosquitto `acl_file` for general topics ("" = general topics closed to everyone).
    pub acl_file: String,
    /// MQTTS clients must present a certificate signed by `client_ca_file`.
    pub require_certificate: bool,
    /// The certificate's CN is the client's identity (a device id or a user name); no password.
    pub use_identity_as_username: bool,
    /// PEM file of the CA that signs client certificates (MQTTS, and device downloads over HTTPS).
    pub client_ca_file: String,
    /// QoS 1/2 messages queued for one client beyond those in flight (as mosquitto counts
    /// them; while a persistent session is offline too); beyond it new ones are dropped and
    /// counted.
    pub max_queued_messages: usize,
    /// Bytes of messages (any QoS) queued or in flight to one client; beyond it new ones are
    /// dropped and counted (a client that stops reading costs at most this much).
    pub max_queued_bytes: usize,
    /// QoS 1/2 messages sent to a client and not yet acknowledged.
    pub max_inflight_messages: usize,
    /// Retained messages kept; beyond it a new retained topic is delivered but not retained.
    pub max_retained_messages: usize,
    /// Bytes of retained payloads kept, the same way.
    pub max_retained_bytes: usize,
    /// Subscriptions of one client; beyond it SUBACK says 0x80.
    pub max_subscriptions_per_client: usize,
    /// The site's broker, with `engine = "external"`.
    pub external: ExternalConfig,
    /// Bridges to other brokers (`[[mqtt.bridge]]`), with the built-in broker.
    pub bridge: Vec<BridgeConfig>,
}

/// One `[[mqtt.bridge]]`: topics forwarded between the built-in broker and another one, kept
/// on disk while the link is down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Its name (metrics, the console, its client ids `hangar-bridge-<name>-out|in`).
    pub name: String,
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    #[serde(default)]
    pub username: String,
    /// File whose first line is the password ("" = none).
    #[serde(default)]
    pub password_file: String,
    /// PEM file of the CA that signs the other broker's certificate (mqtts://).
    #[serde(default)]
    pub ca_file: String,
    /// What is forwarded which way.
    pub topics: Vec<BridgeTopic>,
    /// Messages kept on disk for the other broker while the link is down; beyond it the oldest
    /// are dropped and counted.
    #[serde(default = "default_bridge_queue")]
    pub queue_max_messages: u64,
}

fn default_bridge_queue() -> u64 {
    100_000
}

/// One topic rule of a bridge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeTopic {
    /// A topic filter (`+`, `#`).
    pub pattern: String,
    /// `out` (to the other broker), `in` (from it) or `both`.
    pub direction: BridgeDirection,
    /// QoS of the forwarded messages (0 or 1).
    #[serde(default = "default_bridge_qos")]
    pub qos: u8,
}

fn default_bridge_qos() -> u8 {
    1
}

/// Which way a bridge topic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeDirection {
    Out,
    In,
    Both,
}

impl BridgeDirection {
    /// It carries messages to the other broker.
    pub fn out(self) -> bool {
        matches!(self, BridgeDirection::Out | BridgeDirection::Both)
    }
    /// It carries messages from the other broker.
    pub fn inward(self) -> bool {
        matches!(self, BridgeDirection::In | BridgeDirection::Both)
    }
}

impl BridgeConfig {
    /// (TLS, host, port) of `url`.
    pub fn endpoint(&self) -> Result<(bool, String, u16), String> {
        ExternalConfig {
            url: self.url.clone(),
            ..ExternalConfig::default()
        }
        .endpoint()
    }

    fn check(&self) -> Check {
        ensure(
            !self.name.is_empty()
                && self.name.len() <= 32
                && self
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "mqtt.bridge.name",
            format!("{:?} must be 1 to 32 of [A-Za-z0-9_-]", self.name),
        )?;
        self.endpoint()
            .map_err(|reason| ("mqtt.bridge.url", format!("bridge {}: {reason}", self.name)))?;
        ensure(
            !self.url.starts_with("mqtts://") || !self.ca_file.is_empty(),
            "mqtt.bridge.ca_file",
            format!("bridge {}: required with mqtts://", self.name),
        )?;
        ensure(
            !self.topics.is_empty(),
            "mqtt.bridge.topics",
            format!("bridge {}: at least one topic", self.name),
        )?;
        for t in &self.topics {
            ensure(
                valid_filter(&t.pattern),
                "mqtt.bridge.topics",
                format!(
                    "bridge {}: {:?} is not a topic filter",
                    self.name, t.pattern
                ),
            )?;
            ensure(
                t.qos <= 1,
                "mqtt.bridge.topics",
                format!("bridge {}: qos must be 0 or 1", self.name),
            )?;
        }
        ensure(
            (1..=100_000_000).contains(&self.queue_max_messages),
            "mqtt.bridge.queue_max_messages",
            format!("bridge {}: must be between 1 and 100000000", self.name),
        )
    }
}

/// An MQTT topic filter: non-empty, `#` only last and alone in its level, `+` alone in its
/// level, no NUL.
fn valid_filter(f: &str) -> bool {
    if f.is_empty() || f.len() > 65_535 || f.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    levels
        .iter()
        .enumerate()
        .all(|(i, l)| (*l == "#" && i == levels.len() - 1) || *l == "+" || !l.contains(['+', '#']))
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Admin bearer token; "" = generated into `<data_dir>/admin.token`.
    pub admin_token: String,
    /// Lifetime of signed download URLs, seconds.
    pub url_ttl_secs: u64,
    /// Lifetime of a console session from sign-in, hours.
    pub session_hours: u64,
    /// Failed sign-ins of one user name from one address before its next attempt waits.
    pub sign_in_free_failures: u32,
    /// Failed sign-ins from one address (any user names) before its next attempt waits.
    pub sign_in_free_failures_per_address: u32,
    /// Failed sign-ins of one user name from all addresses together before it waits.
    pub sign_in_free_failures_per_user: u32,
    /// Password checks (argon2id, ~19 MiB each) running at once.
    pub sign_in_checks_at_once: usize,
    /// How long a sign-in waits for a free check before it is answered 429, seconds.
    pub sign_in_wait_secs: u64,
}

/// `[audit]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Entries kept at most; the oldest beyond it are dropped (the report chain says so).
    pub max_entries: u64,
    /// Entries older than this many days are dropped; 0 = kept whatever their age.
    pub max_age_days: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_entries: 200_000,
            max_age_days: 0,
        }
    }
}

impl AuditConfig {
    fn check(&self) -> Check {
        ensure(
            (1000..=100_000_000).contains(&self.max_entries),
            "audit.max_entries",
            "must be between 1000 and 100000000",
        )?;
        ensure(
            self.max_age_days <= 36_500,
            "audit.max_age_days",
            "must be between 0 (no age limit) and 36500 days",
        )
    }
}

/// `[tasks]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Seconds without a report after which an active task fails with TIMEOUT.
    pub stall_timeout_secs: u64,
    /// Seconds a device has, after its upgrade completed and after it (re)connected, to boot
    /// the new image: the old version reported within them is not yet a rollback.
    pub reboot_grace_secs: u64,
    /// Seconds without a report after which the console flags an in-flight device as stale
    /// (long before `stall_timeout_secs` fails it).
    pub stale_secs: u64,
    /// Finished tasks the store keeps per device (its newest); older finished ones move to the
    /// task archive (`<data_dir>/archive/`), still listed by the API and carried by the site
    /// report and backups. 0 keeps every task in the store.
    pub keep_finished_per_device: u32,
    /// How often the archive pass runs (with `keep_finished_per_device` set); also once at start.
    pub archive_every_secs: u64,
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Extra loopback-only listener serving `/metrics` without a token; "" = none (the HTTPS
    /// listener always serves `/metrics` behind the admin token).
    pub listen: Listen,
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Uploads are refused (507 DISK_FULL) when they would leave less than this many bytes free
    /// on the data directory's filesystem, so the store keeps room for tasks and reports; a
    /// store that failed on a full disk reopens once this much (at most 8 MiB) is free again.
    pub min_free_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            min_free_bytes: 64 << 20,
        }
    }
}

/// `[delta]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeltaConfig {
    /// Deltas computed at once.
    pub workers: usize,
    /// Threads each computation searches with (0 = one per core).
    pub threads: usize,
    /// Deltas whose estimated peak memory exceeds this are refused (status failed).
    pub max_memory_bytes: u64,
    /// A delta not smaller than this fraction of the full image is skipped, not offered.
    pub max_ratio: f64,
    /// Deltas waiting for a worker at most; more requests are refused with 503.
    pub queue: usize,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        DeltaConfig {
            workers: 1,
            threads: 0,
            max_memory_bytes: 2 << 30,
            max_ratio: 0.5,
            queue: 256,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Text lines or JSON objects.
    pub format: LogFormat,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: Listen::at(SocketAddr::from(([0, 0, 0, 0], 8443))),
            plain_listen: Listen::at(SocketAddr::from(([127, 0, 0, 1], 8018))),
            public_url: String::new(),
            max_upload_bytes: 1 << 30,
            max_bundle_bytes: 16 << 30,
            body_idle_timeout_secs: 30,
            send_timeout_secs: 60,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: Listen::at(SocketAddr::from(([0, 0, 0, 0], 1883))),
            tls_listen: Listen::at(SocketAddr::from(([0, 0, 0, 0], 8883))),
            topic_prefix: "hanqi".into(),
            allow_anonymous: false,
            max_connections: 20_000,
            max_pending_connections: 2048,
            max_pending_per_address: 512,
            max_packet_bytes: 1024 * 1024,
            engine: MqttEngine::Direct,
            password_file: String::new(),
            acl_file: String::new(),
            require_certificate: false,
            use_identity_as_username: false,
            client_ca_file: String::new(),
            max_queued_messages: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            max_inflight_messages: 20,
            max_retained_messages: 100_000,
            max_retained_bytes: 64 * 1024 * 1024,
            max_subscriptions_per_client: 1000,
            external: ExternalConfig::default(),
            bridge: Vec::new(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            admin_token: String::new(),
            url_ttl_secs: 86_400,
            session_hours: 12,
            sign_in_free_failures: 5,
            sign_in_free_failures_per_address: 20,
            sign_in_free_failures_per_user: 100,
            sign_in_checks_at_once: 2,
            sign_in_wait_secs: 2,
        }
    }
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            stall_timeout_secs: 600,
            reboot_grace_secs: 120,
            stale_secs: 90,
            keep_finished_per_device: 0,
            archive_every_secs: 3600,
        }
    }
}

/// A config together with the file it came from, if any.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// The file it was read from; `None` = built-in defaults.
    pub source: Option<PathBuf>,
}

impl Config {
    /// Finds and loads the configuration: `path` if given (it must exist), else
    /// [`SYSTEM_CONFIG`] if present, else the built-in defaults. The result is validated.
    pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
        let chosen = match path {
            Some(p) => Some(p.to_path_buf()),
            None if Path::new(SYSTEM_CONFIG).exists() => Some(PathBuf::from(SYSTEM_CONFIG)),
            None => None,
        };
        let config = match &chosen {
            Some(p) => Self::from_file(p)?,
            None => {
                let c = Config::default();
                c.validate("<defaults>")?;
                c
            }
        };
        Ok(Loaded {
            config,
            source: chosen,
        })
    }

    /// Reads, parses and validates one file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "-".into(),
            reason: format!("cannot read the file: {e}"),
        })?;
        Self::from_toml(&text, &file)
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            key: toml_error_key(&e, text),
            reason: e.message().trim().to_string(),
        })?;
        config.validate(file)?;
        Ok(config)
    }

    /// Checks every value; the first problem is returned with its key. Addresses and enums
    /// were checked by parsing; what is left are ranges and combinations, section by section.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let sections = [
            self.http.check(),
            self.tls.check(),
            self.mqtt.check(&self.http),
            self.auth.check(),
            self.audit.check(),
            self.tasks.check(),
            self.metrics.check(),
            self.delta.check(),
            self.trust.check(),
            self.downloads.check(),
        ];
        for r in sections {
            r.map_err(|(key, reason)| ConfigError {
                file: file.to_string(),
                key: key.to_string(),
                reason,
            })?;
        }
        Ok(())
    }

    /// The data directory: `data_dir`, else `$STATE_DIRECTORY` (first entry), else `./hangar-data`.
    pub fn data_dir(&self) -> PathBuf {
        if !self.data_dir.is_empty() {
            return PathBuf::from(&self.data_dir);
        }
        if let Ok(state) = std::env::var("STATE_DIRECTORY")
            && let Some(first) = state.split(':').find(|s| !s.is_empty())
        {
            return PathBuf::from(first);
        }
        PathBuf::from("hangar-data")
    }
}

impl Config {
    /// The data dir a CLI client on the box should read `ports.json` and the token from: as for
    /// the server, except that with nothing configured it also finds a systemd-managed appliance
    /// in `/var/lib/hangar` (where `StateDirectory=hangar` puts it) when `./hangar-data` has none.
    pub fn client_data_dir(&self) -> PathBuf {
        let dir = self.data_dir();
        if self.data_dir.is_empty()
            && std::env::var_os("STATE_DIRECTORY").is_none()
            && !dir.join("ports.json").exists()
        {
            let system = PathBuf::from("/var/lib/hangar");
            if system.join("ports.json").exists() {
                return system;
            }
        }
        dir
    }
}

/// A problem of one section: its dotted key and what is wrong.
type Check = Result<(), (&'static str, String)>;

/// `Err((key, reason))` unless `ok`.
fn ensure(ok: bool, key: &'static str, reason: impl Into<String>) -> Check {
    if ok {
        Ok(())
    } else {
        Err((key, reason.into()))
    }
}

impl HttpConfig {
    fn check(&self) -> Check {
        ensure(
            self.listen.addr().is_some(),
            "http.listen",
            "the HTTPS listener cannot be off: give an IP:port address",
        )?;
        let u = &self.public_url;
        let url_ok = (u.starts_with("https://") || u.starts_with("http://"))
            && u.split("://").nth(1).is_some_and(|rest| !rest.is_empty())
            && !u.contains(char::is_whitespace)
            && !u.contains('?')
            && !u.contains('#');
        ensure(
            u.is_empty() || url_ok,
            "http.public_url",
            format!(
                "{u:?} must be an http:// or https:// base URL without query, e.g. \"https://hangar.local:8443\""
            ),
        )?;
        ensure(
            (1..=3600).contains(&self.body_idle_timeout_secs),
            "http.body_idle_timeout_secs",
            "must be between 1 and 3600",
        )?;
        ensure(
            (1..=3600).contains(&self.send_timeout_secs),
            "http.send_timeout_secs",
            "must be between 1 and 3600",
        )?;
        ensure(
            self.max_bundle_bytes > 0,
            "http.max_bundle_bytes",
            "must be greater than 0",
        )?;
        ensure(
            self.max_upload_bytes > 0,
            "http.max_upload_bytes",
            "must be greater than 0",
        )
    }
}

impl TlsConfig {
    fn check(&self) -> Check {
        ensure(
            self.cert.is_empty() == self.key.is_empty(),
            if self.cert.is_empty() {
                "tls.cert"
            } else {
                "tls.key"
            },
            "tls.cert and tls.key must be set together (or both left empty to generate a certificate)",
        )
    }
}

impl MqttConfig {
    fn check(&self, http: &HttpConfig) -> Check {
        ensure(
            self.listen.addr().is_some(),
            "mqtt.listen",
            "the MQTT listener cannot be off: give an IP:port address",
        )?;
        let prefix = &self.topic_prefix;
        ensure(
            !prefix.is_empty()
                && prefix.len() <= 64
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "mqtt.topic_prefix",
            format!("{prefix:?} must be 1-64 characters of [A-Za-z0-9_-] (one topic level)"),
        )?;
        for (key, v) in [
            ("mqtt.max_connections", self.max_connections),
            ("mqtt.max_pending_connections", self.max_pending_connections),
            ("mqtt.max_pending_per_address", self.max_pending_per_address),
        ] {
            ensure(
                (1..=1_000_000).contains(&v),
                key,
                "must be between 1 and 1000000",
            )?;
        }
        ensure(
            (1024..=256 * 1024 * 1024).contains(&self.max_packet_bytes),
            "mqtt.max_packet_bytes",
            "must be between 1024 and 268435456 (MQTT's limit)",
        )?;
        ensure(
            self.engine != MqttEngine::Rumqttd,
            "mqtt.engine",
            "\"rumqttd\" was removed: the built-in broker (\"direct\") now carries OTA and general traffic with persistence and ACLs; remove the key",
        )?;
        if self.engine == MqttEngine::External {
            self.external.check()?;
            ensure(
                self.bridge.is_empty(),
                "mqtt.bridge",
                "bridges belong to the built-in broker; with engine = \"external\" use the site broker's own bridge",
            )?;
        }
        let mut names = std::collections::HashSet::new();
        for b in &self.bridge {
            b.check()?;
            ensure(
                names.insert(b.name.as_str()),
                "mqtt.bridge.name",
                format!("{:?} is used twice", b.name),
            )?;
        }
        for (key, v, max) in [
            (
                "mqtt.max_queued_messages",
                self.max_queued_messages,
                1_000_000,
            ),
            (
                "mqtt.max_inflight_messages",
                self.max_inflight_messages,
                65_535,
            ),
            (
                "mqtt.max_retained_messages",
                self.max_retained_messages,
                10_000_000,
            ),
            (
                "mqtt.max_subscriptions_per_client",
                self.max_subscriptions_per_client,
                1_000_000,
            ),
            ("mqtt.max_queued_bytes", self.max_queued_bytes, 1 << 40),
            ("mqtt.max_retained_bytes", self.max_retained_bytes, 1 << 40),
        ] {
            ensure(
                (1..=max).contains(&v),
                key,
                format!("must be between 1 and {max}"),
            )?;
        }
        ensure(
            !self.require_certificate || !self.client_ca_file.is_empty(),
            "mqtt.require_certificate",
            "needs mqtt.client_ca_file (the CA that signs client certificates)",
        )?;
        ensure(
            !self.require_certificate || self.tls_listen.addr().is_some(),
            "mqtt.require_certificate",
            "needs mqtt.tls_listen: certificates are presented over MQTTS",
        )?;
        ensure(
            !self.use_identity_as_username || self.require_certificate,
            "mqtt.use_identity_as_username",
            "needs mqtt.require_certificate = true",
        )?;
        for (key, path) in [
            ("mqtt.password_file", &self.password_file),
            ("mqtt.acl_file", &self.acl_file),
            ("mqtt.client_ca_file", &self.client_ca_file),
        ] {
            if !path.is_empty() {
                std::fs::metadata(path).map_err(|e| (key, format!("{path}: {e}")))?;
            }
        }
        // (their contents are parsed by the broker at start, which names the line it refuses)
        let fixed = [http.listen, self.listen, self.tls_listen]
            .into_iter()
            .filter(|l| l.fixed())
            .map(|l| l.addr())
            .collect::<Vec<_>>();
        let distinct: std::collections::HashSet<_> = fixed.iter().collect();
        ensure(
            distinct.len() == fixed.len(),
            "mqtt.listen",
            "http.listen, mqtt.listen and mqtt.tls_listen must be different addresses",
        )
    }
}

impl AuthConfig {
    fn check(&self) -> Check {
        let token = &self.admin_token;
        ensure(
            token.is_empty() || (token.len() >= 16 && token.chars().all(|c| c.is_ascii_graphic())),
            "auth.admin_token",
            "must be at least 16 printable ASCII characters without spaces (or \"\" to generate one)",
        )?;
        ensure(
            (1..=366 * 86_400).contains(&self.url_ttl_secs),
            "auth.url_ttl_secs",
            "must be between 1 and 31622400 seconds (one year)",
        )?;
        ensure(
            (1..=720).contains(&self.session_hours),
            "auth.session_hours",
            "must be between 1 and 720 hours (30 days)",
        )?;
        ensure(
            (1..=1000).contains(&self.sign_in_free_failures),
            "auth.sign_in_free_failures",
            "must be between 1 and 1000",
        )?;
        ensure(
            (1..=100_000).contains(&self.sign_in_free_failures_per_address),
            "auth.sign_in_free_failures_per_address",
            "must be between 1 and 100000",
        )?;
        ensure(
            (1..=100_000).contains(&self.sign_in_free_failures_per_user),
            "auth.sign_in_free_failures_per_user",
            "must be between 1 and 100000",
        )?;
        ensure(
            (1..=64).contains(&self.sign_in_checks_at_once),
            "auth.sign_in_checks_at_once",
            "must be between 1 and 64 (each check takes about 19 MiB while it runs)",
        )?;
        ensure(
            self.sign_in_wait_secs <= 30,
            "auth.sign_in_wait_secs",
            "must be between 0 and 30 seconds",
        )
    }
}

impl TasksConfig {
    fn check(&self) -> Check {
        ensure(
            (1..=86_400).contains(&self.reboot_grace_secs),
            "tasks.reboot_grace_secs",
            "must be between 1 and 86400 seconds (longer than your devices take to reboot)",
        )?;
        ensure(
            self.stall_timeout_secs > 0,
            "tasks.stall_timeout_secs",
            "must be greater than 0",
        )?;
        ensure(
            (1..=86_400).contains(&self.stale_secs),
            "tasks.stale_secs",
            "must be between 1 and 86400 seconds",
        )?;
        ensure(
            (60..=604_800).contains(&self.archive_every_secs),
            "tasks.archive_every_secs",
            "must be between 60 and 604800 seconds (a week)",
        )
    }
}

impl MetricsConfig {
    fn check(&self) -> Check {
        ensure(
            self.listen.addr().is_none_or(|a| a.ip().is_loopback()),
            "metrics.listen",
            "must be a loopback address (e.g. \"127.0.0.1:9464\"): it has no authentication",
        )
    }
}

impl DeltaConfig {
    fn check(&self) -> Check {
        ensure(
            (1..=64).contains(&self.workers),
            "delta.workers",
            "must be between 1 and 64",
        )?;
        ensure(
            self.threads <= 256,
            "delta.threads",
            "must be between 0 (one per core) and 256",
        )?;
        ensure(
            self.max_memory_bytes >= 16 << 20,
            "delta.max_memory_bytes",
            "must be at least 16777216 (16 MiB)",
        )?;
        ensure(
            self.max_ratio > 0.0 && self.max_ratio <= 1.0,
            "delta.max_ratio",
            "must be greater than 0 and at most 1",
        )?;
        ensure(
            (1..=100_000).contains(&self.queue),
            "delta.queue",
            "must be between 1 and 100000",
        )
    }
}

/// Best effort at naming the key a toml error is about: the `key = ` on the error's line,
/// qualified by the nearest `[table]` header above it.
fn toml_error_key(e: &toml::de::Error, text: &str) -> String {
    let Some(span) = e.span() else {
        return "-".into();
    };
    let before = &text[..span.start.min(text.len())];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[line_start..]
        .find('\n')
        .map(|i| line_start + i)
        .unwrap_or(text.len());
    let line = text[line_start..line_end].trim();
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line.split('=').next().map(str::trim).unwrap_or("");
    if line.starts_with('[') {
        return line
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string();
    }
    match (table, key.is_empty()) {
        (Some(t), false) => format!("{t}.{key}"),
        (None, false) => key.to_string(),
        (Some(t), true) => t,
        (None, true) => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn external_broker_urls() {
        let e = |url: &str| {
            super::ExternalConfig {
                url: url.into(),
                ..Default::default()
            }
            .endpoint()
        };
        assert_eq!(e("mqtt://broker"), Ok((false, "broker".into(), 1883)));
        assert_eq!(e("mqtts://broker:8884/"), Ok((true, "broker".into(), 8884)));
        assert_eq!(e("mqtt://[::1]:1884"), Ok((false, "::1".into(), 1884)));
        assert_eq!(e("mqtt://10.0.0.7"), Ok((false, "10.0.0.7".into(), 1883)));
        assert!(e("mqtt://u@broker").is_err());
        assert!(e("broker:1883").is_err());
        assert!(e("mqtt://:1883").is_err());
    }

    #[test]
    fn packaged_config_is_the_default_with_the_state_dir() {
        let packaged = include_str!("../debian/hangar.toml");
        assert_eq!(
            packaged,
            DEFAULT_TOML.replacen("data_dir = \"\"", "data_dir = \"/var/lib/hangar\"", 1)
        );
    }

    use super::*;

    #[test]
    fn embedded_example_is_the_default() {
        let parsed = Config::from_toml(DEFAULT_TOML, "config/hangar.toml").unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let e =
            Config::from_toml("[http]\nlisten = \"0.0.0.0:1\"\nbogus = 1\n", "f.toml").unwrap_err();
        assert_eq!(e.file, "f.toml");
        assert_eq!(e.key, "http.bogus");
        assert!(e.reason.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_reason() {
        let cases = [
            ("[http]\nlisten = \"nope\"\n", "http.listen"),
            ("[http]\nmax_upload_bytes = 0\n", "http.max_upload_bytes"),
            ("[http]\npublic_url = \"ftp://x\"\n", "http.public_url"),
            ("[tls]\ncert = \"/x.pem\"\n", "tls.key"),
            ("[mqtt]\ntopic_prefix = \"a/b\"\n", "mqtt.topic_prefix"),
            ("[mqtt]\nengine = \"mosquitto\"\n", "mqtt.engine"),
            ("[mqtt]\nengine = \"rumqttd\"\n", "mqtt.engine"),
            ("[mqtt]\nengine = \"external\"\n", "mqtt.external.url"),
            (
                "[mqtt]\nengine = \"external\"\n[mqtt.external]\nurl = \"http://b:1883\"\n",
                "mqtt.external.url",
            ),
            (
                "[mqtt]\nengine = \"external\"\n[mqtt.external]\nurl = \"mqtt://b:0\"\n",
                "mqtt.external.url",
            ),
            (
                "[mqtt]\nengine = \"external\"\n[mqtt.external]\nurl = \"mqtts://b\"\n",
                "mqtt.external.ca_file",
            ),
            (
                "[mqtt]\nengine = \"external\"\n[mqtt.external]\nurl = \"mqtt://b\"\nshare_group = \"a/b\"\n",
                "mqtt.external.share_group",
            ),
            ("[mqtt.external]\nsync = \"emqx\"\n", "mqtt.external.sync"),
            ("[auth]\nadmin_token = \"short\"\n", "auth.admin_token"),
            ("[auth]\nurl_ttl_secs = 0\n", "auth.url_ttl_secs"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[http]\nlisten = 5\n", "http.listen"),
            ("[http]\nlisten = \"\"\n", "http.listen"),
            ("[mqtt]\nlisten = \"\"\n", "mqtt.listen"),
            ("[http]\nlisten = \"0.0.0.0:1883\"\n", "mqtt.listen"),
            ("[metrics]\nlisten = \"0.0.0.0:9464\"\n", "metrics.listen"),
            ("[metrics]\nlisten = \"localhost:9464\"\n", "metrics.listen"),
            ("[delta]\nmax_ratio = 0.0\n", "delta.max_ratio"),
            (
                "[tasks]\nreboot_grace_secs = 0\n",
                "tasks.reboot_grace_secs",
            ),
        ];
        for (text, key) in cases {
            let e = Config::from_toml(text, "f.toml").unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(!e.reason.is_empty());
        }
    }

    #[test]
    fn addresses_and_enums_are_typed() {
        let c = Config::from_toml(
            "[http]\nlisten = \"127.0.0.1:0\"\nplain_listen = \"\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"[::1]:8883\"\nengine = \"direct\"\n[log]\nformat = \"json\"\n",
            "f.toml",
        )
        .unwrap();
        // port 0 may repeat: every listener picks its own free port
        assert_eq!(c.http.listen, Listen::loopback_any_port());
        assert_eq!(c.http.plain_listen, Listen::OFF);
        assert_eq!(
            c.mqtt.tls_listen.addr(),
            Some("[::1]:8883".parse().unwrap())
        );
        assert_eq!(
            (c.mqtt.engine, c.log.format),
            (MqttEngine::Direct, LogFormat::Json)
        );
        // and they print as they are written
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("plain_listen = \"\""), "{text}");
        assert!(text.contains("tls_listen = \"[::1]:8883\""), "{text}");
        assert_eq!(Config::from_toml(&text, "again").unwrap(), c);
    }
}
