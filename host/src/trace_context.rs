//! W3C Trace Context (`traceparent`): what a producer puts in a job's
//! envelope and what a job's outgoing HTTP requests carry, so the calls a
//! task makes join the trace of the request that enqueued it.
//!
//! `00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>`, lowercase;
//! an all-zero trace or parent id is invalid (https://www.w3.org/TR/trace-context/).
//! A run is a span of its own: its requests carry the producer's trace id
//! with a new parent id (the run's span id) and the producer's flags.

use rand::RngCore;

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
