//! What both relays run under: each part (a direction, the close signal and idle timer) is
//! polled only on its own wake-up, and the tunnel's end is decided here.

use std::future::Future as _;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use super::{TunnelEnd, TunnelStats};
use crate::registry::CloseSignal;

/// Runs a relay's two directions until both end (or one fails), `close` is signalled, or the
/// tunnel idles out, and reports how it ended with the bytes each way (`up`/`down`, which the
/// directions count). Both relays end this way.
///
/// Each part is polled only when its own wake-up came: a relayed message wakes one direction,
/// and polling the other direction, the close signal and the idle timer as well would cost
/// more than relaying the message (callgrind). The directions' futures are made here, so that
/// they are held once: futures passed in by value would also keep a slot in the caller's
/// state, doubling what every idle tunnel holds.
pub(super) async fn supervise<A, B>(
    first: impl FnOnce() -> A,
    second: impl FnOnce() -> B,
    close: &CloseSignal,
    idle_timeout: Duration,
    up: &AtomicU64,
    down: &AtomicU64,
) -> TunnelStats
where
    A: std::future::Future<Output = io::Result<()>>,
    B: std::future::Future<Output = io::Result<()>>,
{
    let mut first = std::pin::pin!(Some(first()));
    let mut second = std::pin::pin!(Some(second()));
    let mut idled = std::pin::pin!(idle(idle_timeout, up, down));
    let parts = Parts::new();
    let end = std::future::poll_fn(|cx| {
        let woken = parts.woken(cx.waker());
        if woken & Parts::CONTROL != 0 {
            if close
                .poll_closed(&mut parts.context(Parts::CONTROL))
                .is_ready()
            {
                return Poll::Ready(TunnelEnd::closed_by(close.cause()));
            }
            if idled
                .as_mut()
                .poll(&mut parts.context(Parts::CONTROL))
                .is_ready()
            {
                return Poll::Ready(TunnelEnd::IdleTimeout);
            }
        }
        let failed = (woken & Parts::FIRST != 0
            && poll_direction(&mut first, &mut parts.context(Parts::FIRST)).is_err())
            || (woken & Parts::SECOND != 0
                && poll_direction(&mut second, &mut parts.context(Parts::SECOND)).is_err());
        if failed {
            Poll::Ready(TunnelEnd::Error)
        } else if first.is_none() && second.is_none() {
            Poll::Ready(TunnelEnd::Closed)
        } else {
            Poll::Pending
        }
    })
    .await;
    TunnelStats {
        client_to_upstream: up.load(Ordering::Relaxed),
        upstream_to_client: down.load(Ordering::Relaxed),
        end,
    }
}

/// Polls one direction of a relay unless it has finished; an error ends the tunnel.
fn poll_direction<F: std::future::Future<Output = io::Result<()>>>(
    direction: &mut std::pin::Pin<&mut Option<F>>,
    cx: &mut Context<'_>,
) -> io::Result<()> {
    if let Some(running) = direction.as_mut().as_pin_mut() {
        if let Poll::Ready(done) = running.poll(cx) {
            direction.set(None);
            done?;
        }
    }
    Ok(())
}

/// Per-part wake-ups for [`supervise`]: each part is polled with a waker of its own that marks
/// it woken and wakes the task. Made once per tunnel (four small allocations).
struct Parts {
    shared: Arc<Woken>,
    wakers: [Waker; 3],
}

/// What the parts' wakers share.
struct Woken {
    /// Parts woken since they were last polled, one bit each.
    bits: AtomicU8,
    /// The task running the tunnel.
    task: atomic_waker::AtomicWaker,
}

/// The waker handed to one part.
struct PartWaker {
    shared: Arc<Woken>,
    bit: u8,
}

impl Wake for PartWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.bits.fetch_or(self.bit, Ordering::AcqRel);
        self.shared.task.wake();
    }
}

impl Parts {
    const FIRST: u8 = 1;
    const SECOND: u8 = 2;
    /// The close signal and the idle timer share one bit: both are rare.
    const CONTROL: u8 = 4;

    fn new() -> Parts {
        let shared = Arc::new(Woken {
            // Everything is polled the first time.
            bits: AtomicU8::new(Self::FIRST | Self::SECOND | Self::CONTROL),
            task: atomic_waker::AtomicWaker::new(),
        });
        let waker = |bit| {
            Waker::from(Arc::new(PartWaker {
                shared: shared.clone(),
                bit,
            }))
        };
        // In bit order: `context` finds a part's waker by its bit's index.
        let wakers = [
            waker(Self::FIRST),
            waker(Self::SECOND),
            waker(Self::CONTROL),
        ];
        Parts { shared, wakers }
    }

    /// Registers the task's waker, then takes the parts woken since the last call. Taken
    /// before the parts are polled, so a wake-up during their poll is kept for the next one.
    fn woken(&self, task: &Waker) -> u8 {
        self.shared.task.register(task);
        self.shared.bits.swap(0, Ordering::AcqRel)
    }

    /// The context to poll the part with this bit in: its waker is the bit's index.
    fn context(&self, bit: u8) -> Context<'_> {
        Context::from_waker(&self.wakers[bit.trailing_zeros() as usize])
    }
}

/// Resolves once no byte has moved either way for a whole `timeout` period (so an idle tunnel
/// ends between one and two periods after its last byte; never, for a zero timeout). One timer
/// per tunnel, re-armed only when it fires: no per-read timer cost.
async fn idle(timeout: Duration, up: &AtomicU64, down: &AtomicU64) {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let mut seen = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
    loop {
        tokio::time::sleep(timeout).await;
        let now = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
        if now == seen {
            return;
        }
        seen = now;
    }
}
