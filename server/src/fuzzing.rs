//! The bodies of the server's fuzz targets (`fuzz/fuzz_targets/`), here so
//! that `server/tests/fuzz_corpus.rs` replays the committed corpus through
//! exactly the code the fuzzer ran (FUZZING.md). Each takes the fuzzer's
//! raw bytes and panics when a property fails.

use std::fmt::Write as _;
use std::net::IpAddr;

use refresh_guard::AllowList;

/// The form parser of the OAuth endpoints' bodies and query strings.
pub use crate::form::{Form, FormError, MAX_PARAMS, parse as parse_form};

/// `token_form`: the form parser never panics; what it accepts holds each
/// parameter once with a non-empty value, and spelled again with every
/// byte percent-encoded it parses to the same form.
pub fn token_form(data: &[u8]) {
    let Ok(f) = parse_form(data) else {
        return;
    };
    let names: Vec<&str> = f.names().collect();
    assert_eq!(names.len(), f.len());
    assert!(f.len() <= MAX_PARAMS);
    let mut again = String::new();
    for (i, n) in names.iter().enumerate() {
        assert!(!names[..i].contains(n), "{n} twice");
        let v = f.get(n).expect("a listed name has a value");
        assert!(!v.is_empty());
        if i > 0 {
            again.push('&');
        }
        for b in n.bytes() {
            write!(again, "%{b:02X}").expect("String");
        }
        again.push('=');
        for b in v.bytes() {
            write!(again, "%{b:02X}").expect("String");
        }
    }
    assert_eq!(
        parse_form(again.as_bytes()).as_ref(),
        Ok(&f),
        "no round trip"
    );
}

/// `forwarded_for`: the first byte picks the TCP peer (bit 0: a trusted
/// proxy; bit 1: spelled as an IPv4-mapped IPv6 address), the rest are
/// `X-Forwarded-For` header lines separated by `\n`. The answer is the
/// peer when it is not a trusted proxy; otherwise none, or an untrusted
/// address that one of the hops names; and several header lines read as
/// their comma-joined value (RFC 9110 §5.3).
pub fn forwarded_for(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let trusted = AllowList::new(&[
        "127.0.0.0/8".parse().expect("CIDR"),
        "10.0.0.0/8".parse().expect("CIDR"),
    ]);
    let peer: IpAddr = match (flags & 1 == 1, flags & 2 == 2) {
        (true, false) => [127, 0, 0, 1].into(),
        (true, true) => "::ffff:127.0.0.1".parse().expect("IP"),
        (false, false) => [203, 0, 113, 1].into(),
        (false, true) => "::ffff:203.0.113.1".parse().expect("IP"),
    };
    let lines: Vec<&[u8]> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split(|&b| b == b'\n').collect()
    };
    let got = crate::forwarded_client(peer, Some(&trusted), lines.iter().copied());
    if !trusted.contains(peer.to_canonical()) {
        assert_eq!(
            got,
            Some(peer.to_canonical()),
            "an untrusted peer is the client"
        );
        return;
    }
    if let Some(ip) = got {
        assert!(
            !trusted.contains(ip),
            "a trusted proxy taken for the client"
        );
        let named = lines
            .iter()
            .flat_map(|l| l.split(|&b| b == b','))
            .any(|hop| crate::parse_hop(hop).map(|h| h.to_canonical()) == Some(ip));
        assert!(named, "{ip} is in no hop");
    }
    let joined = lines.join(&b","[..]);
    let one = (!lines.is_empty()).then_some(joined.as_slice());
    assert_eq!(
        crate::forwarded_client(peer, Some(&trusted), one.into_iter()),
        got,
        "header lines read differently from their comma-joined value"
    );
}

/// The DPoP proof verifier of the token endpoint (server/src/dpop).
pub use crate::dpop::{ProofError, ProofRequest, ProofVerifier};

/// The token endpoint and the time `dpop_proof` checks proofs against.
pub const DPOP_HTU: &str = "https://as.example/oauth2/token";
/// Seconds since the epoch for `dpop_proof`.
pub const DPOP_NOW: u64 = 1_800_000_000;
/// The seed of the keys `dpop_proof` signs with (P-256 scalar and Ed25519
/// seed alike), so that seeds can carry their public JWKs.
pub const DPOP_KEY_SEED: [u8; 32] = [1; 32];

/// `dpop_proof`: the first byte picks the mode (bit 0: the rest is a
/// JOSE header and claims separated by `0xff`, signed here, so that the
/// checks after the signature are reached; bit 1: with Ed25519 rather
/// than P-256; bit 2: the client needs a nonce), the rest is the proof.
/// The verifier never panics; a proof it accepts is refused as replayed
/// the second time, and one it refuses is refused again the same way.
pub fn dpop_proof(data: &[u8]) {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let verifier = ProofVerifier::new(
        &crate::dpop::DpopSettings::default(),
        DPOP_HTU,
        Box::new(crate::dpop::MemoryReplayCache::new(4)),
        crate::dpop::NonceKey::new(&[2; 32]),
    )
    .expect("a valid endpoint");
    let proof: Vec<u8> = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let (header, claims) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let input = format!("{}.{}", B64.encode(header), B64.encode(claims));
        let signature = if mode & 2 == 0 {
            use p256::ecdsa::signature::Signer as _;
            let key = p256::ecdsa::SigningKey::from_slice(&DPOP_KEY_SEED).expect("a scalar");
            let s: p256::ecdsa::Signature = key.sign(input.as_bytes());
            s.to_bytes().to_vec()
        } else {
            use ed25519_dalek::Signer as _;
            let key = ed25519_dalek::SigningKey::from_bytes(&DPOP_KEY_SEED);
            key.sign(input.as_bytes()).to_bytes().to_vec()
        };
        format!("{input}.{}", B64.encode(signature)).into_bytes()
    };
    let req = ProofRequest {
        values: &[&proof],
        method: "POST",
        now: DPOP_NOW,
        nonce_required: mode & 4 != 0,
    };
    match verifier.verify_now(&req) {
        Ok(Some(_)) => assert_eq!(
            verifier.verify_now(&req),
            Err(ProofError::Replayed),
            "an accepted proof accepted twice"
        ),
        Ok(None) => panic!("a DPoP header read as none"),
        // A refusal changes nothing: the same proof is refused the same
        // way again (its `jti` was not used up). No error can echo the
        // proof: `ProofError` holds only static text and a count.
        Err(e) => assert_eq!(verifier.verify_now(&req), Err(e), "a refusal changed state"),
    }
}
