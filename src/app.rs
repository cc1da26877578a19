//! Process lifecycle (startup and the main thread): config, listeners, shards, the control
//! thread, the admin listener, signals and drain.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admin;
use crate::cli::{Cli, DriverArg};
use crate::config::{self, Config, Driver};
use crate::shard::{self, listener, Shared};
use crate::stats;
use crate::upstream::connect::Egress;

/// Loads the config named on the command line, or the embedded default.
pub fn load_config(cli: &Cli) -> Result<Config, String> {
    let (source, res) = match &cli.config {
        Some(path) => (path.display().to_string(), config::load_file(path)),
        None => (
            "embedded config.default.yaml".to_string(),
            config::load_str(config::DEFAULT_YAML),
        ),
    };
    res.map_err(|errs| {
        let n = errs.0.len();
        format!(
            "configuration {source} has {n} error{}:\n{errs}",
            if n == 1 { "" } else { "s" }
        )
    })
}

fn init_logging(cli: &Cli) {
    let level = if cli.debug {
        "debug"
    } else {
        cli.log_level.as_str()
    };
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    if cli.json {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

/// Raises the soft open-file limit to the hard one, as nginx's `worker_rlimit_nofile` does:
/// every client and every upstream connection is a descriptor, and the soft limit a shell or
/// service manager hands out is often 1024, which a proxy exhausts at ~500 concurrent requests.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    let before = lim.rlim_cur;
    // An unlimited hard limit is not a valid soft one for descriptors: the kernel caps it at
    // fs.nr_open.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(1 << 20);
    for target in [lim.rlim_max, lim.rlim_max.min(nr_open)] {
        let new = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            tracing::info!(from = before, to = target, "raised the open-file limit");
            return;
        }
    }
    tracing::warn!(
        soft = before,
        hard = lim.rlim_max,
        "could not raise the open-file limit; connections beyond it will be refused"
    );
}

/// Warns at start about settings that weaken security, so they are never on unnoticed, and
/// about accepted settings that do nothing here (one line each, with every path it concerns).
fn warn_at_start(cfg: &Config) {
    if cfg.dialect == config::Dialect::GoPort {
        tracing::info!(
            "configuration is in llmproxy-go's dialect (camelCase keys, durations in milliseconds)"
        );
    }
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    for u in &cfg.upstreams {
        if u.tls.as_ref().is_some_and(|t| t.insecure_skip_verify) {
            tracing::warn!(
                upstream = %u.name,
                "tls.insecure_skip_verify is true: the upstream's certificate is not checked (encrypted, but anyone on the path can impersonate it)"
            );
        }
    }
}

/// Runs the proxy; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    init_logging(&cli);
    let mut cfg = match load_config(&cli) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("llmproxyd: {msg}");
            return ExitCode::from(1);
        }
    };
    if let Some(n) = cli.shards {
        cfg.runtime.shards = n as usize;
    }
    if let Some(d) = cli.driver {
        cfg.runtime.driver = match d {
            DriverArg::Auto => Driver::Auto,
            DriverArg::Uring => Driver::Uring,
            DriverArg::Epoll => Driver::Epoll,
        };
    }
    if let Some(s) = cli.shutdown_timeout {
        cfg.runtime.shutdown_timeout = Duration::from_secs(s);
    }
    let egress = match Egress::resolve(&cfg) {
        Ok(e) => e,
        Err(msg) => {
            eprintln!("llmproxyd: {msg}");
            return ExitCode::from(1);
        }
    };
    warn_at_start(&cfg);
    if cli.test {
        println!(
            "llmproxyd: configuration {} is valid",
            cli.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(embedded default)".into())
        );
        return ExitCode::SUCCESS;
    }
    match serve(cfg, egress) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("llmproxyd: {msg}");
            ExitCode::from(1)
        }
    }
}

fn shard_count(cfg: &Config) -> usize {
    if cfg.runtime.shards > 0 {
        return cfg.runtime.shards;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn serve(cfg: Config, egress: Egress) -> Result<ExitCode, String> {
    raise_open_file_limit();
    let signals = block_signals();
    let cfg = Arc::new(cfg);
    let shards = shard_count(&cfg);
    let driver = shard::resolve_driver(cfg.runtime.driver);

    // Listening sockets: probe each address without SO_REUSEPORT first, so a port held by
    // another process (or a second llmproxyd) fails loudly instead of being shared.
    for f in &cfg.forwards {
        listener::probe_free(f.listen)
            .map_err(|e| format!("forward {}: cannot listen on {}: {e}", f.name, f.listen))?;
    }
    let mut per_shard = Vec::with_capacity(shards);
    for _ in 0..shards {
        let mut ls = Vec::with_capacity(cfg.forwards.len());
        for f in &cfg.forwards {
            ls.push(
                listener::bind_reuseport(f.listen).map_err(|e| {
                    format!("forward {}: cannot listen on {}: {e}", f.name, f.listen)
                })?,
            );
        }
        per_shard.push(ls);
    }
    for f in &cfg.forwards {
        tracing::info!(
            forward = %f.name,
            listen = %f.listen,
            group = %cfg.groups[f.default_group].name,
            routes = f.routes.len(),
            tls = f.tls.is_some(),
            "forward listening"
        );
    }

    for (g, via) in cfg.groups.iter().zip(&egress.group_via) {
        if let Some(p) = egress.proxy(*via) {
            tracing::info!(
                group = %g.name,
                proxy = %p.proxy.display_url,
                addresses = ?p.addrs,
                credentials = p.proxy.authorization.is_some(),
                "upstreams reached through an outbound proxy"
            );
        }
    }

    let control = stats::spawn(cfg.clone(), 64.max(4 * shards), shards)
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    let health = Arc::new(admin::Health::new(shards));
    let admin = admin::spawn(cfg.clone(), control.merged(), health.clone())
        .map_err(|e| format!("admin: cannot listen on {}: {e}", cfg.admin.listen))?;
    tracing::info!(listen = %admin.local_addr(), "admin listening");
    let egress_updates = crate::upstream::dns::spawn(cfg.clone(), egress.clone(), shards)
        .map_err(|e| format!("cannot start the DNS refresher: {e}"))?;
    let shared = Arc::new(Shared {
        config: cfg.clone(),
        egress: Arc::new(egress),
        egress_updates,
        draining: AtomicBool::new(false),
        health: health.clone(),
        stats_tx: control.sender(),
        snapshots: (0..shards).map(|s| control.snapshot_receiver(s)).collect(),
        limits: Arc::new(crate::ratelimit::Limits::new(&cfg)),
    });
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut handles = Vec::with_capacity(shards);
    for (id, listeners) in per_shard.into_iter().enumerate() {
        let shared = shared.clone();
        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let allow_fallback = cfg.runtime.driver == Driver::Auto;
        let h = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                if let Err(e) = shard::run_shard(id, driver, allow_fallback, shared, listeners) {
                    tracing::error!(shard = id, error = %e, "shard failed");
                }
            })
            .map_err(|e| format!("cannot start shard thread: {e}"))?;
        handles.push(h);
    }
    tracing::info!(
        shards,
        driver = driver.name(),
        version = env!("CARGO_PKG_VERSION"),
        "llmproxyd started"
    );

    // Wait for the first signal, then drain.
    let first = signals
        .recv()
        .map_err(|_| "signal thread ended".to_string())?;
    let deadline = Instant::now() + cfg.runtime.shutdown_timeout;
    tracing::info!(
        signal = first,
        timeout_s = cfg.runtime.shutdown_timeout.as_secs(),
        "shutting down: no new connections; letting in-flight requests finish"
    );
    health.set_draining();
    shared.draining.store(true, Ordering::SeqCst);
    loop {
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!("shutdown timeout reached; closing remaining connections");
            return Ok(ExitCode::SUCCESS);
        }
        if let Ok(sig) = signals.recv_timeout(Duration::from_millis(20)) {
            tracing::warn!(signal = sig, "second signal: exiting now");
            return Ok(ExitCode::from(1));
        }
    }
    for h in handles {
        let _ = h.join();
    }
    control.shutdown();
    admin.shutdown();
    tracing::info!("shutdown complete");
    Ok(ExitCode::SUCCESS)
}

/// Blocks SIGINT/SIGTERM in this thread (and so in every thread spawned after) and delivers
/// them through a channel from a dedicated `sigwait` thread.
fn block_signals() -> crossbeam::channel::Receiver<i32> {
    // SAFETY: plain libc signal-mask calls on a zero-initialised sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let (tx, rx) = crossbeam::channel::unbounded();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set; sigwait writes one int.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 && tx.send(sig).is_err() {
                return;
            }
        })
        .expect("spawn signal thread");
    rx
}
