//! Loader tests: whole files in, `Config` or the exact list of errors out.

use std::net::SocketAddr;
use std::time::Duration;

use serde_yaml::Value;

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

pub(super) fn load(yaml: &str) -> Result<Config, ConfigErrors> {
    load_str_with_env(yaml, &no_env)
}

pub(super) fn errors(yaml: &str) -> Vec<(String, String)> {
    match load(yaml) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.0.into_iter().map(|e| (e.path, e.message)).collect(),
    }
}

pub(super) fn has_error(errs: &[(String, String)], path: &str, needle: &str) -> bool {
    errs.iter().any(|(p, m)| p == path && m.contains(needle))
}

const MINIMAL: &str = r#"
http_server:
  forwards:
    - name: f
      upstream_group: g
upstreams:
  - name: u
    url: http://127.0.0.1:8001/v1
upstream_groups:
  - name: g
    upstreams:
      - name: u
"#;

/// The README's "Configuration" examples, pasted together.
const README: &str = r#"
http_server:
    # Forwarding service configuration
    forwards:
        - name: "to_mixgroup" # [Required] Unique service identifier
          port: 3000 # [Required] Listening port
          address: "0.0.0.0" # [Optional] Binding address (default: "0.0.0.0")
          upstream_group: "mixgroup" # [Required] Target upstream group
          ratelimit:
              enabled: true # Enable rate limiting (default: false)
              per_second: 100 # Requests/second limit per IP
              burst: 200 # Burst capacity per IP (must be >= per_second)
          timeout:
              connect: 10 # Client connection timeout in seconds

    # Admin interface configuration
    admin:
        port: 9000 # [Required] Admin interface port
        address: "0.0.0.0" # [Optional] Binding address (default: "0.0.0.0")
        timeout:
            connect: 10 # Connection timeout in seconds
upstreams:
    - name: "openai_primary" # [Required] Unique service identifier
      url: "https://api.openai.com/v1" # [Required] Base URL of the API endpoint
      auth:
          type: "bearer" # Authentication type: "bearer", "basic", or "none" (default)
          token: "YOUR_API_KEY" # [Required for bearer auth] API key/token
          # username: "user"           # [Required for basic auth] Username
          # password: "pass"           # [Required for basic auth] Password
      headers:
          - op: "insert" # Operation: "insert", "replace", or "remove"
            key: "X-Custom-Header" # Target HTTP header name
            value: "MyProxyValue" # Header value (for "insert"/"replace" operations)
      breaker: # [Optional] Circuit breaker configuration
          threshold: 0.5 # Failure threshold (0.01-1.0, default: 0.5)
          cooldown: 30 # Recovery period in seconds (1-3600, default: 30)

    - name: "anthropic_primary"
      url: "https://api.anthropic.com"
      auth:
          type: "bearer"
          token: "YOUR_API_KEY"
      headers:
          - op: "insert"
            key: "x-api-key" # Provider-specific header requirements
            value: "YOUR_API_KEY"
upstream_groups:
    - name: "mixgroup" # [Required] Unique group identifier
      upstreams: # [Required] List of upstream service references
          - name: "openai_primary" # Must match a defined upstream service name
            weight: 8 # [Optional] Used only in weighted_roundrobin strategy
          - name: "anthropic_primary"
            weight: 2 # Used only in weighted_roundrobin strategy
      balance:
          strategy:
              "weighted_roundrobin" # Load balancing algorithm:
              # "roundrobin" (default), "weighted_roundrobin",
              # "random", or "response_aware"
      http_client:
          agent: "LLMProxy/1.0" # [Optional] Custom User-Agent (default: "LLMProxy/1.0")
          keepalive: 60 # [Optional] TCP keepalive in seconds (0-600, 0=disabled)
          stream: true # [Optional] Enable streaming support (default: true)
          timeout:
              connect: 10 # Connection timeout in seconds (default: 10)
              request: 300 # Request timeout in seconds (default: 300)
              idle: 60 # Idle connection timeout in seconds (default: 60)
          retry:
              enabled: true # Enable request retries (default: false)
              attempts: 3 # Maximum retry attempts
              initial: 500 # Initial retry delay in milliseconds
          proxy:
              enabled: false # Use outbound proxy (default: false)
              url: "http://user:pass@proxy:8080" # Proxy server URL with optional auth
    - name: "llm_services"
      upstreams:
          # Note: Response time aware strategy does not utilize weight values
          - name: "openai_primary"
          - name: "anthropic_primary"
      balance:
          strategy: "response_aware" # Enable response time aware load balancing
"#;

#[test]
fn readme_example_loads() {
    let c = load(README).unwrap();
    assert_eq!(c.forwards.len(), 1);
    let f = &c.forwards[0];
    assert_eq!(f.listen, "0.0.0.0:3000".parse::<SocketAddr>().unwrap());
    assert_eq!(
        f.ratelimit,
        Some(ForwardRateLimit {
            per_second: 100,
            burst: 200
        })
    );
    assert_eq!(f.default_group, 0);
    let u = &c.upstreams[0];
    assert_eq!(
        (u.scheme, u.host.as_str(), u.port, u.base_path.as_str()),
        (Scheme::Https, "api.openai.com", 443, "/v1")
    );
    assert_eq!(u.host_header, "api.openai.com");
    assert_eq!(u.auth, Auth::Bearer("YOUR_API_KEY".into()));
    assert_eq!(
        u.headers,
        vec![HeaderOp::Insert(
            http::HeaderName::from_static("x-custom-header"),
            http::HeaderValue::from_static("MyProxyValue")
        )]
    );
    assert!(u.breaker.enabled);
    assert_eq!(c.upstreams[1].base_path, "");
    let g = &c.groups[0];
    assert_eq!(g.strategy, Strategy::WeightedRoundRobin);
    assert_eq!(
        g.members,
        vec![
            Member {
                upstream: 0,
                weight: 8
            },
            Member {
                upstream: 1,
                weight: 2
            }
        ]
    );
    let retry = g.client.retry.as_ref().unwrap();
    assert_eq!(
        (retry.attempts, retry.initial),
        (3, Duration::from_millis(500))
    );
    assert_eq!(g.client.proxy, None);
    assert_eq!(g.client.tcp_keepalive, Some(Duration::from_secs(60)));
    assert_eq!(c.groups[1].strategy, Strategy::ResponseAware);
}

#[test]
fn minimal_config_gets_defaults() {
    let c = load(MINIMAL).unwrap();
    let f = &c.forwards[0];
    assert_eq!(f.listen, "0.0.0.0:3000".parse::<SocketAddr>().unwrap());
    assert_eq!(f.header_timeout, Duration::from_secs(10));
    assert_eq!(f.idle_timeout, Duration::from_secs(60));
    assert_eq!((f.max_body_bytes, f.max_head_bytes), (64 << 20, 64 << 10));
    assert_eq!(f.ratelimit, None);
    assert_eq!(
        c.admin.listen,
        "0.0.0.0:9000".parse::<SocketAddr>().unwrap()
    );
    let cl = &c.groups[0].client;
    assert_eq!(cl.agent, "LLMProxy/1.0");
    assert!(cl.stream);
    assert_eq!(cl.first_byte_timeout, Duration::from_secs(300));
    assert_eq!((cl.retry.clone(), cl.proxy.clone()), (None, None));
    assert_eq!(
        c.runtime,
        Runtime {
            shards: 0,
            driver: Driver::Auto,
            tick: Duration::from_millis(50),
            shutdown_timeout: Duration::from_secs(30),
            dns_refresh: Duration::from_secs(30),
        }
    );
    assert_eq!(c.upstreams[0].host_header, "127.0.0.1:8001");
}

#[test]
fn aliases_default_group_and_stream_mode() {
    let yaml = MINIMAL.replace("upstream_group: g", "default_group: g").replace(
        "      - name: u\n",
        "      - name: u\n    http_client:\n      stream_mode: false\n      timeout:\n        request: 60\n",
    );
    let c = load(&yaml).unwrap();
    assert_eq!(c.forwards[0].default_group, 0);
    // LLMProxy's "request < 300 s needs stream_mode" rule is deliberately not carried over.
    assert!(!c.groups[0].client.stream);
    assert_eq!(
        c.groups[0].client.first_byte_timeout,
        Duration::from_secs(60)
    );

    let both_same = MINIMAL.replace(
        "upstream_group: g",
        "upstream_group: g\n      default_group: g",
    );
    assert!(load(&both_same).is_ok());
    let both_differ = MINIMAL.replace(
        "upstream_group: g",
        "upstream_group: g\n      default_group: h",
    );
    let errs = errors(&both_differ);
    assert!(
        has_error(&errs, "http_server.forwards[0].default_group", "disagree"),
        "{errs:?}"
    );

    let stream_differ = MINIMAL.replace(
        "      - name: u\n",
        "      - name: u\n    http_client:\n      stream: true\n      stream_mode: false\n",
    );
    let errs = errors(&stream_differ);
    assert!(
        has_error(
            &errs,
            "upstream_groups[0].http_client.stream_mode",
            "disagree"
        ),
        "{errs:?}"
    );
}

#[test]
fn env_expansion_numbers_bools_and_errors() {
    let yaml = r#"
http_server:
  forwards:
    - name: f
      port: ${PORT}
      address: ${ADDR:-127.0.0.1}
      upstream_group: g
      ratelimit:
        enabled: ${RL_ON:-false}
upstreams:
  - name: u
    url: "https://${HOST}/v1"
    auth:
      type: bearer
      token: "${TOKEN}"
upstream_groups:
  - name: g
    upstreams: [{name: u}]
"#;
    let env = |n: &str| match n {
        "PORT" => Some("8080".to_owned()),
        "HOST" => Some("api.example.com".to_owned()),
        "TOKEN" => Some("sk-secret".to_owned()),
        _ => None,
    };
    let c = load_str_with_env(yaml, &env).unwrap();
    assert_eq!(
        c.forwards[0].listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.forwards[0].ratelimit, None);
    assert_eq!(c.upstreams[0].host, "api.example.com");
    assert_eq!(c.upstreams[0].auth, Auth::Bearer("sk-secret".into()));

    let errs = load_str_with_env(yaml, &|_| None).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"http_server.forwards[0].port"), "{errs:?}");
    assert!(paths.contains(&"upstreams[0].url"), "{errs:?}");
    assert!(paths.contains(&"upstreams[0].auth.token"), "{errs:?}");
    assert!(errs
        .iter()
        .any(|e| e.message.contains("`TOKEN` is not set")));

    // A number where a string is expected, and a numeric string where a number is expected.
    let c = load(&MINIMAL.replace("name: f", "name: 42").replace(
        "upstream_group: g",
        "upstream_group: g\n      port: \"3001\"",
    ))
    .unwrap();
    assert_eq!(c.forwards[0].name, "42");
    assert_eq!(c.forwards[0].listen.port(), 3001);
}

#[test]
fn many_mistakes_reported_at_once() {
    let yaml = r#"
http_server:
  forwards:
    - name: a
      port: 70000
      upstream_group: nope
      ratelimt:
        per_second: 5
      ratelimit:
        per_second: 0
        burst: 50000
      routing:
        - path: v1/x
          target_group: g
        - path: "/v1/{id:[0-9}"
          target_group: missing
        - path: /dup
          target_group: g
        - path: /dup
          target_group: g
    - name: a
      upstream_group: g
  admin:
    port: "abc"
upstreams:
  - name: u
    url: ftp://x
    auth:
      type: bearer
    headers:
      - op: insert
        key: "bad header"
      - op: upsert
        key: x
    breaker:
      threshold: 2
  - name: u
    url: "http://user:pw@host/v1"
  - url: http://ok
upstream_groups:
  - name: g
    upstreams:
      - name: u
      - name: u
      - name: ghost
        weight: 0
    balance:
      strategy: least_conn
    http_client:
      timeout:
        request: 5000
        idle: 1
      retry:
        initial: 50
      proxy:
        enabled: true
  - name: empty
    upstreams: []
runtime:
  driver: iouring
  shards: -1
"#;
    let errs = errors(yaml);
    let expected: &[(&str, &str)] = &[
        (
            "http_server.forwards[0].port",
            "70000 is out of range 1–65535",
        ),
        (
            "http_server.forwards[0].upstream_group",
            "unknown upstream group `nope`",
        ),
        (
            "http_server.forwards[0].ratelimt",
            "did you mean `ratelimit`?",
        ),
        (
            "http_server.forwards[0].ratelimit.per_second",
            "out of range 1–10000",
        ),
        (
            "http_server.forwards[0].ratelimit.burst",
            "out of range 1–20000",
        ),
        (
            "http_server.forwards[0].routing[0].path",
            "must start with `/`",
        ),
        ("http_server.forwards[0].routing[1].path", "invalid regex"),
        (
            "http_server.forwards[0].routing[1].target_group",
            "unknown upstream group `missing`",
        ),
        (
            "http_server.forwards[0].routing[3].path",
            "duplicate path pattern `/dup`",
        ),
        ("http_server.forwards[1].name", "duplicate forward name `a`"),
        ("http_server.admin.port", "expected a non-negative integer"),
        ("upstreams[0].url", "unsupported URL scheme `ftp`"),
        ("upstreams[0].auth.token", "required when type is bearer"),
        (
            "upstreams[0].headers[0].key",
            "not a valid HTTP header name",
        ),
        (
            "upstreams[0].headers[0].value",
            "required for insert and replace",
        ),
        ("upstreams[0].headers[1].op", "unknown value `upsert`"),
        ("upstreams[0].breaker.threshold", "out of range 0.01–1"),
        ("upstreams[1].url", "credentials in an upstream URL"),
        ("upstreams[1].name", "duplicate upstream name `u`"),
        ("upstreams[2].name", "missing required key `name`"),
        ("upstream_groups[0].upstreams[1].name", "listed twice"),
        (
            "upstream_groups[0].upstreams[2].weight",
            "out of range 1–65535",
        ),
        (
            "upstream_groups[0].upstreams[2].name",
            "unknown upstream `ghost`",
        ),
        (
            "upstream_groups[0].balance.strategy",
            "unknown value `least_conn`",
        ),
        (
            "upstream_groups[0].http_client.timeout.request",
            "out of range 1–1200",
        ),
        (
            "upstream_groups[0].http_client.timeout.idle",
            "out of range 5–1800",
        ),
        (
            "upstream_groups[0].http_client.retry.initial",
            "out of range 100–10000",
        ),
        (
            "upstream_groups[0].http_client.proxy.url",
            "required when the proxy is enabled",
        ),
        ("upstream_groups[1].upstreams", "at least one member"),
        ("runtime.driver", "unknown value `iouring`"),
        ("runtime.shards", "expected a non-negative integer"),
    ];
    for (path, needle) in expected {
        assert!(
            has_error(&errs, path, needle),
            "missing {path}: {needle}\nall errors:\n{errs:#?}"
        );
    }
    // The URL check also rejects the query string of the same URL only once: one error per field.
    assert_eq!(
        errs.len(),
        expected.len(),
        "unexpected extra errors:\n{errs:#?}"
    );
}

#[test]
fn missing_top_level_sections() {
    let errs = errors("runtime: {}\n");
    assert!(has_error(&errs, "http_server", "missing required key"));
    assert!(has_error(&errs, "upstreams", "missing required key"));
    assert!(has_error(&errs, "upstream_groups", "missing required key"));
    let errs = errors("");
    assert!(has_error(&errs, "<root>", "empty"));
    let errs = errors("http_server: [1\n");
    assert!(errs[0].0.starts_with("<yaml> line"), "{errs:?}");
    let errs = errors("htp_server: {}\nupstreams: []\nupstream_groups: []\n");
    assert!(
        has_error(&errs, "htp_server", "did you mean `http_server`?"),
        "{errs:?}"
    );
    assert!(
        has_error(&errs, "upstreams", "at least one entry"),
        "{errs:?}"
    );
}

#[test]
fn ranges_and_burst_rule() {
    let with =
        |block: &str| MINIMAL.replace("upstream_group: g", &format!("upstream_group: g\n{block}"));
    let c = load(&with(
        "      ratelimit:\n        per_second: 10000\n        burst: 20000",
    ))
    .unwrap();
    assert_eq!(
        c.forwards[0].ratelimit,
        Some(ForwardRateLimit {
            per_second: 10000,
            burst: 20000
        })
    );
    let errs = errors(&with("      ratelimit:\n        per_second: 300"));
    assert!(
        has_error(
            &errs,
            "http_server.forwards[0].ratelimit.burst",
            "at least per_second"
        ),
        "{errs:?}"
    );
    let errs = errors(&with(
        "      limits:\n        max_head_bytes: 1023\n        max_body_bytes: 4294967297",
    ));
    assert!(has_error(
        &errs,
        "http_server.forwards[0].limits.max_head_bytes",
        "1024–1048576"
    ));
    assert!(has_error(
        &errs,
        "http_server.forwards[0].limits.max_body_bytes",
        "1–4294967296"
    ));
    let errs = errors(&with(
        "      timeout:\n        connect: 0\n        idle: 1.5",
    ));
    assert!(has_error(
        &errs,
        "http_server.forwards[0].timeout.connect",
        "out of range 1–120"
    ));
    assert!(has_error(
        &errs,
        "http_server.forwards[0].timeout.idle",
        "non-negative integer"
    ));
    let c = load(&MINIMAL.replace(
        "      - name: u\n",
        "      - name: u\n    http_client:\n      keepalive: 0\n",
    ))
    .unwrap();
    assert_eq!(c.groups[0].client.tcp_keepalive, None);
}

#[test]
fn listen_conflicts_and_addresses() {
    let yaml = MINIMAL.replace(
        "upstream_group: g\n",
        "upstream_group: g\n      port: 9000\n      address: localhost\n  admin:\n    address: 127.0.0.1\n",
    );
    let errs = errors(&yaml);
    assert!(
        has_error(
            &errs,
            "http_server.admin.port",
            "already used by http_server.forwards[0]"
        ),
        "{errs:?}"
    );
    let ok = MINIMAL.replace(
        "upstream_group: g\n",
        "upstream_group: g\n      address: \"::1\"\n",
    );
    assert_eq!(
        load(&ok).unwrap().forwards[0].listen,
        "[::1]:3000".parse::<SocketAddr>().unwrap()
    );
    let bad = MINIMAL.replace(
        "upstream_group: g\n",
        "upstream_group: g\n      address: \"no such host.invalid\"\n",
    );
    assert!(has_error(
        &errors(&bad),
        "http_server.forwards[0].address",
        "does not resolve"
    ));
}

#[test]
fn upstream_urls_auth_and_proxy() {
    let yaml = r#"
http_server:
  forwards: [{name: f, upstream_group: g}]
upstreams:
  - name: v6
    url: "http://[::1]:8001/v1/"
    auth: {type: basic, username: Aladdin, password: "open sesame"}
    headers:
      - {op: remove, key: X-Drop}
      - {op: replace, key: x-set, value: "1"}
upstream_groups:
  - name: g
    upstreams: [{name: v6}]
    http_client:
      proxy:
        url: "http://bob:s3cret@proxy.local:3128"
"#;
    let c = load(yaml).unwrap();
    let u = &c.upstreams[0];
    assert_eq!(
        (
            u.host.as_str(),
            u.port,
            u.base_path.as_str(),
            u.host_header.as_str()
        ),
        ("::1", 8001, "/v1", "[::1]:8001")
    );
    assert_eq!(
        u.auth,
        Auth::Basic {
            header_value: "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==".into()
        }
    );
    assert_eq!(
        u.headers[0],
        HeaderOp::Remove(http::HeaderName::from_static("x-drop"))
    );
    let p = c.groups[0].client.proxy.as_ref().unwrap();
    assert_eq!((p.host.as_str(), p.port), ("proxy.local", 3128));
    assert_eq!(p.display_url, "http://proxy.local:3128");
    assert_eq!(p.authorization.as_deref(), Some("Basic Ym9iOnMzY3JldA=="));

    // Secrets never show up in `{:?}`.
    let dbg = format!("{c:?}");
    for secret in [
        "s3cret",
        "Ym9iOnMzY3JldA",
        "QWxhZGRpbjpvcGVuIHNlc2FtZQ",
        "open sesame",
    ] {
        assert!(!dbg.contains(secret), "{secret} leaked in {dbg}");
    }
    let bearer = load(&yaml.replace(
        "auth: {type: basic, username: Aladdin, password: \"open sesame\"}",
        "auth: {type: bearer, token: sk-live-123}",
    ))
    .unwrap();
    assert!(!format!("{bearer:?}").contains("sk-live-123"));
}

#[test]
fn did_you_mean_for_keys_and_values() {
    let yaml = MINIMAL
        .replace("upstream_group: g", "upstream_grop: g")
        .replace("url:", "ulr:");
    let errs = errors(&yaml);
    assert!(
        has_error(
            &errs,
            "http_server.forwards[0].upstream_grop",
            "did you mean `upstream_group`?"
        ),
        "{errs:?}"
    );
    assert!(
        has_error(&errs, "upstreams[0].ulr", "did you mean `url`?"),
        "{errs:?}"
    );
    assert!(
        has_error(&errs, "upstreams[0].url", "missing required key"),
        "{errs:?}"
    );
    let errs = errors(&MINIMAL.replace("upstream_group: g", "upstream_group: gg"));
    assert!(
        has_error(
            &errs,
            "http_server.forwards[0].upstream_group",
            "did you mean `g`?"
        ),
        "{errs:?}"
    );
    let errs = errors(&format!(
        "{MINIMAL}    balance:\n      strategy: roundrobbin\n"
    ));
    assert!(
        has_error(
            &errs,
            "upstream_groups[0].balance.strategy",
            "did you mean `roundrobin`?"
        ),
        "{errs:?}"
    );
}

#[test]
fn routes_resolve_to_groups() {
    let yaml = MINIMAL.replace(
        "upstream_group: g\n",
        "upstream_group: g\n      routing:\n        - path: /v1/embeddings\n          target_group: e\n        - path: /v1/:m/*\n          target_group: g\n",
    ) + "  - name: e\n    upstreams: [{name: u}]\n";
    let c = load(&yaml).unwrap();
    let routes = &c.forwards[0].routes;
    assert_eq!(
        routes[0],
        Route {
            path: "/v1/embeddings".into(),
            target_group: 1
        }
    );
    let r = crate::route::Router::new(routes);
    assert_eq!(r.find("/v1/embeddings?x=1"), Some(1));
    assert_eq!(r.find("/v1/a/b"), Some(0));
}

// ---- config.default.yaml ----

#[test]
fn default_yaml_loads_and_runs_locally() {
    let c = load(DEFAULT_YAML).unwrap();
    assert_eq!(c.forwards.len(), 1);
    assert_eq!(c.forwards[0].name, "default");
    assert_eq!(
        c.forwards[0].listen,
        "0.0.0.0:3000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        c.admin.listen,
        "127.0.0.1:9000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.upstreams[0].name, "mock");
    assert_eq!(c.upstreams[0].url, "http://127.0.0.1:8001/v1");
    assert_eq!(c.groups[0].name, "default");
    assert_eq!(
        (
            c.forwards[0].ratelimit.clone(),
            c.groups[0].client.retry.clone(),
            c.groups[0].client.proxy.clone()
        ),
        (None, None, None)
    );
}

/// Keys that carry identity rather than a default; everything else is removed when stripping.
const KEEP: &[&str] = &[
    "name",
    "url",
    "upstream_group",
    "upstreams",
    "forwards",
    "admin",
    "http_server",
    "upstream_groups",
];
/// Opt-in blocks: `enabled: false` with default values inside.
const OPT_IN: &[&str] = &["ratelimit", "retry", "proxy"];

/// Removes every defaultable key; opt-in blocks become `{enabled: true}` (plus a proxy `url`).
fn strip_defaults(v: &mut Value, parent: &str) {
    match v {
        Value::Mapping(m) => {
            let keys: Vec<Value> = m.keys().cloned().collect();
            for k in keys {
                let name = k.as_str().unwrap_or_default().to_owned();
                let keep_address = parent == "admin" && name == "address";
                if OPT_IN.contains(&name.as_str()) {
                    let mut block = serde_yaml::Mapping::new();
                    block.insert("enabled".into(), true.into());
                    if name == "proxy" {
                        block.insert("url".into(), "http://proxy.local:3128".into());
                    }
                    m.insert(k, Value::Mapping(block));
                } else if let Some(child) = m.get_mut(&k) {
                    if child.is_mapping() || child.is_sequence() {
                        strip_defaults(child, &name);
                    } else if !KEEP.contains(&name.as_str()) && !keep_address {
                        m.remove(&k);
                    }
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|i| strip_defaults(i, parent)),
        _ => {}
    }
}

/// The default file with its opt-in blocks switched on (values kept) and a proxy URL added.
fn enable_opt_in(v: &mut Value) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m.iter_mut() {
                if let (Some(name), Value::Mapping(block)) = (k.as_str(), &mut *child) {
                    if OPT_IN.contains(&name) {
                        block.insert("enabled".into(), true.into());
                        if name == "proxy" {
                            block.insert("url".into(), "http://proxy.local:3128".into());
                        }
                        continue;
                    }
                }
                enable_opt_in(child);
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(enable_opt_in),
        _ => {}
    }
}

#[test]
fn default_yaml_values_equal_code_defaults() {
    let tree: Value = serde_yaml::from_str(DEFAULT_YAML).unwrap();
    let mut full = tree.clone();
    enable_opt_in(&mut full);
    let mut stripped = tree;
    strip_defaults(&mut stripped, "");
    let full = load(&serde_yaml::to_string(&full).unwrap()).unwrap();
    let stripped_yaml = serde_yaml::to_string(&stripped).unwrap();
    // Make sure the stripping really removed the values it is meant to check.
    assert!(
        !stripped_yaml.contains("300") && !stripped_yaml.contains("LLMProxy/1.0"),
        "{stripped_yaml}"
    );
    let stripped = load(&stripped_yaml).unwrap();
    assert!(full.forwards[0].ratelimit.is_some() && full.groups[0].client.retry.is_some());
    assert_eq!(
        full, stripped,
        "a value in config.default.yaml differs from the code default"
    );
}

#[test]
fn default_yaml_documents_every_key() {
    for key in validate::ALL_KEYS.iter().flat_map(|k| k.iter()) {
        assert!(
            DEFAULT_YAML.contains(&format!("{key}:")),
            "config.default.yaml does not mention `{key}`"
        );
    }
}

#[test]
fn error_messages_do_not_echo_url_credentials() {
    for url in [
        "user:hunter2@host/v1",
        "http://user:hunter2@host/v1",
        "http://u:hunter2/x@host:99999",
    ] {
        let yaml = MINIMAL.replace("http://127.0.0.1:8001/v1", url);
        let err = load(&yaml).unwrap_err();
        assert!(err.0.iter().any(|e| e.path == "upstreams[0].url"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}

#[test]
fn go_style_camel_case_keys_get_a_hint() {
    let errs = errors(&MINIMAL.replace("upstream_group: g", "defaultGroup: g"));
    assert!(
        has_error(
            &errs,
            "http_server.forwards[0].defaultGroup",
            "did you mean `default_group`?"
        ),
        "{errs:?}"
    );
}

#[test]
fn display_lists_every_error_with_its_path() {
    let err = load(
        &MINIMAL
            .replace("name: u\n    url", "name: u\n    weight: 0\n    url")
            .replace("upstream_group: g", "upstream_group: x"),
    )
    .unwrap_err();
    let text = err.to_string();
    assert_eq!(text.lines().count(), err.0.len());
    assert!(
        text.contains("upstreams[0].weight: 0 is out of range 1–65535"),
        "{text}"
    );
    assert!(
        text.contains(
            "http_server.forwards[0].upstream_group: forward references unknown upstream group `x`"
        ),
        "{text}"
    );
}

#[test]
fn https_upstreams_verify_by_default_and_share_one_client_config() {
    let yaml = MINIMAL
        .replace(
            "url: http://127.0.0.1:8001/v1",
            "url: https://api.example.com/v1\n  - name: v\n    url: https://[::1]:8443",
        )
        .replace("      - name: u", "      - name: u\n      - name: v");
    let cfg = load(&yaml).unwrap();
    let (u, v) = (&cfg.upstreams[0], &cfg.upstreams[1]);
    let (tu, tv) = (u.tls.as_ref().unwrap(), v.tls.as_ref().unwrap());
    assert!(!tu.insecure_skip_verify && tu.ca_file.is_none());
    assert_eq!(tu.server_name.to_str(), "api.example.com");
    // An IP literal is checked as an IP address (no brackets, no SNI).
    assert!(matches!(
        tv.server_name,
        rustls::pki_types::ServerName::IpAddress(_)
    ));
    assert!(std::sync::Arc::ptr_eq(&tu.config, &tv.config));
    assert_eq!(tu.config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    // Plain upstreams have none.
    assert!(load(MINIMAL).unwrap().upstreams[0].tls.is_none());
}

#[test]
fn tls_blocks_are_checked_with_their_paths() {
    let yaml = MINIMAL
        .replace(
            "      upstream_group: g",
            "      upstream_group: g\n      tls: {cert_file: \"\", keyfile: x}",
        )
        .replace(
            "url: http://127.0.0.1:8001/v1",
            "url: http://127.0.0.1:8001/v1\n    tls: {insecure_skip_verify: true}",
        );
    let errs = errors(&yaml);
    assert!(
        has_error(
            &errs,
            "http_server.forwards[0].tls.cert_file",
            "must not be empty"
        ),
        "{errs:?}"
    );
    assert!(
        has_error(
            &errs,
            "http_server.forwards[0].tls.key_file",
            "missing required key"
        ),
        "{errs:?}"
    );
    assert!(
        has_error(
            &errs,
            "http_server.forwards[0].tls.keyfile",
            "did you mean `key_file`?"
        ),
        "{errs:?}"
    );
    assert!(
        has_error(&errs, "upstreams[0].tls", "only to https://"),
        "{errs:?}"
    );

    let yaml = MINIMAL.replace(
        "url: http://127.0.0.1:8001/v1",
        "url: https://127.0.0.1:8443\n    tls: {ca_file: /nonexistent/ca.pem, insecure_skip_verify: maybe}",
    );
    let errs = errors(&yaml);
    assert!(
        has_error(
            &errs,
            "upstreams[0].tls.ca_file",
            "cannot read `/nonexistent/ca.pem`"
        ),
        "{errs:?}"
    );
    assert!(
        has_error(&errs, "upstreams[0].tls.insecure_skip_verify", ""),
        "{errs:?}"
    );
}
