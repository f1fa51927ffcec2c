//! The HTTP/1.1 client every guest request goes through. It connects only to
//! addresses the caller has already checked ([`super::addr`]) and caps the
//! response body.
//!
//! Why not `wasmtime_wasi_http::default_send_request`: it connects to the
//! request's authority by name, resolving it a second time. That second DNS
//! answer may differ from the one we checked (DNS rebinding: public for the
//! check, 127.0.0.1 for the connection). Here the TCP connection goes to a
//! checked `SocketAddr`; TLS still verifies the certificate against the
//! *name*, so https works as usual. Otherwise this follows
//! `default_send_request` closely (same timeouts, same hyper http1 client).

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use super::traffic::{Metered, Traffic};
use super::{Denials, Slot};

/// The connection's I/O future, which wasmtime drives after the response
/// head has arrived (it carries the body).
pub type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;

/// A plain or TLS stream, boxed so both take one code path.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Where the request goes: the name as the guest wrote it (for TLS and
/// messages) and the checked addresses to connect to, in order.
pub struct Destination<'a> {
    /// Host as in the URL (a name or an IP literal, no brackets).
    pub host: &'a str,
    /// Port.
    pub port: u16,
    /// Whether to speak TLS.
    pub https: bool,
    /// Checked addresses; the first that accepts a connection is used.
    pub addrs: &'a [SocketAddr],
}

/// The response-size cap and what to do when it is hit.
pub struct BodyCap {
    /// Largest body accepted, in bytes.
    pub max_bytes: u64,
    /// Where an oversized response is recorded.
    pub denials: Denials,
    /// The job's in-flight slot, held until the body is finished or dropped.
    pub _slot: Slot,
}

impl BodyCap {
    fn refuse(&self, authority: &str) -> Error {
        self.denials.record(format!(
            "a response from {authority} larger than {} bytes (max_response_bytes)",
            self.max_bytes
        ));
        Error::HttpResponseBodySize(Some(self.max_bytes))
    }
}

/// Send `req` to `dest` with `options`' timeouts (all set by the caller),
/// counting the connection's bytes into `traffic`.
pub async fn send(
    mut req: http::Request<WasiBody>,
    dest: Destination<'_>,
    options: RequestOptions,
    cap: BodyCap,
    traffic: Traffic,
) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
    let connect_timeout = options.connect_timeout.unwrap_or(super::CONNECT_TIMEOUT);
    let first_byte_timeout = options
        .first_byte_timeout
        .unwrap_or(super::FIRST_BYTE_TIMEOUT);
    let between_bytes_timeout = options
        .between_bytes_timeout
        .unwrap_or(super::FIRST_BYTE_TIMEOUT)
        // `tokio::time::interval` panics on zero.
        .max(Duration::from_nanos(1));
    let authority = match dest.host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{}]:{}", dest.host, dest.port),
        Err(_) => format!("{}:{}", dest.host, dest.port),
    };

    let tcp = tokio::time::timeout(connect_timeout, connect(dest.addrs))
        .await
        .map_err(|_| Error::ConnectionTimeout)??;
    let tcp = Metered::new(tcp, traffic);
    let stream: Box<dyn Stream> = if dest.https {
        let name = rustls::pki_types::ServerName::try_from(dest.host.to_string())?;
        let tls = tokio::time::timeout(connect_timeout, crate::tls::connector().connect(name, tcp))
            .await
            .map_err(|_| Error::ConnectionTimeout)?
            .map_err(Error::Tls)?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;

    // On the wire the request line carries only the path (the `host` header,
    // set by wasmtime-wasi-http, carries the authority).
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;

    let response = async move {
        tokio::time::timeout(first_byte_timeout, sender.send_request(req))
            .await
            .map_err(|_| Error::ConnectionReadTimeout)?
            .map_err(Error::from)
    };
    // Drive the connection while waiting for the response head; whatever is
    // left of it (the body) is handed back for wasmtime to drive.
    let mut response = pin!(response);
    let mut conn = Some(conn);
    let res = poll_fn(|cx| match response.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(r),
        Poll::Pending => {
            let Some(c) = conn.as_mut() else {
                return Poll::Pending;
            };
            let done = ready!(Pin::new(c).poll(cx));
            conn = None;
            match done {
                Ok(()) => response.as_mut().poll(cx),
                Err(e) => Poll::Ready(Err(Error::from(e))),
            }
        }
    })
    .await?;

    // Refuse a declared oversized body before reading any of it.
    let declared = res
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap.max_bytes) {
        return Err(cap.refuse(&authority));
    }

    let mut between_bytes = tokio::time::interval(between_bytes_timeout);
    between_bytes.reset();
    let res = res.map(|incoming| {
        CappedBody {
            incoming,
            between_bytes,
            cap,
            authority,
            seen: 0,
            refused: false,
        }
        .boxed_unsync()
    });
    let io: IoFuture = Box::new(async move {
        match conn {
            None => Ok(()),
            Some(conn) => conn.await.map_err(|e| {
                if e.is_timeout() {
                    Error::HttpResponseTimeout
                } else {
                    Error::from(e)
                }
            }),
        }
    });
    Ok((res, io))
}

/// Connect to the first address that accepts.
async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, Error> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or(Error::DestinationNotFound, Error::Connect))
}

/// A response body that fails once it passes the cap, or when the server
/// goes quiet for longer than the between-bytes timeout.
struct CappedBody {
    incoming: Incoming,
    between_bytes: tokio::time::Interval,
    cap: BodyCap,
    authority: String,
    seen: u64,
    /// Set once the cap is hit: the refusal is recorded once and the body
    /// ends there.
    refused: bool,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.incoming).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) if e.is_timeout() => {
                Poll::Ready(Some(Err(Error::HttpResponseTimeout)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Error::from(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                this.between_bytes.reset();
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.cap.max_bytes {
                        this.refused = true;
                        return Poll::Ready(Some(Err(this.cap.refuse(&this.authority))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(this.between_bytes.poll_tick(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
