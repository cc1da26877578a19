//! A forward-proxy test double on loopback: `CONNECT` tunnels and absolute-form HTTP requests,
//! to loopback targets only. It records every request line and `Proxy-Authorization` value it
//! receives, so tests can check what llmproxyd sent to its outbound proxy.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::find;

/// What the proxy lets through.
#[derive(Clone, Debug)]
pub enum Policy {
    /// Everything.
    Open,
    /// Only requests carrying exactly this `Proxy-Authorization` value; 407 otherwise.
    RequireAuth(String),
    /// Answers every request with this status.
    Refuse(u16),
}

/// One request as the proxy received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub line: String,
    pub auth: Option<String>,
}

/// The running double; stops accepting on drop.
pub struct ForwardProxy {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl ForwardProxy {
    pub fn start(policy: Policy) -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, st) = (seen.clone(), connections.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (s, policy) = (s.clone(), policy.clone());
                std::thread::spawn(move || serve(conn, &policy, &s));
            }
        });
        ForwardProxy {
            port,
            seen,
            connections,
            stop,
        }
    }

    /// Every request received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one head (through `\r\n\r\n`) into `buf`; returns its length, or None at EOF.
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut tmp = [0u8; 8192];
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

fn reply(s: &mut TcpStream, status: u16, extra: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status} Test\r\ncontent-length: 0\r\nconnection: close\r\n{extra}\r\n"
    );
    let _ = s.flush();
    let _ = s.shutdown(Shutdown::Write);
}

/// `host:port` of a loopback target, or None.
fn loopback(authority: &str) -> Option<String> {
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    matches!(host, "127.0.0.1" | "localhost").then(|| format!("127.0.0.1:{port}"))
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut tmp = [0u8; 16384];
    loop {
        match from.read(&mut tmp) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&tmp[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn serve(mut client: TcpStream, policy: &Policy, seen: &Mutex<Vec<Seen>>) {
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = Vec::new();
    let mut upstream: Option<(String, TcpStream)> = None;
    loop {
        let Some(head_len) = read_head(&mut client, &mut buf) else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        buf.drain(..head_len);
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let auth = get("proxy-authorization");
        seen.lock().unwrap().push(Seen {
            line: line.clone(),
            auth: auth.clone(),
        });
        match policy {
            Policy::Open => {}
            Policy::Refuse(status) => return reply(&mut client, *status, ""),
            Policy::RequireAuth(want) => {
                if auth.as_deref() != Some(want.as_str()) {
                    return reply(
                        &mut client,
                        407,
                        "proxy-authenticate: Basic realm=\"test\"\r\n",
                    );
                }
            }
        }
        let mut parts = line.split(' ');
        let (method, target, version) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        if method == "CONNECT" {
            let Some(addr) = loopback(target) else {
                return reply(&mut client, 403, "");
            };
            let Ok(mut up) = TcpStream::connect(&addr) else {
                return reply(&mut client, 502, "");
            };
            let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
            if !buf.is_empty() {
                let _ = up.write_all(&buf);
            }
            let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || pipe(u2, c2));
            client.set_read_timeout(None).unwrap();
            return pipe(client, up);
        }
        // Absolute form: http://host:port/path.
        let Some(rest) = target.strip_prefix("http://") else {
            return reply(&mut client, 400, "");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let Some(addr) = loopback(authority) else {
            return reply(&mut client, 403, "");
        };
        if upstream.as_ref().is_some_and(|(a, _)| *a != addr) {
            return reply(&mut client, 400, "");
        }
        if upstream.is_none() {
            let Ok(up) = TcpStream::connect(&addr) else {
                return reply(&mut client, 502, "");
            };
            let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || pipe(u2, c2));
            upstream = Some((addr, up));
        }
        let up = &mut upstream.as_mut().unwrap().1;
        let mut out = format!("{method} {path} {version}\r\n");
        for (n, v) in &headers {
            if n != "proxy-authorization" {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
        }
        out.push_str("\r\n");
        let len: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            let mut tmp = [0u8; 8192];
            match client.read(&mut tmp) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        let mut bytes = out.into_bytes();
        bytes.extend(buf.drain(..len));
        if up.write_all(&bytes).is_err() {
            return;
        }
    }
}
