//! Stateless DPoP server nonces (RFC 9449 §8): the nonce is a MAC of the
//! current time bucket under a key from the data directory, so any
//! instance holding the key can check it and nothing is stored per
//! client. A nonce is accepted during its bucket and the next one, so a
//! client that fetched one just before a bucket boundary is not refused.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Length of one time bucket, in seconds: a nonce lives 60–120 s.
pub const NONCE_BUCKET_SECS: u64 = 60;

/// Characters of a nonce: base64url of a 16-byte tag.
const NONCE_LEN: usize = 22;

/// The nonce key; `Debug` does not print it.
pub struct NonceKey(Hmac<Sha256>);

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

impl NonceKey {
    /// A key over 32 secret bytes.
    pub fn new(secret: &[u8; 32]) -> NonceKey {
        // HMAC takes keys of any length.
        NonceKey(Hmac::new_from_slice(secret).expect("HMAC accepts any key length"))
    }

    fn tag(&self, bucket: u64) -> [u8; 16] {
        let mut mac = self.0.clone();
        mac.update(b"refresh-guard dpop nonce v1\0");
        mac.update(&bucket.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// The nonce to hand out at `now` (seconds since the epoch).
    pub fn current(&self, now: u64) -> String {
        B64.encode(self.tag(now / NONCE_BUCKET_SECS))
    }

    /// Whether `nonce` was handed out in the current or the previous
    /// bucket; compared in constant time.
    pub fn accepts(&self, nonce: &str, now: u64) -> bool {
        if nonce.len() != NONCE_LEN {
            return false;
        }
        let mut presented = [0u8; 16];
        if !matches!(B64.decode_slice(nonce, &mut presented), Ok(16)) {
            return false;
        }
        let bucket = now / NONCE_BUCKET_SECS;
        let now_ok = presented.ct_eq(&self.tag(bucket));
        let prev_ok = presented.ct_eq(&self.tag(bucket.saturating_sub(1)));
        bool::from(now_ok | prev_ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted in its bucket and the next; refused two buckets on, under
    /// another key, or altered.
    #[test]
    fn a_nonce_lives_its_bucket_and_the_next() {
        let k = NonceKey::new(&[7; 32]);
        let n = k.current(6_000);
        assert_eq!(n.len(), NONCE_LEN);
        assert!(k.accepts(&n, 6_000));
        assert!(k.accepts(&n, 6_059));
        assert!(k.accepts(&n, 6_119), "previous bucket");
        assert!(!k.accepts(&n, 6_120), "expired");
        assert!(!NonceKey::new(&[8; 32]).accepts(&n, 6_000));
        let mut bad = n.clone().into_bytes();
        bad[0] = if bad[0] == b'A' { b'B' } else { b'A' };
        assert!(!k.accepts(std::str::from_utf8(&bad).unwrap(), 6_000));
        assert!(!k.accepts("", 6_000));
        assert_eq!(format!("{k:?}"), "NonceKey(..)");
    }
}
