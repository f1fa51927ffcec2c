//! Host bindings generated from `wit/` (the single source of truth, shared
//! with the guest SDK's `generate!`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "task",
    imports: { default: async },
    exports: { default: async },
});
