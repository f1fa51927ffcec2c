//! [`Lock`]: tenant-scoped distributed locks with a lease and a fencing
//! token.

use std::time::Duration;

use crate::bindings::wasmq::task0_1_0::lock::{self as wit, Lease};
use crate::{millis, HostError};

/// A distributed lock held by this job, released when dropped.
///
/// A lock is a *lease*: it expires after its TTL unless renewed, so a job
/// that dies never blocks others forever. The flip side is that a holder can
/// lose the lock without noticing (paused, slow, partitioned) while another
/// job takes it. A lock alone therefore cannot protect a resource; the
/// [fencing token](Lock::fencing_token) can.
///
/// ```no_run
/// # use std::time::Duration;
/// # use wasmq_guest::{Lock, TaskError};
/// # fn f() -> Result<(), TaskError> {
/// let Some(lock) = Lock::acquire("invoice:42", Duration::from_secs(30))? else {
///     return Err(TaskError::retry_after("invoice 42 is locked", Duration::from_secs(5)));
/// };
/// // Send the token with every write; the protected system remembers the
/// // highest token it has seen and refuses writes with a lower one.
/// let token = lock.fencing_token();
/// // ... write(invoice, token) ...
/// lock.release()?;
/// # Ok(()) }
/// ```
///
/// Dropping a `Lock` releases it (ignoring errors; the lease expires
/// anyway). Call [`release`](Lock::release) to learn whether the lease was
/// still held.
#[derive(Debug)]
pub struct Lock {
    /// `None` once released, so `Drop` does not release twice.
    lease: Option<Lease>,
}

impl Lock {
    /// Tries once to take lock `name` for `ttl`. `None` if another holder
    /// has it.
    pub fn acquire(name: &str, ttl: Duration) -> Result<Option<Lock>, HostError> {
        Self::take(name, ttl, None)
    }

    /// Tries to take lock `name` for `ttl`, waiting up to `wait` for the
    /// current holder to release it or its lease to expire. `None` if it is
    /// still held after `wait`. The wait happens on the host: it costs no
    /// fuel.
    pub fn acquire_wait(
        name: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<Lock>, HostError> {
        Self::take(name, ttl, Some(wait))
    }

    fn take(name: &str, ttl: Duration, wait: Option<Duration>) -> Result<Option<Lock>, HostError> {
        let lease = wit::acquire(name, millis(ttl), wait.map(millis))?;
        Ok(lease.map(|lease| Lock { lease: Some(lease) }))
    }

    /// Name of the lock.
    pub fn name(&self) -> &str {
        &self.lease().name
    }

    /// The fencing token of this lease: strictly increasing per lock name
    /// across all holders.
    ///
    /// Pass it with every write to the resource the lock protects, and have
    /// that resource refuse writes carrying a token lower than the highest
    /// it has accepted (a conditional update, a `WHERE token <= $token`, a
    /// version column). A holder whose lease expired without its knowing
    /// then cannot overwrite the work of the holder that came after it.
    pub fn fencing_token(&self) -> u64 {
        self.lease().fencing_token
    }

    /// Extends the lease to `ttl` from now. `false` if the lease was already
    /// lost (expired, possibly taken by another holder): stop working on the
    /// protected resource.
    pub fn renew(&self, ttl: Duration) -> Result<bool, HostError> {
        Ok(wit::renew(self.lease(), millis(ttl))?)
    }

    /// Releases the lock. `false` if the lease was already lost; a lost
    /// lease never releases another holder's lock.
    pub fn release(mut self) -> Result<bool, HostError> {
        match self.lease.take() {
            Some(lease) => Ok(wit::release(&lease)?),
            None => Ok(false),
        }
    }

    fn lease(&self) -> &Lease {
        // Only `release` (which consumes self) and `Drop` take the lease.
        self.lease.as_ref().expect("lock used after release")
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            // Best effort: if this fails, the lease expires after its TTL.
            let _ = wit::release(&lease);
        }
    }
}
