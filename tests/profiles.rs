//! Compliance profiles (README "Compliance profiles"): every shipped set
//! meets exactly the profiles its comments claim; reports carry each
//! deciding knob's value and the file and line that set it; that
//! provenance stays out of the version; the JSON form has its documented
//! fields; two reports compare; the README's sample is a rendered report.

use std::path::{Path, PathBuf};

use refresh_guard::{
    ControlStatus, Location, Origin, PolicySet, Profile, ProfileReport, UnknownClients,
};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Load in-memory files as if they were `policies/<name>`.
fn load(files: &[(&str, &str)]) -> PolicySet {
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, _)| Path::new("policies").join(name))
        .collect();
    let files: Vec<(&Path, &str)> = paths
        .iter()
        .zip(files)
        .map(|(p, (_, text))| (p.as_path(), *text))
        .collect();
    PolicySet::from_toml(&files).unwrap()
}

/// Load a directory of the repository as the README's commands do: with
/// paths relative to the repository root, so evidence reads `policies/…`.
fn load_repo(dir: &str) -> PolicySet {
    let mut files: Vec<(String, String)> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml") && !n.starts_with('.'))
        .map(|n| {
            let text = std::fs::read_to_string(repo(dir).join(&n)).unwrap();
            (format!("{dir}/{n}"), text)
        })
        .collect();
    files.sort();
    let files: Vec<(&Path, &str)> = files
        .iter()
        .map(|(p, t)| (Path::new(p.as_str()), t.as_str()))
        .collect();
    PolicySet::from_toml(&files).unwrap()
}

fn check(set: &PolicySet, profile: &str) -> ProfileReport {
    set.check_profile(Profile::named(profile).unwrap())
}

fn row<'r>(
    r: &'r ProfileReport,
    client: Option<&str>,
    control: &str,
) -> &'r refresh_guard::ControlRow {
    let scope = r
        .scopes
        .iter()
        .find(|s| s.client.as_deref() == client)
        .unwrap();
    scope
        .controls
        .iter()
        .find(|c| c.control == control)
        .unwrap()
}

fn at(file: &str, line: u32) -> Option<Location> {
    Some(Location {
        file: file.to_owned(),
        line,
    })
}

// ---- the shipped sets ----

/// The profiles a set's files claim, from their `# Meets profiles:` lines.
fn claims(dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut found = false;
    for e in std::fs::read_dir(repo(dir)).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            if let Some(list) = line.strip_prefix("# Meets profiles:") {
                found = true;
                out.extend(
                    list.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty() && s != "none"),
                );
            }
        }
    }
    assert!(found, "{dir}: no `# Meets profiles:` line");
    out
}

#[test]
fn each_shipped_set_meets_exactly_the_profiles_it_claims() {
    let mut dirs = vec!["policies".to_owned()];
    for e in std::fs::read_dir(repo("policies/examples")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        dirs.push(format!("policies/examples/{name}"));
    }
    assert!(dirs.len() >= 4, "{dirs:?}");
    for dir in &dirs {
        let set = load_repo(dir);
        let claimed = claims(dir);
        for name in &claimed {
            assert!(Profile::named(name).is_ok(), "{dir} claims unknown {name}");
        }
        for profile in Profile::all() {
            let report = set.check_profile(profile);
            assert_eq!(
                report.met,
                claimed.iter().any(|c| c == profile.name),
                "{dir}: claimed {claimed:?}; {}:\n{report}",
                profile.name
            );
        }
    }
}

#[test]
fn salesforce_eca_example_meets_salesforce_appexchange() {
    let set = load_repo("policies/examples/salesforce-eca");
    let r = check(&set, "salesforce-appexchange");
    assert!(r.met, "{r}");
    assert_eq!((r.not_met, r.warnings), (0, 0), "{r}");
    // Its [defaults] has no allow-list; it counts for nothing because
    // unlisted clients are refused.
    assert_eq!(set.unknown_clients(), UnknownClients::Refuse);
    let defaults = &r.scopes[0];
    assert!(!defaults.governs);
    assert!(
        defaults
            .controls
            .iter()
            .all(|c| c.status == ControlStatus::NotApplicable)
    );
    let allow = row(&r, Some("partner-app"), "ip-allowlist");
    assert_eq!(allow.status, ControlStatus::Met);
    assert_eq!(
        allow.evidence[0].origin,
        Origin::Set(at("policies/examples/salesforce-eca/partner-app.toml", 13))
    );
}

#[test]
fn fapi2_sender_constraint_is_not_met_for_any_client_without_dpop() {
    let set = load_repo("policies/examples/spa");
    let r = check(&set, "fapi2-refresh");
    for s in &r.scopes {
        let row = s
            .controls
            .iter()
            .find(|c| c.control == "sender-constrained")
            .unwrap();
        assert_eq!(row.status, ControlStatus::NotMet);
        // The app binds when it can (`allowed`); FAPI 2.0 wants `required`.
        let note = match s.client.as_deref() {
            Some("spa") => "dpop = allowed: an exchange or refresh without a proof is still served",
            _ => "dpop = off: tokens are not sender-constrained",
        };
        assert_eq!(row.note.as_deref(), Some(note));
        for name in ["client-authentication", "par"] {
            let row = s.controls.iter().find(|c| c.control == name).unwrap();
            assert_eq!(row.status, ControlStatus::NotApplicable, "{name}");
            assert!(
                row.note
                    .as_deref()
                    .unwrap()
                    .starts_with("not decided by refresh-guard")
            );
        }
    }
}

/// FAPI 2.0's sender constraint is met by `dpop = "required"`, with the
/// file and line that set it as evidence; RFC 9700 then accepts a kept
/// (not rotated) public token as DPoP-bound.
#[test]
fn dpop_required_meets_fapi2_sender_constraint_with_its_line_as_evidence() {
    let text = "[clients.app]\nrotation = \"reuse\"\ndpop = \"required\"\n";
    let set = load(&[("app.toml", text)]);
    let fapi = check(&set, "fapi2-refresh");
    let c = row(&fapi, Some("app"), "sender-constrained");
    assert_eq!(c.status, ControlStatus::Met);
    assert_eq!(
        c.evidence[0].origin,
        Origin::Set(at("policies/app.toml", 3))
    );
    let rfc = check(&set, "rfc9700");
    assert_eq!(
        row(&rfc, Some("app"), "public-client-refresh").status,
        ControlStatus::Met
    );
}

// ---- provenance ----

const DEFAULTS: &str = "unknown_clients = \"defaults\"\n\
                        [defaults]\n\
                        idle_ttl = \"20d\"\n\
                        pkce = \"s256\"\n";
const APP: &str = "# the app\n\
                   [clients.app]\n\
                   rotation = \"rotate\"\n\
                   ip_allowlist = [\"192.0.2.1\"]\n";

#[test]
fn evidence_names_the_file_and_line_of_each_knob_or_its_default() {
    let set = load(&[("defaults.toml", DEFAULTS), ("app.toml", APP)]);
    let r = check(&set, "salesforce-appexchange");
    let app = |control, i: usize| row(&r, Some("app"), control).evidence[i].clone();
    // Written in the client's table.
    assert_eq!(
        app("rotation", 0).origin,
        Origin::Set(at("policies/app.toml", 3))
    );
    assert_eq!(app("ip-allowlist", 0).value, "192.0.2.1/32");
    assert_eq!(
        app("ip-allowlist", 0).origin,
        Origin::Set(at("policies/app.toml", 4))
    );
    // Not in its table: inherited from [defaults], where it was written.
    let idle = app("idle-ttl", 0);
    assert_eq!(idle.value, "20d");
    assert_eq!(
        idle.origin,
        Origin::Inherited(at("policies/defaults.toml", 3))
    );
    assert_eq!(
        idle.origin.to_string(),
        "[defaults] at policies/defaults.toml:3"
    );
    // Written nowhere: the built-in default.
    assert_eq!(app("ip-allowlist", 1).knob, "ip_check");
    assert_eq!(app("ip-allowlist", 1).origin, Origin::Default);
    // [defaults]'s own knobs are set there, not inherited.
    let d = row(&r, None, "idle-ttl").evidence[0].clone();
    assert_eq!(d.origin, Origin::Set(at("policies/defaults.toml", 3)));
    assert_eq!(
        row(&r, None, "rotation").evidence[0].origin,
        Origin::Default
    );
    // The tables and the set-wide setting.
    assert_eq!(r.scopes[0].table, at("policies/defaults.toml", 2));
    assert_eq!(r.scopes[1].table, at("policies/app.toml", 2));
    assert_eq!(
        r.unknown_clients.origin,
        Origin::Set(at("policies/defaults.toml", 1))
    );
    let p = set.provenance();
    assert_eq!(
        p.client("app").unwrap().knob("pkce"),
        Some(&Origin::Inherited(at("policies/defaults.toml", 4)))
    );
    assert!(p.client("other").is_none());
    assert!(p.defaults().knob("no_such_knob").is_none());
}

/// Moving lines, splitting files and comments change the evidence only:
/// the version is a hash of the effective policies (README "Policy
/// files"), and provenance is kept beside it.
#[test]
fn moving_lines_changes_the_evidence_not_the_version() {
    let one = load(&[("all.toml", &format!("{DEFAULTS}{APP}"))]);
    let moved = load(&[
        ("app.toml", &format!("\n\n\n{APP}")),
        ("z.toml", &format!("# comment\n\n{DEFAULTS}")),
    ]);
    assert_eq!(one.version(), moved.version());
    let (a, b) = (one.provenance(), moved.provenance());
    assert_eq!(
        a.defaults().knob("idle_ttl"),
        Some(&Origin::Set(at("policies/all.toml", 3)))
    );
    assert_eq!(
        b.defaults().knob("idle_ttl"),
        Some(&Origin::Set(at("policies/z.toml", 5)))
    );
    assert_ne!(a, b);
    let (ra, rb) = (
        check(&one, "salesforce-appexchange"),
        check(&moved, "salesforce-appexchange"),
    );
    assert_eq!(ra.policy_version, rb.policy_version);
    assert_ne!(ra, rb, "the evidence moved");
}

#[test]
fn sets_built_in_code_say_so() {
    use refresh_guard::PolicyOverrides;
    let set = PolicySet::builder()
        .defaults(PolicyOverrides::new().idle_ttl(None))
        .client(
            "c",
            PolicyOverrides::new().pkce(refresh_guard::Pkce::Optional),
        )
        .build()
        .unwrap();
    let c = set.provenance().client("c").unwrap();
    assert_eq!(c.knob("pkce"), Some(&Origin::Set(None)));
    assert_eq!(c.knob("idle_ttl"), Some(&Origin::Inherited(None)));
    assert_eq!(c.knob("rotation"), Some(&Origin::Default));
    assert_eq!(c.knob("pkce").unwrap().to_string(), "set in code");
    assert!(c.table().is_none());
}

// ---- [defaults] and unknown_clients ----

#[test]
fn defaults_count_only_while_they_govern_unlisted_clients() {
    let served = load(&[("defaults.toml", DEFAULTS), ("app.toml", APP)]);
    let r = check(&served, "salesforce-appexchange");
    assert!(!r.met);
    assert_eq!(row(&r, None, "ip-allowlist").status, ControlStatus::NotMet);
    assert_eq!(
        row(&r, Some("app"), "ip-allowlist").status,
        ControlStatus::Met
    );

    let refusing = DEFAULTS.replace("\"defaults\"", "\"refuse\"");
    let refused = load(&[("defaults.toml", &refusing), ("app.toml", APP)]);
    let r = check(&refused, "salesforce-appexchange");
    assert!(r.met, "{r}");
    let row = row(&r, None, "ip-allowlist");
    assert_eq!(row.status, ControlStatus::NotApplicable);
    assert_eq!(row.evidence[0].knob, "unknown_clients");
    assert_eq!(row.evidence[0].value, "refuse");
}

// ---- the JSON form ----

fn keys(v: &serde_json::Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

/// The field names README "Compliance profiles" documents; the CLI's
/// `--format json` and the server's 422 body are this form.
#[test]
fn json_form_has_the_documented_fields() {
    let set = load(&[("defaults.toml", DEFAULTS), ("app.toml", APP)]);
    let r = check(&set, "salesforce-appexchange");
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(
        keys(&v),
        [
            "met",
            "not_met",
            "policy_version",
            "profile",
            "scopes",
            "title",
            "unknown_clients",
            "warnings"
        ]
    );
    assert_eq!(v["profile"], "salesforce-appexchange");
    assert_eq!(v["policy_version"], set.version().to_string());
    assert_eq!(v["met"], false);
    assert_eq!(v["unknown_clients"]["value"], "defaults");
    let defaults = &v["scopes"][0];
    assert_eq!(
        keys(defaults),
        ["client", "controls", "governs", "not_met", "scope", "table"]
    );
    assert_eq!(defaults["scope"], "defaults");
    assert!(defaults["client"].is_null());
    assert_eq!(
        defaults["table"],
        serde_json::json!({"file": "policies/defaults.toml", "line": 2})
    );
    let allow = &defaults["controls"][3];
    assert_eq!(
        keys(allow),
        [
            "control", "evidence", "level", "note", "source", "status", "title"
        ]
    );
    assert_eq!(allow["control"], "ip-allowlist");
    assert_eq!(allow["status"], "not_met");
    assert_eq!(allow["level"], "required");
    assert_eq!(
        allow["evidence"][0],
        serde_json::json!({"knob": "ip_allowlist", "value": "any", "origin": {"kind": "default"}})
    );
    let app = &v["scopes"][1];
    assert_eq!(app["scope"], "clients.app");
    assert_eq!(app["client"], "app");
    assert_eq!(
        app["controls"][2]["evidence"][0]["origin"],
        serde_json::json!({"kind": "inherited", "file": "policies/defaults.toml", "line": 3})
    );
    assert_eq!(v["scopes"][1]["controls"][4]["status"], "met");
    assert_eq!(v["scopes"][1]["controls"][4]["level"], "advisory");
    assert_eq!(v["scopes"][0]["controls"][4]["status"], "not_applicable");
}

// ---- comparing reports ----

#[test]
fn changes_since_names_each_control_whose_status_changed() {
    let before = load(&[("defaults.toml", DEFAULTS), ("app.toml", APP)]);
    let after = load(&[
        ("defaults.toml", DEFAULTS),
        (
            "app.toml",
            "[clients.app]\nip_allowlist = [\"192.0.2.1\"]\nidle_ttl = \"31d\"\n",
        ),
        (
            "web.toml",
            "[clients.web]\nip_allowlist = [\"198.51.100.0/24\"]\n",
        ),
    ]);
    let (b, a) = (
        check(&before, "salesforce-appexchange"),
        check(&after, "salesforce-appexchange"),
    );
    let changes: Vec<String> = a.changes_since(&b).iter().map(|c| c.to_string()).collect();
    assert_eq!(
        changes,
        [
            "clients.app idle-ttl: met -> not_met",
            // Was under [defaults], which has no allow-list.
            "clients.web ip-allowlist: not_met -> met",
            "clients.web allowlist-ranges: not_applicable -> met",
            "clients.web allowlist-addresses: not_applicable -> met",
        ]
    );
    assert!(b.changes_since(&b).is_empty());

    // Refusing unlisted clients: [defaults] stops counting, and a client
    // that was under it is now refused.
    let refusing = DEFAULTS.replace("\"defaults\"", "\"refuse\"");
    let refused = load(&[("defaults.toml", &refusing), ("app.toml", APP)]);
    let r = check(&refused, "salesforce-appexchange");
    let changes: Vec<String> = r.changes_since(&a).iter().map(|c| c.to_string()).collect();
    assert!(
        changes.contains(&"defaults ip-allowlist: not_met -> not_applicable".to_owned()),
        "{changes:?}"
    );
    assert!(
        changes.contains(&"clients.web ip-allowlist: met -> refused".to_owned()),
        "{changes:?}"
    );
    assert!(
        changes.contains(&"clients.app idle-ttl: not_met -> met".to_owned()),
        "{changes:?}"
    );
}

#[test]
fn an_unknown_profile_names_the_shipped_ones() {
    let e = Profile::named("rfc-9700").unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown profile `rfc-9700`; profiles are salesforce-appexchange, rfc9700, fapi2-refresh"
    );
}

// ---- the README's sample ----

const MARK: &str = "<!-- profile-report: ";

/// The README's not-met report is the rendering of the set and profile its
/// marker names, not typed by hand. `REFRESH_GUARD_BLESS=1` rewrites it.
#[test]
fn readme_sample_report_is_a_rendered_report() {
    let path = repo("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let start = readme
        .find(MARK)
        .expect("README has a profile-report marker");
    let line_end = start + readme[start..].find('\n').unwrap();
    let args: Vec<&str> = readme[start + MARK.len()..line_end]
        .trim_end_matches("-->")
        .split_whitespace()
        .collect();
    let [dir, profile] = args[..] else {
        panic!("marker: <!-- profile-report: DIR PROFILE -->")
    };
    let report = check(&load_repo(dir), profile);
    assert!(!report.met, "the README shows a not-met report");
    let open = line_end + 1;
    assert!(readme[open..].starts_with("```text\n"));
    let body = open + "```text\n".len();
    let close = body + readme[body..].find("```\n").unwrap();
    let rendered = report.to_string();
    if std::env::var_os("REFRESH_GUARD_BLESS").is_some() {
        let new = format!("{}{rendered}{}", &readme[..body], &readme[close..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    assert_eq!(
        &readme[body..close],
        rendered,
        "README sample is stale; rerun with REFRESH_GUARD_BLESS=1"
    );
}
