//! The one wasmtime [`Engine`] per process: every knob in one place.
//!
//! Owns: the engine configuration (component model, fuel, epochs, the
//! pooling allocator with copy-on-write memory images, single-threaded
//! compilation), the epoch ticker thread that turns wall-clock time into
//! epoch deadlines, what compiling a component may cost
//! ([`CompileSettings`]: the default size cap and the compile budget), and
//! what one component may contain ([`ComponentLimits`]: core instances,
//! memories, tables, table elements).
//!
//! Invariant: the pool has at least as many instance slots as the worker runs
//! jobs at once ([`EngineLimits::instance_slots`]), plus every slot a finished
//! job can leave parked in wasmtime's decommit queues ([`pool_slots`]), so a
//! job never fails for want of a slot.

use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::pools::CpuPriority;

/// How often the ticker bumps the epoch. Each tick a running guest reaches
/// its epoch deadline, yields to the async runtime and has its wall-clock
/// deadline checked, so this bounds timeout overshoot and how long a guest can
/// hold a runtime thread: other jobs on that thread wait at most this long.
/// 1 ms is a thousand cheap checks a second per running guest, and keeps a
/// tenant's spinning guests from adding more than milliseconds to others' jobs.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Wasm stack per instance: deep enough for real code, small enough that a
/// runaway recursion traps quickly.
pub const MAX_WASM_STACK: usize = 1 << 20;

/// Host stack per async call (fiber): the wasm stack plus room for host calls.
pub const ASYNC_STACK: usize = 2 << 20;

/// Bytes per memory, table and fiber stack reset in place rather than
/// decommitted when a slot is freed: enough for a small task's whole heap
/// and stack, small enough that 100 warm slots stay under ~300 MiB resident.
const KEEP_RESIDENT: usize = 1 << 20;
/// Decommits batched into one flush.
const DECOMMIT_BATCH: usize = 16;

/// Table slots the pool reserves per instance slot. Every toolchain we
/// measured makes two tables (the main module's function table and the
/// canonical-ABI shim's), so four leave room; a component with more takes
/// more slots, and in a full pool waits for them (its job is retried
/// shortly). Reserved up front: each slot is
/// [`ComponentLimits::table_elements`] x 8 bytes of address space.
const TABLES_RESERVED_PER_SLOT: u32 = 4;

/// What one component may contain for the pool to run it. Checked by
/// wasmtime when a component is compiled or loaded: one over a limit is
/// refused (`invalid-component`, naming the limit and the flag that raises
/// it), by `wasmq deploy` against the limits its flags give and by a
/// worker against its own. Part of the compiled-cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ComponentLimits {
    /// Core module instances, counted over the component and every
    /// component it contains.
    pub core_instances: u32,
    /// Linear memories the component defines.
    pub memories: u32,
    /// Tables the component defines.
    pub tables: u32,
    /// Elements one table may hold (its initial size, and what it may grow
    /// to).
    pub table_elements: usize,
}

/// The limits workers and `wasmq deploy` use unless told otherwise, sized
/// for the toolchains task authors use, with headroom. Measured (core
/// instances / memories / tables / largest table):
///
/// | toolchain                         | inst | mem | tab | elements |
/// |-----------------------------------|------|-----|-----|----------|
/// | Rust `wasm32-wasip2` (noop)       | 3    | 1   | 2   | 79       |
/// | componentize-py 0.25.1 (no-op)    | 14   | 1   | 2   | 5,696    |
/// | componentize-js 0.23.0 (no-op)    | 4    | 1   | 2   | 7,714    |
///
/// A Python package with native extensions adds a core instance per
/// shared library (numpy alone has dozens) and its functions to the one
/// table, so instances and table elements get the most headroom: 200 and
/// 100,000, as Spin's production pool has. Raising these costs nothing per
/// job and little up front: the core-instance limits are counters, memory
/// slots stay one per instance slot (see [`build_engine`]), table slots
/// [`TABLES_RESERVED_PER_SLOT`] per instance slot whatever the
/// per-component maximum, and a table is reset only as far as it was used.
pub const DEFAULT_COMPONENT_LIMITS: ComponentLimits = ComponentLimits {
    core_instances: 200,
    memories: 4,
    tables: 64,
    table_elements: crate::policy::DEFAULT_MAX_TABLE_ELEMENTS,
};

impl Default for ComponentLimits {
    fn default() -> Self {
        DEFAULT_COMPONENT_LIMITS
    }
}

impl std::fmt::Display for ComponentLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} core instances, {} memories, {} tables, {} table elements",
            self.core_instances, self.memories, self.tables, self.table_elements
        )
    }
}

/// Largest component a tenant without its own cap (`wasmq tenant create
/// --max-component`) may deploy and run. It bounds what one version costs
/// Redis and each worker's fetch; compile time is bounded apart, by
/// [`DEFAULT_COMPILE_BUDGET`], and depends on the code, not the file size.
/// Rust tasks built for release are 0.1-3 MiB (ours: 80-350 KiB). A Python
/// task built by `wasmq build` carries the interpreter and a pre-initialised
/// heap: 18 MB for a no-op, more with bundled packages (its code is about
/// 6 MB of that, and compiles well within the budget); a JavaScript one
/// about 10 MB. 64 MiB leaves room for a Python task with its pure-Python
/// dependencies; a tenant with bigger ones gets a cap of its own.
pub const DEFAULT_MAX_COMPONENT_BYTES: u64 = 64 << 20;

/// CPU time one compile of a component may take before the component is
/// refused (`invalid-component`). Our task components compile in 0.2-0.5 s
/// (a 5 MB one in 20-29 s), so 60 s leaves room for big ones, and is what a
/// worker spends, once per process, on a version it then refuses. It
/// counts the compile thread's CPU time, not wall time, so a busy machine
/// (compile threads run at a low priority) never turns a good component
/// into a refused one; with one thread per compile, the two are the same on
/// an idle machine.
pub const DEFAULT_COMPILE_BUDGET: Duration = Duration::from_secs(60);

/// What compiling a component may cost, and where it runs (see
/// `sandbox::compiler`).
#[derive(Debug, Clone, Copy)]
pub struct CompileSettings {
    /// Largest component of a tenant without its own cap.
    pub default_max_component_bytes: u64,
    /// CPU time one compile may take; past it the component is refused.
    pub budget: Duration,
    /// OS priority of the compile threads (workers: the cpu pools').
    pub priority: CpuPriority,
    /// Compiles running at once, each on a thread of its own (default: one
    /// per core, at least two). A compile past its budget cannot be
    /// interrupted (Cranelift has no way to stop one) and keeps its thread
    /// until it ends: a second thread keeps one such compile from holding
    /// up every new version, a bound keeps many from exhausting memory.
    pub threads: usize,
}

impl Default for CompileSettings {
    fn default() -> Self {
        CompileSettings {
            default_max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            budget: DEFAULT_COMPILE_BUDGET,
            priority: CpuPriority::Normal,
            threads: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .max(2),
        }
    }
}

/// What the pool is sized for.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Instances that may be alive at once (the worker's total concurrency).
    pub instance_slots: u32,
    /// Largest linear memory any task may be granted.
    pub max_memory_bytes: u64,
    /// What one component may contain.
    pub component: ComponentLimits,
    /// Meter fuel. Always on in workers; off only to measure what metering
    /// costs (`cargo bench`).
    pub consume_fuel: bool,
    /// Let Cranelift compile a component's functions on every core. Off in
    /// wasmq: see [`build_engine`]; on only to measure what that changes
    /// (`cargo bench --bench compile`).
    pub parallel_compilation: bool,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            instance_slots: 64,
            max_memory_bytes: 1 << 30,
            component: DEFAULT_COMPONENT_LIMITS,
            consume_fuel: true,
            parallel_compilation: false,
        }
    }
}

/// Instance slots the pool needs so that `jobs` instances can always be
/// alive at once.
///
/// A freed slot whose memory or stack needs decommitting (whatever lies past
/// [`KEEP_RESIDENT`]) waits in one of wasmtime's decommit-queue shards until
/// that shard holds [`DECOMMIT_BATCH`] regions. wasmtime flushes the queues
/// when an allocation finds the pool full, but a shard another thread is
/// flushing at that moment looks empty, and the allocation fails. Each shard
/// parks fewer than a batch of slots, and wasmtime has one shard per core
/// (at most 16), so that many extra slots (virtual address space only) make
/// the race harmless.
pub fn pool_slots(jobs: u32) -> u32 {
    let shards = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16) as u32;
    jobs.max(1) + shards * DECOMMIT_BATCH as u32
}

/// Build the engine and start its epoch ticker.
pub fn build_engine(limits: &EngineLimits) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    // Deterministic CPU budget: the same job with the same input burns the
    // same fuel on every run and every machine.
    config.consume_fuel(limits.consume_fuel);
    // Wall-clock deadlines and cooperative yields, cheaper than fuel checks
    // for time (one load+compare per loop header and function entry).
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    config.async_stack_size(ASYNC_STACK);
    // One compile, one thread. In parallel, Cranelift spreads a component's
    // functions over rayon's threads, one per core at normal priority,
    // where the compile thread's low priority and its CPU-time budget
    // (`CompileSettings`) do not reach: a big compile would take every core
    // from the io pools. On one thread a compile takes longer (thumbnail:
    // 177 ms against 108 ms on a 2-core VM; `cargo bench --bench compile`)
    // and runs on cycles nothing else wants. Not part of the compiled
    // code's compatibility hash, so artifacts are shared either way.
    config.parallel_compilation(limits.parallel_compilation);
    // Copy-on-write memory images: instantiation maps the initial heap
    // instead of copying data segments, which keeps fresh-instance-per-job
    // cheap.
    config.memory_init_cow(true);

    let slots = pool_slots(limits.instance_slots);
    let component = &limits.component;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        // A counter, not a reservation: every slot may hold a component
        // with the most core instances.
        .total_core_instances(slots.saturating_mul(component.core_instances))
        // Task components have one linear memory; each memory slot reserves
        // several GiB of address space, so reserve one per instance rather
        // than the per-component maximum (10,000 instances fit in the
        // 128 TiB address space). A component with two memories in a full
        // pool waits for a slot (its job is retried shortly), never fails.
        .total_memories(slots.max(component.memories))
        // Tables likewise: a few per instance, not the per-component
        // maximum, but never fewer than one component at its maximum needs.
        .total_tables(
            slots
                .saturating_mul(TABLES_RESERVED_PER_SLOT)
                .max(component.tables),
        )
        .total_stacks(slots)
        .max_core_instances_per_component(component.core_instances)
        .max_memories_per_component(component.memories)
        .max_tables_per_component(component.tables)
        .max_memory_size(limits.max_memory_bytes as usize)
        .table_elements(component.table_elements)
        // Keep a few freed slots warm so reuse skips page faults.
        .max_unused_warm_slots(slots.min(100))
        // A fresh instance per job means the same slots are reset and
        // reused constantly; resetting the low pages of memories, tables and
        // fiber stacks in place (only the pages actually touched, found with
        // PAGEMAP_SCAN where the kernel has it) avoids an madvise, a TLB
        // shootdown and a page fault per page on every job. Bounded, so a
        // warm slot holds at most this much resident memory.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .async_stack_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(wasmtime::Enabled::Auto)
        // Batch the decommits that remain (bigger memories) into fewer
        // system calls.
        .decommit_batch_size(DECOMMIT_BATCH);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));

    let engine = Engine::new(&config)?;
    start_epoch_ticker(&engine);
    Ok(engine)
}

/// Bump the engine's epoch every [`EPOCH_TICK`]. The thread holds only a weak
/// handle, so it exits once the engine is dropped.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasmq-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .expect("spawning the epoch ticker thread");
}
