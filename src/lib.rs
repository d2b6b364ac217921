//! refresh-guard decides, for every OAuth 2.0 refresh-token redemption,
//! whether to accept it and what comes next: rotation with reuse detection
//! (RFC 9700 §4.14.2), a grace window that returns the *same* successor to
//! racing or retrying clients, idle and absolute lifetimes, and per-client IP
//! allow-lists, under a policy set that can be swapped live. It is a library
//! an authorization server embeds; a decision is an in-process call, not a
//! database round trip.
//!
//! What it deliberately does not do: authenticate users or clients, render
//! consent, sign access tokens (it derives opaque ones bound to their
//! family, [`Engine::access_token`]), or talk HTTP: the library has no HTTP
//! stack, no async runtime and no logging subscriber (the optional `redis`
//! feature's shared store owns a one-thread runtime for its connection;
//! README "Several instances"). The OAuth token
//! service (`refresh-guard serve`) is a separate crate,
//! `refresh-guard-server`, built on this public API. Tokens are derived
//! from one record per family, never stored.
//!
//! ```
//! use std::net::IpAddr;
//! use refresh_guard::{DenyReason, Engine, IssueRequest, RedeemRequest};
//!
//! let engine = Engine::builder().build()?;
//! let ip: IpAddr = "203.0.113.7".parse().unwrap();
//! let first = engine.issue(&IssueRequest {
//!     client: "mobile-app",
//!     subject: "user-42",
//!     scope: "openid offline_access",
//!     ip: Some(ip),
//! })?;
//! let t1 = first.accepted().expect("issued").token;
//!
//! // A refresh rotates: a new token comes back, the old one is spent.
//! let refresh = RedeemRequest::new(&t1, "mobile-app").ip(ip);
//! let t2 = engine.redeem(&refresh)?.accepted().expect("rotated").token;
//!
//! // Presenting the spent token again is reuse: the family is revoked.
//! assert_eq!(engine.redeem(&refresh)?.deny_reason(), Some(DenyReason::ReuseDetected));
//! let next = RedeemRequest::new(&t2, "mobile-app").ip(ip);
//! assert_eq!(engine.redeem(&next)?.deny_reason(), Some(DenyReason::Revoked));
//! # Ok::<(), refresh_guard::Error>(())
//! ```
// Three exceptions, each one system call with its SAFETY note: `huge`
// (madvise) and `clock` (the coarse clock), measured; `store::private`
// (geteuid, which std does not offer, for the store's owner check).
#![deny(unsafe_code)]
#![warn(missing_docs)]

// The public interface is:
pub use crate::access::{ACCESS_TOKEN_LEN, AccessToken, AccessTokenInfo, IssuedAccessToken};
pub use crate::clock::{Clock, CoarseClock, ManualClock, SystemClock, Timestamp};
pub use crate::compliance::{
    Control, ControlLevel, ControlRow, ControlStatus, Evidence, Profile, ProfileReport,
    ScopeReport, StatusChange, UnknownProfile,
};
pub use crate::decision::{AcceptKind, Accepted, Decision, Denied, DenyReason, OAuthError};
pub use crate::dpop::{Dpop, Jkt, JktError};
pub use crate::engine::{
    At, AuthorizeRequest, Durable, Engine, EngineBuilder, ExchangeRequest, FamilyRecord,
    Introspection, IssueRequest, MAX_SCOPE_LEN, MAX_SUBJECT_LEN, RedeemRequest, ShadowReport,
    ShadowRow, Stats, SweepReport,
};
pub use crate::error::{Error, IoCause};
pub use crate::event::{
    EVENT_KINDS, Event, EventCounts, EventKind, EventSink, MemorySink, NoopSink,
};
pub use crate::family::{RevokeReason, Status};
pub use crate::policy::{
    AccessTokenFormat, AllowList, AllowListError, ClientPolicy, IpCheck, KNOB_NAMES, Location,
    OnReuse, Origin, Pkce, PolicyError, PolicyOverrides, PolicySet, PolicySetBuilder,
    PolicyVersion, Provenance, Rotation, ScopeProvenance, UnknownClients, format_duration,
};
pub use crate::token::{
    FamilyId, Generation, KeyId, KeyRing, KeySecret, TOKEN_LEN, Token, TokenKind,
};

/// Policy limits and allow-list entries.
pub mod limits {
    pub use crate::policy::{
        MAX_ACCESS_TOKEN_TTL, MAX_CLIENT_ID_LEN, MAX_CODE_TTL, MAX_GRACE_PERIOD,
    };
}
pub use crate::code::MAX_REDIRECT_URI_LEN;
pub use crate::policy::IpRange;
pub use crate::policy::{LoadError, LoadErrors, Position};
#[cfg(feature = "watch")]
pub use crate::reload::{PolicyReloader, ReloadError, ReloadTrigger};
#[cfg(feature = "durable")]
pub use crate::store::LOG_SUBDIR;
#[cfg(feature = "durable")]
#[doc(hidden)]
pub use crate::store::LogHooks;
#[cfg(feature = "durable")]
pub use crate::store::{Dropped, LogOptions, LogStore, RepairReport, RolledBack};
pub use crate::store::{Durability, RecordRef, Snapshot, Store, StoredRecord};
#[cfg(feature = "redis")]
pub use crate::store::{OnRollback, RedisConnection, RedisOptions, RedisStore};

/// Directories and files that hold secrets, under the store's rules
/// (docs/store.md, "Permissions"): created 0700 and 0600, refused when
/// other users can reach them or another user owns them. The server's data
/// directory uses them; so can an embedder's own secret files.
#[cfg(feature = "durable")]
pub mod private_files {
    pub use crate::store::private::{Refusal, check_dir, create_dir, file_options, tighten_file};
}

mod access;
mod clock;
mod code;
mod compliance;
mod decision;
mod dpop;
mod engine;
mod error;
mod event;
mod family;
/// Entry points of the fuzz targets in `fuzz/` and of the corpus replay
/// in `tests/fuzz_corpus.rs` (FUZZING.md): not part of the API.
#[doc(hidden)]
pub mod fuzzing;
mod huge;
mod policy;
mod random;
#[cfg(feature = "watch")]
mod reload;
mod store;
mod striped;
mod table;
mod token;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
