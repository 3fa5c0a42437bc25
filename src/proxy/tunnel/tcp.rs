//! The relay between two plain TCP sockets, the normal case: readiness waits without a
//! buffer, reads that clear readiness when they drain the socket, sends straight to the socket.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;

#[cfg(test)]
use super::pool::WAITED_FOR_ROOM;
use super::pool::{PooledBuffer, RELAY_BUFFER_BYTES};
use super::supervise::supervise;
use super::ws_close::{sent_bit, write_close_frame, Peer};
use super::ws_frames::FrameTracker;
use super::{Counts, Protocol, TunnelStats};
use crate::registry::CloseSignal;

/// Relays bytes between two TCP sockets until both directions finish, an error occurs, or
/// `close` is signalled (a WebSocket tunnel then closes with Close frames; see
/// [`super::supervise`]). `client_early`/`upstream_early` are bytes each side already sent that
/// HTTP parsing had buffered; they are delivered first. A tunnel with no byte either way for
/// `idle_timeout` is closed (zero: never).
pub async fn relay_tcp(
    client: &TcpStream,
    client_early: &[u8],
    upstream: &TcpStream,
    upstream_early: &[u8],
    close: &CloseSignal,
    protocol: Protocol,
    idle_timeout: Duration,
) -> TunnelStats {
    let shared = Shared {
        close,
        websocket: protocol == Protocol::WebSocket,
        ended: AtomicBool::new(false),
        counts: Counts::default(),
    };
    let client_to_upstream = || pump(client, client_early, upstream, Peer::Backend, &shared);
    let upstream_to_client = || pump(upstream, upstream_early, client, Peer::Device, &shared);
    supervise(
        client_to_upstream,
        upstream_to_client,
        close,
        protocol,
        idle_timeout,
        &shared.counts,
    )
    .await
}

/// What the two directions of a TCP relay share.
struct Shared<'a> {
    close: &'a CloseSignal,
    /// Follow frames, and close with Close frames.
    websocket: bool,
    /// The first direction to reach its source's end passes the half-close on (see [`pump`]).
    ended: AtomicBool,
    counts: Counts,
}

impl Shared<'_> {
    /// A WebSocket close is under way.
    #[inline]
    fn closing(&self) -> bool {
        self.websocket && self.close.is_closing()
    }

    /// The byte count of the direction that writes to `peer`.
    #[inline]
    fn count(&self, peer: Peer) -> &AtomicU64 {
        match peer {
            Peer::Backend => &self.counts.up,
            Peer::Device => &self.counts.down,
        }
    }
}

/// One direction, writing to `to` (which is `to_peer`): first the bytes HTTP parsing had
/// already read from `from` (`early`), then wait for readability without a buffer and borrow
/// one only for the copy. The first direction to reach end-of-stream passes the half-close on;
/// the second does not need to, because both sockets close right after it (fully read, so the
/// close is an orderly FIN), which saves a `shutdown` per tunnel. On a WebSocket tunnel the
/// frames are followed as they pass, and a close signal hands over to [`close_direction`].
async fn pump(
    from: &TcpStream,
    early: &[u8],
    to: &TcpStream,
    to_peer: Peer,
    shared: &Shared<'_>,
) -> io::Result<()> {
    let count = shared.count(to_peer);
    let mut frames = FrameTracker::default();
    if shared.websocket {
        frames.advance(early);
    }
    write_all(to, early, count).await?;
    loop {
        // Waiting before each read costs less than trying first: a short read below clears the
        // socket's readiness, so a read tried after it would always fail. poll_read_ready (not
        // readable()) also takes over the socket's single reader waker slot, so the waker hyper
        // left there while reading the HTTP head is released: otherwise it pins the finished
        // connection task's memory for the tunnel's whole life.
        let closing = std::future::poll_fn(|cx| {
            if shared.closing() {
                return Poll::Ready(Ok(true));
            }
            from.poll_read_ready(cx).map_ok(|()| false)
        })
        .await?;
        if closing {
            // Boxed: made once per closed tunnel, it does not grow every idle tunnel's state.
            return Box::pin(close_direction(from, to, to_peer, shared, frames)).await;
        }
        let mut loan = None;
        let n = match read_drained(from, || loan.insert(PooledBuffer::take()).as_mut()) {
            Ok(0) => {
                // The sender is done: pass the half-close on, keep the other direction open.
                // An error here means the peer is already gone; the other pump will notice.
                if !shared.ended.swap(true, Ordering::Relaxed) {
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                }
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if let Some(mut buf) = loan {
            let bytes = &buf.as_mut()[..n];
            if shared.websocket {
                frames.advance(bytes);
            }
            write_all(to, bytes, count).await?;
        }
    }
}

/// A direction of a WebSocket tunnel fwgate closes: the message in flight goes through and
/// nothing after it; then `to` gets its Close frame and its write side is shut; then `from` is
/// read until its peer's answer to the Close frame the other direction sent it (or its end of
/// stream), so that no socket is closed with unread bytes, which would reset the connection
/// and could lose the Close frame on its way. The supervisor bounds all of it.
async fn close_direction(
    from: &TcpStream,
    to: &TcpStream,
    to_peer: Peer,
    shared: &Shared<'_>,
    mut frames: FrameTracker,
) -> io::Result<()> {
    let count = shared.count(to_peer);
    while !frames.between_messages() {
        std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
        let limit = frames.next_unit().min(RELAY_BUFFER_BYTES);
        let mut loan = None;
        match read_drained(from, || {
            &mut loan.insert(PooledBuffer::take()).as_mut()[..limit]
        }) {
            Ok(0) => {
                // The source ended inside a message: no Close frame can follow it.
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(());
            }
            Ok(n) => {
                if let Some(mut buf) = loan {
                    let bytes = &buf.as_mut()[..n];
                    frames.advance(bytes);
                    write_all(to, bytes, count).await?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(cause) = shared.close.cause() {
        let mut buf = PooledBuffer::take();
        let reason = shared.close.reason().unwrap_or("");
        let n = write_close_frame(to_peer, cause, reason, buf.as_mut());
        write_all(to, &buf.as_mut()[..n], count).await?;
        shared
            .counts
            .close_frames
            .fetch_or(sent_bit(to_peer), Ordering::Relaxed);
    }
    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
    // Until the peer's own Close frame (its answer) or its end of stream.
    while !frames.ended_with_close() {
        std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
        let mut loan = None;
        match read_drained(from, || loan.insert(PooledBuffer::take()).as_mut()) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(mut buf) = loan {
                    frames.advance(&buf.as_mut()[..n]);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what the socket holds. A short read means the receive buffer is now empty, so the
/// socket's readiness is cleared right away (as nginx does): the next wait goes straight to
/// epoll instead of first costing a `recv` that fails with `EAGAIN`, one syscall in three per
/// relayed message. Clearing is tick-checked by tokio, so data or a FIN that arrives meanwhile
/// raises a new event and is not missed; a reported end-of-stream stays ready.
/// `buf` is asked for only when the socket is ready, so a read that would block borrows none.
/// Inlined: the relay's directions are polled from the supervisor's code, in another codegen
/// unit, and a call here per read costs more than the read's bookkeeping (callgrind).
#[inline]
pub(in crate::proxy) fn read_drained<'b>(
    from: &TcpStream,
    buf: impl FnOnce() -> &'b mut [u8],
) -> io::Result<usize> {
    use std::io::Read as _;
    let mut short_read = None;
    let polled = from.try_io(tokio::io::Interest::READABLE, || {
        let buf = buf();
        let n = (&*socket2::SockRef::from(from)).read(buf)?;
        if n > 0 && n < buf.len() {
            short_read = Some(n);
            // Reported as WouldBlock only so that tokio clears the readiness it observed.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short_read {
        Some(n) => Ok(n),
        None => polled,
    }
}

/// Sends what the socket takes now, straight to it: no readiness check, which tokio knows of a
/// socket only from the reactor (a new socket is not known writable until an event says so).
/// Ok(0) when it takes nothing now; the caller then goes through tokio, whose own attempt
/// clears the readiness it observed, so that waiting for room cannot miss a wake-up.
pub(in crate::proxy) fn send_now(to: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    // An empty send is a wasted system call; callers skip it (tests run with this check).
    debug_assert!(!bytes.is_empty(), "empty send");
    match socket2::SockRef::from(to).send_with_flags(bytes, libc::MSG_NOSIGNAL) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(0)
        }
        sent => sent,
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8], count: &AtomicU64) -> io::Result<()> {
    if bytes.is_empty() {
        // No early bytes: no call at all.
        return Ok(());
    }
    let n = send_now(to, bytes)?;
    count.fetch_add(n as u64, Ordering::Relaxed);
    bytes = &bytes[n..];
    while !bytes.is_empty() {
        // Through tokio now: when the socket is still full, tokio clears the readiness it
        // observed and the wait below lasts until it has room again.
        match to.try_write(bytes) {
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::Relaxed);
                bytes = &bytes[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                #[cfg(test)]
                WAITED_FOR_ROOM.with(|n| n.set(n.get() + 1));
                std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
