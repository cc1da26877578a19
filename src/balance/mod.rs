//! Load balancing (shard): picks a group member per request from the shard's local view (its
//! in-flight counts) blended with the global snapshot (breaker state, latency EMA, success rate).

use std::net::IpAddr;

use crate::config::Group;

/// What a strategy may ask about an upstream (indexes into `Config::upstreams`).
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

/// One group's balancer on one shard.
pub struct Balancer {
    members: Vec<usize>,
    next: std::cell::Cell<usize>,
}

impl Balancer {
    pub fn new(group: &Group, shard: usize) -> Balancer {
        Balancer {
            members: group.members.iter().map(|m| m.upstream).collect(),
            next: std::cell::Cell::new(shard),
        }
    }

    /// An available member not in `tried`, or None when every member is unavailable or tried.
    pub fn pick(&self, view: &dyn UpstreamView, _client: IpAddr, tried: &[usize]) -> Option<usize> {
        let n = self.members.len();
        let start = self.next.get();
        self.next.set(start.wrapping_add(1));
        (0..n)
            .map(|i| self.members[(start + i) % n])
            .find(|u| !tried.contains(u) && view.available(*u))
    }
}
