//! Mock OpenAI-compatible LLM upstream for tests, benchmarks and the first run.
//!
//! A small HTTP/1.1 server on monoio (one runtime per thread, all threads
//! bound to the same port with `SO_REUSEPORT`). See [`MockConfig`] for the
//! knobs and `src/bin/llmproxy-mock.rs` for the CLI.
//!
//! In-process use (tests, benches):
//!
//! ```no_run
//! let server = llmproxy::mock::start(llmproxy::mock::MockConfig::default()).unwrap();
//! println!("mock on {}", server.addr());
//! // ... drop(server) stops it.
//! ```

mod conn;
pub mod http;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Server-wide defaults. Every knob except `listen`/`threads` can be
/// overridden per request by an `x-mock-*` header.
#[derive(Debug, Clone)]
pub struct MockConfig {
    pub listen: SocketAddr,
    pub threads: usize,
    /// Delay before the first SSE event.
    pub ttft_ms: u64,
    /// Delay between SSE token events.
    pub gap_ms: u64,
    /// Completion tokens per answer.
    pub tokens: u64,
    /// Status used for injected errors (0 = none configured; 500 is used
    /// when only a rate is given).
    pub error_status: u16,
    /// Fraction (0.0..=1.0) of LLM requests answered with `error_status`.
    /// Deterministic: with 0.25 every 4th request fails.
    pub error_rate: f64,
    /// Close the connection abruptly after this many SSE events (0 = never).
    pub cut_after: u64,
    /// Streams generated at once (0 = unlimited); more wait in a queue.
    pub max_concurrency: usize,
    /// Serve HTTPS with this certificate and key (`--tls-cert`/`--tls-key`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Stamp each SSE event with its send time (`: t=<CLOCK_MONOTONIC ns>` comment line).
    pub stamp: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            threads: 1,
            ttft_ms: 0,
            gap_ms: 0,
            tokens: 16,
            error_status: 0,
            error_rate: 0.0,
            cut_after: 0,
            max_concurrency: 0,
            tls: None,
            stamp: false,
        }
    }
}

/// Counters shared by all threads of one server.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_accepted: AtomicU64,
    /// Gauge of currently open connections (not touched by reset).
    pub connections_open: AtomicI64,
    /// Requests parsed, excluding `/_mock/*` requests.
    pub requests: AtomicU64,
    pub streams_started: AtomicU64,
    pub streams_completed: AtomicU64,
    /// The client closed (or a write failed) while the mock was streaming.
    pub streams_aborted_by_client: AtomicU64,
    /// Streams the mock cut itself because of `cut-after`.
    pub streams_cut: AtomicU64,
    /// Injected error answers (x-mock-status / error-rate).
    pub errors_injected: AtomicU64,
    /// Requests answered 400 because they could not be parsed.
    pub bad_requests: AtomicU64,
    pub last_abort_unix_ms: AtomicU64,
}

impl Stats {
    /// Zero all counters (the `connections_open` gauge is kept, otherwise it
    /// would go negative when the currently open connections close).
    pub fn reset(&self) {
        for c in [
            &self.connections_accepted,
            &self.requests,
            &self.streams_started,
            &self.streams_completed,
            &self.streams_aborted_by_client,
            &self.streams_cut,
            &self.errors_injected,
            &self.bad_requests,
            &self.last_abort_unix_ms,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// JSON snapshot, as served by `GET /_mock/stats`.
    pub fn to_json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "connections_accepted": g(&self.connections_accepted),
            "connections_open": self.connections_open.load(Ordering::Relaxed).max(0),
            "requests": g(&self.requests),
            "streams_started": g(&self.streams_started),
            "streams_completed": g(&self.streams_completed),
            "streams_aborted_by_client": g(&self.streams_aborted_by_client),
            "streams_cut": g(&self.streams_cut),
            "errors_injected": g(&self.errors_injected),
            "bad_requests": g(&self.bad_requests),
            "last_abort_unix_ms": g(&self.last_abort_unix_ms),
        })
    }
}

/// State shared by all threads of one server.
#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: MockConfig,
    pub stats: Arc<Stats>,
    /// Sequence for deterministic error-rate decisions.
    pub error_seq: AtomicU64,
    /// Sequence for response ids.
    pub id_seq: AtomicU64,
    pub stop: AtomicBool,
    /// Streams generating now (for `max_concurrency`).
    pub generating: std::sync::atomic::AtomicUsize,
}

/// A running mock server. Dropping it stops the server threads.
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl MockServer {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Live counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.shared.stats
    }

    /// Block until all server threads exit (i.e. forever unless stopped).
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stop accepting, drop open connections and wait for the threads.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// Bind `cfg.threads` listeners (SO_REUSEPORT, same port; port 0 is resolved
/// by the first bind) and start one monoio runtime thread per listener.
/// Returns once every socket is bound and listening.
pub fn start(cfg: MockConfig) -> io::Result<MockServer> {
    let threads = cfg.threads.max(1);
    let first = bind_std(cfg.listen)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(bind_std(addr)?);
    }
    let shared = Arc::new(Shared {
        cfg,
        stats: Arc::new(Stats::default()),
        error_seq: AtomicU64::new(0),
        id_seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        generating: std::sync::atomic::AtomicUsize::new(0),
    });
    let mut handles = Vec::with_capacity(threads);
    for (i, l) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let h = std::thread::Builder::new()
            .name(format!("mock-{i}"))
            .spawn(move || run_thread(l, shared))?;
        handles.push(h);
    }
    Ok(MockServer {
        addr,
        shared,
        threads: handles,
    })
}

fn run_thread(l: std::net::TcpListener, shared: Arc<Shared>) {
    let mut rt = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("mock: cannot build runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match monoio::net::TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("mock: cannot register listener: {e}");
                return;
            }
        };
        let stop_flag = shared.clone();
        // One long-lived future, so an in-flight accept is only dropped at
        // shutdown (never cancelled by a periodic tick).
        let mut stop = std::pin::pin!(async move {
            loop {
                monoio::time::sleep(Duration::from_millis(50)).await;
                if stop_flag.stop.load(Ordering::Relaxed) {
                    return;
                }
            }
        });
        loop {
            monoio::select! {
                _ = &mut stop => return,
                res = listener.accept() => match res {
                    Ok((stream, _peer)) => {
                        let _ = stream.set_nodelay(true);
                        monoio::spawn(conn::serve(stream, shared.clone()));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off a little, keep serving.
                        tracing::warn!("mock: accept failed: {e}");
                        monoio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
    });
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the `x-mock-stamp` event stamps (the one
/// `std::time::Instant` uses on Linux, shared by all processes of the machine).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Start the server, print the `listening` line to stdout and serve forever.
pub fn run(cfg: MockConfig) -> io::Result<()> {
    use std::io::Write;
    let server = start(cfg)?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "llmproxy-mock listening on {}", server.addr())?;
        out.flush()?;
    }
    server.join();
    Ok(())
}
