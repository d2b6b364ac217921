//! The server's event sink: every engine event becomes one structured log
//! record (JSON when logs are). The engine counts them itself, for
//! `/metrics`.

use refresh_guard::{Event, EventKind, EventSink};

/// Logs each event through `tracing` (target `refresh_guard::event`).
/// Events carry ids, never token material.
pub(crate) struct LogSink;

impl EventSink for LogSink {
    fn emit(&self, e: &Event) {
        let detail = match &e.kind {
            EventKind::ReuseDetected {
                presented,
                current,
                response,
            } => format!("presented generation {presented}, current {current}; {response}"),
            EventKind::FamilyRevoked { reason } => format!("reason {reason}"),
            EventKind::ClientMismatch { presented_client } => {
                format!("presented by client {presented_client}")
            }
            EventKind::StateRollback { presented, current } => {
                format!("presented generation {presented}, current {current}")
            }
            EventKind::CapEviction { cap } => format!("cap {cap}"),
            EventKind::PolicySwapped { from } => format!("replaced {from}"),
            EventKind::PolicyReloadFailed { errors } => errors.join("; "),
            EventKind::CodeReplay { revoked } => format!("revoked {revoked}"),
            // `EventKind` is non-exhaustive: a kind added to the engine
            // is logged with its name and ids until it gets a detail here.
            _ => String::new(),
        };
        let family = e.family.map(|f| f.to_string()).unwrap_or_default();
        let client = e.client.as_deref().unwrap_or("");
        let subject = e.subject.as_deref().unwrap_or("");
        let ip = e.ip.map(|ip| ip.to_string()).unwrap_or_default();
        macro_rules! log {
            ($level:ident) => {
                tracing::$level!(
                    target: "refresh_guard::event",
                    event = e.kind.as_str(),
                    family,
                    client,
                    subject,
                    ip,
                    policy_version = %e.policy_version,
                    at_ms = e.at.as_millis(),
                    detail,
                    "security event"
                )
            };
        }
        match e.kind {
            EventKind::PolicySwapped { .. } => log!(info),
            _ => log!(warn),
        }
    }
}
