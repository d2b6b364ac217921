//! The engine over a shared store (README "Several instances";
//! docs/design.md "Several instances"): the store is the authority, the
//! engine's cache a bounded copy of it.
//!
//! Every operation here is the one-engine operation with the family lock
//! replaced by a compare-and-set: the engine decides on the record it has
//! (cached, or read once on a miss) with the same pure `decide`, then one
//! script call writes the new record, or only confirms that the version it
//! decided from is still current, conditioned on that version. A stale
//! cache makes the script answer with the current record, and the engine
//! decides again; so no answer that depends on a family's mutable state is
//! given without the store having confirmed that state. What needs no
//! mutable state is refused without the network: malformed tokens, unknown
//! key ids, and forged tags of cached families (a family's secret never
//! changes).
//!
//! The slot addressing of the in-process table (`FamilyId::slot`) means
//! nothing across engines: ids here are 16 random bytes, and the cache is
//! keyed by id.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::access::{AccessTokenInfo, ParsedAccess};
use crate::clock::Timestamp;
use crate::code::CodeState;
use crate::decision::{self, AcceptKind, Accepted, Decision, DenyReason, Plan, Request, Verdict};
use crate::dpop::Jkt;
use crate::error::Error;
use crate::event::EventKind;
use crate::family::{Family, RevokeReason};
use crate::policy::{ClientPolicy, PolicyVersion};
use crate::store::codec;
use crate::store::redis::{Cas, OnRollback, RedisStore};
use crate::table::{Loc, ShadowCounts};
use crate::token::{self, FamilyId, FamilySecret, Generation, KeyUid, TokenKind};

use super::execute::event_of;
use super::stats::outcome_slot;
use super::{
    Engine, ExchangeRequest, Introspection, IssueRequest, RedeemRequest, SweepReport, Who, deny,
    mint_current, refuse_unmintable,
};

pub(crate) use crate::store::redis::block_on;

/// The store and this engine's cache of it.
pub(super) struct Shared {
    pub(super) store: RedisStore,
    cache: Cache,
    /// Shadow counts of this engine's redemptions (README "Policy files",
    /// shadow mode), as the table's shards keep them for one engine.
    pub(super) shadow: Mutex<ShadowCounts>,
}

impl Shared {
    pub(super) fn new(store: RedisStore) -> Shared {
        let cache = Cache::new(store.options().cache_capacity);
        Shared {
            store,
            cache,
            shadow: Mutex::new(ShadowCounts::default()),
        }
    }

    /// Records cached.
    pub(super) fn cached(&self) -> usize {
        self.cache.shards.iter().map(|s| s.lock().len()).sum()
    }
}

/// A bounded map of family records with the store version each was read
/// or written at. Over capacity, an arbitrary record of the shard goes: a
/// miss costs one read, never a wrong answer.
struct Cache {
    shards: Box<[Mutex<CacheShard>]>,
    per_shard: usize,
}

/// Records of one cache shard, with the version each was read at.
type CacheShard = HashMap<FamilyId, (Family, u64), ahash::RandomState>;

impl Cache {
    fn new(capacity: usize) -> Cache {
        let n = capacity.clamp(1, 64).next_power_of_two();
        Cache {
            shards: (0..n).map(|_| Mutex::new(HashMap::default())).collect(),
            per_shard: capacity.div_ceil(n),
        }
    }

    fn shard(&self, id: &FamilyId) -> &Mutex<CacheShard> {
        &self.shards[id.shard_bits() as usize & (self.shards.len() - 1)]
    }

    fn get(&self, id: &FamilyId) -> Option<(Family, u64)> {
        self.shard(id).lock().get(id).cloned()
    }

    /// Keep `f` at `version`, unless a newer version is cached already.
    fn put(&self, f: &Family, version: u64) {
        let mut m = self.shard(&f.id).lock();
        match m.get(&f.id) {
            Some((_, v)) if *v > version => return,
            Some(_) => {}
            None if m.len() >= self.per_shard => {
                if let Some(k) = m.keys().next().copied() {
                    m.remove(&k);
                }
            }
            None => {}
        }
        m.insert(f.id, (f.clone(), version));
    }

    /// The cached family's secret (it never changes).
    fn secret(&self, id: &FamilyId) -> Option<FamilySecret> {
        self.shard(id).lock().get(id).map(|(f, _)| f.secret)
    }

    fn remove(&self, id: &FamilyId) {
        self.shard(id).lock().remove(id);
    }
}

/// Refuse a key TTL that could remove a family the policy in force would
/// still accept (README "Several instances"): a key lives `ttl` past its
/// last write, and every write is at or after the family's last use and
/// birth, so it must cover every policy's lifetime (the shorter of its
/// idle and absolute TTLs; a policy with neither never expires), the
/// retention of revoked families and a code's lifetime.
pub(super) fn check_key_ttl(
    ttl: Option<std::time::Duration>,
    set: &crate::policy::PolicySet,
    retention: std::time::Duration,
) -> Result<(), Error> {
    let Some(ttl) = ttl else {
        return Ok(());
    };
    let lifetime = |p: &ClientPolicy| match (p.idle_ttl, p.absolute_ttl) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let policies = std::iter::once(set.defaults()).chain(set.clients().into_iter().map(|(_, p)| p));
    let short = policies.map(lifetime).any(|l| l.is_none_or(|l| l > ttl));
    if short || retention > ttl || crate::policy::MAX_CODE_TTL > ttl {
        return Err(Error::InvalidArgument {
            name: "RedisOptions::key_ttl",
            expected: "at least every policy's lifetime (the shorter of idle_ttl and \
                       absolute_ttl; None for a policy with neither), the revoked \
                       retention and the code TTL",
        });
    }
    Ok(())
}

impl Who {
    /// Who `f` is, with no table location (a shared store has none).
    fn detached(f: &Family) -> Who {
        Who {
            family: f.id,
            client: f.client().clone(),
            subject: Arc::from(f.subject.as_str()),
            loc: Loc::DETACHED,
        }
    }
}

impl Engine {
    fn decode(&self, id: &FamilyId, bytes: &[u8]) -> Result<Family, Error> {
        let mut f = codec::decode(bytes)
            .filter(|f| f.id == *id)
            .ok_or_else(|| Error::store(format!("redis: family {id}: record unreadable")))?;
        f.grant = self.interner.grant_for(id, f.client(), f.scope(), f.jkt());
        f.tag_uid = KeyUid::NONE;
        Ok(f)
    }

    /// The family's record and version: the cache's, or one read.
    async fn load(&self, sh: &Shared, id: &FamilyId) -> Result<Option<(Family, u64)>, Error> {
        if let Some(hit) = sh.cache.get(id) {
            return Ok(Some(hit));
        }
        match sh.store.get(id).await? {
            None => Ok(None),
            Some((v, bytes)) => {
                let f = self.decode(id, &bytes)?;
                sh.cache.put(&f, v);
                Ok(Some((f, v)))
            }
        }
    }

    /// Decide on family `id` and make the decision hold: `judge` changes
    /// its copy of the record (or answers `None`: not this family's to
    /// change, nothing sent; only for what never changes in a record, its
    /// secret, client and subject, since the copy may be stale), then one
    /// script call writes the change, or
    /// confirms the version when nothing changed, conditioned on the
    /// version judged. A stale record is judged again, on the store's
    /// answer, at most `max_attempts` times. `None`: no such family, or
    /// `judge` declined.
    async fn transact<T>(
        &self,
        sh: &Shared,
        id: FamilyId,
        mut judge: impl FnMut(&mut Family) -> Option<T>,
    ) -> Result<Option<(T, Family)>, Error> {
        let Some((mut base, mut version)) = self.load(sh, &id).await? else {
            return Ok(None);
        };
        let attempts = sh.store.options().max_attempts;
        for _ in 0..attempts {
            let mut f = base.clone();
            let Some(out) = judge(&mut f) else {
                return Ok(None);
            };
            let (mut before, mut after) = (Vec::new(), Vec::new());
            codec::encode(&base, &mut before);
            codec::encode(&f, &mut after);
            let write = (after != before).then_some(after);
            // Versions count writes from 1; far below i64::MAX. On an error
            // (a timeout, a replica shortfall) the write may have landed:
            // the cache keeps the version judged, so the next call's
            // compare-and-set answers with whatever the store holds then.
            match sh.store.cas(&id, version as i64, write).await? {
                Cas::Done(v) => {
                    sh.cache.put(&f, v);
                    return Ok(Some((out, f)));
                }
                Cas::Stale(v, bytes) => {
                    base = self.decode(&id, &bytes)?;
                    version = v;
                    sh.cache.put(&base, v);
                }
                Cas::Gone => {
                    sh.cache.remove(&id);
                    return Ok(None);
                }
            }
        }
        Err(Error::store(format!(
            "redis: family {id} changed under {attempts} decisions in a row"
        )))
    }

    /// [`Engine::redeem`] against the shared store.
    pub(super) async fn shared_redeem(
        &self,
        sh: &Shared,
        req: RedeemRequest<'_>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        let policies = self.policies.load_full();
        if let Some(refused) = self.refuse_unlisted(&policies, req.client) {
            return Ok(refused);
        }
        let version = policies.version();
        let invalid = || Ok(self.invalid_token(version));
        let Some(parsed) = token::parse(req.token, TokenKind::Refresh) else {
            return invalid();
        };
        let keys = self.keys.load_full();
        if !keys.contains(parsed.key) {
            return invalid();
        }
        let roll_forward = sh.store.options().on_rollback == OnRollback::RollForward;
        let shadow = self.shadow.load_full();
        let judged = self
            .transact(sh, parsed.family, |f| {
                if !keys.verify(&parsed, &f.secret) {
                    return None;
                }
                let policy = policies.policy(f.client());
                let request = Request {
                    generation: parsed.generation,
                    client: req.client,
                    ip: req.ip,
                    jkt: req.dpop.as_ref(),
                    now,
                };
                let mut plan = decision::decide(f, &request, policy);
                // The tag proves the presented generation was minted: the
                // store lost writes. Move the record there and decide again
                // (README "Several instances", rolled-back store).
                let mut rolled = None;
                if roll_forward && plan.verdict == Verdict::Deny(DenyReason::StateRollback) {
                    rolled = Some(f.generation);
                    f.generation = parsed.generation;
                    f.key = parsed.key;
                    f.grace_used = 0;
                    f.tag_uid = KeyUid::NONE;
                    plan = decision::decide(f, &request, policy);
                }
                // As one engine: a successor whose key is gone is refused.
                refuse_unmintable(&mut plan, f, &keys);
                // Shadow: the same decision under the candidate set, on the
                // same record, counted once the store confirmed it.
                let candidate = shadow
                    .as_ref()
                    .map(|s| match s.set.admits_client(req.client) {
                        true => decision::decide(f, &request, s.set.policy(f.client())).verdict,
                        false => Verdict::Deny(DenyReason::UnknownClient),
                    });
                decision::apply(f, plan.change, now, req.ip, keys.active());
                self.rebind(f, plan.bind, request.jkt);
                let revoked = plan.cascade.family().is_some_and(|r| f.revoke(r, now));
                Some((plan, rolled, revoked, candidate))
            })
            .await?;
        let Some(((plan, rolled, revoked, candidate), mut f)) = judged else {
            return invalid();
        };
        self.unsharded_outcomes.add(outcome_slot(plan.verdict));
        if let (Some(s), Some(candidate)) = (&shadow, candidate) {
            sh.shadow.lock().record(
                s.epoch,
                f.client(),
                outcome_slot(plan.verdict),
                outcome_slot(candidate),
            );
        }
        if let Some(current) = rolled {
            let kind = EventKind::StateRollback {
                presented: parsed.generation,
                current,
            };
            self.emit(kind, Some(&Who::detached(&f)), req.ip, version, now);
        }
        match plan.verdict {
            Verdict::Accept(kind) => match mint_current(&mut f, &keys) {
                Some(token) => Ok(Decision::Accept(Accepted::of(
                    token,
                    f.id,
                    f.generation,
                    kind,
                    version,
                    &f.grant,
                    &f.subject,
                    f.secret,
                ))),
                None => invalid(),
            },
            Verdict::Deny(reason) => {
                self.shared_carry_out(sh, &plan, &f, revoked, req.client, req.ip, version, now)
                    .await?;
                Ok(deny(reason, Some(f.id), version))
            }
        }
    }

    /// A denial's events, the family's own `family_revoked` if this call
    /// revoked it, then the cascade across the subject: one engine's
    /// `carry_out`, in its order.
    #[allow(clippy::too_many_arguments)]
    async fn shared_carry_out(
        &self,
        sh: &Shared,
        plan: &Plan,
        f: &Family,
        revoked: bool,
        client: &str,
        ip: Option<IpAddr>,
        version: PolicyVersion,
        now: Timestamp,
    ) -> Result<(), Error> {
        let who = Who::detached(f);
        for signal in plan.events.iter() {
            self.emit(event_of(signal, client), Some(&who), ip, version, now);
        }
        if revoked && let Some(reason) = plan.cascade.family() {
            self.emit(
                EventKind::FamilyRevoked { reason },
                Some(&who),
                ip,
                version,
                now,
            );
            // Index upkeep only: a member whose family is revoked is
            // skipped by every later walk, and taken out then.
            let _ = sh
                .store
                .leave(&who.subject, vec![(f.id, f.client().to_string())])
                .await;
        }
        if let Some((client_only, reason)) = plan.cascade.subject() {
            let of_client = client_only.then_some(&*who.client);
            self.shared_revoke_subject(sh, &who.subject, of_client, reason, ip, now)
                .await?;
        }
        Ok(())
    }

    /// Revoke the live families of `subject` (of `client` only, if given)
    /// listed in its set; returns how many this call revoked. The first
    /// store failure stops the walk, as for one engine.
    pub(super) async fn shared_revoke_subject(
        &self,
        sh: &Shared,
        subject: &str,
        client: Option<&str>,
        reason: RevokeReason,
        ip: Option<IpAddr>,
        now: Timestamp,
    ) -> Result<usize, Error> {
        let version = self.policies.load().version();
        let members = sh.store.members(subject).await?;
        let mut n = 0;
        let mut done = Vec::new();
        for (id, member_client) in members {
            if client.is_some_and(|c| c != member_client) {
                continue;
            }
            // Whether it is still active is the store's to confirm: a
            // cached "revoked" may predate a restore.
            let judged = self
                .transact(sh, id, |f| {
                    let mine =
                        f.subject.as_str() == subject && client.is_none_or(|c| **f.client() == *c);
                    mine.then(|| f.revoke(reason, now))
                })
                .await?;
            if let Some((true, f)) = judged {
                n += 1;
                let kind = EventKind::FamilyRevoked { reason };
                self.emit(kind, Some(&Who::detached(&f)), ip, version, now);
            }
            // Revoked now, earlier, or gone: either way no longer a member.
            done.push((id, member_client));
        }
        // Index upkeep only (see `shared_carry_out`).
        let _ = sh.store.leave(subject, done).await;
        Ok(n)
    }

    /// Revoke one family (by token or id) on request.
    pub(super) async fn shared_revoke(
        &self,
        sh: &Shared,
        id: FamilyId,
        allowed: impl Fn(&Family) -> bool,
        now: Timestamp,
    ) -> Result<bool, Error> {
        // `allowed` looks at what never changes (tag, client); whether it
        // is still active is the store's to confirm.
        let judged = self
            .transact(sh, id, |f| {
                allowed(f).then(|| f.revoke(RevokeReason::Requested, now))
            })
            .await?;
        let Some((true, f)) = judged else {
            return Ok(false);
        };
        let version = self.policies.load().version();
        let who = Who::detached(&f);
        let kind = EventKind::FamilyRevoked {
            reason: RevokeReason::Requested,
        };
        self.emit(kind, Some(&who), None, version, now);
        let _ = sh
            .store
            .leave(&who.subject, vec![(f.id, f.client().to_string())])
            .await;
        Ok(true)
    }

    /// [`Engine::revoke_token`] against the shared store.
    pub(super) fn shared_revoke_token(
        &self,
        sh: &Shared,
        token: &str,
        client: Option<&str>,
        now: Timestamp,
    ) -> Result<bool, Error> {
        let Some(parsed) = token::parse(token, TokenKind::Refresh) else {
            return Ok(false);
        };
        let keys = self.keys.load_full();
        if !keys.contains(parsed.key) {
            return Ok(false);
        }
        block_on(self.shared_revoke(
            sh,
            parsed.family,
            |f| keys.verify(&parsed, &f.secret) && client.is_none_or(|c| **f.client() == *c),
            now,
        ))
    }

    /// [`Engine::revoke_client`] against the shared store: a scan of every
    /// family key (on each primary of a cluster), an administrative
    /// operation.
    pub(super) fn shared_revoke_client(
        &self,
        sh: &Shared,
        client: &str,
        now: Timestamp,
    ) -> Result<usize, Error> {
        block_on(async {
            let version = self.policies.load().version();
            let mut n = 0;
            for id in sh.store.scan().await? {
                let judged = self
                    .transact(sh, id, |f| {
                        (**f.client() == *client)
                            .then(|| f.revoke(RevokeReason::ClientRevoked, now))
                    })
                    .await?;
                if let Some((true, f)) = judged {
                    n += 1;
                    let who = Who::detached(&f);
                    let kind = EventKind::FamilyRevoked {
                        reason: RevokeReason::ClientRevoked,
                    };
                    self.emit(kind, Some(&who), None, version, now);
                    let _ = sh
                        .store
                        .leave(&who.subject, vec![(f.id, f.client().to_string())])
                        .await;
                }
            }
            Ok(n)
        })
    }

    /// [`Engine::exchange`] against the shared store.
    pub(super) async fn shared_exchange(
        &self,
        sh: &Shared,
        req: ExchangeRequest<'_>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        let policies = self.policies.load_full();
        if let Some(refused) = self.refuse_unlisted(&policies, req.client) {
            return Ok(refused);
        }
        let version = policies.version();
        let invalid = || Ok(self.invalid_token(version));
        let Some(parsed) = token::parse(req.code, TokenKind::Code) else {
            return invalid();
        };
        let keys = self.keys.load_full();
        let judged = self
            .transact(sh, parsed.family, |f| {
                let plan = self.exchange_on(f, &parsed, &req, &policies, &keys, now)?;
                let revoked = plan.cascade.family().is_some_and(|r| f.revoke(r, now));
                Some((plan, revoked))
            })
            .await?;
        let Some(((plan, revoked), mut f)) = judged else {
            return invalid();
        };
        self.unsharded_outcomes.add(outcome_slot(plan.verdict));
        match plan.verdict {
            Verdict::Accept(kind) => match mint_current(&mut f, &keys) {
                Some(token) => Ok(Decision::Accept(Accepted::of(
                    token,
                    f.id,
                    Generation::FIRST,
                    kind,
                    version,
                    &f.grant,
                    &f.subject,
                    f.secret,
                ))),
                None => invalid(),
            },
            Verdict::Deny(reason) => {
                self.shared_carry_out(sh, &plan, &f, revoked, req.client, req.ip, version, now)
                    .await?;
                Ok(deny(reason, Some(f.id), version))
            }
        }
    }

    /// One engine's `start_family` against the shared store: the subject's
    /// set admits the new family and names whom the cap evicts (the
    /// subject's key is the authority for the cap), the evicted are
    /// revoked, then the record is created (conditioned on its key being
    /// new). Two round trips and one per eviction: issue is not the common
    /// path. Once every issue has returned, a subject holds at most `cap`
    /// live families of the client; a failed issue leaves a member whose
    /// family never existed, skipped by every walk.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn shared_start(
        &self,
        sh: &Shared,
        req: &IssueRequest<'_>,
        policy: &ClientPolicy,
        version: PolicyVersion,
        code: Option<Box<CodeState>>,
        jkt: Option<Jkt>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        let keys = self.keys.load_full();
        let (kind, token_kind, generation) = match code {
            Some(_) => (AcceptKind::CodeIssued, TokenKind::Code, Generation::CODE),
            None => (AcceptKind::Issued, TokenKind::Refresh, Generation::FIRST),
        };
        let mut rnd = [0u8; 32];
        crate::random::fill(&mut rnd)?;
        let (id, secret) = rnd.split_at(16);
        let id = FamilyId::from_bytes(id.try_into().expect("16 bytes"));
        let mut f = self.fresh_family(id, secret, req, code, jkt.as_ref(), &keys, now);
        let cap = policy.max_families_per_subject;
        let evicted = sh
            .store
            .join(req.subject, req.client, &f.id, now.as_millis(), cap)
            .await?;
        let mut left = Vec::new();
        for id in evicted {
            let judged = self
                .transact(sh, id, |g| {
                    let mine = g.subject.as_str() == req.subject && **g.client() == *req.client;
                    mine.then(|| g.revoke(RevokeReason::CapEviction, now))
                })
                .await?;
            if let Some((true, g)) = judged {
                let who = Who::detached(&g);
                self.emit(
                    EventKind::CapEviction { cap },
                    Some(&who),
                    req.ip,
                    version,
                    now,
                );
                let kind = EventKind::FamilyRevoked {
                    reason: RevokeReason::CapEviction,
                };
                self.emit(kind, Some(&who), req.ip, version, now);
            }
            left.push((id, req.client.to_owned()));
        }
        // Index upkeep only (see `shared_carry_out`).
        let _ = sh.store.leave(req.subject, left).await;
        let mut bytes = Vec::new();
        codec::encode(&f, &mut bytes);
        match sh.store.cas(&f.id, 0, Some(bytes)).await? {
            Cas::Done(v) => sh.cache.put(&f, v),
            // 128 random bits met an existing id: refuse rather than alias.
            Cas::Stale(..) | Cas::Gone => {
                return Err(Error::store(format!("redis: new family id {} taken", f.id)));
            }
        }
        let tag = keys
            .tag(token_kind, f.key, &f.id, generation, &f.secret)
            .expect("the active key is always in the ring");
        if token_kind == TokenKind::Refresh {
            super::cache_tag(&mut f, &keys, tag);
        }
        self.unsharded_outcomes
            .add(outcome_slot(Verdict::Accept(kind)));
        let token = token::assemble(token_kind, keys.active(), &f.id, generation, &tag);
        Ok(Decision::Accept(Accepted::of(
            token, f.id, generation, kind, version, &f.grant, &f.subject, f.secret,
        )))
    }

    /// [`Engine::introspect`] against the shared store: always one read,
    /// so that "active" is the store's word; a store error is "unknown".
    pub(super) fn shared_introspect(
        &self,
        sh: &Shared,
        token: &str,
        now: Timestamp,
    ) -> Option<Introspection> {
        let parsed = token::parse(token, TokenKind::Refresh)?;
        let keys = self.keys.load_full();
        if !keys.contains(parsed.key) {
            return None;
        }
        let (v, bytes) = block_on(sh.store.get(&parsed.family)).ok()??;
        let f = self.decode(&parsed.family, &bytes).ok()?;
        sh.cache.put(&f, v);
        if !keys.verify(&parsed, &f.secret) {
            return None;
        }
        let policies = self.policies.load();
        Some(super::introspection(
            &f,
            parsed.generation,
            policies.policy(f.client()),
            now,
        ))
    }

    /// [`Engine::verify_access_token`] against the shared store. The tag
    /// depends only on the family's secret, which never changes, so a
    /// cached record may refuse a forgery without the network; whether
    /// the family lives (revoked, expired, its generation) is read from
    /// the store every time, so a revocation through another engine is
    /// seen at once. A store error is "not active" (fail closed).
    pub(super) fn shared_verify_access(
        &self,
        sh: &Shared,
        parsed: &ParsedAccess,
        now: Timestamp,
    ) -> Option<AccessTokenInfo> {
        let id = parsed.fields.family;
        let keys = self.keys.load_full();
        if !keys.contains(parsed.fields.key) {
            return None;
        }
        if let Some(secret) = sh.cache.secret(&id)
            && !parsed.verify(&keys, &secret)
        {
            return None;
        }
        let (v, bytes) = block_on(sh.store.get(&id)).ok()??;
        let f = self.decode(&id, &bytes).ok()?;
        sh.cache.put(&f, v);
        if !parsed.verify(&keys, &f.secret) {
            return None;
        }
        let policies = self.policies.load();
        super::access::access_info(&f, &parsed.fields, policies.policy(f.client()), now)
    }

    /// A copy of one family's record, read from the shared store.
    pub(super) fn shared_record(&self, sh: &Shared, id: FamilyId) -> Option<Family> {
        let (v, bytes) = block_on(sh.store.get(&id)).ok()??;
        let f = self.decode(&id, &bytes).ok()?;
        sh.cache.put(&f, v);
        Some(f)
    }

    /// Write a record whatever the store holds (a restore), and put an
    /// active one back in its subject's set (a revocation took it out), as
    /// one engine's `install` indexes it.
    pub(super) fn shared_restore(&self, sh: &Shared, f: Family) -> Result<(), Error> {
        let mut bytes = Vec::new();
        codec::encode(&f, &mut bytes);
        block_on(async {
            match sh.store.cas(&f.id, -1, Some(bytes)).await? {
                Cas::Done(v) => {
                    // A restore may go back in content, never in version
                    // numbers: the cache takes it as the newest.
                    sh.cache.remove(&f.id);
                    sh.cache.put(&f, v);
                }
                Cas::Stale(..) | Cas::Gone => {
                    return Err(Error::store("redis: unconditional write refused"));
                }
            }
            if f.is_active() {
                let created = f.created.as_millis();
                sh.store
                    .join(f.subject.as_str(), f.client(), &f.id, created, 0)
                    .await?;
            }
            Ok(())
        })
    }

    /// [`Engine::sweep`] with a shared store: the store expires keys by
    /// itself; this drops cached records that are dead, so the cache holds
    /// live families first.
    pub(super) fn shared_sweep(&self, sh: &Shared, now: Timestamp) -> SweepReport {
        let policies = self.policies.load();
        let retention = self.revoked_retention;
        let mut report = SweepReport::default();
        for shard in sh.cache.shards.iter() {
            let mut m = shard.lock();
            let before = m.len();
            m.retain(|_, (f, _)| match f.status() {
                crate::family::Status::Revoked { at, .. } => now < at.saturating_add(retention),
                crate::family::Status::Active => {
                    decision::expiry(f, policies.policy(f.client()), now).is_none()
                        || f.generation == Generation::CODE
                }
            });
            report.examined += before;
            report.removed += before - m.len();
        }
        report
    }
}
