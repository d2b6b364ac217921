//! `serve --store URL`: several instances of the server on one Redis
//! (README "Several instances of the server").
//!
//! The engine's state lives in the library's [`RedisStore`]. This module
//! holds what the server adds on top, on the store's own multiplexed
//! connection ([`RedisStore::connection`]), awaited from the server's
//! runtime:
//!
//! - the URL flag, parsed without ever echoing it (it may carry a
//!   password);
//! - key fingerprints in the hash `<prefix>:keys`: one per MAC key id, one
//!   for the access-token signing key and one for the DPoP nonce key, so
//!   that an instance whose keys contradict the others' refuses to start
//!   instead of minting tokens they reject;
//! - the DPoP `jti` replay records ([`RedisReplayCache`]), so that a proof
//!   used on one instance is refused on every other (RFC 9449 §11.1).

use std::fmt;
use std::time::Duration;

use refresh_guard::{Error, RedisConnection, RedisOptions, RedisStore};

use super::ServerError;
use super::dpop::{ReplayCache, ReplayError, ReplayFuture, ReplayKey};

/// What `--store` accepts, for error messages.
const FORMS: &str = "redis://HOST:PORT[/DB], rediss://HOST:PORT[/DB] or \
                     redis+cluster://HOST:PORT,HOST:PORT,...";

/// A parsed `--store` URL. `Debug` shows the kind and the number of nodes,
/// never the URL (it may carry credentials).
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// One Redis server: `redis://`, or `rediss://` (TLS, the server's
    /// certificate checked against the system's roots or
    /// `$SSL_CERT_FILE`).
    One(String),
    /// A Redis Cluster, reached through any of these node URLs.
    Cluster(Vec<String>),
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::One(_) => f.write_str("StoreUrl::One(<redacted>)"),
            StoreUrl::Cluster(n) => write!(f, "StoreUrl::Cluster({} nodes, <redacted>)", n.len()),
        }
    }
}

impl StoreUrl {
    /// Parse `--store`. The error says what is wrong and which forms are
    /// accepted; it never quotes the value (a password may be in it).
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        let bad = |what: &str| format!("--store: {what}; expected {FORMS}");
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("not a URL (no scheme://)"))?;
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((u, r)) => (Some(u), r),
            None => (None, rest),
        };
        match scheme {
            "redis" | "rediss" => {
                let (hostport, db) = match rest.split_once('/') {
                    Some((h, db)) => (h, Some(db)),
                    None => (rest, None),
                };
                host_port(hostport, false).map_err(|e| bad(&e))?;
                if let Some(db) = db
                    && !db.is_empty()
                    && db.parse::<u16>().is_err()
                {
                    return Err(bad("the database after '/' must be a number"));
                }
                redis::Client::open(url).map_err(|_| bad("the Redis client refuses it"))?;
                Ok(StoreUrl::One(url.to_owned()))
            }
            "redis+cluster" => {
                if rest.contains('/') {
                    return Err(bad(
                        "a cluster URL has no /DB (a cluster has database 0 only)",
                    ));
                }
                let mut nodes = Vec::new();
                for node in rest.split(',') {
                    host_port(node, true).map_err(|e| bad(&e))?;
                    nodes.push(match userinfo {
                        Some(u) => format!("redis://{u}@{node}"),
                        None => format!("redis://{node}"),
                    });
                }
                Ok(StoreUrl::Cluster(nodes))
            }
            _ => Err(bad("unknown scheme")),
        }
    }

    /// Connect the engine's store; the server's own commands use its
    /// connection too ([`RedisStore::connection`]).
    pub(crate) fn connect_store(&self, options: RedisOptions) -> Result<RedisStore, ServerError> {
        match self {
            StoreUrl::One(url) => RedisStore::connect(url, options),
            StoreUrl::Cluster(nodes) => {
                let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
                RedisStore::connect_cluster(&nodes, options)
            }
        }
        .map_err(|e| match e {
            Error::Store { .. } => {
                ServerError::Config(format!("--store: cannot connect to Redis: {e}"))
            }
            e => ServerError::Engine(e),
        })
    }
}

/// A Redis error in a few words, never its full text (which can quote
/// the URL the client was built from).
fn cause(e: &redis::RedisError) -> String {
    if e.is_connection_refusal() {
        "connection refused".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else if e.is_io_error() || e.is_connection_dropped() {
        "connection lost".into()
    } else {
        e.category().to_owned()
    }
}

/// `HOST:PORT` (port required when `need_port`): what is wrong, or `Ok`.
fn host_port(s: &str, need_port: bool) -> Result<(), String> {
    if s.is_empty() {
        return Err("a host is missing".into());
    }
    // `[v6]:port`, `host:port` or `host`.
    let (host, port) = match s.strip_prefix('[') {
        Some(v6) => {
            let (h, rest) = v6
                .split_once(']')
                .ok_or("an IPv6 host is missing its ']'")?;
            (h, rest.strip_prefix(':'))
        }
        None => match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        },
    };
    if host.is_empty() {
        return Err("a host is missing".into());
    }
    match port {
        Some(p) if p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        Some(_) => Err("a port must be a number from 1 to 65535".into()),
        None if need_port => Err("every cluster node needs HOST:PORT".into()),
        None => Ok(()),
    }
}

/// The server's side of the store: its connection, command timeout and
/// key prefix (the engine's, so one `KEYS rg:*` shows everything).
#[derive(Clone)]
pub(crate) struct StoreLink {
    conn: RedisConnection,
    timeout: Duration,
    prefix: String,
}

impl StoreLink {
    pub(crate) fn new(conn: RedisConnection, options: &RedisOptions) -> StoreLink {
        StoreLink {
            conn,
            timeout: options.command_timeout,
            prefix: options.prefix.clone(),
        }
    }

    /// Whether Redis answers a PING within the command timeout (`/healthz`
    /// asks, so that an idle instance reports an outage too).
    pub(crate) async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }

    /// Compare `prints` with the store's and add those it lacks, in one
    /// script (so a refused instance adds nothing). Every conflict is
    /// named in the error.
    pub(crate) async fn check_fingerprints(
        &self,
        prints: &[KeyPrint],
    ) -> Result<Vec<String>, ServerError> {
        let key = format!("{}:keys", self.prefix);
        let script = redis::Script::new(FINGERPRINTS);
        let mut call = script.key(&key);
        for p in prints {
            call.arg(&p.field).arg(super::datadir::to_hex(&p.print));
        }
        let mut conn = self.conn.clone();
        let answer = tokio::time::timeout(
            self.timeout * 4,
            call.invoke_async::<(Vec<String>, Vec<String>)>(&mut conn),
        )
        .await;
        let (conflicts, added) = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                return Err(ServerError::Config(format!(
                    "--store: the key fingerprints could not be checked: {}",
                    cause(&e)
                )));
            }
            Err(_) => {
                return Err(ServerError::Config(
                    "--store: the key fingerprints could not be checked: no answer in time".into(),
                ));
            }
        };
        if conflicts.is_empty() {
            return Ok(added);
        }
        let named: Vec<String> = conflicts
            .iter()
            .map(|field| {
                prints
                    .iter()
                    .find(|p| p.field == *field)
                    .map_or_else(|| field.clone(), |p| p.what.clone())
            })
            .collect();
        Err(ServerError::KeyConflict {
            keys: named,
            hash: key,
        })
    }
}

/// KEYS[1] the fingerprint hash; ARGV field, fingerprint pairs. Answers
/// {conflicts, added}: the fields whose stored fingerprint differs (then
/// nothing is written), else the fields it added (HSETNX).
const FINGERPRINTS: &str = r"
local conflicts = {}
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur and cur ~= ARGV[i + 1] then table.insert(conflicts, ARGV[i]) end
end
if #conflicts > 0 then return {conflicts, {}} end
local added = {}
for i = 1, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    table.insert(added, ARGV[i])
  end
end
return {{}, added}
";

/// One key's fingerprint as the store records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyPrint {
    /// The hash field: `mac:<id>`, `jwt-ed25519` or `dpop-nonce`.
    pub(crate) field: String,
    /// What an operator reads: the file and, for the ring, the id.
    pub(crate) what: String,
    /// [`fingerprint`] of the key.
    pub(crate) print: [u8; 16],
}

/// HMAC-SHA256 keyed by the key itself over a fixed label and the field,
/// truncated to 16 bytes: equal keys give equal fingerprints, and a
/// fingerprint tells nothing about its key (HMAC is a PRF under its key),
/// so the store can hold it. The field in the input keeps the MAC key of
/// id 3 and the same bytes used as a signing key apart.
pub(crate) fn fingerprint(field: &str, secret: &[u8; 32]) -> [u8; 16] {
    use hmac::{Hmac, Mac};
    // HMAC takes keys of any length.
    let mut mac = <Hmac<sha2::Sha256>>::new_from_slice(secret).expect("any key length");
    mac.update(b"refresh-guard key fingerprint v1\0");
    mac.update(field.as_bytes());
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// DPoP `jti` replay records in the store (RFC 9449 §11.1), shared by
/// every instance: `SET <prefix>:dpop:{<replay key, hex>} 1 NX PX <ms>`.
/// The braces are a Redis Cluster hash tag (each record is one key, so
/// records spread over the slots). An unanswered command is
/// [`ReplayError::Unavailable`]: the proof is refused, never accepted
/// unrecorded.
pub struct RedisReplayCache {
    link: StoreLink,
}

impl RedisReplayCache {
    pub(crate) fn new(link: StoreLink) -> RedisReplayCache {
        RedisReplayCache { link }
    }
}

impl ReplayCache for RedisReplayCache {
    fn first_use(&self, key: &ReplayKey, expires: u64, now: u64) -> ReplayFuture {
        let record = format!(
            "{}:dpop:{{{}}}",
            self.link.prefix,
            super::datadir::to_hex(key)
        );
        // At least one second: SET refuses a zero expiry.
        let ttl_ms = expires.saturating_sub(now).max(1).saturating_mul(1000);
        let mut conn = self.link.conn.clone();
        let timeout = self.link.timeout;
        Box::pin(async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&record).arg(1).arg("NX").arg("PX").arg(ttl_ms);
            let set = cmd.query_async::<Option<String>>(&mut conn);
            match tokio::time::timeout(timeout, set).await {
                Ok(Ok(Some(_))) => Ok(true),
                Ok(Ok(None)) => Ok(false),
                Ok(Err(e)) => {
                    tracing::warn!(error = %cause(&e), "DPoP replay record not written");
                    Err(ReplayError::Unavailable)
                }
                Err(_) => {
                    tracing::warn!("DPoP replay record not written: no answer in time");
                    Err(ReplayError::Unavailable)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_errors_say_what_is_wrong_without_the_value() {
        assert_eq!(
            StoreUrl::parse("redis://127.0.0.1:6379/2"),
            Ok(StoreUrl::One("redis://127.0.0.1:6379/2".into()))
        );
        assert!(StoreUrl::parse("redis://user:pw@redis.internal:6379").is_ok());
        assert!(StoreUrl::parse("redis://[::1]:6379/").is_ok());
        assert!(StoreUrl::parse("rediss://redis.internal:6380/0").is_ok());
        assert_eq!(
            StoreUrl::parse("redis+cluster://10.0.0.1:7000,10.0.0.2:7001"),
            Ok(StoreUrl::Cluster(vec![
                "redis://10.0.0.1:7000".into(),
                "redis://10.0.0.2:7001".into()
            ]))
        );
        for (bad, want) in [
            ("localhost:6379", "no scheme"),
            ("http://h:1", "unknown scheme"),
            ("redis://:6379", "host is missing"),
            ("redis://h:port", "port must be a number"),
            ("redis://h:0", "port must be a number"),
            ("redis://h:6379/x", "database"),
            ("redis+cluster://a:1,b", "HOST:PORT"),
            ("redis+cluster://a:1,,b:2", "host is missing"),
            ("redis+cluster://a:1/0", "no /DB"),
            ("rediss://h:x", "port"),
            ("redis://secret-pw@h:x", "port"),
        ] {
            let e = StoreUrl::parse(bad).unwrap_err();
            assert!(e.starts_with("--store: ") && e.contains(want), "{bad}: {e}");
            assert!(e.contains("redis+cluster://HOST:PORT"), "{e}");
            assert!(!e.contains("secret-pw"), "{e}");
        }
        let d = format!("{:?}", StoreUrl::parse("redis://u:hunter2@h:1").unwrap());
        assert!(!d.contains("hunter2"), "{d}");
    }

    /// Equal keys, equal prints; another key or another field, another
    /// print; the print is not the key.
    #[test]
    fn fingerprints_depend_on_key_and_field_only() {
        let a = fingerprint("mac:0", &[1; 32]);
        assert_eq!(a, fingerprint("mac:0", &[1; 32]));
        assert_ne!(a, fingerprint("mac:0", &[2; 32]));
        assert_ne!(a, fingerprint("mac:1", &[1; 32]));
        assert_ne!(&a[..], &[1u8; 16][..]);
    }
}
