//! The relay for streams that are not plain TCP (TLS on either leg).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::pool::{PooledBuffer, RELAY_BUFFER_BYTES};
use super::supervise::supervise;
use super::ws_close::{sent_bit, write_close_frame, Peer};
use super::ws_frames::FrameTracker;
use super::{Counts, Protocol, TunnelStats};
use crate::registry::CloseSignal;

/// For streams that are not plain TCP (TLS on either leg): a copy both ways that respects
/// half-close, with the same idle timeout and the same WebSocket close as [`super::relay_tcp`].
/// Like it, an idle tunnel holds no relay buffer: each direction borrows one from the
/// per-thread pool for a read and keeps it only while those bytes wait to be written (a
/// buffered copy such as `copy_bidirectional` would hold two 8 KiB buffers per tunnel for its
/// whole life). `a` is the device's stream, `b` the backend's; `a_early`/`b_early` are bytes
/// each side already sent, delivered first.
pub async fn relay_generic<A, B>(
    a: A,
    a_early: &[u8],
    b: B,
    b_early: &[u8],
    close: Arc<CloseSignal>,
    protocol: Protocol,
    idle_timeout: Duration,
) -> TunnelStats
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let counts = Counts::default();
    let websocket = protocol == Protocol::WebSocket;
    let (counts_ref, close_ref) = (&counts, &*close);
    let both_ways = move || async move {
        let (mut a, mut b) = (a, b);
        b.write_all(a_early).await?;
        counts_ref
            .up
            .fetch_add(a_early.len() as u64, Ordering::Relaxed);
        a.write_all(b_early).await?;
        counts_ref
            .down
            .fetch_add(b_early.len() as u64, Ordering::Relaxed);
        let direction = |to: Peer, early: &[u8]| {
            let mut frames = FrameTracker::default();
            if websocket {
                frames.advance(early);
            }
            Direction {
                // The early bytes are flushed once there is nothing more to read.
                flow: Flow::Reading { flush: true },
                frames,
                to,
                close_sent: false,
            }
        };
        BothWays {
            a: &mut a,
            b: &mut b,
            a_to_b: direction(Peer::Backend, a_early),
            b_to_a: direction(Peer::Device, b_early),
            counts: counts_ref,
            close: close_ref,
            websocket,
        }
        .await
    };
    let nothing_more = || std::future::ready(Ok(()));
    supervise(
        both_ways,
        nothing_more,
        &close,
        protocol,
        idle_timeout,
        &counts,
    )
    .await
}

/// One direction of [`relay_generic`]: where it is, and the frames it has passed.
struct Direction {
    flow: Flow,
    /// Followed on WebSocket tunnels only.
    frames: FrameTracker,
    /// Who it writes to.
    to: Peer,
    /// Its Close frame is written or on its way (a WebSocket close is under way).
    close_sent: bool,
}

/// Where one direction of [`relay_generic`] is.
enum Flow {
    /// Waiting for bytes, with no buffer; `flush`: written bytes may still sit in the
    /// destination's own buffer (TLS records), to flush once the source has nothing more.
    Reading { flush: bool },
    /// Writing `buf[at..end]` (relayed bytes, or fwgate's Close frame).
    Writing {
        buf: PooledBuffer,
        at: usize,
        end: usize,
    },
    /// The source ended, or the Close frame went out: shutting the destination's write side
    /// (TLS: close_notify, then FIN).
    ShuttingDown,
    /// After the Close frame: reading the source until its peer's Close frame (the answer) or
    /// its end, dropping what it sends.
    Discarding,
    /// Finished.
    Done,
}

/// Moves one direction of [`relay_generic`] as far as it can go now; Ready once the source
/// ended and the destination was shut down. `closing`: a WebSocket close is under way, so the
/// direction reads no further than the end of the message in flight, then writes its Close
/// frame (with `close`'s cause and reason) and reads its source to its end.
fn poll_flow<R, W>(
    dir: &mut Direction,
    from: &mut R,
    to: &mut W,
    relay: &Relay<'_>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use std::pin::Pin;
    let count = match dir.to {
        Peer::Backend => &relay.counts.up,
        Peer::Device => &relay.counts.down,
    };
    let closing = relay.closing;
    loop {
        match &mut dir.flow {
            Flow::Reading { flush } => {
                // Borrowed for this read only: on Pending it goes straight back to the pool.
                let mut buf = PooledBuffer::take();
                let limit = match closing {
                    Some(close) if dir.frames.between_messages() => {
                        let cause = close
                            .cause()
                            .unwrap_or(crate::registry::CloseCause::Shutdown);
                        let reason = close.reason().unwrap_or("");
                        let end = write_close_frame(dir.to, cause, reason, buf.as_mut());
                        dir.close_sent = true;
                        dir.flow = Flow::Writing { buf, at: 0, end };
                        continue;
                    }
                    Some(_) => dir.frames.next_unit().min(RELAY_BUFFER_BYTES),
                    None => RELAY_BUFFER_BYTES,
                };
                let mut read = tokio::io::ReadBuf::new(&mut buf.as_mut()[..limit]);
                match Pin::new(&mut *from).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let end = read.filled().len();
                        if end == 0 {
                            dir.flow = Flow::ShuttingDown;
                        } else {
                            if relay.websocket {
                                dir.frames.advance(read.filled());
                            }
                            dir.flow = Flow::Writing { buf, at: 0, end };
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if *flush {
                            std::task::ready!(Pin::new(&mut *to).poll_flush(cx))?;
                            *flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            Flow::Writing { buf, at, end } => {
                let n =
                    std::task::ready!(Pin::new(&mut *to).poll_write(cx, &buf.as_mut()[*at..*end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
                *at += n;
                if *at == *end {
                    dir.flow = if dir.close_sent {
                        relay
                            .counts
                            .close_frames
                            .fetch_or(sent_bit(dir.to), Ordering::Relaxed);
                        Flow::ShuttingDown
                    } else {
                        Flow::Reading { flush: true }
                    };
                }
            }
            Flow::ShuttingDown => {
                std::task::ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                dir.flow = if dir.close_sent {
                    Flow::Discarding
                } else {
                    Flow::Done
                };
            }
            Flow::Discarding => {
                let mut buf = PooledBuffer::take();
                let mut read = tokio::io::ReadBuf::new(buf.as_mut());
                std::task::ready!(Pin::new(&mut *from).poll_read(cx, &mut read))?;
                dir.frames.advance(read.filled());
                if read.filled().is_empty() || dir.frames.ended_with_close() {
                    dir.flow = Flow::Done;
                }
            }
            Flow::Done => return Poll::Ready(Ok(())),
        }
    }
}

/// What [`poll_flow`] needs of the relay besides its own direction.
struct Relay<'s> {
    counts: &'s Counts,
    websocket: bool,
    /// Some while a WebSocket close is under way.
    closing: Option<&'s CloseSignal>,
}

/// Both directions of [`relay_generic`] in one future (each needs both streams).
struct BothWays<'s, A, B> {
    a: &'s mut A,
    b: &'s mut B,
    a_to_b: Direction,
    b_to_a: Direction,
    counts: &'s Counts,
    close: &'s CloseSignal,
    websocket: bool,
}

impl<A, B> std::future::Future for BothWays<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<()>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let relay = Relay {
            counts: this.counts,
            websocket: this.websocket,
            closing: (this.websocket && this.close.is_closing()).then_some(this.close),
        };
        let mut forward = poll_flow(&mut this.a_to_b, this.a, this.b, &relay, cx);
        let mut back = poll_flow(&mut this.b_to_a, this.b, this.a, &relay, cx);
        if relay.closing.is_some() {
            // While closing, a failed direction only ends itself: the other may still get
            // its Close frame out.
            for (dir, poll) in [
                (&mut this.a_to_b, &mut forward),
                (&mut this.b_to_a, &mut back),
            ] {
                if matches!(poll, Poll::Ready(Err(_))) {
                    dir.flow = Flow::Done;
                    *poll = Poll::Ready(Ok(()));
                }
            }
        }
        let (forward, back) = (forward?, back?);
        if forward.is_ready() && back.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}
