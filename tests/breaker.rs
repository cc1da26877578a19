//! Circuit breakers end to end: an upstream that fails is skipped, recovers after its cooldown,
//! and every shard sees the same state.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn cfg(port: u16, upstream_extra: &str) -> String {
    config(port, "", upstream_extra, "")
}

#[test]
fn an_opened_breaker_recovers_when_the_upstream_is_back() {
    let port = free_port();
    let breaker = "    breaker:\n      cooldown: 1\n      consecutive_failures: 3";
    let proxy = Proxy::start(&cfg(port, breaker), &["--shards", "1"]);
    // The upstream is down: connect errors until the breaker opens, then fast 503s.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(proxy.get("/v1/models").status);
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(&statuses[..3], &[502, 502, 502], "{statuses:?}");
    assert!(
        eventually(Duration::from_secs(1), || {
            let r = proxy.get("/v1/models");
            r.status == 503 && r.json()["error"]["code"] == "no_upstream_available"
        }),
        "breaker never opened: {statuses:?}"
    );
    let m = proxy.admin_get("/metrics").text();
    assert!(
        m.contains("llmproxy_circuitbreaker_opened_total{group=\"g\",upstream=\"u\""),
        "{m}"
    );
    // The upstream comes back; after the cooldown a probe closes the breaker again.
    let listen = format!("127.0.0.1:{port}");
    let mock = Mock::start(&["--listen", &listen]);
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || proxy.get("/v1/models").status
            == 200),
        "never recovered"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "recovered before the cooldown?"
    );
    assert!(mock.stat("requests") >= 1);
    // Half-open admits `max_requests` (3) probes; their successes close it.
    assert!(
        eventually(Duration::from_secs(3), || {
            let _ = proxy.get("/v1/models");
            let s = proxy.admin_get("/status").json();
            s["upstreams"][0]["breaker"]["state"] == "closed"
        }),
        "{}",
        proxy.admin_get("/status").text()
    );
    // Shards adopt the closing snapshot within a tick (50 ms by default).
    std::thread::sleep(Duration::from_millis(150));
    for _ in 0..10 {
        assert_eq!(proxy.get("/v1/models").status, 200);
    }
}

#[test]
fn failures_seen_by_one_shard_steer_the_others() {
    // A 5xx-answering upstream beside a healthy one; two shards. Whatever shard sees the
    // failures, the merged breaker opens for both, and traffic moves to the healthy member.
    let bad = Mock::start(&["--error-status", "500"]);
    let good = Mock::start(&[]);
    let breaker =
        "    breaker: {cooldown: 30, min_requests: 4, threshold: 0.5, consecutive_failures: 1000}";
    let yaml = group_config(
        &[("bad", bad.port(), breaker), ("good", good.port(), "")],
        "",
    );
    let proxy = Proxy::start(&yaml, &["--shards", "2"]);
    // One keep-alive connection lives on one shard; it alone feeds the breaker.
    let mut c = Client::connect(proxy.port);
    for _ in 0..8 {
        c.request("GET", "/v1/models", &[], b"");
    }
    let mut opened_at = 0;
    assert!(
        eventually(Duration::from_secs(2), || {
            let s = proxy.admin_get("/status").json();
            opened_at = s["epoch"].as_u64().unwrap_or(0);
            s["upstreams"][0]["breaker"]["state"] == "open"
        }),
        "{}",
        proxy.admin_get("/status").text()
    );
    // /status shows the control thread's merge; each shard adopts it on its next tick. Once
    // both report that epoch, both skip `bad`.
    assert!(
        eventually(Duration::from_secs(2), || {
            let s = proxy.admin_get("/status").json();
            s["shards"].as_array().is_some_and(|a| {
                a.len() == 2 && a.iter().all(|x| x["epoch"].as_u64() >= Some(opened_at))
            })
        }),
        "{}",
        proxy.admin_get("/status").text()
    );
    // Fresh connections, spread over both shards by the kernel: none reaches `bad` any more.
    let before = bad.stat("requests");
    for _ in 0..40 {
        assert_eq!(proxy.get("/v1/models").status, 200);
    }
    assert_eq!(
        bad.stat("requests"),
        before,
        "an open breaker was not skipped"
    );
    // Both shards run on the same snapshot epoch (within two ticks).
    let s = proxy.admin_get("/status").json();
    let epochs: Vec<u64> = s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs.len(), 2, "{s}");
    assert!(epochs[0].abs_diff(epochs[1]) <= 2, "{epochs:?}");
}
