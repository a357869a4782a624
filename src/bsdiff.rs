//! BSDIFF40 patches (the format Debian's `bspatch` applies): making one from two images and
//! applying one, shared by the server's delta worker, `hangar delta make|apply` and the device
//! client. qbsdiff writes BSDIFF40 natively (header, then bzip2 control, diff and extra streams);
//! applying is our own streaming code with every offset checked ([`apply`]);
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
/// announces more than `max_len` bytes is refused before anything is written; a corrupt or
/// hostile patch is an error, never a panic: every length and offset of its control data is
/// checked before it is used (qbsdiff's own applier overflowed on such patches — found by the
/// `bspatch` fuzz target), and the output never exceeds what the header announced.
pub fn apply(old: &[u8], patch: &[u8], max_len: u64, mut out: impl Write) -> io::Result<u64> {
    use std::io::Read;
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if patch.len() < 32 || &patch[..8] != MAGIC {
        return Err(bad("not a BSDIFF40 patch (bad header)".into()));
    }
    let field = |i: usize| offtin(patch[i..i + 8].try_into().expect("8 bytes"));
    let (ctrl_len, diff_len, new_len) = (field(8), field(16), field(24));
    if ctrl_len < 0 || diff_len < 0 || new_len < 0 {
        return Err(bad("bad patch: negative length in the header".into()));
    }
    let (ctrl_len, diff_len, new_len) = (ctrl_len as u64, diff_len as u64, new_len as u64);
    if new_len > max_len {
        return Err(bad(format!(
            "the patch makes {new_len} bytes, more than the {max_len} allowed"
        )));
    }
    let body = (patch.len() - 32) as u64;
    if ctrl_len > body || diff_len > body - ctrl_len {
        return Err(bad(
            "bad patch: its streams are longer than the patch".into()
        ));
    }
    let (c0, d0) = (32 + ctrl_len as usize, 32 + (ctrl_len + diff_len) as usize);
    let mut ctrl = bzip2::read::BzDecoder::new(&patch[32..c0]);
    let mut diff = bzip2::read::BzDecoder::new(&patch[c0..d0]);
    let mut extra = bzip2::read::BzDecoder::new(&patch[d0..]);
    let stream = |e: io::Error| bad(format!("the patch does not apply: {e}"));
    let mut written: u64 = 0;
    let mut old_pos: i64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while written < new_len {
        let mut triple = [0u8; 24];
        ctrl.read_exact(&mut triple).map_err(stream)?;
        let add = offtin(triple[0..8].try_into().expect("8 bytes"));
        let copy = offtin(triple[8..16].try_into().expect("8 bytes"));
        let seek = offtin(triple[16..24].try_into().expect("8 bytes"));
        if add < 0 || copy < 0 {
            return Err(bad("bad patch: negative length in its control data".into()));
        }
        let (add, copy) = (add as u64, copy as u64);
        if add > new_len - written || copy > new_len - written - add {
            return Err(bad("bad patch: it writes past the announced length".into()));
        }
        // add: diff bytes plus the old image's bytes at old_pos (0 outside the old image)
        let mut left = add;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            diff.read_exact(&mut buf[..n]).map_err(stream)?;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                let at = old_pos.checked_add(i as i64);
                if let Some(at) = at
                    && at >= 0
                    && (at as u64) < old.len() as u64
                {
                    *b = b.wrapping_add(old[at as usize]);
                }
            }
            out.write_all(&buf[..n])?;
            old_pos = old_pos
                .checked_add(n as i64)
                .ok_or_else(|| bad("bad patch: offset overflow".into()))?;
            left -= n as u64;
        }
        // copy: extra bytes as they are
        let mut left = copy;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            extra.read_exact(&mut buf[..n]).map_err(stream)?;
            out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        written += add + copy;
        old_pos = old_pos
            .checked_add(seek)
            .ok_or_else(|| bad("bad patch: offset overflow".into()))?;
    }
    Ok(written)
}

/// BSDIFF's 8-byte sign-and-magnitude little-endian integer.
fn offtin(b: [u8; 8]) -> i64 {
    let magnitude = (u64::from_le_bytes(b) & !(1 << 63)) as i64;
    if b[7] & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
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
