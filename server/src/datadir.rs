//! The data directory: the MAC key ring, the access-token signing key and
//! the generated admin token, each created on first start with mode 0600
//! (the directory 0700), and read back on every later start. A directory
//! other users can reach or another user owns is refused, and the files
//! lose any access of other users (docs/store.md, "Permissions"; group
//! access is allowed, for container volume groups).
//!
//! ```text
//! <data>/mac-keys          "active <id>" and "<id> <64 hex>" lines
//! <data>/jwt-ed25519.key   64 hex digits: the Ed25519 seed
//! <data>/dpop-nonce.key    64 hex digits: the DPoP nonce MAC key
//! <data>/admin.token       only when no token is configured
//! <data>/log/              the embedded store
//! ```

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ServerError;
use super::store::{KeyPrint, fingerprint};
use refresh_guard::private_files::{self as private, Refusal};
use refresh_guard::{Error, KeyId, KeyRing, KeySecret};

/// File name of the MAC key ring.
pub const MAC_KEYS: &str = "mac-keys";
/// File name of the access-token signing key.
pub const SIGNING_KEY: &str = "jwt-ed25519.key";
/// File name of the DPoP nonce key (README "DPoP at the token endpoint").
pub const DPOP_NONCE_KEY: &str = "dpop-nonce.key";
/// File name of the generated admin token.
pub const ADMIN_TOKEN: &str = "admin.token";
/// Directory of the embedded store.
pub const LOG_DIR: &str = refresh_guard::LOG_SUBDIR;

/// The admin API's bearer token, kept only as its SHA-256 so that nothing
/// can print it; compared in constant time.
#[derive(Clone)]
pub struct AdminToken {
    hash: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// Shortest token accepted from configuration.
    pub const MIN_LEN: usize = 16;

    /// A token from configuration; `None` if shorter than
    /// [`MIN_LEN`](Self::MIN_LEN) after trimming whitespace.
    pub fn new(token: &str) -> Option<AdminToken> {
        let t = token.trim();
        (t.len() >= Self::MIN_LEN).then(|| AdminToken {
            hash: Sha256::digest(t.as_bytes()).into(),
        })
    }

    /// Whether `presented` is the token. Hashing first makes the comparison
    /// independent of the presented length as well as its content.
    pub fn matches(&self, presented: &str) -> bool {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        h.ct_eq(&self.hash).into()
    }
}

/// Where the admin token comes from.
#[derive(Clone, Debug)]
pub enum AdminTokenSource {
    /// Read from this file (`--admin-token-file`).
    File(PathBuf),
    /// Given directly (the `REFRESH_GUARD_ADMIN_TOKEN` variable, or an
    /// embedder).
    Value(AdminToken),
    /// Generated into `<data>/admin.token` on first start, reused after.
    Generate,
}

fn io_error(path: &Path, e: io::Error) -> ServerError {
    ServerError::Io {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

fn invalid(path: &Path, line: usize, detail: impl Into<String>) -> ServerError {
    ServerError::DataFile {
        path: path.to_owned(),
        line,
        detail: detail.into(),
    }
}

fn refused(r: Refusal) -> ServerError {
    match r {
        Refusal::Io { path, source } => io_error(&path, source),
        Refusal::Exposed { path, detail } => ServerError::Exposed { path, detail },
        other => ServerError::Engine(other.into()),
    }
}

/// Create `dir` (mode 0700) if missing; refuse it if other users can reach
/// it or another user owns it.
pub fn ensure_dir(dir: &Path) -> Result<(), ServerError> {
    private::create_dir(dir).map_err(refused)
}

/// Read a secret file, or create it with `make()`'s contents and mode 0600
/// if it does not exist. Returns the contents and whether it was created.
fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> Result<String, ServerError>,
) -> Result<(String, bool), ServerError> {
    match fs::read_to_string(path) {
        Ok(s) => {
            // The server's own file: other users lose access, group
            // access is reported.
            private::tighten_file(path).map_err(refused)?;
            warn_if_exposed(path);
            return Ok((s, false));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(path, e)),
    }
    let contents = make()?;
    let mut file = match private::file_options()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => f,
        // Another process created it first: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return fs::read_to_string(path)
                .map(|s| (s, false))
                .map_err(|e| io_error(path, e));
        }
        Err(e) => return Err(io_error(path, e)),
    };
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error(path, e))?;
    if let Some(parent) = path.parent() {
        // Make the new directory entry durable too; best effort.
        let _ = fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok((contents, true))
}

#[cfg(unix)]
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "secret file is readable by group or others; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_exposed(_: &Path) {}

/// Fill `buf` from the OS CSPRNG. A failure is an error, never a weaker
/// fallback: predictable key material would let anyone mint tokens.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|e| Error::Random {
        detail: e.to_string(),
    })
}

fn random32() -> Result<[u8; 32], ServerError> {
    let mut b = [0u8; 32];
    fill_random(&mut b).map_err(ServerError::Engine)?;
    Ok(b)
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn from_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (s[2 * i] as char).to_digit(16)?;
        let lo = (s[2 * i + 1] as char).to_digit(16)?;
        *o = u8::try_from(hi << 4 | lo).ok()?;
    }
    Some(out)
}

/// Load the MAC key ring from `<data>/mac-keys`, creating it with one
/// fresh key (id 0) on first start.
#[cfg(test)]
pub fn key_ring(data: &Path) -> Result<KeyRing, ServerError> {
    key_ring_with_prints(data).map(|(ring, _)| ring)
}

/// [`key_ring`], with each key's fingerprint (`serve --store` compares
/// them with the store's).
pub(crate) fn key_ring_with_prints(data: &Path) -> Result<(KeyRing, Vec<KeyPrint>), ServerError> {
    let path = data.join(MAC_KEYS);
    let (text, created) = read_or_create(&path, || {
        Ok(format!(
            "# refresh-guard MAC key ring. Keep this file secret.\n\
             # One key per line, \"<id 0-255> <64 hex digits>\"; \"active <id>\"\n\
             # names the key that mints. Add a key and make it active to rotate;\n\
             # remove a key to invalidate every token it minted.\n\
             active 0\n0 {}\n",
            to_hex(&random32()?)
        ))
    })?;
    if created {
        tracing::info!(path = %path.display(), "created the MAC key ring");
    }
    let mut ring: Option<KeyRing> = None;
    let mut prints = Vec::new();
    let mut active = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (a, b) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| invalid(&path, n + 1, "expected \"<id> <hex>\" or \"active <id>\""))?;
        let b = b.trim();
        let id = |s: &str| {
            s.parse::<u8>()
                .map(KeyId)
                .map_err(|_| invalid(&path, n + 1, "key id must be 0-255"))
        };
        if a == "active" {
            active = Some(id(b)?);
            continue;
        }
        let id = id(a)?;
        let bytes =
            from_hex32(b).ok_or_else(|| invalid(&path, n + 1, "key must be 64 hex digits"))?;
        let field = format!("mac:{}", id.0);
        prints.push(KeyPrint {
            print: fingerprint(&field, &bytes),
            field,
            what: format!("{} key id {}", path.display(), id.0),
        });
        let secret = KeySecret::from_bytes(bytes);
        match &mut ring {
            None => ring = Some(KeyRing::new(id, &secret)),
            Some(r) => r
                .add(id, &secret)
                .map_err(|e| invalid(&path, n + 1, e.to_string()))?,
        }
    }
    let mut ring = ring.ok_or_else(|| invalid(&path, 0, "no key"))?;
    if let Some(id) = active {
        ring.set_active(id)
            .map_err(|e| invalid(&path, 0, e.to_string()))?;
    }
    Ok((ring, prints))
}

/// The fingerprint of a single-key file (the signing key, the DPoP nonce
/// key) under `field`.
pub(crate) fn file_print(data: &Path, file: &str, field: &str, key: &[u8; 32]) -> KeyPrint {
    KeyPrint {
        field: field.to_owned(),
        what: data.join(file).display().to_string(),
        print: fingerprint(field, key),
    }
}

/// Load the Ed25519 seed from `<data>/jwt-ed25519.key`, creating it on
/// first start.
pub fn signing_key(data: &Path) -> Result<[u8; 32], ServerError> {
    let path = data.join(SIGNING_KEY);
    let (text, created) = read_or_create(&path, || Ok(format!("{}\n", to_hex(&random32()?))))?;
    if created {
        tracing::info!(path = %path.display(), "created the access-token signing key");
    }
    from_hex32(text.trim()).ok_or_else(|| invalid(&path, 1, "expected 64 hex digits"))
}

/// Load the DPoP nonce key from `<data>/dpop-nonce.key`, creating it on
/// first start: instances sharing the file accept each other's nonces.
pub fn dpop_nonce_key(data: &Path) -> Result<[u8; 32], ServerError> {
    let path = data.join(DPOP_NONCE_KEY);
    let (text, created) = read_or_create(&path, || Ok(format!("{}\n", to_hex(&random32()?))))?;
    if created {
        tracing::info!(path = %path.display(), "created the DPoP nonce key");
    }
    from_hex32(text.trim()).ok_or_else(|| invalid(&path, 1, "expected 64 hex digits"))
}

/// Resolve the admin token. A generated one is written to
/// `<data>/admin.token` and the log names the file, never the token.
pub fn admin_token(source: &AdminTokenSource, data: &Path) -> Result<AdminToken, ServerError> {
    let (path, generated) = match source {
        AdminTokenSource::Value(t) => return Ok(t.clone()),
        AdminTokenSource::File(p) => (p.clone(), false),
        AdminTokenSource::Generate => (data.join(ADMIN_TOKEN), true),
    };
    let text = if generated {
        let (text, created) = read_or_create(&path, || {
            Ok(format!(
                "{}\n",
                base64::Engine::encode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    random32()?
                )
            ))
        })?;
        if created {
            tracing::info!(path = %path.display(), "generated the admin token");
        } else {
            tracing::info!(path = %path.display(), "admin token read from file");
        }
        text
    } else {
        warn_if_exposed(&path);
        fs::read_to_string(&path).map_err(|e| io_error(&path, e))?
    };
    AdminToken::new(&text).ok_or_else(|| {
        invalid(
            &path,
            1,
            format!(
                "admin token must be at least {} characters",
                AdminToken::MIN_LEN
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rg-datadir-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        ensure_dir(&d).unwrap();
        d
    }

    #[test]
    fn created_once_with_mode_0600_then_reused() {
        let d = tempdir("create");
        let ring = key_ring(&d).unwrap();
        let seed = signing_key(&d).unwrap();
        let token = admin_token(&AdminTokenSource::Generate, &d).unwrap();
        #[cfg(unix)]
        for f in [MAC_KEYS, SIGNING_KEY, ADMIN_TOKEN] {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert_eq!(signing_key(&d).unwrap(), seed);
        assert_eq!(
            key_ring(&d).unwrap().ids().collect::<Vec<_>>(),
            ring.ids().collect::<Vec<_>>()
        );
        let text = fs::read_to_string(d.join(ADMIN_TOKEN)).unwrap();
        assert!(token.matches(text.trim()));
        assert!(
            admin_token(&AdminTokenSource::Generate, &d)
                .unwrap()
                .matches(text.trim())
        );
        assert!(!token.matches("wrong"));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn key_ring_file_with_two_keys_and_errors_naming_the_line() {
        let d = tempdir("ring");
        let k = "ab".repeat(32);
        fs::write(d.join(MAC_KEYS), format!("# c\n1 {k}\n2 {k}\nactive 2\n")).unwrap();
        let ring = key_ring(&d).unwrap();
        assert_eq!(ring.active(), KeyId(2));
        assert_eq!(ring.ids().count(), 2);
        fs::write(d.join(MAC_KEYS), "active 0\n0 xyz\n").unwrap();
        let e = key_ring(&d).unwrap_err().to_string();
        assert!(e.contains("mac-keys:2"), "{e}");
        assert!(!e.contains("xyz"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }

    /// Regression: key files from before (or copied in) that every user
    /// could read stayed so; only a warning was logged. The server now
    /// takes other users' access away from the files it owns (group access
    /// stays, for volume groups) and refuses a data directory open to
    /// them, naming the fix.
    #[cfg(unix)]
    #[test]
    fn secret_files_lose_other_users_access_and_open_directories_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempdir("tighten");
        key_ring(&d).unwrap();
        signing_key(&d).unwrap();
        for f in [MAC_KEYS, SIGNING_KEY] {
            fs::set_permissions(d.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        key_ring(&d).unwrap();
        signing_key(&d).unwrap();
        for f in [MAC_KEYS, SIGNING_KEY] {
            let mode = fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o640, "{f}");
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(0o701)).unwrap();
        match ensure_dir(&d) {
            Err(ServerError::Exposed { path, detail }) => {
                assert_eq!(path, d);
                assert!(
                    detail.contains(&format!("chmod o-rwx {}", d.display())),
                    "{detail}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn short_admin_token_is_refused() {
        assert!(AdminToken::new("  short \n").is_none());
        let t = AdminToken::new(" 0123456789abcdef\n").unwrap();
        assert!(t.matches("0123456789abcdef"));
        assert_eq!(format!("{t:?}"), "AdminToken(<redacted>)");
    }
}
