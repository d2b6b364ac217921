//! `refresh-guard serve`: a standards-conformant OAuth 2.0 token service on
//! the engine (README "Server"), for stacks that use the engine as a
//! sidecar and for standard client libraries, unmodified.
//!
//! What it serves, on two listeners:
//!
//! - public: `POST /oauth2/token` (RFC 6749 `authorization_code` with PKCE
//!   and `refresh_token`), `POST /oauth2/revoke` (RFC 7009),
//!   `POST /oauth2/introspect` (RFC 7662),
//!   `GET /.well-known/oauth-authorization-server` (RFC 8414),
//!   `GET /.well-known/jwks.json`, `GET /healthz`;
//! - admin (every request needs `Authorization: Bearer <admin token>`):
//!   `POST /admin/v1/authorizations` (mint a code after the embedding
//!   server's login and consent), `POST /admin/v1/subjects/{subject}/revoke`,
//!   policy reload, shadow, promote and drop, `GET /metrics`, `GET /healthz`.
//!
//! What it does not do: log users in, render consent, or host an
//! authorization endpoint. The embedding login calls the admin API for a
//! code and redirects the user agent with it; [`Config::authorization_endpoint`]
//! names that login page in the RFC 8414 metadata.
//!
//! Access tokens are RFC 9068 JWTs signed with Ed25519; refresh tokens are
//! the engine's. Every refresh is decided by the engine under the policy
//! set in force, and a rotation is answered only once it is durable in
//! `sync` mode (the handler awaits [`Engine::redeem_async`], never blocking
//! a worker thread on fsync).
//!
//! ```no_run
//! use refresh_guard_server::{Config, ServerHandle};
//!
//! let server = ServerHandle::start(Config {
//!     listen: "127.0.0.1:0".parse().unwrap(),
//!     admin_listen: "127.0.0.1:0".parse().unwrap(),
//!     ..Config::default()
//! })?;
//! println!("token endpoint: http://{}/oauth2/token", server.addr());
//! server.shutdown()?;
//! # Ok::<(), refresh_guard_server::ServerError>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod budget;
mod datadir;
pub mod dpop;
mod events;
mod form;
mod jwt;
mod limits;
mod metrics;
mod net;
mod oauth;
mod policies;
mod store;

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

pub use self::datadir::{AdminToken, AdminTokenSource};
pub use self::store::{RedisReplayCache, StoreUrl};

/// Entry points for the fuzz targets in `fuzz/`: the server's parsers of
/// untrusted bytes, reachable from outside the crate but not part of its
/// API (hidden from the docs, free to change in any release).
#[doc(hidden)]
pub mod fuzzing;
pub use self::jwt::{AccessClaims, AccessTokenSigner, Confirmation};

use refresh_guard::{
    AllowList, Durability, Engine, Error, IpRange, LoadErrors, LogHooks, LogOptions, LogStore,
    PolicyReloader, PolicySet, PolicyVersion, Profile, ProfileReport, RedisOptions, ReloadError,
};

use self::budget::Budget;
use self::limits::Sources;
use self::metrics::Metrics;

/// Most bytes of a request body; larger bodies are answered 413.
pub const MAX_BODY: usize = 16 * 1024;

/// How the server runs. [`Config::default`] is what `refresh-guard serve`
/// does with no flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// Public listener (`--listen`).
    pub listen: SocketAddr,
    /// Admin listener (`--admin-listen`).
    pub admin_listen: SocketAddr,
    /// Policy directory (`--policies`), loaded at start and on reload.
    pub policies: PathBuf,
    /// Start with this set instead of loading `policies` (embedders and
    /// tests); reloads still read `policies`.
    pub policy_set: Option<PolicySet>,
    /// Compliance profiles the set in force must meet
    /// (`--require-profile`): the server refuses to start on a set that
    /// breaks one, and refuses a reload or shadow candidate that would.
    pub require_profiles: Vec<&'static Profile>,
    /// Compliance profiles reported, not enforced (`--report-profile`):
    /// with the required ones, `/metrics` counts their controls not met.
    pub report_profiles: Vec<&'static Profile>,
    /// Data directory (`--data`): keys, admin token, store (the embedded
    /// log, only without [`store`](Self::store)).
    pub data: PathBuf,
    /// Store durability (`--durability`); `None` keeps state in memory only.
    /// Unused with a shared [`store`](Self::store): Redis's persistence
    /// decides what survives.
    pub durability: Durability,
    /// The store several instances share (`--store`; README "Several
    /// instances of the server"): families, codes and DPoP replay records
    /// in Redis, no embedded log.
    pub store: Option<StoreUrl>,
    /// Options of the shared store: timeouts, cache, key TTL, key prefix.
    pub store_options: RedisOptions,
    /// Peers whose `X-Forwarded-For` is believed (`--trusted-proxies`).
    pub trusted_proxies: Vec<IpRange>,
    /// The admin API's bearer token.
    pub admin_token: AdminTokenSource,
    /// Issuer identifier (`--issuer`); default `http://<listen>`. RFC 8414
    /// §2 wants an `https` URL in production.
    pub issuer: Option<String>,
    /// The embedding system's authorization endpoint, its login page
    /// (`--authorization-endpoint`), named in the RFC 8414 metadata. Without
    /// it the document omits the field RFC 8414 §2 requires, and a warning
    /// is logged at start.
    pub authorization_endpoint: Option<String>,
    /// Most concurrent connections on the public listener
    /// (`--max-connections`). When all are open, a new connection takes
    /// the slot of an idle one (one that never sent a request first); it
    /// waits in the accept backlog only while every one is mid-request.
    pub max_connections: usize,
    /// Most concurrent connections one source holds on the public listener
    /// (`--max-connections-per-source`): an IPv4 address or an IPv6 /64;
    /// trusted proxies are exempt. Connections beyond it are closed at once.
    pub max_connections_per_source: usize,
    /// Most concurrent connections on the admin listener
    /// (`--admin-max-connections`): a budget of its own, so that the public
    /// listener's clients cannot take it; shared as `max_connections` is.
    pub admin_max_connections: usize,
    /// Most concurrent admin connections one source holds
    /// (`--admin-max-connections-per-source`), as on the public listener.
    pub admin_max_connections_per_source: usize,
    /// Time a client has to send a request's headers; also the idle
    /// timeout of a keep-alive connection.
    pub header_timeout: Duration,
    /// Time a new connection has to send its first request's headers
    /// (`--first-request-timeout`), on both listeners; at most
    /// `header_timeout` applies. Without a request by then it is closed.
    pub first_request_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in.
    pub body_timeout: Duration,
    /// How often the sweeper runs.
    pub sweep_interval: Duration,
    /// Slots the sweeper examines per run.
    pub sweep_budget: usize,
    /// How often the store is compacted.
    pub compact_interval: Duration,
    /// How long shutdown waits for open requests before closing anyway.
    pub shutdown_timeout: Duration,
    /// DPoP proof verification at the token endpoint (`--dpop-algs`,
    /// `--dpop-max-age`, `--dpop-max-ahead`, `--dpop-replay-capacity`).
    pub dpop: dpop::DpopSettings,
    /// Failpoints in the store's writer (tests: a full disk); not a
    /// stable interface.
    #[doc(hidden)]
    pub store_hooks: Option<StoreHooks>,
}

/// [`LogHooks`] for [`Config::store_hooks`]: the server's tests fail the
/// store's writes at the file layer, as the library's tests do.
#[doc(hidden)]
#[derive(Clone)]
pub struct StoreHooks(pub Arc<dyn LogHooks>);

impl std::fmt::Debug for StoreHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreHooks(..)")
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            policies: PathBuf::from("./policies"),
            policy_set: None,
            require_profiles: Vec::new(),
            report_profiles: Vec::new(),
            data: PathBuf::from("./data"),
            durability: Durability::Sync,
            store: None,
            store_options: RedisOptions::default(),
            trusted_proxies: Vec::new(),
            admin_token: AdminTokenSource::Generate,
            issuer: None,
            authorization_endpoint: None,
            max_connections: 1024,
            max_connections_per_source: 32,
            admin_max_connections: 64,
            admin_max_connections_per_source: 16,
            header_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(1),
            sweep_budget: 10_000,
            compact_interval: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(30),
            dpop: dpop::DpopSettings::default(),
            store_hooks: None,
        }
    }
}

/// Why the server could not start or stopped abnormally.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerError {
    /// A file or directory could not be read or written.
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        detail: String,
    },
    /// A data-directory file is malformed.
    DataFile {
        /// The file.
        path: PathBuf,
        /// Its line (1-based; 0 = the file as a whole).
        line: usize,
        /// What is wrong (never the secret itself).
        detail: String,
    },
    /// A data directory or file is open to every user of the machine or
    /// owned by another user (it holds the MAC keys).
    Exposed {
        /// The directory or file.
        path: PathBuf,
        /// Its mode or owner, and the command that fixes it.
        detail: String,
    },
    /// A listener could not be bound.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        detail: String,
    },
    /// The policy directory failed to load.
    Policy {
        /// The directory.
        dir: PathBuf,
        /// Every problem, each naming file, line, column and key.
        errors: LoadErrors,
    },
    /// The policy set does not meet a profile the server requires
    /// (`--require-profile`).
    ProfileNotMet {
        /// The report of each required profile it does not meet.
        reports: Vec<ProfileReport>,
    },
    /// The engine or its store failed.
    Engine(Error),
    /// A key in the data directory is not the key the shared store knows by
    /// that name (`--store`): this instance would mint tokens the others
    /// refuse, or refuse theirs.
    KeyConflict {
        /// Each conflicting key: its file and, for the ring, its id.
        keys: Vec<String>,
        /// The store's hash of fingerprints.
        hash: String,
    },
    /// A configuration value is out of range, or the command line is wrong.
    Config(String),
    /// The async runtime failed.
    Runtime(String),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Io { path, detail } => write!(f, "{}: {detail}", path.display()),
            ServerError::DataFile { path, line, detail } => {
                write!(f, "{}:{line}: {detail}", path.display())
            }
            ServerError::Exposed { path, detail } => write!(f, "{}: {detail}", path.display()),
            ServerError::Bind { addr, detail } => write!(f, "cannot listen on {addr}: {detail}"),
            ServerError::Policy { dir, errors } => {
                write!(f, "policies in {} refused", dir.display())?;
                for e in errors {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
            ServerError::ProfileNotMet { reports } => {
                let names: Vec<&str> = reports.iter().map(|r| r.profile).collect();
                write!(
                    f,
                    "the policy set does not meet the required profile{} {}",
                    if names.len() == 1 { "" } else { "s" },
                    names.join(", ")
                )
            }
            ServerError::Engine(e) => write!(f, "engine: {e}"),
            ServerError::KeyConflict { keys, hash } => write!(
                f,
                "{} not the key the shared store knows by that name (fingerprint in \
                 {hash}): copy the key files from an instance already on this store, \
                 and give a new key a new id (README \"Several instances of the server\")",
                match keys.as_slice() {
                    [one] => format!("{one} is"),
                    more => format!("{} are", more.join(", ")),
                }
            ),
            ServerError::Config(s) => f.write_str(s),
            ServerError::Runtime(s) => write!(f, "runtime: {s}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// State shared by every handler.
pub(crate) struct App {
    pub(crate) engine: Arc<Engine>,
    pub(crate) signer: AccessTokenSigner,
    pub(crate) issuer: String,
    pub(crate) admin: AdminToken,
    /// `None` when no proxy is trusted. (An empty `AllowList` means "any".)
    trusted: Option<AllowList>,
    reloader: PolicyReloader,
    /// Required, then reported-only profiles: those `/metrics` reports on.
    pub(crate) profiles: Vec<&'static Profile>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) body_timeout: Duration,
    /// Cleared when the store fails: the engine then refuses every change.
    healthy: AtomicBool,
    authorization_endpoint: Option<String>,
    /// The metadata document and the policy version it was rendered under:
    /// `code_challenge_methods_supported` follows the set in force, so a
    /// reload, SIGHUP or promotion re-renders it at the next request.
    metadata: parking_lot::Mutex<(PolicyVersion, String)>,
    pub(crate) jwks: String,
    /// Checks DPoP proofs at the token endpoint.
    pub(crate) dpop: dpop::ProofVerifier,
    /// The server's own link to the shared store (`--store`): `/healthz`
    /// pings it. `None` with the embedded store.
    shared: Option<store::StoreLink>,
}

impl App {
    /// The client's address: the TCP peer, or, when the peer is a trusted
    /// proxy, the nearest untrusted hop of `X-Forwarded-For` (read from the
    /// right, since each proxy appends; the left is client-controlled).
    /// `None` when a trusted proxy's chain cannot be read down to an
    /// untrusted hop: no non-empty allow-list admits such a caller.
    pub(crate) fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> Option<IpAddr> {
        let values = headers.get_all("x-forwarded-for");
        forwarded_client(
            peer.ip(),
            self.trusted.as_ref(),
            values.iter().map(|v| v.as_bytes()),
        )
    }

    /// Note an engine failure; a failure of the embedded store makes
    /// `/healthz` fail until a restart (it has failed closed).
    pub(crate) fn engine_failed(&self, what: &str, e: &Error) {
        if self.shared.is_some() && matches!(e, Error::Store { .. }) {
            // A shared store heals by itself (README "Several instances"):
            // nothing latches, `/healthz` asks Redis.
            tracing::warn!(error = %e, "{what} failed: the shared store did not answer");
            return;
        }
        if matches!(e, Error::Store { .. } | Error::Corrupt { .. }) {
            self.healthy.store(false, Ordering::Relaxed);
        }
        tracing::error!(error = %e, "{what} failed");
    }

    /// Whether `e` is a shared store that did not answer: the request
    /// changed nothing and can be retried once Redis is back, so it is
    /// answered 503 `temporarily_unavailable` with `Retry-After`, not 500.
    pub(crate) fn is_unavailable(&self, e: &Error) -> bool {
        self.shared.is_some() && matches!(e, Error::Store { .. })
    }

    /// Whether the store is a shared one.
    pub(crate) fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The shared store's fault, if it has one now: the engine's last
    /// command failed, or Redis does not answer a PING.
    pub(crate) async fn shared_fault(&self) -> Option<String> {
        let link = self.shared.as_ref()?;
        if let Some(e) = self.engine.store_failure() {
            return Some(e.to_string());
        }
        (!link.ping().await).then(|| "redis: no answer to PING".to_owned())
    }

    /// The RFC 8414 metadata document under the policy set in force.
    pub(crate) fn metadata(&self) -> String {
        let set = self.engine.policies();
        let mut cached = self.metadata.lock();
        if cached.0 != set.version() {
            let doc = oauth::metadata(
                &self.issuer,
                self.authorization_endpoint.as_deref(),
                self.dpop.algs(),
                &set,
            );
            *cached = (set.version(), doc.to_string());
        }
        cached.1.clone()
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Reload the policy directory (see [`PolicyReloader::reload`]): the
    /// version in force afterwards, or why the set was refused. Blocking.
    pub(crate) fn reload_policies(&self) -> Result<PolicyVersion, ReloadError> {
        self.reloader.reload()
    }

    /// The profiles a set must meet to be put in force.
    pub(crate) fn required_profiles(&self) -> &[&'static Profile] {
        self.reloader.required_profiles()
    }
}

/// A bound, not yet running server.
pub struct Server {
    app: Arc<App>,
    public: TcpListener,
    admin: TcpListener,
    config: Config,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.public.local_addr().ok())
            .field("admin_addr", &self.admin.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// An endpoint URL as RFC 6749 §3.1 allows: absolute `http(s)`, no
/// fragment. (`http` is for development: RFC 6749 §3.1 requires TLS.)
#[doc(hidden)]
pub fn check_endpoint_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must be an http(s) URL")?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("has no host");
    }
    if url.contains('#') {
        return Err("must not have a fragment (RFC 6749 §3.1)");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters");
    }
    Ok(())
}

/// Longest DPoP `iat` window either way: a proof is a one-request
/// credential (RFC 9449 §11.1 suggests a short window).
const MAX_DPOP_WINDOW: Duration = Duration::from_secs(600);

fn check_dpop(d: &dpop::DpopSettings) -> Result<(), String> {
    if d.algs.is_empty() {
        return Err("DPoP algorithms: at least one is needed".into());
    }
    if d.max_age.is_zero() || d.max_age > MAX_DPOP_WINDOW {
        return Err("DPoP max age must be 1s to 600s".into());
    }
    if d.max_ahead > MAX_DPOP_WINDOW {
        return Err("DPoP max ahead must be 0s to 600s".into());
    }
    if d.replay_capacity == 0 {
        return Err("DPoP replay capacity must be at least 1".into());
    }
    Ok(())
}

fn issuer_for(config: &Config, addr: SocketAddr) -> String {
    match &config.issuer {
        Some(i) => i.trim_end_matches('/').to_owned(),
        None => format!("http://{addr}"),
    }
}

impl Server {
    /// Prepare the data directory, build the engine (recovering the store),
    /// load the policies and bind both listeners.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        for (n, what) in [
            (config.max_connections, "max connections"),
            (
                config.max_connections_per_source,
                "max connections per source",
            ),
            (config.admin_max_connections, "admin max connections"),
            (
                config.admin_max_connections_per_source,
                "admin max connections per source",
            ),
        ] {
            if n == 0 || n > 1_000_000 {
                return Err(ServerError::Config(format!(
                    "{what} must be 1 to 1000000, not {n}"
                )));
            }
        }
        if let Some(url) = &config.authorization_endpoint {
            check_endpoint_url(url)
                .map_err(|e| ServerError::Config(format!("authorization endpoint {url:?}: {e}")))?;
        }
        check_dpop(&config.dpop).map_err(ServerError::Config)?;
        if config.first_request_timeout.is_zero() {
            return Err(ServerError::Config(
                "the first request timeout must be more than 0".into(),
            ));
        }
        let public = bind(config.listen).await?;
        let admin = bind(config.admin_listen).await?;
        let addr = public.local_addr().map_err(|e| ServerError::Bind {
            addr: config.listen,
            detail: e.to_string(),
        })?;
        let cfg = config.clone();
        let app = tokio::task::spawn_blocking(move || build_app(cfg, addr))
            .await
            .map_err(|e| ServerError::Runtime(e.to_string()))??;
        Ok(Server {
            app: Arc::new(app),
            public,
            admin,
            config,
        })
    }

    /// The public listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.public.local_addr().unwrap_or(self.config.listen)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_listen)
    }

    /// The engine behind the server.
    pub fn engine(&self) -> Arc<Engine> {
        self.app.engine.clone()
    }

    /// Reloads the policy directory into this server's engine (what
    /// `POST /admin/v1/policies/reload` does; the CLI also hooks it to
    /// SIGHUP).
    pub fn reloader(&self) -> PolicyReloader {
        self.app.reloader.clone()
    }

    /// Serve until `shutdown` completes, then stop accepting, let open
    /// requests finish (up to `shutdown_timeout`), and flush the store.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let Server {
            app,
            public,
            admin,
            config,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let open_files = limits::open_file_limit();
        let (max_connections, admin_max_connections) = limits::fit_open_files(
            open_files,
            config.max_connections,
            config.admin_max_connections,
        );
        if (max_connections, admin_max_connections)
            != (config.max_connections, config.admin_max_connections)
        {
            tracing::warn!(
                open_file_limit = open_files,
                max_connections,
                admin_max_connections,
                "connection budgets lowered to fit the open-file limit; \
                 raise it (ulimit -n, systemd LimitNOFILE) for more"
            );
        }
        let public_budget = Budget::new(max_connections);
        let admin_budget = Budget::new(admin_max_connections);
        // An empty `AllowList` allows any address: exempt none then.
        let trusted =
            (!config.trusted_proxies.is_empty()).then(|| AllowList::new(&config.trusted_proxies));
        let public_limits = net::Limits {
            listener: "public",
            budget: public_budget.clone(),
            sources: Sources::new(config.max_connections_per_source, trusted.clone()),
            counters: app.metrics.public_connections.clone(),
        };
        let admin_limits = net::Limits {
            listener: "admin",
            budget: admin_budget.clone(),
            sources: Sources::new(config.admin_max_connections_per_source, trusted),
            counters: app.metrics.admin_connections.clone(),
        };
        let conn = net::ConnOptions {
            header_timeout: config.header_timeout,
            first_request_timeout: config.first_request_timeout,
        };
        tracing::info!(
            addr = %public.local_addr().unwrap_or(config.listen),
            admin_addr = %admin.local_addr().unwrap_or(config.admin_listen),
            issuer = %app.issuer,
            durability = %durability_name(&app.engine, app.is_shared()),
            policy_version = %app.engine.policies().version(),
            max_connections,
            admin_max_connections,
            "listening"
        );
        let public_task = tokio::spawn(net::serve(
            public,
            oauth::router(app.clone()),
            public_limits,
            conn.clone(),
            stop_rx.clone(),
        ));
        let admin_task = tokio::spawn(net::serve(
            admin,
            admin::router(app.clone()),
            admin_limits,
            conn,
            stop_rx.clone(),
        ));
        let background = tokio::spawn(background(app.clone(), config.clone(), stop_rx));

        shutdown.await;
        tracing::info!("shutting down: finishing open requests");
        let _ = stop_tx.send(true);
        let _ = public_task.await;
        let _ = admin_task.await;
        let drained = tokio::time::timeout(config.shutdown_timeout, async {
            public_budget.drained().await;
            admin_budget.drained().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                timeout_ms = config.shutdown_timeout.as_millis() as u64,
                "requests still open at the shutdown timeout; closing"
            );
        }
        let _ = background.await;
        let engine = app.engine.clone();
        tokio::task::spawn_blocking(move || engine.flush())
            .await
            .map_err(|e| ServerError::Runtime(e.to_string()))?
            .map_err(ServerError::Engine)?;
        tracing::info!("stopped; store flushed");
        Ok(())
    }
}

/// Required then reported profiles, each once, in the order given.
fn profiles(required: &[&'static Profile], reported: &[&'static Profile]) -> Vec<&'static Profile> {
    let mut all: Vec<&'static Profile> = Vec::new();
    for p in required.iter().chain(reported) {
        if !all.iter().any(|q| q.name == p.name) {
            all.push(p);
        }
    }
    all
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| ServerError::Bind {
            addr,
            detail: e.to_string(),
        })
}

/// Everything blocking at start: data directory, keys, policies, store.
fn build_app(config: Config, addr: SocketAddr) -> Result<App, ServerError> {
    let set = match config.policy_set.clone() {
        Some(set) => set,
        None => policies::load_dir(&config.policies).map_err(|errors| ServerError::Policy {
            dir: config.policies.clone(),
            errors,
        })?,
    };
    // Refuse to start on a set that a reload would refuse (README "Compliance
    // profiles"), before creating or touching anything in the data directory.
    let reports = policies::unmet(&set, &config.require_profiles);
    if !reports.is_empty() {
        return Err(ServerError::ProfileNotMet { reports });
    }
    let data = &config.data;
    datadir::ensure_dir(data)?;
    let (keys, mut prints) = datadir::key_ring_with_prints(data)?;
    let seed = datadir::signing_key(data)?;
    let nonce_key = datadir::dpop_nonce_key(data)?;
    let admin = datadir::admin_token(&config.admin_token, data)?;
    let metrics = Arc::new(Metrics::default());
    let mut builder = Engine::builder()
        .keys(keys)
        .policies(set)
        .events(events::LogSink);
    let mut shared = None;
    if let Some(url) = &config.store {
        // The keys are compared with the store's before the engine uses
        // the store: an instance with a contradicting key never serves.
        prints.push(datadir::file_print(
            data,
            datadir::SIGNING_KEY,
            "jwt-ed25519",
            &seed,
        ));
        prints.push(datadir::file_print(
            data,
            datadir::DPOP_NONCE_KEY,
            "dpop-nonce",
            &nonce_key,
        ));
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| ServerError::Runtime(format!("--store needs a runtime: {e}")))?;
        let redis = url.connect_store(config.store_options.clone())?;
        let link = store::StoreLink::new(redis.connection(), &config.store_options);
        rt.block_on(async {
            let added = link.check_fingerprints(&prints).await?;
            for field in added {
                tracing::info!(key = %field, "key fingerprint added to the shared store");
            }
            Ok::<_, ServerError>(())
        })?;
        builder = builder.shared_store(redis);
        shared = Some(link);
    } else if config.durability != Durability::None {
        let dir = data.join(datadir::LOG_DIR);
        let options = LogOptions {
            durability: config.durability,
        };
        let store = match &config.store_hooks {
            Some(StoreHooks(hooks)) => LogStore::open_with_hooks(&dir, options, hooks.clone()),
            None => LogStore::open(&dir, options),
        }
        .map_err(ServerError::Engine)?;
        builder = builder.store(store);
    }
    let engine = builder.build().map_err(ServerError::Engine)?;
    tracing::info!(
        data = %data.display(),
        families = engine.stats().families,
        durability = %durability_name(&engine, shared.is_some()),
        "engine ready"
    );
    let issuer = issuer_for(&config, addr);
    let signer = AccessTokenSigner::new(&seed);
    let jwks = signer.jwks().to_string();
    let set = engine.policies();
    let token_endpoint = format!("{issuer}/oauth2/token");
    let dpop = dpop::ProofVerifier::new(
        &config.dpop,
        &token_endpoint,
        match &shared {
            Some(link) => Box::new(store::RedisReplayCache::new(link.clone())),
            None => Box::new(dpop::MemoryReplayCache::new(config.dpop.replay_capacity)),
        },
        dpop::NonceKey::new(&nonce_key),
    )
    .ok_or_else(|| {
        ServerError::Config(format!(
            "issuer {issuer:?}: the token endpoint {token_endpoint:?} is not an http(s) URL with a host"
        ))
    })?;
    let metadata = oauth::metadata(
        &issuer,
        config.authorization_endpoint.as_deref(),
        dpop.algs(),
        &set,
    );
    let metadata = parking_lot::Mutex::new((set.version(), metadata.to_string()));
    if config.authorization_endpoint.is_none() {
        // RFC 8414 §2: `authorization_endpoint` is required when a response
        // type is supported; the login page is the embedder's to name.
        tracing::warn!(
            "no --authorization-endpoint: the RFC 8414 metadata lacks \
             authorization_endpoint, and discovery-driven clients may reject it"
        );
    }
    let trusted =
        (!config.trusted_proxies.is_empty()).then(|| AllowList::new(&config.trusted_proxies));
    let engine = Arc::new(engine);
    Ok(App {
        reloader: PolicyReloader::requiring(
            engine.clone(),
            config.policies,
            config.require_profiles.clone(),
        ),
        profiles: profiles(&config.require_profiles, &config.report_profiles),
        engine,
        signer,
        issuer,
        admin,
        trusted,
        metrics,
        body_timeout: config.body_timeout,
        healthy: AtomicBool::new(true),
        authorization_endpoint: config.authorization_endpoint,
        metadata,
        jwks,
        dpop,
        shared,
    })
}

/// The durability `/healthz` and the logs name: the local store's mode, or
/// `redis` for a shared store (whose persistence Redis decides).
pub(crate) fn durability_name(engine: &Engine, shared: bool) -> String {
    if shared {
        "redis".to_owned()
    } else {
        engine.durability().to_string()
    }
}

/// The sweeper and the compactor, until stopped.
async fn background(app: Arc<App>, config: Config, mut stop: watch::Receiver<bool>) {
    use tokio::time::{MissedTickBehavior, interval};
    let mut sweep = interval(config.sweep_interval);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut compact = interval(config.compact_interval);
    compact.set_missed_tick_behavior(MissedTickBehavior::Delay);
    compact.tick().await; // the first tick is immediate: skip it
    let budget = config.sweep_budget;
    loop {
        tokio::select! {
            _ = net::stopped(&mut stop) => return,
            _ = sweep.tick() => {
                let engine = app.engine.clone();
                match tokio::task::spawn_blocking(move || engine.sweep(budget)).await {
                    Ok(Ok(r)) if r.removed > 0 => {
                        tracing::debug!(examined = r.examined, removed = r.removed, "swept");
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => app.engine_failed("sweep", &e),
                    Err(e) => tracing::error!(error = %e, "sweep task failed"),
                }
            }
            _ = compact.tick() => {
                if app.engine.durability() == Durability::None {
                    continue; // memory only: nothing to compact
                }
                let engine = app.engine.clone();
                let started = std::time::Instant::now();
                match tokio::task::spawn_blocking(move || engine.compact()).await {
                    Ok(Ok(())) => tracing::info!(
                        ms = started.elapsed().as_millis() as u64,
                        "store compacted"
                    ),
                    Ok(Err(e)) => app.engine_failed("compaction", &e),
                    Err(e) => tracing::error!(error = %e, "compaction task failed"),
                }
            }
        }
    }
}

/// A server running on its own runtime and thread: for tests and embedders
/// that are not async. Dropping it shuts the server down.
pub struct ServerHandle {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    engine: Arc<Engine>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServerError>>>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

/// A multi-threaded runtime with the given number of workers (0 = one per
/// core).
pub fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, ServerError> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        b.worker_threads(workers);
    }
    b.enable_all()
        .thread_name("refresh-guard")
        .build()
        .map_err(|e| ServerError::Runtime(e.to_string()))
}

impl ServerHandle {
    /// Bind and start serving on a new runtime (one worker per core).
    pub fn start(config: Config) -> Result<ServerHandle, ServerError> {
        ServerHandle::start_with_workers(config, 0)
    }

    /// [`start`](Self::start) with `workers` runtime threads (0 = per core).
    pub fn start_with_workers(config: Config, workers: usize) -> Result<ServerHandle, ServerError> {
        let rt = runtime(workers)?;
        let server = rt.block_on(Server::bind(config))?;
        let (addr, admin_addr, engine) = (server.addr(), server.admin_addr(), server.engine());
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("refresh-guard-server".into())
            .spawn(move || {
                rt.block_on(server.run(async {
                    let _ = rx.await;
                }))
            })
            .map_err(|e| ServerError::Runtime(e.to_string()))?;
        Ok(ServerHandle {
            addr,
            admin_addr,
            engine,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// The public listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The engine behind the server.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Shut down gracefully and wait for it (open requests finish, the
    /// store is flushed).
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| ServerError::Runtime("server thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// The client behind `peer`: see [`App::client_ip`]. `values` are the
/// `X-Forwarded-For` header lines in arrival order, as raw bytes: a hop that
/// is not an ASCII address (or `address:port`) is unreadable, and so is an
/// empty one; either ends the walk with no address rather than leaving the
/// trusted proxy's own address standing in for the client.
fn forwarded_client<'a>(
    peer: IpAddr,
    trusted: Option<&AllowList>,
    values: impl DoubleEndedIterator<Item = &'a [u8]>,
) -> Option<IpAddr> {
    let peer = peer.to_canonical();
    let Some(trusted) = trusted else {
        return Some(peer);
    };
    if !trusted.contains(peer) {
        return Some(peer);
    }
    for hop in values.rev().flat_map(|v| v.rsplit(|&b| b == b',')) {
        let ip = parse_hop(hop)?.to_canonical();
        if !trusted.contains(ip) {
            return Some(ip);
        }
    }
    // Every hop was a trusted proxy (or there was none): the originating
    // client is unknown.
    None
}

/// One `X-Forwarded-For` element: an IP address, optionally with a port
/// (`198.51.100.7:4711`, `[2001:db8::1]:443`), surrounded by optional
/// spaces or tabs (RFC 9110 §5.6.3 OWS).
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = hop.trim_ascii();
    // `from_utf8` accepts non-ASCII; an address never holds any.
    if !hop.is_ascii() {
        return None;
    }
    let hop = std::str::from_utf8(hop).ok()?;
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies() -> AllowList {
        AllowList::new(&[
            "127.0.0.0/8".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ])
    }

    fn client(peer: &str, lines: &[&[u8]]) -> Option<IpAddr> {
        let trusted = proxies();
        forwarded_client(peer.parse().unwrap(), Some(&trusted), lines.iter().copied())
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    /// Regression: a hop that was not visible ASCII (`\x80`) was filtered out
    /// of the chain, so the client looked like the trusted proxy itself and
    /// passed an allow-list that its own address fails.
    #[test]
    fn a_non_ascii_hop_yields_no_address() {
        assert_eq!(
            client("127.0.0.1", &[b"\x80, 203.0.113.9"]),
            ip("203.0.113.9")
        );
        assert_eq!(client("127.0.0.1", &[b"203.0.113.9, \x80"]), None);
        assert_eq!(client("127.0.0.1", &[b"203.0.113.9", b"\x80"]), None);
        assert_eq!(client("127.0.0.1", &[b"\xc3\xa9"]), None);
    }

    #[test]
    fn an_unparseable_or_empty_hop_yields_no_address() {
        assert_eq!(client("127.0.0.1", &[b"10.1.1.1, nonsense"]), None);
        assert_eq!(client("127.0.0.1", &[b"203.0.113.9,,10.1.1.1"]), None);
        assert_eq!(client("127.0.0.1", &[b""]), None);
        assert_eq!(client("127.0.0.1", &[b"unknown"]), None);
    }

    #[test]
    fn a_chain_of_trusted_hops_only_yields_no_address() {
        assert_eq!(client("127.0.0.1", &[]), None, "no header from a proxy");
        assert_eq!(client("127.0.0.1", &[b"10.1.1.1, 127.0.0.5"]), None);
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        assert_eq!(
            client(
                "127.0.0.1",
                &[b"198.51.100.7, 10.1.2.3, 192.0.2.1 , 127.0.0.5"]
            ),
            ip("192.0.2.1")
        );
        // Lines in arrival order; the last line is the nearest proxy's.
        assert_eq!(
            client("127.0.0.1", &[b"198.51.100.7", b"192.0.2.1:4711, 10.0.0.1"]),
            ip("192.0.2.1")
        );
        assert_eq!(
            client("127.0.0.1", &[b"[2001:db8::1]:443\t"]),
            ip("2001:db8::1")
        );
        assert_eq!(
            client("127.0.0.1", &[b"::ffff:192.0.2.1"]),
            ip("192.0.2.1"),
            "IPv4-mapped is IPv4"
        );
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        assert_eq!(client("192.0.2.1", &[b"\x80"]), ip("192.0.2.1"));
        assert_eq!(
            forwarded_client(
                "127.0.0.1".parse().unwrap(),
                None,
                [&b"10.1.1.1"[..]].into_iter()
            ),
            ip("127.0.0.1"),
            "without --trusted-proxies the header is ignored"
        );
    }
}
