//! Spare client buffers (shard): a connection waiting for its next request hands its read and
//! write buffers back here and takes them again when the request arrives, so an idle keep-alive
//! connection holds none (nginx frees its request buffers on keep-alive the same way). One free
//! list per shard, no locks.

use std::cell::RefCell;

use bytes::BytesMut;

use super::CLIENT_BUF;

/// Buffers kept per shard at most (2 MiB): as many as busy connections need at once in a burst;
/// beyond that they go back to the allocator.
const KEEP: usize = 256;

/// A grown buffer (a large head or body) is freed instead of kept.
const KEEP_CAPACITY: usize = 2 * CLIENT_BUF;

#[derive(Default)]
pub struct Spares {
    bufs: RefCell<Vec<BytesMut>>,
}

impl Spares {
    /// An empty buffer with room for [`CLIENT_BUF`] bytes.
    pub fn take(&self) -> BytesMut {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(CLIENT_BUF))
    }

    /// Keeps `buf` for another connection if it is a whole, unshared buffer of about the usual
    /// size (its contents are discarded); frees it otherwise.
    pub fn put(&self, mut buf: BytesMut) {
        buf.clear();
        // `try_reclaim` moves an unshared buffer's start back to its allocation's start, so the
        // next user gets all of it; a buffer still shared with a live `Bytes` cannot be reused.
        if buf.capacity() == 0 || !buf.try_reclaim(CLIENT_BUF) || buf.capacity() > KEEP_CAPACITY {
            return;
        }
        let mut bufs = self.bufs.borrow_mut();
        if bufs.len() < KEEP {
            bufs.push(buf);
        }
    }

    /// Buffers on the free list now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.bufs.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_buffers_are_reused_from_their_start_and_others_freed() {
        let s = Spares::default();
        let mut b = s.take();
        assert!(b.capacity() >= CLIENT_BUF);
        let ptr = b.as_ptr();
        // A head read and split off, as the request parser does; the split part is gone.
        b.extend_from_slice(&[b'x'; 600]);
        drop(b.split_to(600));
        s.put(b);
        assert_eq!(s.len(), 1);
        let b = s.take();
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr, "the same allocation, from its start");
        assert!(b.capacity() >= CLIENT_BUF);

        // Still shared with a live piece: not kept.
        let mut shared = b;
        shared.extend_from_slice(b"abc");
        let piece = shared.split_to(3).freeze();
        s.put(shared);
        assert_eq!(s.len(), 0);
        drop(piece);

        // Grown past the usual size, or never allocated: not kept.
        let mut big = BytesMut::with_capacity(8 * CLIENT_BUF);
        big.extend_from_slice(b"x");
        s.put(big);
        s.put(BytesMut::new());
        assert_eq!(s.len(), 0);

        for _ in 0..KEEP + 10 {
            s.put(BytesMut::with_capacity(CLIENT_BUF));
        }
        assert_eq!(s.len(), KEEP);
    }
}
