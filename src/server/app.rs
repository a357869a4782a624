//! Composition root: opens the data dir, store and blobs (collecting orphans), loads credentials
//! and certificates, binds every listener, writes `ports.json`, spawns the servers and returns
//! the bound addresses. [`App::shutdown`] stops and drains everything and flushes the store last.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Listen};
use crate::server::auth::{self, UrlSigner};
use crate::server::blobs::Blobs;
use crate::server::broker::Broker;
use crate::server::certs;
use crate::server::firmware::FirmwareService;
use crate::server::http;
use crate::server::ota::{Ota, OtaSettings};
use crate::server::registry::Devices;
use crate::server::store::Store;

/// How long open HTTP connections may take to finish after shutdown starts.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Why the appliance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file or directory problem, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What failed.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(
        "opening the store in {path}: {source} (if the store is locked, another hangar is running with this data dir: stop it or use another data_dir)"
    )]
    Store {
        /// The store directory.
        path: PathBuf,
        /// The cause.
        source: crate::server::store::StoreError,
    },
    /// TLS material is missing or broken.
    #[error(transparent)]
    Tls(#[from] certs::TlsError),
    /// Another process holds the data directory.
    #[error(transparent)]
    Locked(#[from] crate::server::datadir::LockError),
    /// The device broker could not start.
    #[error("starting the MQTT broker: {0}")]
    Broker(String),
    /// The trusted keys or the site key could not be read.
    #[error("{0}")]
    Trust(#[from] crate::server::signatures::SignaturesError),
    /// A listener could not be bound.
    #[error(
        "cannot listen on {key} = {addr}: {source} (is another process using it? use port 0 for any free port)"
    )]
    Bind {
        /// The config key.
        key: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The broker hooks' credential from `[hooks] token_file`, if they are on.
fn hook_token(config: &Config) -> Result<Option<String>, StartError> {
    let path = &config.hooks.token_file;
    if path.is_empty() {
        return Ok(None);
    }
    let token = std::fs::read_to_string(path)
        .map_err(io_ctx(format!("reading hooks.token_file {path}")))?
        .trim()
        .to_string();
    if token.len() < 16 || token.contains(char::is_whitespace) {
        return Err(StartError::Io {
            context: format!("hooks.token_file {path}"),
            source: std::io::Error::other(
                "the hook credential must be one line of 16 or more characters without spaces",
            ),
        });
    }
    Ok(Some(token))
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let context = context.into();
    move |source| StartError::Io { context, source }
}

/// A running appliance.
pub struct App {
    /// Bound HTTPS address.
    pub https: SocketAddr,
    /// Bound plain HTTP address, if enabled.
    pub http: Option<SocketAddr>,
    /// Bound MQTT address (device front door).
    pub mqtt: SocketAddr,
    /// Bound MQTTS address, if enabled.
    pub mqtts: Option<SocketAddr>,
    /// The data directory in use.
    pub data_dir: PathBuf,
    /// The admin token in use.
    pub admin_token: String,
    /// The generated CA certificate clients should trust (None for a site certificate).
    pub ca_file: Option<PathBuf>,
    /// The base URL put into links.
    pub public_url: String,
    cert: Arc<certs::ReloadableCert>,
    /// The broker (its ACL and password file are reloaded on SIGHUP).
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    store: Store,
    /// Held while the appliance runs (restore and a second appliance are refused).
    _lock: crate::server::datadir::DirLock,
}

/// `{"https":N,"http":N|null,"mqtt":N|null,"mqtts":N|null}`, written atomically.
fn write_ports(
    data_dir: &Path,
    https: u16,
    http: Option<u16>,
    mqtt: u16,
    mqtts: Option<u16>,
    metrics: Option<u16>,
) -> std::io::Result<()> {
    let mut v = serde_json::json!({"https": https, "http": http, "mqtt": mqtt, "mqtts": mqtts});
    if let Some(m) = metrics {
        v["metrics"] = m.into();
    }
    let path = data_dir.join("ports.json");
    let tmp = data_dir.join(".ports.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&v).expect("json"))?;
    std::fs::rename(&tmp, &path)
}

/// Binds a configured listener; `None` when it is off.
fn bind(key: &'static str, listen: Listen) -> Result<Option<TcpListener>, StartError> {
    let Some(addr) = listen.addr() else {
        return Ok(None);
    };
    crate::net::bind_listener(addr)
        .map(Some)
        .map_err(|source| StartError::Bind {
            key,
            addr: addr.to_string(),
            source,
        })
}

/// The base URL for links: `http.public_url`, or `https://<first non-loopback IP>:<port>`.
fn public_url(config: &Config, https: SocketAddr) -> String {
    if !config.http.public_url.is_empty() {
        return config.http.public_url.trim_end_matches('/').to_string();
    }
    let ip = if https.ip().is_unspecified() {
        crate::net::first_non_loopback()
    } else {
        https.ip()
    };
    format!("https://{}", crate::net::url_host_port(ip, https.port()))
}

/// The data directory (created, mode 0700, locked), the store and the blob directory, with the
/// blobs no record refers to removed.
fn open_data(
    config: &Config,
) -> Result<(PathBuf, crate::server::datadir::DirLock, Store, Blobs), StartError> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir)
        .map_err(io_ctx(format!("creating data dir {}", data_dir.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700));
    }
    let lock = crate::server::datadir::lock(&data_dir)?;

    let store_dir = data_dir.join("store");
    let store = Store::open(&store_dir).map_err(|source| StartError::Store {
        path: store_dir.clone(),
        source,
    })?;
    let blobs = Blobs::open(&data_dir).map_err(io_ctx("opening the blob directory"))?;
    let keep = store
        .referenced_blobs()
        .map_err(|source| StartError::Store {
            path: store_dir.clone(),
            source,
        })?;
    let removed = blobs
        .collect_orphans(&keep)
        .map_err(io_ctx("collecting orphan blobs"))?;
    if removed > 0 {
        tracing::warn!(
            removed,
            "removed blobs that no record refers to (left by an interrupted upload or delete)"
        );
    }
    Ok((data_dir, lock, store, blobs))
}

/// The admin token (configured, or generated once into the data dir) and the URL signer.
fn secrets(config: &Config, data_dir: &Path) -> Result<(String, UrlSigner), StartError> {
    let (admin_token, created) =
        auth::load_or_create_admin_token(data_dir, &config.auth.admin_token)
            .map_err(io_ctx("loading the admin token"))?;
    if config.auth.admin_token.is_empty() {
        let path = data_dir.join(auth::TOKEN_FILE);
        if created {
            tracing::info!(path = %path.display(), "generated the admin token");
        } else {
            tracing::info!(path = %path.display(), "admin token");
        }
    }
    let signer = UrlSigner::load_or_create(data_dir, config.auth.url_ttl_secs)
        .map_err(io_ctx("loading the URL-signing secret"))?;
    Ok((admin_token, signer))
}

/// The site's or the generated certificate, loaded for reloading on SIGHUP.
fn certificate(
    config: &Config,
    data_dir: &Path,
) -> Result<(certs::CertPaths, Arc<certs::ReloadableCert>), StartError> {
    let (cert_paths, generated) = certs::ensure_certificates(&config.tls, data_dir)?;
    match (&cert_paths.ca, generated) {
        (Some(ca), true) => {
            tracing::info!(ca = %ca.display(), cert = %cert_paths.cert.display(), "generated a self-signed CA and server certificate; clients should trust the CA")
        }
        (Some(ca), false) => {
            tracing::info!(ca = %ca.display(), cert = %cert_paths.cert.display(), "TLS certificate (generated earlier)")
        }
        (None, _) => {
            tracing::info!(cert = %cert_paths.cert.display(), key = %cert_paths.key.display(), "TLS certificate (site-provided)")
        }
    }
    let cert = certs::ReloadableCert::load(cert_paths.clone())?;
    Ok((cert_paths, cert))
}

/// Serves the router on the HTTPS listener and the plain one, and `/metrics` on the loopback
/// metrics listener; returns the metrics port.
fn serve_http(
    state: http::AppState,
    send: http::SendLimit,
    (https, tls): (TcpListener, Arc<rustls::ServerConfig>),
    plain: Option<TcpListener>,
    metrics: Option<TcpListener>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Option<u16>, StartError> {
    let mut metrics_port = None;
    if let Some(l) = metrics {
        let addr = l
            .local_addr()
            .map_err(io_ctx("reading the metrics address"))?;
        metrics_port = Some(addr.port());
        tracing::info!(%addr, "metrics listener (loopback, no token)");
        tracker.spawn(http::serve(
            l,
            None,
            http::metrics_router(state.clone()),
            shutdown.clone(),
            DRAIN_DEADLINE,
            send.clone(),
        ));
    }
    let router = http::router(state);
    tracker.spawn(http::serve(
        https,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
        router.clone(),
        shutdown.clone(),
        DRAIN_DEADLINE,
        send.clone(),
    ));
    if let Some(l) = plain {
        tracker.spawn(http::serve(
            l,
            None,
            router,
            shutdown.clone(),
            DRAIN_DEADLINE,
            send,
        ));
    }
    Ok(metrics_port)
}

/// The HTTP listeners, bound before anything starts (a port in use fails the start at once).
struct Listeners {
    https_listener: TcpListener,
    https: SocketAddr,
    plain: Option<TcpListener>,
    http: Option<SocketAddr>,
    metrics: Option<TcpListener>,
}

impl Listeners {
    fn bind(config: &Config) -> Result<Listeners, StartError> {
        let https_listener =
            bind("http.listen", config.http.listen)?.expect("validated: http.listen is on");
        let plain = bind("http.plain_listen", config.http.plain_listen)?;
        let https = https_listener
            .local_addr()
            .map_err(io_ctx("reading the HTTPS address"))?;
        let http = plain
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .map_err(io_ctx("reading the HTTP address"))?;
        let metrics = bind("metrics.listen", config.metrics.listen)?;
        Ok(Listeners {
            https_listener,
            https,
            plain,
            http,
            metrics,
        })
    }
}

/// The keyring of `[trust] keys` plus the keys bundles added, and the site key.
fn trust(
    config: &Config,
    store: &Store,
    data_dir: &Path,
) -> Result<Arc<crate::server::signatures::Signatures>, StartError> {
    let keyring = config.trust.keyring().map_err(|source| {
        crate::server::signatures::SignaturesError::Key {
            context: "[trust] keys".into(),
            source,
        }
    })?;
    let signatures = crate::server::signatures::Signatures::open(
        keyring,
        config.trust.require_signed,
        store.clone(),
        data_dir,
    )?;
    if !config.trust.require_signed {
        tracing::warn!(
            "[trust] require_signed is off: unsigned firmware can be released (see the README's \"Signed firmware\")"
        );
    }
    Ok(Arc::new(signatures))
}

/// The services of the appliance, wired to each other.
struct Services {
    firmware: Arc<FirmwareService>,
    devices: Arc<Devices>,
    ota: Arc<Ota>,
    broker: Arc<Broker>,
    /// The link to the site's broker, with `mqtt.engine = "external"`.
    external: Option<Arc<crate::server::broker::external::External>>,
    signer: UrlSigner,
    links: Arc<crate::server::links::Links>,
    campaigns: Arc<crate::server::campaigns::Campaigns>,
    deltas: Arc<crate::server::deltas::Deltas>,
    signatures: Arc<crate::server::signatures::Signatures>,
    bundles: Arc<crate::server::bundles::Bundles>,
}

/// What the services of a starting appliance share: its config, store and lifetime.
struct Running<'a> {
    config: &'a Config,
    store: &'a Store,
    shutdown: &'a CancellationToken,
    tracker: &'a TaskTracker,
}

impl Running<'_> {
    fn store_error(&self) -> impl FnOnce(crate::server::store::StoreError) -> StartError {
        let path = self.config.data_dir().join("store");
        move |source| StartError::Store { path, source }
    }

    /// The services, wired to each other, their workers started: firmware, deltas, devices,
    /// the broker, the OTA engine, campaigns, bundles.
    async fn services(
        &self,
        blobs: Blobs,
        signatures: Arc<crate::server::signatures::Signatures>,
        cert: Arc<certs::ReloadableCert>,
        signer: UrlSigner,
        public_url: &str,
    ) -> Result<Services, StartError> {
        let (config, store) = (self.config, self.store);
        let (shutdown, tracker) = (self.shutdown, self.tracker);
        let firmware = Arc::new(FirmwareService::new(
            store.clone(),
            blobs.clone(),
            signatures.clone(),
        ));
        let deltas = crate::server::deltas::Deltas::new(
            store.clone(),
            blobs.clone(),
            firmware.clone(),
            config.delta.clone(),
        );
        let on_external = config.mqtt.engine == crate::config::MqttEngine::External;
        let accounts_wake = Arc::new(tokio::sync::Notify::new());
        let devices = match (on_external, config.mqtt.external.sync) {
            (true, crate::config::AccountSync::MosquittoDynsec) => {
                Devices::syncing_accounts(store.clone(), accounts_wake.clone())
            }
            _ => Devices::new(store.clone()),
        };
        let devices = Arc::new(if on_external {
            devices.on_external_broker()
        } else {
            devices
        });
        let (msg_tx, msg_rx) = tokio::sync::mpsc::channel(16 * 1024);
        let (presence_tx, presence_rx) = tokio::sync::mpsc::unbounded_channel();
        let external = if on_external {
            Some(
                crate::server::broker::external::External::start(
                    config.mqtt.external.clone(),
                    &config.mqtt.topic_prefix,
                    crate::server::broker::external::ExternalWiring {
                        store: store.clone(),
                        messages: msg_tx.clone(),
                        presence: presence_tx.clone(),
                        accounts: accounts_wake,
                    },
                    shutdown.clone(),
                    tracker,
                )
                .map_err(|e| StartError::Broker(e.to_string()))?,
            )
        } else {
            None
        };
        // no ALPN: MQTT clients need none
        let mqtt_tls = if config.mqtt.require_certificate {
            certs::server_config_with_clients(
                cert.clone(),
                &[],
                Path::new(&config.mqtt.client_ca_file),
                certs::ClientCerts::Required,
            )?
        } else {
            certs::server_config(cert.clone(), &[])
        };
        let broker = Arc::new(
            Broker::start(
                config.mqtt.clone(),
                crate::server::broker::Wiring {
                    tls: Some(tokio_rustls::TlsAcceptor::from(mqtt_tls)),
                    store: store.clone(),
                    auth: devices.clone(),
                    messages: msg_tx,
                    presence: presence_tx,
                },
                shutdown.clone(),
                tracker,
            )
            .await
            .map_err(|e| StartError::Broker(e.to_string()))?,
        );
        let links = Arc::new(crate::server::links::Links::new(
            signer.clone(),
            public_url,
            &config.downloads,
        ));
        tracker.spawn(links.clone().probe(shutdown.clone()));
        let ota = Arc::new(Ota::new(
            store.clone(),
            devices.clone(),
            firmware.clone(),
            deltas.clone(),
            match &external {
                Some(x) => crate::server::broker::DeviceLink::External(x.clone()),
                None => crate::server::broker::DeviceLink::Embedded(broker.clone()),
            },
            links.clone(),
            OtaSettings {
                public_url: public_url.to_string(),
                topic_prefix: config.mqtt.topic_prefix.clone(),
                stall_timeout: Duration::from_secs(config.tasks.stall_timeout_secs),
                reboot_grace: Duration::from_secs(config.tasks.reboot_grace_secs),
                allow_anonymous: config.mqtt.allow_anonymous,
            },
        ));
        deltas
            .spawn(shutdown.clone(), tracker)
            .map_err(self.store_error())?;
        let campaigns = crate::server::campaigns::Campaigns::new(
            store.clone(),
            devices.clone(),
            firmware.clone(),
            deltas.clone(),
            ota.clone(),
        );
        campaigns.spawn(shutdown.clone(), tracker);
        let bundles = Arc::new(crate::server::bundles::Bundles::new(
            store.clone(),
            blobs,
            signatures.clone(),
            campaigns.clone(),
            http::campaigns_api::parse_plan,
        ));
        if let Err(e) = bundles.resume().await {
            tracing::error!(error = %e, "could not create the campaigns of an interrupted bundle import; importing the bundle again finishes it");
        }
        ota.spawn(msg_rx, presence_rx, shutdown.clone(), tracker)
            .map_err(self.store_error())?;
        Ok(Services {
            firmware,
            devices,
            ota,
            broker,
            external,
            signer,
            links,
            campaigns,
            deltas,
            signatures,
            bundles,
        })
    }

    /// The background work of a running appliance: store recovery after a full disk, the
    /// audit log's retention, and the end of event streams at shutdown.
    fn maintenance(&self, state: &http::AppState) {
        self.tracker.spawn(recover_store(
            self.store.clone(),
            state.deltas.clone(),
            // room for a few of sled's segments; uploads still wait for min_free_bytes
            self.config.store.min_free_bytes.min(8 << 20),
            self.shutdown.clone(),
        ));
        self.tracker.spawn(retain_audit(
            state.accounts.clone(),
            self.config.audit.clone(),
            self.shutdown.clone(),
        ));
        if self.config.tasks.keep_finished_per_device > 0 {
            self.tracker.spawn(archive_tasks(
                state.clone(),
                Duration::from_secs(self.config.tasks.archive_every_secs),
                self.shutdown.clone(),
            ));
        }
        // open event streams end at shutdown, so they never hold the listeners' drain
        let feed = self.store.events();
        let closing = self.shutdown.clone();
        self.tracker.spawn(async move {
            closing.cancelled().await;
            feed.close();
        });
    }
}

/// Says where the appliance serves, and how to make the first console user when none exists.
fn announce(
    (https, http): (SocketAddr, Option<SocketAddr>),
    broker: &Broker,
    public_url: &str,
    data_dir: &Path,
    store: &Store,
) {
    tracing::info!(https = %https, http = ?http, mqtt = %broker.mqtt, mqtts = ?broker.mqtts, public_url = %public_url, data_dir = %data_dir.display(), "hangar is serving");
    tracing::info!(console = %format!("{public_url}/"), "web console (sign in with a console user)");
    if !store.has_users().unwrap_or(true) {
        tracing::warn!(
            login = %format!("{public_url}/login"),
            "no console user exists yet: create the first administrator with `hangar user add NAME --role admin` (run it on this box, in this directory), then sign in"
        );
    }
}

impl App {
    /// Starts everything; returns once every listener is bound and serving.
    pub async fn start(config: Config) -> Result<App, StartError> {
        let (data_dir, lock, store, blobs) = open_data(&config)?;
        let (admin_token, signer) = secrets(&config, &data_dir)?;
        let (cert_paths, cert) = certificate(&config, &data_dir)?;
        let listeners = Listeners::bind(&config)?;
        let public_url = public_url(&config, listeners.https);
        let signatures = trust(&config, &store, &data_dir)?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let run = Running {
            config: &config,
            store: &store,
            shutdown: &shutdown,
            tracker: &tracker,
        };
        let sv = run
            .services(blobs, signatures, cert.clone(), signer, &public_url)
            .await?;
        let broker = sv.broker.clone();
        let hooks = hook_token(&config)?.map(|t| {
            let decide =
                crate::server::hooks::Hooks::new(sv.devices.clone(), &config.mqtt.topic_prefix);
            (Arc::new(decide), t)
        });
        let state = http::AppState::new(http::Inner {
            firmware: sv.firmware,
            devices: sv.devices,
            ota: sv.ota,
            broker: sv.broker,
            external: sv.external,
            store: store.clone(),
            signer: sv.signer,
            links: sv.links,
            hooks,
            campaigns: sv.campaigns,
            deltas: sv.deltas,
            signatures: sv.signatures,
            bundles: sv.bundles,
            admin_token: admin_token.clone(),
            public_url: public_url.clone(),
            max_upload_bytes: config.http.max_upload_bytes,
            min_free_bytes: config.store.min_free_bytes,
            body_idle_timeout: Duration::from_secs(config.http.body_idle_timeout_secs),
            fds: Default::default(),
            traffic: Default::default(),
            http_metrics: Default::default(),
            archive: crate::server::archive::Archive::new(&data_dir, store.clone()),
            keep_finished_per_device: config.tasks.keep_finished_per_device,
            data_dir: data_dir.clone(),
            cert: cert.clone(),
            accounts: Arc::new(crate::server::accounts::Accounts::new(
                store.clone(),
                &config.auth,
            )),
            stale_secs: config.tasks.stale_secs,
            max_bundle_bytes: config.http.max_bundle_bytes,
        });
        run.maintenance(&state);
        // with a client CA, devices may download with their certificate instead of a token
        let tls_config = if config.mqtt.client_ca_file.is_empty() {
            certs::server_config(cert.clone(), &[b"h2", b"http/1.1"])
        } else {
            certs::server_config_with_clients(
                cert.clone(),
                &[b"h2", b"http/1.1"],
                Path::new(&config.mqtt.client_ca_file),
                certs::ClientCerts::Optional,
            )?
        };
        let send = http::SendLimit {
            after: Duration::from_secs(config.http.send_timeout_secs),
            cut: state.http_metrics.send_timeouts.clone(),
        };
        let metrics_port = serve_http(
            state,
            send,
            (listeners.https_listener, tls_config),
            listeners.plain,
            listeners.metrics,
            &shutdown,
            &tracker,
        )?;
        write_ports(
            &data_dir,
            listeners.https.port(),
            listeners.http.map(|a| a.port()),
            broker.mqtt.port(),
            broker.mqtts.map(|a| a.port()),
            metrics_port,
        )
        .map_err(io_ctx("writing ports.json"))?;
        announce(
            (listeners.https, listeners.http),
            &broker,
            &public_url,
            &data_dir,
            &store,
        );

        Ok(App {
            https: listeners.https,
            http: listeners.http,
            mqtt: broker.mqtt,
            mqtts: broker.mqtts,
            data_dir,
            admin_token,
            ca_file: cert_paths.ca.clone(),
            public_url,
            cert,
            broker: broker.clone(),
            shutdown,
            tracker,
            store,
            _lock: lock,
        })
    }

    /// The feed of changes the console's live views follow (tests publish into it).
    pub fn events(&self) -> std::sync::Arc<crate::server::events::Feed> {
        self.store.events()
    }

    /// The token that stops the appliance when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Re-reads the TLS certificate files, `mqtt.acl_file` and `mqtt.password_file` (SIGHUP).
    /// A file that does not parse keeps what was in force.
    pub fn reload(&self) {
        match self.cert.reload() {
            Ok(()) => {
                tracing::info!(cert = %self.cert.paths().cert.display(), "reloaded the TLS certificate")
            }
            Err(e) => tracing::error!(error = %e, "certificate reload failed; keeping the old one"),
        }
        match self.broker.reload() {
            Ok(()) => tracing::info!("reloaded mqtt.acl_file and mqtt.password_file"),
            Err(e) => {
                tracing::error!(error = %e, "MQTT ACL/password file reload failed; keeping the old ones")
            }
        }
    }

    /// Waits until the shutdown token fires, drains the servers, then flushes the store.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
        tracing::info!("stopped");
    }

    /// Cancels and waits (for tests and embedding).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

/// `hangar serve`: start, tell systemd we are ready, run until SIGTERM/SIGINT, drain, flush.
pub async fn serve(config: Config) -> Result<(), StartError> {
    let signals = crate::server::shutdown::Signals::install()
        .map_err(io_ctx("installing signal handlers"))?;
    let app = Arc::new(App::start(config).await?);
    let token = app.shutdown_token();
    let hup_app = app.clone();
    let watcher = tokio::spawn(signals.watch(token.clone(), move || hup_app.reload()));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    token.cancelled().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = watcher.await; // drops the watcher's clone of the app
    match Arc::try_unwrap(app) {
        Ok(app) => app.wait().await,
        Err(_) => tracing::error!("internal: app still shared at shutdown"),
    }
    Ok(())
}

/// Keeps the audit log within `[audit]`: a pass at start and once a minute, passes back to back
/// while each still finds something to drop.
async fn retain_audit(
    accounts: Arc<crate::server::accounts::Accounts>,
    limits: crate::config::AuditConfig,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let max_age =
        (limits.max_age_days > 0).then(|| Duration::from_secs(limits.max_age_days * 86_400));
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        loop {
            match accounts.retain_audit(limits.max_entries, max_age).await {
                Ok(Some(span))
                    if crate::server::accounts::Accounts::retention_batch_full(&span)
                        && !shutdown.is_cancelled() =>
                {
                    continue;
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "audit retention failed; trying again in a minute");
                    break;
                }
            }
        }
    }
}

/// Moves finished tasks beyond `tasks.keep_finished_per_device` to the task archive: a pass at
/// start and one every `every`.
async fn archive_tasks(
    state: http::AppState,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let keep = state.keep_finished_per_device as usize;
        let pass = match state.campaigns.unfinished() {
            Ok(busy) => state.archive.pass(keep, busy).await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = pass {
            tracing::warn!(error = %e, "task archive pass failed; trying again at the next");
        }
    }
}

/// Reopens a store that failed (a full disk) once there is room again: looks every second.
/// Then builds the deltas whose outcome the failed store could not record.
async fn recover_store(
    store: Store,
    deltas: Arc<crate::server::deltas::Deltas>,
    min_free: u64,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if store.health().is_none() {
            continue;
        }
        match store.recover(min_free).await {
            Ok(true) => {
                if let Err(e) = deltas.requeue_unfinished() {
                    tracing::warn!(error = %e, "cannot queue the unfinished deltas again");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "store not reopened yet; trying again"),
        }
    }
}
