//! `refresh-guard serve`: flags (each also from a `REFRESH_GUARD_*`
//! environment variable, as a container sets them), logging, signals.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{BoolishValueParser, RangedU64ValueParser};
use refresh_guard::{Durability, IpRange, Profile};
use refresh_guard_server::dpop::{DpopAlg, DpopSettings};
use refresh_guard_server::{AdminToken, AdminTokenSource, Config, Server, ServerError, StoreUrl};

use crate::{FAILED, Io, NOT_MET, USAGE};

/// The environment variable an admin token may come from. Not a flag: a
/// token on the command line would show in `ps`.
pub(crate) const ADMIN_TOKEN_ENV: &str = "REFRESH_GUARD_ADMIN_TOKEN";

const AFTER_HELP: &str = "\
The admin token is read from --admin-token-file, else from \
$REFRESH_GUARD_ADMIN_TOKEN, else generated into DATA/admin.token.

With --store, several instances share families, codes and DPoP replay \
records through Redis, and DATA holds only keys and the admin token: give \
every instance the same mac-keys, jwt-ed25519.key and dpop-nonce.key. An \
instance whose key contradicts the store's fingerprint of it refuses to start.

Logs go to stdout, as JSON when stdout is not a terminal; RUST_LOG filters \
them. SIGTERM or Ctrl-C shuts down gracefully; SIGHUP reloads the policy \
directory.";

/// The flags of `refresh-guard serve`. Defaults are [`Config::default`]'s.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub(crate) struct ServeArgs {
    /// Public listener
    #[arg(
        long,
        value_name = "ADDR",
        env = "REFRESH_GUARD_LISTEN",
        hide_env_values = true,
        default_value_t = Config::default().listen,
        value_parser = socket_addr
    )]
    listen: SocketAddr,
    /// Admin listener
    #[arg(
        long,
        value_name = "ADDR",
        env = "REFRESH_GUARD_ADMIN_LISTEN",
        hide_env_values = true,
        default_value_t = Config::default().admin_listen,
        value_parser = socket_addr
    )]
    admin_listen: SocketAddr,
    /// Policy directory, loaded at start, on SIGHUP and on
    /// POST /admin/v1/policies/reload
    #[arg(
        long,
        value_name = "DIR",
        env = "REFRESH_GUARD_POLICIES",
        hide_env_values = true,
        default_value_os_t = Config::default().policies
    )]
    policies: PathBuf,
    /// Data directory: key ring, signing key, DPoP nonce key, admin token,
    /// and the embedded store (DIR/log) unless --store is given
    #[arg(
        long,
        value_name = "DIR",
        env = "REFRESH_GUARD_DATA",
        hide_env_values = true,
        default_value_os_t = Config::default().data
    )]
    data: PathBuf,
    /// Store several instances share, instead of DIR/log:
    /// redis://HOST:PORT[/DB], rediss://HOST:PORT[/DB] (TLS) or
    /// redis+cluster://HOST:PORT,HOST:PORT,...
    /// (every instance needs the same key files: README "Several instances
    /// of the server")
    #[arg(
        long,
        value_name = "URL",
        env = "REFRESH_GUARD_STORE",
        hide_env_values = true
    )]
    store: Option<String>,
    /// Store durability (the embedded store; with --store, Redis's
    /// persistence decides)
    #[arg(
        long,
        conflicts_with = "store",
        value_name = "MODE",
        env = "REFRESH_GUARD_DURABILITY",
        hide_env_values = true,
        value_enum,
        default_value_t = DurabilityMode::Sync
    )]
    durability: DurabilityMode,
    /// Comma-separated CIDRs or ranges whose X-Forwarded-For is believed
    #[arg(
        long,
        value_name = "LIST",
        env = "REFRESH_GUARD_TRUSTED_PROXIES",
        hide_env_values = true,
        value_parser = proxy_list
    )]
    trusted_proxies: Option<ProxyList>,
    /// File holding the admin API's bearer token
    #[arg(
        long,
        value_name = "PATH",
        env = "REFRESH_GUARD_ADMIN_TOKEN_FILE",
        hide_env_values = true
    )]
    admin_token_file: Option<PathBuf>,
    /// Issuer identifier (iss of tokens and metadata); set it behind a
    /// proxy [default: http://LISTEN]
    #[arg(
        long,
        value_name = "URL",
        env = "REFRESH_GUARD_ISSUER",
        hide_env_values = true,
        value_parser = issuer
    )]
    issuer: Option<String>,
    /// Your login page, named as authorization_endpoint in the RFC 8414
    /// metadata (without it the document is incomplete)
    #[arg(
        long,
        value_name = "URL",
        env = "REFRESH_GUARD_AUTHORIZATION_ENDPOINT",
        hide_env_values = true,
        value_parser = endpoint_url
    )]
    authorization_endpoint: Option<String>,
    /// Open connections on the public listener; more wait in the backlog
    #[arg(
        long,
        value_name = "N",
        env = "REFRESH_GUARD_MAX_CONNECTIONS",
        hide_env_values = true,
        default_value_t = Config::default().max_connections,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    max_connections: usize,
    /// Open public connections one source may hold: an IPv4 address or an
    /// IPv6 /64; trusted proxies are exempt; more are closed at once
    #[arg(
        long,
        value_name = "N",
        env = "REFRESH_GUARD_MAX_CONNECTIONS_PER_SOURCE",
        hide_env_values = true,
        default_value_t = Config::default().max_connections_per_source,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    max_connections_per_source: usize,
    /// Open connections on the admin listener, a budget of its own
    #[arg(
        long,
        value_name = "N",
        env = "REFRESH_GUARD_ADMIN_MAX_CONNECTIONS",
        hide_env_values = true,
        default_value_t = Config::default().admin_max_connections,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    admin_max_connections: usize,
    /// As --max-connections-per-source, on the admin listener
    #[arg(
        long,
        value_name = "N",
        env = "REFRESH_GUARD_ADMIN_MAX_CONNECTIONS_PER_SOURCE",
        hide_env_values = true,
        default_value_t = Config::default().admin_max_connections_per_source,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    admin_max_connections_per_source: usize,
    /// Time a new connection has to send its first request's headers, on
    /// both listeners: a whole number and ms, s or m, from 1ms to 10m
    #[arg(
        long,
        value_name = "DURATION",
        env = "REFRESH_GUARD_FIRST_REQUEST_TIMEOUT",
        hide_env_values = true,
        default_value = "5s",
        value_parser = timeout
    )]
    first_request_timeout: Duration,
    /// Runtime threads [default: one per core]
    #[arg(
        long,
        value_name = "N",
        env = "REFRESH_GUARD_WORKERS",
        hide_env_values = true,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=1024)
    )]
    workers: Option<usize>,
    /// A compliance profile the policy set must meet (repeatable, or
    /// comma-separated): start and every reload are refused otherwise
    #[arg(
        long = "require-profile",
        value_name = "NAME",
        env = "REFRESH_GUARD_REQUIRE_PROFILE",
        hide_env_values = true,
        action = clap::ArgAction::Append,
        value_delimiter = ',',
        value_parser = crate::profile
    )]
    require_profiles: Vec<&'static Profile>,
    /// A compliance profile reported in /metrics, not enforced
    /// (repeatable, or comma-separated)
    #[arg(
        long = "report-profile",
        value_name = "NAME",
        env = "REFRESH_GUARD_REPORT_PROFILE",
        hide_env_values = true,
        action = clap::ArgAction::Append,
        value_delimiter = ',',
        value_parser = crate::profile
    )]
    report_profiles: Vec<&'static Profile>,
    /// Also reload when the policy files change
    #[arg(
        long,
        env = "REFRESH_GUARD_WATCH_POLICIES",
        hide_env_values = true,
        value_parser = BoolishValueParser::new()
    )]
    watch_policies: bool,
    /// DPoP proof algorithms accepted and advertised (comma-separated; RFC
    /// 9449 §5.1): ES256, EdDSA, Ed25519
    #[arg(
        long,
        value_name = "ALGS",
        env = "REFRESH_GUARD_DPOP_ALGS",
        hide_env_values = true,
        value_delimiter = ',',
        default_value = "ES256,EdDSA,Ed25519",
        value_parser = dpop_alg
    )]
    dpop_algs: Vec<DpopAlg>,
    /// Oldest a DPoP proof's iat may be: whole seconds or minutes, from 1s
    /// to 10m
    #[arg(
        long,
        value_name = "DURATION",
        env = "REFRESH_GUARD_DPOP_MAX_AGE",
        hide_env_values = true,
        default_value = "60s",
        value_parser = dpop_window
    )]
    dpop_max_age: Duration,
    /// Farthest ahead of the server's clock a DPoP proof's iat may be:
    /// whole seconds or minutes, from 0s to 10m
    #[arg(
        long,
        value_name = "DURATION",
        env = "REFRESH_GUARD_DPOP_MAX_AHEAD",
        hide_env_values = true,
        default_value = "10s",
        value_parser = dpop_window
    )]
    dpop_max_ahead: Duration,
    /// Most DPoP proofs remembered for replay detection (about 100 bytes
    /// each); when all are within their window, new proofs get 503
    #[arg(
        long,
        value_name = "N",
        env = "REFRESH_GUARD_DPOP_REPLAY_CAPACITY",
        hide_env_values = true,
        default_value_t = DpopSettings::default().replay_capacity,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=100_000_000)
    )]
    dpop_replay_capacity: usize,
}

/// `--durability`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DurabilityMode {
    /// A change is answered once fsynced (group commit)
    Sync,
    /// Answered at once, fsynced every 10 ms
    Batched,
    /// Memory only
    None,
}

/// `--trusted-proxies`, parsed whole so that the flag stays one value.
#[derive(Clone, Debug)]
struct ProxyList(Vec<IpRange>);

fn socket_addr(v: &str) -> Result<SocketAddr, String> {
    v.parse()
        .map_err(|_| "not an address like 127.0.0.1:8080".to_owned())
}

fn proxy_list(v: &str) -> Result<ProxyList, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        // The error names the entry.
        .map(|s| s.parse::<IpRange>().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()
        .map(ProxyList)
}

/// The longest timeout a flag accepts.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// "500ms", "5s", "2m": a whole number and a unit, as in policy files,
/// from 1 ms to [`MAX_TIMEOUT`].
fn timeout(s: &str) -> Result<Duration, String> {
    let parsed = (|| {
        let split = s.find(|c: char| !c.is_ascii_digit())?;
        let (n, unit) = s.split_at(split);
        let n: u64 = n.parse().ok()?;
        let ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            _ => return None,
        };
        n.checked_mul(ms).map(Duration::from_millis)
    })();
    parsed
        .filter(|d| (Duration::from_millis(1)..=MAX_TIMEOUT).contains(d))
        .ok_or_else(|| {
            "not a duration from 1ms to 10m (a whole number and ms, s or m, like 500ms or 5s)"
                .to_owned()
        })
}

fn dpop_alg(v: &str) -> Result<DpopAlg, String> {
    DpopAlg::from_name(v.trim()).ok_or_else(|| {
        "not a DPoP algorithm this server verifies: use ES256, EdDSA or Ed25519 (asymmetric only)".to_owned()
    })
}

/// "60s", "2m": whole seconds or minutes from 0 s to 10 m (an `iat`
/// window is counted in whole seconds).
fn dpop_window(s: &str) -> Result<Duration, String> {
    let parsed = (|| {
        let split = s.find(|c: char| !c.is_ascii_digit())?;
        let (n, unit) = s.split_at(split);
        let n: u64 = n.parse().ok()?;
        let secs = match unit {
            "s" => n,
            "m" => n.checked_mul(60)?,
            _ => return None,
        };
        Some(Duration::from_secs(secs))
    })();
    parsed
        .filter(|d| *d <= MAX_TIMEOUT)
        .ok_or_else(|| "not whole seconds or minutes up to 10m, like 60s or 2m".to_owned())
}

fn issuer(v: &str) -> Result<String, String> {
    if v.starts_with("https://") || v.starts_with("http://") {
        Ok(v.to_owned())
    } else {
        Err("must be an http(s) URL".to_owned())
    }
}

fn endpoint_url(v: &str) -> Result<String, String> {
    refresh_guard_server::check_endpoint_url(v)
        .map(|()| v.to_owned())
        .map_err(str::to_owned)
}

/// Parsed `serve` options beyond [`Config`].
struct Options {
    config: Config,
    workers: usize,
    watch_policies: bool,
}

impl ServeArgs {
    /// The server's configuration; `env_token` is [`ADMIN_TOKEN_ENV`]'s
    /// value, used when no token file is given.
    fn options(self, env_token: Option<String>) -> Result<Options, String> {
        let admin_token = match (self.admin_token_file, env_token) {
            (Some(path), _) => AdminTokenSource::File(path),
            (None, Some(t)) => AdminTokenSource::Value(AdminToken::new(&t).ok_or_else(|| {
                format!(
                    "{ADMIN_TOKEN_ENV} must be at least {} characters",
                    AdminToken::MIN_LEN
                )
            })?),
            (None, None) => AdminTokenSource::Generate,
        };
        // Parsed here rather than by clap: clap's error would quote the
        // value, and a Redis URL may carry a password.
        let store = self.store.as_deref().map(StoreUrl::parse).transpose()?;
        let config = Config {
            store,
            listen: self.listen,
            admin_listen: self.admin_listen,
            policies: self.policies,
            data: self.data,
            durability: match self.durability {
                DurabilityMode::Sync => Durability::Sync,
                DurabilityMode::Batched => Durability::Batched(Duration::from_millis(10)),
                DurabilityMode::None => Durability::None,
            },
            trusted_proxies: self.trusted_proxies.map(|p| p.0).unwrap_or_default(),
            admin_token,
            issuer: self.issuer,
            authorization_endpoint: self.authorization_endpoint,
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            admin_max_connections: self.admin_max_connections,
            admin_max_connections_per_source: self.admin_max_connections_per_source,
            first_request_timeout: self.first_request_timeout,
            require_profiles: self.require_profiles,
            report_profiles: self.report_profiles,
            dpop: DpopSettings {
                algs: self.dpop_algs,
                max_age: self.dpop_max_age,
                max_ahead: self.dpop_max_ahead,
                replay_capacity: self.dpop_replay_capacity,
            },
            ..Config::default()
        };
        Ok(Options {
            config,
            workers: self.workers.unwrap_or(0),
            watch_policies: self.watch_policies,
        })
    }
}

/// Structured logs to stdout: JSON when stdout is not a terminal, filtered
/// by `RUST_LOG` (default `info`). Does nothing if a subscriber is set.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = if std::io::stdout().is_terminal() {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .try_init()
    };
}

/// Run `refresh-guard serve` until SIGTERM or Ctrl-C. Returns the exit
/// status: 0 after a graceful shutdown, 1 if the server failed, 2 for a
/// bad admin token in the environment, 3 if the policy set does not meet a
/// `--require-profile` (the reports on stderr).
pub(crate) fn serve(args: ServeArgs, io: &mut Io<'_>) -> u8 {
    let env_token = std::env::var(ADMIN_TOKEN_ENV).ok();
    let options = match args.options(env_token) {
        Ok(o) => o,
        Err(e) => {
            let _ = writeln!(io.err, "error: {e}");
            return USAGE;
        }
    };
    init_logging();
    match run(options) {
        Ok(()) => 0,
        Err(ServerError::ProfileNotMet { reports }) => {
            tracing::error!(
                profiles = reports.len(),
                "the policy set does not meet a required profile; not starting"
            );
            for r in &reports {
                let _ = writeln!(io.err, "{r}");
            }
            let e = ServerError::ProfileNotMet { reports };
            let _ = writeln!(io.err, "error: {e}; not starting");
            NOT_MET
        }
        Err(e) => {
            tracing::error!(error = %e, "refresh-guard serve failed");
            let _ = writeln!(io.err, "error: {e}");
            FAILED
        }
    }
}

fn run(options: Options) -> Result<(), ServerError> {
    let rt = refresh_guard_server::runtime(options.workers)?;
    rt.block_on(async move {
        let server = Server::bind(options.config).await?;
        let reloader = server.reloader();
        let dir = reloader.dir().to_owned();
        let io = |e: std::io::Error| ServerError::Io {
            path: dir.clone(),
            detail: e.to_string(),
        };
        // Kept alive until the server stops; dropping a trigger stops it.
        #[cfg(unix)]
        let _sighup = reloader.reload_on_sighup().map_err(io)?;
        let _watch = match options.watch_policies {
            true => Some(reloader.watch(Duration::from_millis(200)).map_err(io)?),
            false => None,
        };
        server.run(terminated()).await
    })
}

/// Completes on SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser as _;

    fn options(args: &[&str], env_token: Option<&str>) -> Result<Options, String> {
        let cli = Cli::try_parse_from(["refresh-guard", "serve"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let Command::Serve(serve) = cli.command else {
            panic!("not serve");
        };
        (*serve).options(env_token.map(str::to_owned))
    }

    #[test]
    fn defaults_without_flags() {
        let o = options(&[], None).unwrap();
        let d = Config::default();
        assert_eq!(o.config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(o.config.admin_listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(o.config.policies, PathBuf::from("./policies"));
        assert_eq!(o.config.data, PathBuf::from("./data"));
        assert_eq!(o.config.durability, Durability::Sync);
        assert!(o.config.store.is_none());
        assert_eq!(o.config.max_connections, d.max_connections);
        assert!(o.config.trusted_proxies.is_empty());
        assert!(o.config.issuer.is_none());
        assert!(matches!(o.config.admin_token, AdminTokenSource::Generate));
        assert_eq!(o.config.max_connections_per_source, 32);
        assert_eq!(o.config.first_request_timeout, Duration::from_secs(5));
        assert_eq!(o.config.first_request_timeout, d.first_request_timeout);
        assert_eq!(o.config.admin_max_connections, 64);
        assert_eq!(o.config.admin_max_connections_per_source, 16);
        assert_eq!(o.workers, 0);
        assert!(!o.watch_policies);
        assert!(o.config.require_profiles.is_empty());
        assert_eq!(o.config.dpop, d.dpop);
        assert!(o.config.report_profiles.is_empty());
    }

    /// The DPoP flags: algorithms by their JOSE names (anything symmetric
    /// or unknown refused naming the flag), windows in whole seconds.
    #[test]
    fn dpop_flags_parse_and_bad_values_name_the_flag() {
        let o = options(
            &[
                "--dpop-algs=EdDSA",
                "--dpop-max-age",
                "2m",
                "--dpop-max-ahead=0s",
                "--dpop-replay-capacity=1000",
            ],
            None,
        )
        .unwrap();
        assert_eq!(o.config.dpop.algs, vec![DpopAlg::EdDsa]);
        assert_eq!(o.config.dpop.max_age, Duration::from_secs(120));
        assert_eq!(o.config.dpop.max_ahead, Duration::ZERO);
        assert_eq!(o.config.dpop.replay_capacity, 1000);
        for (flag, bad) in [
            ("--dpop-algs", "--dpop-algs=ES256,HS256"),
            ("--dpop-algs", "--dpop-algs=none"),
            ("--dpop-max-age", "--dpop-max-age=500ms"),
            ("--dpop-max-ahead", "--dpop-max-ahead=11m"),
        ] {
            let e = options(&[bad], None).err().unwrap();
            assert!(e.contains(flag), "{bad}: {e}");
        }
    }

    #[test]
    fn every_flag_both_spellings() {
        let o = options(
            &[
                "--listen=0.0.0.0:9000",
                "--admin-listen",
                "127.0.0.1:9001",
                "--policies",
                "p",
                "--data=d",
                "--durability",
                "none",
                "--trusted-proxies",
                "10.0.0.0/8, 192.0.2.1-192.0.2.9,",
                "--admin-token-file",
                "t",
                "--issuer",
                "https://auth.example",
                "--max-connections=10",
                "--max-connections-per-source",
                "3",
                "--first-request-timeout=1500ms",
                "--admin-max-connections=5",
                "--admin-max-connections-per-source",
                "4",
                "--workers",
                "2",
                "--watch-policies",
                "--require-profile=rfc9700,fapi2-refresh",
                "--require-profile",
                "salesforce-appexchange",
                "--report-profile",
                "rfc9700",
            ],
            Some("ignored-because-the-file-wins"),
        )
        .unwrap();
        assert_eq!(o.config.listen.port(), 9000);
        assert_eq!(o.config.admin_listen.port(), 9001);
        assert_eq!(o.config.policies, PathBuf::from("p"));
        assert_eq!(o.config.data, PathBuf::from("d"));
        assert_eq!(o.config.durability, Durability::None);
        assert_eq!(o.config.trusted_proxies.len(), 2);
        assert!(matches!(o.config.admin_token, AdminTokenSource::File(_)));
        assert_eq!(o.config.issuer.as_deref(), Some("https://auth.example"));
        assert_eq!(o.config.max_connections, 10);
        assert_eq!(o.config.max_connections_per_source, 3);
        assert_eq!(o.config.first_request_timeout, Duration::from_millis(1500));
        assert_eq!(o.config.admin_max_connections, 5);
        assert_eq!(o.config.admin_max_connections_per_source, 4);
        assert_eq!(o.workers, 2);
        assert!(o.watch_policies);
        let names = |p: &[&Profile]| p.iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(
            names(&o.config.require_profiles),
            ["rfc9700", "fapi2-refresh", "salesforce-appexchange"]
        );
        assert_eq!(names(&o.config.report_profiles), ["rfc9700"]);
        let o = options(&["--durability=batched"], None).unwrap();
        assert_eq!(
            o.config.durability,
            Durability::Batched(Duration::from_millis(10))
        );
    }

    /// A repeated flag overrides the earlier one, as the hand-written
    /// parser did; clap alone would refuse it.
    #[test]
    fn a_repeated_flag_overrides_the_earlier_one() {
        let o = options(&["--workers", "2", "--workers", "3"], None).unwrap();
        assert_eq!(o.workers, 3);
    }

    #[test]
    fn errors_name_the_flag() {
        for (a, want) in [
            (vec!["--listen"], "--listen <ADDR>"),
            (vec!["--listen", "8080"], "--listen <ADDR>"),
            (vec!["--durability", "fast"], "--durability <MODE>"),
            (
                vec!["--trusted-proxies", "10.0.0.0/33"],
                "--trusted-proxies <LIST>",
            ),
            (vec!["--max-connections", "0"], "--max-connections <N>"),
            (vec!["--workers", "1025"], "--workers <N>"),
            (
                vec!["--max-connections-per-source", "x"],
                "--max-connections-per-source <N>",
            ),
            (
                vec!["--first-request-timeout", "5"],
                "invalid value '5' for '--first-request-timeout <DURATION>': not a duration",
            ),
            (vec!["--first-request-timeout", "0s"], "from 1ms to 10m"),
            (vec!["--first-request-timeout", "11m"], "from 1ms to 10m"),
            (vec!["--first-request-timeout=-1s"], "from 1ms to 10m"),
            (
                vec!["--admin-max-connections", "0"],
                "--admin-max-connections <N>",
            ),
            (
                vec!["--admin-max-connections-per-source=2000000"],
                "--admin-max-connections-per-source <N>",
            ),
            (vec!["--issuer", "auth.example"], "--issuer <URL>"),
            (vec!["--frobnicate"], "unexpected argument '--frobnicate'"),
        ] {
            let e = options(&a, None).err().unwrap();
            assert!(e.contains(want), "{a:?}: {e}");
        }
        let e = options(&[], Some("short")).err().unwrap();
        assert!(e.contains(ADMIN_TOKEN_ENV) && !e.contains("short"), "{e}");
    }

    /// `--store`: the three URL forms reach the config; a bad one is
    /// refused naming the flag and what is wrong, never quoting the value
    /// (it may hold a password); `--durability` is the embedded store's
    /// and conflicts with it.
    #[test]
    fn store_flag_parses_and_bad_urls_name_the_flag() {
        let o = options(&["--store", "redis://127.0.0.1:6379/1"], None).unwrap();
        assert_eq!(
            o.config.store,
            Some(StoreUrl::One("redis://127.0.0.1:6379/1".into()))
        );
        let o = options(&["--store=redis+cluster://a:7000,b:7001"], None).unwrap();
        assert!(matches!(o.config.store, Some(StoreUrl::Cluster(n)) if n.len() == 2));
        for bad in [
            "redis://:pw-s3cret@host:notaport",
            "redis+cluster://pw-s3cret@a:7000,b",
            "mysql://pw-s3cret@h",
        ] {
            let e = options(&["--store", bad], None).err().unwrap();
            assert!(e.starts_with("--store: "), "{bad}: {e}");
            assert!(!e.contains("pw-s3cret"), "{bad}: {e}");
        }
        let e = options(&["--store", "redis://h:1", "--durability", "none"], None)
            .err()
            .unwrap();
        assert!(e.contains("--durability") && e.contains("--store"), "{e}");
        let arg = <Cli as clap::CommandFactory>::command()
            .find_subcommand("serve")
            .unwrap()
            .get_arguments()
            .find(|a| a.get_id() == "store")
            .unwrap()
            .get_env()
            .map(|e| e.to_owned());
        assert_eq!(
            arg.as_deref(),
            Some(std::ffi::OsStr::new("REFRESH_GUARD_STORE"))
        );
    }

    /// `--authorization-endpoint` (and its variable) reaches the config,
    /// and a URL the metadata could not carry is refused naming the flag.
    #[test]
    fn authorization_endpoint_flag_and_variable() {
        assert!(
            options(&[], None)
                .unwrap()
                .config
                .authorization_endpoint
                .is_none()
        );
        let o = options(
            &[
                "--authorization-endpoint",
                "https://login.example/authorize",
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            o.config.authorization_endpoint.as_deref(),
            Some("https://login.example/authorize")
        );
        for bad in ["login.example", "https://login.example/a#b", "https://"] {
            let e = options(&["--authorization-endpoint", bad], None)
                .err()
                .unwrap();
            assert!(e.contains("--authorization-endpoint <URL>"), "{bad}: {e}");
        }
        let arg = <Cli as clap::CommandFactory>::command()
            .find_subcommand("serve")
            .unwrap()
            .get_arguments()
            .find(|a| a.get_id() == "authorization_endpoint")
            .unwrap()
            .get_env()
            .map(|e| e.to_owned());
        assert_eq!(
            arg.as_deref(),
            Some(std::ffi::OsStr::new("REFRESH_GUARD_AUTHORIZATION_ENDPOINT"))
        );
    }
}
