//! The engine: the shell around the pure decision. It owns the table, the key
//! ring, the policy set in force, the clock and the event sink.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::clock::{Clock, CoarseClock, Timestamp};
use crate::code::{self, CodeState, ExchangeCheck, MAX_REDIRECT_URI_LEN};
use crate::decision::{self, AcceptKind, Accepted, Decision, Denied, DenyReason, Request, Verdict};
use crate::error::Error;
use crate::event::{Dispatcher, Event, EventCounts, EventKind, EventSink, NoopSink};
use crate::family::{Family, RevokeReason, Status, SubjectName};
use crate::policy::{ClientPolicy, OnReuse, PolicySet, PolicyVersion};
use crate::store::{Durability, RecordRef, Store};
use crate::striped::Striped;
use crate::table::{Interner, Loc, OUTCOMES, SubjectEntries, SubjectIndex, Table};
use crate::token::{self, FamilyId, FamilySecret, Generation, KeyRing, KeyUid, Token, TokenKind};

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
}

impl std::fmt::Debug for ExchangeRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("client", &self.client)
            .field("redirect_uri", &self.redirect_uri)
            .field("ip", &self.ip)
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
}

/// What one [`Engine::sweep`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Slots looked at (bounded by the budget).
    pub examined: usize,
    /// Families removed.
    pub removed: usize,
}

/// Counters since the engine started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Family records held (revoked ones until swept).
    pub families: usize,
    /// Redemptions by outcome name (`rotated`, `reuse_detected`, ...).
    pub outcomes: Vec<(&'static str, u64)>,
    /// Events by kind.
    pub events: EventCounts,
}

impl Stats {
    /// The count of one outcome by name.
    pub fn outcome(&self, name: &str) -> u64 {
        self.outcomes
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, c)| *c)
    }
}

const ACCEPT_KINDS: [AcceptKind; 6] = [
    AcceptKind::Rotated,
    AcceptKind::Kept,
    AcceptKind::GraceReplay,
    AcceptKind::Issued,
    AcceptKind::CodeIssued,
    AcceptKind::Exchanged,
];

fn slot_name(slot: usize) -> &'static str {
    match slot.checked_sub(ACCEPT_KINDS.len()) {
        None => ACCEPT_KINDS[slot].as_str(),
        Some(i) => DenyReason::ALL.get(i).map_or("unknown", |r| r.as_str()),
    }
}

fn outcome_slot(v: Verdict) -> usize {
    match v {
        Verdict::Accept(k) => k as usize,
        Verdict::Deny(r) => ACCEPT_KINDS.len() + r as usize,
    }
}

const _: () = assert!(ACCEPT_KINDS.len() + DenyReason::ALL.len() <= OUTCOMES);

/// A decision whose state change is on its way to durable storage; await
/// it (or call [`Durable::wait`]) before handing the token out.
pub struct Durable<'a> {
    engine: &'a Engine,
    decision: Option<Decision>,
    lsn: u64,
}

impl Durable<'_> {
    /// Block until durable.
    pub fn wait(mut self) -> Result<Decision, Error> {
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
        if self.lsn != 0
            && self.engine.sync
            && let Some(store) = &self.engine.store
        {
            match store.poll_durable(self.lsn, cx.waker()) {
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

    /// Build the engine, recovering the table from the store if there is one.
    pub fn build(self) -> Result<Engine, Error> {
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

/// The refresh-token lifecycle engine. Share it by reference or `Arc`; every
/// method takes `&self`.
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
    /// Outcomes decided before a shard is locked (malformed tokens).
    unsharded_outcomes: Striped<OUTCOMES>,
}

/// A candidate policy set under evaluation.
struct Shadow {
    set: Arc<PolicySet>,
    epoch: u64,
    since: Timestamp,
}

/// How a shadow candidate would have decided, beside the set in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowReport {
    /// The version in force.
    pub active: PolicyVersion,
    /// The candidate's version.
    pub candidate: PolicyVersion,
    /// When the candidate was installed.
    pub since: Timestamp,
    /// One row per (client, active outcome, candidate outcome) seen.
    pub rows: Vec<ShadowRow>,
}

impl ShadowReport {
    /// Rows where the candidate decides differently.
    pub fn changed(&self) -> impl Iterator<Item = &ShadowRow> {
        self.rows.iter().filter(|r| r.active != r.candidate)
    }

    /// The count for one (client, active, candidate) triple.
    pub fn count(&self, client: &str, active: &str, candidate: &str) -> u64 {
        self.rows
            .iter()
            .filter(|r| &*r.client == client && r.active == active && r.candidate == candidate)
            .map(|r| r.count)
            .sum()
    }
}

/// One cell of a [`ShadowReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowRow {
    /// The family's client.
    pub client: Arc<str>,
    /// The outcome under the set in force (`rotated`, `expired_idle`, ...).
    pub active: &'static str,
    /// The outcome the candidate would have given.
    pub candidate: &'static str,
    /// How many redemptions.
    pub count: u64,
}

/// A family's identity, copied out of the lock for events and follow-ups.
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
    /// Configure an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

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

    /// Start a family: the first refresh token (generation 1).
    pub fn issue(&self, req: &IssueRequest<'_>) -> Result<Decision, Error> {
        self.issue_at(req, self.clock.now())
    }

    /// [`issue`](Self::issue) at a given time.
    pub fn issue_at(&self, req: &IssueRequest<'_>, now: Timestamp) -> Result<Decision, Error> {
        check_identity(req.client, req.subject, req.scope)?;
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, req.client) {
            return Ok(refused);
        }
        let version = policies.version();
        let policy = policies.policy(req.client);
        // The allow-list applies at issuance in both `ip_check` modes.
        if !policy.ip_allowlist.admits(req.ip) {
            self.events.emit(&Event {
                kind: EventKind::IpNotAllowed,
                family: None,
                client: Some(self.interner.intern(req.client)),
                subject: Some(Arc::from(req.subject)),
                ip: req.ip,
                policy_version: version,
                at: now,
            });
            return Ok(deny(DenyReason::IpNotAllowed, None, version));
        }
        self.start_family(req, policy, version, None, now)
    }

    /// Create a family at generation 1 (a direct issue) or 0 (an
    /// authorization code carrying `code`), applying the subject cap, and
    /// return its first token.
    fn start_family(
        &self,
        req: &IssueRequest<'_>,
        policy: &ClientPolicy,
        version: PolicyVersion,
        code: Option<Box<CodeState>>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        let keys = self.keys.load();
        let (kind, token_kind, generation) = match code {
            Some(_) => (AcceptKind::CodeIssued, TokenKind::Code, Generation::CODE),
            None => (AcceptKind::Issued, TokenKind::Refresh, Generation::FIRST),
        };
        let cap = policy.max_families_per_subject;
        let mut evicted = Vec::new();
        let mut wait_lsn = 0;
        let mut f = Family {
            id: FamilyId::from_bytes([0; 16]),
            secret: FamilySecret([0; 16]),
            grant: self.interner.grant(req.client, req.scope),
            subject: SubjectName::new(req.subject),
            created: now,
            last_used: now,
            rotated_at: now,
            generation,
            key: keys.active(),
            tag: [0; 16],
            tag_uid: KeyUid::NONE,
            grace_used: 0,
            rotation_ip: req.ip.map(|a| a.to_canonical()),
            revoked: None,
            code,
            lsn: 0,
        };
        let (id, tag, collapse) = {
            let mut subjects = self.subjects.lock(req.subject);
            if cap > 0 {
                wait_lsn = self.evict_over_cap(
                    &mut subjects,
                    req.subject,
                    f.client(),
                    cap,
                    now,
                    &mut evicted,
                )?;
            }
            let (id, tag, loc, collapse) = {
                let mut rnd = [0u8; 28];
                crate::random::fill(&mut rnd)?;
                let (random, secret) = rnd.split_at(12);
                let random: [u8; 12] = random.try_into().expect("12 bytes");
                f.secret = FamilySecret(secret.try_into().expect("16 bytes"));
                // The random part picks the shard; the id then names the
                // free slot it takes there, so it cannot collide.
                let mut shard = self.table.lock(&FamilyId::new(0, random));
                f.id = FamilyId::new(shard.vacant_slot(), random);
                let tag = keys
                    .tag(token_kind, f.key, &f.id, generation, &f.secret)
                    .expect("the active key is always in the ring");
                if token_kind == TokenKind::Refresh {
                    cache_tag(&mut f, &keys, tag);
                }
                let id = f.id;
                wait_lsn = wait_lsn.max(self.persist(&mut f)?);
                let (slot, collapse) = shard.insert(f);
                shard.outcomes[outcome_slot(Verdict::Accept(kind))] += 1;
                (id, tag, self.table.loc(&id, slot), collapse)
            };
            subjects.push(loc);
            (id, tag, collapse)
        };
        // Milliseconds of kernel work, so with no lock held (see `huge`).
        if let Some(c) = collapse {
            c.run();
        }
        for w in &evicted {
            self.emit(
                EventKind::CapEviction { cap },
                Some(w),
                req.ip,
                version,
                now,
            );
            self.emit(
                EventKind::FamilyRevoked {
                    reason: RevokeReason::CapEviction,
                },
                Some(w),
                req.ip,
                version,
                now,
            );
        }
        self.settle(wait_lsn)?;
        let token = token::assemble(token_kind, keys.active(), &id, generation, &tag);
        Ok(Decision::Accept(Accepted {
            token,
            family: id,
            generation,
            kind,
            policy_version: version,
        }))
    }

    /// Issue an authorization code (`rgc_…`, generation 0 of a new family)
    /// after the embedding server's login and consent. The client's `pkce`
    /// policy is enforced here already: with `s256`, a missing challenge or
    /// method `plain` is refused (`invalid_request`-class denials).
    pub fn authorize(&self, req: &AuthorizeRequest<'_>) -> Result<Decision, Error> {
        self.authorize_at(req, self.clock.now())
    }

    /// [`authorize`](Self::authorize) at a given time.
    pub fn authorize_at(
        &self,
        req: &AuthorizeRequest<'_>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        check_identity(req.client, req.subject, req.scope)?;
        if req.redirect_uri.is_empty() || req.redirect_uri.len() > MAX_REDIRECT_URI_LEN {
            return Err(Error::InvalidArgument {
                name: "redirect_uri",
                expected: "1 to 2048 bytes",
            });
        }
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, req.client) {
            return Ok(refused);
        }
        let version = policies.version();
        let policy = policies.policy(req.client);
        let challenge =
            match code::challenge_for(policy, req.code_challenge, req.code_challenge_method) {
                Ok(c) => c,
                Err(reason) => return Ok(deny(reason, None, version)),
            };
        let state = Box::new(CodeState::new(now, req.redirect_uri, challenge));
        let issue = IssueRequest {
            client: req.client,
            subject: req.subject,
            scope: req.scope,
            ip: req.ip,
        };
        self.start_family(&issue, policy, version, Some(state), now)
    }

    /// Exchange an authorization code for the family's first refresh token
    /// (generation 1). A replay of an exchanged code that passes the same
    /// checks within the code's lifetime is `code_reused` and revokes the
    /// family born from it; any other replay is `code_spent`.
    pub fn exchange(&self, req: &ExchangeRequest<'_>) -> Result<Decision, Error> {
        self.exchange_at(req, self.clock.now())
    }

    /// [`exchange`](Self::exchange) at a given time.
    pub fn exchange_at(
        &self,
        req: &ExchangeRequest<'_>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        let (decision, lsn) = self.exchange_inner(req, now)?;
        self.settle(lsn)?;
        Ok(decision)
    }

    /// [`exchange`](Self::exchange) without blocking: the future completes
    /// when the new family is durable.
    pub fn exchange_async(&self, req: &ExchangeRequest<'_>) -> Result<Durable<'_>, Error> {
        let (decision, lsn) = self.exchange_inner(req, self.clock.now())?;
        Ok(Durable {
            engine: self,
            decision: Some(decision),
            lsn,
        })
    }

    fn exchange_inner(
        &self,
        req: &ExchangeRequest<'_>,
        now: Timestamp,
    ) -> Result<(Decision, u64), Error> {
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, req.client) {
            return Ok((refused, 0));
        }
        let version = policies.version();
        let invalid = || {
            self.unsharded_outcomes
                .add(outcome_slot(Verdict::Deny(DenyReason::InvalidToken)));
            Ok((deny(DenyReason::InvalidToken, None, version), 0))
        };
        let Some(parsed) = token::parse(req.code, TokenKind::Code) else {
            return invalid();
        };
        let keys = self.keys.load();
        let mut shard = self.table.lock(&parsed.family);
        let Some((slot, f)) = shard.locate_mut(&parsed.family) else {
            drop(shard);
            return invalid();
        };
        // Only generation 0 is a code; a tag that verifies for any other
        // generation under the code domain was never minted.
        if parsed.generation != Generation::CODE || !keys.verify(&parsed, &f.secret) {
            drop(shard);
            return invalid();
        }
        let policy = policies.policy(f.client());
        let check = ExchangeCheck {
            client: req.client,
            redirect_uri: req.redirect_uri,
            verifier: req.code_verifier,
            ip: req.ip,
            now,
        };
        match code::decide_exchange(f, &check, policy) {
            Ok(()) => {
                // `f.code` stays until the code's lifetime ends (the sweeper
                // drops it then): a replay is judged against it.
                f.generation = Generation::FIRST;
                f.created = now;
                f.last_used = now;
                f.rotated_at = now;
                f.rotation_ip = req.ip.map(|a| a.to_canonical());
                f.key = keys.active();
                f.tag_uid = KeyUid::NONE;
                let token = mint_current(f, &keys).expect("the active key is always in the ring");
                let id = f.id;
                let lsn = self.persist(f)?;
                shard.outcomes[outcome_slot(Verdict::Accept(AcceptKind::Exchanged))] += 1;
                drop(shard);
                Ok((
                    Decision::Accept(Accepted {
                        token,
                        family: id,
                        generation: Generation::FIRST,
                        kind: AcceptKind::Exchanged,
                        policy_version: version,
                    }),
                    lsn,
                ))
            }
            Err(reason) => {
                let who = Who::of(f, self.table.loc(&parsed.family, slot));
                let revoked =
                    reason == DenyReason::CodeReused && f.revoke(RevokeReason::CodeReplay, now);
                let persisted = if revoked { self.persist(f) } else { Ok(0) };
                shard.outcomes[outcome_slot(Verdict::Deny(reason))] += 1;
                drop(shard);
                // Revoked by this call: unindexed even if the store failed.
                if revoked {
                    self.subjects.remove(&who.subject, who.loc);
                }
                let lsn = persisted?;
                let ip = req.ip;
                match reason {
                    DenyReason::CodeReused | DenyReason::CodeSpent => {
                        let replay = EventKind::CodeReplay { revoked };
                        self.emit(replay, Some(&who), ip, version, now);
                        if revoked {
                            self.report_revoked(&who, RevokeReason::CodeReplay, ip, now);
                        }
                    }
                    DenyReason::ClientMismatch => self.emit(
                        EventKind::ClientMismatch {
                            presented_client: req.client.into(),
                        },
                        Some(&who),
                        ip,
                        version,
                        now,
                    ),
                    DenyReason::IpNotAllowed => {
                        self.emit(EventKind::IpNotAllowed, Some(&who), ip, version, now)
                    }
                    _ => {}
                }
                Ok((deny(reason, Some(who.family), version), lsn))
            }
        }
    }

    /// Revoke the oldest families of `client` in `subject`'s `entries` until
    /// one more fits under `cap`.
    fn evict_over_cap(
        &self,
        entries: &mut SubjectEntries<'_>,
        subject: &str,
        client: &Arc<str>,
        cap: u32,
        now: Timestamp,
        evicted: &mut Vec<Who>,
    ) -> Result<u64, Error> {
        let mut mine: Vec<(Timestamp, FamilyId, Loc)> = Vec::new();
        for loc in entries.candidates() {
            let (shard, slot) = self.table.lock_loc(loc);
            match shard.at(slot) {
                Some(f)
                    if f.is_active() && f.subject.as_str() == subject && f.client() == client =>
                {
                    mine.push((f.created, f.id, loc));
                }
                // Another client's or subject's, or an entry whose family
                // left and whose removal is pending: not this walk's to
                // remove.
                _ => {}
            }
        }
        let cap = cap as usize;
        let mut lsn = 0;
        if mine.len() < cap {
            return Ok(lsn);
        }
        mine.sort();
        let excess = mine.len() + 1 - cap;
        for (_, id, loc) in mine.into_iter().take(excess) {
            // The same family, still this subject's and client's: a restore
            // may have replaced the record since it was listed.
            let (mut shard, slot) = self.table.lock_loc(loc);
            if let Some(f) = shard.at_mut(slot)
                && f.id == id
                && f.subject.as_str() == subject
                && f.client() == client
                && f.revoke(RevokeReason::CapEviction, now)
            {
                let persisted = self.persist(f);
                evicted.push(Who::of(f, loc));
                drop(shard);
                // Revoked by this call, so its entry is this call's, even if
                // the store failed.
                entries.remove(loc);
                lsn = lsn.max(persisted?);
            }
        }
        Ok(lsn)
    }

    /// Redeem a refresh token presented by `client` from `ip`: an address,
    /// or `None` when the caller's address could not be determined (no
    /// non-empty allow-list admits it).
    ///
    /// With a store in [`Durability::Sync`] this blocks until the change is
    /// durable (group commit: typically one fsync shared with concurrent
    /// callers). From an async runtime use [`redeem_async`](Self::redeem_async).
    /// An `Err` is a store failure: the engine then refuses every change
    /// until restarted (fail closed); nothing was acknowledged.
    pub fn redeem(
        &self,
        token: &str,
        client: &str,
        ip: impl Into<Option<IpAddr>>,
    ) -> Result<Decision, Error> {
        self.redeem_at(token, client, ip, self.clock.now())
    }

    /// [`redeem`](Self::redeem) at a given time.
    pub fn redeem_at(
        &self,
        token: &str,
        client: &str,
        ip: impl Into<Option<IpAddr>>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        let (decision, lsn) = self.redeem_inner(token, client, ip.into(), now)?;
        self.settle(lsn)?;
        Ok(decision)
    }

    /// [`redeem`](Self::redeem) without blocking: the decision is made at
    /// once, and the returned future completes when it is durable.
    pub fn redeem_async(
        &self,
        token: &str,
        client: &str,
        ip: impl Into<Option<IpAddr>>,
    ) -> Result<Durable<'_>, Error> {
        let (decision, lsn) = self.redeem_inner(token, client, ip.into(), self.clock.now())?;
        Ok(Durable {
            engine: self,
            decision: Some(decision),
            lsn,
        })
    }

    fn redeem_inner(
        &self,
        token: &str,
        client: &str,
        ip: Option<IpAddr>,
        now: Timestamp,
    ) -> Result<(Decision, u64), Error> {
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, client) {
            return Ok((refused, 0));
        }
        let version = policies.version();
        let invalid = || {
            self.unsharded_outcomes
                .add(outcome_slot(Verdict::Deny(DenyReason::InvalidToken)));
            Ok((deny(DenyReason::InvalidToken, None, version), 0))
        };
        // 1. Parse; unknown key ids are malformed too.
        let Some(parsed) = token::parse(token, TokenKind::Refresh) else {
            return invalid();
        };
        let keys = self.keys.load();
        if !keys.contains(parsed.key) {
            return invalid();
        }
        // 2. Look up; 3. verify the tag. A forgery touches nothing.
        let mut shard = self.table.lock(&parsed.family);
        let Some(slot) = shard.slot_mut(&parsed.family) else {
            drop(shard);
            return invalid();
        };
        let f = slot.family;
        // The current generation verifies against the cached tag, older ones
        // by HMAC. Timing can thus tell whether a presented generation is the
        // current one, never anything about the tag.
        let cached = parsed.generation == f.generation
            && parsed.key == f.key
            && keys.uid(f.key) == Some(f.tag_uid);
        let valid = if cached {
            parsed.tag_is(&f.tag)
        } else {
            keys.verify(&parsed, &f.secret)
        };
        if !valid {
            drop(shard);
            return invalid();
        }
        let policy = policies.policy(f.client());
        let req = Request {
            generation: parsed.generation,
            client,
            ip,
            now,
        };
        let mut verdict = decision::decide(f, &req, policy);
        if let Verdict::Accept(kind) = verdict {
            // The token to return is minted with the active key on rotation,
            // else with the key of the current generation. If that key was
            // removed, the current token is dead; refuse rather than fork.
            let mint_key = if kind == AcceptKind::Rotated {
                keys.active()
            } else {
                f.key
            };
            if !keys.contains(mint_key) {
                verdict = Verdict::Deny(DenyReason::InvalidToken);
            }
        }
        slot.outcomes[outcome_slot(verdict)] += 1;
        // Shadow: the same pure decision on the same state under the
        // candidate set, counted and otherwise discarded.
        if let Some(shadow) = &*self.shadow.load() {
            // A candidate that would refuse the client counts as such.
            let candidate = match shadow.set.admits_client(client) {
                true => decision::decide(f, &req, shadow.set.policy(f.client())),
                false => Verdict::Deny(DenyReason::UnknownClient),
            };
            slot.shadow.record(
                shadow.epoch,
                f.client(),
                outcome_slot(verdict),
                outcome_slot(candidate),
            );
        }
        match verdict {
            Verdict::Accept(kind) => {
                decision::apply_accept(f, kind, &req, keys.active());
                let token = mint_current(f, &keys);
                let (family, generation) = (f.id, f.generation);
                let lsn = self.persist(f)?;
                drop(shard);
                // A `reuse`-rotation acceptance only moves last use: losing
                // it to a crash makes the family look idle sooner, which is
                // the safe direction, so it is not waited for.
                let wait = if kind == AcceptKind::Kept { 0 } else { lsn };
                match token {
                    Some(token) => Ok((
                        Decision::Accept(Accepted {
                            token,
                            family,
                            generation,
                            kind,
                            policy_version: version,
                        }),
                        wait,
                    )),
                    // Checked just above, under the same ring snapshot.
                    None => invalid(),
                }
            }
            Verdict::Deny(reason) => {
                let (current, family) = (f.generation, f.id);
                // Copying the client bumps a count shared by all of a
                // client's families, and the subject is copied into a new
                // allocation: only for a sink, or for reuse, whose response
                // needs the subject.
                let who = (reason == DenyReason::ReuseDetected || self.events.delivers())
                    .then(|| Who::of(f, self.table.loc(&parsed.family, slot.slot)));
                let mut revoked = false;
                let on_reuse = policy.on_reuse;
                if reason == DenyReason::ReuseDetected && on_reuse != OnReuse::ReportOnly {
                    revoked = f.revoke(RevokeReason::ReuseDetected, now);
                }
                let persisted = if revoked { self.persist(f) } else { Ok(0) };
                drop(shard);
                // Revoked by this call, so its index entry is this call's to
                // remove (see `SubjectIndex`), even if the store failed.
                if revoked && let Some(who) = &who {
                    self.subjects.remove(&who.subject, who.loc);
                }
                let mut lsn = persisted?;
                lsn = lsn.max(self.after_denial(
                    reason,
                    &req,
                    who.as_ref(),
                    current,
                    on_reuse,
                    revoked,
                    version,
                )?);
                Ok((deny(reason, Some(family), version), lsn))
            }
        }
    }

    /// Evaluate `candidate` beside the set in force on live redemptions,
    /// with no effect but counting (active outcome, candidate outcome) pairs
    /// per client. Replaces any earlier candidate and its counts.
    pub fn set_shadow(&self, candidate: PolicySet) -> PolicyVersion {
        let version = candidate.version();
        let epoch = self.shadow_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        self.shadow.store(Some(Arc::new(Shadow {
            set: Arc::new(candidate),
            epoch,
            since: self.clock.now(),
        })));
        version
    }

    /// What the candidate would have changed so far; `None` without one.
    pub fn shadow_report(&self) -> Option<ShadowReport> {
        let shadow = self.shadow.load_full()?;
        let mut rows: Vec<ShadowRow> = self
            .table
            .shadow_counts(shadow.epoch)
            .into_iter()
            .map(|((client, a, c), count)| ShadowRow {
                client,
                active: slot_name(usize::from(a)),
                candidate: slot_name(usize::from(c)),
                count,
            })
            .collect();
        rows.sort_by(|x, y| {
            (&x.client, x.active, x.candidate).cmp(&(&y.client, y.active, y.candidate))
        });
        Some(ShadowReport {
            active: self.policies.load().version(),
            candidate: shadow.set.version(),
            since: shadow.since,
            rows,
        })
    }

    /// Put the candidate in force (an atomic swap) and end the shadow.
    /// Returns the version now in force, `None` if there was no candidate.
    pub fn promote_shadow(&self) -> Option<PolicyVersion> {
        let shadow = self.shadow.swap(None)?;
        let set = Arc::unwrap_or_clone(shadow.set.clone());
        let version = set.version();
        self.swap_policies(set);
        Some(version)
    }

    /// Drop the candidate and its counts. Returns whether there was one.
    pub fn drop_shadow(&self) -> bool {
        self.shadow.swap(None).is_some()
    }

    /// Events and cross-family follow-ups of a denial, outside every lock.
    #[allow(clippy::too_many_arguments)]
    fn after_denial(
        &self,
        reason: DenyReason,
        req: &Request<'_>,
        who: Option<&Who>,
        current: Generation,
        on_reuse: OnReuse,
        revoked: bool,
        version: PolicyVersion,
    ) -> Result<u64, Error> {
        let (ip, now) = (req.ip, req.now);
        let mut lsn = 0;
        match reason {
            DenyReason::ReuseDetected => {
                self.emit(
                    EventKind::ReuseDetected {
                        presented: req.generation,
                        current,
                        response: on_reuse,
                    },
                    who,
                    ip,
                    version,
                    now,
                );
                if revoked {
                    self.emit(
                        EventKind::FamilyRevoked {
                            reason: RevokeReason::ReuseDetected,
                        },
                        who,
                        ip,
                        version,
                        now,
                    );
                }
                // The caller copies client and subject for every reuse.
                let Some(who) = who else {
                    return Ok(lsn);
                };
                match on_reuse {
                    OnReuse::RevokeSubjectClient => {
                        lsn = self
                            .revoke_subject_with(
                                &who.subject,
                                Some(&who.client),
                                RevokeReason::SubjectReuse,
                                ip,
                                now,
                            )?
                            .1;
                    }
                    OnReuse::RevokeSubject => {
                        lsn = self
                            .revoke_subject_with(
                                &who.subject,
                                None,
                                RevokeReason::SubjectReuse,
                                ip,
                                now,
                            )?
                            .1;
                    }
                    OnReuse::RevokeFamily | OnReuse::ReportOnly => {}
                }
            }
            DenyReason::ClientMismatch => self.emit(
                EventKind::ClientMismatch {
                    presented_client: req.client.into(),
                },
                who,
                ip,
                version,
                now,
            ),
            DenyReason::StateRollback => self.emit(
                EventKind::StateRollback {
                    presented: req.generation,
                    current,
                },
                who,
                ip,
                version,
                now,
            ),
            DenyReason::IpNotAllowed => self.emit(EventKind::IpNotAllowed, who, ip, version, now),
            _ => {}
        }
        Ok(lsn)
    }

    /// Revoke the family of a refresh token. With `client`, a token of
    /// another client is left alone (RFC 7009 §2.1). Returns whether this
    /// call revoked it; an invalid or already-revoked token is `false`.
    pub fn revoke_token(&self, token: &str, client: Option<&str>) -> Result<bool, Error> {
        self.revoke_token_at(token, client, self.clock.now())
    }

    /// [`revoke_token`](Self::revoke_token) at a given time.
    pub fn revoke_token_at(
        &self,
        token: &str,
        client: Option<&str>,
        now: Timestamp,
    ) -> Result<bool, Error> {
        let Some(parsed) = token::parse(token, TokenKind::Refresh) else {
            return Ok(false);
        };
        let keys = self.keys.load();
        let mut shard = self.table.lock(&parsed.family);
        let Some((slot, f)) = shard.locate_mut(&parsed.family) else {
            return Ok(false);
        };
        if !keys.verify(&parsed, &f.secret)
            || client.is_some_and(|c| **f.client() != *c)
            || !f.revoke(RevokeReason::Requested, now)
        {
            return Ok(false);
        }
        let persisted = self.persist(f);
        let who = Who::of(f, self.table.loc(&parsed.family, slot));
        drop(shard);
        // Unindexed (and reported) even if the store failed: it is revoked.
        self.after_revoke(&who, RevokeReason::Requested, None, now);
        self.settle(persisted?)?;
        Ok(true)
    }

    /// Revoke one family by id. Returns whether this call revoked it.
    pub fn revoke_family(&self, id: FamilyId) -> Result<bool, Error> {
        self.revoke_family_at(id, self.clock.now())
    }

    /// [`revoke_family`](Self::revoke_family) at a given time.
    pub fn revoke_family_at(&self, id: FamilyId, now: Timestamp) -> Result<bool, Error> {
        let mut shard = self.table.lock(&id);
        let Some((slot, f)) = shard.locate_mut(&id) else {
            return Ok(false);
        };
        if !f.revoke(RevokeReason::Requested, now) {
            return Ok(false);
        }
        let persisted = self.persist(f);
        let who = Who::of(f, self.table.loc(&id, slot));
        drop(shard);
        // Unindexed (and reported) even if the store failed: it is revoked.
        self.after_revoke(&who, RevokeReason::Requested, None, now);
        self.settle(persisted?)?;
        Ok(true)
    }

    /// What follows a revocation made by this call, outside the family's
    /// lock: its index entry goes, and the event.
    fn after_revoke(&self, who: &Who, reason: RevokeReason, ip: Option<IpAddr>, now: Timestamp) {
        self.subjects.remove(&who.subject, who.loc);
        self.report_revoked(who, reason, ip, now);
    }

    fn report_revoked(&self, who: &Who, reason: RevokeReason, ip: Option<IpAddr>, now: Timestamp) {
        let version = self.policies.load().version();
        self.emit(
            EventKind::FamilyRevoked { reason },
            Some(who),
            ip,
            version,
            now,
        );
    }

    /// Revoke every family of `subject`, or only those of `client`.
    /// Returns how many this call revoked.
    pub fn revoke_subject(&self, subject: &str, client: Option<&str>) -> Result<usize, Error> {
        self.revoke_subject_at(subject, client, self.clock.now())
    }

    /// [`revoke_subject`](Self::revoke_subject) at a given time.
    pub fn revoke_subject_at(
        &self,
        subject: &str,
        client: Option<&str>,
        now: Timestamp,
    ) -> Result<usize, Error> {
        let (n, lsn) =
            self.revoke_subject_with(subject, client, RevokeReason::SubjectRevoked, None, now)?;
        self.settle(lsn)?;
        Ok(n)
    }

    /// Revoke and unindex the subject's families (of `client` only, if
    /// given); returns how many, and the LSN to settle.
    fn revoke_subject_with(
        &self,
        subject: &str,
        client: Option<&str>,
        reason: RevokeReason,
        ip: Option<IpAddr>,
        now: Timestamp,
    ) -> Result<(usize, u64), Error> {
        let version = self.policies.load().version();
        let mut revoked = Vec::new();
        let mut lsn = 0;
        let mut failure = None;
        {
            let mut entries = self.subjects.lock(subject);
            for loc in entries.candidates() {
                let (mut shard, slot) = self.table.lock_loc(loc);
                let mine = match shard.at_mut(slot) {
                    Some(f)
                        if f.is_active()
                            && f.subject.as_str() == subject
                            && client.is_none_or(|c| **f.client() == *c)
                            && failure.is_none() =>
                    {
                        f.revoke(reason, now);
                        match self.persist(f) {
                            Ok(l) => lsn = lsn.max(l),
                            Err(e) => failure = Some(e),
                        }
                        revoked.push(Who::of(f, loc));
                        true
                    }
                    // Another client's or subject's, or an entry whose
                    // family left and whose removal is pending: not this
                    // call's to remove.
                    _ => false,
                };
                drop(shard);
                if mine {
                    entries.remove(loc);
                }
            }
        }
        for w in &revoked {
            self.emit(
                EventKind::FamilyRevoked { reason },
                Some(w),
                ip,
                version,
                now,
            );
        }
        match failure {
            Some(e) => Err(e),
            None => Ok((revoked.len(), lsn)),
        }
    }

    /// Revoke every family of `client`. This scans the whole table, one
    /// shard lock at a time: an administrative operation, not a hot path.
    pub fn revoke_client(&self, client: &str) -> Result<usize, Error> {
        self.revoke_client_at(client, self.clock.now())
    }

    /// [`revoke_client`](Self::revoke_client) at a given time.
    pub fn revoke_client_at(&self, client: &str, now: Timestamp) -> Result<usize, Error> {
        let mut revoked = Vec::new();
        let mut lsn = 0;
        let mut failure = None;
        'shards: for i in 0..self.table.shard_count() {
            let mut shard = self.table.lock_shard(i);
            for (slot, f) in shard.families_mut() {
                if **f.client() == *client && f.revoke(RevokeReason::ClientRevoked, now) {
                    let persisted = self.persist(f);
                    revoked.push(Who::of(f, self.table.loc(&f.id, slot)));
                    match persisted {
                        Ok(l) => lsn = lsn.max(l),
                        Err(e) => {
                            failure = Some(e);
                            break 'shards;
                        }
                    }
                }
            }
        }
        // Everything revoked is unindexed, also when the store failed.
        for w in &revoked {
            self.after_revoke(w, RevokeReason::ClientRevoked, None, now);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        self.settle(lsn)?;
        Ok(revoked.len())
    }

    /// Describe a refresh token without changing anything. `None` for a
    /// malformed or forged token, or an unknown family.
    pub fn introspect(&self, token: &str) -> Option<Introspection> {
        self.introspect_at(token, self.clock.now())
    }

    /// [`introspect`](Self::introspect) at a given time.
    pub fn introspect_at(&self, token: &str, now: Timestamp) -> Option<Introspection> {
        let parsed = token::parse(token, TokenKind::Refresh)?;
        let keys = self.keys.load();
        let policies = self.policies.load();
        let shard = self.table.lock(&parsed.family);
        let f = shard.get(&parsed.family)?;
        if !keys.verify(&parsed, &f.secret) {
            return None;
        }
        let policy = policies.policy(f.client());
        let expired = decision::expiry(f, policy, now).is_some();
        Some(Introspection {
            active: f.is_active() && !expired && parsed.generation == f.generation,
            family: f.id,
            client: f.client().clone(),
            subject: Arc::from(f.subject.as_str()),
            scope: f.scope().clone(),
            generation: parsed.generation,
            current_generation: f.generation,
            issued_at: f.created,
            last_used: f.last_used,
            idle_expires_at: policy.idle_ttl.map(|t| f.last_used.saturating_add(t)),
            absolute_expires_at: policy.absolute_ttl.map(|t| f.created.saturating_add(t)),
            status: f.status(),
        })
    }

    /// Remove expired families, and revoked ones past their retention,
    /// examining at most `budget` slots. Call it periodically; memory then
    /// stays bounded by the live families under churn.
    pub fn sweep(&self, budget: usize) -> Result<SweepReport, Error> {
        self.sweep_at(budget, self.clock.now())
    }

    /// [`sweep`](Self::sweep) at a given time.
    pub fn sweep_at(&self, budget: usize, now: Timestamp) -> Result<SweepReport, Error> {
        let policies = self.policies.load();
        let retention = self.revoked_retention;
        let mut retired = Vec::new();
        let swept = self.table.sweep(budget, |f| {
            let dead = match f.status() {
                Status::Revoked { at, .. } => now >= at.saturating_add(retention),
                Status::Active => {
                    let policy = policies.policy(f.client());
                    match f.code.as_deref() {
                        // An unused code lives `code_ttl`, then its family goes.
                        Some(c) if f.generation == Generation::CODE => c.expired(policy, now),
                        _ => decision::expiry(f, policy, now).is_some(),
                    }
                }
            };
            if !dead && code::state_retired(f, now) {
                retired.push(f.id);
            }
            dead
        });
        // Code state kept to judge replays goes once it can judge none, so
        // it costs memory only for the codes of the last `MAX_CODE_TTL`.
        // Not written to the store: a record recovered with it is retired
        // again by the next pass.
        for id in retired {
            let mut shard = self.table.lock(&id);
            if let Some(f) = shard.get_mut(&id)
                && code::state_retired(f, now)
            {
                f.code = None;
            }
        }
        let removed = swept.removed;
        // Active families leave the index here (revoked ones did when they
        // were revoked), all of them before any store error can return.
        for (loc, f) in &removed {
            if f.is_active() {
                self.subjects.remove(f.subject.as_str(), *loc);
            }
        }
        let stored = match &self.store {
            // Not waited for: a removal lost to a crash is swept again.
            Some(store) => removed
                .iter()
                .try_for_each(|(_, f)| store.remove(f.id, f.lsn).map(drop)),
            None => Ok(()),
        };
        let report = SweepReport {
            examined: swept.examined,
            removed: removed.len(),
        };
        // The removed families' grants are released first, so that a pass
        // forgets the pairs only they used.
        drop(removed);
        if swept.wrapped {
            self.interner.prune();
        }
        stored.map(|()| report)
    }

    /// A copy of one family's record, for stores and backups.
    pub fn family_record(&self, id: FamilyId) -> Option<FamilyRecord> {
        let mut f = self.table.lock(&id).get(&id).cloned()?;
        // The tag cache is a redeemable token: it never leaves the table.
        f.tag = [0; 16];
        f.tag_uid = KeyUid::NONE;
        Some(FamilyRecord(f))
    }

    /// Put a family record in place, replacing any record with its id, and
    /// persist it. Restoring an older record is a rollback: tokens newer
    /// than it are then denied `state_rollback`.
    pub fn restore_family(&self, record: FamilyRecord) -> Result<(), Error> {
        let id = record.0.id;
        self.install(record.0);
        let lsn = {
            let mut shard = self.table.lock(&id);
            match shard.get_mut(&id) {
                Some(f) => self.persist(f)?,
                None => 0,
            }
        };
        self.settle(lsn)
    }

    /// Put `f` in the table and, if active, the subject index.
    fn install(&self, mut f: Family) {
        f.tag_uid = KeyUid::NONE;
        f.grant = self.interner.grant(f.client(), f.scope());
        let (id, active) = (f.id, f.is_active());
        let mut entries = self.subjects.lock(f.subject.as_str());
        let mut shard = self.table.lock(&id);
        let (slot, replaced, collapse) = match shard.locate_mut(&id) {
            Some((slot, record)) => (slot, Some(std::mem::replace(record, f)), None),
            None => {
                let (slot, collapse) = shard.insert(f);
                (slot, None, collapse)
            }
        };
        drop(shard);
        let loc = self.table.loc(&id, slot);
        if active {
            entries.push(loc);
        }
        drop(entries);
        // Milliseconds of kernel work, so with no lock held (see `huge`).
        if let Some(c) = collapse {
            c.run();
        }
        // The replaced record was indexed if it was active when replaced
        // (under the lock, so no revoker took it out first): this call took
        // it out of the table, so its entry is this call's to remove. Under
        // the same subject, or one sharing its hash, that is one of two
        // equal entries, and either serves the new record.
        if let Some(old) = replaced.filter(Family::is_active) {
            self.subjects.remove(old.subject.as_str(), loc);
        }
    }

    /// Append `f`'s new state to the store, under its lock. Returns the LSN
    /// to settle (0 without a store).
    fn persist(&self, f: &mut Family) -> Result<u64, Error> {
        match &self.store {
            None => Ok(0),
            Some(store) => {
                let lsn = store.put(RecordRef(f))?;
                f.lsn = lsn;
                Ok(lsn)
            }
        }
    }

    /// In `Sync` durability, wait until `lsn` is durable.
    fn settle(&self, lsn: u64) -> Result<(), Error> {
        match &self.store {
            Some(store) if lsn != 0 && self.sync => store.wait_durable(lsn),
            _ => Ok(()),
        }
    }

    /// Make every change so far durable (call before shutdown).
    pub fn flush(&self) -> Result<(), Error> {
        match &self.store {
            Some(store) => store.flush(),
            None => Ok(()),
        }
    }

    /// Rewrite the store's history as one snapshot of the table, so the log
    /// stays proportional to the live families. Safe while redemptions run.
    pub fn compact(&self) -> Result<(), Error> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        store.compact(&mut |emit| {
            for i in 0..self.table.shard_count() {
                let mut shard = self.table.lock_shard(i);
                for (_, f) in shard.families_mut() {
                    emit(RecordRef(f));
                }
            }
        })
    }

    /// The store's durability, or `None` without a store.
    pub fn durability(&self) -> Durability {
        self.store
            .as_ref()
            .map_or(Durability::None, |s| s.durability())
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        let mut counts = self.table.outcomes();
        for (i, c) in counts.iter_mut().enumerate() {
            *c += self.unsharded_outcomes.get(i);
        }
        let slots = ACCEPT_KINDS.len() + DenyReason::ALL.len();
        let outcomes = (0..slots).map(|i| (slot_name(i), counts[i])).collect();
        Stats {
            families: self.table.len(),
            outcomes,
            events: self.events.counts(),
        }
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

fn deny(reason: DenyReason, family: Option<FamilyId>, version: PolicyVersion) -> Decision {
    Decision::Deny(Denied {
        reason,
        family,
        policy_version: version,
    })
}

fn check_identity(client: &str, subject: &str, scope: &str) -> Result<(), Error> {
    check_len("client", client, crate::policy::MAX_CLIENT_ID_LEN)?;
    check_len("subject", subject, MAX_SUBJECT_LEN)?;
    if scope.len() > MAX_SCOPE_LEN {
        return Err(Error::InvalidArgument {
            name: "scope",
            expected: "at most 4096 bytes",
        });
    }
    Ok(())
}

fn check_len(name: &'static str, v: &str, max: usize) -> Result<(), Error> {
    if v.is_empty() || v.len() > max {
        return Err(Error::InvalidArgument {
            name,
            expected: match name {
                "client" => "1 to 255 bytes",
                _ => "1 to 1024 bytes",
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine builder whose policies cap each subject at `cap` families.
    fn capped(cap: u32) -> EngineBuilder {
        use crate::policy::{PolicyOverrides, PolicySet};
        Engine::builder().policies(
            PolicySet::builder()
                .defaults(PolicyOverrides::new().max_families_per_subject(cap))
                .build()
                .unwrap(),
        )
    }

    /// Issue a family of client `app` to `subject`; its token and id.
    fn issue_to(e: &Engine, subject: &str) -> (Token, FamilyId) {
        issue_scoped(e, subject, "openid")
    }

    /// [`issue_to`] with `scope`.
    fn issue_scoped(e: &Engine, subject: &str, scope: &str) -> (Token, FamilyId) {
        let d = e
            .issue(&IssueRequest {
                client: "app",
                subject,
                scope,
                ip: Some("10.0.0.1".parse().unwrap()),
            })
            .unwrap();
        let a = d.accepted().unwrap();
        (a.token, a.family)
    }

    /// Issue runs the huge-page collapse its insert asked for (after its
    /// locks are released).
    #[test]
    fn issue_runs_the_collapse_it_noted() {
        use crate::huge::{HUGE, tests::RUN};
        let e = Engine::builder().shards(1).build().unwrap();
        let before = RUN.with(|n| n.get());
        let n = 3 * HUGE / size_of::<Family>();
        for i in 0..n {
            issue_to(&e, &format!("user-{i}"));
        }
        assert!(RUN.with(|n| n.get()) > before, "a collapse ran");
    }

    /// Scopes come from authorization requests: once their families are
    /// swept, a full pass forgets the pairs, so the interner does not grow
    /// with every scope ever granted.
    #[test]
    fn a_sweep_pass_forgets_the_grants_of_swept_families() {
        let e = Engine::builder()
            .shards(4)
            .revoked_retention(Duration::ZERO)
            .build()
            .unwrap();
        let issue = |scope: &str| issue_scoped(&e, "alice", scope).1;
        let kept = issue("openid");
        for i in 0..100 {
            let id = issue(&format!("read:doc:{i}"));
            assert!(e.revoke_family(id).unwrap());
        }
        // "app", "openid", and 100 pairs with a scope each.
        assert_eq!(e.interner.len(), (101, 102));
        // One pass over 4 shards of about 100 slots, and then some.
        let report = e.sweep(1_000).unwrap();
        assert_eq!(report.removed, 100);
        assert_eq!(e.interner.len(), (1, 2), "only the live family's pair");
        assert!(e.family_record(kept).is_some());
    }

    #[test]
    fn outcome_slots_name_their_outcome() {
        for k in ACCEPT_KINDS {
            assert_eq!(slot_name(outcome_slot(Verdict::Accept(k))), k.as_str());
        }
        for r in DenyReason::ALL {
            assert_eq!(slot_name(outcome_slot(Verdict::Deny(r))), r.as_str());
        }
        assert!(ACCEPT_KINDS.len() + DenyReason::ALL.len() <= OUTCOMES);
    }

    /// Subjects whose index entries collide (same shard, same hash) stay
    /// apart: the cap and subject-wide revocation of one leave the other's
    /// families alone.
    #[test]
    fn colliding_subjects_stay_apart() {
        let mut e = capped(1).build().unwrap();
        e.subjects = SubjectIndex::colliding(4);
        let issue = |subject: &str| issue_to(&e, subject).1;
        let bob = issue("bob");
        let alice1 = issue("alice");
        let alice2 = issue("alice");
        let active = |id| e.family_record(id).unwrap().status() == Status::Active;
        assert!(!active(alice1), "alice's cap of 1 evicted her older family");
        assert!(active(bob), "bob's family is not alice's to evict");
        assert!(active(alice2));
        assert_eq!(e.revoke_subject("alice", None).unwrap(), 1);
        assert!(active(bob));
        assert!(!active(alice2));
        let indexed: Vec<FamilyId> = e
            .subjects
            .lock("bob")
            .candidates()
            .into_iter()
            .map(|loc| {
                let (shard, slot) = e.table.lock_loc(loc);
                shard.at(slot).expect("an indexed family").id
            })
            .collect();
        assert_eq!(indexed, [bob]);
        assert_eq!(e.revoke_subject("bob", None).unwrap(), 1);
        assert!(e.subjects.lock("bob").candidates().is_empty());
    }

    /// The sweeper removes an expired family's index entry after dropping
    /// the shard lock. Walks that meet the entry in between (the cap of a
    /// new issue, a subject revocation) must leave it: the slot can be
    /// reused by a new family of the same subject at once, and the
    /// sweeper's removal then takes one of two equal entries. Had a walk
    /// removed the first, the new family would lose its own.
    #[test]
    fn a_pending_removal_never_takes_a_new_familys_entry() {
        let e = capped(5).shards(1).build().unwrap();
        let issue = |subject: &str| issue_to(&e, subject).1;
        let old = issue("alice");
        // The sweeper's first half: the family leaves the table.
        let removed = e.table.sweep(64, |f| f.id == old).removed;
        let [(loc, _)] = removed[..] else {
            panic!("one family swept");
        };
        // Walks meet the entry while its removal is pending.
        assert_eq!(e.revoke_subject("alice", None).unwrap(), 0);
        let new = issue("alice");
        let reused = {
            let shard = e.table.lock(&new);
            e.table.loc(&new, shard.find(&new).unwrap())
        };
        assert_eq!(reused, loc, "the new family took the freed slot");
        // The sweeper's second half.
        e.subjects.remove("alice", loc);
        assert_eq!(e.subjects.len(), 1);
        assert_eq!(
            e.revoke_subject("alice", None).unwrap(),
            1,
            "the new family is still indexed"
        );
        assert_eq!(e.subjects.len(), 0);
    }

    /// The cap evicts only the family it listed: a restore that gives the
    /// listed record another subject between the walk and the eviction
    /// (the restore holds the other subject's index lock, not this one's)
    /// must not get the other subject's family evicted. Raced with real
    /// threads; the evictions are read back from the events.
    #[test]
    fn the_cap_never_evicts_a_family_restored_under_another_subject() {
        use crate::event::{EventKind, MemorySink};
        let sink = Arc::new(MemorySink::new());
        let e = capped(1)
            .events(sink.clone())
            .revoked_retention(Duration::ZERO)
            .build()
            .unwrap();
        let issue = |subject: &str| issue_to(&e, subject).1;
        // A name whose index shard is not alice's, so the restore (under
        // its lock) can run while alice's cap walks (under hers).
        let bob = (0..)
            .map(|i| format!("bob{i}"))
            .find(|b| e.subjects.shard_of(b) != e.subjects.shard_of("alice"))
            .unwrap();
        let x = issue(&bob);
        let record = e.family_record(x).unwrap();
        let as_subject = |s: &str| {
            let mut r = record.0.clone();
            r.subject = SubjectName::new(s);
            FamilyRecord(r)
        };
        let (as_alice, as_bob) = (as_subject("alice"), as_subject(&bob));
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..20_000 {
                    e.restore_family(FamilyRecord(as_alice.0.clone())).unwrap();
                    e.restore_family(FamilyRecord(as_bob.0.clone())).unwrap();
                }
            });
            for _ in 0..20_000 {
                issue("alice");
                e.sweep(1024).unwrap();
            }
        });
        for ev in sink.take() {
            if let EventKind::CapEviction { .. } = ev.kind {
                assert_eq!(ev.subject.as_deref(), Some("alice"), "{ev:?}");
            }
        }
    }

    /// A store whose writes fail once armed.
    struct FailingStore {
        armed: Arc<std::sync::atomic::AtomicBool>,
        lsn: AtomicU64,
    }

    impl Store for FailingStore {
        fn recover(&self) -> Result<Vec<crate::store::StoredRecord>, Error> {
            Ok(Vec::new())
        }
        fn put(&self, _: RecordRef<'_>) -> Result<u64, Error> {
            if self.armed.load(Ordering::SeqCst) {
                return Err(Error::Store {
                    detail: "test: disk full".into(),
                });
            }
            Ok(self.lsn.fetch_add(1, Ordering::SeqCst) + 1)
        }
        fn remove(&self, _: FamilyId, _: u64) -> Result<u64, Error> {
            Ok(self.lsn.fetch_add(1, Ordering::SeqCst) + 1)
        }
        fn wait_durable(&self, _: u64) -> Result<(), Error> {
            Ok(())
        }
        fn poll_durable(&self, _: u64, _: &std::task::Waker) -> std::task::Poll<Result<(), Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn durability(&self) -> Durability {
            Durability::Sync
        }
        fn compact(&self, _: &mut crate::store::Snapshot<'_>) -> Result<(), Error> {
            Ok(())
        }
        fn flush(&self) -> Result<(), Error> {
            Ok(())
        }
    }

    /// A family revoked by a call whose store write then fails is still
    /// revoked in memory (fail closed), so it leaves the subject index all
    /// the same: by family, by reuse, and by client (which stops at the
    /// first failure but unindexes what it revoked).
    #[test]
    fn revocations_unindex_even_when_the_store_fails() {
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let e = Engine::builder()
            .store(FailingStore {
                armed: armed.clone(),
                lsn: AtomicU64::new(0),
            })
            .build()
            .unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let issue = |subject: &str| issue_to(&e, subject);
        let a = issue("a");
        let b = issue("b");
        let c = issue("c");
        e.redeem(&b.0, "app", ip).unwrap().accepted().unwrap();
        assert_eq!(e.subjects.len(), 3);
        armed.store(true, Ordering::SeqCst);
        assert!(e.revoke_family(a.1).is_err());
        assert_eq!(e.subjects.len(), 2, "a unindexed");
        assert!(
            e.redeem(&b.0, "app", ip).is_err(),
            "reuse, then the write fails"
        );
        assert_eq!(e.subjects.len(), 1, "b unindexed");
        assert!(e.revoke_client("app").is_err());
        assert_eq!(e.subjects.len(), 0, "c unindexed");
        let revoked = |id| e.family_record(id).unwrap().status() != Status::Active;
        assert!(revoked(a.1) && revoked(b.1) && revoked(c.1));
    }

    /// A family revoked for reuse leaves the subject index, whatever else
    /// `on_reuse` revokes; reported-only reuse leaves it indexed.
    #[test]
    fn reuse_revocation_unindexes_the_family() {
        use crate::policy::{OnReuse, PolicyOverrides, PolicySet};
        for (on_reuse, indexed) in [
            (OnReuse::RevokeFamily, 0),
            (OnReuse::RevokeSubjectClient, 0),
            (OnReuse::RevokeSubject, 0),
            (OnReuse::ReportOnly, 1),
        ] {
            let e = Engine::builder()
                .policies(
                    PolicySet::builder()
                        .defaults(PolicyOverrides::new().on_reuse(on_reuse))
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap();
            let ip: IpAddr = "10.0.0.1".parse().unwrap();
            let (t1, _) = issue_to(&e, "alice");
            e.redeem(&t1, "app", ip).unwrap().accepted().unwrap();
            let d = e.redeem(&t1, "app", ip).unwrap();
            assert_eq!(d.deny_reason(), Some(DenyReason::ReuseDetected));
            assert_eq!(e.subjects.len(), indexed, "{on_reuse:?}");
        }
    }

    /// A restore that gives a family another subject moves its index entry,
    /// also when the two subjects collide in the index.
    #[test]
    fn restore_under_another_subject_moves_the_index_entry() {
        for colliding in [false, true] {
            let mut e = Engine::builder().build().unwrap();
            if colliding {
                e.subjects = SubjectIndex::colliding(4);
            }
            let (_, id) = issue_to(&e, "x");
            let mut record = e.family_record(id).unwrap();
            record.0.subject = SubjectName::new("y");
            e.restore_family(record).unwrap();
            assert_eq!(e.subjects.len(), 1, "one entry, colliding: {colliding}");
            assert_eq!(
                e.revoke_subject("x", None).unwrap(),
                0,
                "colliding: {colliding}"
            );
            assert_eq!(
                e.revoke_subject("y", None).unwrap(),
                1,
                "colliding: {colliding}"
            );
        }
    }

    /// Recovery into fewer shards than wrote the store (a smaller machine):
    /// each merged shard has colliding slots, yet only the colliding
    /// families leave their own slot, and every token still works.
    #[cfg(feature = "durable")]
    #[test]
    fn recovery_into_fewer_shards_overflows_only_collisions() {
        use crate::store::{LogOptions, LogStore};
        let dir = std::env::temp_dir().join(format!("rg-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let keys = KeyRing::new(
            crate::token::KeyId(1),
            &crate::token::KeySecret::from_bytes([5; 32]),
        );
        let open = |shards| {
            Engine::builder()
                .keys(keys.clone())
                .shards(shards)
                .store(LogStore::open(&dir, LogOptions::default()).unwrap())
                .build()
                .unwrap()
        };
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let tokens: Vec<Token> = {
            let e = open(2);
            (0..1000)
                .map(|i| {
                    let subject = format!("s{i}");
                    e.issue(&IssueRequest {
                        client: "c",
                        subject: &subject,
                        scope: "",
                        ip: Some(ip),
                    })
                    .unwrap()
                    .accepted()
                    .unwrap()
                    .token
                })
                .collect()
        };
        let e = open(1);
        // Two shards of ~500 merge: about half of the families collide.
        let overflow = e.table.lock_shard(0).overflow_len();
        assert!(overflow <= 600, "{overflow} of 1000 out of their slot");
        for t in &tokens {
            assert!(e.redeem(t, "c", ip).unwrap().accepted().is_some());
        }
        drop(e);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
