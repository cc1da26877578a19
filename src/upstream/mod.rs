//! Upstream side (shard): the outgoing request head, opening connections (TCP, proxy tunnel,
//! TLS), and the per-shard keep-alive pool.

pub mod connect;
pub mod dns;
pub mod pool;
pub mod request;

pub use pool::{Pool, UpConn};
