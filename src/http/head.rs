//! Message heads (shard, sans-IO): finding the end of a head under a size limit, parsing it with
//! httparse into a compact [`Fields`] list (no `HeaderMap`), and the framing rules that keep
//! requests from being smuggled.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::uri::PathAndQuery;
use http::{Method, StatusCode, Uri, Version};

use super::body::Framing;
use super::fields::{Fields, Known};
use super::scan::{find_crlfcrlf, has_bare_lf, has_bare_lf_from};

/// Most header fields in one head (more is 431 for requests, a bad response upstream).
pub const MAX_HEADERS: usize = 96;

/// Why a head was refused. Each maps to one status in [`crate::http::respond`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("too many header fields")]
    TooManyHeaders,
    #[error("{0}")]
    Malformed(&'static str),
    #[error("unsupported transfer-encoding")]
    UnsupportedEncoding,
    #[error("unsupported expectation")]
    Expectation,
}

/// Finds the end of a head (`\r\n\r\n`) without rescanning bytes it has already looked at, so a
/// client trickling a 64 KiB head one byte at a time costs linear, not quadratic, work.
#[derive(Debug, Default)]
pub struct HeadScanner {
    scanned: usize,
}

/// An unfinished head already holds a line ended by a bare LF: it can never be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BareLf;

impl HeadScanner {
    /// Length of the head including its final CRLFCRLF, once complete. An unfinished head with
    /// a bare LF among its new bytes is refused at once: a peer that ends lines with LF alone
    /// would never send the CRLFCRLF and be left waiting for its timeout. (A complete head is
    /// checked whole by its parser; heads that arrive in one read never take this extra scan.)
    pub fn find_end(&mut self, buf: &[u8]) -> Result<Option<usize>, BareLf> {
        let from = self.scanned.saturating_sub(3);
        match find_crlfcrlf(&buf[from..]) {
            Some(i) => {
                self.scanned = 0;
                Ok(Some(from + i + 4))
            }
            None => {
                if has_bare_lf_from(buf, self.scanned) {
                    self.scanned = 0;
                    return Err(BareLf);
                }
                self.scanned = buf.len();
                Ok(None)
            }
        }
    }

    pub fn reset(&mut self) {
        self.scanned = 0;
    }
}

/// A parsed request head and what the proxy derived from it.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    /// The origin-form target (`/path?query`, fragment cut off) sent upstream; for an
    /// absolute-form target, its path and query.
    pub target: PathAndQuery,
    pub version: Version,
    pub headers: Fields,
    pub framing: Framing,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
}

/// Tries to take one request head from the front of `buf`. `Ok(None)` means more bytes are
/// needed; a head that outgrows `max` is an error even before it is complete.
pub fn take_request(
    buf: &mut BytesMut,
    scanner: &mut HeadScanner,
    max: usize,
) -> Result<Option<Request>, HeadError> {
    // RFC 9112 §2.2: ignore empty lines before a request line.
    while buf.starts_with(b"\r\n") {
        let _ = buf.split_to(2);
        scanner.reset();
    }
    let end = scanner
        .find_end(buf)
        .map_err(|BareLf| HeadError::Malformed("bare LF in request head"))?;
    let Some(end) = end else {
        if buf.len() > max {
            return Err(HeadError::TooLarge(max));
        }
        return Ok(None);
    };
    if end > max {
        return Err(HeadError::TooLarge(max));
    }
    let mut head = buf.split_to(end);
    // httparse takes a lone LF as a line end, so `\r\n\n` would end the head for it early and
    // silently drop every header after it (a `Content-Length` among them, leaving the body to be
    // read as the next request). Heads are CRLF-delimited here.
    if has_bare_lf(&head) {
        return Err(HeadError::Malformed("bare LF in request head"));
    }
    let (method, target, version, located) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, &head, &mut slots)
        {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(HeadError::Malformed("malformed request head"))
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(httparse::Error::Version) => {
                return Err(HeadError::Malformed("unsupported HTTP version"))
            }
            Err(_) => return Err(HeadError::Malformed("malformed request head")),
        }
        let base = head.as_ptr() as usize;
        let (Some(method), Some(path)) = (req.method, req.path) else {
            return Err(HeadError::Malformed("malformed request head"));
        };
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| HeadError::Malformed("invalid method"))?;
        let start = path.as_ptr() as usize - base;
        let version = match req.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        let located = Fields::locate(head.as_ptr(), req.headers);
        (method, start..start + path.len(), version, located)
    };
    let headers = Fields::finish(&mut head, located);
    let target = parse_target(headers.raw().slice(target))?;
    request_meta(method, target, version, headers).map(Some)
}

/// A request target that parsed as a URI; [`Target::origin_form`] then decides whether the
/// proxy takes it (the two steps are apart so errors come in the order they always did).
enum Target {
    Origin(PathAndQuery),
    Other(Uri),
}

const INVALID_TARGET: HeadError = HeadError::Malformed("invalid request target");

/// Parses the request target as `http` does: origin-form directly, anything else as a URI.
fn parse_target(raw: bytes::Bytes) -> Result<Target, HeadError> {
    if raw.first() == Some(&b'/') {
        return PathAndQuery::from_maybe_shared(raw)
            .map(Target::Origin)
            .map_err(|_| INVALID_TARGET);
    }
    Uri::from_maybe_shared(raw)
        .map(Target::Other)
        .map_err(|_| INVALID_TARGET)
}

impl Target {
    /// The path and query to send upstream: origin-form as is, absolute-form (http or https
    /// scheme) without scheme and authority; asterisk- and authority-form are refused.
    fn origin_form(self) -> Result<PathAndQuery, HeadError> {
        match self {
            Target::Origin(pq) => Ok(pq),
            Target::Other(uri) => match uri.scheme_str() {
                Some("http") | Some("https") => Ok(uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"))),
                _ => Err(INVALID_TARGET),
            },
        }
    }
}

/// Applies RFC 9112 framing rules strictly: anything ambiguous is refused, because an upstream
/// that read the body differently from us would see a second, smuggled request.
fn request_meta(
    method: Method,
    target: Target,
    version: Version,
    headers: Fields,
) -> Result<Request, HeadError> {
    let h = &headers;
    let hosts = h.count(Known::Host);
    if version == Version::HTTP_11 && hosts != 1 {
        return Err(HeadError::Malformed(
            "HTTP/1.1 request needs exactly one Host header",
        ));
    }
    if hosts > 1 {
        return Err(HeadError::Malformed("duplicate Host header"));
    }
    if method == Method::CONNECT {
        return Err(HeadError::Malformed("CONNECT is not supported"));
    }
    let target = target.origin_form()?;
    let te = transfer_encoding(h)?;
    let cl = content_length(h)?;
    let framing = match (te, cl) {
        (Some(_), Some(_)) => {
            return Err(HeadError::Malformed(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        (Some(()), None) => {
            if version != Version::HTTP_11 {
                return Err(HeadError::Malformed("Transfer-Encoding in HTTP/1.0"));
            }
            Framing::Chunked
        }
        (None, Some(0)) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::Empty,
    };
    let expect_continue = match h.get(Known::Expect) {
        None => false,
        Some(v) if v.eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => return Err(HeadError::Expectation),
    };
    if h.count(Known::Expect) > 1 {
        return Err(HeadError::Expectation);
    }
    let keep_alive = keep_alive(version, h);
    // 100 Continue only makes sense to an HTTP/1.1 client that holds back a body.
    let expect_continue =
        expect_continue && version == Version::HTTP_11 && framing != Framing::Empty;
    Ok(Request {
        method,
        target,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
    })
}

/// Visible ASCII and tabs only (what `HeaderValue::to_str` accepts).
fn is_visible_ascii(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// `Some(())` when the message is chunked; an error for any other transfer coding.
fn transfer_encoding(h: &Fields) -> Result<Option<()>, HeadError> {
    let mut seen = false;
    let mut any = false;
    for v in h.values(Known::TransferEncoding) {
        any = true;
        if !is_visible_ascii(v) {
            return Err(HeadError::UnsupportedEncoding);
        }
        for token in v.split(|&b| b == b',') {
            let t = token.trim_ascii();
            if t.is_empty() {
                continue;
            }
            // Only a single `chunked` is accepted: `gzip, chunked` or `chunked, chunked` would
            // need the upstream to agree with us on every layer.
            if !t.eq_ignore_ascii_case(b"chunked") || seen {
                return Err(HeadError::UnsupportedEncoding);
            }
            seen = true;
        }
    }
    if !seen && any {
        return Err(HeadError::UnsupportedEncoding);
    }
    Ok(seen.then_some(()))
}

/// The single Content-Length value. Duplicates are refused even when equal (as nginx does).
fn content_length(h: &Fields) -> Result<Option<u64>, HeadError> {
    let mut values = h.values(Known::ContentLength);
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(HeadError::Malformed("duplicate Content-Length"));
    }
    parse_length(v)
        .map(Some)
        .ok_or(HeadError::Malformed("invalid Content-Length"))
}

/// Digits only, no sign, no list, no overflow.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Whether the peer wants the connection kept open (RFC 9112 §9.3).
pub fn keep_alive(version: Version, h: &Fields) -> bool {
    let mut close = false;
    let mut keep = false;
    for v in h.values(Known::Connection) {
        for t in v.split(|&b| b == b',') {
            let t = t.trim_ascii();
            if t.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                keep = true;
            }
        }
    }
    if close {
        return false;
    }
    match version {
        Version::HTTP_11 => true,
        _ => keep,
    }
}

/// A parsed response head with its framing.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub version: Version,
    pub headers: Fields,
    pub framing: Framing,
    /// The upstream will keep the connection open after this response.
    pub keep_alive: bool,
}

/// Why an upstream response head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseHeadError {
    #[error("response head larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed response head: {0}")]
    Malformed(&'static str),
}

/// Tries to take one response head from `buf`; `request_method` decides whether a body follows.
pub fn take_response(
    buf: &mut BytesMut,
    scanner: &mut HeadScanner,
    max: usize,
    request_method: &Method,
) -> Result<Option<Response>, ResponseHeadError> {
    let end = scanner
        .find_end(buf)
        .map_err(|BareLf| ResponseHeadError::Malformed("bare LF"))?;
    let Some(end) = end else {
        if buf.len() > max {
            return Err(ResponseHeadError::TooLarge(max));
        }
        return Ok(None);
    };
    if end > max {
        return Err(ResponseHeadError::TooLarge(max));
    }
    let mut head = buf.split_to(end);
    // As for requests: a bare LF would end the head early for httparse and hide the framing
    // headers after it.
    if has_bare_lf(&head) {
        return Err(ResponseHeadError::Malformed("bare LF"));
    }
    let (code, version, located) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, &head, &mut slots)
        {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(ResponseHeadError::Malformed("unparsable")),
        }
        let version = match res.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        let located = Fields::locate(head.as_ptr(), res.headers);
        (res.code, version, located)
    };
    let status = code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ResponseHeadError::Malformed("unparsable"))?;
    let headers = Fields::finish(&mut head, located);
    let h = &headers;
    let mut keep_alive = keep_alive(version, h);
    let framing = if request_method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else {
        match transfer_encoding(h) {
            Ok(Some(())) => Framing::Chunked,
            // RFC 9112 §6.3: another final coding means the body runs to the close.
            Err(_) => {
                keep_alive = false;
                Framing::Close
            }
            Ok(None) => match content_length(h) {
                Ok(Some(n)) => Framing::Length(n),
                Ok(None) => {
                    keep_alive = false;
                    Framing::Close
                }
                Err(_) => return Err(ResponseHeadError::Malformed("bad Content-Length")),
            },
        }
    };
    Ok(Some(Response {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> Result<Option<Request>, HeadError> {
        let mut buf = BytesMut::from(raw.as_bytes());
        take_request(&mut buf, &mut HeadScanner::default(), 65536)
    }

    #[test]
    fn scanner_finds_end_across_reads() {
        let mut s = HeadScanner::default();
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\n\r"[..]);
        assert_eq!(s.find_end(&buf), Ok(None));
        buf.extend_from_slice(b"\nbody");
        assert_eq!(s.find_end(&buf), Ok(Some(buf.len() - 4)));
    }

    #[test]
    fn an_unfinished_head_with_a_bare_lf_is_refused_without_waiting_for_its_end() {
        // A CR at the end of one read pairs with the LF that starts the next.
        let mut s = HeadScanner::default();
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r"[..]);
        assert_eq!(s.find_end(&buf), Ok(None));
        buf.extend_from_slice(b"\nHost: a\r\n");
        assert_eq!(s.find_end(&buf), Ok(None));
        buf.extend_from_slice(b"X: 1\n");
        assert_eq!(s.find_end(&buf), Err(BareLf));
        assert_eq!(
            req("GET / HTTP/1.1\nHost: a\n\n").unwrap_err(),
            HeadError::Malformed("bare LF in request head")
        );
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"[..]);
        assert_eq!(
            take_response(&mut b, &mut HeadScanner::default(), 65536, &Method::GET).unwrap_err(),
            ResponseHeadError::Malformed("bare LF")
        );
    }

    #[test]
    fn simple_get_keeps_alive() {
        let r = req("GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.framing, Framing::Empty);
        assert!(r.keep_alive);
        assert_eq!(r.target.path(), "/v1/models");
        assert_eq!(r.target.query(), Some("x=1"));
    }

    #[test]
    fn framing_rules() {
        let cases: &[(&str, Result<Framing, ()>)] = &[
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", Ok(Framing::Length(5))),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Ok(Framing::Chunked)),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", Err(())),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", Err(())),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", Err(())),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", Err(())),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", Err(())),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Err(())),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", Err(())),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", Err(())),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Err(())),
            ("GET / HTTP/1.1\r\n\r\n", Err(())),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Err(())),
            ("GET / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n", Err(())),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", Err(())),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", Err(())),
        ];
        for (raw, want) in cases {
            let got = req(raw).map(|r| r.unwrap().framing).map_err(|_| ());
            assert_eq!(&got, want, "{raw:?}");
        }
    }

    #[test]
    fn bare_lf_in_a_head_is_refused() {
        for raw in [
            // The blank bare-LF line would end the head for httparse, hiding Content-Length.
            "POST / HTTP/1.1\r\nHost: a\r\n\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n",
        ] {
            assert_eq!(
                req(raw).unwrap_err(),
                HeadError::Malformed("bare LF in request head"),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn oversized_head_is_refused_before_it_completes() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nX: "[..]);
        buf.extend_from_slice(&vec![b'a'; 70_000]);
        let e = take_request(&mut buf, &mut HeadScanner::default(), 65536).unwrap_err();
        assert_eq!(e, HeadError::TooLarge(65536));
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |raw: &str| req(raw).unwrap().unwrap().keep_alive;
        assert!(ka("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, close\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
        ));
    }

    #[test]
    fn response_framing() {
        let take = |raw: &str, m: Method| {
            let mut b = BytesMut::from(raw.as_bytes());
            take_response(&mut b, &mut HeadScanner::default(), 65536, &m)
                .unwrap()
                .unwrap()
        };
        let r = take("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::GET);
        assert_eq!((r.framing, r.keep_alive), (Framing::Length(3), true));
        let r = take("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::HEAD);
        assert_eq!(r.framing, Framing::Empty);
        let r = take("HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!((r.framing, r.keep_alive), (Framing::Close, false));
        let r = take(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::GET,
        );
        assert_eq!(r.framing, Framing::Chunked);
        let r = take("HTTP/1.1 204 No Content\r\n\r\n", Method::GET);
        assert_eq!(r.framing, Framing::Empty);
        let mut b =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nX: 1\r\n\nContent-Length: 3\r\n\r\nabc"[..]);
        assert!(take_response(&mut b, &mut HeadScanner::default(), 65536, &Method::GET).is_err());
    }

    #[test]
    fn request_fields_are_lowercased_in_wire_order() {
        let r = req("POST /v1/x HTTP/1.1\r\nHost: a\r\nX-Trace: 1\r\nContent-Length: 0\r\nx-trace: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.version, Version::HTTP_11);
        let got: Vec<(&[u8], &[u8])> = r.headers.iter().map(|f| (f.name, f.value)).collect();
        assert_eq!(
            got,
            vec![
                (&b"host"[..], &b"a"[..]),
                (b"x-trace", b"1"),
                (b"content-length", b"0"),
                (b"x-trace", b"2"),
            ]
        );
    }

    #[test]
    fn request_targets() {
        let target = |t: &str| {
            req(&format!("GET {t} HTTP/1.1\r\nHost: a\r\n\r\n"))
                .map(|r| r.unwrap().target.as_str().to_owned())
        };
        assert_eq!(target("/").unwrap(), "/");
        assert_eq!(target("/a/b?c=d&e").unwrap(), "/a/b?c=d&e");
        // The fragment never goes upstream.
        assert_eq!(target("/a#frag").unwrap(), "/a");
        // `http` lets these through in paths (as browsers send them); so did the proxy before.
        assert_eq!(target("/a\"b{c}|").unwrap(), "/a\"b{c}|");
        assert_eq!(target("http://example.com/echo?x=1").unwrap(), "/echo?x=1");
        assert_eq!(target("HTTPS://example.com:8443/v1").unwrap(), "/v1");
        let bare = req("GET http://example.com HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(bare.target.path(), "/");
        for bad in [
            "*",
            "example.com:80",
            "ftp://example.com/x",
            "?x=1",
            "%2F",
            "|/x",
            "http:///x",
        ] {
            assert_eq!(
                target(bad),
                Err(HeadError::Malformed("invalid request target")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn malformed_request_heads() {
        let cases: &[(&[u8], HeadError)] = &[
            (
                b"GET /a HTTP/2.0\r\nHost: a\r\n\r\n",
                HeadError::Malformed("unsupported HTTP version"),
            ),
            (
                b"GET /a\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"GE(T /a HTTP/1.1\r\nHost: a\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"GET  /a HTTP/1.1\r\nHost: a\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: a\0b\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"GET /a HTTP/1.1\r\nHost: a\r\nX@A: 1\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"GET /a HTTP/1.1\r\nHost: a\r\nX-A\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"GET /a HTTP/1.1\r\nHost: a\r\nX-A : 1\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"GET /a HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
            (
                b"\xff /a HTTP/1.1\r\nHost: a\r\n\r\n",
                HeadError::Malformed("malformed request head"),
            ),
        ];
        for (raw, want) in cases {
            let mut buf = BytesMut::from(*raw);
            let got = take_request(&mut buf, &mut HeadScanner::default(), 65536).unwrap_err();
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn header_count_limit() {
        let head = |n: usize| {
            let mut s = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
            for i in 1..n {
                s.push_str(&format!("X-H{i}: {i}\r\n"));
            }
            s + "\r\n"
        };
        assert_eq!(
            req(&head(MAX_HEADERS)).unwrap().unwrap().headers.len(),
            MAX_HEADERS
        );
        assert_eq!(
            req(&head(MAX_HEADERS + 1)).unwrap_err(),
            HeadError::TooManyHeaders
        );
    }

    #[test]
    fn long_names_and_values_within_the_head_limit() {
        // Longer than any `HeaderName` could hold: the fields list has no such limit.
        let name = "X".repeat(70_000);
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{name}: v\r\nX-V: {}\r\n\r\n",
            "v".repeat(70_000)
        );
        let mut buf = BytesMut::from(raw.as_bytes());
        let r = take_request(&mut buf, &mut HeadScanner::default(), 1 << 20)
            .unwrap()
            .unwrap();
        let f: Vec<_> = r.headers.iter().collect();
        assert_eq!(f[1].name, name.to_ascii_lowercase().as_bytes());
        assert_eq!(f[2].value.len(), 70_000);
    }

    #[test]
    fn pipelined_heads_leave_the_rest_in_the_buffer() {
        let mut buf = BytesMut::from(
            &b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3"[..],
        );
        let mut sc = HeadScanner::default();
        let a = take_request(&mut buf, &mut sc, 65536).unwrap().unwrap();
        let b = take_request(&mut buf, &mut sc, 65536).unwrap().unwrap();
        assert_eq!((a.target.as_str(), b.target.as_str()), ("/1", "/2"));
        assert!(take_request(&mut buf, &mut sc, 65536).unwrap().is_none());
        assert_eq!(&buf[..], b"GET /3");
    }

    #[test]
    fn malformed_response_heads() {
        for raw in [
            &b"HTTP/1.1 099 Low\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
            b"HTTX/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX@: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\0b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        ] {
            let mut b = BytesMut::from(raw);
            assert!(
                take_response(&mut b, &mut HeadScanner::default(), 65536, &Method::GET).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        let mut b = BytesMut::from(many.as_bytes());
        assert!(take_response(&mut b, &mut HeadScanner::default(), 65536, &Method::GET).is_err());
    }

    #[test]
    fn response_status_reason_and_codings() {
        let take = |raw: &[u8]| {
            let mut b = BytesMut::from(raw);
            take_response(&mut b, &mut HeadScanner::default(), 65536, &Method::GET)
                .unwrap()
                .unwrap()
        };
        // Reason phrases are not kept (the proxy writes the canonical one); a missing one is fine.
        let r = take(b"HTTP/1.1 201\r\nContent-Length: 0\r\n\r\n");
        assert_eq!((r.status.as_u16(), r.framing), (201, Framing::Length(0)));
        let r = take(b"HTTP/1.1 404 Not Here At All\r\nContent-Length: 2\r\n\r\n");
        assert_eq!((r.status.as_u16(), r.framing), (404, Framing::Length(2)));
        let r = take(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n");
        assert_eq!((r.version, r.keep_alive), (Version::HTTP_10, false));
        let r = take(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n");
        assert!(!r.keep_alive);
        // A coding other than chunked runs to the close; so does an undecodable one.
        let r = take(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!((r.framing, r.keep_alive), (Framing::Close, false));
        let r = take(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \xe9chunked\r\n\r\n");
        assert_eq!((r.framing, r.keep_alive), (Framing::Close, false));
        let r = take(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Type: text/event-stream\r\n\r\n");
        assert_eq!(r.framing, Framing::Chunked);
        assert_eq!(
            r.headers.get(Known::ContentType),
            Some(&b"text/event-stream"[..])
        );
    }
}
