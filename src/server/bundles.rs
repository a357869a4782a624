//! Importing an offline bundle ([`crate::bundle`]): all or nothing.
//!
//! 1. On the blocking pool, from the request body as it streams: the manifest and its
//!    signature are read first and checked against the trusted keys before anything is
//!    written; the bundle id (already imported: nothing to do) and the signer's sequence number
//!    (not above the last one: an older or replayed bundle) are checked; then every item is
//!    streamed into `tmp/`, hashed, and for firmware checked against its own signature, in one
//!    pass, in bounded memory.
//! 2. Nothing is visible yet. Conflicts with what the site holds are checked, the staged
//!    files are renamed into the blob directory (a crash from here on leaves only orphan blobs,
//!    collected at the next start), and every record — firmware, deltas, trusted keys, the
//!    bundle and the signer's sequence — goes into the store in one transaction, flushed
//!    before the answer.
//! 3. The carried campaign plans are created paused (or scheduled, with `startAt`); the
//!    bundle record keeps those not yet created, so a crash in between is finished at the
//!    next start.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;

use crate::bundle::{self, BundleError, Manifest};
use crate::server::blobs::{Blobs, StagedBlob};
use crate::server::campaigns::{CampaignSpec, Campaigns};
use crate::server::error::ServiceError;
use crate::server::signatures::Signatures;
use crate::server::store::{
    BundleCommit, BundleRecord, DELTA_SCHEMA, DeltaRecord, DeltaStatus, FIRMWARE_SCHEMA,
    FirmwareRecord, FirmwareStatus, SignatureStatus, Store, TRUST_SCHEMA, TrustKeyRecord,
};
use crate::time::now_ms;
use crate::trust::{Keyring, Signature, TrustedKey};

/// Turns a carried campaign plan (the API's campaign body) into a spec; the HTTP layer owns
/// that wire format and hands its parser in.
pub type PlanParser = fn(&serde_json::Value) -> Result<CampaignSpec, String>;

/// What an import did.
#[derive(Debug, Clone, Default)]
pub struct Imported {
    /// The bundle id.
    pub id: String,
    /// The signing key's name.
    pub signer: String,
    /// Its sequence number.
    pub sequence: u64,
    /// False when the bundle had been imported before (nothing was changed).
    pub new: bool,
    /// `deviceType/version` of each firmware added.
    pub firmware: Vec<String>,
    /// Those already there with the same content.
    pub unchanged: Vec<String>,
    /// `deviceType/from->to` of each delta added.
    pub deltas: Vec<String>,
    /// Names of keys now trusted.
    pub keys: Vec<String>,
    /// Ids of campaigns created.
    pub campaigns: Vec<String>,
    /// Things the operator should know (nothing here blocks the import).
    pub warnings: Vec<String>,
}

/// The import service.
pub struct Bundles {
    store: Store,
    blobs: Blobs,
    signatures: Arc<Signatures>,
    campaigns: Arc<Campaigns>,
    parse_plan: PlanParser,
    lock: tokio::sync::Mutex<()>,
}

/// What each (device type, version) hashes to.
type ShaOf = HashMap<(String, String), String>;
/// A staged image: its index in the manifest, its file, its signature's verdict.
type StagedFirmware = (usize, StagedBlob, crate::server::store::FirmwareSignature);
/// A staged patch: its index in the manifest and its file.
type StagedDelta = (usize, StagedBlob);

/// What phase 1 leaves for phase 2.
struct Staged {
    manifest: Manifest,
    manifest_sha256: String,
    signer: TrustedKey,
    firmware: Vec<StagedFirmware>,
    deltas: Vec<StagedDelta>,
    plans: Vec<CampaignSpec>,
}

enum Phase1 {
    Staged(Box<Staged>),
    Known(Box<BundleRecord>),
}

fn unverified(m: impl Into<String>) -> ServiceError {
    ServiceError::Unverified(m.into())
}

fn from_bundle(e: BundleError) -> ServiceError {
    match e {
        BundleError::Malformed(m) => ServiceError::Invalid(m),
        BundleError::Unverified(m) => ServiceError::Unverified(m),
        BundleError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ServiceError::Invalid("the bundle is truncated inside an entry".into())
        }
        BundleError::Io(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
            ServiceError::TooLarge(e.to_string())
        }
        BundleError::Io(e) => ServiceError::Invalid(format!("reading the bundle: {e}")),
    }
}

impl Bundles {
    /// The service over the store and blobs; campaigns it carries go to `campaigns`.
    pub fn new(
        store: Store,
        blobs: Blobs,
        signatures: Arc<Signatures>,
        campaigns: Arc<Campaigns>,
        parse_plan: PlanParser,
    ) -> Bundles {
        Bundles {
            store,
            blobs,
            signatures,
            campaigns,
            parse_plan,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Imports the bundle `body` yields (a blocking reader: call from the blocking pool's
    /// side through [`Bundles::import`]).
    pub async fn import(
        self: &Arc<Self>,
        body: Box<dyn Read + Send>,
        allow_older: bool,
    ) -> Result<Imported, ServiceError> {
        let _g = self.lock.lock().await;
        let me = self.clone();
        let phase1 = tokio::task::spawn_blocking(move || me.stage(body, allow_older))
            .await
            .map_err(|e| ServiceError::Io(std::io::Error::other(format!("import task: {e}"))))??;
        let staged = match phase1 {
            Phase1::Known(b) => {
                // the same bundle again: finish what a crash may have left, change nothing else
                let b = *b;
                let (created, warnings) = self.finish_campaigns(b.clone()).await?;
                return Ok(Imported {
                    id: b.id,
                    signer: b.signer,
                    sequence: b.sequence,
                    new: false,
                    campaigns: created,
                    warnings,
                    ..Default::default()
                });
            }
            Phase1::Staged(s) => *s,
        };
        self.commit(staged, allow_older).await
    }

    /// Phase 1 (blocking): verify the manifest, stream and check every item into `tmp/`.
    fn stage(&self, body: Box<dyn Read + Send>, allow_older: bool) -> Result<Phase1, ServiceError> {
        let mut tar = bundle::TarReader::new(body);
        let manifest_bytes =
            bundle::read_small(&mut tar, bundle::MANIFEST, bundle::MAX_MANIFEST_BYTES)
                .map_err(from_bundle)?;
        let sig_bytes = bundle::read_small(
            &mut tar,
            bundle::MANIFEST_SIG,
            crate::trust::MAX_SIGNATURE_BYTES as u64,
        )
        .map_err(from_bundle)?;
        let sig_text = String::from_utf8(sig_bytes)
            .map_err(|_| unverified("the manifest signature is not text"))?;
        let ring = self.signatures.keyring();
        let (signer, manifest) =
            bundle::verify_manifest(&ring, &manifest_bytes, &sig_text).map_err(from_bundle)?;
        let signer = signer.clone();
        let manifest_sha256 = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&manifest_bytes))
        };
        if let Some(known) = self.store.get_bundle(&manifest.id)? {
            if known.manifest_sha256 != manifest_sha256 {
                return Err(ServiceError::Conflict(format!(
                    "a different bundle with id {} was imported before",
                    manifest.id
                )));
            }
            drain(&mut tar)?;
            return Ok(Phase1::Known(Box::new(known)));
        }
        if let Some(last) = self.store.last_sequence(&signer.key_id)?
            && last >= manifest.sequence
            && !allow_older
        {
            return Err(ServiceError::Conflict(format!(
                "bundle {} has sequence {} from {}, not above the last one imported from that key ({last}): an older or replayed bundle (import it anyway with allowOlder=true)",
                manifest.id, manifest.sequence, signer.name
            )));
        }
        // the keys a firmware may be signed by: the site's and those this bundle adds
        let mut fw_ring: Keyring = (*ring).clone();
        for t in &manifest.trust {
            let key = TrustedKey::parse(&t.name, &t.key)
                .map_err(|e| ServiceError::Invalid(format!("trust change {}: {e}", t.name)))?;
            // a name the config uses means the config's key: a bundle cannot put another key
            // under it (it would be stored and silently never used)
            if let Some(mine) = self.signatures.configured(&t.name)
                && mine.key_id != key.key_id
            {
                return Err(ServiceError::Conflict(format!(
                    "the bundle trusts key {} under the name {:?}, which [trust] keys in the configuration already gives to key {}: rename one of them",
                    key.key_id, t.name, mine.key_id
                )));
            }
            fw_ring.add(key);
        }
        let plans = manifest
            .campaigns
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = (self.parse_plan)(v)
                    .map_err(|e| ServiceError::Invalid(format!("campaign plan {}: {e}", i + 1)))?;
                Campaigns::validate_spec_only(&s).map_err(|e| {
                    ServiceError::Invalid(format!("campaign plan {} ({}): {e}", i + 1, s.name))
                })?;
                Ok(s)
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;

        let (firmware, deltas) = self.stage_items(&mut tar, &manifest, &fw_ring)?;
        Ok(Phase1::Staged(Box::new(Staged {
            manifest,
            manifest_sha256,
            signer,
            firmware,
            deltas,
            plans,
        })))
    }

    /// Streams every item after the manifest into `tmp/`, each checked against the manifest
    /// (name, size, sha256) and each image against its own signature by `fw_ring`.
    fn stage_items<R: Read>(
        &self,
        tar: &mut bundle::TarReader<R>,
        manifest: &Manifest,
        fw_ring: &Keyring,
    ) -> Result<(Vec<StagedFirmware>, Vec<StagedDelta>), ServiceError> {
        let index: HashMap<&str, (bool, usize)> = manifest
            .firmware
            .iter()
            .enumerate()
            .map(|(i, f)| (f.path.as_str(), (true, i)))
            .chain(
                manifest
                    .deltas
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (d.path.as_str(), (false, i))),
            )
            .collect();
        let mut seen = HashSet::new();
        let mut firmware = Vec::new();
        let mut deltas = Vec::new();
        while let Some(h) = tar.next_entry().map_err(from_bundle)? {
            let Some(&(is_fw, i)) = index.get(h.name.as_str()) else {
                return Err(ServiceError::Invalid(format!(
                    "tar entry {:?} is not listed in the manifest",
                    h.name
                )));
            };
            if !seen.insert(h.name.clone()) {
                return Err(ServiceError::Invalid(format!(
                    "tar entry {:?} appears twice",
                    h.name
                )));
            }
            let want = manifest.size_of(&h.name).expect("listed");
            if h.size != want {
                return Err(ServiceError::Invalid(format!(
                    "tar entry {:?} is {} bytes; the manifest says {want}",
                    h.name, h.size
                )));
            }
            if is_fw {
                let f = &manifest.firmware[i];
                let sig = Signature::parse(&f.signature)
                    .map_err(|e| unverified(format!("firmware {}: {e}", f.version)))?;
                let key = fw_ring.signer_of(&sig).map_err(|e| {
                    unverified(format!("firmware {} for {}: {e}", f.version, f.device_type))
                })?;
                let staged = self.stage_entry(tar, want, Some((key, &sig)))?;
                check_hash(&h.name, &staged, &f.sha256)?;
                if let Some(Err(e)) = &staged.signature_check {
                    return Err(unverified(format!(
                        "firmware {} for {}: {e}",
                        f.version, f.device_type
                    )));
                }
                crate::trust::check_firmware_comment(
                    sig.trusted_comment(),
                    &f.device_type,
                    &f.version,
                    &staged.sha256,
                )
                .map_err(|e| unverified(format!("firmware {}: {e}", f.version)))?;
                let verdict = crate::server::store::FirmwareSignature {
                    text: f.signature.clone(),
                    key_id: sig.key_id.clone(),
                    signer: Some(key.name.clone()),
                    status: SignatureStatus::Valid,
                    reason: String::new(),
                };
                firmware.push((i, staged, verdict));
            } else {
                let staged = self.stage_entry(tar, want, None)?;
                check_hash(&h.name, &staged, &manifest.deltas[i].sha256)?;
                deltas.push((i, staged));
            }
        }
        if let Some(missing) = manifest
            .entry_names()
            .into_iter()
            .find(|n| !seen.contains(*n))
        {
            return Err(ServiceError::Invalid(format!(
                "the manifest lists {missing}, which the bundle does not hold"
            )));
        }
        Ok((firmware, deltas))
    }

    fn stage_entry<R: Read>(
        &self,
        tar: &mut bundle::TarReader<R>,
        size: u64,
        check: Option<(&TrustedKey, &Signature)>,
    ) -> Result<StagedBlob, ServiceError> {
        let mut data = tar.entry();
        self.blobs
            .stage_reader(&mut data, size, check)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    ServiceError::Invalid("the bundle is truncated inside an entry".into())
                }
                _ if crate::server::store::is_disk_full(&e) => {
                    ServiceError::Store(crate::server::store::StoreError::DiskFull {
                        free_bytes: self.store.free_bytes().unwrap_or(0),
                    })
                }
                _ => ServiceError::Io(e),
            })
    }

    /// Phase 2: conflicts, blobs into place, one store transaction, then the campaigns.
    async fn commit(&self, s: Staged, allow_older: bool) -> Result<Imported, ServiceError> {
        let m = &s.manifest;
        let now = now_ms();
        let mut out = Imported {
            id: m.id.clone(),
            signer: s.signer.name.clone(),
            sequence: m.sequence,
            new: true,
            ..Default::default()
        };
        let (records, sha_of) = self.firmware_records(&s, now, &mut out)?;
        self.check_plans(&s.plans, &sha_of)?;
        let delta_records = self.delta_records(&s, &sha_of, now, &mut out)?;
        let keys = key_records(&s, now);
        out.keys = keys.iter().map(|k| k.name.clone()).collect();
        let bundle = BundleRecord {
            schema: TRUST_SCHEMA,
            id: m.id.clone(),
            manifest_sha256: s.manifest_sha256.clone(),
            signer: s.signer.name.clone(),
            key_id: s.signer.key_id.clone(),
            sequence: m.sequence,
            imported_at_ms: now,
            firmware: out.firmware.clone(),
            deltas: out.deltas.clone(),
            keys: out.keys.clone(),
            campaigns_pending: m.campaigns.iter().map(|v| v.to_string()).collect(),
            campaigns: Vec::new(),
        };
        // blobs into place: invisible until the records below exist
        let blobs = self.blobs.clone();
        let staged: Vec<StagedBlob> = s
            .firmware
            .into_iter()
            .map(|(_, b, _)| b)
            .chain(s.deltas.into_iter().map(|(_, b)| b))
            .collect();
        tokio::task::spawn_blocking(move || {
            for b in staged {
                blobs.commit(b)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| ServiceError::Io(std::io::Error::other(format!("blob commit task: {e}"))))??;
        self.store.commit_bundle(&BundleCommit {
            firmware: records,
            deltas: delta_records,
            keys,
            bundle: bundle.clone(),
            allow_older,
        })?;
        self.store.durable(()).await?.into_inner();
        if !m.trust.is_empty() {
            self.signatures.reload()?;
        }
        tracing::info!(bundle = %m.id, signer = %s.signer.name, sequence = m.sequence, firmware = out.firmware.len(), deltas = out.deltas.len(), keys = out.keys.len(), "bundle imported");
        let (created, warnings) = self.finish_campaigns(bundle).await?;
        out.campaigns = created;
        out.warnings.extend(warnings);
        Ok(out)
    }

    /// The firmware records a bundle adds, checking what the site holds of each (type,
    /// version); and what each (type, version) will hash to once imported: the site's or the
    /// bundle's.
    fn firmware_records(
        &self,
        s: &Staged,
        now: i64,
        out: &mut Imported,
    ) -> Result<(Vec<FirmwareRecord>, ShaOf), ServiceError> {
        let m = &s.manifest;
        let mut sha_of = ShaOf::new();
        let mut records = Vec::new();
        let released: HashSet<(String, String)> = s
            .plans
            .iter()
            .map(|p| (p.device_type.clone(), p.version.clone()))
            .collect();
        for (i, staged, verdict) in &s.firmware {
            let f = &m.firmware[*i];
            let key = (f.device_type.clone(), f.version.clone());
            if let Some(old) = self.store.get_firmware(&f.device_type, &f.version)? {
                if old.sha256 != staged.sha256 {
                    return Err(ServiceError::Conflict(format!(
                        "firmware {} for device type {} exists here with other content (sha256 {}; the bundle's is {}): nothing was imported",
                        f.version, f.device_type, old.sha256, staged.sha256
                    )));
                }
                out.unchanged
                    .push(format!("{}/{}", f.device_type, f.version));
                sha_of.insert(key, old.sha256);
                continue;
            }
            sha_of.insert(key.clone(), staged.sha256.clone());
            let release = released.contains(&key);
            records.push(FirmwareRecord {
                schema: FIRMWARE_SCHEMA,
                device_type: f.device_type.clone(),
                version: f.version.clone(),
                sha256: staged.sha256.clone(),
                md5: staged.md5.clone(),
                size: staged.size,
                description: f.description.clone(),
                status: if release {
                    FirmwareStatus::Released
                } else {
                    FirmwareStatus::Draft
                },
                force_upgrade: false,
                release_date_ms: release.then_some(now),
                created_at_ms: now,
                updated_at_ms: now,
                signature: Some(verdict.clone()),
            });
            out.firmware
                .push(format!("{}/{}", f.device_type, f.version));
        }
        Ok((records, sha_of))
    }

    /// Every carried plan targets a firmware of the bundle or one released here.
    fn check_plans(&self, plans: &[CampaignSpec], sha_of: &ShaOf) -> Result<(), ServiceError> {
        for p in plans {
            let key = (p.device_type.clone(), p.version.clone());
            if !sha_of.contains_key(&key) {
                match self.store.get_firmware(&p.device_type, &p.version)? {
                    Some(f) if f.status == FirmwareStatus::Released => {}
                    _ => {
                        return Err(ServiceError::Invalid(format!(
                            "campaign plan {:?} targets {} {}, which is neither in the bundle nor released here",
                            p.name, p.device_type, p.version
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The delta records a bundle adds: each makes a known image from the site's own.
    fn delta_records(
        &self,
        s: &Staged,
        sha_of: &ShaOf,
        now: i64,
        out: &mut Imported,
    ) -> Result<Vec<DeltaRecord>, ServiceError> {
        let m = &s.manifest;
        let site_sha = |t: &str, v: &str| -> Result<Option<String>, ServiceError> {
            if let Some(s) = sha_of.get(&(t.to_string(), v.to_string())) {
                return Ok(Some(s.clone()));
            }
            Ok(self.store.get_firmware(t, v)?.map(|f| f.sha256))
        };
        let mut delta_records = Vec::new();
        for (i, staged) in &s.deltas {
            let d = &m.deltas[*i];
            let name = format!("{}/{}->{}", d.device_type, d.from_version, d.to_version);
            let to = site_sha(&d.device_type, &d.to_version)?;
            if to.as_deref() != Some(d.to_sha256.as_str()) {
                return Err(ServiceError::Invalid(format!(
                    "delta {name} makes an image that is neither in the bundle nor here (sha256 {})",
                    d.to_sha256
                )));
            }
            match site_sha(&d.device_type, &d.from_version)? {
                Some(from) if from != d.from_sha256 => {
                    return Err(ServiceError::Conflict(format!(
                        "delta {name} applies to another {} than this site's (sha256 {}, here {from}): nothing was imported",
                        d.from_version, d.from_sha256
                    )));
                }
                None => out.warnings.push(format!(
                    "delta {name}: version {} is not here; the patch waits for it",
                    d.from_version
                )),
                Some(_) => {}
            }
            let full_size = m
                .firmware
                .iter()
                .find(|f| f.device_type == d.device_type && f.version == d.to_version)
                .map(|f| f.size)
                .or_else(|| {
                    self.store
                        .get_firmware(&d.device_type, &d.to_version)
                        .ok()
                        .flatten()
                        .map(|f| f.size)
                })
                .unwrap_or(0);
            delta_records.push(DeltaRecord {
                schema: DELTA_SCHEMA,
                device_type: d.device_type.clone(),
                from_version: d.from_version.clone(),
                to_version: d.to_version.clone(),
                from_sha256: d.from_sha256.clone(),
                to_sha256: d.to_sha256.clone(),
                status: DeltaStatus::Ready,
                sha256: Some(staged.sha256.clone()),
                md5: Some(staged.md5.clone()),
                size: Some(staged.size),
                full_size,
                error: None,
                build_ms: None,
                created_at_ms: now,
                updated_at_ms: now,
            });
            out.deltas.push(name);
        }
        Ok(delta_records)
    }

    /// Creates the campaigns a bundle carries that are not created yet; returns their ids
    /// and, for a plan that cannot be created now (no device matches it yet, say), why: that
    /// plan stays with the bundle, and importing the bundle again (or the next start) retries.
    async fn finish_campaigns(
        &self,
        mut b: BundleRecord,
    ) -> Result<(Vec<String>, Vec<String>), ServiceError> {
        let mut created = Vec::new();
        let mut warnings = Vec::new();
        let mut left = Vec::new();
        for text in std::mem::take(&mut b.campaigns_pending) {
            let made = match serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| e.to_string())
                .and_then(|v| (self.parse_plan)(&v))
            {
                Err(e) => Err(ServiceError::Invalid(e)),
                Ok(spec) => self
                    .campaigns
                    .create_held(
                        &spec,
                        format!("imported with bundle {}: start it when ready", b.id),
                    )
                    .await
                    .map(|d| d.into_inner().0.id),
            };
            match made {
                Ok(id) => {
                    b.campaigns.push(id.clone());
                    created.push(id);
                }
                Err(e @ (ServiceError::Store(_) | ServiceError::Io(_))) => return Err(e),
                Err(e) => {
                    warnings.push(format!(
                        "a campaign plan of bundle {} was not created: {e}; import the bundle again to retry",
                        b.id
                    ));
                    left.push(text);
                }
            }
        }
        b.campaigns_pending = left;
        self.store.put_bundle(&b)?;
        self.store.durable(()).await?.into_inner();
        Ok((created, warnings))
    }

    /// At start: creates the campaigns of bundles whose import was cut off after its commit.
    pub async fn resume(&self) -> Result<(), ServiceError> {
        for b in self.store.list_bundles()? {
            if !b.campaigns_pending.is_empty() {
                let id = b.id.clone();
                let (n, warnings) = self.finish_campaigns(b).await?;
                tracing::info!(bundle = %id, campaigns = n.len(), "created the campaigns of an import that was cut off");
                for w in warnings {
                    tracing::warn!(bundle = %id, "{w}");
                }
            }
        }
        Ok(())
    }
}

/// The keys a bundle adds to the site's trust.
fn key_records(s: &Staged, now: i64) -> Vec<TrustKeyRecord> {
    let m = &s.manifest;
    m.trust
        .iter()
        .map(|t| {
            let k = TrustedKey::parse(&t.name, &t.key).expect("validated");
            TrustKeyRecord {
                schema: TRUST_SCHEMA,
                name: t.name.clone(),
                key: k.base64,
                key_id: k.key_id,
                bundle_id: m.id.clone(),
                signed_by: s.signer.name.clone(),
                added_at_ms: now,
            }
        })
        .collect()
}

fn check_hash(name: &str, staged: &StagedBlob, want: &str) -> Result<(), ServiceError> {
    if !staged.sha256.eq_ignore_ascii_case(want) {
        return Err(unverified(format!(
            "{name} does not match the manifest (sha256 {}, listed {want}): the bundle was altered or damaged",
            staged.sha256
        )));
    }
    Ok(())
}

/// Reads the rest of a tar (a bundle imported before), checking only its framing.
fn drain<R: Read>(tar: &mut bundle::TarReader<R>) -> Result<(), ServiceError> {
    while tar.next_entry().map_err(from_bundle)?.is_some() {}
    Ok(())
}
