//! The front door: every device connection, parsed packet by packet. CONNECT is authenticated,
//! SUBSCRIBE and the will are checked against the device's topics, report PUBLISHes go to the
//! OTA service (acknowledged once persisted). Then, by engine:
//! - direct: one task per connection answers everything itself (SUBACK, UNSUBACK, PINGRESP) and
//!   writes the frames [`super::routes`] queues for it; sessions are scoped to the device.
//! - rumqttd: a task pair relays the connection to its own rumqttd connection; CONNECT is
//!   rewritten (keep-alive handled here, client id scoped to the device), everything but reports
//!   is forwarded, and downstream is framed only to interleave our acknowledgements and to spot
//!   the SUBACK of the command topic.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rumqttd::protocol::{Connect, ConnectProperties, LastWill, LastWillProperties, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Downstream;
use super::packet::{self, kind};
use super::routes::Routes;
use super::{BrokerError, Counters, DoorContext, InboundMessage, Presence};
use crate::protocol::{self, Inbound, Protocol};
use crate::ratelog::RateLog;

static DENIED_LOG: RateLog = RateLog::new();
static ERROR_LOG: RateLog = RateLog::new();
static VIOLATION_LOG: RateLog = RateLog::new();

/// Why a device connection ended. Only a [`Closed::Violation`] is counted as a protocol error
/// (once, where the connection ends) and warned about; refusals at CONNECT are counted where
/// they are decided ([`admit`]); the rest is logged at debug level.
#[derive(Debug, thiserror::Error)]
enum Closed {
    /// A packet MQTT 3.1.1 says to close the connection for.
    #[error("MQTT protocol violation: {0}")]
    Violation(String),
    /// Refused at CONNECT (a CONNACK with the code was sent) or beyond a limit.
    #[error("{0}")]
    Refused(&'static str),
    /// A publish on a topic that is not the device's (counted as an ACL denial).
    #[error("publish not allowed")]
    Denied,
    /// The device's socket failed or stopped reading.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An ordinary end: the device went away, its keep-alive expired, another connection took
    /// its session, a report could not be persisted, the server stops.
    #[error("{0}")]
    Ended(String),
}

impl Closed {
    fn ended(why: impl Into<String>) -> Closed {
        Closed::Ended(why.into())
    }
}

pub(super) fn bind(addr: crate::config::Listen, key: &str) -> Result<TcpListener, BrokerError> {
    let at = addr
        .addr()
        .ok_or_else(|| BrokerError::Start(format!("{key} is off")))?;
    crate::net::bind_listener(at)
        .map_err(|e| BrokerError::Start(format!("cannot listen on {key} = {at}: {e}")))
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: Arc<DoorContext>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // Not yet authenticated: a place in the pre-auth gate, not a connection permit.
            let ticket = ctx.preauth.admit(peer.ip());
            let evicted = ticket.evicted.clone();
            let deadline = ticket.deadline;
            let work = async {
                match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => serve(s, peer, &ctx, shutdown, ticket).await,
                            Ok(Err(e)) => {
                                Counters::inc(&ctx.counters.tls_handshake_failures);
                                Err(Closed::ended(format!("TLS handshake: {e}")))
                            }
                            Err(_) => {
                                Counters::inc(&ctx.counters.tls_handshake_failures);
                                Err(Closed::ended("TLS handshake timed out"))
                            }
                        }
                    }
                    None => serve(stream, peer, &ctx, shutdown, ticket).await,
                }
            };
            // one span per connection; `device` is filled in once it has logged in
            let span = tracing::info_span!("mqtt", %peer, device = tracing::field::Empty);
            let work = tracing::Instrument::instrument(work, span);
            tokio::pin!(work);
            let result = tokio::select! {
                r = &mut work => r,
                // (once logged in, the ticket is gone and nobody cancels this)
                _ = evicted.cancelled() => {
                    Err(Closed::ended("closed before logging in, to make room for a newer connection"))
                }
            };
            match result {
                Err(Closed::Violation(what)) => {
                    Counters::inc(&ctx.counters.protocol_errors);
                    if let Some(suppressed) = VIOLATION_LOG.admit() {
                        tracing::warn!(%peer, violation = what, suppressed, "MQTT protocol violation: connection closed");
                    }
                }
                Err(e) => tracing::debug!(peer = %peer, error = %e, "MQTT connection closed"),
                Ok(()) => {}
            }
        });
    }
}

/// Reads until one whole packet is buffered; `None` at end of stream.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(u8, Bytes)>, Closed> {
    loop {
        if let Some(f) =
            packet::take_frame(buf, max).map_err(|e| Closed::Violation(e.to_string()))?
        {
            return Ok(Some(f));
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(2048);
        }
        let n = rd.read_buf(buf).await?;
        if n == 0 {
            return Ok(None);
        }
    }
}

/// Connects to rumqttd, waiting up to 5 s for it to listen (right after start-up).
async fn connect_backend(addr: SocketAddr) -> Result<TcpStream, Closed> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(Closed::ended(format!("embedded broker: {e}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// How often the front door pings rumqttd on a device's behalf (its keep-alive is 65535 s).
const BACKEND_PING: Duration = Duration::from_secs(6 * 3600);
const PINGREQ: [u8; 2] = [0xC0, 0x00];
/// Frames queued for one device connection (direct engine); more are dropped and counted.
const OUTBOX: usize = 32;

/// Who is on the other end, and what they may touch.
struct Access {
    /// Logged in (None: anonymous lab device, learnt from its topics).
    known: Option<(String, Protocol)>,
    topics: Option<protocol::DeviceTopics>,
}

impl Access {
    /// The device this connection speaks for from its CONNECT: its login, or — an anonymous
    /// lab device — the user name it gave, when that is a device id (`pk&dn` for Alibaba).
    fn speaks_for(&self, login: Option<&rumqttd::protocol::Login>) -> Option<(String, Protocol)> {
        if let Some(k) = &self.known {
            return Some(k.clone());
        }
        let user = login?.username.as_str();
        let id = crate::protocol::id_from_username(user);
        let protocol = if user.contains('&') {
            Protocol::Alibaba
        } else {
            Protocol::Gateway
        };
        crate::ids::valid_device_id(&id).then_some((id, protocol))
    }

    fn publish_kind(&self, prefix: &str, topic: &str) -> Option<(String, Protocol, Inbound)> {
        match (&self.known, &self.topics) {
            (Some((id, proto)), Some(t)) => t
                .publish
                .iter()
                .find(|(tp, _)| tp == topic)
                .map(|(_, k)| (id.clone(), *proto, k.clone())),
            _ => protocol::classify_report_topic(prefix, topic).map(|(p, id, k)| (id, p, k)),
        }
    }

    /// Some(is the command topic) if the filter is allowed.
    fn subscribe_allowed(&self, prefix: &str, filter: &str) -> Option<(String, Protocol, bool)> {
        match (&self.known, &self.topics) {
            (Some((id, proto)), Some(t)) => t
                .subscribe
                .iter()
                .position(|f| f == filter)
                .map(|i| (id.clone(), *proto, i == 0)),
            _ => protocol::classify_command_filter(prefix, filter).map(|(p, id)| {
                let first = protocol::device_topics(p, prefix, &id).subscribe[0] == filter;
                (id, p, first)
            }),
        }
    }
}

enum Local {
    /// Send `kind(pkid)` once `done` fires (after the report is persisted).
    Ack {
        kind: u8,
        pkid: u16,
        done: oneshot::Receiver<()>,
    },
    /// Send these bytes now.
    Write(Bytes),
    /// Tell presence when the SUBACK with this packet id passes (device id, protocol).
    WatchSuback {
        pkid: u16,
        id: String,
        protocol: Protocol,
    },
}

/// A device's accepted CONNECT.
struct Login {
    access: Access,
    connect: Connect,
    props: Option<ConnectProperties>,
    will: Option<LastWill>,
    will_props: Option<LastWillProperties>,
    login: Option<rumqttd::protocol::Login>,
    /// Who the connection speaks for, in logs ("anonymous" in lab mode).
    scope: String,
    /// The client id (a random one when the device sent none).
    client: String,
}

impl Login {
    /// Session key: the client id scoped to the device, so one device can never take over
    /// another's session by reusing its client id.
    fn session_key(&self) -> String {
        use sha2::Digest;
        let h = sha2::Sha256::new()
            .chain_update(self.scope.as_bytes())
            .chain_update([0u8])
            .chain_update(self.client.as_bytes())
            .finalize();
        format!("d{}", &hex::encode(h)[..40])
    }
}

/// What a refused CONNECT is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    AuthFailure,
    ProtocolError,
    AclDenied,
}

/// A refused CONNECT: its CONNACK return code, what is counted, why (the connection's end
/// reason) and, for refusals worth a warning, what was refused (the user name, the will topic)
/// as a log field.
#[derive(Debug)]
struct Refusal {
    code: u8,
    counted: Counted,
    reason: &'static str,
    warn_about: Option<String>,
}

/// The decision on a decoded CONNECT, with no I/O: who the connection speaks for and what it
/// may touch, or why it is refused.
fn admit(
    auth: &dyn super::Authenticator,
    allow_anonymous: bool,
    prefix: &str,
    connect: &Connect,
    will: Option<&LastWill>,
    login: Option<&rumqttd::protocol::Login>,
) -> Result<Access, Refusal> {
    let known = login.and_then(|l| auth.authenticate(&l.username, &l.password));
    if known.is_none() && !allow_anonymous {
        let user = login.map(|l| l.username.as_str()).unwrap_or("");
        return Err(Refusal {
            code: if login.is_some() { 4 } else { 5 },
            counted: Counted::AuthFailure,
            reason: "login refused",
            warn_about: Some(user.to_string()),
        });
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        // MQTT 3.1.1 3.1.3-8: a session needs a client id to be found again
        return Err(Refusal {
            code: 2,
            counted: Counted::ProtocolError,
            reason: "empty client id with clean_session = false",
            warn_about: None,
        });
    }
    let access = Access {
        topics: known
            .as_ref()
            .map(|(id, p)| protocol::device_topics(*p, prefix, id)),
        known,
    };
    if let Some(w) = will {
        let topic = String::from_utf8_lossy(&w.topic).into_owned();
        if access.publish_kind(prefix, &topic).is_none() {
            return Err(Refusal {
                code: 5,
                counted: Counted::AclDenied,
                reason: "will topic not allowed",
                warn_about: Some(topic),
            });
        }
    }
    Ok(access)
}

/// Replays a byte stream through the front door's decisions, as a fuzz target
/// ([`crate::fuzzing::mqtt_session`]): framing with the 3.1.1 checks, the CONNECT decision
/// against `auth`, then every PUBLISH topic and SUBSCRIBE filter against the ACL. Panics if
/// the ACL ever lets a connection touch a topic that is not its device's.
pub(crate) fn replay_session(
    auth: &dyn super::Authenticator,
    allow_anonymous: bool,
    prefix: &str,
    data: &[u8],
    step: usize,
    max: usize,
) {
    let mut buf = BytesMut::new();
    let mut access: Option<Access> = None;
    for chunk in data.chunks(step.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            let (ty, frame) = match packet::take_frame(&mut buf, max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return, // closed
            };
            let Some(id) = &access else {
                if ty != kind::CONNECT {
                    return;
                }
                let Ok(Packet::Connect(connect, _, will, _, login)) = packet::decode(&frame, max)
                else {
                    return;
                };
                match admit(
                    auth,
                    allow_anonymous,
                    prefix,
                    &connect,
                    will.as_ref(),
                    login.as_ref(),
                ) {
                    Ok(i) => {
                        assert!(allow_anonymous || i.known.is_some());
                        access = Some(i);
                        continue;
                    }
                    Err(_) => return,
                }
            };
            let own = |dev: &str, p: Protocol| -> protocol::DeviceTopics {
                if let Some((k, kp)) = &id.known {
                    assert_eq!(
                        (k.as_str(), *kp),
                        (dev, p),
                        "a login speaks for another device"
                    );
                }
                assert!(
                    crate::ids::valid_device_id(dev),
                    "an invalid device id {dev:?}"
                );
                protocol::device_topics(p, prefix, dev)
            };
            match ty {
                kind::CONNECT => return, // a second CONNECT closes the connection
                kind::PUBLISH => {
                    let Ok(p) = packet::parse_publish(&frame) else {
                        return;
                    };
                    if let Some((dev, proto, k)) = id.publish_kind(prefix, &p.topic) {
                        let t = own(&dev, proto);
                        assert!(
                            t.publish.iter().any(|(tp, tk)| *tp == p.topic && *tk == k),
                            "{dev} may publish on {:?}",
                            p.topic
                        );
                    }
                }
                kind::SUBSCRIBE => {
                    let Ok(Packet::Subscribe(sub, _)) = packet::decode(&frame, max) else {
                        return;
                    };
                    for f in &sub.filters {
                        if let Some((dev, proto, first)) = id.subscribe_allowed(prefix, &f.path) {
                            let t = own(&dev, proto);
                            assert!(
                                t.subscribe.contains(&f.path),
                                "{dev} may subscribe to {:?}",
                                f.path
                            );
                            assert_eq!(first, t.subscribe[0] == f.path);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Reads and checks CONNECT; answers refusals itself.
async fn login<R, W>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    peer: SocketAddr,
    ctx: &DoorContext,
    ticket: &super::preauth::Ticket,
) -> Result<Login, Closed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = ctx.settings.max_packet_bytes;
    let prefix = &ctx.settings.topic_prefix;
    let first = tokio::time::timeout(ticket.deadline, read_frame(rd, buf, max))
        .await
        .map_err(|_| {
            Closed::ended(format!("no CONNECT within {} s", ticket.deadline.as_secs()))
        })??;
    let Some((kind::CONNECT, frame)) = first else {
        return Err(Closed::Violation("first packet is not CONNECT".into()));
    };
    ticket.spoke();
    let Packet::Connect(connect, props, will, will_props, login) =
        packet::decode(&frame, max).map_err(|e| Closed::Violation(format!("bad CONNECT: {e}")))?
    else {
        return Err(Closed::Violation("bad CONNECT".into()));
    };

    let access = match admit(
        ctx.auth.as_ref(),
        ctx.settings.allow_anonymous,
        prefix,
        &connect,
        will.as_ref(),
        login.as_ref(),
    ) {
        Ok(access) => access,
        Err(r) => {
            Counters::inc(match r.counted {
                Counted::AuthFailure => &ctx.counters.auth_failures,
                Counted::ProtocolError => &ctx.counters.protocol_errors,
                Counted::AclDenied => &ctx.counters.acl_denied,
            });
            if let Some(what) = &r.warn_about
                && let Some(suppressed) = DENIED_LOG.admit()
            {
                tracing::warn!(%peer, refused = %what, reason = r.reason, suppressed, "MQTT CONNECT refused");
            }
            let _ = wr.write_all(&packet::connack(r.code)).await;
            return Err(Closed::Refused(r.reason));
        }
    };
    Counters::inc(&ctx.counters.connections_accepted);
    let scope = access
        .known
        .as_ref()
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| "anonymous".into());
    let client = if connect.client_id.is_empty() {
        let mut r = [0u8; 8];
        rand::fill(&mut r);
        hex::encode(r)
    } else {
        connect.client_id.clone()
    };
    Ok(Login {
        access,
        connect,
        props,
        will,
        will_props,
        login,
        scope,
        client,
    })
}

/// Per-connection state shared by both engines' upstream handling.
struct Upstream<'a> {
    ctx: &'a DoorContext,
    peer: SocketAddr,
    access: &'a Access,
    scope: &'a str,
    /// The device id announced to presence (None until known).
    announced: Option<String>,
}

/// What to do with a SUBSCRIBE.
enum Subscription {
    /// Every filter is the device's own; with the device to mark ready if the command topic
    /// is among them.
    Allowed(rumqttd::protocol::Subscribe, Option<(String, Protocol)>),
    /// Answer with this SUBACK (failure for every filter) and forward nothing.
    Refused(Bytes),
}

/// A report's acknowledgement, sent once it is persisted.
struct PendingAck {
    kind: u8,
    pkid: u16,
    done: oneshot::Receiver<()>,
}

impl Upstream<'_> {
    fn announce(&mut self, id: &str, protocol: Protocol) {
        if self.announced.is_none() {
            let _ = self.ctx.presence.send(Presence::Connected {
                id: id.to_string(),
                protocol,
                ip: self.peer.ip().to_string(),
                anonymous: self.access.known.is_none(),
            });
            self.announced = Some(id.to_string());
        }
    }

    /// A device PUBLISH: checked against its report topics and handed to the OTA service.
    async fn report(&mut self, frame: &Bytes) -> Result<Option<PendingAck>, Closed> {
        let ctx = self.ctx;
        let p = packet::parse_publish(frame).map_err(|e| Closed::Violation(e.to_string()))?;
        let Some((device_id, proto, kind)) = self
            .access
            .publish_kind(&ctx.settings.topic_prefix, &p.topic)
        else {
            Counters::inc(&ctx.counters.acl_denied);
            if let Some(suppressed) = DENIED_LOG.admit() {
                tracing::warn!(
                    topic = p.topic,
                    device = self.scope,
                    peer = %self.peer,
                    suppressed,
                    "MQTT publish refused: not one of the device's report topics"
                );
            }
            return Err(Closed::Denied);
        };
        self.announce(&device_id, proto);
        Counters::inc(&ctx.counters.messages_in);
        let (done, wait) = if p.qos > 0 {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let msg = InboundMessage {
            device_id,
            protocol: proto,
            kind,
            payload: p.payload,
            authenticated: self.access.known.is_some(),
            done,
        };
        if ctx.messages.send(msg).await.is_err() {
            return Err(Closed::ended("server stopping"));
        }
        Ok(wait.map(|done| PendingAck {
            kind: if p.qos == 1 {
                kind::PUBACK
            } else {
                kind::PUBREC
            },
            pkid: p.pkid,
            done,
        }))
    }

    /// A SUBSCRIBE: every filter must be one of the device's command topics. A packet with any
    /// other filter is refused as a whole (SUBACK 0x80 for each filter; counted and logged).
    fn subscribe(&mut self, frame: &Bytes) -> Result<Subscription, Closed> {
        let ctx = self.ctx;
        let Ok(Packet::Subscribe(sub, _)) = packet::decode(frame, ctx.settings.max_packet_bytes)
        else {
            return Err(Closed::Violation("bad SUBSCRIBE".into()));
        };
        let mut watch = None;
        for f in &sub.filters {
            match self
                .access
                .subscribe_allowed(&ctx.settings.topic_prefix, &f.path)
            {
                Some((id, proto, true)) => watch = Some((id, proto)),
                Some(_) => {}
                None => {
                    Counters::inc(&ctx.counters.acl_denied);
                    if let Some(suppressed) = DENIED_LOG.admit() {
                        tracing::warn!(
                            filter = f.path,
                            device = self.scope,
                            peer = %self.peer,
                            suppressed,
                            "MQTT subscribe refused: not one of the device's command topics"
                        );
                    }
                    return Ok(Subscription::Refused(packet::suback(
                        sub.pkid,
                        &vec![0x80; sub.filters.len()],
                    )));
                }
            }
        }
        if let Some((id, protocol)) = &watch {
            self.announce(id, *protocol);
        }
        Ok(Subscription::Allowed(sub, watch))
    }

    /// The device's will, on an unexpected end: the server is the only subscriber of report
    /// topics, so it goes to the OTA service like any report.
    async fn deliver_will(&mut self, will: &LastWill) {
        let topic = String::from_utf8_lossy(&will.topic);
        if let Some((device_id, protocol, kind)) = self
            .access
            .publish_kind(&self.ctx.settings.topic_prefix, &topic)
        {
            Counters::inc(&self.ctx.counters.messages_in);
            let _ = self
                .ctx
                .messages
                .send(InboundMessage {
                    device_id,
                    protocol,
                    kind,
                    payload: will.message.clone(),
                    authenticated: self.access.known.is_some(),
                    done: None,
                })
                .await;
        }
    }
}

async fn serve<S>(
    io: S,
    peer: SocketAddr,
    ctx: &Arc<DoorContext>,
    shutdown: CancellationToken,
    ticket: super::preauth::Ticket,
) -> Result<(), Closed>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = BytesMut::with_capacity(512);
    let l = login(&mut rd, &mut wr, &mut buf, peer, ctx, &ticket).await?;
    drop(ticket);
    tracing::Span::current().record("device", l.scope.as_str());
    // Only logged-in connections count against mqtt.max_connections.
    let Ok(_permit) = ctx.connections.try_acquire() else {
        if let Some(suppressed) = ERROR_LOG.admit() {
            tracing::warn!(%peer, suppressed, "mqtt.max_connections reached: connection refused");
        }
        let _ = wr.write_all(&packet::connack(3)).await;
        return Err(Closed::Refused("mqtt.max_connections reached"));
    };
    let mut up = Upstream {
        ctx,
        peer,
        access: &l.access,
        scope: &l.scope,
        announced: None,
    };
    let result = match &*ctx.backend {
        Downstream::Direct(routes) => direct(rd, wr, buf, &l, &mut up, routes, shutdown).await,
        Downstream::Rumqttd { addr, .. } => relay(rd, wr, buf, &l, &mut up, *addr, shutdown).await,
    };
    if let Some(id) = up.announced {
        let _ = ctx.presence.send(Presence::Disconnected { id });
    }
    result
}

/// How long a device may leave a frame unread before its connection is closed (a dead peer
/// would otherwise hold its task until TCP gives up, many minutes later).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes a frame to a device, giving up on one that stopped reading.
async fn send<W: AsyncWrite + Unpin>(wr: &mut W, frame: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(frame)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the device read nothing for 30 s",
        )),
    }
}

/// The direct engine: one task answers the device and writes what the server routes to it.
async fn direct<S>(
    mut rd: tokio::io::ReadHalf<S>,
    mut wr: tokio::io::WriteHalf<S>,
    mut buf: BytesMut,
    l: &Login,
    up: &mut Upstream<'_>,
    routes: &Routes,
    shutdown: CancellationToken,
) -> Result<(), Closed>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let ctx = up.ctx;
    let max = ctx.settings.max_packet_bytes;
    let key = l.session_key();
    let conn = routes.next_conn();
    let taken_over = CancellationToken::new();
    let (present, restored) = routes.open(&key, l.connect.clean_session, conn, taken_over.clone());
    let (out, mut outbox) = mpsc::channel::<Bytes>(OUTBOX);
    if let Err(e) = send(&mut wr, &packet::connack_accepted(present)).await {
        routes.close(&key, conn);
        return Err(e.into());
    }
    if let Some((id, p)) = l.access.speaks_for(l.login.as_ref()) {
        up.announce(&id, p);
    }
    // A resumed session listens again on what it subscribed to before.
    for (topic, qos) in &restored {
        routes.subscribe(&key, conn, topic, *qos, &out);
        if let Some((id, protocol, true)) = l
            .access
            .subscribe_allowed(&ctx.settings.topic_prefix, topic)
        {
            up.announce(&id, protocol);
            let _ = ctx.presence.send(Presence::ready(id, protocol));
        }
    }

    // MQTT 3.1.1 3.1.2.10: no packet for 1.5 x keep-alive closes the connection.
    let idle = (l.connect.keep_alive > 0)
        .then(|| Duration::from_millis(l.connect.keep_alive as u64 * 1500));
    let far = Duration::from_secs(365 * 24 * 3600);
    let expiry = tokio::time::sleep(idle.unwrap_or(far));
    tokio::pin!(expiry);
    let mut pending: FuturesOrdered<futures_util::future::BoxFuture<'static, Option<Bytes>>> =
        FuturesOrdered::new();
    let mut graceful = false;
    let result: Result<(), Closed> = loop {
        let frame = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = taken_over.cancelled() => {
                Counters::inc(&ctx.counters.session_takeovers);
                break Err(Closed::ended("a new connection with the same client id took the session over"));
            }
            ack = pending.next(), if !pending.is_empty() => match ack {
                Some(Some(b)) => {
                    if let Err(e) = send(&mut wr, &b).await { break Err(e.into()); }
                    continue;
                }
                // the report could not be persisted: let the device send it again
                _ => break Err(Closed::ended("report not persisted")),
            },
            Some(b) = outbox.recv() => {
                if let Err(e) = send(&mut wr, &b).await { break Err(e.into()); }
                continue;
            }
            _ = &mut expiry => break Err(Closed::ended("keep-alive expired")),
            f = read_frame(&mut rd, &mut buf, max) => f,
        };
        let (ty, frame) = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Err(Closed::ended("connection closed without DISCONNECT")),
            Err(e) => break Err(e),
        };
        if let Some(d) = idle {
            expiry.as_mut().reset(tokio::time::Instant::now() + d);
        }
        let answer = match ty {
            kind::PUBLISH => match up.report(&frame).await {
                Ok(Some(a)) => {
                    pending.push_back(Box::pin(async move {
                        a.done.await.ok().map(|_| packet::ack(a.kind, a.pkid))
                    }));
                    None
                }
                Ok(None) => None,
                Err(e) => break Err(e),
            },
            // our QoS 2 acknowledgement of a report, second half
            kind::PUBREL => Some(packet::ack(
                kind::PUBCOMP,
                packet::ack_pkid(&frame).unwrap_or(0),
            )),
            kind::SUBSCRIBE => {
                let (sub, ready) = match up.subscribe(&frame) {
                    Ok(Subscription::Allowed(sub, ready)) => (sub, ready),
                    Ok(Subscription::Refused(suback)) => {
                        if let Err(e) = send(&mut wr, &suback).await {
                            break Err(e.into());
                        }
                        continue;
                    }
                    Err(e) => break Err(e),
                };
                let mut codes = Vec::with_capacity(sub.filters.len());
                for f in &sub.filters {
                    let qos = f.qos as u8;
                    routes.subscribe(&key, conn, &f.path, qos, &out);
                    codes.push(qos);
                }
                if let Err(e) = send(&mut wr, &packet::suback(sub.pkid, &codes)).await {
                    break Err(e.into());
                }
                if let Some((id, protocol)) = ready {
                    // after the SUBACK: a command published now reaches the device
                    let _ = ctx.presence.send(Presence::ready(id, protocol));
                }
                None
            }
            kind::UNSUBSCRIBE => {
                let Ok(Packet::Unsubscribe(u, _)) = packet::decode(&frame, max) else {
                    break Err(Closed::Violation("bad UNSUBSCRIBE".into()));
                };
                for f in &u.filters {
                    routes.unsubscribe(&key, conn, f);
                }
                Some(packet::unsuback(u.pkid))
            }
            kind::PINGREQ => Some(packet::pingresp()),
            // acknowledgements of server PUBLISHes: the server sends QoS 0 only
            kind::PUBACK | kind::PUBREC | kind::PUBCOMP => None,
            kind::DISCONNECT => {
                graceful = true;
                break Ok(());
            }
            kind::CONNECT => break Err(Closed::Violation("second CONNECT".into())),
            other => {
                break Err(Closed::Violation(format!(
                    "unexpected packet type {other} from a client"
                )));
            }
        };
        if let Some(b) = answer
            && let Err(e) = send(&mut wr, &b).await
        {
            break Err(e.into());
        }
    };
    routes.close(&key, conn);
    drop(out);
    if !graceful
        && !shutdown.is_cancelled()
        && let Some(w) = &l.will
    {
        up.deliver_will(w).await;
    }
    // Acknowledge what is being persisted, but never wait on a dead device for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Some(b)) = pending.next().await {
            if send(&mut wr, &b).await.is_err() {
                return;
            }
        }
    })
    .await;
    let _ = wr.shutdown().await;
    result
}

/// The rumqttd engine: relays the connection to a connection of its own to rumqttd.
async fn relay<S>(
    mut rd: tokio::io::ReadHalf<S>,
    mut wr: tokio::io::WriteHalf<S>,
    mut buf: BytesMut,
    l: &Login,
    up: &mut Upstream<'_>,
    backend: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), Closed>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let ctx = up.ctx;
    let max = ctx.settings.max_packet_bytes;
    // The front door enforces the device's keep-alive. Reports never reach rumqttd, so it gets
    // the longest keep-alive MQTT allows (rumqttd refuses 0) and a PINGREQ of ours every few
    // hours; the matching PINGRESPs are swallowed.
    let keep_alive = l.connect.keep_alive;
    let mut connect = l.connect.clone();
    connect.keep_alive = u16::MAX;
    // Scoped per device and hashed: rumqttd refuses client ids containing + $ # or /, which
    // ids may hold.
    connect.client_id = l.session_key();
    let rewritten = packet::encode(Packet::Connect(
        connect,
        l.props.clone(),
        l.will.clone(),
        l.will_props.clone(),
        l.login.clone(),
    ))
    .map_err(|e| Closed::ended(format!("rewriting CONNECT: {e}")))?;
    let handshake = ctx
        .backend_handshakes
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Closed::ended("server stopping"))?;
    let backend = connect_backend(backend).await?;
    let _ = backend.set_nodelay(true);
    let (mut brd, mut bwr) = backend.into_split();
    bwr.write_all(&rewritten)
        .await
        .map_err(|e| Closed::ended(format!("embedded broker: {e}")))?;

    if let Some((id, p)) = l.access.speaks_for(l.login.as_ref()) {
        up.announce(&id, p);
    }

    // Downstream: broker -> device, plus our acknowledgements, in order.
    let (local_tx, mut local_rx) = mpsc::channel::<Local>(64);
    let presence = ctx.presence.clone();
    let swallow = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let swallow_w = swallow.clone();
    let writer = tokio::spawn(async move {
        let mut handshake = Some(handshake); // released with rumqttd's first answer (CONNACK)
        let mut bbuf = BytesMut::with_capacity(512);
        let mut pending = FuturesOrdered::new();
        let mut watched: Vec<(u16, String, Protocol)> = Vec::new();
        loop {
            tokio::select! {
                biased;
                msg = local_rx.recv() => match msg {
                    Some(Local::Ack { kind, pkid, done }) => {
                        pending.push_back(async move { done.await.ok().map(|_| packet::ack(kind, pkid)) });
                    }
                    Some(Local::Write(b)) => {
                        if wr.write_all(&b).await.is_err() { break; }
                    }
                    Some(Local::WatchSuback { pkid, id, protocol }) => watched.push((pkid, id, protocol)),
                    None => break,
                },
                Some(ack) = pending.next(), if !pending.is_empty() => match ack {
                    Some(b) => if wr.write_all(&b).await.is_err() { break; },
                    None => break, // the report could not be persisted: let the device retry
                },
                frame = read_frame(&mut brd, &mut bbuf, usize::MAX >> 4) => match frame {
                    Ok(Some((ty, f))) => {
                        handshake.take();
                        if ty == kind::PINGRESP
                            && swallow_w
                                .fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |n| n.checked_sub(1))
                                .is_ok()
                        {
                            continue; // the answer to our own keep-alive ping
                        }
                        if ty == kind::SUBACK
                            && let Some(pkid) = packet::ack_pkid(&f)
                            && let Some(i) = watched.iter().position(|w| w.0 == pkid)
                        {
                            let (_, id, protocol) = watched.swap_remove(i);
                            let _ = presence.send(Presence::ready(id, protocol));
                        }
                        if wr.write_all(&f).await.is_err() { break; }
                    }
                    _ => break,
                },
            }
        }
        let _ = wr.shutdown().await;
    });

    let idle = (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500));
    let mut qos2: HashSet<u16> = HashSet::new();
    let mut backend_ping =
        tokio::time::interval_at(tokio::time::Instant::now() + BACKEND_PING, BACKEND_PING);
    let result: Result<(), Closed> = loop {
        let next = async {
            match idle {
                Some(d) => tokio::time::timeout(d, read_frame(&mut rd, &mut buf, max))
                    .await
                    .map_err(|_| Closed::ended("keep-alive expired"))?,
                None => read_frame(&mut rd, &mut buf, max).await,
            }
        };
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = backend_ping.tick() => {
                swallow.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if bwr.write_all(&PINGREQ).await.is_err() {
                    break Err(Closed::ended("embedded broker closed"));
                }
                continue;
            }
            f = next => f,
        };
        let (ty, frame) = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        match ty {
            kind::PUBLISH => match up.report(&frame).await {
                Ok(Some(a)) => {
                    if a.kind == kind::PUBREC {
                        qos2.insert(a.pkid);
                    }
                    if local_tx
                        .send(Local::Ack {
                            kind: a.kind,
                            pkid: a.pkid,
                            done: a.done,
                        })
                        .await
                        .is_err()
                    {
                        break Ok(());
                    }
                }
                Ok(None) => {}
                Err(e) => break Err(e),
            },
            kind::PUBREL => {
                // Only the device's own QoS 2 reports produce a PUBREL from it: answer it here.
                let pkid = packet::ack_pkid(&frame).unwrap_or(0);
                qos2.remove(&pkid);
                if local_tx
                    .send(Local::Write(packet::ack(kind::PUBCOMP, pkid)))
                    .await
                    .is_err()
                {
                    break Ok(());
                }
            }
            kind::SUBSCRIBE => {
                let watch = match up.subscribe(&frame) {
                    Ok(Subscription::Allowed(_, w)) => w,
                    Ok(Subscription::Refused(suback)) => {
                        if local_tx.send(Local::Write(suback)).await.is_err() {
                            break Ok(());
                        }
                        continue;
                    }
                    Err(e) => break Err(e),
                };
                if let Some((id, protocol)) = watch {
                    let _ = local_tx
                        .send(Local::WatchSuback {
                            pkid: packet::ack_pkid(&frame).unwrap_or(0),
                            id,
                            protocol,
                        })
                        .await;
                }
                if bwr.write_all(&frame).await.is_err() {
                    break Err(Closed::ended("embedded broker closed"));
                }
            }
            kind::CONNECT => break Err(Closed::Violation("second CONNECT".into())),
            kind::DISCONNECT => {
                let _ = bwr.write_all(&frame).await;
                break Ok(());
            }
            _ => {
                if bwr.write_all(&frame).await.is_err() {
                    break Err(Closed::ended("embedded broker closed"));
                }
            }
        }
    };
    drop(local_tx);
    let _ = bwr.shutdown().await;
    // Let queued acknowledgements go out, but never wait on a dead device for long.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    result
}
