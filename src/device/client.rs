//! What every device-side program shares: one MQTT link per device (rumqttc, plain or TLS
//! pinned to a CA), the two protocols of SPEC 4 seen from the device (commands parsed, reports
//! and announcements built). The download is [`super::fetch`].

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS, Transport};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::protocol::{Protocol, alibaba, device_topics, gateway};

/// Who a device is on the wire.
#[derive(Debug, Clone)]
pub struct Identity {
    /// API id (`pk/dn` for Alibaba devices).
    pub id: String,
    /// MQTT password.
    pub secret: String,
    /// Which protocol it speaks.
    pub protocol: Protocol,
    /// Its device type (Alibaba: the productKey).
    pub device_type: String,
    /// Gateway-protocol topic prefix.
    pub prefix: String,
    /// Whether it declares BSDIFF40 support.
    pub delta: bool,
}

impl Identity {
    /// MQTT user name: the id, or `{pk}&{dn}` for Alibaba devices (SPEC 5).
    pub fn username(&self) -> String {
        match self.protocol {
            Protocol::Gateway => self.id.clone(),
            Protocol::Alibaba => self.id.replacen('/', "&", 1),
        }
    }

    fn pk_dn(&self) -> (&str, &str) {
        self.id.split_once('/').unwrap_or((&self.id, ""))
    }

    fn publish_topic(&self, which: usize) -> String {
        device_topics(self.protocol, &self.prefix, &self.id).publish[which]
            .0
            .clone()
    }
}

/// A delta the command offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaOffer {
    /// The version the patch applies to.
    pub from_version: String,
    /// Where to fetch it.
    pub url: String,
    /// Its md5.
    pub md5: String,
    /// Its size.
    pub size: u64,
}

/// An upgrade the server asked for, in either protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Target version.
    pub version: String,
    /// Full image URL.
    pub url: String,
    /// Full image size.
    pub size: u64,
    /// Full image md5.
    pub md5: String,
    /// Full image sha256 (gateway protocol; Alibaba only with our extension).
    pub sha256: Option<String>,
    /// Install even if older.
    pub force: bool,
    /// Gateway protocol: the msgId reports must carry.
    pub msg_id: Option<String>,
    /// A patch from the device's version, when offered.
    pub delta: Option<DeltaOffer>,
    /// The full image's minisign signature (`.minisig` text), when the command carries one.
    pub signature: Option<String>,
}

impl Offer {
    /// Checks the full image at `image` against this offer's signature and `keys`:
    /// `Ok(None)` if there was nothing to check (no signature, no keys, not required),
    /// `Ok(Some(signer))` when it verified, `Err(why)` when it must not be installed.
    pub fn check_signature(
        &self,
        keys: &crate::trust::Keyring,
        require: bool,
        device_type: &str,
        image: &std::path::Path,
        sha256: &str,
    ) -> Result<Option<String>, String> {
        let Some(text) = &self.signature else {
            return if require {
                Err("the command carries no signature and this device requires one".into())
            } else {
                Ok(None)
            };
        };
        if keys.is_empty() && !require {
            return Ok(None);
        }
        let sig = crate::trust::Signature::parse(text).map_err(|e| e.to_string())?;
        let key = keys.signer_of(&sig).map_err(|e| e.to_string())?;
        let f = std::fs::File::open(image).map_err(|e| format!("re-reading the image: {e}"))?;
        key.verify_reader(&sig, f).map_err(|e| e.to_string())?;
        crate::trust::check_firmware_comment(
            sig.trusted_comment(),
            device_type,
            &self.version,
            sha256,
        )
        .map_err(|e| e.to_string())?;
        Ok(Some(key.name.clone()))
    }

    /// Why a device running `current` refuses this offer, if it does: an older version, not
    /// forced.
    pub fn refused_by(&self, current: &str) -> Option<String> {
        (!self.force && crate::ids::compare_versions(&self.version, current).is_lt()).then(|| {
            format!(
                "{} is older than the running {current} and not forced",
                self.version
            )
        })
    }
}

/// A command from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Upgrade (push or get_reply with data).
    Upgrade(Box<Offer>),
    /// Stop the running upgrade to this version (`ota_cancel`).
    Cancel {
        /// The version being cancelled.
        version: String,
    },
    /// A get_reply saying nothing newer is released.
    NothingNewer,
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

/// Parses a message the server sent to this device.
pub fn parse_command(ident: &Identity, topic: &str, payload: &[u8]) -> Result<Command, String> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    match ident.protocol {
        Protocol::Gateway => match v["msgType"].as_str() {
            Some("ota_upgrade") => {
                let c: gateway::Command<gateway::UpgradeData> =
                    serde_json::from_value(v).map_err(|e| format!("bad ota_upgrade: {e}"))?;
                let d = c.data;
                Ok(Command::Upgrade(Box::new(Offer {
                    version: d.version,
                    url: d.firmware_url,
                    size: d.file_size,
                    md5: d.md5,
                    sha256: Some(d.sha256),
                    force: d.force_upgrade,
                    msg_id: Some(c.msg_id),
                    delta: d.delta.map(|x| DeltaOffer {
                        from_version: x.from_version,
                        url: x.url,
                        md5: x.md5,
                        size: x.size,
                    }),
                    signature: d.signature,
                })))
            }
            Some("ota_cancel") => Ok(Command::Cancel {
                version: s(&v["data"], "version").unwrap_or_default(),
            }),
            other => Err(format!("unknown msgType {other:?}")),
        },
        Protocol::Alibaba => {
            let (pk, dn) = ident.pk_dn();
            let data = &v["data"];
            if topic == alibaba::get_reply_topic(pk, dn)
                && data.as_object().is_some_and(|o| o.is_empty())
            {
                return Ok(Command::NothingNewer);
            }
            if data.get("cancel").and_then(Value::as_bool) == Some(true) {
                return Ok(Command::Cancel {
                    version: s(data, "version").unwrap_or_default(),
                });
            }
            let version = s(data, "version").ok_or("upgrade without version")?;
            let url = s(data, "url").ok_or("upgrade without url")?;
            let md5 = s(data, "md5").ok_or("upgrade without md5")?;
            let size = data["size"].as_u64().ok_or("upgrade without size")?;
            let is_diff = data["isDiff"].as_u64() == Some(1);
            let signature = s(data, "signature").filter(|_| {
                data["signatureFormat"]
                    .as_str()
                    .is_none_or(|f| f == "minisign")
            });
            // With isDiff the url/size/md5 are the patch's; our extension carries the full
            // image beside them so the device can verify the result and fall back.
            let offer = if is_diff {
                let full_url = s(data, "fullUrl").ok_or("isDiff without fullUrl")?;
                Offer {
                    version,
                    url: full_url,
                    size: data["fullSize"].as_u64().ok_or("isDiff without fullSize")?,
                    md5: s(data, "fullMd5").ok_or("isDiff without fullMd5")?,
                    sha256: s(data, "sha256"),
                    force: data["force"].as_bool().unwrap_or(false),
                    msg_id: None,
                    delta: Some(DeltaOffer {
                        from_version: s(data, "fromVersion").unwrap_or_default(),
                        url,
                        md5,
                        size,
                    }),
                    signature,
                }
            } else {
                Offer {
                    version,
                    url,
                    size,
                    md5,
                    sha256: s(data, "sha256"),
                    force: data["force"].as_bool().unwrap_or(false),
                    msg_id: None,
                    delta: None,
                    signature,
                }
            };
            Ok(Command::Upgrade(Box::new(offer)))
        }
    }
}

/// Stages a device reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Downloading, percent.
    Downloading(u8),
    /// Checking hashes.
    Verifying,
    /// Writing / swapping.
    Installing,
    /// Done (gateway: `completed`; Alibaba: step 100).
    Completed,
}

/// Why an attempt failed, with the codes of SPEC 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Download failed (gateway `DOWNLOAD_FAILED`, Alibaba -2).
    Download,
    /// Hash or size mismatch (`VERIFY_FAILED`, -3).
    Verify,
    /// Install/flash/file failed (`INSTALL_FAILED`, -4).
    Install,
    /// Refused (older version without force) (`VERSION_REFUSED`, -1).
    Refused,
}

impl Failure {
    /// The gateway protocol's errorCode.
    pub fn code(self) -> &'static str {
        match self {
            Failure::Download => "DOWNLOAD_FAILED",
            Failure::Verify => "VERIFY_FAILED",
            Failure::Install => "INSTALL_FAILED",
            Failure::Refused => "VERSION_REFUSED",
        }
    }

    fn step(self) -> i32 {
        match self {
            Failure::Download => -2,
            Failure::Verify => -3,
            Failure::Install => -4,
            Failure::Refused => -1,
        }
    }
}

/// A message to publish: topic and payload.
pub type Outgoing = (String, Vec<u8>);

use crate::time::now_secs;

fn next_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The report of a stage (gateway `ota_progress`, Alibaba `progress`).
pub fn stage_report(ident: &Identity, offer: &Offer, stage: Stage, current: &str) -> Outgoing {
    match ident.protocol {
        Protocol::Gateway => {
            let (state, progress) = match stage {
                Stage::Downloading(p) => ("downloading", p),
                Stage::Verifying => ("verifying", 100),
                Stage::Installing => ("installing", 100),
                Stage::Completed => ("completed", 100),
            };
            gateway_progress(
                ident,
                offer,
                state,
                progress,
                current,
                Value::Null,
                Value::Null,
            )
        }
        Protocol::Alibaba => {
            let (step, desc) = match stage {
                Stage::Downloading(p) => (p.clamp(1, 98) as i32, "downloading"),
                Stage::Verifying => (99, "verifying"),
                Stage::Installing | Stage::Completed => (100, "installing"),
            };
            alibaba_progress(ident, step, desc)
        }
    }
}

/// The report of a failed attempt.
pub fn failure_report(
    ident: &Identity,
    offer: &Offer,
    why: Failure,
    message: &str,
    current: &str,
) -> Outgoing {
    match ident.protocol {
        Protocol::Gateway => gateway_progress(
            ident,
            offer,
            "failed",
            0,
            current,
            json!(why.code()),
            json!(message.chars().take(500).collect::<String>()),
        ),
        Protocol::Alibaba => alibaba_progress(ident, why.step(), message),
    }
}

fn gateway_progress(
    ident: &Identity,
    offer: &Offer,
    state: &str,
    progress: u8,
    current: &str,
    code: Value,
    message: Value,
) -> Outgoing {
    let body = json!({
        "msgType": "ota_progress",
        "msgId": offer.msg_id.clone().unwrap_or_default(),
        "uuid": ident.id,
        "timestamp": now_secs(),
        "data": {"state": state, "progress": progress, "currentVersion": current,
                 "targetVersion": offer.version, "errorCode": code, "errorMessage": message}
    });
    (ident.publish_topic(0), body.to_string().into_bytes())
}

fn alibaba_progress(ident: &Identity, step: i32, desc: &str) -> Outgoing {
    let body = json!({"id": next_id(), "params": {"step": step.to_string(), "desc": desc}});
    (ident.publish_topic(1), body.to_string().into_bytes())
}

/// The announcement of the running version (gateway `heartbeat`, Alibaba `inform`).
pub fn announce(ident: &Identity, version: &str) -> Outgoing {
    let formats: Vec<&str> = if ident.delta {
        vec![crate::bsdiff::FORMAT]
    } else {
        vec![]
    };
    match ident.protocol {
        Protocol::Gateway => {
            let body = json!({"msgType": "heartbeat", "uuid": ident.id, "timestamp": now_secs(),
                "data": {"firmwareVersion": version, "deviceType": ident.device_type,
                         "deltaFormats": formats}});
            (ident.publish_topic(0), body.to_string().into_bytes())
        }
        Protocol::Alibaba => {
            let body =
                json!({"id": next_id(), "params": {"version": version, "deltaFormats": formats}});
            (ident.publish_topic(0), body.to_string().into_bytes())
        }
    }
}

/// Alibaba `thing.ota.firmware.get` (None for the gateway protocol, which has no such request).
pub fn firmware_get(ident: &Identity) -> Option<Outgoing> {
    (ident.protocol == Protocol::Alibaba).then(|| {
        let body = json!({"id": next_id(), "version": "1.0", "params": {"module": "default"},
                          "method": "thing.ota.firmware.get"});
        (ident.publish_topic(2), body.to_string().into_bytes())
    })
}

/// Where the broker is.
#[derive(Clone)]
pub struct MqttTarget {
    /// Host name or IP (also the TLS server name).
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS config for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

pub use crate::net::parse_mqtt_url;

pub use crate::tls::client_config as tls_client_config;

/// What the link tells its device.
#[derive(Debug)]
pub enum LinkEvent {
    /// Connected and subscribed: announce yourself.
    Up,
    /// The connection broke (it reconnects by itself).
    Down(String),
    /// A command arrived.
    Command(Command),
    /// A message could not be understood (logged and dropped).
    Dropped(String),
}

/// One device's MQTT connection: reconnects with backoff, resubscribes, and turns incoming
/// publishes into [`Command`]s.
pub struct Link {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Starts connecting; events arrive on the returned channel.
    pub fn start(
        ident: &Identity,
        target: &MqttTarget,
        client_id: &str,
        keep_alive: Duration,
    ) -> (Link, mpsc::Receiver<LinkEvent>) {
        let mut o = MqttOptions::new(client_id, target.host.clone(), target.port);
        o.set_keep_alive(keep_alive);
        o.set_credentials(ident.username(), ident.secret.clone());
        o.set_max_packet_size(256 * 1024, 256 * 1024);
        o.set_clean_session(true);
        if let Some(tls) = &target.tls {
            o.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, mut ev) = AsyncClient::new(o, 32);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(20);
        ev.set_network_options(net);
        let (tx, rx) = mpsc::channel(64);
        let subs = device_topics(ident.protocol, &ident.prefix, &ident.id).subscribe;
        let ident = ident.clone();
        let sub_client = client.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            let mut awaiting = 0usize;
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = Duration::from_millis(500);
                        awaiting = subs.len();
                        for t in &subs {
                            let _ = sub_client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        awaiting = awaiting.saturating_sub(1);
                        if awaiting == 0 && tx.send(LinkEvent::Up).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let e = match parse_command(&ident, &p.topic, &p.payload) {
                            Ok(c) => LinkEvent::Command(c),
                            Err(why) => LinkEvent::Dropped(why),
                        };
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if tx.send(LinkEvent::Down(e.to_string())).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
        (Link { client, task }, rx)
    }

    /// Publishes at QoS 1 (the server acknowledges after persisting).
    pub async fn send(&self, m: Outgoing) {
        let _ = self.client.publish(m.0, QoS::AtLeastOnce, false, m.1).await;
    }

    /// A cloneable sender for tasks that report on their own.
    pub fn sender(&self) -> Sender {
        Sender(self.client.clone())
    }
}

/// Publishes on a device's link from another task.
#[derive(Clone)]
pub struct Sender(AsyncClient);

impl Sender {
    /// Publishes at QoS 1.
    pub async fn send(&self, m: Outgoing) {
        let _ = self.0.publish(m.0, QoS::AtLeastOnce, false, m.1).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> Identity {
        Identity {
            id: "GW1".into(),
            secret: "s".into(),
            protocol: Protocol::Gateway,
            device_type: "gateway".into(),
            prefix: "hanqi".into(),
            delta: true,
        }
    }

    #[test]
    fn parses_both_protocols_commands() {
        let c = br#"{"msgType":"ota_upgrade","msgId":"m1","uuid":"GW1","timestamp":1,"data":{"version":"1.0.2","firmwareUrl":"https://x/f","md5":"ab","fileSize":10,"forceUpgrade":false,"sha256":"cd","delta":{"fromVersion":"1.0.1","url":"https://x/d","md5":"ef","size":3,"format":"bsdiff40"}}}"#;
        let Command::Upgrade(o) = parse_command(&gw(), "t", c).unwrap() else {
            panic!()
        };
        assert_eq!(o.msg_id.as_deref(), Some("m1"));
        assert_eq!(o.delta.unwrap().from_version, "1.0.1");
        let a = Identity {
            id: "pk/dn".into(),
            protocol: Protocol::Alibaba,
            ..gw()
        };
        assert_eq!(a.username(), "pk&dn");
        let u = br#"{"code":"1000","data":{"size":9,"version":"1.0.7","url":"https://x","md5":"m","sign":"m","signMethod":"Md5","isDiff":0},"id":1,"message":"success"}"#;
        assert!(matches!(
            parse_command(&a, "/ota/device/upgrade/pk/dn", u).unwrap(),
            Command::Upgrade(o) if o.size == 9 && o.delta.is_none()
        ));
        let none = br#"{"code":200,"data":{},"id":"1"}"#;
        assert_eq!(
            parse_command(&a, "/sys/pk/dn/thing/ota/firmware/get_reply", none).unwrap(),
            Command::NothingNewer
        );
        assert!(parse_command(&gw(), "t", b"{").is_err());
        assert!(parse_command(&gw(), "t", br#"{"msgType":"reboot"}"#).is_err());
    }

    #[test]
    fn mqtt_urls() {
        assert_eq!(
            parse_mqtt_url("mqtts://hangar.local").unwrap(),
            (true, "hangar.local".into(), 8883)
        );
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1999").unwrap(),
            (false, "127.0.0.1".into(), 1999)
        );
        assert_eq!(
            parse_mqtt_url("mqtt://[::1]:1").unwrap(),
            (false, "::1".into(), 1)
        );
        assert!(parse_mqtt_url("http://x").is_err());
    }
}
