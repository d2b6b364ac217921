//! `refresh-guard`: the command line around the library.
//!
//! Subcommands are rows of [`COMMANDS`]: the words that select one, its
//! usage and a function that parses the rest of the arguments and runs. A
//! new subcommand (such as `serve`) is one more row. Arguments are parsed
//! by hand: a few positional paths do not justify an argument-parsing
//! dependency and its compile time.
//!
//! Exit status: 0 success, 1 the command failed (policy errors are listed
//! on stderr), 2 bad usage.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use refresh_guard::{ClientPolicy, PolicySet};

/// Exit status for a command that ran and failed.
const FAILED: u8 = 1;
/// Exit status for bad usage.
const USAGE: u8 = 2;

/// One subcommand.
struct Command {
    /// The words that select it (`["policy", "check"]`).
    words: &'static [&'static str],
    /// Its arguments, for the usage text.
    args: &'static str,
    /// One line on what it does.
    about: &'static str,
    /// Parse the arguments after `words` and run.
    run: fn(&[OsString], &mut Io<'_>) -> Result<u8, Usage>,
}

const COMMANDS: &[Command] = &[
    Command {
        words: &["policy", "check"],
        args: "DIR",
        about: "print the policy version and every client's effective knobs, or every error",
        run: policy_check,
    },
    Command {
        words: &["policy", "diff"],
        args: "OLD_DIR NEW_DIR",
        about: "print the effective knobs that change, client by client",
        run: policy_diff,
    },
    Command {
        words: &["store", "repair"],
        args: "DIR",
        about: "cut a damaged store back to what reads (the rest saved aside); list lost families",
        run: store_repair,
    },
    Command {
        words: &["serve"],
        // Every option is in README "Server"; a wrong one prints them all.
        args: "[--listen ADDR] [--policies DIR] [--data DIR] [...]",
        about: "run the OAuth 2.0 token service on the engine",
        run: serve,
    },
];

/// Bad usage, with what was wrong.
struct Usage(String);

/// Where output goes; the tests of the binary read both.
struct Io<'a> {
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // Unlocked handles (each write locks): `serve` logs to stdout from its
    // worker threads, which a lock held here for the whole run would block.
    let (mut out, mut err) = (io::stdout(), io::stderr());
    let mut io = Io {
        out: &mut out,
        err: &mut err,
    };
    let code = run(&args, &mut io);
    // A closed pipe (`| head`) is not worth a message.
    let _ = io.out.flush();
    ExitCode::from(code)
}

fn run(args: &[OsString], io: &mut Io<'_>) -> u8 {
    let words: Vec<&str> = args.iter().map(|a| a.to_str().unwrap_or("")).collect();
    let help =
        words.first() == Some(&"help") || words.iter().any(|w| matches!(*w, "-h" | "--help"));
    if words.is_empty() || help {
        let to = if words.is_empty() {
            &mut *io.err
        } else {
            &mut *io.out
        };
        let _ = write!(to, "{}", usage());
        return if words.is_empty() { USAGE } else { 0 };
    }
    if words == ["--version"] || words == ["-V"] {
        let _ = writeln!(io.out, "refresh-guard {}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    let Some(cmd) = COMMANDS
        .iter()
        .find(|c| words.len() >= c.words.len() && words[..c.words.len()] == *c.words)
    else {
        let _ = write!(
            io.err,
            "error: unknown command `{}`\n\n{}",
            words.join(" "),
            usage()
        );
        return USAGE;
    };
    match (cmd.run)(&args[cmd.words.len()..], io) {
        Ok(code) => code,
        Err(Usage(why)) => {
            let _ = write!(
                io.err,
                "error: {why}\nusage: refresh-guard {} {}\n",
                cmd.words.join(" "),
                cmd.args
            );
            USAGE
        }
    }
}

fn usage() -> String {
    let mut s = String::from("refresh-guard: refresh-token lifecycle policy engine\n\nusage:\n");
    let lines: Vec<(String, &str)> = COMMANDS
        .iter()
        .map(|c| (format!("{} {}", c.words.join(" "), c.args), c.about))
        .chain([
            ("help".to_owned(), "print this text"),
            ("--version".to_owned(), "print the version"),
        ])
        .collect();
    let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (line, about) in lines {
        s.push_str(&format!("  refresh-guard {line:width$}  {about}\n"));
    }
    s.push_str("\nexit status: 0 success, 1 failure (errors on stderr), 2 bad usage\n");
    s
}

/// Exactly `N` positional arguments.
fn positional<const N: usize>(args: &[OsString]) -> Result<[PathBuf; N], Usage> {
    if let Some(flag) = args.iter().find(|a| {
        a.to_str()
            .is_some_and(|s| s.starts_with('-') && s.len() > 1)
    }) {
        return Err(Usage(format!(
            "unknown option `{}`",
            flag.to_string_lossy()
        )));
    }
    let paths: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
    let n = paths.len();
    paths.try_into().map_err(|_| {
        Usage(format!(
            "expected {N} argument{}, got {n}",
            if N == 1 { "" } else { "s" }
        ))
    })
}

/// `refresh-guard serve`: the server parses its own flags.
fn serve(args: &[OsString], io: &mut Io<'_>) -> Result<u8, Usage> {
    let args = args
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .ok_or_else(|| Usage(format!("argument `{}` is not UTF-8", a.to_string_lossy())))
        })
        .collect::<Result<Vec<String>, Usage>>()?;
    #[cfg(feature = "server")]
    {
        let _ = io;
        Ok(refresh_guard::server::serve_main(&args))
    }
    #[cfg(not(feature = "server"))]
    {
        let _ = args;
        let _ = writeln!(
            io.err,
            "error: this build has no server; build with `--features server`"
        );
        Ok(FAILED)
    }
}

/// `refresh-guard store repair DIR`: a thin wrapper of `LogStore::repair`
/// (DIR is a store directory or a server data directory holding `log/`).
fn store_repair(args: &[OsString], io: &mut Io<'_>) -> Result<u8, Usage> {
    let [dir] = positional(args)?;
    #[cfg(feature = "durable")]
    match refresh_guard::LogStore::repair(&dir) {
        Ok(report) => {
            let _ = write!(io.out, "{report}");
            Ok(0)
        }
        Err(e) => {
            let _ = writeln!(io.err, "error: {e}");
            Ok(FAILED)
        }
    }
    #[cfg(not(feature = "durable"))]
    {
        let _ = dir;
        let _ = writeln!(
            io.err,
            "error: this build has no store; build with `--features durable`"
        );
        Ok(FAILED)
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

fn policy_check(args: &[OsString], io: &mut Io<'_>) -> Result<u8, Usage> {
    let [dir] = positional(args)?;
    let Some(set) = load(&dir, io) else {
        return Ok(FAILED);
    };
    let _ = write!(io.out, "{}", check_report(&set));
    Ok(0)
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

fn policy_diff(args: &[OsString], io: &mut Io<'_>) -> Result<u8, Usage> {
    let [old_dir, new_dir] = positional(args)?;
    // Load both before failing, so every error of both is listed.
    let (old, new) = (load(&old_dir, io), load(&new_dir, io));
    let (Some(old), Some(new)) = (old, new) else {
        return Ok(FAILED);
    };
    let _ = write!(io.out, "{}", diff_report(&old, &new));
    Ok(0)
}

/// Every effective knob that changes, as `scope.knob: old -> new`.
///
/// A client is compared by the policy that governs it in each set, so a
/// client that gains its own table is compared with the old defaults it
/// was under, and one that loses it with the new defaults.
fn diff_report(old: &PolicySet, new: &PolicySet) -> String {
    if old.version() == new.version() {
        return format!(
            "policy version {}: no change in effective knobs\n",
            new.version()
        );
    }
    let mut s = format!("policy version {} -> {}\n", old.version(), new.version());
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
        match (old.has_client(id), new.has_client(id)) {
            (false, true) => s.push_str(&format!("{scope}: added (was under [defaults])\n")),
            (true, false) => s.push_str(&format!("{scope}: removed (now under [defaults])\n")),
            _ => {}
        }
        knob_changes(&mut s, &scope, old.policy(id), new.policy(id));
    }
    s
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
