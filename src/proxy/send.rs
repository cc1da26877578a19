//! Sending a request upstream (shard): connect, the head, and the body as it arrives from the
//! client. The body is kept as refcounted pieces (no copy) up to the replay cap, so a later
//! attempt on another upstream can send it again.

use std::io;
use std::mem;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;

use super::deadline::Deadlines;
use super::{Downstream, Failure, ReadOutcome, UP_WRITE};
use crate::config::Group;
use crate::http::body::{encode_chunk, BodyDecoder, BodyError, Framing, Step, LAST_CHUNK};
use crate::http::respond::errors;
use crate::shard::ShardCtx;
use crate::stats::UpstreamErrorKind;
use crate::upstream::connect::{open, ConnectError, ProxyFailure};
use crate::upstream::UpConn;

/// Flush the upstream-bound buffer once it holds this much.
const FLUSH_AT: usize = 64 * 1024;

/// The request body across attempts.
pub struct BodySend {
    dec: BodyDecoder,
    chunked: bool,
    /// The body read so far, for a replay: the first piece inline (most bodies arrive in one
    /// read, so keeping them allocates nothing), later ones in `kept_more`.
    kept_first: Option<Bytes>,
    kept_more: Vec<Bytes>,
    kept_len: usize,
    cap: usize,
    max_body: u64,
    total: u64,
    /// Some body bytes already went to an upstream without being kept.
    lost: bool,
}

impl BodySend {
    pub fn new(framing: Framing, max_body: u64, replay_cap: usize) -> Self {
        BodySend {
            dec: BodyDecoder::new(framing).with_limit(max_body),
            chunked: framing == Framing::Chunked,
            kept_first: None,
            kept_more: Vec::new(),
            kept_len: 0,
            cap: replay_cap,
            max_body,
            total: 0,
            lost: false,
        }
    }

    /// Another attempt can send the body again: everything read so far is kept (what is not
    /// read yet is still with the client).
    pub fn replayable(&self) -> bool {
        !self.lost
    }

    /// The whole body was read from the client.
    pub fn complete(&self) -> bool {
        self.dec.is_done()
    }

    /// Appends the whole kept body, framed, for a replay (only when `complete()`).
    pub fn encode_kept(&self, out: &mut BytesMut) {
        for piece in self.kept() {
            self.put(out, piece);
        }
        if self.chunked {
            out.extend_from_slice(LAST_CHUNK);
        }
    }

    fn keep(&mut self, b: &Bytes) {
        if self.lost {
            return;
        }
        if self.kept_len + b.len() <= self.cap {
            self.kept_len += b.len();
            if self.kept_first.is_none() {
                self.kept_first = Some(b.clone());
            } else {
                self.kept_more.push(b.clone());
            }
        } else {
            self.lost = true;
            self.kept_first = None;
            self.kept_more = Vec::new();
            self.kept_len = 0;
        }
    }

    /// The kept pieces in order.
    fn kept(&self) -> impl Iterator<Item = &Bytes> + '_ {
        self.kept_first.iter().chain(&self.kept_more)
    }

    fn put(&self, out: &mut BytesMut, b: &[u8]) {
        if self.chunked {
            encode_chunk(out, b);
        } else {
            out.extend_from_slice(b);
        }
    }
}

/// Why sending failed.
pub enum SendError {
    /// The client's body was refused or the client left.
    Client(Failure),
    /// Writing to the upstream failed (some bytes may have reached it).
    Upstream,
}

/// Connects to upstream `uidx` the way group `group_idx` reaches it (direct or through its
/// outbound proxy; TLS for https), within the group's connect timeout. Every failure here is
/// connect-class (nothing reached the upstream) and logged with its reason.
pub async fn connect(ctx: &ShardCtx, uidx: usize, group_idx: usize) -> Result<UpConn, Failure> {
    let group = &ctx.config.groups[group_idx];
    let upstream = &ctx.config.upstreams[uidx];
    // A handle on the table, not a borrow: the refresher's next table may be adopted while
    // this connection is being made.
    let egress = ctx.egress.borrow().clone();
    let via = egress.group_via[group_idx];
    let err = match open(
        &egress,
        uidx,
        upstream,
        via,
        &group.client,
        ctx.connectors[uidx].as_ref(),
    )
    .await
    {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    let proxy = egress.proxy(via).map(|p| p.proxy.display_url.as_str());
    let reply = match &err {
        ConnectError::Timeout => errors::UPSTREAM_TIMEOUT,
        ConnectError::Io(e) => {
            tracing::debug!(upstream = %upstream.name, error = %e, "connect failed");
            errors::UPSTREAM_UNREACHABLE
        }
        ConnectError::Tls {
            certificate,
            reason,
        } => {
            tracing::warn!(upstream = %upstream.name, url = %upstream.url, reason = %reason, "TLS handshake with the upstream failed");
            if *certificate {
                errors::UPSTREAM_TLS_CERTIFICATE
            } else {
                errors::UPSTREAM_TLS_HANDSHAKE
            }
        }
        ConnectError::Proxy(p) => {
            let proxy = proxy.unwrap_or("");
            match p {
                ProxyFailure::Unreachable(e) => {
                    tracing::warn!(upstream = %upstream.name, proxy, error = %e, "cannot connect to the outbound proxy");
                    errors::PROXY_UNREACHABLE
                }
                ProxyFailure::Refused(status) => {
                    tracing::warn!(upstream = %upstream.name, proxy, status, "the outbound proxy refused the CONNECT tunnel");
                    match status {
                        407 => errors::PROXY_AUTH,
                        403 => errors::PROXY_FORBIDDEN,
                        _ => errors::PROXY_REFUSED,
                    }
                }
                ProxyFailure::BadResponse(why) => {
                    tracing::warn!(upstream = %upstream.name, proxy, reason = why, "the outbound proxy's CONNECT answer was unusable");
                    errors::PROXY_BAD_RESPONSE
                }
            }
        }
    };
    Err(Failure::Upstream(reply, UpstreamErrorKind::Connect))
}

/// Writes `buf` to the upstream. The buffer keeps its contents.
pub async fn write_upstream(
    conn: &mut UpConn,
    buf: &mut BytesMut,
    timers: &mut Deadlines<5>,
    limit: Duration,
) -> io::Result<()> {
    let b = mem::take(buf);
    let at = Instant::now() + limit;
    match timers.run(UP_WRITE, at, conn.stream.write_all(b)).await {
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "upstream write timed out",
        )),
        Some((res, b)) => {
            *buf = b;
            res.map(|_| ())
        }
    }
}

/// Sends the head already in `d.out.ubuf`, the body kept from earlier attempts, then the rest of
/// the body as it arrives from the client.
pub async fn send_request(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    body: &mut BodySend,
    conn: &mut UpConn,
    group: &Group,
) -> Result<(), SendError> {
    let forward = &ctx.config.forwards[fwd];
    let limit = group.client.stream_idle_timeout;
    macro_rules! flush {
        () => {{
            write_upstream(conn, &mut d.out.ubuf, &mut d.out.timers, limit)
                .await
                .map_err(|_| SendError::Upstream)?;
            d.out.ubuf.clear();
        }};
    }
    for piece in body.kept() {
        body.put(&mut d.out.ubuf, piece);
        if d.out.ubuf.len() >= FLUSH_AT {
            flush!();
        }
    }
    loop {
        match body.dec.decode(&mut d.inp.rbuf) {
            Err(BodyError::TooLarge) => {
                return Err(SendError::Client(Failure::Client(errors::BODY_TOO_LARGE)))
            }
            Err(_) => return Err(SendError::Client(Failure::Client(errors::BAD_REQUEST))),
            Ok(Step::Data(b)) => {
                body.total += b.len() as u64;
                if body.total > body.max_body {
                    return Err(SendError::Client(Failure::Client(errors::BODY_TOO_LARGE)));
                }
                body.put(&mut d.out.ubuf, &b);
                body.keep(&b);
                if d.out.ubuf.len() >= FLUSH_AT {
                    flush!();
                }
            }
            Ok(Step::Done) => {
                if body.chunked {
                    d.out.ubuf.extend_from_slice(LAST_CHUNK);
                }
                flush!();
                return Ok(());
            }
            Ok(Step::NeedMore) => {
                if !d.out.ubuf.is_empty() {
                    flush!();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_pieces_replay_in_order_and_past_the_cap_are_dropped() {
        let mut b = BodySend::new(Framing::Length(11), 1 << 20, 64);
        for piece in [&b"hel"[..], b"lo ", b"world"] {
            b.keep(&Bytes::copy_from_slice(piece));
        }
        let mut out = BytesMut::new();
        b.encode_kept(&mut out);
        assert_eq!(&out[..], b"hello world");
        assert!(b.replayable());

        let mut c = BodySend::new(Framing::Chunked, 1 << 20, 64);
        c.keep(&Bytes::from_static(b"abc"));
        c.keep(&Bytes::from_static(b"de"));
        let mut out = BytesMut::new();
        c.encode_kept(&mut out);
        assert_eq!(&out[..], b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");

        let mut d = BodySend::new(Framing::Length(100), 1 << 20, 4);
        d.keep(&Bytes::from_static(b"abc"));
        d.keep(&Bytes::from_static(b"de"));
        assert!(!d.replayable());
        assert_eq!(d.kept().count(), 0);
    }
}
