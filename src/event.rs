//! Security events, delivered to a sink the embedder provides.

use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::clock::Timestamp;
use crate::family::RevokeReason;
use crate::policy::{OnReuse, PolicyVersion};
use crate::striped::Striped;
use crate::token::{FamilyId, Generation};

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// A rotated-out token was presented outside grace.
    ReuseDetected {
        /// The generation presented.
        presented: Generation,
        /// The family's current generation.
        current: Generation,
        /// What the policy did about it.
        response: OnReuse,
    },
    /// A family was revoked.
    FamilyRevoked {
        /// Why.
        reason: RevokeReason,
    },
    /// A refresh or issuance came from outside the allow-list.
    IpNotAllowed,
    /// A client presented another client's token.
    ClientMismatch {
        /// The client that presented it.
        presented_client: Box<str>,
    },
    /// A token newer than the state was presented: state was rolled back.
    StateRollback {
        /// The generation presented.
        presented: Generation,
        /// The family's current generation.
        current: Generation,
    },
    /// The oldest family of a subject was revoked to stay under the cap.
    CapEviction {
        /// The policy's `max_families_per_subject`.
        cap: u32,
    },
    /// An exchanged authorization code was presented again.
    CodeReplay {
        /// Whether this replay revoked the family born from the code: only
        /// one that passed the exchange's checks within the code's lifetime
        /// does (a `family_revoked` event follows).
        revoked: bool,
    },
    /// A new policy set was put in force.
    PolicySwapped {
        /// The version replaced.
        from: PolicyVersion,
    },
    /// A policy reload failed; the set in force (the event's
    /// `policy_version`) keeps serving.
    PolicyReloadFailed {
        /// Every problem, each naming file, line, column and key.
        errors: Vec<String>,
    },
    /// A DPoP-bound family (or, under `dpop = "required"`, any) was
    /// presented without a proof. Nothing was revoked.
    DpopProofRequired,
    /// A DPoP-bound family's token (or a code bound by `dpop_jkt`) came
    /// with a proof from another key. Nothing was revoked.
    DpopKeyMismatch,
}

impl EventKind {
    /// Stable snake_case name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::ReuseDetected { .. } => "reuse_detected",
            EventKind::FamilyRevoked { .. } => "family_revoked",
            EventKind::IpNotAllowed => "ip_not_allowed",
            EventKind::ClientMismatch { .. } => "client_mismatch",
            EventKind::StateRollback { .. } => "state_rollback",
            EventKind::CapEviction { .. } => "cap_eviction",
            EventKind::CodeReplay { .. } => "code_replay",
            EventKind::PolicySwapped { .. } => "policy_swapped",
            EventKind::PolicyReloadFailed { .. } => "policy_reload_failed",
            EventKind::DpopProofRequired => "dpop_proof_required",
            EventKind::DpopKeyMismatch => "dpop_key_mismatch",
        }
    }

    fn index(&self) -> usize {
        match self {
            EventKind::ReuseDetected { .. } => 0,
            EventKind::FamilyRevoked { .. } => 1,
            EventKind::IpNotAllowed => 2,
            EventKind::ClientMismatch { .. } => 3,
            EventKind::StateRollback { .. } => 4,
            EventKind::CapEviction { .. } => 5,
            EventKind::PolicySwapped { .. } => 6,
            EventKind::PolicyReloadFailed { .. } => 7,
            EventKind::CodeReplay { .. } => 8,
            EventKind::DpopProofRequired => 9,
            EventKind::DpopKeyMismatch => 10,
        }
    }
}

/// Names of every event kind, in the order of [`EventCounts`].
pub const EVENT_KINDS: [&str; N_KINDS] = [
    "reuse_detected",
    "family_revoked",
    "ip_not_allowed",
    "client_mismatch",
    "state_rollback",
    "cap_eviction",
    "policy_swapped",
    "policy_reload_failed",
    "code_replay",
    "dpop_proof_required",
    "dpop_key_mismatch",
];

const N_KINDS: usize = 11;
const N_REASONS: usize = RevokeReason::ALL.len();

/// One security-relevant outcome, with everything an operator needs to act.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The family concerned.
    pub family: Option<FamilyId>,
    /// The family's client.
    pub client: Option<Arc<str>>,
    /// The family's subject.
    pub subject: Option<Arc<str>>,
    /// The client IP of the request that caused it, if a request did.
    pub ip: Option<IpAddr>,
    /// The policy set in force.
    pub policy_version: PolicyVersion,
    /// When.
    pub at: Timestamp,
}

/// Receives events. Called outside every table lock, from the thread that
/// made the decision; a slow sink slows that caller only, and a panicking
/// sink is contained and counted.
pub trait EventSink: Send + Sync + 'static {
    /// Deliver one event.
    fn emit(&self, event: &Event);
}

/// Discards events (they are still counted).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopSink;

impl EventSink for NoopSink {
    fn emit(&self, _: &Event) {}
}

/// Keeps every event in memory: for tests and examples.
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<Event>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    /// Take the events received so far.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut self.events.lock())
    }

    /// A copy of the events received so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().clone()
    }
}

impl EventSink for MemorySink {
    fn emit(&self, event: &Event) {
        self.events.lock().push(event.clone());
    }
}

impl<S: EventSink> EventSink for Arc<S> {
    fn emit(&self, event: &Event) {
        (**self).emit(event)
    }
}

/// Events counted by kind, revocations by reason, plus sink panics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventCounts {
    /// Per kind, in the order of [`EVENT_KINDS`].
    pub by_kind: [u64; N_KINDS],
    /// `family_revoked` events per reason, in the order of
    /// [`RevokeReason::ALL`].
    pub revocations: [u64; N_REASONS],
    /// Times the sink panicked (the event is still counted).
    pub sink_panics: u64,
}

impl EventCounts {
    /// The count for one kind by name.
    pub fn get(&self, kind: &str) -> u64 {
        EVENT_KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.by_kind[i])
    }

    /// Families revoked for `reason`.
    pub fn revoked(&self, reason: RevokeReason) -> u64 {
        self.revocations[reason.index()]
    }
}

/// The engine's side of event delivery: counts, then calls the sink with
/// panics contained.
pub(crate) struct Dispatcher {
    sink: Box<dyn EventSink>,
    /// False for the default [`NoopSink`]: events are then only counted, and
    /// the engine need not gather what an event carries.
    delivers: bool,
    counts: Striped<N_KINDS>,
    revocations: Striped<N_REASONS>,
    panics: AtomicU64,
}

impl Dispatcher {
    pub(crate) fn new(sink: Box<dyn EventSink>, delivers: bool) -> Dispatcher {
        Dispatcher {
            sink,
            delivers,
            counts: Striped::default(),
            revocations: Striped::default(),
            panics: AtomicU64::new(0),
        }
    }

    /// Whether events reach a sink (else they are only counted).
    pub(crate) fn delivers(&self) -> bool {
        self.delivers
    }

    /// Count an event that is not delivered.
    pub(crate) fn count(&self, kind: &EventKind) {
        self.counts.add(kind.index());
        if let EventKind::FamilyRevoked { reason } = kind {
            self.revocations.add(reason.index());
        }
    }

    pub(crate) fn emit(&self, event: &Event) {
        self.count(&event.kind);
        // The engine holds no lock here and has finished its state change, so
        // a panicking sink cannot leave the table half-updated; containing it
        // keeps one bad sink from failing the redemption that triggered it.
        if catch_unwind(AssertUnwindSafe(|| self.sink.emit(event))).is_err() {
            self.panics.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn counts(&self) -> EventCounts {
        let mut c = EventCounts::default();
        for (i, n) in c.by_kind.iter_mut().enumerate() {
            *n = self.counts.get(i);
        }
        for (i, n) in c.revocations.iter_mut().enumerate() {
            *n = self.revocations.get(i);
        }
        c.sink_panics = self.panics.load(Ordering::Relaxed);
        c
    }
}
