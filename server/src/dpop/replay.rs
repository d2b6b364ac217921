//! The `jti` replay cache of DPoP proofs (RFC 9449 §11.1): a proof is
//! accepted once within the window in which its `iat` is acceptable.
//!
//! Behind a trait so that instances sharing one store can share it too (a
//! proof replayed to another instance must be caught there as well); the
//! in-memory cache is the one-instance form.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::future::Future;
use std::pin::Pin;

use parking_lot::Mutex;

/// A key of the cache: SHA-256 of the proof's `htu` and `jti` (RFC 9449
/// §11.1 keys replay detection per `jti` and target URI), so that a long
/// `jti` costs no more memory than a short one.
pub type ReplayKey = [u8; 32];

/// Why a proof's first use could not be recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayError {
    /// Every slot holds a proof still inside its window.
    Full,
    /// The shared store did not answer: the proof is refused, not
    /// accepted unrecorded (fail closed).
    Unavailable,
}

/// The answer of [`ReplayCache::first_use`]: a future, since a shared
/// cache asks the network and must not block a runtime thread; the
/// in-memory cache answers at once.
pub type ReplayFuture = Pin<Box<dyn Future<Output = Result<bool, ReplayError>> + Send>>;

/// Remembers which proofs were used, until they expire.
pub trait ReplayCache: Send + Sync {
    /// Record `key` as used until `expires` (seconds since the epoch):
    /// `Ok(true)` if this is its first use, `Ok(false)` if it was seen and
    /// has not expired at `now`.
    fn first_use(&self, key: &ReplayKey, expires: u64, now: u64) -> ReplayFuture;
}

/// The in-memory cache, bounded to `capacity` live entries.
///
/// When full of unexpired entries it refuses new proofs rather than evict
/// the oldest: an evicted entry is a proof that could be replayed again
/// inside its window, and a flood of fresh proofs would be a way to evict
/// the one an attacker wants to replay. Refusing fails closed; it lasts at
/// most one window (the proof lifetime), since entries expire with it.
pub struct MemoryReplayCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashSet<ReplayKey>,
    /// The same keys by expiry, earliest first.
    by_expiry: BinaryHeap<Reverse<(u64, ReplayKey)>>,
}

impl MemoryReplayCache {
    /// A cache of at most `capacity` live proofs.
    pub fn new(capacity: usize) -> MemoryReplayCache {
        MemoryReplayCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Live entries (tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.lock().seen.len()
    }

    /// Whether no proof is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ReplayCache for MemoryReplayCache {
    fn first_use(&self, key: &ReplayKey, expires: u64, now: u64) -> ReplayFuture {
        Box::pin(std::future::ready(self.record(key, expires, now)))
    }
}

impl MemoryReplayCache {
    /// [`ReplayCache::first_use`], answered at once.
    pub fn record(&self, key: &ReplayKey, expires: u64, now: u64) -> Result<bool, ReplayError> {
        let mut inner = self.inner.lock();
        let Inner { seen, by_expiry } = &mut *inner;
        while let Some(Reverse((at, k))) = by_expiry.peek() {
            if *at > now {
                break;
            }
            seen.remove(k);
            by_expiry.pop();
        }
        if seen.contains(key) {
            return Ok(false);
        }
        if seen.len() >= self.capacity {
            return Err(ReplayError::Full);
        }
        seen.insert(*key);
        by_expiry.push(Reverse((expires, *key)));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_seen_until_it_expires() {
        let c = MemoryReplayCache::new(8);
        assert_eq!(c.record(&[1; 32], 100, 40), Ok(true));
        assert_eq!(c.record(&[1; 32], 100, 99), Ok(false));
        assert_eq!(c.record(&[1; 32], 160, 100), Ok(true), "expired at 100");
        assert_eq!(c.len(), 1);
    }

    /// Full of live entries: new proofs are refused, none evicted; once
    /// entries expire there is room again.
    #[test]
    fn a_full_cache_refuses_and_evicts_nothing_live() {
        let c = MemoryReplayCache::new(2);
        assert_eq!(c.record(&[1; 32], 100, 0), Ok(true));
        assert_eq!(c.record(&[2; 32], 200, 0), Ok(true));
        assert_eq!(c.record(&[3; 32], 200, 50), Err(ReplayError::Full));
        assert_eq!(c.record(&[1; 32], 100, 50), Ok(false), "still there");
        assert_eq!(c.record(&[3; 32], 200, 100), Ok(true), "1 expired");
    }
}
