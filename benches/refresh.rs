//! The refresh-token lifecycle by live families (1K, 100K, 1M, 10M) and
//! threads (1, 2), with its baselines in the same run.
//!
//! Groups, with ids `<what>/<threads>/<families>` so that one size and
//! thread count sit side by side:
//!
//! - `redeem`: `rotate` (the current token), `grace_replay` (the predecessor
//!   inside the grace window: the same successor again), `reuse_revoke` (an
//!   older token: the family is revoked), `ip_denied` (from outside the
//!   client's allow-list), `forged` (valid shape, wrong tag), `rotate_dpop`
//!   (`rotate` of families bound to a DPoP key, presented with a proof
//!   from it: the same rotation plus the thumbprint compare); beside them
//!   `floor`, `oxide_auth` and `naive` (see `refresh/baselines.rs`);
//! - `issue`: `issue` (a family's first refresh token) and `authorize` (an
//!   authorization code with an S256 challenge);
//! - `exchange`: `exchange` (a code and its PKCE verifier for the first
//!   refresh token).
//!
//! Each size's engine is built once, every path runs on it, and it is
//! dropped before the baselines of that size are built. Families are hit
//! at random, as in production, but the presented tokens are read in
//! sequence, as a server reads them from fresh network buffers: the fleet
//! is issued in a shuffled order of its tokens' positions, so walking the
//! tokens in order walks the table at random (each family once per pass).
//! The baselines read their inputs the same way. With 2 threads
//! each thread owns half the families, so no redemption races another; the
//! time is wall-clock for all operations, so ns/op is the inverse of
//! aggregate throughput.
//!
//! Paths that consume state are fed outside the timed part: `grace_replay`
//! and `reuse_revoke` rotate a queue of up to 2^18 distinct families first
//! and then replay their predecessors in the same order, so that at the
//! large sizes each replayed record has left the cache, as a random one
//! would have; families
//! revoked by `reuse_revoke` are replaced by fresh ones and swept out.
//! `issue`, `authorize` and `exchange` revoke and sweep what they created, so
//! the table stays within `families + 2^18` records.
//!
//! `RG_BENCH_MAX_FAMILIES=100000` skips the larger sizes: 10M families take
//! about 4 GiB and 25 s to set up, oxide-auth's 10M grants 8 GiB and 50 s.
//! A whole run takes about 13 minutes on 2 cores. A filtered run still sets
//! up the engine of every size; the baselines only when they are measured.
//! `RG_BENCH_SHARDS=n` builds the engines with `n` table shards instead of
//! the default (for the shard-count comparisons in BENCHMARKS.md).

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use refresh_guard::{
    AcceptKind, AuthorizeRequest, Decision, DenyReason, Dpop, Engine, ExchangeRequest, FamilyId,
    IssueRequest, Jkt, PolicyOverrides, PolicySet, RedeemRequest, TOKEN_LEN, Token,
};

/// The DPoP key thumbprint `rotate_dpop` binds every family to.
const JKT: Jkt = Jkt::from_bytes([0xa1; 32]);

#[path = "refresh/baselines.rs"]
mod baselines;

const CLIENT: &str = "bench-client";
const SCOPE: &str = "openid offline_access";
const SIZES: [usize; 4] = [1_000, 100_000, 1_000_000, 10_000_000];
/// The most families a consuming path prepares at once.
const QUEUE: usize = 1 << 18;
const REDIRECT_URI: &str = "https://app.example/cb";
/// RFC 7636 appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

fn inside() -> IpAddr {
    IpAddr::from([10, 0, 0, 1])
}

fn outside() -> IpAddr {
    IpAddr::from([192, 0, 2, 1])
}

/// The sizes to run, capped by `RG_BENCH_MAX_FAMILIES`.
fn sizes() -> Vec<usize> {
    let max = match std::env::var("RG_BENCH_MAX_FAMILIES") {
        Ok(v) => v
            .parse::<usize>()
            .expect("RG_BENCH_MAX_FAMILIES is a number of families"),
        Err(_) => usize::MAX,
    };
    SIZES.into_iter().filter(|&n| n <= max).collect()
}

/// Fewer, shorter samples for the large sizes, so a whole run stays within
/// about 20 minutes on 2 cores.
fn tune(g: &mut BenchmarkGroup<'_, WallTime>, n: usize) {
    g.throughput(Throughput::Elements(1));
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(match n {
        0..=100_000 => 20,
        100_001..=1_000_000 => 15,
        _ => 10,
    });
}

/// The shard count asked for by `RG_BENCH_SHARDS`, if any.
fn shards() -> Option<usize> {
    let v = std::env::var("RG_BENCH_SHARDS").ok()?;
    Some(v.parse().expect("RG_BENCH_SHARDS is a number of shards"))
}

/// xorshift64*: cheap, good enough to scatter table accesses.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Run `f` on every part, each on its own thread when there are several;
/// wall time for all.
fn run_parts<P: Send>(parts: &mut [P], f: impl Fn(&mut P) + Sync) -> Duration {
    let start = Instant::now();
    if let [only] = parts {
        f(only);
    } else {
        std::thread::scope(|s| {
            for p in parts.iter_mut() {
                let f = &f;
                s.spawn(move || f(p));
            }
        });
    }
    start.elapsed()
}

/// The policy sets the paths run under, all for [`CLIENT`]: the defaults
/// (no grace, reuse revokes the family), a grace window, an allow-list.
/// Codes live the longest allowed so a prepared queue never expires.
fn policies(o: PolicyOverrides) -> PolicySet {
    PolicySet::builder()
        .client(CLIENT, o.code_ttl(Duration::from_secs(600)))
        .build()
        .expect("bench policy")
}

fn plain() -> PolicySet {
    policies(PolicyOverrides::new())
}

fn grace() -> PolicySet {
    // One replay per rotation is all the bench needs; the cap is high so
    // it is never what is measured.
    policies(
        PolicyOverrides::new()
            .grace_period(Duration::from_secs(300))
            .grace_max_replays(255),
    )
}

fn allowlist() -> PolicySet {
    policies(PolicyOverrides::new().ip_allowlist(vec!["10.0.0.0/8".parse().expect("cidr")]))
}

fn subject(i: usize) -> String {
    format!("user-{i}")
}

fn issue(e: &Engine, subject: &str) -> (Token, FamilyId) {
    let d = e
        .issue(&IssueRequest {
            client: CLIENT,
            subject,
            scope: SCOPE,
            ip: Some(inside()),
        })
        .expect("no store");
    match d {
        Decision::Accept(a) => (a.token, a.family),
        Decision::Deny(d) => panic!("issue denied: {}", d.reason),
    }
}

fn authorize(e: &Engine, subject: &str) -> (Token, FamilyId) {
    let d = e
        .authorize(&AuthorizeRequest {
            client: CLIENT,
            subject,
            scope: SCOPE,
            redirect_uri: REDIRECT_URI,
            code_challenge: Some(CHALLENGE),
            code_challenge_method: Some("S256"),
            ip: Some(inside()),
            dpop_jkt: None,
        })
        .expect("no store");
    match d {
        Decision::Accept(a) => (a.token, a.family),
        Decision::Deny(d) => panic!("authorize denied: {}", d.reason),
    }
}

fn exchange(e: &Engine, code: &Token) -> FamilyId {
    let d = e
        .exchange(&ExchangeRequest {
            code,
            code_verifier: Some(VERIFIER),
            client: CLIENT,
            redirect_uri: REDIRECT_URI,
            ip: Some(inside()),
            dpop: None,
        })
        .expect("no store");
    match d {
        Decision::Accept(a) => a.family,
        Decision::Deny(d) => panic!("exchange denied: {}", d.reason),
    }
}

/// The token of an acceptance of `kind`; panics on anything else, so a
/// bench never measures the wrong path.
fn accepted(d: Decision, kind: AcceptKind) -> Token {
    match d {
        Decision::Accept(a) if a.kind == kind => a.token,
        d => panic!("bench redemption: {} instead of {kind:?}", d.outcome()),
    }
}

/// Panics unless `d` is a denial for `reason`.
fn denied(d: Decision, reason: DenyReason) {
    if d.deny_reason() != Some(reason) {
        panic!("bench redemption: {} instead of {reason:?}", d.outcome());
    }
}

/// Remove `want` revoked records with the engine's own sweeper (revoked
/// records are kept for zero seconds here).
fn sweep_out(e: &Engine, want: usize) {
    let mut removed = 0;
    let mut examined = 0;
    let bound = 4 * (e.stats().families + (1 << 16));
    while removed < want {
        let r = e.sweep(1 << 16).expect("no store");
        removed += r.removed;
        examined += r.examined;
        assert!(
            examined <= bound,
            "{want} revoked records not found by the sweeper"
        );
    }
}

/// Live families and their current tokens; family `i` is `user-i`'s.
struct Fleet {
    engine: Engine,
    tokens: Vec<Token>,
}

impl Fleet {
    fn new(n: usize) -> Fleet {
        let mut builder = Engine::builder()
            .policies(plain())
            .revoked_retention(Duration::ZERO);
        if let Some(shards) = shards() {
            builder = builder.shards(shards);
        }
        let engine = builder.build().expect("engine");
        let start = Instant::now();
        // Issued in shuffled order: a family's slot follows issue order, so
        // tokens[i], tokens[i + 1], ... name families at random slots.
        let mut order: Vec<usize> = (0..n).collect();
        let mut s = 0x5DEE_CE66_D1CE_4E5Bu64;
        for k in (1..n).rev() {
            order.swap(k, (next(&mut s) % (k as u64 + 1)) as usize);
        }
        let mut tokens: Vec<Option<Token>> = vec![None; n];
        for i in order {
            tokens[i] = Some(issue(&engine, &subject(i)).0);
        }
        let tokens = tokens.into_iter().map(|t| t.expect("issued")).collect();
        eprintln!("setup: {n} families issued in {:.1?}", start.elapsed());
        Fleet { engine, tokens }
    }
}

/// The families split among `threads` parts.
fn split(tokens: &mut [Token], threads: usize, seed: u64) -> Vec<Part<'_>> {
    let chunk = tokens.len().div_ceil(threads);
    let queue = QUEUE.min(tokens.len()) / threads;
    tokens
        .chunks_mut(chunk)
        .enumerate()
        .map(|(t, tokens)| Part::new(tokens, t * chunk, queue, seed + t as u64))
        .collect()
}

/// One thread's share of the families, and what it prepared outside the
/// timed part. Aligned so two threads' parts never share a cache line.
#[repr(align(128))]
struct Part<'a> {
    tokens: &'a mut [Token],
    /// Index of `tokens[0]` in the fleet, for subject names.
    base: usize,
    /// Where the stateless paths' walk over `tokens` stands.
    cursor: usize,
    walk: Walk,
    /// Prepared work: (family index, token to present) or (_, code).
    queue: Vec<(usize, Token)>,
    /// The next unconsumed entry of `queue`.
    head: usize,
    queue_len: usize,
    /// Families created in the timed part, to revoke after it.
    created: Vec<FamilyId>,
    /// Subject names for created families, made before the timed part.
    names: Vec<String>,
}

impl<'a> Part<'a> {
    fn new(tokens: &'a mut [Token], base: usize, queue_len: usize, seed: u64) -> Part<'a> {
        let walk = Walk::new(tokens.len(), seed);
        Part {
            tokens,
            base,
            cursor: 0,
            walk,
            queue: Vec::with_capacity(queue_len),
            head: 0,
            queue_len: queue_len.max(1),
            created: Vec::with_capacity(queue_len),
            names: (0..queue_len.max(1))
                .map(|j| format!("bench-{base}-{j}"))
                .collect(),
        }
    }

    fn available(&self) -> usize {
        self.queue.len() - self.head
    }
}

/// Distinct indices in scattered order: `i -> (a*i + b) mod len` with `a`
/// coprime to `len` visits every index once per `len` steps.
struct Walk {
    len: u64,
    a: u64,
    b: u64,
    step: u64,
}

impl Walk {
    fn new(len: usize, seed: u64) -> Walk {
        let len = len.max(1) as u64;
        let mut s = seed | 1;
        let mut a = next(&mut s) % len;
        while gcd(a, len) != 1 {
            a = (a + 1) % len;
        }
        Walk {
            len,
            a,
            b: next(&mut s) % len,
            step: 0,
        }
    }

    fn next(&mut self) -> usize {
        self.step += 1;
        ((u128::from(self.a) * u128::from(self.step) + u128::from(self.b)) % u128::from(self.len))
            as usize
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// What one `redeem` id measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Rotate,
    GraceReplay,
    ReuseRevoke,
    IpDenied,
    Forged,
    /// Last: it binds every family of the fleet to [`JKT`] for good.
    RotateDpop,
}

impl Path {
    const ALL: [Path; 6] = [
        Path::Rotate,
        Path::GraceReplay,
        Path::ReuseRevoke,
        Path::IpDenied,
        Path::Forged,
        Path::RotateDpop,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::Rotate => "rotate",
            Path::GraceReplay => "grace_replay",
            Path::ReuseRevoke => "reuse_revoke",
            Path::IpDenied => "ip_denied",
            Path::Forged => "forged",
            Path::RotateDpop => "rotate_dpop",
        }
    }

    fn policies(self) -> PolicySet {
        match self {
            Path::GraceReplay => grace(),
            Path::IpDenied => allowlist(),
            Path::RotateDpop => policies(PolicyOverrides::new().dpop(Dpop::Required)),
            _ => plain(),
        }
    }
}

/// `per` operations of a path that changes nothing but the family it
/// redeems, on random families.
fn stateless(e: &Engine, p: &mut Part<'_>, path: Path, per: usize) {
    // A local, not a field of `p`: nothing the loop writes shares a cache
    // line with another thread's part.
    let mut i = p.cursor;
    let n = p.tokens.len();
    for _ in 0..per {
        i = if i + 1 < n { i + 1 } else { 0 };
        match path {
            Path::Rotate => {
                let d = e
                    .redeem(&RedeemRequest::new(&p.tokens[i], CLIENT).ip(inside()))
                    .expect("no store");
                p.tokens[i] = accepted(d, AcceptKind::Rotated);
            }
            Path::RotateDpop => p.tokens[i] = redeem_bound(e, &p.tokens[i]),
            Path::IpDenied => {
                let d = e
                    .redeem(&RedeemRequest::new(&p.tokens[i], CLIENT).ip(outside()))
                    .expect("no store");
                denied(d, DenyReason::IpNotAllowed);
            }
            Path::Forged => {
                // One base64url digit of the tag changed: the right shape,
                // the right family, a wrong tag. A copy on the stack.
                let mut forged = [0u8; TOKEN_LEN];
                forged.copy_from_slice(p.tokens[i].as_bytes());
                let at = TOKEN_LEN - 5;
                forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
                let forged = std::str::from_utf8(&forged).expect("ASCII");
                denied(
                    e.redeem(&RedeemRequest::new(forged, CLIENT).ip(inside()))
                        .expect("no store"),
                    DenyReason::InvalidToken,
                );
            }
            Path::GraceReplay | Path::ReuseRevoke => unreachable!("queued paths"),
        }
    }
    p.cursor = i;
}

/// Rotate a family bound to [`JKT`] with a proof from it (the first call
/// binds it, under `dpop = "required"`).
fn redeem_bound(e: &Engine, token: &Token) -> Token {
    let r = RedeemRequest::new(token, CLIENT).ip(inside()).dpop(JKT);
    accepted(e.redeem(&r).expect("no store"), AcceptKind::Rotated)
}

/// Replace the families `reuse_revoke` revoked with fresh ones, then rotate
/// the next queue of distinct families, keeping each predecessor to replay.
fn prepare_replays(e: &Engine, p: &mut Part<'_>, replace_consumed: bool) {
    if replace_consumed {
        for j in 0..p.head {
            let i = p.queue[j].0;
            p.tokens[i] = issue(e, &subject(p.base + i)).0;
        }
    }
    p.queue.clear();
    p.head = 0;
    for _ in 0..p.queue_len {
        let i = p.walk.next();
        let old = p.tokens[i];
        let d = e
            .redeem(&RedeemRequest::new(&old, CLIENT).ip(inside()))
            .expect("no store");
        p.tokens[i] = accepted(d, AcceptKind::Rotated);
        p.queue.push((i, old));
    }
}

/// Present the next `k` predecessors.
fn replay(e: &Engine, p: &mut Part<'_>, path: Path, k: usize) {
    let start = p.head;
    p.head += k;
    for &(_, old) in &p.queue[start..start + k] {
        let d = e
            .redeem(&RedeemRequest::new(&old, CLIENT).ip(inside()))
            .expect("no store");
        match path {
            Path::GraceReplay => {
                black_box(accepted(d, AcceptKind::GraceReplay));
            }
            _ => denied(d, DenyReason::ReuseDetected),
        }
    }
}

/// One round of a path that needs untimed preparation.
struct Round {
    /// Whether every part prepares before this round.
    prepare: bool,
    /// Operations per part in it.
    k: usize,
}

/// Rounds for `per` operations per part, when `available` are prepared
/// now and each preparation makes `capacity`.
fn plan(per: usize, mut available: usize, capacity: usize) -> Vec<Round> {
    let mut rounds = Vec::new();
    let mut done = 0;
    while done < per {
        let prepare = available == 0;
        if prepare {
            available = capacity;
        }
        let k = (per - done).min(available);
        rounds.push(Round { prepare, k });
        available -= k;
        done += k;
    }
    rounds
}

/// A barrier that spins. A thread blocked in `std::sync::Barrier` leaves
/// its vCPU idle, and waking it takes tens of microseconds on this VM: more
/// than a whole round lasts at 1K families.
struct SpinBarrier {
    n: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn new(n: usize) -> SpinBarrier {
        SpinBarrier {
            n,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        } else {
            while self.generation.load(Ordering::Acquire) == generation {
                std::hint::spin_loop();
            }
        }
    }
}

/// Run `rounds` on every part: before a round that says so, each part
/// runs `prepare` (untimed) after counting `swept(part)` records it leaves
/// revoked, and one thread sweeps them all out (untimed); then every part
/// runs `run(part, k)`, timed. With several parts the threads live across
/// rounds and meet at spinning barriers, so neither thread start-up nor
/// wake-ups are timed; a round's time is its slowest part's.
fn rounds(
    e: &Engine,
    parts: &mut [Part<'_>],
    rounds: &[Round],
    swept: impl Fn(&Part<'_>) -> usize + Sync,
    prepare: impl Fn(&mut Part<'_>) + Sync,
    run: impl Fn(&mut Part<'_>, usize) + Sync,
) -> Duration {
    if let [p] = parts {
        let mut elapsed = Duration::ZERO;
        for r in rounds {
            if r.prepare {
                let revoked = swept(p);
                prepare(p);
                sweep_out(e, revoked);
            }
            let start = Instant::now();
            run(p, r.k);
            elapsed += start.elapsed();
        }
        return elapsed;
    }
    let barrier = SpinBarrier::new(parts.len());
    let pending = AtomicUsize::new(0);
    let times: Vec<Vec<Duration>> = std::thread::scope(|s| {
        let threads: Vec<_> = parts
            .iter_mut()
            .enumerate()
            .map(|(t, p)| {
                let (barrier, pending) = (&barrier, &pending);
                let (swept, prepare, run) = (&swept, &prepare, &run);
                s.spawn(move || {
                    let mut times = Vec::with_capacity(rounds.len());
                    for r in rounds {
                        if r.prepare {
                            pending.fetch_add(swept(p), Ordering::Relaxed);
                            prepare(p);
                            barrier.wait();
                            if t == 0 {
                                sweep_out(e, pending.swap(0, Ordering::Relaxed));
                            }
                        }
                        barrier.wait();
                        let start = Instant::now();
                        run(p, r.k);
                        times.push(start.elapsed());
                        barrier.wait();
                    }
                    times
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("bench thread"))
            .collect()
    });
    (0..rounds.len())
        .map(|r| times.iter().map(|t| t[r]).max().unwrap_or_default())
        .sum()
}

fn redeem_path(e: &Engine, parts: &mut [Part<'_>], path: Path, iters: u64) -> Duration {
    let per = iters.div_ceil(parts.len() as u64) as usize;
    match path {
        Path::Rotate | Path::IpDenied | Path::Forged | Path::RotateDpop => {
            run_parts(parts, |p| stateless(e, p, path, per))
        }
        Path::GraceReplay => rounds(
            e,
            parts,
            &plan(per, parts[0].available(), parts[0].queue_len),
            |_| 0,
            |p| prepare_replays(e, p, false),
            |p, k| replay(e, p, path, k),
        ),
        Path::ReuseRevoke => rounds(
            e,
            parts,
            &plan(per, parts[0].available(), parts[0].queue_len),
            |p| p.head,
            |p| prepare_replays(e, p, true),
            |p, k| replay(e, p, path, k),
        ),
    }
}

/// After `reuse_revoke`: every family live again, the revoked swept out.
fn restore_after_reuse(e: &Engine, parts: &mut [Part<'_>]) {
    let revoked: usize = parts.iter().map(|p| p.head).sum();
    run_parts(parts, |p| {
        for j in 0..p.head {
            let i = p.queue[j].0;
            p.tokens[i] = issue(e, &subject(p.base + i)).0;
        }
        p.head = p.queue.len();
    });
    sweep_out(e, revoked);
}

/// `issue` or `authorize`, in rounds: create (timed), then revoke what was
/// created and sweep it out (untimed, before the next round or after the
/// last).
fn create_path(e: &Engine, parts: &mut [Part<'_>], code: bool, iters: u64) -> Duration {
    let per = iters.div_ceil(parts.len() as u64) as usize;
    let capacity = parts[0].names.len();
    let elapsed = rounds(
        e,
        parts,
        &plan(per, capacity, capacity),
        |p| p.created.len(),
        |p| {
            for id in p.created.drain(..) {
                assert!(e.revoke_family(id).expect("no store"));
            }
        },
        |p, k| {
            for j in 0..k {
                let name = &p.names[j];
                let (_, id) = if code {
                    authorize(e, name)
                } else {
                    issue(e, name)
                };
                p.created.push(id);
            }
        },
    );
    revoke_created(e, parts);
    elapsed
}

fn revoke_created(e: &Engine, parts: &mut [Part<'_>]) {
    let revoked: usize = parts.iter().map(|p| p.created.len()).sum();
    run_parts(parts, |p| {
        for id in p.created.drain(..) {
            assert!(e.revoke_family(id).expect("no store"));
        }
    });
    sweep_out(e, revoked);
}

/// Authorize a queue of codes (untimed), after revoking the families the
/// last queue's exchanges started.
fn prepare_codes(e: &Engine, p: &mut Part<'_>) {
    for id in p.created.drain(..) {
        assert!(e.revoke_family(id).expect("no store"));
    }
    p.queue.clear();
    p.head = 0;
    for j in 0..p.queue_len {
        let (code, _) = authorize(e, &p.names[j]);
        p.queue.push((j, code));
    }
}

fn exchange_path(e: &Engine, parts: &mut [Part<'_>], iters: u64) -> Duration {
    let per = iters.div_ceil(parts.len() as u64) as usize;
    rounds(
        e,
        parts,
        &plan(per, parts[0].available(), parts[0].queue_len),
        |p| p.created.len(),
        |p| prepare_codes(e, p),
        |p, k| {
            let start = p.head;
            p.head += k;
            for (_, code) in &p.queue[start..start + k] {
                p.created.push(exchange(e, code));
            }
        },
    )
}

/// After `exchange`: the codes left exchanged, every family it started
/// revoked and swept out.
fn restore_after_exchange(e: &Engine, parts: &mut [Part<'_>]) {
    run_parts(parts, |p| {
        while p.head < p.queue.len() {
            let code = p.queue[p.head].1;
            p.head += 1;
            p.created.push(exchange(e, &code));
        }
    });
    revoke_created(e, parts);
}

fn id(what: &str, threads: usize, n: usize) -> BenchmarkId {
    BenchmarkId::new(format!("{what}/{threads}t"), n)
}

fn lifecycle(c: &mut Criterion) {
    for n in sizes() {
        let mut fleet = Fleet::new(n);
        let Fleet { engine, tokens } = &mut fleet;
        let engine = &*engine;

        let mut g = c.benchmark_group("redeem");
        tune(&mut g, n);
        for path in Path::ALL {
            engine.swap_policies(path.policies());
            if path == Path::RotateDpop {
                // Bind every family outside the timed part: the bench
                // measures the steady state, one allocation per family
                // earlier.
                for t in tokens.iter_mut() {
                    *t = redeem_bound(engine, t);
                }
            }
            for threads in [1, 2] {
                let mut parts = split(tokens, threads, 7 + threads as u64);
                g.bench_function(id(path.name(), threads, n), |b| {
                    b.iter_custom(|iters| redeem_path(engine, &mut parts, path, iters))
                });
                if path == Path::ReuseRevoke {
                    restore_after_reuse(engine, &mut parts);
                }
            }
        }
        engine.swap_policies(plain());
        g.finish();

        let mut g = c.benchmark_group("issue");
        tune(&mut g, n);
        for (what, code) in [("issue", false), ("authorize", true)] {
            for threads in [1, 2] {
                let mut parts = split(tokens, threads, 11);
                g.bench_function(id(what, threads, n), |b| {
                    b.iter_custom(|iters| create_path(engine, &mut parts, code, iters))
                });
            }
        }
        g.finish();

        let mut g = c.benchmark_group("exchange");
        tune(&mut g, n);
        for threads in [1, 2] {
            let mut parts = split(tokens, threads, 13);
            g.bench_function(id("exchange", threads, n), |b| {
                b.iter_custom(|iters| exchange_path(engine, &mut parts, iters))
            });
            restore_after_exchange(engine, &mut parts);
        }
        g.finish();
        drop(fleet);

        baselines_at(c, n);
    }
}

/// The baselines of one size, in the `redeem` group beside the engine's
/// ids; each is built when first measured (not at all when filtered out),
/// and dropped before the next.
fn baselines_at(c: &mut Criterion, n: usize) {
    let mut g = c.benchmark_group("redeem");
    tune(&mut g, n);
    let mut floor = None;
    g.bench_function(id("floor", 1, n), |b| {
        let floor = floor.get_or_insert_with(|| baselines::Floor::new(n));
        b.iter_custom(|iters| floor.run(iters, 0x9E37_79B9_7F4A_7C15))
    });
    drop(floor);
    let mut oxide = None;
    for threads in [1, 2] {
        g.bench_function(id("oxide_auth", threads, n), |b| {
            let oxide = oxide.get_or_insert_with(|| baselines::OxideAuth::new(n));
            b.iter_custom(|iters| oxide.run(iters, threads, 17))
        });
    }
    drop(oxide);
    let mut naive = None;
    for threads in [1, 2] {
        g.bench_function(id("naive", threads, n), |b| {
            let naive = naive.get_or_insert_with(|| baselines::Naive::new(n));
            b.iter_custom(|iters| naive.run(iters, threads, 19))
        });
    }
    drop(naive);
    g.finish();
}

/// Criterion's per-benchmark plots cost about 5 s each on 2 cores, a third
/// of a run of this harness's 80-odd benchmarks; `scripts/plot.py` draws
/// the figure that matters from the estimates. `RG_BENCH_PLOTS=1` turns them
/// back on.
fn config() -> Criterion {
    let c = Criterion::default();
    if std::env::var_os("RG_BENCH_PLOTS").is_some() {
        c
    } else {
        c.without_plots()
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = lifecycle
}
criterion_main!(benches);
