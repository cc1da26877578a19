//! Listening sockets (startup) and the accept loop (shard).

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use super::{ShardCtx, Shared, HOUSEKEEPING};
use crate::proxy::serve_conn;
use crate::stats::{run_ticker_with, StopSignal};

/// Accept backlog per listening socket.
const BACKLOG: i32 = 4096;

/// Fails when another process (or another listener of ours) already holds `addr`. Shards bind
/// with SO_REUSEPORT, which would silently share a port with a second instance; this probe binds
/// without it so that case is a clear startup error instead.
pub fn probe_free(addr: SocketAddr) -> io::Result<()> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    Ok(())
}

/// One shard's listening socket for one forward (SO_REUSEPORT, non-blocking).
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// The shard's main task: accept on every forward until drained, then wait for open
/// connections to finish.
pub async fn serve(
    ctx: Rc<ShardCtx>,
    shared: Arc<Shared>,
    listeners: Vec<std::net::TcpListener>,
) -> io::Result<()> {
    let mut accepting = Vec::new();
    for (fwd, l) in listeners.into_iter().enumerate() {
        let l = monoio::net::TcpListener::from_std(l)?;
        accepting.push(monoio::spawn(accept_loop(ctx.clone(), fwd, l)));
    }
    let stop = StopSignal::new();
    let health = ctx.health.clone();
    let snapshots = shared.snapshots.get(ctx.id).cloned();
    let egress_updates = shared
        .egress_updates
        .as_ref()
        .and_then(|rx| rx.get(ctx.id).cloned());
    let tick_ctx = ctx.clone();
    let ticker = monoio::spawn(run_ticker_with(
        ctx.stats.clone(),
        shared.stats_tx.clone(),
        ctx.config.runtime.tick,
        stop.clone(),
        move || {
            if let Some(rx) = &snapshots {
                health.poll(rx);
            }
            if let Some(next) = egress_updates.as_ref().and_then(|rx| rx.try_recv().ok()) {
                *tick_ctx.egress.borrow_mut() = Rc::new((*next).clone());
            }
        },
    ));
    shared.health.shard_up();
    loop {
        monoio::time::sleep(HOUSEKEEPING).await;
        let config = &ctx.config;
        ctx.pool.sweep(|u| {
            config
                .groups
                .iter()
                .filter(|g| g.members.iter().any(|m| m.upstream == u))
                .map(|g| g.client.pool_idle_timeout)
                .max()
                .unwrap_or(Duration::from_secs(60))
        });
        if shared.is_draining() {
            break;
        }
    }
    shared.health.shard_down();
    ctx.drain.fire();
    for a in accepting {
        a.await;
    }
    ctx.pool.clear();
    while ctx.active.get() > 0 {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    // The last delta carries the requests that finished while draining.
    stop.trigger();
    ticker.await;
    Ok(())
}

async fn accept_loop(ctx: Rc<ShardCtx>, fwd: usize, listener: monoio::net::TcpListener) {
    loop {
        monoio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    monoio::spawn(serve_conn(ctx.clone(), fwd, stream, peer));
                }
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    tracing::warn!(error = %e, forward = %ctx.config.forwards[fwd].name, "accept failed");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = ctx.drain.wait() => break,
        }
    }
}
