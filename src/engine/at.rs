//! One way to pass time: [`Engine::at`] and its view [`At`].

use crate::clock::Timestamp;
use crate::decision::Decision;
use crate::error::Error;
use crate::token::FamilyId;

use crate::access::{AccessTokenInfo, IssuedAccessToken};
use crate::decision::Accepted;

use super::{
    AuthorizeRequest, Durable, Engine, ExchangeRequest, Introspection, IssueRequest, RedeemRequest,
    SweepReport,
};

/// The engine's operations at a given time, instead of its clock's: see
/// [`Engine::at`]. Each method behaves exactly as the engine's method of the
/// same name, which is `engine.at(engine.now()).op(..)`.
#[derive(Clone, Copy)]
pub struct At<'e> {
    engine: &'e Engine,
    now: Timestamp,
}

impl std::fmt::Debug for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("At")
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// The engine's operations at `now` rather than at its clock's time: for
    /// tests, replays and simulations that control time per call. A small
    /// `Copy` view; it changes nothing by itself.
    ///
    /// ```
    /// # use refresh_guard::{Engine, IssueRequest, RedeemRequest, Timestamp};
    /// # let engine = Engine::builder().build().unwrap();
    /// let t = Timestamp::from_secs(1_700_000_000);
    /// let issued = engine
    ///     .at(t)
    ///     .issue(&IssueRequest { client: "app", subject: "u1", scope: "openid", ip: None })
    ///     .unwrap();
    /// let token = issued.accepted().unwrap().token;
    /// let next = engine.at(t).redeem(&RedeemRequest::new(&token, "app")).unwrap();
    /// assert_eq!(next.outcome(), "rotated");
    /// ```
    pub fn at(&self, now: Timestamp) -> At<'_> {
        At { engine: self, now }
    }
}

impl<'e> At<'e> {
    /// The time this view acts at.
    pub fn now(self) -> Timestamp {
        self.now
    }

    /// [`Engine::issue`] at this time.
    pub fn issue(self, req: &IssueRequest<'_>) -> Result<Decision, Error> {
        self.engine.issue_at(req, self.now)
    }

    /// [`Engine::authorize`] at this time.
    pub fn authorize(self, req: &AuthorizeRequest<'_>) -> Result<Decision, Error> {
        self.engine.authorize_at(req, self.now)
    }

    /// [`Engine::exchange`] at this time.
    pub fn exchange(self, req: &ExchangeRequest<'_>) -> Result<Decision, Error> {
        self.engine.exchange_at(req, self.now)
    }

    /// [`Engine::exchange_async`] at this time.
    pub fn exchange_async(self, req: &ExchangeRequest<'_>) -> Result<Durable<'e>, Error> {
        self.engine.exchange_async_at(req, self.now)
    }

    /// [`Engine::redeem`] at this time.
    #[inline]
    pub fn redeem(self, req: &RedeemRequest<'_>) -> Result<Decision, Error> {
        self.engine.redeem_at(req, self.now)
    }

    /// [`Engine::redeem_async`] at this time.
    pub fn redeem_async(self, req: &RedeemRequest<'_>) -> Result<Durable<'e>, Error> {
        self.engine.redeem_async_at(req, self.now)
    }

    /// [`Engine::introspect`] at this time.
    pub fn introspect(self, token: &str) -> Option<Introspection> {
        self.engine.introspect_at(token, self.now)
    }

    /// [`Engine::revoke_token`] at this time.
    pub fn revoke_token(self, token: &str, client: Option<&str>) -> Result<bool, Error> {
        self.engine.revoke_token_at(token, client, self.now)
    }

    /// [`Engine::revoke_family`] at this time.
    pub fn revoke_family(self, id: FamilyId) -> Result<bool, Error> {
        self.engine.revoke_family_at(id, self.now)
    }

    /// [`Engine::revoke_subject`] at this time.
    pub fn revoke_subject(self, subject: &str, client: Option<&str>) -> Result<usize, Error> {
        self.engine.revoke_subject_at(subject, client, self.now)
    }

    /// [`Engine::revoke_client`] at this time.
    pub fn revoke_client(self, client: &str) -> Result<usize, Error> {
        self.engine.revoke_client_at(client, self.now)
    }

    /// [`Engine::sweep`] at this time.
    pub fn sweep(self, budget: usize) -> Result<SweepReport, Error> {
        self.engine.sweep_at(budget, self.now)
    }

    /// [`Engine::access_token`] at this time.
    pub fn access_token(
        self,
        accepted: &Accepted,
        scope: Option<&str>,
    ) -> Result<IssuedAccessToken, Error> {
        self.engine.access_token_at(accepted, scope, self.now)
    }

    /// [`Engine::verify_access_token`] at this time.
    pub fn verify_access_token(self, token: &str) -> Option<AccessTokenInfo> {
        self.engine.verify_access_token_at(token, self.now)
    }
}
