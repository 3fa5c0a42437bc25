//! Hardening at the edge: slow and oversized clients, PROXY protocol, trusted forwarders,
//! graceful shutdown, idle tunnels.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

const NO_RULES: &str = "# defaults only\n";

/// Reads until EOF or error; returns how long it took.
async fn time_to_close(s: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("connection was not closed within {DEADLINE:?}"),
        }
    }
}

#[tokio::test]
async fn slowloris_is_cut_off_while_others_are_served() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        NO_RULES,
        backend.addr,
        "[listen]\nheader_read_timeout = \"500ms\"\n",
    )
    .await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // Meanwhile another client is served normally.
    for _ in 0..3 {
        assert_eq!(get(proxy.addr, "/", &[]).await.0, 200);
    }
    let took = time_to_close(&mut slow).await;
    assert!(
        took < Duration::from_secs(5),
        "slow client held for {took:?}"
    );
    eventually("timeout counted", || async {
        metric(
            &proxy,
            "fwgate_connections_closed_total{reason=\"header_timeout\"}",
        )
        .await
            >= Some(1.0)
    })
    .await;
    assert_eq!(backend.connections(), 1);
    proxy.stop().await;
}

/// Reads one response whose body ends with `tail`.
async fn read_response_ending(s: &mut TcpStream, tail: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).ends_with(tail) {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before the response ended: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn idle_keep_alive_connections_have_their_own_timeout_on_both_http_paths() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        NO_RULES,
        backend.addr,
        "[listen]\nheader_read_timeout = \"20s\"\nkeepalive_timeout = \"1s\"\n",
    )
    .await;
    // The fast path (a bodiless GET), then hyper's (a POST with a body hands the connection
    // over): after the response, the connection idles out at keepalive_timeout, far from the
    // 20 s head timeout.
    let first_requests: [&[u8]; 2] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    ];
    for request in first_requests {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(request).await.unwrap();
        read_response_ending(&mut s, "backend ok").await;
        let took = time_to_close(&mut s).await;
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(10),
            "{took:?}"
        );
    }
    // On hyper's path, a response slower than the idle bound (a delayed head, a streamed
    // body) is never cut by it, and the connection is still reused afterwards.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    read_response_ending(&mut s, "\r\n\r\n2").await;
    s.write_all(b"GET /delay/1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_response_ending(&mut s, "delayed ok").await;
    s.write_all(b"GET /drip/30 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let drip = read_response_ending(&mut s, "\r\n0\r\n\r\n").await;
    assert!(drip.matches('d').count() >= 30 * 1024);
    // On the fast path, a head that started before the idle bound has the head timeout.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_response_ending(&mut s, "backend ok").await;
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    s.write_all(b"Host: x\r\n\r\n").await.unwrap();
    read_response_ending(&mut s, "backend ok").await;
    eventually("idle closes counted apart from head timeouts", || async {
        metric(
            &proxy,
            "fwgate_connections_closed_total{reason=\"keepalive_timeout\"}",
        )
        .await
            >= Some(2.0)
    })
    .await;
    let head_timeouts = metric(
        &proxy,
        "fwgate_connections_closed_total{reason=\"header_timeout\"}",
    )
    .await;
    assert_eq!(head_timeouts.unwrap_or(0.0), 0.0);
    proxy.stop().await;
}

#[tokio::test]
async fn too_many_headers_and_too_long_uri_are_refused() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        NO_RULES,
        backend.addr,
        "[listen]\nmax_headers = 20\nmax_uri_bytes = 100\n",
    )
    .await;
    let mut req = String::from("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let resp = raw_exchange(proxy.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");
    let long = format!("/{}", "a".repeat(200));
    assert_eq!(get(proxy.addr, &long, &[]).await.0, 414);
    assert_eq!(backend.connections(), 0);
    assert_eq!(get(proxy.addr, "/", &[]).await.0, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn proxy_protocol_v2_from_a_trusted_source_sets_the_client() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        NO_RULES,
        backend.addr,
        "[listen]\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    )
    .await;
    let device: std::net::SocketAddr = "198.51.100.23:40000".parse().unwrap();
    let mut req = fwgate::proxy::proxy_protocol::encode_v2(device, proxy.addr);
    req.extend_from_slice(b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (status, _, body) = split_response(&raw_exchange(proxy.addr, &req).await);
    assert_eq!(status, 200);
    assert!(body.contains("x-forwarded-for: 198.51.100.23\n"), "{body}");
    assert!(body.contains("forwarded: for=198.51.100.23;"), "{body}");
    // A v1 header works too.
    let req = b"PROXY TCP4 203.0.113.5 127.0.0.1 5555 80\r\nGET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (_, _, body) = split_response(&raw_exchange(proxy.addr, req).await);
    assert!(body.contains("x-forwarded-for: 203.0.113.5\n"), "{body}");
    // No header at all from a trusted source: refused.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(
        out.is_empty(),
        "got a response without a PROXY header: {:?}",
        String::from_utf8_lossy(&out)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn proxy_protocol_from_an_untrusted_source_is_refused() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        NO_RULES,
        backend.addr,
        "[listen]\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
    )
    .await;
    let mut req = fwgate::proxy::proxy_protocol::encode_v2(
        "198.51.100.23:40000".parse().unwrap(),
        proxy.addr,
    );
    req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = s.write_all(&req).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(out.is_empty(), "untrusted source was served");
    assert_eq!(
        metric(
            &proxy,
            "fwgate_connections_closed_total{reason=\"untrusted_proxy\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_forwarders() {
    let backend = http_backend().await;
    let limits = "[limits]\nper_ip_rate = \"1/m\"\n[limits.backoff]\nenabled = false\n";
    let trusted = start_proxy(
        NO_RULES,
        backend.addr,
        &format!("[listen]\ntrusted_forwarders = [\"127.0.0.1\"]\n{limits}"),
    )
    .await;
    let xff = |ip: &'static str| [("X-Forwarded-For", ip)];
    assert_eq!(get(trusted.addr, "/", &xff("192.0.2.1")).await.0, 200);
    assert_eq!(
        get(trusted.addr, "/", &xff("192.0.2.1")).await.0,
        503,
        "same device, same budget"
    );
    assert_eq!(
        get(trusted.addr, "/", &xff("192.0.2.2")).await.0,
        200,
        "another device behind the balancer"
    );
    trusted.stop().await;

    let untrusted = start_proxy(NO_RULES, backend.addr, limits).await;
    assert_eq!(get(untrusted.addr, "/", &xff("192.0.2.1")).await.0, 200);
    assert_eq!(
        get(untrusted.addr, "/", &xff("192.0.2.2")).await.0,
        503,
        "spoofed XFF must not buy a new budget"
    );
    untrusted.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let backend = http_backend().await;
    let proxy = start_proxy(NO_RULES, backend.addr, "shutdown_grace = \"5s\"\n").await;
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/delay/700", &[]).await });
    eventually("request reached the backend", || async {
        backend.requests() == 1
    })
    .await;
    let gate = proxy.gate.clone();
    let stopping = tokio::spawn(proxy.stop());
    eventually("draining", || async { gate.is_draining() }).await;
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "delayed ok"));
    stopping.await.unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let backend = ws_backend().await;
    let proxy = start_proxy(
        NO_RULES,
        backend.addr,
        "[listen]\ntunnel_idle_timeout = \"300ms\"\n",
    )
    .await;
    let mut ws = ws_connect(proxy.addr, "/ws", &[]).await.unwrap();
    let started = Instant::now();
    let ended = tokio::time::timeout(DEADLINE, async {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "idle tunnel was not closed");
    assert!(started.elapsed() >= Duration::from_millis(300));
    proxy.stop().await;
}

/// `max_connections_per_ip`: one address cannot hold more connections than the cap (partial
/// heads included); past it a 503 at once, counted; a closed connection frees its place.
#[tokio::test]
async fn max_connections_per_ip_refuses_the_excess_and_counts_it() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        "[defaults]\naction = \"allow\"\n",
        backend.addr,
        "[listen]\nmax_connections_per_ip = 2\n",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        held.push(s);
    }
    // The two are counted once their tasks run: wait until a third is refused.
    let third = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    eventually(
        "a third connection from the same address is refused",
        || async {
            raw_exchange(proxy.addr, third)
                .await
                .starts_with("HTTP/1.1 503")
        },
    )
    .await;
    let refused = raw_exchange(proxy.addr, third).await;
    assert!(refused.contains("from this address"), "{refused:?}");
    assert!(metric(
        &proxy,
        "fwgate_connections_closed_total{reason=\"per_ip_limit\"}"
    )
    .await
    .is_some_and(|n| n >= 1.0));
    drop(held.pop());
    eventually("a freed place admits a new connection", || async {
        get(proxy.addr, "/", &[]).await.0 == 200
    })
    .await;
    proxy.stop().await;
}
