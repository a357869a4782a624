//! Users, sessions and the audit log in the store.

use super::{
    AuditCheckpoint, AuditRecord, Engine, Result, SessionRecord, Store, StoreError, UserRecord,
};
use super::{decode, encode};

impl Store {
    /// Inserts a new user; `Conflict` if the name exists.
    pub fn insert_user(&self, rec: &UserRecord) -> Result<()> {
        self.with(|e| {
            match e
                .users
                .compare_and_swap(rec.name.as_bytes(), None::<&[u8]>, Some(encode(rec)))?
            {
                Ok(()) => Ok(()),
                Err(_) => Err(StoreError::Conflict(rec.name.clone())),
            }
        })
    }

    /// Replaces a user record.
    pub fn put_user(&self, rec: &UserRecord) -> Result<()> {
        self.with(|e| {
            e.users.insert(rec.name.as_bytes(), encode(rec))?;
            Ok(())
        })
    }

    /// One user.
    pub fn get_user(&self, name: &str) -> Result<Option<UserRecord>> {
        self.with(|e| {
            e.users
                .get(name.as_bytes())?
                .map(|v| decode(name.as_bytes(), &v))
                .transpose()
        })
    }

    /// Every user, by name.
    pub fn list_users(&self) -> Result<Vec<UserRecord>> {
        self.with(|e| {
            e.users
                .iter()
                .map(|kv| {
                    let (k, v) = kv?;
                    decode(&k, &v)
                })
                .collect()
        })
    }

    /// Removes a user and every session of theirs, returning the user.
    pub fn delete_user(&self, name: &str) -> Result<Option<UserRecord>> {
        let gone = self.with(|e| {
            e.users
                .remove(name.as_bytes())?
                .map(|v| decode(name.as_bytes(), &v))
                .transpose()
        })?;
        self.delete_sessions_of(name)?;
        Ok(gone)
    }

    /// Writes a session under the hash of its cookie.
    pub fn put_session(&self, key: &str, rec: &SessionRecord) -> Result<()> {
        self.with(|e| {
            e.sessions.insert(key.as_bytes(), encode(rec))?;
            Ok(())
        })
    }

    /// The session stored under `key` (one of an older schema reads as none).
    pub fn get_session(&self, key: &str) -> Result<Option<SessionRecord>> {
        self.with(|e| {
            Ok(e.sessions
                .get(key.as_bytes())?
                .and_then(|v| session(key.as_bytes(), &v)))
        })
    }

    /// Whether any user exists.
    pub fn has_users(&self) -> Result<bool> {
        self.with(|e| Ok(e.users.first()?.is_some()))
    }

    /// Removes one session.
    pub fn delete_session(&self, key: &str) -> Result<()> {
        self.with(|e| {
            e.sessions.remove(key.as_bytes())?;
            Ok(())
        })
    }

    /// Removes every session of `user`; returns how many.
    pub fn delete_sessions_of(&self, user: &str) -> Result<usize> {
        self.with(|e| {
            let mut n = 0;
            for kv in e.sessions.iter() {
                let (k, v) = kv?;
                if session(&k, &v).is_none_or(|s| s.user == user) {
                    e.sessions.remove(k)?;
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    /// Removes sessions that expired before `now_ms`; returns how many.
    pub fn purge_sessions(&self, now_ms: i64) -> Result<usize> {
        self.with(|e| {
            let mut n = 0;
            for kv in e.sessions.iter() {
                let (k, v) = kv?;
                if session(&k, &v).is_none_or(|s| s.expires_at_ms < now_ms) {
                    e.sessions.remove(k)?;
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    /// Appends an entry to the audit log with the next sequence number (its `seq` is ignored)
    /// and returns that number.
    pub fn append_audit(&self, rec: &AuditRecord) -> Result<u64> {
        self.with(|e| e.append_audit(rec))
    }

    /// Where the audit chain goes on after the entries retention dropped, if it dropped any.
    pub fn audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>> {
        self.with(|e| e.audit_checkpoint())
    }

    /// Records how far the audit log was dropped. Written (and flushed) before the entries
    /// go, so a crash in between leaves entries that every reader skips and the next
    /// retention run deletes.
    pub fn put_audit_checkpoint(&self, c: &AuditCheckpoint) -> Result<()> {
        self.with(|e| {
            e.audit_retention.insert(CHECKPOINT, encode(c))?;
            Ok(())
        })
    }

    /// Deletes the audit entries up to `seq`, at most `max` of them; how many went.
    pub fn delete_audit_through(&self, seq: u64, max: usize) -> Result<usize> {
        self.with(|e| {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in e.audit.range(..=seq.to_be_bytes()).take(max) {
                let (k, _) = kv?;
                batch.remove(k);
                n += 1;
            }
            e.audit.apply_batch(batch)?;
            Ok(n)
        })
    }

    /// The first and last sequence numbers in the audit log (entries are numbered without
    /// gaps, and only the oldest are ever dropped, so there are `last - first + 1`).
    pub fn audit_bounds(&self) -> Result<Option<(u64, u64)>> {
        self.with(|e| {
            let (Some((f, _)), Some((l, _))) = (e.audit.first()?, e.audit.last()?) else {
                return Ok(None);
            };
            Ok(Some((seq_of(&f)?, seq_of(&l)?)))
        })
    }

    /// Calls `f` with every audit entry after `after`, oldest first, until it answers false.
    /// Reads as it goes: nothing is collected.
    pub fn each_audit_after<E: From<StoreError>>(
        &self,
        after: u64,
        mut f: impl FnMut(AuditRecord) -> std::result::Result<bool, E>,
    ) -> std::result::Result<(), E> {
        let engine = self.engine()?;
        let start = after.saturating_add(1);
        for kv in engine.audit.range(start.to_be_bytes()..) {
            let (k, v) = kv.map_err(|e| self.failed(e.into()))?;
            let r: AuditRecord = decode(&k, &v)?;
            if !f(r)? {
                break;
            }
        }
        Ok(())
    }

    /// Audit entries newest first that pass `keep`, skipping `offset`, at most `limit`; and how
    /// many pass `keep` in all.
    pub fn list_audit(
        &self,
        keep: impl Fn(&AuditRecord) -> bool,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<AuditRecord>, usize)> {
        self.with(|e| {
            let mut out = Vec::new();
            let mut total = 0;
            for kv in e.audit.iter().rev() {
                let (k, v) = kv?;
                let r: AuditRecord = decode(&k, &v)?;
                if !keep(&r) {
                    continue;
                }
                if total >= offset && out.len() < limit {
                    out.push(r);
                }
                total += 1;
            }
            Ok((out, total))
        })
    }
}

/// A session record, or `None` for one this build cannot read (an older schema's: it has no
/// credential to check, so it is treated as signed out and purged).
fn session(key: &[u8], v: &[u8]) -> Option<SessionRecord> {
    decode(key, v).ok()
}

/// The key of the audit checkpoint in its tree.
const CHECKPOINT: &[u8] = b"checkpoint";

/// The sequence number an audit key holds.
fn seq_of(k: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(k.try_into().map_err(|_| {
        StoreError::Corrupt {
            key: hex::encode(k),
            reason: "an audit key is not 8 bytes".into(),
        }
    })?))
}

impl Engine {
    fn audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>> {
        self.audit_retention
            .get(CHECKPOINT)?
            .map(|v| decode(CHECKPOINT, &v))
            .transpose()
    }

    fn append_audit(&self, rec: &AuditRecord) -> Result<u64> {
        // numbers go on after the dropped ones even if every kept entry were gone
        let floor = self.audit_checkpoint()?.map_or(0, |c| c.seq);
        loop {
            let last = match self.audit.last()? {
                Some((k, _)) => seq_of(&k)?,
                None => 0,
            };
            let seq = last.max(floor) + 1;
            let mut r = rec.clone();
            r.seq = seq;
            // two writers racing for one number: the loser takes the next
            if self
                .audit
                .compare_and_swap(seq.to_be_bytes(), None::<&[u8]>, Some(encode(&r)))?
                .is_ok()
            {
                return Ok(seq);
            }
        }
    }
}
