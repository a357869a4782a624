//! Content-addressed files on disk: `<data_dir>/blobs/sha256/<2 hex>/<64 hex>`. Images never live
//! in the store. A blob is written to `<data_dir>/tmp/`, hashed on the way (md5 + sha256 + size),
//! fsynced, renamed into place and its directory fsynced; only then may a record point to it.
//! `tmp/` is emptied at every start and blobs no record refers to are collected, so a crash at
//! any moment leaves no orphan behind after the next start.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::trust::{Signature, TrustError, TrustedKey};

/// Chunks buffered between the network and the writer thread (bounds upload memory).
const WRITE_QUEUE: usize = 8;

/// The blob directory of one data dir.
#[derive(Debug, Clone)]
pub struct Blobs {
    root: PathBuf,
    tmp: PathBuf,
}

/// A fully written, fsynced file in `tmp/`, not yet visible. Removed on drop unless committed.
#[derive(Debug)]
pub struct StagedBlob {
    path: PathBuf,
    /// Bytes written.
    pub size: u64,
    /// Hex md5.
    pub md5: String,
    /// Hex sha256; the blob's name once committed.
    pub sha256: String,
    /// When a signature was checked while writing: whether the bytes matched it.
    pub signature_check: Option<Result<(), TrustError>>,
}

impl StagedBlob {
    /// The staged file (to read it again, e.g. to check a signature that came after it).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A signature check on a thread of its own beside the writer, fed the same chunks (shared,
/// not copied), so its BLAKE2b runs while the writer hashes md5 and sha256 and writes: a signed
/// upload takes as long as an unsigned one where a core is free. Bounded: the writer waits
/// when the check is eight chunks behind.
struct SideCheck {
    tx: Option<std::sync::mpsc::SyncSender<Bytes>>,
    join: std::thread::JoinHandle<Result<(), TrustError>>,
}

impl SideCheck {
    fn start((key, sig): (TrustedKey, Signature)) -> SideCheck {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(WRITE_QUEUE);
        let join = std::thread::spawn(move || {
            let mut v = key.stream(&sig)?;
            for chunk in rx {
                v.update(&chunk);
            }
            v.finish()
        });
        SideCheck { tx: Some(tx), join }
    }

    fn feed(&mut self, chunk: Bytes) {
        if let Some(tx) = &self.tx
            && tx.send(chunk).is_err()
        {
            // the check ended early (an unusable signature): its result says why
            self.tx = None;
        }
    }

    fn finish(mut self) -> Result<(), TrustError> {
        self.tx = None;
        self.join
            .join()
            .unwrap_or_else(|_| Err(TrustError::Mismatch("the signature check panicked".into())))
    }
}

/// A temp file being written and hashed; owned by a [`StagedBlob`] so any early return
/// removes it.
struct Sink {
    file: File,
    md5: Md5,
    sha: Sha256,
    staged: StagedBlob,
}

impl Sink {
    fn create(tmp: &Path, what: &str) -> io::Result<Sink> {
        let mut name = [0u8; 16];
        rand::fill(&mut name);
        let path = tmp.join(format!("{what}-{}", hex::encode(name)));
        let file = File::create(&path)?;
        Ok(Sink {
            file,
            md5: Md5::new(),
            sha: Sha256::new(),
            staged: StagedBlob {
                path,
                size: 0,
                md5: String::new(),
                sha256: String::new(),
                signature_check: None,
            },
        })
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.file.write_all(b)?;
        self.md5.update(b);
        self.sha.update(b);
        self.staged.size += b.len() as u64;
        Ok(())
    }

    /// fsyncs and names the hashes.
    fn finish(mut self) -> io::Result<StagedBlob> {
        self.file.sync_all()?;
        self.staged.md5 = hex::encode(self.md5.finalize());
        self.staged.sha256 = hex::encode(self.sha.finalize());
        Ok(self.staged)
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

enum Msg {
    Chunk(Bytes),
    Finish,
}

/// Streams bytes to a temp file on the blocking pool, hashing them on the way.
pub struct BlobWriter {
    tx: mpsc::Sender<Msg>,
    join: Option<JoinHandle<io::Result<StagedBlob>>>,
    written: u64,
}

/// fsyncs a directory so that a rename or create inside it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn valid_hex(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Blobs {
    /// Opens the blob directories under `data_dir`, creating them, and empties `tmp/`.
    pub fn open(data_dir: &Path) -> io::Result<Blobs> {
        let root = data_dir.join("blobs").join("sha256");
        let tmp = data_dir.join("tmp");
        fs::create_dir_all(&root)?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(Blobs { root, tmp })
    }

    /// Where the blob named `sha256` lives. `None` if the name is not 64 lower-case hex digits.
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        valid_hex(sha256).then(|| self.root.join(&sha256[..2]).join(sha256))
    }

    /// Starts writing a new blob.
    pub fn writer(&self) -> BlobWriter {
        self.writer_checking(None)
    }

    /// Starts writing a new blob whose bytes are also checked against a signature on the
    /// way ([`StagedBlob::signature_check`]), so a signed upload is read once.
    pub fn writer_checking(&self, check: Option<(TrustedKey, Signature)>) -> BlobWriter {
        let (tx, mut rx) = mpsc::channel::<Msg>(WRITE_QUEUE);
        let tmp = self.tmp.clone();
        let join = tokio::task::spawn_blocking(move || {
            let mut sink = Sink::create(&tmp, "upload")?;
            let mut verifier = check.map(SideCheck::start);
            loop {
                match rx.blocking_recv() {
                    Some(Msg::Chunk(b)) => {
                        if let Some(v) = verifier.as_mut() {
                            v.feed(b.clone());
                        }
                        sink.write(&b)?;
                    }
                    Some(Msg::Finish) => break,
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::Interrupted,
                            "blob write aborted",
                        ));
                    }
                }
            }
            let mut staged = sink.finish()?;
            staged.signature_check = verifier.map(SideCheck::finish);
            Ok(staged)
        });
        BlobWriter {
            tx,
            join: Some(join),
            written: 0,
        }
    }

    /// Stages everything `r` yields, at most `limit` bytes (more is an error), checking it
    /// against `check` on the way. Blocking (the bundle import reads its tar on the blocking
    /// pool).
    pub fn stage_reader(
        &self,
        r: &mut dyn Read,
        limit: u64,
        check: Option<(&TrustedKey, &Signature)>,
    ) -> io::Result<StagedBlob> {
        let mut sink = Sink::create(&self.tmp, "bundle")?;
        let mut verifier = check.map(|(k, sig)| SideCheck::start((k.clone(), sig.clone())));
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if sink.staged.size + n as u64 > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("more than the {limit} bytes announced"),
                ));
            }
            if let Some(v) = verifier.as_mut() {
                v.feed(Bytes::copy_from_slice(&buf[..n]));
            }
            sink.write(&buf[..n])?;
        }
        let mut staged = sink.finish()?;
        staged.signature_check = verifier.map(SideCheck::finish);
        Ok(staged)
    }

    /// Stages bytes already in memory (a computed patch): temp file, hashed, fsynced. Blocking.
    pub fn stage_bytes(&self, bytes: &[u8]) -> io::Result<StagedBlob> {
        let mut name = [0u8; 16];
        rand::fill(&mut name);
        let path = self.tmp.join(format!("delta-{}", hex::encode(name)));
        let mut file = File::create(&path)?;
        let staged = StagedBlob {
            path,
            size: bytes.len() as u64,
            md5: hex::encode(Md5::digest(bytes)),
            sha256: hex::encode(Sha256::digest(bytes)),
            signature_check: None,
        };
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(staged)
    }

    /// Makes a staged blob visible under its sha256 (rename + directory fsync). Blocking.
    /// If an identical blob exists already, the staged copy is simply dropped.
    pub fn commit(&self, mut staged: StagedBlob) -> io::Result<PathBuf> {
        let dest = self
            .path(&staged.sha256)
            .ok_or_else(|| io::Error::other("staged blob has no valid sha256"))?;
        let dir = dest.parent().expect("blob paths have a parent");
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            sync_dir(&self.root)?;
        }
        if let Ok(meta) = fs::metadata(&dest)
            && meta.len() == staged.size
        {
            return Ok(dest); // same content already stored; `staged` drops its temp file
        }
        fs::rename(&staged.path, &dest)?;
        staged.path = PathBuf::new(); // moved: nothing left for Drop to remove
        sync_dir(dir)?;
        let len = fs::metadata(&dest)?.len();
        if len != staged.size {
            return Err(io::Error::other(format!(
                "blob {} has {len} bytes on disk, {} were written",
                staged.sha256, staged.size
            )));
        }
        Ok(dest)
    }

    /// Deletes one blob (missing is fine). Blocking.
    pub fn remove(&self, sha256: &str) -> io::Result<()> {
        let Some(p) = self.path(sha256) else {
            return Ok(());
        };
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(p.parent().expect("blob paths have a parent")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The names of every stored blob; stray files that are not blobs are included as-is so that
    /// orphan collection removes them too.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for shard in fs::read_dir(&self.root)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(shard.path())? {
                out.push(f?.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(out)
    }

    /// Removes every blob whose name is not in `keep`; returns how many were removed. Blocking;
    /// call at start-up before anything can write.
    pub fn collect_orphans(&self, keep: &HashSet<String>) -> io::Result<usize> {
        let mut removed = 0;
        for shard in fs::read_dir(&self.root)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                fs::remove_file(shard.path())?;
                removed += 1;
                continue;
            }
            for f in fs::read_dir(shard.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    fs::remove_file(f.path())?;
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            sync_dir(&self.root)?;
        }
        Ok(removed)
    }
}

impl BlobWriter {
    /// Queues a chunk; waits while the writer is behind (bounded memory).
    pub async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.written += chunk.len() as u64;
        if self.tx.send(Msg::Chunk(chunk)).await.is_err() {
            // The writer thread stopped: its error is the real cause.
            return Err(self.fail().await);
        }
        Ok(())
    }

    /// Bytes queued so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Finishes the file: flush, fsync, hashes.
    pub async fn finish(mut self) -> io::Result<StagedBlob> {
        if self.tx.send(Msg::Finish).await.is_err() {
            return Err(self.fail().await);
        }
        match self.join.take() {
            Some(j) => j
                .await
                .map_err(|e| io::Error::other(format!("blob writer task: {e}")))?,
            None => Err(io::Error::other("blob writer already failed")),
        }
    }

    /// Abandons the blob; the temp file is removed before this returns.
    pub async fn abort(mut self) {
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }

    /// The writer thread stopped early: closes the channel and returns its error.
    async fn fail(&mut self) -> io::Error {
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, tx));
        match self.join.take() {
            Some(j) => match j.await {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => io::Error::other("blob writer finished early"),
                Err(e) => io::Error::other(format!("blob writer task: {e}")),
            },
            None => io::Error::other("blob writer already failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_commit_and_collect() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let mut w = blobs.writer();
        w.write(Bytes::from_static(b"hello ")).await.unwrap();
        w.write(Bytes::from_static(b"world")).await.unwrap();
        let staged = w.finish().await.unwrap();
        assert_eq!(staged.size, 11);
        assert_eq!(staged.md5, "5eb63bbbe01eeed093cb22bb8f5acdc3");
        let sha = staged.sha256.clone();
        let p = blobs.commit(staged).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello world");
        assert!(
            fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none()
        );

        // an aborted writer leaves nothing behind
        let mut w = blobs.writer();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        w.abort().await;
        assert!(
            fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none()
        );

        assert_eq!(
            blobs
                .collect_orphans(&HashSet::from([sha.clone()]))
                .unwrap(),
            0
        );
        assert_eq!(blobs.collect_orphans(&HashSet::new()).unwrap(), 1);
        assert!(!p.exists());
        assert!(blobs.path("../etc/passwd").is_none());
    }
}
