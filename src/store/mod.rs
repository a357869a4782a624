//! The store: the only module that names sled. Typed methods over typed records; no `Tree`
//! leaves this module, so the engine can be swapped (sled 0.34 has known space-growth issues).
//!
//! Durability: sled buffers writes for up to ~500 ms. Every mutation that the caller reports as
//! saved must be followed by [`Store::flush`], which runs on the blocking pool.

mod records;

use std::collections::HashSet;
use std::path::Path;

pub use records::{FIRMWARE_SCHEMA, FirmwareRecord, FirmwareStatus};

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (I/O, corruption).
    #[error("store engine: {0}")]
    Engine(String),
    /// A stored record could not be decoded.
    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The decoding error.
        reason: String,
    },
    /// The record already exists (insert) or changed under us (update).
    #[error("record {0} already exists or was changed concurrently")]
    Conflict(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Engine(e.to_string())
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Handle to the on-disk store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    firmware: sled::Tree,
}

fn firmware_key(device_type: &str, version: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(device_type.len() + version.len() + 1);
    k.extend_from_slice(device_type.as_bytes());
    k.push(0);
    k.extend_from_slice(version.as_bytes());
    k
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
}

impl Store {
    /// Opens (or creates) the store in `dir`. Blocking; call at start-up.
    pub fn open(dir: &Path) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let firmware = db.open_tree("firmware")?;
        Ok(Store { db, firmware })
    }

    /// Makes every previous write durable. Runs on the blocking pool.
    pub async fn flush(&self) -> Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush().map(|_| ()))
            .await
            .map_err(|e| StoreError::Engine(format!("flush task: {e}")))??;
        Ok(())
    }

    /// Blocking flush, for shutdown paths outside the runtime.
    pub fn flush_blocking(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    /// Inserts a new firmware record; `Conflict` if (deviceType, version) exists.
    pub fn insert_firmware(&self, rec: &FirmwareRecord) -> Result<()> {
        let key = firmware_key(&rec.device_type, &rec.version);
        match self
            .firmware
            .compare_and_swap(&key, None::<&[u8]>, Some(encode(rec)))?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::Conflict(format!(
                "{}/{}",
                rec.device_type, rec.version
            ))),
        }
    }

    /// One firmware record.
    pub fn get_firmware(&self, device_type: &str, version: &str) -> Result<Option<FirmwareRecord>> {
        let key = firmware_key(device_type, version);
        self.firmware
            .get(&key)?
            .map(|v| decode(&key, &v))
            .transpose()
    }

    /// Every firmware record, in key order.
    pub fn list_firmware(&self) -> Result<Vec<FirmwareRecord>> {
        self.firmware
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Replaces `old` by `new` atomically; `Conflict` if the stored record is no longer `old`.
    pub fn update_firmware(&self, old: &FirmwareRecord, new: &FirmwareRecord) -> Result<()> {
        let key = firmware_key(&old.device_type, &old.version);
        match self
            .firmware
            .compare_and_swap(&key, Some(encode(old)), Some(encode(new)))?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::Conflict(format!(
                "{}/{}",
                old.device_type, old.version
            ))),
        }
    }

    /// Removes a firmware record, returning it.
    pub fn delete_firmware(
        &self,
        device_type: &str,
        version: &str,
    ) -> Result<Option<FirmwareRecord>> {
        let key = firmware_key(device_type, version);
        self.firmware
            .remove(&key)?
            .map(|v| decode(&key, &v))
            .transpose()
    }

    /// The sha256 of every blob some record refers to (for orphan collection).
    pub fn referenced_blobs(&self) -> Result<HashSet<String>> {
        Ok(self
            .list_firmware()?
            .into_iter()
            .map(|r| r.sha256)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: &str) -> FirmwareRecord {
        FirmwareRecord {
            schema: FIRMWARE_SCHEMA,
            device_type: "gateway".into(),
            version: v.into(),
            sha256: format!("{:064}", 1),
            md5: format!("{:032}", 1),
            size: 1,
            description: String::new(),
            status: FirmwareStatus::Draft,
            force_upgrade: false,
            release_date_ms: None,
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    #[tokio::test]
    async fn insert_is_unique_and_update_is_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = rec("1.0.0");
        store.insert_firmware(&a).unwrap();
        assert!(matches!(
            store.insert_firmware(&a),
            Err(StoreError::Conflict(_))
        ));
        let mut b = a.clone();
        b.status = FirmwareStatus::Released;
        store.update_firmware(&a, &b).unwrap();
        assert!(matches!(
            store.update_firmware(&a, &b),
            Err(StoreError::Conflict(_))
        ));
        store.flush().await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get_firmware("gateway", "1.0.0").unwrap(), Some(b));
        assert_eq!(store.referenced_blobs().unwrap().len(), 1);
        assert!(store.delete_firmware("gateway", "1.0.0").unwrap().is_some());
        assert!(store.list_firmware().unwrap().is_empty());
    }
}
