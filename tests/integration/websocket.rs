//! WebSocket tunnels through the proxy.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

const RULES: &str = r#"
[[rule]]
name = "block-table-scan"
versions = ">=3.8.0-b3"
action = "deny"
status = 503
"#;

#[tokio::test]
async fn echo_text_binary_large_ping_and_close() {
    let backend = ws_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let mut ws = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "3.7.0")])
        .await
        .expect("admitted handshake");

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));

    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );

    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    let got = ws.next().await.unwrap().unwrap();
    assert_eq!(
        got.into_data().as_ref(),
        &big[..],
        "1 MiB message corrupted"
    );

    ws.send(Message::Ping(b"p1".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"p1".to_vec().into()));

    ws.close(None).await.unwrap();
    // The close handshake completes: the stream ends after the peer's close frame.
    let mut saw_close = false;
    while let Ok(Some(msg)) = tokio::time::timeout(DEADLINE, ws.next()).await {
        match msg {
            Ok(Message::Close(_)) => saw_close = true,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(saw_close, "no close frame came back through the tunnel");
    assert_eq!(backend.connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn refused_handshake_never_reaches_the_backend() {
    let backend = ws_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let err = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "3.8.0-b3")])
        .await
        .expect_err("must be refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 503),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
    assert_eq!(backend.connections(), 0);
    let n = metric(
        &proxy,
        "fwgate_decisions_total{decision=\"deny\",rule=\"block-table-scan\"}",
    )
    .await;
    assert_eq!(n, Some(1.0));
    proxy.stop().await;
}

#[tokio::test]
async fn non_101_backend_answer_is_relayed() {
    // The HTTP backend does not speak WebSocket: its 200 goes back to the client as is.
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET /status/404 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    while !resp.ends_with(b"status") {
        let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before the relayed answer: {:?}",
            String::from_utf8_lossy(&resp)
        );
        resp.extend_from_slice(&buf[..n]);
    }
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp:?}");
    assert!(
        !resp.to_ascii_lowercase().contains("upgrade: websocket"),
        "{resp:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn half_close_is_respected_through_a_raw_upgrade() {
    // A raw backend that upgrades, reads until EOF, then answers and closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap(); // ends when the client half-closes
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    let proxy = start_proxy(RULES, addr, "").await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
    c.write_all(b"0123456789").await.unwrap();
    c.shutdown().await.unwrap(); // half-close: we are done sending, still reading
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, c.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 10 bytes");
    proxy.stop().await;
}

#[tokio::test]
async fn tunnel_counts_as_active_until_closed() {
    let backend = ws_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let mut ws = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "1.0.0")])
        .await
        .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    ws.next().await.unwrap().unwrap();
    eventually("active connection gauge shows the tunnel", || async {
        metric(&proxy, "fwgate_active_connections{rule=\"default\"}").await == Some(1.0)
    })
    .await;
    drop(ws);
    eventually("gauge returns to zero after close", || async {
        metric(&proxy, "fwgate_active_connections{rule=\"default\"}").await == Some(0.0)
    })
    .await;
    proxy.stop().await;
}

/// A tunnel closed by fwgate says why, in the access log's `end=` and in
/// `fwgate_tunnels_closed_total{end}`: a kill-switch entry, a rule change, or the shutdown.
#[tokio::test]
async fn tunnels_closed_by_fwgate_say_why() {
    use fwgate::metrics::TunnelEndLabel;
    let backend = ws_backend().await;
    let rules = "[defaults]\naction = \"allow\"\nmissing = \"allow\"\n";
    let proxy = start_proxy(rules, backend.addr, "").await;
    let gate = proxy.gate.clone();
    let count = |end: &'static str| {
        gate.metrics
            .tunnels_closed
            .get_or_create(&TunnelEndLabel { end })
            .get()
    };
    let mut killed = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "9.1.0")])
        .await
        .unwrap();
    let mut kept = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "1.0.0")])
        .await
        .unwrap();
    let (status, text) = admin_post(
        &proxy,
        "/v1/killswitch",
        Some(TEST_TOKEN),
        r#"{"versions": ">=9", "reason": "end probe", "drain": "0s"}"#,
    )
    .await;
    assert_eq!(status, 201, "{text}");
    tokio::time::timeout(DEADLINE, async {
        while killed.next().await.is_some_and(|m| m.is_ok()) {}
    })
    .await
    .expect("the refused tunnel stayed open");
    eventually("the kill-switch close is counted", || async {
        count("kill_switch") == 1
    })
    .await;
    kept.send(Message::text("alive")).await.unwrap();
    assert_eq!(kept.next().await.unwrap().unwrap(), Message::text("alive"));
    // The device answers the shutdown's Close frame, as WebSocket clients do; its tunnel then
    // ends without waiting out the close bound.
    let stop = tokio::spawn(proxy.stop());
    while let Some(Ok(_)) = tokio::time::timeout(DEADLINE, kept.next())
        .await
        .expect("the tunnel open at shutdown was not closed")
    {}
    stop.await.unwrap();
    eventually("the tunnel open at shutdown is counted", || async {
        count("shutdown") == 1
    })
    .await;
    assert_eq!(count("closed_by_policy"), 0);
    let logs = captured_logs();
    assert!(
        logs.lines().any(|l| l.contains("tunnel closed")
            && l.contains("version=9.1.0")
            && l.contains("end=\"kill_switch\"")),
        "no kill_switch end in the access log"
    );
    assert!(
        logs.lines().any(|l| l.contains("tunnel closed")
            && l.contains("version=1.0.0")
            && l.contains("end=\"shutdown\"")),
        "no shutdown end in the access log"
    );
}
