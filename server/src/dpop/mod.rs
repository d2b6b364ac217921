//! DPoP proofs at the token endpoint (RFC 9449 §4.3): every check of a
//! proof, before the refresh token or code it comes with is touched, and
//! the RFC 7638 thumbprint of its key handed to the engine (README "DPoP
//! at the token endpoint").
//!
//! The JOSE header and the claims are read with serde_json into typed
//! structs (a repeated member is refused, so no two readers can see two
//! different values); signatures are checked by `p256` (ES256) and
//! `ed25519-dalek` (EdDSA, `verify_strict`). Nothing of a proof is ever
//! logged or echoed: errors name the check that failed, not the value.
//!
//! `ath` (the access-token hash) is for resource servers (RFC 9449 §4.3
//! point 11, §7): a token request carries no access token, so it is not
//! checked here.

mod htu;
mod nonce;
mod replay;

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::Deserialize;
use serde::de::IgnoredAny;
use sha2::{Digest, Sha256};

use refresh_guard::Jkt;

pub use self::htu::normalise as normalise_htu;
pub use self::nonce::{NONCE_BUCKET_SECS, NonceKey};
pub use self::replay::{MemoryReplayCache, ReplayCache, ReplayError, ReplayFuture, ReplayKey};

/// Longest proof accepted, in bytes: an ES256 proof with its key is about
/// 600; this leaves room for long `jti`s and extra members, and bounds the
/// work an attacker can ask for.
pub const MAX_PROOF_LEN: usize = 4096;
/// Longest `jti` accepted, in bytes (RFC 9449 §4.2 asks for 96 random bits
/// or more; a 128-bit one is 22 base64url characters).
pub const MAX_JTI_LEN: usize = 256;

/// A signature algorithm a proof may use: asymmetric only (RFC 9449 §4.3
/// point 5), never `none` or an HMAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DpopAlg {
    /// ECDSA on P-256 with SHA-256 (RFC 7518 §3.4).
    Es256,
    /// Ed25519 under its polymorphic name `EdDSA` (RFC 8037).
    EdDsa,
    /// Ed25519 under its fully-specified name `Ed25519` (RFC 9864), which
    /// deprecates `EdDSA`; what current clients (oauth4webapi) send.
    Ed25519,
}

impl DpopAlg {
    /// Every algorithm this server can verify.
    pub const ALL: [DpopAlg; 3] = [DpopAlg::Es256, DpopAlg::EdDsa, DpopAlg::Ed25519];

    /// The JOSE name (`alg`).
    pub fn name(self) -> &'static str {
        match self {
            DpopAlg::Es256 => "ES256",
            DpopAlg::EdDsa => "EdDSA",
            DpopAlg::Ed25519 => "Ed25519",
        }
    }

    /// From the JOSE name, exactly (JOSE names are case-sensitive).
    pub fn from_name(s: &str) -> Option<DpopAlg> {
        DpopAlg::ALL.into_iter().find(|a| a.name() == s)
    }
}

impl fmt::Display for DpopAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How proofs are checked (`--dpop-algs`, `--dpop-max-age`,
/// `--dpop-max-ahead`, `--dpop-replay-capacity`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DpopSettings {
    /// Algorithms accepted, also advertised as
    /// `dpop_signing_alg_values_supported` (RFC 9449 §5.1).
    pub algs: Vec<DpopAlg>,
    /// Oldest a proof's `iat` may be.
    pub max_age: Duration,
    /// Farthest ahead of the server's clock a proof's `iat` may be.
    pub max_ahead: Duration,
    /// Most proofs remembered for replay detection (about 100 bytes each);
    /// when all are inside their window new proofs are refused (503).
    pub replay_capacity: usize,
}

impl Default for DpopSettings {
    fn default() -> DpopSettings {
        DpopSettings {
            algs: DpopAlg::ALL.to_vec(),
            max_age: Duration::from_secs(60),
            max_ahead: Duration::from_secs(10),
            replay_capacity: 1 << 18,
        }
    }
}

/// Why a proof was refused: the check of RFC 9449 §4.3 that failed. The
/// `Display` text names the check and never quotes the proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// Not exactly one `DPoP` header (point 1).
    Headers {
        /// How many there were.
        found: usize,
    },
    /// Longer than [`MAX_PROOF_LEN`].
    TooLong,
    /// Not a compact JWS of JSON objects (point 2); says which part.
    NotJwt(&'static str),
    /// The header lists critical extensions this server does not
    /// understand (RFC 7515 §4.1.11).
    Crit,
    /// `typ` is not `dpop+jwt` (point 4).
    Typ,
    /// `alg` is missing, symmetric, `none`, or not allowed here (point 5).
    Alg,
    /// `jwk` is missing or not a public key of the alg's type (points 3, 6).
    Jwk(&'static str),
    /// `jwk` holds a private key (point 7).
    PrivateKey,
    /// The signature does not verify with `jwk` (point 6).
    Signature,
    /// A claim is missing or malformed (point 3); says which.
    Claim(&'static str),
    /// `htm` is not the request's method (point 8).
    Htm,
    /// `htu` is not this token endpoint (point 9).
    Htu,
    /// `iat` is older than the window (point 12).
    IatTooOld,
    /// `iat` is too far ahead of the server's clock (point 12).
    IatAhead,
    /// The nonce is missing, or not a current one (point 10, §8).
    Nonce {
        /// No `nonce` claim at all.
        missing: bool,
    },
    /// This `jti` was seen within the window (point 12, §11.1).
    Replayed,
    /// The replay cache is full of live proofs: refused, not evicted.
    ReplayCacheFull,
    /// The shared replay records did not answer (`serve --store` with
    /// Redis unreachable): refused, never accepted unrecorded.
    ReplayUnavailable,
}

impl fmt::Display for ProofError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProofError::Headers { found } => {
                write!(f, "expected exactly one DPoP header, found {found}")
            }
            ProofError::TooLong => write!(f, "DPoP proof is longer than {MAX_PROOF_LEN} bytes"),
            ProofError::NotJwt(what) => write!(f, "DPoP proof is not a JWT: {what}"),
            ProofError::Crit => f.write_str("DPoP proof header has unsupported crit extensions"),
            ProofError::Typ => f.write_str("DPoP proof typ must be dpop+jwt"),
            ProofError::Alg => f.write_str(
                "DPoP proof alg must be an asymmetric algorithm this server accepts \
                 (see dpop_signing_alg_values_supported)",
            ),
            ProofError::Jwk(what) => write!(f, "DPoP proof jwk: {what}"),
            ProofError::PrivateKey => f.write_str("DPoP proof jwk must not contain a private key"),
            ProofError::Signature => {
                f.write_str("DPoP proof signature does not verify with its jwk")
            }
            ProofError::Claim(what) => write!(f, "DPoP proof claims: {what}"),
            ProofError::Htm => f.write_str("DPoP proof htm does not match the request method"),
            ProofError::Htu => f.write_str("DPoP proof htu does not match the token endpoint URL"),
            ProofError::IatTooOld => f.write_str("DPoP proof iat is too old"),
            ProofError::IatAhead => f.write_str("DPoP proof iat is too far in the future"),
            ProofError::Nonce { missing: true } => {
                f.write_str("DPoP proof must carry the server nonce (DPoP-Nonce)")
            }
            ProofError::Nonce { missing: false } => {
                f.write_str("DPoP proof nonce is not a current server nonce")
            }
            ProofError::Replayed => f.write_str("DPoP proof jti was already used"),
            ProofError::ReplayCacheFull => f.write_str(
                "too many DPoP proofs in their replay window; retry with a new proof shortly",
            ),
            ProofError::ReplayUnavailable => f.write_str(
                "the DPoP replay records are unavailable; retry with a new proof shortly",
            ),
        }
    }
}

impl std::error::Error for ProofError {}

/// The JOSE header of a proof. Members not listed are ignored (RFC 7515
/// §4), save `crit`, which must be understood.
#[derive(Deserialize)]
struct Header {
    typ: Option<String>,
    alg: Option<String>,
    jwk: Option<Jwk>,
    crit: Option<IgnoredAny>,
}

/// The public key, with what would make it a private one.
#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    /// The private key of EC and OKP keys (RFC 7518 §6.2.2.1, RFC 8037 §2).
    d: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Claims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    iat: Option<serde_json::Number>,
    nonce: Option<String>,
}

/// A public key of a proof, decoded.
enum Key {
    P256(p256::ecdsa::VerifyingKey, [u8; 32], [u8; 32]),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl Key {
    fn from_jwk(jwk: &Jwk, alg: DpopAlg) -> Result<Key, ProofError> {
        let coord = |v: &Option<String>, name: &'static str| -> Result<[u8; 32], ProofError> {
            let s = v.as_deref().ok_or(ProofError::Jwk(name))?;
            let mut out = [0u8; 32];
            match B64.decode_slice(s, &mut out) {
                Ok(32) if s.len() == 43 => Ok(out),
                _ => Err(ProofError::Jwk(name)),
            }
        };
        match alg {
            DpopAlg::Es256 => {
                if jwk.kty.as_deref() != Some("EC") || jwk.crv.as_deref() != Some("P-256") {
                    return Err(ProofError::Jwk("ES256 needs an EC key on P-256"));
                }
                let x = coord(&jwk.x, "x must be 32 bytes of base64url")?;
                let y = coord(&jwk.y, "y must be 32 bytes of base64url")?;
                let point =
                    p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
                let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                    .map_err(|_| ProofError::Jwk("x, y is not a point on P-256"))?;
                Ok(Key::P256(key, x, y))
            }
            DpopAlg::EdDsa | DpopAlg::Ed25519 => {
                if jwk.kty.as_deref() != Some("OKP") || jwk.crv.as_deref() != Some("Ed25519") {
                    return Err(ProofError::Jwk(
                        "EdDSA and Ed25519 need an OKP key on Ed25519",
                    ));
                }
                if jwk.y.is_some() {
                    return Err(ProofError::Jwk("an Ed25519 key has no y"));
                }
                let x = coord(&jwk.x, "x must be 32 bytes of base64url")?;
                let key = ed25519_dalek::VerifyingKey::from_bytes(&x)
                    .map_err(|_| ProofError::Jwk("x is not an Ed25519 public key"))?;
                Ok(Key::Ed25519(key))
            }
        }
    }

    fn verify(&self, signed: &[u8], signature: &[u8]) -> Result<(), ProofError> {
        let ok = match self {
            Key::P256(key, ..) => {
                use p256::ecdsa::signature::Verifier as _;
                // JWS ES256 signatures are R || S, 64 bytes (RFC 7518 §3.4).
                p256::ecdsa::Signature::from_slice(signature)
                    .is_ok_and(|sig| key.verify(signed, &sig).is_ok())
            }
            Key::Ed25519(key) => <[u8; 64]>::try_from(signature).is_ok_and(|sig| {
                key.verify_strict(signed, &ed25519_dalek::Signature::from_bytes(&sig))
                    .is_ok()
            }),
        };
        if ok {
            Ok(())
        } else {
            Err(ProofError::Signature)
        }
    }

    /// The RFC 7638 thumbprint: SHA-256 of the required members in
    /// lexicographic order, no whitespace (RFC 7638 §3.2; OKP's members
    /// per RFC 8037 §2).
    fn thumbprint(&self) -> Jkt {
        let canonical = match self {
            Key::P256(_, x, y) => format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                B64.encode(x),
                B64.encode(y)
            ),
            Key::Ed25519(key) => format!(
                r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                B64.encode(key.as_bytes())
            ),
        };
        Jkt::from_bytes(Sha256::digest(canonical.as_bytes()).into())
    }
}

/// Checks proofs for one token endpoint.
pub struct ProofVerifier {
    algs: Vec<DpopAlg>,
    max_age: u64,
    max_ahead: u64,
    /// The token endpoint's URL, normalised.
    htu: String,
    replay: Box<dyn ReplayCache>,
    nonce: NonceKey,
}

impl fmt::Debug for ProofVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProofVerifier")
            .field("algs", &self.algs)
            .field("htu", &self.htu)
            .finish_non_exhaustive()
    }
}

/// What a request says about its proof: the `DPoP` header values, the
/// method, the time, and whether the client must send a nonce.
pub struct ProofRequest<'a> {
    /// Every `DPoP` header value, in order (one expected).
    pub values: &'a [&'a [u8]],
    /// The HTTP method.
    pub method: &'a str,
    /// Seconds since the epoch, from the engine's clock.
    pub now: u64,
    /// The client's `dpop_nonce` knob.
    pub nonce_required: bool,
}

impl ProofVerifier {
    /// A verifier for the token endpoint at `token_endpoint`; `None` if
    /// that is not an absolute http(s) URL.
    pub fn new(
        settings: &DpopSettings,
        token_endpoint: &str,
        replay: Box<dyn ReplayCache>,
        nonce: NonceKey,
    ) -> Option<ProofVerifier> {
        Some(ProofVerifier {
            algs: settings.algs.clone(),
            max_age: settings.max_age.as_secs(),
            max_ahead: settings.max_ahead.as_secs(),
            htu: normalise_htu(token_endpoint)?,
            replay,
            nonce,
        })
    }

    /// The algorithms accepted.
    pub fn algs(&self) -> &[DpopAlg] {
        &self.algs
    }

    /// The nonce to send in `DPoP-Nonce` at `now`.
    pub fn nonce(&self, now: u64) -> String {
        self.nonce.current(now)
    }

    /// Every check of RFC 9449 §4.3, in its order; the proof's `jti` is
    /// recorded only once every other check passed. `Ok(None)` when the
    /// request has no `DPoP` header.
    pub async fn verify(&self, req: &ProofRequest<'_>) -> Result<Option<Jkt>, ProofError> {
        let Some((jkt, replay_key, expires)) = self.check(req)? else {
            return Ok(None);
        };
        match self.replay.first_use(&replay_key, expires, req.now).await {
            Ok(true) => Ok(Some(jkt)),
            Ok(false) => Err(ProofError::Replayed),
            Err(ReplayError::Full) => Err(ProofError::ReplayCacheFull),
            Err(ReplayError::Unavailable) => Err(ProofError::ReplayUnavailable),
        }
    }

    /// [`verify`](Self::verify) for a cache that answers at once (the
    /// in-memory one): fuzz targets, benches and tests, which have no
    /// runtime. A cache that would wait is refused as unavailable.
    #[doc(hidden)]
    pub fn verify_now(&self, req: &ProofRequest<'_>) -> Result<Option<Jkt>, ProofError> {
        use std::future::Future as _;
        use std::task::{Context, Poll, Waker};
        let mut fut = std::pin::pin!(self.verify(req));
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(ProofError::ReplayUnavailable),
        }
    }

    /// Every check but the replay: the key's thumbprint, the replay key
    /// and when the record may expire.
    fn check(&self, req: &ProofRequest<'_>) -> Result<Option<(Jkt, ReplayKey, u64)>, ProofError> {
        let value = match req.values {
            [] => return Ok(None),
            [one] => *one,
            more => return Err(ProofError::Headers { found: more.len() }),
        };
        if value.len() > MAX_PROOF_LEN {
            return Err(ProofError::TooLong);
        }
        let proof = std::str::from_utf8(value).map_err(|_| ProofError::NotJwt("not text"))?;
        let mut parts = proof.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ProofError::NotJwt("not three dot-separated parts"));
        };
        let header = decode_header(h64)?;
        let payload = B64
            .decode(p64)
            .map_err(|_| ProofError::NotJwt("payload is not base64url"))?;
        let signature = B64
            .decode(s64)
            .map_err(|_| ProofError::NotJwt("signature is not base64url"))?;
        if header.crit.is_some() {
            return Err(ProofError::Crit);
        }
        // A media type, so case-insensitive, and `application/` may be
        // spelt out (RFC 7515 §4.1.9).
        let typ = header.typ.as_deref().unwrap_or_default();
        let typ = typ
            .get(..12)
            .filter(|p| p.eq_ignore_ascii_case("application/"))
            .map_or(typ, |_| &typ[12..]);
        if !typ.eq_ignore_ascii_case("dpop+jwt") {
            return Err(ProofError::Typ);
        }
        let alg = header
            .alg
            .as_deref()
            .and_then(DpopAlg::from_name)
            .filter(|a| self.algs.contains(a))
            .ok_or(ProofError::Alg)?;
        let jwk = header.jwk.as_ref().ok_or(ProofError::Jwk("missing"))?;
        if jwk.d.is_some() {
            return Err(ProofError::PrivateKey);
        }
        let key = Key::from_jwk(jwk, alg)?;
        // The signing input is the two encoded parts as sent (RFC 7515 §5.2).
        let signed = &proof[..h64.len() + 1 + p64.len()];
        key.verify(signed.as_bytes(), &signature)?;
        let claims: Claims = serde_json::from_slice(&payload)
            .map_err(|_| ProofError::NotJwt("payload is not a JSON object of claims"))?;
        let jti = claims.jti.ok_or(ProofError::Claim("jti is missing"))?;
        if jti.is_empty() || jti.len() > MAX_JTI_LEN {
            return Err(ProofError::Claim("jti must be 1 to 256 bytes"));
        }
        let htm = claims.htm.ok_or(ProofError::Claim("htm is missing"))?;
        let htu = claims.htu.ok_or(ProofError::Claim("htu is missing"))?;
        let iat = claims.iat.ok_or(ProofError::Claim("iat is missing"))?;
        let iat = numeric_date(&iat).ok_or(ProofError::Claim("iat is not a NumericDate"))?;
        // Methods are case-sensitive (RFC 9110 §9.1).
        if htm != req.method {
            return Err(ProofError::Htm);
        }
        if normalise_htu(&htu).as_deref() != Some(&*self.htu) {
            return Err(ProofError::Htu);
        }
        if req.now.saturating_sub(iat) > self.max_age {
            return Err(ProofError::IatTooOld);
        }
        if iat.saturating_sub(req.now) > self.max_ahead {
            return Err(ProofError::IatAhead);
        }
        if req.nonce_required {
            match claims.nonce.as_deref() {
                None => return Err(ProofError::Nonce { missing: true }),
                Some(n) if !self.nonce.accepts(n, req.now) => {
                    return Err(ProofError::Nonce { missing: false });
                }
                Some(_) => {}
            }
        }
        let mut h = Sha256::new();
        h.update(self.htu.as_bytes());
        h.update([0]);
        h.update(jti.as_bytes());
        let replay_key: ReplayKey = h.finalize().into();
        // Kept until the proof would be refused as too old anyway.
        let expires = iat.saturating_add(self.max_age).saturating_add(1);
        Ok(Some((key.thumbprint(), replay_key, expires)))
    }
}

fn decode_header(b64: &str) -> Result<Header, ProofError> {
    let bytes = B64
        .decode(b64)
        .map_err(|_| ProofError::NotJwt("header is not base64url"))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| ProofError::NotJwt("header is not a JSON object of JOSE members"))
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly with a
/// fraction; negative or non-finite values are not dates.
fn numeric_date(n: &serde_json::Number) -> Option<u64> {
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    let f = n.as_f64()?;
    (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then_some(f as u64)
}

#[cfg(test)]
mod tests;
