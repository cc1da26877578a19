//! Upstream connections and the per-shard keep-alive pool (shard). No locks: one pool per shard,
//! one idle list per upstream.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::net::TcpStream;

/// Read buffer size for upstream connections.
const READ_BUF: usize = 16 * 1024;

/// A pooled connection idle for less than this is reused without a liveness peek (see
/// [`Pool::take`]).
pub const PEEK_AFTER: Duration = Duration::from_millis(1);

/// One connection to an upstream, with its read buffer.
pub struct UpConn {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    /// When it went idle (meaningful only while pooled).
    idle_since: Instant,
    /// Whether it served a request before (a reused connection can be stale).
    pub reused: bool,
}

impl UpConn {
    /// Connects with a timeout, sets TCP_NODELAY and keepalive.
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        tcp_keepalive: Option<Duration>,
    ) -> Result<UpConn, ConnectError> {
        let stream = match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        if let Some(idle) = tcp_keepalive {
            let _ = stream.set_tcp_keepalive(Some(idle), None, None);
        }
        Ok(UpConn {
            stream,
            rbuf: BytesMut::with_capacity(READ_BUF),
            idle_since: Instant::now(),
            reused: false,
        })
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

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(io::Error),
}

/// Idle keep-alive connections per upstream, owned by one shard.
pub struct Pool {
    idle: Vec<RefCell<Vec<UpConn>>>,
}

impl Pool {
    pub fn new(upstreams: usize) -> Self {
        Pool {
            idle: (0..upstreams).map(|_| RefCell::new(Vec::new())).collect(),
        }
    }

    /// The most recently used live idle connection to `upstream`, if any.
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
    pub fn take(&self, upstream: usize, idle_timeout: Duration) -> Option<UpConn> {
        let mut list = self.idle.get(upstream)?.borrow_mut();
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
    pub fn put(&self, upstream: usize, mut conn: UpConn, max_idle: usize) {
        let Some(list) = self.idle.get(upstream) else {
            return;
        };
        let mut list = list.borrow_mut();
        if list.len() >= max_idle || !conn.rbuf.is_empty() {
            return;
        }
        conn.idle_since = Instant::now();
        list.push(conn);
    }

    /// Drops idle connections older than their timeout (called on the shard's tick).
    pub fn sweep(&self, idle_timeout: impl Fn(usize) -> Duration) {
        let now = Instant::now();
        for (i, list) in self.idle.iter().enumerate() {
            let limit = idle_timeout(i);
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

    pub fn idle_count(&self, upstream: usize) -> usize {
        self.idle.get(upstream).map_or(0, |l| l.borrow().len())
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
            let pool = Pool::new(1);
            // How long ago each connection went idle (set directly, so a slow test machine
            // cannot turn "just now" into "a while ago").
            let now = Instant::now();
            for (idle_since, reused) in [
                (now + Duration::from_secs(1), true),
                (now - PEEK_AFTER * 3, false),
            ] {
                let c = UpConn::connect(addr, Duration::from_secs(1), None)
                    .await
                    .unwrap();
                let (peer, _) = l.accept().unwrap();
                drop(peer);
                // Let the FIN arrive before the pool sees the connection.
                std::thread::sleep(Duration::from_millis(20));
                pool.put(0, c, 8);
                pool.idle[0].borrow_mut()[0].idle_since = idle_since;
                assert_eq!(pool.take(0, Duration::from_secs(60)).is_some(), reused);
                assert_eq!(pool.idle_count(0), 0);
            }
        });
    }
}
