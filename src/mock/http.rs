//! Minimal, strict HTTP/1.1 request parsing for the mock (httparse based).
//!
//! Nothing here panics on input: every malformed request becomes a
//! [`BadRequest`] which the connection answers with 400 and a close.

/// Maximum size of a request head (request line + headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Maximum size of a request body (either framing).
pub const MAX_BODY: usize = 64 * 1024 * 1024;
/// Maximum number of request headers.
const MAX_HEADERS: usize = 128;

/// Why a request was rejected. The text goes into the 400 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub &'static str);

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(usize),
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    /// Request target exactly as it appeared in the request line.
    pub path: String,
    /// Minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Headers in received order, names with their original case.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head, including the final CRLF CRLF.
    pub head_len: usize,
    pub body: BodyKind,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl Head {
    /// First header value with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Header value as trimmed UTF-8 text (None if missing or not UTF-8).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Request path without the query string.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn parse_content_length(v: &[u8]) -> Result<usize, BadRequest> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(BadRequest("invalid Content-Length"));
    }
    let mut n: usize = 0;
    for d in v {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(d - b'0')))
            .ok_or(BadRequest("invalid Content-Length"))?;
    }
    Ok(n)
}

/// Try to parse a request head from the start of `buf`.
///
/// `Ok(None)` means more bytes are needed (the caller enforces [`MAX_HEAD`]).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, BadRequest> {
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hdrs);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(BadRequest("request head too large"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(BadRequest("too many headers")),
        Err(_) => return Err(BadRequest("malformed request head")),
    };
    if head_len > MAX_HEAD {
        return Err(BadRequest("request head too large"));
    }
    let method = req.method.unwrap_or("").to_string();
    let path = req.path.unwrap_or("").to_string();
    let version = req.version.unwrap_or(1);

    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut te_seen = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut expect_continue = false;
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value)?;
            if content_length.is_some_and(|old| old != n) {
                return Err(BadRequest("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            te_seen = true;
            // Only "chunked" as the final coding is supported.
            let last = value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            conn_close |= has_token(value, "close");
            conn_keep_alive |= has_token(value, "keep-alive");
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        headers.push((name.to_string(), value.to_vec()));
    }
    if te_seen && !chunked {
        return Err(BadRequest("unsupported Transfer-Encoding"));
    }
    if te_seen && version == 0 {
        return Err(BadRequest("Transfer-Encoding in HTTP/1.0"));
    }
    if te_seen && content_length.is_some() {
        return Err(BadRequest("both Content-Length and Transfer-Encoding"));
    }
    let body = if chunked {
        BodyKind::Chunked
    } else {
        match content_length {
            Some(n) if n > MAX_BODY => return Err(BadRequest("request body too large")),
            Some(0) | None => BodyKind::None,
            Some(n) => BodyKind::Length(n),
        }
    };
    let keep_alive = if version == 0 {
        conn_keep_alive && !conn_close
    } else {
        !conn_close
    };
    Ok(Some(Head {
        method,
        path,
        version,
        headers,
        head_len,
        body,
        keep_alive,
        expect_continue,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataCrlf,
    Trailer,
    Done,
}

/// Incremental chunked-body decoder. Feed it the bytes after the head (the
/// same, growing slice every time); it remembers how far it got.
#[derive(Debug)]
pub struct ChunkedDecoder {
    pos: usize,
    state: ChunkState,
    pub body: Vec<u8>,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            pos: 0,
            state: ChunkState::Size,
            body: Vec::new(),
        }
    }
}

impl ChunkedDecoder {
    /// Bytes of `buf` consumed so far (the whole encoded body once done).
    pub fn consumed(&self) -> usize {
        self.pos
    }

    /// Advance over `buf`. Returns `Ok(true)` once the whole body (including
    /// trailers) has been decoded.
    pub fn advance(&mut self, buf: &[u8]) -> Result<bool, BadRequest> {
        loop {
            let rest = buf.get(self.pos..).unwrap_or(&[]);
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, size))) => {
                        self.pos += n;
                        if size == 0 {
                            self.state = ChunkState::Trailer;
                        } else {
                            if size > (MAX_BODY - self.body.len()) as u64 {
                                return Err(BadRequest("request body too large"));
                            }
                            self.state = ChunkState::Data(size);
                        }
                    }
                    Ok(httparse::Status::Partial) => {
                        if rest.len() > 1024 {
                            return Err(BadRequest("chunk size line too long"));
                        }
                        return Ok(false);
                    }
                    Err(_) => return Err(BadRequest("invalid chunk size")),
                },
                ChunkState::Data(remaining) => {
                    if rest.is_empty() {
                        return Ok(false);
                    }
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(rest.len());
                    self.body.extend_from_slice(&rest[..take]);
                    self.pos += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCrlf
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataCrlf => {
                    if rest.len() < 2 {
                        return Ok(false);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(BadRequest("missing CRLF after chunk data"));
                    }
                    self.pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer => match rest.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        self.pos += 2;
                        self.state = ChunkState::Done;
                    }
                    Some(i) => self.pos += i + 2, // skip a trailer field
                    None => {
                        if rest.len() > MAX_HEAD {
                            return Err(BadRequest("trailers too large"));
                        }
                        return Ok(false);
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_simple_get() {
        let h = parse_head(b"GET /echo?a=1 HTTP/1.1\r\nHost: x\r\nX-Foo: Bar\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/echo?a=1");
        assert_eq!(h.path_only(), "/echo");
        assert_eq!(h.headers[1].0, "X-Foo");
        assert_eq!(h.body, BodyKind::None);
        assert!(h.keep_alive);
        assert_eq!(h.head_len, 47);
    }

    #[test]
    fn keep_alive_rules() {
        let h = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = parse_head(b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
    }

    #[test]
    fn partial_and_limits() {
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost").unwrap().is_none());
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert!(parse_head(&big).is_err());
        assert!(parse_head(b"GARBAGE\r\n\r\n").is_err());
    }

    #[test]
    fn rejects_bad_framing() {
        for req in [
            &b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert!(parse_head(req).is_err(), "{}", String::from_utf8_lossy(req));
        }
        let h = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyKind::Length(3));
    }

    #[test]
    fn chunked_incremental() {
        let enc = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let mut d = ChunkedDecoder::default();
        for i in 0..enc.len() - 4 {
            assert!(!d.advance(&enc[..i]).unwrap(), "done early at {i}");
        }
        assert!(d.advance(enc).unwrap());
        assert_eq!(d.body, b"hello world");
        assert_eq!(d.consumed(), enc.len() - 4);
    }

    #[test]
    fn chunked_errors() {
        let mut d = ChunkedDecoder::default();
        assert!(d.advance(b"zz\r\n").is_err());
        let mut d = ChunkedDecoder::default();
        assert!(d.advance(b"2\r\nabXX").is_err());
        let mut d = ChunkedDecoder::default();
        assert!(d.advance(b"ffffffffffffffff\r\n").is_err());
    }
}
