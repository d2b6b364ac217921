//! Counters that many threads bump at once without sharing a cache line:
//! each thread counts in its own stripe, readers sum the stripes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Enough for the cores an auth server runs on; more threads share stripes.
const STRIPES: usize = 16;

#[repr(align(128))]
struct Stripe<const N: usize>([AtomicU64; N]);

/// `N` counters, striped by thread.
pub(crate) struct Striped<const N: usize>(Box<[Stripe<N>; STRIPES]>);

impl<const N: usize> Default for Striped<N> {
    fn default() -> Self {
        Striped(Box::new(std::array::from_fn(|_| {
            Stripe(std::array::from_fn(|_| AtomicU64::new(0)))
        })))
    }
}

impl<const N: usize> Striped<N> {
    /// Count one in counter `i`.
    pub(crate) fn add(&self, i: usize) {
        self.0[stripe()].0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counter `i`, summed over the stripes.
    pub(crate) fn get(&self, i: usize) -> u64 {
        self.0.iter().map(|s| s.0[i].load(Ordering::Relaxed)).sum()
    }
}

/// This thread's stripe: threads take stripes in turn as they first count.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    MINE.with(|s| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts from many threads all arrive, whichever stripes they use.
    #[test]
    fn sums_every_thread() {
        let c = Striped::<3>::default();
        std::thread::scope(|s| {
            for _ in 0..40 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        c.add(1);
                    }
                    c.add(2);
                });
            }
        });
        assert_eq!((c.get(0), c.get(1), c.get(2)), (0, 40_000, 40));
    }
}
