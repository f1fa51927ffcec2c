//! Disk quotas: how many bytes a tenant's writable directory grants hold,
//! and refusing the writes that would pass its `max_disk_bytes`.
//!
//! What counts: every file, directory and link under the tenant's writable
//! grants costs [`ENTRY_BYTES`], and a regular file its length on top (its
//! apparent size, so a sparse file counts in full). The entry cost is what
//! an empty file really costs a disk; without it a guest could fill a
//! filesystem's inodes with files that weigh nothing.
//!
//! How it is kept, per tenant and per worker process ([`DiskLedgers`]):
//! - when a job starts, its writable grants become roots of its tenant's
//!   ledger, and the ledger walks all its roots if its last walk is older
//!   than [`MEASURE_EVERY`] or a root is new. A walk stops once it has seen
//!   more than the quota, so it never costs more than the quota allows
//!   entries; one walk at a time per tenant, the other jobs starting wait
//!   for it and use its figure.
//! - between walks, every byte a job makes a file longer by and every entry
//!   it creates is charged to the ledger first (`sandbox::files`), shared by
//!   all the tenant's jobs in the process: two jobs cannot each spend the
//!   same free space. A charge that would pass the quota is refused, the
//!   guest's call fails with `insufficient-space`, and the refusal is
//!   recorded in the job's [`Denials`] and [`JobDisk::refusal`]: the job
//!   ends `denied`, naming the quota, even if the guest swallows the error
//!   and returns a result (some of what it wrote is not there).
//! - nothing is credited back within a walk period (deleting or truncating
//!   frees space at the next walk), and overwriting a file within its length
//!   costs nothing.
//!
//! What this does not do: several worker processes (or hosts sharing a
//! disk) each keep their own ledger, so a tenant served by N processes at
//! once can pass its quota by what those jobs write before the next walk
//! (at most N times the free space). A tenant's ledger keeps at most
//! [`MAX_ROOTS`] roots (the most recently used).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cap_std::fs::Dir;

use super::http::Denials;

/// What one file, directory or link costs beyond its contents: an inode and
/// a directory entry, rounded up to one 4 KiB block.
pub const ENTRY_BYTES: u64 = 4096;

/// How long a walk's figure stands before a starting job walks again; in
/// between, charges keep it current for writes made in this process.
pub const MEASURE_EVERY: Duration = Duration::from_secs(1);

/// Most roots (distinct writable grant paths) one tenant's ledger keeps:
/// each holds an open directory handle.
pub const MAX_ROOTS: usize = 256;

/// Every tenant's ledger in this worker process.
#[derive(Default)]
pub(crate) struct DiskLedgers {
    tenants: Mutex<HashMap<String, Arc<TenantDisk>>>,
}

/// One tenant's disk use, as far as this process knows it.
#[derive(Default)]
struct TenantDisk {
    state: Mutex<Ledger>,
    /// Held while walking, so that one walk at a time runs per tenant.
    walking: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Ledger {
    /// Writable grant paths, with the handle their latest job opened and
    /// when.
    roots: HashMap<PathBuf, (Arc<Dir>, Instant)>,
    /// Bytes the last walk counted.
    measured: u64,
    /// When the last walk finished; `None` before the first.
    measured_at: Option<Instant>,
    /// The last walk stopped early once past this many bytes (so it is a
    /// lower bound, good only for quotas up to this).
    stopped_past: Option<u64>,
    /// Bytes charged since the last walk started.
    charged: u64,
}

impl Ledger {
    fn used(&self) -> u64 {
        self.measured.saturating_add(self.charged)
    }

    /// Add `roots`, replacing older handles of the same path; true if one
    /// is new.
    fn add_roots(&mut self, roots: Vec<(PathBuf, Dir)>) -> bool {
        let now = Instant::now();
        let mut new = false;
        for (path, dir) in roots {
            new |= self.roots.insert(path, (Arc::new(dir), now)).is_none();
        }
        while self.roots.len() > MAX_ROOTS {
            let oldest = self
                .roots
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(path, _)| path.clone());
            if let Some(path) = oldest {
                self.roots.remove(&path);
            }
        }
        new
    }

    fn fresh_for(&self, quota: u64) -> bool {
        self.measured_at
            .is_some_and(|at| at.elapsed() < MEASURE_EVERY)
            && self.stopped_past.is_none_or(|past| quota <= past)
    }
}

impl DiskLedgers {
    /// The disk account of one job of `tenant` with `quota` bytes, whose
    /// writable grants are `roots` (path and opened handle). Walks the
    /// tenant's roots first when its figure is stale (see the module docs).
    pub(crate) async fn job(
        &self,
        tenant: &str,
        quota: u64,
        roots: Vec<(PathBuf, Dir)>,
        denials: Denials,
    ) -> JobDisk {
        let disk = self.lock().entry(tenant.to_string()).or_default().clone();
        let new_root = disk.lock().add_roots(roots);
        let walking = disk.walking.lock().await;
        let stale = new_root || !disk.lock().fresh_for(quota);
        if stale {
            let (roots, charged_before): (Vec<Arc<Dir>>, u64) = {
                let ledger = disk.lock();
                let roots = ledger.roots.values().map(|(d, _)| d.clone()).collect();
                (roots, ledger.charged)
            };
            let walk = tokio::task::spawn_blocking(move || measure(&roots, quota)).await;
            let mut ledger = disk.lock();
            match walk {
                Ok((bytes, stopped)) => {
                    ledger.measured = bytes;
                    ledger.stopped_past = stopped.then_some(quota);
                }
                Err(e) => {
                    // Not measured: count the tenant as full until a walk
                    // succeeds, rather than let it write blind.
                    tracing::warn!(%tenant, error = %e, "measuring disk use failed");
                    ledger.measured = quota.saturating_add(1);
                    ledger.stopped_past = Some(quota);
                }
            }
            // Charges made while walking may be counted twice (in the walk
            // and here) until the next walk: the safe side.
            ledger.charged = ledger.charged.saturating_sub(charged_before);
            ledger.measured_at = Some(Instant::now());
        }
        drop(walking);
        JobDisk {
            disk,
            quota,
            tenant: tenant.to_string(),
            denials,
            refusal: Arc::new(OnceLock::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<TenantDisk>>> {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TenantDisk {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One job's side of its tenant's ledger: charges go to the shared ledger,
/// refusals to the job's denials.
#[derive(Clone)]
pub(crate) struct JobDisk {
    disk: Arc<TenantDisk>,
    quota: u64,
    tenant: String,
    denials: Denials,
    /// The first refusal (recorded once per job: a guest retrying in a
    /// loop must not grow the denials).
    refusal: Arc<OnceLock<String>>,
}

impl JobDisk {
    /// Charge `bytes` of new disk use, or refuse them (recording the
    /// refusal) when they would pass the quota.
    pub(crate) fn charge(&self, bytes: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        let used = {
            let mut ledger = self.disk.lock();
            let used = ledger.used();
            if used.saturating_add(bytes) <= self.quota {
                ledger.charged += bytes;
                return true;
            }
            used
        };
        let tenant = &self.tenant;
        let refusal = format!(
            "writing {bytes} more bytes to disk (disk quota of {} bytes for tenant {tenant:?}, \
             {used} in use; raise it with `wasmq tenant set-limits {tenant} --max-disk SIZE` \
             or delete files)",
            self.quota
        );
        if self.refusal.set(refusal.clone()).is_ok() {
            self.denials.record(refusal);
        }
        false
    }

    /// The first write this job had refused for the quota, if any.
    pub(crate) fn refusal(&self) -> Option<&str> {
        self.refusal.get().map(String::as_str)
    }

    /// Give back a charge for a change that did not happen (the call it was
    /// made for failed).
    pub(crate) fn refund(&self, bytes: u64) {
        let mut ledger = self.disk.lock();
        ledger.charged = ledger.charged.saturating_sub(bytes);
    }
}

/// Bytes under `roots` by the rule in the module docs, and whether the walk
/// stopped early on passing `stop_past`. Symlinks are counted, never
/// followed; a directory or hard-linked file reached twice (nested or
/// repeated roots, hard links) counts once; what cannot be read is skipped.
fn measure(roots: &[Arc<Dir>], stop_past: u64) -> (u64, bool) {
    let mut total: u64 = 0;
    let mut seen = Seen::default();
    // Pending directories as (parent, name): a directory is opened only
    // when its turn comes, so open handles stay at the tree's depth.
    let mut pending: Vec<(Arc<Dir>, Option<OsString>)> =
        roots.iter().map(|root| (root.clone(), None)).collect();
    while let Some((parent, name)) = pending.pop() {
        if total > stop_past {
            return (total, true);
        }
        let dir = match name {
            None => parent,
            Some(name) => match parent.open_dir(&name) {
                Ok(dir) => Arc::new(dir),
                Err(_) => continue,
            },
        };
        if !dir.dir_metadata().is_ok_and(|m| seen.first_time(&m)) {
            continue;
        }
        let Ok(entries) = dir.entries() else {
            continue;
        };
        for entry in entries.flatten() {
            total = total.saturating_add(ENTRY_BYTES);
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push((dir.clone(), Some(entry.file_name())));
            } else if kind.is_file() {
                if let Ok(meta) = entry.metadata() {
                    if seen.first_time(&meta) {
                        total = total.saturating_add(meta.len());
                    }
                }
            }
        }
    }
    (total, false)
}

/// Inodes counted already: directories, and files with more than one link.
#[derive(Default)]
struct Seen(HashSet<(u64, u64)>);

impl Seen {
    #[cfg(unix)]
    fn first_time(&mut self, meta: &cap_std::fs::Metadata) -> bool {
        use cap_std::fs::MetadataExt;
        if meta.is_file() && meta.nlink() < 2 {
            return true;
        }
        self.0.insert((meta.dev(), meta.ino()))
    }

    #[cfg(not(unix))]
    fn first_time(&mut self, _meta: &cap_std::fs::Metadata) -> bool {
        true
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_walk_counts_entries_and_lengths_once() {
        let root =
            std::env::temp_dir().join(format!("wasmq-disk-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), vec![0u8; 1000]).unwrap();
        std::fs::hard_link(root.join("a/b/f"), root.join("a/g")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        let open = |p: &std::path::Path| {
            Arc::new(Dir::open_ambient_dir(p, cap_std::ambient_authority()).unwrap())
        };
        // a, a/b, a/b/f, a/g, link: five entries, one file of 1000 bytes.
        let expected = 5 * ENTRY_BYTES + 1000;
        assert_eq!(measure(&[open(&root)], u64::MAX), (expected, false));
        // A nested root adds nothing.
        assert_eq!(
            measure(&[open(&root), open(&root.join("a"))], u64::MAX),
            (expected, false)
        );
        let (partial, stopped) = measure(&[open(&root)], ENTRY_BYTES);
        assert!(stopped && partial > ENTRY_BYTES, "{partial}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
