//! A real OAuth client library, unmodified: Python `authlib` (pinned in
//! tests/authlib/requirements.txt) drives the server through the PKCE code
//! exchange, its own refresh logic, reuse detection, revocation and
//! introspection (tests/authlib/client.py).
//!
//! The virtualenv lives in `target/authlib-venv`; `.ci/run` creates it up
//! front, and this test creates or completes it if needed. Without Python
//! or the packages the test fails, saying why: it never skips.

mod server_http;

use std::path::{Path, PathBuf};
use std::process::Command;

use server_http::*;

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e} (is python3 installed?)"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The virtualenv with the pinned packages, created if missing.
fn venv() -> PathBuf {
    // `CARGO_TARGET_TMPDIR` is `<target>/tmp`; the venv sits beside it.
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target tmp dir has a parent")
        .join("authlib-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        run(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "creating the authlib virtualenv (python3 -m venv)",
        );
    }
    // A no-op without network when the pins are already installed.
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(manifest().join("tests/authlib/requirements.txt")),
        "installing authlib and requests into the virtualenv",
    );
    python
}

#[test]
fn authlib_pkce_refresh_rotation_reuse_revocation() {
    let python = venv();
    let s = TestServer::start("authlib");
    let codes = [
        s.code("spa", "alice", "openid offline_access"),
        s.code("spa", "bob", "openid offline_access"),
    ];
    let backend = s.code("backend", "carol", "api");
    let out = Command::new(&python)
        .arg(manifest().join("tests/authlib/client.py"))
        .env("RG_ISSUER", format!("http://{}", s.addr))
        .env("RG_REDIRECT_URI", REDIRECT)
        .env("RG_VERIFIER", VERIFIER)
        .env("RG_PUBLIC_CODES", codes.join(","))
        .env("RG_BACKEND_CODE", backend)
        .env("RG_BACKEND_SECRET", BACKEND_SECRET)
        .output()
        .expect("run tests/authlib/client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "authlib client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("authlib: all checks passed"), "{stdout}");
}
