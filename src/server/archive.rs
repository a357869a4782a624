//! The task archive: with `tasks.keep_finished_per_device` set, finished tasks older than the
//! newest few of their device leave the store for gzip-compressed JSON-lines files in
//! `<data_dir>/archive/` (one task record per line, readable with `zcat`), so the store — and
//! its start, which reads every task — stays the size of the fleet's recent work.
//!
//! A pass writes a file, syncs it and its directory, and only then removes the tasks from the
//! store in the same atomic write that names the file and adds the tasks to the archived
//! counts the statistics keep ([`Store::commit_archive`]). A crash in between leaves a file the
//! store does not name: the next pass deletes it (its tasks are still in the store). Tasks of
//! a campaign that is still under way, active tasks and each device's newest tasks stay.
//! The API lists archived tasks (`GET /api/ota/tasks?archived=true`), the site report carries
//! them, backups carry the files.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::Digest;

use crate::server::error::ServiceError;
use crate::server::store::{ArchiveFile, Store, TaskRecord};

/// Tasks per archive file (a pass writes as many files as it needs).
const TASKS_PER_FILE: usize = 10_000;

/// The archive's directory under the data directory.
pub const DIR: &str = "archive";

/// What a pass did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Tasks moved out of the store.
    pub archived: u64,
    /// The files written.
    pub files: Vec<ArchiveFile>,
    /// Leftover files of an interrupted pass, deleted.
    pub leftovers: usize,
}

/// The archive of one data directory.
pub struct Archive {
    dir: PathBuf,
    store: Store,
    /// One pass at a time.
    running: tokio::sync::Mutex<()>,
    /// Listings of the archive under way (each reads its files): at most [`READERS`].
    readers: Arc<tokio::sync::Semaphore>,
}

/// Listings of the archive read at once; one more is refused as busy.
pub const READERS: usize = 2;

impl Archive {
    /// The archive in `<data_dir>/archive`.
    pub fn new(data_dir: &Path, store: Store) -> Arc<Archive> {
        Arc::new(Archive {
            dir: data_dir.join(DIR),
            store,
            running: tokio::sync::Mutex::new(()),
            readers: Arc::new(tokio::sync::Semaphore::new(READERS)),
        })
    }

    /// One pass: moves the finished tasks older than the newest `keep` of their device (at
    /// least 1) out of the store, except those of the campaigns in `busy` (not finished yet).
    /// Durable when it returns.
    pub async fn pass(
        self: &Arc<Self>,
        keep: usize,
        busy: HashSet<String>,
    ) -> Result<Pass, ServiceError> {
        let _one = self.running.lock().await;
        let me = self.clone();
        let pass = tokio::task::spawn_blocking(move || me.pass_blocking(keep, &busy))
            .await
            .map_err(|e| ServiceError::Io(std::io::Error::other(e)))??;
        if pass.archived > 0 {
            self.store.flush().await?;
        }
        Ok(pass)
    }

    fn pass_blocking(&self, keep: usize, busy: &HashSet<String>) -> Result<Pass, ServiceError> {
        let mut pass = Pass {
            leftovers: self.remove_leftovers()?,
            ..Pass::default()
        };
        let ids = self.store.archive_candidates(keep, |t| {
            t.campaign_id.as_ref().is_none_or(|c| !busy.contains(c))
        })?;
        for chunk in ids.chunks(TASKS_PER_FILE) {
            let file = self.write_file(chunk)?;
            let path = self.dir.join(&file.name);
            match self.store.commit_archive(chunk, file.clone()) {
                Ok(()) => {
                    pass.archived += file.tasks;
                    pass.files.push(file);
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e.into());
                }
            }
        }
        if pass.archived > 0 {
            tracing::info!(
                tasks = pass.archived,
                files = pass.files.len(),
                keep,
                "task archive: finished tasks moved out of the store"
            );
        }
        Ok(pass)
    }

    /// Deletes files of the archive directory the store does not name (a pass interrupted
    /// between writing its file and removing its tasks); how many.
    fn remove_leftovers(&self) -> Result<usize, ServiceError> {
        let named: HashSet<String> = self
            .store
            .task_archive()?
            .files
            .into_iter()
            .map(|f| f.name)
            .collect();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut n = 0;
        for e in entries {
            let name = e?.file_name().to_string_lossy().into_owned();
            if !named.contains(&name) {
                tracing::warn!(file = %name, "task archive: removing a file an interrupted pass left");
                std::fs::remove_file(self.dir.join(&name))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Writes the tasks `ids` into a new file, synced with its directory.
    fn write_file(&self, ids: &[u64]) -> Result<ArchiveFile, ServiceError> {
        std::fs::create_dir_all(&self.dir)?;
        let at_ms = crate::time::now_ms();
        let (first, last) = (ids[0], ids[ids.len() - 1]);
        let name = format!("tasks-{at_ms}-{first}-{last}.jsonl.gz");
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let written = (|| -> Result<(u64, String), ServiceError> {
            let file = std::fs::File::create(&tmp)?;
            let hashing = Hashing {
                inner: BufWriter::with_capacity(64 << 10, file),
                sha: sha2::Sha256::new(),
                len: 0,
            };
            // serde_json writes token by token: buffered, the encoder sees large blocks
            let mut gz = BufWriter::with_capacity(
                64 << 10,
                flate2::write::GzEncoder::new(hashing, flate2::Compression::default()),
            );
            for id in ids {
                let t = self.store.get_task(*id)?.ok_or_else(|| {
                    ServiceError::Conflict(format!("task {id} left the store during the pass"))
                })?;
                serde_json::to_writer(&mut gz, &t).map_err(std::io::Error::from)?;
                gz.write_all(b"\n")?;
            }
            let hashing = gz.into_inner().map_err(|e| e.into_error())?.finish()?;
            let file = hashing.inner.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok((hashing.len, hex::encode(hashing.sha.finalize())))
        })();
        let (bytes, sha256) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, self.dir.join(&name))?;
        crate::server::blobs::sync_dir(&self.dir)?;
        Ok(ArchiveFile {
            name,
            tasks: ids.len() as u64,
            bytes,
            sha256,
            at_ms,
        })
    }

    /// Waits for a pass under way and holds off the next (backups take their snapshot of the
    /// store and the archive under it).
    pub async fn quiesce(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.running.lock().await
    }

    /// Calls `f` with every archived task, oldest first, one file at a time, until it returns
    /// false. Blocking.
    pub fn each(
        &self,
        mut f: impl FnMut(TaskRecord) -> Result<bool, ServiceError>,
    ) -> Result<(), ServiceError> {
        for file in self.store.task_archive()?.files {
            let mut go_on = true;
            self.read_file(&file, &mut |t| {
                go_on = f(t)?;
                Ok(go_on)
            })?;
            if !go_on {
                break;
            }
        }
        Ok(())
    }

    /// [`Archive::page`] on the blocking pool, at most [`READERS`] at once: a listing reads
    /// every file of the archive, so more at once are refused (`Busy`, 503) rather than queued.
    pub async fn list(
        self: &Arc<Self>,
        keep: impl Fn(&TaskRecord) -> bool + Send + 'static,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<TaskRecord>, usize), ServiceError> {
        let permit = self.readers.clone().try_acquire_owned().map_err(|_| {
            ServiceError::Busy(format!(
                "{READERS} listings of the task archive are being read: try again in a moment"
            ))
        })?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            me.page(keep, limit, offset)
        })
        .await
        .map_err(|e| ServiceError::Io(std::io::Error::other(e)))?
    }

    /// Archived tasks newest first that pass `keep`: one page (skipping `offset`, at most
    /// `limit`) and how many pass in all. Blocking; holds at most a page.
    pub fn page(
        &self,
        keep: impl Fn(&TaskRecord) -> bool,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<TaskRecord>, usize), ServiceError> {
        let mut out = Vec::new();
        let mut seen = 0usize;
        for file in self.store.task_archive()?.files.iter().rev() {
            // a file holds its tasks oldest first: count its matches, then take the page's
            let mut n = 0usize;
            self.read_file(file, &mut |t| {
                n += usize::from(keep(&t));
                Ok(true)
            })?;
            let (lo, hi) = (offset.max(seen), offset.saturating_add(limit).min(seen + n));
            if lo < hi {
                // newest-first positions lo..hi of all are these positions of the file, oldest first
                let (from, to) = (seen + n - hi, seen + n - lo);
                let mut i = 0usize;
                let mut page = Vec::with_capacity(to - from);
                self.read_file(file, &mut |t| {
                    if keep(&t) {
                        if i >= from && i < to {
                            page.push(t);
                        }
                        i += 1;
                    }
                    Ok(i < to)
                })?;
                out.extend(page.into_iter().rev());
            }
            seen += n;
        }
        Ok((out, seen))
    }

    fn read_file(
        &self,
        file: &ArchiveFile,
        f: &mut dyn FnMut(TaskRecord) -> Result<bool, ServiceError>,
    ) -> Result<(), ServiceError> {
        let path = self.dir.join(&file.name);
        let opened = std::fs::File::open(&path).map_err(|e| {
            ServiceError::Corrupt(format!("task archive file {}: {e}", path.display()))
        })?;
        let r = BufReader::with_capacity(
            64 << 10,
            flate2::read::GzDecoder::new(BufReader::with_capacity(64 << 10, opened)),
        );
        for (n, line) in r.lines().enumerate() {
            let line = line.map_err(|e| {
                ServiceError::Corrupt(format!("task archive file {}: {e}", file.name))
            })?;
            let t: TaskRecord = serde_json::from_str(&line).map_err(|e| {
                ServiceError::Corrupt(format!(
                    "task archive file {} line {}: {e}",
                    file.name,
                    n + 1
                ))
            })?;
            if !f(t)? {
                break;
            }
        }
        Ok(())
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    sha: sha2::Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.sha.update(&b[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use crate::server::error::ServiceError;
    use crate::server::store::Store;

    #[tokio::test]
    async fn listings_beyond_the_readers_are_refused_as_busy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let archive = super::Archive::new(dir.path(), store);
        let held: Vec<_> = (0..super::READERS)
            .map(|_| archive.readers.clone().try_acquire_owned().unwrap())
            .collect();
        let r = archive.list(|_| true, 10, 0).await;
        assert!(matches!(r, Err(ServiceError::Busy(_))), "{r:?}");
        drop(held);
        assert_eq!(archive.list(|_| true, 10, 0).await.unwrap().1, 0);
    }
}

/// The archive on a large store: `HANGAR_ARCHIVE_TASKS=1000000 cargo test --release --lib
/// archive_keeps_a_large_store -- --nocapture` prints the pass's time and the store's opening
/// before and after (`HANGAR_ARCHIVE_KEEP`: finished tasks kept per device of the 10 each has,
/// default 5). It checks the result, not the speed.
#[cfg(test)]
mod large {
    use crate::server::store::{Store, TaskEvent, TaskStatus};

    #[test]
    fn archive_keeps_a_large_store_small() {
        let n: u64 = std::env::var("HANGAR_ARCHIVE_TASKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let devices = (n / 10).max(1);
        let keep: u64 = std::env::var("HANGAR_ARCHIVE_KEEP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        // finished tasks as a transfer leaves them: a signed URL, hashes, a dozen entries
        let task = |i: u64| {
            let mut t = crate::server::store::sample_task(i, &format!("GW{:06}", i % devices));
            t.status = TaskStatus::Completed;
            t.progress = 100;
            t.firmware_url = format!(
                "https://10.0.0.1:8443/firmware/gateway_v1.0.2.bin?token=1796770983.{}&task={i}",
                "9f".repeat(32)
            );
            t.md5 = "30e0c561255ce8849629126ab8616cae".into();
            t.sha256 = "ed".repeat(32);
            (t.start_time_ms, t.complete_time_ms) = (Some(1_000), Some(61_000));
            t.events = (0..12)
                .map(|k| TaskEvent {
                    at_ms: 1_796_770_983_000 + k * 5_000,
                    status: TaskStatus::Downloading,
                    progress: (k * 9) as u8,
                    note: format!("downloading {}%", k * 9),
                })
                .collect();
            t
        };
        for c in (1..=n).collect::<Vec<_>>().chunks(1000) {
            let recs: Vec<_> = c.iter().map(|&i| task(i)).collect();
            store.put_new_tasks(&recs).unwrap();
        }
        store.flush_blocking().unwrap();
        drop(store);
        let t = std::time::Instant::now();
        let store = crate::server::store::reopen(&dir.path().join("store"));
        eprintln!("open with {n} tasks: {:?}", t.elapsed());

        let archive = super::Archive::new(dir.path(), store.clone());
        let t = std::time::Instant::now();
        let pass = archive
            .pass_blocking(keep as usize, &Default::default())
            .unwrap();
        store.flush_blocking().unwrap();
        let bytes: u64 = pass.files.iter().map(|f| f.bytes).sum();
        eprintln!(
            "archive pass (keep {keep} per device): {} tasks into {} files, {bytes} bytes, {:?}",
            pass.archived,
            pass.files.len(),
            t.elapsed()
        );
        let kept = devices.min(n) * keep.min(n / devices);
        assert_eq!(pass.archived, n - kept);
        drop(archive);
        drop(store);
        let t = std::time::Instant::now();
        let store = crate::server::store::reopen(&dir.path().join("store"));
        eprintln!("open with {kept} tasks left: {:?}", t.elapsed());
        let mut left = 0u64;
        store
            .each_task(|_| {
                left += 1;
                Ok::<(), crate::server::store::StoreError>(())
            })
            .unwrap();
        assert_eq!(left, kept);
        let summary = store.task_archive().unwrap();
        assert_eq!(summary.all.total, n - kept);
        assert_eq!(summary.all.duration_sum_ms, (n - kept) as i64 * 60_000);
        // each device's newest tasks stayed; the archive holds the rest, readable
        assert_eq!(
            store.latest_task("GW000001").unwrap().unwrap().id,
            n - devices + 1
        );
        let archive = super::Archive::new(dir.path(), store);
        let (page, total) = archive.page(|t| t.device_id == "GW000001", 3, 0).unwrap();
        assert_eq!(total as u64, n / devices - keep);
        assert!(page.windows(2).all(|w| w[0].id > w[1].id));
    }
}
