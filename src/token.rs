//! Derived tokens: `rgt_`/`rgc_` + base64url(key id · family id · generation · tag).
//!
//! Nothing per token is stored. A token is recomputed from its family's record,
//! so a family costs one record however often it rotates, and every past
//! generation stays verifiable (reuse detection never forgets).
//!
//! The tag is HMAC-SHA-256 under a key-ring key over a domain label, the key
//! id, the family id, the generation and the family's own random secret: a
//! leaked store alone cannot mint tokens (no key), and a leaked key alone
//! cannot either (no family secret).

use std::fmt;
use std::ops::Deref;

use sha2::digest::generic_array::GenericArray;
use subtle::ConstantTimeEq;

use crate::error::Error;

const PREFIX_LEN: usize = 4;
const TAG_LEN: usize = 16;
/// key id (1) + family id (16) + generation (4) + tag (16).
const RAW_LEN: usize = 1 + 16 + 4 + TAG_LEN;
/// 37 raw bytes are 50 base64 characters without padding.
const B64_LEN: usize = b64::encoded_len(RAW_LEN);
/// Length in bytes (and characters) of every token and code.
pub const TOKEN_LEN: usize = PREFIX_LEN + B64_LEN;

/// What a token is for; each kind has its own prefix and MAC domain, so a
/// code can never be replayed as a refresh token or the reverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// A refresh token (`rgt_`), generation 1 and later.
    Refresh,
    /// An authorization code (`rgc_`), generation 0 of its family.
    Code,
}

impl TokenKind {
    fn prefix(self) -> &'static [u8; PREFIX_LEN] {
        match self {
            TokenKind::Refresh => b"rgt_",
            TokenKind::Code => b"rgc_",
        }
    }

    /// Short on purpose: label + key id + family + generation + secret is
    /// 41 bytes, so the inner hash of the HMAC is one SHA-256 block.
    fn domain(self) -> &'static [u8; 4] {
        match self {
            TokenKind::Refresh => b"rg1r",
            TokenKind::Code => b"rg1c",
        }
    }
}

/// Identifies one token family (one lineage born from one authorization).
///
/// Not a secret: it appears in events and logs. Bytes 0..4 are the slot
/// the family occupies in its table shard (little-endian), so a lookup
/// needs no hash index; bytes 4..16 are random (96 bits) and choose the
/// shard. Any 16 bytes are a valid id: a record whose slot is taken is
/// still found, by a slower path.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FamilyId([u8; 16]);

impl FamilyId {
    /// A family id from its bytes (for stores and tests).
    pub const fn from_bytes(bytes: [u8; 16]) -> FamilyId {
        FamilyId(bytes)
    }

    /// The id's bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The id of a new family: `random` for the shard, `slot` in it.
    pub(crate) fn new(slot: u32, random: [u8; 12]) -> FamilyId {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&slot.to_le_bytes());
        b[4..].copy_from_slice(&random);
        FamilyId(b)
    }

    /// The table slot this id names in its shard.
    pub(crate) fn slot(&self) -> u32 {
        u32::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// A well-mixed 64-bit value for shard selection, from the random part.
    /// The slot does not take part, so a new family's shard is known
    /// before its slot is.
    pub(crate) fn shard_bits(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[4..12]);
        u64::from_le_bytes(b)
    }
}

impl fmt::Display for FamilyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for FamilyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FamilyId({self})")
    }
}

/// A family's position in its lineage: the code is 0, the first refresh
/// token 1, each rotation adds one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(u32);

impl Generation {
    /// The authorization code's generation.
    pub const CODE: Generation = Generation(0);
    /// The first refresh token's generation.
    pub const FIRST: Generation = Generation(1);

    /// A generation from its number.
    pub const fn new(n: u32) -> Generation {
        Generation(n)
    }

    /// The generation's number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The next generation, or `None` once 2^32 - 1 rotations are spent.
    pub fn next(self) -> Option<Generation> {
        self.0.checked_add(1).map(Generation)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Names a MAC key in the key ring; carried in every token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub u8);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The random per-family secret mixed into every tag of the family.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct FamilySecret(pub(crate) [u8; 16]);

impl fmt::Debug for FamilySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FamilySecret(<redacted>)")
    }
}

/// 32 bytes of MAC key material.
#[derive(Clone)]
pub struct KeySecret([u8; 32]);

impl KeySecret {
    /// Key material from bytes the embedder keeps (a KMS, a key file).
    pub const fn from_bytes(bytes: [u8; 32]) -> KeySecret {
        KeySecret(bytes)
    }

    /// Fresh key material from the operating system's CSPRNG.
    pub fn generate() -> Result<KeySecret, Error> {
        let mut b = [0u8; 32];
        crate::random::fill(&mut b)?;
        Ok(KeySecret(b))
    }

    /// The key bytes, for the embedder to persist.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySecret(<redacted>)")
    }
}

/// MAC keys by id: one active key mints, every present key verifies, so keys
/// rotate without logging anyone out. Removing a key kills its tokens.
#[derive(Clone)]
pub struct KeyRing {
    /// `slot[id] - 1` indexes `macs`; 0 = no such key. `u16`, because a
    /// full ring holds 256 keys and index 256 does not fit a `u8`.
    slot: [u16; 256],
    /// Pre-keyed HMAC states, so the key schedule runs once, each with a
    /// process-unique id of its key material (see [`KeyUid`]).
    macs: Vec<(KeyId, KeyUid, MacKey)>,
    active: KeyId,
}

/// A ring position (1-based) as stored in `KeyRing::slot`.
fn slot_of(position: usize) -> u16 {
    // Ids are unique `u8`s (`add` refuses a duplicate), so a ring holds at
    // most 256 keys and every position fits.
    u16::try_from(position).expect("a key ring holds at most 256 keys")
}

impl KeyRing {
    /// A ring holding one key, which is active.
    pub fn new(id: KeyId, secret: &KeySecret) -> KeyRing {
        let mut ring = KeyRing {
            slot: [0; 256],
            macs: Vec::with_capacity(1),
            active: id,
        };
        ring.insert(id, secret);
        ring
    }

    /// A ring with one freshly generated key, id 0.
    pub fn generate() -> Result<KeyRing, Error> {
        Ok(KeyRing::new(KeyId(0), &KeySecret::generate()?))
    }

    fn insert(&mut self, id: KeyId, secret: &KeySecret) {
        self.macs.push((id, KeyUid::next(), MacKey::new(&secret.0)));
        self.slot[usize::from(id.0)] = slot_of(self.macs.len());
    }

    /// Add a verifying key. It mints only once made active.
    pub fn add(&mut self, id: KeyId, secret: &KeySecret) -> Result<(), Error> {
        if self.contains(id) {
            return Err(Error::DuplicateKey { id });
        }
        self.insert(id, secret);
        Ok(())
    }

    /// Make `id` the key that mints new tokens.
    pub fn set_active(&mut self, id: KeyId) -> Result<(), Error> {
        if !self.contains(id) {
            return Err(Error::UnknownKey { id });
        }
        self.active = id;
        Ok(())
    }

    /// Remove a key: tokens it minted become `invalid_token`. The active key
    /// cannot be removed (activate another first).
    pub fn remove(&mut self, id: KeyId) -> Result<(), Error> {
        if !self.contains(id) {
            return Err(Error::UnknownKey { id });
        }
        if id == self.active {
            return Err(Error::RemoveActiveKey { id });
        }
        self.macs.retain(|(k, _, _)| *k != id);
        self.slot = [0; 256];
        for (i, (k, _, _)) in self.macs.iter().enumerate() {
            self.slot[usize::from(k.0)] = slot_of(i + 1);
        }
        Ok(())
    }

    /// Whether the ring holds key `id`.
    pub fn contains(&self, id: KeyId) -> bool {
        self.slot[usize::from(id.0)] != 0
    }

    /// The key that mints new tokens.
    pub fn active(&self) -> KeyId {
        self.active
    }

    /// Ids of every key in the ring.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.macs.iter().map(|(k, _, _)| *k)
    }

    fn entry(&self, id: KeyId) -> Option<&(KeyId, KeyUid, MacKey)> {
        match self.slot[usize::from(id.0)] {
            0 => None,
            i => self.macs.get(usize::from(i) - 1),
        }
    }

    /// The identity of the key material behind `id`, if present.
    pub(crate) fn uid(&self, id: KeyId) -> Option<KeyUid> {
        self.entry(id).map(|e| e.1)
    }

    /// The tag of one token; `None` if the ring does not hold `key`.
    pub(crate) fn tag(
        &self,
        kind: TokenKind,
        key: KeyId,
        family: &FamilyId,
        generation: Generation,
        secret: &FamilySecret,
    ) -> Option<[u8; TAG_LEN]> {
        let mac = &self.entry(key)?.2;
        let mut msg = [0u8; MAC_MSG_LEN];
        msg[..4].copy_from_slice(kind.domain());
        msg[4] = key.0;
        msg[5..21].copy_from_slice(&family.0);
        msg[21..25].copy_from_slice(&generation.0.to_be_bytes());
        msg[25..].copy_from_slice(&secret.0);
        Some(mac.tag(&msg))
    }

    /// The tag of an access token whose MAC message (domain, key id,
    /// fields and family secret) is `msg`; `None` if the ring does not hold
    /// `key`.
    pub(crate) fn access_tag(
        &self,
        key: KeyId,
        msg: &[u8; ACCESS_MSG_LEN],
    ) -> Option<[u8; TAG_LEN]> {
        Some(self.entry(key)?.2.tag_access(msg))
    }

    #[cfg(test)]
    pub(crate) fn mint(
        &self,
        kind: TokenKind,
        key: KeyId,
        family: &FamilyId,
        generation: Generation,
        secret: &FamilySecret,
    ) -> Option<Token> {
        let tag = self.tag(kind, key, family, generation, secret)?;
        Some(assemble(kind, key, family, generation, &tag))
    }

    /// Constant-time check of a parsed token's tag against its family.
    pub(crate) fn verify(&self, parsed: &ParsedToken, secret: &FamilySecret) -> bool {
        match self.tag(
            parsed.kind,
            parsed.key,
            &parsed.family,
            parsed.generation,
            secret,
        ) {
            Some(expected) => tags_equal(&expected, &parsed.tag),
            None => false,
        }
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// What a tag is the MAC of: domain label, key id, family id, generation,
/// family secret.
const MAC_MSG_LEN: usize = 4 + 1 + 16 + 4 + 16;
/// What an access token's tag is the MAC of: its own domain label, key id,
/// family id, generation, issue and expiry times, scope mask, family secret
/// (see `crate::access`).
pub(crate) const ACCESS_MSG_LEN: usize = 4 + 1 + 16 + 4 + 8 + 8 + 8 + 16;
/// An access token's MAC domain: distinct from every [`TokenKind`]'s, and
/// its message is longer, so no tag of one kind is ever a tag of another.
pub(crate) const ACCESS_DOMAIN: &[u8; 4] = b"rg1a";

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// One SHA-256 compression of `block` into `state` (SHA-NI where the CPU
/// has it).
fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
}

/// The last block of a SHA-256 message whose final `data` follows
/// `before` already-compressed bytes (whole blocks): data, the 0x80
/// marker, zeros, and the message length in bits.
fn final_block(data: &[u8], before: u64) -> [u8; 64] {
    const { assert!(MAC_MSG_LEN <= 55) };
    debug_assert!(data.len() <= 55, "one block holds at most 55 data bytes");
    let mut block = [0u8; 64];
    block[..data.len()].copy_from_slice(data);
    block[data.len()] = 0x80;
    // The length fits: data is at most 55 bytes, `before` a few blocks.
    let bits = (before + data.len() as u64) * 8;
    block[56..].copy_from_slice(&bits.to_be_bytes());
    block
}

/// HMAC-SHA-256 (RFC 2104) keyed once: the SHA-256 states after the key's
/// inner and outer pad blocks. A tag's message fits one block with its
/// padding, so a tag is exactly two compressions, with no per-tag copy of
/// a general HMAC state and its buffer (that copy was a tenth of a
/// rotation). Checked against the `hmac` crate in the tests.
#[derive(Clone)]
struct MacKey {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl MacKey {
    fn new(key: &[u8; 32]) -> MacKey {
        let (mut ipad, mut opad) = ([0x36u8; 64], [0x5cu8; 64]);
        for (i, k) in key.iter().enumerate() {
            ipad[i] ^= k;
            opad[i] ^= k;
        }
        let (mut inner, mut outer) = (SHA256_IV, SHA256_IV);
        compress(&mut inner, &ipad);
        compress(&mut outer, &opad);
        MacKey { inner, outer }
    }

    /// The first [`TAG_LEN`] bytes of HMAC-SHA-256(key, `msg`).
    fn tag(&self, msg: &[u8; MAC_MSG_LEN]) -> [u8; TAG_LEN] {
        let mut inner = self.inner;
        compress(&mut inner, &final_block(msg, 64));
        self.finish(inner)
    }

    /// The same for an access token's longer message: one more
    /// compression (a whole block of the message, then its tail).
    fn tag_access(&self, msg: &[u8; ACCESS_MSG_LEN]) -> [u8; TAG_LEN] {
        const { assert!(ACCESS_MSG_LEN > 64 && ACCESS_MSG_LEN - 64 <= 55) };
        let (head, tail) = msg.split_at(64);
        let mut inner = self.inner;
        let mut block = [0u8; 64];
        block.copy_from_slice(head);
        compress(&mut inner, &block);
        compress(&mut inner, &final_block(tail, 128));
        self.finish(inner)
    }

    /// The outer hash over the inner digest, truncated.
    fn finish(&self, inner: [u32; 8]) -> [u8; TAG_LEN] {
        let mut digest = [0u8; 32];
        for (o, w) in digest.chunks_exact_mut(4).zip(inner) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        let mut outer = self.outer;
        compress(&mut outer, &final_block(&digest, 64));
        let mut tag = [0u8; TAG_LEN];
        for (o, w) in tag.chunks_exact_mut(4).zip(outer) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        tag
    }
}

/// Constant-time equality of two tags: one data-independent comparison of
/// their XOR, rather than one per byte.
pub(crate) fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let half = |t: &[u8; TAG_LEN], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&t[i..i + 8]);
        u64::from_ne_bytes(w)
    };
    let diff = (half(a, 0) ^ half(b, 0)) | (half(a, 8) ^ half(b, 8));
    bool::from(diff.ct_eq(&0))
}

/// Lay out a token from its fields and tag.
pub(crate) fn assemble(
    kind: TokenKind,
    key: KeyId,
    family: &FamilyId,
    generation: Generation,
    tag: &[u8; TAG_LEN],
) -> Token {
    let mut raw = [0u8; RAW_LEN];
    raw[0] = key.0;
    raw[1..17].copy_from_slice(&family.0);
    raw[17..21].copy_from_slice(&generation.0.to_be_bytes());
    raw[21..].copy_from_slice(tag);
    let mut bytes = [0u8; TOKEN_LEN];
    bytes[..PREFIX_LEN].copy_from_slice(kind.prefix());
    b64::encode(&raw, &mut bytes[PREFIX_LEN..]);
    Token { bytes }
}

/// base64url without padding for exactly a token's raw bytes (37 for
/// refresh tokens and codes, 61 for access tokens: both one byte past a
/// whole number of 3-byte groups). A fixed shape needs no general codec:
/// this one is branch-free per character and rejects non-canonical
/// spellings (non-zero trailing bits).
pub(crate) mod b64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    /// Longest raw input: the decoder's scratch buffer is sized by it.
    const MAX_RAW: usize = 64;

    /// The encoded length of `raw` bytes (`raw % 3 == 1`).
    pub(crate) const fn encoded_len(raw: usize) -> usize {
        raw / 3 * 4 + 2
    }

    /// Character → 6-bit value, 0xFF for characters outside the alphabet.
    const DECODE: [u8; 256] = {
        let mut t = [0xFFu8; 256];
        let mut i = 0;
        while i < 64 {
            t[ALPHABET[i] as usize] = i as u8;
            i += 1;
        }
        t
    };

    pub(crate) fn encode<const RAW: usize>(raw: &[u8; RAW], out: &mut [u8]) {
        const { assert!(RAW % 3 == 1 && RAW <= MAX_RAW) };
        debug_assert_eq!(out.len(), encoded_len(RAW));
        for (chunk, o) in raw.chunks_exact(3).zip(out.chunks_exact_mut(4)) {
            let n = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
            o[0] = ALPHABET[(n >> 18) as usize & 63];
            o[1] = ALPHABET[(n >> 12) as usize & 63];
            o[2] = ALPHABET[(n >> 6) as usize & 63];
            o[3] = ALPHABET[n as usize & 63];
        }
        // RAW = 3k + 1: the last byte is two characters, 4 zero bits.
        let last = raw[RAW - 1];
        let len = encoded_len(RAW);
        out[len - 2] = ALPHABET[(last >> 2) as usize];
        out[len - 1] = ALPHABET[((last & 3) << 4) as usize];
    }

    /// [`DECODE`] shifted to each character's place in a group of four, so
    /// a group is four loads and three ORs; bit 31 marks a character
    /// outside the alphabet.
    const fn placed(shift: u32) -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut c = 0;
        while c < 256 {
            t[c] = match DECODE[c] {
                0xFF => 1 << 31,
                v => (v as u32) << shift,
            };
            c += 1;
        }
        t
    }

    static PLACED: [[u32; 256]; 4] = [placed(18), placed(12), placed(6), placed(0)];

    pub(crate) fn decode<const RAW: usize>(s: &[u8]) -> Option<[u8; RAW]> {
        const { assert!(RAW % 3 == 1 && RAW <= MAX_RAW) };
        if s.len() != encoded_len(RAW) {
            return None;
        }
        let (groups, tail) = s.split_at(encoded_len(RAW) - 2);
        // Three bytes per group, each written as four (the fourth is
        // overwritten by the next group or lies past the token).
        let mut wide = [0u8; MAX_RAW + 3];
        let mut bad = 0u32;
        for (g, c) in groups.chunks_exact(4).enumerate() {
            let n = PLACED[0][c[0] as usize]
                | PLACED[1][c[1] as usize]
                | PLACED[2][c[2] as usize]
                | PLACED[3][c[3] as usize];
            bad |= n;
            wide[3 * g..3 * g + 4].copy_from_slice(&(n << 8).to_be_bytes());
        }
        let a = DECODE[tail[0] as usize];
        let b = DECODE[tail[1] as usize];
        // Valid values are < 64, so bit 7 of a value (bit 31 of a group) is
        // set only by an invalid character; the low 4 bits of the final
        // character must be zero.
        if bad >> 31 != 0 || (a | b) & 0x80 != 0 || b & 0x0F != 0 {
            return None;
        }
        let mut raw = [0u8; RAW];
        raw[..RAW - 1].copy_from_slice(&wide[..RAW - 1]);
        raw[RAW - 1] = a << 2 | b >> 4;
        Some(raw)
    }
}

/// Identifies key material for the life of the process: a key id can be
/// removed and re-added with other material, a uid never repeats. Families
/// cache their current tag together with the uid that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeyUid(u64);

impl KeyUid {
    /// No key: a cache stamped with this never matches.
    pub(crate) const NONE: KeyUid = KeyUid(0);

    fn next() -> KeyUid {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        KeyUid(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// The fields of a well-formed token. Nothing here is verified yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ParsedToken {
    pub(crate) kind: TokenKind,
    pub(crate) key: KeyId,
    pub(crate) family: FamilyId,
    pub(crate) generation: Generation,
    tag: [u8; TAG_LEN],
}

impl ParsedToken {
    /// Constant-time comparison with a tag known to be right.
    pub(crate) fn tag_is(&self, tag: &[u8; TAG_LEN]) -> bool {
        tags_equal(&self.tag, tag)
    }

    /// The token these fields spell (the fuzz targets check that parsing
    /// and this agree: every token has exactly one spelling).
    pub(crate) fn reassemble(&self) -> Token {
        assemble(
            self.kind,
            self.key,
            &self.family,
            self.generation,
            &self.tag,
        )
    }
}

/// Parse `s` as a token of `kind` without allocating. `None` means
/// malformed: wrong prefix, length, alphabet or non-canonical encoding.
pub(crate) fn parse(s: &str, kind: TokenKind) -> Option<ParsedToken> {
    let b = s.as_bytes();
    // Compared as one word (the kind is not secret).
    if b.len() != TOKEN_LEN || b[..PREFIX_LEN] != *kind.prefix() {
        return None;
    }
    // Non-zero trailing bits are refused, so every token has exactly one
    // spelling.
    let raw: [u8; RAW_LEN] = b64::decode(&b[PREFIX_LEN..])?;
    let mut family = [0u8; 16];
    family.copy_from_slice(&raw[1..17]);
    let mut generation = [0u8; 4];
    generation.copy_from_slice(&raw[17..21]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&raw[21..RAW_LEN]);
    Some(ParsedToken {
        kind,
        key: KeyId(raw[0]),
        family: FamilyId(family),
        generation: Generation(u32::from_be_bytes(generation)),
        tag,
    })
}

/// A token or code, stored inline (no heap allocation), readable as `&str`.
///
/// It is a bearer secret: `Debug` redacts it and there is no `Display`; send
/// it with [`Token::as_str`].
#[derive(Clone, Copy)]
pub struct Token {
    bytes: [u8; TOKEN_LEN],
}

impl Token {
    /// The token text to hand to the client.
    pub fn as_str(&self) -> &str {
        // Only ASCII (prefix and base64url alphabet) is ever written here.
        std::str::from_utf8(&self.bytes).expect("tokens are ASCII")
    }

    /// Which kind of token this is.
    pub fn kind(&self) -> TokenKind {
        if &self.bytes[..PREFIX_LEN] == TokenKind::Code.prefix() {
            TokenKind::Code
        } else {
            TokenKind::Refresh
        }
    }
}

impl Deref for Token {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Token {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        bool::from(self.bytes.ct_eq(&other.bytes))
    }
}

impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.kind() {
            TokenKind::Refresh => "rgt_",
            TokenKind::Code => "rgc_",
        };
        write!(f, "Token({prefix}<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::new(KeyId(7), &KeySecret::from_bytes([42; 32]))
    }

    fn secret() -> FamilySecret {
        FamilySecret([9; 16])
    }

    const FAM: FamilyId = FamilyId([1; 16]);

    /// The keyed-once MAC is HMAC-SHA-256 truncated, byte for byte: checked
    /// against the `hmac` crate over varied keys and messages.
    #[test]
    fn tag_is_truncated_hmac_sha256() {
        use hmac::{Hmac, Mac};
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut byte = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        };
        for _ in 0..200 {
            let key: [u8; 32] = std::array::from_fn(|_| byte());
            let msg: [u8; MAC_MSG_LEN] = std::array::from_fn(|_| byte());
            let mut reference = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
            reference.update(&msg);
            let full = reference.finalize().into_bytes();
            assert_eq!(MacKey::new(&key).tag(&msg)[..], full[..TAG_LEN]);
        }
    }

    /// Every byte of a tag counts, in either half.
    #[test]
    fn tags_differing_in_any_byte_are_unequal() {
        let a: [u8; TAG_LEN] = std::array::from_fn(|i| i as u8 * 17);
        assert!(tags_equal(&a, &a));
        for i in 0..TAG_LEN {
            for bit in [0x01, 0x80] {
                let mut b = a;
                b[i] ^= bit;
                assert!(!tags_equal(&a, &b), "byte {i} bit {bit:#x}");
            }
        }
    }

    /// Regression: slots were `u8` and saturated, so in a full ring of 256
    /// keys the key added last (position 256) shared position 255's MAC:
    /// its tokens were tagged, and verified, under another key.
    #[test]
    fn a_full_ring_of_256_keys_keeps_every_key_apart() {
        let secret_of = |i: u8| KeySecret::from_bytes([i; 32]);
        let mut full = KeyRing::new(KeyId(0), &secret_of(0));
        for i in 1..=255u8 {
            full.add(KeyId(i), &secret_of(i)).unwrap();
        }
        assert_eq!(full.ids().count(), 256);
        assert_eq!(
            full.add(KeyId(9), &secret_of(9)),
            Err(Error::DuplicateKey { id: KeyId(9) }),
            "a 257th key cannot exist: ids are unique u8s"
        );
        for i in [0u8, 1, 127, 254, 255] {
            let alone = KeyRing::new(KeyId(i), &secret_of(i));
            let t = full
                .mint(TokenKind::Refresh, KeyId(i), &FAM, Generation(3), &secret())
                .unwrap();
            assert_eq!(
                Some(t),
                alone.mint(TokenKind::Refresh, KeyId(i), &FAM, Generation(3), &secret()),
                "key {i} tags with its own secret"
            );
            assert!(alone.verify(&parse(&t, TokenKind::Refresh).unwrap(), &secret()));
        }
        // Removal renumbers positions; every key still tags with its own.
        full.remove(KeyId(3)).unwrap();
        let alone = KeyRing::new(KeyId(255), &secret_of(255));
        assert_eq!(
            full.mint(
                TokenKind::Refresh,
                KeyId(255),
                &FAM,
                Generation(1),
                &secret()
            ),
            alone.mint(
                TokenKind::Refresh,
                KeyId(255),
                &FAM,
                Generation(1),
                &secret()
            )
        );
    }

    #[test]
    fn mint_then_parse_round_trips() {
        let r = ring();
        let t = r
            .mint(TokenKind::Refresh, KeyId(7), &FAM, Generation(3), &secret())
            .unwrap();
        assert_eq!(t.len(), TOKEN_LEN);
        assert!(t.starts_with("rgt_"));
        let p = parse(&t, TokenKind::Refresh).unwrap();
        assert_eq!(p.family, FAM);
        assert_eq!(p.generation, Generation(3));
        assert_eq!(p.key, KeyId(7));
        assert!(r.verify(&p, &secret()));
        assert!(!r.verify(&p, &FamilySecret([8; 16])));
    }

    #[test]
    fn code_and_refresh_token_do_not_cross() {
        let r = ring();
        let code = r
            .mint(TokenKind::Code, KeyId(7), &FAM, Generation(0), &secret())
            .unwrap();
        assert!(code.starts_with("rgc_"));
        assert!(parse(&code, TokenKind::Refresh).is_none());
        // Same bytes under the other prefix: parses, but the tag is for another domain.
        let forged = format!("rgt_{}", &code[4..]);
        let p = parse(&forged, TokenKind::Refresh).unwrap();
        assert!(!r.verify(&p, &secret()));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let r = ring();
        let t = r
            .mint(TokenKind::Refresh, KeyId(7), &FAM, Generation(1), &secret())
            .unwrap();
        assert!(parse("", TokenKind::Refresh).is_none());
        assert!(parse(&t[..TOKEN_LEN - 1], TokenKind::Refresh).is_none());
        assert!(parse(&format!("{}A", t.as_str()), TokenKind::Refresh).is_none());
        assert!(parse(&format!("xgt_{}", &t[4..]), TokenKind::Refresh).is_none());
        let mut bad = t.as_str().to_owned();
        bad.replace_range(10..11, "+");
        assert!(
            parse(&bad, TokenKind::Refresh).is_none(),
            "non-url alphabet"
        );
        let mut bad = t.as_str().to_owned();
        bad.replace_range(10..11, "é");
        assert!(parse(&bad, TokenKind::Refresh).is_none(), "non-ascii");
    }

    #[test]
    fn non_canonical_trailing_bits_are_rejected() {
        let r = ring();
        let t = r
            .mint(TokenKind::Refresh, KeyId(7), &FAM, Generation(1), &secret())
            .unwrap();
        // The last character carries 2 data bits and 4 padding bits; set a padding bit.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let last = t.as_bytes()[TOKEN_LEN - 1];
        let idx = alphabet.iter().position(|&c| c == last).unwrap();
        let tweaked = alphabet[idx ^ 1] as char;
        let mut s = t.as_str().to_owned();
        s.pop();
        s.push(tweaked);
        assert!(parse(&s, TokenKind::Refresh).is_none());
    }

    /// The hand-written codec agrees with the base64 crate on every shape.
    #[test]
    fn b64_matches_the_base64_crate() {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut raw = [0u8; RAW_LEN];
        for seed in 0..2000u32 {
            for (i, b) in raw.iter_mut().enumerate() {
                *b = (seed.wrapping_mul(2_654_435_761).rotate_left(i as u32 % 32) >> 8) as u8
                    ^ i as u8;
            }
            let mut out = [0u8; B64_LEN];
            b64::encode(&raw, &mut out);
            assert_eq!(out.as_slice(), URL_SAFE_NO_PAD.encode(raw).as_bytes());
            assert_eq!(b64::decode(&out), Some(raw));
        }
        assert_eq!(b64::decode::<RAW_LEN>(&[b'A'; B64_LEN - 1]), None);
        assert_eq!(b64::decode::<RAW_LEN>(&[b'A'; B64_LEN + 1]), None);
        // Every byte outside the alphabet, at every position, is refused.
        let mut good = [0u8; B64_LEN];
        b64::encode(&raw, &mut good);
        for at in 0..B64_LEN {
            for c in 0..=255u8 {
                if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' {
                    continue;
                }
                let mut bad = good;
                bad[at] = c;
                assert_eq!(b64::decode::<RAW_LEN>(&bad), None, "{c:#04x} at {at}");
            }
        }
    }

    #[test]
    fn key_rotation_keeps_old_tokens_until_key_removed() {
        let mut r = ring();
        let old = r
            .mint(
                TokenKind::Refresh,
                r.active(),
                &FAM,
                Generation(1),
                &secret(),
            )
            .unwrap();
        r.add(KeyId(8), &KeySecret::from_bytes([43; 32])).unwrap();
        r.set_active(KeyId(8)).unwrap();
        let new = r
            .mint(
                TokenKind::Refresh,
                r.active(),
                &FAM,
                Generation(2),
                &secret(),
            )
            .unwrap();
        assert!(r.verify(&parse(&old, TokenKind::Refresh).unwrap(), &secret()));
        assert!(r.verify(&parse(&new, TokenKind::Refresh).unwrap(), &secret()));
        r.remove(KeyId(7)).unwrap();
        assert!(!r.verify(&parse(&old, TokenKind::Refresh).unwrap(), &secret()));
        assert!(r.verify(&parse(&new, TokenKind::Refresh).unwrap(), &secret()));
        assert!(matches!(
            r.remove(KeyId(8)),
            Err(Error::RemoveActiveKey { .. })
        ));
        assert!(matches!(
            r.add(KeyId(8), &KeySecret::from_bytes([0; 32])),
            Err(Error::DuplicateKey { .. })
        ));
        assert!(matches!(
            r.set_active(KeyId(1)),
            Err(Error::UnknownKey { .. })
        ));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let r = ring();
        let t = r
            .mint(TokenKind::Refresh, KeyId(7), &FAM, Generation(1), &secret())
            .unwrap();
        let d = format!(
            "{t:?} {r:?} {:?} {:?}",
            secret(),
            KeySecret::from_bytes([42; 32])
        );
        assert!(!d.contains(&t[4..]), "{d}");
        assert!(!d.contains("42, 42"), "{d}");
        assert!(!d.contains("9, 9"), "{d}");
        assert!(d.contains("redacted"));
    }
}
