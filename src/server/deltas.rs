//! Delta packages (SPEC 6): BSDIFF40 patches between released versions of one device type,
//! computed eagerly in the background when a firmware is released (from every older released
//! version that registered devices report running) and on request. A bounded queue feeds
//! `delta.workers` workers; each computation runs on the blocking pool with `delta.threads`
//! search threads and is refused when its estimated peak memory exceeds
//! `delta.max_memory_bytes`. Every patch is re-applied and checked against the target's sha256
//! before it is stored (a content-addressed blob, fsynced like firmware); one not smaller than
//! `delta.max_ratio` of the image is recorded as `skipped` and never offered. A stored patch is
//! re-hashed before it is served (cached per file size and mtime); a corrupt one is withdrawn and
//! rebuilt, and devices fall back to the full image meanwhile.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::DeltaConfig;
use crate::ids;
use crate::server::blobs::Blobs;
use crate::server::firmware::FirmwareService;
use crate::server::store::{
    DELTA_SCHEMA, DeltaRecord, DeltaStatus, FirmwareRecord, FirmwareStatus, Store, StoreError,
};
use crate::time::now_ms;

/// Why a delta request failed: the one service error ([`crate::server::error::ServiceError`]).
pub type DeltaError = crate::server::error::ServiceError;

type Job = (String, String, String); // (deviceType, from, to)

/// Counters for statistics and metrics.
#[derive(Debug, Default)]
pub struct DeltaCounters {
    /// Patches built (ready).
    pub built: AtomicU64,
    /// Patches skipped as not worth it.
    pub skipped: AtomicU64,
    /// Failures.
    pub failed: AtomicU64,
    /// Milliseconds spent building.
    pub build_ms: AtomicU64,
    /// Jobs waiting.
    pub queued: AtomicU64,
}

/// The delta service.
pub struct Deltas {
    store: Store,
    blobs: Blobs,
    firmware: Arc<FirmwareService>,
    settings: DeltaConfig,
    tx: mpsc::Sender<Job>,
    rx: Mutex<Option<mpsc::Receiver<Job>>>,
    verified: Mutex<HashMap<String, (u64, SystemTime)>>,
    /// Counters.
    pub counters: DeltaCounters,
}

/// The download file name of a delta: `{deviceType}_v{from}_to_v{to}.bsdiff`.
pub fn file_name(device_type: &str, from: &str, to: &str) -> String {
    format!("{device_type}_v{from}_to_v{to}.bsdiff")
}

/// Parses a delta file name back into (deviceType, from, to). Versions cannot contain `_`, so
/// the last `_to_v` and the `_v` before it are unambiguous.
pub fn parse_file_name(name: &str) -> Option<(&str, &str, &str)> {
    let stem = name.strip_suffix(".bsdiff")?;
    let (left, to) = stem.rsplit_once("_to_v")?;
    let (dt, from) = left.rsplit_once("_v")?;
    (ids::valid_device_type(dt) && ids::valid_version(from) && ids::valid_version(to))
        .then_some((dt, from, to))
}

/// The URL path of a delta.
pub fn url_path(d: &DeltaRecord) -> String {
    format!(
        "/firmware/deltas/{}",
        file_name(&d.device_type, &d.from_version, &d.to_version)
    )
}

fn was_released(f: &FirmwareRecord) -> bool {
    f.status == FirmwareStatus::Released
        || (f.status == FirmwareStatus::Deprecated && f.release_date_ms.is_some())
}

impl Deltas {
    /// Creates the service; call [`Deltas::spawn`] to start its workers.
    pub fn new(
        store: Store,
        blobs: Blobs,
        firmware: Arc<FirmwareService>,
        settings: DeltaConfig,
    ) -> Arc<Deltas> {
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        Arc::new(Deltas {
            store,
            blobs,
            firmware,
            settings,
            tx,
            rx: Mutex::new(Some(rx)),
            verified: Mutex::new(HashMap::new()),
            counters: DeltaCounters::default(),
        })
    }

    /// Starts the workers and re-queues what a previous run left queued or building.
    pub fn spawn(
        self: &Arc<Self>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), StoreError> {
        let mut rx = self
            .rx
            .lock()
            .expect("poisoned")
            .take()
            .expect("spawned once");
        self.requeue_unfinished()?;
        let me = self.clone();
        let sem = Arc::new(Semaphore::new(self.settings.workers.max(1)));
        let t2 = tracker.clone();
        tracker.spawn(async move {
            loop {
                let job = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    j = rx.recv() => match j { Some(j) => j, None => break },
                };
                me.counters.queued.fetch_sub(1, Ordering::Relaxed);
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let me2 = me.clone();
                t2.spawn(async move {
                    let _p = permit;
                    me2.build(job).await;
                });
            }
        });
        Ok(())
    }

    /// Queues again what the store says is queued or building but no worker has: what a
    /// previous run left, or what a build could not record before the store failed (a full
    /// disk; called again once the store is back). A job queued twice is built once: the
    /// worker skips a delta that is no longer queued.
    pub fn requeue_unfinished(&self) -> Result<(), StoreError> {
        let unfinished: Vec<DeltaRecord> = self
            .store
            .list_deltas(None)?
            .into_iter()
            .filter(|d| matches!(d.status, DeltaStatus::Queued | DeltaStatus::Building))
            .collect();
        for mut d in unfinished {
            d.status = DeltaStatus::Queued;
            self.store.put_delta(&d)?;
            if self.try_enqueue(&d).is_err() {
                self.fail(&mut d, "the delta queue was full; request it again");
            }
        }
        Ok(())
    }

    fn try_enqueue(&self, d: &DeltaRecord) -> Result<(), DeltaError> {
        self.tx
            .try_send((
                d.device_type.clone(),
                d.from_version.clone(),
                d.to_version.clone(),
            ))
            .map_err(|_| {
                DeltaError::Busy(format!(
                    "the delta queue is full ({} waiting): try again later",
                    self.settings.queue
                ))
            })?;
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn fail(&self, d: &mut DeltaRecord, why: &str) {
        d.status = DeltaStatus::Failed;
        d.error = Some(why.to_string());
        d.updated_at_ms = now_ms();
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            device_type = d.device_type,
            from = d.from_version,
            to = d.to_version,
            why,
            "delta failed"
        );
        if let Err(e) = self.store.put_delta(d) {
            tracing::error!(error = %e, "cannot record the delta failure");
        }
    }

    /// Queues `from -> to` unless it is ready, queued or building already. Returns the record.
    fn queue(&self, from: &FirmwareRecord, to: &FirmwareRecord) -> Result<DeltaRecord, DeltaError> {
        if let Some(d) = self
            .store
            .get_delta(&to.device_type, &from.version, &to.version)?
            && d.from_sha256 == from.sha256
            && d.to_sha256 == to.sha256
            && matches!(
                d.status,
                DeltaStatus::Ready
                    | DeltaStatus::Queued
                    | DeltaStatus::Building
                    | DeltaStatus::Skipped
            )
        {
            return Ok(d);
        }
        let now = now_ms();
        let mut d = DeltaRecord {
            schema: DELTA_SCHEMA,
            device_type: to.device_type.clone(),
            from_version: from.version.clone(),
            to_version: to.version.clone(),
            from_sha256: from.sha256.clone(),
            to_sha256: to.sha256.clone(),
            status: DeltaStatus::Queued,
            sha256: None,
            md5: None,
            size: None,
            full_size: to.size,
            error: None,
            build_ms: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.store.put_delta(&d)?;
        if let Err(e) = self.try_enqueue(&d) {
            self.fail(&mut d, &e.to_string());
            return Err(e);
        }
        tracing::info!(
            device_type = d.device_type,
            from = d.from_version,
            to = d.to_version,
            "delta queued"
        );
        Ok(d)
    }

    /// After `fw` was released: queue a delta from every older released version of its device
    /// type that at least one registered device reports running.
    pub async fn on_released(
        &self,
        fw: &FirmwareRecord,
    ) -> Result<crate::server::store::Durable<Vec<DeltaRecord>>, DeltaError> {
        let mut running: Vec<String> = self
            .store
            .list_devices()?
            .into_iter()
            .filter(|d| d.registered && d.device_type == fw.device_type)
            .filter_map(|d| d.firmware_version)
            .collect();
        running.sort();
        running.dedup();
        let mut out = Vec::new();
        for v in running {
            if ids::compare_versions(&v, &fw.version).is_ge() {
                continue;
            }
            // only versions we have: a device-supplied version alone never triggers work
            let Some(from) = self.store.get_firmware(&fw.device_type, &v)? else {
                continue;
            };
            if !was_released(&from) {
                continue;
            }
            match self.queue(&from, fw) {
                Ok(d) => out.push(d),
                Err(DeltaError::Busy(m)) => tracing::warn!(m, "delta not queued"),
                Err(e) => return Err(e),
            }
        }
        Ok(self.store.durable(out).await?)
    }

    /// `POST /api/ota/firmware/{to}/deltas {"fromVersion"}`.
    pub async fn request(
        &self,
        device_type: &str,
        to: &str,
        from: &str,
    ) -> Result<crate::server::store::Durable<DeltaRecord>, DeltaError> {
        if !ids::valid_version(from) {
            return Err(DeltaError::Invalid(format!(
                "fromVersion {from:?} must match [0-9A-Za-z.+-]{{1,64}}"
            )));
        }
        let target = self.store.get_firmware(device_type, to)?.ok_or_else(|| {
            DeltaError::NotFound(format!(
                "firmware {to} for device type {device_type} does not exist"
            ))
        })?;
        if ids::compare_versions(from, to).is_ge() {
            return Err(DeltaError::Invalid(format!(
                "fromVersion {from} is not older than {to}: deltas go from an older version to a newer one"
            )));
        }
        let source = match self.store.get_firmware(device_type, from)? {
            Some(f) => f,
            None => {
                let elsewhere = self
                    .store
                    .list_firmware()?
                    .into_iter()
                    .find(|f| f.version == from)
                    .map(|f| f.device_type);
                return Err(match elsewhere {
                    Some(t) => DeltaError::Invalid(format!(
                        "{from} exists only for device type {t}: a delta needs two versions of the same device type ({device_type})"
                    )),
                    None => DeltaError::NotFound(format!(
                        "firmware {from} for device type {device_type} does not exist"
                    )),
                });
            }
        };
        let d = self.queue(&source, &target)?;
        Ok(self.store.durable(d).await?)
    }

    /// Deltas to a target.
    pub fn list(&self, device_type: &str, to: &str) -> Result<Vec<DeltaRecord>, DeltaError> {
        if self.store.get_firmware(device_type, to)?.is_none() {
            return Err(DeltaError::NotFound(format!(
                "firmware {to} for device type {device_type} does not exist"
            )));
        }
        Ok(self.store.list_deltas(Some((device_type, to)))?)
    }

    /// Every delta record (metrics).
    pub fn all(&self) -> Result<Vec<DeltaRecord>, DeltaError> {
        Ok(self.store.list_deltas(None)?)
    }

    /// The ready delta `from -> to`, if any (what a command may offer).
    pub fn offer(&self, device_type: &str, from: &str, to: &str) -> Option<DeltaRecord> {
        let d = self.store.get_delta(device_type, from, to).ok()??;
        (d.status == DeltaStatus::Ready && d.sha256.is_some()).then_some(d)
    }

    /// Removes every delta to `(device_type, version)` and their blobs (firmware deleted).
    pub async fn remove_target(
        &self,
        device_type: &str,
        version: &str,
    ) -> Result<crate::server::store::Durable<usize>, DeltaError> {
        let list = self.store.list_deltas(Some((device_type, version)))?;
        for d in &list {
            self.store
                .delete_delta(device_type, &d.from_version, &d.to_version)?;
        }
        let gone = self.store.durable(list.len()).await?;
        let keep = self.store.referenced_blobs()?;
        for d in list {
            if let Some(sha) = d.sha256
                && !keep.contains(&sha)
            {
                let blobs = self.blobs.clone();
                let _ = tokio::task::spawn_blocking(move || blobs.remove(&sha)).await;
            }
        }
        Ok(gone)
    }

    /// Where a built delta's patch lives.
    pub fn patch_path(&self, d: &DeltaRecord) -> Option<PathBuf> {
        self.blobs.path(d.sha256.as_deref()?)
    }

    /// The path of a ready delta's patch after checking its bytes against the recorded sha256
    /// (once per file size and mtime). A corrupt patch is withdrawn and queued for a rebuild.
    pub async fn verified_path(&self, d: &DeltaRecord) -> Result<PathBuf, DeltaError> {
        let sha = d
            .sha256
            .clone()
            .ok_or_else(|| DeltaError::NotFound("the delta is not built".into()))?;
        let path = self
            .blobs
            .path(&sha)
            .ok_or_else(|| DeltaError::Corrupt("the delta record has a bad sha256".into()))?;
        let meta = tokio::fs::metadata(&path).await.ok();
        let stamp = meta
            .as_ref()
            .and_then(|m| Some((m.len(), m.modified().ok()?)));
        if let Some(st) = stamp
            && self.verified.lock().expect("poisoned").get(&sha) == Some(&st)
        {
            return Ok(path);
        }
        let p2 = path.clone();
        let actual = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            use sha2::Digest;
            let bytes = std::fs::read(&p2)?;
            Ok(hex::encode(sha2::Sha256::digest(&bytes)))
        })
        .await
        .map_err(|e| DeltaError::Corrupt(e.to_string()))?;
        match (actual, stamp) {
            (Ok(a), Some(st)) if a == sha => {
                self.verified.lock().expect("poisoned").insert(sha, st);
                Ok(path)
            }
            (r, _) => {
                let why = match r {
                    Ok(a) => format!("the stored patch hashes to {a}, not {sha}"),
                    Err(e) => format!("the stored patch cannot be read: {e}"),
                };
                tracing::error!(
                    device_type = d.device_type,
                    from = d.from_version,
                    to = d.to_version,
                    why,
                    "corrupt delta withdrawn; rebuilding"
                );
                self.verified.lock().expect("poisoned").remove(&sha);
                let blobs = self.blobs.clone();
                let s2 = sha.clone();
                let _ = tokio::task::spawn_blocking(move || blobs.remove(&s2)).await;
                let mut n = d.clone();
                n.status = DeltaStatus::Queued;
                n.sha256 = None;
                n.md5 = None;
                n.size = None;
                n.error = Some(format!("rebuilding: {why}"));
                n.updated_at_ms = now_ms();
                self.store.put_delta(&n)?;
                if self.try_enqueue(&n).is_err() {
                    self.fail(
                        &mut n,
                        &format!("{why}; the queue is full, request it again"),
                    );
                }
                Err(DeltaError::Corrupt(why))
            }
        }
    }

    /// Computes one delta (worker body).
    async fn build(&self, (dt, from, to): Job) {
        let Ok(Some(mut d)) = self.store.get_delta(&dt, &from, &to) else {
            return;
        };
        if d.status != DeltaStatus::Queued {
            return;
        }
        let (Ok(Some(src)), Ok(Some(dst))) = (
            self.store.get_firmware(&dt, &from),
            self.store.get_firmware(&dt, &to),
        ) else {
            self.fail(&mut d, "one of the two firmware images was deleted");
            return;
        };
        let peak = crate::bsdiff::estimate_peak_bytes(src.size, dst.size);
        if peak > self.settings.max_memory_bytes {
            self.fail(
                &mut d,
                &format!(
                    "needs about {} MiB, more than delta.max_memory_bytes ({} MiB)",
                    peak >> 20,
                    self.settings.max_memory_bytes >> 20
                ),
            );
            return;
        }
        d.status = DeltaStatus::Building;
        d.updated_at_ms = now_ms();
        if self.store.put_delta(&d).is_err() {
            return;
        }
        tracing::info!(device_type = dt, from, to, "building delta");
        let (Ok(sp), Ok(dp)) = (self.firmware.blob_path(&src), self.firmware.blob_path(&dst))
        else {
            self.fail(&mut d, "bad blob path");
            return;
        };
        let threads = self.settings.threads;
        let blobs = self.blobs.clone();
        let store = self.store.clone();
        let started = Instant::now();
        let (src_sha, dst_sha) = (src.sha256.clone(), dst.sha256.clone());
        let max_ratio = self.settings.max_ratio;
        let r = tokio::task::spawn_blocking(move || -> Result<Built, String> {
            use sha2::Digest;
            let old = std::fs::read(&sp).map_err(|e| format!("reading {from}: {e}"))?;
            let new = std::fs::read(&dp).map_err(|e| format!("reading {to}: {e}"))?;
            if hex::encode(sha2::Sha256::digest(&old)) != src_sha {
                return Err(format!(
                    "the stored image of {from} does not match its sha256"
                ));
            }
            if hex::encode(sha2::Sha256::digest(&new)) != dst_sha {
                return Err(format!(
                    "the stored image of {to} does not match its sha256"
                ));
            }
            let mut patch = Vec::with_capacity(new.len() / 8);
            crate::bsdiff::make(&old, &new, threads, &mut patch).map_err(|e| e.to_string())?;
            // prove it before anyone downloads it
            let mut check = Vec::with_capacity(new.len());
            crate::bsdiff::apply(&old, &patch, new.len() as u64, &mut check)
                .map_err(|e| format!("the new patch does not apply: {e}"))?;
            if check != new {
                return Err("the new patch does not reproduce the target".into());
            }
            if patch.len() as f64 >= max_ratio * new.len() as f64 {
                return Ok(Built::NotWorthIt(patch.len() as u64));
            }
            let stored = |e: std::io::Error| {
                if crate::server::store::is_disk_full(&e) {
                    format!(
                        "the data disk is full ({} bytes free): the {} byte patch could not be stored; request it again once there is room",
                        store.free_bytes().unwrap_or(0),
                        patch.len()
                    )
                } else {
                    format!("storing the patch: {e}")
                }
            };
            let staged = blobs.stage_bytes(&patch).map_err(stored)?;
            let (sha, md5, size) = (staged.sha256.clone(), staged.md5.clone(), staged.size);
            blobs.commit(staged).map_err(stored)?;
            Ok(Built::Stored { sha, md5, size })
        })
        .await
        .unwrap_or_else(|e| Err(format!("delta task panicked: {e}")));
        let ms = started.elapsed().as_millis() as u64;
        d.build_ms = Some(ms);
        d.updated_at_ms = now_ms();
        match r {
            Ok(Built::Stored { sha, md5, size }) => {
                d.status = DeltaStatus::Ready;
                d.sha256 = Some(sha);
                d.md5 = Some(md5);
                d.size = Some(size);
                d.error = None;
                self.counters.built.fetch_add(1, Ordering::Relaxed);
                self.counters.build_ms.fetch_add(ms, Ordering::Relaxed);
                tracing::info!(
                    device_type = d.device_type,
                    from = d.from_version,
                    to = d.to_version,
                    size,
                    full = d.full_size,
                    ms,
                    "delta ready"
                );
            }
            Ok(Built::NotWorthIt(size)) => {
                d.status = DeltaStatus::Skipped;
                d.size = Some(size);
                d.error = Some(format!(
                    "the patch is {:.0} % of the image (delta.max_ratio is {:.0} %): not offered",
                    size as f64 * 100.0 / d.full_size.max(1) as f64,
                    self.settings.max_ratio * 100.0
                ));
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    device_type = d.device_type,
                    from = d.from_version,
                    to = d.to_version,
                    size,
                    "delta not worth it"
                );
            }
            Err(why) => {
                self.fail(&mut d, &why);
                return;
            }
        }
        if let Err(e) = self.store.put_delta(&d) {
            tracing::error!(error = %e, "cannot record the delta");
        }
        let _ = self.store.flush().await;
    }
}

enum Built {
    Stored { sha: String, md5: String, size: u64 },
    NotWorthIt(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        for (dt, f, t) in [
            ("gateway", "1.0.1", "1.0.2"),
            ("my_v2", "1.0.0-rc.1+b", "2.0"),
            ("a_to_v", "1", "2"),
        ] {
            assert_eq!(parse_file_name(&file_name(dt, f, t)), Some((dt, f, t)));
        }
        assert_eq!(parse_file_name("gateway_v1.bin"), None);
        assert_eq!(parse_file_name("../x_v1_to_v2.bsdiff"), None);
    }
}
