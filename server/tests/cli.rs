//! The `refresh-guard` command line: `policy check` and `policy diff` on
//! policy directories (README "The `refresh-guard` command"), and the
//! command line itself: help, errors, hints and `REFRESH_GUARD_*`
//! variables (README "Server").

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use refresh_guard::RedeemRequest;
use refresh_guard::{Engine, IssueRequest, LogOptions, LogStore, PolicySet};

/// A path in the repository (the workspace root, above this crate).
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// The binary with no `REFRESH_GUARD_*` variable of the caller's.
fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_refresh-guard"));
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("REFRESH_GUARD_")) {
            c.env_remove(k);
        }
    }
    c.current_dir(repo(""));
    c
}

fn cli(args: &[&str]) -> (i32, String, String) {
    cli_env(args, &[])
}

fn cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

#[test]
fn cli_check_prints_version_and_effective_knobs() {
    let set = PolicySet::load_dir(&repo("policies/examples/spa")).unwrap();
    let (code, out, err) = cli(&["policy", "check", "policies/examples/spa"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "{err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(format!("policy version {}: [defaults] and 1 client", set.version()).as_str())
    );
    assert_eq!(
        lines.next(),
        Some("unknown_clients = defaults: [defaults] governs every client not listed")
    );
    assert!(
        out.contains(
            "\n[defaults]\n  rotation                  rotate\n  grace_period              0s\n"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "\n[clients.spa]\n  rotation                  rotate\n* grace_period              15s\n"
        ),
        "{out}"
    );
    assert!(out.contains("\n* idle_ttl                  12h\n"), "{out}");
    assert!(out.ends_with("\n* differs from [defaults]\n"), "{out}");
    // Every knob, in every scope.
    assert_eq!(out.matches("client_secret_sha256").count(), 2);
}

/// The `dpop` knob shows in `policy check` (marked where it differs from
/// `[defaults]`), `policy diff` reports switching it, and a bad value is
/// refused with its file, line and the values allowed.
#[test]
fn cli_shows_and_diffs_the_dpop_knob() {
    let old = tempfile::tempdir().unwrap();
    let new = tempfile::tempdir().unwrap();
    write(old.path(), "p.toml", "[clients.spa]\ndpop = \"allowed\"\n");
    write(new.path(), "p.toml", "[clients.spa]\ndpop = \"required\"\n");
    let (o, n) = (old.path().to_str().unwrap(), new.path().to_str().unwrap());
    let (code, out, err) = cli(&["policy", "check", n]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\n  dpop                      off\n"), "{out}");
    assert!(
        out.contains("\n* dpop                      required\n"),
        "{out}"
    );
    let (code, out, err) = cli(&["policy", "diff", o, n]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.ends_with("\nclients.spa.dpop: allowed -> required\n"),
        "{out}"
    );
    write(new.path(), "p.toml", "[clients.spa]\ndpop = \"on\"\n");
    let (code, _, err) = cli(&["policy", "check", n]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "{n}/p.toml:2:8: clients.spa.dpop: \"on\" is not allowed; \
             use one of \"off\", \"allowed\", \"required\""
        )),
        "{err}"
    );
}

#[test]
fn cli_check_lists_every_error_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[defaults]\nidle_ttl = \"1 day\"\n");
    write(dir.path(), "b.toml", "[clients.x]\npkce = \"plain\"\n");
    let path = dir.path().to_str().unwrap();
    let (code, out, err) = cli(&["policy", "check", path]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].starts_with(&format!("{path}/a.toml:2:12: defaults.idle_ttl: ")));
    assert!(lines[1].starts_with(&format!("{path}/b.toml:2:8: clients.x.pkce: ")));
    assert_eq!(
        lines[2],
        format!("{path}: 2 problems; the set was not loaded")
    );
}

#[test]
fn cli_diff_prints_changes_knob_by_knob() {
    let old = tempfile::tempdir().unwrap();
    let new = tempfile::tempdir().unwrap();
    write(
        old.path(),
        "p.toml",
        "[clients.web]\nidle_ttl = \"30d\"\n[clients.legacy]\nrotation = \"reuse\"\n",
    );
    write(
        new.path(),
        "p.toml",
        "[defaults]\nabsolute_ttl = \"60d\"\n[clients.web]\nidle_ttl = \"1d\"\n\
         [clients.spa]\ngrace_same_ip = true\n",
    );
    let (o, n) = (old.path().to_str().unwrap(), new.path().to_str().unwrap());
    let (code, out, err) = cli(&["policy", "diff", o, n]);
    assert_eq!(code, 0, "{err}");
    let (vo, vn) = (
        PolicySet::load_dir(old.path()).unwrap().version(),
        PolicySet::load_dir(new.path()).unwrap().version(),
    );
    assert_eq!(
        out,
        format!(
            "policy version {vo} -> {vn}\n\
             unknown_clients = defaults: [defaults] governs every client not listed (unchanged)\n\
             defaults.absolute_ttl: 90d -> 60d\n\
             clients.legacy: removed (now under [defaults])\n\
             clients.legacy.rotation: reuse -> rotate\n\
             clients.legacy.absolute_ttl: 90d -> 60d\n\
             clients.spa: added (was under [defaults])\n\
             clients.spa.grace_same_ip: false -> true\n\
             clients.spa.absolute_ttl: 90d -> 60d\n\
             clients.web.idle_ttl: 30d -> 1d\n\
             clients.web.absolute_ttl: 90d -> 60d\n"
        )
    );
    let (code, out, _) = cli(&["policy", "diff", o, o]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!(
            "policy version {vo}: no change in effective knobs\n\
             unknown_clients = defaults: [defaults] governs every client not listed\n"
        )
    );
}

/// `policy check` and `policy diff` did not print the set-wide
/// `unknown_clients`, and `diff` called a client that gains a table under
/// `unknown_clients = "refuse"` one that "was under [defaults]" (it was
/// refused) and listed knob changes against defaults that governed nobody.
#[test]
fn check_and_diff_print_unknown_clients_and_refused_clients() {
    let (code, out, err) = cli(&["policy", "check", "policies/examples/salesforce-eca"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().nth(1),
        Some("unknown_clients = refuse: clients not listed are refused")
    );
    let old = tempfile::tempdir().unwrap();
    let new = tempfile::tempdir().unwrap();
    write(
        old.path(),
        "p.toml",
        "unknown_clients = \"refuse\"\n[clients.a]\n",
    );
    write(
        new.path(),
        "p.toml",
        "unknown_clients = \"refuse\"\n[clients.b]\nidle_ttl = \"1d\"\n",
    );
    let (o, n) = (old.path().to_str().unwrap(), new.path().to_str().unwrap());
    let (code, out, err) = cli(&["policy", "diff", o, n]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            "unknown_clients = refuse: clients not listed are refused (unchanged)",
            "clients.a: removed (now refused)",
            "clients.b: added (was refused)",
        ],
        "{out}"
    );
    write(new.path(), "p.toml", "[clients.a]\n");
    let (_, out, _) = cli(&["policy", "diff", o, n]);
    assert_eq!(
        out.lines().nth(1),
        Some("unknown_clients: refuse -> defaults"),
        "{out}"
    );
}

#[test]
fn check_with_profiles_prints_each_report_and_exits_3_when_one_is_not_met() {
    // One path for both, so that the evidence's file names agree.
    let dir = repo("policies/examples/spa");
    let spa = PolicySet::load_dir(&dir).unwrap();
    let profile = |n| refresh_guard::Profile::named(n).unwrap();
    let (code, out, err) = cli(&[
        "policy",
        "check",
        dir.to_str().unwrap(),
        "--profile",
        "rfc9700",
        "--profile=salesforce-appexchange",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.is_empty(), "{err}");
    // Both reports, in the order asked, as the library renders them.
    let want = format!(
        "{}\n{}",
        spa.check_profile(profile("rfc9700")),
        spa.check_profile(profile("salesforce-appexchange"))
    );
    assert_eq!(out, want);
    assert!(out.contains("NOT MET  ip-allowlist"), "{out}");
    let (code, out, err) = cli(&[
        "policy",
        "check",
        "policies/examples/spa",
        "--profile",
        "rfc9700",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("profile rfc9700: "), "{out}");
    // A set that does not load stays status 1, profile or not.
    let bad = tempfile::tempdir().unwrap();
    write(bad.path(), "p.toml", "[defaults]\nfoo = 1\n");
    let b = bad.path().to_str().unwrap();
    let (code, out, _) = cli(&["policy", "check", b, "--profile", "rfc9700"]);
    assert_eq!((code, out.as_str()), (1, ""));
}

#[test]
fn check_with_profiles_as_json_has_the_documented_envelope() {
    let dir = repo("policies/examples/salesforce-eca");
    let eca = PolicySet::load_dir(&dir).unwrap();
    let (code, out, err) = cli(&[
        "policy",
        "check",
        dir.to_str().unwrap(),
        "--profile",
        "salesforce-appexchange",
        "--profile",
        "fapi2-refresh",
        "--format",
        "json",
    ]);
    assert_eq!(code, 3, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["met", "policy_version", "reports"]);
    assert_eq!(v["met"], false);
    assert_eq!(v["policy_version"], eca.version().to_string());
    let reports = v["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 2);
    // Each report is the library's serde form.
    let want = serde_json::to_value(
        eca.check_profile(refresh_guard::Profile::named("salesforce-appexchange").unwrap()),
    )
    .unwrap();
    assert_eq!(reports[0], want);
    assert_eq!(reports[0]["met"], true);
    assert_eq!(reports[1]["profile"], "fapi2-refresh");
    assert_eq!(reports[1]["met"], false);
}

#[test]
fn an_unknown_profile_is_a_usage_error_listing_the_shipped_ones() {
    let (code, out, err) = cli(&["policy", "check", "policies", "--profile", "pci"]);
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains(
            "invalid value 'pci' for '--profile <NAME>': unknown profile `pci`; \
             profiles are salesforce-appexchange, rfc9700, fapi2-refresh"
        ),
        "{err}"
    );
    // --format is for reports: without a profile it is a usage error.
    let (code, _, err) = cli(&["policy", "check", "policies", "--format", "json"]);
    assert_eq!(code, 2);
    assert!(err.contains("--profile <NAME>"), "{err}");
}

#[test]
fn diff_with_profiles_lists_controls_whose_status_changes() {
    let (code, out, err) = cli(&[
        "policy",
        "diff",
        "policies/examples/spa",
        "policies/examples/salesforce-eca",
        "--profile",
        "salesforce-appexchange",
    ]);
    assert_eq!(code, 0, "{err}");
    let tail: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("profile "))
        .collect();
    assert_eq!(
        tail[0],
        "profile salesforce-appexchange: NOT MET (2 not met) -> met"
    );
    assert!(
        tail.contains(&"  clients.partner-app ip-allowlist: not_met -> met"),
        "{out}"
    );
    assert!(
        tail.contains(&"  clients.spa ip-allowlist: not_met -> refused"),
        "{out}"
    );
    // Back the other way the new set breaks the profile: status 3.
    let (code, out, _) = cli(&[
        "policy",
        "diff",
        "policies/examples/salesforce-eca",
        "policies/examples/spa",
        "--profile",
        "salesforce-appexchange",
    ]);
    assert_eq!(code, 3);
    assert!(
        out.contains("profile salesforce-appexchange: met -> NOT MET (2 not met)\n"),
        "{out}"
    );
    assert!(
        out.contains("  clients.partner-app ip-allowlist: met -> not_met\n"),
        "{out}"
    );
    // Unchanged status says so.
    let (code, out, _) = cli(&[
        "policy",
        "diff",
        "policies/examples/spa",
        "policies/examples/spa",
        "--profile",
        "rfc9700",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.ends_with("profile rfc9700: met -> met; no control changes status\n"),
        "{out}"
    );
}

#[test]
fn cli_diff_fails_if_either_side_fails() {
    let good = tempfile::tempdir().unwrap();
    let bad = tempfile::tempdir().unwrap();
    write(good.path(), "p.toml", "[defaults]\n");
    write(bad.path(), "p.toml", "[defaults]\nfoo = 1\n");
    let (g, b) = (good.path().to_str().unwrap(), bad.path().to_str().unwrap());
    let (code, out, err) = cli(&["policy", "diff", b, g]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("defaults.foo: unknown knob `foo`"), "{err}");
}

/// Every `serve` flag, with the variable it can also come from.
const SERVE_FLAGS: [(&str, &str); 23] = [
    ("--listen <ADDR>", "REFRESH_GUARD_LISTEN"),
    ("--admin-listen <ADDR>", "REFRESH_GUARD_ADMIN_LISTEN"),
    ("--policies <DIR>", "REFRESH_GUARD_POLICIES"),
    ("--data <DIR>", "REFRESH_GUARD_DATA"),
    ("--store <URL>", "REFRESH_GUARD_STORE"),
    ("--durability <MODE>", "REFRESH_GUARD_DURABILITY"),
    ("--trusted-proxies <LIST>", "REFRESH_GUARD_TRUSTED_PROXIES"),
    (
        "--admin-token-file <PATH>",
        "REFRESH_GUARD_ADMIN_TOKEN_FILE",
    ),
    ("--issuer <URL>", "REFRESH_GUARD_ISSUER"),
    (
        "--authorization-endpoint <URL>",
        "REFRESH_GUARD_AUTHORIZATION_ENDPOINT",
    ),
    ("--max-connections <N>", "REFRESH_GUARD_MAX_CONNECTIONS"),
    (
        "--max-connections-per-source <N>",
        "REFRESH_GUARD_MAX_CONNECTIONS_PER_SOURCE",
    ),
    (
        "--admin-max-connections <N>",
        "REFRESH_GUARD_ADMIN_MAX_CONNECTIONS",
    ),
    (
        "--admin-max-connections-per-source <N>",
        "REFRESH_GUARD_ADMIN_MAX_CONNECTIONS_PER_SOURCE",
    ),
    (
        "--first-request-timeout <DURATION>",
        "REFRESH_GUARD_FIRST_REQUEST_TIMEOUT",
    ),
    ("--workers <N>", "REFRESH_GUARD_WORKERS"),
    ("--watch-policies", "REFRESH_GUARD_WATCH_POLICIES"),
    ("--require-profile <NAME>", "REFRESH_GUARD_REQUIRE_PROFILE"),
    ("--report-profile <NAME>", "REFRESH_GUARD_REPORT_PROFILE"),
    ("--dpop-algs <ALGS>", "REFRESH_GUARD_DPOP_ALGS"),
    ("--dpop-max-age <DURATION>", "REFRESH_GUARD_DPOP_MAX_AGE"),
    (
        "--dpop-max-ahead <DURATION>",
        "REFRESH_GUARD_DPOP_MAX_AHEAD",
    ),
    (
        "--dpop-replay-capacity <N>",
        "REFRESH_GUARD_DPOP_REPLAY_CAPACITY",
    ),
];

#[test]
fn cli_bad_usage_is_explained_on_stderr_with_status_2() {
    for (args, usage) in [
        (&[][..], "Usage: refresh-guard <COMMAND>"),
        (&["policy"][..], "Usage: refresh-guard policy <COMMAND>"),
        (
            &["policy", "check"][..],
            "Usage: refresh-guard policy check",
        ),
        (
            &["policy", "check", "a", "b"][..],
            "Usage: refresh-guard policy check",
        ),
        (
            &["policy", "check", "--verbose", "a"][..],
            "Usage: refresh-guard policy check",
        ),
        (
            &["policy", "diff", "a"][..],
            "Usage: refresh-guard policy diff",
        ),
        (&["frobnicate"][..], "Usage: refresh-guard <COMMAND>"),
        (
            &["serve", "--workers"][..],
            "a value is required for '--workers <N>'",
        ),
    ] {
        let (code, out, err) = cli(args);
        assert_eq!(code, 2, "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.contains(usage), "{args:?}: {err}");
    }
    let (code, out, _) = cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("\n  serve "), "{out}");
    assert!(out.contains("\n  policy "), "{out}");
    let (code, out, _) = cli(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!("refresh-guard {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// Every subcommand answers `--help` (and `-h`) on stdout with its flags,
/// in lines that fit 80 columns.
#[test]
fn every_subcommand_has_help_listing_its_flags_within_80_columns() {
    for (args, must) in [
        (&[][..], &["serve", "policy", "store"][..]),
        (
            &["serve"][..],
            &["--listen <ADDR>", "REFRESH_GUARD_LISTEN"][..],
        ),
        (&["policy"][..], &["check", "diff"][..]),
        (&["policy", "check"][..], &["<DIR>"][..]),
        (&["policy", "diff"][..], &["<OLD_DIR>", "<NEW_DIR>"][..]),
        (&["store"][..], &["repair"][..]),
        (&["store", "repair"][..], &["<DIR>"][..]),
    ] {
        for flag in ["-h", "--help"] {
            let mut a = args.to_vec();
            a.push(flag);
            let (code, out, err) = cli(&a);
            assert_eq!(code, 0, "{a:?}: {err}");
            assert!(out.starts_with(char::is_alphabetic), "{a:?}: {out}");
            for m in must {
                assert!(out.contains(m), "{a:?} lacks {m:?}:\n{out}");
            }
            for line in out.lines() {
                assert!(line.chars().count() <= 80, "{a:?}: {line:?}");
            }
        }
    }
    let (_, out, _) = cli(&["serve", "--help"]);
    for (flag, var) in SERVE_FLAGS {
        assert!(out.contains(flag), "{flag}:\n{out}");
        assert!(out.contains(&format!("[env: {var}]")), "{var}:\n{out}");
    }
    assert!(out.contains("REFRESH_GUARD_ADMIN_TOKEN,"), "{out}");
}

/// `serve --require-profile` on a set that does not meet it: the report on
/// stderr, status 3 (as `policy check`), and nothing started or created.
#[test]
fn serve_refuses_to_start_on_a_set_that_breaks_a_required_profile() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path().join("data");
    // Spawned, not waited for blindly: a server that does start is killed
    // after a while and the test fails instead of hanging.
    let mut child = command()
        .args([
            "serve",
            "--policies",
            "policies/examples/spa",
            "--data",
            d.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env(
            "REFRESH_GUARD_REQUIRE_PROFILE",
            "rfc9700,salesforce-appexchange",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started on a set that breaks a required profile");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let code = status.code().unwrap_or(-1);
    assert_eq!(code, 3, "{err}");
    let set = PolicySet::load_dir(Path::new("../policies/examples/spa")).unwrap();
    assert!(
        err.starts_with(&format!(
            "profile salesforce-appexchange: {}",
            refresh_guard::Profile::named("salesforce-appexchange")
                .unwrap()
                .title
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("policy version {}", set.version())),
        "{err}"
    );
    assert!(err.contains("NOT MET  ip-allowlist"), "{err}");
    assert!(
        !err.contains("profile rfc9700"),
        "only the profile not met: {err}"
    );
    assert!(
        err.ends_with(
            "error: the policy set does not meet the required profile \
             salesforce-appexchange; not starting\n"
        ),
        "{err}"
    );
    assert!(!d.exists(), "nothing created");
}

/// A bad value is refused before anything starts, naming the flag and
/// what is allowed; from the environment, naming the variable too.
#[test]
fn a_bad_value_names_the_flag_and_the_variable_it_came_from() {
    for (args, env, want) in [
        (
            &["serve", "--listen", "8080"][..],
            &[][..],
            &[
                "invalid value '8080' for '--listen <ADDR>'",
                "127.0.0.1:8080",
            ][..],
        ),
        (
            &["serve"][..],
            &[("REFRESH_GUARD_LISTEN", "8080")][..],
            &[
                "invalid value '8080' for '--listen <ADDR>'",
                "tip: the value came from $REFRESH_GUARD_LISTEN",
            ][..],
        ),
        (
            &["serve"][..],
            &[("REFRESH_GUARD_DURABILITY", "fast")][..],
            &[
                "'--durability <MODE>'",
                "[possible values: sync, batched, none]",
                "$REFRESH_GUARD_DURABILITY",
            ][..],
        ),
        (
            &["serve", "--max-connections", "0"][..],
            &[][..],
            &["'--max-connections <N>'", "1..=1000000"][..],
        ),
        (
            &["serve", "--trusted-proxies", "10.0.0.0/8,10.0.0.0/33"][..],
            &[][..],
            &["'--trusted-proxies <LIST>'", "\"10.0.0.0/33\""][..],
        ),
        (
            &["serve"][..],
            &[("REFRESH_GUARD_REQUIRE_PROFILE", "rfc9700,pci")][..],
            &[
                "invalid value 'pci' for '--require-profile <NAME>'",
                "profiles are salesforce-appexchange, rfc9700, fapi2-refresh",
                "$REFRESH_GUARD_REQUIRE_PROFILE",
            ][..],
        ),
    ] {
        let (code, out, err) = cli_env(args, env);
        assert_eq!(code, 2, "{args:?} {env:?}: {err}");
        assert!(out.is_empty(), "{out}");
        for w in want {
            assert!(err.contains(w), "{args:?} {env:?} lacks {w:?}:\n{err}");
        }
    }
    // A flag on the command line wins over the variable, and then the
    // variable is not blamed.
    let (code, _, err) = cli_env(
        &["serve", "--listen", "8080"],
        &[("REFRESH_GUARD_LISTEN", "127.0.0.1:0")],
    );
    assert_eq!(code, 2);
    assert!(!err.contains("REFRESH_GUARD_LISTEN"), "{err}");
    let (code, _, err) = cli_env(&["serve"], &[("REFRESH_GUARD_ADMIN_TOKEN", "short")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("REFRESH_GUARD_ADMIN_TOKEN must be at least 16 characters"),
        "{err}"
    );
}

/// clap's own near-miss suggestions, and explicit hints where users
/// guess another name altogether.
#[test]
fn near_misses_are_suggested_and_other_names_hinted() {
    for (args, tip) in [
        (&["serve", "--listne", "x"][..], "'--listen'"),
        (
            &["serve", "--trusted-proxy", "x"][..],
            "'--trusted-proxies'",
        ),
        (&["serv"][..], "'serve'"),
        (&["serve", "--port", "9000"][..], "'--listen ADDR'"),
        (&["serve", "--bind", "0.0.0.0:80"][..], "'--listen ADDR'"),
        (&["serve", "--data-dir", "d"][..], "'--data DIR'"),
        (&["serve", "--threads", "2"][..], "'--workers N'"),
        (
            &["serve", "--admin-token", "t"][..],
            "$REFRESH_GUARD_ADMIN_TOKEN",
        ),
        (&["check", "policies"][..], "'policy check DIR'"),
        (&["policy", "chek", "policies"][..], "'check'"),
    ] {
        let (code, _, err) = cli(args);
        assert_eq!(code, 2, "{args:?}");
        let tip_line = err.lines().find(|l| l.trim_start().starts_with("tip:"));
        assert!(
            tip_line.is_some_and(|l| l.contains(tip)) || err.contains(tip),
            "{args:?} lacks {tip:?}:\n{err}"
        );
        assert!(err.contains("tip:"), "{args:?}:\n{err}");
    }
}

/// The service's flags also come from `REFRESH_GUARD_*` variables, as a
/// container sets them: started with nothing but variables, it listens
/// where they say, with their issuer and durability.
#[test]
fn serve_takes_its_flags_from_the_environment() {
    let scratch = tempfile::tempdir().unwrap();
    // A directory the server creates (0700): it refuses one others can read.
    let data = scratch.path().join("data");
    let policies = tempfile::tempdir().unwrap();
    write(
        policies.path(),
        "p.toml",
        "[clients.spa]\ngrace_period = \"5s\"\n",
    );
    let mut child = command()
        .arg("serve")
        .env("REFRESH_GUARD_LISTEN", "127.0.0.1:0")
        .env("REFRESH_GUARD_ADMIN_LISTEN", "127.0.0.1:0")
        .env("REFRESH_GUARD_DATA", &data)
        .env("REFRESH_GUARD_POLICIES", policies.path())
        .env("REFRESH_GUARD_DURABILITY", "none")
        .env("REFRESH_GUARD_ISSUER", "https://auth.example")
        .env("REFRESH_GUARD_WORKERS", "1")
        .env("REFRESH_GUARD_WATCH_POLICIES", "true")
        .env("REFRESH_GUARD_ADMIN_TOKEN", "env-admin-token-0123456789")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let listening = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a \"listening\" log line within 60 s");
        if line.contains("\"listening\"") {
            break line;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let set = PolicySet::load_dir(policies.path()).unwrap();
    for want in [
        "\"issuer\":\"https://auth.example\"".to_owned(),
        "\"durability\":\"none\"".to_owned(),
        "\"addr\":\"127.0.0.1:".to_owned(),
        format!("\"policy_version\":\"{}\"", set.version()),
    ] {
        assert!(listening.contains(&want), "{want}: {listening}");
    }
    assert!(!listening.contains(":8080"), "{listening}");
    // Nothing was written to ./data: the variable named the directory.
    assert!(data.join("mac-keys").exists());
}

/// A server data directory whose store has bob's rotation damaged, after
/// alice's second rotation was written: what `store repair` is for.
fn damaged_store(data: &Path) {
    let log = data.join("log");
    {
        let store = LogStore::open(&log, LogOptions::default()).unwrap();
        let e = Engine::builder().store(store).build().unwrap();
        let ip = Some("10.0.0.1".parse().unwrap());
        let issue = |subject| {
            let r = IssueRequest {
                client: "app",
                subject,
                scope: "",
                ip,
            };
            e.issue(&r).unwrap().accepted().unwrap().token
        };
        let rotate = |t: &str| {
            e.redeem(&RedeemRequest::new(t, "app").ip(ip))
                .unwrap()
                .accepted()
                .unwrap()
                .token
        };
        let (a1, b1) = (issue("alice"), issue("bob"));
        let a2 = rotate(&a1);
        rotate(&b1);
        rotate(&a2);
        e.flush().unwrap();
    }
    let seg = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "rgl"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // Records are a 4-byte little-endian length, 4 more header bytes and
    // the body (docs/store.md); the fourth of five is bob's rotation.
    let mut records = Vec::new();
    let mut off = 0;
    while off + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        records.push((off, 8 + len));
        off += 8 + len;
    }
    assert_eq!(records.len(), 5, "one record per change");
    let (at, n) = records[3];
    bytes[at + n - 1] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
}

/// `refresh-guard store repair DIR` prints the report (exit 0), an error
/// (exit 1), or its usage (exit 2).
#[test]
fn store_repair_prints_the_report() {
    let data = tempfile::tempdir().unwrap();
    damaged_store(data.path());
    let dir = data.path().to_str().unwrap();
    let (code, out, err) = cli(&["store", "repair", dir]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("repaired") && out.contains("\"alice\""),
        "{out}"
    );

    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = cli(&["store", "repair", empty.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("no store here"), "{err}");

    let (code, _, err) = cli(&["store", "repair"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("Usage: refresh-guard store repair <DIR>"),
        "{err}"
    );
}
