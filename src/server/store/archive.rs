//! The store's side of the task archive (`server::archive` writes the files): which finished
//! tasks may leave, and their removal together with the record of where they went.

use std::collections::HashMap;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{
    ArchiveFile, Result, Store, StoreError, TASK_ARCHIVE_SCHEMA, TaskArchiveRecord, TaskHead,
    TaskRecord, decode, encode,
};

/// The key of the one record in the `task_archive` tree.
const SUMMARY: &[u8] = b"summary";

impl Store {
    /// What the store knows of the task archive (empty when nothing was ever archived).
    pub fn task_archive(&self) -> Result<TaskArchiveRecord> {
        self.with(|e| match e.task_archive.get(SUMMARY)? {
            Some(v) => decode(SUMMARY, &v),
            None => Ok(TaskArchiveRecord {
                schema: TASK_ARCHIVE_SCHEMA,
                ..TaskArchiveRecord::default()
            }),
        })
    }

    /// The ids of the finished tasks older than the newest `keep` finished tasks of their
    /// device (at least one is always kept) that `may_go` lets go, oldest first. Blocking:
    /// reads every task (the leading fields of most).
    pub fn archive_candidates(
        &self,
        keep: usize,
        may_go: impl Fn(&TaskRecord) -> bool,
    ) -> Result<Vec<u64>> {
        let keep = keep.max(1);
        self.with(|e| {
            let mut finished: HashMap<String, usize> = HashMap::new();
            let mut ids = Vec::new();
            for kv in e.tasks.iter().rev() {
                let (k, v) = kv?;
                // the leading fields; a record of an older build (JSON) is read whole
                let whole: Option<TaskRecord>;
                let (active, device) = if v.first() == Some(&super::BINARY) {
                    let head: TaskHead<'_> =
                        postcard::from_bytes(&v[1..]).map_err(|err| StoreError::Corrupt {
                            key: format!("tasks/{}", hex::encode(&k)),
                            reason: err.to_string(),
                        })?;
                    whole = None;
                    (head.status.is_active(), head.device_id)
                } else {
                    let t: TaskRecord = decode(&k, &v)?;
                    let head = (t.status.is_active(), t.device_id.clone().into());
                    whole = Some(t);
                    head
                };
                if active || count(&mut finished, &device) <= keep {
                    continue;
                }
                let t = match whole {
                    Some(t) => t,
                    None => decode(&k, &v)?,
                };
                if may_go(&t) {
                    ids.push(t.id);
                }
            }
            ids.reverse();
            Ok(ids)
        })
    }

    /// Removes the archived tasks `ids` (written to `file`) and records the file and the tasks'
    /// counts, in one atomic write. `Conflict` (nothing written) when one of them is gone,
    /// active again or its device's newest task.
    pub fn commit_archive(&self, ids: &[u64], file: ArchiveFile) -> Result<()> {
        self.with(|e| {
            (&e.tasks, &e.task_archive)
                .transaction(|(tasks, archive)| {
                    let abort = |m: String| ConflictableTransactionError::Abort(m);
                    let mut summary: TaskArchiveRecord = match archive.get(SUMMARY)? {
                        Some(v) => decode(SUMMARY, &v).map_err(|err| abort(err.to_string()))?,
                        None => TaskArchiveRecord {
                            schema: TASK_ARCHIVE_SCHEMA,
                            ..TaskArchiveRecord::default()
                        },
                    };
                    for id in ids {
                        let key = id.to_be_bytes();
                        let Some(v) = tasks.remove(&key)? else {
                            return Err(abort(format!("task {id} is no longer in the store")));
                        };
                        let t: TaskRecord =
                            decode(&key, &v).map_err(|err| abort(err.to_string()))?;
                        // (the index is taken after sled's writes, never around them)
                        if t.status.is_active() || e.index().latest.get(&t.device_id) == Some(id) {
                            return Err(abort(format!(
                                "task {id} is active or its device's newest: not archived"
                            )));
                        }
                        summary.all.add(&t);
                        summary
                            .by_version
                            .entry(t.to_version.clone())
                            .or_default()
                            .add(&t);
                        if let Some(c) = &t.campaign_id {
                            summary.by_campaign.entry(c.clone()).or_default().add(&t);
                        }
                    }
                    summary.files.push(file.clone());
                    archive.insert(SUMMARY, encode(&summary))?;
                    Ok(())
                })
                .map_err(|err| match err {
                    TransactionError::Abort(m) => StoreError::Conflict(m),
                    TransactionError::Storage(err) => StoreError::from(err),
                })
        })
    }
}

/// Counts one more finished task of `device`; how many so far (newest first).
fn count(finished: &mut HashMap<String, usize>, device: &str) -> usize {
    match finished.get_mut(device) {
        Some(n) => {
            *n += 1;
            *n
        }
        None => {
            finished.insert(device.to_string(), 1);
            1
        }
    }
}
