//! The bridges' disk queues (`[[mqtt.bridge]]`): messages for another broker, kept until it
//! acknowledged them. Keys: the bridge's name, a zero byte, a big-endian sequence number, so
//! a bridge's messages read back in order.

use super::{BridgeMessageRecord, Result, Store, decode, encode};

fn key(bridge: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(bridge.len() + 9);
    k.extend_from_slice(bridge.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn prefix(bridge: &str) -> Vec<u8> {
    let mut k = bridge.as_bytes().to_vec();
    k.push(0);
    k
}

fn seq_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[k.len() - 8..]);
    u64::from_be_bytes(b)
}

impl Store {
    /// Appends a message to a bridge's queue (not flushed: the publisher's answer waits for
    /// the flush).
    pub fn put_bridge_message(
        &self,
        bridge: &str,
        seq: u64,
        rec: &BridgeMessageRecord,
    ) -> Result<()> {
        self.with(|e| {
            e.bridge_queue.insert(key(bridge, seq), encode(rec))?;
            Ok(())
        })
    }

    /// Up to `max` messages of a bridge from `from` on, in order.
    pub fn bridge_messages(
        &self,
        bridge: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, BridgeMessageRecord)>> {
        self.with(|e| {
            e.bridge_queue
                .range(key(bridge, from)..key(bridge, u64::MAX))
                .take(max)
                .map(|kv| {
                    let (k, v) = kv?;
                    Ok((seq_of(&k), decode(&k, &v)?))
                })
                .collect()
        })
    }

    /// Removes a message the other broker acknowledged (or that the bound drops).
    pub fn remove_bridge_message(&self, bridge: &str, seq: u64) -> Result<()> {
        self.with(|e| {
            e.bridge_queue.remove(key(bridge, seq))?;
            Ok(())
        })
    }

    /// (first sequence number, last sequence number, count) of a bridge's queue; `None` when
    /// it is empty. Counts by walking the keys: called once at start.
    pub fn bridge_queue_span(&self, bridge: &str) -> Result<Option<(u64, u64, u64)>> {
        self.with(|e| {
            let mut first = None;
            let mut last = 0;
            let mut n = 0;
            for k in e.bridge_queue.scan_prefix(prefix(bridge)).keys() {
                let s = seq_of(&k?);
                first.get_or_insert(s);
                last = s;
                n += 1;
            }
            Ok(first.map(|f| (f, last, n)))
        })
    }
}
