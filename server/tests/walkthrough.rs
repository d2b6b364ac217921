//! `scripts/walkthrough.sh`, the README's "Server" walkthrough, run as a
//! reader runs it: against the real `refresh-guard serve` binary started
//! from the repository root with no flags but its listeners and data
//! directory (free ports, a scratch directory). Needs bash, curl, jq and
//! openssl (`.ci/run` installs them); without one the test says so and
//! passes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The first of the walkthrough's tools that is not installed.
fn missing_tool() -> Option<&'static str> {
    [
        ("bash", "--version"),
        ("curl", "--version"),
        ("jq", "--version"),
        ("openssl", "version"),
    ]
    .into_iter()
    .find(|(tool, arg)| {
        !Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .map(|(tool, _)| tool)
}

/// `cmd` without the caller's `REFRESH_GUARD_*` variables.
fn clean(mut cmd: Command) -> Command {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("REFRESH_GUARD_")) {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(repo());
    cmd
}

/// Stops the server however the test ends: an assertion that fails while
/// it runs must not leave it behind (it would hold the test's stderr open).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The walkthrough runs as written against the server a reader starts, and
/// shows what the README says it shows; the server warned at start that
/// its metadata lacks an authorization endpoint.
#[test]
fn walkthrough_script_runs_against_the_real_server() {
    if let Some(tool) = missing_tool() {
        eprintln!(
            "SKIPPED walkthrough_script_runs_against_the_real_server: `{tool}` is not \
             installed (the walkthrough needs bash, curl, jq and openssl; .ci/run installs them)"
        );
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    // The server creates it 0700 (it refuses one other users can reach).
    let data = scratch.path().join("data");
    let mut server = Running(
        clean(Command::new(env!("CARGO_BIN_EXE_refresh-guard")))
            .arg("serve")
            .env("REFRESH_GUARD_LISTEN", "127.0.0.1:0")
            .env("REFRESH_GUARD_ADMIN_LISTEN", "127.0.0.1:0")
            .env("REFRESH_GUARD_DATA", &data)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = server.0.id().to_string();
    let stdout = server.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut warned = false;
    let listening: serde_json::Value = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a \"listening\" log line within 60 s");
        let record: serde_json::Value = serde_json::from_str(&line).unwrap();
        if record["level"] == "WARN"
            && record["message"]
                .as_str()
                .is_some_and(|m| m.contains("authorization_endpoint"))
        {
            warned = true;
        }
        if record["message"] == "listening" {
            break record;
        }
    };
    assert!(
        warned,
        "no warning about the missing --authorization-endpoint"
    );
    // A hung step must not hang the suite: past 120 s the server is
    // stopped, so curl fails and the script ends.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = Command::new("kill").arg(&pid).status();
        }
    });
    let out = clean(Command::new("bash"))
        .arg("scripts/walkthrough.sh")
        .env("REFRESH_GUARD_LISTEN", listening["addr"].as_str().unwrap())
        .env(
            "REFRESH_GUARD_ADMIN_LISTEN",
            listening["admin_addr"].as_str().unwrap(),
        )
        .env("REFRESH_GUARD_DATA", &data)
        .output()
        .unwrap();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    drop(server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walkthrough failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for want in [
        "exchange: refresh token rgt_... (54 characters)\n",
        "refresh: refresh token rgt_... (54 characters)\n",
        "replay inside the grace window, same successor: yes\n",
        "replay after the grace window: {\"error\":\"invalid_grant\",\"error_description\":\"refresh token reuse detected; token family revoked\"}\n",
        "its successor now: {\"error\":\"invalid_grant\",\"error_description\":\"refresh token has been revoked\"}\n",
        "introspect: {\"active\":true,\"client_id\":\"spa\",\"sub\":\"user-42\"}\n",
        "revoke: HTTP 200, 0 bytes\n",
        "introspect after revoke: {\"active\":false}\n",
        "refresh_guard_decisions_total{client=\"spa\",outcome=\"grace_replay\"} 1\n",
        "refresh_guard_decisions_total{client=\"spa\",outcome=\"reuse_detected\"} 1\n",
        "healthz: {\"durability\":\"sync\",\"policy_version\":",
        "reload: {\"version\":",
    ] {
        assert!(
            stdout.contains(want),
            "missing {want:?} in:\n{stdout}\n{stderr}"
        );
    }
    assert!(stderr.is_empty(), "{stderr}");
    readme_shows(&stdout);
}

/// The README's copy of the walkthrough's output, under
/// `<!-- walkthrough-output -->`, is `stdout`; `REFRESH_GUARD_BLESS=1`
/// rewrites it.
fn readme_shows(stdout: &str) {
    const MARK: &str = "<!-- walkthrough-output -->\n```text\n";
    let path = repo().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let body = readme
        .find(MARK)
        .expect("README has <!-- walkthrough-output -->")
        + MARK.len();
    let close = body
        + readme[body..]
            .split_inclusive('\n')
            .take_while(|line| *line != "```\n")
            .map(str::len)
            .sum::<usize>();
    if readme[body..close] == *stdout {
        return;
    }
    if std::env::var_os("REFRESH_GUARD_BLESS").is_some() {
        let new = format!("{}{stdout}{}", &readme[..body], &readme[close..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    panic!(
        "README's walkthrough output is stale.\nREADME:\n{}\nactual:\n{stdout}\n\
         regenerate with: REFRESH_GUARD_BLESS=1 cargo test -p refresh-guard-server \
         --all-features --test walkthrough",
        &readme[body..close]
    );
}
