//! The in-memory [`Backend`]: embedded mode (`wasmq run`) and unit tests.
//!
//! Same semantics as the Redis backend, in one process: TTLs are checked on
//! read, every operation holds one mutex for its whole duration (so each is
//! atomic, like a Lua script), and enqueued child jobs are recorded for the
//! caller to report, since there is no queue to put them on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    Backend, BackendError, BackendResult, ChildJob, Claimant, FlowRequest, StartedFlow, StepState,
};

/// `tenant` and name joined by a separator that cannot appear in a tenant
/// name, so keys of different tenants never collide.
type Key = String;

fn key(tenant: &str, name: &str) -> Key {
    format!("{tenant}\u{1f}{name}")
}

/// `value + delta`, or the error Redis gives for a counter that would leave
/// the i64 range (so `wasmq run` and a worker agree).
fn add(name: &str, value: i64, delta: i64) -> BackendResult<i64> {
    value.checked_add(delta).ok_or_else(|| {
        BackendError::Invalid(format!(
            "counter {name:?} would overflow: {value} + {delta} is outside the 64-bit range"
        ))
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A value with an optional expiry (wall-clock ms, so a saved store keeps
/// its TTLs across processes).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Expiring<T> {
    value: T,
    expires_at_ms: Option<u64>,
}

impl<T> Expiring<T> {
    fn new(value: T, ttl: Option<Duration>) -> Self {
        Expiring {
            value,
            expires_at_ms: ttl.map(|t| now_ms() + t.as_millis() as u64),
        }
    }

    fn live(&self) -> bool {
        self.expires_at_ms.is_none_or(|at| now_ms() < at)
    }
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct State {
    kv: HashMap<Key, Expiring<Vec<u8>>>,
    counters: HashMap<Key, i64>,
    /// Value recorded per `incr_once` key.
    counted_once: HashMap<Key, i64>,
    /// Lock holder's owner token, with the lease as expiry.
    locks: HashMap<Key, Expiring<String>>,
    /// Last fencing token handed out per lock; never reset.
    fences: HashMap<Key, u64>,
    steps_done: HashMap<Key, Expiring<Vec<u8>>>,
    step_claims: HashMap<Key, Expiring<String>>,
    children: Vec<(String, ChildJob)>,
    flows: Vec<(String, FlowRequest, StartedFlow)>,
    next_child: u64,
}

/// See the module docs.
#[derive(Default)]
pub struct MemoryBackend {
    state: Mutex<State>,
    /// Sealed secrets by (tenant, field): given by the caller for this
    /// process (`wasmq run --secrets`), never part of the saved state.
    secrets: Mutex<HashMap<Key, Vec<u8>>>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Load a store saved by [`MemoryBackend::save`]; an absent file is an
    /// empty store. This is how consecutive `wasmq run --state FILE` calls
    /// share step markers, counters and locks.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        if !path.exists() {
            return Ok(Self::new());
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading embedded state {}", path.display()))?;
        let state = serde_json::from_str(&text).with_context(|| {
            format!(
                "embedded state {} is not a wasmq state file",
                path.display()
            )
        })?;
        Ok(MemoryBackend {
            state: Mutex::new(state),
            secrets: Mutex::default(),
        })
    }

    /// Save the whole store to `path` (write then rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let text = serde_json::to_string(&*self.lock())?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// File `sealed` as `tenant`'s secret under `field` (see
    /// [`crate::secrets::field`]), for this process only.
    pub fn put_secret(&self, tenant: &str, field: &str, sealed: Vec<u8>) {
        self.secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key(tenant, field), sealed);
    }

    /// Child jobs enqueued so far, as `(tenant, job)`.
    pub fn children(&self) -> Vec<(String, ChildJob)> {
        self.lock().children.clone()
    }

    /// Flows started so far (tenant, request, what it was told), in order.
    pub fn flows(&self) -> Vec<(String, FlowRequest, StartedFlow)> {
        self.lock().flows.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied
        // operation (each is a few map calls), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn secret_sealed(
        &self,
        tenant: &str,
        task: &str,
        name: &str,
    ) -> BackendResult<Option<(String, Vec<u8>)>> {
        let secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        Ok(crate::secrets::lookup_fields(name, task)
            .into_iter()
            .find_map(|field| {
                let sealed = secrets.get(&key(tenant, &field))?.clone();
                Some((field, sealed))
            }))
    }

    async fn kv_get(&self, tenant: &str, k: &str) -> BackendResult<Option<Vec<u8>>> {
        let s = self.lock();
        Ok(s.kv
            .get(&key(tenant, k))
            .filter(|e| e.live())
            .map(|e| e.value.clone()))
    }

    async fn kv_set(
        &self,
        tenant: &str,
        k: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<()> {
        self.lock()
            .kv
            .insert(key(tenant, k), Expiring::new(value.to_vec(), ttl));
        Ok(())
    }

    async fn kv_set_if_absent(
        &self,
        tenant: &str,
        k: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<bool> {
        let mut s = self.lock();
        let k = key(tenant, k);
        if s.kv.get(&k).is_some_and(|e| e.live()) {
            return Ok(false);
        }
        s.kv.insert(k, Expiring::new(value.to_vec(), ttl));
        Ok(true)
    }

    async fn kv_delete(&self, tenant: &str, k: &str) -> BackendResult<bool> {
        Ok(self
            .lock()
            .kv
            .remove(&key(tenant, k))
            .is_some_and(|e| e.live()))
    }

    async fn counter_incr(&self, tenant: &str, name: &str, delta: i64) -> BackendResult<i64> {
        let mut s = self.lock();
        let v = s.counters.entry(key(tenant, name)).or_insert(0);
        *v = add(name, *v, delta)?;
        Ok(*v)
    }

    async fn counter_incr_once(
        &self,
        tenant: &str,
        name: &str,
        delta: i64,
        once_key: &str,
    ) -> BackendResult<i64> {
        let mut s = self.lock();
        if let Some(v) = s.counted_once.get(&key(tenant, once_key)) {
            return Ok(*v);
        }
        let v = s.counters.entry(key(tenant, name)).or_insert(0);
        *v = add(name, *v, delta)?;
        let v = *v;
        s.counted_once.insert(key(tenant, once_key), v);
        Ok(v)
    }

    async fn counter_get(&self, tenant: &str, name: &str) -> BackendResult<i64> {
        Ok(self
            .lock()
            .counters
            .get(&key(tenant, name))
            .copied()
            .unwrap_or(0))
    }

    async fn lock_acquire(
        &self,
        tenant: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> BackendResult<Option<u64>> {
        let mut s = self.lock();
        let k = key(tenant, name);
        if s.locks.get(&k).is_some_and(|e| e.live()) {
            return Ok(None);
        }
        s.locks
            .insert(k.clone(), Expiring::new(owner.to_string(), Some(ttl)));
        let fence = s.fences.entry(k).or_insert(0);
        *fence += 1;
        Ok(Some(*fence))
    }

    async fn lock_renew(
        &self,
        tenant: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> BackendResult<bool> {
        let mut s = self.lock();
        match s.locks.get_mut(&key(tenant, name)) {
            Some(e) if e.live() && e.value == owner => {
                *e = Expiring::new(owner.to_string(), Some(ttl));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn lock_release(&self, tenant: &str, name: &str, owner: &str) -> BackendResult<bool> {
        let mut s = self.lock();
        let k = key(tenant, name);
        match s.locks.get(&k) {
            Some(e) if e.live() && e.value == owner => {
                s.locks.remove(&k);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn step_begin(
        &self,
        tenant: &str,
        k: &str,
        claimant: &Claimant,
        lease: Duration,
    ) -> BackendResult<StepState> {
        let claimant = claimant.job.as_str();
        let mut s = self.lock();
        let k = key(tenant, k);
        if let Some(done) = s.steps_done.get(&k).filter(|e| e.live()) {
            return Ok(StepState::Done(done.value.clone()));
        }
        if s.step_claims
            .get(&k)
            .is_some_and(|e| e.live() && e.value != claimant)
        {
            return Ok(StepState::Busy);
        }
        s.step_claims
            .insert(k, Expiring::new(claimant.to_string(), Some(lease)));
        Ok(StepState::Run)
    }

    async fn step_complete(
        &self,
        tenant: &str,
        k: &str,
        _claimant: &Claimant,
        output: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<()> {
        let mut s = self.lock();
        let k = key(tenant, k);
        s.step_claims.remove(&k);
        s.steps_done.insert(k, Expiring::new(output.to_vec(), ttl));
        Ok(())
    }

    async fn step_abandon(&self, tenant: &str, k: &str, claimant: &Claimant) -> BackendResult<()> {
        let claimant = claimant.job.as_str();
        let mut s = self.lock();
        let k = key(tenant, k);
        if s.step_claims.get(&k).is_some_and(|e| e.value == claimant) {
            s.step_claims.remove(&k);
        }
        Ok(())
    }

    async fn enqueue_child(&self, tenant: &str, child: ChildJob) -> BackendResult<String> {
        let mut s = self.lock();
        s.next_child += 1;
        let id = format!("local-child-{}", s.next_child);
        s.children.push((tenant.to_string(), child));
        Ok(id)
    }

    /// Checked and recorded, not run (embedded mode has no queue); the
    /// same job and ordinal find the same flow again.
    async fn start_flow(&self, tenant: &str, request: FlowRequest) -> BackendResult<StartedFlow> {
        let plan = crate::flow::plan(&request.definition).map_err(BackendError::Invalid)?;
        let mut s = self.lock();
        let again = s.flows.iter().find(|(t, r, _)| {
            t == tenant && r.started_by == request.started_by && r.ordinal == request.ordinal
        });
        if let Some((_, _, started)) = again {
            return Ok(started.clone());
        }
        let flow_id = format!("local-flow-{}", s.flows.len() + 1);
        let started = StartedFlow {
            job_ids: (1..=plan.steps.len())
                .map(|i| format!("{flow_id}-{i}"))
                .collect(),
            flow_id,
        };
        s.flows.push((tenant.to_string(), request, started.clone()));
        Ok(started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn tenants_do_not_share_state() {
        run(async {
            let b = MemoryBackend::new();
            b.kv_set("a", "k", b"1", None).await.unwrap();
            assert_eq!(b.kv_get("b", "k").await.unwrap(), None);
            b.counter_incr("a", "c", 5).await.unwrap();
            assert_eq!(b.counter_get("b", "c").await.unwrap(), 0);
        })
    }

    #[test]
    fn counters_refuse_to_overflow() {
        run(async {
            let b = MemoryBackend::new();
            b.counter_incr("t", "c", i64::MAX).await.unwrap();
            let err = b.counter_incr("t", "c", 1).await.unwrap_err();
            assert!(
                matches!(err, BackendError::Invalid(ref m) if m.contains("overflow")),
                "{err}"
            );
            assert_eq!(
                b.counter_get("t", "c").await.unwrap(),
                i64::MAX,
                "unchanged"
            );
        })
    }

    #[test]
    fn lock_owner_and_fencing() {
        run(async {
            let b = MemoryBackend::new();
            let t1 = b
                .lock_acquire("t", "l", "o1", Duration::from_millis(30))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                b.lock_acquire("t", "l", "o2", Duration::from_secs(5))
                    .await
                    .unwrap(),
                None
            );
            assert!(!b.lock_release("t", "l", "o2").await.unwrap());
            std::thread::sleep(Duration::from_millis(40));
            let t2 = b
                .lock_acquire("t", "l", "o2", Duration::from_secs(5))
                .await
                .unwrap()
                .unwrap();
            assert!(t2 > t1, "fencing tokens strictly increase");
            // The expired holder can neither renew nor release the new lease.
            assert!(!b
                .lock_renew("t", "l", "o1", Duration::from_secs(5))
                .await
                .unwrap());
            assert!(!b.lock_release("t", "l", "o1").await.unwrap());
            assert!(b.lock_release("t", "l", "o2").await.unwrap());
        })
    }

    #[test]
    fn steps_complete_once() {
        run(async {
            let b = MemoryBackend::new();
            let lease = Duration::from_secs(5);
            let (run1, run2) = (Claimant::unfenced("run1"), Claimant::unfenced("run2"));
            assert_eq!(
                b.step_begin("t", "s", &run1, lease).await.unwrap(),
                StepState::Run
            );
            assert_eq!(
                b.step_begin("t", "s", &run2, lease).await.unwrap(),
                StepState::Busy
            );
            b.step_complete("t", "s", &run1, b"out", None)
                .await
                .unwrap();
            assert_eq!(
                b.step_begin("t", "s", &run2, lease).await.unwrap(),
                StepState::Done(b"out".to_vec())
            );
        })
    }
}
