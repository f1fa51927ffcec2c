//! Test-only guest: a plain WASI command component (`fn main`), which
//! implements `wasi:cli/command`, not the wasmq `task` world. The host must
//! refuse it as `invalid-component` (wrong world / missing `run` export).

fn main() {
    println!("a WASI command, not a wasmq task");
}
