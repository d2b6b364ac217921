//! The shared store: Redis (7.0, or what speaks its protocol) as the
//! authority several engines decide against (README "Several instances";
//! docs/design.md "Several instances").
//!
//! I/O: the store owns a tokio runtime with one worker thread that drives
//! one multiplexed connection (redis-rs `ConnectionManager`, which
//! reconnects by itself). Every command is spawned on that runtime under a
//! timeout and answers through a oneshot channel: blocking callers park on
//! it, async callers await it from any executor. Nothing here ever latches:
//! a command that fails or times out is an `Error::Store` for that call
//! only, and the next one tries again.
//!
//! Keys, under the configured prefix `p`:
//! - `p:f:{<family id, hex>}`: a hash, `v` the record's version (a counter
//!   the compare-and-set checks) and `r` the record (`src/store/codec.rs`).
//! - `p:s:{<128 bits of SHA-256 of the subject, hex>}`: a sorted set of the
//!   subject's families (member: id hex then client; score: creation
//!   time), for subject revocation and the family cap.
//!
//! The braces are Redis Cluster hash tags: each family's key, and each
//! subject's, lives in one slot, and no script touches two keys.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::error::Error;
use crate::token::FamilyId;

/// What the engine does with a token whose generation is ahead of the
/// store's record: provable by its tag (the MAC covers the generation), it
/// can only mean the store lost writes (a failover, a restored backup).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnRollback {
    /// Move the record forward to the presented generation (the presenter
    /// holds that generation, so it was minted), emit `state_rollback`,
    /// and decide on the moved record: the client keeps working.
    #[default]
    RollForward,
    /// Deny `state_rollback` and emit the event, as an engine alone does.
    Deny,
}

/// Options of a [`RedisStore`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Bound on opening a connection (at start and on every reconnect).
    /// Default 250 ms.
    pub connect_timeout: Duration,
    /// Bound on one command, from the caller's call to its answer. Default
    /// 250 ms. A call past it is `Error::Store`.
    pub command_timeout: Duration,
    /// Ceiling on a key's life in Redis, refreshed on every write; `None`
    /// keeps keys until revoked families are removed by hand (tests on a
    /// manual clock). Expiry is decided by the policy in force at each use
    /// (README "Policy knobs"); this only bounds memory, so it must be at
    /// least every policy's lifetime (the shorter of its `idle_ttl` and
    /// `absolute_ttl`; `None` for a policy with neither), the engine's
    /// `revoked_retention` and the code TTL: the engine's build refuses
    /// less. A policy set swapped in later is not checked:
    /// raise this first when lifetimes grow. Default 400 days.
    pub key_ttl: Option<Duration>,
    /// Family records each engine keeps in its cache. Default 100 000.
    pub cache_capacity: usize,
    /// A presented generation ahead of the store's. Default
    /// [`OnRollback::RollForward`].
    pub on_rollback: OnRollback,
    /// Prefix of every key. Default `"rg"`.
    pub prefix: String,
    /// Attempts of one decision before `Error::Store` when other engines
    /// keep changing the family under it. N requests racing on one family
    /// (a burst of grace replays: each one counts) take up to N attempts
    /// for the last of them. Default 64.
    pub max_attempts: u32,
    /// Replicas that must acknowledge each write before the call answers
    /// (Redis `WAIT`, pipelined with the write: one round trip, plus the
    /// replicas' acknowledgement). 0, the default, waits for none. Fewer
    /// acknowledgements within [`wait_timeout`](Self::wait_timeout) make
    /// the call `Error::Store` naming the shortfall: the write is on the
    /// primary and may or may not survive a failover (README "Durability
    /// on failover").
    pub wait_replicas: u32,
    /// Bound on that wait; less than `command_timeout`, so that a
    /// shortfall is answered as one. Default 100 ms.
    pub wait_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> RedisOptions {
        RedisOptions {
            connect_timeout: Duration::from_millis(250),
            command_timeout: Duration::from_millis(250),
            key_ttl: Some(Duration::from_secs(400 * 86_400)),
            cache_capacity: 100_000,
            on_rollback: OnRollback::RollForward,
            prefix: "rg".to_owned(),
            max_attempts: 64,
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(100),
        }
    }
}

impl RedisOptions {
    fn check(&self) -> Result<(), Error> {
        let bad = |name, expected| Err(Error::InvalidArgument { name, expected });
        if self.connect_timeout.is_zero() || self.connect_timeout > Duration::from_secs(60) {
            return bad("connect_timeout", "more than 0 and at most 60 s");
        }
        if self.command_timeout.is_zero() || self.command_timeout > Duration::from_secs(60) {
            return bad("command_timeout", "more than 0 and at most 60 s");
        }
        if self.key_ttl.is_some_and(|t| t < Duration::from_secs(1)) {
            return bad("key_ttl", "at least 1 s, or None");
        }
        if self.cache_capacity == 0 {
            return bad("cache_capacity", "at least 1");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts", "at least 1");
        }
        // WAIT's timeout 0 is "forever"; one past the command timeout would
        // answer every shortfall as a timeout instead of naming it.
        if self.wait_replicas > 0
            && (self.wait_timeout < Duration::from_millis(1)
                || self.wait_timeout >= self.command_timeout)
        {
            return bad(
                "wait_timeout",
                "at least 1 ms and less than command_timeout when wait_replicas > 0",
            );
        }
        if self.prefix.is_empty() || self.prefix.len() > 64 || self.prefix.contains(['{', '}', ':'])
        {
            return bad(
                "prefix",
                "1 to 64 bytes without '{', '}' or ':' (they would change the hash tag)",
            );
        }
        Ok(())
    }

    fn ttl_ms(&self) -> u64 {
        self.key_ttl.map_or(0, |t| t.as_millis() as u64)
    }
}

/// The compare-and-set of one family record: KEYS[1] the family's key;
/// ARGV[1] the version the engine decided from (0: the key must not
/// exist; -1: any); ARGV[2] the new record, or empty to only confirm that
/// the version is still current; ARGV[3] the key's TTL in ms (0: none).
/// Answers {1, version} when done, {0, version, record} when the record
/// changed since (the engine decides again on it), {0, 0} when it is gone.
const CAS: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 'r')
local v = tonumber(cur[1]) or 0
local want = tonumber(ARGV[1])
if want >= 0 and v ~= want then
  if cur[1] then return {0, v, cur[2]} end
  return {0, 0}
end
if ARGV[2] == '' then return {1, v} end
v = v + 1
redis.call('HSET', KEYS[1], 'v', v, 'r', ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
return {1, v}
";

/// A new family joins its subject: KEYS[1] the subject's key; ARGV[1] the
/// member (id hex then client), ARGV[2] its creation time, ARGV[3] the
/// client, ARGV[4] the cap (0: none), ARGV[5] the TTL in ms. Answers the
/// members of the same client to evict, oldest first, never the new one:
/// the subject's key is the authority for the cap. They stay in the set
/// until the engine has revoked them, so an eviction that fails is
/// evicted again by the next issue (follow-ups are idempotent).
const JOIN: &str = r"
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
local cap = tonumber(ARGV[4])
if cap == 0 then return {} end
local mine = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 33) == ARGV[3] then table.insert(mine, m) end
end
local excess = #mine - cap
local out = {}
for _, m in ipairs(mine) do
  if excess <= 0 then break end
  if m ~= ARGV[1] then
    table.insert(out, m)
    excess = excess - 1
  end
end
return out
";

/// What a compare-and-set found.
pub(crate) enum Cas {
    /// Written (or confirmed); the record's version now.
    Done(u64),
    /// The record changed since: its version and bytes now.
    Stale(u64, Vec<u8>),
    /// No such record (expired, or never written).
    Gone,
}

/// The connection: one server's (reconnecting by itself), or a cluster's
/// (routing each command by its key's slot, following MOVED/ASK).
#[derive(Clone)]
enum Conn {
    One(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// The store's multiplexed connection, for an embedder's own commands on
/// the same Redis (the server's key fingerprints, DPoP replay records,
/// health PINGs): one connection and one reconnect logic for both. Cheap
/// to clone; it may be used from any tokio runtime (the connection's
/// task runs on the store's).
#[derive(Clone)]
pub struct RedisConnection(Conn);

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A Redis server (or cluster) several engines share. Build an engine
/// on it with [`EngineBuilder::shared_store`](crate::EngineBuilder::shared_store).
pub struct RedisStore {
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    conn: Conn,
    /// With `wait_replicas`, the connections of the writes that WAIT: a
    /// WAIT holds its connection until the replicas answer (Redis
    /// processes nothing more from that client meanwhile), so reads and
    /// confirmations keep `conn` and waited writes take these in turn.
    writers: Vec<Conn>,
    next_writer: AtomicUsize,
    cas: Arc<Script>,
    join: Arc<Script>,
    options: RedisOptions,
    /// Set when a command failed, cleared when one (or the health probe)
    /// succeeds: a probe then reconnects in the background, so the first
    /// call after Redis returns is served.
    unhealthy: Arc<AtomicBool>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never kept, never printed.
        f.debug_struct("RedisStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime
        // (an engine dropped in an async server): let it stop in the
        // background instead.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn redis_error(what: &str, e: redis::RedisError) -> Error {
    Error::store_io(format!("redis {what}: {e}"), std::io::Error::other(e))
}

impl RedisStore {
    /// Connect to `url` (`redis://host:port/db`, `redis+unix:///path`;
    /// `rediss://` when the embedder enables one of the `redis` crate's TLS
    /// features, as the server does), within `options.connect_timeout`. The
    /// URL may carry credentials; it is not kept or printed.
    pub fn connect(url: &str, options: RedisOptions) -> Result<RedisStore, Error> {
        options.check()?;
        // The parser's message can quote the URL, password included.
        let client = redis::Client::open(url).map_err(|_| Error::InvalidArgument {
            name: "redis url",
            expected: "redis://[user:password@]host[:port][/db] or redis+unix:///path",
        })?;
        let runtime = runtime()?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.command_timeout))
            // One quick retry per reconnect; a caller never waits past its
            // command timeout anyway, and the next call reconnects again.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let open_one = || {
            let (client, config) = (client.clone(), config.clone());
            let fut = async move { ConnectionManager::new_with_config(client, config).await };
            open(&runtime, &options, "connect", fut).map(Conn::One)
        };
        let conn = open_one()?;
        let writers = (0..writers(&options))
            .map(|_| open_one())
            .collect::<Result<_, _>>()?;
        Ok(RedisStore::with(runtime, conn, writers, options))
    }

    /// Connect to a Redis Cluster through any of its `nodes` (URLs as for
    /// [`connect`](Self::connect)). Each family's keys carry its id as a
    /// hash tag, and each script touches one key, so every state change is
    /// one call on the family's node. [`Engine::revoke_client`] scans
    /// every primary.
    ///
    /// [`Engine::revoke_client`]: crate::Engine::revoke_client
    pub fn connect_cluster(nodes: &[&str], options: RedisOptions) -> Result<RedisStore, Error> {
        options.check()?;
        let client = redis::cluster::ClusterClient::builder(nodes.iter().copied())
            .connection_timeout(options.connect_timeout)
            .response_timeout(options.command_timeout)
            // A slot being resharded can take more than one redirection
            // (ASK, then MOVED while the nodes learn the new owner one by
            // one); they are retried at once, and the caller never waits
            // past its command timeout anyway.
            .retries(4)
            .build()
            .map_err(|_| Error::InvalidArgument {
                name: "redis cluster nodes",
                expected: "one or more redis://host:port URLs",
            })?;
        let runtime = runtime()?;
        let open_one = || {
            let client = client.clone();
            let fut = async move { client.get_async_connection().await };
            open(&runtime, &options, "cluster connect", fut).map(Conn::Cluster)
        };
        let conn = open_one()?;
        let writers = (0..writers(&options))
            .map(|_| open_one())
            .collect::<Result<_, _>>()?;
        Ok(RedisStore::with(runtime, conn, writers, options))
    }

    /// The store's connection, for the embedder's own commands (see
    /// [`RedisConnection`]).
    pub fn connection(&self) -> RedisConnection {
        RedisConnection(self.conn.clone())
    }

    fn with(
        runtime: tokio::runtime::Runtime,
        conn: Conn,
        writers: Vec<Conn>,
        options: RedisOptions,
    ) -> RedisStore {
        let unhealthy = Arc::new(AtomicBool::new(false));
        runtime.spawn(probe(
            conn.clone(),
            Arc::downgrade(&unhealthy),
            options.command_timeout,
        ));
        RedisStore {
            unhealthy,
            runtime: Some(runtime),
            conn,
            writers,
            next_writer: AtomicUsize::new(0),
            cas: Arc::new(Script::new(CAS)),
            join: Arc::new(Script::new(JOIN)),
            options,
        }
    }

    /// Whether the last command failed (Redis unreachable or silent): a
    /// health check's question; it heals by itself.
    pub fn is_healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    /// The options it was built with.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    fn family_key(&self, id: &FamilyId) -> String {
        format!("{}:f:{{{id}}}", self.options.prefix)
    }

    fn subject_key(&self, subject: &str) -> String {
        let digest = Sha256::digest(subject.as_bytes());
        let mut hex = String::with_capacity(32);
        for b in &digest[..16] {
            hex.push_str(&format!("{b:02x}"));
        }
        format!("{}:s:{{{hex}}}", self.options.prefix)
    }

    /// Run `op` on the store's runtime under the command timeout.
    fn spawn<T, F>(&self, what: &'static str, op: impl FnOnce(Conn) -> F) -> Reply<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, Failure>> + Send + 'static,
    {
        self.spawn_on(self.conn.clone(), what, op)
    }

    /// [`spawn`](Self::spawn) on connection `conn`.
    fn spawn_on<T, F>(&self, conn: Conn, what: &'static str, op: impl FnOnce(Conn) -> F) -> Reply<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, Failure>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let timeout = self.options.command_timeout;
        let fut = op(conn);
        let unhealthy = self.unhealthy.clone();
        if let Some(rt) = &self.runtime {
            rt.spawn(async move {
                let r = match tokio::time::timeout(timeout, fut).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(Failure::Redis(e))) => Err(redis_error(what, e)),
                    // Redis answered: the connection is healthy.
                    Ok(Err(Failure::Unreplicated(e))) => {
                        unhealthy.store(false, Ordering::Relaxed);
                        let _ = tx.send(Err(e));
                        return;
                    }
                    Err(_) => Err(Error::store(format!(
                        "redis {what}: no answer within {timeout:?}"
                    ))),
                };
                unhealthy.store(r.is_err(), Ordering::Relaxed);
                let _ = tx.send(r);
            });
        }
        Reply(rx)
    }

    /// The connection for a write, and the WAIT that must follow it
    /// (replicas, timeout), if the options ask for one.
    fn writer(&self) -> (Conn, Option<(u32, Duration)>) {
        if self.writers.is_empty() {
            return (self.conn.clone(), None);
        }
        let i = self.next_writer.fetch_add(1, Ordering::Relaxed) % self.writers.len();
        let wait = (self.options.wait_replicas, self.options.wait_timeout);
        (self.writers[i].clone(), Some(wait))
    }

    /// Read one family's version and record.
    pub(crate) fn get(&self, id: &FamilyId) -> Reply<Option<(u64, Vec<u8>)>> {
        let key = self.family_key(id);
        self.spawn("read", move |mut c| async move {
            let (v, r): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
                .arg(&key)
                .arg("v")
                .arg("r")
                .query_async(&mut c)
                .await?;
            Ok(v.zip(r))
        })
    }

    /// Write `record` (or, `None`, only confirm) if the family is still at
    /// `expected` (0: new; -1: whatever it is).
    pub(crate) fn cas(&self, id: &FamilyId, expected: i64, record: Option<Vec<u8>>) -> Reply<Cas> {
        let key = self.family_key(id);
        let ttl = self.options.ttl_ms();
        let script = self.cas.clone();
        // Only a write waits for replicas: a confirmation changes nothing.
        let (conn, wait) = match record {
            Some(_) => self.writer(),
            None => (self.conn.clone(), None),
        };
        let id = *id;
        self.spawn_on(conn, "compare-and-set", move |mut c| async move {
            let mut inv = script.prepare_invoke();
            inv.key(&key)
                .arg(expected)
                .arg(record.unwrap_or_default())
                .arg(ttl);
            let Some((n, t)) = wait else {
                return Ok(parse_cas(inv.invoke_async(&mut c).await?)?);
            };
            let (v, acked) = waited(&mut c, &script, &inv, n, t).await?;
            let cas = parse_cas(v)?;
            match cas {
                Cas::Done(_) if acked < i64::from(n) => {
                    Err(Failure::short(&format!("family {id}"), acked, n, t))
                }
                cas => Ok(cas),
            }
        })
    }

    /// Add family `id` of `client` to `subject`; the members to evict under
    /// `cap` (0: none), as (id, client).
    pub(crate) fn join(
        &self,
        subject: &str,
        client: &str,
        id: &FamilyId,
        created_ms: u64,
        cap: u32,
    ) -> Reply<Vec<FamilyId>> {
        let key = self.subject_key(subject);
        let member = format!("{id}{client}");
        let client = client.to_owned();
        let ttl = self.options.ttl_ms();
        let script = self.join.clone();
        // The subject's set is the authority for the cap and for subject
        // revocation: a family lost from it would escape both.
        let (conn, wait) = self.writer();
        self.spawn_on(conn, "subject join", move |mut c| async move {
            let mut inv = script.prepare_invoke();
            inv.key(&key)
                .arg(member)
                .arg(created_ms)
                .arg(client)
                .arg(cap)
                .arg(ttl);
            let out = match wait {
                None => inv.invoke_async(&mut c).await?,
                Some((n, t)) => {
                    let (v, acked) = waited(&mut c, &script, &inv, n, t).await?;
                    if acked < i64::from(n) {
                        return Err(Failure::short("subject set", acked, n, t));
                    }
                    redis::from_redis_value::<Vec<Vec<u8>>>(v)?
                }
            };
            Ok(out.iter().filter_map(|m| member_id(m)).collect())
        })
    }

    /// The subject's families, as (id, client), oldest first.
    pub(crate) fn members(&self, subject: &str) -> Reply<Vec<(FamilyId, String)>> {
        let key = self.subject_key(subject);
        self.spawn("subject read", move |mut c| async move {
            let out: Vec<Vec<u8>> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await?;
            Ok(out
                .iter()
                .filter_map(|m| {
                    let id = member_id(m)?;
                    let client = String::from_utf8(m[32..].to_vec()).ok()?;
                    Some((id, client))
                })
                .collect())
        })
    }

    /// Take families out of the subject's set (revoked, or gone).
    pub(crate) fn leave(&self, subject: &str, members: Vec<(FamilyId, String)>) -> Reply<()> {
        let key = self.subject_key(subject);
        self.spawn("subject leave", move |mut c| async move {
            if members.is_empty() {
                return Ok(());
            }
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(&key);
            for (id, client) in &members {
                cmd.arg(format!("{id}{client}"));
            }
            Ok(cmd.query_async::<()>(&mut c).await?)
        })
    }

    /// Every family id in the store (an administrative scan): of the one
    /// server, or of every primary of a cluster (a family moved by a
    /// reshard during the scan can be missed or seen twice).
    pub(crate) fn scan(&self) -> Reply<Vec<FamilyId>> {
        let pattern = format!("{}:f:*", self.options.prefix);
        let prefix_len = self.options.prefix.len() + 4;
        self.spawn("scan", move |mut c| async move {
            let nodes = match &mut c {
                Conn::One(_) => vec![None],
                Conn::Cluster(cc) => primaries(cc).await?.into_iter().map(Some).collect(),
            };
            let mut ids = Vec::new();
            for node in nodes {
                let keys = scan_node(&mut c, node, &pattern).await?;
                ids.extend(
                    keys.iter()
                        .filter_map(|k| member_id(k.get(prefix_len..)?.strip_suffix(b"}")?)),
                );
            }
            Ok(ids)
        })
    }
}

/// The keys matching `pattern` of one server: the connection's own
/// (`node` `None`), or a cluster's node at (host, port).
async fn scan_node(
    c: &mut Conn,
    node: Option<(String, u16)>,
    pattern: &str,
) -> redis::RedisResult<Vec<Vec<u8>>> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let mut cursor = 0u64;
    let mut out = Vec::new();
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        let (next, keys): (u64, Vec<Vec<u8>>) = match (&node, &mut *c) {
            (Some((host, port)), Conn::Cluster(cc)) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                redis::from_redis_value(cc.route_command(cmd, route).await?)?
            }
            _ => cmd.query_async(c).await?,
        };
        out.extend(keys);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// The primaries of a cluster, as (host, port), from `CLUSTER SLOTS`
/// (each range: start, end, then its primary first).
async fn primaries(
    cc: &mut redis::cluster_async::ClusterConnection,
) -> redis::RedisResult<Vec<(String, u16)>> {
    let ranges: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(cc).await?;
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else { continue };
        let Some(Value::Array(node)) = items.get(2) else {
            continue;
        };
        let (Some(host), Some(Value::Int(port))) = (node.first(), node.get(1)) else {
            continue;
        };
        let host: String = redis::from_redis_value(host.clone())?;
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        if !out.contains(&(host.clone(), port)) {
            out.push((host, port));
        }
    }
    Ok(out)
}

/// Why a command on the store's runtime failed.
enum Failure {
    /// Redis or the connection failed.
    Redis(redis::RedisError),
    /// Written on the primary, but fewer replicas acknowledged than asked.
    Unreplicated(Error),
}

impl From<redis::RedisError> for Failure {
    fn from(e: redis::RedisError) -> Failure {
        Failure::Redis(e)
    }
}

impl From<redis::ParsingError> for Failure {
    fn from(e: redis::ParsingError) -> Failure {
        Failure::Redis(e.into())
    }
}

impl Failure {
    fn short(what: &str, acked: i64, wanted: u32, timeout: Duration) -> Failure {
        Failure::Unreplicated(Error::store(format!(
            "redis: {what} written on the primary, but {acked} of {wanted} replicas \
             acknowledged within {timeout:?}: it may not survive a failover"
        )))
    }
}

/// `inv` then `WAIT n t` as one pipeline, so a waited write costs one
/// round trip plus the replicas' acknowledgement. WAIT counts the replicas
/// that hold every write of its own connection so far, so it must follow
/// the write on the connection, and node, that made it: on a cluster the
/// client routes the pipeline by the script's key and follows a MOVED or
/// ASK in its replies by sending the whole pipeline again to the node
/// named (after ASKING), so the WAIT goes where the write went. Answers the
/// script's reply and the number of replicas that acknowledged.
async fn waited(
    c: &mut Conn,
    script: &Script,
    inv: &redis::ScriptInvocation<'_>,
    n: u32,
    t: Duration,
) -> Result<(Value, i64), Failure> {
    let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
    let mut p = redis::pipe();
    p.invoke_script(inv).cmd("WAIT").arg(n).arg(ms);
    p.ignore_errors();
    let mut loaded = false;
    loop {
        let vals: Vec<Value> = p.query_async(c).await?;
        let (first, acked) = pair(vals)?;
        let Value::ServerError(e) = first else {
            return Ok((first, acked?));
        };
        let e = redis::RedisError::from(e);
        // A server that restarted (or a node new to the slot) has not seen
        // the script: load it and send again, once.
        if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) && !loaded {
            script.load_async(c).await?;
            loaded = true;
            continue;
        }
        return Err(e.into());
    }
}

/// The script's reply and WAIT's of a pipeline.
fn pair(vals: Vec<Value>) -> Result<(Value, Result<i64, Failure>), Failure> {
    let mut it = vals.into_iter();
    match (it.next(), it.next()) {
        (Some(first), Some(Value::Int(n))) => Ok((first, Ok(n))),
        (Some(first), Some(Value::ServerError(e))) => {
            Ok((first, Err(redis::RedisError::from(e).into())))
        }
        _ => Err(redis::RedisError::from((
            redis::ErrorKind::Parse,
            "a waited write answered an unexpected shape",
        ))
        .into()),
    }
}

/// While the last command failed, PING every 100 ms: the connection
/// manager reconnects on a failed command, so this heals the connection
/// before the next caller needs it. Ends with the store.
async fn probe(conn: Conn, unhealthy: std::sync::Weak<AtomicBool>, timeout: Duration) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(flag) = unhealthy.upgrade() else {
            return;
        };
        if !flag.load(Ordering::Relaxed) {
            continue;
        }
        let mut c = conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<()>(&mut c);
        if let Ok(Ok(())) = tokio::time::timeout(timeout, ping).await {
            flag.store(false, Ordering::Relaxed);
        }
    }
}

/// The family id a member (or tagged key) starts with.
fn member_id(m: &[u8]) -> Option<FamilyId> {
    let hex = m.get(..32)?;
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        let s = std::str::from_utf8(&hex[2 * i..2 * i + 2]).ok()?;
        *b = u8::from_str_radix(s, 16).ok()?;
    }
    Some(FamilyId::from_bytes(bytes))
}

fn parse_cas(v: Value) -> redis::RedisResult<Cas> {
    let bad = || {
        redis::RedisError::from((
            redis::ErrorKind::Parse,
            "compare-and-set answered an unexpected shape",
        ))
    };
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    match items.as_slice() {
        [ok, v] if int(ok) == Some(1) => Ok(Cas::Done(int(v).ok_or_else(bad)?)),
        [ok, v] if int(ok) == Some(0) && int(v) == Some(0) => Ok(Cas::Gone),
        [ok, v, Value::BulkString(r)] if int(ok) == Some(0) => {
            Ok(Cas::Stale(int(v).ok_or_else(bad)?, r.clone()))
        }
        _ => Err(bad()),
    }
}

/// Connections of waited writes (see `RedisStore::writers`).
fn writers(options: &RedisOptions) -> usize {
    if options.wait_replicas > 0 {
        WRITERS
    } else {
        0
    }
}

/// Waited writes in flight at once: each holds its connection for the
/// replicas' acknowledgement.
const WRITERS: usize = 4;

/// Open one connection on `runtime` within twice the connect timeout (a
/// cluster's connect is several).
fn open<C: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    options: &RedisOptions,
    what: &'static str,
    fut: impl Future<Output = redis::RedisResult<C>> + Send + 'static,
) -> Result<C, Error> {
    let (tx, rx) = oneshot::channel();
    let bound = options.connect_timeout * 2;
    runtime.spawn(async move {
        let _ = tx.send(tokio::time::timeout(bound, fut).await);
    });
    match block_on(rx) {
        Ok(Ok(Ok(conn))) => Ok(conn),
        Ok(Ok(Err(e))) => Err(redis_error(what, e)),
        Ok(Err(_)) => Err(Error::store(format!(
            "redis {what}: no connection within {bound:?}"
        ))),
        Err(_) => Err(Error::store("redis connect: its runtime stopped")),
    }
}

/// The store's runtime: one worker thread, named so in a thread dump.
fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("refresh-guard-redis")
        .enable_all()
        .build()
        .map_err(|e| Error::store_io("redis: starting its runtime thread", e))
}

/// One command's answer, from the store's runtime: await it from any
/// executor, or [`block_on`] it.
pub(crate) struct Reply<T>(oneshot::Receiver<Result<T, Error>>);

impl<T> Future for Reply<T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.0).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(_)) => {
                Poll::Ready(Err(Error::store("redis: the store's runtime stopped")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Run `fut` to completion on this thread, parking between wake-ups. Not
/// tokio's `blocking_recv`, which panics on a runtime's thread: a blocking
/// call from one only blocks, as every blocking call of the engine does.
pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_round_trip() {
        let id = FamilyId::from_bytes([0xab; 16]);
        let m = format!("{id}client-1");
        assert_eq!(member_id(m.as_bytes()), Some(id));
        assert_eq!(member_id(b"zz"), None);
    }

    #[test]
    fn options_refuse_a_prefix_that_would_move_the_hash_tag() {
        let o = RedisOptions {
            prefix: "a{b".into(),
            ..RedisOptions::default()
        };
        assert!(matches!(
            o.check(),
            Err(Error::InvalidArgument { name: "prefix", .. })
        ));
    }
}
