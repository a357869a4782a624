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

/// A delta as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeltaDto {
    pub device_type: String,
    pub from_version: String,
    pub to_version: String,
    pub status: &'static str,
    pub format: &'static str,
    pub url: Option<String>,
    pub size: Option<u64>,
    pub md5: Option<String>,
    pub sha256: Option<String>,
    pub full_size: u64,
    pub ratio: Option<f64>,
    pub error: Option<String>,
    pub build_ms: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
}

impl DeltaDto {
    /// `public_url` is the base for `url` (no trailing slash); the URL needs the admin token.
    pub fn from_record(d: &crate::store::DeltaRecord, public_url: &str) -> DeltaDto {
        let ready = d.status == crate::store::DeltaStatus::Ready;
        DeltaDto {
            device_type: d.device_type.clone(),
            from_version: d.from_version.clone(),
            to_version: d.to_version.clone(),
            status: d.status.as_str(),
            format: crate::delta::FORMAT,
            url: ready.then(|| format!("{public_url}{}", crate::deltas::url_path(d))),
            size: d.size,
            md5: d.md5.clone(),
            sha256: d.sha256.clone(),
            full_size: d.full_size,
            ratio: d
                .size
                .map(|s| (s as f64 / d.full_size.max(1) as f64 * 10000.0).round() / 10000.0),
            error: d.error.clone(),
            build_ms: d.build_ms,
            created_at: rfc3339_ms(d.created_at_ms),
            updated_at: rfc3339_ms(d.updated_at_ms),
        }
    }
}
