//! A small map whose entries go stale after a fixed time: how a worker
//! keeps what it reads from Redis for every job (deployed tasks, tenant
//! caps) without reading it for every job, while still seeing a redeploy or
//! a changed cap within that time.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Values by key, each trusted for `ttl` after it was stored.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache whose entries last `ttl`.
    pub fn new(ttl: Duration) -> Self {
        TtlCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The value under `key`, unless it is missing or stale.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (value, at) = entries.get(key)?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    /// Store `value` under `key`, fresh from now.
    pub fn put(&self, key: K, value: V) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (value, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_served_until_they_go_stale() {
        let cache = TtlCache::new(Duration::from_millis(50));
        assert_eq!(cache.get("a"), None::<u32>);
        cache.put("a".to_string(), 1);
        assert_eq!(cache.get("a"), Some(1));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("a"), None, "stale after the ttl");
        cache.put("a".to_string(), 2);
        assert_eq!(cache.get("a"), Some(2), "fresh again once stored");
    }
}
