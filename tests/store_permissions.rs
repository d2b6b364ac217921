//! Who may read the store: its records hold subjects and per-family
//! secrets. Directories are created 0700 and files 0600; an existing
//! directory other users can reach, or that another user owns, is refused
//! with the command that fixes it; group access is allowed. The server's
//! data directory follows the same rules (server/tests/server.rs).

mod store_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use refresh_guard::{Error, LogOptions, LogStore};
use store_support::*;

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Regression: the store opened in an existing directory every user of the
/// machine could read (0755) and put its records there. It is refused,
/// naming the path, its mode and the fix, and nothing is written to it;
/// group access is allowed.
#[test]
fn store_refuses_a_directory_other_users_can_reach() {
    let dir = temp_dir("exposed");
    chmod(&dir, 0o755);
    match LogStore::open(&*dir, LogOptions::default()) {
        Err(Error::Exposed { path, detail }) => {
            assert_eq!(path, dir.to_path_buf());
            assert!(detail.contains("0755"), "{detail}");
            assert!(
                detail.contains(&format!("chmod o-rwx {}", dir.display())),
                "{detail}"
            );
        }
        other => panic!("expected a refusal, got {:?}", other.err()),
    }
    assert_eq!(fs::read_dir(&*dir).unwrap().count(), 0, "nothing written");
    chmod(&dir, 0o750);
    drop(LogStore::open(&*dir, LogOptions::default()).unwrap());
}

/// Regression: a store created its directory 0755 and its segments 0644.
/// Now every directory it creates is 0700 and every file 0600, snapshots
/// and the segments compaction starts included.
#[test]
fn store_creates_private_directories_and_files() {
    let root = temp_dir("private");
    let dir = root.join("a/b/log");
    let e = open(&dir);
    let t = issue(&e, "alice");
    e.compact().unwrap();
    rotate(&e, &t);
    drop(e);
    for d in [root.join("a"), root.join("a/b"), dir.clone()] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    let files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|x| x == "rgs"))
    );
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|x| x == "rgl"))
    );
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
}

/// Regression: files written before (0644) stayed readable by everyone.
/// Opening takes other users' access away; group access stays.
#[test]
fn store_takes_other_users_access_from_its_files() {
    let dir = temp_dir("tighten");
    drop(open(&dir));
    let seg = segments(&dir).pop().unwrap();
    chmod(&seg, 0o644);
    drop(open(&dir));
    assert_eq!(mode(&seg), 0o640);
}

/// A snapshot older than the newest (left by an interrupted compaction's
/// clean-up) is never read, but holds families' secrets like the rest:
/// opening takes other users' access from it too. (Found in review: only
/// the files recovery read were tightened.)
#[test]
fn store_takes_other_users_access_from_superseded_snapshots() {
    let dir = temp_dir("tighten-stale");
    let e = open(&dir);
    issue(&e, "alice");
    e.compact().unwrap();
    drop(e);
    let newest = fs::read_dir(&*dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "rgs"))
        .expect("a snapshot");
    let stale = dir.join(format!("snapshot-{:020}.rgs", 0));
    assert_ne!(stale, newest);
    fs::copy(&newest, &stale).unwrap();
    chmod(&stale, 0o644);
    drop(open(&dir));
    assert_eq!(mode(&stale), 0o640);
}

/// A directory or file owned by another user is refused, naming the owner
/// and the fix. Needs root to give a file away; skipped otherwise.
#[test]
fn store_refuses_what_another_user_owns() {
    let dir = temp_dir("owner");
    drop(open(&dir));
    let seg = segments(&dir).pop().unwrap();
    if std::os::unix::fs::chown(&seg, Some(65534), None).is_err() {
        eprintln!("skipped: only root can give a file to another user");
        return;
    }
    let e = LogStore::open(&*dir, LogOptions::default()).err().unwrap();
    assert!(
        matches!(&e, Error::Exposed { path, .. } if *path == seg),
        "{e}"
    );
    assert!(e.to_string().contains("owned by uid 65534"), "{e}");
    std::os::unix::fs::chown(&seg, Some(0), None).unwrap();
    std::os::unix::fs::chown(&*dir, Some(65534), None).unwrap();
    let e = LogStore::open(&*dir, LogOptions::default()).err().unwrap();
    assert!(
        matches!(&e, Error::Exposed { path, .. } if path == &dir.to_path_buf()),
        "{e}"
    );
    assert!(e.to_string().contains("chown -R"), "{e}");
}
