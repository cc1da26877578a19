//! Malformed and ambiguous requests against the real `llmproxyd`, HAProxy/Envoy regression-table
//! style: raw request bytes → what the client gets, whether the connection closes, and what the
//! upstream (the mock's `/echo`) saw. Anything ambiguous about framing must be refused before a
//! byte of it reaches the upstream, so no request can be smuggled past the proxy.

mod common;

use std::time::{Duration, Instant};

use common::{config_with_url, Client, Mock, Proxy, Response};
use serde_json::Value;

/// `limits.max_body_bytes` in the test config.
const BODY_CAP: usize = 1024;

/// One forward with a 1 s head timeout and a 1 KiB body cap, to the mock with no base path (so
/// `/echo` reaches the mock's `/echo`).
fn yaml(mock: &Mock) -> String {
    config_with_url(
        &format!("http://127.0.0.1:{}", mock.port()),
        "      timeout:\n        connect: 1\n      limits:\n        max_body_bytes: 1024",
        "",
        "",
    )
}

fn start() -> (Mock, Proxy) {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&yaml(&mock), &[]);
    (mock, proxy)
}

/// What a row expects back.
#[derive(Clone, Copy)]
enum Want {
    /// The proxy's own JSON error with this status and `error.code`, then a close.
    Error(u16, &'static str),
    /// The mock's `/echo` answered 200; the echoed request passes this check.
    Echo(fn(&Value)),
    /// No response at all, just a close.
    Silent,
}

struct Row {
    name: &'static str,
    raw: Vec<u8>,
    /// Half-close after sending (the client has nothing more to say).
    eof: bool,
    want: Want,
    /// The proxy closes the connection after this exchange.
    closed: bool,
    /// Requests the mock received because of this row.
    upstream: u64,
}

fn err(name: &'static str, raw: impl AsRef<[u8]>, status: u16, code: &'static str) -> Row {
    Row {
        name,
        raw: raw.as_ref().to_vec(),
        eof: false,
        want: Want::Error(status, code),
        closed: true,
        upstream: 0,
    }
}

fn bad(name: &'static str, raw: impl AsRef<[u8]>) -> Row {
    err(name, raw, 400, "bad_request")
}

/// Accepted on a kept-alive connection: one request reaches the mock.
fn ok(name: &'static str, raw: impl AsRef<[u8]>, check: fn(&Value)) -> Row {
    Row {
        name,
        raw: raw.as_ref().to_vec(),
        eof: false,
        want: Want::Echo(check),
        closed: false,
        upstream: 1,
    }
}

/// A header the mock received (names compared case-insensitively); all values joined by `,`.
fn seen(v: &Value, name: &str) -> Option<String> {
    let vals: Vec<String> = v["headers"]
        .as_array()
        .expect("echo headers")
        .iter()
        .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|h| h[1].as_str().unwrap().to_owned())
        .collect();
    (!vals.is_empty()).then(|| vals.join(","))
}

fn echo_is(v: &Value, method: &str, path: &str, body: &str) {
    assert_eq!(v["method"], method, "method seen upstream: {v}");
    assert_eq!(v["path"], path, "path seen upstream: {v}");
    assert_eq!(v["body"], body, "body seen upstream: {v}");
    assert_eq!(v["body_len"], body.len(), "body_len seen upstream: {v}");
}

fn chunked_hello(v: &Value) {
    echo_is(v, "POST", "/echo", "hello");
    assert_eq!(
        seen(v, "transfer-encoding").as_deref(),
        Some("chunked"),
        "{v}"
    );
    assert_eq!(seen(v, "content-length"), None, "{v}");
}

/// The proxy's error body: `{"error":{"message","type","code"}}`, and a close.
fn assert_error_shape(r: &Response, status: u16, code: &str, ctx: &str) {
    assert_eq!(r.status, status, "{ctx}: status; body {}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{ctx}: content-type"
    );
    assert_eq!(r.header("connection"), Some("close"), "{ctx}: connection");
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].is_string(), "{ctx}: error.message in {v}");
    assert_eq!(
        e["type"], "invalid_request_error",
        "{ctx}: error.type in {v}"
    );
    assert_eq!(e["code"], code, "{ctx}: error.code in {v}");
    assert_eq!(
        e.as_object().unwrap().len(),
        3,
        "{ctx}: error has exactly message/type/code: {v}"
    );
}

fn head(lines: &str) -> String {
    format!("{lines}\r\n\r\n")
}

fn rows() -> Vec<Row> {
    let post = "POST /echo HTTP/1.1\r\nHost: a\r\n";
    let chunked_body = "5\r\nhello\r\n0\r\n\r\n";
    let many = |n: usize| {
        let mut s = String::from("GET /echo HTTP/1.1\r\nHost: a\r\n");
        for i in 1..n {
            s.push_str(&format!("X-H{i}: {i}\r\n"));
        }
        s + "\r\n"
    };
    vec![
        // --- Content-Length / Transfer-Encoding ambiguity ---
        bad(
            "CL then TE",
            format!("{post}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}"),
        ),
        bad(
            "TE then CL",
            format!("{post}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n{chunked_body}"),
        ),
        bad(
            "duplicate equal CL",
            format!("{post}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        bad(
            "conflicting CL",
            format!("{post}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ),
        bad("CL with + sign", format!("{post}Content-Length: +5\r\n\r\nhello")),
        bad("CL negative", format!("{post}Content-Length: -5\r\n\r\nhello")),
        bad("CL with inner space", format!("{post}Content-Length: 5 5\r\n\r\nhello")),
        bad("CL hex", format!("{post}Content-Length: 0x5\r\n\r\nhello")),
        bad("CL list", format!("{post}Content-Length: 5, 5\r\n\r\nhello")),
        bad("CL empty", format!("{post}Content-Length:\r\n\r\n")),
        bad(
            "CL overflow u64",
            format!("{post}Content-Length: 18446744073709551616\r\n\r\nhello"),
        ),
        ok(
            "CL with OWS around the value",
            format!("{post}Content-Length: \t5 \r\n\r\nhello"),
            |v| echo_is(v, "POST", "/echo", "hello"),
        ),
        bad(
            "TE gzip, chunked",
            format!("{post}Transfer-Encoding: gzip, chunked\r\n\r\n{chunked_body}"),
        ),
        bad(
            "TE chunked, chunked",
            format!("{post}Transfer-Encoding: chunked, chunked\r\n\r\n{chunked_body}"),
        ),
        bad(
            "TE chunked on two lines",
            format!(
                "{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}"
            ),
        ),
        bad(
            "TE identity",
            format!("{post}Transfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        bad(
            "TE xchunked",
            format!("{post}Transfer-Encoding: xchunked\r\n\r\n{chunked_body}"),
        ),
        bad(
            "TE chunked with parameter",
            format!("{post}Transfer-Encoding: chunked;q=1\r\n\r\n{chunked_body}"),
        ),
        bad(
            "TE obs-folded",
            format!("{post}Transfer-Encoding:\r\n chunked\r\n\r\n{chunked_body}"),
        ),
        bad(
            "TE name with space before colon",
            format!("{post}Transfer-Encoding : chunked\r\n\r\n{chunked_body}"),
        ),
        ok(
            "TE Chunked (case-insensitive)",
            format!("{post}Transfer-Encoding: Chunked\r\n\r\n{chunked_body}"),
            chunked_hello,
        ),
        bad(
            "TE chunked in HTTP/1.0",
            format!(
                "POST /echo HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}"
            ),
        ),
        // --- chunked body ---
        bad(
            "chunk size not hex",
            format!("{post}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        ),
        bad(
            "chunk size 0x prefix",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
        ),
        bad(
            "chunk size with leading space",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n"),
        ),
        bad(
            "chunk size overflow (17 hex digits)",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"),
        ),
        bad(
            "chunk size line ends in bare LF",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
        ),
        bad(
            "chunk data not followed by CRLF",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"),
        ),
        bad(
            "chunk data longer than its size",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"),
        ),
        ok(
            "chunk extensions",
            format!(
                "{post}Transfer-Encoding: chunked\r\n\r\n5;name=\"v\";x\r\nhello\r\n0;last\r\n\r\n"
            ),
            chunked_hello,
        ),
        ok(
            "trailers are accepted and dropped",
            format!(
                "{post}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: evil\r\nContent-Length: 99\r\n\r\n"
            ),
            |v| {
                chunked_hello(v);
                assert_eq!(seen(v, "x-trailer"), None, "{v}");
            },
        ),
        err(
            "chunked body over the cap",
            format!(
                "{post}Transfer-Encoding: chunked\r\n\r\n258\r\n{a}\r\n258\r\n{a}\r\n0\r\n\r\n",
                a = "a".repeat(0x258)
            ),
            413,
            "payload_too_large",
        ),
        err(
            "declared chunk size past the cap: refused at the size line, data never sent",
            format!("{post}Transfer-Encoding: chunked\r\n\r\nfffff\r\n"),
            413,
            "payload_too_large",
        ),
        // --- head syntax ---
        bad("space before colon", format!("{post}Content-Length : 5\r\n\r\nhello")),
        bad(
            "obs-fold continuation line",
            head("GET /echo HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  continued"),
        ),
        bad("NUL in header value", head("GET /echo HTTP/1.1\r\nHost: a\r\nX-A: a\0b")),
        bad("CR in header value", head("GET /echo HTTP/1.1\r\nHost: a\r\nX-A: a\rb")),
        bad(
            "non-token char in header name",
            head("GET /echo HTTP/1.1\r\nHost: a\r\nX@A: 1"),
        ),
        bad("header line without colon", head("GET /echo HTTP/1.1\r\nHost: a\r\nX-A")),
        // Refused at once (nginx accepts bare LF; a quick 400 is the strict choice), not left
        // waiting for a CRLFCRLF that never comes until the head timeout.
        bad(
            "bare LF line endings throughout",
            "GET /echo HTTP/1.1\nHost: a\n\n",
        ),
        bad(
            "incomplete head with a bare LF: refused before it ends",
            "GET /echo HTTP/1.1\r\nHost: a\r\nX-A: 1\n",
        ),
        bad(
            "bare LF blank line inside a CRLF head",
            format!("{post}\nContent-Length: 5\r\n\r\nhello"),
        ),
        bad(
            "bare LF after the request line of a CRLF head",
            "GET /echo HTTP/1.1\nHost: a\r\n\r\n",
        ),
        bad("HTTP/2.0 request line", head("GET /echo HTTP/2.0\r\nHost: a")),
        bad("HTTP/0.9 request line", "GET /echo\r\n\r\n"),
        bad("invalid method", head("GE(T /echo HTTP/1.1\r\nHost: a")),
        bad("double space in request line", head("GET  /echo HTTP/1.1\r\nHost: a")),
        bad("missing Host in HTTP/1.1", head("GET /echo HTTP/1.1\r\nX-A: 1")),
        bad("two Hosts", head("GET /echo HTTP/1.1\r\nHost: a\r\nHost: b")),
        Row {
            closed: true,
            ..ok(
                "HTTP/1.0 without Host",
                head("GET /echo HTTP/1.0\r\nX-A: 1"),
                |v| {
                    echo_is(v, "GET", "/echo", "");
                    assert_eq!(seen(v, "x-a").as_deref(), Some("1"), "{v}");
                },
            )
        },
        ok(
            "absolute-form target",
            head("GET http://example.com/echo?x=1 HTTP/1.1\r\nHost: example.com"),
            |v| {
                echo_is(v, "GET", "/echo?x=1", "");
                assert_ne!(seen(v, "host").as_deref(), Some("example.com"), "{v}");
            },
        ),
        bad("asterisk-form target", head("OPTIONS * HTTP/1.1\r\nHost: a")),
        bad("authority-form GET", head("GET example.com:80 HTTP/1.1\r\nHost: a")),
        bad("CONNECT", head("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443")),
        ok(
            "empty lines before the request line",
            head("\r\n\r\nGET /echo HTTP/1.1\r\nHost: a"),
            |v| echo_is(v, "GET", "/echo", ""),
        ),
        // --- size limits ---
        err(
            "head over 64 KiB",
            head(&format!("GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: {}", "a".repeat(70_000))),
            431,
            "request_header_fields_too_large",
        ),
        ok("96 header fields", many(96), |v| {
            assert_eq!(seen(v, "x-h95").as_deref(), Some("95"), "{v}")
        }),
        err(
            "97 header fields",
            many(97),
            431,
            "request_header_fields_too_large",
        ),
        err(
            "CL over the cap (head only)",
            format!("{post}Content-Length: {}\r\n\r\n", BODY_CAP + 1),
            413,
            "payload_too_large",
        ),
        err(
            "CL over the cap with Expect: 100-continue",
            format!(
                "{post}Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                BODY_CAP + 1
            ),
            413,
            "payload_too_large",
        ),
        ok(
            "CL exactly at the cap",
            format!("{post}Content-Length: {BODY_CAP}\r\n\r\n{}", "b".repeat(BODY_CAP)),
            |v| assert_eq!(v["body_len"], BODY_CAP, "{v}"),
        ),
        // --- smuggling ---
        ok(
            "CL body that holds a second request",
            format!(
                "{post}Content-Length: 40\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
            ),
            |v| {
                echo_is(
                    v,
                    "POST",
                    "/echo",
                    "GET /echo/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
                )
            },
        ),
        ok(
            "chunked body that holds a second request",
            format!(
                "{post}Transfer-Encoding: chunked\r\n\r\n28\r\nGET /echo/smuggled HTTP/1.1\r\nHost: a\r\n\r\n\r\n0\r\n\r\n"
            ),
            |v| {
                echo_is(
                    v,
                    "POST",
                    "/echo",
                    "GET /echo/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
                )
            },
        ),
        // --- Expect ---
        err(
            "Expect other than 100-continue",
            format!("{post}Expect: 200-ok\r\nContent-Length: 5\r\n\r\nhello"),
            417,
            "expectation_failed",
        ),
        ok(
            "Expect: 100-continue with the body already sent",
            format!("{post}Expect: 100-Continue\r\nContent-Length: 5\r\n\r\nhello"),
            |v| {
                echo_is(v, "POST", "/echo", "hello");
                assert_eq!(seen(v, "expect"), None, "{v}");
            },
        ),
        // --- the client leaves ---
        Row {
            name: "partial head then EOF",
            raw: b"GET /echo HTTP/1.1\r\nHost: a\r\n".to_vec(),
            eof: true,
            want: Want::Silent,
            closed: true,
            upstream: 0,
        },
        Row {
            name: "partial CL body then EOF",
            raw: format!("{post}Content-Length: 10\r\n\r\nhello").into_bytes(),
            eof: true,
            want: Want::Silent,
            closed: true,
            upstream: 0,
        },
    ]
}

fn run_row(mock: &Mock, proxy: &Proxy, row: &Row) -> Result<(), String> {
    let before = mock.stat("requests");
    let started = Instant::now();
    let mut c = Client::connect(proxy.port);
    // A large head may be cut short by the proxy's answer: that is fine.
    let _ = c.try_send(&row.raw);
    if row.eof {
        c.shutdown_write();
    }
    let name = row.name;
    match row.want {
        Want::Silent => {
            let (bytes, closed) = c.read_raw(Duration::from_secs(3));
            if !bytes.is_empty() {
                return Err(format!(
                    "expected no response, got {:?}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            if !closed {
                return Err("connection not closed".into());
            }
        }
        Want::Error(status, code) => {
            let r = c
                .read_response("POST")
                .ok_or_else(|| "no response".to_string())?;
            let res = std::panic::catch_unwind(|| assert_error_shape(&r, status, code, name));
            res.map_err(|e| panic_text(&e))?;
            if status == 408 && started.elapsed() > Duration::from_secs(3) {
                return Err(format!("408 took {:?}", started.elapsed()));
            }
            let (rest, closed) = c.read_raw(Duration::from_millis(500));
            if !rest.is_empty() {
                return Err(format!(
                    "bytes after the error reply: {:?}",
                    String::from_utf8_lossy(&rest)
                ));
            }
            if !(closed || r.closed) {
                return Err("connection not closed after the error".into());
            }
        }
        Want::Echo(check) => {
            let r = c
                .read_response("POST")
                .ok_or_else(|| "no response".to_string())?;
            if r.status != 200 {
                return Err(format!("status {} body {}", r.status, r.text()));
            }
            let v = r.json();
            std::panic::catch_unwind(|| check(&v)).map_err(|e| panic_text(&e))?;
            let closed = r.closed || c.is_closed(Duration::from_millis(100));
            if closed != row.closed {
                return Err(format!("closed: {closed}, expected {}", row.closed));
            }
        }
    }
    // Whatever a smuggled request would have caused has happened by now.
    std::thread::sleep(Duration::from_millis(30));
    let got = mock.stat("requests") - before;
    if got != row.upstream {
        return Err(format!(
            "upstream received {got} requests, expected {}",
            row.upstream
        ));
    }
    Ok(())
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

#[test]
fn regression_table() {
    let (mock, proxy) = start();
    let rows = rows();
    assert!(rows.len() >= 20);
    let mut failures = Vec::new();
    for row in &rows {
        if let Err(e) = run_row(&mock, &proxy, row) {
            failures.push(format!("{}: {e}", row.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n  {}",
        failures.len(),
        rows.len(),
        failures.join("\n  ")
    );
    // Nothing the proxy forwarded was malformed in the mock's eyes.
    assert_eq!(mock.stat("bad_requests"), 0);
}

#[test]
fn expect_100_continue_flow() {
    let (mock, proxy) = start();
    let before = mock.stat("requests");
    let mut c = Client::connect(proxy.port);
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    let interim = c.read_response("POST").expect("100 Continue");
    assert_eq!(interim.status, 100);
    assert_eq!(
        mock.stat("requests"),
        before,
        "nothing reached the upstream before the body"
    );
    c.send(b"hello");
    let r = c.read_response("POST").expect("final response");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    echo_is(&v, "POST", "/echo", "hello");
    assert_eq!(seen(&v, "expect"), None, "Expect is hop-by-hop here: {v}");
    assert_eq!(mock.stat("requests"), before + 1);
    assert!(!c.is_closed(Duration::from_millis(100)));

    // HTTP/1.0 clients never get a 100 (RFC 9110 §10.1.1): the proxy just waits for the body.
    let mut c = Client::connect(proxy.port);
    c.send(b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    let (early, _) = c.read_raw(Duration::from_millis(200));
    assert!(early.is_empty(), "{:?}", String::from_utf8_lossy(&early));
    c.send(b"hello");
    let r = c.read_response("POST").expect("final response");
    assert_eq!(r.status, 200, "{}", r.text());
    echo_is(&r.json(), "POST", "/echo", "hello");
}

/// After a refused request the connection is closed, so nothing that follows it in the same
/// stream (or later) can reach the upstream as a request.
#[test]
fn no_desync_after_rejection() {
    let (mock, proxy) = start();
    let follow = "GET /echo/smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let cases: Vec<(&str, String, u16, u64)> = vec![
        (
            "CL+TE then a pipelined request",
            format!(
                "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{follow}"
            ),
            400,
            0,
        ),
        (
            "CL over the cap whose body is a request",
            format!(
                "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n{follow}{follow}"
            ),
            413,
            0,
        ),
        (
            "417 whose body is a request",
            format!(
                "POST /echo HTTP/1.1\r\nHost: a\r\nExpect: nope\r\nContent-Length: {}\r\n\r\n{follow}",
                follow.len()
            ),
            417,
            0,
        ),
        (
            "bad chunk, then a request",
            format!(
                "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n{follow}"
            ),
            400,
            0,
        ),
        (
            "accepted request, then a malformed one, then a valid one",
            format!(
                "GET /echo HTTP/1.1\r\nHost: a\r\n\r\nGET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n{follow}"
            ),
            400,
            1,
        ),
    ];
    for (name, raw, status, upstream) in cases {
        let before = mock.stat("requests");
        let mut c = Client::connect(proxy.port);
        let _ = c.try_send(raw.as_bytes());
        let mut r = c
            .read_response("POST")
            .unwrap_or_else(|| panic!("{name}: no response"));
        if upstream == 1 {
            assert_eq!(r.status, 200, "{name}: first response");
            r = c
                .read_response("POST")
                .unwrap_or_else(|| panic!("{name}: no second response"));
        }
        let code = match status {
            400 => "bad_request",
            413 => "payload_too_large",
            _ => "expectation_failed",
        };
        assert_error_shape(&r, status, code, name);
        // Whatever else the client sends now goes nowhere.
        let _ = c.try_send(follow.as_bytes());
        let (rest, closed) = c.read_raw(Duration::from_millis(500));
        assert!(
            rest.is_empty(),
            "{name}: more bytes after the error: {:?}",
            String::from_utf8_lossy(&rest)
        );
        assert!(closed || r.closed, "{name}: connection left open");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            mock.stat("requests") - before,
            upstream,
            "{name}: requests seen upstream"
        );
    }
    assert_eq!(mock.stat("bad_requests"), 0);
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const SEEDS: &[&[u8]] = &[
    b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://h/echo?q=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\nPOST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
];

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"0",
    b"ffffffffffffffff",
    b"-1",
    b"\r\n\r\n",
    b"\r\n ",
    b"\xff",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Host: b\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"0\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n",
];

fn mutate(rng: &mut Rng) -> Vec<u8> {
    let mut b = rng.pick(SEEDS).to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(6) {
            0 if at < b.len() => b[at] = rng.next() as u8,
            1 if at < b.len() => {
                b.remove(at);
            }
            2 => {
                let t = rng.pick(TOKENS);
                b.splice(at..at, t.iter().copied());
            }
            3 => b.truncate(at),
            4 if at < b.len() => {
                // Duplicate a stretch (often a whole header line).
                let end = (at + 1 + rng.below(40)).min(b.len());
                let dup = b[at..end].to_vec();
                b.splice(end..end, dup);
            }
            _ => {
                let n = rng.below(8);
                for _ in 0..n {
                    let x = rng.next() as u8;
                    b.insert(at.min(b.len()), x);
                }
            }
        }
    }
    b
}

/// Statuses the proxy may answer to garbage: its own errors, or whatever the mock said.
const ALLOWED: &[u16] = &[100, 200, 400, 404, 405, 408, 413, 417, 431];

#[test]
fn random_requests_never_crash_the_proxy() {
    let (mock, mut proxy) = start();
    let cases: Vec<Vec<u8>> = {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        (0..400).map(|_| mutate(&mut rng)).collect()
    };
    let port = proxy.port;
    let threads = 8;
    let chunks: Vec<Vec<(usize, Vec<u8>)>> = (0..threads)
        .map(|t| {
            cases
                .iter()
                .enumerate()
                .filter(|(i, _)| i % threads == t)
                .map(|(i, c)| (i, c.clone()))
                .collect()
        })
        .collect();
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            std::thread::spawn(move || {
                let mut bad = Vec::new();
                let mut statuses = Vec::new();
                for (i, raw) in chunk {
                    let mut c = Client::connect(port);
                    let _ = c.try_send(&raw);
                    // A complete request is answered at once; an incomplete one is cut short by
                    // our EOF instead of the 1 s head timeout.
                    c.set_read_timeout(Duration::from_millis(150));
                    let r = c.read_response("GET");
                    statuses.push(r.as_ref().map_or(0, |r| r.status));
                    if let Some(r) = r {
                        if !ALLOWED.contains(&r.status) {
                            bad.push(format!("case {i}: status {} for {:?}", r.status, raw));
                        }
                    }
                    c.shutdown_write();
                    c.set_read_timeout(Duration::from_secs(5));
                    let (_, closed) = c.read_raw(Duration::from_secs(5));
                    if !closed {
                        bad.push(format!("case {i}: not closed after EOF: {:?}", raw));
                    }
                }
                (bad, statuses)
            })
        })
        .collect();
    let mut bad = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for h in handles {
        let (b, s) = h.join().expect("fuzz thread");
        bad.extend(b);
        for s in s {
            *statuses.entry(s).or_default() += 1;
        }
    }
    eprintln!("fuzz first-response statuses (0 = none): {statuses:?}");
    // The corpus exercises both sides: requests relayed and requests refused.
    let count = |s: u16| statuses.get(&s).copied().unwrap_or(0);
    assert!(count(200) >= 20, "too few accepted: {statuses:?}");
    assert!(count(400) >= 50, "too few refused: {statuses:?}");
    assert!(
        proxy.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "llmproxyd died: {}",
        proxy.log_text()
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    let r = proxy.get("/echo");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        mock.stat("bad_requests"),
        0,
        "the proxy forwarded something the upstream could not parse"
    );
    assert!(
        !proxy.log_text().contains("panicked"),
        "{}",
        proxy.log_text()
    );
}
