//! The scenarios, as a list: each one names the targets it runs against and a function that
//! runs it against one target and returns a [`Run`]. To add one, write the function (most are a
//! few lines over `rr_run`, `sse_run` or the hold runs) and push a [`Scenario`] in [`all`];
//! the table, the JSON, the chart and the "vs direct" rows pick it up by themselves. A TLS
//! scenario (`tls: true`) runs the same function against HTTPS listeners (direct: the mock
//! serving HTTPS) and names its plain twin in `plain`, for the TLS cost rows.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::client::{request_bytes, Dest};
use crate::load::{self, GenPlan, Hold, Problems, Window};
use crate::services::{Env, Kind, Mock, Service};
use crate::sys::{self, now_ns};
use crate::tls::TlsSetup;

/// Small chat completion request (non-streaming).
pub const CHAT_BODY: &str =
    r#"{"model":"mock","messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;
/// The same, streamed.
pub const SSE_BODY: &str = r#"{"model":"mock","stream":true,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;

/// Durations and sizes of one run of the bench.
#[derive(Clone, Debug)]
pub struct Plan {
    pub rr_warmup: Duration,
    pub rr_dur: Duration,
    pub seq_warmup: Duration,
    pub seq_dur: Duration,
    pub sse_warmup: Duration,
    pub sse_dur: Duration,
    pub sse_streams: usize,
    pub sse_tokens: usize,
    pub sse_gap_ms: u64,
    pub idle_conns: usize,
    pub open_streams: usize,
    pub churn_warmup: Duration,
    pub churn_dur: Duration,
    /// Concurrent clients of the new-connection-per-request scenarios.
    pub churn_clients: usize,
}

impl Plan {
    /// The plan for a full or `--quick` run; `LLMPROXY_BENCH_SSE_STREAMS`, `_SSE_GAP_MS`,
    /// `_IDLE_CONNS` and `_OPEN_STREAMS` override the sizes.
    pub fn new(quick: bool) -> Plan {
        let mut p = Plan::base(quick);
        let env = |k: &str| {
            std::env::var(format!("LLMPROXY_BENCH_{k}"))
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
        };
        if let Some(v) = env("SSE_STREAMS") {
            p.sse_streams = v.max(1);
        }
        if let Some(v) = env("SSE_GAP_MS") {
            p.sse_gap_ms = v as u64;
        }
        if let Some(v) = env("IDLE_CONNS") {
            p.idle_conns = v.max(1);
        }
        if let Some(v) = env("OPEN_STREAMS") {
            p.open_streams = v.max(1);
        }
        p
    }

    fn base(quick: bool) -> Plan {
        let ms = Duration::from_millis;
        if quick {
            Plan {
                rr_warmup: ms(300),
                rr_dur: ms(1500),
                seq_warmup: ms(200),
                seq_dur: ms(1000),
                sse_warmup: ms(300),
                sse_dur: ms(1500),
                sse_streams: 128,
                sse_tokens: 50,
                sse_gap_ms: 10,
                idle_conns: 1000,
                open_streams: 500,
                churn_warmup: ms(200),
                churn_dur: ms(800),
                churn_clients: 16,
            }
        } else {
            Plan {
                rr_warmup: ms(1000),
                rr_dur: ms(5000),
                seq_warmup: ms(500),
                seq_dur: ms(3000),
                sse_warmup: ms(1000),
                sse_dur: ms(5000),
                sse_streams: 128,
                sse_tokens: 50,
                sse_gap_ms: 10,
                idle_conns: 10_000,
                open_streams: 5_000,
                churn_warmup: ms(500),
                churn_dur: ms(3000),
                churn_clients: 16,
            }
        }
    }
}

/// What a scenario runs against.
#[derive(Clone, Copy, Debug)]
pub enum TargetSpec {
    /// The mock itself.
    Direct,
    Proxy(Kind),
}

impl TargetSpec {
    pub fn label(self) -> String {
        match self {
            TargetSpec::Direct => "direct".into(),
            TargetSpec::Proxy(k) => k.label(),
        }
    }
}

/// One target, started for one run.
pub struct Target {
    pub label: String,
    pub port: u16,
    /// The process whose CPU and memory are reported (the mock for "direct").
    pub pid: u32,
    pub service: Option<Service>,
    /// `<scenario id>-<label>`, for file names.
    pub tag: String,
    /// HTTPS: the generator's TLS config.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// What the target negotiated with that config (checked before the run).
    pub negotiated: Option<String>,
}

impl Target {
    /// Where the load generator connects.
    pub fn dest(&self) -> Dest {
        Dest {
            port: self.port,
            tls: self.tls.clone(),
        }
    }
}

pub struct Ctx<'a> {
    pub env: Env<'a>,
    /// The plain mock: every proxy's upstream, "direct" of the plain scenarios.
    pub mock: &'a Mock,
    /// Certificate files and the generator's client config.
    pub tls: &'a TlsSetup,
    /// The mock serving HTTPS: "direct" of the TLS scenarios (started when one is chosen).
    pub tls_mock: Option<&'a Mock>,
    pub plan: &'a Plan,
    pub gen: GenPlan,
    /// `--perf-record DIR`: `perf record` llmproxyd during each measured window into
    /// `DIR/<tag>.perf.data` (for perf/flamegraph.sh; the numbers of such a run are skewed).
    pub perf_dir: Option<std::path::PathBuf>,
}

impl Ctx<'_> {
    /// Starts a fresh target; `same_core`: the proxy runs on the mock's (and the generator's)
    /// CPU; `tls`: it serves HTTPS (and must negotiate exactly [`crate::tls::EXPECTED`]).
    pub fn start(&self, spec: TargetSpec, same_core: bool, tls: bool) -> Result<Target, String> {
        let mut t = match spec {
            TargetSpec::Direct => {
                let mock = if tls {
                    self.tls_mock.ok_or("the TLS mock is not running")?
                } else {
                    self.mock
                };
                Target {
                    label: spec.label(),
                    port: mock.port(),
                    pid: mock.pid(),
                    service: None,
                    tag: String::new(),
                    tls: None,
                    negotiated: None,
                }
            }
            TargetSpec::Proxy(kind) => {
                let env = Env {
                    proxy_cpu: same_core.then(|| self.env.placement.mock[0]),
                    tls: tls.then_some(self.tls),
                    ..self.env
                };
                let s = Service::start(kind, &env)?;
                Target {
                    label: s.label(),
                    port: s.port,
                    pid: s.pid,
                    service: Some(s),
                    tag: String::new(),
                    tls: None,
                    negotiated: None,
                }
            }
        };
        if tls {
            let cfg = self.tls.client.clone();
            let n = crate::tls::negotiated(t.port, &cfg)
                .map_err(|e| format!("TLS check of {}: {e}", t.label))?;
            if n != crate::tls::EXPECTED {
                return Err(format!(
                    "{} negotiated {n}, not {} (not comparable)",
                    t.label,
                    crate::tls::EXPECTED
                ));
            }
            t.tls = Some(cfg);
            t.negotiated = Some(n);
        }
        Ok(t)
    }

    /// The mock whose counters and CPU go with target `t` (for TLS "direct": the HTTPS mock).
    pub fn mock_of(&self, t: &Target) -> &Mock {
        match (&t.service, &t.tls, self.tls_mock) {
            (None, Some(_), Some(m)) => m,
            _ => self.mock,
        }
    }
}

pub struct Scenario {
    pub id: &'static str,
    pub title: String,
    pub description: String,
    pub targets: Vec<TargetSpec>,
    /// Rough duration per target, for the progress line.
    pub secs: f64,
    /// The proxy runs on the CPU of the mock and the generator (no cross-core hop).
    pub same_core: bool,
    /// Every target serves HTTPS (the proxies' upstream stays the plain mock).
    pub tls: bool,
    /// For a TLS scenario: the id of the same scenario in plain HTTP (the TLS cost rows).
    pub plain: Option<&'static str>,
    pub run: fn(&Ctx, &Target) -> Run,
}

/// The scenarios of this run. `proxies`: llmproxyd, plus nginx and HAProxy with `--compare`.
pub fn all(plan: &Plan, proxies: &[Kind]) -> Vec<Scenario> {
    let with_direct: Vec<TargetSpec> = std::iter::once(TargetSpec::Direct)
        .chain(proxies.iter().map(|&k| TargetSpec::Proxy(k)))
        .collect();
    let only_proxies: Vec<TargetSpec> = proxies.iter().map(|&k| TargetSpec::Proxy(k)).collect();
    let s = |d: Duration, w: Duration| (d + w).as_secs_f64();
    vec![
        Scenario {
            id: "a_json_64c",
            title: "a) small JSON POST, 64 keep-alive connections".into(),
            description: "non-streaming POST /v1/chat/completions (90 B body, ~345 B answer), closed loop on 64 keep-alive connections".into(),
            targets: with_direct.clone(),
            secs: s(plan.rr_dur, plan.rr_warmup),
            same_core: false,
            tls: false,
            plain: None,
            run: |c, t| rr_run(c, t, 64, c.plan.rr_warmup, c.plan.rr_dur),
        },
        Scenario {
            id: "a_json_64c_tls",
            title: "a-tls) small JSON POST over HTTPS, 64 keep-alive connections".into(),
            description: "scenario a with TLS on the listener (direct: the mock serving HTTPS with the same certificate); \
                          the proxies' upstream stays the plain mock. The 64 handshakes happen in the warm-up; keep-alive after"
                .into(),
            targets: with_direct.clone(),
            secs: s(plan.rr_dur, plan.rr_warmup),
            same_core: false,
            tls: true,
            plain: Some("a_json_64c"),
            run: |c, t| rr_run(c, t, 64, c.plan.rr_warmup, c.plan.rr_dur),
        },
        Scenario {
            id: "b_seq_1c",
            title: "b) one connection, sequential: the latency the proxy adds".into(),
            description: "the same request, one keep-alive connection, one request at a time".into(),
            targets: with_direct.clone(),
            secs: s(plan.seq_dur, plan.seq_warmup),
            same_core: false,
            tls: false,
            plain: None,
            run: |c, t| rr_run(c, t, 1, c.plan.seq_warmup, c.plan.seq_dur),
        },
        Scenario {
            id: "b_seq_1c_tls",
            title: "b-tls) one HTTPS connection, sequential: the latency the proxy adds over TLS".into(),
            description: "scenario b with TLS on the listener (one handshake, in the warm-up)".into(),
            targets: with_direct.clone(),
            secs: s(plan.seq_dur, plan.seq_warmup),
            same_core: false,
            tls: true,
            plain: Some("b_seq_1c"),
            run: |c, t| rr_run(c, t, 1, c.plan.seq_warmup, c.plan.seq_dur),
        },
        Scenario {
            id: "b1_seq_1c_same_core",
            title: "b') one connection, proxy on the generator's core: the proxy's own added latency".into(),
            description: "scenario b with the proxy pinned to the CPU of the mock and the load generator: every hop is a \
                          switch on one core instead of a wake-up of the other (idle) core, so what is added is the proxy's own work"
                .into(),
            targets: with_direct.clone(),
            secs: s(plan.seq_dur, plan.seq_warmup),
            same_core: true,
            tls: false,
            plain: None,
            run: |c, t| rr_run(c, t, 1, c.plan.seq_warmup, c.plan.seq_dur),
        },
        Scenario {
            id: "c_sse",
            title: format!(
                "c) SSE: {} concurrent streams of {} events {} ms apart",
                plan.sse_streams, plan.sse_tokens, plan.sse_gap_ms
            ),
            description: format!(
                "{} connections running streamed completions back to back ({} token events {} ms apart + [DONE]); \
                 every event carries the mock's send time (x-mock-stamp), event latency = arrival at the client - that stamp",
                plan.sse_streams, plan.sse_tokens, plan.sse_gap_ms
            ),
            targets: with_direct.clone(),
            secs: s(plan.sse_dur, plan.sse_warmup) + 0.7,
            same_core: false,
            tls: false,
            plain: None,
            run: sse_run,
        },
        Scenario {
            id: "c_sse_tls",
            title: format!(
                "c-tls) SSE over HTTPS: {} concurrent streams of {} events {} ms apart",
                plan.sse_streams, plan.sse_tokens, plan.sse_gap_ms
            ),
            description: "scenario c with TLS on the listener: every event is a TLS record (or part of one) from the proxy; \
                          event latency against the mock's send stamps as in c"
                .into(),
            targets: with_direct.clone(),
            secs: s(plan.sse_dur, plan.sse_warmup) + 0.7,
            same_core: false,
            tls: true,
            plain: Some("c_sse"),
            run: sse_run,
        },
        Scenario {
            id: "d_idle_conns",
            title: format!("d) memory: {} idle keep-alive connections", plan.idle_conns),
            description: format!(
                "{} connections, each served one small JSON request, then left idle; RSS above the fresh proxy's baseline; \
                 afterwards every connection must answer a second request",
                plan.idle_conns
            ),
            targets: only_proxies.clone(),
            secs: 3.0,
            same_core: false,
            tls: false,
            plain: None,
            run: idle_run,
        },
        Scenario {
            id: "d_idle_tls",
            title: format!("d-tls) memory: {} idle keep-alive HTTPS connections", plan.idle_conns),
            description: "scenario d's idle connections over TLS (one full handshake each, then one small request); RSS above \
                 the fresh proxy's baseline; afterwards every connection must answer a second request"
                .into(),
            targets: only_proxies.clone(),
            secs: 6.0,
            same_core: false,
            tls: true,
            plain: Some("d_idle_conns"),
            run: idle_run,
        },
        Scenario {
            id: "d_open_streams",
            title: format!("d) memory: {} open SSE streams", plan.open_streams),
            description: format!(
                "{} streamed completions, each past its first event and waiting for the next (30 s away); RSS above the fresh proxy's baseline \
                 (includes the upstream connection each stream holds)",
                plan.open_streams
            ),
            targets: only_proxies,
            secs: 3.0,
            same_core: false,
            tls: false,
            plain: None,
            run: streams_run,
        },
        Scenario {
            id: "e_shards",
            title: "e) llmproxyd 1 shard vs 2 shards (scenario a's load)".into(),
            description: "scenario a against llmproxyd --shards 1 and --shards 2; per-shard CPU from the shard threads".into(),
            targets: vec![
                TargetSpec::Proxy(Kind::Llmproxyd { shards: 1 }),
                TargetSpec::Proxy(Kind::Llmproxyd { shards: 2 }),
            ],
            secs: s(plan.rr_dur, plan.rr_warmup),
            same_core: false,
            tls: false,
            plain: None,
            run: |c, t| rr_run(c, t, 64, c.plan.rr_warmup, c.plan.rr_dur),
        },
        Scenario {
            id: "f_new_conns",
            title: format!(
                "f) a new connection per request, {} clients",
                plan.churn_clients
            ),
            description: "each client in a closed loop: connect, one small JSON POST with `connection: close`, read the answer \
                          and the server's close; the cost of setting up a connection"
                .into(),
            targets: with_direct.clone(),
            secs: s(plan.churn_dur, plan.churn_warmup),
            same_core: false,
            tls: false,
            plain: None,
            run: churn_run,
        },
        Scenario {
            id: "f_new_conns_tls",
            title: format!(
                "f-tls) a new HTTPS connection per request (full TLS 1.3 handshake), {} clients",
                plan.churn_clients
            ),
            description: "scenario f over TLS: every connection is a full handshake (the generator never resumes; the servers \
                          still send their default session tickets); conn/s/core = handshakes per CPU-second of the target"
                .into(),
            targets: with_direct,
            secs: s(plan.churn_dur, plan.churn_warmup),
            same_core: false,
            tls: true,
            plain: Some("f_new_conns"),
            run: churn_run,
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Results

/// A latency distribution of one run.
pub struct Lat {
    pub key: &'static str,
    pub title: &'static str,
    pub hist: Histogram<u64>,
}

/// CPU seconds spent in the measured window.
#[derive(Clone, Debug, Default)]
pub struct CpuWindow {
    pub secs: f64,
    pub target: f64,
    pub target_threads: Vec<(String, f64)>,
    pub mock: f64,
    pub generator: f64,
    pub machine: f64,
    pub steal: f64,
}

/// Samples CPU time of the target (per thread), the mock, the generator threads and the
/// machine.
pub struct CpuSampler {
    target_pid: u32,
    mock_pid: u32,
    tids: Vec<i32>,
    at: u64,
    before: CpuWindow,
}

impl CpuSampler {
    fn read(&self) -> CpuWindow {
        let threads = sys::threads_cpu(self.target_pid);
        let (machine, steal) = sys::machine_cpu();
        CpuWindow {
            secs: 0.0,
            target: threads.iter().map(|(_, c)| c).sum(),
            target_threads: threads,
            mock: sys::process_cpu(self.mock_pid),
            generator: sys::own_threads_cpu(&self.tids),
            machine,
            steal,
        }
    }

    pub fn start(target_pid: u32, mock_pid: u32, tids: Vec<i32>) -> CpuSampler {
        let mut s = CpuSampler {
            target_pid,
            mock_pid,
            tids,
            at: now_ns(),
            before: CpuWindow::default(),
        };
        s.before = s.read();
        s
    }

    pub fn stop(self) -> CpuWindow {
        let after = self.read();
        let b = &self.before;
        CpuWindow {
            secs: (now_ns() - self.at) as f64 / 1e9,
            target: after.target - b.target,
            target_threads: after
                .target_threads
                .iter()
                .map(|(n, c)| {
                    let before = b
                        .target_threads
                        .iter()
                        .find(|(m, _)| m == n)
                        .map_or(0.0, |(_, c)| *c);
                    (n.clone(), c - before)
                })
                .collect(),
            mock: after.mock - b.mock,
            generator: after.generator - b.generator,
            machine: after.machine - b.machine,
            steal: after.steal - b.steal,
        }
    }
}

/// What one scenario measured on one target.
pub struct Run {
    pub target: String,
    /// (value, unit), e.g. requests per second.
    pub rate: Option<(f64, &'static str)>,
    pub lat: Vec<Lat>,
    /// Units of work in the CPU window (requests, events) and their name.
    pub work: Option<(u64, &'static str)>,
    pub cpu: Option<CpuWindow>,
    pub peak_rss_kib: Option<u64>,
    pub problems: Problems,
    /// Scenario-specific numbers (memory per connection, ...).
    pub extra: Map<String, Value>,
}

impl Run {
    fn new(target: &Target) -> Run {
        Run {
            target: target.label.clone(),
            rate: None,
            lat: Vec::new(),
            work: None,
            cpu: None,
            peak_rss_kib: None,
            problems: Problems::default(),
            extra: Map::new(),
        }
    }

    /// Proxy log WARN/ERROR lines, non-zero error metrics, peak RSS: the end of every run.
    fn finish(&mut self, ctx: &Ctx, t: &Target) {
        self.peak_rss_kib = sys::hwm_kib(t.pid);
        self.extra
            .insert("rlimit_nofile_soft".into(), json!(sys::nofile_of(t.pid)));
        if let Some(s) = &t.service {
            let problems = s.log_problems();
            if !problems.is_empty() {
                self.extra.insert(
                    "log_warn_error".into(),
                    json!(problems.iter().take(10).collect::<Vec<_>>()),
                );
                self.extra
                    .insert("log_warn_error_lines".into(), json!(problems.len()));
            }
            let m = s.error_metrics();
            if !m.is_empty() {
                self.extra.insert("error_metrics".into(), json!(m));
            }
            if let Some(d) = s.driver() {
                self.extra.insert("driver".into(), json!(d));
            }
        }
        if let Some(n) = &t.negotiated {
            self.extra.insert("tls_negotiated".into(), json!(n));
        }
        self.extra
            .insert("mock_stats".into(), ctx.mock_of(t).stats());
    }
}

fn window(warmup: Duration, dur: Duration) -> Window {
    let t0 = now_ns() + warmup.as_nanos() as u64;
    Window {
        t0,
        t1: t0 + dur.as_nanos() as u64,
    }
}

/// Starts `perf record` on llmproxyd for `dur` when `--perf-record` asked for it.
fn perf_record(ctx: &Ctx, t: &Target, dur: Duration) -> Option<std::process::Child> {
    let dir = ctx.perf_dir.as_ref()?;
    if !matches!(t.service.as_ref()?.kind, Kind::Llmproxyd { .. }) {
        return None;
    }
    let event = std::env::var("LLMPROXY_PERF_EVENT").unwrap_or_else(|_| "cpu-clock".into());
    std::process::Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            &event,
            "-F",
            "999",
            "--call-graph",
            "dwarf,16384",
            "-p",
        ])
        .arg(t.pid.to_string())
        .arg("-o")
        .arg(dir.join(format!("{}.perf.data", t.tag)))
        .args(["--", "sleep", &format!("{:.2}", dur.as_secs_f64())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}

/// Waits for the window `w`, samples the CPU time of the target (and of the mock and the
/// generator) over it, `perf record`s the target when asked, then joins the generator.
fn measure<R>(ctx: &Ctx, t: &Target, w: Window, gen: load::Generator<R>) -> (CpuWindow, Vec<R>) {
    sleep_until_ns(w.t0);
    let cpu = CpuSampler::start(t.pid, ctx.mock_of(t).pid(), gen.tids());
    let perf = perf_record(ctx, t, Duration::from_nanos(w.t1 - w.t0));
    sleep_until_ns(w.t1);
    let cpu = cpu.stop();
    if let Some(mut p) = perf {
        let _ = p.wait();
    }
    (cpu, gen.join())
}

/// The generator threads' results as one.
fn merged<R>(outs: Vec<R>, merge: fn(&mut R, R)) -> R {
    outs.into_iter()
        .reduce(|mut a, b| {
            merge(&mut a, b);
            a
        })
        .expect("one generator thread")
}

fn sleep_until_ns(t: u64) {
    let now = now_ns();
    if t > now {
        thread::sleep(Duration::from_nanos(t - now));
    }
}

// ---------------------------------------------------------------------------------------------
// Runs

/// Closed-loop small JSON requests on `conns` connections.
pub fn rr_run(ctx: &Ctx, t: &Target, conns: usize, warmup: Duration, dur: Duration) -> Run {
    ctx.mock_of(t).reset();
    let w = window(warmup, dur);
    let dest = t.dest();
    let gen = load::spawn(&ctx.gen, move |i, n| {
        load::rr(
            dest.clone(),
            request_bytes(CHAT_BODY, &[]),
            load::share(conns, i, n),
            w,
        )
    });
    let (cpu, outs) = measure(ctx, t, w, gen);
    let out = merged(outs, load::RrOut::merge);
    let mut run = Run::new(t);
    run.rate = Some((out.requests as f64 / dur.as_secs_f64(), "req/s"));
    run.lat.push(Lat {
        key: "request",
        title: "request latency",
        hist: out.hist,
    });
    run.work = Some((out.requests, "req"));
    run.cpu = Some(cpu);
    run.problems = out.problems;
    run.extra.insert("connections".into(), json!(conns));
    run.extra.insert(
        "connections_opened_in_window".into(),
        json!(out.opened_in_window),
    );
    run.finish(ctx, t);
    run
}

/// SSE streams; TTFB, first event and per-event latency against the mock's send stamps.
pub fn sse_run(ctx: &Ctx, t: &Target) -> Run {
    let p = ctx.plan;
    ctx.mock_of(t).reset();
    let w = window(p.sse_warmup, p.sse_dur);
    let (dest, streams, tokens, gap) = (t.dest(), p.sse_streams, p.sse_tokens, p.sse_gap_ms);
    let gen = load::spawn(&ctx.gen, move |i, n| {
        let req = request_bytes(
            SSE_BODY,
            &[
                ("x-mock-tokens", tokens.to_string()),
                ("x-mock-gap-ms", gap.to_string()),
                ("x-mock-stamp", "1".into()),
            ],
        );
        let stagger = load::Stagger {
            first: (0..i).map(|j| load::share(streams, j, n)).sum(),
            total: streams,
            gap_ns: gap * 1_000_000,
        };
        load::sse(
            dest.clone(),
            req,
            load::share(streams, i, n),
            stagger,
            tokens + 1,
            w,
        )
    });
    let (cpu, outs) = measure(ctx, t, w, gen);
    let out = merged(outs, load::SseOut::merge);
    let mut run = Run::new(t);
    run.rate = Some((out.streams as f64 / p.sse_dur.as_secs_f64(), "streams/s"));
    run.lat.push(Lat {
        key: "ttfb",
        title: "time to first byte",
        hist: out.ttfb,
    });
    run.lat.push(Lat {
        key: "first_event",
        title: "time to first event",
        hist: out.first_event,
    });
    run.lat.push(Lat {
        key: "event",
        title: "per-event latency (mock send stamp -> client)",
        hist: out.event_latency,
    });
    run.work = Some((out.events_in_window, "event"));
    run.cpu = Some(cpu);
    run.problems = out.problems;
    run.extra.insert("streams".into(), json!(out.streams));
    run.extra.insert(
        "events_per_s".into(),
        json!((out.events_in_window as f64 / p.sse_dur.as_secs_f64()).round()),
    );
    run.extra
        .insert("short_streams".into(), json!(out.short_streams));
    run.extra
        .insert("unstamped_events".into(), json!(out.unstamped));
    run.finish(ctx, t);
    run
}

/// Opens `n` connections (or streams) with `hold_fn`, measures the target's RSS above its
/// baseline, releases them.
fn hold_run(ctx: &Ctx, t: &Target, n: usize, streams: bool) -> Run {
    ctx.mock_of(t).reset();
    let dest = t.dest();
    // Warm the fresh proxy up (pools, per-shard state) before the baseline.
    let warm_dest = dest.clone();
    let warm = load::spawn(
        &GenPlan {
            threads: 1,
            ..ctx.gen.clone()
        },
        move |_, _| {
            load::rr(
                warm_dest.clone(),
                request_bytes(CHAT_BODY, &[]),
                4,
                window(Duration::ZERO, Duration::from_millis(200)),
            )
        },
    );
    warm.join();
    thread::sleep(Duration::from_millis(300));
    let base_rss = sys::rss_kib(t.pid).unwrap_or(0);
    let base_fds = sys::fds(t.pid).unwrap_or(0);
    let hold = Arc::new(Hold::default());
    let started = now_ns();
    let h = hold.clone();
    let gen = load::spawn(&ctx.gen, move |i, k| {
        let share = load::share(n, i, k);
        let h = h.clone();
        let dest = dest.clone();
        async move {
            if streams {
                let req = request_bytes(
                    SSE_BODY,
                    &[
                        ("x-mock-tokens", "50".into()),
                        ("x-mock-gap-ms", "30000".into()),
                    ],
                );
                load::hold_sse(dest, req, share, h).await
            } else {
                load::hold_idle(dest, request_bytes(CHAT_BODY, &[]), share, h).await
            }
        }
    });
    let deadline = now_ns() + 120_000_000_000;
    while hold.ready.load(Ordering::SeqCst) + hold.failed.load(Ordering::SeqCst) < n
        && now_ns() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
    let open_s = (now_ns() - started) as f64 / 1e9;
    // Let the proxy finish whatever the last connections started (and the allocator settle).
    thread::sleep(Duration::from_millis(500));
    let ready = hold.ready.load(Ordering::SeqCst);
    let rss = sys::rss_kib(t.pid).unwrap_or(0);
    let fds = sys::fds(t.pid).unwrap_or(0);
    let mock_open = ctx.mock_of(t).stats()["connections_open"].as_u64();
    hold.release.store(true, Ordering::SeqCst);
    let mut problems = Problems::default();
    for p in gen.join() {
        problems.merge(p);
    }
    let mut run = Run::new(t);
    let per = if ready > 0 {
        (rss.saturating_sub(base_rss)) as f64 / ready as f64
    } else {
        f64::NAN
    };
    let what = if streams { "streams" } else { "connections" };
    run.extra.insert("held".into(), json!(ready));
    run.extra.insert("held_what".into(), json!(what));
    run.extra.insert("asked".into(), json!(n));
    run.extra
        .insert("failed".into(), json!(hold.failed.load(Ordering::SeqCst)));
    run.extra.insert("baseline_rss_kib".into(), json!(base_rss));
    run.extra.insert("loaded_rss_kib".into(), json!(rss));
    run.extra
        .insert("kib_per".into(), json!((per * 100.0).round() / 100.0));
    run.extra.insert("baseline_fds".into(), json!(base_fds));
    run.extra.insert("loaded_fds".into(), json!(fds));
    run.extra.insert(
        "open_seconds".into(),
        json!((open_s * 100.0).round() / 100.0),
    );
    run.extra
        .insert("mock_connections_open".into(), json!(mock_open));
    if !streams {
        run.extra.insert(
            "answered_again".into(),
            json!(hold.verified.load(Ordering::SeqCst)),
        );
    }
    run.problems = problems;
    run.finish(ctx, t);
    run
}

pub fn idle_run(ctx: &Ctx, t: &Target) -> Run {
    hold_run(ctx, t, ctx.plan.idle_conns, false)
}

pub fn streams_run(ctx: &Ctx, t: &Target) -> Run {
    hold_run(ctx, t, ctx.plan.open_streams, true)
}

/// A new connection per request (TLS: a full handshake each): `plan.churn_clients` clients in
/// a closed loop; rate and CPU per connection.
pub fn churn_run(ctx: &Ctx, t: &Target) -> Run {
    let p = ctx.plan;
    ctx.mock_of(t).reset();
    let w = window(p.churn_warmup, p.churn_dur);
    let (dest, clients) = (t.dest(), p.churn_clients);
    let gen = load::spawn(&ctx.gen, move |i, n| {
        load::churn(
            dest.clone(),
            request_bytes(CHAT_BODY, &[("connection", "close".into())]),
            load::share(clients, i, n),
            w,
        )
    });
    let (cpu, outs) = measure(ctx, t, w, gen);
    let out = merged(outs, load::ChurnOut::merge);
    let mut run = Run::new(t);
    run.rate = Some((out.conns as f64 / p.churn_dur.as_secs_f64(), "conn/s"));
    run.lat.push(Lat {
        key: "connect",
        title: "connect (+ TLS handshake)",
        hist: out.connect,
    });
    run.lat.push(Lat {
        key: "request",
        title: "connect -> answer read",
        hist: out.request,
    });
    run.work = Some((out.conns, "conn"));
    run.cpu = Some(cpu);
    run.problems = out.problems;
    run.extra.insert("clients".into(), json!(clients));
    run.finish(ctx, t);
    run
}
