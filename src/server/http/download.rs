//! Serving stored images with RFC 9110 semantics: strong ETag, Last-Modified, conditional
//! requests (If-Match, If-None-Match -> 304, If-Modified-Since, If-Unmodified-Since -> 412),
//! Range (`a-b`, `a-`, `-n` -> 206; unsatisfiable -> 416 with `bytes */len`; malformed -> ignored),
//! If-Range, and several ranges as `multipart/byteranges`. Bodies stream from disk one bounded
//! chunk at a time (positioned reads on the blocking pool), so memory does not grow with file
//! size or with the number of readers. HEAD answers exactly the headers GET would.

use std::collections::VecDeque;
use std::fs::File;
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::task::JoinHandle;

use super::error::ApiError;

/// Bytes read from disk per chunk: large enough for throughput (see BENCHMARKS.md), small enough
/// that 1,000 concurrent readers stay near nginx's memory (128 KiB chunks cost ~80 MiB more).
const CHUNK: u64 = 64 * 1024;
/// How a file asked for by a secure link may be cached: a day, then revalidated by its strong
/// ETag (a file's name may name other bytes later: a draft deleted and uploaded again).
const PUBLIC_CACHE: &str = "public, max-age=86400";
/// More ranges than this in one request get the whole file (200).
const MAX_RANGES: usize = 16;

/// What is needed to serve one stored file.
#[derive(Debug)]
pub struct BlobMeta {
    /// File on disk.
    pub path: PathBuf,
    /// Expected size (from the record; a mismatch is reported as corruption).
    pub size: u64,
    /// Hex sha256 (the strong ETag).
    pub sha256: String,
    /// Last-Modified, milliseconds since the epoch.
    pub modified_ms: i64,
    /// Suggested download name.
    pub file_name: String,
    /// Where the bytes sent are counted.
    pub counter: Option<Arc<crate::server::traffic::Counter>>,
    /// The upgrade task this download is for, when its URL names one: the body ends with an
    /// error (the client sees the transfer cut off) as soon as the task is cancelled.
    pub transfer: Option<crate::server::traffic::Transfer>,
    /// Asked for by a secure link (an nginx edge may be pulling it through): answered
    /// `Cache-Control: public` so that a stock `proxy_cache` keeps it.
    pub public: bool,
}

fn etag(sha256: &str) -> String {
    format!("\"{sha256}\"")
}

fn last_modified(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs((ms.max(0) / 1000) as u64)
}

/// Does an `If-Match` / `If-None-Match` list contain our tag? `weak` = weak comparison.
pub(crate) fn etag_list_matches(value: &str, ours: &str, weak: bool) -> bool {
    value.split(',').map(str::trim).any(|t| {
        if t == "*" {
            return true;
        }
        match t.strip_prefix("W/") {
            Some(w) => weak && w == ours,
            None => t == ours,
        }
    })
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Outcome of the Range header for a file of `len` bytes.
pub(crate) enum RangePlan {
    Full,
    Single(RangeInclusive<u64>),
    Multi(Vec<RangeInclusive<u64>>),
    Unsatisfiable,
}

pub(crate) fn plan_ranges(value: &str, len: u64) -> RangePlan {
    use http_range_header::RangeUnsatisfiableError as E;
    let max = NonZeroUsize::new(MAX_RANGES).expect("nonzero");
    let parsed = match http_range_header::parse_range_header_with_max_ranges(value, max) {
        Ok(p) => p,
        // Unsatisfiable cannot come from parsing; everything else is malformed or abusive: ignore.
        Err(_) => return RangePlan::Full,
    };
    match parsed.validate(len) {
        Ok(ranges) if ranges.is_empty() => RangePlan::Full,
        Ok(mut ranges) if ranges.len() == 1 => RangePlan::Single(ranges.remove(0)),
        Ok(ranges) => {
            let total: u64 = ranges.iter().map(|r| r.end() - r.start() + 1).sum();
            if total >= len {
                RangePlan::Full // the parts would be more than the file: send the file
            } else {
                RangePlan::Multi(ranges)
            }
        }
        Err(E::Unsatisfiable) => RangePlan::Unsatisfiable,
        Err(_) => RangePlan::Full,
    }
}

/// Answers GET or HEAD for a stored file, honouring every conditional and Range header.
pub async fn serve(
    meta: BlobMeta,
    fds: &FdCache,
    method: &Method,
    headers: &HeaderMap,
) -> Response {
    match serve_inner(meta, fds, method, headers).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve_inner(
    mut meta: BlobMeta,
    fds: &FdCache,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let tag = etag(&meta.sha256);
    let modified = last_modified(meta.modified_ms);
    let lm = httpdate::fmt_http_date(modified);
    let base = |status: StatusCode| {
        let mut r = Response::builder()
            .status(status)
            .header(header::ETAG, &tag)
            .header(header::LAST_MODIFIED, &lm)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(
                header::CACHE_CONTROL,
                if meta.public {
                    PUBLIC_CACHE
                } else {
                    "private, no-cache"
                },
            );
        if status != StatusCode::NOT_MODIFIED {
            r = r.header(
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", meta.file_name),
            );
        }
        r
    };
    if not_modified(headers, &tag, modified)? {
        return Ok(base(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("valid response"));
    }
    // The size is known from the record, so the ranges are planned before touching the disk.
    let len = meta.size;
    let plan = range_plan(headers, len, &tag, modified)?;
    let file = open_checked(fds, &meta.path, len).await?;
    let head = method == Method::HEAD;
    let sending = (meta.counter.clone(), meta.transfer.take());
    let octet = HeaderValue::from_static("application/octet-stream");
    let resp = match plan {
        RangePlan::Unsatisfiable => unreachable!("range_plan refuses it"),
        RangePlan::Full => base(StatusCode::OK)
            .header(header::CONTENT_TYPE, octet)
            .header(header::CONTENT_LENGTH, len)
            .body(body(
                head,
                file,
                vec![Segment::File(0, len)],
                sending,
                false,
            )),
        RangePlan::Single(r) => {
            let (a, b) = (*r.start(), *r.end());
            base(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_TYPE, octet)
                .header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{len}"))
                .header(header::CONTENT_LENGTH, b - a + 1)
                .body(body(
                    head,
                    file,
                    vec![Segment::File(a, b - a + 1)],
                    sending,
                    true,
                ))
        }
        RangePlan::Multi(ranges) => {
            let (boundary, segs) = multipart_segments(&ranges, len);
            let total: u64 = segs.iter().map(Segment::len).sum();
            base(StatusCode::PARTIAL_CONTENT)
                .header(
                    header::CONTENT_TYPE,
                    format!("multipart/byteranges; boundary={boundary}"),
                )
                .header(header::CONTENT_LENGTH, total)
                .body(body(head, file, segs, sending, true))
        }
    };
    Ok(resp.expect("valid response"))
}

/// RFC 9110 13.2.2, the preconditions in order: a failed If-Match or If-Unmodified-Since is
/// 412; `true` when If-None-Match or If-Modified-Since say the client's copy is current (304).
fn not_modified(
    headers: &HeaderMap,
    tag: &str,
    modified: std::time::SystemTime,
) -> Result<bool, ApiError> {
    let failed = |why: &str| {
        ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "PRECONDITION_FAILED",
            why.to_string(),
        )
    };
    if let Some(v) = header_str(headers, header::IF_MATCH) {
        if !etag_list_matches(v, tag, false) {
            return Err(failed("If-Match does not match the current image"));
        }
    } else if let Some(since) = header_str(headers, header::IF_UNMODIFIED_SINCE)
        .and_then(|v| httpdate::parse_http_date(v).ok())
        && modified > since
    {
        return Err(failed("the image was modified after If-Unmodified-Since"));
    }
    Ok(match header_str(headers, header::IF_NONE_MATCH) {
        Some(v) => etag_list_matches(v, tag, true),
        None => header_str(headers, header::IF_MODIFIED_SINCE)
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .is_some_and(|since| modified <= since),
    })
}

/// What the Range header asks for, once If-Range agreed (a stale validator means the whole
/// file); a range past the end is 416 with `Content-Range: bytes */len`.
fn range_plan(
    headers: &HeaderMap,
    len: u64,
    tag: &str,
    modified: std::time::SystemTime,
) -> Result<RangePlan, ApiError> {
    let mut plan = match header_str(headers, header::RANGE) {
        Some(r) => plan_ranges(r, len),
        None => RangePlan::Full,
    };
    if !matches!(plan, RangePlan::Full)
        && let Some(v) = headers.get(header::IF_RANGE)
    {
        let fresh = match v.to_str() {
            Ok(s) if s.starts_with('"') => s == tag, // strong comparison only
            Ok(s) if s.starts_with("W/") => false,
            Ok(s) => httpdate::parse_http_date(s).is_ok_and(|d| d == modified),
            Err(_) => false,
        };
        if !fresh {
            plan = RangePlan::Full;
        }
    }
    if let RangePlan::Unsatisfiable = plan {
        return Err(ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_NOT_SATISFIABLE",
            format!("the requested range is outside the image ({len} bytes)"),
        )
        .with_header(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
        )
        .with_header(header::ACCEPT_RANGES, HeaderValue::from_static("bytes")));
    }
    Ok(plan)
}

/// The file, from the descriptor cache (no trip to the blocking pool) or opened there and
/// checked against the record's size.
async fn open_checked(
    fds: &FdCache,
    path: &std::path::Path,
    len: u64,
) -> Result<Arc<File>, ApiError> {
    if let Some(f) = fds.get(path, len) {
        return Ok(f);
    }
    let p = path.to_path_buf();
    let (f, disk_len) = tokio::task::spawn_blocking(move || -> std::io::Result<(File, u64)> {
        let f = File::open(&p)?;
        let disk_len = f.metadata()?.len();
        Ok((f, disk_len))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::internal(format!("opening {}: {e}", path.display())))?;
    if disk_len != len {
        return Err(ApiError::internal(format!(
            "{} has {disk_len} bytes on disk, the record says {len}: the stored image is damaged",
            path.display(),
        )));
    }
    Ok(fds.insert(path.to_path_buf(), f))
}

/// A `multipart/byteranges` body: its boundary and its parts (a head, then the range).
fn multipart_segments(
    ranges: &[std::ops::RangeInclusive<u64>],
    len: u64,
) -> (String, Vec<Segment>) {
    let mut boundary = [0u8; 12];
    rand::fill(&mut boundary);
    let boundary = format!("hangar-{}", hex::encode(boundary));
    let mut segs = Vec::with_capacity(ranges.len() * 2 + 1);
    for r in ranges {
        let (a, b) = (*r.start(), *r.end());
        segs.push(Segment::Bytes(Bytes::from(format!(
            "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b}/{len}\r\n\r\n"
        ))));
        segs.push(Segment::File(a, b - a + 1));
    }
    segs.push(Segment::Bytes(Bytes::from(format!(
        "\r\n--{boundary}--\r\n"
    ))));
    (boundary, segs)
}

fn body(
    head: bool,
    file: Arc<File>,
    segments: Vec<Segment>,
    (counter, transfer): (
        Option<Arc<crate::server::traffic::Counter>>,
        Option<crate::server::traffic::Transfer>,
    ),
    ranged: bool,
) -> Body {
    if head {
        return Body::empty();
    }
    if let Some(c) = &counter {
        c.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if ranged {
            c.ranged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let mut b = FileBody::new(file, segments);
    if let Some(c) = &counter {
        c.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    b.counter = counter;
    b.transfer = transfer;
    Body::new(b)
}

/// A piece of a response body: literal bytes, or `len` bytes of the file from an offset.
enum Segment {
    Bytes(Bytes),
    File(u64, u64),
}

impl Segment {
    fn len(&self) -> u64 {
        match self {
            Segment::Bytes(b) => b.len() as u64,
            Segment::File(_, n) => *n,
        }
    }
}

/// Streams segments; file reads run on the blocking pool one chunk at a time.
struct FileBody {
    file: Arc<File>,
    segments: VecDeque<Segment>,
    pending: Option<JoinHandle<std::io::Result<Bytes>>>,
    remaining: u64,
    counter: Option<Arc<crate::server::traffic::Counter>>,
    transfer: Option<crate::server::traffic::Transfer>,
}

impl FileBody {
    fn new(file: Arc<File>, segments: Vec<Segment>) -> FileBody {
        let remaining = segments.iter().map(Segment::len).sum();
        FileBody {
            file,
            segments: segments.into(),
            pending: None,
            remaining,
            counter: None,
            transfer: None,
        }
    }
}

impl Drop for FileBody {
    fn drop(&mut self) {
        if let Some(c) = &self.counter {
            c.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if this
            .transfer
            .as_ref()
            .is_some_and(|t| t.stop.is_cancelled())
        {
            this.segments.clear();
            this.pending = None;
            this.transfer = None;
            return Poll::Ready(Some(Err(std::io::Error::other(
                "the upgrade task of this download was cancelled",
            ))));
        }
        loop {
            if let Some(h) = this.pending.as_mut() {
                let res = ready!(Pin::new(h).poll(cx));
                this.pending = None;
                let bytes = match res {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => return Poll::Ready(Some(Err(e))),
                    Err(e) => return Poll::Ready(Some(Err(std::io::Error::other(e)))),
                };
                this.remaining -= bytes.len() as u64;
                if let Some(c) = &this.counter {
                    c.add(bytes.len() as u64);
                }
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            match this.segments.pop_front() {
                None => return Poll::Ready(None),
                Some(Segment::Bytes(b)) => {
                    this.remaining -= b.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Some(Segment::File(_, 0)) => continue,
                Some(Segment::File(off, n)) => {
                    let take = n.min(CHUNK);
                    if n > take {
                        this.segments
                            .push_front(Segment::File(off + take, n - take));
                    }
                    let mut buf = BytesMut::zeroed(take as usize);
                    let cached = read_cached(&this.file, &mut buf, off);
                    if cached == buf.len() {
                        this.remaining -= take;
                        if let Some(c) = &this.counter {
                            c.add(take);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(buf.freeze()))));
                    }
                    // Not (all) in the page cache: the rest is a blocking read, off the workers.
                    let file = this.file.clone();
                    this.pending = Some(tokio::task::spawn_blocking(move || {
                        file.read_exact_at(&mut buf[cached..], off + cached as u64)?;
                        Ok(buf.freeze())
                    }));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

use std::future::Future as _;

/// Reads into `buf` at `off` only what is already in the page cache (`preadv2` with
/// `RWF_NOWAIT`, which answers EAGAIN instead of waiting for the disk); returns the bytes read.
/// Safe to call on an async worker: it never blocks on I/O.
fn read_cached(file: &File, buf: &mut [u8], off: u64) -> usize {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let iov = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        // SAFETY: the iovec points into `buf`, valid for its length; the fd is open.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (off + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n <= 0 {
            break; // EAGAIN (not cached), EOPNOTSUPP, EOF: the caller reads the rest blocking
        }
        done += n as usize;
    }
    done
}

/// Open descriptors of recently served blobs, so a hot download needs no `open` on the blocking
/// pool. Entries are checked with `fstat` on use (no disk access): a deleted blob (`nlink == 0`)
/// or a size that no longer matches the record is dropped and reopened.
#[derive(Default)]
pub struct FdCache {
    inner: std::sync::Mutex<FdCacheInner>,
}

#[derive(Default)]
struct FdCacheInner {
    open: std::collections::HashMap<PathBuf, Arc<File>>,
    order: VecDeque<PathBuf>,
}

/// Descriptors kept open at most.
const FD_CACHE_SIZE: usize = 128;

impl FdCache {
    fn get(&self, path: &std::path::Path, len: u64) -> Option<Arc<File>> {
        use std::os::unix::fs::MetadataExt;
        let f = self
            .inner
            .lock()
            .expect("fd cache lock")
            .open
            .get(path)?
            .clone();
        match f.metadata() {
            Ok(m) if m.nlink() > 0 && m.len() == len => Some(f),
            _ => {
                self.forget(path);
                None
            }
        }
    }

    /// Closes the cached descriptor of `path` (after a delete, so its disk space is freed now).
    pub fn forget(&self, path: &std::path::Path) {
        let mut g = self.inner.lock().expect("fd cache lock");
        g.open.remove(path);
        g.order.retain(|p| p != path);
    }

    fn insert(&self, path: PathBuf, f: File) -> Arc<File> {
        let f = Arc::new(f);
        let mut g = self.inner.lock().expect("fd cache lock");
        if g.open.insert(path.clone(), f.clone()).is_none() {
            g.order.push_back(path);
        }
        while g.order.len() > FD_CACHE_SIZE {
            if let Some(old) = g.order.pop_front() {
                g.open.remove(&old);
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_plans() {
        let p = |v| plan_ranges(v, 100);
        assert!(matches!(p("bytes=0-9"), RangePlan::Single(r) if r == (0..=9)));
        assert!(matches!(p("bytes=90-"), RangePlan::Single(r) if r == (90..=99)));
        assert!(matches!(p("bytes=-10"), RangePlan::Single(r) if r == (90..=99)));
        assert!(matches!(p("bytes=-1000"), RangePlan::Single(r) if r == (0..=99)));
        assert!(matches!(p("bytes=50-1000"), RangePlan::Single(r) if r == (50..=99)));
        assert!(matches!(p("bytes=100-"), RangePlan::Unsatisfiable));
        assert!(matches!(
            p("bytes=18446744073709551616-"),
            RangePlan::Unsatisfiable
        ));
        assert!(matches!(p("bytes=9-1"), RangePlan::Full)); // reversed: invalid, ignored
        assert!(matches!(p("garbage"), RangePlan::Full));
        assert!(matches!(p("bytes=a-b"), RangePlan::Full));
        assert!(matches!(p("items=0-1"), RangePlan::Full));
        assert!(matches!(p("bytes=0-1,5-6"), RangePlan::Multi(v) if v.len() == 2));
        assert!(matches!(p("bytes=0-60,40-99"), RangePlan::Full)); // more than the file
        let many = format!(
            "bytes={}",
            (0..1000)
                .map(|i| format!("{i}-{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(matches!(p(&many), RangePlan::Full));
    }

    #[test]
    fn etag_lists() {
        let ours = "\"abc\"";
        assert!(etag_list_matches("\"abc\"", ours, false));
        assert!(etag_list_matches("\"x\", \"abc\"", ours, false));
        assert!(etag_list_matches("*", ours, false));
        assert!(!etag_list_matches("W/\"abc\"", ours, false));
        assert!(etag_list_matches("W/\"abc\"", ours, true));
        assert!(!etag_list_matches("\"abd\"", ours, true));
    }
}
