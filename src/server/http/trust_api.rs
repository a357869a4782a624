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

/// GET /api/reports?since=SEQ — the signed site report as a tar (`report.json` and its
/// `.minisig`). Written to a temporary file record by record (devices, tasks, campaigns and
/// the audit chain are read as they are written, never collected), signed by reading that file
/// back, then streamed: the appliance's memory does not grow with the fleet or the log.
pub async fn report(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let since: u64 = match q.get("since") {
        None => 0,
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("since={v:?} is not a sequence number")))?,
    };
    let last_seq = st.store.audit_bounds()?.map_or(0, |(_, l)| l);
    if since > last_seq {
        return Err(ApiError::bad_request(format!(
            "since={since} is past the last audit entry ({last_seq})"
        )));
    }
    let tmp = st.data_dir.join("tmp");
    let state = st.clone();
    let written = tokio::task::spawn_blocking(move || {
        let written = report::write(&state, &tmp, since, last_seq);
        crate::server::memory::give_back();
        written
    })
    .await
    .map_err(ApiError::internal)??;
    // the file stays readable through its open handle once its name is gone
    let file = tokio::fs::File::open(&written.path)
        .await
        .map_err(ApiError::internal)?;
    let _ = std::fs::remove_file(&written.path);
    let mut head = Vec::with_capacity(512);
    crate::bundle::write_header(&mut head, "report.json", written.len)
        .map_err(ApiError::internal)?;
    let mut tail = Vec::with_capacity(4096);
    crate::bundle::write_padding(&mut tail, written.len).map_err(ApiError::internal)?;
    crate::bundle::write_entry(
        &mut tail,
        "report.json.minisig",
        &mut written.signature.as_bytes(),
        written.signature.len() as u64,
    )
    .map_err(ApiError::internal)?;
    crate::bundle::write_end(&mut tail).map_err(ApiError::internal)?;
    let total = head.len() as u64 + written.len + tail.len() as u64;
    use futures_util::StreamExt;
    let body =
        futures_util::stream::once(
            async move { Ok::<_, std::io::Error>(bytes::Bytes::from(head)) },
        )
        .chain(tokio_util::io::ReaderStream::with_capacity(file, 64 << 10))
        .chain(futures_util::stream::once(async move {
            Ok(bytes::Bytes::from(tail))
        }));
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(header::CONTENT_LENGTH, total)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"hangar-report-{since}-{last_seq}.tar\""),
        )
        .body(axum::body::Body::from_stream(body))
        .map_err(ApiError::internal)?;
    Ok(super::access::with_target(
        resp,
        format!("{since}-{last_seq}"),
    ))
}

/// Writing the report's JSON to a file, one record at a time.
mod report {
    use std::io::{BufWriter, Seek, Write};
    use std::path::{Path, PathBuf};

    use serde::Serialize;

    use super::super::AppState;
    use crate::report::GENESIS;
    use crate::server::accounts::chain_entry;
    use crate::server::error::ServiceError;

    /// A written report: the file, its length and its signature.
    pub struct Written {
        pub path: PathBuf,
        pub len: u64,
        pub signature: String,
    }

    fn io(e: std::io::Error) -> ServiceError {
        ServiceError::Io(e)
    }

    fn json<W: Write>(w: &mut W, v: &impl Serialize) -> Result<(), ServiceError> {
        serde_json::to_writer(&mut *w, v).map_err(|e| io(e.into()))
    }

    /// Writes `[a,b,...]` of what `each` hands to its callback.
    fn array<W: Write>(
        w: &mut W,
        each: impl FnOnce(
            &mut dyn FnMut(&dyn erased::Item) -> Result<(), ServiceError>,
        ) -> Result<(), ServiceError>,
    ) -> Result<(), ServiceError> {
        w.write_all(b"[").map_err(io)?;
        let mut first = true;
        each(&mut |item| {
            if !first {
                w.write_all(b",\n").map_err(io)?;
            }
            first = false;
            item.write(&mut *w)
        })?;
        w.write_all(b"]").map_err(io)
    }

    /// A value that writes itself as JSON (so one callback type serves every section).
    mod erased {
        use super::ServiceError;
        pub trait Item {
            fn write(&self, w: &mut dyn std::io::Write) -> Result<(), ServiceError>;
        }
        impl<T: serde::Serialize> Item for T {
            fn write(&self, w: &mut dyn std::io::Write) -> Result<(), ServiceError> {
                serde_json::to_writer(w, self).map_err(|e| ServiceError::Io(e.into()))
            }
        }
    }

    /// The report of the audit entries after `since` up to `to`, into a new file in `tmp`.
    pub fn write(st: &AppState, tmp: &Path, since: u64, to: u64) -> Result<Written, ServiceError> {
        std::fs::create_dir_all(tmp).map_err(io)?;
        let mut name = [0u8; 8];
        rand::fill(&mut name);
        let path = tmp.join(format!("report-{}.json", hex::encode(name)));
        let file = std::fs::File::create(&path).map_err(io)?;
        let r = fill(st, BufWriter::with_capacity(64 << 10, file), since, to);
        let len = match r {
            Ok(len) => len,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let site = st.signatures.site();
        let signature = std::fs::File::open(&path).map_err(io).and_then(|f| {
            site.sign_reader(
                std::io::BufReader::with_capacity(64 << 10, f),
                &crate::report::comment(&site.public.key_id, since, to),
            )
            .map_err(|e| ServiceError::Corrupt(format!("signing the report: {e}")))
        });
        match signature {
            Ok(signature) => Ok(Written {
                path,
                len,
                signature,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn fill(
        st: &AppState,
        mut w: BufWriter<std::fs::File>,
        since: u64,
        to: u64,
    ) -> Result<u64, ServiceError> {
        let checkpoint = st.store.audit_checkpoint()?;
        let (floor, floor_hash) = checkpoint
            .as_ref()
            .map_or_else(|| (0, GENESIS.to_string()), |c| (c.seq, c.hash.clone()));
        // where the chain stands at `since`, and when entry `since` was written (the tasks
        // changed since then are in the report)
        let (mut at_since, mut since_ms) = (floor_hash.clone(), i64::MIN);
        if since > floor {
            st.store.each_audit_after(floor, |r| {
                if r.seq > since {
                    return Ok::<bool, ServiceError>(false);
                }
                at_since = crate::report::entry_hash(&at_since, &chain_entry(&r));
                if r.seq == since {
                    since_ms = r.at_ms;
                }
                Ok(true)
            })?;
        }
        let previous_hash = match (since, since >= floor) {
            (0, _) => GENESIS.to_string(),
            (_, true) => at_since.clone(),
            // its entry was dropped before any report carried its hash
            (_, false) => String::new(),
        };
        let dropped = (since < floor).then(|| crate::report::Dropped {
            from: since + 1,
            to: floor,
            last_hash: floor_hash.clone(),
        });
        let site = &st.signatures.site().public;
        let mut out = serde_json::json!({
            "format": crate::report::FORMAT,
            "site": {"keyId": site.key_id, "key": site.base64},
            "generatedAt": crate::time::rfc3339_ms(crate::time::now_ms()),
            "since": since,
            "to": to,
            "statistics": super::super::wire::StatisticsDto::from(&st.ota.statistics()?),
        })
        .to_string();
        out.pop(); // the closing brace: the big sections follow
        w.write_all(out.as_bytes()).map_err(io)?;
        w.write_all(b",\n\"devices\":").map_err(io)?;
        array(&mut w, |put| {
            st.store
                .each_device(|d| put(&super::super::devices_api::device_dto(st, &d)))
        })?;
        w.write_all(b",\n\"tasks\":").map_err(io)?;
        array(&mut w, |put| {
            // the archived tasks first: they are older than every task in the store
            st.archive.each(|t| {
                if t.updated_at_ms >= since_ms {
                    put(&super::super::wire::task_dto(&t))?;
                }
                Ok(true)
            })?;
            st.store.each_task(|t| {
                if t.updated_at_ms >= since_ms {
                    put(&super::super::wire::task_dto(&t))?;
                }
                Ok(())
            })
        })?;
        w.write_all(b",\n\"campaigns\":").map_err(io)?;
        array(&mut w, |put| {
            for c in st.campaigns.list()? {
                let m = st.campaigns.members(&c.id)?;
                put(&super::super::campaigns_api::dto(st, &c, &m).map_err(|e| {
                    ServiceError::Corrupt(format!("campaign {}: {}", c.id, e.message()))
                })?)?;
            }
            Ok(())
        })?;
        // the audit chain: its entries are linked as they are written
        w.write_all(b",\n\"audit\":{\"previousHash\":")
            .map_err(io)?;
        json(&mut w, &previous_hash)?;
        w.write_all(b",\"since\":").map_err(io)?;
        json(&mut w, &since)?;
        if let Some(d) = &dropped {
            w.write_all(b",\"dropped\":").map_err(io)?;
            json(&mut w, d)?;
        }
        w.write_all(b",\"entries\":").map_err(io)?;
        let mut prev = match &dropped {
            Some(d) => d.last_hash.clone(),
            None => at_since.clone(),
        };
        array(&mut w, |put| {
            st.store.each_audit_after(since.max(floor), |r| {
                if r.seq > to {
                    return Ok(false);
                }
                let mut e = chain_entry(&r);
                e.prev = std::mem::take(&mut prev);
                e.hash = crate::report::entry_hash(&e.prev, &e);
                prev = e.hash.clone();
                put(&e)?;
                Ok(true)
            })
        })?;
        w.write_all(b",\"lastHash\":").map_err(io)?;
        json(&mut w, &prev)?;
        w.write_all(b"}}\n").map_err(io)?;
        w.flush().map_err(io)?;
        let mut file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        file.stream_position().map_err(io)
    }
}
