//! Integration tests for the mock upstream, over raw TCP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llmproxy::mock::{monotonic_ns, start, MockConfig, MockServer};
use serde_json::Value;

fn server() -> MockServer {
    server_with(MockConfig::default())
}

fn server_with(mut cfg: MockConfig) -> MockServer {
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    start(cfg).expect("start mock")
}

/// Minimal raw HTTP/1.1 client connection.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        Conn { s, buf: Vec::new() }
    }

    fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).unwrap();
    }

    /// Read more bytes; returns false on EOF.
    fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 16 * 1024];
        match self.s.read(&mut tmp) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill(), "EOF while reading {n} bytes");
        }
        self.buf.drain(..n).collect()
    }

    fn take_line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.drain(..i + 2).collect::<Vec<_>>();
                return line[..i].to_vec();
            }
            assert!(self.fill(), "EOF while reading a line");
        }
    }

    fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        let status_line = String::from_utf8(self.take_line()).unwrap();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = String::from_utf8(self.take_line()).unwrap();
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').expect("header line");
            headers.push((n.to_string(), v.trim().to_string()));
        }
        (status, headers)
    }

    /// One chunk of a chunked body (None for the terminating chunk).
    fn read_chunk(&mut self) -> Option<Vec<u8>> {
        let size_line = String::from_utf8(self.take_line()).unwrap();
        let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
        if size == 0 {
            assert_eq!(self.take_line(), b"", "trailer/end");
            return None;
        }
        let data = self.take(size);
        assert_eq!(self.take_line(), b"");
        Some(data)
    }

    fn read_to_eof(&mut self) -> Vec<u8> {
        while self.fill() {}
        std::mem::take(&mut self.buf)
    }

    fn read_response(&mut self) -> Resp {
        let (status, headers) = self.read_head();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let body = if let Some(cl) = get("content-length") {
            self.take(cl.parse().unwrap())
        } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            while let Some(c) = self.read_chunk() {
                body.extend_from_slice(&c);
            }
            body
        } else {
            self.read_to_eof()
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    fn is_closed(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_millis(2000)))
            .unwrap();
        !self.fill()
    }
}

fn post(path: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: mock\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: mock\r\n\r\n").into_bytes()
}

fn stats(addr: SocketAddr) -> Value {
    let mut c = Conn::new(addr);
    c.send(&get("/_mock/stats"));
    c.read_response().json()
}

/// Data payloads of the SSE events in `body`.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

const CHAT: &str =
    r#"{"model":"gpt-test","messages":[{"role":"user","content":"say three words"}]}"#;
const CHAT_STREAM: &str =
    r#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn json_chat_answer() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&post("/v1/chat/completions", "", CHAT));
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-test");
    let want: Vec<String> = (0..16).map(|i| format!("tok{i}")).collect();
    assert_eq!(v["choices"][0]["message"]["content"], want.join(" "));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 19);
}

#[test]
fn json_text_completion_under_prefix_and_padding() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&post(
        "/openai/v1/completions",
        "x-mock-tokens: 3\r\n",
        r#"{"prompt":"a b"}"#,
    ));
    let v = c.read_response().json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "tok0 tok1 tok2");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    c.send(&post(
        "/chat/completions",
        "x-mock-body-bytes: 4096\r\n",
        CHAT,
    ));
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert!(
        (4090..=4100).contains(&r.body.len()),
        "len {}",
        r.body.len()
    );
    assert_eq!(r.json()["object"], "chat.completion");
}

#[test]
fn sse_events_are_paced_and_terminated() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    let t0 = Instant::now();
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-ttft-ms: 150\r\nx-mock-gap-ms: 100\r\nx-mock-tokens: 4\r\n",
        CHAT_STREAM,
    ));
    let (status, headers) = c.read_head();
    let head_at = t0.elapsed();
    assert_eq!(status, 200);
    let h = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(h("content-type"), Some("text/event-stream"));
    assert_eq!(h("transfer-encoding"), Some("chunked"));
    assert!(
        head_at < Duration::from_millis(120),
        "head is sent before TTFT: {head_at:?}"
    );

    let mut chunks = Vec::new();
    while let Some(chunk) = c.read_chunk() {
        chunks.push((t0.elapsed(), chunk));
    }
    // 4 tokens + [DONE], one chunk each.
    assert_eq!(chunks.len(), 5, "one chunk per event");
    for (i, (_, chunk)) in chunks.iter().enumerate().take(4) {
        let data = sse_data(chunk);
        assert_eq!(data.len(), 1, "exactly one event per chunk");
        let v: Value = serde_json::from_str(&data[0]).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        let want = if i == 0 {
            "tok0".to_string()
        } else {
            format!(" tok{i}")
        };
        assert_eq!(v["choices"][0]["delta"]["content"], want.as_str());
    }
    assert_eq!(chunks[4].1, b"data: [DONE]\n\n");

    let first = chunks[0].0;
    assert!(first >= Duration::from_millis(140), "ttft {first:?}");
    assert!(first < Duration::from_millis(1000), "ttft {first:?}");
    for w in chunks[..4].windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(gap >= Duration::from_millis(85), "gap too short {gap:?}");
        assert!(gap < Duration::from_millis(600), "gap too long {gap:?}");
    }

    // Keep-alive after a stream.
    c.send(&get("/v1/models"));
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "list");

    let st = stats(srv.addr());
    assert_eq!(st["streams_started"], 1);
    assert_eq!(st["streams_completed"], 1);
    assert_eq!(st["streams_aborted_by_client"], 0);
}

#[test]
fn sse_include_usage_and_text_completion_stream() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&post(
        "/v1/completions",
        "x-mock-tokens: 2\r\n",
        r#"{"stream":true,"stream_options":{"include_usage":true},"prompt":"x"}"#,
    ));
    let r = c.read_response();
    let data = sse_data(&r.body);
    assert_eq!(data.len(), 4, "{data:?}");
    let v: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(v["choices"][0]["text"], " tok1");
    let u: Value = serde_json::from_str(&data[2]).unwrap();
    assert_eq!(u["usage"]["completion_tokens"], 2);
    assert_eq!(data[3], "[DONE]");
}

#[test]
fn sse_framing_close_and_length() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-tokens: 3\r\nx-mock-framing: close\r\n",
        CHAT_STREAM,
    ));
    let r = c.read_response(); // no CL/TE: reads to EOF
    assert_eq!(r.header("connection"), Some("close"));
    assert!(r.header("content-length").is_none());
    assert!(r.header("transfer-encoding").is_none());
    assert_eq!(sse_data(&r.body).len(), 4);

    let mut c = Conn::new(srv.addr());
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-tokens: 3\r\nx-mock-framing: length\r\n",
        CHAT_STREAM,
    ));
    let r = c.read_response();
    assert!(r.header("content-length").is_some());
    assert_eq!(sse_data(&r.body).len(), 4);
    assert_eq!(sse_data(&r.body)[3], "[DONE]");
    // Still keep-alive.
    c.send(&get("/v1/models"));
    assert_eq!(c.read_response().status, 200);
}

#[test]
fn chunked_request_body_in_pieces() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(b"POST /echo HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel");
    std::thread::sleep(Duration::from_millis(20));
    c.send(b"lo\r\n6;ext=1\r\n world\r\n");
    std::thread::sleep(Duration::from_millis(20));
    c.send(b"0\r\n\r\n");
    let v = c.read_response().json();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["body_len"], 11);
    assert_eq!(v["body"], "hello world");

    // The connection is still usable and in sync.
    c.send(&post("/echo", "", "abc"));
    assert_eq!(c.read_response().json()["body"], "abc");
}

#[test]
fn echo_reports_request_as_received() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(b"PUT /echo/sub?x=1&y=%20 HTTP/1.1\r\nHost: mock\r\nX-Mixed-Case: Va Lue\r\nx-dup: 1\r\nX-Dup: 2\r\nContent-Length: 2\r\n\r\nhi");
    let v = c.read_response().json();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/echo/sub?x=1&y=%20");
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["body_len"], 2);
    let headers: Vec<(String, String)> = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("Host", "mock"),
        ("X-Mixed-Case", "Va Lue"),
        ("x-dup", "1"),
        ("X-Dup", "2"),
        ("Content-Length", "2"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(headers, want);
}

#[test]
fn keep_alive_two_requests_one_connection_and_pipelining() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&post("/v1/chat/completions", "x-mock-tokens: 1\r\n", CHAT));
    assert_eq!(c.read_response().status, 200);
    c.send(&post("/v1/chat/completions", "x-mock-tokens: 2\r\n", CHAT));
    let v = c.read_response().json();
    assert_eq!(v["usage"]["completion_tokens"], 2);

    // Pipelined: three requests in one write, answers in order.
    let mut raw = get("/echo/1");
    raw.extend(post("/echo/2", "", "xy"));
    raw.extend(get("/echo/3"));
    c.send(&raw);
    for p in ["/echo/1", "/echo/2", "/echo/3"] {
        assert_eq!(c.read_response().json()["path"], p);
    }

    let st = stats(srv.addr());
    // 1 test connection + this stats connection.
    assert_eq!(st["connections_accepted"], 2);
    assert_eq!(st["requests"], 5);
}

#[test]
fn connection_close_rules() {
    let srv = server();
    // Connection: close
    let mut c = Conn::new(srv.addr());
    c.send(b"GET /v1/models HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed());
    // HTTP/1.0 without keep-alive
    let mut c = Conn::new(srv.addr());
    c.send(b"GET /echo HTTP/1.0\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.json()["version"], "HTTP/1.0");
    assert!(c.is_closed());
    // x-mock-close
    let mut c = Conn::new(srv.addr());
    c.send(b"GET /v1/models HTTP/1.1\r\nx-mock-close: 1\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed());
}

#[test]
fn cut_after_closes_without_terminating_chunk() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-cut-after: 2\r\nx-mock-tokens: 5\r\n",
        CHAT_STREAM,
    ));
    let (status, _) = c.read_head();
    assert_eq!(status, 200);
    let rest = c.read_to_eof();
    let text = String::from_utf8_lossy(&rest);
    assert_eq!(text.matches("data: ").count(), 2, "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(!text.contains("\r\n0\r\n\r\n"));
    assert!(text.ends_with("\n\n\r\n"), "ends after a full event chunk");

    let st = stats(srv.addr());
    assert_eq!(st["streams_cut"], 1);
    assert_eq!(st["streams_completed"], 0);
    assert_eq!(st["streams_aborted_by_client"], 0);
}

#[test]
fn cut_after_from_config() {
    let srv = server_with(MockConfig {
        cut_after: 1,
        ..MockConfig::default()
    });
    let mut c = Conn::new(srv.addr());
    c.send(&post("/v1/chat/completions", "", CHAT_STREAM));
    let _ = c.read_head();
    let text = String::from_utf8_lossy(&c.read_to_eof()).to_string();
    assert_eq!(text.matches("data: ").count(), 1, "{text}");
}

#[test]
fn client_abort_during_stream_is_counted_promptly() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-gap-ms: 300\r\nx-mock-tokens: 100\r\n",
        CHAT_STREAM,
    ));
    let _ = c.read_head();
    assert!(c.read_chunk().is_some());
    drop(c);
    let closed_at = Instant::now();
    loop {
        let st = stats(srv.addr());
        if st["streams_aborted_by_client"] == 1 {
            assert!(st["last_abort_unix_ms"].as_u64().unwrap() > 0);
            assert_eq!(st["streams_completed"], 0);
            break;
        }
        assert!(
            closed_at.elapsed() < Duration::from_millis(1500),
            "abort not noticed: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Noticed while waiting (well before 2 more gaps would have let a write fail).
    assert!(closed_at.elapsed() < Duration::from_millis(450));

    // Reset zeroes counters.
    let mut c = Conn::new(srv.addr());
    c.send(b"POST /_mock/reset HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
    let st = stats(srv.addr());
    assert_eq!(st["streams_aborted_by_client"], 0);
    assert_eq!(st["last_abort_unix_ms"], 0);
    assert_eq!(st["requests"], 0);
}

#[test]
fn client_abort_with_zero_gap_counts_on_write_failure() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-tokens: 100000\r\nx-mock-ttft-ms: 50\r\n",
        CHAT_STREAM,
    ));
    let _ = c.read_head();
    drop(c);
    let t = Instant::now();
    while stats(srv.addr())["streams_aborted_by_client"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(3), "abort not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn injected_errors() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-status: 503\r\n",
        CHAT,
    ));
    let r = c.read_response();
    assert_eq!(r.status, 503);
    let v = r.json();
    assert!(v["error"]["message"].is_string());
    assert!(v["error"]["type"].is_string());
    assert!(v["error"].get("code").is_some());

    let mut failures = 0;
    for _ in 0..8 {
        c.send(&post(
            "/v1/chat/completions",
            "x-mock-status: 429\r\nx-mock-error-rate: 0.25\r\n",
            CHAT,
        ));
        let r = c.read_response();
        if r.status == 429 {
            failures += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    assert_eq!(failures, 2);

    let srv = server_with(MockConfig {
        error_status: 500,
        error_rate: 1.0,
        ..MockConfig::default()
    });
    let mut c = Conn::new(srv.addr());
    c.send(&post("/v1/chat/completions", "", CHAT_STREAM));
    assert_eq!(c.read_response().status, 500);
    // Echo is never failed.
    c.send(&get("/echo"));
    assert_eq!(c.read_response().status, 200);
}

#[test]
fn delay_before_head() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    let t = Instant::now();
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-delay-ms: 150\r\n",
        CHAT,
    ));
    assert_eq!(c.read_response().status, 200);
    assert!(t.elapsed() >= Duration::from_millis(140));
}

#[test]
fn not_found_is_openai_error() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(&get("/v2/nothing"));
    let r = c.read_response();
    assert_eq!(r.status, 404);
    let v = r.json();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v2/nothing"));
    // keep-alive after 404
    c.send(&get("/v1/models"));
    assert_eq!(c.read_response().status, 200);
}

#[test]
fn bad_input_gets_400_and_close() {
    let srv = server();
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"\x00\x01\x02\xff\r\n\r\n",
    ] {
        let mut c = Conn::new(srv.addr());
        c.send(raw);
        let r = c.read_response();
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(raw));
        assert!(c.is_closed());
    }
    // Head larger than 64 KiB.
    let mut c = Conn::new(srv.addr());
    let mut raw = b"GET /echo HTTP/1.1\r\nX-Big: ".to_vec();
    raw.resize(70 * 1024, b'a');
    let _ = c.s.write_all(&raw);
    let r = c.read_response();
    assert_eq!(r.status, 400);
    assert!(c.is_closed());
    // The server is still fine.
    let mut c = Conn::new(srv.addr());
    c.send(&get("/v1/models"));
    assert_eq!(c.read_response().status, 200);
    assert!(stats(srv.addr())["bad_requests"].as_u64().unwrap() >= 6);
}

#[test]
fn head_request_keeps_framing() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(b"HEAD /v1/models HTTP/1.1\r\nHost: m\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 405);
    assert!(r.body.is_empty());
    c.send(&get("/v1/models"));
    assert_eq!(c.read_response().status, 200);
}

#[test]
fn expect_100_continue() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    c.send(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    let (status, _) = c.read_head();
    assert_eq!(status, 100);
    c.send(b"hello");
    assert_eq!(c.read_response().json()["body"], "hello");
}

#[test]
fn multiple_threads_share_the_port() {
    let srv = server_with(MockConfig {
        threads: 3,
        ..MockConfig::default()
    });
    for _ in 0..20 {
        let mut c = Conn::new(srv.addr());
        c.send(&get("/v1/models"));
        assert_eq!(c.read_response().status, 200);
    }
    assert_eq!(stats(srv.addr())["connections_accepted"], 21);
}

#[test]
fn binary_prints_listening_line_and_serves() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmproxy-mock"))
        .args(["--listen", "127.0.0.1:0", "--threads", "2", "--tokens", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("llmproxy-mock listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .parse()
        .unwrap();
    assert_ne!(addr.port(), 0);
    let mut c = Conn::new(addr);
    c.send(&post("/v1/chat/completions", "", CHAT));
    let r = c.read_response();
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(r.json()["choices"][0]["message"]["content"], "tok0 tok1");
}

#[test]
fn stop_releases_the_port() {
    let srv = server();
    let addr = srv.addr();
    srv.stop();
    // Nothing accepts any more.
    let refused = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err();
    assert!(refused, "port still accepting after stop");
}

#[test]
fn garbage_and_mutated_requests_never_kill_the_server() {
    let srv = server_with(MockConfig {
        tokens: 3,
        ..MockConfig::default()
    });
    let base = post(
        "/v1/chat/completions",
        "Connection: keep-alive\r\n",
        r#"{"stream":true,"messages":[{"content":"hi"}]}"#,
    );
    let chunked =
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in 0..300 {
        let mut input = if case % 3 == 0 {
            base.clone()
        } else if case % 3 == 1 {
            chunked.clone()
        } else {
            (0..(rnd() % 200)).map(|_| rnd() as u8).collect()
        };
        if case % 3 != 2 {
            for _ in 0..(1 + rnd() % 4) {
                if input.is_empty() {
                    break;
                }
                let i = (rnd() as usize) % input.len();
                match rnd() % 3 {
                    0 => input[i] = rnd() as u8,
                    1 => {
                        input.remove(i);
                    }
                    _ => input.insert(i, rnd() as u8),
                }
            }
        }
        let mut s = TcpStream::connect(srv.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&input);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    let mut c = Conn::new(srv.addr());
    c.send(&post("/v1/chat/completions", "", CHAT));
    assert_eq!(c.read_response().status, 200);
    // Everything closed except `c` and the stats connection itself.
    let t = Instant::now();
    loop {
        let st = stats(srv.addr());
        if st["connections_open"] == 2 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "leaked connections: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn huge_knob_values_do_not_break_the_server() {
    let srv = server();
    for hdr in [
        "x-mock-gap-ms: 18446744073709551615\r\nx-mock-framing: length\r\nx-mock-tokens: 18446744073709551615\r\n",
        "x-mock-ttft-ms: 18446744073709551615\r\n",
        "x-mock-delay-ms: 18446744073709551615\r\n",
        "x-mock-cut-after: 18446744073709551615\r\nx-mock-tokens: 0\r\n",
    ] {
        let mut c = Conn::new(srv.addr());
        c.send(&post("/v1/chat/completions", hdr, CHAT_STREAM));
        c.s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut tmp = [0u8; 4096];
        let _ = c.s.read(&mut tmp);
    }
    for bad in [
        "x-mock-gap-ms: -1\r\n",
        "x-mock-framing: weird\r\n",
        "x-mock-error-rate: 2\r\n",
        "x-mock-status: 42\r\n",
    ] {
        let mut c = Conn::new(srv.addr());
        c.send(&post("/v1/chat/completions", bad, CHAT));
        assert_eq!(c.read_response().status, 400, "{bad}");
    }
    let mut c = Conn::new(srv.addr());
    c.send(&get("/v1/models"));
    assert_eq!(c.read_response().status, 200);
}

#[test]
fn max_concurrency_queues_streams() {
    let srv = server_with(MockConfig {
        max_concurrency: 1,
        ..MockConfig::default()
    });
    let t0 = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let addr = srv.addr();
            std::thread::spawn(move || {
                let mut c = Conn::new(addr);
                c.send(&post(
                    "/v1/chat/completions",
                    "x-mock-ttft-ms: 200\r\nx-mock-tokens: 1\r\n",
                    CHAT_STREAM,
                ));
                let mut all = Vec::new();
                let mut tmp = [0u8; 4096];
                while !all.ends_with(b"0\r\n\r\n") {
                    let n = c.s.read(&mut tmp).unwrap();
                    assert!(n > 0);
                    all.extend_from_slice(&tmp[..n]);
                }
                t0.elapsed()
            })
        })
        .collect();
    let mut took: Vec<Duration> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    took.sort();
    // One generation at a time: the second stream waits for the first.
    assert!(took[0] >= Duration::from_millis(190), "{took:?}");
    assert!(took[1] >= Duration::from_millis(390), "{took:?}");
}

#[test]
fn stamped_events_carry_their_send_time() {
    let srv = server();
    let mut c = Conn::new(srv.addr());
    let before = monotonic_ns();
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-stamp: 1\r\nx-mock-gap-ms: 30\r\nx-mock-tokens: 3\r\n",
        CHAT_STREAM,
    ));
    let (status, _) = c.read_head();
    assert_eq!(status, 200);
    let mut stamps = Vec::new();
    while let Some(chunk) = c.read_chunk() {
        let arrived = monotonic_ns();
        let text = String::from_utf8(chunk).unwrap();
        // The stamp is an SSE comment line in front of the unchanged event.
        let (line, event) = text.split_once('\n').expect("stamp line");
        let t: u64 = line
            .strip_prefix(": t=")
            .expect(": t= prefix")
            .parse()
            .unwrap();
        assert_eq!(line.len(), 24, "fixed width: {line:?}");
        assert!(
            event.starts_with("data: ") && event.ends_with("\n\n"),
            "{event:?}"
        );
        assert!(
            t >= before && t <= arrived,
            "stamp {t} not in [{before}, {arrived}]"
        );
        stamps.push(t);
    }
    assert_eq!(stamps.len(), 4, "3 tokens + [DONE]");
    let gap = stamps[1] - stamps[0];
    assert!(
        gap >= 25_000_000,
        "token events 30 ms apart, stamps {gap} ns"
    );

    // Without the knob the events are unchanged.
    c.send(&post(
        "/v1/chat/completions",
        "x-mock-tokens: 2\r\n",
        CHAT_STREAM,
    ));
    let r = c.read_response();
    assert!(
        r.body.starts_with(b"data: {"),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(!String::from_utf8_lossy(&r.body).contains(": t="));
}
