//! What both relays run under: each part (a direction, the close signal and idle timer) is
//! polled only on its own wake-up, and the tunnel's end is decided here.

use std::future::Future as _;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use super::ws_close::{device_code, WS_CLOSE_WAIT};
use super::{Counts, Protocol, TunnelEnd, TunnelStats, SENT_TO_BACKEND, SENT_TO_DEVICE};
use crate::registry::CloseSignal;

/// Runs a relay's two directions until both end (or one fails), `close` is signalled, or the
/// tunnel idles out, and reports how it ended with what the directions counted. Both relays
/// end this way.
///
/// When `close` is signalled on a WebSocket tunnel the directions are not dropped: they see
/// the signal themselves, finish the message in flight, send their Close frames and read their
/// source to its end; the tunnel ends when both are done, or when [`WS_CLOSE_WAIT`] has
/// passed (then the connections are cut, as any other tunnel's). A direction that fails while
/// closing only ends itself.
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
    protocol: Protocol,
    idle_timeout: Duration,
    counts: &Counts,
) -> TunnelStats
where
    A: std::future::Future<Output = io::Result<()>>,
    B: std::future::Future<Output = io::Result<()>>,
{
    let websocket = protocol == Protocol::WebSocket;
    let mut first = std::pin::pin!(Some(first()));
    let mut second = std::pin::pin!(Some(second()));
    let mut control = std::pin::pin!(watch(close, websocket, idle_timeout, counts));
    // A WebSocket close is under way: the directions are closing themselves.
    let closing = || websocket && close.is_closing();
    let parts = Parts::new();
    let end = std::future::poll_fn(|cx| {
        let mut woken = parts.woken(cx.waker());
        if woken & Parts::CONTROL != 0 {
            if let Poll::Ready(end) = control.as_mut().poll(&mut parts.context(Parts::CONTROL)) {
                return Poll::Ready(end);
            }
            if closing() {
                // They wait for their sockets: polled now, they see the signal.
                woken |= Parts::FIRST | Parts::SECOND;
            }
        }
        if woken & Parts::FIRST != 0
            && poll_direction(&mut first, &mut parts.context(Parts::FIRST)).is_err()
            && !closing()
        {
            return Poll::Ready(TunnelEnd::Error);
        }
        if woken & Parts::SECOND != 0
            && poll_direction(&mut second, &mut parts.context(Parts::SECOND)).is_err()
            && !closing()
        {
            return Poll::Ready(TunnelEnd::Error);
        }
        if first.is_none() && second.is_none() {
            Poll::Ready(if closing() {
                TunnelEnd::closed_by(close.cause())
            } else {
                TunnelEnd::Closed
            })
        } else {
            Poll::Pending
        }
    })
    .await;
    let sent = counts.close_frames.load(Ordering::Relaxed);
    TunnelStats {
        client_to_upstream: counts.up.load(Ordering::Relaxed),
        upstream_to_client: counts.down.load(Ordering::Relaxed),
        end,
        device_close_code: close
            .cause()
            .filter(|_| sent & SENT_TO_DEVICE != 0)
            .map(device_code),
        backend_close_sent: sent & SENT_TO_BACKEND != 0,
    }
}

/// The tunnel's control part: resolves with its end once it idles out, once `close` is
/// signalled (a tunnel that is not WebSocket), or [`WS_CLOSE_WAIT`] after it was (a WebSocket
/// tunnel, whose directions close themselves meanwhile). The idle timer and the close bound
/// are never alive together, so they share their slot in every idle tunnel's state.
async fn watch(
    close: &CloseSignal,
    websocket: bool,
    idle_timeout: Duration,
    counts: &Counts,
) -> TunnelEnd {
    let closed = {
        let mut idled = std::pin::pin!(idle(idle_timeout, &counts.up, &counts.down));
        std::future::poll_fn(|cx| {
            if close.poll_closed(cx).is_ready() {
                Poll::Ready(true)
            } else {
                idled.as_mut().poll(cx).map(|()| false)
            }
        })
        .await
    };
    if !closed {
        return TunnelEnd::IdleTimeout;
    }
    if websocket {
        tokio::time::sleep(WS_CLOSE_WAIT).await;
    }
    TunnelEnd::closed_by(close.cause())
}

/// Polls one direction of a relay unless it has finished; an error ends the direction (and,
/// unless it is closing, the tunnel).
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
