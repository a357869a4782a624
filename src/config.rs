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
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// HTTPS listen address (API + downloads).
    pub listen: String,
    /// Plain HTTP listen address; "" disables it.
    pub plain_listen: String,
    /// Base URL for links handed to devices; "" = derived from the first non-loopback IP.
    pub public_url: String,
    /// Largest accepted firmware upload in bytes.
    pub max_upload_bytes: u64,
    /// Longest pause (seconds) of a client in the middle of a request body before the request
    /// is abandoned and the connection closed.
    pub body_idle_timeout_secs: u64,
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
    pub listen: String,
    /// MQTTS listen address; "" disables it.
    pub tls_listen: String,
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
    /// Largest MQTT packet a device may send, bytes.
    pub max_packet_bytes: usize,
    /// Who carries messages to devices: "direct" (the front door routes them itself) or
    /// "rumqttd" (the embedded rumqttd behind the front door).
    pub engine: String,
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Admin bearer token; "" = generated into `<data_dir>/admin.token`.
    pub admin_token: String,
    /// Lifetime of signed download URLs, seconds.
    pub url_ttl_secs: u64,
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
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Extra loopback-only listener serving `/metrics` without a token; "" = none (the HTTPS
    /// listener always serves `/metrics` behind the admin token).
    pub listen: String,
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// "text" or "json".
    pub format: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "0.0.0.0:8443".into(),
            plain_listen: "127.0.0.1:8018".into(),
            public_url: String::new(),
            max_upload_bytes: 1 << 30,
            body_idle_timeout_secs: 30,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: "0.0.0.0:1883".into(),
            tls_listen: "0.0.0.0:8883".into(),
            topic_prefix: "hanqi".into(),
            allow_anonymous: false,
            max_connections: 20_000,
            max_pending_connections: 2048,
            max_pending_per_address: 512,
            max_packet_bytes: 256 * 1024,
            engine: "direct".into(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            admin_token: String::new(),
            url_ttl_secs: 86_400,
        }
    }
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            stall_timeout_secs: 600,
            reboot_grace_secs: 120,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
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

    /// Checks every value; the first problem is returned with its key.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: file.to_string(),
            key: key.to_string(),
            reason,
        };
        let addr = |key: &str, v: &str, optional: bool| -> Result<(), ConfigError> {
            if optional && v.is_empty() {
                return Ok(());
            }
            v.parse::<SocketAddr>().map(|_| ()).map_err(|_| {
                err(
                    key,
                    format!("{v:?} is not an IP:port address (e.g. \"0.0.0.0:8443\"; port 0 = any free port)"),
                )
            })
        };
        addr("http.listen", &self.http.listen, false)?;
        addr("http.plain_listen", &self.http.plain_listen, true)?;
        addr("mqtt.listen", &self.mqtt.listen, false)?;
        addr("mqtt.tls_listen", &self.mqtt.tls_listen, true)?;
        if !self.http.public_url.is_empty() {
            let u = &self.http.public_url;
            let ok = (u.starts_with("https://") || u.starts_with("http://"))
                && u.split("://").nth(1).is_some_and(|rest| !rest.is_empty())
                && !u.contains(char::is_whitespace)
                && !u.contains('?')
                && !u.contains('#');
            if !ok {
                return Err(err(
                    "http.public_url",
                    format!(
                        "{u:?} must be an http:// or https:// base URL without query, e.g. \"https://hangar.local:8443\""
                    ),
                ));
            }
        }
        if !(1..=3600).contains(&self.http.body_idle_timeout_secs) {
            return Err(err(
                "http.body_idle_timeout_secs",
                "must be between 1 and 3600".into(),
            ));
        }
        if self.http.max_upload_bytes == 0 {
            return Err(err(
                "http.max_upload_bytes",
                "must be greater than 0".into(),
            ));
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            let key = if self.tls.cert.is_empty() {
                "tls.cert"
            } else {
                "tls.key"
            };
            return Err(err(
                key,
                "tls.cert and tls.key must be set together (or both left empty to generate a certificate)".into(),
            ));
        }
        let prefix = &self.mqtt.topic_prefix;
        if prefix.is_empty()
            || prefix.len() > 64
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(err(
                "mqtt.topic_prefix",
                format!("{prefix:?} must be 1-64 characters of [A-Za-z0-9_-] (one topic level)"),
            ));
        }
        if self.mqtt.max_connections == 0 || self.mqtt.max_connections > 1_000_000 {
            return Err(err(
                "mqtt.max_connections",
                "must be between 1 and 1000000".into(),
            ));
        }
        for (key, v) in [
            (
                "mqtt.max_pending_connections",
                self.mqtt.max_pending_connections,
            ),
            (
                "mqtt.max_pending_per_address",
                self.mqtt.max_pending_per_address,
            ),
        ] {
            if v == 0 || v > 1_000_000 {
                return Err(err(key, "must be between 1 and 1000000".into()));
            }
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.mqtt.max_packet_bytes) {
            return Err(err(
                "mqtt.max_packet_bytes",
                "must be between 1024 and 268435456 (MQTT's limit)".into(),
            ));
        }
        if !matches!(self.mqtt.engine.as_str(), "direct" | "rumqttd") {
            return Err(err(
                "mqtt.engine",
                format!(
                    "{:?} is not an engine: use \"direct\" or \"rumqttd\"",
                    self.mqtt.engine
                ),
            ));
        }
        if self.mqtt.listen == self.mqtt.tls_listen
            || self.http.listen == self.mqtt.listen
            || self.http.listen == self.mqtt.tls_listen
        {
            let same = [&self.http.listen, &self.mqtt.listen, &self.mqtt.tls_listen];
            if same.iter().filter(|a| !a.ends_with(":0")).count() >= 2 {
                return Err(err(
                    "mqtt.listen",
                    "http.listen, mqtt.listen and mqtt.tls_listen must be different addresses"
                        .into(),
                ));
            }
        }
        let token = &self.auth.admin_token;
        if !token.is_empty() && (token.len() < 16 || !token.chars().all(|c| c.is_ascii_graphic())) {
            return Err(err(
                "auth.admin_token",
                "must be at least 16 printable ASCII characters without spaces (or \"\" to generate one)".into(),
            ));
        }
        if self.auth.url_ttl_secs == 0 || self.auth.url_ttl_secs > 366 * 86_400 {
            return Err(err(
                "auth.url_ttl_secs",
                "must be between 1 and 31622400 seconds (one year)".into(),
            ));
        }
        if !(1..=86_400).contains(&self.tasks.reboot_grace_secs) {
            return Err(err(
                "tasks.reboot_grace_secs",
                "must be between 1 and 86400 seconds (longer than your devices take to reboot)"
                    .into(),
            ));
        }
        if self.tasks.stall_timeout_secs == 0 {
            return Err(err(
                "tasks.stall_timeout_secs",
                "must be greater than 0".into(),
            ));
        }
        if !self.metrics.listen.is_empty() {
            match self.metrics.listen.parse::<SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(_) => {
                    return Err(err(
                        "metrics.listen",
                        "must be a loopback address (e.g. \"127.0.0.1:9464\"): it has no authentication".into(),
                    ));
                }
                Err(_) => {
                    return Err(err(
                        "metrics.listen",
                        format!("{:?} is not an IP:port address", self.metrics.listen),
                    ));
                }
            }
        }
        if !(1..=64).contains(&self.delta.workers) {
            return Err(err("delta.workers", "must be between 1 and 64".into()));
        }
        if self.delta.threads > 256 {
            return Err(err(
                "delta.threads",
                "must be between 0 (one per core) and 256".into(),
            ));
        }
        if self.delta.max_memory_bytes < (16 << 20) {
            return Err(err(
                "delta.max_memory_bytes",
                "must be at least 16777216 (16 MiB)".into(),
            ));
        }
        if !(self.delta.max_ratio > 0.0 && self.delta.max_ratio <= 1.0) {
            return Err(err(
                "delta.max_ratio",
                "must be greater than 0 and at most 1".into(),
            ));
        }
        if !(1..=100_000).contains(&self.delta.queue) {
            return Err(err("delta.queue", "must be between 1 and 100000".into()));
        }
        if self.log.format != "text" && self.log.format != "json" {
            return Err(err(
                "log.format",
                format!("{:?} is not one of \"text\", \"json\"", self.log.format),
            ));
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
            ("[auth]\nadmin_token = \"short\"\n", "auth.admin_token"),
            ("[auth]\nurl_ttl_secs = 0\n", "auth.url_ttl_secs"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[http]\nlisten = 5\n", "http.listen"),
        ];
        for (text, key) in cases {
            let e = Config::from_toml(text, "f.toml").unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(!e.reason.is_empty());
        }
    }
}
