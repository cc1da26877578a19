//! Command-line flags (startup).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// llmproxyd: a thread-per-core io_uring LLM API gateway (LLMProxy-compatible config).
#[derive(Debug, Parser)]
#[command(name = "llmproxyd", version, about, disable_version_flag = true)]
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

    /// Log as JSON lines (`-j` as in llmproxy-go).
    #[arg(short = 'j', long)]
    pub json: bool,

    /// Accepted for llmproxy-go compatibility; no effect: llmproxyd always runs as the Go
    /// port's release mode does (no debug endpoints; log level from `--log-level`).
    #[arg(short = 'r', long)]
    pub release: bool,

    /// Log level: off, error, warn (or warning), info, debug, trace; or tracing directives
    /// such as `llmproxy=debug,warn`.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,

    /// Same as `--log-level debug` (LLMProxy's flag).
    #[arg(short = 'd', long = "debug")]
    pub debug: bool,

    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT (1–3600). Default:
    /// `runtime.shutdown_timeout` (30).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_timeout: Option<u64>,

    /// Print version (`-v` as in llmproxy-go).
    #[arg(short = 'V', long = "version", short_alias = 'v', action = clap::ArgAction::Version)]
    version: Option<bool>,
}

/// `--driver` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DriverArg {
    Auto,
    Uring,
    Epoll,
}

const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// Checks `--log-level`. A bare word must be a level: tracing would otherwise read an unknown
/// word (`warning`, `verbose`) as a target name and silently drop every other log line,
/// errors included. Directive lists (`target=level,…`) are passed through when they parse.
fn parse_log_level(s: &str) -> Result<String, String> {
    let word = s.trim().to_ascii_lowercase();
    let word = if word == "warning" {
        "warn".to_owned()
    } else {
        word
    };
    if LEVELS.contains(&word.as_str()) {
        return Ok(word);
    }
    if s.contains('=') || s.contains(',') {
        let all_parts_ok = s.split(',').filter(|d| !d.trim().is_empty()).all(|d| {
            let level = d
                .rsplit('=')
                .next()
                .unwrap_or(d)
                .trim()
                .to_ascii_lowercase();
            LEVELS.contains(&level.as_str())
        });
        if all_parts_ok && tracing_subscriber::EnvFilter::try_new(s).is_ok() {
            return Ok(s.to_owned());
        }
    }
    Err(format!(
        "`{s}` is not a log level (expected one of: {}, warning; or directives like `llmproxy=debug,warn`)",
        LEVELS.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_log_level;

    #[test]
    fn log_levels() {
        assert_eq!(parse_log_level("WARNING").unwrap(), "warn");
        assert_eq!(parse_log_level("Info").unwrap(), "info");
        assert_eq!(
            parse_log_level("llmproxy=debug,warn").unwrap(),
            "llmproxy=debug,warn"
        );
        for bad in ["verbose", "warnings", "llmproxy=loud", ""] {
            assert!(parse_log_level(bad).is_err(), "{bad}");
        }
    }
}
