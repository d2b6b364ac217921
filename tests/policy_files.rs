//! Policy files (README "Policy files"): the loader's errors, each naming
//! file, line, column and key; the shipped policy sets. The `refresh-guard
//! policy` command line is tested with its binary, in server/tests/cli.rs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use refresh_guard::{Error, IpCheck, LoadErrors, OnReuse, Pkce, PolicySet, Position, Rotation};

/// Load in-memory files as if they were `policies/<name>`.
fn load(files: &[(&str, &str)]) -> Result<PolicySet, LoadErrors> {
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, _)| Path::new("policies").join(name))
        .collect();
    let files: Vec<(&Path, &str)> = paths
        .iter()
        .zip(files)
        .map(|(p, (_, text))| (p.as_path(), *text))
        .collect();
    PolicySet::from_toml(&files)
}

/// The error lines of a set that must fail.
fn errors(files: &[(&str, &str)]) -> Vec<String> {
    match load(files) {
        Ok(set) => panic!("loaded, version {}", set.version()),
        Err(e) => e.to_strings(),
    }
}

/// Exactly one error, and it is `want`.
fn one_error(files: &[(&str, &str)], want: &str) {
    assert_eq!(errors(files), [want]);
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

const DAY: Duration = Duration::from_secs(86_400);

// ---- one test per kind of error ----

#[test]
fn syntax_error_names_file_line_and_column() {
    let e = errors(&[("a.toml", "[defaults]\nidle_ttl = 30d\n")]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("policies/a.toml:2:12: syntax error: "),
        "{e:?}"
    );
}

#[test]
fn unknown_knob_suggests_the_close_one() {
    one_error(
        &[(
            "mobile.toml",
            "[clients.mobile-app]\nrotation = \"rotate\"\ngrace_perod = \"10s\"\n",
        )],
        "policies/mobile.toml:3:1: clients.mobile-app.grace_perod: \
         unknown knob `grace_perod`; did you mean `grace_period`?",
    );
}

#[test]
fn unknown_knob_far_from_any_lists_them_all() {
    let e = errors(&[("a.toml", "[defaults]\ncolour = \"blue\"\n")]);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("policies/a.toml:2:1: defaults.colour: unknown knob `colour`; knobs are rotation, grace_period,"),
        "{e:?}"
    );
    assert!(
        e[0].ends_with("client_secret_sha256, dpop, dpop_nonce, access_token_format"),
        "{e:?}"
    );
}

#[test]
fn unknown_top_level_table_is_refused() {
    one_error(
        &[("a.toml", "[client.mobile]\nrotation = \"rotate\"\n")],
        "policies/a.toml:1:2: client: unknown table `client`; did you mean `clients`?",
    );
    one_error(
        &[("a.toml", "[server]\nport = 1\n")],
        "policies/a.toml:1:2: server: unknown table `server`; \
         a policy file has only [defaults] and [clients.<client_id>]",
    );
}

#[test]
fn knob_outside_a_table_is_refused() {
    one_error(
        &[("a.toml", "idle_ttl = \"1d\"\n")],
        "policies/a.toml:1:1: idle_ttl: knob outside any table; \
         put it under [defaults] or [clients.<client_id>]",
    );
}

#[test]
fn out_of_range_duration_names_the_maximum() {
    // The example of the issue, to the column.
    one_error(
        &[(
            "mobile.toml",
            "# mobile apps\n\n[clients.mobile-app]\ngrace_period = \"6m\"\n",
        )],
        "policies/mobile.toml:4:16: clients.mobile-app.grace_period: \
         6m is longer than the maximum 5m",
    );
    one_error(
        &[("a.toml", "[defaults]\ncode_ttl = \"11m\"\n")],
        "policies/a.toml:2:12: defaults.code_ttl: 11m is outside 1ms..=10m",
    );
    one_error(
        &[("a.toml", "[defaults]\nidle_ttl = \"0s\"\n")],
        "policies/a.toml:2:12: defaults.idle_ttl: 0s is not allowed; use \"none\" for no limit",
    );
}

#[test]
fn bad_duration_syntax_shows_the_forms() {
    one_error(
        &[("a.toml", "[defaults]\nidle_ttl = \"10 days\"\n")],
        "policies/a.toml:2:12: defaults.idle_ttl: \"10 days\" is not a duration; \
         write a whole number and a unit: \"500ms\", \"45s\", \"10m\", \"12h\", \"30d\", or \"none\"",
    );
    one_error(
        &[("a.toml", "[defaults]\ngrace_period = \"1h30m\"\n")],
        "policies/a.toml:2:16: defaults.grace_period: \"1h30m\" is not a duration; \
         write a whole number and a unit: \"500ms\", \"45s\", \"10m\", \"12h\", \"30d\"",
    );
}

#[test]
fn none_is_only_for_the_lifetimes() {
    let set = load(&[(
        "a.toml",
        "[defaults]\nidle_ttl = \"none\"\nabsolute_ttl = \"none\"\n",
    )])
    .unwrap();
    assert_eq!(set.defaults().idle_ttl(), None);
    assert_eq!(set.defaults().absolute_ttl(), None);
    one_error(
        &[("a.toml", "[defaults]\ngrace_period = \"none\"\n")],
        "policies/a.toml:2:16: defaults.grace_period: \
         \"none\" is only allowed for idle_ttl and absolute_ttl; write a duration",
    );
}

#[test]
fn bad_enum_value_lists_the_allowed_ones() {
    one_error(
        &[("a.toml", "[clients.web]\nrotation = \"rotating\"\n")],
        "policies/a.toml:2:12: clients.web.rotation: \"rotating\" is not allowed; \
         use one of \"rotate\", \"reuse\"",
    );
    one_error(
        &[("a.toml", "[clients.web]\npkce = \"S256\"\n")],
        "policies/a.toml:2:8: clients.web.pkce: \"S256\" is not allowed; \
         use one of \"s256\", \"s256_or_plain\", \"optional\" (did you mean \"s256\"?)",
    );
    one_error(
        &[("a.toml", "[clients.web]\non_reuse = \"logout\"\n")],
        "policies/a.toml:2:12: clients.web.on_reuse: \"logout\" is not allowed; use one of \
         \"revoke_family\", \"revoke_subject_client\", \"revoke_subject\", \"report_only\"",
    );
}

#[test]
fn bad_cidr_points_at_the_entry() {
    one_error(
        &[(
            "a.toml",
            "[clients.web]\nip_allowlist = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
        )],
        "policies/a.toml:2:31: clients.web.ip_allowlist: \
         allow-list entry \"10.0.0.0/33\": prefix length must be at most 32",
    );
    one_error(
        &[(
            "a.toml",
            "[clients.web]\nip_allowlist = [\n  \"10.1.2.3/8\",\n]\n",
        )],
        "policies/a.toml:3:3: clients.web.ip_allowlist: \
         allow-list entry \"10.1.2.3/8\": host bits set; did you mean 10.0.0.0/8?",
    );
    let e = errors(&[("a.toml", "[clients.web]\nip_allowlist = [\"intranet\"]\n")]);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with(
            "policies/a.toml:2:17: clients.web.ip_allowlist: allow-list entry \"intranet\" is not understood; use a cidr"
        ),
        "{e:?}"
    );
}

#[test]
fn reversed_range_is_refused() {
    one_error(
        &[(
            "a.toml",
            "[clients.web]\nip_allowlist = [\"192.0.2.20-192.0.2.10\"]\n",
        )],
        "policies/a.toml:2:17: clients.web.ip_allowlist: allow-list entry \
         \"192.0.2.20-192.0.2.10\": range start is above its end; write the lower address first",
    );
}

#[test]
fn client_in_two_files_names_both() {
    one_error(
        &[
            ("a.toml", "[clients.mobile-app]\ngrace_period = \"10s\"\n"),
            (
                "b.toml",
                "[defaults]\n\n[clients.mobile-app]\nidle_ttl = \"1d\"\n",
            ),
        ],
        "policies/b.toml:3:10: clients.mobile-app: also defined in \
         policies/a.toml:1:10; a client may be defined in one file only",
    );
}

#[test]
fn defaults_in_two_files_names_both() {
    one_error(
        &[
            ("a.toml", "[defaults]\nidle_ttl = \"1d\"\n"),
            ("b.toml", "[defaults]\nidle_ttl = \"2d\"\n"),
        ],
        "policies/b.toml:1:2: defaults: also defined in policies/a.toml:1:2; \
         [defaults] may be set in one file only",
    );
}

#[test]
fn malformed_client_secret_hash_is_refused_without_echo() {
    one_error(
        &[(
            "a.toml",
            "[clients.api]\nclient_secret_sha256 = \"s3cr3t\"\n",
        )],
        "policies/a.toml:2:24: clients.api.client_secret_sha256: expected the SHA-256 of the \
         client secret as 64 hex characters (printf %s \"$SECRET\" | sha256sum); \
         found 6 characters (value not shown)",
    );
}

#[test]
fn wrong_type_says_what_was_expected() {
    one_error(
        &[("a.toml", "[defaults]\ngrace_max_replays = \"3\"\n")],
        "policies/a.toml:2:21: defaults.grace_max_replays: \
         expected an integer 0..=255; found a string",
    );
    one_error(
        &[("a.toml", "[defaults]\ngrace_same_ip = \"yes\"\n")],
        "policies/a.toml:2:17: defaults.grace_same_ip: expected true or false; found a string",
    );
    one_error(
        &[("a.toml", "[defaults]\nidle_ttl = 30\n")],
        "policies/a.toml:2:12: defaults.idle_ttl: expected a duration string, \
         a whole number and a unit: \"500ms\", \"45s\", \"10m\", \"12h\", \"30d\", \
         or \"none\"; found an integer",
    );
    one_error(
        &[("a.toml", "[defaults]\nip_allowlist = \"10.0.0.0/8\"\n")],
        "policies/a.toml:2:16: defaults.ip_allowlist: expected an array of strings like \
         [\"10.0.0.0/8\", \"192.0.2.10-192.0.2.20\"]; found a string",
    );
    one_error(
        &[("a.toml", "[defaults]\ngrace_max_replays = 256\n")],
        "policies/a.toml:2:21: defaults.grace_max_replays: 256 is outside 0..=255",
    );
    one_error(
        &[("a.toml", "[clients]\nweb = 5\n")],
        "policies/a.toml:2:7: clients.web: expected a table of knobs; found an integer",
    );
}

#[test]
fn bad_client_id_is_placed_at_its_table() {
    one_error(
        &[("a.toml", "[clients.\"\"]\nrotation = \"reuse\"\n")],
        "policies/a.toml:1:10: clients.\"\": client id must be 1 to 255 bytes",
    );
}

#[test]
fn client_ids_with_dots_are_quoted_in_messages() {
    one_error(
        &[(
            "a.toml",
            "[clients.\"app.example.com\"]\ngrace_period = \"6m\"\n",
        )],
        "policies/a.toml:2:16: clients.\"app.example.com\".grace_period: \
         6m is longer than the maximum 5m",
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let e = errors(&[
        // A syntax error in one file does not hide the others' errors.
        ("a.toml", "[defaults\nidle_ttl = \"1d\"\n"),
        (
            "b.toml",
            "[clients.x]\nrotation = \"rotating\"\ngrace_period = \"6m\"\nfoo = 1\n",
        ),
        ("c.toml", "[clients.x]\n[clients.y]\ncode_ttl = \"1h\"\n"),
    ]);
    let located: Vec<&str> = e.iter().map(|l| l.split(": ").next().unwrap()).collect();
    assert_eq!(
        located,
        [
            "policies/a.toml:1:10",
            "policies/b.toml:2:12",
            "policies/b.toml:3:16",
            "policies/b.toml:4:1",
            "policies/c.toml:1:10",
            "policies/c.toml:3:12",
        ],
        "{e:#?}"
    );
}

#[test]
fn load_errors_become_the_crate_error() {
    let e = load(&[("a.toml", "[defaults]\nfoo = 1\n")]).unwrap_err();
    assert_eq!(e.len(), 1);
    let first = &e.errors()[0];
    assert_eq!(first.path, Path::new("policies/a.toml"));
    assert_eq!(first.position, Some(Position { line: 2, column: 1 }));
    assert_eq!(first.key.as_deref(), Some("defaults.foo"));
    let err: Error = e.into();
    assert!(matches!(&err, Error::PolicyFiles { errors } if errors.len() == 1));
    assert!(
        err.to_string()
            .starts_with("policy files refused (1 problem)\n  policies/a.toml:2:1: defaults.foo:"),
        "{err}"
    );
}

// ---- directories ----

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn directory_without_policy_files_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "README.md", "not a policy");
    let e = PolicySet::load_dir(dir.path()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: no *.toml files in this directory; a policy set needs at least one",
            dir.path().display()
        )
    );
    let missing = dir.path().join("missing");
    let e = PolicySet::load_dir(&missing).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: cannot read directory:", missing.display())),
        "{e}"
    );
}

#[test]
fn only_toml_files_directly_inside_are_read_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "b.toml", "[clients.x]\nidle_ttl = \"2d\"\n");
    write(d, "a.toml", "[clients.x]\nidle_ttl = \"1d\"\n");
    // Not read: other extensions, editor lock files, subdirectories.
    write(d, "c.toml.bak", "[clients.x]\nbroken");
    write(d, ".#a.toml", "broken");
    std::fs::create_dir(d.join("examples")).unwrap();
    write(&d.join("examples"), "e.toml", "broken");
    let e = PolicySet::load_dir(d).unwrap_err();
    // Name order: b.toml is the second definition, whatever order the
    // directory lists them in.
    assert_eq!(e.len(), 1, "{e}");
    assert_eq!(e.errors()[0].path, d.join("b.toml"));
    std::fs::remove_file(d.join("b.toml")).unwrap();
    let set = PolicySet::load_dir(d).unwrap();
    assert_eq!(set.policy("x").idle_ttl(), Some(DAY));
}

/// The version is a hash of the effective policies, so how they are split
/// into files, ordered, spaced, commented or spelt does not change it.
#[test]
fn version_depends_on_content_not_bytes() {
    let one = load(&[(
        "all.toml",
        "[defaults]\nidle_ttl = \"30d\"\n\n[clients.web]\ngrace_period = \"10s\"\n\
         ip_allowlist = [\"10.0.0.0/8\", \"192.0.2.10-192.0.2.20\"]\n\n\
         [clients.api]\nrotation = \"reuse\"\n",
    )])
    .unwrap();
    let split = load(&[
        (
            "1-api.toml",
            "# the backend\n[clients.api]\n   rotation   =   'reuse'   # kept\n",
        ),
        (
            "2-web.toml",
            "[clients.web]\nip_allowlist = [\n  \"192.0.2.10 - 192.0.2.20\",\n  \
             \"10.0.0.0-10.255.255.255\",\n]\ngrace_period = \"10000ms\"\n",
        ),
        // idle_ttl 30d is the built-in default: writing it or not is the same.
        ("3-defaults.toml", "[defaults]\n"),
    ])
    .unwrap();
    assert_eq!(one.version(), split.version());
    let changed = load(&[(
        "all.toml",
        "[defaults]\nidle_ttl = \"30d\"\n\n[clients.web]\ngrace_period = \"11s\"\n\
         ip_allowlist = [\"10.0.0.0/8\", \"192.0.2.10-192.0.2.20\"]\n\n\
         [clients.api]\nrotation = \"reuse\"\n",
    )])
    .unwrap();
    assert_ne!(one.version(), changed.version());
}

// ---- the shipped policy sets ----

#[test]
fn shipped_default_set_is_rfc_9700_best_practice() {
    let set = PolicySet::load_dir(&repo("policies")).unwrap();
    assert!(set.clients().is_empty(), "the default set is defaults only");
    let p = set.defaults();
    // RFC 9700 §4.14.2: rotation, reuse revokes the lineage, idle expiry.
    assert_eq!(p.rotation(), Rotation::Rotate);
    assert_eq!(p.on_reuse(), OnReuse::RevokeFamily);
    assert_eq!(p.idle_ttl(), Some(30 * DAY));
    assert_eq!(p.absolute_ttl(), Some(90 * DAY));
    // A short grace for lost responses, one replay.
    assert!(p.grace_period() > Duration::ZERO && p.grace_period() <= Duration::from_secs(30));
    assert_eq!(p.grace_max_replays(), 1);
    // RFC 9700 §2.1.1: PKCE with S256 only.
    assert_eq!(p.pkce(), Pkce::S256);
    assert!(p.ip_allowlist().is_any());
    assert!(p.client_secret_sha256().is_none());
    assert!(p.code_ttl() <= Duration::from_secs(60));
}

#[test]
fn salesforce_eca_example_loads() {
    let set = PolicySet::load_dir(&repo("policies/examples/salesforce-eca")).unwrap();
    let p = set.policy("partner-app");
    assert!(set.has_client("partner-app"));
    assert_eq!(p.pkce(), Pkce::S256);
    assert_eq!(p.rotation(), Rotation::Rotate);
    assert!(p.idle_ttl().is_some());
    assert_eq!(p.ip_check(), IpCheck::EveryRefresh);
    assert!(!p.ip_allowlist().is_any());
    assert!(p.ip_allowlist().contains("198.51.100.7".parse().unwrap()));
    assert!(p.ip_allowlist().contains("203.0.113.15".parse().unwrap()));
    assert!(p.ip_allowlist().contains("2001:db8:ec::1".parse().unwrap()));
    assert!(!p.ip_allowlist().contains("203.0.113.21".parse().unwrap()));
}

#[test]
fn spa_example_loads() {
    let set = PolicySet::load_dir(&repo("policies/examples/spa")).unwrap();
    let p = set.policy("spa");
    assert!(set.has_client("spa"));
    assert_eq!(p.rotation(), Rotation::Rotate);
    assert!(p.grace_period() > Duration::ZERO);
    assert!(p.grace_same_ip());
    assert!(p.idle_ttl().unwrap() <= DAY, "a short idle lifetime");
    assert!(p.client_secret_sha256().is_none(), "a public client");
    assert!(p.ip_allowlist().is_any());
    assert_eq!(p.pkce(), Pkce::S256);
}

#[test]
fn confidential_backend_example_loads() {
    let set = PolicySet::load_dir(&repo("policies/examples/confidential-backend")).unwrap();
    let p = set.policy("billing-backend");
    assert!(set.has_client("billing-backend"));
    assert_eq!(p.rotation(), Rotation::Reuse);
    assert_eq!(p.ip_check(), IpCheck::EveryRefresh);
    assert!(!p.ip_allowlist().is_any());
    // The documented example secret.
    let hash = p.client_secret_sha256().expect("a confidential client");
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex, "63125a0343b1da46aa570d8c2c1ce7e5070da880f43a5cd38d70c24c89db0334",
        "sha256(\"example-only-secret-replace-me\"), as the file's comment says"
    );
}
