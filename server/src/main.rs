//! `refresh-guard`: the command line around the library and the server.
//!
//! Parsed with clap (derive): every subcommand has a `--help` listing its
//! flags, errors name the flag and suggest a near miss, and `serve`'s
//! flags can also come from `REFRESH_GUARD_*` environment variables
//! (cli.rs). A few flags users guess under another name get an explicit
//! hint ([`HINTS`]).
//!
//! Exit status: 0 success, 1 the command failed (policy errors are listed
//! on stderr), 2 bad usage, 3 a compliance profile asked for is not met.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use refresh_guard::{ClientPolicy, PolicySet, Profile, ProfileReport, UnknownClients};

mod cli;

/// Exit status for a command that ran and failed.
const FAILED: u8 = 1;
/// Exit status for bad usage.
const USAGE: u8 = 2;
/// Exit status for a set that loads but does not meet a compliance profile
/// asked for (README "Compliance profiles").
pub(crate) const NOT_MET: u8 = 3;

/// refresh-guard: refresh-token lifecycle policy engine
#[derive(Debug, Parser)]
#[command(
    name = "refresh-guard",
    version,
    propagate_version = true,
    subcommand_required = true,
    arg_required_else_help = true,
    // A repeated flag overrides the earlier one, as it always has.
    args_override_self = true,
    max_term_width = 80,
    after_help = "Exit status: 0 success, 1 failure (errors on stderr), 2 bad usage, \
                  3 a compliance profile asked for is not met."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the OAuth 2.0 token service on the engine
    Serve(Box<cli::ServeArgs>),
    /// Check a policy directory, or compare two
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Repair a damaged store
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Cut a damaged store back to what reads (the rest saved aside); list
    /// the families lost
    Repair {
        /// A store directory, or a server data directory holding log/
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Print the policy version and every client's effective knobs, or
    /// every error; with --profile, each profile's report instead
    Check {
        /// The policy directory (every *.toml in it)
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        #[command(flatten)]
        profiles: ProfileArgs,
        /// Report format (with --profile)
        #[arg(long, value_enum, default_value_t = Format::Text, requires = "profiles")]
        format: Format,
    },
    /// Print the effective knobs that change, client by client; with
    /// --profile, also each control whose status changes
    Diff {
        /// The set in force
        #[arg(value_name = "OLD_DIR")]
        old: PathBuf,
        /// The candidate set
        #[arg(value_name = "NEW_DIR")]
        new: PathBuf,
        #[command(flatten)]
        profiles: ProfileArgs,
    },
}

/// `--profile NAME`, repeatable.
#[derive(Debug, clap::Args)]
struct ProfileArgs {
    /// A compliance profile to check (repeatable): salesforce-appexchange,
    /// rfc9700 or fapi2-refresh; exit status 3 if one is not met
    #[arg(
        long = "profile",
        id = "profiles",
        value_name = "NAME",
        action = clap::ArgAction::Append,
        value_parser = profile
    )]
    profiles: Vec<&'static Profile>,
}

/// A shipped profile by name; an unknown one is a usage error (status 2,
/// as any bad flag value) listing the shipped ones.
pub(crate) fn profile(name: &str) -> Result<&'static Profile, String> {
    Profile::named(name).map_err(|e| e.to_string())
}

/// `policy check --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// The report an auditor reads
    Text,
    /// One JSON object: README "Compliance profiles" lists its fields
    Json,
}

/// Names users reach for that are not ours, and what to use instead.
/// clap suggests near misses (`--listne`) itself; these are guesses too
/// far from the real name for that.
const HINTS: &[(&str, &str)] = &[
    ("--port", LISTEN),
    ("--bind", LISTEN),
    ("--host", LISTEN),
    ("--address", LISTEN),
    ("--admin-port", ADMIN_LISTEN),
    ("--admin-bind", ADMIN_LISTEN),
    ("--policy", POLICIES),
    ("--policy-dir", POLICIES),
    ("--config", POLICIES),
    ("--data-dir", DATA),
    ("--datadir", DATA),
    ("--threads", "runtime threads are '--workers N'"),
    (
        "--admin-token",
        "use '--admin-token-file PATH' or $REFRESH_GUARD_ADMIN_TOKEN \
         (arguments show in `ps`)",
    ),
    (
        "check",
        "a policy directory is checked with 'policy check DIR'",
    ),
    (
        "diff",
        "policy directories are compared with 'policy diff OLD NEW'",
    ),
    ("run", SERVE),
    ("start", SERVE),
];
const LISTEN: &str = "the public listener is '--listen ADDR', e.g. '--listen 0.0.0.0:8080'";
const ADMIN_LISTEN: &str = "the admin listener is '--admin-listen ADDR'";
const POLICIES: &str = "the policy directory is '--policies DIR'";
const DATA: &str = "the data directory (keys, store) is '--data DIR'";
const SERVE: &str = "the token service is 'refresh-guard serve'";

/// Where output goes.
struct Io<'a> {
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
}

fn main() -> ExitCode {
    let cli = match parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0, errors to stderr
            // with status 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(USAGE));
        }
    };
    // Unlocked handles (each write locks): `serve` logs to stdout from its
    // worker threads, which a lock held here for the whole run would block.
    let (mut out, mut err) = (io::stdout(), io::stderr());
    let mut io = Io {
        out: &mut out,
        err: &mut err,
    };
    let code = match cli.command {
        Command::Serve(args) => cli::serve(*args, &mut io),
        Command::Policy(PolicyCommand::Check {
            dir,
            profiles,
            format,
        }) => policy_check(&dir, &profiles.profiles, format, &mut io),
        Command::Policy(PolicyCommand::Diff { old, new, profiles }) => {
            policy_diff(&old, &new, &profiles.profiles, &mut io)
        }
        Command::Store(StoreCommand::Repair { dir }) => store_repair(&dir, &mut io),
    };
    // A closed pipe (`| head`) is not worth a message.
    let _ = io.out.flush();
    ExitCode::from(code)
}

/// Parse the command line; a usage error carries our hints.
fn parse(args: Vec<OsString>) -> Result<Cli, clap::Error> {
    let mut cmd = Cli::command();
    let matches = cmd
        .try_get_matches_from_mut(&args)
        .map_err(|e| hint(e, &cmd, &args))?;
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// Add a tip to a usage error: what to use instead of a name from
/// [`HINTS`], and, for a bad value taken from the environment, which
/// variable it came from (clap names only the flag).
fn hint(mut e: clap::Error, cmd: &clap::Command, args: &[OsString]) -> clap::Error {
    let invalid = match e.kind() {
        ErrorKind::UnknownArgument => e.get(ContextKind::InvalidArg),
        ErrorKind::InvalidSubcommand => e.get(ContextKind::InvalidSubcommand),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => e.get(ContextKind::InvalidArg),
        _ => None,
    };
    let Some(ContextValue::String(invalid)) = invalid else {
        return e;
    };
    let tip = match e.kind() {
        ErrorKind::UnknownArgument | ErrorKind::InvalidSubcommand => HINTS
            .iter()
            .find(|(name, _)| *name == invalid)
            .map(|(_, tip)| (*tip).to_owned()),
        _ => from_env(cmd, invalid, args),
    };
    let Some(tip) = tip else {
        return e;
    };
    let mut tips = match e.get(ContextKind::Suggested) {
        Some(ContextValue::StyledStrs(v)) => v.clone(),
        _ => Vec::new(),
    };
    tips.push(tip.into());
    e.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    e
}

/// For `--flag <VALUE>` (clap's spelling of the argument in an error):
/// the environment variable its value came from, if it was not given on
/// the command line.
fn from_env(cmd: &clap::Command, invalid: &str, args: &[OsString]) -> Option<String> {
    let long = invalid.strip_prefix("--")?.split(' ').next()?;
    let on_line = args.iter().any(|a| {
        a.to_str()
            .is_some_and(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")))
    });
    if on_line {
        return None;
    }
    let arg = cmd
        .get_subcommands()
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long))?;
    let var = arg.get_env()?.to_str()?;
    std::env::var_os(var).map(|_| format!("the value came from ${var}"))
}

/// `refresh-guard store repair DIR`: a thin wrapper of `LogStore::repair`
/// (DIR is a store directory or a server data directory holding `log/`).
fn store_repair(dir: &Path, io: &mut Io<'_>) -> u8 {
    match refresh_guard::LogStore::repair(dir) {
        Ok(report) => {
            let _ = write!(io.out, "{report}");
            0
        }
        Err(e) => {
            let _ = writeln!(io.err, "error: {e}");
            FAILED
        }
    }
}

/// Load a set, or list every error on stderr.
fn load(dir: &Path, io: &mut Io<'_>) -> Option<PolicySet> {
    match PolicySet::load_dir(dir) {
        Ok(set) => Some(set),
        Err(errors) => {
            let _ = writeln!(io.err, "{errors}");
            let n = errors.len();
            let _ = writeln!(
                io.err,
                "{}: {n} problem{}; the set was not loaded",
                dir.display(),
                if n == 1 { "" } else { "s" }
            );
            None
        }
    }
}

fn policy_check(dir: &Path, profiles: &[&'static Profile], format: Format, io: &mut Io<'_>) -> u8 {
    let Some(set) = load(dir, io) else {
        return FAILED;
    };
    if profiles.is_empty() {
        let _ = write!(io.out, "{}", check_report(&set));
        return 0;
    }
    let reports: Vec<ProfileReport> = profiles.iter().map(|p| set.check_profile(p)).collect();
    let met = reports.iter().all(|r| r.met);
    match format {
        Format::Text => {
            for (i, r) in reports.iter().enumerate() {
                let gap = if i > 0 { "\n" } else { "" };
                let _ = write!(io.out, "{gap}{r}");
            }
        }
        Format::Json => {
            // The stable envelope documented in README "Compliance profiles".
            let body = serde_json::json!({
                "policy_version": set.version().to_string(),
                "met": met,
                "reports": reports,
            });
            let _ = writeln!(io.out, "{body:#}");
        }
    }
    if met { 0 } else { NOT_MET }
}

/// The version, then a table of effective knobs per scope: defaults first,
/// then each client, its knobs that differ from the defaults marked `*`.
fn check_report(set: &PolicySet) -> String {
    let clients = set.clients();
    let mut s = format!(
        "policy version {}: [defaults] and {} client{}\n",
        set.version(),
        clients.len(),
        if clients.len() == 1 { "" } else { "s" }
    );
    s.push_str(&format!(
        "{}\n",
        unknown_clients_line(set.unknown_clients())
    ));
    let defaults = set.defaults().knobs();
    let width = defaults.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    s.push_str("\n[defaults]\n");
    for (k, v) in &defaults {
        s.push_str(&format!("  {k:width$}  {v}\n"));
    }
    for (id, policy) in &clients {
        s.push_str(&format!("\n[clients.{}]\n", key(id)));
        for ((k, v), (_, d)) in policy.knobs().iter().zip(&defaults) {
            let mark = if v == d { ' ' } else { '*' };
            s.push_str(&format!("{mark} {k:width$}  {v}\n"));
        }
    }
    if !clients.is_empty() {
        s.push_str("\n* differs from [defaults]\n");
    }
    s
}

/// What `unknown_clients` means for the set, in one line.
fn unknown_clients_line(u: UnknownClients) -> String {
    let means = match u {
        UnknownClients::Defaults => "[defaults] governs every client not listed",
        UnknownClients::Refuse => "clients not listed are refused",
    };
    format!("unknown_clients = {u}: {means}")
}

fn policy_diff(
    old_dir: &Path,
    new_dir: &Path,
    profiles: &[&'static Profile],
    io: &mut Io<'_>,
) -> u8 {
    // Load both before failing, so every error of both is listed.
    let (old, new) = (load(old_dir, io), load(new_dir, io));
    let (Some(old), Some(new)) = (old, new) else {
        return FAILED;
    };
    let _ = write!(io.out, "{}", diff_report(&old, &new));
    let mut met = true;
    for p in profiles {
        let (before, after) = (old.check_profile(p), new.check_profile(p));
        met &= after.met;
        let _ = write!(io.out, "{}", compliance_changes(&before, &after));
    }
    if met { 0 } else { NOT_MET }
}

/// A profile's verdict on both sets, then every control whose status
/// changes, per client (`ProfileReport::changes_since`).
fn compliance_changes(before: &ProfileReport, after: &ProfileReport) -> String {
    let verdict = |r: &ProfileReport| match r.met {
        true => "met".to_owned(),
        false => format!("NOT MET ({} not met)", r.not_met),
    };
    let changes = after.changes_since(before);
    let mut s = format!(
        "profile {}: {} -> {}{}\n",
        after.profile,
        verdict(before),
        verdict(after),
        if changes.is_empty() {
            "; no control changes status"
        } else {
            ""
        }
    );
    for c in changes {
        s.push_str(&format!("  {c}\n"));
    }
    s
}

/// Every effective knob that changes, as `scope.knob: old -> new`.
///
/// A client is compared by the policy that governs it in each set, so a
/// client that gains its own table is compared with the old defaults it
/// was under, and one that loses it with the new defaults.
fn diff_report(old: &PolicySet, new: &PolicySet) -> String {
    let (ua, ub) = (old.unknown_clients(), new.unknown_clients());
    if old.version() == new.version() {
        return format!(
            "policy version {}: no change in effective knobs\n{}\n",
            new.version(),
            unknown_clients_line(ub)
        );
    }
    let mut s = format!("policy version {} -> {}\n", old.version(), new.version());
    if ua == ub {
        s.push_str(&format!("{} (unchanged)\n", unknown_clients_line(ub)));
    } else {
        s.push_str(&format!("unknown_clients: {ua} -> {ub}\n"));
    }
    knob_changes(&mut s, "defaults", old.defaults(), new.defaults());
    let mut ids: Vec<&str> = old
        .clients()
        .into_iter()
        .chain(new.clients())
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let scope = format!("clients.{}", key(id));
        // Under `unknown_clients = "refuse"` a client without a table is
        // refused, not governed by [defaults]: it has no knobs to compare.
        let refused = |set: &PolicySet| ua_refuses(set) && !set.has_client(id);
        match (old.has_client(id), new.has_client(id)) {
            (false, true) if refused(old) => {
                s.push_str(&format!("{scope}: added (was refused)\n"));
                continue;
            }
            (true, false) if refused(new) => {
                s.push_str(&format!("{scope}: removed (now refused)\n"));
                continue;
            }
            (false, true) => s.push_str(&format!("{scope}: added (was under [defaults])\n")),
            (true, false) => s.push_str(&format!("{scope}: removed (now under [defaults])\n")),
            _ => {}
        }
        knob_changes(&mut s, &scope, old.policy(id), new.policy(id));
    }
    s
}

fn ua_refuses(set: &PolicySet) -> bool {
    set.unknown_clients() == UnknownClients::Refuse
}

fn knob_changes(s: &mut String, scope: &str, old: &ClientPolicy, new: &ClientPolicy) {
    for ((k, a), (_, b)) in old.knobs().iter().zip(new.knobs()) {
        if *a != b {
            s.push_str(&format!("{scope}.{k}: {a} -> {b}\n"));
        }
    }
    // `knobs()` shows only whether a secret is set; a changed secret is a
    // change all the same (and its hash is not printed).
    if let (Some(a), Some(b)) = (old.client_secret_sha256(), new.client_secret_sha256())
        && a != b
    {
        s.push_str(&format!("{scope}.client_secret_sha256: changed\n"));
    }
}

/// A key as TOML spells it: bare when it can be, else quoted.
fn key(id: &str) -> String {
    let bare = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        id.to_owned()
    } else {
        format!("{id:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks of the derived command line.
    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every hint names a flag or subcommand that does not exist (a real
    /// one would never reach the hint).
    #[test]
    fn hints_are_for_names_we_do_not_have() {
        let cmd = Cli::command();
        for (name, _) in HINTS {
            let exists = cmd.get_subcommands().any(|c| {
                c.get_name() == *name
                    || c.get_arguments()
                        .any(|a| a.get_long().is_some_and(|l| format!("--{l}") == *name))
            });
            assert!(!exists, "{name}");
        }
    }
}
