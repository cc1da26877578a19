//! TLS on both sides and outbound proxies, end to end: the real llmproxyd and llmproxy-mock
//! binaries on loopback, certificates made at test time, a forward-proxy test double.

mod common;

use std::time::{Duration, Instant};

use common::forward_proxy::{ForwardProxy, Policy};
use common::tls::Pki;
use common::*;

const CHAT: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM: &[u8] =
    br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// Upstream YAML lines trusting `pki`'s CA.
fn trust(pki: &Pki) -> String {
    format!("    tls:\n      ca_file: {}", pki.ca_file)
}

/// Forward YAML lines serving HTTPS with `pki`'s certificate.
fn serve_tls(pki: &Pki) -> String {
    format!(
        "      tls:\n        cert_file: {}\n        key_file: {}",
        pki.cert_file, pki.key_file
    )
}

fn https_url(mock: &Mock, base: &str) -> String {
    format!("https://127.0.0.1:{}{base}", mock.port())
}

/// A TLS mock behind a proxy that serves HTTPS and trusts the mock's CA.
fn tls_both_sides() -> (Pki, Mock, Proxy) {
    let pki = Pki::new("test CA");
    let mock = Mock::start_tls(&[], &pki);
    let proxy = Proxy::start(
        &config_with_url(&https_url(&mock, ""), &serve_tls(&pki), &trust(&pki), ""),
        &[],
    );
    (pki, mock, proxy)
}

fn chat(c: &mut Client) -> Response {
    c.request(
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        CHAT,
    )
}

/// A streamed chat request with extra header lines (`name: value\r\n` each).
fn stream_request(extra: &str) -> Vec<u8> {
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n",
        CHAT_STREAM.len()
    )
    .into_bytes();
    req.extend_from_slice(CHAT_STREAM);
    req
}

fn assert_error(r: &Response, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{}", r.text());
    v["error"]["message"].as_str().unwrap().to_string()
}

#[test]
fn https_upstream_serves_json_and_keeps_one_pooled_tls_connection() {
    let pki = Pki::new("test CA");
    let mock = Mock::start_tls(&[], &pki);
    // One shard: one pool.
    let proxy = Proxy::start(
        &config_with_url(&https_url(&mock, ""), "", &trust(&pki), ""),
        &["--shards", "1"],
    );
    // Sequential requests, each on a new client connection: one upstream TLS connection.
    for _ in 0..3 {
        let r = chat(&mut Client::connect(proxy.port));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["object"], "chat.completion");
    }
    let stats = mock.stats();
    assert_eq!(stats["requests"], 3);
    assert_eq!(
        stats["connections_accepted"], 2,
        "one pooled connection from the proxy, plus this stats query"
    );
}

#[test]
fn https_listener_to_https_upstream() {
    let (pki, _mock, proxy) = tls_both_sides();
    let mut c = Client::connect_tls(proxy.port, pki.client_config());
    let r = c.request("GET", "/echo/x?q=1", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.alpn().as_deref(), Some(&b"http/1.1"[..]));
    let v = r.json();
    assert_eq!(v["path"], "/echo/x?q=1");
    assert_eq!(echoed_header(&v, "x-forwarded-proto"), Some("https"));
    // Keep-alive on the TLS client connection, also when the next request comes after the
    // proxy stopped watching the client (its parked read was cancelled) and after an idle
    // wait between requests.
    for pause in [0, 300, 300] {
        std::thread::sleep(Duration::from_millis(pause));
        let r = chat(&mut c);
        assert_eq!(r.status, 200, "after {pause} ms: {}", r.text());
    }
    // After an idle wait (which reads into a small buffer), a head far larger than that buffer.
    std::thread::sleep(Duration::from_millis(100));
    let big = "v".repeat(20_000);
    let r = c.request("GET", "/echo/big", &[("x-big", &big)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        echoed_header(&r.json(), "x-big").map(str::len),
        Some(20_000),
        "the whole header reached the upstream"
    );
    // A plain-HTTP request to the TLS port gets no answer, and the listener keeps serving.
    let mut plain = Client::connect(proxy.port);
    plain.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(plain.read_response("GET").is_none());
    let r = chat(&mut Client::connect_tls(proxy.port, pki.client_config()));
    assert_eq!(r.status, 200, "{}", r.text());
    // That failed handshake is counted; a connection closed before its hello (a TCP health
    // check) is not, and neither is a request error.
    drop(Client::connect(proxy.port));
    let line = r#"llmproxy_tls_handshake_errors_total{forward="f",error="tls_handshake_failed"} 1"#;
    let counted = eventually(Duration::from_secs(3), || {
        proxy
            .admin_get("/metrics")
            .text()
            .lines()
            .any(|l| l == line)
    });
    let metrics = proxy.admin_get("/metrics").text();
    assert!(counted, "{metrics}");
    std::thread::sleep(Duration::from_millis(300));
    let metrics = proxy.admin_get("/metrics").text();
    assert!(metrics.lines().any(|l| l == line), "{metrics}");
    assert!(
        !metrics.contains("error=\"tls_handshake_failed\",status"),
        "{metrics}"
    );
    // The proxy's own error replies go out over TLS too (then a lingering close).
    let mut bad = Client::connect_tls(proxy.port, pki.client_config());
    bad.send(b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n");
    let r = bad.read_response("GET").expect("an answer");
    assert_error(&r, 400, "bad_request");
    assert!(bad.is_closed(Duration::from_secs(2)));
}

#[test]
fn sse_over_tls_on_both_sides_arrives_event_by_event() {
    let (pki, _mock, proxy) = tls_both_sides();
    let mut c = Client::connect_tls(proxy.port, pki.client_config());
    let start = Instant::now();
    c.send(&stream_request(
        "x-mock-tokens: 5\r\nx-mock-gap-ms: 200\r\n",
    ));
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut raw = Vec::new();
    let mut arrivals: Vec<Instant> = Vec::new();
    let mut tmp = [0u8; 65536];
    while !raw.ends_with(b"\r\n0\r\n\r\n") {
        let n = c.read_some(&mut tmp).expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&tmp[..n]);
        let events = String::from_utf8_lossy(&raw).matches("data: ").count();
        while arrivals.len() < events {
            arrivals.push(Instant::now());
        }
    }
    assert_eq!(arrivals.len(), 6, "5 tokens and [DONE]");
    assert!(arrivals[0] - start < Duration::from_millis(300));
    for w in arrivals[..5].windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(150) && gap <= Duration::from_millis(450),
            "events arrived {gap:?} apart: batched or delayed"
        );
    }
}

#[test]
fn untrusted_or_misnamed_certificate_answers_502_and_counts_for_the_breaker() {
    let pki = Pki::new("test CA");
    let other = Pki::new("another CA");
    let mock = Mock::start_tls(&[], &pki);
    for (upstream_extra, why) in [
        (String::new(), "default roots"),
        (trust(&other), "another CA"),
    ] {
        let proxy = Proxy::start(
            &config_with_url(&https_url(&mock, ""), "", &upstream_extra, ""),
            &[],
        );
        let r = chat(&mut Client::connect(proxy.port));
        let msg = assert_error(&r, 502, "upstream_tls_error");
        assert!(msg.contains("certificate"), "{why}: {msg}");
        // rustls names the problem; the log carries it.
        assert!(
            eventually(Duration::from_secs(2), || proxy
                .log_text()
                .contains("TLS handshake with the upstream failed")),
            "{why}: {}",
            proxy.log_text()
        );
        assert!(
            proxy.log_text().contains("UnknownIssuer"),
            "{why}: the reason is logged: {}",
            proxy.log_text()
        );
        // Counted as an upstream connect failure (what the breaker is fed).
        assert!(
            eventually(Duration::from_secs(2), || proxy
                .admin_get("/metrics")
                .text()
                .lines()
                .any(|l| l.starts_with("llmproxy_upstream_errors_total")
                    && l.contains("error=\"connect_error\""))),
            "{why}"
        );
    }
    assert_eq!(mock.stat("requests"), 0, "no request reached the upstream");

    // The certificate is trusted but not issued for this address.
    let elsewhere = Mock::start_tls(&["--listen", "127.0.0.2:0"], &pki);
    let proxy = Proxy::start(
        &config_with_url(
            &format!("https://127.0.0.2:{}", elsewhere.port()),
            "",
            &trust(&pki),
            "",
        ),
        &[],
    );
    let r = chat(&mut Client::connect(proxy.port));
    assert_error(&r, 502, "upstream_tls_error");
    assert!(
        eventually(Duration::from_secs(2), || proxy
            .log_text()
            .contains("not valid for name")),
        "{}",
        proxy.log_text()
    );
}

#[test]
fn insecure_skip_verify_accepts_any_certificate_and_warns_at_start() {
    let pki = Pki::new("test CA");
    let mock = Mock::start_tls(&[], &pki);
    let proxy = Proxy::start(
        &config_with_url(
            &https_url(&mock, ""),
            "",
            "    tls:\n      insecure_skip_verify: true",
            "",
        ),
        &[],
    );
    let r = chat(&mut Client::connect(proxy.port));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(proxy.log_text().contains("insecure_skip_verify is true"));
}

#[test]
fn http_upstream_through_a_proxy_gets_absolute_form_with_and_without_credentials() {
    let mock = Mock::start(&[]);
    let url = format!("http://127.0.0.1:{}/v1", mock.port());
    for creds in [None, Some(("user", "s3cr3t-pw"))] {
        let (policy, userinfo) = match creds {
            None => (Policy::Open, String::new()),
            // base64("user:s3cr3t-pw")
            Some((u, p)) => (
                Policy::RequireAuth("Basic dXNlcjpzM2NyM3QtcHc=".into()),
                format!("{u}:{p}@"),
            ),
        };
        let fp = ForwardProxy::start(policy);
        let group = format!(
            "    http_client:\n      proxy:\n        url: http://{userinfo}127.0.0.1:{}",
            fp.port
        );
        let proxy = Proxy::start(&config_with_url(&url, "", "", &group), &["--shards", "1"]);
        let mut c = Client::connect(proxy.port);
        for _ in 0..2 {
            let r = chat(&mut c);
            assert_eq!(r.status, 200, "{creds:?}: {}", r.text());
        }
        let seen = fp.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(
            seen[0].line,
            format!(
                "POST http://127.0.0.1:{}/v1/chat/completions HTTP/1.1",
                mock.port()
            )
        );
        assert_eq!(
            seen[0].auth.as_deref(),
            creds.map(|_| "Basic dXNlcjpzM2NyM3QtcHc=")
        );
        assert_eq!(fp.connections(), 1, "the connection to the proxy is pooled");
        let log = proxy.log_text();
        assert!(!log.contains("s3cr3t-pw") && !log.contains("dXNlcjpzM2NyM3QtcHc"));
    }
}

#[test]
fn https_upstream_through_a_connect_tunnel_with_and_without_credentials() {
    let pki = Pki::new("test CA");
    let mock = Mock::start_tls(&[], &pki);
    for creds in [false, true] {
        let (policy, userinfo) = if creds {
            (
                Policy::RequireAuth("Basic dXNlcjpzM2NyM3QtcHc=".into()),
                "user:s3cr3t-pw@",
            )
        } else {
            (Policy::Open, "")
        };
        let fp = ForwardProxy::start(policy);
        let group = format!(
            "    http_client:\n      proxy:\n        url: http://{userinfo}127.0.0.1:{}",
            fp.port
        );
        let proxy = Proxy::start(
            &config_with_url(&https_url(&mock, "/v1"), "", &trust(&pki), &group),
            &["--shards", "1"],
        );
        for _ in 0..3 {
            let r = chat(&mut Client::connect(proxy.port));
            assert_eq!(r.status, 200, "creds {creds}: {}", r.text());
        }
        let seen = fp.seen();
        assert_eq!(
            seen.len(),
            1,
            "one tunnel carries the three requests: {seen:?}"
        );
        assert_eq!(
            seen[0].line,
            format!("CONNECT 127.0.0.1:{} HTTP/1.1", mock.port())
        );
        assert_eq!(
            seen[0].auth.is_some(),
            creds,
            "Proxy-Authorization only with credentials"
        );
        let log = proxy.log_text();
        assert!(!log.contains("s3cr3t-pw") && !log.contains("dXNlcjpzM2NyM3QtcHc"));
    }
}

#[test]
fn proxy_refusals_answer_502_with_a_clear_message() {
    let pki = Pki::new("test CA");
    let tls_mock = Mock::start_tls(&[], &pki);
    let plain_mock = Mock::start(&[]);
    let group = |port: u16, userinfo: &str| {
        format!("    http_client:\n      proxy:\n        url: http://{userinfo}127.0.0.1:{port}")
    };
    let https = https_url(&tls_mock, "/v1");
    let http = format!("http://127.0.0.1:{}/v1", plain_mock.port());

    let wrong = ForwardProxy::start(Policy::RequireAuth("Basic b3RoZXI6b3RoZXI=".into()));
    let forbidden = ForwardProxy::start(Policy::Refuse(403));
    let failing = ForwardProxy::start(Policy::Refuse(502));
    let nobody = free_port();
    for (url, extra, group, want) in [
        (&https, trust(&pki), group(wrong.port, "user:pw@"), "407"),
        (&http, String::new(), group(wrong.port, "user:pw@"), "407"),
        (&https, trust(&pki), group(wrong.port, ""), "407"),
        (&https, trust(&pki), group(forbidden.port, ""), "403"),
        (
            &https,
            trust(&pki),
            group(failing.port, ""),
            "could not open a tunnel",
        ),
        (
            &https,
            trust(&pki),
            group(nobody, ""),
            "could not connect to the outbound proxy",
        ),
    ] {
        let proxy = Proxy::start(&config_with_url(url, "", &extra, &group), &[]);
        let r = chat(&mut Client::connect(proxy.port));
        let msg = assert_error(&r, 502, "upstream_proxy_error");
        assert!(msg.contains(want), "{url} {group}: {msg}");
        assert!(!proxy.log_text().contains("user:pw"));
    }
    assert_eq!(tls_mock.stat("requests"), 0);
    assert_eq!(plain_mock.stat("requests"), 0);
}

#[test]
fn bad_tls_files_fail_the_config_test_with_their_yaml_paths() {
    let pki = Pki::new("test CA");
    let other = Pki::new("another CA");
    let garbage = pki.write("garbage.pem", "not a certificate\n");
    let yaml = format!(
        "http_server:
  forwards:
    - name: missing
      port: 3000
      upstream_group: g
      tls:
        cert_file: /nonexistent/cert.pem
        key_file: {garbage}
    - name: mismatched
      port: 3001
      upstream_group: g
      tls:
        cert_file: {cert}
        key_file: {other_key}
    - name: incomplete
      port: 3002
      upstream_group: g
      tls:
        cert_file: {cert}
upstreams:
  - name: a
    url: https://127.0.0.1:9443
    tls:
      ca_file: {garbage}
  - name: b
    url: http://127.0.0.1:9080
    tls:
      insecure_skip_verify: true
upstream_groups:
  - name: g
    upstreams:
      - name: a
      - name: b
",
        cert = pki.cert_file,
        other_key = other.key_file,
    );
    let cfg = pki.write("bad.yaml", &yaml);
    let out = std::process::Command::new(PROXY_BIN)
        .args(["-t", "-c", &cfg])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for (path, what) in [
        (
            "http_server.forwards[0].tls.cert_file:",
            "cannot read `/nonexistent/cert.pem`",
        ),
        ("http_server.forwards[0].tls.key_file:", "no private key"),
        ("http_server.forwards[1].tls.key_file:", "does not belong"),
        (
            "http_server.forwards[2].tls.key_file:",
            "missing required key",
        ),
        ("upstreams[0].tls.ca_file:", "BEGIN CERTIFICATE"),
        ("upstreams[1].tls:", "only to https://"),
    ] {
        assert!(
            err.lines().any(|l| l.starts_with(path) && l.contains(what)),
            "expected `{path} … {what}` in:\n{err}"
        );
    }
    assert!(err.contains("has 6 errors"), "{err}");

    // And the good files pass.
    let good = format!(
        "http_server:
  forwards:
    - name: f
      port: 3000
      upstream_group: g
      tls:
        cert_file: {}
        key_file: {}
upstreams:
  - name: a
    url: https://127.0.0.1:9443
    tls:
      ca_file: {}
upstream_groups:
  - name: g
    upstreams:
      - name: a
",
        pki.cert_file, pki.key_file, pki.ca_file
    );
    let cfg = pki.write("good.yaml", &good);
    let out = std::process::Command::new(PROXY_BIN)
        .args(["-t", "-c", &cfg])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_tls_client_that_leaves_is_noticed_while_the_model_thinks() {
    let pki = Pki::new("test CA");
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), &serve_tls(&pki), "", ""), &[]);
    // Leaving with close_notify, and without (a dropped socket): both end the upstream stream.
    for (i, notify) in [true, false].into_iter().enumerate() {
        let mut c = Client::connect_tls(proxy.port, pki.client_config());
        c.send(&stream_request("x-mock-ttft-ms: 5000\r\n"));
        let mut tmp = [0u8; 4096];
        assert!(
            c.read_some(&mut tmp).unwrap() > 0,
            "the head arrives at once"
        );
        std::thread::sleep(Duration::from_millis(100));
        if notify {
            c.shutdown_write();
        }
        drop(c);
        let left = Instant::now();
        assert!(
            eventually(Duration::from_secs(2), || mock
                .stat("streams_aborted_by_client")
                == i as u64 + 1),
            "close_notify {notify}: upstream still waiting after the client left: {}",
            mock.stats()
        );
        assert!(left.elapsed() < Duration::from_millis(1500));
    }
}

#[test]
fn an_https_keep_alive_connection_gets_its_full_idle_time_after_every_request() {
    // `forwards[].timeout.idle: 1` over TLS: each request restarts the second of idle time,
    // also when it arrives after the connection has given its buffers back (the idle wait's
    // small read then already holds the start of the request).
    let pki = Pki::new("test CA");
    let mock = Mock::start(&[]);
    let fwd = format!("{}\n      timeout:\n        idle: 1", serve_tls(&pki));
    let url = format!("http://127.0.0.1:{}", mock.port());
    let proxy = Proxy::start(&config_with_url(&url, &fwd, "", ""), &["--shards", "1"]);
    let mut c = Client::connect_tls(proxy.port, pki.client_config());
    assert_eq!(c.request("GET", "/echo/a", &[], b"").status, 200);
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(600));
        let r = c.request("GET", "/echo/b", &[], b"");
        assert_eq!(r.status, 200, "request {i}");
        assert!(!r.closed);
    }
    let quiet = std::time::Instant::now();
    assert!(
        !c.is_closed(Duration::from_millis(700)),
        "closed before the idle timeout"
    );
    assert!(c.is_closed(Duration::from_secs(3)), "never closed");
    assert!(quiet.elapsed() >= Duration::from_millis(900));
}
