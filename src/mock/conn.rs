//! One client connection: request loop, routing and the response writers.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::tls::stream::InboundConn;
use serde_json::{json, Value};

use super::http::{parse_head, BadRequest, BodyKind, ChunkedDecoder, Head, MAX_BODY};
use super::Shared;

/// Whether the connection continues after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

struct OpenGuard(Arc<Shared>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0
            .stats
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Read more bytes, appending to `buf`.
async fn read_more(stream: &mut InboundConn, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let len = buf.len();
    let (res, slice) = stream.read(buf.slice_mut(len..)).await;
    (res, slice.into_inner())
}

/// Write all of `buf`, then clear it (capacity is kept for reuse).
async fn write_buf(stream: &mut InboundConn, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let (res, mut buf) = stream.write_all(buf).await;
    buf.clear();
    (res.map(|_| ()), buf)
}

pub(crate) async fn serve(tcp: TcpStream, shared: Arc<Shared>) {
    shared
        .stats
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(shared.clone());
    let mut stream = match &shared.cfg.tls {
        None => InboundConn::Plain(tcp),
        Some(cfg) => {
            let acceptor = monoio_rustls::TlsAcceptor::from(cfg.clone());
            let hs = InboundConn::accept_tls(&acceptor, tcp);
            match monoio::time::timeout(Duration::from_secs(10), hs).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!("mock: TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let mut rbuf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut wbuf: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        // 1. Head.
        let head = loop {
            if !rbuf.is_empty() {
                match parse_head(&rbuf) {
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(bad) => {
                        bad_request(&mut stream, wbuf, &shared, bad).await;
                        linger_close(&mut stream, rbuf).await;
                        return;
                    }
                }
            }
            let (res, b) = read_more(&mut stream, rbuf).await;
            rbuf = b;
            match res {
                Ok(0) | Err(_) => return, // EOF (maybe mid-head): just close
                Ok(_) => {}
            }
        };

        // 2. Body.
        let mut sent_continue = false;
        let (body, consumed) = match head.body {
            BodyKind::None => (Vec::new(), head.head_len),
            BodyKind::Length(n) => {
                let need = head.head_len + n;
                while rbuf.len() < need {
                    if head.expect_continue && !sent_continue {
                        sent_continue = true;
                        wbuf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        let (res, b) = write_buf(&mut stream, wbuf).await;
                        wbuf = b;
                        if res.is_err() {
                            return;
                        }
                    }
                    let (res, b) = read_more(&mut stream, rbuf).await;
                    rbuf = b;
                    match res {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
                (rbuf[head.head_len..need].to_vec(), need)
            }
            BodyKind::Chunked => {
                let mut dec = ChunkedDecoder::default();
                loop {
                    match dec.advance(rbuf.get(head.head_len..).unwrap_or(&[])) {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(bad) => {
                            bad_request(&mut stream, wbuf, &shared, bad).await;
                            linger_close(&mut stream, rbuf).await;
                            return;
                        }
                    }
                    if head.expect_continue && !sent_continue {
                        sent_continue = true;
                        wbuf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        let (res, b) = write_buf(&mut stream, wbuf).await;
                        wbuf = b;
                        if res.is_err() {
                            return;
                        }
                    }
                    let (res, b) = read_more(&mut stream, rbuf).await;
                    rbuf = b;
                    match res {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
                let consumed = head.head_len + dec.consumed();
                (dec.body, consumed)
            }
        };
        rbuf.drain(..consumed.min(rbuf.len()));

        // 3. Answer.
        let (next, b) = handle(&mut stream, wbuf, &shared, &head, &body).await;
        wbuf = b;
        if next == Next::Close {
            return;
        }
        // Do not let one huge request pin a huge buffer for the connection.
        if rbuf.capacity() > 1024 * 1024 && rbuf.len() < 16 * 1024 {
            rbuf.shrink_to(16 * 1024);
        }
    }
}

/// Half-close and drain what the client still sends (briefly), so the 400
/// answer is not destroyed by a RST caused by unread input.
async fn linger_close(stream: &mut InboundConn, mut buf: Vec<u8>) {
    use monoio::io::AsyncWriteRent;
    let _ = stream.shutdown().await;
    let deadline = monoio::time::Instant::now() + Duration::from_millis(500);
    let mut total = 0usize;
    if buf.capacity() == 0 {
        buf.reserve(16 * 1024);
    }
    while total < 4 * 1024 * 1024 {
        buf.clear();
        match monoio::time::timeout_at(deadline, stream.read(buf)).await {
            Ok((Ok(n), b)) if n > 0 => {
                total += n;
                buf = b;
            }
            _ => return,
        }
    }
}

async fn bad_request(stream: &mut InboundConn, wbuf: Vec<u8>, shared: &Shared, bad: BadRequest) {
    shared.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
    let status = if bad.0 == "request body too large" {
        413
    } else {
        400
    };
    let body = error_json(bad.0, "invalid_request_error", Some("bad_request"));
    let (_, _) = write_simple(stream, wbuf, status, &body, false, &[]).await;
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Site Overloaded",
        _ => "Unknown",
    }
}

fn error_type(status: u16) -> (&'static str, Option<&'static str>) {
    match status {
        400 => ("invalid_request_error", None),
        401 => ("authentication_error", Some("invalid_api_key")),
        403 => ("permission_error", None),
        404 => ("not_found_error", Some("not_found")),
        429 => ("rate_limit_error", Some("rate_limit_exceeded")),
        503 | 529 => ("server_error", Some("overloaded")),
        s if s >= 500 => ("server_error", None),
        _ => ("invalid_request_error", None),
    }
}

fn error_json(message: &str, typ: &str, code: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "error": { "message": message, "type": typ, "param": null, "code": code }
    }))
    .unwrap_or_default()
}

fn write_status_line(wbuf: &mut Vec<u8>, status: u16) {
    use std::io::Write;
    let _ = write!(wbuf, "HTTP/1.1 {} {}\r\n", status, reason(status));
}

/// Write a complete JSON response with Content-Length (head + body, one write).
async fn write_simple(
    stream: &mut InboundConn,
    mut wbuf: Vec<u8>,
    status: u16,
    body: &[u8],
    keep_alive: bool,
    extra: &[(&str, String)],
) -> (Next, Vec<u8>) {
    use std::io::Write;
    write_status_line(&mut wbuf, status);
    wbuf.extend_from_slice(b"Content-Type: application/json\r\nServer: llmproxy-mock\r\n");
    for (k, v) in extra {
        let _ = write!(wbuf, "{k}: {v}\r\n");
    }
    let _ = write!(wbuf, "Content-Length: {}\r\n", body.len());
    if !keep_alive {
        wbuf.extend_from_slice(b"Connection: close\r\n");
    }
    wbuf.extend_from_slice(b"\r\n");
    wbuf.extend_from_slice(body);
    let (res, wbuf) = write_buf(stream, wbuf).await;
    let next = if res.is_ok() && keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    };
    (next, wbuf)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length,
    Close,
}

/// Effective per-request knobs (CLI defaults overridden by headers).
#[derive(Debug, Clone)]
struct Knobs {
    ttft_ms: u64,
    gap_ms: u64,
    tokens: u64,
    /// Status of an injected error, 0 = none.
    error_status: u16,
    error_rate: f64,
    cut_after: u64,
    framing: Framing,
    close: bool,
    delay_ms: u64,
    body_bytes: usize,
    retry_after: Option<String>,
    /// Put a `: t=<CLOCK_MONOTONIC ns>` comment line in front of each SSE event, taken just
    /// before its write, so a client on the same machine can measure per-event latency.
    stamp: bool,
}

/// Upper bound for any delay knob (1 hour), so time arithmetic can't overflow.
const MAX_DELAY_MS: u64 = 3_600_000;
/// Upper bound for the token count (keeps `length` framing bodies bounded).
const MAX_TOKENS: u64 = 100_000;

fn knob<T: std::str::FromStr>(
    head: &Head,
    name: &'static str,
    default: T,
) -> Result<T, &'static str> {
    match head.header(name) {
        None => Ok(default),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or(name),
    }
}

impl Knobs {
    fn from_head(head: &Head, shared: &Shared) -> Result<Knobs, &'static str> {
        let cfg = &shared.cfg;
        let header_status: Option<u16> = match head.header("x-mock-status") {
            None => None,
            Some(_) => Some(knob(head, "x-mock-status", 0u16)?),
        };
        let header_rate: Option<f64> = match head.header("x-mock-error-rate") {
            None => None,
            Some(_) => Some(knob(head, "x-mock-error-rate", 0.0f64)?),
        };
        // Status: header, else CLI, else 500 (if only a rate was asked for).
        let error_status = header_status
            .filter(|s| *s != 0)
            .or((cfg.error_status != 0).then_some(cfg.error_status))
            .unwrap_or(500);
        // Rate: header, else 1.0 if x-mock-status was given, else CLI.
        let error_rate = match (header_rate, header_status) {
            (Some(r), _) => r,
            (None, Some(0)) => 0.0,
            (None, Some(_)) => 1.0,
            (None, None) => cfg.error_rate,
        };
        if !(0.0..=1.0).contains(&error_rate) {
            return Err("x-mock-error-rate");
        }
        if !(100..=999).contains(&error_status) {
            return Err("x-mock-status");
        }
        let framing = match head.header_str("x-mock-framing") {
            None => Framing::Chunked,
            Some(s) if s.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            Some(s) if s.eq_ignore_ascii_case("length") => Framing::Length,
            Some(s) if s.eq_ignore_ascii_case("close") => Framing::Close,
            Some(_) => return Err("x-mock-framing"),
        };
        let close = matches!(
            head.header_str("x-mock-close"),
            Some(s) if s == "1" || s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("yes")
        );
        let stamp = match head.header_str("x-mock-stamp") {
            None => shared.cfg.stamp,
            Some(s) => s == "1" || s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("yes"),
        };
        let body_bytes: u64 = knob(head, "x-mock-body-bytes", 0)?;
        if body_bytes > MAX_BODY as u64 {
            return Err("x-mock-body-bytes");
        }
        Ok(Knobs {
            ttft_ms: knob(head, "x-mock-ttft-ms", cfg.ttft_ms)?.min(MAX_DELAY_MS),
            gap_ms: knob(head, "x-mock-gap-ms", cfg.gap_ms)?.min(MAX_DELAY_MS),
            tokens: knob(head, "x-mock-tokens", cfg.tokens)?.min(MAX_TOKENS),
            error_status,
            error_rate,
            cut_after: knob(head, "x-mock-cut-after", cfg.cut_after)?,
            framing,
            close,
            delay_ms: knob(head, "x-mock-delay-ms", 0u64)?.min(MAX_DELAY_MS),
            body_bytes: body_bytes as usize,
            retry_after: head.header_str("x-mock-retry-after").map(str::to_string),
            stamp,
        })
    }

    /// Deterministic error injection: with rate r, request n of the sequence
    /// fails iff floor((n+1)r) > floor(nr).
    fn should_fail(&self, shared: &Shared) -> bool {
        if self.error_rate <= 0.0 {
            return false;
        }
        if self.error_rate >= 1.0 {
            return true;
        }
        let n = shared.error_seq.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * self.error_rate).floor() > (n * self.error_rate).floor()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

async fn handle(
    stream: &mut InboundConn,
    wbuf: Vec<u8>,
    shared: &Arc<Shared>,
    head: &Head,
    body: &[u8],
) -> (Next, Vec<u8>) {
    let path = head.path_only();
    let is_internal = path.starts_with("/_mock/");
    if !is_internal {
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    }
    let knobs = match Knobs::from_head(head, shared) {
        Ok(k) => k,
        Err(name) => {
            let msg = format!("invalid value for header {name}");
            let body = error_json(&msg, "invalid_request_error", Some("bad_mock_header"));
            return write_simple(stream, wbuf, 400, &body, head.keep_alive, &[]).await;
        }
    };
    let keep_alive = head.keep_alive && !knobs.close;
    let method = head.method.as_str();
    if method == "HEAD" {
        // Every route answers with a body; keep the framing right for HEAD.
        let mut wbuf = wbuf;
        write_status_line(&mut wbuf, 405);
        wbuf.extend_from_slice(b"Allow: GET, POST\r\nContent-Length: 0\r\n");
        if !keep_alive {
            wbuf.extend_from_slice(b"Connection: close\r\n");
        }
        wbuf.extend_from_slice(b"\r\n");
        let (res, wbuf) = write_buf(stream, wbuf).await;
        let next = if res.is_ok() && keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        };
        return (next, wbuf);
    }

    if is_internal {
        return match (method, path) {
            (_, "/_mock/stats") => {
                let body = serde_json::to_vec(&shared.stats.to_json()).unwrap_or_default();
                write_simple(stream, wbuf, 200, &body, keep_alive, &[]).await
            }
            ("POST", "/_mock/reset") => {
                shared.stats.reset();
                shared.error_seq.store(0, Ordering::Relaxed);
                write_simple(stream, wbuf, 200, br#"{"ok":true}"#, keep_alive, &[]).await
            }
            _ => not_found(stream, wbuf, head, keep_alive).await,
        };
    }

    if knobs.delay_ms > 0 {
        monoio::time::sleep(Duration::from_millis(knobs.delay_ms)).await;
    }

    if path.starts_with("/echo") {
        let body = echo_json(head, body);
        return write_simple(stream, wbuf, 200, &body, keep_alive, &[]).await;
    }

    let endpoint = if path.ends_with("/chat/completions") {
        Some(Endpoint::Chat)
    } else if path.ends_with("/completions") {
        Some(Endpoint::Completions)
    } else {
        None
    };
    let is_models = path.ends_with("/models");
    if endpoint.is_none() && !is_models {
        return not_found(stream, wbuf, head, keep_alive).await;
    }

    if knobs.should_fail(shared) {
        shared.stats.errors_injected.fetch_add(1, Ordering::Relaxed);
        let (typ, code) = error_type(knobs.error_status);
        let msg = format!("mock injected error (status {})", knobs.error_status);
        let body = error_json(&msg, typ, code);
        let mut extra = Vec::new();
        if let Some(ra) = &knobs.retry_after {
            extra.push(("Retry-After", ra.clone()));
        }
        return write_simple(stream, wbuf, knobs.error_status, &body, keep_alive, &extra).await;
    }

    if is_models {
        if method != "GET" {
            return method_not_allowed(stream, wbuf, keep_alive).await;
        }
        let body = serde_json::to_vec(&json!({
            "object": "list",
            "data": [
                {"id": "mock-model", "object": "model", "created": 1700000000, "owned_by": "llmproxy-mock"},
                {"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "llmproxy-mock"},
                {"id": "gpt-4o", "object": "model", "created": 1700000000, "owned_by": "llmproxy-mock"},
            ]
        }))
        .unwrap_or_default();
        return write_simple(stream, wbuf, 200, &body, keep_alive, &[]).await;
    }
    let Some(endpoint) = endpoint else {
        return not_found(stream, wbuf, head, keep_alive).await;
    };
    if method != "POST" {
        return method_not_allowed(stream, wbuf, keep_alive).await;
    }
    let req: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Default::default())
    } else {
        match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                let b = error_json(
                    "request body is not a JSON object",
                    "invalid_request_error",
                    None,
                );
                return write_simple(stream, wbuf, 400, &b, keep_alive, &[]).await;
            }
        }
    };
    let gen = Gen::new(shared, endpoint, &req, &knobs);
    if req.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let include_usage = req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let http10 = head.version == 0;
        stream_sse(
            stream,
            wbuf,
            shared,
            &knobs,
            &gen,
            include_usage,
            keep_alive,
            http10,
        )
        .await
    } else {
        let body = gen.full_json(knobs.body_bytes);
        write_simple(stream, wbuf, 200, &body, keep_alive, &[]).await
    }
}

async fn not_found(
    stream: &mut InboundConn,
    wbuf: Vec<u8>,
    head: &Head,
    keep_alive: bool,
) -> (Next, Vec<u8>) {
    let msg = format!("Unknown request URL: {} {}", head.method, head.path_only());
    let body = error_json(&msg, "invalid_request_error", Some("unknown_url"));
    write_simple(stream, wbuf, 404, &body, keep_alive, &[]).await
}

async fn method_not_allowed(
    stream: &mut InboundConn,
    wbuf: Vec<u8>,
    keep_alive: bool,
) -> (Next, Vec<u8>) {
    let body = error_json(
        "method not allowed",
        "invalid_request_error",
        Some("method_not_allowed"),
    );
    write_simple(stream, wbuf, 405, &body, keep_alive, &[]).await
}

fn echo_json(head: &Head, body: &[u8]) -> Vec<u8> {
    let headers: Vec<Value> = head
        .headers
        .iter()
        .map(|(n, v)| json!([n, String::from_utf8_lossy(v)]))
        .collect();
    serde_json::to_vec(&json!({
        "method": head.method,
        "path": head.path,
        "version": if head.version == 0 { "HTTP/1.0" } else { "HTTP/1.1" },
        "headers": headers,
        "body_len": body.len(),
        "body": String::from_utf8_lossy(body),
    }))
    .unwrap_or_default()
}

/// Token text: "tok0", " tok1", " tok2", ... (concatenated: "tok0 tok1 tok2").
fn token(i: u64) -> String {
    if i == 0 {
        "tok0".to_string()
    } else {
        format!(" tok{i}")
    }
}

fn count_words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(a) => a.iter().map(count_words).sum(),
        Value::Object(o) => o
            .get("content")
            .or_else(|| o.get("text"))
            .map(count_words)
            .unwrap_or(0),
        _ => 0,
    }
}

/// Response generator for one completion request.
struct Gen {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    tokens: u64,
    prompt_tokens: u64,
}

impl Gen {
    fn new(shared: &Shared, endpoint: Endpoint, req: &Value, knobs: &Knobs) -> Gen {
        let n = shared.id_seq.fetch_add(1, Ordering::Relaxed);
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        let prompt = match endpoint {
            Endpoint::Chat => req.get("messages"),
            Endpoint::Completions => req.get("prompt"),
        };
        Gen {
            endpoint,
            id: format!("{prefix}-mock{n}"),
            model: req
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("mock-model")
                .to_string(),
            created: unix_ms() / 1000,
            tokens: knobs.tokens,
            prompt_tokens: prompt.map(count_words).unwrap_or(0),
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
        })
    }

    /// Non-streaming answer, padded to about `pad_to` bytes if asked.
    fn full_json(&self, pad_to: usize) -> Vec<u8> {
        let text: String = (0..self.tokens).map(token).collect();
        let v = match self.endpoint {
            Endpoint::Chat => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
                "usage": self.usage(),
            }),
            Endpoint::Completions => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
                "usage": self.usage(),
            }),
        };
        let mut out = serde_json::to_vec(&v).unwrap_or_default();
        const PAD_OVERHEAD: usize = br#","padding":""#.len() + 1; // + closing quote
        if pad_to > out.len() + PAD_OVERHEAD && out.last() == Some(&b'}') {
            let n = pad_to - out.len() - PAD_OVERHEAD;
            out.pop();
            out.extend_from_slice(br#","padding":""#);
            out.resize(out.len() + n, b'x');
            out.extend_from_slice(b"\"}");
        }
        out
    }

    /// SSE event `i` (one token), as `data: {json}\n\n`.
    fn event(&self, i: u64, out: &mut Vec<u8>) {
        let last = i + 1 == self.tokens;
        let finish = if last { json!("stop") } else { Value::Null };
        let v = match self.endpoint {
            Endpoint::Chat => {
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": token(i)})
                } else {
                    json!({"content": token(i)})
                };
                json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
            Endpoint::Completions => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": token(i), "logprobs": null, "finish_reason": finish}],
            }),
        };
        push_event(out, &v);
    }

    /// Final usage event (stream_options.include_usage).
    fn usage_event(&self, out: &mut Vec<u8>) {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        });
        push_event(out, &v);
    }
}

fn push_event(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
}

const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// Wrap `payload` as one HTTP chunk into `out`.
/// `: t=` + 20 digits + `\n`: an SSE comment line, ignored by SSE parsers.
const STAMP_PLACEHOLDER: &[u8] = b": t=00000000000000000000\n";

/// Writes `ns` as 20 zero-padded digits into the placeholder's digit field.
fn write_stamp(line: &mut [u8], mut ns: u64) {
    let digits = &mut line[4..24];
    for d in digits.iter_mut().rev() {
        *d = b'0' + (ns % 10) as u8;
        ns /= 10;
    }
}

fn push_chunk(out: &mut Vec<u8>, payload: &[u8]) {
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", payload.len());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Sleep for `dur`, but return early with `true` if the client closed the
/// connection (EOF or reset). Data sent by the client (pipelining) is left in
/// the socket; after seeing it we just sleep the remainder.
async fn wait_or_gone(stream: &InboundConn, dur: Duration) -> bool {
    if dur.is_zero() {
        return false;
    }
    let deadline = monoio::time::Instant::now() + dur;
    loop {
        let now = monoio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        monoio::select! {
            _ = monoio::time::sleep(deadline - now) => return false,
            r = readable(stream, deadline - now) => {
                if r.is_err() {
                    return true;
                }
                match peek_state(stream) {
                    PeekState::Gone => return true,
                    PeekState::Data => {
                        monoio::time::sleep_until(deadline).await;
                        return false;
                    }
                    PeekState::Nothing => {
                        // Spurious readiness (or the TLS poll): avoid a busy loop, but never
                        // sleep past the deadline (that would slow the pacing down).
                        let left = deadline.saturating_duration_since(monoio::time::Instant::now());
                        monoio::time::sleep(Duration::from_millis(1).min(left)).await;
                    }
                }
            }
        }
    }
}

/// Waits until the socket may have something to read. A TLS stream hides its socket, so there
/// the socket is peeked every few milliseconds instead; ciphertext (a close_notify included)
/// counts as data, so over TLS a client that leaves is noticed by the next write or by its FIN.
async fn readable(stream: &InboundConn, max: Duration) -> io::Result<()> {
    match stream.as_plain() {
        Some(tcp) => tcp.readable(false).await,
        None => {
            monoio::time::sleep(Duration::from_millis(5).min(max)).await;
            Ok(())
        }
    }
}

enum PeekState {
    Gone,
    Data,
    Nothing,
}

fn peek_state(stream: &InboundConn) -> PeekState {
    let mut b = [0u8; 1];
    // SAFETY: valid fd owned by `stream`, 1-byte stack buffer.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n > 0 {
        return PeekState::Data;
    }
    if n == 0 {
        return PeekState::Gone;
    }
    match io::Error::last_os_error().kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => PeekState::Nothing,
        _ => PeekState::Gone,
    }
}

/// Holds one of the mock's generation slots until dropped.
struct GenerationSlot<'a>(Option<&'a AtomicUsize>);

impl Drop for GenerationSlot<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Waits for a free generation slot (none needed without `--max-concurrency`); `None` when the
/// client left while queued.
async fn generation_slot<'a>(
    stream: &InboundConn,
    shared: &'a Shared,
) -> Option<GenerationSlot<'a>> {
    let max = shared.cfg.max_concurrency;
    if max == 0 {
        return Some(GenerationSlot(None));
    }
    loop {
        let cur = shared.generating.load(Ordering::Acquire);
        if cur < max
            && shared
                .generating
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(GenerationSlot(Some(&shared.generating)));
        }
        if wait_or_gone(stream, Duration::from_millis(1)).await {
            return None;
        }
    }
}

fn record_abort(shared: &Shared) {
    shared
        .stats
        .streams_aborted_by_client
        .fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .last_abort_unix_ms
        .store(unix_ms(), Ordering::Relaxed);
}

/// Stream an SSE answer. Each event goes out in its own write as soon as it
/// is due (chunked/close framing); `length` framing builds the whole body.
#[allow(clippy::too_many_arguments)]
async fn stream_sse(
    stream: &mut InboundConn,
    mut wbuf: Vec<u8>,
    shared: &Shared,
    knobs: &Knobs,
    gen: &Gen,
    include_usage: bool,
    keep_alive: bool,
    http10: bool,
) -> (Next, Vec<u8>) {
    use std::io::Write;
    let stats = &shared.stats;
    stats.streams_started.fetch_add(1, Ordering::Relaxed);
    // A server with room for `max_concurrency` generations at once (vLLM's max_num_seqs):
    // later streams queue for a slot, which is what makes a weak upstream slow under load.
    let Some(_slot) = generation_slot(stream, shared).await else {
        record_abort(shared);
        return (Next::Close, wbuf);
    };
    let mut framing = knobs.framing;
    if http10 && framing == Framing::Chunked {
        framing = Framing::Close; // no chunked encoding for HTTP/1.0 clients
    }
    let keep_alive = keep_alive && framing != Framing::Close;
    let ttft = Duration::from_millis(knobs.ttft_ms);
    let gap = Duration::from_millis(knobs.gap_ms);
    let cut = knobs.cut_after;

    write_status_line(&mut wbuf, 200);
    wbuf.extend_from_slice(
        b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\nServer: llmproxy-mock\r\n",
    );
    if !keep_alive {
        wbuf.extend_from_slice(b"Connection: close\r\n");
    }

    if framing == Framing::Length {
        // Build everything, wait as long as generation would take, send once.
        let mut body = Vec::new();
        let mut ends = Vec::new(); // end offset of each event
        for i in 0..gen.tokens {
            gen.event(i, &mut body);
            ends.push(body.len());
        }
        if include_usage {
            gen.usage_event(&mut body);
            ends.push(body.len());
        }
        body.extend_from_slice(DONE_EVENT);
        ends.push(body.len());
        let _ = write!(wbuf, "Content-Length: {}\r\n\r\n", body.len());
        let steps = u32::try_from(gen.tokens.saturating_sub(1)).unwrap_or(u32::MAX);
        let total = ttft.saturating_add(gap.saturating_mul(steps));
        if wait_or_gone(stream, total).await {
            record_abort(shared);
            wbuf.clear();
            return (Next::Close, wbuf);
        }
        let cut_at = (cut > 0)
            .then(|| ends.get(cut as usize - 1).copied())
            .flatten()
            .filter(|&e| e < body.len());
        wbuf.extend_from_slice(&body[..cut_at.unwrap_or(body.len())]);
        let (res, wbuf) = write_buf(stream, wbuf).await;
        if res.is_err() {
            record_abort(shared);
            return (Next::Close, wbuf);
        }
        if cut_at.is_some() {
            stats.streams_cut.fetch_add(1, Ordering::Relaxed);
            return (Next::Close, wbuf);
        }
        stats.streams_completed.fetch_add(1, Ordering::Relaxed);
        let next = if keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        };
        return (next, wbuf);
    }

    if framing == Framing::Chunked {
        wbuf.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    wbuf.extend_from_slice(b"\r\n");
    let (res, b) = write_buf(stream, wbuf).await;
    wbuf = b;
    if res.is_err() {
        record_abort(shared);
        return (Next::Close, wbuf);
    }

    let mut ev: Vec<u8> = Vec::with_capacity(512);
    let mut written: u64 = 0;
    // Events: tokens, optional usage, then [DONE] (+ terminator), each one
    // write. Token events are paced; usage/[DONE] follow the last token.
    let n_events = gen.tokens + u64::from(include_usage) + 1;
    for e in 0..n_events {
        if cut > 0 && written >= cut {
            stats.streams_cut.fetch_add(1, Ordering::Relaxed);
            return (Next::Close, wbuf);
        }
        let delay = if e == 0 {
            ttft
        } else if e < gen.tokens {
            gap
        } else {
            Duration::ZERO
        };
        if wait_or_gone(stream, delay).await {
            record_abort(shared);
            return (Next::Close, wbuf);
        }
        ev.clear();
        let is_done = e + 1 == n_events;
        if knobs.stamp {
            // Room for the stamp, filled in once the event is built (closest to the write).
            ev.extend_from_slice(STAMP_PLACEHOLDER);
        }
        if e < gen.tokens {
            gen.event(e, &mut ev);
        } else if is_done {
            ev.extend_from_slice(DONE_EVENT);
        } else {
            gen.usage_event(&mut ev);
        }
        if knobs.stamp {
            write_stamp(&mut ev[..STAMP_PLACEHOLDER.len()], super::monotonic_ns());
        }
        match framing {
            Framing::Chunked => {
                push_chunk(&mut wbuf, &ev);
                if is_done && !(cut > 0 && written + 1 >= cut) {
                    wbuf.extend_from_slice(b"0\r\n\r\n");
                }
            }
            _ => wbuf.extend_from_slice(&ev),
        }
        let (res, b) = write_buf(stream, wbuf).await;
        wbuf = b;
        if res.is_err() {
            record_abort(shared);
            return (Next::Close, wbuf);
        }
        written += 1;
    }
    if framing == Framing::Chunked && cut > 0 && written >= cut {
        // The [DONE] event was the cut point: leave out the terminator.
        stats.streams_cut.fetch_add(1, Ordering::Relaxed);
        return (Next::Close, wbuf);
    }
    stats.streams_completed.fetch_add(1, Ordering::Relaxed);
    let next = if keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    };
    (next, wbuf)
}
