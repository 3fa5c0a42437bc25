//! The relay between two plain TCP sockets, the normal case: readiness waits without a
//! buffer, reads that clear readiness when they drain the socket, sends straight to the socket.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

use super::pool::PooledBuffer;
#[cfg(test)]
use super::pool::WAITED_FOR_ROOM;
use super::supervise::supervise;
use super::TunnelStats;
use crate::registry::CloseSignal;

/// Relays bytes between two TCP sockets until both directions finish, an error occurs, or
/// `close` is signalled. `client_early`/`upstream_early` are bytes each side already sent that
/// HTTP parsing had buffered; they are delivered first. A tunnel with no byte either way for
/// `idle_timeout` is closed (zero: never).
pub async fn relay_tcp(
    client: &TcpStream,
    client_early: &[u8],
    upstream: &TcpStream,
    upstream_early: &[u8],
    close: &CloseSignal,
    idle_timeout: Duration,
) -> TunnelStats {
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let ended = AtomicBool::new(false);
    let client_to_upstream = || pump(client, client_early, upstream, &up, &ended);
    let upstream_to_client = || pump(upstream, upstream_early, client, &down, &ended);
    supervise(
        client_to_upstream,
        upstream_to_client,
        close,
        idle_timeout,
        &up,
        &down,
    )
    .await
}

/// One direction: first the bytes HTTP parsing had already read from `from` (`early`), then
/// wait for readability without a buffer and borrow one only for the copy.
/// `other_ended` is shared by the two directions: the first to reach end-of-stream passes the
/// half-close on; the second does not need to, because both sockets close right after it
/// (fully read, so the close is an orderly FIN), which saves a `shutdown` per tunnel.
async fn pump(
    from: &TcpStream,
    early: &[u8],
    to: &TcpStream,
    count: &AtomicU64,
    other_ended: &AtomicBool,
) -> io::Result<()> {
    write_all(to, early, count).await?;
    loop {
        // Waiting before each read costs less than trying first: a short read below clears the
        // socket's readiness, so a read tried after it would always fail. poll_read_ready (not
        // readable()) also takes over the socket's single reader waker slot, so the waker hyper
        // left there while reading the HTTP head is released: otherwise it pins the finished
        // connection task's memory for the tunnel's whole life.
        std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
        let mut loan = None;
        let n = match read_drained(from, || loan.insert(PooledBuffer::take()).as_mut()) {
            Ok(0) => {
                // The sender is done: pass the half-close on, keep the other direction open.
                // An error here means the peer is already gone; the other pump will notice.
                if !other_ended.swap(true, Ordering::Relaxed) {
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                }
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if let Some(mut buf) = loan {
            write_all(to, &buf.as_mut()[..n], count).await?;
        }
    }
}

/// Reads what the socket holds. A short read means the receive buffer is now empty, so the
/// socket's readiness is cleared right away (as nginx does): the next wait goes straight to
/// epoll instead of first costing a `recv` that fails with `EAGAIN`, one syscall in three per
/// relayed message. Clearing is tick-checked by tokio, so data or a FIN that arrives meanwhile
/// raises a new event and is not missed; a reported end-of-stream stays ready.
/// `buf` is asked for only when the socket is ready, so a read that would block borrows none.
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
