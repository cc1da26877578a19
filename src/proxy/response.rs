//! The response side of an attempt (shard): reading the upstream with deadlines while a read
//! watches the client for a disconnect, and relaying the answer as it arrives.

use std::future::{poll_fn, Future};
use std::mem;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Instant;

use bytes::BytesMut;
use http::Method;
use monoio::BufResult;

use super::deadline::Deadlines;
use super::{After, ClientOut, Failure, ReadOutcome, Sent, UP_STREAM, UP_TOTAL};
use crate::config::Group;
use crate::http::body::{encode_chunk, BodyDecoder, Framing, Step, LAST_CHUNK};
use crate::http::fields::Known;
use crate::http::head::{Request, Response};
use crate::http::respond::{encode_response_head, BodyOut};
use crate::io::read_append;
use crate::shard::ShardCtx;
use crate::upstream::UpConn;

/// Tracks the read that watches the client while the upstream works.
pub struct Watch {
    pub live: bool,
    pub gone: bool,
}

/// Runs `main` while also polling the client watch; a watch that sees the client close ends the
/// wait with `Err(())`. Pipelined bytes from the client just stop the watch.
pub async fn watched<F: Future, W: Future<Output = BufResult<usize, BytesMut>>>(
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

/// Reads more upstream bytes into the connection's buffer, giving up at `deadline` (on the
/// timer of `kind`).
pub async fn up_read(
    conn: &mut UpConn,
    timers: &mut Deadlines<5>,
    kind: usize,
    deadline: Instant,
) -> ReadOutcome {
    conn.reserve();
    let buf = mem::take(&mut conn.rbuf);
    match timers
        .run(kind, deadline, read_append(&mut conn.stream, buf))
        .await
    {
        None => ReadOutcome::Timeout,
        Some((res, buf)) => {
            conn.rbuf = buf;
            match res {
                Ok(0) => ReadOutcome::Eof,
                Ok(_) => ReadOutcome::Data,
                Err(e) => ReadOutcome::Error(e),
            }
        }
    }
}

/// Writes the response head and relays the body, leaving its last bytes in `out.wbuf`. Returns
/// (status, keep client?, upstream connection reusable?). `in_sync`: the whole request was read
/// from the client, so its connection may be kept.
#[allow(clippy::too_many_arguments)]
pub async fn relay_response<W: Future<Output = BufResult<usize, BytesMut>>>(
    ctx: &ShardCtx,
    fwd: usize,
    out: &mut ClientOut,
    req: &Request,
    group: &Group,
    conn: &mut UpConn,
    resp: Response,
    total_deadline: Instant,
    in_sync: bool,
    watch: &mut Watch,
    mut watch_fut: Pin<&mut W>,
    parked: &mut BytesMut,
) -> Result<(u16, After, bool), (Failure, Sent)> {
    let forward = &ctx.config.forwards[fwd];
    let client = &group.client;
    let status = resp.status.as_u16();
    let is_sse = resp
        .headers
        .get(Known::ContentType)
        .is_some_and(|v| v.starts_with(b"text/event-stream"));
    let streamed =
        client.stream && (matches!(resp.framing, Framing::Chunked | Framing::Close) || is_sse);
    let client_11 = req.version == http::Version::HTTP_11;
    let body_out = match resp.framing {
        Framing::Empty => BodyOut::None,
        Framing::Length(n) => BodyOut::Length(n),
        Framing::Chunked | Framing::Close if client_11 => BodyOut::Chunked,
        Framing::Chunked | Framing::Close => BodyOut::Close,
    };
    let keep_client = in_sync && req.keep_alive && body_out != BodyOut::Close && !ctx.drain.fired();
    out.wbuf.clear();
    encode_response_head(
        &mut out.wbuf,
        resp.status,
        &resp.headers,
        body_out,
        keep_client,
        req.method == Method::HEAD,
        req.version,
    );
    if streamed {
        // The request is sent and no other attempt can follow a relayed head: a stream that may
        // stay open for minutes gives the upstream write buffer back to the shard meanwhile.
        ctx.spares.put(std::mem::take(&mut out.ubuf));
    }
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
                    return Err((Failure::bad_response(), head_sent));
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
        let (kind, deadline) = if streamed {
            (UP_STREAM, Instant::now() + client.stream_idle_timeout)
        } else {
            (UP_TOTAL, total_deadline)
        };
        let got = watched(
            up_read(conn, &mut out.timers, kind, deadline),
            watch_fut.as_mut(),
            watch,
            parked,
        )
        .await
        .map_err(|_| (Failure::ClientGone, head_sent))?;
        match got {
            ReadOutcome::Data => {}
            ReadOutcome::Eof => {
                if !dec.on_eof() {
                    let _ = out.flush(forward.idle_timeout).await;
                    return Err((Failure::bad_response(), head_sent));
                }
            }
            ReadOutcome::Timeout => return Err((Failure::timed_out(), head_sent)),
            ReadOutcome::Error(e) => return Err((Failure::upstream_io(&e), head_sent)),
        }
    }
}
