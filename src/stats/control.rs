//! The control thread (control thread, a plain `std::thread`, never on the data path): receives
//! shard deltas over a bounded crossbeam channel and merges them into [`Merged`], which the admin
//! thread reads through `Arc<Mutex<_>>` to render `/metrics` and `/status`. Every tick it runs the
//! global breakers and EMAs (`crate::breaker::Global`) and publishes the next `Arc<Snapshot>` to
//! each shard through that shard's `bounded(1)` channel (stale snapshot drained, newest
//! `try_send`; never blocks).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;

use crate::breaker::{BreakerState, Global, Snapshot, Transition, INITIAL_LATENCY_MS};

use super::delta::{DurationCounts, LatencySamples, StatsDelta, OTHER_PATH};
use super::shard::{latency_histogram, MAX_PATHS_PER_FORWARD};
use super::UpstreamErrorKind;
use crate::config::Config;

/// Longest the control thread waits for a delta before it checks for shutdown.
const RECV_WAIT_MAX: Duration = Duration::from_millis(100);

/// Cumulative totals of one `{group, upstream}` pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTotals {
    /// Every exchange (requests total = `duration.count()`).
    pub duration: DurationCounts,
    /// Failures by kind, indexed by [`UpstreamErrorKind::index`].
    pub errors: [u64; UpstreamErrorKind::COUNT],
    /// Requests sent again after this upstream failed them or answered 5xx/429.
    pub retries: u64,
}

impl UpstreamTotals {
    /// Exchanges that failed, any kind.
    pub fn failures(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// Per-forward merged state beyond the labelled series.
#[derive(Debug, Clone)]
pub struct ForwardTotals {
    /// Downstream request latency (µs), for percentiles.
    pub latency: Histogram<u64>,
    /// Distinct `path` labels admitted so far (at most [`MAX_PATHS_PER_FORWARD`]).
    paths: HashSet<Arc<str>>,
}

/// What the control thread knows about one shard's delta stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardProgress {
    /// Sequence number of the newest delta received.
    pub last_seq: u64,
    /// When the newest delta arrived.
    pub last_delta_at: Instant,
    pub deltas_received: u64,
    /// Older deltas that arrived folded into a later one (after a failed send).
    pub deltas_folded: u64,
    /// Sends the shard reported as failed (channel full or gone); their contents arrived later.
    pub failed_sends: u64,
    /// Deltas missing from the sequence (never expected: a shard keeps unsent deltas).
    pub deltas_lost: u64,
    /// Downstream requests this shard finished (how the kernel's SO_REUSEPORT spread the load).
    pub requests: u64,
    /// Epoch of the snapshot the shard had adopted at its newest delta.
    pub epoch: u64,
}

/// Global breaker view of one upstream for `/status` and `/metrics` (control thread writes on
/// every tick; call counts are merged from the deltas).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerStatus {
    pub state: BreakerState,
    /// `transitions[from.index()][to.index()]`: state changes so far.
    pub transitions: [[u64; 3]; 3],
    /// Calls the request path recorded as successes / failures; calls the breaker refused.
    pub successes: u64,
    pub failures: u64,
    pub rejected: u64,
    pub latency_ema_ms: f64,
    pub success_rate: f64,
    /// Calls in the breaker's sliding window.
    pub window_successes: u64,
    pub window_failures: u64,
    /// Current (or last) half-open probe round and its per-shard quotas.
    pub probe_round: u64,
    pub probe_quota: Vec<u32>,
}

impl BreakerStatus {
    /// Transitions into `to`, from any state.
    pub fn entered(&self, to: BreakerState) -> u64 {
        self.transitions.iter().map(|row| row[to.index()]).sum()
    }
}

impl Default for BreakerStatus {
    fn default() -> Self {
        BreakerStatus {
            state: BreakerState::Closed,
            transitions: [[0; 3]; 3],
            successes: 0,
            failures: 0,
            rejected: 0,
            latency_ema_ms: INITIAL_LATENCY_MS,
            success_rate: 1.0,
            window_successes: 0,
            window_failures: 0,
            probe_round: 0,
            probe_quota: Vec::new(),
        }
    }
}

/// Cumulative merged statistics of all shards (control thread writes, admin thread reads).
///
/// The breakers themselves run in [`Control`] (`crate::breaker::Global`); on every tick the
/// control thread mirrors their state into [`Merged::breakers`] for `/status` and `/metrics`.
#[derive(Debug, Clone)]
pub struct Merged {
    /// When the control thread started.
    pub started: Instant,
    /// `{forward, method index, path}` → request durations.
    pub http: BTreeMap<(usize, u8, Arc<str>), DurationCounts>,
    /// `{forward, error, status}` → count.
    pub http_errors: BTreeMap<(usize, &'static str, u16), u64>,
    /// `{group, upstream}` → totals; every configured membership is present from the start.
    pub upstreams: BTreeMap<(usize, usize), UpstreamTotals>,
    /// Indexed like `Config::forwards`.
    pub forwards: Vec<ForwardTotals>,
    /// Upstream exchange latency (µs) per `Config::upstreams` index, all groups together.
    pub upstream_latency: Vec<Histogram<u64>>,
    /// Per shard id.
    pub shards: BTreeMap<usize, ShardProgress>,
    /// Breaker state per `Config::upstreams` index.
    pub breakers: Vec<BreakerStatus>,
    /// Epoch of the newest snapshot the control thread published (0 before the first tick).
    pub epoch: u64,
    /// Deltas merged, all shards.
    pub deltas_received: u64,
    /// Recording calls the shards ignored because an index was outside the configuration.
    pub invalid_records: u64,
}

impl Merged {
    /// Empty totals shaped for `config` (every group/upstream pair present at zero).
    pub fn new(config: &Config, now: Instant) -> Self {
        let mut upstreams = BTreeMap::new();
        for (g, group) in config.groups.iter().enumerate() {
            for m in &group.members {
                upstreams.insert((g, m.upstream), UpstreamTotals::default());
            }
        }
        Merged {
            started: now,
            http: BTreeMap::new(),
            http_errors: BTreeMap::new(),
            upstreams,
            forwards: config
                .forwards
                .iter()
                .map(|_| ForwardTotals {
                    latency: latency_histogram(),
                    paths: HashSet::new(),
                })
                .collect(),
            upstream_latency: config
                .upstreams
                .iter()
                .map(|_| latency_histogram())
                .collect(),
            shards: BTreeMap::new(),
            breakers: config
                .upstreams
                .iter()
                .map(|_| BreakerStatus::default())
                .collect(),
            epoch: 0,
            deltas_received: 0,
            invalid_records: 0,
        }
    }

    /// Adds one shard delta (received at `now`) to the totals.
    pub fn apply(&mut self, delta: StatsDelta, now: Instant) {
        self.deltas_received += 1;
        self.invalid_records += delta.invalid_records;
        let p = self
            .shards
            .entry(delta.shard)
            .or_insert_with(|| ShardProgress {
                last_seq: 0,
                last_delta_at: now,
                deltas_received: 0,
                deltas_folded: 0,
                failed_sends: 0,
                deltas_lost: 0,
                requests: 0,
                epoch: 0,
            });
        p.epoch = p.epoch.max(delta.epoch);
        let first_covered = delta.seq.saturating_sub(delta.folded);
        p.deltas_lost += first_covered.saturating_sub(p.last_seq + 1);
        p.last_seq = p.last_seq.max(delta.seq);
        p.last_delta_at = now;
        p.deltas_received += 1;
        p.deltas_folded += delta.folded;
        p.failed_sends += delta.failed_sends;

        p.requests += delta
            .http
            .iter()
            .map(|s| s.duration.buckets.iter().sum::<u64>())
            .sum::<u64>();
        for s in delta.http {
            let path = match self.forwards.get_mut(s.forward) {
                Some(f) => admit_path(&mut f.paths, s.path),
                None => {
                    self.invalid_records += 1;
                    continue;
                }
            };
            self.http
                .entry((s.forward, s.method, path))
                .or_default()
                .add(&s.duration);
        }
        for e in delta.http_errors {
            *self
                .http_errors
                .entry((e.forward, e.error, e.status))
                .or_default() += e.count;
        }
        for u in delta.upstreams {
            let t = self.upstreams.entry((u.group, u.upstream)).or_default();
            t.duration.add(&u.duration);
            for (a, b) in t.errors.iter_mut().zip(u.errors.iter()) {
                *a += b;
            }
            t.retries += u.retries;
        }
        for b in &delta.breaker {
            match self.breakers.get_mut(b.upstream) {
                Some(t) => {
                    t.successes += b.successes;
                    t.failures += b.failures;
                    t.rejected += b.rejected;
                }
                None => self.invalid_records += 1,
            }
        }
        for (fi, s) in delta.forward_latency {
            match self.forwards.get_mut(fi) {
                Some(f) => record(&mut f.latency, &s),
                None => self.invalid_records += 1,
            }
        }
        for (ui, s) in delta.upstream_latency {
            match self.upstream_latency.get_mut(ui) {
                Some(h) => record(h, &s),
                None => self.invalid_records += 1,
            }
        }
    }

    /// Failed delta sends reported by all shards.
    pub fn failed_sends(&self) -> u64 {
        self.shards.values().map(|s| s.failed_sends).sum()
    }

    /// Deltas missing from the shards' sequences (should stay 0).
    pub fn deltas_lost(&self) -> u64 {
        self.shards.values().map(|s| s.deltas_lost).sum()
    }

    /// Copies the tick's global breaker view in and counts its transitions (the control thread
    /// calls it on every tick).
    pub fn publish(&mut self, snap: &Snapshot, transitions: &[(usize, Transition)]) {
        self.epoch = snap.epoch;
        for (b, st) in self.breakers.iter_mut().zip(snap.upstreams.iter()) {
            b.state = st.breaker;
            b.latency_ema_ms = st.latency_ema_ms;
            b.success_rate = st.success_rate;
            b.window_successes = st.window_successes;
            b.window_failures = st.window_failures;
            b.probe_round = st.probe_round;
            b.probe_quota.clone_from(&st.probe_quota);
        }
        for &(u, t) in transitions {
            if let Some(b) = self.breakers.get_mut(u) {
                b.transitions[t.from.index()][t.to.index()] += 1;
            }
        }
    }
}

/// A shard may intern 64 paths, but different shards may intern different ones: the merge keeps
/// the same bound on the merged series.
fn admit_path(paths: &mut HashSet<Arc<str>>, path: Arc<str>) -> Arc<str> {
    if paths.contains(&path) || &*path == OTHER_PATH {
        return path;
    }
    if paths.len() >= MAX_PATHS_PER_FORWARD {
        return Arc::from(OTHER_PATH);
    }
    paths.insert(path.clone());
    path
}

fn record(h: &mut Histogram<u64>, s: &LatencySamples) {
    for &(v, c) in &s.0 {
        h.saturating_record_n(v, c);
    }
}

/// Locks the merged state; a panic elsewhere while holding the lock must not take the admin
/// listener or the control thread down with it (the data is counters: still usable).
pub fn lock_merged(m: &Mutex<Merged>) -> MutexGuard<'_, Merged> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One shard's channel for the newest of something (`bounded(1)`: the control thread's
/// snapshots, the DNS refresher's address tables). The one sender keeps a receiver clone to
/// drain a value the shard has not picked up, so the slot always holds the newest.
pub(crate) struct SnapshotChannel<T = Arc<Snapshot>> {
    tx: Sender<T>,
    pub(crate) rx: Receiver<T>,
}

impl<T: Clone> SnapshotChannel<T> {
    pub(crate) fn new() -> Self {
        let (tx, rx) = crossbeam::channel::bounded(1);
        SnapshotChannel { tx, rx }
    }

    /// Replaces whatever waits in the slot with `value`; never blocks.
    pub(crate) fn publish(&self, value: &T) {
        while self.rx.try_recv().is_ok() {}
        // Only this thread sends, and the slot was just emptied: this cannot be Full.
        let _ = self.tx.try_send(value.clone());
    }
}

/// The control thread's state and logic, separate from the thread for tests.
struct Control {
    merged: Arc<Mutex<Merged>>,
    global: Global,
    snapshots: Vec<SnapshotChannel>,
    transitions: Vec<(usize, Transition)>,
    tick: Duration,
    next_tick: Instant,
}

impl Control {
    /// Merges every delta in `batch` under one lock (the breakers see each delta first).
    fn apply(&mut self, batch: &mut Vec<StatsDelta>, now: Instant) {
        if batch.is_empty() {
            return;
        }
        let mut m = lock_merged(&self.merged);
        for d in batch.drain(..) {
            self.global.observe(&d);
            m.apply(d, now);
        }
    }

    /// Called once per tick: runs the breakers and EMAs on what was merged since the previous
    /// tick, publishes the next snapshot to every shard, and mirrors it into [`Merged`].
    fn on_tick(&mut self, now: Instant) {
        while self.next_tick <= now {
            self.next_tick += self.tick;
        }
        self.transitions.clear();
        let snap = self.global.tick(now, &mut self.transitions);
        for c in &self.snapshots {
            c.publish(&snap);
        }
        for &(u, t) in &self.transitions {
            tracing::info!(
                upstream = u,
                from = t.from.label(),
                to = t.to.label(),
                epoch = snap.epoch,
                "circuit breaker state change"
            );
        }
        lock_merged(&self.merged).publish(&snap, &self.transitions);
    }
}

fn run(rx: Receiver<StatsDelta>, mut control: Control, stop: Arc<AtomicBool>) {
    let mut batch = Vec::new();
    loop {
        let wait = control
            .next_tick
            .saturating_duration_since(Instant::now())
            .min(RECV_WAIT_MAX);
        let disconnected = match rx.recv_timeout(wait) {
            Ok(d) => {
                batch.push(d);
                batch.extend(rx.try_iter());
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let now = Instant::now();
        control.apply(&mut batch, now);
        if now >= control.next_tick {
            control.on_tick(now);
        }
        if disconnected {
            return;
        }
        if stop.load(Ordering::Acquire) {
            // Whatever the shards' final flushes put in the channel before shutdown() is merged.
            batch.extend(rx.try_iter());
            control.apply(&mut batch, Instant::now());
            return;
        }
    }
}

/// The running control thread: owns the receiving end of the shards' delta channel.
pub struct ControlHandle {
    tx: Sender<StatsDelta>,
    /// Per shard: the receiving end of its snapshot channel.
    snapshot_rx: Vec<Receiver<Arc<Snapshot>>>,
    merged: Arc<Mutex<Merged>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the control thread with a bounded delta channel of `channel_capacity` (≥ 1) deltas
/// and one snapshot channel per shard (`shards`, ≥ 1; shard ids are `0..shards`).
pub fn spawn(
    config: Arc<Config>,
    channel_capacity: usize,
    shards: usize,
) -> io::Result<ControlHandle> {
    let (tx, rx) = crossbeam::channel::bounded(channel_capacity.max(1));
    let now = Instant::now();
    let shards = shards.max(1);
    let merged = Arc::new(Mutex::new(Merged::new(&config, now)));
    let tick = config.runtime.tick.max(Duration::from_millis(1));
    let snapshots: Vec<SnapshotChannel> = (0..shards).map(|_| SnapshotChannel::new()).collect();
    let snapshot_rx = snapshots.iter().map(|c| c.rx.clone()).collect();
    let control = Control {
        merged: merged.clone(),
        global: Global::new(&config, shards, now),
        snapshots,
        transitions: Vec::new(),
        tick,
        next_tick: now + tick,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("llmproxy-control".into())
        .spawn(move || run(rx, control, thread_stop))?;
    Ok(ControlHandle {
        tx,
        snapshot_rx,
        merged,
        stop,
        thread: Some(thread),
    })
}

impl ControlHandle {
    /// A sender for one shard (clone per shard).
    pub fn sender(&self) -> Sender<StatsDelta> {
        self.tx.clone()
    }

    /// The snapshot channel of `shard` (`try_recv` it on the shard's tick, e.g. through
    /// `ShardHealth::poll`). Panics when `shard` is not below the shard count given to [`spawn`].
    pub fn snapshot_receiver(&self, shard: usize) -> Receiver<Arc<Snapshot>> {
        self.snapshot_rx[shard].clone()
    }

    /// Number of shards snapshots are published to.
    pub fn shards(&self) -> usize {
        self.snapshot_rx.len()
    }

    /// The merged statistics, for the admin listener.
    pub fn merged(&self) -> Arc<Mutex<Merged>> {
        self.merged.clone()
    }

    /// Merges what is still queued, then stops and joins the thread. Call after the shards have
    /// sent their final deltas.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("stats control thread panicked");
            }
        }
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::testing::test_config;
    use crate::stats::ShardStats;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn two_shards_deltas_sum() {
        let config = test_config();
        let now = Instant::now();
        let mut merged = Merged::new(&config, now);
        let a = ShardStats::new(0, &config);
        let b = ShardStats::new(1, &config);
        let post = http::Method::POST;
        a.http_request(0, &post, "/v1/chat/completions?x=1", 200, ms(3));
        a.http_request(0, &post, "/v1/chat/completions", 200, ms(30));
        b.http_request(0, &post, "/v1/chat/completions", 200, ms(300));
        b.http_error(0, "upstream_timeout", 504);
        a.http_error(0, "upstream_timeout", 504);
        a.upstream_request(0, 0, ms(20), None);
        b.upstream_request(0, 0, ms(40), Some(UpstreamErrorKind::Status5xx));
        b.upstream_request(0, 1, ms(2), Some(UpstreamErrorKind::Connect));

        merged.apply(a.take_delta(), now);
        merged.apply(b.take_delta(), now);

        let key = (0, 2u8, Arc::<str>::from("/v1/chat/completions"));
        let d = merged.http[&key];
        assert_eq!(d.count(), 3);
        assert_eq!(d.sum_us, 333_000);
        assert_eq!(d.buckets[0], 1); // 3 ms ≤ 5 ms
        assert_eq!(merged.http.len(), 1, "query must not create a series");
        assert_eq!(merged.http_errors[&(0, "upstream_timeout", 504)], 2);
        let u0 = &merged.upstreams[&(0, 0)];
        assert_eq!(u0.duration.count(), 2);
        assert_eq!(u0.errors[UpstreamErrorKind::Status5xx.index()], 1);
        assert_eq!(merged.upstreams[&(0, 1)].failures(), 1);
        assert_eq!(merged.upstream_latency[0].len(), 2);
        assert_eq!(merged.forwards[0].latency.len(), 3);
        let p50 = merged.forwards[0].latency.value_at_quantile(0.5);
        assert!((29_000..=31_000).contains(&p50), "p50 {p50}");
        assert_eq!(merged.shards.len(), 2);
        assert_eq!(merged.shards[&0].last_seq, 1);

        // Taking again yields nothing: counts were moved out.
        let again = a.take_delta();
        assert!(again.is_empty());
        assert_eq!(again.seq, 2);
    }

    #[test]
    fn failed_send_is_folded_into_next_delta() {
        let config = test_config();
        let now = Instant::now();
        let stats = ShardStats::new(3, &config);
        let (tx, rx) = crossbeam::channel::bounded(1);
        // Occupy the only slot so the next send fails.
        tx.try_send(StatsDelta::default()).unwrap();
        stats.upstream_request(0, 0, ms(10), None);
        stats.http_request(0, &http::Method::GET, "/a", 200, ms(1));
        assert!(!stats.flush(&tx), "channel is full");
        assert!(stats.has_pending());
        let _filler = rx.try_recv().unwrap();
        stats.upstream_request(0, 0, ms(10), Some(UpstreamErrorKind::Timeout));
        stats.http_request(0, &http::Method::GET, "/a", 200, ms(1));
        assert!(stats.flush(&tx));
        assert!(!stats.has_pending());
        let d = rx.try_recv().unwrap();
        assert_eq!(d.seq, 2);
        assert_eq!(d.folded, 1);
        assert_eq!(d.failed_sends, 1);

        let mut merged = Merged::new(&config, now);
        merged.apply(d, now);
        assert_eq!(merged.upstreams[&(0, 0)].duration.count(), 2);
        assert_eq!(merged.upstreams[&(0, 0)].failures(), 1);
        assert_eq!(merged.http.values().map(|d| d.count()).sum::<u64>(), 2);
        assert_eq!(merged.upstream_latency[0].len(), 2);
        assert_eq!(merged.failed_sends(), 1);
        assert_eq!(merged.deltas_lost(), 0);
        assert_eq!(merged.shards[&3].deltas_folded, 1);
    }

    #[test]
    fn sequence_gap_counts_as_lost() {
        let config = test_config();
        let now = Instant::now();
        let mut merged = Merged::new(&config, now);
        merged.apply(
            StatsDelta {
                shard: 0,
                seq: 1,
                ..StatsDelta::default()
            },
            now,
        );
        merged.apply(
            StatsDelta {
                shard: 0,
                seq: 4,
                folded: 1,
                ..StatsDelta::default()
            },
            now,
        );
        assert_eq!(merged.deltas_lost(), 1); // seq 2 never arrived
    }

    #[test]
    fn paths_are_bounded_per_forward() {
        let config = test_config();
        let stats = ShardStats::new(0, &config);
        for i in 0..100 {
            stats.http_request(0, &http::Method::GET, &format!("/p/{i}"), 200, ms(1));
        }
        let d = stats.take_delta();
        assert_eq!(d.http.len(), 65);
        let other: u64 = d
            .http
            .iter()
            .filter(|s| &*s.path == OTHER_PATH)
            .map(|s| s.duration.count())
            .sum();
        assert_eq!(other, 36);

        // A second shard with 64 different paths: the merge keeps the bound too.
        let b = ShardStats::new(1, &config);
        for i in 100..164 {
            b.http_request(0, &http::Method::GET, &format!("/p/{i}"), 200, ms(1));
        }
        let now = Instant::now();
        let mut merged = Merged::new(&config, now);
        merged.apply(d, now);
        merged.apply(b.take_delta(), now);
        assert_eq!(merged.http.len(), 65);
        let total: u64 = merged.http.values().map(|d| d.count()).sum();
        assert_eq!(total, 164);
    }

    #[test]
    fn control_thread_merges_and_drains_on_shutdown() {
        let config = Arc::new(test_config());
        let handle = spawn(config.clone(), 16, 1).unwrap();
        let tx = handle.sender();
        let merged = handle.merged();
        let stats = ShardStats::new(0, &config);
        for _ in 0..10 {
            stats.upstream_request(1, 1, ms(5), None);
            assert!(stats.flush(&tx));
        }
        handle.shutdown();
        let m = lock_merged(&merged);
        assert_eq!(m.upstreams[&(1, 1)].duration.count(), 10);
        assert_eq!(m.shards[&0].last_seq, 10);
        assert_eq!(m.deltas_received, 10);
    }
}
