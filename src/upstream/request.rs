//! The outgoing request head (shard, sans-IO): path joined with the upstream's base path once,
//! `Host` rewritten, hop-by-hop headers stripped, forwarding headers added, auth and header
//! operations applied.

use bytes::BytesMut;
use http::header::{AUTHORIZATION, USER_AGENT};
use http::{HeaderName, HeaderValue};

use crate::config::{Auth, HeaderOp, Upstream};
use crate::http::body::Framing;
use crate::http::fields::Known;
use crate::http::head::Request;
use crate::http::respond::put_decimal;

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
}

/// Appends the request head sent to the upstream.
pub fn encode_request_head(out: &mut BytesMut, req: &Request, o: &Outgoing<'_>) {
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
