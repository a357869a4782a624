//! Trusted keys added by bundles, imported bundles and each signer's last sequence number.
//! A bundle's records go in with one sled transaction: after a crash all of them are there or
//! none is.

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{
    BundleRecord, DeltaRecord, FirmwareRecord, Result, Store, StoreError, TrustKeyRecord, decode,
    decode_firmware, delta_key, encode, firmware_key,
};
use crate::server::events::Change;

/// Everything one bundle adds, written at once by [`Store::commit_bundle`].
#[derive(Debug, Clone)]
pub struct BundleCommit {
    /// New firmware records (their blobs are already in place).
    pub firmware: Vec<FirmwareRecord>,
    /// New ready deltas (blobs in place).
    pub deltas: Vec<DeltaRecord>,
    /// New trusted keys.
    pub keys: Vec<TrustKeyRecord>,
    /// The bundle itself.
    pub bundle: BundleRecord,
    /// Accept a sequence number not above the signer's last one.
    pub allow_older: bool,
}

impl Store {
    /// Keys added by bundles, by name.
    pub fn list_trust_keys(&self) -> Result<Vec<TrustKeyRecord>> {
        self.with(|e| {
            e.trust_keys
                .iter()
                .map(|kv| {
                    let (k, v) = kv?;
                    decode(&k, &v)
                })
                .collect()
        })
    }

    /// An imported bundle.
    pub fn get_bundle(&self, id: &str) -> Result<Option<BundleRecord>> {
        self.with(|e| {
            e.bundles
                .get(id.as_bytes())?
                .map(|v| decode(id.as_bytes(), &v))
                .transpose()
        })
    }

    /// Every imported bundle.
    pub fn list_bundles(&self) -> Result<Vec<BundleRecord>> {
        self.with(|e| {
            e.bundles
                .iter()
                .map(|kv| {
                    let (k, v) = kv?;
                    decode(&k, &v)
                })
                .collect()
        })
    }

    /// Replaces a bundle record (its campaigns got created).
    pub fn put_bundle(&self, rec: &BundleRecord) -> Result<()> {
        self.with(|e| {
            e.bundles.insert(rec.id.as_bytes(), encode(rec))?;
            Ok(())
        })
    }

    /// The highest sequence number imported from the key `key_id`.
    pub fn last_sequence(&self, key_id: &str) -> Result<Option<u64>> {
        self.with(|e| Ok(e.sequences.get(key_id.as_bytes())?.map(|v| seq_of(&v))))
    }

    /// Writes a bundle's records in one transaction. `Conflict` if a firmware of the same
    /// device type and version exists with other content, if the bundle id was imported
    /// already, or if the sequence is not above the signer's last (unless `allow_older`).
    /// A firmware already there with the same content is left as it is.
    pub fn commit_bundle(&self, c: &BundleCommit) -> Result<()> {
        self.with(|e| {
            let trees = (
                &e.firmware,
                &e.deltas,
                &e.trust_keys,
                &e.bundles,
                &e.sequences,
            );
            trees
                .transaction(|(fw, deltas, keys, bundles, seqs)| {
                    let abort = |m: String| ConflictableTransactionError::Abort(m);
                    let b = &c.bundle;
                    if bundles.get(b.id.as_bytes())?.is_some() {
                        return Err(abort(format!("bundle {} was imported already", b.id)));
                    }
                    if let Some(last) = seqs.get(b.key_id.as_bytes())?.map(|v| seq_of(&v))
                        && last >= b.sequence
                        && !c.allow_older
                    {
                        return Err(abort(format!(
                            "bundle {} has sequence {} from {}, not above the last imported ({last}): an older or replayed bundle (import it anyway with allowOlder)",
                            b.id, b.sequence, b.signer
                        )));
                    }
                    for r in &c.firmware {
                        let key = firmware_key(&r.device_type, &r.version);
                        if let Some(old) = fw.get(&key)? {
                            let old = decode_firmware(&key, &old).map_err(|e| abort(e.to_string()))?;
                            if old.sha256 != r.sha256 {
                                return Err(abort(format!(
                                    "firmware {} for device type {} exists with other content (sha256 {}, the bundle has {})",
                                    r.version, r.device_type, old.sha256, r.sha256
                                )));
                            }
                            continue;
                        }
                        fw.insert(key, encode(r))?;
                    }
                    for d in &c.deltas {
                        deltas.insert(
                            delta_key(&d.device_type, &d.to_version, &d.from_version),
                            encode(d),
                        )?;
                    }
                    for k in &c.keys {
                        keys.insert(k.name.as_bytes(), encode(k))?;
                    }
                    bundles.insert(b.id.as_bytes(), encode(b))?;
                    let next = match seqs.get(b.key_id.as_bytes())?.map(|v| seq_of(&v)) {
                        Some(last) => last.max(b.sequence),
                        None => b.sequence,
                    };
                    seqs.insert(b.key_id.as_bytes(), &next.to_be_bytes())?;
                    Ok(())
                })
                .map_err(|e| match e {
                    TransactionError::Abort(m) => StoreError::Conflict(m),
                    TransactionError::Storage(e) => StoreError::from(e),
                })
        })?;
        self.events.publish_with(|| Change::Firmware);
        if !c.deltas.is_empty() {
            self.events.publish_with(|| Change::Delta);
        }
        Ok(())
    }
}

fn seq_of(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}
