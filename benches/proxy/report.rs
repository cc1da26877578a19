//! Results out: JSON per run and per scenario, the terminal table, the TLS cost rows (each TLS
//! scenario against its plain twin), the targets of the issue (measured, met or not), and an
//! SVG chart written by hand (no plotting dependency).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::scenarios::{CpuWindow, Run, Scenario};

pub const PCTS: [(&str, f64); 4] = [
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p99.9", 0.999),
];

fn r1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn r2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Percentiles in µs (0.1 µs resolution).
pub fn pct_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let us = |ns: u64| r1(ns as f64 / 1000.0);
    let mut m = Map::new();
    m.insert("count".into(), json!(h.len()));
    m.insert("mean".into(), json!(r1(h.mean() / 1000.0)));
    for (k, q) in PCTS {
        m.insert(k.into(), json!(us(h.value_at_quantile(q))));
    }
    m.insert("max".into(), json!(us(h.max())));
    Value::Object(m)
}

/// Cores the rest of the machine kept busy during the window (other processes: on a shared
/// machine, the disturbance). For "direct" the target is the mock: not counted twice.
pub fn other_cores(c: &CpuWindow, direct: bool) -> f64 {
    let ours = c.target + c.generator + if direct { 0.0 } else { c.mock };
    ((c.machine - ours) / c.secs).max(0.0)
}

fn cpu_json(
    c: &CpuWindow,
    work: Option<(u64, &str)>,
    rate_unit: Option<&str>,
    direct: bool,
) -> Value {
    let busy = |s: f64| r2(s / c.secs);
    let mut m = Map::new();
    m.insert("window_s".into(), json!(r2(c.secs)));
    m.insert("target_s".into(), json!(c.target));
    m.insert(
        "target_threads_s".into(),
        Value::Object(
            c.target_threads
                .iter()
                .map(|(n, s)| (n.clone(), json!(s)))
                .collect(),
        ),
    );
    m.insert("mock_s".into(), json!(c.mock));
    m.insert("generator_s".into(), json!(c.generator));
    m.insert("machine_s".into(), json!(c.machine));
    m.insert("steal_s".into(), json!(c.steal));
    m.insert(
        "cores_busy".into(),
        json!({
            "target": busy(c.target),
            "mock": busy(c.mock),
            "generator": busy(c.generator),
            "machine": busy(c.machine),
            "steal": busy(c.steal),
            "other": r2(other_cores(c, direct)),
        }),
    );
    if let Some((n, unit)) = work {
        if n > 0 {
            m.insert(
                format!("target_us_per_{unit}"),
                json!(r2(c.target * 1e6 / n as f64)),
            );
            let shards: Map<String, Value> = c
                .target_threads
                .iter()
                .filter(|(t, _)| t.starts_with("shard-"))
                .map(|(t, s)| (t.clone(), json!(r2(s * 1e6 / n as f64))))
                .collect();
            if !shards.is_empty() {
                m.insert(format!("shard_us_per_{unit}"), Value::Object(shards));
            }
            if c.target > 0.0 {
                if let Some(ru) = rate_unit {
                    // Work per CPU-second of the target: its throughput per core it keeps busy.
                    m.insert(
                        format!("per_core_{ru}"),
                        json!((n as f64 / c.target).round()),
                    );
                }
            }
        }
    }
    Value::Object(m)
}

pub fn run_json(r: &Run) -> Value {
    let mut m = Map::new();
    m.insert("target".into(), json!(r.target));
    if let Some((v, u)) = r.rate {
        m.insert("rate".into(), json!({"value": r1(v), "unit": u}));
    }
    let mut lat = Map::new();
    let mut titles = Map::new();
    for l in &r.lat {
        lat.insert(l.key.into(), pct_json(&l.hist));
        titles.insert(l.key.into(), json!(l.title));
    }
    if !lat.is_empty() {
        m.insert("latency_us".into(), Value::Object(lat));
        m.insert("latency_titles".into(), Value::Object(titles));
    }
    if let Some(c) = &r.cpu {
        m.insert(
            "cpu".into(),
            cpu_json(
                c,
                r.work,
                r.rate.map(|(_, u)| u.trim_end_matches("/s")),
                r.target == "direct",
            ),
        );
    }
    if let Some((n, u)) = r.work {
        m.insert("work".into(), json!({"count": n, "unit": u}));
    }
    m.insert("peak_rss_kib".into(), json!(r.peak_rss_kib));
    m.insert("problems".into(), r.problems.json());
    for (k, v) in &r.extra {
        m.insert(k.clone(), v.clone());
    }
    Value::Object(m)
}

/// Proxied minus direct, per latency key and percentile; proxied/direct rate.
pub fn vs_direct(runs: &[Value]) -> Value {
    let Some(d) = runs.iter().find(|r| r["target"] == "direct") else {
        return Value::Null;
    };
    let mut out = Map::new();
    for r in runs
        .iter()
        .filter(|r| r["target"] != "direct" && r.get("skipped").is_none())
    {
        let mut added = Map::new();
        if let Some(lat) = r["latency_us"].as_object() {
            for (key, p) in lat {
                let mut m = Map::new();
                for (k, _) in PCTS {
                    if let (Some(a), Some(b)) = (p[k].as_f64(), d["latency_us"][key][k].as_f64()) {
                        m.insert(k.into(), json!(r1(a - b)));
                    }
                }
                added.insert(key.clone(), Value::Object(m));
            }
        }
        let ratio = match (r["rate"]["value"].as_f64(), d["rate"]["value"].as_f64()) {
            (Some(a), Some(b)) if b > 0.0 => json!(r2(a / b)),
            _ => Value::Null,
        };
        out.insert(
            r["target"].as_str().unwrap_or("?").into(),
            json!({"rate_ratio": ratio, "added_us": added}),
        );
    }
    Value::Object(out)
}

pub fn scenario_json(s: &Scenario, runs: Vec<Value>) -> Value {
    json!({
        "id": s.id,
        "title": s.title,
        "description": s.description,
        "tls": s.tls,
        "plain_twin": s.plain,
        "vs_direct": vs_direct(&runs),
        "runs": runs,
    })
}

// ---------------------------------------------------------------------------------------------
// Terminal table

pub fn fmt_us(v: &Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(us) if us.abs() >= 10_000.0 => format!("{:.1}ms", us / 1000.0),
        Some(us) if us.abs() >= 1000.0 => format!("{:.2}ms", us / 1000.0),
        Some(us) if us.abs() >= 100.0 => format!("{us:.0}µs"),
        Some(us) => format!("{us:.1}µs"),
    }
}

fn fmt_rate(v: &Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
    }
}

fn fmt_kib(v: &Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(k) if k >= 10240.0 => format!("{:.0}MiB", k / 1024.0),
        Some(k) if k >= 1024.0 => format!("{:.1}MiB", k / 1024.0),
        Some(k) => format!("{k:.0}KiB"),
    }
}

fn errs(r: &Value) -> String {
    let p = &r["problems"];
    format!(
        "{}/{}",
        p["errors"].as_u64().unwrap_or(0),
        p["non_2xx_total"].as_u64().unwrap_or(0)
    )
}

/// The table for one scenario.
pub fn table(s: &Value) -> Vec<String> {
    let mut out = vec![String::new(), s["title"].as_str().unwrap_or("").to_string()];
    let all = s["runs"].as_array().cloned().unwrap_or_default();
    for r in all.iter().filter(|r| r.get("skipped").is_some()) {
        out.push(format!(
            "  {:<14} skipped: {}",
            r["target"].as_str().unwrap_or("?"),
            r["skipped"]
                .as_str()
                .unwrap_or("")
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    let runs: Vec<Value> = all
        .into_iter()
        .filter(|r| r.get("skipped").is_none())
        .collect();
    if runs.iter().any(|r| r.get("kib_per").is_some()) {
        out.push(format!(
            "  {:<14} {:>7} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9}",
            "target",
            "held",
            "base RSS",
            "RSS held",
            "KiB/each",
            "fds +",
            "open s",
            "again",
            "err/non2xx",
            "peak RSS"
        ));
        for r in &runs {
            let fds =
                r["loaded_fds"].as_i64().unwrap_or(0) - r["baseline_fds"].as_i64().unwrap_or(0);
            out.push(format!(
                "  {:<14} {:>7} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>10} {:>9}",
                r["target"].as_str().unwrap_or("?"),
                r["held"].to_string(),
                fmt_kib(&r["baseline_rss_kib"]),
                fmt_kib(&r["loaded_rss_kib"]),
                r["kib_per"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.2}")),
                fds,
                r["open_seconds"].to_string(),
                r.get("answered_again")
                    .map_or("-".into(), |v| v.to_string()),
                errs(r),
                fmt_kib(&r["peak_rss_kib"]),
            ));
        }
        return out;
    }
    let unit = runs
        .first()
        .and_then(|r| r["rate"]["unit"].as_str())
        .unwrap_or("rate")
        .to_string();
    let work_unit = runs
        .first()
        .and_then(|r| r["work"]["unit"].as_str())
        .unwrap_or("req")
        .to_string();
    let per_core_key = format!("per_core_{}", unit.trim_end_matches("/s"));
    out.push(format!(
        "  {:<14} {:<12} {:>9} {:>8} {:>8} {:>8} {:>8}  {:>9} {:>9} {:>10} {:>8}",
        "target",
        "latency",
        unit,
        "p50",
        "p90",
        "p99",
        "p99.9",
        "err/non2xx",
        format!("CPU/{work_unit}"),
        format!("{unit}/core"),
        "peak RSS"
    ));
    for r in &runs {
        let keys: Vec<String> = r["latency_us"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        // Keep the run's order (ttfb, first_event, event) rather than the map's.
        let order = ["connect", "request", "ttfb", "first_event", "event"];
        let mut keys: Vec<&str> = order
            .iter()
            .copied()
            .filter(|k| keys.iter().any(|x| x == k))
            .collect();
        if keys.is_empty() {
            keys.push("-");
        }
        for (i, k) in keys.iter().enumerate() {
            let l = &r["latency_us"][*k];
            let first = i == 0;
            let cpu = r["cpu"][format!("target_us_per_{work_unit}")].as_f64();
            out.push(format!(
                "  {:<14} {:<12} {:>9} {:>8} {:>8} {:>8} {:>8}  {:>10} {:>9} {:>10} {:>8}",
                if first {
                    r["target"].as_str().unwrap_or("?")
                } else {
                    ""
                },
                k,
                if first {
                    fmt_rate(&r["rate"]["value"])
                } else {
                    String::new()
                },
                fmt_us(&l["p50"]),
                fmt_us(&l["p90"]),
                fmt_us(&l["p99"]),
                fmt_us(&l["p99.9"]),
                if first { errs(r) } else { String::new() },
                if first {
                    cpu.map_or("-".into(), |v| format!("{v:.2}µs"))
                } else {
                    String::new()
                },
                if first {
                    fmt_rate(&r["cpu"][&per_core_key])
                } else {
                    String::new()
                },
                if first {
                    fmt_kib(&r["peak_rss_kib"])
                } else {
                    String::new()
                },
            ));
        }
    }
    if let Some(vs) = s["vs_direct"].as_object() {
        for (t, v) in vs {
            let mut line = format!(
                "  {:<14} vs direct: {} {:.2}x",
                t,
                unit,
                v["rate_ratio"].as_f64().unwrap_or(f64::NAN)
            );
            if let Some(a) = v["added_us"].as_object() {
                for (k, p) in a {
                    let _ = write!(
                        line,
                        "; {k} added p50 {} p99 {} p99.9 {}",
                        fmt_us(&p["p50"]),
                        fmt_us(&p["p99"]),
                        fmt_us(&p["p99.9"])
                    );
                }
            }
            out.push(line);
        }
    }
    for r in &runs {
        let c = &r["cpu"]["cores_busy"];
        let mut line = format!(
            "  {:<14} cores busy: target {:.2}, mock {:.2}, generator {:.2}, other processes {:.2}; machine {:.2} (steal {:.2})",
            r["target"].as_str().unwrap_or("?"),
            c["target"].as_f64().unwrap_or(f64::NAN),
            c["mock"].as_f64().unwrap_or(f64::NAN),
            c["generator"].as_f64().unwrap_or(f64::NAN),
            c["other"].as_f64().unwrap_or(f64::NAN),
            c["machine"].as_f64().unwrap_or(f64::NAN),
            c["steal"].as_f64().unwrap_or(f64::NAN),
        );
        if let Some(sh) = r["cpu"][format!("shard_us_per_{work_unit}")].as_object() {
            if sh.len() > 1 {
                let _ = write!(line, "; CPU/{work_unit} per shard:");
                for (n, v) in sh {
                    let _ = write!(line, " {n} {:.2}µs", v.as_f64().unwrap_or(f64::NAN));
                }
            }
        }
        if let Some(x) = r.get("short_streams").filter(|v| v.as_u64() != Some(0)) {
            let _ = write!(line, "; SHORT STREAMS {x}");
        }
        if let Some(x) = r.get("unstamped_events").filter(|v| v.as_u64() != Some(0)) {
            let _ = write!(line, "; unstamped events {x}");
        }
        out.push(line);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// TLS cost: each TLS scenario against its plain twin, target by target, same run

/// TLS run against plain run of the same target: throughput ratio, CPU per unit (both, added,
/// ratio), added latency per key and percentile, peak RSS.
pub fn tls_vs_plain(tls: &Value, plain: &Value) -> Value {
    let f = |v: &Value| v.as_f64();
    let mut m = Map::new();
    if let (Some(a), Some(b)) = (f(&tls["rate"]["value"]), f(&plain["rate"]["value"])) {
        if b > 0.0 {
            m.insert("rate_ratio".into(), json!(r2(a / b)));
        }
    }
    let unit = tls["work"]["unit"].as_str().unwrap_or("req");
    let key = format!("target_us_per_{unit}");
    if let (Some(a), Some(b)) = (f(&tls["cpu"][&key]), f(&plain["cpu"][&key])) {
        m.insert(
            "cpu_us".into(),
            json!({"plain": b, "tls": a, "added": r2(a - b), "ratio": if b > 0.0 { json!(r2(a / b)) } else { Value::Null }}),
        );
    }
    let mut added = Map::new();
    if let Some(lat) = tls["latency_us"].as_object() {
        for (k, p) in lat {
            let mut pm = Map::new();
            for (q, _) in PCTS {
                if let (Some(a), Some(b)) = (f(&p[q]), f(&plain["latency_us"][k][q])) {
                    pm.insert(q.into(), json!(r1(a - b)));
                }
            }
            added.insert(k.clone(), Value::Object(pm));
        }
    }
    m.insert("added_latency_us".into(), Value::Object(added));
    m.insert(
        "peak_rss_kib".into(),
        json!({"plain": plain["peak_rss_kib"], "tls": tls["peak_rss_kib"]}),
    );
    if let (Some(a), Some(b)) = (f(&tls["kib_per"]), f(&plain["kib_per"])) {
        m.insert(
            "kib_per".into(),
            json!({"plain": b, "tls": a, "added": r2(a - b)}),
        );
    }
    Value::Object(m)
}

/// Fills `tls_vs_plain` into every TLS scenario whose plain twin ran, and returns the rows.
pub fn tls_cost(scen: &mut [Value]) -> Vec<String> {
    let mut out = Vec::new();
    let snapshot: Vec<Value> = scen.to_vec();
    for s in scen.iter_mut() {
        let Some(twin) = s["plain_twin"].as_str().map(str::to_string) else {
            continue;
        };
        if out.is_empty() {
            out.push(String::new());
            out.push(
                "TLS cost: each TLS scenario against its plain twin, same target, same run (TLS - plain; x = TLS / plain)"
                    .to_string(),
            );
        }
        let Some(p) = snapshot.iter().find(|x| x["id"] == twin.as_str()) else {
            out.push(format!(
                "  {}: plain twin {twin} not run (choose both)",
                s["id"].as_str().unwrap_or("?")
            ));
            continue;
        };
        out.push(format!(
            "  {} vs {twin}",
            s["title"].as_str().unwrap_or("?")
        ));
        let mut m = Map::new();
        for r in s["runs"].as_array().into_iter().flatten() {
            if r.get("skipped").is_some() {
                continue;
            }
            let t = r["target"].as_str().unwrap_or("?");
            let Some(pr) = p["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["target"] == t && x.get("skipped").is_none())
            else {
                continue;
            };
            let v = tls_vs_plain(r, pr);
            let unit = r["rate"]["unit"].as_str().unwrap_or("");
            let work = r["work"]["unit"].as_str().unwrap_or("req");
            let mut line = format!("    {t:<14}");
            if let Some(x) = v["rate_ratio"].as_f64() {
                let _ = write!(line, " {unit} {x:.2}x");
            }
            let k = &v["kib_per"];
            if let (Some(a), Some(b)) = (k["tls"].as_f64(), k["plain"].as_f64()) {
                let what = r["held_what"].as_str().unwrap_or("connection");
                let _ = write!(
                    line,
                    " RSS per {} {b:.2} -> {a:.2} KiB ({:+.2} KiB)",
                    what.trim_end_matches('s'),
                    a - b
                );
            }
            let c = &v["cpu_us"];
            if let (Some(a), Some(b)) = (c["tls"].as_f64(), c["plain"].as_f64()) {
                let _ = write!(
                    line,
                    "; CPU/{work} {b:.2} -> {a:.2}µs ({:+.2}µs, {:.2}x)",
                    a - b,
                    c["ratio"].as_f64().unwrap_or(f64::NAN)
                );
            }
            for k in ["connect", "request", "ttfb", "event"] {
                let a = &v["added_latency_us"][k];
                if a.is_object() {
                    let _ = write!(
                        line,
                        "; {k} p50 {} p99 {}",
                        fmt_signed(&a["p50"]),
                        fmt_signed(&a["p99"])
                    );
                }
            }
            let _ = write!(
                line,
                "; peak RSS {} -> {}",
                fmt_kib(&pr["peak_rss_kib"]),
                fmt_kib(&r["peak_rss_kib"])
            );
            out.push(line);
            m.insert(t.into(), v);
        }
        s["tls_vs_plain"] = Value::Object(m);
    }
    out
}

fn fmt_signed(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 0.0 => format!("+{}", fmt_us(v)),
        Some(_) => fmt_us(v),
        None => "-".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Targets of the issue

fn find_run<'a>(scen: &'a [Value], id: &str, target: &str) -> Option<&'a Value> {
    scen.iter()
        .find(|s| s["id"] == id)?
        .get("runs")?
        .as_array()?
        .iter()
        .find(|r| r["target"] == target && r.get("skipped").is_none())
}

fn added(scen: &[Value], id: &str, key: &str, p: &str) -> Option<f64> {
    scen.iter().find(|s| s["id"] == id)?["vs_direct"]["llmproxyd"]["added_us"][key][p].as_f64()
}

/// (target, measured, met) rows.
pub fn verdicts(scen: &[Value]) -> Vec<(String, String, Option<bool>)> {
    let mut v = Vec::new();
    let us = |x: f64| fmt_us(&json!(x));
    // (a)
    let ours = find_run(scen, "a_json_64c", "llmproxyd");
    for (other, want) in [("nginx", 1.5), ("haproxy", 1.8)] {
        let row = format!("(a) throughput per proxy core >= {want}x {other}");
        match (ours, find_run(scen, "a_json_64c", other)) {
            (Some(o), Some(x)) => {
                let pc = |r: &Value| r["cpu"]["per_core_req"].as_f64().unwrap_or(f64::NAN);
                let raw = |r: &Value| r["rate"]["value"].as_f64().unwrap_or(f64::NAN);
                let ratio = pc(o) / pc(x);
                v.push((
                    row,
                    format!(
                        "{ratio:.2}x per proxy CPU-second ({:.0} vs {:.0} req/s/core); raw throughput {:.2}x ({:.0} vs {:.0} req/s)",
                        pc(o),
                        pc(x),
                        raw(o) / raw(x),
                        raw(o),
                        raw(x)
                    ),
                    Some(ratio >= want),
                ));
            }
            _ => v.push((
                row,
                format!("not measured (run perf/compare.sh for {other})"),
                None,
            )),
        }
    }
    match (ours, find_run(scen, "a_json_64c", "nginx")) {
        (Some(o), Some(n)) => {
            let a = o["latency_us"]["request"]["p99"]
                .as_f64()
                .unwrap_or(f64::NAN);
            let b = n["latency_us"]["request"]["p99"]
                .as_f64()
                .unwrap_or(f64::NAN);
            v.push((
                "(a) p99 <= nginx's".into(),
                format!("{} vs {}", us(a), us(b)),
                Some(a <= b),
            ));
        }
        _ => v.push((
            "(a) p99 <= nginx's".into(),
            "not measured (perf/compare.sh)".into(),
            None,
        )),
    }
    // (b)
    for (p, lim) in [("p50", 15.0), ("p99", 50.0)] {
        let row = format!("(b) added latency {p} <= {lim} µs");
        match added(scen, "b_seq_1c", "request", p) {
            Some(x) => v.push((row, us(x), Some(x <= lim))),
            None => v.push((row, "not measured".into(), None)),
        }
    }
    for (p, lim) in [("p50", 15.0), ("p99", 50.0)] {
        let row = format!("(b') same, proxy on the generator's core: {p} <= {lim} µs");
        match added(scen, "b1_seq_1c_same_core", "request", p) {
            Some(x) => v.push((row, us(x), Some(x <= lim))),
            None => v.push((row, "not measured".into(), None)),
        }
    }
    // (c)
    for (key, lim, name) in [
        ("event", 50.0, "per-event latency"),
        ("ttfb", 100.0, "time to first byte"),
    ] {
        let row = format!("(c) added {name} p99 <= {lim} µs");
        match added(scen, "c_sse", key, "p99") {
            Some(x) => v.push((row, us(x), Some(x <= lim))),
            None => v.push((row, "not measured".into(), None)),
        }
    }
    // (d)
    for (id, lim, name) in [
        ("d_idle_conns", 8.0, "idle keep-alive connection"),
        ("d_open_streams", 32.0, "open SSE stream"),
    ] {
        let row = format!("(d) RSS per {name} <= {lim} KiB");
        match find_run(scen, id, "llmproxyd") {
            Some(r) => {
                let k = r["kib_per"].as_f64().unwrap_or(f64::NAN);
                let held = r["held"].as_u64().unwrap_or(0);
                v.push((row, format!("{k:.2} KiB ({held} held)"), Some(k <= lim)));
            }
            None => v.push((row, "not measured".into(), None)),
        }
    }
    // (e)
    match (
        find_run(scen, "e_shards", "llmproxyd"),
        find_run(scen, "e_shards", "llmproxyd-2sh"),
    ) {
        (Some(one), Some(two)) => {
            let raw = |r: &Value| r["rate"]["value"].as_f64().unwrap_or(f64::NAN);
            let cpu = |r: &Value| r["cpu"]["target_us_per_req"].as_f64().unwrap_or(f64::NAN);
            let scale = raw(two) / raw(one);
            let shards = two["cpu"]["shard_us_per_req"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {:.2}µs", v.as_f64().unwrap_or(f64::NAN)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let flat = cpu(two) <= cpu(one) * 1.15;
            v.push((
                "(e) near-linear scaling, else flat per-shard CPU cost".into(),
                format!(
                    "2 shards {scale:.2}x the throughput of 1 ({:.0} vs {:.0} req/s); proxy CPU/req {:.2}µs (2 shards: {shards}) vs {:.2}µs with 1",
                    raw(two),
                    raw(one),
                    cpu(two),
                    cpu(one)
                ),
                Some(scale >= 1.8 || flat),
            ));
        }
        _ => v.push(("(e) scaling".into(), "not measured".into(), None)),
    }
    for (t, m, _) in &mut v {
        let id = match t.get(..3) {
            Some("(a)") => "a_json_64c",
            Some("(b)") => "b_seq_1c",
            Some("(b'") => "b1_seq_1c_same_core",
            Some("(c)") => "c_sse",
            Some("(e)") => "e_shards",
            _ => continue,
        };
        if m.starts_with('-') {
            m.push_str(" (below zero: the direct run was the more disturbed one)");
        }
        if let Some(o) = disturbance(scen, id).filter(|o| *o >= 0.1) {
            let _ = write!(m, " [other processes took up to {o:.2} cores]");
        }
    }
    v
}

/// The most CPU other processes took during any measured window of scenario `id`.
pub fn disturbance(scen: &[Value], id: &str) -> Option<f64> {
    scen.iter().find(|s| s["id"] == id)?["runs"]
        .as_array()?
        .iter()
        .filter_map(|r| r["cpu"]["cores_busy"]["other"].as_f64())
        .reduce(f64::max)
}

pub fn verdict_lines(v: &[(String, String, Option<bool>)]) -> Vec<String> {
    let mut out = vec![String::new(), "targets (issue 4), llmproxyd:".to_string()];
    for (t, m, ok) in v {
        let ok = match ok {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "-",
        };
        out.push(format!("  {t:<58} {ok:<8} {m}"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// SVG chart

fn color(target: &str) -> &'static str {
    match target {
        "direct" => "#9e9e9e",
        "llmproxyd" => "#e6550d",
        "llmproxyd-2sh" => "#a63603",
        "nginx" => "#31a354",
        "haproxy" => "#3182bd",
        _ => "#756bb1",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum and tick step for values up to `max`.
fn nice(max: f64) -> (f64, f64) {
    if max.is_nan() || max <= 0.0 {
        return (1.0, 0.25);
    }
    let raw = max / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

/// Compact µs for chart labels: 3 significant digits at most.
fn compact_us(us: f64) -> String {
    match us {
        x if x >= 10_000.0 => format!("{:.0}ms", x / 1000.0),
        x if x >= 1000.0 => format!("{:.1}ms", x / 1000.0),
        x if x >= 10.0 => format!("{x:.0}µs"),
        x => format!("{x:.1}µs"),
    }
}

fn short(v: f64, unit: &str) -> String {
    match unit {
        "µs" => compact_us(v),
        "KiB" => format!("{v:.1}"),
        _ if v >= 10_000.0 => format!("{:.0}k", v / 1000.0),
        _ if v >= 1000.0 => format!("{:.1}k", v / 1000.0),
        _ => format!("{v:.0}"),
    }
}

/// One panel of grouped bars: groups (x labels) of (target, value).
struct Panel {
    title: String,
    unit: &'static str,
    groups: Vec<(String, Vec<(String, f64)>)>,
    limit: Option<(f64, String)>,
    /// Logarithmic y axis (latencies that span decades).
    log: bool,
}

fn panel_svg(out: &mut String, p: &Panel, x0: f64, y0: f64, w: f64, h: f64) {
    let (left, top, bottom) = (56.0, 26.0, 34.0);
    let pw = w - left - 10.0;
    let ph = h - top - bottom;
    let mut max = p
        .groups
        .iter()
        .flat_map(|g| g.1.iter().map(|b| b.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    if let Some((l, _)) = &p.limit {
        max = max.max(*l * 1.1);
    }
    let min_pos = p
        .groups
        .iter()
        .flat_map(|g| g.1.iter().map(|b| b.1))
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    // Linear: 0..nice max. Log: whole decades around the values.
    let (lo, hi, step) = if p.log && min_pos.is_finite() {
        (
            min_pos.log10().floor(),
            max.log10().ceil().max(min_pos.log10().floor() + 1.0),
            1.0,
        )
    } else {
        let (m, s) = nice(max);
        (0.0, m, s)
    };
    let log = p.log && min_pos.is_finite();
    let _ = writeln!(
        out,
        r##"<g transform="translate({x0},{y0})"><rect x="0" y="0" width="{w}" height="{h}" fill="#fff" stroke="#ddd"/><text x="10" y="17" font-size="13" font-weight="bold">{}</text>"##,
        esc(&p.title)
    );
    let y = |v: f64| {
        let f = if log {
            (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo)
        } else {
            v / hi
        };
        top + ph - f * ph
    };
    let mut t = lo;
    while t <= hi + step / 2.0 {
        let v = if log { 10f64.powf(t) } else { t };
        let _ = writeln!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end" fill="#555">{}</text>"##,
            left + pw,
            y(v),
            y(v),
            left - 4.0,
            y(v) + 3.5,
            esc(&short(v, p.unit))
        );
        t += step;
    }
    let _ = writeln!(
        out,
        r##"<text x="12" y="{:.1}" font-size="10" fill="#555" transform="rotate(-90 12 {:.1})" text-anchor="middle">{}{}</text>"##,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(p.unit),
        if log { " (log scale)" } else { "" }
    );
    let ng = p.groups.len().max(1) as f64;
    let gw = pw / ng;
    for (gi, (label, bars)) in p.groups.iter().enumerate() {
        let nb = bars.len().max(1) as f64;
        let bw = (gw * 0.8 / nb).min(48.0);
        let gx = left + gw * gi as f64 + (gw - bw * nb) / 2.0;
        for (bi, (target, v)) in bars.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let bx = gx + bw * bi as f64;
            let by = y(v.max(0.0));
            let _ = writeln!(
                out,
                r##"<rect x="{bx:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {}</title></rect>"##,
                (bw - 2.0).max(1.0),
                (top + ph - by).max(0.0),
                color(target),
                esc(target),
                esc(label),
                esc(&short(*v, p.unit))
            );
            let label = esc(&short(*v, p.unit));
            let cx = bx + (bw - 2.0) / 2.0;
            if bw < 34.0 {
                // Narrow bars: the value reads upwards from the top of the bar.
                let _ = writeln!(
                    out,
                    r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#333" transform="rotate(-90 {:.1} {:.1})">{label}</text>"##,
                    cx + 3.0,
                    by - 3.0,
                    cx + 3.0,
                    by - 3.0
                );
            } else {
                let _ = writeln!(
                    out,
                    r##"<text x="{cx:.1}" y="{:.1}" font-size="9" text-anchor="middle" fill="#333">{label}</text>"##,
                    by - 2.0
                );
            }
        }
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
            left + gw * gi as f64 + gw / 2.0,
            top + ph + 15.0,
            esc(label)
        );
    }
    if let Some((l, text)) = &p.limit {
        let _ = writeln!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#c00" stroke-dasharray="5,3"/><text x="{}" y="{:.1}" font-size="10" fill="#c00" text-anchor="end">{}</text>"##,
            left + pw,
            y(*l),
            y(*l),
            left + pw - 2.0,
            y(*l) - 3.0,
            esc(text)
        );
    }
    out.push_str("</g>\n");
}

fn panels(scen: &[Value]) -> Vec<Panel> {
    let mut ps = Vec::new();
    for s in scen {
        let runs: Vec<Value> = s["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r.get("skipped").is_none())
            .cloned()
            .collect();
        if runs.is_empty() {
            continue;
        }
        let title = s["title"].as_str().unwrap_or("").to_string();
        let short_title = panel_title(title.split(':').next().unwrap_or(&title));
        let tname = |r: &Value| r["target"].as_str().unwrap_or("?").to_string();
        if runs.iter().any(|r| r.get("kib_per").is_some()) {
            // The targets: 8 KiB per idle connection (plain or TLS), 32 KiB per stream.
            let streams = runs.iter().any(|r| r["held_what"] == "streams");
            let lim = if streams { 32.0 } else { 8.0 };
            ps.push(Panel {
                title: format!(
                    "{title}: RSS per {}",
                    if streams { "stream" } else { "connection" }
                ),
                unit: "KiB",
                groups: vec![(
                    "KiB above baseline, each".into(),
                    runs.iter()
                        .map(|r| (tname(r), r["kib_per"].as_f64().unwrap_or(f64::NAN)))
                        .collect(),
                )],
                limit: Some((lim, format!("target {lim} KiB"))),
                log: false,
            });
            continue;
        }
        let unit = runs
            .first()
            .and_then(|r| r["rate"]["unit"].as_str())
            .unwrap_or("")
            .to_string();
        let pc = format!("per_core_{}", unit.trim_end_matches("/s"));
        let mut rate_groups = vec![(
            unit.clone(),
            runs.iter()
                .map(|r| (tname(r), r["rate"]["value"].as_f64().unwrap_or(f64::NAN)))
                .collect::<Vec<_>>(),
        )];
        // SSE: the streams are paced, so streams per CPU-second says nothing.
        if !s["id"].as_str().unwrap_or("").starts_with("c_sse") {
            rate_groups.push((
                format!("{unit} per CPU-second of the target"),
                runs.iter()
                    .map(|r| (tname(r), r["cpu"][&pc].as_f64().unwrap_or(f64::NAN)))
                    .collect(),
            ));
        }
        ps.push(Panel {
            title: format!("{short_title}: throughput"),
            unit: "",
            groups: rate_groups,
            limit: None,
            log: false,
        });
        let keys: Vec<String> = runs
            .first()
            .and_then(|r| r["latency_us"].as_object())
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for k in ["connect", "request", "ttfb", "event"] {
            if !keys.iter().any(|x| x == k) {
                continue;
            }
            let lt = runs[0]["latency_titles"][k]
                .as_str()
                .unwrap_or(k)
                .to_string();
            ps.push(Panel {
                title: format!("{short_title}: {lt}"),
                unit: "µs",
                groups: PCTS
                    .iter()
                    .map(|(p, _)| {
                        (
                            p.to_string(),
                            runs.iter()
                                .map(|r| {
                                    (tname(r), r["latency_us"][k][p].as_f64().unwrap_or(f64::NAN))
                                })
                                .collect(),
                        )
                    })
                    .collect(),
                limit: None,
                log: true,
            });
        }
    }
    ps
}

/// A scenario title short enough for a panel heading: without its first parenthesised aside
/// when it is long ("f-tls) a new HTTPS connection per request (full ...), 16 clients").
fn panel_title(title: &str) -> String {
    if title.chars().count() <= 60 {
        return title.to_string();
    }
    match title
        .find(" (")
        .and_then(|i| Some((i, i + title[i..].find(')')?)))
    {
        Some((i, j)) => format!("{}{}", &title[..i], &title[j + 1..]),
        None => title.to_string(),
    }
}

/// Splits `text` into lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut out = vec![String::new()];
    for w in text.split(' ') {
        let cur = out.last_mut().unwrap();
        if !cur.is_empty() && cur.chars().count() + 1 + w.chars().count() > width {
            out.push(w.to_string());
        } else {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(w);
        }
    }
    out
}

pub fn svg(scen: &[Value], header: &[String]) -> String {
    let header: Vec<String> = header.iter().flat_map(|l| wrap(l, 190)).collect();
    let ps = panels(scen);
    let (cols, pw, ph) = (2usize, 620.0, 290.0);
    let head_h = 30.0 + 15.0 * header.len() as f64 + 24.0;
    let rows = ps.len().div_ceil(cols);
    let width = cols as f64 * pw + 30.0;
    let height = head_h + rows as f64 * (ph + 10.0) + 10.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif"><rect width="100%" height="100%" fill="#fafafa"/>"##
    );
    let _ = writeln!(
        out,
        r##"<text x="10" y="22" font-size="16" font-weight="bold">llmproxy benchmark: direct vs proxied, same run</text>"##
    );
    for (i, l) in header.iter().enumerate() {
        let _ = writeln!(
            out,
            r##"<text x="10" y="{}" font-size="11" fill="#444">{}</text>"##,
            40.0 + 15.0 * i as f64,
            esc(l)
        );
    }
    // Legend: every target that appears.
    let mut seen: Vec<String> = Vec::new();
    for s in scen {
        for r in s["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r.get("skipped").is_none())
        {
            let t = r["target"].as_str().unwrap_or("?").to_string();
            if !seen.contains(&t) {
                seen.push(t);
            }
        }
    }
    let ly = head_h - 14.0;
    for (i, t) in seen.iter().enumerate() {
        let x = 10.0 + 130.0 * i as f64;
        let _ = writeln!(
            out,
            r##"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}" font-size="12">{}</text>"##,
            ly - 10.0,
            color(t),
            x + 16.0,
            ly,
            esc(t)
        );
    }
    for (i, p) in ps.iter().enumerate() {
        let x = 10.0 + (i % cols) as f64 * (pw + 10.0);
        let y = head_h + (i / cols) as f64 * (ph + 10.0);
        panel_svg(&mut out, p, x, y, pw, ph);
    }
    out.push_str("</svg>\n");
    out
}

/// Checks of the number helpers, run by `cargo test --benches`.
pub fn self_test() {
    assert_eq!(nice(9.0), (10.0, 2.5), "nice axis");
    assert_eq!(nice(130.0), (150.0, 50.0), "nice axis");
    let mut h = crate::load::new_hist();
    for v in 1..=1000u64 {
        h.record(v * 1000).unwrap();
    }
    let p = pct_json(&h);
    assert!((p["p50"].as_f64().unwrap() - 500.0).abs() < 1.0, "{p}");
    assert!((p["p99"].as_f64().unwrap() - 990.0).abs() < 1.5, "{p}");
    let runs = vec![
        json!({"target": "direct", "rate": {"value": 100.0}, "latency_us": {"request": {"p50": 10.0, "p90": 11.0, "p99": 20.0, "p99.9": 30.0}}}),
        json!({"target": "llmproxyd", "rate": {"value": 50.0}, "latency_us": {"request": {"p50": 25.0, "p90": 26.0, "p99": 45.0, "p99.9": 60.0}}}),
    ];
    let v = vs_direct(&runs);
    assert_eq!(v["llmproxyd"]["rate_ratio"], json!(0.5), "{v}");
    assert_eq!(
        panel_title(
            "f-tls) a new HTTPS connection per request (full TLS 1.3 handshake), 16 clients"
        ),
        "f-tls) a new HTTPS connection per request, 16 clients"
    );
    assert_eq!(panel_title("b) one connection"), "b) one connection");
    let plain = json!({"target": "llmproxyd", "rate": {"value": 200.0}, "work": {"unit": "req"},
        "cpu": {"target_us_per_req": 10.0}, "latency_us": {"request": {"p50": 10.0, "p99": 20.0}}});
    let tls = json!({"target": "llmproxyd", "rate": {"value": 150.0}, "work": {"unit": "req"},
        "cpu": {"target_us_per_req": 12.5}, "latency_us": {"request": {"p50": 14.0, "p99": 29.0}}});
    let c = tls_vs_plain(&tls, &plain);
    assert_eq!(c["rate_ratio"], json!(0.75), "{c}");
    assert_eq!(c["cpu_us"]["added"], json!(2.5), "{c}");
    assert_eq!(c["cpu_us"]["ratio"], json!(1.25), "{c}");
    assert_eq!(c["added_latency_us"]["request"]["p99"], json!(9.0), "{c}");
    assert_eq!(
        v["llmproxyd"]["added_us"]["request"]["p99"],
        json!(25.0),
        "{v}"
    );
}
