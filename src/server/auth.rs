//! Credentials of the appliance: the admin bearer token (generated once into
//! `<data_dir>/admin.token`, mode 0600) and the signer of download URLs handed to devices
//! (HMAC-SHA256 over path and expiry with a secret in `<data_dir>/url.secret`).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// File name of the generated admin token inside the data dir.
pub const TOKEN_FILE: &str = "admin.token";
const SECRET_FILE: &str = "url.secret";

/// Writes a secret file atomically with mode 0600 (temp file, fsync, rename, fsync dir).
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    crate::server::blobs::sync_dir(dir)
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// The admin token: the configured one, else the one in `<data_dir>/admin.token`, generated on
/// first use. Returns the token and whether it was generated now.
pub fn load_or_create_admin_token(data_dir: &Path, configured: &str) -> io::Result<(String, bool)> {
    if !configured.is_empty() {
        return Ok((configured.to_string(), false));
    }
    let path = data_dir.join(TOKEN_FILE);
    match fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok((t.trim().to_string(), false)),
        Ok(_) => Err(io::Error::other(format!(
            "{} is empty: delete it to generate a new token",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let token = random_hex(32);
            write_private_file(&path, format!("{token}\n").as_bytes())?;
            Ok((token, true))
        }
        Err(e) => Err(e),
    }
}

/// Constant-time check of an `Authorization` header value against the admin token.
pub fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let Some(h) = header else { return false };
    let Some(given) = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
    else {
        return false;
    };
    given.trim().as_bytes().ct_eq(token.as_bytes()).into()
}

/// Signs and verifies download URLs: `?token=<expiry>.<hex hmac>` bound to the URL path.
#[derive(Clone)]
pub struct UrlSigner {
    key: Vec<u8>,
    ttl_secs: u64,
}

impl UrlSigner {
    /// Loads the secret from `<data_dir>/url.secret`, generating it on first use.
    pub fn load_or_create(data_dir: &Path, ttl_secs: u64) -> io::Result<UrlSigner> {
        let path = data_dir.join(SECRET_FILE);
        let key = match fs::read_to_string(&path) {
            Ok(s) => hex::decode(s.trim())
                .ok()
                .filter(|k| k.len() >= 32)
                .ok_or_else(|| {
                    io::Error::other(format!(
                        "{} is not a hex secret of 32+ bytes: delete it to generate a new one (outstanding download URLs then stop working)",
                        path.display()
                    ))
                })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let hexkey = random_hex(32);
                write_private_file(&path, format!("{hexkey}\n").as_bytes())?;
                hex::decode(hexkey).expect("we wrote hex")
            }
            Err(e) => return Err(e),
        };
        Ok(UrlSigner { key, ttl_secs })
    }

    fn mac(&self, path: &str, expiry: u64, task: Option<u64>) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key length");
        mac.update(path.as_bytes());
        mac.update(b"\n");
        mac.update(expiry.to_string().as_bytes());
        if let Some(t) = task {
            mac.update(b"\ntask ");
            mac.update(t.to_string().as_bytes());
        }
        mac
    }

    /// When a token made now expires (Unix seconds).
    pub fn expiry(&self, now_secs: u64) -> u64 {
        now_secs + self.ttl_secs
    }

    /// A token for `path` (e.g. `/firmware/gateway_v1.0.2.bin`) valid for the configured TTL.
    pub fn sign(&self, path: &str, now_secs: u64) -> String {
        self.sign_for(path, None, now_secs)
    }

    /// A token for `path` bound to upgrade task `task` (the URL then carries `task=ID` too):
    /// the download is refused once that task is cancelled.
    pub fn sign_for(&self, path: &str, task: Option<u64>, now_secs: u64) -> String {
        let expiry = self.expiry(now_secs);
        let tag = self.mac(path, expiry, task).finalize().into_bytes();
        format!("{expiry}.{}", hex::encode(tag))
    }

    /// True if `token` was made by [`UrlSigner::sign`] for exactly `path` and has not expired.
    pub fn verify(&self, path: &str, token: &str, now_secs: u64) -> bool {
        self.verify_for(path, token, None, now_secs)
    }

    /// True if `token` was made by [`UrlSigner::sign_for`] for exactly `path` and `task` and
    /// has not expired.
    pub fn verify_for(&self, path: &str, token: &str, task: Option<u64>, now_secs: u64) -> bool {
        let Some((exp, tag)) = token.split_once('.') else {
            return false;
        };
        let (Ok(expiry), Ok(tag)) = (exp.parse::<u64>(), hex::decode(tag)) else {
            return false;
        };
        if expiry < now_secs {
            return false;
        }
        self.mac(path, expiry, task).verify_slice(&tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn token_is_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let (t1, created) = load_or_create_admin_token(dir.path(), "").unwrap();
        assert!(created);
        let (t2, created) = load_or_create_admin_token(dir.path(), "").unwrap();
        assert!(!created);
        assert_eq!(t1, t2);
        let mode = fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(bearer_matches(Some(&format!("Bearer {t1}")), &t1));
        assert!(!bearer_matches(Some(&format!("Bearer {t1}x")), &t1));
        assert!(!bearer_matches(Some(&t1), &t1));
        assert!(!bearer_matches(None, &t1));
    }

    #[test]
    fn signed_urls_bind_path_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let s = UrlSigner::load_or_create(dir.path(), 100).unwrap();
        let tok = s.sign("/firmware/gateway_v1.bin", 1000);
        assert!(s.verify("/firmware/gateway_v1.bin", &tok, 1000));
        assert!(s.verify("/firmware/gateway_v1.bin", &tok, 1100));
        assert!(!s.verify("/firmware/gateway_v1.bin", &tok, 1101));
        assert!(!s.verify("/firmware/gateway_v2.bin", &tok, 1000));
        let (exp, tag) = tok.split_once('.').unwrap();
        let forged = format!("{}.{tag}", exp.parse::<u64>().unwrap() + 1000);
        assert!(!s.verify("/firmware/gateway_v1.bin", &forged, 1000));
        assert!(!s.verify("/firmware/gateway_v1.bin", "garbage", 0));
        // the secret survives a reload
        let s2 = UrlSigner::load_or_create(dir.path(), 100).unwrap();
        assert!(s2.verify("/firmware/gateway_v1.bin", &tok, 1000));
        // a token bound to a task holds for that task only, and is no unbound token
        let bound = s.sign_for("/firmware/gateway_v1.bin", Some(7), 1000);
        assert!(s.verify_for("/firmware/gateway_v1.bin", &bound, Some(7), 1000));
        assert!(!s.verify_for("/firmware/gateway_v1.bin", &bound, Some(8), 1000));
        assert!(!s.verify("/firmware/gateway_v1.bin", &bound, 1000));
        assert!(!s.verify_for("/firmware/gateway_v1.bin", &tok, Some(7), 1000));
    }
}
