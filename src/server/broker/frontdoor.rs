//! The front door: listeners, TLS, and the login of every connection. A CONNECT is decoded,
//! its identity established — a client certificate's CN (`use_identity_as_username`), a device
//! (user name and secret, checked against the registry), an application user (user name and
//! password, from the store or `mqtt.password_file`), or nobody (`allow_anonymous`) — and its
//! will checked; then [`super::connection`] serves the logged-in connection.
//!
//! OTA topics keep their built-in rules here ([`Access`]): a device may publish only on its
//! own report topics and subscribe only to its own command topics; in lab mode an anonymous
//! client speaks for the device its topics name. No ACL line changes that.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::acl::{Acl, Want};
use super::packet::{self, FrameError, Packet};
use super::router::Identity;
use super::users::Checked;
use super::{BrokerError, Counters, DoorContext};
use crate::protocol::{self, Inbound, Protocol};
use crate::ratelog::RateLog;

pub(super) static DENIED_LOG: RateLog = RateLog::new();
static ERROR_LOG: RateLog = RateLog::new();
static VIOLATION_LOG: RateLog = RateLog::new();

/// Why a connection ended. Only a [`Closed::Violation`] is counted as a protocol error
/// (once, where the connection ends) and warned about; refusals at CONNECT are counted where
/// they are decided; the rest is logged at debug level.
#[derive(Debug, thiserror::Error)]
pub(super) enum Closed {
    /// A packet MQTT 3.1.1 says to close the connection for.
    #[error("MQTT protocol violation: {0}")]
    Violation(String),
    /// Refused at CONNECT (a CONNACK with the code was sent) or beyond a limit.
    #[error("{0}")]
    Refused(&'static str),
    /// The client's socket failed or stopped reading.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An ordinary end: the client went away, its keep-alive expired, another connection took
    /// its session, a message could not be persisted, the server stops.
    #[error("{0}")]
    Ended(String),
}

impl Closed {
    pub(super) fn ended(why: impl Into<String>) -> Closed {
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
        // The login phase's task; a logged-in connection is served by a task of its own
        // (log lines name the peer and client themselves: no span is kept per connection).
        let stopping = shutdown.clone();
        ctx.tasks.clone().spawn(async move {
            let r = tokio::select! {
                r = Box::pin(life(stream, peer, tls, &ctx)) => r,
                _ = stopping.cancelled() => Err(Closed::ended("the appliance is stopping")),
            };
            if r.is_err() {
                report(&ctx, peer, r);
            }
        });
    }
}

/// Logs and counts how a connection ended.
pub(super) fn report(ctx: &DoorContext, peer: SocketAddr, r: Result<(), Closed>) {
    match r {
        Err(Closed::Violation(what)) => {
            Counters::inc(&ctx.counters.protocol_errors);
            if let Some(suppressed) = VIOLATION_LOG.admit() {
                tracing::warn!(%peer, violation = what, suppressed, "MQTT protocol violation: connection closed");
            }
        }
        Err(e) => tracing::debug!(peer = %peer, error = %e, "MQTT connection closed"),
        Ok(()) => {}
    }
}

/// A connection from accept to login: the pre-auth gate, TLS, login; then it is handed to a
/// task of its own ([`super::connection`]). Every phase is boxed, so the task holds only its
/// current phase's state.
async fn life(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: &Arc<DoorContext>,
) -> Result<(), Closed> {
    // Not yet authenticated: a place in the pre-auth gate, not a connection permit.
    let ticket = ctx.preauth.admit(peer.ip());
    let evicted = ticket.evicted.clone();
    let deadline = ticket.deadline;
    let work = Box::pin(async move {
        match tls {
            Some(acceptor) => {
                let handshake = Box::pin(tokio::time::timeout(deadline, acceptor.accept(stream)));
                match handshake.await {
                    Ok(Ok(s)) => {
                        let cn = s
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| crate::tls::certificate_cn(c));
                        Box::pin(serve(s, peer, cn, ctx, ticket)).await
                    }
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
            None => Box::pin(serve(stream, peer, None, ctx, ticket)).await,
        }
    });
    tokio::select! {
        r = work => r,
        // (once logged in, the ticket is gone and nobody cancels this)
        _ = evicted.cancelled() => {
            Err(Closed::ended("closed before logging in, to make room for a newer connection"))
        }
    }
}

/// Reads until one whole packet is buffered; `None` at end of stream.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
    counters: &Counters,
) -> Result<Option<(u8, Bytes)>, Closed> {
    loop {
        if let Some(f) = take(buf, max, counters)? {
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

/// [`packet::take_frame`], an oversized packet counted.
pub(super) fn take(
    buf: &mut BytesMut,
    max: usize,
    counters: &Counters,
) -> Result<Option<(u8, Bytes)>, Closed> {
    packet::take_frame(buf, max).map_err(|e| {
        if matches!(e, FrameError::TooLarge { .. }) {
            Counters::inc(&counters.dropped_too_large);
        }
        Closed::Violation(e.to_string())
    })
}

/// What a connection may do on the devices' OTA topics.
#[derive(Debug, Clone)]
pub(super) struct Access {
    /// Logged in as a device.
    pub known: Option<(String, Protocol)>,
    pub topics: Option<Box<protocol::DeviceTopics>>,
    /// Whether it speaks OTA at all: devices and anonymous lab clients do, users do not.
    pub ota: bool,
}

impl Access {
    /// The device this connection speaks for from its CONNECT: its login, or — an anonymous
    /// lab device — the user name it gave, when that is a device id (`pk&dn` for Alibaba).
    pub fn speaks_for(&self, username: Option<&str>) -> Option<(String, Protocol)> {
        if let Some(k) = &self.known {
            return Some(k.clone());
        }
        if !self.ota {
            return None;
        }
        let user = username?;
        let id = crate::protocol::id_from_username(user);
        let protocol = if user.contains('&') {
            Protocol::Alibaba
        } else {
            Protocol::Gateway
        };
        crate::ids::valid_device_id(&id).then_some((id, protocol))
    }

    /// The device and report kind of an OTA report topic this connection may publish on.
    pub fn publish_kind(&self, prefix: &str, topic: &str) -> Option<(String, Protocol, Inbound)> {
        if !self.ota {
            return None;
        }
        match (&self.known, &self.topics) {
            (Some((id, proto)), Some(t)) => t
                .publish
                .iter()
                .find(|(tp, _)| tp == topic)
                .map(|(_, k)| (id.clone(), *proto, k.clone())),
            _ => protocol::classify_report_topic(prefix, topic).map(|(p, id, k)| (id, p, k)),
        }
    }

    /// Some(device, protocol, is its first command topic) if the filter is one of the OTA
    /// command topics this connection may listen on.
    pub fn subscribe_allowed(
        &self,
        prefix: &str,
        filter: &str,
    ) -> Option<(String, Protocol, bool)> {
        if !self.ota {
            return None;
        }
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

/// A logged-in connection's identity and CONNECT.
pub(super) struct Login {
    pub identity: Arc<Identity>,
    pub access: Access,
    /// The user name the client gave (an anonymous lab device says who it is with it).
    pub username: Option<String>,
    /// The client id (a random one when the client sent none).
    pub client: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub will: Option<Box<packet::Will>>,
    pub level: u8,
}

/// What a refused CONNECT is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Counted {
    AuthFailure,
    ProtocolError,
    AclDenied,
}

/// A refused CONNECT: its CONNACK return code, what is counted, why (the connection's end
/// reason) and, for refusals worth a warning, what was refused (the user name, the will topic)
/// as a log field.
#[derive(Debug)]
pub(super) struct Refusal {
    pub code: u8,
    pub counted: Counted,
    pub reason: &'static str,
    pub warn_about: Option<String>,
}

impl Refusal {
    fn auth(code: u8, user: &str) -> Refusal {
        Refusal {
            code,
            counted: Counted::AuthFailure,
            reason: "login refused",
            warn_about: Some(user.to_string()),
        }
    }
}

/// The rules a CONNECT is decided by.
pub(super) struct Rules<'a> {
    pub prefix: &'a str,
    pub acl: &'a Acl,
}

/// The decision on a CONNECT once its identity is known, with no I/O: what the connection may
/// touch, or why it is refused (a client id rule, a will it may not publish).
pub(super) fn admit(
    rules: &Rules<'_>,
    identity: &Identity,
    known: Option<(String, Protocol)>,
    connect: &packet::Connect,
) -> Result<Access, Refusal> {
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
            .map(|(id, p)| Box::new(protocol::device_topics(*p, rules.prefix, id))),
        known,
        ota: !matches!(identity, Identity::User(_)),
    };
    if let Some(w) = &connect.will {
        let ota_will = access.publish_kind(rules.prefix, &w.topic).is_some();
        let general_will = !protocol::is_ota_topic(rules.prefix, &w.topic)
            && rules.acl.allows(
                identity.acl_user(),
                &connect.client_id,
                &w.topic,
                Want::Write,
            );
        if !ota_will && !general_will {
            return Err(Refusal {
                code: 5,
                counted: Counted::AclDenied,
                reason: "will topic not allowed",
                warn_about: Some(w.topic.clone()),
            });
        }
    }
    Ok(access)
}

/// Who the CONNECT speaks for: the certificate's CN (with `use_identity_as_username`), a
/// device, an application user, or nobody; or why it is refused.
async fn identify(
    ctx: &DoorContext,
    cert_cn: Option<&str>,
    connect: &packet::Connect,
) -> Result<(Identity, Option<(String, Protocol)>), Refusal> {
    let s = &ctx.settings;
    if s.use_identity_as_username
        && let Some(cn) = cert_cn
    {
        // the CA vouched for the name: a registered device, else an application user
        if let Some((id, p)) = ctx.auth.device(cn) {
            let username = match p {
                Protocol::Alibaba => id.replacen('/', "&", 1),
                Protocol::Gateway => id.clone(),
            };
            return Ok((
                Identity::Device {
                    id: id.clone(),
                    protocol: p,
                    username,
                },
                Some((id, p)),
            ));
        }
        return Ok((Identity::User(cn.to_string()), None));
    }
    let Some(user) = connect.username.as_deref() else {
        return if s.allow_anonymous {
            Ok((Identity::Anonymous, None))
        } else {
            Err(Refusal::auth(5, ""))
        };
    };
    let password = connect.password.clone().unwrap_or_default();
    let pw_text = std::str::from_utf8(&password).unwrap_or("");
    if let Some((id, p)) = ctx.auth.authenticate(user, pw_text) {
        return Ok((
            Identity::Device {
                id: id.clone(),
                protocol: p,
                username: user.to_string(),
            },
            Some((id, p)),
        ));
    }
    match ctx.users.check(user, &password).await {
        Checked::Ok => return Ok((Identity::User(user.to_string()), None)),
        Checked::Wrong => return Err(Refusal::auth(4, user)),
        Checked::Busy => {
            return Err(Refusal {
                code: 3,
                counted: Counted::AuthFailure,
                reason: "too many password checks at once",
                warn_about: Some(user.to_string()),
            });
        }
        Checked::Unknown => {}
    }
    if s.allow_anonymous {
        // lab mode: an unknown name is an anonymous client (a lab device says who it is)
        return Ok((Identity::Anonymous, None));
    }
    Err(Refusal::auth(
        if connect.password.is_some() { 4 } else { 5 },
        user,
    ))
}

/// Replays a byte stream through the front door's decisions, as a fuzz target
/// ([`crate::fuzzing::mqtt_session`]): framing with the 3.1.1 checks, the CONNECT decision
/// against `auth` and an ACL that opens everything, then every PUBLISH topic and SUBSCRIBE
/// filter against the OTA rules. Panics if a connection could ever touch an OTA topic that is
/// not its device's.
pub(crate) fn replay_session(
    auth: &dyn super::Authenticator,
    allow_anonymous: bool,
    prefix: &str,
    data: &[u8],
    step: usize,
    max: usize,
) {
    let open = Acl::parse("topic readwrite #\npattern readwrite #\n").expect("valid");
    let rules = Rules { prefix, acl: &open };
    let mut buf = BytesMut::new();
    let mut access: Option<Access> = None;
    for chunk in data.chunks(step.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            let frame = match packet::take_frame(&mut buf, max) {
                Ok(Some((_, f))) => f,
                Ok(None) => break,
                Err(_) => return, // closed
            };
            let Ok(p) = packet::decode(&frame) else {
                return;
            };
            let Some(id) = &access else {
                let Packet::Connect(connect) = p else {
                    return;
                };
                let user = connect.username.as_deref();
                let pw = connect.password.as_deref().unwrap_or(&[]);
                let known =
                    user.and_then(|u| auth.authenticate(u, std::str::from_utf8(pw).unwrap_or("")));
                let identity = match (&known, user) {
                    (Some((id, p)), Some(u)) => Identity::Device {
                        id: id.clone(),
                        protocol: *p,
                        username: u.to_string(),
                    },
                    _ if allow_anonymous => Identity::Anonymous,
                    _ => return,
                };
                if let Ok(i) = admit(&rules, &identity, known, &connect) {
                    assert!(allow_anonymous || i.known.is_some());
                    access = Some(i);
                    continue;
                }
                return;
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
            match p {
                Packet::Connect(_) => return, // a second CONNECT closes the connection
                Packet::Publish(p) => {
                    if let Some((dev, proto, k)) = id.publish_kind(prefix, &p.topic) {
                        let t = own(&dev, proto);
                        assert!(
                            t.publish.iter().any(|(tp, tk)| *tp == p.topic && *tk == k),
                            "{dev} may publish on {:?}",
                            p.topic
                        );
                    }
                }
                Packet::Subscribe(sub) => {
                    for (f, _) in &sub.filters {
                        if let Some((dev, proto, first)) = id.subscribe_allowed(prefix, f) {
                            let t = own(&dev, proto);
                            assert!(t.subscribe.contains(f), "{dev} may subscribe to {f:?}");
                            assert_eq!(first, t.subscribe[0] == *f);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Reads and checks CONNECT; answers refusals itself.
async fn login<S>(
    io: &mut S,
    buf: &mut BytesMut,
    peer: SocketAddr,
    cert_cn: Option<&str>,
    ctx: &DoorContext,
    ticket: &super::preauth::Ticket,
) -> Result<Login, Closed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = ctx.settings.max_packet_bytes;
    let first = tokio::time::timeout(ticket.deadline, read_frame(io, buf, max, &ctx.counters))
        .await
        .map_err(|_| {
            Closed::ended(format!("no CONNECT within {} s", ticket.deadline.as_secs()))
        })??;
    let Some((packet::kind::CONNECT, frame)) = first else {
        return Err(Closed::Violation("first packet is not CONNECT".into()));
    };
    ticket.spoke();
    let connect = match packet::decode(&frame) {
        Ok(Packet::Connect(c)) => c,
        Err(FrameError::Version(level)) => {
            // MQTT 5 understands its own CONNACK; older levels the 3.1.1 one (code 1)
            let answer = if level == 5 {
                packet::connack_v5_unsupported()
            } else {
                packet::connack(1)
            };
            let _ = io.write_all(&answer).await;
            Counters::inc(&ctx.counters.protocol_errors);
            return Err(Closed::Refused("unsupported MQTT protocol level"));
        }
        Err(e) => return Err(Closed::Violation(format!("bad CONNECT: {e}"))),
        Ok(_) => return Err(Closed::Violation("bad CONNECT".into())),
    };
    let decided = match identify(ctx, cert_cn, &connect).await {
        Ok((identity, known)) => {
            let (_, acl) = ctx.router.acl();
            let rules = Rules {
                prefix: &ctx.settings.topic_prefix,
                acl: &acl,
            };
            admit(&rules, &identity, known, &connect).map(|a| (identity, a))
        }
        Err(r) => Err(r),
    };
    let (identity, access) = match decided {
        Ok(x) => x,
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
            let _ = io.write_all(&packet::connack(r.code)).await;
            return Err(Closed::Refused(r.reason));
        }
    };
    Counters::inc(&ctx.counters.connections_accepted);
    let client = if connect.client_id.is_empty() {
        let mut r = [0u8; 8];
        rand::fill(&mut r);
        format!("auto-{}", hex::encode(r))
    } else {
        connect.client_id
    };
    Ok(Login {
        identity: Arc::new(identity),
        access,
        username: connect.username,
        client,
        clean: connect.clean_session,
        keep_alive: connect.keep_alive,
        will: connect.will.map(Box::new),
        level: connect.level,
    })
}

async fn serve<S>(
    mut io: S,
    peer: SocketAddr,
    cert_cn: Option<String>,
    ctx: &Arc<DoorContext>,
    ticket: super::preauth::Ticket,
) -> Result<(), Closed>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(512);
    let l = Box::pin(login(
        &mut io,
        &mut buf,
        peer,
        cert_cn.as_deref(),
        ctx,
        &ticket,
    ))
    .await?;
    drop(ticket);
    // Only logged-in connections count against mqtt.max_connections.
    let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
        if let Some(suppressed) = ERROR_LOG.admit() {
            tracing::warn!(%peer, suppressed, "mqtt.max_connections reached: connection refused");
        }
        let _ = io.write_all(&packet::connack(3)).await;
        return Err(Closed::Refused("mqtt.max_connections reached"));
    };
    // The connection gets a task of its own: what the login phase held is freed.
    match super::connection::open(io, buf, l, peer, ctx.clone(), permit) {
        super::connection::Opened::Ready(ready) => {
            ctx.tasks.spawn(ready.run());
        }
        super::connection::Opened::StoreFailed(mut io) => {
            let _ = io.write_all(&packet::connack(3)).await;
            return Err(Closed::Refused("the store failed"));
        }
    }
    Ok(())
}

/// How long a client may leave a frame unread before its connection is closed (a dead peer
/// would otherwise hold its task until TCP gives up, many minutes later).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes to a client, giving up on one that stopped reading.
pub(super) async fn send<W: AsyncWrite + Unpin>(wr: &mut W, frame: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(frame)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client read nothing for 30 s",
        )),
    }
}
