//! The binary form of a family record, shared by every store.
//!
//! Versioned, length-checked, no serde: a store must decode exactly what it
//! wrote, and reject (not guess at) anything else. The tag cache is never
//! written: a store holds no redeemable token.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::clock::Timestamp;
use crate::code::{self, Challenge, CodeState};
use crate::dpop::Jkt;
use crate::family::{Family, Grant, RevokeReason, Status, SubjectName};
use crate::token::{FamilyId, FamilySecret, Generation, KeyId, KeyUid};

const FORMAT: u8 = 1;

fn reason_code(r: RevokeReason) -> u8 {
    match r {
        RevokeReason::ReuseDetected => 1,
        RevokeReason::SubjectReuse => 2,
        RevokeReason::CodeReplay => 3,
        RevokeReason::CapEviction => 4,
        RevokeReason::Requested => 5,
        RevokeReason::SubjectRevoked => 6,
        RevokeReason::ClientRevoked => 7,
    }
}

fn reason_from(c: u8) -> Option<RevokeReason> {
    Some(match c {
        1 => RevokeReason::ReuseDetected,
        2 => RevokeReason::SubjectReuse,
        3 => RevokeReason::CodeReplay,
        4 => RevokeReason::CapEviction,
        5 => RevokeReason::Requested,
        6 => RevokeReason::SubjectRevoked,
        7 => RevokeReason::ClientRevoked,
        _ => return None,
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Lengths are bounded at issue (client 255, subject 1024, scope 4096,
    // redirect URI 2048), so u16 always fits.
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Append the record of `f` to `out`.
pub(crate) fn encode(f: &Family, out: &mut Vec<u8>) {
    out.push(FORMAT);
    out.extend_from_slice(f.id.as_bytes());
    out.extend_from_slice(&f.secret.0);
    for t in [f.created, f.last_used, f.rotated_at] {
        out.extend_from_slice(&t.as_millis().to_le_bytes());
    }
    out.extend_from_slice(&f.generation.get().to_le_bytes());
    out.push(f.key.0);
    out.push(f.grace_used);
    match f.rotation_ip {
        None => out.push(0),
        Some(IpAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
    match f.status() {
        Status::Active => out.push(0),
        Status::Revoked { reason, at } => {
            out.push(reason_code(reason));
            out.extend_from_slice(&at.as_millis().to_le_bytes());
        }
    }
    // Code state: 0 none; 4, 5, 6 (no challenge, S256, plain), then the
    // issue time, the redirect URI's digest and the challenge's. 1-3 are
    // the earlier form (verbatim redirect URI and plain challenge), still
    // read.
    match f.code.as_deref() {
        None => out.push(0),
        Some(c) => {
            let (tag, challenge) = match &c.challenge {
                None => (4, None),
                Some(Challenge::S256(h)) => (5, Some(h)),
                Some(Challenge::Plain(h)) => (6, Some(h)),
            };
            out.push(tag);
            out.extend_from_slice(&c.issued.as_millis().to_le_bytes());
            out.extend_from_slice(&c.redirect_uri);
            if let Some(h) = challenge {
                out.extend_from_slice(h);
            }
        }
    }
    put_str(out, f.client());
    put_str(out, f.subject.as_str());
    put_str(out, f.scope());
    // Optional trailer, so that an unbound family's record is exactly what
    // it was before DPoP binding existed, and a record written then still
    // decodes (docs/store.md "Records"): `1` and the 32-byte RFC 7638
    // thumbprint of the key the family is bound to.
    if let Some(jkt) = f.jkt() {
        out.push(JKT);
        out.extend_from_slice(jkt.as_bytes());
    }
}

/// The trailer tag of a DPoP-bound family's key thumbprint.
const JKT: u8 = 1;

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn arr<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.arr()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = u16::from_le_bytes(self.arr()?) as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Decode one record; `None` if it is not exactly a well-formed record.
pub(crate) fn decode(bytes: &[u8]) -> Option<Family> {
    let mut r = Reader { b: bytes };
    if r.u8()? != FORMAT {
        return None;
    }
    let id = FamilyId::from_bytes(r.arr()?);
    let secret = FamilySecret(r.arr()?);
    let created = Timestamp::from_millis(r.u64()?);
    let last_used = Timestamp::from_millis(r.u64()?);
    let rotated_at = Timestamp::from_millis(r.u64()?);
    let generation = Generation::new(u32::from_le_bytes(r.arr()?));
    let key = KeyId(r.u8()?);
    let grace_used = r.u8()?;
    let rotation_ip = match r.u8()? {
        0 => None,
        4 => Some(IpAddr::V4(Ipv4Addr::from(r.arr::<4>()?))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(r.arr::<16>()?))),
        _ => return None,
    };
    let status = match r.u8()? {
        0 => Status::Active,
        c => Status::Revoked {
            reason: reason_from(c)?,
            at: Timestamp::from_millis(r.u64()?),
        },
    };
    let code = match r.u8()? {
        0 => None,
        // The earlier form, written only before an exchange (when the
        // family's `created` is the code's issue time).
        c @ 1..=3 => {
            let challenge = match c {
                1 => None,
                2 => Some(Challenge::S256(r.arr()?)),
                _ => Some(Challenge::Plain(code::sha256(r.str()?))),
            };
            let redirect_uri = r.str()?;
            Some(Box::new(CodeState::new(created, redirect_uri, challenge)))
        }
        c @ 4..=6 => {
            let issued = Timestamp::from_millis(r.u64()?);
            let redirect_uri = r.arr()?;
            let challenge = match c {
                4 => None,
                5 => Some(Challenge::S256(r.arr()?)),
                _ => Some(Challenge::Plain(r.arr()?)),
            };
            Some(Box::new(CodeState {
                issued,
                redirect_uri,
                challenge,
            }))
        }
        _ => return None,
    };
    let client = r.str()?;
    let subject = SubjectName::new(r.str()?);
    let scope = r.str()?;
    let jkt = match r.b {
        [] => None,
        [JKT, ..] => {
            r.take(1)?;
            Some(Jkt::from_bytes(r.arr()?))
        }
        _ => return None,
    };
    if !r.b.is_empty() {
        return None;
    }
    let mut f = Family {
        id,
        secret,
        grant: Arc::new(Grant {
            jkt,
            ..Grant::new(client, scope)
        }),
        subject,
        created,
        last_used,
        rotated_at,
        generation,
        key,
        tag: [0; 16],
        tag_uid: KeyUid::NONE,
        grace_used,
        rotation_ip,
        revoked: None,
        code,
        lsn: 0,
    };
    f.set_status(status);
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Family {
        Family {
            id: FamilyId::from_bytes([3; 16]),
            secret: FamilySecret([4; 16]),
            grant: Arc::new(Grant::new("c", "openid offline_access")),
            subject: SubjectName::new("sübject"),
            created: Timestamp::from_millis(1),
            last_used: Timestamp::from_millis(2),
            rotated_at: Timestamp::from_millis(3),
            generation: Generation::new(77),
            key: KeyId(9),
            tag: [5; 16],
            tag_uid: KeyUid::NONE,
            grace_used: 2,
            rotation_ip: Some("2001:db8::1".parse().unwrap()),
            revoked: Some(RevokeReason::CapEviction),
            code: Some(Box::new(CodeState::new(
                Timestamp::from_millis(1),
                "https://a/cb",
                Some(Challenge::Plain(code::sha256(&"x".repeat(43)))),
            ))),
            lsn: 0,
        }
    }

    #[test]
    fn round_trip_keeps_everything_but_the_tag_cache() {
        let f = sample();
        let mut b = Vec::new();
        encode(&f, &mut b);
        let g = decode(&b).unwrap();
        let mut b2 = Vec::new();
        encode(&g, &mut b2);
        assert_eq!(b, b2);
        assert_eq!(g.tag, [0; 16], "the tag cache is not persisted");
        assert!(!b.windows(16).any(|w| w == [5; 16]));
    }

    /// A revoked record keeps its revocation time, also one written with a
    /// different last-rotation time beside it (the record keeps one time
    /// for both once revoked).
    #[test]
    fn revoked_records_keep_their_revocation_time() {
        let mut f = sample();
        f.rotated_at = Timestamp::from_millis(3);
        let mut b = Vec::new();
        encode(&f, &mut b);
        // The status time is the record's last 8-byte field before the
        // code state: rewrite it as an older writer with a separate
        // revocation time would have.
        let at = 3u64.to_le_bytes();
        let pos = b
            .windows(9)
            .position(|w| w[0] == reason_code(RevokeReason::CapEviction) && w[1..] == at)
            .expect("status with its time");
        b[pos + 1..pos + 9].copy_from_slice(&4u64.to_le_bytes());
        let g = decode(&b).unwrap();
        assert_eq!(
            g.status(),
            Status::Revoked {
                reason: RevokeReason::CapEviction,
                at: Timestamp::from_millis(4)
            }
        );
    }

    /// Records written before code state was kept past the exchange (a
    /// verbatim redirect URI and plain challenge, tags 1-3) still decode,
    /// with the family's `created` as the code's issue time: an existing
    /// data directory must still start.
    #[test]
    fn records_with_the_earlier_code_form_still_decode() {
        let mut f = sample();
        f.code = None;
        f.created = Timestamp::from_millis(7);
        let mut none = Vec::new();
        encode(&f, &mut none);
        // The code byte comes right before client, subject and scope.
        let tail = 6 + f.client().len() + f.subject.as_str().len() + f.scope().len();
        let at = none.len() - tail - 1;
        assert_eq!(none[at], 0);
        let plain = "p".repeat(43);
        let with = |challenge: &[u8]| {
            let mut b = none[..at].to_vec();
            b.extend_from_slice(challenge);
            put_str(&mut b, "https://a/cb");
            b.extend_from_slice(&none[at + 1..]);
            decode(&b).expect("decodes").code.expect("code state")
        };
        let mut s256 = vec![2];
        s256.extend_from_slice(&[9; 32]);
        let mut old_plain = vec![3];
        put_str(&mut old_plain, &plain);
        let issued = Timestamp::from_millis(7);
        for (bytes, challenge) in [
            (vec![1], None),
            (s256, Some(Challenge::S256([9; 32]))),
            (old_plain, Some(Challenge::Plain(code::sha256(&plain)))),
        ] {
            let want = CodeState::new(issued, "https://a/cb", challenge);
            assert_eq!(*with(&bytes), want);
        }
    }

    /// A DPoP-bound family's thumbprint is an optional trailer: an
    /// unbound family's record is what the format wrote before binding
    /// existed (so both directions read the other's unbound records), and
    /// a bound one round-trips with its key.
    #[test]
    fn the_dpop_thumbprint_is_an_optional_trailer() {
        let mut f = sample();
        let mut unbound = Vec::new();
        encode(&f, &mut unbound);
        assert!(decode(&unbound).unwrap().jkt().is_none());
        f.bind(Jkt::from_bytes([0xa5; 32]));
        let mut bound = Vec::new();
        encode(&f, &mut bound);
        assert_eq!(bound.len(), unbound.len() + 33);
        assert_eq!(bound[..unbound.len()], unbound[..]);
        let g = decode(&bound).unwrap();
        assert_eq!(g.jkt(), Some(&Jkt::from_bytes([0xa5; 32])));
        // An unknown trailer, or a cut one, is refused, not guessed at.
        let mut other = unbound.clone();
        other.push(2);
        other.extend_from_slice(&[0xa5; 32]);
        assert!(decode(&other).is_none());
        for n in unbound.len() + 1..bound.len() {
            assert!(decode(&bound[..n]).is_none(), "cut at {n}");
        }
    }

    #[test]
    fn truncated_or_padded_records_are_rejected() {
        let mut b = Vec::new();
        encode(&sample(), &mut b);
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_none(), "prefix {n}");
        }
        b.push(0);
        assert!(decode(&b).is_none());
    }
}
