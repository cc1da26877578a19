//! The request pipeline (shard): one downstream connection and its requests, each relayed to an
//! upstream with both bodies streamed. Stages: read head → route → pick → connect → send → relay
//! → finish. Failures carry who was at fault and what was already sent; `Failure::reply` is the
//! one place that turns them into a status.

mod deadline;
mod relay;
mod response;
mod send;
mod spare;

pub use spare::Spares;

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::io::{
    AsyncWriteRent, AsyncWriteRentExt, Canceller, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::http::head::{self, HeadError, HeadScanner, Request};
use crate::http::respond::{encode_error, errors, ErrorReply};
use crate::io::{cancelable_read_append, read_append};
use crate::shard::signal::{race, Either};
use crate::shard::ShardCtx;
use crate::tls::stream::InboundConn;
use deadline::Deadlines;

/// Why an exchange failed, and whose fault it was.
pub enum Failure {
    /// The client sent something we refuse.
    Client(ErrorReply),
    /// The client went away; nobody to answer.
    ClientGone,
    /// The upstream failed.
    Upstream(ErrorReply, crate::stats::UpstreamErrorKind),
    /// Over a rate limit: answer 429 with `Retry-After` (seconds).
    Limited(ErrorReply, u64),
}

impl Failure {
    /// The upstream closed, reset, or sent something unparsable.
    fn bad_response() -> Failure {
        Failure::Upstream(
            errors::UPSTREAM_BAD_RESPONSE,
            crate::stats::UpstreamErrorKind::Protocol,
        )
    }

    /// The upstream did not answer (or go on answering) in time.
    fn timed_out() -> Failure {
        Failure::Upstream(
            errors::UPSTREAM_TIMEOUT,
            crate::stats::UpstreamErrorKind::Timeout,
        )
    }

    fn upstream_io(e: &io::Error) -> Failure {
        if e.kind() == io::ErrorKind::TimedOut {
            Failure::timed_out()
        } else {
            Failure::bad_response()
        }
    }
}

/// What had reached the client when a failure happened.
#[derive(Clone, Copy)]
pub enum Sent {
    Nothing,
    /// The response head (with this status) went out.
    Head(u16),
}

/// Read and write buffers of a downstream connection (taken from the shard's [`Spares`]).
const CLIENT_BUF: usize = 8 * 1024;

/// How long a connection waits for its next request with its buffers and its request state in
/// hand. A client that sends again sooner (a busy keep-alive client) pays nothing for idling;
/// after that the connection gives its buffers back, frees its request state, and waits for
/// readability (plain TCP) or with a small read (TLS): a read more when the request comes.
const SHED_AFTER: Duration = Duration::from_millis(5);

/// Read buffer of an idle TLS connection's wait (rustls keeps the rest of the next request).
const IDLE_TLS_BUF: usize = 512;

/// Status recorded for a request whose client went away before the answer ended (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// One downstream connection: its read side and its write side, borrowed separately (a read
/// watches the client while the relay writes).
pub struct Downstream {
    pub inp: ClientIn,
    pub out: ClientOut,
}

/// The client's read half and the bytes read from it but not yet consumed.
pub struct ClientIn {
    pub r: OwnedReadHalf<InboundConn>,
    pub rbuf: BytesMut,
    /// Deadlines of reads from the client during requests: [`IN_HEAD`], [`IN_WATCH`] (released
    /// while the connection idles).
    pub timers: Deadlines<2>,
    /// The wait for the next request ([`IN_IDLE`]), the one timer an idle connection keeps.
    idle: Deadlines<1>,
    /// Cancels the idle read between requests (on timeout or drain); kept across requests so
    /// that waiting costs no allocation.
    idle_cancel: Canceller,
    /// Cancels the read that watches the client during an exchange (replaced after each use).
    pub watch_cancel: Canceller,
}

/// Waiting for the next request (keep-alive idle or the first request's header timeout), in
/// [`ClientIn::idle`].
const IN_IDLE: usize = 0;
/// Reading a head or a body (the header timeout).
const IN_HEAD: usize = 0;
/// When an exchange starts watching the client for a disconnect.
pub const IN_WATCH: usize = 1;

/// Writing to the client.
pub const OUT_WRITE: usize = 0;
/// Writing to the upstream.
pub const UP_WRITE: usize = 1;
/// Waiting for the upstream's response head.
pub const UP_HEAD: usize = 2;
/// Reading a buffered response body (the request timeout).
pub const UP_TOTAL: usize = 3;
/// Reading a streamed response body (the stream idle timeout).
pub const UP_STREAM: usize = 4;

/// The client's write half and scratch buffers.
pub struct ClientOut {
    pub w: OwnedWriteHalf<InboundConn>,
    /// Scratch for what goes to the client.
    pub wbuf: BytesMut,
    /// Scratch for what goes to the upstream.
    pub ubuf: BytesMut,
    pub peer_ip: Rc<str>,
    pub peer_addr: std::net::IpAddr,
    /// The connection ends after an error reply while the client may still be sending: close
    /// lingeringly so our answer is not destroyed by a reset.
    pub linger: bool,
    /// Deadlines of this connection's writes and of its exchanges with upstreams: [`OUT_WRITE`],
    /// [`UP_WRITE`], [`UP_HEAD`], [`UP_TOTAL`], [`UP_STREAM`].
    pub timers: Deadlines<5>,
}

/// Result of reading from a socket with a deadline.
pub enum ReadOutcome {
    Data,
    Eof,
    Timeout,
    Error(io::Error),
}

impl Downstream {
    fn new(stream: InboundConn, peer: SocketAddr, spares: &Spares) -> Self {
        let (r, w) = stream.into_split();
        Downstream {
            inp: ClientIn {
                r,
                rbuf: spares.take(),
                timers: Deadlines::new(),
                idle: Deadlines::new(),
                idle_cancel: Canceller::new(),
                watch_cancel: Canceller::new(),
            },
            out: ClientOut {
                w,
                wbuf: spares.take(),
                ubuf: spares.take(),
                peer_ip: peer.ip().to_string().into(),
                peer_addr: peer.ip(),
                linger: false,
                timers: Deadlines::new(),
            },
        }
    }

    /// The connection goes idle: its buffers go back to the shard and the timers only requests
    /// use are freed. Nothing is buffered (`rbuf` is empty between requests).
    fn shed(&mut self, spares: &Spares) {
        debug_assert!(self.inp.rbuf.is_empty());
        spares.put(mem::take(&mut self.inp.rbuf));
        spares.put(mem::take(&mut self.out.wbuf));
        spares.put(mem::take(&mut self.out.ubuf));
        self.inp.timers.release();
        self.out.timers.release();
    }

    /// A request is coming after [`shed`](Self::shed): buffers again, `first` holding what the
    /// idle wait read.
    fn equip(&mut self, spares: &Spares, first: &[u8]) {
        self.inp.rbuf = spares.take();
        self.inp.rbuf.extend_from_slice(first);
        self.out.wbuf = spares.take();
        self.out.ubuf = spares.take();
    }
}

impl ClientIn {
    /// Reads more client bytes into `rbuf`, giving up at `deadline`.
    pub async fn read_more(&mut self, deadline: Instant) -> ReadOutcome {
        reserve(&mut self.rbuf, CLIENT_BUF);
        let buf = mem::take(&mut self.rbuf);
        match self
            .timers
            .run(IN_HEAD, deadline, read_append(&mut self.r, buf))
            .await
        {
            None => ReadOutcome::Timeout,
            Some((res, buf)) => {
                self.rbuf = buf;
                match res {
                    Ok(0) => ReadOutcome::Eof,
                    Ok(_) => ReadOutcome::Data,
                    Err(e) => ReadOutcome::Error(e),
                }
            }
        }
    }
}

impl ClientOut {
    /// Writes all of `wbuf` to the client and clears it.
    pub async fn flush(&mut self, limit: Duration) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let buf = mem::take(&mut self.wbuf);
        let at = Instant::now() + limit;
        match self.timers.run(OUT_WRITE, at, self.w.write_all(buf)).await {
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client write timed out",
            )),
            Some((res, mut buf)) => {
                buf.clear();
                self.wbuf = buf;
                res.map(|_| ())
            }
        }
    }

    /// Answers an error the proxy produced itself.
    pub async fn reply_error(&mut self, e: &ErrorReply, limit: Duration) {
        self.reply_error_with(e, false, http::Version::HTTP_11, limit, &[])
            .await;
    }

    /// [`reply_error`](Self::reply_error) with extra header fields.
    pub async fn reply_error_with(
        &mut self,
        e: &ErrorReply,
        keep_alive: bool,
        client: http::Version,
        limit: Duration,
        extra: &[(&str, &str)],
    ) {
        self.wbuf.clear();
        encode_error(&mut self.wbuf, e, keep_alive, client, extra);
        self.linger = !keep_alive;
        let _ = self.flush(limit).await;
    }
}

/// Makes sure `buf` has at least `min` bytes of spare room for the next read.
pub fn reserve(buf: &mut BytesMut, min: usize) {
    if buf.capacity() - buf.len() < min / 2 {
        buf.reserve(min);
    }
}

/// What the connection does after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    KeepAlive,
    Close,
}

/// Serves one downstream connection until it closes, errs, idles out or the shard drains.
///
/// This task's own state is small: what an idle connection needs. Serving requests (reading
/// heads, the exchanges) runs in a frame of its own ([`serve_requests`], boxed), allocated when
/// requests start coming and freed when the connection has idled for [`SHED_AFTER`]; so are the
/// TLS handshake and the close.
pub async fn serve_conn(ctx: Rc<ShardCtx>, fwd: usize, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    ctx.active.set(ctx.active.get() + 1);
    let stream = match &ctx.acceptors[fwd] {
        None => InboundConn::Plain(stream),
        Some(acceptor) => match Box::pin(handshake(&ctx, fwd, acceptor, stream, peer)).await {
            Some(s) => s,
            None => {
                ctx.active.set(ctx.active.get() - 1);
                return;
            }
        },
    };
    let mut d = Downstream::new(stream, peer, &ctx.spares);
    let mut conn = ConnState {
        scanner: HeadScanner::default(),
        first: true,
        idle_at: None,
    };
    loop {
        let Some(idle_at) = Box::pin(serve_requests(&ctx, fwd, &mut d, &mut conn)).await else {
            break;
        };
        d.shed(&ctx.spares);
        let Some(got) = wait_idle(&ctx, &mut d, idle_at).await else {
            break;
        };
        // Woken by readiness alone (plain TCP), the wait for the first byte resumes with its
        // deadline; bytes already read (TLS) start the request, and the next idle wait gets a
        // deadline of its own.
        conn.idle_at = got.is_empty().then_some(idle_at);
        d.equip(&ctx.spares, &got);
    }
    Box::pin(close(&mut d)).await;
    ctx.active.set(ctx.active.get() - 1);
}

/// What a connection carries from one request to the next.
struct ConnState {
    scanner: HeadScanner,
    /// No request yet (the wait for it is the header timeout, not the idle timeout).
    first: bool,
    /// The idle deadline of a wait already begun (resumed after an idle connection woke up).
    idle_at: Option<Instant>,
}

/// The TLS handshake with a client, within the header timeout (part of delivering the first
/// request head).
async fn handshake(
    ctx: &ShardCtx,
    fwd: usize,
    acceptor: &monoio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<InboundConn> {
    let forward = &ctx.config.forwards[fwd];
    let hs = InboundConn::accept_tls(acceptor, stream);
    match monoio::time::timeout(forward.header_timeout, hs).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(forward = %forward.name, peer = %peer, error = %e, "TLS handshake with a client failed");
            // A connection closed before or during the hello (a TCP health check, a port
            // scan) is not a failed handshake.
            if e.kind() != io::ErrorKind::UnexpectedEof {
                ctx.stats
                    .http_error(fwd, crate::metrics::TLS_HANDSHAKE_FAILED, 0);
            }
            None
        }
        Err(_) => {
            tracing::debug!(forward = %forward.name, peer = %peer, "TLS handshake with a client timed out");
            ctx.stats
                .http_error(fwd, crate::metrics::TLS_HANDSHAKE_TIMEOUT, 0);
            None
        }
    }
}

/// Serves requests as they come. `Some(idle deadline)`: the client has sent nothing for
/// [`SHED_AFTER`] (nothing is buffered); `None`: the connection ends.
async fn serve_requests(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    conn: &mut ConnState,
) -> Option<Instant> {
    let forward = &ctx.config.forwards[fwd];
    loop {
        let req = match read_request(ctx, fwd, d, conn).await {
            Ok(Next::Request(r)) => r,
            Ok(Next::Idle(at)) => return Some(at),
            Ok(Next::Close) => return None,
            Err(reply) => {
                ctx.stats.http_error(fwd, reply.code, reply.status.as_u16());
                ctx.stats.http_request(
                    fwd,
                    &http::Method::GET,
                    "",
                    reply.status.as_u16(),
                    Duration::ZERO,
                );
                d.out.reply_error(&reply, forward.idle_timeout).await;
                return None;
            }
        };
        conn.first = false;
        if relay::exchange(ctx, fwd, d, req).await == After::Close || ctx.drain.fired() {
            return None;
        }
    }
}

/// Ends the connection: FIN (TLS: close_notify first) after the last response byte, then, after
/// an error reply, reads what the client still sends.
async fn close(d: &mut Downstream) {
    let _ = d.out.w.shutdown().await;
    if d.out.linger {
        linger(&mut d.inp).await;
    }
}

/// What [`read_request`] found.
enum Next {
    Request(Request),
    /// Nothing came for [`SHED_AFTER`]; the wait goes on (without buffers) until this deadline.
    Idle(Instant),
    /// The connection ends quietly (client closed, idle timeout, or drain while idle).
    Close,
}

/// How a wait for the client's first bytes was stopped.
enum Stop {
    /// [`SHED_AFTER`] passed, the idle deadline has not.
    Shed,
    /// The idle deadline passed or the shard drains.
    End,
}

/// `ECANCELED`: what a cancelled read returns (plain TCP and TLS alike, see `tls::stream`).
fn is_cancelled(e: &io::Error) -> bool {
    e.raw_os_error() == Some(crate::tls::stream::ECANCELED)
}

/// Waits for the next request head.
async fn read_request(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    conn: &mut ConnState,
) -> Result<Next, ErrorReply> {
    let forward = &ctx.config.forwards[fwd];
    if d.inp.rbuf.is_empty() {
        // Idle between requests: wait for the first byte, interruptibly, without losing it.
        if ctx.drain.fired() && !conn.first {
            return Ok(Next::Close);
        }
        let now = Instant::now();
        let idle_at = conn.idle_at.take().unwrap_or_else(|| {
            now + if conn.first {
                forward.header_timeout
            } else {
                forward.idle_timeout
            }
        });
        let shed_at = (now + SHED_AFTER).min(idle_at);
        reserve(&mut d.inp.rbuf, CLIENT_BUF);
        let buf = mem::take(&mut d.inp.rbuf);
        let (res, buf, stop) = wait_read(ctx, &mut d.inp, buf, shed_at, shed_at < idle_at).await;
        d.inp.rbuf = buf;
        match (res, stop) {
            (Ok(n), _) if n > 0 => {}
            (Err(e), Some(Stop::Shed)) if is_cancelled(&e) => return Ok(Next::Idle(idle_at)),
            _ => return Ok(Next::Close),
        }
    }
    let deadline = Instant::now() + forward.header_timeout;
    loop {
        match head::take_request(&mut d.inp.rbuf, &mut conn.scanner, forward.max_head_bytes) {
            Ok(Some(r)) => return Ok(Next::Request(r)),
            Ok(None) => {}
            Err(e) => return Err(head_error_reply(&e)),
        }
        match d.inp.read_more(deadline).await {
            ReadOutcome::Data => {}
            ReadOutcome::Timeout => return Err(errors::HEAD_TIMEOUT),
            // A client that leaves mid-head gets nothing: there is nobody to answer.
            ReadOutcome::Eof | ReadOutcome::Error(_) => return Ok(Next::Close),
        }
    }
}

/// Reads the client into `buf` until bytes come or the wait is stopped at `until` (by the idle
/// timer: [`Stop::Shed`] when `shed`, else [`Stop::End`]) or by the drain; a stopped read is
/// cancelled, and bytes that arrived meanwhile are kept. Returns the read's result, the buffer,
/// and what stopped it, if anything did.
async fn wait_read(
    ctx: &ShardCtx,
    inp: &mut ClientIn,
    buf: BytesMut,
    until: Instant,
    shed: bool,
) -> (io::Result<usize>, BytesMut, Option<Stop>) {
    let read = cancelable_read_append(&mut inp.r, buf, inp.idle_cancel.handle());
    let mut read = pin!(read);
    let idle_timer = &mut inp.idle;
    let stop = pin!(async {
        monoio::select! {
            _ = idle_timer.sleep_until(IN_IDLE, until) => if shed { Stop::Shed } else { Stop::End },
            _ = ctx.drain.wait() => Stop::End,
        }
    });
    match race(read.as_mut(), stop).await {
        Either::Left((res, buf)) => (res, buf, None),
        Either::Right(why) => {
            inp.idle_cancel = mem::take(&mut inp.idle_cancel).cancel();
            let (res, buf) = read.await;
            (res, buf, Some(why))
        }
    }
}

/// The idle wait after [`shed`](Downstream::shed), holding no buffer: until the client's socket
/// is readable (plain TCP; a poll, no read) or a small read returns (TLS: rustls may hold
/// decrypted bytes a poll of the socket would not see). `Some(bytes read)`, or `None` when the
/// connection ends (idle deadline, drain, client gone).
async fn wait_idle(ctx: &ShardCtx, d: &mut Downstream, idle_at: Instant) -> Option<BytesMut> {
    if ctx.drain.fired() {
        return None;
    }
    // SAFETY: both halves of the stream belong to this task, which uses neither while the wait
    // lasts (no write is in flight between requests); the reference lives no longer than this
    // borrow of the read half.
    let tcp = unsafe { (*d.inp.r.0.get()).as_plain() };
    let Some(tcp) = tcp else {
        let buf = BytesMut::with_capacity(IDLE_TLS_BUF);
        let (res, buf, _) = Box::pin(wait_read(ctx, &mut d.inp, buf, idle_at, false)).await;
        return match res {
            Ok(n) if n > 0 => Some(buf),
            _ => None,
        };
    };
    let ready = pin!(tcp.readable(false));
    let idle_timer = &mut d.inp.idle;
    let stop = pin!(async {
        monoio::select! {
            _ = idle_timer.sleep_until(IN_IDLE, idle_at) => {},
            _ = ctx.drain.wait() => {},
        }
    });
    // A readiness wait that loses the race is dropped, which cancels its poll.
    match race(ready, stop).await {
        Either::Left(Ok(())) => Some(BytesMut::new()),
        Either::Left(Err(_)) | Either::Right(()) => None,
    }
}

/// Reads and discards what the client still sends (up to 1 s, 1 MiB) so that closing with unread
/// data does not reset the connection before the client has read our error reply.
async fn linger(d: &mut ClientIn) {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut budget = 1usize << 20;
    loop {
        d.rbuf.clear();
        match d.read_more(deadline).await {
            ReadOutcome::Data if d.rbuf.len() < budget => budget -= d.rbuf.len(),
            _ => return,
        }
    }
}

fn head_error_reply(e: &HeadError) -> ErrorReply {
    match e {
        HeadError::TooLarge(_) | HeadError::TooManyHeaders => errors::HEAD_TOO_LARGE,
        HeadError::Expectation => errors::EXPECTATION,
        HeadError::Malformed(_) | HeadError::UnsupportedEncoding => errors::BAD_REQUEST,
    }
}
