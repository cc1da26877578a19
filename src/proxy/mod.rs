//! The request pipeline (shard): one downstream connection and its requests, each relayed to an
//! upstream with both bodies streamed. Stages: read head → route → pick → connect → send → relay
//! → finish. Failures carry who was at fault and what was already sent; `Failure::reply` is the
//! one place that turns them into a status.

mod deadline;
mod relay;
mod response;
mod send;

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

/// Initial read buffer per downstream connection.
const CLIENT_BUF: usize = 8 * 1024;

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
    /// Deadlines of reads from the client: [`IN_IDLE`], [`IN_HEAD`], [`IN_WATCH`].
    pub timers: Deadlines<3>,
    /// Cancels the idle read between requests (on timeout or drain); kept across requests so
    /// that waiting costs no allocation.
    idle_cancel: Canceller,
    /// Cancels the read that watches the client during an exchange (replaced after each use).
    pub watch_cancel: Canceller,
}

/// Waiting for the next request (keep-alive idle or the first request's header timeout).
const IN_IDLE: usize = 0;
/// Reading a head or a body (the header timeout).
const IN_HEAD: usize = 1;
/// When an exchange starts watching the client for a disconnect.
pub const IN_WATCH: usize = 2;

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
    fn new(stream: InboundConn, peer: SocketAddr) -> Self {
        let (r, w) = stream.into_split();
        Downstream {
            inp: ClientIn {
                r,
                rbuf: BytesMut::with_capacity(CLIENT_BUF),
                timers: Deadlines::new(),
                idle_cancel: Canceller::new(),
                watch_cancel: Canceller::new(),
            },
            out: ClientOut {
                w,
                wbuf: BytesMut::with_capacity(CLIENT_BUF),
                ubuf: BytesMut::with_capacity(CLIENT_BUF),
                peer_ip: peer.ip().to_string().into(),
                peer_addr: peer.ip(),
                linger: false,
                timers: Deadlines::new(),
            },
        }
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
    pub async fn reply_error(&mut self, e: &ErrorReply, keep_alive: bool, limit: Duration) {
        self.reply_error_with(e, keep_alive, limit, &[]).await;
    }

    /// [`reply_error`](Self::reply_error) with extra header fields.
    pub async fn reply_error_with(
        &mut self,
        e: &ErrorReply,
        keep_alive: bool,
        limit: Duration,
        extra: &[(&str, &str)],
    ) {
        self.wbuf.clear();
        encode_error(&mut self.wbuf, e, keep_alive, extra);
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
pub async fn serve_conn(ctx: Rc<ShardCtx>, fwd: usize, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    ctx.active.set(ctx.active.get() + 1);
    let forward = &ctx.config.forwards[fwd];
    let stream = match &ctx.acceptors[fwd] {
        None => InboundConn::Plain(stream),
        Some(acceptor) => {
            // The handshake is part of delivering the first request head.
            let hs = InboundConn::accept_tls(acceptor, stream);
            match monoio::time::timeout(forward.header_timeout, hs).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(forward = %forward.name, peer = %peer, error = %e, "TLS handshake with a client failed");
                    ctx.active.set(ctx.active.get() - 1);
                    return;
                }
                Err(_) => {
                    tracing::debug!(forward = %forward.name, peer = %peer, "TLS handshake with a client timed out");
                    ctx.active.set(ctx.active.get() - 1);
                    return;
                }
            }
        }
    };
    let mut d = Downstream::new(stream, peer);
    let mut scanner = HeadScanner::default();
    let mut first = true;
    loop {
        let req = match read_request(&ctx, fwd, &mut d, &mut scanner, first).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(reply) => {
                ctx.stats.http_error(fwd, reply.code, reply.status.as_u16());
                ctx.stats.http_request(
                    fwd,
                    &http::Method::GET,
                    "",
                    reply.status.as_u16(),
                    Duration::ZERO,
                );
                d.out.reply_error(&reply, false, forward.idle_timeout).await;
                break;
            }
        };
        first = false;
        if relay::exchange(&ctx, fwd, &mut d, req).await == After::Close || ctx.drain.fired() {
            break;
        }
    }
    // A graceful close: the client sees FIN after the last response byte.
    let _ = d.out.w.shutdown().await;
    if d.out.linger {
        linger(&mut d.inp).await;
    }
    ctx.active.set(ctx.active.get() - 1);
}

/// Waits for the next request head. `Ok(None)`: the connection ends quietly (client closed,
/// keep-alive idle timeout, or drain while idle).
async fn read_request(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    scanner: &mut HeadScanner,
    first: bool,
) -> Result<Option<Request>, ErrorReply> {
    let forward = &ctx.config.forwards[fwd];
    if d.inp.rbuf.is_empty() {
        // Idle between requests: wait for the first byte, interruptibly, without losing it.
        let idle = if first {
            forward.header_timeout
        } else {
            forward.idle_timeout
        };
        if ctx.drain.fired() && !first {
            return Ok(None);
        }
        reserve(&mut d.inp.rbuf, CLIENT_BUF);
        let read = cancelable_read_append(
            &mut d.inp.r,
            mem::take(&mut d.inp.rbuf),
            d.inp.idle_cancel.handle(),
        );
        let mut read = pin!(read);
        let idle_at = Instant::now() + idle;
        let idle_timer = &mut d.inp.timers;
        let stop = pin!(async {
            monoio::select! {
                _ = idle_timer.sleep_until(IN_IDLE, idle_at) => {},
                _ = ctx.drain.wait() => {},
            }
        });
        let (res, buf) = match race(read.as_mut(), stop).await {
            Either::Left(r) => r,
            Either::Right(()) => {
                d.inp.idle_cancel = mem::take(&mut d.inp.idle_cancel).cancel();
                read.await
            }
        };
        d.inp.rbuf = buf;
        match res {
            Ok(n) if n > 0 => {}
            _ => return Ok(None),
        }
    }
    let deadline = Instant::now() + forward.header_timeout;
    loop {
        match head::take_request(&mut d.inp.rbuf, scanner, forward.max_head_bytes) {
            Ok(Some(r)) => return Ok(Some(r)),
            Ok(None) => {}
            Err(e) => return Err(head_error_reply(&e)),
        }
        match d.inp.read_more(deadline).await {
            ReadOutcome::Data => {}
            ReadOutcome::Timeout => return Err(errors::HEAD_TIMEOUT),
            // A client that leaves mid-head gets nothing: there is nobody to answer.
            ReadOutcome::Eof | ReadOutcome::Error(_) => return Ok(None),
        }
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
