//! The site's MQTT broker, ours end to end: the only module that speaks MQTT framing. It
//! carries the devices' OTA traffic with its built-in rules and the site's general traffic
//! (telemetry, alarms, line commands, the applications that read them) beside it, on the same
//! listeners.
//!
//! - [`frontdoor`]: listeners, TLS (client certificates as identity), the pre-auth gate
//!   ([`preauth`]) and the login: a device (registry), an application user ([`users`]: the
//!   store and a `mosquitto_passwd` file), or an anonymous client.
//! - [`connection`]: one logged-in connection, packet by packet ([`packet`] is the codec).
//! - [`router`]: sessions, subscriptions ([`topics`]), queues and retained messages, with
//!   persistent state in the store.
//! - [`acl`]: a mosquitto `acl_file` for general topics; OTA topics are not in its reach.
//!
//! Why our own broker rather than rumqttd or rmqtt: ARCHITECTURE.md ("broker") has the spike's
//! figures — neither kept an acknowledged queued message across `kill -9`, and both cost more
//! than 10 KB per idle device.

pub mod acl;
pub mod bridge;
mod connection;
pub mod dynsec;
pub mod external;
mod frontdoor;
pub(crate) use frontdoor::replay_session;
pub mod packet;
pub mod preauth;
pub mod router;
pub mod topics;
pub mod users;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::MqttConfig;
use crate::protocol::{Inbound, Protocol};
use crate::server::store::Store;

/// Looks up devices; implemented by the device registry.
pub trait Authenticator: Send + Sync + 'static {
    /// `Some((device id, protocol))` if the credentials are right.
    fn authenticate(&self, username: &str, password: &str) -> Option<(String, Protocol)>;
    /// `Some((device id, protocol))` if a device of this id or login name is registered (a
    /// client certificate's CN).
    fn device(&self, name: &str) -> Option<(String, Protocol)>;
}

/// A report a device published, for the OTA service.
#[derive(Debug)]
pub struct InboundMessage {
    /// The device (from its login, or from the topic in anonymous mode).
    pub device_id: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// What the topic carries.
    pub kind: Inbound,
    /// The raw payload.
    pub payload: Bytes,
    /// The device logged in with credentials (false: anonymous lab mode).
    pub authenticated: bool,
    /// Signal once the message is processed and persisted; the device's PUBACK waits for it.
    pub done: Option<oneshot::Sender<()>>,
}

/// Connection life of a device, for presence and command re-sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// A connection was accepted (for an anonymous lab device: once it said who it is).
    Connected {
        id: String,
        protocol: Protocol,
        ip: String,
        /// It did not log in with credentials (`mqtt.allow_anonymous`).
        anonymous: bool,
    },
    /// The device subscribed to its command topic: commands published now reach it.
    Ready {
        id: String,
        protocol: Protocol,
        /// When it subscribed, ms since the epoch (commands sent before then may be lost).
        at_ms: i64,
    },
    /// A connection ended.
    Disconnected { id: String },
}

impl Presence {
    /// `Ready`, stamped now.
    pub fn ready(id: String, protocol: Protocol) -> Presence {
        Presence::Ready {
            id,
            protocol,
            at_ms: crate::time::now_ms(),
        }
    }
}

/// Counters of traffic, refusals and drops (`/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_accepted: AtomicU64,
    pub auth_failures: AtomicU64,
    pub acl_denied: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// PUBLISH packets received (reports and general traffic).
    pub messages_in: AtomicU64,
    /// PUBLISH packets sent.
    pub messages_out: AtomicU64,
    pub publish_failures: AtomicU64,
    /// Commands published while no connection listened on the topic (the device gets them
    /// when it subscribes again).
    pub publish_no_subscriber: AtomicU64,
    /// Sessions closed because a new connection with the same client id took them over.
    pub session_takeovers: AtomicU64,
    /// Messages not queued: the client's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Retained messages not retained: the limit was reached.
    pub dropped_retained_limit: AtomicU64,
    /// Packets over `max_packet_bytes` (the connection is closed).
    pub dropped_too_large: AtomicU64,
    /// Subscriptions refused beyond `max_subscriptions_per_client`.
    pub subscriptions_refused: AtomicU64,
    /// Persistent sessions not kept because too many were stored.
    pub sessions_not_kept: AtomicU64,
}

impl Counters {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Messages per second in and out over the last few seconds (the console's "Broker" page).
#[derive(Debug, Default)]
pub struct Rates {
    /// f64 bits.
    messages_in: AtomicU64,
    messages_out: AtomicU64,
}

impl Rates {
    /// (in, out) messages per second.
    pub fn get(&self) -> (f64, f64) {
        (
            f64::from_bits(self.messages_in.load(Ordering::Relaxed)),
            f64::from_bits(self.messages_out.load(Ordering::Relaxed)),
        )
    }

    /// Samples the counters every two seconds until shutdown.
    async fn sample(self: Arc<Self>, counters: Arc<Counters>, shutdown: CancellationToken) {
        const EVERY: std::time::Duration = std::time::Duration::from_secs(2);
        let read = || {
            (
                counters.messages_in.load(Ordering::Relaxed),
                counters.messages_out.load(Ordering::Relaxed),
            )
        };
        let mut last = (tokio::time::Instant::now(), read());
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = (tokio::time::Instant::now(), read());
            let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| (a.saturating_sub(b) as f64 / secs).to_bits();
            self.messages_in
                .store(rate(now.1.0, last.1.0), Ordering::Relaxed);
            self.messages_out
                .store(rate(now.1.1, last.1.1), Ordering::Relaxed);
            last = now;
        }
    }
}

/// Where the OTA engine's commands go (its reports come back through the same wiring,
/// [`InboundMessage`] and [`Presence`]): the built-in broker, or the site's broker with Hangar
/// as its client. The one seam between the OTA engine and the engines that carry devices.
#[derive(Clone)]
pub enum DeviceLink {
    /// Our own broker.
    Embedded(Arc<Broker>),
    /// The site's broker (`mqtt.engine = "external"`).
    External(Arc<external::External>),
}

impl DeviceLink {
    /// Publishes a command to a device; never waits for the device.
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), BrokerError> {
        match self {
            DeviceLink::Embedded(b) => b.publish(topic, payload).await,
            DeviceLink::External(x) => x.publish(topic, payload).await,
        }
    }
}

/// Why a publish to devices failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Nobody could take it.
    #[error("broker: {0}")]
    Link(String),
    /// Starting failed.
    #[error("{0}")]
    Start(String),
}

/// Persistent sessions kept for disconnected clients at most.
const MAX_STORED_SESSIONS: usize = 200_000;

/// The running broker.
pub struct Broker {
    /// Bound plain MQTT address.
    pub mqtt: SocketAddr,
    /// Bound MQTTS address, if enabled.
    pub mqtts: Option<SocketAddr>,
    /// Refusal and traffic counters.
    pub counters: Arc<Counters>,
    /// Connections that have not logged in yet.
    pub preauth: Arc<preauth::PreAuth>,
    /// Sessions, subscriptions, queues, retained messages.
    pub router: Arc<router::Router>,
    /// Application users.
    pub users: Arc<users::Users>,
    /// Messages per second.
    pub rates: Arc<Rates>,
    /// Bridges to other brokers.
    pub bridges: Arc<bridge::Bridges>,
    settings: MqttConfig,
}

/// Everything a connection needs.
pub(crate) struct DoorContext {
    pub settings: MqttConfig,
    pub auth: Arc<dyn Authenticator>,
    pub users: Arc<users::Users>,
    pub router: Arc<router::Router>,
    pub store: Store,
    pub messages: mpsc::Sender<InboundMessage>,
    pub presence: mpsc::UnboundedSender<Presence>,
    pub counters: Arc<Counters>,
    pub connections: Arc<tokio::sync::Semaphore>,
    /// Connections that have not logged in yet ([`preauth`]).
    pub preauth: Arc<preauth::PreAuth>,
    /// Every connection's task, so that stopping waits for their last acknowledgements (and
    /// for the store they hold).
    pub tasks: TaskTracker,
    next_conn: AtomicU64,
}

impl DoorContext {
    /// A fresh connection number (never 0).
    pub fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Connections accepted since the last trim before the allocator is asked to give memory back.
const TRIM_AFTER_CONNECTIONS: u64 = 1000;

/// Ends the connections whose keep-alive expired, every second, and every connection when the
/// appliance stops. After a wave of connections settles (a thousand or more accepted, then a
/// second with none), hands the allocator's free memory back to the OS: each login's
/// short-lived buffers sit between the connections' long-lived state, and the holes they leave
/// would otherwise stay resident (measured: 10,000 idle devices, 2.6 -> 2.1 KB each).
async fn watch(router: Arc<router::Router>, counters: Arc<Counters>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmed_at = 0u64;
    let mut last_seen = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                router.sweep_keep_alive();
                let accepted = counters.connections_accepted.load(Ordering::Relaxed);
                let settled = accepted == last_seen;
                last_seen = accepted;
                let wave = accepted - trimmed_at;
                if wave >= TRIM_AFTER_CONNECTIONS && (settled || wave >= 10 * TRIM_AFTER_CONNECTIONS) {
                    trimmed_at = accepted;
                    let _ = tokio::task::spawn_blocking(crate::server::memory::give_back).await;
                }
            }
        }
    }
    router.end_all();
}

/// Reads `mqtt.acl_file` ("" = no lines: general topics closed).
fn read_acl(path: &str) -> Result<acl::Acl, String> {
    if path.is_empty() {
        return Ok(acl::Acl::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("mqtt.acl_file {path}: {e}"))?;
    acl::Acl::parse(&text).map_err(|e| format!("mqtt.acl_file {path}: {e}"))
}

/// What the broker is started with, besides its settings.
pub struct Wiring {
    /// MQTTS, when `mqtt.tls_listen` is on (verifying client certificates if required).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub store: Store,
    pub auth: Arc<dyn Authenticator>,
    pub messages: mpsc::Sender<InboundMessage>,
    pub presence: mpsc::UnboundedSender<Presence>,
}

impl Broker {
    /// Loads the stored sessions and retained messages and starts the listeners. Returns once
    /// they accept connections.
    pub async fn start(
        settings: MqttConfig,
        w: Wiring,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Broker, BrokerError> {
        let counters = Arc::new(Counters::default());
        let acl = read_acl(&settings.acl_file).map_err(BrokerError::Start)?;
        let users = Arc::new(
            users::Users::load(w.store.clone(), &settings.password_file)
                .map_err(BrokerError::Start)?,
        );
        let limits = router::Limits {
            max_queued_messages: settings.max_queued_messages,
            max_queued_bytes: settings.max_queued_bytes,
            max_inflight_messages: settings.max_inflight_messages,
            max_retained_messages: settings.max_retained_messages,
            max_retained_bytes: settings.max_retained_bytes,
            max_subscriptions_per_client: settings.max_subscriptions_per_client,
            max_stored_sessions: MAX_STORED_SESSIONS,
        };
        let (store, c) = (w.store.clone(), counters.clone());
        let router =
            tokio::task::spawn_blocking(move || router::Router::load(store, limits, acl, c))
                .await
                .map_err(|e| BrokerError::Start(format!("loading the broker's state: {e}")))?
                .map_err(|e| BrokerError::Start(format!("loading the broker's state: {e}")))?;
        let router = Arc::new(router);
        let bridges = bridge::Bridges::start(
            &settings.bridge,
            &settings.topic_prefix,
            w.store.clone(),
            router.clone(),
            shutdown.clone(),
            tracker,
        )?;
        if users.count() > 0 && settings.acl_file.is_empty() {
            tracing::warn!(
                users = users.count(),
                "MQTT application users exist but mqtt.acl_file is not set: general topics are closed to everyone (deny by default)"
            );
        }
        let ctx = Arc::new(DoorContext {
            connections: Arc::new(tokio::sync::Semaphore::new(settings.max_connections)),
            preauth: preauth::PreAuth::new(
                settings.max_pending_connections,
                settings.max_pending_per_address,
            ),
            settings: settings.clone(),
            auth: w.auth,
            users: users.clone(),
            router: router.clone(),
            store: w.store,
            messages: w.messages,
            presence: w.presence,
            counters: counters.clone(),
            tasks: tracker.clone(),
            next_conn: AtomicU64::new(0),
        });
        let external = settings.engine == crate::config::MqttEngine::External;
        let (mqtt, mqtts) = if external {
            // the site's broker carries the devices: no listener of ours
            (SocketAddr::from(([0, 0, 0, 0], 0)), None)
        } else {
            Self::listen(&settings, &w.tls, &ctx, &shutdown, tracker)?
        };
        if settings.allow_anonymous {
            tracing::warn!(
                "mqtt.allow_anonymous = true: clients connect without credentials (labs only)"
            );
        }
        let rates = Arc::new(Rates::default());
        tracker.spawn(rates.clone().sample(counters.clone(), shutdown.clone()));
        tracker.spawn(watch(router.clone(), counters.clone(), shutdown.clone()));
        Ok(Broker {
            bridges,
            rates,
            mqtt,
            mqtts,
            counters,
            preauth: ctx.preauth.clone(),
            router,
            users,
            settings,
        })
    }

    /// Binds the MQTT and MQTTS listeners and starts accepting.
    fn listen(
        settings: &MqttConfig,
        tls: &Option<tokio_rustls::TlsAcceptor>,
        ctx: &Arc<DoorContext>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(SocketAddr, Option<SocketAddr>), BrokerError> {
        let plain = frontdoor::bind(settings.listen, "mqtt.listen")?;
        let mqtt = plain
            .local_addr()
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        tracker.spawn(frontdoor::accept_loop(
            plain,
            None,
            ctx.clone(),
            shutdown.clone(),
        ));
        let mqtts = match (tls, settings.tls_listen.addr().is_some()) {
            (Some(acceptor), true) => {
                let l = frontdoor::bind(settings.tls_listen, "mqtt.tls_listen")?;
                let a = l
                    .local_addr()
                    .map_err(|e| BrokerError::Start(e.to_string()))?;
                tracker.spawn(frontdoor::accept_loop(
                    l,
                    Some(acceptor.clone()),
                    ctx.clone(),
                    shutdown.clone(),
                ));
                Some(a)
            }
            _ => None,
        };
        Ok((mqtt, mqtts))
    }

    /// Publishes an OTA command to the device connections listening on `topic`, at QoS 0,
    /// never waiting (a full queue is a failure, counted).
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), BrokerError> {
        let (delivered, dropped) = self.router.publish_command(&topic, &payload);
        if dropped > 0 {
            self.counters
                .publish_failures
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        if delivered > 0 {
            Ok(())
        } else if dropped > 0 {
            Err(BrokerError::Link(format!(
                "the device's queue on {topic} is full"
            )))
        } else {
            Counters::inc(&self.counters.publish_no_subscriber);
            Err(BrokerError::Link(format!(
                "no connection of the device listens on {topic}"
            )))
        }
    }

    /// Re-reads `mqtt.acl_file` and `mqtt.password_file` (SIGHUP). A file that does not parse
    /// keeps what was in force, and says why.
    pub fn reload(&self) -> Result<(), String> {
        let acl = read_acl(&self.settings.acl_file)?;
        self.users.reload_file()?;
        self.router.set_acl(acl);
        Ok(())
    }

    /// Removes an application user and closes its connections.
    pub async fn delete_user(
        &self,
        name: &str,
    ) -> Result<crate::server::store::Durable<users::UserView>, users::UsersError> {
        let gone = self.users.delete(name).await?;
        self.router
            .end_identity(&router::Identity::User(name.to_string()));
        Ok(gone)
    }
}
