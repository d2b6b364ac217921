//! A DPoP client nobody here wrote: panva's `oauth4webapi` (npm, pinned in
//! tests/dpop-client/package.json and package-lock.json), unmodified,
//! drives the server through authorization code + PKCE + DPoP, three
//! refreshes, the server-nonce round (RFC 9449 §8) and a refresh with
//! another key (tests/dpop-client/script.mjs), for ES256 and EdDSA.
//!
//! `.ci/run` installs the packages (`npm ci`); this test runs `npm ci` too
//! when they are missing. Without node or npm it fails saying what to
//! install: it never skips.

mod server_http;

use std::path::{Path, PathBuf};
use std::process::Command;

use refresh_guard::{Dpop, PolicyOverrides, PolicySet};
use server_http::*;

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dpop-client")
}

/// The pinned packages, installed with `npm ci` if missing.
fn installed() {
    let dir = client_dir();
    if dir.join("node_modules/oauth4webapi/package.json").exists() {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run npm ({e}): install node 20+ and npm, then run \
                 `npm ci` in server/tests/dpop-client"
            )
        });
    assert!(
        out.status.success(),
        "npm ci in server/tests/dpop-client failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn policies() -> PolicySet {
    let allowed = || PolicyOverrides::new().dpop(Dpop::Allowed);
    PolicySet::builder()
        .client("spa", allowed())
        .client("nonce-spa", allowed().dpop_nonce(true))
        .build()
        .unwrap()
}

#[test]
fn oauth4webapi_code_pkce_dpop_refreshes_nonce_and_another_key() {
    installed();
    for alg in ["ES256", "EdDSA"] {
        // oauth4webapi signs Ed25519 proofs as `Ed25519` (RFC 9864) whichever
        // of the two names the key was made under.
        let s = TestServer::with("dpop-client", |c| c.policy_set = Some(policies()));
        // No `openid`: oauth4webapi would then expect an ID token.
        let code = s.code("spa", "alice", "offline_access api");
        let nonce_code = s.code("nonce-spa", "bob", "offline_access api");
        let out = Command::new("node")
            .arg(client_dir().join("script.mjs"))
            .current_dir(client_dir())
            .env("RG_ISSUER", format!("http://{}", s.addr))
            .env("RG_REDIRECT_URI", REDIRECT)
            .env("RG_VERIFIER", VERIFIER)
            .env("RG_CODE", code)
            .env("RG_NONCE_CODE", nonce_code)
            .env("RG_ALG", alg)
            .output()
            .unwrap_or_else(|e| panic!("cannot run node ({e}): install node 20+"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "oauth4webapi client ({alg}) failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        assert!(
            stdout.contains(&format!("oauth4webapi {alg}: all checks passed")),
            "{stdout}"
        );
    }
}
