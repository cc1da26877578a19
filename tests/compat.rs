//! LLMProxy YAML that must keep working unchanged, run through the real binary.

mod common;

use common::*;

#[test]
fn llmproxy_regex_route_segments_load_and_route() {
    // LLMProxy's router (radixmap) accepts `{name:regex}`, `{:regex}` and `{regex}` segments.
    let digits = Mock::start(&[]);
    let other = Mock::start(&[]);
    let yaml = format!(
        r#"http_server:
  forwards:
    - name: f
      address: 127.0.0.1
      port: {{PORT}}
      default_group: other
      routing:
        - path: "/v1/models/{{id:[0-9]+}}"
          target_group: digits
        - path: "/v1/models/:name"
          target_group: other
        - path: '/v1/files/{{\d{{2,3}}}}/content'
          target_group: digits
        - path: "/v1/batches/{{:b-[a-z]+}}"
          target_group: digits
  admin:
    address: 127.0.0.1
    port: {{ADMIN}}
upstreams:
  - name: d
    url: http://127.0.0.1:{}/v1
  - name: o
    url: http://127.0.0.1:{}/v1
upstream_groups:
  - name: digits
    upstreams: [{{name: d}}]
  - name: other
    upstreams: [{{name: o}}]
"#,
        digits.port(),
        other.port()
    );
    let proxy = Proxy::start(&yaml, &["--shards", "1"]);
    for (path, to_digits) in [
        ("/v1/models/123", true),
        // Declared after the regex route, but the regex route does not match.
        ("/v1/models/gpt-4o", false),
        ("/v1/models/12a", false),
        ("/v1/files/42/content", true),
        ("/v1/files/4242/content", false),
        ("/v1/files/42/other", false),
        ("/v1/batches/b-abc", true),
        ("/v1/batches/b-ABC", false),
    ] {
        let (d0, o0) = (digits.stat("requests"), other.stat("requests"));
        let r = proxy.get(path);
        assert!(r.status < 500, "{path}: {}", r.status);
        let (d1, o1) = (digits.stat("requests"), other.stat("requests"));
        assert_eq!(
            (d1 - d0, o1 - o0),
            if to_digits { (1, 0) } else { (0, 1) },
            "{path} went to the wrong group"
        );
    }
}

#[test]
fn a_bad_regex_route_is_a_config_error_with_its_path() {
    let dir = TempDir::new();
    let yaml = config(8001, "      routing:\n        - {path: \"/v1/{id:[0-9}\", target_group: g}\n        - {path: \"/v1/x-{id}\", target_group: g}", "", "")
        .replace("{PORT}", "3999")
        .replace("{ADMIN}", "3998");
    let p = dir.0.join("bad.yaml");
    std::fs::write(&p, yaml).unwrap();
    let out = std::process::Command::new(PROXY_BIN)
        .args(["-t", "-c", &p.display().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("http_server.forwards[0].routing[0].path") && err.contains("regex"),
        "{err}"
    );
    assert!(
        err.contains("http_server.forwards[0].routing[1].path") && err.contains("whole segment"),
        "{err}"
    );
}

#[test]
fn a_localhost_upstream_reaches_a_server_listening_on_ipv4_only() {
    // LLMProxy's examples point at `http://localhost:11434` (Ollama) or `:8000` (vLLM), servers
    // that listen on IPv4 only. Where /etc/hosts also maps localhost to ::1, the resolver lists
    // ::1 first; using it made every request a 502.
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = ("localhost", 80).to_socket_addrs().unwrap().collect();
    eprintln!("localhost resolves to {addrs:?} here");
    let mock = Mock::start(&[]); // 127.0.0.1 only
    let proxy = Proxy::start(
        &config_with_url(&format!("http://localhost:{}/v1", mock.port()), "", "", ""),
        &[],
    );
    let r = proxy.get("/v1/models");
    assert_eq!(r.status, 200, "{}", r.text());
}
