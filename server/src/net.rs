//! The accept loop: HTTP/1.1 connections with a header timeout (also the
//! keep-alive idle timeout), a cap on concurrent connections, the TCP peer
//! address handed to handlers, and graceful shutdown.
//!
//! `axum::serve` offers neither the cap nor the timeout, so connections are
//! driven with hyper directly and the router is called per request.

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
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::Service as _;

use super::metrics::Metrics;

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
}

/// Accept connections until `stop` turns true; each connection holds one
/// permit of `limit` for its lifetime, so at most that many are open and
/// the rest wait in the kernel's backlog.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limit: Arc<Semaphore>,
    options: ConnOptions,
    mut stop: watch::Receiver<bool>,
    metrics: Option<Arc<Metrics>>,
) {
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stopped(&mut stop) => return,
        };
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
        let _ = stream.set_nodelay(true);
        if let Some(m) = &metrics {
            m.connections_total.fetch_add(1, Ordering::Relaxed);
            m.connections_open.fetch_add(1, Ordering::Relaxed);
        }
        let router = router.clone();
        let mut stop = stop.clone();
        let options = options.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                let mut router = router.clone();
                async move {
                    let resp: Result<_, Infallible> = router.call(req.map(Body::new)).await;
                    resp
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(options.header_timeout)
                .max_buf_size(64 * 1024)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                }
                _ = stopped(&mut stop) => {
                    // Finish the request in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            if let Some(m) = &metrics {
                m.connections_open.fetch_sub(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
}
