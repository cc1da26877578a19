//! Responses the proxy writes itself (shard): the response head encoder used for relayed
//! answers, and canned JSON errors in the OpenAI error shape.

use bytes::BytesMut;
use http::{StatusCode, Version};

use super::fields::{Fields, Known};

/// How the body the proxy sends to the client is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyOut {
    /// No body (HEAD, 204, 304) — upstream's Content-Length is kept for HEAD.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until close (HTTP/1.0 client and a body of unknown length).
    Close,
}

/// Appends a response head: status line, the upstream's end-to-end headers, then framing and
/// connection headers chosen by the proxy. `client` is the client's HTTP version: an HTTP/1.0
/// client closes after any answer that does not say `Connection: keep-alive`.
pub fn encode_response_head(
    out: &mut BytesMut,
    status: StatusCode,
    headers: &Fields,
    body: BodyOut,
    keep_alive: bool,
    keep_upstream_length: bool,
    client: Version,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    for f in headers.iter() {
        let is_length = f.kind == Known::ContentLength;
        if (f.kind.is_hop_by_hop() && !(is_length && keep_upstream_length))
            || headers.connection_lists(f.name)
        {
            continue;
        }
        out.extend_from_slice(f.name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(f.value);
        out.extend_from_slice(b"\r\n");
    }
    match body {
        BodyOut::None => {}
        BodyOut::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            put_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyOut::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyOut::Close => {}
    }
    put_connection(out, keep_alive && body != BodyOut::Close, client);
    out.extend_from_slice(b"\r\n");
}

/// The `Connection` field the proxy's answers carry: `close` when the connection ends after
/// them, `keep-alive` for an HTTP/1.0 client it keeps (which would close otherwise), none else.
fn put_connection(out: &mut BytesMut, keep_alive: bool, client: Version) {
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if client == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// Appends `n` in decimal (no allocation).
pub fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// An error the proxy answers itself, in the OpenAI error shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: StatusCode,
    /// OpenAI `error.type`.
    pub kind: &'static str,
    /// OpenAI `error.code` and our metric label.
    pub code: &'static str,
    pub message: &'static str,
}

impl ErrorReply {
    pub const fn new(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: &'static str,
    ) -> Self {
        let status = match StatusCode::from_u16(status) {
            Ok(s) => s,
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ErrorReply {
            status,
            kind,
            code,
            message,
        }
    }
}

/// Appends a complete error response (head and JSON body); `client` as for
/// [`encode_response_head`].
pub fn encode_error(
    out: &mut BytesMut,
    e: &ErrorReply,
    keep_alive: bool,
    client: Version,
    extra: &[(&str, &str)],
) {
    let body = format!(
        "{{\"error\":{{\"message\":{},\"type\":\"{}\",\"code\":\"{}\"}}}}\n",
        json_string(e.message),
        e.kind,
        e.code
    );
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(e.status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(e.status.canonical_reason().unwrap_or("Error").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (k, v) in extra {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    put_connection(out, keep_alive, client);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The errors the proxy can answer, in one table.
pub mod errors {
    use super::ErrorReply;

    pub const BAD_REQUEST: ErrorReply = ErrorReply::new(
        400,
        "invalid_request_error",
        "bad_request",
        "malformed HTTP request",
    );
    pub const HEAD_TOO_LARGE: ErrorReply = ErrorReply::new(
        431,
        "invalid_request_error",
        "request_header_fields_too_large",
        "request head too large",
    );
    pub const BODY_TOO_LARGE: ErrorReply = ErrorReply::new(
        413,
        "invalid_request_error",
        "payload_too_large",
        "request body too large",
    );
    pub const HEAD_TIMEOUT: ErrorReply = ErrorReply::new(
        408,
        "invalid_request_error",
        "request_timeout",
        "request not received in time",
    );
    pub const EXPECTATION: ErrorReply = ErrorReply::new(
        417,
        "invalid_request_error",
        "expectation_failed",
        "only Expect: 100-continue is supported",
    );
    pub const UPSTREAM_UNREACHABLE: ErrorReply = ErrorReply::new(
        502,
        "server_error",
        "upstream_unreachable",
        "could not connect to the upstream",
    );
    pub const UPSTREAM_TLS_CERTIFICATE: ErrorReply = ErrorReply::new(
        502,
        "server_error",
        "upstream_tls_error",
        "the upstream's TLS certificate was rejected (not trusted, expired, or not for this host)",
    );
    pub const UPSTREAM_TLS_HANDSHAKE: ErrorReply = ErrorReply::new(
        502,
        "server_error",
        "upstream_tls_error",
        "the TLS handshake with the upstream failed",
    );
    pub const PROXY_UNREACHABLE: ErrorReply = ErrorReply::new(
        502,
        "server_error",
        "upstream_proxy_error",
        "could not connect to the outbound proxy",
    );
    pub const PROXY_AUTH: ErrorReply = ErrorReply::new(
        502,
        "server_error",
        "upstream_proxy_error",
        "the outbound proxy requires authentication or rejected the credentials (407)",
    );
    pub const PROXY_FORBIDDEN: ErrorReply = ErrorReply::new(
        502,
        "server_error",
        "upstream_proxy_error",
        "the outbound proxy refused the tunnel to the upstream (403)",
    );
    pub const PROXY_REFUSED: ErrorReply = ErrorReply::new(
        502,
        "server_error",
        "upstream_proxy_error",
        "the outbound proxy could not open a tunnel to the upstream",
    );
    pub const PROXY_BAD_RESPONSE: ErrorReply = ErrorReply::new(
        502,
        "server_error",
        "upstream_proxy_error",
        "the outbound proxy sent an invalid answer to CONNECT",
    );
    pub const UPSTREAM_BAD_RESPONSE: ErrorReply = ErrorReply::new(
        502,
        "server_error",
        "upstream_bad_response",
        "the upstream closed the connection or sent an invalid response",
    );
    pub const UPSTREAM_TIMEOUT: ErrorReply = ErrorReply::new(
        504,
        "server_error",
        "upstream_timeout",
        "the upstream did not answer in time",
    );
    pub const NO_UPSTREAM: ErrorReply = ErrorReply::new(
        503,
        "server_error",
        "no_upstream_available",
        "no upstream available in the group",
    );
    pub const RATE_LIMITED: ErrorReply = ErrorReply::new(
        429,
        "rate_limit_error",
        crate::metrics::RATE_LIMITED,
        "too many requests from this client; retry after the Retry-After delay",
    );
    pub const UPSTREAM_RATE_LIMITED: ErrorReply = ErrorReply::new(
        429,
        "rate_limit_error",
        "upstream_rate_limited",
        "every upstream of the group is at its configured rate; retry after the Retry-After delay",
    );
    pub const SHUTTING_DOWN: ErrorReply = ErrorReply::new(
        503,
        "server_error",
        "shutting_down",
        "the proxy is shutting down",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_openai_shaped_json() {
        let mut out = BytesMut::new();
        encode_error(
            &mut out,
            &errors::UPSTREAM_TIMEOUT,
            false,
            Version::HTTP_11,
            &[],
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"));
        assert!(head.contains("connection: close"));
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "upstream_timeout");
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["message"].is_string());
    }

    #[test]
    fn decimal() {
        for n in [0u64, 7, 10, 99, 1234567890, u64::MAX] {
            let mut out = BytesMut::new();
            put_decimal(&mut out, n);
            assert_eq!(&out[..], n.to_string().as_bytes());
        }
    }

    #[test]
    fn relayed_head_drops_hop_by_hop() {
        let mut raw = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"[..],
        );
        let r = crate::http::head::take_response(
            &mut raw,
            &mut crate::http::head::HeadScanner::default(),
            65536,
            &http::Method::GET,
        )
        .unwrap()
        .unwrap();
        let mut out = BytesMut::new();
        encode_response_head(
            &mut out,
            StatusCode::OK,
            &r.headers,
            BodyOut::Chunked,
            true,
            false,
            Version::HTTP_11,
        );
        let s = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn an_http10_client_kept_alive_is_told_so() {
        let head = |keep: bool, body: BodyOut, v: Version| {
            let mut out = BytesMut::new();
            encode_response_head(
                &mut out,
                StatusCode::OK,
                &Fields::default(),
                body,
                keep,
                false,
                v,
            );
            String::from_utf8(out.to_vec()).unwrap()
        };
        let ten = Version::HTTP_10;
        assert!(head(true, BodyOut::Length(0), ten).contains("connection: keep-alive\r\n"));
        assert!(!head(true, BodyOut::Length(0), Version::HTTP_11).contains("connection:"));
        assert!(head(false, BodyOut::Length(0), ten).contains("connection: close\r\n"));
        assert!(head(true, BodyOut::Close, ten).contains("connection: close\r\n"));
    }
}
