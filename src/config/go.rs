//! The llmproxy-go dialect (startup): the Go port's camelCase schema with every duration in
//! milliseconds, walked into the same validated [`Config`] as LLMProxy's snake_case schema.
//! Errors carry the paths the user wrote (`httpServer.forwards[0].ratelimit.perSecond`) and
//! camelCase suggestions; keys that are accepted but do less here than their name says become
//! start-up warnings (see README, "LLMProxy Go port compatibility").

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_yaml::Value;

use super::defaults::{self as d, go as g};
use super::model::*;
use super::validate::{self as v, TlsConfigs, UpstreamParts};
use super::walk::{Ctx, Obj};

const TOP_KEYS: &[&str] = &["httpServer", "upstreams", "upstreamGroups", "runtime"];
const HTTP_SERVER_KEYS: &[&str] = &["forwards", "admin"];
const FORWARD_KEYS: &[&str] = &[
    "name",
    "port",
    "address",
    "defaultGroup",
    "ratelimit",
    "timeout",
];
const RATELIMIT_KEYS: &[&str] = &["perSecond", "burst"];
/// The Go port's one timeout struct, used by forwards, admin and `httpClient`: every key parses
/// everywhere, whether or not the Go port uses it there.
const TIMEOUT_KEYS: &[&str] = &["idle", "read", "write", "connect", "request"];
const ADMIN_KEYS: &[&str] = &["port", "address", "timeout"];
const UPSTREAM_KEYS: &[&str] = &["name", "url", "auth", "headers", "breaker", "ratelimit"];
const BREAKER_KEYS: &[&str] = &["threshold", "cooldown", "maxRequests", "interval"];
const GROUP_KEYS: &[&str] = &["name", "upstreams", "balance", "httpClient"];
const CLIENT_KEYS: &[&str] = &["agent", "keepalive", "connect", "timeout", "proxy"];
const CONNECT_KEYS: &[&str] = &["idleTotal", "idlePerHost", "maxPerHost"];
const PROXY_KEYS: &[&str] = &["url"];

/// Every key list of this dialect (for the README/test cross-check).
#[cfg(test)]
pub(crate) const ALL_KEYS: &[&[&str]] = &[
    TOP_KEYS,
    HTTP_SERVER_KEYS,
    FORWARD_KEYS,
    RATELIMIT_KEYS,
    TIMEOUT_KEYS,
    ADMIN_KEYS,
    UPSTREAM_KEYS,
    v::AUTH_KEYS,
    v::HEADER_KEYS,
    BREAKER_KEYS,
    GROUP_KEYS,
    v::MEMBER_KEYS,
    v::BALANCE_KEYS,
    CLIENT_KEYS,
    CONNECT_KEYS,
    PROXY_KEYS,
];

// Start-up warnings: accepted keys that do not do here what they did in the Go port.
const WRITE_NOT_APPLIED: &str = "accepted, not applied: in the Go port this timeout ends the whole response, which cuts long generations; here an answer streams for as long as the upstream sends, and a client that stops reading is cut after `timeout.idle` without progress";
const ADMIN_ONE_TIMEOUT: &str = "accepted, not applied: the admin listener has one timeout, `timeout.read` (time to send a request head, also its keep-alive idle limit)";
const UNUSED_BY_GO: &str =
    "accepted, no effect (the Go port does not use this key in this place either)";
const IDLE_TOTAL_NOT_APPLIED: &str = "accepted, not applied: idle upstream connections are capped per upstream and shard (`connect.idlePerHost`), not in total";
const MAX_PER_HOST_NOT_APPLIED: &str = "accepted, not applied: connections per upstream are not capped here (a request never waits for a free connection; `upstreams[].ratelimit` caps the request rate)";
const QUERY_WITHOUT_PATH: &str = "the URL's query is not sent: as in the Go port, an upstream URL without a path keeps the client's path and query";

/// The Go port's schema for the shared walk.
pub(crate) const GO: v::Schema = v::Schema {
    dialect: Dialect::GoPort,
    top_keys: TOP_KEYS,
    http_server: "httpServer",
    http_server_keys: HTTP_SERVER_KEYS,
    forward_keys: FORWARD_KEYS,
    admin_keys: ADMIN_KEYS,
    upstream_keys: UPSTREAM_KEYS,
    groups: "upstreamGroups",
    group_keys: GROUP_KEYS,
    client: "httpClient",
    client_keys: CLIENT_KEYS,
    listen,
    forward,
    admin,
    upstream,
    http_client,
};

/// An integer in `range` (`unit` is appended to the range in messages). Absent or 0 gives
/// `default`: the Go port fills zero values with defaults.
fn int(
    ctx: &mut Ctx,
    o: Option<&Obj>,
    key: &str,
    default: u64,
    range: (u64, u64),
    unit: &str,
) -> u64 {
    let Some(o) = o else {
        return default;
    };
    match o.opt_u64(ctx, key, (0, u64::MAX)) {
        None => default,
        Some(0) => default,
        Some(n) if n < range.0 || n > range.1 => {
            // Durations copied from the snake_case dialect are in seconds.
            let hint = if unit == " ms" && n < range.0 && (range.0..=range.1).contains(&(n * 1000))
            {
                format!(
                    "; durations are milliseconds here (did you mean {}?)",
                    n * 1000
                )
            } else {
                String::new()
            };
            ctx.error(
                &o.child(key),
                format!("{n} is out of range {}–{}{unit}{hint}", range.0, range.1),
            );
            default
        }
        Some(n) => n,
    }
}

/// A duration in milliseconds (0 or absent: `default_ms`).
fn ms(ctx: &mut Ctx, o: Option<&Obj>, key: &str, default_ms: u64, range: (u64, u64)) -> Duration {
    Duration::from_millis(int(ctx, o, key, default_ms, range, " ms"))
}

/// Whether `key` is set to something other than the zero value (which means "default").
fn set(o: Option<&Obj>, key: &str) -> bool {
    o.and_then(|o| o.get(key)).is_some_and(|v| match v {
        Value::Number(n) => n.as_u64() != Some(0),
        Value::String(s) => s.trim() != "0",
        _ => true,
    })
}

/// Validates a key that has no effect here, and warns when it is set.
fn accepted_ms(ctx: &mut Ctx, o: Option<&Obj>, key: &str, warning: &'static str) {
    ms(ctx, o, key, 0, g::TIMEOUT_RANGE_MS);
    if let (true, Some(o)) = (set(o, key), o) {
        ctx.warn(&o.child(key), warning);
    }
}

/// A forward's address: `port` is required, 0 included (the Go port has no default for it).
fn listen(ctx: &mut Ctx, o: &Obj) -> SocketAddr {
    if !set(Some(o), "port") {
        ctx.error(&o.child("port"), "missing required key `port` (1–65535)");
    }
    v::listen_addr(ctx, o, d::FORWARD_PORT)
}

fn forward(
    ctx: &mut Ctx,
    o: &Obj,
    listen: SocketAddr,
    groups: &HashMap<String, usize>,
) -> Option<Forward> {
    let name = o.req_str(ctx, "name");
    let default_group = o.req_str(ctx, "defaultGroup").map_or(0, |gname| {
        v::resolve_group(ctx, &o.child("defaultGroup"), &gname, groups, "forward")
    });
    // Present: on, with the documented defaults. Absent: off (as the Go port documents).
    let ratelimit = o.obj(ctx, "ratelimit", RATELIMIT_KEYS).map(|r| {
        let r = Some(&r);
        ForwardRateLimit {
            per_second: int(
                ctx,
                r,
                "perSecond",
                g::FORWARD_RATELIMIT_PER_SECOND,
                g::RATELIMIT_RANGE,
                "",
            ) as u32,
            burst: int(
                ctx,
                r,
                "burst",
                g::FORWARD_RATELIMIT_BURST,
                g::RATELIMIT_RANGE,
                "",
            ) as u32,
        }
    });
    let t = o.obj(ctx, "timeout", TIMEOUT_KEYS);
    let t = t.as_ref();
    // `read` (Go: the whole request must arrive within it) → the time to send the request head
    // and the longest gap while sending its body.
    let header_timeout = ms(ctx, t, "read", g::SERVER_READ_MS, g::TIMEOUT_RANGE_MS);
    let idle_timeout = ms(ctx, t, "idle", g::SERVER_IDLE_MS, g::TIMEOUT_RANGE_MS);
    accepted_ms(ctx, t, "write", WRITE_NOT_APPLIED);
    accepted_ms(ctx, t, "connect", UNUSED_BY_GO);
    accepted_ms(ctx, t, "request", UNUSED_BY_GO);
    Some(Forward {
        name: name?,
        listen,
        default_group,
        ratelimit,
        header_timeout,
        idle_timeout,
        routes: Vec::new(),
        max_body_bytes: d::MAX_BODY_BYTES,
        max_head_bytes: d::MAX_HEAD_BYTES as usize,
        tls: None,
    })
}

fn admin(ctx: &mut Ctx, o: Option<&Obj>) -> Admin {
    let listen = match o {
        Some(o) => v::listen_addr(ctx, o, d::ADMIN_PORT),
        None => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), d::ADMIN_PORT),
    };
    let t = o.and_then(|o| o.obj(ctx, "timeout", TIMEOUT_KEYS));
    let t = t.as_ref();
    let header_timeout = ms(ctx, t, "read", g::SERVER_READ_MS, g::TIMEOUT_RANGE_MS);
    accepted_ms(ctx, t, "idle", ADMIN_ONE_TIMEOUT);
    accepted_ms(ctx, t, "write", ADMIN_ONE_TIMEOUT);
    accepted_ms(ctx, t, "connect", UNUSED_BY_GO);
    accepted_ms(ctx, t, "request", UNUSED_BY_GO);
    Admin {
        listen,
        header_timeout,
    }
}

fn upstream(ctx: &mut Ctx, o: &Obj, tls_configs: &mut TlsConfigs) -> Option<Upstream> {
    let name = o.req_str(ctx, "name");
    let raw = o.req_str(ctx, "url").map(|u| u.trim().to_owned());
    let url_path = o.child("url");
    let (parsed, replace_path) = match &raw {
        Some(raw) => go_url(ctx, &url_path, raw),
        None => (None, None),
    };
    let auth = v::auth(ctx, o);
    let headers = v::header_ops(ctx, o);
    let b = o.obj(ctx, "breaker", BREAKER_KEYS);
    let breaker = breaker(ctx, b.as_ref());
    // Present: on (perSecond 100 unless given, a one-second burst unless given). Absent: off.
    let ratelimit = o.obj(ctx, "ratelimit", RATELIMIT_KEYS).map(|r| {
        let r = Some(&r);
        let per_second = int(
            ctx,
            r,
            "perSecond",
            g::UPSTREAM_RATELIMIT_PER_SECOND,
            g::RATELIMIT_RANGE,
            "",
        );
        let burst = int(ctx, r, "burst", per_second, g::RATELIMIT_RANGE, "");
        UpstreamRateLimit {
            per_second: per_second as u32,
            burst: burst as u32,
        }
    });
    let tls = match &parsed {
        Some(p) if p.scheme == Scheme::Https => {
            v::upstream_tls(ctx, None, &p.host, &url_path, tls_configs)
        }
        _ => None,
    };
    UpstreamParts {
        name,
        url: raw,
        parsed,
        auth,
        headers,
        breaker,
        ratelimit,
        replace_path,
        tls,
    }
    .finish()
}

/// The Go port's URL rule: a URL with a path (other than `/`) is the request target, its query
/// (if any) replacing the client's; a URL without one keeps the client's path and query.
fn go_url(
    ctx: &mut Ctx,
    path: &str,
    raw: &str,
) -> (Option<super::url::ParsedUrl>, Option<ReplacePath>) {
    let (base, query) = match raw.split_once('?') {
        Some((b, q)) => (b, Some(q).filter(|q| !q.is_empty())),
        None => (raw, None),
    };
    if let Some(q) = query {
        if let Some(c) = q
            .chars()
            .find(|c| *c == '#' || c.is_whitespace() || c.is_control())
        {
            ctx.error(
                path,
                format!("the URL's query contains an invalid character {c:?}"),
            );
            return (None, None);
        }
    }
    let Some(parsed) = v::upstream_url(ctx, path, base) else {
        return (None, None);
    };
    if parsed.path.is_empty() || parsed.path == "/" {
        if query.is_some() {
            ctx.warn(path, QUERY_WITHOUT_PATH);
        }
        return (Some(parsed), None);
    }
    let replace = ReplacePath {
        path: parsed.path.clone(),
        query: query.map(str::to_owned),
    };
    (Some(parsed), Some(replace))
}

/// `breaker`: present = on (Go defaults for what is not given), absent = off, as the Go port
/// documents. Trips, like gobreaker, at ≥ 10 requests in the window at ≥ `threshold` failures.
fn breaker(ctx: &mut Ctx, b: Option<&Obj>) -> Breaker {
    let threshold = match b {
        None => g::BREAKER_THRESHOLD,
        Some(b) => {
            let n = b.f64(
                ctx,
                "threshold",
                g::BREAKER_THRESHOLD,
                (f64::NEG_INFINITY, f64::INFINITY),
            );
            let (lo, hi) = d::BREAKER_THRESHOLD_RANGE;
            if n == 0.0 {
                g::BREAKER_THRESHOLD
            } else if !(lo..=hi).contains(&n) {
                ctx.error(
                    &b.child("threshold"),
                    format!("{n} is out of range {lo}–{hi}"),
                );
                g::BREAKER_THRESHOLD
            } else {
                n
            }
        }
    };
    Breaker {
        enabled: b.is_some(),
        threshold,
        cooldown: ms(
            ctx,
            b,
            "cooldown",
            g::BREAKER_COOLDOWN_MS,
            g::BREAKER_COOLDOWN_RANGE_MS,
        ),
        max_requests: int(
            ctx,
            b,
            "maxRequests",
            g::BREAKER_MAX_REQUESTS,
            d::BREAKER_MAX_REQUESTS_RANGE,
            "",
        ) as u32,
        interval: ms(
            ctx,
            b,
            "interval",
            g::BREAKER_INTERVAL_MS,
            g::BREAKER_INTERVAL_RANGE_MS,
        ),
        min_requests: d::BREAKER_MIN_REQUESTS as u32,
        consecutive_failures: d::BREAKER_CONSECUTIVE_FAILURES as u32,
        count_429: d::BREAKER_COUNT_429,
    }
}

/// `httpClient`.
fn http_client(ctx: &mut Ctx, c: Option<&Obj>) -> HttpClient {
    let agent = v::agent(ctx, c);
    // 0 is "off" here, not "default": no TCP keepalive and no reuse of upstream connections
    // (the Go port then sends `Connection: close`).
    let written_zero = c.is_some_and(|c| c.has("keepalive")) && !set(c, "keepalive");
    let keepalive = if written_zero {
        0
    } else {
        int(
            ctx,
            c,
            "keepalive",
            g::KEEPALIVE_MS,
            g::KEEPALIVE_RANGE_MS,
            " ms",
        )
    };
    let conn = c.and_then(|c| c.obj(ctx, "connect", CONNECT_KEYS));
    let conn = conn.as_ref();
    let idle_per_host = int(
        ctx,
        conn,
        "idlePerHost",
        g::IDLE_PER_HOST,
        g::IDLE_PER_HOST_RANGE,
        "",
    );
    for (key, default, range, warning) in [
        (
            "idleTotal",
            g::IDLE_TOTAL,
            g::IDLE_TOTAL_RANGE,
            IDLE_TOTAL_NOT_APPLIED,
        ),
        (
            "maxPerHost",
            g::MAX_PER_HOST,
            g::MAX_PER_HOST_RANGE,
            MAX_PER_HOST_NOT_APPLIED,
        ),
    ] {
        int(ctx, conn, key, default, range, "");
        if let (true, Some(o)) = (set(conn, key), conn) {
            ctx.warn(&o.child(key), warning);
        }
    }

    let t = c.and_then(|c| c.obj(ctx, "timeout", TIMEOUT_KEYS));
    let t = t.as_ref();
    let connect = ms(
        ctx,
        t,
        "connect",
        g::CONNECT_TIMEOUT_MS,
        g::TIMEOUT_RANGE_MS,
    );
    let request = ms(
        ctx,
        t,
        "request",
        g::REQUEST_TIMEOUT_MS,
        g::TIMEOUT_RANGE_MS,
    );
    let idle = ms(ctx, t, "idle", g::POOL_IDLE_TIMEOUT_MS, g::TIMEOUT_RANGE_MS);
    accepted_ms(ctx, t, "read", UNUSED_BY_GO);
    accepted_ms(ctx, t, "write", UNUSED_BY_GO);

    let proxy = c
        .and_then(|c| c.obj(ctx, "proxy", PROXY_KEYS))
        .and_then(|p| v::proxy(ctx, &p));

    HttpClient {
        agent,
        // The kernel counts keepalive idle time in whole seconds; rounded up, as Go does.
        tcp_keepalive: (keepalive > 0).then(|| Duration::from_secs(keepalive.div_ceil(1000))),
        stream: d::STREAM,
        connect_timeout: connect,
        request_timeout: request,
        first_byte_timeout: request,
        stream_idle_timeout: Duration::from_secs(d::STREAM_IDLE_TIMEOUT_S),
        pool_idle_timeout: idle,
        pool_max_idle: if keepalive == 0 {
            0
        } else {
            idle_per_host as usize
        },
        retry: None,
        proxy,
    }
}
