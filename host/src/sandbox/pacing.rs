//! Pacing compute-bound guests on an io pool's runtime.
//!
//! An io pool runs up to thousands of jobs on a few runtime threads,
//! because its jobs mostly wait. A guest that computes instead (a CPU task
//! deployed on an io pool by mistake, or a hostile tenant's spinning loop)
//! yields at every epoch tick, but is scheduled again straight away: two of
//! them on a two-thread runtime keep both threads busy, and every waiting
//! job's next step, every lease renewal and every Redis reply queues behind
//! a full tick of someone's computation.
//!
//! So each io job gets a compute burst ([`COMPUTE_BURST`] of time spent
//! running, summed over the job). Past it, the job runs only while it holds
//! one of the runtime's compute lanes: it takes one after each epoch-tick
//! yield and gives it back whenever it stops running, at the next tick or
//! when it waits in a host call, so a lane is never held across a wait.
//! Lanes are one fewer than the runtime's threads (at least one), and the
//! semaphore behind them is FIFO: compute-bound jobs take turns, and a
//! thread stays free for the jobs that wait. CPU pools do not pace; their
//! threads are there to compute.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Running time an io job may spend before it needs a compute lane. Far
/// above what an io job spends between waits (a no-op job runs for about
/// 7 µs), well below a spinning guest's first tens of milliseconds.
pub const COMPUTE_BURST: Duration = Duration::from_millis(2);

/// The compute lanes of one runtime, shared by every io pool on it.
#[derive(Debug)]
pub struct ComputeLanes {
    lanes: Arc<Semaphore>,
    burst: Duration,
}

impl ComputeLanes {
    /// Lanes for a runtime of `threads` worker threads: one fewer than its
    /// threads, at least one; jobs pace after [`COMPUTE_BURST`].
    pub fn for_runtime(threads: usize) -> Arc<Self> {
        Self::new(threads.saturating_sub(1).max(1), COMPUTE_BURST)
    }

    /// Lanes for the tokio runtime this is called on (its worker threads).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn for_current_runtime() -> Arc<Self> {
        Self::for_runtime(tokio::runtime::Handle::current().metrics().num_workers())
    }

    /// `lanes` lanes; jobs pace after `burst` of running time.
    pub fn new(lanes: usize, burst: Duration) -> Arc<Self> {
        Arc::new(ComputeLanes {
            lanes: Arc::new(Semaphore::new(lanes.max(1))),
            burst,
        })
    }

    /// Lanes free right now.
    pub fn available(&self) -> usize {
        self.lanes.available_permits()
    }
}

/// One job's pacing: shared by the wrapper around its run (which counts
/// running time and gives the lane back after each poll) and its epoch
/// callback (which decides how the job yields).
#[derive(Clone, Default)]
pub(super) struct JobPace(Arc<Mutex<PaceState>>);

#[derive(Default)]
struct PaceState {
    /// `None`: never paced (cpu pools, `wasmq run`, benchmarks).
    lanes: Option<Arc<ComputeLanes>>,
    /// Time spent in the run's polls so far.
    ran: Duration,
    /// The lane held during the current poll, if any.
    lane: Option<OwnedSemaphorePermit>,
}

impl JobPace {
    /// Pacing on `lanes`, or none.
    pub(super) fn new(lanes: Option<Arc<ComputeLanes>>) -> Self {
        JobPace(Arc::new(Mutex::new(PaceState {
            lanes,
            ..PaceState::default()
        })))
    }

    fn state(&self) -> MutexGuard<'_, PaceState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `run`, timing each poll and giving back the lane when it ends.
    pub(super) async fn metered<F: Future>(&self, run: F) -> F::Output {
        let mut run = std::pin::pin!(run);
        std::future::poll_fn(|cx| {
            let started = Instant::now();
            let polled = run.as_mut().poll(cx);
            let mut state = self.state();
            state.ran += started.elapsed();
            state.lane = None;
            polled
        })
        .await
    }

    /// What the guest awaits at an epoch tick: tokio's `yield_now` (the job
    /// goes to the back of the run queue; a plain self-wake would put it in
    /// the LIFO slot and run it again at once), then, once its burst is
    /// spent, a compute lane.
    pub(super) fn at_tick(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let lanes = {
            let state = self.state();
            match &state.lanes {
                Some(lanes) if state.ran >= lanes.burst => Some(lanes.lanes.clone()),
                _ => None,
            }
        };
        let Some(lanes) = lanes else {
            return Box::pin(tokio::task::yield_now());
        };
        let pace = self.clone();
        Box::pin(async move {
            tokio::task::yield_now().await;
            let lane = lanes
                .acquire_owned()
                .await
                .expect("compute lanes are never closed");
            pace.state().lane = Some(lane);
        })
    }

    /// Time spent in the run's polls so far.
    pub(super) fn ran(&self) -> Duration {
        self.state().ran
    }

    /// Whether the job has spent its burst (it needs a lane to run on).
    #[cfg(test)]
    fn paced(&self) -> bool {
        let state = self.state();
        state.lanes.as_ref().is_some_and(|l| state.ran >= l.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs inside a slice of computation now, and the most at once.
    #[derive(Default)]
    struct Overlap {
        now: usize,
        peak: usize,
    }

    /// A job that computes in slices between ticks, as the epoch callback
    /// drives it: run `slice`, then await `at_tick`. Slices after the first
    /// tick (with a zero burst, the paced ones) count in `overlap`.
    async fn compute(pace: JobPace, slices: usize, slice: Duration, overlap: Arc<Mutex<Overlap>>) {
        pace.metered(async {
            for i in 0..slices {
                if i > 0 {
                    let mut o = overlap.lock().unwrap();
                    o.now += 1;
                    o.peak = o.peak.max(o.now);
                }
                std::thread::sleep(slice);
                if i > 0 {
                    overlap.lock().unwrap().now -= 1;
                }
                pace.at_tick().await;
            }
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn past_the_burst_compute_bound_jobs_take_turns_on_the_lanes() {
        let lanes = ComputeLanes::new(2, Duration::ZERO);
        let overlap = Arc::new(Mutex::new(Overlap::default()));
        let paces: Vec<JobPace> = (0..3).map(|_| JobPace::new(Some(lanes.clone()))).collect();
        let jobs: Vec<_> = paces
            .iter()
            .map(|p| {
                let slice = Duration::from_millis(1);
                tokio::spawn(compute(p.clone(), 40, slice, overlap.clone()))
            })
            .collect();
        for job in jobs {
            job.await.unwrap();
        }
        assert!(paces.iter().all(JobPace::paced));
        // Three jobs on three threads, two lanes: two compute side by side,
        // never three.
        assert_eq!(overlap.lock().unwrap().peak, 2);
        assert_eq!(lanes.available(), 2, "every lane was given back");
    }

    #[test]
    fn a_runtime_keeps_one_thread_out_of_the_lanes() {
        assert_eq!(ComputeLanes::for_runtime(1).available(), 1);
        assert_eq!(ComputeLanes::for_runtime(2).available(), 1);
        assert_eq!(ComputeLanes::for_runtime(8).available(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paced_job_does_not_hold_its_lane_while_it_waits() {
        let lanes = ComputeLanes::new(1, Duration::ZERO);
        let pace = JobPace::new(Some(lanes.clone()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let job = tokio::spawn({
            let pace = pace.clone();
            async move {
                pace.metered(async {
                    // Past the (zero) burst: the tick takes the lane...
                    pace.at_tick().await;
                    // ...and a wait in a host call gives it back.
                    rx.await.unwrap();
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(lanes.available(), 1, "the waiting job holds no lane");
        tx.send(()).unwrap();
        job.await.unwrap();
        assert_eq!(lanes.available(), 1);
    }

    #[tokio::test]
    async fn without_lanes_a_job_is_never_paced() {
        let pace = JobPace::new(None);
        pace.metered(async {
            std::thread::sleep(Duration::from_millis(5));
            pace.at_tick().await;
        })
        .await;
        assert!(!pace.paced());
    }
}
