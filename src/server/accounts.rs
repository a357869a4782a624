//! Console users, their sessions and sign-in throttling; the audit log's writer.
//!
//! Passwords are stored as argon2id hashes (PHC strings; the argon2 crate's defaults: 19 MiB,
//! two passes), hashed and checked by [`Passwords`]: a few at a time, on the blocking pool, so
//! the memory of password work does not grow with the number of clients. A session is a random
//! 256-bit cookie value; the store keeps only its sha256, with the user, a CSRF token, an
//! absolute expiry and a fingerprint of the password hash it was checked against: a session
//! whose user's password changed since (even while the sign-in was under way) is dead. A
//! password change or a deleted user revokes every session of that user; so does signing out
//! (that session).
//!
//! Throttling ([`Throttle`]): an attempt is counted *before* its password is checked, in one
//! step with the check of the limits, so parallel guesses cannot slip past it. Failures are
//! counted per user name from one address (the tight limit: an attacker's guesses from one place),
//! per address (any names) and per user name from anywhere (a loose limit against guessing from
//! many addresses); beyond a key's free failures the next attempt waits a doubling delay (1 s up
//! to [`MAX_LOCK`]), answered 429. A real user signing in from elsewhere is only slowed once the
//! loose per-name limit is reached, which one address cannot reach alone.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::AuthConfig;
use crate::server::error::ServiceError;
use crate::server::passwords::{PasswordError, Passwords};
use crate::server::store::{
    AUDIT_CHECKPOINT_SCHEMA, AUDIT_SCHEMA, AuditCheckpoint, AuditRecord, Durable, Role,
    SESSION_SCHEMA, SessionRecord, Store, StoreError, USER_SCHEMA, UserRecord,
};

/// The longest wait imposed after repeated failures.
pub const MAX_LOCK: Duration = Duration::from_secs(300);
/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(900);
/// Throttling keys kept at most; beyond it the ones with the fewest failures are forgotten first.
const MAX_KEYS: usize = 100_000;
/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 8;
/// Longest password accepted (bytes).
pub const MAX_PASSWORD: usize = 1024;
/// At most one audit entry for refused sign-ins this often; the ones between are counted in it.
const REFUSED_AUDIT_EVERY: Duration = Duration::from_secs(10);

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

/// The limits of sign-in attempts (from `[auth]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Failures of one user name from one address before it waits.
    pub per_user_and_address: u32,
    /// Failures from one address (any names) before it waits.
    pub per_address: u32,
    /// Failures of one user name from every address before it waits.
    pub per_user: u32,
}

impl Limits {
    /// The limits an `[auth]` section sets.
    pub fn of(c: &AuthConfig) -> Limits {
        Limits {
            per_user_and_address: c.sign_in_free_failures,
            per_address: c.sign_in_free_failures_per_address,
            per_user: c.sign_in_free_failures_per_user,
        }
    }
}

/// One throttling key: who, and how many of its failures it gets free.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// A user name from one address.
    Pair(String, String),
    /// An address.
    Address(String),
    /// A user name from anywhere.
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: tokio::time::Instant,
}

/// Sign-in failures per key (see the module docs). An attempt is counted when it starts
/// ([`Throttle::begin`]), under the same lock that checked the limits; a success takes it back.
pub struct Throttle {
    limits: Limits,
    keys: Mutex<HashMap<Key, Failures>>,
}

/// The keys of an attempt that was counted; [`Throttle::succeeded`] or
/// [`Throttle::not_checked`] takes it back, dropping it keeps it as a failure.
pub struct Attempt {
    keys: [Key; 3],
}

impl Throttle {
    /// A throttle with these limits.
    pub fn new(limits: Limits) -> Throttle {
        Throttle {
            limits,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn free(&self, k: &Key) -> u32 {
        match k {
            Key::Pair(..) => self.limits.per_user_and_address,
            Key::Address(_) => self.limits.per_address,
            Key::User(_) => self.limits.per_user,
        }
    }

    /// Counts an attempt of `name` from `peer`, or says how long it must still wait.
    pub fn begin(&self, name: &str, peer: &str) -> Result<Attempt, Duration> {
        let name: String = name.chars().take(64).collect();
        let keys = [
            Key::Pair(name.clone(), peer.to_string()),
            Key::Address(peer.to_string()),
            Key::User(name),
        ];
        let now = tokio::time::Instant::now();
        let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        for k in &keys {
            if map
                .get(k)
                .is_some_and(|v| now.duration_since(v.last) >= FAILURE_MEMORY)
            {
                map.remove(k);
            }
        }
        let wait = keys
            .iter()
            .filter_map(|k| map.get(k).map(|v| (k, v)))
            .map(|(k, v)| (v.last + lock_for(v.count, self.free(k))).saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if !wait.is_zero() {
            return Err(wait);
        }
        if map.len() >= MAX_KEYS {
            map.retain(|_, v| now.duration_since(v.last) < FAILURE_MEMORY);
        }
        if map.len() >= MAX_KEYS {
            // a flood of names or addresses: forget the least suspicious half
            let mut counts: Vec<u32> = map.values().map(|v| v.count).collect();
            counts.sort_unstable();
            let median = counts[counts.len() / 2];
            map.retain(|_, v| v.count > median);
        }
        for k in &keys {
            let e = map.entry(k.clone()).or_insert(Failures {
                count: 0,
                last: now,
            });
            e.count += 1;
            e.last = now;
        }
        Ok(Attempt { keys })
    }

    fn take_back(&self, a: &Attempt, forget_pair: bool) {
        let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        for k in &a.keys {
            if forget_pair && matches!(k, Key::Pair(..)) {
                map.remove(k);
                continue;
            }
            if let Some(e) = map.get_mut(k) {
                e.count = e.count.saturating_sub(1);
                if e.count == 0 {
                    map.remove(k);
                }
            }
        }
    }

    /// The attempt signed in: it was no failure, and its name's failures from its address are
    /// forgotten.
    pub fn succeeded(&self, a: Attempt) {
        self.take_back(&a, true);
    }

    /// The attempt's password was never checked (the appliance was too busy): not a failure.
    pub fn not_checked(&self, a: Attempt) {
        self.take_back(&a, false);
    }
}

/// What became of sign-in attempts since start (`hangar_auth_sign_ins_total`).
#[derive(Debug, Default)]
pub struct SignInCounts {
    /// Signed in.
    pub ok: AtomicU64,
    /// Wrong name or password.
    pub wrong: AtomicU64,
    /// Refused by the throttle before any check.
    pub throttled: AtomicU64,
    /// Refused because every password slot stayed busy.
    pub busy: AtomicU64,
}

/// Refused sign-ins waiting to be written as one audit entry.
struct RefusedSample {
    last_written: Option<tokio::time::Instant>,
    since_last: u64,
}

/// The accounts service.
pub struct Accounts {
    store: Store,
    session_ttl: Duration,
    throttle: Throttle,
    passwords: Passwords,
    /// What became of sign-ins.
    pub sign_ins: SignInCounts,
    refused: Mutex<RefusedSample>,
    /// A hash to check when the user does not exist, so that answer takes as long as a wrong
    /// password. Made at the first sign-in, not at start: argon2id takes 19 MiB while it runs,
    /// which an appliance nobody signs in to should not pay.
    decoy: tokio::sync::OnceCell<String>,
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

/// The key a session is stored under: the sha256 of its cookie value.
fn session_key(cookie: &str) -> String {
    hex::encode(Sha256::digest(cookie.as_bytes()))
}

/// What a session remembers of the credentials it was made with: a digest of the user's
/// password hash (which has a fresh salt every time it is set).
fn credential(user: &UserRecord) -> String {
    hex::encode(&Sha256::digest(user.password_hash.as_bytes())[..16])
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::fill(&mut b);
    hex::encode(b)
}

fn throttled(wait: Duration) -> ServiceError {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    ServiceError::Throttled {
        message: format!("too many failed sign-ins: wait {secs} s and try again"),
        retry_after_secs: secs,
    }
}

impl From<PasswordError> for ServiceError {
    fn from(e: PasswordError) -> Self {
        match e {
            PasswordError::Busy => ServiceError::Throttled {
                message: e.to_string(),
                retry_after_secs: 1,
            },
            PasswordError::Failed(m) => ServiceError::Corrupt(m),
        }
    }
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

impl Accounts {
    /// The service over `store`, with the `[auth]` section's session lifetime and sign-in limits.
    pub fn new(store: Store, auth: &AuthConfig) -> Accounts {
        Accounts {
            store,
            session_ttl: Duration::from_secs(auth.session_hours * 3600),
            throttle: Throttle::new(Limits::of(auth)),
            passwords: Passwords::new(
                auth.sign_in_checks_at_once,
                Duration::from_secs(auth.sign_in_wait_secs),
            ),
            sign_ins: SignInCounts::default(),
            refused: Mutex::new(RefusedSample {
                last_written: None,
                since_last: 0,
            }),
            decoy: tokio::sync::OnceCell::new(),
        }
    }

    /// The password worker (its counters).
    pub fn passwords(&self) -> &Passwords {
        &self.passwords
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
        let hash = self.passwords.hash(password).await?;
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

    /// Whether any user exists (a fresh appliance has none: the sign-in page says how to add one).
    pub fn any_user(&self) -> Result<bool, ServiceError> {
        Ok(self.store.has_users()?)
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
            rec.password_hash = self.passwords.hash(password).await?;
            rec.password_changed_at_ms = crate::time::now_ms();
        }
        if let Some(role) = role {
            rec.role = role;
        }
        self.store.put_user(&rec)?;
        // after the new hash is in place: a session stored meanwhile with the old one is found
        // here, and one stored later fails its credential check
        self.store.delete_sessions_of(name)?;
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

    /// The hash a sign-in of an unknown user is checked against, made once.
    async fn decoy(&self) -> Result<String, ServiceError> {
        let d = self
            .decoy
            .get_or_try_init(|| self.passwords.hash("not a password of anyone".into()))
            .await?;
        Ok(d.clone())
    }

    /// Signs `name` in from `peer`: a new session, or [`ServiceError::Unauthorized`] with one
    /// message for every wrong combination, or [`ServiceError::Throttled`] (too many failures,
    /// or too many sign-ins at once).
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        peer: &str,
    ) -> Result<Durable<NewSession>, ServiceError> {
        let attempt = match self.throttle.begin(name, peer) {
            Ok(a) => a,
            Err(wait) => {
                self.sign_ins.throttled.fetch_add(1, Ordering::Relaxed);
                return Err(throttled(wait));
            }
        };
        let user = if valid_name(name) && password.len() <= MAX_PASSWORD {
            self.store.get_user(name)?
        } else {
            None
        };
        let against = match &user {
            Some(u) => Ok(u.password_hash.clone()),
            None => self.decoy().await,
        };
        let checked = match against {
            Ok(h) => self.passwords.verify(h, password.to_string()).await,
            Err(e) => {
                self.throttle.not_checked(attempt);
                return Err(e);
            }
        };
        let matches = match checked {
            Ok(m) => m,
            Err(e) => {
                if matches!(e, PasswordError::Busy) {
                    self.sign_ins.busy.fetch_add(1, Ordering::Relaxed);
                }
                self.throttle.not_checked(attempt);
                return Err(e.into());
            }
        };
        let Some(user) = user.filter(|_| matches) else {
            self.sign_ins.wrong.fetch_add(1, Ordering::Relaxed);
            drop(attempt);
            return Err(ServiceError::Unauthorized(BAD_CREDENTIALS.into()));
        };
        self.throttle.succeeded(attempt);
        let cookie = random_token();
        let now = crate::time::now_ms();
        let record = SessionRecord {
            schema: SESSION_SCHEMA,
            user: user.name.clone(),
            csrf: random_token(),
            created_at_ms: now,
            expires_at_ms: now + self.session_ttl.as_millis() as i64,
            credential: credential(&user),
        };
        let _ = self.store.purge_sessions(now);
        let key = session_key(&cookie);
        self.store.put_session(&key, &record)?;
        // the password may have changed while it was checked: a session is issued only if the
        // credentials it was checked against are still the user's after it is stored (a change
        // after this point deletes it, and one before is seen here)
        let current = self.store.get_user(&user.name)?;
        if current.as_ref().map(credential) != Some(record.credential.clone()) {
            self.store.delete_session(&key)?;
            self.sign_ins.wrong.fetch_add(1, Ordering::Relaxed);
            return Err(ServiceError::Unauthorized(BAD_CREDENTIALS.into()));
        }
        self.sign_ins.ok.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .store
            .durable(NewSession {
                cookie,
                record,
                role: user.role,
            })
            .await?)
    }

    /// The principal behind a session cookie, if it is a live session of an existing user
    /// whose password is still the one it was made with (the user's *current* role counts,
    /// not the one at sign-in).
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
        if credential(&user) != s.credential {
            return Ok(None);
        }
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
    pub async fn logout(&self, cookie: &str) -> Result<Durable<()>, ServiceError> {
        self.store.delete_session(&session_key(cookie))?;
        Ok(self.store.durable(()).await?)
    }

    /// Whether a refused sign-in is written to the audit log: at most one entry every
    /// [`REFUSED_AUDIT_EVERY`], carrying how many were refused since the entry before (every
    /// refusal is counted in `hangar_auth_sign_ins_total`). `Some(n)`: write it, `n` more were
    /// refused since the last entry.
    pub fn sample_refused(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut s = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let due = s
            .last_written
            .is_none_or(|t| now.duration_since(t) >= REFUSED_AUDIT_EVERY);
        if !due {
            s.since_last += 1;
            return None;
        }
        s.last_written = Some(now);
        Some(std::mem::take(&mut s.since_last))
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

/// Entries one retention pass drops at most (the next pass goes on).
const RETENTION_BATCH: u64 = 50_000;

/// An audit entry as the report's hash chain carries it (without its links).
pub fn chain_entry(r: &AuditRecord) -> crate::report::ChainEntry {
    crate::report::ChainEntry {
        seq: r.seq,
        at: crate::time::rfc3339_ms(r.at_ms),
        actor: r.actor.clone(),
        via: r.via.clone(),
        action: r.action.clone(),
        target: r.target.clone(),
        result: r.result.clone(),
        status: r.status,
        prev: String::new(),
        hash: String::new(),
    }
}

/// What a retention pass dropped: entries `from..=to` and the chain hash at `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedSpan {
    /// First entry dropped.
    pub from: u64,
    /// Last entry dropped.
    pub to: u64,
    /// Chain hash at `to`.
    pub hash: String,
}

/// The checkpoint after dropping what the limits call for, from the one before (at most
/// [`RETENTION_BATCH`] entries, never the last entry): reads the entries it drops to carry the
/// chain hash over them. `None`: nothing to drop.
fn next_checkpoint(
    store: &Store,
    max_entries: u64,
    cutoff_ms: Option<i64>,
    now_ms: i64,
) -> Result<Option<(AuditCheckpoint, u64)>, StoreError> {
    let before = store.audit_checkpoint()?;
    let (seq0, mut hash) = before.as_ref().map_or_else(
        || (0, crate::report::GENESIS.to_string()),
        |c| (c.seq, c.hash.clone()),
    );
    let Some((first, last)) = store.audit_bounds()? else {
        return Ok(None);
    };
    let first = first.max(seq0 + 1);
    if first > last {
        return Ok(None);
    }
    // one more than the excess: the pass writes an entry of its own (`audit.retention`)
    let excess = match (last - first + 1).saturating_sub(max_entries) {
        0 => 0,
        n => n + 1,
    };
    let (mut n, mut to) = (0u64, seq0);
    store.each_audit_after(seq0, |r| {
        let old = cutoff_ms.is_some_and(|c| r.at_ms < c);
        if r.seq >= last || n >= RETENTION_BATCH || !(n < excess || old) {
            return Ok::<bool, StoreError>(false);
        }
        hash = crate::report::entry_hash(&hash, &chain_entry(&r));
        to = r.seq;
        n += 1;
        Ok(true)
    })?;
    if n == 0 {
        return Ok(None);
    }
    let dropped = before.map_or(0, |c| c.dropped) + n;
    Ok(Some((
        AuditCheckpoint {
            schema: AUDIT_CHECKPOINT_SCHEMA,
            seq: to,
            hash,
            dropped,
            at_ms: now_ms,
        },
        seq0 + 1,
    )))
}

impl Accounts {
    /// One pass of the audit log's retention (`[audit]`): drops the oldest entries beyond
    /// `max_entries` and those older than `max_age`, keeps the chain hash of the last one
    /// dropped (written and flushed before anything is deleted, so a crash in between leaves
    /// only entries every reader skips), then records the drop itself as an entry
    /// (`audit.retention`, naming the span and the hash). Returns what it dropped.
    pub async fn retain_audit(
        &self,
        max_entries: u64,
        max_age: Option<Duration>,
    ) -> Result<Option<DroppedSpan>, ServiceError> {
        let store = self.store.clone();
        let now = crate::time::now_ms();
        let cutoff = max_age.map(|a| now - a.as_millis() as i64);
        let (checkpoint, from) = match tokio::task::spawn_blocking(move || {
            // leftovers of a pass cut off between its checkpoint and its deletion
            if let Some(c) = store.audit_checkpoint()? {
                store.delete_audit_through(c.seq, usize::MAX)?;
            }
            next_checkpoint(&store, max_entries, cutoff, now)
        })
        .await
        .map_err(|e| ServiceError::Corrupt(format!("audit retention task: {e}")))??
        {
            Some(x) => x,
            None => return Ok(None),
        };
        self.store.put_audit_checkpoint(&checkpoint)?;
        self.store.flush().await?;
        let store = self.store.clone();
        let to = checkpoint.seq;
        tokio::task::spawn_blocking(move || store.delete_audit_through(to, usize::MAX))
            .await
            .map_err(|e| ServiceError::Corrupt(format!("audit retention task: {e}")))??;
        let span = DroppedSpan {
            from,
            to,
            hash: checkpoint.hash,
        };
        let system = Principal {
            actor: "system".into(),
            via: Via::System,
            role: Role::Admin,
            csrf: None,
        };
        let why = match cutoff {
            Some(_) => "max_entries or max_age_days",
            None => "max_entries",
        };
        self.audit(
            &system,
            "audit.retention",
            &format!(
                "entries {}-{} dropped by [audit] {why}; chain hash at {}: {}",
                span.from, span.to, span.to, span.hash
            ),
            200,
        )
        .await?;
        tracing::info!(
            from = span.from,
            to = span.to,
            "audit entries dropped by retention"
        );
        Ok(Some(span))
    }

    /// Whether a pass that dropped `span` stopped at its batch size (another pass should
    /// follow at once).
    pub fn retention_batch_full(span: &DroppedSpan) -> bool {
        span.to - span.from + 1 >= RETENTION_BATCH
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
    }

    fn limits() -> Limits {
        Limits {
            per_user_and_address: 5,
            per_address: 20,
            per_user: 100,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_count_before_they_are_checked() {
        let t = Throttle::new(limits());
        // 24 attempts in flight at once: five get through, the rest wait
        let held: Vec<_> = (0..24)
            .filter_map(|_| t.begin("ops", "10.0.0.9").ok())
            .collect();
        assert_eq!(held.len(), 5);
        drop(held);
        assert!(t.begin("ops", "10.0.0.9").is_err());
        // a success takes its attempt back and forgets the pair
        let t = Throttle::new(limits());
        for _ in 0..4 {
            drop(t.begin("ops", "10.0.0.9").unwrap());
        }
        t.succeeded(t.begin("ops", "10.0.0.9").unwrap());
        assert!(t.begin("ops", "10.0.0.9").is_ok());
        // an attempt that was never checked is no failure
        let t = Throttle::new(limits());
        for _ in 0..10 {
            t.not_checked(t.begin("ops", "10.0.0.9").unwrap());
        }
        assert!(t.begin("ops", "10.0.0.9").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stranger_cannot_lock_out_a_user_signing_in_elsewhere() {
        let t = Throttle::new(limits());
        // ten attempts a minute for an hour from one address
        let mut checked = 0;
        for _ in 0..600 {
            if let Ok(a) = t.begin("ops", "203.0.113.5") {
                checked += 1;
                drop(a);
            }
            tokio::time::advance(Duration::from_secs(6)).await;
        }
        assert!(
            checked < 40,
            "{checked} of the attacker's 600 guesses were checked"
        );
        let a = t
            .begin("ops", "10.0.0.9")
            .expect("the user from the office does not");
        t.succeeded(a);
        // many addresses together reach the loose per-name limit
        let t = Throttle::new(limits());
        for i in 0..100 {
            drop(t.begin("ops", &format!("198.51.100.{i}")).unwrap());
        }
        assert!(t.begin("ops", "10.0.0.9").is_err());
        // an address guessing many names waits after 20
        let t = Throttle::new(limits());
        for i in 0..20 {
            drop(t.begin(&format!("u{i}"), "203.0.113.5").unwrap());
        }
        assert!(t.begin("u99", "203.0.113.5").is_err());
        // failures are forgotten
        tokio::time::advance(FAILURE_MEMORY + MAX_LOCK).await;
        assert!(t.begin("u99", "203.0.113.5").is_ok());
    }

    #[test]
    fn names_are_plain() {
        assert!(valid_name("ops.lead-2"));
        assert!(!valid_name(""));
        assert!(!valid_name("<b>"));
        assert!(!valid_name(&"a".repeat(65)));
    }
}
