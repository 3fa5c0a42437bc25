//! Plain HTTP proxying: headers, streaming bodies, keep-alive, backend failures, bad requests.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::util::*;

const ALLOW_ALL: &str = "[defaults]\naction = \"allow\"\n";

#[tokio::test]
async fn forwarding_headers_like_nginx_and_hop_by_hop_removed() {
    let backend = http_backend().await;
    let proxy = start_proxy(ALLOW_ALL, backend.addr, "").await;
    let (status, _, body) = get(
        proxy.addr,
        "/headers",
        &[
            ("X-Forwarded-For", "203.0.113.9"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("X-End-To-End", "kept"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = body.lines().collect();
    assert!(
        lines.contains(&"host: devices.test"),
        "Host not preserved: {body}"
    );
    assert!(
        lines.contains(&"x-forwarded-for: 203.0.113.9, 127.0.0.1"),
        "{body}"
    );
    assert!(lines.contains(&"x-forwarded-proto: http"), "{body}");
    assert!(
        lines.contains(&"forwarded: for=127.0.0.1;proto=http;host=\"devices.test\""),
        "{body}"
    );
    assert!(lines.contains(&"x-end-to-end: kept"), "{body}");
    assert!(
        !body.contains("x-hop"),
        "listed hop-by-hop header leaked: {body}"
    );
    assert!(!body.contains("keep-alive"), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn streams_large_request_and_response_bodies() {
    let backend = http_backend().await;
    let proxy = start_proxy(ALLOW_ALL, backend.addr, "").await;
    let client = reqwest_like_client();
    // 32 MiB down, streamed by the backend in chunks.
    let size = 32 * 1024 * 1024;
    let (status, len) = client.get_len(proxy.addr, &format!("/stream/{size}")).await;
    assert_eq!((status, len), (200, size));
    // 16 MiB up with chunked transfer encoding.
    let (status, body) = client
        .post_chunked(proxy.addr, "/upload", 16 * 1024 * 1024)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, (16 * 1024 * 1024).to_string());
    proxy.stop().await;
}

#[tokio::test]
async fn keep_alive_is_reused_on_both_sides() {
    let backend = http_backend().await;
    let proxy = start_proxy(ALLOW_ALL, backend.addr, "").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for i in 0..5 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("backend ok") {
            let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(
                n > 0,
                "proxy closed a keep-alive connection after request {i}"
            );
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(backend.requests(), 5);
    assert_eq!(
        backend.connections(),
        1,
        "the pooled upstream connection was not reused"
    );
    proxy.stop().await;
}

/// A backend that answers one request per connection as if keep-alive, then closes the socket
/// (what a backend's keep-alive timeout does): fwgate must notice the pooled connection is
/// gone and send the next request on a fresh one instead of answering 502.
#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_not_used() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // No `Connection: close`: the proxy learns of the close only from the socket.
            });
        }
    });
    let proxy = start_proxy(ALLOW_ALL, addr, "").await;
    for i in 0..10 {
        let (status, _, body) = get(proxy.addr, "/", &[]).await;
        assert_eq!((status, body.as_str()), (200, "ok"), "request {i}");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 10);
    proxy.stop().await;
}

/// A backend may answer before it has read the whole request body (an early 4xx, say). Its
/// connection is then still busy sending that body, and a second request must not wait for it:
/// it gets a connection of its own.
#[tokio::test]
async fn a_request_does_not_wait_for_a_backend_connection_still_busy() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    // Answers at once, whatever body is still to come.
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let proxy = start_proxy(ALLOW_ALL, addr, "").await;
    // Client A: announces 1000 body bytes, sends 10, and holds the rest back.
    let mut a = TcpStream::connect(proxy.addr).await.unwrap();
    a.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"early") {
        let n = tokio::time::timeout(DEADLINE, a.read(&mut buf))
            .await
            .expect("client A got no early answer")
            .unwrap();
        assert!(n > 0, "client A's connection closed");
        got.extend_from_slice(&buf[..n]);
    }
    // Client B, while A's backend connection is still waiting for the rest of A's body.
    let (status, _, body) = tokio::time::timeout(DEADLINE, get(proxy.addr, "/", &[]))
        .await
        .expect("the second request waited on the busy backend connection");
    assert_eq!((status, body.as_str()), (200, "early"));
    drop(a);
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_without_host_gets_the_backend_address_as_host() {
    let backend = http_backend().await;
    let proxy = start_proxy(ALLOW_ALL, backend.addr, "").await;
    let resp = raw_exchange(proxy.addr, b"GET /headers HTTP/1.0\r\n\r\n").await;
    let (status, _, body) = split_response(&resp);
    assert_eq!(status, 200, "{resp}");
    let expected = format!("host: {}", backend.addr);
    assert!(body.lines().any(|l| l == expected), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn with_pool_max_idle_zero_every_request_gets_a_new_backend_connection() {
    let backend = http_backend().await;
    let proxy = start_proxy(ALLOW_ALL, backend.addr, "[upstream]\npool_max_idle = 0\n").await;
    for _ in 0..3 {
        let (status, _, _) = get(proxy.addr, "/", &[]).await;
        assert_eq!(status, 200);
    }
    assert_eq!(backend.connections(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn backend_unreachable_is_502() {
    // Bind then drop: nothing listens on this port any more.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start_proxy(ALLOW_ALL, dead, "").await;
    let (status, _, body) = get(proxy.addr, "/", &[]).await;
    assert_eq!((status, body.as_str()), (502, "backend unreachable\n"));
    let n = metric(
        &proxy,
        "fwgate_upstream_requests_total{outcome=\"connect_error\"}",
    )
    .await;
    assert_eq!(n, Some(1.0));
    proxy.stop().await;
}

#[tokio::test]
async fn backend_that_never_answers_is_504() {
    // Accepts TCP, never responds: the response timeout fires.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let proxy = start_proxy(
        ALLOW_ALL,
        addr,
        "[upstream]\nresponse_timeout = \"300ms\"\n",
    )
    .await;
    let started = std::time::Instant::now();
    let (status, _, body) = get(proxy.addr, "/", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (504, "backend response timed out\n")
    );
    assert!(started.elapsed() < DEADLINE);
    holder.abort();
    proxy.stop().await;
}

#[tokio::test]
async fn backend_connect_timeout_is_504() {
    // A listener with a full backlog that is never accepted makes further connects hang on
    // Linux (SYNs are dropped), which is a connect timeout without leaving loopback.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(0).unwrap();
    let addr = full.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let proxy = start_proxy(ALLOW_ALL, addr, "[upstream]\nconnect_timeout = \"300ms\"\n").await;
    let (status, _, body) = get(proxy.addr, "/", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (504, "backend connect timed out\n")
    );
    drop(full);
    proxy.stop().await;
}

#[tokio::test]
async fn malformed_request_gets_400_and_proxy_keeps_serving() {
    let backend = http_backend().await;
    let proxy = start_proxy(ALLOW_ALL, backend.addr, "").await;
    let resp = raw_exchange(proxy.addr, b"GARBAGE\x01\x02 / NOT-HTTP\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "got {resp:?}");
    let resp = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "got {resp:?}");
    let (status, _, _) = get(proxy.addr, "/", &[]).await;
    assert_eq!(status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn oversize_head_is_refused_with_431() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        ALLOW_ALL,
        backend.addr,
        "[listen]\nmax_header_bytes = 8192\n",
    )
    .await;
    let big = "a".repeat(20_000);
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let resp = raw_exchange(proxy.addr, req.as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "got {:?}",
        &resp[..resp.len().min(100)]
    );
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

/// A tiny HTTP/1.1 client over raw sockets for large bodies (keeps the dependency list short).
struct RawClient;

fn reqwest_like_client() -> RawClient {
    RawClient
}

impl RawClient {
    async fn get_len(&self, addr: std::net::SocketAddr, path: &str) -> (u16, usize) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut all))
            .await
            .unwrap()
            .unwrap();
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = &all[split + 4..];
        let len = if head.contains("transfer-encoding: chunked") {
            dechunk_len(body)
        } else {
            body.len()
        };
        (status, len)
    }

    async fn post_chunked(
        &self,
        addr: std::net::SocketAddr,
        path: &str,
        total: usize,
    ) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let chunk = vec![b'y'; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            s.write_all(format!("{n:x}\r\n").as_bytes()).await.unwrap();
            s.write_all(&chunk[..n]).await.unwrap();
            s.write_all(b"\r\n").await.unwrap();
            sent += n;
        }
        s.write_all(b"0\r\n\r\n").await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut all))
            .await
            .unwrap()
            .unwrap();
        let (status, _, body) = split_response(&String::from_utf8_lossy(&all));
        (status, body)
    }
}

fn dechunk_len(mut body: &[u8]) -> usize {
    let mut total = 0;
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..line_end]).unwrap().trim(), 16)
                .unwrap();
        if size == 0 {
            return total;
        }
        total += size;
        body = &body[line_end + 2 + size + 2..];
    }
}
