//! The change feed behind the console's live views (`GET /api/events`).
//!
//! Every change the services make (a task moves, a device comes or goes, a campaign or firmware
//! or delta record is written) is published here as a small [`Change`] with a sequence number.
//! The feed keeps the last [`RING`] changes in a ring; a subscriber holds only its cursor (the
//! last sequence number it has seen), so memory does not grow with subscribers or with a slow
//! one. A subscriber whose cursor fell out of the ring gets [`Batch::Resync`] — never a silent
//! gap — and reloads what it shows.
//!
//! Aggregation is the reader's: [`Feed::next_batch`] waits for a change, then collects every
//! change of the next quarter second into one [`Batch`], so a browser gets at most four updates
//! a second however many devices report.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

/// Changes kept for resuming subscribers.
pub const RING: usize = 8192;
/// How long a subscriber collects changes into one batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(250);

/// One change.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A task was written.
    Task {
        /// The device.
        device_id: String,
        /// Its campaign, if any.
        campaign_id: Option<String>,
        /// The task's status (API spelling).
        status: &'static str,
        /// Percent.
        progress: u8,
    },
    /// A device record was written, or the device came online or went offline.
    Device {
        /// The device.
        id: String,
    },
    /// A campaign record was written.
    Campaign {
        /// The campaign.
        id: String,
    },
    /// A firmware record was written or deleted.
    Firmware,
    /// A delta record was written.
    Delta,
}

/// What a subscriber gets.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// Changes in order; `last` is the sequence number of the last one.
    Changes {
        /// Sequence number of the last change (the SSE `id`).
        last: u64,
        /// The changes.
        changes: Vec<Change>,
    },
    /// The subscriber fell behind the ring: reload everything; resume from `last`.
    Resync {
        /// The newest sequence number.
        last: u64,
    },
}

/// The feed.
pub struct Feed {
    ring: Mutex<VecDeque<(u64, Change)>>,
    latest: watch::Sender<u64>,
    capacity: usize,
    closed: std::sync::atomic::AtomicBool,
    /// Open event streams ([`Feed::follow`]).
    followers: std::sync::atomic::AtomicUsize,
    /// When the last stream closed (ms; 0: none has).
    last_closed_ms: std::sync::atomic::AtomicI64,
}

/// How long after the last event stream closed changes are still kept, for a browser that
/// comes back with `Last-Event-ID` (a reload, a network blip).
pub const KEEP_AFTER_LAST_STREAM_MS: i64 = 300_000;

/// An open event stream: while one exists, changes are kept in the ring.
pub struct Follower(std::sync::Arc<Feed>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0
            .last_closed_ms
            .store(crate::time::now_ms(), std::sync::atomic::Ordering::SeqCst);
        self.0
            .followers
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Default for Feed {
    fn default() -> Self {
        Feed::with_capacity(RING)
    }
}

impl Feed {
    /// A feed keeping the last `capacity` changes.
    pub fn with_capacity(capacity: usize) -> Feed {
        Feed {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(RING))),
            latest: watch::channel(0).0,
            capacity: capacity.max(1),
            closed: Default::default(),
            followers: Default::default(),
            last_closed_ms: Default::default(),
        }
    }

    /// Publishes one change.
    pub fn publish(&self, change: Change) {
        // the sequence moves under the ring's lock, so two writers never take one number
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let seq = *self.latest.borrow() + 1;
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back((seq, change));
        self.latest.send_replace(seq);
    }

    /// Registers an open event stream; take it before reading [`Feed::latest`] as the stream's
    /// cursor.
    pub fn follow(self: &std::sync::Arc<Self>) -> Follower {
        self.followers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Follower(self.clone())
    }

    /// Publishes the change `make` builds — or, when no event stream is open nor has been for
    /// [`KEEP_AFTER_LAST_STREAM_MS`], only moves the sequence on and forgets what the ring held,
    /// so a stream that resumes from before gets a resync. Saves the hot paths (every task
    /// write) building changes nobody will read.
    pub fn publish_with(&self, make: impl FnOnce() -> Change) {
        use std::sync::atomic::Ordering::SeqCst;
        let closed = self.last_closed_ms.load(SeqCst);
        if self.followers.load(SeqCst) > 0
            || (closed > 0 && crate::time::now_ms() - closed < KEEP_AFTER_LAST_STREAM_MS)
        {
            return self.publish(make());
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.clear();
        let seq = *self.latest.borrow() + 1;
        self.latest.send_replace(seq);
    }

    /// The newest sequence number (0: nothing published yet).
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// Changes after `cursor`, or a resync if some of them have left the ring. `None`: nothing
    /// new.
    pub fn since(&self, cursor: u64) -> Option<Batch> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let last = ring.back().map(|(s, _)| *s)?;
        if last <= cursor {
            // a cursor from the future (a restarted appliance): start again from now
            return (last < cursor).then_some(Batch::Resync { last });
        }
        let first = ring.front().map(|(s, _)| *s).unwrap_or(last);
        if cursor + 1 < first {
            return Some(Batch::Resync { last });
        }
        let skip = (cursor + 1 - first) as usize;
        Some(Batch::Changes {
            last,
            changes: ring.iter().skip(skip).map(|(_, c)| c.clone()).collect(),
        })
    }

    /// Ends every subscription (the appliance is shutting down: open event streams must not
    /// hold the drain).
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.latest.send_modify(|_| {});
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits for a change after `cursor`, then for [`BATCH_WINDOW`] more, and returns what
    /// came in that time; `None` once the feed is closed.
    pub async fn next_batch(&self, cursor: u64) -> Option<Batch> {
        let mut rx = self.latest.subscribe();
        loop {
            if self.is_closed() {
                return None;
            }
            if *rx.borrow_and_update() != cursor {
                break;
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
        tokio::time::sleep(BATCH_WINDOW).await;
        if self.is_closed() {
            return None;
        }
        Some(self.since(cursor).unwrap_or(Batch::Resync {
            last: self.latest(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str) -> Change {
        Change::Device { id: id.into() }
    }

    #[test]
    fn a_cursor_inside_the_ring_gets_what_followed_it() {
        let f = Feed::with_capacity(4);
        assert_eq!(f.since(0), None);
        f.publish(dev("a"));
        f.publish(dev("b"));
        assert_eq!(
            f.since(1),
            Some(Batch::Changes {
                last: 2,
                changes: vec![dev("b")]
            })
        );
        assert_eq!(f.since(2), None);
    }

    #[test]
    fn a_cursor_that_fell_out_of_the_ring_gets_a_resync_never_a_gap() {
        let f = Feed::with_capacity(3);
        for i in 0..5 {
            f.publish(dev(&i.to_string()));
        }
        // ring holds 3, 4, 5: cursor 2 is still whole, cursor 1 lost change 2
        assert!(
            matches!(f.since(2), Some(Batch::Changes { last: 5, ref changes }) if changes.len() == 3)
        );
        assert_eq!(f.since(1), Some(Batch::Resync { last: 5 }));
        // a cursor from before a restart (higher than anything here) resyncs too
        assert_eq!(f.since(99), Some(Batch::Resync { last: 5 }));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_kept_while_a_stream_is_open_and_for_a_while_after() {
        let f = std::sync::Arc::new(Feed::with_capacity(16));
        f.publish_with(|| panic!("nobody ever followed: the change is not even built"));
        assert_eq!(f.latest(), 1, "the sequence still moves");
        let follower = f.follow();
        f.publish_with(|| dev("a"));
        drop(follower);
        // a browser that reloads within five minutes resumes where it was
        tokio::time::advance(std::time::Duration::from_secs(299)).await;
        f.publish_with(|| dev("b"));
        assert_eq!(
            f.since(2),
            Some(Batch::Changes {
                last: 3,
                changes: vec![dev("b")]
            })
        );
        // later nothing is kept, and a stream that comes back from before must reload
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        f.publish_with(|| panic!("not built"));
        assert_eq!(f.since(3), None, "nothing kept");
        let _again = f.follow();
        f.publish_with(|| dev("c"));
        assert_eq!(f.since(3), Some(Batch::Resync { last: 5 }));
        assert_eq!(
            f.since(4),
            Some(Batch::Changes {
                last: 5,
                changes: vec![dev("c")]
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closing_ends_every_waiting_subscriber() {
        let f = std::sync::Arc::new(Feed::default());
        let g = f.clone();
        let waiter = tokio::spawn(async move { g.next_batch(0).await });
        tokio::task::yield_now().await;
        f.close();
        assert_eq!(waiter.await.unwrap(), None);
        assert_eq!(f.next_batch(0).await, None, "and every later one");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_becomes_one_batch() {
        let f = std::sync::Arc::new(Feed::default());
        let g = f.clone();
        let waiter = tokio::spawn(async move { g.next_batch(0).await });
        tokio::task::yield_now().await;
        for i in 0..1000 {
            f.publish(dev(&i.to_string()));
        }
        match waiter.await.unwrap().expect("open feed") {
            Batch::Changes { last, changes } => {
                assert_eq!(last, 1000);
                assert_eq!(changes.len(), 1000);
            }
            other => panic!("{other:?}"),
        }
    }
}
