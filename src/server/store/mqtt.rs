//! The broker's records in the store: application users, retained messages, persistent
//! sessions and the QoS 1/2 messages queued in them. Keys: users by name, retained messages by
//! topic, sessions by key, messages by session key, a zero byte and a big-endian sequence
//! number (so a session's messages read back in order). The packet ids of QoS 2 publishes a
//! session received and has not released yet sit in the messages' tree too (session key, a one
//! byte, the id), so that routing a QoS 2 publish and noting its id are one atomic batch:
//! after a crash either both happened or neither, and the publisher's retry is routed once.

use super::{
    MqttMessageRecord, MqttSessionRecord, MqttUserRecord, Result, RetainedRecord, Store, StoreError,
};
use super::{decode, encode};

fn message_key(session: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(session.len() + 9);
    k.extend_from_slice(session.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn message_prefix(session: &str) -> Vec<u8> {
    let mut k = session.as_bytes().to_vec();
    k.push(0);
    k
}

fn qos2_key(session: &str, pkid: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(session.len() + 3);
    k.extend_from_slice(session.as_bytes());
    k.push(1);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

/// A stored session with what waits in it.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// Its key.
    pub key: String,
    /// The session.
    pub record: MqttSessionRecord,
    /// Its queued and in-flight messages (sequence number, record), in order.
    pub messages: Vec<(u64, MqttMessageRecord)>,
    /// QoS 2 packet ids received and not released.
    pub qos2_received: Vec<u16>,
}

/// One change to the broker's queued state, for [`Store::mqtt_write`].
#[derive(Debug, Clone)]
pub enum MqttWrite {
    /// A message queued in (or re-written for) a session.
    Message {
        session: String,
        seq: u64,
        record: MqttMessageRecord,
    },
    /// A message acknowledged by its client: gone.
    Delivered { session: String, seq: u64 },
    /// A QoS 2 publish received from the session's client.
    Qos2Received { session: String, pkid: u16 },
    /// Its PUBREL came.
    Qos2Released { session: String, pkid: u16 },
}

impl Store {
    /// Inserts an application user; `Conflict` if the name exists.
    pub fn insert_mqtt_user(&self, rec: &MqttUserRecord) -> Result<()> {
        self.with(|e| {
            match e.mqtt_users.compare_and_swap(
                rec.name.as_bytes(),
                None::<&[u8]>,
                Some(encode(rec)),
            )? {
                Ok(()) => Ok(()),
                Err(_) => Err(StoreError::Conflict(rec.name.clone())),
            }
        })
    }

    /// Every application user, by name.
    pub fn mqtt_users(&self) -> Result<Vec<MqttUserRecord>> {
        self.with(|e| all(&e.mqtt_users))
    }

    /// Removes an application user, returning it.
    pub fn delete_mqtt_user(&self, name: &str) -> Result<Option<MqttUserRecord>> {
        self.with(|e| {
            e.mqtt_users
                .remove(name.as_bytes())?
                .map(|v| decode(name.as_bytes(), &v))
                .transpose()
        })
    }

    /// Stores the retained message of `topic`, or removes it (`None`).
    pub fn put_retained(&self, topic: &str, rec: Option<&RetainedRecord>) -> Result<()> {
        self.with(|e| {
            match rec {
                Some(r) => e.mqtt_retained.insert(topic.as_bytes(), encode(r))?,
                None => e.mqtt_retained.remove(topic.as_bytes())?,
            };
            Ok(())
        })
    }

    /// Every retained message.
    pub fn retained_messages(&self) -> Result<Vec<RetainedRecord>> {
        self.with(|e| all(&e.mqtt_retained))
    }

    /// Writes a persistent session.
    pub fn put_mqtt_session(&self, key: &str, rec: &MqttSessionRecord) -> Result<()> {
        self.with(|e| {
            e.mqtt_sessions.insert(key.as_bytes(), encode(rec))?;
            Ok(())
        })
    }

    /// Removes a session and every message queued in it.
    pub fn delete_mqtt_session(&self, key: &str) -> Result<()> {
        self.with(|e| {
            e.mqtt_sessions.remove(key.as_bytes())?;
            let mut batch = sled::Batch::default();
            for k in e.mqtt_messages.scan_prefix(message_prefix(key)).keys() {
                batch.remove(k?);
            }
            e.mqtt_messages.apply_batch(batch)?;
            Ok(())
        })
    }

    /// Applies changes to sessions' queued state as one atomic batch.
    pub fn mqtt_write(&self, writes: &[MqttWrite]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for w in writes {
            match w {
                MqttWrite::Message {
                    session,
                    seq,
                    record,
                } => batch.insert(message_key(session, *seq), encode(record)),
                MqttWrite::Delivered { session, seq } => batch.remove(message_key(session, *seq)),
                MqttWrite::Qos2Received { session, pkid } => {
                    batch.insert(qos2_key(session, *pkid), &[][..])
                }
                MqttWrite::Qos2Released { session, pkid } => batch.remove(qos2_key(session, *pkid)),
            }
        }
        self.with(|e| {
            e.mqtt_messages.apply_batch(batch)?;
            Ok(())
        })
    }

    /// Every persistent session with its queued messages. Messages whose session is gone (a
    /// write cut short by a crash) are removed.
    pub fn mqtt_sessions(&self) -> Result<Vec<StoredSession>> {
        self.with(|e| {
            let mut out: Vec<StoredSession> = Vec::new();
            for kv in e.mqtt_sessions.iter() {
                let (k, v) = kv?;
                out.push(StoredSession {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    record: decode(&k, &v)?,
                    messages: Vec::new(),
                    qos2_received: Vec::new(),
                });
            }
            let find =
                |session: &[u8]| out.binary_search_by(|s| s.key.as_bytes().cmp(session)).ok();
            let mut orphans = sled::Batch::default();
            let mut messages: Vec<(usize, u64, MqttMessageRecord)> = Vec::new();
            let mut qos2: Vec<(usize, u16)> = Vec::new();
            for kv in e.mqtt_messages.iter() {
                let (k, v) = kv?;
                // session key, 0, 8-byte sequence number | session key, 1, 2-byte packet id
                let n = k.len();
                if n > 9
                    && k[n - 9] == 0
                    && let Some(i) = find(&k[..n - 9])
                {
                    let seq = u64::from_be_bytes(k[n - 8..].try_into().expect("8 bytes"));
                    messages.push((i, seq, decode(&k, &v)?));
                } else if n > 3
                    && k[n - 3] == 1
                    && let Some(i) = find(&k[..n - 3])
                {
                    qos2.push((i, u16::from_be_bytes([k[n - 2], k[n - 1]])));
                } else {
                    orphans.remove(k);
                }
            }
            for (i, seq, m) in messages {
                out[i].messages.push((seq, m));
            }
            for (i, pkid) in qos2 {
                out[i].qos2_received.push(pkid);
            }
            e.mqtt_messages.apply_batch(orphans)?;
            Ok(out)
        })
    }
}

fn all<T: serde::de::DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
        .collect()
}
