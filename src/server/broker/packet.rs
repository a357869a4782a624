//! MQTT 3.1.1 framing for the front door: split a byte stream into whole packets (rumqttd's v4
//! codec frames and decodes CONNECT/SUBSCRIBE), read the PUBLISH header ourselves (rumqttd keeps
//! QoS and packet id private), and encode the few packets the front door answers itself.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttd::protocol::v4;
use rumqttd::protocol::{Packet, Protocol};

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

/// Why a stream could not be framed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Malformed or oversized.
    #[error("{0}")]
    Bad(String),
}

/// Takes one whole packet off the front of `buf`, if there is one. Returns its type and bytes.
pub fn take_frame(
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<(u8, Bytes)>, FrameError> {
    match v4::check(buf.iter(), max_packet) {
        Ok(h) => {
            let len = h.frame_length();
            let ty = buf[0] >> 4;
            let frame = buf.split_to(len).freeze();
            check_strict(ty, &frame).map_err(|m| FrameError::Bad(m.into()))?;
            Ok(Some((ty, frame)))
        }
        Err(rumqttd::protocol::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(FrameError::Bad(e.to_string())),
    }
}

/// The body of a frame (after the fixed header).
fn body(frame: &[u8]) -> &[u8] {
    let mut i = 1;
    while i < frame.len() && frame[i] & 0x80 != 0 {
        i += 1;
    }
    frame.get(i + 1..).unwrap_or(&[])
}

/// A length-prefixed UTF-8 string at the start of `b`, and the rest.
fn mqtt_str(b: &[u8]) -> Result<(&str, &[u8]), &'static str> {
    if b.len() < 2 {
        return Err("string length missing");
    }
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    let s = b.get(2..2 + n).ok_or("string longer than the packet")?;
    let s = std::str::from_utf8(s).map_err(|_| "string is not UTF-8")?;
    if s.contains('\0') {
        // MQTT-1.5.3-2
        return Err("string contains U+0000");
    }
    Ok((s, &b[2 + n..]))
}

/// A topic filter is valid: not empty, `#` only as the whole last level, `+` only as a whole
/// level (MQTT 3.1.1 4.7.1, 4.7.3).
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| {
        (!l.contains('#') || (*l == "#" && i == levels.len() - 1))
            && (!l.contains('+') || *l == "+")
    })
}

/// What MQTT 3.1.1 says a server must close the connection for, checked on every whole frame
/// from a client before anything acts on it: reserved packet types, fixed-header flags that
/// are not the ones the type requires (2.2.2), a CONNECT with its reserved flag set (3.1.2-3),
/// inconsistent login or will flags (3.1.2-11..-22), a QoS 3 or a DUP QoS 0 PUBLISH, a packet
/// id 0 where one is required (2.3.1-1), a PUBLISH topic that is empty or has wildcards
/// (3.3.2-2, 4.7.3-1), a SUBSCRIBE or UNSUBSCRIBE without filters or with an empty or invalid
/// one, a requested QoS above 2 or with reserved bits (3.8.3-4), and packets whose length is
/// fixed (PINGREQ, DISCONNECT, acknowledgements) with another length.
pub fn check_strict(ty: u8, frame: &[u8]) -> Result<(), &'static str> {
    let flags = frame[0] & 0x0f;
    let b = body(frame);
    let pkid = |b: &[u8]| b.get(..2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    match ty {
        0 | 15 => return Err("reserved packet type"),
        kind::PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err("PUBLISH with QoS 3");
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err("PUBLISH with QoS 0 and DUP set");
            }
            let (topic, rest) = mqtt_str(b).map_err(|_| "PUBLISH topic malformed")?;
            if topic.is_empty() || topic.contains(['+', '#']) {
                return Err("PUBLISH topic empty or with a wildcard");
            }
            if qos > 0 && pkid(rest).is_none_or(|p| p == 0) {
                return Err("QoS 1/2 PUBLISH with packet id 0 or none");
            }
        }
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE if flags != 0b0010 => {
            return Err("SUBSCRIBE, UNSUBSCRIBE or PUBREL with fixed-header flags other than 0010");
        }
        _ if !matches!(ty, kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE) && flags != 0 => {
            return Err("fixed-header flags set on a packet type that has none");
        }
        _ => {}
    }
    match ty {
        kind::CONNECT => {
            let (_, rest) = mqtt_str(b).map_err(|_| "CONNECT protocol name malformed")?;
            let cf = *rest.get(1).ok_or("CONNECT too short")?;
            if cf & 0x01 != 0 {
                return Err("CONNECT with the reserved flag set");
            }
            let (will, will_qos, will_retain) = (cf & 0x04 != 0, (cf >> 3) & 0b11, cf & 0x20 != 0);
            if will_qos == 3 || (!will && (will_qos != 0 || will_retain)) {
                return Err("CONNECT with inconsistent will flags");
            }
            if cf & 0x80 == 0 && cf & 0x40 != 0 {
                return Err("CONNECT with a password but no user name");
            }
        }
        kind::SUBSCRIBE | kind::UNSUBSCRIBE => {
            if pkid(b).is_none_or(|p| p == 0) {
                return Err("SUBSCRIBE/UNSUBSCRIBE with packet id 0");
            }
            let mut rest = &b[2..];
            if rest.is_empty() {
                return Err("SUBSCRIBE/UNSUBSCRIBE without a topic filter");
            }
            while !rest.is_empty() {
                let (f, r) = mqtt_str(rest).map_err(|_| "topic filter malformed")?;
                if !valid_filter(f) {
                    return Err("empty or invalid topic filter");
                }
                rest = r;
                if ty == kind::SUBSCRIBE {
                    let q = *rest.first().ok_or("SUBSCRIBE filter without its QoS")?;
                    if q > 2 {
                        return Err("SUBSCRIBE with a QoS above 2 or reserved bits set");
                    }
                    rest = &rest[1..];
                }
            }
        }
        kind::PINGREQ | kind::PINGRESP | kind::DISCONNECT if !b.is_empty() => {
            return Err("PINGREQ/DISCONNECT with a body");
        }
        kind::PUBACK | kind::PUBREC | kind::PUBREL | kind::PUBCOMP | kind::UNSUBACK
            if b.len() != 2 =>
        {
            return Err("acknowledgement whose length is not 2");
        }
        _ => {}
    }
    Ok(())
}

/// Decodes a whole frame with rumqttd's v4 codec.
pub fn decode(frame: &Bytes, max_packet: usize) -> Result<Packet, FrameError> {
    let mut b = BytesMut::from(&frame[..]);
    v4::V4
        .read_mut(&mut b, max_packet)
        .map_err(|e| FrameError::Bad(e.to_string()))
}

/// Encodes a packet with rumqttd's v4 codec.
pub fn encode(p: Packet) -> Result<Bytes, FrameError> {
    let mut b = BytesMut::new();
    v4::V4
        .write(p, &mut b)
        .map_err(|e| FrameError::Bad(e.to_string()))?;
    Ok(b.freeze())
}

/// The parts of a PUBLISH the front door needs.
#[derive(Debug, Clone)]
pub struct PublishView {
    pub qos: u8,
    pub pkid: u16,
    pub topic: String,
    pub payload: Bytes,
}

/// Reads a PUBLISH frame's header (topic, QoS, packet id) and payload.
pub fn parse_publish(frame: &Bytes) -> Result<PublishView, FrameError> {
    let bad = |m: &str| FrameError::Bad(m.to_string());
    let qos = (frame[0] >> 1) & 0b11;
    if qos == 3 {
        return Err(bad("PUBLISH with QoS 3"));
    }
    // skip the fixed header: 1 byte + 1..4 bytes of remaining length
    let mut i = 1;
    while i < frame.len() && frame[i] & 0x80 != 0 {
        i += 1;
    }
    let mut rest = frame.slice(i + 1..);
    if rest.len() < 2 {
        return Err(bad("PUBLISH too short"));
    }
    let tlen = rest.get_u16() as usize;
    if rest.len() < tlen {
        return Err(bad("PUBLISH topic longer than the packet"));
    }
    let topic = std::str::from_utf8(&rest[..tlen])
        .map_err(|_| bad("PUBLISH topic is not UTF-8"))?
        .to_string();
    rest.advance(tlen);
    let pkid = if qos > 0 {
        if rest.len() < 2 {
            return Err(bad("PUBLISH without packet id"));
        }
        rest.get_u16()
    } else {
        0
    };
    Ok(PublishView {
        qos,
        pkid,
        topic,
        payload: rest,
    })
}

/// A two-byte-body acknowledgement (PUBACK, PUBREC, PUBCOMP).
pub fn ack(kind: u8, pkid: u16) -> Bytes {
    let mut b = BytesMut::with_capacity(4);
    b.put_u8(kind << 4);
    b.put_u8(2);
    b.put_u16(pkid);
    b.freeze()
}

/// The packet id of an acknowledgement-shaped frame (SUBACK, PUBREL, ...), after the fixed header.
pub fn ack_pkid(frame: &Bytes) -> Option<u16> {
    let mut i = 1;
    while i < frame.len() && frame[i] & 0x80 != 0 {
        i += 1;
    }
    let body = frame.get(i + 1..i + 3)?;
    Some(u16::from_be_bytes([body[0], body[1]]))
}

/// CONNACK with a return code (0 accepted, 4 bad user name or password, 5 not authorized).
pub fn connack(code: u8) -> Bytes {
    Bytes::from(vec![kind::CONNACK << 4, 2, 0, code])
}

/// CONNACK accepting the connection, with the session-present flag.
pub fn connack_accepted(session_present: bool) -> Bytes {
    Bytes::from(vec![kind::CONNACK << 4, 2, session_present as u8, 0])
}

/// PINGRESP.
pub fn pingresp() -> Bytes {
    Bytes::from_static(&[kind::PINGRESP << 4, 0])
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
    Bytes::from(vec![kind::UNSUBACK << 4, 2, (pkid >> 8) as u8, pkid as u8])
}

/// A QoS 0 PUBLISH (what the server sends devices).
pub fn publish_qos0(topic: &str, payload: &[u8]) -> Bytes {
    let body = 2 + topic.len() + payload.len();
    let mut b = BytesMut::with_capacity(5 + body);
    b.put_u8(kind::PUBLISH << 4);
    put_remaining_length(&mut b, body);
    b.put_u16(topic.len() as u16);
    b.put_slice(topic.as_bytes());
    b.put_slice(payload);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_frame(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_u16(topic.len() as u16);
        body.put_slice(topic.as_bytes());
        if qos > 0 {
            body.put_u16(pkid);
        }
        body.put_slice(payload);
        let mut f = BytesMut::new();
        f.put_u8((kind::PUBLISH << 4) | (qos << 1));
        f.put_u8(body.len() as u8);
        f.put_slice(&body);
        f
    }

    #[test]
    fn frames_and_publish_headers() {
        let mut buf = publish_frame("a/b", 1, 7, b"hello");
        buf.extend_from_slice(&publish_frame("c", 0, 0, b"x")[..2]); // half of the next packet
        let (ty, frame) = take_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(ty, kind::PUBLISH);
        let p = parse_publish(&frame).unwrap();
        assert_eq!(
            (p.qos, p.pkid, p.topic.as_str(), &p.payload[..]),
            (1, 7, "a/b", &b"hello"[..])
        );
        assert!(take_frame(&mut buf, 1024).unwrap().is_none());
        assert_eq!(ack_pkid(&ack(kind::PUBACK, 513)), Some(513));
    }

    #[test]
    fn packets_we_answer_with_decode_as_mqtt() {
        let big = vec![7u8; 300]; // two bytes of remaining length
        let mut buf = BytesMut::from(&publish_qos0("t/x", &big)[..]);
        let (ty, frame) = take_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(ty, kind::PUBLISH);
        let p = parse_publish(&frame).unwrap();
        assert_eq!((p.qos, p.topic.as_str(), p.payload.len()), (0, "t/x", 300));
        for (bytes, want) in [
            (suback(9, &[1, 0x80]), kind::SUBACK),
            (unsuback(9), kind::UNSUBACK),
            (connack_accepted(true), kind::CONNACK),
            (pingresp(), kind::PINGRESP),
        ] {
            let mut b = BytesMut::from(&bytes[..]);
            let (ty, f) = take_frame(&mut b, 1024).unwrap().unwrap();
            assert_eq!(ty, want);
            assert!(b.is_empty());
            if ty == kind::SUBACK || ty == kind::UNSUBACK {
                assert_eq!(ack_pkid(&f), Some(9));
            }
        }
        match decode(&suback(9, &[1, 0x80]), 1024).unwrap() {
            Packet::SubAck(a, _) => assert_eq!(a.return_codes.len(), 2),
            p => panic!("{p:?}"),
        }
    }

    /// A frame of type/flags with this body.
    fn raw(first: u8, body: &[u8]) -> BytesMut {
        let mut f = BytesMut::new();
        f.put_u8(first);
        put_remaining_length(&mut f, body.len());
        f.put_slice(body);
        f
    }

    fn strs(v: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        for s in v {
            b.extend_from_slice(&(s.len() as u16).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        b
    }

    #[test]
    fn what_mqtt_3_1_1_says_to_close_for_is_refused() {
        let connect = |flags: u8| {
            let mut b = strs(&["MQTT"]);
            b.extend_from_slice(&[4, flags, 0, 60]);
            b.extend(strs(&["c1"]));
            b
        };
        let sub = |pkid: u16, filter: &str, qos: u8| {
            let mut b = pkid.to_be_bytes().to_vec();
            b.extend(strs(&[filter]));
            b.push(qos);
            b
        };
        let unsub = |pkid: u16, filter: &str| {
            let mut b = pkid.to_be_bytes().to_vec();
            b.extend(strs(&[filter]));
            b
        };
        let publish = |topic: &str, pkid: Option<u16>| {
            let mut b = strs(&[topic]);
            if let Some(p) = pkid {
                b.extend_from_slice(&p.to_be_bytes());
            }
            b.extend_from_slice(b"{}");
            b
        };
        let good: Vec<(&str, BytesMut)> = vec![
            ("CONNECT", raw(0x10, &connect(0x02))),
            ("SUBSCRIBE", raw(0x82, &sub(1, "a/+/b/#", 1))),
            ("UNSUBSCRIBE", raw(0xA2, &unsub(1, "a/b"))),
            ("QoS 1 PUBLISH", raw(0x32, &publish("a/b", Some(9)))),
            ("QoS 0 PUBLISH", raw(0x30, &publish("a/b", None))),
            ("PINGREQ", raw(0xC0, &[])),
            ("PUBREL", raw(0x62, &[0, 1])),
            ("DISCONNECT", raw(0xE0, &[])),
        ];
        for (what, mut f) in good {
            assert!(take_frame(&mut f, 1024).is_ok(), "{what} refused");
        }
        let bad: Vec<(&str, BytesMut)> = vec![
            ("CONNECT reserved flag", raw(0x10, &connect(0x03))),
            ("CONNECT password without user", raw(0x10, &connect(0x42))),
            ("CONNECT will QoS without will", raw(0x10, &connect(0x0A))),
            ("CONNECT with flags", raw(0x11, &connect(0x02))),
            ("QoS 1 PUBLISH pkid 0", raw(0x32, &publish("a/b", Some(0)))),
            ("QoS 2 PUBLISH pkid 0", raw(0x34, &publish("a/b", Some(0)))),
            ("QoS 0 PUBLISH with DUP", raw(0x38, &publish("a/b", None))),
            ("PUBLISH with a wildcard", raw(0x30, &publish("a/+", None))),
            ("PUBLISH with an empty topic", raw(0x30, &publish("", None))),
            ("SUBSCRIBE pkid 0", raw(0x82, &sub(0, "a", 0))),
            ("UNSUBSCRIBE pkid 0", raw(0xA2, &unsub(0, "a"))),
            ("SUBSCRIBE flags 0", raw(0x80, &sub(1, "a", 0))),
            ("UNSUBSCRIBE flags 0", raw(0xA0, &unsub(1, "a"))),
            ("SUBSCRIBE QoS 3", raw(0x82, &sub(1, "a", 3))),
            ("SUBSCRIBE empty filter", raw(0x82, &sub(1, "", 0))),
            ("UNSUBSCRIBE empty filter", raw(0xA2, &unsub(1, ""))),
            ("SUBSCRIBE no filter", raw(0x82, &[0, 1])),
            ("SUBSCRIBE bad #", raw(0x82, &sub(1, "a/#/b", 0))),
            ("SUBSCRIBE bad +", raw(0x82, &sub(1, "a+/b", 0))),
            ("PINGREQ with a body", raw(0xC0, &[0])),
            ("PINGREQ with flags", raw(0xC1, &[])),
            ("DISCONNECT with a body", raw(0xE0, &[1, 2])),
            ("PUBACK of length 3", raw(0x40, &[0, 1, 2])),
            ("PUBREL flags 0", raw(0x60, &[0, 1])),
            ("reserved type 0", raw(0x00, &[])),
            ("reserved type 15", raw(0xF0, &[])),
        ];
        for (what, mut f) in bad {
            assert!(take_frame(&mut f, 1024).is_err(), "{what} accepted");
        }
    }

    #[test]
    fn oversized_and_garbage_are_errors() {
        let mut buf = publish_frame("a", 0, 0, &[0u8; 100]);
        assert!(take_frame(&mut buf, 50).is_err());
        let mut junk = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(take_frame(&mut junk, 1 << 20).is_err());
    }
}
