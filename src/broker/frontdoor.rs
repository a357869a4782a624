//! The front door: one task pair per device connection between the device and rumqttd.
//! Upstream (device -> broker) is parsed packet by packet: CONNECT is authenticated and
//! rewritten (keep-alive handled here, client id scoped to the device), SUBSCRIBE and the will
//! are checked against the device's topics, report PUBLISHes go to the OTA service instead of
//! the broker, everything else is forwarded as is. Downstream (broker -> device) is framed only
//! to interleave our own acknowledgements and to spot the SUBACK of the command topic.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rumqttd::protocol::Packet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::packet::{self, kind};
use super::{BrokerError, Counters, DoorContext, InboundMessage, Presence};
use crate::protocol::{self, Inbound, Protocol};
use crate::ratelog::RateLog;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

static DENIED_LOG: RateLog = RateLog::new();
static ERROR_LOG: RateLog = RateLog::new();

pub(super) fn bind(addr: &str, key: &str) -> Result<TcpListener, BrokerError> {
    crate::net::bind_listener(addr)
        .map_err(|e| BrokerError::Start(format!("cannot listen on {key} = {addr}: {e}")))
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
            let Ok(_permit) = ctx.connections.try_acquire() else {
                ERROR_LOG.warn("mqtt.max_connections reached: connection refused");
                return;
            };
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => serve(s, peer, &ctx, shutdown).await,
                        Ok(Err(e)) => {
                            Counters::inc(&ctx.counters.tls_handshake_failures);
                            Err(format!("TLS handshake: {e}"))
                        }
                        Err(_) => {
                            Counters::inc(&ctx.counters.tls_handshake_failures);
                            Err("TLS handshake timed out".into())
                        }
                    }
                }
                None => serve(stream, peer, &ctx, shutdown).await,
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "MQTT connection closed");
            }
        });
    }
}

/// Reads until one whole packet is buffered; `None` at end of stream.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(u8, Bytes)>, String> {
    loop {
        if let Some(f) = packet::take_frame(buf, max).map_err(|e| e.to_string())? {
            return Ok(Some(f));
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(2048);
        }
        let n = rd.read_buf(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
    }
}

/// Connects to rumqttd, waiting up to 5 s for it to listen (right after start-up).
async fn connect_backend(addr: SocketAddr) -> Result<TcpStream, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("embedded broker: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// How often the front door pings rumqttd on a device's behalf (its keep-alive is 65535 s).
const BACKEND_PING: Duration = Duration::from_secs(6 * 3600);
const PINGREQ: [u8; 2] = [0xC0, 0x00];
const PINGRESP_TYPE: u8 = 13;

/// Who is on the other end, and what they may touch.
struct Identity {
    /// Logged in (None: anonymous lab device, learnt from its topics).
    known: Option<(String, Protocol)>,
    topics: Option<protocol::DeviceTopics>,
}

impl Identity {
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

async fn serve<S>(
    io: S,
    peer: SocketAddr,
    ctx: &Arc<DoorContext>,
    shutdown: CancellationToken,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let max = ctx.settings.max_packet_bytes;
    let prefix = ctx.settings.topic_prefix.clone();
    let mut buf = BytesMut::with_capacity(512);

    let first = tokio::time::timeout(CONNECT_TIMEOUT, read_frame(&mut rd, &mut buf, max))
        .await
        .map_err(|_| "no CONNECT within 10 s".to_string())??;
    let Some((kind::CONNECT, frame)) = first else {
        Counters::inc(&ctx.counters.protocol_errors);
        return Err("first packet is not CONNECT".into());
    };
    let Packet::Connect(mut connect, props, will, will_props, login) = packet::decode(&frame, max)
        .map_err(|e| {
            Counters::inc(&ctx.counters.protocol_errors);
            format!("bad CONNECT: {e}")
        })?
    else {
        return Err("bad CONNECT".into());
    };

    let known = login
        .as_ref()
        .and_then(|l| ctx.auth.authenticate(&l.username, &l.password));
    if known.is_none() && !ctx.settings.allow_anonymous {
        Counters::inc(&ctx.counters.auth_failures);
        let user = login.as_ref().map(|l| l.username.as_str()).unwrap_or("");
        DENIED_LOG.warn(&format!("MQTT login refused for user {user:?} from {peer}"));
        let code = if login.is_some() { 4 } else { 5 };
        let _ = wr.write_all(&packet::connack(code)).await;
        return Err("login refused".into());
    }
    let identity = Identity {
        topics: known
            .as_ref()
            .map(|(id, p)| protocol::device_topics(*p, &prefix, id)),
        known,
    };
    if let Some(w) = &will {
        let topic = String::from_utf8_lossy(&w.topic).into_owned();
        if identity.publish_kind(&prefix, &topic).is_none() {
            Counters::inc(&ctx.counters.acl_denied);
            DENIED_LOG.warn(&format!("MQTT will on {topic:?} refused from {peer}"));
            let _ = wr.write_all(&packet::connack(5)).await;
            return Err("will topic not allowed".into());
        }
    }
    Counters::inc(&ctx.counters.connections_accepted);

    // The front door enforces the device's keep-alive. Reports never reach rumqttd, so it gets
    // the longest keep-alive MQTT allows (rumqttd refuses 0) and a PINGREQ of ours every few
    // hours; the matching PINGRESPs are swallowed.
    let keep_alive = connect.keep_alive;
    connect.keep_alive = u16::MAX;
    let scope = identity
        .known
        .as_ref()
        .map(|(id, _)| id.as_str())
        .unwrap_or("anonymous");
    let client = if connect.client_id.is_empty() {
        let mut r = [0u8; 8];
        rand::fill(&mut r);
        hex::encode(r)
    } else {
        connect.client_id.clone()
    };
    // Scoped per device (one device cannot take over another's session by reusing its client
    // id) and hashed: rumqttd refuses client ids containing + $ # or /, which ids may hold.
    connect.client_id = {
        use sha2::Digest;
        let h = sha2::Sha256::new()
            .chain_update(scope.as_bytes())
            .chain_update([0u8])
            .chain_update(client.as_bytes())
            .finalize();
        format!("d{}", &hex::encode(h)[..40])
    };
    let rewritten = packet::encode(Packet::Connect(connect, props, will, will_props, login))
        .map_err(|e| e.to_string())?;
    let handshake = ctx
        .backend_handshakes
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| "server stopping".to_string())?;
    let backend = connect_backend(ctx.backend).await?;
    let _ = backend.set_nodelay(true);
    let (mut brd, mut bwr) = backend.into_split();
    bwr.write_all(&rewritten).await.map_err(|e| e.to_string())?;

    let mut announced: Option<String> = None;
    if let Some((id, p)) = &identity.known {
        let _ = ctx.presence.send(Presence::Connected {
            id: id.clone(),
            protocol: *p,
            ip: peer.ip().to_string(),
        });
        announced = Some(id.clone());
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
                        if ty == PINGRESP_TYPE
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
                            let _ = presence.send(Presence::Ready { id, protocol });
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
    let result: Result<(), String> = loop {
        let next = async {
            match idle {
                Some(d) => tokio::time::timeout(d, read_frame(&mut rd, &mut buf, max))
                    .await
                    .map_err(|_| "keep-alive expired".to_string())?,
                None => read_frame(&mut rd, &mut buf, max).await,
            }
        };
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = backend_ping.tick() => {
                swallow.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if bwr.write_all(&PINGREQ).await.is_err() {
                    break Err("embedded broker closed".into());
                }
                continue;
            }
            f = next => f,
        };
        let (ty, frame) = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => {
                Counters::inc(&ctx.counters.protocol_errors);
                break Err(e);
            }
        };
        match ty {
            kind::PUBLISH => {
                let p = match packet::parse_publish(&frame) {
                    Ok(p) => p,
                    Err(e) => {
                        Counters::inc(&ctx.counters.protocol_errors);
                        break Err(e.to_string());
                    }
                };
                let Some((device_id, proto, kind)) = identity.publish_kind(&prefix, &p.topic)
                else {
                    Counters::inc(&ctx.counters.acl_denied);
                    DENIED_LOG.warn(&format!(
                        "MQTT publish on {:?} refused for {} from {peer}: not one of its report topics",
                        p.topic, scope
                    ));
                    break Err("publish not allowed".into());
                };
                if announced.is_none() {
                    let _ = ctx.presence.send(Presence::Connected {
                        id: device_id.clone(),
                        protocol: proto,
                        ip: peer.ip().to_string(),
                    });
                    announced = Some(device_id.clone());
                }
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
                    authenticated: identity.known.is_some(),
                    done,
                };
                if ctx.messages.send(msg).await.is_err() {
                    break Err("server stopping".into());
                }
                if let Some(rx) = wait {
                    if p.qos == 2 {
                        qos2.insert(p.pkid);
                    }
                    let k = if p.qos == 1 {
                        kind::PUBACK
                    } else {
                        kind::PUBREC
                    };
                    if local_tx
                        .send(Local::Ack {
                            kind: k,
                            pkid: p.pkid,
                            done: rx,
                        })
                        .await
                        .is_err()
                    {
                        break Ok(());
                    }
                }
            }
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
                let Ok(Packet::Subscribe(sub, _)) = packet::decode(&frame, max) else {
                    Counters::inc(&ctx.counters.protocol_errors);
                    break Err("bad SUBSCRIBE".into());
                };
                let mut watch = None;
                let mut denied = None;
                for f in &sub.filters {
                    match identity.subscribe_allowed(&prefix, &f.path) {
                        Some((id, proto, true)) => watch = Some((id, proto)),
                        Some(_) => {}
                        None => denied = Some(f.path.clone()),
                    }
                }
                if let Some(f) = denied {
                    Counters::inc(&ctx.counters.acl_denied);
                    DENIED_LOG.warn(&format!(
                        "MQTT subscribe to {f:?} refused for {scope} from {peer}: not one of its command topics"
                    ));
                    break Err("subscribe not allowed".into());
                }
                if let Some((id, protocol)) = watch {
                    if announced.is_none() {
                        let _ = ctx.presence.send(Presence::Connected {
                            id: id.clone(),
                            protocol,
                            ip: peer.ip().to_string(),
                        });
                        announced = Some(id.clone());
                    }
                    let _ = local_tx
                        .send(Local::WatchSuback {
                            pkid: sub.pkid,
                            id,
                            protocol,
                        })
                        .await;
                }
                if bwr.write_all(&frame).await.is_err() {
                    break Err("embedded broker closed".into());
                }
            }
            kind::CONNECT => {
                Counters::inc(&ctx.counters.protocol_errors);
                break Err("second CONNECT".into());
            }
            kind::DISCONNECT => {
                let _ = bwr.write_all(&frame).await;
                break Ok(());
            }
            _ => {
                if bwr.write_all(&frame).await.is_err() {
                    break Err("embedded broker closed".into());
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
    if let Some(id) = announced {
        let _ = ctx.presence.send(Presence::Disconnected { id });
    }
    result
}
