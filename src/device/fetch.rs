//! Resumable HTTPS download with Range (RFC 9110) as a device does it: bytes go to a [`Sink`]
//! (a `.part` file for the agent, a hash-only sink for simulated devices) while md5 and sha256
//! are computed on the way; a broken connection resumes with `Range: bytes=N-` and `If-Range`;
//! a server that answers 200 to a resume makes it start over cleanly; a body longer than
//! announced is refused; verification is against size, md5 and sha256 of the command.

use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use sha2::Sha256;

/// Where downloaded bytes go.
pub trait Sink: Send {
    /// Appends bytes.
    fn write(&mut self, b: &[u8]) -> std::io::Result<()>;
    /// Throws away everything written (the server answered 200 to a resume).
    fn reset(&mut self) -> std::io::Result<()>;
    /// Makes what was written durable and records the validator for a resume after restart.
    fn checkpoint(&mut self, _etag: Option<&str>) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sink that keeps nothing but the count (simulated devices hash and discard).
#[derive(Default)]
pub struct Discard;

impl Sink for Discard {
    fn write(&mut self, _b: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sink collecting bytes in memory (small files: patches).
#[derive(Default)]
pub struct Memory(pub Vec<u8>);

impl Sink for Memory {
    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.0.clear();
        Ok(())
    }
}

/// What was received so far, with running hashes; cloneable so a resume continues them.
#[derive(Clone)]
pub struct Received {
    /// Bytes received.
    pub have: u64,
    /// The running md5 and sha256; `None` for a download whose bytes the caller keeps and
    /// checks itself ([`Received::size_only`]).
    hashes: Option<(Md5, Sha256)>,
    /// The validator of the response the bytes came from.
    pub etag: Option<String>,
}

impl Default for Received {
    fn default() -> Self {
        Received {
            have: 0,
            hashes: Some((Md5::new(), Sha256::new())),
            etag: None,
        }
    }
}

impl Received {
    /// Counts bytes without hashing them: [`verify`] then checks the size only, and the caller,
    /// which keeps the bytes, checks their content (see [`fetch_patch`]).
    pub fn size_only() -> Self {
        Received {
            have: 0,
            hashes: None,
            etag: None,
        }
    }

    /// Forgets everything received (the server started over), in the same mode.
    fn restart(&mut self) {
        *self = if self.hashes.is_some() {
            Received::default()
        } else {
            Received::size_only()
        };
    }

    /// Feeds bytes that are already in the sink (a `.part` file found after a restart).
    pub fn feed(&mut self, b: &[u8]) {
        self.have += b.len() as u64;
        if let Some((md5, sha256)) = &mut self.hashes {
            md5.update(b);
            sha256.update(b);
        }
    }

    /// Hex md5 and sha256 of everything received (empty strings when not hashing).
    pub fn digests(&self) -> (String, String) {
        match &self.hashes {
            Some((md5, sha256)) => (
                hex::encode(md5.clone().finalize()),
                hex::encode(sha256.clone().finalize()),
            ),
            None => (String::new(), String::new()),
        }
    }
}

/// What the command promised.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Exact size.
    pub size: u64,
    /// md5 hex.
    pub md5: String,
    /// sha256 hex, when the protocol carries it.
    pub sha256: Option<String>,
}

impl Expect {
    /// What the full image of an offer must be: its size and hashes.
    pub fn of(offer: &super::client::Offer) -> Expect {
        Expect {
            size: offer.size,
            md5: offer.md5.clone(),
            sha256: offer.sha256.clone(),
        }
    }
}

/// Fault injection and pacing of a download.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Give up after this many attempts without progress.
    pub max_attempts: u32,
    /// Cut the connection once when this many bytes are in (simulated network drop).
    pub drop_at: Option<u64>,
    /// Limit to this many bytes per second.
    pub rate_limit: Option<u64>,
    /// Overall deadline.
    pub timeout: Option<Duration>,
}

/// Why a download ended without a verified file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Transport or server failure after the retries (SPEC code DOWNLOAD_FAILED).
    #[error("download failed: {0}")]
    Download(String),
    /// The bytes are not what the command promised (VERIFY_FAILED).
    #[error("verification failed: {0}")]
    Verify(String),
    /// Writing the bytes locally failed (INSTALL_FAILED: the device's storage).
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
}

impl FetchError {
    /// The SPEC 4 failure this is reported as, and its message.
    pub fn failure(&self) -> (super::client::Failure, String) {
        match self {
            FetchError::Download(m) => (super::client::Failure::Download, m.clone()),
            FetchError::Verify(m) => (super::client::Failure::Verify, m.clone()),
            FetchError::Storage(e) => (super::client::Failure::Install, e.to_string()),
        }
    }
}

/// Turns byte counts into the 10 % steps a device reports.
#[derive(Debug, Default)]
pub struct Deciles(u64);

impl Deciles {
    /// The new percentage (10, 20, ... 100) when `have` of `total` crossed the next step.
    pub fn step(&mut self, have: u64, total: u64) -> Option<u8> {
        let d = (have * 10).checked_div(total).unwrap_or(10);
        (d > self.0).then(|| {
            self.0 = d;
            (d * 10).min(100) as u8
        })
    }
}

fn content_range(resp: &reqwest::Response) -> Option<(u64, u64)> {
    let v = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, _) = range.split_once('-')?;
    Some((a.parse().ok()?, total.parse().ok()?))
}

/// Downloads `url` into `sink`, continuing from `rx` (which may already hold bytes), and
/// verifies the result. `progress(have, total)` is called after every chunk. Each attempt
/// asks for the rest (Range + If-Range), checks what the server answered, and reads the body;
/// an attempt that made progress resets the failure count.
pub async fn fetch(
    http: &reqwest::Client,
    url: &str,
    expect: &Expect,
    sink: &mut dyn Sink,
    rx: &mut Received,
    opts: &Options,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(), FetchError> {
    let started = Instant::now();
    let max_attempts = opts.max_attempts.max(1);
    let mut failures = 0u32;
    let mut dropped = false;
    let mut last_err = String::new();
    if rx.have > expect.size {
        sink.reset()?;
        rx.restart();
    }
    while rx.have < expect.size {
        if failures >= max_attempts {
            return Err(FetchError::Download(format!(
                "{last_err} (after {failures} attempts)"
            )));
        }
        if let Some(t) = opts.timeout
            && started.elapsed() > t
        {
            return Err(FetchError::Download(format!("timed out after {t:?}")));
        }
        if failures > 0 {
            let backoff = Duration::from_millis(200 * (1 << failures.min(5)) as u64);
            tokio::time::sleep(backoff.min(Duration::from_secs(5))).await;
        }
        let mut resp = match request(http, url, rx).await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                last_err = format!("cannot reach {}: {e}", redact(url));
                continue;
            }
        };
        match answered(&resp, url, expect, sink, rx)? {
            Answer::Body => {}
            Answer::Retry(why) => {
                failures += 1;
                last_err = why;
                continue;
            }
        }
        let before = rx.have;
        if let Some(why) =
            read_body(&mut resp, expect, sink, rx, opts, &mut dropped, progress).await?
        {
            last_err = why;
        }
        drop(resp);
        sink.checkpoint(rx.etag.as_deref())?;
        if rx.have < expect.size {
            if rx.have == before {
                failures += 1;
            } else {
                failures = 1; // progress was made: keep trying, with a short pause
            }
            if last_err.is_empty() {
                last_err = format!("body ended at byte {} of {}", rx.have, expect.size);
            }
        }
    }
    verify(rx, expect)
}

/// The request for what is still missing: the rest of the file from `rx.have`, valid only if
/// the file is still the one whose ETag `rx` holds.
async fn request(
    http: &reqwest::Client,
    url: &str,
    rx: &Received,
) -> Result<reqwest::Response, reqwest::Error> {
    let mut req = http.get(url);
    if rx.have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={}-", rx.have));
        if let Some(e) = &rx.etag {
            req = req.header(reqwest::header::IF_RANGE, e.as_str());
        }
    }
    req.send().await
}

/// What an answer means for the download.
enum Answer {
    /// Read its body.
    Body,
    /// Try again (after a pause), for this reason.
    Retry(String),
}

/// Checks the server's answer: the range asked for (206), or the whole file (200: start over),
/// sizes that match the command; a refusal (4xx but 408/429) ends the download.
fn answered(
    resp: &reqwest::Response,
    url: &str,
    expect: &Expect,
    sink: &mut dyn Sink,
    rx: &mut Received,
) -> Result<Answer, FetchError> {
    let status = resp.status().as_u16();
    match status {
        206 => match content_range(resp) {
            Some((start, total)) if start == rx.have && total == expect.size => {}
            Some((_, total)) if total != expect.size => {
                return Err(FetchError::Verify(format!(
                    "the server has {total} bytes, the command said {}",
                    expect.size
                )));
            }
            _ => {
                // not the range we asked for: start over cleanly
                sink.reset()?;
                rx.restart();
                return Ok(Answer::Retry(
                    "the server answered a different range".into(),
                ));
            }
        },
        200 => {
            if rx.have > 0 {
                // the resume was not honoured (no Range support, or the file changed)
                sink.reset()?;
                rx.restart();
            }
            if let Some(len) = resp.content_length()
                && len != expect.size
            {
                return Err(FetchError::Verify(format!(
                    "the server sends {len} bytes, the command said {}",
                    expect.size
                )));
            }
        }
        416 => {
            sink.reset()?;
            rx.restart();
            return Ok(Answer::Retry("416 on resume".into()));
        }
        s if (400..500).contains(&s) && s != 408 && s != 429 => {
            return Err(FetchError::Download(format!(
                "{} answered {s}",
                redact(url)
            )));
        }
        s => return Ok(Answer::Retry(format!("{} answered {s}", redact(url)))),
    }
    rx.etag = resp
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(Answer::Body)
}

/// Reads an answer's body into the sink, within the rate limit, until it ends, breaks, or the
/// simulated drop point; `Some(why)` when it stopped short for a reason worth saying.
async fn read_body(
    resp: &mut reqwest::Response,
    expect: &Expect,
    sink: &mut dyn Sink,
    rx: &mut Received,
    opts: &Options,
    dropped: &mut bool,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Option<String>, FetchError> {
    let mut window_start = Instant::now();
    let mut window_bytes = 0u64;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(None),
            Err(e) => {
                return Ok(Some(format!("connection broke at byte {}: {e}", rx.have)));
            }
        };
        if rx.have + chunk.len() as u64 > expect.size {
            return Err(FetchError::Verify(format!(
                "the body is longer than the {} bytes the command said",
                expect.size
            )));
        }
        sink.write(&chunk)?;
        rx.feed(&chunk);
        progress(rx.have, expect.size);
        if let Some(at) = opts.drop_at
            && !*dropped
            && rx.have >= at
            && rx.have < expect.size
        {
            *dropped = true;
            return Ok(Some(format!("simulated network drop at byte {}", rx.have)));
        }
        if let Some(rate) = opts.rate_limit {
            window_bytes += chunk.len() as u64;
            let due = Duration::from_secs_f64(window_bytes as f64 / rate.max(1) as f64);
            let spent = window_start.elapsed();
            if due > spent {
                tokio::time::sleep(due - spent).await;
            }
            if window_start.elapsed() > Duration::from_secs(2) {
                window_start = Instant::now();
                window_bytes = 0;
            }
        }
    }
}

/// [`fetch`] that says how far it got while it runs: `report(p)` for every tenth below 100
/// (awaited between chunks: the device's `Downloading(p)` report), `on_bytes(have, total)` after
/// every chunk.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_reporting<F: Future<Output = ()>>(
    http: &reqwest::Client,
    url: &str,
    expect: &Expect,
    sink: &mut dyn Sink,
    rx: &mut Received,
    opts: &Options,
    mut on_bytes: impl FnMut(u64, u64) + Send,
    mut report: impl FnMut(u8) -> F,
) -> Result<(), FetchError> {
    let (tx, mut tenths) = tokio::sync::mpsc::unbounded_channel::<u8>();
    let mut deciles = Deciles::default();
    let mut progress = move |have: u64, total: u64| {
        on_bytes(have, total);
        if let Some(p) = deciles.step(have, total) {
            let _ = tx.send(p);
        }
    };
    let fut = fetch(http, url, expect, sink, rx, opts, &mut progress);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            r = &mut fut => return r,
            Some(p) = tenths.recv() => if p < 100 {
                report(p).await;
            }
        }
    }
}

/// A delta attempt's download: the whole patch in memory (patches are small next to the image),
/// checked against the size and md5 the command gave, four tries. With `known`, bytes already
/// checked against that md5 (a simulator's earlier device), the download is compared with them
/// instead of hashed, and hashed only when it differs.
pub async fn fetch_patch(
    http: &reqwest::Client,
    d: &super::client::DeltaOffer,
    known: Option<&[u8]>,
) -> Result<Vec<u8>, String> {
    let mut patch = Memory::default();
    let expect = Expect {
        size: d.size,
        md5: d.md5.clone(),
        sha256: None,
    };
    let mut rx = match known {
        Some(_) => Received::size_only(),
        None => Received::default(),
    };
    let opts = Options {
        max_attempts: 4,
        ..Default::default()
    };
    fetch(
        http,
        &d.url,
        &expect,
        &mut patch,
        &mut rx,
        &opts,
        &mut |_, _| {},
    )
    .await
    .map_err(|e| e.to_string())?;
    if known.is_some_and(|k| k != patch.0.as_slice()) {
        verify_bytes(&patch.0, &expect).map_err(|e| e.to_string())?;
    }
    Ok(patch.0)
}

/// A delta attempt's result: `base` patched with `patch` and verified against the full image's
/// size, md5 and sha256 (blocking: call it on the blocking pool).
pub fn patched(base: &[u8], patch: &[u8], full: &Expect) -> Result<Vec<u8>, String> {
    let mut img = Vec::with_capacity(full.size as usize);
    crate::bsdiff::apply(base, patch, full.size, &mut img).map_err(|e| e.to_string())?;
    verify_bytes(&img, full).map_err(|e| e.to_string())?;
    Ok(img)
}

/// Checks size, md5 and sha256 of bytes held whole in memory.
pub fn verify_bytes(bytes: &[u8], expect: &Expect) -> Result<(), FetchError> {
    let mut rx = Received::default();
    rx.feed(bytes);
    verify(&rx, expect)
}

/// Checks size, md5 and sha256 of what was received.
pub fn verify(rx: &Received, expect: &Expect) -> Result<(), FetchError> {
    if rx.have != expect.size {
        return Err(FetchError::Verify(format!(
            "{} bytes, expected {}",
            rx.have, expect.size
        )));
    }
    if rx.hashes.is_none() {
        return Ok(()); // the caller checks the bytes it kept
    }
    let (md5, sha) = rx.digests();
    if !md5.eq_ignore_ascii_case(&expect.md5) {
        return Err(FetchError::Verify(format!(
            "md5 {md5} differs from {}",
            expect.md5
        )));
    }
    if let Some(s) = &expect.sha256
        && !sha.eq_ignore_ascii_case(s)
    {
        return Err(FetchError::Verify(format!("sha256 {sha} differs from {s}")));
    }
    Ok(())
}

/// A URL without its query (the signed token does not belong in logs or reports).
pub fn redact(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}
