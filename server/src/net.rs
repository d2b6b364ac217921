//! The accept loop: HTTP/1.1 connections with a deadline for the first
//! request, a header timeout (also the keep-alive idle timeout), a cap on
//! concurrent connections and one per source, the TCP peer address handed
//! to handlers, and graceful shutdown.
//!
//! `axum::serve` offers neither the caps nor the timeout, so connections
//! are driven with hyper directly and the router is called per request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::Service as _;

use super::budget::{Budget, Slot};
use super::limits::{SourceClaim, Sources};
use super::metrics::ConnCounters;

/// The TCP peer of the connection a request came on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// Completes once `stop` is true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it at once.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Per-connection settings.
#[derive(Clone, Debug)]
pub(crate) struct ConnOptions {
    pub(crate) header_timeout: Duration,
    /// Time from accept to the first request's complete headers; a
    /// connection without one by then is closed.
    pub(crate) first_request_timeout: Duration,
}

/// What bounds one listener's connections.
#[derive(Clone)]
pub(crate) struct Limits {
    /// `"public"` or `"admin"`, for logs.
    pub(crate) listener: &'static str,
    pub(crate) budget: Arc<Budget>,
    pub(crate) sources: Arc<Sources>,
    pub(crate) counters: Arc<ConnCounters>,
}

/// Accept connections until `stop` turns true. A connection whose source
/// already holds its cap is closed at once; the others each hold a slot of
/// the budget for their lifetime, taking an idle connection's when none is
/// free. While every connection is mid-request the accept loop waits (and
/// newcomers in the kernel's backlog).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    options: ConnOptions,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off
                    // rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let Some(claim) = limits.sources.claim(peer.ip()) else {
            limits
                .counters
                .refused_per_source
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                listener = limits.listener,
                peer = %peer,
                "connection refused: its source holds the per-source cap"
            );
            // A reset rather than a FIN: nothing was said on this
            // connection, and the server keeps no TIME_WAIT state for it.
            let _ = stream.set_zero_linger();
            continue;
        };
        let Some(slot) = limits.budget.slot(claim.source(), &mut stop).await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        limits.counters.accepted.fetch_add(1, Ordering::Relaxed);
        limits.counters.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(
            stream,
            peer,
            router.clone(),
            options.clone(),
            stop.clone(),
            (limits.listener, limits.counters.clone()),
            (claim, slot),
        ));
    }
}

/// Serve one connection until it ends, misses the first-request deadline,
/// gives way to a newcomer or the server stops; `held` is returned when it
/// does.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    options: ConnOptions,
    mut stop: watch::Receiver<bool>,
    (listener, counters): (&'static str, Arc<ConnCounters>),
    held: (SourceClaim, Slot),
) {
    let slot = &held.1;
    let phases = slot.phases();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        // Called on the connection's task as soon as the headers are in,
        // so the task sees the request begun whenever it looks.
        phases.begin();
        req.extensions_mut().insert(Peer(peer));
        let mut router = router.clone();
        let phases = phases.clone();
        async move {
            let resp: Result<_, Infallible> = router.call(req.map(Body::new)).await;
            phases.end();
            resp
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    let mut conn = builder.serve_connection(TokioIo::new(stream), service);
    // hyper's header timeout starts over for each request and is also
    // the keep-alive idle timeout; a client that never gets a request in
    // gets this shorter deadline, so that idle sockets let go of their
    // slots quickly.
    let first = tokio::time::sleep(options.first_request_timeout.min(options.header_timeout));
    tokio::pin!(first);
    let mut awaiting_first = true;
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = &mut first, if awaiting_first => {
                awaiting_first = false;
                if slot.is_fresh() {
                    counters.first_request_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        listener,
                        peer = %peer,
                        "connection closed: no request before the first-request deadline"
                    );
                    // A reset: there is no response to flush, and the
                    // server keeps no TIME_WAIT state for the socket.
                    let _ = conn.into_parts().io.inner().set_zero_linger();
                    break;
                }
            }
            _ = slot.evicted() => {
                counters.evicted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(listener, peer = %peer, "idle connection gave way to a new one");
                if slot.is_fresh() {
                    let _ = conn.into_parts().io.inner().set_zero_linger();
                } else {
                    // Closes at once if idle; a request that began since
                    // it was chosen is answered first.
                    std::pin::Pin::new(&mut conn).graceful_shutdown();
                    let _ = conn.await;
                }
                break;
            }
            _ = stopped(&mut stop) => {
                // Finish the request in flight, then close.
                std::pin::Pin::new(&mut conn).graceful_shutdown();
                let _ = conn.await;
                break;
            }
        }
    }
    counters.open.fetch_sub(1, Ordering::Relaxed);
    drop(held);
}
