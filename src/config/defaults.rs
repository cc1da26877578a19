//! Configuration defaults and ranges (startup): one named constant per defaultable key, so the
//! validator, `config.default.yaml` and the tests agree on a single value.

/// `forwards[].port`.
pub const FORWARD_PORT: u16 = 3000;
/// `forwards[].address` and `admin.address`.
pub const LISTEN_ADDRESS: &str = "0.0.0.0";
/// `forwards[].ratelimit.enabled` when the block is present.
pub const FORWARD_RATELIMIT_ENABLED: bool = true;
/// `forwards[].ratelimit.per_second` (1–10000).
pub const FORWARD_RATELIMIT_PER_SECOND: u64 = 100;
pub const FORWARD_RATELIMIT_PER_SECOND_RANGE: (u64, u64) = (1, 10_000);
/// `forwards[].ratelimit.burst` (1–20000, ≥ per_second).
pub const FORWARD_RATELIMIT_BURST: u64 = 200;
pub const FORWARD_RATELIMIT_BURST_RANGE: (u64, u64) = (1, 20_000);
/// `forwards[].timeout.connect` and `admin.timeout.connect` (s, 1–120).
pub const HEADER_TIMEOUT_S: u64 = 10;
pub const HEADER_TIMEOUT_RANGE: (u64, u64) = (1, 120);
/// `forwards[].timeout.idle` (s, 1–3600).
pub const FORWARD_IDLE_TIMEOUT_S: u64 = 60;
pub const FORWARD_IDLE_TIMEOUT_RANGE: (u64, u64) = (1, 3600);
/// `forwards[].limits.max_body_bytes` (1 B – 4 GiB).
pub const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
pub const MAX_BODY_BYTES_RANGE: (u64, u64) = (1, 4 * 1024 * 1024 * 1024);
/// `forwards[].limits.max_head_bytes` (1 KiB – 1 MiB).
pub const MAX_HEAD_BYTES: u64 = 64 * 1024;
pub const MAX_HEAD_BYTES_RANGE: (u64, u64) = (1024, 1024 * 1024);

/// `admin.port`.
pub const ADMIN_PORT: u16 = 9000;

/// `upstreams[].weight` (accepted, unused; 1–65535).
pub const WEIGHT: u64 = 1;
pub const WEIGHT_RANGE: (u64, u64) = (1, 65_535);
/// `upstreams[].breaker.enabled`.
pub const BREAKER_ENABLED: bool = true;
/// `upstreams[].breaker.threshold` (failure ratio, 0.01–1.0).
pub const BREAKER_THRESHOLD: f64 = 0.5;
pub const BREAKER_THRESHOLD_RANGE: (f64, f64) = (0.01, 1.0);
/// `upstreams[].breaker.cooldown` (s, 1–3600).
pub const BREAKER_COOLDOWN_S: u64 = 30;
pub const BREAKER_COOLDOWN_RANGE: (u64, u64) = (1, 3600);
/// `upstreams[].breaker.max_requests` (1–100).
pub const BREAKER_MAX_REQUESTS: u64 = 3;
pub const BREAKER_MAX_REQUESTS_RANGE: (u64, u64) = (1, 100);
/// `upstreams[].breaker.interval` (s, 1–3600).
pub const BREAKER_INTERVAL_S: u64 = 10;
pub const BREAKER_INTERVAL_RANGE: (u64, u64) = (1, 3600);
/// `upstreams[].breaker.min_requests` (1–10000).
pub const BREAKER_MIN_REQUESTS: u64 = 10;
pub const BREAKER_MIN_REQUESTS_RANGE: (u64, u64) = (1, 10_000);
/// `upstreams[].breaker.consecutive_failures` (1–1000).
pub const BREAKER_CONSECUTIVE_FAILURES: u64 = 5;
pub const BREAKER_CONSECUTIVE_FAILURES_RANGE: (u64, u64) = (1, 1000);
/// `upstreams[].breaker.count_429`.
pub const BREAKER_COUNT_429: bool = true;
/// `upstreams[].ratelimit.per_second` (1–65535).
pub const UPSTREAM_RATELIMIT_RANGE: (u64, u64) = (1, 65_535);

/// `http_client.agent`.
pub const AGENT: &str = "LLMProxy/1.0";
/// `http_client.keepalive` (s, 0–600, 0 = off).
pub const KEEPALIVE_S: u64 = 60;
pub const KEEPALIVE_RANGE: (u64, u64) = (0, 600);
/// `http_client.stream` / `stream_mode`.
pub const STREAM: bool = true;
/// `http_client.timeout.connect` (s, 1–120).
pub const CONNECT_TIMEOUT_S: u64 = 10;
pub const CONNECT_TIMEOUT_RANGE: (u64, u64) = (1, 120);
/// `http_client.timeout.request` (s, 1–1200); also the default of `first_byte`.
pub const REQUEST_TIMEOUT_S: u64 = 300;
pub const REQUEST_TIMEOUT_RANGE: (u64, u64) = (1, 1200);
/// `http_client.timeout.first_byte` (s, 1–1200; default = `request`).
pub const FIRST_BYTE_TIMEOUT_RANGE: (u64, u64) = (1, 1200);
/// `http_client.timeout.stream_idle` (s, 1–3600).
pub const STREAM_IDLE_TIMEOUT_S: u64 = 60;
pub const STREAM_IDLE_TIMEOUT_RANGE: (u64, u64) = (1, 3600);
/// `http_client.timeout.idle` (s, 5–1800): pooled connection idle time.
pub const POOL_IDLE_TIMEOUT_S: u64 = 60;
pub const POOL_IDLE_TIMEOUT_RANGE: (u64, u64) = (5, 1800);
/// `http_client.pool.max_idle` (0–10000).
pub const POOL_MAX_IDLE: u64 = 64;
pub const POOL_MAX_IDLE_RANGE: (u64, u64) = (0, 10_000);
/// `http_client.retry.enabled` when the block is present.
pub const RETRY_ENABLED: bool = true;
/// `http_client.retry.attempts` (1–100).
pub const RETRY_ATTEMPTS: u64 = 3;
pub const RETRY_ATTEMPTS_RANGE: (u64, u64) = (1, 100);
/// `http_client.retry.initial` (ms, 100–10000).
pub const RETRY_INITIAL_MS: u64 = 500;
pub const RETRY_INITIAL_RANGE: (u64, u64) = (100, 10_000);
/// `http_client.retry.max_body_bytes` (0–64 MiB).
pub const RETRY_MAX_BODY_BYTES: u64 = 1024 * 1024;
pub const RETRY_MAX_BODY_BYTES_RANGE: (u64, u64) = (0, 64 * 1024 * 1024);
/// `http_client.proxy.enabled` when the block is present.
pub const PROXY_ENABLED: bool = true;

/// `runtime.shards` (0 = one per core, 0–1024).
pub const SHARDS: u64 = 0;
pub const SHARDS_RANGE: (u64, u64) = (0, 1024);
/// `runtime.tick_ms` (ms, 5–10000).
pub const TICK_MS: u64 = 50;
pub const TICK_RANGE: (u64, u64) = (5, 10_000);
/// `runtime.dns_refresh` (s, 0 = resolve only at start, 0–86400).
pub const DNS_REFRESH_S: u64 = 30;
pub const DNS_REFRESH_RANGE: (u64, u64) = (0, 86_400);
/// `runtime.shutdown_timeout` (s, 1–3600).
pub const SHUTDOWN_TIMEOUT_S: u64 = 30;
pub const SHUTDOWN_TIMEOUT_RANGE: (u64, u64) = (1, 3600);

/// `upstreams[].tls.insecure_skip_verify`: certificates are checked unless switched off.
pub const UPSTREAM_TLS_INSECURE_SKIP_VERIFY: bool = false;

/// The llmproxy-go dialect: its documented defaults and ranges (durations in ms). A `0` in a
/// Go file means "the default" (the Go port's zero-value rule), except for `keepalive`.
pub mod go {
    /// `httpServer.forwards[].ratelimit.perSecond` (1–65535).
    pub const FORWARD_RATELIMIT_PER_SECOND: u64 = 100;
    pub const RATELIMIT_RANGE: (u64, u64) = (1, 65_535);
    /// `httpServer.forwards[].ratelimit.burst` (1–65535): the documented 200 (the Go code falls
    /// back to 1, which rejects a second request from one client within the same 1/perSecond).
    pub const FORWARD_RATELIMIT_BURST: u64 = 200;
    /// `upstreams[].ratelimit.perSecond` (1–65535) when the block is present; `burst` defaults
    /// to perSecond (one second's worth).
    pub const UPSTREAM_RATELIMIT_PER_SECOND: u64 = 100;
    /// Every server and client timeout (ms, 1 s – 24 h).
    pub const TIMEOUT_RANGE_MS: (u64, u64) = (1000, 86_400_000);
    /// `forwards[].timeout.idle` and `admin.timeout.idle` (ms).
    pub const SERVER_IDLE_MS: u64 = 60_000;
    /// `forwards[].timeout.read` and `admin.timeout.read` (ms).
    pub const SERVER_READ_MS: u64 = 30_000;
    /// `upstreams[].breaker.threshold` (0.01–1.0).
    pub const BREAKER_THRESHOLD: f64 = 0.5;
    /// `upstreams[].breaker.cooldown` (ms, 1 s – 1 h).
    pub const BREAKER_COOLDOWN_MS: u64 = 30_000;
    pub const BREAKER_COOLDOWN_RANGE_MS: (u64, u64) = (1000, 3_600_000);
    /// `upstreams[].breaker.maxRequests` (1–100).
    pub const BREAKER_MAX_REQUESTS: u64 = 3;
    /// `upstreams[].breaker.interval` (ms, 1 s – 1 h).
    pub const BREAKER_INTERVAL_MS: u64 = 10_000;
    pub const BREAKER_INTERVAL_RANGE_MS: (u64, u64) = (1000, 3_600_000);
    /// `httpClient.keepalive` (ms, 0–600000, 0 = off).
    pub const KEEPALIVE_MS: u64 = 60_000;
    pub const KEEPALIVE_RANGE_MS: (u64, u64) = (0, 600_000);
    /// `httpClient.connect.idleTotal` (0–1000).
    pub const IDLE_TOTAL: u64 = 100;
    pub const IDLE_TOTAL_RANGE: (u64, u64) = (0, 1000);
    /// `httpClient.connect.idlePerHost` (0–100).
    pub const IDLE_PER_HOST: u64 = 10;
    pub const IDLE_PER_HOST_RANGE: (u64, u64) = (0, 100);
    /// `httpClient.connect.maxPerHost` (0–500).
    pub const MAX_PER_HOST: u64 = 50;
    pub const MAX_PER_HOST_RANGE: (u64, u64) = (0, 500);
    /// `httpClient.timeout.connect` (ms).
    pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
    /// `httpClient.timeout.request` (ms).
    pub const REQUEST_TIMEOUT_MS: u64 = 300_000;
    /// `httpClient.timeout.idle` (ms): pooled connection idle time.
    pub const POOL_IDLE_TIMEOUT_MS: u64 = 60_000;
}
