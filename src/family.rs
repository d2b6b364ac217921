//! The one record a token family keeps, however often it rotates.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::Timestamp;
use crate::dpop::Jkt;
use crate::token::{FamilyId, FamilySecret, Generation, KeyId, KeyUid};

/// Why a family was revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevokeReason {
    /// One of its rotated-out tokens was presented again.
    ReuseDetected,
    /// Another family of the same subject saw reuse and the policy's
    /// `on_reuse` reaches across families.
    SubjectReuse,
    /// Its authorization code was exchanged a second time.
    CodeReplay,
    /// The subject went over `max_families_per_subject`; this was the oldest.
    CapEviction,
    /// Revoked on request (RFC 7009 revocation, or by family id).
    Requested,
    /// Every family of the subject was revoked on request.
    SubjectRevoked,
    /// Every family of the client was revoked on request.
    ClientRevoked,
}

impl RevokeReason {
    /// Every reason, in the order of [`EventCounts::revocations`](crate::EventCounts::revocations).
    pub const ALL: [RevokeReason; 7] = [
        RevokeReason::ReuseDetected,
        RevokeReason::SubjectReuse,
        RevokeReason::CodeReplay,
        RevokeReason::CapEviction,
        RevokeReason::Requested,
        RevokeReason::SubjectRevoked,
        RevokeReason::ClientRevoked,
    ];

    /// Its place in [`ALL`](Self::ALL).
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Stable snake_case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::ReuseDetected => "reuse_detected",
            RevokeReason::SubjectReuse => "subject_reuse",
            RevokeReason::CodeReplay => "code_replay",
            RevokeReason::CapEviction => "cap_eviction",
            RevokeReason::Requested => "requested",
            RevokeReason::SubjectRevoked => "subject_revoked",
            RevokeReason::ClientRevoked => "client_revoked",
        }
    }
}

impl fmt::Display for RevokeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a family can still be redeemed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Redeemable, subject to lifetimes.
    Active,
    /// Dead for good.
    Revoked {
        /// Why.
        reason: RevokeReason,
        /// When.
        at: Timestamp,
    },
}

/// One token family's state.
#[derive(Clone)]
pub(crate) struct Family {
    pub(crate) id: FamilyId,
    pub(crate) secret: FamilySecret,
    /// Client and scope, shared by every family with the same pair.
    pub(crate) grant: Arc<Grant>,
    pub(crate) subject: SubjectName,
    pub(crate) created: Timestamp,
    pub(crate) last_used: Timestamp,
    /// When the current generation was minted by a rotation; once revoked,
    /// when it was revoked (a revoked family has no grace window left to
    /// time, so the two share a field: see [`Family::status`]).
    pub(crate) rotated_at: Timestamp,
    pub(crate) generation: Generation,
    /// Key that minted the current generation, so a grace replay returns the
    /// identical token even after the active key changed.
    pub(crate) key: KeyId,
    /// The current generation's refresh-token tag and the key material that
    /// made it: verifying and re-issuing the current token then needs no
    /// HMAC. A cache only, recomputable from the fields above; never
    /// persisted (a store must not hold redeemable tokens).
    pub(crate) tag: [u8; 16],
    pub(crate) tag_uid: KeyUid,
    /// Grace replays served since the last rotation.
    pub(crate) grace_used: u8,
    /// Client IP of the last rotation (for `grace_same_ip`).
    pub(crate) rotation_ip: Option<IpAddr>,
    /// Why it was revoked; `None` while active. A byte here and the time
    /// in `rotated_at`, rather than one [`Status`], so the record packs
    /// tighter.
    pub(crate) revoked: Option<RevokeReason>,
    /// Until the code is exchanged: what the exchange checks it against.
    pub(crate) code: Option<Box<crate::code::CodeState>>,
    /// Log sequence number of the family's last write to the store (0 with
    /// none): an answer about the family waits until this is durable.
    pub(crate) lsn: u64,
}

#[cfg(test)]
impl Family {
    /// An active generation-1 family of client `c` and subject `s`, for unit
    /// tests to adjust.
    pub(crate) fn for_test(id: FamilyId) -> Family {
        Family {
            id,
            secret: FamilySecret([2; 16]),
            grant: Arc::new(Grant::new("c", "openid")),
            subject: SubjectName::new("s"),
            created: Timestamp::from_secs(1000),
            last_used: Timestamp::from_secs(1000),
            rotated_at: Timestamp::from_secs(1000),
            generation: Generation::new(1),
            key: KeyId(0),
            tag: [0; 16],
            tag_uid: KeyUid::NONE,
            grace_used: 0,
            rotation_ip: None,
            revoked: None,
            code: None,
            lsn: 0,
        }
    }
}

impl Family {
    pub(crate) fn client(&self) -> &Arc<str> {
        &self.grant.client
    }

    pub(crate) fn scope(&self) -> &Arc<str> {
        &self.grant.scope
    }

    /// The DPoP key thumbprint the family is bound to, if any (RFC 9449
    /// §5): kept in its grant, so an unbound family holds nothing more.
    pub(crate) fn jkt(&self) -> Option<&Jkt> {
        self.grant.jkt.as_ref()
    }

    /// Bind the family to a DPoP key. A bound family holds a grant of its
    /// own (one allocation, docs/design.md "Sender-constrained families"):
    /// this runs once per family, at its exchange or first binding, never
    /// on the steady refresh path.
    pub(crate) fn bind(&mut self, jkt: Jkt) {
        if self.grant.jkt != Some(jkt) {
            self.grant = Arc::new(Grant {
                client: self.grant.client.clone(),
                scope: self.grant.scope.clone(),
                jkt: Some(jkt),
            });
        }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.revoked.is_none()
    }

    pub(crate) fn status(&self) -> Status {
        match self.revoked {
            None => Status::Active,
            Some(reason) => Status::Revoked {
                reason,
                at: self.rotated_at,
            },
        }
    }

    /// Set the status as a whole (records read back from a store).
    pub(crate) fn set_status(&mut self, status: Status) {
        match status {
            Status::Active => self.revoked = None,
            Status::Revoked { reason, at } => {
                self.revoked = Some(reason);
                self.rotated_at = at;
            }
        }
    }

    /// Mark revoked; `false` if it already was (the first reason stands).
    pub(crate) fn revoke(&mut self, reason: RevokeReason, now: Timestamp) -> bool {
        if self.is_active() {
            self.revoked = Some(reason);
            self.rotated_at = now;
            true
        } else {
            false
        }
    }
}

impl fmt::Debug for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Family")
            .field("id", &self.id)
            .field("client", self.client())
            .field("subject", &self.subject.as_str())
            .field("generation", &self.generation)
            .field("status", &self.status())
            .field("dpop_bound", &self.jkt().is_some())
            .finish_non_exhaustive()
    }
}

/// A client and the scope it was granted: few distinct pairs, many
/// families, so families hold one pointer to a shared pair. A family bound
/// to a DPoP key holds a grant of its own that also names the key: the
/// thumbprint lives out of line, and unbound families, sharing their
/// pair's grant, do not grow.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) client: Arc<str>,
    pub(crate) scope: Arc<str>,
    /// The DPoP key (RFC 7638 thumbprint) the family's tokens are bound to.
    pub(crate) jkt: Option<Jkt>,
}

impl Grant {
    pub(crate) fn new(client: &str, scope: &str) -> Grant {
        Grant {
            client: Arc::from(client),
            scope: Arc::from(scope),
            jkt: None,
        }
    }
}

/// Longest subject kept inside the record itself.
const INLINE_SUBJECT: usize = 22;

/// A family's subject: kept inline when short (most user ids), shared
/// otherwise. Subjects are nearly as many as families, so a separate
/// allocation each would cost more than the rest of the subject's
/// bookkeeping. The shared case is an `Arc` so that an acceptance can hand
/// the subject out by bumping the family's own count, without allocating
/// on the redemption path (README "API").
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum SubjectName {
    Inline {
        len: u8,
        bytes: [u8; INLINE_SUBJECT],
    },
    Shared(Arc<str>),
}

impl SubjectName {
    pub(crate) fn new(s: &str) -> SubjectName {
        if s.len() <= INLINE_SUBJECT {
            let mut bytes = [0; INLINE_SUBJECT];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            // Fits: len <= 22.
            SubjectName::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            SubjectName::Shared(Arc::from(s))
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            SubjectName::Inline { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)])
                .expect("built from a str, cut at its length"),
            SubjectName::Shared(s) => s,
        }
    }
}

impl fmt::Debug for SubjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record is the bulk of per-family memory (README "Memory"):
    /// growing it must be a decision, not an accident.
    #[test]
    fn record_stays_within_its_budget() {
        assert!(std::mem::size_of::<Option<Family>>() <= 152);
        assert_eq!(std::mem::size_of::<SubjectName>(), 24);
        // A DPoP-bound family's own grant (docs/design.md
        // "Sender-constrained families"): 72 bytes, 88 with the `Arc`'s
        // counts; unbound families share their pair's.
        assert_eq!(std::mem::size_of::<Grant>(), 72);
    }

    /// `EventCounts::revocations` is indexed by `index()` in the order of
    /// `ALL`: every reason has its own slot.
    #[test]
    fn every_revoke_reason_has_its_slot() {
        for (i, r) in RevokeReason::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
    }

    #[test]
    fn subjects_round_trip_inline_and_boxed() {
        for s in [
            "",
            "s",
            "user-00000001",
            &"x".repeat(22),
            &"y".repeat(23),
            "ü-ß-€",
        ] {
            let n = SubjectName::new(s);
            assert_eq!(n.as_str(), s);
            assert_eq!(
                matches!(n, SubjectName::Inline { .. }),
                s.len() <= 22,
                "{s}"
            );
        }
        assert_ne!(SubjectName::new("ab"), SubjectName::new("abc"));
    }
}
