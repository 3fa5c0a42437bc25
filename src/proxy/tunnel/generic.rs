//! The relay for streams that are not plain TCP (TLS on either leg).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::pool::PooledBuffer;
use super::supervise::supervise;
use super::TunnelStats;
use crate::registry::CloseSignal;

/// For streams that are not plain TCP (TLS on either leg): a copy both ways that respects
/// half-close, with the same idle timeout as [`relay_tcp`]. Like [`relay_tcp`], an idle
/// tunnel holds no relay buffer: each direction borrows one from the per-thread pool for a
/// read and keeps it only while those bytes wait to be written (a buffered copy such as
/// `copy_bidirectional` would hold two 8 KiB buffers per tunnel for its whole life).
/// `a_early`/`b_early` are bytes each side already sent, delivered first.
pub async fn relay_generic<A, B>(
    a: A,
    a_early: &[u8],
    b: B,
    b_early: &[u8],
    close: Arc<CloseSignal>,
    idle_timeout: Duration,
) -> TunnelStats
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let (up_count, down_count) = (&up, &down);
    let both_ways = move || async move {
        let (mut a, mut b) = (a, b);
        b.write_all(a_early).await?;
        up_count.fetch_add(a_early.len() as u64, Ordering::Relaxed);
        a.write_all(b_early).await?;
        down_count.fetch_add(b_early.len() as u64, Ordering::Relaxed);
        BothWays {
            a: &mut a,
            b: &mut b,
            // The early bytes are flushed once there is nothing more to read.
            a_to_b: Flow::Reading { flush: true },
            b_to_a: Flow::Reading { flush: true },
            up: up_count,
            down: down_count,
        }
        .await
    };
    let nothing_more = || std::future::ready(Ok(()));
    supervise(both_ways, nothing_more, &close, idle_timeout, &up, &down).await
}

/// Where one direction of [`relay_generic`] is.
enum Flow {
    /// Waiting for bytes, with no buffer; `flush`: written bytes may still sit in the
    /// destination's own buffer (TLS records), to flush once the source has nothing more.
    Reading { flush: bool },
    /// Writing `buf[at..end]`.
    Writing {
        buf: PooledBuffer,
        at: usize,
        end: usize,
    },
    /// The source ended: shutting the destination's write side (TLS: close_notify, then FIN).
    ShuttingDown,
    /// Finished.
    Done,
}

/// Moves one direction of [`relay_generic`] as far as it can go now; Ready once the source
/// ended and the destination was shut down.
fn poll_flow<R, W>(
    flow: &mut Flow,
    from: &mut R,
    to: &mut W,
    count: &AtomicU64,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use std::pin::Pin;
    loop {
        match flow {
            Flow::Reading { flush } => {
                // Borrowed for this read only: on Pending it goes straight back to the pool.
                let mut buf = PooledBuffer::take();
                let mut read = tokio::io::ReadBuf::new(buf.as_mut());
                match Pin::new(&mut *from).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let end = read.filled().len();
                        *flow = if end == 0 {
                            Flow::ShuttingDown
                        } else {
                            Flow::Writing { buf, at: 0, end }
                        };
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
                    *flow = Flow::Reading { flush: true };
                }
            }
            Flow::ShuttingDown => {
                std::task::ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                *flow = Flow::Done;
            }
            Flow::Done => return Poll::Ready(Ok(())),
        }
    }
}

/// Both directions of [`relay_generic`] in one future (each needs both streams).
struct BothWays<'s, A, B> {
    a: &'s mut A,
    b: &'s mut B,
    a_to_b: Flow,
    b_to_a: Flow,
    up: &'s AtomicU64,
    down: &'s AtomicU64,
}

impl<A, B> std::future::Future for BothWays<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<()>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let forward = poll_flow(&mut this.a_to_b, this.a, this.b, this.up, cx)?;
        let back = poll_flow(&mut this.b_to_a, this.b, this.a, this.down, cx)?;
        if forward.is_ready() && back.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}
