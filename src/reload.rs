//! Live policy reload (feature `watch`): a policy directory put in force on
//! demand, on SIGHUP and when its files change.
//!
//! A reload reads the whole directory into a new [`PolicySet`] and swaps it
//! in with [`Engine::swap_policies`], so every redemption is decided wholly
//! under the old set or wholly under the new one. A directory that fails to
//! load changes nothing: the set in force keeps serving, every problem is
//! logged through `tracing` and reported as a `policy_reload_failed` event.
//! A reloader may also require compliance profiles (README "Compliance
//! profiles"): a set that loads but does not meet one is refused the same
//! way, with the reports of the profiles it breaks.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::compliance::{Profile, ProfileReport};
use crate::engine::Engine;
use crate::policy::{LoadErrors, PolicySet, PolicyVersion};

/// Why a reload left the set in force as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReloadError {
    /// The directory did not load: every problem, each with file and line.
    Load(LoadErrors),
    /// The directory loaded, but the set does not meet a profile the
    /// reloader requires.
    ProfileNotMet {
        /// The version of the refused set.
        version: PolicyVersion,
        /// The report of each required profile it does not meet.
        reports: Vec<ProfileReport>,
    },
}

impl ReloadError {
    /// One line per problem (or per profile not met), for events and logs.
    pub fn to_strings(&self) -> Vec<String> {
        match self {
            ReloadError::Load(e) => e.to_strings(),
            ReloadError::ProfileNotMet { version, reports } => reports
                .iter()
                .map(|r| {
                    format!(
                        "policy version {version} does not meet profile {}: {} control{} not met",
                        r.profile,
                        r.not_met,
                        if r.not_met == 1 { "" } else { "s" }
                    )
                })
                .collect(),
        }
    }
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::Load(e) => write!(f, "{e}"),
            ReloadError::ProfileNotMet { .. } => f.write_str(&self.to_strings().join("\n")),
        }
    }
}

impl std::error::Error for ReloadError {}

impl From<LoadErrors> for ReloadError {
    fn from(e: LoadErrors) -> ReloadError {
        ReloadError::Load(e)
    }
}

/// Reloads one engine's policy set from one directory.
///
/// Cheap to clone; clones share the engine, the directory and the lock that
/// keeps two reloads (say a SIGHUP and a file change) from overlapping, so
/// the set read last is always the one left in force.
#[derive(Clone)]
pub struct PolicyReloader {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<Engine>,
    dir: PathBuf,
    /// Profiles a set must meet to be put in force.
    required: Vec<&'static Profile>,
    lock: Mutex<()>,
}

impl fmt::Debug for PolicyReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyReloader")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl PolicyReloader {
    /// A reloader for `engine` from `dir`; nothing is read until a reload.
    pub fn new(engine: Arc<Engine>, dir: impl Into<PathBuf>) -> PolicyReloader {
        PolicyReloader::requiring(engine, dir, Vec::new())
    }

    /// A reloader that puts a set in force only if it meets every profile
    /// in `required`; one that does not is refused as a set that fails to
    /// load is ([`ReloadError::ProfileNotMet`]).
    pub fn requiring(
        engine: Arc<Engine>,
        dir: impl Into<PathBuf>,
        required: Vec<&'static Profile>,
    ) -> PolicyReloader {
        PolicyReloader {
            inner: Arc::new(Inner {
                engine,
                dir: dir.into(),
                required,
                lock: Mutex::new(()),
            }),
        }
    }

    /// The profiles a set must meet to be put in force.
    pub fn required_profiles(&self) -> &[&'static Profile] {
        &self.inner.required
    }

    /// The policy directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The engine whose set is replaced.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// Load the directory and put it in force; returns the version in force
    /// afterwards.
    ///
    /// A set whose version equals the one in force is not swapped (a
    /// touched file or an editor's save changes no decision and should raise
    /// no `policy_swapped` event). On failure (a set that does not load,
    /// or does not meet a required profile) the set in force stays, the
    /// problems are logged and reported to the engine's event sink, and
    /// returned.
    pub fn reload(&self) -> Result<PolicyVersion, ReloadError> {
        let inner = &*self.inner;
        let _one_at_a_time = inner.lock.lock();
        let dir = inner.dir.display();
        let loaded = PolicySet::load_dir(&inner.dir)
            .map_err(ReloadError::Load)
            .and_then(|set| {
                let reports: Vec<ProfileReport> = inner
                    .required
                    .iter()
                    .map(|p| set.check_profile(p))
                    .filter(|r| !r.met)
                    .collect();
                match reports.is_empty() {
                    true => Ok(set),
                    false => Err(ReloadError::ProfileNotMet {
                        version: set.version(),
                        reports,
                    }),
                }
            });
        match loaded {
            Ok(set) => {
                let version = set.version();
                let in_force = inner.engine.policies().version();
                if version == in_force {
                    tracing::debug!(%dir, %version, "policy set unchanged");
                    return Ok(version);
                }
                let old = inner.engine.swap_policies(set);
                tracing::info!(%dir, from = %old.version(), to = %version, "policy set reloaded");
                Ok(version)
            }
            Err(error) => {
                let in_force = inner.engine.policies().version();
                let problems = error.to_strings();
                for p in &problems {
                    match &error {
                        ReloadError::Load(_) => {
                            tracing::error!(%dir, problem = %p, "policy file problem");
                        }
                        _ => tracing::error!(%dir, problem = %p, "policy set breaks a profile"),
                    }
                }
                tracing::error!(
                    %dir,
                    problems = problems.len(),
                    version = %in_force,
                    "policy reload failed; the set in force keeps serving"
                );
                inner.engine.report_reload_failure(problems);
                Err(error)
            }
        }
    }

    /// Reload on every SIGHUP, from a background thread, until the returned
    /// trigger is stopped or dropped.
    ///
    /// The handler is installed before this returns, so a SIGHUP sent after
    /// it no longer kills the process. After the trigger stops, SIGHUP
    /// stays handled (and ignored): the default action is not restored.
    #[cfg(unix)]
    pub fn reload_on_sighup(&self) -> io::Result<ReloadTrigger> {
        use signal_hook::consts::SIGHUP;
        use signal_hook::iterator::Signals;

        let mut signals = Signals::new([SIGHUP])?;
        let handle = signals.handle();
        let reloader = self.clone();
        let thread = thread::Builder::new()
            .name("policy-sighup".to_owned())
            .spawn(move || {
                // Ends when the handle is closed.
                for _ in signals.forever() {
                    tracing::info!(dir = %reloader.dir().display(), "SIGHUP: reloading policies");
                    // Errors are logged and reported by `reload`.
                    let _ = reloader.reload();
                }
            })?;
        Ok(ReloadTrigger {
            stop: Some(Box::new(move || handle.close())),
            thread: Some(thread),
        })
    }

    /// Reload when anything in the directory changes, once the changes have
    /// been quiet for `debounce` (200 ms suits an editor's save or a config
    /// map update), until the returned trigger is stopped or dropped.
    ///
    /// Every change in the directory counts, not only `*.toml` files: a
    /// Kubernetes config map updates its files by swapping a `..data`
    /// symlink. A reload that changes nothing swaps nothing. Changes keep
    /// postponing the reload for at most ten `debounce` periods, so a file
    /// written continuously cannot hold it off forever. The directory itself
    /// is watched: replacing the directory (rather than its contents) is
    /// not seen.
    pub fn watch(&self, debounce: Duration) -> io::Result<ReloadTrigger> {
        use notify::{RecursiveMode, Watcher};

        let (tx, rx) = mpsc::channel::<Wake>();
        let fs_tx = tx.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let wake = match event {
                    // Our own reads must not trigger another reload.
                    Ok(e) if e.kind.is_access() => return,
                    Ok(_) => Wake::Changed,
                    Err(e) => Wake::Trouble(e.to_string()),
                };
                let _ = fs_tx.send(wake);
            })
            .map_err(io::Error::other)?;
        watcher
            .watch(self.dir(), RecursiveMode::NonRecursive)
            .map_err(io::Error::other)?;
        let reloader = self.clone();
        let thread = thread::Builder::new()
            .name("policy-watch".to_owned())
            .spawn(move || debounce_loop(&rx, &reloader, debounce))?;
        Ok(ReloadTrigger {
            stop: Some(Box::new(move || {
                drop(watcher);
                let _ = tx.send(Wake::Stop);
            })),
            thread: Some(thread),
        })
    }
}

/// What wakes the watch thread.
enum Wake {
    Changed,
    /// The watcher reported an error (e.g. its queue overflowed): changes may
    /// have been missed, so reload to be safe.
    Trouble(String),
    Stop,
}

fn debounce_loop(rx: &mpsc::Receiver<Wake>, reloader: &PolicyReloader, debounce: Duration) {
    let dir = reloader.dir().display();
    let note = |wake: &Wake| {
        if let Wake::Trouble(e) = wake {
            tracing::warn!(%dir, error = %e, "policy directory watch error; reloading");
        }
    };
    loop {
        match rx.recv() {
            Ok(Wake::Stop) | Err(_) => return,
            Ok(wake) => note(&wake),
        }
        let latest = Instant::now() + debounce.saturating_mul(10);
        loop {
            match rx.recv_timeout(debounce) {
                Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(wake) => {
                    note(&wake);
                    if Instant::now() >= latest {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
        tracing::info!(%dir, "policy directory changed: reloading");
        // Errors are logged and reported by `reload`.
        let _ = reloader.reload();
    }
}

/// A background source of reloads (SIGHUP or file changes). Dropping it
/// stops it and waits for its thread, including a reload in progress.
#[must_use = "dropping the trigger stops it"]
pub struct ReloadTrigger {
    stop: Option<Box<dyn FnOnce() + Send>>,
    thread: Option<JoinHandle<()>>,
}

impl ReloadTrigger {
    /// Stop triggering reloads and wait for the background thread to end.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        if let Some(thread) = self.thread.take() {
            // A panic in the thread has already been reported by the panic
            // hook; there is nothing to add here.
            let _ = thread.join();
        }
    }
}

impl Drop for ReloadTrigger {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for ReloadTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadTrigger")
            .field("running", &self.thread.is_some())
            .finish()
    }
}
