//! The signed site report: what an air-gapped site carries back out. Shared by the appliance
//! (`GET /api/reports`, `hangar report export`) and the checker (`hangar report verify`, which
//! needs nothing but the file and the site's public key).
//!
//! A report is a tar of `report.json` and `report.json.minisig` (signed by the site key, trusted
//! comment `hangar-report site=<key id> from=<seq> to=<seq>`), so `minisign -V` can check the
//! extracted `report.json` too. Its audit section is a **hash chain**: every entry carries the
//! hash of the one before (`prev`) and its own (`hash` = sha256 of `prev` and the entry's
//! canonical JSON), starting from `previousHash` — 64 zeros for the first entry ever, else the
//! `hash` of the last entry of the report before. A removed, added or edited entry breaks the
//! chain; an incremental export (`--since SEQ`) continues it.
//!
//! The appliance keeps its audit log within a retention (`[audit]`): the oldest entries are
//! dropped, and the chain hash of the last dropped one is kept. A report whose range starts in
//! what was dropped says so in `dropped` (`from`, `to`, and the chain hash at `to`, under the
//! site's signature) and its chain goes on from that hash; the drop itself is an entry of the
//! chain (`audit.retention`, naming the span and the hash), so a span can never vanish unsaid.

use serde::{Deserialize, Serialize};

/// The report's `format`.
pub const FORMAT: &str = "hangar-report/1";
/// The chain's start.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit entry as a report carries it; the fields before `prev` are what is hashed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChainEntry {
    /// Sequence number in the appliance's audit log.
    pub seq: u64,
    /// RFC 3339 time.
    pub at: String,
    /// Who.
    pub actor: String,
    /// token | cli | session | system.
    pub via: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// ok | refused <status>.
    pub result: String,
    /// HTTP status of the answer.
    pub status: u16,
    /// Hash of the entry before.
    pub prev: String,
    /// Hash of this one.
    pub hash: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Hashed<'a> {
    seq: u64,
    at: &'a str,
    actor: &'a str,
    via: &'a str,
    action: &'a str,
    target: &'a str,
    result: &'a str,
    status: u16,
}

/// The hash of an entry after `prev` (its `prev` and `hash` fields are not part of it).
pub fn entry_hash(prev: &str, e: &ChainEntry) -> String {
    use sha2::Digest;
    let body = serde_json::to_vec(&Hashed {
        seq: e.seq,
        at: &e.at,
        actor: &e.actor,
        via: &e.via,
        action: &e.action,
        target: &e.target,
        result: &e.result,
        status: e.status,
    })
    .expect("json");
    let mut h = sha2::Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(&body);
    hex::encode(h.finalize())
}

/// Links `entries` (in seq order, `prev`/`hash` ignored) into a chain after `prev`; returns
/// the last hash.
pub fn link(mut prev: String, entries: &mut [ChainEntry]) -> String {
    for e in entries {
        e.prev = prev.clone();
        e.hash = entry_hash(&prev, e);
        prev = e.hash.clone();
    }
    prev
}

/// Entries the appliance's retention dropped before a report carried them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dropped {
    /// The first dropped entry of the report's range (its `since` + 1).
    pub from: u64,
    /// The last dropped entry.
    pub to: u64,
    /// The chain hash of entry `to`, which the report's entries follow.
    pub last_hash: String,
}

/// The audit section of a report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditChain {
    /// The hash at `since` (which the first entry follows unless entries were dropped): 64
    /// zeros for 0, empty when that entry was dropped before its hash was ever exported.
    pub previous_hash: String,
    /// The sequence number after which this report starts (0: from the beginning).
    pub since: u64,
    /// Entries of this report's range dropped by the appliance's retention, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<Dropped>,
    /// The entries, in order.
    pub entries: Vec<ChainEntry>,
    /// The hash of the last entry (= `previousHash` when there are none).
    pub last_hash: String,
}

/// What is wrong with an audit chain: the first entry (or part) that does not check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A declared dropped span that does not start right after `since`.
    #[error("the dropped span {from}..{to} does not start right after entry {since}")]
    Dropped {
        /// Its first entry.
        from: u64,
        /// Its last entry.
        to: u64,
        /// The report's start.
        since: u64,
    },
    /// Entries missing or out of order.
    #[error("audit entry {seq} follows {after}: entries are missing or out of order")]
    Gap {
        /// The entry.
        seq: u64,
        /// The entry before it.
        after: u64,
    },
    /// An entry that does not name the one before.
    #[error(
        "audit entry {seq} does not follow the one before it (prev {prev}, expected {expected})"
    )]
    Unlinked {
        /// The entry.
        seq: u64,
        /// What it names.
        prev: String,
        /// The hash before it.
        expected: String,
    },
    /// An entry whose hash does not match it.
    #[error("audit entry {seq} was edited (its hash does not match)")]
    Edited {
        /// The entry.
        seq: u64,
    },
    /// The last hash is not the last entry's.
    #[error("the chain's last hash does not match its last entry")]
    End,
}

/// Checks a chain: each entry follows the one before, by `prev` and by sequence number
/// (no gap), and its hash is right. `Err` names the first entry that is wrong.
pub fn check_chain(c: &AuditChain) -> Result<(), ChainError> {
    let (mut prev, mut seq) = match &c.dropped {
        Some(d) => {
            if d.from != c.since + 1 || d.to < d.from {
                return Err(ChainError::Dropped {
                    from: d.from,
                    to: d.to,
                    since: c.since,
                });
            }
            (d.last_hash.clone(), d.to)
        }
        None => (c.previous_hash.clone(), c.since),
    };
    for e in &c.entries {
        if e.seq != seq + 1 {
            return Err(ChainError::Gap {
                seq: e.seq,
                after: seq,
            });
        }
        if e.prev != prev {
            return Err(ChainError::Unlinked {
                seq: e.seq,
                prev: e.prev.clone(),
                expected: prev,
            });
        }
        if entry_hash(&prev, e) != e.hash {
            return Err(ChainError::Edited { seq: e.seq });
        }
        prev = e.hash.clone();
        seq = e.seq;
    }
    if prev != c.last_hash {
        return Err(ChainError::End);
    }
    Ok(())
}

/// The trusted comment of a report signature.
pub fn comment(site_key_id: &str, since: u64, to: u64) -> String {
    format!("hangar-report site={site_key_id} from={since} to={to}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> ChainEntry {
        ChainEntry {
            seq,
            at: "2026-12-01T00:00:00Z".into(),
            actor: "admin-token".into(),
            via: "cli".into(),
            action: "firmware.upload".into(),
            target: format!("gateway/1.0.{seq}"),
            result: "ok".into(),
            status: 201,
            prev: String::new(),
            hash: String::new(),
        }
    }

    fn chain(since: u64, n: u64, prev: &str) -> AuditChain {
        let mut entries: Vec<_> = (since + 1..=since + n).map(entry).collect();
        let last = link(prev.to_string(), &mut entries);
        AuditChain {
            previous_hash: prev.to_string(),
            since,
            dropped: None,
            entries,
            last_hash: last,
        }
    }

    #[test]
    fn a_chain_checks_and_any_edit_gap_or_reorder_breaks_it() {
        let c = chain(0, 5, GENESIS);
        check_chain(&c).unwrap();
        // continued by the next export
        let next = chain(5, 3, &c.last_hash);
        check_chain(&next).unwrap();
        assert_eq!(next.entries[0].prev, c.last_hash);

        let mut edited = c.clone();
        edited.entries[2].result = "refused 403".into();
        assert!(matches!(
            check_chain(&edited),
            Err(ChainError::Edited { seq: 3 })
        ));
        let mut gap = c.clone();
        gap.entries.remove(2);
        assert!(check_chain(&gap).is_err());
        let mut swapped = c.clone();
        swapped.entries.swap(1, 2);
        assert!(check_chain(&swapped).is_err());
        let mut rehashed = c.clone();
        rehashed.entries[2].target = "x".into();
        let h = entry_hash(&rehashed.entries[2].prev.clone(), &rehashed.entries[2]);
        rehashed.entries[2].hash = h; // re-hashing one entry breaks the next one's prev
        assert!(check_chain(&rehashed).is_err());
        let mut cut = c.clone();
        cut.entries.pop();
        assert!(
            check_chain(&cut).is_err(),
            "the last hash names the real end"
        );
    }

    #[test]
    fn a_dropped_span_is_declared_and_the_chain_goes_on_from_its_hash() {
        let whole = chain(0, 8, GENESIS);
        // entries 1..5 dropped: the report from 0 declares them and starts at 6
        let mut after = whole.clone();
        let kept = after.entries.split_off(5);
        after.dropped = Some(Dropped {
            from: 1,
            to: 5,
            last_hash: whole.entries[4].hash.clone(),
        });
        after.entries = kept;
        check_chain(&after).unwrap();
        // a span that does not start at since + 1, or a wrong hash, is refused
        let mut wrong = after.clone();
        wrong.dropped.as_mut().unwrap().from = 2;
        assert!(check_chain(&wrong).is_err());
        let mut wrong = after.clone();
        wrong.dropped.as_mut().unwrap().last_hash = whole.entries[3].hash.clone();
        assert!(check_chain(&wrong).is_err());
        // hiding an entry inside the kept part still breaks it
        let mut hidden = after.clone();
        hidden.entries.remove(1);
        assert!(check_chain(&hidden).is_err());
    }
}
