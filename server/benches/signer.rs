//! Ed25519 signing of an access token's JWS signing input (a real token's
//! header and claims, as `refresh-guard serve` mints them), by each signer
//! a Rust server could use. Ed25519 is deterministic (RFC 8032 §5.1.6), so
//! every one of them must produce the same 64 bytes; the bench checks that
//! before it measures.
//!
//! - `aws-lc-rs`: `aws_lc_rs::signature::Ed25519KeyPair::sign`
//!   (`AccessTokenSigner::sign` uses it);
//! - `dalek/sign`: `ed25519_dalek::SigningKey::sign`, what the server used
//!   before: it re-derives the expanded key (one SHA-512 of the seed) per
//!   signature;
//! - `dalek/expanded`: `ed25519_dalek::hazmat::raw_sign` with the expanded
//!   key computed once;
//! - `ring`: `ring::signature::Ed25519KeyPair::sign`, BoringSSL's
//!   field arithmetic with its x86-64 assembly.
//!
//! The bench's numbers, and why the server signs with aws-lc-rs:
//! BENCHMARKS.md "Ed25519 signers".
//!
//! `cargo build --profile bench -p refresh-guard-server --bench signer`,
//! then run the binary with `--bench` (criterion's options apply).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signer, SigningKey};
use refresh_guard_server::{AccessClaims, AccessTokenSigner};

const SEED: [u8; 32] = [7; 32];

/// The signing input (header.payload) of a typical access token.
fn signing_input() -> Vec<u8> {
    let signer = AccessTokenSigner::new(&SEED);
    let jwt = signer.sign(&AccessClaims {
        iss: "http://127.0.0.1:8080".into(),
        sub: "user-4242".into(),
        aud: "bench-app".into(),
        exp: 1_764_547_500,
        iat: 1_764_547_200,
        jti: "Qm9uam91ciwgbW9uZGUh".into(),
        client_id: "bench-app".into(),
        scope: "openid offline_access".into(),
        cnf: None,
    });
    let (input, _) = jwt.rsplit_once('.').expect("a compact JWS");
    input.as_bytes().to_vec()
}

fn signers(c: &mut Criterion) {
    let msg = signing_input();
    let dalek = SigningKey::from_bytes(&SEED);
    let expanded = ed25519_dalek::hazmat::ExpandedSecretKey::from(&SEED);
    let public = dalek.verifying_key();
    let ring = ring::signature::Ed25519KeyPair::from_seed_unchecked(&SEED).expect("seed");
    let aws = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&SEED).expect("seed");

    // Deterministic: the same signature from every signer.
    let reference = dalek.sign(&msg).to_bytes();
    let raw = ed25519_dalek::hazmat::raw_sign::<sha2::Sha512>(&expanded, &msg, &public);
    assert_eq!(raw.to_bytes(), reference, "dalek/expanded");
    assert_eq!(ring.sign(&msg).as_ref(), reference, "ring");
    assert_eq!(aws.sign(&msg).as_ref(), reference, "aws-lc-rs");

    let mut g = c.benchmark_group("sign_access_token");
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("aws-lc-rs/{}B", msg.len()), |b| {
        b.iter(|| aws.sign(black_box(&msg)))
    });
    g.bench_function(format!("dalek/sign/{}B", msg.len()), |b| {
        b.iter(|| dalek.sign(black_box(&msg)))
    });
    g.bench_function(format!("dalek/expanded/{}B", msg.len()), |b| {
        b.iter(|| {
            ed25519_dalek::hazmat::raw_sign::<sha2::Sha512>(&expanded, black_box(&msg), &public)
        })
    });
    g.bench_function(format!("ring/{}B", msg.len()), |b| {
        b.iter(|| ring.sign(black_box(&msg)))
    });
    g.finish();
}

criterion_group!(benches, signers);
criterion_main!(benches);
