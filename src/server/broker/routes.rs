//! The direct engine's routing: which connection listens on which command topic, and the MQTT
//! sessions of device clients. A device may only subscribe to its own command topics, exactly
//! (no wildcards pass the ACL), so routing is one map lookup; the server is the only publisher.
//!
//! Sessions follow MQTT 3.1.1 as far as a device needs them: a second connection with the same
//! client id (scoped to the device) takes the session over and closes the first; a session with
//! `clean_session = false` keeps its subscriptions after a disconnect, so a device that
//! reconnects without subscribing again still gets its commands (CONNACK says session present).
//! Messages are not queued for offline devices: the server re-sends a pending command when the
//! device's command subscription is back (see `ota`), which a queue could only duplicate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most stored persistent sessions of disconnected clients; beyond it sessions end clean.
const MAX_STORED_SESSIONS: usize = 200_000;

/// What one connection receives: whole MQTT frames.
pub(crate) type Outbox = mpsc::Sender<Bytes>;

struct Session {
    /// The connection holding it (0: none, stored).
    conn: u64,
    /// Closes that connection when another takes the session over.
    end: Option<CancellationToken>,
    /// Subscribed topics with their granted QoS.
    topics: Vec<(String, u8)>,
    persistent: bool,
}

#[derive(Default)]
struct Inner {
    topics: HashMap<String, Vec<(u64, Outbox)>>,
    sessions: HashMap<String, Session>,
    stored: usize,
}

/// Outcome of a publish.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Connections the frame was queued for.
    pub delivered: usize,
    /// Connections whose queue was full or closed.
    pub dropped: usize,
}

/// Subscriptions and sessions of every device connection.
#[derive(Default)]
pub(crate) struct Routes {
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
}

impl Routes {
    /// A fresh connection number (never 0).
    pub fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the session `key` for connection `conn`, closing a connection that holds it.
    /// Returns (session present, the topics it was subscribed to: the caller re-subscribes).
    pub fn open(
        &self,
        key: &str,
        clean: bool,
        conn: u64,
        end: CancellationToken,
    ) -> (bool, Vec<(String, u8)>) {
        let mut guard = self.lock();
        let g = &mut *guard;
        let old = g.sessions.remove(key);
        let mut restored = Vec::new();
        let mut present = false;
        if let Some(old) = old {
            if old.conn == 0 {
                g.stored -= 1;
            }
            if let Some(e) = old.end {
                e.cancel();
            }
            if old.conn != 0 {
                for (t, _) in &old.topics {
                    remove_route(&mut g.topics, t, old.conn);
                }
            }
            if !clean && old.persistent {
                present = true;
                restored = old.topics;
            }
        }
        g.sessions.insert(
            key.to_string(),
            Session {
                conn,
                end: Some(end),
                topics: Vec::new(),
                persistent: !clean,
            },
        );
        (present, restored)
    }

    /// Routes `topic` to `conn`'s outbox.
    pub fn subscribe(&self, key: &str, conn: u64, topic: &str, qos: u8, out: &Outbox) {
        let mut guard = self.lock();
        let g = &mut *guard;
        let Some(s) = g.sessions.get_mut(key).filter(|s| s.conn == conn) else {
            return; // taken over meanwhile
        };
        match s.topics.iter_mut().find(|(t, _)| t == topic) {
            Some(e) => e.1 = qos,
            None => s.topics.push((topic.to_string(), qos)),
        }
        let subs = g.topics.entry(topic.to_string()).or_default();
        subs.retain(|(c, _)| *c != conn);
        subs.push((conn, out.clone()));
    }

    /// Stops routing `topic` to `conn`.
    pub fn unsubscribe(&self, key: &str, conn: u64, topic: &str) {
        let mut guard = self.lock();
        let g = &mut *guard;
        if let Some(s) = g.sessions.get_mut(key).filter(|s| s.conn == conn) {
            s.topics.retain(|(t, _)| t != topic);
        }
        remove_route(&mut g.topics, topic, conn);
    }

    /// The connection ended: its routes go; its session is stored if persistent.
    pub fn close(&self, key: &str, conn: u64) {
        let mut guard = self.lock();
        let g = &mut *guard;
        let Some(s) = g.sessions.get_mut(key).filter(|s| s.conn == conn) else {
            return; // taken over: the new holder owns the session now
        };
        let topics: Vec<String> = s.topics.iter().map(|(t, _)| t.clone()).collect();
        let keep = s.persistent && !s.topics.is_empty();
        for t in &topics {
            remove_route(&mut g.topics, t, conn);
        }
        if keep && g.stored < MAX_STORED_SESSIONS {
            let s = g.sessions.get_mut(key).expect("held");
            s.conn = 0;
            s.end = None;
            g.stored += 1;
        } else {
            g.sessions.remove(key);
        }
    }

    /// Queues a frame for every connection subscribed to `topic`; never waits.
    pub fn publish(&self, topic: &str, frame: &Bytes) -> Delivery {
        let g = self.lock();
        let mut d = Delivery::default();
        for (_, out) in g.topics.get(topic).map(|v| v.as_slice()).unwrap_or(&[]) {
            match out.try_send(frame.clone()) {
                Ok(()) => d.delivered += 1,
                Err(_) => d.dropped += 1,
            }
        }
        d
    }

    /// (routed topics, sessions held or stored): for tests and metrics.
    #[cfg(test)]
    fn sizes(&self) -> (usize, usize) {
        let g = self.lock();
        (g.topics.len(), g.sessions.len())
    }
}

fn remove_route(topics: &mut HashMap<String, Vec<(u64, Outbox)>>, topic: &str, conn: u64) {
    if let Some(v) = topics.get_mut(topic) {
        v.retain(|(c, _)| *c != conn);
        if v.is_empty() {
            topics.remove(topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_subscriptions_and_sessions() {
        let r = Routes::default();
        let frame = Bytes::from_static(b"cmd");
        // clean session: routed while connected, gone after
        let (tx, mut rx) = mpsc::channel(4);
        let c1 = r.next_conn();
        assert_eq!(
            r.open("d1", true, c1, CancellationToken::new()),
            (false, vec![])
        );
        r.subscribe("d1", c1, "t/d1", 1, &tx);
        assert_eq!(r.publish("t/d1", &frame).delivered, 1);
        assert_eq!(rx.try_recv().unwrap(), frame);
        assert_eq!(r.publish("t/other", &frame), Delivery::default());
        r.unsubscribe("d1", c1, "t/d1");
        assert_eq!(r.publish("t/d1", &frame).delivered, 0);
        r.subscribe("d1", c1, "t/d1", 1, &tx);
        r.close("d1", c1);
        assert_eq!(r.sizes(), (0, 0));

        // a full outbox drops instead of waiting
        let (tx, _rx) = mpsc::channel(1);
        let c2 = r.next_conn();
        r.open("d2", true, c2, CancellationToken::new());
        r.subscribe("d2", c2, "t/d2", 0, &tx);
        assert_eq!(r.publish("t/d2", &frame).delivered, 1);
        assert_eq!(r.publish("t/d2", &frame).dropped, 1);
        r.close("d2", c2);
    }

    #[test]
    fn takeover_closes_the_old_connection_and_persistent_sessions_survive() {
        let r = Routes::default();
        let (tx1, _rx1) = mpsc::channel(4);
        let (c1, end1) = (r.next_conn(), CancellationToken::new());
        assert!(!r.open("k", false, c1, end1.clone()).0);
        r.subscribe("k", c1, "t/k", 1, &tx1);

        // same client id again: the first connection is told to go, its route is gone
        let (tx2, mut rx2) = mpsc::channel(4);
        let c2 = r.next_conn();
        let (present, topics) = r.open("k", false, c2, CancellationToken::new());
        assert!(end1.is_cancelled());
        assert!(present);
        assert_eq!(topics, vec![("t/k".to_string(), 1)]);
        r.close("k", c1); // the old connection's late cleanup touches nothing
        for (t, q) in &topics {
            r.subscribe("k", c2, t, *q, &tx2);
        }
        assert_eq!(r.publish("t/k", &Bytes::from_static(b"x")).delivered, 1);
        assert!(rx2.try_recv().is_ok());

        // disconnect: stored, not routed; a clean reconnect forgets it
        r.close("k", c2);
        assert_eq!(r.sizes(), (0, 1));
        let c3 = r.next_conn();
        assert_eq!(
            r.open("k", true, c3, CancellationToken::new()),
            (false, vec![])
        );
        r.close("k", c3);
        assert_eq!(r.sizes(), (0, 0));
    }
}
