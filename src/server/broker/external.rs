//! The site's own broker as the devices' engine (`mqtt.engine = "external"`): Hangar is one
//! client of it (persistent session, QoS 1, manual acknowledgements) and keeps the guarantees
//! of the built-in broker.
//!
//! - Reports and heartbeats of both protocols come in on Hangar's subscriptions (behind
//!   `$share/<group>/` when `share_group` is set, so a standby Hangar takes over) and go to the
//!   same OTA engine as the built-in broker's; each is acknowledged to the broker only after
//!   the OTA engine persisted it, in the order they came ([`External::acker`]). An
//!   acknowledgement for a delivery of an earlier connection is never sent on a later one (the
//!   broker sends that message again instead).
//! - Commands go out at QoS 1; while the link is down a publish fails and the command is sent
//!   again when its device shows up.
//! - Presence: the broker does not tell Hangar who connects, so a device is online from the
//!   first message Hangar hears from it until [`SILENCE`] without one; a device heard again
//!   after a silence or after Hangar's link came back (a broker restart may have lost what it
//!   held for the device) is Ready, [`SETTLE`] after its message was stored, so that the
//!   reports queued behind that message are applied before the OTA engine decides whether its
//!   command must go out again.
//! - The link reconnects with backoff (1 s doubling to 30 s) and subscribes again on every
//!   connection; its state is on `/healthz`, `/metrics` and the console.
//! - With `sync = "mosquitto-dynsec"`, [`dynsec`](super::dynsec) keeps the broker's device
//!   accounts in step over this same connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, SubscribeFilter};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dynsec::Dynsec;
use super::{BrokerError, InboundMessage, Presence};
use crate::config::{AccountSync, ExternalConfig};
use crate::protocol::Protocol;
use crate::ratelog::RateLog;
use crate::server::store::Store;
use crate::time::now_ms;

/// A device not heard from for this long is offline.
pub const SILENCE: Duration = Duration::from_secs(600);
/// A device heard after a silence is Ready this long after its message was stored.
pub const SETTLE: Duration = Duration::from_secs(3);

static LINK_LOG: RateLog = RateLog::new();

/// What `/healthz`, `/metrics` and the console say about the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// Connected now.
    pub connected: bool,
    /// Why not (or why the last connection ended), if it is not.
    pub error: Option<String>,
    /// Since when (ms since the epoch).
    pub since_ms: i64,
}

/// Traffic of the link (`/metrics`).
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Reports and heartbeats received.
    pub reports_in: AtomicU64,
    /// Acknowledgements sent after the report was stored.
    pub acks_sent: AtomicU64,
    /// Acknowledgements not sent: the delivery was of an earlier connection, or the report
    /// was not stored (the broker delivers it again).
    pub acks_withheld: AtomicU64,
    /// Messages on Hangar's subscriptions that are no device's report (dropped, acknowledged).
    pub foreign: AtomicU64,
    /// Commands handed to the broker.
    pub commands_out: AtomicU64,
    /// Commands not sent: the link was down.
    pub command_failures: AtomicU64,
    /// Connections made (the first one included).
    pub connects: AtomicU64,
    /// Subscriptions the broker refused (its ACL).
    pub subscriptions_refused: AtomicU64,
}

/// The link to the site's broker.
pub struct External {
    client: AsyncClient,
    settings: ExternalConfig,
    prefix: String,
    /// Bumped on every new connection; an acknowledgement is sent only on the connection its
    /// message came on.
    generation: AtomicU64,
    connected: AtomicBool,
    state: Mutex<LinkState>,
    /// Counters for `/metrics`.
    pub counters: LinkCounters,
    /// The account sync, with `sync = "mosquitto-dynsec"`.
    pub dynsec: Option<Arc<Dynsec>>,
    store: Store,
    shutdown: CancellationToken,
    /// Devices whose command could not be handed to the broker (the link was down): each is
    /// made Ready once the link is back, so its command goes out then.
    unsent: Mutex<HashMap<String, Protocol>>,
}

/// A delivery waiting for its report to be stored.
struct Pending {
    generation: u64,
    /// The packet to acknowledge (QoS 1/2), payload dropped.
    ack: Option<Publish>,
    done: oneshot::Receiver<()>,
    /// The device was heard after a silence: (id, protocol, when) for its Ready.
    ready: Option<(String, Protocol, i64)>,
}

/// What the link is started with.
pub struct ExternalWiring {
    pub store: Store,
    pub messages: mpsc::Sender<InboundMessage>,
    pub presence: mpsc::UnboundedSender<Presence>,
    /// Notified when a device account change is queued (with `sync`).
    pub accounts: Arc<tokio::sync::Notify>,
}

/// The topic filters of the devices' messages to Hangar (both protocols).
pub fn report_filters(prefix: &str) -> Vec<String> {
    vec![
        format!("{prefix}/gateway/+/report"),
        "/ota/device/inform/+/+".into(),
        "/ota/device/progress/+/+".into(),
        "/sys/+/+/thing/ota/firmware/get".into(),
    ]
}

/// The topics of Hangar's messages to devices, as filters (for the broker's ACL).
pub fn command_filters(prefix: &str) -> Vec<String> {
    vec![
        format!("{prefix}/gateway/+/command"),
        "/ota/device/upgrade/+/+".into(),
        "/sys/+/+/thing/ota/firmware/get_reply".into(),
    ]
}

/// Where and how Hangar connects as a client of another broker (the site's, a bridge's
/// peer); `key` names the config section in errors.
pub(super) struct ClientOf<'a> {
    pub key: &'a str,
    pub endpoint: Result<(bool, String, u16), String>,
    pub client_id: String,
    pub username: &'a str,
    pub password_file: &'a str,
    pub ca_file: &'a str,
    pub clean_session: bool,
    pub inflight: u16,
}

impl ClientOf<'_> {
    /// The client's options: keep-alive 30 s, manual acknowledgements, 1 MiB packets (16 MiB
    /// in: a dynamic-security listing of many accounts is one message), the password from the
    /// first line of its file, TLS against `ca_file` for mqtts://.
    pub(super) fn options(&self) -> Result<MqttOptions, BrokerError> {
        let key = self.key;
        let start = |what: &str, e: String| BrokerError::Start(format!("{key}.{what}: {e}"));
        let (tls, host, port) = self.endpoint.clone().map_err(|e| start("url", e))?;
        let mut o = MqttOptions::new(self.client_id.clone(), host, port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(self.clean_session)
            .set_manual_acks(true)
            .set_inflight(self.inflight)
            .set_max_packet_size(16 << 20, 1 << 20);
        let password = if self.password_file.is_empty() {
            None
        } else {
            let text = std::fs::read_to_string(self.password_file)
                .map_err(|e| start("password_file", format!("{}: {e}", self.password_file)))?;
            let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
            if line.is_empty() {
                return Err(start(
                    "password_file",
                    format!(
                        "{}: the first line (the password) is empty",
                        self.password_file
                    ),
                ));
            }
            Some(line.to_string())
        };
        if !self.username.is_empty() || password.is_some() {
            o.set_credentials(self.username, password.unwrap_or_default());
        }
        if tls {
            let ca = |e: String| start("ca_file", format!("{}: {e}", self.ca_file));
            let pem = std::fs::read(self.ca_file).map_err(|e| ca(e.to_string()))?;
            let cfg = crate::tls::client_config(&pem).map_err(ca)?;
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(cfg),
            ));
        }
        Ok(o)
    }
}

fn options(s: &ExternalConfig) -> Result<MqttOptions, BrokerError> {
    ClientOf {
        key: "mqtt.external",
        endpoint: s.endpoint(),
        client_id: s.client_id.clone(),
        username: &s.username,
        password_file: &s.password_file,
        ca_file: &s.ca_file,
        clean_session: false,
        inflight: 500,
    }
    .options()
}

/// What a connection error means, for a site engineer.
fn describe(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::{ConnectReturnCode, ConnectionError};
    match e {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)
        | ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => {
            "the broker refused Hangar's credentials (mqtt.external.username / password_file)"
                .into()
        }
        ConnectionError::ConnectionRefused(c) => {
            format!("the broker refused the connection: {c:?}")
        }
        ConnectionError::Io(io) => format!("cannot reach the broker: {io}"),
        ConnectionError::Tls(t) => format!("TLS with the broker failed: {t}"),
        ConnectionError::NetworkTimeout => "the broker did not answer in time".into(),
        other => format!("{other}"),
    }
}

impl External {
    /// Starts the link (it connects in the background: an unreachable broker is retried, and
    /// said on `/healthz`). Fails only on settings that cannot work (a bad URL, an unreadable
    /// password or CA file).
    pub fn start(
        settings: ExternalConfig,
        prefix: &str,
        w: ExternalWiring,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<External>, BrokerError> {
        let opts = options(&settings)?;
        let (client, eventloop) = AsyncClient::new(opts, 4096);
        let dynsec = (settings.sync == AccountSync::MosquittoDynsec).then(|| {
            Arc::new(Dynsec::new(
                client.clone(),
                prefix,
                &settings,
                w.store.clone(),
                w.accounts.clone(),
            ))
        });
        let ext = Arc::new(External {
            client,
            prefix: prefix.to_string(),
            generation: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            state: Mutex::new(LinkState {
                connected: false,
                error: Some("connecting".into()),
                since_ms: now_ms(),
            }),
            counters: LinkCounters::default(),
            dynsec,
            store: w.store,
            settings,
            shutdown: shutdown.clone(),
            unsent: Mutex::new(HashMap::new()),
        });
        let (acks, pending) = mpsc::unbounded_channel();
        tracker.spawn(ext.clone().acker(pending, w.presence.clone()));
        tracker.spawn(
            ext.clone()
                .run(eventloop, w.messages, w.presence, acks, shutdown.clone()),
        );
        if let Some(d) = &ext.dynsec {
            tracker.spawn(d.clone().work(ext.clone(), shutdown));
        }
        tracing::info!(url = %ext.settings.url, client_id = %ext.settings.client_id, share_group = %ext.settings.share_group, "devices connect to the site's broker; Hangar is its client");
        Ok(ext)
    }

    /// The link's state now.
    pub fn state(&self) -> LinkState {
        self.state.lock().expect("link state").clone()
    }

    /// Whether the link is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The broker URL.
    pub fn url(&self) -> &str {
        &self.settings.url
    }

    fn set_state(&self, connected: bool, error: Option<String>) {
        let mut s = self.state.lock().expect("link state");
        if s.connected != connected || s.error != error {
            *s = LinkState {
                connected,
                error,
                since_ms: now_ms(),
            };
        }
    }

    /// Publishes a command at QoS 1; fails while the link is down (the command goes out again
    /// when its device shows up).
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), BrokerError> {
        let failed = |why: String| {
            self.counters
                .command_failures
                .fetch_add(1, Ordering::Relaxed);
            if let Some((protocol, id)) =
                crate::protocol::classify_command_filter(&self.prefix, &topic)
            {
                self.unsent.lock().expect("unsent").insert(id, protocol);
            }
            Err(BrokerError::Link(why))
        };
        if !self.is_connected() {
            return failed("the site's broker is not connected".into());
        }
        match self
            .client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
            .await
        {
            Ok(()) => {
                self.counters.commands_out.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => failed(format!("the site's broker: {e}")),
        }
    }

    /// After a connection: the devices whose commands may not have reached the broker are
    /// Ready, [`SETTLE`] later (the reports the broker held for Hangar are stored by then, so
    /// a device that already acted on its command is not sent it again). On the first
    /// connection that is every device with a pending task (Hangar may have stopped between
    /// storing a task and publishing its command); later, the devices whose publish failed
    /// while the link was down.
    fn ready_again(&self, first: bool, presence: &mpsc::UnboundedSender<Presence>) {
        let mut due: HashMap<String, Protocol> =
            std::mem::take(&mut *self.unsent.lock().expect("unsent"));
        if first {
            let pending = self.store.active_task_ids().unwrap_or_default();
            for id in pending {
                if let Ok(Some(t)) = self.store.get_task(id)
                    && t.status == crate::server::store::TaskStatus::Pending
                    && let Ok(Some(d)) = self.store.get_device(&t.device_id)
                {
                    due.insert(d.id, d.protocol);
                }
            }
        }
        if due.is_empty() {
            return;
        }
        let presence = presence.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SETTLE).await;
            for (id, protocol) in due {
                let _ = presence.send(Presence::ready(id, protocol));
            }
        });
    }

    /// A filter with the `$share/<group>/` prefix when a share group is set.
    pub fn shared(&self, filter: &str) -> String {
        if self.settings.share_group.is_empty() {
            filter.to_string()
        } else {
            format!("$share/{}/{filter}", self.settings.share_group)
        }
    }

    /// Subscribes to the devices' reports (every connection; the account sync first sets up
    /// Hangar's own rights when it keeps the broker's accounts).
    pub fn subscribe_reports(&self) {
        let filters: Vec<SubscribeFilter> = report_filters(&self.prefix)
            .iter()
            .map(|f| SubscribeFilter::new(self.shared(f), QoS::AtLeastOnce))
            .collect();
        if let Err(e) = self.client.try_subscribe_many(filters) {
            tracing::error!(error = %e, "could not subscribe to the devices' reports on the site's broker");
        }
    }

    /// The event loop: connects (again), subscribes, hands reports to the OTA engine.
    async fn run(
        self: Arc<Self>,
        mut eventloop: EventLoop,
        messages: mpsc::Sender<InboundMessage>,
        presence: mpsc::UnboundedSender<Presence>,
        acks: mpsc::UnboundedSender<Pending>,
        shutdown: CancellationToken,
    ) {
        let mut seen: HashMap<String, (Protocol, Instant)> = HashMap::new();
        let mut backoff = Duration::from_secs(1);
        let mut sweep = tokio::time::interval(Duration::from_secs(30));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sweep.tick() => {
                    forget_silent(&mut seen, &presence, Some(SILENCE));
                    continue;
                }
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.generation.fetch_add(1, Ordering::SeqCst);
                    self.connected.store(true, Ordering::SeqCst);
                    self.set_state(true, None);
                    let first = self.counters.connects.fetch_add(1, Ordering::Relaxed) == 0;
                    backoff = Duration::from_secs(1);
                    // what the broker held for the devices may be gone: each is Ready again
                    // when heard
                    forget_silent(&mut seen, &presence, None);
                    self.ready_again(first, &presence);
                    tracing::info!(url = %self.settings.url, session_present = ack.session_present, "connected to the site's broker");
                    match &self.dynsec {
                        Some(d) => d.connected(),
                        None => self.subscribe_reports(),
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    self.incoming(p, &mut seen, &messages, &presence, &acks)
                        .await;
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    let refused = s
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        .count();
                    if refused > 0 {
                        self.counters
                            .subscriptions_refused
                            .fetch_add(refused as u64, Ordering::Relaxed);
                        let why = format!(
                            "the broker refused {refused} of Hangar's subscriptions: its ACL must let {:?} subscribe to {} and publish to {}",
                            self.settings.username,
                            report_filters(&self.prefix).join(", "),
                            command_filters(&self.prefix).join(", ")
                        );
                        tracing::error!("{why}");
                        self.set_state(true, Some(why));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let was = self.connected.swap(false, Ordering::SeqCst);
                    let why = describe(&e);
                    self.set_state(false, Some(why.clone()));
                    if was {
                        tracing::warn!(url = %self.settings.url, error = %why, "lost the site's broker; reconnecting");
                    } else if let Some(suppressed) = LINK_LOG.admit() {
                        tracing::warn!(url = %self.settings.url, error = %why, suppressed, retry_in_secs = backoff.as_secs(), "cannot connect to the site's broker");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        self.connected.store(false, Ordering::SeqCst);
        // the session stays on the broker: what Hangar did not acknowledge comes again
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(e) = eventloop.poll().await {
                if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }

    /// One message on Hangar's subscriptions.
    async fn incoming(
        &self,
        p: Publish,
        seen: &mut HashMap<String, (Protocol, Instant)>,
        messages: &mpsc::Sender<InboundMessage>,
        presence: &mpsc::UnboundedSender<Presence>,
        acks: &mpsc::UnboundedSender<Pending>,
    ) {
        let generation = self.generation.load(Ordering::SeqCst);
        let ack = (p.qos != QoS::AtMostOnce).then(|| Publish {
            payload: Bytes::new(),
            ..p.clone()
        });
        if let Some(d) = &self.dynsec
            && p.topic == super::dynsec::RESPONSE_TOPIC
        {
            d.on_response(&p.payload);
            if let Some(a) = ack {
                let _ = self.client.try_ack(&a);
            }
            return;
        }
        let Some((protocol, id, kind)) =
            crate::protocol::classify_report_topic(&self.prefix, &p.topic)
        else {
            self.counters.foreign.fetch_add(1, Ordering::Relaxed);
            if let Some(a) = ack {
                let _ = self.client.try_ack(&a);
            }
            return;
        };
        self.counters.reports_in.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let fresh = match seen.get_mut(&id) {
            Some(s) => {
                s.1 = now;
                false
            }
            // presence only for registered devices (the OTA engine drops the others' reports)
            None if matches!(self.store.get_device(&id), Ok(Some(_))) => {
                seen.insert(id.clone(), (protocol, now));
                let _ = presence.send(Presence::Connected {
                    id: id.clone(),
                    protocol,
                    ip: String::new(),
                    anonymous: false,
                });
                true
            }
            None => false,
        };
        let (done, stored) = oneshot::channel();
        let _ = acks.send(Pending {
            generation,
            ack,
            done: stored,
            ready: fresh.then(|| (id.clone(), protocol, now_ms())),
        });
        let m = InboundMessage {
            device_id: id,
            protocol,
            kind,
            payload: p.payload,
            authenticated: true,
            done: Some(done),
        };
        // waits while the OTA engine is busy: the broker holds the rest meanwhile
        let _ = messages.send(m).await;
    }

    /// Acknowledges each delivery once its report is stored, in the order they came; emits the
    /// Ready of devices heard after a silence.
    async fn acker(
        self: Arc<Self>,
        mut pending: mpsc::UnboundedReceiver<Pending>,
        presence: mpsc::UnboundedSender<Presence>,
    ) {
        while let Some(p) = pending.recv().await {
            let stored = p.done.await.is_ok();
            let current = self.generation.load(Ordering::SeqCst) == p.generation;
            if !stored {
                if let Some(_a) = p.ack {
                    self.counters.acks_withheld.fetch_add(1, Ordering::Relaxed);
                }
                // the broker sends an unacknowledged message again only on a new connection
                if current && !self.shutdown.is_cancelled() {
                    tracing::warn!(
                        "a report was not stored; reconnecting so that the broker delivers it again"
                    );
                    let _ = self.client.try_disconnect();
                }
                continue;
            }
            if let Some(a) = p.ack {
                if current && self.client.ack(&a).await.is_ok() {
                    self.counters.acks_sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.acks_withheld.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some((id, protocol, at_ms)) = p.ready {
                let presence = presence.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(SETTLE).await;
                    let _ = presence.send(Presence::Ready {
                        id,
                        protocol,
                        at_ms,
                    });
                });
            }
        }
    }
}

/// Forgets the devices silent for longer than `silence` (`None`: all of them), each with its
/// Disconnected.
fn forget_silent(
    seen: &mut HashMap<String, (Protocol, Instant)>,
    presence: &mpsc::UnboundedSender<Presence>,
    silence: Option<Duration>,
) {
    let now = Instant::now();
    seen.retain(|id, (_, at)| {
        let keep = silence.is_some_and(|s| now.duration_since(*at) < s);
        if !keep {
            let _ = presence.send(Presence::Disconnected { id: id.clone() });
        }
        keep
    });
}
