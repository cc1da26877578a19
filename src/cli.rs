//! Command-line flags (startup).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// llmproxyd: a thread-per-core io_uring LLM API gateway (LLMProxy-compatible config).
#[derive(Debug, Parser)]
#[command(name = "llmproxyd", version, about)]
pub struct Cli {
    /// Config file (YAML). Without it the embedded config.default.yaml is used.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the config and exit (0 when valid), like `nginx -t`.
    #[arg(short = 't', long = "test")]
    pub test: bool,

    /// Number of shards (threads, one per core). Default: `runtime.shards`, else one per
    /// available core.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: Option<u16>,

    /// IO driver: io_uring, epoll, or auto (io_uring with epoll fallback).
    #[arg(long, value_enum, value_name = "DRIVER")]
    pub driver: Option<DriverArg>,

    /// Log as JSON lines.
    #[arg(long)]
    pub json: bool,

    /// Log level: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Same as `--log-level debug` (LLMProxy's flag).
    #[arg(short = 'd', long = "debug")]
    pub debug: bool,

    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT (1–3600). Default:
    /// `runtime.shutdown_timeout` (30).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_timeout: Option<u64>,
}

/// `--driver` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DriverArg {
    Auto,
    Uring,
    Epoll,
}
