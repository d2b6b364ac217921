//! Where each effective knob of a policy set came from: the file and line
//! that set it, `[defaults]` where a client inherits, or the built-in
//! default.
//!
//! Kept beside the set, never inside its version hash: moving a line,
//! splitting a file or adding a comment changes the evidence an auditor
//! reads (README "Compliance profiles"), not a single decision, so the
//! version stays the same (README "Policy files").

use std::collections::HashMap;
use std::fmt;

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::KNOB_NAMES;

/// A place in a policy file: the path as the loader was given it and the
/// 1-based line.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Location {
    /// The file, as shown in load errors (`policies/mobile.toml`).
    pub file: String,
    /// Line, from 1.
    pub line: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Where one effective value comes from.
///
/// `None` locations are values set through [`PolicySetBuilder`](super::PolicySetBuilder)
/// in code rather than in a file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Written nowhere: the built-in default (README "Policy knobs").
    Default,
    /// Written in the scope's own table.
    Set(Option<Location>),
    /// A client's knob its table does not write, taken from `[defaults]`.
    Inherited(Option<Location>),
}

impl Origin {
    /// `default`, `set` or `inherited`: the stable name used in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::Set(_) => "set",
            Origin::Inherited(_) => "inherited",
        }
    }

    /// The file and line, when a file set the value.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Origin::Default => None,
            Origin::Set(at) | Origin::Inherited(at) => at.as_ref(),
        }
    }

    /// The same value seen from a client that inherits it from `[defaults]`.
    pub(crate) fn inherited(&self) -> Origin {
        match self {
            Origin::Set(at) => Origin::Inherited(at.clone()),
            other => other.clone(),
        }
    }
}

impl fmt::Display for Origin {
    /// `policies/a.toml:12`, `[defaults] at policies/a.toml:5`, `default`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::Set(Some(at)) => write!(f, "{at}"),
            Origin::Set(None) => f.write_str("set in code"),
            Origin::Inherited(Some(at)) => write!(f, "[defaults] at {at}"),
            Origin::Inherited(None) => f.write_str("[defaults], set in code"),
        }
    }
}

impl Serialize for Origin {
    /// `{"kind": "set", "file": "policies/a.toml", "line": 12}`; `file` and
    /// `line` are absent for built-in defaults and values set in code.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let at = self.location();
        let mut m = s.serialize_map(Some(if at.is_some() { 3 } else { 1 }))?;
        m.serialize_entry("kind", self.kind())?;
        if let Some(at) = at {
            m.serialize_entry("file", &at.file)?;
            m.serialize_entry("line", &at.line)?;
        }
        m.end()
    }
}

/// The origins of one scope's knobs (`[defaults]` or one client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeProvenance {
    pub(crate) table: Option<Location>,
    /// In [`KNOB_NAMES`] order.
    pub(crate) knobs: Vec<Origin>,
}

impl ScopeProvenance {
    /// Where the scope's table header is, when it came from a file.
    pub fn table(&self) -> Option<&Location> {
        self.table.as_ref()
    }

    /// Where a knob's effective value comes from; `None` for a name that is
    /// not a knob.
    pub fn knob(&self, name: &str) -> Option<&Origin> {
        let i = KNOB_NAMES.iter().position(|k| *k == name)?;
        self.knobs.get(i)
    }

    /// Every knob with its origin, in the README's "Policy knobs" order.
    pub fn knobs(&self) -> impl Iterator<Item = (&'static str, &Origin)> {
        KNOB_NAMES.iter().copied().zip(self.knobs.iter())
    }
}

/// Where every knob of a [`PolicySet`](super::PolicySet) came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    pub(crate) defaults: ScopeProvenance,
    pub(crate) clients: HashMap<Box<str>, ScopeProvenance>,
    pub(crate) unknown_clients: Origin,
}

impl Provenance {
    /// `[defaults]`.
    pub fn defaults(&self) -> &ScopeProvenance {
        &self.defaults
    }

    /// A listed client; `None` for a client the set does not list.
    pub fn client(&self, id: &str) -> Option<&ScopeProvenance> {
        self.clients.get(id)
    }

    /// Where `unknown_clients` was set.
    pub fn unknown_clients(&self) -> &Origin {
        &self.unknown_clients
    }
}

/// Where a file set things, as the loader hands it to the builder: keyed by
/// the builder's scope name (`defaults`, `clients.<id>`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Locations {
    pub(crate) knobs: HashMap<(String, &'static str), Location>,
    pub(crate) tables: HashMap<String, Location>,
    pub(crate) unknown_clients: Option<Location>,
}

impl Locations {
    fn knob(&self, scope: &str, knob: &'static str) -> Option<Location> {
        self.knobs.get(&(scope.to_owned(), knob)).cloned()
    }

    /// The origins of `[defaults]`, given which knobs it sets.
    pub(crate) fn defaults(&self, set: &[bool]) -> ScopeProvenance {
        let knobs = KNOB_NAMES
            .iter()
            .zip(set)
            .map(|(k, set)| match set {
                true => Origin::Set(self.knob("defaults", k)),
                false => Origin::Default,
            })
            .collect();
        ScopeProvenance {
            table: self.tables.get("defaults").cloned(),
            knobs,
        }
    }

    /// The origins of a client's knobs, given which its table sets.
    pub(crate) fn client(
        &self,
        scope: &str,
        set: &[bool],
        defaults: &ScopeProvenance,
    ) -> ScopeProvenance {
        let knobs = KNOB_NAMES
            .iter()
            .zip(set)
            .zip(&defaults.knobs)
            .map(|((k, set), inherited)| match set {
                true => Origin::Set(self.knob(scope, k)),
                false => inherited.inherited(),
            })
            .collect();
        ScopeProvenance {
            table: self.tables.get(scope).cloned(),
            knobs,
        }
    }
}
