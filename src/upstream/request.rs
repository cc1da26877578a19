//! The outgoing request head (shard, sans-IO): path joined with the upstream's base path once,
//! `Host` rewritten, hop-by-hop headers stripped, forwarding headers added, auth and header
//! operations applied.

use bytes::BytesMut;
use http::header::{AUTHORIZATION, HOST, USER_AGENT};
use http::{HeaderName, HeaderValue};

use crate::config::{Auth, HeaderOp, Proxy, Upstream};
use crate::http::body::Framing;
use crate::http::head::{connection_listed, is_hop_by_hop};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Joins the upstream's base path and the client's path: the base is added unless the client
/// path already starts with it as a whole segment (`/v1` + `/v1/chat` → `/v1/chat`,
/// `/v1` + `/chat` → `/v1/chat`, `/v1` + `/v10` → `/v1/v10`).
pub fn join_path(base: &str, path_and_query: &str, out: &mut BytesMut) {
    let path_end = path_and_query.find('?').unwrap_or(path_and_query.len());
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

/// Everything the encoder needs to know about this hop.
pub struct Outgoing<'a> {
    pub upstream: &'a Upstream,
    pub agent: &'a HeaderValue,
    pub client_ip: &'a str,
    /// `http` or `https`: how the client reached us.
    pub client_proto: &'static str,
    pub framing: Framing,
    /// The outbound proxy this request is sent to (http upstreams only): the request line
    /// takes the absolute form and `Proxy-Authorization` is added when it has credentials.
    pub proxy: Option<&'a Proxy>,
}

/// Appends the request head sent to the upstream.
pub fn encode_request_head(out: &mut BytesMut, req: &http::request::Parts, o: &Outgoing<'_>) {
    let h = &req.headers;
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push_space();
    let pq = req
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    if o.proxy.is_some() {
        out.extend_from_slice(b"http://");
        out.extend_from_slice(o.upstream.host_header.as_bytes());
    }
    // Go dialect only: the URL's own path replaces the client's (decided at config load).
    match &o.upstream.replace_path {
        None => join_path(&o.upstream.base_path, pq, out),
        Some(r) => r.write(pq, out),
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(o.upstream.host_header.as_bytes());
    out.extend_from_slice(b"\r\n");

    let ops = &o.upstream.headers;
    let auth_set = !matches!(o.upstream.auth, Auth::None);
    let mut prior_xff: Option<&HeaderValue> = None;
    for (name, value) in h {
        if name == HOST
            || is_hop_by_hop(name)
            || connection_listed(h, name)
            || name == http::header::EXPECT
            || name == USER_AGENT
            || name == X_FORWARDED_PROTO
            || (auth_set && name == AUTHORIZATION)
        {
            continue;
        }
        if name == X_FORWARDED_FOR {
            prior_xff = Some(value);
            continue;
        }
        if ops.iter().any(|op| match op {
            HeaderOp::Replace(n, _) | HeaderOp::Remove(n) => n == name,
            HeaderOp::Insert(..) => false,
        }) {
            continue;
        }
        put(out, name.as_str(), value.as_bytes());
    }
    // X-Forwarded-For: the client's list with the peer appended.
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(v) = prior_xff {
        out.extend_from_slice(v.as_bytes());
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
    if let Some(auth) = o.proxy.and_then(|p| p.authorization.as_deref()) {
        put(out, "proxy-authorization", auth.as_bytes());
    }
    for op in ops {
        match op {
            HeaderOp::Insert(n, v) => {
                let present = h.contains_key(n) && !(n == AUTHORIZATION && auth_set);
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
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::Close => {
            if req.headers.contains_key(http::header::CONTENT_LENGTH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn put(out: &mut BytesMut, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
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
        let (head, _) = http::Request::builder()
            .method("POST")
            .uri("/v1/chat/completions?x=1")
            .header("proxy-authorization", "Basic client-sent")
            .body(())
            .unwrap()
            .into_parts();
        let agent = HeaderValue::from_static("a");
        let mut o = Outgoing {
            upstream: &cfg.upstreams[0],
            agent: &agent,
            client_ip: "192.0.2.1",
            client_proto: "http",
            framing: Framing::Empty,
            proxy: Some(proxy),
        };
        let mut out = BytesMut::new();
        encode_request_head(&mut out, &head, &o);
        let text = String::from_utf8(out.to_vec()).unwrap();
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

        o.proxy = None;
        out.clear();
        encode_request_head(&mut out, &head, &o);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"));
        assert!(!text.contains("proxy-authorization"), "{text}");
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
