//! The engine: the shell around the pure decision. It owns the table, the key
//! ring, the policy set in force, the clock and the event sink.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::clock::{Clock, Timestamp};
use crate::decision::{self, Decision, Denied, DenyReason, Verdict};
use crate::dpop::Jkt;
use crate::error::Error;
use crate::event::{Dispatcher, Event, EventKind};
use crate::family::{Family, Status};
use crate::policy::{PolicySet, PolicyVersion};
use crate::store::Lsn;
use crate::store::Store;
use crate::striped::Striped;
use crate::table::{Interner, Loc, OUTCOMES, SubjectIndex, Table};
use crate::token::{self, FamilyId, Generation, KeyRing, KeyUid, Token, TokenKind};

mod access;
mod at;
mod builder;
mod exchange;
mod execute;
mod issue;
mod maintenance;
mod redeem;
mod revoke;
mod shadow;
#[cfg(feature = "redis")]
mod shared;
mod stats;

pub use at::At;
pub use builder::EngineBuilder;
pub use maintenance::SweepReport;
use shadow::Shadow;
pub use shadow::{ShadowReport, ShadowRow};
pub use stats::Stats;
use stats::outcome_slot;

/// Longest subject accepted at issuance.
pub const MAX_SUBJECT_LEN: usize = 1024;
/// Longest scope string accepted at issuance.
pub const MAX_SCOPE_LEN: usize = 4096;

/// Who a new family is for.
#[derive(Clone, Copy, Debug)]
pub struct IssueRequest<'a> {
    /// The OAuth client.
    pub client: &'a str,
    /// The end user.
    pub subject: &'a str,
    /// The granted scope, space-separated.
    pub scope: &'a str,
    /// The client's IP address; `None` when it could not be determined
    /// (an unreadable forwarding chain), which no non-empty allow-list
    /// admits.
    pub ip: Option<IpAddr>,
}

/// A refresh-token redemption (`grant_type=refresh_token`). Build it with
/// [`RedeemRequest::new`] and the builder methods; fields may be added
/// (they default to "not presented"), so it cannot be built literally
/// outside this crate.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub struct RedeemRequest<'a> {
    /// The refresh token presented.
    pub token: &'a str,
    /// The client presenting it.
    pub client: &'a str,
    /// The client's IP address; `None` (the default) when it could not be
    /// determined (an unreadable forwarding chain), which no non-empty
    /// allow-list admits.
    pub ip: Option<IpAddr>,
    /// The RFC 7638 thumbprint of the key of the DPoP proof sent with the
    /// request, once the server verified the proof (RFC 9449 §4.3); `None`
    /// (the default) when none was sent.
    pub dpop: Option<Jkt>,
}

impl<'a> RedeemRequest<'a> {
    /// `client` presents `token`, from an address not determined.
    pub fn new(token: &'a str, client: &'a str) -> RedeemRequest<'a> {
        RedeemRequest {
            token,
            client,
            ip: None,
            dpop: None,
        }
    }

    /// The client's IP address (`None`: could not be determined).
    #[must_use]
    pub fn ip(mut self, ip: impl Into<Option<IpAddr>>) -> RedeemRequest<'a> {
        self.ip = ip.into();
        self
    }

    /// The thumbprint of the verified DPoP proof's key (`None`: no proof).
    /// A family bound to a key is redeemed only with a proof from that key
    /// (README "The order of checks", step 6).
    #[must_use]
    pub fn dpop(mut self, jkt: impl Into<Option<Jkt>>) -> RedeemRequest<'a> {
        self.dpop = jkt.into();
        self
    }
}

impl std::fmt::Debug for RedeemRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a bearer secret: not printed.
        f.debug_struct("RedeemRequest")
            .field("client", &self.client)
            .field("ip", &self.ip)
            .field("dpop", &self.dpop)
            .finish_non_exhaustive()
    }
}

/// An authorization request the embedding server has authenticated and
/// the user has consented to.
#[derive(Clone, Copy)]
pub struct AuthorizeRequest<'a> {
    /// The OAuth client.
    pub client: &'a str,
    /// The end user.
    pub subject: &'a str,
    /// The granted scope, space-separated.
    pub scope: &'a str,
    /// The redirect URI of the request; the exchange must present the same.
    pub redirect_uri: &'a str,
    /// RFC 7636 `code_challenge`.
    pub code_challenge: Option<&'a str>,
    /// RFC 7636 `code_challenge_method` (`S256` or `plain`; absent = plain).
    pub code_challenge_method: Option<&'a str>,
    /// The user agent's IP address, if known (recorded; the allow-list
    /// applies at the exchange).
    pub ip: Option<IpAddr>,
    /// RFC 9449 §10 `dpop_jkt`: the code is bound to this DPoP key, and
    /// its exchange needs a proof from it.
    pub dpop_jkt: Option<Jkt>,
}

impl std::fmt::Debug for AuthorizeRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A `plain` challenge is the verifier itself: not printed.
        f.debug_struct("AuthorizeRequest")
            .field("client", &self.client)
            .field("subject", &self.subject)
            .field("scope", &self.scope)
            .field("redirect_uri", &self.redirect_uri)
            .field("code_challenge_method", &self.code_challenge_method)
            .field("ip", &self.ip)
            .field("dpop_jkt", &self.dpop_jkt)
            .finish_non_exhaustive()
    }
}

/// A token request with `grant_type=authorization_code`.
#[derive(Clone, Copy)]
pub struct ExchangeRequest<'a> {
    /// The authorization code.
    pub code: &'a str,
    /// RFC 7636 `code_verifier`.
    pub code_verifier: Option<&'a str>,
    /// The client presenting the code.
    pub client: &'a str,
    /// Must equal the authorization request's.
    pub redirect_uri: &'a str,
    /// The client's IP address; `None` when it could not be determined,
    /// which no non-empty allow-list admits.
    pub ip: Option<IpAddr>,
    /// The RFC 7638 thumbprint of the key of the DPoP proof sent with the
    /// request, once the server verified the proof (RFC 9449 §4.3); `None`
    /// without one.
    pub dpop: Option<Jkt>,
}

impl std::fmt::Debug for ExchangeRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("client", &self.client)
            .field("redirect_uri", &self.redirect_uri)
            .field("ip", &self.ip)
            .field("dpop", &self.dpop)
            .finish_non_exhaustive()
    }
}

/// What [`Engine::introspect`] reports of a token, changing nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Introspection {
    /// Whether redeeming this token now would be accepted as the current
    /// generation (grace replays are not "active": they are a retry).
    pub active: bool,
    /// The family.
    pub family: FamilyId,
    /// The family's client.
    pub client: Arc<str>,
    /// The family's subject.
    pub subject: Arc<str>,
    /// The family's scope.
    pub scope: Arc<str>,
    /// The presented token's generation.
    pub generation: Generation,
    /// The family's current generation.
    pub current_generation: Generation,
    /// When the family was born.
    pub issued_at: Timestamp,
    /// When the family was last used.
    pub last_used: Timestamp,
    /// When it expires if unused, under the policy in force.
    pub idle_expires_at: Option<Timestamp>,
    /// When it expires regardless, under the policy in force.
    pub absolute_expires_at: Option<Timestamp>,
    /// Active, or revoked with why and when.
    pub status: Status,
    /// The DPoP key the family is bound to: RFC 9449 §6 `cnf.jkt` for
    /// introspection responses and the access tokens minted for it.
    pub jkt: Option<Jkt>,
}

impl Introspection {
    /// The earlier of the two expiries, if any.
    pub fn expires_at(&self) -> Option<Timestamp> {
        match (self.idle_expires_at, self.absolute_expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One family's complete state, as a store persists it. `Debug` shows no
/// secret.
#[derive(Clone, Debug)]
pub struct FamilyRecord(pub(crate) Family);

impl FamilyRecord {
    /// The family's id.
    pub fn id(&self) -> FamilyId {
        self.0.id
    }
    /// The family's current generation.
    pub fn generation(&self) -> Generation {
        self.0.generation
    }
    /// Active or revoked.
    pub fn status(&self) -> Status {
        self.0.status()
    }
    /// The DPoP key the family is bound to, if any.
    pub fn jkt(&self) -> Option<Jkt> {
        self.0.jkt().copied()
    }
}

/// A decision whose state change is on its way to durable storage; await
/// it (or call [`Durable::wait`]) before handing the token out.
pub struct Durable<'a> {
    engine: &'a Engine,
    decision: Option<Decision>,
    lsn: Option<Lsn>,
    /// With a shared store: the decision itself, awaiting the store.
    #[cfg(feature = "redis")]
    shared: Option<SharedFuture<'a>>,
}

/// A decision being made against a shared store.
#[cfg(feature = "redis")]
type SharedFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Decision, Error>> + Send + 'a>>;

impl<'a> Durable<'a> {
    /// `decision`, whose change is durable once `lsn` is.
    pub(super) fn pending(
        engine: &'a Engine,
        (decision, lsn): (Decision, Option<Lsn>),
    ) -> Durable<'a> {
        Durable {
            engine,
            decision: Some(decision),
            lsn,
            #[cfg(feature = "redis")]
            shared: None,
        }
    }

    /// A decision the shared store has yet to confirm.
    #[cfg(feature = "redis")]
    fn shared(engine: &'a Engine, fut: SharedFuture<'a>) -> Durable<'a> {
        Durable {
            engine,
            decision: None,
            lsn: None,
            shared: Some(fut),
        }
    }

    /// Block until durable.
    pub fn wait(mut self) -> Result<Decision, Error> {
        #[cfg(feature = "redis")]
        if let Some(fut) = self.shared.take() {
            return shared::block_on(fut);
        }
        self.engine.settle(self.lsn)?;
        self.decision.take().ok_or(Error::InvalidArgument {
            name: "durable decision",
            expected: "a decision not yet taken",
        })
    }
}

impl std::future::Future for Durable<'_> {
    type Output = Result<Decision, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        #[cfg(feature = "redis")]
        if let Some(fut) = self.shared.as_mut() {
            return fut.as_mut().poll(cx);
        }
        if let Some(lsn) = self.lsn
            && self.engine.sync
            && let Some(store) = &self.engine.store
        {
            match store.poll_durable(lsn.get(), cx.waker()) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
        }
        Poll::Ready(self.decision.take().ok_or(Error::InvalidArgument {
            name: "durable decision",
            expected: "a future polled once after completion",
        }))
    }
}

/// The refresh-token lifecycle engine. Share it by reference or `Arc`; every
/// method takes `&self`.
///
/// Time: every operation acts at the engine's clock ([`Engine::now`]). To
/// act at another time (tests, replays), take the view
/// [`engine.at(now)`](Engine::at): it has the same operations, without a
/// time argument, and `engine.op(..)` is `engine.at(engine.now()).op(..)`.
/// Redemptions take one [`RedeemRequest`]; an acceptance carries the
/// family's subject, scope and client ([`Accepted::subject`]).
///
/// [`Accepted::subject`]: crate::Accepted::subject
pub struct Engine {
    keys: ArcSwap<KeyRing>,
    policies: ArcSwap<PolicySet>,
    table: Table,
    subjects: SubjectIndex,
    interner: Interner,
    clock: Box<dyn Clock>,
    events: Dispatcher,
    revoked_retention: Duration,
    shadow: ArcSwapOption<Shadow>,
    shadow_epoch: AtomicU64,
    store: Option<Box<dyn Store>>,
    /// Whether answers wait for durability (`Durability::Sync`).
    sync: bool,
    /// Outcomes decided before a shard is locked (malformed tokens), and
    /// every outcome decided against a shared store.
    unsharded_outcomes: Striped<OUTCOMES>,
    /// The shared store every operation decides against instead of the
    /// table, when there is one (README "Several instances").
    #[cfg(feature = "redis")]
    shared: Option<Box<shared::Shared>>,
}

/// A family's identity, copied out of the lock for events and follow-ups.
#[derive(Clone)]
struct Who {
    family: FamilyId,
    client: Arc<str>,
    subject: Arc<str>,
    /// Where the record is, to drop its subject-index entry.
    loc: Loc,
}

impl Who {
    fn of(f: &Family, loc: Loc) -> Who {
        Who {
            family: f.id,
            client: f.client().clone(),
            subject: Arc::from(f.subject.as_str()),
            loc,
        }
    }
}

impl Engine {
    /// The current time on the engine's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The policy set in force.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.load_full()
    }

    /// Put `set` in force atomically; returns the set it replaced. Every
    /// redemption is decided wholly under one set or the other.
    pub fn swap_policies(&self, set: PolicySet) -> Arc<PolicySet> {
        let to = set.version();
        let old = self.policies.swap(Arc::new(set));
        self.emit(
            EventKind::PolicySwapped {
                from: old.version(),
            },
            None,
            None,
            to,
            self.clock.now(),
        );
        old
    }

    /// Report a failed policy reload: an event naming every problem, under
    /// the version that stays in force.
    pub fn report_reload_failure(&self, errors: Vec<String>) {
        let version = self.policies.load().version();
        self.emit(
            EventKind::PolicyReloadFailed { errors },
            None,
            None,
            version,
            self.clock.now(),
        );
    }

    /// The MAC key ring in use.
    pub fn key_ring(&self) -> Arc<KeyRing> {
        self.keys.load_full()
    }

    /// Replace the key ring (after adding, activating or removing a key).
    pub fn set_key_ring(&self, keys: KeyRing) {
        self.keys.store(Arc::new(keys));
    }

    fn emit(
        &self,
        kind: EventKind,
        who: Option<&Who>,
        ip: Option<IpAddr>,
        version: PolicyVersion,
        at: Timestamp,
    ) {
        if !self.events.delivers() {
            self.events.count(&kind);
            return;
        }
        self.events.emit(&Event {
            kind,
            family: who.map(|w| w.family),
            client: who.map(|w| w.client.clone()),
            subject: who.map(|w| w.subject.clone()),
            ip,
            policy_version: version,
            at,
        });
    }

    /// `unknown_clients = "refuse"` and `client` is not listed: the
    /// denial, decided before any record is read or written (README "Policy
    /// files"). A decision, not an `Error`: the id comes from the wire, and
    /// RFC 6749 §5.2 names "unknown client" an `invalid_client` answer.
    fn refuse_unlisted(&self, policies: &PolicySet, client: &str) -> Option<Decision> {
        if policies.admits_client(client) {
            return None;
        }
        let reason = DenyReason::UnknownClient;
        self.unsharded_outcomes
            .add(outcome_slot(Verdict::Deny(reason)));
        Some(deny(reason, None, policies.version()))
    }

    /// Describe a refresh token without changing anything. `None` for a
    /// malformed or forged token, or an unknown family.
    pub fn introspect(&self, token: &str) -> Option<Introspection> {
        self.at(self.now()).introspect(token)
    }

    /// [`introspect`](Self::introspect) at `now`; see [`At`].
    fn introspect_at(&self, token: &str, now: Timestamp) -> Option<Introspection> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return self.shared_introspect(sh, token, now);
        }
        let parsed = token::parse(token, TokenKind::Refresh)?;
        let keys = self.keys.load();
        let policies = self.policies.load();
        let shard = self.table.lock(&parsed.family);
        let f = shard.get(&parsed.family)?;
        if !keys.verify(&parsed, &f.secret) {
            return None;
        }
        Some(introspection(
            f,
            parsed.generation,
            policies.policy(f.client()),
            now,
        ))
    }
}

/// What introspection reports of `f` for a token of `generation`.
fn introspection(
    f: &Family,
    generation: Generation,
    policy: &crate::policy::ClientPolicy,
    now: Timestamp,
) -> Introspection {
    let expired = decision::expiry(f, policy, now).is_some();
    Introspection {
        active: f.is_active() && !expired && generation == f.generation,
        family: f.id,
        client: f.client().clone(),
        subject: Arc::from(f.subject.as_str()),
        scope: f.scope().clone(),
        generation,
        current_generation: f.generation,
        issued_at: f.created,
        last_used: f.last_used,
        idle_expires_at: policy.idle_ttl.map(|t| f.last_used.saturating_add(t)),
        absolute_expires_at: policy.absolute_ttl.map(|t| f.created.saturating_add(t)),
        status: f.status(),
        jkt: f.jkt().copied(),
    }
}

/// Store a freshly computed tag of the current generation in the cache.
fn cache_tag(f: &mut Family, keys: &KeyRing, tag: [u8; 16]) {
    f.tag = tag;
    f.tag_uid = keys.uid(f.key).unwrap_or(KeyUid::NONE);
}

/// The family's current refresh token, from the tag cache when it is valid
/// for the ring, else computed (and cached). `None` if its key is gone.
fn mint_current(f: &mut Family, keys: &KeyRing) -> Option<Token> {
    let uid = keys.uid(f.key)?;
    if uid != f.tag_uid {
        let tag = keys.tag(TokenKind::Refresh, f.key, &f.id, f.generation, &f.secret)?;
        cache_tag(f, keys, tag);
    }
    Some(token::assemble(
        TokenKind::Refresh,
        f.key,
        &f.id,
        f.generation,
        &f.tag,
    ))
}

impl Engine {
    /// The answer to a token that is malformed, under an unknown key id,
    /// of no known family or forged (README "The order of checks", steps
    /// 1–3): counted with the outcomes of no shard, nothing else touched.
    fn invalid_token(&self, version: PolicyVersion) -> Decision {
        self.unsharded_outcomes
            .add(outcome_slot(Verdict::Deny(DenyReason::InvalidToken)));
        deny(DenyReason::InvalidToken, None, version)
    }
}

/// Refuse an acceptance whose successor could not be minted: on rotation
/// it is minted with the active key, else with the key of the current
/// generation, and a key removed from the ring makes the current token
/// dead. Refused as a token whose key is unknown (nothing changes, nothing
/// is revoked or reported), rather than forking the family.
fn refuse_unmintable(plan: &mut decision::Plan, f: &Family, keys: &KeyRing) {
    if let Verdict::Accept(kind) = plan.verdict {
        let mint_key = if kind == decision::AcceptKind::Rotated {
            keys.active()
        } else {
            f.key
        };
        if !keys.contains(mint_key) {
            *plan = decision::Plan::deny(DenyReason::InvalidToken);
        }
    }
}

fn deny(reason: DenyReason, family: Option<FamilyId>, version: PolicyVersion) -> Decision {
    Decision::Deny(Denied {
        reason,
        family,
        policy_version: version,
    })
}

#[cfg(test)]
mod tests;
