//! Moving compute-bound guests off an io pool's runtime.
//!
//! An io pool runs up to thousands of jobs on a few runtime threads,
//! because its jobs mostly wait. A guest that computes instead (a CPU task
//! deployed on an io pool by mistake, or a hostile tenant's spinning loop)
//! yields at every epoch tick, but is scheduled again straight away: two of
//! them on a two-thread runtime keep both threads busy, and every waiting
//! job's next step, every lease renewal and every Redis reply queues behind
//! a full tick of someone's computation, at the same OS priority.
//!
//! So each io job gets a compute burst ([`COMPUTE_BURST`] of time spent
//! computing, summed over the job: the polls that ended at an epoch tick,
//! because the guest was still running when the tick came; polls that end
//! in a wait, such as host-side TLS or parsing before an HTTP wait, do not
//! count). A job that spends it finishes its run on
//! the worker's compute threads ([`ComputeThreads`]): a runtime of its own,
//! one thread fewer than the machine has cores, at the CPU pools' priority
//! (`SCHED_IDLE` by default). The io runtime keeps its threads for the jobs
//! that wait, and the kernel hands the cores to them first. CPU pools do not
//! move anything; they already run at that priority.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::pools::CpuPriority;

/// Computing time an io job may spend before it moves to the compute
/// threads. Far above what an io job spends between waits (a no-op job runs
/// for about 7 µs), and a small part of a spinning guest's first tick.
pub const COMPUTE_BURST: Duration = Duration::from_millis(1);

/// The runtime that compute-bound io jobs finish on, shared by every io
/// pool of a worker process.
pub struct ComputeThreads {
    /// `Some` until dropped (then shut down without blocking, which a drop
    /// inside async code needs).
    runtime: Option<tokio::runtime::Runtime>,
    burst: Duration,
}

impl std::fmt::Debug for ComputeThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeThreads")
            .field("threads", &self.threads())
            .field("burst", &self.burst)
            .finish()
    }
}

impl ComputeThreads {
    /// One thread fewer than the machine's cores (at least one), at
    /// `priority`; jobs move after [`COMPUTE_BURST`].
    pub fn for_machine(priority: CpuPriority) -> std::io::Result<Arc<Self>> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::start(cores.saturating_sub(1).max(1), priority, COMPUTE_BURST)
    }

    /// `threads` threads at `priority`; jobs move after `burst` of running.
    pub fn start(
        threads: usize,
        priority: CpuPriority,
        burst: Duration,
    ) -> std::io::Result<Arc<Self>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("wasmq-compute")
            .on_thread_start(move || priority.apply_to_current_thread())
            .enable_all()
            .build()?;
        Ok(Arc::new(ComputeThreads {
            runtime: Some(runtime),
            burst,
        }))
    }

    /// Its worker threads.
    pub fn threads(&self) -> usize {
        self.handle().metrics().num_workers()
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("present until dropped")
            .handle()
    }
}

impl Drop for ComputeThreads {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A job's run, owned, so that it can move between runtimes.
pub(super) type OwnedRun<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One job's running and computing time, counted poll by poll.
#[derive(Clone, Default)]
pub(super) struct RunClock(Arc<Mutex<Times>>);

#[derive(Default)]
struct Times {
    /// Time in every poll.
    ran: Duration,
    /// Time in the polls that ended at an epoch tick.
    computed: Duration,
    /// The current poll is ending at an epoch tick.
    ticked: bool,
}

impl RunClock {
    fn lock(&self) -> MutexGuard<'_, Times> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time spent in the run's polls so far.
    pub(super) fn ran(&self) -> Duration {
        self.lock().ran
    }

    /// Time spent in polls that ended at an epoch tick so far.
    pub(super) fn computed(&self) -> Duration {
        self.lock().computed
    }

    /// Called by the epoch callback: the guest was running when a tick
    /// came, so this poll was computing.
    pub(super) fn tick(&self) {
        self.lock().ticked = true;
    }

    /// `run`, timing each of its polls.
    pub(super) async fn metered<F: Future>(&self, run: F) -> F::Output {
        let mut run = std::pin::pin!(run);
        std::future::poll_fn(|cx| {
            let started = Instant::now();
            let polled = run.as_mut().poll(cx);
            let took = started.elapsed();
            let mut times = self.lock();
            times.ran += took;
            if std::mem::take(&mut times.ticked) {
                times.computed += took;
            }
            polled
        })
        .await
    }
}

/// Drive `run` here until it finishes or its computing time (on `clock`)
/// passes the burst of `threads`; then finish it on those threads. Without
/// `threads` it simply runs here. `Err` when the compute threads dropped
/// the run (they are shutting down, or the run panicked there).
pub(super) async fn run_paced<T: Send + 'static>(
    mut run: OwnedRun<T>,
    clock: &RunClock,
    threads: Option<&ComputeThreads>,
) -> Result<T, String> {
    let Some(threads) = threads else {
        return Ok(run.await);
    };
    let finished_here = std::future::poll_fn(|cx| {
        if clock.computed() >= threads.burst {
            return Poll::Ready(None);
        }
        run.as_mut().poll(cx).map(Some)
    })
    .await;
    match finished_here {
        Some(out) => Ok(out),
        None => {
            let task = threads.handle().spawn(run);
            // Dropped (the worker gave up on the run), the run stops there
            // too rather than going on alone on the compute threads.
            let _abort = AbortOnDrop(task.abort_handle());
            task.await
                .map_err(|e| format!("the compute threads dropped the job: {e}"))
        }
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run that works in `slices` slices of `slice`, each ending at an
    /// epoch tick (as a computing guest does) or in a wait, and returns the
    /// names of the threads it ran on.
    fn working(
        clock: RunClock,
        slices: usize,
        slice: Duration,
        at_tick: bool,
    ) -> OwnedRun<Vec<String>> {
        Box::pin(async move {
            clock
                .metered(async {
                    let mut seen = Vec::new();
                    for _ in 0..slices {
                        let name = std::thread::current().name().unwrap_or("").to_string();
                        if !seen.contains(&name) {
                            seen.push(name);
                        }
                        std::thread::sleep(slice);
                        if at_tick {
                            clock.tick();
                            tokio::task::yield_now().await;
                        } else {
                            tokio::time::sleep(Duration::from_micros(100)).await;
                        }
                    }
                    seen
                })
                .await
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_past_its_burst_finishes_on_the_compute_threads() {
        let threads =
            ComputeThreads::start(1, CpuPriority::Normal, Duration::from_millis(3)).unwrap();
        let clock = RunClock::default();
        let run = working(clock.clone(), 10, Duration::from_millis(1), true);
        let seen = run_paced(run, &clock, Some(&threads)).await.unwrap();
        assert_ne!(seen[0], "wasmq-compute", "it started here");
        assert_eq!(seen.last().unwrap(), "wasmq-compute", "{seen:?}");
        assert!(clock.computed() >= Duration::from_millis(10));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_or_waiting_runs_never_move() {
        let threads = ComputeThreads::start(1, CpuPriority::Normal, COMPUTE_BURST).unwrap();
        let stays = |seen: &Vec<String>| seen.iter().all(|t| t != "wasmq-compute");
        // Computing for less than the burst.
        let clock = RunClock::default();
        let run = working(clock.clone(), 3, Duration::ZERO, true);
        assert!(stays(
            &run_paced(run, &clock, Some(&threads)).await.unwrap()
        ));
        // Working for 10 ms, in slices that each end in a wait.
        let clock = RunClock::default();
        let run = working(clock.clone(), 10, Duration::from_millis(1), false);
        assert!(stays(
            &run_paced(run, &clock, Some(&threads)).await.unwrap()
        ));
        assert!(clock.ran() >= Duration::from_millis(10));
        assert_eq!(clock.computed(), Duration::ZERO);
        // Computing for 5 ms without compute threads.
        let clock = RunClock::default();
        let run = working(clock.clone(), 5, Duration::from_millis(1), true);
        assert!(stays(&run_paced(run, &clock, None).await.unwrap()));
    }

    #[test]
    fn a_machine_keeps_one_core_out_of_the_compute_threads() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = ComputeThreads::for_machine(CpuPriority::Normal).unwrap();
        assert_eq!(threads.threads(), cores.saturating_sub(1).max(1));
    }
}
