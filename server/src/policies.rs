//! The policy directory, through the crate's policy-file loader.

use std::path::Path;

use refresh_guard::{LoadErrors, PolicySet, Profile, ProfileReport};

/// Load every `*.toml` in `dir` as one policy set; on failure, every
/// problem, each naming file, line:column and key.
pub(crate) fn load_dir(dir: &Path) -> Result<PolicySet, LoadErrors> {
    PolicySet::load_dir(dir)
}

/// The report of each profile in `required` that `set` does not meet;
/// empty when it meets them all.
pub(crate) fn unmet(set: &PolicySet, required: &[&'static Profile]) -> Vec<ProfileReport> {
    required
        .iter()
        .map(|p| set.check_profile(p))
        .filter(|r| !r.met)
        .collect()
}
