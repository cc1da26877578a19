//! Shard-side statistics (shard): counters owned by one shard through `Rc`, mutated without locks
//! or shared atomics, shipped to the control thread as one [`StatsDelta`] per tick.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crossbeam::channel::{Sender, TrySendError};
use hdrhistogram::Histogram;

use super::delta::{
    method_index, BreakerSample, DurationCounts, HttpErrorSample, HttpSample, LatencySamples,
    StatsDelta, UpstreamSample, METHODS, OTHER_PATH,
};
use super::UpstreamErrorKind;
use crate::config::Config;

/// Distinct `path` label values kept per forward (per shard and after the merge); later paths are
/// counted under [`OTHER_PATH`].
pub const MAX_PATHS_PER_FORWARD: usize = 64;

/// Paths longer than this (bytes) are counted under [`OTHER_PATH`]: they are almost always ids.
pub const MAX_PATH_LABEL_BYTES: usize = 256;

/// Distinct `{error, status}` pairs kept per forward; later ones fold into `{_other, 0}`.
pub const MAX_ERROR_SERIES_PER_FORWARD: usize = 64;

/// How often the final flush is tried on stop (with [`FINAL_FLUSH_PAUSE`] between tries).
pub const FINAL_FLUSH_ATTEMPTS: usize = 5;

/// Pause between final flush attempts.
pub const FINAL_FLUSH_PAUSE: Duration = Duration::from_millis(10);

/// Latency histograms: 1 µs – 1 h, 2 significant digits (about 25 KiB each).
pub(crate) fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

/// The `path` label part of a request target: the path without query or fragment. `None` when the
/// target is not an origin-form path or is too long to be a useful label.
pub fn path_label(target: &str) -> Option<&str> {
    // A byte scan: both delimiters are ASCII, so the cut is on a char boundary (a `[char]`
    // pattern decodes every char and costs several times more).
    let end = target
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    let path = &target[..end];
    if !path.starts_with('/') || path.len() > MAX_PATH_LABEL_BYTES {
        return None;
    }
    Some(path)
}

#[inline]
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// FxHash (rustc's hasher) for the path table, looked up on every request: a handful of
/// multiplies instead of SipHash's rounds. Its weakness, keys chosen to collide, is bounded
/// here: the table never holds more than [`MAX_PATHS_PER_FORWARD`] paths, so a client that
/// forces collisions makes a lookup scan at most 64 entries.
#[derive(Default)]
struct PathHasher(u64);

impl PathHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for PathHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Per-forward downstream tallies.
struct ForwardTally {
    /// Interned path → row index; row 0 is [`OTHER_PATH`] and is not in the map.
    paths: HashMap<Box<str>, usize, BuildHasherDefault<PathHasher>>,
    names: Vec<Arc<str>>,
    rows: Vec<[DurationCounts; METHODS]>,
    errors: Vec<HttpErrorSample>,
    latency: Histogram<u64>,
}

impl ForwardTally {
    fn new() -> Self {
        let mut names = Vec::with_capacity(MAX_PATHS_PER_FORWARD + 1);
        names.push(Arc::from(OTHER_PATH));
        let mut rows = Vec::with_capacity(MAX_PATHS_PER_FORWARD + 1);
        rows.push([DurationCounts::default(); METHODS]);
        ForwardTally {
            paths: HashMap::with_capacity_and_hasher(MAX_PATHS_PER_FORWARD, Default::default()),
            names,
            rows,
            errors: Vec::new(),
            latency: latency_histogram(),
        }
    }

    /// Row for a path; allocates only the first time a path is seen (at most 64 times).
    #[inline]
    fn row(&mut self, target: &str) -> usize {
        let Some(path) = path_label(target) else {
            return 0;
        };
        if let Some(&row) = self.paths.get(path) {
            return row;
        }
        if self.paths.len() >= MAX_PATHS_PER_FORWARD {
            return 0;
        }
        let row = self.rows.len();
        self.paths.insert(Box::from(path), row);
        self.names.push(Arc::from(path));
        self.rows.push([DurationCounts::default(); METHODS]);
        row
    }
}

/// One `{group, upstream}` pair's tallies.
struct UpstreamTally {
    group: usize,
    upstream: usize,
    duration: DurationCounts,
    errors: [u64; UpstreamErrorKind::COUNT],
    retries: u64,
}

impl Tallies {
    /// Index into `pairs` of a configured `{group, upstream}` membership.
    fn pair(&self, group: usize, upstream: usize) -> Option<usize> {
        if upstream >= self.n_upstreams {
            return None;
        }
        match self.pair_slot.get(group * self.n_upstreams + upstream) {
            Some(&s) if s != u32::MAX => Some(s as usize),
            _ => None,
        }
    }
}

struct Tallies {
    forwards: Vec<ForwardTally>,
    n_upstreams: usize,
    /// `group * n_upstreams + upstream` → index into `pairs`, `u32::MAX` when not a member.
    pair_slot: Vec<u32>,
    pairs: Vec<UpstreamTally>,
    upstream_latency: Vec<Histogram<u64>>,
    /// Breaker inputs per upstream (index = upstream).
    breaker: Vec<BreakerSample>,
    invalid_records: u64,
}

/// One shard's statistics, owned by the shard (`Rc`), mutated without locks.
///
/// Recording is O(1) on preallocated tables; nothing allocates except the first sighting of a path
/// (≤ 64 per forward) or an `{error, status}` pair. [`take_delta`](Self::take_delta) (once per
/// tick) moves the counts out into a `Send` [`StatsDelta`].
pub struct ShardStats {
    shard: usize,
    seq: Cell<u64>,
    tallies: RefCell<Tallies>,
    /// Epoch of the snapshot the shard adopted (set by `ShardHealth`), sent with every delta.
    epoch: Cell<u64>,
    /// A delta whose send failed: folded into the next one so nothing is lost.
    pending: RefCell<Option<StatsDelta>>,
    failed_sends: Cell<u64>,
}

impl ShardStats {
    /// Tables sized for `config`'s forwards, groups and upstreams.
    pub fn new(shard: usize, config: &Config) -> Self {
        let n_upstreams = config.upstreams.len();
        let mut pair_slot = vec![u32::MAX; config.groups.len() * n_upstreams];
        let mut pairs = Vec::new();
        for (g, group) in config.groups.iter().enumerate() {
            for m in &group.members {
                if m.upstream < n_upstreams {
                    let slot = &mut pair_slot[g * n_upstreams + m.upstream];
                    if *slot == u32::MAX {
                        *slot = pairs.len() as u32;
                        pairs.push(UpstreamTally {
                            group: g,
                            upstream: m.upstream,
                            duration: DurationCounts::default(),
                            errors: [0; UpstreamErrorKind::COUNT],
                            retries: 0,
                        });
                    }
                }
            }
        }
        ShardStats {
            shard,
            seq: Cell::new(0),
            tallies: RefCell::new(Tallies {
                forwards: config
                    .forwards
                    .iter()
                    .map(|_| ForwardTally::new())
                    .collect(),
                n_upstreams,
                pair_slot,
                pairs,
                upstream_latency: (0..n_upstreams).map(|_| latency_histogram()).collect(),
                breaker: (0..n_upstreams)
                    .map(|upstream| BreakerSample {
                        upstream,
                        ..BreakerSample::default()
                    })
                    .collect(),
                invalid_records: 0,
            }),
            epoch: Cell::new(0),
            pending: RefCell::new(None),
            failed_sends: Cell::new(0),
        }
    }

    /// This shard's id.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// A downstream request finished (or was answered by the proxy itself).
    ///
    /// `path` may be the whole request target: the query is cut off. `status` is not a label of
    /// the request families (errors carry it, see [`http_error`](Self::http_error)).
    pub fn http_request(
        &self,
        forward: usize,
        method: &http::Method,
        path: &str,
        _status: u16,
        elapsed: Duration,
    ) {
        let mut t = self.tallies.borrow_mut();
        let Some(f) = t.forwards.get_mut(forward) else {
            t.invalid_records += 1;
            return;
        };
        let us = micros(elapsed);
        let row = f.row(path);
        f.rows[row][method_index(method) as usize].record(us);
        f.latency.saturating_record(us);
    }

    /// A downstream request ended in an error the proxy reports (`error` is a short label such
    /// as `bad_request`, `upstream_unreachable`, `upstream_timeout`, `payload_too_large`).
    pub fn http_error(&self, forward: usize, error: &'static str, status: u16) {
        let mut t = self.tallies.borrow_mut();
        let Some(f) = t.forwards.get_mut(forward) else {
            t.invalid_records += 1;
            return;
        };
        let (error, status) = if f.errors.len() >= MAX_ERROR_SERIES_PER_FORWARD
            && !f
                .errors
                .iter()
                .any(|e| e.error == error && e.status == status)
        {
            (OTHER_PATH, 0)
        } else {
            (error, status)
        };
        match f
            .errors
            .iter_mut()
            .find(|e| e.error == error && e.status == status)
        {
            Some(e) => e.count += 1,
            None => f.errors.push(HttpErrorSample {
                forward,
                error,
                status,
                count: 1,
            }),
        }
    }

    /// One exchange with an upstream ended; `error` is None on success.
    ///
    /// `group` indexes `Config::groups`, `upstream` indexes `Config::upstreams` (not the member
    /// position); pairs that are not a configured membership are ignored and counted as invalid.
    pub fn upstream_request(
        &self,
        group: usize,
        upstream: usize,
        elapsed: Duration,
        error: Option<UpstreamErrorKind>,
    ) {
        let mut t = self.tallies.borrow_mut();
        let Some(slot) = t.pair(group, upstream) else {
            t.invalid_records += 1;
            return;
        };
        let us = micros(elapsed);
        let p = &mut t.pairs[slot];
        p.duration.record(us);
        if let Some(e) = error {
            p.errors[e.index()] += 1;
        }
        t.upstream_latency[upstream].saturating_record(us);
    }

    /// Sequence number the next [`take_delta`](Self::take_delta) will carry: whatever is
    /// recorded now reaches the control thread in the delta with this sequence number (or a
    /// later one it is folded into).
    pub fn next_seq(&self) -> u64 {
        self.seq.get() + 1
    }

    /// Records the epoch of the snapshot the shard adopted (reported in every delta).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.set(epoch);
    }

    /// Epoch last set with [`set_epoch`](Self::set_epoch).
    pub fn epoch(&self) -> u64 {
        self.epoch.get()
    }

    #[inline]
    fn with_breaker(&self, upstream: usize, f: impl FnOnce(&mut BreakerSample)) {
        let mut t = self.tallies.borrow_mut();
        match t.breaker.get_mut(upstream) {
            Some(b) => f(b),
            None => t.invalid_records += 1,
        }
    }

    /// The breaker refused a call to `upstream`.
    pub fn breaker_rejected(&self, upstream: usize) {
        self.with_breaker(upstream, |b| b.rejected += 1);
    }

    /// A half-open probe of `round` was admitted.
    pub fn breaker_probe_admitted(&self, upstream: usize, round: u64) {
        self.with_breaker(upstream, |b| {
            if probe_round(b, round) {
                b.probes_admitted += 1;
            }
        });
    }

    /// The shard tripped `upstream` locally (consecutive failures).
    pub fn breaker_fast_trip(&self, upstream: usize) {
        self.with_breaker(upstream, |b| b.fast_trip = true);
    }

    /// An admitted call ended; `probe_round` is the admission's (0 = not a probe).
    pub fn breaker_outcome(
        &self,
        upstream: usize,
        probe_round_of_call: u64,
        outcome: crate::breaker::Outcome,
        latency_us: u64,
    ) {
        use crate::breaker::Outcome;
        self.with_breaker(upstream, |b| {
            let probe = probe_round_of_call != 0 && probe_round(b, probe_round_of_call);
            match outcome {
                Outcome::Success => {
                    b.successes += 1;
                    b.latency_sum_us = b.latency_sum_us.saturating_add(latency_us);
                    b.latency_count += 1;
                    if probe {
                        b.probe_successes += 1;
                    }
                }
                Outcome::Failure => {
                    b.failures += 1;
                    if probe {
                        b.probe_failures += 1;
                    }
                }
            }
        });
    }

    /// A request is sent again (to another member or the same one) after this upstream failed
    /// it or answered 5xx/429.
    pub fn upstream_retry(&self, group: usize, upstream: usize) {
        let mut t = self.tallies.borrow_mut();
        match t.pair(group, upstream) {
            Some(slot) => t.pairs[slot].retries += 1,
            None => t.invalid_records += 1,
        }
    }

    /// Moves every count since the previous call into a delta and leaves zeros (same tables, no
    /// reallocation of the shard's storage). Each call gets the next sequence number.
    pub fn take_delta(&self) -> StatsDelta {
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        let mut t = self.tallies.borrow_mut();
        let mut d = StatsDelta {
            shard: self.shard,
            seq,
            epoch: self.epoch.get(),
            failed_sends: self.failed_sends.replace(0),
            invalid_records: std::mem::take(&mut t.invalid_records),
            ..StatsDelta::default()
        };
        for (fi, f) in t.forwards.iter_mut().enumerate() {
            for (ri, row) in f.rows.iter_mut().enumerate() {
                for (mi, cell) in row.iter_mut().enumerate() {
                    if !cell.is_zero() {
                        d.http.push(HttpSample {
                            forward: fi,
                            method: mi as u8,
                            path: f.names[ri].clone(),
                            duration: std::mem::take(cell),
                        });
                    }
                }
            }
            d.http_errors.append(&mut f.errors);
            if let Some(s) = drain_histogram(&mut f.latency) {
                d.forward_latency.push((fi, s));
            }
        }
        for p in t.pairs.iter_mut() {
            if !p.duration.is_zero() || p.retries > 0 {
                d.upstreams.push(UpstreamSample {
                    group: p.group,
                    upstream: p.upstream,
                    duration: std::mem::take(&mut p.duration),
                    errors: std::mem::take(&mut p.errors),
                    retries: std::mem::take(&mut p.retries),
                });
            }
        }
        for (ui, h) in t.upstream_latency.iter_mut().enumerate() {
            if let Some(s) = drain_histogram(h) {
                d.upstream_latency.push((ui, s));
            }
        }
        for b in t.breaker.iter_mut() {
            if !b.is_zero() {
                d.breaker.push(*b);
                // The probe round stays: later outcomes of the same round keep counting.
                *b = BreakerSample {
                    upstream: b.upstream,
                    probe_round: b.probe_round,
                    ..BreakerSample::default()
                };
            }
        }
        d
    }

    /// Takes a delta, folds in any earlier unsent one, and `try_send`s it; never blocks. On
    /// failure (channel full or control thread gone) the delta is kept for the next attempt and
    /// the failure is counted. Returns whether the send succeeded.
    pub fn flush(&self, tx: &Sender<StatsDelta>) -> bool {
        let fresh = self.take_delta();
        let delta = match self.pending.borrow_mut().take() {
            Some(mut older) => {
                older.absorb(fresh);
                older
            }
            None => fresh,
        };
        match tx.try_send(delta) {
            Ok(()) => true,
            Err(TrySendError::Full(d)) | Err(TrySendError::Disconnected(d)) => {
                self.failed_sends.set(self.failed_sends.get() + 1);
                *self.pending.borrow_mut() = Some(d);
                false
            }
        }
    }

    /// True when a delta is waiting for a successful send.
    pub fn has_pending(&self) -> bool {
        self.pending.borrow().is_some()
    }
}

/// Moves `b`'s probe counts to `round` when it is newer; false when `round` is older (its
/// results no longer matter to the control thread).
fn probe_round(b: &mut BreakerSample, round: u64) -> bool {
    if round > b.probe_round {
        b.probe_round = round;
        b.probes_admitted = 0;
        b.probe_successes = 0;
        b.probe_failures = 0;
    }
    round == b.probe_round
}

fn drain_histogram(h: &mut Histogram<u64>) -> Option<LatencySamples> {
    if h.is_empty() {
        return None;
    }
    let s = h
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    h.reset();
    Some(LatencySamples(s))
}

/// Tells a shard's ticker to stop; shard-local (`Rc`), triggered by the shard itself (e.g. its
/// drain logic). Clones share the flag.
#[derive(Clone, Default)]
pub struct StopSignal(Rc<StopInner>);

#[derive(Default)]
struct StopInner {
    stopped: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests the stop and wakes whoever waits in [`stopped`](Self::stopped).
    pub fn trigger(&self) {
        self.0.stopped.set(true);
        for w in self.0.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.0.stopped.get()
    }

    /// Completes once [`trigger`](Self::trigger) was called.
    pub fn stopped(&self) -> Stopped<'_> {
        Stopped(self)
    }
}

/// Future returned by [`StopSignal::stopped`].
pub struct Stopped<'a>(&'a StopSignal);

impl Future for Stopped<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &(self.0).0;
        if inner.stopped.get() {
            return Poll::Ready(());
        }
        let mut wakers = inner.wakers.borrow_mut();
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The shard's stats ticker (a monoio task; needs the timer enabled): every `tick` sends one delta
/// with `try_send` (failed sends are folded into the next delta, see [`ShardStats::flush`]). When
/// `stop` is triggered it sends a final delta, trying [`FINAL_FLUSH_ATTEMPTS`] times. Returns
/// whether the final delta was delivered.
pub async fn run_ticker(
    stats: Rc<ShardStats>,
    tx: Sender<StatsDelta>,
    tick: Duration,
    stop: StopSignal,
) -> bool {
    run_ticker_with(stats, tx, tick, stop, || {}).await
}

/// [`run_ticker`] that calls `before_flush` on every tick right before the delta is taken (the
/// shard adopts the newest snapshot there, so the delta reports the epoch it now runs on). The
/// hook must not block.
pub async fn run_ticker_with(
    stats: Rc<ShardStats>,
    tx: Sender<StatsDelta>,
    tick: Duration,
    stop: StopSignal,
    mut before_flush: impl FnMut(),
) -> bool {
    let mut next = monoio::time::Instant::now() + tick;
    while !stop.is_triggered() {
        monoio::select! {
            _ = monoio::time::sleep_until(next) => {
                before_flush();
                stats.flush(&tx);
                next += tick;
                let now = monoio::time::Instant::now();
                if next < now {
                    // The shard was stalled for more than a tick: do not burst to catch up.
                    next = now + tick;
                }
            }
            _ = stop.stopped() => {}
        }
    }
    for attempt in 0..FINAL_FLUSH_ATTEMPTS {
        if stats.flush(&tx) {
            return true;
        }
        if attempt + 1 < FINAL_FLUSH_ATTEMPTS {
            monoio::time::sleep(FINAL_FLUSH_PAUSE).await;
        }
    }
    tracing::warn!(shard = stats.shard(), "final stats delta not delivered");
    false
}

impl Default for ShardStats {
    /// Shard 0 with no forwards or upstreams: every record is counted as invalid. Prefer
    /// [`ShardStats::new`]; this exists for code that only needs a sink.
    fn default() -> Self {
        ShardStats {
            shard: 0,
            seq: Cell::new(0),
            tallies: RefCell::new(Tallies {
                forwards: Vec::new(),
                n_upstreams: 0,
                pair_slot: Vec::new(),
                pairs: Vec::new(),
                upstream_latency: Vec::new(),
                breaker: Vec::new(),
                invalid_records: 0,
            }),
            epoch: Cell::new(0),
            pending: RefCell::new(None),
            failed_sends: Cell::new(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::testing::test_config;

    #[test]
    fn path_label_drops_query_and_rejects_non_paths() {
        assert_eq!(path_label("/v1/chat?key=secret"), Some("/v1/chat"));
        assert_eq!(path_label("/v1/x#frag"), Some("/v1/x"));
        assert_eq!(path_label("http://h/v1"), None);
        assert_eq!(path_label("*"), None);
        assert_eq!(path_label(&format!("/{}", "a".repeat(300))), None);
    }

    #[test]
    fn invalid_indices_are_counted_not_panicking() {
        let config = test_config();
        let s = ShardStats::new(0, &config);
        s.http_request(9, &http::Method::GET, "/", 200, Duration::ZERO);
        s.http_error(9, "bad_request", 400);
        s.upstream_request(0, 2, Duration::ZERO, None); // local-c is not in `main`
        s.upstream_request(7, 0, Duration::ZERO, None);
        let d = s.take_delta();
        assert_eq!(d.invalid_records, 4);
        assert!(d.upstreams.is_empty());
        let dflt = ShardStats::default();
        dflt.upstream_request(0, 0, Duration::ZERO, None);
        assert_eq!(dflt.take_delta().invalid_records, 1);
    }

    /// The monoio ↔ crossbeam path: a ticker task on a real shard runtime delivers periodic deltas
    /// to the control thread, and the final flush on stop carries the last moments' counts.
    #[test]
    fn ticker_in_monoio_runtime_delivers_to_control_thread() {
        let config = Arc::new(test_config());
        let control = crate::stats::spawn(config.clone(), 64, 2).unwrap();
        let merged = control.merged();
        let tx = control.sender();
        let cfg = config.clone();
        let shard = std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
                .unwrap();
            rt.block_on(async move {
                let stats = Rc::new(ShardStats::new(1, &cfg));
                let stop = StopSignal::new();
                let ticker = monoio::spawn(run_ticker(
                    stats.clone(),
                    tx,
                    Duration::from_millis(10),
                    stop.clone(),
                ));
                for _ in 0..5 {
                    stats.upstream_request(0, 1, Duration::from_millis(7), None);
                    monoio::time::sleep(Duration::from_millis(15)).await;
                }
                // Recorded right before stop: only the final flush can deliver these.
                stats.upstream_request(0, 1, Duration::from_millis(7), None);
                stats.http_request(
                    1,
                    &http::Method::POST,
                    "/v1/embeddings",
                    200,
                    Duration::ZERO,
                );
                stop.trigger();
                ticker.await
            })
        });
        let delivered = shard.join().unwrap();
        assert!(delivered, "final flush delivered");
        control.shutdown();
        let m = merged.lock().unwrap();
        assert_eq!(m.upstreams[&(0, 1)].duration.count(), 6);
        assert_eq!(m.http.values().map(|d| d.count()).sum::<u64>(), 1);
        let p = &m.shards[&1];
        assert!(p.deltas_received >= 3, "periodic deltas: {p:?}");
        assert_eq!(p.deltas_lost, 0);
    }
}
