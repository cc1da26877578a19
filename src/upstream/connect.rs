//! Opening upstream connections (shard): TCP to the upstream or to the group's outbound proxy, a
//! `CONNECT` tunnel through that proxy for an https upstream, then the TLS handshake, all within
//! the group's `timeout.connect`. [`Egress`], built at startup, says how each group reaches its
//! members.
//!
//! Through a proxy, an http upstream is not tunnelled: its requests go to the proxy in absolute
//! form (`POST http://host/path`) with `Proxy-Authorization` (see `request.rs`). The proxy's
//! credentials are only ever written to the proxy connection, never logged.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::pool::UpConn;
use crate::config::{Config, HttpClient, Proxy, Upstream};
use crate::io::read_append;
use crate::tls::stream::{Conn, OutboundConn};

/// Largest `CONNECT` response head accepted from a proxy.
const MAX_CONNECT_HEAD: usize = 16 * 1024;

/// An outbound proxy and its addresses, resolved at startup (tried in order, IPv4 first).
#[derive(Debug, Clone)]
pub struct OutboundProxy {
    pub addrs: Box<[SocketAddr]>,
    pub proxy: Proxy,
}

/// How connections leave the process (built at startup, read-only on the shards).
#[derive(Debug, Clone, Default)]
pub struct Egress {
    /// Per upstream: its addresses, resolved at startup, in the order they are tried (IPv4
    /// first); empty when only proxies reach it (the proxy resolves the name then).
    pub upstream_addrs: Vec<Box<[SocketAddr]>>,
    /// The distinct outbound proxies.
    pub proxies: Vec<OutboundProxy>,
    /// Per group: 0 = direct, `n` = through `proxies[n - 1]`.
    pub group_via: Vec<usize>,
}

impl Egress {
    /// Resolves every address once (a shard never blocks on DNS). An upstream that every group
    /// reaches through a proxy is not resolved here.
    pub fn resolve(cfg: &Config) -> Result<Egress, String> {
        // Every name that does not resolve is reported, each at its YAML path.
        let mut errors = Vec::new();
        let mut proxies: Vec<OutboundProxy> = Vec::new();
        let mut group_via = Vec::with_capacity(cfg.groups.len());
        for (gi, g) in cfg.groups.iter().enumerate() {
            let Some(p) = &g.client.proxy else {
                group_via.push(0);
                continue;
            };
            let same = |o: &OutboundProxy| {
                o.proxy.host == p.host
                    && o.proxy.port == p.port
                    && o.proxy.authorization == p.authorization
            };
            if let Some(i) = proxies.iter().position(same) {
                group_via.push(i + 1);
                continue;
            }
            match resolve(&p.host, p.port) {
                Ok(addrs) => {
                    proxies.push(OutboundProxy {
                        addrs,
                        proxy: p.clone(),
                    });
                    group_via.push(proxies.len());
                }
                Err(e) => {
                    errors.push(format!(
                        "{}: {e} (proxy {})",
                        cfg.dialect.group_proxy_url_path(gi),
                        p.display_url
                    ));
                    group_via.push(usize::MAX);
                }
            }
        }
        let mut upstream_addrs = Vec::with_capacity(cfg.upstreams.len());
        for (i, u) in cfg.upstreams.iter().enumerate() {
            let mut groups = cfg
                .groups
                .iter()
                .enumerate()
                .filter(|(_, g)| g.members.iter().any(|m| m.upstream == i))
                .peekable();
            let proxied_only = groups.peek().is_some() && groups.all(|(gi, _)| group_via[gi] != 0);
            if proxied_only {
                upstream_addrs.push(Box::default());
                continue;
            }
            match resolve(&u.host, u.port) {
                Ok(a) => upstream_addrs.push(a),
                Err(e) => {
                    errors.push(format!("upstreams[{i}].url: {e} (upstream {})", u.name));
                    upstream_addrs.push(Box::default());
                }
            }
        }
        if !errors.is_empty() {
            let n = errors.len();
            return Err(format!(
                "{n} host name{} did not resolve:\n{}",
                if n == 1 { "" } else { "s" },
                errors.join("\n")
            ));
        }
        Ok(Egress {
            upstream_addrs,
            proxies,
            group_via,
        })
    }

    /// How many ways there are to reach an upstream (direct plus one per proxy): the pool keeps
    /// connections made one way apart from those made another.
    pub fn vias(&self) -> usize {
        self.proxies.len() + 1
    }

    /// The proxy behind `via`, if any.
    pub fn proxy(&self, via: usize) -> Option<&OutboundProxy> {
        via.checked_sub(1).and_then(|i| self.proxies.get(i))
    }
}

pub(super) fn resolve(host: &str, port: u16) -> Result<Box<[SocketAddr]>, String> {
    let found = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve host `{host}`: {e}"))?;
    let addrs = ordered_addresses(found);
    if addrs.is_empty() {
        return Err(format!("host `{host}` has no address"));
    }
    Ok(addrs)
}

/// A resolved name's addresses in the order connections try them: the IPv4 ones first (as
/// Envoy's `V4_PREFERRED` prefers them), then the others, each family in the resolver's order,
/// without duplicates. The resolver lists `::1` before `127.0.0.1` for `localhost` where
/// /etc/hosts maps both, and local model servers (vLLM, Ollama) usually listen on IPv4 only; one
/// listening on `::1` only is still reached, through the next address.
fn ordered_addresses(found: impl IntoIterator<Item = SocketAddr>) -> Box<[SocketAddr]> {
    let mut v4 = Vec::new();
    let mut other = Vec::new();
    for a in found {
        let list = if a.is_ipv4() { &mut v4 } else { &mut other };
        if !list.contains(&a) {
            list.push(a);
        }
    }
    v4.append(&mut other);
    v4.into_boxed_slice()
}

/// Why an outbound proxy did not give us a connection.
#[derive(Debug)]
pub enum ProxyFailure {
    /// TCP connect to the proxy failed.
    Unreachable(io::Error),
    /// The proxy answered `CONNECT` with this non-2xx status.
    Refused(u16),
    /// The proxy's answer to `CONNECT` was not HTTP, too large, or it closed.
    BadResponse(&'static str),
}

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// Not done within `timeout.connect` (TCP, tunnel and handshake together).
    Timeout,
    /// TCP connect to the upstream failed.
    Io(io::Error),
    /// The TLS handshake failed; `certificate`: because the upstream's certificate was
    /// rejected (untrusted, expired, another name).
    Tls { certificate: bool, reason: String },
    /// The outbound proxy failed.
    Proxy(ProxyFailure),
}

/// Opens a connection to upstream `up` the way `via` says, within `client.connect_timeout`.
/// An HTTPS upstream is reached with `connector`, the shard's own (`ShardCtx::connectors`, made
/// for every upstream with `tls`).
pub async fn open(
    egress: &Egress,
    uidx: usize,
    up: &Upstream,
    via: usize,
    client: &HttpClient,
    connector: Option<&monoio_rustls::TlsConnector>,
) -> Result<UpConn, ConnectError> {
    monoio::time::timeout(
        client.connect_timeout,
        open_inner(egress, uidx, up, via, client, connector),
    )
    .await
    .unwrap_or(Err(ConnectError::Timeout))
}

async fn open_inner(
    egress: &Egress,
    uidx: usize,
    up: &Upstream,
    via: usize,
    client: &HttpClient,
    connector: Option<&monoio_rustls::TlsConnector>,
) -> Result<UpConn, ConnectError> {
    let proxy = egress.proxy(via);
    let tcp = match proxy {
        Some(p) => tcp_connect_any(&p.addrs, client.tcp_keepalive)
            .await
            .map_err(|e| ConnectError::Proxy(ProxyFailure::Unreachable(e)))?,
        None => {
            let addrs = egress.upstream_addrs.get(uidx).map_or(&[][..], |a| &a[..]);
            tcp_connect_any(addrs, client.tcp_keepalive)
                .await
                .map_err(ConnectError::Io)?
        }
    };
    let Some(tls) = &up.tls else {
        return Ok(UpConn::new(Conn::Plain(tcp)));
    };
    let mut tcp = tcp;
    if let Some(p) = proxy {
        tunnel(&mut tcp, up, &p.proxy)
            .await
            .map_err(ConnectError::Proxy)?;
    }
    let Some(connector) = connector else {
        // Never sent plain to an https upstream.
        return Err(ConnectError::Tls {
            certificate: false,
            reason: "no TLS connector for this upstream".into(),
        });
    };
    match OutboundConn::connect_tls(connector, tls.server_name.clone(), tcp).await {
        Ok(c) => Ok(UpConn::new(c)),
        Err(e) => {
            let e = io::Error::from(e);
            let certificate = matches!(
                crate::tls::rustls_error(&e),
                Some(rustls::Error::InvalidCertificate(_))
            );
            let reason = match crate::tls::rustls_error(&e) {
                Some(r) => r.to_string(),
                None => e.to_string(),
            };
            Err(ConnectError::Tls {
                certificate,
                reason,
            })
        }
    }
}

/// Connects to the first of a name's `addrs` that takes the connection, in order: one that fails
/// (refused, unreachable) hands over to the next at once. The caller's connect timeout bounds
/// them all together, so an address that never answers uses it up (there is no per-address
/// share). The last address's error is returned.
async fn tcp_connect_any(
    addrs: &[SocketAddr],
    keepalive: Option<Duration>,
) -> io::Result<TcpStream> {
    let mut last = None;
    for (i, &addr) in addrs.iter().enumerate() {
        match tcp_connect(addr, keepalive).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                if i + 1 < addrs.len() {
                    tracing::debug!(%addr, error = %e, "connect failed; trying the next address");
                }
                last = Some(e);
            }
        }
    }
    Err(last
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "address not resolved")))
}

async fn tcp_connect(addr: SocketAddr, keepalive: Option<Duration>) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_addr(addr).await?;
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let _ = stream.set_tcp_keepalive(Some(idle), None, None);
    }
    Ok(stream)
}

/// `host:port` as a `CONNECT` target (IPv6 literals bracketed).
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Asks the proxy for a tunnel to the upstream; on success the stream is the tunnel.
async fn tunnel(tcp: &mut TcpStream, up: &Upstream, proxy: &Proxy) -> Result<(), ProxyFailure> {
    let target = authority(&up.host, up.port);
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        req.push_str("proxy-authorization: ");
        req.push_str(auth);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let (res, _) = tcp.write_all(req.into_bytes()).await;
    res.map_err(|_| ProxyFailure::BadResponse("the proxy closed the connection"))?;

    let mut buf = bytes::BytesMut::with_capacity(4096);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                if !(200..300).contains(&status) {
                    return Err(ProxyFailure::Refused(status));
                }
                if n != buf.len() {
                    // The upstream speaks only after our ClientHello: bytes here are not TLS.
                    return Err(ProxyFailure::BadResponse(
                        "the proxy sent data after its CONNECT answer",
                    ));
                }
                return Ok(());
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return Err(ProxyFailure::BadResponse("not an HTTP answer")),
        }
        if buf.len() >= MAX_CONNECT_HEAD {
            return Err(ProxyFailure::BadResponse("CONNECT answer head too large"));
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let (res, b) = read_append(tcp, buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => {
                return Err(ProxyFailure::BadResponse(
                    "the proxy closed the connection during CONNECT",
                ))
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_targets_bracket_ipv6() {
        assert_eq!(authority("api.example.com", 443), "api.example.com:443");
        assert_eq!(authority("10.0.0.1", 8443), "10.0.0.1:8443");
        assert_eq!(authority("::1", 443), "[::1]:443");
    }
}

#[cfg(test)]
mod resolve_tests {
    use super::{ordered_addresses, tcp_connect_any};
    use std::net::SocketAddr;

    #[test]
    fn ipv4_comes_first_when_a_name_has_both_families() {
        let v6: SocketAddr = "[::1]:8000".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let v4b: SocketAddr = "127.0.0.2:8000".parse().unwrap();
        let v6b: SocketAddr = "[2001:db8::1]:8000".parse().unwrap();
        assert_eq!(&*ordered_addresses([v6, v4]), &[v4, v6]);
        assert_eq!(&*ordered_addresses([v4, v6, v4]), &[v4, v6]);
        assert_eq!(&*ordered_addresses([v6, v4b, v6b, v4]), &[v4b, v4, v6, v6b]);
        assert!(ordered_addresses([]).is_empty());
    }

    /// Runs `f` on the epoll driver and, where the kernel has it, on io_uring.
    fn on_both_drivers(f: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>) {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap()
            .block_on(f());
        if let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().build() {
            rt.block_on(f());
        }
    }

    /// A name's addresses are tried in order: one that refuses the connection (a server
    /// listening on another family, a dead replica) passes the connection to the next.
    #[test]
    fn a_refused_address_passes_the_connection_to_the_next() {
        let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live_addr = live.local_addr().unwrap();
        let dead_addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        on_both_drivers(|| {
            Box::pin(async move {
                let s = tcp_connect_any(&[dead_addr, live_addr], None)
                    .await
                    .expect("the second address accepts");
                assert_eq!(s.peer_addr().unwrap(), live_addr);
                let e = tcp_connect_any(&[dead_addr, dead_addr], None)
                    .await
                    .unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
                let e = tcp_connect_any(&[], None).await.unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::AddrNotAvailable);
            })
        });
    }
}
