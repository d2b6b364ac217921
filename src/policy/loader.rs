//! Policy files: every `*.toml` directly inside a directory, together one
//! [`PolicySet`].
//!
//! Files are read into the `toml` crate's spanned document
//! ([`toml::de::DeTable`]) rather than through a derived `Deserialize`: a
//! derived deserializer stops at the first problem of a file, and an operator
//! fixing a policy wants every problem at once, each with its file, line,
//! column and key. Values become [`PolicyOverrides`]; their ranges are judged
//! by [`PolicySetBuilder::build`] (through [`PolicyOverrides::problems`]), so
//! the rules live in one place, and its findings are mapped back to the key
//! that set the value.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::provenance::{Location, Locations};
use super::{
    AccessTokenFormat, IpCheck, IpRange, KNOB_NAMES, OnReuse, Pkce, PolicyOverrides, PolicySet,
    PolicySetBuilder, Rotation, UnknownClients,
};
use crate::dpop::Dpop;
use crate::error::Error;

/// A 1-based line and column (in characters) in a policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Line, from 1.
    pub line: u32,
    /// Column in characters, from 1.
    pub column: u32,
}

/// One problem in a policy directory, located as precisely as it can be.
///
/// Displays as `path:line:column: key: message`, the form editors and CI
/// annotations jump to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadError {
    /// The file at fault, or the directory for problems with the directory.
    pub path: PathBuf,
    /// Where in the file, when the problem is at a place.
    pub position: Option<Position>,
    /// The dotted key at fault (`clients.mobile-app.grace_period`), if any.
    pub key: Option<String>,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        if let Some(k) = &self.key {
            write!(f, ": {k}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for LoadError {}

/// Every problem that kept a policy directory from loading; never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadErrors(Vec<LoadError>);

impl LoadErrors {
    /// The problems, in file order, then position order.
    pub fn errors(&self) -> &[LoadError] {
        &self.0
    }

    /// How many problems there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a load that fails has at least one problem.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems as display lines, for events and admin APIs.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// The problems, by value.
    pub fn into_vec(self) -> Vec<LoadError> {
        self.0
    }
}

impl fmt::Display for LoadErrors {
    /// One problem per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

impl From<LoadErrors> for Error {
    fn from(e: LoadErrors) -> Error {
        Error::PolicyFiles { errors: e.0 }
    }
}

impl<'a> IntoIterator for &'a LoadErrors {
    type Item = &'a LoadError;
    type IntoIter = std::slice::Iter<'a, LoadError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl PolicySet {
    /// Load every `*.toml` directly inside `dir` as one set.
    ///
    /// Files are read in name order (so errors and "defined twice" blame
    /// come out the same every time); names starting with `.` (editor lock
    /// files) and subdirectories are skipped. Either the whole set loads or
    /// every problem is returned: of a file with a syntax error, that error
    /// (what follows it cannot be read with confidence); of the others,
    /// every one.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, LoadErrors> {
        let dir_error = |message: String| {
            LoadErrors(vec![LoadError {
                path: dir.to_owned(),
                position: None,
                key: None,
                message,
            }])
        };
        let entries =
            std::fs::read_dir(dir).map_err(|e| dir_error(format!("cannot read directory: {e}")))?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| dir_error(format!("cannot read directory: {e}")))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".toml") {
                continue;
            }
            // Follows symlinks: config maps mount files as links.
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            paths.push(path);
        }
        if paths.is_empty() {
            return Err(dir_error(
                "no *.toml files in this directory; a policy set needs at least one".to_owned(),
            ));
        }
        paths.sort();

        let mut unreadable = Vec::new();
        let mut texts = Vec::new();
        for path in paths {
            match std::fs::read_to_string(&path) {
                Ok(text) => texts.push((path, text)),
                Err(e) => unreadable.push(LoadError {
                    path,
                    position: None,
                    key: None,
                    message: format!("cannot read file: {e}"),
                }),
            }
        }
        let files: Vec<(&Path, &str)> = texts
            .iter()
            .map(|(p, t)| (p.as_path(), t.as_str()))
            .collect();
        match (PolicySet::from_toml(&files), unreadable.is_empty()) {
            (Ok(set), true) => Ok(set),
            (Ok(_), false) => Err(LoadErrors(unreadable)),
            (Err(LoadErrors(mut errors)), _) => {
                // Keep name order: put unreadable files among the others.
                errors.extend(unreadable);
                errors.sort_by(|a, b| a.path.cmp(&b.path));
                Err(LoadErrors(errors))
            }
        }
    }

    /// Build a set from policy file contents: the pure core of
    /// [`load_dir`](Self::load_dir), for tests, fuzzing and embedders that
    /// keep policies elsewhere.
    ///
    /// `files` are (path as shown in messages, contents), in reading order;
    /// a client or `[defaults]` defined twice is blamed on the later file.
    pub fn from_toml(files: &[(&Path, &str)]) -> Result<PolicySet, LoadErrors> {
        let mut cx = Loader::new(files);
        for (index, (_, text)) in files.iter().enumerate() {
            cx.file(index, text);
        }
        cx.finish()
    }
}

/// Where a key or value is: file index and byte span start.
#[derive(Clone, Copy, Debug)]
struct At {
    file: usize,
    offset: usize,
}

/// A `[defaults]` or `[clients.<id>]` table: as the builder names it in
/// its findings, and as shown to the operator (ids quoted where TOML needs).
struct Scope {
    builder: String,
    shown: String,
}

/// A problem before it is given its line and column.
struct Problem {
    at: Option<At>,
    /// File index for problems without a place.
    file: usize,
    key: Option<String>,
    message: String,
}

struct Loader<'f> {
    files: &'f [(&'f Path, &'f str)],
    problems: Vec<Problem>,
    defaults: Option<(At, PolicyOverrides)>,
    clients: Vec<(String, At, PolicyOverrides)>,
    client_index: HashMap<String, At>,
    /// Where each (builder scope, knob) was set, and the scope as shown,
    /// to place the builder's findings.
    knob_at: HashMap<(String, &'static str), (At, String)>,
    /// Where each builder scope was defined, and the scope as shown.
    scope_at: HashMap<String, (At, String)>,
    /// The set-wide `unknown_clients` and where it was set.
    unknown_clients: Option<(At, Option<UnknownClients>)>,
}

impl<'f> Loader<'f> {
    fn new(files: &'f [(&'f Path, &'f str)]) -> Loader<'f> {
        Loader {
            files,
            problems: Vec::new(),
            defaults: None,
            clients: Vec::new(),
            client_index: HashMap::new(),
            knob_at: HashMap::new(),
            scope_at: HashMap::new(),
            unknown_clients: None,
        }
    }

    /// File and line of a place, for provenance.
    fn location(&self, at: At) -> Location {
        let (path, text) = self.files[at.file];
        Location {
            file: path.display().to_string(),
            line: position(text, at.offset).line,
        }
    }

    /// `path:line:column` of a place, for messages that point elsewhere.
    fn describe(&self, at: At) -> String {
        let (path, text) = self.files[at.file];
        let p = position(text, at.offset);
        format!("{}:{}:{}", path.display(), p.line, p.column)
    }

    fn problem(&mut self, at: At, key: Option<String>, message: String) {
        self.problems.push(Problem {
            at: Some(at),
            file: at.file,
            key,
            message,
        });
    }

    fn file(&mut self, file: usize, text: &str) {
        let at = |span: Range<usize>| At {
            file,
            offset: span.start,
        };
        // Only a file's first syntax error: what follows it cannot be read
        // with confidence, and later ones are often its echoes. Other files
        // are still judged in full.
        let doc = match DeTable::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                self.problems.push(Problem {
                    at: Some(at(e.span().unwrap_or(0..0))),
                    file,
                    key: None,
                    message: format!("syntax error: {}", e.message().trim_end()),
                });
                return;
            }
        };
        for (key, value) in doc.get_ref().iter() {
            let name: &str = key.get_ref();
            match name {
                "defaults" => {
                    let Some(table) = self.table(value, file, "defaults", "[defaults]") else {
                        continue;
                    };
                    let here = at(key.span());
                    if let Some((first, _)) = self.defaults {
                        self.problems.push(Problem {
                            at: Some(here),
                            file,
                            key: Some("defaults".to_owned()),
                            message: format!(
                                "also defined in {}; [defaults] may be set in one file only",
                                self.describe(first)
                            ),
                        });
                        continue;
                    }
                    let scope = Scope {
                        builder: "defaults".to_owned(),
                        shown: "defaults".to_owned(),
                    };
                    let o = self.knobs(file, &scope, table);
                    self.scope_at.insert(scope.builder, (here, scope.shown));
                    self.defaults = Some((here, o));
                }
                "clients" => {
                    let Some(table) =
                        self.table(value, file, "clients", "tables [clients.<client_id>]")
                    else {
                        continue;
                    };
                    for (id, value) in table.iter() {
                        let shown = format!("clients.{}", toml_key(id.get_ref()));
                        let Some(knobs) = self.table(value, file, &shown, "a table of knobs")
                        else {
                            continue;
                        };
                        let here = at(id.span());
                        let id: &str = id.get_ref();
                        if let Some(&first) = self.client_index.get(id) {
                            self.problem(
                                here,
                                Some(shown),
                                format!(
                                    "also defined in {}; a client may be defined in one file only",
                                    self.describe(first)
                                ),
                            );
                            continue;
                        }
                        let scope = Scope {
                            builder: format!("clients.{id}"),
                            shown,
                        };
                        let o = self.knobs(file, &scope, knobs);
                        self.scope_at.insert(scope.builder, (here, scope.shown));
                        self.client_index.insert(id.to_owned(), here);
                        self.clients.push((id.to_owned(), here, o));
                    }
                }
                "unknown_clients" => {
                    let here = at(key.span());
                    if let Some((first, _)) = self.unknown_clients {
                        self.problem(
                            here,
                            Some(name.to_owned()),
                            format!(
                                "also set in {}; unknown_clients may be set in one file only",
                                self.describe(first)
                            ),
                        );
                        continue;
                    }
                    let mut bad = Vec::new();
                    let u = choice(
                        value.get_ref(),
                        value.span(),
                        UnknownClients::from_name,
                        UnknownClients::NAMES,
                        &mut |span: Range<usize>, msg| bad.push((span.start, msg)),
                    );
                    for (offset, msg) in bad {
                        self.problem(At { file, offset }, Some(name.to_owned()), msg);
                    }
                    self.unknown_clients = Some((here, u));
                }
                other if !matches!(value.get_ref(), DeValue::Table(_)) => {
                    // A bare key at the top of a file: the set-wide setting
                    // misspelt, or a knob that belongs in a table.
                    let message = if KNOB_NAMES.contains(&other) {
                        "knob outside any table; put it under [defaults] or [clients.<client_id>]"
                            .to_owned()
                    } else {
                        let hint = match closest(other, &["unknown_clients"]) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => {
                                "outside tables a policy file sets only unknown_clients".to_owned()
                            }
                        };
                        format!("unknown setting `{other}`; {hint}")
                    };
                    self.problem(at(key.span()), Some(toml_key(other)), message);
                }
                other => {
                    let message = if KNOB_NAMES.contains(&other) {
                        "knob outside any table; put it under [defaults] or [clients.<client_id>]"
                            .to_owned()
                    } else {
                        let hint = match closest(other, &["defaults", "clients"]) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => "a policy file has only [defaults] and [clients.<client_id>]"
                                .to_owned(),
                        };
                        format!("unknown table `{other}`; {hint}")
                    };
                    self.problem(at(key.span()), Some(toml_key(other)), message);
                }
            }
        }
    }

    /// The value as a table, or a problem saying what was expected.
    fn table<'v, 'i>(
        &mut self,
        value: &'v Spanned<DeValue<'i>>,
        file: usize,
        key: &str,
        expected: &str,
    ) -> Option<&'v DeTable<'i>> {
        match value.get_ref() {
            DeValue::Table(t) => Some(t),
            other => {
                let at = At {
                    file,
                    offset: value.span().start,
                };
                self.problem(
                    at,
                    Some(key.to_owned()),
                    format!("expected {expected}; found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// Read one `[defaults]` or `[clients.<id>]` table.
    fn knobs(&mut self, file: usize, scope: &Scope, table: &DeTable<'_>) -> PolicyOverrides {
        let mut o = PolicyOverrides::new();
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let key_at = At {
                file,
                offset: key.span().start,
            };
            let Some(&knob) = KNOB_NAMES.iter().find(|k| **k == name) else {
                if name == "unknown_clients" {
                    self.problem(
                        key_at,
                        Some(format!("{}.{name}", scope.shown)),
                        "unknown_clients is set for the whole set, not per table: \
                         write it at the top of a file, before any [table]"
                            .to_owned(),
                    );
                    continue;
                }
                let hint = match closest(name, KNOB_NAMES) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("knobs are {}", KNOB_NAMES.join(", ")),
                };
                self.problem(
                    key_at,
                    Some(format!("{}.{}", scope.shown, toml_key(name))),
                    format!("unknown knob `{name}`; {hint}"),
                );
                continue;
            };
            let value_at = At {
                file,
                offset: value.span().start,
            };
            self.knob_at.insert(
                (scope.builder.clone(), knob),
                (value_at, scope.shown.clone()),
            );
            let mut bad = Vec::new();
            set_knob(
                &mut o,
                knob,
                value,
                &mut |span: Range<usize>, msg: String| bad.push((span.start, msg)),
            );
            for (offset, msg) in bad {
                self.problem(
                    At { file, offset },
                    Some(format!("{}.{knob}", scope.shown)),
                    msg,
                );
            }
        }
        o
    }

    fn finish(mut self) -> Result<PolicySet, LoadErrors> {
        let mut builder = PolicySetBuilder::default();
        if let Some((_, o)) = self.defaults.take() {
            builder = builder.defaults(o);
        }
        for (id, _, o) in std::mem::take(&mut self.clients) {
            builder = builder.client(id, o);
        }
        let mut locations = Locations::default();
        if let Some((at, u)) = self.unknown_clients {
            // A bad value is already a problem; the set will not load.
            if let Some(u) = u {
                builder = builder.unknown_clients(u);
            }
            locations.unknown_clients = Some(self.location(at));
        }
        for ((scope, knob), (at, _)) in &self.knob_at {
            locations
                .knobs
                .insert((scope.clone(), *knob), self.location(*at));
        }
        for (scope, (at, _)) in &self.scope_at {
            locations.tables.insert(scope.clone(), self.location(*at));
        }
        builder = builder.locations(locations);
        // Range checks live in the builder; run them even when other
        // problems were found, so one pass reports everything.
        let set = match builder.build() {
            Ok(set) => Some(set),
            Err(Error::Policy { errors }) => {
                for e in errors {
                    let knob = e
                        .knob
                        .and_then(|k| Some((k, self.knob_at.get(&(e.scope.clone(), k))?)));
                    let (at, key) = match (knob, self.scope_at.get(&e.scope)) {
                        (Some((k, (at, shown))), _) => (Some(*at), format!("{shown}.{k}")),
                        (None, Some((at, shown))) => (Some(*at), shown.clone()),
                        (None, None) => (None, e.scope.clone()),
                    };
                    self.problems.push(Problem {
                        at,
                        file: at.map_or(0, |a| a.file),
                        key: Some(key),
                        message: e.message,
                    });
                }
                None
            }
            Err(other) => {
                self.problems.push(Problem {
                    at: None,
                    file: 0,
                    key: None,
                    message: other.to_string(),
                });
                None
            }
        };
        match set {
            Some(set) if self.problems.is_empty() => Ok(set),
            _ => Err(self.locate()),
        }
    }

    /// Give each problem its path, line and column, in file then position order.
    fn locate(mut self) -> LoadErrors {
        let files = self.files;
        self.problems
            .sort_by_key(|p| (p.file, p.at.map_or(0, |a| a.offset)));
        let errors = self
            .problems
            .into_iter()
            .map(|p| {
                let (path, text) = files
                    .get(p.file)
                    .map_or((Path::new(""), ""), |(p, t)| (*p, *t));
                LoadError {
                    path: path.to_owned(),
                    position: p.at.map(|a| position(text, a.offset)),
                    key: p.key,
                    message: p.message,
                }
            })
            .collect();
        LoadErrors(errors)
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn position(text: &str, offset: usize) -> Position {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    Position {
        line: u32::try_from(line).unwrap_or(u32::MAX),
        column: u32::try_from(column).unwrap_or(u32::MAX),
    }
}

/// A key as TOML spells it: bare when it can be, else quoted, so an id
/// with dots (`app.example.com`) is not mistaken for nested keys.
pub(crate) fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Parse one knob's value into `o`, reporting problems at their spans.
fn set_knob(
    o: &mut PolicyOverrides,
    knob: &'static str,
    value: &Spanned<DeValue<'_>>,
    bad: &mut dyn FnMut(Range<usize>, String),
) {
    let span = value.span();
    let v = value.get_ref();
    match knob {
        "rotation" => o.rotation = choice(v, span, Rotation::from_name, Rotation::NAMES, bad),
        "on_reuse" => o.on_reuse = choice(v, span, OnReuse::from_name, OnReuse::NAMES, bad),
        "ip_check" => o.ip_check = choice(v, span, IpCheck::from_name, IpCheck::NAMES, bad),
        "pkce" => o.pkce = choice(v, span, Pkce::from_name, Pkce::NAMES, bad),
        "dpop" => o.dpop = choice(v, span, Dpop::from_name, Dpop::NAMES, bad),
        "access_token_format" => {
            o.access_token_format = choice(
                v,
                span,
                AccessTokenFormat::from_name,
                AccessTokenFormat::NAMES,
                bad,
            )
        }
        "grace_period" => o.grace_period = duration(v, span, false, bad).flatten(),
        "code_ttl" => o.code_ttl = duration(v, span, false, bad).flatten(),
        "access_token_ttl" => o.access_token_ttl = duration(v, span, false, bad).flatten(),
        "idle_ttl" => o.idle_ttl = duration(v, span, true, bad),
        "absolute_ttl" => o.absolute_ttl = duration(v, span, true, bad),
        "grace_max_replays" => {
            o.grace_max_replays =
                integer(v, span, u8::MAX.into(), bad).and_then(|n| u8::try_from(n).ok())
        }
        "max_families_per_subject" => {
            o.max_families_per_subject =
                integer(v, span, u32::MAX.into(), bad).and_then(|n| u32::try_from(n).ok())
        }
        "grace_same_ip" => o.grace_same_ip = boolean(v, span, bad),
        "dpop_nonce" => o.dpop_nonce = boolean(v, span, bad),
        "ip_allowlist" => o.ip_allowlist = allowlist(v, span, bad),
        "client_secret_sha256" => o.client_secret_sha256 = secret_hash(v, span, bad).map(Some),
        // KNOB_NAMES and this match are kept in step by the unit test
        // `every_knob_is_read`.
        _ => bad(span, "knob not readable from files".to_owned()),
    }
}

fn boolean(
    v: &DeValue<'_>,
    span: Range<usize>,
    bad: &mut dyn FnMut(Range<usize>, String),
) -> Option<bool> {
    match v {
        DeValue::Boolean(b) => Some(*b),
        other => {
            bad(
                span,
                format!("expected true or false; found {}", type_name(other)),
            );
            None
        }
    }
}

fn quoted_list(names: &[&str]) -> String {
    let v: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    v.join(", ")
}

fn choice<T>(
    v: &DeValue<'_>,
    span: Range<usize>,
    parse: fn(&str) -> Option<T>,
    names: &[&str],
    bad: &mut dyn FnMut(Range<usize>, String),
) -> Option<T> {
    let allowed = quoted_list(names);
    match v {
        DeValue::String(s) => {
            let found = parse(s);
            if found.is_none() {
                let hint = closest(s, names)
                    .map(|n| format!(" (did you mean \"{n}\"?)"))
                    .unwrap_or_default();
                bad(
                    span,
                    format!("\"{s}\" is not allowed; use one of {allowed}{hint}"),
                );
            }
            found
        }
        other => {
            bad(
                span,
                format!("expected one of {allowed}; found {}", type_name(other)),
            );
            None
        }
    }
}

/// `Some(None)` is "none" (only where `none_ok`).
fn duration(
    v: &DeValue<'_>,
    span: Range<usize>,
    none_ok: bool,
    bad: &mut dyn FnMut(Range<usize>, String),
) -> Option<Option<Duration>> {
    let forms = "a whole number and a unit: \"500ms\", \"45s\", \"10m\", \"12h\", \"30d\"";
    let or_none = if none_ok { ", or \"none\"" } else { "" };
    let DeValue::String(s) = v else {
        bad(
            span,
            format!(
                "expected a duration string, {forms}{or_none}; found {}",
                type_name(v)
            ),
        );
        return None;
    };
    if s == "none" {
        if none_ok {
            return Some(None);
        }
        bad(
            span,
            "\"none\" is only allowed for idle_ttl and absolute_ttl; write a duration".to_owned(),
        );
        return None;
    }
    match parse_duration(s) {
        Some(d) => Some(Some(d)),
        None => {
            bad(
                span,
                format!("\"{s}\" is not a duration; write {forms}{or_none}"),
            );
            None
        }
    }
}

/// "45s", "10m", "12h", "30d", "500ms": one whole number and one unit.
fn parse_duration(s: &str) -> Option<Duration> {
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(digits);
    if number.is_empty() {
        return None;
    }
    let n: u64 = number.parse().ok()?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms).map(Duration::from_millis)
}

fn integer(
    v: &DeValue<'_>,
    span: Range<usize>,
    max: u64,
    bad: &mut dyn FnMut(Range<usize>, String),
) -> Option<u64> {
    let DeValue::Integer(i) = v else {
        bad(
            span,
            format!("expected an integer 0..={max}; found {}", type_name(v)),
        );
        return None;
    };
    let n = i128::from_str_radix(i.as_str(), i.radix()).ok();
    match n.and_then(|n| u64::try_from(n).ok()).filter(|n| *n <= max) {
        Some(n) => Some(n),
        None => {
            bad(span, format!("{i} is outside 0..={max}"));
            None
        }
    }
}

fn allowlist(
    v: &DeValue<'_>,
    span: Range<usize>,
    bad: &mut dyn FnMut(Range<usize>, String),
) -> Option<Vec<IpRange>> {
    let DeValue::Array(items) = v else {
        bad(
            span,
            format!(
                "expected an array of strings like [\"10.0.0.0/8\", \"192.0.2.10-192.0.2.20\"]; found {}",
                type_name(v)
            ),
        );
        return None;
    };
    let mut ranges = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in items.iter() {
        match item.get_ref() {
            DeValue::String(s) => match s.parse::<IpRange>() {
                Ok(r) => ranges.push(r),
                Err(e) => {
                    ok = false;
                    bad(item.span(), e.to_string());
                }
            },
            other => {
                ok = false;
                bad(
                    item.span(),
                    format!(
                        "expected a string (a cidr, an a-b range or an address); found {}",
                        type_name(other)
                    ),
                );
            }
        }
    }
    ok.then_some(ranges)
}

/// The value is never echoed: an operator may have pasted the secret itself.
fn secret_hash(
    v: &DeValue<'_>,
    span: Range<usize>,
    bad: &mut dyn FnMut(Range<usize>, String),
) -> Option<[u8; 32]> {
    let expected = "expected the SHA-256 of the client secret as 64 hex characters \
                    (printf %s \"$SECRET\" | sha256sum)";
    let DeValue::String(s) = v else {
        bad(span, format!("{expected}; found {}", type_name(v)));
        return None;
    };
    let found = s.chars().count();
    if found != 64 {
        bad(
            span,
            format!("{expected}; found {found} characters (value not shown)"),
        );
        return None;
    }
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bad(
            span,
            format!("{expected}; found a non-hex character (value not shown)"),
        );
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0);
        // Both digits are < 16 (checked above), so the byte fits.
        *byte = (digit(pair[0]) * 16 + digit(pair[1])) as u8;
    }
    Some(out)
}

/// The candidate closest to `word` by edit distance, if close enough to be
/// a likely typo.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let norm = |s: &str| -> Vec<char> {
        s.chars()
            .map(|c| {
                if c == '-' {
                    '_'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    };
    let w = norm(word);
    let limit = (w.len() / 3).max(2);
    candidates
        .iter()
        .map(|c| (edit_distance(&w, &norm(c)), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, two rows.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<PolicySet, LoadErrors> {
        PolicySet::from_toml(&[(Path::new("p.toml"), text)])
    }

    #[test]
    fn durations_parse_like_they_format() {
        for (s, ms) in [
            ("500ms", 500),
            ("45s", 45_000),
            ("10m", 600_000),
            ("12h", 43_200_000),
            ("30d", 2_592_000_000),
            ("0s", 0),
        ] {
            let d = parse_duration(s).unwrap();
            assert_eq!(d, Duration::from_millis(ms), "{s}");
            assert_eq!(super::super::format_duration(d), s);
        }
        for s in [
            "",
            "s",
            "10",
            "10 s",
            "1h30m",
            "-5s",
            "1.5h",
            "10S",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(s), None, "{s}");
        }
    }

    /// Every knob, one a line from line 2, in `KNOB_NAMES` order.
    const EVERY_KNOB: &str = "[defaults]\n\
            rotation = \"reuse\"\n\
            grace_period = \"1s\"\n\
            grace_max_replays = 2\n\
            grace_same_ip = true\n\
            on_reuse = \"report_only\"\n\
            idle_ttl = \"none\"\n\
            absolute_ttl = \"1d\"\n\
            ip_allowlist = [\"10.0.0.0/8\"]\n\
            ip_check = \"issuance_only\"\n\
            pkce = \"optional\"\n\
            code_ttl = \"2m\"\n\
            max_families_per_subject = 3\n\
            access_token_ttl = \"1h\"\n\
            client_secret_sha256 = \"00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF\"\n\
            dpop = \"required\"\n\
            dpop_nonce = true\n\
            access_token_format = \"opaque\"\n";

    #[test]
    fn every_knob_is_read() {
        let set = load(EVERY_KNOB).unwrap();
        let p = set.defaults();
        let knobs = p.knobs();
        let expected = [
            "reuse",
            "1s",
            "2",
            "true",
            "report_only",
            "none",
            "1d",
            "10.0.0.0/8",
            "issuance_only",
            "optional",
            "2m",
            "3",
            "1h",
            "set",
            "required",
            "true",
            "opaque",
        ];
        assert_eq!(knobs.len(), KNOB_NAMES.len());
        for ((k, v), e) in knobs.iter().zip(expected) {
            assert_eq!(v, e, "{k}");
        }
        let h = p.client_secret_sha256().unwrap();
        assert_eq!(h[0], 0x00);
        assert_eq!(h[5], 0x55);
        assert_eq!(h[31], 0xff);
    }

    /// A bad `dpop` value is refused naming file, line, column and key,
    /// with the values allowed.
    #[test]
    fn a_bad_dpop_value_names_file_line_and_the_values_allowed() {
        let errors = load("[clients.spa]\npkce = \"s256\"\ndpop = \"require\"\n").unwrap_err();
        let text = errors.to_string();
        assert!(
            text.contains("p.toml:3:8: clients.spa.dpop: \"require\" is not allowed; \
                           use one of \"off\", \"allowed\", \"required\" (did you mean \"required\"?)"),
            "{text}"
        );
        let errors = load("[defaults]\ndpop = true\n").unwrap_err();
        assert!(
            errors
                .to_string()
                .contains("p.toml:2:8: defaults.dpop: expected one of"),
            "{errors}"
        );
        let set = load("[clients.spa]\ndpop = \"allowed\"\n").unwrap();
        assert_eq!(set.policy("spa").dpop(), crate::Dpop::Allowed);
        assert_eq!(set.defaults().dpop(), crate::Dpop::Off, "off by default");
    }

    /// `dpop_nonce` is a boolean: anything else is refused naming file,
    /// line, column and key; off unless set.
    #[test]
    fn a_bad_dpop_nonce_value_names_file_line_and_key() {
        let errors = load("[clients.spa]\ndpop_nonce = \"yes\"\n").unwrap_err();
        assert!(
            errors.to_string().contains(
                "p.toml:2:14: clients.spa.dpop_nonce: expected true or false; found a string"
            ),
            "{errors}"
        );
        let set = load("[clients.spa]\ndpop_nonce = true\n").unwrap();
        assert!(set.policy("spa").dpop_nonce());
        assert!(!set.defaults().dpop_nonce(), "off by default");
    }

    /// A bad `access_token_format` is refused naming file, line, column and
    /// key, with the values allowed; the whole set is refused, so nothing
    /// changes.
    #[test]
    fn a_bad_access_token_format_names_file_line_and_the_values_allowed() {
        let errors =
            load("[defaults]\nidle_ttl = \"1d\"\n[clients.api]\naccess_token_format = \"opaq\"\n")
                .unwrap_err();
        let text = errors.to_string();
        assert!(
            text.contains(
                "p.toml:4:23: clients.api.access_token_format: \"opaq\" is not allowed; \
                 use one of \"jwt\", \"opaque\" (did you mean \"opaque\"?)"
            ),
            "{text}"
        );
        let errors = load("[defaults]\naccess_token_format = 1\n").unwrap_err();
        assert!(
            errors
                .to_string()
                .contains("p.toml:2:23: defaults.access_token_format: expected one of \"jwt\", \"opaque\"; found an integer"),
            "{errors}"
        );
        let set = load("[clients.api]\naccess_token_format = \"opaque\"\n").unwrap();
        assert_eq!(
            set.policy("api").access_token_format(),
            crate::AccessTokenFormat::Opaque
        );
        assert_eq!(
            set.defaults().access_token_format(),
            crate::AccessTokenFormat::Jwt,
            "jwt by default"
        );
    }

    /// Provenance names each knob's own line, and a client inherits what
    /// its table leaves out.
    #[test]
    fn every_knob_has_the_line_that_set_it() {
        use super::super::Origin;
        let text = format!("{EVERY_KNOB}[clients.c]\nrotation = \"rotate\"\n");
        let set = load(&text).unwrap();
        let p = set.provenance();
        let line = |n: usize| {
            Some(Location {
                file: "p.toml".to_owned(),
                line: u32::try_from(n).unwrap(),
            })
        };
        // Each knob alone: only it is set, so `set_flags` and `KNOB_NAMES`
        // must agree on its place.
        for (i, knob_line) in EVERY_KNOB.lines().skip(1).enumerate() {
            let alone = load(&format!("[defaults]\n{knob_line}\n")).unwrap();
            for (j, (k, origin)) in alone.provenance().defaults().knobs().enumerate() {
                let want = if i == j {
                    Origin::Set(line(2))
                } else {
                    Origin::Default
                };
                assert_eq!(origin, &want, "{knob_line}: {k}");
            }
        }
        let knobs: Vec<_> = p.defaults().knobs().collect();
        assert_eq!(knobs.len(), KNOB_NAMES.len());
        for (i, (k, origin)) in knobs.into_iter().enumerate() {
            assert_eq!(origin, &Origin::Set(line(i + 2)), "{k}");
            let inherited = p.client("c").unwrap().knob(k).unwrap();
            if k == "rotation" {
                assert_eq!(inherited, &Origin::Set(line(KNOB_NAMES.len() + 3)));
            } else {
                assert_eq!(inherited, &Origin::Inherited(line(i + 2)), "{k}");
            }
        }
        assert_eq!(p.defaults().table(), line(1).as_ref());
        assert_eq!(p.unknown_clients(), &Origin::Default);
    }

    /// Where a knob is written is provenance, not content: moving it keeps
    /// the version (README "Policy files").
    #[test]
    fn moving_lines_keeps_the_version_and_moves_the_provenance() {
        let a = load("[defaults]\nidle_ttl = \"7d\"\n[clients.c]\npkce = \"s256\"\n").unwrap();
        let b = load("# moved\n[clients.c]\n\npkce = \"s256\"\n\n[defaults]\nidle_ttl = \"7d\"\n")
            .unwrap();
        assert_eq!(a.version(), b.version());
        let line = |set: &PolicySet| {
            let origin = set
                .provenance()
                .client("c")
                .unwrap()
                .knob("idle_ttl")
                .unwrap();
            origin.location().unwrap().line
        };
        assert_eq!((line(&a), line(&b)), (2, 7));
        assert_ne!(a.provenance(), b.provenance());
    }

    #[test]
    fn positions_count_characters_from_one() {
        let text = "ab\n\u{e9}xyz\n";
        assert_eq!(position(text, 0), Position { line: 1, column: 1 });
        assert_eq!(position(text, 3), Position { line: 2, column: 1 });
        // 'é' is two bytes but one column.
        assert_eq!(position(text, 5), Position { line: 2, column: 2 });
        assert_eq!(position(text, 99), Position { line: 3, column: 1 });
    }

    #[test]
    fn suggestions_are_close_or_absent() {
        assert_eq!(closest("grace_perod", KNOB_NAMES), Some("grace_period"));
        assert_eq!(closest("grace-period", KNOB_NAMES), Some("grace_period"));
        assert_eq!(closest("IDLE_TTL", KNOB_NAMES), Some("idle_ttl"));
        assert_eq!(closest("allowlist", KNOB_NAMES), Some("ip_allowlist"));
        assert_eq!(closest("colour", KNOB_NAMES), None);
        assert_eq!(edit_distance(&['a', 'b'], &[]), 2);
    }

    #[test]
    fn secret_hash_is_never_echoed() {
        let secret = "my-actual-client-secret-pasted-by-mistake";
        let text = format!("[clients.c]\nclient_secret_sha256 = \"{secret}\"\n");
        let err = load(&text).unwrap_err().to_string();
        assert!(!err.contains(secret), "{err}");
        let text = format!(
            "[clients.c]\nclient_secret_sha256 = \"{}\"\n",
            "g".repeat(64)
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("non-hex"), "{err}");
        assert!(!err.contains("gggg"), "{err}");
    }

    #[test]
    fn keys_are_shown_as_toml_spells_them() {
        assert_eq!(toml_key("mobile-app"), "mobile-app");
        assert_eq!(toml_key("app.example.com"), "\"app.example.com\"");
        assert_eq!(toml_key(""), "\"\"");
    }
}
