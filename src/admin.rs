//! Admin listener (its own thread with a small monoio runtime, never a shard): `/health`, `/ping`,
//! `/metrics`, `/status`, read from the control thread's merged statistics and the shards' health.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING,
};
use http::{Method, StatusCode, Version};
use monoio::buf::{IoBuf, IoVecBuf};
use monoio::io::sink::SinkExt;
use monoio::io::stream::Stream;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use monoio::BufResult;
use monoio_codec::{Decoded, Decoder, FramedRead};
use monoio_http::common::error::HttpError;
use monoio_http::common::request::RequestHead;
use monoio_http::h1::codec::decoder::{
    ChunkedBodyDecoder, DecodeError, DirectWrapper, FixedBodyDecoder, GenericHeadDecoder,
    PayloadDecoder, RequestHeadDecoder,
};
use monoio_http::h1::codec::encoder::GenericEncoder;
use monoio_http::h1::payload::{FixedPayload, Payload};
use serde_json::json;

use crate::config::Config;
use crate::http::head::HeadScanner;
use crate::stats::{Merged, UpstreamErrorKind};

/// Largest request head accepted (bytes); larger heads get 431 and the connection is closed.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

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

/// The request head decoder in monoio-http's pull form (`DirectWrapper`): the head and how its
/// body is framed, without the payload channel of `RequestDecoder` (awaiting that body without
/// driving the codec deadlocks, and `fill_payload` buffers a whole body with no cap).
type MonoioHeadDecoder = GenericHeadDecoder<(), RequestHeadDecoder, DirectWrapper>;

/// How monoio-http says the body of a request is framed.
type BodyDecoder = PayloadDecoder<FixedBodyDecoder, ChunkedBodyDecoder>;

/// Why no usable request head came off the connection.
#[derive(Debug)]
enum HeadError {
    /// Longer than [`MAX_HEAD_BYTES`], or more fields than monoio-http parses (96): 431.
    TooLarge,
    /// Not a request head monoio-http can decode: 400.
    Malformed(String),
    /// The client closed in the middle of a head: nothing to answer.
    Eof,
    /// The socket failed: nothing to answer.
    Io(io::Error),
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> Self {
        HeadError::Io(e)
    }
}

/// monoio-http's request head decoder behind the guards it lacks (monoio-guide §2.5, §2.6). It is
/// only called once a whole head is buffered, and:
/// - heads are limited to [`MAX_HEAD_BYTES`]: it has no limit (and searches the whole buffer for
///   `\r\n\r\n` again on every read); the limit also keeps a header name over 64 KiB away from
///   its `HeaderName::from_bytes(..).unwrap()`, which panics on one;
/// - a bare LF is a 400: it frames heads on `\r\n\r\n` while httparse takes a lone LF as a line
///   end, so an LF-only head would wait for the timeout, and one followed by a CRLF head would
///   be parsed to its own end with the rest of the block (the next request) silently dropped;
/// - empty lines before the request line are skipped (RFC 9112 §2.2): it would split `\r\n\r\n`
///   off as an unparsable head and wait for more bytes with a whole request buffered;
/// - its `"http2 decode error"` label on HTTP/1 errors is not passed on (`describe`).
#[derive(Default)]
struct AdminHeadDecoder {
    inner: MonoioHeadDecoder,
    /// The proxy's incremental end-of-head search: a head trickled in byte by byte costs linear
    /// work, where monoio-http's own search restarts from the front on every read.
    scanner: HeadScanner,
    /// Part of a head is buffered: a timeout now answers 408 instead of closing quietly.
    /// Tracked here because `FramedRead` hands its buffer to the read a timeout cancels.
    started: bool,
}

impl AdminHeadDecoder {
    fn decode_head(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Decoded<(RequestHead, BodyDecoder)>, HeadError> {
        while src.starts_with(b"\r\n") {
            src.advance(2);
            self.scanner.reset();
        }
        let end = self
            .scanner
            .find_end(src)
            .map_err(|_| HeadError::Malformed("line ends must be CRLF".into()))?;
        // An unfinished head was checked for bare LFs by the scanner; a complete one is
        // checked whole here, after its size (as the proxy's own head parser does).
        if end.unwrap_or(src.len()) > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let Some(end) = end else {
            return Ok(Decoded::Insufficient);
        };
        if crate::http::scan::has_bare_lf(&src[..end]) {
            return Err(HeadError::Malformed("line ends must be CRLF".into()));
        }
        let before = src.len();
        match self.inner.decode(src) {
            Ok(Decoded::Some(head)) => Ok(Decoded::Some(head)),
            // It split the head off but found no request in it: refuse rather than lose it.
            Ok(_) if src.len() != before => Err(HeadError::Malformed("incomplete request".into())),
            Ok(d) => Ok(d),
            Err(HttpError::H1DecodeError(DecodeError::Parse(httparse::Error::TooManyHeaders))) => {
                Err(HeadError::TooLarge)
            }
            Err(e) => Err(HeadError::Malformed(describe(&e))),
        }
    }
}

impl Decoder for AdminHeadDecoder {
    type Item = (RequestHead, BodyDecoder);
    type Error = HeadError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Decoded<Self::Item>, HeadError> {
        let decoded = self.decode_head(src);
        self.started = !src.is_empty();
        decoded
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Decoded<Self::Item>, HeadError> {
        match self.decode(src)? {
            Decoded::Some(head) => Ok(Decoded::Some(head)),
            _ if src.is_empty() => Ok(Decoded::Insufficient),
            _ => Err(HeadError::Eof),
        }
    }
}

/// monoio-http's error text without its wrapper's label (which says "http2" for HTTP/1 errors).
fn describe(e: &HttpError) -> String {
    match e {
        HttpError::H1DecodeError(e) => e.to_string(),
        e => e.to_string(),
    }
}

/// The parts of a request head the admin endpoints look at.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: Method,
    path: String,
    keep_alive: bool,
    /// An HTTP/1.0 request: keep-alive must then be said in the answer.
    http10: bool,
    has_body: bool,
}

impl Head {
    /// Keep-alive and body presence from a decoded head. monoio-http ignores `Connection` and
    /// HTTP/1.0, and of several `Content-Length` fields it reads the first; any sign of a body
    /// (a length, a second length, any `Transfer-Encoding`) counts, since the admin answers such a
    /// request and closes rather than framing the body.
    fn new(parts: &RequestHead, body: &BodyDecoder) -> Self {
        let mut keep_alive = parts.version == Version::HTTP_11;
        for value in parts.headers.get_all(CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
        let has_body = !matches!(body, PayloadDecoder::None)
            || parts.headers.contains_key(TRANSFER_ENCODING)
            || parts
                .headers
                .get_all(CONTENT_LENGTH)
                .iter()
                .nth(1)
                .is_some();
        Head {
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            keep_alive,
            http10: parts.version == Version::HTTP_10,
            has_body,
        }
    }
}

/// A response ready to be written.
struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    allow: bool,
}

impl Reply {
    fn json(status: StatusCode, value: serde_json::Value) -> Self {
        Reply {
            status,
            content_type: "application/json",
            body: value.to_string().into(),
            allow: false,
        }
    }

    fn error(status: StatusCode, code: &str, message: &str) -> Self {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        Reply::json(
            status,
            json!({"error": {"message": message, "type": kind, "code": code}}),
        )
    }

    /// Serialises the reply with monoio-http's encoder (it writes `content-length` itself);
    /// `head_only` for HEAD requests; `http10` for an HTTP/1.0 client (which closes after an answer
    /// that does not say keep-alive).
    async fn encode(
        self,
        keep_alive: bool,
        head_only: bool,
        http10: bool,
    ) -> Result<Vec<u8>, HttpError> {
        let body_len = self.body.len();
        let mut res = http::Response::new(Payload::<Bytes, HttpError>::Fixed(FixedPayload::new(
            self.body,
        )));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.allow {
            headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        if !keep_alive {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        } else if http10 {
            headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        }
        let mut out = Capture(Vec::with_capacity(256 + body_len));
        GenericEncoder::new(&mut out).send_and_flush(res).await?;
        let mut bytes = out.0;
        if head_only {
            // The encoder has no HEAD form: without a body it writes `content-length: 0` and
            // drops a length set by hand. So it encodes the GET reply and the body is cut off.
            bytes.truncate(bytes.len() - body_len);
        }
        Ok(bytes)
    }
}

/// Collects what monoio-http's encoder writes, so a HEAD reply can be cut and every reply goes
/// out through one write on the connection (then, after an error, the lingering close).
struct Capture(Vec<u8>);

impl AsyncWriteRent for Capture {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let n = buf.bytes_init();
        // SAFETY: an `IoBuf` has `bytes_init()` initialised bytes at `read_ptr()`.
        self.0
            .extend_from_slice(unsafe { std::slice::from_raw_parts(buf.read_ptr(), n) });
        (Ok(n), buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // monoio-http's encoder only calls `write` (through `write_all`).
        let e = io::Error::new(io::ErrorKind::Unsupported, "writev into an encoded reply");
        (Err(e), buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The one place that maps a request to a reply.
fn route(head: &Head, ctx: &Ctx) -> Reply {
    let known = matches!(
        head.path.as_str(),
        "/health" | "/ping" | "/metrics" | "/status"
    );
    if !known {
        return Reply::error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint");
    }
    if head.method != Method::GET && head.method != Method::HEAD {
        let mut r = Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
        r.allow = true;
        return r;
    }
    match head.path.as_str() {
        "/health" => {
            if ctx.health.is_healthy() {
                Reply::json(StatusCode::OK, json!({"status": "ok"}))
            } else {
                Reply::json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "draining"}),
                )
            }
        }
        "/ping" => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from_static(b"pong"),
            allow: false,
        },
        "/metrics" => {
            let text = {
                let m = crate::stats::lock_merged(&ctx.merged);
                crate::metrics::render(&m, &ctx.config)
            };
            Reply {
                status: StatusCode::OK,
                content_type: crate::metrics::CONTENT_TYPE,
                body: text.into(),
                allow: false,
            }
        }
        _ => {
            let status = {
                let m = crate::stats::lock_merged(&ctx.merged);
                status_json(&m, &ctx.config, &ctx.health, Instant::now())
            };
            Reply::json(StatusCode::OK, status)
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

/// Answers an unusable request and closes (lingering).
async fn reject(stream: &mut TcpStream, reply: Reply) {
    match reply.encode(false, false, false).await {
        Ok(bytes) => close_lingering(stream, bytes).await,
        Err(e) => tracing::warn!(error = %describe(&e), "admin reply not encoded"),
    }
}

/// Writes a last reply and closes. The write side is shut first and what the client still sends
/// is drained briefly, so unread bytes do not turn the close into an RST that destroys the reply
/// before the client reads it.
async fn close_lingering(stream: &mut TcpStream, bytes: Vec<u8>) {
    if !write_reply(stream, bytes).await {
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

/// One admin connection: HTTP/1.1 with keep-alive and pipelining, heads decoded by monoio-http
/// off a `FramedRead` (pipelined heads wait in its buffer); each head must arrive within
/// `admin.header_timeout` (which also bounds idle keep-alive time).
async fn serve_connection(stream: TcpStream, ctx: Rc<Ctx>) {
    let header_timeout = ctx.config.admin.header_timeout;
    let mut conn = FramedRead::new(stream, AdminHeadDecoder::default());
    loop {
        let deadline = monoio::time::Instant::now() + header_timeout;
        let (parts, body) = match monoio::time::timeout_at(deadline, conn.next()).await {
            Ok(Some(Ok(head))) => head,
            // Closed between requests or within a head.
            Ok(None | Some(Err(HeadError::Eof))) => return,
            Ok(Some(Err(HeadError::Io(e)))) => {
                tracing::debug!(error = %e, "admin connection read failed");
                return;
            }
            Ok(Some(Err(HeadError::TooLarge))) => {
                let r = Reply::error(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "head_too_large",
                    "request head too large",
                );
                return reject(conn.get_mut(), r).await;
            }
            Ok(Some(Err(HeadError::Malformed(why)))) => {
                tracing::debug!(%why, "admin request refused");
                let message = format!("unusable request head: {why}");
                let r = Reply::error(StatusCode::BAD_REQUEST, "bad_request", &message);
                return reject(conn.get_mut(), r).await;
            }
            Err(_elapsed) => {
                // The connection is not read again: the cancelled read took the buffer along.
                if conn.decoder().started {
                    let r = Reply::error(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        "request head too slow",
                    );
                    reject(conn.get_mut(), r).await;
                }
                return;
            }
        };
        let head = Head::new(&parts, &body);
        let reply = route(&head, &ctx);
        let keep_alive = head.keep_alive && !head.has_body && !ctx.stop.load(Ordering::Acquire);
        let bytes = match reply
            .encode(keep_alive, head.method == Method::HEAD, head.http10)
            .await
        {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %describe(&e), "admin reply not encoded");
                return;
            }
        };
        if head.has_body {
            // Admin requests carry no bodies; rather than frame one, answer and close, letting
            // the unread body drain so the close does not reset the reply away.
            return close_lingering(conn.get_mut(), bytes).await;
        }
        if !write_reply(conn.get_mut(), bytes).await || !keep_alive {
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

    /// Reads one response head (byte by byte, so nothing after it is consumed).
    fn read_head(s: &mut std::net::TcpStream) -> String {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "eof in head: {buf:?}");
            buf.push(byte[0]);
        }
        String::from_utf8(buf).unwrap()
    }

    /// Reads one response with a content-length body; returns (status, head, body).
    fn read_response(s: &mut std::net::TcpStream) -> (u16, String, String) {
        let head = read_head(s);
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

    /// About `header_timeout` (300 ms in these tests) passed since `t`, with slack for a busy
    /// machine.
    fn assert_header_timeout_since(t: Instant) {
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
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

        let (status, head, body) = get(&mut s, "/nope");
        assert_eq!(status, 404);
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
        assert!(head.contains("cache-control: no-store\r\n"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string());

        write!(s, "DELETE /metrics HTTP/1.1\r\n\r\n").unwrap();
        let (status, head, body) = read_response(&mut s);
        assert_eq!(status, 405);
        assert!(head.contains("allow: GET, HEAD\r\n"));
        assert!(
            !head.contains("connection: close"),
            "405 keeps the connection: {head}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "method_not_allowed");

        // Garbage: 400 and close.
        s.write_all(b"\x01\x02 nonsense\r\n\r\n").unwrap();
        let (status, head, body) = read_response(&mut s);
        assert_eq!(status, 400);
        assert!(head.contains("connection: close\r\n"));
        assert!(head.contains("cache-control: no-store\r\n"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "bad_request");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(!message.contains("http2"), "{message}");
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
        let (status, head, body) = read_response(&mut s);
        assert_eq!(status, 431);
        assert!(head.contains("connection: close\r\n"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "head_too_large");

        let mut slow = connect(admin.local_addr());
        let t = Instant::now();
        slow.write_all(b"GET /ping HTTP/1.1\r\n").unwrap();
        let (status, _, body) = read_response(&mut slow);
        assert_eq!(status, 408);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "request_timeout");
        assert_header_timeout_since(t);
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
    fn head_answers_without_a_body_and_idle_connections_close() {
        let (admin, _, _) = start(Arc::new(Health::new(1)));
        let mut s = connect(admin.local_addr());
        let (_, get_head, _) = get(&mut s, "/ping");
        // HEAD then GET, pipelined: if the HEAD reply carried a body, the second reply would
        // not start where its head is read.
        s.write_all(b"HEAD /ping HTTP/1.1\r\n\r\nGET /ping HTTP/1.1\r\n\r\n")
            .unwrap();
        let head = read_head(&mut s);
        assert_eq!(
            head, get_head,
            "HEAD has GET's head, content-length included"
        );
        assert!(head.contains("content-length: 4\r\n"), "{head}");
        let (status, _, body) = read_response(&mut s);
        assert_eq!((status, body.as_str()), (200, "pong"));

        // Idle keep-alive: closed after header_timeout (300 ms) without a reply.
        let t = Instant::now();
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "{rest:?}");
        assert_header_timeout_since(t);
        admin.shutdown();
    }

    #[test]
    fn a_request_with_a_body_is_answered_then_closed() {
        let (admin, _, _) = start(Arc::new(Health::new(1)));
        // A body larger than the socket buffers: without the lingering close, the unread rest
        // would turn the close into a reset (ECONNRESET here, or a lost reply).
        let mut s = connect(admin.local_addr());
        let body = vec![b'x'; 200_000];
        let mut req = format!(
            "POST /metrics HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        s.write_all(&req).unwrap();
        let (status, head, body) = read_response(&mut s);
        assert_eq!(status, 405);
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(head.contains("allow: GET, HEAD\r\n"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "method_not_allowed");
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);

        // Chunked, and a GET with a body: answered, then closed.
        for req in [
            &b"POST /ping HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
            b"GET /ping HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi",
        ] {
            let mut s = connect(admin.local_addr());
            s.write_all(req).unwrap();
            let (_, head, _) = read_response(&mut s);
            assert!(head.contains("connection: close\r\n"), "{head}");
            let mut rest = Vec::new();
            assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
        }
        admin.shutdown();
    }

    /// Runs the admin head decoder over `bytes` as one read: the head (None if incomplete) and
    /// the bytes left in the buffer.
    fn decode(bytes: &[u8]) -> (Result<Option<Head>, HeadError>, BytesMut) {
        let mut d = AdminHeadDecoder::default();
        let mut buf = BytesMut::from(bytes);
        let head = match d.decode(&mut buf) {
            Ok(Decoded::Some((parts, body))) => Ok(Some(Head::new(&parts, &body))),
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        };
        assert_eq!(d.started, !buf.is_empty());
        (head, buf)
    }

    fn decoded(bytes: &[u8]) -> Head {
        match decode(bytes).0 {
            Ok(Some(head)) => head,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn too_large(bytes: &[u8]) -> bool {
        matches!(decode(bytes).0, Err(HeadError::TooLarge))
    }

    fn malformed(bytes: &[u8]) -> bool {
        matches!(decode(bytes).0, Err(HeadError::Malformed(_)))
    }

    #[test]
    fn head_rules() {
        let (h, rest) = decode(b"GET /a?b HTTP/1.0\r\n\r\nrest");
        let h = h.unwrap().unwrap();
        assert_eq!(&rest[..], b"rest", "the next request stays buffered");
        assert_eq!((h.method, h.path.as_str()), (Method::GET, "/a"));
        assert!(!h.keep_alive, "HTTP/1.0 closes by default");
        assert!(decoded(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let h = decoded(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nConnection: x, close\r\n\r\n");
        assert!(h.has_body && !h.keep_alive);
        let h = decoded(b"GET http://admin/metrics?x HTTP/1.1\r\n\r\n");
        assert_eq!(h.path, "/metrics", "absolute form");
        assert!(h.keep_alive && !h.has_body);

        // Any sign of a body closes: monoio-http reads the first of two lengths only (here 0).
        assert!(
            decoded(b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n").has_body
        );
        assert!(decoded(b"GET / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n").has_body);
        assert!(!decoded(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").has_body);

        // Incomplete: more bytes wanted, and a timeout now would answer 408.
        let (h, rest) = decode(b"GET / HTTP/1.1\r\nHo");
        assert!(matches!(h, Ok(None)) && !rest.is_empty());
        // Empty lines before the request line are skipped, not taken for a head.
        assert_eq!(decoded(b"\r\n\r\nGET /ping HTTP/1.1\r\n\r\n").path, "/ping");
        let (h, rest) = decode(b"\r\n\r\n");
        assert!(matches!(h, Ok(None)) && rest.is_empty());

        assert!(malformed(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"));
        assert!(malformed(b"GET / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"));
        assert!(malformed(
            b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"
        ));
        assert!(malformed(b"GET / HTTP/2.0\r\n\r\n"));
        assert!(malformed(b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n"));
        // Bare LF: refused at once instead of waiting for a CRLF head end, and never allowed to
        // swallow the request after it (monoio-http would parse to the first blank line and
        // drop the rest of the CRLFCRLF-framed block).
        assert!(malformed(b"GET /ping HTTP/1.1\n\n"));
        assert!(malformed(
            b"GET /a HTTP/1.1\nX: y\n\nGET /b HTTP/1.1\r\n\r\n"
        ));
        assert!(malformed(b"GET /a HTTP/1.1\r\nX: y\n"));
    }

    #[test]
    fn head_limits() {
        let head = |filler: usize| {
            let mut h = b"GET /ping HTTP/1.1\r\nX: ".to_vec();
            h.resize(h.len() + filler, b'a');
            h.extend_from_slice(b"\r\n\r\n");
            h
        };
        let base = head(0).len();
        let exact = head(MAX_HEAD_BYTES - base);
        assert_eq!(exact.len(), MAX_HEAD_BYTES);
        assert_eq!(decoded(&exact).path, "/ping");
        assert!(
            too_large(&head(MAX_HEAD_BYTES - base + 1)),
            "complete, one byte over"
        );
        let mut partial = head(MAX_HEAD_BYTES);
        partial.truncate(MAX_HEAD_BYTES + 1);
        assert!(too_large(&partial), "incomplete and over");
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..97 {
            many.extend_from_slice(format!("x{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(too_large(&many), "more fields than monoio-http parses");
        // A header name over 64 KiB makes monoio-http panic (HeaderName unwrap); the limit
        // refuses it first.
        let mut long_name = b"GET / HTTP/1.1\r\n".to_vec();
        long_name.resize(long_name.len() + 70_000, b'n');
        long_name.extend_from_slice(b": v\r\n\r\n");
        assert!(too_large(&long_name));
    }

    /// xorshift64: reproducible garbage without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random input: half the time pieces of HTTP syntax in random order, half the time valid
    /// requests (pipelined) with a few random edits, so that many get past the request line.
    fn garbage(rng: &mut Rng) -> Vec<u8> {
        const PIECES: &[&[u8]] = &[
            b"GET ",
            b"HEAD ",
            b"POST ",
            b"/ping",
            b"/metrics",
            b"/status?x=1",
            b"http://a/health",
            b"*",
            b" HTTP/1.1",
            b" HTTP/1.0",
            b" HTTP/2.0",
            b"\r\n",
            b"\r\n\r\n",
            b"\n",
            b"\r",
            b": ",
            b"Host: a",
            b"Content-Length: ",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: identity",
            b"Connection: close",
            b"Connection: keep-alive",
            b"0",
            b"5",
            b"18446744073709551616",
            b" ",
            b"\t",
            b"\x00",
            b"\xff",
            b"%",
            b"#",
        ];
        const REQUESTS: &[&[u8]] = &[
            b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\n",
            b"HEAD /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            b"POST /status HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET http://a/ping?x HTTP/1.1\r\nX-A: b\r\nX-A: c\r\n\r\n",
            b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n",
        ];
        let piece = |rng: &mut Rng| PIECES[rng.below(PIECES.len())];
        let mut out = Vec::new();
        if rng.below(2) == 0 {
            for _ in 0..rng.below(48) {
                match rng.below(8) {
                    0 => out.push(rng.next() as u8),
                    1 if rng.below(40) == 0 => out.resize(out.len() + rng.below(20_000), b'a'),
                    _ => out.extend_from_slice(piece(rng)),
                }
            }
            return out;
        }
        for _ in 0..1 + rng.below(3) {
            out.extend_from_slice(REQUESTS[rng.below(REQUESTS.len())]);
        }
        for _ in 0..rng.below(4) {
            let at = rng.below(out.len() + 1);
            match rng.below(4) {
                0 if at < out.len() => out[at] = rng.next() as u8,
                1 => {
                    let end = (at + rng.below(8)).min(out.len());
                    out.drain(at..end);
                }
                2 => {
                    let p = piece(rng);
                    out.splice(at..at, p.iter().copied());
                }
                _ => {
                    let end = (at + rng.below(16)).min(out.len());
                    let copy = out[at..end].to_vec();
                    out.splice(at..at, copy);
                }
            }
        }
        out
    }

    /// Iterations scale with `LLMPROXY_FUZZ_ROUNDS` (default 1) for longer runs by hand.
    fn fuzz_rounds() -> usize {
        std::env::var("LLMPROXY_FUZZ_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    }

    #[test]
    fn garbage_through_the_decoder_never_panics_or_grows_past_the_limit() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 * fuzz_rounds() {
            let input = garbage(&mut rng);
            // Fed as reads of random sizes, decoding after each as FramedRead does.
            let cuts: Vec<usize> = (0..4).map(|_| rng.below(input.len() + 1)).collect();
            let outcome = std::panic::catch_unwind(|| {
                let mut cuts = cuts.clone();
                cuts.push(input.len());
                cuts.sort_unstable();
                let mut d = AdminHeadDecoder::default();
                let mut buf = BytesMut::new();
                let mut fed = 0;
                for cut in cuts {
                    buf.extend_from_slice(&input[fed..cut]);
                    fed = cut;
                    loop {
                        if buf.is_empty() {
                            break;
                        }
                        match d.decode(&mut buf) {
                            Ok(Decoded::Some((parts, body))) => {
                                let _ = Head::new(&parts, &body);
                            }
                            Ok(_) => {
                                assert!(buf.len() <= MAX_HEAD_BYTES, "{} buffered", buf.len());
                                break;
                            }
                            Err(_) => return,
                        }
                    }
                }
                let _ = d.decode_eof(&mut buf);
            });
            assert!(
                outcome.is_ok(),
                "decoder panicked on {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn garbage_on_the_socket_gets_a_reply_or_a_close_never_a_hang() {
        let health = Arc::new(Health::new(1));
        health.shard_up();
        let (admin, _, _) = start(health);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..200 * fuzz_rounds() {
            let input = garbage(&mut rng);
            let mut s = connect(admin.local_addr());
            // The server may close before reading it all; that is allowed.
            let _ = s.write_all(&input);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut out = Vec::new();
            match s.read_to_end(&mut out) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("{e} after {:?}", String::from_utf8_lossy(&input)),
            }
            if !out.is_empty() {
                let text = String::from_utf8_lossy(&out);
                let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                assert!(
                    text.starts_with("HTTP/1.1 ") && [200, 400, 404, 405, 431].contains(&status),
                    "{text:?} after {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
        // Still serving.
        let mut s = connect(admin.local_addr());
        assert_eq!(get(&mut s, "/ping").2, "pong");
        admin.shutdown();
    }
}
