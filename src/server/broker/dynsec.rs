//! mosquitto 2's dynamic-security plugin kept in step with the device registry
//! (`[mqtt.external] sync = "mosquitto-dynsec"`), over Hangar's own connection to the broker:
//! JSON commands published to `$CONTROL/dynamic-security/v1`, replies read on its fixed
//! `/response` topic and matched by `correlationData`.
//!
//! - Every registered device gets a client (its MQTT user name, its secret, textname
//!   [`DEVICE_TEXT`], which marks the accounts Hangar manages) and a role of its own whose
//!   ACLs open exactly its OTA topics (mosquitto 2.0 has no `%c` in dynsec ACLs, so they are
//!   literal). The site's own clients, roles and groups are never touched.
//! - Changes come from the store's outbox (written in the same flush as the registration, the
//!   new secret or the deletion) and leave it only once the broker answered without an error:
//!   a change made while the broker is down is applied when it is back, and a crash loses none.
//!   Mosquitto hashes the secret itself; Hangar keeps it only until then.
//! - A changed secret or a deletion also disables the client once, which ends its connections.
//! - On every connection: Hangar's role (`hangar-service`: its subscriptions and commands) is
//!   made and given to Hangar's own client, then a full resync: managed clients whose device
//!   is gone are deleted; registered devices without a client are counted and named in the log
//!   (Hangar holds only a hash of their secret: setting the secret again creates the account).
//! - Deny on any error: a device whose account could not be made simply cannot connect.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::external::{External, command_filters, report_filters};
use crate::config::ExternalConfig;
use crate::protocol::Protocol;
use crate::server::store::{BrokerAccountRecord, Store};
use crate::time::now_ms;

/// Where the commands go.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where mosquitto answers (QoS 0, not retained).
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// The textname of the clients Hangar manages.
pub const DEVICE_TEXT: &str = "hangar device";
/// Hangar's own role.
pub const SERVICE_ROLE: &str = "hangar-service";
/// What mosquitto 2.0.11 answers to `addClientRole` when the client already has the role
/// (`mosquitto_ctrl dynsec addClientRole` twice says "Internal error").
const ROLE_ALREADY_GIVEN: &[&str] = &["Internal error", "already"];
/// How long the broker has to answer one batch of commands.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);
/// Accounts changed per published batch.
const BATCH: usize = 200;

/// A device's role name.
pub fn device_role(login: &str) -> String {
    format!("hangar-device:{login}")
}

/// What `/healthz`, `/metrics` and the console say about the sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncState {
    /// The last full resync finished (ms since the epoch); 0 = not yet on this connection.
    pub resynced_ms: i64,
    /// The last error, if the last attempt failed.
    pub error: Option<String>,
    /// Registered devices without an account on the broker (their secret must be set again).
    pub missing: usize,
}

/// Counters of the sync (`/metrics`).
#[derive(Debug, Default)]
pub struct SyncCounters {
    /// Account changes the broker confirmed.
    pub applied: AtomicU64,
    /// Attempts the broker refused or did not answer (retried).
    pub failed: AtomicU64,
    /// Managed accounts deleted at a resync because their device is gone.
    pub removed: AtomicU64,
}

/// One reply of the plugin.
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "correlationData")]
    correlation: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct Replies {
    responses: Vec<Reply>,
}

/// The answer to one command: `Err(reason)` if the plugin refused it.
type Answer = Result<Option<Value>, String>;

/// The sync.
pub struct Dynsec {
    client: AsyncClient,
    prefix: String,
    own_username: String,
    share_group: String,
    store: Store,
    /// Notified when the registry queued a change.
    wake: Arc<Notify>,
    /// Notified on every new connection of the link.
    link_up: Notify,
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    next: AtomicU64,
    state: Mutex<SyncState>,
    /// Counters for `/metrics`.
    pub counters: SyncCounters,
}

/// A command and what answers count as done.
struct Cmd {
    body: Value,
    /// An error containing one of these is fine (the state is already as wanted).
    fine: &'static [&'static str],
}

impl Cmd {
    fn new(body: Value) -> Cmd {
        Cmd { body, fine: &[] }
    }
    fn unless(body: Value, fine: &'static [&'static str]) -> Cmd {
        Cmd { body, fine }
    }
}

impl Dynsec {
    pub(super) fn new(
        client: AsyncClient,
        prefix: &str,
        s: &ExternalConfig,
        store: Store,
        wake: Arc<Notify>,
    ) -> Dynsec {
        Dynsec {
            client,
            prefix: prefix.to_string(),
            own_username: s.username.clone(),
            share_group: s.share_group.clone(),
            store,
            wake,
            link_up: Notify::new(),
            waiting: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            state: Mutex::new(SyncState::default()),
            counters: SyncCounters::default(),
        }
    }

    /// The sync's state now.
    pub fn state(&self) -> SyncState {
        self.state.lock().expect("sync state").clone()
    }

    /// Changes not confirmed by the broker yet.
    pub fn queued(&self) -> usize {
        self.store.broker_accounts_count().unwrap_or(0)
    }

    /// The link (re)connected: set up and resync.
    pub(super) fn connected(&self) {
        self.state.lock().expect("sync state").resynced_ms = 0;
        self.link_up.notify_one();
    }

    /// A message on [`RESPONSE_TOPIC`].
    pub(super) fn on_response(&self, payload: &[u8]) {
        let Ok(r) = serde_json::from_slice::<Replies>(payload) else {
            tracing::warn!("an answer of mosquitto's dynamic-security plugin did not parse");
            return;
        };
        let mut waiting = self.waiting.lock().expect("dynsec waiting");
        for reply in r.responses {
            if let Some(tx) = reply.correlation.and_then(|c| waiting.remove(&c)) {
                let _ = tx.send(match reply.error {
                    Some(e) => Err(e),
                    None => Ok(reply.data),
                });
            }
        }
    }

    /// Sends commands in one publish and waits for every answer; an answer per command, in
    /// order (`Err` for a refusal the command does not count as fine).
    async fn send(&self, cmds: Vec<Cmd>) -> Result<Vec<Answer>, String> {
        let mut bodies = Vec::with_capacity(cmds.len());
        let mut answers = Vec::with_capacity(cmds.len());
        {
            let mut waiting = self.waiting.lock().expect("dynsec waiting");
            for c in &cmds {
                let corr = format!("hangar-{}", self.next.fetch_add(1, Ordering::Relaxed));
                let (tx, rx) = oneshot::channel();
                waiting.insert(corr.clone(), tx);
                let mut body = c.body.clone();
                body["correlationData"] = Value::String(corr.clone());
                bodies.push(body);
                answers.push((corr, rx));
            }
        }
        let payload = serde_json::to_vec(&json!({ "commands": bodies })).expect("json");
        let forget = |answers: &[(String, oneshot::Receiver<Answer>)]| {
            let mut waiting = self.waiting.lock().expect("dynsec waiting");
            for (c, _) in answers {
                waiting.remove(c);
            }
        };
        if let Err(e) = self
            .client
            .publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, payload)
            .await
        {
            forget(&answers);
            return Err(format!("publishing to {CONTROL_TOPIC}: {e}"));
        }
        let mut out = Vec::with_capacity(answers.len());
        let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
        for (i, (_, rx)) in answers.iter_mut().enumerate() {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Err(e))) if cmds[i].fine.iter().any(|f| e.contains(f)) => out.push(Ok(None)),
                Ok(Ok(a)) => out.push(a),
                _ => {
                    forget(&answers);
                    return Err(format!(
                        "mosquitto's dynamic-security plugin did not answer within {} s (is it loaded, and may Hangar's account publish to {CONTROL_TOPIC} and subscribe to {RESPONSE_TOPIC}?)",
                        ANSWER_WITHIN.as_secs()
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The ACLs of a device's role: its own OTA topics.
    fn device_acls(&self, id: &str, protocol: Protocol) -> Vec<Value> {
        let t = crate::protocol::device_topics(protocol, &self.prefix, id);
        let mut acls: Vec<Value> = t
            .publish
            .iter()
            .map(|(topic, _)| json!({"acltype": "publishClientSend", "topic": topic, "priority": 0, "allow": true}))
            .collect();
        acls.extend(t.subscribe.iter().map(|topic| {
            json!({"acltype": "subscribeLiteral", "topic": topic, "priority": 0, "allow": true})
        }));
        acls
    }

    /// Hangar's own role: its subscriptions (plain and shared) and its commands.
    fn service_acls(&self) -> Vec<Value> {
        let mut acls = Vec::new();
        for f in report_filters(&self.prefix) {
            acls.push(
                json!({"acltype": "subscribePattern", "topic": f, "priority": 0, "allow": true}),
            );
            if !self.share_group.is_empty() {
                let shared = format!("$share/{}/{f}", self.share_group);
                acls.push(json!({"acltype": "subscribePattern", "topic": shared, "priority": 0, "allow": true}));
            }
        }
        for f in command_filters(&self.prefix) {
            acls.push(
                json!({"acltype": "publishClientSend", "topic": f, "priority": 0, "allow": true}),
            );
        }
        acls
    }

    /// Hangar's role on its own client, its subscription to the answers.
    async fn setup(&self) -> Result<(), String> {
        self.client
            .subscribe(RESPONSE_TOPIC, QoS::AtMostOnce)
            .await
            .map_err(|e| format!("subscribing to {RESPONSE_TOPIC}: {e}"))?;
        let mut cmds = vec![Cmd::unless(
            json!({"command": "createRole", "rolename": SERVICE_ROLE, "textname": "Hangar: devices' reports and commands"}),
            &["already exists"],
        )];
        for acl in self.service_acls() {
            let mut c = acl;
            c["command"] = json!("addRoleACL");
            c["rolename"] = json!(SERVICE_ROLE);
            cmds.push(Cmd::unless(c, &["already exists"]));
        }
        if !self.own_username.is_empty() {
            // given only when missing: a role change makes mosquitto end the client's
            // connections, Hangar's own included
            let has = self
                .send(vec![Cmd::new(
                    json!({"command": "getClient", "username": self.own_username}),
                )])
                .await?
                .pop()
                .and_then(Result::ok)
                .flatten()
                .is_some_and(|d| {
                    d["client"]["roles"]
                        .as_array()
                        .is_some_and(|r| r.iter().any(|r| r["rolename"] == SERVICE_ROLE))
                });
            if !has {
                // mosquitto then ends Hangar's connection, and this batch is sent again on
                // the next one: by then the role is there
                cmds.push(Cmd::unless(
                    json!({"command": "addClientRole", "username": self.own_username, "rolename": SERVICE_ROLE, "priority": 100}),
                    ROLE_ALREADY_GIVEN,
                ));
            }
        }
        let answers = self.send(cmds).await?;
        if let Some(Err(e)) = answers.into_iter().find(|a| a.is_err()) {
            // e.g. Hangar's account lives in a password file, not in dynsec: its rights are the
            // site's to give
            tracing::warn!(error = %e, role = SERVICE_ROLE, "could not set up Hangar's own role on the broker; its account needs the rights to subscribe to the reports and publish the commands");
        }
        Ok(())
    }

    /// Deletes the managed clients whose device is gone; counts the devices without one.
    async fn resync(&self) -> Result<(), String> {
        let answers = self
            .send(vec![Cmd::new(
                json!({"command": "listClients", "verbose": true, "count": -1, "offset": 0}),
            )])
            .await?;
        let data = answers
            .into_iter()
            .next()
            .ok_or("no answer to listClients")??
            .unwrap_or(Value::Null);
        let mut managed = HashSet::new();
        for c in data["clients"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if c["textname"].as_str() == Some(DEVICE_TEXT)
                && let Some(u) = c["username"].as_str()
            {
                managed.insert(u.to_string());
            }
        }
        let devices = self.store.list_devices().map_err(|e| e.to_string())?;
        let queued: HashSet<String> = self
            .store
            .broker_accounts()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, r)| r.login)
            .collect();
        let registered: HashSet<String> = devices
            .iter()
            .map(|d| crate::server::registry::login_name(&d.id, d.protocol))
            .collect();
        let gone: Vec<&String> = managed
            .iter()
            .filter(|l| !registered.contains(*l) && !queued.contains(*l))
            .collect();
        for chunk in gone.chunks(BATCH / 2) {
            let mut cmds = Vec::new();
            for login in chunk {
                cmds.extend(delete_cmds(login));
            }
            self.send(cmds).await?;
            self.counters
                .removed
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let missing: Vec<&String> = registered
            .iter()
            .filter(|l| !managed.contains(*l) && !queued.contains(*l))
            .collect();
        if !missing.is_empty() {
            let some: Vec<&str> = missing.iter().take(10).map(|s| s.as_str()).collect();
            tracing::warn!(count = missing.len(), first = ?some, "registered devices have no account on the broker (Hangar keeps only a hash of their secrets): set each one's secret again to create it");
        }
        let mut s = self.state.lock().expect("sync state");
        s.missing = missing.len();
        s.resynced_ms = now_ms();
        if !gone.is_empty() {
            tracing::info!(
                count = gone.len(),
                "deleted broker accounts of devices no longer registered"
            );
        }
        Ok(())
    }

    /// Hands the queued changes to the broker; each leaves the outbox once confirmed.
    async fn push(&self) -> Result<(), String> {
        let queued = self.store.broker_accounts().map_err(|e| e.to_string())?;
        for chunk in queued.chunks(BATCH) {
            // first round: create, or delete
            let mut cmds = Vec::new();
            let mut spans = Vec::new();
            for (id, r) in chunk {
                let start = cmds.len();
                match &r.secret {
                    Some(secret) => {
                        let role = device_role(&r.login);
                        cmds.push(Cmd::unless(
                            json!({"command": "createRole", "rolename": role, "textname": DEVICE_TEXT, "acls": self.device_acls(id, r.protocol)}),
                            &["already exists"],
                        ));
                        cmds.push(Cmd::new(json!({"command": "createClient", "username": r.login, "password": secret, "textname": DEVICE_TEXT, "roles": [{"rolename": role, "priority": 0}]})));
                    }
                    None => cmds.extend(delete_cmds(&r.login)),
                }
                spans.push(start..cmds.len());
            }
            let answers = self.send(cmds).await?;
            // second round: accounts that existed get the new secret, their role, and are
            // disconnected once (a revoked secret ends its sessions)
            let mut again = Vec::new();
            let mut again_of = Vec::new();
            for ((id, r), span) in chunk.iter().zip(&spans) {
                let results = &answers[span.clone()];
                let exists = r.secret.is_some()
                    && matches!(&results[1], Err(e) if e.contains("already exists"));
                if exists {
                    let role = device_role(&r.login);
                    again.push(Cmd::new(json!({"command": "setClientPassword", "username": r.login, "password": r.secret})));
                    again.push(Cmd::unless(json!({"command": "addClientRole", "username": r.login, "rolename": role, "priority": 0}), ROLE_ALREADY_GIVEN));
                    again.push(Cmd::new(
                        json!({"command": "disableClient", "username": r.login}),
                    ));
                    again.push(Cmd::new(
                        json!({"command": "enableClient", "username": r.login}),
                    ));
                    again_of.push((id, r));
                } else if let Some(Err(e)) = results.iter().find(|a| a.is_err()) {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(device = %id, error = %e, "the broker refused a device account change; retried later");
                } else {
                    self.done(id, r)?;
                }
            }
            if !again.is_empty() {
                let answers = self.send(again).await?;
                for (k, (id, r)) in again_of.into_iter().enumerate() {
                    match answers[k * 4..k * 4 + 4].iter().find(|a| a.is_err()) {
                        Some(Err(e)) => {
                            self.counters.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(device = %id, error = %e, "the broker refused a device account change; retried later");
                        }
                        _ => self.done(id, r)?,
                    }
                }
            }
        }
        Ok(())
    }

    fn done(&self, id: &str, r: &BrokerAccountRecord) -> Result<(), String> {
        self.counters.applied.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(device = %id, deleted = r.secret.is_none(), "device account in step on the broker");
        self.store
            .remove_broker_account(id, r.seq)
            .map_err(|e| e.to_string())
    }

    fn note(&self, r: Result<(), String>) -> bool {
        let mut s = self.state.lock().expect("sync state");
        match r {
            Ok(()) => {
                s.error = None;
                true
            }
            Err(e) => {
                if s.error.as_deref() != Some(e.as_str()) {
                    tracing::error!(error = %e, "keeping the broker's device accounts in step failed; retrying");
                }
                s.error = Some(e);
                false
            }
        }
    }

    /// The worker: on every connection, set up, subscribe to the reports, resync; then the
    /// outbox whenever it changes (and every 30 s).
    pub(super) async fn work(self: Arc<Self>, link: Arc<External>, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.link_up.notified() => {}
        }
        'connection: loop {
            let r = self.setup().await;
            // the reports come in whatever became of Hangar's role
            link.subscribe_reports();
            if self.note(r) {
                loop {
                    if self.state().resynced_ms == 0 {
                        let r = self.resync().await;
                        self.note(r);
                    }
                    let r = self.push().await;
                    self.note(r);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = self.link_up.notified() => continue 'connection,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.link_up.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }
}

/// Deleting a managed account: disabled first (which ends its connections), then deleted with
/// its role.
fn delete_cmds(login: &str) -> Vec<Cmd> {
    vec![
        Cmd::unless(
            json!({"command": "disableClient", "username": login}),
            &["not found"],
        ),
        Cmd::unless(
            json!({"command": "deleteClient", "username": login}),
            &["not found"],
        ),
        Cmd::unless(
            json!({"command": "deleteRole", "rolename": device_role(login)}),
            &["not found"],
        ),
    ]
}
