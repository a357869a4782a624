//! A raw MQTT 3.1.1 client over TCP, packet by packet, for what stock clients will not do on
//! demand: withhold a PUBREL, drop the connection between the halves of a QoS 2 exchange,
//! never read, send 10,000 filters at once. Encoding and decoding are written out here from
//! the specification, independently of the appliance's own codec.

#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A whole packet from its first byte and body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    remaining_length(body.len(), &mut f);
    f.extend_from_slice(body);
    f
}

/// CONNECT (3.1.1).
pub fn connect(
    client_id: &str,
    clean: bool,
    creds: Option<(&str, &str)>,
    keep_alive: u16,
) -> Vec<u8> {
    let mut b = Vec::new();
    string(b"MQTT", &mut b);
    b.push(4);
    let mut flags = (clean as u8) << 1;
    if creds.is_some() {
        flags |= 0xC0;
    }
    b.push(flags);
    b.extend_from_slice(&keep_alive.to_be_bytes());
    string(client_id.as_bytes(), &mut b);
    if let Some((u, p)) = creds {
        string(u.as_bytes(), &mut b);
        string(p.as_bytes(), &mut b);
    }
    frame(0x10, &b)
}

/// PUBLISH.
pub fn publish(
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
) -> Vec<u8> {
    let mut b = Vec::new();
    string(topic.as_bytes(), &mut b);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    b.extend_from_slice(payload);
    frame(0x30 | (dup as u8) << 3 | qos << 1 | retain as u8, &b)
}

/// SUBSCRIBE.
pub fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    for (f, q) in filters {
        string(f.as_bytes(), &mut b);
        b.push(*q);
    }
    frame(0x82, &b)
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP (first byte as the constants above).
pub fn ack(first: u8, pkid: u16) -> Vec<u8> {
    frame(first, &pkid.to_be_bytes())
}

/// A packet received: its first byte and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Got {
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// The packet id of an acknowledgement or SUBACK.
    pub fn id(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }

    /// A PUBLISH's (topic, QoS, packet id, payload, dup, retain).
    pub fn publish(&self) -> (String, u8, u16, Vec<u8>, bool, bool) {
        assert_eq!(self.kind(), 3, "not a PUBLISH: {self:?}");
        let qos = (self.first >> 1) & 3;
        let n = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let topic = String::from_utf8(self.body[2..2 + n].to_vec()).unwrap();
        let mut at = 2 + n;
        let mut pkid = 0;
        if qos > 0 {
            pkid = u16::from_be_bytes([self.body[at], self.body[at + 1]]);
            at += 2;
        }
        (
            topic,
            qos,
            pkid,
            self.body[at..].to_vec(),
            self.first & 8 != 0,
            self.first & 1 != 0,
        )
    }
}

/// One connection.
pub struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and sends CONNECT; returns with the CONNACK's bytes (flags, return code).
    pub async fn connect(
        port: u16,
        client_id: &str,
        clean: bool,
        creds: Option<(&str, &str)>,
    ) -> (Raw, [u8; 2]) {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut r = Raw { s, buf: Vec::new() };
        r.send(&connect(client_id, clean, creds, 60)).await;
        let ack = r.next(10).await.expect("CONNACK");
        assert_eq!(ack.first, 0x20, "{ack:?}");
        (r, [ack.body[0], ack.body[1]])
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// The next packet; `None` once the server closed the connection. Fails the test after
    /// `secs` without one.
    pub async fn next(&mut self, secs: u64) -> Option<Got> {
        tokio::time::timeout(Duration::from_secs(secs), self.read())
            .await
            .expect("no MQTT packet in time")
    }

    async fn read(&mut self) -> Option<Got> {
        loop {
            if self.buf.len() >= 2 {
                let (mut len, mut mul, mut i) = (0usize, 1usize, 1);
                let mut whole = false;
                while i < self.buf.len() && i <= 4 {
                    len += (self.buf[i] & 0x7f) as usize * mul;
                    mul *= 128;
                    if self.buf[i] & 0x80 == 0 {
                        whole = true;
                        break;
                    }
                    i += 1;
                }
                if whole && self.buf.len() > i + len {
                    let body = self.buf[i + 1..i + 1 + len].to_vec();
                    let first = self.buf[0];
                    self.buf.drain(..i + 1 + len);
                    return Some(Got { first, body });
                }
            }
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next packet of kind `kind` (high nibble), skipping others.
    pub async fn next_of(&mut self, kind: u8, secs: u64) -> Got {
        loop {
            let g = self.next(secs).await.expect("connection closed");
            if g.kind() == kind {
                return g;
            }
        }
    }

    /// Drops the connection without DISCONNECT.
    pub fn drop_connection(self) {}
}
