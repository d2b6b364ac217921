//! What a refresh-token rotation is measured against, each doing the same
//! operation as `redeem/rotate` (redeem a random family's current token,
//! keep the successor) on a table of the same size:
//!
//! - `floor`: one random lookup-and-update in a hash table plus one
//!   HMAC-SHA-256 of a token's bytes, the least any design does here (the
//!   HMAC keyed once and run as two bare SHA-256 compressions, as the
//!   engine's own is; checked against `hmac` when built);
//! - `oxide_auth`: oxide-auth 0.6's `TokenMap` behind a `Mutex`, on the path
//!   its refresh endpoint takes (`recover_refresh`, the grant's checks, then
//!   `Issuer::refresh` with `RandomGenerator`): the store of the Rust OAuth
//!   library a user would otherwise pick;
//! - `naive`: a `Mutex<HashMap>` keyed by the SHA-256 of random 32-byte
//!   tokens, rotating by remove and insert, as one would write it by hand.
//!
//! Neither store detects reuse or offers grace: a rotated token is simply
//! unknown afterwards. They are here for the cost of the common path only.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use oxide_auth::primitives::grant::{Extensions, Grant};
use oxide_auth::primitives::prelude::{Issuer, RandomGenerator, TokenMap};
use rand_chacha::ChaCha12Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use super::{CLIENT, next, run_parts};

/// The floor: the table of families and the MAC key.
pub struct Floor {
    table: HashMap<[u8; 16], [u64; 8], ahash::RandomState>,
    keys: Vec<[u8; 16]>,
    mac: FloorMac,
}

/// HMAC-SHA-256 of one token, from the SHA-256 states after the key's
/// inner and outer pad blocks: two compressions per MAC, nothing else. A
/// token (54 bytes) fits one block with SHA-256's padding.
struct FloorMac {
    inner: [u32; 8],
    outer: [u32; 8],
}

type Block = sha2::digest::generic_array::GenericArray<u8, sha2::digest::consts::U64>;

impl FloorMac {
    fn new(key: &[u8; 32]) -> FloorMac {
        const IV: [u32; 8] = [
            0x6a09_e667,
            0xbb67_ae85,
            0x3c6e_f372,
            0xa54f_f53a,
            0x510e_527f,
            0x9b05_688c,
            0x1f83_d9ab,
            0x5be0_cd19,
        ];
        let pad = |b: u8| {
            let mut p = Block::from([b; 64]);
            for (p, k) in p.iter_mut().zip(key) {
                *p ^= k;
            }
            p
        };
        let (mut inner, mut outer) = (IV, IV);
        sha2::compress256(&mut inner, &[pad(0x36)]);
        sha2::compress256(&mut outer, &[pad(0x5c)]);
        FloorMac { inner, outer }
    }

    fn mac(&self, msg: &[u8; refresh_guard::TOKEN_LEN]) -> [u8; 32] {
        let last = |data: &[u8]| {
            let mut b = Block::default();
            b[..data.len()].copy_from_slice(data);
            b[data.len()] = 0x80;
            b[56..].copy_from_slice(&((64 + data.len() as u64) * 8).to_be_bytes());
            b
        };
        let words = |state: [u32; 8]| {
            let mut out = [0u8; 32];
            for (o, w) in out.chunks_exact_mut(4).zip(state) {
                o.copy_from_slice(&w.to_be_bytes());
            }
            out
        };
        let mut inner = self.inner;
        sha2::compress256(&mut inner, &[last(msg)]);
        let mut outer = self.outer;
        sha2::compress256(&mut outer, &[last(&words(inner))]);
        words(outer)
    }
}

/// The floor's MAC must be HMAC-SHA-256 (else it is not the floor):
/// checked against the `hmac` crate whenever a floor is built.
fn check_floor_mac(mac: &FloorMac, key: &[u8; 32]) {
    use hmac::{Hmac, Mac};
    let token: [u8; refresh_guard::TOKEN_LEN] = std::array::from_fn(|i| i as u8);
    let mut reference = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    reference.update(&token);
    assert_eq!(
        mac.mac(&token)[..],
        reference.finalize().into_bytes()[..],
        "the floor's MAC is not HMAC-SHA-256"
    );
}

impl Floor {
    /// `n` random 16-byte ids, each with a 64-byte record.
    pub fn new(n: usize) -> Floor {
        let mut s = 0x1234_5678_9abc_def1u64;
        let mut table = HashMap::with_capacity_and_hasher(n, ahash::RandomState::new());
        let keys = (0..n)
            .map(|_| {
                let mut k = [0u8; 16];
                k[..8].copy_from_slice(&next(&mut s).to_le_bytes());
                k[8..].copy_from_slice(&next(&mut s).to_le_bytes());
                table.insert(k, [0; 8]);
                k
            })
            .collect();
        let mac = FloorMac::new(&[7; 32]);
        check_floor_mac(&mac, &[7; 32]);
        Floor { table, keys, mac }
    }

    /// `iters` lookup-update-HMACs on random records (the keys are read in
    /// sequence: their hashes place the records at random), single-threaded.
    pub fn run(&mut self, iters: u64, seed: u64) -> Duration {
        let n = self.keys.len();
        let token = [b'a'; refresh_guard::TOKEN_LEN];
        let mut i = seed as usize % n;
        let start = Instant::now();
        for _ in 0..iters {
            i = if i + 1 < n { i + 1 } else { 0 };
            let k = &self.keys[i];
            let tag = self.mac.mac(black_box(&token));
            let rec = self.table.get_mut(k).expect("present");
            rec[0] = rec[0].wrapping_add(u64::from(tag[0]));
        }
        start.elapsed()
    }
}

/// oxide-auth's token store with `n` issued grants.
pub struct OxideAuth {
    map: Mutex<TokenMap<RandomGenerator>>,
    refresh: Vec<String>,
}

/// Bytes of randomness per oxide-auth token, as in its examples.
const OXIDE_TOKEN_BYTES: usize = 16;

impl OxideAuth {
    /// Issue `n` grants, one per owner, and keep their refresh tokens.
    pub fn new(n: usize) -> OxideAuth {
        let mut map = TokenMap::new(RandomGenerator::new(OXIDE_TOKEN_BYTES));
        let template = Grant {
            owner_id: String::new(),
            client_id: CLIENT.to_owned(),
            scope: "openid offline_access".parse().expect("scope"),
            redirect_uri: "https://app.example/cb".parse().expect("url"),
            until: chrono::Utc::now() + chrono::Duration::hours(1),
            extensions: Extensions::new(),
        };
        let start = Instant::now();
        let mut refresh: Vec<String> = (0..n)
            .map(|i| {
                let mut grant = template.clone();
                grant.owner_id = format!("user-{i}");
                map.issue(grant)
                    .expect("issue")
                    .refresh
                    .expect("refresh token")
            })
            .collect();
        // Shuffled: the grants' heap data lies in issue order, so walking
        // the tokens in issue order would walk oxide-auth's memory in
        // sequence while the engine's is hit at random. A rotation reuses
        // the chunks it frees, so the layout stays shuffled.
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for k in (1..refresh.len()).rev() {
            refresh.swap(k, (next(&mut s) % (k as u64 + 1)) as usize);
        }
        eprintln!(
            "setup: {n} oxide-auth grants issued in {:.1?}",
            start.elapsed()
        );
        OxideAuth {
            map: Mutex::new(map),
            refresh,
        }
    }

    /// `iters` refreshes over `threads` threads, each owning a share of the
    /// grants; wall time.
    pub fn run(&mut self, iters: u64, threads: usize, seed: u64) -> Duration {
        let map = &self.map;
        let per = iters.div_ceil(threads as u64);
        let chunk = self.refresh.len().div_ceil(threads);
        let mut parts: Vec<(&mut [String], u64)> =
            self.refresh.chunks_mut(chunk).zip(seed..).collect();
        run_parts(&mut parts, |(tokens, seed)| {
            // In sequence: the map's hashes place the grants at random.
            let n = tokens.len();
            let mut i = *seed as usize % n;
            for _ in 0..per {
                i = if i + 1 < n { i + 1 } else { 0 };
                tokens[i] = refresh_one(map, &tokens[i]);
            }
        })
    }
}

/// What oxide-auth's refresh flow does with the issuer, under one lock:
/// recover the grant, check client and expiry, extend it, rotate.
fn refresh_one(map: &Mutex<TokenMap<RandomGenerator>>, token: &str) -> String {
    let mut map = map.lock().expect("not poisoned");
    let mut grant = map
        .recover_refresh(token)
        .expect("infallible")
        .expect("a live refresh token");
    let now = chrono::Utc::now();
    assert!(grant.client_id == CLIENT && grant.until > now);
    grant.until = now + chrono::Duration::hours(1);
    map.refresh(token, grant)
        .expect("refresh")
        .refresh
        .expect("a new refresh token")
}

/// A token on the wire: base64url of 32 random bytes.
type NaiveToken = [u8; 43];

/// What the naive store keeps per token.
#[allow(dead_code)] // stored as a real server would; only some fields are read
struct Record {
    client: Arc<str>,
    subject: Arc<str>,
    scope: Arc<str>,
    created: u64,
    last_used: u64,
}

/// The hand-written store: tokens by their SHA-256, one lock.
pub struct Naive {
    map: Mutex<HashMap<[u8; 32], Record>>,
    tokens: Vec<NaiveToken>,
}

const IDLE_TTL_SECS: u64 = 30 * 86_400;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn seeded_rng() -> ChaCha12Rng {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("OS randomness");
    ChaCha12Rng::from_seed(seed)
}

fn fresh_token(rng: &mut ChaCha12Rng) -> NaiveToken {
    let mut raw = [0u8; 32];
    rng.fill_bytes(&mut raw);
    let mut t = [0u8; 43];
    URL_SAFE_NO_PAD
        .encode_slice(raw, &mut t)
        .expect("32 bytes encode to 43");
    t
}

impl Naive {
    /// `n` tokens, one per subject.
    pub fn new(n: usize) -> Naive {
        let mut rng = seeded_rng();
        let client: Arc<str> = Arc::from(CLIENT);
        let scope: Arc<str> = Arc::from("openid offline_access");
        let now = unix_now();
        let mut map = HashMap::with_capacity(n);
        let tokens = (0..n)
            .map(|i| {
                let t = fresh_token(&mut rng);
                let record = Record {
                    client: client.clone(),
                    subject: Arc::from(format!("user-{i}")),
                    scope: scope.clone(),
                    created: now,
                    last_used: now,
                };
                map.insert(Sha256::digest(t).into(), record);
                t
            })
            .collect();
        Naive {
            map: Mutex::new(map),
            tokens,
        }
    }

    /// `iters` rotations over `threads` threads, each owning a share of the
    /// tokens and its own generator; wall time.
    pub fn run(&mut self, iters: u64, threads: usize, seed: u64) -> Duration {
        let map = &self.map;
        let per = iters.div_ceil(threads as u64);
        let chunk = self.tokens.len().div_ceil(threads);
        let mut parts: Vec<(&mut [NaiveToken], u64, ChaCha12Rng)> = self
            .tokens
            .chunks_mut(chunk)
            .zip(seed..)
            .map(|(t, s)| (t, s, seeded_rng()))
            .collect();
        run_parts(&mut parts, |(tokens, seed, rng)| {
            // In sequence: the map's hashes place the records at random.
            let n = tokens.len();
            let mut i = *seed as usize % n;
            for _ in 0..per {
                i = if i + 1 < n { i + 1 } else { 0 };
                tokens[i] = rotate_naive(map, &tokens[i], rng);
            }
        })
    }
}

/// Remove the presented token's record, check it, and file it under a new
/// random token.
fn rotate_naive(
    map: &Mutex<HashMap<[u8; 32], Record>>,
    token: &NaiveToken,
    rng: &mut ChaCha12Rng,
) -> NaiveToken {
    let key: [u8; 32] = Sha256::digest(token).into();
    let next = fresh_token(rng);
    let next_key: [u8; 32] = Sha256::digest(next).into();
    let now = unix_now();
    let mut map = map.lock().expect("not poisoned");
    let mut record = map.remove(&key).expect("a live token");
    assert!(&*record.client == CLIENT && now < record.last_used + IDLE_TTL_SECS);
    record.last_used = now;
    // 256 random bits never collide in practice; one would lose a record.
    let prev = map.insert(next_key, record);
    assert!(prev.is_none(), "token collision");
    next
}
