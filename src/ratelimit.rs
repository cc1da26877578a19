//! Rate limiters (shared by every shard): per client IP per forward, and per upstream.
//!
//! ## Design
//!
//! Both limiters run GCRA (the "generic cell rate algorithm", a token bucket stored as one number):
//! with emission interval `T = 1 s / per_second` and tolerance `τ = (burst − 1) × T`, a key's
//! state is its *theoretical arrival time* `TAT`. A request at `now` is admitted iff
//! `TAT ≤ now + τ`, and then `TAT' = max(TAT, now) + T`; a denied request changes nothing and may
//! retry after `TAT − τ − now` (always in `(0, T]`, so `Retry-After` is `ceil` of that, ≥ 1 s). A
//! fresh or long-idle key therefore gets exactly `burst` requests at once, then one every `T`.
//! Denied requests cost no tokens, so a client hammering past its limit still gets its full rate.
//!
//! **Per forward** ([`ForwardLimiter`]): a table of `2^k` `AtomicU64` slots (default 2^16,
//! 512 KiB), created at startup and shared (`Arc<Limits>`) by every shard. A slot packs a 12-bit
//! tag (high bits of the key's hash) and a 52-bit `TAT` in ticks of 1/16 µs since the limiter's
//! creation (2^52 ticks ≈ 8.9 years; past that, every request is admitted rather than refused). The
//! key is the client IPv4 address, or the /64 prefix of an IPv6 address (one host commonly owns a
//! whole /64 and can rotate through it; IPv4-mapped IPv6 addresses count as IPv4). Its hash is
//! keyed with per-process random seeds, so a client cannot aim its addresses at another client's
//! slots. Look-up probes 4 consecutive slots from the hash's home index:
//!
//! 1. a slot with the key's tag is the key's bucket (searched over the whole window first);
//! 2. else the first slot whose `TAT ≤ now` (another key whose bucket is full again, or never
//!    used) is taken over: a full bucket is indistinguishable from no bucket, so nobody gains;
//! 3. else (all four hold live buckets of other keys, "crowded") the key *shares* the last slot's
//!    bucket without changing its tag. The choice is deterministic, so a crowded key always draws
//!    from one bucket and never from several.
//!
//! The admit is one compare-and-swap of the slot from the value read to the new `tag | TAT'`; a
//! failed CAS (the same key admitted on another shard, or the slot changed hands) re-runs the
//! look-up. No lock, no allocation, no clock read inside (time is passed in, so tests use virtual
//! time).
//!
//! **Per upstream** ([`UpstreamLimiter`]): one cache-line-aligned `AtomicU64` `TAT` in ns with
//! `burst = per_second` (a one-second bucket, the `governor::Quota::per_second` convention LLMProxy
//! meant to use). [`UpstreamLimiter::would_admit`] is one load and consumes nothing (the balancer's
//! "may I send to u now?"); [`UpstreamLimiter::try_acquire`] takes the token when u is picked. It
//! can still fail when another shard took the last token in between: treat it as unavailable and
//! pick again.
//!
//! ## Accuracy
//!
//! For a key with its own slot, over any interval `[a, b]` of the `now` values passed in, from any
//! number of shards at once: **admitted ≤ per_second × (b − a) + burst**. (Each admit raises `TAT`
//! by at least `T`, the first admit in the interval leaves `TAT ≥ a + T` and the last one requires
//! `TAT' ≤ b + burst × T`.) `T` is rounded *up* to a whole tick (62.5 ns; 1 ns per upstream), so
//! the bound is never exceeded and the long-run rate is at most `per_second² / 16·10⁶` below the
//! configured one (< 0.07 % for any forward rate up to 10 000/s; exact whenever `per_second`
//! divides 16 000 000, e.g. 1, 2, 5, 10, 100, 1000, 10 000).
//!
//! The table is finite, so three rare cases trade exactness, each bounded:
//! * **Crowding**: a key whose 4 probed slots hold live buckets of 4 other keys (a bucket is live
//!   until it is full again, i.e. for at most `burst / per_second` s after its last request) shares
//!   the last one: the sharing keys *together* stay within the bound, each may get less. When the
//!   crowded key later finds a slot of its own it starts with a full bucket, so it can get one
//!   extra `burst` per such move. With 2^16 slots it starts to happen (to a few keys) with on the
//!   order of ten thousand clients live at the same moment on one forward; size the table at ≥ 4×
//!   the clients you expect to be live at once.
//! * **Tag collision**: two live keys in the same window with the same 12-bit tag share a bucket,
//!   as above (probability 1/4096 per live neighbour in the window).
//! * **Creation race**: a new key first seen on two shards at the same instant, while a slot in its
//!   window expires between the two `now`s, can end up with two slots; look-ups use the first one
//!   in probe order, so the other gets at most one request per racing look-up.
//!
//! Over-admission is thus limited to those transitions; everything else errs towards refusing.
//!
//! ## Cost
//!
//! `check`: a keyed hash (two multiply–xorshift rounds), at most 4 relaxed loads within 1–2 cache
//! lines, and one CAS when admitted (none when refused). Shards only contend when they touch the
//! same slot (the same client on two shards at once, or a shared slot) or the same cache line (8
//! slots). Memory: 8 bytes × slots per rate-limited forward, allocated once at startup.
//! Upstream: one load (`would_admit`) and one CAS (`try_acquire`) on that upstream's own line.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::config::{Config, ForwardRateLimit};

/// Slots per forward table when the caller does not choose (2^16 = 512 KiB).
pub const DEFAULT_SLOTS: usize = 1 << 16;
/// Slots examined per look-up (linear probing).
pub const PROBE: usize = 4;
/// Largest forward table (2^24 slots = 128 MiB).
pub const MAX_SLOTS: usize = 1 << 24;

/// Forward-table time unit: 1/16 µs.
const TICKS_PER_SEC: u64 = 16_000_000;
const TAG_BITS: u32 = 12;
const TIME_BITS: u32 = 64 - TAG_BITS;
const TIME_MAX: u64 = (1 << TIME_BITS) - 1;
/// Upstream time unit: 1 ns, capped well below `u64::MAX` (≈ 292 years).
const NANOS_PER_SEC: u64 = 1_000_000_000;
const NANOS_MAX: u64 = u64::MAX >> 1;

/// A refused request: how long until this client would be admitted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(Duration);

impl RetryAfter {
    /// The exact wait (never zero).
    pub fn duration(self) -> Duration {
        self.0
    }

    /// The `Retry-After` header value: whole seconds rounded up, at least 1.
    pub fn secs(self) -> u64 {
        let d = self.0;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

/// GCRA parameters in some time unit.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// `T`: units per request, rounded up.
    interval: u64,
    /// `τ = (burst − 1) × T`.
    tau: u64,
}

impl Gcra {
    fn new(per_second: u32, burst: u32, units_per_sec: u64) -> Gcra {
        let interval = units_per_sec.div_ceil(u64::from(per_second.max(1)));
        Gcra {
            interval,
            tau: interval * u64::from(burst.max(1) - 1),
        }
    }

    #[inline]
    fn admits(self, tat: u64, now: u64) -> bool {
        tat <= now.saturating_add(self.tau)
    }

    /// Units until `admits` turns true (only meaningful when it is false).
    #[inline]
    fn wait(self, tat: u64, now: u64) -> u64 {
        tat.saturating_sub(self.tau).saturating_sub(now)
    }

    #[inline]
    fn next(self, tat: u64, now: u64, max: u64) -> u64 {
        tat.max(now).saturating_add(self.interval).min(max)
    }
}

/// `now − epoch` in units (saturating at both ends).
#[inline]
fn units_since(epoch: Instant, now: Instant, units_per_sec: u64, max: u64) -> u64 {
    let d = now.saturating_duration_since(epoch);
    let whole = d.as_secs().saturating_mul(units_per_sec);
    let frac = u64::from(d.subsec_nanos()) * units_per_sec / NANOS_PER_SEC;
    whole.saturating_add(frac).min(max)
}

/// Units → duration, rounded up so a client waiting that long is admitted.
fn units_to_duration(units: u64, units_per_sec: u64) -> Duration {
    let nanos = (u128::from(units) * u128::from(NANOS_PER_SEC)).div_ceil(u128::from(units_per_sec));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// `slots` rounded up to a power of two within `PROBE..=MAX_SLOTS`.
fn table_len(slots: usize) -> usize {
    slots.clamp(PROBE, MAX_SLOTS).next_power_of_two()
}

/// murmur3's 64-bit finaliser: a bijection with full avalanche.
#[inline]
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn random_seeds() -> [u64; 3] {
    let s = std::collections::hash_map::RandomState::new();
    [s.hash_one(1u64), s.hash_one(2u64), s.hash_one(3u64)]
}

/// Per-client-IP limiter of one forward (see the module docs).
pub struct ForwardLimiter {
    slots: Box<[AtomicU64]>,
    mask: usize,
    gcra: Gcra,
    /// IPv4 seed, IPv6 seed, second-round seed.
    seeds: [u64; 3],
    epoch: Instant,
}

impl std::fmt::Debug for ForwardLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardLimiter")
            .field("slots", &self.slots.len())
            .field("interval_ticks", &self.gcra.interval)
            .field("tau_ticks", &self.gcra.tau)
            .finish()
    }
}

impl ForwardLimiter {
    /// A limiter for `cfg` with `slots` table entries (rounded up to a power of two within
    /// `PROBE..=MAX_SLOTS`). Time starts now; `check` must be given `Instant`s from this process.
    pub fn new(cfg: &ForwardRateLimit, slots: usize) -> ForwardLimiter {
        ForwardLimiter::build(cfg, slots, Instant::now(), random_seeds())
    }

    fn build(cfg: &ForwardRateLimit, slots: usize, epoch: Instant, seeds: [u64; 3]) -> Self {
        let n = table_len(slots);
        ForwardLimiter {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            mask: n - 1,
            gcra: Gcra::new(cfg.per_second, cfg.burst, TICKS_PER_SEC),
            seeds,
            epoch,
        }
    }

    /// Admits one request from `ip` at `now`, or says how long until it would be admitted.
    /// Refused requests consume nothing.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), RetryAfter> {
        let now = units_since(self.epoch, now, TICKS_PER_SEC, TIME_MAX);
        self.check_hash(self.key_hash(ip), now)
            .map_err(|wait| RetryAfter(units_to_duration(wait, TICKS_PER_SEC)))
    }

    /// Table size (a power of two).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    fn key_hash(&self, ip: IpAddr) -> u64 {
        let (key, seed) = match ip.to_canonical() {
            IpAddr::V4(a) => (u64::from(u32::from(a)), self.seeds[0]),
            // The /64 prefix.
            IpAddr::V6(a) => ((u128::from(a) >> 64) as u64, self.seeds[1]),
        };
        mix(mix(key ^ seed) ^ self.seeds[2])
    }

    /// GCRA on the key's slot; `Err` carries the wait in ticks.
    fn check_hash(&self, hash: u64, now: u64) -> Result<(), u64> {
        let tag = hash >> TIME_BITS;
        // Index bits are the low bits, clear of the tag (slots ≤ MAX_SLOTS < 2^TIME_BITS).
        let home = hash as usize;
        loop {
            let (idx, cur, new_tag) = self.find(tag, home, now);
            let tat = cur & TIME_MAX;
            if !self.gcra.admits(tat, now) {
                return Err(self.gcra.wait(tat, now));
            }
            let next = (new_tag << TIME_BITS) | self.gcra.next(tat, now, TIME_MAX);
            // Relaxed: the slot is the only shared datum, and every RMW on it is totally ordered.
            if self.slots[idx]
                .compare_exchange_weak(cur, next, Relaxed, Relaxed)
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// The slot to use: (index, value read, tag to write back).
    #[inline]
    fn find(&self, tag: u64, home: usize, now: u64) -> (usize, u64, u64) {
        let mut free = None;
        let mut last = (0, 0);
        for i in 0..PROBE {
            let idx = home.wrapping_add(i) & self.mask;
            let v = self.slots[idx].load(Relaxed);
            if v >> TIME_BITS == tag {
                return (idx, v, tag);
            }
            if free.is_none() && v & TIME_MAX <= now {
                free = Some((idx, v));
            }
            last = (idx, v);
        }
        match free {
            // Bucket full again (TAT ≤ now): taking it over is the same as a fresh bucket.
            Some((idx, v)) => (idx, v, tag),
            // Crowded: share the last bucket, keeping its owner's tag.
            None => (last.0, last.1, last.1 >> TIME_BITS),
        }
    }
}

/// One upstream's limiter (see the module docs). Aligned so upstreams never share a cache line.
#[repr(align(128))]
pub struct UpstreamLimiter {
    /// TAT in ns since `epoch`.
    tat: AtomicU64,
    gcra: Gcra,
    epoch: Instant,
}

impl std::fmt::Debug for UpstreamLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamLimiter")
            .field("interval_ns", &self.gcra.interval)
            .field("tau_ns", &self.gcra.tau)
            .finish()
    }
}

impl UpstreamLimiter {
    /// `per_second` requests per second with a one-second burst (`burst = per_second`).
    pub fn new(per_second: u32) -> UpstreamLimiter {
        UpstreamLimiter::with_burst(per_second, per_second)
    }

    /// `per_second` with an explicit bucket size.
    pub fn with_burst(per_second: u32, burst: u32) -> UpstreamLimiter {
        UpstreamLimiter::build(per_second, burst, Instant::now())
    }

    fn build(per_second: u32, burst: u32, epoch: Instant) -> UpstreamLimiter {
        UpstreamLimiter {
            tat: AtomicU64::new(0),
            gcra: Gcra::new(per_second, burst, NANOS_PER_SEC),
            epoch,
        }
    }

    #[inline]
    fn now(&self, now: Instant) -> u64 {
        units_since(self.epoch, now, NANOS_PER_SEC, NANOS_MAX)
    }

    /// Whether a request sent at `now` would be admitted; consumes nothing.
    pub fn would_admit(&self, now: Instant) -> bool {
        self.gcra.admits(self.tat.load(Relaxed), self.now(now))
    }

    /// Takes a token at `now`; false when the upstream is at its rate (nothing consumed).
    pub fn try_acquire(&self, now: Instant) -> bool {
        let now = self.now(now);
        let mut cur = self.tat.load(Relaxed);
        loop {
            if !self.gcra.admits(cur, now) {
                return false;
            }
            let next = self.gcra.next(cur, now, NANOS_MAX);
            match self.tat.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }

    /// When the upstream is at its rate: how long until it admits again; None when it admits now.
    pub fn retry_after(&self, now: Instant) -> Option<RetryAfter> {
        let now = self.now(now);
        let tat = self.tat.load(Relaxed);
        (!self.gcra.admits(tat, now))
            .then(|| RetryAfter(units_to_duration(self.gcra.wait(tat, now), NANOS_PER_SEC)))
    }
}

/// Every limiter of a configuration, built at startup and shared by the shards as `Arc<Limits>`.
#[derive(Debug)]
pub struct Limits {
    /// Indexed like `Config::forwards`; None = no `ratelimit`.
    pub forwards: Vec<Option<ForwardLimiter>>,
    /// Indexed like `Config::upstreams`; None = no `ratelimit.per_second`.
    pub upstreams: Vec<Option<UpstreamLimiter>>,
}

impl Limits {
    /// Forward tables of [`DEFAULT_SLOTS`].
    pub fn new(config: &Config) -> Limits {
        Limits::with_slots(config, DEFAULT_SLOTS)
    }

    /// Forward tables of `slots` entries each.
    pub fn with_slots(config: &Config, slots: usize) -> Limits {
        Limits {
            forwards: config
                .forwards
                .iter()
                .map(|f| f.ratelimit.as_ref().map(|r| ForwardLimiter::new(r, slots)))
                .collect(),
            upstreams: config
                .upstreams
                .iter()
                .map(|u| {
                    u.ratelimit
                        .map(|r| UpstreamLimiter::with_burst(r.per_second, r.burst))
                })
                .collect(),
        }
    }

    /// Per-client check on forward `forward` (Ok when it has no limit).
    pub fn check_forward(
        &self,
        forward: usize,
        ip: IpAddr,
        now: Instant,
    ) -> Result<(), RetryAfter> {
        match self.forwards.get(forward) {
            Some(Some(l)) => l.check(ip, now),
            _ => Ok(()),
        }
    }

    /// `would_admit` of upstream `upstream` (true when it has no limit).
    pub fn upstream_would_admit(&self, upstream: usize, now: Instant) -> bool {
        match self.upstreams.get(upstream) {
            Some(Some(l)) => l.would_admit(now),
            _ => true,
        }
    }

    /// `try_acquire` of upstream `upstream` (true when it has no limit).
    pub fn upstream_try_acquire(&self, upstream: usize, now: Instant) -> bool {
        match self.upstreams.get(upstream) {
            Some(Some(l)) => l.try_acquire(now),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    /// Fixed hash seeds, so which keys share a window or a tag is deterministic.
    const SEEDS: [u64; 3] = [
        0x0123_4567_89ab_cdef,
        0x0fed_cba9_8765_4321,
        0x5555_aaaa_3333_cccc,
    ];

    fn limiter_at(per_second: u32, burst: u32, slots: usize, t0: Instant) -> ForwardLimiter {
        ForwardLimiter::build(&ForwardRateLimit { per_second, burst }, slots, t0, SEEDS)
    }

    /// A limiter whose epoch is the returned `t0`: `t0 + d` is exactly `d` of virtual time.
    fn limiter(per_second: u32, burst: u32, slots: usize) -> (ForwardLimiter, Instant) {
        let t0 = Instant::now();
        (limiter_at(per_second, burst, slots, t0), t0)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// How many of `n` back-to-back requests at `now` are admitted.
    fn take(l: &ForwardLimiter, ip: IpAddr, now: Instant, n: u32) -> u32 {
        (0..n).filter(|_| l.check(ip, now).is_ok()).count() as u32
    }

    /// One request every `step` from `t0` through `t0 + until` (inclusive): admitted count.
    fn poll(l: &ForwardLimiter, ip: IpAddr, t0: Instant, step: Duration, until: Duration) -> u64 {
        let steps = (until.as_nanos() / step.as_nanos()) as u32;
        (0..=steps)
            .filter(|&k| l.check(ip, t0 + step * k).is_ok())
            .count() as u64
    }

    fn tag(l: &ForwardLimiter, ip: IpAddr) -> u64 {
        l.key_hash(ip) >> TIME_BITS
    }

    fn home(l: &ForwardLimiter, ip: IpAddr) -> usize {
        l.key_hash(ip) as usize & l.mask
    }

    /// Tags currently written in the table, sorted.
    fn owned(l: &ForwardLimiter) -> Vec<u64> {
        let mut v: Vec<u64> = l
            .slots
            .iter()
            .map(|s| s.load(Relaxed))
            .filter(|&v| v != 0)
            .map(|v| v >> TIME_BITS)
            .collect();
        v.sort_unstable();
        v
    }

    /// Checks "admitted ≤ per_second × (b − a) + burst" for every interval [a, b] of admit times
    /// (`times` in units of `1/units_per_sec` s). Linear: with admits sorted by time and
    /// g(k) = k·units − per_second·t_k, the worst interval ending at j starts at the i ≤ j with the
    /// smallest g(i).
    fn check_bound(
        times: &mut [u64],
        units_per_sec: u64,
        per_second: u64,
        burst: u64,
    ) -> Result<(), String> {
        times.sort_unstable();
        let (u, ps) = (i128::from(units_per_sec), i128::from(per_second));
        let g = |k: usize, t: u64| k as i128 * u - ps * i128::from(t);
        let mut min = (i128::MAX, 0);
        for (j, &tj) in times.iter().enumerate() {
            if g(j, tj) < min.0 {
                min = (g(j, tj), j);
            }
            let (gi, i) = min;
            // (j − i + 1)·u ≤ ps·(t_j − t_i) + burst·u
            if g(j, tj) - gi + u > i128::from(burst) * u {
                return Err(format!(
                    "{} admits in [{}, {}] ({} units/s): more than {per_second}/s + {burst}",
                    j - i + 1,
                    times[i],
                    tj,
                    units_per_sec
                ));
            }
        }
        Ok(())
    }

    #[test]
    fn bound_checker_catches_violations() {
        // burst 3 at once is fine, a fourth is not; one more exactly one interval later is fine.
        assert!(check_bound(&mut [0, 0, 0, 1000], 1000, 1, 3).is_ok());
        assert!(check_bound(&mut [0, 0, 0, 0], 1000, 1, 3).is_err());
        assert!(check_bound(&mut [0, 0, 0, 999], 1000, 1, 3).is_err());
        // One per second with burst 2 leaves room for one extra request, not two.
        let run = || (0..100u64).map(|k| k * 1000).collect::<Vec<_>>();
        let mut one_extra = run();
        one_extra.push(50_500);
        assert!(check_bound(&mut one_extra, 1000, 1, 2).is_ok());
        let mut two_extra = run();
        two_extra.extend([50_500, 50_600]);
        assert!(check_bound(&mut two_extra, 1000, 1, 2).is_err());
    }

    #[test]
    fn exact_burst_then_one_per_interval() {
        let (l, t0) = limiter(10, 20, 1024);
        let a = ip("192.0.2.1");
        // A fresh key: exactly `burst` at once (not burst + 1).
        assert_eq!(take(&l, a, t0, 100), 20);
        assert!(l.check(a, t0 + ms(100) - us(1)).is_err());
        // Then exactly one every 100 ms, for 100 s.
        for k in 1..=1000u32 {
            let now = t0 + ms(100) * k;
            assert_eq!(l.check(a, now), Ok(()), "request at {k} intervals");
            assert!(l.check(a, now).is_err(), "second request at {k} intervals");
            assert!(l.check(a, now + ms(100) - us(1)).is_err());
        }
    }

    #[test]
    fn partial_refill_and_idle_cap_at_burst() {
        let (l, t0) = limiter(10, 20, 1024);
        let a = ip("192.0.2.1");
        assert_eq!(take(&l, a, t0, 100), 20);
        // Half a second refills 5 tokens at 10/s.
        assert_eq!(take(&l, a, t0 + ms(500), 100), 5);
        // An hour idle refills to `burst`, not beyond.
        assert_eq!(take(&l, a, t0 + Duration::from_secs(3600), 100), 20);
    }

    #[test]
    fn per_second_is_a_rate_and_long_runs_stay_within_the_bound() {
        // LLMProxy read per_second as "seconds per token"; here 100/s means 100 per second.
        let (l, t0) = limiter(100, 100, 1024);
        let n = poll(&l, ip("192.0.2.2"), t0, ms(1), Duration::from_secs(10));
        assert_eq!(n, 100 * 10 + 100);
        // Rates that do not divide 16·10⁶ ticks: T is rounded up, never down, so the bound holds
        // and the rate is at most 0.07 % low (at 3/s: one request short over 100 s).
        for (ps, burst, step, secs, short) in [
            (3u32, 3u32, ms(1), 100u64, 1u64),
            (9999, 9999, us(10), 10, 70),
        ] {
            let (l, t0) = limiter(ps, burst, 1024);
            let n = poll(&l, ip("192.0.2.3"), t0, step, Duration::from_secs(secs));
            let ideal = u64::from(ps) * secs + u64::from(burst);
            assert!(n <= ideal && n + short >= ideal, "{ps}/s: {n} vs {ideal}");
        }
    }

    #[test]
    fn two_keys_are_independent() {
        let (l, t0) = limiter(5, 10, 1024);
        let (a, b, c) = (ip("198.51.100.7"), ip("198.51.100.8"), ip("203.0.113.200"));
        assert_eq!(take(&l, a, t0, 50), 10);
        assert_eq!(take(&l, b, t0, 50), 10);
        assert_eq!(l.check(a, t0), Err(RetryAfter(ms(200))));
        // One refilled token each after 200 ms, whatever the other did.
        assert_eq!(take(&l, b, t0 + ms(200), 50), 1);
        assert_eq!(take(&l, a, t0 + ms(200), 50), 1);
        assert_eq!(take(&l, c, t0 + ms(200), 50), 10);
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_prefix_and_mapped_ipv4_is_ipv4() {
        let (l, t0) = limiter(1, 2, 1024);
        assert_eq!(take(&l, ip("2001:db8::1"), t0, 10), 2);
        assert_eq!(take(&l, ip("2001:db8::ffff:1"), t0, 10), 0);
        assert_eq!(take(&l, ip("2001:db8:0:1::1"), t0, 10), 2);
        assert_eq!(take(&l, ip("10.0.0.1"), t0, 10), 2);
        assert_eq!(take(&l, ip("::ffff:10.0.0.1"), t0, 10), 0);
        assert_eq!(take(&l, ip("10.0.0.2"), t0, 10), 2);
    }

    #[test]
    fn retry_after_values() {
        let (l, t0) = limiter(2, 2, 1024);
        let a = ip("192.0.2.9");
        assert_eq!(take(&l, a, t0, 2), 2);
        let r = l.check(a, t0).unwrap_err();
        assert_eq!((r.duration(), r.secs()), (ms(500), 1));
        let r = l.check(a, t0 + ms(200)).unwrap_err();
        assert_eq!((r.duration(), r.secs()), (ms(300), 1));
        // Waiting exactly that long is enough.
        assert!(l.check(a, t0 + ms(200) + r.duration()).is_ok());

        // 1/s: exactly one second, i.e. `Retry-After: 1`, not 2.
        let (l, t0) = limiter(1, 1, 64);
        assert!(l.check(a, t0).is_ok());
        let r = l.check(a, t0).unwrap_err();
        assert_eq!((r.duration(), r.secs()), (Duration::from_secs(1), 1));
        let r = l.check(a, t0 + ms(999)).unwrap_err();
        assert_eq!((r.duration(), r.secs()), (ms(1), 1));
        assert!(l.check(a, t0 + ms(1000)).is_ok());

        // After a burst of 5 at 1/s the wait is one interval, not five.
        let (l, t0) = limiter(1, 5, 64);
        assert_eq!(take(&l, a, t0, 5), 5);
        assert_eq!(
            l.check(a, t0).unwrap_err().duration(),
            Duration::from_secs(1)
        );

        // A non-integral interval: rounded up so the client is admitted when it comes back.
        let (l, t0) = limiter(3, 3, 64);
        assert_eq!(take(&l, a, t0, 3), 3);
        let r = l.check(a, t0).unwrap_err();
        assert_eq!(r.duration(), Duration::from_nanos(333_333_375));
        assert!(l
            .check(a, t0 + r.duration() - Duration::from_nanos(63))
            .is_err());
        assert!(l.check(a, t0 + r.duration()).is_ok());

        // An odd number of ticks (62.5 ns each): the duration is rounded up, not down.
        let (l, t0) = limiter(7, 1, 64);
        assert!(l.check(a, t0).is_ok());
        let r = l.check(a, t0).unwrap_err();
        assert_eq!(r.duration(), Duration::from_nanos(142_857_188));
        assert!(l.check(a, t0 + r.duration()).is_ok());

        let secs = |d: Duration| RetryAfter(d).secs();
        assert_eq!(secs(Duration::ZERO), 1);
        assert_eq!(secs(Duration::from_nanos(1)), 1);
        assert_eq!(secs(Duration::from_secs(1)), 1);
        assert_eq!(secs(Duration::from_secs(1) + Duration::from_nanos(1)), 2);
        assert_eq!(secs(ms(2500)), 3);
    }

    /// `threads` std threads hammer one key; a shared virtual clock advances 1 µs per call.
    fn hammer_virtual(threads: usize, calls_per_thread: u64) {
        let (ps, burst) = (1000u32, 50u32);
        let (l, t0) = limiter(ps, burst, 1024);
        let l = Arc::new(l);
        let clock = Arc::new(AtomicU64::new(0));
        let start = Arc::new(Barrier::new(threads));
        let a = ip("203.0.113.9");
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (l, clock, start) = (l.clone(), clock.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let mut admitted = Vec::new();
                    for _ in 0..calls_per_thread {
                        let t = clock.fetch_add(1, Relaxed);
                        if l.check(a, t0 + us(t)).is_ok() {
                            admitted.push(t * 16); // ticks
                        }
                    }
                    admitted
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let elapsed_us = threads as u64 * calls_per_thread;
        let n = all.len() as u64;
        check_bound(&mut all, TICKS_PER_SEC, ps.into(), burst.into()).unwrap();
        // And no starvation: at least the steady rate over the run.
        assert!(n * 1_000_000 >= u64::from(ps) * elapsed_us, "{n} admitted");
    }

    #[test]
    fn concurrent_two_threads_never_exceed_rate_plus_burst() {
        hammer_virtual(2, 200_000);
    }

    #[test]
    fn concurrent_eight_threads_never_exceed_rate_plus_burst() {
        hammer_virtual(8, 50_000);
    }

    #[test]
    fn concurrent_real_time_never_exceeds_rate_plus_burst() {
        let (ps, burst) = (2000u32, 100u32);
        let (l, t0) = limiter(ps, burst, 1024);
        let l = Arc::new(l);
        let a = ip("203.0.113.10");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let mut admitted = Vec::new();
                    loop {
                        let now = Instant::now();
                        if now >= t0 + ms(300) {
                            return admitted;
                        }
                        if l.check(a, now).is_ok() {
                            admitted.push(units_since(t0, now, TICKS_PER_SEC, TIME_MAX));
                        }
                    }
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert!(!all.is_empty());
        check_bound(&mut all, TICKS_PER_SEC, ps.into(), burst.into()).unwrap();
    }

    /// Five IPv4 keys with distinct tags (asserted: the seeds are fixed).
    fn five_keys(l: &ForwardLimiter) -> Vec<IpAddr> {
        let keys: Vec<IpAddr> = (1..=5).map(|i| ip(&format!("10.1.0.{i}"))).collect();
        let mut tags: Vec<u64> = keys.iter().map(|&k| tag(l, k)).collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), 5, "pick other test keys");
        keys
    }

    #[test]
    fn idle_slot_is_taken_over() {
        // 4 slots = one probe window: every key competes for the same slots.
        let (l, t0) = limiter(10, 10, 4);
        let keys = five_keys(&l);
        let e = keys[4];
        for &k in &keys[..4] {
            assert!(l.check(k, t0).is_ok());
        }
        let mut four: Vec<u64> = keys[..4].iter().map(|&k| tag(&l, k)).collect();
        four.sort_unstable();
        assert_eq!(owned(&l), four);
        // Crowded: e is admitted from a shared bucket and owns no slot.
        assert!(l.check(e, t0).is_ok());
        assert!(!owned(&l).contains(&tag(&l, e)));

        // One second later every bucket is full again: e takes over its home slot, full burst.
        let t1 = t0 + Duration::from_secs(1);
        let victim = keys[..4]
            .iter()
            .copied()
            .find(|&k| l.slots[home(&l, e)].load(Relaxed) >> TIME_BITS == tag(&l, k))
            .unwrap();
        assert_eq!(take(&l, e, t1, 100), 10);
        assert_eq!(l.slots[home(&l, e)].load(Relaxed) >> TIME_BITS, tag(&l, e));
        // The displaced key was idle too: it gets a full burst in another expired slot.
        assert_eq!(take(&l, victim, t1, 100), 10);
        assert!(owned(&l).contains(&tag(&l, victim)));
    }

    #[test]
    fn own_slot_is_found_past_an_expired_one() {
        let (l, t0) = limiter(10, 10, 4);
        // Two keys with the same home slot and different tags (deterministic: fixed seeds).
        let keys: Vec<IpAddr> = (1..=64).map(|i| ip(&format!("10.2.0.{i}"))).collect();
        let (x, a) = keys
            .iter()
            .flat_map(|&x| keys.iter().map(move |&a| (x, a)))
            .find(|&(x, a)| home(&l, x) == home(&l, a) && tag(&l, x) != tag(&l, a))
            .unwrap();
        // x takes the home slot briefly, a (live, drained) the next one.
        assert!(l.check(x, t0).is_ok());
        assert_eq!(take(&l, a, t0, 100), 10);
        // 100 ms later x's bucket is full again (its slot is takeable) but a's is not: a must use
        // its own slot (one refilled token), not restart in x's slot with a full bucket.
        assert_eq!(take(&l, a, t0 + ms(100), 100), 1);
    }

    #[test]
    fn crowded_window_shares_one_bucket_and_leaves_live_keys_exact() {
        let (l, t0) = limiter(10, 10, 4);
        let keys = five_keys(&l);
        let e = keys[4];
        for &k in &keys[..4] {
            assert_eq!(take(&l, k, t0, 5), 5);
        }
        // e shares the last slot of its window; its owner x and e together get x's 5 tokens.
        let last = l.slots[(home(&l, e) + PROBE - 1) & l.mask].load(Relaxed) >> TIME_BITS;
        let x = keys[..4]
            .iter()
            .copied()
            .find(|&k| tag(&l, k) == last)
            .unwrap();
        assert_eq!(take(&l, e, t0, 100), 5);
        assert_eq!(take(&l, x, t0, 100), 0);
        for &k in keys[..4].iter().filter(|&&k| k != x) {
            assert_eq!(take(&l, k, t0, 100), 5, "{k}");
        }
    }

    #[test]
    fn crowded_window_over_time_bounds_the_sharers_together() {
        let (l, t0) = limiter(10, 10, 4);
        let keys = five_keys(&l);
        let e = keys[4];
        let mut counts = [0u64; 5];
        // Every key polls every 1 ms for 10 s (100× its rate): all stay live, e stays crowded.
        for t in 0..=10_000u32 {
            for (i, &k) in keys.iter().enumerate() {
                counts[i] += u64::from(l.check(k, t0 + ms(1) * t).is_ok());
            }
        }
        assert!(!owned(&l).contains(&tag(&l, e)));
        // The same polling alone on an empty limiter.
        let solo = poll(
            &limiter_at(10, 10, 4, t0),
            e,
            t0,
            ms(1),
            Duration::from_secs(10),
        );
        assert_eq!(solo, 10 * 10 + 10);
        let last = l.slots[(home(&l, e) + PROBE - 1) & l.mask].load(Relaxed) >> TIME_BITS;
        let x = (0..4).find(|&i| tag(&l, keys[i]) == last).unwrap();
        for i in (0..4).filter(|&i| i != x) {
            assert_eq!(counts[i], solo, "live key {} with its own slot", keys[i]);
        }
        // The two sharers together get exactly what one key would.
        assert_eq!(counts[x] + counts[4], solo, "{counts:?} x={x}");
        assert!(counts[4] > 0);
    }

    #[test]
    fn many_keys_in_the_default_table_are_independent() {
        let (l, t0) = limiter(5, 5, DEFAULT_SLOTS);
        let keys: Vec<IpAddr> = (0..1000u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i * 7919)))
            .collect();
        for &k in &keys {
            assert_eq!(take(&l, k, t0, 8), 5, "{k}");
        }
        for &k in &keys {
            assert_eq!(take(&l, k, t0 + ms(200), 8), 1, "{k}");
        }
    }

    #[test]
    fn table_size_and_clock_edges() {
        let cfg = ForwardRateLimit {
            per_second: 1,
            burst: 1,
        };
        assert_eq!(ForwardLimiter::new(&cfg, 1000).slots(), 1024);
        assert_eq!(ForwardLimiter::new(&cfg, 0).slots(), PROBE);
        assert_eq!(table_len(usize::MAX), MAX_SLOTS);
        assert_eq!(table_len(MAX_SLOTS - 1), MAX_SLOTS);
        let real = ForwardLimiter::new(&cfg, 64);
        let now = Instant::now();
        assert!(real.check(ip("192.0.2.1"), now).is_ok());
        assert!(real.check(ip("192.0.2.1"), now).is_err());

        let (l, t0) = limiter(1, 1, 64);
        let a = ip("192.0.2.1");
        // Before the epoch counts as the epoch.
        if let Some(early) = t0.checked_sub(Duration::from_secs(5)) {
            assert!(l.check(a, early).is_ok());
            assert!(l.check(a, t0).is_err());
        }
        // Past the 52-bit range (≈ 8.9 years) it fails open rather than refusing everyone.
        let far = t0 + Duration::from_secs(20 * 365 * 86_400);
        assert_eq!(take(&l, a, far, 10), 10);
    }

    fn upstream(per_second: u32, burst: u32) -> (UpstreamLimiter, Instant) {
        let t0 = Instant::now();
        (UpstreamLimiter::build(per_second, burst, t0), t0)
    }

    #[test]
    fn upstream_rate_with_free_availability_checks() {
        let (u, t0) = upstream(5, 5);
        // Asking does not consume.
        for _ in 0..100 {
            assert!(u.would_admit(t0));
        }
        assert!(u.retry_after(t0).is_none());
        for i in 0..5 {
            assert!(u.try_acquire(t0), "token {i}");
        }
        assert!(!u.would_admit(t0));
        assert!(!u.try_acquire(t0));
        assert_eq!(u.retry_after(t0).map(RetryAfter::duration), Some(ms(200)));
        assert!(!u.would_admit(t0 + ms(199)));
        assert!(u.would_admit(t0 + ms(200)));
        assert!(u.try_acquire(t0 + ms(200)));
        assert!(!u.try_acquire(t0 + ms(200)));
        // The balancer's pattern, polling every 1 ms for 10 s: one per 200 ms.
        let mut n = 0;
        for k in 201..=10_200u32 {
            let now = t0 + ms(1) * k;
            if u.would_admit(now) {
                assert!(u.try_acquire(now));
                n += 1;
            }
        }
        assert_eq!(n, 50);

        // Default burst is one second's worth.
        let u = UpstreamLimiter::new(3);
        let now = Instant::now();
        assert_eq!((0..10).filter(|_| u.try_acquire(now)).count(), 3);
        // Burst 1: strict spacing.
        let (u, t0) = upstream(1000, 1);
        assert!(u.try_acquire(t0));
        assert!(!u.try_acquire(t0 + us(999)));
        assert!(u.try_acquire(t0 + ms(1)));
    }

    #[test]
    fn upstream_concurrent_never_exceeds_rate_plus_burst() {
        let (ps, burst) = (500u32, 500u32);
        let (u, t0) = upstream(ps, burst);
        let u = Arc::new(u);
        let clock = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (u, clock) = (u.clone(), clock.clone());
                std::thread::spawn(move || {
                    let mut admitted = Vec::new();
                    for _ in 0..100_000 {
                        let t = clock.fetch_add(1, Relaxed);
                        let now = t0 + us(t);
                        if u.would_admit(now) && u.try_acquire(now) {
                            admitted.push(t * 1000); // ns
                        }
                    }
                    admitted
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert!(all.len() as u64 >= 500 * 400_000 / 1_000_000);
        check_bound(&mut all, NANOS_PER_SEC, ps.into(), burst.into()).unwrap();
    }

    #[test]
    fn limits_from_config() {
        let yaml = r#"
http_server:
  forwards:
    - name: limited
      port: 3001
      upstream_group: g
      ratelimit:
        per_second: 2
        burst: 3
    - name: open
      port: 3002
      upstream_group: g
upstreams:
  - name: u1
    url: http://127.0.0.1:8001/v1
    ratelimit:
      per_second: 1
  - name: u2
    url: http://127.0.0.1:8002/v1
upstream_groups:
  - name: g
    upstreams:
      - name: u1
      - name: u2
"#;
        let c = crate::config::load_str(yaml).unwrap();
        let limits = Arc::new(Limits::with_slots(&c, 64));
        assert_eq!(limits.forwards.len(), 2);
        assert_eq!(limits.forwards[0].as_ref().map(|f| f.slots()), Some(64));
        assert!(limits.forwards[1].is_none());
        assert!(limits.upstreams[0].is_some() && limits.upstreams[1].is_none());
        assert_eq!(
            Limits::new(&c).forwards[0].as_ref().map(|f| f.slots()),
            Some(DEFAULT_SLOTS)
        );

        let now = Instant::now();
        let a = ip("192.0.2.77");
        let ok = (0..10)
            .filter(|_| limits.check_forward(0, a, now).is_ok())
            .count();
        assert_eq!(ok, 3);
        assert_eq!(limits.check_forward(0, a, now).unwrap_err().secs(), 1);
        assert!((0..100).all(|_| limits.check_forward(1, a, now).is_ok()));
        assert!(limits.check_forward(7, a, now).is_ok());

        assert!(limits.upstream_would_admit(0, now));
        assert!(limits.upstream_try_acquire(0, now));
        assert!(!limits.upstream_would_admit(0, now));
        assert!(!limits.upstream_try_acquire(0, now));
        assert!((0..100).all(|_| limits.upstream_try_acquire(1, now)));

        fn shared<T: Send + Sync>(_: &T) {}
        shared(&limits);
    }
}
