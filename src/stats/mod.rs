//! Per-shard statistics (shard) and their merge (control thread): counters and latency histograms
//! that shards accumulate without locks and ship as one delta per tick.

use std::time::Duration;

/// Why an upstream exchange failed, as a metric label (`llmproxy_upstream_errors_total{error}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamErrorKind {
    /// TCP (or TLS) connect failed or was refused.
    Connect,
    /// connect, first-byte, idle or total timeout.
    Timeout,
    /// the connection broke or the upstream sent something unparsable.
    Protocol,
    /// the upstream answered 5xx.
    Status5xx,
    /// the upstream answered 429.
    Status429,
}

impl UpstreamErrorKind {
    pub fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect_error",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol_error",
            UpstreamErrorKind::Status5xx => "upstream_5xx",
            UpstreamErrorKind::Status429 => "upstream_429",
        }
    }
}

/// One shard's statistics, owned by the shard (`Rc`), mutated without locks.
#[derive(Default)]
pub struct ShardStats {}

impl ShardStats {
    /// A downstream request finished (or was answered by the proxy itself).
    pub fn http_request(
        &self,
        _forward: usize,
        _method: &http::Method,
        _path: &str,
        _status: u16,
        _elapsed: Duration,
    ) {
    }

    /// A downstream request ended in an error the proxy reports (`error` is a short label such
    /// as `bad_request`, `upstream_unreachable`, `upstream_timeout`, `payload_too_large`).
    pub fn http_error(&self, _forward: usize, _error: &'static str, _status: u16) {}

    /// One exchange with an upstream ended; `error` is None on success.
    pub fn upstream_request(
        &self,
        _group: usize,
        _upstream: usize,
        _elapsed: Duration,
        _error: Option<UpstreamErrorKind>,
    ) {
    }
}
