//! Compliance profiles: a named set of controls (Salesforce's AppExchange
//! requirements, RFC 9700, the refresh-token part of FAPI 2.0) checked
//! against a policy set's effective knobs, per client and for `[defaults]`,
//! with the file and line that decided each (README "Compliance profiles").
//!
//! A profile is data: a table of [`Control`]s in `profiles.rs`, each one
//! entry with its own small check function and its own test. The check
//! sees only a scope's effective [`ClientPolicy`]; everything else (scopes,
//! `unknown_clients`, evidence and provenance) is done once here.

mod profiles;
mod report;

use std::fmt;

use serde::Serialize;

use crate::policy::{ClientPolicy, PolicySet, UnknownClients};

pub use report::{ControlRow, Evidence, ProfileReport, ScopeReport, StatusChange};

/// A named set of controls.
#[derive(Debug)]
#[non_exhaustive]
pub struct Profile {
    /// The name used on the command line (`salesforce-appexchange`).
    pub name: &'static str,
    /// What the profile is, in one line.
    pub title: &'static str,
    /// The controls, in the order reports list them.
    pub controls: &'static [Control],
}

impl Profile {
    /// Every shipped profile.
    pub fn all() -> &'static [Profile] {
        profiles::ALL
    }

    /// The shipped profile called `name`.
    pub fn named(name: &str) -> Result<&'static Profile, UnknownProfile> {
        Profile::all()
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| UnknownProfile {
                name: name.to_owned(),
            })
    }
}

/// One requirement of a profile.
#[non_exhaustive]
pub struct Control {
    /// Short stable id, unique in its profile (`pkce-s256`).
    pub id: &'static str,
    /// What it checks, in one line.
    pub title: &'static str,
    /// Where the requirement comes from, in one line.
    pub source: &'static str,
    /// Whether a failure fails the profile or only warns.
    pub level: ControlLevel,
    /// The knobs that decide it, shown as evidence with their origins.
    pub knobs: &'static [&'static str],
    check: fn(&ClientPolicy) -> Finding,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("id", &self.id)
            .field("level", &self.level)
            .field("knobs", &self.knobs)
            .finish_non_exhaustive()
    }
}

/// How much a control weighs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlLevel {
    /// Not met fails the profile.
    Required,
    /// Not met is a warning: worth knowing, not a failure.
    Advisory,
}

/// The outcome of one control for one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlStatus {
    /// The effective knobs satisfy it.
    Met,
    /// A required control the effective knobs do not satisfy.
    NotMet,
    /// An advisory control the effective knobs do not satisfy.
    Warning,
    /// It does not apply to this scope, or refresh-guard does not decide it.
    NotApplicable,
}

impl ControlStatus {
    /// `met`, `not_met`, `warning`, `not_applicable`: the JSON names.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlStatus::Met => "met",
            ControlStatus::NotMet => "not_met",
            ControlStatus::Warning => "warning",
            ControlStatus::NotApplicable => "not_applicable",
        }
    }

    /// How a text report shows it: loud when it fails the profile.
    fn shown(self) -> &'static str {
        match self {
            ControlStatus::Met => "met",
            ControlStatus::NotMet => "NOT MET",
            ControlStatus::Warning => "warning",
            ControlStatus::NotApplicable => "n/a",
        }
    }
}

impl fmt::Display for ControlStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a control's check found, before its level is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Finding {
    /// `None`: not applicable.
    met: Option<bool>,
    /// Why, when the knob values alone do not say it.
    note: Option<String>,
}

impl Finding {
    fn met() -> Finding {
        Finding {
            met: Some(true),
            note: None,
        }
    }

    fn met_because(why: &str) -> Finding {
        Finding {
            met: Some(true),
            note: Some(why.to_owned()),
        }
    }

    fn not_met(why: impl Into<String>) -> Finding {
        Finding {
            met: Some(false),
            note: Some(why.into()),
        }
    }

    fn not_applicable(why: &str) -> Finding {
        Finding {
            met: None,
            note: Some(why.to_owned()),
        }
    }

    fn status(&self, level: ControlLevel) -> ControlStatus {
        match (self.met, level) {
            (None, _) => ControlStatus::NotApplicable,
            (Some(true), _) => ControlStatus::Met,
            (Some(false), ControlLevel::Required) => ControlStatus::NotMet,
            (Some(false), ControlLevel::Advisory) => ControlStatus::Warning,
        }
    }
}

/// A profile name that is not shipped; its `Display` lists those that are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownProfile {
    /// The name asked for.
    pub name: String,
}

impl fmt::Display for UnknownProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Profile::all().iter().map(|p| p.name).collect();
        write!(
            f,
            "unknown profile `{}`; profiles are {}",
            self.name,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownProfile {}

impl PolicySet {
    /// Check every control of `profile` against `[defaults]` and every
    /// listed client, with each deciding knob's value and origin.
    ///
    /// `[defaults]` is checked as the policy of every client id the set
    /// does not list; under `unknown_clients = "refuse"` it governs nobody,
    /// so its controls are not applicable.
    pub fn check_profile(&self, profile: &Profile) -> ProfileReport {
        let refuse = self.unknown_clients() == UnknownClients::Refuse;
        let mut scopes = Vec::with_capacity(1 + self.clients().len());
        scopes.push(report::scope(self, profile, None, self.defaults(), refuse));
        for (id, policy) in self.clients() {
            scopes.push(report::scope(self, profile, Some(id), policy, false));
        }
        ProfileReport::new(self, profile, scopes)
    }
}
