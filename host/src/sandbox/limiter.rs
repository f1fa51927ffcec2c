//! Caps on a job's linear memory and tables, and a record of how close the
//! job came to them.
//!
//! When a guest asks to grow past its cap the grow fails (the guest sees -1,
//! as the wasm spec allows), the limiter remembers it, and the sandbox files
//! the resulting trap under `memory-limit` rather than a generic `trap`.

use wasmtime::ResourceLimiter;

/// See the module docs.
#[derive(Debug)]
pub struct JobLimiter {
    max_memory_bytes: usize,
    max_table_elements: usize,
    /// Largest linear memory size seen, in bytes.
    pub peak_memory_bytes: usize,
    /// Set when a memory or table grow was refused.
    pub limit_hit: Option<String>,
}

impl JobLimiter {
    /// A limiter with these caps.
    pub fn new(max_memory_bytes: u64, max_table_elements: usize) -> Self {
        JobLimiter {
            max_memory_bytes: usize::try_from(max_memory_bytes).unwrap_or(usize::MAX),
            max_table_elements,
            peak_memory_bytes: 0,
            limit_hit: None,
        }
    }
}

impl ResourceLimiter for JobLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory_bytes {
            self.limit_hit = Some(format!(
                "linear memory would grow from {} to {} bytes, over the cap of {} bytes",
                current, desired, self.max_memory_bytes
            ));
            return Ok(false);
        }
        self.peak_memory_bytes = self.peak_memory_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_table_elements {
            self.limit_hit = Some(format!(
                "table would grow from {} to {} elements, over the cap of {}",
                current, desired, self.max_table_elements
            ));
            return Ok(false);
        }
        Ok(true)
    }
}
