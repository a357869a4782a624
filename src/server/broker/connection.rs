//! One logged-in connection: its session in the [`Router`], then packet by packet until it
//! ends. A device's OTA reports go to the OTA service (acknowledged once persisted); general
//! publishes are checked against the ACL and routed; SUBSCRIBE filters are decided one by one
//! (the device's own command topic, a general filter the ACL grants, or 0x80). What the router
//! queues for the session is written whenever the connection is woken.
//!
//! Acknowledgements keep the order of the packets they answer (MQTT 3.1.1 4.6): one that
//! waits for the store's flush holds back the ones after it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::acl::{Grant, Want};
use super::frontdoor::{Closed, DENIED_LOG, Login, send, take};
use super::packet::{self, Packet, kind};
use super::router::{Asked, End, Link, Publishing, Signal};
use super::{Counters, DoorContext, InboundMessage, Presence};
use crate::protocol::{self, Protocol};

/// Acknowledgements waiting for the store at once; beyond it the connection stops reading.
const MAX_PENDING: usize = 256;
/// Bytes taken from the router per write.
const WRITE_BUDGET: usize = 64 * 1024;
/// What an idle connection keeps to read into: once a read's packets are handled, a larger
/// buffer is given back (an idle connection costs this, not its largest packet).
const IDLE_BUFFER: usize = 128;

/// Answers that wait for something (the store's flush) before they are written, in order.
type Pending = FuturesOrdered<BoxFuture<'static, Option<Bytes>>>;

/// The next answer that waited; `None` when none is waiting.
async fn next_ack(pending: &mut Option<Box<Pending>>) -> Option<Option<Bytes>> {
    match pending.as_deref_mut() {
        Some(p) => p.next().await,
        None => None,
    }
}

/// Where a packet leaves the loop.
enum Flow {
    Continue,
    Disconnect,
}

/// A logged-in connection. Its one task holds this and the select in [`Conn::serve`]: no
/// timer (the router's keep-alive sweep ends it), no token (the router signals it), no second
/// half of the stream, and buffers only while they hold something.
struct Conn<S> {
    ctx: Arc<DoorContext>,
    l: Login,
    io: S,
    out: BytesMut,
    peer: SocketAddr,
    sid: u64,
    conn: u64,
    signal: Arc<Signal>,
    /// Answers waiting for the store, in order (only while there are any).
    pending: Option<Box<Pending>>,
    /// The device id announced to presence (None until known).
    announced: Option<Box<str>>,
    /// The last ACL decision on a publish: (ACL generation, topic, allowed); boxed, as only
    /// clients that publish general traffic have one.
    last_write: Option<Box<(u64, Box<str>, bool)>>,
}

/// A logged-in connection about to be served, or why its session could not be opened.
pub(super) enum Opened<S> {
    Ready(Box<Ready<S>>),
    StoreFailed(S),
}

/// A connection attached to its session, not yet served.
pub(super) struct Ready<S> {
    c: Conn<S>,
    buf: BytesMut,
    commands: Vec<String>,
    permit: OwnedSemaphorePermit,
}

/// Attaches a logged-in connection to its session (no await: the task that will serve it is
/// spawned with nothing but this).
pub(super) fn open<S>(
    io: S,
    buf: BytesMut,
    l: Login,
    peer: SocketAddr,
    ctx: Arc<DoorContext>,
    permit: OwnedSemaphorePermit,
) -> Opened<S> {
    let conn = ctx.next_conn();
    let signal = Signal::new(l.keep_alive);
    let key = l.identity.session_key(&l.client);
    let link = Link {
        conn,
        signal: signal.clone(),
        peer,
        since_ms: crate::time::now_ms(),
        level: l.level,
    };
    let attached = match ctx
        .router
        .attach(&key, &l.client, l.identity.clone(), l.clean, link)
    {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "MQTT session could not be opened: the store failed");
            return Opened::StoreFailed(io);
        }
    };
    let mut out = BytesMut::new();
    out.extend_from_slice(&packet::connack_accepted(attached.present));
    Opened::Ready(Box::new(Ready {
        c: Conn {
            ctx,
            l,
            io,
            out,
            peer,
            sid: attached.sid,
            conn,
            signal,
            pending: None,
            announced: None,
            last_write: None,
        },
        buf,
        commands: attached.commands,
        permit,
    }))
}

impl<S> Ready<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Serves the connection until it ends (its own task: what the login needed is gone).
    /// It opens the box itself: an `async fn` taking the parts by value would keep them twice
    /// in the task (its arguments and their moved copies), ~350 bytes more per connection.
    pub(super) async fn run(self: Box<Self>) {
        let Ready {
            mut c,
            mut buf,
            commands,
            permit,
        } = *self;
        Box::pin(c.resumed(&commands)).await;
        drop(commands);
        let result = c.serve(&mut buf).await;
        drop(buf);
        let graceful = matches!(result, Ok(true));
        c.ctx.router.detach(c.sid, c.conn);
        // (the ending is boxed: a connection's future does not carry its state while it lives)
        Box::pin(c.end(graceful)).await;
        drop(permit);
        super::frontdoor::report(&c.ctx, c.peer, result.map(|_| ()));
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Presence for a device, and readiness of a resumed session's command topics.
    async fn resumed(&mut self, commands: &[String]) {
        if let Some((id, p)) = self.l.access.speaks_for(self.l.username.as_deref()) {
            self.announce(&id, p);
        }
        // A resumed session listens again on the command topics it subscribed to before.
        for topic in commands {
            if let Some((id, protocol, true)) = self
                .l
                .access
                .subscribe_allowed(&self.ctx.settings.topic_prefix, topic)
            {
                self.announce(&id, protocol);
                let _ = self.ctx.presence.send(Presence::ready(id, protocol));
            }
        }
        self.l.username = None; // not needed any more
    }

    /// After the loop: the will on an unexpected end, acknowledgements still being persisted,
    /// presence.
    async fn end(&mut self, graceful: bool) {
        let stopping = self.signal.ended() == Some(End::Shutdown);
        if !graceful
            && !stopping
            && let Some(w) = self.l.will.take()
        {
            self.deliver_will(&w).await;
        }
        // Acknowledge what is being persisted, but never wait on a dead client for long.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Some(b)) = next_ack(&mut self.pending).await {
                self.out.extend_from_slice(&b);
            }
            if !self.out.is_empty() {
                let _ = self.io.write_all(&self.out).await;
                let _ = self.io.flush().await;
            }
        })
        .await;
        let _ = self.io.shutdown().await;
        if let Some(id) = self.announced.take() {
            let _ = self
                .ctx
                .presence
                .send(Presence::Disconnected { id: id.into() });
        }
    }

    /// The loop; `Ok(true)` after a DISCONNECT.
    async fn serve(&mut self, buf: &mut BytesMut) -> Result<bool, Closed> {
        // packets that came with the CONNECT (boxed: once per connection, and the loop's
        // state does not have to hold this call's beside its own)
        if Box::pin(self.frames(buf)).await? {
            return Ok(true);
        }
        loop {
            if !self.out.is_empty() {
                send(&mut self.io, &self.out).await?;
                // an idle connection holds no write buffer
                self.out = BytesMut::new();
            }
            tokio::select! {
                biased;
                _ = self.signal.wake.notified() => {
                    match self.signal.ended() {
                        None => self.drain()?,
                        Some(End::Shutdown) => return Ok(false),
                        Some(End::TakenOver) => return Err(Closed::ended(
                            "a new connection with the same client id took the session over",
                        )),
                        Some(End::UserDeleted) => return Err(Closed::ended("its MQTT user was deleted")),
                        // MQTT 3.1.1 3.1.2.10
                        Some(End::KeepAlive) => return Err(Closed::ended("keep-alive expired")),
                    }
                }
                ack = next_ack(&mut self.pending), if self.waiting() > 0 => match ack {
                    Some(Some(b)) => {
                        self.out.extend_from_slice(&b);
                        if self.waiting() == 0 {
                            // an idle connection holds no queue
                            self.pending = None;
                        }
                    }
                    // not persisted: let the client send it again
                    _ => return Err(Closed::ended("a message could not be persisted")),
                },
                r = self.io.read_buf(buf), if self.waiting() < MAX_PENDING => {
                    if r? == 0 {
                        return Err(Closed::ended("connection closed without DISCONNECT"));
                    }
                    self.signal.heard();
                    if self.frames(buf).await? {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Handles every whole packet in `buf`, then takes what the router has for the session;
    /// `Ok(true)` after a DISCONNECT.
    async fn frames(&mut self, buf: &mut BytesMut) -> Result<bool, Closed> {
        let max = self.ctx.settings.max_packet_bytes;
        while let Some((_, frame)) = take(buf, max, &self.ctx.counters)? {
            let p = packet::decode(&frame).map_err(|e| Closed::Violation(e.to_string()))?;
            // boxed: the idle connection's future does not carry the largest packet's state
            if let Flow::Disconnect = Box::pin(self.packet(p)).await? {
                return Ok(true);
            }
        }
        if buf.is_empty() {
            if buf.capacity() > IDLE_BUFFER {
                *buf = BytesMut::with_capacity(IDLE_BUFFER);
            }
        } else if buf.capacity() - buf.len() < 64 {
            // a packet is arriving in pieces: room for more of it at once
            buf.reserve(4096.min(max));
        }
        self.drain()?;
        Ok(false)
    }

    /// Takes what the router has for this session into the write buffer.
    fn drain(&mut self) -> Result<(), Closed> {
        match self
            .ctx
            .router
            .drain(self.sid, self.conn, &mut self.out, WRITE_BUDGET)
        {
            Ok(true) => self.signal.wake.notify_one(),
            Ok(false) => {}
            Err(_) => {
                return Err(Closed::ended(
                    "a new connection with the same client id took the session over",
                ));
            }
        }
        Ok(())
    }

    /// Queues an answer behind those waiting for the store, or writes it now.
    fn answer(&mut self, bytes: Bytes, after_flush: bool) {
        if after_flush {
            let store = self.ctx.store.clone();
            self.wait_for(Box::pin(
                async move { store.flush().await.ok().map(|_| bytes) },
            ));
        } else if self.waiting() == 0 {
            self.out.extend_from_slice(&bytes);
        } else {
            self.wait_for(Box::pin(futures_util::future::ready(Some(bytes))));
        }
    }

    /// Answers waiting for the store.
    fn waiting(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.len())
    }

    /// Queues an answer behind those already waiting.
    fn wait_for(&mut self, answer: BoxFuture<'static, Option<Bytes>>) {
        self.pending
            .get_or_insert_with(|| Box::new(FuturesOrdered::new()))
            .push_back(answer);
    }

    async fn packet(&mut self, p: Packet) -> Result<Flow, Closed> {
        let router = &self.ctx.router;
        match p {
            Packet::Publish(p) => self.publish(p).await?,
            Packet::PubAck(id) => router.acknowledged(self.sid, self.conn, kind::PUBACK, id),
            Packet::PubRec(id) => {
                router.acknowledged(self.sid, self.conn, kind::PUBREC, id);
                packet::put_ack(&mut self.out, kind::PUBREL, id);
            }
            Packet::PubComp(id) => router.acknowledged(self.sid, self.conn, kind::PUBCOMP, id),
            Packet::PubRel(id) => {
                let persisted = router
                    .release(self.sid, self.conn, id)
                    .map_err(|e| Closed::ended(format!("store: {e}")))?;
                self.answer(packet::ack(kind::PUBCOMP, id), persisted);
            }
            Packet::Subscribe(s) => self.subscribe(s)?,
            Packet::Unsubscribe(u) => {
                let persisted = router
                    .unsubscribe(self.sid, self.conn, &u.filters)
                    .map_err(|e| Closed::ended(format!("store: {e}")))?;
                self.answer(packet::unsuback(u.pkid), persisted);
            }
            Packet::PingReq => self.answer(packet::pingresp(), false),
            Packet::Disconnect => return Ok(Flow::Disconnect),
            Packet::Connect(_) => return Err(Closed::Violation("second CONNECT".into())),
        }
        Ok(Flow::Continue)
    }

    fn announce(&mut self, id: &str, protocol: Protocol) {
        if self.announced.is_none() {
            let _ = self.ctx.presence.send(Presence::Connected {
                id: id.to_string(),
                protocol,
                ip: self.peer.ip().to_string(),
                anonymous: self.l.access.known.is_none(),
            });
            self.announced = Some(id.into());
        }
    }

    /// Counts and logs a refused publish or subscription.
    fn denied(&self, what: &str, topic: &str) {
        Counters::inc(&self.ctx.counters.acl_denied);
        if let Some(suppressed) = DENIED_LOG.admit() {
            tracing::warn!(
                topic,
                client = %self.l.client,
                owner = self.l.identity.owner(),
                peer = %self.peer,
                suppressed,
                "MQTT {what} refused: not allowed"
            );
        }
    }

    /// Whether the ACL lets this client publish on `topic` (the last answer is remembered: a
    /// device publishes on the same topic again and again).
    fn may_write(&mut self, topic: &str) -> bool {
        let generation = self.ctx.router.acl_generation();
        if let Some((g, t, ok)) = self.last_write.as_deref()
            && *g == generation
            && &**t == topic
        {
            return *ok;
        }
        let (generation, acl) = self.ctx.router.acl();
        let ok = acl.allows(
            self.l.identity.acl_user(),
            &self.l.client,
            topic,
            Want::Write,
        );
        self.last_write = Some(Box::new((generation, topic.into(), ok)));
        ok
    }

    /// A PUBLISH: a device's OTA report goes to the OTA service; anything else in the OTA
    /// namespace, or refused by the ACL, is dropped and counted (and acknowledged: MQTT 3.1.1
    /// has no refusal); the rest is routed.
    async fn publish(&mut self, p: packet::Publish) -> Result<(), Closed> {
        let ctx = self.ctx.clone();
        Counters::inc(&ctx.counters.messages_in);
        let prefix = &ctx.settings.topic_prefix;
        let ack_kind = match p.qos {
            1 => Some(kind::PUBACK),
            2 => Some(kind::PUBREC),
            _ => None,
        };
        if let Some((device_id, proto, what)) = self.l.access.publish_kind(prefix, &p.topic) {
            return self.report(device_id, proto, what, p).await;
        }
        if protocol::is_ota_topic(prefix, &p.topic) || !self.may_write(&p.topic) {
            self.denied("publish", &p.topic);
            if let Some(k) = ack_kind {
                self.answer(packet::ack(k, p.pkid), false);
            }
            return Ok(());
        }
        let from = (p.qos == 2).then_some((self.sid, p.pkid));
        let routed = ctx
            .router
            .publish(
                from,
                Publishing {
                    topic: &p.topic,
                    // a copy: the message may wait in queues (or be retained) long after
                    // this read, and must not keep the whole read buffer alive meanwhile
                    payload: Bytes::copy_from_slice(&p.payload),
                    qos: p.qos,
                    retain: p.retain,
                    origin: None,
                },
            )
            .map_err(|e| Closed::ended(format!("store: {e}")))?;
        if let Some(k) = ack_kind {
            self.answer(packet::ack(k, p.pkid), routed.persisted);
        }
        Ok(())
    }

    /// A device's OTA report: handed to the OTA service, acknowledged once persisted.
    async fn report(
        &mut self,
        device_id: String,
        protocol: Protocol,
        what: protocol::Inbound,
        p: packet::Publish,
    ) -> Result<(), Closed> {
        self.announce(&device_id, protocol);
        let (done, wait) = if p.qos > 0 {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let msg = InboundMessage {
            device_id,
            protocol,
            kind: what,
            payload: p.payload,
            authenticated: self.l.access.known.is_some(),
            done,
        };
        if self.ctx.messages.send(msg).await.is_err() {
            return Err(Closed::ended("server stopping"));
        }
        if let Some(done) = wait {
            let ack = packet::ack(
                if p.qos == 1 {
                    kind::PUBACK
                } else {
                    kind::PUBREC
                },
                p.pkid,
            );
            self.wait_for(Box::pin(async move { done.await.ok().map(|_| ack) }));
        }
        Ok(())
    }

    /// A SUBSCRIBE, filter by filter: a device's own command topic; a filter in the OTA
    /// namespace otherwise refused; a general filter as the ACL grants it.
    fn subscribe(&mut self, s: packet::Subscribe) -> Result<(), Closed> {
        let ctx = self.ctx.clone();
        let prefix = &ctx.settings.topic_prefix;
        let (_, acl) = ctx.router.acl();
        let mut asked = Vec::with_capacity(s.filters.len());
        let mut ready = None;
        for (filter, qos) in s.filters {
            if let Some((id, proto, first)) = self.l.access.subscribe_allowed(prefix, &filter) {
                self.announce(&id, proto);
                if first {
                    ready = Some((id, proto));
                }
                asked.push(Asked::Command { topic: filter, qos });
                continue;
            }
            if protocol::is_ota_topic(prefix, &filter) {
                self.denied("subscription", &filter);
                asked.push(Asked::Refused);
                continue;
            }
            match acl.grant(self.l.identity.acl_user(), &self.l.client, &filter) {
                Grant::Refused => {
                    self.denied("subscription", &filter);
                    asked.push(Asked::Refused);
                }
                Grant::All => asked.push(Asked::General {
                    filter,
                    qos,
                    check: false,
                }),
                Grant::PerMessage => asked.push(Asked::General {
                    filter,
                    qos,
                    check: true,
                }),
            }
        }
        let (codes, persisted) = ctx
            .router
            .subscribe(self.sid, self.conn, asked)
            .map_err(|e| Closed::ended(format!("store: {e}")))?;
        let suback = packet::suback(s.pkid, &codes);
        match ready {
            // the device is ready for commands once its SUBACK is on its way: a command
            // published after that is queued behind the SUBACK
            Some((id, protocol)) if persisted || self.waiting() > 0 => {
                let store = ctx.store.clone();
                let presence = ctx.presence.clone();
                self.wait_for(Box::pin(async move {
                    if persisted {
                        store.flush().await.ok()?;
                    }
                    let _ = presence.send(Presence::ready(id, protocol));
                    Some(suback)
                }));
            }
            Some((id, protocol)) => {
                self.out.extend_from_slice(&suback);
                let _ = ctx.presence.send(Presence::ready(id, protocol));
            }
            None => self.answer(suback, persisted),
        }
        Ok(())
    }

    /// The will, on an unexpected end: an OTA report goes to the OTA service; a general one is
    /// routed (the ACL allowed it at CONNECT).
    async fn deliver_will(&mut self, will: &packet::Will) {
        let ctx = self.ctx.clone();
        let prefix = &ctx.settings.topic_prefix;
        Counters::inc(&ctx.counters.messages_in);
        if let Some((device_id, protocol, kind)) = self.l.access.publish_kind(prefix, &will.topic) {
            let _ = ctx
                .messages
                .send(InboundMessage {
                    device_id,
                    protocol,
                    kind,
                    payload: will.payload.clone(),
                    authenticated: self.l.access.known.is_some(),
                    done: None,
                })
                .await;
            return;
        }
        let routed = ctx.router.publish(
            None,
            Publishing {
                topic: &will.topic,
                payload: will.payload.clone(),
                qos: will.qos,
                retain: will.retain,
                origin: None,
            },
        );
        match routed {
            Ok(r) if r.persisted => {
                let _ = ctx.store.flush().await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, topic = will.topic, "MQTT will not routed: the store failed")
            }
        }
    }
}
