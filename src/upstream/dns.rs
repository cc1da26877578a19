//! Resolving host names again while running (a thread of its own, never a shard). Every
//! `runtime.dns_refresh` the upstreams' and outbound proxies' names are looked up again (the
//! system resolver, blocking, here only); when a name's set of addresses changed, a new
//! [`Egress`] goes to every shard through its own [`SnapshotChannel`] (as the control thread's
//! snapshots do), and the shard adopts it on its next stats tick. New connections then use the new addresses; pooled ones stay until they close. A name
//! that does not resolve keeps its addresses (and is logged once per failure streak); one whose
//! addresses only came back in another order keeps its order.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::Receiver;

use super::connect::{resolve, Egress};
use crate::config::Config;
use crate::stats::SnapshotChannel;

/// A resolver: host and port to addresses in the order connections try them.
pub type Resolve<'a> = dyn Fn(&str, u16) -> Result<Box<[SocketAddr]>, String> + 'a;

/// What one round of [`refresh`] found.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// The new table, when some name's addresses changed.
    pub egress: Option<Egress>,
    /// One line per name whose addresses changed (for the log; no credentials).
    pub changed: Vec<String>,
    /// `(key, message)` per name that did not resolve this time (its addresses are kept).
    pub failed: Vec<(String, String)>,
}

/// A literal IP address needs no lookup.
fn is_literal(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
}

/// Whether any name in `egress` could resolve differently later.
pub fn has_names(cfg: &Config, egress: &Egress) -> bool {
    let upstreams = cfg
        .upstreams
        .iter()
        .zip(&egress.upstream_addrs)
        .any(|(u, a)| !a.is_empty() && !is_literal(&u.host));
    upstreams || egress.proxies.iter().any(|p| !is_literal(&p.proxy.host))
}

fn same_set(a: &[SocketAddr], b: &[SocketAddr]) -> bool {
    a.len() == b.len() && a.iter().collect::<HashSet<_>>() == b.iter().collect::<HashSet<_>>()
}

/// Looks every name of `current` up again with `resolve`.
pub fn refresh(cfg: &Config, current: &Egress, resolve: &Resolve<'_>) -> Refreshed {
    let mut out = Refreshed::default();
    let mut next = current.clone();
    let mut check =
        |key: String, what: String, host: &str, port: u16, addrs: &mut Box<[SocketAddr]>| {
            if is_literal(host) {
                return;
            }
            match resolve(host, port) {
                Ok(found) if !same_set(&found, addrs) => {
                    out.changed
                        .push(format!("{what}: {:?} -> {:?}", &addrs[..], &found[..]));
                    *addrs = found;
                }
                Ok(_) => {}
                Err(e) => out.failed.push((key, format!("{what}: {e}"))),
            }
        };
    for (i, (u, addrs)) in cfg
        .upstreams
        .iter()
        .zip(next.upstream_addrs.iter_mut())
        .enumerate()
    {
        // Empty: reached only through proxies, which resolve the name themselves.
        if !addrs.is_empty() {
            let what = format!("upstreams[{i}] {} ({})", u.name, u.host);
            check(format!("u{i}"), what, &u.host, u.port, addrs);
        }
    }
    for (i, p) in next.proxies.iter_mut().enumerate() {
        let what = format!("outbound proxy {}", p.proxy.display_url);
        check(
            format!("p{i}"),
            what,
            &p.proxy.host,
            p.proxy.port,
            &mut p.addrs,
        );
    }
    if !out.changed.is_empty() {
        out.egress = Some(next);
    }
    out
}

/// Starts the refresher when `runtime.dns_refresh` is on and some name is not a literal address.
/// Returns one receiver per shard (none when nothing will ever change).
pub fn spawn(
    cfg: Arc<Config>,
    egress: Egress,
    shards: usize,
) -> std::io::Result<Option<Vec<Receiver<Arc<Egress>>>>> {
    let every = cfg.runtime.dns_refresh;
    if every.is_zero() || !has_names(&cfg, &egress) {
        return Ok(None);
    }
    let slots: Vec<SnapshotChannel<Arc<Egress>>> =
        (0..shards).map(|_| SnapshotChannel::new()).collect();
    let rxs = slots.iter().map(|c| c.rx.clone()).collect();
    std::thread::Builder::new()
        .name("llmproxy-dns".into())
        .spawn(move || run(&cfg, Arc::new(egress), every, &slots, &resolve))?;
    Ok(Some(rxs))
}

fn run(
    cfg: &Config,
    mut current: Arc<Egress>,
    every: Duration,
    slots: &[SnapshotChannel<Arc<Egress>>],
    resolve: &Resolve<'_>,
) {
    let mut failing: HashSet<String> = HashSet::new();
    loop {
        std::thread::sleep(every);
        let r = refresh(cfg, &current, resolve);
        let now_failing: HashSet<String> = r.failed.iter().map(|(k, _)| k.clone()).collect();
        for (key, msg) in &r.failed {
            if !failing.contains(key) {
                tracing::warn!("host name did not resolve again; its addresses are kept: {msg}");
            }
        }
        for key in failing.difference(&now_failing) {
            tracing::info!(name = %key, "host name resolves again");
        }
        failing = now_failing;
        let Some(next) = r.egress else {
            tracing::debug!("host names resolved again, unchanged");
            continue;
        };
        for line in &r.changed {
            tracing::info!("upstream addresses changed: {line}");
        }
        current = Arc::new(next);
        for slot in slots {
            slot.publish(&current);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::testing::test_config;
    use std::cell::RefCell;

    fn addrs(list: &[&str]) -> Box<[SocketAddr]> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_changed_name_gets_its_new_addresses_and_the_rest_stay() {
        let mut cfg = test_config();
        cfg.upstreams[0].host = "a.example".into();
        cfg.upstreams[1].host = "b.example".into();
        cfg.upstreams[2].host = "10.0.0.3".into();
        let current = Egress {
            upstream_addrs: vec![
                addrs(&["10.0.0.1:80", "10.0.0.9:80"]),
                addrs(&["10.0.0.2:80"]),
                addrs(&["10.0.0.3:80"]),
            ],
            proxies: Vec::new(),
            group_via: vec![0; cfg.groups.len()],
        };
        assert!(has_names(&cfg, &current));
        let asked = RefCell::new(Vec::new());
        let answers = |host: &str, port: u16| -> Result<Box<[SocketAddr]>, String> {
            asked.borrow_mut().push(host.to_owned());
            match host {
                // The same set in another order: no change, the old order stays.
                "a.example" if port > 0 => Ok(addrs(&["10.0.0.9:80", "10.0.0.1:80"])),
                "b.example" => Ok(addrs(&["10.0.0.22:80"])),
                _ => Err("no such host".into()),
            }
        };
        let r = refresh(&cfg, &current, &answers);
        assert_eq!(
            *asked.borrow(),
            ["a.example", "b.example"],
            "literals are not looked up"
        );
        let next = r.egress.expect("b changed");
        assert_eq!(next.upstream_addrs[0], current.upstream_addrs[0]);
        assert_eq!(next.upstream_addrs[1], addrs(&["10.0.0.22:80"]));
        assert_eq!(next.upstream_addrs[2], current.upstream_addrs[2]);
        assert_eq!(r.changed.len(), 1);
        assert!(r.changed[0].contains("b.example"), "{:?}", r.changed);
        assert!(r.failed.is_empty());

        // Nothing new: no table to publish.
        let again = refresh(&cfg, &next, &answers);
        assert!(again.egress.is_none() && again.changed.is_empty());
    }

    #[test]
    fn a_name_that_stops_resolving_keeps_its_addresses() {
        let mut cfg = test_config();
        cfg.upstreams[0].host = "gone.example".into();
        let current = Egress {
            upstream_addrs: vec![addrs(&["10.0.0.1:80"]), Box::default(), Box::default()],
            proxies: Vec::new(),
            group_via: vec![0; cfg.groups.len()],
        };
        let r = refresh(&cfg, &current, &|_: &str, _: u16| {
            Err("timed out".to_string())
        });
        assert!(r.egress.is_none());
        assert_eq!(r.failed.len(), 1);
        assert!(r.failed[0].1.contains("gone.example") && r.failed[0].1.contains("timed out"));
    }

    #[test]
    fn only_literal_addresses_need_no_refresher() {
        let cfg = test_config();
        let egress = Egress {
            upstream_addrs: cfg
                .upstreams
                .iter()
                .map(|u| addrs(&[&format!("{}:{}", u.host, u.port)]))
                .collect(),
            proxies: Vec::new(),
            group_via: vec![0; cfg.groups.len()],
        };
        assert!(!has_names(&cfg, &egress));
    }
}
