use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::*;
use crate::config::{HttpClient, Member};

/// Upstream indexes of the test groups' members: deliberately not 0..n, so a strategy returning a
/// member position instead of an upstream index fails.
const U: [usize; 4] = [9, 2, 14, 5];
const VIEW_SIZE: usize = 16;

/// A settable view over `VIEW_SIZE` upstreams: all available, idle, 100 ms, 100 % success.
struct Fake {
    available: Vec<Cell<bool>>,
    in_flight: Vec<Cell<u32>>,
    latency: Vec<Cell<f64>>,
    success: Vec<Cell<f64>>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            available: (0..VIEW_SIZE).map(|_| Cell::new(true)).collect(),
            in_flight: (0..VIEW_SIZE).map(|_| Cell::new(0)).collect(),
            latency: (0..VIEW_SIZE).map(|_| Cell::new(100.0)).collect(),
            success: (0..VIEW_SIZE).map(|_| Cell::new(1.0)).collect(),
        }
    }
    fn down(&self, u: usize) {
        self.available[u].set(false);
    }
    fn up(&self, u: usize) {
        self.available[u].set(true);
    }
}

impl UpstreamView for Fake {
    fn available(&self, u: usize) -> bool {
        self.available[u].get()
    }
    fn in_flight(&self, u: usize) -> u32 {
        self.in_flight[u].get()
    }
    fn latency_ms(&self, u: usize) -> f64 {
        self.latency[u].get()
    }
    fn success_rate(&self, u: usize) -> f64 {
        self.success[u].get()
    }
}

const ALL: [Strategy; 7] = [
    Strategy::RoundRobin,
    Strategy::WeightedRoundRobin,
    Strategy::Random,
    Strategy::ResponseAware,
    Strategy::Failover,
    Strategy::IpHash,
    Strategy::LeastRequests,
];

fn group(strategy: Strategy, weights: &[u32]) -> Group {
    Group {
        name: "g".to_string(),
        members: weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member {
                upstream: U[i],
                weight,
            })
            .collect(),
        strategy,
        client: HttpClient {
            agent: "LLMProxy/1.0".into(),
            tcp_keepalive: None,
            stream: true,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
            first_byte_timeout: Duration::from_secs(300),
            stream_idle_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle: 64,
            retry: None,
            proxy: None,
        },
    }
}

fn balancer(strategy: Strategy, n: usize) -> Balancer {
    Balancer::new(&group(strategy, &vec![1; n]), 0)
}

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919))
}

fn pick(b: &Balancer, v: &Fake) -> usize {
    b.pick(v, IP, &[]).expect("a member")
}

/// Picks per upstream index over `n` picks.
fn counts(b: &Balancer, v: &Fake, n: usize) -> [usize; VIEW_SIZE] {
    let mut c = [0; VIEW_SIZE];
    for _ in 0..n {
        c[pick(b, v)] += 1;
    }
    c
}

/// Pearson's chi-square statistic of `observed` against a uniform spread over `cells`.
fn chi_square(observed: &[usize; VIEW_SIZE], cells: &[usize]) -> f64 {
    let total: usize = cells.iter().map(|&u| observed[u]).sum();
    let expected = total as f64 / cells.len() as f64;
    cells
        .iter()
        .map(|&u| (observed[u] as f64 - expected).powi(2) / expected)
        .sum()
}

// ---- every strategy ----

#[test]
fn unavailable_and_tried_are_never_picked() {
    for s in ALL {
        for shard in 0..3 {
            let b = Balancer::new(&group(s, &[1, 3, 2, 1]), shard);
            let v = Fake::new();
            v.down(U[1]);
            for i in 0..500 {
                let got = b.pick(&v, ip(i), &[U[3]]).unwrap();
                assert!(got == U[0] || got == U[2], "{s:?} picked {got}");
            }
        }
    }
}

#[test]
fn nothing_eligible_is_none() {
    for s in ALL {
        let b = balancer(s, 4);
        let v = Fake::new();
        for u in U {
            v.down(u);
        }
        assert_eq!(b.pick(&v, IP, &[]), None, "{s:?} all down");
        let v = Fake::new();
        assert_eq!(b.pick(&v, IP, &U), None, "{s:?} all tried");
        v.down(U[0]);
        v.down(U[1]);
        assert_eq!(b.pick(&v, IP, &[U[2], U[3]]), None, "{s:?} down + tried");
        let empty = Balancer::new(&group(s, &[]), 0);
        assert_eq!(empty.pick(&v, IP, &[]), None, "{s:?} empty group");
    }
}

#[test]
fn a_single_eligible_member_gets_every_pick() {
    for s in ALL {
        let b = balancer(s, 4);
        let v = Fake::new();
        v.down(U[0]);
        v.down(U[3]);
        for i in 0..50 {
            assert_eq!(b.pick(&v, ip(i), &[U[1]]), Some(U[2]), "{s:?}");
        }
    }
}

// ---- roundrobin ----

#[test]
fn roundrobin_is_even_and_rotates() {
    let b = balancer(Strategy::RoundRobin, 4);
    let v = Fake::new();
    let first: Vec<usize> = (0..8).map(|_| pick(&b, &v)).collect();
    assert_eq!(first, [U[0], U[1], U[2], U[3], U[0], U[1], U[2], U[3]]);
    let c = counts(&b, &v, 400);
    for u in U {
        assert_eq!(c[u], 100);
    }
}

#[test]
fn roundrobin_shards_start_at_different_members() {
    let v = Fake::new();
    let firsts: Vec<usize> = (0..4)
        .map(|shard| {
            pick(
                &Balancer::new(&group(Strategy::RoundRobin, &[1; 4]), shard),
                &v,
            )
        })
        .collect();
    assert_eq!(firsts, U);
}

#[test]
fn roundrobin_skips_unavailable_and_tried() {
    let b = balancer(Strategy::RoundRobin, 4);
    let v = Fake::new();
    v.down(U[1]);
    let c = counts(&b, &v, 300);
    assert_eq!(c[U[1]], 0);
    assert_eq!(c[U[0]] + c[U[2]] + c[U[3]], 300);
    assert_eq!(b.pick(&v, IP, &[U[0], U[2]]), Some(U[3]));
}

// ---- weighted_roundrobin ----

#[test]
fn wrr_8_2_is_exact_and_interleaved() {
    for shard in 0..12 {
        let b = Balancer::new(&group(Strategy::WeightedRoundRobin, &[8, 2]), shard);
        let v = Fake::new();
        let seq: Vec<usize> = (0..1000).map(|_| pick(&b, &v)).collect();
        // Every window of 10 consecutive picks is exactly 8:2.
        for w in seq.windows(10) {
            let heavy = w.iter().filter(|&&u| u == U[0]).count();
            assert_eq!(heavy, 8, "shard {shard}: {w:?}");
        }
        // The weight-2 member never twice in a row; the weight-8 member never more than 4.
        let mut run = 0;
        for pair in seq.windows(2) {
            assert!(!(pair[0] == U[1] && pair[1] == U[1]), "shard {shard}");
        }
        for &u in &seq {
            run = if u == U[0] { run + 1 } else { 0 };
            assert!(run <= 4, "shard {shard}: run of {run}");
        }
    }
}

#[test]
fn wrr_matches_nginx_smooth_sequence() {
    // The example from nginx's commit introducing smooth WRR: weights {5, 1, 1} → a a b a c a a.
    let b = Balancer::new(&group(Strategy::WeightedRoundRobin, &[5, 1, 1]), 0);
    let v = Fake::new();
    let seq: Vec<usize> = (0..14).map(|_| pick(&b, &v)).collect();
    let (a, bb, c) = (U[0], U[1], U[2]);
    assert_eq!(seq, [a, a, bb, a, c, a, a, a, a, bb, a, c, a, a]);
}

#[test]
fn wrr_shards_start_at_different_points() {
    let v = Fake::new();
    let firsts: Vec<usize> = (0..3)
        .map(|s| {
            pick(
                &Balancer::new(&group(Strategy::WeightedRoundRobin, &[1, 1, 1]), s),
                &v,
            )
        })
        .collect();
    assert_eq!(firsts, [U[0], U[1], U[2]]);
}

#[test]
fn wrr_leaves_unavailable_members_out_of_the_round() {
    let b = Balancer::new(&group(Strategy::WeightedRoundRobin, &[5, 3, 2]), 0);
    let v = Fake::new();
    v.down(U[2]);
    let c = counts(&b, &v, 800);
    assert_eq!((c[U[0]], c[U[1]], c[U[2]]), (500, 300, 0));
    // Back: the 5:3:2 split resumes, with no catch-up burst for the absent member.
    v.up(U[2]);
    let seq: Vec<usize> = (0..100).map(|_| pick(&b, &v)).collect();
    let n = |u| seq.iter().filter(|&&x| x == u).count();
    assert_eq!((n(U[0]), n(U[1]), n(U[2])), (50, 30, 20));
    assert!(seq.windows(2).all(|w| !(w[0] == U[2] && w[1] == U[2])));
}

#[test]
fn wrr_tried_member_sits_out() {
    let b = Balancer::new(&group(Strategy::WeightedRoundRobin, &[8, 2]), 0);
    let v = Fake::new();
    for _ in 0..20 {
        assert_eq!(b.pick(&v, IP, &[U[0]]), Some(U[1]));
    }
}

// ---- random ----

#[test]
fn random_is_uniform() {
    let b = balancer(Strategy::Random, 4);
    let v = Fake::new();
    let c = counts(&b, &v, 40_000);
    // 3 degrees of freedom: P(χ² > 30) ≈ 1.4e-6; the seed is fixed anyway.
    let x = chi_square(&c, &U);
    assert!(x < 30.0, "χ² = {x}, {c:?}");
}

#[test]
fn random_is_uniform_over_the_eligible_members() {
    // No neighbour bias: with U[1] down, U[2] (its successor) gets no more than the others.
    let b = balancer(Strategy::Random, 4);
    let v = Fake::new();
    v.down(U[1]);
    let c = counts(&b, &v, 30_000);
    assert_eq!(c[U[1]], 0);
    let x = chi_square(&c, &[U[0], U[2], U[3]]);
    assert!(x < 30.0, "χ² = {x}, {c:?}");
}

#[test]
fn random_sequences_differ_between_shards() {
    let v = Fake::new();
    let seq = |shard| {
        let b = Balancer::new(&group(Strategy::Random, &[1; 4]), shard);
        (0..64).map(|_| pick(&b, &v)).collect::<Vec<_>>()
    };
    assert_ne!(seq(0), seq(1));
    assert_eq!(seq(3), seq(3));
}

// ---- response_aware ----

#[test]
fn response_aware_prefers_the_fast_member() {
    let b = balancer(Strategy::ResponseAware, 2);
    let v = Fake::new();
    v.latency[U[0]].set(100.0);
    v.latency[U[1]].set(300.0);
    let c = counts(&b, &v, 3200);
    // Only exploration (one pick in EXPLORE_EVERY) reaches the slow member.
    assert_eq!(c[U[1]], 3200 / EXPLORE_EVERY as usize);
    assert_eq!(c[U[0]], 3200 - 3200 / EXPLORE_EVERY as usize);
}

#[test]
fn response_aware_weighs_in_flight_and_success_rate() {
    let b = balancer(Strategy::ResponseAware, 2);
    let v = Fake::new();
    v.latency[U[1]].set(300.0);
    // 100 ms × (5 + 1) = 600 > 300 ms × 1.
    v.in_flight[U[0]].set(5);
    assert_eq!(pick(&b, &v), U[1]);
    v.in_flight[U[0]].set(1);
    assert_eq!(pick(&b, &v), U[0]);
    // 100 ms / 0.25 = 400 > 300.
    v.success[U[0]].set(0.25);
    assert_eq!(pick(&b, &v), U[1]);
    // A zero success rate is floored, not ÷0: 100 ms / 0.01 = 10 000 < 300 ms / 0.01 × 2.
    v.in_flight[U[0]].set(0);
    v.success[U[0]].set(0.0);
    v.success[U[1]].set(0.0);
    v.in_flight[U[1]].set(1);
    assert_eq!(pick(&b, &v), U[0]);
    // NaN from the view does not poison the comparison.
    v.latency[U[0]].set(f64::NAN);
    v.success[U[0]].set(f64::NAN);
    assert_eq!(pick(&b, &v), U[0]);
}

#[test]
fn response_aware_breaks_ties_by_rotation() {
    let b = balancer(Strategy::ResponseAware, 4);
    let v = Fake::new();
    let c = counts(&b, &v, 400);
    for u in U {
        assert_eq!(c[u], 100);
    }
    // Unmeasured upstreams (latency 0) still compare on in-flight.
    for u in U {
        v.latency[u].set(0.0);
        v.in_flight[u].set(2);
    }
    v.in_flight[U[2]].set(1);
    assert_eq!(pick(&b, &v), U[2]);
}

/// The real feedback loop: the view's latency EMA of an upstream only moves when it is picked
/// (α = 0.15, as in LLMProxy). A member that was slow and recovers must get traffic back.
#[test]
fn response_aware_readmits_a_recovered_member() {
    const ALPHA: f64 = 0.15;
    let b = balancer(Strategy::ResponseAware, 3);
    let v = Fake::new();
    let truth = [100.0, 5000.0, 150.0];
    for (i, &t) in truth.iter().enumerate() {
        v.latency[U[i]].set(t);
    }
    let step = |truth: &[f64; 3]| {
        let u = pick(&b, &v);
        let i = U.iter().position(|&x| x == u).unwrap();
        let ema = v.latency[u].get();
        v.latency[u].set(ema + ALPHA * (truth[i] - ema));
        u
    };
    // Phase 1: U[1] is slow; it only sees exploration probes.
    let mut slow = 0;
    for _ in 0..2000 {
        slow += (step(&truth) == U[1]) as usize;
    }
    assert!(
        slow <= 2000 / EXPLORE_EVERY as usize,
        "slow member got {slow}"
    );
    // Phase 2: U[1] recovers (20 ms) but its EMA is still ~5 s. It is probed within the bound...
    let truth = [100.0, 20.0, 150.0];
    let bound = EXPLORE_EVERY as usize * 2;
    let first = (1..=bound).find(|_| step(&truth) == U[1]);
    assert!(first.is_some(), "not re-admitted within {bound} picks");
    // ... and once the probes have pulled its EMA down, it wins most of the traffic.
    for _ in 0..3000 {
        step(&truth);
    }
    let mut fast = 0;
    for _ in 0..200 {
        fast += (step(&truth) == U[1]) as usize;
    }
    assert!(fast > 180, "recovered member got {fast}/200");
}

#[test]
fn response_aware_never_explores_unavailable_members() {
    let b = balancer(Strategy::ResponseAware, 3);
    let v = Fake::new();
    v.latency[U[1]].set(5000.0);
    v.down(U[2]);
    let c = counts(&b, &v, 1000);
    assert_eq!(c[U[2]], 0);
    assert!(c[U[1]] > 0 && c[U[1]] <= 1000 / EXPLORE_EVERY as usize);
}

#[test]
fn response_aware_does_not_explore_when_traffic_is_spread() {
    // Both members get traffic from the scores (in-flight alternates), so no pick is diverted.
    let b = balancer(Strategy::ResponseAware, 2);
    let v = Fake::new();
    v.latency[U[1]].set(150.0);
    for _ in 0..1000 {
        let u = pick(&b, &v);
        // Score-optimal pick each time: the member whose score is lowest.
        let s = |x: usize| v.latency[x].get() * (v.in_flight[x].get() as f64 + 1.0);
        let other = if u == U[0] { U[1] } else { U[0] };
        assert!(s(u) <= s(other), "diverted pick");
        // A request stays in flight on the picked member; the other one's finished.
        v.in_flight[u].set(1);
        v.in_flight[other].set(0);
    }
}

// ---- failover ----

#[test]
fn failover_takes_the_first_eligible_in_order() {
    let b = balancer(Strategy::Failover, 4);
    let v = Fake::new();
    assert_eq!(counts(&b, &v, 50)[U[0]], 50);
    v.down(U[0]);
    assert_eq!(pick(&b, &v), U[1]);
    assert_eq!(b.pick(&v, IP, &[U[1]]), Some(U[2]));
    v.down(U[2]);
    assert_eq!(b.pick(&v, IP, &[U[1]]), Some(U[3]));
    v.up(U[0]);
    assert_eq!(b.pick(&v, IP, &[U[1]]), Some(U[0]));
}

// ---- iphash ----

fn iphash_map(b: &Balancer, v: &Fake, n: u32) -> Vec<usize> {
    (0..n).map(|i| b.pick(v, ip(i), &[]).unwrap()).collect()
}

#[test]
fn iphash_is_stable_across_picks_and_shards() {
    let v = Fake::new();
    let maps: Vec<Vec<usize>> = (0..4)
        .map(|shard| {
            let b = Balancer::new(&group(Strategy::IpHash, &[1; 4]), shard);
            iphash_map(&b, &v, 1000)
        })
        .collect();
    assert!(maps.iter().all(|m| *m == maps[0]));
    let b = balancer(Strategy::IpHash, 4);
    assert_eq!(iphash_map(&b, &v, 1000), maps[0]);
    // An IPv4 client seen through a dual-stack listener keeps its upstream.
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
    let plain = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(b.pick(&v, mapped, &[]), b.pick(&v, plain, &[]));
}

#[test]
fn iphash_spreads_evenly() {
    let b = balancer(Strategy::IpHash, 4);
    let v = Fake::new();
    let mut c = [0; VIEW_SIZE];
    for u in iphash_map(&b, &v, 20_000) {
        c[u] += 1;
    }
    let x = chi_square(&c, &U);
    assert!(x < 30.0, "χ² = {x}, {c:?}");
    // IPv6 clients too.
    let mut c = [0; VIEW_SIZE];
    for i in 0..20_000u128 {
        let a = IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 64) | 1));
        c[b.pick(&v, a, &[]).unwrap()] += 1;
    }
    let x = chi_square(&c, &U);
    assert!(x < 30.0, "χ² = {x}, {c:?}");
}

#[test]
fn iphash_removing_a_member_moves_only_its_keys() {
    const N: u32 = 20_000;
    let b = balancer(Strategy::IpHash, 4);
    let v = Fake::new();
    let before = iphash_map(&b, &v, N);
    v.down(U[2]);
    let after = iphash_map(&b, &v, N);
    let mut moved = 0;
    let mut landed = [0; VIEW_SIZE];
    for (x, y) in before.iter().zip(&after) {
        if *x == U[2] {
            assert_ne!(*y, U[2]);
            moved += 1;
            landed[*y] += 1;
        } else {
            assert_eq!(x, y, "a key not on the removed member moved");
        }
    }
    let share = moved as f64 / N as f64;
    assert!((0.22..0.28).contains(&share), "moved {share}");
    // The orphaned keys spread over the survivors rather than piling onto one.
    for u in [U[0], U[1], U[3]] {
        assert!(landed[u] > moved / 5, "{landed:?}");
    }
    // It comes back: exactly the original mapping.
    v.up(U[2]);
    assert_eq!(iphash_map(&b, &v, N), before);
    // A tried member behaves like a removed one.
    let tried: Vec<usize> = (0..N)
        .map(|i| b.pick(&v, ip(i), &[U[2]]).unwrap())
        .collect();
    assert_eq!(tried, after);
}

#[test]
fn iphash_weights_scale_the_share() {
    let b = Balancer::new(&group(Strategy::IpHash, &[3, 1]), 0);
    let v = Fake::new();
    let heavy = iphash_map(&b, &v, 20_000)
        .iter()
        .filter(|&&u| u == U[0])
        .count();
    let share = heavy as f64 / 20_000.0;
    assert!((0.73..0.77).contains(&share), "weight-3 share {share}");
}

// ---- least_requests ----

#[test]
fn least_requests_prefers_the_idle_member() {
    let b = balancer(Strategy::LeastRequests, 2);
    let v = Fake::new();
    v.in_flight[U[0]].set(3);
    v.in_flight[U[1]].set(1);
    assert_eq!(counts(&b, &v, 100)[U[1]], 100);

    // Three members: the idle one wins whenever it is sampled (2 pairs in 3).
    let b = balancer(Strategy::LeastRequests, 3);
    v.in_flight[U[0]].set(5);
    v.in_flight[U[1]].set(0);
    v.in_flight[U[2]].set(5);
    let c = counts(&b, &v, 30_000);
    let share = c[U[1]] as f64 / 30_000.0;
    assert!((0.64..0.69).contains(&share), "idle share {share}");
    // The busiest of three distinct loads loses every pair it is in.
    v.in_flight[U[2]].set(2);
    v.in_flight[U[0]].set(1);
    assert_eq!(counts(&b, &v, 1000)[U[2]], 0);
}

#[test]
fn least_requests_spreads_ties() {
    let v = Fake::new();
    let b = balancer(Strategy::LeastRequests, 2);
    let c = counts(&b, &v, 20_000);
    let x = chi_square(&c, &U[..2]);
    assert!(x < 25.0, "χ² = {x}, {c:?}");
    let b = balancer(Strategy::LeastRequests, 4);
    let c = counts(&b, &v, 40_000);
    let x = chi_square(&c, &U);
    assert!(x < 30.0, "χ² = {x}, {c:?}");
    // With one member down the pair is sampled over the three others, uniformly.
    v.down(U[0]);
    let c = counts(&b, &v, 30_000);
    assert_eq!(c[U[0]], 0);
    let x = chi_square(&c, &U[1..]);
    assert!(x < 30.0, "χ² = {x}, {c:?}");
    // Shards do not herd: the same idle view gives them different sequences.
    let v = Fake::new();
    let seq = |shard| {
        let b = Balancer::new(&group(Strategy::LeastRequests, &[1; 4]), shard);
        (0..64).map(|_| pick(&b, &v)).collect::<Vec<_>>()
    };
    assert_ne!(seq(0), seq(1));
}

#[test]
fn response_aware_probes_each_starved_member_within_the_bound() {
    // One fast member, three with stale bad numbers that never improve: each starved member is
    // probed at least once every EXPLORE_EVERY × (eligible − 1) picks, stalest first.
    let b = balancer(Strategy::ResponseAware, 4);
    let v = Fake::new();
    for &u in &U[1..] {
        v.latency[u].set(10_000.0);
        v.success[u].set(0.05);
    }
    let bound = EXPLORE_EVERY as usize * 3;
    let mut last = [0usize; VIEW_SIZE];
    for t in 1..=20 * bound {
        let u = pick(&b, &v);
        last[u] = t;
        for &s in &U[1..] {
            assert!(
                t - last[s] <= bound,
                "{s} starved for {} picks",
                t - last[s]
            );
        }
    }
}
