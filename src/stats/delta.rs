//! Stats deltas (built on a shard, merged on the control thread): what one shard counted since its
//! previous delta, in a sparse, `Send` form. Also the label vocabularies (methods, duration buckets)
//! shared by the shard, the control thread and the Prometheus renderer.

use std::collections::HashMap;
use std::sync::Arc;

use super::UpstreamErrorKind;

/// Upper bounds (µs) of the duration histogram buckets; a value `v` falls in the first bucket with
/// `v <= bound` (Prometheus `le` semantics), else in the `+Inf` bucket.
pub const DURATION_BUCKETS_US: [u64; 15] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
];

/// The same bounds as Prometheus `le` label values (seconds).
pub const DURATION_BUCKETS_LE: [&str; 15] = [
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60",
    "120", "300",
];

/// Buckets per duration histogram: the bounded ones plus `+Inf`.
pub const BUCKETS: usize = DURATION_BUCKETS_US.len() + 1;

/// `method` label values; anything not standard is `OTHER` (bounded cardinality).
pub const METHOD_LABELS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "OTHER",
];

/// Number of `method` label values.
pub const METHODS: usize = METHOD_LABELS.len();

/// The `path` label value that absorbs paths beyond the per-forward limit (and unusable ones).
pub const OTHER_PATH: &str = "_other";

/// Index into [`METHOD_LABELS`] of a request method.
pub fn method_index(method: &http::Method) -> u8 {
    match method.as_str() {
        "GET" => 0,
        "HEAD" => 1,
        "POST" => 2,
        "PUT" => 3,
        "DELETE" => 4,
        "CONNECT" => 5,
        "OPTIONS" => 6,
        "TRACE" => 7,
        "PATCH" => 8,
        _ => 9,
    }
}

/// Bucket counts and sum of a duration histogram (not cumulative; the renderer accumulates).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurationCounts {
    /// `buckets[i]` counts values in `(bound[i-1], bound[i]]`; the last one is `+Inf`.
    pub buckets: [u64; BUCKETS],
    /// Sum of the recorded values in µs.
    pub sum_us: u64,
}

impl DurationCounts {
    /// Counts one observation of `us` microseconds.
    #[inline]
    pub fn record(&mut self, us: u64) {
        let i = DURATION_BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i] = self.buckets[i].wrapping_add(1);
        self.sum_us = self.sum_us.wrapping_add(us);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, &b| a.wrapping_add(b))
    }

    /// Adds another histogram's counts.
    pub fn add(&mut self, other: &DurationCounts) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_us = self.sum_us.wrapping_add(other.sum_us);
    }

    /// True when nothing was recorded.
    pub fn is_zero(&self) -> bool {
        self.buckets.iter().all(|&b| b == 0)
    }
}

/// Latency observations in hdrhistogram form: `(value µs, count)` pairs sorted by value, values
/// unique. Values are the histogram's bucket representatives, so re-recording them into a
/// histogram with the same precision loses nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySamples(pub Vec<(u64, u64)>);

impl LatencySamples {
    /// Adds `other` into `self`, keeping the pairs sorted and unique (so a delta carried over many
    /// failed sends stays bounded by the number of distinct histogram buckets).
    pub fn absorb(&mut self, other: LatencySamples) {
        if other.0.is_empty() {
            return;
        }
        if self.0.is_empty() {
            self.0 = other.0;
            return;
        }
        let a = std::mem::take(&mut self.0);
        let mut out = Vec::with_capacity(a.len() + other.0.len());
        let (mut i, mut j) = (a.into_iter().peekable(), other.0.into_iter().peekable());
        loop {
            match (i.peek().copied(), j.peek().copied()) {
                (Some((va, ca)), Some((vb, cb))) => {
                    if va == vb {
                        out.push((va, ca.wrapping_add(cb)));
                        i.next();
                        j.next();
                    } else if va < vb {
                        out.push((va, ca));
                        i.next();
                    } else {
                        out.push((vb, cb));
                        j.next();
                    }
                }
                (Some(x), None) => {
                    out.push(x);
                    i.next();
                }
                (None, Some(y)) => {
                    out.push(y);
                    j.next();
                }
                (None, None) => break,
            }
        }
        self.0 = out;
    }

    /// Total number of observations.
    pub fn count(&self) -> u64 {
        self.0.iter().fold(0u64, |a, &(_, c)| a.wrapping_add(c))
    }
}

/// Downstream requests of one `{forward, method, path}` series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSample {
    /// Index into `Config::forwards`.
    pub forward: usize,
    /// Index into [`METHOD_LABELS`].
    pub method: u8,
    /// Normalised path (no query), or [`OTHER_PATH`].
    pub path: Arc<str>,
    pub duration: DurationCounts,
}

/// Downstream errors of one `{forward, error, status}` series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpErrorSample {
    pub forward: usize,
    pub error: &'static str,
    pub status: u16,
    pub count: u64,
}

/// Upstream exchanges of one `{group, upstream}` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSample {
    /// Index into `Config::groups`.
    pub group: usize,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    /// Every exchange, failed or not.
    pub duration: DurationCounts,
    /// Failures by kind, indexed by [`UpstreamErrorKind::index`].
    pub errors: [u64; UpstreamErrorKind::COUNT],
    /// Requests sent again after this upstream failed them or answered 5xx/429.
    pub retries: u64,
}

impl UpstreamSample {
    /// Exchanges that ended without an error.
    pub fn successes(&self) -> u64 {
        let failed = self.errors.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        self.duration.count().saturating_sub(failed)
    }
}

/// Breaker inputs of one upstream from one shard (calls as judged by the request path through
/// `ShardHealth::record`, independent of the group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BreakerSample {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    pub successes: u64,
    pub failures: u64,
    /// Calls refused by the breaker (open, locally tripped, or no probe quota left).
    pub rejected: u64,
    /// Time to the response head of successful calls (µs), for the latency EMA.
    pub latency_sum_us: u64,
    pub latency_count: u64,
    /// Half-open probe round the probe counts below belong to (0 = none).
    pub probe_round: u64,
    pub probes_admitted: u32,
    pub probe_successes: u32,
    pub probe_failures: u32,
    /// The shard tripped this upstream locally on consecutive failures.
    pub fast_trip: bool,
}

impl BreakerSample {
    /// True when nothing was counted.
    pub fn is_zero(&self) -> bool {
        self.successes == 0
            && self.failures == 0
            && self.rejected == 0
            && self.latency_count == 0
            && self.probes_admitted == 0
            && self.probe_successes == 0
            && self.probe_failures == 0
            && !self.fast_trip
    }

    /// Adds a newer sample of the same upstream; probe counts of an older round are dropped.
    pub fn absorb(&mut self, newer: &BreakerSample) {
        self.successes = self.successes.wrapping_add(newer.successes);
        self.failures = self.failures.wrapping_add(newer.failures);
        self.rejected = self.rejected.wrapping_add(newer.rejected);
        self.latency_sum_us = self.latency_sum_us.wrapping_add(newer.latency_sum_us);
        self.latency_count = self.latency_count.wrapping_add(newer.latency_count);
        self.fast_trip |= newer.fast_trip;
        if newer.probe_round > self.probe_round {
            self.probe_round = newer.probe_round;
            self.probes_admitted = newer.probes_admitted;
            self.probe_successes = newer.probe_successes;
            self.probe_failures = newer.probe_failures;
        } else if newer.probe_round == self.probe_round {
            self.probes_admitted += newer.probes_admitted;
            self.probe_successes += newer.probe_successes;
            self.probe_failures += newer.probe_failures;
        }
    }
}

/// Everything one shard counted since its previous successfully sent delta.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsDelta {
    /// The shard that sent it.
    pub shard: usize,
    /// Per-shard sequence number of the newest `take_delta` folded into this delta (starts at 1).
    pub seq: u64,
    /// How many older deltas (whose send failed) were folded into this one.
    pub folded: u64,
    pub http: Vec<HttpSample>,
    pub http_errors: Vec<HttpErrorSample>,
    pub upstreams: Vec<UpstreamSample>,
    /// Downstream request latency per forward.
    pub forward_latency: Vec<(usize, LatencySamples)>,
    /// Upstream exchange latency per upstream (index into `Config::upstreams`, all groups).
    pub upstream_latency: Vec<(usize, LatencySamples)>,
    /// Breaker inputs per upstream (only upstreams with something to report).
    pub breaker: Vec<BreakerSample>,
    /// Epoch of the snapshot the shard had adopted when it took this delta.
    pub epoch: u64,
    /// Sends of this shard's deltas that failed (channel full or gone) since the last delta; their
    /// contents were kept and are included here.
    pub failed_sends: u64,
    /// Recording calls with an index outside the configuration (a caller bug), ignored.
    pub invalid_records: u64,
}

impl StatsDelta {
    /// True when the delta carries no counts (it is still a liveness signal).
    pub fn is_empty(&self) -> bool {
        self.http.is_empty()
            && self.http_errors.is_empty()
            && self.upstreams.is_empty()
            && self.forward_latency.is_empty()
            && self.upstream_latency.is_empty()
            && self.breaker.is_empty()
            && self.failed_sends == 0
            && self.invalid_records == 0
    }

    /// Folds a newer delta of the same shard into this one (used when a send failed): counts add,
    /// the sequence number becomes the newer one.
    pub fn absorb(&mut self, newer: StatsDelta) {
        self.seq = self.seq.max(newer.seq);
        self.epoch = self.epoch.max(newer.epoch);
        self.folded = self.folded.wrapping_add(newer.folded).wrapping_add(1);
        self.failed_sends = self.failed_sends.wrapping_add(newer.failed_sends);
        self.invalid_records = self.invalid_records.wrapping_add(newer.invalid_records);

        let mut idx: HashMap<(usize, u8, Arc<str>), usize> = self
            .http
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.forward, s.method, s.path.clone()), i))
            .collect();
        for s in newer.http {
            match idx.get(&(s.forward, s.method, s.path.clone())) {
                Some(&i) => self.http[i].duration.add(&s.duration),
                None => {
                    idx.insert((s.forward, s.method, s.path.clone()), self.http.len());
                    self.http.push(s);
                }
            }
        }

        for e in newer.http_errors {
            match self
                .http_errors
                .iter_mut()
                .find(|x| x.forward == e.forward && x.error == e.error && x.status == e.status)
            {
                Some(x) => x.count = x.count.wrapping_add(e.count),
                None => self.http_errors.push(e),
            }
        }

        for u in newer.upstreams {
            match self
                .upstreams
                .iter_mut()
                .find(|x| x.group == u.group && x.upstream == u.upstream)
            {
                Some(x) => {
                    x.duration.add(&u.duration);
                    for (a, b) in x.errors.iter_mut().zip(u.errors.iter()) {
                        *a = a.wrapping_add(*b);
                    }
                }
                None => self.upstreams.push(u),
            }
        }

        for b in newer.breaker {
            match self.breaker.iter_mut().find(|x| x.upstream == b.upstream) {
                Some(x) => x.absorb(&b),
                None => self.breaker.push(b),
            }
        }

        absorb_latency(&mut self.forward_latency, newer.forward_latency);
        absorb_latency(&mut self.upstream_latency, newer.upstream_latency);
    }
}

fn absorb_latency(into: &mut Vec<(usize, LatencySamples)>, from: Vec<(usize, LatencySamples)>) {
    for (k, s) in from {
        match into.iter_mut().find(|(x, _)| *x == k) {
            Some((_, t)) => t.absorb(s),
            None => into.push((k, s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_boundaries_are_inclusive() {
        let mut d = DurationCounts::default();
        d.record(0);
        d.record(5_000);
        d.record(5_001);
        d.record(300_000_000);
        d.record(300_000_001);
        assert_eq!(d.buckets[0], 2);
        assert_eq!(d.buckets[1], 1);
        assert_eq!(d.buckets[14], 1);
        assert_eq!(d.buckets[15], 1);
        assert_eq!(d.count(), 5);
        assert_eq!(d.sum_us, 5_000 + 5_001 + 300_000_000 + 300_000_001);
    }

    #[test]
    fn latency_samples_merge_sorted_unique() {
        let mut a = LatencySamples(vec![(1, 1), (5, 2), (9, 1)]);
        a.absorb(LatencySamples(vec![(0, 1), (5, 3), (10, 4)]));
        assert_eq!(a.0, vec![(0, 1), (1, 1), (5, 5), (9, 1), (10, 4)]);
        assert_eq!(a.count(), 12);
    }

    #[test]
    fn methods_map_to_bounded_labels() {
        assert_eq!(
            METHOD_LABELS[method_index(&http::Method::POST) as usize],
            "POST"
        );
        let odd = http::Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(METHOD_LABELS[method_index(&odd) as usize], "OTHER");
    }
}
