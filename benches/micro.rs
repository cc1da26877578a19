//! `cargo bench --bench micro`: criterion micro-benchmarks of the per-request pure functions
//! (head parsing, upstream pick) and of the control thread's per-tick work (merging a shard's
//! stats delta, the breaker/EMA tick that builds the next snapshot). Under `cargo test --benches`
//! criterion runs each once, as a smoke test.

use std::cell::Cell;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::Method;

use llmproxy::balance::{Balancer, UpstreamView};
use llmproxy::breaker::Global;
use llmproxy::config::{self, Config};
use llmproxy::http::head::{take_request, take_response, HeadScanner};
use llmproxy::stats::{Merged, ShardStats, UpstreamErrorKind};

/// What an OpenAI SDK sends (headers as the Python client sets them).
const REQUEST_HEAD: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\n\
host: llm.internal:3000\r\n\
accept-encoding: gzip, deflate\r\n\
connection: keep-alive\r\n\
accept: application/json\r\n\
content-type: application/json\r\n\
user-agent: OpenAI/Python 1.54.4\r\n\
x-stainless-lang: python\r\n\
x-stainless-package-version: 1.54.4\r\n\
x-stainless-os: Linux\r\n\
x-stainless-arch: x64\r\n\
x-stainless-runtime: CPython\r\n\
x-stainless-runtime-version: 3.12.7\r\n\
authorization: Bearer sk-bench-0000000000000000000000000000000000000000\r\n\
x-stainless-async: false\r\n\
x-stainless-retry-count: 0\r\n\
content-length: 90\r\n\r\n";

/// What a vLLM server answers for a streamed completion.
const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n\
date: Sat, 22 Nov 2026 10:00:00 GMT\r\n\
server: uvicorn\r\n\
content-type: text/event-stream; charset=utf-8\r\n\
transfer-encoding: chunked\r\n\r\n";

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("head");
    g.bench_function("take_request (16 headers, 0.6 KiB)", |b| {
        b.iter_batched_ref(
            || (BytesMut::from(REQUEST_HEAD), HeadScanner::default()),
            |(buf, scanner)| {
                let r = take_request(buf, scanner, 64 * 1024).unwrap().unwrap();
                black_box(r)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("take_response (SSE head)", |b| {
        b.iter_batched_ref(
            || (BytesMut::from(RESPONSE_HEAD), HeadScanner::default()),
            |(buf, scanner)| {
                let r = take_response(buf, scanner, 64 * 1024, &Method::POST)
                    .unwrap()
                    .unwrap();
                black_box(r)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn config(strategy: &str, members: usize) -> Config {
    let mut y = String::from(
        "http_server:\n  forwards:\n    - {name: f, address: 127.0.0.1, port: 3000, upstream_group: g}\nupstreams:\n",
    );
    for i in 0..members {
        y.push_str(&format!(
            "  - {{name: u{i}, url: \"http://127.0.0.1:{}/v1\"}}\n",
            8000 + i
        ));
    }
    y.push_str(&format!(
        "upstream_groups:\n  - name: g\n    balance: {{strategy: {strategy}}}\n    upstreams:\n"
    ));
    for i in 0..members {
        y.push_str(&format!("      - {{name: u{i}}}\n"));
    }
    config::load_str(&y).unwrap_or_else(|e| panic!("bench config: {e:?}"))
}

/// A view with spread-out numbers, one member unavailable, in-flight counts that move.
struct View {
    tick: Cell<u32>,
}

impl UpstreamView for View {
    fn available(&self, u: usize) -> bool {
        u != 2
    }
    fn in_flight(&self, u: usize) -> u32 {
        (u as u32 * 7 + self.tick.get()) % 13
    }
    fn latency_ms(&self, u: usize) -> f64 {
        20.0 + 15.0 * u as f64
    }
    fn success_rate(&self, u: usize) -> f64 {
        1.0 - 0.01 * u as f64
    }
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick (4 members, 1 unavailable)");
    let client = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    for strategy in [
        "roundrobin",
        "weighted_roundrobin",
        "random",
        "response_aware",
        "least_requests",
        "iphash",
        "failover",
    ] {
        let cfg = config(strategy, 4);
        let bal = Balancer::new(&cfg.groups[0], 0);
        let view = View { tick: Cell::new(0) };
        g.bench_function(strategy, |b| {
            b.iter(|| {
                view.tick.set(view.tick.get().wrapping_add(1));
                black_box(bal.pick(&view, black_box(client), &[]))
            })
        });
    }
    g.finish();
}

/// One tick's worth of a busy shard: `n` requests over 4 upstreams, a few errors.
fn delta(cfg: &Config, n: usize) -> llmproxy::stats::StatsDelta {
    let s = ShardStats::new(0, cfg);
    for i in 0..n {
        let u = i % 4;
        let d = Duration::from_micros(200 + (i as u64 * 37) % 5000);
        s.http_request(0, &Method::POST, "/v1/chat/completions", 200, d);
        let err = (i % 97 == 0).then_some(UpstreamErrorKind::Status5xx);
        s.upstream_request(0, u, d, err);
        s.breaker_outcome(
            u,
            0,
            if err.is_some() {
                llmproxy::breaker::Outcome::Failure
            } else {
                llmproxy::breaker::Outcome::Success
            },
            d.as_micros() as u64,
        );
    }
    s.take_delta()
}

fn merge(c: &mut Criterion) {
    let cfg = config("response_aware", 4);
    let d = delta(&cfg, 1000);
    let mut g = c.benchmark_group("control thread");
    g.bench_function("Merged::apply (1 000-request delta)", |b| {
        let mut m = Merged::new(&cfg, Instant::now());
        b.iter_batched(
            || d.clone(),
            |d| m.apply(d, Instant::now()),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("Global::observe + tick (1 000-request delta)", |b| {
        let mut gl = Global::new(&cfg, 2, Instant::now());
        let mut transitions = Vec::new();
        b.iter(|| {
            gl.observe(black_box(&d));
            transitions.clear();
            black_box(gl.tick(Instant::now(), &mut transitions))
        })
    });
    g.finish();
}

criterion_group!(benches, parse, pick, merge);
criterion_main!(benches);
