//! Access tokens: JWTs per RFC 9068 signed with EdDSA (Ed25519, RFC 8037),
//! and the JWK set that publishes the verifying key.
//!
//! Encoding a JWT is base64url of two small JSON objects and one signature;
//! a general JOSE crate would bring far more than it does here.

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use refresh_guard::Timestamp;

/// The claims of one access token (RFC 9068 §2.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The issuer identifier.
    pub iss: String,
    /// The subject (end user).
    pub sub: String,
    /// The audience: the client the token was issued to.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// A unique id for the token.
    pub jti: String,
    /// The client the token was issued to.
    pub client_id: String,
    /// Granted scope, space-separated.
    pub scope: String,
    /// The DPoP key the token is bound to (RFC 9449 §6.1); absent for a
    /// bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// The `cnf` claim of a DPoP-bound access token (RFC 7800, RFC 9449 §6.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The RFC 7638 thumbprint of the DPoP key, base64url.
    pub jkt: String,
}

/// Signs access tokens with one Ed25519 key. `Debug` shows only the key id.
///
/// The signer is aws-lc-rs, the fastest of those measured
/// (`benches/signer.rs`, BENCHMARKS.md "Ed25519 signers"); Ed25519 is
/// deterministic (RFC 8032 §5.1.6), so its tokens are byte for byte those
/// of any other implementation with the same seed.
pub struct AccessTokenSigner {
    key: Ed25519KeyPair,
    /// The public key, as the JWKS publishes it and `verify` checks it.
    public: [u8; 32],
    kid: String,
    /// base64url of the constant header, computed once.
    header: String,
}

impl std::fmt::Debug for AccessTokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessTokenSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl AccessTokenSigner {
    /// A signer over the 32-byte Ed25519 seed. The key id is derived from
    /// the public key (RFC 7638-style thumbprint, base64url, 16 chars), so
    /// it changes exactly when the key does.
    pub fn new(seed: &[u8; 32]) -> AccessTokenSigner {
        // Every 32-byte string is an Ed25519 seed (RFC 8032 §5.1.5): the
        // library refuses only other lengths.
        let key = Ed25519KeyPair::from_seed_unchecked(seed).expect("a 32-byte Ed25519 seed");
        let mut public = [0u8; 32];
        public.copy_from_slice(key.public_key().as_ref());
        let kid = thumbprint(&public);
        let header = serde_json::json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid});
        AccessTokenSigner {
            key,
            public,
            header: B64.encode(header.to_string()),
            kid,
        }
    }

    /// The key id in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Sign `claims` into a compact JWS.
    pub fn sign(&self, claims: &AccessClaims) -> String {
        // Serialising a struct of strings and integers cannot fail.
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let mut jwt = String::with_capacity(self.header.len() + payload.len() * 4 / 3 + 100);
        jwt.push_str(&self.header);
        jwt.push('.');
        B64.encode_string(&payload, &mut jwt);
        let signature = self.key.sign(jwt.as_bytes());
        jwt.push('.');
        B64.encode_string(signature.as_ref(), &mut jwt);
        jwt
    }

    /// Check a token this signer issued: header, signature, and expiry at
    /// `now`. `None` for anything else.
    pub fn verify(&self, jwt: &str, now: Timestamp) -> Option<AccessClaims> {
        let (signed, sig) = jwt.rsplit_once('.')?;
        let (header, payload) = signed.split_once('.')?;
        if header != self.header {
            return None;
        }
        let sig: [u8; 64] = B64.decode(sig).ok()?.try_into().ok()?;
        UnparsedPublicKey::new(&ED25519, &self.public)
            .verify(signed.as_bytes(), &sig)
            .ok()?;
        let claims: AccessClaims = serde_json::from_slice(&B64.decode(payload).ok()?).ok()?;
        (claims.exp > now.as_secs()).then_some(claims)
    }

    /// The JWK set publishing the verifying key (RFC 7517, RFC 8037 §2).
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "x": B64.encode(self.public),
                "kid": self.kid,
                "use": "sig",
                "alg": "EdDSA",
            }]
        })
    }
}

/// RFC 7638 thumbprint of an OKP key, cut to 16 base64url characters.
fn thumbprint(public: &[u8; 32]) -> String {
    // Members in lexicographic order, no whitespace (RFC 7638 §3.2).
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64.encode(public)
    );
    let mut kid = B64.encode(Sha256::digest(canonical.as_bytes()));
    kid.truncate(16);
    kid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> AccessClaims {
        AccessClaims {
            iss: "http://127.0.0.1:8080".into(),
            sub: "user \"42\"".into(),
            aud: "spa".into(),
            exp,
            iat: 1_000,
            jti: "j1".into(),
            client_id: "spa".into(),
            scope: "openid".into(),
            cnf: None,
        }
    }

    #[test]
    fn signs_rfc9068_header_and_verifies() {
        let s = AccessTokenSigner::new(&[7; 32]);
        let jwt = s.sign(&claims(2_000));
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(jwt.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["alg"], "EdDSA");
        assert_eq!(header["typ"], "at+jwt");
        assert_eq!(header["kid"], s.kid());
        assert_eq!(
            s.verify(&jwt, Timestamp::from_secs(1_500)),
            Some(claims(2_000))
        );
        // Expired, tampered, or from another key: refused.
        assert_eq!(s.verify(&jwt, Timestamp::from_secs(2_000)), None);
        let mut bad = jwt.clone();
        bad.insert(jwt.find('.').unwrap() + 2, 'A');
        assert_eq!(s.verify(&bad, Timestamp::from_secs(1_500)), None);
        let other = AccessTokenSigner::new(&[8; 32]);
        assert_eq!(other.verify(&jwt, Timestamp::from_secs(1_500)), None);
    }

    /// The signer moved from ed25519-dalek to aws-lc-rs: for a fixed key
    /// and claims the token is byte for byte the one ed25519-dalek made
    /// (Ed25519 is deterministic, RFC 8032 §5.1.6), and the JWKS publishes
    /// the same key, so no token or cached JWKS changes.
    #[test]
    fn tokens_and_jwks_are_those_of_the_previous_signer() {
        use ed25519_dalek::Signer as _;
        for seed in [
            [7u8; 32],
            [0u8; 32],
            std::array::from_fn(|i| (i as u8).wrapping_mul(37)),
        ] {
            let s = AccessTokenSigner::new(&seed);
            let old = ed25519_dalek::SigningKey::from_bytes(&seed);
            let jwt = s.sign(&claims(2_000));
            let (input, sig) = jwt.rsplit_once('.').unwrap();
            let expected = old.sign(input.as_bytes()).to_bytes();
            assert_eq!(B64.decode(sig).unwrap(), expected);
            assert_eq!(
                jwt,
                format!("{input}.{}", B64.encode(expected)),
                "the whole token"
            );
            assert_eq!(
                s.jwks()["keys"][0]["x"],
                B64.encode(old.verifying_key().as_bytes())
            );
            // Verification accepts the old signer's tokens.
            assert_eq!(
                s.verify(&jwt, Timestamp::from_secs(1_500)),
                Some(claims(2_000))
            );
        }
    }

    /// RFC 8037 appendix A: the thumbprint of the example key.
    #[test]
    fn thumbprint_matches_rfc8037_example() {
        let seed: [u8; 32] = B64
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap()
            .try_into()
            .unwrap();
        let s = AccessTokenSigner::new(&seed);
        assert_eq!(
            s.jwks()["keys"][0]["x"],
            "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        );
        assert_eq!(
            s.kid(),
            &"kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"[..16]
        );
    }
}
