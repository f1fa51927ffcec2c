//! How the CLI shows things to people: times as RFC 3339 (UTC, to the
//! millisecond), errors with each cause named once, JSON with both forms
//! of every time for machines.

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

/// Whether stderr speaks JSON (`--log-format json`), set once at start.
static JSON_STDERR: OnceLock<bool> = OnceLock::new();

/// Set how [`notice`] writes (from `--log-format`).
pub fn set_json_stderr(json: bool) {
    let _ = JSON_STDERR.set(json);
}

/// A line for the person (or program) running the command, on stderr:
/// as is, or as `{"level": "INFO", "message": ...}` under `--log-format
/// json`.
pub fn notice(message: &str) {
    if JSON_STDERR.get().copied().unwrap_or(false) {
        eprintln!(
            "{}",
            serde_json::json!({"level": "INFO", "message": message})
        );
    } else {
        eprintln!("{message}");
    }
}

/// `ms` since the unix epoch as RFC 3339, e.g. `2026-12-01T15:40:12.345Z`.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `value` with an RFC 3339 twin next to every time in it: a field
/// `X_at_ms` (or `at_ms`) gets `X_at` (or `at`), recursively.
pub fn with_rfc3339(mut value: serde_json::Value) -> serde_json::Value {
    add_rfc3339(&mut value);
    value
}

fn add_rfc3339(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let times: Vec<(String, u64)> = map
                .iter()
                .filter(|(k, _)| *k == "at_ms" || k.ends_with("_at_ms"))
                .filter_map(|(k, v)| Some((k.trim_end_matches("_ms").to_string(), v.as_u64()?)))
                .collect();
            for v in map.values_mut() {
                add_rfc3339(v);
            }
            for (k, ms) in times {
                map.insert(k, rfc3339(ms).into());
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(add_rfc3339),
        _ => {}
    }
}

/// An error and its causes, each named once: a cause whose text the
/// message before it already contains (a Redis error that repeats its I/O
/// error, say) is left out.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_get_an_rfc3339_twin() {
        assert_eq!(rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        let v = with_rfc3339(serde_json::json!({
            "enqueued_at_ms": 1_767_225_600_000u64,
            "history": [{"at_ms": 0, "event": "x"}],
            "attempts": 2,
        }));
        assert_eq!(v["enqueued_at"], "2026-01-01T00:00:00.000Z");
        assert_eq!(v["history"][0]["at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["enqueued_at_ms"], 1_767_225_600_000u64, "the ms stay");
        assert!(v.get("attempts").is_some());
    }

    #[test]
    fn a_cause_is_named_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let e = anyhow::Error::new(io)
            .context("Connection refused (os error 111)")
            .context("connecting to Redis at redis://x");
        assert_eq!(
            error_chain(&e),
            "connecting to Redis at redis://x: Connection refused (os error 111)"
        );
    }
}
