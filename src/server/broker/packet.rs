//! MQTT 3.1.1 (and 3.1) framing, ours end to end: split a byte stream into whole packets,
//! decode what a client may send into [`Packet`] — refusing everything MQTT 3.1.1 says a server
//! must close the connection for — and encode what the server sends. These are wire types:
//! the router and the store keep their own.

use bytes::{BufMut, Bytes, BytesMut};

/// MQTT control packet types (high nibble of the first byte).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
}

/// Why a stream could not be framed or a frame decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Larger than `max_packet_bytes` (MQTT 3.1.1 can only close the connection).
    #[error("packet of {size} bytes is over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    /// Malformed, or something MQTT 3.1.1 says to close the connection for.
    #[error("{0}")]
    Bad(&'static str),
    /// A CONNECT for a protocol level we do not speak (the CONNACK to answer depends on it).
    #[error("MQTT protocol level {0} is not supported (3.1 and 3.1.1 are)")]
    Version(u8),
}

/// The will of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// A CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// 3 (MQTT 3.1, "MQIsdp") or 4 (MQTT 3.1.1).
    pub level: u8,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    /// Binary in MQTT; a password that is not UTF-8 never matches.
    pub password: Option<Bytes>,
}

/// A PUBLISH, either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    /// 0 for QoS 0.
    pub pkid: u16,
    pub payload: Bytes,
}

/// A SUBSCRIBE: filters with their requested QoS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<(String, u8)>,
}

/// An UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<String>,
}

/// What a client may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect,
}

/// The fixed header at the start of `buf`: (header length, remaining length), or `None` if
/// more bytes are needed.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, len)));
        }
    }
    Err(FrameError::Bad("remaining length longer than 4 bytes"))
}

/// Takes one whole packet off the front of `buf`, if there is one: its type and bytes. A
/// packet over `max_packet` is refused as soon as its header says so, before it is buffered.
pub fn take_frame(
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<(u8, Bytes)>, FrameError> {
    let Some((header, len)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header + len;
    if size > max_packet {
        return Err(FrameError::TooLarge {
            size,
            max: max_packet,
        });
    }
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    let ty = buf[0] >> 4;
    Ok(Some((ty, buf.split_to(size).freeze())))
}

/// Reads a frame's body field by field.
struct Reader {
    b: Bytes,
}

impl Reader {
    fn u8(&mut self) -> Result<u8, FrameError> {
        let v = *self.b.first().ok_or(FrameError::Bad("packet too short"))?;
        self.b = self.b.slice(1..);
        Ok(v)
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        if self.b.len() < 2 {
            return Err(FrameError::Bad("packet too short"));
        }
        let v = u16::from_be_bytes([self.b[0], self.b[1]]);
        self.b = self.b.slice(2..);
        Ok(v)
    }

    fn bytes(&mut self) -> Result<Bytes, FrameError> {
        let n = self.u16()? as usize;
        if self.b.len() < n {
            return Err(FrameError::Bad("field longer than the packet"));
        }
        Ok(self.b.split_to(n))
    }

    /// A UTF-8 string as MQTT 3.1.1 1.5.3 wants it: no U+0000.
    fn string(&mut self) -> Result<String, FrameError> {
        let b = self.bytes()?;
        let s = std::str::from_utf8(&b).map_err(|_| FrameError::Bad("string is not UTF-8"))?;
        if s.contains('\0') {
            return Err(FrameError::Bad("string contains U+0000"));
        }
        Ok(s.to_string())
    }

    fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
}

/// A topic filter is valid: not empty, `#` only as the whole last level, `+` only as a whole
/// level (MQTT 3.1.1 4.7.1, 4.7.3).
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let levels = f.split('/').count();
    f.split('/').enumerate().all(|(i, l)| {
        (!l.contains('#') || (l == "#" && i == levels - 1)) && (!l.contains('+') || l == "+")
    })
}

/// Decodes a whole frame from a client. Refuses what MQTT 3.1.1 says a server must close the
/// connection for: reserved and server-only packet types, fixed-header flags other than the
/// type's (2.2.2), a CONNECT with its reserved flag set (3.1.2-3) or inconsistent login or will
/// flags (3.1.2-11..-22), QoS 3 or a DUP QoS 0 PUBLISH, a packet id 0 where one is required
/// (2.3.1-1), a PUBLISH or will topic that is empty or has wildcards (3.3.2-2, 4.7.3-1), a
/// SUBSCRIBE or UNSUBSCRIBE without filters or with an invalid one, a requested QoS above 2 or
/// with reserved bits (3.8.3-4), strings that are not UTF-8 or hold U+0000 (1.5.3), and
/// packets of fixed length with another length.
pub fn decode(frame: &Bytes) -> Result<Packet, FrameError> {
    let bad = FrameError::Bad;
    let first = *frame.first().ok_or(bad("empty frame"))?;
    let (ty, flags) = (first >> 4, first & 0x0f);
    let (header, _) = fixed_header(frame)?.ok_or(bad("truncated frame"))?;
    let mut r = Reader {
        b: frame.slice(header..),
    };
    let needs_flags = matches!(ty, kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE);
    if needs_flags && flags != 0b0010 {
        return Err(bad(
            "SUBSCRIBE, UNSUBSCRIBE or PUBREL with fixed-header flags other than 0010",
        ));
    }
    if !needs_flags && ty != kind::PUBLISH && flags != 0 {
        return Err(bad("fixed-header flags set on a packet type that has none"));
    }
    let ack = |r: &mut Reader| -> Result<u16, FrameError> {
        let id = r.u16()?;
        if !r.is_empty() {
            return Err(bad("acknowledgement whose length is not 2"));
        }
        Ok(id)
    };
    Ok(match ty {
        kind::CONNECT => Packet::Connect(connect(&mut r)?),
        kind::PUBLISH => Packet::Publish(publish(flags, &mut r)?),
        kind::PUBACK => Packet::PubAck(ack(&mut r)?),
        kind::PUBREC => Packet::PubRec(ack(&mut r)?),
        kind::PUBREL => Packet::PubRel(ack(&mut r)?),
        kind::PUBCOMP => Packet::PubComp(ack(&mut r)?),
        kind::SUBSCRIBE | kind::UNSUBSCRIBE => {
            let pkid = r.u16()?;
            if pkid == 0 {
                return Err(bad("SUBSCRIBE/UNSUBSCRIBE with packet id 0"));
            }
            if r.is_empty() {
                return Err(bad("SUBSCRIBE/UNSUBSCRIBE without a topic filter"));
            }
            let mut filters = Vec::new();
            let mut qos = Vec::new();
            while !r.is_empty() {
                let f = r.string()?;
                if !valid_filter(&f) {
                    return Err(bad("empty or invalid topic filter"));
                }
                filters.push(f);
                if ty == kind::SUBSCRIBE {
                    let q = r.u8()?;
                    if q > 2 {
                        return Err(bad("SUBSCRIBE with a QoS above 2 or reserved bits set"));
                    }
                    qos.push(q);
                }
            }
            if ty == kind::SUBSCRIBE {
                Packet::Subscribe(Subscribe {
                    pkid,
                    filters: filters.into_iter().zip(qos).collect(),
                })
            } else {
                Packet::Unsubscribe(Unsubscribe { pkid, filters })
            }
        }
        kind::PINGREQ | kind::DISCONNECT => {
            if !r.is_empty() {
                return Err(bad("PINGREQ/DISCONNECT with a body"));
            }
            if ty == kind::PINGREQ {
                Packet::PingReq
            } else {
                Packet::Disconnect
            }
        }
        0 | 15 => return Err(bad("reserved packet type")),
        _ => return Err(bad("a packet type only a server sends")),
    })
}

fn connect(r: &mut Reader) -> Result<Connect, FrameError> {
    let bad = FrameError::Bad;
    let name = r.bytes()?;
    let level = r.u8()?;
    match (&name[..], level) {
        (b"MQTT", 4) | (b"MQIsdp", 3) => {}
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(FrameError::Version(l)),
        _ => return Err(bad("CONNECT with an unknown protocol name")),
    }
    let cf = r.u8()?;
    if cf & 0x01 != 0 {
        return Err(bad("CONNECT with the reserved flag set"));
    }
    let (will, will_qos, will_retain) = (cf & 0x04 != 0, (cf >> 3) & 0b11, cf & 0x20 != 0);
    if will_qos == 3 || (!will && (will_qos != 0 || will_retain)) {
        return Err(bad("CONNECT with inconsistent will flags"));
    }
    let (has_user, has_password) = (cf & 0x80 != 0, cf & 0x40 != 0);
    if has_password && !has_user && level == 4 {
        return Err(bad("CONNECT with a password but no user name"));
    }
    let keep_alive = r.u16()?;
    let client_id = r.string()?;
    let will = if will {
        let topic = r.string()?;
        if !super::topics::valid_topic(&topic) {
            return Err(bad("will topic empty or with a wildcard"));
        }
        Some(Will {
            topic,
            payload: r.bytes()?,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = has_user.then(|| r.string()).transpose()?;
    let password = has_password.then(|| r.bytes()).transpose()?;
    if !r.is_empty() {
        return Err(bad("CONNECT longer than its fields"));
    }
    Ok(Connect {
        level,
        clean_session: cf & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn publish(flags: u8, r: &mut Reader) -> Result<Publish, FrameError> {
    let bad = FrameError::Bad;
    let qos = (flags >> 1) & 0b11;
    if qos == 3 {
        return Err(bad("PUBLISH with QoS 3"));
    }
    let dup = flags & 0b1000 != 0;
    if qos == 0 && dup {
        return Err(bad("PUBLISH with QoS 0 and DUP set"));
    }
    let topic = r.string()?;
    if !super::topics::valid_topic(&topic) {
        return Err(bad("PUBLISH topic empty or with a wildcard"));
    }
    let pkid = if qos > 0 { r.u16()? } else { 0 };
    if qos > 0 && pkid == 0 {
        return Err(bad("QoS 1/2 PUBLISH with packet id 0"));
    }
    Ok(Publish {
        dup,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        pkid,
        payload: std::mem::take(&mut r.b),
    })
}

fn put_remaining_length(b: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        b.put_u8(byte);
        if n == 0 {
            return;
        }
    }
}

/// Appends a PUBLISH to `out`.
pub fn put_publish(
    out: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
) {
    let body = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    out.reserve(5 + body);
    out.put_u8((kind::PUBLISH << 4) | ((dup as u8) << 3) | (qos << 1) | retain as u8);
    put_remaining_length(out, body);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    if qos > 0 {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

/// A whole encoded PUBLISH.
pub fn publish_frame(p: &Publish) -> Bytes {
    let mut b = BytesMut::new();
    put_publish(&mut b, &p.topic, &p.payload, p.qos, p.pkid, p.retain, p.dup);
    b.freeze()
}

/// Appends a two-byte-body acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK).
pub fn put_ack(out: &mut BytesMut, kind: u8, pkid: u16) {
    let flags = if kind == self::kind::PUBREL {
        0b0010
    } else {
        0
    };
    out.put_u8((kind << 4) | flags);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// A two-byte-body acknowledgement.
pub fn ack(kind: u8, pkid: u16) -> Bytes {
    let mut b = BytesMut::with_capacity(4);
    put_ack(&mut b, kind, pkid);
    b.freeze()
}

/// CONNACK with a 3.1.1 return code (0 accepted, 1 unacceptable protocol version, 2 identifier
/// rejected, 3 server unavailable, 4 bad user name or password, 5 not authorized).
pub fn connack(code: u8) -> Bytes {
    Bytes::from(vec![kind::CONNACK << 4, 2, 0, code])
}

/// The CONNACK an MQTT 5 client understands for "unsupported protocol version" (reason 0x84,
/// no properties).
pub fn connack_v5_unsupported() -> Bytes {
    Bytes::from_static(&[kind::CONNACK << 4, 3, 0, 0x84, 0])
}

/// CONNACK accepting the connection, with the session-present flag.
pub fn connack_accepted(session_present: bool) -> Bytes {
    Bytes::from(vec![kind::CONNACK << 4, 2, session_present as u8, 0])
}

/// PINGRESP.
pub fn pingresp() -> Bytes {
    Bytes::from_static(&[kind::PINGRESP << 4, 0])
}

/// SUBACK with one return code per filter (0..2 granted QoS, 0x80 failure).
pub fn suback(pkid: u16, codes: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + codes.len());
    b.put_u8(kind::SUBACK << 4);
    put_remaining_length(&mut b, 2 + codes.len());
    b.put_u16(pkid);
    b.put_slice(codes);
    b.freeze()
}

/// UNSUBACK.
pub fn unsuback(pkid: u16) -> Bytes {
    ack(kind::UNSUBACK, pkid)
}

/// Encodes a client's packet (for tests and the fuzz targets' seeds).
pub fn encode_client(p: &Packet) -> Bytes {
    let mut b = BytesMut::new();
    let frame = |b: &mut BytesMut, first: u8, body: &[u8]| {
        b.put_u8(first);
        put_remaining_length(b, body.len());
        b.put_slice(body);
    };
    let put_str = |v: &mut Vec<u8>, s: &[u8]| {
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s);
    };
    match p {
        Packet::Connect(c) => {
            let mut v = Vec::new();
            put_str(&mut v, if c.level == 3 { b"MQIsdp" } else { b"MQTT" });
            v.push(c.level);
            let mut cf = (c.clean_session as u8) << 1;
            if let Some(w) = &c.will {
                cf |= 0x04 | (w.qos << 3) | ((w.retain as u8) << 5);
            }
            cf |= (c.username.is_some() as u8) << 7 | (c.password.is_some() as u8) << 6;
            v.push(cf);
            v.extend_from_slice(&c.keep_alive.to_be_bytes());
            put_str(&mut v, c.client_id.as_bytes());
            if let Some(w) = &c.will {
                put_str(&mut v, w.topic.as_bytes());
                put_str(&mut v, &w.payload);
            }
            if let Some(u) = &c.username {
                put_str(&mut v, u.as_bytes());
            }
            if let Some(p) = &c.password {
                put_str(&mut v, p);
            }
            frame(&mut b, kind::CONNECT << 4, &v);
        }
        Packet::Publish(p) => return publish_frame(p),
        Packet::PubAck(id) => put_ack(&mut b, kind::PUBACK, *id),
        Packet::PubRec(id) => put_ack(&mut b, kind::PUBREC, *id),
        Packet::PubRel(id) => put_ack(&mut b, kind::PUBREL, *id),
        Packet::PubComp(id) => put_ack(&mut b, kind::PUBCOMP, *id),
        Packet::Subscribe(s) => {
            let mut v = s.pkid.to_be_bytes().to_vec();
            for (f, q) in &s.filters {
                put_str(&mut v, f.as_bytes());
                v.push(*q);
            }
            frame(&mut b, (kind::SUBSCRIBE << 4) | 2, &v);
        }
        Packet::Unsubscribe(u) => {
            let mut v = u.pkid.to_be_bytes().to_vec();
            for f in &u.filters {
                put_str(&mut v, f.as_bytes());
            }
            frame(&mut b, (kind::UNSUBSCRIBE << 4) | 2, &v);
        }
        Packet::PingReq => frame(&mut b, kind::PINGREQ << 4, &[]),
        Packet::Disconnect => frame(&mut b, kind::DISCONNECT << 4, &[]),
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Result<Packet, FrameError> {
        let mut buf = BytesMut::from(bytes);
        let (_, frame) = take_frame(&mut buf, 1 << 20)?.expect("whole");
        assert!(buf.is_empty());
        decode(&frame)
    }

    #[test]
    fn what_we_encode_decodes_to_itself() {
        let packets = vec![
            Packet::Connect(Connect {
                level: 4,
                clean_session: false,
                keep_alive: 60,
                client_id: "c1".into(),
                will: Some(Will {
                    topic: "a/will".into(),
                    payload: Bytes::from_static(b"gone"),
                    qos: 1,
                    retain: true,
                }),
                username: Some("u".into()),
                password: Some(Bytes::from_static(b"p")),
            }),
            Packet::Connect(Connect {
                level: 3,
                clean_session: true,
                keep_alive: 0,
                client_id: "".into(),
                will: None,
                username: None,
                password: None,
            }),
            Packet::Publish(Publish {
                dup: true,
                qos: 2,
                retain: true,
                topic: "a/b".into(),
                pkid: 7,
                payload: Bytes::from(vec![9u8; 300]),
            }),
            Packet::Publish(Publish {
                dup: false,
                qos: 0,
                retain: false,
                topic: "$SYS/x".into(),
                pkid: 0,
                payload: Bytes::new(),
            }),
            Packet::PubAck(1),
            Packet::PubRec(2),
            Packet::PubRel(3),
            Packet::PubComp(4),
            Packet::Subscribe(Subscribe {
                pkid: 5,
                filters: vec![("a/+/b/#".into(), 1), ("#".into(), 2)],
            }),
            Packet::Unsubscribe(Unsubscribe {
                pkid: 6,
                filters: vec!["a/b".into()],
            }),
            Packet::PingReq,
            Packet::Disconnect,
        ];
        for p in packets {
            assert_eq!(one(&encode_client(&p)), Ok(p.clone()), "{p:?}");
        }
    }

    #[test]
    fn frames_arrive_in_pieces() {
        let a = encode_client(&Packet::PingReq);
        let b = publish_frame(&Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: "t".into(),
            pkid: 1,
            payload: Bytes::from(vec![1u8; 200]),
        });
        let all: Vec<u8> = [&a[..], &b[..]].concat();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in all {
            buf.put_u8(byte);
            while let Some((ty, _)) = take_frame(&mut buf, 1024).unwrap() {
                got.push(ty);
            }
        }
        assert_eq!(got, vec![kind::PINGREQ, kind::PUBLISH]);
    }

    /// A frame of type/flags with this body.
    fn raw(first: u8, body: &[u8]) -> Vec<u8> {
        let mut f = BytesMut::new();
        f.put_u8(first);
        put_remaining_length(&mut f, body.len());
        f.put_slice(body);
        f.to_vec()
    }

    fn strs(v: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        for s in v {
            b.extend_from_slice(&(s.len() as u16).to_be_bytes());
            b.extend_from_slice(s);
        }
        b
    }

    #[test]
    fn what_mqtt_3_1_1_says_to_close_for_is_refused() {
        let connect = |name: &[u8], level: u8, flags: u8| {
            let mut b = strs(&[name]);
            b.extend_from_slice(&[level, flags, 0, 60]);
            b.extend(strs(&[b"c1"]));
            b
        };
        let sub = |pkid: u16, filter: &[u8], qos: u8| {
            let mut b = pkid.to_be_bytes().to_vec();
            b.extend(strs(&[filter]));
            b.push(qos);
            b
        };
        let unsub = |pkid: u16, filter: &[u8]| {
            let mut b = pkid.to_be_bytes().to_vec();
            b.extend(strs(&[filter]));
            b
        };
        let publish = |topic: &[u8], pkid: Option<u16>| {
            let mut b = strs(&[topic]);
            if let Some(p) = pkid {
                b.extend_from_slice(&p.to_be_bytes());
            }
            b.extend_from_slice(b"{}");
            b
        };
        for (what, f) in [
            ("CONNECT", raw(0x10, &connect(b"MQTT", 4, 0x02))),
            ("CONNECT 3.1", raw(0x10, &connect(b"MQIsdp", 3, 0x02))),
            ("SUBSCRIBE", raw(0x82, &sub(1, b"a/+/b/#", 1))),
            ("UNSUBSCRIBE", raw(0xA2, &unsub(1, b"a/b"))),
            ("QoS 1 PUBLISH", raw(0x32, &publish(b"a/b", Some(9)))),
            ("QoS 0 PUBLISH", raw(0x30, &publish(b"a/b", None))),
            ("retained PUBLISH", raw(0x31, &publish(b"a/b", None))),
            ("PINGREQ", raw(0xC0, &[])),
            ("PUBREL", raw(0x62, &[0, 1])),
            ("DISCONNECT", raw(0xE0, &[])),
        ] {
            assert!(one(&f).is_ok(), "{what} refused: {:?}", one(&f));
        }
        for (what, f) in [
            (
                "CONNECT reserved flag",
                raw(0x10, &connect(b"MQTT", 4, 0x03)),
            ),
            (
                "CONNECT password without user",
                raw(0x10, &connect(b"MQTT", 4, 0x42)),
            ),
            (
                "CONNECT will QoS without will",
                raw(0x10, &connect(b"MQTT", 4, 0x0A)),
            ),
            ("CONNECT with flags", raw(0x11, &connect(b"MQTT", 4, 0x02))),
            ("CONNECT wrong name", raw(0x10, &connect(b"hj", 4, 0x02))),
            ("QoS 1 PUBLISH pkid 0", raw(0x32, &publish(b"a/b", Some(0)))),
            ("QoS 2 PUBLISH pkid 0", raw(0x34, &publish(b"a/b", Some(0)))),
            ("QoS 3 PUBLISH", raw(0x36, &publish(b"a/b", Some(1)))),
            ("QoS 0 PUBLISH with DUP", raw(0x38, &publish(b"a/b", None))),
            ("PUBLISH with a wildcard", raw(0x30, &publish(b"a/+", None))),
            ("PUBLISH with #", raw(0x30, &publish(b"a/#", None))),
            (
                "PUBLISH with an empty topic",
                raw(0x30, &publish(b"", None)),
            ),
            (
                "PUBLISH topic not UTF-8",
                raw(0x30, &publish(b"a/\xff", None)),
            ),
            (
                "PUBLISH topic with U+0000",
                raw(0x30, &publish(b"a\0b", None)),
            ),
            ("SUBSCRIBE pkid 0", raw(0x82, &sub(0, b"a", 0))),
            ("UNSUBSCRIBE pkid 0", raw(0xA2, &unsub(0, b"a"))),
            ("SUBSCRIBE flags 0", raw(0x80, &sub(1, b"a", 0))),
            ("UNSUBSCRIBE flags 0", raw(0xA0, &unsub(1, b"a"))),
            ("SUBSCRIBE QoS 3", raw(0x82, &sub(1, b"a", 3))),
            ("SUBSCRIBE empty filter", raw(0x82, &sub(1, b"", 0))),
            ("UNSUBSCRIBE empty filter", raw(0xA2, &unsub(1, b""))),
            ("SUBSCRIBE no filter", raw(0x82, &[0, 1])),
            ("SUBSCRIBE bad #", raw(0x82, &sub(1, b"a/#/b", 0))),
            ("SUBSCRIBE bad +", raw(0x82, &sub(1, b"a+/b", 0))),
            ("SUBSCRIBE filter not UTF-8", raw(0x82, &sub(1, b"\xc3", 0))),
            ("PINGREQ with a body", raw(0xC0, &[0])),
            ("PINGREQ with flags", raw(0xC1, &[])),
            ("DISCONNECT with a body", raw(0xE0, &[1, 2])),
            ("PUBACK of length 3", raw(0x40, &[0, 1, 2])),
            ("PUBREL flags 0", raw(0x60, &[0, 1])),
            ("CONNACK from a client", raw(0x20, &[0, 0])),
            ("SUBACK from a client", raw(0x90, &[0, 1, 0])),
            ("reserved type 0", raw(0x00, &[])),
            ("reserved type 15", raw(0xF0, &[])),
        ] {
            assert!(one(&f).is_err(), "{what} accepted");
        }
        assert_eq!(
            one(&raw(0x10, &connect(b"MQTT", 5, 0x02))),
            Err(FrameError::Version(5))
        );
    }

    #[test]
    fn oversized_is_refused_from_its_header_and_garbage_is_an_error() {
        // the header says 100 bytes; the limit is 50: refused before the body arrives
        let mut buf = BytesMut::from(&[0x30u8, 100][..]);
        assert!(matches!(
            take_frame(&mut buf, 50),
            Err(FrameError::TooLarge { size: 102, max: 50 })
        ));
        let mut junk = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(take_frame(&mut junk, 1 << 20).is_err());
    }
}
