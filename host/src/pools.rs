//! Worker pools: which queues run where, and how wide.
//!
//! The seed's advice, built in: I/O-bound tasks (send an email, scrape a
//! page) and CPU-bound tasks (resize an image) belong in separate queues
//! served by separately sized pools.
//!
//! - `io` pools run many jobs at once (default 1,000) on the worker's main
//!   async runtime: a job waiting on HTTP, a lock or a timer costs a parked
//!   future, not a thread. Fuel still caps any CPU burst.
//! - `cpu` pools run on their own runtime with at most one thread per core
//!   (default: the number of cores), so fuel-metered number crunching never
//!   occupies the threads that I/O jobs, lease renewals and timeouts need.
//!   Guests yield at every epoch tick, so a long CPU job still lets its own
//!   pool renew leases and enforce deadlines. On Linux their threads run at
//!   a lower OS priority ([`CpuPriority`], `SCHED_IDLE` by default): when
//!   both pools want the cores, the kernel runs the short I/O-path work (and
//!   Redis, on a shared machine) first, and CPU jobs take every cycle left
//!   over.
//! - A guest that computes on an io pool anyway finishes its run, past a
//!   short burst, on the worker's compute threads, at this same priority
//!   (see [`crate::sandbox::ComputeThreads`]).
//!
//! Written `--pool io=QUEUE[,QUEUE...][:CONCURRENCY]` and
//! `--pool cpu=QUEUE[,QUEUE...][:THREADS]`; a task's policy names its pool
//! (`pool = "cpu"` in `task.toml`) and deploy refuses to mix pools on a queue.

use serde::{Deserialize, Serialize};

/// Default in-flight jobs of an I/O pool.
pub const DEFAULT_IO_CONCURRENCY: usize = 1000;

/// How CPU-pool threads, and the compute threads that compute-bound io jobs
/// move to, are scheduled against the rest of the machine (`wasmq worker
/// --cpu-priority`). Linux only; elsewhere every choice
/// means `normal`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuPriority {
    /// `SCHED_IDLE`: a CPU job runs only on cycles nothing else wants, and
    /// any other thread that wakes up (an io-pool job, a lease renewal,
    /// Redis) takes the core from it at once. The io pool's latency then
    /// does not depend on the CPU pool's load; a machine kept busy by other
    /// work can starve CPU jobs into their timeouts.
    #[default]
    Idle,
    /// `nice 10`: about a tenth of a normal thread's share while both want
    /// a core. A waking thread may wait for the CPU job's time slice (about
    /// a millisecond) to end first.
    Low,
    /// Same as any other thread.
    Normal,
}

/// `nice` of CPU-pool threads under [`CpuPriority::Low`].
pub const CPU_THREAD_NICE: i32 = 10;

impl CpuPriority {
    /// Apply this priority to the calling thread (run at the start of every
    /// CPU-pool thread). On Linux, scheduling policy and nice are per
    /// thread. A failure (a container forbidding it) only costs the io pool
    /// some latency, so it is logged, not fatal.
    pub fn apply_to_current_thread(self) {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: neither call has memory-safety preconditions beyond a
            // valid `sched_param`; `0` names the calling thread.
            let failed = match self {
                CpuPriority::Idle => {
                    let param = libc::sched_param { sched_priority: 0 };
                    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 }
                }
                CpuPriority::Low => unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, CPU_THREAD_NICE) != 0
                },
                CpuPriority::Normal => false,
            };
            if failed {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    priority = ?self,
                    "could not lower a CPU-pool thread's priority"
                );
            }
        }
    }
}

/// The two pool kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// Async, highly concurrent, for tasks that wait.
    #[default]
    Io,
    /// One thread per core, for tasks that compute.
    Cpu,
}

impl PoolKind {
    /// `io` or `cpu`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Io => "io",
            PoolKind::Cpu => "cpu",
        }
    }

    /// Parse `io` or `cpu`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "io" => Ok(PoolKind::Io),
            "cpu" => Ok(PoolKind::Cpu),
            other => Err(format!("unknown pool kind {other:?} (use io or cpu)")),
        }
    }
}

/// One pool of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Its kind.
    pub kind: PoolKind,
    /// Queues it serves, in rotation.
    pub queues: Vec<String>,
    /// Jobs at once (io) or threads (cpu).
    pub width: usize,
}

impl PoolSpec {
    /// Parse `io=a,b:100` or `cpu=images` (width defaults per kind).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, rest) = text
            .split_once('=')
            .ok_or_else(|| format!("--pool {text:?}: expected io=QUEUES[:N] or cpu=QUEUES[:N]"))?;
        let kind = PoolKind::parse(kind).map_err(|e| format!("--pool {text:?}: {e}"))?;
        let (queues, width) = match rest.rsplit_once(':') {
            Some((q, n)) => {
                let n: usize = n
                    .parse()
                    .map_err(|_| format!("--pool {text:?}: {n:?} is not a number"))?;
                if n == 0 {
                    return Err(format!("--pool {text:?}: the width must be at least 1"));
                }
                (q, n)
            }
            None => (rest, default_width(kind)),
        };
        let queues: Vec<String> = queues
            .split(',')
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(String::from)
            .collect();
        if queues.is_empty() {
            return Err(format!("--pool {text:?}: name at least one queue"));
        }
        Ok(PoolSpec {
            kind,
            queues,
            width,
        })
    }
}

/// 1,000 jobs for I/O; one thread per core for CPU.
pub fn default_width(kind: PoolKind) -> usize {
    match kind {
        PoolKind::Io => DEFAULT_IO_CONCURRENCY,
        PoolKind::Cpu => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_specs_parse() {
        let io = PoolSpec::parse("io=email,scrape:500").unwrap();
        assert_eq!((io.kind, io.queues.len(), io.width), (PoolKind::Io, 2, 500));
        let cpu = PoolSpec::parse("cpu=images").unwrap();
        assert_eq!(cpu.kind, PoolKind::Cpu);
        assert!(cpu.width >= 1);
        assert!(PoolSpec::parse("gpu=x")
            .unwrap_err()
            .contains("unknown pool kind"));
        assert!(PoolSpec::parse("io=:3")
            .unwrap_err()
            .contains("at least one queue"));
        assert!(PoolSpec::parse("io=a:0").is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn cpu_threads_run_at_their_priority_and_only_they() {
        // SAFETY: plain queries about the calling thread.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let (policy_before, nice_before) = (policy(), nice());
        let in_thread = |priority: CpuPriority| {
            std::thread::spawn(move || {
                priority.apply_to_current_thread();
                (policy(), nice())
            })
            .join()
            .unwrap()
        };
        assert_eq!(in_thread(CpuPriority::Idle).0, libc::SCHED_IDLE);
        assert_eq!(
            in_thread(CpuPriority::Low),
            (libc::SCHED_OTHER, CPU_THREAD_NICE)
        );
        assert_eq!(in_thread(CpuPriority::Normal), (policy_before, nice_before));
        assert_eq!(
            (policy(), nice()),
            (policy_before, nice_before),
            "other threads keep their priority"
        );
    }
}
