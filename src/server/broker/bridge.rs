//! Bridges to other brokers (`[[mqtt.bridge]]`, the plant's broker above a line's): chosen
//! topics forwarded either way, store-and-forward on disk.
//!
//! - Out: the router hands every routed publish to [`Bridges::offer`] (its [`Tap`]); a topic
//!   an out rule matches is appended to the bridge's queue in the store in the same flush as
//!   the publish, so the local publisher's PUBACK means the message is on disk. A sender per
//!   bridge (one client, clean session) publishes the queue in order, at most [`WINDOW`] in
//!   flight, and removes a message once the other broker acknowledged it (QoS 1) or it was
//!   written (QoS 0). After a reconnect or a restart it starts again from the oldest message
//!   not acknowledged: a message can arrive twice only when its acknowledgement was lost,
//!   which QoS 1 allows. Beyond `queue_max_messages` the oldest are dropped and counted.
//! - In: a receiver per bridge (its own client, persistent session, manual acknowledgements)
//!   subscribes to the in rules and publishes what comes into the router; it acknowledges a
//!   message after the router took it (after the flush when it was persisted). What comes in
//!   on a bridge is never sent back out on it.
//! - OTA topics never cross a bridge, either way, whatever the rules say; nor do `$` topics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::BrokerError;
use super::router::{Publishing, Router, Tap};
use super::topics::matches;
use crate::config::BridgeConfig;
use crate::ratelog::RateLog;
use crate::server::store::{BridgeMessageRecord, Store, StoreError};

/// Messages in flight to the other broker at most.
pub const WINDOW: usize = 100;

static LINK_LOG: RateLog = RateLog::new();

/// State and counters of one bridge (`/metrics`, the console).
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// The out link is up.
    pub out_up: AtomicBool,
    /// The in link is up (or there are no in rules).
    pub in_up: AtomicBool,
    /// Messages waiting on disk for the other broker.
    pub queued: AtomicU64,
    /// Messages dropped because the queue was full (the oldest).
    pub dropped: AtomicU64,
    /// Messages the other broker acknowledged.
    pub forwarded: AtomicU64,
    /// Messages received from the other broker and routed here.
    pub received: AtomicU64,
    /// Messages not bridged because they are OTA topics.
    pub ota_refused: AtomicU64,
    /// Why a link is down, if one is.
    pub error: Mutex<Option<String>>,
}

/// One bridge.
pub struct Bridge {
    pub settings: BridgeConfig,
    pub stats: BridgeStats,
    /// Next sequence number of the queue (and the lowest one still in it).
    next: AtomicU64,
    first: AtomicU64,
    wake: Notify,
}

/// Every bridge of the broker.
pub struct Bridges {
    pub list: Vec<Arc<Bridge>>,
    store: Store,
    prefix: String,
    /// Appends and drops of the queues, so the counts and the oldest move together.
    lock: Mutex<()>,
}

/// Whether a topic may cross a bridge at all.
fn bridgeable(prefix: &str, topic: &str) -> bool {
    !topic.starts_with('$') && !crate::protocol::is_ota_topic(prefix, topic)
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn options(s: &BridgeConfig, client_id: String, clean: bool) -> Result<MqttOptions, BrokerError> {
    super::external::ClientOf {
        key: &format!("mqtt.bridge {}", s.name),
        endpoint: s.endpoint(),
        client_id,
        username: &s.username,
        password_file: &s.password_file,
        ca_file: &s.ca_file,
        clean_session: clean,
        inflight: WINDOW as u16,
    }
    .options()
}

impl Bridge {
    fn set_error(&self, e: Option<String>) {
        *self.stats.error.lock().expect("bridge error") = e;
    }

    /// The QoS of the first out rule matching `topic`.
    fn out_qos(&self, topic: &str) -> Option<u8> {
        self.settings
            .topics
            .iter()
            .find(|t| t.direction.out() && matches(&t.pattern, topic))
            .map(|t| t.qos)
    }

    fn inward(&self, topic: &str) -> bool {
        self.settings
            .topics
            .iter()
            .any(|t| t.direction.inward() && matches(&t.pattern, topic))
    }
}

impl Tap for Bridges {
    fn offer(&self, p: &Publishing<'_>) -> Result<bool, StoreError> {
        if !bridgeable(&self.prefix, p.topic) {
            return Ok(false);
        }
        let mut wrote = false;
        for (i, b) in self.list.iter().enumerate() {
            if p.origin == Some(i) {
                continue;
            }
            let Some(q) = b.out_qos(p.topic) else {
                continue;
            };
            let rec = BridgeMessageRecord {
                topic: p.topic.to_string(),
                payload: p.payload.to_vec(),
                qos: q,
                retain: p.retain,
            };
            let _g = self.lock.lock().expect("bridge queue lock");
            let seq = b.next.fetch_add(1, Ordering::SeqCst);
            self.store.put_bridge_message(&b.settings.name, seq, &rec)?;
            let queued = b.stats.queued.fetch_add(1, Ordering::SeqCst) + 1;
            if queued > b.settings.queue_max_messages {
                let oldest = b.first.fetch_add(1, Ordering::SeqCst);
                self.store.remove_bridge_message(&b.settings.name, oldest)?;
                b.stats.queued.fetch_sub(1, Ordering::SeqCst);
                b.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            wrote = true;
            b.wake.notify_one();
        }
        Ok(wrote)
    }
}

impl Bridges {
    /// The bridges of `settings`, their queues as the store kept them; started on `tracker`
    /// and set as the router's tap.
    pub fn start(
        settings: &[BridgeConfig],
        prefix: &str,
        store: Store,
        router: Arc<Router>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Bridges>, BrokerError> {
        let mut list = Vec::new();
        for s in settings {
            let span = store
                .bridge_queue_span(&s.name)
                .map_err(|e| BrokerError::Start(format!("bridge {}: {e}", s.name)))?;
            let (first, next, queued) = match span {
                Some((f, l, n)) => (f, l + 1, n),
                None => (1, 1, 0),
            };
            let b = Arc::new(Bridge {
                settings: s.clone(),
                stats: BridgeStats::default(),
                next: AtomicU64::new(next),
                first: AtomicU64::new(first),
                wake: Notify::new(),
            });
            b.stats.queued.store(queued, Ordering::SeqCst);
            b.stats.in_up.store(
                !s.topics.iter().any(|t| t.direction.inward()),
                Ordering::SeqCst,
            );
            // the options are checked now, so a bad file is an error at start
            options(s, String::new(), true)?;
            list.push(b);
        }
        let bridges = Arc::new(Bridges {
            list,
            store,
            prefix: prefix.to_string(),
            lock: Mutex::new(()),
        });
        if bridges.list.is_empty() {
            return Ok(bridges);
        }
        router.set_tap(bridges.clone());
        for (i, b) in bridges.list.iter().enumerate() {
            tracker.spawn(bridges.clone().send(b.clone(), shutdown.clone()));
            if b.settings.topics.iter().any(|t| t.direction.inward()) {
                tracker.spawn(bridges.clone().receive(
                    i,
                    b.clone(),
                    router.clone(),
                    shutdown.clone(),
                ));
            }
            tracing::info!(bridge = %b.settings.name, url = %b.settings.url, queued = b.stats.queued.load(Ordering::Relaxed), "bridge configured");
        }
        Ok(bridges)
    }

    /// The out side of one bridge: the queue, in order, to the other broker.
    async fn send(self: Arc<Self>, b: Arc<Bridge>, shutdown: CancellationToken) {
        let name = b.settings.name.clone();
        let Ok(opts) = options(&b.settings, format!("hangar-bridge-{name}-out"), true) else {
            return;
        };
        let (client, mut eventloop) = AsyncClient::new(opts, WINDOW * 2);
        let mut connected = false;
        // handed to the client, waiting for their packet id (in order)
        let mut handed: std::collections::VecDeque<u64> = Default::default();
        // written, waiting for the PUBACK
        let mut unacked: std::collections::HashMap<u16, u64> = Default::default();
        let mut cursor = 0u64;
        let mut backoff = Duration::from_secs(1);
        loop {
            if connected && handed.len() + unacked.len() < WINDOW {
                let room = WINDOW - handed.len() - unacked.len();
                let from = cursor.max(b.first.load(Ordering::SeqCst));
                match self.store.bridge_messages(&name, from, room) {
                    Ok(msgs) => {
                        for (seq, m) in msgs {
                            if client
                                .try_publish(m.topic, qos(m.qos), m.retain, m.payload)
                                .is_err()
                            {
                                break;
                            }
                            handed.push_back(seq);
                            cursor = seq + 1;
                        }
                    }
                    Err(e) => {
                        tracing::error!(bridge = %name, error = %e, "reading the bridge's queue failed")
                    }
                }
            }
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = b.wake.notified(), if connected => continue,
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff = Duration::from_secs(1);
                    b.stats.out_up.store(true, Ordering::SeqCst);
                    b.set_error(None);
                    // a clean session: everything not acknowledged goes again, in order
                    handed.clear();
                    unacked.clear();
                    cursor = 0;
                    tracing::info!(bridge = %name, "bridge connected (out)");
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(seq) = handed.pop_front() {
                        if pkid == 0 {
                            self.forwarded(&b, seq);
                        } else {
                            unacked.insert(pkid, seq);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    if let Some(seq) = unacked.remove(&a.pkid) {
                        self.forwarded(&b, seq);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        tracing::warn!(bridge = %name, error = %e, "bridge lost its broker (out); messages wait on disk");
                    } else if let Some(suppressed) = LINK_LOG.admit() {
                        tracing::warn!(bridge = %name, error = %e, suppressed, "bridge cannot reach its broker; messages wait on disk");
                    }
                    connected = false;
                    b.stats.out_up.store(false, Ordering::SeqCst);
                    b.set_error(Some(e.to_string()));
                    // a clean session: rumqttc drops its copies at the next CONNACK, ours
                    // go again from the queue
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        b.stats.out_up.store(false, Ordering::SeqCst);
        let _ = client.try_disconnect();
    }

    /// A message the other broker has: out of the queue.
    fn forwarded(&self, b: &Bridge, seq: u64) {
        let _g = self.lock.lock().expect("bridge queue lock");
        if seq < b.first.load(Ordering::SeqCst) {
            return; // dropped by the bound meanwhile
        }
        if let Err(e) = self.store.remove_bridge_message(&b.settings.name, seq) {
            tracing::error!(bridge = %b.settings.name, error = %e, "removing a forwarded message failed; it may be sent again");
            return;
        }
        if seq == b.first.load(Ordering::SeqCst) {
            b.first.store(seq + 1, Ordering::SeqCst);
        }
        b.stats.queued.fetch_sub(1, Ordering::SeqCst);
        b.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    /// The in side of one bridge: its subscriptions on the other broker, routed here.
    async fn receive(
        self: Arc<Self>,
        index: usize,
        b: Arc<Bridge>,
        router: Arc<Router>,
        shutdown: CancellationToken,
    ) {
        let name = b.settings.name.clone();
        let Ok(opts) = options(&b.settings, format!("hangar-bridge-{name}-in"), false) else {
            return;
        };
        let (client, mut eventloop) = AsyncClient::new(opts, WINDOW * 2);
        let filters: Vec<SubscribeFilter> = b
            .settings
            .topics
            .iter()
            .filter(|t| t.direction.inward())
            .map(|t| SubscribeFilter::new(t.pattern.clone(), qos(t.qos)))
            .collect();
        let mut backoff = Duration::from_secs(1);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_secs(1);
                    b.stats.in_up.store(true, Ordering::SeqCst);
                    let _ = client.try_subscribe_many(filters.clone());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let ack = rumqttc::Publish {
                        payload: Bytes::new(),
                        ..p.clone()
                    };
                    if bridgeable(&self.prefix, &p.topic) && b.inward(&p.topic) {
                        let routed = router.publish(
                            None,
                            Publishing {
                                topic: &p.topic,
                                payload: p.payload.clone(),
                                qos: (p.qos as u8).min(1),
                                retain: p.retain,
                                origin: Some(index),
                            },
                        );
                        match routed {
                            Ok(r) => {
                                if r.persisted && self.store.flush().await.is_err() {
                                    continue; // not acknowledged: it comes again
                                }
                                b.stats.received.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::error!(bridge = %name, error = %e, "routing a bridged message failed; it comes again");
                                continue;
                            }
                        }
                    } else {
                        b.stats.ota_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = client.try_ack(&ack);
                }
                Ok(_) => {}
                Err(e) => {
                    if b.stats.in_up.swap(false, Ordering::SeqCst) {
                        tracing::warn!(bridge = %name, error = %e, "bridge lost its broker (in)");
                    }
                    b.set_error(Some(e.to_string()));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        let _ = client.try_disconnect();
    }
}
