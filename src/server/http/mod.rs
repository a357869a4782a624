//! HTTP: the only module that names hyper and axum. Builds the router (admin API behind the
//! bearer token, `/healthz` open, `/firmware/...` with token or signed URL) and serves it on a
//! listener, plain or TLS. The TLS handshake runs inside each connection's task with a timeout,
//! never in the accept loop, so one idle client cannot stall the others. On shutdown the accept
//! loop stops and open connections drain until a deadline.

pub mod access;
pub mod accounts_api;
pub mod campaigns_api;
pub mod console;
pub mod deltas_api;
pub mod devices_api;
pub mod download;
pub mod downloads_api;
pub mod error;
pub mod firmware_api;
pub mod hooks_api;
pub mod metrics;
pub mod mqtt_api;
pub mod partguard;
pub mod refusal;
pub mod stall;
pub mod trust_api;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::auth::UrlSigner;
use crate::server::firmware::FirmwareService;
use crate::server::store::Store;

/// How long a client may take to finish the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's HTTP/1 read buffer limit and write-queue bound, per connection.
const HTTP1_MAX_BUF: usize = 64 * 1024;
/// How long an HTTP/1 client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the handlers need; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The shared state behind [`AppState`].
pub struct Inner {
    /// Firmware catalogue.
    pub firmware: Arc<FirmwareService>,
    /// Device registry.
    pub devices: Arc<crate::server::registry::Devices>,
    /// Task engine.
    pub ota: Arc<crate::server::ota::Ota>,
    /// Device broker (counters).
    pub broker: Arc<crate::server::broker::Broker>,
    /// The link to the site's broker, with `mqtt.engine = "external"`.
    pub external: Option<Arc<crate::server::broker::external::External>>,
    /// Store handle (health, stats).
    pub store: Store,
    /// Admin bearer token.
    pub admin_token: String,
    /// Signed-URL signer.
    pub signer: UrlSigner,
    /// Download URLs for commands, nginx's secure links, the edges.
    pub links: Arc<crate::server::links::Links>,
    /// The broker hooks' decisions and their credential (`[hooks] token_file`), when on.
    pub hooks: Option<(Arc<crate::server::hooks::Hooks>, String)>,
    /// Base URL for links (no trailing slash).
    pub public_url: String,
    /// Upload limit.
    pub max_upload_bytes: u64,
    /// Free bytes an upload must leave on the data directory's filesystem.
    pub min_free_bytes: u64,
    /// Longest pause of a client in the middle of a request body.
    pub body_idle_timeout: Duration,
    /// Open descriptors of recently served images.
    pub fds: download::FdCache,
    /// Campaign engine.
    pub campaigns: Arc<crate::server::campaigns::Campaigns>,
    /// Delta packages.
    pub deltas: Arc<crate::server::deltas::Deltas>,
    /// Bytes served per image and delta.
    pub traffic: Arc<crate::server::traffic::Traffic>,
    /// The data directory (backups).
    pub data_dir: std::path::PathBuf,
    /// Finished tasks moved out of the store.
    pub archive: Arc<crate::server::archive::Archive>,
    /// `tasks.keep_finished_per_device` (0: no archive passes unless asked with a number).
    pub keep_finished_per_device: u32,
    /// Request counters of the HTTP layer.
    pub http_metrics: metrics::HttpMetrics,
    /// The served certificate (its reload counters).
    pub cert: Arc<crate::server::certs::ReloadableCert>,
    /// Console users, sessions and the audit log.
    pub accounts: Arc<crate::server::accounts::Accounts>,
    /// Seconds without a report after which the console calls an in-flight device stale.
    pub stale_secs: u64,
    /// Trusted keys, the signing policy and the site key.
    pub signatures: Arc<crate::server::signatures::Signatures>,
    /// Largest offline bundle accepted.
    pub max_bundle_bytes: u64,
    /// Offline bundle imports.
    pub bundles: Arc<crate::server::bundles::Bundles>,
}

impl AppState {
    /// Wraps the shared state.
    pub fn new(inner: Inner) -> AppState {
        AppState(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The router of the loopback-only metrics listener (`[metrics] listen`): `/metrics` without a
/// token and nothing else — every other path is 404 there, whatever the method. Anything added
/// here is served to every local user without credentials (`tests/ops.rs` walks every route of
/// every listener to hold this).
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::metrics))
        .fallback(firmware_api::not_found)
        .method_not_allowed_fallback(firmware_api::method_not_allowed)
        .with_state(state)
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    // an authenticated client's refused body is read up to twice the upload limit
    let budget = refusal::DrainBudget {
        bytes: state.max_upload_bytes.saturating_mul(2).max(64 << 20),
        time: Duration::from_secs(60),
    };
    let idle = refusal::IdleLimit {
        after: state.body_idle_timeout,
        count: state.http_metrics.body_timeouts.clone(),
    };
    let api = Router::new()
        .route(
            "/api/ota/firmware/upload",
            post(firmware_api::upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/ota/firmware", get(firmware_api::list))
        .route("/api/ota/firmware/latest", get(firmware_api::latest))
        .route(
            "/api/ota/firmware/{version}",
            get(firmware_api::get_one).delete(firmware_api::delete),
        )
        .route(
            "/api/ota/firmware/{version}/release",
            post(firmware_api::release),
        )
        .route(
            "/api/ota/firmware/{version}/status",
            post(firmware_api::set_status),
        )
        .route(
            "/api/ota/firmware/{version}/deltas",
            get(deltas_api::list).post(deltas_api::request),
        )
        .route(
            "/api/ota/devices",
            get(devices_api::list_devices).post(devices_api::register),
        )
        .route(
            "/api/ota/devices/import",
            post(devices_api::import).layer(DefaultBodyLimit::max(64 << 20)),
        )
        .route(
            "/api/ota/devices/{id}",
            get(devices_api::get_device)
                .patch(devices_api::change_device)
                .delete(devices_api::delete_device),
        )
        .route("/api/ota/upgrade/{device}", post(devices_api::upgrade))
        .route("/api/ota/task/{device}", get(devices_api::latest_task))
        .route("/api/ota/task/{device}/cancel", post(devices_api::cancel))
        .route("/api/ota/tasks", get(devices_api::list_tasks))
        .route("/api/ota/tasks/archive", post(devices_api::archive_tasks))
        .route("/api/ota/statistics", get(devices_api::statistics))
        .route(
            "/api/ota/campaigns",
            get(campaigns_api::list).post(campaigns_api::create),
        )
        .route("/api/ota/campaigns/dry-run", post(campaigns_api::dry_run))
        .route("/api/ota/campaigns/{id}", get(campaigns_api::get_one))
        .route("/api/ota/campaigns/{id}/{action}", post(campaigns_api::act))
        .route("/metrics", get(metrics::metrics))
        .route("/api/ota/backup", get(firmware_api::backup))
        .route(
            "/api/ota/bundles",
            post(trust_api::import).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/site", get(trust_api::site))
        .route("/api/reports", get(trust_api::report))
        .route("/api/auth/logout", post(accounts_api::logout))
        .route("/api/auth/session", get(accounts_api::session))
        .route(
            "/api/users",
            get(accounts_api::list_users).post(accounts_api::add_user),
        )
        .route(
            "/api/users/{name}",
            axum::routing::patch(accounts_api::change_user).delete(accounts_api::delete_user),
        )
        .route(
            "/api/mqtt/users",
            get(mqtt_api::list_users).post(mqtt_api::add_user),
        )
        .route(
            "/api/mqtt/users/{name}",
            axum::routing::delete(mqtt_api::delete_user),
        )
        .route("/api/mqtt/clients", get(mqtt_api::clients))
        .route("/api/audit", get(accounts_api::audit))
        .route("/api/events", get(accounts_api::events))
        .route_layer(middleware::from_fn_with_state(state.clone(), access::guard));
    // the site broker's hooks: their own credential, small bodies (VerneMQ: no_payload = on)
    let hooks = Router::new()
        .route("/hooks/emqx/authn", post(hooks_api::emqx_authn))
        .route("/hooks/emqx/authz", post(hooks_api::emqx_authz))
        .route(
            "/hooks/vernemq/auth_on_register",
            post(hooks_api::vernemq_register),
        )
        .route(
            "/hooks/vernemq/auth_on_subscribe",
            post(hooks_api::vernemq_subscribe),
        )
        .route(
            "/hooks/vernemq/auth_on_publish",
            post(hooks_api::vernemq_publish),
        )
        .layer(DefaultBodyLimit::max(64 << 10));
    Router::new()
        .route("/healthz", get(firmware_api::healthz))
        .route(
            "/api/auth/login",
            post(accounts_api::login).layer(DefaultBodyLimit::max(16 << 10)),
        )
        .merge(console::router(state.clone()))
        .route("/firmware/{file}", get(downloads_api::firmware))
        .route("/firmware/deltas/{file}", get(downloads_api::delta))
        .merge(hooks)
        .merge(api)
        .fallback(firmware_api::not_found)
        .method_not_allowed_fallback(firmware_api::method_not_allowed)
        .layer(middleware::map_response(json_headers))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(middleware::from_fn(move |req, next| {
            refusal::drain_refused(budget, idle.clone(), req, next)
        }))
        .with_state(state)
}

/// Headers of every JSON answer (the API's envelopes, errors included): never sniffed as
/// something else, never cached (they carry fleet state and, for some, secrets).
async fn json_headers(mut resp: axum::response::Response) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if json {
        let h = resp.headers_mut();
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.entry(header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
    }
    resp
}

/// The CN of the client certificate the HTTPS listener verified for this connection (only when
/// `mqtt.client_ca_file` is set: a device downloads with its certificate instead of a token).
#[derive(Debug, Clone)]
pub struct ClientCert(pub Option<Arc<str>>);

/// The send timeout of a listener's connections and the counter of those it closed.
#[derive(Clone)]
pub struct SendLimit {
    /// How long a client may take nothing.
    pub after: Duration,
    /// Connections closed for it.
    pub cut: Arc<std::sync::atomic::AtomicU64>,
}

/// Serves `router` on `listener` until `shutdown` fires, then drains open connections for up
/// to `drain`. With `tls`, every connection does its handshake in its own task with a timeout.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    shutdown: CancellationToken,
    drain: Duration,
    send_timeout: SendLimit,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // A header line with a control character (or a malformed name) is dropped, as nginx
        // does by default, and the request answered normally — with the envelope if it is
        // refused — instead of hyper's bodiless 400 and a closed connection.
        .ignore_invalid_headers(true)
        // Also caps hyper's per-connection write queue: with page-cache reads answering at once,
        // a larger value lets every download buffer that much body (1 MiB: ~600 MiB for 1,000).
        .max_buf_size(HTTP1_MAX_BUF);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Every connection task, so none outlives `serve` (each holds the router, and through it the
    // store: an appliance started again in the same process must find the store free).
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, scheme, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let stream = stall::SendTimeout::new(stream, send_timeout.after, send_timeout.cut.clone());
        let secure = tls.is_some();
        let router = router.clone();
        // what every request of the connection carries: the peer, TLS, and the CN of a client
        // certificate the listener verified (`mqtt.client_ca_file`)
        let service = move |cn: Option<Arc<str>>| {
            TowerToHyperService::new(tower::ServiceExt::map_request(
                router,
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    req.extensions_mut().insert(accounts_api::Tls(secure));
                    req.extensions_mut().insert(ClientCert(cn.clone()));
                    req
                },
            ))
        };
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        conns.spawn(async move {
            match tls {
                Some(acceptor) => {
                    let tls_stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(peer = %peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let cn = tls_stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| crate::tls::certificate_cn(c))
                        .map(Arc::from);
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(tls_stream), service(cn));
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                }
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service(None));
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            scheme,
            "connections still open after the drain deadline; closing them"
        );
    }
    // the drained ones end by themselves; the rest (still in a TLS handshake, or past the
    // deadline) are closed here
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}
