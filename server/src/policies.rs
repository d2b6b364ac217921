//! The policy directory, through the crate's policy-file loader.

use std::path::Path;

use refresh_guard::PolicySet;

/// Load every `*.toml` in `dir` as one policy set; on failure, every
/// problem, each naming file, line:column and key.
pub(crate) fn load_dir(dir: &Path) -> Result<PolicySet, Vec<String>> {
    PolicySet::load_dir(dir).map_err(|e| e.to_strings())
}
