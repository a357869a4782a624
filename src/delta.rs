//! BSDIFF40 patches (the format Debian's `bspatch` applies): making one from two images and
//! applying one, shared by the server's delta worker, `hangar delta make|apply` and the device
//! client. qbsdiff writes BSDIFF40 natively (header, then bzip2 control, diff and extra streams);
//! the choice against the `bsdiff` crate and Debian's bsdiff is measured in BENCHMARKS.md.
//!
//! Both directions hold their inputs in memory (suffix sorting needs random access to the old
//! image); callers bound that with [`estimate_peak_bytes`] and run it off the async runtime.

use std::io::{self, Write};
use std::path::Path;

/// The format name used in commands and the API.
pub const FORMAT: &str = "bsdiff40";

/// The first 8 bytes of every BSDIFF40 patch.
pub const MAGIC: &[u8; 8] = b"BSDIFF40";

/// A rough upper bound of the memory `make` needs: the old image, its suffix array (32-bit
/// entries), the new image, and the patch buffers.
pub fn estimate_peak_bytes(old_len: u64, new_len: u64) -> u64 {
    old_len * 6 + new_len * 2 + (16 << 20)
}

/// Images below this size are diffed twice with different match settings (in parallel) and the
/// smaller patch is kept: cheap for small images, and no single setting beats Debian's bsdiff on
/// every pair of the corpus (see BENCHMARKS.md).
const TWO_VARIANTS_BELOW: usize = 1 << 20;

fn variant(old: &[u8], new: &[u8], small_match: usize, jobs: usize) -> io::Result<Vec<u8>> {
    let mut patch = Vec::with_capacity(new.len() / 16 + 1024);
    qbsdiff::Bsdiff::new(old, new)
        // 0 = never skip short matches (qbsdiff's default 12 loses 5-10 % on Go binaries)
        .small_match(small_match)
        // bzip2 level 1 (100 kB blocks) compresses bsdiff's diff stream better than larger blocks
        .compression_level(1)
        .parallel_scheme(if jobs <= 1 {
            qbsdiff::ParallelScheme::Never
        } else {
            qbsdiff::ParallelScheme::NumJobs(jobs)
        })
        .compare(io::Cursor::new(&mut patch))?;
    Ok(patch)
}

/// Makes a BSDIFF40 patch turning `old` into `new`, searching on `threads` threads (0 = one per
/// core). Returns the patch size.
pub fn make(old: &[u8], new: &[u8], threads: usize, mut out: impl Write + Send) -> io::Result<u64> {
    if old.len() as u64 >= u32::MAX as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the old image is larger than 4 GiB, which bsdiff cannot index",
        ));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bsdiff-{i}"))
        .build()
        .map_err(io::Error::other)?;
    let jobs = pool.current_num_threads();
    let patch = pool.install(|| {
        if new.len() < TWO_VARIANTS_BELOW && jobs >= 2 {
            let (a, b) = rayon::join(|| variant(old, new, 0, 1), || variant(old, new, 12, 1));
            let (a, b) = (a?, b?);
            Ok::<_, io::Error>(if b.len() < a.len() { b } else { a })
        } else if new.len() < TWO_VARIANTS_BELOW {
            let (a, b) = (variant(old, new, 0, 1)?, variant(old, new, 12, 1)?);
            Ok(if b.len() < a.len() { b } else { a })
        } else {
            variant(old, new, 0, jobs)
        }
    })?;
    out.write_all(&patch)?;
    Ok(patch.len() as u64)
}

/// Applies a BSDIFF40 patch to `old`, writing the result to `out`. A patch whose header
/// announces more than `max_len` bytes is refused before anything is written; a corrupt patch
/// is an error, never a panic.
pub fn apply(old: &[u8], patch: &[u8], max_len: u64, out: impl Write) -> io::Result<u64> {
    if patch.len() < 32 || &patch[..8] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a BSDIFF40 patch (bad header)",
        ));
    }
    let p = qbsdiff::Bspatch::new(patch)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad patch: {e}")))?;
    if p.hint_target_size() > max_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the patch makes {} bytes, more than the {max_len} allowed",
                p.hint_target_size()
            ),
        ));
    }
    let expected = p.hint_target_size();
    let mut out = out;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.apply(old, &mut out)));
    match r {
        Ok(Ok(n)) if n == expected => Ok(n),
        Ok(Ok(n)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the patch produced {n} bytes, its header says {expected}"),
        )),
        Ok(Err(e)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the patch does not apply: {e}"),
        )),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the patch does not apply (corrupt control data)",
        )),
    }
}

/// Writes `path` atomically: a temp file in the same directory, fsynced, renamed, directory
/// fsynced.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut io::BufWriter<&std::fs::File>) -> io::Result<u64>,
) -> io::Result<u64> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let f = std::fs::File::create(&tmp)?;
    let r = (|| {
        let mut w = io::BufWriter::with_capacity(256 * 1024, &f);
        let n = fill(&mut w)?;
        w.flush()?;
        drop(w);
        f.sync_all()?;
        Ok(n)
    })();
    match r {
        Ok(n) => {
            std::fs::rename(&tmp, path)?;
            if let Ok(d) = std::fs::File::open(&dir) {
                d.sync_all()?;
            }
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn read(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// `hangar delta make OLD NEW PATCH`: returns the patch size.
pub fn make_files(old: &Path, new: &Path, patch: &Path, threads: usize) -> io::Result<u64> {
    let (o, n) = (read(old)?, read(new)?);
    write_atomically(patch, |w| make(&o, &n, threads, w))
}

/// `hangar delta apply OLD PATCH OUT`: returns the output size.
pub fn apply_files(old: &Path, patch: &Path, out: &Path) -> io::Result<u64> {
    let (o, p) = (read(old)?, read(patch)?);
    write_atomically(out, |w| apply(&o, &p, 1 << 40, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Vec<u8>, Vec<u8>) {
        let mut x = 0x9e3779b97f4a7c15u64;
        let old: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as u8
            })
            .collect();
        let mut new = old.clone();
        for i in (0..new.len()).step_by(5000) {
            new[i] = new[i].wrapping_add(1);
        }
        new.extend_from_slice(b"appended tail");
        (old, new)
    }

    #[test]
    fn round_trip_single_and_parallel() {
        let (old, new) = pair();
        for threads in [1, 2] {
            let mut patch = Vec::new();
            let n = make(&old, &new, threads, &mut patch).unwrap();
            assert_eq!(n as usize, patch.len());
            assert_eq!(&patch[..8], MAGIC);
            assert!(patch.len() < new.len() / 4, "{} bytes", patch.len());
            let mut out = Vec::new();
            apply(&old, &patch, new.len() as u64, &mut out).unwrap();
            assert_eq!(out, new);
        }
    }

    #[test]
    fn corrupt_patches_are_errors() {
        let (old, new) = pair();
        let mut patch = Vec::new();
        make(&old, &new, 1, &mut patch).unwrap();
        let mut out = Vec::new();
        assert!(
            apply(
                &old,
                b"BSDIFF41 and more bytes to make 32..",
                1 << 30,
                &mut out
            )
            .is_err()
        );
        assert!(apply(&old, &patch[..patch.len() / 2], 1 << 30, &mut out).is_err());
        assert!(apply(&old, &patch, 10, &mut out).is_err(), "size cap");
        for at in [40, patch.len() / 2, patch.len() - 3] {
            let mut bad = patch.clone();
            bad[at] ^= 0x55;
            let mut out = Vec::new();
            if apply(&old, &bad, 1 << 30, &mut out).is_ok() {
                // bzip2 has CRCs, so flipping a byte is nearly always caught; if it was not,
                // the output must at least differ (the caller's hash check catches it)
                assert_ne!(out, new);
            }
        }
    }
}
