//! Host bindings generated from `wit/` (the single source of truth, shared
//! with the guest SDK's `generate!`).
//!
//! Two worlds, one implementation: [`v0_2`] is `wasmq:task@0.2.0`, whose
//! world imports the 0.1.0 interfaces unchanged and adds `flow`; [`v0_1`]
//! is the frozen `wasmq:task@0.1.0` world (`wit/deps/task-0.1.0/`), bound
//! `with` the interfaces [`v0_2`] generated, so a 0.1.0 component links
//! against the very same host functions. The linker holds both worlds'
//! imports once; which world a component implements decides which entry
//! point the sandbox calls (see `compiler`).

/// `wasmq:task@0.2.0`, the world new components are built against.
pub mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wasmq:task/task@0.2.0",
        imports: { default: async },
        exports: { default: async },
        with: {
            "wasmq:task/postgres.connection": crate::sandbox::postgres::Connection,
        },
    });
}

/// `wasmq:task@0.1.0`, still served unchanged.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wasmq:task/task@0.1.0",
        imports: { default: async },
        exports: { default: async },
        with: {
            "wasmq:task/types@0.1.0": super::v0_2::wasmq::task0_1_0::types,
            "wasmq:task/log@0.1.0": super::v0_2::wasmq::task0_1_0::log,
            "wasmq:task/kv@0.1.0": super::v0_2::wasmq::task0_1_0::kv,
            "wasmq:task/counter@0.1.0": super::v0_2::wasmq::task0_1_0::counter,
            "wasmq:task/lock@0.1.0": super::v0_2::wasmq::task0_1_0::lock,
            "wasmq:task/step@0.1.0": super::v0_2::wasmq::task0_1_0::step,
            "wasmq:task/jobs@0.1.0": super::v0_2::wasmq::task0_1_0::jobs,
        },
    });
}
