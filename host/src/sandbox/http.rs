//! Outbound HTTP for guests (`wasi:http/outgoing-handler`): deny by default.
//!
//! Every request is checked here, in the host, never trusting the guest:
//! 1. the allow-list: the URL's host and port must match a `host` or
//!    `host:port` entry of the job's policy;
//! 2. the job's requests in flight must stay within `max_concurrent_requests`;
//! 3. the host is resolved here ([`addr`]) and every address checked: a
//!    loopback, private, link-local, unique-local, CGNAT or unspecified
//!    address is refused unless an IP-literal allow-list entry names exactly
//!    it or the policy sets `allow_private_networks`;
//! 4. [`client`] connects to an address checked in step 3 (never to a second
//!    DNS answer: DNS rebinding), and fails a response body larger than
//!    `max_response_bytes`.
//!
//! A refused request fails inside the guest (`HTTP-request-denied`,
//! `destination-IP-prohibited`, or `HTTP-response-body-size` for an oversized
//! body) and is recorded in [`Denials`], so the job ends in the `denied`
//! category even if the guest swallows or rewraps the error.
//!
//! wasi:http never follows redirects; the guest SDK does, and each hop is a
//! new request that passes every check again.
//!
//! Every connection's bytes, both ways, are counted into the job's
//! [`Traffic`] for usage metering.

mod addr;
mod client;
mod traffic;

pub use traffic::Traffic;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::Instrument;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use super::steps::{OpenSteps, IDEMPOTENCY_HEADER};
use crate::addresses::{ip_literal, parse_allow_entry, AllowEntry};
use crate::fence::LeaseWatch;
use crate::limits::MAX_REQUEST_HEADER_BYTES;
use crate::policy::SandboxPolicy;
use addr::{AddressPolicy, Unreachable};
use client::{BodyCap, Destination};

/// The W3C Trace Context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// How long to wait for a TCP connection (and for DNS, and for the TLS
/// handshake, each) before the request fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the first byte of the response, and at most between
/// two chunks of its body.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Capabilities a guest tried to use without a grant, in order.
#[derive(Debug, Clone, Default)]
pub struct Denials {
    inner: Arc<Mutex<Vec<String>>>,
}

impl Denials {
    /// Record one refusal.
    pub fn record(&self, what: String) {
        tracing::debug!(%what, "capability denied");
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    /// The first refusal, if any.
    pub fn first(&self) -> Option<String> {
        self.all().into_iter().next()
    }

    /// Every refusal, in order.
    pub fn all(&self) -> Vec<String> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The job's count of outbound requests in flight, with its cap.
#[derive(Debug, Clone)]
struct InFlight {
    count: Arc<AtomicUsize>,
    max: usize,
}

/// One request's place in [`InFlight`], given back on drop (when its
/// response body is finished or dropped, or the request fails).
pub struct Slot(Arc<AtomicUsize>);

impl InFlight {
    fn new(max: usize) -> Self {
        InFlight {
            count: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// A slot, or `None` when `max` requests are already in flight.
    fn try_acquire(&self) -> Option<Slot> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The outbound-HTTP hooks installed in each job's store (one per job, so
/// the in-flight count is per job).
pub struct AllowListHooks {
    allowed: Vec<AllowEntry>,
    addresses: AddressPolicy,
    max_response_bytes: u64,
    in_flight: InFlight,
    denials: Denials,
    traffic: Traffic,
    /// The steps the guest is inside: requests made in one carry its
    /// idempotency token.
    steps: OpenSteps,
    /// Whether the job's delivery still holds its lease: once it does not,
    /// nothing more goes out for the job.
    lease: Arc<LeaseWatch>,
    /// The run's W3C `traceparent`, sent on every request that does not
    /// carry one of the guest's.
    traceparent: Option<http::HeaderValue>,
    /// The same, parsed: the parent of each request's client span.
    run_trace: Option<crate::trace_context::TraceParent>,
}

impl AllowListHooks {
    /// Hooks enforcing `policy`'s HTTP grants and limits; refusals go to
    /// `denials`; requests inside one of `steps` carry its token; nothing
    /// goes out once `lease` is lost. Fails, naming the entry, on a
    /// malformed allow-list entry.
    pub fn new(
        policy: &SandboxPolicy,
        denials: Denials,
        steps: OpenSteps,
        lease: Arc<LeaseWatch>,
    ) -> Result<Self, String> {
        let allowed: Vec<AllowEntry> = policy
            .allow_http
            .iter()
            .map(|e| parse_allow_entry(e))
            .collect::<Result<_, _>>()?;
        let explicit = allowed
            .iter()
            .filter_map(|a| Some((ip_literal(&a.host)?, a.port)))
            .collect();
        Ok(AllowListHooks {
            allowed,
            addresses: AddressPolicy {
                explicit,
                allow_private_networks: policy.allow_private_networks,
                literal_grants: policy.literal_private_grants,
            },
            max_response_bytes: policy.max_response_bytes,
            in_flight: InFlight::new(policy.max_concurrent_requests),
            denials,
            traffic: Traffic::default(),
            steps,
            lease,
            traceparent: None,
            run_trace: None,
        })
    }

    /// These hooks, sending `traceparent` (the run's span in the
    /// producer's trace) on the job's requests.
    pub fn with_traceparent(mut self, traceparent: Option<&str>) -> Self {
        self.traceparent = traceparent.and_then(|t| http::HeaderValue::from_str(t).ok());
        self.run_trace = traceparent.and_then(crate::trace_context::TraceParent::parse);
        self
    }

    /// The bytes the job's requests have sent and received so far.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    fn permits(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed
            .iter()
            .any(|a| a.host == host && a.port.is_none_or(|p| p == port))
    }
}

/// What [`WasiHttpHooks::send_request`] returns.
type SendFuture = Box<
    dyn Future<Output = Result<(http::Response<WasiBody>, client::IoFuture), HttpError>> + Send,
>;

impl WasiHttpHooks for AllowListHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        _ = fut;
        let uri = request.uri();
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if !self.permits(&host, port) {
            self.denials.record(format!(
                "outbound HTTP to {host}:{port} (not in the task's allow-list)"
            ));
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        if !self.lease.held() {
            // Not the guest's doing: the run ends as a lost lease (its job
            // goes back, or belongs to another delivery already), never as
            // a refused capability.
            self.lease.lose();
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let header_bytes: usize = request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        if header_bytes > MAX_REQUEST_HEADER_BYTES {
            self.denials.record(format!(
                "outbound HTTP to {host}:{port} with {header_bytes} bytes of headers (the limit is \
                 {MAX_REQUEST_HEADER_BYTES})"
            ));
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        if let Some(token) = self.steps.current_token() {
            if !request.headers().contains_key(IDEMPOTENCY_HEADER) {
                if let Ok(value) = http::HeaderValue::from_str(&token) {
                    request.headers_mut().insert(IDEMPOTENCY_HEADER, value);
                }
            }
        }
        let span = tracing::debug_span!(
            "http.request",
            otel.kind = "client",
            http.request.method = %request.method(),
            server.address = %host,
            server.port = port,
            http.response.status_code = tracing::field::Empty,
        );
        if !request.headers().contains_key(TRACEPARENT_HEADER) {
            // With spans exported, the request is a client span of the run
            // and the server sees that span as its parent; otherwise it
            // carries the run's own id.
            let value = crate::trace_context::join(&span, self.run_trace.as_ref())
                .and_then(|t| http::HeaderValue::from_str(&t.to_string()).ok())
                .or_else(|| self.traceparent.clone());
            if let Some(value) = value {
                request.headers_mut().insert(TRACEPARENT_HEADER, value);
            }
        }
        let Some(slot) = self.in_flight.try_acquire() else {
            self.denials.record(format!(
                "outbound HTTP to {host}:{port} (the job already has {} requests in flight; \
                 max_concurrent_requests)",
                self.in_flight.max
            ));
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        };
        let options = bounded_options(options);
        let addresses = self.addresses.clone();
        let denials = self.denials.clone();
        let max_bytes = self.max_response_bytes;
        let traffic = self.traffic.clone();
        Box::new(
            async move {
                let dns_timeout = options.connect_timeout.unwrap_or(CONNECT_TIMEOUT);
                let addrs = match addresses.resolve(&host, port, dns_timeout).await {
                    Ok(addrs) => addrs,
                    Err(Unreachable::Denied(why)) => {
                        denials.record(why);
                        return Err(HttpError::DestinationIpProhibited);
                    }
                    Err(Unreachable::Failed(e)) => return Err(e),
                };
                let dest = Destination {
                    host: &host,
                    port,
                    https,
                    addrs: &addrs,
                };
                let cap = BodyCap {
                    max_bytes,
                    denials,
                    _slot: slot,
                };
                let sent = client::send(request, dest, options, cap, traffic).await;
                if let Ok((response, _)) = &sent {
                    tracing::Span::current()
                        .record("http.response.status_code", response.status().as_u16());
                }
                sent
            }
            .instrument(span),
        )
    }
}

/// The guest's timeouts, capped by ours: a guest may ask to wait less, not more.
fn bounded_options(asked: Option<RequestOptions>) -> RequestOptions {
    let asked = asked.unwrap_or_default();
    let cap = |t: Option<Duration>, max: Duration| Some(t.map_or(max, |t| t.min(max)));
    RequestOptions {
        connect_timeout: cap(asked.connect_timeout, CONNECT_TIMEOUT),
        first_byte_timeout: cap(asked.first_byte_timeout, FIRST_BYTE_TIMEOUT),
        between_bytes_timeout: cap(asked.between_bytes_timeout, FIRST_BYTE_TIMEOUT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> SandboxPolicy {
        SandboxPolicy {
            allow_http: entries.iter().map(|s| s.to_string()).collect(),
            ..SandboxPolicy::default()
        }
    }

    fn hooks(entries: &[&str]) -> AllowListHooks {
        AllowListHooks::new(
            &policy(entries),
            Denials::default(),
            OpenSteps::default(),
            Arc::new(LeaseWatch::unbounded()),
        )
        .unwrap()
    }

    #[test]
    fn allow_list_matches_host_and_port() {
        let h = hooks(&["127.0.0.1:8080", "example.com", "[::1]:9000"]);
        assert!(h.permits("127.0.0.1", 8080));
        assert!(!h.permits("127.0.0.1", 8081));
        assert!(h.permits("EXAMPLE.com", 443));
        assert!(h.permits("::1", 9000));
        assert!(!h.permits("evil.com", 80));
        assert!(hooks(&["[::1]"]).permits("::1", 1234), "brackets, no port");
    }

    #[test]
    fn bad_entries_are_named() {
        let err = AllowListHooks::new(
            &policy(&["host:port"]),
            Denials::default(),
            OpenSteps::default(),
            Arc::new(LeaseWatch::unbounded()),
        )
        .err()
        .unwrap();
        assert!(err.contains("host:port"));
    }

    #[test]
    fn ip_literal_entries_are_explicit_grants() {
        let h = hooks(&["127.0.0.1:8080", "localhost", "[::1]"]);
        assert_eq!(
            h.addresses.explicit,
            vec![
                ("127.0.0.1".parse().unwrap(), Some(8080)),
                ("::1".parse().unwrap(), None)
            ]
        );
    }

    #[test]
    fn in_flight_requests_are_capped_and_slots_come_back() {
        let in_flight = InFlight::new(2);
        let a = in_flight.try_acquire().expect("first");
        let b = in_flight.try_acquire().expect("second");
        assert!(in_flight.try_acquire().is_none(), "third is over the cap");
        drop(a);
        let c = in_flight
            .try_acquire()
            .expect("a finished request frees its slot");
        assert!(in_flight.try_acquire().is_none());
        drop((b, c));
        assert_eq!(in_flight.count.load(Ordering::Acquire), 0);
        assert!(InFlight::new(0).try_acquire().is_none(), "zero allows none");
    }

    #[test]
    fn guest_timeouts_are_capped_by_ours() {
        let asked = RequestOptions {
            connect_timeout: Some(Duration::from_secs(1)),
            first_byte_timeout: Some(Duration::from_secs(3600)),
            between_bytes_timeout: None,
        };
        let got = bounded_options(Some(asked));
        assert_eq!(got.connect_timeout, Some(Duration::from_secs(1)));
        assert_eq!(got.first_byte_timeout, Some(FIRST_BYTE_TIMEOUT));
        assert_eq!(got.between_bytes_timeout, Some(FIRST_BYTE_TIMEOUT));
    }
}
