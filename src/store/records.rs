//! Stored record types. They carry a schema version and are never sent on the wire as they are:
//! `http` maps them to its own JSON types.

use serde::{Deserialize, Serialize};

/// Current schema version of [`FirmwareRecord`].
pub const FIRMWARE_SCHEMA: u32 = 1;

/// Lifecycle of a firmware image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareStatus {
    /// Uploaded, not offered to devices.
    Draft,
    /// Being tried on test devices.
    Testing,
    /// Offered to devices; the newest released version is "latest".
    Released,
    /// No longer offered.
    Deprecated,
}

impl FirmwareStatus {
    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "draft" => Some(Self::Draft),
            "testing" => Some(Self::Testing),
            "released" => Some(Self::Released),
            "deprecated" => Some(Self::Deprecated),
            _ => None,
        }
    }

    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Testing => "testing",
            Self::Released => "released",
            Self::Deprecated => "deprecated",
        }
    }
}

/// One firmware image as stored. The image itself is a blob named by `sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareRecord {
    /// Schema version of this record.
    pub schema: u32,
    /// `[A-Za-z0-9_-]{1,64}`
    pub device_type: String,
    /// `[0-9A-Za-z.+-]{1,64}`
    pub version: String,
    /// Hex sha256 of the image; also the blob's name.
    pub sha256: String,
    /// Hex md5 of the image.
    pub md5: String,
    /// Size in bytes.
    pub size: u64,
    /// Free text from the uploader.
    pub description: String,
    /// Lifecycle state.
    pub status: FirmwareStatus,
    /// Devices must install it even when they would defer.
    pub force_upgrade: bool,
    /// Milliseconds since the epoch of the first release.
    pub release_date_ms: Option<i64>,
    /// Milliseconds since the epoch of the upload.
    pub created_at_ms: i64,
    /// Milliseconds since the epoch of the last change.
    pub updated_at_ms: i64,
}
