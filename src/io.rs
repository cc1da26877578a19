//! Buffer helpers for monoio's owned-buffer IO (shard).
//!
//! monoio's `IoBufMut` for `BytesMut` reads into the buffer from offset 0, overwriting what it
//! holds. Every read in the proxy appends instead, through these helpers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use monoio::buf::{IoBufMut, SliceMut};
use monoio::io::{AsyncReadRent, CancelHandle, CancelableAsyncReadRent};
use monoio::BufResult;

/// The spare capacity of `buf`, as a read target that appends after its current contents.
fn tail(mut buf: BytesMut) -> SliceMut<BytesMut> {
    let len = buf.len();
    let cap = buf.bytes_total();
    // SAFETY: `len` bytes are initialised and `cap` is the capacity.
    unsafe { buf.slice_mut_unchecked(len..cap) }
}

/// Reads into the spare capacity of `buf` (appending).
pub fn read_append<R: AsyncReadRent>(
    r: &mut R,
    buf: BytesMut,
) -> impl Future<Output = BufResult<usize, BytesMut>> + '_ {
    Appended {
        fut: r.read(tail(buf)),
    }
}

/// Like [`read_append`], cancellable through `c` without losing what was read.
pub fn cancelable_read_append<R: CancelableAsyncReadRent>(
    r: &mut R,
    buf: BytesMut,
    c: CancelHandle,
) -> impl Future<Output = BufResult<usize, BytesMut>> + '_ {
    Appended {
        fut: r.cancelable_read(tail(buf), c),
    }
}

pin_project_lite::pin_project! {
    /// A read into a buffer's tail, giving the whole buffer back. A named future rather than an
    /// `async` block: rustc keeps an `async` block's captured future and the one it awaits in
    /// separate slots, doubling the size of every read (a TLS read's future is 944 bytes) and of
    /// every connection's frame that holds one.
    struct Appended<F> {
        #[pin]
        fut: F,
    }
}

impl<F: Future<Output = BufResult<usize, SliceMut<BytesMut>>>> Future for Appended<F> {
    type Output = BufResult<usize, BytesMut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .fut
            .poll(cx)
            .map(|(res, slice)| (res, slice.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_append() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let mut a = monoio::net::UnixStream::from_std(a).unwrap();
            use std::io::Write;
            let mut b = b;
            b.write_all(b"hello ").unwrap();
            let mut buf = BytesMut::with_capacity(64);
            let (res, got) = read_append(&mut a, buf).await;
            buf = got;
            assert_eq!(res.unwrap(), 6);
            b.write_all(b"world").unwrap();
            let (res, got) = read_append(&mut a, buf).await;
            assert_eq!(res.unwrap(), 5);
            assert_eq!(&got[..], b"hello world");
        });
    }
}
