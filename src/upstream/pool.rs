//! Upstream connections and the per-shard keep-alive pool (shard). No locks: one pool per shard,
//! one idle list per upstream.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::tls::stream::OutboundConn;

/// Read buffer size for upstream connections.
const READ_BUF: usize = 16 * 1024;

/// A pooled connection idle for less than this is reused without a liveness peek (see
/// [`Pool::take`]).
pub const PEEK_AFTER: Duration = Duration::from_millis(1);

/// One connection to an upstream (plain or TLS), with its read buffer.
pub struct UpConn {
    pub stream: OutboundConn,
    pub rbuf: BytesMut,
    /// When it went idle (meaningful only while pooled).
    idle_since: Instant,
    /// Whether it served a request before (a reused connection can be stale).
    pub reused: bool,
}

impl UpConn {
    /// A fresh connection (made by `connect::open`).
    pub fn new(stream: OutboundConn) -> UpConn {
        UpConn {
            stream,
            rbuf: BytesMut::with_capacity(READ_BUF),
            idle_since: Instant::now(),
            reused: false,
        }
    }

    /// Makes room for the next read.
    pub fn reserve(&mut self) {
        if self.rbuf.capacity() - self.rbuf.len() < READ_BUF / 4 {
            self.rbuf.reserve(READ_BUF);
        }
    }

    /// True when the peer has not closed or written anything while the connection idled. A
    /// non-blocking peek: an upstream that closed its end (vLLM/uvicorn close idle connections
    /// after 5 s) is detected before a request is sent on it.
    ///
    /// Over TLS the peek sees ciphertext. Any byte there counts as "not alive" too: on an idle
    /// TLS connection it is almost always the peer's close_notify before its FIN, and it could
    /// also be a late session ticket or key update, which rustls would have to process first;
    /// dropping the connection costs a handshake, never a failed request.
    fn looks_alive(&self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: a plain recv(2) into a local buffer on a socket we own; MSG_PEEK leaves the
        // data (there should be none) in the socket.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return e.kind() == io::ErrorKind::WouldBlock;
        }
        false
    }
}

/// Idle keep-alive connections per upstream and per way of reaching it (`via`: direct, or
/// through one of the outbound proxies; a connection to a proxy must never carry a request
/// meant to go direct, or the reverse), owned by one shard.
pub struct Pool {
    idle: Vec<RefCell<Vec<UpConn>>>,
    vias: usize,
}

impl Pool {
    pub fn new(upstreams: usize, vias: usize) -> Self {
        let vias = vias.max(1);
        Pool {
            idle: (0..upstreams * vias)
                .map(|_| RefCell::new(Vec::new()))
                .collect(),
            vias,
        }
    }

    fn slot(&self, upstream: usize, via: usize) -> Option<&RefCell<Vec<UpConn>>> {
        if via >= self.vias {
            return None;
        }
        self.idle.get(upstream * self.vias + via)
    }

    /// The most recently used live idle connection to `upstream` made through `via`, if any.
    ///
    /// A connection idle for longer than [`PEEK_AFTER`] is checked with a non-blocking peek (a
    /// syscall) before reuse; one that went idle more recently is not. Why that is safe
    /// enough: upstreams close idle keep-alive connections after their own idle timeout
    /// (seconds: uvicorn 5 s, Go and Node 5 s+, nginx 75 s), and a server that means to close
    /// after a response says `Connection: close` (such connections are never pooled). What is
    /// left is a close at an arbitrary instant (a restart closing its idle connections, or a
    /// server that closes without saying so). The peek never covered that fully either: a FIN
    /// still in flight (up to one network latency) is not seen. Skipping it for connections
    /// idle under 1 ms adds at most 1 ms to that window. In it, an idempotent request is sent
    /// again on a fresh connection as before; a POST fails with 502 `upstream_bad_response`
    /// unless the group's retry policy allows a replay, as it would with a FIN in flight.
    pub fn take(&self, upstream: usize, via: usize, idle_timeout: Duration) -> Option<UpConn> {
        let mut list = self.slot(upstream, via)?.borrow_mut();
        let now = Instant::now();
        while let Some(mut c) = list.pop() {
            let idle = now.duration_since(c.idle_since);
            if idle < idle_timeout && (idle < PEEK_AFTER || c.looks_alive()) {
                c.reused = true;
                return Some(c);
            }
            tracing::debug!(
                upstream,
                "dropped an idle upstream connection the peer had closed"
            );
        }
        None
    }

    /// Returns a connection whose last exchange ended cleanly.
    pub fn put(&self, upstream: usize, via: usize, mut conn: UpConn, max_idle: usize) {
        let Some(list) = self.slot(upstream, via) else {
            return;
        };
        let mut list = list.borrow_mut();
        if list.len() >= max_idle || !conn.rbuf.is_empty() || !conn.stream.is_sound() {
            return;
        }
        conn.idle_since = Instant::now();
        list.push(conn);
    }

    /// Drops idle connections older than their upstream's timeout (called on the shard's tick).
    pub fn sweep(&self, idle_timeout: impl Fn(usize) -> Duration) {
        let now = Instant::now();
        for (i, list) in self.idle.iter().enumerate() {
            let limit = idle_timeout(i / self.vias);
            list.borrow_mut()
                .retain(|c| now.duration_since(c.idle_since) < limit);
        }
    }

    /// Closes every idle connection (shutdown).
    pub fn clear(&self) {
        for list in &self.idle {
            list.borrow_mut().clear();
        }
    }

    /// Idle connections to `upstream`, however they were made.
    pub fn idle_count(&self, upstream: usize) -> usize {
        (0..self.vias)
            .filter_map(|via| self.slot(upstream, via))
            .map(|l| l.borrow().len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled connection whose peer has closed: reused blindly within PEEK_AFTER of going idle
    /// (the documented window), dropped by the peek after it.
    #[test]
    fn peek_only_after_the_connection_idled_past_peek_after() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let pool = Pool::new(1, 1);
            // How long ago each connection went idle (set directly, so a slow test machine
            // cannot turn "just now" into "a while ago").
            let now = Instant::now();
            for (idle_since, reused) in [
                (now + Duration::from_secs(1), true),
                (now - PEEK_AFTER * 3, false),
            ] {
                let tcp = monoio::net::TcpStream::connect_addr(addr).await.unwrap();
                let c = UpConn::new(crate::tls::stream::Conn::Plain(tcp));
                let (peer, _) = l.accept().unwrap();
                drop(peer);
                // Let the FIN arrive before the pool sees the connection.
                std::thread::sleep(Duration::from_millis(20));
                pool.put(0, 0, c, 8);
                pool.idle[0].borrow_mut()[0].idle_since = idle_since;
                assert_eq!(pool.take(0, 0, Duration::from_secs(60)).is_some(), reused);
                assert_eq!(pool.idle_count(0), 0);
            }
        });
    }
}
