//! The fuzz corpus replayed without an instrumented build: every file of
//! fuzz/corpus/TARGET goes through the same body the fuzz target runs
//! (`refresh_guard::fuzzing`), so CI keeps every input the campaign found
//! interesting passing (FUZZING.md). The server's targets replay in
//! server/tests/fuzz_corpus.rs.

use std::fs;
use std::path::{Path, PathBuf};

use refresh_guard::fuzzing;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
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
fn redeem_token_corpus() {
    replay("redeem_token", fuzzing::redeem_token);
}

#[test]
fn verify_access_token_corpus() {
    replay("verify_access_token", fuzzing::verify_access_token);
}

#[test]
fn exchange_code_corpus() {
    replay("exchange_code", fuzzing::exchange_code);
}

#[test]
fn store_record_corpus() {
    replay("store_record", fuzzing::store_record);
}

#[test]
fn policy_toml_corpus() {
    replay("policy_toml", fuzzing::policy_toml);
}

#[cfg(feature = "durable")]
#[test]
fn log_segment_corpus() {
    replay("log_segment", fuzzing::log_segment);
}

/// A segment the store writes today, whole, cut and bit-flipped: the seed
/// the committed corpus started from, kept current with the format.
#[cfg(feature = "durable")]
#[test]
fn a_fresh_segment_and_its_damage() {
    let seg = fuzzing::sample_segment();
    assert!(!seg.is_empty());
    for flags in [0u8, 1] {
        let mut input = vec![flags];
        input.extend_from_slice(&seg);
        fuzzing::log_segment(&input);
        fuzzing::log_segment(&input[..input.len() - 5]);
        for at in [9, 13, 30, input.len() / 2, input.len() - 1] {
            let mut bad = input.clone();
            bad[at] ^= 0x40;
            fuzzing::log_segment(&bad);
        }
    }
}

/// Writes the hand-made seeds of every library target into fuzz/corpus
/// (`cargo test --test fuzz_corpus -- --ignored`); a campaign starts from
/// them, and `cargo fuzz cmin` keeps what adds coverage (FUZZING.md).
#[cfg(feature = "durable")]
#[test]
#[ignore = "writes the seed corpus"]
fn write_seeds() {
    use refresh_guard::{Engine, IssueRequest};
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus(target);
        fs::create_dir_all(&dir).expect("corpus directory");
        fs::write(dir.join(format!("seed-{name}")), data).expect("seed");
    };
    let e = Engine::builder().build().expect("engine");
    let t = e
        .issue(&IssueRequest {
            client: "c",
            subject: "s",
            scope: "",
            ip: None,
        })
        .expect("issue")
        .accepted()
        .expect("issued")
        .token;
    put("redeem_token", "token", t.as_bytes());
    put(
        "redeem_token",
        "code",
        t.replacen("rgt_", "rgc_", 1).as_bytes(),
    );
    let code = t.replacen("rgt_", "rgc_", 1);
    put(
        "exchange_code",
        "code",
        format!("{code}\0https://app.example/cb\0dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
            .as_bytes(),
    );
    let seg = fuzzing::sample_segment();
    let mut input = vec![1u8];
    input.extend_from_slice(&seg);
    put("log_segment", "resealed", &input);
    input[0] = 0;
    put("log_segment", "plain", &input);
    // The first record's payload: the family record codec's input.
    let len = u32::from_le_bytes(seg[..4].try_into().expect("4 bytes")) as usize;
    put("store_record", "family", &seg[8 + 9..8 + len]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut files = vec![root.join("default.toml")];
    for ex in fs::read_dir(root.join("examples")).expect("examples") {
        let ex = ex.expect("entry").path();
        for f in fs::read_dir(&ex).expect("example") {
            files.push(f.expect("entry").path());
        }
    }
    for (i, f) in files.iter().enumerate() {
        let text = fs::read(f).expect("policy");
        let mut two = text.clone();
        two.push(0);
        two.extend_from_slice(&fs::read(&files[(i + 1) % files.len()]).expect("policy"));
        put("policy_toml", &format!("{i}"), &two);
    }
}
