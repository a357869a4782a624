//! Backup and restore. A backup is a tar with `manifest.json` first (format, creation time, and
//! the size and sha256 of every other entry), then `store.jsonl` (every record, taken while the
//! firmware, task and campaign writers are held, so the records are one consistent snapshot),
//! the blobs those records name, the generated certificates, the admin token, the URL secret and
//! the site key.
//! Restore verifies every checksum before it writes anything, refuses a non-empty data dir
//! without `force` (and then moves the old one aside rather than deleting it), and rebuilds the
//! store from the records.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::server::store::{
    DeltaRecord, Store, TaskArchiveRecord, decode_firmware_record, decode_record,
};

/// The manifest's format name.
pub const FORMAT: &str = "hangar-backup";

/// `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version.
    pub version: u32,
    /// RFC 3339.
    pub created_at: String,
    /// Entry path -> (size, sha256).
    pub files: BTreeMap<String, (u64, String)>,
}

/// Files of the data dir a backup carries besides store and blobs.
const SMALL_FILES: &[&str] = &[
    "admin.token",
    "url.secret",
    "certs/ca.pem",
    "certs/ca.key",
    "certs/server.pem",
    "certs/server.key",
    "certs/server.sans",
    // the site key that signs reports: a restored site keeps signing with the same key
    "site.key",
    "site.pub",
];

fn hash_file(p: &Path) -> io::Result<(u64, String)> {
    let mut f = File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex::encode(h.finalize())))
}

/// Writes a backup of `data_dir` into `out` (blocking). `store_dump` holds the records, taken by
/// the caller under the writers' locks.
pub fn write(data_dir: &Path, store_dump: &[u8], out: &mut File) -> io::Result<Manifest> {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let mut shas: Vec<String> = Vec::new();
    let mut archived: Vec<String> = Vec::new();
    for line in store_dump.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).map_err(io::Error::other)?;
        let tree = v["tree"].as_str().unwrap_or("");
        if tree != "firmware" && tree != "deltas" && tree != "task_archive" {
            continue;
        }
        let bytes = hex::decode(v["value"].as_str().unwrap_or("")).map_err(io::Error::other)?;
        if tree == "task_archive" {
            // the task archive's files its record names
            let r: TaskArchiveRecord = decode_record(&bytes).map_err(io::Error::other)?;
            archived.extend(r.files.into_iter().map(|f| f.name));
        } else if tree == "firmware" {
            let r = decode_firmware_record(&bytes).map_err(io::Error::other)?;
            shas.push(r.sha256);
        } else {
            let r: DeltaRecord = decode_record(&bytes).map_err(io::Error::other)?;
            shas.extend(r.sha256);
        }
    }
    shas.sort();
    shas.dedup();
    for sha in shas {
        let rel = format!("blobs/sha256/{}/{sha}", &sha[..2]);
        files.push((rel.clone(), data_dir.join(rel)));
    }
    for name in archived {
        let rel = format!("{}/{name}", crate::server::archive::DIR);
        files.push((rel.clone(), data_dir.join(rel)));
    }
    for f in SMALL_FILES {
        let p = data_dir.join(f);
        if p.exists() {
            files.push((f.to_string(), p));
        }
    }
    let mut manifest = Manifest {
        format: FORMAT.into(),
        version: 1,
        created_at: crate::time::now_utc().to_rfc3339(),
        files: BTreeMap::new(),
    };
    manifest.files.insert(
        "store.jsonl".into(),
        (
            store_dump.len() as u64,
            hex::encode(Sha256::digest(store_dump)),
        ),
    );
    for (rel, p) in &files {
        let (n, sha) = hash_file(p)?;
        if rel.starts_with("blobs/") && !rel.ends_with(&sha) {
            return Err(io::Error::other(format!(
                "{rel} is damaged on disk (it hashes to {sha}): not backing up a corrupt image"
            )));
        }
        manifest.files.insert(rel.clone(), (n, sha));
    }
    let mbytes = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
    let mut tar = tar::Builder::new(&mut *out);
    let header = |len: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_size(len);
        h.set_mode(0o600);
        h.set_mtime(crate::time::now_ms() as u64 / 1000);
        h
    };
    tar.append_data(
        &mut header(mbytes.len() as u64),
        "manifest.json",
        &mbytes[..],
    )?;
    tar.append_data(
        &mut header(store_dump.len() as u64),
        "store.jsonl",
        store_dump,
    )?;
    for (rel, p) in &files {
        let f = File::open(p)?;
        let len = f.metadata()?.len();
        tar.append_data(&mut header(len), rel, f)?;
    }
    tar.finish()?;
    drop(tar);
    out.sync_all()?;
    Ok(manifest)
}

fn safe_rel(p: &Path) -> bool {
    p.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Checks a backup file: the manifest, every entry's size and sha256, nothing missing or extra.
pub fn verify(file: &Path) -> io::Result<Manifest> {
    let opened = File::open(file)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", file.display())))?;
    verify_reader(BufReader::new(opened))
}

/// [`verify`] of a backup read from `r` (a tar), in bounded memory but for its manifest.
pub fn verify_reader(r: impl Read) -> io::Result<Manifest> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut ar = tar::Archive::new(r);
    let mut manifest: Option<Manifest> = None;
    let mut seen = 0usize;
    for e in ar.entries()? {
        let mut e = e?;
        let path = e.path()?.into_owned();
        if !safe_rel(&path) {
            return Err(bad(format!("unsafe path {} in the backup", path.display())));
        }
        let rel = path.to_string_lossy().into_owned();
        if rel == "manifest.json" {
            if manifest.is_some() {
                return Err(bad("a second manifest.json".into()));
            }
            let mut b = Vec::new();
            // a manifest lists names, sizes and hashes: 64 MiB is far more than any holds
            (&mut e).take(64 << 20).read_to_end(&mut b)?;
            let m: Manifest =
                serde_json::from_slice(&b).map_err(|e| bad(format!("manifest.json: {e}")))?;
            if m.format != FORMAT || m.version != 1 {
                return Err(bad(format!("not a {FORMAT} v1 file")));
            }
            manifest = Some(m);
            continue;
        }
        let m = manifest
            .as_ref()
            .ok_or_else(|| bad("manifest.json is not the first entry".into()))?;
        let (size, sha) = m
            .files
            .get(&rel)
            .ok_or_else(|| bad(format!("{rel} is not in the manifest")))?;
        let mut h = Sha256::new();
        let n = io::copy(&mut e, &mut HashWriter(&mut h))?;
        let got = hex::encode(h.finalize());
        if n != *size || got != *sha {
            return Err(bad(format!(
                "{rel}: {n} bytes hashing to {got}, the manifest says {size} bytes {sha}"
            )));
        }
        seen += 1;
    }
    let m = manifest.ok_or_else(|| bad("no manifest.json".into()))?;
    if seen != m.files.len() {
        return Err(bad(format!(
            "the backup has {seen} of the {} files its manifest lists",
            m.files.len()
        )));
    }
    Ok(m)
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Restores `file` into `data_dir` (blocking). Returns what was restored, for the operator.
pub fn restore(file: &Path, data_dir: &Path, force: bool) -> io::Result<String> {
    let manifest = verify(file)?;
    // a running appliance holds the directory: refuse before touching anything
    let held =
        |e: crate::server::datadir::LockError| io::Error::new(io::ErrorKind::ResourceBusy, e);
    let _old = if data_dir.exists() {
        Some(crate::server::datadir::lock(data_dir).map_err(held)?)
    } else {
        None
    };
    let occupied = data_dir.exists()
        && std::fs::read_dir(data_dir)?
            .any(|e| e.is_ok_and(|e| e.file_name() != crate::server::datadir::LOCK_FILE));
    if occupied {
        if !force {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} is not empty: pass --force to replace it (the old one is moved aside)",
                    data_dir.display()
                ),
            ));
        }
        let aside = PathBuf::from(format!(
            "{}.replaced-{}",
            data_dir.display(),
            crate::time::now_ms() / 1000
        ));
        std::fs::rename(data_dir, &aside)?;
        eprintln!("moved the old data dir to {}", aside.display());
    }
    std::fs::create_dir_all(data_dir)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // no appliance may start on the directory while it is being filled
    let _new = crate::server::datadir::lock(data_dir).map_err(held)?;
    let mut f = File::open(file)?;
    f.rewind()?;
    let mut ar = tar::Archive::new(BufReader::new(f));
    let mut dump = Vec::new();
    for e in ar.entries()? {
        let mut e = e?;
        let rel = e.path()?.into_owned();
        let name = rel.to_string_lossy().into_owned();
        if name == "manifest.json" {
            continue;
        }
        if name == "store.jsonl" {
            e.read_to_end(&mut dump)?;
            continue;
        }
        let dest = data_dir.join(&rel);
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut out = File::create(&dest)?;
        io::copy(&mut e, &mut out)?;
        out.sync_all()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))?;
    }
    let store = Store::open(&data_dir.join("store")).map_err(io::Error::other)?;
    let n = store.import(&dump[..])?;
    drop(store);
    for d in ["blobs", "certs", crate::server::archive::DIR, "."] {
        let p = data_dir.join(d);
        if p.exists() {
            crate::server::blobs::sync_dir(&p)?;
        }
    }
    Ok(format!(
        "restored {} files and {n} records into {} (backup of {})",
        manifest.files.len(),
        data_dir.display(),
        manifest.created_at
    ))
}
