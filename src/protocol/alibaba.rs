//! The Alibaba-Cloud-IoT-style protocol of the oven client (SPEC 4.2): `inform` (version up),
//! `upgrade` (command down), `progress` (step up), and `firmware/get` with its `get_reply`.

use serde::{Deserialize, Serialize};

/// `/ota/device/upgrade/{pk}/{dn}`
pub fn upgrade_topic(pk: &str, dn: &str) -> String {
    format!("/ota/device/upgrade/{pk}/{dn}")
}

/// `/sys/{pk}/{dn}/thing/ota/firmware/get_reply`
pub fn get_reply_topic(pk: &str, dn: &str) -> String {
    format!("/sys/{pk}/{dn}/thing/ota/firmware/get_reply")
}

/// `data` of an upgrade push and of a get_reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeData {
    pub size: u64,
    pub version: String,
    pub url: String,
    pub md5: String,
    pub sign: String,
    pub sign_method: String,
    pub is_diff: u8,
    /// Our extension when `isDiff` is 1: the full image beside the patch.
    #[serde(flatten, skip_serializing_if = "Option::is_none", default)]
    pub ext: Option<DiffExtension>,
    /// Our extension: the minisign signature (`.minisig` text) of the full image, beside
    /// the md5 `sign` that older devices check.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signature: Option<String>,
    /// `"minisign"` when `signature` is there.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signature_format: Option<String>,
}

/// Extension fields of a diff upgrade: where the full image is and what it hashes to, so the
/// device can verify the patched result and fall back to the full image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DiffExtension {
    /// The version the patch applies to.
    pub from_version: String,
    /// Signed URL of the full image.
    pub full_url: String,
    /// Size of the full image.
    pub full_size: u64,
    /// md5 of the full image.
    pub full_md5: String,
    /// sha256 of the full image.
    pub sha256: String,
}

/// Server -> device `/ota/device/upgrade/...`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Upgrade {
    pub code: String,
    pub data: UpgradeData,
    pub id: u64,
    pub message: String,
}

/// Server -> device `get_reply`: `data` is the upgrade data or `{}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GetReply {
    pub code: u16,
    pub data: serde_json::Value,
    pub id: String,
}

/// `{"id":"123","params":{"version":"1.0.0"}}`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Inform {
    #[serde(default, deserialize_with = "id_as_string")]
    pub id: String,
    pub params: InformParams,
}

/// `params` of inform.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InformParams {
    pub version: String,
    /// Our extension: a device that can apply BSDIFF40 patches says so here.
    #[serde(default)]
    pub delta_formats: Option<Vec<String>>,
}

/// `{"id":"123","params":{"step":"50","desc":"downloading"}}`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Progress {
    #[serde(default, deserialize_with = "id_as_string")]
    pub id: String,
    pub params: ProgressParams,
}

/// `params` of progress; `step` is a string in the document, a number from some devices.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ProgressParams {
    pub step: serde_json::Value,
    #[serde(default)]
    pub desc: Option<String>,
}

/// `{"id":"123","version":"1.0","params":{"module":"default"},"method":"thing.ota.firmware.get"}`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct FirmwareGet {
    #[serde(default, deserialize_with = "id_as_string")]
    pub id: String,
    #[serde(default)]
    pub method: Option<String>,
}

fn id_as_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::String(s) => s.chars().take(64).collect(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => String::new(),
    })
}

/// What a progress step means (SPEC 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// 1..=100
    Progress(u8),
    /// -1 upgrade failed
    UpgradeFailed,
    /// -2 download failed
    DownloadFailed,
    /// -3 verify failed
    VerifyFailed,
    /// -4 flash/file failed
    FlashFailed,
}

impl Step {
    /// The error code stored on the task for a failure step.
    pub fn error_code(self) -> Option<&'static str> {
        match self {
            Step::Progress(_) => None,
            Step::UpgradeFailed => Some("UPGRADE_FAILED"),
            Step::DownloadFailed => Some("DOWNLOAD_FAILED"),
            Step::VerifyFailed => Some("VERIFY_FAILED"),
            Step::FlashFailed => Some("INSTALL_FAILED"),
        }
    }
}

/// Parses an inform; the error says why it is dropped.
pub fn parse_inform(payload: &[u8]) -> Result<Inform, String> {
    let i: Inform = serde_json::from_slice(payload).map_err(|e| format!("bad inform: {e}"))?;
    if !crate::ids::valid_version(&i.params.version) {
        return Err(format!(
            "version {:?} outside the pattern",
            i.params.version
        ));
    }
    Ok(i)
}

/// Parses a progress message into its step; the error says why it is dropped.
pub fn parse_progress(payload: &[u8]) -> Result<(Progress, Step), String> {
    let p: Progress = serde_json::from_slice(payload).map_err(|e| format!("bad progress: {e}"))?;
    let n: i64 = match &p.params.step {
        serde_json::Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("step {s:?} is not a number"))?,
        serde_json::Value::Number(n) => n.as_i64().ok_or("step is not an integer")?,
        other => return Err(format!("step {other} is not a number")),
    };
    let step = match n {
        1..=100 => Step::Progress(n as u8),
        -1 => Step::UpgradeFailed,
        -2 => Step::DownloadFailed,
        -3 => Step::VerifyFailed,
        -4 => Step::FlashFailed,
        other => {
            return Err(format!(
                "step {other} is outside the table (1..100, -1..-4)"
            ));
        }
    };
    Ok((p, step))
}

/// Parses a firmware/get request.
pub fn parse_get(payload: &[u8]) -> Result<FirmwareGet, String> {
    let g: FirmwareGet =
        serde_json::from_slice(payload).map_err(|e| format!("bad firmware/get: {e}"))?;
    if let Some(m) = &g.method
        && m != "thing.ota.firmware.get"
    {
        return Err(format!("unknown method {m:?}"));
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_examples_parse() {
        assert_eq!(
            parse_inform(br#"{"id":"123","params":{"version":"1.0.0"}}"#)
                .unwrap()
                .params
                .version,
            "1.0.0"
        );
        let (p, s) =
            parse_progress(br#"{"id":"123","params":{"step":"50","desc":"downloading"}}"#).unwrap();
        assert_eq!((p.id.as_str(), s), ("123", Step::Progress(50)));
        assert_eq!(
            parse_progress(br#"{"id":1,"params":{"step":-2}}"#)
                .unwrap()
                .1,
            Step::DownloadFailed
        );
        assert_eq!(
            parse_get(br#"{"id":"123","version":"1.0","params":{"module":"default"},"method":"thing.ota.firmware.get"}"#).unwrap().id,
            "123"
        );
    }

    #[test]
    fn bad_messages_are_rejected() {
        assert!(parse_progress(br#"{"id":"1","params":{"step":"0"}}"#).is_err());
        assert!(parse_progress(br#"{"id":"1","params":{"step":"101"}}"#).is_err());
        assert!(parse_progress(br#"{"id":"1","params":{"step":"-5"}}"#).is_err());
        assert!(parse_progress(br#"{"id":"1","params":{"step":"abc"}}"#).is_err());
        assert!(parse_inform(br#"{"id":"1","params":{"version":"a/b"}}"#).is_err());
        assert!(parse_inform(b"[]").is_err());
        assert!(parse_get(br#"{"id":"1","method":"thing.reboot"}"#).is_err());
    }
}
