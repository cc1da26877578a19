//! Per-connection deadlines (shard): one long-lived timer per kind of deadline instead of a new
//! timer per read or write.
//!
//! `monoio::time::timeout` creates a timer entry, inserts it into the wheel when first polled and
//! removes it when dropped: several times per request. A kept timer whose deadline only moves
//! later is re-armed in place: monoio's wheel (tokio's design) records the later deadline and
//! leaves the entry in its slot; when that slot comes due the entry is moved to the true
//! deadline. Each kind here keeps a deadline series that grows (now + a fixed timeout), so
//! re-arming is a comparison and a store, and a busy connection touches the wheel about once per
//! timeout period per kind. A deadline that moves earlier (another route's shorter timeout) just
//! takes the slow path of a wheel re-insert. Deadlines fire exactly when they did before.
//!
//! A monoio `Sleep` is 640 bytes (tokio's cache-line padding), so the timers are allocated on
//! first use and can be released: a connection idle between requests holds only the one it
//! waits on.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use monoio::time::Sleep;

/// Timers for `N` kinds of deadline, pinned in one allocation per connection, made on first use.
pub struct Deadlines<const N: usize>(Option<Pin<Box<[Sleep; N]>>>);

/// Far enough that an unused timer never fires (monoio's own "far future" is 30 years).
const UNARMED: Duration = Duration::from_secs(86_400 * 365 * 30);

impl<const N: usize> Deadlines<N> {
    /// No timers yet: they are allocated (unarmed) when first used, on the shard's runtime.
    pub const fn new() -> Self {
        Deadlines(None)
    }

    /// Frees the timers (disarming them); the next use allocates them again.
    pub fn release(&mut self) {
        self.0 = None;
    }

    fn timer(&mut self, kind: usize) -> Pin<&mut Sleep> {
        let all = self.0.get_or_insert_with(|| {
            let far = Instant::now() + UNARMED;
            Box::pin(std::array::from_fn(|_| {
                monoio::time::sleep_until(far.into())
            }))
        });
        // SAFETY: the array is pinned as a whole and its elements are never moved out of it;
        // projecting the pin to one element is structural pinning.
        unsafe { all.as_mut().map_unchecked_mut(|a| &mut a[kind]) }
    }

    /// Runs `fut` until `at` with the timer of `kind`; `None` when the deadline came first (the
    /// future is then dropped, as `monoio::time::timeout` would). The future wins a tie.
    pub fn run<F: Future>(&mut self, kind: usize, at: Instant, fut: F) -> Timed<'_, F> {
        let mut timer = self.timer(kind);
        timer.as_mut().reset(at.into());
        Timed { timer, fut }
    }

    /// Waits until `at` on the timer of `kind`.
    pub async fn sleep_until(&mut self, kind: usize, at: Instant) {
        let mut timer = self.timer(kind);
        timer.as_mut().reset(at.into());
        timer.await
    }
}

pin_project_lite::pin_project! {
    /// A future under one of the [`Deadlines`]: `None` when the deadline came first. A named
    /// future, not an `async fn`, so that the future it runs is stored once, not twice (rustc
    /// keeps an `async fn`'s argument and the future it awaits in separate slots).
    pub struct Timed<'a, F> {
        timer: Pin<&'a mut Sleep>,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Timed<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Some(v));
        }
        this.timer.as_mut().poll(cx).map(|()| None)
    }
}

impl<const N: usize> Default for Deadlines<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    #[test]
    fn fires_at_the_deadline_and_not_before() {
        rt().block_on(async {
            let mut d = Deadlines::<2>::new();
            let start = Instant::now();
            let got = d
                .run(
                    0,
                    start + Duration::from_millis(30),
                    std::future::pending::<()>(),
                )
                .await;
            assert!(got.is_none());
            let waited = start.elapsed();
            assert!(waited >= Duration::from_millis(30), "{waited:?}");
            assert!(waited < Duration::from_millis(500), "{waited:?}");
        });
    }

    #[test]
    fn extended_deadline_is_honoured_and_a_ready_future_wins() {
        rt().block_on(async {
            let mut d = Deadlines::<1>::new();
            let start = Instant::now();
            // Arm at 20 ms, then move the same timer to 60 ms: it must not fire at 20.
            assert_eq!(
                d.run(0, start + Duration::from_millis(20), async { 7 })
                    .await,
                Some(7)
            );
            let got = d
                .run(
                    0,
                    start + Duration::from_millis(60),
                    std::future::pending::<()>(),
                )
                .await;
            assert!(got.is_none());
            assert!(
                start.elapsed() >= Duration::from_millis(60),
                "{:?}",
                start.elapsed()
            );
            // Earlier again after it fired (the slow path): still exact.
            let t = Instant::now();
            let got = d
                .run(
                    0,
                    t + Duration::from_millis(10),
                    std::future::pending::<()>(),
                )
                .await;
            assert!(got.is_none());
            assert!(t.elapsed() >= Duration::from_millis(10));
            // A deadline already past: a pending future times out at once, a ready one wins.
            assert_eq!(d.run(0, Instant::now(), async { 1 }).await, Some(1));
            assert!(d
                .run(0, Instant::now(), std::future::pending::<()>())
                .await
                .is_none());
        });
    }

    #[test]
    fn a_deadline_moved_earlier_still_fires_on_time() {
        rt().block_on(async {
            let mut d = Deadlines::<1>::new();
            let start = Instant::now();
            assert_eq!(
                d.run(0, start + Duration::from_secs(60), async {}).await,
                Some(())
            );
            let got = d
                .run(
                    0,
                    start + Duration::from_millis(20),
                    std::future::pending::<()>(),
                )
                .await;
            assert!(got.is_none());
            let waited = start.elapsed();
            assert!(
                waited >= Duration::from_millis(20) && waited < Duration::from_secs(1),
                "{waited:?}"
            );
        });
    }
}
