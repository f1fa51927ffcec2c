//! W3C Trace Context (`traceparent`): what a producer puts in a job's
//! envelope and what a job's outgoing HTTP requests carry, so the calls a
//! task makes join the trace of the request that enqueued it.
//!
//! `00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>`, lowercase;
//! an all-zero trace or parent id is invalid (https://www.w3.org/TR/trace-context/).
//! A run is a span of its own: its requests carry the producer's trace id
//! with a new parent id (the run's span id) and the producer's flags.
//!
//! When spans are exported ([`crate::telemetry`]), these ids are the
//! exported spans' own: [`join`] makes a `tracing` span the child of a
//! `traceparent` and names the span in turn, so the producer's span, the
//! run's and each HTTP request's form one tree in the collector. Without a
//! collector, [`TraceParent::child`] mints the run's id and nothing is
//! exported.

use std::time::SystemTime;

use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState, Tracer};
use rand::RngCore;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A parsed `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits: the span this one is a child of.
    pub parent_id: String,
    /// 2 hex digits (`01`: sampled).
    pub flags: String,
}

fn hex_of(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceParent {
    /// Parse a `traceparent` header value; `None` when it is not one
    /// (version 00 is read; a later version's first four fields too, as the
    /// spec asks).
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let rest = parts.next();
        let valid = hex_of(version, 2)
            && version != "ff"
            && (version != "00" || rest.is_none())
            && hex_of(trace_id, 32)
            && trace_id.bytes().any(|b| b != b'0')
            && hex_of(parent_id, 16)
            && parent_id.bytes().any(|b| b != b'0')
            && hex_of(flags, 2);
        valid.then(|| TraceParent {
            trace_id: trace_id.into(),
            parent_id: parent_id.into(),
            flags: flags.into(),
        })
    }

    /// A child span of this one: same trace and flags, a new random span
    /// id as the parent of what it calls.
    pub fn child(&self) -> Self {
        let mut id = [0u8; 8];
        while id == [0; 8] {
            rand::rng().fill_bytes(&mut id);
        }
        TraceParent {
            trace_id: self.trace_id.clone(),
            parent_id: hex::encode(id),
            flags: self.flags.clone(),
        }
    }
}

/// With spans exported: make `span` (not yet entered) a child of `parent`
/// (when given; otherwise of the current span, as `tracing` does) and
/// return the `traceparent` that names `span`, for what it calls or
/// enqueues. `None` without a collector, or when `span` is disabled.
pub fn join(span: &tracing::Span, parent: Option<&TraceParent>) -> Option<TraceParent> {
    if !crate::telemetry::exporting() {
        return None;
    }
    if let Some(parent) = parent.and_then(TraceParent::span_context) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
    let context = span.context();
    let own = context.span().span_context().clone();
    own.is_valid().then(|| TraceParent {
        trace_id: own.trace_id().to_string(),
        parent_id: own.span_id().to_string(),
        flags: format!("{:02x}", own.trace_flags().to_u8()),
    })
}

/// With spans exported: a finished child span of `parent` named `name` that
/// ran from `start` to `end`, for work timed before its job was known (a
/// fetch round that leased the job).
pub fn past_child(parent: &tracing::Span, name: &'static str, start: SystemTime, end: SystemTime) {
    if !crate::telemetry::exporting() {
        return;
    }
    use opentelemetry::trace::Span as _;
    let tracer = opentelemetry::global::tracer("wasmq");
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .start_with_context(&tracer, &parent.context());
    span.end_with_timestamp(end);
}

impl TraceParent {
    /// The OpenTelemetry span context this names, as a remote parent.
    fn span_context(&self) -> Option<SpanContext> {
        let trace_id = opentelemetry::trace::TraceId::from_hex(&self.trace_id).ok()?;
        let span_id = opentelemetry::trace::SpanId::from_hex(&self.parent_id).ok()?;
        let flags = u8::from_str_radix(&self.flags, 16).ok()?;
        Some(SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(flags),
            true,
            TraceState::default(),
        ))
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00-{}-{}-{}", self.trace_id, self.parent_id, self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_spec_allows_and_nothing_else() {
        let t =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = t.child();
        assert_eq!(
            (child.trace_id.as_str(), child.flags.as_str()),
            (t.trace_id.as_str(), "01")
        );
        assert_ne!(child.parent_id, t.parent_id);
        assert!(TraceParent::parse(&child.to_string()).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?}");
        }
        assert!(TraceParent::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        )
        .is_some());
    }
}
