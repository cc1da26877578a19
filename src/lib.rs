//! llmproxy: a thread-per-core io_uring LLM API gateway.

pub mod admin;
pub mod config;
pub mod metrics;
pub mod mock;
pub mod route;
pub mod stats;
