//! Wire types of the two device protocols (SPEC section 4), as serde structs separate from the
//! stored records, plus the topic grammar of each. Parsing is strict: a message that does not
//! fit is rejected with a reason (the caller logs, counts and drops it).

pub mod alibaba;
pub mod gateway;

/// Which protocol a device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// SPEC 4.1, `{prefix}/gateway/{id}/command|report`.
    Gateway,
    /// SPEC 4.2, `/ota/device/...` and `/sys/...`.
    Alibaba,
}

impl Protocol {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Gateway => "gateway",
            Protocol::Alibaba => "alibaba",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "gateway" => Some(Protocol::Gateway),
            "alibaba" => Some(Protocol::Alibaba),
            _ => None,
        }
    }
}

/// The API device id of an MQTT username: `pk&dn` (Alibaba's convention) -> `pk/dn`.
pub fn id_from_username(username: &str) -> String {
    match username.split_once('&') {
        Some((pk, dn)) => format!("{pk}/{dn}"),
        None => username.to_string(),
    }
}

/// A message a device sent on one of its report topics, classified by topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// `{prefix}/gateway/{id}/report`
    GatewayReport,
    /// `/ota/device/inform/{pk}/{dn}`
    AlibabaInform,
    /// `/ota/device/progress/{pk}/{dn}`
    AlibabaProgress,
    /// `/sys/{pk}/{dn}/thing/ota/firmware/get`
    AlibabaGet,
}

/// Topics of one device.
#[derive(Debug, Clone)]
pub struct DeviceTopics {
    /// Topics the device may subscribe to (exact filters, no wildcards).
    pub subscribe: Vec<String>,
    /// Topics the device may publish on, with what they carry.
    pub publish: Vec<(String, Inbound)>,
}

/// The topics a device with this id may use. For Alibaba ids (`pk/dn`) the productKey and
/// deviceName become two topic levels; ids were validated, so no level contains `/`, `+` or `#`.
pub fn device_topics(protocol: Protocol, prefix: &str, id: &str) -> DeviceTopics {
    match protocol {
        Protocol::Gateway => DeviceTopics {
            subscribe: vec![gateway::command_topic(prefix, id)],
            publish: vec![(gateway::report_topic(prefix, id), Inbound::GatewayReport)],
        },
        Protocol::Alibaba => {
            let (pk, dn) = id.split_once('/').unwrap_or((id, ""));
            DeviceTopics {
                subscribe: vec![
                    alibaba::upgrade_topic(pk, dn),
                    alibaba::get_reply_topic(pk, dn),
                ],
                publish: vec![
                    (
                        format!("/ota/device/inform/{pk}/{dn}"),
                        Inbound::AlibabaInform,
                    ),
                    (
                        format!("/ota/device/progress/{pk}/{dn}"),
                        Inbound::AlibabaProgress,
                    ),
                    (
                        format!("/sys/{pk}/{dn}/thing/ota/firmware/get"),
                        Inbound::AlibabaGet,
                    ),
                ],
            }
        }
    }
}

/// For anonymous (lab) mode: which device a report topic belongs to, and what it carries.
pub fn classify_report_topic(prefix: &str, topic: &str) -> Option<(Protocol, String, Inbound)> {
    let parts: Vec<&str> = topic.split('/').collect();
    match parts.as_slice() {
        [p, "gateway", id, "report"] if *p == prefix && crate::ids::valid_device_id(id) => {
            Some((Protocol::Gateway, id.to_string(), Inbound::GatewayReport))
        }
        ["", "ota", "device", kind, pk, dn] => {
            let id = format!("{pk}/{dn}");
            if !crate::ids::valid_device_id(&id) {
                return None;
            }
            match *kind {
                "inform" => Some((Protocol::Alibaba, id, Inbound::AlibabaInform)),
                "progress" => Some((Protocol::Alibaba, id, Inbound::AlibabaProgress)),
                _ => None,
            }
        }
        ["", "sys", pk, dn, "thing", "ota", "firmware", "get"] => {
            let id = format!("{pk}/{dn}");
            crate::ids::valid_device_id(&id).then_some((Protocol::Alibaba, id, Inbound::AlibabaGet))
        }
        _ => None,
    }
}

/// Whether a topic (or a filter, its wildcards taken literally) lies in the devices' OTA
/// namespace — `{prefix}/gateway/*/command|report`, `/ota/device/...`, `/sys/*/*/thing/ota/...`
/// — which the site's general traffic never enters: only a device's own topics are open to it,
/// with the built-in rules.
pub fn is_ota_topic(prefix: &str, topic: &str) -> bool {
    ota_shapes_match(prefix, topic, false)
}

/// Whether a filter, its `+` and `#` taken as wildcards, can match a topic of the OTA namespace
/// ([`is_ota_topic`]): `#`, `hanqi/#`, `+/gateway/+/report` can; `site/#` cannot.
pub fn may_match_ota(prefix: &str, filter: &str) -> bool {
    ota_shapes_match(prefix, filter, true)
}

/// One level of an OTA topic's shape.
#[derive(Clone, Copy)]
enum Lvl {
    /// `topic_prefix`.
    Prefix,
    Lit(&'static str),
    OneOf(&'static [&'static str]),
    Any,
    /// Any number of further levels, none included.
    Rest,
}

/// The OTA namespace: the gateway protocol's topics and Alibaba's.
const OTA_SHAPES: [&[Lvl]; 3] = {
    use Lvl::*;
    [
        &[Prefix, Lit("gateway"), Any, OneOf(&["command", "report"])],
        &[Lit(""), Lit("ota"), Lit("device"), Rest],
        &[
            Lit(""),
            Lit("sys"),
            Any,
            Any,
            Lit("thing"),
            Lit("ota"),
            Rest,
        ],
    ]
};

fn ota_shapes_match(prefix: &str, topic: &str, wildcards: bool) -> bool {
    fn fits(prefix: &str, levels: &[&str], shape: &[Lvl], wildcards: bool) -> bool {
        match (levels.first(), shape.first()) {
            (Some(&"#"), _) if wildcards => true,
            (_, Some(Lvl::Rest)) => true,
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(l), Some(s)) => {
                let level_ok = (wildcards && *l == "+")
                    || match s {
                        Lvl::Prefix => *l == prefix,
                        Lvl::Lit(x) => l == x,
                        Lvl::OneOf(xs) => xs.contains(l),
                        Lvl::Any | Lvl::Rest => true,
                    };
                level_ok && fits(prefix, &levels[1..], &shape[1..], wildcards)
            }
        }
    }
    let levels: Vec<&str> = topic.split('/').collect();
    OTA_SHAPES
        .iter()
        .any(|shape| fits(prefix, &levels, shape, wildcards))
}

/// For anonymous (lab) mode: the device a command-topic filter belongs to.
pub fn classify_command_filter(prefix: &str, filter: &str) -> Option<(Protocol, String)> {
    let parts: Vec<&str> = filter.split('/').collect();
    match parts.as_slice() {
        [p, "gateway", id, "command"] if *p == prefix && crate::ids::valid_device_id(id) => {
            Some((Protocol::Gateway, id.to_string()))
        }
        ["", "ota", "device", "upgrade", pk, dn]
        | ["", "sys", pk, dn, "thing", "ota", "firmware", "get_reply"] => {
            let id = format!("{pk}/{dn}");
            crate::ids::valid_device_id(&id).then_some((Protocol::Alibaba, id))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_classification_agree() {
        let t = device_topics(Protocol::Gateway, "hanqi", "GW1");
        assert_eq!(t.subscribe, ["hanqi/gateway/GW1/command"]);
        assert_eq!(
            classify_report_topic("hanqi", &t.publish[0].0),
            Some((Protocol::Gateway, "GW1".into(), Inbound::GatewayReport))
        );
        let t = device_topics(Protocol::Alibaba, "hanqi", "pk1/oven-1");
        for (topic, kind) in &t.publish {
            assert_eq!(
                classify_report_topic("hanqi", topic),
                Some((Protocol::Alibaba, "pk1/oven-1".into(), kind.clone()))
            );
        }
        for f in &t.subscribe {
            assert_eq!(
                classify_command_filter("hanqi", f),
                Some((Protocol::Alibaba, "pk1/oven-1".into()))
            );
        }
        assert_eq!(
            classify_report_topic("hanqi", "other/gateway/GW1/report"),
            None
        );
        assert_eq!(
            classify_report_topic("hanqi", "hanqi/gateway/+/report"),
            None
        );
        assert_eq!(classify_command_filter("hanqi", "hanqi/gateway/#"), None);
    }
}

#[cfg(test)]
mod ota_namespace_tests {

    #[test]
    fn filters_that_can_reach_ota_topics() {
        // topics themselves, wildcards literal: the same namespace
        assert!(super::is_ota_topic("hanqi", "hanqi/gateway/GW1/report"));
        assert!(!super::is_ota_topic("hanqi", "hanqi/gateway/+/report/x"));
        assert!(!super::is_ota_topic("hanqi", "#"));
        for f in [
            "#",
            "+/#",
            "hanqi/#",
            "hanqi/gateway/+/report",
            "hanqi/gateway/GW1/command",
            "+/gateway/+/+",
            "/ota/#",
            "/ota/device/upgrade/pk/dn",
            "/+/+/+/+/+",
            "/sys/pk/dn/thing/ota/firmware/get",
            "/sys/+/+/thing/#",
            "/ota/device",
        ] {
            assert!(super::may_match_ota("hanqi", f), "{f}");
        }
        for f in [
            "site/#",
            "site/+/telemetry",
            "hanqi/gateway/GW1/telemetry",
            "hanqi/other/#",
            "other/gateway/GW1/report",
            "$SYS/#",
            "/sys/pk/dn/thing/event/property/post",
            "hanqi/gateway/GW1/report/extra",
            "+",
            "+/+",
        ] {
            assert!(!super::may_match_ota("hanqi", f), "{f}");
        }
    }
}
