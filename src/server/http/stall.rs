//! A send timeout for every HTTP connection, as nginx's `send_timeout`: a client that takes no
//! byte for [`SendTimeout::limit`] while the appliance has something to send is cut off. Without
//! it a client that stops reading (a hung browser tab on the event stream, a download stalled
//! on purpose) holds its connection, its task and its buffers for ever.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A connection's socket with the send timeout.
pub struct SendTimeout<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    cut: Arc<AtomicU64>,
}

impl<T> SendTimeout<T> {
    /// Wraps `inner`; `cut` counts connections ended by the timeout.
    pub fn new(inner: T, limit: Duration, cut: Arc<AtomicU64>) -> SendTimeout<T> {
        SendTimeout {
            inner,
            limit,
            stalled: None,
            cut,
        }
    }

    /// After the socket took nothing: the error once the limit has passed since it last did.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            self.cut.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing for the send timeout",
            )));
        }
        Poll::Pending
    }

    fn progressed<R>(
        &mut self,
        r: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progressed(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progressed(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progressed(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_is_cut_off_after_the_limit() {
        // a pipe with a 64-byte buffer that nobody reads
        let (a, _b) = tokio::io::duplex(64);
        let cut = Arc::new(AtomicU64::new(0));
        let mut w = SendTimeout::new(a, Duration::from_secs(60), cut.clone());
        let t0 = tokio::time::Instant::now();
        let err = w.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(60));
        assert_eq!(cut.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_is_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let cut = Arc::new(AtomicU64::new(0));
        let mut w = SendTimeout::new(a, Duration::from_secs(60), cut.clone());
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 16];
            let mut n = 0;
            while n < 1024 {
                tokio::time::sleep(Duration::from_secs(30)).await;
                n += b.read(&mut buf).await.unwrap();
            }
        });
        w.write_all(&[0u8; 1024]).await.unwrap();
        reader.await.unwrap();
        assert_eq!(cut.load(Ordering::Relaxed), 0);
    }
}
