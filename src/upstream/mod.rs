//! Upstream side (shard): the outgoing request head, and connections with their per-shard pool.

pub mod pool;
pub mod request;

pub use pool::{Pool, UpConn};
