//! Connections that have not authenticated yet. They get a budget of their own, smaller than
//! `mqtt.max_connections` (which only authenticated devices count against), a limit per source
//! address, and less time to send CONNECT while the budget is more than half used. When either
//! is full, a newcomer takes the place of the oldest waiting connection — preferring one that
//! has not even finished sending its first packet — so strangers holding sockets open can delay
//! a device by one round trip but never lock it out.

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

struct Waiting {
    ip: IpAddr,
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
        if st.per_ip.get(&ip).copied().unwrap_or(0) >= self.per_ip {
            self.evict_oldest(&mut st, Some(ip));
        }
        if st.waiting.len() >= self.max {
            self.evict_oldest(&mut st, None);
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

    fn evict_oldest(&self, st: &mut State, of: Option<IpAddr>) {
        let candidates = || {
            st.waiting
                .iter()
                .filter(|(_, w)| of.is_none_or(|ip| w.ip == ip))
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

    #[test]
    fn the_oldest_silent_connection_makes_room() {
        let gate = PreAuth::new(4, 3);
        let a = gate.admit(ip(1));
        let b = gate.admit(ip(1));
        a.spoke();
        let c = gate.admit(ip(1));
        // the address is at its limit: the oldest that has not spoken (b) goes, not a
        let d = gate.admit(ip(1));
        assert!(b.evicted.is_cancelled() && !a.evicted.is_cancelled());
        assert!(!c.evicted.is_cancelled() && !d.evicted.is_cancelled());
        assert_eq!(gate.waiting(), 3);
        // the budget is full with another address: the oldest silent of all goes (c)
        let e = gate.admit(ip(2));
        assert_eq!(gate.waiting(), 4);
        let f = gate.admit(ip(3));
        assert!(c.evicted.is_cancelled());
        assert_eq!(gate.waiting(), 4);
        assert_eq!(f.deadline, DEADLINE_UNDER_PRESSURE);
        drop((a, b, c, d, e, f));
        assert_eq!(gate.waiting(), 0);
        assert_eq!(gate.admit(ip(1)).deadline, DEADLINE);
    }
}
