//! The steps a guest is inside right now, and the idempotency token of each.
//!
//! A step's token is the same on every delivery and every retry of every
//! job that names the step (it is derived from the tenant and the step key
//! alone), so the system on the other side of a request can recognise the
//! repeat of an effect whose completion the host never got to record (a
//! worker killed between the POST and the step marker). Requests made
//! inside a step carry it as an `Idempotency-Key` header (the IETF httpapi
//! draft's name) unless the guest sets its own.

use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

/// The header outgoing requests inside a step carry.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The idempotency token of step `key` of `tenant`: 32 hex characters.
pub fn step_token(tenant: &str, key: &str) -> String {
    let mut hash = Sha256::new();
    // Length-prefixed, so no (tenant, key) pair spells another's.
    hash.update(b"wasmq step");
    hash.update((tenant.len() as u64).to_le_bytes());
    hash.update(tenant.as_bytes());
    hash.update(key.as_bytes());
    hex::encode(&hash.finalize()[..16])
}

/// The steps open in one job, innermost last, as (key, token).
#[derive(Debug, Clone, Default)]
pub struct OpenSteps(Arc<Mutex<Vec<(String, String)>>>);

impl OpenSteps {
    fn lock(&self) -> MutexGuard<'_, Vec<(String, String)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest began running step `key` (its `begin` said `run`).
    pub fn enter(&self, tenant: &str, key: &str) {
        self.leave(key);
        self.lock().push((key.to_string(), step_token(tenant, key)));
    }

    /// The guest completed or abandoned step `key`.
    pub fn leave(&self, key: &str) {
        self.lock().retain(|(k, _)| k != key);
    }

    /// The token of the innermost open step, if any.
    pub fn current_token(&self) -> Option<String> {
        self.lock().last().map(|(_, t)| t.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stable_per_tenant_and_step() {
        assert_eq!(step_token("a", "s"), step_token("a", "s"));
        assert_ne!(step_token("a", "s"), step_token("b", "s"));
        assert_ne!(step_token("a", "s"), step_token("a", "t"));
        assert_ne!(step_token("a\0b", "c"), step_token("a", "b\0c"));
        assert_eq!(step_token("a", "s").len(), 32);
        let open = OpenSteps::default();
        assert_eq!(open.current_token(), None);
        open.enter("a", "outer");
        open.enter("a", "inner");
        assert_eq!(open.current_token(), Some(step_token("a", "inner")));
        open.leave("inner");
        assert_eq!(open.current_token(), Some(step_token("a", "outer")));
    }
}
