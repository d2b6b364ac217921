//! The `refresh-guard` command line: `policy check` and `policy diff` on
//! policy directories (README "The `refresh-guard` command").

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use refresh_guard::PolicySet;

/// A path in the repository (the workspace root, above this crate).
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_refresh-guard"))
        .args(args)
        .current_dir(repo(""))
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
        format!("policy version {vo}: no change in effective knobs\n")
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

#[test]
fn cli_bad_usage_prints_usage_and_exits_2() {
    for args in [
        &[][..],
        &["policy"][..],
        &["policy", "check"][..],
        &["policy", "check", "a", "b"][..],
        &["policy", "check", "--verbose", "a"][..],
        &["frobnicate"][..],
    ] {
        let (code, out, err) = cli(args);
        assert_eq!(code, 2, "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(
            err.contains("refresh-guard policy check DIR"),
            "{args:?}: {err}"
        );
    }
    let (code, out, _) = cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("refresh-guard policy diff OLD_DIR NEW_DIR"),
        "{out}"
    );
}
