//! Password hashes of MQTT application users, in mosquitto's password-file format so that a
//! site's `mosquitto_passwd` file works unchanged: one `user:hash` per line, the hash
//! `$7$ITERATIONS$SALT$HASH` (PBKDF2-HMAC-SHA512, what mosquitto 2 writes) or `$6$SALT$HASH`
//! (salted SHA-512, what mosquitto 1.x wrote), salt 12 bytes and hash 64 bytes in base64.
//! Users made with `hangar mqtt-user add` are stored with the same `$7$` hashes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine;

use crate::server::passwords::Passwords;
use crate::server::store::{Durable, MQTT_SCHEMA, MqttUserRecord, Store, StoreError};
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// Iterations of the hashes Hangar makes (mosquitto_passwd 2.0 makes 101; more cost is fine
/// for the few application users a site has, and any count is read).
pub const ITERATIONS: u32 = 1_000;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A parsed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hash {
    /// `$6$`: SHA-512 over password then salt.
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// Why a hash or a password file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// A hash that is not one of the two formats.
    #[error("{0}")]
    BadHash(String),
    /// A line of a password file (1-based) and what is wrong with it.
    #[error("line {line}: {reason}")]
    BadLine {
        /// The line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Most iterations a `$7$` hash may ask for (a hostile file must not stall every CONNECT).
const MAX_ITERATIONS: u32 = 1_000_000;

impl Hash {
    /// Parses `$6$...` or `$7$...`.
    pub fn parse(s: &str) -> Result<Hash, UserError> {
        let bad = |m: &str| UserError::BadHash(m.to_string());
        let parts: Vec<&str> = s.split('$').collect();
        let b64 = |p: &str, what: &str| B64.decode(p).map_err(|_| bad(what));
        match parts.as_slice() {
            ["", "6", salt, hash] => {
                let (salt, hash) = (b64(salt, "bad salt")?, b64(hash, "bad hash")?);
                (salt.len() == 12 && hash.len() == 64)
                    .then_some(Hash::Sha512 { salt, hash })
                    .ok_or_else(|| bad("a $6$ hash has a 12-byte salt and a 64-byte hash"))
            }
            ["", "7", iter, salt, hash] => {
                let iterations: u32 = iter.parse().map_err(|_| bad("bad iteration count"))?;
                if !(1..=MAX_ITERATIONS).contains(&iterations) {
                    return Err(bad("iteration count out of range (1 to 1000000)"));
                }
                let (salt, hash) = (b64(salt, "bad salt")?, b64(hash, "bad hash")?);
                (salt.len() == 12 && hash.len() == 64)
                    .then_some(Hash::Pbkdf2 {
                        iterations,
                        salt,
                        hash,
                    })
                    .ok_or_else(|| bad("a $7$ hash has a 12-byte salt and a 64-byte hash"))
            }
            _ => Err(bad(
                "not a mosquitto_passwd hash ($6$salt$hash or $7$iterations$salt$hash): a plain-text password file must be hashed first (mosquitto_passwd -U FILE)",
            )),
        }
    }

    /// A new `$7$` hash of `password` with a random salt.
    pub fn new(password: &str) -> Hash {
        let mut salt = vec![0u8; 12];
        rand::fill(&mut salt[..]);
        let hash = pbkdf2(password, &salt, ITERATIONS);
        Hash::Pbkdf2 {
            iterations: ITERATIONS,
            salt,
            hash,
        }
    }

    /// Whether `password` is the one hashed (constant-time compare).
    pub fn verify(&self, password: &str) -> bool {
        let (got, want) = match self {
            Hash::Sha512 { salt, hash } => {
                let mut h = Sha512::new();
                h.update(password.as_bytes());
                h.update(salt);
                (h.finalize().to_vec(), hash)
            }
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => (pbkdf2(password, salt, *iterations), hash),
        };
        bool::from(got.as_slice().ct_eq(want))
    }

    /// The text form, as mosquitto_passwd writes it.
    pub fn encode(&self) -> String {
        match self {
            Hash::Sha512 { salt, hash } => format!("$6${}${}", B64.encode(salt), B64.encode(hash)),
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(hash)),
        }
    }
}

fn pbkdf2(password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    pbkdf2::pbkdf2::<hmac::Hmac<Sha512>>(password.as_bytes(), salt, iterations, &mut out)
        .expect("HMAC takes any key length");
    out
}

/// A password file: user name -> hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

impl PasswordFile {
    /// Parses a file written by mosquitto_passwd (comments and blank lines skipped).
    pub fn parse(text: &str) -> Result<PasswordFile, UserError> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| UserError::BadLine {
                line: n + 1,
                reason,
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("not `user:hash`".into()))?;
            if user.is_empty() {
                return Err(bad("an empty user name".into()));
            }
            let h = Hash::parse(hash).map_err(|e| bad(format!("user {user:?}: {e}")))?;
            users.insert(user.to_string(), h);
        }
        Ok(PasswordFile { users })
    }

    /// The hash of `user`, if the file has them.
    pub fn get(&self, user: &str) -> Option<&Hash> {
        self.users.get(user)
    }

    /// Users in the file.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The user names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }
}

/// Why an application user could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// The name is not one Hangar makes users with.
    #[error("user name {0:?} must match [A-Za-z0-9_.@-]{{1,64}}")]
    BadName(String),
    /// The password is empty or too long.
    #[error("the password must be 1 to 1024 bytes")]
    BadPassword,
    /// A user of that name exists (in the store or in `mqtt.password_file`).
    #[error("MQTT user {0:?} already exists")]
    Exists(String),
    /// The user is defined in `mqtt.password_file`, which Hangar only reads.
    #[error(
        "MQTT user {0:?} is defined in mqtt.password_file: edit that file (mosquitto_passwd) and reload"
    )]
    InFile(String),
    /// No such user.
    #[error("no MQTT user {0:?}")]
    NotFound(String),
    /// The password pool is busy.
    #[error(transparent)]
    Busy(#[from] crate::server::passwords::PasswordError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether a name is one `hangar mqtt-user add` accepts.
pub fn valid_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}

/// Where a user comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Made with `hangar mqtt-user add` or the API, kept in the store.
    Store,
    /// `mqtt.password_file`.
    File,
}

/// An application user as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserView {
    pub name: String,
    pub source: Source,
    /// Creation time (store users only), ms since the epoch.
    pub created_at_ms: Option<i64>,
}

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The user exists and the password is theirs.
    Ok,
    /// The user exists; the password is wrong.
    Wrong,
    /// No such user.
    Unknown,
    /// Every check slot stayed busy.
    Busy,
}

/// Successful checks remembered (a reconnecting fleet of application clients costs no PBKDF2).
const REMEMBERED: usize = 4096;

/// The broker's application users: those in the store and those of `mqtt.password_file`.
/// Password checks run on a bounded pool; a successful one is remembered (by a digest of the
/// name, the password and the hash) so that reconnects are cheap, and checks of the same
/// credentials that arrive together share one computation (a fleet of application clients
/// connecting at once with one user costs one PBKDF2, not one each, and is not refused busy).
pub struct Users {
    store: Store,
    file_path: Option<std::path::PathBuf>,
    file: RwLock<Arc<PasswordFile>>,
    stored: RwLock<HashMap<String, (Hash, i64)>>,
    checks: Passwords,
    remembered: Mutex<HashSet<[u8; 32]>>,
    /// Checks under way, by the same digest: later callers wait for the first one's answer.
    under_way: Mutex<HashMap<[u8; 32], Arc<tokio::sync::OnceCell<bool>>>>,
}

impl Users {
    /// The users of the store and of `password_file` ("" = none).
    pub fn load(store: Store, password_file: &str) -> Result<Users, String> {
        let file_path =
            (!password_file.is_empty()).then(|| std::path::PathBuf::from(password_file));
        let file = match &file_path {
            Some(p) => read_password_file(p)?,
            None => PasswordFile::default(),
        };
        let mut stored = HashMap::new();
        for u in store.mqtt_users().map_err(|e| e.to_string())? {
            match Hash::parse(&u.hash) {
                Ok(h) => {
                    stored.insert(u.name, (h, u.created_at_ms));
                }
                Err(e) => {
                    tracing::error!(user = u.name, error = %e, "stored MQTT user with an unreadable hash: ignored")
                }
            }
        }
        Ok(Users {
            store,
            file_path,
            file: RwLock::new(Arc::new(file)),
            stored: RwLock::new(stored),
            checks: Passwords::new(2, std::time::Duration::from_secs(5)),
            remembered: Mutex::new(HashSet::new()),
            under_way: Mutex::new(HashMap::new()),
        })
    }

    /// Reads `mqtt.password_file` again (SIGHUP). A file that does not parse keeps the old
    /// users. The number of users read.
    pub fn reload_file(&self) -> Result<usize, String> {
        let Some(p) = &self.file_path else {
            return Ok(0);
        };
        let f = read_password_file(p)?;
        let n = f.len();
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(f);
        self.remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(n)
    }

    fn hash_of(&self, name: &str) -> Option<Hash> {
        if let Some((h, _)) = self
            .stored
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Some(h.clone());
        }
        self.file
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Whether the user exists.
    pub fn exists(&self, name: &str) -> bool {
        self.hash_of(name).is_some()
    }

    /// How many users there are.
    pub fn count(&self) -> usize {
        self.list().len()
    }

    /// Checks a password.
    pub async fn check(&self, name: &str, password: &[u8]) -> Checked {
        let Some(hash) = self.hash_of(name) else {
            return Checked::Unknown;
        };
        let Ok(password) = std::str::from_utf8(password) else {
            return Checked::Wrong;
        };
        let digest: [u8; 32] = sha2::Sha256::new()
            .chain_update(name.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .chain_update([0])
            .chain_update(hash.encode().as_bytes())
            .finalize()
            .into();
        if self
            .remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&digest)
        {
            return Checked::Ok;
        }
        let cell = self
            .under_way
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest)
            .or_default()
            .clone();
        let password = password.to_string();
        let checked = cell
            .get_or_try_init(|| self.checks.run_cpu(move || hash.verify(&password)))
            .await
            .copied();
        if matches!(checked, Ok(true)) {
            // remembered before the shared check is gone, so nobody arriving now computes again
            let mut r = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
            if r.len() >= REMEMBERED {
                r.clear();
            }
            r.insert(digest);
        }
        {
            let mut m = self.under_way.lock().unwrap_or_else(|e| e.into_inner());
            if m.get(&digest).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                m.remove(&digest);
            }
        }
        match checked {
            Ok(true) => Checked::Ok,
            Ok(false) => Checked::Wrong,
            Err(_) => Checked::Busy,
        }
    }

    /// Every user, by name (a name in both the store and the file is the store's).
    pub fn list(&self) -> Vec<UserView> {
        let mut v: Vec<UserView> = self
            .stored
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, (_, at))| UserView {
                name: n.clone(),
                source: Source::Store,
                created_at_ms: Some(*at),
            })
            .collect();
        let file = self.file.read().unwrap_or_else(|e| e.into_inner()).clone();
        for n in file.names() {
            if !v.iter().any(|u| u.name == n) {
                v.push(UserView {
                    name: n.to_string(),
                    source: Source::File,
                    created_at_ms: None,
                });
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Adds a user to the store; durable when it returns.
    pub async fn add(&self, name: &str, password: &str) -> Result<Durable<UserView>, UsersError> {
        if !valid_user_name(name) {
            return Err(UsersError::BadName(name.to_string()));
        }
        if password.is_empty() || password.len() > 1024 {
            return Err(UsersError::BadPassword);
        }
        if self.exists(name) {
            return Err(UsersError::Exists(name.to_string()));
        }
        let pw = password.to_string();
        let hash = self.checks.run_cpu(move || Hash::new(&pw)).await?;
        let rec = MqttUserRecord {
            schema: MQTT_SCHEMA,
            name: name.to_string(),
            hash: hash.encode(),
            created_at_ms: crate::time::now_ms(),
        };
        match self.store.insert_mqtt_user(&rec) {
            Err(StoreError::Conflict(_)) => return Err(UsersError::Exists(name.to_string())),
            r => r?,
        }
        let view = UserView {
            name: rec.name.clone(),
            source: Source::Store,
            created_at_ms: Some(rec.created_at_ms),
        };
        self.stored
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rec.name, (hash, rec.created_at_ms));
        Ok(self.store.durable(view).await?)
    }

    /// Removes a store user; durable when it returns.
    pub async fn delete(&self, name: &str) -> Result<Durable<UserView>, UsersError> {
        let gone = self.store.delete_mqtt_user(name)?;
        let Some(rec) = gone else {
            if self
                .file
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .is_some()
            {
                return Err(UsersError::InFile(name.to_string()));
            }
            return Err(UsersError::NotFound(name.to_string()));
        };
        self.stored
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(self
            .store
            .durable(UserView {
                name: rec.name,
                source: Source::Store,
                created_at_ms: Some(rec.created_at_ms),
            })
            .await?)
    }
}

fn read_password_file(p: &std::path::Path) -> Result<PasswordFile, String> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| format!("mqtt.password_file {}: {e}", p.display()))?;
    PasswordFile::parse(&text).map_err(|e| format!("mqtt.password_file {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip_and_check_their_password() {
        let h = Hash::new("line 3 historian");
        let text = h.encode();
        assert!(text.starts_with("$7$1000$"), "{text}");
        let back = Hash::parse(&text).unwrap();
        assert!(back.verify("line 3 historian"));
        assert!(!back.verify("line 3 historiaN"));
    }

    #[test]
    fn a_mosquitto_passwd_file_is_read_as_mosquitto_reads_it() {
        // written by mosquitto_passwd 2.0.11 (password "secret-1"): see tests/site_broker.rs,
        // which also runs the real tool
        let h = Hash::Pbkdf2 {
            iterations: 101,
            salt: vec![1; 12],
            hash: pbkdf2("secret-1", &[1; 12], 101),
        };
        let old = {
            let mut d = Sha512::new();
            d.update(b"secret-2");
            d.update([2u8; 12]);
            Hash::Sha512 {
                salt: vec![2; 12],
                hash: d.finalize().to_vec(),
            }
        };
        let file = format!(
            "# users\nhistorian:{}\n\nscada:{}\n",
            h.encode(),
            old.encode()
        );
        let f = PasswordFile::parse(&file).unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.get("historian").unwrap().verify("secret-1"));
        assert!(f.get("scada").unwrap().verify("secret-2"));
        assert!(!f.get("scada").unwrap().verify("secret-1"));
        assert!(f.get("nobody").is_none());
    }

    #[test]
    fn bad_files_name_their_line() {
        for (text, line) in [
            ("a:plaintext\n", 1),
            ("# c\nnocolon\n", 2),
            (":$7$101$AAAAAAAAAAAAAAAA$AAAA\n", 1),
            ("a:$7$0$AAAAAAAAAAAAAAAA$AAAA\n", 1),
            ("a:$7$99999999999$AAAAAAAAAAAAAAAA$AAAA\n", 1),
        ] {
            match PasswordFile::parse(text) {
                Err(UserError::BadLine { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    /// A fleet of application clients connecting at once with one user: every check of the
    /// same credentials shares the computation under way, so none is refused busy (the pool
    /// lets 2 run and 64 wait) and the hash is computed once, not once each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_of_the_same_credentials_arriving_together_share_one_computation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        // a slow hash: each check takes tens of milliseconds
        let h = Hash::Pbkdf2 {
            iterations: 200_000,
            salt: vec![7; 12],
            hash: pbkdf2("fleet-secret", &[7; 12], 200_000),
        };
        let file = dir.path().join("passwd");
        std::fs::write(&file, format!("fleet:{}\n", h.encode())).unwrap();
        let users = Arc::new(Users::load(store, file.to_str().unwrap()).unwrap());
        let checks: Vec<_> = (0..300)
            .map(|_| {
                let u = users.clone();
                tokio::spawn(async move { u.check("fleet", b"fleet-secret").await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for c in checks {
            outcomes.push(c.await.unwrap());
        }
        let busy = outcomes.iter().filter(|c| **c == Checked::Busy).count();
        assert_eq!(busy, 0, "refused busy: {busy} of 300");
        assert!(outcomes.iter().all(|c| *c == Checked::Ok));
        let runs = users.checks.runs.load(std::sync::atomic::Ordering::Relaxed);
        assert!(runs <= 2, "{runs} computations for one user's 300 checks");
        // a wrong password arriving with them is still wrong
        assert_eq!(users.check("fleet", b"fleet-secreT").await, Checked::Wrong);
    }
}
