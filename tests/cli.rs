//! The command line as an operator uses it: `-t`, config errors, `-V`, a port already taken.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(PROXY_BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let p = dir.0.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn test_flag_accepts_the_embedded_default_and_an_llmproxy_config() {
    let (code, out, err) = run(&["-t"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("valid"));

    // LLMProxy's README example, unchanged (secrets from the environment).
    let dir = TempDir::new();
    let yaml = r#"
http_server:
    forwards:
        - name: "to_mixgroup"
          port: 3000
          address: "0.0.0.0"
          upstream_group: "mixgroup"
          ratelimit:
              enabled: true
              per_second: 100
              burst: 200
          timeout:
              connect: 10
    admin:
        port: 9000
        address: "0.0.0.0"
        timeout:
            connect: 10
upstreams:
    - name: "openai_primary"
      url: "https://api.openai.com/v1"
      auth:
          type: "bearer"
          token: "${OPENAI_KEY:-sk-test}"
      headers:
          - op: "insert"
            key: "X-Custom-Header"
            value: "MyProxyValue"
      breaker:
          threshold: 0.5
          cooldown: 30
    - name: "anthropic_primary"
      url: "https://api.anthropic.com"
      auth:
          type: "bearer"
          token: "YOUR_API_KEY"
upstream_groups:
    - name: "mixgroup"
      upstreams:
          - name: "openai_primary"
            weight: 8
          - name: "anthropic_primary"
            weight: 2
      balance:
          strategy: "weighted_roundrobin"
      http_client:
          agent: "LLMProxy/1.0"
          keepalive: 60
          stream: true
          timeout:
              connect: 10
              request: 300
              idle: 60
          retry:
              enabled: true
              attempts: 3
              initial: 500
          proxy:
              enabled: false
              url: "http://user:pass@proxy:8080"
"#;
    let p = write(&dir, "llmproxy.yaml", yaml);
    let (code, out, err) = run(&["-t", "-c", &p]);
    // Name resolution of the public hosts is not possible in every sandbox; what must hold is
    // that the file itself validates.
    assert!(
        code == 0 || err.contains("cannot resolve"),
        "exit {code}: {out}{err}"
    );
    assert!(!err.contains("unknown key"), "{err}");
}

#[test]
fn config_errors_are_all_reported_with_paths_and_exit_nonzero() {
    let dir = TempDir::new();
    let p = write(
        &dir,
        "bad.yaml",
        "http_server:
  forwards:
    - name: a
      port: 70000
      upstream_grop: g
      ratelimt: {}
upstreams:
  - name: u
    url: \"ftp://x\"
    auth: {type: bearer}
upstream_groups:
  - name: g
    upstreams: [{name: nope}]
    balance: {strategy: least_conn}
",
    );
    for args in [vec!["-t", "-c", &p], vec!["-c", &p]] {
        let (code, _out, err) = run(&args);
        assert_eq!(code, 1, "{err}");
        for needle in [
            "http_server.forwards[0].upstream_grop: unknown key `upstream_grop`; did you mean `upstream_group`?",
            "http_server.forwards[0].ratelimt: unknown key `ratelimt`; did you mean `ratelimit`?",
            "http_server.forwards[0].port: 70000 is out of range",
            "upstreams[0].url: unsupported URL scheme `ftp`",
            "upstreams[0].auth.token:",
            "upstream_groups[0].upstreams[0].name: unknown upstream `nope`",
            "upstream_groups[0].balance.strategy: unknown value `least_conn`",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }
    let (code, _, err) = run(&["-t", "-c", "/nonexistent/llmproxy.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn unset_env_var_is_a_config_error() {
    let dir = TempDir::new();
    let yaml = config(
        8001,
        "",
        "    auth:\n      type: bearer\n      token: ${LLMPROXY_SURELY_UNSET_VAR}",
        "",
    )
    .replace("{PORT}", "3999")
    .replace("{ADMIN}", "3998");
    let p = write(&dir, "env.yaml", &yaml);
    let (code, _, err) = run(&["-t", "-c", &p]);
    assert_eq!(code, 1);
    assert!(err.contains("upstreams[0].auth.token"), "{err}");
    assert!(err.contains("LLMPROXY_SURELY_UNSET_VAR"), "{err}");
}

#[test]
fn version_flag() {
    let (code, out, _) = run(&["-V"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("llmproxyd "), "{out}");
}

#[test]
fn a_second_instance_on_a_taken_port_fails_clearly() {
    let mock = Mock::start(&[]);
    let first = Proxy::start(&config(mock.port(), "", "", ""), &[]);
    let dir = TempDir::new();
    // Same forward port, a different admin port.
    let yaml = config(mock.port(), "", "", "")
        .replace("{PORT}", &first.port.to_string())
        .replace("{ADMIN}", &free_port().to_string());
    let p = write(&dir, "second.yaml", &yaml);
    let mut child = Command::new(PROXY_BIN)
        .args(["-c", &p])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("second instance kept running on a taken port");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("cannot listen on"), "{err}");
    assert!(err.contains("Address already in use"), "{err}");
    // The first one is unaffected.
    assert_eq!(first.get("/v1/models").status, 200);
}

#[test]
fn every_unresolvable_upstream_host_is_reported_at_once_with_its_path() {
    // `.invalid` never resolves (RFC 6761).
    let dir = TempDir::new();
    let yaml = "http_server:
  forwards:
    - {name: f, port: 3999, address: 127.0.0.1, upstream_group: g}
upstreams:
  - {name: a, url: \"http://first.invalid/v1\"}
  - {name: ok, url: \"http://127.0.0.1:8001\"}
  - {name: b, url: \"http://second.invalid:8000\"}
upstream_groups:
  - {name: g, upstreams: [{name: a}, {name: ok}, {name: b}]}
";
    let p = write(&dir, "dns.yaml", yaml);
    let (code, _, err) = run(&["-t", "-c", &p]);
    assert_eq!(code, 1, "{err}");
    for needle in [
        "upstreams[0].url: cannot resolve host `first.invalid`",
        "upstreams[2].url: cannot resolve host `second.invalid`",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(!err.contains("upstreams[1]"), "{err}");
}
