//! Opaque access tokens (README "Opaque access tokens"): minted for an
//! acceptance, verified against the family's record while it lives.

use crate::access::Copied;
use crate::access::{
    self, AccessFields, AccessTokenInfo, FULL_SCOPE, IssuedAccessToken, masked_scope,
    narrowed_scope,
};
use crate::clock::Timestamp;
use crate::decision::{self, Accepted};
use crate::error::Error;
use crate::family::Family;
use crate::policy::ClientPolicy;
use crate::token::{Generation, TokenKind};

use super::Engine;

impl Engine {
    /// Mint an opaque access token (`rga_…`) for the family `accepted`
    /// names, living the client's `access_token_ttl`: to the whole grant,
    /// or to the part of it `scope` asks for (values outside the grant are
    /// left out; the server refuses them first with `invalid_scope`). Needs
    /// no lookup: the acceptance carries what the tag needs, so a
    /// revocation racing the response cannot turn a rotation already made
    /// into an error; the token it yields is then simply inactive.
    ///
    /// Refused (`Error::InvalidArgument`) for the acceptance of an
    /// authorization request: a code grants no access.
    pub fn access_token(
        &self,
        accepted: &Accepted,
        scope: Option<&str>,
    ) -> Result<IssuedAccessToken, Error> {
        self.at(self.now()).access_token(accepted, scope)
    }

    /// [`access_token`](Self::access_token) at `now`; see [`At`](super::At).
    pub(super) fn access_token_at(
        &self,
        accepted: &Accepted,
        scope: Option<&str>,
        now: Timestamp,
    ) -> Result<IssuedAccessToken, Error> {
        if accepted.token.kind() == TokenKind::Code {
            return Err(Error::InvalidArgument {
                name: "accepted",
                expected: "a refresh-token acceptance (a code grants no access token)",
            });
        }
        let ttl = self
            .policies
            .load()
            .policy(accepted.client())
            .access_token_ttl();
        let scope_mask = scope.map_or(FULL_SCOPE, |s| access::scope_mask(s, accepted.scope()));
        let keys = self.keys.load();
        let fields = AccessFields {
            key: keys.active(),
            family: accepted.family,
            generation: accepted.generation,
            issued_at: now,
            expires_at: now.saturating_add(ttl),
            scope_mask,
        };
        let token = fields
            .mint(&keys, &accepted.secret)
            .ok_or(Error::UnknownKey { id: keys.active() })?;
        let scope = match scope_mask {
            FULL_SCOPE => Copied::of(&accepted.grant.scope),
            _ => narrowed_scope(accepted.scope(), scope_mask),
        };
        Ok(IssuedAccessToken {
            token,
            issued_at: fields.issued_at,
            expires_at: fields.expires_at,
            scope,
        })
    }

    /// Verify an opaque access token, changing nothing: `Some` while it is
    /// unexpired and its family lives (not revoked, not past its idle or
    /// absolute lifetime under the policy in force), `None` for anything
    /// else — malformed, forged or tampered, minted under a key no longer
    /// in the ring, expired, of a dead or unknown family. A rotation does
    /// not end the access tokens minted before it. The tag is compared in
    /// constant time; nothing is allocated for short client ids, subjects
    /// and scopes.
    ///
    /// With a shared store (README "Several instances") whether the family
    /// lives is the store's word: one read per call, so a family revoked
    /// through any engine ends its access tokens on every engine at once.
    /// A store error answers `None` (fail closed).
    pub fn verify_access_token(&self, token: &str) -> Option<AccessTokenInfo> {
        self.at(self.now()).verify_access_token(token)
    }

    /// [`verify_access_token`](Self::verify_access_token) at `now`.
    pub(super) fn verify_access_token_at(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Option<AccessTokenInfo> {
        let parsed = access::parse(token)?;
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return self.shared_verify_access(sh, &parsed, now);
        }
        let keys = self.keys.load();
        let shard = self.table.lock(&parsed.fields.family);
        let f = shard.get(&parsed.fields.family)?;
        if !parsed.verify(&keys, &f.secret) {
            return None;
        }
        access_info(
            f,
            &parsed.fields,
            self.policies.load().policy(f.client()),
            now,
        )
    }
}

/// What an authentic access token of `f` grants at `now`, if it is live.
pub(super) fn access_info(
    f: &Family,
    fields: &AccessFields,
    policy: &ClientPolicy,
    now: Timestamp,
) -> Option<AccessTokenInfo> {
    // A generation past the family's is a rolled-back store (README "The
    // order of checks", step 7): fail closed, as a code's generation
    // grants nothing.
    let live = f.is_active()
        && decision::expiry(f, policy, now).is_none()
        && fields.generation != Generation::CODE
        && fields.generation <= f.generation
        && now < fields.expires_at;
    if !live {
        return None;
    }
    Some(AccessTokenInfo {
        family: f.id,
        generation: fields.generation,
        issued_at: fields.issued_at,
        expires_at: fields.expires_at,
        jkt: f.jkt().copied(),
        client: Copied::of(f.client()),
        subject: f.subject.clone(),
        scope: masked_scope(f.scope(), fields.scope_mask),
    })
}
