//! The verifier alone, at exact timestamps; the HTTP answers and that a
//! refused proof spends nothing are in server/tests/dpop.rs.

use super::*;
use serde_json::json;

#[path = "../../tests/support/dpop_proof.rs"]
mod proof;
use proof::ProofKey;

const HTU: &str = "http://127.0.0.1:8080/oauth2/token";
const NOW: u64 = 1_800_000_000;

fn verifier(capacity: usize) -> ProofVerifier {
    let settings = DpopSettings {
        replay_capacity: capacity,
        ..DpopSettings::default()
    };
    ProofVerifier::new(
        &settings,
        HTU,
        Box::new(MemoryReplayCache::new(capacity)),
        NonceKey::new(&[9; 32]),
    )
    .unwrap()
}

fn check(v: &ProofVerifier, proof: &str, now: u64, nonce: bool) -> Result<Option<Jkt>, ProofError> {
    v.verify_now(&ProofRequest {
        values: &[proof.as_bytes()],
        method: "POST",
        now,
        nonce_required: nonce,
    })
}

/// Both algorithms verify, and the thumbprint is RFC 7638's over the
/// key's members (computed independently by the test helper).
#[test]
fn valid_proofs_give_the_rfc7638_thumbprint() {
    let v = verifier(16);
    for key in [ProofKey::es256(1), ProofKey::eddsa(1)] {
        let p = key.proof("POST", HTU, NOW, &format!("j-{}", key.alg()), None);
        let jkt = check(&v, &p, NOW, false).unwrap().unwrap();
        assert_eq!(jkt.to_base64url(), key.jkt(), "{}", key.alg());
    }
}

/// The window is inclusive at its ends: 60 s old and 10 s ahead pass,
/// one second more does not.
#[test]
fn iat_window_edges_are_exact() {
    let v = verifier(16);
    let k = ProofKey::es256(2);
    let p = |iat, jti: &str| k.proof("POST", HTU, iat, jti, None);
    assert!(check(&v, &p(NOW - 60, "a"), NOW, false).is_ok());
    assert_eq!(
        check(&v, &p(NOW - 61, "b"), NOW, false),
        Err(ProofError::IatTooOld)
    );
    assert!(check(&v, &p(NOW + 10, "c"), NOW, false).is_ok());
    assert_eq!(
        check(&v, &p(NOW + 11, "d"), NOW, false),
        Err(ProofError::IatAhead)
    );
}

/// A replay is caught for as long as the proof is inside its window,
/// including its last second; a fraction in `iat` is a NumericDate.
#[test]
fn a_replay_is_caught_through_the_last_second_of_the_window() {
    let v = verifier(16);
    let k = ProofKey::eddsa(3);
    let proof = k.proof("POST", HTU, NOW, "once", None);
    assert!(check(&v, &proof, NOW, false).is_ok());
    assert_eq!(check(&v, &proof, NOW, false), Err(ProofError::Replayed));
    assert_eq!(
        check(&v, &proof, NOW + 60, false),
        Err(ProofError::Replayed)
    );
    let frac = k.sign(
        &k.header(),
        &json!({"jti":"f","htm":"POST","htu":HTU,"iat":NOW as f64 + 0.5}),
    );
    assert!(check(&v, &frac, NOW, false).is_ok());
}

/// A nonce from two buckets ago is refused as not current; the one handed
/// out now passes.
#[test]
fn an_expired_nonce_is_refused_and_a_current_one_passes() {
    let v = verifier(16);
    let k = ProofKey::es256(4);
    let old = v.nonce(NOW - 2 * NONCE_BUCKET_SECS);
    let p = k.proof("POST", HTU, NOW, "n1", Some(&old));
    assert_eq!(
        check(&v, &p, NOW, true),
        Err(ProofError::Nonce { missing: false })
    );
    let p = k.proof("POST", HTU, NOW, "n2", None);
    assert_eq!(
        check(&v, &p, NOW, true),
        Err(ProofError::Nonce { missing: true })
    );
    let p = k.proof("POST", HTU, NOW, "n3", Some(&v.nonce(NOW)));
    assert!(check(&v, &p, NOW, true).is_ok());
}

/// A refused proof does not use up its `jti`: the same proof, fixed, is
/// accepted; and a full cache refuses rather than forgets.
#[test]
fn only_accepted_proofs_enter_the_replay_cache() {
    let v = verifier(1);
    let k = ProofKey::es256(5);
    let p = k.proof("POST", HTU, NOW, "same", None);
    assert!(matches!(
        check(&v, &p, NOW, true),
        Err(ProofError::Nonce { .. })
    ));
    assert!(check(&v, &p, NOW, false).is_ok());
    let q = k.proof("POST", HTU, NOW, "other", None);
    assert_eq!(check(&v, &q, NOW, false), Err(ProofError::ReplayCacheFull));
    assert_eq!(check(&v, &p, NOW, false), Err(ProofError::Replayed));
}

/// Messages name the check and never carry the proof.
#[test]
fn errors_name_the_check_without_quoting_the_proof() {
    let v = verifier(4);
    let k = ProofKey::eddsa(6);
    let p = k.proof("GET", HTU, NOW, "secret-jti", None);
    let e = check(&v, &p, NOW, false).unwrap_err();
    assert_eq!(e, ProofError::Htm);
    let text = e.to_string();
    assert!(text.contains("htm"), "{text}");
    assert!(!text.contains("secret-jti") && !text.contains(&p[..20]));
}

/// oauth4webapi signs Ed25519 proofs with `alg` `Ed25519` (RFC 9864's
/// fully-specified name) and was refused when only `EdDSA` was known; both
/// names now verify, each only when allowed.
#[test]
fn ed25519_under_its_rfc9864_name_verifies_when_allowed() {
    let k = ProofKey::eddsa(7);
    let mut header = k.header();
    header["alg"] = "Ed25519".into();
    let claims = |jti: &str| json!({"jti": jti, "htm": "POST", "htu": HTU, "iat": NOW});
    let v = verifier(4);
    let jkt = check(&v, &k.sign(&header, &claims("a")), NOW, false)
        .unwrap()
        .unwrap();
    assert_eq!(jkt.to_base64url(), k.jkt());
    let only_eddsa = ProofVerifier::new(
        &DpopSettings {
            algs: vec![DpopAlg::EdDsa],
            ..DpopSettings::default()
        },
        HTU,
        Box::new(MemoryReplayCache::new(4)),
        NonceKey::new(&[9; 32]),
    )
    .unwrap();
    assert_eq!(
        check(&only_eddsa, &k.sign(&header, &claims("b")), NOW, false),
        Err(ProofError::Alg)
    );
}

/// `typ` is a media type: its case does not matter and `application/` may
/// be spelt out (RFC 7515 §4.1.9); anything else is refused.
#[test]
fn typ_is_compared_as_a_media_type() {
    let v = verifier(8);
    let k = ProofKey::es256(8);
    for (i, (typ, ok)) in [
        ("DPoP+JWT", true),
        ("application/dpop+jwt", true),
        ("Application/DPOP+jwt", true),
        ("jwt", false),
        ("application/jwt", false),
        ("dpop+jwt2", false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut h = k.header();
        h["typ"] = typ.into();
        let p = k.sign(
            &h,
            &json!({"jti": format!("t{i}"), "htm": "POST", "htu": HTU, "iat": NOW}),
        );
        assert_eq!(check(&v, &p, NOW, false).is_ok(), ok, "{typ}");
    }
}
