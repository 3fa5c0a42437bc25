//! WebSocket tunnels fwgate closes on purpose end with Close frames: the device reads a code
//! and a reason (1013 for a kill-switch entry and the shutdown drain, 1008 for a deny rule),
//! the backend reads a masked 1001; a message in flight is delivered whole first. Other
//! upgrades are closed as before.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::tls::{connect, start_tls_proxy_with, ClientRequestExt, TestPki};
use crate::util::*;

/// Admits everything: the closes come from a kill-switch entry, a reload or the shutdown.
const RULES: &str = "[defaults]\naction = \"allow\"\nmissing = \"allow\"\n";

/// What a reload puts in force: 3.8.x refused with `close_existing`.
const DENY_RULES: &str = "[defaults]\naction = \"allow\"\nmissing = \"allow\"\n[[rule]]\nname = \"block-table-scan\"\nversions = \">=3.8.0-b3\"\naction = \"deny\"\nretry_after = \"60s\"\nclose_existing = true\ndrain = \"0s\"\n";

/// A kill-switch entry for 9.x, closing at once.
const KILL_9: &str =
    r#"{"id": "k-3", "versions": ">=9", "reason": "INC-7", "retry_after": "30s", "drain": "0s"}"#;

/// Any stream a test client talks over (plain TCP or TLS).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Client = WebSocketStream<Box<dyn Io>>;

/// The listener a test client reaches fwgate on.
#[derive(Clone, Copy, Debug)]
enum Listener {
    Plain,
    Tls,
}

/// A WebSocket echo backend that records how each connection ended: `close CODE REASON` for a
/// Close frame (tungstenite refuses unmasked frames from a client, so a recorded close was
/// masked), `error ...` otherwise.
struct RecordingBackend {
    addr: SocketAddr,
    ends: Arc<Mutex<Vec<String>>>,
}

impl RecordingBackend {
    async fn start() -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ends = Arc::new(Mutex::new(Vec::new()));
        let record = ends.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    let end = loop {
                        match ws.next().await {
                            Some(Ok(Message::Close(frame))) => {
                                break match frame {
                                    Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
                                    None => "close without a code".to_string(),
                                }
                            }
                            Some(Ok(m)) if m.is_text() || m.is_binary() => {
                                if ws.send(m).await.is_err() {
                                    break "error: echo failed".to_string();
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => break format!("error: {e}"),
                            None => break "error: ended without a Close frame".to_string(),
                        }
                    };
                    record.lock().unwrap().push(end);
                    // Let tungstenite answer the Close and see the end of the stream.
                    while let Some(Ok(_)) = ws.next().await {}
                });
            }
        });
        RecordingBackend { addr, ends }
    }

    fn ends(&self) -> Vec<String> {
        self.ends.lock().unwrap().clone()
    }
}

/// Opens a WebSocket through `proxy` presenting `version`, on `listener`.
async fn open(proxy: &Proxy, pki: Option<&TestPki>, version: &str) -> Client {
    let stream: Box<dyn Io> = match pki {
        None => Box::new(TcpStream::connect(proxy.addr).await.unwrap()),
        Some(pki) => Box::new(connect(proxy, &pki.client(&[b"http/1.1"], None)).await),
    };
    let mut req = format!("ws://{}/ws", proxy.addr)
        .parse::<http::Uri>()
        .unwrap()
        .into_client_request_ok();
    req.headers_mut()
        .insert("x-firmware-version", version.parse().unwrap());
    let (mut ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, stream))
        .await
        .expect("handshake timed out")
        .expect("admitted handshake");
    // One echo: the tunnel is open end to end.
    ws.send(Message::text("hello")).await.unwrap();
    let echo = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap();
    assert_eq!(echo.unwrap().unwrap(), Message::text("hello"));
    ws
}

/// The next frame must be a Close frame: its code and reason.
async fn close_frame_of<S>(ws: &mut WebSocketStream<S>) -> (u16, String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(DEADLINE, ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => (u16::from(f.code), f.reason.to_string()),
        Ok(other) => panic!("expected a Close frame with a code, got {other:?}"),
        Err(_) => panic!("no Close frame within {DEADLINE:?}"),
    }
}

/// One proxy, three devices, three causes: a kill-switch entry (1013), a reload with a deny
/// rule that closes existing connections (1008), the shutdown drain (1013); each device reads
/// its code and a reason naming the entry or rule, and the backend a masked 1001 for each.
async fn each_cause_sends_its_close_frame(listener: Listener) {
    let backend = RecordingBackend::start().await;
    let pki = matches!(listener, Listener::Tls).then(TestPki::new);
    let proxy = match &pki {
        None => start_proxy(RULES, backend.addr, "").await,
        Some(pki) => start_tls_proxy_with(pki, backend.addr, RULES).await,
    };
    let gate = proxy.gate.clone();
    let mut killed = open(&proxy, pki.as_ref(), "9.1.0").await;
    let mut denied = open(&proxy, pki.as_ref(), "3.8.0-b3").await;
    let mut drained = open(&proxy, pki.as_ref(), "1.0.0").await;

    let (status, text) = admin_post(&proxy, "/v1/killswitch", Some(TEST_TOKEN), KILL_9).await;
    assert_eq!(status, 201, "{text}");
    assert_eq!(
        close_frame_of(&mut killed).await,
        (
            1013,
            "refused by emergency kill switch k-3; retry after 30s".into()
        ),
        "{listener:?}"
    );

    std::fs::write(proxy.rules_path(), DENY_RULES).unwrap();
    assert_eq!(
        close_frame_of(&mut denied).await,
        (
            1008,
            "refused by rule block-table-scan; retry after 60s".into()
        ),
        "{listener:?}"
    );

    let stop = tokio::spawn(proxy.stop());
    assert_eq!(
        close_frame_of(&mut drained).await,
        (1013, fwgate::SHUTDOWN_CLOSE_REASON.into()),
        "{listener:?}"
    );
    // The device answers the Close; fwgate then ends the connection.
    for ws in [&mut killed, &mut denied, &mut drained] {
        let rest = tokio::time::timeout(DEADLINE, async {
            while let Some(Ok(_)) = ws.next().await {}
        });
        rest.await
            .expect("the connection did not end after the Close frame");
    }
    stop.await.unwrap();

    let mut ends = backend.ends();
    ends.sort();
    assert_eq!(
        ends,
        vec![
            format!("close 1001 {}", fwgate::SHUTDOWN_CLOSE_REASON),
            "close 1001 refused by emergency kill switch k-3; retry after 30s".to_string(),
            "close 1001 refused by rule block-table-scan; retry after 60s".to_string(),
        ],
        "what the backend read ({listener:?})"
    );
    // Counted when each tunnel's task finishes, just after it leaves the registry.
    let frames = |code: &'static str| {
        gate.metrics
            .websocket_close_frames
            .get_or_create(&fwgate::metrics::CloseFrameLabel { code })
            .get()
    };
    let ends = |end: &'static str| {
        gate.metrics
            .tunnels_closed
            .get_or_create(&fwgate::metrics::TunnelEndLabel { end })
            .get()
    };
    eventually("the three tunnels are counted", || async {
        ends("kill_switch") + ends("closed_by_policy") + ends("shutdown") == 3
    })
    .await;
    assert_eq!(
        (
            ends("kill_switch"),
            ends("closed_by_policy"),
            ends("shutdown")
        ),
        (1, 1, 1),
        "end= tells the three causes apart"
    );
    assert_eq!((frames("1013"), frames("1008"), frames("1001")), (2, 1, 3));
}

#[tokio::test]
async fn each_cause_sends_its_close_frame_on_a_plain_listener() {
    each_cause_sends_its_close_frame(Listener::Plain).await;
}

#[tokio::test]
async fn each_cause_sends_its_close_frame_on_a_tls_listener() {
    each_cause_sends_its_close_frame(Listener::Tls).await;
}

/// 1 MiB, a repeating pattern.
fn big_message() -> Vec<u8> {
    (0..1024 * 1024).map(|i| (i % 251) as u8).collect()
}

/// A backend that, asked for `big`, sends a 1 MiB binary message in two halves: it says when
/// the first half is written and waits for `go` before the second. Then it records the Close
/// frame it gets.
async fn slow_big_backend(
    half_sent: tokio::sync::oneshot::Sender<()>,
    go: tokio::sync::oneshot::Receiver<()>,
) -> (SocketAddr, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let asked = ws.next().await.unwrap().unwrap();
        assert_eq!(asked, Message::text("big"));
        let message = big_message();
        let mut frame = vec![0x82, 127];
        frame.extend_from_slice(&(message.len() as u64).to_be_bytes());
        frame.extend_from_slice(&message);
        // Written past tungstenite (which has nothing buffered): the frame is cut where the
        // test wants it.
        let half = frame.len() / 2;
        ws.get_mut().write_all(&frame[..half]).await.unwrap();
        half_sent.send(()).unwrap();
        go.await.unwrap();
        ws.get_mut().write_all(&frame[half..]).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Close(Some(f)))) => format!("close {}", u16::from(f.code)),
            other => format!("not a close: {other:?}"),
        }
    });
    (addr, task)
}

/// The close arrives while the backend is in the middle of a 1 MiB message: the device still
/// receives the whole message, and the Close frame right after it.
#[tokio::test]
async fn a_message_in_flight_is_delivered_whole_before_the_close_frame() {
    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    let (backend, backend_end) = slow_big_backend(half_tx, go_rx).await;
    let proxy = start_proxy(RULES, backend, "").await;
    let mut ws = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "9.1.0")])
        .await
        .expect("admitted");
    ws.send(Message::text("big")).await.unwrap();
    // The device reads while the test closes: the message, then what follows it.
    let device = tokio::spawn(async move {
        let message = tokio::time::timeout(DEADLINE, ws.next()).await;
        let close = close_frame_of(&mut ws).await;
        (message, close)
    });
    tokio::time::timeout(DEADLINE, half_rx)
        .await
        .expect("the backend never got half way")
        .unwrap();
    let (status, text) = admin_post(&proxy, "/v1/killswitch", Some(TEST_TOKEN), KILL_9).await;
    assert_eq!(status, 201, "{text}");
    eventually("the tunnel was told to close", || async {
        metric(&proxy, "fwgate_tunnels_closed_by_policy_total").await == Some(1.0)
    })
    .await;
    go_tx.send(()).unwrap();
    let (message, close) = device.await.unwrap();
    match message {
        Ok(Some(Ok(Message::Binary(got)))) => {
            assert!(
                got.as_ref() == &big_message()[..],
                "the message was corrupted"
            )
        }
        other => panic!(
            "expected the whole 1 MiB message, got {:?}",
            other.map(|m| m.map(|m| m.map(|m| m.len())))
        ),
    }
    assert_eq!(close.0, 1013);
    let backend_end = tokio::time::timeout(DEADLINE, backend_end)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(backend_end, "close 1001");
    proxy.stop().await;
}

/// Reads an HTTP head (up to the blank line) byte by byte.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(DEADLINE, s.read_exact(&mut b))
            .await
            .expect("head timed out")
            .unwrap();
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A backend that answers one upgrade with `answer` (a 101 head), then sends `first` and
/// returns every byte it reads until the end of the stream.
async fn raw_upgrade_backend(
    answer: &'static str,
    first: &'static [u8],
) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_head(&mut s).await;
        s.write_all(answer.as_bytes()).await.unwrap();
        s.write_all(first).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got)).await;
        got
    });
    (addr, task)
}

/// An upgrade to another protocol is closed as before: the connection ends, no WebSocket
/// bytes are written into it.
#[tokio::test]
async fn another_upgrade_is_closed_without_a_close_frame() {
    let (backend, backend_got) = raw_upgrade_backend(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        b"",
    )
    .await;
    let proxy = start_proxy(RULES, backend, "").await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\nX-Firmware-Version: 9.1.0\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut c).await.starts_with("HTTP/1.1 101"));
    let (status, text) = admin_post(&proxy, "/v1/killswitch", Some(TEST_TOKEN), KILL_9).await;
    assert_eq!(status, 201, "{text}");
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest))
        .await
        .expect("the connection stayed open")
        .unwrap();
    assert!(
        rest.is_empty(),
        "bytes written into a non-WebSocket tunnel: {rest:?}"
    );
    let got = tokio::time::timeout(DEADLINE, backend_got)
        .await
        .unwrap()
        .unwrap();
    assert!(got.is_empty(), "bytes written to the backend: {got:?}");
    let sent = proxy
        .gate
        .metrics
        .websocket_close_frames
        .get_or_create(&fwgate::metrics::CloseFrameLabel { code: "1013" })
        .get();
    assert_eq!(sent, 0);
    proxy.stop().await;
}

/// With permessage-deflate negotiated, compressed frames (RSV1) pass as they are, and the
/// Close frames are plain control frames (never compressed): exactly the bytes expected on
/// both sides.
#[tokio::test]
async fn with_permessage_deflate_the_close_frames_are_uncompressed_control_frames() {
    // A compressed "hi" in a frame with RSV1, as a deflate backend sends it.
    const COMPRESSED: &[u8] = &[0xc1, 0x04, 0xf2, 0xc8, 0x04, 0x00];
    let (backend, backend_got) = raw_upgrade_backend(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        COMPRESSED,
    )
    .await;
    let proxy = start_proxy(RULES, backend, "").await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate\r\nX-Firmware-Version: 9.1.0\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("permessage-deflate"),
        "{head}"
    );
    let mut first = [0u8; COMPRESSED.len()];
    tokio::time::timeout(DEADLINE, c.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, COMPRESSED, "the compressed frame passed as it was");

    let (status, text) = admin_post(&proxy, "/v1/killswitch", Some(TEST_TOKEN), KILL_9).await;
    assert_eq!(status, 201, "{text}");
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest))
        .await
        .expect("the connection stayed open")
        .unwrap();
    let reason = b"refused by emergency kill switch k-3; retry after 30s";
    let mut expected = vec![0x88, (2 + reason.len()) as u8, 0x03, 0xf5];
    expected.extend_from_slice(reason);
    assert_eq!(
        rest, expected,
        "one unmasked Close frame, RSV bits clear, code 1013"
    );
    drop(c);

    let got = tokio::time::timeout(DEADLINE, backend_got)
        .await
        .unwrap()
        .unwrap();
    assert!(got.len() > 6, "no Close frame reached the backend: {got:?}");
    assert_eq!(got[0], 0x88, "FIN + close, RSV bits clear");
    assert_eq!(got[1] & 0x80, 0x80, "masked");
    let len = usize::from(got[1] & 0x7f);
    assert_eq!(got.len(), 6 + len, "one frame: {got:?}");
    let payload: Vec<u8> = got[6..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ got[2 + i % 4])
        .collect();
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
    assert_eq!(&payload[2..], reason);
    proxy.stop().await;
}
