//! The gateway protocol of the backend tutorial (SPEC 4.1): `ota_upgrade` commands down,
//! `ota_progress` and `heartbeat` reports up, plus our `ota_cancel` command (campaign brake).

use serde::{Deserialize, Serialize};

/// `{prefix}/gateway/{id}/command`
pub fn command_topic(prefix: &str, id: &str) -> String {
    format!("{prefix}/gateway/{id}/command")
}

/// `{prefix}/gateway/{id}/report`
pub fn report_topic(prefix: &str, id: &str) -> String {
    format!("{prefix}/gateway/{id}/report")
}

/// The `delta` object of a command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeltaOffer {
    pub from_version: String,
    pub url: String,
    pub md5: String,
    pub size: u64,
    pub format: String,
}

/// `data` of an `ota_upgrade` command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeData {
    /// The command's msgId again: the tutorial's own gateway simulator reads it from `data`,
    /// its backend writes it at the top level, and real gateways copy either.
    #[serde(default)]
    pub msg_id: String,
    pub version: String,
    pub firmware_url: String,
    pub md5: String,
    pub file_size: u64,
    pub force_upgrade: bool,
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delta: Option<DeltaOffer>,
    /// The minisign signature (`.minisig` text) of the full image, when it has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signature: Option<String>,
}

/// Server -> device command envelope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Command<T> {
    pub msg_type: String,
    pub msg_id: String,
    pub uuid: String,
    pub timestamp: u64,
    pub data: T,
}

/// `data` of an `ota_cancel` command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CancelData {
    /// The msgId of the cancelled task (as in [`UpgradeData`]).
    #[serde(default)]
    pub msg_id: String,
    pub version: String,
    pub reason: String,
}

/// Report states of `ota_progress`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Downloading,
    Verifying,
    Installing,
    Completed,
    Failed,
}

/// `data` of `ota_progress`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressData {
    pub state: State,
    #[serde(default)]
    pub progress: Option<i64>,
    #[serde(default)]
    pub current_version: Option<String>,
    #[serde(default)]
    pub target_version: Option<String>,
    #[serde(default)]
    pub error_code: Option<serde_json::Value>,
    #[serde(default)]
    pub error_message: Option<String>,
}

/// `data` of `heartbeat`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatData {
    pub firmware_version: String,
    #[serde(default)]
    pub device_type: Option<String>,
    #[serde(default)]
    pub delta_formats: Option<Vec<String>>,
}

/// Any device -> server message on the report topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// `ota_progress`; `msg_id` is None when the report carries none (missing, null or "").
    Progress {
        msg_id: Option<String>,
        data: ProgressData,
    },
    /// `heartbeat`
    Heartbeat(HeartbeatData),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawReport {
    msg_type: String,
    #[serde(default)]
    msg_id: Option<String>,
    data: serde_json::Value,
}

/// Parses a report; the error says why it is dropped.
pub fn parse_report(payload: &[u8]) -> Result<Report, String> {
    let raw: RawReport =
        serde_json::from_slice(payload).map_err(|e| format!("malformed JSON: {e}"))?;
    match raw.msg_type.as_str() {
        "ota_progress" => {
            let msg_id = raw.msg_id.filter(|m| !m.is_empty());
            let data: ProgressData = serde_json::from_value(raw.data)
                .map_err(|e| format!("bad ota_progress data: {e}"))?;
            if let Some(p) = data.progress
                && !(0..=100).contains(&p)
            {
                return Err(format!("progress {p} outside 0..100"));
            }
            for v in [&data.current_version, &data.target_version]
                .into_iter()
                .flatten()
            {
                if !crate::ids::valid_version(v) {
                    return Err(format!("version {v:?} outside the pattern"));
                }
            }
            Ok(Report::Progress { msg_id, data })
        }
        "heartbeat" => {
            let data: HeartbeatData =
                serde_json::from_value(raw.data).map_err(|e| format!("bad heartbeat data: {e}"))?;
            if !crate::ids::valid_version(&data.firmware_version) {
                return Err(format!(
                    "firmwareVersion {:?} outside the pattern",
                    data.firmware_version
                ));
            }
            if let Some(t) = &data.device_type
                && !crate::ids::valid_device_type(t)
            {
                return Err(format!("deviceType {t:?} outside the pattern"));
            }
            Ok(Report::Heartbeat(data))
        }
        other => Err(format!("unknown msgType {other:?}")),
    }
}

/// A device-supplied error code as text (devices send strings or numbers).
pub fn error_code_text(v: &Option<serde_json::Value>) -> Option<String> {
    match v {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.chars().take(64).collect()),
        Some(other) => Some(other.to_string().chars().take(64).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documents_examples() {
        let p = br#"{"msgType":"ota_progress","msgId":"ota_1739260800000_k3j9x2","uuid":"HQ2026ABC123","timestamp":1739260860,
 "data":{"state":"downloading","progress":45,"currentVersion":"1.0.1","targetVersion":"1.0.2","errorCode":null,"errorMessage":null}}"#;
        match parse_report(p).unwrap() {
            Report::Progress { msg_id, data } => {
                assert_eq!(msg_id.as_deref(), Some("ota_1739260800000_k3j9x2"));
                assert_eq!(data.state, State::Downloading);
                assert_eq!(data.progress, Some(45));
            }
            other => panic!("{other:?}"),
        }
        let h = br#"{"msgType":"heartbeat","uuid":"HQ2026ABC123","timestamp":1739260900,"data":{"firmwareVersion":"1.0.2","deviceType":"gateway","deltaFormats":["bsdiff40"]}}"#;
        assert!(
            matches!(parse_report(h).unwrap(), Report::Heartbeat(d) if d.firmware_version == "1.0.2")
        );
    }

    #[test]
    fn a_report_without_msg_id_is_a_report_without_one() {
        // the tutorial's simulator before the command carried msgId in data: the key is absent
        for p in [
            &br#"{"msgType":"ota_progress","data":{"state":"downloading","progress":10}}"#[..],
            br#"{"msgType":"ota_progress","msgId":null,"data":{"state":"downloading"}}"#,
            br#"{"msgType":"ota_progress","msgId":"","data":{"state":"downloading"}}"#,
        ] {
            assert!(matches!(
                parse_report(p).unwrap(),
                Report::Progress { msg_id: None, .. }
            ));
        }
    }

    #[test]
    fn rejects_bad_reports() {
        for bad in [
            &b"not json"[..],
            br#"{"msgType":"reboot","data":{}}"#,
            br#"{"msgType":"ota_progress","msgId":"x","data":{"state":"downloading","progress":101}}"#,
            br#"{"msgType":"ota_progress","msgId":"x","data":{"state":"downloading","progress":-1}}"#,
            br#"{"msgType":"ota_progress","msgId":"x","data":{"state":"flying"}}"#,
            br#"{"msgType":"ota_progress","msgId":"x","data":{"state":"downloading","progress":"45"}}"#,
            br#"{"msgType":"heartbeat","data":{"firmwareVersion":"../1"}}"#,
            br#"{"msgType":"heartbeat","data":{}}"#,
        ] {
            assert!(parse_report(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
