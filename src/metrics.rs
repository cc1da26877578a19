//! Prometheus text rendering (admin thread) of the merged statistics: exposition format 0.0.4,
//! hand-written because the per-shard design has no global registry to feed.

/// The `error` label (and OpenAI `code`) of a request refused by a forward's rate limit.
pub const RATE_LIMITED: &str = "rate_limited";
/// A client's TLS handshake on an HTTPS listener failed (bad record, unsupported version,
/// plain HTTP to the port) or did not finish within the header timeout. Recorded like a
/// request error (status 0: nothing was answered), exported as its own family.
pub const TLS_HANDSHAKE_FAILED: &str = "tls_handshake_failed";
pub const TLS_HANDSHAKE_TIMEOUT: &str = "tls_handshake_timeout";

fn is_handshake_error(error: &str) -> bool {
    error == TLS_HANDSHAKE_FAILED || error == TLS_HANDSHAKE_TIMEOUT
}

use std::fmt::Write;
use std::sync::Arc;

use crate::breaker::BreakerState;
use crate::config::Config;
use crate::stats::{
    BreakerStatus, DurationCounts, Merged, ShardProgress, UpstreamErrorKind, DURATION_BUCKETS_LE,
    METHOD_LABELS,
};

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A per-shard counter family: name, help, value.
type ShardCounter = (&'static str, &'static str, fn(&ShardProgress) -> u64);

/// Label value used when an index has no name in the configuration (should not happen).
const UNKNOWN: &str = "unknown";

/// Renders every metric family of `merged`, labelled with the names from `config`.
pub fn render(merged: &Merged, config: &Config) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let forward = |i: usize| config.forwards.get(i).map_or(UNKNOWN, |f| f.name.as_str());

    family(
        &mut out,
        "llmproxy_http_requests_total",
        "Total inbound HTTP requests by forward, method and path.",
        "counter",
    );
    for (key, d) in &merged.http {
        let labels = http_labels(config, key);
        sample(
            &mut out,
            "llmproxy_http_requests_total",
            &labels,
            None,
            d.count(),
        );
    }

    family(
        &mut out,
        "llmproxy_http_request_duration_seconds",
        "Inbound HTTP request latency by forward, method and path.",
        "histogram",
    );
    for (key, d) in &merged.http {
        let labels = http_labels(config, key);
        histogram(
            &mut out,
            "llmproxy_http_request_duration_seconds",
            &labels,
            d,
        );
    }

    family(
        &mut out,
        "llmproxy_http_request_errors_total",
        "Inbound HTTP requests that ended in an error, by forward, error and status.",
        "counter",
    );
    for ((f, error, status), n) in &merged.http_errors {
        if is_handshake_error(error) {
            continue;
        }
        let status = status.to_string();
        let labels = [
            ("forward", forward(*f)),
            ("error", error),
            ("status", &status),
        ];
        sample(
            &mut out,
            "llmproxy_http_request_errors_total",
            &labels,
            None,
            *n,
        );
    }

    family(
        &mut out,
        "llmproxy_upstream_requests_total",
        "Total requests forwarded to upstreams by group and upstream.",
        "counter",
    );
    for (&pair, t) in &merged.upstreams {
        let labels = pair_labels(config, pair);
        sample(
            &mut out,
            "llmproxy_upstream_requests_total",
            &labels,
            None,
            t.duration.count(),
        );
    }

    family(
        &mut out,
        "llmproxy_upstream_duration_seconds",
        "Upstream exchange latency by group and upstream.",
        "histogram",
    );
    for (&pair, t) in &merged.upstreams {
        let labels = pair_labels(config, pair);
        histogram(
            &mut out,
            "llmproxy_upstream_duration_seconds",
            &labels,
            &t.duration,
        );
    }

    family(
        &mut out,
        "llmproxy_upstream_errors_total",
        "Failed upstream exchanges by error, group and upstream.",
        "counter",
    );
    for (&pair, t) in &merged.upstreams {
        let [group, upstream] = pair_labels(config, pair);
        for kind in UpstreamErrorKind::ALL {
            let n = t.errors[kind.index()];
            if n > 0 {
                let labels = [("error", kind.label()), group, upstream];
                sample(&mut out, "llmproxy_upstream_errors_total", &labels, None, n);
            }
        }
    }

    family(
        &mut out,
        "llmproxy_upstream_retries_total",
        "Requests sent again after the upstream failed them or answered 5xx/429, by group and upstream.",
        "counter",
    );
    for (&pair, t) in &merged.upstreams {
        let [group, upstream] = pair_labels(config, pair);
        sample(
            &mut out,
            "llmproxy_upstream_retries_total",
            &[group, upstream],
            None,
            t.retries,
        );
    }

    // Rate-limit rejections are the forward's `rate_limited` errors.
    family(
        &mut out,
        "llmproxy_ratelimit_total",
        "Requests rejected by the per-client-IP rate limit, by forward.",
        "counter",
    );
    for (fi, f) in config.forwards.iter().enumerate() {
        let n: u64 = merged
            .http_errors
            .iter()
            .filter(|((fwd, error, _), _)| *fwd == fi && *error == RATE_LIMITED)
            .map(|(_, n)| *n)
            .sum();
        sample(
            &mut out,
            "llmproxy_ratelimit_total",
            &[("forward", f.name.as_str())],
            None,
            n,
        );
    }

    family(
        &mut out,
        "llmproxy_tls_handshake_errors_total",
        "Client TLS handshakes on HTTPS listeners that failed or timed out, by forward.",
        "counter",
    );
    for ((f, error, _), n) in &merged.http_errors {
        if is_handshake_error(error) {
            let labels = [("forward", forward(*f)), ("error", error)];
            sample(
                &mut out,
                "llmproxy_tls_handshake_errors_total",
                &labels,
                None,
                *n,
            );
        }
    }

    breaker_families(&mut out, merged, config);

    // The stats pipeline's own health, per shard and overall.
    let per_shard: [ShardCounter; 2] = [
        (
            "llmproxy_stats_deltas_received_total",
            "Statistics deltas merged by the control thread, by shard.",
            |p| p.deltas_received,
        ),
        (
            "llmproxy_stats_deltas_dropped_total",
            "Statistics delta sends that failed (channel full or closed), by shard; their counts were carried into a later delta.",
            |p| p.failed_sends,
        ),
    ];
    for (name, help, value) in per_shard {
        family(&mut out, name, help, "counter");
        for (id, p) in &merged.shards {
            let id = id.to_string();
            sample(&mut out, name, &[("shard", &id)], None, value(p));
        }
    }
    let single = [
        (
            "llmproxy_shards",
            "Shards that have reported statistics.",
            "gauge",
            merged.shards.len() as u64,
        ),
        (
            "llmproxy_stats_deltas_lost_total",
            "Statistics deltas missing from the shards' sequences (expected to stay 0).",
            "counter",
            merged.deltas_lost(),
        ),
        (
            "llmproxy_stats_invalid_records_total",
            "Recording calls ignored because an index was outside the configuration (a bug).",
            "counter",
            merged.invalid_records,
        ),
    ];
    for (name, help, kind, value) in single {
        family(&mut out, name, help, kind);
        sample(&mut out, name, &[], None, value);
    }

    out
}

/// Breaker transitions always rendered (at zero before they happen).
const TRANSITIONS: [(BreakerState, BreakerState); 4] = [
    (BreakerState::Closed, BreakerState::Open),
    (BreakerState::Open, BreakerState::HalfOpen),
    (BreakerState::HalfOpen, BreakerState::Open),
    (BreakerState::HalfOpen, BreakerState::Closed),
];

/// The URL of an upstream for the `url` label: no credentials, no query, no fragment.
pub fn display_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or("");
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!(
        "{}{}{}",
        &url[..scheme_end + 3],
        host,
        &rest[authority_end..]
    )
}

/// Circuit breaker families. The breaker is per upstream; its series are repeated for every
/// group that contains the upstream.
fn breaker_families(out: &mut String, merged: &Merged, config: &Config) {
    // (group name, upstream name, url, status) for every membership.
    let mut rows: Vec<(&str, &str, String, &BreakerStatus)> = Vec::new();
    for g in &config.groups {
        for (i, m) in g.members.iter().enumerate() {
            if g.members[..i].iter().any(|x| x.upstream == m.upstream) {
                continue;
            }
            if let (Some(u), Some(b)) = (
                config.upstreams.get(m.upstream),
                merged.breakers.get(m.upstream),
            ) {
                rows.push((&g.name, &u.name, display_url(&u.url), b));
            }
        }
    }

    let name = "llmproxy_circuitbreaker_state";
    family(
        out,
        name,
        "Circuit breaker state by upstream: 0 closed, 1 half-open, 2 open.",
        "gauge",
    );
    for (u, b) in config.upstreams.iter().zip(merged.breakers.iter()) {
        sample(out, name, &[("upstream", &u.name)], None, b.state.gauge());
    }

    let name = "llmproxy_circuitbreaker_state_changes_total";
    family(
        out,
        name,
        "Circuit breaker state changes by group, upstream, url, from and to.",
        "counter",
    );
    for (g, u, url, b) in &rows {
        for from in BreakerState::ALL {
            for to in BreakerState::ALL {
                let n = b.transitions[from.index()][to.index()];
                if n == 0 && !TRANSITIONS.contains(&(from, to)) {
                    continue;
                }
                let labels = [
                    ("group", *g),
                    ("upstream", *u),
                    ("url", url.as_str()),
                    ("from", from.label()),
                    ("to", to.label()),
                ];
                sample(out, name, &labels, None, n);
            }
        }
    }

    let name = "llmproxy_circuitbreaker_calls_total";
    family(
        out,
        name,
        "Upstream calls seen by the circuit breaker by group, upstream, url and result (success, failure, rejected).",
        "counter",
    );
    for (g, u, url, b) in &rows {
        for (result, n) in [
            ("success", b.successes),
            ("failure", b.failures),
            ("rejected", b.rejected),
        ] {
            let labels = [
                ("group", *g),
                ("upstream", *u),
                ("url", url.as_str()),
                ("result", result),
            ];
            sample(out, name, &labels, None, n);
        }
    }

    for (name, help, to) in [
        (
            "llmproxy_circuitbreaker_opened_total",
            "Times the circuit breaker opened, by group, upstream and url.",
            BreakerState::Open,
        ),
        (
            "llmproxy_circuitbreaker_closed_total",
            "Times the circuit breaker closed, by group, upstream and url.",
            BreakerState::Closed,
        ),
        (
            "llmproxy_circuitbreaker_half_opened_total",
            "Times the circuit breaker went half-open, by group, upstream and url.",
            BreakerState::HalfOpen,
        ),
    ] {
        family(out, name, help, "counter");
        for (g, u, url, b) in &rows {
            let labels = [("group", *g), ("upstream", *u), ("url", url.as_str())];
            sample(out, name, &labels, None, b.entered(to));
        }
    }

    let name = "llmproxy_snapshot_epoch";
    family(
        out,
        name,
        "Epoch of the newest global snapshot published to the shards.",
        "gauge",
    );
    sample(out, name, &[], None, merged.epoch);
}

/// `{forward, method, path}` labels of a merged HTTP series.
fn http_labels<'a>(
    config: &'a Config,
    (forward, method, path): &'a (usize, u8, Arc<str>),
) -> [(&'static str, &'a str); 3] {
    [
        (
            "forward",
            config
                .forwards
                .get(*forward)
                .map_or(UNKNOWN, |f| f.name.as_str()),
        ),
        (
            "method",
            METHOD_LABELS
                .get(*method as usize)
                .copied()
                .unwrap_or("OTHER"),
        ),
        ("path", path),
    ]
}

/// `{group, upstream}` labels (upstream = its name) of a merged pair.
fn pair_labels(config: &Config, (group, upstream): (usize, usize)) -> [(&'static str, &str); 2] {
    [
        (
            "group",
            config
                .groups
                .get(group)
                .map_or(UNKNOWN, |g| g.name.as_str()),
        ),
        (
            "upstream",
            config
                .upstreams
                .get(upstream)
                .map_or(UNKNOWN, |u| u.name.as_str()),
        ),
    ]
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// One sample line; `le` is appended as the last label when given.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], le: Option<&str>, value: u64) {
    out.push_str(name);
    write_labels(out, labels, le);
    let _ = writeln!(out, " {value}");
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        escape_label_value(out, v);
        out.push('"');
    }
    out.push('}');
}

fn histogram(out: &mut String, name: &str, labels: &[(&str, &str)], d: &DurationCounts) {
    let bucket = format!("{name}_bucket");
    let mut cumulative = 0u64;
    for (le, n) in DURATION_BUCKETS_LE.iter().zip(d.buckets.iter()) {
        cumulative += n;
        sample(out, &bucket, labels, Some(le), cumulative);
    }
    let count = d.count();
    sample(out, &bucket, labels, Some("+Inf"), count);
    out.push_str(name);
    out.push_str("_sum");
    write_labels(out, labels, None);
    let _ = writeln!(out, " {}", d.sum_us as f64 / 1e6);
    sample(out, &format!("{name}_count"), labels, None, count);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::testing::test_config;
    use crate::stats::ShardStats;
    use std::collections::{BTreeMap, HashMap};
    use std::time::{Duration, Instant};

    /// A histogram series: base name and labels without `le`.
    type SeriesKey = (String, Vec<(String, String)>);

    /// A parsed sample line.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    /// Parses `name{k="v",...} value`, undoing the label escapes; None on malformed input.
    fn parse_sample(line: &str) -> Option<Sample> {
        let name_end = line.find(['{', ' '])?;
        let name = line[..name_end].to_string();
        let mut labels = Vec::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            loop {
                let (start, c) = chars.next()?;
                if c == '}' {
                    rest = &r[start + 1..];
                    break;
                }
                let (mut key, mut c) = (String::new(), c);
                if c == ',' {
                    c = chars.next()?.1;
                }
                while c != '=' {
                    key.push(c);
                    c = chars.next()?.1;
                }
                if chars.next()?.1 != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()?.1 {
                        '"' => break,
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            _ => return None,
                        },
                        '\n' => return None,
                        c => value.push(c),
                    }
                }
                labels.push((key, value));
            }
        }
        let value = rest.strip_prefix(' ')?.parse().ok()?;
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    /// Checks the exposition rules this renderer promises and returns the samples.
    fn check(text: &str) -> Vec<Sample> {
        let mut families: HashMap<String, String> = HashMap::new();
        let mut samples = Vec::new();
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("# HELP ") {
                assert!(h.split_once(' ').is_some(), "HELP without text: {line}");
            } else if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').expect("TYPE line");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "type {kind}"
                );
                assert!(
                    families.insert(name.into(), kind.into()).is_none(),
                    "family declared twice: {name}"
                );
            } else {
                let s = parse_sample(line).unwrap_or_else(|| panic!("bad line: {line:?}"));
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suf| {
                        let base = s.name.strip_suffix(suf)?;
                        (families.get(base).map(String::as_str) == Some("histogram"))
                            .then_some(base)
                    })
                    .unwrap_or(&s.name);
                let kind = families
                    .get(family)
                    .unwrap_or_else(|| panic!("sample of undeclared family: {line}"));
                assert!(
                    kind == "histogram" || family == s.name,
                    "suffix on non-histogram: {line}"
                );
                assert!(s.name.starts_with("llmproxy_"), "unprefixed metric: {line}");
                samples.push(s);
            }
        }
        // Histograms: per series, buckets ascending, cumulative, +Inf == _count.
        let mut series: BTreeMap<SeriesKey, Vec<(f64, f64)>> = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for s in &samples {
            if let Some(base) = s.name.strip_suffix("_bucket") {
                let le = s
                    .labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .expect("le")
                    .1
                    .clone();
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                let rest = s
                    .labels
                    .iter()
                    .filter(|(k, _)| k != "le")
                    .cloned()
                    .collect();
                series
                    .entry((base.to_string(), rest))
                    .or_default()
                    .push((le, s.value));
            } else if let Some(base) = s.name.strip_suffix("_count") {
                counts.insert((base.to_string(), s.labels.clone()), s.value);
            }
        }
        for (key, buckets) in &series {
            assert!(
                buckets.windows(2).all(|w| w[0].0 < w[1].0),
                "le order {key:?}"
            );
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "not cumulative {key:?}"
            );
            let last = buckets.last().unwrap();
            assert_eq!(last.0, f64::INFINITY, "+Inf missing {key:?}");
            assert_eq!(Some(&last.1), counts.get(key), "+Inf != _count {key:?}");
        }
        samples
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
        samples.iter().find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
        })
    }

    #[test]
    fn zero_series_before_traffic() {
        let config = test_config();
        let merged = Merged::new(&config, Instant::now());
        let text = render(&merged, &config);
        let samples = check(&text);
        for (g, u) in [
            ("main", "openai-a"),
            ("main", "openai-b"),
            ("backup", "openai-b"),
            ("backup", "local-c"),
        ] {
            let s = find(
                &samples,
                "llmproxy_upstream_requests_total",
                &[("group", g), ("upstream", u)],
            )
            .unwrap_or_else(|| panic!("zero series for {g}/{u}\n{text}"));
            assert_eq!(s.value, 0.0);
        }
        assert!(find(
            &samples,
            "llmproxy_upstream_requests_total",
            &[("group", "main"), ("upstream", "local-c")]
        )
        .is_none());
        assert!(text.contains("# TYPE llmproxy_http_request_duration_seconds histogram\n"));
    }

    #[test]
    fn traffic_renders_consistent_families() {
        let config = test_config();
        let stats = ShardStats::new(0, &config);
        let ms = Duration::from_millis;
        for i in 0..50u64 {
            stats.http_request(
                0,
                &http::Method::POST,
                "/v1/chat/completions?k=v",
                200,
                ms(i * 7),
            );
            stats.upstream_request(0, 1, ms(i * 13), None);
        }
        stats.http_request(
            1,
            &http::Method::from_bytes(b"BREW").unwrap(),
            "/x",
            404,
            ms(1),
        );
        stats.http_error(0, "upstream_timeout", 504);
        stats.upstream_request(1, 2, ms(2), Some(UpstreamErrorKind::Status429));
        let now = Instant::now();
        let mut merged = Merged::new(&config, now);
        merged.apply(stats.take_delta(), now);
        let text = render(&merged, &config);
        let samples = check(&text);

        let chat = [
            ("forward", "chat"),
            ("method", "POST"),
            ("path", "/v1/chat/completions"),
        ];
        assert_eq!(
            find(&samples, "llmproxy_http_requests_total", &chat)
                .unwrap()
                .value,
            50.0
        );
        assert_eq!(
            find(
                &samples,
                "llmproxy_http_request_duration_seconds_count",
                &chat
            )
            .unwrap()
            .value,
            50.0
        );
        let sum = find(
            &samples,
            "llmproxy_http_request_duration_seconds_sum",
            &chat,
        )
        .unwrap();
        assert!((sum.value - 8.575).abs() < 1e-9, "sum {}", sum.value); // 7 ms × (0+…+49)
        let mut le_01 = chat.to_vec();
        le_01.push(("le", "0.1"));
        // 0, 7, …, 98 ms ≤ 100 ms: 15 values.
        assert_eq!(
            find(
                &samples,
                "llmproxy_http_request_duration_seconds_bucket",
                &le_01
            )
            .unwrap()
            .value,
            15.0
        );
        assert!(find(
            &samples,
            "llmproxy_http_requests_total",
            &[("forward", "embed"), ("method", "OTHER"), ("path", "/x")]
        )
        .is_some());
        assert_eq!(
            find(
                &samples,
                "llmproxy_http_request_errors_total",
                &[
                    ("forward", "chat"),
                    ("error", "upstream_timeout"),
                    ("status", "504")
                ]
            )
            .unwrap()
            .value,
            1.0
        );
        assert_eq!(
            find(
                &samples,
                "llmproxy_upstream_requests_total",
                &[("group", "main"), ("upstream", "openai-b")]
            )
            .unwrap()
            .value,
            50.0
        );
        assert_eq!(
            find(
                &samples,
                "llmproxy_upstream_errors_total",
                &[
                    ("error", "upstream_429"),
                    ("group", "backup"),
                    ("upstream", "local-c")
                ]
            )
            .unwrap()
            .value,
            1.0
        );
        assert_eq!(find(&samples, "llmproxy_shards", &[]).unwrap().value, 1.0);
        assert!(!text.contains("k=v"), "query leaked into a label");
    }

    #[test]
    fn display_url_drops_credentials_and_query() {
        assert_eq!(
            display_url("https://user:p%40ss@api.example.com:8443/v1?key=secret#x"),
            "https://api.example.com:8443/v1"
        );
        assert_eq!(
            display_url("http://127.0.0.1:8001/v1"),
            "http://127.0.0.1:8001/v1"
        );
        assert_eq!(display_url("http://[::1]:80"), "http://[::1]:80");
    }

    #[test]
    fn breaker_families_per_group_membership() {
        use crate::breaker::{Admission, Global, Outcome, ShardHealth};
        let mut config = test_config();
        config.upstreams[1].url = "http://u:secret@127.0.0.1:8002/v1".into();
        let now = Instant::now();
        let stats = std::rc::Rc::new(ShardStats::new(0, &config));
        let health = ShardHealth::new(0, &config, 1, stats.clone());
        for _ in 0..5 {
            let a = health.admit(1, now).unwrap();
            assert_eq!(a, Admission::NORMAL);
            health.record(1, a, Outcome::Failure, Duration::from_millis(3));
        }
        assert!(health.admit(1, now).is_none(), "fast trip");
        let mut global = Global::new(&config, 1, now);
        let mut merged = Merged::new(&config, now);
        let d = stats.take_delta();
        global.observe(&d);
        merged.apply(d, now);
        let mut transitions = Vec::new();
        let snap = global.tick(now, &mut transitions);
        assert_eq!(transitions.len(), 1);
        merged.publish(&snap, &transitions);
        let text = render(&merged, &config);
        let samples = check(&text);
        assert!(!text.contains("secret"), "credentials leaked");
        for g in ["main", "backup"] {
            let base = [
                ("group", g),
                ("upstream", "openai-b"),
                ("url", "http://127.0.0.1:8002/v1"),
            ];
            let mut l = base.to_vec();
            l.extend([("from", "closed"), ("to", "open")]);
            assert_eq!(
                find(&samples, "llmproxy_circuitbreaker_state_changes_total", &l)
                    .unwrap()
                    .value,
                1.0
            );
            for (result, n) in [("failure", 5.0), ("success", 0.0), ("rejected", 1.0)] {
                let mut l = base.to_vec();
                l.push(("result", result));
                assert_eq!(
                    find(&samples, "llmproxy_circuitbreaker_calls_total", &l)
                        .unwrap()
                        .value,
                    n
                );
            }
            assert_eq!(
                find(&samples, "llmproxy_circuitbreaker_opened_total", &base)
                    .unwrap()
                    .value,
                1.0
            );
            assert_eq!(
                find(&samples, "llmproxy_circuitbreaker_half_opened_total", &base)
                    .unwrap()
                    .value,
                0.0
            );
        }
        assert!(find(
            &samples,
            "llmproxy_circuitbreaker_calls_total",
            &[
                ("group", "main"),
                ("upstream", "local-c"),
                ("url", "http://127.0.0.1:8003/v1"),
                ("result", "success")
            ]
        )
        .is_none());
        assert_eq!(
            find(
                &samples,
                "llmproxy_circuitbreaker_state",
                &[("upstream", "openai-b")]
            )
            .unwrap()
            .value,
            2.0
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut config = test_config();
        config.forwards[0].name = "we\"ird\\name\nx".into();
        let stats = ShardStats::new(0, &config);
        stats.http_request(0, &http::Method::GET, "/q\"uo\\te", 200, Duration::ZERO);
        let now = Instant::now();
        let mut merged = Merged::new(&config, now);
        merged.apply(stats.take_delta(), now);
        let text = render(&merged, &config);
        assert!(
            text.contains(r#"forward="we\"ird\\name\nx",method="GET",path="/q\"uo\\te""#),
            "{text}"
        );
        let samples = check(&text);
        assert!(find(
            &samples,
            "llmproxy_http_requests_total",
            &[
                ("forward", "we\"ird\\name\nx"),
                ("method", "GET"),
                ("path", "/q\"uo\\te")
            ]
        )
        .is_some());
    }
}
