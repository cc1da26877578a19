//! The processes under test: the mock upstream, llmproxyd, and (with `--compare`) nginx and
//! HAProxy configured like llmproxyd (one worker pinned like its shard, keep-alive to the
//! upstream, no response buffering). Each scenario run gets a fresh proxy process, so its peak
//! RSS and memory baseline belong to that run alone. With [`Env::tls`] set, each serves HTTPS on
//! its listener with the bench's certificate (`tls.rs`); the upstream stays the plain mock.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sys;
use crate::tls::TlsSetup;

const PROXY_BIN: &str = env!("CARGO_BIN_EXE_llmproxyd");
/// Measure another llmproxyd build instead of this tree's (before/after comparisons in one
/// session).
const PROXY_BIN_ENV: &str = "LLMPROXY_BENCH_PROXYD";
const MOCK_BIN: &str = env!("CARGO_BIN_EXE_llmproxy-mock");

/// Which CPUs run what. On 2 cores the proxy under test gets CPU 0 and the mock and the load
/// generator share CPU 1; with more cores each gets its own.
#[derive(Clone, Debug)]
pub struct Placement {
    pub cpus: Vec<usize>,
    /// Core of shard / worker i (llmproxyd pins shard i to the i-th CPU it may use itself).
    pub proxy: Vec<usize>,
    pub mock: Vec<usize>,
    pub generator: Vec<usize>,
}

impl Placement {
    pub fn new(cpus: Vec<usize>) -> Placement {
        let n = cpus.len();
        let (proxy, mock, generator) = match n {
            0 | 1 => (cpus.clone(), cpus.clone(), cpus.clone()),
            2 | 3 => (vec![cpus[0]], vec![cpus[1]], cpus[1..].to_vec()),
            _ => (vec![cpus[0]], vec![cpus[1]], cpus[2..].to_vec()),
        };
        Placement {
            cpus,
            proxy,
            mock,
            generator,
        }
    }

    /// Core of shard/worker `i` of a proxy with several.
    pub fn proxy_core(&self, i: usize) -> usize {
        self.cpus[i % self.cpus.len()]
    }

    pub fn describe(&self) -> String {
        let list = |v: &[usize]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut s = format!(
            "CPUs {}: proxy under test (1 shard / 1 worker) on CPU {}, mock on CPU {}, load generator on CPU {}",
            list(&self.cpus),
            list(&self.proxy),
            list(&self.mock),
            list(&self.generator)
        );
        if self.cpus.len() <= 3 {
            s.push_str(&format!(
                "; with 2 shards the second one shares CPU {} with the mock and the generator. \
                 Everything shares {} cores: direct runs leave CPU {} idle, proxied runs use both",
                self.proxy_core(1),
                self.cpus.len(),
                list(&self.proxy)
            ));
        }
        s
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Restricts a child to `cpus` before it starts (it inherits nothing else from our threads).
fn pinned(cmd: &mut Command, cpus: Vec<usize>) -> &mut Command {
    // SAFETY: sched_setaffinity is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &cpus {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        })
    }
}

/// Blocking one-shot HTTP request (setup and checks only, never timed).
pub fn simple_request(port: u16, req: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    request_on(port, None, req)
}

/// [`simple_request`], over TLS when `tls` is set.
pub fn request_on(
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    req: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    match tls {
        None => {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            exchange(&mut s, req)
        }
        Some(cfg) => exchange(&mut crate::tls::connect_blocking(port, cfg)?, req),
    }
}

fn exchange(s: &mut (impl Read + Write), req: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    s.write_all(req)?;
    s.flush()?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    loop {
        let n = s.read(&mut tmp)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
            let cl = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(cl) = cl {
                if buf.len() >= h + 4 + cl {
                    let status = head
                        .split(' ')
                        .nth(1)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    return Ok((status, buf[h + 4..h + 4 + cl].to_vec()));
                }
            } else if head.contains("transfer-encoding: chunked") && buf.ends_with(b"0\r\n\r\n") {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                return Ok((status, buf[h + 4..].to_vec()));
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "closed before a complete answer",
    ))
}

const PROBE: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";

// ---------------------------------------------------------------------------------------------
// The mock

pub struct Mock {
    child: Child,
    pub addr: SocketAddr,
    /// Serves HTTPS: its control requests (reset, stats) go over TLS too.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Mock {
    /// The mock serving plain HTTP: every proxy's upstream, and "direct" of the plain
    /// scenarios.
    pub fn start(dir: &Path, cpus: &[usize]) -> Mock {
        Mock::start_with(dir, cpus, None)
    }

    /// The same mock serving HTTPS (`--tls-cert/--tls-key`, the bench's certificate): "direct"
    /// of the TLS scenarios.
    pub fn start_tls(dir: &Path, cpus: &[usize], tls: &TlsSetup) -> Mock {
        Mock::start_with(dir, cpus, Some(tls))
    }

    fn start_with(dir: &Path, cpus: &[usize], tls: Option<&TlsSetup>) -> Mock {
        let mut cmd = Command::new(MOCK_BIN);
        cmd.args(["--listen", "127.0.0.1:0", "--threads", "1"]);
        if let Some(t) = tls {
            cmd.arg("--tls-cert")
                .arg(&t.cert)
                .arg("--tls-key")
                .arg(&t.key);
        }
        let log = if tls.is_some() {
            "mock-tls.log"
        } else {
            "mock.log"
        };
        cmd
            // The mock on epoll: on io_uring its SSE answers and paced events came hundreds of
            // µs late once 32+ streams were open (its waits between events cancel and re-arm a
            // poll each time), which would drown what the proxies add. LLMPROXY_BENCH_MOCK_DRIVER
            // =uring keeps io_uring.
            .env(
                "MONOIO_FORCE_LEGACY_DRIVER",
                if std::env::var("LLMPROXY_BENCH_MOCK_DRIVER").is_ok_and(|v| v == "uring") {
                    "0"
                } else {
                    "1"
                },
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(log)).unwrap());
        let mut child = pinned(&mut cmd, cpus.to_vec())
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
        Mock {
            child,
            addr,
            tls: tls.map(|t| t.client.clone()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn reset(&self) {
        let _ = request_on(
            self.port(),
            self.tls.as_ref(),
            b"POST /_mock/reset HTTP/1.1\r\nhost: bench\r\ncontent-length: 0\r\n\r\n",
        );
    }

    pub fn stats(&self) -> Value {
        request_on(
            self.port(),
            self.tls.as_ref(),
            b"GET /_mock/stats HTTP/1.1\r\nhost: bench\r\n\r\n",
        )
        .ok()
        .and_then(|(_, b)| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Proxies

/// A proxy the bench can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Llmproxyd { shards: u16 },
    Nginx,
    Haproxy,
}

impl Kind {
    pub fn label(self) -> String {
        match self {
            Kind::Llmproxyd { shards: 1 } => "llmproxyd".into(),
            Kind::Llmproxyd { shards } => format!("llmproxyd-{shards}sh"),
            Kind::Nginx => "nginx".into(),
            Kind::Haproxy => "haproxy".into(),
        }
    }

    /// The binary, if installed.
    pub fn binary(self) -> Option<PathBuf> {
        let name = match self {
            Kind::Llmproxyd { .. } => {
                let bin = std::env::var_os(PROXY_BIN_ENV).unwrap_or_else(|| PROXY_BIN.into());
                return Some(PathBuf::from(bin));
            }
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        };
        let path = std::env::var("PATH").unwrap_or_default();
        let found = path
            .split(':')
            .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"])
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file());
        found
    }

    pub fn version(self) -> String {
        let Some(bin) = self.binary() else {
            return "not installed".into();
        };
        let flag = match self {
            Kind::Llmproxyd { .. } => "-V",
            Kind::Nginx => "-v",
            Kind::Haproxy => "-v",
        };
        let out = Command::new(bin).arg(flag).output();
        out.map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
    }
}

/// What a proxy needs to know to start.
pub struct Env<'a> {
    pub dir: &'a Path,
    pub mock_port: u16,
    pub placement: &'a Placement,
    /// `--driver` for llmproxyd.
    pub driver: Option<&'a str>,
    /// Our soft RLIMIT_NOFILE (inherited by the proxies): nginx and HAProxy are sized to it.
    pub nofile: u64,
    /// Run the proxy (all its threads, its worker) on this CPU instead of its usual one.
    pub proxy_cpu: Option<usize>,
    /// Serve HTTPS on the listener with these files (the upstream stays plain HTTP).
    pub tls: Option<&'a TlsSetup>,
}

impl Env<'_> {
    /// Core of shard / worker `i`.
    fn core(&self, i: usize) -> usize {
        self.proxy_cpu
            .unwrap_or_else(|| self.placement.proxy_core(i))
    }
}

/// A running proxy.
pub struct Service {
    pub kind: Kind,
    pub port: u16,
    pub admin: Option<u16>,
    child: Child,
    /// The process doing the work (nginx's worker; else the process itself).
    pub pid: u32,
    pub log: PathBuf,
}

impl Service {
    pub fn start(kind: Kind, env: &Env) -> Result<Service, String> {
        let mut last = String::new();
        for attempt in 0..5 {
            match Service::try_start(kind, env, attempt) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(format!("{}: did not start: {last}", kind.label()))
    }

    fn try_start(kind: Kind, env: &Env, attempt: u32) -> Result<Service, String> {
        let port = free_port();
        let dir = env.dir.join(format!("{}-{attempt}-{port}", kind.label()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let log = dir.join("log");
        let logf = || std::fs::File::create(&log).unwrap();
        let mock = env.mock_port;
        let mut admin = None;
        let mut cmd;
        match kind {
            Kind::Llmproxyd { shards } => {
                let a = free_port();
                admin = Some(a);
                let tls = env.tls.map_or(String::new(), |t| {
                    format!(
                        "\n      tls: {{cert_file: {}, key_file: {}}}",
                        t.cert.display(),
                        t.key.display()
                    )
                });
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
      timeout: {{idle: 300}}{tls}
  admin:
    address: 127.0.0.1
    port: {a}
upstreams:
  - name: mock
    url: http://127.0.0.1:{mock}/v1
upstream_groups:
  - name: g
    upstreams:
      - name: mock
"
                    ),
                )
                .map_err(|e| e.to_string())?;
                cmd = Command::new(kind.binary().ok_or("llmproxyd missing")?);
                cmd.arg("-c")
                    .arg(&cfg)
                    .args(["--shards", &shards.to_string()]);
                if let Some(d) = env.driver {
                    cmd.args(["--driver", d]);
                }
            }
            Kind::Nginx => {
                let mask: String = {
                    let c = env.core(0);
                    let mut m = "1".to_string();
                    m.push_str(&"0".repeat(c));
                    m
                };
                let d = dir.display();
                let nofile = env.nofile;
                // TLS: the same certificate, TLS 1.3 only, the generator's suite and group
                // (it offers nothing else; stated here too so nothing else could be chosen),
                // OpenSSL's default session tickets left on (the generator never uses them).
                let (ssl, tls_conf) = match env.tls {
                    None => ("", String::new()),
                    Some(t) => (
                        " ssl",
                        format!(
                            "
    ssl_certificate {};
    ssl_certificate_key {};
    ssl_protocols TLSv1.3;
    ssl_ecdh_curve {};
    ssl_conf_command Ciphersuites {};",
                            t.cert.display(),
                            t.key.display(),
                            crate::tls::OPENSSL_GROUP,
                            crate::tls::OPENSSL_SUITE
                        ),
                    ),
                };
                std::fs::write(
                    dir.join("nginx.conf"),
                    format!(
                        "worker_processes 1;
worker_cpu_affinity {mask};
worker_rlimit_nofile {nofile};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {nofile}; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  keepalive_timeout 300s;
  keepalive_requests 10000000;
  upstream mock {{ server 127.0.0.1:{mock}; keepalive 128; keepalive_requests 10000000; keepalive_timeout 300s; }}
  server {{
    listen 127.0.0.1:{port}{ssl} backlog=4096;{tls_conf}
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"
                    ),
                )
                .map_err(|e| e.to_string())?;
                cmd = Command::new(kind.binary().ok_or("nginx not installed")?);
                cmd.arg("-p")
                    .arg(&dir)
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .arg("-e")
                    .arg(dir.join("error.log"));
            }
            Kind::Haproxy => {
                let c = env.core(0);
                // HAProxy reserves two descriptors per connection and refuses to start when the
                // limit is lower; 10 000 idle client connections need only one each, so ask for
                // 55 % of the limit and let it start anyway (`no strict-limits`: a warning).
                let maxconn = env.nofile * 11 / 20;
                let ssl = env.tls.map_or(String::new(), |t| {
                    format!(
                        " ssl crt {} alpn http/1.1 ssl-min-ver TLSv1.3 ciphersuites {} curves {}",
                        t.combined.display(),
                        crate::tls::OPENSSL_SUITE,
                        crate::tls::OPENSSL_GROUP
                    )
                });
                std::fs::write(
                    dir.join("haproxy.cfg"),
                    format!(
                        "global
  nbthread 1
  cpu-map 1/1 {c}
  maxconn {maxconn}
  no strict-limits
defaults
  mode http
  timeout connect 10s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
  http-reuse always
  option http-no-delay
frontend f
  bind 127.0.0.1:{port}{ssl}
  maxconn {maxconn}
  default_backend b
backend b
  server mock 127.0.0.1:{mock}
"
                    ),
                )
                .map_err(|e| e.to_string())?;
                cmd = Command::new(kind.binary().ok_or("haproxy not installed")?);
                cmd.arg("-f").arg(dir.join("haproxy.cfg")).arg("-db");
            }
        }
        if let Some(c) = env.proxy_cpu {
            // llmproxyd pins its shard to the first CPU it may use: this one.
            pinned(&mut cmd, vec![c]);
        }
        let tls = env.tls.map(|t| t.client.clone());
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(logf())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", kind.label()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("exited with {st}: {}", text.trim()));
            }
            if matches!(request_on(port, tls.as_ref(), PROBE), Ok((200, _))) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no 200 answer within 10 s".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
        let pid = match kind {
            Kind::Nginx => sys::children(child.id())
                .first()
                .copied()
                .ok_or("nginx: no worker process")?,
            _ => child.id(),
        };
        Ok(Service {
            kind,
            port,
            admin,
            child,
            pid,
            log,
        })
    }

    pub fn label(&self) -> String {
        self.kind.label()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The IO driver llmproxyd reported at start.
    pub fn driver(&self) -> Option<String> {
        let text = self.log_text();
        let i = text.find("driver=")?;
        let rest = &text[i + 7..];
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        Some(rest[..end].trim_matches('"').to_string())
    }

    /// WARN/ERROR lines in the log.
    pub fn log_problems(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("[alert]")
                    || l.contains("[crit]")
            })
            .map(str::to_string)
            .collect()
    }

    /// Non-zero `*_errors_total` series from llmproxyd's `/metrics`.
    pub fn error_metrics(&self) -> Vec<String> {
        let Some(admin) = self.admin else {
            return Vec::new();
        };
        // Stats reach the control thread every tick: let the last ones land.
        thread::sleep(Duration::from_millis(150));
        match simple_request(
            admin,
            b"GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n",
        ) {
            Ok((_, body)) => String::from_utf8_lossy(&body)
                .lines()
                .filter(|l| !l.starts_with('#') && l.contains("errors_total"))
                .filter(|l| l.rsplit(' ').next().is_some_and(|v| v != "0"))
                .map(str::to_string)
                .collect(),
            Err(e) => vec![format!("admin /metrics: {e}")],
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.kind == Kind::Nginx {
            // SIGTERM is nginx's fast shutdown: the master takes its worker down with it.
            // SAFETY: kill on the pid of a child we started and have not reaped yet.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.kind == Kind::Nginx && Path::new(&format!("/proc/{}", self.pid)).exists() {
            // A worker left behind by a master that did not shut down in time.
            // SAFETY: kill on the worker of our own nginx, found as our child's child.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
    }
}
