//! Configuring an engine and recovering its table from the store.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::clock::{Clock, CoarseClock};
use crate::error::Error;
use crate::event::{Dispatcher, EventSink, NoopSink};
use crate::policy::PolicySet;
use crate::store::{Durability, Store};
use crate::striped::Striped;
use crate::table::{Interner, SubjectIndex, Table};
use crate::token::KeyRing;

use super::Engine;

/// Configures an [`Engine`].
pub struct EngineBuilder {
    keys: Option<KeyRing>,
    policies: PolicySet,
    clock: Box<dyn Clock>,
    sink: Box<dyn EventSink>,
    /// Whether `sink` was set (the default only counts).
    delivers: bool,
    shards: usize,
    revoked_retention: Duration,
    store: Option<Box<dyn Store>>,
    #[cfg(feature = "redis")]
    shared: Option<crate::store::RedisStore>,
}

impl Default for EngineBuilder {
    fn default() -> EngineBuilder {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        EngineBuilder {
            keys: None,
            policies: PolicySet::default(),
            clock: Box::new(CoarseClock),
            sink: Box::new(NoopSink),
            delivers: false,
            // Many more shards than cores keeps two redemptions from meeting
            // on one lock; each costs a few hundred bytes.
            shards: (cores * 64).max(256),
            revoked_retention: Duration::from_secs(86_400),
            store: None,
            #[cfg(feature = "redis")]
            shared: None,
        }
    }
}

impl EngineBuilder {
    /// The MAC key ring. Without one, a fresh random key is generated, and
    /// every token dies with the process.
    pub fn keys(mut self, keys: KeyRing) -> EngineBuilder {
        self.keys = Some(keys);
        self
    }

    /// The policy set in force at start. Default: [`PolicySet::default`].
    pub fn policies(mut self, set: PolicySet) -> EngineBuilder {
        self.policies = set;
        self
    }

    /// The clock. Default: [`CoarseClock`](crate::CoarseClock) (the wall clock as of its last
    /// tick); [`SystemClock`](crate::SystemClock) for the precise one.
    pub fn clock(mut self, clock: impl Clock) -> EngineBuilder {
        self.clock = Box::new(clock);
        self
    }

    /// Where events go. Default: [`NoopSink`] (events are still counted).
    pub fn events(mut self, sink: impl EventSink) -> EngineBuilder {
        self.sink = Box::new(sink);
        self.delivers = true;
        self
    }

    /// Number of table shards (rounded up to a power of two).
    pub fn shards(mut self, n: usize) -> EngineBuilder {
        self.shards = n;
        self
    }

    /// How long a revoked family is kept so that its tokens keep answering
    /// `revoked` (and replays keep raising events) before the sweeper drops
    /// it. Default: one day.
    pub fn revoked_retention(mut self, d: Duration) -> EngineBuilder {
        self.revoked_retention = d;
        self
    }

    /// Persist family state in `store`; at build the table is recovered
    /// from it. Without a store the engine is memory only.
    pub fn store(mut self, store: impl Store) -> EngineBuilder {
        self.store = Some(Box::new(store));
        self
    }

    /// Decide against `store`, shared with other engines, instead of the
    /// in-process table (README "Several instances"): the store is the
    /// authority, and this engine keeps a bounded cache of it. Not
    /// together with [`store`](Self::store).
    #[cfg(feature = "redis")]
    pub fn shared_store(mut self, store: crate::store::RedisStore) -> EngineBuilder {
        self.shared = Some(store);
        self
    }

    /// Build the engine, recovering the table from the store if there is one.
    pub fn build(self) -> Result<Engine, Error> {
        #[cfg(feature = "redis")]
        if self.shared.is_some() && self.store.is_some() {
            return Err(Error::InvalidArgument {
                name: "store",
                expected: "a local store or a shared store, not both",
            });
        }
        #[cfg(feature = "redis")]
        if let Some(shared) = &self.shared {
            super::shared::check_key_ttl(
                shared.options().key_ttl,
                &self.policies,
                self.revoked_retention,
            )?;
        }
        let keys = match self.keys {
            Some(k) => k,
            None => KeyRing::generate()?,
        };
        let mut recovered = match &self.store {
            Some(store) => store.recover()?,
            None => Vec::new(),
        };
        // In slot order, each family lands in the slot its id names (see
        // `table`), however large the shards. Stable, so that of two records
        // of one id the later stands.
        recovered.sort_by_key(|r| r.family.id.slot());
        let sync = self
            .store
            .as_ref()
            .is_some_and(|s| s.durability() == Durability::Sync);
        let engine = Engine {
            keys: ArcSwap::from_pointee(keys),
            policies: ArcSwap::from_pointee(self.policies),
            table: Table::new(self.shards),
            subjects: SubjectIndex::new(self.shards),
            interner: Interner::new(),
            clock: self.clock,
            events: Dispatcher::new(self.sink, self.delivers),
            revoked_retention: self.revoked_retention,
            shadow: ArcSwapOption::empty(),
            shadow_epoch: AtomicU64::new(0),
            unsharded_outcomes: Striped::default(),
            store: self.store,
            sync,
            #[cfg(feature = "redis")]
            shared: self.shared.map(|s| Box::new(super::shared::Shared::new(s))),
        };
        // Two passes: first every record whose own slot is free, then the
        // rest (ids from elsewhere, or from a different shard count), which
        // take slots nobody else names. In one pass a single collision would
        // push each following record of its shard out of its slot in turn.
        let mut later = Vec::new();
        for r in recovered {
            if engine.table.lock(&r.family.id).own_slot_free(&r.family.id) {
                engine.install(r.family);
            } else {
                later.push(r);
            }
        }
        for r in later {
            engine.install(r.family);
        }
        Ok(engine)
    }
}

impl Engine {
    /// Configure an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }
}
