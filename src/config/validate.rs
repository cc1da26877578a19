//! Schema walk (startup): the expanded YAML tree → validated [`Config`], reporting every problem
//! (types, required keys, ranges, unknown keys, cross references) with its YAML path. The walk
//! and the parts both dialects share live here with LLMProxy's snake_case readers; the Go
//! port's readers are in `go.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde_yaml::Value;

use super::defaults as d;
use super::model::*;
use super::url;
use super::walk::{describe, index_path, Ctx, Obj};

const TOP_KEYS: &[&str] = &["http_server", "upstreams", "upstream_groups", "runtime"];
const HTTP_SERVER_KEYS: &[&str] = &["forwards", "admin"];
const FORWARD_KEYS: &[&str] = &[
    "name",
    "port",
    "address",
    "upstream_group",
    "default_group",
    "ratelimit",
    "timeout",
    "routing",
    "limits",
    "tls",
];
const FORWARD_TLS_KEYS: &[&str] = &["cert_file", "key_file"];
const FORWARD_RATELIMIT_KEYS: &[&str] = &["enabled", "per_second", "burst"];
const FORWARD_TIMEOUT_KEYS: &[&str] = &["connect", "idle"];
const ROUTE_KEYS: &[&str] = &["path", "target_group"];
const LIMITS_KEYS: &[&str] = &["max_body_bytes", "max_head_bytes"];
const ADMIN_KEYS: &[&str] = &["port", "address", "timeout"];
const ADMIN_TIMEOUT_KEYS: &[&str] = &["connect"];
const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "url",
    "weight",
    "auth",
    "headers",
    "breaker",
    "http_client",
    "ratelimit",
    "tls",
];
const UPSTREAM_TLS_KEYS: &[&str] = &["ca_file", "insecure_skip_verify"];
pub(super) const AUTH_KEYS: &[&str] = &["type", "token", "username", "password"];
pub(super) const HEADER_KEYS: &[&str] = &["op", "key", "value"];
const BREAKER_KEYS: &[&str] = &[
    "enabled",
    "threshold",
    "cooldown",
    "max_requests",
    "interval",
    "min_requests",
    "consecutive_failures",
    "count_429",
];
const UPSTREAM_RATELIMIT_KEYS: &[&str] = &["per_second"];
const GROUP_KEYS: &[&str] = &["name", "upstreams", "balance", "http_client"];
pub(super) const MEMBER_KEYS: &[&str] = &["name", "weight"];
pub(super) const BALANCE_KEYS: &[&str] = &["strategy"];
const CLIENT_KEYS: &[&str] = &[
    "agent",
    "keepalive",
    "stream",
    "stream_mode",
    "timeout",
    "pool",
    "retry",
    "proxy",
];
const CLIENT_TIMEOUT_KEYS: &[&str] = &["connect", "request", "first_byte", "stream_idle", "idle"];
const POOL_KEYS: &[&str] = &["max_idle"];
const RETRY_KEYS: &[&str] = &["enabled", "attempts", "initial", "max_body_bytes"];
const PROXY_KEYS: &[&str] = &["enabled", "url"];
pub(super) const RUNTIME_KEYS: &[&str] = &[
    "shards",
    "driver",
    "tick_ms",
    "shutdown_timeout",
    "dns_refresh",
];

/// Every key list, so a test can check that `config.default.yaml` documents each key.
#[cfg(test)]
pub(crate) const ALL_KEYS: &[&[&str]] = &[
    TOP_KEYS,
    HTTP_SERVER_KEYS,
    FORWARD_KEYS,
    FORWARD_TLS_KEYS,
    FORWARD_RATELIMIT_KEYS,
    FORWARD_TIMEOUT_KEYS,
    ROUTE_KEYS,
    LIMITS_KEYS,
    ADMIN_KEYS,
    ADMIN_TIMEOUT_KEYS,
    UPSTREAM_KEYS,
    UPSTREAM_TLS_KEYS,
    AUTH_KEYS,
    HEADER_KEYS,
    BREAKER_KEYS,
    UPSTREAM_RATELIMIT_KEYS,
    GROUP_KEYS,
    MEMBER_KEYS,
    BALANCE_KEYS,
    CLIENT_KEYS,
    CLIENT_TIMEOUT_KEYS,
    POOL_KEYS,
    RETRY_KEYS,
    PROXY_KEYS,
    RUNTIME_KEYS,
];

const STRATEGIES: &[(&str, Strategy)] = &[
    ("roundrobin", Strategy::RoundRobin),
    ("weighted_roundrobin", Strategy::WeightedRoundRobin),
    ("random", Strategy::Random),
    ("response_aware", Strategy::ResponseAware),
    ("failover", Strategy::Failover),
    ("iphash", Strategy::IpHash),
    ("least_requests", Strategy::LeastRequests),
];
const DRIVERS: &[(&str, Driver)] = &[
    ("auto", Driver::Auto),
    ("uring", Driver::Uring),
    ("epoll", Driver::Epoll),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum AuthType {
    None,
    Bearer,
    Basic,
}
const AUTH_TYPES: &[(&str, AuthType)] = &[
    ("none", AuthType::None),
    ("bearer", AuthType::Bearer),
    ("basic", AuthType::Basic),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Replace,
    Remove,
}
const OPS: &[(&str, Option<Op>)] = &[
    ("insert", Some(Op::Insert)),
    ("replace", Some(Op::Replace)),
    ("remove", Some(Op::Remove)),
];

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Names declared in a top-level list, first occurrence wins (duplicates are reported elsewhere).
pub(super) fn names_of(root: &Value, key: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    if let Some(Value::Sequence(items)) = root.get(key) {
        for (i, item) in items.iter().enumerate() {
            if let Some(name) = item.get("name").and_then(super::walk::scalar_text) {
                out.entry(name).or_insert(i);
            }
        }
    }
    out
}

/// What differs between the two dialects at the level of the whole file: the key names, and
/// the readers of the parts whose keys, units or defaults differ. The walk itself is shared.
pub(crate) struct Schema {
    pub dialect: Dialect,
    pub top_keys: &'static [&'static str],
    /// `http_server` / `httpServer`.
    pub http_server: &'static str,
    pub http_server_keys: &'static [&'static str],
    pub forward_keys: &'static [&'static str],
    pub admin_keys: &'static [&'static str],
    pub upstream_keys: &'static [&'static str],
    /// `upstream_groups` / `upstreamGroups`.
    pub groups: &'static str,
    pub group_keys: &'static [&'static str],
    /// `http_client` / `httpClient`.
    pub client: &'static str,
    pub client_keys: &'static [&'static str],
    pub listen: fn(&mut Ctx, &Obj) -> SocketAddr,
    pub forward: fn(&mut Ctx, &Obj, SocketAddr, &HashMap<String, usize>) -> Option<Forward>,
    pub admin: fn(&mut Ctx, Option<&Obj>) -> Admin,
    pub upstream: fn(&mut Ctx, &Obj, &mut TlsConfigs) -> Option<Upstream>,
    pub http_client: fn(&mut Ctx, Option<&Obj>) -> HttpClient,
}

/// LLMProxy's snake_case schema.
pub(crate) const LLMPROXY: Schema = Schema {
    dialect: Dialect::LlmProxy,
    top_keys: TOP_KEYS,
    http_server: "http_server",
    http_server_keys: HTTP_SERVER_KEYS,
    forward_keys: FORWARD_KEYS,
    admin_keys: ADMIN_KEYS,
    upstream_keys: UPSTREAM_KEYS,
    groups: "upstream_groups",
    group_keys: GROUP_KEYS,
    client: "http_client",
    client_keys: CLIENT_KEYS,
    listen: |ctx, o| listen_addr(ctx, o, d::FORWARD_PORT),
    forward,
    admin: admin_block,
    upstream,
    http_client,
};

/// Walks the whole tree. The result is only meaningful when `ctx` collected no error.
pub(crate) fn build(root: &Value, ctx: &mut Ctx, s: &Schema) -> Option<Config> {
    let top = match root {
        Value::Null => {
            ctx.error("", "the configuration is empty");
            return None;
        }
        _ => Obj::new(ctx, Some(root), String::new(), s.top_keys)?,
    };
    let upstream_names = names_of(root, "upstreams");
    let group_names = names_of(root, s.groups);

    let (forwards, admin) = match top.obj(ctx, s.http_server, s.http_server_keys) {
        Some(hs) => http_server(ctx, &hs, &group_names, s),
        None => {
            if !top.has(s.http_server) {
                ctx.error(
                    s.http_server,
                    format!("missing required key `{}`", s.http_server),
                );
            }
            (Vec::new(), (s.admin)(ctx, None))
        }
    };

    // Upstreams with the same TLS settings share one client config (and so its session cache).
    let mut tls_configs = HashMap::new();
    let upstreams = list(ctx, &top, "upstreams", s.upstream_keys, |ctx, o| {
        (s.upstream)(ctx, o, &mut tls_configs)
    });
    unique_names(ctx, &top, "upstreams", "upstream");
    let groups = list(ctx, &top, s.groups, s.group_keys, |ctx, o| {
        group(ctx, o, &upstream_names, s)
    });
    unique_names(ctx, &top, s.groups, "upstream group");

    // `runtime` is our extension and reads the same in both dialects.
    let rt = top.obj(ctx, "runtime", RUNTIME_KEYS);
    let runtime = runtime(ctx, rt.as_ref());

    Some(Config {
        forwards,
        admin,
        upstreams,
        groups,
        runtime,
        dialect: s.dialect,
        warnings: Vec::new(),
    })
}

/// A required, non-empty top-level list of mappings.
pub(super) fn list<T>(
    ctx: &mut Ctx,
    parent: &Obj,
    key: &str,
    known: &[&str],
    mut f: impl FnMut(&mut Ctx, &Obj) -> Option<T>,
) -> Vec<T> {
    let path = parent.child(key);
    let Some(items) = parent.seq(ctx, key) else {
        if !parent.has(key) {
            ctx.error(
                &path,
                format!("missing required key `{key}` (at least one entry)"),
            );
        }
        return Vec::new();
    };
    if items.is_empty() {
        ctx.error(&path, "must have at least one entry");
    }
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let p = index_path(&path, i);
            match item {
                Value::Mapping(_) => Obj::new(ctx, Some(item), p, known).and_then(|o| f(ctx, &o)),
                other => {
                    ctx.error(&p, format!("expected a mapping, found {}", describe(other)));
                    None
                }
            }
        })
        .collect()
}

pub(super) fn unique_names(ctx: &mut Ctx, parent: &Obj, key: &str, what: &str) {
    let Some(Value::Sequence(items)) = parent.get(key) else {
        return;
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        if let Some(name) = item.get("name").and_then(super::walk::scalar_text) {
            if let Some(first) = seen.get(&name) {
                ctx.error(
                    &format!("{}.name", index_path(&parent.child(key), i)),
                    format!(
                        "duplicate {what} name `{name}` (first defined at {}[{first}])",
                        parent.child(key)
                    ),
                );
            } else {
                seen.insert(name, i);
            }
        }
    }
}

pub(super) fn resolve_group(
    ctx: &mut Ctx,
    path: &str,
    name: &str,
    groups: &HashMap<String, usize>,
    what: &str,
) -> usize {
    match groups.get(name) {
        Some(i) => *i,
        None => {
            let names: Vec<&str> = groups.keys().map(String::as_str).collect();
            let hint = super::walk::suggest(name, &names)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            ctx.error(
                path,
                format!("{what} references unknown upstream group `{name}`{hint}"),
            );
            0
        }
    }
}

fn http_server(
    ctx: &mut Ctx,
    hs: &Obj,
    groups: &HashMap<String, usize>,
    s: &Schema,
) -> (Vec<Forward>, Admin) {
    // Listeners whose address and port were valid, for the conflict check (an invalid port was
    // replaced by the default and must not cause a second, made-up error).
    let mut listens: Vec<(SocketAddr, String)> = Vec::new();
    let forwards = list(ctx, hs, "forwards", s.forward_keys, |ctx, o| {
        let before = ctx.errors.len();
        let listen = (s.listen)(ctx, o);
        if ctx.errors.len() == before {
            listens.push((listen, o.path.clone()));
        }
        (s.forward)(ctx, o, listen, groups)
    });
    unique_names(ctx, hs, "forwards", "forward");
    let admin_obj = hs.obj(ctx, "admin", s.admin_keys);
    let before = ctx.errors.len();
    let admin = (s.admin)(ctx, admin_obj.as_ref());
    if ctx.errors.len() == before {
        listens.push((admin.listen, hs.child("admin")));
    }
    // Reports every listener whose address an earlier one (forward or admin) already uses.
    for (i, (addr, path)) in listens.iter().enumerate() {
        if let Some((_, other)) = listens[..i].iter().find(|(a, _)| a == addr) {
            ctx.error(
                &format!("{path}.port"),
                format!("listen address {addr} is already used by {other}"),
            );
        }
    }
    (forwards, admin)
}

/// `address` + `port` → a socket address; names other than `localhost` are resolved now.
pub(super) fn listen_addr(ctx: &mut Ctx, o: &Obj, default_port: u16) -> SocketAddr {
    // The Go port fills a zero port with the default (a forward's `port` is required there,
    // which its reader checks first).
    let go_zero =
        ctx.dialect == Dialect::GoPort && o.get("port").and_then(Value::as_u64) == Some(0);
    let port = if go_zero {
        default_port
    } else {
        o.u64(ctx, "port", u64::from(default_port), (1, 65_535)) as u16
    };
    let address = o
        .opt_str(ctx, "address")
        .unwrap_or_else(|| d::LISTEN_ADDRESS.to_owned());
    let a = address.trim();
    let bare = a
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(a);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return SocketAddr::new(ip, port);
    }
    if a.eq_ignore_ascii_case("localhost") {
        return SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    }
    let fallback = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    if a.is_empty() {
        ctx.error(&o.child("address"), "must not be empty");
        return fallback;
    }
    match (a, port).to_socket_addrs().map(|mut it| it.next()) {
        Ok(Some(addr)) => addr,
        _ => {
            ctx.error(
                &o.child("address"),
                format!("`{a}` is not an IP address and does not resolve"),
            );
            fallback
        }
    }
}

fn forward(
    ctx: &mut Ctx,
    o: &Obj,
    listen: SocketAddr,
    groups: &HashMap<String, usize>,
) -> Option<Forward> {
    let name = o.req_str(ctx, "name");

    let ug = o.opt_str(ctx, "upstream_group");
    let dg = o.opt_str(ctx, "default_group");
    let group_name = match (ug, dg) {
        (Some(a), Some(b)) if a != b => {
            ctx.error(
                &o.child("default_group"),
                format!("`default_group` (`{b}`) and its alias `upstream_group` (`{a}`) disagree; keep one"),
            );
            None
        }
        (Some(a), _) => Some((a, o.child("upstream_group"))),
        (None, Some(b)) => Some((b, o.child("default_group"))),
        (None, None) => {
            if !o.has("upstream_group") && !o.has("default_group") {
                ctx.error(
                    &o.child("upstream_group"),
                    "missing required key `upstream_group` (or its alias `default_group`)",
                );
            }
            None
        }
    };
    let default_group = match group_name {
        Some((g, path)) if g.trim().is_empty() => {
            ctx.error(&path, "must not be empty");
            0
        }
        Some((g, path)) => resolve_group(ctx, &path, &g, groups, "forward"),
        None => 0,
    };

    let ratelimit = o
        .obj(ctx, "ratelimit", FORWARD_RATELIMIT_KEYS)
        .and_then(|r| {
            let enabled = r.bool(ctx, "enabled", d::FORWARD_RATELIMIT_ENABLED);
            let per_second = r.u64(
                ctx,
                "per_second",
                d::FORWARD_RATELIMIT_PER_SECOND,
                d::FORWARD_RATELIMIT_PER_SECOND_RANGE,
            );
            let burst = r.u64(
                ctx,
                "burst",
                d::FORWARD_RATELIMIT_BURST,
                d::FORWARD_RATELIMIT_BURST_RANGE,
            );
            if burst < per_second {
                ctx.error(
                    &r.child("burst"),
                    format!("burst ({burst}) must be at least per_second ({per_second})"),
                );
            }
            enabled.then_some(ForwardRateLimit {
                per_second: per_second as u32,
                burst: burst as u32,
            })
        });

    let t = o.obj(ctx, "timeout", FORWARD_TIMEOUT_KEYS);
    let header_timeout = t.as_ref().map_or(d::HEADER_TIMEOUT_S, |t| {
        t.u64(ctx, "connect", d::HEADER_TIMEOUT_S, d::HEADER_TIMEOUT_RANGE)
    });
    let idle_timeout = t.as_ref().map_or(d::FORWARD_IDLE_TIMEOUT_S, |t| {
        t.u64(
            ctx,
            "idle",
            d::FORWARD_IDLE_TIMEOUT_S,
            d::FORWARD_IDLE_TIMEOUT_RANGE,
        )
    });

    let mut routes = Vec::new();
    if let Some(items) = o.seq(ctx, "routing") {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let p = index_path(&o.child("routing"), i);
            let Some(r) = Obj::new(ctx, Some(item), p.clone(), ROUTE_KEYS) else {
                if matches!(item, Value::Null) {
                    ctx.error(&p, "expected a mapping with `path` and `target_group`");
                }
                continue;
            };
            let path = r.req_str(ctx, "path");
            if let Some(path) = &path {
                if let Err(e) = crate::route::validate_pattern(path) {
                    ctx.error(&r.child("path"), e);
                } else if let Some(first) = seen.get(path) {
                    ctx.error(
                        &r.child("path"),
                        format!("duplicate path pattern `{path}` (first at routing[{first}])"),
                    );
                } else {
                    seen.insert(path.clone(), i);
                }
            }
            let target = r
                .req_str(ctx, "target_group")
                .map(|g| resolve_group(ctx, &r.child("target_group"), &g, groups, "route"));
            if let (Some(path), Some(target_group)) = (path, target) {
                routes.push(Route { path, target_group });
            }
        }
    }

    let l = o.obj(ctx, "limits", LIMITS_KEYS);
    let max_body_bytes = l.as_ref().map_or(d::MAX_BODY_BYTES, |l| {
        l.u64(
            ctx,
            "max_body_bytes",
            d::MAX_BODY_BYTES,
            d::MAX_BODY_BYTES_RANGE,
        )
    });
    let max_head_bytes = l.as_ref().map_or(d::MAX_HEAD_BYTES, |l| {
        l.u64(
            ctx,
            "max_head_bytes",
            d::MAX_HEAD_BYTES,
            d::MAX_HEAD_BYTES_RANGE,
        )
    });

    let tls = o
        .obj(ctx, "tls", FORWARD_TLS_KEYS)
        .and_then(|t| listener_tls(ctx, &t));

    Some(Forward {
        name: name?,
        listen,
        default_group,
        ratelimit,
        header_timeout: secs(header_timeout),
        idle_timeout: secs(idle_timeout),
        routes,
        max_body_bytes,
        max_head_bytes: max_head_bytes as usize,
        tls,
    })
}

/// `forwards[].tls`: both files are read and checked now, so `-t` reports a bad certificate.
fn listener_tls(ctx: &mut Ctx, t: &Obj) -> Option<ListenerTls> {
    let cert_file = t.req_str(ctx, "cert_file");
    let key_file = t.req_str(ctx, "key_file");
    let (cert_file, key_file) = (cert_file?, key_file?);
    match crate::tls::server_config(&cert_file, &key_file) {
        Ok(config) => Some(ListenerTls {
            cert_file,
            key_file,
            config,
        }),
        Err(errs) => {
            for e in errs {
                let path = if e.key.is_empty() {
                    t.path.clone()
                } else {
                    t.child(e.key)
                };
                ctx.error(&path, e.message);
            }
            None
        }
    }
}

/// Client TLS configs by (`ca_file`, `insecure_skip_verify`), built once per load.
pub(super) type TlsConfigs = HashMap<(Option<String>, bool), std::sync::Arc<rustls::ClientConfig>>;

/// `upstreams[].tls` of an `https://` upstream (defaults when the block is absent).
pub(super) fn upstream_tls(
    ctx: &mut Ctx,
    t: Option<&Obj>,
    host: &str,
    url_path: &str,
    configs: &mut TlsConfigs,
) -> Option<UpstreamTls> {
    let ca_file = t.and_then(|t| t.opt_str(ctx, "ca_file"));
    if let (Some(t), Some(f)) = (t, &ca_file) {
        if f.trim().is_empty() {
            ctx.error(&t.child("ca_file"), "must not be empty");
        }
    }
    let insecure_skip_verify = t.is_some_and(|t| {
        t.bool(
            ctx,
            "insecure_skip_verify",
            d::UPSTREAM_TLS_INSECURE_SKIP_VERIFY,
        )
    });
    let server_name = match crate::tls::server_name(host) {
        Ok(n) => Some(n),
        Err(e) => {
            ctx.error(url_path, e);
            None
        }
    };
    let key = (ca_file.clone(), insecure_skip_verify);
    let config = match configs.get(&key) {
        Some(c) => c.clone(),
        None => match crate::tls::client_config(ca_file.as_deref(), insecure_skip_verify) {
            Ok(c) => {
                configs.insert(key, c.clone());
                c
            }
            Err(e) => {
                let path = match t {
                    Some(t) if e.key.is_empty() => t.path.clone(),
                    Some(t) => t.child(e.key),
                    None => url_path.to_owned(),
                };
                ctx.error(&path, e.message);
                return None;
            }
        },
    };
    Some(UpstreamTls {
        ca_file,
        insecure_skip_verify,
        server_name: server_name?,
        config,
    })
}

fn admin_block(ctx: &mut Ctx, o: Option<&Obj>) -> Admin {
    let Some(o) = o else {
        return Admin {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), d::ADMIN_PORT),
            header_timeout: secs(d::HEADER_TIMEOUT_S),
        };
    };
    let listen = listen_addr(ctx, o, d::ADMIN_PORT);
    let t = o.obj(ctx, "timeout", ADMIN_TIMEOUT_KEYS);
    let connect = t.as_ref().map_or(d::HEADER_TIMEOUT_S, |t| {
        t.u64(ctx, "connect", d::HEADER_TIMEOUT_S, d::HEADER_TIMEOUT_RANGE)
    });
    Admin {
        listen,
        header_timeout: secs(connect),
    }
}

/// `url` of an upstream: absolute http(s), no credentials.
pub(super) fn upstream_url(ctx: &mut Ctx, path: &str, raw: &str) -> Option<url::ParsedUrl> {
    match url::parse(raw) {
        Ok(p) if p.credentials.is_some() => {
            ctx.error(
                path,
                "credentials in an upstream URL are not allowed; use `auth` (type basic or bearer)",
            );
            None
        }
        Ok(p) => Some(p),
        Err(e) => {
            ctx.error(path, e);
            None
        }
    }
}

/// `auth` (same keys in both dialects); replaces any client `Authorization`.
pub(super) fn auth(ctx: &mut Ctx, o: &Obj) -> Auth {
    let Some(a) = o.obj(ctx, "auth", AUTH_KEYS) else {
        return Auth::None;
    };
    // `type: ""` is `none` (the Go port's validator allows it).
    let empty = matches!(a.get("type"), Some(Value::String(t)) if t.trim().is_empty());
    let ty = if empty {
        AuthType::None
    } else {
        a.choice(ctx, "type", AuthType::None, AUTH_TYPES)
    };
    match ty {
        AuthType::None => Auth::None,
        AuthType::Bearer => match a.opt_str(ctx, "token") {
            Some(t) if !t.is_empty() => {
                if http::HeaderValue::from_str(&format!("Bearer {t}")).is_err() {
                    ctx.error(
                        &a.child("token"),
                        "the token contains characters not allowed in an HTTP header",
                    );
                }
                Auth::Bearer(t)
            }
            _ => {
                ctx.error(
                    &a.child("token"),
                    "a non-empty `token` is required when type is bearer",
                );
                Auth::None
            }
        },
        AuthType::Basic => {
            let user = a.opt_str(ctx, "username").filter(|s| !s.is_empty());
            let pass = a.opt_str(ctx, "password").filter(|s| !s.is_empty());
            if user.is_none() {
                ctx.error(
                    &a.child("username"),
                    "a non-empty `username` is required when type is basic",
                );
            }
            if pass.is_none() {
                ctx.error(
                    &a.child("password"),
                    "a non-empty `password` is required when type is basic",
                );
            }
            match (user, pass) {
                (Some(u), Some(p)) => {
                    if u.contains(':') {
                        ctx.error(
                            &a.child("username"),
                            "a Basic auth username cannot contain `:`",
                        );
                    }
                    Auth::Basic {
                        header_value: url::basic_auth(&u, &p),
                    }
                }
                _ => Auth::None,
            }
        }
    }
}

/// `headers[]` (same keys in both dialects), in order.
pub(super) fn header_ops(ctx: &mut Ctx, o: &Obj) -> Vec<HeaderOp> {
    let mut headers = Vec::new();
    if let Some(items) = o.seq(ctx, "headers") {
        for (i, item) in items.iter().enumerate() {
            let p = index_path(&o.child("headers"), i);
            let Some(h) = Obj::new(ctx, Some(item), p.clone(), HEADER_KEYS) else {
                continue;
            };
            if !h.has("op") {
                ctx.error(
                    &h.child("op"),
                    "missing required key `op` (insert, replace or remove)",
                );
            }
            let op = h.choice(ctx, "op", None, OPS);
            let key = h.req_str(ctx, "key").and_then(|k| {
                match http::HeaderName::from_bytes(k.trim().as_bytes()) {
                    Ok(n) => Some(n),
                    Err(_) => {
                        ctx.error(
                            &h.child("key"),
                            format!("`{k}` is not a valid HTTP header name"),
                        );
                        None
                    }
                }
            });
            let value = match op {
                Some(Op::Insert | Op::Replace) => {
                    match h.opt_str(ctx, "value") {
                        Some(v) if !v.is_empty() => match http::HeaderValue::from_str(&v) {
                            Ok(v) => Some(v),
                            Err(_) => {
                                ctx.error(&h.child("value"), "not a valid HTTP header value (control characters or non-ASCII)");
                                None
                            }
                        },
                        _ => {
                            ctx.error(
                                &h.child("value"),
                                "a non-empty `value` is required for insert and replace",
                            );
                            None
                        }
                    }
                }
                _ => None,
            };
            match (op, key, value) {
                (Some(Op::Insert), Some(k), Some(v)) => headers.push(HeaderOp::Insert(k, v)),
                (Some(Op::Replace), Some(k), Some(v)) => headers.push(HeaderOp::Replace(k, v)),
                (Some(Op::Remove), Some(k), _) => headers.push(HeaderOp::Remove(k)),
                _ => {}
            }
        }
    }
    headers
}

/// An upstream read by either dialect, assembled once every part is known.
pub(super) struct UpstreamParts {
    pub name: Option<String>,
    /// As written (trimmed).
    pub url: Option<String>,
    pub parsed: Option<url::ParsedUrl>,
    pub auth: Auth,
    pub headers: Vec<HeaderOp>,
    pub breaker: Breaker,
    pub ratelimit: Option<UpstreamRateLimit>,
    pub replace_path: Option<ReplacePath>,
    /// `Some` exactly when the URL is https and its TLS settings were valid.
    pub tls: Option<UpstreamTls>,
}

impl UpstreamParts {
    pub fn finish(self) -> Option<Upstream> {
        let parsed = self.parsed?;
        if parsed.scheme == Scheme::Https && self.tls.is_none() {
            return None;
        }
        Some(Upstream {
            name: self.name?,
            url: self.url?,
            scheme: parsed.scheme,
            host_header: parsed.host_header(),
            host: parsed.host.clone(),
            port: parsed.port,
            base_path: parsed.path.trim_end_matches('/').to_owned(),
            auth: self.auth,
            headers: self.headers,
            breaker: self.breaker,
            ratelimit: self.ratelimit,
            replace_path: self.replace_path,
            tls: self.tls,
        })
    }
}

fn upstream(ctx: &mut Ctx, o: &Obj, tls_configs: &mut TlsConfigs) -> Option<Upstream> {
    let name = o.req_str(ctx, "name");
    let raw_url = o.req_str(ctx, "url");
    let parsed = raw_url
        .as_ref()
        .and_then(|u| upstream_url(ctx, &o.child("url"), u));
    let _weight = o.u64(ctx, "weight", d::WEIGHT, d::WEIGHT_RANGE);
    let auth = auth(ctx, o);
    let headers = header_ops(ctx, o);

    let b = o.obj(ctx, "breaker", BREAKER_KEYS);
    let breaker = breaker(ctx, b.as_ref());

    // Accepted for compatibility (LLMProxy parses it but never uses it): validated, then dropped.
    if let Some(c) = o.obj(ctx, "http_client", CLIENT_KEYS) {
        let _ = http_client(ctx, Some(&c));
    }

    // One second's worth of burst: the only burst this dialect has.
    let ratelimit = o
        .obj(ctx, "ratelimit", UPSTREAM_RATELIMIT_KEYS)
        .and_then(|r| r.opt_u64(ctx, "per_second", d::UPSTREAM_RATELIMIT_RANGE))
        .map(|n| UpstreamRateLimit {
            per_second: n as u32,
            burst: n as u32,
        });

    let t = o.obj(ctx, "tls", UPSTREAM_TLS_KEYS);
    let tls = match parsed.as_ref().map(|p| p.scheme) {
        Some(Scheme::Https) => {
            let host = parsed.as_ref().map_or("", |p| p.host.as_str());
            upstream_tls(ctx, t.as_ref(), host, &o.child("url"), tls_configs)
        }
        Some(Scheme::Http) => {
            if let Some(t) = &t {
                // Meaningless on plain HTTP, and most likely a typo in the URL's scheme.
                ctx.error(
                    &t.path,
                    "`tls` applies only to https:// upstreams (this url is http://)",
                );
            }
            None
        }
        None => None,
    };

    UpstreamParts {
        name,
        url: raw_url.map(|u| u.trim().to_owned()),
        parsed,
        auth,
        headers,
        breaker,
        ratelimit,
        replace_path: None,
        tls,
    }
    .finish()
}

fn breaker(ctx: &mut Ctx, b: Option<&Obj>) -> Breaker {
    let u = |ctx: &mut Ctx, key: &str, def: u64, range: (u64, u64)| {
        b.map_or(def, |b| b.u64(ctx, key, def, range))
    };
    Breaker {
        enabled: b.map_or(d::BREAKER_ENABLED, |b| {
            b.bool(ctx, "enabled", d::BREAKER_ENABLED)
        }),
        threshold: b.map_or(d::BREAKER_THRESHOLD, |b| {
            b.f64(
                ctx,
                "threshold",
                d::BREAKER_THRESHOLD,
                d::BREAKER_THRESHOLD_RANGE,
            )
        }),
        cooldown: secs(u(
            ctx,
            "cooldown",
            d::BREAKER_COOLDOWN_S,
            d::BREAKER_COOLDOWN_RANGE,
        )),
        max_requests: u(
            ctx,
            "max_requests",
            d::BREAKER_MAX_REQUESTS,
            d::BREAKER_MAX_REQUESTS_RANGE,
        ) as u32,
        interval: secs(u(
            ctx,
            "interval",
            d::BREAKER_INTERVAL_S,
            d::BREAKER_INTERVAL_RANGE,
        )),
        min_requests: u(
            ctx,
            "min_requests",
            d::BREAKER_MIN_REQUESTS,
            d::BREAKER_MIN_REQUESTS_RANGE,
        ) as u32,
        consecutive_failures: u(
            ctx,
            "consecutive_failures",
            d::BREAKER_CONSECUTIVE_FAILURES,
            d::BREAKER_CONSECUTIVE_FAILURES_RANGE,
        ) as u32,
        count_429: b.map_or(d::BREAKER_COUNT_429, |b| {
            b.bool(ctx, "count_429", d::BREAKER_COUNT_429)
        }),
    }
}

/// A group: `name`, `upstreams`, `balance` (same keys in both dialects) and the client settings
/// read by the dialect's reader.
fn group(ctx: &mut Ctx, o: &Obj, upstreams: &HashMap<String, usize>, s: &Schema) -> Option<Group> {
    let name = o.req_str(ctx, "name");
    let mut members = Vec::new();
    match o.seq(ctx, "upstreams") {
        None => {
            if !o.has("upstreams") {
                ctx.error(
                    &o.child("upstreams"),
                    "missing required key `upstreams` (at least one member)",
                );
            }
        }
        Some([]) => ctx.error(&o.child("upstreams"), "must have at least one member"),
        Some(items) => {
            let mut seen: HashMap<String, usize> = HashMap::new();
            for (i, item) in items.iter().enumerate() {
                let p = index_path(&o.child("upstreams"), i);
                // A bare string member (`- openai`) is accepted as `{name: openai}`.
                if let Value::String(s) = item {
                    let s = s.clone();
                    if let Some(m) = member(ctx, &p, &s, d::WEIGHT, upstreams, &mut seen, i) {
                        members.push(m);
                    }
                    continue;
                }
                let Some(m) = Obj::new(ctx, Some(item), p.clone(), MEMBER_KEYS) else {
                    continue;
                };
                // The Go port fills a zero weight with the default.
                let go_zero = ctx.dialect == Dialect::GoPort
                    && m.get("weight").and_then(Value::as_u64) == Some(0);
                let weight = if go_zero {
                    d::WEIGHT
                } else {
                    m.u64(ctx, "weight", d::WEIGHT, d::WEIGHT_RANGE)
                };
                if let Some(n) = m.req_str(ctx, "name") {
                    if let Some(mem) =
                        member(ctx, &m.child("name"), &n, weight, upstreams, &mut seen, i)
                    {
                        members.push(mem);
                    }
                }
            }
        }
    }
    let strategy = match o.obj(ctx, "balance", BALANCE_KEYS) {
        Some(b) => b.choice(ctx, "strategy", Strategy::RoundRobin, STRATEGIES),
        None => Strategy::RoundRobin,
    };
    let c = o.obj(ctx, s.client, s.client_keys);
    let client = (s.http_client)(ctx, c.as_ref());
    Some(Group {
        name: name?,
        members,
        strategy,
        client,
    })
}

fn member(
    ctx: &mut Ctx,
    name_path: &str,
    name: &str,
    weight: u64,
    upstreams: &HashMap<String, usize>,
    seen: &mut HashMap<String, usize>,
    i: usize,
) -> Option<Member> {
    if let Some(first) = seen.get(name) {
        ctx.error(
            name_path,
            format!(
                "upstream `{name}` is listed twice in this group (first at upstreams[{first}])"
            ),
        );
        return None;
    }
    seen.insert(name.to_owned(), i);
    match upstreams.get(name) {
        Some(idx) => Some(Member {
            upstream: *idx,
            weight: weight as u32,
        }),
        None => {
            let names: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            let hint = super::walk::suggest(name, &names)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            ctx.error(name_path, format!("unknown upstream `{name}`{hint}"));
            None
        }
    }
}

fn http_client(ctx: &mut Ctx, c: Option<&Obj>) -> HttpClient {
    let u = |ctx: &mut Ctx, o: Option<&Obj>, key: &str, def: u64, range: (u64, u64)| {
        o.map_or(def, |o| o.u64(ctx, key, def, range))
    };

    let agent = agent(ctx, c);
    let keepalive = u(ctx, c, "keepalive", d::KEEPALIVE_S, d::KEEPALIVE_RANGE);
    let stream = match c {
        None => d::STREAM,
        Some(c) => {
            let s = c.opt_bool(ctx, "stream");
            let sm = c.opt_bool(ctx, "stream_mode");
            match (s, sm) {
                (Some(a), Some(b)) if a != b => {
                    ctx.error(
                        &c.child("stream_mode"),
                        format!(
                            "`stream_mode` ({b}) and its alias `stream` ({a}) disagree; keep one"
                        ),
                    );
                    d::STREAM
                }
                (Some(a), _) | (None, Some(a)) => a,
                (None, None) => d::STREAM,
            }
        }
    };
    let t = c.and_then(|c| c.obj(ctx, "timeout", CLIENT_TIMEOUT_KEYS));
    let t = t.as_ref();
    let connect = u(
        ctx,
        t,
        "connect",
        d::CONNECT_TIMEOUT_S,
        d::CONNECT_TIMEOUT_RANGE,
    );
    let request = u(
        ctx,
        t,
        "request",
        d::REQUEST_TIMEOUT_S,
        d::REQUEST_TIMEOUT_RANGE,
    );
    let first_byte = u(ctx, t, "first_byte", request, d::FIRST_BYTE_TIMEOUT_RANGE);
    let stream_idle = u(
        ctx,
        t,
        "stream_idle",
        d::STREAM_IDLE_TIMEOUT_S,
        d::STREAM_IDLE_TIMEOUT_RANGE,
    );
    let idle = u(
        ctx,
        t,
        "idle",
        d::POOL_IDLE_TIMEOUT_S,
        d::POOL_IDLE_TIMEOUT_RANGE,
    );

    let pool = c.and_then(|c| c.obj(ctx, "pool", POOL_KEYS));
    let max_idle = u(
        ctx,
        pool.as_ref(),
        "max_idle",
        d::POOL_MAX_IDLE,
        d::POOL_MAX_IDLE_RANGE,
    );

    let retry = c
        .and_then(|c| c.obj(ctx, "retry", RETRY_KEYS))
        .and_then(|r| {
            let enabled = r.bool(ctx, "enabled", d::RETRY_ENABLED);
            let attempts = r.u64(ctx, "attempts", d::RETRY_ATTEMPTS, d::RETRY_ATTEMPTS_RANGE);
            let initial = r.u64(ctx, "initial", d::RETRY_INITIAL_MS, d::RETRY_INITIAL_RANGE);
            let max_body = r.u64(
                ctx,
                "max_body_bytes",
                d::RETRY_MAX_BODY_BYTES,
                d::RETRY_MAX_BODY_BYTES_RANGE,
            );
            enabled.then_some(Retry {
                attempts: attempts as u32,
                initial: Duration::from_millis(initial),
                max_replay_body_bytes: max_body as usize,
            })
        });

    let proxy = c
        .and_then(|c| c.obj(ctx, "proxy", PROXY_KEYS))
        .and_then(|p| proxy(ctx, &p));

    HttpClient {
        agent,
        tcp_keepalive: (keepalive > 0).then(|| secs(keepalive)),
        stream,
        connect_timeout: secs(connect),
        request_timeout: secs(request),
        first_byte_timeout: secs(first_byte),
        stream_idle_timeout: secs(stream_idle),
        pool_idle_timeout: secs(idle),
        pool_max_idle: max_idle as usize,
        retry,
        proxy,
    }
}

/// `proxy` (keys `url` and, in the snake_case dialect, `enabled`).
pub(super) fn proxy(ctx: &mut Ctx, p: &Obj) -> Option<Proxy> {
    let enabled = p.bool(ctx, "enabled", d::PROXY_ENABLED);
    let raw = p.opt_str(ctx, "url").filter(|s| !s.trim().is_empty());
    let Some(raw) = raw else {
        if enabled {
            ctx.error(
                &p.child("url"),
                "a proxy `url` is required when the proxy is enabled",
            );
        }
        return None;
    };
    // Checked even when disabled, so `-t` catches it before someone flips `enabled`.
    let parsed = match url::parse(&raw) {
        Ok(u) if u.scheme != Scheme::Http => {
            ctx.error(&p.child("url"), "only http:// proxies are supported");
            return None;
        }
        Ok(u) if !(u.path.is_empty() || u.path == "/") => {
            ctx.error(&p.child("url"), "a proxy URL cannot have a path");
            return None;
        }
        Ok(u) => u,
        Err(e) => {
            ctx.error(&p.child("url"), e);
            return None;
        }
    };
    let authorization = parsed
        .credentials
        .as_ref()
        .map(|(u, pw)| url::basic_auth(u, pw));
    enabled.then(|| Proxy {
        display_url: parsed.origin(),
        host: parsed.host.clone(),
        port: parsed.port,
        authorization,
    })
}

/// `agent` (same key in both dialects): the outgoing `User-Agent`.
pub(super) fn agent(ctx: &mut Ctx, c: Option<&Obj>) -> String {
    match c.and_then(|c| c.opt_str(ctx, "agent").map(|a| (a, c.child("agent")))) {
        Some((a, path)) => {
            if http::HeaderValue::from_str(&a).is_err() {
                ctx.error(
                    &path,
                    "not a valid HTTP header value (control characters or non-ASCII)",
                );
            }
            a
        }
        None => d::AGENT.to_owned(),
    }
}

pub(super) fn runtime(ctx: &mut Ctx, r: Option<&Obj>) -> Runtime {
    let u = |ctx: &mut Ctx, key: &str, def: u64, range: (u64, u64)| {
        r.map_or(def, |r| r.u64(ctx, key, def, range))
    };
    Runtime {
        shards: u(ctx, "shards", d::SHARDS, d::SHARDS_RANGE) as usize,
        driver: r.map_or(Driver::Auto, |r| {
            r.choice(ctx, "driver", Driver::Auto, DRIVERS)
        }),
        tick: Duration::from_millis(u(ctx, "tick_ms", d::TICK_MS, d::TICK_RANGE)),
        shutdown_timeout: secs(u(
            ctx,
            "shutdown_timeout",
            d::SHUTDOWN_TIMEOUT_S,
            d::SHUTDOWN_TIMEOUT_RANGE,
        )),
        dns_refresh: secs(u(
            ctx,
            "dns_refresh",
            d::DNS_REFRESH_S,
            d::DNS_REFRESH_RANGE,
        )),
    }
}
