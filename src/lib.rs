//! llmproxy: a thread-per-core io_uring LLM API gateway.

pub mod admin;
pub mod app;
pub mod balance;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod http;
pub mod io;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod ratelimit;
pub mod route;
pub mod shard;
pub mod stats;
pub mod tls;
pub mod upstream;
