//! The wire tap: what the server sends on a pooled connection, seen as the
//! bytes arrive, before tokio-postgres reads them.
//!
//! Owns [`Wire`] (one per connection, shared with the host side) and
//! [`Tap`] (the stream wrapper that feeds it). Why it exists:
//! tokio-postgres keeps to itself the transaction status PostgreSQL
//! reports with every ReadyForQuery, and it reads a whole message into
//! memory before looking at it (one 200 MB value is one 200 MB DataRow).
//! The tap reads each backend message's header (tag and length) as it
//! passes, so:
//! - the host learns the server's transaction status (`I` idle, `T` in a
//!   transaction block, `E` in a failed one) from each ReadyForQuery, not
//!   from reading the guest's SQL;
//! - the bytes the server sends between two ReadyForQuery messages (one
//!   request's answer: rows, notices, errors) are counted as they arrive;
//!   a message is counted whole when its 5-byte header arrives, and once
//!   the count passes [`limits::MAX_DB_RESULT_BYTES`] the read fails
//!   without handing the bytes on. tokio-postgres then drops the
//!   connection (the server stops the statement when it cannot send), so
//!   no more than the cap and one read buffer are ever in memory;
//! - COPY, which the interface does not carry and which would leave the
//!   connection waiting for data, fails the read the same way.
//!
//! Invariants: exactly one tap parses a connection's messages, the one
//! that sees them in plaintext: on a plaintext connection the socket's;
//! under TLS the one above the TLS stream (the socket's sees ciphertext
//! once the server accepts TLS, and only passes it on). A tripped wire
//! stays tripped; its connection is never reused.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsStream};

use crate::limits;

/// Why a tap stopped a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trip {
    /// One request's answer passed [`limits::MAX_DB_RESULT_BYTES`].
    TooBig = 1,
    /// The server started a COPY.
    Copy = 2,
    /// A message length no server sends.
    Malformed = 3,
}

impl Trip {
    /// What the guest is told; names the limit and the fix.
    pub(super) fn message(self) -> String {
        match self {
            Trip::TooBig => format!(
                "the query's result passed {} bytes; select less (the connection is closed)",
                limits::MAX_DB_RESULT_BYTES
            ),
            Trip::Copy => "COPY is not carried by the postgres interface; use INSERT and \
                           SELECT (the connection is closed)"
                .into(),
            Trip::Malformed => {
                "the database sent a malformed message (the connection is closed)".into()
            }
        }
    }

    fn from_code(code: u8) -> Option<Trip> {
        match code {
            1 => Some(Trip::TooBig),
            2 => Some(Trip::Copy),
            3 => Some(Trip::Malformed),
            _ => None,
        }
    }
}

/// What the tap learnt about one connection. Shared by its tap (writer)
/// and the host (reader).
#[derive(Debug)]
pub(super) struct Wire {
    /// The status byte of the last ReadyForQuery (0 before the first).
    status: AtomicU8,
    /// A [`Trip`] code, 0 while none.
    tripped: AtomicU8,
    /// Most bytes between two ReadyForQuery messages.
    limit: usize,
}

impl Wire {
    pub(super) fn new() -> Arc<Wire> {
        Wire::with_limit(limits::MAX_DB_RESULT_BYTES)
    }

    fn with_limit(limit: usize) -> Arc<Wire> {
        Arc::new(Wire {
            status: AtomicU8::new(0),
            tripped: AtomicU8::new(0),
            limit,
        })
    }

    /// The transaction status the server last reported: `b'I'`, `b'T'` or
    /// `b'E'`. Current once tokio-postgres has read a request's
    /// ReadyForQuery (the tap saw it first).
    pub(super) fn status(&self) -> u8 {
        self.status.load(Ordering::Acquire)
    }

    /// Why the connection was stopped, if it was.
    pub(super) fn tripped(&self) -> Option<Trip> {
        Trip::from_code(self.tripped.load(Ordering::Acquire))
    }

    fn trip(&self, why: Trip) {
        let _ = self
            .tripped
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Where in the server's byte stream a tap is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// The one-byte answer to SSLRequest comes next: `S` means TLS (this
    /// tap then sees only ciphertext), anything else plaintext messages.
    SslReply,
    /// Tagged messages: tag, length (itself included), body.
    Framed,
    /// Not this tap's to read (TLS records).
    Opaque,
}

/// The message-header reader (no I/O: fed the bytes a read returned).
#[derive(Debug)]
struct Frames {
    phase: Phase,
    header: [u8; 5],
    /// Header bytes gathered so far.
    have: usize,
    /// Body bytes of the current message still to come.
    left: usize,
    tag: u8,
    /// Bytes since the last ReadyForQuery, whole messages counted.
    since_ready: usize,
}

impl Frames {
    fn new(phase: Phase) -> Frames {
        Frames {
            phase,
            header: [0; 5],
            have: 0,
            left: 0,
            tag: 0,
            since_ready: 0,
        }
    }

    fn feed(&mut self, mut bytes: &[u8], wire: &Wire) -> Result<(), Trip> {
        while !bytes.is_empty() {
            match self.phase {
                Phase::Opaque => return Ok(()),
                Phase::SslReply => {
                    self.phase = if bytes[0] == b'S' {
                        Phase::Opaque
                    } else {
                        Phase::Framed
                    };
                    bytes = &bytes[1..];
                }
                Phase::Framed if self.left > 0 => {
                    let n = self.left.min(bytes.len());
                    if self.tag == b'Z' {
                        // Its body is the one status byte (checked below).
                        wire.status.store(bytes[0], Ordering::Release);
                    }
                    self.left -= n;
                    bytes = &bytes[n..];
                    if self.left == 0 {
                        self.end_message();
                    }
                }
                Phase::Framed => {
                    let n = (5 - self.have).min(bytes.len());
                    self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                    self.have += n;
                    bytes = &bytes[n..];
                    if self.have == 5 {
                        self.have = 0;
                        self.start_message(wire.limit)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn start_message(&mut self, limit: usize) -> Result<(), Trip> {
        self.tag = self.header[0];
        let len = u32::from_be_bytes([
            self.header[1],
            self.header[2],
            self.header[3],
            self.header[4],
        ]) as usize;
        if len < 4 || (self.tag == b'Z' && len != 5) {
            return Err(Trip::Malformed);
        }
        // CopyInResponse, CopyOutResponse, CopyBothResponse.
        if matches!(self.tag, b'G' | b'H' | b'W') {
            return Err(Trip::Copy);
        }
        self.since_ready = self.since_ready.saturating_add(1 + len);
        if self.since_ready > limit {
            return Err(Trip::TooBig);
        }
        self.left = len - 4;
        if self.left == 0 {
            self.end_message();
        }
        Ok(())
    }

    fn end_message(&mut self) {
        if self.tag == b'Z' {
            self.since_ready = 0;
        }
    }
}

/// A stream that shows the server's bytes to a [`Wire`] on their way to
/// tokio-postgres (see the module docs). Writes pass through untouched.
pub(super) struct Tap<S> {
    inner: S,
    frames: Frames,
    wire: Arc<Wire>,
}

impl<S> Tap<S> {
    /// `inner`, whose server bytes start in `phase`.
    pub(super) fn new(inner: S, phase: Phase, wire: Arc<Wire>) -> Tap<S> {
        Tap {
            inner,
            frames: Frames::new(phase),
            wire,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(why) = self.wire.tripped() {
            return Poll::Ready(Err(io::Error::other(why.message())));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let this = &mut *self;
        if let Err(why) = this.frames.feed(&buf.filled()[before..], &this.wire) {
            this.wire.trip(why);
            // Not handed on: tokio-postgres never buffers the message.
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::other(why.message())));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for Tap<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Feed `bytes` one byte at a time (the worst split a socket makes).
    fn feed_bytewise(frames: &mut Frames, bytes: &[u8], wire: &Wire) -> Result<(), Trip> {
        bytes.chunks(1).try_for_each(|b| frames.feed(b, wire))
    }

    #[test]
    fn the_status_of_each_ready_for_query_is_seen_however_the_bytes_are_split() {
        let wire = Wire::with_limit(1000);
        let mut frames = Frames::new(Phase::SslReply);
        let mut stream = vec![b'N']; // no TLS: plaintext messages follow
        stream.extend(message(b'C', b"BEGIN\0"));
        stream.extend(message(b'Z', b"T"));
        feed_bytewise(&mut frames, &stream, &wire).unwrap();
        assert_eq!(wire.status(), b'T');
        let mut stream = message(b'E', b"Sxx\0\0");
        stream.extend(message(b'Z', b"E"));
        frames.feed(&stream, &wire).unwrap();
        assert_eq!(wire.status(), b'E');
        frames.feed(&message(b'Z', b"I"), &wire).unwrap();
        assert_eq!(wire.status(), b'I');
    }

    #[test]
    fn an_answer_over_the_limit_trips_at_the_header_of_the_message_that_passes_it() {
        let wire = Wire::with_limit(100);
        let mut frames = Frames::new(Phase::Framed);
        // Counted per request: each ReadyForQuery starts again.
        for _ in 0..10 {
            frames.feed(&message(b'D', &[0; 40]), &wire).unwrap();
            frames.feed(&message(b'Z', b"I"), &wire).unwrap();
        }
        frames.feed(&message(b'D', &[0; 40]), &wire).unwrap();
        // A 200 MB DataRow: refused from its first 5 bytes.
        let mut header = vec![b'D'];
        header.extend_from_slice(&200_000_000u32.to_be_bytes());
        assert_eq!(frames.feed(&header, &wire), Err(Trip::TooBig));
    }

    #[test]
    fn copy_and_malformed_lengths_trip_and_tls_is_left_to_the_tap_above() {
        let wire = Wire::with_limit(1000);
        let mut frames = Frames::new(Phase::Framed);
        assert_eq!(frames.feed(&message(b'H', &[0; 3]), &wire), Err(Trip::Copy));
        let mut frames = Frames::new(Phase::Framed);
        assert_eq!(
            frames.feed(&[b'D', 0, 0, 0, 2], &wire),
            Err(Trip::Malformed)
        );
        // After `S`, ciphertext: nothing is read as a message.
        let mut frames = Frames::new(Phase::SslReply);
        frames.feed(b"S\x16\x03\x03\xff\xff", &wire).unwrap();
        frames.feed(&[b'Z'; 64], &wire).unwrap();
        assert_eq!(wire.status(), 0);
    }
}
