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
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::acl::{Grant, Want};
use super::frontdoor::{Closed, DENIED_LOG, Login, send, take};
use super::packet::{self, Packet, kind};
use super::router::{Asked, Link, Publishing};
use super::{Counters, DoorContext, InboundMessage, Presence};
use crate::protocol::{self, Protocol};

/// Acknowledgements waiting for the store at once; beyond it the connection stops reading.
const MAX_PENDING: usize = 256;
/// Bytes taken from the router per write.
const WRITE_BUDGET: usize = 64 * 1024;
/// A read buffer larger than this is given back once empty.
const KEEP_BUFFER: usize = 64 * 1024;

/// Where a packet leaves the loop.
enum Flow {
    Continue,
    Disconnect,
}

struct Conn<'a, W> {
    ctx: &'a DoorContext,
    l: &'a Login,
    wr: W,
    out: BytesMut,
    peer: SocketAddr,
    sid: u64,
    conn: u64,
    wake: Arc<Notify>,
    pending: FuturesOrdered<BoxFuture<'static, Option<Bytes>>>,
    /// The device id announced to presence (None until known).
    announced: Option<String>,
    /// The last ACL decision on a publish: (ACL generation, topic, allowed).
    last_write: Option<(u64, String, bool)>,
}

/// Serves a logged-in connection until it ends.
pub(super) async fn run<S>(
    mut rd: tokio::io::ReadHalf<S>,
    wr: tokio::io::WriteHalf<S>,
    mut buf: BytesMut,
    l: Login,
    peer: SocketAddr,
    ctx: &DoorContext,
    shutdown: CancellationToken,
) -> Result<(), Closed>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let conn = ctx.next_conn();
    let wake = Arc::new(Notify::new());
    let end = CancellationToken::new();
    let key = l.identity.session_key(&l.client);
    let link = Link {
        conn,
        wake: wake.clone(),
        end: end.clone(),
        peer,
        since_ms: crate::time::now_ms(),
        level: l.level,
    };
    let mut c = Conn {
        ctx,
        l: &l,
        wr,
        out: BytesMut::new(),
        peer,
        sid: 0,
        conn,
        wake,
        pending: FuturesOrdered::new(),
        announced: None,
        last_write: None,
    };
    let attached = match ctx
        .router
        .attach(&key, &l.client, l.identity.clone(), l.clean, link)
    {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "MQTT session could not be opened: the store failed");
            let _ = Box::pin(c.wr.write_all(&packet::connack(3))).await;
            return Err(Closed::Refused("the store failed"));
        }
    };
    c.sid = attached.sid;
    c.out
        .extend_from_slice(&packet::connack_accepted(attached.present));
    if let Some((id, p)) = l.access.speaks_for(l.username.as_deref()) {
        c.announce(&id, p);
    }
    // A resumed session listens again on the command topics it subscribed to before.
    for topic in &attached.commands {
        if let Some((id, protocol, true)) = l
            .access
            .subscribe_allowed(&ctx.settings.topic_prefix, topic)
        {
            c.announce(&id, protocol);
            let _ = ctx.presence.send(Presence::ready(id, protocol));
        }
    }
    let result = c.serve(&mut rd, &mut buf, &end, &shutdown).await;
    let graceful = matches!(result, Ok(true));
    ctx.router.detach(c.sid, conn);
    // (the ending is boxed: a connection's future does not carry its state while it lives)
    Box::pin(async {
        if !graceful
            && !shutdown.is_cancelled()
            && let Some(w) = &l.will
        {
            c.deliver_will(w).await;
        }
        // Acknowledge what is being persisted, but never wait on a dead client for long.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Some(b)) = c.pending.next().await {
                c.out.extend_from_slice(&b);
            }
            if !c.out.is_empty() {
                let _ = c.wr.write_all(&c.out).await;
            }
        })
        .await;
        let _ = c.wr.shutdown().await;
    })
    .await;
    if let Some(id) = c.announced.take() {
        let _ = ctx.presence.send(Presence::Disconnected { id });
    }
    result.map(|_| ())
}

impl<W: AsyncWrite + Unpin> Conn<'_, W> {
    /// The loop; `Ok(true)` after a DISCONNECT.
    async fn serve<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        buf: &mut BytesMut,
        end: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<bool, Closed> {
        // MQTT 3.1.1 3.1.2.10: no packet for 1.5 x keep-alive closes the connection.
        let idle =
            (self.l.keep_alive > 0).then(|| Duration::from_millis(self.l.keep_alive as u64 * 1500));
        let far = Duration::from_secs(365 * 24 * 3600);
        let expiry = tokio::time::sleep(idle.unwrap_or(far));
        tokio::pin!(expiry);
        // packets that came with the CONNECT
        if self.frames(buf).await? {
            return Ok(true);
        }
        loop {
            if !self.out.is_empty() {
                send(&mut self.wr, &self.out).await?;
                self.out.clear();
                if self.out.capacity() > KEEP_BUFFER {
                    self.out = BytesMut::new();
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(false),
                _ = end.cancelled() => {
                    return Err(Closed::ended("a new connection with the same client id took the session over"));
                }
                ack = self.pending.next(), if !self.pending.is_empty() => match ack {
                    Some(Some(b)) => self.out.extend_from_slice(&b),
                    // not persisted: let the client send it again
                    _ => return Err(Closed::ended("a message could not be persisted")),
                },
                _ = self.wake.notified() => self.drain()?,
                _ = &mut expiry => return Err(Closed::ended("keep-alive expired")),
                r = rd.read_buf(buf), if self.pending.len() < MAX_PENDING => {
                    if r? == 0 {
                        return Err(Closed::ended("connection closed without DISCONNECT"));
                    }
                    if let Some(d) = idle {
                        expiry.as_mut().reset(tokio::time::Instant::now() + d);
                    }
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
        if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
            *buf = BytesMut::with_capacity(512);
        } else if buf.capacity() - buf.len() < 256 {
            buf.reserve(2048);
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
            Ok(true) => self.wake.notify_one(),
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
            self.pending.push_back(Box::pin(
                async move { store.flush().await.ok().map(|_| bytes) },
            ));
        } else if self.pending.is_empty() {
            self.out.extend_from_slice(&bytes);
        } else {
            self.pending
                .push_back(Box::pin(futures_util::future::ready(Some(bytes))));
        }
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
            self.announced = Some(id.to_string());
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
        if let Some((g, t, ok)) = &self.last_write
            && *g == generation
            && t == topic
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
        self.last_write = Some((generation, topic.to_string(), ok));
        ok
    }

    /// A PUBLISH: a device's OTA report goes to the OTA service; anything else in the OTA
    /// namespace, or refused by the ACL, is dropped and counted (and acknowledged: MQTT 3.1.1
    /// has no refusal); the rest is routed.
    async fn publish(&mut self, p: packet::Publish) -> Result<(), Closed> {
        let ctx = self.ctx;
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
                    payload: p.payload,
                    qos: p.qos,
                    retain: p.retain,
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
            self.pending
                .push_back(Box::pin(async move { done.await.ok().map(|_| ack) }));
        }
        Ok(())
    }

    /// A SUBSCRIBE, filter by filter: a device's own command topic; a filter in the OTA
    /// namespace otherwise refused; a general filter as the ACL grants it.
    fn subscribe(&mut self, s: packet::Subscribe) -> Result<(), Closed> {
        let ctx = self.ctx;
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
            Some((id, protocol)) if persisted || !self.pending.is_empty() => {
                let store = ctx.store.clone();
                let presence = ctx.presence.clone();
                self.pending.push_back(Box::pin(async move {
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
        let ctx = self.ctx;
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
