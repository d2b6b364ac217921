//! Per-client refresh-token policy: knobs, defaults, and the immutable,
//! versioned [`PolicySet`] that redemptions are decided under.
//!
//! A set is built once ("parse, don't validate"): durations are typed,
//! allow-lists are compiled, every value is range-checked. The hot path only
//! reads it.

mod allowlist;
mod loader;
mod provenance;

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use allowlist::{AllowList, AllowListError, IpRange};
pub(crate) use loader::toml_key;
pub use loader::{LoadError, LoadErrors, Position};
pub use provenance::{Location, Origin, Provenance, ScopeProvenance};

use provenance::Locations;

use crate::dpop::Dpop;
use crate::error::Error;

/// What a successful refresh does to the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rotation {
    /// Every refresh returns a new token; the old one becomes reuse.
    Rotate,
    /// The token stays valid; only its last-use time moves.
    Reuse,
}

/// The response to a detected reuse (RFC 9700 §4.14.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OnReuse {
    /// Revoke the token's family.
    RevokeFamily,
    /// Revoke every family of the subject with this client.
    RevokeSubjectClient,
    /// Revoke every family of the subject, all clients.
    RevokeSubject,
    /// Deny and report, revoke nothing.
    ReportOnly,
}

/// When the IP allow-list is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpCheck {
    /// At issuance and on every refresh.
    EveryRefresh,
    /// Only when the family is born.
    IssuanceOnly,
}

/// Who is served when a client id the set does not list asks: the set-wide
/// `unknown_clients` setting (README "Policy files").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum UnknownClients {
    /// `[defaults]` governs every client id not listed (the behaviour of
    /// sets without the setting).
    #[default]
    Defaults,
    /// A client id not listed is refused (`unknown_client`) before anything
    /// is read or written, so `[defaults]` governs nobody.
    Refuse,
}

/// The access tokens the server mints for a client (README "Opaque access
/// tokens"). Only minting follows the knob: a token of either kind verifies
/// until it expires, whatever the client's knob says by then.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessTokenFormat {
    /// An RFC 9068 JWT signed with Ed25519: verifiable offline, valid
    /// until it expires whatever happens to its family.
    Jwt,
    /// An `rga_` token derived like refresh tokens: no signature, verified
    /// by introspection or `Engine::verify_access_token`, dead as soon as
    /// its family is revoked.
    Opaque,
}

/// PKCE requirement at the code exchange (RFC 7636).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pkce {
    /// A challenge is required and must be S256.
    S256,
    /// A challenge is required; S256 or plain.
    S256OrPlain,
    /// A challenge is optional; when present it is enforced.
    Optional,
}

macro_rules! knob_names {
    ($($ty:ty { $($variant:ident => $name:literal),* $(,)? })*) => {$(
        impl $ty {
            /// The knob value's name as written in policy files.
            pub fn as_str(self) -> &'static str {
                match self { $(<$ty>::$variant => $name),* }
            }

            /// Every value's name, for error messages.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// Parse a policy-file name.
            pub fn from_name(s: &str) -> Option<$ty> {
                match s { $($name => Some(<$ty>::$variant),)* _ => None }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

knob_names! {
    Rotation { Rotate => "rotate", Reuse => "reuse" }
    OnReuse {
        RevokeFamily => "revoke_family",
        RevokeSubjectClient => "revoke_subject_client",
        RevokeSubject => "revoke_subject",
        ReportOnly => "report_only",
    }
    IpCheck { EveryRefresh => "every_refresh", IssuanceOnly => "issuance_only" }
    Pkce { S256 => "s256", S256OrPlain => "s256_or_plain", Optional => "optional" }
    UnknownClients { Defaults => "defaults", Refuse => "refuse" }
    Dpop { Off => "off", Allowed => "allowed", Required => "required" }
    AccessTokenFormat { Jwt => "jwt", Opaque => "opaque" }
}

/// Longest grace period a policy may set.
pub const MAX_GRACE_PERIOD: Duration = Duration::from_secs(5 * 60);
/// Longest authorization-code lifetime a policy may set.
pub const MAX_CODE_TTL: Duration = Duration::from_secs(10 * 60);
/// Longest access-token lifetime a policy may set.
pub const MAX_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The effective rules for one client: every knob has a value.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientPolicy {
    pub(crate) rotation: Rotation,
    pub(crate) grace_period: Duration,
    pub(crate) grace_max_replays: u8,
    pub(crate) grace_same_ip: bool,
    pub(crate) on_reuse: OnReuse,
    pub(crate) idle_ttl: Option<Duration>,
    pub(crate) absolute_ttl: Option<Duration>,
    pub(crate) ip_allowlist: AllowList,
    pub(crate) ip_check: IpCheck,
    pub(crate) pkce: Pkce,
    pub(crate) code_ttl: Duration,
    pub(crate) max_families_per_subject: u32,
    pub(crate) access_token_ttl: Duration,
    pub(crate) client_secret_sha256: Option<[u8; 32]>,
    pub(crate) dpop: Dpop,
    pub(crate) dpop_nonce: bool,
    pub(crate) access_token_format: AccessTokenFormat,
}

impl Default for ClientPolicy {
    /// The README's "Policy knobs" defaults: RFC 9700 rotation with reuse revoking the
    /// family, no grace, 30 days idle, 90 days absolute, PKCE S256.
    fn default() -> ClientPolicy {
        ClientPolicy {
            rotation: Rotation::Rotate,
            grace_period: Duration::ZERO,
            grace_max_replays: 1,
            grace_same_ip: false,
            on_reuse: OnReuse::RevokeFamily,
            idle_ttl: Some(Duration::from_secs(30 * 86_400)),
            absolute_ttl: Some(Duration::from_secs(90 * 86_400)),
            ip_allowlist: AllowList::any(),
            ip_check: IpCheck::EveryRefresh,
            pkce: Pkce::S256,
            code_ttl: Duration::from_secs(60),
            max_families_per_subject: 0,
            access_token_ttl: Duration::from_secs(300),
            client_secret_sha256: None,
            dpop: Dpop::Off,
            dpop_nonce: false,
            access_token_format: AccessTokenFormat::Jwt,
        }
    }
}

impl ClientPolicy {
    /// Whether a refresh returns a new token.
    pub fn rotation(&self) -> Rotation {
        self.rotation
    }
    /// How long after a rotation its predecessor may be replayed.
    pub fn grace_period(&self) -> Duration {
        self.grace_period
    }
    /// How many grace replays one rotation allows.
    pub fn grace_max_replays(&self) -> u8 {
        self.grace_max_replays
    }
    /// Whether a grace replay must come from the rotation's IP.
    pub fn grace_same_ip(&self) -> bool {
        self.grace_same_ip
    }
    /// The response to reuse.
    pub fn on_reuse(&self) -> OnReuse {
        self.on_reuse
    }
    /// Expiry after this long unused; `None` = never.
    pub fn idle_ttl(&self) -> Option<Duration> {
        self.idle_ttl
    }
    /// Expiry this long after the family was born; `None` = never.
    pub fn absolute_ttl(&self) -> Option<Duration> {
        self.absolute_ttl
    }
    /// Networks a refresh may come from.
    pub fn ip_allowlist(&self) -> &AllowList {
        &self.ip_allowlist
    }
    /// When the allow-list applies.
    pub fn ip_check(&self) -> IpCheck {
        self.ip_check
    }
    /// PKCE requirement at the code exchange.
    pub fn pkce(&self) -> Pkce {
        self.pkce
    }
    /// Authorization-code lifetime.
    pub fn code_ttl(&self) -> Duration {
        self.code_ttl
    }
    /// Most live families per subject and client; 0 = unlimited.
    pub fn max_families_per_subject(&self) -> u32 {
        self.max_families_per_subject
    }
    /// Lifetime of access tokens the server mints.
    pub fn access_token_ttl(&self) -> Duration {
        self.access_token_ttl
    }
    /// SHA-256 of a confidential client's secret; `None` = public client.
    pub fn client_secret_sha256(&self) -> Option<&[u8; 32]> {
        self.client_secret_sha256.as_ref()
    }
    /// DPoP key binding of the client's families (RFC 9449).
    pub fn dpop(&self) -> Dpop {
        self.dpop
    }
    /// Whether a DPoP proof from this client must carry a fresh server
    /// nonce (RFC 9449 §8): a proof made in advance on a compromised device
    /// then expires with the nonce. Enforced by the server, which issues
    /// the nonces; the engine never sees a proof.
    pub fn dpop_nonce(&self) -> bool {
        self.dpop_nonce
    }
    /// The kind of access token the server mints for the client.
    pub fn access_token_format(&self) -> AccessTokenFormat {
        self.access_token_format
    }
    /// Whether the client is public: it has no `client_secret_sha256`, so
    /// nothing but the token (and, when bound, its DPoP key) constrains
    /// who presents it. Only public clients' families are DPoP-bound (RFC
    /// 9449 §5).
    pub fn is_public(&self) -> bool {
        self.client_secret_sha256.is_none()
    }

    /// Each knob's name and its value as written in policy files, in the
    /// order of the README's "Policy knobs" table; used for display, diffs and the version hash.
    pub fn knobs(&self) -> Vec<(&'static str, String)> {
        let secret = match &self.client_secret_sha256 {
            // The hash of a secret is not the secret, but keep it out of
            // tables and logs all the same.
            Some(_) => "set".to_owned(),
            None => "none".to_owned(),
        };
        let allow = if self.ip_allowlist.is_any() {
            "any".to_owned()
        } else {
            let v: Vec<String> = self
                .ip_allowlist
                .ranges()
                .iter()
                .map(|r| r.to_string())
                .collect();
            v.join(",")
        };
        vec![
            ("rotation", self.rotation.to_string()),
            ("grace_period", format_duration(self.grace_period)),
            ("grace_max_replays", self.grace_max_replays.to_string()),
            ("grace_same_ip", self.grace_same_ip.to_string()),
            ("on_reuse", self.on_reuse.to_string()),
            ("idle_ttl", format_opt_duration(self.idle_ttl)),
            ("absolute_ttl", format_opt_duration(self.absolute_ttl)),
            ("ip_allowlist", allow),
            ("ip_check", self.ip_check.to_string()),
            ("pkce", self.pkce.to_string()),
            ("code_ttl", format_duration(self.code_ttl)),
            (
                "max_families_per_subject",
                self.max_families_per_subject.to_string(),
            ),
            ("access_token_ttl", format_duration(self.access_token_ttl)),
            ("client_secret_sha256", secret),
            ("dpop", self.dpop.to_string()),
            ("dpop_nonce", self.dpop_nonce.to_string()),
            ("access_token_format", self.access_token_format.to_string()),
        ]
    }

    fn write_canonical(&self, out: &mut String) {
        for (k, v) in self.knobs() {
            // A knob added later is left out at its default, so that a set
            // which does not use it keeps the version it had before.
            if (k == "dpop" && self.dpop == Dpop::Off)
                || (k == "dpop_nonce" && !self.dpop_nonce)
                || (k == "access_token_format"
                    && self.access_token_format == AccessTokenFormat::Jwt)
            {
                continue;
            }
            let _ = write!(out, "{k}={v};");
        }
        if let Some(h) = &self.client_secret_sha256 {
            for b in h {
                let _ = write!(out, "{b:02x}");
            }
        }
    }
}

impl fmt::Debug for ClientPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in self.knobs() {
            m.entry(&k, &v);
        }
        m.finish()
    }
}

/// Names of every knob, as written in policy files.
pub const KNOB_NAMES: &[&str] = &[
    "rotation",
    "grace_period",
    "grace_max_replays",
    "grace_same_ip",
    "on_reuse",
    "idle_ttl",
    "absolute_ttl",
    "ip_allowlist",
    "ip_check",
    "pkce",
    "code_ttl",
    "max_families_per_subject",
    "access_token_ttl",
    "client_secret_sha256",
    "dpop",
    "dpop_nonce",
    "access_token_format",
];

/// Write a duration the way policy files spell it ("45s", "10m", "30d").
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s != 0 && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

fn format_opt_duration(d: Option<Duration>) -> String {
    d.map_or_else(|| "none".to_owned(), format_duration)
}

/// Some knobs for one client (or the defaults); unset knobs inherit.
///
/// `idle_ttl` and `absolute_ttl` are doubly optional: `None` inherits,
/// `Some(None)` means "no limit".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // each field is the knob of the same name on ClientPolicy
pub struct PolicyOverrides {
    pub rotation: Option<Rotation>,
    pub grace_period: Option<Duration>,
    pub grace_max_replays: Option<u8>,
    pub grace_same_ip: Option<bool>,
    pub on_reuse: Option<OnReuse>,
    pub idle_ttl: Option<Option<Duration>>,
    pub absolute_ttl: Option<Option<Duration>>,
    pub ip_allowlist: Option<Vec<IpRange>>,
    pub ip_check: Option<IpCheck>,
    pub pkce: Option<Pkce>,
    pub code_ttl: Option<Duration>,
    pub max_families_per_subject: Option<u32>,
    pub access_token_ttl: Option<Duration>,
    pub client_secret_sha256: Option<Option<[u8; 32]>>,
    pub dpop: Option<Dpop>,
    pub dpop_nonce: Option<bool>,
    pub access_token_format: Option<AccessTokenFormat>,
}

macro_rules! setters {
    ($($name:ident: $ty:ty),* $(,)?) => {$(
        #[doc = concat!("Set `", stringify!($name), "`.")]
        pub fn $name(mut self, v: $ty) -> PolicyOverrides {
            self.$name = Some(v);
            self
        }
    )*};
}

impl PolicyOverrides {
    /// No overrides: everything inherits.
    pub fn new() -> PolicyOverrides {
        PolicyOverrides::default()
    }

    setters! {
        rotation: Rotation,
        grace_period: Duration,
        grace_max_replays: u8,
        grace_same_ip: bool,
        on_reuse: OnReuse,
        idle_ttl: Option<Duration>,
        absolute_ttl: Option<Duration>,
        ip_allowlist: Vec<IpRange>,
        ip_check: IpCheck,
        pkce: Pkce,
        code_ttl: Duration,
        max_families_per_subject: u32,
        access_token_ttl: Duration,
        client_secret_sha256: Option<[u8; 32]>,
        dpop: Dpop,
        dpop_nonce: bool,
        access_token_format: AccessTokenFormat,
    }

    /// Range problems of the values set here, as (knob, what is allowed).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(g) = self.grace_period
            && g > MAX_GRACE_PERIOD
        {
            out.push((
                "grace_period",
                format!("{} is longer than the maximum 5m", format_duration(g)),
            ));
        }
        if let Some(c) = self.code_ttl
            && (c.is_zero() || c > MAX_CODE_TTL)
        {
            out.push((
                "code_ttl",
                format!("{} is outside 1ms..=10m", format_duration(c)),
            ));
        }
        for (knob, v) in [
            ("idle_ttl", self.idle_ttl),
            ("absolute_ttl", self.absolute_ttl),
        ] {
            if let Some(Some(d)) = v
                && d.is_zero()
            {
                out.push((
                    knob,
                    "0s is not allowed; use \"none\" for no limit".to_owned(),
                ));
            }
        }
        if let Some(a) = self.access_token_ttl
            && (a.is_zero() || a > MAX_ACCESS_TOKEN_TTL)
        {
            out.push((
                "access_token_ttl",
                format!("{} is outside 1ms..=24h", format_duration(a)),
            ));
        }
        out
    }

    /// Which knobs are set here, in [`KNOB_NAMES`] order (for provenance).
    fn set_flags(&self) -> [bool; KNOB_NAMES.len()] {
        [
            self.rotation.is_some(),
            self.grace_period.is_some(),
            self.grace_max_replays.is_some(),
            self.grace_same_ip.is_some(),
            self.on_reuse.is_some(),
            self.idle_ttl.is_some(),
            self.absolute_ttl.is_some(),
            self.ip_allowlist.is_some(),
            self.ip_check.is_some(),
            self.pkce.is_some(),
            self.code_ttl.is_some(),
            self.max_families_per_subject.is_some(),
            self.access_token_ttl.is_some(),
            self.client_secret_sha256.is_some(),
            self.dpop.is_some(),
            self.dpop_nonce.is_some(),
            self.access_token_format.is_some(),
        ]
    }

    fn apply_to(&self, p: &mut ClientPolicy) {
        macro_rules! take {
            ($($f:ident),*) => {$( if let Some(v) = self.$f { p.$f = v; } )*};
        }
        take!(
            rotation,
            grace_period,
            grace_max_replays,
            grace_same_ip,
            on_reuse,
            idle_ttl,
            absolute_ttl,
            ip_check,
            pkce,
            code_ttl,
            max_families_per_subject,
            access_token_ttl,
            client_secret_sha256,
            dpop,
            dpop_nonce,
            access_token_format
        );
        if let Some(list) = &self.ip_allowlist {
            p.ip_allowlist = AllowList::new(list);
        }
    }
}

/// One problem in a policy set, naming where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// `defaults` or `clients.<client_id>`.
    pub scope: String,
    /// The knob at fault, if one is.
    pub knob: Option<&'static str>,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.knob {
            Some(k) => write!(f, "{}.{k}: {}", self.scope, self.message),
            None => write!(f, "{}: {}", self.scope, self.message),
        }
    }
}

/// A short content hash of a policy set, carried by every decision and event.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyVersion(u64);

impl PolicyVersion {
    /// The version as a number (for stores and metrics).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for PolicyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012x}", self.0 >> 16)
    }
}

impl fmt::Debug for PolicyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyVersion({self})")
    }
}

/// Defaults plus per-client policies, immutable once built and swapped as a
/// whole.
#[derive(Clone)]
pub struct PolicySet {
    version: PolicyVersion,
    defaults: Arc<ClientPolicy>,
    clients: HashMap<Box<str>, Arc<ClientPolicy>, ahash::RandomState>,
    unknown_clients: UnknownClients,
    /// Beside the set, outside its version: see [`Provenance`].
    provenance: Arc<Provenance>,
}

impl PolicySet {
    /// Start building a set from the built-in defaults.
    pub fn builder() -> PolicySetBuilder {
        PolicySetBuilder::default()
    }

    /// The policy that governs `client`: its own, or the defaults.
    pub fn policy(&self, client: &str) -> &ClientPolicy {
        self.clients.get(client).unwrap_or(&self.defaults)
    }

    /// The defaults, for clients without a policy of their own.
    pub fn defaults(&self) -> &ClientPolicy {
        &self.defaults
    }

    /// Clients with a policy of their own, sorted by id.
    pub fn clients(&self) -> Vec<(&str, &ClientPolicy)> {
        let mut v: Vec<(&str, &ClientPolicy)> =
            self.clients.iter().map(|(k, p)| (&**k, &**p)).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// Whether `client` has a policy of its own.
    pub fn has_client(&self, client: &str) -> bool {
        self.clients.contains_key(client)
    }

    /// The set's content hash.
    pub fn version(&self) -> PolicyVersion {
        self.version
    }

    /// Whether client ids the set does not list are served by `[defaults]`
    /// or refused.
    pub fn unknown_clients(&self) -> UnknownClients {
        self.unknown_clients
    }

    /// Whether `client` may be served at all: a listed client, or any client
    /// unless `unknown_clients = "refuse"`. One comparison unless refusing.
    #[inline]
    pub fn admits_client(&self, client: &str) -> bool {
        self.unknown_clients == UnknownClients::Defaults || self.clients.contains_key(client)
    }

    /// Where every knob was set: file and line, inherited from
    /// `[defaults]`, or the built-in default. Not part of the version.
    pub fn provenance(&self) -> &Provenance {
        &self.provenance
    }
}

impl Default for PolicySet {
    fn default() -> PolicySet {
        // The built-in defaults are always in range.
        PolicySet::builder()
            .build()
            .expect("built-in defaults are valid")
    }
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field("unknown_clients", &self.unknown_clients)
            .field("defaults", &self.defaults)
            .field("clients", &self.clients())
            .finish()
    }
}

/// Collects defaults and client policies; [`build`](Self::build) checks every
/// value and reports every problem at once, never panicking.
#[derive(Clone, Debug, Default)]
pub struct PolicySetBuilder {
    defaults: PolicyOverrides,
    clients: Vec<(String, PolicyOverrides)>,
    unknown_clients: Option<UnknownClients>,
    /// Where a loader found each setting; empty for sets built in code.
    locations: Locations,
}

/// Longest client id accepted.
pub const MAX_CLIENT_ID_LEN: usize = 255;

impl PolicySetBuilder {
    /// Override the built-in defaults.
    pub fn defaults(mut self, o: PolicyOverrides) -> PolicySetBuilder {
        self.defaults = o;
        self
    }

    /// Give `client` its own policy: the defaults with `o` on top.
    pub fn client(mut self, client: impl Into<String>, o: PolicyOverrides) -> PolicySetBuilder {
        self.clients.push((client.into(), o));
        self
    }

    /// Serve client ids the set does not list with `[defaults]` (the
    /// default) or refuse them.
    pub fn unknown_clients(mut self, u: UnknownClients) -> PolicySetBuilder {
        self.unknown_clients = Some(u);
        self
    }

    /// Where a policy file set each knob, table and `unknown_clients`.
    pub(crate) fn locations(mut self, l: Locations) -> PolicySetBuilder {
        self.locations = l;
        self
    }

    /// Check and compile the set.
    pub fn build(self) -> Result<PolicySet, Error> {
        let mut errors = Vec::new();
        let mut push = |scope: &str, knob, message| {
            errors.push(PolicyError {
                scope: scope.to_owned(),
                knob,
                message,
            })
        };
        for (knob, msg) in self.defaults.problems() {
            push("defaults", Some(knob), msg);
        }
        let mut defaults = ClientPolicy::default();
        self.defaults.apply_to(&mut defaults);
        let defaults_origin = self.locations.defaults(&self.defaults.set_flags());
        let mut client_origins = HashMap::new();

        let mut clients: HashMap<Box<str>, Arc<ClientPolicy>, ahash::RandomState> =
            HashMap::default();
        for (id, o) in &self.clients {
            let scope = format!("clients.{id}");
            if id.is_empty() || id.len() > MAX_CLIENT_ID_LEN {
                push(&scope, None, "client id must be 1 to 255 bytes".to_owned());
            }
            for (knob, msg) in o.problems() {
                push(&scope, Some(knob), msg);
            }
            let mut p = defaults.clone();
            o.apply_to(&mut p);
            if clients.insert(id.as_str().into(), Arc::new(p)).is_some() {
                push(&scope, None, "client defined twice".to_owned());
            }
            let origin = self
                .locations
                .client(&scope, &o.set_flags(), &defaults_origin);
            client_origins.insert(id.as_str().into(), origin);
        }
        if !errors.is_empty() {
            return Err(Error::Policy { errors });
        }
        let unknown_clients = self.unknown_clients.unwrap_or_default();
        let version = content_version(&defaults, &clients, unknown_clients);
        let provenance = Provenance {
            defaults: defaults_origin,
            clients: client_origins,
            unknown_clients: match self.unknown_clients {
                Some(_) => Origin::Set(self.locations.unknown_clients.clone()),
                None => Origin::Default,
            },
        };
        Ok(PolicySet {
            version,
            defaults: Arc::new(defaults),
            clients,
            unknown_clients,
            provenance: Arc::new(provenance),
        })
    }
}

/// The hash of what decides, never of where it was written: provenance
/// stays out, so moving lines keeps the version.
fn content_version(
    defaults: &ClientPolicy,
    clients: &HashMap<Box<str>, Arc<ClientPolicy>, ahash::RandomState>,
    unknown_clients: UnknownClients,
) -> PolicyVersion {
    let mut text = String::new();
    // Only when it differs from the behaviour before the setting existed,
    // so the versions of every set without it are unchanged.
    if unknown_clients != UnknownClients::Defaults {
        let _ = writeln!(text, "unknown_clients={unknown_clients}");
    }
    text.push_str("defaults:");
    defaults.write_canonical(&mut text);
    let mut ids: Vec<&Box<str>> = clients.keys().collect();
    ids.sort();
    for id in ids {
        let _ = write!(text, "\nclient {}:{}:", id.len(), id);
        clients[id].write_canonical(&mut text);
    }
    let digest = Sha256::digest(text.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    PolicyVersion(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_design() {
        let p = ClientPolicy::default();
        assert_eq!(p.rotation(), Rotation::Rotate);
        assert_eq!(p.grace_period(), Duration::ZERO);
        assert_eq!(p.grace_max_replays(), 1);
        assert!(!p.grace_same_ip());
        assert_eq!(p.on_reuse(), OnReuse::RevokeFamily);
        assert_eq!(p.idle_ttl(), Some(Duration::from_secs(30 * 86400)));
        assert_eq!(p.absolute_ttl(), Some(Duration::from_secs(90 * 86400)));
        assert!(p.ip_allowlist().is_any());
        assert_eq!(p.ip_check(), IpCheck::EveryRefresh);
        assert_eq!(p.pkce(), Pkce::S256);
        assert_eq!(p.code_ttl(), Duration::from_secs(60));
        assert_eq!(p.max_families_per_subject(), 0);
        assert_eq!(p.access_token_ttl(), Duration::from_secs(300));
        assert!(p.client_secret_sha256().is_none());
    }

    #[test]
    fn client_inherits_defaults_and_overrides() {
        let set = PolicySet::builder()
            .defaults(PolicyOverrides::new().idle_ttl(Some(Duration::from_secs(3600))))
            .client(
                "mobile",
                PolicyOverrides::new().grace_period(Duration::from_secs(10)),
            )
            .build()
            .unwrap();
        let m = set.policy("mobile");
        assert_eq!(m.grace_period(), Duration::from_secs(10));
        assert_eq!(m.idle_ttl(), Some(Duration::from_secs(3600)));
        let other = set.policy("unknown-client");
        assert_eq!(other.grace_period(), Duration::ZERO);
        assert_eq!(other.idle_ttl(), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn out_of_range_values_are_all_reported() {
        let err = PolicySet::builder()
            .defaults(PolicyOverrides::new().grace_period(Duration::from_secs(301)))
            .client(
                "a",
                PolicyOverrides::new().code_ttl(Duration::from_secs(601)),
            )
            .client("a", PolicyOverrides::new())
            .client("", PolicyOverrides::new().idle_ttl(Some(Duration::ZERO)))
            .build()
            .unwrap_err();
        let Error::Policy { errors } = err else {
            panic!("wrong error")
        };
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.starts_with("defaults.grace_period: 5m1s")
                    || t.starts_with("defaults.grace_period: 301s")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with("clients.a.code_ttl")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t == "clients.a: client defined twice"),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with("clients.: client id")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with("clients..idle_ttl")),
            "{text:?}"
        );
    }

    #[test]
    fn version_is_a_content_hash() {
        let a = PolicySet::builder()
            .client("x", PolicyOverrides::new().grace_max_replays(3))
            .client("y", PolicyOverrides::new())
            .build()
            .unwrap();
        let b = PolicySet::builder()
            .client("y", PolicyOverrides::new())
            .client("x", PolicyOverrides::new().grace_max_replays(3))
            .build()
            .unwrap();
        let c = PolicySet::builder()
            .client("x", PolicyOverrides::new().grace_max_replays(4))
            .client("y", PolicyOverrides::new())
            .build()
            .unwrap();
        assert_eq!(
            a.version(),
            b.version(),
            "order of definition is irrelevant"
        );
        assert_ne!(a.version(), c.version());
        assert_ne!(a.version(), PolicySet::default().version());
        assert_eq!(a.version().to_string().len(), 12);
    }

    #[test]
    fn durations_format_like_policy_files() {
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_secs(12 * 3600)), "12h");
        assert_eq!(format_duration(Duration::from_secs(30 * 86400)), "30d");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn knob_names_round_trip() {
        for n in OnReuse::NAMES {
            assert_eq!(OnReuse::from_name(n).unwrap().as_str(), *n);
        }
        assert!(Rotation::from_name("rotating").is_none());
        assert_eq!(KNOB_NAMES.len(), ClientPolicy::default().knobs().len());
    }

    #[test]
    fn debug_hides_client_secret_hash() {
        let set = PolicySet::builder()
            .client(
                "c",
                PolicyOverrides::new().client_secret_sha256(Some([0xab; 32])),
            )
            .build()
            .unwrap();
        let d = format!("{set:?}");
        assert!(!d.contains("abab"), "{d}");
    }
}
