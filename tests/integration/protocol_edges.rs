//! Protocol edges, one behaviour on both HTTP paths (the fast path and hyper's): every
//! scenario runs once with `fast_path = true` and once with `fast_path = false`. Requests are
//! raw bytes; backends are raw scripts where the backend's own bytes matter.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::util::*;

const ADMIT_ALL: &str = "[defaults]\naction = \"allow\"\nmissing = \"allow\"\n";
const PATHS: [(&str, &str); 2] = [
    ("fast path", ""),
    ("hyper", "[listen]\nfast_path = false\n"),
];

/// A raw backend: for each connection, reads one request head, writes `answer`, then closes
/// (`close`) or keeps the connection open without a byte more.
async fn raw_backend(answer: &'static [u8], close: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                if s.write_all(answer).await.is_err() || close {
                    return;
                }
                let mut sink = [0u8; 512];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// Sends `request` on a new connection and reads until the proxy closes it, or `wait` passes
/// (then `closed` is false). Returns (everything read, closed).
async fn exchange_until_close(addr: SocketAddr, request: &[u8], wait: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(wait, s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The backend's view of a request: its header lines from the `/headers` echo, sorted.
async fn echoed_headers(proxy: &Proxy, request: &str) -> Vec<String> {
    let (status, _, body) = split_response(&raw_exchange(proxy.addr, request.as_bytes()).await);
    assert_eq!(status, 200, "{body}");
    let mut lines: Vec<String> = body.lines().map(str::to_ascii_lowercase).collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn an_http_1_0_upgrade_is_forwarded_as_a_plain_request() {
    let backend = http_backend().await;
    for (name, extra) in PATHS {
        let proxy = start_proxy(ADMIT_ALL, backend.addr, extra).await;
        let seen = echoed_headers(
            &proxy,
            "GET /headers HTTP/1.0\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await;
        assert!(
            !seen
                .iter()
                .any(|l| l.starts_with("upgrade") || l.contains("connection: upgrade")),
            "{name}: {seen:?}"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn content_length_reaches_the_backend_in_plain_decimal() {
    let backend = http_backend().await;
    for (name, extra) in PATHS {
        let proxy = start_proxy(ADMIT_ALL, backend.addr, extra).await;
        let seen = echoed_headers(
            &proxy,
            "POST /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0010\r\n\r\n0123456789",
        )
        .await;
        assert!(
            seen.contains(&"content-length: 10".to_string()),
            "{name}: {seen:?}"
        );
        assert!(!seen.iter().any(|l| l.contains("0010")), "{name}: {seen:?}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn connection_naming_host_or_forwarding_headers_reads_the_same_on_both_paths() {
    let backend = http_backend().await;
    let request = "GET /headers HTTP/1.1\r\nHost: devices.test\r\nConnection: host, x-forwarded-for, forwarded, close\r\nX-Forwarded-For: 10.9.9.9\r\nForwarded: for=10.9.9.9\r\n\r\n";
    let mut views = Vec::new();
    for (name, extra) in PATHS {
        let proxy = start_proxy(ADMIT_ALL, backend.addr, extra).await;
        let seen = echoed_headers(&proxy, request).await;
        let host = format!("host: {}", backend.addr);
        assert!(seen.contains(&host), "{name}: no {host:?} in {seen:?}");
        assert!(
            seen.contains(&"x-forwarded-for: 127.0.0.1".to_string()),
            "{name}: the client's chain survived: {seen:?}"
        );
        assert!(
            !seen.iter().any(|l| l.contains("10.9.9.9")),
            "{name}: {seen:?}"
        );
        views.push(seen);
        proxy.stop().await;
    }
    assert_eq!(views[0], views[1], "the backend saw different heads");
}

#[tokio::test]
async fn a_declined_upgrade_is_answered_then_the_connection_closes() {
    let addr = raw_backend(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope",
        false,
    )
    .await;
    for (name, extra) in PATHS {
        let proxy = start_proxy(ADMIT_ALL, addr, extra).await;
        let (resp, closed) = exchange_until_close(
            proxy.addr,
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            DEADLINE,
        )
        .await;
        let (status, head, body) = split_response(&resp);
        assert_eq!((status, body.as_str()), (403, "nope"), "{name}: {resp:?}");
        assert_eq!(
            header(&head, "connection"),
            Some("close"),
            "{name}: {resp:?}"
        );
        assert!(
            closed,
            "{name}: the connection stayed open after a declined upgrade"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_426_refusal_names_the_protocol_to_upgrade_to() {
    let backend = http_backend().await;
    let rules = "[[rule]]\nname = \"too-old\"\nversions = \"<2.0.0\"\naction = \"deny\"\nstatus = 426\nbody = \"update\"\n";
    for (name, extra) in PATHS {
        let proxy = start_proxy(rules, backend.addr, extra).await;
        let (status, head, _) = get(proxy.addr, "/", &[("X-Firmware-Version", "1.0.0")]).await;
        assert_eq!(status, 426, "{name}");
        assert_eq!(
            header(&head, "upgrade"),
            Some("websocket"),
            "{name}: {head}"
        );
        assert!(
            head.lines()
                .any(|l| l.starts_with("connection:") && l.contains("upgrade")),
            "{name}: {head}"
        );
        proxy.stop().await;
    }
}

/// Backend heads that hyper's client refuses are 502 on both paths.
#[tokio::test]
async fn backend_heads_hyper_refuses_are_502_on_both_paths() {
    for answer in [
        &b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let addr = raw_backend(answer, true).await;
        for (name, extra) in PATHS {
            let proxy = start_proxy(ADMIT_ALL, addr, extra).await;
            let (status, _, _) = get(proxy.addr, "/", &[]).await;
            assert_eq!(status, 502, "{name}: {:?}", String::from_utf8_lossy(answer));
            proxy.stop().await;
        }
    }
}

/// How a backend body is framed is read the same way on both paths: `Connection` cannot take
/// the framing header away, and `chunked,` is not chunked (the body ends at close).
#[tokio::test]
async fn backend_framing_is_read_the_same_on_both_paths() {
    for (answer, close, body) in [
        (
            &b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"[..],
            false,
            "hello",
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
            "hello",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            true,
            "5\r\nhello\r\n0\r\n\r\n",
        ),
    ] {
        let addr = raw_backend(answer, close).await;
        for (name, extra) in PATHS {
            let proxy = start_proxy(ADMIT_ALL, addr, extra).await;
            // Keep-alive: only the framing can end the body for the client.
            let (resp, _) = exchange_until_close(
                proxy.addr,
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                Duration::from_secs(1),
            )
            .await;
            let (status, head, got) = split_response(&resp);
            assert_eq!(status, 200, "{name}: {resp:?}");
            let decoded = if header(&head, "transfer-encoding") == Some("chunked") {
                dechunk(&got)
            } else if let Some(len) = header(&head, "content-length") {
                got[..len.parse::<usize>().unwrap().min(got.len())].to_string()
            } else {
                got.clone()
            };
            let expected = if body.starts_with("5\r\n") && !close { "hello" } else { body };
            assert_eq!(decoded, expected, "{name}: {resp:?}");
            assert!(
                header(&head, "transfer-encoding").is_some()
                    || header(&head, "content-length").is_some()
                    || header(&head, "connection") == Some("close"),
                "{name}: the client cannot tell where the body ends: {resp:?}"
            );
            proxy.stop().await;
        }
    }
}

/// The data of a chunked body (no extensions or trailers in these tests).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

/// A request body that stops arriving is answered 408 after `body_read_timeout` (not held
/// until the backend's response timeout), and counted as the client's doing.
#[tokio::test]
async fn a_stalled_request_body_is_a_408_counted_as_a_client_error() {
    let backend = http_backend().await;
    for (name, extra) in PATHS {
        let listen = extra.strip_prefix("[listen]\n").unwrap_or(extra);
        let config = format!(
            "[listen]\nbody_read_timeout = \"300ms\"\n{listen}[upstream]\nresponse_timeout = \"20s\"\n"
        );
        let proxy = start_proxy(ADMIT_ALL, backend.addr, &config).await;
        let started = std::time::Instant::now();
        let (resp, closed) = exchange_until_close(
            proxy.addr,
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b",
            DEADLINE,
        )
        .await;
        assert!(closed, "{name}: {resp:?}");
        let (status, _, _) = split_response(&resp);
        assert_eq!(status, 408, "{name}: {resp:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name}: {:?}",
            started.elapsed()
        );
        assert_eq!(
            metric(
                &proxy,
                "fwgate_connections_closed_total{reason=\"body_timeout\"}"
            )
            .await,
            Some(1.0),
            "{name}"
        );
        assert_eq!(
            metric(&proxy, "fwgate_upstream_requests_total{outcome=\"error\"}").await,
            None,
            "{name}: counted as a backend error"
        );
        proxy.stop().await;
    }
}

/// A malformed chunked body from the client is a 400 and a client error, not a 502.
#[tokio::test]
async fn a_malformed_chunked_request_body_is_a_400_counted_as_a_client_error() {
    let backend = http_backend().await;
    for (name, extra) in PATHS {
        let proxy = start_proxy(ADMIT_ALL, backend.addr, extra).await;
        let (resp, closed) = exchange_until_close(
            proxy.addr,
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
            DEADLINE,
        )
        .await;
        assert!(closed, "{name}: {resp:?}");
        let (status, _, body) = split_response(&resp);
        assert_eq!(
            (status, body.as_str()),
            (400, "malformed request body\n"),
            "{name}: {resp:?}"
        );
        assert_eq!(
            metric(
                &proxy,
                "fwgate_connections_closed_total{reason=\"bad_request\"}"
            )
            .await,
            Some(1.0),
            "{name}"
        );
        assert_eq!(
            metric(&proxy, "fwgate_upstream_requests_total{outcome=\"error\"}").await,
            None,
            "{name}: counted as a backend error"
        );
        proxy.stop().await;
    }
}

/// The admin listener bounds its request bodies in time too.
#[tokio::test]
async fn a_stalled_admin_body_is_a_408() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        ADMIT_ALL,
        backend.addr,
        "[listen]\nbody_read_timeout = \"300ms\"\n",
    )
    .await;
    let request = format!(
        "POST /v1/killswitch HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TEST_TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"versions\""
    );
    let mut s = TcpStream::connect(proxy.admin).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("no answer to a stalled admin body")
        .unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp:?}");
    assert!(resp.contains("body_read_timeout"), "{resp:?}");
    proxy.stop().await;
}
