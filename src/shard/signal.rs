//! Shard-local async primitives (shard): a drain signal that tasks can await, and a race of two
//! futures that never drops the loser (so an in-flight read keeps its bytes).

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Poll, Waker};

/// Set once when the shard starts draining; every waiter is woken.
#[derive(Default)]
pub struct DrainSignal {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl DrainSignal {
    pub fn fire(&self) {
        if self.fired.replace(true) {
            return;
        }
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    /// Completes once the signal fired.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            let mut w = self.waiters.borrow_mut();
            if !w.iter().any(|x| x.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
            Poll::Pending
        })
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
