//! Load balancing (shard): picks a group member per request from the shard's local view (its
//! in-flight counts) blended with the global snapshot (breaker state, latency EMA, success rate).
//!
//! One [`Balancer`] per group per shard: plain `Cell` state, no locks, no atomics, no allocation
//! per pick. A member is *eligible* for a pick when `view.available(u)` and `u` is not in `tried`
//! (the upstreams this request already failed on). Strategies:
//!
//! * `roundrobin`: rotating start (shard `s` starts at member `s`), first eligible from there.
//! * `weighted_roundrobin`: nginx's smooth weighted round robin over the eligible members.
//! * `random`: uniform among the eligible members (wyrand per balancer).
//! * `response_aware`: lowest `latency × (in_flight + 1) / success_rate`, ties by rotation, plus a
//!   small exploration share so a recovered upstream is re-admitted (see [`EXPLORE_EVERY`]).
//! * `failover`: first eligible member in list order.
//! * `iphash`: weighted rendezvous hashing of the client IP over the eligible members.
//! * `least_requests`: power of two choices on the shard's in-flight counts.

mod rng;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::net::IpAddr;

use crate::config::{Group, Strategy};

use rng::Rng;

/// What a strategy may ask about an upstream (indexes into `Config::upstreams`).
///
/// The balancer queries several members per pick, and may query one more than once (the `random`
/// and `least_requests` fast paths): every method must be a cheap query without side effects.
/// Admitting a half-open probe, counting a request in flight and the like belong to the caller,
/// after the pick.
pub trait UpstreamView {
    /// Not open in the breaker (or admitted as a half-open probe), not rate-limited.
    fn available(&self, upstream: usize) -> bool;
    /// Requests this shard has in flight to the upstream.
    fn in_flight(&self, upstream: usize) -> u32;
    /// Latency EMA in milliseconds (time to the response head).
    fn latency_ms(&self, upstream: usize) -> f64;
    /// Success rate in 0.0..=1.0.
    fn success_rate(&self, upstream: usize) -> f64;
}

/// `response_aware` exploration period: on every `EXPLORE_EVERY`-th pick, if the eligible member
/// picked least recently was last picked `EXPLORE_EVERY` or more picks ago, it gets this pick
/// instead of the best score.
///
/// Why: the latency EMA and success rate of an upstream only change when it serves requests. A
/// member that was slow or failing (then back from an open breaker) keeps its stale bad score, so
/// a pure lowest-score rule would never send it traffic again: starvation (LLMProxy's
/// response_aware has exactly this: no decay for idle members). Exploration sends it a probe
/// request; the fresh measurement moves its EMA, and if it is good again the score takes over.
///
/// Why exploration rather than decaying the idle member's penalty: the bound does not depend on
/// how bad the stale numbers were (a decay must erase a 30 s latency with a 1 % success rate, a
/// factor of 10⁵, before the member sees a single request), and it costs nothing when traffic is
/// already spread: the probe only fires for a member that went `EXPLORE_EVERY` picks without
/// traffic. Price: at most 1 / `EXPLORE_EVERY` (≈ 3 %) of the picks go to a member the scores
/// call worse, and only while some member is starved. Bound: a starved eligible member is picked
/// within `EXPLORE_EVERY × (eligible members − 1)` picks, whatever its stale view (starved members
/// take the probes in turn, stalest first).
/// Unavailable members (open breaker) are never explored: the breaker's half-open probes decide
/// when they come back.
pub const EXPLORE_EVERY: u64 = 32;

/// One group's balancer on one shard.
pub struct Balancer {
    /// `members[i].upstream`, in configuration order.
    members: Box<[usize]>,
    state: State,
}

enum State {
    RoundRobin {
        next: Cell<usize>,
    },
    SmoothWeighted {
        /// Configured weights (≥ 1).
        weights: Box<[i64]>,
        /// nginx's `current_weight` per member.
        current: Box<[Cell<i64>]>,
    },
    Random {
        rng: Rng,
    },
    ResponseAware {
        /// Rotation for tie-breaking.
        next: Cell<usize>,
        /// Picks made so far (the exploration clock).
        clock: Cell<u64>,
        /// `clock` value at each member's last pick.
        last_pick: Box<[Cell<u64>]>,
    },
    Failover,
    IpHash {
        /// Per-member hash seed (from the upstream index).
        seeds: Box<[u64]>,
        /// `Some(weights)` when the weights differ (weighted rendezvous); `None` = plain HRW.
        weights: Option<Box<[f64]>>,
    },
    LeastRequests {
        rng: Rng,
    },
}

impl Balancer {
    pub fn new(group: &Group, shard: usize) -> Balancer {
        let members: Box<[usize]> = group.members.iter().map(|m| m.upstream).collect();
        let n = members.len();
        // Weight 0 cannot pass validation (1–65535); treat it as 1 rather than as "never".
        let weight = |i: usize| group.members[i].weight.max(1);
        let seed = rng::hash2(rng::hash_bytes(group.name.as_bytes()), shard as u64);
        let state = match group.strategy {
            Strategy::RoundRobin => State::RoundRobin {
                next: Cell::new(shard),
            },
            Strategy::WeightedRoundRobin => {
                let weights: Box<[i64]> = (0..n).map(|i| weight(i) as i64).collect();
                let current: Box<[Cell<i64>]> = (0..n).map(|_| Cell::new(0)).collect();
                // Shards start at different points of the same smooth sequence (as if shard `s`
                // had already made `s` picks), so a lightly loaded proxy does not send every
                // shard's first request to the heaviest member.
                let total: i64 = weights.iter().sum();
                if total > 0 {
                    for _ in 0..(shard as i64 % total) {
                        smooth_step(&weights, &current, |_| true);
                    }
                }
                State::SmoothWeighted { weights, current }
            }
            Strategy::Random => State::Random {
                rng: Rng::new(seed),
            },
            Strategy::ResponseAware => State::ResponseAware {
                next: Cell::new(shard),
                clock: Cell::new(0),
                last_pick: (0..n).map(|_| Cell::new(0)).collect(),
            },
            Strategy::Failover => State::Failover,
            Strategy::IpHash => {
                // Seeds from the upstream index, not the member position, and not the shard: every
                // shard (and every group listing the same upstreams) maps an IP the same way.
                let seeds = members
                    .iter()
                    .map(|&u| rng::hash2(u as u64, 0x1b))
                    .collect();
                let uniform = (1..n).all(|i| weight(i) == weight(0));
                let weights = (!uniform).then(|| (0..n).map(|i| weight(i) as f64).collect());
                State::IpHash { seeds, weights }
            }
            Strategy::LeastRequests => State::LeastRequests {
                rng: Rng::new(seed ^ 0x5eed),
            },
        };
        Balancer { members, state }
    }

    /// An available member not in `tried`, or None when every member is unavailable or tried.
    pub fn pick(&self, view: &dyn UpstreamView, client: IpAddr, tried: &[usize]) -> Option<usize> {
        let members = &self.members[..];
        let n = members.len();
        if n == 0 {
            return None;
        }
        let eligible = |u: usize| !tried.contains(&u) && view.available(u);
        match &self.state {
            State::RoundRobin { next } => {
                let start = next.get() % n;
                next.set(start + 1);
                (0..n)
                    .map(|i| members[(start + i) % n])
                    .find(|&u| eligible(u))
            }
            State::SmoothWeighted { weights, current } => {
                smooth_step(weights, current, |i| eligible(members[i])).map(|i| members[i])
            }
            State::Random { rng } => pick_random(members, rng, &eligible),
            State::ResponseAware {
                next,
                clock,
                last_pick,
            } => {
                let start = next.get() % n;
                next.set(start + 1);
                let now = clock.get() + 1;
                clock.set(now);
                let explore = now % EXPLORE_EVERY == 0;
                let mut best: Option<(usize, f64)> = None;
                let mut stalest: Option<(usize, u64)> = None;
                for k in 0..n {
                    let i = (start + k) % n;
                    let u = members[i];
                    if !eligible(u) {
                        continue;
                    }
                    let s = score(view, u);
                    // Strict `<`: equal scores go to the first member from the rotating start.
                    if best.map_or(true, |(_, b)| s < b) {
                        best = Some((i, s));
                    }
                    let last = last_pick[i].get();
                    if explore && stalest.map_or(true, |(_, l)| last < l) {
                        stalest = Some((i, last));
                    }
                }
                let (mut i, _) = best?;
                if let Some((j, last)) = stalest {
                    if now - last >= EXPLORE_EVERY {
                        i = j;
                    }
                }
                last_pick[i].set(now);
                Some(members[i])
            }
            State::Failover => members.iter().copied().find(|&u| eligible(u)),
            State::IpHash { seeds, weights } => {
                let key = rng::ip_key(client);
                let mut best: Option<(usize, f64)> = None;
                for (i, &u) in members.iter().enumerate() {
                    if !eligible(u) {
                        continue;
                    }
                    let h = rng::hash2(key, seeds[i]);
                    // Highest random weight. Unweighted: the hash itself (as f64: monotone, and
                    // a 2⁻⁵³-wide tie is as likely as a 64-bit collision). Weighted:
                    // w / −ln(x), x = hash ∈ (0, 1): member i wins a share w_i / Σw of the keys,
                    // and removing a member moves only its own keys.
                    let s = match weights {
                        None => h as f64,
                        Some(w) => w[i] / -rng::unit_open(h).ln(),
                    };
                    if best.map_or(true, |(_, b)| s > b) {
                        best = Some((i, s));
                    }
                }
                best.map(|(i, _)| members[i])
            }
            State::LeastRequests { rng } => {
                let (a, b) = sample_two(members, rng, &eligible)?;
                let Some(b) = b else { return Some(a) };
                let (fa, fb) = (view.in_flight(a), view.in_flight(b));
                Some(if fa < fb || (fa == fb && rng.coin()) {
                    a
                } else {
                    b
                })
            }
        }
    }
}

/// `response_aware` score, lower is better: latency × (in_flight + 1) ÷ success rate. Latency is
/// floored at 1 ms (a fresh upstream with no measurement yet still counts its in-flight requests)
/// and the success rate at 0.01 (no ÷0; a failing member is 100× worse, not infinitely). NaN from
/// the view falls to the floors.
fn score(view: &dyn UpstreamView, u: usize) -> f64 {
    let latency = view.latency_ms(u).max(1.0);
    let s = view.success_rate(u);
    let success = if s >= 0.01 { s.min(1.0) } else { 0.01 };
    latency * (view.in_flight(u) as f64 + 1.0) / success
}

/// One round of nginx's smooth weighted round robin over the members for which `eligible(i)`:
/// every eligible member's current weight grows by its weight, the largest wins (first in list
/// order on ties) and gives back the round's total. Ineligible members sit the round out with
/// their current weight unchanged (nginx skips down and already-tried peers the same way). The
/// sum of all current weights is invariant, so they stay bounded. Returns the member position.
fn smooth_step(
    weights: &[i64],
    current: &[Cell<i64>],
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut total = 0;
    let mut best: Option<(usize, i64)> = None;
    for (i, &w) in weights.iter().enumerate() {
        if !eligible(i) {
            continue;
        }
        let cw = current[i].get() + w;
        current[i].set(cw);
        total += w;
        if best.map_or(true, |(_, b)| cw > b) {
            best = Some((i, cw));
        }
    }
    let (i, cw) = best?;
    current[i].set(cw - total);
    Some(i)
}

/// Uniform among the eligible members. Fast path: one random member, taken if eligible. Else a
/// reservoir sample (size 1) over the eligible ones. Still uniform: with k of n eligible,
/// P(u) = 1/n + (n−k)/n · 1/k = 1/k.
fn pick_random(members: &[usize], rng: &Rng, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
    let u = members[rng.below(members.len())];
    if eligible(u) {
        return Some(u);
    }
    let mut chosen = None;
    let mut seen = 0;
    for &u in members {
        if eligible(u) {
            seen += 1;
            if rng.below(seen) == 0 {
                chosen = Some(u);
            }
        }
    }
    chosen
}

/// Two distinct eligible members, uniform over the pairs (`(a, None)` when only one is eligible).
/// Fast path: two distinct random members, taken if both are eligible. Else a reservoir sample of
/// size 2 (Algorithm R). Uniform: P({x,y}) = 1/C(n,2) + (1 − C(k,2)/C(n,2)) / C(k,2) = 1/C(k,2).
fn sample_two(
    members: &[usize],
    rng: &Rng,
    eligible: &impl Fn(usize) -> bool,
) -> Option<(usize, Option<usize>)> {
    let n = members.len();
    if n >= 2 {
        let i = rng.below(n);
        let mut j = rng.below(n - 1);
        if j >= i {
            j += 1;
        }
        let (a, b) = (members[i], members[j]);
        if eligible(a) && eligible(b) {
            return Some((a, Some(b)));
        }
    }
    let mut slots: [Option<usize>; 2] = [None, None];
    let mut seen = 0;
    for &u in members {
        if !eligible(u) {
            continue;
        }
        if seen < 2 {
            slots[seen] = Some(u);
        } else {
            let r = rng.below(seen + 1);
            if r < 2 {
                slots[r] = Some(u);
            }
        }
        seen += 1;
    }
    Some((slots[0]?, slots[1]))
}
