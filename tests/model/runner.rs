//! The check loop: each operation on the real engine and on the model,
//! and every decision, event, sweep and introspection compared.

use super::*;

/// What the test holds of one real family, parallel to the model's.
pub(crate) struct Real {
    pub(crate) id: FamilyId,
    /// Every refresh token handed out, by generation − 1 (none before the
    /// code is exchanged).
    pub(crate) tokens: Vec<String>,
    /// The highest generation ever accepted.
    pub(crate) max_generation: u32,
    /// The authorization code the family was born from, if any.
    pub(crate) code: Option<String>,
    /// What the client kept at authorize: the verifier and redirect URI.
    pub(crate) verifier: Option<String>,
    pub(crate) redirect: usize,
    /// Successful exchanges of the code.
    pub(crate) exchanges: u32,
}

/// What a forgery may not change: every family's current token as
/// introspected, every record's generation and status, the records held.
pub(crate) type Snapshot = (
    Vec<Option<Introspection>>,
    Vec<Option<(Generation, Status)>>,
    usize,
);

/// (label, family index) of one event; `family_revoked` labels carry the
/// reason.
pub(crate) type EventKey = (String, Option<usize>);

pub(crate) struct Run<'a> {
    /// One engine, or several sharing one Redis (README "Several
    /// instances"), each operation on one of them at random.
    pub(crate) engines: Vec<Engine>,
    /// The generator picking the engine of the next operation.
    pub(crate) turn: std::cell::Cell<u64>,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) sink: Arc<MemorySink>,
    pub(crate) version: PolicyVersion,
    pub(crate) model: Model,
    pub(crate) fams: Vec<Real>,
    pub(crate) by_id: HashMap<FamilyId, usize>,
    /// Every token the engine ever handed out.
    pub(crate) seen: HashSet<String>,
    /// Every backup taken: the family, the model's copy of it then, and
    /// the engine's record.
    pub(crate) backups: Vec<(usize, MFamily, FamilyRecord)>,
    pub(crate) coverage: &'a RefCell<Coverage>,
}

pub(crate) fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

pub(crate) fn revoked_label(reason: RevokeReason) -> String {
    format!("family_revoked:{reason}")
}

impl<'a> Run<'a> {
    pub(crate) fn new(
        case: &Case,
        coverage: &'a RefCell<Coverage>,
    ) -> Result<Run<'a>, TestCaseError> {
        Run::on(case, coverage, &Backend::Local)
    }

    pub(crate) fn on(
        case: &Case,
        coverage: &'a RefCell<Coverage>,
        backend: &Backend,
    ) -> Result<Run<'a>, TestCaseError> {
        let clock = Arc::new(ManualClock::new(ts(START_MS)));
        let sink = Arc::new(MemorySink::new());
        let set = case.initial.build();
        let version = set.version();
        let keys = refresh_guard::KeyRing::generate().map_err(fail)?;
        let builder = || {
            Engine::builder()
                .keys(keys.clone())
                .policies(set.clone())
                .clock(clock.clone())
                .events(sink.clone())
                .shards(SHARDS)
                .revoked_retention(Duration::from_millis(RETENTION_MS))
        };
        let engines = match backend {
            Backend::Local => vec![builder().build().map_err(fail)?],
            #[cfg(feature = "redis")]
            Backend::Shared { url, engines } => (0..*engines)
                .map(|_| {
                    let mut o = refresh_guard::RedisOptions::default();
                    // The model's clock is manual; and it denies a
                    // generation ahead of the record, as one engine does.
                    o.key_ttl = None;
                    o.on_rollback = refresh_guard::OnRollback::Deny;
                    let store = refresh_guard::RedisStore::connect(url, o).map_err(fail)?;
                    builder().shared_store(store).build().map_err(fail)
                })
                .collect::<Result<_, _>>()?,
        };
        // A per-case spread, the same on every run of the case (shrinking).
        let seed = (case.ops.len() as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ case.prelude.len() as u64;
        Ok(Run {
            engines,
            turn: std::cell::Cell::new(seed | 1),
            clock,
            sink,
            version,
            model: Model::new(case.initial.clone()),
            fams: Vec::new(),
            by_id: HashMap::new(),
            seen: HashSet::new(),
            backups: Vec::new(),
            coverage,
        })
    }

    /// The engine of the next call: the only one, or one of the shared at
    /// random (xorshift).
    pub(crate) fn engine(&self) -> &Engine {
        let mut x = self.turn.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.turn.set(x);
        &self.engines[(x % self.engines.len() as u64) as usize]
    }

    /// Whether the engines share a store: the table is then not theirs
    /// (records held are each engine's cache), and sweeping is the
    /// store's expiry, outside what the model runs.
    pub(crate) fn shared(&self) -> bool {
        self.engines.len() > 1
    }

    pub(crate) fn count(&self, what: impl Into<String>) {
        *self.coverage.borrow_mut().entry(what.into()).or_default() += 1;
    }

    pub(crate) fn run(&mut self, case: &Case) -> TestCaseResult {
        for &(client, subject, via_code) in &case.prelude {
            if via_code {
                let pkce = PkceSpec {
                    challenge: ChallengeText::S256Of(RFC7636_VERIFIER.to_owned()),
                    method: Some("S256"),
                };
                self.authorize(client, subject, &pkce, 0, 0)?;
                let fam = self.fams.len() - 1;
                self.exchange(fam, &Who::Own, 0, Some(RFC7636_VERIFIER), 0)?;
                prop_assert_eq!(self.model.families[fam].current, 1);
            } else {
                self.issue(client, subject, 0)?;
            }
            self.check_table()?;
        }
        for op in &case.ops {
            if self.shared() && matches!(op, Op::Sweep { .. }) {
                continue;
            }
            self.step(op)?;
            self.check_table()?;
            // Every token of every family, read from the store: once per
            // case when the store is shared, to keep the run short.
            if !self.shared() {
                self.check_introspection()?;
            }
        }
        if self.shared() {
            self.check_introspection()?;
        }
        Ok(())
    }

    pub(crate) fn step(&mut self, op: &Op) -> TestCaseResult {
        match op {
            Op::Issue {
                client,
                subject,
                ip,
            } => self.issue(*client, *subject, *ip),
            Op::Authorize {
                client,
                subject,
                pkce,
                redirect,
                ip,
            } => self.authorize(*client, *subject, pkce, *redirect, *ip),
            Op::Exchange {
                fam,
                replay,
                who,
                redirect,
                verifier,
                ip,
            } => {
                let Some(fam) =
                    self.pick(fam, |r| r.code.is_some() && (r.exchanges > 0) == *replay)
                else {
                    return Ok(());
                };
                let own = self.fams[fam].redirect;
                let redirect = match redirect {
                    None => own,
                    Some(ix) => {
                        let others: Vec<usize> =
                            (0..REDIRECTS.len()).filter(|&r| r != own).collect();
                        *ix.get(&others)
                    }
                };
                let verifier = match verifier {
                    VerifierPick::Held => self.fams[fam].verifier.clone(),
                    VerifierPick::Missing => None,
                    VerifierPick::Other(v) | VerifierPick::Malformed(v) => Some(v.clone()),
                };
                self.exchange(fam, who, redirect, verifier.as_deref(), *ip)
            }
            Op::Cross(cross) => self.cross(cross),
            Op::Redeem { fam, who, ip } => {
                let Some(fam) = self.pick(fam, |r| !r.tokens.is_empty()) else {
                    return Ok(());
                };
                let generation = self.model.families[fam].current;
                self.redeem(fam, generation, who, *ip)
            }
            Op::Replay {
                fam,
                older,
                who,
                ip,
            } => {
                // By the model's generation: after a rollback the tokens
                // handed out run ahead of it.
                let rotated: Vec<usize> = (0..self.fams.len())
                    .filter(|&i| {
                        !self.fams[i].tokens.is_empty() && self.model.families[i].current >= 2
                    })
                    .collect();
                let Some(&fam) = (!rotated.is_empty()).then(|| fam.get(&rotated)) else {
                    return Ok(());
                };
                let c = self.model.families[fam].current;
                let generation = match older {
                    None => c - 1,
                    Some(ix) => 1 + ix.index(c as usize - 1) as u32,
                };
                self.redeem(fam, generation, who, *ip)
            }
            Op::Forge {
                forgery,
                code,
                client,
                ip,
                via_revoke,
            } => self.forge(forgery, *code, *client, *ip, *via_revoke),
            Op::RevokeToken {
                fam,
                generation,
                client,
            } => {
                let Some(fam) = self.pick(fam, |r| !r.tokens.is_empty()) else {
                    return Ok(());
                };
                let token = generation.get(&self.fams[fam].tokens).clone();
                let client = client.as_ref().map(|w| self.client_name(fam, w));
                let expected = self.model.revoke_token(fam, client);
                let got = self.engine().revoke_token(&token, client).map_err(fail)?;
                prop_assert_eq!(got, expected, "revoke_token of family {}", fam);
                self.count(format!("revoke_token:{got}"));
                let events = if got {
                    vec![(revoked_label(RevokeReason::Requested), Some(fam))]
                } else {
                    vec![]
                };
                self.check_events(events)
            }
            Op::RevokeFamily { fam } => {
                let fam = fam.index(self.fams.len());
                let expected = self.model.revoke_family(fam);
                let got = self
                    .engine()
                    .revoke_family(self.fams[fam].id)
                    .map_err(fail)?;
                prop_assert_eq!(got, expected, "revoke_family of family {}", fam);
                if got {
                    self.count_pending_revoked(&[fam]);
                }
                let events = if got {
                    vec![(revoked_label(RevokeReason::Requested), Some(fam))]
                } else {
                    vec![]
                };
                self.check_events(events)
            }
            Op::RevokeSubject { subject, client } => {
                let expected = self.model.revoke_subject(*subject, *client);
                let got = self
                    .engine()
                    .revoke_subject(SUBJECTS[*subject], client.map(|c| CLIENTS[c]))
                    .map_err(fail)?;
                prop_assert_eq!(got, expected.len(), "revoke_subject revoked {:?}", expected);
                self.count(format!("revoke_subject:{}", got.min(2)));
                self.count_pending_revoked(&expected);
                let reason = RevokeReason::SubjectRevoked;
                self.check_events(revoked_events(reason, &expected))
            }
            Op::RevokeClient { client } => {
                let expected = self.model.revoke_client(*client);
                let got = self
                    .engine()
                    .revoke_client(CLIENTS[*client])
                    .map_err(fail)?;
                prop_assert_eq!(got, expected.len(), "revoke_client revoked {:?}", expected);
                self.count(format!("revoke_client:{}", got.min(2)));
                self.count_pending_revoked(&expected);
                let reason = RevokeReason::ClientRevoked;
                self.check_events(revoked_events(reason, &expected))
            }
            Op::Advance { ms } => {
                self.clock.advance(Duration::from_millis(*ms));
                self.model.now += ms;
                prop_assert_eq!(self.engine().now(), ts(self.model.now));
                self.check_events(vec![])
            }
            Op::SwapPolicies(spec) => {
                let set = spec.build();
                self.version = set.version();
                // Every engine swaps; the model expects the one event of one.
                for e in &self.engines[1..] {
                    e.swap_policies(set.clone());
                }
                self.sink.take();
                self.engines[0].swap_policies(set);
                self.model.set = spec.clone();
                self.check_events(vec![("policy_swapped".to_owned(), None)])
            }
            Op::Sweep { budget } => self.sweep(*budget),
            Op::Backup { fam } => self.backup(fam),
            Op::Restore { backup, rollback } => self.restore(backup, *rollback),
            Op::Ahead {
                fam,
                ahead,
                who,
                ip,
            } => {
                let newer: Vec<usize> = (0..self.fams.len())
                    .filter(|&i| {
                        self.fams[i].tokens.len() > self.model.families[i].current as usize
                    })
                    .collect();
                let Some(&fam) = (!newer.is_empty()).then(|| fam.get(&newer)) else {
                    return Ok(());
                };
                let c = self.model.families[fam].current;
                let minted = self.fams[fam].tokens.len() - c as usize;
                let generation = c + 1 + ahead.index(minted) as u32;
                self.redeem(fam, generation, who, *ip)
            }
        }
    }

    /// Copy a family's record as a backup would, beside the model's copy
    /// of the family, so that a restore knows what comes back. A code not
    /// yet exchanged is left out: restoring it after its exchange would
    /// make it exchangeable again, outside what the code reference models.
    pub(crate) fn backup(&mut self, fam: &Index) -> TestCaseResult {
        let Some(fam) = self.pick(fam, |r| !r.tokens.is_empty()) else {
            return Ok(());
        };
        let m = &self.model.families[fam];
        let record = self.engine().family_record(self.fams[fam].id);
        prop_assert_eq!(record.is_some(), !m.swept, "record of family {}", fam);
        if let Some(record) = record {
            prop_assert_eq!(record.id(), self.fams[fam].id);
            prop_assert_eq!(
                (record.generation().get(), record.status()),
                (m.current, model_status(m)),
                "backup of family {}",
                fam
            );
            self.backups.push((fam, m.clone(), record));
            self.count("backup");
        }
        self.check_events(vec![])
    }

    /// Restore a backup: the family is as it was then, whatever happened
    /// since (rotations, revocation, a sweep). Tokens minted after the
    /// backup are then newer than the family (README "The order of
    /// checks": `g > c` is `state_rollback`).
    pub(crate) fn restore(&mut self, backup: &Index, rollback: bool) -> TestCaseResult {
        let behind: Vec<usize> = (0..self.backups.len())
            .filter(|&i| {
                let (fam, then, _) = &self.backups[i];
                rollback && then.current < self.model.families[*fam].current
            })
            .collect();
        let chosen = if behind.is_empty() {
            if self.backups.is_empty() {
                return Ok(());
            }
            backup.index(self.backups.len())
        } else {
            *backup.get(&behind)
        };
        let (fam, then, record) = self.backups[chosen].clone();
        let now = &self.model.families[fam];
        if now.swept {
            self.count("restore:swept");
        } else if now.revoked.is_some() && then.revoked.is_none() {
            self.count("restore:unrevoked");
        }
        if !now.swept && then.current < now.current {
            self.count("restore:rollback");
        }
        self.engine().restore_family(record).map_err(fail)?;
        self.fams[fam].max_generation = then.current;
        self.model.families[fam] = then;
        self.check_events(vec![])
    }

    pub(crate) fn issue(&mut self, client: usize, subject: usize, ip: usize) -> TestCaseResult {
        let expect = self.model.issue(client, subject, ip);
        let d = self
            .engine()
            .issue(&IssueRequest {
                client: CLIENTS[client],
                subject: SUBJECTS[subject],
                scope: SCOPE,
                ip: Some(ip_addr(ip)),
            })
            .map_err(fail)?;
        self.count(format!("issue:{}", d.outcome()));
        prop_assert_eq!(d.policy_version(), self.version);
        match (expect, d) {
            (Expect::Accept { .. }, Decision::Accept(a)) => {
                prop_assert_eq!(a.kind, AcceptKind::Issued);
                prop_assert_eq!(a.generation.get(), 1);
                let token = a.token.as_str().to_owned();
                prop_assert!(token.starts_with("rgt_") && token.len() == TOKEN_LEN);
                prop_assert!(self.seen.insert(token.clone()), "issued token repeats");
                prop_assert!(
                    self.by_id.insert(a.family, self.fams.len()).is_none(),
                    "family id repeats"
                );
                self.fams.push(Real {
                    id: a.family,
                    tokens: vec![token],
                    max_generation: 1,
                    code: None,
                    verifier: None,
                    redirect: 0,
                    exchanges: 0,
                });
                self.check_events(vec![])
            }
            (Expect::Deny(reason), Decision::Deny(d)) => {
                prop_assert_eq!(d.reason, reason);
                prop_assert_eq!(d.family, None);
                self.check_events(vec![("ip_not_allowed".to_owned(), None)])
            }
            (expect, got) => Err(fail(format!(
                "issue for {} from {}: expected {expect:?}, engine said {got:?}",
                CLIENTS[client], IPS[ip].0
            ))),
        }
    }

    /// One of the families `keep` selects, by `ix`; `None` if there is none.
    pub(crate) fn pick(&self, ix: &Index, keep: impl Fn(&Real) -> bool) -> Option<usize> {
        let chosen: Vec<usize> = (0..self.fams.len())
            .filter(|&i| keep(&self.fams[i]))
            .collect();
        (!chosen.is_empty()).then(|| *ix.get(&chosen))
    }

    /// Coverage: a revocation reached a code not yet exchanged.
    pub(crate) fn count_pending_revoked(&self, revoked: &[usize]) {
        if revoked
            .iter()
            .any(|&i| self.model.families[i].code.is_some())
        {
            self.count("revoke:pending_code");
        }
    }

    pub(crate) fn authorize(
        &mut self,
        client: usize,
        subject: usize,
        pkce: &PkceSpec,
        redirect: usize,
        ip: usize,
    ) -> TestCaseResult {
        let (challenge, verifier) = pkce.challenge_and_verifier();
        let expect = self.model.authorize(
            client,
            subject,
            challenge.as_deref(),
            pkce.method,
            redirect,
            ip,
        );
        let d = self
            .engine()
            .authorize(&AuthorizeRequest {
                client: CLIENTS[client],
                subject: SUBJECTS[subject],
                scope: SCOPE,
                redirect_uri: REDIRECTS[redirect],
                code_challenge: challenge.as_deref(),
                code_challenge_method: pkce.method,
                ip: Some(ip_addr(ip)),
                dpop_jkt: None,
            })
            .map_err(fail)?;
        self.count(format!("authorize:{}", d.outcome()));
        prop_assert_eq!(d.policy_version(), self.version);
        match (expect, d) {
            (Expect::Accept { .. }, Decision::Accept(a)) => {
                prop_assert_eq!(a.kind, AcceptKind::CodeIssued);
                prop_assert_eq!(a.generation, Generation::CODE);
                let code = a.token.as_str().to_owned();
                prop_assert!(code.starts_with("rgc_") && code.len() == TOKEN_LEN);
                prop_assert!(self.seen.insert(code.clone()), "issued code repeats");
                prop_assert!(
                    self.by_id.insert(a.family, self.fams.len()).is_none(),
                    "family id repeats"
                );
                self.fams.push(Real {
                    id: a.family,
                    tokens: Vec::new(),
                    max_generation: 0,
                    code: Some(code),
                    verifier,
                    redirect,
                    exchanges: 0,
                });
                self.check_events(vec![])
            }
            (Expect::Deny(reason), Decision::Deny(d)) => {
                prop_assert_eq!(d.reason, reason, "authorize {:?}", pkce);
                prop_assert_eq!(d.family, None);
                self.check_events(vec![])
            }
            (expect, got) => Err(fail(format!(
                "authorize for {} with {pkce:?} (challenge {challenge:?}) under {:?}: \
                 expected {expect:?}, engine said {got:?}",
                CLIENTS[client],
                self.model.set.policy(client)
            ))),
        }
    }

    /// Exchange the genuine code of `fam` (pending or already exchanged)
    /// and compare with the model; then check the code invariants: at most
    /// one successful exchange per code, and a replay by the code's client
    /// leaves the family revoked with every refresh token of it dead.
    pub(crate) fn exchange(
        &mut self,
        fam: usize,
        who: &Who,
        redirect: usize,
        verifier: Option<&str>,
        ip: usize,
    ) -> TestCaseResult {
        let client = self.client_name(fam, who);
        let code = self.fams[fam]
            .code
            .clone()
            .expect("a family born from a code");
        let before = self.model.families[fam].clone();
        let replay = self.fams[fam].exchanges > 0;
        let (expect, revoked) = self.model.exchange(fam, client, redirect, verifier, ip);
        let d = self
            .engine()
            .exchange(&ExchangeRequest {
                code: &code,
                code_verifier: verifier,
                client,
                redirect_uri: REDIRECTS[redirect],
                ip: Some(ip_addr(ip)),
                dpop: None,
            })
            .map_err(fail)?;
        self.count(format!("exchange:{}", d.outcome()));
        let context = || {
            format!(
                "exchange of family {fam}'s code by {client} to {} with verifier {verifier:?} \
                 from {} (model before: {before:?}, policy {:?})",
                REDIRECTS[redirect],
                IPS[ip].0,
                self.model.policy_of(fam)
            )
        };
        prop_assert_eq!(d.policy_version(), self.version, "{}", context());
        let mut events: Vec<EventKey> = Vec::new();
        match (expect, d) {
            (Expect::Accept { .. }, Decision::Accept(a)) => {
                prop_assert_eq!(a.kind, AcceptKind::Exchanged, "{}", context());
                prop_assert_eq!(a.generation, Generation::FIRST, "{}", context());
                prop_assert_eq!(a.family, self.fams[fam].id);
                let token = a.token.as_str().to_owned();
                prop_assert!(token.starts_with("rgt_") && token.len() == TOKEN_LEN);
                prop_assert!(
                    self.seen.insert(token.clone()),
                    "exchange returned a token handed out before: {}",
                    context()
                );
                let method = match before.code.as_ref().and_then(|c| c.challenge.as_ref()) {
                    Some(MChallenge::S256(_)) => "S256",
                    Some(MChallenge::Plain(_)) => "plain",
                    None => "none",
                };
                self.count(format!("exchanged:{method}"));
                let real = &mut self.fams[fam];
                real.exchanges += 1;
                prop_assert_eq!(real.exchanges, 1, "a code exchanged twice: {}", context());
                prop_assert!(real.tokens.is_empty());
                real.tokens.push(token);
                real.max_generation = 1;
            }
            (Expect::Deny(reason), Decision::Deny(d)) => {
                prop_assert_eq!(d.reason, reason, "{}", context());
                let family = (reason != DenyReason::InvalidToken).then_some(self.fams[fam].id);
                prop_assert_eq!(d.family, family, "{}", context());
                match reason {
                    DenyReason::ClientMismatch => {
                        events.push(("client_mismatch".to_owned(), Some(fam)));
                    }
                    DenyReason::IpNotAllowed => {
                        events.push(("ip_not_allowed".to_owned(), Some(fam)));
                        let mode = if self.model.policy_of(fam).every_refresh {
                            "every_refresh"
                        } else {
                            "issuance_only"
                        };
                        self.count(format!("exchange:ip_not_allowed:{mode}"));
                    }
                    DenyReason::CodeReused => {
                        prop_assert!(revoked);
                        events.push(("code_replay:true".to_owned(), Some(fam)));
                        events.push((revoked_label(RevokeReason::CodeReplay), Some(fam)));
                    }
                    DenyReason::CodeSpent => {
                        prop_assert!(!revoked);
                        events.push(("code_replay:false".to_owned(), Some(fam)));
                        let spent = before.spent.as_ref().expect("exchanged");
                        let why = if spent.redirect != redirect {
                            "redirect_uri"
                        } else if self.model.code_expired(spent, fam) {
                            "expired"
                        } else {
                            "pkce"
                        };
                        self.count(format!("code_spent:{why}"));
                    }
                    _ => {}
                }
            }
            (expect, got) => {
                return Err(fail(format!(
                    "{}: expected {expect:?}, engine said {got:?}",
                    context()
                )));
            }
        }
        if revoked {
            // The replay event comes first, then the revocation it caused.
            let order: Vec<&'static str> =
                self.sink.events().iter().map(|e| e.kind.as_str()).collect();
            prop_assert_eq!(order, vec!["code_replay", "family_revoked"]);
        }
        self.check_events(events)?;
        if replay && !revoked {
            // A replay that revoked nothing left the family as it was: a
            // leaked code cannot log anyone out.
            let status = self
                .engine()
                .family_record(self.fams[fam].id)
                .map(|r| r.status());
            let was = (!before.swept).then(|| model_status(&before));
            prop_assert_eq!(
                status,
                was,
                "replay changed family {} (model before: {:?})",
                fam,
                before
            );
        }
        if revoked {
            // Every refresh token of the family is dead, and the current
            // one is now refused as revoked.
            for t in &self.fams[fam].tokens {
                let got = self.engine().introspect(t);
                prop_assert!(
                    got.as_ref().is_some_and(|i| !i.active
                        && i.status
                            == Status::Revoked {
                                reason: RevokeReason::CodeReplay,
                                at: ts(self.model.now)
                            }),
                    "after a code replay: {:?}",
                    got
                );
            }
            let current = self.model.families[fam].current;
            self.redeem(fam, current, &Who::Own, 0)?;
        }
        Ok(())
    }

    /// A genuine token of one kind presented as the other: refused as
    /// invalid, changing nothing.
    pub(crate) fn cross(&mut self, cross: &Cross) -> TestCaseResult {
        let before = self.snapshot();
        match cross {
            Cross::CodeAsRefresh { fam, via_revoke } => {
                let Some(fam) = self.pick(fam, |r| r.code.is_some()) else {
                    return Ok(());
                };
                let code = self.fams[fam].code.clone().expect("picked");
                let client = CLIENTS[self.model.families[fam].client];
                if *via_revoke {
                    let revoked = self
                        .engine()
                        .revoke_token(&code, Some(client))
                        .map_err(fail)?;
                    prop_assert!(!revoked, "a code revoked its family as a refresh token");
                } else {
                    let d = self
                        .engine()
                        .redeem(&RedeemRequest::new(&code, client).ip(ip_addr(0)))
                        .map_err(fail)?;
                    prop_assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
                    if let Decision::Deny(d) = d {
                        prop_assert_eq!(d.family, None);
                    }
                }
                prop_assert!(self.engine().introspect(&code).is_none());
                self.count("cross:code_as_refresh");
            }
            Cross::RefreshAsCode { fam, generation } => {
                let Some(fam) = self.pick(fam, |r| !r.tokens.is_empty()) else {
                    return Ok(());
                };
                let real = &self.fams[fam];
                let token = generation.get(&real.tokens);
                let d = self
                    .engine()
                    .exchange(&ExchangeRequest {
                        code: token,
                        code_verifier: real.verifier.as_deref(),
                        client: CLIENTS[self.model.families[fam].client],
                        redirect_uri: REDIRECTS[real.redirect],
                        ip: Some(ip_addr(0)),
                        dpop: None,
                    })
                    .map_err(fail)?;
                prop_assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
                if let Decision::Deny(d) = d {
                    prop_assert_eq!(d.family, None);
                }
                self.count("cross:refresh_as_code");
            }
        }
        prop_assert_eq!(self.snapshot(), before, "{:?} changed state", cross);
        self.check_events(vec![])
    }

    pub(crate) fn client_name(&self, fam: usize, who: &Who) -> &'static str {
        let own = self.model.families[fam].client;
        match who {
            Who::Own => CLIENTS[own],
            Who::Other(ix) => {
                let others: Vec<&'static str> = (0..3)
                    .filter(|&c| c != own)
                    .map(|c| CLIENTS[c])
                    .chain([INTRUDER])
                    .collect();
                others[ix.index(others.len())]
            }
        }
    }

    /// Redeem the genuine token of `fam` at `generation` and compare with
    /// the model, then check the invariants that do not need the model.
    pub(crate) fn redeem(
        &mut self,
        fam: usize,
        generation: u32,
        who: &Who,
        ip: usize,
    ) -> TestCaseResult {
        let client = self.client_name(fam, who);
        let token = self.fams[fam].tokens[generation as usize - 1].clone();
        let before = self.model.families[fam].clone();
        let dead = before.swept || before.revoked.is_some() || self.model.expiry(fam).is_some();
        let on_reuse = self.model.policy_of(fam).on_reuse;
        let (expect, revoked) = self.model.redeem(fam, generation, client, ip);
        let d = self
            .engine()
            .redeem(&RedeemRequest::new(&token, client).ip(ip_addr(ip)))
            .map_err(fail)?;
        self.count(format!("redeem:{}", d.outcome()));
        let context = || {
            format!(
                "redeem of family {fam} generation {generation} by {client} from {} \
                 (model before: {before:?}, policy {:?})",
                IPS[ip].0,
                self.model.policy_of(fam)
            )
        };
        prop_assert_eq!(d.policy_version(), self.version, "{}", context());
        let mut events: Vec<EventKey> = Vec::new();
        let mut reminted = false;
        match (expect, &d) {
            (
                Expect::Accept {
                    kind,
                    generation: g,
                },
                Decision::Accept(a),
            ) => {
                prop_assert_eq!(a.kind, kind, "{}", context());
                prop_assert_eq!(a.generation.get(), g, "{}", context());
                prop_assert_eq!(a.family, self.fams[fam].id);
                // Nothing is accepted after revocation or expiry.
                prop_assert!(!dead, "accepted a dead family: {}", context());
                // Generations only grow; a rotation is exactly current + 1.
                let real = &mut self.fams[fam];
                prop_assert!(a.generation.get() >= real.max_generation);
                real.max_generation = a.generation.get();
                let returned = a.token.as_str();
                if kind == AcceptKind::Rotated {
                    prop_assert_eq!(g, before.current + 1);
                    prop_assert!(returned.starts_with("rgt_") && returned.len() == TOKEN_LEN);
                    if let Some(earlier) = real.tokens.get(g as usize - 1) {
                        // Minted again after a rollback: tokens are derived
                        // from the key, family and generation (README
                        // "Tokens"), so it is the token handed out before.
                        prop_assert_eq!(returned, earlier.as_str(), "{}", context());
                        reminted = true;
                    } else {
                        prop_assert!(
                            self.seen.insert(returned.to_owned()),
                            "rotation returned a token handed out before: {}",
                            context()
                        );
                        real.tokens.push(returned.to_owned());
                    }
                } else {
                    // Grace replay: the identical successor; kept: the same
                    // token. Either way no new generation.
                    prop_assert_eq!(g, before.current);
                    prop_assert_eq!(
                        returned,
                        real.tokens[g as usize - 1].as_str(),
                        "{}",
                        context()
                    );
                }
            }
            (Expect::Deny(reason), Decision::Deny(d)) => {
                prop_assert_eq!(d.reason, reason, "{}", context());
                let family = (reason != DenyReason::InvalidToken).then_some(self.fams[fam].id);
                prop_assert_eq!(d.family, family, "{}", context());
                match reason {
                    DenyReason::ClientMismatch => {
                        events.push(("client_mismatch".to_owned(), Some(fam)));
                    }
                    DenyReason::IpNotAllowed => {
                        events.push(("ip_not_allowed".to_owned(), Some(fam)));
                    }
                    DenyReason::StateRollback => {
                        events.push(("state_rollback".to_owned(), Some(fam)));
                    }
                    DenyReason::ReuseDetected => {
                        events.push(("reuse_detected".to_owned(), Some(fam)));
                        for &r in &revoked {
                            let why = self.model.families[r].revoked.expect("just revoked").0;
                            events.push((revoked_label(why), Some(r)));
                        }
                        self.count(format!("reuse:{}:{}", on_reuse.as_str(), revoked.len()));
                    }
                    _ => {}
                }
            }
            (expect, got) => {
                return Err(fail(format!(
                    "{}: expected {expect:?}, engine said {got:?}",
                    context()
                )));
            }
        }
        if reminted {
            self.count("redeem:reminted");
        }
        if d.deny_reason() == Some(DenyReason::StateRollback) {
            self.check_rollback_event(fam, generation, before.current)?;
        }
        if d.deny_reason() == Some(DenyReason::ReuseDetected) {
            self.check_reuse_event(fam, generation, before.current, on_reuse)?;
            // on_reuse was applied: the subject's families are revoked (or
            // not) exactly as the model says.
            self.check_subject_status(before.subject)?;
        }
        self.check_events(events)
    }

    pub(crate) fn check_reuse_event(
        &self,
        fam: usize,
        presented: u32,
        current: u32,
        on_reuse: OnReuse,
    ) -> TestCaseResult {
        let events = self.sink.events();
        let reuse = events
            .iter()
            .find(|e| matches!(e.kind, EventKind::ReuseDetected { .. }));
        let Some(e) = reuse else {
            return Err(fail("reuse detected without a reuse_detected event"));
        };
        let EventKind::ReuseDetected {
            presented: p,
            current: c,
            response,
        } = &e.kind
        else {
            unreachable!("matched above");
        };
        prop_assert_eq!(p.get(), presented);
        prop_assert_eq!(c.get(), current);
        prop_assert_eq!(*response, on_reuse);
        prop_assert_eq!(e.family, Some(self.fams[fam].id));
        Ok(())
    }

    /// The `state_rollback` event names the presented and the current
    /// generation.
    pub(crate) fn check_rollback_event(
        &self,
        fam: usize,
        presented: u32,
        current: u32,
    ) -> TestCaseResult {
        let events = self.sink.events();
        let rollback = events.iter().find_map(|e| match e.kind {
            EventKind::StateRollback {
                presented: p,
                current: c,
            } => Some((e.family, p.get(), c.get())),
            _ => None,
        });
        prop_assert_eq!(
            rollback,
            Some((Some(self.fams[fam].id), presented, current)),
            "state_rollback event"
        );
        Ok(())
    }

    pub(crate) fn check_subject_status(&self, subject: usize) -> TestCaseResult {
        for (i, f) in self.model.families.iter().enumerate() {
            if f.subject != subject || f.swept {
                continue;
            }
            let got = self
                .engine()
                .family_record(self.fams[i].id)
                .map(|r| r.status());
            prop_assert_eq!(got, Some(model_status(f)), "status of family {}", i);
        }
        Ok(())
    }

    /// The token a forgery describes, or `None` if it needs a real token
    /// and there is none. With `code`, the forgery starts from a real
    /// authorization code instead of a refresh token (and `CodePrefix` puts
    /// the code's body under the refresh-token prefix).
    pub(crate) fn forged_token(&self, forgery: &Forgery, code: bool) -> Option<String> {
        let real = |fam: &Index, generation: &Index| -> Option<(usize, &str)> {
            if code {
                let fam = self.pick(fam, |r| r.code.is_some())?;
                return Some((fam, self.fams[fam].code.as_deref().expect("picked")));
            }
            let fam = self.pick(fam, |r| !r.tokens.is_empty())?;
            Some((fam, generation.get(&self.fams[fam].tokens).as_str()))
        };
        let (prefix, other) = if code {
            ("rgc_", "rgt_")
        } else {
            ("rgt_", "rgc_")
        };
        Some(match forgery {
            Forgery::Flip {
                fam,
                generation,
                pos,
                to,
            } => {
                let mut b = real(fam, generation)?.1.as_bytes().to_vec();
                let p = pos.index(b.len());
                if p < 4 {
                    b[p] = if b[p].is_ascii_lowercase() {
                        b[p].to_ascii_uppercase()
                    } else {
                        b'x'
                    };
                } else {
                    let i = to.index(64);
                    b[p] = if BASE64URL[i] == b[p] {
                        BASE64URL[(i + 1) % 64]
                    } else {
                        BASE64URL[i]
                    };
                }
                String::from_utf8(b).expect("ascii")
            }
            Forgery::Truncate {
                fam,
                generation,
                keep,
            } => {
                let t = real(fam, generation)?.1;
                t[..keep.index(t.len())].to_owned()
            }
            Forgery::Extend {
                fam,
                generation,
                ch,
            } => {
                let t = real(fam, generation)?.1;
                format!("{t}{}", *ch.get(BASE64URL) as char)
            }
            Forgery::CodePrefix { fam, generation } => {
                format!("{other}{}", &real(fam, generation)?.1[4..])
            }
            Forgery::Reforged {
                fam,
                generation,
                new_generation,
                new_tag,
            } => {
                let (fam, t) = real(fam, generation)?;
                let mut raw = URL_SAFE_NO_PAD.decode(&t[4..]).expect("real tokens decode");
                let old = u32::from_be_bytes(raw[17..21].try_into().expect("4 bytes"));
                let g = match new_generation {
                    GenPick::Next => self.model.families[fam].current + 1,
                    GenPick::Prev => old.wrapping_sub(1),
                    GenPick::Fixed(g) => *g,
                };
                raw[17..21].copy_from_slice(&g.to_be_bytes());
                if let Some(tag) = new_tag {
                    raw[21..].copy_from_slice(tag);
                }
                format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&raw))
            }
            Forgery::UnknownFamily { real_key, raw } => {
                let mut raw = raw.clone();
                let first = self.fams.iter().find_map(|r| match code {
                    true => r.code.as_deref(),
                    false => r.tokens.first().map(String::as_str),
                });
                if *real_key && let Some(t) = first {
                    let real = URL_SAFE_NO_PAD.decode(&t[4..]).expect("decodes");
                    raw[0] = real[0];
                }
                format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&raw))
            }
            Forgery::Garbage(s) => match s.strip_prefix("rgt_") {
                Some(rest) if code => format!("rgc_{rest}"),
                _ => s.clone(),
            },
        })
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let views = self
            .fams
            .iter()
            .map(|r| r.tokens.last().and_then(|t| self.engine().introspect(t)))
            .collect();
        let records = self
            .fams
            .iter()
            .map(|r| {
                self.engine()
                    .family_record(r.id)
                    .map(|f| (f.generation(), f.status()))
            })
            .collect();
        let held = match self.shared() {
            false => self.engine().stats().families,
            // Each engine's cache: what it held is not the store's state.
            true => 0,
        };
        (views, records, held)
    }

    /// Present a forged token (or code) to redeem or RFC 7009 revocation,
    /// and to the code exchange: refused as invalid everywhere, changing
    /// nothing.
    pub(crate) fn forge(
        &mut self,
        forgery: &Forgery,
        code: bool,
        client: usize,
        ip: usize,
        via_revoke: bool,
    ) -> TestCaseResult {
        let Some(token) = self.forged_token(forgery, code) else {
            return Ok(());
        };
        if self.seen.contains(&token) {
            // Not a forgery after all (a no-op edit); nothing to test.
            return Ok(());
        }
        let label = format!("{forgery:?}");
        let kind = label.split([' ', '(']).next().unwrap_or("?");
        self.count(format!(
            "{}:{kind}",
            if code { "forge_code" } else { "forge" }
        ));
        let before = self.snapshot();
        // What the source family's client would send along with its code.
        let source = self.fams.iter().find(|r| r.code.is_some());
        let (verifier, redirect) = source.map_or((None, 0), |r| (r.verifier.clone(), r.redirect));
        let d = self
            .engine()
            .exchange(&ExchangeRequest {
                code: &token,
                code_verifier: verifier.as_deref(),
                client: CLIENTS[client],
                redirect_uri: REDIRECTS[redirect],
                ip: Some(ip_addr(ip)),
                dpop: None,
            })
            .map_err(fail)?;
        prop_assert_eq!(
            d.deny_reason(),
            Some(DenyReason::InvalidToken),
            "forged code {:?} from {:?}: {:?}",
            token,
            forgery,
            d
        );
        prop_assert_eq!(d.policy_version(), self.version);
        if let Decision::Deny(d) = d {
            prop_assert_eq!(d.family, None);
        }
        if via_revoke {
            let revoked = self
                .engine()
                .revoke_token(&token, Some(CLIENTS[client]))
                .map_err(fail)?;
            prop_assert!(!revoked, "a forged token revoked a family: {:?}", token);
        } else {
            let d = self
                .engine()
                .redeem(&RedeemRequest::new(&token, CLIENTS[client]).ip(ip_addr(ip)))
                .map_err(fail)?;
            prop_assert_eq!(
                d.deny_reason(),
                Some(DenyReason::InvalidToken),
                "forged token {:?} from {:?}: {:?}",
                token,
                forgery,
                d
            );
            prop_assert_eq!(d.policy_version(), self.version);
            if let Decision::Deny(d) = d {
                prop_assert_eq!(d.family, None);
            }
        }
        prop_assert!(self.engine().introspect(&token).is_none());
        prop_assert_eq!(
            self.snapshot(),
            before,
            "forged token {:?} changed state",
            token
        );
        self.check_events(vec![])
    }

    pub(crate) fn sweep(&mut self, budget: Option<usize>) -> TestCaseResult {
        let sweepable: Vec<usize> = (0..self.fams.len())
            .filter(|&i| self.model.sweepable(i))
            .collect();
        let report = self
            .engine()
            .sweep(budget.unwrap_or(FULL_SWEEP))
            .map_err(fail)?;
        let removed: Vec<usize> = match budget {
            None => sweepable.clone(),
            Some(b) => {
                prop_assert!(report.examined <= b);
                // Which slots a small budget reaches depends on the cursor:
                // observe which families went, and check they were due.
                let removed: Vec<usize> = (0..self.fams.len())
                    .filter(|&i| {
                        !self.model.families[i].swept
                            && self.engine().family_record(self.fams[i].id).is_none()
                    })
                    .collect();
                for r in &removed {
                    prop_assert!(
                        sweepable.contains(r),
                        "sweep removed family {} that was not due: {:?}",
                        r,
                        self.model.families[*r]
                    );
                }
                removed
            }
        };
        prop_assert_eq!(
            report.removed,
            removed.len(),
            "due for sweeping: {:?}",
            sweepable
        );
        if !removed.is_empty() {
            let partial = if budget.is_some() { "partial" } else { "full" };
            self.count(format!("sweep:{partial}"));
        }
        for r in removed {
            let f = &self.model.families[r];
            if f.code.is_some() && f.revoked.is_none() {
                self.count("sweep:expired_code");
            }
            self.model.families[r].swept = true;
        }
        self.check_events(vec![])
    }

    /// The events since the last check, as (label, family index), sorted.
    pub(crate) fn check_events(&mut self, mut expected: Vec<EventKey>) -> TestCaseResult {
        let mut got: Vec<EventKey> = Vec::new();
        for e in self.sink.take() {
            let fam = match e.family {
                None => None,
                Some(id) => Some(
                    *self
                        .by_id
                        .get(&id)
                        .ok_or_else(|| fail(format!("event for an unknown family: {e:?}")))?,
                ),
            };
            prop_assert_eq!(e.at, ts(self.model.now), "event time: {:?}", e);
            prop_assert_eq!(e.policy_version, self.version, "event version: {:?}", e);
            let label = match &e.kind {
                EventKind::FamilyRevoked { reason } => revoked_label(*reason),
                EventKind::CodeReplay { revoked } => format!("code_replay:{revoked}"),
                k => k.as_str().to_owned(),
            };
            got.push((label, fam));
        }
        got.sort();
        expected.sort();
        prop_assert_eq!(got, expected, "events");
        Ok(())
    }

    pub(crate) fn check_table(&self) -> TestCaseResult {
        if self.shared() {
            return Ok(());
        }
        prop_assert_eq!(
            self.engine().stats().families,
            self.model.in_table(),
            "family records held"
        );
        Ok(())
    }

    /// Every record holds the generation and status the model says (a
    /// code not yet exchanged is generation 0), every token ever handed out
    /// introspects as the model says, at most one generation per family is
    /// active (redeemable), and no code introspects as a refresh token.
    pub(crate) fn check_introspection(&self) -> TestCaseResult {
        for (i, (m, r)) in self.model.families.iter().zip(&self.fams).enumerate() {
            let record = self
                .engine()
                .family_record(r.id)
                .map(|f| (f.generation().get(), f.status()));
            let want = (!m.swept).then(|| (m.current, model_status(m)));
            prop_assert_eq!(record, want, "record of family {}: {:?}", i, m);
            if let Some(code) = &r.code {
                prop_assert!(
                    self.engine().introspect(code).is_none(),
                    "the code of family {} introspects as a refresh token",
                    i
                );
            }
            let p = self.model.set.policy(m.client);
            let mut active = 0;
            for (g0, t) in r.tokens.iter().enumerate() {
                let g = g0 as u32 + 1;
                let got = self.engine().introspect(t);
                if m.swept {
                    prop_assert!(got.is_none(), "swept family {} still known", i);
                    continue;
                }
                let Some(got) = got else {
                    return Err(fail(format!("family {i} generation {g} unknown: {m:?}")));
                };
                let want = Introspection {
                    active: g == m.current && m.revoked.is_none() && self.model.expiry(i).is_none(),
                    family: r.id,
                    client: Arc::from(CLIENTS[m.client]),
                    subject: Arc::from(SUBJECTS[m.subject]),
                    scope: Arc::from(SCOPE),
                    generation: refresh_guard::Generation::new(g),
                    current_generation: refresh_guard::Generation::new(m.current),
                    issued_at: ts(m.created),
                    last_used: ts(m.last_used),
                    idle_expires_at: p.idle_ms().map(|t| ts(m.last_used + t)),
                    absolute_expires_at: p.absolute_ms().map(|t| ts(m.created + t)),
                    status: model_status(m),
                    jkt: None,
                };
                prop_assert_eq!(
                    &got,
                    &want,
                    "introspection of family {} generation {}",
                    i,
                    g
                );
                active += usize::from(got.active);
            }
            prop_assert!(
                active <= 1,
                "family {} has {} active generations",
                i,
                active
            );
        }
        Ok(())
    }
}

pub(crate) fn model_status(f: &MFamily) -> Status {
    match f.revoked {
        None => Status::Active,
        Some((reason, at)) => Status::Revoked { reason, at: ts(at) },
    }
}

pub(crate) fn revoked_events(reason: RevokeReason, fams: &[usize]) -> Vec<EventKey> {
    fams.iter()
        .map(|&f| (revoked_label(reason), Some(f)))
        .collect()
}
