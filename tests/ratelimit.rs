//! Rate limits as clients see them: per client IP per forward (accurate across shards) and per
//! upstream (a member at its rate is passed over).

mod common;

use std::time::{Duration, Instant};

use common::*;

const LIMIT: &str = "      ratelimit:\n        per_second: 20\n        burst: 20";

/// Sends GETs for `dur` and returns (200s, 429s) and the last 429 seen.
fn hammer(port: u16, dur: Duration, fresh_connections: bool) -> (u64, u64, Option<Response>) {
    let (mut ok, mut limited, mut last) = (0, 0, None);
    let mut c = Client::connect(port);
    let end = Instant::now() + dur;
    while Instant::now() < end {
        if fresh_connections {
            c = Client::connect(port);
        }
        let r = c.request("GET", "/v1/models", &[], b"");
        match r.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                last = Some(r);
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    (ok, limited, last)
}

#[test]
fn one_keep_alive_client_gets_its_full_rate_and_no_more() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), LIMIT, "", ""), &["--shards", "1"]);
    let t = Instant::now();
    let (ok, limited, last) = hammer(proxy.port, Duration::from_secs(2), false);
    let secs = t.elapsed().as_secs_f64();
    let allowed = 20.0 * secs + 20.0;
    assert!(ok as f64 <= allowed + 1.0, "{ok} admitted in {secs:.2}s");
    assert!(
        ok as f64 >= allowed - 6.0,
        "only {ok} admitted in {secs:.2}s (allowed {allowed:.0})"
    );
    assert!(limited > 0);
    let r = last.unwrap();
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    assert!(!r.closed, "a bodiless request keeps its connection");
    assert_eq!(
        mock.stat("requests"),
        ok,
        "refused requests never reach the upstream"
    );
    assert!(eventually(Duration::from_secs(2), || proxy
        .admin_get("/metrics")
        .text()
        .contains(&format!(
            "llmproxy_ratelimit_total{{forward=\"f\"}} {limited}"
        ))));
}

#[test]
fn a_client_spread_over_every_shard_gets_no_more_than_rate_plus_burst() {
    let mock = Mock::start(&[]);
    let proxy = Proxy::start(&config(mock.port(), LIMIT, "", ""), &["--shards", "2"]);
    let t = Instant::now();
    // A fresh connection per request: the kernel spreads them over both shards.
    let (ok, limited, _) = hammer(proxy.port, Duration::from_secs(2), true);
    let secs = t.elapsed().as_secs_f64();
    assert!(
        ok as f64 <= 20.0 * secs + 20.0 + 1.0,
        "{ok} admitted in {secs:.2}s"
    );
    assert!(limited > 0);
    // Both shards really served this client.
    assert!(eventually(Duration::from_secs(2), || {
        let s = proxy.admin_get("/status").json();
        s["shards"]
            .as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x["requests"].as_u64() > Some(0)))
    }));
}

fn two_members(a: u16, b: u16, a_extra: &str, b_extra: &str) -> String {
    group_config(&[("a", a, a_extra), ("b", b, b_extra)], "")
}

#[test]
fn an_upstream_at_its_rate_is_passed_over() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let yaml = two_members(
        a.port(),
        b.port(),
        "    ratelimit:\n      per_second: 5",
        "",
    );
    let proxy = Proxy::start(&yaml, &["--shards", "1"]);
    let t = Instant::now();
    let mut c = Client::connect(proxy.port);
    for _ in 0..60 {
        assert_eq!(c.request("GET", "/v1/models", &[], b"").status, 200);
    }
    let secs = t.elapsed().as_secs_f64();
    let to_a = a.stat("requests");
    assert!(
        to_a as f64 <= 5.0 * secs + 5.0 + 1.0,
        "{to_a} sent to a in {secs:.2}s"
    );
    assert_eq!(to_a + b.stat("requests"), 60);
}

#[test]
fn every_member_at_its_rate_is_429_with_retry_after() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let limit = "    ratelimit:\n      per_second: 2";
    let yaml = two_members(a.port(), b.port(), limit, limit);
    let proxy = Proxy::start(&yaml, &["--shards", "1"]);
    let mut statuses = Vec::new();
    let mut c = Client::connect(proxy.port);
    for _ in 0..10 {
        let r = c.request("GET", "/v1/models", &[], b"");
        if r.status == 429 {
            assert_eq!(r.json()["error"]["code"], "upstream_rate_limited");
            assert!(r.header("retry-after").is_some());
        }
        statuses.push(r.status);
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        6,
        "{statuses:?}"
    );
}
