//! Failover and retries as a client sees them: a dead member costs nothing, a request that
//! reached an upstream is replayed only when safe, an answer that began is never replayed.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A group `g` of upstreams `a` then `b` (roundrobin unless `group_extra` says otherwise).
fn two_member_config(a_port: u16, b_port: u16, group_extra: &str) -> String {
    group_config(&[("a", a_port, ""), ("b", b_port, "")], group_extra)
}

/// An upstream that reads each request and closes without answering; counts requests.
fn black_hole() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut buf = [0u8; 65536];
            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
            if let Ok(n) = c.read(&mut buf) {
                if n > 0 {
                    s.fetch_add(1, Ordering::SeqCst);
                }
            }
            let _ = c.flush();
        }
    });
    (port, seen)
}

fn chat(stream: bool) -> Vec<u8> {
    format!(r#"{{"model":"m","stream":{stream},"messages":[]}}"#).into_bytes()
}

#[test]
fn a_dead_member_costs_clients_nothing() {
    let live = Mock::start(&[]);
    let dead = free_port();
    let proxy = Proxy::start(
        &two_member_config(dead, live.port(), ""),
        &["--shards", "1"],
    );
    for _ in 0..20 {
        let r = request(
            proxy.port,
            "POST",
            "/v1/chat/completions",
            &[],
            &chat(false),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(live.stat("requests"), 20);
}

#[test]
fn a_post_that_reached_an_upstream_is_not_replayed_without_retry() {
    let (hole, seen) = black_hole();
    let live = Mock::start(&[]);
    let proxy = Proxy::start(
        &two_member_config(hole, live.port(), ""),
        &["--shards", "1"],
    );
    let r = request(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        &[],
        &chat(false),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_bad_response");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    assert_eq!(
        live.stat("requests"),
        0,
        "the POST went to one upstream only"
    );
    // An idempotent GET is safe to send to the next member.
    let r = request(proxy.port, "GET", "/v1/models", &[], b"");
    let r2 = request(proxy.port, "GET", "/v1/models", &[], b"");
    assert_eq!((r.status, r2.status), (200, 200));
}

#[test]
fn with_retry_a_failed_post_goes_to_another_member() {
    let (hole, seen) = black_hole();
    let live = Mock::start(&[]);
    let retry = "    http_client:\n      retry:\n        attempts: 2\n        initial: 100";
    let proxy = Proxy::start(
        &two_member_config(hole, live.port(), retry),
        &["--shards", "1"],
    );
    let r = request(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        &[],
        &chat(false),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    assert_eq!(live.stat("requests"), 1);
}

#[test]
fn a_5xx_is_retried_on_another_member_only_when_retry_is_on() {
    let failing = Mock::start(&["--error-status", "503"]);
    let live = Mock::start(&[]);
    // Without retry the client sees the upstream's 503 as it is.
    let proxy = Proxy::start(
        &two_member_config(failing.port(), live.port(), ""),
        &["--shards", "1"],
    );
    let r = request(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        &[],
        &chat(false),
    );
    assert_eq!(r.status, 503);
    drop(proxy);

    let retry = "    http_client:\n      retry:\n        attempts: 2\n        initial: 100";
    let proxy = Proxy::start(
        &two_member_config(failing.port(), live.port(), retry),
        &["--shards", "1"],
    );
    let t = Instant::now();
    let r = request(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        &[],
        &chat(false),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        t.elapsed() >= Duration::from_millis(50),
        "backoff before the retry"
    );
    assert_eq!(failing.stat("requests"), 2);
    assert_eq!(live.stat("requests"), 1);
    assert!(eventually(Duration::from_secs(2), || proxy
        .admin_get("/metrics")
        .text()
        .contains(
            "llmproxy_upstream_retries_total{group=\"g\",upstream=\"a\"} 1"
        )));
}

/// A chat completion whose injected error (if the mock injects one) carries `Retry-After: secs`.
fn chat_with_retry_after(port: u16, secs: &str) -> Response {
    request(
        port,
        "POST",
        "/v1/chat/completions",
        &[("x-mock-retry-after", secs)],
        &chat(false),
    )
}

const RETRY: &str = "    http_client:\n      retry:\n        attempts: 2\n        initial: 100";

/// `Retry-After` is the sending member's request to be left alone that long: with no other
/// member to take the retry, the proxy waits it out (up to the 30 s backoff cap) and asks the
/// same member again.
#[test]
fn retry_after_is_honoured_for_the_member_that_sent_it() {
    // Every second request is a 429 (the first one, sent directly, succeeds).
    let limited = Mock::start(&["--error-status", "429", "--error-rate", "0.5"]);
    assert_eq!(
        request(limited.port(), "GET", "/v1/models", &[], b"").status,
        200
    );
    let proxy = Proxy::start(
        &group_config(&[("a", limited.port(), "")], RETRY),
        &["--shards", "1"],
    );
    let t = Instant::now();
    let r = chat_with_retry_after(proxy.port, "1");
    assert_eq!(r.status, 200, "{}", r.text());
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(limited.stat("requests"), 3);
}

/// It holds that member only: another member takes the retry after the normal backoff, so the
/// client is not kept waiting for a delay that was never asked of the member serving it.
#[test]
fn retry_after_holds_only_the_member_that_sent_it() {
    let limited = Mock::start(&["--error-status", "429"]);
    let live = Mock::start(&[]);
    let group = format!("    balance:\n      strategy: failover\n{RETRY}");
    let proxy = Proxy::start(
        &two_member_config(limited.port(), live.port(), &group),
        &["--shards", "1"],
    );
    let t = Instant::now();
    let r = chat_with_retry_after(proxy.port, "60");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!((limited.stat("requests"), live.stat("requests")), (1, 1));
}

/// A `Retry-After` beyond the 30 s backoff cap, with no other member free to take the retry:
/// the answer is relayed as it is, `Retry-After` included, for the client to back off itself,
/// instead of holding the client for a minute.
#[test]
fn a_long_retry_after_with_no_other_member_is_relayed() {
    let one = Mock::start(&["--error-status", "429"]);
    let proxy = Proxy::start(
        &group_config(&[("a", one.port(), "")], RETRY),
        &["--shards", "1"],
    );
    let t = Instant::now();
    let r = chat_with_retry_after(proxy.port, "60");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("60"));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(one.stat("requests"), 1);
    drop(proxy);

    // Two members that both ask for a minute: each is asked once, then the second's answer is
    // relayed (the first is still held).
    let a = Mock::start(&["--error-status", "503"]);
    let b = Mock::start(&["--error-status", "429"]);
    let proxy = Proxy::start(
        &two_member_config(a.port(), b.port(), RETRY),
        &["--shards", "1"],
    );
    let t = Instant::now();
    let r = chat_with_retry_after(proxy.port, "60");
    assert!(matches!(r.status, 429 | 503), "{} {}", r.status, r.text());
    assert_eq!(r.header("retry-after"), Some("60"));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!((a.stat("requests"), b.stat("requests")), (1, 1));

    // An absurd delay is just a long one (no clock overflow in the shard).
    let huge = u64::MAX.to_string();
    let r = chat_with_retry_after(proxy.port, &huge);
    assert!(matches!(r.status, 429 | 503), "{} {}", r.status, r.text());
    assert_eq!(r.header("retry-after"), Some(huge.as_str()));
    assert_eq!((a.stat("requests"), b.stat("requests")), (2, 2));
    assert!(
        !proxy.log_text().contains("panicked"),
        "{}",
        proxy.log_text()
    );
}

#[test]
fn an_answer_that_began_is_never_replayed() {
    let cutting = Mock::start(&["--cut-after", "2"]);
    let live = Mock::start(&[]);
    let retry = "    http_client:\n      retry:\n        attempts: 3\n        initial: 100";
    let proxy = Proxy::start(
        &two_member_config(cutting.port(), live.port(), retry),
        &["--shards", "1"],
    );
    let mut c = Client::connect(proxy.port);
    let body = chat(true);
    c.send(
        &[
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\nx-mock-tokens: 10\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            &body,
        ]
        .concat(),
    );
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.chunked_complete && r.closed, "the client sees the cut");
    assert_eq!(r.text().matches("data: {").count(), 2);
    assert_eq!(cutting.stat("requests"), 1);
    assert_eq!(
        live.stat("requests"),
        0,
        "no duplicate POST after the answer began"
    );
}

#[test]
fn in_flight_counts_fall_back_to_zero_however_an_exchange_ends() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    // Every way an exchange can end is played against `a` alone (route `/a/*` → group `only_a`);
    // then `g` (least_requests over a and b) must still split idle picks between them. A count
    // that did not fall back would make every pick avoid `a`. Breakers are off so failures do
    // not take `a` out.
    let yaml = format!(
        "http_server:
  forwards:
    - name: f
      address: 127.0.0.1
      port: {{PORT}}
      upstream_group: g
      routing:
        - {{path: \"/a/*\", target_group: only_a}}
  admin:
    address: 127.0.0.1
    port: {{ADMIN}}
upstreams:
  - name: a
    url: http://127.0.0.1:{}/v1
    breaker: {{enabled: false}}
  - name: b
    url: http://127.0.0.1:{}/v1
    breaker: {{enabled: false}}
upstream_groups:
  - name: g
    upstreams: [{{name: a}}, {{name: b}}]
    balance: {{strategy: least_requests}}
  - name: only_a
    upstreams: [{{name: a}}]
    http_client: {{timeout: {{request: 1}}}}
",
        a.port(),
        b.port()
    );
    let proxy = Proxy::start(&yaml, &["--shards", "1"]);
    let sse = |extra: &str| {
        let body = chat(true);
        [
            format!(
                "POST /a/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n{extra}\r\n",
                body.len()
            )
            .into_bytes(),
            body,
        ]
        .concat()
    };
    let mut endings = Vec::new();
    for i in 0..4 {
        let port = proxy.port;
        let req = sse(match i {
            0 => "x-mock-tokens: 2\r\n",                        // success
            1 => "x-mock-status: 500\r\n",                      // upstream 5xx
            2 => "x-mock-tokens: 50\r\nx-mock-gap-ms: 50\r\n",  // client aborts mid-stream
            _ => "x-mock-tokens: 5\r\nx-mock-cut-after: 1\r\n", // upstream cuts the stream
        });
        endings.push(std::thread::spawn(move || {
            for _ in 0..6 {
                let mut c = Client::connect(port);
                c.send(&req);
                if i == 2 {
                    let mut tmp = [0u8; 512];
                    let _ = c.stream.read(&mut tmp);
                    drop(c);
                } else {
                    let _ = c.read_response("POST");
                }
            }
        }));
    }
    // Timeouts before the head.
    endings.push(std::thread::spawn({
        let port = proxy.port;
        move || {
            for _ in 0..2 {
                let _ = request(
                    port,
                    "GET",
                    "/a/models",
                    &[("x-mock-delay-ms", "3000")],
                    b"",
                );
            }
        }
    }));
    for t in endings {
        t.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.stat("requests") >= 26, "the endings reached a");
    let (a0, b0) = (a.stat("requests"), b.stat("requests"));
    for _ in 0..20 {
        assert_eq!(proxy.get("/v1/models").status, 200);
    }
    let (da, db) = (a.stat("requests") - a0, b.stat("requests") - b0);
    assert_eq!(da + db, 20);
    assert!(
        da > 0 && db > 0,
        "all 20 idle picks went to one member ({da}/{db}): an in-flight count leaked"
    );
}
