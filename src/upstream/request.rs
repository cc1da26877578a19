//! The outgoing request head (shard, sans-IO): path joined with the upstream's base path once,
//! `Host` rewritten, hop-by-hop headers stripped, forwarding headers added, auth and header
//! operations applied.

use bytes::{Bytes, BytesMut};
use http::header::{AUTHORIZATION, USER_AGENT};
use http::{HeaderName, HeaderValue};

use crate::config::{Auth, HeaderOp, Proxy, Upstream};
use crate::http::body::Framing;
use crate::http::fields::Known;
use crate::http::head::Request;
use crate::http::respond::put_decimal;

/// Joins the upstream's base path and the client's path: the base is added unless the client
/// path already starts with it as a whole segment (`/v1` + `/v1/chat` → `/v1/chat`,
/// `/v1` + `/chat` → `/v1/chat`, `/v1` + `/v10` → `/v1/v10`).
pub fn join_path(base: &str, path_and_query: &str, out: &mut BytesMut) {
    let path_end = path_and_query
        .bytes()
        .position(|b| b == b'?')
        .unwrap_or(path_and_query.len());
    let path = &path_and_query[..path_end];
    let already = !base.is_empty()
        && path.starts_with(base)
        && matches!(path.as_bytes().get(base.len()), None | Some(b'/'));
    if !already {
        out.extend_from_slice(base.as_bytes());
    }
    if path.is_empty() {
        out.extend_from_slice(b"/");
    }
    out.extend_from_slice(path_and_query.as_bytes());
}

/// The parts of an upstream request head that depend only on the configuration, encoded once
/// at startup per `{group, upstream}`: the absolute-form prefix through an outbound proxy, the
/// `Host` line (after the request target) and the block after `X-Forwarded-Proto` (user agent,
/// auth, `Proxy-Authorization`, header operations).
#[derive(Debug, Clone)]
pub struct HeadPlan {
    /// `http://<host>` when the request goes to an outbound proxy in absolute form (an http
    /// upstream reached through the group's proxy); empty otherwise.
    absolute: Bytes,
    /// ` HTTP/1.1\r\nhost: <host>\r\n`
    host: Bytes,
    /// User agent, auth and operations, in that order, with `insert`s kept apart: those depend
    /// on the request (added only when it lacks the field).
    tail: Vec<Segment>,
    /// Names of `replace` and `remove` operations: the client's fields of these names are
    /// dropped.
    drop_names: Vec<Box<[u8]>>,
    /// The upstream sets `Authorization` itself.
    auth_set: bool,
}

#[derive(Debug, Clone)]
enum Segment {
    Static(Bytes),
    /// An `insert` operation: its line, for when the request has no field of that name.
    Insert {
        name: Box<[u8]>,
        line: Bytes,
    },
}

impl HeadPlan {
    /// Requests go to an outbound proxy in absolute form (an http upstream behind the group's
    /// proxy).
    pub fn absolute_form(&self) -> bool {
        !self.absolute.is_empty()
    }

    /// `proxy`: the outbound proxy this upstream's requests are sent to in absolute form (an
    /// http upstream of a group with a proxy; an https one is tunnelled and gets `None`).
    pub fn new(upstream: &Upstream, agent: &HeaderValue, proxy: Option<&Proxy>) -> HeadPlan {
        let mut absolute = BytesMut::new();
        if proxy.is_some() {
            absolute.extend_from_slice(b"http://");
            absolute.extend_from_slice(upstream.host_header.as_bytes());
        }
        let mut host = BytesMut::new();
        host.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        host.extend_from_slice(upstream.host_header.as_bytes());
        host.extend_from_slice(b"\r\n");
        let ops = &upstream.headers;
        let auth_set = !matches!(upstream.auth, Auth::None);
        let mut tail = Vec::new();
        let mut block = BytesMut::new();
        if !ops
            .iter()
            .any(|op| !matches!(op, HeaderOp::Insert(..)) && op.name() == USER_AGENT)
        {
            put(&mut block, "user-agent", agent.as_bytes());
        }
        match &upstream.auth {
            Auth::None => {}
            Auth::Bearer(token) => {
                block.extend_from_slice(b"authorization: Bearer ");
                block.extend_from_slice(token.as_bytes());
                block.extend_from_slice(b"\r\n");
            }
            Auth::Basic { header_value } => {
                put(&mut block, "authorization", header_value.as_bytes())
            }
        }
        // Ours, from the proxy URL's credentials; the client's was dropped as hop-by-hop.
        if let Some(auth) = proxy.and_then(|p| p.authorization.as_deref()) {
            put(&mut block, "proxy-authorization", auth.as_bytes());
        }
        for op in ops {
            match op {
                // Never when the proxy sets the field itself.
                HeaderOp::Insert(n, _) if n == USER_AGENT || (n == AUTHORIZATION && auth_set) => {}
                HeaderOp::Insert(n, v) => {
                    if !block.is_empty() {
                        tail.push(Segment::Static(block.split().freeze()));
                    }
                    let mut line = BytesMut::new();
                    put(&mut line, n.as_str(), v.as_bytes());
                    tail.push(Segment::Insert {
                        name: n.as_str().as_bytes().into(),
                        line: line.freeze(),
                    });
                }
                HeaderOp::Replace(n, v) => put(&mut block, n.as_str(), v.as_bytes()),
                HeaderOp::Remove(_) => {}
            }
        }
        if !block.is_empty() {
            tail.push(Segment::Static(block.freeze()));
        }
        let drop_names = ops
            .iter()
            .filter(|op| !matches!(op, HeaderOp::Insert(..)))
            .map(|op| op.name().as_str().as_bytes().into())
            .collect();
        HeadPlan {
            absolute: absolute.freeze(),
            host: host.freeze(),
            tail,
            drop_names,
            auth_set,
        }
    }
}

/// Everything the encoder needs to know about this hop.
pub struct Outgoing<'a> {
    pub upstream: &'a Upstream,
    pub plan: &'a HeadPlan,
    pub client_ip: &'a str,
    /// `http` or `https`: how the client reached us.
    pub client_proto: &'static str,
    pub framing: Framing,
}

/// Appends the request head sent to the upstream.
pub fn encode_request_head(out: &mut BytesMut, req: &Request, o: &Outgoing<'_>) {
    let h = &req.headers;
    let plan = o.plan;
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push_space();
    out.extend_from_slice(&plan.absolute);
    // Go dialect only: the URL's own path replaces the client's (decided at config load).
    match &o.upstream.replace_path {
        None => join_path(&o.upstream.base_path, req.target.as_str(), out),
        Some(r) => r.write(req.target.as_str(), out),
    }
    out.extend_from_slice(&plan.host);

    let mut prior_xff: Option<&[u8]> = None;
    for f in h.iter() {
        if f.kind.is_hop_by_hop()
            || matches!(
                f.kind,
                Known::Host | Known::Expect | Known::UserAgent | Known::XForwardedProto
            )
            || (plan.auth_set && f.kind == Known::Authorization)
            || h.connection_lists(f.name)
        {
            continue;
        }
        if f.kind == Known::XForwardedFor {
            prior_xff = Some(f.value);
            continue;
        }
        if plan.drop_names.iter().any(|n| **n == *f.name) {
            continue;
        }
        put_raw(out, f.name, f.value);
    }
    // X-Forwarded-For: the client's list with the peer appended.
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(v) = prior_xff {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(o.client_ip.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(o.client_proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    for seg in &plan.tail {
        match seg {
            Segment::Static(b) => out.extend_from_slice(b),
            Segment::Insert { name, line } => {
                if !h.contains_name(name) {
                    out.extend_from_slice(line);
                }
            }
        }
    }
    match o.framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            put_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::Close => {
            if h.contains(Known::ContentLength) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn put(out: &mut BytesMut, name: &str, value: &[u8]) {
    put_raw(out, name.as_bytes(), value);
}

fn put_raw(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

trait PushSpace {
    fn push_space(&mut self);
}

impl PushSpace for BytesMut {
    fn push_space(&mut self) {
        self.extend_from_slice(b" ");
    }
}

impl HeaderOp {
    /// The header this operation acts on.
    pub fn name(&self) -> &HeaderName {
        match self {
            HeaderOp::Insert(n, _) | HeaderOp::Replace(n, _) | HeaderOp::Remove(n) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn through_a_proxy_the_request_line_is_absolute_and_carries_proxy_auth() {
        let cfg = crate::config::load_str(
            "http_server:\n  forwards:\n    - {name: f, upstream_group: g}\nupstreams:\n  - {name: u, url: \"http://api.internal:8080/v1\"}\nupstream_groups:\n  - name: g\n    upstreams: [{name: u}]\n    http_client:\n      proxy: {url: \"http://me:pw@proxy:3128\"}\n",
        )
        .unwrap();
        let proxy = cfg.groups[0].client.proxy.as_ref().unwrap();
        let head = request(
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: c\r\nproxy-authorization: Basic client-sent\r\n\r\n",
        );
        let agent = HeaderValue::from_static("a");
        let encode = |plan: &HeadPlan| {
            let o = Outgoing {
                upstream: &cfg.upstreams[0],
                plan,
                client_ip: "192.0.2.1",
                client_proto: "http",
                framing: Framing::Empty,
            };
            let mut out = BytesMut::new();
            encode_request_head(&mut out, &head, &o);
            String::from_utf8(out.to_vec()).unwrap()
        };
        let text = encode(&HeadPlan::new(&cfg.upstreams[0], &agent, Some(proxy)));
        assert!(
            text.starts_with("POST http://api.internal:8080/v1/chat/completions?x=1 HTTP/1.1\r\n"),
            "{text}"
        );
        // Ours, once; the client's never.
        assert_eq!(text.matches("proxy-authorization: ").count(), 1, "{text}");
        assert!(
            text.contains("proxy-authorization: Basic bWU6cHc=\r\n"),
            "{text}"
        );

        let text = encode(&HeadPlan::new(&cfg.upstreams[0], &agent, None));
        assert!(text.starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"));
        assert!(!text.contains("proxy-authorization"), "{text}");
    }

    /// The encoder as it was before the plan (everything computed per request): the oracle.
    struct RefOutgoing<'a> {
        upstream: &'a Upstream,
        agent: &'a HeaderValue,
        client_ip: &'a str,
        /// `http` or `https`: how the client reached us.
        client_proto: &'static str,
        framing: Framing,
    }

    fn reference_encode(out: &mut BytesMut, req: &Request, o: &RefOutgoing<'_>) {
        let h = &req.headers;
        out.extend_from_slice(req.method.as_str().as_bytes());
        out.push_space();
        join_path(&o.upstream.base_path, req.target.as_str(), out);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(o.upstream.host_header.as_bytes());
        out.extend_from_slice(b"\r\n");

        let ops = &o.upstream.headers;
        let auth_set = !matches!(o.upstream.auth, Auth::None);
        let mut prior_xff: Option<&[u8]> = None;
        for f in h.iter() {
            if f.kind.is_hop_by_hop()
                || matches!(
                    f.kind,
                    Known::Host | Known::Expect | Known::UserAgent | Known::XForwardedProto
                )
                || (auth_set && f.kind == Known::Authorization)
                || h.connection_lists(f.name)
            {
                continue;
            }
            if f.kind == Known::XForwardedFor {
                prior_xff = Some(f.value);
                continue;
            }
            if ops.iter().any(|op| match op {
                HeaderOp::Replace(n, _) | HeaderOp::Remove(n) => n.as_str().as_bytes() == f.name,
                HeaderOp::Insert(..) => false,
            }) {
                continue;
            }
            put_raw(out, f.name, f.value);
        }
        // X-Forwarded-For: the client's list with the peer appended.
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(v) = prior_xff {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(o.client_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
        put(out, "x-forwarded-proto", o.client_proto.as_bytes());
        if !ops
            .iter()
            .any(|op| !matches!(op, HeaderOp::Insert(..)) && op.name() == USER_AGENT)
        {
            put(out, "user-agent", o.agent.as_bytes());
        }
        match &o.upstream.auth {
            Auth::None => {}
            Auth::Bearer(token) => {
                out.extend_from_slice(b"authorization: Bearer ");
                out.extend_from_slice(token.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Auth::Basic { header_value } => put(out, "authorization", header_value.as_bytes()),
        }
        for op in ops {
            match op {
                HeaderOp::Insert(n, v) => {
                    let present =
                        h.contains_name(n.as_str().as_bytes()) && !(n == AUTHORIZATION && auth_set);
                    let set_by_us = n == USER_AGENT || n == AUTHORIZATION && auth_set;
                    if !present && !set_by_us {
                        put(out, n.as_str(), v.as_bytes());
                    }
                }
                HeaderOp::Replace(n, v) => put(out, n.as_str(), v.as_bytes()),
                HeaderOp::Remove(_) => {}
            }
        }
        match o.framing {
            Framing::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                put_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            }
            Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Framing::Empty | Framing::Close => {
                if h.contains(Known::ContentLength) {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    fn upstream(extra: &str) -> Upstream {
        let yaml = format!(
            "http_server:\n  forwards: [{{name: f, upstream_group: g}}]\nupstreams:\n  - name: u\n    url: \"http://up.example:8000/v1\"\n{extra}upstream_groups:\n  - name: g\n    upstreams: [{{name: u}}]\n"
        );
        crate::config::load_str(&yaml)
            .unwrap_or_else(|e| panic!("{extra}: {e:?}"))
            .upstreams
            .remove(0)
    }

    fn request(raw: &str) -> Request {
        let mut buf = BytesMut::from(raw.as_bytes());
        crate::http::head::take_request(
            &mut buf,
            &mut crate::http::head::HeadScanner::default(),
            65536,
        )
        .unwrap()
        .unwrap()
    }

    /// The plan-based encoder writes exactly what the per-request encoder wrote, for every
    /// combination of auth, header operations (including ones on the names the proxy sets)
    /// and client fields.
    #[test]
    fn plan_matches_the_per_request_encoder() {
        let auths = [
            "",
            "    auth: {type: bearer, token: t0k}\n",
            "    auth: {type: basic, username: a, password: b}\n",
        ];
        let ops = [
            "",
            "    headers:\n      - {op: insert, key: X-Custom, value: v1}\n",
            "    headers:\n      - {op: replace, key: X-Set, value: s}\n      - {op: insert, key: X-Ins, value: i}\n      - {op: remove, key: X-Drop}\n",
            "    headers:\n      - {op: insert, key: User-Agent, value: ua}\n      - {op: insert, key: Authorization, value: mine}\n",
            "    headers:\n      - {op: replace, key: User-Agent, value: ua2}\n      - {op: remove, key: authorization}\n      - {op: insert, key: x-a, value: \"1\"}\n      - {op: replace, key: x-b, value: \"2\"}\n",
            "    headers:\n      - {op: remove, key: User-Agent}\n      - {op: insert, key: x-forwarded-for, value: bogus}\n",
        ];
        let requests = [
            "GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST /chat HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nUser-Agent: curl\r\nAuthorization: Bearer client\r\nX-Custom: c\r\nX-Set: old\r\nX-Drop: d\r\nX-Ins: present\r\n\r\n",
            "POST /v1/x?q=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-Hop\r\nX-Hop: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\nX-Forwarded-Proto: https\r\nExpect: 100-continue\r\nx-a: client\r\n\r\n",
            "GET / HTTP/1.0\r\nContent-Length: 0\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: p\r\n\r\n",
        ];
        let agent = HeaderValue::from_static("llmproxy-test/1");
        let mut cases = 0;
        for auth in auths {
            for op in ops {
                let u = upstream(&format!("{auth}{op}"));
                let plan = HeadPlan::new(&u, &agent, None);
                for raw in requests {
                    let req = request(raw);
                    let mut new = BytesMut::new();
                    let o = Outgoing {
                        upstream: &u,
                        plan: &plan,
                        client_ip: "10.0.0.7",
                        client_proto: "http",
                        framing: req.framing,
                    };
                    encode_request_head(&mut new, &req, &o);
                    let mut old = BytesMut::new();
                    let r = RefOutgoing {
                        upstream: &u,
                        agent: &agent,
                        client_ip: "10.0.0.7",
                        client_proto: "http",
                        framing: req.framing,
                    };
                    reference_encode(&mut old, &req, &r);
                    assert_eq!(
                        String::from_utf8_lossy(&new),
                        String::from_utf8_lossy(&old),
                        "{auth}{op}{raw}"
                    );
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 72);
    }

    fn join(base: &str, pq: &str) -> String {
        let mut out = BytesMut::new();
        join_path(base, pq, &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn path_join_adds_base_once() {
        assert_eq!(join("/v1", "/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(join("/v1", "/chat/completions"), "/v1/chat/completions");
        assert_eq!(join("/v1", "/v10/x?a=1"), "/v1/v10/x?a=1");
        assert_eq!(join("/v1", "/v1"), "/v1");
        assert_eq!(join("/v1", "/v1?x=/v1"), "/v1?x=/v1");
        assert_eq!(join("", "/v1/models?x=1"), "/v1/models?x=1");
        assert_eq!(join("/api/openai", "/v1/models"), "/api/openai/v1/models");
    }
}
