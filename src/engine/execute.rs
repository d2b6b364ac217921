//! Carrying out a plan's denial side: the family's own revocation under its
//! lock, then, outside every lock, the plan's events and the rest of its
//! cascade. What is revoked and which events fire is the plan's to say
//! (docs/design.md, "The refresh decision"); this only does it.

use std::net::IpAddr;

use crate::clock::Timestamp;
use crate::decision::{Bind, Plan, Signal};
use crate::dpop::Jkt;
use crate::error::Error;
use crate::event::EventKind;
use crate::family::Family;
use crate::policy::PolicyVersion;
use crate::store::Lsn;
use crate::table::{Loc, stripe_of};

use super::revoke::Revocation;
use super::{Engine, Who};

/// What [`Engine::revoke_planned`] made under the lock, for
/// [`Engine::carry_out`] after it.
pub(super) struct UnderLock {
    /// The family's own revocation, if the plan revokes it.
    revocation: Option<Revocation>,
    /// The family's identity, copied only when something needs it: a sink
    /// for the events, or a cascade across the subject.
    who: Option<Who>,
}

impl Engine {
    /// Under the family's lock: revoke it if the plan says so, and copy
    /// who it is if what follows needs that. Copying the client bumps a
    /// count shared by all of a client's families, and the subject is
    /// copied into a new allocation: only for a sink, or for a cascade
    /// across the subject's families.
    pub(super) fn revoke_planned(
        &self,
        f: &mut Family,
        loc: Loc,
        plan: &Plan,
        now: Timestamp,
    ) -> UnderLock {
        let revocation = plan
            .cascade
            .family()
            .and_then(|reason| Revocation::under_lock(self, f, loc, reason, now));
        let who = match &revocation {
            Some(r) => Some(r.who().clone()),
            None => (plan.cascade.subject().is_some()
                || (!plan.events.is_empty() && self.events.delivers()))
            .then(|| Who::of(f, loc)),
        };
        UnderLock { revocation, who }
    }

    /// Outside every lock: emit the plan's events in order, finish the
    /// family's revocation, then revoke across the subject as the cascade
    /// says. `client` is the presenting client. Returns the LSN to settle.
    pub(super) fn carry_out(
        &self,
        plan: &Plan,
        done: UnderLock,
        client: &str,
        ip: Option<IpAddr>,
        version: PolicyVersion,
        now: Timestamp,
    ) -> Result<Option<Lsn>, Error> {
        let UnderLock { revocation, who } = done;
        for signal in plan.events.iter() {
            self.emit(event_of(signal, client), who.as_ref(), ip, version, now);
        }
        let mut lsn = None;
        // Revoked by this call, so its index entry is this call's to remove
        // (see `SubjectIndex`), even if the store failed.
        if let Some(r) = revocation {
            lsn = r.finish(self, ip, version, now)?;
        }
        if let Some((client_only, reason)) = plan.cascade.subject()
            // `revoke_planned` copies who it is for every such cascade.
            && let Some(who) = &who
        {
            let of_client = client_only.then_some(&*who.client);
            let (_, subject_lsn) =
                self.revoke_subject_with(&who.subject, of_client, reason, ip, now)?;
            lsn = lsn.max(subject_lsn);
        }
        Ok(lsn)
    }
}

/// The event a signal stands for; `client` is the presenting client.
pub(super) fn event_of(signal: Signal, client: &str) -> EventKind {
    match signal {
        Signal::ReuseDetected {
            presented,
            current,
            response,
        } => EventKind::ReuseDetected {
            presented,
            current,
            response,
        },
        Signal::ClientMismatch => EventKind::ClientMismatch {
            presented_client: client.into(),
        },
        Signal::StateRollback { presented, current } => {
            EventKind::StateRollback { presented, current }
        }
        Signal::IpNotAllowed => EventKind::IpNotAllowed,
        Signal::CodeReplay { revoked } => EventKind::CodeReplay { revoked },
        Signal::DpopProofRequired => EventKind::DpopProofRequired,
        Signal::DpopKeyMismatch => EventKind::DpopKeyMismatch,
    }
}

impl Engine {
    /// Change the family's DPoP key binding as its plan says, under its
    /// lock, with the change (docs/design.md "Sender-constrained
    /// families"). `presented` is the key of the request's proof, the only
    /// one a plan binds.
    pub(super) fn rebind(&self, f: &mut Family, bind: Bind, presented: Option<&Jkt>) {
        match bind {
            Bind::Presented => {
                if let Some(jkt) = presented {
                    f.bind(*jkt);
                }
            }
            Bind::Clear if f.jkt().is_some() => {
                f.grant = self.interner.grant(stripe_of(&f.id), f.client(), f.scope());
            }
            Bind::Clear | Bind::Keep => {}
        }
    }
}
