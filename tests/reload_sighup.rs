//! Reload on SIGHUP (issue 3, item 4). A binary of its own: the signal
//! reaches the whole process, and until a handler is installed its default
//! action ends it.
#![cfg(all(feature = "watch", unix))]

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use refresh_guard::{Engine, PolicyReloader, PolicySet};
use signal_hook::consts::SIGHUP;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn sighup_reloads_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[defaults]\n");
    let engine = Arc::new(Engine::builder().build().unwrap());
    let reloader = PolicyReloader::new(engine.clone(), dir.path());
    reloader.reload().unwrap();
    // Installed before any signal is raised: from here SIGHUP is handled.
    let trigger = reloader.reload_on_sighup().unwrap();

    for idle in ["1d", "2d"] {
        write(
            dir.path(),
            "a.toml",
            &format!("[clients.app]\nidle_ttl = \"{idle}\"\n"),
        );
        let want = PolicySet::load_dir(dir.path()).unwrap().version();
        assert_ne!(engine.policies().version(), want);
        signal_hook::low_level::raise(SIGHUP).unwrap();
        let start = Instant::now();
        while engine.policies().version() != want {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "SIGHUP did not reload"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    trigger.stop();
}
