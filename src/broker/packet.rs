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
            Ok(Some((ty, buf.split_to(len).freeze())))
        }
        Err(rumqttd::protocol::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(FrameError::Bad(e.to_string())),
    }
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

    #[test]
    fn oversized_and_garbage_are_errors() {
        let mut buf = publish_frame("a", 0, 0, &[0u8; 100]);
        assert!(take_frame(&mut buf, 50).is_err());
        let mut junk = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(take_frame(&mut junk, 1 << 20).is_err());
    }
}
