//! Shard-local async primitives (shard): a drain signal that tasks can await, and a race of two
//! futures that never drops the loser (so an in-flight read keeps its bytes).

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Set once when the shard starts draining; every waiter is woken.
///
/// Each waiting future owns one slot and frees it when dropped, so the waiter table is bounded
/// by the number of futures waiting right now (an earlier version kept every waker it ever
/// saw: a leak of one task per connection).
#[derive(Default)]
pub struct DrainSignal {
    fired: Cell<bool>,
    slots: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl DrainSignal {
    pub fn fire(&self) {
        if self.fired.replace(true) {
            return;
        }
        let wakers: Vec<Waker> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    /// Completes once the signal fired.
    pub fn wait(&self) -> DrainWait<'_> {
        DrainWait {
            signal: self,
            slot: None,
        }
    }

    /// Futures waiting right now (for tests and `/status`).
    pub fn waiters(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }

    fn register(&self, slot: &mut Option<usize>, waker: &Waker) {
        let mut slots = self.slots.borrow_mut();
        match *slot {
            Some(i) => match &mut slots[i] {
                Some(w) if w.will_wake(waker) => {}
                s => *s = Some(waker.clone()),
            },
            None => {
                let i = match self.free.borrow_mut().pop() {
                    Some(i) => {
                        slots[i] = Some(waker.clone());
                        i
                    }
                    None => {
                        slots.push(Some(waker.clone()));
                        slots.len() - 1
                    }
                };
                *slot = Some(i);
            }
        }
    }

    fn release(&self, slot: usize) {
        self.slots.borrow_mut()[slot] = None;
        self.free.borrow_mut().push(slot);
    }
}

/// The future returned by [`DrainSignal::wait`].
pub struct DrainWait<'a> {
    signal: &'a DrainSignal,
    slot: Option<usize>,
}

impl Future for DrainWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.signal.fired.get() {
            return Poll::Ready(());
        }
        this.signal.register(&mut this.slot, cx.waker());
        Poll::Pending
    }
}

impl Drop for DrainWait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            self.signal.release(i);
        }
    }
}

/// Which of two raced futures finished first.
pub enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Polls `a` then `b` until one is ready. Neither is dropped: the caller still owns both pinned
/// futures and can keep awaiting the other one.
pub async fn race<A: Future, B: Future>(
    mut a: Pin<&mut A>,
    mut b: Pin<&mut B>,
) -> Either<A::Output, B::Output> {
    poll_fn(|cx| {
        if let Poll::Ready(x) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(x));
        }
        if let Poll::Ready(x) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(x));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn finished_waiters_leave_no_trace_and_firing_wakes_the_rest() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let sig = Rc::new(DrainSignal::default());
            // 1000 connections that each waited a moment and ended.
            for _ in 0..1000 {
                let s = sig.clone();
                monoio::select! {
                    _ = s.wait() => unreachable!(),
                    _ = monoio::time::sleep(std::time::Duration::from_micros(1)) => {}
                }
            }
            assert_eq!(sig.waiters(), 0);
            assert!(sig.slots.borrow().len() <= 1, "slots are reused");
            // Live waiters are woken by fire().
            let s = sig.clone();
            let h = monoio::spawn(async move { s.wait().await });
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            assert_eq!(sig.waiters(), 1);
            sig.fire();
            h.await;
            assert!(sig.fired());
        });
    }
}
