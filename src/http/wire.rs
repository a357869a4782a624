//! JSON shapes of the HTTP API (camelCase, as in the source document). Built from store records,
//! never stored themselves.

use serde::Serialize;

use crate::ids;
use crate::store::FirmwareRecord;

/// RFC 3339 UTC with milliseconds, e.g. `2026-02-11T10:00:00.000Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A firmware as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareDto {
    pub version: String,
    pub device_type: String,
    pub file_name: String,
    pub file_url: String,
    pub file_size: u64,
    pub md5: String,
    pub sha256: String,
    pub description: String,
    pub status: &'static str,
    pub force_upgrade: bool,
    pub release_date: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl FirmwareDto {
    /// `public_url` is the base for `fileUrl` (no trailing slash).
    pub fn from_record(r: &FirmwareRecord, public_url: &str) -> FirmwareDto {
        let file_name = ids::firmware_file_name(&r.device_type, &r.version);
        FirmwareDto {
            file_url: format!("{public_url}/firmware/{file_name}"),
            file_name,
            version: r.version.clone(),
            device_type: r.device_type.clone(),
            file_size: r.size,
            md5: r.md5.clone(),
            sha256: r.sha256.clone(),
            description: r.description.clone(),
            status: r.status.as_str(),
            force_upgrade: r.force_upgrade,
            release_date: r.release_date_ms.map(rfc3339_ms),
            created_at: rfc3339_ms(r.created_at_ms),
            updated_at: rfc3339_ms(r.updated_at_ms),
        }
    }
}
