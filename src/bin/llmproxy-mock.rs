//! `llmproxy-mock`: mock OpenAI-compatible LLM upstream (see `llmproxy::mock`).

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use llmproxy::mock::{run, MockConfig};

/// Mock OpenAI-compatible LLM upstream for tests and benchmarks.
///
/// Every knob can be overridden per request with a header:
/// x-mock-ttft-ms, x-mock-gap-ms, x-mock-tokens, x-mock-status,
/// x-mock-error-rate, x-mock-cut-after, x-mock-framing (chunked|length|close),
/// x-mock-close, x-mock-delay-ms, x-mock-body-bytes, x-mock-retry-after, x-mock-stamp.
#[derive(Debug, Parser)]
#[command(name = "llmproxy-mock", version)]
struct Cli {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// Threads (one monoio runtime each, SO_REUSEPORT on the same port).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Delay before the first SSE event, in ms.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Delay between SSE token events, in ms.
    #[arg(long, default_value_t = 0)]
    gap_ms: u64,
    /// Completion tokens per answer.
    #[arg(long, default_value_t = 16)]
    tokens: u64,
    /// Status for injected errors (0 = none). Alone it fails every request.
    #[arg(long, default_value_t = 0)]
    error_status: u16,
    /// Fraction 0.0-1.0 of LLM requests answered with --error-status
    /// (500 if unset). Deterministic: 0.25 fails every 4th request.
    #[arg(long)]
    error_rate: Option<f64>,
    /// Close the connection abruptly after N SSE events (0 = never).
    #[arg(long, default_value_t = 0)]
    cut_after: u64,
    /// Streams generated at once (0 = unlimited); more wait for a slot, as on a vLLM server
    /// at its max_num_seqs.
    #[arg(long, default_value_t = 0)]
    max_concurrency: usize,
    /// Serve HTTPS: PEM certificate chain (leaf first). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<String>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<String>,
    /// Put a `: t=<CLOCK_MONOTONIC ns>` SSE comment line in front of every event, stamped just
    /// before its write (per-event latency measurements on one machine).
    #[arg(long)]
    stamp: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr; stdout carries only the "listening" line.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let error_rate = match cli.error_rate {
        Some(r) if !(0.0..=1.0).contains(&r) => {
            eprintln!("llmproxy-mock: --error-rate must be within 0.0..=1.0");
            return ExitCode::from(2);
        }
        Some(r) => r,
        None if cli.error_status != 0 => 1.0,
        None => 0.0,
    };
    if cli.error_status != 0 && !(100..=999).contains(&cli.error_status) {
        eprintln!("llmproxy-mock: --error-status must be 0 or 100..=999");
        return ExitCode::from(2);
    }
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => match llmproxy::tls::server_config(cert, key) {
            Ok(c) => Some(c),
            Err(errs) => {
                for e in errs {
                    eprintln!(
                        "llmproxy-mock: --tls-{}: {}",
                        if e.key == "key_file" { "key" } else { "cert" },
                        e.message
                    );
                }
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let cfg = MockConfig {
        listen: cli.listen,
        threads: cli.threads.max(1),
        ttft_ms: cli.ttft_ms,
        gap_ms: cli.gap_ms,
        tokens: cli.tokens,
        error_status: cli.error_status,
        error_rate,
        cut_after: cli.cut_after,
        max_concurrency: cli.max_concurrency,
        tls,
        stamp: cli.stamp,
    };
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmproxy-mock: {e}");
            ExitCode::FAILURE
        }
    }
}
