//! Validated configuration (startup): what the rest of the proxy reads. Built by `config::load` from
//! the raw YAML after every check passed; no `Option` where a default exists, every cross reference
//! resolved to an index.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `http_server.forwards[]`: one listener each.
    pub forwards: Vec<Forward>,
    /// `http_server.admin`.
    pub admin: Admin,
    /// `upstreams[]`.
    pub upstreams: Vec<Upstream>,
    /// `upstream_groups[]`.
    pub groups: Vec<Group>,
    /// `runtime` (our extension): shard count, driver, tick.
    pub runtime: Runtime,
    /// Which schema the file was written in.
    pub dialect: Dialect,
    /// Accepted settings that do nothing here (or less than the key suggests), one line each:
    /// logged as warnings at start (and by `-t`).
    pub warnings: Vec<String>,
}

/// The two schemas a config file may use, told apart by its top-level keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// LLMProxy's snake_case schema (`http_server`, `upstream_groups`), durations in seconds.
    LlmProxy,
    /// The Go port's camelCase schema (`httpServer`, `upstreamGroups`), durations in ms.
    GoPort,
}

/// A forwarding listener (`http_server.forwards[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    pub name: String,
    /// Resolved listen address (`address` + `port`; `address` may be an IP literal or `localhost`).
    pub listen: SocketAddr,
    /// Index into `Config::groups` of `upstream_group` / `default_group`.
    pub default_group: usize,
    /// `ratelimit` when present and enabled.
    pub ratelimit: Option<ForwardRateLimit>,
    /// `timeout.connect` (s, default 10, 1–120): time a client has to deliver a complete request
    /// head, and the longest gap allowed while it sends a request body.
    pub header_timeout: Duration,
    /// `timeout.idle` (s, default 60, 1–3600, our extension): keep-alive idle time between requests.
    pub idle_timeout: Duration,
    /// `routing[]` in declaration order.
    pub routes: Vec<Route>,
    /// `limits.max_body_bytes` (default 64 MiB, 0 = unlimited is not allowed; 1 B – 4 GiB).
    pub max_body_bytes: u64,
    /// `limits.max_head_bytes` (default 64 KiB, 1 KiB – 1 MiB).
    pub max_head_bytes: usize,
    /// `tls` when present: the listener speaks HTTPS.
    pub tls: Option<ListenerTls>,
}

/// `forwards[].tls`: certificate chain and key, loaded and checked when the config is loaded.
#[derive(Clone)]
pub struct ListenerTls {
    /// `cert_file`: PEM chain, leaf first.
    pub cert_file: String,
    /// `key_file`: PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// Built once, shared by the shards.
    pub config: Arc<rustls::ServerConfig>,
}

impl PartialEq for ListenerTls {
    fn eq(&self, o: &Self) -> bool {
        self.cert_file == o.cert_file && self.key_file == o.key_file
    }
}

impl std::fmt::Debug for ListenerTls {
    // The key material never reaches logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// Per-client-IP token bucket for a forward.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardRateLimit {
    /// `per_second` (default 100, 1–10000): tokens added per second.
    pub per_second: u32,
    /// `burst` (default 200, 1–20000, ≥ per_second): bucket size.
    pub burst: u32,
}

/// A path route (`routing[]`): requests whose path matches go to `target_group`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The pattern as written (`/v1/chat/completions`, `/v1/*`, `/v1/:name/x`).
    pub path: String,
    /// Index into `Config::groups`.
    pub target_group: usize,
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
    /// `timeout.connect` (s, default 10, 1–120): time to deliver a request head.
    pub header_timeout: Duration,
}

/// An upstream endpoint (`upstreams[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    /// The URL as written (after `${VAR}` expansion).
    pub url: String,
    pub scheme: Scheme,
    /// Host as written in the URL (name or IP literal, no brackets).
    pub host: String,
    pub port: u16,
    /// Value for the outgoing `Host` header (`host` or `host:port` when the port is not the default).
    pub host_header: String,
    /// Base path without a trailing slash ("" for none), e.g. "/v1".
    pub base_path: String,
    pub auth: Auth,
    pub headers: Vec<HeaderOp>,
    pub breaker: Breaker,
    /// `ratelimit`: requests sent to this upstream; None = unlimited.
    pub ratelimit: Option<UpstreamRateLimit>,
    /// Go dialect, URL with a path: that path (and query) is the request target, replacing the
    /// client's. None: the client's path and query are joined with `base_path`.
    pub replace_path: Option<ReplacePath>,
    /// How the upstream's certificate is checked: `Some` exactly for `https://` upstreams.
    pub tls: Option<UpstreamTls>,
}

/// `upstreams[].ratelimit`: a token bucket for what is sent to one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamRateLimit {
    /// `per_second` / `perSecond`: requests per second.
    pub per_second: u32,
    /// `burst` (Go dialect; default = `per_second`, one second's worth): bucket size.
    pub burst: u32,
}

/// The Go port's URL rule for an upstream URL with a path: the path replaces the client's; the
/// URL's query, when it has one, replaces the client's query, else the client's query is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplacePath {
    /// The URL's path as written (`/v1/chat/completions`).
    pub path: String,
    /// The URL's query without `?`, if it had one.
    pub query: Option<String>,
}

impl ReplacePath {
    /// Appends the request target for a client request to `client_pq` (path and query).
    pub fn write(&self, client_pq: &str, out: &mut bytes::BytesMut) {
        out.extend_from_slice(self.path.as_bytes());
        let client_query = client_pq.split_once('?').map(|(_, q)| q);
        if let Some(q) = self.query.as_deref().or(client_query) {
            out.extend_from_slice(b"?");
            out.extend_from_slice(q.as_bytes());
        }
    }
}

/// `upstreams[].tls` (defaults when absent) of an `https://` upstream.
#[derive(Clone)]
pub struct UpstreamTls {
    /// `ca_file`: PEM bundle trusted instead of the default roots (Mozilla's plus the system's).
    pub ca_file: Option<String>,
    /// `insecure_skip_verify` (default false): accept any certificate.
    pub insecure_skip_verify: bool,
    /// SNI and the name the certificate must carry: the URL's host (an IP address is checked
    /// against the certificate's IP entries and sends no SNI).
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// Built once, shared by every upstream with the same settings and by the shards.
    pub config: Arc<rustls::ClientConfig>,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, o: &Self) -> bool {
        self.ca_file == o.ca_file
            && self.insecure_skip_verify == o.insecure_skip_verify
            && self.server_name == o.server_name
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca_file", &self.ca_file)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("server_name", &self.server_name)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// Upstream authentication; replaces any client `Authorization` header.
#[derive(Clone, PartialEq)]
pub enum Auth {
    None,
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// `Authorization: Basic base64(user:pass)`; the field holds the ready header value.
    Basic {
        header_value: String,
    },
}

impl std::fmt::Debug for Auth {
    // Secrets never reach logs, not even through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Auth::Basic { .. } => f.write_str("Basic(<redacted>)"),
        }
    }
}

/// One `headers[]` operation, applied in order after hop-by-hop stripping.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderOp {
    /// Add only when the request does not already carry the header.
    Insert(http::HeaderName, http::HeaderValue),
    /// Set, replacing every existing value.
    Replace(http::HeaderName, http::HeaderValue),
    /// Delete every value.
    Remove(http::HeaderName),
}

/// Circuit breaker settings (`upstreams[].breaker`), always present (defaults when absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Breaker {
    /// `enabled` (default true): breakers guard every upstream unless switched off.
    pub enabled: bool,
    /// `threshold` (failure ratio, default 0.5, 0.01–1.0).
    pub threshold: f64,
    /// `cooldown` (s, default 30, 1–3600): open → half-open delay.
    pub cooldown: Duration,
    /// `max_requests` (default 3, 1–100): probes admitted in half-open across all shards.
    pub max_requests: u32,
    /// `interval` (s, default 10, 1–3600): sliding window for the failure rate.
    pub interval: Duration,
    /// `min_requests` (default 10, 1–10000): requests in the window before the rate can trip.
    pub min_requests: u32,
    /// `consecutive_failures` (default 5, 1–1000): a shard trips at once after this many in a row.
    pub consecutive_failures: u32,
    /// `count_429` (default true): whether 429 answers count as failures.
    pub count_429: bool,
}

/// Load-balancing strategy (`balance.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    WeightedRoundRobin,
    Random,
    ResponseAware,
    Failover,
    IpHash,
    LeastRequests,
}

/// An upstream group (`upstream_groups[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub members: Vec<Member>,
    pub strategy: Strategy,
    pub client: HttpClient,
}

/// A group member: index into `Config::upstreams` plus its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub upstream: usize,
    /// `weight` (default 1, 1–65535).
    pub weight: u32,
}

/// `upstream_groups[].http_client`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpClient {
    /// `agent` (default "LLMProxy/1.0"): the outgoing `User-Agent`.
    pub agent: String,
    /// `keepalive` (s, default 60, 0–600, 0 = off): TCP keepalive idle time on upstream sockets.
    pub tcp_keepalive: Option<Duration>,
    /// `stream` / `stream_mode` (default true): when true, a streamed answer (SSE or chunked) is
    /// bounded by `stream_idle` between chunks instead of by `request` as a whole.
    pub stream: bool,
    /// `timeout.connect` (s, default 10, 1–120): TCP connect (and TLS handshake).
    pub connect_timeout: Duration,
    /// `timeout.request` (s, default 300, 1–1200): whole exchange for non-streamed answers; for
    /// streamed answers (with `stream: true`) it bounds the time to the response head only.
    pub request_timeout: Duration,
    /// `timeout.first_byte` (s, default = `request`, 1–1200, our extension): request sent → first
    /// response byte.
    pub first_byte_timeout: Duration,
    /// `timeout.stream_idle` (s, default 60, 1–3600, our extension): longest gap between two reads
    /// of a streamed response body.
    pub stream_idle_timeout: Duration,
    /// `timeout.idle` (s, default 60, 5–1800): how long a pooled keep-alive connection may idle.
    pub pool_idle_timeout: Duration,
    /// `pool.max_idle` (default 64, 0–10000, our extension): idle connections kept per upstream per shard.
    pub pool_max_idle: usize,
    /// `retry` when present and enabled.
    pub retry: Option<Retry>,
    /// `proxy` when present and enabled.
    pub proxy: Option<Proxy>,
}

/// `http_client.retry`.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// `attempts` (default 3, 1–100): retries after the first try.
    pub attempts: u32,
    /// `initial` (ms, default 500, 100–10000): first backoff delay, doubled each retry.
    pub initial: Duration,
    /// `max_body_bytes` (default 1 MiB, 0–64 MiB, our extension): request bodies up to this size are
    /// kept so they can be replayed.
    pub max_replay_body_bytes: usize,
}

/// `http_client.proxy`: outbound HTTP proxy.
#[derive(Clone, PartialEq)]
pub struct Proxy {
    /// URL without credentials, for logs.
    pub display_url: String,
    pub host: String,
    pub port: u16,
    /// Ready `Proxy-Authorization` value when the URL carried credentials.
    pub authorization: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("url", &self.display_url)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Which io driver the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring, falling back to epoll when the kernel refuses it.
    Auto,
    Uring,
    Epoll,
}

/// `runtime` (our extension; CLI flags override).
#[derive(Debug, Clone, PartialEq)]
pub struct Runtime {
    /// `shards` (default 0 = one per available core, 0–1024).
    pub shards: usize,
    /// `driver` (default auto).
    pub driver: Driver,
    /// `tick_ms` (default 50, 5–10000): how often shards send stats deltas to the control thread.
    pub tick: Duration,
    /// `shutdown_timeout` (s, default 30, 1–3600): drain time on SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// `dns_refresh` (s, default 30, 0–86400; 0 = never): how often upstream and outbound proxy
    /// host names are resolved again, off the shards.
    pub dns_refresh: Duration,
}

impl Dialect {
    /// The YAML path of group `i`'s outbound proxy URL, as this dialect spells it.
    pub fn group_proxy_url_path(self, i: usize) -> String {
        match self {
            Dialect::LlmProxy => format!("upstream_groups[{i}].http_client.proxy.url"),
            Dialect::GoPort => format!("upstreamGroups[{i}].httpClient.proxy.url"),
        }
    }
}
