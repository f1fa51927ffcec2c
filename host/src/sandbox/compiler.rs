//! Preparing task versions: each compiled at most once per process, on a
//! thread of its own, within a budget.
//!
//! Owns: the versions this process has prepared (ready to instantiate) or
//! refused, the compiles in flight, the compile threads and the compile
//! budget ([`CompileSettings`]).
//!
//! - **Once.** The first job that needs a version starts its compile; every
//!   job that needs it meanwhile waits for that same compile (a flight per
//!   content hash). The flight is led by a task of its own, so a job that
//!   goes away (cancelled, drained) does not stop it.
//! - **Off the runtime.** The compile runs on a `wasmq-compile` thread at
//!   the workers' CPU priority (`SCHED_IDLE` by default), single-threaded
//!   (see `engine.rs`): it takes cycles nothing else wants, and the async
//!   runtimes keep running other tasks' jobs. At most
//!   [`CompileSettings::threads`] compiles run at once.
//! - **Within a budget.** The flight's leader reads the thread's CPU clock;
//!   past the budget the version is refused (`invalid-component`). Cranelift
//!   cannot be stopped mid-compile, so the thread runs on to the end (still
//!   at low priority, still holding its place among the compile threads,
//!   so abandoned compiles cannot pile up) and its result is thrown away,
//!   not written to the disk cache.
//! - **Remembered.** What compiling decided about a version (it is ready,
//!   or it is invalid or too slow to compile) is kept for the life of the
//!   process, so later jobs of a refused version fail at once. A failure to
//!   fetch the bytes (Redis) is not remembered: the next job tries again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::world::WorldPre;
use super::{PreparedTask, Sandbox};
use crate::component::{check_header, content_hash, initialize_memory_images};
use crate::engine::CompileSettings;
use crate::failure::{Category, Failure};

/// What a version's preparation ended with, as the jobs waiting see it.
type Prepared = Result<PreparedTask, Failure>;

/// How often a flight's leader looks at its compile thread's CPU clock, at
/// most: a twentieth of the budget, so a refusal comes within 5% of it.
const MAX_POLL: Duration = Duration::from_millis(50);

/// What the compiler has done since the sandbox was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompileStats {
    /// Components compiled by Cranelift (a miss in every cache).
    pub compiled: u64,
    /// Components loaded from the on-disk cache instead.
    pub loaded: u64,
    /// Versions refused by compiling them (invalid, or past the budget).
    pub refused: u64,
    /// Compile threads running now, including compiles given up on.
    pub running: u64,
}

/// See the module docs.
pub(super) struct Compiler {
    settings: CompileSettings,
    /// One permit per compile thread; a thread holds it until its compile
    /// ends, also when its caller gave up on it.
    threads: Arc<Semaphore>,
    versions: Mutex<Versions>,
    compiled: AtomicU64,
    loaded: AtomicU64,
    running: AtomicU64,
}

#[derive(Default)]
struct Versions {
    /// Prepared versions by hash.
    ready: HashMap<String, PreparedTask>,
    /// Versions compiling refused, by hash, with why.
    refused: HashMap<String, Failure>,
    /// Versions being prepared: the jobs that need one watch its flight.
    flights: HashMap<String, watch::Receiver<Option<Prepared>>>,
}

impl Compiler {
    pub(super) fn new(settings: CompileSettings) -> Self {
        Compiler {
            settings,
            threads: Arc::new(Semaphore::new(settings.threads.max(1))),
            versions: Mutex::default(),
            compiled: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            running: AtomicU64::new(0),
        }
    }

    pub(super) fn settings(&self) -> &CompileSettings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Versions> {
        self.versions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn stats(&self) -> CompileStats {
        CompileStats {
            compiled: self.compiled.load(Ordering::Relaxed),
            loaded: self.loaded.load(Ordering::Relaxed),
            refused: self.lock().refused.len() as u64,
            running: self.running.load(Ordering::Relaxed),
        }
    }

    pub(super) fn ready(&self, hash: &str) -> Option<PreparedTask> {
        self.lock().ready.get(hash).cloned()
    }
}

impl Sandbox {
    /// Validate and compile a component (or take it from the caches) on
    /// this thread, without a budget: for `wasmq run`, benchmarks and
    /// tests. CPU-heavy on a cache miss.
    pub fn prepare(&self, bytes: &[u8]) -> Result<PreparedTask, Failure> {
        let hash = content_hash(bytes);
        if let Some(p) = self.compiler.ready(&hash) {
            return Ok(p);
        }
        let prepared = self.compile_now(bytes, &hash, &AtomicBool::new(false))?;
        self.compiler.lock().ready.insert(hash, prepared.clone());
        Ok(prepared)
    }

    /// The version whose sha256 is `hash`, prepared at most once per
    /// process however many jobs ask at once, on a compile thread, within
    /// the compile budget (see the module docs). `fetch` gives its bytes;
    /// it is awaited only by the job that starts the compile, and must
    /// check them against `hash`.
    pub async fn prepare_once<F>(self: &Arc<Self>, hash: &str, fetch: F) -> Prepared
    where
        F: Future<Output = Result<Vec<u8>, Failure>> + Send + 'static,
    {
        let mut flight = {
            let mut versions = self.compiler.lock();
            if let Some(p) = versions.ready.get(hash) {
                return Ok(p.clone());
            }
            if let Some(refused) = versions.refused.get(hash) {
                return Err(refused.clone());
            }
            match versions.flights.get(hash) {
                Some(flight) => flight.clone(),
                None => {
                    let (done, flight) = watch::channel(None);
                    versions.flights.insert(hash.to_string(), flight.clone());
                    tokio::spawn(self.clone().lead(hash.to_string(), fetch, done));
                    flight
                }
            }
        };
        let outcome = flight
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|done| done.clone());
        outcome.unwrap_or_else(|| {
            Err(Failure::new(
                Category::TaskError,
                format!("preparing component {hash} was interrupted (the worker is stopping)"),
            ))
        })
    }

    /// What the compiler has done so far.
    pub fn compile_stats(&self) -> CompileStats {
        self.compiler.stats()
    }

    /// A flight: fetch, compile within the budget, record, tell the waiters.
    async fn lead<F>(self: Arc<Self>, hash: String, fetch: F, done: watch::Sender<Option<Prepared>>)
    where
        F: Future<Output = Result<Vec<u8>, Failure>>,
    {
        let mut flight = Flight {
            sandbox: &self,
            hash: &hash,
            armed: true,
        };
        let (result, remember) = match fetch.await {
            Err(failure) => (Err(failure), false),
            Ok(bytes) => self.compile_within_budget(&hash, bytes).await,
        };
        {
            // Under one lock, so a job arriving now finds the result and
            // not a finished flight.
            let mut versions = self.compiler.lock();
            match &result {
                Ok(prepared) => {
                    versions.ready.insert(hash.clone(), prepared.clone());
                }
                Err(failure) if remember => {
                    // Info, not a warning: each job of the version carries
                    // the reason (dead letter, `wasmq deploy`'s one line).
                    tracing::info!(component = %hash, reason = %failure, "component refused for the life of this process");
                    versions.refused.insert(hash.clone(), failure.clone());
                }
                Err(_) => {}
            }
            versions.flights.remove(&hash);
            flight.armed = false;
        }
        done.send_replace(Some(result));
    }

    /// Compile `bytes` on a compile thread; give up past the budget.
    /// Whether the result is what compiling decided (to remember).
    async fn compile_within_budget(
        self: &Arc<Self>,
        hash: &str,
        bytes: Vec<u8>,
    ) -> (Prepared, bool) {
        let host_error = |m: String| (Err(Failure::new(Category::TaskError, m)), false);
        let Ok(permit) = self.compiler.threads.clone().acquire_owned().await else {
            return host_error("the compile threads are closed".into());
        };
        let settings = *self.compiler.settings();
        let abandoned = Arc::new(AtomicBool::new(false));
        let (finished, mut result) = oneshot::channel();
        let (thread_hash, thread_abandoned) = (hash.to_string(), abandoned.clone());
        let slot = CompileSlot::take(self.clone(), permit);
        let spawned = std::thread::Builder::new()
            .name("wasmq-compile".into())
            .spawn(move || {
                settings.priority.apply_to_current_thread();
                let prepared = slot
                    .sandbox
                    .compile_now(&bytes, &thread_hash, &thread_abandoned);
                // Counted as ended before the waiters hear of it.
                drop(slot);
                let _ = finished.send(prepared);
            });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => return host_error(format!("starting a compile thread: {e}")),
        };
        let decided = |prepared: Prepared| {
            let remember = prepared.is_err();
            (prepared, remember)
        };
        let poll = (settings.budget / 20).clamp(Duration::from_millis(1), MAX_POLL);
        let started = Instant::now();
        loop {
            match tokio::time::timeout(poll, &mut result).await {
                Ok(Ok(prepared)) => return decided(prepared),
                // The thread panicked (a wasmtime bug on this input): the
                // same bytes would do it again.
                Ok(Err(_)) => {
                    return decided(Err(Failure::new(
                        Category::InvalidComponent,
                        "compiling the component crashed the compiler (a wasmtime bug; report it with the component)",
                    )))
                }
                Err(_) => {
                    // Once the thread has ended, its clock is gone but its
                    // result is here.
                    let used = thread_cpu_time(&thread).unwrap_or_else(|| started.elapsed());
                    if used < settings.budget {
                        continue;
                    }
                    match result.try_recv() {
                        Ok(prepared) => return decided(prepared),
                        // It ended without a result: the next poll says so.
                        Err(oneshot::error::TryRecvError::Closed) => continue,
                        Err(oneshot::error::TryRecvError::Empty) => {
                            abandoned.store(true, Ordering::Relaxed);
                            return decided(Err(too_slow(settings.budget)));
                        }
                    }
                }
            }
        }
    }

    /// Load or compile, then link: the work of a compile thread (or of
    /// [`Sandbox::prepare`]'s caller).
    fn compile_now(&self, bytes: &[u8], hash: &str, abandoned: &AtomicBool) -> Prepared {
        check_header(bytes)?;
        let component = match self.cache.load(&self.engine, hash) {
            Some(component) => {
                self.compiler.loaded.fetch_add(1, Ordering::Relaxed);
                component
            }
            None => {
                self.compiler.compiled.fetch_add(1, Ordering::Relaxed);
                self.cache.compile(&self.engine, bytes, hash, abandoned)?
            }
        };
        initialize_memory_images(&component);
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            Failure::new(
                Category::InvalidComponent,
                format!("component needs imports the wasmq host does not provide: {e:#}"),
            )
        })?;
        let pre = WorldPre::new(pre)?;
        Ok(PreparedTask {
            hash: hash.to_string(),
            component_bytes: bytes.len() as u64,
            pre,
        })
    }
}

/// The refusal of a component whose compile ran past `budget`.
fn too_slow(budget: Duration) -> Failure {
    Failure::new(
        Category::InvalidComponent,
        format!(
            "compiling took longer than {} (the compile budget, in CPU time of one thread); \
             make the component smaller (fewer or smaller functions), or raise the budget \
             with --compile-budget on `wasmq deploy` and `wasmq worker`",
            humantime::format_duration(budget)
        ),
    )
}

/// A compile thread's place: counted in [`CompileStats::running`] and
/// holding one of the compile threads' permits until the thread ends,
/// however it ends (a panic in Cranelift included).
struct CompileSlot {
    sandbox: Arc<Sandbox>,
    _permit: OwnedSemaphorePermit,
}

impl CompileSlot {
    fn take(sandbox: Arc<Sandbox>, permit: OwnedSemaphorePermit) -> Self {
        sandbox.compiler.running.fetch_add(1, Ordering::Relaxed);
        CompileSlot {
            sandbox,
            _permit: permit,
        }
    }
}

impl Drop for CompileSlot {
    fn drop(&mut self) {
        self.sandbox
            .compiler
            .running
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Removes its flight if the leader stops before finishing (its runtime
/// shut down), so the next job that needs the version starts a new one.
struct Flight<'a> {
    sandbox: &'a Sandbox,
    hash: &'a str,
    armed: bool,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.sandbox.compiler.lock().flights.remove(self.hash);
        }
    }
}

/// CPU time `thread` has used so far; `None` once it has ended (or where
/// threads have no CPU clock).
#[cfg(target_os = "linux")]
fn thread_cpu_time(thread: &std::thread::JoinHandle<()>) -> Option<Duration> {
    use std::os::unix::thread::JoinHandleExt;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the handle is neither joined nor detached, so its pthread_t
    // is valid; glibc answers ESRCH for a thread that has ended.
    if unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) } != 0 {
        return None;
    }
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return None;
    }
    Some(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_time(_thread: &std::thread::JoinHandle<()>) -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_threads_cpu_clock_counts_its_work_not_its_waits() {
        let own_clock = || {
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `now` is a valid timespec to write to.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
            Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
        };
        let (spun, spinning) = std::sync::mpsc::channel::<()>();
        let (go, waiting) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            while own_clock() < Duration::from_millis(100) {
                std::hint::black_box(0u64);
            }
            spun.send(()).unwrap();
            let _ = waiting.recv();
        });
        spinning.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let used = thread_cpu_time(&thread).expect("a running thread has a clock");
        go.send(()).unwrap();
        thread.join().unwrap();
        assert!(
            used >= Duration::from_millis(100) && used < Duration::from_millis(180),
            "100 ms of work, then 200 ms of waiting: {used:?}"
        );
    }
}
