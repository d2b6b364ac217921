//! Persistence under the in-process table.
//!
//! The table is the hot path; a [`Store`] records every state change of a
//! family as a full record tagged with a log sequence number (LSN), and
//! gives the records back at start. The engine appends while it holds the
//! family's lock (so one family's records are in order), then, in
//! [`Durability::Sync`], waits outside the lock until the LSN is durable
//! before answering: a rotation is never acknowledged before it would
//! survive a crash, and concurrent waiters share one fsync (group commit).
//!
//! The interface is "write this family's new state, conditionally on the
//! state it replaces" (`expected_lsn`), so a shared network store (Redis,
//! one server-side compare-and-set per redemption) fits it too; the local
//! log needs no condition because the table is authoritative under the lock.

pub(crate) mod codec;
#[cfg(feature = "durable")]
mod log;
#[cfg(feature = "durable")]
pub mod private;
#[cfg(feature = "redis")]
pub(crate) mod redis;

use std::fmt;
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::error::Error;
use crate::family::Family;
use crate::token::{FamilyId, Generation};

#[cfg(feature = "redis")]
pub use self::redis::{OnRollback, RedisConnection, RedisOptions, RedisStore};
#[cfg(feature = "durable")]
pub use log::LOG_SUBDIR;
#[cfg(feature = "durable")]
#[doc(hidden)]
pub use log::LogHooks;
#[cfg(feature = "durable")]
pub use log::{Dropped, LogOptions, LogStore, RepairReport, RolledBack};

/// How long a caller waits for its write to be durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge a change only once it is durable (fsync); concurrent
    /// changes share one fsync. The default.
    Sync,
    /// Acknowledge at once; changes are made durable every `interval`, so a
    /// crash loses at most the last interval of changes. A lost rotation
    /// makes its predecessor redeemable again after restart: choose this
    /// only where that window is acceptable.
    Batched(Duration),
    /// Memory only: nothing survives a restart.
    None,
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::Sync => f.write_str("sync"),
            Durability::Batched(d) => write!(f, "batched({})", crate::policy::format_duration(*d)),
            Durability::None => f.write_str("none"),
        }
    }
}

/// The log sequence number of one acknowledged write. Never zero: the
/// [`Store`] trait's `u64` LSNs use 0 for "nothing written" (the
/// [`RecordRef::lsn`] of a new family); inside the crate that is
/// `Option<Lsn>::None`, converted where the trait is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Lsn(std::num::NonZeroU64);

impl Lsn {
    /// A store's `u64` LSN; `None` for 0, "nothing written".
    pub(crate) fn new(raw: u64) -> Option<Lsn> {
        std::num::NonZeroU64::new(raw).map(Lsn)
    }

    /// The `u64` the [`Store`] trait speaks.
    pub(crate) fn get(self) -> u64 {
        self.0.get()
    }
}

/// A family's state as handed to a store: read-only, and able to encode
/// itself (without the tag cache: a store never holds a redeemable token).
pub struct RecordRef<'a>(pub(crate) &'a Family);

impl RecordRef<'_> {
    /// The family's id.
    pub fn id(&self) -> FamilyId {
        self.0.id
    }
    /// Its current generation.
    pub fn generation(&self) -> Generation {
        self.0.generation
    }
    /// The LSN of the record it replaces (0 for a new family).
    pub fn lsn(&self) -> u64 {
        self.0.lsn
    }
    /// Append the record's binary form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        codec::encode(self.0, out)
    }
}

/// A family record decoded by a store, with the LSN it was written at.
pub struct StoredRecord {
    pub(crate) family: Family,
}

impl StoredRecord {
    /// Decode a record written by [`RecordRef::encode`]; `None` if the bytes
    /// are not exactly one well-formed record.
    pub fn decode(bytes: &[u8], lsn: u64) -> Option<StoredRecord> {
        let mut family = codec::decode(bytes)?;
        family.lsn = lsn;
        Some(StoredRecord { family })
    }
    /// The family's id.
    pub fn id(&self) -> FamilyId {
        self.family.id
    }
    /// The LSN it was written at.
    pub fn lsn(&self) -> u64 {
        self.family.lsn
    }
}

/// Feeds every family to the callback it is given: the engine's side of a
/// compaction.
pub type Snapshot<'a> = dyn FnMut(&mut dyn FnMut(RecordRef<'_>)) + 'a;

/// Where family state persists. Implementations must be cheap to call from
/// inside the engine's per-family lock (append to a buffer; do I/O on
/// another thread).
pub trait Store: Send + Sync + 'static {
    /// Every family, to rebuild the table at start.
    fn recover(&self) -> Result<Vec<StoredRecord>, Error>;
    /// Record a family's new state; `record.lsn()` is the LSN of the state it
    /// replaces (a network store compares and sets on it). Returns the new
    /// LSN.
    fn put(&self, record: RecordRef<'_>) -> Result<u64, Error>;
    /// Record that a family is gone (swept). Returns the new LSN.
    fn remove(&self, id: FamilyId, expected_lsn: u64) -> Result<u64, Error>;
    /// Block until `lsn` is durable. Do not call from an async runtime's
    /// worker thread; use [`poll_durable`](Self::poll_durable) there.
    fn wait_durable(&self, lsn: u64) -> Result<(), Error>;
    /// Non-blocking form of [`wait_durable`](Self::wait_durable): ready once
    /// `lsn` is durable, else `waker` is woken when it is.
    fn poll_durable(&self, lsn: u64, waker: &Waker) -> Poll<Result<(), Error>>;
    /// The store's durability mode.
    fn durability(&self) -> Durability;
    /// Replace the history with a snapshot of the families `snapshot` feeds
    /// to its callback, so the log does not grow forever.
    fn compact(&self, snapshot: &mut Snapshot<'_>) -> Result<(), Error>;
    /// Make everything appended so far durable (shutdown).
    fn flush(&self) -> Result<(), Error>;
    /// The error every change gets once the store has failed closed, or
    /// `None` while it works: what a health check asks, without writing.
    fn failure(&self) -> Option<Error> {
        None
    }
}
