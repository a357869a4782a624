//! The outbox of device account changes for the site's broker (`[mqtt.external] sync`): a
//! registration, a new secret or a deletion is written here in the same flush as the device
//! record, and removed once the broker confirmed it, so a change survives a crash or a broker
//! that is down. Keys are device ids; a newer change of a device replaces the older one.

use super::{BrokerAccountRecord, Result, Store, decode, encode};

impl Store {
    /// Queues a device's account change (not flushed: the caller's flush covers it).
    pub fn put_broker_account(&self, id: &str, rec: &BrokerAccountRecord) -> Result<()> {
        self.with(|e| {
            e.broker_accounts.insert(id.as_bytes(), encode(rec))?;
            Ok(())
        })
    }

    /// Every queued change, by device id.
    pub fn broker_accounts(&self) -> Result<Vec<(String, BrokerAccountRecord)>> {
        self.with(|e| {
            e.broker_accounts
                .iter()
                .map(|kv| {
                    let (k, v) = kv?;
                    Ok((String::from_utf8_lossy(&k).into_owned(), decode(&k, &v)?))
                })
                .collect()
        })
    }

    /// How many changes are queued (the keys only: nothing decoded, no secret read).
    pub fn broker_accounts_count(&self) -> Result<usize> {
        self.with(|e| Ok(e.broker_accounts.len()))
    }

    /// Removes a device's queued change if it is still the one with `seq` (not flushed: losing
    /// the removal only repeats the change).
    pub fn remove_broker_account(&self, id: &str, seq: u64) -> Result<()> {
        self.with(|e| {
            if let Some(v) = e.broker_accounts.get(id.as_bytes())?
                && decode::<BrokerAccountRecord>(id.as_bytes(), &v)?.seq == seq
            {
                let _ =
                    e.broker_accounts
                        .compare_and_swap(id.as_bytes(), Some(v), None::<&[u8]>)?;
            }
            Ok(())
        })
    }
}
