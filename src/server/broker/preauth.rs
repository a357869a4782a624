//! Connections that have not authenticated yet. They get a budget of their own, smaller than
//! `mqtt.max_connections` (which only authenticated devices count against), a limit per source
//! address, and less time to send CONNECT while the budget is more than half used. When either
//! is full, a newcomer takes the place of the oldest connection that has waited at least
//! [`STALE`] — preferring one that has not even delivered its CONNECT — so strangers holding
//! sockets open can never lock a device out. A burst of real devices (thousands connecting in
//! the same second, e.g. after a site's power cut) is all fresh: it is admitted beyond the
//! budget, up to [`HARD`] times it, where the oldest goes whatever its age.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Time to send CONNECT (and finish TLS) normally.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// ... and while more than half of the budget is in use.
pub const DEADLINE_UNDER_PRESSURE: Duration = Duration::from_secs(2);
/// A waiting connection this old may be evicted to make room.
pub const STALE: Duration = Duration::from_secs(1);
/// Beyond this many times a budget, the oldest is evicted whatever its age.
pub const HARD: usize = 4;

struct Waiting {
    ip: IpAddr,
    since: std::time::Instant,
    evict: CancellationToken,
    /// It delivered its CONNECT (it is being authenticated now).
    spoke: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    next: u64,
    /// By admission order: the first is the oldest.
    waiting: BTreeMap<u64, Waiting>,
    per_ip: HashMap<IpAddr, usize>,
}

/// The gate (see the module doc).
pub struct PreAuth {
    state: Mutex<State>,
    max: usize,
    per_ip: usize,
    /// Connections closed to make room for a newer one.
    pub evicted: std::sync::atomic::AtomicU64,
}

/// A waiting connection's place; dropping it leaves the gate.
pub struct Ticket {
    gate: Arc<PreAuth>,
    id: u64,
    /// Cancelled when a newcomer took this place.
    pub evicted: CancellationToken,
    spoke: Arc<AtomicBool>,
    /// How long it has to log in.
    pub deadline: Duration,
}

impl Ticket {
    /// The connection delivered its CONNECT: it is no longer the first to go.
    pub fn spoke(&self) {
        self.spoke.store(true, Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = st.waiting.remove(&self.id) {
            release(&mut st.per_ip, w.ip);
        }
    }
}

fn release(per_ip: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = per_ip.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&ip);
        }
    }
}

impl PreAuth {
    /// A gate for at most `max` waiting connections, `per_ip` of them from one address.
    pub fn new(max: usize, per_ip: usize) -> Arc<PreAuth> {
        Arc::new(PreAuth {
            state: Mutex::default(),
            max: max.max(1),
            per_ip: per_ip.max(1),
            evicted: Default::default(),
        })
    }

    /// Admits a new connection from `ip`, making room by evicting the oldest waiting one (of
    /// that address when the address is at its limit) if needed.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Ticket {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = st.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.per_ip * HARD {
            self.evict_oldest(&mut st, Some(ip), Duration::ZERO);
        } else if from_ip >= self.per_ip {
            self.evict_oldest(&mut st, Some(ip), STALE);
        }
        if st.waiting.len() >= self.max * HARD {
            self.evict_oldest(&mut st, None, Duration::ZERO);
        } else if st.waiting.len() >= self.max {
            self.evict_oldest(&mut st, None, STALE);
        }
        let deadline = if st.waiting.len() * 2 >= self.max {
            DEADLINE_UNDER_PRESSURE
        } else {
            DEADLINE
        };
        st.next += 1;
        let id = st.next;
        let evicted = CancellationToken::new();
        let spoke = Arc::new(AtomicBool::new(false));
        st.waiting.insert(
            id,
            Waiting {
                ip,
                since: std::time::Instant::now(),
                evict: evicted.clone(),
                spoke: spoke.clone(),
            },
        );
        *st.per_ip.entry(ip).or_default() += 1;
        Ticket {
            gate: self.clone(),
            id,
            evicted,
            spoke,
            deadline,
        }
    }

    /// Connections waiting now.
    pub fn waiting(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .len()
    }

    /// Evicts the oldest waiting connection (of `of`, if given) that has waited `min_age`,
    /// one that has not delivered its CONNECT first.
    fn evict_oldest(&self, st: &mut State, of: Option<IpAddr>, min_age: Duration) {
        let now = std::time::Instant::now();
        let candidates = || {
            st.waiting.iter().filter(move |(_, w)| {
                of.is_none_or(|ip| w.ip == ip) && now.duration_since(w.since) >= min_age
            })
        };
        let victim = candidates()
            .find(|(_, w)| !w.spoke.load(Ordering::Relaxed))
            .or_else(|| candidates().next())
            .map(|(id, _)| *id);
        if let Some(id) = victim
            && let Some(w) = st.waiting.remove(&id)
        {
            release(&mut st.per_ip, w.ip);
            w.evict.cancel();
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn age(gate: &PreAuth, t: &Ticket, by: Duration) {
        let mut st = gate.state.lock().unwrap();
        let w = st.waiting.get_mut(&t.id).unwrap();
        w.since -= by;
    }

    #[test]
    fn the_oldest_stale_silent_connection_makes_room() {
        let gate = PreAuth::new(4, 3);
        let a = gate.admit(ip(1));
        let b = gate.admit(ip(1));
        let c = gate.admit(ip(1));
        // the address is at its limit, but nobody is stale: a burst is admitted
        let d = gate.admit(ip(1));
        assert_eq!(gate.waiting(), 4);
        assert!(![&a, &b, &c, &d].iter().any(|t| t.evicted.is_cancelled()));
        assert_eq!(d.deadline, DEADLINE_UNDER_PRESSURE);
        // once stale, the oldest that has not spoken goes (b), not a, which spoke
        for t in [&a, &b, &c] {
            age(&gate, t, STALE);
        }
        a.spoke();
        let e = gate.admit(ip(1));
        assert!(b.evicted.is_cancelled() && !a.evicted.is_cancelled());
        // the budget is over with another address: the oldest stale silent of all goes (c)
        let f = gate.admit(ip(2));
        assert!(c.evicted.is_cancelled());
        assert_eq!(gate.waiting(), 4);
        drop((a, b, c, d, e, f));
        assert_eq!(gate.waiting(), 0);
        assert_eq!(gate.admit(ip(1)).deadline, DEADLINE);
    }

    #[test]
    fn beyond_the_hard_limit_the_oldest_goes_whatever_its_age() {
        let gate = PreAuth::new(2, 100);
        let first = gate.admit(ip(1));
        let rest: Vec<Ticket> = (0..2 * HARD).map(|i| gate.admit(ip(i as u8))).collect();
        assert!(first.evicted.is_cancelled());
        assert_eq!(gate.waiting(), 2 * HARD);
        drop(rest);
    }
}
