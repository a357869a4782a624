//! Console users, their sessions and sign-in throttling; the audit log's writer.
//!
//! Passwords are stored as argon2id hashes (PHC strings; the argon2 crate's defaults: 19 MiB,
//! two passes), hashed and checked on the blocking pool. A session is a random 256-bit cookie
//! value; the store keeps only its sha256, with the user, a CSRF token and an absolute expiry.
//! A password change or a deleted user revokes every session of that user; so does signing out
//! (that session). Sign-in failures are counted per user name and per client address: after
//! [`FREE_FAILURES`] for a name, [`FREE_ADDRESS_FAILURES`] for an address, the next attempt waits a doubling delay (up to [`MAX_LOCK`]), answered 429.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest, Sha256};

use crate::server::error::ServiceError;
use crate::server::store::{
    AUDIT_SCHEMA, AuditRecord, Durable, Role, SESSION_SCHEMA, SessionRecord, Store, USER_SCHEMA,
    UserRecord,
};

/// Failed sign-ins a user name gets before it is slowed down.
pub const FREE_FAILURES: u32 = 5;
/// Failed sign-ins a client address gets before it is slowed down (more than a name: several
/// people may sign in from behind one address).
pub const FREE_ADDRESS_FAILURES: u32 = 20;
/// The longest wait imposed after repeated failures.
pub const MAX_LOCK: Duration = Duration::from_secs(300);
/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(900);
/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 8;
/// Longest password accepted (bytes).
pub const MAX_PASSWORD: usize = 1024;

/// The one message of a failed sign-in, whatever was wrong.
pub const BAD_CREDENTIALS: &str = "wrong user name or password";

/// Who is asking: a user through a session, or the admin token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// A user name, or `admin-token`.
    pub actor: String,
    /// How they came in.
    pub via: Via,
    /// What they may do.
    pub role: Role,
    /// The session's CSRF token (sessions only).
    pub csrf: Option<String>,
}

/// How a request was authenticated (the audit log's `via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The admin bearer token, from a script or curl.
    Token,
    /// The admin bearer token, from `hangar`'s own admin verbs.
    Cli,
    /// A console session cookie.
    Session,
    /// The appliance itself (a campaign's gate, the sweeper).
    System,
}

impl Via {
    /// The audit log's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Token => "token",
            Via::Cli => "cli",
            Via::Session => "session",
            Via::System => "system",
        }
    }
}

/// A signed-in session as handed to the browser.
pub struct NewSession {
    /// The cookie value (only the browser has it).
    pub cookie: String,
    /// The stored session.
    pub record: SessionRecord,
    /// The user's role.
    pub role: Role,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: tokio::time::Instant,
}

/// The accounts service.
pub struct Accounts {
    store: Store,
    session_ttl: Duration,
    failures: Mutex<HashMap<String, Failures>>,
    /// A hash to check when the user does not exist, so that answer takes as long as a wrong
    /// password. Made at the first sign-in, not at start: argon2id takes 19 MiB while it runs,
    /// which an appliance nobody signs in to should not pay.
    decoy: std::sync::OnceLock<String>,
}

/// Whether `name` is a valid user name: `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_password(password: &str) -> Result<(), ServiceError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(ServiceError::Invalid(format!(
            "the password is too short: at least {MIN_PASSWORD} characters"
        )));
    }
    if password.len() > MAX_PASSWORD {
        return Err(ServiceError::Invalid(format!(
            "the password is too long: at most {MAX_PASSWORD} bytes"
        )));
    }
    Ok(())
}

fn hash_password(password: &str) -> Result<String, ServiceError> {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| ServiceError::Corrupt(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ServiceError::Corrupt(format!("argon2: {e}")))
}

fn password_matches(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// The key a session is stored under: the sha256 of its cookie value.
fn session_key(cookie: &str) -> String {
    hex::encode(Sha256::digest(cookie.as_bytes()))
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::fill(&mut b);
    hex::encode(b)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Corrupt(format!("password hashing task: {e}")))
}

/// How long a key with `count` failures must wait after its last one, when it gets `free`
/// failures before that.
pub fn lock_for(count: u32, free: u32) -> Duration {
    if count < free {
        return Duration::ZERO;
    }
    let doublings = (count - free).min(16);
    Duration::from_secs(1u64 << doublings).min(MAX_LOCK)
}

/// The free failures of a throttling key (`user:…` or `addr:…`).
fn free_failures(key: &str) -> u32 {
    if key.starts_with("addr:") {
        FREE_ADDRESS_FAILURES
    } else {
        FREE_FAILURES
    }
}

impl Accounts {
    /// The service over `store`; sessions live `session_ttl` from sign-in.
    pub fn new(store: Store, session_ttl: Duration) -> Accounts {
        Accounts {
            store,
            session_ttl,
            failures: Mutex::new(HashMap::new()),
            decoy: std::sync::OnceLock::new(),
        }
    }

    /// Adds a user.
    pub async fn add(
        &self,
        name: &str,
        role: Role,
        password: String,
    ) -> Result<Durable<UserRecord>, ServiceError> {
        if !valid_name(name) {
            return Err(ServiceError::Invalid(format!(
                "user name {name:?} is not 1-64 of A-Z a-z 0-9 _ . -"
            )));
        }
        check_password(&password)?;
        if self.store.get_user(name)?.is_some() {
            return Err(ServiceError::Conflict(format!("user {name} exists")));
        }
        let hash = blocking(move || hash_password(&password)).await??;
        let now = crate::time::now_ms();
        let rec = UserRecord {
            schema: USER_SCHEMA,
            name: name.to_string(),
            role,
            password_hash: hash,
            created_at_ms: now,
            password_changed_at_ms: now,
        };
        self.store.insert_user(&rec).map_err(|e| match e {
            crate::server::store::StoreError::Conflict(_) => {
                ServiceError::Conflict(format!("user {name} exists"))
            }
            e => e.into(),
        })?;
        Ok(self.store.durable(rec).await?)
    }

    /// Every user.
    pub fn list(&self) -> Result<Vec<UserRecord>, ServiceError> {
        Ok(self.store.list_users()?)
    }

    fn get(&self, name: &str) -> Result<UserRecord, ServiceError> {
        self.store
            .get_user(name)?
            .ok_or_else(|| ServiceError::NotFound(format!("no user {name}")))
    }

    /// Sets a user's password and role (either optional); a new password signs them out
    /// everywhere.
    pub async fn change(
        &self,
        name: &str,
        password: Option<String>,
        role: Option<Role>,
    ) -> Result<Durable<UserRecord>, ServiceError> {
        let mut rec = self.get(name)?;
        if let Some(password) = password {
            check_password(&password)?;
            rec.password_hash = blocking(move || hash_password(&password)).await??;
            rec.password_changed_at_ms = crate::time::now_ms();
            self.store.delete_sessions_of(name)?;
        }
        if let Some(role) = role {
            rec.role = role;
        }
        self.store.put_user(&rec)?;
        Ok(self.store.durable(rec).await?)
    }

    /// Deletes a user and their sessions.
    pub async fn delete(&self, name: &str) -> Result<Durable<UserRecord>, ServiceError> {
        let gone = self
            .store
            .delete_user(name)?
            .ok_or_else(|| ServiceError::NotFound(format!("no user {name}")))?;
        Ok(self.store.durable(gone).await?)
    }

    /// How long `keys` must still wait before another attempt, if at all.
    fn throttled(&self, keys: &[String]) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.retain(|_, v| now.duration_since(v.last) < FAILURE_MEMORY);
        keys.iter()
            .filter_map(|k| f.get(k).map(|v| (k, v)))
            .map(|(k, v)| {
                (v.last + lock_for(v.count, free_failures(k))).saturating_duration_since(now)
            })
            .filter(|d| !d.is_zero())
            .max()
    }

    fn note_failure(&self, keys: &[String]) {
        let now = tokio::time::Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            let e = f.entry(k.clone()).or_insert(Failures {
                count: 0,
                last: now,
            });
            e.count += 1;
            e.last = now;
        }
    }

    /// Signs `name` in from `peer`: a new session, or [`ServiceError::Unauthorized`] with one
    /// message for every wrong combination, or [`ServiceError::Throttled`].
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        peer: &str,
    ) -> Result<NewSession, ServiceError> {
        let keys = [format!("user:{name}"), format!("addr:{peer}")];
        if let Some(wait) = self.throttled(&keys) {
            return Err(ServiceError::Throttled {
                message: format!(
                    "too many failed sign-ins: wait {} s and try again",
                    wait.as_secs().max(1)
                ),
                retry_after_secs: wait.as_secs().max(1),
            });
        }
        let user = if valid_name(name) && password.len() <= MAX_PASSWORD {
            self.store.get_user(name)?
        } else {
            None
        };
        let hash = user.as_ref().map(|u| u.password_hash.clone());
        let decoy = self.decoy.get().cloned();
        let given = password.to_string();
        let (matches, made) = blocking(move || {
            let made = decoy.or_else(|| hash_password("not a password of anyone").ok());
            let against = hash.as_deref().or(made.as_deref()).unwrap_or_default();
            (password_matches(against, &given), made)
        })
        .await?;
        if let Some(d) = made {
            let _ = self.decoy.set(d);
        }
        let Some(user) = user.filter(|_| matches) else {
            self.note_failure(&keys);
            return Err(ServiceError::Unauthorized(BAD_CREDENTIALS.into()));
        };
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&keys[0]);
        let cookie = random_token();
        let now = crate::time::now_ms();
        let record = SessionRecord {
            schema: SESSION_SCHEMA,
            user: user.name.clone(),
            csrf: random_token(),
            created_at_ms: now,
            expires_at_ms: now + self.session_ttl.as_millis() as i64,
        };
        let _ = self.store.purge_sessions(now);
        self.store.put_session(&session_key(&cookie), &record)?;
        self.store.flush().await?;
        Ok(NewSession {
            cookie,
            record,
            role: user.role,
        })
    }

    /// The principal behind a session cookie, if it is a live session of an existing user
    /// (whose current role counts, not the one at sign-in).
    pub fn session(
        &self,
        cookie: &str,
    ) -> Result<Option<(Principal, SessionRecord)>, ServiceError> {
        if cookie.len() != 64 {
            return Ok(None);
        }
        let key = session_key(cookie);
        let Some(s) = self.store.get_session(&key)? else {
            return Ok(None);
        };
        if s.expires_at_ms < crate::time::now_ms() {
            return Ok(None);
        }
        let Some(user) = self.store.get_user(&s.user)? else {
            return Ok(None);
        };
        Ok(Some((
            Principal {
                actor: user.name,
                via: Via::Session,
                role: user.role,
                csrf: Some(s.csrf.clone()),
            },
            s,
        )))
    }

    /// Ends the session behind `cookie`.
    pub async fn logout(&self, cookie: &str) -> Result<(), ServiceError> {
        self.store.delete_session(&session_key(cookie))?;
        Ok(self.store.flush().await?)
    }

    /// Records one change in the audit log and makes it durable.
    pub async fn audit(
        &self,
        who: &Principal,
        action: &str,
        target: &str,
        status: u16,
    ) -> Result<u64, ServiceError> {
        let result = if (200..300).contains(&status) {
            "ok".to_string()
        } else {
            format!("refused {status}")
        };
        let seq = self.store.append_audit(&AuditRecord {
            schema: AUDIT_SCHEMA,
            seq: 0,
            at_ms: crate::time::now_ms(),
            actor: who.actor.clone(),
            via: who.via.as_str().into(),
            action: action.into(),
            target: target.into(),
            result,
            status,
        })?;
        self.store.flush().await?;
        Ok(seq)
    }

    /// Audit entries, newest first, that match every given filter.
    pub fn audit_log(
        &self,
        filter: &AuditFilter,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<AuditRecord>, usize), ServiceError> {
        Ok(self.store.list_audit(|r| filter.keeps(r), limit, offset)?)
    }
}

/// Filters of `GET /api/audit`.
#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    /// Exact actor.
    pub actor: Option<String>,
    /// Action, or an action prefix ending in `.` (`campaign.`).
    pub action: Option<String>,
    /// At or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
}

impl AuditFilter {
    fn keeps(&self, r: &AuditRecord) -> bool {
        self.actor.as_ref().is_none_or(|a| &r.actor == a)
            && self.action.as_ref().is_none_or(|a| {
                if a.ends_with('.') {
                    r.action.starts_with(a.as_str())
                } else {
                    &r.action == a
                }
            })
            && self.since_ms.is_none_or(|s| r.at_ms >= s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_free_up_to_five_then_doubling_to_five_minutes() {
        assert_eq!(lock_for(4, 5), Duration::ZERO);
        assert_eq!(lock_for(5, 5), Duration::from_secs(1));
        assert_eq!(lock_for(6, 5), Duration::from_secs(2));
        assert_eq!(lock_for(9, 5), Duration::from_secs(16));
        assert_eq!(lock_for(40, 5), MAX_LOCK);
        assert_eq!(free_failures("addr:10.0.0.1"), 20);
    }

    #[test]
    fn a_hash_checks_its_password_and_no_other() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(password_matches(&h, "correct horse"));
        assert!(!password_matches(&h, "correct horsf"));
        assert!(!password_matches("garbage", "correct horse"));
    }

    #[test]
    fn names_are_plain() {
        assert!(valid_name("ops.lead-2"));
        assert!(!valid_name(""));
        assert!(!valid_name("<b>"));
        assert!(!valid_name(&"a".repeat(65)));
    }
}
