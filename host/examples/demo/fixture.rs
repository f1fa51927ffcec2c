//! The private servers the integration tests start (a `redis-server` and a
//! PostgreSQL, each on a free loopback port, in a scratch directory, killed
//! on drop), shared with the demo so it starts its own the same way: one
//! fixture helper per server, not two that drift apart.
#![allow(dead_code)]

#[path = "../../../tests/common/postgres.rs"]
pub mod postgres;
#[path = "../../../tests/common/redis.rs"]
pub mod redis;
#[path = "../../../tests/common/temp_dir.rs"]
mod temp_dir;

pub use temp_dir::TempDir;
