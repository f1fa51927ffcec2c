//! Metering of a job's network traffic: the bytes its outbound HTTP
//! connections write and read, counted on the TCP stream itself (below TLS),
//! so headers, bodies, retries and redirect hops are all included, as a cloud
//! provider bills them.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One job's byte counts, shared by all of its connections.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

impl Traffic {
    /// Bytes written to the network so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes read from the network so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Add what a write reports as written; pass the result on.
    fn count_sent(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = polled {
            self.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

/// A stream that adds what passes through it to a [`Traffic`].
pub struct Metered<S> {
    inner: S,
    traffic: Traffic,
}

impl<S> Metered<S> {
    /// Count `inner`'s traffic into `traffic`.
    pub fn new(inner: S, traffic: Traffic) -> Self {
        Metered { inner, traffic }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        this.traffic
            .received
            .fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        this.traffic.count_sent(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.traffic.count_sent(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn both_directions_are_counted() {
        let (near, mut far) = tokio::io::duplex(64);
        let traffic = Traffic::default();
        let mut metered = Metered::new(near, traffic.clone());
        metered.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        far.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let mut buf = [0u8; 17];
        metered.read_exact(&mut buf).await.unwrap();
        assert_eq!((traffic.sent(), traffic.received()), (18, 17));
    }
}
