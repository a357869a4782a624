//! The offline bundle: one tar file that carries firmware from a vendor's machine to an
//! air-gapped site. Shared by `hangar bundle create|verify` (the operator's side) and the
//! appliance's import.
//!
//! Layout (POSIX ustar, readable by any `tar`):
//! 1. `bundle.json` — the [`Manifest`];
//! 2. `bundle.json.minisig` — its minisign signature, trusted comment
//!    `hangar-bundle id=<id> sequence=<n>`;
//! 3. the items the manifest lists, each exactly once, in any order: `firmware/<n>.bin`,
//!    `deltas/<n>.bsdiff`.
//!
//! The reader is our own and strict: regular files only (no links, directories, long-name or
//! pax entries), checksummed headers, names that are exactly the manifest's, sizes that match,
//! nothing after the end. It never holds an item in memory.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::trust::{Keyring, Signature, TrustedKey};

/// The manifest's `format`.
pub const FORMAT: &str = "hangar-bundle/1";
/// Name of the first entry.
pub const MANIFEST: &str = "bundle.json";
/// Name of the second entry.
pub const MANIFEST_SIG: &str = "bundle.json.minisig";
/// Largest manifest accepted.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Most items (firmware + deltas) one bundle may list.
pub const MAX_ITEMS: usize = 1024;
/// Most campaign plans and trust changes one bundle may carry.
pub const MAX_EXTRAS: usize = 64;

/// `bundle.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// Unique id of this bundle (the same bundle imported twice is a no-op).
    pub id: String,
    /// Key id of the signer (16 hex digits).
    pub signer: String,
    /// The signer's sequence number: an import refuses one not above the last it saw.
    pub sequence: u64,
    /// When it was made (informational only: nothing checks a clock).
    #[serde(default)]
    pub created_at: String,
    /// Firmware images.
    #[serde(default)]
    pub firmware: Vec<FirmwareItem>,
    /// Precomputed BSDIFF40 patches between images.
    #[serde(default)]
    pub deltas: Vec<DeltaItem>,
    /// Campaign plans (the API's campaign body), created paused (or scheduled, with
    /// `startAt`) for an operator to start.
    #[serde(default)]
    pub campaigns: Vec<serde_json::Value>,
    /// Keys the site should trust from now on (signed, with the manifest, by a trusted key).
    #[serde(default)]
    pub trust: Vec<TrustItem>,
}

/// One image of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FirmwareItem {
    /// Entry name in the tar.
    pub path: String,
    /// Device type.
    pub device_type: String,
    /// Version.
    pub version: String,
    /// Bytes.
    pub size: u64,
    /// Hex sha256.
    pub sha256: String,
    /// The image's own minisign signature (`.minisig` text).
    pub signature: String,
    /// Release notes.
    #[serde(default)]
    pub description: String,
}

/// One patch of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeltaItem {
    /// Entry name in the tar.
    pub path: String,
    /// Device type of both images.
    pub device_type: String,
    /// The version it applies to.
    pub from_version: String,
    /// The version it makes.
    pub to_version: String,
    /// sha256 of the image it applies to.
    pub from_sha256: String,
    /// sha256 of the image it makes.
    pub to_sha256: String,
    /// Bytes of the patch.
    pub size: u64,
    /// Hex sha256 of the patch.
    pub sha256: String,
}

/// A key to trust.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustItem {
    /// Its name at the site.
    pub name: String,
    /// The minisign public key (base64 line).
    pub key: String,
}

/// Why a bundle is refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a well-formed bundle (tar, names, sizes, manifest).
    #[error("{0}")]
    Malformed(String),
    /// A signature or hash does not verify, or the signer is not trusted.
    #[error("{0}")]
    Unverified(String),
    /// Reading it failed.
    #[error("reading the bundle: {0}")]
    Io(#[from] io::Error),
}

fn malformed(m: impl Into<String>) -> BundleError {
    BundleError::Malformed(m.into())
}

/// The trusted comment of a manifest signature.
pub fn manifest_comment(id: &str, sequence: u64) -> String {
    format!("hangar-bundle id={id} sequence={sequence}")
}

fn hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Manifest {
    /// Checks what can be checked without the items: format, counts, names, ids.
    pub fn validate(&self) -> Result<(), BundleError> {
        if self.format != FORMAT {
            return Err(malformed(format!(
                "bundle format {:?}; this appliance reads {FORMAT:?}",
                self.format
            )));
        }
        let id_ok = (1..=64).contains(&self.id.len())
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok {
            return Err(malformed("the bundle id must match [A-Za-z0-9_-]{1,64}"));
        }
        if self.firmware.len() + self.deltas.len() > MAX_ITEMS {
            return Err(malformed(format!(
                "the manifest lists {} items; at most {MAX_ITEMS}",
                self.firmware.len() + self.deltas.len()
            )));
        }
        if self.campaigns.len() > MAX_EXTRAS || self.trust.len() > MAX_EXTRAS {
            return Err(malformed(format!(
                "at most {MAX_EXTRAS} campaign plans and {MAX_EXTRAS} trust changes"
            )));
        }
        let mut names = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for f in &self.firmware {
            if !crate::ids::valid_device_type(&f.device_type)
                || !crate::ids::valid_version(&f.version)
            {
                return Err(malformed(format!(
                    "firmware {:?} {:?}: device type or version not valid",
                    f.device_type, f.version
                )));
            }
            if !keys.insert((f.device_type.clone(), f.version.clone())) {
                return Err(malformed(format!(
                    "firmware {} {} is listed twice",
                    f.device_type, f.version
                )));
            }
            if !hex64(&f.sha256) {
                return Err(malformed(format!(
                    "firmware {}: sha256 is not 64 hex digits",
                    f.path
                )));
            }
            Signature::parse(&f.signature).map_err(|e| {
                malformed(format!(
                    "firmware {} {}: its signature: {e}",
                    f.device_type, f.version
                ))
            })?;
            item_name(&f.path, "firmware/", ".bin")?;
            if !names.insert(f.path.clone()) {
                return Err(malformed(format!("{} is listed twice", f.path)));
            }
        }
        for d in &self.deltas {
            if !crate::ids::valid_device_type(&d.device_type)
                || !crate::ids::valid_version(&d.from_version)
                || !crate::ids::valid_version(&d.to_version)
            {
                return Err(malformed(format!(
                    "delta {}: device type or versions not valid",
                    d.path
                )));
            }
            if ![&d.sha256, &d.from_sha256, &d.to_sha256]
                .iter()
                .all(|s| hex64(s))
            {
                return Err(malformed(format!(
                    "delta {}: a sha256 is not 64 hex digits",
                    d.path
                )));
            }
            item_name(&d.path, "deltas/", ".bsdiff")?;
            if !names.insert(d.path.clone()) {
                return Err(malformed(format!("{} is listed twice", d.path)));
            }
        }
        for t in &self.trust {
            if !crate::ids::valid_device_type(&t.name) {
                return Err(malformed(format!(
                    "trust change {:?}: names match [A-Za-z0-9_-]{{1,64}}",
                    t.name
                )));
            }
            TrustedKey::parse(&t.name, &t.key)
                .map_err(|e| malformed(format!("trust change {}: {e}", t.name)))?;
        }
        Ok(())
    }

    /// The size a listed entry must have.
    pub fn size_of(&self, name: &str) -> Option<u64> {
        self.firmware
            .iter()
            .find(|f| f.path == name)
            .map(|f| f.size)
            .or_else(|| self.deltas.iter().find(|d| d.path == name).map(|d| d.size))
    }

    /// Every entry name the tar must hold after the manifest and its signature.
    pub fn entry_names(&self) -> Vec<&str> {
        self.firmware
            .iter()
            .map(|f| f.path.as_str())
            .chain(self.deltas.iter().map(|d| d.path.as_str()))
            .collect()
    }
}

/// `firmware/<n>.bin` or `deltas/<n>.bsdiff`, `<n>` decimal: the only names items may have.
fn item_name(name: &str, prefix: &str, suffix: &str) -> Result<(), BundleError> {
    let ok = name
        .strip_prefix(prefix)
        .and_then(|r| r.strip_suffix(suffix))
        .is_some_and(|n| (1..=6).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(malformed(format!(
            "item name {name:?} must be {prefix}<number>{suffix}"
        )))
    }
}

/// Checks a manifest's signature against `keys`: the trusted key that made it.
pub fn verify_manifest<'a>(
    keys: &'a Keyring,
    manifest: &[u8],
    sig_text: &str,
) -> Result<(&'a TrustedKey, Manifest), BundleError> {
    let sig = Signature::parse(sig_text)
        .map_err(|e| BundleError::Unverified(format!("the manifest signature: {e}")))?;
    let key = keys.signer_of(&sig).map_err(|e| {
        BundleError::Unverified(format!(
            "the bundle is {e}: add its public key to [trust] keys"
        ))
    })?;
    key.verify_bytes(&sig, manifest)
        .map_err(|e| BundleError::Unverified(format!("the manifest: {e}")))?;
    let m: Manifest =
        serde_json::from_slice(manifest).map_err(|e| malformed(format!("bundle.json: {e}")))?;
    if sig.trusted_comment() != manifest_comment(&m.id, m.sequence) {
        return Err(BundleError::Unverified(format!(
            "the manifest signature's trusted comment {:?} does not name this bundle",
            sig.trusted_comment()
        )));
    }
    if !m.signer.eq_ignore_ascii_case(&key.key_id) {
        return Err(BundleError::Unverified(format!(
            "the manifest names signer {} but key {} signed it",
            m.signer, key.key_id
        )));
    }
    m.validate()?;
    Ok((key, m))
}

/// One entry of a ustar stream: its name and size (the data follows in the reader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryHeader {
    /// The full name (ustar prefix + name).
    pub name: String,
    /// Data bytes.
    pub size: u64,
}

/// A strict, streaming ustar reader: regular files only.
pub struct TarReader<R> {
    inner: R,
    /// Data bytes of the current entry not yet read.
    left: u64,
    /// Padding after the current entry's data.
    pad: u64,
    done: bool,
}

impl<R: Read> TarReader<R> {
    /// Reads a tar from `inner`.
    pub fn new(inner: R) -> TarReader<R> {
        TarReader {
            inner,
            left: 0,
            pad: 0,
            done: false,
        }
    }

    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<(), BundleError> {
        let mut got = 0;
        while got < 512 {
            let n = self.inner.read(&mut block[got..])?;
            if n == 0 {
                return Err(malformed(
                    "the bundle is truncated (the tar ends in the middle of a header or before its end marker)",
                ));
            }
            got += n;
        }
        Ok(())
    }

    fn skip(&mut self, mut n: u64) -> Result<(), BundleError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            let got = self.inner.read(&mut buf[..want])?;
            if got == 0 {
                return Err(malformed("the bundle is truncated inside an entry"));
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// The next entry's header, after skipping what is left of the current one; `None` at
    /// the end marker (two zero blocks), after which nothing may follow.
    pub fn next_entry(&mut self) -> Result<Option<EntryHeader>, BundleError> {
        if self.done {
            return Ok(None);
        }
        let rest = self.left + self.pad;
        self.skip(rest)?;
        self.left = 0;
        self.pad = 0;
        let mut h = [0u8; 512];
        self.read_block(&mut h)?;
        if h.iter().all(|&b| b == 0) {
            self.read_block(&mut h)?;
            if !h.iter().all(|&b| b == 0) {
                return Err(malformed("a zero block in the middle of the tar"));
            }
            // padding to a record boundary is allowed, but nothing else
            let mut tail = [0u8; 8192];
            loop {
                let n = self.inner.read(&mut tail)?;
                if n == 0 {
                    break;
                }
                if tail[..n].iter().any(|&b| b != 0) {
                    return Err(malformed("data after the tar's end marker"));
                }
            }
            self.done = true;
            return Ok(None);
        }
        let stored = octal(&h[148..156])
            .ok_or_else(|| malformed("a tar header with a bad checksum field"))?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as u64
                }
            })
            .sum();
        if sum != stored {
            return Err(malformed(
                "a tar header's checksum does not match (a damaged bundle)",
            ));
        }
        let field = |r: std::ops::Range<usize>| {
            let f = &h[r];
            let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
            std::str::from_utf8(&f[..end])
                .map(str::to_string)
                .map_err(|_| malformed("a tar entry name is not UTF-8"))
        };
        let name = field(0..100)?;
        let prefix = if &h[257..262] == b"ustar" {
            field(345..500)?
        } else {
            String::new()
        };
        let name = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        match h[156] {
            b'0' | 0 => {}
            t => {
                let what = match t {
                    b'1' => "a hard link",
                    b'2' => "a symbolic link",
                    b'5' => "a directory",
                    b'x' | b'g' => "a pax header",
                    b'L' | b'K' => "a GNU long name",
                    _ => "not a regular file",
                };
                return Err(malformed(format!(
                    "tar entry {name:?} is {what}: a bundle holds regular files only"
                )));
            }
        }
        let size = octal(&h[124..136])
            .ok_or_else(|| malformed(format!("tar entry {name:?} has a bad size field")))?;
        self.left = size;
        self.pad = (512 - size % 512) % 512;
        Ok(Some(EntryHeader { name, size }))
    }

    /// Reads the current entry's data, at most its size.
    pub fn entry(&mut self) -> EntryData<'_, R> {
        EntryData { tar: self }
    }
}

/// The data of the current entry; see [`TarReader::entry`].
pub struct EntryData<'a, R> {
    tar: &'a mut TarReader<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tar.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.tar.left.min(usize::MAX as u64) as usize);
        let n = self.tar.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the bundle is truncated inside an entry",
            ));
        }
        self.tar.left -= n as u64;
        Ok(n)
    }
}

fn octal(f: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(f).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() || s.len() > 11 {
        return None;
    }
    u64::from_str_radix(s, 8).ok()
}

/// Writes one ustar entry header for a regular file of `size` bytes (name < 100 bytes).
pub fn write_header(w: &mut impl Write, name: &str, size: u64) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    w.write_all(h.as_bytes())
}

/// Zero padding after `size` bytes of data.
pub fn write_padding(w: &mut impl Write, size: u64) -> io::Result<()> {
    let pad = ((512 - size % 512) % 512) as usize;
    w.write_all(&[0u8; 512][..pad])
}

/// Writes one whole entry: header, the `size` bytes `data` yields (exactly), padding.
pub fn write_entry(
    w: &mut impl Write,
    name: &str,
    data: &mut dyn Read,
    size: u64,
) -> io::Result<()> {
    write_header(w, name, size)?;
    let n = io::copy(&mut data.take(size), w)?;
    if n != size {
        return Err(io::Error::other(format!(
            "{name}: {n} bytes where {size} were announced (did it change while it was read?)"
        )));
    }
    write_padding(w, size)
}

/// The end marker.
pub fn write_end(w: &mut impl Write) -> io::Result<()> {
    w.write_all(&[0u8; 1024])
}

/// Reads a whole small entry (the manifest, its signature) of at most `max` bytes.
pub fn read_small<R: Read>(
    tar: &mut TarReader<R>,
    want: &str,
    max: u64,
) -> Result<Vec<u8>, BundleError> {
    let h = tar.next_entry()?.ok_or_else(|| {
        malformed(format!(
            "the bundle is empty: its first entries must be {MANIFEST} and {MANIFEST_SIG}"
        ))
    })?;
    if h.name != want {
        return Err(malformed(format!(
            "entry {:?} where {want} must be: a bundle starts with {MANIFEST} and {MANIFEST_SIG}",
            h.name
        )));
    }
    if h.size > max {
        return Err(malformed(format!(
            "{want} is {} bytes; at most {max}",
            h.size
        )));
    }
    let mut buf = Vec::with_capacity(h.size as usize);
    tar.entry().read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in entries {
            write_entry(&mut out, name, &mut &data[..], data.len() as u64).unwrap();
        }
        write_end(&mut out).unwrap();
        out
    }

    fn names(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
        let mut t = TarReader::new(bytes);
        let mut out = Vec::new();
        while let Some(h) = t.next_entry()? {
            let mut d = Vec::new();
            t.entry().read_to_end(&mut d)?;
            out.push((h.name, d));
        }
        Ok(out)
    }

    #[test]
    fn reads_what_it_writes_and_what_tar_reads() {
        let b = tar_of(&[("bundle.json", b"{}"), ("firmware/0.bin", &[7u8; 1000])]);
        let got = names(&b).unwrap();
        assert_eq!(got[0], ("bundle.json".into(), b"{}".to_vec()));
        assert_eq!(got[1].1.len(), 1000);
        // the tar crate agrees
        let mut a = tar::Archive::new(&b[..]);
        assert_eq!(a.entries().unwrap().count(), 2);
    }

    #[test]
    fn refuses_truncation_links_garbage_and_trailing_data() {
        let b = tar_of(&[("bundle.json", b"{}"), ("firmware/0.bin", &[7u8; 1000])]);
        for cut in [1, 511, 512, 600, 1024, 1500, b.len() - 1024, b.len() - 1] {
            assert!(names(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.extend_from_slice(b"junk");
        assert!(names(&extra).is_err());
        let mut flipped = b.clone();
        flipped[10] ^= 1; // in the first header's name: checksum mismatch
        assert!(names(&flipped).is_err());

        let mut link = Vec::new();
        let mut h = tar::Header::new_ustar();
        h.set_path("firmware/0.bin").unwrap();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_link_name("/etc/passwd").unwrap();
        h.set_cksum();
        link.extend_from_slice(h.as_bytes());
        write_end(&mut link).unwrap();
        let e = names(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn item_names_are_fixed_shapes() {
        for bad in [
            "../x.bin",
            "/etc/passwd",
            "firmware/../0.bin",
            "firmware/a.bin",
            "firmware/0.bin/x",
            "firmware/.bin",
        ] {
            assert!(item_name(bad, "firmware/", ".bin").is_err(), "{bad}");
        }
        assert!(item_name("firmware/12.bin", "firmware/", ".bin").is_ok());
    }
}
