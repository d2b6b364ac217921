//! Who may read the store. Its records hold subjects and per-family
//! secrets, so its directory belongs to the user that runs it (and may be
//! shared with a group, as container volumes are), never to everyone on
//! the machine. See docs/store.md, "Permissions".
//!
//! The same rules guard the server's data directory, which holds the MAC
//! keys: this module is public as [`crate::private_files`] for it and for
//! embedders' own secret files.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Why a directory or file was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum Refusal {
    /// The operating system refused an operation on the path.
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Every user of the machine can reach it, or another user owns it.
    Exposed {
        /// The path.
        path: PathBuf,
        /// Its mode or owner, and the command that fixes it.
        detail: String,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Refusal::Exposed { path, detail } => write!(f, "{}: {detail}", path.display()),
        }
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Refusal::Io { source, .. } => Some(source),
            Refusal::Exposed { .. } => None,
        }
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        match r {
            Refusal::Io { path, source } => {
                Error::store_io(format!("{}: {source}", path.display()), source)
            }
            Refusal::Exposed { path, detail } => Error::Exposed { path, detail },
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Refusal + '_ {
    move |source| Refusal::Io {
        path: path.to_owned(),
        source,
    }
}

/// Create `dir` and any missing parent with mode 0700, then
/// [`check_dir`] it (an existing directory keeps its mode, so it is
/// checked, not trusted).
pub fn create_dir(dir: &Path) -> Result<(), Refusal> {
    let mut b = DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(io_at(dir))?;
    check_dir(dir)
}

/// Refuse `dir` if other users can reach it (any of the mode's "other"
/// bits) or another user owns it. Group access is allowed.
pub fn check_dir(dir: &Path) -> Result<(), Refusal> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(dir).map_err(io_at(dir))?;
        check_owner(dir, meta.uid())?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(Refusal::Exposed {
                path: dir.to_owned(),
                detail: format!(
                    "mode {mode:04o} lets every user of this machine in, and the files \
                     in it hold subjects and per-family secrets; run `chmod o-rwx {}`",
                    dir.display()
                ),
            });
        }
    }
    Ok(())
}

/// Options that create a file only its owner can read (0600).
pub fn file_options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// An existing file the process owns and keeps secrets in: refuse it if
/// another user owns it, and take away other users' access if it has any
/// (files created before 0600 was the rule, or copied in).
pub fn tighten_file(path: &Path) -> Result<(), Refusal> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = fs::metadata(path).map_err(io_at(path))?;
        check_owner(path, meta.uid())?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o007 != 0 {
            let tight = mode & !0o007;
            fs::set_permissions(path, fs::Permissions::from_mode(tight)).map_err(io_at(path))?;
            tracing::warn!(
                path = %path.display(),
                was = format!("{mode:04o}"),
                now = format!("{tight:04o}"),
                "took other users' access away from a file holding secrets"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(unix)]
fn check_owner(path: &Path, owner: u32) -> Result<(), Refusal> {
    let me = euid();
    if owner == me {
        return Ok(());
    }
    Err(Refusal::Exposed {
        path: path.to_owned(),
        detail: format!(
            "owned by uid {owner}, but this process runs as uid {me}; run it as uid \
             {owner}, or give the store to this user with `chown -R {me} {}`",
            path.display()
        ),
    })
}

/// The process's effective user id.
#[cfg(unix)]
#[allow(unsafe_code)]
fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory of ours and
    // cannot fail (POSIX: "shall always be successful").
    unsafe { libc::geteuid() }
}
