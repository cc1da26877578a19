//! `cargo bench --bench proxy`: llmproxyd measured against the mock directly and against nginx
//! and HAProxy, every scenario direct and proxied in the same run.
//!
//! Starts the release `llmproxy-mock` (pinned) and, for each scenario and target, a fresh proxy
//! process; drives it with the load generator in `load.rs` (monoio, a few pinned threads, one
//! task per connection); reports throughput, p50/p90/p99/p99.9 (hdrhistogram), the target's CPU
//! time per request (from `/proc/PID/task/*/schedstat`), its peak RSS and, for the memory
//! scenarios, RSS per connection above its baseline. The TLS scenarios (`*_tls`) repeat a, b, c
//! and f over HTTPS listeners and are compared with their plain twins of the same run (the
//! "TLS cost" rows). Writes a table to the terminal and `perf/results/<name>.{json,txt,svg}`
//! (`latest` by default).
//!
//! Options after `cargo bench --bench proxy --`:
//! * `--quick` (or `LLMPROXY_BENCH_QUICK=1`): a short smoke run;
//! * `--compare`: also nginx and HAProxy (installed by `perf/compare.sh`); output name `compare`;
//! * `--out NAME`: output file name under `perf/results/`;
//! * `--repeat N`: run every (scenario, target) N times, interleaved, and keep for each target
//!   the run during which other processes took the least CPU (chosen by that, not by result);
//! * `--gen-threads N`: load generator threads (default: 1 per generator CPU);
//! * `--render NAME`: only redraw `perf/results/NAME.svg` from `NAME.json` (no measurement);
//! * `--perf-record DIR`: `perf record` llmproxyd in each measured window (perf/flamegraph.sh);
//! * bare words select scenarios whose id contains them (`cargo bench --bench proxy -- sse`).
//!
//! `LLMPROXY_BENCH_DRIVER=epoll|uring` is passed to llmproxyd as `--driver`;
//! `LLMPROXY_BENCH_PROXYD=path` measures that llmproxyd binary instead of this tree's.
//! Without `--bench` on the command line (`cargo test --benches`) it runs its self-checks only.

mod client;
mod load;
mod report;
mod scenarios;
mod services;
mod sys;
mod tls;

use std::io::Write;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use load::GenPlan;
use scenarios::{Ctx, Plan};
use services::{Env, Kind, Mock, Placement};

/// Enough descriptors for 10 000 client connections here and 5 000 streams x 2 in the proxy.
const NOFILE: u64 = 65_536;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        client::self_test();
        report::self_test();
        tls::self_test();
        println!("proxy bench: self-checks passed (run the bench itself with `cargo bench`)");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("LLMPROXY_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let compare = args.iter().any(|a| a == "--compare");
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let out_name =
        value_of("--out").unwrap_or_else(|| if compare { "compare" } else { "latest" }.into());
    let gen_threads: Option<usize> = value_of("--gen-threads").and_then(|v| v.parse().ok());
    let repeat: usize = value_of("--repeat")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    if let Some(name) = value_of("--render") {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("perf/results");
        let text = std::fs::read_to_string(base.join(format!("{name}.json"))).expect("read json");
        let v: Value = serde_json::from_str(&text).expect("parse json");
        let scen = v["scenarios"].as_array().cloned().unwrap_or_default();
        let header: Vec<String> = v["header"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str().map(str::to_string))
            .collect();
        let p = base.join(format!("{name}.svg"));
        std::fs::write(&p, report::svg(&scen, &header)).expect("write svg");
        println!("wrote {}", p.display());
        return;
    }
    let perf_dir = value_of("--perf-record").map(std::path::PathBuf::from);
    if let Some(d) = &perf_dir {
        std::fs::create_dir_all(d).expect("--perf-record directory");
    }
    let skip: Vec<String> = [
        "--out",
        "--gen-threads",
        "--perf-record",
        "--render",
        "--repeat",
    ]
    .iter()
    .filter_map(|f| value_of(f))
    .collect();
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-') && !skip.contains(a))
        .map(String::as_str)
        .collect();
    let driver = std::env::var("LLMPROXY_BENCH_DRIVER").ok();
    let started = Instant::now();
    // Read now: it holds the load average at the start.
    let machine = sys::machine_json();

    let (soft, hard) = sys::raise_nofile(NOFILE);
    // LLMPROXY_BENCH_NICE=-10: every process and thread started from here on (mock, proxies,
    // generator) inherits this priority, so a shared machine's other work disturbs all targets
    // alike and less.
    let nice: Option<i32> = std::env::var("LLMPROXY_BENCH_NICE")
        .ok()
        .and_then(|v| v.parse().ok());
    if let Some(n) = nice {
        // SAFETY: setpriority on the calling thread, no pointers.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
        if r != 0 {
            eprintln!(
                "LLMPROXY_BENCH_NICE={n}: setpriority failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let mut placement = Placement::new(sys::allowed_cpus());
    // LLMPROXY_BENCH_GEN_CPUS / _MOCK_CPUS=1,2: override where the generator / the mock run.
    for (var, slot) in [
        ("LLMPROXY_BENCH_GEN_CPUS", &mut placement.generator),
        ("LLMPROXY_BENCH_MOCK_CPUS", &mut placement.mock),
    ] {
        if let Ok(v) = std::env::var(var) {
            let cpus: Vec<usize> = v.split(',').filter_map(|c| c.trim().parse().ok()).collect();
            if !cpus.is_empty() {
                *slot = cpus;
            }
        }
    }
    let gen = GenPlan {
        threads: gen_threads.unwrap_or(placement.generator.len()).max(1),
        cpus: placement.generator.clone(),
        epoll: std::env::var("LLMPROXY_BENCH_GEN_DRIVER").is_ok_and(|v| v == "epoll"),
    };
    let mut proxies = vec![Kind::Llmproxyd { shards: 1 }];
    let mut missing = Vec::new();
    if compare {
        for k in [Kind::Nginx, Kind::Haproxy] {
            if k.binary().is_some() {
                proxies.push(k);
            } else {
                missing.push(k.label());
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("llmproxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let _cleanup = RemoveOnDrop(dir.clone());
    let mock = Mock::start(&dir, &placement.mock);
    let tls_setup = tls::TlsSetup::new(&dir);
    let plan = Plan::new(quick);
    let all = scenarios::all(&plan, &proxies);
    let chosen: Vec<_> = all
        .iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.id.contains(f)))
        .collect();
    let any_tls = chosen.iter().any(|s| s.tls);
    // "direct" of the TLS scenarios: the same mock serving HTTPS, on the mock's CPU.
    let tls_mock = any_tls.then(|| Mock::start_tls(&dir, &placement.mock, &tls_setup));

    let mut header = vec![
        format!(
            "{} CPUs ({}), load average {:.2} at start{}",
            placement.cpus.len(),
            sys::cpu_model(),
            sys::loadavg(),
            if quick { ", QUICK run" } else { "" }
        ),
        format!(
            "placement: {}; load generator: {} monoio thread(s), one task per connection",
            placement.describe(),
            gen.threads
        ),
        format!(
            "RLIMIT_NOFILE soft {soft} / hard {hard} (children inherit it){}; proxies: {}",
            nice.map_or(String::new(), |n| format!(
                ", nice {n} for everything under test"
            )),
            proxies
                .iter()
                .map(|k| format!("{} ({})", k.label(), k.version()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ];
    if repeat > 1 {
        header.push(format!(
            "--repeat {repeat}: each (scenario, target) ran {repeat} times interleaved; kept: the run during which other processes took the least CPU"
        ));
    }
    if any_tls {
        header.push(tls::describe());
    }
    if !missing.is_empty() {
        header.push(format!(
            "not installed, skipped: {} (perf/compare.sh installs them)",
            missing.join(", ")
        ));
    }
    for l in &header {
        println!("{l}");
    }

    let ctx = Ctx {
        env: Env {
            dir: &dir,
            mock_port: mock.port(),
            placement: &placement,
            driver: driver.as_deref(),
            nofile: soft,
            proxy_cpu: None,
            tls: None,
        },
        mock: &mock,
        tls: &tls_setup,
        tls_mock: tls_mock.as_ref(),
        plan: &plan,
        gen,
        perf_dir,
    };
    let steps: usize = chosen.iter().map(|s| s.targets.len()).sum::<usize>() * repeat;
    let total_s: f64 = chosen
        .iter()
        .map(|s| s.secs * s.targets.len() as f64)
        .sum::<f64>()
        * repeat as f64;
    println!("{} scenario runs, about {:.0} s", steps, total_s);
    let mut step = 0;
    let mut results: Vec<Value> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    for s in chosen {
        let mut best: Vec<Option<(f64, Value)>> = vec![None; s.targets.len()];
        for rep in 0..repeat {
            for (ti, &spec) in s.targets.iter().enumerate() {
                step += 1;
                print!(
                    "[{step:>2}/{steps}] {:<15} {:<14} (~{:.0} s, {:.0} s elapsed) ... ",
                    s.id,
                    spec.label(),
                    s.secs,
                    started.elapsed().as_secs_f64()
                );
                let _ = std::io::stdout().flush();
                let j = match ctx.start(spec, s.same_core, s.tls) {
                    Ok(mut t) => {
                        t.tag = format!("{}-{}", s.id, t.label);
                        let run = (s.run)(&ctx, &t);
                        drop(t);
                        report::run_json(&run)
                    }
                    Err(e) => json!({"target": spec.label(), "skipped": e}),
                };
                let other = j["cpu"]["cores_busy"]["other"].as_f64().unwrap_or(0.0);
                match j.get("skipped") {
                    Some(e) => println!("skipped: {}", e.as_str().unwrap_or("")),
                    None if repeat > 1 => {
                        println!("{} (other processes {other:.2} cores)", one_line(&j))
                    }
                    None => println!("{}", one_line(&j)),
                }
                let keep = match &best[ti] {
                    None => true,
                    Some((o, prev)) => {
                        prev.get("skipped").is_some() || (j.get("skipped").is_none() && other < *o)
                    }
                };
                if keep {
                    let mut j = j;
                    if repeat > 1 {
                        j["kept_of_repeats"] = json!({"repeat": rep + 1, "of": repeat});
                    }
                    best[ti] = Some((other, j));
                }
            }
        }
        let runs: Vec<Value> = best.into_iter().flatten().map(|(_, j)| j).collect();
        let sj = report::scenario_json(s, runs);
        let t = report::table(&sj);
        for l in &t {
            println!("{l}");
        }
        lines.extend(t);
        results.push(sj);
    }
    let tl = report::tls_cost(&mut results);
    for l in &tl {
        println!("{l}");
    }
    lines.extend(tl);
    let verdicts = report::verdicts(&results);
    let vl = report::verdict_lines(&verdicts);
    for l in &vl {
        println!("{l}");
    }
    lines.extend(vl);
    let load_end = sys::loadavg();
    let footer = format!(
        "load average {load_end:.2} at the end; {:.0} s in all. CPU/unit is the target's CPU time per request or event (for \"direct\": the mock's); /core = work per CPU-second of the target",
        started.elapsed().as_secs_f64()
    );
    println!("\n{footer}");

    let out = json!({
        "generated_unix": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "quick": quick,
        "compare": compare,
        "repeat": repeat,
        "git_commit": sys::git_commit(),
        "machine": machine,
        "loadavg_1m_at_end": load_end,
        "setup": {
            "placement": placement.describe(),
            "generator_threads": ctx.gen.threads,
            "generator_cpus": ctx.gen.cpus,
            "rlimit_nofile": [soft, hard],
            "proxies": proxies.iter().map(|k| json!({"label": k.label(), "version": k.version()})).collect::<Vec<_>>(),
            "plan": format!("{plan:?}"),
        },
        "header": header,
        "scenarios": results,
        "targets": verdicts.iter().map(|(t, m, ok)| json!({"target": t, "measured": m, "met": ok})).collect::<Vec<_>>(),
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("perf/results");
    std::fs::create_dir_all(&base).expect("create perf/results");
    let write = |ext: &str, text: String| {
        let p = base.join(format!("{out_name}.{ext}"));
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    };
    let mut txt = header.join("\n");
    txt.push('\n');
    txt.push_str(&lines.join("\n"));
    txt.push_str(&format!("\n\n{footer}\n"));
    let p1 = write("json", serde_json::to_string_pretty(&out).unwrap() + "\n");
    let p2 = write("txt", txt);
    let p3 = write("svg", report::svg(&results, &header));
    println!("wrote {}, {}, {}", p1.display(), p2.display(), p3.display());
}

/// A short summary of one run for the progress line.
fn one_line(r: &Value) -> String {
    let mut s = String::new();
    if let Some(k) = r.get("kib_per") {
        s = format!("{} held, {} KiB each", r["held"], k);
    } else if let Some(v) = r["rate"]["value"].as_f64() {
        s = format!("{v:.0} {}", r["rate"]["unit"].as_str().unwrap_or(""));
        if let Some(l) = ["request", "event"]
            .iter()
            .find_map(|k| r["latency_us"].get(*k).map(|v| (k, v)))
        {
            s.push_str(&format!(
                ", {} p50 {} p99 {}",
                l.0,
                report::fmt_us(&l.1["p50"]),
                report::fmt_us(&l.1["p99"])
            ));
        }
    }
    let e = r["problems"]["errors"].as_u64().unwrap_or(0)
        + r["problems"]["non_2xx_total"].as_u64().unwrap_or(0);
    if e > 0 {
        s.push_str(&format!(", {e} errors"));
    }
    s
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
