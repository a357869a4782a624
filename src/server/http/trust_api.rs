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

/// GET /api/reports[?since=SEQ] — the signed site report (a tar of `report.json` and its
/// `.minisig`): inventory, tasks (all, or those changed since audit entry SEQ), campaigns,
/// statistics and the audit log after SEQ as a hash chain.
pub async fn report(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    use crate::report::{AuditChain, ChainEntry, GENESIS, link};
    let since: u64 = match q.get("since") {
        None => 0,
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("since={v:?} is not a sequence number")))?,
    };
    // the whole log, oldest first: the chain is computed from its start
    let (mut all, _) = st.store.list_audit(|_| true, usize::MAX, 0)?;
    all.reverse();
    let last_seq = all.last().map_or(0, |r| r.seq);
    if since > last_seq {
        return Err(ApiError::bad_request(format!(
            "since={since} is past the last audit entry ({last_seq})"
        )));
    }
    let mut entries: Vec<ChainEntry> = all
        .iter()
        .map(|r| ChainEntry {
            seq: r.seq,
            at: super::wire::rfc3339_ms(r.at_ms),
            actor: r.actor.clone(),
            via: r.via.clone(),
            action: r.action.clone(),
            target: r.target.clone(),
            result: r.result.clone(),
            status: r.status,
            prev: String::new(),
            hash: String::new(),
        })
        .collect();
    link(GENESIS.to_string(), &mut entries);
    let from_ms = all
        .iter()
        .find(|r| r.seq == since)
        .map_or(i64::MIN, |r| r.at_ms);
    let (before, after): (Vec<ChainEntry>, Vec<ChainEntry>) =
        entries.into_iter().partition(|e| e.seq <= since);
    let previous_hash = before
        .last()
        .map_or(GENESIS.to_string(), |e| e.hash.clone());
    let last_hash = after
        .last()
        .map_or(previous_hash.clone(), |e| e.hash.clone());
    let chain = AuditChain {
        previous_hash,
        since,
        entries: after,
        last_hash,
    };
    let devices: Vec<_> = st
        .store
        .list_devices()?
        .iter()
        .map(|d| super::devices_api::device_dto(&st, d))
        .collect();
    let (tasks, _) = st
        .store
        .list_tasks(|t| t.updated_at_ms >= from_ms, usize::MAX, 0)?;
    let tasks: Vec<_> = tasks.iter().map(super::wire::task_dto).collect();
    let mut campaigns = Vec::new();
    for c in st.campaigns.list()? {
        let m = st.campaigns.members(&c.id)?;
        campaigns.push(super::campaigns_api::dto(&st, &c, &m)?);
    }
    let stats = st.ota.statistics()?;
    let site = &st.signatures.site().public;
    let body = serde_json::json!({
        "format": crate::report::FORMAT,
        "site": {"keyId": site.key_id, "key": site.base64},
        "generatedAt": super::wire::rfc3339_ms(crate::time::now_ms()),
        "since": since,
        "to": last_seq,
        "devices": devices,
        "tasks": tasks,
        "campaigns": campaigns,
        "statistics": super::wire::StatisticsDto::from(&stats),
        "audit": chain,
    });
    let json = serde_json::to_vec_pretty(&body).map_err(ApiError::internal)?;
    let sig = st
        .signatures
        .site()
        .sign(
            &json,
            &crate::report::comment(&site.key_id, since, last_seq),
        )
        .map_err(ApiError::internal)?;
    let mut tar = Vec::with_capacity(json.len() + 4096);
    for (name, data) in [
        ("report.json", &json[..]),
        ("report.json.minisig", sig.as_bytes()),
    ] {
        crate::bundle::write_entry(&mut tar, name, &mut &data[..], data.len() as u64)
            .map_err(ApiError::internal)?;
    }
    crate::bundle::write_end(&mut tar).map_err(ApiError::internal)?;
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"hangar-report-{since}-{last_seq}.tar\""),
        )
        .body(axum::body::Body::from(tar))
        .map_err(ApiError::internal)?;
    Ok(super::access::with_target(
        resp,
        format!("{since}-{last_seq}"),
    ))
}
