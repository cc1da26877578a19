//! The load generator: a few pinned threads, one monoio runtime each (io_uring, epoll
//! fallback), one task per connection. Cheap enough to hold 10 000 connections and to leave the
//! proxy its core. Workloads: closed-loop request/response, SSE streams, "hold" (open N
//! connections or streams, keep them open until released) and "churn" (a new connection per
//! request: the cost of connection setup, with TLS a full handshake). Plain TCP or TLS, as the
//! [`Dest`] says.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::client::{Conn, Dest, EventScanner, Resp};
use crate::sys::{self, now_ns};

/// A request or stream that takes longer than this counts as an error (never a hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the generator runs.
#[derive(Clone, Debug)]
pub struct GenPlan {
    pub threads: usize,
    pub cpus: Vec<usize>,
    /// The epoll driver instead of io_uring.
    pub epoll: bool,
}

/// Running generator threads.
pub struct Generator<R> {
    handles: Vec<JoinHandle<R>>,
    tids: Arc<Mutex<Vec<i32>>>,
    /// Threads stay alive (idle) until joined, so their CPU time can be read after the window.
    joined: Arc<AtomicBool>,
}

impl<R> Generator<R> {
    /// Thread ids (for their CPU time).
    pub fn tids(&self) -> Vec<i32> {
        self.tids.lock().unwrap().clone()
    }

    pub fn join(self) -> Vec<R> {
        self.joined.store(true, Ordering::SeqCst);
        self.handles
            .into_iter()
            .map(|h| h.join().expect("load generator thread"))
            .collect()
    }
}

/// Starts `plan.threads` generator threads; thread `i` of `n` runs `make(i, n)`.
pub fn spawn<R, F, Fut>(plan: &GenPlan, make: F) -> Generator<R>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    let make = Arc::new(make);
    let tids = Arc::new(Mutex::new(Vec::new()));
    let joined = Arc::new(AtomicBool::new(false));
    let n = plan.threads.max(1);
    let handles = (0..n)
        .map(|i| {
            let make = make.clone();
            let tids = tids.clone();
            let joined = joined.clone();
            let epoll = plan.epoll;
            let cpus = plan.cpus.clone();
            std::thread::Builder::new()
                .name(format!("loadgen-{i}"))
                .spawn(move || {
                    if !cpus.is_empty() {
                        sys::pin_current_thread(&cpus);
                    }
                    tids.lock().unwrap().push(sys::gettid());
                    let r = if epoll {
                        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                            .enable_timer()
                            .build()
                            .expect("load generator runtime (epoll)")
                            .block_on(make(i, n))
                    } else {
                        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                            .with_entries(4096)
                            .enable_timer()
                            .build()
                            .expect("load generator runtime")
                            .block_on(make(i, n))
                    };
                    while !joined.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    r
                })
                .expect("spawn load generator thread")
        })
        .collect();
    // The tids are pushed first thing in each thread; wait for them so CPU sampling sees all.
    while tids.lock().unwrap().len() < n {
        std::thread::sleep(Duration::from_millis(1));
    }
    Generator {
        handles,
        tids,
        joined,
    }
}

/// Share `total` among `n` threads.
pub fn share(total: usize, i: usize, n: usize) -> usize {
    total / n + usize::from(i < total % n)
}

pub fn new_hist() -> Histogram<u64> {
    // Nanoseconds, 10 ns to 100 s, 3 significant digits.
    Histogram::new_with_bounds(10, 100_000_000_000, 3).unwrap()
}

pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.max(10));
}

/// Failures seen by the load generator.
#[derive(Default, Debug)]
pub struct Problems {
    pub errors: u64,
    /// First few error messages, with counts.
    pub error_kinds: BTreeMap<String, u64>,
    pub non_2xx: BTreeMap<u16, u64>,
    /// Responses that asked to close the connection (the client reconnects).
    pub server_closes: u64,
    pub reconnects: u64,
}

impl Problems {
    pub fn error(&mut self, e: &io::Error) {
        self.errors += 1;
        let k = format!("{:?}: {e}", e.kind());
        if self.error_kinds.len() < 8 || self.error_kinds.contains_key(&k) {
            *self.error_kinds.entry(k).or_default() += 1;
        }
    }

    pub fn merge(&mut self, o: Problems) {
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

    pub fn non_2xx_total(&self) -> u64 {
        self.non_2xx.values().sum()
    }

    pub fn json(&self) -> Value {
        json!({
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "non_2xx": self.non_2xx.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "non_2xx_total": self.non_2xx_total(),
            "server_closes": self.server_closes,
            "reconnects": self.reconnects,
        })
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "no complete answer within 10 s")
}

/// A connection that reconnects after errors and server closes.
struct Client {
    dest: Dest,
    conn: Option<Conn>,
    /// When the last new connection was ready (TLS: handshake done), until taken.
    opened_ns: Option<u64>,
}

impl Client {
    fn new(dest: Dest) -> Client {
        Client {
            dest,
            conn: None,
            opened_ns: None,
        }
    }

    async fn get(&mut self, p: &mut Problems) -> Option<&mut Conn> {
        if self.conn.is_none() {
            match monoio::time::timeout(REQUEST_TIMEOUT, Conn::connect(&self.dest)).await {
                Ok(Ok(c)) => {
                    self.conn = Some(c);
                    self.opened_ns = Some(now_ns());
                }
                Ok(Err(e)) => {
                    p.error(&e);
                    monoio::time::sleep(Duration::from_millis(1)).await;
                    return None;
                }
                Err(_) => {
                    p.error(&timed_out());
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    /// Handles the outcome of one exchange; returns the response on success.
    fn done(&mut self, r: io::Result<Resp>, p: &mut Problems) -> Option<Resp> {
        match r {
            Ok(resp) => {
                if resp.close {
                    p.server_closes += 1;
                    self.drop_conn(p);
                }
                if !(200..300).contains(&resp.status) {
                    *p.non_2xx.entry(resp.status).or_default() += 1;
                }
                Some(resp)
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

/// Flatten a timeout around an io future.
async fn within<T>(f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    match monoio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(timed_out()),
    }
}

/// The measured window, in CLOCK_MONOTONIC ns.
#[derive(Clone, Copy)]
pub struct Window {
    pub t0: u64,
    pub t1: u64,
}

// ---------------------------------------------------------------------------------------------
// Request/response, closed loop

pub struct RrOut {
    pub hist: Histogram<u64>,
    pub requests: u64,
    /// Connections opened (TLS: handshakes) inside the window; 0 when every connection was
    /// made in the warm-up and kept alive.
    pub opened_in_window: u64,
    pub problems: Problems,
}

impl RrOut {
    pub fn new() -> RrOut {
        RrOut {
            hist: new_hist(),
            requests: 0,
            opened_in_window: 0,
            problems: Problems::default(),
        }
    }
}

/// `conns` keep-alive connections on this thread, each sending `req` in a loop until `w.t1`.
/// Latencies of requests that start and end inside the window are recorded. Connections (and
/// TLS handshakes) are made at the start, in the warm-up, and again only after an error or a
/// server close.
pub async fn rr(dest: Dest, req: Rc<Vec<u8>>, conns: usize, w: Window) -> RrOut {
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let req = req.clone();
            let dest = dest.clone();
            monoio::spawn(async move {
                let mut out = RrOut::new();
                let mut c = Client::new(dest);
                loop {
                    let start = now_ns();
                    if start >= w.t1 {
                        break;
                    }
                    if c.get(&mut out.problems).await.is_none() {
                        continue;
                    }
                    if c.opened_ns
                        .take()
                        .is_some_and(|t| (w.t0..w.t1).contains(&t))
                    {
                        out.opened_in_window += 1;
                    }
                    let conn = c.conn.as_mut().expect("just connected");
                    let r = within(conn.request(&req)).await;
                    let end = now_ns();
                    let ok = c
                        .done(r, &mut out.problems)
                        .is_some_and(|r| (200..300).contains(&r.status));
                    if ok && start >= w.t0 && end <= w.t1 {
                        record_ns(&mut out.hist, end - start);
                        out.requests += 1;
                    }
                }
                out
            })
        })
        .collect();
    let mut all = RrOut::new();
    for h in handles {
        let o = h.await;
        all.merge(o);
    }
    all
}

impl RrOut {
    pub fn merge(&mut self, o: RrOut) {
        self.hist.add(&o.hist).unwrap();
        self.requests += o.requests;
        self.opened_in_window += o.opened_in_window;
        self.problems.merge(o.problems);
    }
}

// ---------------------------------------------------------------------------------------------
// SSE streams

pub struct SseOut {
    /// Request written → first byte of the response head.
    pub ttfb: Histogram<u64>,
    /// Request written → first event complete.
    pub first_event: Histogram<u64>,
    /// Mock's stamp (just before its write) → the event complete at the client, every event.
    pub event_latency: Histogram<u64>,
    pub streams: u64,
    /// Events that arrived inside the window (for CPU per event).
    pub events_in_window: u64,
    /// Streams with the wrong number of events.
    pub short_streams: u64,
    /// Events without a readable stamp.
    pub unstamped: u64,
    pub problems: Problems,
}

impl SseOut {
    fn new() -> SseOut {
        SseOut {
            ttfb: new_hist(),
            first_event: new_hist(),
            event_latency: new_hist(),
            streams: 0,
            events_in_window: 0,
            short_streams: 0,
            unstamped: 0,
            problems: Problems::default(),
        }
    }

    pub fn merge(&mut self, o: SseOut) {
        self.ttfb.add(&o.ttfb).unwrap();
        self.first_event.add(&o.first_event).unwrap();
        self.event_latency.add(&o.event_latency).unwrap();
        self.streams += o.streams;
        self.events_in_window += o.events_in_window;
        self.short_streams += o.short_streams;
        self.unstamped += o.unstamped;
        self.problems.merge(o.problems);
    }
}

/// How the connections of an SSE load are spread in time.
#[derive(Clone, Copy)]
pub struct Stagger {
    /// Global index of this thread's first connection.
    pub first: usize,
    /// Connections over all threads.
    pub total: usize,
    /// The mock's gap between events, ns.
    pub gap_ns: u64,
}

/// `conns` connections on this thread, each running streams of `events` events back to back
/// until `w.t1`. Streams started inside the window are measured (they may end after it).
/// Connection k starts `k/total` of a gap late, so the streams' events are spread over the gap
/// like independent clients' (in phase, every stream's event would fall in the same timer tick
/// of the mock and reach the proxy as one burst).
pub async fn sse(
    dest: Dest,
    req: Rc<Vec<u8>>,
    conns: usize,
    stagger: Stagger,
    events: usize,
    w: Window,
) -> SseOut {
    let handles: Vec<_> = (0..conns)
        .map(|k| {
            let req = req.clone();
            let dest = dest.clone();
            let delay = stagger.gap_ns * (stagger.first + k) as u64 / stagger.total.max(1) as u64;
            monoio::spawn(async move {
                let mut out = SseOut::new();
                let mut c = Client::new(dest);
                monoio::time::sleep(Duration::from_nanos(delay)).await;
                loop {
                    let start = now_ns();
                    if start >= w.t1 {
                        break;
                    }
                    let Some(conn) = c.get(&mut out.problems).await else {
                        continue;
                    };
                    let mut ev = EventScanner::default();
                    let r = within(async {
                        conn.send(&req).await?;
                        conn.read_response(&mut |b, at| ev.feed(b, at)).await
                    })
                    .await;
                    out.events_in_window += ev
                        .events
                        .iter()
                        .filter(|(at, _)| (w.t0..w.t1).contains(at))
                        .count() as u64;
                    let Some(resp) = c.done(r, &mut out.problems) else {
                        continue;
                    };
                    if start < w.t0 || !(200..300).contains(&resp.status) {
                        continue;
                    }
                    out.streams += 1;
                    if ev.events.len() != events {
                        out.short_streams += 1;
                    }
                    record_ns(&mut out.ttfb, resp.first_byte_ns.saturating_sub(start));
                    if let Some(&(at, _)) = ev.events.first() {
                        record_ns(&mut out.first_event, at.saturating_sub(start));
                    }
                    for &(at, stamp) in &ev.events {
                        match stamp {
                            Some(t) if t <= at => record_ns(&mut out.event_latency, at - t),
                            _ => out.unstamped += 1,
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut all = SseOut::new();
    for h in handles {
        all.merge(h.await);
    }
    all
}

// ---------------------------------------------------------------------------------------------
// Hold: many open connections or streams

/// Shared between the generator threads and the bench's main thread.
#[derive(Default)]
pub struct Hold {
    /// Connections (or streams) open and ready.
    pub ready: AtomicUsize,
    /// Attempts that failed.
    pub failed: AtomicUsize,
    /// Set by the main thread when the measurement is taken.
    pub release: AtomicBool,
    /// Connections that answered a second request after the release (idle hold only).
    pub verified: AtomicU64,
}

/// Connections opened at once per thread while building up.
const OPEN_WAVE: usize = 64;

/// Opens `n` connections on this thread, [`OPEN_WAVE`] at a time, each with `open` (which also
/// brings it to the state to hold), counting each in `hold.ready` or `hold.failed`.
async fn open_in_waves<F, Fut>(n: usize, hold: &Hold, problems: &mut Problems, open: F) -> Vec<Conn>
where
    F: Fn() -> Fut,
    Fut: Future<Output = io::Result<Conn>> + 'static,
{
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let wave = left.min(OPEN_WAVE);
        left -= wave;
        let handles: Vec<_> = (0..wave).map(|_| monoio::spawn(open())).collect();
        for h in handles {
            match h.await {
                Ok(c) => {
                    conns.push(c);
                    hold.ready.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    problems.error(&e);
                    hold.failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
    conns
}

async fn until_released(hold: &Hold) {
    while !hold.release.load(Ordering::SeqCst) {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Opens `n` connections on this thread, one request on each (so each is an established
/// keep-alive connection the server has served), keeps them idle until released, then sends a
/// second request on each to show they were still alive.
pub async fn hold_idle(dest: Dest, req: Rc<Vec<u8>>, n: usize, hold: Arc<Hold>) -> Problems {
    let mut problems = Problems::default();
    let mut conns = open_in_waves(n, &hold, &mut problems, || {
        let req = req.clone();
        let dest = dest.clone();
        async move {
            let mut c = within(Conn::connect_small(&dest)).await?;
            let r = within(c.request(&req)).await?;
            if r.status != 200 || r.close {
                return Err(io::Error::other(format!(
                    "status {} close {}",
                    r.status, r.close
                )));
            }
            Ok(c)
        }
    })
    .await;
    until_released(&hold).await;
    while !conns.is_empty() {
        let wave: Vec<Conn> = conns.drain(..conns.len().min(OPEN_WAVE)).collect();
        let handles: Vec<_> = wave
            .into_iter()
            .map(|mut c| {
                let req = req.clone();
                monoio::spawn(async move { within(c.request(&req)).await })
            })
            .collect();
        for h in handles {
            match h.await {
                Ok(r) if r.status == 200 => {
                    hold.verified.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) => *problems.non_2xx.entry(r.status).or_default() += 1,
                Err(e) => problems.error(&e),
            }
        }
    }
    problems
}

/// Opens `n` SSE streams on this thread (each: request sent, head and first event received),
/// keeps them open until released, then closes them (the client goes away mid-stream).
pub async fn hold_sse(dest: Dest, req: Rc<Vec<u8>>, n: usize, hold: Arc<Hold>) -> Problems {
    let mut problems = Problems::default();
    let conns = open_in_waves(n, &hold, &mut problems, || {
        let req = req.clone();
        let dest = dest.clone();
        async move {
            let mut c = within(Conn::connect_small(&dest)).await?;
            c.send(&req).await?;
            within(c.read_first_event()).await?;
            Ok::<_, io::Error>(c)
        }
    })
    .await;
    until_released(&hold).await;
    drop(conns);
    problems
}

// ---------------------------------------------------------------------------------------------
// Churn: a new connection per request

pub struct ChurnOut {
    /// TCP connect + (TLS) full handshake, until the client can send.
    pub connect: Histogram<u64>,
    /// TCP connect → the whole response read.
    pub request: Histogram<u64>,
    /// Connections whose whole cycle (connect to the server's close) fell inside the window.
    pub conns: u64,
    pub problems: Problems,
}

impl ChurnOut {
    fn new() -> ChurnOut {
        ChurnOut {
            connect: new_hist(),
            request: new_hist(),
            conns: 0,
            problems: Problems::default(),
        }
    }

    pub fn merge(&mut self, o: ChurnOut) {
        self.connect.add(&o.connect).unwrap();
        self.request.add(&o.request).unwrap();
        self.conns += o.conns;
        self.problems.merge(o.problems);
    }
}

/// `conns` clients on this thread, each in a closed loop until `w.t1`: connect (TLS: a full
/// handshake, the generator never resumes), send `req` (which asks `connection: close`), read
/// the answer and then the server's close (the server closes first, so the client's ports do
/// not pile up in TIME_WAIT).
pub async fn churn(dest: Dest, req: Rc<Vec<u8>>, conns: usize, w: Window) -> ChurnOut {
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let req = req.clone();
            let dest = dest.clone();
            monoio::spawn(async move {
                let mut out = ChurnOut::new();
                loop {
                    let start = now_ns();
                    if start >= w.t1 {
                        break;
                    }
                    let r = within(async {
                        let mut c = Conn::connect(&dest).await?;
                        let connected = now_ns();
                        let resp = c.request(&req).await?;
                        let answered = now_ns();
                        if !resp.close {
                            return Err(io::Error::other(
                                "the server kept the connection open after `connection: close`",
                            ));
                        }
                        c.read_to_eof().await?;
                        Ok((connected, answered, resp.status))
                    })
                    .await;
                    let end = now_ns();
                    match r {
                        Ok((_, _, status)) if !(200..300).contains(&status) => {
                            *out.problems.non_2xx.entry(status).or_default() += 1;
                        }
                        Ok((connected, answered, _)) => {
                            if start >= w.t0 && end <= w.t1 {
                                record_ns(&mut out.connect, connected - start);
                                record_ns(&mut out.request, answered - start);
                                out.conns += 1;
                            }
                        }
                        Err(e) => {
                            out.problems.error(&e);
                            monoio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut all = ChurnOut::new();
    for h in handles {
        all.merge(h.await);
    }
    all
}
