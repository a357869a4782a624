//! The two downloads devices make: `GET/HEAD /firmware/{deviceType}_v{version}.bin` (an image)
//! and `/firmware/deltas/{deviceType}_v{from}_to_v{to}.bsdiff` (a patch, re-hashed before it is
//! served). One path for both: the admin token or a signed `?token=` first (also before a bad
//! path is refused), then the file name, then [`super::download::serve`] (conditional requests
//! and Range), counted by [`crate::server::traffic`].

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{Uri, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::download::{self, BlobMeta};
use super::error::ApiError;
use crate::ids;
use crate::server::auth;
use crate::server::traffic::Served;

/// Who may download: the admin token, a signed URL (bound to an upgrade task when it names one
/// with `task=ID`; `public` when it is a valid nginx secure link, which an edge cache may be
/// pulling through), or a device by its client certificate (its own device type's files).
enum Access {
    Admin,
    Signed { task: Option<u64>, public: bool },
    Device { device_type: String },
}

/// The request's credentials, if they are valid: the admin token, a signed `?token=` for
/// exactly this path (and this `task`, when the URL names one), or a client certificate
/// (verified by the HTTPS listener against `mqtt.client_ca_file`) whose CN is a registered
/// device.
fn access(st: &AppState, req: &axum::extract::Request) -> Option<Access> {
    let (uri, headers) = (req.uri(), req.headers());
    if auth::bearer_matches(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
        &st.admin_token,
    ) {
        return Some(Access::Admin);
    }
    let q = Query::of(uri);
    let now = crate::time::now_secs();
    let public = match (&q.md5, &q.expires) {
        (Some(md5), Some(exp)) => st.links.verify_secure_link(uri.path(), md5, exp, now),
        _ => false,
    };
    let token_ok = q
        .token
        .as_ref()
        .is_some_and(|token| q.task_ok && st.signer.verify_for(uri.path(), token, q.task, now));
    if token_ok || (public && q.task_ok) {
        return Some(Access::Signed {
            task: q.task,
            public,
        });
    }
    let cn = req.extensions().get::<super::ClientCert>()?.0.clone()?;
    let id = crate::protocol::id_from_username(&cn);
    let device = st.devices.get(&id).ok()?;
    Some(Access::Device {
        device_type: device.device_type,
    })
}

/// The query parameters a download URL may carry (no allocation unless present).
#[derive(Default)]
struct Query<'a> {
    token: Option<std::borrow::Cow<'a, str>>,
    task: Option<u64>,
    /// False when `task` is there but not a number (nothing is then accepted).
    task_ok: bool,
    md5: Option<std::borrow::Cow<'a, str>>,
    expires: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> Query<'a> {
    fn of(uri: &'a Uri) -> Query<'a> {
        let mut q = Query {
            task_ok: true,
            ..Query::default()
        };
        for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            match &*k {
                "token" => q.token = Some(v),
                "task" => match v.parse::<u64>() {
                    Ok(t) => q.task = Some(t),
                    Err(_) => q.task_ok = false,
                },
                "md5" => q.md5 = Some(v),
                "expires" => q.expires = Some(v),
                _ => {}
            }
        }
        q
    }
}

/// Checks the credentials, then serves the blob `resolve` finds for the file name. A URL bound
/// to a task that was cancelled is refused (410 `TASK_CANCELLED`), and a transfer under way
/// ends when its task is cancelled.
async fn serve_file(
    st: &AppState,
    file: Result<Path<String>, PathRejection>,
    req: axum::extract::Request,
    resolve: impl AsyncFnOnce(String) -> Result<(String, BlobMeta), ApiError>,
) -> Response {
    let (method, headers) = (req.method(), req.headers());
    let Some(access) = access(st, &req) else {
        return ApiError::unauthorized(
            "downloads need the admin token (Authorization: Bearer ...), a valid signed URL (?token=...) or a device's client certificate",
        )
        .into_response();
    };
    let (task, public) = match access {
        Access::Signed { task, public } => (task, public),
        _ => (None, false),
    };
    if let Some(id) = task
        && let Some(refusal) = st.ota.download_refusal(id)
    {
        return ApiError::new(axum::http::StatusCode::GONE, "TASK_CANCELLED", refusal)
            .into_response();
    }
    let file = match file {
        Ok(Path(f)) => f,
        Err(e) => return super::refusal::path_refused(&e).into_response(),
    };
    match resolve(file).await {
        Ok((of_type, _)) if matches!(&access, Access::Device { device_type } if *device_type != of_type) => {
            ApiError::forbidden(
                "a device's certificate downloads the files of its own device type only",
            )
            .into_response()
        }
        Ok((_, mut meta)) => {
            meta.transfer = task.map(|id| st.ota.transfers().start(id));
            meta.public = public;
            download::serve(meta, &st.fds, method, headers).await
        }
        Err(e) => e.into_response(),
    }
}

/// GET/HEAD /firmware/{fileName} — a released or deprecated image.
pub async fn firmware(
    State(st): State<AppState>,
    file: Result<Path<String>, PathRejection>,
    req: axum::extract::Request,
) -> Response {
    serve_file(&st, file, req, async |file_name| {
        let Some((device_type, version)) = ids::parse_firmware_file_name(&file_name) else {
            return Err(ApiError::bad_request(format!(
                "{file_name:?} is not a firmware file name: expected {{deviceType}}_v{{version}}.bin"
            )));
        };
        let rec = st.firmware.get(device_type, version)?;
        let path = st.firmware.blob_path(&rec)?;
        let served = Served::Full(rec.device_type.clone(), rec.version.clone());
        let meta = BlobMeta {
            path,
            size: rec.size,
            sha256: rec.sha256,
            modified_ms: rec.created_at_ms,
            counter: Some(st.traffic.counter(served, (rec.size, 0))),
            file_name,
            transfer: None,
            public: false,
        };
        Ok((rec.device_type, meta))
    })
    .await
}

/// GET/HEAD /firmware/deltas/{file} — a ready patch, re-hashed before it is served (a corrupt
/// one is withdrawn).
pub async fn delta(
    State(st): State<AppState>,
    file: Result<Path<String>, PathRejection>,
    req: axum::extract::Request,
) -> Response {
    serve_file(&st, file, req, async |file| {
        let Some((dt, from, to)) = crate::server::deltas::parse_file_name(&file) else {
            return Err(ApiError::bad_request(format!(
                "{file:?} is not a delta file name: expected {{deviceType}}_v{{from}}_to_v{{to}}.bsdiff"
            )));
        };
        let d = st
            .deltas
            .offer(dt, from, to)
            .ok_or_else(|| ApiError::not_found(format!("no ready delta {from} -> {to} for {dt}")))?;
        let path = match st.deltas.verified_path(&d).await {
            Ok(p) => p,
            Err(e) => {
                if let Some(p) = st.deltas.patch_path(&d) {
                    st.fds.forget(&p);
                }
                return Err(e.into());
            }
        };
        let size = d.size.unwrap_or(0);
        let served = Served::Delta(d.device_type.clone(), d.from_version, d.to_version);
        let meta = BlobMeta {
            path,
            size,
            sha256: d.sha256.unwrap_or_default(),
            modified_ms: d.updated_at_ms,
            counter: Some(st.traffic.counter(served, (d.full_size, size))),
            file_name: file,
            transfer: None,
            public: false,
        };
        Ok((d.device_type, meta))
    })
    .await
}
