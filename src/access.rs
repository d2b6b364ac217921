//! Opaque access tokens: `rga_` + base64url(key id · family id · generation
//! · issued at · expires at · scope mask · tag).
//!
//! Derived like refresh tokens (README "Opaque access tokens"): nothing is
//! stored per token. The tag is HMAC-SHA-256 under a key-ring key over a
//! domain label of its own (`rg1a`), every field and the family's secret,
//! so a verifier needs the family's record and a key, and an access token
//! is never a refresh token or a code (other prefix, length and domain).
//!
//! The scope is bound without storing it and without growing the token:
//! the family's grant never changes, and a narrowed scope is a subset of
//! it, so the token carries a 64-bit mask over the grant's values — bit
//! `i < 63` for the `i`-th value, bit 63 for all values from the 64th on
//! together — and the verifier rebuilds the scope string from the grant.
//! A narrowing the mask cannot spell (some but not all of a grant's values
//! past the 63rd) is narrowed further, to leave that tail out: RFC 6749
//! §3.3 lets the server grant less than asked, and the response says what
//! was granted.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::clock::Timestamp;
use crate::dpop::Jkt;
use crate::family::SubjectName;
use crate::token::{
    ACCESS_DOMAIN, ACCESS_MSG_LEN, FamilyId, FamilySecret, Generation, KeyId, KeyRing, b64,
    tags_equal,
};

/// Client ids up to this many bytes are copied inline into an
/// [`AccessTokenInfo`].
pub(crate) const INLINE_CLIENT: usize = 30;
/// Scopes up to this many bytes are copied inline into an
/// [`AccessTokenInfo`] (`openid profile email offline_access` is 35).
pub(crate) const INLINE_SCOPE: usize = 62;

/// A copy of one of a grant's shared strings (client, scope) for a
/// verified access token to carry out of the shard lock. Grants are
/// shared by the families of a stripe, so cloning the `Arc` would make
/// every resource server's verification write the same reference count;
/// strings of up to `N` bytes are copied inline instead, only longer ones
/// share the count. (An acceptance carries the `Arc` itself: there the
/// copy's size cost more than the count, BENCHMARKS.md.)
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Copied<const N: usize> {
    Inline { len: u8, bytes: [u8; N] },
    Shared(Arc<str>),
}

impl<const N: usize> Copied<N> {
    pub(crate) fn of(s: &Arc<str>) -> Copied<N> {
        const { assert!(N <= u8::MAX as usize) };
        if s.len() <= N {
            let mut bytes = [0; N];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            // Fits: len <= N <= 255.
            Copied::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            Copied::Shared(s.clone())
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            Copied::Inline { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)])
                .expect("copied from a str, cut at its length"),
            Copied::Shared(s) => s,
        }
    }
}

impl<const N: usize> fmt::Debug for Copied<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

const PREFIX: &[u8; 4] = b"rga_";
/// key id (1) + family id (16) + generation (4) + issued at (8) + expires
/// at (8) + scope mask (8) + tag (16): one byte past 20 groups of three.
const RAW_LEN: usize = 1 + 16 + 4 + 8 + 8 + 8 + 16;
/// Length in bytes (and characters) of every opaque access token.
pub const ACCESS_TOKEN_LEN: usize = PREFIX.len() + b64::encoded_len(RAW_LEN);

/// The scope mask of the whole grant.
pub(crate) const FULL_SCOPE: u64 = u64::MAX;
/// Bits for single scope values; the last bit stands for the rest.
const SINGLE_BITS: usize = 63;

/// An opaque access token, inline (no heap allocation), readable as `&str`.
///
/// A bearer secret: `Debug` redacts it and there is no `Display`.
#[derive(Clone, Copy)]
pub struct AccessToken {
    bytes: [u8; ACCESS_TOKEN_LEN],
}

impl AccessToken {
    /// The token text to hand to the client.
    pub fn as_str(&self) -> &str {
        // Only ASCII (prefix and base64url alphabet) is ever written here.
        std::str::from_utf8(&self.bytes).expect("tokens are ASCII")
    }
}

impl Deref for AccessToken {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for AccessToken {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for AccessToken {
    fn eq(&self, other: &AccessToken) -> bool {
        bool::from(self.bytes.ct_eq(&other.bytes))
    }
}

impl Eq for AccessToken {}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(rga_<redacted>)")
    }
}

/// The fields an access token carries and its MAC covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AccessFields {
    pub(crate) key: KeyId,
    pub(crate) family: FamilyId,
    pub(crate) generation: Generation,
    pub(crate) issued_at: Timestamp,
    pub(crate) expires_at: Timestamp,
    pub(crate) scope_mask: u64,
}

impl AccessFields {
    /// The MAC message: domain, key id, fields, family secret.
    fn message(&self, secret: &FamilySecret) -> [u8; ACCESS_MSG_LEN] {
        let mut m = [0u8; ACCESS_MSG_LEN];
        m[..4].copy_from_slice(ACCESS_DOMAIN);
        m[4] = self.key.0;
        m[5..21].copy_from_slice(self.family.as_bytes());
        m[21..25].copy_from_slice(&self.generation.get().to_be_bytes());
        m[25..33].copy_from_slice(&self.issued_at.as_millis().to_be_bytes());
        m[33..41].copy_from_slice(&self.expires_at.as_millis().to_be_bytes());
        m[41..49].copy_from_slice(&self.scope_mask.to_be_bytes());
        m[49..].copy_from_slice(&secret.0);
        m
    }

    /// The token for these fields, tagged under `keys`; `None` if the ring
    /// does not hold `self.key`.
    pub(crate) fn mint(&self, keys: &KeyRing, secret: &FamilySecret) -> Option<AccessToken> {
        let tag = keys.access_tag(self.key, &self.message(secret))?;
        Some(self.assemble(&tag))
    }

    /// Lay out the token of these fields and `tag`.
    fn assemble(&self, tag: &[u8; 16]) -> AccessToken {
        let mut raw = [0u8; RAW_LEN];
        raw[0] = self.key.0;
        raw[1..17].copy_from_slice(self.family.as_bytes());
        raw[17..21].copy_from_slice(&self.generation.get().to_be_bytes());
        raw[21..29].copy_from_slice(&self.issued_at.as_millis().to_be_bytes());
        raw[29..37].copy_from_slice(&self.expires_at.as_millis().to_be_bytes());
        raw[37..45].copy_from_slice(&self.scope_mask.to_be_bytes());
        raw[45..].copy_from_slice(tag);
        let mut bytes = [0u8; ACCESS_TOKEN_LEN];
        bytes[..PREFIX.len()].copy_from_slice(PREFIX);
        b64::encode(&raw, &mut bytes[PREFIX.len()..]);
        AccessToken { bytes }
    }
}

/// A well-formed access token: its fields and tag, nothing verified yet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParsedAccess {
    pub(crate) fields: AccessFields,
    tag: [u8; 16],
}

impl ParsedAccess {
    /// The token these fields and tag spell (the fuzz target checks that
    /// parsing and this agree: every token has exactly one spelling).
    pub(crate) fn reassemble(&self) -> AccessToken {
        self.fields.assemble(&self.tag)
    }

    /// Constant-time check of the tag against the family's secret; false
    /// when the key is no longer in the ring.
    pub(crate) fn verify(&self, keys: &KeyRing, secret: &FamilySecret) -> bool {
        match keys.access_tag(self.fields.key, &self.fields.message(secret)) {
            Some(expected) => tags_equal(&expected, &self.tag),
            None => false,
        }
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_be_bytes(w)
}

/// Parse `s` as an access token without allocating. `None` means malformed
/// (prefix, length, alphabet, non-canonical spelling): every token has
/// exactly one spelling.
pub(crate) fn parse(s: &str) -> Option<ParsedAccess> {
    let b = s.as_bytes();
    if b.len() != ACCESS_TOKEN_LEN || b[..PREFIX.len()] != *PREFIX {
        return None;
    }
    let raw: [u8; RAW_LEN] = b64::decode(&b[PREFIX.len()..])?;
    let mut family = [0u8; 16];
    family.copy_from_slice(&raw[1..17]);
    let mut generation = [0u8; 4];
    generation.copy_from_slice(&raw[17..21]);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&raw[45..]);
    Some(ParsedAccess {
        fields: AccessFields {
            key: KeyId(raw[0]),
            family: FamilyId::from_bytes(family),
            generation: Generation::new(u32::from_be_bytes(generation)),
            issued_at: Timestamp::from_millis(be64(&raw[21..29])),
            expires_at: Timestamp::from_millis(be64(&raw[29..37])),
            scope_mask: be64(&raw[37..45]),
        },
        tag,
    })
}

/// The mask of `requested` over `granted`: a bit for each granted value
/// requested (its first occurrence only, so a rebuilt scope has no
/// duplicates), the tail bit when every value past the 63rd is requested,
/// and every bit past the grant's values set, so a request of the whole
/// grant is [`FULL_SCOPE`]. Values not granted are ignored (the server
/// refuses them with `invalid_scope` before any redemption).
pub(crate) fn scope_mask(requested: &str, granted: &str) -> u64 {
    let asked = |v: &str| requested.split_ascii_whitespace().any(|r| r == v);
    let mut mask = FULL_SCOPE;
    let mut tail_all = true;
    for (i, v) in granted.split_ascii_whitespace().enumerate() {
        if i < SINGLE_BITS {
            let first = !granted.split_ascii_whitespace().take(i).any(|w| w == v);
            if !(asked(v) && first) {
                mask &= !(1 << i);
            }
        } else {
            tail_all &= asked(v);
        }
    }
    if !tail_all {
        mask &= !(1 << SINGLE_BITS);
    }
    mask
}

/// The scope `mask` selects from `granted`, single-space separated, in the
/// grant's order (RFC 6749 §3.3: order does not matter). The whole grant is
/// the grant's own string. Copied inline when short (no allocation).
pub(crate) fn masked_scope(granted: &Arc<str>, mask: u64) -> Copied<INLINE_SCOPE> {
    if mask == FULL_SCOPE {
        return Copied::of(granted);
    }
    narrowed_scope(granted, mask)
}

/// [`masked_scope`] for a mask short of the whole grant.
pub(crate) fn narrowed_scope(granted: &str, mask: u64) -> Copied<INLINE_SCOPE> {
    let selected = || {
        granted
            .split_ascii_whitespace()
            .enumerate()
            .filter(move |(i, _)| mask & (1u64 << (*i).min(SINGLE_BITS)) != 0)
            .map(|(_, v)| v)
    };
    let len = selected()
        .map(|v| v.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    if len <= INLINE_SCOPE {
        let mut bytes = [0u8; INLINE_SCOPE];
        let mut at = 0;
        for v in selected() {
            if at > 0 {
                bytes[at] = b' ';
                at += 1;
            }
            bytes[at..at + v.len()].copy_from_slice(v.as_bytes());
            at += v.len();
        }
        // Fits: at == len <= INLINE_SCOPE <= 255.
        Copied::Inline {
            len: at as u8,
            bytes,
        }
    } else {
        let v: Vec<&str> = selected().collect();
        Copied::Shared(Arc::from(v.join(" ")))
    }
}

/// An access token the engine just minted ([`Engine::access_token`]).
///
/// [`Engine::access_token`]: crate::Engine::access_token
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedAccessToken {
    /// The token to hand to the client.
    pub token: AccessToken,
    /// When it was minted.
    pub issued_at: Timestamp,
    /// When it stops being valid (earlier if its family dies first).
    pub expires_at: Timestamp,
    pub(crate) scope: Copied<INLINE_SCOPE>,
}

impl IssuedAccessToken {
    /// The scope it grants: the family's grant, or the part of it asked for.
    pub fn scope(&self) -> &str {
        self.scope.as_str()
    }
}

/// What a valid opaque access token grants, from
/// [`Engine::verify_access_token`]. Handing it out allocates nothing for
/// short client ids, subjects and scopes (they are copied inline).
///
/// [`Engine::verify_access_token`]: crate::Engine::verify_access_token
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessTokenInfo {
    /// The family it was minted for.
    pub family: FamilyId,
    /// The generation of the refresh token minted with it.
    pub generation: Generation,
    /// When it was minted (RFC 7662 `iat`).
    pub issued_at: Timestamp,
    /// When it expires (RFC 7662 `exp`), if its family lives that long.
    pub expires_at: Timestamp,
    /// The DPoP key the family is bound to (RFC 9449 §6 `cnf.jkt`), if any.
    pub jkt: Option<Jkt>,
    pub(crate) client: Copied<INLINE_CLIENT>,
    pub(crate) subject: SubjectName,
    pub(crate) scope: Copied<INLINE_SCOPE>,
}

impl AccessTokenInfo {
    /// The client it was issued to (RFC 7662 `client_id`).
    pub fn client(&self) -> &str {
        self.client.as_str()
    }
    /// The end user (RFC 7662 `sub`).
    pub fn subject(&self) -> &str {
        self.subject.as_str()
    }
    /// The scope it grants, space-separated (RFC 7662 `scope`).
    pub fn scope(&self) -> &str {
        self.scope.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_strings_copy_inline_up_to_their_capacity() {
        let short: Arc<str> = Arc::from("openid offline_access");
        let long: Arc<str> = Arc::from("x".repeat(63));
        let c = Copied::<62>::of(&short);
        assert!(matches!(c, Copied::Inline { .. }));
        assert_eq!(c.as_str(), &*short);
        // Inline copies leave the shared count alone.
        assert_eq!(Arc::strong_count(&short), 1);
        let c = Copied::<62>::of(&long);
        assert!(matches!(c, Copied::Shared(_)));
        assert_eq!(c.as_str(), &*long);
        assert_eq!(Arc::strong_count(&long), 2);
    }
    use crate::token::KeySecret;

    fn fields() -> AccessFields {
        AccessFields {
            key: KeyId(3),
            family: FamilyId::from_bytes([5; 16]),
            generation: Generation::new(7),
            issued_at: Timestamp::from_millis(1_700_000_000_123),
            expires_at: Timestamp::from_millis(1_700_000_300_123),
            scope_mask: 0b101,
        }
    }

    /// Mint, parse and verify round-trip; the tag is HMAC-SHA-256 over the
    /// message, byte for byte (checked against the `hmac` crate).
    #[test]
    fn round_trips_and_the_tag_is_hmac_sha256() {
        use hmac::{Hmac, Mac};
        let keys = KeyRing::new(KeyId(3), &KeySecret::from_bytes([4; 32]));
        let secret = FamilySecret([6; 16]);
        let t = fields().mint(&keys, &secret).unwrap();
        assert_eq!(t.len(), ACCESS_TOKEN_LEN);
        assert!(t.starts_with("rga_"));
        let p = parse(&t).unwrap();
        assert_eq!(p.fields, fields());
        assert!(p.verify(&keys, &secret));
        assert!(!p.verify(&keys, &FamilySecret([7; 16])));
        let mut reference = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&[4; 32]).unwrap();
        reference.update(&fields().message(&secret));
        assert_eq!(p.tag[..], reference.finalize().into_bytes()[..16]);
        // The base64 crate spells the same token.
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&t[4..])
            .unwrap();
        assert_eq!(raw.len(), RAW_LEN);
        assert_eq!(raw[45..], p.tag);
    }

    #[test]
    fn masks_select_granted_values() {
        let g = "openid profile email openid";
        assert_eq!(
            scope_mask(g, g),
            FULL_SCOPE & !(1 << 3),
            "duplicate dropped"
        );
        assert_eq!(
            scope_mask("profile openid email", "openid profile email"),
            FULL_SCOPE
        );
        let m = scope_mask("email", "openid profile email");
        assert_eq!(
            masked_scope(&Arc::from("openid profile email"), m).as_str(),
            "email"
        );
        let m = scope_mask("email openid nope", "openid profile email");
        assert_eq!(
            masked_scope(&Arc::from("openid profile email"), m).as_str(),
            "openid email"
        );
        assert_eq!(
            masked_scope(&Arc::from("a b"), scope_mask("", "a b")).as_str(),
            ""
        );
        // Past the 63rd value: all of the tail or none of it.
        let many: Vec<String> = (0..70).map(|i| format!("s{i}")).collect();
        let grant: Arc<str> = Arc::from(many.join(" "));
        let m = scope_mask("s0 s64", &grant);
        assert_eq!(masked_scope(&grant, m).as_str(), "s0", "tail left out");
        let tail = many[63..].join(" ");
        let m = scope_mask(&format!("s1 {tail}"), &grant);
        assert_eq!(masked_scope(&grant, m).as_str(), format!("s1 {tail}"));
        // A long narrowed scope is shared, not cut.
        let m = scope_mask(&many[..40].join(" "), &grant);
        assert_eq!(masked_scope(&grant, m).as_str(), many[..40].join(" "));
    }

    #[test]
    fn malformed_access_tokens_are_rejected() {
        let keys = KeyRing::new(KeyId(3), &KeySecret::from_bytes([4; 32]));
        let t = fields().mint(&keys, &FamilySecret([6; 16])).unwrap();
        assert!(parse(&t[..ACCESS_TOKEN_LEN - 1]).is_none());
        assert!(parse(&format!("{}A", t.as_str())).is_none());
        assert!(parse(&format!("rgt_{}", &t[4..])).is_none());
        assert!(format!("{t:?}").contains("redacted"));
        assert!(!format!("{t:?}").contains(&t[4..]));
    }
}
