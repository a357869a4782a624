//! The device broker: the only module that names rumqttd. A "front door" owns the device-facing
//! listeners (MQTT and MQTTS); what flows *to* devices is carried by one of two engines
//! (`mqtt.engine`): "direct" (default) — the front door routes the server's commands to the
//! connections subscribed to them itself ([`routes`]: a device may only subscribe to its own
//! exact command topics, so routing is a map lookup) — or "rumqttd", the embedded rumqttd on a
//! private loopback port with one backend connection per device. Per connection the front door:
//! terminates TLS with a handshake timeout (rumqttd 0.20 runs handshakes in its accept loop with
//! none); authenticates CONNECT against the device registry (username = device id, password =
//! secret; rumqttd's hook cannot see topics); enforces the per-device ACL on SUBSCRIBE, PUBLISH
//! and the will (rumqttd has no ACL); takes device reports out of the stream and hands them to
//! the OTA service, acknowledging QoS 1/2 only after they are persisted; and reports connect,
//! "ready for commands" (SUBACK of the command topic) and disconnect (rumqttd has no callbacks).
//! rumqttd's `Broker::start()` blocks forever with no shutdown: it lives as long as the process.
//! Why two engines: rumqttd 0.20 costs ~60 KB and two extra sockets per device and accepts
//! ~900 connections/s; the direct engine a few KB and one socket (BENCHMARKS.md).

mod frontdoor;
pub(crate) use frontdoor::replay_session;
pub mod packet;
pub mod preauth;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::{Inbound, Protocol};

use crate::config::{MqttConfig, MqttEngine};

/// Looks up device credentials; implemented by the device registry.
pub trait Authenticator: Send + Sync + 'static {
    /// `Some((device id, protocol))` if the credentials are right.
    fn authenticate(&self, username: &str, password: &str) -> Option<(String, Protocol)>;
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

/// Counters of refusals and drops (exported as metrics later).
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_accepted: AtomicU64,
    pub auth_failures: AtomicU64,
    pub acl_denied: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub publish_failures: AtomicU64,
    /// Commands published while no connection listened on the topic (direct engine; the
    /// device gets them when it subscribes again).
    pub publish_no_subscriber: AtomicU64,
    /// Sessions closed because a new connection with the same client id took them over.
    pub session_takeovers: AtomicU64,
}

impl Counters {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a publish to devices failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The embedded broker refused it.
    #[error("broker link: {0}")]
    Link(String),
    /// Starting failed.
    #[error("{0}")]
    Start(String),
}

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
    downstream: Arc<Downstream>,
}

/// What carries messages to devices, shared by the publisher and every front-door connection.
pub(crate) enum Downstream {
    Direct(Arc<routes::Routes>),
    Rumqttd {
        /// rumqttd's private loopback listener (front-door connections relay to it).
        addr: SocketAddr,
        /// The in-process server link (commands are published through it).
        link: tokio::sync::Mutex<rumqttd::local::LinkTx>,
    },
}

/// Everything a front-door connection needs.
pub(crate) struct DoorContext {
    pub settings: MqttConfig,
    pub backend: Arc<Downstream>,
    pub auth: Arc<dyn Authenticator>,
    pub messages: mpsc::Sender<InboundMessage>,
    pub presence: mpsc::UnboundedSender<Presence>,
    pub counters: Arc<Counters>,
    pub connections: tokio::sync::Semaphore,
    /// Connections that have not logged in yet ([`preauth`]).
    pub preauth: Arc<preauth::PreAuth>,
    /// Connections to rumqttd still waiting for its CONNACK. Bounded so that rumqttd's accept
    /// queue (1024) never overflows: dropped SYNs cost seconds of TCP retransmission backoff.
    /// Measured with bench/mqtt.sh at 6,600 devices: 128 -> 7.4 s, 256 -> 9.0 s, 900 -> 19.5 s.
    pub backend_handshakes: Arc<tokio::sync::Semaphore>,
}

fn reserve_loopback_port() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

fn rumqttd_config(backend: SocketAddr, s: &MqttConfig) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: s.max_packet_bytes,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "hangar-backend".into(),
        listen: backend,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: s.max_connections + 16,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some([("hangar".to_string(), server)].into_iter().collect()),
        ..Default::default()
    }
}

/// Starts rumqttd in its own thread on a private loopback port, with a drained server link.
/// No readiness probe (rumqttd logs every half-open probe as an error): the front door retries
/// its first connection to the backend for a few seconds instead.
fn start_rumqttd(
    settings: &MqttConfig,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<(SocketAddr, rumqttd::local::LinkTx), BrokerError> {
    let backend = reserve_loopback_port()
        .map_err(|e| BrokerError::Start(format!("reserving a loopback port: {e}")))?;
    let mut broker = rumqttd::Broker::new(rumqttd_config(backend, settings));
    let (link_tx, mut link_rx) = broker
        .link("hangar-server")
        .map_err(|e| BrokerError::Start(format!("broker link: {e}")))?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| BrokerError::Start(format!("starting the broker thread: {e}")))?;
    // The server link subscribes to nothing; drain it so the router never blocks on it.
    let stop = shutdown.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = link_rx.next() => if !matches!(r, Ok(Some(_))) { return },
            }
        }
    });
    Ok((backend, link_tx))
}

impl Broker {
    /// Starts rumqttd on a private loopback port and the front door on the configured
    /// listeners. Returns once everything accepts connections.
    pub async fn start(
        settings: MqttConfig,
        tls: Option<tokio_rustls::TlsAcceptor>,
        auth: Arc<dyn Authenticator>,
        messages: mpsc::Sender<InboundMessage>,
        presence: mpsc::UnboundedSender<Presence>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Broker, BrokerError> {
        let downstream = Arc::new(match settings.engine {
            MqttEngine::Direct => Downstream::Direct(Arc::new(routes::Routes::default())),
            MqttEngine::Rumqttd => {
                let (addr, link) = start_rumqttd(&settings, shutdown.clone(), tracker)?;
                Downstream::Rumqttd {
                    addr,
                    link: tokio::sync::Mutex::new(link),
                }
            }
        });
        let counters = Arc::new(Counters::default());
        let ctx = Arc::new(DoorContext {
            connections: tokio::sync::Semaphore::new(settings.max_connections),
            preauth: preauth::PreAuth::new(
                settings.max_pending_connections,
                settings.max_pending_per_address,
            ),
            backend_handshakes: Arc::new(tokio::sync::Semaphore::new(128)),
            settings: settings.clone(),
            backend: downstream.clone(),
            auth,
            messages,
            presence,
            counters: counters.clone(),
        });
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
        let mqtts = match (&tls, settings.tls_listen.addr().is_some()) {
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
        if settings.allow_anonymous {
            tracing::warn!(
                "mqtt.allow_anonymous = true: devices connect without credentials (labs only)"
            );
        }
        Ok(Broker {
            mqtt,
            mqtts,
            counters,
            preauth: ctx.preauth.clone(),
            downstream,
        })
    }

    /// Publishes to devices at QoS 0. Direct engine: queued on every connection subscribed to
    /// the topic, never waiting (a full queue is a failure, counted). rumqttd engine: into its
    /// router, whose queue is bounded: this awaits room instead of blocking a runtime thread
    /// (rumqttd's `try_publish` would leave the packet queued on failure, so retrying it would
    /// send it twice).
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), BrokerError> {
        match &*self.downstream {
            Downstream::Direct(routes) => {
                let d = routes.publish(&topic, &packet::publish_qos0(&topic, &payload));
                if d.dropped > 0 {
                    self.counters
                        .publish_failures
                        .fetch_add(d.dropped as u64, Ordering::Relaxed);
                }
                if d.delivered > 0 {
                    Counters::inc(&self.counters.messages_out);
                    Ok(())
                } else if d.dropped > 0 {
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
            Downstream::Rumqttd { link, .. } => {
                let packet = rumqttd::protocol::Packet::Publish(
                    rumqttd::protocol::Publish::new(
                        Bytes::from(topic),
                        Bytes::from(payload),
                        false,
                    ),
                    None,
                );
                let r = link.lock().await.send(packet).await;
                match r {
                    Ok(_) => {
                        Counters::inc(&self.counters.messages_out);
                        Ok(())
                    }
                    Err(e) => {
                        Counters::inc(&self.counters.publish_failures);
                        Err(BrokerError::Link(e.to_string()))
                    }
                }
            }
        }
    }
}
