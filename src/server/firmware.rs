//! Firmware catalogue: creating a firmware from a staged blob, listing, "latest" by version
//! order, status changes and deletion. Mutations are serialised by one lock so that a blob is
//! never removed while another record is being committed against it, and every mutation is
//! flushed to disk before it returns.

use std::path::PathBuf;
use std::sync::Arc;

use crate::ids;
use crate::server::blobs::{Blobs, StagedBlob};
use crate::server::signatures::Signatures;
use crate::server::store::{
    Durable, FIRMWARE_SCHEMA, FirmwareRecord, FirmwareSignature, FirmwareStatus, Store, StoreError,
};
use crate::time::now_ms;

/// Why a firmware operation failed: the one service error ([`crate::server::error::ServiceError`]).
pub type FirmwareError = crate::server::error::ServiceError;

type Result<T> = std::result::Result<T, FirmwareError>;

/// Metadata of a new upload.
#[derive(Debug, Clone)]
pub struct NewFirmware {
    /// Device type; validated.
    pub device_type: String,
    /// Version; validated.
    pub version: String,
    /// Free text.
    pub description: String,
    /// Forced-upgrade flag handed to devices.
    pub force_upgrade: bool,
    /// The signature that came with it, checked ([`crate::server::signatures`]).
    pub signature: Option<FirmwareSignature>,
}

/// The firmware catalogue over the store and the blob directory.
pub struct FirmwareService {
    store: Store,
    blobs: Blobs,
    signatures: Arc<Signatures>,
    lock: tokio::sync::Mutex<()>,
}

fn not_found(device_type: &str, version: &str) -> FirmwareError {
    FirmwareError::NotFound(format!(
        "firmware {version} for device type {device_type} does not exist"
    ))
}

/// Checks a (deviceType, version) pair from outside.
pub fn validate_key(device_type: &str, version: &str) -> Result<()> {
    if !ids::valid_device_type(device_type) {
        return Err(FirmwareError::Invalid(format!(
            "deviceType {device_type:?} must match [A-Za-z0-9_-]{{1,64}}"
        )));
    }
    if !ids::valid_version(version) {
        return Err(FirmwareError::Invalid(format!(
            "version {version:?} must match [0-9A-Za-z.+-]{{1,64}} (and not be \"latest\" or \"upload\")"
        )));
    }
    Ok(())
}

fn transition_allowed(from: FirmwareStatus, to: FirmwareStatus) -> bool {
    use FirmwareStatus::*;
    from == to
        || matches!(
            (from, to),
            (Draft | Testing, _) | (Released, Deprecated) | (Deprecated, Released)
        )
}

impl FirmwareService {
    /// A catalogue over `store` and `blobs`; releases follow `signatures`' policy.
    pub fn new(store: Store, blobs: Blobs, signatures: Arc<Signatures>) -> FirmwareService {
        FirmwareService {
            store,
            blobs,
            signatures,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The signature text a command to devices carries for this firmware, if it has one.
    pub fn signature_text(&self, device_type: &str, version: &str) -> Option<String> {
        self.store
            .get_firmware(device_type, version)
            .ok()
            .flatten()
            .and_then(|r| r.signature)
            .map(|s| s.text)
    }

    /// Whether (deviceType, version) is taken.
    pub fn exists(&self, device_type: &str, version: &str) -> Result<bool> {
        Ok(self.store.get_firmware(device_type, version)?.is_some())
    }

    /// Commits a staged blob as a new `draft` firmware: blob renamed into place and fsynced,
    /// record inserted and flushed. `Conflict` if the version exists for that device type.
    pub async fn create(
        &self,
        meta: NewFirmware,
        staged: StagedBlob,
    ) -> Result<Durable<FirmwareRecord>> {
        validate_key(&meta.device_type, &meta.version)?;
        if staged.size == 0 {
            return Err(FirmwareError::Invalid(
                "the file is empty: upload the firmware image in the `file` part".into(),
            ));
        }
        let _guard = self.lock.lock().await;
        if self.exists(&meta.device_type, &meta.version)? {
            return Err(FirmwareError::Conflict(format!(
                "firmware {} for device type {} already exists: upload under a new version or delete the old one first",
                meta.version, meta.device_type
            )));
        }
        let now = now_ms();
        let rec = FirmwareRecord {
            schema: FIRMWARE_SCHEMA,
            device_type: meta.device_type,
            version: meta.version,
            sha256: staged.sha256.clone(),
            md5: staged.md5.clone(),
            size: staged.size,
            description: meta.description,
            status: FirmwareStatus::Draft,
            force_upgrade: meta.force_upgrade,
            release_date_ms: None,
            created_at_ms: now,
            updated_at_ms: now,
            signature: meta.signature,
        };
        let blobs = self.blobs.clone();
        tokio::task::spawn_blocking(move || blobs.commit(staged))
            .await
            .map_err(|e| std::io::Error::other(format!("blob commit task: {e}")))?
            .map_err(|e| self.io_failed(e))?;
        self.store.insert_firmware(&rec)?;
        Ok(self.store.durable(rec).await?)
    }

    /// A blob write failed: a full disk is the store's [`StoreError::DiskFull`].
    fn io_failed(&self, e: std::io::Error) -> FirmwareError {
        if crate::server::store::is_disk_full(&e) {
            FirmwareError::Store(StoreError::DiskFull {
                free_bytes: self.store.free_bytes().unwrap_or(0),
            })
        } else {
            FirmwareError::Io(e)
        }
    }

    /// One firmware.
    pub fn get(&self, device_type: &str, version: &str) -> Result<FirmwareRecord> {
        validate_key(device_type, version)?;
        self.store
            .get_firmware(device_type, version)?
            .ok_or_else(|| not_found(device_type, version))
    }

    /// Firmware matching the filters, newest upload first.
    pub fn list(
        &self,
        device_type: Option<&str>,
        status: Option<FirmwareStatus>,
    ) -> Result<Vec<FirmwareRecord>> {
        let mut all: Vec<_> = self
            .store
            .list_firmware()?
            .into_iter()
            .filter(|r| device_type.is_none_or(|t| r.device_type == t))
            .filter(|r| status.is_none_or(|s| r.status == s))
            .collect();
        all.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| ids::compare_versions(&b.version, &a.version))
        });
        Ok(all)
    }

    /// The newest `released` firmware of a device type, by version order (not upload order).
    pub fn latest(&self, device_type: &str) -> Result<FirmwareRecord> {
        if !ids::valid_device_type(device_type) {
            return Err(FirmwareError::Invalid(format!(
                "deviceType {device_type:?} must match [A-Za-z0-9_-]{{1,64}}"
            )));
        }
        self.list(Some(device_type), Some(FirmwareStatus::Released))?
            .into_iter()
            .max_by(|a, b| ids::compare_versions(&a.version, &b.version))
            .ok_or_else(|| {
                FirmwareError::NotFound(format!(
                    "no released firmware for device type {device_type}"
                ))
            })
    }

    /// Holds this service's write lock (backups take a consistent snapshot under it).
    pub async fn quiesce(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Changes the status. Allowed: draft/testing to anything, released -> deprecated,
    /// deprecated -> released; the first release sets `releaseDate`.
    pub async fn set_status(
        &self,
        device_type: &str,
        version: &str,
        status: FirmwareStatus,
    ) -> Result<Durable<FirmwareRecord>> {
        validate_key(device_type, version)?;
        let _guard = self.lock.lock().await;
        let old = self.get(device_type, version)?;
        if !transition_allowed(old.status, status) {
            return Err(FirmwareError::Conflict(format!(
                "firmware {version} is {}: a released or deprecated firmware can only move between released and deprecated",
                old.status.as_str()
            )));
        }
        if old.status == status {
            return Ok(self.store.durable(old).await?);
        }
        if status == FirmwareStatus::Released
            && let Some(why) = self.signatures.release_refusal(&old)
        {
            return Err(FirmwareError::Conflict(why));
        }
        let now = now_ms();
        let mut new = old.clone();
        new.status = status;
        new.updated_at_ms = now;
        if status == FirmwareStatus::Released && new.release_date_ms.is_none() {
            new.release_date_ms = Some(now);
        }
        self.store.update_firmware(&old, &new)?;
        Ok(self.store.durable(new).await?)
    }

    /// Deletes a firmware and, if no other firmware shares its content, its blob.
    pub async fn delete(
        &self,
        device_type: &str,
        version: &str,
    ) -> Result<Durable<FirmwareRecord>> {
        validate_key(device_type, version)?;
        let _guard = self.lock.lock().await;
        let users = self.store.active_tasks_for(device_type, version)?;
        if !users.is_empty() {
            return Err(FirmwareError::Conflict(format!(
                "firmware {version} is the target of {} active task(s) (e.g. device {}): cancel them first",
                users.len(),
                users[0].device_id
            )));
        }
        let rec = self
            .store
            .delete_firmware(device_type, version)?
            .ok_or_else(|| not_found(device_type, version))?;
        let rec = self.store.durable(rec).await?;
        if !self.store.referenced_blobs()?.contains(&rec.sha256) {
            let blobs = self.blobs.clone();
            let sha = rec.sha256.clone();
            tokio::task::spawn_blocking(move || blobs.remove(&sha))
                .await
                .map_err(|e| std::io::Error::other(format!("blob remove task: {e}")))??;
        }
        Ok(rec)
    }

    /// Where the image of `rec` lives.
    pub fn blob_path(&self, rec: &FirmwareRecord) -> Result<PathBuf> {
        self.blobs.path(&rec.sha256).ok_or_else(|| {
            FirmwareError::Io(std::io::Error::other(format!(
                "record {}/{} has an invalid sha256",
                rec.device_type, rec.version
            )))
        })
    }

    /// The blob directory (for staging uploads).
    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FirmwareStatus::*;

    #[test]
    fn transitions() {
        for to in [Draft, Testing, Released, Deprecated] {
            assert!(transition_allowed(Draft, to));
            assert!(transition_allowed(Testing, to));
        }
        assert!(transition_allowed(Released, Deprecated));
        assert!(transition_allowed(Deprecated, Released));
        assert!(!transition_allowed(Released, Draft));
        assert!(!transition_allowed(Deprecated, Testing));
    }
}
