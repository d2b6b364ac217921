//! Counters the server keeps, and their Prometheus text exposition
//! (format 0.0.4), written by hand: a handful of counters, gauges and one
//! histogram do not need a metrics framework.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::decision::{AcceptKind, Decision, DenyReason};
use crate::engine::Engine;
use crate::event::EVENT_KINDS;

const ACCEPTS: [AcceptKind; 6] = [
    AcceptKind::Rotated,
    AcceptKind::Kept,
    AcceptKind::GraceReplay,
    AcceptKind::Issued,
    AcceptKind::CodeIssued,
    AcceptKind::Exchanged,
];
const OUTCOMES: usize = ACCEPTS.len() + DenyReason::ALL.len();

/// Distinct client labels kept; further clients share the label `_other`,
/// so that made-up client ids cannot grow the exposition without bound.
pub const MAX_CLIENT_LABELS: usize = 1000;

/// Upper bounds of the redeem latency buckets, in microseconds.
const BUCKETS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

fn outcome_index(d: &Decision) -> usize {
    match d {
        Decision::Accept(a) => ACCEPTS.iter().position(|k| *k == a.kind).unwrap_or(0),
        Decision::Deny(d) => {
            ACCEPTS.len()
                + DenyReason::ALL
                    .iter()
                    .position(|r| *r == d.reason)
                    .unwrap_or(0)
        }
    }
}

fn outcome_name(i: usize) -> &'static str {
    match i.checked_sub(ACCEPTS.len()) {
        None => ACCEPTS[i].as_str(),
        Some(j) => DenyReason::ALL[j].as_str(),
    }
}

type Outcomes = [AtomicU64; OUTCOMES];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += c.load(Ordering::Relaxed);
            let le = *b as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Everything the server counts beside the engine's own statistics.
#[derive(Default)]
pub(crate) struct Metrics {
    decisions: RwLock<HashMap<Arc<str>, Arc<Outcomes>>>,
    other: Outcomes,
    /// Engine time of each refresh grant, durability wait included.
    pub(crate) redeem_latency: Histogram,
    /// OAuth error responses by (endpoint, error code).
    errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Revocations by reason, counted from events.
    revocations: Mutex<BTreeMap<&'static str, u64>>,
    /// Connections of the public listener.
    pub(crate) public_connections: Arc<ConnCounters>,
    /// Connections of the admin listener.
    pub(crate) admin_connections: Arc<ConnCounters>,
}

/// Connection counts of one listener.
#[derive(Default)]
pub(crate) struct ConnCounters {
    pub(crate) open: AtomicU64,
    /// Connections given a slot.
    pub(crate) accepted: AtomicU64,
    /// Closed at accept: their source held its cap.
    pub(crate) refused_per_source: AtomicU64,
    /// Closed without a request by the first-request deadline.
    pub(crate) first_request_timeouts: AtomicU64,
    /// Idle connections closed to give their slot to a new one.
    pub(crate) evicted: AtomicU64,
}

impl Metrics {
    /// Count one engine decision for `client`.
    pub(crate) fn decision(&self, client: &str, d: &Decision) {
        let i = outcome_index(d);
        if let Some(c) = self.decisions.read().get(client) {
            c[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut map = self.decisions.write();
        if map.len() >= MAX_CLIENT_LABELS && !map.contains_key(client) {
            drop(map);
            self.other[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        map.entry(Arc::from(client)).or_default()[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Count one OAuth error response.
    pub(crate) fn error(&self, endpoint: &'static str, error: &'static str) {
        *self.errors.lock().entry((endpoint, error)).or_default() += 1;
    }

    /// Count one revocation.
    pub(crate) fn revocation(&self, reason: &'static str) {
        *self.revocations.lock().entry(reason).or_default() += 1;
    }

    /// The decisions counted for `client` with `outcome`.
    #[cfg(test)]
    pub(crate) fn decisions_of(&self, client: &str, outcome: &str) -> u64 {
        let i = (0..OUTCOMES).find(|i| outcome_name(*i) == outcome).unwrap();
        self.decisions
            .read()
            .get(client)
            .map_or(0, |c| c[i].load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self, engine: &Engine) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP refresh_guard_decisions_total Engine decisions made by this server, by client and outcome.\n\
             # TYPE refresh_guard_decisions_total counter\n",
        );
        let mut rows: Vec<(Arc<str>, Arc<Outcomes>)> = self
            .decisions
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut emit = |client: &str, counts: &Outcomes| {
            for (i, c) in counts.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "refresh_guard_decisions_total{{client=\"{}\",outcome=\"{}\"}} {n}",
                        escape(client),
                        outcome_name(i)
                    );
                }
            }
        };
        for (client, counts) in &rows {
            emit(client, counts);
        }
        emit("_other", &self.other);

        let stats = engine.stats();
        out.push_str(
            "# HELP refresh_guard_events_total Security events emitted by the engine, by kind.\n\
             # TYPE refresh_guard_events_total counter\n",
        );
        for (kind, n) in EVENT_KINDS.iter().zip(stats.events.by_kind) {
            let _ = writeln!(out, "refresh_guard_events_total{{kind=\"{kind}\"}} {n}");
        }
        out.push_str(
            "# HELP refresh_guard_revocations_total Token families revoked, by reason.\n\
             # TYPE refresh_guard_revocations_total counter\n",
        );
        for (reason, n) in self.revocations.lock().iter() {
            let _ = writeln!(
                out,
                "refresh_guard_revocations_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = write!(
            out,
            "# HELP refresh_guard_live_families Token family records held (active, and revoked ones until swept).\n\
             # TYPE refresh_guard_live_families gauge\n\
             refresh_guard_live_families {}\n",
            stats.families
        );
        self.redeem_latency.render(
            &mut out,
            "refresh_guard_redeem_duration_seconds",
            "Time to decide a refresh grant, including the wait for durability.",
        );
        let _ = write!(
            out,
            "# HELP refresh_guard_policy_version_info The policy set in force.\n\
             # TYPE refresh_guard_policy_version_info gauge\n\
             refresh_guard_policy_version_info{{version=\"{}\"}} 1\n",
            engine.policies().version()
        );
        let shadow = engine.shadow_report();
        let _ = write!(
            out,
            "# HELP refresh_guard_shadow_policy_info The candidate policy set under shadow evaluation, if any.\n\
             # TYPE refresh_guard_shadow_policy_info gauge\n"
        );
        if let Some(s) = &shadow {
            let _ = writeln!(
                out,
                "refresh_guard_shadow_policy_info{{version=\"{}\"}} 1",
                s.candidate
            );
        }
        out.push_str(
            "# HELP refresh_guard_oauth_errors_total OAuth error responses, by endpoint and error code.\n\
             # TYPE refresh_guard_oauth_errors_total counter\n",
        );
        for ((endpoint, error), n) in self.errors.lock().iter() {
            let _ = writeln!(
                out,
                "refresh_guard_oauth_errors_total{{endpoint=\"{endpoint}\",error=\"{error}\"}} {n}"
            );
        }
        let (public, admin) = (&self.public_connections, &self.admin_connections);
        let _ = write!(
            out,
            "# HELP refresh_guard_http_connections_open Open connections on the public listener.\n\
             # TYPE refresh_guard_http_connections_open gauge\n\
             refresh_guard_http_connections_open {}\n\
             # HELP refresh_guard_http_connections_total Connections accepted on the public listener.\n\
             # TYPE refresh_guard_http_connections_total counter\n\
             refresh_guard_http_connections_total {}\n",
            public.open.load(Ordering::Relaxed),
            public.accepted.load(Ordering::Relaxed),
        );
        out.push_str(
            "# HELP refresh_guard_http_connections_refused_total Connections closed as soon as accepted, by listener and reason.\n\
             # TYPE refresh_guard_http_connections_refused_total counter\n",
        );
        for (listener, c) in [("public", public), ("admin", admin)] {
            let _ = writeln!(
                out,
                "refresh_guard_http_connections_refused_total{{listener=\"{listener}\",reason=\"per_source_cap\"}} {}",
                c.refused_per_source.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP refresh_guard_http_connections_closed_total Connections the server closed before the client did, by listener and reason.\n\
             # TYPE refresh_guard_http_connections_closed_total counter\n",
        );
        for (listener, c) in [("public", public), ("admin", admin)] {
            let _ = writeln!(
                out,
                "refresh_guard_http_connections_closed_total{{listener=\"{listener}\",reason=\"first_request_timeout\"}} {}",
                c.first_request_timeouts.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "refresh_guard_http_connections_closed_total{{listener=\"{listener}\",reason=\"evicted\"}} {}",
                c.evicted.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// Escape a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{Accepted, Denied};
    use crate::policy::PolicySet;
    use crate::token::{FamilyId, Generation, TokenKind};

    fn deny(reason: DenyReason) -> Decision {
        Decision::Deny(Denied {
            reason,
            family: None,
            policy_version: PolicySet::default().version(),
        })
    }

    #[test]
    fn every_outcome_has_a_slot_and_its_name() {
        for r in DenyReason::ALL {
            assert_eq!(outcome_name(outcome_index(&deny(r))), r.as_str());
        }
        let a = Decision::Accept(Accepted {
            token: crate::token::assemble(
                TokenKind::Refresh,
                crate::token::KeyId(0),
                &FamilyId::from_bytes([1; 16]),
                Generation::FIRST,
                &[0; 16],
            ),
            family: FamilyId::from_bytes([1; 16]),
            generation: Generation::FIRST,
            kind: AcceptKind::GraceReplay,
            policy_version: PolicySet::default().version(),
        });
        assert_eq!(outcome_name(outcome_index(&a)), "grace_replay");
    }

    #[test]
    fn client_labels_are_capped_and_escaped() {
        let m = Metrics::default();
        for i in 0..MAX_CLIENT_LABELS + 5 {
            m.decision(&format!("c{i}"), &deny(DenyReason::InvalidToken));
        }
        m.decision("we\"ird", &deny(DenyReason::Revoked));
        assert_eq!(m.decisions.read().len(), MAX_CLIENT_LABELS);
        assert_eq!(m.decisions_of("c0", "invalid_token"), 1);
        let engine = Engine::builder().build().unwrap();
        let text = m.render(&engine);
        assert!(text.contains(
            "refresh_guard_decisions_total{client=\"_other\",outcome=\"invalid_token\"} 5"
        ));
        assert!(
            text.contains("refresh_guard_decisions_total{client=\"_other\",outcome=\"revoked\"} 1")
        );
    }

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(3));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.00005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
