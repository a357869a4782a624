//! A bound on the header block of each part of a `multipart/form-data` body. The multipart
//! parser buffers a part's headers until it sees the blank line that ends them, with no limit of
//! its own: a client could make it hold a whole upload's worth of "headers" in memory. This
//! scanner watches the raw body for each boundary delimiter and refuses a header block longer
//! than [`MAX_PART_HEADERS`] before the parser gets that far.

/// Longest header block of one part (its `Content-Disposition`, `Content-Type`, ... lines).
pub const MAX_PART_HEADERS: usize = 8 * 1024;

const CRLF2: &[u8] = b"\r\n\r\n";

/// Scans a body chunk by chunk (see the module doc).
pub struct PartGuard {
    /// `\r\n--` + boundary.
    delimiter: Vec<u8>,
    /// The last bytes of the body seen, so a delimiter split across chunks is found.
    carry: Vec<u8>,
    /// Inside a part's header block: its length so far.
    in_headers: Option<usize>,
    limit: usize,
}

impl PartGuard {
    /// A guard for the body of a form with this boundary.
    pub fn new(boundary: &str) -> PartGuard {
        PartGuard::with_limit(boundary, MAX_PART_HEADERS)
    }

    fn with_limit(boundary: &str, limit: usize) -> PartGuard {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        PartGuard {
            delimiter,
            // the first delimiter may open the body, with no line break before it
            carry: b"\r\n".to_vec(),
            in_headers: None,
            limit,
        }
    }

    /// Looks at the next chunk; `Err` once a part's header block is longer than the limit.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), HeadersTooLong> {
        let keep = self.delimiter.len().max(CRLF2.len()) - 1;
        let mut region = std::mem::take(&mut self.carry);
        let old = region.len();
        region.extend_from_slice(chunk);
        // A match counts only if it ends in the new bytes (the others were seen before).
        let mut at = 0;
        loop {
            match self.in_headers {
                None => match find_ending_after(&region, at, &self.delimiter, old) {
                    Some(end) => {
                        self.in_headers = Some(0);
                        at = end;
                    }
                    None => break,
                },
                Some(len) => match find_ending_after(&region, at, CRLF2, old) {
                    Some(end) => {
                        // bytes before `old` were counted with the chunk they came in
                        let start = at.max(old).min(end);
                        if len + (end - start) > self.limit + CRLF2.len() {
                            return Err(self.too_long());
                        }
                        self.in_headers = None;
                        at = end;
                    }
                    None => {
                        let counted = region.len() - at.max(old);
                        let len = len + counted;
                        if len > self.limit {
                            return Err(self.too_long());
                        }
                        self.in_headers = Some(len);
                        break;
                    }
                },
            }
        }
        let from = region.len().saturating_sub(keep);
        self.carry = region.split_off(from);
        Ok(())
    }

    fn too_long(&self) -> HeadersTooLong {
        HeadersTooLong(self.limit)
    }
}

/// A part's header block went past the limit (the limit, in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "a part's headers are longer than {0} bytes: send only Content-Disposition and Content-Type"
)]
pub struct HeadersTooLong(pub usize);

/// End of the first occurrence of `pat` in `hay[from..]` that ends after `after`.
fn find_ending_after(hay: &[u8], from: usize, pat: &[u8], after: usize) -> Option<usize> {
    let mut from = from;
    while from + pat.len() <= hay.len() {
        let i = memchr::memmem::find(&hay[from..], pat)?;
        let end = from + i + pat.len();
        if end > after {
            return Some(end);
        }
        from += i + 1;
    }
    None
}

/// Ends a body stream one poll late: when `inner` ends, the first poll answers `Pending` (and
/// wakes itself at once) and only the next one ends. multer 3.1 (axum's multipart parser) has
/// a race: looking for the first boundary, it reads the stream again *after* a failed search
/// and, if that read reached the end, calls the body incomplete although the boundary just
/// arrived (rwf2/multer#70; one small upload in some hundreds on a multi-threaded runtime).
/// Seeing `Pending` before the end, it searches its buffer again first.
pub fn end_one_poll_late<S: futures_util::Stream + Unpin>(inner: S) -> EndLate<S> {
    EndLate { inner, held: false }
}

/// See [`end_one_poll_late`].
pub struct EndLate<S> {
    inner: S,
    held: bool,
}

impl<S: futures_util::Stream + Unpin> futures_util::Stream for EndLate<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(None) if !self.held => {
                self.held = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first boundary arrives split: its start, then (after a pause) the rest of the
    /// body and the end at once, which is what makes multer 3.1 call it incomplete.
    #[tokio::test]
    async fn a_body_whose_end_comes_with_its_first_boundary_parses() {
        use axum::extract::FromRequest;
        fn stream() -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin
        {
            let mut step = 0;
            futures_util::stream::poll_fn(move |cx| {
                step += 1;
                let chunk: &'static [u8] = match step {
                    1 => b"--Xy",
                    2 => {
                        cx.waker().wake_by_ref();
                        return std::task::Poll::Pending;
                    }
                    3 => b"Z\r\nContent-Disposition: form-data; name=\"version\"\r\n\r\n1.0.0\r\n--XyZ--\r\n",
                    _ => return std::task::Poll::Ready(None),
                };
                std::task::Poll::Ready(Some(Ok(bytes::Bytes::from_static(chunk))))
            })
        }
        async fn first_field(body: axum::body::Body) -> Result<String, String> {
            let req = axum::http::Request::builder()
                .header("content-type", "multipart/form-data; boundary=XyZ")
                .body(body)
                .unwrap();
            let mut mp = axum::extract::Multipart::from_request(req, &())
                .await
                .unwrap();
            let f = mp.next_field().await.map_err(|e| e.body_text())?.unwrap();
            f.text().await.map_err(|e| e.body_text())
        }
        assert_eq!(
            first_field(axum::body::Body::from_stream(end_one_poll_late(stream())))
                .await
                .unwrap(),
            "1.0.0"
        );
        // without the delay multer fails this body (when this starts failing, multer was fixed
        // and the delay can go)
        assert!(
            first_field(axum::body::Body::from_stream(stream()))
                .await
                .is_err()
        );
    }

    fn body(header_len: usize) -> Vec<u8> {
        let mut b = b"--XyZ\r\nContent-Disposition: form-data; name=\"version\"\r\n".to_vec();
        b.extend(std::iter::repeat_n(b'a', header_len));
        b.extend_from_slice(
            b"\r\n\r\n1.0.0\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n",
        );
        b.extend(std::iter::repeat_n(b'\n', 50_000));
        b.extend_from_slice(b"\r\n--XyZ--\r\n");
        b
    }

    fn run(b: &[u8], chunk: usize, limit: usize) -> Result<(), HeadersTooLong> {
        let mut g = PartGuard::with_limit("XyZ", limit);
        b.chunks(chunk).try_for_each(|c| g.feed(c))
    }

    #[test]
    fn short_headers_pass_in_any_chunking() {
        let b = body(100);
        for chunk in [1, 2, 3, 7, 64, 1000, b.len()] {
            assert_eq!(run(&b, chunk, 256), Ok(()), "chunk {chunk}");
        }
    }

    #[test]
    fn long_headers_are_refused_in_any_chunking() {
        let b = body(1000);
        for chunk in [1, 2, 3, 7, 64, 1000, b.len()] {
            assert!(run(&b, chunk, 256).is_err(), "chunk {chunk}");
        }
    }

    #[test]
    fn a_file_body_of_any_size_is_not_headers() {
        // 50,000 bytes of file data after a short header block, limit 256
        assert_eq!(run(&body(0), 4096, 256), Ok(()));
    }

    #[test]
    fn endless_headers_without_a_blank_line_are_refused() {
        let mut b = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n".to_vec();
        b.extend(std::iter::repeat_n(b'x', 10_000));
        assert!(run(&b, 333, 256).is_err());
    }
}
