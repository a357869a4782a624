//! What the appliance answers a site broker that asks it about devices (EMQX's HTTP
//! authentication and authorization, VerneMQ's webhooks; the wire shapes are in
//! `http::hooks_api`). Device credentials stay in the registry; the broker enforces them.
//!
//! - A login whose user name is a registered device: allowed with its secret, refused without.
//!   Any other user name is not ours (the site's own accounts: the broker's next authenticator
//!   decides). A registry that cannot be read refuses.
//! - A topic or filter that can touch a device's OTA topics: allowed only to that device, on
//!   its own topics (its reports to publish, its command topics to subscribe); refused to
//!   everyone else, wildcards included (`#` would receive every device's commands). Other
//!   topics are not ours (the site's ACL decides).
//!
//! Decisions are cached for [`TTL`] (a revoked secret is refused within it), bounded in size.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::protocol::Protocol;
use crate::server::registry::{DeviceError, Devices};

/// How long a decision is reused.
pub const TTL: Duration = Duration::from_secs(2);
/// Decisions kept at most; the cache starts afresh beyond.
const MAX_CACHED: usize = 100_000;

/// What a login is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// A registered device with its secret.
    Device { id: String, protocol: Protocol },
    /// Refused, with why (for the log, not for the broker).
    Refused(&'static str),
    /// Not a device: the site's own account.
    NotOurs,
}

/// What a publish or subscribe on a topic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(&'static str),
    NotOurs,
}

/// What the client asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
}

#[derive(Debug, Clone)]
enum Cached {
    Login(Login),
    Verdict(Verdict),
}

/// Decisions given, by kind (for `/metrics`).
#[derive(Debug, Default)]
pub struct HookCounters {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub not_ours: AtomicU64,
    pub cache_hits: AtomicU64,
}

/// The decisions (see the module doc).
pub struct Hooks {
    devices: Arc<Devices>,
    prefix: String,
    cache: Mutex<HashMap<[u8; 32], (Instant, Cached)>>,
    pub counters: HookCounters,
}

impl Hooks {
    pub fn new(devices: Arc<Devices>, topic_prefix: &str) -> Hooks {
        Hooks {
            devices,
            prefix: topic_prefix.to_string(),
            cache: Mutex::new(HashMap::new()),
            counters: HookCounters::default(),
        }
    }

    fn key(parts: &[&str]) -> [u8; 32] {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        h.finalize().into()
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Cached> {
        let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (at, v) = c.get(key)?;
        (at.elapsed() < TTL).then(|| {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            v.clone()
        })
    }

    fn remember(&self, key: [u8; 32], v: Cached) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= MAX_CACHED {
            c.clear();
        }
        c.insert(key, (Instant::now(), v));
    }

    fn count_login(&self, l: &Login) {
        let c = match l {
            Login::Device { .. } => &self.counters.allowed,
            Login::Refused(_) => &self.counters.denied,
            Login::NotOurs => &self.counters.not_ours,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn count_verdict(&self, v: Verdict) {
        let c = match v {
            Verdict::Allow => &self.counters.allowed,
            Verdict::Deny(_) => &self.counters.denied,
            Verdict::NotOurs => &self.counters.not_ours,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A client logging in with `username` and `password`.
    pub fn login(&self, username: &str, password: &str) -> Login {
        let key = Self::key(&["login", username, password]);
        let l = match self.cached(&key) {
            Some(Cached::Login(l)) => l,
            _ => {
                let l = self.decide_login(username, password);
                self.remember(key, Cached::Login(l.clone()));
                l
            }
        };
        self.count_login(&l);
        l
    }

    fn decide_login(&self, username: &str, password: &str) -> Login {
        match self.devices.login(username, password) {
            Ok(Some((id, protocol))) => Login::Device { id, protocol },
            Ok(None) => Login::Refused("wrong secret for a registered device"),
            Err(DeviceError::NotFound(_)) => Login::NotOurs,
            Err(_) => Login::Refused("the device registry could not be read"),
        }
    }

    /// `username` publishing on `topic`, or subscribing to the filter `topic`.
    pub fn topic(&self, username: &str, action: Action, topic: &str) -> Verdict {
        let a = match action {
            Action::Publish => "pub",
            Action::Subscribe => "sub",
        };
        let key = Self::key(&["topic", a, username, topic]);
        let v = match self.cached(&key) {
            Some(Cached::Verdict(v)) => v,
            _ => {
                let v = self.decide_topic(username, action, topic);
                self.remember(key, Cached::Verdict(v));
                v
            }
        };
        self.count_verdict(v);
        v
    }

    fn decide_topic(&self, username: &str, action: Action, topic: &str) -> Verdict {
        if !crate::protocol::may_match_ota(&self.prefix, topic) {
            return Verdict::NotOurs;
        }
        const OTHERS: &str = "a device's OTA topics are its own";
        let id = crate::protocol::id_from_username(username);
        if !crate::ids::valid_device_id(&id) {
            return Verdict::Deny(OTHERS);
        }
        let rec = match self.devices.get(&id) {
            Ok(r) => r,
            Err(DeviceError::NotFound(_)) => return Verdict::Deny(OTHERS),
            Err(_) => return Verdict::Deny("the device registry could not be read"),
        };
        let own = crate::protocol::device_topics(rec.protocol, &self.prefix, &rec.id);
        let mine = match action {
            Action::Publish => own.publish.iter().any(|(t, _)| t == topic),
            Action::Subscribe => own.subscribe.iter().any(|f| f == topic),
        };
        if mine {
            Verdict::Allow
        } else {
            Verdict::Deny(OTHERS)
        }
    }

    /// The device's own topics, for an answer that lists them (EMQX's `acl` at login).
    pub fn own_topics(&self, id: &str, protocol: Protocol) -> crate::protocol::DeviceTopics {
        crate::protocol::device_topics(protocol, &self.prefix, id)
    }
}
