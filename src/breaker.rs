//! Circuit breakers and the globally consistent snapshot.
//!
//! * [`Breaker`] (control thread, pure, time injected): one per upstream, global across shards.
//!   Closed → Open when the failure ratio over a sliding window of per-tick buckets reaches
//!   `threshold` with at least `min_requests` calls, or at once when a shard reports a fast trip.
//!   Open → HalfOpen after `cooldown`, driven by the control tick (never waits for traffic).
//!   HalfOpen admits at most `max_requests` probes across all shards (see *Probe quotas*); any
//!   probe failure → Open (new cooldown); `max_requests` probe successes → Closed (window reset).
//! * [`Global`] (control thread, pure): every upstream's breaker plus the latency / success-rate
//!   EMAs and the epoch; fed from [`StatsDelta`]s, produces one immutable [`Snapshot`] per tick.
//! * [`ShardHealth`] (shard, `Rc`, `Cell`/`RefCell`, no locks): the newest snapshot plus the
//!   shard-local view (fast trip, probes used); what the request path and the balancer call.
//!
//! # Probe quotas
//! In HalfOpen the control thread grants each shard a *cumulative* probe quota for the current
//! probe round (`UpstreamState::probe_round`, `probe_quota[shard]`); a shard admits a probe only
//! while its probes used in that round are below its quota. The `max_requests` units start split
//! round-robin over the shards (rotating the starting shard). A unit a shard has held unused for
//! [`PROBE_HOLD_EPOCHS`] of its adopted epochs is revoked (its quota drops to what it reported
//! used) and, once that shard's delta shows it adopted the revoking snapshot (so every probe it
//! admitted under the old quota has been counted), handed to the next shard in rotation. Until
//! that acknowledgement the revoked units still count against `max_requests`, so the probes
//! admitted across all shards never exceed `max_requests`, and units drift to where traffic is.
//! Safety net: outstanding probes with no probe progress for [`probe_timeout`] (the longest a
//! call may take: connect + request/first-byte timeout of the upstream's groups, + 5 s) count as
//! failed, so a probe whose outcome is never recorded cannot keep the breaker half-open forever.
//!
//! # EMAs
//! Latency: mean time-to-head of *successful* calls merged in a tick, folded into
//! `latency_ema_ms` with smoothing [`EMA_ALPHA`]; the first observed tick replaces the prior of
//! [`INITIAL_LATENCY_MS`]. Success rate: the tick's ratio successes / calls folded in the same way
//! (starts at 1.0); ticks without calls leave both unchanged.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Receiver;

use crate::config::{self, Config};
use crate::stats::{ShardStats, StatsDelta};

/// EMA smoothing factor for latency and success rate.
pub const EMA_ALPHA: f64 = 0.15;

/// Latency assumed for an upstream before anything was observed (ms).
pub const INITIAL_LATENCY_MS: f64 = 1000.0;

/// Epochs a shard may hold an unused probe unit before it is revoked and rotated.
pub const PROBE_HOLD_EPOCHS: u64 = 4;

/// Probe timeout of a [`Breaker`] built without [`Breaker::with_probe_timeout`].
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(600);

/// Half-open probe timeout for an upstream: the longest a call to it may legitimately take to
/// produce its outcome (connect + the larger of the request and first-byte timeouts of any group
/// containing it), plus a margin.
pub fn probe_timeout(config: &Config, upstream: usize) -> Duration {
    config
        .groups
        .iter()
        .filter(|g| g.members.iter().any(|m| m.upstream == upstream))
        .map(|g| {
            g.client.connect_timeout + g.client.request_timeout.max(g.client.first_byte_timeout)
        })
        .max()
        .unwrap_or(DEFAULT_PROBE_TIMEOUT)
        + Duration::from_secs(5)
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// Every state, in [`index`](Self::index) order.
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];

    /// Dense index for per-state arrays.
    pub fn index(self) -> usize {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    /// Label value (`closed`, `open`, `half_open`).
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Gauge value, gobreaker's numbering: closed 0, half-open 1, open 2.
    pub fn gauge(self) -> u64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// How one upstream call ended, as the request path judges it (connect error, timeout, 5xx and,
/// with `count_429`, 429 are failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// Permission to call an upstream, returned by [`ShardHealth::admit`]; hand it back to
/// [`ShardHealth::record`] with the outcome. Plain `Copy` data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Probe round this call is a probe of; 0 when it is not a probe.
    probe_round: u64,
}

impl Admission {
    /// A normal (closed-breaker) admission.
    pub const NORMAL: Admission = Admission { probe_round: 0 };

    /// True when this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe_round != 0
    }

    /// The probe round (0 = not a probe).
    pub fn probe_round(&self) -> u64 {
        self.probe_round
    }
}

/// One state change of one breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

/// Revocation in progress for one shard's probe units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Revoking {
    /// Epoch of the snapshot that lowered the shard's quota.
    epoch: u64,
    /// The quota before the revocation: the most the shard may have admitted.
    ceiling: u32,
}

/// The global breaker of one upstream (control thread). Pure: no IO, time is passed in.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: config::Breaker,
    state: BreakerState,
    /// When the current state was entered.
    since: Instant,
    /// Per-tick `(successes, failures)` ring; `head` is the bucket the current tick fills.
    buckets: Vec<(u64, u64)>,
    head: usize,
    win_ok: u64,
    win_fail: u64,
    fast_trip: bool,
    // Half-open bookkeeping, per probe round.
    round: u64,
    granted: Vec<u32>,
    admitted: Vec<u32>,
    grant_epoch: Vec<u64>,
    revoking: Vec<Option<Revoking>>,
    cursor: usize,
    probe_ok: u32,
    probe_fail: u32,
    /// Half-open: longest wait for outstanding probes without any probe progress.
    probe_timeout: Duration,
    /// Probes admitted (all shards) at the last tick, and when probe activity last changed.
    seen_admitted: u32,
    seen_results: u32,
    probe_progress_at: Instant,
}

impl Breaker {
    /// A closed breaker for `shards` shards whose window has `ceil(interval / tick)` buckets.
    pub fn new(cfg: &config::Breaker, tick: Duration, shards: usize, now: Instant) -> Self {
        let tick = tick.max(Duration::from_millis(1));
        let n = cfg
            .interval
            .as_nanos()
            .div_ceil(tick.as_nanos())
            .clamp(1, 1 << 16) as usize;
        let shards = shards.max(1);
        Breaker {
            cfg: cfg.clone(),
            state: BreakerState::Closed,
            since: now,
            buckets: vec![(0, 0); n],
            head: 0,
            win_ok: 0,
            win_fail: 0,
            fast_trip: false,
            round: 0,
            granted: vec![0; shards],
            admitted: vec![0; shards],
            grant_epoch: vec![0; shards],
            revoking: vec![None; shards],
            cursor: 0,
            probe_ok: 0,
            probe_fail: 0,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            seen_admitted: 0,
            seen_results: 0,
            probe_progress_at: now,
        }
    }

    /// Sets how long half-open waits for outstanding probes with no probe progress before it
    /// counts them as failed (a safety net for probes whose outcome is never recorded).
    pub fn with_probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// When the current state was entered.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// `(successes, failures)` in the sliding window.
    pub fn window(&self) -> (u64, u64) {
        (self.win_ok, self.win_fail)
    }

    /// The current (or last) probe round; rounds start at 1.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Cumulative probe quota per shard for [`round`](Self::round) (all 0 unless half-open).
    pub fn quotas(&self) -> &[u32] {
        &self.granted
    }

    /// Probes reported admitted per shard in this round.
    pub fn admitted(&self) -> &[u32] {
        &self.admitted
    }

    /// `(successes, failures)` of this round's probes.
    pub fn probe_results(&self) -> (u32, u32) {
        (self.probe_ok, self.probe_fail)
    }

    /// Calls that ended in the current tick (any shard).
    pub fn record(&mut self, successes: u64, failures: u64) {
        let b = &mut self.buckets[self.head];
        b.0 += successes;
        b.1 += failures;
        self.win_ok += successes;
        self.win_fail += failures;
    }

    /// A shard tripped locally on consecutive failures.
    pub fn report_fast_trip(&mut self) {
        self.fast_trip = true;
    }

    /// Probe activity a shard reported for `round`; ignored unless it is the current half-open
    /// round (late results of an older round change nothing).
    pub fn record_probes(&mut self, shard: usize, round: u64, admitted: u32, ok: u32, fail: u32) {
        if self.state != BreakerState::HalfOpen || round != self.round || round == 0 {
            return;
        }
        if let Some(a) = self.admitted.get_mut(shard) {
            *a += admitted;
        }
        self.probe_ok += ok;
        self.probe_fail += fail;
    }

    /// Advances one control tick: decides transitions on what was recorded since the previous
    /// tick, manages probe quotas for the snapshot about to be published as `publish_epoch`
    /// (`shard_epochs[s]` = the newest epoch shard `s` reported having adopted), then starts a
    /// new window bucket.
    pub fn tick(
        &mut self,
        now: Instant,
        publish_epoch: u64,
        shard_epochs: &[u64],
    ) -> Option<Transition> {
        let from = self.state;
        if self.cfg.enabled {
            match self.state {
                BreakerState::Closed => {
                    let total = self.win_ok + self.win_fail;
                    let ratio_trip = total >= u64::from(self.cfg.min_requests.max(1))
                        && self.win_fail as f64 >= self.cfg.threshold * total as f64;
                    if self.fast_trip || ratio_trip {
                        self.enter(BreakerState::Open, now);
                    }
                }
                BreakerState::Open => {
                    if now.saturating_duration_since(self.since) >= self.cfg.cooldown {
                        self.enter(BreakerState::HalfOpen, now);
                        self.regrant(publish_epoch, shard_epochs);
                    }
                }
                BreakerState::HalfOpen => {
                    let admitted: u32 = self.admitted.iter().sum();
                    let results = self.probe_ok + self.probe_fail;
                    if admitted != self.seen_admitted || results != self.seen_results {
                        (self.seen_admitted, self.seen_results) = (admitted, results);
                        self.probe_progress_at = now;
                    }
                    let stalled = admitted > results
                        && now.saturating_duration_since(self.probe_progress_at)
                            >= self.probe_timeout;
                    if self.probe_fail > 0 || stalled {
                        if stalled {
                            tracing::warn!(
                                outstanding = admitted - results,
                                "half-open probes never reported; reopening the breaker"
                            );
                        }
                        self.enter(BreakerState::Open, now);
                    } else if self.probe_ok >= self.cfg.max_requests.max(1) {
                        self.enter(BreakerState::Closed, now);
                    } else {
                        self.regrant(publish_epoch, shard_epochs);
                    }
                }
            }
        } else if self.state != BreakerState::Closed {
            // Switched off: always closed.
            self.enter(BreakerState::Closed, now);
        }
        self.fast_trip = false;
        self.head = (self.head + 1) % self.buckets.len();
        let old = std::mem::take(&mut self.buckets[self.head]);
        self.win_ok -= old.0;
        self.win_fail -= old.1;
        (from != self.state).then_some(Transition {
            from,
            to: self.state,
        })
    }

    fn enter(&mut self, to: BreakerState, now: Instant) {
        self.state = to;
        self.since = now;
        self.granted.iter_mut().for_each(|g| *g = 0);
        self.admitted.iter_mut().for_each(|a| *a = 0);
        self.revoking.iter_mut().for_each(|r| *r = None);
        self.probe_ok = 0;
        self.probe_fail = 0;
        self.seen_admitted = 0;
        self.seen_results = 0;
        self.probe_progress_at = now;
        match to {
            BreakerState::Closed => {
                self.buckets.iter_mut().for_each(|b| *b = (0, 0));
                self.win_ok = 0;
                self.win_fail = 0;
            }
            BreakerState::HalfOpen => {
                self.round += 1;
                // Rotate where the first units go from one round to the next.
                self.cursor = (self.round as usize) % self.granted.len();
            }
            BreakerState::Open => {}
        }
    }

    /// Half-open quota management (see the module docs): acknowledge finished revocations,
    /// revoke units held unused too long, hand free units out round-robin.
    fn regrant(&mut self, epoch: u64, shard_epochs: &[u64]) {
        let n = self.granted.len();
        let adopted = |s: usize| shard_epochs.get(s).copied().unwrap_or(0);
        for s in 0..n {
            if let Some(r) = self.revoking[s] {
                if adopted(s) >= r.epoch {
                    self.revoking[s] = None;
                    self.granted[s] = self.granted[s].max(self.admitted[s]);
                }
            }
        }
        if n > 1 {
            for s in 0..n {
                if self.revoking[s].is_none()
                    && self.granted[s] > self.admitted[s]
                    && adopted(s) >= self.grant_epoch[s] + PROBE_HOLD_EPOCHS
                {
                    self.revoking[s] = Some(Revoking {
                        epoch,
                        ceiling: self.granted[s],
                    });
                    self.granted[s] = self.admitted[s];
                }
            }
        }
        let committed: u32 = (0..n)
            .map(|s| {
                let held = self.revoking[s].map_or(self.granted[s], |r| r.ceiling);
                held.max(self.admitted[s])
            })
            .sum();
        let mut free = self.cfg.max_requests.max(1).saturating_sub(committed);
        while free > 0 {
            let Some(s) = (0..n)
                .map(|i| (self.cursor + i) % n)
                .find(|&s| self.revoking[s].is_none())
            else {
                break;
            };
            self.granted[s] += 1;
            self.grant_epoch[s] = epoch;
            free -= 1;
            self.cursor = (s + 1) % n;
        }
    }
}

/// The state of one upstream as published in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamState {
    pub breaker: BreakerState,
    /// Current half-open probe round (meaningful when `breaker` is HalfOpen).
    pub probe_round: u64,
    /// Cumulative probes each shard may admit in `probe_round` (index = shard id).
    pub probe_quota: Vec<u32>,
    pub latency_ema_ms: f64,
    pub success_rate: f64,
    /// Calls in the breaker's sliding window.
    pub window_successes: u64,
    pub window_failures: u64,
}

/// What every shard sees at one epoch. Immutable, shared through `Arc`.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Increments by one per control tick; 0 is the initial snapshot shards start with.
    pub epoch: u64,
    /// Per shard: sequence number of the newest delta merged before this snapshot was built.
    pub merged_seq: Vec<u64>,
    /// Indexed like `Config::upstreams`.
    pub upstreams: Vec<UpstreamState>,
}

impl Snapshot {
    /// Epoch 0: every breaker closed, latency at the prior, success rate 1.
    pub fn initial(config: &Config, shards: usize) -> Self {
        Snapshot {
            epoch: 0,
            merged_seq: vec![0; shards],
            upstreams: config
                .upstreams
                .iter()
                .map(|_| UpstreamState {
                    breaker: BreakerState::Closed,
                    probe_round: 0,
                    probe_quota: vec![0; shards],
                    latency_ema_ms: INITIAL_LATENCY_MS,
                    success_rate: 1.0,
                    window_successes: 0,
                    window_failures: 0,
                })
                .collect(),
        }
    }
}

/// Per-upstream global state beyond the breaker.
#[derive(Debug, Clone)]
struct UpstreamGlobal {
    breaker: Breaker,
    latency_ema_ms: f64,
    observed: bool,
    success_rate: f64,
    tick_lat_sum_us: u64,
    tick_lat_count: u64,
    tick_ok: u64,
    tick_fail: u64,
}

/// Everything the control thread computes per tick: breakers, EMAs, epoch. Pure.
#[derive(Debug, Clone)]
pub struct Global {
    shards: usize,
    epoch: u64,
    merged_seq: Vec<u64>,
    shard_epoch: Vec<u64>,
    upstreams: Vec<UpstreamGlobal>,
}

impl Global {
    pub fn new(config: &Config, shards: usize, now: Instant) -> Self {
        let shards = shards.max(1);
        Global {
            shards,
            epoch: 0,
            merged_seq: vec![0; shards],
            shard_epoch: vec![0; shards],
            upstreams: config
                .upstreams
                .iter()
                .enumerate()
                .map(|(ui, u)| UpstreamGlobal {
                    breaker: Breaker::new(&u.breaker, config.runtime.tick, shards, now)
                        .with_probe_timeout(probe_timeout(config, ui)),
                    latency_ema_ms: INITIAL_LATENCY_MS,
                    observed: false,
                    success_rate: 1.0,
                    tick_lat_sum_us: 0,
                    tick_lat_count: 0,
                    tick_ok: 0,
                    tick_fail: 0,
                })
                .collect(),
        }
    }

    /// Epoch of the newest snapshot built.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Shards this instance publishes to.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The breaker of an upstream.
    pub fn breaker(&self, upstream: usize) -> Option<&Breaker> {
        self.upstreams.get(upstream).map(|u| &u.breaker)
    }

    /// Takes in the breaker part of one shard delta (call before the delta is consumed).
    pub fn observe(&mut self, d: &StatsDelta) {
        if let Some(s) = self.merged_seq.get_mut(d.shard) {
            *s = (*s).max(d.seq);
        }
        if let Some(e) = self.shard_epoch.get_mut(d.shard) {
            *e = (*e).max(d.epoch);
        }
        for b in &d.breaker {
            let Some(u) = self.upstreams.get_mut(b.upstream) else {
                continue;
            };
            u.breaker.record(b.successes, b.failures);
            if b.fast_trip {
                u.breaker.report_fast_trip();
            }
            u.breaker.record_probes(
                d.shard,
                b.probe_round,
                b.probes_admitted,
                b.probe_successes,
                b.probe_failures,
            );
            u.tick_lat_sum_us += b.latency_sum_us;
            u.tick_lat_count += b.latency_count;
            u.tick_ok += b.successes;
            u.tick_fail += b.failures;
        }
    }

    /// One control tick: runs every breaker, updates the EMAs, and builds the next snapshot.
    /// Transitions are appended to `transitions` as `(upstream, transition)`.
    pub fn tick(
        &mut self,
        now: Instant,
        transitions: &mut Vec<(usize, Transition)>,
    ) -> Arc<Snapshot> {
        let epoch = self.epoch + 1;
        self.epoch = epoch;
        let mut states = Vec::with_capacity(self.upstreams.len());
        for (ui, u) in self.upstreams.iter_mut().enumerate() {
            if u.tick_lat_count > 0 {
                let mean_ms = u.tick_lat_sum_us as f64 / u.tick_lat_count as f64 / 1000.0;
                u.latency_ema_ms = if u.observed {
                    u.latency_ema_ms + EMA_ALPHA * (mean_ms - u.latency_ema_ms)
                } else {
                    mean_ms
                };
                u.observed = true;
            }
            let calls = u.tick_ok + u.tick_fail;
            if calls > 0 {
                let ratio = u.tick_ok as f64 / calls as f64;
                u.success_rate += EMA_ALPHA * (ratio - u.success_rate);
            }
            (u.tick_lat_sum_us, u.tick_lat_count, u.tick_ok, u.tick_fail) = (0, 0, 0, 0);
            if let Some(t) = u.breaker.tick(now, epoch, &self.shard_epoch) {
                transitions.push((ui, t));
            }
            let (ws, wf) = u.breaker.window();
            let half_open = u.breaker.state() == BreakerState::HalfOpen;
            states.push(UpstreamState {
                breaker: u.breaker.state(),
                probe_round: u.breaker.round(),
                probe_quota: if half_open {
                    u.breaker.quotas().to_vec()
                } else {
                    vec![0; self.shards]
                },
                latency_ema_ms: u.latency_ema_ms,
                success_rate: u.success_rate,
                window_successes: ws,
                window_failures: wf,
            });
        }
        Arc::new(Snapshot {
            epoch,
            merged_seq: self.merged_seq.clone(),
            upstreams: states,
        })
    }
}

/// Shard-local view of one upstream.
#[derive(Default)]
struct Local {
    enabled: bool,
    consecutive_limit: u32,
    consecutive: Cell<u32>,
    /// Sequence number of the delta carrying this shard's fast-trip report; 0 = not tripped.
    trip_seq: Cell<u64>,
    probe_round: Cell<u64>,
    probes_used: Cell<u32>,
    /// Observations since the last adopted snapshot, blended into the global EMAs.
    lat_sum_us: Cell<u64>,
    lat_count: Cell<u64>,
    ok: Cell<u64>,
    fail: Cell<u64>,
}

/// One shard's health view (shard-owned through `Rc`; no locks, no atomics). Holds the newest
/// [`Snapshot`] and the shard-local breaker state; every call is O(1) and allocation-free.
pub struct ShardHealth {
    shard: usize,
    stats: Rc<ShardStats>,
    snap: RefCell<Arc<Snapshot>>,
    local: Vec<Local>,
}

impl ShardHealth {
    /// Starts from [`Snapshot::initial`]; outcomes are reported through `stats`' deltas.
    pub fn new(shard: usize, config: &Config, shards: usize, stats: Rc<ShardStats>) -> Self {
        ShardHealth {
            shard,
            stats,
            snap: RefCell::new(Arc::new(Snapshot::initial(config, shards.max(shard + 1)))),
            local: config
                .upstreams
                .iter()
                .map(|u| Local {
                    enabled: u.breaker.enabled,
                    consecutive_limit: u.breaker.consecutive_failures.max(1),
                    ..Local::default()
                })
                .collect(),
        }
    }

    /// This shard's id.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Epoch of the adopted snapshot.
    pub fn epoch(&self) -> u64 {
        self.snap.borrow().epoch
    }

    /// The adopted snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.borrow().clone()
    }

    /// Adopts `snap` when it is newer than the current one (older ones are ignored).
    pub fn adopt(&self, snap: Arc<Snapshot>) {
        if snap.epoch <= self.epoch() {
            return;
        }
        let merged = snap.merged_seq.get(self.shard).copied().unwrap_or(0);
        for l in &self.local {
            let t = l.trip_seq.get();
            if t != 0 && merged >= t {
                l.trip_seq.set(0);
            }
            l.lat_sum_us.set(0);
            l.lat_count.set(0);
            l.ok.set(0);
            l.fail.set(0);
        }
        self.stats.set_epoch(snap.epoch);
        *self.snap.borrow_mut() = snap;
    }

    /// Adopts the newest snapshot waiting in `rx`, if any; never blocks. Call on the shard's
    /// stats tick, before the delta is flushed.
    pub fn poll(&self, rx: &Receiver<Arc<Snapshot>>) {
        let mut newest = None;
        while let Ok(s) = rx.try_recv() {
            newest = Some(s);
        }
        if let Some(s) = newest {
            self.adopt(s);
        }
    }

    /// May a call go to `upstream` now? `None` = breaker open (globally or by this shard's fast
    /// trip) or no probe left in this shard's half-open quota; counted as `rejected`.
    pub fn admit(&self, upstream: usize, _now: Instant) -> Option<Admission> {
        let l = self.local.get(upstream)?;
        if !l.enabled {
            return Some(Admission::NORMAL);
        }
        let admission = if l.trip_seq.get() != 0 {
            None
        } else {
            let snap = self.snap.borrow();
            match snap.upstreams.get(upstream) {
                None => Some(Admission::NORMAL),
                Some(st) => match st.breaker {
                    BreakerState::Closed => Some(Admission::NORMAL),
                    BreakerState::Open => None,
                    BreakerState::HalfOpen => {
                        if l.probe_round.get() != st.probe_round {
                            l.probe_round.set(st.probe_round);
                            l.probes_used.set(0);
                        }
                        let quota = st.probe_quota.get(self.shard).copied().unwrap_or(0);
                        if l.probes_used.get() < quota {
                            l.probes_used.set(l.probes_used.get() + 1);
                            self.stats.breaker_probe_admitted(upstream, st.probe_round);
                            Some(Admission {
                                probe_round: st.probe_round,
                            })
                        } else {
                            None
                        }
                    }
                },
            }
        };
        if admission.is_none() {
            self.stats.breaker_rejected(upstream);
        }
        admission
    }

    /// Would [`admit`](Self::admit) let a call through? No side effect (for the balancer).
    pub fn is_available(&self, upstream: usize, _now: Instant) -> bool {
        let Some(l) = self.local.get(upstream) else {
            return false;
        };
        if !l.enabled {
            return true;
        }
        if l.trip_seq.get() != 0 {
            return false;
        }
        let snap = self.snap.borrow();
        match snap.upstreams.get(upstream) {
            None => true,
            Some(st) => match st.breaker {
                BreakerState::Closed => true,
                BreakerState::Open => false,
                BreakerState::HalfOpen => {
                    let used = if l.probe_round.get() == st.probe_round {
                        l.probes_used.get()
                    } else {
                        0
                    };
                    used < st.probe_quota.get(self.shard).copied().unwrap_or(0)
                }
            },
        }
    }

    /// The end of an admitted call. `latency_to_head` (request sent → response head, or the
    /// failure) feeds the latency EMA for successes only.
    pub fn record(
        &self,
        upstream: usize,
        admission: Admission,
        outcome: Outcome,
        latency_to_head: Duration,
    ) {
        let Some(l) = self.local.get(upstream) else {
            return;
        };
        let us = u64::try_from(latency_to_head.as_micros()).unwrap_or(u64::MAX);
        match outcome {
            Outcome::Success => {
                l.consecutive.set(0);
                l.ok.set(l.ok.get() + 1);
                l.lat_sum_us.set(l.lat_sum_us.get().saturating_add(us));
                l.lat_count.set(l.lat_count.get() + 1);
            }
            Outcome::Failure => {
                l.fail.set(l.fail.get() + 1);
                let n = l.consecutive.get() + 1;
                l.consecutive.set(n);
                let closed = match self.snap.borrow().upstreams.get(upstream) {
                    Some(s) => s.breaker == BreakerState::Closed,
                    None => true,
                };
                if l.enabled && n >= l.consecutive_limit && l.trip_seq.get() == 0 && closed {
                    l.trip_seq.set(self.stats.next_seq());
                    l.consecutive.set(0);
                    self.stats.breaker_fast_trip(upstream);
                }
            }
        }
        self.stats
            .breaker_outcome(upstream, admission.probe_round, outcome, us);
    }

    /// Latency EMA (ms) from the snapshot, blended with this shard's successes since.
    pub fn latency_ms(&self, upstream: usize) -> f64 {
        let snap = self.snap.borrow();
        let Some(st) = snap.upstreams.get(upstream) else {
            return INITIAL_LATENCY_MS;
        };
        let l = &self.local[upstream];
        if l.lat_count.get() == 0 {
            return st.latency_ema_ms;
        }
        let local = l.lat_sum_us.get() as f64 / l.lat_count.get() as f64 / 1000.0;
        st.latency_ema_ms + EMA_ALPHA * (local - st.latency_ema_ms)
    }

    /// Success rate (0–1) from the snapshot, blended with this shard's outcomes since.
    pub fn success_rate(&self, upstream: usize) -> f64 {
        let snap = self.snap.borrow();
        let Some(st) = snap.upstreams.get(upstream) else {
            return 1.0;
        };
        let l = &self.local[upstream];
        let n = l.ok.get() + l.fail.get();
        if n == 0 {
            return st.success_rate;
        }
        let local = l.ok.get() as f64 / n as f64;
        st.success_rate + EMA_ALPHA * (local - st.success_rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::testing::test_config;

    const TICK: Duration = Duration::from_millis(20);

    fn cfg() -> config::Breaker {
        config::Breaker {
            enabled: true,
            threshold: 0.5,
            cooldown: Duration::from_millis(200),
            max_requests: 3,
            interval: Duration::from_millis(200), // 10 buckets
            min_requests: 4,
            consecutive_failures: 3,
            count_429: true,
        }
    }

    fn config() -> Config {
        let mut c = test_config();
        c.runtime.tick = TICK;
        for u in &mut c.upstreams {
            u.breaker = cfg();
        }
        c
    }

    /// Ticks a lone breaker (one shard that adopts every epoch) until `pred` or `max` ticks.
    fn tick_n(b: &mut Breaker, now: &mut Instant, epoch: &mut u64, n: usize) -> Vec<Transition> {
        let mut out = Vec::new();
        for _ in 0..n {
            *epoch += 1;
            *now += TICK;
            out.extend(b.tick(*now, *epoch, &[*epoch - 1]));
        }
        out
    }

    fn open_breaker(b: &mut Breaker, now: &mut Instant, epoch: &mut u64) {
        b.record(0, 4);
        let t = tick_n(b, now, epoch, 1);
        assert_eq!(
            t,
            vec![Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open
            }]
        );
    }

    #[test]
    fn closed_needs_min_requests_and_threshold() {
        let mut now = Instant::now();
        let mut e = 0;
        let mut b = Breaker::new(&cfg(), TICK, 1, now);
        b.record(0, 3); // 100 % failures but only 3 calls
        assert!(tick_n(&mut b, &mut now, &mut e, 1).is_empty());
        b.record(2, 0); // 3/5 = 60 % ≥ 50 % with 5 calls
        assert_eq!(tick_n(&mut b, &mut now, &mut e, 1).len(), 1);
        assert_eq!(b.state(), BreakerState::Open);

        let mut b = Breaker::new(&cfg(), TICK, 1, now);
        b.record(6, 5); // 45 %
        assert!(tick_n(&mut b, &mut now, &mut e, 1).is_empty());
        assert_eq!(b.window(), (6, 5));
    }

    #[test]
    fn window_slides_old_failures_out() {
        let mut now = Instant::now();
        let mut e = 0;
        let mut b = Breaker::new(&cfg(), TICK, 1, now);
        b.record(0, 3);
        tick_n(&mut b, &mut now, &mut e, 10); // the window is 10 ticks: those 3 fall out
        assert_eq!(b.window(), (0, 0));
        b.record(1, 2);
        assert!(
            tick_n(&mut b, &mut now, &mut e, 1).is_empty(),
            "3 calls only"
        );
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(0, 1); // within the window: 1 ok + 3 failures
        tick_n(&mut b, &mut now, &mut e, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn fast_trip_opens_at_once() {
        let mut now = Instant::now();
        let mut e = 0;
        let mut b = Breaker::new(&cfg(), TICK, 1, now);
        b.record(100, 0);
        b.report_fast_trip();
        tick_n(&mut b, &mut now, &mut e, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn opened_breaker_recovers_without_traffic_then_closes_on_probes() {
        let mut now = Instant::now();
        let mut e = 0;
        let mut b = Breaker::new(&cfg(), TICK, 1, now);
        open_breaker(&mut b, &mut now, &mut e);
        let opened = now;
        // No traffic at all: the tick alone moves it to half-open after the cooldown.
        let mut ticks = 0;
        while b.state() == BreakerState::Open {
            tick_n(&mut b, &mut now, &mut e, 1);
            ticks += 1;
            assert!(ticks < 100);
        }
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(now - opened >= cfg().cooldown && now - opened < cfg().cooldown + 2 * TICK);
        assert_eq!(b.quotas(), &[3], "a single shard gets the whole quota");
        let round = b.round();
        b.record_probes(0, round, 3, 2, 0);
        assert!(tick_n(&mut b, &mut now, &mut e, 1).is_empty(), "2 of 3");
        b.record_probes(0, round, 0, 1, 0);
        let t = tick_n(&mut b, &mut now, &mut e, 1);
        assert_eq!(t[0].to, BreakerState::Closed);
        assert_eq!(b.window(), (0, 0), "window reset on close");
    }

    #[test]
    fn probe_failure_reopens_with_new_cooldown_and_late_results_are_ignored() {
        let mut now = Instant::now();
        let mut e = 0;
        let mut b = Breaker::new(&cfg(), TICK, 1, now);
        open_breaker(&mut b, &mut now, &mut e);
        tick_n(&mut b, &mut now, &mut e, 10);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let round = b.round();
        b.record_probes(0, round, 2, 1, 1);
        let t = tick_n(&mut b, &mut now, &mut e, 1);
        assert_eq!(
            t,
            vec![Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Open
            }]
        );
        let reopened = now;
        // The third probe of the failed round succeeds late: ignored.
        b.record_probes(0, round, 0, 3, 0);
        tick_n(&mut b, &mut now, &mut e, 5);
        assert_eq!(b.state(), BreakerState::Open, "cooldown restarts");
        while b.state() == BreakerState::Open {
            tick_n(&mut b, &mut now, &mut e, 1);
        }
        assert!(now - reopened >= cfg().cooldown);
        assert_eq!(b.round(), round + 1);
        b.record_probes(0, round, 0, 3, 0);
        tick_n(&mut b, &mut now, &mut e, 1);
        assert_eq!(b.state(), BreakerState::HalfOpen, "old round ignored");
    }

    #[test]
    fn unreported_probes_time_out_and_reopen() {
        let mut now = Instant::now();
        let mut e = 0;
        let mut b = Breaker::new(&cfg(), TICK, 1, now).with_probe_timeout(Duration::from_secs(1));
        open_breaker(&mut b, &mut now, &mut e);
        tick_n(&mut b, &mut now, &mut e, 10);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // No traffic at all: nothing outstanding, half-open simply waits.
        tick_n(&mut b, &mut now, &mut e, 100);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let round = b.round();
        b.record_probes(0, round, 2, 0, 0);
        tick_n(&mut b, &mut now, &mut e, 40);
        b.record_probes(0, round, 0, 1, 0); // progress restarts the clock
        tick_n(&mut b, &mut now, &mut e, 45);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        tick_n(&mut b, &mut now, &mut e, 6);
        assert_eq!(b.state(), BreakerState::Open, "one probe never reported");
        let mut config = config();
        config.groups[0].client.request_timeout = Duration::from_secs(100);
        config.groups[0].client.first_byte_timeout = Duration::from_secs(20);
        config.groups[0].client.connect_timeout = Duration::from_secs(3);
        assert_eq!(probe_timeout(&config, 0), Duration::from_secs(108));
    }

    #[test]
    fn disabled_breaker_stays_closed() {
        let mut now = Instant::now();
        let mut e = 0;
        let mut c = cfg();
        c.enabled = false;
        let mut b = Breaker::new(&c, TICK, 1, now);
        b.record(0, 1000);
        b.report_fast_trip();
        assert!(tick_n(&mut b, &mut now, &mut e, 50).is_empty());
        assert_eq!(b.state(), BreakerState::Closed);

        let mut config = config();
        config.upstreams[0].breaker.enabled = false;
        let stats = Rc::new(ShardStats::new(0, &config));
        let h = ShardHealth::new(0, &config, 1, stats);
        for _ in 0..10 {
            let a = h.admit(0, now).unwrap();
            h.record(0, a, Outcome::Failure, Duration::ZERO);
        }
        assert!(h.is_available(0, now));
    }

    /// Two shards and the control logic on virtual time, with a controllable lag between them.
    struct Sim {
        global: Global,
        shards: Vec<(Rc<ShardStats>, ShardHealth)>,
        /// Snapshot each shard will adopt at its next step.
        inbox: Vec<Option<Arc<Snapshot>>>,
        now: Instant,
        transitions: Vec<(usize, Transition)>,
    }

    impl Sim {
        fn new(n: usize) -> Self {
            let config = config();
            let now = Instant::now();
            Sim {
                global: Global::new(&config, n, now),
                shards: (0..n)
                    .map(|i| {
                        let stats = Rc::new(ShardStats::new(i, &config));
                        let h = ShardHealth::new(i, &config, n, stats.clone());
                        (stats, h)
                    })
                    .collect(),
                inbox: vec![None; n],
                now,
                transitions: Vec::new(),
            }
        }

        /// One tick: shards in `active` adopt their pending snapshot and send a delta, then the
        /// control tick publishes a new snapshot.
        fn step(&mut self, active: &[usize]) {
            for &i in active {
                let (stats, h) = &self.shards[i];
                if let Some(s) = self.inbox[i].take() {
                    h.adopt(s);
                }
                let d = stats.take_delta();
                self.global.observe(&d);
            }
            self.now += TICK;
            let snap = self.global.tick(self.now, &mut self.transitions);
            for slot in &mut self.inbox {
                *slot = Some(snap.clone());
            }
        }

        fn state(&self) -> BreakerState {
            self.global.breaker(0).unwrap().state()
        }
    }

    #[test]
    fn failures_on_one_shard_close_the_upstream_for_the_other() {
        let mut sim = Sim::new(2);
        let now = sim.now;
        for _ in 0..5 {
            let h = &sim.shards[0].1;
            let a = h.admit(0, now).unwrap();
            h.record(0, a, Outcome::Failure, Duration::from_millis(1));
            let a = h.admit(0, now).unwrap();
            h.record(0, a, Outcome::Success, Duration::from_millis(1));
        }
        assert!(sim.shards[1].1.is_available(0, now));
        sim.step(&[0, 1]);
        assert_eq!(sim.state(), BreakerState::Open);
        sim.step(&[0, 1]);
        assert!(!sim.shards[1].1.is_available(0, now));
        assert!(sim.shards[1].1.admit(0, now).is_none());
        assert!(
            sim.shards[1].1.is_available(1, now),
            "other upstreams unaffected"
        );
    }

    #[test]
    fn fast_trip_holds_locally_until_the_merged_snapshot_arrives() {
        let mut sim = Sim::new(2);
        let now = sim.now;
        let h0 = &sim.shards[0].1;
        for _ in 0..3 {
            let a = h0.admit(0, now).unwrap();
            h0.record(0, a, Outcome::Failure, Duration::ZERO);
        }
        assert!(!h0.is_available(0, now), "tripped locally at once");
        assert!(h0.admit(0, now).is_none());
        // Shard 0 is slow to send: ticks pass without its delta; it stays locally open.
        sim.step(&[1]);
        sim.step(&[1]);
        assert_eq!(sim.state(), BreakerState::Closed);
        assert!(!sim.shards[0].1.is_available(0, now));
        assert!(sim.shards[1].1.is_available(0, now));
        sim.step(&[0, 1]); // delivers the report; the control opens the breaker
        assert_eq!(sim.state(), BreakerState::Open);
        sim.step(&[0, 1]); // both adopt the snapshot that merged it
        assert!(!sim.shards[0].1.is_available(0, now));
        assert!(!sim.shards[1].1.is_available(0, now));
        assert_eq!(
            sim.shards[0].1.local[0].trip_seq.get(),
            0,
            "local trip cleared"
        );
    }

    #[test]
    fn half_open_never_admits_more_than_max_requests_across_two_shards() {
        for pattern in 0..6usize {
            let mut sim = Sim::new(2);
            let now = sim.now;
            {
                let h = &sim.shards[0].1;
                for _ in 0..3 {
                    let a = h.admit(0, now).unwrap();
                    h.record(0, a, Outcome::Failure, Duration::ZERO);
                }
            }
            sim.step(&[0, 1]);
            sim.step(&[0, 1]);
            assert_eq!(sim.state(), BreakerState::Open);
            let mut admitted: Vec<(usize, Admission)> = Vec::new();
            let mut ticks = 0;
            // Probes stay in flight; both shards hammer admit, sometimes lagging a tick.
            while ticks < 200 {
                let active: Vec<usize> = match (pattern + ticks) % 4 {
                    0 if pattern % 2 == 0 => vec![0],
                    1 if pattern % 3 == 0 => vec![1],
                    _ => vec![0, 1],
                };
                for &i in &active {
                    let h = &sim.shards[i].1;
                    // Shard 0 sees traffic only in some patterns: units must rotate to shard 1.
                    if i == 1 || pattern < 3 {
                        for _ in 0..4 {
                            if let Some(a) = h.admit(0, now) {
                                assert!(a.is_probe());
                                admitted.push((i, a));
                            }
                        }
                    }
                }
                sim.step(&active);
                ticks += 1;
                assert!(admitted.len() <= 3, "pattern {pattern}: {admitted:?}");
                if admitted.len() == 3 {
                    break;
                }
            }
            assert_eq!(
                admitted.len(),
                3,
                "pattern {pattern}: quota rotates to traffic"
            );
            assert_eq!(sim.state(), BreakerState::HalfOpen);
            // More ticks while probes are in flight: still no more admitted.
            for _ in 0..20 {
                for i in 0..2 {
                    assert!(sim.shards[i].1.admit(0, now).is_none());
                    assert!(!sim.shards[i].1.is_available(0, now));
                }
                sim.step(&[0, 1]);
            }
            for (i, a) in admitted {
                sim.shards[i]
                    .1
                    .record(0, a, Outcome::Success, Duration::from_millis(5));
            }
            sim.step(&[0, 1]);
            assert_eq!(sim.state(), BreakerState::Closed, "pattern {pattern}");
            sim.step(&[0, 1]);
            assert!(sim.shards[0].1.is_available(0, now));
            assert!(sim.shards[1].1.is_available(0, now));
        }
    }

    #[test]
    fn ema_and_success_rate() {
        let mut sim = Sim::new(1);
        let now = sim.now;
        let h = &sim.shards[0].1;
        assert_eq!(h.latency_ms(0), INITIAL_LATENCY_MS);
        for _ in 0..4 {
            let a = h.admit(1, now).unwrap();
            h.record(1, a, Outcome::Success, Duration::from_millis(100));
        }
        assert!((h.latency_ms(1) - (1000.0 + 0.15 * (100.0 - 1000.0))).abs() < 1e-9);
        sim.step(&[0]);
        sim.step(&[0]);
        let h = &sim.shards[0].1;
        assert!(
            (h.latency_ms(1) - 100.0).abs() < 1e-9,
            "first sample replaces"
        );
        assert_eq!(h.success_rate(1), 1.0);
        let a = h.admit(1, now).unwrap();
        h.record(1, a, Outcome::Success, Duration::from_millis(200));
        let a = h.admit(1, now).unwrap();
        h.record(1, a, Outcome::Failure, Duration::ZERO);
        sim.step(&[0]);
        sim.step(&[0]);
        let h = &sim.shards[0].1;
        assert!((h.latency_ms(1) - 115.0).abs() < 1e-9);
        assert!((h.success_rate(1) - 0.925).abs() < 1e-9);
        assert_eq!(sim.global.epoch(), 4);
        assert_eq!(h.epoch(), 3, "adopted at the start of the 4th step");
    }
}

/// Two real monoio shard runtimes (threads) and the real control thread.
#[cfg(test)]
mod runtime_tests {
    use super::*;
    use crate::stats::testing::test_config;
    use crate::stats::{run_ticker_with, StopSignal};
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    const TICK: Duration = Duration::from_millis(20);
    const COOLDOWN: Duration = Duration::from_millis(250);

    enum Cmd {
        Fail(usize),
        Probe,
        Stop,
    }

    #[derive(Default)]
    struct View {
        epoch: AtomicU64,
        available: AtomicBool,
        closed: AtomicBool,
    }

    fn shard_thread(
        id: usize,
        config: Arc<Config>,
        control: &crate::stats::ControlHandle,
        cmds: crossbeam::channel::Receiver<Cmd>,
        view: Arc<View>,
        probes: Arc<AtomicUsize>,
    ) -> std::thread::JoinHandle<Vec<(u64, Instant)>> {
        let tx = control.sender();
        let rx = control.snapshot_receiver(id);
        std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
                .unwrap();
            rt.block_on(async move {
                let stats = Rc::new(ShardStats::new(id, &config));
                let health = Rc::new(ShardHealth::new(id, &config, 2, stats.clone()));
                let stop = StopSignal::new();
                let h = health.clone();
                let ticker = monoio::spawn(run_ticker_with(
                    stats,
                    tx,
                    config.runtime.tick,
                    stop.clone(),
                    move || h.poll(&rx),
                ));
                let mut timeline = vec![(0, Instant::now())];
                let mut probing = false;
                loop {
                    match cmds.try_recv() {
                        Ok(Cmd::Fail(n)) => {
                            for _ in 0..n {
                                if let Some(a) = health.admit(0, Instant::now()) {
                                    health.record(0, a, Outcome::Failure, Duration::from_millis(1));
                                }
                            }
                        }
                        Ok(Cmd::Probe) => probing = true,
                        Ok(Cmd::Stop) => break,
                        Err(_) => {}
                    }
                    if probing {
                        if let Some(a) = health.admit(0, Instant::now()) {
                            if a.is_probe() {
                                probes.fetch_add(1, Ordering::SeqCst);
                                let h = health.clone();
                                // The probe stays in flight for a while.
                                monoio::spawn(async move {
                                    monoio::time::sleep(Duration::from_millis(30)).await;
                                    h.record(0, a, Outcome::Success, Duration::from_millis(30));
                                });
                            } else {
                                health.record(0, a, Outcome::Success, Duration::from_millis(5));
                            }
                        }
                    }
                    let e = health.epoch();
                    if e != timeline.last().unwrap().0 {
                        timeline.push((e, Instant::now()));
                    }
                    view.available
                        .store(health.is_available(0, Instant::now()), Ordering::SeqCst);
                    view.closed.store(
                        health.snapshot().upstreams[0].breaker == BreakerState::Closed,
                        Ordering::SeqCst,
                    );
                    view.epoch.store(e, Ordering::SeqCst);
                    monoio::time::sleep(Duration::from_millis(1)).await;
                }
                stop.trigger();
                ticker.await;
                timeline
            })
        })
    }

    fn wait_until(limit: Duration, mut pred: impl FnMut() -> bool) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if pred() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    #[test]
    fn two_shards_share_epochs_breaker_state_and_probe_budget() {
        let mut config = test_config();
        config.runtime.tick = TICK;
        for u in &mut config.upstreams {
            u.breaker.cooldown = COOLDOWN;
            u.breaker.min_requests = 4;
            u.breaker.consecutive_failures = 1000; // the merged ratio decides, not a fast trip
            u.breaker.interval = Duration::from_secs(2);
        }
        let config = Arc::new(config);
        let control = crate::stats::spawn(config.clone(), 64, 2).unwrap();
        let merged = control.merged();
        let probes = Arc::new(AtomicUsize::new(0));
        let views: Vec<Arc<View>> = (0..2).map(|_| Arc::new(View::default())).collect();
        let mut cmds = Vec::new();
        let mut threads = Vec::new();
        for (id, view) in views.iter().enumerate() {
            let (tx, rx) = crossbeam::channel::unbounded();
            cmds.push(tx);
            threads.push(shard_thread(
                id,
                config.clone(),
                &control,
                rx,
                view.clone(),
                probes.clone(),
            ));
        }

        // (a) Both shards follow the published epochs.
        assert!(
            wait_until(Duration::from_secs(5), || views
                .iter()
                .all(|v| v.epoch.load(Ordering::SeqCst) >= 15))
            .is_some(),
            "shards never adopted snapshots"
        );
        assert!(views.iter().all(|v| v.available.load(Ordering::SeqCst)));

        // (b) Failures only on shard 0 close the upstream on shard 1 too.
        cmds[0].send(Cmd::Fail(8)).unwrap();
        let took = wait_until(Duration::from_secs(5), || {
            !views[1].available.load(Ordering::SeqCst)
        })
        .expect("shard 1 never saw the breaker open");
        // Shard 0's tick (≤ 1) + control tick (≤ 1) + shard 1's tick (≤ 1), plus scheduling.
        assert!(took < 10 * TICK, "shard 1 saw it open after {took:?}");
        // Shard 0 adopts the same snapshot on its own tick (its local view knew nothing: no
        // fast trip with these settings).
        assert!(
            wait_until(10 * TICK, || !views[0].available.load(Ordering::SeqCst)).is_some(),
            "shard 0 never saw the breaker open"
        );
        assert_eq!(
            crate::stats::lock_merged(&merged).breakers[0].state,
            BreakerState::Open
        );

        // (c) After the cooldown, half-open admits at most max_requests (3) probes across both
        // shards, even with both asking every millisecond; their success closes the breaker.
        for c in &cmds {
            c.send(Cmd::Probe).unwrap();
        }
        let opened = Instant::now();
        wait_until(Duration::from_secs(10), || {
            views.iter().all(|v| v.closed.load(Ordering::SeqCst))
                && views.iter().all(|v| v.available.load(Ordering::SeqCst))
        })
        .expect("breaker never closed again");
        assert!(opened.elapsed() >= COOLDOWN - 2 * TICK);
        assert_eq!(
            probes.load(Ordering::SeqCst),
            3,
            "probes across both shards"
        );
        std::thread::sleep(5 * TICK);
        assert_eq!(probes.load(Ordering::SeqCst), 3);

        for c in &cmds {
            c.send(Cmd::Stop).unwrap();
        }
        let timelines: Vec<Vec<(u64, Instant)>> =
            threads.into_iter().map(|t| t.join().unwrap()).collect();
        control.shutdown();
        {
            let m = crate::stats::lock_merged(&merged);
            let b = &m.breakers[0];
            let idx = |s: BreakerState| s.index();
            assert_eq!(
                b.transitions[idx(BreakerState::Closed)][idx(BreakerState::Open)],
                1
            );
            assert_eq!(
                b.transitions[idx(BreakerState::Open)][idx(BreakerState::HalfOpen)],
                1
            );
            assert_eq!(
                b.transitions[idx(BreakerState::HalfOpen)][idx(BreakerState::Closed)],
                1
            );
            assert_eq!(b.failures, 8);
            assert!(b.rejected > 0);
            assert!(m.shards.values().all(|p| p.epoch > 0));
        }

        // (a, continued) Per epoch, when each shard first ran on it (or a newer one): the two
        // shards are at most two ticks apart (a little scheduling slack for a shared CI box).
        let first_at =
            |tl: &[(u64, Instant)], e: u64| tl.iter().find(|(x, _)| *x >= e).map(|&(_, t)| t);
        let last = timelines
            .iter()
            .map(|tl| tl.last().unwrap().0)
            .min()
            .unwrap();
        let mut lags = Vec::new();
        for e in 1..=last {
            let (a, b) = (
                first_at(&timelines[0], e).unwrap(),
                first_at(&timelines[1], e).unwrap(),
            );
            lags.push(if a > b { a - b } else { b - a });
        }
        assert!(lags.len() > 20, "too few epochs: {}", lags.len());
        let within = lags.iter().filter(|&&l| l <= 2 * TICK).count();
        lags.sort();
        assert!(
            within * 10 >= lags.len() * 9,
            "{within} of {} epochs within two ticks; lags {:?}",
            lags.len(),
            lags
        );
        assert!(*lags.last().unwrap() < Duration::from_secs(1), "{lags:?}");
    }
}
