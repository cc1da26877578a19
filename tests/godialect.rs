//! llmproxy-go config files through the real binary: the Go README's examples pass `-t`, a Go
//! file serves traffic against the mock with the Go port's URL rule, and bad Go files fail with
//! Go paths.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn run_t(dir: &TempDir, name: &str, yaml: &str) -> (i32, String) {
    let p = dir.0.join(name);
    std::fs::write(&p, yaml).unwrap();
    let out = Command::new(PROXY_BIN)
        .args(["-t", "-c", &p.display().to_string()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The Go README's "最小可启动配置", verbatim.
const GO_README_MINIMAL: &str = include_str!("data/go-readme-minimal.yaml");

/// The Go README's three section examples, verbatim, in one file (they reference each other).
const GO_README_SECTIONS: &str = include_str!("data/go-readme-sections.yaml");

#[test]
fn the_go_readme_examples_pass_dash_t() {
    let dir = TempDir::new();
    for (name, yaml) in [
        ("minimal.yaml", GO_README_MINIMAL),
        ("sections.yaml", GO_README_SECTIONS),
    ] {
        let (code, text) = run_t(&dir, name, yaml);
        // api.openai.com does not resolve in every sandbox. The file itself must validate:
        // either -t passes, or the only complaint is the name lookup that follows validation.
        if code != 0 {
            assert!(
                text.contains("did not resolve") && !text.contains("configuration"),
                "{name}: exit {code}: {text}"
            );
        } else {
            assert!(text.contains("is valid"), "{name}: {text}");
        }
    }
}

#[test]
fn go_file_errors_carry_go_paths_and_a_mixed_file_is_rejected() {
    let dir = TempDir::new();
    let bad = GO_README_SECTIONS
        .replace(
            "perSecond: 100\n              burst",
            "perSecnd: 100\n              burst",
        )
        .replace("cooldown: 30000", "cooldown: 30");
    let (code, text) = run_t(&dir, "bad.yaml", &bad);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(
            "httpServer.forwards[0].ratelimit.perSecnd: unknown key `perSecnd`; did you mean `perSecond`?"
        ),
        "{text}"
    );
    assert!(
        text.contains("upstreams[0].breaker.cooldown: 30 is out of range 1000–3600000 ms"),
        "{text}"
    );

    let mixed = GO_README_MINIMAL.replace("upstreamGroups:", "upstream_groups:");
    let (code, text) = run_t(&dir, "mixed.yaml", &mixed);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("has 1 error"), "{text}");
    assert!(text.contains("mixes two config dialects"), "{text}");
}

/// The upstream that saw the request: the mock's `/echo` answer.
fn echoed(r: &Response) -> serde_json::Value {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn a_go_config_serves_with_the_go_url_rule() {
    let mock = Mock::start(&[]);
    let m = mock.port();
    let (p2, p3, p4) = (free_port(), free_port(), free_port());
    // Four listeners, one per upstream kind: a URL with a path and a query, one with a path,
    // one without, and a chat completion endpoint.
    let yaml = format!(
        r#"httpServer:
  forwards:
    - name: fixed
      port: {{PORT}}
      address: 127.0.0.1
      defaultGroup: fixed
      timeout:
        idle: 60000
        read: 30000
        write: 30000
    - name: pathonly
      port: {p2}
      address: 127.0.0.1
      defaultGroup: pathonly
    - name: bare
      port: {p3}
      address: 127.0.0.1
      defaultGroup: bare
      ratelimit:
        perSecond: 1
        burst: 2
    - name: chat
      port: {p4}
      address: 127.0.0.1
      defaultGroup: chat
  admin:
    port: {{ADMIN}}
    address: 127.0.0.1
upstreams:
  - name: fixed
    url: "http://127.0.0.1:{m}/echo/fixed?api-version=2024-02-01"
    auth:
      type: bearer
      token: sk-go-test
  - name: pathonly
    url: "http://127.0.0.1:{m}/echo/p"
  - name: bare
    url: "http://127.0.0.1:{m}"
    headers:
      - op: insert
        key: X-Team
        value: ml
  - name: chat
    url: "http://127.0.0.1:{m}/v1/chat/completions"
    breaker:
      cooldown: 1500
upstreamGroups:
  - name: fixed
    upstreams: [{{name: fixed}}]
  - name: pathonly
    upstreams: [{{name: pathonly}}]
  - name: bare
    upstreams: [{{name: bare}}]
  - name: chat
    upstreams: [{{name: chat}}]
    httpClient:
      keepalive: 1500
      connect:
        maxPerHost: 20
      timeout:
        connect: 1500
        request: 60000
"#
    );
    let proxy = Proxy::start(&yaml, &["--shards", "1", "-r", "-j"]);

    // Path and query from the URL, whatever the client asked for.
    let e = echoed(&request(
        proxy.port,
        "GET",
        "/v1/chat/completions?x=1",
        &[("Authorization", "Bearer client-key")],
        b"",
    ));
    assert_eq!(e["path"], "/echo/fixed?api-version=2024-02-01");
    assert_eq!(
        echoed_header(&e, "authorization"),
        Some("Bearer sk-go-test")
    );

    // Path from the URL, the client's query kept.
    let e = echoed(&request(p2, "GET", "/v1/models?limit=3", &[], b""));
    assert_eq!(e["path"], "/echo/p?limit=3");

    // No path in the URL: the client's path and query.
    let e = echoed(&request(p3, "GET", "/echo/abc?q=2", &[], b""));
    assert_eq!(e["path"], "/echo/abc?q=2");
    assert_eq!(echoed_header(&e, "x-team"), Some("ml"));
    // perSecond 1, burst 2: the second request passes, the third is refused.
    assert_eq!(request(p3, "GET", "/echo/b", &[], b"").status, 200);
    let r = request(p3, "GET", "/echo/c", &[], b"");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "rate_limited");

    // A streamed completion through a URL that names the endpoint.
    let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = request(
        p4,
        "POST",
        "/anything",
        &[("Content-Type", "application/json")],
        body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = r.text();
    assert!(
        text.contains("tok0") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );

    // `-j`: JSON log lines, with the dialect and one warning per kind of unapplied key.
    let log = proxy.log_text();
    assert!(
        eventually(Duration::from_secs(2), || proxy
            .log_text()
            .contains("forward listening")),
        "{log}"
    );
    let log = proxy.log_text();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(line.starts_with('{'), "not a JSON log line: {line}");
    }
    assert!(log.contains("llmproxy-go's dialect"), "{log}");
    assert!(
        log.contains("httpServer.forwards[0].timeout.write: accepted, not applied"),
        "{log}"
    );
    assert!(
        log.contains("upstreamGroups[3].httpClient.connect.maxPerHost: accepted, not applied"),
        "{log}"
    );
}
