//! Time as an injected dependency: the engine never reads the wall clock itself.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
///
/// Millisecond resolution is finer than any policy knob, and a `u64` keeps
/// family records small and comparisons branch-free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch itself.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp `ms` milliseconds after the Unix epoch.
    pub const fn from_millis(ms: u64) -> Timestamp {
        Timestamp(ms)
    }

    /// A timestamp `secs` seconds after the Unix epoch.
    pub const fn from_secs(secs: u64) -> Timestamp {
        Timestamp(secs.saturating_mul(1000))
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Whole seconds since the Unix epoch (what JWT `exp`/`iat` carry).
    pub const fn as_secs(self) -> u64 {
        self.0 / 1000
    }

    /// `self + d`, saturating rather than wrapping: a lifetime that overflows
    /// is simply "never".
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_millis(d)))
    }

    /// Time elapsed from `earlier` to `self`; zero if `earlier` is later
    /// (a clock stepping backwards must not make anything look older).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// Duration to whole milliseconds, saturating at `u64::MAX`.
pub(crate) fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The operating system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        // A system clock before 1970 is a broken host; treat it as the epoch
        // so lifetimes look longer-expired rather than panicking.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(duration_millis(since))
    }
}

/// The operating system's wall clock as of its last timer tick: the
/// engine's default.
///
/// On Linux this reads `CLOCK_REALTIME_COARSE`, which lags the precise
/// clock by at most one tick (1–4 ms, depending on the kernel's `HZ`) and
/// costs a few nanoseconds instead of a precise read's 30–50 (a
/// redemption reads the clock once, and on this engine's hot path that
/// read was a tenth of the time). Policy durations are milliseconds, but
/// none is meaningfully shorter than a second, so the lag decides nothing
/// in practice; where it must, use [`SystemClock`]. Elsewhere this is the
/// precise clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoarseClock;

impl Clock for CoarseClock {
    fn now(&self) -> Timestamp {
        coarse_now().unwrap_or_else(|| SystemClock.now())
    }
}

/// `CLOCK_REALTIME_COARSE` in milliseconds; `None` if the kernel refuses
/// it (pre-2.6.32) or reports a time before 1970.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn coarse_now() -> Option<Timestamp> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable `timespec`, the only memory
    // `clock_gettime` writes; the clock id is a constant the kernel knows
    // or refuses with an error code.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    (rc == 0).then(|| Timestamp(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)))
}

#[cfg(not(target_os = "linux"))]
fn coarse_now() -> Option<Timestamp> {
    None
}

/// A clock that moves only when told to: for tests, simulations and replay.
///
/// Shareable between threads; clone the `Arc` you give the engine.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            now: AtomicU64::new(start.0),
        }
    }

    /// Move the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(duration_millis(d), Ordering::SeqCst);
    }

    /// Set the clock to `t` (backwards too, to test clock steps).
    pub fn set(&self, t: Timestamp) {
        self.now.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now.load(Ordering::SeqCst))
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_advances_and_steps_back() {
        let c = ManualClock::new(Timestamp::from_secs(10));
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now(), Timestamp::from_millis(11_500));
        c.set(Timestamp::from_secs(1));
        assert_eq!(c.now().as_secs(), 1);
    }

    #[test]
    fn since_never_goes_negative() {
        let a = Timestamp::from_secs(5);
        let b = Timestamp::from_secs(7);
        assert_eq!(b.since(a), Duration::from_secs(2));
        assert_eq!(a.since(b), Duration::ZERO);
    }

    #[test]
    fn saturating_add_caps_at_max() {
        let t = Timestamp::from_millis(u64::MAX - 1);
        assert_eq!(
            t.saturating_add(Duration::from_secs(10)).as_millis(),
            u64::MAX
        );
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > Timestamp::from_secs(1_577_836_800));
    }

    /// The coarse clock reads the same wall clock, at most a tick behind
    /// (and, by rounding to milliseconds, never ahead by more than one).
    #[test]
    fn coarse_clock_tracks_the_system_clock() {
        for _ in 0..1000 {
            let before = SystemClock.now();
            let coarse = CoarseClock.now();
            let after = SystemClock.now();
            assert!(
                coarse.as_millis() <= after.as_millis() + 1,
                "coarse {coarse} ahead of {after}"
            );
            // One tick is at most 10 ms (HZ=100); allow for a descheduled
            // thread between the reads.
            assert!(
                before.since(coarse) < Duration::from_millis(50),
                "coarse {coarse} lags {before}"
            );
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn coarse_clock_reads_the_kernel_coarse_clock() {
        assert!(coarse_now().is_some(), "CLOCK_REALTIME_COARSE refused");
    }
}
