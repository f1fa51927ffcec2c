//! The flags that size what one component may contain
//! ([`ComponentLimits`]), shared by every command that builds an engine:
//! `wasmq worker` runs with them, `wasmq deploy` validates against them
//! (so keep the two the same), `wasmq run` and `wasmq bench --local` try a
//! component under them.
//!
//! Defaults are [`DEFAULT_COMPONENT_LIMITS`], so the help shows them.

use clap::Args;

use crate::engine::{ComponentLimits, DEFAULT_COMPONENT_LIMITS};

/// See the module docs.
#[derive(Debug, Clone, Args)]
pub struct ComponentLimitArgs {
    /// Most core module instances one component may contain (a
    /// componentize-py task has 14, and one more per native extension).
    #[arg(long = "max-core-instances", value_name = "N",
          default_value_t = DEFAULT_COMPONENT_LIMITS.core_instances,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub core_instances: u32,
    /// Most linear memories one component may define.
    #[arg(long = "max-memories", value_name = "N",
          default_value_t = DEFAULT_COMPONENT_LIMITS.memories,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub memories: u32,
    /// Most tables one component may define.
    #[arg(long = "max-tables", value_name = "N",
          default_value_t = DEFAULT_COMPONENT_LIMITS.tables,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub tables: u32,
    /// Most elements one table may hold (Python and JavaScript runtimes
    /// start with 5,700-7,700).
    #[arg(long = "max-table-elements", value_name = "N",
          default_value_t = DEFAULT_COMPONENT_LIMITS.table_elements as u32,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub table_elements: u32,
}

impl ComponentLimitArgs {
    /// The limits the flags say.
    pub fn limits(&self) -> ComponentLimits {
        ComponentLimits {
            core_instances: self.core_instances,
            memories: self.memories,
            tables: self.tables,
            table_elements: self.table_elements as usize,
        }
    }
}
