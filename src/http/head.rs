//! Message heads (shard, sans-IO): finding the end of a head under a size limit, parsing it with
//! monoio-http's decoders, and the framing rules that keep requests from being smuggled.

use bytes::BytesMut;
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Version};
use monoio_codec::{Decoded, Decoder};
use monoio_http::h1::codec::decoder::{DecodeError, RequestHeadDecoder, ResponseHeadDecoder};

use super::body::Framing;

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

impl HeadScanner {
    /// Length of the head including its final CRLFCRLF, once complete.
    pub fn find_end(&mut self, buf: &[u8]) -> Option<usize> {
        let from = self.scanned.saturating_sub(3);
        match memchr_crlfcrlf(&buf[from..]) {
            Some(i) => {
                self.scanned = 0;
                Some(from + i + 4)
            }
            None => {
                self.scanned = buf.len();
                None
            }
        }
    }

    pub fn reset(&mut self) {
        self.scanned = 0;
    }
}

fn memchr_crlfcrlf(hay: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 4 <= hay.len() {
        // Jump between '\n' bytes: heads are mostly text between line ends.
        match hay[i + 3..].iter().position(|&b| b == b'\n') {
            None => return None,
            Some(p) => {
                let j = i + p; // candidate start
                if &hay[j..j + 4] == b"\r\n\r\n" {
                    return Some(j);
                }
                i = j + 1;
            }
        }
    }
    None
}

/// A parsed request head and what the proxy derived from it.
#[derive(Debug)]
pub struct Request {
    pub head: http::request::Parts,
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
    let Some(end) = scanner.find_end(buf) else {
        if buf.len() > max {
            return Err(HeadError::TooLarge(max));
        }
        return Ok(None);
    };
    if end > max {
        return Err(HeadError::TooLarge(max));
    }
    let mut head_bytes = buf.split_to(end);
    // httparse takes a lone LF as a line end, so `\r\n\n` would end the head for it early and
    // the decoder would silently drop every header after it (a `Content-Length` among them,
    // leaving the body to be read as the next request). Heads are CRLF-delimited here.
    if has_bare_lf(&head_bytes) {
        return Err(HeadError::Malformed("bare LF in request head"));
    }
    let head = match RequestHeadDecoder.decode(&mut head_bytes) {
        Ok(Decoded::Some(h)) => h,
        Ok(_) => return Err(HeadError::Malformed("malformed request head")),
        Err(e) => return Err(map_decode_error(e)),
    };
    request_meta(head).map(Some)
}

/// A `\n` not preceded by `\r`.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

fn map_decode_error(e: DecodeError) -> HeadError {
    match e {
        DecodeError::Parse(httparse::Error::TooManyHeaders) => HeadError::TooManyHeaders,
        DecodeError::Parse(httparse::Error::Version) => {
            HeadError::Malformed("unsupported HTTP version")
        }
        DecodeError::Uri(_) => HeadError::Malformed("invalid request target"),
        DecodeError::Method(_) => HeadError::Malformed("invalid method"),
        _ => HeadError::Malformed("malformed request head"),
    }
}

/// Applies RFC 9112 framing rules strictly: anything ambiguous is refused, because an upstream
/// that read the body differently from us would see a second, smuggled request.
fn request_meta(head: http::request::Parts) -> Result<Request, HeadError> {
    let h = &head.headers;
    if head.version == Version::HTTP_11 && h.get_all(HOST).iter().count() != 1 {
        return Err(HeadError::Malformed(
            "HTTP/1.1 request needs exactly one Host header",
        ));
    }
    if h.get_all(HOST).iter().count() > 1 {
        return Err(HeadError::Malformed("duplicate Host header"));
    }
    if head.method == Method::CONNECT {
        return Err(HeadError::Malformed("CONNECT is not supported"));
    }
    match (head.uri.scheme_str(), head.uri.path()) {
        (None, p) if p.starts_with('/') => {}
        (Some("http") | Some("https"), _) => {}
        _ => return Err(HeadError::Malformed("invalid request target")),
    }
    let te = transfer_encoding(h)?;
    let cl = content_length(h)?;
    let framing = match (te, cl) {
        (Some(_), Some(_)) => {
            return Err(HeadError::Malformed(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        (Some(()), None) => {
            if head.version != Version::HTTP_11 {
                return Err(HeadError::Malformed("Transfer-Encoding in HTTP/1.0"));
            }
            Framing::Chunked
        }
        (None, Some(0)) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::Empty,
    };
    let expect_continue = match h.get(EXPECT) {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => return Err(HeadError::Expectation),
    };
    if h.get_all(EXPECT).iter().count() > 1 {
        return Err(HeadError::Expectation);
    }
    let keep_alive = keep_alive(head.version, h);
    // 100 Continue only makes sense to an HTTP/1.1 client that holds back a body.
    let expect_continue =
        expect_continue && head.version == Version::HTTP_11 && framing != Framing::Empty;
    Ok(Request {
        head,
        framing,
        keep_alive,
        expect_continue,
    })
}

/// `Some(())` when the message is chunked; an error for any other transfer coding.
fn transfer_encoding(h: &HeaderMap) -> Result<Option<()>, HeadError> {
    let mut seen = false;
    for v in h.get_all(TRANSFER_ENCODING) {
        let s = v.to_str().map_err(|_| HeadError::UnsupportedEncoding)?;
        for token in s.split(',') {
            let t = token.trim();
            if t.is_empty() {
                continue;
            }
            // Only a single `chunked` is accepted: `gzip, chunked` or `chunked, chunked` would
            // need the upstream to agree with us on every layer.
            if !t.eq_ignore_ascii_case("chunked") || seen {
                return Err(HeadError::UnsupportedEncoding);
            }
            seen = true;
        }
    }
    if !seen && h.contains_key(TRANSFER_ENCODING) {
        return Err(HeadError::UnsupportedEncoding);
    }
    Ok(seen.then_some(()))
}

/// The single Content-Length value. Duplicates are refused even when equal (as nginx does).
fn content_length(h: &HeaderMap) -> Result<Option<u64>, HeadError> {
    let mut values = h.get_all(CONTENT_LENGTH).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(HeadError::Malformed("duplicate Content-Length"));
    }
    parse_length(v.as_bytes())
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
pub fn keep_alive(version: Version, h: &HeaderMap) -> bool {
    let mut close = false;
    let mut keep = false;
    for v in h.get_all(CONNECTION) {
        for t in v.as_bytes().split(|&b| b == b',') {
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
    pub head: http::response::Parts,
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
    let Some(end) = scanner.find_end(buf) else {
        if buf.len() > max {
            return Err(ResponseHeadError::TooLarge(max));
        }
        return Ok(None);
    };
    if end > max {
        return Err(ResponseHeadError::TooLarge(max));
    }
    let mut head_bytes = buf.split_to(end);
    // As for requests: a bare LF would end the head early for httparse and hide the framing
    // headers after it.
    if has_bare_lf(&head_bytes) {
        return Err(ResponseHeadError::Malformed("bare LF"));
    }
    let head = match ResponseHeadDecoder.decode(&mut head_bytes) {
        Ok(Decoded::Some(h)) => h,
        _ => return Err(ResponseHeadError::Malformed("unparsable")),
    };
    let status = head.status;
    let h = &head.headers;
    let mut keep_alive = keep_alive(head.version, h);
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
        head,
        framing,
        keep_alive,
    }))
}

/// Header names that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// framing headers the proxy rewrites itself.
pub fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

/// Header names listed in `Connection` (also hop-by-hop for this message).
pub fn connection_listed(h: &HeaderMap, name: &http::HeaderName) -> bool {
    h.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| {
            t.trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes())
        })
    })
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
        assert_eq!(s.find_end(&buf), None);
        buf.extend_from_slice(b"\nbody");
        assert_eq!(s.find_end(&buf), Some(buf.len() - 4));
    }

    #[test]
    fn simple_get_keeps_alive() {
        let r = req("GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.framing, Framing::Empty);
        assert!(r.keep_alive);
        assert_eq!(r.head.uri.path(), "/v1/models");
        assert_eq!(r.head.uri.query(), Some("x=1"));
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
        let mut h = HeaderMap::new();
        assert!(keep_alive(Version::HTTP_11, &h));
        assert!(!keep_alive(Version::HTTP_10, &h));
        h.insert(CONNECTION, "Keep-Alive".parse().unwrap());
        assert!(keep_alive(Version::HTTP_10, &h));
        h.insert(CONNECTION, "foo, close".parse().unwrap());
        assert!(!keep_alive(Version::HTTP_11, &h));
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
}
