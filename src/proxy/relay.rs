//! One exchange (shard): send the request (head + streamed body) to an upstream, then relay the
//! response back as it arrives while watching the client for a disconnect.

use std::future::{poll_fn, Future};
use std::io;
use std::mem;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::Method;
use monoio::io::{AsyncWriteRentExt, Canceller};
use monoio::BufResult;

use super::{After, ClientOut, Downstream, ReadOutcome, CLIENT_BUF, CLIENT_CLOSED};
use crate::config::{Group, Upstream};
use crate::http::body::{encode_chunk, BodyDecoder, BodyError, Framing, Step, LAST_CHUNK};
use crate::http::head::{self, HeadScanner, Request, Response};
use crate::http::respond::{encode_response_head, errors, BodyOut, ErrorReply};
use crate::io::{cancelable_read_append, read_append};
use crate::shard::ShardCtx;
use crate::stats::UpstreamErrorKind;
use crate::upstream::pool::ConnectError;
use crate::upstream::request::{encode_request_head, Outgoing};
use crate::upstream::UpConn;

/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Flush the upstream-bound buffer once it holds this much.
const FLUSH_AT: usize = 64 * 1024;

/// Why an exchange failed, and whose fault it was.
enum Failure {
    /// The client sent something we refuse.
    Client(ErrorReply),
    /// The client went away; nobody to answer.
    ClientGone,
    /// The upstream failed.
    Upstream(ErrorReply, UpstreamErrorKind),
}

impl Failure {
    fn upstream_io(e: &io::Error) -> Failure {
        if e.kind() == io::ErrorKind::TimedOut {
            Failure::Upstream(errors::UPSTREAM_TIMEOUT, UpstreamErrorKind::Timeout)
        } else {
            Failure::Upstream(errors::UPSTREAM_BAD_RESPONSE, UpstreamErrorKind::Protocol)
        }
    }
}

/// Tracks the read that watches the client while the upstream works.
struct Watch {
    live: bool,
    gone: bool,
}

/// Runs `main` while also polling the client watch; a watch that sees the client close ends the
/// wait with `Err(())`. Pipelined bytes from the client just stop the watch.
async fn watched<F: Future, W: Future<Output = BufResult<usize, BytesMut>>>(
    main: F,
    mut watch: Pin<&mut W>,
    st: &mut Watch,
    rbuf: &mut BytesMut,
) -> Result<F::Output, ()> {
    let mut main = pin!(main);
    poll_fn(|cx| {
        // The work in progress wins a tie: a client that closes right after the last byte it
        // wanted has not aborted anything.
        if let Poll::Ready(x) = main.as_mut().poll(cx) {
            return Poll::Ready(Ok(x));
        }
        if st.live {
            if let Poll::Ready((res, buf)) = watch.as_mut().poll(cx) {
                st.live = false;
                *rbuf = buf;
                match res {
                    Ok(n) if n > 0 => {}
                    _ => {
                        st.gone = true;
                        return Poll::Ready(Err(()));
                    }
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// Reads more upstream bytes into the connection's buffer, giving up at `deadline`.
async fn up_read(conn: &mut UpConn, deadline: Instant) -> ReadOutcome {
    conn.reserve();
    let buf = mem::take(&mut conn.rbuf);
    match monoio::time::timeout_at(deadline.into(), read_append(&mut conn.stream, buf)).await {
        Err(_) => ReadOutcome::Timeout,
        Ok((res, buf)) => {
            conn.rbuf = buf;
            match res {
                Ok(0) => ReadOutcome::Eof,
                Ok(_) => ReadOutcome::Data,
                Err(e) => ReadOutcome::Error(e),
            }
        }
    }
}

/// Serves one request. Returns whether the downstream connection stays open.
pub(super) async fn exchange(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    req: Request,
) -> After {
    let start = Instant::now();
    let forward = &ctx.config.forwards[fwd];
    let method = req.head.method.clone();
    let path = req.head.uri.path().to_owned();
    let send_limit = forward.idle_timeout;

    let outcome = run(ctx, fwd, d, &req, start).await;
    let elapsed = start.elapsed();
    match outcome {
        Ok((status, after)) => {
            ctx.stats.http_request(fwd, &method, &path, status, elapsed);
            if after == After::KeepAlive && req.keep_alive && !ctx.drain.fired() {
                After::KeepAlive
            } else {
                After::Close
            }
        }
        Err((Failure::Client(reply), _)) | Err((Failure::Upstream(reply, _), Sent::Nothing)) => {
            ctx.stats.http_error(fwd, reply.code, reply.status.as_u16());
            ctx.stats
                .http_request(fwd, &method, &path, reply.status.as_u16(), elapsed);
            // After an upstream failure the request body may be half read: close to stay in sync.
            d.out.reply_error(&reply, false, send_limit).await;
            After::Close
        }
        Err((Failure::Upstream(reply, _), Sent::Head(status))) => {
            // The answer already began: cut the connection so the client sees a broken stream,
            // never a clean end.
            ctx.stats.http_error(fwd, reply.code, status);
            ctx.stats.http_request(fwd, &method, &path, status, elapsed);
            After::Close
        }
        Err((Failure::ClientGone, _)) => {
            ctx.stats.http_error(fwd, "client_closed", CLIENT_CLOSED);
            ctx.stats
                .http_request(fwd, &method, &path, CLIENT_CLOSED, elapsed);
            After::Close
        }
    }
}

/// What had reached the client when a failure happened.
#[derive(Clone, Copy)]
enum Sent {
    Nothing,
    /// The response head (with this status) went out.
    Head(u16),
}

type RunResult = Result<(u16, After), (Failure, Sent)>;

async fn run(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    req: &Request,
    start: Instant,
) -> RunResult {
    let forward = &ctx.config.forwards[fwd];
    if let Framing::Length(n) = req.framing {
        if n > forward.max_body_bytes {
            return Err((Failure::Client(errors::BODY_TOO_LARGE), Sent::Nothing));
        }
    }
    if req.expect_continue && d.inp.rbuf.is_empty() {
        d.out
            .wbuf
            .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        if d.out.flush(forward.idle_timeout).await.is_err() {
            return Err((Failure::ClientGone, Sent::Nothing));
        }
    }
    let group_idx = ctx.route(fwd, req.head.uri.path());
    let group = &ctx.config.groups[group_idx];
    let Some(uidx) = ctx.pick(group_idx) else {
        return Err((
            Failure::Upstream(errors::NO_UPSTREAM, UpstreamErrorKind::Connect),
            Sent::Nothing,
        ));
    };
    let upstream = &ctx.config.upstreams[uidx];
    let up_start = Instant::now();
    let res = upstream_exchange(ctx, fwd, d, req, group_idx, group, uidx, upstream, start).await;
    let kind = match &res {
        Ok((status, _)) if *status == 429 => Some(UpstreamErrorKind::Status429),
        Ok((status, _)) if *status >= 500 => Some(UpstreamErrorKind::Status5xx),
        Ok(_) => None,
        Err((Failure::Upstream(_, k), _)) => Some(*k),
        Err(_) => None,
    };
    ctx.stats
        .upstream_request(group_idx, uidx, up_start.elapsed(), kind);
    res
}

#[allow(clippy::too_many_arguments)]
async fn upstream_exchange(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    req: &Request,
    group_idx: usize,
    group: &Group,
    uidx: usize,
    upstream: &Upstream,
    start: Instant,
) -> RunResult {
    let client = &group.client;
    let nothing = |f: Failure| (f, Sent::Nothing);

    // Connect (or reuse).
    let mut conn = match ctx.pool.take(uidx, client.pool_idle_timeout) {
        Some(c) => c,
        None => connect(ctx, uidx, group).await.map_err(nothing)?,
    };

    // Send head and body.
    d.out.ubuf.clear();
    let outgoing = Outgoing {
        upstream,
        agent: &ctx.agents[group_idx],
        client_ip: &d.out.peer_ip,
        client_proto: "http",
        framing: req.framing,
    };
    encode_request_head(&mut d.out.ubuf, &req.head, &outgoing);
    let idempotent = is_idempotent(&req.head);
    let whole = match send_body(ctx, fwd, d, req, &mut conn, group).await {
        Ok(whole) => whole,
        Err(SendError::Client(f)) => return Err(nothing(f)),
        Err(SendError::Upstream { whole }) if whole && conn.reused && idempotent => {
            // A reused keep-alive connection broke under an idempotent request: send it again,
            // once, on a fresh connection.
            conn = connect(ctx, uidx, group).await.map_err(nothing)?;
            write_upstream(&mut conn, &mut d.out.ubuf, client.stream_idle_timeout)
                .await
                .map_err(|e| nothing(Failure::upstream_io(&e)))?;
            false
        }
        Err(SendError::Upstream { .. }) => {
            return Err(nothing(Failure::Upstream(
                errors::UPSTREAM_BAD_RESPONSE,
                UpstreamErrorKind::Protocol,
            )))
        }
    };
    let mut replayable = whole && conn.reused && idempotent;

    // Watch the client while the upstream thinks and streams.
    let mut watch = Watch {
        live: d.inp.rbuf.is_empty(),
        gone: false,
    };
    let canceller = Canceller::new();
    let watch_buf = if watch.live {
        let mut b = mem::take(&mut d.inp.rbuf);
        super::reserve(&mut b, CLIENT_BUF);
        b
    } else {
        BytesMut::new()
    };
    let watch_fut = cancelable_read_append(&mut d.inp.r, watch_buf, canceller.handle());
    let mut watch_fut = pin!(watch_fut);
    let mut parked = BytesMut::new();
    let out = &mut d.out;

    let result = async {
        // Response head.
        let sent_at = Instant::now();
        let total_deadline = start + client.request_timeout;
        let head_deadline = (sent_at + client.first_byte_timeout).min(total_deadline);
        let mut scanner = HeadScanner::default();
        let resp = loop {
            match head::take_response(
                &mut conn.rbuf,
                &mut scanner,
                MAX_RESPONSE_HEAD,
                &req.head.method,
            ) {
                Ok(Some(r)) if r.head.status.is_informational() => {
                    if r.head.status == http::StatusCode::SWITCHING_PROTOCOLS {
                        return Err(nothing(Failure::Upstream(
                            errors::UPSTREAM_BAD_RESPONSE,
                            UpstreamErrorKind::Protocol,
                        )));
                    }
                    continue;
                }
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(_) => {
                    return Err(nothing(Failure::Upstream(
                        errors::UPSTREAM_BAD_RESPONSE,
                        UpstreamErrorKind::Protocol,
                    )))
                }
            }
            let got = watched(
                up_read(&mut conn, head_deadline),
                watch_fut.as_mut(),
                &mut watch,
                &mut parked,
            )
            .await
            .map_err(|_| nothing(Failure::ClientGone))?;
            match got {
                ReadOutcome::Data => {}
                ReadOutcome::Timeout => {
                    return Err(nothing(Failure::Upstream(
                        errors::UPSTREAM_TIMEOUT,
                        UpstreamErrorKind::Timeout,
                    )))
                }
                ReadOutcome::Eof | ReadOutcome::Error(_) => {
                    let no_byte = conn.rbuf.is_empty();
                    if replayable && no_byte {
                        // A reused keep-alive connection died under an idempotent request
                        // before answering: replay it once on a fresh connection.
                        replayable = false;
                        conn = connect(ctx, uidx, group).await.map_err(nothing)?;
                        write_upstream(&mut conn, &mut out.ubuf, client.stream_idle_timeout)
                            .await
                            .map_err(|e| nothing(Failure::upstream_io(&e)))?;
                        scanner.reset();
                        continue;
                    }
                    return Err(nothing(Failure::Upstream(
                        errors::UPSTREAM_BAD_RESPONSE,
                        UpstreamErrorKind::Protocol,
                    )));
                }
            }
        };
        relay_response(
            ctx,
            fwd,
            out,
            req,
            group,
            &mut conn,
            resp,
            total_deadline,
            &mut watch,
            watch_fut.as_mut(),
            &mut parked,
        )
        .await
    }
    .await;

    // The upstream answer is complete: free its connection before the last client write, so a
    // client that reconnects at once finds it in the pool.
    let result = match result {
        Ok((status, after, reusable)) => {
            if reusable {
                ctx.pool.put(uidx, conn, client.pool_max_idle);
            }
            match d.out.flush(ctx.config.forwards[fwd].idle_timeout).await {
                Ok(()) => Ok((status, after)),
                Err(_) => Err((Failure::ClientGone, Sent::Head(status))),
            }
        }
        Err(e) => Err(e),
    };

    // Stop watching and take back whatever the client sent meanwhile (a pipelined request).
    if watch.live {
        let _c = canceller.cancel();
        let (res, buf) = watch_fut.await;
        if let Ok(0) = res {
            watch.gone = true;
        }
        d.inp.rbuf = buf;
    } else if d.inp.rbuf.is_empty() {
        d.inp.rbuf = parked;
    }

    result.map(|(status, after)| {
        let after = if watch.gone { After::Close } else { after };
        (status, after)
    })
}

fn is_idempotent(head: &http::request::Parts) -> bool {
    matches!(
        head.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || head.headers.contains_key("idempotency-key")
}

async fn connect(ctx: &ShardCtx, uidx: usize, group: &Group) -> Result<UpConn, Failure> {
    if ctx.config.upstreams[uidx].scheme == crate::config::Scheme::Https {
        // Never send plaintext to a TLS port.
        return Err(Failure::Upstream(
            errors::UPSTREAM_TLS_UNSUPPORTED,
            UpstreamErrorKind::Connect,
        ));
    }
    let addr = ctx.addrs[uidx];
    match UpConn::connect(
        addr,
        group.client.connect_timeout,
        group.client.tcp_keepalive,
    )
    .await
    {
        Ok(c) => Ok(c),
        Err(ConnectError::Timeout) => Err(Failure::Upstream(
            errors::UPSTREAM_TIMEOUT,
            UpstreamErrorKind::Connect,
        )),
        Err(ConnectError::Io(e)) => {
            tracing::debug!(upstream = %ctx.config.upstreams[uidx].name, error = %e, "connect failed");
            Err(Failure::Upstream(
                errors::UPSTREAM_UNREACHABLE,
                UpstreamErrorKind::Connect,
            ))
        }
    }
}

/// Writes `buf` to the upstream. The buffer keeps its contents (for a replay).
async fn write_upstream(conn: &mut UpConn, buf: &mut BytesMut, limit: Duration) -> io::Result<()> {
    let b = mem::take(buf);
    match monoio::time::timeout(limit, conn.stream.write_all(b)).await {
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "upstream write timed out",
        )),
        Ok((res, b)) => {
            *buf = b;
            res.map(|_| ())
        }
    }
}

enum SendError {
    Client(Failure),
    /// Writing to the upstream failed; `whole`: the request was complete and is still in `ubuf`.
    Upstream {
        whole: bool,
    },
}

/// Sends the head already in `d.out.ubuf` and the request body as it arrives. Returns whether the
/// whole request went out in one write (and so is still in `d.out.ubuf`).
async fn send_body(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    req: &Request,
    conn: &mut UpConn,
    group: &Group,
) -> Result<bool, SendError> {
    let forward = &ctx.config.forwards[fwd];
    let limit = group.client.stream_idle_timeout;
    let chunked = req.framing == Framing::Chunked;
    let mut dec = BodyDecoder::new(req.framing).with_limit(forward.max_body_bytes);
    let mut total: u64 = 0;
    let mut writes = 0usize;
    loop {
        match dec.decode(&mut d.inp.rbuf) {
            Err(BodyError::TooLarge) => {
                return Err(SendError::Client(Failure::Client(errors::BODY_TOO_LARGE)))
            }
            Err(_) => return Err(SendError::Client(Failure::Client(errors::BAD_REQUEST))),
            Ok(Step::Data(b)) => {
                total += b.len() as u64;
                if total > forward.max_body_bytes {
                    return Err(SendError::Client(Failure::Client(errors::BODY_TOO_LARGE)));
                }
                if chunked {
                    encode_chunk(&mut d.out.ubuf, &b);
                } else {
                    d.out.ubuf.extend_from_slice(&b);
                }
                if d.out.ubuf.len() >= FLUSH_AT {
                    write_upstream(conn, &mut d.out.ubuf, limit)
                        .await
                        .map_err(|_| SendError::Upstream { whole: false })?;
                    writes += 1;
                    d.out.ubuf.clear();
                }
            }
            Ok(Step::Done) => {
                if chunked {
                    d.out.ubuf.extend_from_slice(LAST_CHUNK);
                }
                write_upstream(conn, &mut d.out.ubuf, limit)
                    .await
                    .map_err(|_| SendError::Upstream { whole: writes == 0 })?;
                writes += 1;
                if writes > 1 {
                    d.out.ubuf.clear();
                }
                return Ok(writes == 1);
            }
            Ok(Step::NeedMore) => {
                if !d.out.ubuf.is_empty() {
                    write_upstream(conn, &mut d.out.ubuf, limit)
                        .await
                        .map_err(|_| SendError::Upstream { whole: false })?;
                    writes += 1;
                    d.out.ubuf.clear();
                }
                let deadline = Instant::now() + forward.header_timeout;
                match d.inp.read_more(deadline).await {
                    ReadOutcome::Data => {}
                    ReadOutcome::Timeout => {
                        return Err(SendError::Client(Failure::Client(errors::HEAD_TIMEOUT)))
                    }
                    ReadOutcome::Eof | ReadOutcome::Error(_) => {
                        return Err(SendError::Client(Failure::ClientGone))
                    }
                }
            }
        }
    }
}

/// Writes the response head and relays the body, leaving its last bytes in `out.wbuf`. Returns
/// (status, keep client?, upstream connection reusable?).
#[allow(clippy::too_many_arguments)]
async fn relay_response<W: Future<Output = BufResult<usize, BytesMut>>>(
    ctx: &ShardCtx,
    fwd: usize,
    out: &mut ClientOut,
    req: &Request,
    group: &Group,
    conn: &mut UpConn,
    resp: Response,
    total_deadline: Instant,
    watch: &mut Watch,
    mut watch_fut: Pin<&mut W>,
    parked: &mut BytesMut,
) -> Result<(u16, After, bool), (Failure, Sent)> {
    let forward = &ctx.config.forwards[fwd];
    let client = &group.client;
    let status = resp.head.status.as_u16();
    let is_sse = resp
        .head
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let streamed =
        client.stream && (matches!(resp.framing, Framing::Chunked | Framing::Close) || is_sse);
    let client_11 = req.head.version == http::Version::HTTP_11;
    let body_out = match resp.framing {
        Framing::Empty => BodyOut::None,
        Framing::Length(n) => BodyOut::Length(n),
        Framing::Chunked | Framing::Close if client_11 => BodyOut::Chunked,
        Framing::Chunked | Framing::Close => BodyOut::Close,
    };
    let keep_client = req.keep_alive && body_out != BodyOut::Close && !ctx.drain.fired();
    out.wbuf.clear();
    encode_response_head(
        &mut out.wbuf,
        resp.head.status,
        &resp.head.headers,
        body_out,
        keep_client,
        req.head.method == Method::HEAD,
    );
    let head_sent = Sent::Head(status);
    let mut dec = BodyDecoder::new(resp.framing);
    let reencode = body_out == BodyOut::Chunked;
    loop {
        // Move everything decodable now into one client write.
        let mut done = false;
        loop {
            match dec.decode(&mut conn.rbuf) {
                Ok(Step::Data(b)) => {
                    if reencode {
                        encode_chunk(&mut out.wbuf, &b);
                    } else {
                        out.wbuf.extend_from_slice(&b);
                    }
                }
                Ok(Step::NeedMore) => break,
                Ok(Step::Done) => {
                    done = true;
                    break;
                }
                Err(_) => {
                    let _ = out.flush(forward.idle_timeout).await;
                    return Err((
                        Failure::Upstream(
                            errors::UPSTREAM_BAD_RESPONSE,
                            UpstreamErrorKind::Protocol,
                        ),
                        head_sent,
                    ));
                }
            }
        }
        if done {
            // The caller writes these last bytes after it has pooled the upstream connection.
            if reencode {
                out.wbuf.extend_from_slice(LAST_CHUNK);
            }
            let reusable = resp.keep_alive && conn.rbuf.is_empty();
            let after = if keep_client {
                After::KeepAlive
            } else {
                After::Close
            };
            return Ok((status, after, reusable));
        }
        // A client that is gone fails this write; one that stopped reading times it out.
        out.flush(forward.idle_timeout)
            .await
            .map_err(|_| (Failure::ClientGone, head_sent))?;
        let deadline = if streamed {
            Instant::now() + client.stream_idle_timeout
        } else {
            total_deadline
        };
        let got = watched(up_read(conn, deadline), watch_fut.as_mut(), watch, parked)
            .await
            .map_err(|_| (Failure::ClientGone, head_sent))?;
        match got {
            ReadOutcome::Data => {}
            ReadOutcome::Eof => {
                if !dec.on_eof() {
                    let _ = out.flush(forward.idle_timeout).await;
                    return Err((
                        Failure::Upstream(
                            errors::UPSTREAM_BAD_RESPONSE,
                            UpstreamErrorKind::Protocol,
                        ),
                        head_sent,
                    ));
                }
            }
            ReadOutcome::Timeout => {
                return Err((
                    Failure::Upstream(errors::UPSTREAM_TIMEOUT, UpstreamErrorKind::Timeout),
                    head_sent,
                ))
            }
            ReadOutcome::Error(e) => return Err((Failure::upstream_io(&e), head_sent)),
        }
    }
}
