//! Message body framing (shard, sans-IO): pulls body bytes out of a connection's read buffer as
//! they arrive. Chunked data is emitted before its chunk is complete, so a large chunk is never
//! buffered whole and an SSE event goes out as soon as its bytes are in.

use bytes::{Buf, Bytes, BytesMut};

use super::scan::find_crlf;

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the peer closes the connection (responses only).
    Close,
}

/// What the decoder produced from the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes, in order.
    Data(Bytes),
    /// The buffer holds no more body bytes; read more.
    NeedMore,
    /// The body ended; bytes after it stay in the buffer (the next message).
    Done,
}

/// The peer broke the framing rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("chunk size too large")]
    ChunkTooLarge,
    #[error("chunk data not followed by CRLF")]
    ChunkCrlf,
    #[error("chunk extension or trailer section too long")]
    LineTooLong,
    #[error("body larger than the limit")]
    TooLarge,
}

/// Longest chunk-size line (with extensions) and trailer section we accept.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// After chunk data, expecting CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty line; bytes seen so far.
    Trailers(usize),
    Done,
}

/// Incremental decoder for one message body.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    framing: Framing,
    remaining: u64,
    chunk: ChunkState,
    eof: bool,
    /// Chunk sizes declared so far, checked against `limit` when each size line arrives.
    declared: u64,
    limit: u64,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        BodyDecoder {
            framing,
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunk: ChunkState::Size,
            eof: false,
            declared: 0,
            limit: u64::MAX,
        }
    }

    /// Refuses a chunked body as soon as its declared sizes pass `limit` bytes, before the data
    /// arrives (Content-Length is checked by the caller before reading).
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// True once the whole body has been taken.
    pub fn is_done(&self) -> bool {
        match self.framing {
            Framing::Empty => true,
            Framing::Length(_) => self.remaining == 0,
            Framing::Chunked => self.chunk == ChunkState::Done,
            Framing::Close => self.eof,
        }
    }

    /// Tells the decoder the peer closed the connection. Returns true when that is a clean end
    /// of the body (close-delimited framing), false when the body was cut.
    pub fn on_eof(&mut self) -> bool {
        match self.framing {
            Framing::Close => {
                self.eof = true;
                true
            }
            _ => self.is_done(),
        }
    }

    /// Takes the next piece of body from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, BodyError> {
        match self.framing {
            Framing::Empty => Ok(Step::Done),
            Framing::Length(_) => {
                if self.remaining == 0 {
                    return Ok(Step::Done);
                }
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = (buf.len() as u64).min(self.remaining) as usize;
                self.remaining -= n as u64;
                Ok(Step::Data(buf.split_to(n).freeze()))
            }
            Framing::Close => {
                if self.eof {
                    return Ok(Step::Done);
                }
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                Ok(Step::Data(buf.split().freeze()))
            }
            Framing::Chunked => self.decode_chunked(buf),
        }
    }

    fn decode_chunked(&mut self, buf: &mut BytesMut) -> Result<Step, BodyError> {
        loop {
            match self.chunk {
                ChunkState::Size => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_LINE {
                            return Err(BodyError::LineTooLong);
                        }
                        if buf.contains(&b'\n') {
                            return Err(BodyError::ChunkSize);
                        }
                        return Ok(Step::NeedMore);
                    };
                    let size = parse_chunk_size(&buf[..end])?;
                    self.declared = self.declared.saturating_add(size);
                    if self.declared > self.limit {
                        return Err(BodyError::TooLarge);
                    }
                    buf.advance(end + 2);
                    self.chunk = if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let data = buf.split_to(n).freeze();
                    self.chunk = if n as u64 == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                    return Ok(Step::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(BodyError::ChunkCrlf);
                        }
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::ChunkCrlf);
                    }
                    buf.advance(2);
                    self.chunk = ChunkState::Size;
                }
                ChunkState::Trailers(seen) => {
                    let Some(end) = find_crlf(buf) else {
                        if seen + buf.len() > MAX_TRAILERS {
                            return Err(BodyError::LineTooLong);
                        }
                        return Ok(Step::NeedMore);
                    };
                    // Trailer fields are dropped: nothing downstream of us needs them, and
                    // forwarding them unvalidated would be a smuggling vector.
                    buf.advance(end + 2);
                    if end == 0 {
                        self.chunk = ChunkState::Done;
                    } else if seen + end + 2 > MAX_TRAILERS {
                        return Err(BodyError::LineTooLong);
                    } else {
                        self.chunk = ChunkState::Trailers(seen + end + 2);
                    }
                }
                ChunkState::Done => return Ok(Step::Done),
            }
        }
    }
}

/// `1*HEXDIG [ ; chunk-ext ]` with no whitespace before the size and no bare LF anywhere.
fn parse_chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    if line.len() > MAX_LINE {
        return Err(BodyError::LineTooLong);
    }
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits_end == 0 {
        return Err(BodyError::ChunkSize);
    }
    let rest = &line[digits_end..];
    // Only an extension may follow (optionally after spaces/tabs, RFC 9112 BWS).
    let rest_trim = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .map(|i| &rest[i..])
        .unwrap_or(&[]);
    if !rest_trim.is_empty() && rest_trim[0] != b';' {
        return Err(BodyError::ChunkSize);
    }
    if rest.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0) {
        return Err(BodyError::ChunkSize);
    }
    let digits = &line[..digits_end];
    if digits.len() > 15 {
        // 16 hex digits would allow sizes past 2^60: no LLM body is that large.
        return Err(BodyError::ChunkTooLarge);
    }
    let mut size: u64 = 0;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(BodyError::ChunkSize),
        };
        size = (size << 4) | u64::from(v);
    }
    Ok(size)
}

/// Appends one chunk (`size CRLF data CRLF`) to `out`. Empty data writes nothing: a zero-size
/// chunk would end the body.
pub fn encode_chunk(out: &mut BytesMut, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    encode_chunk_header(out, data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends a chunk-size line for `len` bytes of data.
pub fn encode_chunk_header(out: &mut BytesMut, len: usize) {
    let mut tmp = [0u8; 18];
    let mut i = tmp.len();
    let mut n = len;
    loop {
        i -= 1;
        tmp[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(dec: &mut BodyDecoder, input: &[u8]) -> Result<(Vec<u8>, bool, BytesMut), BodyError> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match dec.decode(&mut buf)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::NeedMore => return Ok((out, false, buf)),
                Step::Done => return Ok((out, true, buf)),
            }
        }
    }

    #[test]
    fn length_body_leaves_next_message() {
        let mut d = BodyDecoder::new(Framing::Length(5));
        let (out, done, rest) = drain(&mut d, b"helloGET /").unwrap();
        assert_eq!(out, b"hello");
        assert!(done);
        assert_eq!(&rest[..], b"GET /");
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let mut d = BodyDecoder::new(Framing::Chunked);
        let input = b"5;foo=bar\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (out, done, rest) = drain(&mut d, input).unwrap();
        assert_eq!(out, b"hello world");
        assert!(done);
        assert_eq!(&rest[..], b"NEXT");
    }

    #[test]
    fn chunked_streams_partial_chunk_data() {
        let mut d = BodyDecoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&b"a\r\nhel"[..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Step::Data(Bytes::from_static(b"hel"))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), Step::NeedMore);
        buf.extend_from_slice(b"lo worl");
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Step::Data(Bytes::from_static(b"lo worl"))
        );
        buf.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(d.decode(&mut buf).unwrap(), Step::Done);
        assert!(d.is_done());
    }

    #[test]
    fn chunked_split_byte_by_byte() {
        let input = b"3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n";
        let mut d = BodyDecoder::new(Framing::Chunked);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &b in input.iter() {
            buf.extend_from_slice(&[b]);
            while let Step::Data(x) = d.decode(&mut buf).unwrap() {
                out.extend_from_slice(&x);
            }
        }
        assert_eq!(out, b"abcde");
        assert!(d.is_done());
    }

    #[test]
    fn chunked_rejects_bad_input() {
        for bad in [
            &b"zz\r\n"[..],
            b" 5\r\nhello\r\n",
            b"5\nhello",
            b"5\r\nhelloXX",
            b"-1\r\n",
            b"0x5\r\n",
            b"ffffffffffffffffff\r\n",
            b"5 x\r\n",
        ] {
            let mut d = BodyDecoder::new(Framing::Chunked);
            assert!(
                drain(&mut d, bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn declared_chunk_past_the_limit_is_refused_at_its_size_line() {
        let mut d = BodyDecoder::new(Framing::Chunked).with_limit(1024);
        let mut buf = BytesMut::from(&b"400\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Ok(Step::NeedMore));
        let mut d = BodyDecoder::new(Framing::Chunked).with_limit(1024);
        let mut buf = BytesMut::from(&b"fffff\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Err(BodyError::TooLarge));
    }

    #[test]
    fn close_delimited_ends_on_eof() {
        let mut d = BodyDecoder::new(Framing::Close);
        let (out, done, _) = drain(&mut d, b"abc").unwrap();
        assert_eq!(out, b"abc");
        assert!(!done);
        assert!(d.on_eof());
        assert!(d.is_done());
        let mut cut = BodyDecoder::new(Framing::Length(10));
        drain(&mut cut, b"abc").unwrap();
        assert!(!cut.on_eof());
    }

    #[test]
    fn chunk_encoding() {
        let mut out = BytesMut::new();
        encode_chunk(&mut out, b"hello world, this is 29 bytes");
        assert_eq!(&out[..], b"1d\r\nhello world, this is 29 bytes\r\n");
        let mut empty = BytesMut::new();
        encode_chunk(&mut empty, b"");
        assert!(empty.is_empty());
    }
}
