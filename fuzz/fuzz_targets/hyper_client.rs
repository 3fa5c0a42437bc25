#![allow(dead_code)] // each target uses part of it
//! Shared by the differential targets: hyper's HTTP/1.1 client (the one fwgate's hyper path
//! forwards with) reading a backend's bytes, over an in-memory pipe, on a per-thread runtime.

use std::cell::RefCell;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;

/// What hyper's client made of a response to a `GET`.
#[derive(Debug)]
pub enum HyperVerdict {
    /// Refused (an error before or while reading the head).
    Refused,
    /// The final status, the exact body length hyper announces (if any), and the body read to
    /// its end (None: reading it failed).
    Response {
        status: u16,
        exact_length: Option<u64>,
        body: Option<Vec<u8>>,
    },
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Sends `GET / HTTP/1.1` to a "backend" that answers `backend` and then closes.
pub fn get(backend: &[u8]) -> HyperVerdict {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        });
        rt.block_on(exchange(backend.to_vec()))
    })
}

async fn exchange(backend: Vec<u8>) -> HyperVerdict {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let writer = tokio::spawn(async move {
        // Answer only once the request is in: bytes before a request are an error to hyper.
        let mut request = Vec::new();
        let mut buf = [0u8; 512];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::io::AsyncReadExt::read(&mut server, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let _ = server.write_all(&backend).await;
        let _ = server.shutdown().await;
        // Keep the read side alive until the client is done.
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut server, &mut sink).await;
    });
    let run = async {
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client)).await
        else {
            return HyperVerdict::Refused;
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get("/")
            .header("host", "backend")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let Ok(resp) = sender.send_request(req).await else {
            return HyperVerdict::Refused;
        };
        let status = resp.status().as_u16();
        let exact_length = resp.body().size_hint().exact();
        let body = resp
            .into_body()
            .collect()
            .await
            .ok()
            .map(|b| b.to_bytes().to_vec());
        HyperVerdict::Response {
            status,
            exact_length,
            body,
        }
    };
    let verdict = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap_or(HyperVerdict::Refused);
    writer.abort();
    verdict
}
