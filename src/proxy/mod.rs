//! The device-facing side: accept, read a bounded request head, decide, refuse cheaply or
//! forward (plain HTTP streamed, upgrades tunnelled).
//!
//! One connection, in order: accept → HTTP/1.1 head read (bounded time and size, hyper answers
//! 400/431 itself for malformed or oversize heads) → one rules snapshot → extract and parse the
//! version → decide → refuse with a static response, or forward → for an upgrade, return the
//! 101 and join both ends in a task registered with the connection registry.

pub mod forward;
pub mod response;
pub mod tunnel;

mod service;

use std::future::Future;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::gate::Gate;

/// Accepts device connections until `shutdown` resolves, then lets every open HTTP exchange
/// finish (keep-alive connections close after their current request) and returns.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>, shutdown: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Each connection task holds a sender; when all are dropped, every connection has ended.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE/ENFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        gate.metrics.connections_accepted.inc();
        let _ = stream.set_nodelay(true);
        let gate = gate.clone();
        let mut stop = stop_rx.clone();
        let alive = alive_tx.clone();
        tokio::spawn(async move {
            let _alive = alive;
            let svc = service_fn({
                let gate = gate.clone();
                move |req| service::handle(gate.clone(), peer, req)
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(gate.config.listen.header_read_timeout)
                .max_buf_size(gate.config.listen.max_header_bytes)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::pin!(conn);
            let stopping = async {
                // The watch guard is dropped inside this block, before any other await.
                let _ = stop.wait_for(|s| *s).await.map(|_| ());
            };
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stopping => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(client = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    let _ = stop_tx.send(true);
    drop(alive_tx);
    // Resolves when every connection task has dropped its sender.
    let _ = alive_rx.recv().await;
}
