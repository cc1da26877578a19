//! Per-shard statistics (shard) and their merge (control thread): counters and latency histograms
//! that shards accumulate without locks and ship as one delta per tick.

mod control;
mod delta;
mod shard;

pub(crate) use control::SnapshotChannel;
pub use control::{
    lock_merged, spawn, BreakerStatus, ControlHandle, ForwardTotals, Merged, ShardProgress,
    UpstreamTotals,
};
pub use delta::{
    method_index, BreakerSample, DurationCounts, HttpErrorSample, HttpSample, LatencySamples,
    StatsDelta, UpstreamSample, BUCKETS, DURATION_BUCKETS_LE, DURATION_BUCKETS_US, METHODS,
    METHOD_LABELS, OTHER_PATH,
};
pub use shard::{
    path_label, run_ticker, run_ticker_with, ShardStats, StopSignal, Stopped, FINAL_FLUSH_ATTEMPTS,
    FINAL_FLUSH_PAUSE, MAX_ERROR_SERIES_PER_FORWARD, MAX_PATHS_PER_FORWARD, MAX_PATH_LABEL_BYTES,
};

#[cfg(test)]
pub(crate) mod testing;

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
    /// Number of kinds.
    pub const COUNT: usize = 5;

    /// Every kind, in [`index`](Self::index) order.
    pub const ALL: [UpstreamErrorKind; Self::COUNT] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Protocol,
        UpstreamErrorKind::Status5xx,
        UpstreamErrorKind::Status429,
    ];

    /// Dense index (0..COUNT) for per-kind counter arrays.
    pub fn index(self) -> usize {
        match self {
            UpstreamErrorKind::Connect => 0,
            UpstreamErrorKind::Timeout => 1,
            UpstreamErrorKind::Protocol => 2,
            UpstreamErrorKind::Status5xx => 3,
            UpstreamErrorKind::Status429 => 4,
        }
    }

    /// The `error` label value.
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
