//! Helpers for the server tests: a temporary data directory, an in-process
//! server on ephemeral ports, and a tiny blocking HTTP/1.1 client (one
//! request per connection), so the tests need no HTTP client crate.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use refresh_guard::{Durability, PolicyOverrides, PolicySet};
use refresh_guard_server::{AdminToken, AdminTokenSource, Config, ServerHandle};
use sha2::{Digest, Sha256};

pub const ADMIN: &str = "test-admin-token-0123456789";
pub const REDIRECT: &str = "https://app.example/cb";
pub const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
pub const BACKEND_SECRET: &str = "backend-secret: s3cr3t!";

/// The S256 challenge of `verifier`.
pub fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("rg-server-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        // 0700: the server refuses a data directory other users can reach.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&d)
            .unwrap();
        TempDir(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The policy set most tests run under:
/// - `spa`: public, PKCE S256, rotation, no grace;
/// - `backend`: confidential (secret [`BACKEND_SECRET`]);
/// - `graceful`: public, 30 s grace;
/// - `office`: public, refreshes only from 10.0.0.0/8.
pub fn policies() -> PolicySet {
    let hash: [u8; 32] = Sha256::digest(BACKEND_SECRET.as_bytes()).into();
    PolicySet::builder()
        .client(
            "backend",
            PolicyOverrides::new().client_secret_sha256(Some(hash)),
        )
        .client(
            "graceful",
            PolicyOverrides::new().grace_period(Duration::from_secs(30)),
        )
        .client(
            "office",
            PolicyOverrides::new().ip_allowlist(vec!["10.0.0.0/8".parse().unwrap()]),
        )
        .build()
        .unwrap()
}

pub fn config(data: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        policies: data.join("no-such-policies"),
        policy_set: Some(policies()),
        data: data.to_owned(),
        durability: Durability::Sync,
        admin_token: AdminTokenSource::Value(AdminToken::new(ADMIN).unwrap()),
        ..Config::default()
    }
}

/// A server on ephemeral ports with its own data directory.
pub struct TestServer {
    pub server: Option<ServerHandle>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: TempDir,
}

impl TestServer {
    pub fn start(name: &str) -> TestServer {
        TestServer::with(name, |_| {})
    }

    pub fn with(name: &str, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = TempDir::new(name);
        let mut c = config(dir.path());
        tweak(&mut c);
        let server = ServerHandle::start_with_workers(c, 2).unwrap();
        TestServer {
            addr: server.addr(),
            admin: server.admin_addr(),
            server: Some(server),
            dir,
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.server.as_ref().unwrap()
    }

    /// POST a form to the public listener.
    pub fn form(&self, path: &str, body: &str) -> Resp {
        self.form_with(path, body, &[])
    }

    pub fn form_with(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Resp {
        let mut h = vec![("Content-Type", "application/x-www-form-urlencoded")];
        h.extend_from_slice(headers);
        request(self.addr, "POST", path, &h, body.as_bytes())
    }

    pub fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, &[], b"")
    }

    /// A request to the admin listener with the admin token.
    pub fn admin(&self, method: &str, path: &str, json: Option<serde_json::Value>) -> Resp {
        let auth = format!("Bearer {ADMIN}");
        let body = json.map(|j| j.to_string()).unwrap_or_default();
        request(
            self.admin,
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    }

    /// Mint a code for `client` with the S256 challenge of [`VERIFIER`].
    pub fn code(&self, client: &str, subject: &str, scope: &str) -> String {
        let r = self.admin(
            "POST",
            "/admin/v1/authorizations",
            Some(serde_json::json!({
                "client_id": client,
                "subject": subject,
                "scope": scope,
                "redirect_uri": REDIRECT,
                "code_challenge": challenge(VERIFIER),
                "code_challenge_method": "S256",
            })),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["code"].as_str().unwrap().to_owned()
    }

    /// Code exchange for a public client; the token response.
    pub fn exchange(&self, client: &str, code: &str) -> Resp {
        self.form(
            "/oauth2/token",
            &format!(
                "grant_type=authorization_code&code={code}&redirect_uri={}&client_id={client}&code_verifier={VERIFIER}",
                enc(REDIRECT)
            ),
        )
    }

    /// A new family for a public client: its first refresh token.
    pub fn family(&self, client: &str, subject: &str, scope: &str) -> String {
        let code = self.code(client, subject, scope);
        let r = self.exchange(client, &code);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["refresh_token"].as_str().unwrap().to_owned()
    }

    /// A refresh grant for a public client.
    pub fn refresh(&self, client: &str, token: &str) -> Resp {
        self.form(
            "/oauth2/token",
            &format!("grant_type=refresh_token&refresh_token={token}&client_id={client}"),
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().unwrap();
        }
    }
}

/// Form-urlencode a value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `Authorization: Basic` for a client.
pub fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Assert an OAuth error response.
    pub fn assert_error(&self, status: u16, error: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        let j = self.json();
        assert_eq!(j["error"], error, "{j}");
        assert_eq!(self.header("cache-control"), Some("no-store"));
        j["error_description"].as_str().unwrap_or("").to_owned()
    }
}

/// One HTTP/1.1 request on a new connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

/// [`request`], with connection failures and malformed responses as errors.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

/// Read one response until the server closes the connection.
pub fn read_response(s: &mut TcpStream) -> Resp {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
        .unwrap_or_else(|| panic!("malformed response: {:?}", String::from_utf8_lossy(&raw)))
}

pub fn parse_response(raw: &[u8]) -> Option<Resp> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..nl]).ok()?.trim(), 16).ok()?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    Some(Resp {
        status,
        headers,
        body,
    })
}

/// Decode a JWT's payload without verifying it.
pub fn jwt_part(jwt: &str, i: usize) -> serde_json::Value {
    let part = jwt.split('.').nth(i).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}
