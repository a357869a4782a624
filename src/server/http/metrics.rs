//! `GET /metrics`: Prometheus text exposition (prometheus-client encodes it; nothing is
//! hand-written). Counters that live elsewhere (broker, OTA drops, traffic, deltas) are read at
//! scrape time into a fresh registry; the HTTP request counts by route and status are kept here by
//! a middleware.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::AppState;
use crate::server::error::ServiceError;
use crate::server::store::TaskStatus;

type Labels = Vec<(String, String)>;

/// What the HTTP layer counts itself.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    requests: Mutex<HashMap<(String, &'static str, u16), u64>>,
    /// Requests refused for a missing or wrong admin token / signed URL.
    pub auth_failures: AtomicU64,
    /// Request bodies cut off because the client paused longer than `http.body_idle_timeout_secs`.
    pub body_timeouts: std::sync::Arc<AtomicU64>,
    /// Connections closed because the client took nothing for `http.send_timeout_secs`.
    pub send_timeouts: std::sync::Arc<AtomicU64>,
}

/// Middleware: runs every request in an `http` span (method, route, status) and counts it by
/// matched route, method and status.
pub async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    // one span per request: what the handlers log carries the route and method
    let span = tracing::info_span!("http", method, route = %route, status = tracing::field::Empty);
    let resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let status = resp.status().as_u16();
    span.record("status", status);
    if status == 401 {
        st.http_metrics
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
    }
    *st.http_metrics
        .requests
        .lock()
        .expect("poisoned")
        .entry((route, method, status))
        .or_default() += 1;
    resp
}

/// A request method as a label: the standard ones by name, anything else `OTHER` (a client
/// must not mint label values).
fn method_label(m: &axum::http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

/// A counter's value.
fn g(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Builds the exposition text, section by section.
pub fn render(st: &AppState) -> Result<String, ServiceError> {
    let mut reg = Registry::with_prefix("hangar");
    devices_and_mqtt(&mut reg, st);
    site_broker(&mut reg, st);
    bridges(&mut reg, st);
    tasks(&mut reg, st)?;
    campaigns(&mut reg, st)?;
    downloads(&mut reg, st);
    hooks(&mut reg, st);
    http(&mut reg, st);
    deltas_and_store(&mut reg, st)?;
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| ServiceError::Io(std::io::Error::other(e)))?;
    Ok(out)
}

/// Each `[[mqtt.bridge]]`: its links, its disk queue, what it carried.
fn bridges(reg: &mut Registry, st: &AppState) {
    let list = &st.broker.bridges.list;
    if list.is_empty() {
        return;
    }
    let up = Family::<Labels, Gauge>::default();
    let queued = Family::<Labels, Gauge>::default();
    let messages = Family::<Labels, Counter>::default();
    for b in list {
        let name = b.settings.name.as_str();
        let s = &b.stats;
        for (dir, v) in [("out", &s.out_up), ("in", &s.in_up)] {
            up.get_or_create(&labels(&[("bridge", name), ("direction", dir)]))
                .set(v.load(std::sync::atomic::Ordering::Relaxed) as i64);
        }
        queued
            .get_or_create(&labels(&[("bridge", name)]))
            .set(g(&s.queued) as i64);
        for (what, v) in [
            ("forwarded", &s.forwarded),
            ("received", &s.received),
            ("dropped_queue_full", &s.dropped),
            ("refused_ota", &s.ota_refused),
        ] {
            messages
                .get_or_create(&labels(&[("bridge", name), ("result", what)]))
                .inc_by(g(v));
        }
    }
    reg.register(
        "bridge_up",
        "1 while a bridge's link is up, by direction",
        up,
    );
    reg.register(
        "bridge_queued",
        "Messages kept on disk for a bridge's other broker",
        queued,
    );
    reg.register(
        "bridge_messages",
        "Messages of a bridge: forwarded (acknowledged by the other broker), received, dropped_queue_full (the oldest, beyond queue_max_messages), refused_ota",
        messages,
    );
}

/// The link to the site's broker (`mqtt.engine = "external"`) and its account sync.
fn site_broker(reg: &mut Registry, st: &AppState) {
    let Some(x) = &st.external else {
        return;
    };
    gauge(
        reg,
        "site_broker_up",
        "1 while Hangar's connection to the site's broker is up",
        x.is_connected() as i64,
    );
    let c = &x.counters;
    for (name, help, v) in [
        (
            "site_broker_connects",
            "Connections made to the site's broker",
            &c.connects,
        ),
        (
            "site_broker_reports_in",
            "Device reports and heartbeats received from the site's broker",
            &c.reports_in,
        ),
        (
            "site_broker_acks_sent",
            "Reports acknowledged to the site's broker after they were stored",
            &c.acks_sent,
        ),
        (
            "site_broker_acks_withheld",
            "Deliveries not acknowledged (of an earlier connection, or not stored): the broker sends them again",
            &c.acks_withheld,
        ),
        (
            "site_broker_foreign_messages",
            "Messages on Hangar's subscriptions that were no device's report",
            &c.foreign,
        ),
        (
            "site_broker_commands_out",
            "Commands handed to the site's broker",
            &c.commands_out,
        ),
        (
            "site_broker_command_failures",
            "Commands not sent because the link was down (sent again when the device shows up)",
            &c.command_failures,
        ),
        (
            "site_broker_subscriptions_refused",
            "Subscriptions the site's broker refused",
            &c.subscriptions_refused,
        ),
    ] {
        counter(reg, name, help, g(v));
    }
    if let Some(d) = &x.dynsec {
        let s = d.state();
        gauge(
            reg,
            "site_broker_accounts_queued",
            "Device account changes not yet confirmed by the broker",
            d.queued() as i64,
        );
        gauge(
            reg,
            "site_broker_accounts_missing",
            "Registered devices without an account on the broker (set their secret again)",
            s.missing as i64,
        );
        counter(
            reg,
            "site_broker_accounts_applied",
            "Device account changes the broker confirmed",
            g(&d.counters.applied),
        );
        counter(
            reg,
            "site_broker_accounts_failed",
            "Device account changes the broker refused or did not answer (retried)",
            g(&d.counters.failed),
        );
        counter(
            reg,
            "site_broker_accounts_removed",
            "Managed broker accounts deleted because their device is gone",
            g(&d.counters.removed),
        );
    }
}

/// Connected devices, the broker, reports and logins.
fn devices_and_mqtt(reg: &mut Registry, st: &AppState) {
    let (gw, ali) = st.devices.online_by_protocol();
    let online = Family::<Labels, Gauge>::default();
    online
        .get_or_create(&labels(&[("protocol", "gateway")]))
        .set(gw as i64);
    online
        .get_or_create(&labels(&[("protocol", "alibaba")]))
        .set(ali as i64);
    reg.register(
        "connected_devices",
        "Devices with an open MQTT connection",
        online,
    );
    let b = &st.broker.counters;
    counter(
        reg,
        "mqtt_messages_in",
        "PUBLISH packets received (device reports and general traffic)",
        g(&b.messages_in),
    );
    counter(
        reg,
        "mqtt_messages_out",
        "PUBLISH packets sent",
        g(&b.messages_out),
    );
    let z = st.broker.router.sizes();
    let clients = Family::<Labels, Gauge>::default();
    for (kind, n) in z.connected_by_kind {
        clients
            .get_or_create(&labels(&[("kind", kind)]))
            .set(n as i64);
    }
    reg.register(
        "mqtt_clients",
        "Connected MQTT clients, by kind (device, user, anonymous)",
        clients,
    );
    for (name, help, v) in [
        (
            "mqtt_sessions_stored",
            "Persistent sessions of disconnected clients",
            z.stored,
        ),
        (
            "mqtt_subscriptions",
            "Subscriptions (general filters and devices' command topics)",
            z.subscriptions,
        ),
        ("mqtt_retained", "Retained messages", z.retained),
        (
            "mqtt_retained_bytes",
            "Bytes of retained payloads",
            z.retained_bytes,
        ),
        (
            "mqtt_queued",
            "Messages queued or in flight to clients",
            z.queued,
        ),
        (
            "mqtt_users",
            "Application users (store and password_file)",
            st.broker.users.count(),
        ),
    ] {
        gauge(reg, name, help, v as i64);
    }
    counter(
        reg,
        "mqtt_session_takeovers",
        "Connections closed because another took over their client id",
        g(&b.session_takeovers),
    );
    gauge(
        reg,
        "mqtt_pending_connections",
        "Connections that have not logged in yet",
        st.broker.preauth.waiting() as i64,
    );
    counter(
        reg,
        "mqtt_pending_evicted",
        "Connections closed before logging in to make room for a newer one",
        st.broker
            .preauth
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let dropped = Family::<Labels, Counter>::default();
    let r = st.ota.reports.snapshot();
    for (reason, v) in r.dropped.iter().map(|(d, n)| (d.label(), *n)).chain([
        ("acl_denied", g(&b.acl_denied)),
        ("protocol_error", g(&b.protocol_errors)),
        ("publish_failure", g(&b.publish_failures)),
        ("no_subscriber", g(&b.publish_no_subscriber)),
        ("queue_full", g(&b.dropped_queue_full)),
        ("retained_limit", g(&b.dropped_retained_limit)),
        ("too_large", g(&b.dropped_too_large)),
        ("subscription_limit", g(&b.subscriptions_refused)),
        ("session_not_kept", g(&b.sessions_not_kept)),
    ]) {
        dropped
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(v);
    }
    reg.register(
        "mqtt_messages_dropped",
        "MQTT messages dropped, by reason",
        dropped,
    );
    let used = Family::<Labels, Counter>::default();
    for (outcome, v) in [
        ("applied", r.applied),
        ("heartbeat", r.heartbeats),
        ("matched_without_msg_id", r.matched_without_msg_id),
        ("request", r.requests),
        ("repeat", r.repeats),
    ] {
        used.get_or_create(&labels(&[("outcome", outcome)]))
            .inc_by(v);
    }
    reg.register(
        "reports_used",
        "Device reports used, by what they were (dropped ones: mqtt_messages_dropped)",
        used,
    );
    let auth = Family::<Labels, Counter>::default();
    auth.get_or_create(&labels(&[("listener", "mqtt")]))
        .inc_by(g(&b.auth_failures));
    auth.get_or_create(&labels(&[("listener", "mqtt_tls_handshake")]))
        .inc_by(g(&b.tls_handshake_failures));
    auth.get_or_create(&labels(&[("listener", "http")]))
        .inc_by(st.http_metrics.auth_failures.load(Ordering::Relaxed));
    reg.register("auth_failures", "Refused logins and requests", auth);
    counter(
        reg,
        "http_body_timeouts",
        "Request bodies cut off because the client sent nothing for http.body_idle_timeout_secs",
        st.http_metrics.body_timeouts.load(Ordering::Relaxed),
    );
    counter(
        reg,
        "http_send_timeouts",
        "Connections closed because the client took nothing for http.send_timeout_secs",
        st.http_metrics.send_timeouts.load(Ordering::Relaxed),
    );
    let reloads = Family::<Labels, Counter>::default();
    reloads
        .get_or_create(&labels(&[("result", "ok")]))
        .inc_by(st.cert.reloads.load(Ordering::Relaxed));
    reloads
        .get_or_create(&labels(&[("result", "failed")]))
        .inc_by(st.cert.reload_failures.load(Ordering::Relaxed));
    reg.register(
        "tls_reloads",
        "TLS certificate reloads on SIGHUP (a failed one keeps the certificate in use)",
        reloads,
    );
    counter(
        reg,
        "mqtt_connections_accepted",
        "MQTT connections accepted",
        g(&b.connections_accepted),
    );
    counter(
        reg,
        "commands_sent",
        "Upgrade commands sent to devices",
        st.ota.commands_sent(),
    );
}

/// Upgrade tasks by state (those in the task archive counted with the finished states), and
/// how long the completed ones in the store took. Reads the tasks one at a time.
fn tasks(reg: &mut Registry, st: &AppState) -> Result<(), ServiceError> {
    const STATES: [TaskStatus; 7] = [
        TaskStatus::Pending,
        TaskStatus::Downloading,
        TaskStatus::Verifying,
        TaskStatus::Installing,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];
    let mut counts = [0u64; STATES.len()];
    let durations = Histogram::new(exponential_buckets(5.0, 2.0, 12));
    st.store.each_task(|t| {
        if let Some(i) = STATES.iter().position(|s| *s == t.status) {
            counts[i] += 1;
        }
        if t.status == TaskStatus::Completed
            && let (Some(a), Some(b)) = (t.start_time_ms, t.complete_time_ms)
        {
            durations.observe((b - a).max(0) as f64 / 1000.0);
        }
        Ok::<(), ServiceError>(())
    })?;
    let archived = st.store.task_archive()?.all;
    for (s, n) in [
        (TaskStatus::Completed, archived.completed),
        (TaskStatus::Failed, archived.failed),
        (TaskStatus::Cancelled, archived.cancelled),
    ] {
        if let Some(i) = STATES.iter().position(|x| *x == s) {
            counts[i] += n;
        }
    }
    let by_state = Family::<Labels, Gauge>::default();
    for (s, n) in STATES.iter().zip(counts) {
        by_state
            .get_or_create(&labels(&[("state", s.as_str())]))
            .set(n as i64);
    }
    reg.register("tasks", "Upgrade tasks by state", by_state);
    reg.register(
        "task_duration_seconds",
        "From command to completion, completed tasks",
        durations,
    );
    Ok(())
}

/// Campaigns by state, and the engine's rounds.
fn campaigns(reg: &mut Registry, st: &AppState) -> Result<(), ServiceError> {
    let camps = Family::<Labels, Gauge>::default();
    let list = st.campaigns.list()?;
    for s in ["scheduled", "running", "paused", "completed", "cancelled"] {
        camps
            .get_or_create(&labels(&[("state", s)]))
            .set(list.iter().filter(|c| c.status.as_str() == s).count() as i64);
    }
    reg.register("campaigns", "Campaigns by state", camps);
    counter(
        reg,
        "campaign_rounds",
        "Campaign engine rounds finished",
        st.campaigns.rounds(),
    );
    Ok(())
}

/// Bytes of images and patches sent, and the open-file cache.
fn downloads(reg: &mut Registry, st: &AppState) {
    let t = st.traffic.summary();
    let bytes = Family::<Labels, Counter>::default();
    bytes
        .get_or_create(&labels(&[("kind", "full")]))
        .inc_by(t.bytes_full);
    bytes
        .get_or_create(&labels(&[("kind", "delta")]))
        .inc_by(t.bytes_delta);
    reg.register("download_bytes", "Bytes of images and deltas sent", bytes);
    counter(
        reg,
        "download_bytes_saved",
        "Full-image bytes deltas made unnecessary",
        t.bytes_saved,
    );
    counter(
        reg,
        "download_requests",
        "Download requests with a body",
        t.requests,
    );
    counter(
        reg,
        "download_range_requests",
        "Download requests answered 206",
        t.range_requests,
    );
    gauge(
        reg,
        "active_downloads",
        "Download bodies being sent now",
        st.traffic.active(),
    );
    let edges = Family::<Labels, Gauge>::default();
    for e in st.links.edges() {
        let state = match e.state {
            crate::server::links::EdgeState::Up => 1,
            crate::server::links::EdgeState::Down => 0,
            crate::server::links::EdgeState::Unknown => -1,
        };
        edges
            .get_or_create(&labels(&[("edge", &e.base_url)]))
            .set(state);
    }
    reg.register(
        "download_edge_up",
        "Each download edge's last probe: 1 up, 0 down (its devices get the appliance's URLs), -1 not probed yet",
        edges,
    );
}

/// The broker hooks' decisions (when `[hooks] token_file` turns them on).
fn hooks(reg: &mut Registry, st: &AppState) {
    let Some((h, _)) = &st.hooks else {
        return;
    };
    let c = &h.counters;
    let decisions = Family::<Labels, Counter>::default();
    for (result, v) in [
        ("allow", g(&c.allowed)),
        ("deny", g(&c.denied)),
        ("not_ours", g(&c.not_ours)),
    ] {
        decisions
            .get_or_create(&labels(&[("result", result)]))
            .inc_by(v);
    }
    reg.register(
        "hook_decisions",
        "Answers to the site broker's hooks: allow, deny, not ours (its next authenticator or ACL decides)",
        decisions,
    );
    counter(
        reg,
        "hook_cache_hits",
        "Hook answers taken from the decision cache",
        g(&c.cache_hits),
    );
}

/// Requests by route, method and status.
fn http(reg: &mut Registry, st: &AppState) {
    let reqs = Family::<Labels, Counter>::default();
    for ((route, method, status), n) in st.http_metrics.requests.lock().expect("poisoned").iter() {
        reqs.get_or_create(&labels(&[
            ("route", route),
            ("method", method),
            ("status", &status.to_string()),
        ]))
        .inc_by(*n);
    }
    reg.register(
        "http_requests",
        "HTTP requests by route, method and status",
        reqs,
    );
    let sign_ins = Family::<Labels, Counter>::default();
    let c = &st.accounts.sign_ins;
    for (result, v) in [
        ("ok", &c.ok),
        ("wrong", &c.wrong),
        ("throttled", &c.throttled),
        ("busy", &c.busy),
    ] {
        sign_ins
            .get_or_create(&labels(&[("result", result)]))
            .inc_by(g(v));
    }
    reg.register(
        "auth_sign_ins",
        "Console sign-in attempts by result: ok, wrong (name or password), throttled (too many failures), busy (every password check slot taken)",
        sign_ins,
    );
    counter(
        reg,
        "auth_password_checks",
        "argon2id password hashes and checks run (each ~19 MiB while it runs)",
        g(&st.accounts.passwords().runs),
    );
}

/// The delta service and the store.
fn deltas_and_store(reg: &mut Registry, st: &AppState) -> Result<(), ServiceError> {
    let dc = &st.deltas.counters;
    gauge(
        reg,
        "delta_queue_length",
        "Deltas waiting for a worker",
        g(&dc.queued) as i64,
    );
    counter(reg, "deltas_built", "Deltas built", g(&dc.built));
    counter(
        reg,
        "deltas_failed",
        "Delta builds that failed",
        g(&dc.failed),
    );
    counter(
        reg,
        "deltas_skipped",
        "Deltas not worth offering",
        g(&dc.skipped),
    );
    let gen_time = Histogram::new(exponential_buckets(0.05, 2.0, 12));
    for d in st.deltas.all()? {
        if let Some(ms) = d.build_ms {
            gen_time.observe(ms as f64 / 1000.0);
        }
    }
    reg.register(
        "delta_generation_seconds",
        "Time to build each stored delta",
        gen_time,
    );
    gauge(
        reg,
        "store_size_bytes",
        "Size of the store on disk (records; images are separate files)",
        st.store.size_on_disk().unwrap_or(0) as i64,
    );
    gauge(
        reg,
        "store_degraded",
        "1 while the store cannot write (a full disk) and recovers by itself, else 0",
        i64::from(st.store.health().is_some()),
    );
    counter(
        reg,
        "store_recoveries",
        "Times the store was reopened after a write failure",
        st.store.recoveries(),
    );
    gauge(
        reg,
        "data_dir_free_bytes",
        "Bytes free on the data directory's filesystem",
        st.store.free_bytes().unwrap_or(0).min(i64::MAX as u64) as i64,
    );
    Ok(())
}

/// GET /metrics
pub async fn metrics(State(st): State<AppState>) -> Response {
    match render(&st) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => super::error::ApiError::from(e).into_response(),
    }
}
