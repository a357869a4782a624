//! Commands to devices, built from a task with no I/O: the topic and the payload of an
//! upgrade (both protocols, with or without a delta) and of a cancel (the gateway protocol has
//! one; Alibaba-style devices have none and are simply not sent anything).

use crate::protocol::{Protocol, alibaba, gateway};
use crate::server::store::TaskRecord;

/// The upgrade command of a task: its topic and payload. `now_ms` stamps it (the gateway's
/// `timestamp` in seconds, the Alibaba message id); `signature` is the target image's
/// minisign signature, if it has one.
pub fn upgrade(
    prefix: &str,
    t: &TaskRecord,
    signature: Option<String>,
    now_ms: i64,
) -> (String, Vec<u8>) {
    match t.protocol {
        Protocol::Gateway => {
            let c = gateway::Command {
                msg_type: "ota_upgrade".into(),
                msg_id: t.msg_id.clone(),
                uuid: t.device_id.clone(),
                timestamp: secs(now_ms),
                data: gateway::UpgradeData {
                    msg_id: t.msg_id.clone(),
                    version: t.to_version.clone(),
                    firmware_url: t.firmware_url.clone(),
                    md5: t.md5.clone(),
                    file_size: t.file_size,
                    force_upgrade: t.force,
                    sha256: t.sha256.clone(),
                    delta: t.delta.as_ref().map(|d| gateway::DeltaOffer {
                        from_version: d.from_version.clone(),
                        url: d.url.clone(),
                        md5: d.md5.clone(),
                        size: d.size,
                        format: crate::bsdiff::FORMAT.into(),
                    }),
                    signature,
                },
            };
            (
                gateway::command_topic(prefix, &t.device_id),
                serde_json::to_vec(&c).expect("json"),
            )
        }
        Protocol::Alibaba => {
            let (pk, dn) = t.device_id.split_once('/').unwrap_or((&t.device_id, ""));
            let u = alibaba::Upgrade {
                code: "1000".into(),
                data: alibaba_data(t, signature),
                id: now_ms as u64,
                message: "success".into(),
            };
            (
                alibaba::upgrade_topic(pk, dn),
                serde_json::to_vec(&u).expect("json"),
            )
        }
    }
}

/// The `data` of an Alibaba upgrade (also the reply to a device's firmware request).
pub fn alibaba_data(t: &TaskRecord, signature: Option<String>) -> alibaba::UpgradeData {
    let signature_format = signature.as_ref().map(|_| "minisign".to_string());
    match &t.delta {
        // isDiff: the url/size/md5 of the patch (Alibaba's convention); our extension fields
        // carry the full image so the device can verify the result and fall back
        Some(d) => alibaba::UpgradeData {
            size: d.size,
            version: t.to_version.clone(),
            url: d.url.clone(),
            md5: d.md5.clone(),
            sign: d.md5.clone(),
            sign_method: "Md5".into(),
            is_diff: 1,
            ext: Some(alibaba::DiffExtension {
                from_version: d.from_version.clone(),
                full_url: t.firmware_url.clone(),
                full_size: t.file_size,
                full_md5: t.md5.clone(),
                sha256: t.sha256.clone(),
            }),
            signature,
            signature_format,
        },
        None => alibaba::UpgradeData {
            size: t.file_size,
            version: t.to_version.clone(),
            url: t.firmware_url.clone(),
            md5: t.md5.clone(),
            sign: t.md5.clone(),
            sign_method: "Md5".into(),
            is_diff: 0,
            ext: None,
            signature,
            signature_format,
        },
    }
}

/// A gateway command's `timestamp`: seconds since the epoch.
fn secs(now_ms: i64) -> u64 {
    (now_ms / 1000).max(0) as u64
}

/// The cancel command of a task, if its protocol has one; `now_ms` stamps it.
pub fn cancel(
    prefix: &str,
    t: &TaskRecord,
    reason: &str,
    now_ms: i64,
) -> Option<(String, Vec<u8>)> {
    if !has_cancel(t.protocol) {
        return None;
    }
    let c = gateway::Command {
        msg_type: "ota_cancel".into(),
        msg_id: t.msg_id.clone(),
        uuid: t.device_id.clone(),
        timestamp: secs(now_ms),
        data: gateway::CancelData {
            msg_id: t.msg_id.clone(),
            version: t.to_version.clone(),
            reason: reason.into(),
        },
    };
    Some((
        gateway::command_topic(prefix, &t.device_id),
        serde_json::to_vec(&c).expect("json"),
    ))
}

/// Whether a protocol can tell a device to stop an upgrade: the gateway protocol has
/// `ota_cancel`; the Alibaba protocol has no such message.
pub fn has_cancel(p: Protocol) -> bool {
    p == Protocol::Gateway
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn a_gateway_upgrade_carries_msg_id_twice_and_the_delta_only_when_there_is_one() {
        let mut t = crate::server::store::sample_task(7, "GW1");
        let (topic, p) = upgrade("hanqi", &t, None, 1_739_260_800_123);
        assert_eq!(topic, "hanqi/gateway/GW1/command");
        let v = json(&p);
        assert_eq!(v["msgType"], "ota_upgrade");
        assert_eq!(v["msgId"], "ota_7");
        assert_eq!(v["data"]["msgId"], "ota_7");
        assert_eq!(v["uuid"], "GW1");
        assert_eq!(v["timestamp"], 1_739_260_800);
        assert_eq!(v["data"]["version"], "1.0.2");
        assert!(v["data"].get("delta").is_none_or(Value::is_null), "{v}");
        t.delta = Some(crate::server::store::TaskDelta {
            from_version: "1.0.1".into(),
            url: "d".into(),
            md5: "dm".into(),
            size: 9,
        });
        assert!(v["data"].get("signature").is_none(), "{v}");
        let v = json(&upgrade("hanqi", &t, Some("SIG".into()), 0).1);
        assert_eq!(v["data"]["signature"], "SIG");
        assert_eq!(v["data"]["delta"]["fromVersion"], "1.0.1");
        assert_eq!(v["data"]["delta"]["format"], "bsdiff40");
        // the full image's hashes stay those of the target image
        assert_eq!(v["data"]["md5"], "m");
    }

    #[test]
    fn an_alibaba_upgrade_signs_with_md5_and_a_diff_keeps_the_full_image_beside_it() {
        let mut t = crate::server::store::sample_task(7, "pk1/dn1");
        t.protocol = Protocol::Alibaba;
        let (topic, p) = upgrade("hanqi", &t, None, 42);
        assert_eq!(topic, "/ota/device/upgrade/pk1/dn1");
        let v = json(&p);
        assert_eq!(
            (v["code"].as_str(), v["id"].as_u64()),
            (Some("1000"), Some(42))
        );
        assert_eq!(v["data"]["signMethod"], "Md5");
        assert_eq!(v["data"]["isDiff"], 0);
        assert!(v["data"].get("signatureFormat").is_none(), "{v}");
        t.delta = Some(crate::server::store::TaskDelta {
            from_version: "1.0.1".into(),
            url: "d".into(),
            md5: "dm".into(),
            size: 9,
        });
        let v = json(&upgrade("hanqi", &t, Some("SIG".into()), 42).1);
        assert_eq!(v["data"]["isDiff"], 1);
        // the minisign signature rides beside the md5 sign older devices check
        assert_eq!(v["data"]["signature"], "SIG");
        assert_eq!(v["data"]["signatureFormat"], "minisign");
        assert_eq!(v["data"]["signMethod"], "Md5");
        assert_eq!(
            (v["data"]["url"].as_str(), v["data"]["md5"].as_str()),
            (Some("d"), Some("dm"))
        );
        assert_eq!(v["data"]["sign"], "dm");
    }

    #[test]
    fn only_gateways_get_a_cancel() {
        let mut t = crate::server::store::sample_task(7, "GW1");
        let (topic, p) = cancel("hanqi", &t, "cancelled by an operator", 5).unwrap();
        assert_eq!(topic, "hanqi/gateway/GW1/command");
        let v = json(&p);
        assert_eq!(v["msgType"], "ota_cancel");
        assert_eq!(
            (v["msgId"].as_str(), v["data"]["msgId"].as_str()),
            (Some("ota_7"), Some("ota_7"))
        );
        assert_eq!(v["data"]["reason"], "cancelled by an operator");
        t.protocol = Protocol::Alibaba;
        assert!(cancel("hanqi", &t, "x", 5).is_none());
    }
}
