//! DPoP proof verification per token request (BENCHMARKS.md "DPoP proof
//! verification"): parse, signature, thumbprint and the replay cache, for
//! ES256 and EdDSA side by side. Proofs are signed in the untimed setup,
//! each with its own `jti`, as clients send them.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use refresh_guard_server::dpop::{
    DpopSettings, MemoryReplayCache, NonceKey, ProofRequest, ProofVerifier,
};

#[path = "../tests/support/dpop_proof.rs"]
mod proof;
use proof::ProofKey;

const HTU: &str = "https://as.example/oauth2/token";
const NOW: u64 = 1_800_000_000;

fn verify(c: &mut Criterion) {
    let settings = DpopSettings::default();
    let verifier = ProofVerifier::new(
        &settings,
        HTU,
        // Room for every proof of the run: none is refused as full.
        Box::new(MemoryReplayCache::new(1 << 24)),
        NonceKey::new(&[1; 32]),
    )
    .expect("a valid endpoint");
    let jti = AtomicU64::new(0);
    let mut g = c.benchmark_group("dpop_verify");
    g.throughput(Throughput::Elements(1));
    for key in [ProofKey::es256(7), ProofKey::eddsa(7)] {
        g.bench_function(key.alg(), |b| {
            b.iter_batched(
                || {
                    let n = jti.fetch_add(1, Ordering::Relaxed);
                    key.proof("POST", HTU, NOW, &format!("jti-{n:016x}"), None)
                },
                |p| {
                    let jkt = verifier
                        .verify_now(&ProofRequest {
                            values: &[p.as_bytes()],
                            method: "POST",
                            now: NOW,
                            nonce_required: false,
                        })
                        .expect("a valid proof");
                    black_box(jkt)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
