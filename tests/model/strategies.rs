//! The strategy: random policy sets, preludes and operation sequences.

use super::*;

/// Which client presents a family's token.
#[derive(Clone, Debug)]
pub(crate) enum Who {
    Own,
    /// One of the two other clients, or [`INTRUDER`].
    Other(Index),
}

/// A generation to put into a reforged token.
#[derive(Clone, Debug)]
pub(crate) enum GenPick {
    /// The family's current generation + 1 (a "future" token).
    Next,
    /// The presented token's generation − 1.
    Prev,
    Fixed(u32),
}

/// A token that was never handed out.
#[derive(Clone, Debug)]
pub(crate) enum Forgery {
    /// One character of a real token changed (in the base64url alphabet
    /// after the prefix).
    Flip {
        fam: Index,
        generation: Index,
        pos: Index,
        to: Index,
    },
    Truncate {
        fam: Index,
        generation: Index,
        keep: Index,
    },
    Extend {
        fam: Index,
        generation: Index,
        ch: Index,
    },
    /// A real token's body under the other kind's prefix: a refresh
    /// token's as a code, or (forging from a code) a code's as a refresh
    /// token.
    CodePrefix {
        fam: Index,
        generation: Index,
    },
    /// A real token re-encoded with another generation and/or tag.
    Reforged {
        fam: Index,
        generation: Index,
        new_generation: GenPick,
        new_tag: Option<[u8; 16]>,
    },
    /// Well-formed, but of a random (unknown) family.
    UnknownFamily {
        real_key: bool,
        raw: Vec<u8>,
    },
    Garbage(String),
}

/// The `code_challenge` of an authorize request.
#[derive(Clone, Debug)]
pub(crate) enum ChallengeText {
    None,
    /// BASE64URL(SHA-256(verifier)); the client keeps the verifier.
    S256Of(String),
    /// The verifier itself; the client keeps it.
    Verbatim(String),
    /// Anything else; the client keeps no verifier.
    Raw(String),
}

/// The PKCE parameters of an authorize request.
#[derive(Clone, Debug)]
pub(crate) struct PkceSpec {
    pub(crate) challenge: ChallengeText,
    pub(crate) method: Option<&'static str>,
}

impl PkceSpec {
    /// The `code_challenge` sent, and the verifier the client holds.
    pub(crate) fn challenge_and_verifier(&self) -> (Option<String>, Option<String>) {
        match &self.challenge {
            ChallengeText::None => (None, None),
            ChallengeText::S256Of(v) => (Some(s256_of(v)), Some(v.clone())),
            ChallengeText::Verbatim(v) => (Some(v.clone()), Some(v.clone())),
            ChallengeText::Raw(c) => (Some(c.clone()), None),
        }
    }
}

/// The `code_verifier` of an exchange.
#[derive(Clone, Debug)]
pub(crate) enum VerifierPick {
    /// The one the client kept at authorize (none if it sent no challenge).
    Held,
    Missing,
    /// Another well-formed verifier.
    Other(String),
    /// Not 43–128 characters of `[A-Za-z0-9-._~]`.
    Malformed(String),
}

/// A genuine token presented as the other kind.
#[derive(Clone, Debug)]
pub(crate) enum Cross {
    /// A code redeemed (or revoked, RFC 7009) as a refresh token.
    CodeAsRefresh { fam: Index, via_revoke: bool },
    /// A refresh token exchanged as a code.
    RefreshAsCode { fam: Index, generation: Index },
}

#[derive(Clone, Debug)]
pub(crate) enum Op {
    Issue {
        client: usize,
        subject: usize,
        ip: usize,
    },
    Authorize {
        client: usize,
        subject: usize,
        pkce: PkceSpec,
        redirect: usize,
        ip: usize,
    },
    /// Exchange a code: one never exchanged successfully, or (`replay`) one
    /// that was.
    Exchange {
        fam: Index,
        replay: bool,
        who: Who,
        /// `None`: the redirect URI of the authorize request; else another.
        redirect: Option<Index>,
        verifier: VerifierPick,
        ip: usize,
    },
    Cross(Cross),
    /// Redeem the current token of a family.
    Redeem {
        fam: Index,
        who: Who,
        ip: usize,
    },
    /// Replay an older generation: the predecessor, or any older one.
    Replay {
        fam: Index,
        older: Option<Index>,
        who: Who,
        ip: usize,
    },
    /// A forged refresh token, or (`code`) a forged authorization code.
    Forge {
        forgery: Forgery,
        code: bool,
        client: usize,
        ip: usize,
        via_revoke: bool,
    },
    RevokeToken {
        fam: Index,
        generation: Index,
        client: Option<Who>,
    },
    RevokeFamily {
        fam: Index,
    },
    RevokeSubject {
        subject: usize,
        client: Option<usize>,
    },
    RevokeClient {
        client: usize,
    },
    Advance {
        ms: u64,
    },
    SwapPolicies(SetSpec),
    /// `None`: a budget covering the whole table.
    Sweep {
        budget: Option<usize>,
    },
    /// Copy a family's record, as a backup does (`Engine::family_record`).
    Backup {
        fam: Index,
    },
    /// Put a backup taken earlier back (`Engine::restore_family`): the
    /// family's whole state returns to it. With `rollback`, one of a family
    /// that rotated since, if there is one.
    Restore {
        backup: Index,
        rollback: bool,
    },
    /// Present a token minted before a rollback: newer than the family's
    /// current generation (`g > c`).
    Ahead {
        fam: Index,
        ahead: Index,
        who: Who,
        ip: usize,
    },
}

/// One generated case: the initial policy set, one to three families
/// started up front (from an address every policy admits: issued, or
/// (`true`) authorized with S256 and exchanged at once), then the ops.
#[derive(Clone, Debug)]
pub(crate) struct Case {
    pub(crate) initial: SetSpec,
    pub(crate) prelude: Vec<(usize, usize, bool)>,
    pub(crate) ops: Vec<Op>,
}

pub(crate) fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    let on_reuse = prop::sample::select(vec![
        OnReuse::RevokeFamily,
        OnReuse::RevokeSubjectClient,
        OnReuse::RevokeSubject,
        OnReuse::ReportOnly,
    ]);
    (
        (
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.6),
            prop::sample::select(vec![0u8, 1, 1, 2, 2]),
            prop::bool::weighted(0.3),
            on_reuse,
        ),
        (
            prop::bool::weighted(0.5),
            prop::bool::weighted(0.5),
            prop::bool::weighted(0.4),
            prop::bool::weighted(0.7),
        ),
        (
            prop::sample::select(vec![Pkce::S256, Pkce::S256OrPlain, Pkce::Optional]),
            prop_oneof![3 => prop::sample::select(CODE_TTLS.to_vec()), 1 => 1u64..=600_000],
        ),
    )
        .prop_map(
            |(
                (rotate, grace, grace_max_replays, grace_same_ip, on_reuse),
                (idle, absolute, restricted, every_refresh),
                (pkce, code_ttl_ms),
            )| PolicySpec {
                rotate,
                grace,
                grace_max_replays,
                grace_same_ip,
                on_reuse,
                idle,
                absolute,
                restricted,
                every_refresh,
                pkce,
                code_ttl_ms,
            },
        )
}

pub(crate) fn set_spec() -> impl Strategy<Value = SetSpec> {
    (
        policy_spec(),
        prop::array::uniform3(prop::option::weighted(0.5, policy_spec())),
    )
        .prop_map(|(defaults, clients)| SetSpec { defaults, clients })
}

/// Mostly allowed addresses (the first one most), sometimes refused ones,
/// sometimes the first one IPv4-mapped.
pub(crate) fn ip() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(0usize), 3 => 1..5usize, 2 => 5..8usize, 1 => Just(8usize)]
}

pub(crate) fn who() -> impl Strategy<Value = Who> {
    prop_oneof![9 => Just(Who::Own), 1 => any::<Index>().prop_map(Who::Other)]
}

/// Mostly a few seconds (grace is 10 s), sometimes exactly on a boundary,
/// sometimes hours or days (idle 1 h, retention 2 h, absolute 1 d).
pub(crate) fn advance() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1u64..=4_000,
        4 => (1u64..=15).prop_map(|s| s * 1000),
        2 => prop::sample::select(vec![
            GRACE_MS - 1,
            GRACE_MS,
            IDLE_MS - 1,
            IDLE_MS,
            RETENTION_MS,
            ABSOLUTE_MS,
        ]),
        1 => prop::sample::select(vec![59_999, 60_000, 599_999, 600_000]),
        2 => 1_800_000u64..=100_000_000,
    ]
}

/// A string of `len` characters drawn from `chars`.
pub(crate) fn string_of(
    chars: &'static [u8],
    len: impl Strategy<Value = usize> + 'static,
) -> BoxedStrategy<String> {
    len.prop_flat_map(move |n| prop::collection::vec(prop::sample::select(chars), n))
        .prop_map(|b| String::from_utf8(b).expect("ascii"))
        .boxed()
}

/// A well-formed verifier: the RFC 7636 example, or random, often at the
/// length bounds.
pub(crate) fn verifier() -> impl Strategy<Value = String> {
    let len = prop_oneof![Just(43usize), Just(128usize), 44..128usize];
    prop_oneof![1 => Just(RFC7636_VERIFIER.to_owned()), 5 => string_of(VERIFIER_CHARS, len)]
}

/// Not a verifier: one character too short or too long, a character
/// outside the set, or empty.
pub(crate) fn malformed_verifier() -> impl Strategy<Value = String> {
    prop_oneof![
        string_of(VERIFIER_CHARS, Just(42usize)),
        string_of(VERIFIER_CHARS, Just(129usize)),
        (
            verifier(),
            any::<Index>(),
            prop::sample::select(b"+/= %!".to_vec())
        )
            .prop_map(|(v, at, bad)| {
                let mut b = v.into_bytes();
                let i = at.index(b.len());
                b[i] = bad;
                String::from_utf8(b).expect("ascii")
            }),
        Just(String::new()),
    ]
}

/// Not an S256 challenge: a character short or over, padded, with a
/// character outside base64url, or with non-zero trailing bits.
pub(crate) fn malformed_challenge() -> impl Strategy<Value = String> {
    prop_oneof![
        verifier().prop_map(|v| s256_of(&v)[..42].to_owned()),
        verifier().prop_map(|v| format!("{}=", s256_of(&v))),
        verifier().prop_map(|v| format!("{}A", s256_of(&v))),
        (
            verifier(),
            any::<Index>(),
            prop::sample::select(b"+/.~=".to_vec())
        )
            .prop_map(|(v, at, bad)| {
                let mut b = s256_of(&v).into_bytes();
                let i = at.index(b.len());
                b[i] = bad;
                String::from_utf8(b).expect("ascii")
            }),
        (verifier(), 1..4usize).prop_map(|(v, bits)| {
            let mut b = s256_of(&v).into_bytes();
            let i = BASE64URL
                .iter()
                .position(|x| *x == b[42])
                .expect("base64url");
            b[42] = BASE64URL[(i & !3) | bits];
            String::from_utf8(b).expect("ascii")
        }),
    ]
}

pub(crate) fn pkce_spec() -> impl Strategy<Value = PkceSpec> {
    use ChallengeText as C;
    let spec = |challenge, method| PkceSpec { challenge, method };
    let bad_method = || prop::sample::select(vec![Some("s256"), Some("S512"), Some("")]);
    prop_oneof![
        6 => verifier().prop_map(move |v| spec(C::S256Of(v), Some("S256"))),
        2 => verifier().prop_map(move |v| spec(C::Verbatim(v), Some("plain"))),
        1 => verifier().prop_map(move |v| spec(C::Verbatim(v), None)),
        3 => Just(spec(C::None, None)),
        1 => prop::sample::select(vec![Some("S256"), Some("plain")])
            .prop_map(move |m| spec(C::None, m)),
        1 => malformed_challenge().prop_map(move |c| spec(C::Raw(c), Some("S256"))),
        1 => (malformed_verifier(), prop::sample::select(vec![Some("plain"), None]))
            .prop_map(move |(c, m)| spec(C::Raw(c), m)),
        1 => (verifier(), any::<bool>(), bad_method()).prop_map(move |(v, s, m)| {
            spec(if s { C::S256Of(v) } else { C::Verbatim(v) }, m)
        }),
        // A challenge sent under the other method.
        1 => verifier().prop_map(move |v| spec(C::S256Of(v), Some("plain"))),
        1 => string_of(BASE64URL, Just(43usize))
            .prop_map(move |v| spec(C::Verbatim(v), Some("S256"))),
    ]
}

pub(crate) fn verifier_pick() -> impl Strategy<Value = VerifierPick> {
    prop_oneof![
        10 => Just(VerifierPick::Held),
        1 => Just(VerifierPick::Missing),
        1 => verifier().prop_map(VerifierPick::Other),
        1 => malformed_verifier().prop_map(VerifierPick::Malformed),
    ]
}

pub(crate) fn exchange(replay: bool) -> impl Strategy<Value = Op> {
    (
        any::<Index>(),
        who(),
        prop::option::weighted(0.1, any::<Index>()),
        verifier_pick(),
        ip(),
    )
        .prop_map(move |(fam, who, redirect, verifier, ip)| Op::Exchange {
            fam,
            replay,
            who,
            redirect,
            verifier,
            ip,
        })
}

pub(crate) fn cross() -> impl Strategy<Value = Cross> {
    prop_oneof![
        (any::<Index>(), any::<bool>())
            .prop_map(|(fam, via_revoke)| Cross::CodeAsRefresh { fam, via_revoke }),
        (any::<Index>(), any::<Index>())
            .prop_map(|(fam, generation)| Cross::RefreshAsCode { fam, generation }),
    ]
}

pub(crate) fn gen_pick() -> impl Strategy<Value = GenPick> {
    prop_oneof![
        2 => Just(GenPick::Next),
        1 => Just(GenPick::Prev),
        1 => prop_oneof![0u32..=4, any::<u32>()].prop_map(GenPick::Fixed),
    ]
}

pub(crate) fn forgery() -> impl Strategy<Value = Forgery> {
    let i = any::<Index>;
    prop_oneof![
        4 => (i(), i(), i(), i()).prop_map(|(fam, generation, pos, to)| Forgery::Flip {
            fam,
            generation,
            pos,
            to
        }),
        1 => (i(), i(), i()).prop_map(|(fam, generation, keep)| Forgery::Truncate {
            fam,
            generation,
            keep
        }),
        1 => (i(), i(), i()).prop_map(|(fam, generation, ch)| Forgery::Extend {
            fam,
            generation,
            ch
        }),
        1 => (i(), i()).prop_map(|(fam, generation)| Forgery::CodePrefix { fam, generation }),
        3 => (i(), i(), gen_pick(), prop::option::weighted(0.5, any::<[u8; 16]>())).prop_map(
            |(fam, generation, new_generation, new_tag)| Forgery::Reforged {
                fam,
                generation,
                new_generation,
                new_tag,
            }
        ),
        1 => (any::<bool>(), prop::collection::vec(any::<u8>(), 37))
            .prop_map(|(real_key, raw)| Forgery::UnknownFamily { real_key, raw }),
        1 => prop_oneof!["[ -~]{0,70}", "rgt_[A-Za-z0-9_-]{50}", "rgt_[A-Za-z0-9_-]{0,60}"]
            .prop_map(Forgery::Garbage),
    ]
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3usize, ip())
            .prop_map(|(client, subject, ip)| Op::Issue { client, subject, ip }),
        4 => (0..3usize, 0..3usize, pkce_spec(), prop_oneof![3 => Just(0usize), 1 => 1..3usize], ip())
            .prop_map(|(client, subject, pkce, redirect, ip)| Op::Authorize {
                client,
                subject,
                pkce,
                redirect,
                ip
            }),
        5 => exchange(false),
        2 => exchange(true),
        1 => cross().prop_map(Op::Cross),
        9 => (any::<Index>(), who(), ip()).prop_map(|(fam, who, ip)| Op::Redeem { fam, who, ip }),
        5 => (any::<Index>(), prop::option::weighted(0.25, any::<Index>()), who(), ip())
            .prop_map(|(fam, older, who, ip)| Op::Replay { fam, older, who, ip }),
        4 => (forgery(), prop::bool::weighted(0.35), 0..3usize, ip(), prop::bool::weighted(0.2))
            .prop_map(|(forgery, code, client, ip, via_revoke)| Op::Forge {
                forgery,
                code,
                client,
                ip,
                via_revoke
            }),
        1 => (any::<Index>(), any::<Index>(), prop::option::of(who())).prop_map(
            |(fam, generation, client)| Op::RevokeToken { fam, generation, client }
        ),
        1 => any::<Index>().prop_map(|fam| Op::RevokeFamily { fam }),
        1 => (0..3usize, prop::option::of(0..3usize))
            .prop_map(|(subject, client)| Op::RevokeSubject { subject, client }),
        1 => (0..3usize).prop_map(|client| Op::RevokeClient { client }),
        6 => advance().prop_map(|ms| Op::Advance { ms }),
        2 => set_spec().prop_map(Op::SwapPolicies),
        2 => prop::option::weighted(0.5, 1..=8usize).prop_map(|budget| Op::Sweep { budget }),
        3 => any::<Index>().prop_map(|fam| Op::Backup { fam }),
        3 => (any::<Index>(), prop::bool::weighted(0.7))
            .prop_map(|(backup, rollback)| Op::Restore { backup, rollback }),
        4 => (any::<Index>(), any::<Index>(), who(), ip())
            .prop_map(|(fam, ahead, who, ip)| Op::Ahead { fam, ahead, who, ip }),
    ]
}

pub(crate) fn case() -> impl Strategy<Value = Case> {
    (
        set_spec(),
        prop::collection::vec((0..3usize, 0..3usize, prop::bool::weighted(0.3)), 1..=3),
        prop::collection::vec(op(), 1..40),
    )
        .prop_map(|(initial, prelude, ops)| Case {
            initial,
            prelude,
            ops,
        })
}
