//! `cargo bench`: a first honest measurement of llmproxyd, direct vs proxied, side by side in
//! the same run.
//!
//! Starts the real release binaries (`llmproxy-mock --threads 1`, `llmproxyd --shards 1`, which
//! pins its shard itself) on loopback and drives them with a load generator written here:
//! std threads, blocking sockets, keep-alive, one thread per connection, latency of every
//! request recorded into an `hdrhistogram`. Each scenario runs against the mock directly and
//! then through the proxy, back to back:
//!
//! * `a`: small non-streaming JSON `POST /v1/chat/completions`, 64 keep-alive connections;
//! * `b`: one connection, sequential requests (the latency the proxy adds);
//! * `c`: SSE, 32 concurrent streams of 50 events 5 ms apart (`x-mock-gap-ms: 5`): time to
//!   first byte and per-event inter-arrival.
//!
//! Prints a table (req/s, p50/p90/p99/p99.9, proxied/direct ratios, CPU time of the proxy per
//! request from `/proc/PID/stat`, its peak RSS from `/proc/PID/status`) and writes the same
//! numbers to `perf/results/latest.json`.
//!
//! Options (after `cargo bench --bench proxy --`): `--quick` (or `LLMPROXY_BENCH_QUICK=1`) for
//! a ~20 s smoke run; bare words select scenarios by name (`cargo bench -- sse`);
//! `LLMPROXY_BENCH_DRIVER=epoll|uring` is passed to the proxy as `--driver`.
//!
//! Without `--bench` on the command line (i.e. `cargo test --benches`) it does nothing.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

const PROXY_BIN: &str = env!("CARGO_BIN_EXE_llmproxyd");
const MOCK_BIN: &str = env!("CARGO_BIN_EXE_llmproxy-mock");

/// Small chat completion request (non-streaming).
const CHAT_BODY: &str =
    r#"{"model":"mock","messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;
/// The same, streamed.
const SSE_BODY: &str = r#"{"model":"mock","stream":true,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;
const SSE_TOKENS: u32 = 50;
const SSE_GAP_MS: u32 = 5;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --benches` runs this binary without `--bench`: stay cheap.
        println!("proxy bench: skipped (run it with `cargo bench`)");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("LLMPROXY_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let driver = std::env::var("LLMPROXY_BENCH_DRIVER").ok();
    let plan = Plan::new(quick);
    let started = Instant::now();

    let dir = TempDir::new();
    let mock = Mock::start(&dir.0);
    let proxy = Proxy::start(&dir.0, mock.addr.port(), driver.as_deref());
    let proxy_driver = proxy.driver();
    println!(
        "proxy bench{}: mock pid {} on {}, llmproxyd pid {} on 127.0.0.1:{} (--shards 1, driver {}), {} cpus",
        if quick { " (quick)" } else { "" },
        mock.pid(),
        mock.addr,
        proxy.pid(),
        proxy.port,
        proxy_driver,
        cpus()
    );
    // Sanity: both targets answer the request we are about to hammer.
    for (name, port) in [("direct", mock.addr.port()), ("proxied", proxy.port)] {
        let mut c = Conn::connect(port).expect("connect");
        let r = c
            .request(&chat_request(&[]), &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.status, 200, "{name}: status {}", r.status);
    }

    let targets = [
        Target {
            name: "direct",
            port: mock.addr.port(),
        },
        Target {
            name: "proxied",
            port: proxy.port,
        },
    ];
    let want = |s: &str| filters.is_empty() || filters.iter().any(|f| s.contains(f));
    let mut results: Vec<Value> = Vec::new();
    let mut table = Table::default();

    if want("a_json_64c") {
        let id = "a_json_64c";
        let mut pair = Vec::new();
        for t in &targets {
            progress(id, t, &plan.a);
            let log_mark = proxy.log_len();
            mock.reset();
            let r = run_rr(t, &plan.a, 64, &proxy, &mock);
            let extra = observe(&proxy, &mock, log_mark);
            pair.push(r.row(t.name, extra));
        }
        table.rr("a) JSON POST, 64 conns", &pair);
        results.push(json!({"id": id, "description": "small non-streaming JSON POST /v1/chat/completions, 64 keep-alive connections", "connections": 64, "runs": pair}));
    }
    if want("b_seq_1c") {
        let id = "b_seq_1c";
        let mut pair = Vec::new();
        for t in &targets {
            progress(id, t, &plan.b);
            let log_mark = proxy.log_len();
            mock.reset();
            let r = run_rr(t, &plan.b, 1, &proxy, &mock);
            let extra = observe(&proxy, &mock, log_mark);
            pair.push(r.row(t.name, extra));
        }
        table.rr("b) 1 conn, sequential", &pair);
        let added = added_latency(&pair[0]["latency_us"], &pair[1]["latency_us"]);
        table.added = Some(added.clone());
        results.push(json!({"id": id, "description": "one keep-alive connection, sequential small JSON POSTs", "connections": 1, "runs": pair, "added_latency_us": added}));
    }
    if want("c_sse_32s") {
        let id = "c_sse_32s";
        let mut pair = Vec::new();
        for t in &targets {
            progress(id, t, &plan.c);
            let log_mark = proxy.log_len();
            mock.reset();
            let r = run_sse(t, &plan.c, 32, &proxy, &mock);
            let extra = observe(&proxy, &mock, log_mark);
            pair.push(r.row(t.name, extra));
        }
        table.sse("c) SSE, 32 streams x 50 ev, 5 ms gap", &pair);
        results.push(json!({"id": id, "description": "SSE: 32 concurrent streams of 50 token events with x-mock-gap-ms: 5 (each stream: 50 events + [DONE])", "connections": 32, "tokens": SSE_TOKENS, "gap_ms": SSE_GAP_MS, "runs": pair}));
    }

    let metrics_errors = proxy.error_metrics();
    let proxy_log_problems = proxy.log_problems(0);
    table.print();
    println!(
        "proxy peak RSS (VmHWM): {} KiB; CPU time of the proxy is utime+stime of the whole process (shard, control and admin threads)",
        proc_status_kib(proxy.pid(), "VmHWM").unwrap_or(0)
    );
    if !metrics_errors.is_empty() {
        println!("proxy error metrics (non-zero):");
        for l in &metrics_errors {
            println!("  {l}");
        }
    }
    if !proxy_log_problems.is_empty() {
        println!(
            "proxy log: {} WARN/ERROR lines, first ones:",
            proxy_log_problems.len()
        );
        for l in proxy_log_problems.iter().take(10) {
            println!("  {l}");
        }
    }

    let out = json!({
        "generated_unix": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "quick": quick,
        "git_commit": git_commit(),
        "machine": {
            "cpus": cpus(),
            "cpu_model": cpu_model(),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        },
        "setup": {
            "mock": "llmproxy-mock --threads 1 (unpinned)",
            "proxy": format!("llmproxyd --shards 1 (shard pinned to the first core by the proxy), driver {proxy_driver}"),
            "load_generator": "in-process, one std thread + blocking keep-alive socket per connection, unpinned",
            "note": "load generator, mock and proxy share the same cores: absolute numbers are low and noisy",
            "durations_s": {"a": plan.a.dur.as_secs_f64(), "b": plan.b.dur.as_secs_f64(), "c": plan.c.dur.as_secs_f64()},
            "warmup_s": {"a": plan.a.warmup.as_secs_f64(), "b": plan.b.warmup.as_secs_f64(), "c": plan.c.warmup.as_secs_f64()},
        },
        "scenarios": results,
        "proxy_peak_rss_kib": proc_status_kib(proxy.pid(), "VmHWM"),
        "proxy_error_metrics": metrics_errors,
        "proxy_log_warn_error_lines": proxy_log_problems,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("perf/results/latest.json");
    std::fs::create_dir_all(path.parent().unwrap()).expect("create perf/results");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap() + "\n")
        .expect("write latest.json");
    println!(
        "wrote {} ({:.1} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Plan

#[derive(Clone, Copy)]
struct Phase {
    warmup: Duration,
    dur: Duration,
}

struct Plan {
    a: Phase,
    b: Phase,
    c: Phase,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let p = |w: u64, d: u64| Phase {
            warmup: Duration::from_millis(w),
            dur: Duration::from_millis(d),
        };
        if quick {
            Plan {
                a: p(300, 1500),
                b: p(200, 1000),
                c: p(300, 1500),
            }
        } else {
            Plan {
                a: p(1000, 5000),
                b: p(500, 3000),
                c: p(500, 5000),
            }
        }
    }
}

struct Target {
    name: &'static str,
    port: u16,
}

fn progress(id: &str, t: &Target, p: &Phase) {
    println!(
        "[{id}] {:<7} port {}: {:.1} s warm-up + {:.1} s measured ...",
        t.name,
        t.port,
        p.warmup.as_secs_f64(),
        p.dur.as_secs_f64()
    );
    let _ = io::stdout().flush();
}

fn chat_request(extra: &[(&str, String)]) -> Vec<u8> {
    request_bytes(CHAT_BODY, extra)
}

fn request_bytes(body: &str, extra: &[(&str, String)]) -> Vec<u8> {
    let mut r = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("llmproxy-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Mock {
    child: Child,
    addr: SocketAddr,
}

impl Mock {
    fn start(dir: &Path) -> Mock {
        let mut child = Command::new(MOCK_BIN)
            .args(["--listen", "127.0.0.1:0", "--threads", "1"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("mock.log")).unwrap())
            .spawn()
            .expect("start llmproxy-mock");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("mock said {line:?}"));
        Mock { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn reset(&self) {
        let req = b"POST /_mock/reset HTTP/1.1\r\nhost: bench\r\ncontent-length: 0\r\n\r\n";
        let mut c = Conn::connect(self.addr.port()).expect("mock reset");
        let _ = c.request(req, &mut |_, _| {});
    }

    fn stats(&self) -> Value {
        let req = b"GET /_mock/stats HTTP/1.1\r\nhost: bench\r\n\r\n";
        let mut body = Vec::new();
        let Ok(mut c) = Conn::connect(self.addr.port()) else {
            return Value::Null;
        };
        match c.request(req, &mut |b, _| body.extend_from_slice(b)) {
            Ok(_) => serde_json::from_slice(&body).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Proxy {
    child: Child,
    port: u16,
    admin: u16,
    log: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Proxy {
    fn start(dir: &Path, mock_port: u16, driver: Option<&str>) -> Proxy {
        for attempt in 0..5 {
            let port = free_port();
            let admin = free_port();
            let cfg = dir.join("config.yaml");
            std::fs::write(
                &cfg,
                format!(
                    "http_server:
  forwards:
    - name: bench
      address: 127.0.0.1
      port: {port}
      upstream_group: g
  admin:
    address: 127.0.0.1
    port: {admin}
upstreams:
  - name: mock
    url: http://127.0.0.1:{mock_port}/v1
upstream_groups:
  - name: g
    upstreams:
      - name: mock
"
                ),
            )
            .unwrap();
            let log = dir.join(format!("proxy-{attempt}.log"));
            let mut cmd = Command::new(PROXY_BIN);
            cmd.arg("-c").arg(&cfg).args(["--shards", "1"]);
            if let Some(d) = driver {
                cmd.args(["--driver", d]);
            }
            let mut child = cmd
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start llmproxyd");
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut up = false;
            while Instant::now() < deadline {
                if let Some(st) = child.try_wait().unwrap() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("Address already in use") {
                        break;
                    }
                    panic!("llmproxyd exited with {st}: {text}");
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    up = true;
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            if up {
                return Proxy {
                    child,
                    port,
                    admin,
                    log,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("llmproxyd did not start");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_len(&self) -> usize {
        self.log_text().len()
    }

    /// The IO driver the proxy reported at start.
    fn driver(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let text = self.log_text();
            if let Some(i) = text.find("driver=") {
                let rest = &text[i + 7..];
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                return rest[..end].trim_matches('"').to_string();
            }
            if Instant::now() > deadline {
                return "unknown".into();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// WARN/ERROR lines logged since byte `from`.
    fn log_problems(&self, from: usize) -> Vec<String> {
        let text = self.log_text();
        text.get(from..)
            .unwrap_or("")
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }

    /// Non-zero `*_errors_total` series from the admin `/metrics`.
    fn error_metrics(&self) -> Vec<String> {
        // Stats reach the control thread every tick (50 ms): give the last ones time to land.
        thread::sleep(Duration::from_millis(200));
        let req = b"GET /metrics HTTP/1.1\r\nhost: bench\r\n\r\n";
        let mut body = Vec::new();
        let Ok(mut c) = Conn::connect(self.admin) else {
            return vec!["admin: cannot connect".into()];
        };
        if let Err(e) = c.request(req, &mut |b, _| body.extend_from_slice(b)) {
            return vec![format!("admin /metrics: {e}")];
        }
        String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains("errors_total"))
            .filter(|l| l.rsplit(' ').next().is_some_and(|v| v != "0"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy and the mock reported after one run.
struct Observed {
    proxy_log_problems: Vec<String>,
    mock_stats: Value,
    proxy_vmhwm_kib: Option<u64>,
    proxy_vmrss_kib: Option<u64>,
}

fn observe(proxy: &Proxy, mock: &Mock, log_mark: usize) -> Observed {
    Observed {
        proxy_log_problems: proxy.log_problems(log_mark),
        mock_stats: mock.stats(),
        proxy_vmhwm_kib: proc_status_kib(proxy.pid(), "VmHWM"),
        proxy_vmrss_kib: proc_status_kib(proxy.pid(), "VmRSS"),
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime+stime of a process (all threads), in seconds.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Busy CPU seconds of the whole machine (all CPUs, from `/proc/stat`): everything but idle and
/// iowait. Compared with our three processes it shows whether something else ran meanwhile.
fn system_busy_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user); steal
    // (the hypervisor running someone else) is not ours: reported apart.
    let busy: u64 = v.iter().take(7).sum::<u64>() - v.get(3)? - v.get(4)?;
    Some(busy as f64 / clk_tck())
}

/// CPU seconds stolen by the hypervisor (all CPUs, from `/proc/stat`).
fn system_steal_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let steal: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(steal as f64 / clk_tck())
}

/// CPU seconds of the proxy, the mock, this load generator and the whole machine.
#[derive(Clone, Copy, Default)]
struct Cpu {
    proxy: f64,
    mock: f64,
    loadgen: f64,
    system: f64,
    steal: f64,
}

impl Cpu {
    fn sample(proxy: &Proxy, mock: &Mock) -> Cpu {
        Cpu {
            proxy: cpu_seconds(&proxy.pid().to_string()).unwrap_or(f64::NAN),
            mock: cpu_seconds(&mock.pid().to_string()).unwrap_or(f64::NAN),
            loadgen: cpu_seconds("self").unwrap_or(f64::NAN),
            system: system_busy_seconds().unwrap_or(f64::NAN),
            steal: system_steal_seconds().unwrap_or(f64::NAN),
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            proxy: self.proxy - before.proxy,
            mock: self.mock - before.mock,
            loadgen: self.loadgen - before.loadgen,
            system: self.system - before.system,
            steal: self.steal - before.steal,
        }
    }
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client

struct Resp {
    status: u16,
    /// The server asked to close (or closed) the connection after this response.
    close: bool,
}

/// One keep-alive client connection with its read buffer.
struct Conn {
    s: TcpStream,
    buf: Box<[u8]>,
    lo: usize,
    hi: usize,
    /// When the last read returned data.
    last_read: Instant,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    fn connect(port: u16) -> io::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        // A stall of this length becomes an error (counted), not a hang.
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            s,
            buf: vec![0u8; 64 * 1024].into_boxed_slice(),
            lo: 0,
            hi: 0,
            last_read: Instant::now(),
        })
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.hi == self.buf.len() {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
            if self.hi == self.buf.len() {
                return Err(bad("response head larger than 64 KiB"));
            }
        }
        let n = self.s.read(&mut self.buf[self.hi..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        self.last_read = Instant::now();
        self.hi += n;
        Ok(())
    }

    /// Sends `req` and reads one response; body bytes go to `on_body` with the time of the
    /// read that brought them. Returns the response and the time its first byte arrived.
    fn request(&mut self, req: &[u8], on_body: &mut dyn FnMut(&[u8], Instant)) -> io::Result<Resp> {
        self.s.write_all(req)?;
        self.read_response(on_body).map(|(r, _)| r)
    }

    fn read_response(
        &mut self,
        on_body: &mut dyn FnMut(&[u8], Instant),
    ) -> io::Result<(Resp, Instant)> {
        if self.lo == self.hi {
            self.fill()?;
        }
        let first_byte = self.last_read;
        let head_len = loop {
            if let Some(i) = find(&self.buf[self.lo..self.hi], b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed
            .parse(&self.buf[self.lo..self.lo + head_len])
            .map_err(|e| bad(format!("bad response head: {e}")))?;
        let status = parsed.code.unwrap_or(0);
        let mut length: Option<usize> = None;
        let mut chunked = false;
        let mut close = parsed.version == Some(0);
        for h in parsed.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                length = Some(v.parse().map_err(|_| bad("bad content-length"))?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h.value.eq_ignore_ascii_case(b"chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = h.value.eq_ignore_ascii_case(b"close");
            }
        }
        self.lo += head_len;
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok((Resp { status, close }, first_byte));
        }
        if chunked {
            loop {
                let line = loop {
                    if let Some(i) = find(&self.buf[self.lo..self.hi], b"\r\n") {
                        break i;
                    }
                    self.fill()?;
                };
                let size_str = std::str::from_utf8(&self.buf[self.lo..self.lo + line])
                    .map_err(|_| bad("bad chunk size"))?;
                let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
                    .map_err(|_| bad(format!("bad chunk size {size_str:?}")))?;
                self.lo += line + 2;
                let mut left = size;
                while left > 0 {
                    if self.lo == self.hi {
                        self.fill()?;
                    }
                    let n = left.min(self.hi - self.lo);
                    on_body(&self.buf[self.lo..self.lo + n], self.last_read);
                    self.lo += n;
                    left -= n;
                }
                // CRLF after the data (after the last chunk: no trailers expected).
                while self.hi - self.lo < 2 {
                    self.fill()?;
                }
                if &self.buf[self.lo..self.lo + 2] != b"\r\n" {
                    return Err(bad("chunk not followed by CRLF"));
                }
                self.lo += 2;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(mut left) = length {
            while left > 0 {
                if self.lo == self.hi {
                    self.fill()?;
                }
                let n = left.min(self.hi - self.lo);
                on_body(&self.buf[self.lo..self.lo + n], self.last_read);
                self.lo += n;
                left -= n;
            }
        } else {
            // Read to EOF.
            loop {
                if self.lo < self.hi {
                    on_body(&self.buf[self.lo..self.hi], self.last_read);
                    self.lo = self.hi;
                }
                match self.fill() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            close = true;
        }
        Ok((Resp { status, close }, first_byte))
    }
}

// ---------------------------------------------------------------------------------------------
// Load generation

fn new_hist() -> Histogram<u64> {
    // Nanoseconds, 10 ns to 100 s, 3 significant digits.
    Histogram::new_with_bounds(10, 100_000_000_000, 3).unwrap()
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_nanos() as u64).max(10));
}

/// Failures seen by the load generator.
#[derive(Default)]
struct Problems {
    errors: u64,
    /// First few error messages, with counts.
    error_kinds: BTreeMap<String, u64>,
    non_2xx: BTreeMap<u16, u64>,
    /// Responses that asked to close the connection (the client reconnects).
    server_closes: u64,
    reconnects: u64,
}

impl Problems {
    fn error(&mut self, e: &io::Error) {
        self.errors += 1;
        let k = format!("{:?}: {e}", e.kind());
        if self.error_kinds.len() < 8 || self.error_kinds.contains_key(&k) {
            *self.error_kinds.entry(k).or_default() += 1;
        }
    }

    fn merge(&mut self, o: Problems) {
        self.errors += o.errors;
        for (k, v) in o.error_kinds {
            *self.error_kinds.entry(k).or_default() += v;
        }
        for (k, v) in o.non_2xx {
            *self.non_2xx.entry(k).or_default() += v;
        }
        self.server_closes += o.server_closes;
        self.reconnects += o.reconnects;
    }

    fn json(&self) -> Value {
        json!({
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "non_2xx": self.non_2xx.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "non_2xx_total": self.non_2xx.values().sum::<u64>(),
            "server_closes": self.server_closes,
            "reconnects": self.reconnects,
        })
    }
}

/// A connection that reconnects after errors and server closes.
struct Client {
    port: u16,
    conn: Option<Conn>,
}

impl Client {
    fn get(&mut self, p: &mut Problems) -> Option<&mut Conn> {
        if self.conn.is_none() {
            match Conn::connect(self.port) {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    p.error(&e);
                    thread::sleep(Duration::from_millis(1));
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    /// Handles the outcome of one exchange; returns the status on success.
    fn done(&mut self, r: io::Result<Resp>, p: &mut Problems) -> Option<u16> {
        match r {
            Ok(resp) => {
                if resp.close {
                    p.server_closes += 1;
                    self.drop_conn(p);
                }
                if !(200..300).contains(&resp.status) {
                    *p.non_2xx.entry(resp.status).or_default() += 1;
                }
                Some(resp.status)
            }
            Err(e) => {
                p.error(&e);
                self.drop_conn(p);
                None
            }
        }
    }

    fn drop_conn(&mut self, p: &mut Problems) {
        if self.conn.take().is_some() {
            p.reconnects += 1;
        }
    }
}

struct RrResult {
    hist: Histogram<u64>,
    requests: u64,
    secs: f64,
    problems: Problems,
    cpu: Cpu,
}

/// Request/response load: `conns` connections, each sending the small chat request in a loop.
fn run_rr(t: &Target, phase: &Phase, conns: usize, proxy: &Proxy, mock: &Mock) -> RrResult {
    let req = chat_request(&[]);
    let t0 = Instant::now() + phase.warmup;
    let t1 = t0 + phase.dur;
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let req = req.clone();
            let port = t.port;
            thread::spawn(move || {
                let mut h = new_hist();
                let mut n = 0u64;
                let mut p = Problems::default();
                let mut c = Client { port, conn: None };
                loop {
                    let start = Instant::now();
                    if start >= t1 {
                        break;
                    }
                    let Some(conn) = c.get(&mut p) else { continue };
                    let r = conn.request(&req, &mut |_, _| {});
                    let end = Instant::now();
                    // Failures count over the whole run (warm-up included); latencies only
                    // inside the measured window.
                    let status = c.done(r, &mut p);
                    let measured = start >= t0 && end <= t1;
                    if measured && status.is_some_and(|s| (200..300).contains(&s)) {
                        record(&mut h, end - start);
                        n += 1;
                    }
                }
                (h, n, p)
            })
        })
        .collect();
    sleep_until(t0);
    let before = Cpu::sample(proxy, mock);
    sleep_until(t1);
    let cpu = Cpu::sample(proxy, mock).since(before);
    let mut hist = new_hist();
    let mut requests = 0;
    let mut problems = Problems::default();
    for h in handles {
        let (th, n, p) = h.join().expect("load thread");
        hist.add(th).unwrap();
        requests += n;
        problems.merge(p);
    }
    RrResult {
        hist,
        requests,
        secs: phase.dur.as_secs_f64(),
        problems,
        cpu,
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

fn pct_json(h: &Histogram<u64>) -> Value {
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0; // µs, 0.1 µs resolution
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "count": h.len(),
        "mean": (h.mean() / 100.0).round() / 10.0,
        "p50": us(h.value_at_quantile(0.50)),
        "p90": us(h.value_at_quantile(0.90)),
        "p99": us(h.value_at_quantile(0.99)),
        "p99.9": us(h.value_at_quantile(0.999)),
        "max": us(h.max()),
    })
}

/// CPU seconds in the measured window and per unit of work (`unit`: "req" or "stream").
fn cpu_json(cpu: &Cpu, per: u64, unit: &str, secs: f64, target: &str) -> Value {
    let per_us = |s: f64| {
        if per == 0 || s.is_nan() {
            Value::Null
        } else {
            json!((s * 1e6 / per as f64 * 10.0).round() / 10.0)
        }
    };
    let proxy_per = if target == "proxied" {
        per_us(cpu.proxy)
    } else {
        Value::Null
    };
    json!({
        "proxy_s": cpu.proxy,
        "mock_s": cpu.mock,
        "loadgen_s": cpu.loadgen,
        format!("proxy_us_per_{unit}"): proxy_per,
        format!("mock_us_per_{unit}"): per_us(cpu.mock),
        format!("loadgen_us_per_{unit}"): per_us(cpu.loadgen),
        "cores_busy": ((cpu.proxy + cpu.mock + cpu.loadgen) / secs * 100.0).round() / 100.0,
        "machine_cores_busy": (cpu.system / secs * 100.0).round() / 100.0,
        "steal_cores": (cpu.steal / secs * 100.0).round() / 100.0,
        "other_cores_busy": ((cpu.system - cpu.proxy - cpu.mock - cpu.loadgen) / secs * 100.0).round() / 100.0,
        "clk_tck": clk_tck(),
    })
}

fn observed_json(o: Observed) -> Value {
    json!({
        "proxy_vmhwm_kib": o.proxy_vmhwm_kib,
        "proxy_vmrss_kib": o.proxy_vmrss_kib,
        "mock_stats": o.mock_stats,
        "proxy_log_warn_error_lines": o.proxy_log_problems,
    })
}

impl RrResult {
    fn row(self, target: &str, o: Observed) -> Value {
        json!({
            "target": target,
            "requests": self.requests,
            "seconds": self.secs,
            "rps": (self.requests as f64 / self.secs).round(),
            "latency_us": pct_json(&self.hist),
            "problems": self.problems.json(),
            "cpu": cpu_json(&self.cpu, self.requests, "req", self.secs, target),
            "observed": observed_json(o),
        })
    }
}

fn added_latency(direct: &Value, proxied: &Value) -> Value {
    let mut m = serde_json::Map::new();
    for k in ["p50", "p90", "p99", "p99.9"] {
        if let (Some(d), Some(p)) = (direct[k].as_f64(), proxied[k].as_f64()) {
            m.insert(k.into(), json!(((p - d) * 10.0).round() / 10.0));
        }
    }
    Value::Object(m)
}

/// SSE event boundaries (`\n\n`) in a body that arrives in pieces.
#[derive(Default)]
struct EventScanner {
    prev_nl: bool,
    times: Vec<Instant>,
}

impl EventScanner {
    fn feed(&mut self, bytes: &[u8], at: Instant) {
        for &b in bytes {
            if b == b'\n' {
                if self.prev_nl {
                    self.times.push(at);
                    self.prev_nl = false;
                } else {
                    self.prev_nl = true;
                }
            } else {
                self.prev_nl = false;
            }
        }
    }
}

struct SseResult {
    ttfb: Histogram<u64>,
    first_event: Histogram<u64>,
    gap: Histogram<u64>,
    total: Histogram<u64>,
    streams: u64,
    events: u64,
    /// Streams that completed with the wrong number of events.
    short_streams: u64,
    /// Inter-arrival gaps of 0 after rounding to 100 µs: events that arrived glued together.
    coalesced_gaps: u64,
    secs: f64,
    problems: Problems,
    cpu: Cpu,
}

/// SSE load: `conns` connections, each running streams back to back.
fn run_sse(t: &Target, phase: &Phase, conns: usize, proxy: &Proxy, mock: &Mock) -> SseResult {
    let req = request_bytes(
        SSE_BODY,
        &[
            ("x-mock-tokens", SSE_TOKENS.to_string()),
            ("x-mock-gap-ms", SSE_GAP_MS.to_string()),
        ],
    );
    let t0 = Instant::now() + phase.warmup;
    let t1 = t0 + phase.dur;
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let req = req.clone();
            let port = t.port;
            thread::spawn(move || {
                let mut r = SseResult {
                    ttfb: new_hist(),
                    first_event: new_hist(),
                    gap: new_hist(),
                    total: new_hist(),
                    streams: 0,
                    events: 0,
                    short_streams: 0,
                    coalesced_gaps: 0,
                    secs: 0.0,
                    problems: Problems::default(),
                    cpu: Cpu::default(),
                };
                let mut c = Client { port, conn: None };
                loop {
                    let start = Instant::now();
                    if start >= t1 {
                        break;
                    }
                    let Some(conn) = c.get(&mut r.problems) else {
                        continue;
                    };
                    let mut ev = EventScanner::default();
                    let res = conn
                        .s
                        .write_all(&req)
                        .and_then(|_| conn.read_response(&mut |b, at| ev.feed(b, at)));
                    let end = Instant::now();
                    let first_byte = res.as_ref().ok().map(|(_, fb)| *fb);
                    // Failures count over the whole run (warm-up included); timings only for
                    // streams started inside the measured window.
                    let status = c.done(res.map(|(x, _)| x), &mut r.problems);
                    if start < t0 || !status.is_some_and(|s| (200..300).contains(&s)) {
                        continue;
                    }
                    r.streams += 1;
                    r.events += ev.times.len() as u64;
                    if ev.times.len() != SSE_TOKENS as usize + 1 {
                        r.short_streams += 1;
                    }
                    if let Some(fb) = first_byte {
                        record(&mut r.ttfb, fb - start);
                    }
                    if let Some(&e0) = ev.times.first() {
                        record(&mut r.first_event, e0 - start);
                    }
                    // Paced gaps: between the token events (the [DONE] event follows the last
                    // token without delay).
                    let paced = ev.times.len().min(SSE_TOKENS as usize);
                    for w in ev.times[..paced].windows(2) {
                        let g = w[1] - w[0];
                        if g < Duration::from_micros(100) {
                            r.coalesced_gaps += 1;
                        }
                        record(&mut r.gap, g);
                    }
                    record(&mut r.total, end - start);
                }
                r
            })
        })
        .collect();
    sleep_until(t0);
    let before = Cpu::sample(proxy, mock);
    sleep_until(t1);
    let cpu = Cpu::sample(proxy, mock).since(before);
    let mut all: Option<SseResult> = None;
    for h in handles {
        let r = h.join().expect("sse thread");
        match &mut all {
            None => all = Some(r),
            Some(a) => {
                a.ttfb.add(&r.ttfb).unwrap();
                a.first_event.add(&r.first_event).unwrap();
                a.gap.add(&r.gap).unwrap();
                a.total.add(&r.total).unwrap();
                a.streams += r.streams;
                a.events += r.events;
                a.short_streams += r.short_streams;
                a.coalesced_gaps += r.coalesced_gaps;
                a.problems.merge(r.problems);
            }
        }
    }
    let mut all = all.expect("at least one connection");
    all.secs = phase.dur.as_secs_f64();
    all.cpu = cpu;
    all
}

impl SseResult {
    fn row(self, target: &str, o: Observed) -> Value {
        json!({
            "target": target,
            "streams": self.streams,
            "events": self.events,
            "short_streams": self.short_streams,
            "coalesced_gaps": self.coalesced_gaps,
            "seconds": self.secs,
            "streams_per_s": (self.streams as f64 / self.secs * 10.0).round() / 10.0,
            "ttfb_us": pct_json(&self.ttfb),
            "first_event_us": pct_json(&self.first_event),
            "interarrival_us": pct_json(&self.gap),
            "stream_total_us": pct_json(&self.total),
            "problems": self.problems.json(),
            "cpu": cpu_json(&self.cpu, self.streams, "stream", self.secs, target),
            "observed": observed_json(o),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Table

#[derive(Default)]
struct Table {
    lines: Vec<String>,
    added: Option<Value>,
}

fn fmt_us(v: &Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(us) if us.abs() >= 10_000.0 => format!("{:.1}ms", us / 1000.0),
        Some(us) if us.abs() >= 1000.0 => format!("{:.2}ms", us / 1000.0),
        Some(us) => format!("{us:.0}µs"),
    }
}

fn ratio(p: &Value, d: &Value) -> String {
    match (p.as_f64(), d.as_f64()) {
        (Some(p), Some(d)) if d > 0.0 => format!("{:.2}x", p / d),
        _ => "-".into(),
    }
}

fn problems_cell(r: &Value) -> String {
    let p = &r["problems"];
    format!(
        "{}/{}",
        p["errors"].as_u64().unwrap_or(0),
        p["non_2xx_total"].as_u64().unwrap_or(0)
    )
}

fn cpu_cell(r: &Value) -> String {
    match (
        r["cpu"]["proxy_us_per_req"].as_f64(),
        r["cpu"]["proxy_us_per_stream"].as_f64(),
    ) {
        (Some(v), _) => format!("{v:.1}µs"),
        (_, Some(v)) => format!("{v:.0}µs/st"),
        _ => "-".into(),
    }
}

fn rss_cell(r: &Value) -> String {
    match (
        r["target"].as_str(),
        r["observed"]["proxy_vmhwm_kib"].as_u64(),
    ) {
        (Some("proxied"), Some(k)) => format!("{:.1}MiB", k as f64 / 1024.0),
        _ => "-".into(),
    }
}

const PCTS: [&str; 4] = ["p50", "p90", "p99", "p99.9"];

impl Table {
    fn header(&mut self, title: &str, rate: &str, what: &str) {
        self.lines.push(String::new());
        self.lines.push(format!("{title}  [{what}]"));
        self.lines.push(format!(
            "  {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>9} {:>12} {:>9}",
            "target",
            rate,
            "p50",
            "p90",
            "p99",
            "p99.9",
            "err/non2xx",
            "proxy CPU/req",
            "proxy HWM"
        ));
    }

    fn rr(&mut self, title: &str, pair: &[Value]) {
        self.header(title, "req/s", "latency per request");
        for r in pair {
            let l = &r["latency_us"];
            self.lines.push(format!(
                "  {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>10} {:>13} {:>9}",
                r["target"].as_str().unwrap_or("?"),
                r["rps"].as_f64().unwrap_or(0.0),
                fmt_us(&l["p50"]),
                fmt_us(&l["p90"]),
                fmt_us(&l["p99"]),
                fmt_us(&l["p99.9"]),
                problems_cell(r),
                cpu_cell(r),
                rss_cell(r),
            ));
        }
        self.ratio_line(pair, "rps", "latency_us");
        self.cpu_lines(pair);
    }

    /// Where the CPU went: cores busy (of `cpus()`) per process during the measured window.
    fn cpu_lines(&mut self, pair: &[Value]) {
        for r in pair {
            let c = &r["cpu"];
            let secs = r["seconds"].as_f64().unwrap_or(1.0);
            let cores = |k: &str| c[k].as_f64().map_or(f64::NAN, |v| v / secs);
            self.lines.push(format!(
                "  {:<8} cores busy: proxy {:.2}  mock {:.2}  load generator {:.2}  other {:.2}  (machine {:.2} of {}, steal {:.2})",
                r["target"].as_str().unwrap_or("?"),
                cores("proxy_s"),
                cores("mock_s"),
                cores("loadgen_s"),
                c["other_cores_busy"].as_f64().unwrap_or(f64::NAN),
                c["machine_cores_busy"].as_f64().unwrap_or(f64::NAN),
                cpus(),
                c["steal_cores"].as_f64().unwrap_or(f64::NAN),
            ));
        }
    }

    fn ratio_line(&mut self, pair: &[Value], rate: &str, lat: &str) {
        if let [d, p] = pair {
            let mut cells = vec![ratio(&p[rate], &d[rate])];
            for k in PCTS {
                cells.push(ratio(&p[lat][k], &d[lat][k]));
            }
            self.lines.push(format!(
                "  {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "p/d", cells[0], cells[1], cells[2], cells[3], cells[4]
            ));
        }
    }

    fn sse(&mut self, title: &str, pair: &[Value]) {
        for (key, what) in [
            ("ttfb_us", "time to first byte"),
            ("first_event_us", "time to first event"),
            (
                "interarrival_us",
                "inter-arrival of events (mock paces 5 ms)",
            ),
        ] {
            self.header(title, "streams/s", what);
            for r in pair {
                let l = &r[key];
                self.lines.push(format!(
                    "  {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>10} {:>13} {:>9}",
                    r["target"].as_str().unwrap_or("?"),
                    r["streams_per_s"].as_f64().unwrap_or(0.0),
                    fmt_us(&l["p50"]),
                    fmt_us(&l["p90"]),
                    fmt_us(&l["p99"]),
                    fmt_us(&l["p99.9"]),
                    problems_cell(r),
                    cpu_cell(r),
                    rss_cell(r),
                ));
            }
            self.ratio_line(pair, "streams_per_s", key);
        }
        self.cpu_lines(pair);
        for r in pair {
            self.lines.push(format!(
                "  {:<8} streams {} events {} short streams {} coalesced gaps (<100µs) {}",
                r["target"].as_str().unwrap_or("?"),
                r["streams"],
                r["events"],
                r["short_streams"],
                r["coalesced_gaps"],
            ));
        }
    }

    fn print(&self) {
        println!();
        println!(
            "==== llmproxy: direct (client -> mock) vs proxied (client -> llmproxyd -> mock) ===="
        );
        for l in &self.lines {
            println!("{l}");
        }
        if let Some(a) = &self.added {
            println!();
            println!(
                "added latency, 1 connection (proxied - direct): p50 {}  p90 {}  p99 {}  p99.9 {}",
                fmt_us(&a["p50"]),
                fmt_us(&a["p90"]),
                fmt_us(&a["p99"]),
                fmt_us(&a["p99.9"])
            );
        }
        println!();
    }
}
