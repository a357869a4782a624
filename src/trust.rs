//! Keys and signatures in minisign's format (Ed25519), shared by the appliance, the device side
//! and the operator's client: one key format that Debian's `minisign` tool reads and writes.
//!
//! - A public key is minisign's base64 line (`RW...`, 56 characters), or the whole `.pub` file
//!   (its `untrusted comment:` line is ignored). Its **key id** is the 16 hex digits minisign
//!   prints (`{:016X}` of the little-endian key number).
//! - A signature is the `.minisig` text. Only the prehashed form (BLAKE2b-512 of the file, then
//!   Ed25519; minisign's default since 0.8) is accepted: it can be checked while the bytes
//!   stream, so no image is ever held in memory. The trusted comment is covered by the
//!   signature, so what it says can be relied on.
//! - A firmware signature made by `hangar firmware sign` binds what the image is in its trusted
//!   comment: `deviceType=T version=V sha256=HEX`. A signature by the stock `minisign -S`
//!   (comment `timestamp:… file:…`) binds only the bytes, which is equally valid: the
//!   image is what the key's owner signed. Nothing here reads a clock.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;

/// The longest `.minisig` text accepted (a real one is about 300 bytes).
pub const MAX_SIGNATURE_BYTES: usize = 4096;

/// Why a key or a signature could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Not a minisign key or signature at all.
    #[error("{0}")]
    Malformed(String),
    /// Well-formed, made by a key that is not trusted here.
    #[error("signed by key {key_id}, which is not a trusted key")]
    UntrustedKey {
        /// The signature's key id.
        key_id: String,
    },
    /// The signature does not match the bytes or its trusted comment.
    #[error("{0}")]
    Mismatch(String),
    /// Two keys of one keyring share a name or are the same key.
    #[error("{0}")]
    Duplicate(String),
    /// Reading the signed bytes or a key file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being read.
        context: String,
        /// The cause.
        source: io::Error,
    },
}

/// A public key with its id and the name it is trusted under.
#[derive(Clone)]
pub struct TrustedKey {
    /// The name from the config (or from the bundle that added it).
    pub name: String,
    /// 16 upper-case hex digits, as minisign prints it.
    pub key_id: String,
    /// The base64 line (`RW…`).
    pub base64: String,
    key: minisign_verify::PublicKey,
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedKey({} {})", self.name, self.key_id)
    }
}

impl PartialEq for TrustedKey {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.base64 == other.base64
    }
}

fn key_id_hex(bytes: &[u8]) -> String {
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    format!("{:016X}", u64::from_le_bytes(n))
}

fn b64(line: &str) -> Result<Vec<u8>, TrustError> {
    base64::engine::general_purpose::STANDARD
        .decode(line.trim())
        .map_err(|e| TrustError::Malformed(format!("not base64: {e}")))
}

impl TrustedKey {
    /// Parses a public key (the base64 line or a whole `.pub` file) trusted as `name`.
    pub fn parse(name: &str, text: &str) -> Result<TrustedKey, TrustError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or_else(|| TrustError::Malformed("an empty public key".into()))?;
        let bytes = b64(line)?;
        if bytes.len() != 42 || &bytes[..2] != b"Ed" {
            return Err(TrustError::Malformed(
                "not a minisign public key (expected the 56-character line starting with RW)"
                    .into(),
            ));
        }
        let key = minisign_verify::PublicKey::from_base64(line)
            .map_err(|e| TrustError::Malformed(format!("not a minisign public key: {e}")))?;
        Ok(TrustedKey {
            name: name.to_string(),
            key_id: key_id_hex(&bytes[2..10]),
            base64: line.to_string(),
            key,
        })
    }

    /// The `.pub` file text of this key.
    pub fn to_pub_file(&self) -> String {
        format!(
            "untrusted comment: minisign public key {}\n{}\n",
            self.key_id, self.base64
        )
    }

    /// Checks `sig` over everything `r` yields, streaming (bounded memory).
    pub fn verify_reader(&self, sig: &Signature, mut r: impl Read) -> Result<(), TrustError> {
        let mut v = self.stream(sig)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).map_err(|source| TrustError::Io {
                context: "reading the signed bytes".into(),
                source,
            })?;
            if n == 0 {
                break;
            }
            v.update(&buf[..n]);
        }
        v.finish()
    }

    /// Checks `sig` over bytes in memory (manifests, reports, keys: small things).
    pub fn verify_bytes(&self, sig: &Signature, bytes: &[u8]) -> Result<(), TrustError> {
        let mut v = self.stream(sig)?;
        v.update(bytes);
        v.finish()
    }

    /// A verifier fed chunk by chunk (the upload and import paths hash while they write).
    pub fn stream<'a>(&'a self, sig: &'a Signature) -> Result<Stream<'a>, TrustError> {
        if sig.key_id != self.key_id {
            return Err(TrustError::UntrustedKey {
                key_id: sig.key_id.clone(),
            });
        }
        Ok(Stream {
            key: &self.key,
            sig,
            hash: blake2b_simd::Params::new().hash_length(64).to_state(),
        })
    }
}

/// An incremental signature check; see [`TrustedKey::stream`].
///
/// The prehash is `blake2b_simd`'s BLAKE2b (AVX2 when the CPU has it: about a quarter less CPU
/// per byte here than `minisign-verify`'s own, measured in ARCHITECTURE.md); the Ed25519 checks
/// of the digest and of the trusted comment stay `minisign-verify`'s.
pub struct Stream<'a> {
    key: &'a minisign_verify::PublicKey,
    sig: &'a Signature,
    hash: blake2b_simd::State,
}

impl Stream<'_> {
    /// Feeds signed bytes.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hash.update(chunk);
    }

    /// Whether the bytes fed match the signature and its trusted comment.
    pub fn finish(self) -> Result<(), TrustError> {
        let digest = self.hash.finalize();
        let digest = digest.as_bytes();
        // A prehashed ("ED") signature is Ed25519 over the BLAKE2b-512 digest of the bytes; the
        // same signature labelled "Ed" is Ed25519 over its message as given. So checking the
        // "Ed" twin over the digest is the prehashed check, with the digest computed here.
        self.key
            .verify(digest, &self.sig.of_digest, true)
            .map_err(|_| {
                TrustError::Mismatch(
                    "the signature does not match these bytes (altered content or signature)"
                        .into(),
                )
            })
    }
}

/// A parsed `.minisig`.
#[derive(Clone)]
pub struct Signature {
    /// The key id of the key that made it.
    pub key_id: String,
    /// The `.minisig` text as given.
    pub text: String,
    inner: minisign_verify::Signature,
    /// The same signature labelled as made over its message directly (see [`Stream::finish`]).
    of_digest: minisign_verify::Signature,
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature(key {})", self.key_id)
    }
}

impl Signature {
    /// Parses the `.minisig` text: four lines, prehashed only, at most
    /// [`MAX_SIGNATURE_BYTES`].
    pub fn parse(text: &str) -> Result<Signature, TrustError> {
        if text.len() > MAX_SIGNATURE_BYTES {
            return Err(TrustError::Malformed(format!(
                "a signature of {} bytes; a minisign signature is about 300",
                text.len()
            )));
        }
        let bad = |why: &str| TrustError::Malformed(format!("not a minisign signature: {why}"));
        let mut lines = text.lines();
        let first = lines.next().unwrap_or("");
        if !first.starts_with("untrusted comment:") {
            return Err(bad("the first line must be `untrusted comment: …`"));
        }
        let sig_line = lines.next().ok_or_else(|| bad("no signature line"))?;
        let bytes = b64(sig_line)?;
        if bytes.len() != 74 {
            return Err(bad("the signature line has the wrong length"));
        }
        match &bytes[..2] {
            b"ED" => {}
            b"Ed" => {
                return Err(TrustError::Malformed(
                    "a legacy (not prehashed) minisign signature: sign again with minisign 0.8 or later (its default) or `hangar firmware sign`"
                        .into(),
                ));
            }
            _ => return Err(bad("unknown signature algorithm")),
        }
        let inner = minisign_verify::Signature::decode(text).map_err(|e| bad(&e.to_string()))?;
        let mut twin = bytes.clone();
        twin[..2].copy_from_slice(b"Ed");
        let twin = format!(
            "untrusted comment: the digest's check\n{}\ntrusted comment: {}\n{}\n",
            base64::engine::general_purpose::STANDARD.encode(&twin),
            inner.trusted_comment(),
            lines
                .nth(1)
                .ok_or_else(|| bad("no global signature line"))?
                .trim()
        );
        let of_digest =
            minisign_verify::Signature::decode(&twin).map_err(|e| bad(&e.to_string()))?;
        Ok(Signature {
            key_id: key_id_hex(&bytes[2..10]),
            text: text.to_string(),
            inner,
            of_digest,
        })
    }

    /// The trusted comment (covered by the signature).
    pub fn trusted_comment(&self) -> &str {
        self.inner.trusted_comment()
    }
}

/// The keys one party trusts, each under a name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Keyring {
    keys: Vec<TrustedKey>,
}

impl Keyring {
    /// A keyring of `keys` (names and ids unique; the caller has checked).
    pub fn new(keys: Vec<TrustedKey>) -> Keyring {
        Keyring { keys }
    }

    /// Parses `(name, text)` pairs; the first bad one is the error, with its name.
    pub fn parse<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Keyring, TrustError> {
        let mut keys: Vec<TrustedKey> = Vec::new();
        for (name, text) in pairs {
            let k = TrustedKey::parse(name, text)
                .map_err(|e| TrustError::Malformed(format!("key {name:?}: {e}")))?;
            if keys.iter().any(|o| o.name == k.name) {
                return Err(TrustError::Duplicate(format!(
                    "two keys are named {name:?}"
                )));
            }
            if let Some(o) = keys.iter().find(|o| o.key_id == k.key_id) {
                return Err(TrustError::Duplicate(format!(
                    "keys {:?} and {name:?} are the same key ({})",
                    o.name, k.key_id
                )));
            }
            keys.push(k);
        }
        Ok(Keyring { keys })
    }

    /// Parses keys that have no names of their own (an agent's `trusted_keys`, `--key`
    /// arguments): they are named `key0`, `key1`, ... in order.
    pub fn parse_unnamed<S: AsRef<str>>(texts: &[S]) -> Result<Keyring, TrustError> {
        let names: Vec<String> = (0..texts.len()).map(|i| format!("key{i}")).collect();
        Keyring::parse(
            names
                .iter()
                .map(String::as_str)
                .zip(texts.iter().map(AsRef::as_ref)),
        )
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys, in order.
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// The key that made `sig`, if trusted.
    pub fn signer_of(&self, sig: &Signature) -> Result<&TrustedKey, TrustError> {
        self.keys
            .iter()
            .find(|k| k.key_id == sig.key_id)
            .ok_or_else(|| TrustError::UntrustedKey {
                key_id: sig.key_id.clone(),
            })
    }

    /// The key named `name`.
    pub fn by_name(&self, name: &str) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.name == name)
    }

    /// Adds a key (a trust change carried by a bundle); replaces one of the same name.
    pub fn add(&mut self, key: TrustedKey) {
        self.keys
            .retain(|k| k.name != key.name && k.key_id != key.key_id);
        self.keys.push(key);
    }
}

/// A key given on a command line: the path of a `.pub` file (read) or the key itself.
pub fn key_arg(arg: &str) -> io::Result<String> {
    if Path::new(arg).exists() {
        std::fs::read_to_string(arg)
    } else {
        Ok(arg.to_string())
    }
}

/// The trusted comment `hangar firmware sign` writes: what the image is.
pub fn firmware_comment(device_type: &str, version: &str, sha256: &str) -> String {
    format!("deviceType={device_type} version={version} sha256={sha256}")
}

/// Checks what a firmware signature's trusted comment says against the firmware it came with.
/// Each of `deviceType=`, `version=`, `sha256=` that the comment carries must match; a comment
/// with none of them (the stock `minisign -S` one) binds only the bytes, which were checked.
pub fn check_firmware_comment(
    comment: &str,
    device_type: &str,
    version: &str,
    sha256: &str,
) -> Result<(), TrustError> {
    for token in comment.split_whitespace() {
        let Some((k, v)) = token.split_once('=') else {
            continue;
        };
        let (want, what) = match k {
            "deviceType" => (device_type, "device type"),
            "version" => (version, "version"),
            "sha256" => (sha256, "sha256"),
            _ => continue,
        };
        if !v.eq_ignore_ascii_case(want) {
            return Err(TrustError::Mismatch(format!(
                "the signature was made for {what} {v}, not {want} (its trusted comment: {comment:?})"
            )));
        }
    }
    Ok(())
}

/// A secret key, decrypted, ready to sign.
pub struct SecretKey {
    sk: minisign::SecretKey,
    /// Its key id.
    pub key_id: String,
}

impl SecretKey {
    /// Reads a minisign secret key file. An encrypted key asks `password` for its password
    /// (called only then).
    pub fn load(
        path: &Path,
        password: impl FnOnce() -> io::Result<String>,
    ) -> Result<SecretKey, TrustError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrustError::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        let boxed = minisign::SecretKeyBox::from_string(&text)
            .map_err(|e| TrustError::Malformed(format!("{}: {e}", path.display())))?;
        let encrypted = text
            .lines()
            .nth(1)
            .and_then(|l| b64(l).ok())
            .is_some_and(|b| b.len() >= 4 && &b[2..4] == b"Sc");
        let sk = if encrypted {
            let pw = password().map_err(|source| TrustError::Io {
                context: "reading the key's password".into(),
                source,
            })?;
            minisign::SecretKey::from_box(boxed, Some(pw))
        } else {
            minisign::SecretKey::from_unencrypted_box(boxed)
        }
        .map_err(|e| TrustError::Malformed(format!("{}: {e}", path.display())))?;
        let key_id = key_id_hex(sk.keynum());
        Ok(SecretKey { sk, key_id })
    }

    /// Signs everything `r` yields (prehashed), with `trusted_comment`; the `.minisig` text.
    pub fn sign(&self, r: impl Read, trusted_comment: &str) -> Result<String, TrustError> {
        let untrusted = format!("signature from minisign secret key {}", self.key_id);
        minisign::sign(None, &self.sk, r, Some(trusted_comment), Some(&untrusted))
            .map(|b| b.into_string())
            .map_err(|e| TrustError::Mismatch(format!("signing failed: {e}")))
    }

    /// The public half.
    pub fn public(&self, name: &str) -> Result<TrustedKey, TrustError> {
        let pk = minisign::PublicKey::from_secret_key(&self.sk)
            .map_err(|e| TrustError::Malformed(e.to_string()))?;
        TrustedKey::parse(name, &pk.to_base64())
    }
}

/// Writes a new key pair as `<stem>.key` (mode 0600, encrypted when a password is given) and
/// `<stem>.pub`, refusing to overwrite either. Returns both paths.
pub fn generate(stem: &Path, password: Option<String>) -> Result<(PathBuf, PathBuf), TrustError> {
    let key_path = stem.with_extension("key");
    let pub_path = stem.with_extension("pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(TrustError::Io {
                context: format!("{} exists", p.display()),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
    }
    let pair = match password {
        Some(pw) => minisign::KeyPair::generate_encrypted_keypair(Some(pw)),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|e| TrustError::Malformed(format!("generating a key: {e}")))?;
    let key_id = key_id_hex(pair.pk.keynum());
    let sk_text = pair
        .sk
        .to_box(Some(&format!("minisign secret key {key_id}")))
        .map_err(|e| TrustError::Malformed(e.to_string()))?
        .into_string();
    let pk_text = pair
        .pk
        .to_box()
        .map_err(|e| TrustError::Malformed(e.to_string()))?
        .into_string();
    write_new(&key_path, sk_text.as_bytes(), 0o600)?;
    write_new(&pub_path, pk_text.as_bytes(), 0o644)?;
    Ok((key_path, pub_path))
}

/// Creates `path` (never replacing one), writes `bytes`, fsyncs file and directory.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TrustError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_err = |source| TrustError::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err)?;
    f.write_all(bytes).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let (k, p) = generate(&dir.path().join("vendor"), None).unwrap();
        let sk = SecretKey::load(&k, || unreachable!("not encrypted")).unwrap();
        let pk = TrustedKey::parse("vendor", &std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(sk.key_id, pk.key_id);
        let data = vec![7u8; 300_000];
        let comment = firmware_comment("gateway", "1.0.2", "ab");
        let text = sk.sign(&data[..], &comment).unwrap();
        let sig = Signature::parse(&text).unwrap();
        assert_eq!(sig.trusted_comment(), comment);
        pk.verify_reader(&sig, &data[..]).unwrap();
        let ring = Keyring::new(vec![pk.clone()]);
        assert_eq!(ring.signer_of(&sig).unwrap().name, "vendor");

        // one flipped byte in the data, in the signature, in the trusted comment
        let mut bad = data.clone();
        bad[123_456] ^= 1;
        assert!(matches!(
            pk.verify_reader(&sig, &bad[..]),
            Err(TrustError::Mismatch(_))
        ));
        let forged = text.replace("version=1.0.2", "version=1.0.3");
        let forged = Signature::parse(&forged).unwrap();
        assert!(pk.verify_bytes(&forged, &data).is_err());
        // one flipped bit in the signature line (byte 40), in the global signature (over the
        // signature and its trusted comment)
        for (line, byte) in [(1, 40), (3, 5)] {
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            let mut raw = b64(&lines[line]).unwrap();
            raw[byte] ^= 1;
            lines[line] = base64::engine::general_purpose::STANDARD.encode(&raw);
            let flipped = Signature::parse(&lines.join("\n")).unwrap();
            assert!(pk.verify_bytes(&flipped, &data).is_err(), "line {line}");
        }
        // fed in uneven chunks, as the upload path does
        let mut v = pk.stream(&sig).unwrap();
        for c in data.chunks(7_919) {
            v.update(c);
        }
        v.finish().unwrap();

        // another key is not trusted
        let (k2, _) = generate(&dir.path().join("other"), None).unwrap();
        let other = SecretKey::load(&k2, || unreachable!()).unwrap();
        let sig2 = Signature::parse(&other.sign(&data[..], "x").unwrap()).unwrap();
        assert!(matches!(
            ring.signer_of(&sig2),
            Err(TrustError::UntrustedKey { .. })
        ));
        assert!(pk.verify_bytes(&sig2, &data).is_err());

        // nothing is overwritten
        assert!(generate(&dir.path().join("vendor"), None).is_err());
    }

    #[test]
    fn encrypted_keys_ask_for_their_password() {
        let dir = tempfile::tempdir().unwrap();
        let (k, _) = generate(&dir.path().join("v"), Some("pw".into())).unwrap();
        assert!(SecretKey::load(&k, || Ok("wrong".into())).is_err());
        let sk = SecretKey::load(&k, || Ok("pw".into())).unwrap();
        sk.sign(&b"x"[..], "c").unwrap();
    }

    #[test]
    fn malformed_keys_and_signatures() {
        for bad in ["", "RWQ", "not base64 !!", "untrusted comment: x\n"] {
            assert!(TrustedKey::parse("k", bad).is_err(), "{bad:?}");
        }
        assert!(Signature::parse("").is_err());
        assert!(Signature::parse(&"x".repeat(5000)).is_err());
        assert!(Signature::parse("untrusted comment: a\nAAAA\ntrusted comment: b\nAAAA").is_err());
    }

    #[test]
    fn firmware_comments() {
        let ok = firmware_comment("gateway", "1.0.2", "AB");
        assert!(check_firmware_comment(&ok, "gateway", "1.0.2", "ab").is_ok());
        assert!(check_firmware_comment(&ok, "gateway", "1.0.3", "ab").is_err());
        assert!(check_firmware_comment(&ok, "camera", "1.0.2", "ab").is_err());
        assert!(check_firmware_comment(&ok, "gateway", "1.0.2", "cd").is_err());
        // the stock minisign comment binds only the bytes
        assert!(check_firmware_comment("timestamp:1\tfile:fw.bin", "g", "1", "x").is_ok());
    }
}
