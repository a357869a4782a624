//! The router: every MQTT session, what it subscribed to, what waits to be sent to it, and the
//! retained messages. One lock guards it all; every operation under it is a few map lookups
//! and queue pushes (and, for persistent state, a sled write — never a flush: callers that
//! answer a client wait for [`Store::flush`] after the lock is gone).
//!
//! - **Sessions** are keyed by the client's identity and client id together
//!   ([`Identity::session_key`]): a client id is only taken over by a connection with the same
//!   credentials, never by a stranger. A session with `clean_session = false` outlives its
//!   connection and the process: its subscriptions, the QoS 1/2 messages queued or in flight to
//!   it and the QoS 2 packet ids it received are in the store, written before the client is
//!   answered.
//! - **General subscriptions** live in a [`topics::Index`]; a device's own OTA command topics
//!   in a map of their own, which only the server publishes to ([`Router::publish_command`]).
//!   General publishes never reach an OTA command topic, and OTA reports never reach the index,
//!   so a `#` subscription sees no OTA traffic.
//! - **Delivery**: a publish is queued on every matching session (once per session, at the
//!   highest QoS of its matching subscriptions) and the session's connection is woken; the
//!   connection takes frames with [`Router::drain`], at most `max_inflight` QoS 1/2 messages
//!   unacknowledged. A queue beyond `max_queued_messages` or `max_queued_bytes` drops the
//!   newcomer (counted). Offline persistent sessions queue QoS 1/2 only.
//! - **Retained** messages live in a [`topics::Tree`] and the store; one over
//!   `max_retained_messages` or `max_retained_bytes` is delivered but not retained (counted).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::Counters;
use super::acl::{Acl, Want};
use super::packet;
use super::topics::{Index, Tree};
use crate::protocol::Protocol;
use crate::ratelog::RateLog;
use crate::server::store::{
    MQTT_SCHEMA, MqttMessageRecord, MqttSessionRecord, MqttWrite, RetainedRecord, Store, StoreError,
};

static DROP_LOG: RateLog = RateLog::new();

/// The router's limits (`[mqtt]`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
    pub max_inflight_messages: usize,
    pub max_retained_messages: usize,
    pub max_retained_bytes: usize,
    pub max_subscriptions_per_client: usize,
    /// Persistent sessions kept for disconnected clients; beyond it a session ends clean.
    pub max_stored_sessions: usize,
}

/// Who a client is, once logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A registered device; `username` is the name it logs in with (`pk&dn` for Alibaba).
    Device {
        id: String,
        protocol: Protocol,
        username: String,
    },
    /// An application user (password, or the CN of a client certificate).
    User(String),
    /// No credentials (`allow_anonymous = true`).
    Anonymous,
}

impl Identity {
    /// How the store and the API name it: `device:ID`, `user:NAME`, `anonymous`.
    pub fn owner(&self) -> String {
        match self {
            Identity::Device { username, .. } => format!("device:{username}"),
            Identity::User(n) => format!("user:{n}"),
            Identity::Anonymous => "anonymous".into(),
        }
    }

    /// Parses [`Identity::owner`].
    pub fn from_owner(s: &str) -> Option<Identity> {
        if s == "anonymous" {
            return Some(Identity::Anonymous);
        }
        if let Some(n) = s.strip_prefix("user:") {
            return Some(Identity::User(n.to_string()));
        }
        let username = s.strip_prefix("device:")?;
        Some(Identity::Device {
            id: crate::protocol::id_from_username(username),
            protocol: if username.contains('&') {
                Protocol::Alibaba
            } else {
                Protocol::Gateway
            },
            username: username.to_string(),
        })
    }

    /// The user name ACL lines see (`%u`, `user` lines): none for an anonymous client, even
    /// one that gave a user name (it proved nothing).
    pub fn acl_user(&self) -> Option<&str> {
        match self {
            Identity::Device { username, .. } => Some(username),
            Identity::User(n) => Some(n),
            Identity::Anonymous => None,
        }
    }

    /// `device`, `user` or `anonymous`.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Device { .. } => "device",
            Identity::User(_) => "user",
            Identity::Anonymous => "anonymous",
        }
    }

    /// The session key of this identity's client id.
    pub fn session_key(&self, client_id: &str) -> String {
        use sha2::Digest;
        let h = sha2::Sha256::new()
            .chain_update(self.owner().as_bytes())
            .chain_update([0u8])
            .chain_update(client_id.as_bytes())
            .finalize();
        format!("s{}", &hex::encode(h)[..40])
    }
}

/// A message on its way to one session.
#[derive(Debug, Clone)]
struct Msg {
    topic: Arc<str>,
    payload: Bytes,
    qos: u8,
    retain: bool,
    /// Its store sequence number (0: not stored).
    seq: u64,
}

impl Msg {
    /// What it costs in memory, roughly.
    fn cost(&self) -> usize {
        self.topic.len() + self.payload.len() + 64
    }
}

#[derive(Debug)]
struct Inflight {
    pkid: u16,
    msg: Msg,
    /// QoS 2: PUBREC came back; PUBREL is what is left to send.
    released: bool,
}

/// Why the router ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum End {
    /// A new connection with the same client id (and credentials) took the session over.
    TakenOver = 1,
    /// Its application user was deleted.
    UserDeleted = 2,
    /// Nothing came from it for 1.5 times its keep-alive.
    KeepAlive = 3,
    /// The appliance stops.
    Shutdown = 4,
}

/// What the router and a connection share: one allocation a connection, so that an idle one
/// holds no timer and no token of its own. The connection waits on `wake` alone: for
/// something queued, or to be told to end (then [`Signal::ended`] says why).
#[derive(Debug)]
pub struct Signal {
    /// Wakes the connection (its permit is kept if it is busy).
    pub wake: Notify,
    end: std::sync::atomic::AtomicU8,
    /// When the client last sent a packet, ms (the keep-alive sweep reads it).
    last_heard_ms: std::sync::atomic::AtomicI64,
    /// 1.5 times the client's keep-alive, ms; 0 = none.
    idle_limit_ms: i64,
}

impl Signal {
    /// For a client with this keep-alive (seconds; 0 = none), heard from now.
    pub fn new(keep_alive_secs: u16) -> Arc<Signal> {
        Arc::new(Signal {
            wake: Notify::new(),
            end: std::sync::atomic::AtomicU8::new(0),
            last_heard_ms: std::sync::atomic::AtomicI64::new(crate::time::now_ms()),
            idle_limit_ms: keep_alive_secs as i64 * 1500,
        })
    }

    /// Tells the connection to end (the first reason stays).
    pub fn end(&self, why: End) {
        let _ = self
            .end
            .compare_exchange(0, why as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Why the connection must end, if it must.
    pub fn ended(&self) -> Option<End> {
        Some(match self.end.load(Ordering::SeqCst) {
            1 => End::TakenOver,
            2 => End::UserDeleted,
            3 => End::KeepAlive,
            4 => End::Shutdown,
            _ => return None,
        })
    }

    /// The client sent something.
    pub fn heard(&self) {
        self.last_heard_ms
            .store(crate::time::now_ms(), Ordering::Relaxed);
    }

    fn expired(&self, now_ms: i64) -> bool {
        self.idle_limit_ms > 0
            && now_ms - self.last_heard_ms.load(Ordering::Relaxed) > self.idle_limit_ms
    }
}

/// A connection holding a session.
#[derive(Debug)]
pub struct Link {
    /// The connection's number.
    pub conn: u64,
    /// Wakes and ends the connection.
    pub signal: Arc<Signal>,
    pub peer: SocketAddr,
    pub since_ms: i64,
    /// Protocol level (3 or 4).
    pub level: u8,
}

#[derive(Debug)]
struct Sub {
    filter: Box<str>,
    qos: u8,
    /// Each message is checked against the ACL before delivery (the grant was partial).
    check: bool,
}

#[derive(Debug)]
struct Session {
    key: Arc<str>,
    client_id: Box<str>,
    identity: Arc<Identity>,
    persistent: bool,
    created_ms: i64,
    link: Option<Link>,
    subs: Vec<Sub>,
    /// The device's own OTA command topics it listens on, with their QoS.
    commands: Vec<(Box<str>, u8)>,
    queue: VecDeque<Msg>,
    inflight: VecDeque<Inflight>,
    /// Send every in-flight message again (DUP) before anything new: the client reconnected.
    resend: bool,
    next_pkid: u16,
    next_seq: u64,
    /// QoS 2 packet ids received from the client and not yet released.
    qos2_in: Vec<u16>,
    /// Memory held by `queue` and `inflight`.
    queued_bytes: usize,
    /// QoS 1/2 messages in `queue` (what `max_queued_messages` counts, as mosquitto does).
    queued_reliable: usize,
}

impl Session {
    fn new(
        key: &str,
        client_id: &str,
        identity: Arc<Identity>,
        persistent: bool,
        link: Option<Link>,
    ) -> Session {
        Session {
            key: key.into(),
            client_id: client_id.into(),
            identity,
            persistent,
            created_ms: crate::time::now_ms(),
            link,
            subs: Vec::new(),
            commands: Vec::new(),
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            resend: false,
            next_pkid: 0,
            next_seq: 1,
            qos2_in: Vec::new(),
            queued_bytes: 0,
            queued_reliable: 0,
        }
    }

    fn record(&self) -> MqttSessionRecord {
        MqttSessionRecord {
            schema: MQTT_SCHEMA,
            client_id: self.client_id.to_string(),
            owner: self.identity.owner(),
            subscriptions: self
                .subs
                .iter()
                .map(|s| (s.filter.to_string(), s.qos))
                .collect(),
            commands: self
                .commands
                .iter()
                .map(|(t, q)| (t.to_string(), *q))
                .collect(),
            created_at_ms: self.created_ms,
        }
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            let id = self.next_pkid;
            if !self.inflight.iter().any(|i| i.pkid == id) {
                return id;
            }
        }
    }
}

/// A subscription entry in the index.
#[derive(Debug, Clone, Copy)]
struct Entry {
    sid: u64,
    qos: u8,
    check: bool,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Entry) -> bool {
        self.sid == o.sid
    }
}

#[derive(Debug)]
struct Retained {
    topic: Arc<str>,
    payload: Bytes,
    qos: u8,
}

struct State {
    /// Boxed: the map, sized for the fleet, holds a pointer per empty slot, not a session.
    sessions: HashMap<u64, Box<Session>>,
    keys: HashMap<Arc<str>, u64>,
    next_sid: u64,
    subs: Index<Entry>,
    commands: HashMap<Box<str>, Vec<u64>>,
    retained: Tree<Retained>,
    retained_bytes: usize,
    /// Persistent sessions without a connection.
    stored: usize,
    /// The appliance is stopping: a connection attached now is ended at once.
    stopping: bool,
}

/// A publish to route.
#[derive(Debug, Clone)]
pub struct Publishing<'a> {
    pub topic: &'a str,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// The bridge it came in on (not sent back out on that one).
    pub origin: Option<usize>,
}

/// Where the router hands every routed publish besides its sessions: the bridges.
pub trait Tap: Send + Sync {
    /// Takes a copy of a publish; true if it wrote to the store (the publisher is answered
    /// after the flush).
    fn offer(&self, p: &Publishing<'_>) -> Result<bool, StoreError>;
}

/// What routing a publish did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// Sessions it was queued for.
    pub delivered: usize,
    /// Sessions whose queue was full.
    pub dropped: usize,
    /// Something was written to the store: answer the publisher after a flush.
    pub persisted: bool,
    /// A QoS 2 publish whose packet id is already received and not released: not routed again.
    pub duplicate: bool,
}

/// A new session or one resumed.
#[derive(Debug)]
pub struct Attached {
    pub sid: u64,
    /// CONNACK's session-present flag.
    pub present: bool,
    /// OTA command topics the resumed session listens on (the device is ready for commands).
    pub commands: Vec<String>,
}

/// What a SUBSCRIBE asks for, filter by filter, after the access checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// A general filter; `check`: each message is checked against the ACL.
    General {
        filter: String,
        qos: u8,
        check: bool,
    },
    /// The device's own OTA command topic.
    Command { topic: String, qos: u8 },
    /// Not allowed: SUBACK 0x80.
    Refused,
}

/// A connected client, for `GET /api/mqtt/clients`.
#[derive(Debug, Clone)]
pub struct ClientView {
    pub client_id: String,
    pub identity: Identity,
    pub peer: SocketAddr,
    pub since_ms: i64,
    pub level: u8,
    pub persistent: bool,
    pub subscriptions: Vec<(String, u8)>,
    pub queued: usize,
    pub inflight: usize,
}

/// Sizes, for the metrics and the console.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub sessions: usize,
    pub connected: usize,
    /// Connected clients by [`Identity::kind`].
    pub connected_by_kind: [(&'static str, usize); 3],
    pub stored: usize,
    pub subscriptions: usize,
    pub retained: usize,
    pub retained_bytes: usize,
    pub queued: usize,
}

/// Why a connection's session is no longer its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// The router (see the module docs).
pub struct Router {
    state: Mutex<State>,
    acl: std::sync::RwLock<Arc<Acl>>,
    acl_generation: std::sync::atomic::AtomicU64,
    store: Store,
    limits: Limits,
    counters: Arc<Counters>,
    tap: std::sync::OnceLock<Arc<dyn Tap>>,
}

impl Router {
    /// Sets where every routed publish also goes (the bridges); once.
    pub fn set_tap(&self, tap: Arc<dyn Tap>) {
        let _ = self.tap.set(tap);
    }

    /// A router over what the store kept: retained messages and persistent sessions (offline,
    /// their in-flight messages to be sent again).
    pub fn load(
        store: Store,
        limits: Limits,
        acl: Acl,
        counters: Arc<Counters>,
    ) -> Result<Router, StoreError> {
        let mut st = State {
            sessions: HashMap::new(),
            keys: HashMap::new(),
            next_sid: 1,
            subs: Index::default(),
            commands: HashMap::new(),
            retained: Tree::default(),
            retained_bytes: 0,
            stored: 0,
            stopping: false,
        };
        for r in store.retained_messages()? {
            st.retained_bytes += r.payload.len();
            let topic: Arc<str> = r.topic.as_str().into();
            st.retained.insert(
                &r.topic,
                Retained {
                    topic,
                    payload: Bytes::from(r.payload),
                    qos: r.qos,
                },
            );
        }
        for stored in store.mqtt_sessions()? {
            let Some(identity) = Identity::from_owner(&stored.record.owner) else {
                tracing::warn!(
                    owner = stored.record.owner,
                    "stored MQTT session of an unknown owner dropped"
                );
                store.delete_mqtt_session(&stored.key)?;
                continue;
            };
            let sid = st.next_sid;
            st.next_sid += 1;
            let mut s = Session::new(
                &stored.key,
                &stored.record.client_id,
                Arc::new(identity),
                true,
                None,
            );
            s.created_ms = stored.record.created_at_ms;
            s.qos2_in = stored.qos2_received;
            for (filter, qos) in stored.record.subscriptions {
                // the ACL may have changed while it was stored: check every message
                st.subs.insert(
                    &filter,
                    Entry {
                        sid,
                        qos,
                        check: true,
                    },
                );
                s.subs.push(Sub {
                    filter: filter.into(),
                    qos,
                    check: true,
                });
            }
            for (topic, qos) in stored.record.commands {
                st.commands
                    .entry(topic.as_str().into())
                    .or_default()
                    .push(sid);
                s.commands.push((topic.into(), qos));
            }
            for (seq, m) in stored.messages {
                s.next_seq = s.next_seq.max(seq + 1);
                let msg = Msg {
                    topic: m.topic.as_str().into(),
                    payload: Bytes::from(m.payload),
                    qos: m.qos,
                    retain: m.retain,
                    seq,
                };
                s.queued_bytes += msg.cost();
                if m.pkid != 0 {
                    s.next_pkid = s.next_pkid.max(m.pkid);
                    s.inflight.push_back(Inflight {
                        pkid: m.pkid,
                        msg,
                        released: m.released,
                    });
                } else {
                    s.queued_reliable += 1;
                    s.queue.push_back(msg);
                }
            }
            s.resend = !s.inflight.is_empty();
            st.keys.insert(s.key.clone(), sid);
            st.sessions.insert(sid, Box::new(s));
            st.stored += 1;
        }
        Ok(Router {
            state: Mutex::new(st),
            acl: std::sync::RwLock::new(Arc::new(acl)),
            acl_generation: std::sync::atomic::AtomicU64::new(0),
            store,
            limits,
            counters,
            tap: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the ACL. Every subscription is checked message by message from now on (its
    /// grant was decided under the old one).
    pub fn set_acl(&self, acl: Acl) {
        *self.acl.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(acl);
        self.acl_generation.fetch_add(1, Ordering::SeqCst);
        let mut st = self.lock();
        let State { sessions, subs, .. } = &mut *st;
        for (sid, s) in sessions.iter_mut() {
            for sub in &mut s.subs {
                sub.check = true;
                subs.insert(
                    &sub.filter,
                    Entry {
                        sid: *sid,
                        qos: sub.qos,
                        check: true,
                    },
                );
            }
        }
    }

    /// The ACL in force, and its generation (it changes with every [`Router::set_acl`]).
    pub fn acl(&self) -> (u64, Arc<Acl>) {
        let acl = self.acl.read().unwrap_or_else(|p| p.into_inner()).clone();
        (self.acl_generation.load(Ordering::SeqCst), acl)
    }

    /// The generation of the ACL in force.
    pub fn acl_generation(&self) -> u64 {
        self.acl_generation.load(Ordering::SeqCst)
    }

    /// Opens the session of `key` for a new connection: a connection that holds it is ended
    /// (takeover); `clean` discards what was stored, otherwise a persistent session resumes
    /// (its in-flight messages are sent again first).
    pub fn attach(
        &self,
        key: &str,
        client_id: &str,
        identity: Arc<Identity>,
        clean: bool,
        link: Link,
    ) -> Result<Attached, StoreError> {
        let mut st = self.lock();
        if st.stopping {
            // end_all has run: this connection would never hear of the shutdown
            link.signal.end(End::Shutdown);
        }
        if let Some(&sid) = st.keys.get(key) {
            let s = st.sessions.get_mut(&sid).expect("keyed sessions exist");
            let was_stored = s.link.is_none() && s.persistent;
            if let Some(old) = s.link.take() {
                old.signal.end(End::TakenOver);
                Counters::inc(&self.counters.session_takeovers);
            }
            if was_stored {
                st.stored -= 1;
            }
            let s = st.sessions.get_mut(&sid).expect("keyed sessions exist");
            if !clean && s.persistent {
                s.resend = !s.inflight.is_empty();
                let signal = link.signal.clone();
                s.link = Some(link);
                if !s.queue.is_empty() || s.resend {
                    signal.wake.notify_one();
                }
                let commands = s.commands.iter().map(|(t, _)| t.to_string()).collect();
                return Ok(Attached {
                    sid,
                    present: true,
                    commands,
                });
            }
            self.remove(&mut st, sid)?;
        }
        let sid = st.next_sid;
        st.next_sid += 1;
        let s = Session::new(key, client_id, identity, !clean, Some(link));
        if s.persistent {
            self.store.put_mqtt_session(key, &s.record())?;
        }
        st.keys.insert(s.key.clone(), sid);
        st.sessions.insert(sid, Box::new(s));
        Ok(Attached {
            sid,
            present: false,
            commands: Vec::new(),
        })
    }

    /// Forgets a session: its subscriptions, its queue, its stored state.
    fn remove(&self, st: &mut State, sid: u64) -> Result<(), StoreError> {
        let Some(s) = st.sessions.remove(&sid) else {
            return Ok(());
        };
        st.keys.remove(&s.key);
        for sub in &s.subs {
            st.subs.remove(&sub.filter, |e| e.sid == sid);
        }
        for (t, _) in &s.commands {
            unroute_command(&mut st.commands, t, sid);
        }
        if s.persistent {
            self.store.delete_mqtt_session(&s.key)?;
        }
        Ok(())
    }

    /// The connection `conn` ended. A clean session goes; a persistent one is kept (its QoS 0
    /// messages dropped) unless `max_stored_sessions` are kept already.
    pub fn detach(&self, sid: u64, conn: u64) {
        let mut st = self.lock();
        let Some(s) = st.sessions.get_mut(&sid) else {
            return;
        };
        if s.link.as_ref().is_none_or(|l| l.conn != conn) {
            return; // taken over: the new connection holds it
        }
        s.link = None;
        if s.persistent {
            let mut freed = 0;
            s.queue.retain(|m| {
                if m.qos == 0 {
                    freed += m.cost();
                }
                m.qos > 0
            });
            s.queued_bytes -= freed;
            if st.stored < self.limits.max_stored_sessions {
                st.stored += 1;
                return;
            }
            Counters::inc(&self.counters.sessions_not_kept);
            if let Some(suppressed) = DROP_LOG.admit() {
                tracing::warn!(
                    limit = self.limits.max_stored_sessions,
                    suppressed,
                    "persistent MQTT session not kept: too many are stored"
                );
            }
        }
        if let Err(e) = self.remove(&mut st, sid) {
            tracing::error!(error = %e, "could not remove an ended MQTT session from the store");
        }
    }

    /// Ends the connections of `identity` (its user was deleted) and forgets its sessions.
    pub fn end_identity(&self, identity: &Identity) -> usize {
        let mut st = self.lock();
        let sids: Vec<u64> = st
            .sessions
            .iter()
            .filter(|(_, s)| *s.identity == *identity)
            .map(|(sid, _)| *sid)
            .collect();
        for sid in &sids {
            if let Some(s) = st.sessions.get_mut(sid) {
                match s.link.take() {
                    Some(l) => l.signal.end(End::UserDeleted),
                    None if s.persistent => st.stored -= 1,
                    None => {}
                }
            }
            if let Err(e) = self.remove(&mut st, *sid) {
                tracing::error!(error = %e, "could not remove an MQTT session from the store");
            }
        }
        sids.len()
    }

    /// Routes a publish: retained (if asked), then queued on every matching session. A QoS 2
    /// publish from session `from` is remembered by packet id until its PUBREL, and a second one
    /// with the same id is not routed again.
    pub fn publish(
        &self,
        from: Option<(u64, u16)>,
        p: Publishing<'_>,
    ) -> Result<Routed, StoreError> {
        let (_, acl) = self.acl();
        let mut st = self.lock();
        let mut routed = Routed::default();
        let mut writes: Vec<MqttWrite> = Vec::new();
        if let Some((sid, pkid)) = from
            && p.qos == 2
            && let Some(s) = st.sessions.get_mut(&sid)
        {
            if s.qos2_in.contains(&pkid) {
                routed.duplicate = true;
                return Ok(routed);
            }
            if s.qos2_in.len() >= self.limits.max_inflight_messages.max(1) * 4 {
                s.qos2_in.remove(0); // a client that never releases: forget the oldest
            }
            s.qos2_in.push(pkid);
            if s.persistent {
                writes.push(MqttWrite::Qos2Received {
                    session: s.key.to_string(),
                    pkid,
                });
            }
        }
        if p.retain {
            routed.persisted |= self.retain(&mut st, p.topic, &p.payload, p.qos)?;
        }
        let topic: Arc<str> = p.topic.into();
        let mut targets: Vec<(u64, u8)> = Vec::new();
        {
            let mut found = Vec::new();
            st.subs.lookup(p.topic, &mut found);
            for e in found {
                if e.check {
                    let Some(s) = st.sessions.get(&e.sid) else {
                        continue;
                    };
                    if !acl.allows(s.identity.acl_user(), &s.client_id, p.topic, Want::Read) {
                        continue;
                    }
                }
                match targets.iter_mut().find(|(sid, _)| *sid == e.sid) {
                    Some(t) => t.1 = t.1.max(e.qos),
                    None => targets.push((e.sid, e.qos)),
                }
            }
        }
        for (sid, sub_qos) in targets {
            let msg = Msg {
                topic: topic.clone(),
                payload: p.payload.clone(),
                qos: p.qos.min(sub_qos),
                retain: false,
                seq: 0,
            };
            match self.enqueue(&mut st, sid, msg, &mut writes) {
                Some(true) => routed.delivered += 1,
                Some(false) => routed.dropped += 1,
                None => {}
            }
        }
        if !writes.is_empty() {
            self.store.mqtt_write(&writes)?;
            routed.persisted = true;
        }
        drop(st);
        if let Some(tap) = self.tap.get() {
            routed.persisted |= tap.offer(&p)?;
        }
        Ok(routed)
    }

    /// Queues `msg` on session `sid`: `Some(true)` queued, `Some(false)` dropped (full), `None`
    /// not for it (offline, and QoS 0 or a clean session).
    fn enqueue(
        &self,
        st: &mut State,
        sid: u64,
        mut msg: Msg,
        writes: &mut Vec<MqttWrite>,
    ) -> Option<bool> {
        let s = st.sessions.get_mut(&sid)?;
        if s.link.is_none() && (msg.qos == 0 || !s.persistent) {
            return None;
        }
        let cost = msg.cost();
        if (msg.qos > 0 && s.queued_reliable >= self.limits.max_queued_messages)
            || s.queued_bytes + cost > self.limits.max_queued_bytes
        {
            Counters::inc(&self.counters.dropped_queue_full);
            if let Some(suppressed) = DROP_LOG.admit() {
                tracing::warn!(
                    client = %s.client_id,
                    owner = s.identity.owner(),
                    queued = s.queue.len() + s.inflight.len(),
                    suppressed,
                    "MQTT message dropped: the client's queue is full (max_queued_messages / max_queued_bytes)"
                );
            }
            return Some(false);
        }
        if s.persistent && msg.qos > 0 {
            msg.seq = s.next_seq;
            s.next_seq += 1;
            writes.push(MqttWrite::Message {
                session: s.key.to_string(),
                seq: msg.seq,
                record: message_record(&msg, 0, false),
            });
        }
        s.queued_bytes += cost;
        s.queued_reliable += (msg.qos > 0) as usize;
        s.queue.push_back(msg);
        if let Some(l) = &s.link {
            l.signal.wake.notify_one();
        }
        Some(true)
    }

    /// Stores or clears the retained message of `topic`; whether the store was written.
    fn retain(
        &self,
        st: &mut State,
        topic: &str,
        payload: &Bytes,
        qos: u8,
    ) -> Result<bool, StoreError> {
        if payload.is_empty() {
            if let Some(old) = st.retained.remove(topic) {
                st.retained_bytes -= old.payload.len();
                self.store.put_retained(topic, None)?;
                return Ok(true);
            }
            return Ok(false);
        }
        let old_len = st.retained.get(topic).map(|r| r.payload.len());
        let count_after = st.retained.len() + old_len.is_none() as usize;
        let bytes_after = st.retained_bytes - old_len.unwrap_or(0) + payload.len();
        if count_after > self.limits.max_retained_messages
            || bytes_after > self.limits.max_retained_bytes
        {
            Counters::inc(&self.counters.dropped_retained_limit);
            if let Some(suppressed) = DROP_LOG.admit() {
                tracing::warn!(
                    topic,
                    retained = st.retained.len(),
                    suppressed,
                    "MQTT message not retained: max_retained_messages / max_retained_bytes reached"
                );
            }
            return Ok(false);
        }
        let rec = RetainedRecord {
            schema: MQTT_SCHEMA,
            topic: topic.to_string(),
            payload: payload.to_vec(),
            qos,
            at_ms: crate::time::now_ms(),
        };
        self.store.put_retained(topic, Some(&rec))?;
        st.retained_bytes = bytes_after;
        st.retained.insert(
            topic,
            Retained {
                topic: topic.into(),
                payload: payload.clone(),
                qos,
            },
        );
        Ok(true)
    }

    /// A QoS 2 publish of `sid` was released (PUBREL): its packet id may be used again.
    /// Whether the store was written.
    pub fn release(&self, sid: u64, conn: u64, pkid: u16) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let Some(s) = own(&mut st, sid, conn) else {
            return Ok(false);
        };
        let Some(i) = s.qos2_in.iter().position(|p| *p == pkid) else {
            return Ok(false);
        };
        s.qos2_in.remove(i);
        if !s.persistent {
            return Ok(false);
        }
        let w = MqttWrite::Qos2Released {
            session: s.key.to_string(),
            pkid,
        };
        self.store.mqtt_write(&[w])?;
        Ok(true)
    }

    /// Subscribes session `sid`, filter by filter: the SUBACK return codes, and whether the
    /// store was written. Retained messages matching a granted general filter are queued.
    pub fn subscribe(
        &self,
        sid: u64,
        conn: u64,
        asked: Vec<Asked>,
    ) -> Result<(Vec<u8>, bool), StoreError> {
        let (_, acl) = self.acl();
        let mut guard = self.lock();
        let st = &mut *guard;
        if own(st, sid, conn).is_none() {
            return Ok((vec![0x80; asked.len()], false));
        }
        let mut codes = Vec::with_capacity(asked.len());
        let mut writes = Vec::new();
        for a in asked {
            let s = st.sessions.get_mut(&sid).expect("checked");
            match a {
                Asked::Refused => codes.push(0x80),
                Asked::Command { topic, qos } => {
                    match s.commands.iter_mut().find(|(t, _)| **t == *topic) {
                        Some(c) => c.1 = qos,
                        None => {
                            s.commands.push((topic.as_str().into(), qos));
                            st.commands
                                .entry(topic.as_str().into())
                                .or_default()
                                .push(sid);
                        }
                    }
                    codes.push(qos);
                }
                Asked::General { filter, qos, check } => {
                    let existing = s.subs.iter().position(|x| *x.filter == *filter);
                    if existing.is_none()
                        && s.subs.len() >= self.limits.max_subscriptions_per_client
                    {
                        Counters::inc(&self.counters.subscriptions_refused);
                        if let Some(suppressed) = DROP_LOG.admit() {
                            tracing::warn!(
                                client = %s.client_id,
                                owner = s.identity.owner(),
                                limit = self.limits.max_subscriptions_per_client,
                                suppressed,
                                "MQTT subscription refused: max_subscriptions_per_client reached"
                            );
                        }
                        codes.push(0x80);
                        continue;
                    }
                    match existing {
                        Some(i) => {
                            s.subs[i].qos = qos;
                            s.subs[i].check = check;
                        }
                        None => s.subs.push(Sub {
                            filter: filter.as_str().into(),
                            qos,
                            check,
                        }),
                    }
                    st.subs.insert(&filter, Entry { sid, qos, check });
                    codes.push(qos);
                    let acl = check.then_some(&*acl);
                    self.queue_retained(st, sid, &filter, qos, acl, &mut writes);
                }
            }
        }
        let s = st.sessions.get(&sid).expect("checked");
        let persisted = s.persistent;
        if s.persistent {
            self.store.put_mqtt_session(&s.key, &s.record())?;
        }
        if !writes.is_empty() {
            self.store.mqtt_write(&writes)?;
        }
        Ok((codes, persisted))
    }

    /// Queues the retained messages `filter` matches on a session that just subscribed.
    fn queue_retained(
        &self,
        st: &mut State,
        sid: u64,
        filter: &str,
        qos: u8,
        check: Option<&Acl>,
        writes: &mut Vec<MqttWrite>,
    ) {
        let mut found = Vec::new();
        st.retained.matching(filter, &mut found);
        if found.is_empty() {
            return;
        }
        let s = st.sessions.get(&sid).expect("checked");
        let msgs: Vec<Msg> = found
            .into_iter()
            .filter(|r| {
                check.is_none_or(|acl| {
                    acl.allows(s.identity.acl_user(), &s.client_id, &r.topic, Want::Read)
                })
            })
            .map(|r| Msg {
                topic: r.topic.clone(),
                payload: r.payload.clone(),
                qos: r.qos.min(qos),
                retain: true,
                seq: 0,
            })
            .collect();
        for m in msgs {
            self.enqueue(st, sid, m, writes);
        }
    }

    /// Unsubscribes; whether the store was written.
    pub fn unsubscribe(&self, sid: u64, conn: u64, filters: &[String]) -> Result<bool, StoreError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if own(st, sid, conn).is_none() {
            return Ok(false);
        }
        let s = st.sessions.get_mut(&sid).expect("checked");
        for f in filters {
            if let Some(i) = s.subs.iter().position(|x| *x.filter == **f) {
                s.subs.remove(i);
                st.subs.remove(f, |e| e.sid == sid);
            }
            if let Some(i) = s.commands.iter().position(|(t, _)| **t == **f) {
                s.commands.remove(i);
                unroute_command(&mut st.commands, f, sid);
            }
        }
        let s = st.sessions.get(&sid).expect("checked");
        if s.persistent {
            self.store.put_mqtt_session(&s.key, &s.record())?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Queues a QoS 0 message from the server on every connection listening on the OTA command
    /// topic `topic`. (delivered, dropped because a queue was full).
    pub fn publish_command(&self, topic: &str, payload: &[u8]) -> (usize, usize) {
        let mut st = self.lock();
        let sids = st.commands.get(topic).cloned().unwrap_or_default();
        let topic: Arc<str> = topic.into();
        let payload = Bytes::copy_from_slice(payload);
        let (mut delivered, mut dropped) = (0, 0);
        let mut writes = Vec::new();
        for sid in sids {
            let msg = Msg {
                topic: topic.clone(),
                payload: payload.clone(),
                qos: 0,
                retain: false,
                seq: 0,
            };
            match self.enqueue(&mut st, sid, msg, &mut writes) {
                Some(true) => delivered += 1,
                Some(false) => dropped += 1,
                None => {}
            }
        }
        (delivered, dropped)
    }

    /// Appends what session `sid` has to send to `out`, up to about `budget` bytes: in-flight
    /// messages again after a reconnect, then queued ones while fewer than
    /// `max_inflight_messages` QoS 1/2 ones await their acknowledgement. `Ok(true)`: more is
    /// ready to go.
    pub fn drain(
        &self,
        sid: u64,
        conn: u64,
        out: &mut BytesMut,
        budget: usize,
    ) -> Result<bool, Gone> {
        let mut st = self.lock();
        let max_inflight = self.limits.max_inflight_messages.max(1);
        let s = own(&mut st, sid, conn).ok_or(Gone)?;
        let mut sent = 0u64;
        if s.resend {
            s.resend = false;
            for i in &s.inflight {
                if i.released {
                    packet::put_ack(out, packet::kind::PUBREL, i.pkid);
                } else {
                    let m = &i.msg;
                    packet::put_publish(out, &m.topic, &m.payload, m.qos, i.pkid, m.retain, true);
                    sent += 1;
                }
            }
        }
        let mut writes = Vec::new();
        while out.len() < budget {
            let Some(front) = s.queue.front() else {
                break;
            };
            if front.qos > 0 && s.inflight.len() >= max_inflight {
                break;
            }
            let m = s.queue.pop_front().expect("front");
            sent += 1;
            if m.qos == 0 {
                packet::put_publish(out, &m.topic, &m.payload, 0, 0, m.retain, false);
                s.queued_bytes -= m.cost();
                continue;
            }
            s.queued_reliable -= 1;
            let pkid = s.alloc_pkid();
            packet::put_publish(out, &m.topic, &m.payload, m.qos, pkid, m.retain, false);
            if m.seq != 0 {
                writes.push(MqttWrite::Message {
                    session: s.key.to_string(),
                    seq: m.seq,
                    record: message_record(&m, pkid, false),
                });
            }
            s.inflight.push_back(Inflight {
                pkid,
                msg: m,
                released: false,
            });
        }
        let more = s
            .queue
            .front()
            .is_some_and(|m| m.qos == 0 || s.inflight.len() < max_inflight);
        drop(st);
        self.counters
            .messages_out
            .fetch_add(sent, Ordering::Relaxed);
        if !writes.is_empty()
            && let Err(e) = self.store.mqtt_write(&writes)
        {
            // the message goes out anyway; after a crash it would be sent with a new id
            tracing::warn!(error = %e, "could not note a sent MQTT message's packet id");
        }
        Ok(more)
    }

    /// The client acknowledged a message we sent: PUBACK (QoS 1), PUBREC (QoS 2, first half:
    /// answer with PUBREL) or PUBCOMP (QoS 2, done). Unknown packet ids are ignored.
    pub fn acknowledged(&self, sid: u64, conn: u64, kind: u8, pkid: u16) {
        let mut st = self.lock();
        let Some(s) = own(&mut st, sid, conn) else {
            return;
        };
        let Some(i) = s.inflight.iter().position(|x| x.pkid == pkid) else {
            return;
        };
        let write = match (kind, s.inflight[i].msg.qos, s.inflight[i].released) {
            (packet::kind::PUBACK, 1, _) | (packet::kind::PUBCOMP, 2, true) => {
                let done = s.inflight.remove(i).expect("found");
                s.queued_bytes -= done.msg.cost();
                (done.msg.seq != 0).then(|| MqttWrite::Delivered {
                    session: s.key.to_string(),
                    seq: done.msg.seq,
                })
            }
            (packet::kind::PUBREC, 2, _) => {
                let x = &mut s.inflight[i];
                x.released = true;
                (x.msg.seq != 0).then(|| MqttWrite::Message {
                    session: s.key.to_string(),
                    seq: x.msg.seq,
                    record: message_record(&x.msg, pkid, true),
                })
            }
            _ => None, // an acknowledgement of the wrong kind: ignored
        };
        if let Some(l) = &s.link
            && !s.queue.is_empty()
        {
            l.signal.wake.notify_one();
        }
        drop(st);
        if let Some(w) = write
            && let Err(e) = self.store.mqtt_write(&[w])
        {
            tracing::warn!(error = %e, "could not note an MQTT acknowledgement in the store");
        }
    }

    /// Ends the connections whose clients sent nothing for 1.5 times their keep-alive (MQTT
    /// 3.1.1 3.1.2.10); run about every second.
    pub fn sweep_keep_alive(&self) -> usize {
        let now = crate::time::now_ms();
        let st = self.lock();
        let mut n = 0;
        for s in st.sessions.values() {
            if let Some(l) = &s.link
                && l.signal.expired(now)
            {
                l.signal.end(End::KeepAlive);
                n += 1;
            }
        }
        n
    }

    /// Ends every connection (the appliance stops).
    pub fn end_all(&self) {
        let mut st = self.lock();
        st.stopping = true;
        for s in st.sessions.values() {
            if let Some(l) = &s.link {
                l.signal.end(End::Shutdown);
            }
        }
    }

    /// Connected clients, for the API.
    pub fn clients(&self) -> Vec<ClientView> {
        let st = self.lock();
        let mut v: Vec<ClientView> = st
            .sessions
            .values()
            .filter_map(|s| {
                let l = s.link.as_ref()?;
                Some(ClientView {
                    client_id: s.client_id.to_string(),
                    identity: (*s.identity).clone(),
                    peer: l.peer,
                    since_ms: l.since_ms,
                    level: l.level,
                    persistent: s.persistent,
                    subscriptions: s
                        .subs
                        .iter()
                        .map(|x| (x.filter.to_string(), x.qos))
                        .chain(s.commands.iter().map(|(t, q)| (t.to_string(), *q)))
                        .collect(),
                    queued: s.queue.len(),
                    inflight: s.inflight.len(),
                })
            })
            .collect();
        v.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        v
    }

    /// Sizes for the metrics.
    pub fn sizes(&self) -> Sizes {
        let st = self.lock();
        let mut z = Sizes {
            sessions: st.sessions.len(),
            connected: 0,
            connected_by_kind: [("device", 0), ("user", 0), ("anonymous", 0)],
            stored: st.stored,
            subscriptions: st.subs.len() + st.commands.values().map(Vec::len).sum::<usize>(),
            retained: st.retained.len(),
            retained_bytes: st.retained_bytes,
            queued: 0,
        };
        for s in st.sessions.values() {
            if s.link.is_some() {
                z.connected += 1;
                if let Some(k) = z
                    .connected_by_kind
                    .iter_mut()
                    .find(|(k, _)| *k == s.identity.kind())
                {
                    k.1 += 1;
                }
            }
            z.queued += s.queue.len() + s.inflight.len();
        }
        z
    }
}

/// The session `sid` if connection `conn` holds it.
fn own(st: &mut State, sid: u64, conn: u64) -> Option<&mut Session> {
    st.sessions
        .get_mut(&sid)
        .filter(|s| s.link.as_ref().is_some_and(|l| l.conn == conn))
        .map(|s| &mut **s)
}

fn unroute_command(commands: &mut HashMap<Box<str>, Vec<u64>>, topic: &str, sid: u64) {
    if let Some(v) = commands.get_mut(topic) {
        v.retain(|x| *x != sid);
        if v.is_empty() {
            commands.remove(topic);
        }
    }
}

fn message_record(m: &Msg, pkid: u16, released: bool) -> MqttMessageRecord {
    MqttMessageRecord {
        schema: MQTT_SCHEMA,
        topic: m.topic.to_string(),
        payload: m.payload.to_vec(),
        qos: m.qos,
        retain: m.retain,
        pkid,
        released,
    }
}
