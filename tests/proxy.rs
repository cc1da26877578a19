//! End-to-end behaviour of llmproxyd against the mock upstream: what a client and the upstream
//! see on the wire.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;

/// A config whose upstream base path is `base` (the mock answers `/echo*` at its root).
fn echo_config(mock: &Mock, base: &str, upstream_extra: &str, group_extra: &str) -> String {
    echo_config_with(mock, base, "", upstream_extra, group_extra)
}

/// [`echo_config`] with YAML lines added to the forward too.
fn echo_config_with(
    mock: &Mock,
    base: &str,
    forward_extra: &str,
    upstream_extra: &str,
    group_extra: &str,
) -> String {
    config(mock.port(), forward_extra, upstream_extra, group_extra).replace(
        &format!("url: http://127.0.0.1:{}/v1", mock.port()),
        &format!("url: http://127.0.0.1:{}{base}", mock.port()),
    )
}

fn sse_body(stream: bool) -> Vec<u8> {
    format!(r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#)
        .into_bytes()
}

/// Reads an SSE response as it arrives: (arrival time of each `data:` event, response complete
/// with the last chunk, connection closed).
fn read_events(c: &mut Client, limit: Duration) -> (Vec<(Instant, String)>, bool, bool) {
    c.stream.set_read_timeout(Some(limit)).unwrap();
    let mut raw = Vec::new();
    let mut events = Vec::new();
    let mut seen = 0;
    let mut tmp = [0u8; 65536];
    let (complete, closed) = loop {
        match c.stream.read(&mut tmp) {
            Ok(0) => break (false, true),
            Ok(n) => {
                let now = Instant::now();
                raw.extend_from_slice(&tmp[..n]);
                let text = String::from_utf8_lossy(&raw).into_owned();
                let found: Vec<String> = text
                    .split("data: ")
                    .skip(1)
                    .map(|e| e.split("\n\n").next().unwrap().to_string())
                    .collect();
                for e in &found[seen.min(found.len())..] {
                    if text.contains(&format!("data: {e}\n\n")) {
                        events.push((now, e.clone()));
                    }
                }
                seen = events.len();
                if raw.ends_with(b"\r\n0\r\n\r\n") {
                    break (true, false);
                }
            }
            Err(_) => break (false, false),
        }
    };
    (events, complete, closed)
}

#[test]
fn json_and_sse_answers_flow_through() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &[]);
    let r = request(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        &sse_body(false),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "chat.completion");
    assert!(r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("tok0"));

    let mut c = Client::connect(proxy.port);
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "5")],
        &sse_body(true),
    ));
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.chunked_complete, "stream ended with the last chunk");
    let text = r.text();
    assert_eq!(text.matches("data: {").count(), 5, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

fn post(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut b = req.into_bytes();
    b.extend_from_slice(body);
    b
}

#[test]
fn sse_events_keep_their_pacing() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &[]);
    let mut c = Client::connect(proxy.port);
    let start = Instant::now();
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "5"), ("x-mock-gap-ms", "200")],
        &sse_body(true),
    ));
    let (events, complete, _) = read_events(&mut c, Duration::from_secs(5));
    assert!(complete);
    assert_eq!(events.len(), 6, "5 tokens and [DONE]");
    // The first token is due at once; each later one 200 ms after the previous.
    assert!(events[0].0 - start < Duration::from_millis(150));
    for w in events[..5].windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(
            gap >= Duration::from_millis(150) && gap <= Duration::from_millis(400),
            "events arrived {gap:?} apart: batched or delayed"
        );
    }
}

#[test]
fn path_is_joined_with_the_base_path_once_and_query_kept() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&echo_config(&mock, "/echo/v1", "", ""), &[]);
    for (client, upstream) in [
        (
            "/echo/v1/chat/completions?x=1&y=%20",
            "/echo/v1/chat/completions?x=1&y=%20",
        ),
        ("/chat/completions?x=1", "/echo/v1/chat/completions?x=1"),
        ("/echo/v10", "/echo/v1/echo/v10"),
    ] {
        let r = proxy.get(client);
        assert_eq!(r.status, 200, "{client}: {}", r.text());
        assert_eq!(r.json()["path"], upstream, "client path {client}");
    }
    // Absolute-form targets are served by their path.
    let mut c = Client::connect(proxy.port);
    c.send(b"GET http://elsewhere.example/models HTTP/1.1\r\nhost: elsewhere.example\r\n\r\n");
    let r = c.read_response("GET").unwrap();
    assert_eq!(r.json()["path"], "/echo/v1/models");
}

#[test]
fn headers_are_rewritten_for_the_upstream() {
    let mock = Mock::start(&[]);
    let up = "    auth:
      type: bearer
      token: ${LLMPROXY_TEST_TOKEN}
    headers:
      - {op: insert, key: X-Ins, value: proxy}
      - {op: insert, key: X-New, value: proxy}
      - {op: replace, key: X-Rep, value: proxy}
      - {op: remove, key: X-Del}";
    let group = "    http_client:\n      agent: test-agent/1";
    let yaml = echo_config(&mock, "", up, group);
    std::env::set_var("LLMPROXY_TEST_TOKEN", "s3cret-token");
    let proxy = Proxy::start(&yaml, &[]);
    let mut c = Client::connect(proxy.port);
    c.send(
        b"POST /echo HTTP/1.1\r\nHost: client.example\r\nAuthorization: Bearer client-key\r\n\
Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
Proxy-Authorization: Basic eA==\r\nX-Forwarded-For: 203.0.113.7\r\nUser-Agent: curl/8\r\n\
X-Ins: client\r\nX-Rep: client\r\nX-Del: client\r\nX-Keep: yes\r\nContent-Length: 2\r\n\r\nhi",
    );
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let headers: Vec<(String, String)> = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_ascii_lowercase(),
                h[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let all = |n: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(all("host"), [format!("127.0.0.1:{}", mock.port()).as_str()]);
    assert_eq!(
        all("authorization"),
        ["Bearer s3cret-token"],
        "auth replaces the client's"
    );
    for hop in [
        "connection",
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
    ] {
        assert!(
            all(hop).is_empty(),
            "{hop} must not be forwarded: {headers:?}"
        );
    }
    assert_eq!(all("x-forwarded-for"), ["203.0.113.7, 127.0.0.1"]);
    assert_eq!(all("x-forwarded-proto"), ["http"]);
    assert_eq!(all("user-agent"), ["test-agent/1"]);
    assert_eq!(
        all("x-ins"),
        ["client"],
        "insert keeps a header the client sent"
    );
    assert_eq!(all("x-new"), ["proxy"]);
    assert_eq!(all("x-rep"), ["proxy"]);
    assert!(all("x-del").is_empty());
    assert_eq!(all("x-keep"), ["yes"]);
    assert_eq!(all("content-length"), ["2"]);
    assert_eq!(v["body"], "hi");
    // The secret never reaches the logs.
    drop(c);
    assert!(!proxy.log_text().contains("s3cret-token"));
}

#[test]
fn sequential_requests_reuse_one_upstream_connection() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &["--shards", "1"]);
    let mut c = Client::connect(proxy.port);
    for _ in 0..3 {
        let r = c.request("GET", "/v1/models", &[], b"");
        assert_eq!(r.status, 200);
        assert!(!r.closed);
    }
    // New client connections on the same shard reuse the pooled upstream connection too.
    for _ in 0..3 {
        assert_eq!(proxy.get("/v1/models").status, 200);
    }
    // One stats call: its own connection is the second one the mock accepted.
    let s = mock.stats();
    assert_eq!(s["requests"], 6);
    assert_eq!(s["connections_accepted"], 2, "{s}");
}

#[test]
fn two_shards_both_serve() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &["--shards", "2"]);
    for _ in 0..64 {
        assert_eq!(proxy.get("/v1/models").status, 200);
    }
    let ok = eventually(Duration::from_secs(3), || {
        let s = proxy.admin_get("/status").json();
        let shards = s["shards"].as_array().cloned().unwrap_or_default();
        shards.len() == 2
            && shards
                .iter()
                .all(|x| x["requests"].as_u64().unwrap_or(0) > 0)
            && shards
                .iter()
                .map(|x| x["requests"].as_u64().unwrap())
                .sum::<u64>()
                == 64
    });
    assert!(ok, "{}", proxy.admin_get("/status").text());
    assert!(proxy.log_text().contains("shards=2"));
}

#[test]
fn upstream_cut_mid_stream_cuts_the_client() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &[]);
    let mut c = Client::connect(proxy.port);
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "10"), ("x-mock-cut-after", "3")],
        &sse_body(true),
    ));
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text().matches("data: {").count(),
        3,
        "what arrived arrives"
    );
    assert!(!r.chunked_complete, "never a fake clean end");
    assert!(r.closed);
}

#[test]
fn client_abort_closes_the_upstream_stream() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &[]);
    let mut c = Client::connect(proxy.port);
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "100"), ("x-mock-gap-ms", "100")],
        &sse_body(true),
    ));
    let mut tmp = [0u8; 4096];
    let mut got = Vec::new();
    while got.windows(6).filter(|w| w == b"data: ").count() < 2 {
        let n = c.stream.read(&mut tmp).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&tmp[..n]);
    }
    let left = Instant::now();
    drop(c);
    assert!(
        eventually(Duration::from_secs(1), || mock
            .stat("streams_aborted_by_client")
            == 1),
        "upstream still streaming 1 s after the client left: {}",
        mock.stats()
    );
    assert!(left.elapsed() < Duration::from_millis(1500));
    assert_eq!(mock.stat("streams_completed"), 0);
}

#[test]
fn client_abort_while_waiting_for_the_first_token() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &[]);
    let mut c = Client::connect(proxy.port);
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-ttft-ms", "5000"), ("x-mock-tokens", "3")],
        &sse_body(true),
    ));
    // The head arrives at once; no token for 5 s.
    let mut tmp = [0u8; 4096];
    let _ = c.stream.read(&mut tmp).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    let left = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || mock
            .stat("streams_aborted_by_client")
            == 1),
        "upstream still waiting to stream after the client left: {}",
        mock.stats()
    );
    assert!(left.elapsed() < Duration::from_millis(1500));
}

#[test]
fn unreachable_upstream_is_502_json() {
    let port = free_port();
    let proxy = Proxy::start(&config(port, "", "", ""), &[]);
    let r = proxy.get("/v1/models");
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable");
    assert!(r.json()["error"]["message"].is_string());
    assert_eq!(r.json()["error"]["type"], "server_error");
}

#[test]
fn slow_first_byte_is_504_within_the_timeout() {
    let mock = Mock::start(&[]);
    let group = "    http_client:\n      timeout:\n        request: 1";
    let proxy = Proxy::start(&config(mock.port(), "", "", group), &[]);
    let t = Instant::now();
    let r = request(
        proxy.port,
        "GET",
        "/v1/models",
        &[("x-mock-delay-ms", "5000")],
        b"",
    );
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(3000),
        "{took:?}"
    );
}

#[test]
fn a_slow_live_stream_outlives_the_request_timeout() {
    let mock = Mock::start(&[]);
    // 1 s total for non-streamed answers; the stream lasts ~2 s.
    let group = "    http_client:\n      timeout:\n        request: 1";
    let proxy = Proxy::start(&config(mock.port(), "", "", group), &[]);
    let mut c = Client::connect(proxy.port);
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "10"), ("x-mock-gap-ms", "200")],
        &sse_body(true),
    ));
    let r = c.read_response("POST").unwrap();
    assert!(r.chunked_complete, "stream cut: {}", r.text());
    assert_eq!(r.text().matches("data: {").count(), 10);

    // With `stream: false` the same timeout bounds the whole answer: the stream is cut.
    let group = "    http_client:\n      stream: false\n      timeout:\n        request: 1";
    let proxy = Proxy::start(&config(mock.port(), "", "", group), &[]);
    let mut c = Client::connect(proxy.port);
    let t = Instant::now();
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "10"), ("x-mock-gap-ms", "200")],
        &sse_body(true),
    ));
    let r = c.read_response("POST").unwrap();
    assert!(!r.chunked_complete && r.closed);
    assert!(t.elapsed() < Duration::from_millis(1800));
}

#[test]
fn a_stalled_stream_is_cut_after_the_idle_gap() {
    let mock = Mock::start(&[]);
    let group = "    http_client:\n      timeout:\n        stream_idle: 1";
    let proxy = Proxy::start(&config(mock.port(), "", "", group), &[]);
    let mut c = Client::connect(proxy.port);
    let t = Instant::now();
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "3"), ("x-mock-gap-ms", "3000")],
        &sse_body(true),
    ));
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.text().matches("data: {").count(), 1);
    assert!(!r.chunked_complete && r.closed);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );
}

#[test]
fn request_bodies_stream_in_both_framings() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&echo_config(&mock, "", "", ""), &[]);
    let mut c = Client::connect(proxy.port);
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
    std::thread::sleep(Duration::from_millis(100));
    c.send(b"6;ext=1\r\n world\r\n");
    std::thread::sleep(Duration::from_millis(100));
    c.send(b"0\r\nX-Trailer: t\r\n\r\n");
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body"], "hello world");
    assert_eq!(r.json()["body_len"], 11);

    let big = vec![b'x'; 300_000];
    let r = c.request("POST", "/echo", &[], &big);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 300_000);
}

#[test]
fn every_response_framing_is_relayed() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &[]);
    for framing in ["chunked", "length", "close"] {
        let mut c = Client::connect(proxy.port);
        c.send(&post(
            "/v1/chat/completions",
            &[("x-mock-tokens", "4"), ("x-mock-framing", framing)],
            &sse_body(true),
        ));
        let r = c.read_response("POST").unwrap();
        assert_eq!(r.status, 200, "{framing}");
        assert_eq!(r.text().matches("data: {").count(), 4, "{framing}");
        assert!(r.text().ends_with("data: [DONE]\n\n"), "{framing}");
        match framing {
            "length" => assert!(r.header("content-length").is_some()),
            // A close-delimited upstream body becomes chunked for an HTTP/1.1 client, so the
            // client can tell a complete answer from a cut one and keep its connection.
            _ => assert!(r.chunked_complete, "{framing}"),
        }
        assert!(!r.closed, "{framing}: client connection kept alive");
    }
    // An HTTP/1.0 client gets a close-delimited body.
    let mut c = Client::connect(proxy.port);
    let body = sse_body(true);
    c.send(
        &[
            format!(
                "POST /v1/chat/completions HTTP/1.0\r\ncontent-length: {}\r\nx-mock-tokens: 2\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            &body,
        ]
        .concat(),
    );
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.text().matches("data: {").count(), 2);
    assert!(r.closed);
}

#[test]
fn shutdown_drains_a_live_stream_then_exits_zero() {
    let mock = Mock::start(&[]);
    let mut proxy = Proxy::start(&config(mock.port(), "", "", ""), &[]);
    let mut c = Client::connect(proxy.port);
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "10"), ("x-mock-gap-ms", "100")],
        &sse_body(true),
    ));
    let mut tmp = [0u8; 4096];
    let first = c.stream.read(&mut tmp).unwrap();
    assert!(first > 0);
    proxy.signal(libc::SIGTERM);
    // New connections are refused while the stream finishes.
    assert!(eventually(Duration::from_secs(2), || {
        std::net::TcpStream::connect(("127.0.0.1", proxy.port)).is_err()
    }));
    let mut rest = tmp[..first].to_vec();
    loop {
        match c.stream.read(&mut tmp) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest.extend_from_slice(&tmp[..n]),
        }
    }
    let text = String::from_utf8_lossy(&rest);
    assert_eq!(text.matches("data: {").count(), 10, "{text}");
    assert!(text.ends_with("0\r\n\r\n"), "the stream ended cleanly");
    let st = proxy.wait_exit(Duration::from_secs(5)).expect("exited");
    assert!(st.success(), "{st}");
}

#[test]
fn second_signal_exits_at_once() {
    let mock = Mock::start(&[]);
    let mut proxy = Proxy::start(
        &config(mock.port(), "", "", ""),
        &["--shutdown-timeout", "60"],
    );
    let mut c = Client::connect(proxy.port);
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "100"), ("x-mock-gap-ms", "100")],
        &sse_body(true),
    ));
    let mut tmp = [0u8; 1024];
    let _ = c.stream.read(&mut tmp).unwrap();
    proxy.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        proxy.wait_exit(Duration::from_millis(10)).is_none(),
        "still draining"
    );
    proxy.signal(libc::SIGINT);
    assert!(proxy.wait_exit(Duration::from_secs(2)).is_some());
}

#[test]
fn admin_serves_health_ping_and_metrics() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &[]);
    assert!(eventually(Duration::from_secs(2), || proxy
        .admin_get("/health")
        .status
        == 200));
    assert_eq!(proxy.admin_get("/ping").status, 200);
    assert_eq!(proxy.get("/v1/models").status, 200);
    assert!(eventually(Duration::from_secs(2), || {
        let m = proxy.admin_get("/metrics").text();
        m.contains(
            "llmproxy_http_requests_total{forward=\"f\",method=\"GET\",path=\"/v1/models\"} 1",
        ) && m.contains("llmproxy_upstream_requests_total{group=\"g\",upstream=\"u\"} 1")
    }));
    let m = proxy.admin_get("/metrics").text();
    for family in [
        "llmproxy_http_requests_total",
        "llmproxy_http_request_duration_seconds",
        "llmproxy_http_request_errors_total",
        "llmproxy_upstream_requests_total",
        "llmproxy_upstream_duration_seconds",
        "llmproxy_upstream_errors_total",
    ] {
        assert!(m.contains(&format!("# TYPE {family} ")), "{family} missing");
    }
}

#[test]
fn epoll_driver_serves_too() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), "", "", ""), &["--driver", "epoll"]);
    let mut c = Client::connect(proxy.port);
    c.send(&post(
        "/v1/chat/completions",
        &[("x-mock-tokens", "3"), ("x-mock-gap-ms", "20")],
        &sse_body(true),
    ));
    let r = c.read_response("POST").unwrap();
    assert!(r.chunked_complete);
    assert!(proxy.log_text().contains("driver=\"epoll\""));
}

#[test]
fn a_restarted_upstream_leaves_no_stale_connection_behind() {
    // The mock on epoll: a killed io_uring process closes its sockets only when the kernel
    // tears its ring down later, which is not what a restarting vLLM does.
    let mock = Mock::start_env(&[], &[("MONOIO_FORCE_LEGACY_DRIVER", "1")]);
    let port = mock.port();
    let proxy = Proxy::start(&config(port, "", "", ""), &["--shards", "1"]);
    assert_eq!(proxy.get("/v1/models").status, 200);
    // The upstream restarts: the pooled connection is now closed at the far end.
    drop(mock);
    let listen = format!("127.0.0.1:{port}");
    let mock = Mock::start_env(
        &["--listen", &listen],
        &[("MONOIO_FORCE_LEGACY_DRIVER", "1")],
    );
    // A POST, which is never replayed: it must go out on a fresh connection in the first place.
    let r = request(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        &[],
        &sse_body(false),
    );
    assert_eq!(r.status, 200, "{}\n{}", r.text(), proxy.log_text());
    assert_eq!(mock.stat("requests"), 1);
}

#[test]
fn pooled_connections_idle_out() {
    let mock = Mock::start(&[]);
    let group = "    http_client:\n      timeout:\n        idle: 5";
    let proxy = Proxy::start(&config(mock.port(), "", "", group), &["--shards", "1"]);
    assert_eq!(proxy.get("/v1/models").status, 200);
    assert_eq!(proxy.get("/v1/models").status, 200);
    std::thread::sleep(Duration::from_millis(5300));
    assert_eq!(proxy.get("/v1/models").status, 200);
    let s = mock.stats();
    assert_eq!(s["requests"], 3);
    // Two upstream connections (before and after the idle timeout) and this stats call.
    assert_eq!(s["connections_accepted"], 3, "{s}");
}

/// An HTTP/1.0 client that asks for keep-alive (`ab -k`, old load balancers' health checks) is
/// told so with `Connection: keep-alive`: an HTTP/1.0 client closes after any answer without it.
/// That holds for relayed answers, for the proxy's own kept-alive errors (429) and for the
/// admin listener; a 1.0 client that did not ask, or a body the proxy can only end by closing,
/// gets `Connection: close`.
#[test]
fn http10_keep_alive_is_acknowledged() {
    let mock = Mock::start(&[]);
    let limit = "      ratelimit:\n        per_second: 1\n        burst: 1";
    let proxy = Proxy::start(&config(mock.port(), limit, "", ""), &["--shards", "1"]);
    let mut c = Client::connect(proxy.port);
    // Each answer on the one connection: the status, and keep-alive said.
    let mut kept_alive = |status: u16| {
        c.send(b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let r = c
            .read_response("GET")
            .expect("an answer on the same connection");
        assert_eq!(r.status, status, "{}", r.text());
        let connection = r.header("connection");
        assert_eq!(connection, Some("keep-alive"), "{:?}", r.headers);
    };
    kept_alive(200);
    // The limiter's 429 keeps a bodiless request's connection: the 1.0 client must hear it.
    kept_alive(429);
    std::thread::sleep(Duration::from_millis(1100));
    kept_alive(200);
    assert!(!c.is_closed(Duration::from_millis(100)));
    std::thread::sleep(Duration::from_millis(1100));

    // A 1.0 client that did not ask is closed, and told so.
    let mut c = Client::connect(proxy.port);
    c.send(b"GET /v1/models HTTP/1.0\r\n\r\n");
    let r = c.read_response("GET").expect("answer");
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(r.closed);
    std::thread::sleep(Duration::from_millis(1100));

    // A chunked upstream answer reaches a 1.0 client close-delimited: no keep-alive possible.
    let body = sse_body(true);
    let mut c = Client::connect(proxy.port);
    c.send(
        &[
            format!(
                "POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            &body,
        ]
        .concat(),
    );
    let r = c.read_response("POST").expect("streamed answer");
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(r.closed && r.text().contains("[DONE]"), "{}", r.text());

    // The admin listener too.
    let mut c = Client::connect(proxy.admin);
    for _ in 0..2 {
        c.send(b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let r = c.read_response("GET").expect("admin answer");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("connection"),
            Some("keep-alive"),
            "{:?}",
            r.headers
        );
    }
}

/// An upstream that refuses a request from its head alone answers before reading the body and
/// closes (a 413 for a body too large, a 401, ...). The client gets that answer, as from nginx,
/// instead of a 502 for the body that could not be sent, and both connections are closed (the
/// rest of the body was never read).
#[test]
fn an_upstream_answering_before_the_body_is_relayed() {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let answer = br#"{"error":{"message":"body too large for this model","type":"invalid_request_error","code":"too_large"}}"#;
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut head = Vec::new();
            let mut tmp = [0u8; 4096];
            while find(&head, b"\r\n\r\n").is_none() {
                match c.read(&mut tmp) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&tmp[..n]),
                }
            }
            let _ = c.write_all(
                &[
                    format!(
                        "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        answer.len()
                    )
                    .as_bytes(),
                    answer,
                ]
                .concat(),
            );
            // Closing with the body unread resets the connection under the proxy's writes.
            drop(c);
        }
    });
    let proxy = Proxy::start(
        &config_with_url(&format!("http://127.0.0.1:{port}"), "", "", ""),
        &["--shards", "1"],
    );
    let body_len = 5 << 20;
    let mut c = Client::connect(proxy.port);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: {body_len}\r\n\r\n"
        )
        .as_bytes(),
    );
    let mut w = c.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let piece = vec![b'x'; 64 * 1024];
        for _ in 0..body_len / piece.len() {
            if w.write_all(&piece).is_err() {
                return;
            }
        }
    });
    let t = Instant::now();
    let r = c.read_response("POST").expect("an answer");
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.body, answer.to_vec(), "the upstream's own answer");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    writer.join().unwrap();
    assert!(
        c.is_closed(Duration::from_secs(3)),
        "the client connection is closed"
    );
}

/// `timeout.request` bounds the upstream's part of an exchange: its clock starts once the client
/// has sent the whole request (as Envoy's route timeout does). A client uploading slowly (but
/// with no gap over the forward's `timeout.connect`) is not answered 504 for its own slowness,
/// and nothing it does counts against the upstream; a gap over `timeout.connect` is the
/// client's 408, not an upstream failure either.
#[test]
fn a_slow_upload_does_not_use_up_the_upstream_timeout() {
    use std::io::Write;
    let mock = Mock::start(&[]);
    let forward = "      timeout:\n        connect: 1";
    let group = "    http_client:\n      timeout:\n        request: 2";
    let proxy = Proxy::start(&config(mock.port(), forward, "", group), &["--shards", "1"]);
    let body = sse_body(false);
    let trickle = |extra: &str| {
        let mut c = Client::connect(proxy.port);
        c.send(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n{extra}\r\n",
                body.len()
            )
            .as_bytes(),
        );
        // 5 pieces 0.7 s apart: 2.8 s of upload, more than `request`, no gap over `connect`.
        for piece in body.chunks(body.len().div_ceil(5)) {
            std::thread::sleep(Duration::from_millis(700));
            c.stream.write_all(piece).unwrap();
        }
        let sent = Instant::now();
        (c.read_response("POST").expect("an answer"), sent.elapsed())
    };
    let (r, _) = trickle("");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("chat.completion"), "{}", r.text());

    // The upstream still gets its `request` (2 s) once the body is in, and no more.
    let (r, after_body) = trickle("x-mock-delay-ms: 4000\r\n");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert!(
        after_body >= Duration::from_millis(1800) && after_body < Duration::from_millis(3500),
        "504 came {after_body:?} after the body"
    );

    // A body stalled past `timeout.connect` is the client's 408.
    let mut c = Client::connect(proxy.port);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(&body[..5])
        )
        .as_bytes(),
    );
    let r = c.read_response("POST").expect("an answer");
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "request_timeout");

    // Only the delayed answer counts against the upstream: one timeout, one breaker failure.
    let metrics = || proxy.admin_get("/metrics").text();
    let sample = |text: &str, prefix: &str, tail: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(prefix) && l.contains(tail))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert!(
        eventually(Duration::from_secs(3), || sample(
            &metrics(),
            "llmproxy_circuitbreaker_calls_total{",
            "result=\"success\"}"
        ) == Some(1)),
        "{}",
        metrics()
    );
    let text = metrics();
    let failures = sample(
        &text,
        "llmproxy_circuitbreaker_calls_total{",
        "result=\"failure\"}",
    );
    assert_eq!(failures, Some(1), "{text}");
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("llmproxy_upstream_errors_total{"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("error=\"timeout\"") && errors[0].ends_with(" 1"),
        "{errors:?}"
    );
}

#[test]
fn an_idle_keep_alive_connection_serves_its_next_request_in_pieces_and_large() {
    // After a few ms without a byte a connection gives its buffers back and waits on
    // readiness; what the client sends next, however it is split, must still make a request.
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&echo_config(&mock, "", "", ""), &["--shards", "1"]);
    let mut c = Client::connect(proxy.port);
    assert_eq!(c.request("GET", "/echo/first", &[], b"").status, 200);
    let req = b"GET /echo/idle?x=1 HTTP/1.1\r\nhost: t\r\nx-a: 1\r\n\r\n";
    for split in [1, 5, req.len() - 1] {
        std::thread::sleep(Duration::from_millis(50));
        c.send(&req[..split]);
        std::thread::sleep(Duration::from_millis(50));
        c.send(&req[split..]);
        let r = c.read_response("GET").expect("an answer");
        assert_eq!(r.status, 200, "split at {split}: {}", r.text());
        assert_eq!(r.json()["path"], "/echo/idle?x=1");
        assert!(!r.closed);
    }
    // A head larger than the usual buffer after an idle wait.
    std::thread::sleep(Duration::from_millis(50));
    let big = "v".repeat(20_000);
    let r = c.request("GET", "/echo/big", &[("x-big", &big)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        echoed_header(&r.json(), "x-big").map(str::len),
        Some(20_000)
    );
    // Two pipelined requests after an idle wait: both answered, in order.
    std::thread::sleep(Duration::from_millis(50));
    c.send(b"GET /echo/one HTTP/1.1\r\nhost: t\r\n\r\nGET /echo/two HTTP/1.1\r\nhost: t\r\n\r\n");
    for p in ["/echo/one", "/echo/two"] {
        let r = c.read_response("GET").expect("an answer");
        assert_eq!(r.json()["path"], p);
        assert!(!r.closed);
    }
}

#[test]
fn keep_alive_idle_timeout_closes_an_idle_connection_and_restarts_with_each_request() {
    // `forwards[].timeout.idle: 1`: an idle client connection (its buffers long given back)
    // is closed after about a second of silence, counted from its last answer.
    let mock = Mock::start(&[]);
    let fwd = "      timeout:\n        idle: 1";
    let proxy = Proxy::start(
        &echo_config_with(&mock, "", fwd, "", ""),
        &["--shards", "1"],
    );
    let mut c = Client::connect(proxy.port);
    assert_eq!(c.request("GET", "/echo/a", &[], b"").status, 200);
    // Requests 600 ms apart: each restarts the idle clock, so the connection stays.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(600));
        let r = c.request("GET", "/echo/b", &[], b"");
        assert_eq!(r.status, 200);
        assert!(!r.closed);
    }
    let quiet = std::time::Instant::now();
    assert!(
        !c.is_closed(Duration::from_millis(700)),
        "closed before the idle timeout"
    );
    assert!(c.is_closed(Duration::from_secs(3)), "never closed");
    let waited = quiet.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
}

#[test]
fn host_names_are_resolved_again_while_serving() {
    // `runtime.dns_refresh: 1`: the refresher looks `localhost` up again every second, off the
    // shards; the proxy keeps serving through it. (A name whose addresses change is covered by
    // the unit tests of `upstream::dns`, which inject the resolver.)
    let mock = Mock::start(&[]);
    let yaml = config_with_url(&format!("http://localhost:{}/v1", mock.port()), "", "", "")
        + "runtime:\n  dns_refresh: 1\n";
    let proxy = Proxy::start(&yaml, &["--shards", "2", "--log-level", "debug"]);
    assert_eq!(proxy.get("/v1/models").status, 200);
    let refreshed = eventually(Duration::from_secs(5), || {
        proxy
            .log_text()
            .contains("host names resolved again, unchanged")
    });
    assert!(refreshed, "{}", proxy.log_text());
    for _ in 0..4 {
        assert_eq!(proxy.get("/v1/models").status, 200);
    }
    // With only literal addresses there is nothing to look up: no refresher runs.
    let literal_yaml = config(mock.port(), "", "", "") + "runtime:\n  dns_refresh: 1\n";
    let literal = Proxy::start(&literal_yaml, &["--log-level", "debug"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(literal.get("/v1/models").status, 200);
    assert!(!literal.log_text().contains("resolved again"));
}
