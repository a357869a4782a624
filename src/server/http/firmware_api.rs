//! Handlers of the admin API (`/api/ota/...`), `/healthz` and `/firmware/{fileName}`. They parse
//! and validate input, call the domain services, and wrap results in the JSON envelope.

use std::collections::HashMap;

use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{Multipart, Query, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use serde::Deserialize;

use super::AppState;
use super::error::{ApiError, ok, ok_with};
use super::refusal::{ApiPath, JsonBody};
use super::wire::FirmwareDto;
use crate::ids;
use crate::server::firmware::{self, NewFirmware};
use crate::server::store::FirmwareStatus;

pub(super) type Q = Query<HashMap<String, String>>;

/// Upper bound of a text field of the upload form.
const MAX_TEXT_FIELD: usize = 16 * 1024;
/// Room for the multipart framing and text fields around the file.
const MULTIPART_OVERHEAD: u64 = 1024 * 1024;

pub(super) fn device_type_param(q: &HashMap<String, String>) -> Result<String, ApiError> {
    let t = q.get("deviceType").map(String::as_str).unwrap_or("gateway");
    if !ids::valid_device_type(t) {
        return Err(ApiError::bad_request(format!(
            "deviceType {t:?} must match [A-Za-z0-9_-]{{1,64}}"
        )));
    }
    Ok(t.to_string())
}

/// `limit` (default 1000, 1..=10000) and `offset` (default 0) of list endpoints.
pub(super) fn paging(q: &HashMap<String, String>) -> Result<(usize, usize), ApiError> {
    let num = |key: &str, default: usize, min: usize, max: usize| -> Result<usize, ApiError> {
        match q.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(format!("{key} must be a number from {min} to {max}"))
                }),
        }
    };
    Ok((
        num("limit", 1000, 1, 10_000)?,
        num("offset", 0, 0, usize::MAX)?,
    ))
}

/// A boolean query parameter (`true`/`false`, `1`/`0`; absent = false).
pub(super) fn flag(q: &HashMap<String, String>, key: &str) -> Result<bool, ApiError> {
    match q.get(key).map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(v) => Err(ApiError::bad_request(format!(
            "{key}={v:?} must be true or false"
        ))),
    }
}

pub(super) fn dto(st: &AppState, r: &crate::server::store::FirmwareRecord) -> FirmwareDto {
    let (status, why) = st.signatures.status_of(r);
    FirmwareDto::from_record(r, &st.public_url, status, why)
}

/// GET /healthz — 200 while the appliance serves; `state` is `ok`, or `degraded` with the
/// reasons while writes cannot succeed (a full disk) or uploads are refused for lack of room.
/// Downloads and reads keep working in both.
pub async fn healthz(State(st): State<AppState>) -> Response {
    let free = st.store.free_bytes();
    let mut reasons = Vec::new();
    let degraded = st.store.health();
    if let Some(d) = &degraded {
        reasons.push(format!(
            "store: {} (since {})",
            d.reason,
            chrono::DateTime::from_timestamp_millis(d.since_ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default()
        ));
    } else if let Err(e) = st.store.size_on_disk() {
        reasons.push(format!("store: {e}"));
    }
    if let Some(f) = free
        && f < st.min_free_bytes
    {
        reasons.push(format!(
            "low disk space: {f} bytes free, below store.min_free_bytes ({}): uploads are refused",
            st.min_free_bytes
        ));
    }
    let broker = st.external.as_ref().map(|x| {
        let link = x.state();
        if !link.connected {
            reasons.push(format!(
                "site broker {}: {}",
                x.url(),
                link.error.as_deref().unwrap_or("not connected")
            ));
        }
        let sync = x.dynsec.as_ref().map(|d| {
            let s = d.state();
            if let Some(e) = &s.error {
                reasons.push(format!("device accounts on the site broker: {e}"));
            }
            serde_json::json!({
                "kind": "mosquitto-dynsec",
                "queued": d.queued(),
                "missing": s.missing,
                "error": s.error,
            })
        });
        serde_json::json!({
            "engine": "external",
            "url": x.url(),
            "connected": link.connected,
            "error": link.error,
            "since": crate::time::rfc3339_ms(link.since_ms),
            "accountSync": sync,
        })
    });
    let state = if reasons.is_empty() { "ok" } else { "degraded" };
    ok(serde_json::json!({
        "state": state,
        "store": if degraded.is_some() { "degraded" } else { "ok" },
        "broker": broker.unwrap_or_else(|| serde_json::json!({"engine": "direct"})),
        "reasons": reasons,
        "freeBytes": free,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// Reads a small text field with a size cap.
async fn text_field(mut field: Field<'_>, name: &str) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_err)? {
        if buf.len() + chunk.len() > MAX_TEXT_FIELD {
            return Err(ApiError::bad_request(format!(
                "form field {name} is longer than {MAX_TEXT_FIELD} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf)
        .map_err(|_| ApiError::bad_request(format!("form field {name} is not UTF-8")))
}

fn multipart_err(e: axum::extract::multipart::MultipartError) -> ApiError {
    // the innermost cause says what was wrong (e.g. the part-header bound of `partguard`)
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let why = cause.to_string();
    if why.contains("a part's headers are longer") {
        return ApiError::bad_request(why);
    }
    ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "{name} must be true or false"
        ))),
    }
}

/// Free text stored and later printed (descriptions): no control characters but tab and
/// line feed, so nothing a client sends can move a terminal's cursor or colour a listing.
pub(super) fn check_free_text(name: &str, v: &str) -> Result<(), ApiError> {
    match v
        .chars()
        .find(|c| c.is_control() && *c != '\t' && *c != '\n')
    {
        Some(c) => Err(ApiError::bad_request(format!(
            "{name} contains the control character U+{:04X}: send printable text",
            c as u32
        ))),
        None => Ok(()),
    }
}

/// Refuses an upload that would leave less than `[store] min_free_bytes` free.
pub(super) fn check_room(st: &AppState, coming: u64) -> Result<(), ApiError> {
    let Some(free) = st.store.free_bytes() else {
        return Ok(());
    };
    if free < st.min_free_bytes.saturating_add(coming) {
        return Err(ApiError::disk_full(
            free,
            &format!(
                "the upload was refused: it would leave less than {} bytes free (store.min_free_bytes)",
                st.min_free_bytes
            ),
        ));
    }
    Ok(())
}

/// An error writing to the data disk: a full disk is a 507 saying `refused`, anything else a
/// 500 logged with `what`.
fn write_failed(st: &AppState, e: std::io::Error, what: &str, refused: &str) -> ApiError {
    if crate::server::store::is_disk_full(&e) {
        ApiError::disk_full(st.store.free_bytes().unwrap_or(0), refused)
    } else {
        ApiError::internal(format!("{what}: {e}"))
    }
}

const UPLOAD_NOT_STORED: &str = "the upload was not stored";

/// How often (bytes written) a streaming upload looks at the free space again.
const ROOM_CHECK_EVERY: u64 = 16 << 20;

/// POST /api/ota/firmware/upload — multipart `file`, `version`, `deviceType`, `description`,
/// `forceUpgrade`. The file streams to disk through the blob writer; nothing is visible until
/// the blob is fsynced and the record flushed. Fields are taken as sent (no trimming), each at
/// most once; part headers are bounded ([`super::partguard`]).
pub async fn upload(
    State(st): State<AppState>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let max = st.max_upload_bytes;
    let mut mp = upload_form(&st, req).await?;
    let mut form = UploadForm::default();
    while let Some(field) = mp.next_field().await.map_err(multipart_err)? {
        form.take(&st, field, max).await?;
    }
    let staged = form.staged.ok_or_else(|| {
        ApiError::bad_request("the form has no `file` part: send the image as file=@image.bin")
    })?;
    let version = form
        .version
        .ok_or_else(|| ApiError::bad_request("the form has no `version` field"))?;
    let device_type = form.device_type.unwrap_or_else(|| "gateway".to_string());
    firmware::validate_key(&device_type, &version)?;
    let (signature, staged) =
        judge_signature(&st, form.signature, staged, &device_type, &version).await?;
    let rec = st
        .firmware
        .create(
            NewFirmware {
                device_type,
                version,
                description: form.description.unwrap_or_default(),
                force_upgrade: form.force_upgrade.unwrap_or(false),
                signature,
            },
            staged,
        )
        .await?
        .into_inner();
    tracing::info!(device_type = %rec.device_type, version = %rec.version, size = rec.size, sha256 = %rec.sha256, "firmware uploaded");
    Ok(super::access::with_target(
        ok_with(StatusCode::CREATED, dto(&st, &rec)),
        format!("{}/{}", rec.device_type, rec.version),
    ))
}

/// The upload's multipart reader: a body announced larger than the limit (or than the room
/// left on the disk) is refused first; the part headers are bounded ([`super::partguard`]) and
/// the body ends one poll late (multer's incomplete-stream bug).
async fn upload_form(st: &AppState, req: axum::extract::Request) -> Result<Multipart, ApiError> {
    use axum::extract::FromRequest;
    use futures_util::StreamExt;
    let max = st.max_upload_bytes;
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = length
        && len > max.saturating_add(MULTIPART_OVERHEAD)
    {
        // (the body is read and discarded, within a budget, by `refusal::drain_refused`)
        return Err(ApiError::too_large(format!(
            "the upload is {len} bytes; the limit is {max} (http.max_upload_bytes)"
        )));
    }
    check_room(st, length.unwrap_or(0))?;
    let boundary = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(multer_boundary);
    let req = match boundary {
        Some(b) => {
            let (parts, body) = req.into_parts();
            let mut guard = super::partguard::PartGuard::new(&b);
            let body = body.into_data_stream().map(move |chunk| {
                let chunk = chunk?;
                guard.feed(&chunk).map_err(axum::Error::new)?;
                Ok::<_, axum::Error>(chunk)
            });
            let body = super::partguard::end_one_poll_late(body);
            axum::extract::Request::from_parts(parts, axum::body::Body::from_stream(body))
        }
        None => req,
    };
    Multipart::from_request(req, &())
        .await
        .map_err(|e: MultipartRejection| {
            ApiError::bad_request(format!(
                "expected a multipart/form-data body with a `file` part: {}",
                e.body_text()
            ))
        })
}

/// The fields of an upload as they arrive (each at most once).
#[derive(Default)]
struct UploadForm {
    version: Option<String>,
    device_type: Option<String>,
    description: Option<String>,
    force_upgrade: Option<bool>,
    signature: Option<crate::trust::Signature>,
    staged: Option<crate::server::blobs::StagedBlob>,
}

/// Refuses a field sent twice.
fn once(name: &str, seen: bool) -> Result<(), ApiError> {
    if seen {
        Err(ApiError::bad_request(format!(
            "the form has more than one `{name}` part: send each field once"
        )))
    } else {
        Ok(())
    }
}

impl UploadForm {
    /// Takes one part: the image is streamed to a blob (checked against a signature that came
    /// before it), the others are read as bounded text.
    async fn take(
        &mut self,
        st: &AppState,
        field: axum::extract::multipart::Field<'_>,
        max: u64,
    ) -> Result<(), ApiError> {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "file" => {
                if self.staged.is_some() {
                    return Err(ApiError::bad_request(
                        "more than one `file` part: upload one image at a time",
                    ));
                }
                self.staged = Some(self.stream_image(st, field, max).await?);
            }
            "version" => {
                once("version", self.version.is_some())?;
                self.version = Some(text_field(field, "version").await?);
            }
            "deviceType" => {
                once("deviceType", self.device_type.is_some())?;
                self.device_type = Some(text_field(field, "deviceType").await?);
            }
            "description" => {
                once("description", self.description.is_some())?;
                let d = text_field(field, "description").await?;
                check_free_text("description", &d)?;
                self.description = Some(d);
            }
            "signature" => {
                once("signature", self.signature.is_some())?;
                let text = text_field(field, "signature").await?;
                self.signature = Some(crate::trust::Signature::parse(&text).map_err(|e| {
                    ApiError::bad_request(format!(
                        "the signature part is not a usable minisign signature: {e}"
                    ))
                })?);
            }
            "forceUpgrade" => {
                once("forceUpgrade", self.force_upgrade.is_some())?;
                self.force_upgrade = Some(parse_bool(
                    "forceUpgrade",
                    &text_field(field, "forceUpgrade").await?,
                )?);
            }
            other => {
                // Unknown parts are read (bounded) and ignored.
                let _ = text_field(field, other).await?;
            }
        }
        Ok(())
    }

    /// Streams the image into a staged blob: refused at once when the fields before it already
    /// name a firmware that exists; bounded by `max`; the disk's room checked as it grows.
    async fn stream_image(
        &self,
        st: &AppState,
        mut field: axum::extract::multipart::Field<'_>,
        max: u64,
    ) -> Result<crate::server::blobs::StagedBlob, ApiError> {
        // Fail fast when the metadata came first and already tells the answer.
        if let (Some(v), Some(t)) = (&self.version, &self.device_type) {
            firmware::validate_key(t, v)?;
            if st.firmware.exists(t, v)? {
                return Err(firmware::FirmwareError::Conflict(format!(
                    "firmware {v} for device type {t} already exists: upload under a new version or delete the old one first"
                ))
                .into());
            }
        }
        // a signature that came first is checked while the bytes stream
        let check = self
            .signature
            .as_ref()
            .and_then(|sig| st.signatures.streaming_check(sig));
        let mut w = st.firmware.blobs().writer_checking(check);
        let mut next_check = ROOM_CHECK_EVERY;
        loop {
            let chunk = match field.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    w.abort().await;
                    return Err(multipart_err(e));
                }
            };
            if w.written() + chunk.len() as u64 > max {
                w.abort().await;
                return Err(ApiError::too_large(format!(
                    "the file is larger than {max} bytes (http.max_upload_bytes)"
                )));
            }
            if w.written() >= next_check {
                next_check += ROOM_CHECK_EVERY;
                if let Err(e) = check_room(st, 0) {
                    w.abort().await;
                    return Err(e);
                }
            }
            if let Err(e) = w.write(chunk).await {
                w.abort().await;
                return Err(write_failed(st, e, "writing upload", UPLOAD_NOT_STORED));
            }
        }
        w.finish()
            .await
            .map_err(|e| write_failed(st, e, "finishing upload", UPLOAD_NOT_STORED))
    }
}

/// What the upload's signature (if it had one) says of the staged image: checked while it
/// streamed when the signature came first, else by reading the staged file (blocking pool).
async fn judge_signature(
    st: &AppState,
    signature: Option<crate::trust::Signature>,
    mut staged: crate::server::blobs::StagedBlob,
    device_type: &str,
    version: &str,
) -> Result<
    (
        Option<crate::server::store::FirmwareSignature>,
        crate::server::blobs::StagedBlob,
    ),
    ApiError,
> {
    let Some(sig) = signature else {
        return Ok((None, staged));
    };
    let streamed = staged.signature_check.take();
    let sigs = st.signatures.clone();
    let (dt, v) = (device_type.to_string(), version.to_string());
    let (verdict, staged) = tokio::task::spawn_blocking(move || {
        let verdict = sigs.judge_firmware(&sig, streamed, staged.path(), &dt, &v, &staged.sha256);
        (verdict, staged)
    })
    .await
    .map_err(|e| ApiError::internal(format!("signature check task: {e}")))?;
    tracing::info!(device_type, version, key = %verdict.key_id, signer = ?verdict.signer, status = ?verdict.status, reason = %verdict.reason, "firmware signature checked");
    Ok((Some(verdict), staged))
}

/// The boundary of a `multipart/form-data` content type.
pub(crate) fn multer_boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    if !parts
        .next()?
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

/// GET /api/ota/firmware?deviceType=&status=&limit=&offset=
pub async fn list(State(st): State<AppState>, Query(q): Q) -> Result<Response, ApiError> {
    let (limit, offset) = paging(&q)?;
    let device_type = match q.get("deviceType") {
        Some(t) if !ids::valid_device_type(t) => {
            return Err(ApiError::bad_request(format!(
                "deviceType {t:?} must match [A-Za-z0-9_-]{{1,64}}"
            )));
        }
        other => other.map(String::as_str),
    };
    let status = match q.get("status") {
        None => None,
        Some(s) => Some(FirmwareStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status {s:?} is not one of draft, testing, released, deprecated"
            ))
        })?),
    };
    let all = st.firmware.list(device_type, status)?;
    let page: Vec<_> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|r| dto(&st, r))
        .collect();
    Ok(super::error::ok_page(page, all.len()))
}

/// GET /api/ota/firmware/latest?deviceType=
pub async fn latest(State(st): State<AppState>, Query(q): Q) -> Result<Response, ApiError> {
    let t = device_type_param(&q)?;
    Ok(ok(dto(&st, &st.firmware.latest(&t)?)))
}

/// GET /api/ota/firmware/{version}?deviceType=
pub async fn get_one(
    State(st): State<AppState>,
    ApiPath(version): ApiPath<String>,
    Query(q): Q,
) -> Result<Response, ApiError> {
    let t = device_type_param(&q)?;
    Ok(ok(dto(&st, &st.firmware.get(&t, &version)?)))
}

/// POST /api/ota/firmware/{version}/release?deviceType=
pub async fn release(
    State(st): State<AppState>,
    ApiPath(version): ApiPath<String>,
    Query(q): Q,
) -> Result<Response, ApiError> {
    let t = device_type_param(&q)?;
    let rec = st
        .firmware
        .set_status(&t, &version, FirmwareStatus::Released)
        .await?
        .into_inner();
    tracing::info!(device_type = %t, version = %version, "firmware released");
    queue_deltas(&st, &rec).await;
    Ok(ok(dto(&st, &rec)))
}

#[derive(Deserialize)]
pub struct StatusBody {
    status: String,
}

/// POST /api/ota/firmware/{version}/status?deviceType= `{"status": "..."}`
pub async fn set_status(
    State(st): State<AppState>,
    ApiPath(version): ApiPath<String>,
    Query(q): Q,
    JsonBody(b): JsonBody<StatusBody>,
) -> Result<Response, ApiError> {
    let t = device_type_param(&q)?;
    let status = FirmwareStatus::parse(&b.status).ok_or_else(|| {
        ApiError::bad_request(format!(
            "status {:?} is not one of draft, testing, released, deprecated",
            b.status
        ))
    })?;
    let rec = st
        .firmware
        .set_status(&t, &version, status)
        .await?
        .into_inner();
    tracing::info!(device_type = %t, version = %version, status = status.as_str(), "firmware status changed");
    if status == FirmwareStatus::Released {
        queue_deltas(&st, &rec).await;
    }
    Ok(ok(dto(&st, &rec)))
}

/// DELETE /api/ota/firmware/{version}?deviceType=
pub async fn delete(
    State(st): State<AppState>,
    ApiPath(version): ApiPath<String>,
    Query(q): Q,
) -> Result<Response, ApiError> {
    let t = device_type_param(&q)?;
    if let Some(c) = st
        .campaigns
        .uses(&t, &version)
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "CONFLICT",
            format!("firmware {version} is the target of campaign {c}: cancel it first"),
        ));
    }
    let rec = st.firmware.delete(&t, &version).await?.into_inner();
    if let Ok(path) = st.firmware.blob_path(&rec) {
        st.fds.forget(&path);
    }
    if let Err(e) = st.deltas.remove_target(&t, &version).await {
        tracing::error!(error = %e, "removing the deltas of a deleted firmware");
    }
    tracing::info!(device_type = %t, version = %version, "firmware deleted");
    Ok(ok(dto(&st, &rec)))
}

/// Queues the deltas a release calls for; a failure there never fails the release.
async fn queue_deltas(st: &AppState, rec: &crate::server::store::FirmwareRecord) {
    match st.deltas.on_released(rec).await {
        Ok(list) if !list.is_empty() => {
            tracing::info!(device_type = %rec.device_type, version = %rec.version, deltas = list.len(), "deltas queued for the versions in the field");
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "queuing deltas"),
    }
}

/// Any path no route knows.
pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path()))
}

/// A known path with the wrong method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// GET /api/ota/backup: a consistent backup tar (see `crate::server::backup`), streamed from a temp file
/// that is already unlinked.
pub async fn backup(State(st): State<AppState>) -> Result<Response, ApiError> {
    let dump = {
        let _c = st.campaigns.quiesce().await;
        let _o = st.ota.quiesce().await;
        let _f = st.firmware.quiesce().await;
        let _a = st.archive.quiesce().await;
        let store = st.store.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut v = Vec::new();
            store.export(&mut v)?;
            Ok(v)
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?
    };
    let dir = st.data_dir.clone();
    let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        let mut name = [0u8; 8];
        rand::fill(&mut name);
        let path = dir
            .join("tmp")
            .join(format!("backup-{}.tar", hex::encode(name)));
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let r = crate::server::backup::write(&dir, &dump, &mut f);
        drop(dump);
        crate::server::memory::give_back();
        let _ = std::fs::remove_file(&path);
        r?;
        use std::io::Seek;
        f.rewind()?;
        Ok(f)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| {
        write_failed(
            &st,
            e,
            "writing the backup",
            "the backup is assembled in <data_dir>/tmp/ before it is sent and did not fit",
        )
    })?;
    let len = file.metadata().map_err(ApiError::internal)?.len();
    let stream =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 256 * 1024);
    let name = format!(
        "hangar-backup-{}.tar",
        crate::time::now_utc().format("%Y%m%dT%H%M%SZ")
    );
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(header::CONTENT_LENGTH, len)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .body(axum::body::Body::from_stream(stream))
        .map_err(ApiError::internal)
}
