//! Shards (shard threads): one thread per core, pinned, each with its own monoio runtime, its
//! own SO_REUSEPORT listening socket per forward, its own upstream pool and counters. Nothing on
//! a shard takes a lock; the only cross-thread traffic is the stats delta it sends each tick and
//! the drain flag it polls.

pub mod listener;
pub mod signal;

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::admin::Health;
use crate::balance::{Balancer, UpstreamView};
pub use crate::breaker::Admission;
use crate::breaker::{Outcome as BreakerOutcome, ShardHealth, Snapshot};
use crate::config::{Config, Driver};
use crate::ratelimit::Limits;
use crate::route::Router;
use crate::stats::{ShardStats, StatsDelta};
use crate::upstream::connect::Egress;
use crate::upstream::request::HeadPlan;
use crate::upstream::Pool;
use signal::DrainSignal;

/// State shared by every shard and the process: read-mostly, set up before shards start.
pub struct Shared {
    pub config: Arc<Config>,
    /// How each group reaches its upstreams (addresses resolved at startup, outbound proxies).
    pub egress: Arc<Egress>,
    /// Set by the signal handler; shards notice it on their next housekeeping tick.
    pub draining: AtomicBool,
    /// What `/health` reports: shards up, draining.
    pub health: Arc<Health>,
    /// Where shards send their stats deltas (the control thread).
    pub stats_tx: crossbeam::channel::Sender<StatsDelta>,
    /// Per shard id: where the DNS refresher sends new addresses (none when it does not run).
    pub egress_updates: Option<Vec<crossbeam::channel::Receiver<Arc<Egress>>>>,
    /// Per shard id: where the control thread publishes the newest global snapshot.
    pub snapshots: Vec<crossbeam::channel::Receiver<Arc<Snapshot>>>,
    /// Rate limits (lock-free tables shared by every shard; only enabled limits touch them).
    pub limits: Arc<Limits>,
}

/// One shard's state. Owned by the shard thread (`Rc`), never shared.
pub struct ShardCtx {
    pub id: usize,
    pub config: Arc<Config>,
    /// How groups reach their upstreams; replaced when the DNS refresher sends new addresses
    /// (adopted on the stats tick; pooled connections are not touched).
    pub egress: RefCell<Rc<Egress>>,
    pub pool: Pool,
    pub stats: Rc<ShardStats>,
    pub limits: Arc<Limits>,
    /// Breakers and the global snapshot as this shard sees them (adopted on the stats tick).
    pub health: Rc<ShardHealth>,
    /// Balancer per group.
    balancers: Vec<Balancer>,
    /// Requests in flight per upstream on this shard.
    in_flight: Vec<Cell<u32>>,
    /// xorshift state for jitter.
    rng: Cell<u64>,
    /// Path router per forward.
    routers: Vec<Router>,
    /// The configuration's part of each upstream request head, per `group * upstreams +
    /// upstream` (see [`ShardCtx::head_plan`]).
    head_plans: Vec<HeadPlan>,
    pub drain: DrainSignal,
    /// Open downstream connections.
    pub active: Cell<usize>,
    /// Per forward: its TLS acceptor when it speaks HTTPS (this shard's copy of the config built
    /// at load, with a session cache of its own).
    pub acceptors: Vec<Option<monoio_rustls::TlsAcceptor>>,
    /// Per upstream: its TLS connector when it is HTTPS (likewise this shard's own copy).
    pub connectors: Vec<Option<monoio_rustls::TlsConnector>>,
    /// Client buffers of connections that are not idle, lent from here.
    pub spares: crate::proxy::Spares,
}

impl ShardCtx {
    pub fn new(id: usize, shared: &Shared, stats: Rc<ShardStats>) -> Self {
        let config = shared.config.clone();
        ShardCtx {
            id,
            limits: shared.limits.clone(),
            pool: Pool::new(config.upstreams.len(), shared.egress.vias()),
            balancers: config.groups.iter().map(|g| Balancer::new(g, id)).collect(),
            in_flight: config.upstreams.iter().map(|_| Cell::new(0)).collect(),
            rng: Cell::new(
                0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            ),
            routers: config
                .forwards
                .iter()
                .map(|f| Router::new(&f.routes))
                .collect(),
            head_plans: config
                .groups
                .iter()
                .enumerate()
                .flat_map(|(gi, g)| {
                    let agent = HeaderValue::from_str(&g.client.agent)
                        .unwrap_or_else(|_| HeaderValue::from_static("LLMProxy/1.0"));
                    let proxy = shared
                        .egress
                        .proxy(shared.egress.group_via[gi])
                        .map(|p| &p.proxy);
                    config.upstreams.iter().map(move |u| {
                        // Through a proxy an http upstream's requests are absolute-form; an
                        // https one is tunnelled (CONNECT) and gets an origin-form head.
                        let absolute = proxy.filter(|_| u.scheme == crate::config::Scheme::Http);
                        HeadPlan::new(u, &agent, absolute)
                    })
                })
                .collect(),
            egress: RefCell::new(Rc::new((*shared.egress).clone())),
            health: Rc::new(ShardHealth::new(
                id,
                &config,
                shared.snapshots.len(),
                stats.clone(),
            )),
            stats,
            drain: DrainSignal::default(),
            active: Cell::new(0),
            acceptors: config
                .forwards
                .iter()
                .map(|f| {
                    f.tls
                        .as_ref()
                        .map(|t| crate::tls::shard_server_config(&t.config).into())
                })
                .collect(),
            connectors: config
                .upstreams
                .iter()
                .map(|u| {
                    u.tls
                        .as_ref()
                        .map(|t| crate::tls::shard_client_config(&t.config).into())
                })
                .collect(),
            spares: crate::proxy::Spares::default(),
            config,
        }
    }

    /// The pre-encoded head parts for requests from `group` to `upstream`.
    pub fn head_plan(&self, group: usize, upstream: usize) -> &HeadPlan {
        &self.head_plans[group * self.config.upstreams.len() + upstream]
    }

    /// The group a request path goes to: the first matching route, else the forward's group.
    pub fn route(&self, fwd: usize, path: &str) -> usize {
        self.routers[fwd]
            .find(path)
            .unwrap_or(self.config.forwards[fwd].default_group)
    }

    /// Picks an available member of `group` not in `tried`.
    pub fn pick(&self, group: usize, client: IpAddr, tried: &[usize]) -> Option<usize> {
        self.balancers.get(group)?.pick(self, client, tried)
    }

    /// Counts a request in flight to `upstream` until the guard drops, however the exchange
    /// ends.
    pub fn in_flight(&self, upstream: usize) -> InFlight<'_> {
        let c = &self.in_flight[upstream];
        c.set(c.get() + 1);
        InFlight(c)
    }

    /// Feeds one attempt's outcome to the upstream's breaker and latency EMA. An attempt that
    /// taught nothing (the client left first) is not counted, unless it was a half-open probe:
    /// then it counts as a failure, so an unanswered probe never closes a breaker.
    pub fn record(
        &self,
        upstream: usize,
        admission: Admission,
        outcome: Outcome,
        latency_to_head: Duration,
    ) {
        let outcome = match outcome {
            Outcome::Success => BreakerOutcome::Success,
            Outcome::Failure => BreakerOutcome::Failure,
            Outcome::Unknown if admission.is_probe() => BreakerOutcome::Failure,
            Outcome::Unknown => return,
        };
        self.health
            .record(upstream, admission, outcome, latency_to_head);
    }

    /// A uniform number in [0, 1) (jitter; not for anything secret).
    pub fn random_unit(&self) -> f64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl ShardCtx {
    /// May `upstream` be picked at `now`: its breaker admits calls and its rate limit has room.
    pub fn available_at(&self, upstream: usize, now: Instant) -> bool {
        self.health.is_available(upstream, now) && self.limits.upstream_would_admit(upstream, now)
    }
}

impl UpstreamView for ShardCtx {
    fn available(&self, upstream: usize) -> bool {
        self.available_at(upstream, Instant::now())
    }

    fn in_flight(&self, upstream: usize) -> u32 {
        self.in_flight[upstream].get()
    }

    fn latency_ms(&self, upstream: usize) -> f64 {
        self.health.latency_ms(upstream)
    }

    fn success_rate(&self, upstream: usize) -> f64 {
        self.health.success_rate(upstream)
    }
}

/// What an attempt says about the upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Connect error, timeout, broken response, 5xx (and 429 when it counts).
    Failure,
    /// Nothing learned (the client left before the upstream answered).
    Unknown,
}

/// Decrements the in-flight count exactly once, whichever way an exchange ends.
pub struct InFlight<'a>(&'a Cell<u32>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// The driver a shard ends up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedDriver {
    Uring,
    Epoll,
}

impl ResolvedDriver {
    pub fn name(self) -> &'static str {
        match self {
            ResolvedDriver::Uring => "io_uring",
            ResolvedDriver::Epoll => "epoll",
        }
    }
}

/// Chooses the driver once for the process: `auto` probes io_uring and falls back to epoll.
pub fn resolve_driver(d: Driver) -> ResolvedDriver {
    match d {
        Driver::Epoll => ResolvedDriver::Epoll,
        Driver::Uring => ResolvedDriver::Uring,
        Driver::Auto => {
            if std::env::var_os("MONOIO_FORCE_LEGACY_DRIVER").is_some() {
                return ResolvedDriver::Epoll;
            }
            if monoio::utils::detect_uring() {
                ResolvedDriver::Uring
            } else {
                tracing::warn!("io_uring is not available on this kernel; using epoll");
                ResolvedDriver::Epoll
            }
        }
    }
}

static URING_FALLBACK: Once = Once::new();

/// io_uring submission queue size per shard.
const URING_ENTRIES: u32 = 4096;

/// A ring mode: its name (logged) and how it sets up the ring builder.
type RingMode = (&'static str, fn(&mut io_uring::Builder));

/// How the shard's ring handles completions, best first; the first the kernel accepts is used.
///
/// By default the kernel interrupts a thread running in user space (a reschedule
/// inter-processor interrupt, expensive in a VM) to run io_uring completion work as soon as a
/// completion arrives. A shard is one thread that submits to and waits on its own ring and
/// enters the kernel whenever it runs out of work, so the interruption buys nothing:
/// `COOP_TASKRUN` (Linux 5.19+) leaves that work for the shard's next entry into the kernel.
/// (`DEFER_TASKRUN` with `SINGLE_ISSUER`, 6.1+, measured the same here and restricts the ring
/// to one submitting thread, so it is not used.) Older kernels get the default ring.
const RING_MODES: &[RingMode] = &[
    ("coop_taskrun", |b| {
        b.setup_coop_taskrun();
    }),
    ("default", |_| {}),
];

type UringRuntime = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;

/// An io_uring runtime for this thread, with the best ring mode the kernel accepts.
fn uring_runtime() -> std::io::Result<UringRuntime> {
    let mut last = None;
    for (name, setup) in RING_MODES {
        let mut urb = io_uring::IoUring::builder();
        setup(&mut urb);
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(urb)
            .with_entries(URING_ENTRIES)
            .enable_timer()
            .build()
        {
            Ok(rt) => {
                tracing::debug!(mode = name, "io_uring ring");
                return Ok(rt);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no io_uring ring mode")))
}

/// Runs one shard on the current thread until it has drained.
pub fn run_shard(
    id: usize,
    driver: ResolvedDriver,
    allow_fallback: bool,
    shared: Arc<Shared>,
    listeners: Vec<std::net::TcpListener>,
) -> std::io::Result<()> {
    let main = move || async move {
        let stats = Rc::new(ShardStats::new(id, &shared.config));
        let ctx = Rc::new(ShardCtx::new(id, &shared, stats));
        listener::serve(ctx, shared, listeners).await
    };
    if driver == ResolvedDriver::Uring {
        match uring_runtime() {
            Ok(mut rt) => return rt.block_on(main()),
            Err(e) if allow_fallback => URING_FALLBACK.call_once(|| {
                tracing::warn!(error = %e, "io_uring runtime could not start; using epoll");
            }),
            Err(e) => return Err(e),
        }
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()?;
    rt.block_on(main())
}

/// How often a shard checks the drain flag and sweeps its pool when no stats tick is due.
pub const HOUSEKEEPING: Duration = Duration::from_millis(50);

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
