//! Several `refresh-guard serve` processes on one Redis (`--store`; README
//! "Several instances of the server"), over HTTP as a load balancer would
//! reach them: rotation and reuse detection, subject revocation, DPoP
//! `jti` replay and nonces across instances; key fingerprints refusing an
//! instance whose keys contradict the store's; Redis stopped and started
//! again under a running server. Each test starts its own redis-server
//! (tests/redis_support).
#![cfg(unix)]

#[path = "../../tests/redis_support/mod.rs"]
mod redis_support;
mod server_http;
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis_support::{RedisServer, Reply};
use server_http::*;
use support::dpop_proof::ProofKey;

/// The issuer every instance shares, as behind one load balancer: DPoP
/// proofs name its token endpoint (`htu`), whichever instance gets them.
const ISSUER: &str = "http://auth.test";
const HTU: &str = "http://auth.test/oauth2/token";

/// `spa` as in every server test; `dpop-spa` binds families to DPoP keys;
/// `nonce-spa` also needs server nonces; `opaque-spa` gets opaque access
/// tokens.
const POLICIES: &str = "\
[clients.opaque-spa]
access_token_format = \"opaque\"
[clients.dpop-spa]
dpop = \"allowed\"
[clients.nonce-spa]
dpop = \"allowed\"
dpop_nonce = true
";

/// The key files every instance on one store needs alike.
const KEY_FILES: [&str; 3] = ["mac-keys", "jwt-ed25519.key", "dpop-nonce.key"];

/// A running `refresh-guard serve --store` process.
struct Instance {
    child: Child,
    http: TestServer,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data: &Path, policies: &Path, store: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_refresh-guard"));
    c.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--issuer",
        ISSUER,
        "--workers",
        "2",
    ])
    .arg("--data")
    .arg(data)
    .arg("--policies")
    .arg(policies)
    .env("REFRESH_GUARD_STORE", store)
    .env("REFRESH_GUARD_ADMIN_TOKEN", ADMIN)
    .env("RUST_LOG", "info");
    c
}

impl Instance {
    /// Start on `data` and wait for the "listening" line for the ports.
    fn start(data: &Path, policies: &Path, store: &str) -> Instance {
        Instance::spawn(serve(data, policies, store))
    }

    /// Spawn `command` (a [`serve`]) and wait for its ports.
    fn spawn(mut command: Command) -> Instance {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start refresh-guard serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel::<String>();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let listening = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("a \"listening\" log line within 60 s");
            let j: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if j["message"] == "listening" {
                break j;
            }
        };
        let addr: SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
        let admin: SocketAddr = listening["admin_addr"].as_str().unwrap().parse().unwrap();
        Instance {
            child,
            http: TestServer {
                server: None,
                addr,
                admin,
                dir: TempDir::new("unused"),
            },
        }
    }
}

/// Run `serve` expecting it to refuse to start; its output. One still
/// running after 30 s has started: it is killed and the test fails.
fn refused(data: &Path, policies: &Path, store: &str) -> Output {
    let mut child = serve(data, policies, store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run refresh-guard serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait for serve").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve started where it had to refuse");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("serve's output");
    assert!(!out.status.success(), "it exited 0");
    out
}

/// Copy the key files of `from` into `to` (mode kept: 0600).
fn copy_keys(from: &Path, to: &Path) {
    for f in KEY_FILES {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Redis, a policy directory and two instances sharing keys and store.
struct Pair {
    a: Instance,
    b: Instance,
    redis: RedisServer,
    data_a: TempDir,
    data_b: TempDir,
    policies: TempDir,
}

fn pair(redis: RedisServer) -> Pair {
    let policies = TempDir::new("store-policies");
    std::fs::write(policies.path().join("policies.toml"), POLICIES).unwrap();
    let (data_a, data_b) = (TempDir::new("store-a"), TempDir::new("store-b"));
    let url = redis.url();
    let a = Instance::start(data_a.path(), policies.path(), &url);
    copy_keys(data_a.path(), data_b.path());
    let b = Instance::start(data_b.path(), policies.path(), &url);
    Pair {
        a,
        b,
        redis,
        data_a,
        data_b,
        policies,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn refresh_token(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["refresh_token"].as_str().unwrap().to_owned()
}

/// A rotation on A is seen by B: the old token replayed on B is reuse,
/// which revokes the family on both (the successor is refused on both).
/// With `--store` no embedded log is created, and `/healthz` and
/// `/metrics` name the store and the policy version in force.
#[test]
fn a_token_rotated_on_one_instance_is_reuse_on_the_other() {
    let p = pair(RedisServer::start());
    let t1 = p.a.http.family("spa", "user-1", "openid");
    let t2 = refresh_token(&p.a.http.refresh("spa", &t1));
    // B has never seen the family: it reads it from the store.
    p.b.http
        .refresh("spa", &t1)
        .assert_error(400, "invalid_grant");
    for (name, i) in [("A", &p.a), ("B", &p.b)] {
        let r = i.http.refresh("spa", &t2);
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_grant", "{name}: revoked");
    }
    for data in [&p.data_a, &p.data_b] {
        assert!(!data.path().join("log").exists(), "no embedded log");
    }
    let version = {
        let h = p.a.http.get("/healthz");
        assert_eq!(h.status, 200, "{}", h.text());
        assert_eq!(h.json()["durability"], "redis");
        assert_eq!(h.json()["store"], "ok");
        h.json()["policy_version"].as_str().unwrap().to_owned()
    };
    assert_eq!(p.b.http.get("/healthz").json()["policy_version"], version);
    let metrics = p.b.http.admin("GET", "/metrics", None).text();
    assert!(
        metrics.contains(&format!("policy_version_info{{version=\"{version}\"}} 1")),
        "{metrics}"
    );
}

/// A subject revoked through B's admin API is revoked for A: A refuses
/// the family's token.
#[test]
fn a_subject_revoked_on_one_instance_is_revoked_on_the_other() {
    let p = pair(RedisServer::start());
    let t1 = p.a.http.family("spa", "user-7", "openid");
    let r =
        p.b.http
            .admin("POST", "/admin/v1/subjects/user-7/revoke", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["revoked"], 1);
    p.a.http
        .refresh("spa", &t1)
        .assert_error(400, "invalid_grant");
}

/// An opaque access token minted on A is active on B (derived from the
/// shared key ring, alive while its family lives in the store), and a
/// revocation of its family through B ends it on A.
#[test]
fn an_opaque_access_token_lives_and_dies_with_its_family_on_every_instance() {
    let p = pair(RedisServer::start());
    let introspect = |i: &Instance, token: &str| {
        let r = i.http.form_with(
            "/oauth2/introspect",
            &format!("token={}", enc(token)),
            &[("Authorization", &format!("Bearer {ADMIN}"))],
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let t1 = p.a.http.family("opaque-spa", "user-9", "openid");
    let r = p.a.http.refresh("opaque-spa", &t1);
    let t2 = refresh_token(&r);
    let at = r.json()["access_token"].as_str().unwrap().to_owned();
    assert!(at.starts_with("rga_"), "{}", r.text());
    for (name, i) in [("A", &p.a), ("B", &p.b)] {
        let j = introspect(i, &at);
        assert_eq!(j["active"], true, "{name}: {j}");
        assert_eq!(j["sub"], "user-9", "{name}: {j}");
    }
    let r = p.b.http.form(
        "/oauth2/revoke",
        &format!("token={t2}&client_id=opaque-spa"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for (name, i) in [("A", &p.a), ("B", &p.b)] {
        assert_eq!(introspect(i, &at)["active"], false, "{name}: revoked");
    }
}

/// A key file that contradicts the store's fingerprint for its name stops
/// the instance at start, naming the key (and the id, for the ring); a
/// new id is added, so a rolling rotation works; a refused instance adds
/// nothing to the store, and creates no embedded log.
#[test]
fn an_instance_whose_keys_contradict_the_store_refuses_to_start() {
    let p = pair(RedisServer::start());
    let url = p.redis.url();
    let ring = std::fs::read_to_string(p.data_a.path().join("mac-keys")).unwrap();
    let other = format!("{:064x}", 7);

    // Id 0 is another key: refused, naming the file and id 0.
    let c = TempDir::new("store-c");
    copy_keys(p.data_a.path(), c.path());
    std::fs::write(
        c.path().join("mac-keys"),
        format!("active 0\n0 {other}\n2 {:064x}\n", 9),
    )
    .unwrap();
    let out = refused(c.path(), p.policies.path(), &url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mac-keys key id 0 is not the key"), "{err}");
    assert!(!err.contains(&other), "the key is never printed: {err}");
    assert!(!c.path().join("log").exists());
    let exists = |field: &str| p.redis.cmd(&["HEXISTS", "rg:keys", field]);
    assert!(matches!(exists("mac:2"), Reply::Int(0)), "nothing added");

    // A new id beside the shared one: accepted and recorded (rotation).
    let d = TempDir::new("store-d");
    copy_keys(p.data_a.path(), d.path());
    let new_key = format!("{:064x}", 11);
    std::fs::write(d.path().join("mac-keys"), format!("{ring}1 {new_key}\n")).unwrap();
    let inst_d = Instance::start(d.path(), p.policies.path(), &url);
    assert!(matches!(exists("mac:1"), Reply::Int(1)));
    drop(inst_d);

    // Another key under that new id: refused, naming id 1.
    let e = TempDir::new("store-e");
    copy_keys(p.data_a.path(), e.path());
    std::fs::write(e.path().join("mac-keys"), format!("{ring}1 {other}\n")).unwrap();
    let err =
        String::from_utf8_lossy(&refused(e.path(), p.policies.path(), &url).stderr).into_owned();
    assert!(err.contains("mac-keys key id 1 is not the key"), "{err}");

    // Another signing key: refused, naming its file.
    let f = TempDir::new("store-f");
    copy_keys(p.data_a.path(), f.path());
    std::fs::write(f.path().join("jwt-ed25519.key"), format!("{other}\n")).unwrap();
    let err =
        String::from_utf8_lossy(&refused(f.path(), p.policies.path(), &url).stderr).into_owned();
    assert!(err.contains("jwt-ed25519.key is not the key"), "{err}");

    // An empty data directory makes its own keys: refused.
    let g = TempDir::new("store-g");
    let err =
        String::from_utf8_lossy(&refused(g.path(), p.policies.path(), &url).stderr).into_owned();
    assert!(err.contains("are not the key"), "{err}");
}

/// A bad `--store` is refused before anything is written, naming the flag.
#[test]
fn a_bad_store_url_is_refused_naming_the_flag_and_writes_nothing() {
    let data = TempDir::new("store-bad");
    let policies = TempDir::new("store-bad-policies");
    let target = data.path().join("fresh");
    let out = refused(&target, policies.path(), "redis://:pw-s3cret@h:port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--store: ") && err.contains("port"), "{err}");
    assert!(!err.contains("pw-s3cret"), "{err}");
    assert_eq!(out.status.code(), Some(2));
    assert!(!target.exists(), "nothing created");
}

/// A proof whose `jti` A accepted is refused by B (RFC 9449 §11.1), and a
/// nonce handed out by A is accepted by B (RFC 9449 §8).
#[test]
fn a_dpop_proof_used_on_one_instance_is_refused_on_the_other() {
    let p = pair(RedisServer::start());
    let key = ProofKey::es256(3);
    let code = p.a.http.code("dpop-spa", "user-d", "openid");
    let proof = key.proof("POST", HTU, now(), "jti-shared-1", None);
    let body = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&client_id=dpop-spa&code_verifier={VERIFIER}",
        enc(REDIRECT)
    );
    let r =
        p.a.http
            .form_with("/oauth2/token", &body, &[("DPoP", &proof)]);
    let t1 = refresh_token(&r);
    let replay = format!("grant_type=refresh_token&refresh_token={t1}&client_id=dpop-spa");
    let r =
        p.b.http
            .form_with("/oauth2/token", &replay, &[("DPoP", &proof)]);
    let text = r.assert_error(400, "invalid_dpop_proof");
    assert!(text.contains("already used"), "{text}");
    // One record, expiring with the proof's window (60 s + 1 s): Redis
    // holds no proof longer than it could be replayed.
    let records = match p.redis.cmd(&["KEYS", "rg:dpop:*"]) {
        Reply::Array(Some(keys)) => keys,
        other => panic!("{other:?}"),
    };
    assert_eq!(records.len(), 1);
    let record = records[0].text().unwrap();
    assert!(
        record.starts_with("rg:dpop:{") && record.ends_with('}'),
        "{record}"
    );
    match p.redis.cmd(&["PTTL", &record]) {
        Reply::Int(ms) => assert!((50_000..=61_000).contains(&ms), "{ms}"),
        other => panic!("{other:?}"),
    }
    // The refusal spent nothing: a fresh proof on B refreshes.
    let fresh = key.proof("POST", HTU, now(), "jti-shared-2", None);
    refresh_token(
        &p.b.http
            .form_with("/oauth2/token", &replay, &[("DPoP", &fresh)]),
    );

    // A nonce from A works on B.
    let code = p.a.http.code("nonce-spa", "user-n", "openid");
    let body = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&client_id=nonce-spa&code_verifier={VERIFIER}",
        enc(REDIRECT)
    );
    let bare = key.proof("POST", HTU, now(), "jti-shared-3", None);
    let r =
        p.a.http
            .form_with("/oauth2/token", &body, &[("DPoP", &bare)]);
    r.assert_error(400, "use_dpop_nonce");
    let nonce = r.header("dpop-nonce").expect("a nonce").to_owned();
    let with_nonce = key.proof("POST", HTU, now(), "jti-shared-4", Some(&nonce));
    refresh_token(
        &p.b.http
            .form_with("/oauth2/token", &body, &[("DPoP", &with_nonce)]),
    );
}

/// Poll `f` every 50 ms until it holds, for at most `bound`.
fn eventually(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !f() {
        assert!(Instant::now() < deadline, "{what} not within {bound:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Redis stopped: every call that needs it is 503 `temporarily_unavailable`
/// with `Retry-After` (refresh, code exchange, a DPoP proof's record,
/// revocation, the admin API), nothing is accepted, `/healthz` is 503;
/// Redis started again (its AOF keeps the family): the same instance
/// serves again without a restart.
#[test]
fn redis_down_is_503_with_retry_after_and_serving_resumes_when_it_is_back() {
    let mut p = pair(RedisServer::options().aof().start());
    let t1 = p.a.http.family("spa", "user-r", "openid");
    let code = p.a.http.code("spa", "user-r2", "openid");
    p.redis.stop();
    // B has sent Redis nothing since: `/healthz` finds the outage itself.
    let h = p.b.http.get("/healthz");
    assert_eq!(h.status, 503, "an idle instance: {}", h.text());

    let unavailable = |r: &Resp, what: &str| {
        assert_eq!(r.status, 503, "{what}: {}", r.text());
        assert_eq!(r.json()["error"], "temporarily_unavailable", "{what}");
        assert_eq!(r.header("retry-after"), Some("1"), "{what}");
    };
    unavailable(&p.a.http.refresh("spa", &t1), "refresh on A");
    unavailable(&p.b.http.refresh("spa", &t1), "refresh on B");
    unavailable(&p.b.http.exchange("spa", &code), "code exchange");
    let key = ProofKey::eddsa(5);
    let proof = key.proof("POST", HTU, now(), "jti-down-1", None);
    let r = p.b.http.form_with(
        "/oauth2/token",
        &format!("grant_type=refresh_token&refresh_token={t1}&client_id=spa"),
        &[("DPoP", &proof)],
    );
    unavailable(&r, "a DPoP proof");
    let r =
        p.a.http
            .form("/oauth2/revoke", &format!("token={t1}&client_id=spa"));
    unavailable(&r, "revocation");
    let r =
        p.a.http
            .admin("POST", "/admin/v1/subjects/user-r/revoke", None);
    unavailable(&r, "admin subject revocation");
    let r = p.b.http.admin(
        "POST",
        "/admin/v1/authorizations",
        Some(serde_json::json!({
            "client_id": "spa",
            "subject": "user-r4",
            "scope": "openid",
            "redirect_uri": REDIRECT,
            "code_challenge": challenge(VERIFIER),
            "code_challenge_method": "S256",
        })),
    );
    unavailable(&r, "admin authorization");
    let h = p.b.http.get("/healthz");
    assert_eq!(h.status, 503, "{}", h.text());
    assert_eq!(h.json()["store"], "unavailable");
    assert!(h.json()["policy_version"].is_string());
    assert_eq!(p.a.http.admin("GET", "/healthz", None).status, 503);

    p.redis.restart();
    eventually("A serves again", Duration::from_secs(20), || {
        p.a.http.get("/healthz").status == 200
    });
    let t2 = refresh_token(&p.a.http.refresh("spa", &t1));
    // B heals too, and the rotation on A is seen there.
    eventually("B serves again", Duration::from_secs(20), || {
        p.b.http.get("/healthz").status == 200
    });
    refresh_token(&p.b.http.refresh("spa", &t2));
    // The proof refused while Redis was down was not recorded: it is
    // accepted now (its jti was never spent).
    let code = p.b.http.code("dpop-spa", "user-r3", "openid");
    let body = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&client_id=dpop-spa&code_verifier={VERIFIER}",
        enc(REDIRECT)
    );
    let proof = key.proof("POST", HTU, now(), "jti-down-1", None);
    refresh_token(
        &p.b.http
            .form_with("/oauth2/token", &body, &[("DPoP", &proof)]),
    );
    let _ = (&p.data_b, &p.b);
}

/// A `redis-server` speaking TLS only, with a certificate for
/// `localhost` from a throwaway CA (made with the `openssl` command, which
/// `.ci/run` installs when missing); killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::Builder::new()
            .prefix("refresh-guard-redis-tls-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.crt"],
            ]
            .concat()
            .into_iter()
            .chain(["-days", "2", "-subj", "/CN=refresh-guard test CA"])
            .collect::<Vec<_>>(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &["-keyout", "server.key", "-out", "server.csr"],
            ]
            .concat()
            .into_iter()
            .chain(["-subj", "/CN=localhost"])
            .collect::<Vec<_>>(),
        );
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            d.join("redis.conf"),
            format!(
                "bind 127.0.0.1\nport 0\ntls-port {port}\ntls-cert-file server.crt\n\
                 tls-key-file server.key\ntls-ca-cert-file ca.crt\ntls-auth-clients no\n\
                 save \"\"\ndaemonize no\nlogfile \"\"\ndir \"{}\"\n",
                d.display()
            ),
        )
        .unwrap();
        let child = Command::new(std::env::var_os("REDIS_SERVER").unwrap_or("redis-server".into()))
            .arg("redis.conf")
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut r = TlsRedis { child, port, dir };
        eventually(
            "redis-server listening for TLS",
            Duration::from_secs(20),
            || {
                assert!(
                    matches!(r.child.try_wait(), Ok(None)),
                    "redis-server exited"
                );
                std::net::TcpStream::connect(("127.0.0.1", r.port)).is_ok()
            },
        );
        r
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `rediss://`: TLS to Redis, the server's certificate checked (here
/// against the test CA in `$SSL_CERT_FILE`); a certificate the roots do
/// not vouch for stops the start.
#[test]
fn rediss_connects_with_tls_and_checks_the_certificate() {
    let redis = TlsRedis::start();
    let url = format!("rediss://localhost:{}/", redis.port);
    let policies = TempDir::new("tls-policies");
    std::fs::write(policies.path().join("policies.toml"), POLICIES).unwrap();
    let data = TempDir::new("tls-data");
    let ca = redis.dir.path().join("ca.crt");

    let untrusted = TempDir::new("tls-untrusted");
    let out = serve(untrusted.path(), policies.path(), &url)
        .env("SSL_CERT_FILE", redis.dir.path().join("server.csr"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an unverified certificate was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--store: cannot connect to Redis"), "{err}");

    let mut c = serve(data.path(), policies.path(), &url);
    c.env("SSL_CERT_FILE", &ca);
    let a = Instance::spawn(c);
    let t1 = a.http.family("spa", "user-tls", "openid");
    refresh_token(&a.http.refresh("spa", &t1));
    assert_eq!(a.http.get("/healthz").status, 200);
}

fn text(r: Reply) -> String {
    match r {
        Reply::Simple(s) => s,
        other => other.text().unwrap_or_else(|| format!("{other:?}")),
    }
}

/// Three primaries sharing the 16384 slots, once every node says ok (as
/// the library's tests/shared_cluster.rs builds it).
fn cluster() -> Vec<RedisServer> {
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::options().cluster().start())
        .collect();
    let ranges = [("0", "5460"), ("5461", "10922"), ("10923", "16383")];
    for (node, (from, to)) in nodes.iter().zip(ranges) {
        let added = node.cmd(&["CLUSTER", "ADDSLOTSRANGE", from, to]);
        assert_eq!(text(added), "OK");
    }
    for node in &nodes[1..] {
        let bus = match node.cmd(&["CONFIG", "GET", "cluster-port"]) {
            Reply::Array(Some(kv)) => kv[1].text().unwrap(),
            other => panic!("{other:?}"),
        };
        let port = node.port().to_string();
        let met = nodes[0].cmd(&["CLUSTER", "MEET", "127.0.0.1", &port, &bus]);
        assert_eq!(text(met), "OK");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        node.wait_until("cluster_state:ok", deadline - Instant::now(), || {
            node.cmd(&["CLUSTER", "INFO"]).text().is_some_and(|i| {
                i.contains("cluster_state:ok") && i.contains("cluster_known_nodes:3")
            })
        });
    }
    nodes
}

/// `redis+cluster://`: two instances on a three-node cluster answer as
/// one (rotation seen across, reuse revoking on both, a DPoP `jti` used on
/// one refused on the other), and the fingerprint script refuses a
/// contradicting key there too.
#[test]
fn instances_on_a_redis_cluster_answer_as_one() {
    let nodes = cluster();
    let hosts: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port()))
        .collect();
    let url = format!("redis+cluster://{}", hosts.join(","));
    let policies = TempDir::new("cluster-policies");
    std::fs::write(policies.path().join("policies.toml"), POLICIES).unwrap();
    let (data_a, data_b) = (TempDir::new("cluster-a"), TempDir::new("cluster-b"));
    let a = Instance::start(data_a.path(), policies.path(), &url);
    copy_keys(data_a.path(), data_b.path());
    let b = Instance::start(data_b.path(), policies.path(), &url);

    let t1 = a.http.family("spa", "user-c", "openid");
    let t2 = refresh_token(&b.http.refresh("spa", &t1));
    a.http
        .refresh("spa", &t1)
        .assert_error(400, "invalid_grant");
    b.http
        .refresh("spa", &t2)
        .assert_error(400, "invalid_grant");

    let key = ProofKey::es256(8);
    let code = a.http.code("dpop-spa", "user-cd", "openid");
    let body = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&client_id=dpop-spa&code_verifier={VERIFIER}",
        enc(REDIRECT)
    );
    let proof = key.proof("POST", HTU, now(), "jti-cluster-1", None);
    let t = refresh_token(
        &a.http
            .form_with("/oauth2/token", &body, &[("DPoP", &proof)]),
    );
    let replay = format!("grant_type=refresh_token&refresh_token={t}&client_id=dpop-spa");
    b.http
        .form_with("/oauth2/token", &replay, &[("DPoP", &proof)])
        .assert_error(400, "invalid_dpop_proof");
    assert_eq!(b.http.get("/healthz").status, 200);

    let c = TempDir::new("cluster-c");
    copy_keys(data_a.path(), c.path());
    std::fs::write(c.path().join("dpop-nonce.key"), format!("{:064x}\n", 5)).unwrap();
    let err =
        String::from_utf8_lossy(&refused(c.path(), policies.path(), &url).stderr).into_owned();
    assert!(err.contains("dpop-nonce.key is not the key"), "{err}");
}
