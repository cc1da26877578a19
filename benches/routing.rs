//! Routing quality: for each balancing strategy, the latency clients see (p50/p99) and the
//! error rate against upstreams of mixed speed and capacity (fast: 10 ms to first token, 32
//! streams at once; medium: 30 ms, 8; weak: 60 ms, 2 — more wait in the mock's queue), and
//! with a fourth member dead and retries on. 48 clients in a closed loop.
//! `cargo bench --bench routing` (set LLMPROXY_BENCH_QUICK=1 for a short run). Results are
//! printed side by side and written to perf/results/routing.json.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, Client, Mock, Proxy};
use hdrhistogram::Histogram;

const STRATEGIES: &[&str] = &[
    "roundrobin",
    "weighted_roundrobin",
    "random",
    "response_aware",
    "failover",
    "iphash",
    "least_requests",
];

fn config(members: &[u16], strategy: &str, retry: bool) -> String {
    let mut s = String::from(
        "http_server:\n  forwards:\n    - name: f\n      address: 127.0.0.1\n      port: {PORT}\n      upstream_group: g\n  admin:\n    address: 127.0.0.1\n    port: {ADMIN}\nupstreams:\n",
    );
    for (i, p) in members.iter().enumerate() {
        s.push_str(&format!(
            "  - name: u{i}\n    url: http://127.0.0.1:{p}/v1\n    breaker:\n      cooldown: 2\n"
        ));
    }
    s.push_str("upstream_groups:\n  - name: g\n    upstreams:\n");
    for i in 0..members.len() {
        s.push_str(&format!("      - name: u{i}\n"));
    }
    s.push_str(&format!("    balance:\n      strategy: {strategy}\n"));
    if retry {
        s.push_str("    http_client:\n      retry:\n        attempts: 2\n        initial: 100\n");
    }
    s
}

struct Outcome {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
}

/// Closed loop: `clients` connections, each sending a short streamed completion after the
/// previous answer ended, for `dur`.
fn drive(port: u16, clients: usize, dur: Duration) -> Outcome {
    let total = Arc::new(Mutex::new(Outcome {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
        ok: 0,
        errors: 0,
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let body = br#"{"model":"m","stream":true,"messages":[]}"#;
    let req = [
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\ncontent-length: {}\r\nx-mock-tokens: 3\r\nx-mock-gap-ms: 2\r\n\r\n",
            body.len()
        )
        .as_bytes(),
        body,
    ]
    .concat();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (total, stop, req) = (total.clone(), stop.clone(), req.clone());
            std::thread::spawn(move || {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let (mut ok, mut errors) = (0, 0);
                let mut c = Client::connect(port);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    c.send(&req);
                    match c.read_response("POST") {
                        Some(r) if r.status == 200 && r.chunked_complete => {
                            ok += 1;
                            let _ = h.record(t.elapsed().as_micros() as u64);
                        }
                        Some(r) => {
                            errors += 1;
                            if r.closed {
                                c = Client::connect(port);
                            }
                        }
                        None => {
                            errors += 1;
                            c = Client::connect(port);
                        }
                    }
                }
                let mut t = total.lock().unwrap();
                t.hist.add(&h).unwrap();
                t.ok += ok;
                t.errors += errors;
            })
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Arc::try_unwrap(total).ok().unwrap().into_inner().unwrap()
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` / `--all-targets` runs this binary without `--bench`: a minute
        // of load does not belong in the test run.
        println!("routing bench: skipped (run it with `cargo bench --bench routing`)");
        return;
    }
    let quick = std::env::var_os("LLMPROXY_BENCH_QUICK").is_some()
        || std::env::args().any(|a| a == "--quick");
    let dur = if quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(4)
    };
    let clients = 48;
    // Mixed speed, as LLM servers are: each generates a bounded number of streams at once (vLLM's
    // max_num_seqs) and queues the rest, so a weak member gets slow when it gets too much.
    let fast = Mock::start(&["--ttft-ms", "10", "--max-concurrency", "32"]);
    let medium = Mock::start(&["--ttft-ms", "30", "--max-concurrency", "8"]);
    let slow = Mock::start(&["--ttft-ms", "60", "--max-concurrency", "2"]);
    let members = [fast.port(), medium.port(), slow.port()];
    let dead = free_port();
    let with_dead = [fast.port(), medium.port(), slow.port(), dead];

    let mut rows = Vec::new();
    for (scenario, ups, retry) in [
        ("mixed speed", &members[..], false),
        ("one member dead, retries on", &with_dead[..], true),
    ] {
        for s in STRATEGIES {
            eprintln!("routing bench: {scenario}: {s} ({clients} clients, {dur:?})");
            let proxy = Proxy::start(&config(ups, s, retry), &[]);
            let o = drive(proxy.port, clients, dur);
            let n = o.ok + o.errors;
            let err = if n == 0 {
                0.0
            } else {
                o.errors as f64 / n as f64 * 100.0
            };
            rows.push(serde_json::json!({
                "scenario": scenario, "strategy": s, "requests": n,
                "req_per_s": n as f64 / dur.as_secs_f64(),
                "p50_ms": ms(&o.hist, 0.5), "p90_ms": ms(&o.hist, 0.9), "p99_ms": ms(&o.hist, 0.99),
                "error_pct": err,
            }));
        }
    }
    println!();
    println!(
        "{:<28} {:<20} {:>8} {:>9} {:>9} {:>9} {:>8}",
        "scenario", "strategy", "req/s", "p50 ms", "p90 ms", "p99 ms", "err %"
    );
    for r in &rows {
        println!(
            "{:<28} {:<20} {:>8.0} {:>9.1} {:>9.1} {:>9.1} {:>8.3}",
            r["scenario"].as_str().unwrap(),
            r["strategy"].as_str().unwrap(),
            r["req_per_s"].as_f64().unwrap(),
            r["p50_ms"].as_f64().unwrap(),
            r["p90_ms"].as_f64().unwrap(),
            r["p99_ms"].as_f64().unwrap(),
            r["error_pct"].as_f64().unwrap(),
        );
    }
    let p99 = |sc: &str, st: &str| {
        rows.iter()
            .find(|r| r["scenario"] == sc && r["strategy"] == st)
            .and_then(|r| r["p99_ms"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let rr = p99("mixed speed", "roundrobin");
    println!();
    for s in ["response_aware", "least_requests"] {
        println!(
            "p99 roundrobin / {s} (mixed speed): {:.2}x (target >= 2x)",
            rr / p99("mixed speed", s)
        );
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("perf/results");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(
        out.join("routing.json"),
        serde_json::to_string_pretty(&serde_json::json!({"clients": clients, "seconds_per_run": dur.as_secs_f64(), "rows": rows})).unwrap(),
    );
}
