//! What a decision tells the shell to do: the verdict, the family's state
//! change, the revocations that follow (the cascade) and the events to emit.
//! The pure core (`decide`, `code::decide_exchange`) makes a [`Plan`]; the
//! engine applies its change under the family's lock and carries out the
//! rest after it (docs/design.md, "The refresh decision"), deciding nothing
//! of its own. Everything here is `Copy` and inline: making and carrying a
//! plan allocates nothing (tests/no_alloc.rs).

use std::net::IpAddr;

use crate::clock::Timestamp;
use crate::family::{Family, RevokeReason};
use crate::policy::OnReuse;
use crate::token::{Generation, KeyId, KeyUid};

use super::{AcceptKind, DenyReason, Verdict};

/// The change to the family's own record, applied under its lock by
/// [`apply`]. A denial changes nothing. A change that is not a rotation
/// and can come alone is a variant of its own; one that goes with an
/// accepting change (binding a sender key on its first proof goes with a
/// rotation, a keep or a grace replay) is a field beside `change` in
/// [`Plan`], applied together with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing: the record stays as it is.
    None,
    /// One generation on, minted with the active key; the grace count and
    /// the rotation's time and address restart.
    Rotate,
    /// One more grace replay counted; the successor stays.
    GraceReplay,
    /// `rotation = "reuse"`: only the last use moves.
    Keep,
    /// The code (generation 0) becomes the first refresh token.
    Exchange,
}

/// What a plan does to the family's DPoP key binding (RFC 9449 §5;
/// docs/design.md "Sender-constrained families"), beside its change. It
/// names no key: the only key a decision binds is the one the request
/// presented, which the shell holds, so the plan stays small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bind {
    /// The binding stays as it is.
    Keep,
    /// Bind the family to the key of the request's proof: a public
    /// client's exchange under `allowed`/`required`, or the first accepted
    /// proof of a live unbound family under `required`.
    Presented,
    /// Drop the binding a code's `dpop_jkt` gave: a confidential client's
    /// refresh tokens are never bound.
    Clear,
}

/// What a decision revokes. The family's own revocation is made under its
/// lock; a reach across the subject's families follows outside it. The
/// `on_reuse = "report_only"` response and every other denial revoke
/// nothing ([`Cascade::None`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cascade {
    /// Nothing is revoked.
    None,
    /// The family itself, for this reason: reuse under `revoke_family`, or
    /// a code replay that passed the exchange's checks (RFC 6749 §4.1.2).
    Family(RevokeReason),
    /// Reuse under `revoke_subject_client`: the family, then the subject's
    /// other families of the same client.
    SubjectClient,
    /// Reuse under `revoke_subject`: the family, then every other family
    /// of the subject.
    Subject,
}

impl Cascade {
    /// The response to reuse that the policy's `on_reuse` names.
    pub(crate) const fn of_reuse(on_reuse: OnReuse) -> Cascade {
        match on_reuse {
            OnReuse::RevokeFamily => Cascade::Family(RevokeReason::ReuseDetected),
            OnReuse::RevokeSubjectClient => Cascade::SubjectClient,
            OnReuse::RevokeSubject => Cascade::Subject,
            OnReuse::ReportOnly => Cascade::None,
        }
    }

    /// Why the family itself is revoked, if it is.
    pub(crate) const fn family(self) -> Option<RevokeReason> {
        match self {
            Cascade::None => None,
            Cascade::Family(reason) => Some(reason),
            Cascade::SubjectClient | Cascade::Subject => Some(RevokeReason::ReuseDetected),
        }
    }

    /// The reach across the subject's families: whether only those of the
    /// family's client, and why they are revoked.
    pub(crate) const fn subject(self) -> Option<(bool, RevokeReason)> {
        match self {
            Cascade::None | Cascade::Family(_) => None,
            Cascade::SubjectClient => Some((true, RevokeReason::SubjectReuse)),
            Cascade::Subject => Some((false, RevokeReason::SubjectReuse)),
        }
    }
}

/// A security event a plan emits, before the shell adds the family, the
/// request's address, the policy version and the time (README "Events").
/// Each revocation of the cascade adds its own `family_revoked` event after
/// these: how many families the subject holds is the shell's to find out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// A rotated-out token outside grace, and the response applied.
    ReuseDetected {
        presented: Generation,
        current: Generation,
        response: OnReuse,
    },
    /// Another client presented the family's token or code.
    ClientMismatch,
    /// A generation newer than the family's: the state was rolled back.
    StateRollback {
        presented: Generation,
        current: Generation,
    },
    /// The caller is outside the allow-list.
    IpNotAllowed,
    /// An exchanged code was presented again; whether that revoked.
    CodeReplay { revoked: bool },
    /// A DPoP-bound grant (or one under `dpop = "required"`) came without
    /// a proof.
    DpopProofRequired,
    /// A DPoP-bound grant came with a proof from another key.
    DpopKeyMismatch,
}

impl Signal {
    /// The event of a DPoP denial (`reason` is one of the two).
    pub(crate) const fn of_dpop(reason: DenyReason) -> Signal {
        match reason {
            DenyReason::DpopKeyMismatch => Signal::DpopKeyMismatch,
            _ => Signal::DpopProofRequired,
        }
    }
}

/// The events of one plan, in order, inline (no allocation). Every
/// decision today emits at most one; one that must report two widens this
/// to a small array, and the shell's loop over [`iter`](Self::iter) stays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Signals(Option<Signal>);

impl Signals {
    /// No event.
    pub(crate) const NONE: Signals = Signals(None);

    /// One event.
    pub(crate) const fn one(s: Signal) -> Signals {
        Signals(Some(s))
    }

    /// Whether there is none.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The events, in order.
    pub(crate) fn iter(&self) -> std::option::IntoIter<Signal> {
        self.0.into_iter()
    }
}

/// Everything one decision says should happen, before anything has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Accept how, or deny why.
    pub(crate) verdict: Verdict,
    /// The family's own change, made under its lock.
    pub(crate) change: Change,
    /// What is revoked.
    pub(crate) cascade: Cascade,
    /// The events to emit, before the cascade's own.
    pub(crate) events: Signals,
    /// The DPoP key binding, changed together with `change`.
    pub(crate) bind: Bind,
}

impl Plan {
    /// Accept with this change.
    pub(crate) const fn accept(kind: AcceptKind, change: Change) -> Plan {
        Plan {
            verdict: Verdict::Accept(kind),
            change,
            cascade: Cascade::None,
            events: Signals::NONE,
            bind: Bind::Keep,
        }
    }

    /// Deny, changing, revoking and emitting nothing.
    pub(crate) const fn deny(reason: DenyReason) -> Plan {
        Plan {
            verdict: Verdict::Deny(reason),
            change: Change::None,
            cascade: Cascade::None,
            events: Signals::NONE,
            bind: Bind::Keep,
        }
    }

    /// The same plan, emitting `signal`.
    pub(crate) const fn emitting(mut self, signal: Signal) -> Plan {
        self.events = Signals::one(signal);
        self
    }

    /// The same plan, changing the DPoP binding as `bind` says.
    pub(crate) const fn binding(mut self, bind: Bind) -> Plan {
        self.bind = bind;
        self
    }

    /// The same plan, revoking what `cascade` says.
    pub(crate) const fn cascading(mut self, cascade: Cascade) -> Plan {
        self.cascade = cascade;
        self
    }
}

/// Make a plan's change to the family, under its lock. `key` is the active
/// key, which mints a new generation; `now` and `ip` are the request's.
/// Times never move backwards: `now` is read before the lock, so a racing
/// caller's may precede the last writer's (see `in_grace`).
pub(crate) fn apply(
    f: &mut Family,
    change: Change,
    now: Timestamp,
    ip: Option<IpAddr>,
    key: KeyId,
) {
    match change {
        Change::None => return,
        Change::Rotate => {
            // decide() refuses exhausted generations; keep the old one if
            // that ever changes rather than wrapping to 0.
            f.generation = f.generation.next().unwrap_or(f.generation);
            f.rotated_at = now.max(f.rotated_at);
            f.rotation_ip = ip.map(|a| a.to_canonical());
            f.grace_used = 0;
            f.key = key;
            // The cached tag is the old generation's.
            f.tag_uid = KeyUid::NONE;
        }
        Change::GraceReplay => f.grace_used = f.grace_used.saturating_add(1),
        Change::Keep => {}
        Change::Exchange => {
            // The family's lifetimes count from its first refresh token.
            // Its code state stays until the code's lifetime ends (the
            // sweeper drops it then): a replay is judged against it.
            f.generation = Generation::FIRST;
            f.created = now;
            f.last_used = now;
            f.rotated_at = now;
            f.rotation_ip = ip.map(|a| a.to_canonical());
            f.key = key;
            f.tag_uid = KeyUid::NONE;
            return;
        }
    }
    f.last_used = now.max(f.last_used);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::FamilyId;

    /// Each `on_reuse` response is one cascade, and only the cross-family
    /// ones reach the subject (with `subject_reuse`).
    #[test]
    fn on_reuse_maps_to_its_cascade() {
        use RevokeReason::{ReuseDetected, SubjectReuse};
        let rows = [
            (OnReuse::RevokeFamily, Some(ReuseDetected), None),
            (
                OnReuse::RevokeSubjectClient,
                Some(ReuseDetected),
                Some((true, SubjectReuse)),
            ),
            (
                OnReuse::RevokeSubject,
                Some(ReuseDetected),
                Some((false, SubjectReuse)),
            ),
            (OnReuse::ReportOnly, None, None),
        ];
        for (on_reuse, family, subject) in rows {
            let c = Cascade::of_reuse(on_reuse);
            assert_eq!((c.family(), c.subject()), (family, subject), "{on_reuse:?}");
        }
        assert_eq!(
            Cascade::Family(RevokeReason::CodeReplay).family(),
            Some(RevokeReason::CodeReplay)
        );
    }

    #[test]
    fn signals_are_inline_and_a_plan_small() {
        let a = Signal::IpNotAllowed;
        assert!(Signals::NONE.is_empty() && Signals::NONE.iter().next().is_none());
        assert_eq!(Signals::one(a).iter().collect::<Vec<_>>(), [a]);
        assert!(std::mem::size_of::<Plan>() <= 32, "a plan stays small");
    }

    /// A denial's plan changes nothing, last use included.
    #[test]
    fn no_change_leaves_the_record_alone() {
        let mut f = Family::for_test(FamilyId::from_bytes([1; 16]));
        let before = (f.generation, f.last_used, f.rotated_at, f.grace_used);
        apply(
            &mut f,
            Change::None,
            Timestamp::from_secs(5000),
            None,
            KeyId(3),
        );
        assert_eq!(
            (f.generation, f.last_used, f.rotated_at, f.grace_used),
            before
        );
        assert_eq!(f.key, KeyId(0));
    }

    /// The exchange starts the family's lifetimes at the exchange.
    #[test]
    fn exchange_makes_generation_one_now() {
        let mut f = Family {
            generation: Generation::CODE,
            ..Family::for_test(FamilyId::from_bytes([1; 16]))
        };
        let now = Timestamp::from_secs(1200);
        apply(
            &mut f,
            Change::Exchange,
            now,
            Some("::ffff:10.0.0.1".parse().unwrap()),
            KeyId(4),
        );
        assert_eq!(f.generation, Generation::FIRST);
        assert_eq!((f.created, f.last_used, f.rotated_at), (now, now, now));
        assert_eq!(f.rotation_ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!((f.key, f.tag_uid), (KeyId(4), KeyUid::NONE));
    }
}
