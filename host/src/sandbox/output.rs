//! The job's log: guest stdout, stderr and `log` lines, captured in one
//! bounded buffer.
//!
//! A guest that prints without end must not grow the worker's memory, and
//! must not be killed for printing either (a full pipe would make Rust's
//! `println!` panic): past the cap, output is counted and dropped, and the
//! log ends with a note saying how much was dropped.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Debug, Default)]
struct Buffer {
    text: Vec<u8>,
    cap: usize,
    dropped: u64,
}

impl Buffer {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.text.len());
        let take = room.min(bytes.len());
        self.text.extend_from_slice(&bytes[..take]);
        self.dropped += (bytes.len() - take) as u64;
    }
}

/// A bounded, shared log buffer. Clones write to the same buffer.
#[derive(Debug, Clone)]
pub struct JobLog {
    inner: Arc<Mutex<Buffer>>,
}

impl JobLog {
    /// A log keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        JobLog {
            inner: Arc::new(Mutex::new(Buffer {
                cap,
                ..Buffer::default()
            })),
        }
    }

    /// Append raw bytes (stdout/stderr).
    pub fn write(&self, bytes: &[u8]) {
        self.lock().push(bytes);
    }

    /// Append one line.
    pub fn line(&self, line: &str) {
        let mut b = self.lock();
        b.push(line.as_bytes());
        b.push(b"\n");
    }

    /// The captured text, with a note if output was dropped.
    pub fn text(&self) -> String {
        let b = self.lock();
        let mut text = String::from_utf8_lossy(&b.text).into_owned();
        if b.dropped > 0 {
            text.push_str(&format!(
                "\n[wasmq: log truncated, {} bytes dropped]\n",
                b.dropped
            ));
        }
        text
    }

    /// The last `n` lines, for error messages (e.g. a panic message).
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl IsTerminal for JobLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for JobLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for JobLog {
    async fn ready(&mut self) {}
}

impl OutputStream for JobLog {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        JobLog::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: excess is dropped, never refused.
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for JobLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        JobLog::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_bounded_and_says_so() {
        let log = JobLog::new(10);
        log.write(b"0123456789abcdef");
        assert!(log
            .text()
            .starts_with("0123456789\n[wasmq: log truncated, 6 bytes dropped]"));
    }
}
