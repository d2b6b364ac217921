//! Making DPoP proofs (RFC 9449 §4.2) for the tests and the bench, with
//! the crates' signers: any header and claims, so that a test can break
//! exactly one check.
#![allow(dead_code)]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A client's DPoP key.
pub enum ProofKey {
    /// ECDSA P-256.
    Es256(p256::ecdsa::SigningKey),
    /// Ed25519.
    EdDsa(ed25519_dalek::SigningKey),
}

impl ProofKey {
    /// A P-256 key from a seed byte.
    pub fn es256(seed: u8) -> ProofKey {
        ProofKey::Es256(p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap())
    }

    /// An Ed25519 key from a seed byte.
    pub fn eddsa(seed: u8) -> ProofKey {
        ProofKey::EdDsa(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
    }

    /// The JOSE `alg`.
    pub fn alg(&self) -> &'static str {
        match self {
            ProofKey::Es256(_) => "ES256",
            ProofKey::EdDsa(_) => "EdDSA",
        }
    }

    /// The public JWK.
    pub fn jwk(&self) -> Value {
        match self {
            ProofKey::Es256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({
                    "kty": "EC", "crv": "P-256",
                    "x": B64.encode(p.x().unwrap()), "y": B64.encode(p.y().unwrap()),
                })
            }
            ProofKey::EdDsa(k) => json!({
                "kty": "OKP", "crv": "Ed25519",
                "x": B64.encode(k.verifying_key().as_bytes()),
            }),
        }
    }

    /// The JWK with its private part `d`.
    pub fn private_jwk(&self) -> Value {
        let mut jwk = self.jwk();
        jwk["d"] = match self {
            ProofKey::Es256(k) => B64.encode(k.to_bytes()),
            ProofKey::EdDsa(k) => B64.encode(k.to_bytes()),
        }
        .into();
        jwk
    }

    /// The RFC 7638 thumbprint, base64url: computed here from the JWK's
    /// members, independently of the server's code.
    pub fn jkt(&self) -> String {
        let jwk = self.jwk();
        let canonical = match self {
            ProofKey::Es256(_) => format!(
                r#"{{"crv":"P-256","kty":"EC","x":{},"y":{}}}"#,
                jwk["x"], jwk["y"]
            ),
            ProofKey::EdDsa(_) => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":{}}}"#, jwk["x"]),
        };
        B64.encode(Sha256::digest(canonical.as_bytes()))
    }

    /// The usual header: `typ`, `alg`, `jwk`.
    pub fn header(&self) -> Value {
        json!({"typ": "dpop+jwt", "alg": self.alg(), "jwk": self.jwk()})
    }

    /// A compact JWS of `header` and `claims`, signed with this key.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = match self {
            ProofKey::Es256(k) => {
                use p256::ecdsa::signature::Signer as _;
                let s: p256::ecdsa::Signature = k.sign(input.as_bytes());
                s.to_bytes().to_vec()
            }
            ProofKey::EdDsa(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(input.as_bytes()).to_bytes().to_vec()
            }
        };
        format!("{input}.{}", B64.encode(sig))
    }

    /// A valid proof for `htm` `htu` at `iat`.
    pub fn proof(&self, htm: &str, htu: &str, iat: u64, jti: &str, nonce: Option<&str>) -> String {
        let mut claims = json!({"jti": jti, "htm": htm, "htu": htu, "iat": iat});
        if let Some(n) = nonce {
            claims["nonce"] = n.into();
        }
        self.sign(&self.header(), &claims)
    }
}
