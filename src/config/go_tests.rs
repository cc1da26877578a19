//! llmproxy-go dialect tests: the Go README's examples and a file with every documented key go
//! in; the validated model (or the exact errors, at Go paths) comes out.

use std::net::SocketAddr;
use std::time::Duration;

use super::tests::{errors, has_error, load};
use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The Go README's "最小可启动配置", verbatim.
const GO_README_MINIMAL: &str = include_str!("../../tests/data/go-readme-minimal.yaml");

/// The Go README's three section examples (HTTP server, upstreams, upstream groups), verbatim
/// and together: they reference each other (`mixgroup`, `openai_primary`).
const GO_README_SECTIONS: &str = include_str!("../../tests/data/go-readme-sections.yaml");

#[test]
fn go_readme_minimal_config_loads_with_go_defaults() {
    let c = load(GO_README_MINIMAL).unwrap();
    assert_eq!(c.dialect, Dialect::GoPort);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let f = &c.forwards[0];
    assert_eq!(f.listen, "0.0.0.0:3000".parse::<SocketAddr>().unwrap());
    assert_eq!(f.default_group, 0);
    // No `ratelimit` block: no limit (the Go port documents the block as optional).
    assert_eq!(f.ratelimit, None);
    // Go's server defaults: read 30 s (→ head timeout), idle 60 s.
    assert_eq!((f.header_timeout, f.idle_timeout), (ms(30_000), ms(60_000)));
    assert_eq!(
        c.admin.listen,
        "0.0.0.0:9000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.admin.header_timeout, ms(30_000));

    let u = &c.upstreams[0];
    assert_eq!(
        (u.scheme, u.host.as_str(), u.port),
        (Scheme::Https, "api.openai.com", 443)
    );
    assert!(u.tls.is_some());
    assert_eq!(
        u.replace_path,
        Some(ReplacePath {
            path: "/v1/chat/completions".into(),
            query: None
        })
    );
    assert!(matches!(&u.auth, Auth::Bearer(t) if t == "YOUR_API_KEY_HERE"));
    // No `breaker` block: no breaker, as the Go port documents.
    assert!(!u.breaker.enabled);
    assert_eq!(u.ratelimit, None);

    let cl = &c.groups[0].client;
    assert_eq!(c.groups[0].strategy, Strategy::RoundRobin);
    assert_eq!(cl.agent, "LLMProxy/1.0");
    assert_eq!(cl.tcp_keepalive, Some(Duration::from_secs(60)));
    assert_eq!(
        (cl.connect_timeout, cl.request_timeout, cl.pool_idle_timeout),
        (ms(10_000), ms(300_000), ms(60_000))
    );
    assert_eq!(cl.pool_max_idle, 10, "idlePerHost default");
    assert!(cl.stream && cl.retry.is_none() && cl.proxy.is_none());
}

#[test]
fn go_readme_section_examples_load_and_land_in_the_model() {
    let c = load(GO_README_SECTIONS).unwrap();
    let f = &c.forwards[0];
    assert_eq!(
        f.ratelimit,
        Some(ForwardRateLimit {
            per_second: 100,
            burst: 200
        })
    );
    assert_eq!((f.header_timeout, f.idle_timeout), (ms(30_000), ms(60_000)));
    let u = &c.upstreams[0];
    assert_eq!(
        u.breaker,
        Breaker {
            enabled: true,
            threshold: 0.5,
            cooldown: ms(30_000),
            max_requests: 3,
            interval: ms(10_000),
            min_requests: 10,
            consecutive_failures: 5,
            count_429: true,
        }
    );
    // `burst` not given: one second's worth.
    assert_eq!(
        u.ratelimit,
        Some(UpstreamRateLimit {
            per_second: 100,
            burst: 100
        })
    );
    assert_eq!(c.groups[0].members[0].weight, 8);
    // `timeout.write` is accepted but not applied: said once, with its path.
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].starts_with("httpServer.forwards[0].timeout.write: accepted, not applied"),
        "{:?}",
        c.warnings
    );
}

/// Every key the Go README documents, with values that are not the defaults and durations that
/// are not whole seconds.
const GO_FULL: &str = r#"
httpServer:
  forwards:
    - name: chat
      port: 3100
      address: 127.0.0.1
      defaultGroup: weighted
      ratelimit:
        perSecond: 10
        burst: 3
      timeout:
        idle: 45500
        read: 12345
        write: 90000
    - name: sticky
      port: 3101
      address: 127.0.0.1
      defaultGroup: sticky
  admin:
    port: 9100
    address: 127.0.0.1
    timeout:
      idle: 70000
      read: 2500
      write: 30000
upstreams:
  - name: a
    url: http://127.0.0.1:8001
    auth:
      type: basic
      username: svc
      password: pw
    headers:
      - op: insert
        key: X-Team
        value: ml
      - op: replace
        key: X-Env
        value: prod
      - op: remove
        key: X-Debug
    breaker:
      threshold: 0.25
      cooldown: 1500
      maxRequests: 7
      interval: 2500
    ratelimit:
      perSecond: 5
      burst: 2
  - name: b
    url: "http://127.0.0.1:8002/openai/deployments/d1/chat/completions?api-version=2024-02-01"
    auth:
      type: none
  - name: c
    url: http://127.0.0.1:8003/
    auth:
      type: bearer
      token: sk-c
upstreamGroups:
  - name: weighted
    upstreams:
      - name: a
        weight: 3
      - name: b
    balance:
      strategy: weighted_roundrobin
    httpClient:
      agent: "LLMProxy/1.0 (team ml)"
      keepalive: 1500
      connect:
        idleTotal: 50
        idlePerHost: 7
        maxPerHost: 20
      timeout:
        connect: 1500
        request: 123456
        idle: 61500
      proxy:
        url: http://user:pass@proxy.internal:3128
  - name: sticky
    upstreams:
      - name: c
        weight: 0
      - name: a
    balance:
      strategy: iphash
    httpClient:
      keepalive: 0
"#;

#[test]
fn a_full_go_config_lands_where_it_should() {
    let c = load(GO_FULL).unwrap();
    assert_eq!(c.dialect, Dialect::GoPort);

    let f = &c.forwards[0];
    assert_eq!(f.listen, "127.0.0.1:3100".parse::<SocketAddr>().unwrap());
    assert_eq!(f.default_group, 0);
    // burst below perSecond is fine in this dialect (as in the Go port).
    assert_eq!(
        f.ratelimit,
        Some(ForwardRateLimit {
            per_second: 10,
            burst: 3
        })
    );
    assert_eq!(f.header_timeout, ms(12_345));
    assert_eq!(f.idle_timeout, ms(45_500));
    assert_eq!(c.forwards[1].default_group, 1);
    assert_eq!(
        c.admin.listen,
        "127.0.0.1:9100".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.admin.header_timeout, ms(2500));

    let a = &c.upstreams[0];
    assert_eq!(a.replace_path, None, "no path: the client's path is kept");
    assert_eq!(a.base_path, "");
    assert!(matches!(&a.auth, Auth::Basic { header_value } if header_value == "Basic c3ZjOnB3"));
    assert_eq!(a.headers.len(), 3);
    assert!(matches!(&a.headers[2], HeaderOp::Remove(n) if n == "x-debug"));
    assert_eq!(
        a.breaker,
        Breaker {
            enabled: true,
            threshold: 0.25,
            cooldown: ms(1500),
            max_requests: 7,
            interval: ms(2500),
            min_requests: 10,
            consecutive_failures: 5,
            count_429: true,
        }
    );
    assert_eq!(
        a.ratelimit,
        Some(UpstreamRateLimit {
            per_second: 5,
            burst: 2
        })
    );
    let b = &c.upstreams[1];
    assert_eq!(
        b.replace_path,
        Some(ReplacePath {
            path: "/openai/deployments/d1/chat/completions".into(),
            query: Some("api-version=2024-02-01".into())
        })
    );
    assert_eq!(b.auth, Auth::None);
    assert_eq!(c.upstreams[2].replace_path, None, "`/` is no path");

    let w = &c.groups[0];
    assert_eq!(w.strategy, Strategy::WeightedRoundRobin);
    assert_eq!(
        w.members
            .iter()
            .map(|m| (m.upstream, m.weight))
            .collect::<Vec<_>>(),
        [(0, 3), (1, 1)]
    );
    let cl = &w.client;
    assert_eq!(cl.agent, "LLMProxy/1.0 (team ml)");
    // TCP keepalive counts whole seconds: 1.5 s rounds up, as Go does.
    assert_eq!(cl.tcp_keepalive, Some(Duration::from_secs(2)));
    assert_eq!(cl.pool_max_idle, 7);
    assert_eq!(cl.connect_timeout, ms(1500));
    assert_eq!(cl.request_timeout, ms(123_456));
    assert_eq!(cl.first_byte_timeout, ms(123_456));
    assert_eq!(cl.pool_idle_timeout, ms(61_500));
    let p = cl.proxy.as_ref().unwrap();
    assert_eq!((p.host.as_str(), p.port), ("proxy.internal", 3128));
    assert!(p.authorization.is_some());

    let s = &c.groups[1];
    assert_eq!(s.strategy, Strategy::IpHash);
    assert_eq!(
        s.members[0].weight, 1,
        "weight 0 is the default, as in the Go port"
    );
    // keepalive 0: off, and upstream connections are not reused.
    assert_eq!((s.client.tcp_keepalive, s.client.pool_max_idle), (None, 0));

    // What is accepted but not applied is said once per kind, with every path.
    let w = c.warnings.join("\n");
    for path in [
        "httpServer.forwards[0].timeout.write",
        "httpServer.admin.timeout.idle",
        "httpServer.admin.timeout.write",
        "upstreamGroups[0].httpClient.connect.idleTotal",
        "upstreamGroups[0].httpClient.connect.maxPerHost",
    ] {
        assert!(w.contains(path), "{path} not warned about:\n{w}");
    }
    assert_eq!(c.warnings.len(), 4, "{w}");
    assert!(
        w.contains("httpServer.admin.timeout.idle, httpServer.admin.timeout.write: "),
        "{w}"
    );
}

#[test]
fn zero_values_mean_the_defaults_as_in_the_go_port() {
    let yaml = GO_README_SECTIONS
        .replace("cooldown: 30000", "cooldown: 0")
        .replace("burst: 200", "burst: 0")
        .replace(
            "idle: 60000\n              read",
            "idle: 0\n              read",
        )
        .replace("write: 30000", "write: 0");
    let c = load(&yaml).unwrap();
    assert_eq!(c.upstreams[0].breaker.cooldown, ms(30_000));
    assert_eq!(c.forwards[0].ratelimit.as_ref().unwrap().burst, 200);
    assert_eq!(c.forwards[0].idle_timeout, ms(60_000));
    assert!(
        c.warnings.is_empty(),
        "write: 0 asks for nothing: {:?}",
        c.warnings
    );
    // The admin port too; a forward's port is required, so 0 is missing.
    let c = load(&GO_README_SECTIONS.replace("port: 9000", "port: 0")).unwrap();
    assert_eq!(c.admin.listen.port(), 9000);
    let errs = errors(&GO_README_SECTIONS.replace("port: 3000", "port: 0"));
    assert_eq!(
        errs,
        [(
            "httpServer.forwards[0].port".to_owned(),
            "missing required key `port` (1–65535)".to_owned()
        )]
    );
}

#[test]
fn go_errors_carry_go_paths_and_camel_case_suggestions() {
    let yaml = GO_FULL
        .replace("perSecond: 10", "perSecnd: 10")
        .replace("defaultGroup: sticky", "defaultgroup: sticky")
        .replace("maxRequests: 7", "max_requests: 7")
        .replace("request: 123456", "request: 300")
        .replace("perSecond: 5", "perSecond: 70000")
        .replace(
            "- name: c\n        weight: 0",
            "- name: cc\n        weight: 0",
        )
        .replace(
            "    httpClient:\n      keepalive: 0",
            "    http_client:\n      keepalive: 0",
        )
        .replace("      port: 3101\n", "")
        .replace("cooldown: 1500", "cooldown: 999")
        .replace("type: none", "type: bearr");
    let errs = errors(&yaml);
    let expect = [
        (
            "httpServer.forwards[0].ratelimit.perSecnd",
            "did you mean `perSecond`?",
        ),
        (
            "httpServer.forwards[1].defaultgroup",
            "did you mean `defaultGroup`?",
        ),
        (
            "httpServer.forwards[1].defaultGroup",
            "missing required key `defaultGroup`",
        ),
        ("httpServer.forwards[1].port", "missing required key `port`"),
        (
            "upstreams[0].breaker.max_requests",
            "did you mean `maxRequests`? (this file uses llmproxy-go's camelCase keys",
        ),
        (
            "upstreams[0].breaker.cooldown",
            "999 is out of range 1000–3600000 ms",
        ),
        (
            "upstreams[0].ratelimit.perSecond",
            "70000 is out of range 1–65535",
        ),
        ("upstreams[1].auth.type", "did you mean `bearer`?"),
        (
            "upstreamGroups[0].httpClient.timeout.request",
            "300 is out of range 1000–86400000 ms; durations are milliseconds here (did you mean 300000?)",
        ),
        (
            "upstreamGroups[1].upstreams[0].name",
            "unknown upstream `cc`; did you mean `c`?",
        ),
        (
            "upstreamGroups[1].http_client",
            "did you mean `httpClient`?",
        ),
    ];
    for (path, needle) in expect {
        assert!(
            has_error(&errs, path, needle),
            "{path}: {needle}\n{errs:#?}"
        );
    }
    assert_eq!(errs.len(), expect.len(), "{errs:#?}");
}

#[test]
fn a_file_mixing_the_two_dialects_is_rejected() {
    for yaml in [
        GO_README_MINIMAL.replace("upstreamGroups:", "upstream_groups:"),
        GO_README_MINIMAL.replace("httpServer:", "http_server:"),
        format!("{GO_README_MINIMAL}upstream_groups: []\n"),
    ] {
        let errs = errors(&yaml);
        assert_eq!(errs.len(), 1, "{errs:?}");
        let (path, msg) = &errs[0];
        assert_eq!(path, "<root>");
        assert!(msg.contains("mixes two config dialects"), "{msg}");
        assert!(msg.contains("`httpServer` + `upstreamGroups`"), "{msg}");
    }
}

#[test]
fn camel_case_keys_in_a_snake_case_file_get_a_dialect_note() {
    let yaml = "http_server:\n  forwards:\n    - {name: f, upstream_group: g, ratelimit: {perSecond: 5}}\nupstreams:\n  - {name: u, url: \"http://127.0.0.1:1\"}\nupstream_groups:\n  - {name: g, upstreams: [u]}\n";
    let errs = errors(yaml);
    assert!(
        has_error(
            &errs,
            "http_server.forwards[0].ratelimit.perSecond",
            "did you mean `per_second`? (this file uses LLMProxy's snake_case keys"
        ),
        "{errs:?}"
    );
}

#[test]
fn go_upstream_urls() {
    let yaml =
        |url: &str| GO_README_MINIMAL.replace("https://api.openai.com/v1/chat/completions", url);
    let c = load(&yaml("http://127.0.0.1:9/x?api-version=1")).unwrap();
    let r = c.upstreams[0].replace_path.clone().unwrap();
    assert_eq!(
        (r.path.as_str(), r.query.as_deref()),
        ("/x", Some("api-version=1"))
    );
    // A query without a path is not sent (the client's path and query are): said at start.
    let c = load(&yaml("http://127.0.0.1:9?api-version=1")).unwrap();
    assert_eq!(c.upstreams[0].replace_path, None);
    assert_eq!(c.warnings.len(), 1);
    assert!(c.warnings[0].starts_with("upstreams[0].url: the URL's query is not sent"));
    let errs = errors(&yaml("http://127.0.0.1:9/x?a=b c"));
    assert!(
        has_error(&errs, "upstreams[0].url", "invalid character"),
        "{errs:?}"
    );
    let errs = errors(&yaml("ftp://127.0.0.1/x"));
    assert!(
        has_error(&errs, "upstreams[0].url", "unsupported URL scheme"),
        "{errs:?}"
    );
    // `auth.type: ""` is `none`, as the Go validator allows.
    let c = load(&GO_README_MINIMAL.replace("type: bearer", "type: \"\"")).unwrap();
    assert_eq!(c.upstreams[0].auth, Auth::None);
}

#[test]
fn replace_path_writes_the_go_request_target() {
    let w = |path: &str, query: Option<&str>, client: &str| {
        let mut out = bytes::BytesMut::new();
        ReplacePath {
            path: path.into(),
            query: query.map(Into::into),
        }
        .write(client, &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    };
    assert_eq!(
        w("/v1/chat/completions", None, "/chat"),
        "/v1/chat/completions"
    );
    assert_eq!(
        w("/v1/chat/completions", None, "/x?stream=1"),
        "/v1/chat/completions?stream=1"
    );
    assert_eq!(
        w("/d/chat", Some("api-version=2"), "/x?stream=1"),
        "/d/chat?api-version=2"
    );
    assert_eq!(w("/d/chat", Some("v=2"), "/x"), "/d/chat?v=2");
}

#[test]
fn every_go_key_is_in_the_readme_mapping_table() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("### LLMProxy Go port compatibility")
        .nth(1)
        .expect("README has the Go port section");
    let missing: Vec<&str> = go::ALL_KEYS
        .iter()
        .flat_map(|k| k.iter().copied())
        .filter(|key| !section.contains(&format!("{key}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "README's Go port table does not mention {missing:?}"
    );
}
