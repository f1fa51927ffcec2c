//! Whether a delivery still holds its job's lease, as far as this process
//! can tell: the local half of fencing (the other half is in Redis: a
//! step or an outcome is refused unless the job's lease names the
//! delivery).
//!
//! A lease is held until a time on this machine's monotonic clock that is
//! never later than the lease's end in Redis: each renewal moves it to the
//! instant the renewal was *sent* plus the lease (Redis computes the end
//! from a later instant). So a worker that was frozen (SIGSTOP, a long GC
//! pause, a laptop lid) past its lease knows, the moment it runs again,
//! that it may no longer act for the job, before any renewal has had a
//! chance to fail; and a renewal that finds the job redelivered marks the
//! lease lost at once. The monotonic clock keeps counting while a process
//! is stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// See the module docs.
#[derive(Debug)]
pub struct LeaseWatch {
    /// Until when the lease is surely held (`None`: no lease, held for
    /// good: embedded mode).
    held_until: Mutex<Option<Instant>>,
    /// Set once a renewal found the job owned by another delivery.
    lost: AtomicBool,
    /// Wakes [`LeaseWatch::lost`] when the lease is lost.
    changed: Notify,
}

impl LeaseWatch {
    /// A lease fetched at `sent` (when the fetch was sent) for `lease`.
    pub fn new(sent: Instant, lease: Duration) -> Self {
        LeaseWatch {
            held_until: Mutex::new(Some(sent + lease)),
            lost: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// No lease at all (embedded mode, tests): always held.
    pub fn unbounded() -> Self {
        LeaseWatch {
            held_until: Mutex::new(None),
            lost: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn until(&self) -> Option<Instant> {
        *self.held_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A renewal sent at `sent` for `lease` succeeded. A lease that had
    /// already lapsed on this clock when the renewal was sent stays
    /// lapsed: the renewal may have found no one else holding the job yet,
    /// but between the lapse and now another worker was free to run it,
    /// and this run may have acted while no lease covered it. It is lost.
    pub fn renewed(&self, sent: Instant, lease: Duration) {
        let mut until = self.held_until.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(end) = until.as_mut() {
            if sent >= *end {
                drop(until);
                self.lose();
                return;
            }
            *end = (*end).max(sent + lease);
        }
    }

    /// A renewal found the job owned by another delivery, or the lease
    /// lapsed without one (the renewer calls this for both), or the worker
    /// takes the job back.
    pub fn lose(&self) {
        self.lost.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// True while the delivery may still act for its job.
    pub fn held(&self) -> bool {
        !self.lost.load(Ordering::Acquire) && self.until().is_none_or(|u| Instant::now() < u)
    }

    /// Resolves once the lease is lost ([`LeaseWatch::lose`]). A lease
    /// that lapses is noticed by the worker's renewer, which ticks anyway,
    /// so a job costs no timer of its own; until then [`LeaseWatch::held`]
    /// already says no to every effect.
    pub async fn lost(&self) {
        loop {
            let notified = self.changed.notified();
            if self.lost.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lease_lapses_unless_renewed_and_can_be_lost() {
        let watch = LeaseWatch::new(Instant::now(), Duration::from_millis(50));
        assert!(watch.held());
        watch.renewed(Instant::now(), Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(watch.held(), "the renewal moved the end");
        watch.lose();
        assert!(!watch.held());
        watch.lost().await;

        let lapsing = LeaseWatch::new(Instant::now(), Duration::from_millis(30));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(
            !lapsing.held(),
            "lapsed on this clock, before anyone said so"
        );
        assert!(LeaseWatch::unbounded().held());
    }

    #[tokio::test]
    async fn a_lapsed_lease_is_not_revived_by_a_late_renewal() {
        let watch = LeaseWatch::new(Instant::now(), Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Frozen past the lease: the renewal sent on waking finds the job
        // still unclaimed in Redis, and must not bring the lease back.
        watch.renewed(Instant::now(), Duration::from_secs(30));
        assert!(!watch.held(), "a lapsed lease stays lapsed");
        tokio::time::timeout(Duration::from_secs(1), watch.lost())
            .await
            .expect("the run is told to stop");
    }
}
