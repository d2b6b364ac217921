//! `refresh-guard serve`: flags, logging, signals.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{AdminToken, AdminTokenSource, Config, Server, ServerError};
use crate::policy::IpRange;
use crate::store::Durability;

/// The environment variable an admin token may come from.
pub const ADMIN_TOKEN_ENV: &str = "REFRESH_GUARD_ADMIN_TOKEN";

const USAGE: &str = "\
usage: refresh-guard serve [options]

  --listen ADDR             public listener (default 127.0.0.1:8080)
  --admin-listen ADDR       admin listener (default 127.0.0.1:8081)
  --policies DIR            policy directory (default ./policies)
  --data DIR                data directory: keys, admin token, store (default ./data)
  --durability MODE         sync | batched | none (default sync)
  --trusted-proxies LIST    comma-separated CIDRs/ranges whose X-Forwarded-For is believed
  --admin-token-file PATH   admin bearer token file (else $REFRESH_GUARD_ADMIN_TOKEN,
                            else one is generated into DATA/admin.token)
  --issuer URL              issuer identifier (default http://LISTEN)
  --max-connections N       concurrent connections on the public listener (default 1024)
  --max-connections-per-source N
                            concurrent public connections one source may hold: an IPv4
                            address or an IPv6 /64; trusted proxies are exempt; more are
                            closed at once (default 32)
  --admin-max-connections N concurrent connections on the admin listener, a budget of its
                            own (default 64)
  --admin-max-connections-per-source N
                            as --max-connections-per-source, on the admin listener
                            (default 16)
  --first-request-timeout DURATION
                            time a new connection has to send its first request's
                            headers, on both listeners, e.g. 500ms or 5s (default 5s)
  --workers N               runtime threads (default: one per core)
  --watch-policies          also reload when the policy files change

Logs go to stdout, as JSON when stdout is not a terminal; RUST_LOG filters them.
SIGTERM or Ctrl-C shuts down gracefully; SIGHUP reloads the policy directory.
";

/// Parsed `serve` options beyond [`Config`].
struct Options {
    config: Config,
    workers: usize,
    watch_policies: bool,
}

fn parse(args: &[String], env_token: Option<String>) -> Result<Options, String> {
    let mut config = Config::default();
    let mut workers = 0;
    let mut watch_policies = false;
    let mut token_file = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        let addr = |v: String| -> Result<SocketAddr, String> {
            v.parse()
                .map_err(|_| format!("{flag}: {v:?} is not an address like 127.0.0.1:8080"))
        };
        match flag {
            "--listen" => config.listen = addr(value()?)?,
            "--admin-listen" => config.admin_listen = addr(value()?)?,
            "--policies" => config.policies = PathBuf::from(value()?),
            "--data" => config.data = PathBuf::from(value()?),
            "--durability" => {
                config.durability = match value()?.as_str() {
                    "sync" => Durability::Sync,
                    "batched" => Durability::Batched(Duration::from_millis(10)),
                    "none" => Durability::None,
                    other => {
                        return Err(format!(
                            "--durability: {other:?} is not one of sync, batched, none"
                        ));
                    }
                }
            }
            "--trusted-proxies" => {
                config.trusted_proxies = value()?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse::<IpRange>()
                            .map_err(|e| format!("--trusted-proxies: {s:?}: {e}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--watch-policies" if inline.is_none() => watch_policies = true,
            "--admin-token-file" => token_file = Some(PathBuf::from(value()?)),
            "--issuer" => {
                let v = value()?;
                if !(v.starts_with("https://") || v.starts_with("http://")) {
                    return Err(format!("--issuer: {v:?} must be an http(s) URL"));
                }
                config.issuer = Some(v);
            }
            "--max-connections" => {
                config.max_connections = value()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or("--max-connections must be 1 to 1000000")?
            }
            "--max-connections-per-source" => {
                config.max_connections_per_source = value()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or("--max-connections-per-source must be 1 to 1000000")?
            }
            "--admin-max-connections" => {
                config.admin_max_connections = value()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or("--admin-max-connections must be 1 to 1000000")?
            }
            "--admin-max-connections-per-source" => {
                config.admin_max_connections_per_source = value()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or("--admin-max-connections-per-source must be 1 to 1000000")?
            }
            "--first-request-timeout" => {
                let v = value()?;
                config.first_request_timeout = duration(&v)
                    .filter(|d| (Duration::from_millis(1)..=MAX_TIMEOUT).contains(d))
                    .ok_or_else(|| {
                        format!(
                            "--first-request-timeout: {v:?} is not a duration from 1ms to 10m \
                             (a whole number and ms, s or m, like 500ms or 5s)"
                        )
                    })?
            }
            "--workers" => {
                workers = value()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or("--workers must be 1 to 1024")?
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    config.admin_token = match (token_file, env_token) {
        (Some(path), _) => AdminTokenSource::File(path),
        (None, Some(t)) => AdminTokenSource::Value(AdminToken::new(&t).ok_or_else(|| {
            format!(
                "{ADMIN_TOKEN_ENV} must be at least {} characters",
                AdminToken::MIN_LEN
            )
        })?),
        (None, None) => AdminTokenSource::Generate,
    };
    Ok(Options {
        config,
        workers,
        watch_policies,
    })
}

/// The longest timeout a flag accepts.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// "500ms", "5s", "2m": a whole number and a unit, as in policy files.
fn duration(s: &str) -> Option<Duration> {
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
}

/// Structured logs to stdout: JSON when stdout is not a terminal, filtered
/// by `RUST_LOG` (default `info`). Does nothing if a subscriber is set.
pub fn init_logging() {
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

/// Run `refresh-guard serve` with `args` (the arguments after `serve`)
/// until SIGTERM or Ctrl-C. Returns the exit status: 0 after a graceful
/// shutdown, 1 if the server failed, 2 for a usage error (printed, with
/// the usage, on stderr).
pub fn serve_main(args: &[String]) -> u8 {
    let env_token = std::env::var(ADMIN_TOKEN_ENV).ok();
    let options = match parse(args, env_token) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return 0;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return 2;
        }
    };
    init_logging();
    match run(options) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "refresh-guard serve failed");
            eprintln!("error: {e}");
            1
        }
    }
}

fn run(options: Options) -> Result<(), ServerError> {
    let rt = super::runtime(options.workers)?;
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

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_without_flags() {
        let o = parse(&[], None).unwrap();
        assert_eq!(o.config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(o.config.admin_listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(o.config.policies, PathBuf::from("./policies"));
        assert_eq!(o.config.data, PathBuf::from("./data"));
        assert_eq!(o.config.durability, Durability::Sync);
        assert!(matches!(o.config.admin_token, AdminTokenSource::Generate));
        assert_eq!(o.config.max_connections_per_source, 32);
        assert_eq!(o.config.first_request_timeout, Duration::from_secs(5));
        assert_eq!(o.config.admin_max_connections, 64);
        assert_eq!(o.config.admin_max_connections_per_source, 16);
    }

    #[test]
    fn every_flag_both_spellings() {
        let o = parse(
            &args(&[
                "--listen=0.0.0.0:9000",
                "--admin-listen",
                "127.0.0.1:9001",
                "--policies",
                "p",
                "--data=d",
                "--durability",
                "none",
                "--trusted-proxies",
                "10.0.0.0/8, 192.0.2.1-192.0.2.9",
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
            ]),
            Some("ignored-because-the-file-wins".into()),
        )
        .unwrap();
        assert_eq!(o.config.listen.port(), 9000);
        assert_eq!(o.config.admin_listen.port(), 9001);
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
    }

    #[test]
    fn errors_name_the_flag() {
        for (a, want) in [
            (vec!["--listen"], "--listen needs a value"),
            (vec!["--durability", "fast"], "--durability"),
            (
                vec!["--trusted-proxies", "10.0.0.0/33"],
                "--trusted-proxies",
            ),
            (vec!["--max-connections", "0"], "--max-connections"),
            (
                vec!["--max-connections-per-source", "x"],
                "--max-connections-per-source must be",
            ),
            (
                vec!["--first-request-timeout", "5"],
                "--first-request-timeout: \"5\" is not a duration",
            ),
            (vec!["--first-request-timeout", "0s"], "from 1ms to 10m"),
            (vec!["--first-request-timeout", "11m"], "from 1ms to 10m"),
            (vec!["--first-request-timeout", "-1s"], "from 1ms to 10m"),
            (
                vec!["--admin-max-connections", "0"],
                "--admin-max-connections must be",
            ),
            (
                vec!["--admin-max-connections-per-source=2000000"],
                "--admin-max-connections-per-source must be",
            ),
            (vec!["--frobnicate"], "unknown argument"),
        ] {
            let e = parse(&args(&a), None).err().unwrap();
            assert!(e.contains(want), "{a:?}: {e}");
        }
        let e = parse(&[], Some("short".into())).err().unwrap();
        assert!(e.contains(ADMIN_TOKEN_ENV) && !e.contains("short\""), "{e}");
    }
}
