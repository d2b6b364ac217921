//! The shipped profiles: one table each, one entry per control, each with
//! its one-line source and a check over a scope's effective policy. The
//! README's "Compliance profiles" section lists the same tables.

use std::time::Duration;

use super::{Control, ControlLevel, Finding, Profile};
use crate::dpop::Dpop;
use crate::policy::{ClientPolicy, IpRange, OnReuse, Pkce, Rotation, format_duration};

/// Every shipped profile, in the order the README lists them.
pub(super) static ALL: &[Profile] = &[SALESFORCE, RFC9700, FAPI2];

const SALESFORCE: Profile = Profile {
    name: "salesforce-appexchange",
    title: "Salesforce AppExchange partner apps: the OAuth controls mandatory since 11 May 2026",
    controls: &[
        Control {
            id: "pkce-s256",
            title: "PKCE required at the code exchange, S256 only",
            source: "Salesforce ISVforce Guide, \"Secure Your Connected Apps and External Client Apps\": Proof Key for Code Exchange",
            level: ControlLevel::Required,
            knobs: &["pkce"],
            check: pkce_s256,
        },
        Control {
            id: "rotation",
            title: "refresh-token rotation on every refresh",
            source: "Salesforce ISVforce Guide, \"Secure Your Connected Apps and External Client Apps\": Refresh Token Rotation",
            level: ControlLevel::Required,
            knobs: &["rotation"],
            check: rotation_on,
        },
        Control {
            id: "idle-ttl",
            title: "idle refresh-token expiry set, at most 30 days",
            source: "Salesforce ISVforce Guide, \"Secure Your Connected Apps and External Client Apps\": idle refresh token TTL",
            level: ControlLevel::Required,
            knobs: &["idle_ttl"],
            check: idle_ttl_30d,
        },
        Control {
            id: "ip-allowlist",
            title: "refreshes accepted only from a non-empty IP allow-list, checked on every refresh",
            source: "Salesforce ISVforce Guide, \"Secure Your Connected Apps and External Client Apps\": refresh token IP allowlist",
            level: ControlLevel::Required,
            knobs: &["ip_allowlist", "ip_check"],
            check: allowlist_enforced,
        },
        Control {
            id: "allowlist-ranges",
            title: "the allow-list fits Salesforce's: at most 128 ranges",
            source: "Salesforce Help, \"Set IP Allowlist Ranges for Refresh Tokens\" (External Client Apps)",
            level: ControlLevel::Advisory,
            knobs: &["ip_allowlist"],
            check: at_most_128_ranges,
        },
        Control {
            id: "allowlist-addresses",
            title: "the allow-list fits Salesforce's: at most 256 addresses in all",
            source: "Salesforce Help, \"Set IP Allowlist Ranges for Refresh Tokens\" (External Client Apps)",
            level: ControlLevel::Advisory,
            knobs: &["ip_allowlist"],
            check: at_most_256_addresses,
        },
    ],
};

const RFC9700: Profile = Profile {
    name: "rfc9700",
    title: "RFC 9700, OAuth 2.0 Security Best Current Practice: PKCE and refresh tokens",
    controls: &[
        Control {
            id: "pkce-s256",
            title: "PKCE required at the code exchange, S256 only",
            source: "RFC 9700 §2.1.1",
            level: ControlLevel::Required,
            knobs: &["pkce"],
            check: pkce_s256,
        },
        Control {
            id: "public-client-refresh",
            title: "a public client's refresh tokens are rotated or DPoP-bound",
            source: "RFC 9700 §2.2.2 and §4.14.2",
            level: ControlLevel::Required,
            knobs: &["rotation", "dpop", "client_secret_sha256"],
            check: public_client_rotated,
        },
        Control {
            id: "reuse-revokes",
            title: "presenting a rotated-out refresh token revokes (not report_only)",
            source: "RFC 9700 §4.14.2",
            level: ControlLevel::Required,
            knobs: &["on_reuse", "rotation"],
            check: reuse_revokes,
        },
        Control {
            id: "idle-ttl",
            title: "refresh tokens expire when unused for a while",
            source: "RFC 9700 §4.14.2",
            level: ControlLevel::Required,
            knobs: &["idle_ttl"],
            check: idle_ttl_set,
        },
        Control {
            id: "absolute-ttl",
            title: "refresh tokens have an absolute lifetime",
            source: "RFC 9700 §4.14.2; RFC 6819 §5.1.5.3",
            level: ControlLevel::Required,
            knobs: &["absolute_ttl"],
            check: absolute_ttl_set,
        },
        Control {
            id: "client-binding",
            title: "a refresh token is redeemable only by the client it was issued to",
            source: "RFC 9700 §4.14.2; RFC 6749 §10.4",
            level: ControlLevel::Required,
            knobs: &[],
            check: client_bound,
        },
    ],
};

const FAPI2: Profile = Profile {
    name: "fapi2-refresh",
    title: "FAPI 2.0 Security Profile: the refresh-token and code controls refresh-guard decides",
    controls: &[
        Control {
            id: "sender-constrained",
            title: "sender-constrained tokens: DPoP binding required",
            source: "FAPI 2.0 Security Profile §5.3.2.1; RFC 9449",
            level: ControlLevel::Required,
            knobs: &["dpop"],
            check: dpop_required,
        },
        Control {
            id: "pkce-s256",
            title: "PKCE required at the code exchange, S256 only",
            source: "FAPI 2.0 Security Profile §5.3.2.2",
            level: ControlLevel::Required,
            knobs: &["pkce"],
            check: pkce_s256,
        },
        Control {
            id: "code-lifetime",
            title: "authorization codes live at most 60 seconds",
            source: "FAPI 2.0 Security Profile §5.3.2.1",
            level: ControlLevel::Required,
            knobs: &["code_ttl"],
            check: code_ttl_60s,
        },
        Control {
            id: "rotation-retry",
            title: "with rotation on, a retry with the previous refresh token succeeds",
            source: "FAPI 2.0 Security Profile §5.3.2.1 (refresh token rotation)",
            level: ControlLevel::Required,
            knobs: &["rotation", "grace_period", "grace_max_replays"],
            check: rotation_retry,
        },
        Control {
            id: "client-authentication",
            title: "confidential clients authenticate with private_key_jwt or mTLS",
            source: "FAPI 2.0 Security Profile §5.3.2.1",
            level: ControlLevel::Required,
            knobs: &[],
            check: server_decides_client_authentication,
        },
        Control {
            id: "par",
            title: "pushed authorization requests (RFC 9126) required",
            source: "FAPI 2.0 Security Profile §5.3.2.2",
            level: ControlLevel::Required,
            knobs: &[],
            check: server_decides_par,
        },
    ],
};

const THIRTY_DAYS: Duration = Duration::from_secs(30 * 86_400);
const SIXTY_SECONDS: Duration = Duration::from_secs(60);

fn pkce_s256(p: &ClientPolicy) -> Finding {
    match p.pkce() {
        Pkce::S256 => Finding::met(),
        Pkce::S256OrPlain => {
            Finding::not_met("the plain method is allowed: it reveals the verifier")
        }
        Pkce::Optional => Finding::not_met("a code may be exchanged without PKCE"),
    }
}

fn rotation_on(p: &ClientPolicy) -> Finding {
    match p.rotation() {
        Rotation::Rotate => Finding::met(),
        Rotation::Reuse => Finding::not_met("a refresh token stays valid after use"),
    }
}

fn idle_ttl_30d(p: &ClientPolicy) -> Finding {
    match p.idle_ttl() {
        Some(d) if d <= THIRTY_DAYS => Finding::met(),
        Some(d) => Finding::not_met(format!("{} is longer than 30d", format_duration(d))),
        None => Finding::not_met("an unused refresh token never expires"),
    }
}

fn allowlist_enforced(p: &ClientPolicy) -> Finding {
    if p.ip_allowlist().is_any() {
        return Finding::not_met("no allow-list: a refresh is accepted from any address");
    }
    match p.ip_check() {
        crate::policy::IpCheck::EveryRefresh => Finding::met(),
        crate::policy::IpCheck::IssuanceOnly => {
            Finding::not_met("checked only when a family is born, not on refresh")
        }
    }
}

fn at_most_128_ranges(p: &ClientPolicy) -> Finding {
    let ranges = p.ip_allowlist().ranges();
    match ranges.len() {
        0 => Finding::not_applicable("no allow-list to mirror"),
        1..=128 => Finding::met(),
        n => Finding::not_met(format!(
            "{n} ranges (after merging); Salesforce holds at most 128"
        )),
    }
}

/// Addresses in a range, saturating (an IPv6 /64 alone is 2^64).
fn addresses(r: &IpRange) -> u128 {
    let bits = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
        std::net::IpAddr::V6(a) => u128::from(a),
    };
    (bits(r.end()) - bits(r.start())).saturating_add(1)
}

fn at_most_256_addresses(p: &ClientPolicy) -> Finding {
    let ranges = p.ip_allowlist().ranges();
    if ranges.is_empty() {
        return Finding::not_applicable("no allow-list to mirror");
    }
    let total = ranges
        .iter()
        .fold(0u128, |sum, r| sum.saturating_add(addresses(r)));
    if total <= 256 {
        Finding::met()
    } else if total == u128::MAX {
        Finding::not_met("more than 2^127 addresses; Salesforce holds at most 256")
    } else {
        Finding::not_met(format!("{total} addresses; Salesforce holds at most 256"))
    }
}

fn public_client_rotated(p: &ClientPolicy) -> Finding {
    if p.client_secret_sha256().is_some() {
        return Finding::not_applicable(
            "confidential client: its refresh token is bound to its client authentication",
        );
    }
    // Rotated, or sender-constrained: under `required` every family is
    // bound (at its exchange, or at its next refresh if older) and nothing
    // is redeemed without the key; `allowed` binds only the families whose
    // exchange came with a proof.
    match (p.rotation(), p.dpop()) {
        (Rotation::Rotate, _) | (Rotation::Reuse, Dpop::Required) => Finding::met(),
        (Rotation::Reuse, Dpop::Allowed) => Finding::not_met(
            "a public client's token is kept, and dpop = allowed leaves families \
             exchanged without a proof unbound; use dpop = required or rotation = rotate",
        ),
        (Rotation::Reuse, Dpop::Off) => {
            Finding::not_met("a public client's token is kept and not DPoP-bound")
        }
    }
}

fn reuse_revokes(p: &ClientPolicy) -> Finding {
    if p.rotation() == Rotation::Reuse {
        return Finding::not_applicable("rotation = reuse: no token is ever rotated out");
    }
    match p.on_reuse() {
        OnReuse::ReportOnly => Finding::not_met("reuse is reported; the stolen lineage lives on"),
        _ => Finding::met(),
    }
}

fn idle_ttl_set(p: &ClientPolicy) -> Finding {
    match p.idle_ttl() {
        Some(_) => Finding::met(),
        None => Finding::not_met("an unused refresh token never expires"),
    }
}

fn absolute_ttl_set(p: &ClientPolicy) -> Finding {
    match p.absolute_ttl() {
        Some(_) => Finding::met(),
        None => Finding::not_met("a family used often enough lives forever"),
    }
}

fn client_bound(_: &ClientPolicy) -> Finding {
    Finding::met_because(
        "always enforced: another client's token is client_mismatch \
         (README \"The order of checks\", step 4)",
    )
}

fn dpop_required(p: &ClientPolicy) -> Finding {
    match p.dpop() {
        Dpop::Required => Finding::met(),
        Dpop::Allowed => Finding::not_met(
            "dpop = allowed: an exchange or refresh without a proof is still served",
        ),
        Dpop::Off => Finding::not_met("dpop = off: tokens are not sender-constrained"),
    }
}

fn code_ttl_60s(p: &ClientPolicy) -> Finding {
    match p.code_ttl() {
        d if d <= SIXTY_SECONDS => Finding::met(),
        d => Finding::not_met(format!("{} is longer than 60s", format_duration(d))),
    }
}

fn rotation_retry(p: &ClientPolicy) -> Finding {
    if p.rotation() == Rotation::Reuse {
        return Finding::not_applicable("rotation = reuse: a retry presents the same, valid token");
    }
    if p.grace_period().is_zero() {
        return Finding::not_met("grace_period = 0s: a retry after a lost response is reuse");
    }
    if p.grace_max_replays() == 0 {
        return Finding::not_met("grace_max_replays = 0: no retry is ever served");
    }
    Finding::met()
}

fn server_decides_client_authentication(_: &ClientPolicy) -> Finding {
    Finding::not_applicable(
        "not decided by refresh-guard: client authentication is the token endpoint's",
    )
}

fn server_decides_par(_: &ClientPolicy) -> Finding {
    Finding::not_applicable(
        "not decided by refresh-guard: pushed authorization requests are the authorization endpoint's",
    )
}

#[cfg(test)]
mod tests {
    //! One test per control: a policy that meets it and one that does not
    //! (or why it cannot fail), so a control is one entry and its test.

    use std::collections::HashSet;

    use super::*;
    use crate::compliance::ControlStatus;
    use crate::policy::{IpCheck, PolicyOverrides, PolicySet};

    fn policy(o: PolicyOverrides) -> ClientPolicy {
        let set = PolicySet::builder().client("c", o).build().unwrap();
        set.policy("c").clone()
    }

    fn status(profile: &Profile, id: &str, o: PolicyOverrides) -> ControlStatus {
        let c = profile.controls.iter().find(|c| c.id == id).unwrap();
        (c.check)(&policy(o)).status(c.level)
    }

    fn cidrs(list: &[&str]) -> Vec<IpRange> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    const DAY: Duration = Duration::from_secs(86_400);
    const SECRET: Option<[u8; 32]> = Some([7; 32]);

    /// (profile, control, a policy that meets it, one that fails it with
    /// the status it then has).
    fn cases() -> Vec<(
        &'static Profile,
        &'static str,
        PolicyOverrides,
        PolicyOverrides,
        ControlStatus,
    )> {
        let n = PolicyOverrides::new;
        let allow = || n().ip_allowlist(cidrs(&["192.0.2.0/24"]));
        let many: Vec<String> = (0..129).map(|i| format!("10.{i}.0.0/32")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        vec![
            (
                &SALESFORCE,
                "pkce-s256",
                n(),
                n().pkce(Pkce::S256OrPlain),
                ControlStatus::NotMet,
            ),
            (
                &SALESFORCE,
                "rotation",
                n(),
                n().rotation(Rotation::Reuse),
                ControlStatus::NotMet,
            ),
            (
                &SALESFORCE,
                "idle-ttl",
                n().idle_ttl(Some(30 * DAY)),
                n().idle_ttl(Some(31 * DAY)),
                ControlStatus::NotMet,
            ),
            (
                &SALESFORCE,
                "ip-allowlist",
                allow(),
                allow().ip_check(IpCheck::IssuanceOnly),
                ControlStatus::NotMet,
            ),
            (
                &SALESFORCE,
                "allowlist-ranges",
                allow(),
                n().ip_allowlist(cidrs(&many)),
                ControlStatus::Warning,
            ),
            (
                &SALESFORCE,
                "allowlist-addresses",
                n().ip_allowlist(cidrs(&["192.0.2.0/24"])),
                n().ip_allowlist(cidrs(&["192.0.2.0/24", "198.51.100.1"])),
                ControlStatus::Warning,
            ),
            (
                &RFC9700,
                "pkce-s256",
                n(),
                n().pkce(Pkce::Optional),
                ControlStatus::NotMet,
            ),
            (
                &RFC9700,
                "public-client-refresh",
                n(),
                n().rotation(Rotation::Reuse),
                ControlStatus::NotMet,
            ),
            (
                &FAPI2,
                "sender-constrained",
                n().dpop(Dpop::Required),
                n().dpop(Dpop::Allowed),
                ControlStatus::NotMet,
            ),
            (
                &RFC9700,
                "reuse-revokes",
                n(),
                n().on_reuse(OnReuse::ReportOnly),
                ControlStatus::NotMet,
            ),
            (
                &RFC9700,
                "idle-ttl",
                n(),
                n().idle_ttl(None),
                ControlStatus::NotMet,
            ),
            (
                &RFC9700,
                "absolute-ttl",
                n(),
                n().absolute_ttl(None),
                ControlStatus::NotMet,
            ),
            (
                &FAPI2,
                "pkce-s256",
                n(),
                n().pkce(Pkce::Optional),
                ControlStatus::NotMet,
            ),
            (
                &FAPI2,
                "code-lifetime",
                n().code_ttl(SIXTY),
                n().code_ttl(SIXTY + Duration::from_millis(1)),
                ControlStatus::NotMet,
            ),
            (
                &FAPI2,
                "rotation-retry",
                n().grace_period(Duration::from_secs(1)),
                n().grace_period(Duration::ZERO),
                ControlStatus::NotMet,
            ),
        ]
    }
    const SIXTY: Duration = Duration::from_secs(60);

    #[test]
    fn each_control_is_met_by_one_policy_and_failed_by_another() {
        for (profile, id, good, bad, failed) in cases() {
            assert_eq!(
                status(profile, id, good),
                ControlStatus::Met,
                "{} {id}",
                profile.name
            );
            assert_eq!(status(profile, id, bad), failed, "{} {id}", profile.name);
        }
    }

    /// The controls whose outcome no knob changes, with that outcome.
    const FIXED: &[(&str, &str, ControlStatus)] = &[
        ("rfc9700", "client-binding", ControlStatus::Met),
        (
            "fapi2-refresh",
            "client-authentication",
            ControlStatus::NotApplicable,
        ),
        ("fapi2-refresh", "par", ControlStatus::NotApplicable),
    ];

    #[test]
    fn controls_no_knob_decides_have_a_fixed_outcome() {
        let profiles = [&SALESFORCE, &RFC9700, &FAPI2];
        for (name, id, want) in FIXED {
            let p = profiles.iter().find(|p| p.name == *name).unwrap();
            for o in [
                PolicyOverrides::new(),
                PolicyOverrides::new()
                    .rotation(Rotation::Reuse)
                    .client_secret_sha256(SECRET),
            ] {
                assert_eq!(status(p, id, o), *want, "{name} {id}");
            }
        }
    }

    /// RFC 9700 §2.2.2: a public client's refresh token rotated *or*
    /// sender-constrained; `allowed` does not constrain every family.
    #[test]
    fn a_kept_public_token_is_compliant_only_when_dpop_is_required() {
        let kept = || PolicyOverrides::new().rotation(Rotation::Reuse);
        let id = "public-client-refresh";
        assert_eq!(
            status(&RFC9700, id, kept().dpop(Dpop::Required)),
            ControlStatus::Met
        );
        assert_eq!(
            status(&RFC9700, id, kept().dpop(Dpop::Allowed)),
            ControlStatus::NotMet
        );
        assert_eq!(
            status(&FAPI2, "sender-constrained", PolicyOverrides::new()),
            ControlStatus::NotMet,
            "off by default"
        );
    }

    #[test]
    fn conditional_controls_do_not_apply_outside_their_condition() {
        let confidential = PolicyOverrides::new().client_secret_sha256(SECRET);
        assert_eq!(
            status(
                &RFC9700,
                "public-client-refresh",
                confidential.rotation(Rotation::Reuse)
            ),
            ControlStatus::NotApplicable
        );
        let kept = || PolicyOverrides::new().rotation(Rotation::Reuse);
        assert_eq!(
            status(
                &RFC9700,
                "reuse-revokes",
                kept().on_reuse(OnReuse::ReportOnly)
            ),
            ControlStatus::NotApplicable
        );
        assert_eq!(
            status(&FAPI2, "rotation-retry", kept()),
            ControlStatus::NotApplicable
        );
        assert_eq!(
            status(
                &FAPI2,
                "rotation-retry",
                PolicyOverrides::new()
                    .grace_period(SIXTY)
                    .grace_max_replays(0)
            ),
            ControlStatus::NotMet
        );
        for id in ["allowlist-ranges", "allowlist-addresses"] {
            assert_eq!(
                status(&SALESFORCE, id, PolicyOverrides::new()),
                ControlStatus::NotApplicable
            );
        }
        // An IPv6 /48 is 2^80 addresses: counted without overflow.
        let v6 = PolicyOverrides::new().ip_allowlist(cidrs(&["2001:db8::/48", "::/0"]));
        assert_eq!(
            status(&SALESFORCE, "allowlist-addresses", v6),
            ControlStatus::Warning
        );
        assert_eq!(
            status(
                &SALESFORCE,
                "idle-ttl",
                PolicyOverrides::new().idle_ttl(None)
            ),
            ControlStatus::NotMet
        );
    }

    #[test]
    fn every_control_has_its_test_and_names_real_knobs() {
        let mut tested: HashSet<(&str, &str)> =
            cases().iter().map(|(p, id, ..)| (p.name, *id)).collect();
        tested.extend(FIXED.iter().map(|(p, id, _)| (*p, *id)));
        for profile in ALL {
            let mut ids = HashSet::new();
            for c in profile.controls {
                assert!(ids.insert(c.id), "{} {} twice", profile.name, c.id);
                assert!(
                    tested.contains(&(profile.name, c.id)),
                    "{} {} untested",
                    profile.name,
                    c.id
                );
                for k in c.knobs {
                    assert!(
                        crate::policy::KNOB_NAMES.contains(k),
                        "{} {}: {k}",
                        profile.name,
                        c.id
                    );
                }
                assert!(!c.source.is_empty() && !c.source.contains('\n'));
            }
        }
    }
}
