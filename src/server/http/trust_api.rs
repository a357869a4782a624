//! Trust over HTTP: `POST /api/ota/bundles` (an offline bundle as the request body) and
//! `GET /api/site` (the site key and the trusted keys).

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use futures_util::TryStreamExt;
use serde::Serialize;

use super::AppState;
use super::error::{ApiError, ok, ok_with};

/// What an import answers.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ImportedDto {
    id: String,
    signer: String,
    sequence: u64,
    imported: bool,
    firmware: Vec<String>,
    unchanged: Vec<String>,
    deltas: Vec<String>,
    keys: Vec<String>,
    campaigns: Vec<String>,
    warnings: Vec<String>,
}

/// POST /api/ota/bundles[?allowOlder=true] — the bundle tar as the body, streamed.
pub async fn import(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let allow_older = super::firmware_api::flag(&q, "allowOlder")?;
    let max = st.max_bundle_bytes;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max {
            return Err(ApiError::too_large(format!(
                "the bundle is {len} bytes; the limit is {max} (http.max_bundle_bytes)"
            )));
        }
        super::firmware_api::check_room(&st, len)?;
    }
    let mut seen = 0u64;
    let body = req
        .into_body()
        .into_data_stream()
        .map_err(std::io::Error::other);
    let body = body.and_then(move |chunk| {
        seen += chunk.len() as u64;
        let r = if seen > max {
            Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!("the bundle is larger than {max} bytes (http.max_bundle_bytes)"),
            ))
        } else {
            Ok(chunk)
        };
        std::future::ready(r)
    });
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(body));
    let r = st.bundles.import(Box::new(reader), allow_older).await?;
    let status = if r.new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let id = r.id.clone();
    let dto = ImportedDto {
        id: r.id,
        signer: r.signer,
        sequence: r.sequence,
        imported: r.new,
        firmware: r.firmware,
        unchanged: r.unchanged,
        deltas: r.deltas,
        keys: r.keys,
        campaigns: r.campaigns,
        warnings: r.warnings,
    };
    Ok(super::access::with_target(ok_with(status, dto), id))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyDto {
    name: String,
    key_id: String,
    key: String,
    origin: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SiteDto {
    site_key: String,
    site_key_id: String,
    site_public_key_file: String,
    require_signed: bool,
    trusted_keys: Vec<KeyDto>,
}

/// GET /api/site — the appliance's public key (it signs reports) and what it trusts.
pub async fn site(State(st): State<AppState>) -> Result<Response, ApiError> {
    let s = &st.signatures;
    let site = &s.site().public;
    let keys = s
        .keyring()
        .keys()
        .iter()
        .map(|k| KeyDto {
            name: k.name.clone(),
            key_id: k.key_id.clone(),
            key: k.base64.clone(),
            origin: s.origin(&k.name),
        })
        .collect();
    Ok(ok(SiteDto {
        site_key: site.base64.clone(),
        site_key_id: site.key_id.clone(),
        site_public_key_file: site.to_pub_file(),
        require_signed: s.require_signed,
        trusted_keys: keys,
    }))
}
