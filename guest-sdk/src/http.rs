//! Blocking outbound HTTP over `wasi:http/outgoing-handler`.
//!
//! Each call sends one request and reads the whole response body into
//! memory. The host decides which destinations a task may reach (deny by
//! default); a refused destination is [`HttpError::Denied`], which `?` turns
//! into the task error kind `"denied"`. Connection failures and timeouts are
//! [`HttpError::Network`] → kind `"network"`, so a retry policy can list
//! `"network"` among its auto-retry kinds. HTTP error statuses (4xx, 5xx)
//! are not errors here: they come back as a [`Response`] for the task to
//! judge.
//!
//! Redirects (301, 302, 303, 307, 308 with a `location`) are followed, up to
//! [`MAX_REDIRECTS`], as browsers and common HTTP clients do: 303, and 301 or
//! 302 after a POST, continue as a GET without a body; 307 and 308 repeat the
//! method and body. `authorization`, `cookie` and `proxy-authorization` are
//! not sent on to another host. Every hop is a new request that the host
//! checks against the allow-list again, so a redirect to a destination the
//! task may not reach fails with [`HttpError::Denied`].
//!
//! The calls block the guest, not the worker: the host runs them on async
//! WASI, and time spent waiting costs no fuel.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use wasip2::io::streams::StreamError;

use crate::TaskError;

/// Bytes asked for per read of the response body.
const READ_CHUNK: u64 = 64 * 1024;
/// Most bytes `blocking-write-and-flush` accepts per call (WASI limit).
const WRITE_CHUNK: usize = 4096;
/// Most redirects followed for one call (browsers allow about 20; five is
/// plenty for an API and bounds a redirect loop quickly).
pub const MAX_REDIRECTS: usize = 5;
/// Headers that carry credentials: never forwarded to another host.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// A complete HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code (200, 404, ...).
    pub status: u16,
    /// Response headers in the order received; names are lower-case, values
    /// decoded as UTF-8 (lossily).
    pub headers: Vec<(String, String)>,
    /// The whole response body.
    pub body: Vec<u8>,
}

impl Response {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name` (case-insensitive), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text; invalid UTF-8 is replaced with U+FFFD.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON into `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            HttpError::Other(format!(
                "response body (status {}) is not the expected JSON: {e}",
                self.status
            ))
        })
    }
}

/// Why an HTTP request produced no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The host refused the destination (not on the task's allow-list).
    /// Converts to task error kind `"denied"`.
    Denied(String),
    /// DNS failure, refused or dropped connection, or timeout: worth
    /// retrying later. Converts to task error kind `"network"`.
    Network(String),
    /// The request itself is malformed (URL, method, header). Converts to a
    /// permanent failure: sending it again cannot help.
    Invalid(String),
    /// Anything else (TLS, protocol errors, an unparsable body). Converts to
    /// task error kind `"http"`, for the retry policy to decide.
    Other(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(m) => write!(f, "HTTP request denied: {m}"),
            HttpError::Network(m) => write!(f, "network error: {m}"),
            HttpError::Invalid(m) => write!(f, "invalid HTTP request: {m}"),
            HttpError::Other(m) => write!(f, "HTTP error: {m}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// Denied → kind `"denied"`, network → kind `"network"`, invalid → fail,
/// other → kind `"http"`.
impl From<HttpError> for TaskError {
    fn from(e: HttpError) -> Self {
        let message = e.to_string();
        match e {
            HttpError::Denied(_) => TaskError::kind(TaskError::DENIED, message),
            HttpError::Network(_) => TaskError::kind(TaskError::NETWORK, message),
            HttpError::Invalid(_) => TaskError::fail(message),
            HttpError::Other(_) => TaskError::kind("http", message),
        }
    }
}

/// `GET url`.
pub fn get(url: &str) -> Result<Response, HttpError> {
    request("GET", url, &[], &[])
}

/// `POST url` with `body` serialized as JSON (`content-type:
/// application/json`).
pub fn post_json(url: &str, body: &impl Serialize) -> Result<Response, HttpError> {
    let body = serde_json::to_vec(body)
        .map_err(|e| HttpError::Invalid(format!("request body does not serialize: {e}")))?;
    request("POST", url, &[("content-type", "application/json")], &body)
}

/// Sends `method url` with `headers` and `body` (empty for none), follows
/// redirects (see the module docs) and reads the whole final response.
/// `url` is `http://` or `https://`, with an optional port, path and query;
/// a fragment is ignored.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, HttpError> {
    let first = format!("{method} {url}");
    let mut method = method.to_string();
    let mut url = url.to_string();
    let mut headers: Vec<(&str, &str)> = headers.to_vec();
    let mut body = body;
    for hop in 0..=MAX_REDIRECTS {
        let what = if hop == 0 {
            first.clone()
        } else {
            format!("{first} (redirected to {method} {url})")
        };
        let resp = send(&method, &url, &headers, body).map_err(|e| e.context(&what))?;
        let Some(location) = redirect_location(&resp) else {
            return Ok(resp);
        };
        if hop == MAX_REDIRECTS {
            return Err(HttpError::Other(format!(
                "{what}: more than {MAX_REDIRECTS} redirects (the last to {location})"
            )));
        }
        let next = resolve_location(&url, location).map_err(|e| e.context(&what))?;
        if !same_origin(&url, &next) {
            headers.retain(|(n, _)| !CREDENTIAL_HEADERS.iter().any(|c| n.eq_ignore_ascii_case(c)));
        }
        let as_get = resp.status == 303
            || (matches!(resp.status, 301 | 302) && method.eq_ignore_ascii_case("POST"));
        if as_get && !method.eq_ignore_ascii_case("HEAD") {
            method = "GET".to_string();
            body = &[];
            headers.retain(|(n, _)| {
                !n.eq_ignore_ascii_case("content-type") && !n.eq_ignore_ascii_case("content-length")
            });
        }
        url = next;
    }
    unreachable!("the loop returns by its last hop")
}

/// The `location` of a redirect response, if it is one.
fn redirect_location(resp: &Response) -> Option<&str> {
    match resp.status {
        301 | 302 | 303 | 307 | 308 => resp.header("location").filter(|l| !l.is_empty()),
        _ => None,
    }
}

/// `location` made absolute against `base` (RFC 3986 reference forms:
/// absolute URL, `//authority/path`, `/path`, `?query`, relative path).
fn resolve_location(base: &str, location: &str) -> Result<String, HttpError> {
    let location = location.trim();
    if let Some((scheme, _)) = location.split_once("://") {
        if !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Ok(location.to_string());
        }
    }
    let (scheme, rest) = base
        .split_once("://")
        .ok_or_else(|| HttpError::Invalid(format!("URL {base:?}: expected http:// or https://")))?;
    if let Some(authority_path) = location.strip_prefix("//") {
        return Ok(format!("{scheme}://{authority_path}"));
    }
    let rest = rest.split('#').next().unwrap_or_default();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path_query) = rest.split_at(end);
    let path = path_query.split('?').next().unwrap_or_default();
    let origin = format!("{scheme}://{authority}");
    Ok(if location.starts_with('/') {
        format!("{origin}{location}")
    } else if location.starts_with('?') {
        let path = if path.is_empty() { "/" } else { path };
        format!("{origin}{path}{location}")
    } else {
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{origin}{dir}{location}")
    })
}

/// Same scheme and authority (case-insensitive).
fn same_origin(a: &str, b: &str) -> bool {
    let origin = |u: &str| {
        let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        format!("{scheme}://{}", &rest[..end]).to_ascii_lowercase()
    };
    origin(a) == origin(b)
}

fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, HttpError> {
    let target = Target::parse(url)?;

    let entries: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    let fields = Fields::from_list(&entries)
        .map_err(|e| HttpError::Invalid(format!("headers rejected: {e:?}")))?;

    let req = OutgoingRequest::new(fields);
    let invalid = |what: &str| HttpError::Invalid(format!("{what} rejected"));
    req.set_method(&parse_method(method))
        .map_err(|()| invalid("method"))?;
    req.set_scheme(Some(&target.scheme))
        .map_err(|()| invalid("scheme"))?;
    req.set_authority(Some(&target.authority))
        .map_err(|()| invalid("host"))?;
    req.set_path_with_query(Some(&target.path_with_query))
        .map_err(|()| invalid("path"))?;

    // Take the body handle before sending: the request moves into `handle`.
    // The body is written after `handle` so the host is already consuming it
    // (writing a large body first could fill the pipe and never finish).
    let out_body = req.body().map_err(|()| invalid("body"))?;
    let pending = outgoing_handler::handle(req, None).map_err(from_code)?;

    let written = write_body(&out_body, body);
    let finished = OutgoingBody::finish(out_body, None).map_err(from_code);

    pending.subscribe().block();
    let resp = match pending.get() {
        Some(Ok(Ok(resp))) => resp,
        Some(Ok(Err(code))) => return Err(from_code(code)),
        // Not ready after `block`, or already taken: both host bugs.
        Some(Err(())) | None => return Err(HttpError::Other("response future misbehaved".into())),
    };
    // A failed body write usually shows as a failed response, reported
    // above with its real cause; if not, report the write failure.
    written?;
    finished?;

    let status = resp.status();
    let headers = resp
        .headers()
        .entries()
        .into_iter()
        .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    let incoming = resp
        .consume()
        .map_err(|()| HttpError::Other("response body already consumed".into()))?;
    let body = read_body(&incoming)?;
    // The trailers are not needed; finishing the body just releases it.
    drop(IncomingBody::finish(incoming));
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Writes all of `body` to the request body stream.
fn write_body(out_body: &OutgoingBody, body: &[u8]) -> Result<(), HttpError> {
    let stream = out_body
        .write()
        .map_err(|()| HttpError::Other("request body stream unavailable".into()))?;
    for chunk in body.chunks(WRITE_CHUNK) {
        stream
            .blocking_write_and_flush(chunk)
            .map_err(from_stream)?;
    }
    // The stream must be dropped before the body is finished.
    drop(stream);
    Ok(())
}

/// Reads the response body until the stream reports it is closed.
fn read_body(incoming: &IncomingBody) -> Result<Vec<u8>, HttpError> {
    let stream = incoming
        .stream()
        .map_err(|()| HttpError::Other("response body stream unavailable".into()))?;
    let mut body = Vec::new();
    loop {
        match stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(e) => return Err(from_stream(e)),
        }
    }
    // The stream is a child of the body and must go first.
    drop(stream);
    Ok(body)
}

/// The pieces of an absolute `http(s)://` URL that wasi-http sets apart.
struct Target {
    scheme: Scheme,
    authority: String,
    path_with_query: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, HttpError> {
        let bad = |why: &str| HttpError::Invalid(format!("URL {url:?}: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected http:// or https://"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return Err(bad("only http and https are supported")),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let path_with_query = match path.chars().next() {
            None => "/".to_string(),
            Some('?') => format!("/{path}"),
            Some(_) => path.to_string(),
        };
        Ok(Target {
            scheme,
            authority: authority.to_string(),
            path_with_query,
        })
    }
}

fn parse_method(method: &str) -> Method {
    match method.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        _ => Method::Other(method.to_string()),
    }
}

/// Classifies a wasi-http error code (see the module docs).
fn from_code(code: ErrorCode) -> HttpError {
    use ErrorCode as E;
    let message = format!("{code:?}");
    match code {
        E::HttpRequestDenied | E::DestinationIpProhibited => HttpError::Denied(message),
        E::DnsTimeout
        | E::DnsError(_)
        | E::DestinationNotFound
        | E::DestinationUnavailable
        | E::DestinationIpUnroutable
        | E::ConnectionRefused
        | E::ConnectionTerminated
        | E::ConnectionTimeout
        | E::ConnectionReadTimeout
        | E::ConnectionWriteTimeout
        | E::ConnectionLimitReached
        | E::HttpResponseIncomplete
        | E::HttpResponseTimeout => HttpError::Network(message),
        E::HttpRequestLengthRequired
        | E::HttpRequestBodySize(_)
        | E::HttpRequestMethodInvalid
        | E::HttpRequestUriInvalid
        | E::HttpRequestUriTooLong
        | E::HttpRequestHeaderSectionSize(_)
        | E::HttpRequestHeaderSize(_)
        | E::HttpRequestTrailerSectionSize(_)
        | E::HttpRequestTrailerSize(_) => HttpError::Invalid(message),
        _ => HttpError::Other(message),
    }
}

/// Classifies a body stream failure by the HTTP error code behind it.
fn from_stream(e: StreamError) -> HttpError {
    match e {
        StreamError::Closed => HttpError::Network("stream closed early".into()),
        StreamError::LastOperationFailed(io) => match wasip2::http::types::http_error_code(&io) {
            Some(code) => from_code(code),
            None => HttpError::Network(io.to_debug_string()),
        },
    }
}

impl HttpError {
    /// Prefixes the message with what was being done.
    fn context(self, what: &str) -> HttpError {
        match self {
            HttpError::Denied(m) => HttpError::Denied(format!("{what}: {m}")),
            HttpError::Network(m) => HttpError::Network(format!("{what}: {m}")),
            HttpError::Invalid(m) => HttpError::Invalid(format!("{what}: {m}")),
            HttpError::Other(m) => HttpError::Other(format!("{what}: {m}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(url: &str) -> (String, String, String) {
        let t = Target::parse(url).unwrap();
        let scheme = match t.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Other(_) => "other",
        };
        (scheme.into(), t.authority, t.path_with_query)
    }

    #[test]
    fn splits_urls() {
        let p = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        assert_eq!(
            parts("http://a.b:8080/x/y?q=1#frag"),
            p("http", "a.b:8080", "/x/y?q=1")
        );
        assert_eq!(parts("HTTPS://a.b"), p("https", "a.b", "/"));
        assert_eq!(parts("http://a.b?q"), p("http", "a.b", "/?q"));
        assert!(Target::parse("ftp://a.b/").is_err());
        assert!(Target::parse("a.b/x").is_err());
        assert!(Target::parse("http:///x").is_err());
    }

    #[test]
    fn resolves_redirect_locations() {
        let base = "http://a.b:8080/x/y?q=1";
        for (location, want) in [
            ("https://c.d/e", "https://c.d/e"),
            ("//c.d/e", "http://c.d/e"),
            ("/e?f", "http://a.b:8080/e?f"),
            ("?z=2", "http://a.b:8080/x/y?z=2"),
            ("z", "http://a.b:8080/x/z"),
        ] {
            assert_eq!(
                resolve_location(base, location).unwrap(),
                want,
                "{location}"
            );
        }
        assert_eq!(resolve_location("http://a.b", "z").unwrap(), "http://a.b/z");
        assert!(same_origin("http://A.b:1/x", "http://a.b:1/y?q"));
        assert!(!same_origin("http://a.b:1/x", "http://a.b:2/x"));
        assert!(!same_origin("http://a.b/x", "https://a.b/x"));
    }

    #[test]
    fn classifies_error_codes() {
        assert!(matches!(
            from_code(ErrorCode::HttpRequestDenied),
            HttpError::Denied(_)
        ));
        assert!(matches!(
            from_code(ErrorCode::ConnectionRefused),
            HttpError::Network(_)
        ));
        assert!(matches!(
            from_code(ErrorCode::HttpRequestUriInvalid),
            HttpError::Invalid(_)
        ));
        assert!(matches!(
            from_code(ErrorCode::TlsCertificateError),
            HttpError::Other(_)
        ));
        let kind = |e: HttpError| match TaskError::from(e) {
            TaskError::Kind { kind, .. } => kind,
            other => panic!("{other:?}"),
        };
        assert_eq!(kind(HttpError::Denied("x".into())), "denied");
        assert_eq!(kind(HttpError::Network("x".into())), "network");
    }
}
