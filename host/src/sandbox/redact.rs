//! Blotting secret values out of what the host records from a job.
//!
//! Owns the forms a value is looked for in. A value a run read can come
//! back from the guest in its result, error, kind, log or denials, and
//! from there reach `status`, the dashboard, worker logs and a flow's
//! later steps. It is found and replaced by `[secret NAME]`:
//! - as it is (raw);
//! - JSON-escaped, once or twice (a value with `"` or `\` inside a JSON
//!   string, or inside a JSON document that is itself a string);
//! - inside any string of a JSON document, after decoding it (`\u0041`,
//!   `\/` and the other spellings JSON allows), nested JSON documents in
//!   strings included, to [`MAX_DEPTH`]; the text of a log is read line
//!   by line for this.
//!
//! What is not promised (docs/security.md, "Secrets"): a value the guest
//! transformed (base64, hex, split across fields, reversed, hashed) is not
//! recognised; values shorter than [`MIN_REDACTED_LEN`] bytes are not
//! replaced (they would blank out ordinary text and hide nothing).

use serde_json::Value;

/// Values shorter than this are not blotted out: a two-letter value
/// would blank out half the log and hide nothing.
pub(crate) const MIN_REDACTED_LEN: usize = 4;

/// How deep JSON nested in JSON strings is decoded.
const MAX_DEPTH: usize = 4;

/// The secrets to find, by name; see the module docs.
pub(crate) struct Redactor<'a> {
    /// (name, forms of its value), longest form first within a name.
    values: Vec<(&'a str, Vec<String>)>,
}

impl<'a> Redactor<'a> {
    /// A redactor for `values` (name, value); short values are skipped.
    pub(crate) fn new(values: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut found: Vec<(&'a str, Vec<String>)> = values
            .into_iter()
            .filter(|(_, v)| v.len() >= MIN_REDACTED_LEN)
            .map(|(name, value)| (name, forms(value)))
            .collect();
        // A value inside another is replaced after it: the longer first.
        found.sort_by_key(|(_, forms)| std::cmp::Reverse(forms[0].len()));
        Redactor { values: found }
    }

    /// Whether there is nothing to look for.
    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The name of the first secret `text` holds in any form looked for.
    pub(crate) fn find(&self, text: &str) -> Option<&'a str> {
        if self.is_empty() {
            return None;
        }
        let redacted = self.redact(text);
        if redacted == text {
            return None;
        }
        self.values
            .iter()
            .find(|(name, _)| redacted.contains(&marker(name)))
            .map(|(name, _)| *name)
    }

    /// `text` with every value in every form replaced by `[secret NAME]`.
    pub(crate) fn redact(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_string();
        }
        self.redact_at(text, 0)
    }

    fn redact_at(&self, text: &str, depth: usize) -> String {
        let mut out = self.replace_forms(text);
        if depth >= MAX_DEPTH {
            return out;
        }
        // Decoded, a JSON document may still spell a value out (escapes
        // the forms above do not cover); re-encoded only then.
        if let Some(decoded) = self.redact_json(&out, depth) {
            return decoded;
        }
        if out.contains('\n') {
            let lines: Vec<String> = out
                .split('\n')
                .map(|line| {
                    self.redact_json(line, depth)
                        .unwrap_or_else(|| line.to_string())
                })
                .collect();
            out = lines.join("\n");
        }
        out
    }

    fn replace_forms(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (name, forms) in &self.values {
            for form in forms {
                if out.contains(form.as_str()) {
                    out = out.replace(form.as_str(), &marker(name));
                }
            }
        }
        out
    }

    /// `text` re-encoded with values blotted out of its strings, if it is
    /// a JSON document and any string of it held one.
    fn redact_json(&self, text: &str, depth: usize) -> Option<String> {
        let first = text.trim_start().chars().next()?;
        if !matches!(first, '{' | '[' | '"') {
            return None;
        }
        let mut value: Value = serde_json::from_str(text).ok()?;
        if !self.redact_value(&mut value, depth + 1) {
            return None;
        }
        serde_json::to_string(&value).ok()
    }

    /// Blot values out of every string (and object key) of `value`; true
    /// if any was.
    fn redact_value(&self, value: &mut Value, depth: usize) -> bool {
        match value {
            Value::String(s) => {
                let redacted = self.redact_at(s, depth);
                let changed = redacted != *s;
                *s = redacted;
                changed
            }
            Value::Array(items) => {
                let mut changed = false;
                for item in items {
                    changed |= self.redact_value(item, depth);
                }
                changed
            }
            Value::Object(map) => {
                let mut changed = false;
                let entries = std::mem::take(map);
                for (key, mut item) in entries {
                    changed |= self.redact_value(&mut item, depth);
                    let redacted = self.redact_at(&key, depth);
                    changed |= redacted != key;
                    map.insert(redacted, item);
                }
                changed
            }
            _ => false,
        }
    }
}

/// What a value is replaced by.
fn marker(name: &str) -> String {
    format!("[secret {name}]")
}

/// A value as it is, JSON-escaped, and escaped twice, longest first.
fn forms(value: &str) -> Vec<String> {
    let mut forms = vec![value.to_string()];
    let mut current = value.to_string();
    for _ in 0..2 {
        let escaped = json_escaped(&current);
        if escaped == current {
            break;
        }
        forms.push(escaped.clone());
        current = escaped;
    }
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms
}

/// `text` as it appears between the quotes of a JSON string.
fn json_escaped(text: &str) -> String {
    let quoted = serde_json::to_string(text).unwrap_or_default();
    quoted[1..quoted.len() - 1].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const VALUE: &str = r#"pa"ss\word"#;

    fn redactor() -> Redactor<'static> {
        Redactor::new([("api", VALUE), ("pin", "12")])
    }

    #[test]
    fn raw_and_escaped_values_are_blotted_out() {
        let r = redactor();
        assert_eq!(r.redact(&format!("key={VALUE}")), "key=[secret api]");
        // In a JSON result: escaped once.
        let result = json!({"token": VALUE}).to_string();
        assert_eq!(r.redact(&result), r#"{"token":"[secret api]"}"#);
        // A JSON document inside a JSON string: escaped twice.
        let inner = json!({"token": VALUE}).to_string();
        let outer = json!({"body": inner}).to_string();
        let redacted = r.redact(&outer);
        assert!(!redacted.contains("word"), "{redacted}");
        assert!(redacted.contains("[secret api]"), "{redacted}");
        // Short values are left alone.
        assert_eq!(r.redact("pin 12"), "pin 12");
    }

    #[test]
    fn values_spelled_with_other_json_escapes_are_found_after_decoding() {
        let r = Redactor::new([("api", "s3cret/value")]);
        // \u escapes and an escaped slash: not the value's bytes.
        let text = r#"{"a": "s\u0033cret\/value", "list": ["x", "\u0073\u0033cret/value!"]}"#;
        let redacted = r.redact(text);
        assert!(!redacted.contains("s3c"), "{redacted}");
        assert_eq!(redacted.matches("[secret api]").count(), 2, "{redacted}");
        // In a key, too, and in a JSON line of a log.
        let log = "starting\n{\"s\\u0033cret/value\": 1}\ndone";
        let redacted = r.redact(log);
        assert!(!redacted.contains("s3c"), "{redacted}");
        assert!(redacted.starts_with("starting\n") && redacted.ends_with("\ndone"));
        assert_eq!(r.find(log), Some("api"));
        assert_eq!(r.find("nothing here"), None);
    }

    #[test]
    fn text_without_a_value_is_left_as_it_was() {
        let r = redactor();
        let text = "{ \"b\": 1,  \"a\": [1, 2] }";
        assert_eq!(
            r.redact(text),
            text,
            "formatting kept when nothing is found"
        );
        assert!(Redactor::new([]).is_empty());
    }
}
