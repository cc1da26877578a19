//! Test support: start the real `llmproxyd` and `llmproxy-mock` binaries on loopback and talk
//! raw HTTP/1.1 to them.
#![allow(dead_code)]

pub mod forward_proxy;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_llmproxyd");
pub const MOCK_BIN: &str = env!("CARGO_BIN_EXE_llmproxy-mock");

/// A free loopback port (bind 0, release). Racy in theory; `Proxy::start` retries on a clash.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The mock upstream, killed on drop.
pub struct Mock {
    child: Child,
    pub addr: SocketAddr,
    /// How to reach it when it serves HTTPS.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Mock {
    pub fn start(args: &[&str]) -> Mock {
        Mock::start_env(args, &[])
    }

    /// Starts the mock with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Mock {
        let default_listen: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(MOCK_BIN)
            .args(default_listen)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
            tls: None,
        }
    }

    /// Starts the mock serving HTTPS with `pki`'s certificate.
    pub fn start_tls(args: &[&str], pki: &tls::Pki) -> Mock {
        let mut all = vec!["--tls-cert", &pki.cert_file, "--tls-key", &pki.key_file];
        all.extend_from_slice(args);
        let mut m = Mock::start(&all);
        m.tls = Some(pki.client_config());
        m
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `/_mock/stats` as JSON.
    pub fn stats(&self) -> serde_json::Value {
        let mut c = match &self.tls {
            None => Client::connect(self.port()),
            Some(cfg) => Client::connect_tls(self.port(), cfg.clone()),
        };
        let r = c.request("GET", "/_mock/stats", &[], b"");
        serde_json::from_slice(&r.body).expect("stats json")
    }

    pub fn stat(&self, key: &str) -> u64 {
        self.stats()[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no stat {key}"))
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running llmproxyd, killed on drop. Its stderr goes to a file for assertions.
pub struct Proxy {
    pub child: Option<Child>,
    pub port: u16,
    pub admin: u16,
    pub log: PathBuf,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "llmproxy-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A standard config: one forward on `{PORT}` to group `g` of one upstream `u` (the mock at
/// `{UPSTREAM}` with base path `/v1`), admin on `{ADMIN}`. `extra_upstream` and `extra_group`
/// are YAML lines appended (indented) to the upstream and the group.
pub fn config(
    mock_port: u16,
    extra_forward: &str,
    extra_upstream: &str,
    extra_group: &str,
) -> String {
    config_with_url(
        &format!("http://127.0.0.1:{mock_port}/v1"),
        extra_forward,
        extra_upstream,
        extra_group,
    )
}

/// [`config`] with the upstream at `url` (e.g. `http://127.0.0.1:{port}` with no base path, so
/// that a client request to `/echo` reaches the mock's `/echo`).
pub fn config_with_url(
    url: &str,
    extra_forward: &str,
    extra_upstream: &str,
    extra_group: &str,
) -> String {
    format!(
        "http_server:
  forwards:
    - name: f
      address: 127.0.0.1
      port: {{PORT}}
      upstream_group: g
{extra_forward}
  admin:
    address: 127.0.0.1
    port: {{ADMIN}}
upstreams:
  - name: u
    url: {url}
{extra_upstream}
upstream_groups:
  - name: g
    upstreams:
      - name: u
{extra_group}
"
    )
}

/// One forward `f` (on `{PORT}`) to group `g` of `members` — `(name, mock port, extra YAML lines
/// for that upstream)`, each with base path `/v1` — and `group_extra` YAML lines for the group.
pub fn group_config(members: &[(&str, u16, &str)], group_extra: &str) -> String {
    let mut y = String::from(
        "http_server:\n  forwards:\n    - name: f\n      address: 127.0.0.1\n      port: {PORT}\n      upstream_group: g\n  admin:\n    address: 127.0.0.1\n    port: {ADMIN}\nupstreams:\n",
    );
    for (name, port, extra) in members {
        y.push_str(&format!(
            "  - name: {name}\n    url: http://127.0.0.1:{port}/v1\n"
        ));
        if !extra.is_empty() {
            y.push_str(extra);
            y.push('\n');
        }
    }
    y.push_str("upstream_groups:\n  - name: g\n    upstreams:\n");
    for (name, _, _) in members {
        y.push_str(&format!("      - name: {name}\n"));
    }
    y.push_str(group_extra);
    y.push('\n');
    y
}

impl Proxy {
    /// Starts llmproxyd on `yaml` (with `{PORT}` and `{ADMIN}` replaced by free ports) and
    /// waits until the forward accepts connections.
    pub fn start(yaml: &str, args: &[&str]) -> Proxy {
        Proxy::start_with(yaml, args, |_| {})
    }

    /// [`Proxy::start`] with `setup` applied to the command first (environment, limits).
    pub fn start_with(yaml: &str, args: &[&str], setup: impl Fn(&mut Command)) -> Proxy {
        for _ in 0..5 {
            if let Some(p) = Proxy::try_start(yaml, args, &setup) {
                return p;
            }
        }
        panic!("llmproxyd did not start");
    }

    fn try_start(yaml: &str, args: &[&str], setup: &dyn Fn(&mut Command)) -> Option<Proxy> {
        let dir = TempDir::new();
        let port = free_port();
        // Two ephemeral binds in a row can return the same port.
        let admin = loop {
            let a = free_port();
            if a != port {
                break a;
            }
        };
        let cfg = dir.0.join("config.yaml");
        std::fs::write(
            &cfg,
            yaml.replace("{PORT}", &port.to_string())
                .replace("{ADMIN}", &admin.to_string()),
        )
        .unwrap();
        let log = dir.0.join("proxy.log");
        let mut cmd = Command::new(PROXY_BIN);
        cmd.arg("-c")
            .arg(&cfg)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        setup(&mut cmd);
        let child = cmd.spawn().expect("start llmproxyd");
        let mut p = Proxy {
            child: Some(child),
            port,
            admin,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(st) = p.child.as_mut().unwrap().try_wait().unwrap() {
                let log = p.log_text();
                if log.contains("Address already in use") {
                    return None;
                }
                panic!("llmproxyd exited with {st}: {log}");
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(p);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("llmproxyd did not listen: {}", p.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, &[], b"")
    }

    pub fn admin_get(&self, path: &str) -> Response {
        request(self.admin, "GET", path, &[], b"")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A parsed response as the client saw it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body was chunked and ended with the last chunk.
    pub chunked_complete: bool,
    /// The server closed the connection after the response.
    pub closed: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not json ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The first value of header `name` (as sent) that the mock's `/echo` answer `echo` says it
/// received.
pub fn echoed_header<'a>(echo: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    echo["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0].as_str() == Some(name))
        .and_then(|h| h[1].as_str())
}

/// A raw client connection (plain, or TLS when made by [`Client::connect_tls`]).
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
    tls: Option<Box<rustls::ClientConnection>>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
            tls: None,
        }
    }

    /// A TLS connection to 127.0.0.1:`port` with `cfg` (the handshake runs with the first IO).
    pub fn connect_tls(port: u16, cfg: std::sync::Arc<rustls::ClientConfig>) -> Client {
        let mut c = Client::connect(port);
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        c.tls = Some(Box::new(rustls::ClientConnection::new(cfg, name).unwrap()));
        c
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.tls {
            None => self.stream.write_all(bytes),
            Some(t) => {
                let mut s = rustls::Stream::new(&mut **t, &mut self.stream);
                s.write_all(bytes)?;
                s.flush()
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.write_all(bytes).expect("send");
    }

    /// Like [`Client::send`], but a server that already closed is not a failure.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.write_all(bytes).is_ok()
    }

    /// Half-closes the connection: the server reads EOF after what was sent (over TLS after a
    /// close_notify).
    pub fn shutdown_write(&mut self) {
        if let Some(t) = &mut self.tls {
            t.send_close_notify();
            let _ = t.complete_io(&mut self.stream);
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Reads what arrives next (decrypted over TLS); Ok(0) at EOF, including a TLS peer that
    /// closed without close_notify.
    pub fn read_some(&mut self, tmp: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.tls {
            None => self.stream.read(tmp),
            Some(t) => match rustls::Stream::new(&mut **t, &mut self.stream).read(tmp) {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }

    /// The ALPN protocol the server chose (TLS only).
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.tls.as_ref()?.alpn_protocol().map(|p| p.to_vec())
    }

    /// Sets how long a single read waits (10 s unless changed).
    pub fn set_read_timeout(&mut self, wait: Duration) {
        self.stream.set_read_timeout(Some(wait)).unwrap();
    }

    /// Reads more bytes; Ok(0) at EOF.
    fn fill(&mut self) -> std::io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.read_some(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Reads one response (the head, then the body by its framing). `None` when the
    /// connection closed (or timed out) before a complete head.
    pub fn read_response(&mut self, method: &str) -> Option<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            match self.fill() {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut resp = Response {
            status,
            headers: headers.clone(),
            body: Vec::new(),
            chunked_complete: false,
            closed: false,
        };
        if (100..200).contains(&status) {
            return Some(resp);
        }
        let no_body = method == "HEAD" || status == 204 || status == 304;
        if no_body {
        } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let Some(line_end) = find(&self.buf, b"\r\n") else {
                    match self.fill() {
                        Ok(0) | Err(_) => {
                            resp.closed = true;
                            return Some(resp);
                        }
                        Ok(_) => continue,
                    }
                };
                let size_str = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
                    .expect("chunk size");
                while self.buf.len() < line_end + 2 + size + 2 {
                    match self.fill() {
                        Ok(0) | Err(_) => {
                            let avail = self.buf.len().saturating_sub(line_end + 2).min(size);
                            resp.body
                                .extend_from_slice(&self.buf[line_end + 2..line_end + 2 + avail]);
                            resp.closed = true;
                            return Some(resp);
                        }
                        Ok(_) => {}
                    }
                }
                resp.body
                    .extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    resp.chunked_complete = true;
                    break;
                }
            }
        } else if let Some(len) = get("content-length") {
            let len: usize = len.parse().expect("content-length");
            while self.buf.len() < len {
                match self.fill() {
                    Ok(0) | Err(_) => {
                        resp.body = std::mem::take(&mut self.buf);
                        resp.closed = true;
                        return Some(resp);
                    }
                    Ok(_) => {}
                }
            }
            resp.body = self.buf.drain(..len).collect();
        } else {
            while let Ok(n) = self.fill() {
                if n == 0 {
                    break;
                }
            }
            resp.body = std::mem::take(&mut self.buf);
            resp.closed = true;
            return Some(resp);
        }
        if get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            resp.closed = self.is_closed(Duration::from_millis(500));
        }
        Some(resp)
    }

    /// True when the server closes the connection within `wait` (no further bytes).
    pub fn is_closed(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let r = self.fill();
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match r {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    /// Reads whatever arrives until `wait` passes with nothing new or the peer closes; returns
    /// (bytes, closed).
    pub fn read_raw(&mut self, wait: Duration) -> (Vec<u8>, bool) {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut closed = false;
        loop {
            match self.fill() {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        (std::mem::take(&mut self.buf), closed)
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: test\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send(&bytes);
        self.read_response(method).expect("response")
    }
}

/// One request on a fresh connection.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    Client::connect(port).request(method, path, headers, body)
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Polls `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}
