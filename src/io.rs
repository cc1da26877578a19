//! Buffer helpers for monoio's owned-buffer IO (shard).
//!
//! monoio's `IoBufMut` for `BytesMut` reads into the buffer from offset 0, overwriting what it
//! holds. Every read in the proxy appends instead, through these helpers.

use std::future::Future;

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
    let fut = r.read(tail(buf));
    async move {
        let (res, slice) = fut.await;
        (res, slice.into_inner())
    }
}

/// Like [`read_append`], cancellable through `c` without losing what was read.
pub fn cancelable_read_append<R: CancelableAsyncReadRent>(
    r: &mut R,
    buf: BytesMut,
    c: CancelHandle,
) -> impl Future<Output = BufResult<usize, BytesMut>> + '_ {
    let fut = r.cancelable_read(tail(buf), c);
    async move {
        let (res, slice) = fut.await;
        (res, slice.into_inner())
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
