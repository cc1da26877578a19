//! One request (shard): the attempt loop. Each attempt picks an upstream, sends the request and
//! relays the answer. A failure before anything reached the client moves on to the next healthy
//! member (failover) or, when configured, retries with backoff; once the answer began, a failure
//! cuts the client connection and is never replayed.

use std::cell::Cell;
use std::mem;
use std::pin::pin;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::Method;

use super::response::{relay_response, up_read, watched, Watch};
use super::send::{connect, send_request, write_upstream, BodySend, SendError};
use super::{
    After, Downstream, Failure, ReadOutcome, Sent, CLIENT_BUF, CLIENT_CLOSED, IN_WATCH, UP_HEAD,
};
use crate::config::Group;
use crate::http::fields::{Fields, Known};
use crate::http::head::{self, HeadScanner, Request};
use crate::http::respond::errors;
use crate::io::cancelable_read_append;
use crate::shard::{Outcome, ShardCtx};
use crate::stats::UpstreamErrorKind;
use crate::upstream::request::{encode_request_head, Outgoing};

/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Body kept for a replay when the group has no `retry.max_body_bytes` (failover only).
const DEFAULT_REPLAY_CAP: usize = 1 << 20;
/// Longest backoff between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long the upstream may take before the client is watched for a disconnect.
const WATCH_AFTER: Duration = Duration::from_millis(2);
/// How long an upstream that stopped taking the request body may take to show the answer it
/// sent early. One that closed or reset the connection has it in our receive buffer already.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Serves one request. Returns whether the downstream connection stays open.
pub(super) async fn exchange(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    req: Request,
) -> After {
    let start = Instant::now();
    let forward = &ctx.config.forwards[fwd];
    let send_limit = forward.idle_timeout;

    let outcome = run(ctx, fwd, d, &req, start).await;
    let elapsed = start.elapsed();
    let (method, path) = (&req.method, req.target.path());
    match outcome {
        Ok((status, after)) => {
            ctx.stats.http_request(fwd, method, path, status, elapsed);
            if after == After::KeepAlive && req.keep_alive && !ctx.drain.fired() {
                After::KeepAlive
            } else {
                After::Close
            }
        }
        Err((Failure::Client(reply), _)) | Err((Failure::Upstream(reply, _), Sent::Nothing)) => {
            ctx.stats.http_error(fwd, reply.code, reply.status.as_u16());
            ctx.stats
                .http_request(fwd, method, path, reply.status.as_u16(), elapsed);
            // After a failure the request body may be half read: close to stay in sync.
            d.out.reply_error(&reply, send_limit).await;
            After::Close
        }
        Err((Failure::Upstream(reply, _), Sent::Head(status))) => {
            // The answer already began: cut the connection so the client sees a broken stream,
            // never a clean end.
            ctx.stats.http_error(fwd, reply.code, status);
            ctx.stats.http_request(fwd, method, path, status, elapsed);
            After::Close
        }
        Err((Failure::Limited(reply, secs), _)) => {
            ctx.stats.http_error(fwd, reply.code, 429);
            ctx.stats.http_request(fwd, method, path, 429, elapsed);
            // Nothing of the body was read: the connection stays usable only without one.
            let keep = req.keep_alive
                && req.framing == crate::http::body::Framing::Empty
                && !ctx.drain.fired();
            let secs = secs.max(1).to_string();
            d.out
                .reply_error_with(
                    &reply,
                    keep,
                    req.version,
                    send_limit,
                    &[("retry-after", secs.as_str())],
                )
                .await;
            if keep {
                After::KeepAlive
            } else {
                After::Close
            }
        }
        Err((Failure::ClientGone, _)) => {
            ctx.stats.http_error(fwd, "client_closed", CLIENT_CLOSED);
            ctx.stats
                .http_request(fwd, method, path, CLIENT_CLOSED, elapsed);
            After::Close
        }
    }
}

type RunResult = Result<(u16, After), (Failure, Sent)>;

/// How one attempt ended.
enum Attempt {
    /// The answer was relayed; the head came after the given time.
    Done(u16, After, Duration),
    /// Failed before any response byte reached the client.
    Failed {
        failure: Failure,
        /// Part of the request may have reached the upstream.
        sent: bool,
        /// Time to the response head (for the breaker's latency), when it arrived.
        head_after: Option<Duration>,
    },
    /// Failed after the head reached the client: the connection was cut.
    Cut(Failure, u16, Duration),
    /// The upstream answered a retryable status that was not relayed: retry after `wait`.
    Retry {
        status: u16,
        wait: Duration,
        /// The member asked (`Retry-After`) not to be sent this request again before then.
        hold: Option<Instant>,
        head_after: Duration,
    },
}

/// The retry policy's say for one attempt: may a 5xx/429 answer be retried instead of relayed?
struct RetryBudget<'a> {
    backoff: Duration,
    tried: &'a Tried,
    holds: &'a [Hold],
}

/// A member that answered with `Retry-After`: this request is not sent to it again before
/// `until`. Per request, so a member's wish costs nothing on the common path; other requests
/// learn of its trouble through the breaker (429 and 5xx count as failures).
#[derive(Clone, Copy)]
struct Hold {
    upstream: usize,
    until: Instant,
}

impl RetryBudget<'_> {
    /// Could a member other than `uidx` take the retry now? The members the next pick chooses
    /// from: available, not held, and not tried yet unless every member was (see
    /// [`next_round`]).
    fn another_member(&self, ctx: &ShardCtx, group: &Group, uidx: usize, now: Instant) -> bool {
        let tried = self.tried.as_slice();
        let all_tried = group.members.iter().all(|m| tried.contains(&m.upstream));
        group.members.iter().any(|m| {
            let u = m.upstream;
            u != uidx
                && (all_tried || !tried.contains(&u))
                && !held(self.holds, u, now)
                && ctx.available_at(u, now)
        })
    }
}

fn held(holds: &[Hold], upstream: usize, now: Instant) -> bool {
    holds
        .iter()
        .any(|h| h.upstream == upstream && h.until > now)
}

async fn run(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    req: &Request,
    start: Instant,
) -> RunResult {
    let forward = &ctx.config.forwards[fwd];
    // The per-client limit comes first: a refused request costs no body read and no upstream.
    if let Err(wait) = ctx.limits.check_forward(fwd, d.out.peer_addr, start) {
        return Err((
            Failure::Limited(errors::RATE_LIMITED, wait.secs()),
            Sent::Nothing,
        ));
    }
    if let crate::http::body::Framing::Length(n) = req.framing {
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
    let group_idx = ctx.route(fwd, req.target.path());
    let group = &ctx.config.groups[group_idx];
    let retry = group.client.retry.as_ref();
    let replay_cap = retry.map_or(DEFAULT_REPLAY_CAP, |r| r.max_replay_body_bytes);
    let mut body = BodySend::new(req.framing, forward.max_body_bytes, replay_cap);
    let idempotent = is_idempotent(req);
    // When the whole request had been sent: `timeout.request` bounds the upstreams' part of the
    // exchange from then on (Envoy's route timeout), retries included. The client's upload
    // before it is bounded by the forward's `timeout.connect` per gap (408), never counted here.
    let mut sent_at: Option<Instant> = None;
    let mut tried = Tried::default();
    let mut holds: Vec<Hold> = Vec::new();
    let mut retries = 0u32;
    let mut last: Option<Failure> = None;

    loop {
        let Some(uidx) = ctx.pick(group_idx, d.out.peer_addr, tried.as_slice()) else {
            let f = last.unwrap_or_else(|| no_upstream(ctx, group));
            return Err((f, Sent::Nothing));
        };
        tried.push(uidx);
        // An upstream at its own rate is passed over (another shard may have taken the last
        // token since the balancer looked).
        // One clock read for the rate limit, the breaker and the attempt's start.
        let now = Instant::now();
        if !ctx.limits.upstream_try_acquire(uidx, now) {
            continue;
        }
        // The breaker may refuse between pick and admission (a half-open probe slot taken).
        let Some(admission) = ctx.health.admit(uidx, now) else {
            continue;
        };
        let budget = retry.filter(|r| retries < r.attempts).map(|r| RetryBudget {
            backoff: backoff(ctx, r.initial, retries),
            tried: &tried,
            holds: &holds,
        });
        let _in_flight = ctx.in_flight(uidx);
        let up_start = now;
        let res = attempt(
            ctx,
            fwd,
            d,
            req,
            group_idx,
            group,
            uidx,
            &mut body,
            &mut sent_at,
            budget,
        )
        .await;
        let elapsed = up_start.elapsed();

        // Account for the attempt: metrics and the breaker (fed the time to the response head).
        let (kind, outcome, to_head) = match &res {
            Attempt::Done(status, _, head)
            | Attempt::Retry {
                status,
                head_after: head,
                ..
            } => {
                let kind = status_kind(*status);
                let failed = matches!(kind, Some(UpstreamErrorKind::Status5xx))
                    || (kind == Some(UpstreamErrorKind::Status429)
                        && ctx.config.upstreams[uidx].breaker.count_429);
                let outcome = if failed {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                (kind, outcome, *head)
            }
            Attempt::Failed {
                failure: Failure::Upstream(_, k),
                ..
            } => (Some(*k), Outcome::Failure, elapsed),
            Attempt::Cut(Failure::Upstream(_, k), _, head) => (Some(*k), Outcome::Failure, *head),
            Attempt::Cut(_, _, head) => (None, Outcome::Success, *head),
            Attempt::Failed {
                head_after: Some(head),
                ..
            } => (None, Outcome::Success, *head),
            Attempt::Failed { .. } => (None, Outcome::Unknown, elapsed),
        };
        ctx.stats.upstream_request(group_idx, uidx, elapsed, kind);
        ctx.record(uidx, admission, outcome, to_head);

        match res {
            Attempt::Done(status, after, _) => return Ok((status, after)),
            Attempt::Cut(f, status, _) => return Err((f, Sent::Head(status))),
            Attempt::Retry {
                status, wait, hold, ..
            } => {
                retries += 1;
                ctx.stats.upstream_retry(group_idx, uidx);
                tracing::debug!(upstream = %ctx.config.upstreams[uidx].name, status, ?wait, "retrying");
                if let Some(until) = hold {
                    holds.push(Hold {
                        upstream: uidx,
                        until,
                    });
                }
                monoio::time::sleep(wait).await;
                next_round(group, &mut tried, &holds);
                last = Some(Failure::Upstream(
                    errors::UPSTREAM_BAD_RESPONSE,
                    UpstreamErrorKind::Status5xx,
                ));
            }
            Attempt::Failed { failure, sent, .. } => {
                let Failure::Upstream(..) = failure else {
                    return Err((failure, Sent::Nothing));
                };
                if !body.replayable() {
                    return Err((failure, Sent::Nothing));
                }
                if !sent {
                    // Nothing reached that upstream: the next healthy member takes the request.
                    last = Some(failure);
                    continue;
                }
                // It reached the upstream without an answer: a replay must be safe.
                match retry {
                    Some(r) if retries < r.attempts => {
                        let wait = backoff(ctx, r.initial, retries);
                        let now = Instant::now();
                        if now + wait >= sent_at.unwrap_or(now) + group.client.request_timeout {
                            return Err((failure, Sent::Nothing));
                        }
                        retries += 1;
                        ctx.stats.upstream_retry(group_idx, uidx);
                        monoio::time::sleep(wait).await;
                        next_round(group, &mut tried, &holds);
                    }
                    None if idempotent => ctx.stats.upstream_retry(group_idx, uidx),
                    _ => return Err((failure, Sent::Nothing)),
                }
                last = Some(failure);
            }
        }
    }
}

/// Why no member could take the request: every available one is at its rate (429), or none is
/// available at all (503).
fn no_upstream(ctx: &ShardCtx, group: &Group) -> Failure {
    let now = Instant::now();
    let limited = group.members.iter().find_map(|m| {
        let u = m.upstream;
        if !ctx.health.is_available(u, now) {
            return None;
        }
        ctx.limits.upstreams.get(u)?.as_ref()?.retry_after(now)
    });
    match limited {
        Some(wait) => Failure::Limited(errors::UPSTREAM_RATE_LIMITED, wait.secs()),
        None => Failure::Upstream(errors::NO_UPSTREAM, UpstreamErrorKind::Connect),
    }
}

/// Before a retry's pick: retries prefer members not tried yet; when every member was tried,
/// any may take the retry, except one still held by its `Retry-After`.
fn next_round(group: &Group, tried: &mut Tried, holds: &[Hold]) {
    if group
        .members
        .iter()
        .all(|m| tried.as_slice().contains(&m.upstream))
    {
        tried.clear();
        let now = Instant::now();
        for h in holds {
            if h.until > now && !tried.as_slice().contains(&h.upstream) {
                tried.push(h.upstream);
            }
        }
    }
}

/// Members already tried for one request: inline (no allocation) up to [`Tried::INLINE`].
#[derive(Default)]
struct Tried {
    len: usize,
    inline: [usize; Tried::INLINE],
    spill: Vec<usize>,
}

impl Tried {
    const INLINE: usize = 8;

    fn as_slice(&self) -> &[usize] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }

    fn push(&mut self, upstream: usize) {
        if self.spill.is_empty() && self.len < Self::INLINE {
            self.inline[self.len] = upstream;
            self.len += 1;
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline[..self.len]);
            }
            self.spill.push(upstream);
        }
    }

    fn clear(&mut self) {
        self.len = 0;
        self.spill.clear();
    }
}

/// Exponential backoff with equal jitter: `initial × 2^n`, half of it fixed, half random.
fn backoff(ctx: &ShardCtx, initial: Duration, n: u32) -> Duration {
    let base = initial
        .saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX))
        .min(MAX_BACKOFF);
    let half = base / 2;
    half + half.mul_f64(ctx.random_unit())
}

fn status_kind(status: u16) -> Option<UpstreamErrorKind> {
    match status {
        429 => Some(UpstreamErrorKind::Status429),
        500..=599 => Some(UpstreamErrorKind::Status5xx),
        _ => None,
    }
}

fn is_idempotent(req: &Request) -> bool {
    matches!(
        req.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || req.headers.contains(Known::IdempotencyKey)
}

/// Longest `Retry-After` taken as given (a day); a longer one only needs to be over
/// [`MAX_BACKOFF`], and an instant that far ahead cannot overflow.
const MAX_RETRY_AFTER_SECS: u64 = 86_400;

/// `Retry-After` in delta-seconds (an HTTP date is ignored).
fn retry_after(h: &Fields) -> Option<Duration> {
    let v = std::str::from_utf8(h.get(Known::RetryAfter)?.trim_ascii()).ok()?;
    v.parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(MAX_RETRY_AFTER_SECS)))
}

/// One attempt on upstream `uidx`.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    ctx: &ShardCtx,
    fwd: usize,
    d: &mut Downstream,
    req: &Request,
    group_idx: usize,
    group: &Group,
    uidx: usize,
    body: &mut BodySend,
    request_sent: &mut Option<Instant>,
    budget: Option<RetryBudget<'_>>,
) -> Attempt {
    let client = &group.client;
    let upstream = &ctx.config.upstreams[uidx];
    let failed = |failure: Failure, sent: bool| Attempt::Failed {
        failure,
        sent,
        head_after: None,
    };

    let via = ctx.egress.borrow().group_via[group_idx];
    // Requests sent in absolute form go to the outbound proxy itself (an https upstream is
    // reached through a CONNECT tunnel instead): only then can a 407 be the proxy's.
    let to_forward_proxy = ctx.head_plan(group_idx, uidx).absolute_form();
    let mut conn = match ctx.pool.take(uidx, via, client.pool_idle_timeout) {
        Some(c) => c,
        // Boxed: a new connection's future (TCP, CONNECT tunnel, TLS handshake, their timers)
        // is 3.5 KiB, which would otherwise sit in every connection's frame for its lifetime.
        None => match Box::pin(connect(ctx, uidx, group_idx)).await {
            Ok(c) => c,
            Err(f) => return failed(f, false),
        },
    };
    if d.out.ubuf.capacity() == 0 {
        // Given back while an earlier answer streamed.
        d.out.ubuf = ctx.spares.take();
    } else {
        d.out.ubuf.clear();
    }
    let peer_ip = d.out.peer_ip.clone();
    let outgoing = Outgoing {
        upstream,
        plan: ctx.head_plan(group_idx, uidx),
        client_ip: &peer_ip,
        client_proto: if ctx.config.forwards[fwd].tls.is_some() {
            "https"
        } else {
            "http"
        },
        framing: req.framing,
    };
    encode_request_head(&mut d.out.ubuf, req, &outgoing);
    let idempotent = is_idempotent(req);
    // An upstream that stops taking the request may have answered early: a 413 or 401 decided
    // from the head, sent before it closed (or reset) the connection under our writes. That
    // answer is relayed as nginx does, then both connections close (the rest of the client's
    // body was never read). With no answer it is the failure it was: some of the request may
    // have reached the upstream, and whether to send it elsewhere is the attempt loop's call.
    let early = match send_request(ctx, fwd, d, body, &mut conn, group).await {
        Ok(()) => false,
        Err(SendError::Client(f)) => return failed(f, true),
        Err(SendError::Upstream) => true,
    };
    // An idempotent request on a reused connection that dies before any response byte is sent
    // again once, to the same upstream, on a fresh connection (the keep-alive race).
    let mut stale_replay =
        !early && conn.reused && idempotent && body.replayable() && body.complete();

    // Watch the client while the upstream thinks and streams, so that a client that leaves
    // stops the upstream's work. The watch read starts only once the upstream has taken
    // WATCH_AFTER: most answers come sooner, and a watch that is never started needs no read
    // and no cancellation (each a round through the kernel). A client leaving is then noticed
    // at most WATCH_AFTER later.
    let mut watch = Watch {
        live: d.inp.rbuf.is_empty(),
        gone: false,
    };
    let watch_buf: Cell<Option<BytesMut>> = Cell::new(None);
    if watch.live {
        let mut b = mem::take(&mut d.inp.rbuf);
        super::reserve(&mut b, CLIENT_BUF);
        watch_buf.set(Some(b));
    }
    let started = Cell::new(false);
    let sent_at = Instant::now();
    let total_deadline = *request_sent.get_or_insert(sent_at) + client.request_timeout;
    let watch_at = sent_at + WATCH_AFTER;
    let cancel = d.inp.watch_cancel.handle();
    let (client_r, client_timers) = (&mut d.inp.r, &mut d.inp.timers);
    let watch_fut = async {
        client_timers.sleep_until(IN_WATCH, watch_at).await;
        started.set(true);
        let buf = watch_buf.take().unwrap_or_default();
        cancelable_read_append(client_r, buf, cancel).await
    };
    let mut watch_fut = pin!(watch_fut);
    let mut parked = BytesMut::new();
    let out = &mut d.out;

    let result: Result<(u16, After, bool, Duration), Attempt> = async {
        let mut head_deadline = (sent_at + client.first_byte_timeout).min(total_deadline);
        if early {
            head_deadline = head_deadline.min(sent_at + EARLY_ANSWER_WAIT);
        }
        let mut scanner = HeadScanner::default();
        let resp = loop {
            match head::take_response(&mut conn.rbuf, &mut scanner, MAX_RESPONSE_HEAD, &req.method)
            {
                Ok(Some(r)) if r.status.is_informational() => {
                    if r.status == http::StatusCode::SWITCHING_PROTOCOLS {
                        return Err(failed(Failure::bad_response(), true));
                    }
                    continue;
                }
                // Only a proxy answers 407: the client cannot fix our proxy credentials.
                Ok(Some(r)) if to_forward_proxy && r.status.as_u16() == 407 => {
                    tracing::warn!(upstream = %upstream.name, "the outbound proxy answered 407 (authentication required or rejected)");
                    return Err(failed(
                        Failure::Upstream(errors::PROXY_AUTH, UpstreamErrorKind::Connect),
                        true,
                    ));
                }
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(_) => return Err(failed(Failure::bad_response(), true)),
            }
            let got = watched(
                up_read(&mut conn, &mut out.timers, UP_HEAD, head_deadline),
                watch_fut.as_mut(),
                &mut watch,
                &mut parked,
            )
            .await
            .map_err(|_| failed(Failure::ClientGone, true))?;
            match got {
                ReadOutcome::Data => {}
                ReadOutcome::Timeout if early => return Err(failed(Failure::bad_response(), true)),
                ReadOutcome::Timeout => return Err(failed(Failure::timed_out(), true)),
                ReadOutcome::Eof | ReadOutcome::Error(_) => {
                    if stale_replay && conn.rbuf.is_empty() {
                        stale_replay = false;
                        conn = connect(ctx, uidx, group_idx)
                            .await
                            .map_err(|f| failed(f, true))?;
                        out.ubuf.clear();
                        encode_request_head(&mut out.ubuf, req, &outgoing);
                        body.encode_kept(&mut out.ubuf);
                        write_upstream(
                            &mut conn,
                            &mut out.ubuf,
                            &mut out.timers,
                            client.stream_idle_timeout,
                        )
                        .await
                        .map_err(|_| failed(Failure::bad_response(), true))?;
                        scanner.reset();
                        continue;
                    }
                    return Err(failed(Failure::bad_response(), true));
                }
            }
        };
        let head_after = sent_at.elapsed();
        // A retryable answer is not relayed when the retry policy allows another attempt.
        if let (Some(b), Some(_)) = (&budget, status_kind(resp.status.as_u16())) {
            if body.replayable() && body.complete() {
                // `Retry-After` is this member's request to be left alone: it holds this member
                // only. Another member takes the retry after the backoff; with none, the retry
                // waits for this one, but never beyond the backoff cap (the answer, with its
                // `Retry-After`, is then relayed for the client to back off itself).
                let now = Instant::now();
                let asked = retry_after(&resp.headers);
                let (wait, hold) = if b.another_member(ctx, group, uidx, now) {
                    (b.backoff, asked.map(|ra| now + ra))
                } else {
                    (asked.map_or(b.backoff, |ra| ra.max(b.backoff)), None)
                };
                if wait <= MAX_BACKOFF && now + wait < total_deadline {
                    return Err(Attempt::Retry {
                        status: resp.status.as_u16(),
                        wait,
                        hold,
                        head_after,
                    });
                }
            }
        }
        if early {
            // The client may still be sending the body nobody reads: close lingeringly.
            out.linger = true;
        }
        relay_response(
            ctx,
            fwd,
            out,
            req,
            group,
            &mut conn,
            resp,
            total_deadline,
            !early,
            &mut watch,
            watch_fut.as_mut(),
            &mut parked,
        )
        .await
        .map(|(status, after, reusable)| (status, after, reusable && !early, head_after))
        .map_err(|(f, sent)| match sent {
            Sent::Head(status) => Attempt::Cut(f, status, head_after),
            Sent::Nothing => Attempt::Failed {
                failure: f,
                sent: true,
                head_after: Some(head_after),
            },
        })
    }
    .await;

    // The upstream answer is complete: free its connection before the last client write, so a
    // client that reconnects at once finds it in the pool.
    let result = match result {
        Ok((status, after, reusable, head_after)) => {
            if reusable {
                ctx.pool.put(uidx, via, conn, client.pool_max_idle);
            }
            match d.out.flush(ctx.config.forwards[fwd].idle_timeout).await {
                Ok(()) => Attempt::Done(status, after, head_after),
                Err(_) => Attempt::Cut(Failure::ClientGone, status, head_after),
            }
        }
        Err(a) => a,
    };

    // Stop watching and take back whatever the client sent meanwhile (a pipelined request).
    if watch.live && started.get() {
        d.inp.watch_cancel = mem::take(&mut d.inp.watch_cancel).cancel();
        let (res, buf) = watch_fut.await;
        if let Ok(0) = res {
            watch.gone = true;
        }
        d.inp.rbuf = buf;
    } else if watch.live {
        d.inp.rbuf = watch_buf.take().unwrap_or_default();
    } else if d.inp.rbuf.is_empty() {
        d.inp.rbuf = parked;
    }
    match result {
        Attempt::Done(status, After::KeepAlive, head) if watch.gone => {
            Attempt::Done(status, After::Close, head)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::Tried;

    #[test]
    fn tried_spills_past_its_inline_room_and_clears() {
        let mut t = Tried::default();
        for u in 0..Tried::INLINE + 3 {
            t.push(u * 10);
            assert_eq!(t.as_slice().len(), u + 1);
        }
        let want: Vec<usize> = (0..Tried::INLINE + 3).map(|u| u * 10).collect();
        assert_eq!(t.as_slice(), &want[..]);
        t.clear();
        assert!(t.as_slice().is_empty());
        t.push(7);
        assert_eq!(t.as_slice(), &[7]);
    }
}
