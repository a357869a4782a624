//! The device registry: registration (secrets stored salted and hashed), lookup, live presence
//! (connections, "ready for commands", address), and what devices report about themselves
//! (version, type, patch formats). It is the broker's [`Authenticator`].

use std::collections::HashMap;
use std::sync::RwLock;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids;
use crate::protocol::Protocol;
use crate::server::broker::{Authenticator, Presence};
use crate::server::store::{DEVICE_SCHEMA, DeviceRecord, Durable, Store, StoreError};
use crate::time::now_ms;

/// Why a registry operation failed: the one service error ([`crate::server::error::ServiceError`]).
pub type DeviceError = crate::server::error::ServiceError;

/// A registration request.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: String,
    pub device_type: Option<String>,
    pub protocol: Protocol,
    pub secret: String,
    pub tags: Vec<String>,
}

/// Live state of a device (not stored).
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Open connections.
    pub connections: u32,
    /// Subscribed to its command topic on some connection.
    pub ready: bool,
    /// Address of the newest connection (none when the site's broker carries the devices).
    pub ip: Option<std::net::IpAddr>,
    /// When the newest connection was accepted (ms since the epoch).
    pub connected_ms: i64,
    /// What this process last stored for the device, so a report that changes nothing costs
    /// no read ([`Devices::seen_recently`]).
    pub noted: Option<Box<Noted>>,
    /// When the device last sent anything (ms since the epoch), also a report that was then
    /// dropped; the stored `lastSeen` is refreshed from it at most once a minute.
    pub heard_ms: Option<i64>,
    /// The version the device's progress reports say it runs (`currentVersion`), when that is
    /// not the stored one: kept here while its upgrade runs (no store write per report) and
    /// stored when the upgrade ends ([`Devices::store_reported`], or the target on completion).
    pub reported: Option<String>,
}

impl Live {
    /// The device's `lastSeen`: the later of the stored one and what this process heard.
    pub fn last_seen(&self, stored: Option<i64>) -> Option<i64> {
        stored.max(self.heard_ms)
    }

    /// The version the device runs: what its reports said last, else the stored one.
    pub fn version<'a>(&'a self, stored: Option<&'a str>) -> Option<&'a str> {
        self.reported.as_deref().or(stored)
    }
}

/// The `lastSeen`, `lastIp` and version last stored for a device.
#[derive(Debug, Clone, Default)]
pub struct Noted {
    /// `lastSeen`, ms since the epoch.
    pub at_ms: i64,
    /// `lastIp`.
    pub ip: Option<std::net::IpAddr>,
    /// `firmwareVersion`.
    pub version: Option<String>,
    /// [`Store::generation`] it was stored under: after the store reopened from disk (a full
    /// disk), what was written but never flushed is gone, so an older note is not trusted.
    pub generation: u64,
}

/// How old a stored `lastSeen` may get before a report refreshes it.
const LAST_SEEN_REFRESH_MS: i64 = 60_000;

/// The registry.
pub struct Devices {
    store: Store,
    /// Boxed: a map sized for the fleet holds a pointer per empty slot, not a whole entry.
    live: RwLock<HashMap<Box<str>, Box<Live>>>,
    /// With `[mqtt.external] sync`: account changes go to the store's outbox and this wakes
    /// the worker that hands them to the site's broker.
    accounts: Option<AccountSync>,
    /// The devices' broker is the site's (`mqtt.engine = "external"`): Hangar cannot see a
    /// device subscribe, so a command goes out whenever one is due (at QoS 1, the broker keeps
    /// it in a persistent session) and again when a device shows up after a silence.
    assume_ready: bool,
}

struct AccountSync {
    wake: std::sync::Arc<tokio::sync::Notify>,
    seq: std::sync::atomic::AtomicU64,
}

/// A device's MQTT user name: its id, or `pk&dn` for an Alibaba `pk/dn`.
pub fn login_name(id: &str, protocol: Protocol) -> String {
    match (protocol, id.split_once('/')) {
        (Protocol::Alibaba, Some((pk, dn))) => format!("{pk}&{dn}"),
        _ => id.to_string(),
    }
}

fn hash_secret(secret: &str) -> String {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let salt = hex::encode(salt);
    let h = Sha256::new()
        .chain_update(salt.as_bytes())
        .chain_update(secret.as_bytes())
        .finalize();
    format!("{salt}${}", hex::encode(h))
}

fn secret_matches(stored: &str, secret: &str) -> bool {
    let Some((salt, hash)) = stored.split_once('$') else {
        return false;
    };
    let h = Sha256::new()
        .chain_update(salt.as_bytes())
        .chain_update(secret.as_bytes())
        .finalize();
    hex::encode(h).as_bytes().ct_eq(hash.as_bytes()).into()
}

/// A device secret is 8 to 256 characters.
fn check_secret(secret: &str) -> Result<(), DeviceError> {
    if secret.len() < 8 || secret.len() > 256 {
        return Err(DeviceError::Invalid(
            "secret must be 8 to 256 characters".into(),
        ));
    }
    Ok(())
}

/// Tags are 1-64 printable characters, at most 64 of them.
fn check_tags(tags: &[String]) -> Result<(), DeviceError> {
    if tags.len() > 64 {
        return Err(DeviceError::Invalid("at most 64 tags per device".into()));
    }
    for t in tags {
        if t.is_empty() || t.len() > 64 || t.chars().any(char::is_control) {
            return Err(DeviceError::Invalid(format!(
                "tag {t:?} must be 1-64 printable characters"
            )));
        }
    }
    Ok(())
}

/// A change to a registered device (`PATCH /api/ota/devices/{id}`, `device import --update`).
#[derive(Debug, Clone, Default)]
pub struct DeviceChange {
    /// Replace the tags with these.
    pub tags: Option<Vec<String>>,
    /// Add these tags (after `tags`).
    pub add_tags: Vec<String>,
    /// Remove these tags (after `add_tags`).
    pub remove_tags: Vec<String>,
    /// A new MQTT secret.
    pub secret: Option<String>,
}

impl Devices {
    /// A registry over the store.
    pub fn new(store: Store) -> Devices {
        Devices {
            store,
            live: RwLock::new(HashMap::new()),
            accounts: None,
            assume_ready: false,
        }
    }

    /// A registry whose account changes (registration, new secret, deletion) are queued for
    /// the site's broker in the same flush as the change itself; `wake` is notified after each.
    pub fn syncing_accounts(store: Store, wake: std::sync::Arc<tokio::sync::Notify>) -> Devices {
        Devices {
            accounts: Some(AccountSync {
                wake,
                seq: std::sync::atomic::AtomicU64::new(now_ms().max(0) as u64 * 1000),
            }),
            ..Devices::new(store)
        }
    }

    /// For the site's broker (`mqtt.engine = "external"`): every device counts as listening for
    /// commands.
    pub fn on_external_broker(self) -> Devices {
        Devices {
            assume_ready: true,
            ..self
        }
    }

    /// Queues an account change when accounts are synced (not flushed: the caller's flush
    /// covers it); `secret` `None` deletes the account.
    fn queue_account(
        &self,
        id: &str,
        protocol: Protocol,
        secret: Option<&str>,
    ) -> Result<(), StoreError> {
        let Some(a) = &self.accounts else {
            return Ok(());
        };
        let rec = crate::server::store::BrokerAccountRecord {
            schema: 1,
            seq: a.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            login: login_name(id, protocol),
            protocol,
            secret: secret.map(str::to_string),
        };
        self.store.put_broker_account(id, &rec)?;
        a.wake.notify_one();
        Ok(())
    }

    /// Validates and stores a new device; returns once it is on disk.
    pub async fn register(&self, nd: NewDevice) -> Result<Durable<DeviceRecord>, DeviceError> {
        let rec = self.insert(nd)?;
        Ok(self.store.durable(rec).await?)
    }

    /// Registers many devices (a bulk import) with one flush for all: a result per device, in
    /// order; the outer error is the store failing. With `update`, a device that exists gets
    /// the entry's tags (and secret) instead of being refused — but never another protocol or
    /// device type.
    pub async fn register_all(
        &self,
        list: Vec<Result<NewDevice, DeviceError>>,
        update: bool,
    ) -> Result<Durable<Vec<Result<DeviceRecord, DeviceError>>>, DeviceError> {
        let mut out = Vec::with_capacity(list.len());
        for nd in list {
            let r = nd.and_then(|nd| match self.store.get_device(&nd.id)? {
                Some(old) if update => {
                    let same_type = nd.device_type.as_ref().is_none_or(|t| *t == old.device_type);
                    if old.protocol != nd.protocol || !same_type {
                        return Err(DeviceError::Conflict(format!(
                            "device {} is registered as {} {}: an update changes only tags and secret",
                            nd.id,
                            old.protocol.as_str(),
                            old.device_type
                        )));
                    }
                    self.apply_change(
                        &nd.id,
                        DeviceChange {
                            tags: Some(nd.tags),
                            // an entry without a secret keeps the one registered
                            secret: (!nd.secret.is_empty()).then_some(nd.secret),
                            ..DeviceChange::default()
                        },
                    )
                }
                _ => self.insert(nd),
            });
            match r {
                Err(DeviceError::Store(e)) => return Err(e.into()),
                r => out.push(r),
            }
        }
        Ok(self.store.durable(out).await?)
    }

    /// Changes a registered device's tags or secret; returns once the change is on disk.
    pub async fn change(
        &self,
        id: &str,
        change: DeviceChange,
    ) -> Result<Durable<DeviceRecord>, DeviceError> {
        let rec = self.apply_change(id, change)?;
        Ok(self.store.durable(rec).await?)
    }

    fn apply_change(&self, id: &str, c: DeviceChange) -> Result<DeviceRecord, DeviceError> {
        self.get(id)?;
        if let Some(secret) = &c.secret {
            check_secret(secret)?;
        }
        let secret_hash = c.secret.as_deref().map(hash_secret);
        let mut invalid = None;
        let d = self.store.update_device(id, |d| {
            if let Some(tags) = &c.tags {
                d.tags = tags.clone();
            }
            for t in &c.add_tags {
                if !d.tags.contains(t) {
                    d.tags.push(t.clone());
                }
            }
            d.tags.retain(|t| !c.remove_tags.contains(t));
            if let Err(e) = check_tags(&d.tags) {
                invalid = Some(e);
                return false;
            }
            if let Some(h) = &secret_hash {
                d.secret_hash = h.clone();
            }
            invalid = None;
            true
        })?;
        if let Some(e) = invalid {
            return Err(e);
        }
        let d = d.ok_or_else(|| DeviceError::NotFound(format!("no device {id}")))?;
        if c.secret.is_some() {
            self.queue_account(id, d.protocol, c.secret.as_deref())?;
        }
        Ok(d)
    }

    /// Validates and writes a new device (not flushed).
    fn insert(&self, nd: NewDevice) -> Result<DeviceRecord, DeviceError> {
        if !ids::valid_device_id(&nd.id) {
            return Err(DeviceError::Invalid(format!(
                "id {:?} must match [A-Za-z0-9_.:-]{{1,128}} (Alibaba devices: productKey/deviceName)",
                nd.id
            )));
        }
        let device_type = match (nd.protocol, nd.id.split_once('/')) {
            (Protocol::Gateway, Some(_)) => {
                return Err(DeviceError::Invalid(
                    "a gateway-protocol id cannot contain '/': only Alibaba ids are productKey/deviceName".into(),
                ));
            }
            (Protocol::Gateway, None) => nd.device_type.unwrap_or_else(|| "gateway".into()),
            (Protocol::Alibaba, None) => {
                return Err(DeviceError::Invalid(
                    "an Alibaba-protocol id is productKey/deviceName (URL-encoded in paths)".into(),
                ));
            }
            (Protocol::Alibaba, Some((pk, _))) => match nd.device_type {
                Some(t) if t != pk => {
                    return Err(DeviceError::Invalid(format!(
                        "for the Alibaba protocol the deviceType is the productKey ({pk}), not {t}"
                    )));
                }
                _ => pk.to_string(),
            },
        };
        if !ids::valid_device_type(&device_type) {
            return Err(DeviceError::Invalid(format!(
                "deviceType {device_type:?} must match [A-Za-z0-9_-]{{1,64}}"
            )));
        }
        check_secret(&nd.secret)?;
        check_tags(&nd.tags)?;
        let rec = DeviceRecord {
            schema: DEVICE_SCHEMA,
            id: nd.id.clone(),
            protocol: nd.protocol,
            device_type,
            secret_hash: hash_secret(&nd.secret),
            tags: nd.tags,
            firmware_version: None,
            delta_formats: Vec::new(),
            last_seen_ms: None,
            last_ip: None,
            registered: true,
            created_at_ms: now_ms(),
        };
        match self.store.insert_device(&rec) {
            Ok(()) => {
                self.queue_account(&rec.id, rec.protocol, Some(&nd.secret))?;
                Ok(rec)
            }
            Err(StoreError::Conflict(_)) => Err(DeviceError::Conflict(format!(
                "device {} is already registered",
                nd.id
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// One device.
    pub fn get(&self, id: &str) -> Result<DeviceRecord, DeviceError> {
        if !ids::valid_device_id(id) {
            return Err(DeviceError::Invalid(format!(
                "device id {id:?} is not valid"
            )));
        }
        self.store
            .get_device(id)?
            .ok_or_else(|| DeviceError::NotFound(format!("device {id} is not registered")))
    }

    /// Every device.
    pub fn list(&self) -> Result<Vec<DeviceRecord>, DeviceError> {
        Ok(self.store.list_devices()?)
    }

    /// Removes a device that has no active task; returns once the removal is on disk.
    pub async fn delete(&self, id: &str) -> Result<Durable<DeviceRecord>, DeviceError> {
        self.get(id)?;
        if self.store.active_task(id)?.is_some() {
            return Err(DeviceError::Conflict(format!(
                "device {id} has an active task: cancel it first"
            )));
        }
        if let Some(l) = self.live.write().expect("live lock").get_mut(id) {
            l.noted = None;
        }
        let rec = self
            .store
            .delete_device(id)?
            .ok_or_else(|| DeviceError::NotFound(format!("device {id} is not registered")))?;
        self.queue_account(id, rec.protocol, None)?;
        Ok(self.store.durable(rec).await?)
    }

    /// Live state of a device.
    pub fn live(&self, id: &str) -> Live {
        self.live
            .read()
            .expect("live lock")
            .get(id)
            .map(|l| Live::clone(l))
            .unwrap_or_default()
    }

    /// A progress report says the device runs `version` ([`Live::reported`]): kept in memory
    /// when it is not the stored version; nothing is written.
    pub fn note_running(&self, id: &str, version: &str) {
        let mut live = self.live.write().expect("live lock");
        let Some(l) = live.get_mut(id) else { return };
        let generation = self.store.generation();
        let stored = l
            .noted
            .as_ref()
            .filter(|n| n.generation == generation)
            .and_then(|n| n.version.as_deref());
        if stored == Some(version) {
            l.reported = None;
        } else if l.reported.as_deref() != Some(version) {
            l.reported = Some(version.to_string());
        }
    }

    /// Stores the version the device's reports said it runs, if that is not the stored one
    /// (its upgrade ended other than completed); the caller flushes.
    pub fn store_reported(&self, id: &str) -> Result<(), StoreError> {
        let reported = self
            .live
            .read()
            .expect("live lock")
            .get(id)
            .and_then(|l| l.reported.clone());
        match reported {
            Some(v) => self.note_version(id, &v),
            None => Ok(()),
        }
    }

    /// Notes that the device sent something now (see [`Live::heard_ms`]).
    pub fn heard_from(&self, id: &str) {
        let now = now_ms();
        if let Some(l) = self.live.write().expect("live lock").get_mut(id) {
            l.heard_ms = Some(now);
        }
    }

    /// Whether the device listens for commands now ([`Live::ready`], without copying the rest).
    pub fn ready(&self, id: &str) -> bool {
        self.assume_ready
            || self
                .live
                .read()
                .expect("live lock")
                .get(id)
                .is_some_and(|l| l.ready)
    }

    /// Whether the device has a connection now.
    pub fn is_online(&self, id: &str) -> bool {
        self.live
            .read()
            .expect("live lock")
            .get(id)
            .is_some_and(|l| l.connections > 0)
    }

    /// When the device's newest connection was accepted, if it is connected.
    pub fn connected_ms(&self, id: &str) -> Option<i64> {
        self.live
            .read()
            .expect("live lock")
            .get(id)
            .filter(|l| l.connections > 0)
            .map(|l| l.connected_ms)
    }

    /// Number of devices with at least one connection.
    /// Online devices as (gateway protocol, Alibaba protocol); Alibaba ids are `pk/dn`.
    pub fn online_by_protocol(&self) -> (usize, usize) {
        let live = self.live.read().expect("live lock");
        let mut out = (0, 0);
        for (id, l) in live.iter() {
            if l.connections > 0 {
                if id.contains('/') {
                    out.1 += 1;
                } else {
                    out.0 += 1;
                }
            }
        }
        out
    }

    /// Devices with an open connection.
    pub fn online_count(&self) -> usize {
        self.live
            .read()
            .expect("live lock")
            .values()
            .filter(|l| l.connections > 0)
            .count()
    }

    /// Applies a connection event; returns true if a device just became ready for commands.
    pub fn on_presence(&self, p: &Presence) -> bool {
        let id = match p {
            Presence::Connected { id, .. }
            | Presence::Ready { id, .. }
            | Presence::Disconnected { id } => id.clone(),
        };
        let ready = self.apply_presence(p);
        self.store
            .events()
            .publish_with(|| crate::server::events::Change::Device { id });
        ready
    }

    fn apply_presence(&self, p: &Presence) -> bool {
        let mut live = self.live.write().expect("live lock");
        match p {
            Presence::Connected { id, ip, .. } => {
                let l = live.entry(id.as_str().into()).or_default();
                l.connections += 1;
                if let Ok(ip) = ip.parse() {
                    l.ip = Some(ip);
                }
                l.connected_ms = now_ms();
                false
            }
            Presence::Ready { id, .. } => {
                let l = live.entry(id.as_str().into()).or_default();
                let was = l.ready;
                l.ready = true;
                !was || l.connections > 0
            }
            Presence::Disconnected { id } => {
                if let Some(l) = live.get_mut(id.as_str()) {
                    l.connections = l.connections.saturating_sub(1);
                    if l.connections == 0 {
                        live.remove(id.as_str());
                    }
                }
                false
            }
        }
    }

    /// Records what a device said about itself; creates it if it is unknown and `auto_register`
    /// (anonymous lab mode). Returns the updated record, or `None` for an unknown device. The
    /// record is written only when something but `lastSeen` changes (or the stored `lastSeen` is
    /// over a minute old), so a stream of progress reports costs no device writes.
    pub fn note_report(
        &self,
        id: &str,
        protocol: Protocol,
        version: Option<&str>,
        device_type: Option<&str>,
        delta_formats: Option<&[String]>,
        auto_register: bool,
    ) -> Result<Option<DeviceRecord>, DeviceError> {
        let now = now_ms();
        let ip = self.live(id).ip;
        let note = |rec: &mut DeviceRecord| {
            let before = rec.clone();
            if let Some(v) = version {
                rec.firmware_version = Some(v.to_string());
            }
            if let Some(f) = delta_formats {
                rec.delta_formats = f
                    .iter()
                    .filter(|s| s.len() <= 32)
                    .take(8)
                    .cloned()
                    .collect();
            }
            if let (Some(t), Protocol::Gateway) = (device_type, rec.protocol)
                && !rec.registered
            {
                rec.device_type = t.to_string();
            }
            if let Some(ip) = ip {
                rec.last_ip = Some(ip.to_string());
            }
            let stale = before
                .last_seen_ms
                .is_none_or(|t| now - t > LAST_SEEN_REFRESH_MS);
            if *rec != before || stale {
                rec.last_seen_ms = Some(now);
                return true;
            }
            false
        };
        // a compare-and-swap: a connection noted at the same moment cannot undo this report
        let rec = match self.store.update_device(id, note)? {
            Some(r) => r,
            None if auto_register => {
                let device_type = match protocol {
                    Protocol::Alibaba => id.split('/').next().unwrap_or("gateway").to_string(),
                    Protocol::Gateway => device_type.unwrap_or("gateway").to_string(),
                };
                tracing::warn!(device = %id, protocol = protocol.as_str(), "auto-registered an anonymous device (mqtt.allow_anonymous)");
                let mut rec = DeviceRecord {
                    schema: DEVICE_SCHEMA,
                    id: id.to_string(),
                    protocol,
                    device_type,
                    secret_hash: String::new(),
                    tags: Vec::new(),
                    firmware_version: None,
                    delta_formats: Vec::new(),
                    last_seen_ms: None,
                    last_ip: None,
                    registered: false,
                    created_at_ms: now,
                };
                note(&mut rec);
                match self.store.insert_device(&rec) {
                    Ok(()) => rec,
                    // registered meanwhile: note on what is stored
                    Err(StoreError::Conflict(_)) => match self.store.update_device(id, note)? {
                        Some(r) => r,
                        None => return Ok(None),
                    },
                    Err(e) => return Err(e.into()),
                }
            }
            None => return Ok(None),
        };
        self.remember(&rec);
        if version.is_some() {
            self.forget_reported(id);
        }
        Ok(Some(rec))
    }

    /// Keeps what was stored of `rec` in its live entry ([`Live::noted`]).
    fn remember(&self, rec: &DeviceRecord) {
        let Some(t) = rec.last_seen_ms else { return };
        let mut live = self.live.write().expect("live lock");
        live.entry(rec.id.as_str().into()).or_default().noted = Some(Box::new(Noted {
            at_ms: t,
            ip: rec.last_ip.as_deref().and_then(|ip| ip.parse().ok()),
            version: rec.firmware_version.clone(),
            generation: self.store.generation(),
        }));
    }

    /// Forgets what progress reports said the device runs: a newer word (a heartbeat, an
    /// inform, a completion) was stored.
    fn forget_reported(&self, id: &str) {
        if let Some(l) = self.live.write().expect("live lock").get_mut(id) {
            l.reported = None;
        }
    }

    /// Records that the device runs `version` now (its task to that version completed); the
    /// caller flushes. An unknown device is left alone.
    pub fn note_version(&self, id: &str, version: &str) -> Result<(), StoreError> {
        let stored = self.store.update_device(id, |d| {
            if d.firmware_version.as_deref() == Some(version) {
                return false;
            }
            d.firmware_version = Some(version.to_string());
            true
        })?;
        if let Some(d) = stored {
            self.remember(&d);
        }
        self.forget_reported(id);
        Ok(())
    }

    /// Lab mode (`mqtt.allow_anonymous`): registers a device that connected without
    /// credentials, as soon as it says who it is (its user name or its first command-topic
    /// subscription), so that an upgrade can be asked for before it ever publishes.
    pub fn admit_anonymous(&self, id: &str, protocol: Protocol) -> Result<(), DeviceError> {
        self.note_report(id, protocol, None, None, None, true)
            .map(|_| ())
    }

    /// Records a connection: `lastSeen` and `lastIp` (an unknown device is left alone).
    pub fn note_connected(&self, id: &str, ip: &str) -> Result<(), StoreError> {
        let now = now_ms();
        // a compare-and-swap: a report of this device handled at the same moment (its first
        // heartbeat, sent with the CONNECT) keeps what it wrote
        let stored = self.store.update_device(id, |d| {
            d.last_seen_ms = Some(now);
            d.last_ip = Some(ip.to_string());
            true
        })?;
        if let Some(d) = stored {
            self.remember(&d);
        }
        Ok(())
    }

    /// True when a report that says nothing about the device but, at most, the version it
    /// runs (progress) would change nothing of its record: [`Devices::note_report`] stored it
    /// less than a minute ago, from the address it connects from now, with that version. Then
    /// the report needs no device read or write.
    pub fn seen_recently(&self, id: &str, version: Option<&str>) -> bool {
        let generation = self.store.generation();
        let live = self.live.read().expect("live lock");
        live.get(id).is_some_and(|l| {
            l.noted.as_ref().is_some_and(|n| {
                n.generation == generation
                    && now_ms() - n.at_ms <= LAST_SEEN_REFRESH_MS
                    && (l.ip.is_none() || l.ip == n.ip)
                    && version.is_none_or(|v| n.version.as_deref() == Some(v))
            })
        })
    }
}

impl Devices {
    /// A device's login: `Err(NotFound)` when no device has that login name (it is someone
    /// else's account), `Ok(None)` for a wrong secret (or the wrong login form), the device
    /// otherwise. One registry read.
    pub fn login(
        &self,
        username: &str,
        password: &str,
    ) -> Result<Option<(String, Protocol)>, DeviceError> {
        let id = crate::protocol::id_from_username(username);
        if !ids::valid_device_id(&id) {
            return Err(DeviceError::NotFound(format!(
                "no device logs in as {username:?}"
            )));
        }
        let rec = self
            .store
            .get_device(&id)?
            .ok_or_else(|| DeviceError::NotFound(format!("device {id} is not registered")))?;
        // Alibaba devices log in as pk&dn; gateways by their plain id.
        let form_ok = match rec.protocol {
            Protocol::Alibaba => username.contains('&'),
            Protocol::Gateway => !username.contains('&'),
        };
        Ok(
            (form_ok && !rec.secret_hash.is_empty() && secret_matches(&rec.secret_hash, password))
                .then_some((rec.id, rec.protocol)),
        )
    }
}

impl Authenticator for Devices {
    fn authenticate(&self, username: &str, password: &str) -> Option<(String, Protocol)> {
        self.login(username, password).ok().flatten()
    }

    fn device(&self, name: &str) -> Option<(String, Protocol)> {
        // a certificate's CN: the device id (`pk/dn` for Alibaba) or its login form (`pk&dn`)
        let id = crate::protocol::id_from_username(name);
        if !ids::valid_device_id(&id) {
            return None;
        }
        let rec = self.store.get_device(&id).ok()??;
        Some((rec.id, rec.protocol))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_salted_and_checked() {
        let a = hash_secret("s3cret-pass");
        let b = hash_secret("s3cret-pass");
        assert_ne!(a, b);
        assert!(secret_matches(&a, "s3cret-pass"));
        assert!(!secret_matches(&a, "s3cret-pasS"));
        assert!(!secret_matches("garbage", "x"));
    }

    #[tokio::test]
    async fn registration_rules_and_login() {
        let dir = tempfile::tempdir().unwrap();
        let d = Devices::new(Store::open(dir.path()).unwrap());
        let nd = |id: &str, p, t: Option<&str>| NewDevice {
            id: id.into(),
            device_type: t.map(Into::into),
            protocol: p,
            secret: "password1".into(),
            tags: vec![],
        };
        let _ = d
            .register(nd("GW1", Protocol::Gateway, None))
            .await
            .unwrap();
        assert!(matches!(
            d.register(nd("GW1", Protocol::Gateway, None)).await,
            Err(DeviceError::Conflict(_))
        ));
        assert!(matches!(
            d.register(nd("a/b", Protocol::Gateway, None)).await,
            Err(DeviceError::Invalid(_))
        ));
        assert!(matches!(
            d.register(nd("oven", Protocol::Alibaba, None)).await,
            Err(DeviceError::Invalid(_))
        ));
        assert!(matches!(
            d.register(nd("pk/oven", Protocol::Alibaba, Some("other")))
                .await,
            Err(DeviceError::Invalid(_))
        ));
        let r = d
            .register(nd("pk/oven", Protocol::Alibaba, None))
            .await
            .unwrap();
        assert_eq!(r.device_type, "pk");
        assert_eq!(
            d.authenticate("GW1", "password1"),
            Some(("GW1".into(), Protocol::Gateway))
        );
        assert_eq!(d.authenticate("GW1", "password2"), None);
        assert_eq!(
            d.authenticate("pk&oven", "password1"),
            Some(("pk/oven".into(), Protocol::Alibaba))
        );
        assert_eq!(
            d.authenticate("pk/oven", "password1"),
            None,
            "Alibaba devices log in as pk&dn"
        );
        assert_eq!(d.authenticate("nobody", "password1"), None);
    }

    /// A connection noted while a report of the same device is handled (the presence worker and
    /// the report worker run at once) never undoes the report's version: both are
    /// compare-and-swaps on the stored record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_noted_at_the_same_moment_never_undoes_a_reported_version() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::sync::Arc::new(Devices::new(Store::open(dir.path()).unwrap()));
        let _ = d
            .register(NewDevice {
                id: "GW1".into(),
                device_type: None,
                protocol: Protocol::Gateway,
                secret: "password1".into(),
                tags: vec![],
            })
            .await
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connects = {
            let (d, stop) = (d.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    d.note_connected("GW1", "10.0.0.9").unwrap();
                }
            })
        };
        let mut lost = 0;
        for i in 0..20_000u32 {
            let v = format!("1.0.{i}");
            d.note_report("GW1", Protocol::Gateway, Some(&v), None, None, false)
                .unwrap();
            let stored = d.store.get_device("GW1").unwrap().unwrap();
            let n: u32 = stored
                .firmware_version
                .as_deref()
                .and_then(|s| s.rsplit('.').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if n < i {
                lost += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        connects.join().unwrap();
        assert_eq!(
            lost, 0,
            "reported versions undone by a concurrent connection"
        );
    }
}
