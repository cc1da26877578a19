//! Plain or TLS connections (shard): one small enum over a TCP stream and a monoio-rustls stream,
//! statically dispatched, so the request path is the same code for both and plain TCP pays one
//! branch per IO call.
//!
//! Why not monoio-rustls's stream as it is: the proxy needs three things from a downstream
//! connection that the crate's `Stream` does not give safely.
//!
//! 1. **Cancelable reads** (`CancelableAsyncReadRent`): the proxy parks a read on the client
//!    while it waits for the upstream (to notice a client that leaves) and between requests
//!    (idle timeout, drain), and takes it back with a `Canceller` without losing bytes. The
//!    crate has no cancelable read, and its fields are private, so one cannot be written on top
//!    of it. We put the cancellation *under* rustls instead: the TLS stream runs over
//!    [`CancelIo`], a TCP stream whose reads use the `CancelHandle` we installed for the
//!    current TLS read. A cancelled TCP read comes back to rustls as `WouldBlock`, which the
//!    crate treats as "no data yet": it stores that as its read status and returns it, and the
//!    next read simply reads the socket again. Ciphertext that did arrive stays in rustls's
//!    buffer, so nothing is lost (a plain `ECANCELED` would have been stored and returned by
//!    the *next* read as a spurious error).
//! 2. **No panic after an abandoned operation**: the crate lends its 16 KiB read or write
//!    buffer to the socket operation, and a dropped future (any timeout) never gives it back;
//!    the next read (or write) on that stream panics on `expect("buffer ... expected")`.
//!    [`CancelIo`] records in [`IoState`] when a buffer is out; [`TlsConn`] refuses (with an
//!    error) any read or write that would touch a lent buffer. The connection is unusable
//!    then, which is what a timeout means anyway: the caller closes it.
//! 3. **Split safety**: the crate's `Split` shares one rustls session between the read and the
//!    write half. Its read path, on a TLS protocol error, *writes* an alert through the shared
//!    write buffer. If a write of the other half were in flight at that moment (its buffer
//!    lent), that alert write would panic; the proxy never polls a client read while a client
//!    write is in flight, except after a write was abandoned (a timed-out write to a client
//!    that stopped reading). So a TCP read that completes while a write buffer is lent marks
//!    the connection broken and is not handed to rustls.
//!
//! A TLS client that goes away without close_notify surfaces as an `UnexpectedEof` read error;
//! every caller treats a read error like EOF, so between requests it is a normal close.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, CancelHandle, CancelableAsyncReadRent, Split};
use monoio::net::TcpStream;
use monoio::BufResult;
use monoio_rustls::{ClientTlsStream, ServerTlsStream};

/// `ECANCELED`, what monoio's drivers return for a cancelled operation.
pub(crate) const ECANCELED: i32 = libc::ECANCELED;

/// A connection accepted on a forward: plain or TLS.
pub type InboundConn = Conn<ServerTlsStream<CancelIo>>;
/// A connection to an upstream: plain or TLS (possibly through a CONNECT tunnel).
pub type OutboundConn = Conn<ClientTlsStream<CancelIo>>;

/// Plain TCP, or TLS over TCP. The TLS state (rustls session, two 16 KiB buffers) is boxed once
/// per connection so that moving a connection (into and out of the pool) stays cheap.
pub enum Conn<S> {
    Plain(TcpStream),
    Tls(Box<TlsConn<S>>),
}

/// What [`CancelIo`] and [`TlsConn`] share: the cancel handle of the current read and which of
/// the TLS stream's buffers are lent to a socket operation.
#[derive(Default)]
pub struct IoState {
    cancel: Cell<Option<CancelHandle>>,
    /// A TCP read is in flight (rustls's read buffer is lent). Still set after the read future
    /// was dropped.
    reading: Cell<bool>,
    /// A TCP write is in flight (rustls's write buffer is lent). Still set after the write
    /// future was dropped.
    writing: Cell<bool>,
    /// Bytes were discarded: the TLS stream can never be used again.
    broken: Cell<bool>,
}

impl IoState {
    fn can_read(&self) -> bool {
        !self.reading.get() && !self.writing.get() && !self.broken.get()
    }

    fn can_write(&self) -> bool {
        !self.writing.get() && !self.broken.get()
    }
}

fn unusable() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "TLS connection unusable after an abandoned read or write",
    )
}

/// The TCP stream under a TLS session: reads are cancelable through the handle in [`IoState`],
/// and lent buffers are recorded there.
pub struct CancelIo {
    tcp: TcpStream,
    st: Rc<IoState>,
}

impl AsyncReadRent for CancelIo {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        if self.st.broken.get() {
            return (Err(unusable()), buf);
        }
        let handle = self.st.cancel.take();
        self.st.reading.set(true);
        let (res, buf) = match &handle {
            Some(h) => self.tcp.cancelable_read(buf, h.clone()).await,
            None => self.tcp.read(buf).await,
        };
        self.st.reading.set(false);
        self.st.cancel.set(handle);
        if self.st.writing.get() {
            // See point 3 in the module comment: rustls must not see these bytes now.
            self.st.broken.set(true);
            return (Err(unusable()), buf);
        }
        match res {
            Err(e) if e.raw_os_error() == Some(ECANCELED) => {
                (Err(io::ErrorKind::WouldBlock.into()), buf)
            }
            r => (r, buf),
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        // monoio-rustls only calls `read`; kept correct for completeness.
        if self.st.broken.get() {
            return (Err(unusable()), buf);
        }
        self.st.reading.set(true);
        let r = self.tcp.readv(buf).await;
        self.st.reading.set(false);
        r
    }
}

impl AsyncWriteRent for CancelIo {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        self.st.writing.set(true);
        let r = self.tcp.write(buf).await;
        self.st.writing.set(false);
        r
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        self.st.writing.set(true);
        let r = self.tcp.writev(buf).await;
        self.st.writing.set(false);
        r
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> {
        self.tcp.shutdown()
    }
}

/// A TLS stream over [`CancelIo`] that refuses operations its buffers cannot serve.
pub struct TlsConn<S> {
    s: S,
    st: Rc<IoState>,
    fd: RawFd,
}

/// Clears the installed cancel handle however the read ends.
struct ClearCancel<'a>(&'a IoState);

impl Drop for ClearCancel<'_> {
    fn drop(&mut self) {
        self.0.cancel.set(None);
    }
}

impl<S> TlsConn<S> {
    /// Whether the connection can carry another exchange (no buffer lent, nothing discarded).
    fn is_sound(&self) -> bool {
        self.st.can_read() && self.st.can_write()
    }
}

impl<S: AsyncReadRent> AsyncReadRent for TlsConn<S> {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        if !self.st.can_read() {
            return (Err(unusable()), buf);
        }
        self.s.read(buf).await
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        if !self.st.can_read() {
            return (Err(unusable()), buf);
        }
        self.s.readv(buf).await
    }
}

/// Installs `c` for the TLS read about to start (cleared when the guard drops); `None` when the
/// connection cannot read.
fn arm(st: &IoState, c: CancelHandle) -> Option<ClearCancel<'_>> {
    if !st.can_read() {
        return None;
    }
    st.cancel.set(Some(c));
    Some(ClearCancel(st))
}

/// A read cancelled before a whole record arrived comes back from rustls as `WouldBlock` (what
/// did arrive stays buffered there); callers see what a cancelled TCP read gives.
fn cancelled<T>(r: BufResult<usize, T>) -> BufResult<usize, T> {
    match r {
        (Err(e), buf) if e.kind() == io::ErrorKind::WouldBlock => {
            (Err(io::Error::from_raw_os_error(ECANCELED)), buf)
        }
        r => r,
    }
}

impl<S: AsyncReadRent> CancelableAsyncReadRent for TlsConn<S> {
    async fn cancelable_read<T: IoBufMut>(
        &mut self,
        buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        let Some(_clear) = arm(&self.st, c) else {
            return (Err(unusable()), buf);
        };
        cancelled(self.s.read(buf).await)
    }

    async fn cancelable_readv<T: IoVecBufMut>(
        &mut self,
        buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        let Some(_clear) = arm(&self.st, c) else {
            return (Err(unusable()), buf);
        };
        cancelled(self.s.readv(buf).await)
    }
}

impl<S: AsyncWriteRent> AsyncWriteRent for TlsConn<S> {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        if !self.st.can_write() {
            return (Err(unusable()), buf);
        }
        self.s.write(buf).await
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        if !self.st.can_write() {
            return (Err(unusable()), buf);
        }
        self.s.writev(buf).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.st.can_write() {
            return Err(unusable());
        }
        self.s.flush().await
    }

    /// Sends close_notify, then FIN.
    async fn shutdown(&mut self) -> io::Result<()> {
        if !self.st.can_write() {
            return Err(unusable());
        }
        self.s.shutdown().await
    }
}

impl<S> Conn<S> {
    /// Whether the connection can be pooled for another exchange. Always true for plain TCP;
    /// false for a TLS connection after an abandoned read or write.
    pub fn is_sound(&self) -> bool {
        match self {
            Conn::Plain(_) => true,
            Conn::Tls(t) => t.is_sound(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    /// Wraps a TCP stream for a TLS handshake; returns the IO rustls runs over and the
    /// state to keep beside the finished stream.
    fn tls_io(tcp: TcpStream) -> (CancelIo, Rc<IoState>, RawFd) {
        let fd = tcp.as_raw_fd();
        let st = Rc::new(IoState::default());
        (
            CancelIo {
                tcp,
                st: st.clone(),
            },
            st,
            fd,
        )
    }
}

impl InboundConn {
    /// Runs the server side of a TLS handshake on an accepted connection.
    pub async fn accept_tls(
        acceptor: &monoio_rustls::TlsAcceptor,
        tcp: TcpStream,
    ) -> io::Result<InboundConn> {
        let (io, st, fd) = Conn::<()>::tls_io(tcp);
        let s = acceptor.accept(io).await.map_err(io::Error::from)?;
        Ok(Conn::Tls(Box::new(TlsConn { s, st, fd })))
    }
}

impl OutboundConn {
    /// Runs the client side of a TLS handshake on a connected stream (or a CONNECT tunnel).
    pub async fn connect_tls(
        connector: &monoio_rustls::TlsConnector,
        name: rustls::pki_types::ServerName<'static>,
        tcp: TcpStream,
    ) -> Result<OutboundConn, monoio_rustls::TlsError> {
        let (io, st, fd) = Conn::<()>::tls_io(tcp);
        let s = connector.connect(name, io).await?;
        Ok(Conn::Tls(Box::new(TlsConn { s, st, fd })))
    }
}

impl<S> AsRawFd for Conn<S> {
    /// The TCP socket's descriptor (for TLS, the socket under the session: a peek there sees
    /// ciphertext, which is enough to tell whether the peer closed or sent anything).
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Conn::Plain(s) => s.as_raw_fd(),
            Conn::Tls(t) => t.fd,
        }
    }
}

// SAFETY: `Split` promises that the read and the write half may be used independently. For
// `Plain` this is monoio's own `TcpStream` guarantee. For `Tls` the halves share one rustls
// session: the read half only touches the session and the read buffer between its socket
// reads, and the write half the session and the write buffer between its socket writes, all on
// one thread, so their accesses never overlap; the one case where the read half would write (an
// alert after a protocol error) while a write is in flight is refused by `CancelIo` (point 3 of
// the module comment). monoio-rustls makes the same promise for its stream.
unsafe impl<S> Split for Conn<S> {}

impl<S: AsyncReadRent> AsyncReadRent for Conn<S> {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(t) => t.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.readv(buf).await,
            Conn::Tls(t) => t.readv(buf).await,
        }
    }
}

impl<S: AsyncReadRent> CancelableAsyncReadRent for Conn<S> {
    async fn cancelable_read<T: IoBufMut>(
        &mut self,
        buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.cancelable_read(buf, c).await,
            Conn::Tls(t) => t.cancelable_read(buf, c).await,
        }
    }

    async fn cancelable_readv<T: IoVecBufMut>(
        &mut self,
        buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.cancelable_readv(buf, c).await,
            Conn::Tls(t) => t.cancelable_readv(buf, c).await,
        }
    }
}

impl<S: AsyncWriteRent> AsyncWriteRent for Conn<S> {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.write(buf).await,
            Conn::Tls(t) => t.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.writev(buf).await,
            Conn::Tls(t) => t.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(_) => Ok(()),
            Conn::Tls(t) => t.flush().await,
        }
    }

    /// Not an `async fn`: for plain TCP the `shutdown(2)` happens when this is called, so an
    /// `OwnedWriteHalf` that is dropped (which only calls, never polls, `shutdown`) still sends
    /// FIN, as it does for a bare `TcpStream`.
    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> {
        let (plain, tls) = match self {
            Conn::Plain(s) => (Some(s.shutdown()), None),
            Conn::Tls(t) => (None, Some(t)),
        };
        async move {
            match (plain, tls) {
                (Some(f), _) => f.await,
                (None, Some(t)) => t.shutdown().await,
                (None, None) => Ok(()),
            }
        }
    }
}

impl<S> From<TcpStream> for Conn<S> {
    fn from(s: TcpStream) -> Self {
        Conn::Plain(s)
    }
}

impl<S> Conn<S> {
    /// The plain TCP stream, for operations TLS has no equivalent of (readiness waits).
    pub fn as_plain(&self) -> Option<&TcpStream> {
        match self {
            Conn::Plain(s) => Some(s),
            Conn::Tls(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::pin::pin;
    use std::sync::Arc;
    use std::time::Duration;

    use monoio::io::{AsyncWriteRentExt, Canceller, Splitable};
    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::io::{cancelable_read_append, read_append};
    use crate::shard::signal::{race, Either};

    /// A server config and a client config trusting it (certificates made now).
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
        let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
        let provider = crate::tls::provider();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                    .unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    #[test]
    fn each_shard_gets_its_own_session_cache() {
        let (server, _) = configs();
        let (a, b) = (
            crate::tls::shard_server_config(&server),
            crate::tls::shard_server_config(&server),
        );
        assert!(a.session_storage.put(b"id".to_vec(), b"session".to_vec()));
        assert_eq!(
            a.session_storage.get(b"id").as_deref(),
            Some(&b"session"[..])
        );
        assert!(
            b.session_storage.get(b"id").is_none(),
            "shards share no cache"
        );
        assert!(server.session_storage.get(b"id").is_none());
        assert_eq!(a.alpn_protocols, server.alpn_protocols);
    }

    /// Runs `f` on both drivers.
    fn on_both_drivers<F: Future<Output = ()>>(f: impl Fn() -> F) {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f());
        if monoio::utils::detect_uring() {
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .build()
                .unwrap()
                .block_on(f());
        }
    }

    /// A blocking TLS client on its own thread: does the handshake, then for each command either
    /// sends a TLS record with the bytes, or (`None`) raw garbage on the socket; answers with
    /// what it read back (when asked to).
    struct Peer {
        tx: std::sync::mpsc::Sender<Option<Vec<u8>>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    fn peer(port: u16, cfg: Arc<rustls::ClientConfig>) -> Peer {
        let (tx, rx) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
        let thread = std::thread::spawn(move || {
            let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).unwrap();
            }
            for cmd in rx {
                match cmd {
                    Some(bytes) => {
                        let mut s = rustls::Stream::new(&mut conn, &mut tcp);
                        s.write_all(&bytes).unwrap();
                        s.flush().unwrap();
                    }
                    None => {
                        // One whole application-data record that cannot decrypt.
                        let mut rec = vec![0x17, 0x03, 0x03, 0x00, 0x20];
                        rec.extend_from_slice(&[0xAB; 32]);
                        let _ = tcp.write_all(&rec);
                    }
                }
            }
            // Keep the socket open until the test is done with it.
            let _ = tcp.read(&mut [0u8; 1]);
        });
        Peer {
            tx,
            thread: Some(thread),
        }
    }

    impl Drop for Peer {
        fn drop(&mut self) {
            let (tx, _) = std::sync::mpsc::channel();
            self.tx = tx;
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    async fn accept_one(
        listener: &monoio::net::TcpListener,
        server: &Arc<rustls::ServerConfig>,
    ) -> InboundConn {
        let (tcp, _) = listener.accept().await.unwrap();
        let acceptor = monoio_rustls::TlsAcceptor::from(server.clone());
        InboundConn::accept_tls(&acceptor, tcp).await.unwrap()
    }

    #[test]
    fn a_cancelled_tls_read_loses_nothing_and_the_next_read_works() {
        let (server, client) = configs();
        on_both_drivers(|| {
            let (server, client) = (server.clone(), client.clone());
            async move {
                let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let port = listener.local_addr().unwrap().port();
                let p = peer(port, client);
                let conn = accept_one(&listener, &server).await;
                let (mut r, _w) = conn.into_split();
                for round in 0..3u8 {
                    // A parked read, cancelled while nothing has arrived.
                    let (res, _) = {
                        let c = Canceller::new();
                        let mut rd = pin!(cancelable_read_append(
                            &mut r,
                            bytes::BytesMut::with_capacity(4096),
                            c.handle()
                        ));
                        let mut tick = pin!(monoio::time::sleep(Duration::from_millis(20)));
                        assert!(matches!(
                            race(rd.as_mut(), tick.as_mut()).await,
                            Either::Right(())
                        ));
                        let _c = c.cancel();
                        rd.await
                    };
                    assert!(res.is_err(), "a cancelled read returns no data");
                    // The next request arrives and is read in full.
                    p.tx.send(Some(vec![b'a' + round; 100])).unwrap();
                    let (res, buf) =
                        read_append(&mut r, bytes::BytesMut::with_capacity(4096)).await;
                    assert_eq!(res.unwrap(), 100, "round {round}");
                    assert!(buf.iter().all(|&b| b == b'a' + round));
                }
            }
        });
    }

    #[test]
    fn an_abandoned_tls_write_makes_the_connection_fail_without_panicking() {
        let (server, client) = configs();
        on_both_drivers(|| {
            let (server, client) = (server.clone(), client.clone());
            async move {
                let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let port = listener.local_addr().unwrap().port();
                let p = peer(port, client);
                let conn = accept_one(&listener, &server).await;
                let (mut r, mut w) = conn.into_split();
                let (res, _) = {
                    // A read parked while we write, as the proxy watches a client.
                    let c = Canceller::new();
                    let mut rd = pin!(cancelable_read_append(
                        &mut r,
                        bytes::BytesMut::with_capacity(4096),
                        c.handle()
                    ));
                    let mut tick = pin!(monoio::time::sleep(Duration::from_millis(20)));
                    assert!(matches!(
                        race(rd.as_mut(), tick.as_mut()).await,
                        Either::Right(())
                    ));
                    // The peer does not read: the write stalls and is abandoned by a timeout.
                    let big = vec![0u8; 64 << 20];
                    let t =
                        monoio::time::timeout(Duration::from_millis(300), w.write_all(big)).await;
                    assert!(t.is_err(), "the write should have stalled");
                    // Garbage arrives; the parked read completes with it, and must not hand it to
                    // rustls (which would answer with an alert through the lent write buffer:
                    // a panic).
                    p.tx.send(None).unwrap();
                    rd.await
                };
                assert!(res.is_err());
                // Everything after that fails cleanly.
                let (res, _) = read_append(&mut r, bytes::BytesMut::with_capacity(4096)).await;
                assert!(res.is_err());
                let (res, _) = w.write_all(b"x".to_vec()).await;
                assert!(res.is_err());
                assert!(w.shutdown().await.is_err());
                drop(p);
            }
        });
    }
}
