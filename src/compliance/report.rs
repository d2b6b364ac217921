//! A profile's verdict on a policy set: per scope, per control, with the
//! knob values and origins that decided it; rendered as text (`Display`) or
//! serialised (its serde form is the JSON documented in README
//! "Compliance profiles"); and compared with an earlier one.

use std::fmt::{self, Write as _};

use serde::Serialize;

use super::{ControlLevel, ControlStatus, Profile};
use crate::policy::{ClientPolicy, Location, Origin, PolicySet, UnknownClients, toml_key};

/// A profile checked against a policy set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ProfileReport {
    /// The profile's name.
    pub profile: &'static str,
    /// The profile's title.
    pub title: &'static str,
    /// The version of the set checked.
    pub policy_version: String,
    /// The set's `unknown_clients`: whether `[defaults]` governs anyone.
    pub unknown_clients: Evidence,
    /// True when no required control is unmet in any scope (warnings and
    /// not-applicable controls do not count against it).
    pub met: bool,
    /// How many (scope, control) pairs are not met.
    pub not_met: usize,
    /// How many (scope, control) pairs are warnings.
    pub warnings: usize,
    /// `[defaults]` first, then every listed client by id.
    pub scopes: Vec<ScopeReport>,
    #[serde(skip)]
    refuses: bool,
}

/// One scope's controls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ScopeReport {
    /// `defaults` or `clients.<client_id>` (the id quoted where TOML needs).
    pub scope: String,
    /// The client id; `None` for `[defaults]`.
    pub client: Option<String>,
    /// Where its table is, when a file defined it.
    pub table: Option<Location>,
    /// False only for `[defaults]` under `unknown_clients = "refuse"`.
    pub governs: bool,
    /// How many of its controls are not met.
    pub not_met: usize,
    /// One row per control of the profile, in the profile's order.
    pub controls: Vec<ControlRow>,
}

/// One control for one scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ControlRow {
    /// The control's id.
    pub control: &'static str,
    /// What it checks.
    pub title: &'static str,
    /// Where the requirement comes from.
    pub source: &'static str,
    /// Whether failing it fails the profile.
    pub level: ControlLevel,
    /// The outcome.
    pub status: ControlStatus,
    /// The knobs that decided it, with values and origins.
    pub evidence: Vec<Evidence>,
    /// Why, when the values alone do not say it.
    pub note: Option<String>,
}

/// A knob's effective value and where it was set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Evidence {
    /// The knob.
    pub knob: &'static str,
    /// Its effective value as policy files write it (a client secret's
    /// hash is shown as `set`, never its digits).
    pub value: String,
    /// Where it was set.
    pub origin: Origin,
}

/// Check one scope. `refused`: `[defaults]` when the set refuses unlisted
/// clients, so it governs nobody.
pub(super) fn scope(
    set: &PolicySet,
    profile: &Profile,
    client: Option<&str>,
    policy: &ClientPolicy,
    refused: bool,
) -> ScopeReport {
    let provenance = set.provenance();
    let origins = match client {
        Some(id) => provenance.client(id),
        None => Some(provenance.defaults()),
    };
    let values = policy.knobs();
    let evidence = |knob: &'static str| Evidence {
        knob,
        value: values
            .iter()
            .find(|(k, _)| *k == knob)
            .map_or_else(String::new, |(_, v)| v.clone()),
        origin: origins
            .and_then(|o| o.knob(knob))
            .cloned()
            .unwrap_or(Origin::Default),
    };
    let controls: Vec<ControlRow> = profile
        .controls
        .iter()
        .map(|c| {
            let (status, evidence, note) = if refused {
                (
                    ControlStatus::NotApplicable,
                    vec![unknown_clients(set)],
                    Some("[defaults] governs no client: unlisted clients are refused".to_owned()),
                )
            } else {
                let finding = (c.check)(policy);
                let evidence = c.knobs.iter().map(|k| evidence(k)).collect();
                (finding.status(c.level), evidence, finding.note)
            };
            ControlRow {
                control: c.id,
                title: c.title,
                source: c.source,
                level: c.level,
                status,
                evidence,
                note,
            }
        })
        .collect();
    ScopeReport {
        scope: client.map_or_else(
            || "defaults".to_owned(),
            |id| format!("clients.{}", toml_key(id)),
        ),
        client: client.map(str::to_owned),
        table: origins.and_then(|o| o.table()).cloned(),
        governs: !refused,
        not_met: controls
            .iter()
            .filter(|r| r.status == ControlStatus::NotMet)
            .count(),
        controls,
    }
}

fn unknown_clients(set: &PolicySet) -> Evidence {
    Evidence {
        knob: "unknown_clients",
        value: set.unknown_clients().to_string(),
        origin: set.provenance().unknown_clients().clone(),
    }
}

impl ProfileReport {
    pub(super) fn new(
        set: &PolicySet,
        profile: &Profile,
        scopes: Vec<ScopeReport>,
    ) -> ProfileReport {
        let rows = || scopes.iter().flat_map(|s| &s.controls);
        let not_met = rows().filter(|r| r.status == ControlStatus::NotMet).count();
        let warnings = rows()
            .filter(|r| r.status == ControlStatus::Warning)
            .count();
        ProfileReport {
            profile: profile.name,
            title: profile.title,
            policy_version: set.version().to_string(),
            unknown_clients: unknown_clients(set),
            met: not_met == 0,
            not_met,
            warnings,
            scopes,
            refuses: set.unknown_clients() == UnknownClients::Refuse,
        }
    }

    /// The scope governing `client` (`None`: `[defaults]`): its own, else
    /// `[defaults]` unless unlisted clients are refused.
    fn governing(&self, client: Option<&str>) -> Option<&ScopeReport> {
        let own = self.scopes.iter().find(|s| s.client.as_deref() == client);
        match (own, client) {
            (Some(s), _) => Some(s),
            (None, Some(_)) if !self.refuses => self.scopes.first(),
            (None, _) => None,
        }
    }

    /// Every control whose status differs between `before` (a report of the
    /// same profile on an earlier set) and this one, scope by scope.
    ///
    /// Like `policy diff`, a client is compared by the scope that governs it
    /// in each set: one that gains a table of its own is compared with the
    /// `[defaults]` it was under, and a client refused in one set (not
    /// listed, `unknown_clients = "refuse"`) has no status there.
    pub fn changes_since(&self, before: &ProfileReport) -> Vec<StatusChange> {
        let mut clients: Vec<Option<&str>> = before
            .scopes
            .iter()
            .chain(&self.scopes)
            .map(|s| s.client.as_deref())
            .collect();
        clients.sort_unstable();
        clients.dedup();
        let mut out = Vec::new();
        for client in clients {
            let (old, new) = (before.governing(client), self.governing(client));
            let Some(rows) = new.or(old).map(|s| &s.controls) else {
                continue;
            };
            let status = |s: Option<&ScopeReport>, id: &str| {
                s.and_then(|s| s.controls.iter().find(|r| r.control == id))
                    .map(|r| r.status)
            };
            for row in rows {
                let (b, a) = (status(old, row.control), status(new, row.control));
                if a != b {
                    out.push(StatusChange {
                        scope: client.map_or_else(
                            || "defaults".to_owned(),
                            |id| format!("clients.{}", toml_key(id)),
                        ),
                        control: row.control,
                        before: b,
                        after: a,
                    });
                }
            }
        }
        out
    }
}

/// One control of one scope whose status changed between two reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StatusChange {
    /// `defaults` or `clients.<client_id>`.
    pub scope: String,
    /// The control's id.
    pub control: &'static str,
    /// The status before; `None` when the client was refused.
    pub before: Option<ControlStatus>,
    /// The status after; `None` when the client is refused.
    pub after: Option<ControlStatus>,
}

impl fmt::Display for StatusChange {
    /// `clients.spa ip-allowlist: not_met -> met`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |s: Option<ControlStatus>| s.map_or("refused", ControlStatus::as_str);
        write!(
            f,
            "{} {}: {} -> {}",
            self.scope,
            self.control,
            shown(self.before),
            shown(self.after)
        )
    }
}

impl fmt::Display for ProfileReport {
    /// The report an auditor reads: a verdict, then each scope's controls
    /// with their evidence, then each control's source.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        writeln!(f, "profile {}: {}", self.profile, self.title)?;
        let u = &self.unknown_clients;
        let governs = if self.refuses {
            "[defaults] governs no client, unlisted clients are refused"
        } else {
            "[defaults] governs every client not listed"
        };
        writeln!(
            f,
            "policy version {}; unknown_clients = {} ({}): {governs}",
            self.policy_version, u.value, u.origin
        )?;
        let warnings = plural(self.warnings, "warning", "warnings");
        if self.met {
            writeln!(f, "MET: every required control is met; {warnings}")?;
        } else {
            let n = plural(self.not_met, "control", "controls");
            writeln!(f, "NOT MET: {n} not met; {warnings}")?;
        }
        let width = self
            .scopes
            .iter()
            .flat_map(|s| &s.controls)
            .map(|r| r.control.len())
            .max()
            .unwrap_or(0);
        for s in &self.scopes {
            let name = match &s.client {
                Some(_) => format!("[{}]", s.scope),
                None => "[defaults]".to_owned(),
            };
            match &s.table {
                Some(at) => writeln!(f, "\n{name}  {at}")?,
                None => writeln!(f, "\n{name}")?,
            }
            if !s.governs {
                // Every row says the same; the JSON keeps them all.
                writeln!(
                    f,
                    "  {:<7}  every control: it governs no client, unknown_clients = {}  ({})",
                    ControlStatus::NotApplicable.shown(),
                    u.value,
                    u.origin
                )?;
                continue;
            }
            for r in &s.controls {
                let mut lines: Vec<String> = r
                    .evidence
                    .iter()
                    .map(|e| format!("{} = {}  ({})", e.knob, e.value, e.origin))
                    .collect();
                lines.extend(r.note.clone());
                let mut prefix = format!("  {:<7}  {:<width$}", r.status.shown(), r.control);
                if lines.is_empty() {
                    writeln!(f, "{}", prefix.trim_end())?;
                }
                for line in lines {
                    writeln!(f, "{prefix}  {line}")?;
                    prefix.clear();
                    let _ = write!(prefix, "  {:<7}  {:<width$}", "", "");
                }
            }
        }
        writeln!(f, "\ncontrols:")?;
        if let Some(first) = self.scopes.first() {
            for r in &first.controls {
                let advisory = match r.level {
                    ControlLevel::Required => "",
                    ControlLevel::Advisory => " (advisory: a warning, not a failure)",
                };
                writeln!(f, "  {:<width$}  {}{advisory}", r.control, r.title)?;
                writeln!(f, "  {:<width$}  source: {}", "", r.source)?;
            }
        }
        Ok(())
    }
}
