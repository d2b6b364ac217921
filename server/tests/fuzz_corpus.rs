//! The server's fuzz corpus replayed without an instrumented build: every
//! file of fuzz/corpus/TARGET goes through the same body the fuzz target
//! runs (`refresh_guard_server::fuzzing`; FUZZING.md).

use std::fs;
use std::path::{Path, PathBuf};

use refresh_guard_server::fuzzing;

#[path = "support/dpop_proof.rs"]
mod dpop_proof;
use dpop_proof::ProofKey;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Feed every file of the target's corpus to `body`; at least one must be
/// there (an empty or misnamed corpus would pass silently otherwise).
fn replay(target: &str, body: fn(&[u8])) {
    let dir = corpus(target);
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = fs::read(&path).expect("corpus file");
        let run = std::panic::catch_unwind(|| body(&data));
        assert!(run.is_ok(), "{target}: {} fails", path.display());
        n += 1;
    }
    assert!(n > 0, "{}: empty corpus", dir.display());
}

#[test]
fn token_form_corpus() {
    replay("token_form", fuzzing::token_form);
}

#[test]
fn forwarded_for_corpus() {
    replay("forwarded_for", fuzzing::forwarded_for);
}

#[test]
fn dpop_proof_corpus() {
    replay("dpop_proof", fuzzing::dpop_proof);
}

/// Writes the hand-made seeds of the server's targets into fuzz/corpus
/// (`cargo test -p refresh-guard-server --test fuzz_corpus -- --ignored`).
#[test]
#[ignore = "writes the seed corpus"]
fn write_seeds() {
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus(target);
        fs::create_dir_all(&dir).expect("corpus directory");
        fs::write(dir.join(format!("seed-{name}")), data).expect("seed");
    };
    put(
        "token_form",
        "refresh",
        b"grant_type=refresh_token&refresh_token=rgt_AAAA&client_id=app&scope=openid+offline_access",
    );
    put(
        "token_form",
        "code",
        b"grant_type=authorization_code&code=rgc_x%2Dy&redirect_uri=https%3A%2F%2Fapp.example%2Fcb&code_verifier=abc&empty=",
    );
    put(
        "forwarded_for",
        "v4",
        b"\x01198.51.100.7, 10.1.2.3\n127.0.0.5",
    );
    put(
        "forwarded_for",
        "v6",
        b"\x03[2001:db8::1]:443 , ::ffff:10.0.0.1",
    );
    put("forwarded_for", "untrusted", b"\x00203.0.113.9:80");
    // DPoP: a whole ES256 proof, and header/claims pairs for the fuzz
    // body to sign with its keys (P-256 and Ed25519), one with a nonce.
    let seed = fuzzing::DPOP_KEY_SEED[0];
    let es = ProofKey::es256(seed);
    let ed = ProofKey::eddsa(seed);
    let claims = |nonce: Option<&str>| {
        let mut c = serde_json::json!({
            "jti": "seed-jti", "htm": "POST", "htu": fuzzing::DPOP_HTU, "iat": fuzzing::DPOP_NOW,
        });
        if let Some(n) = nonce {
            c["nonce"] = n.into();
        }
        c.to_string()
    };
    let proof = es.proof("POST", fuzzing::DPOP_HTU, fuzzing::DPOP_NOW, "seed", None);
    put(
        "dpop_proof",
        "es256-proof",
        &[&[0u8][..], proof.as_bytes()].concat(),
    );
    for (name, mode, key, nonce) in [
        ("es256-parts", 1u8, &es, None),
        ("ed25519-parts", 3, &ed, None),
        ("es256-nonce", 5, &es, Some("AAAAAAAAAAAAAAAAAAAAAA")),
    ] {
        let mut data = vec![mode];
        data.extend_from_slice(key.header().to_string().as_bytes());
        data.push(0xff);
        data.extend_from_slice(claims(nonce).as_bytes());
        put("dpop_proof", name, &data);
    }
}
