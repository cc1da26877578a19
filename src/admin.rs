//! Admin listener (its own thread with a small monoio runtime, never a shard): `/health`, `/ping`,
//! `/metrics`, `/status`, read from the control thread's merged statistics and the shards' health.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use serde_json::json;

use crate::config::Config;
use crate::stats::{Merged, UpstreamErrorKind};

/// Largest request head accepted (bytes); larger heads get 431 and the connection is closed.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Headers parsed per request.
const MAX_HEADERS: usize = 64;

/// After an error reply: how long, and how many bytes, the client's leftovers are drained.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 256 * 1024;

/// How often the accept loop checks for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// Whether the proxy serves: shards report when they start and stop serving, shutdown sets the
/// draining flag. Atomics, because shards, the app and the admin thread all touch it (never on the
/// request path).
#[derive(Debug, Default)]
pub struct Health {
    serving: AtomicUsize,
    expected: AtomicUsize,
    draining: AtomicBool,
}

impl Health {
    /// Health for a proxy that will run `expected_shards` shards.
    pub fn new(expected_shards: usize) -> Self {
        Health {
            serving: AtomicUsize::new(0),
            expected: AtomicUsize::new(expected_shards),
            draining: AtomicBool::new(false),
        }
    }

    /// Sets the number of shards to wait for (when it is only known after startup).
    pub fn set_expected(&self, shards: usize) {
        self.expected.store(shards, Ordering::Release);
    }

    /// A shard started serving (its listeners are bound).
    pub fn shard_up(&self) {
        self.serving.fetch_add(1, Ordering::AcqRel);
    }

    /// A shard stopped serving.
    pub fn shard_down(&self) {
        let _ = self
            .serving
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Shutdown started: `/health` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Shards currently serving.
    pub fn serving(&self) -> usize {
        self.serving.load(Ordering::Acquire)
    }

    /// Shards expected to serve.
    pub fn expected(&self) -> usize {
        self.expected.load(Ordering::Acquire)
    }

    /// True when every expected shard serves and shutdown has not started.
    pub fn is_healthy(&self) -> bool {
        let expected = self.expected();
        !self.is_draining() && expected > 0 && self.serving() >= expected
    }
}

/// The running admin listener.
pub struct AdminHandle {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminHandle {
    /// The bound address (useful when the configured port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, drops open admin connections and joins the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("admin thread panicked");
            }
        }
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What a connection task needs.
struct Ctx {
    config: Arc<Config>,
    merged: Arc<Mutex<Merged>>,
    health: Arc<Health>,
    stop: Arc<AtomicBool>,
}

/// Binds `config.admin.listen` (without SO_REUSEPORT, so a second instance fails with
/// EADDRINUSE) and starts serving on a new thread. Bind and runtime errors are returned here.
pub fn spawn(
    config: Arc<Config>,
    merged: Arc<Mutex<Merged>>,
    health: Arc<Health>,
) -> io::Result<AdminHandle> {
    // std's listener sets SO_REUSEADDR (quick restarts) but never SO_REUSEPORT.
    let std_listener = std::net::TcpListener::bind(config.admin.listen)?;
    std_listener.set_nonblocking(true)?;
    let local_addr = std_listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = Ctx {
        config,
        merged,
        health,
        stop: stop.clone(),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let thread = std::thread::Builder::new()
        .name("llmproxy-admin".into())
        .spawn(move || {
            let mut rt = match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                accept_loop(listener, Rc::new(ctx)).await;
            });
        })?;
    let ready = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("admin thread exited during startup")));
    if let Err(e) = ready {
        let _ = thread.join();
        return Err(e);
    }
    tracing::info!(%local_addr, "admin listener bound");
    Ok(AdminHandle {
        local_addr,
        stop,
        thread: Some(thread),
    })
}

async fn accept_loop(listener: TcpListener, ctx: Rc<Ctx>) {
    while !ctx.stop.load(Ordering::Acquire) {
        match monoio::time::timeout(ACCEPT_POLL, listener.accept()).await {
            Err(_elapsed) => {}
            Ok(Ok((stream, _peer))) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(serve_connection(stream, ctx.clone()));
            }
            Ok(Err(e)) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                monoio::time::sleep(ACCEPT_POLL).await;
            }
        }
    }
}

/// The parts of a request head the admin endpoints look at.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    /// An HTTP/1.0 request: keep-alive must then be said in the answer.
    http10: bool,
    has_body: bool,
}

/// Parses one request head from the front of `buf`: `Ok(Some((head, len)))` when complete,
/// `Ok(None)` when more bytes are needed, `Err(status)` when the request is unusable.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, u16> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD_BYTES {
                Err(431)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(431),
        Err(_) => return Err(400),
    };
    if len > MAX_HEAD_BYTES {
        return Err(431);
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(400);
    };
    let mut keep_alive = version == 1;
    let mut has_body = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value);
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).map(str::trim).unwrap_or("x");
            match v.parse::<u64>() {
                Ok(0) => {}
                Ok(_) => has_body = true,
                Err(_) => return Err(400),
            }
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or("").to_string();
    Ok(Some((
        Head {
            method: method.to_string(),
            path,
            keep_alive,
            http10: version == 0,
            has_body,
        },
        len,
    )))
}

/// A response ready to be written.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    allow: bool,
}

impl Reply {
    fn json(status: u16, value: serde_json::Value) -> Self {
        Reply {
            status,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
            allow: false,
        }
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        let kind = if status >= 500 {
            "server_error"
        } else {
            "invalid_request_error"
        };
        Reply::json(
            status,
            json!({"error": {"message": message, "type": kind, "code": code}}),
        )
    }

    /// Serialises the reply; `head_only` for HEAD requests; `http10` for an HTTP/1.0 client
    /// (which closes after an answer that does not say keep-alive).
    fn encode(&self, keep_alive: bool, head_only: bool, http10: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.body.len());
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\n",
                self.status,
                reason(self.status),
                self.content_type,
                self.body.len()
            )
            .as_bytes(),
        );
        if self.allow {
            out.extend_from_slice(b"allow: GET, HEAD\r\n");
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The one place that maps a request to a reply.
fn route(head: &Head, ctx: &Ctx) -> Reply {
    let known = matches!(
        head.path.as_str(),
        "/health" | "/ping" | "/metrics" | "/status"
    );
    if !known {
        return Reply::error(404, "not_found", "no such admin endpoint");
    }
    if head.method != "GET" && head.method != "HEAD" {
        let mut r = Reply::error(405, "method_not_allowed", "use GET");
        r.allow = true;
        return r;
    }
    match head.path.as_str() {
        "/health" => {
            if ctx.health.is_healthy() {
                Reply::json(200, json!({"status": "ok"}))
            } else {
                Reply::json(503, json!({"status": "draining"}))
            }
        }
        "/ping" => Reply {
            status: 200,
            content_type: "text/plain; charset=utf-8",
            body: b"pong".to_vec(),
            allow: false,
        },
        "/metrics" => {
            let text = {
                let m = crate::stats::lock_merged(&ctx.merged);
                crate::metrics::render(&m, &ctx.config)
            };
            Reply {
                status: 200,
                content_type: crate::metrics::CONTENT_TYPE,
                body: text.into_bytes(),
                allow: false,
            }
        }
        _ => {
            let status = {
                let m = crate::stats::lock_merged(&ctx.merged);
                status_json(&m, &ctx.config, &ctx.health, Instant::now())
            };
            Reply::json(200, status)
        }
    }
}

/// p50/p90/p99/max of a µs latency histogram, in ms.
fn percentiles_ms(h: &hdrhistogram::Histogram<u64>) -> serde_json::Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)),
        "max": ms(h.max()),
    })
}

/// `/status`: stats pipeline progress per shard and per-upstream totals with latency percentiles.
fn status_json(m: &Merged, config: &Config, health: &Health, now: Instant) -> serde_json::Value {
    let shards: Vec<_> = m
        .shards
        .iter()
        .map(|(id, p)| {
            json!({
                "shard": id,
                "last_seq": p.last_seq,
                "last_delta_age_ms": now.saturating_duration_since(p.last_delta_at).as_millis() as u64,
                "deltas_received": p.deltas_received,
                "deltas_dropped": p.failed_sends,
                "deltas_lost": p.deltas_lost,
                "requests": p.requests,
                "epoch": p.epoch,
            })
        })
        .collect();
    let upstreams: Vec<_> = config
        .upstreams
        .iter()
        .enumerate()
        .map(|(ui, u)| {
            let mut requests = 0u64;
            let mut errors = [0u64; UpstreamErrorKind::COUNT];
            for ((_, upstream), t) in &m.upstreams {
                if *upstream == ui {
                    requests += t.duration.count();
                    for (a, b) in errors.iter_mut().zip(t.errors.iter()) {
                        *a += b;
                    }
                }
            }
            let errors: serde_json::Map<_, _> = UpstreamErrorKind::ALL
                .iter()
                .map(|k| (k.label().to_string(), json!(errors[k.index()])))
                .collect();
            let mut v = json!({"name": u.name, "requests": requests, "errors": errors});
            if let Some(b) = m.breakers.get(ui) {
                v["breaker"] = json!({
                    "enabled": u.breaker.enabled,
                    "state": b.state.label(),
                    "latency_ema_ms": b.latency_ema_ms,
                    "success_rate": b.success_rate,
                    "window": {"successes": b.window_successes, "failures": b.window_failures},
                    "calls": {"success": b.successes, "failure": b.failures, "rejected": b.rejected},
                    "opened": b.entered(crate::breaker::BreakerState::Open),
                    "half_opened": b.entered(crate::breaker::BreakerState::HalfOpen),
                    "closed": b.entered(crate::breaker::BreakerState::Closed),
                    "probe_round": b.probe_round,
                    "probe_quota": b.probe_quota,
                });
            }
            if let Some(h) = m.upstream_latency.get(ui).filter(|h| !h.is_empty()) {
                v["latency_ms"] = percentiles_ms(h);
            }
            v
        })
        .collect();
    let forwards: Vec<_> = config
        .forwards
        .iter()
        .enumerate()
        .map(|(fi, f)| {
            let mut v = json!({"name": f.name});
            if let Some(t) = m.forwards.get(fi) {
                v["requests"] = json!(t.latency.len());
                if !t.latency.is_empty() {
                    v["latency_ms"] = percentiles_ms(&t.latency);
                }
            }
            v
        })
        .collect();
    json!({
        "uptime_seconds": now.saturating_duration_since(m.started).as_secs(),
        "health": {
            "healthy": health.is_healthy(),
            "draining": health.is_draining(),
            "shards_serving": health.serving(),
            "shards_expected": health.expected(),
        },
        "stats": {
            "deltas_received": m.deltas_received,
            "deltas_dropped": m.failed_sends(),
            "deltas_lost": m.deltas_lost(),
            "invalid_records": m.invalid_records,
        },
        "epoch": m.epoch,
        "shards": shards,
        "forwards": forwards,
        "upstreams": upstreams,
    })
}

/// Answers an unusable request and closes. The write side is shut first and what the client still
/// sends is drained briefly, so unread bytes do not turn the close into an RST that destroys the
/// error reply before the client reads it.
async fn reject(stream: &mut TcpStream, reply: Reply) {
    if !write_reply(stream, reply.encode(false, false, false)).await {
        return;
    }
    let _ = stream.shutdown().await;
    let deadline = monoio::time::Instant::now() + LINGER;
    let mut drained = 0usize;
    let mut chunk = Vec::with_capacity(4096);
    while drained < LINGER_BYTES {
        match monoio::time::timeout_at(deadline, stream.read(chunk)).await {
            Ok((Ok(n), c)) if n > 0 => {
                drained += n;
                chunk = c;
            }
            _ => return,
        }
    }
}

async fn write_reply(stream: &mut TcpStream, bytes: Vec<u8>) -> bool {
    let (res, _) = stream.write_all(bytes).await;
    res.is_ok()
}

/// One admin connection: HTTP/1.1 with keep-alive and pipelining; each head must arrive within
/// `admin.header_timeout` (which also bounds idle keep-alive time).
async fn serve_connection(mut stream: TcpStream, ctx: Rc<Ctx>) {
    let header_timeout = ctx.config.admin.header_timeout;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let deadline = monoio::time::Instant::now() + header_timeout;
        let (head, len) = loop {
            match parse_head(&buf) {
                Ok(Some(done)) => break done,
                Ok(None) => {}
                Err(status) => {
                    let code = if status == 431 {
                        "head_too_large"
                    } else {
                        "bad_request"
                    };
                    reject(
                        &mut stream,
                        Reply::error(status, code, "unusable request head"),
                    )
                    .await;
                    return;
                }
            }
            let read = monoio::time::timeout_at(deadline, stream.read(chunk)).await;
            let Ok((res, c)) = read else {
                // Timed out: the read's buffer stays with the cancelled op; close.
                if !buf.is_empty() {
                    let r = Reply::error(408, "request_timeout", "request head too slow");
                    reject(&mut stream, r).await;
                }
                return;
            };
            chunk = c;
            match res {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..len);
        let reply = route(&head, &ctx);
        // Admin requests carry no bodies; rather than frame one, answer and close.
        let keep_alive = head.keep_alive && !head.has_body && !ctx.stop.load(Ordering::Acquire);
        let bytes = reply.encode(keep_alive, head.method == "HEAD", head.http10);
        if !write_reply(&mut stream, bytes).await || !keep_alive {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::testing::test_config;
    use crate::stats::ShardStats;
    use std::io::{Read, Write};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn start(health: Arc<Health>) -> (AdminHandle, Arc<Mutex<Merged>>, Arc<Config>) {
        let mut config = test_config();
        config.admin.listen = ([127, 0, 0, 1], free_port()).into();
        config.admin.header_timeout = Duration::from_millis(300);
        let config = Arc::new(config);
        let merged = Arc::new(Mutex::new(Merged::new(&config, Instant::now())));
        let admin = spawn(config.clone(), merged.clone(), health).unwrap();
        (admin, merged, config)
    }

    /// Reads one response with a content-length body; returns (status, head, body).
    fn read_response(s: &mut std::net::TcpStream) -> (u16, String, String) {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "eof in head: {buf:?}");
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let status = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        (status, head, String::from_utf8(body).unwrap())
    }

    fn connect(addr: SocketAddr) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn get(s: &mut std::net::TcpStream, path: &str) -> (u16, String, String) {
        write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
        read_response(s)
    }

    #[test]
    fn health_follows_shards_and_draining() {
        let health = Arc::new(Health::new(2));
        let (admin, _, _) = start(health.clone());
        let mut s = connect(admin.local_addr());
        let (status, _, body) = get(&mut s, "/health");
        assert_eq!((status, body.as_str()), (503, r#"{"status":"draining"}"#));
        health.shard_up();
        assert_eq!(get(&mut s, "/health").0, 503, "one of two shards");
        health.shard_up();
        // Same connection: keep-alive works.
        let (status, head, body) = get(&mut s, "/health");
        assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
        assert!(head.contains("content-type: application/json\r\n"));
        health.set_draining();
        assert_eq!(get(&mut s, "/health").0, 503);
        admin.shutdown();
    }

    #[test]
    fn metrics_ping_status_and_errors() {
        let health = Arc::new(Health::new(1));
        let (admin, merged, config) = start(health);
        let stats = ShardStats::new(0, &config);
        stats.upstream_request(0, 0, Duration::from_millis(12), None);
        stats.http_request(
            0,
            &http::Method::POST,
            "/v1/chat/completions",
            200,
            Duration::ZERO,
        );
        merged
            .lock()
            .unwrap()
            .apply(stats.take_delta(), Instant::now());

        let mut s = connect(admin.local_addr());
        // Pipelined: both requests in one write, answers in order.
        s.write_all(b"GET /ping HTTP/1.1\r\n\r\nGET /metrics?x=1 HTTP/1.1\r\n\r\n")
            .unwrap();
        let (status, _, body) = read_response(&mut s);
        assert_eq!((status, body.as_str()), (200, "pong"));
        let (status, head, body) = read_response(&mut s);
        assert_eq!(status, 200);
        assert!(head.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(body.contains(
            "llmproxy_upstream_requests_total{group=\"main\",upstream=\"openai-a\"} 1\n"
        ));
        assert!(body.contains(
            "llmproxy_upstream_requests_total{group=\"backup\",upstream=\"local-c\"} 0\n"
        ));

        let (status, _, body) = get(&mut s, "/status");
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["shards"][0]["last_seq"], 1);
        assert_eq!(v["shards"][0]["epoch"], 0);
        assert_eq!(v["epoch"], 0);
        assert_eq!(v["upstreams"][0]["breaker"]["state"], "closed");
        assert_eq!(v["upstreams"][0]["breaker"]["latency_ema_ms"], 1000.0);
        assert_eq!(v["upstreams"][0]["breaker"]["window"]["failures"], 0);
        assert_eq!(v["upstreams"][0]["name"], "openai-a");
        assert_eq!(v["upstreams"][0]["requests"], 1);
        let p50 = v["upstreams"][0]["latency_ms"]["p50"].as_f64().unwrap();
        assert!((11.0..13.0).contains(&p50), "p50 {p50}");

        let (status, _, body) = get(&mut s, "/nope");
        assert_eq!(status, 404);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string());

        write!(s, "DELETE /metrics HTTP/1.1\r\n\r\n").unwrap();
        let (status, head, _) = read_response(&mut s);
        assert_eq!(status, 405);
        assert!(head.contains("allow: GET, HEAD\r\n"));

        // Garbage: 400 and close.
        s.write_all(b"\x01\x02 nonsense\r\n\r\n").unwrap();
        let (status, head, _) = read_response(&mut s);
        assert_eq!(status, 400);
        assert!(head.contains("connection: close\r\n"));
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
        admin.shutdown();
    }

    #[test]
    fn oversized_and_slow_heads_are_cut_off() {
        let (admin, _, _) = start(Arc::new(Health::new(1)));
        let mut s = connect(admin.local_addr());
        let big = format!(
            "GET /ping HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        s.write_all(big.as_bytes()).unwrap();
        assert_eq!(read_response(&mut s).0, 431);

        let mut slow = connect(admin.local_addr());
        let t = Instant::now();
        slow.write_all(b"GET /ping HTTP/1.1\r\n").unwrap();
        assert_eq!(read_response(&mut slow).0, 408);
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        admin.shutdown();
    }

    #[test]
    fn second_bind_on_same_port_fails() {
        let (admin, merged, config) = start(Arc::new(Health::new(1)));
        let mut again = (*config).clone();
        again.admin.listen = admin.local_addr();
        let err = spawn(Arc::new(again), merged, Arc::new(Health::new(1)))
            .err()
            .expect("port in use must fail");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        admin.shutdown();
    }

    #[test]
    fn parse_head_rules() {
        let (h, n) = parse_head(b"GET /a?b HTTP/1.0\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(n, 21);
        assert_eq!(h.path, "/a");
        assert!(!h.keep_alive, "HTTP/1.0 closes by default");
        let (h, _) =
            parse_head(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(h.has_body && !h.keep_alive);
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").err(),
            Some(400)
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHo").unwrap(), None);
    }
}
