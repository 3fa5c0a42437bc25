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

/// Over `[limits] max_connections`: answer a static 503 without parsing anything, then close.
async fn refuse_at_accept(gate: Arc<Gate>, mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    let decider = &gate.limit_deciders.max_connections;
    let retry = match gate.refuse_by(decider, None) {
        crate::gate::Verdict::Refuse(r, _) => r.retry_after_secs().unwrap_or(10),
        crate::gate::Verdict::Forward(_) => 10,
    };
    let body = "too many open connections, retry later\n";
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: {retry}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

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
        let Some(slot) = gate.global.connection() else {
            tokio::spawn(refuse_at_accept(gate.clone(), stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let gate = gate.clone();
        let mut stop = stop_rx.clone();
        let alive = alive_tx.clone();
        // Shared with every request on the connection, and handed to a tunnel on upgrade, so the
        // slot stays taken for as long as anything of the connection is open.
        let slot = Arc::new(slot);
        tokio::spawn(async move {
            let _alive = alive;
            let svc = service_fn({
                let gate = gate.clone();
                let slot = slot.clone();
                move |req| service::handle(gate.clone(), peer, slot.clone(), req)
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
