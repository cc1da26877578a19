//! The load generator's HTTP/1.1 client connection, on monoio (io_uring, epoll fallback):
//! keep-alive, owned buffers, Content-Length, chunked and close-delimited bodies, over plain TCP
//! or TLS (monoio-rustls, the config of `tls.rs`). Body bytes reach a callback with the
//! CLOCK_MONOTONIC time of the read that brought them, so SSE events can be timed as they
//! arrive.

use std::io;
use std::rc::Rc;
use std::sync::Arc;

use monoio::buf::{IoBufMut, SliceMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio_rustls::{ClientTlsStream, TlsConnector};

use crate::sys::now_ns;

/// Where the generator connects: a port on 127.0.0.1, over TLS when `tls` is set.
#[derive(Clone)]
pub struct Dest {
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// The byte stream under a [`Conn`].
enum Io {
    Plain(TcpStream),
    /// Boxed: the TLS state (rustls session, two 16 KiB buffers) is large.
    Tls(Box<ClientTlsStream<TcpStream>>),
}

impl Io {
    async fn read(&mut self, buf: SliceMut<Vec<u8>>) -> (io::Result<usize>, SliceMut<Vec<u8>>) {
        match self {
            Io::Plain(s) => s.read(buf).await,
            Io::Tls(s) => s.read(buf).await,
        }
    }

    async fn write_all(&mut self, buf: Rc<Vec<u8>>) -> io::Result<()> {
        let (res, _) = match self {
            Io::Plain(s) => s.write_all(buf).await,
            Io::Tls(s) => s.write_all(buf).await,
        };
        res.map(|_| ())
    }
}

pub struct Resp {
    pub status: u16,
    /// The server asked to close (or closed) the connection after this response.
    pub close: bool,
    /// When the first byte of the response arrived (ns, CLOCK_MONOTONIC).
    pub first_byte_ns: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

const BUF: usize = 16 * 1024;

/// One keep-alive client connection with its read buffer (`buf[lo..]` is unread).
pub struct Conn {
    s: Io,
    buf: Vec<u8>,
    lo: usize,
    /// When the last read returned data (ns).
    last_read_ns: u64,
}

impl Conn {
    /// Connects (and, for TLS, completes the handshake: a full one, resumption is off).
    pub async fn connect(dest: &Dest) -> io::Result<Conn> {
        Conn::connect_with(dest, BUF).await
    }

    /// A connection with a small read buffer, for holding thousands of them.
    pub async fn connect_small(dest: &Dest) -> io::Result<Conn> {
        Conn::connect_with(dest, 2048).await
    }

    async fn connect_with(dest: &Dest, cap: usize) -> io::Result<Conn> {
        let tcp = TcpStream::connect(("127.0.0.1", dest.port)).await?;
        tcp.set_nodelay(true)?;
        let s = match &dest.tls {
            None => Io::Plain(tcp),
            Some(cfg) => {
                let c = TlsConnector::from(cfg.clone());
                Io::Tls(Box::new(
                    c.connect(crate::tls::server_name(), tcp)
                        .await
                        .map_err(io::Error::from)?,
                ))
            }
        };
        Ok(Conn {
            s,
            buf: Vec::with_capacity(cap),
            lo: 0,
            last_read_ns: 0,
        })
    }

    /// Reads a streamed answer up to the end of its first SSE event and stops there (the rest
    /// of the stream is left unread). Fails on a status other than 200.
    pub async fn read_first_event(&mut self) -> io::Result<()> {
        loop {
            let data = &self.buf[self.lo..];
            if let Some(h) = find(data, b"\r\n\r\n") {
                if !data.starts_with(b"HTTP/1.1 200") && !data.starts_with(b"HTTP/1.0 200") {
                    let line = data.split(|&b| b == b'\r').next().unwrap_or_default();
                    return Err(bad(format!(
                        "stream answered {:?}",
                        String::from_utf8_lossy(line)
                    )));
                }
                if find(&data[h + 4..], b"\n\n").is_some() {
                    self.lo = self.buf.len();
                    return Ok(());
                }
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.lo == self.buf.len() {
            self.buf.clear();
            self.lo = 0;
        } else if self.buf.len() == self.buf.capacity() {
            self.buf.drain(..self.lo);
            self.lo = 0;
            if self.buf.len() == self.buf.capacity() {
                return Err(bad("response head larger than the read buffer"));
            }
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = self.s.read(buf.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        let n = res?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        self.last_read_ns = now_ns();
        Ok(())
    }

    pub async fn send(&mut self, req: &Rc<Vec<u8>>) -> io::Result<()> {
        self.s.write_all(req.clone()).await
    }

    /// After a response that closes the connection: reads until the server's EOF (so the
    /// server closes first and the client holds no TIME_WAIT), discarding what comes.
    pub async fn read_to_eof(&mut self) -> io::Result<()> {
        loop {
            self.lo = self.buf.len();
            match self.fill().await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `req` and reads one response, body ignored.
    pub async fn request(&mut self, req: &Rc<Vec<u8>>) -> io::Result<Resp> {
        self.send(req).await?;
        self.read_response(&mut |_, _| {}).await
    }

    /// Reads one response; body bytes go to `on_body` with the time of the read that brought
    /// them.
    pub async fn read_response(&mut self, on_body: &mut dyn FnMut(&[u8], u64)) -> io::Result<Resp> {
        if self.lo == self.buf.len() {
            self.fill().await?;
        }
        let first_byte_ns = self.last_read_ns;
        let head_len = loop {
            if let Some(i) = find(&self.buf[self.lo..], b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed
            .parse(&self.buf[self.lo..self.lo + head_len])
            .map_err(|e| bad(format!("bad response head: {e}")))?;
        let status = parsed.code.unwrap_or(0);
        let mut length: Option<usize> = None;
        let mut chunked = false;
        let mut close = parsed.version == Some(0);
        for h in parsed.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                length = Some(v.parse().map_err(|_| bad("bad content-length"))?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h.value.eq_ignore_ascii_case(b"chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = h.value.eq_ignore_ascii_case(b"close");
            }
        }
        self.lo += head_len;
        let resp = |close| Resp {
            status,
            close,
            first_byte_ns,
        };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(resp(close));
        }
        if chunked {
            loop {
                let line = loop {
                    if let Some(i) = find(&self.buf[self.lo..], b"\r\n") {
                        break i;
                    }
                    self.fill().await?;
                };
                let size_str = std::str::from_utf8(&self.buf[self.lo..self.lo + line])
                    .map_err(|_| bad("bad chunk size"))?;
                let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
                    .map_err(|_| bad(format!("bad chunk size {size_str:?}")))?;
                self.lo += line + 2;
                self.body(size, on_body).await?;
                // CRLF after the data (after the last chunk: no trailers expected).
                while self.buf.len() - self.lo < 2 {
                    self.fill().await?;
                }
                if &self.buf[self.lo..self.lo + 2] != b"\r\n" {
                    return Err(bad("chunk not followed by CRLF"));
                }
                self.lo += 2;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            self.body(n, on_body).await?;
        } else {
            loop {
                if self.lo < self.buf.len() {
                    on_body(&self.buf[self.lo..], self.last_read_ns);
                    self.lo = self.buf.len();
                }
                match self.fill().await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            close = true;
        }
        Ok(resp(close))
    }

    async fn body(
        &mut self,
        mut left: usize,
        on_body: &mut dyn FnMut(&[u8], u64),
    ) -> io::Result<()> {
        while left > 0 {
            if self.lo == self.buf.len() {
                self.fill().await?;
            }
            let n = left.min(self.buf.len() - self.lo);
            on_body(&self.buf[self.lo..self.lo + n], self.last_read_ns);
            self.lo += n;
            left -= n;
        }
        Ok(())
    }
}

/// SSE events in a body that arrives in pieces: for each event (ended by an empty line), the
/// time of the read that completed it and the mock's `: t=<ns>` stamp, if it had one.
#[derive(Default)]
pub struct EventScanner {
    line: Vec<u8>,
    stamp: Option<u64>,
    /// (arrival ns, stamp ns) per event, in order.
    pub events: Vec<(u64, Option<u64>)>,
}

impl EventScanner {
    pub fn feed(&mut self, bytes: &[u8], at: u64) {
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() < 64 {
                    self.line.push(b);
                }
                continue;
            }
            if self.line.is_empty() {
                self.events.push((at, self.stamp.take()));
            } else if let Some(t) = self.line.strip_prefix(b": t=") {
                self.stamp = std::str::from_utf8(t).ok().and_then(|v| v.parse().ok());
            }
            self.line.clear();
        }
    }
}

/// A small request: `POST /v1/chat/completions` with `body` and extra headers.
pub fn request_bytes(body: &str, extra: &[(&str, String)]) -> Rc<Vec<u8>> {
    let mut r = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    Rc::new(r.into_bytes())
}

/// Checks of the parsing helpers, run by `cargo test --benches` (the bench binary without
/// `--bench`): a harness=false target has no `#[test]` runner.
pub fn self_test() {
    let mut s = EventScanner::default();
    s.feed(b": t=00000000000000000123\ndata: {\"a\"", 10);
    s.feed(b":1}\n", 11);
    s.feed(b"\ndata: [DONE]\n\n", 12);
    assert_eq!(s.events, vec![(12, Some(123)), (12, None)], "event scanner");
}
