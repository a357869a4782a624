//! Which completed upgrades their devices have shown they booted — in memory: after a restart a
//! device gets a fresh grace, and announces again when it reconnects. A completed task is
//! *settled* (a campaign counts it a success) once its device reported the target version, or
//! the reboot grace after completion passed with no sign of the old one. The old version within
//! the grace makes it a *suspect* until the grace ends; the sweeper then rolls it back — and from
//! the moment the sweeper takes a suspect until its rollback is stored, the task must not look
//! settled either (a campaign round reading the task just before the rollback would otherwise
//! count a success that is about to fail).

use std::collections::{HashMap, HashSet};

/// The settling state of the completed tasks of this process.
#[derive(Debug, Default)]
pub struct Settling {
    /// Completed tasks whose device reported the target version since.
    confirmed: HashSet<u64>,
    /// Tasks whose device announced its old version within the reboot grace: when the grace
    /// ends (ms since the epoch) and the version; a rollback then, unless it confirms first.
    suspects: HashMap<u64, (i64, String)>,
    /// Suspects the sweeper took to roll back, and those it rolled back.
    deciding: HashSet<u64>,
}

impl Settling {
    /// The device of task `id` announced its old `version` before `deadline`.
    pub fn suspect(&mut self, id: u64, deadline: i64, version: String) {
        self.suspects.insert(id, (deadline, version));
    }

    /// The device of task `id` showed the target version; true if that is news.
    pub fn confirm(&mut self, id: u64) -> bool {
        self.suspects.remove(&id);
        self.deciding.remove(&id);
        self.confirmed.insert(id)
    }

    /// Completed task `id` was rolled back at once (its device came back on the old version
    /// after the grace): it never looks settled again, unless its device confirms.
    pub fn rolled_back(&mut self, id: u64) {
        self.suspects.remove(&id);
        self.confirmed.remove(&id);
        self.deciding.insert(id);
    }

    /// The suspects whose grace ended by `now`, taken for the sweeper to roll back: from now
    /// on they do not look settled, unless [`Settling::decided`] says one was not rolled back
    /// (or its device confirms).
    pub fn take_due(&mut self, now: i64) -> Vec<(u64, String)> {
        let due: Vec<(u64, String)> = (self.suspects.iter())
            .filter(|(_, (at, _))| *at <= now)
            .map(|(id, (_, v))| (*id, v.clone()))
            .collect();
        for (id, _) in &due {
            self.suspects.remove(id);
            self.deciding.insert(*id);
        }
        due
    }

    /// The sweeper stored the outcome of task `id`: rolled back (it stays unsettled), or not
    /// after all (it may settle again).
    pub fn decided(&mut self, id: u64, rolled_back: bool) {
        if !rolled_back {
            self.deciding.remove(&id);
        }
    }

    /// Whether completed task `id` (completed at `completed_ms`) is settled at `now`.
    pub fn settled(&self, id: u64, completed_ms: i64, grace_ms: i64, now: i64) -> bool {
        if self.suspects.contains_key(&id) || self.deciding.contains(&id) {
            return false;
        }
        self.confirmed.contains(&id) || now >= completed_ms + grace_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: i64 = 1000;

    #[test]
    fn settled_by_confirmation_or_by_a_quiet_grace() {
        let mut s = Settling::default();
        assert!(!s.settled(1, 0, GRACE, 999));
        assert!(s.settled(1, 0, GRACE, 1000));
        assert!(s.confirm(2));
        assert!(!s.confirm(2), "not news the second time");
        assert!(s.settled(2, 0, GRACE, 1));
    }

    #[test]
    fn a_suspect_is_never_settled_until_the_sweeper_has_decided() {
        let mut s = Settling::default();
        s.suspect(1, GRACE, "1.0.1".into());
        assert!(!s.settled(1, 0, GRACE, 5000), "the old version was seen");
        assert!(s.take_due(999).is_empty());
        assert_eq!(s.take_due(1000), vec![(1, "1.0.1".to_string())]);
        // taken, not yet rolled back in the store: a round reading the task now must not count it
        assert!(!s.settled(1, 0, GRACE, 5000));
        assert!(s.take_due(5000).is_empty(), "taken once");
        // rolled back: a round holding the task as it was before still must not count it
        s.decided(1, true);
        assert!(!s.settled(1, 0, GRACE, 5000));
        // unless the device boots the new image after all
        assert!(s.confirm(1));
        assert!(s.settled(1, 0, GRACE, 5000));
        // a suspect the sweeper found not to need a rollback settles again
        s.suspect(3, GRACE, "1.0.1".into());
        s.take_due(GRACE);
        s.decided(3, false);
        assert!(s.settled(3, 0, GRACE, 5000));
        // a late confirmation clears a suspicion
        s.suspect(2, GRACE, "1.0.1".into());
        s.confirm(2);
        assert!(s.settled(2, 0, GRACE, 1) && s.take_due(5000).is_empty());
        // rolled back at once, with no suspicion first: never settled by the grace
        s.rolled_back(2);
        assert!(!s.settled(2, 0, GRACE, 5000));
    }
}
