//! A listener's connection budget: one slot per open connection and, when
//! none is free, the idle connection that gives its slot to a newcomer.
//!
//! Without that, idle sockets that got in first keep everyone else in the
//! accept backlog until a timeout frees them (the README's "Server"
//! section, "Connections"). The connection that gives way belongs to the
//! source holding the most slots, so that a flood from a few sources
//! evicts its own sockets, not a client whose first request is still on
//! the wire; within that source, one that has never had a request gives
//! way first, the oldest first, then the keep-alive connection idle the
//! longest. A connection in the middle of a request never does: while
//! every slot is mid-request, newcomers wait for one to finish.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use super::limits::Source;
use super::net::stopped;

/// Accepted; no request has reached the handler yet.
const FRESH: u8 = 0;
/// A request is being handled.
const BUSY: u8 = 1;
/// Between the requests of a keep-alive connection.
const IDLE: u8 = 2;

/// One listener's budget.
pub(crate) struct Budget {
    slots: Arc<Semaphore>,
    max: usize,
    /// The open connections, by id. Scanned only when no slot is free, to
    /// pick the one to give way.
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    /// Ids, and the order in which connections entered their phase.
    clock: AtomicU64,
    /// A connection went idle while no slot was free.
    idle: Notify,
}

/// Where one connection is in its life; its task and its request handler
/// share it.
pub(crate) struct ConnState {
    phase: AtomicU8,
    /// The budget's clock when the phase began.
    since: AtomicU64,
    /// Where it comes from; `None` for a source exempt from the per-source
    /// cap (a trusted proxy), which counts as one connection of its own.
    source: Option<Source>,
    /// Chosen to give way; not chosen again.
    evicting: AtomicBool,
    evict: Notify,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            slots: Arc::new(Semaphore::new(max)),
            max,
            open: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            idle: Notify::new(),
        })
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// A slot for a new connection: a free one, or the one an idle
    /// connection gives up. Waits while every connection is mid-request;
    /// `None` once the server stops.
    pub(crate) async fn slot(
        self: &Arc<Self>,
        source: Option<Source>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Slot> {
        let mut evicted = false;
        let permit = loop {
            if let Ok(p) = self.slots.clone().try_acquire_owned() {
                break p;
            }
            // Created before the scan: a connection going idle during it
            // stores its wake-up here (`notify_one`).
            let idle = self.idle.notified();
            // One at a time: the connection told to give way returns its
            // slot at once unless a request began just before.
            if !evicted {
                evicted = self.evict_one();
            }
            tokio::select! {
                p = self.slots.clone().acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => return None,
                },
                _ = idle, if !evicted => {}
                _ = stopped(stop) => return None,
            }
        };
        let id = self.tick();
        let state = Arc::new(ConnState {
            phase: AtomicU8::new(FRESH),
            since: AtomicU64::new(id),
            source,
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
        });
        self.open.lock().insert(id, state.clone());
        Some(Slot {
            budget: self.clone(),
            id,
            state,
            _permit: permit,
        })
    }

    /// Tell the connection that should give way first to do so; whether
    /// there was one.
    /// Runs only when no slot is free: the count per source it builds is
    /// off the path of any request.
    fn evict_one(&self) -> bool {
        let victim = {
            let open = self.open.lock();
            let mut held: HashMap<Source, usize> = HashMap::new();
            for s in open.values().filter_map(|c| c.source) {
                *held.entry(s).or_insert(0) += 1;
            }
            open.values()
                .filter(|c| !c.evicting.load(Ordering::Relaxed))
                .filter_map(|c| {
                    let idle = match c.phase.load(Ordering::Acquire) {
                        FRESH => false,
                        IDLE => true,
                        _ => return None,
                    };
                    let slots = c.source.map_or(1, |s| held[&s]);
                    Some(((Reverse(slots), idle, c.since.load(Ordering::Relaxed)), c))
                })
                .min_by_key(|(order, _)| *order)
                .map(|(_, c)| c.clone())
        };
        let Some(victim) = victim else {
            return false;
        };
        victim.evicting.store(true, Ordering::Relaxed);
        victim.evict.notify_one();
        true
    }

    /// Completes once every slot is free again.
    pub(crate) async fn drained(&self) {
        let n = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(n).await;
    }
}

/// One connection's slot, returned when dropped.
pub(crate) struct Slot {
    budget: Arc<Budget>,
    id: u64,
    state: Arc<ConnState>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// What the connection's request handler reports through.
    pub(crate) fn phases(&self) -> Phases {
        Phases {
            budget: self.budget.clone(),
            state: self.state.clone(),
        }
    }

    /// No request has reached the handler yet.
    pub(crate) fn is_fresh(&self) -> bool {
        self.state.phase.load(Ordering::Acquire) == FRESH
    }

    /// Completes when the connection is told to give way.
    pub(crate) async fn evicted(&self) {
        self.state.evict.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.open.lock().remove(&self.id);
    }
}

/// A connection's request handler reports the start and end of each
/// request through this.
#[derive(Clone)]
pub(crate) struct Phases {
    budget: Arc<Budget>,
    state: Arc<ConnState>,
}

impl Phases {
    /// A request's headers are in and its handler runs.
    pub(crate) fn begin(&self) {
        self.state.phase.store(BUSY, Ordering::Release);
    }

    /// The handler has answered; the connection is idle until the next.
    pub(crate) fn end(&self) {
        self.state
            .since
            .store(self.budget.tick(), Ordering::Relaxed);
        self.state.phase.store(IDLE, Ordering::Release);
        if self.budget.slots.available_permits() == 0 {
            self.budget.idle.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_fresh_connection_gives_way_before_an_idle_one_oldest_first() {
        rt().block_on(async {
            let (_tx, mut stop) = watch::channel(false);
            let b = Budget::new(3);
            let kept = b.slot(None, &mut stop).await.unwrap();
            kept.phases().begin();
            kept.phases().end();
            let old = b.slot(None, &mut stop).await.unwrap();
            let young = b.slot(None, &mut stop).await.unwrap();
            assert!(b.evict_one());
            assert!(old.state.evicting.load(Ordering::Relaxed));
            assert!(!young.state.evicting.load(Ordering::Relaxed));
            assert!(b.evict_one());
            assert!(young.state.evicting.load(Ordering::Relaxed));
            assert!(b.evict_one());
            assert!(kept.state.evicting.load(Ordering::Relaxed));
            assert!(!b.evict_one(), "each is told once");
        });
    }

    /// Regression: the oldest connection without a request gave way first,
    /// whoever held the other slots, so a flood from one source evicted a
    /// lone client whose first request was still on the wire. The source
    /// holding the most slots now gives way first.
    #[test]
    fn a_flood_from_one_source_evicts_its_own_sockets_before_a_lone_client() {
        rt().block_on(async {
            let (_tx, mut stop) = watch::channel(false);
            let b = Budget::new(4);
            let lone = b.slot(Some(Source::V4(1)), &mut stop).await.unwrap();
            let mut held = Vec::new();
            for _ in 0..3 {
                held.push(b.slot(Some(Source::V4(2)), &mut stop).await.unwrap());
            }
            assert!(b.evict_one());
            assert!(!lone.state.evicting.load(Ordering::Relaxed));
            assert!(held[0].state.evicting.load(Ordering::Relaxed), "its oldest");
            // Down to two against one: the flood still gives way first.
            drop(held.remove(0));
            assert!(b.evict_one());
            assert!(held[0].state.evicting.load(Ordering::Relaxed));
            assert!(!lone.state.evicting.load(Ordering::Relaxed));
        });
    }

    #[test]
    fn a_connection_mid_request_never_gives_way() {
        rt().block_on(async {
            let (_tx, mut stop) = watch::channel(false);
            let b = Budget::new(1);
            let busy = b.slot(None, &mut stop).await.unwrap();
            busy.phases().begin();
            let waiting = tokio::time::timeout(
                std::time::Duration::from_millis(50),
                b.slot(None, &mut stop),
            );
            assert!(waiting.await.is_err(), "a slot without a free one");
            assert!(!busy.state.evicting.load(Ordering::Relaxed));
            // Its request ends: the waiting newcomer takes that slot.
            let b2 = b.clone();
            let next = tokio::spawn(async move { b2.slot(None, &mut stop).await.is_some() });
            tokio::task::yield_now().await;
            busy.phases().end();
            busy.evicted().await;
            drop(busy);
            assert!(next.await.unwrap());
        });
    }
}
