//! The README's samples are real: each block under a marker is what it
//! claims to be, so a change to the tool or the script that the README
//! does not follow fails here.
//!
//! - `<!-- cli-output: ARGS -->`: the stdout of `refresh-guard ARGS`, run
//!   from the repository root on the shipped policy sets;
//! - `<!-- walkthrough: scripts/walkthrough.sh -->`: the script's text
//!   below its marker line (server/tests/walkthrough.rs runs it).
//!
//! `REFRESH_GUARD_BLESS=1` rewrites the README's blocks from the tool and
//! the script (see [`BLESS`]).

use std::path::{Path, PathBuf};
use std::process::Command;

/// How to regenerate the README's blocks, printed with every mismatch.
const BLESS: &str =
    "REFRESH_GUARD_BLESS=1 cargo test -p refresh-guard-server --all-features --test readme";

/// The line of `scripts/walkthrough.sh` after which the README's copy starts.
const SCRIPT_MARK: &str = "# ---- the README's walkthrough, from here to the end ----\n";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn cli_output(args: &str) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_refresh-guard"));
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("REFRESH_GUARD_")) {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(args.split_whitespace())
        .current_dir(repo(""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "refresh-guard {args}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn walkthrough() -> String {
    let script = std::fs::read_to_string(repo("scripts/walkthrough.sh")).unwrap();
    let at = script
        .find(SCRIPT_MARK)
        .unwrap_or_else(|| panic!("scripts/walkthrough.sh lacks the line {SCRIPT_MARK:?}"));
    script[at + SCRIPT_MARK.len()..].to_owned()
}

/// A block of the README: the marker's argument and the fenced text after it.
struct Block {
    kind: &'static str,
    arg: String,
    /// Byte range of the fenced block's content.
    body: std::ops::Range<usize>,
}

fn blocks(readme: &str, kind: &'static str) -> Vec<Block> {
    let mark = format!("<!-- {kind}: ");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = readme[from..].find(&mark) {
        let start = from + i;
        let line_end = start + readme[start..].find('\n').unwrap();
        let arg = readme[start + mark.len()..line_end]
            .strip_suffix(" -->")
            .unwrap_or_else(|| panic!("README marker without ` -->`: {}", &readme[start..line_end]))
            .to_owned();
        let fence = line_end + 1;
        let open_len = readme[fence..].find('\n').unwrap() + 1;
        assert!(
            readme[fence..].starts_with("```"),
            "README: a fenced block must follow {}",
            &readme[start..line_end]
        );
        let body = fence + open_len;
        // The closing fence: the first line from `body` on that is "```".
        let close = body
            + readme[body..]
                .split_inclusive('\n')
                .take_while(|line| *line != "```\n")
                .map(str::len)
                .sum::<usize>();
        assert!(
            readme[close..].starts_with("```\n"),
            "README: unclosed block after {}",
            &readme[start..line_end]
        );
        out.push(Block {
            kind,
            arg,
            body: body..close,
        });
        from = close;
    }
    out
}

/// A line diff (longest common subsequence): `-` README, `+` actual.
fn diff(readme: &str, actual: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (readme.lines().collect(), actual.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push(format!("  {}", a[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            lines.push(format!("+ {}", b[j]));
            j += 1;
        } else {
            lines.push(format!("- {}", a[i]));
            i += 1;
        }
    }
    // Changed lines with two lines of context, as `diff -u` shows them.
    let near = |k: usize| {
        lines[k.saturating_sub(2)..(k + 3).min(lines.len())]
            .iter()
            .any(|l| !l.starts_with("  "))
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, line) in lines.iter().enumerate() {
        if near(k) {
            out += line;
            out.push('\n');
            skipped = false;
        } else if !skipped {
            out += "  ...\n";
            skipped = true;
        }
    }
    out
}

/// Compare (or, under `REFRESH_GUARD_BLESS`, rewrite) every block of the
/// given kinds with what `actual` renders for its argument.
fn check(kinds: &[&'static str], actual: impl Fn(&Block) -> String) {
    // Both tests may rewrite the README: one at a time.
    static README: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = README.lock().unwrap_or_else(|e| e.into_inner());
    let path = repo("README.md");
    let mut readme = std::fs::read_to_string(&path).unwrap();
    let mut found: Vec<Block> = kinds.iter().flat_map(|k| blocks(&readme, k)).collect();
    assert!(!found.is_empty(), "README has no {kinds:?} marker");
    // Back to front, so that rewriting one keeps the others' offsets.
    found.sort_by_key(|b| std::cmp::Reverse(b.body.start));
    let mut stale = Vec::new();
    for block in &found {
        let want = actual(block);
        if readme[block.body.clone()] == want {
            continue;
        }
        if std::env::var_os("REFRESH_GUARD_BLESS").is_some() {
            readme.replace_range(block.body.clone(), &want);
        } else {
            stale.push(format!(
                "README block `<!-- {}: {} -->` is stale (- README, + actual):\n{}",
                block.kind,
                block.arg,
                diff(&readme[block.body.clone()], &want)
            ));
        }
    }
    if std::env::var_os("REFRESH_GUARD_BLESS").is_some() {
        std::fs::write(&path, readme).unwrap();
    }
    assert!(
        stale.is_empty(),
        "{}\nregenerate with: {BLESS}",
        stale.join("\n")
    );
}

/// Regression: the README's `policy diff` sample showed version hashes of
/// the shipped sets with changes they do not have, and its `policy check`
/// sample lacked the footer the tool prints. Each is now the tool's output.
#[test]
fn readme_policy_samples_are_the_tools_output() {
    check(&["cli-output"], |b| cli_output(&b.arg));
}

/// The README's walkthrough is `scripts/walkthrough.sh`, the text a test
/// runs, not a copy that drifts from it.
#[test]
fn readme_walkthrough_is_the_script() {
    check(&["walkthrough"], |b| {
        assert_eq!(b.arg, "scripts/walkthrough.sh");
        walkthrough()
    });
}
