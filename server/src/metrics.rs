//! What `/metrics` exposes: the engine's own counters, read from its
//! [`Engine::stats`] snapshot at each scrape, and what only the server sees
//! (decisions per client, refresh latency, OAuth errors, connections),
//! counted here without locks on the request path. Both are encoded by
//! `prometheus-client` in the OpenMetrics text format.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use refresh_guard::{AcceptKind, Decision, DenyReason, EVENT_KINDS, Engine, Profile, RevokeReason};

/// The media type of the exposition.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// A latency histogram with fixed buckets, lock-free to observe.
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

    /// Sum in seconds, count, and per-bucket (not cumulative) counts with
    /// their upper bounds in seconds, the last one `+Inf`: the shape
    /// `prometheus-client` encodes.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let count = self.count.load(Ordering::Relaxed);
        let mut below = 0;
        let mut buckets: Vec<(f64, u64)> = BUCKETS_US
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| {
                let c = c.load(Ordering::Relaxed);
                below += c;
                (*b as f64 / 1e6, c)
            })
            .collect();
        buckets.push((f64::INFINITY, count.saturating_sub(below)));
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
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

    /// The decisions counted for `client` with `outcome`.
    #[cfg(test)]
    pub(crate) fn decisions_of(&self, client: &str, outcome: &str) -> u64 {
        let i = (0..OUTCOMES).find(|i| outcome_name(*i) == outcome).unwrap();
        self.decisions
            .read()
            .get(client)
            .map_or(0, |c| c[i].load(Ordering::Relaxed))
    }

    /// The exposition of these counters and `engine`'s, as of now.
    /// `profiles`: those whose controls not met are reported.
    pub(crate) fn render(
        self: &Arc<Self>,
        engine: &Arc<Engine>,
        profiles: &[&'static Profile],
    ) -> String {
        let mut registry = Registry::with_prefix("refresh_guard");
        registry.register_collector(Box::new(Scrape {
            server: self.clone(),
            engine: engine.clone(),
            profiles: profiles.to_vec(),
        }));
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// One scrape: reads both sides' counters when the registry encodes it.
struct Scrape {
    server: Arc<Metrics>,
    engine: Arc<Engine>,
    profiles: Vec<&'static Profile>,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let server = &self.server;
        let stats = self.engine.stats();

        let mut m = enc.encode_descriptor(
            "decisions",
            "Engine decisions made by this server, by client and outcome.",
            None,
            MetricType::Counter,
        )?;
        let mut rows: Vec<(Arc<str>, Arc<Outcomes>)> = server
            .decisions
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let named = rows.iter().map(|(c, o)| (&**c, &**o));
        for (client, counts) in named.chain([("_other", &server.other)]) {
            for (i, c) in counts.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let labels = [("client", client), ("outcome", outcome_name(i))];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }

        let mut m = enc.encode_descriptor(
            "events",
            "Security events emitted by the engine, by kind.",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in EVENT_KINDS.iter().zip(stats.events.by_kind) {
            ConstCounter::new(n).encode(m.encode_family(&[("kind", *kind)])?)?;
        }

        let mut m = enc.encode_descriptor(
            "revocations",
            "Token families revoked, by reason.",
            None,
            MetricType::Counter,
        )?;
        for reason in RevokeReason::ALL {
            let n = stats.events.revoked(reason);
            ConstCounter::new(n).encode(m.encode_family(&[("reason", reason.as_str())])?)?;
        }

        ConstGauge::new(stats.families as u64).encode(enc.encode_descriptor(
            "live_families",
            "Token family records held (active, and revoked ones until swept).",
            None,
            MetricType::Gauge,
        )?)?;

        let (sum, count, buckets) = server.redeem_latency.snapshot();
        enc.encode_descriptor(
            "redeem_duration",
            "Time to decide a refresh grant, including the wait for durability.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;

        let version = self.engine.policies().version().to_string();
        enc.encode_descriptor(
            "policy_version",
            "The policy set in force.",
            None,
            MetricType::Info,
        )?
        .encode_info(&[("version", version.as_str())])?;

        // Checked against the set in force at each scrape, so it follows
        // every reload and promotion without bookkeeping; a scrape is rare
        // and off the redemption path.
        let mut m = enc.encode_descriptor(
            "profile_controls_not_met",
            "Required controls of a compliance profile that the policy set in \
             force does not meet, by profile and scope (defaults or clients.<id>).",
            None,
            MetricType::Gauge,
        )?;
        if !self.profiles.is_empty() {
            let set = self.engine.policies();
            for p in &self.profiles {
                for scope in set.check_profile(p).scopes {
                    let labels = [("profile", p.name), ("scope", scope.scope.as_str())];
                    ConstGauge::new(scope.not_met as u64).encode(m.encode_family(&labels)?)?;
                }
            }
        }

        let mut m = enc.encode_descriptor(
            "shadow_policy",
            "The candidate policy set under shadow evaluation, if any.",
            None,
            MetricType::Info,
        )?;
        if let Some(s) = self.engine.shadow_report() {
            let candidate = s.candidate.to_string();
            m.encode_info(&[("version", candidate.as_str())])?;
        }

        let mut m = enc.encode_descriptor(
            "oauth_errors",
            "OAuth error responses, by endpoint and error code.",
            None,
            MetricType::Counter,
        )?;
        for ((endpoint, error), n) in server.errors.lock().iter() {
            let labels = [("endpoint", *endpoint), ("error", *error)];
            ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
        }

        let (public, admin) = (&server.public_connections, &server.admin_connections);
        ConstGauge::new(public.open.load(Ordering::Relaxed)).encode(enc.encode_descriptor(
            "http_connections_open",
            "Open connections on the public listener.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(public.accepted.load(Ordering::Relaxed)).encode(
            enc.encode_descriptor(
                "http_connections",
                "Connections accepted on the public listener.",
                None,
                MetricType::Counter,
            )?,
        )?;
        let listeners = [("public", public), ("admin", admin)];
        let mut m = enc.encode_descriptor(
            "http_connections_refused",
            "Connections closed as soon as accepted, by listener and reason.",
            None,
            MetricType::Counter,
        )?;
        for (listener, c) in listeners {
            let labels = [("listener", listener), ("reason", "per_source_cap")];
            let n = c.refused_per_source.load(Ordering::Relaxed);
            ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
        }
        let mut m = enc.encode_descriptor(
            "http_connections_closed",
            "Connections the server closed before the client did, by listener and reason.",
            None,
            MetricType::Counter,
        )?;
        for (listener, c) in listeners {
            for (reason, n) in [
                ("first_request_timeout", &c.first_request_timeouts),
                ("evicted", &c.evicted),
            ] {
                let labels = [("listener", listener), ("reason", reason)];
                ConstCounter::new(n.load(Ordering::Relaxed)).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refresh_guard::{Denied, IssueRequest, PolicySet};

    fn deny(reason: DenyReason) -> Decision {
        Decision::Deny(Denied {
            reason,
            family: None,
            policy_version: PolicySet::default().version(),
        })
    }

    fn engine() -> Arc<Engine> {
        Arc::new(Engine::builder().build().unwrap())
    }

    #[test]
    fn every_outcome_has_a_slot_and_its_name() {
        for r in DenyReason::ALL {
            assert_eq!(outcome_name(outcome_index(&deny(r))), r.as_str());
        }
        let issued = engine()
            .issue(&IssueRequest {
                client: "c",
                subject: "s",
                scope: "",
                ip: Some([192, 0, 2, 1].into()),
            })
            .unwrap();
        let mut replay = issued.accepted().unwrap().clone();
        replay.kind = AcceptKind::GraceReplay;
        let a = Decision::Accept(replay);
        assert_eq!(outcome_name(outcome_index(&a)), "grace_replay");
    }

    #[test]
    fn client_labels_are_capped_and_escaped() {
        let m = Arc::new(Metrics::default());
        for i in 0..MAX_CLIENT_LABELS + 5 {
            m.decision(&format!("c{i}"), &deny(DenyReason::InvalidToken));
        }
        m.decision("we\"ird", &deny(DenyReason::Revoked));
        assert_eq!(m.decisions.read().len(), MAX_CLIENT_LABELS);
        assert_eq!(m.decisions_of("c0", "invalid_token"), 1);
        let text = m.render(&engine(), &[]);
        assert!(text.contains(
            "refresh_guard_decisions_total{client=\"_other\",outcome=\"invalid_token\"} 5"
        ));
        assert!(
            text.contains("refresh_guard_decisions_total{client=\"_other\",outcome=\"revoked\"} 1")
        );
        let m = Arc::new(Metrics::default());
        m.decision("we\"ird\\\n", &deny(DenyReason::Revoked));
        let text = m.render(&engine(), &[]);
        assert!(
            text.contains(
                "refresh_guard_decisions_total{client=\"we\\\"ird\\\\\\n\",outcome=\"revoked\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn histogram_is_cumulative() {
        let m = Arc::new(Metrics::default());
        let h = &m.redeem_latency;
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(3));
        let out = m.render(&engine(), &[]);
        let x = "refresh_guard_redeem_duration_seconds";
        assert!(
            out.contains(&format!("{x}_bucket{{le=\"0.00005\"}} 1\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{x}_bucket{{le=\"0.001\"}} 2\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{x}_bucket{{le=\"1.0\"}} 2\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{x}_bucket{{le=\"+Inf\"}} 3\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{x}_count 3\n")), "{out}");
        assert!(out.contains(&format!("# TYPE {x} histogram\n")), "{out}");
        assert!(out.contains(&format!("# UNIT {x} seconds\n")), "{out}");
    }
}
