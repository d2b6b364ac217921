//! Live policy reload (feature `watch`): a policy directory put in force on
//! demand, on SIGHUP and when its files change.
//!
//! A reload reads the whole directory into a new [`PolicySet`] and swaps it
//! in with [`Engine::swap_policies`], so every redemption is decided wholly
//! under the old set or wholly under the new one. A directory that fails to
//! load changes nothing: the set in force keeps serving, every problem is
//! logged through `tracing` and reported as a `policy_reload_failed` event.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::engine::Engine;
use crate::policy::{LoadErrors, PolicySet, PolicyVersion};

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
        PolicyReloader {
            inner: Arc::new(Inner {
                engine,
                dir: dir.into(),
                lock: Mutex::new(()),
            }),
        }
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
    /// no `policy_swapped` event). On failure the set in force stays, the
    /// problems are logged and reported to the engine's event sink, and
    /// returned.
    pub fn reload(&self) -> Result<PolicyVersion, LoadErrors> {
        let inner = &*self.inner;
        let _one_at_a_time = inner.lock.lock();
        let dir = inner.dir.display();
        match PolicySet::load_dir(&inner.dir) {
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
            Err(errors) => {
                let in_force = inner.engine.policies().version();
                for e in &errors {
                    tracing::error!(%dir, problem = %e, "policy file problem");
                }
                tracing::error!(
                    %dir,
                    problems = errors.len(),
                    version = %in_force,
                    "policy reload failed; the set in force keeps serving"
                );
                inner.engine.report_reload_failure(errors.to_strings());
                Err(errors)
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
