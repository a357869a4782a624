//! The download URLs put in commands, and where they point.
//!
//! Every URL is signed for the appliance (`?token=<expiry>.<hmac>&task=N`, bound to its path and
//! task, so the brake can revoke it). With `[downloads] secure_link_secret` it also carries what
//! nginx's `secure_link` module checks by itself — `md5` = base64url (no padding) of
//! MD5(`"<expires><path> <secret>"`) and `expires` (the token's expiry) — so that nginx caches
//! and mirrors can serve the file without asking the appliance, and the appliance answers such
//! requests cacheably. A device in the group of a `[[downloads.edge]]` gets that edge's base URL
//! while the edge answers its health probe, the appliance's otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use base64::Engine as _;
use md5::{Digest, Md5};
use tokio_util::sync::CancellationToken;

use crate::config::{DownloadsConfig, EdgeMatch};
use crate::server::auth::UrlSigner;

/// How often each edge is probed.
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// An edge's state as last probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeState {
    /// Not probed yet: devices get the appliance's URL meanwhile.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

struct Edge {
    matches: EdgeMatch,
    base_url: String,
    state: AtomicU8,
}

impl Edge {
    fn state(&self) -> EdgeState {
        match self.state.load(Ordering::Relaxed) {
            1 => EdgeState::Up,
            2 => EdgeState::Down,
            _ => EdgeState::Unknown,
        }
    }

    fn serves(&self, device_type: &str, tags: &[String]) -> bool {
        match &self.matches.device_type {
            Some(t) => t == device_type,
            None => self.matches.tags.iter().any(|t| tags.contains(t)),
        }
    }
}

/// An edge as shown to operators.
#[derive(Debug, Clone)]
pub struct EdgeView {
    pub base_url: String,
    pub state: EdgeState,
}

/// The device a URL is for, as far as the choice of an edge goes.
#[derive(Debug, Clone, Copy)]
pub struct Group<'a> {
    pub device_type: &'a str,
    pub tags: &'a [String],
}

/// Mints and checks download URLs.
pub struct Links {
    signer: UrlSigner,
    public_url: String,
    secret: Option<String>,
    edges: Vec<Edge>,
}

/// nginx's `secure_link_md5 "$secure_link_expires$uri <secret>"`, as its `$arg_md5` carries it.
pub fn secure_link_md5(expires: u64, path: &str, secret: &str) -> String {
    let mut h = Md5::new();
    h.update(expires.to_string().as_bytes());
    h.update(path.as_bytes());
    h.update(b" ");
    h.update(secret.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

impl Links {
    pub fn new(signer: UrlSigner, public_url: &str, cfg: &DownloadsConfig) -> Links {
        Links {
            signer,
            public_url: public_url.trim_end_matches('/').to_string(),
            secret: (!cfg.secure_link_secret.is_empty()).then(|| cfg.secure_link_secret.clone()),
            edges: cfg
                .edge
                .iter()
                .map(|e| Edge {
                    matches: e.matches.clone(),
                    base_url: e.base_url.trim_end_matches('/').to_string(),
                    state: AtomicU8::new(EdgeState::Unknown as u8),
                })
                .collect(),
        }
    }

    /// Whether the URL depends on the device's group (an edge is configured).
    pub fn has_edges(&self) -> bool {
        !self.edges.is_empty()
    }

    /// The URL of `path` (e.g. `/firmware/gateway_v1.0.2.bin`) for upgrade task `task`: on the
    /// first edge serving the device's group that is up, else on the appliance. The token
    /// comes first (gateways look for `?token=` right after the path).
    pub fn url(&self, path: &str, task: u64, group: Option<Group<'_>>, now_secs: u64) -> String {
        let token = self.signer.sign_for(path, Some(task), now_secs);
        let base = group
            .and_then(|g| {
                self.edges
                    .iter()
                    .find(|e| e.serves(g.device_type, g.tags) && e.state() == EdgeState::Up)
            })
            .map_or(self.public_url.as_str(), |e| e.base_url.as_str());
        match &self.secret {
            Some(secret) => {
                let expires = self.signer.expiry(now_secs);
                let md5 = secure_link_md5(expires, path, secret);
                format!("{base}{path}?token={token}&task={task}&md5={md5}&expires={expires}")
            }
            None => format!("{base}{path}?token={token}&task={task}"),
        }
    }

    /// True if `md5` and `expires` are a secure link to exactly `path` that has not expired.
    pub fn verify_secure_link(&self, path: &str, md5: &str, expires: &str, now_secs: u64) -> bool {
        let Some(secret) = &self.secret else {
            return false;
        };
        let Ok(exp) = expires.parse::<u64>() else {
            return false;
        };
        if exp < now_secs {
            return false;
        }
        let want = secure_link_md5(exp, path, secret);
        subtle::ConstantTimeEq::ct_eq(want.as_bytes(), md5.as_bytes()).into()
    }

    /// The edges and their state.
    pub fn edges(&self) -> Vec<EdgeView> {
        self.edges
            .iter()
            .map(|e| EdgeView {
                base_url: e.base_url.clone(),
                state: e.state(),
            })
            .collect()
    }

    /// Probes every edge now and then every 10 s until shutdown: `GET <base_url>/healthz`;
    /// any HTTP answer below 500 within 5 s means the edge is up. The probe decides only where
    /// devices are sent (nothing it reads is trusted), so it accepts any certificate.
    pub async fn probe(self: Arc<Self>, shutdown: CancellationToken) {
        if self.edges.is_empty() {
            return;
        }
        let client = match reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .danger_accept_invalid_certs(true)
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "download edges cannot be probed: devices get the appliance's URLs");
                return;
            }
        };
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for e in &self.edges {
                let answer = client.get(format!("{}/healthz", e.base_url)).send().await;
                let (now, why) = match answer {
                    Ok(r) if r.status().as_u16() < 500 => (EdgeState::Up, String::new()),
                    Ok(r) => (EdgeState::Down, format!("it answered {}", r.status())),
                    Err(err) => (EdgeState::Down, err.to_string()),
                };
                let before = e.state();
                e.state.store(now as u8, Ordering::Relaxed);
                match (before, now) {
                    (EdgeState::Up, EdgeState::Up) | (EdgeState::Down, EdgeState::Down) => {}
                    (_, EdgeState::Up) => {
                        tracing::info!(edge = %e.base_url, "download edge is up: its devices download from it")
                    }
                    _ => {
                        tracing::warn!(edge = %e.base_url, reason = %why, "download edge is down: its devices download from the appliance")
                    }
                }
            }
        }
    }

    /// Marks an edge up or down (tests of the choice).
    #[cfg(test)]
    fn set(&self, i: usize, s: EdgeState) {
        self.edges[i].state.store(s as u8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EdgeConfig;

    fn links(secret: &str, edges: Vec<EdgeConfig>) -> (tempfile::TempDir, Links) {
        let dir = tempfile::tempdir().unwrap();
        let signer = UrlSigner::load_or_create(dir.path(), 3600).unwrap();
        let cfg = DownloadsConfig {
            secure_link_secret: secret.into(),
            edge: edges,
        };
        let l = Links::new(signer, "https://hangar:8443", &cfg);
        (dir, l)
    }

    fn query(url: &str, key: &str) -> String {
        let q = url.split_once('?').unwrap().1;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
            .unwrap()
    }

    #[test]
    fn the_md5_is_what_nginx_computes() {
        // echo -n '2147483647/s/link secret' | openssl md5 -binary | base64 | tr +/ -_ | tr -d =
        assert_eq!(
            secure_link_md5(2147483647, "/s/link", "secret"),
            "0Xgm37lo5nFEuHMDKl_vQg"
        );
    }

    #[test]
    fn urls_carry_the_token_first_and_a_secure_link_that_verifies() {
        let (_d, l) = links("0123456789abcdef-site", vec![]);
        let url = l.url("/firmware/gw_v1.bin", 7, None, 1_000);
        assert!(
            url.starts_with("https://hangar:8443/firmware/gw_v1.bin?token="),
            "{url}"
        );
        assert_eq!(query(&url, "task"), "7");
        let (md5, exp) = (query(&url, "md5"), query(&url, "expires"));
        assert_eq!(exp, "4600");
        assert!(l.verify_secure_link("/firmware/gw_v1.bin", &md5, &exp, 1_000));
        // another path, a changed expiry, an expired link, a tampered hash
        assert!(!l.verify_secure_link("/firmware/gw_v2.bin", &md5, &exp, 1_000));
        assert!(!l.verify_secure_link("/firmware/gw_v1.bin", &md5, "4601", 1_000));
        assert!(!l.verify_secure_link("/firmware/gw_v1.bin", &md5, &exp, 4_601));
        let mut bad = md5.clone().into_bytes();
        bad[0] = if bad[0] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert!(!l.verify_secure_link("/firmware/gw_v1.bin", &bad, &exp, 1_000));
        // without a secret: no md5 in the URL, none accepted
        let (_d, plain) = links("", vec![]);
        let url = plain.url("/firmware/gw_v1.bin", 7, None, 1_000);
        assert!(!url.contains("md5="));
        assert!(!plain.verify_secure_link("/firmware/gw_v1.bin", &md5, &exp, 1_000));
    }

    #[test]
    fn a_device_gets_the_first_edge_of_its_group_that_is_up() {
        let edge = |tags: &[&str], ty: Option<&str>, url: &str| EdgeConfig {
            matches: EdgeMatch {
                tags: tags.iter().map(|t| t.to_string()).collect(),
                device_type: ty.map(str::to_string),
            },
            base_url: url.into(),
        };
        let (_d, l) = links(
            "0123456789abcdef-site",
            vec![
                edge(&["hall-2"], None, "https://edge-2:8443"),
                edge(&[], Some("oven"), "http://edge-ovens"),
            ],
        );
        let tags = vec!["line-a".to_string(), "hall-2".to_string()];
        let hall2 = Group {
            device_type: "gateway",
            tags: &tags,
        };
        let oven = Group {
            device_type: "oven",
            tags: &[],
        };
        let at = |g| l.url("/firmware/x_v1.bin", 1, Some(g), 0);
        // not probed yet: the appliance
        assert!(at(hall2).starts_with("https://hangar:8443/"));
        l.set(0, EdgeState::Up);
        l.set(1, EdgeState::Up);
        assert!(at(hall2).starts_with("https://edge-2:8443/firmware/"));
        assert!(at(oven).starts_with("http://edge-ovens/firmware/"));
        assert!(
            l.url("/firmware/x_v1.bin", 1, None, 0)
                .starts_with("https://hangar:8443/")
        );
        // an edge that fails its probe: back to the appliance
        l.set(0, EdgeState::Down);
        assert!(at(hall2).starts_with("https://hangar:8443/"));
        let other = Group {
            device_type: "gateway",
            tags: &[],
        };
        assert!(at(other).starts_with("https://hangar:8443/"));
    }
}
