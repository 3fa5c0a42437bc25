//! The byte tunnel behind an upgraded connection (WebSocket or any `Upgrade`).
//!
//! Idle device tunnels are the common case (a fleet holds them open for hours), so an idle
//! tunnel holds no buffer: each direction waits for readability on the socket itself and only
//! then borrows a buffer from a small per-thread pool, returning it as soon as the bytes are
//! written. Half-close is respected: when one side finishes sending, its peer's write side is
//! shut down and the other direction keeps flowing until it finishes too.

use std::cell::RefCell;
use std::future::Future as _;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use crate::registry::{CloseCause, CloseSignal};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Size of a relay buffer: large enough for a WebSocket frame burst, small enough to pool.
pub const RELAY_BUFFER_BYTES: usize = 16 * 1024;
/// Buffers kept per worker thread; more are freed rather than hoarded.
const POOLED_BUFFERS_PER_THREAD: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Buffers on loan on this thread, so tests can see that idle tunnels hold none.
    static ON_LOAN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Times a relay write on this thread found the socket full and waited for room.
    static WAITED_FOR_ROOM: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A relay buffer on loan from the per-thread pool; goes back when dropped.
struct PooledBuffer(Option<Box<[u8]>>);

impl PooledBuffer {
    fn take() -> PooledBuffer {
        let buf = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; RELAY_BUFFER_BYTES].into_boxed_slice());
        #[cfg(test)]
        ON_LOAN.with(|n| n.set(n.get() + 1));
        PooledBuffer(Some(buf))
    }

    fn as_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        #[cfg(test)]
        ON_LOAN.with(|n| n.set(n.get() - 1));
        if let Some(buf) = self.0.take() {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOLED_BUFFERS_PER_THREAD {
                    p.push(buf);
                }
            });
        }
    }
}

/// How a tunnel ended, with byte counts for the access log.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Bytes from the client to the backend.
    pub client_to_upstream: u64,
    /// Bytes from the backend to the client.
    pub upstream_to_client: u64,
    /// Why it ended.
    pub end: TunnelEnd,
}

/// Why a tunnel ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides finished sending (clean close).
    #[default]
    Closed,
    /// A socket error (reset, broken pipe).
    Error,
    /// Closed by fwgate because the rules in force no longer admit it.
    ClosedByPolicy,
    /// Closed by fwgate because a kill-switch entry refuses it.
    KillSwitch,
    /// Closed by fwgate at shutdown.
    Shutdown,
    /// No byte either way for `tunnel_idle_timeout`.
    IdleTimeout,
}

impl TunnelEnd {
    /// The end of a tunnel fwgate closed, by the cause its close signal carries.
    pub fn closed_by(cause: Option<CloseCause>) -> TunnelEnd {
        match cause {
            Some(CloseCause::KillSwitch) => TunnelEnd::KillSwitch,
            Some(CloseCause::Shutdown) => TunnelEnd::Shutdown,
            Some(CloseCause::Policy) | None => TunnelEnd::ClosedByPolicy,
        }
    }

    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::Closed => "closed",
            TunnelEnd::Error => "error",
            TunnelEnd::ClosedByPolicy => "closed_by_policy",
            TunnelEnd::KillSwitch => "kill_switch",
            TunnelEnd::Shutdown => "shutdown",
            TunnelEnd::IdleTimeout => "idle_timeout",
        }
    }
}

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

/// Runs a relay's two directions until both end (or one fails), `close` is signalled, or the
/// tunnel idles out, and reports how it ended with the bytes each way (`up`/`down`, which the
/// directions count). Both relays end this way.
///
/// Each part is polled only when its own wake-up came: a relayed message wakes one direction,
/// and polling the other direction, the close signal and the idle timer as well would cost
/// more than relaying the message (callgrind). The directions' futures are made here, so that
/// they are held once: futures passed in by value would also keep a slot in the caller's
/// state, doubling what every idle tunnel holds.
async fn supervise<A, B>(
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
pub(super) fn read_drained<'b>(
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
pub(super) fn send_now(to: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A plain relay with no early bytes and no idle timeout, as most tests want it.
    async fn relay_plain(
        client: &TcpStream,
        upstream: &TcpStream,
        close: &CloseSignal,
    ) -> TunnelStats {
        relay_tcp(client, b"", upstream, b"", close, Duration::ZERO).await
    }

    #[tokio::test]
    async fn short_and_full_reads_never_lose_bytes_or_the_end_of_stream() {
        // Writes of every size around the relay buffer: full reads keep the socket's readiness,
        // short reads clear it; either way every byte and the final FIN must get through.
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut backend) = pair().await;
        let close = Arc::new(CloseSignal::default());
        let c2 = close.clone();
        let relay =
            tokio::spawn(async move { relay_plain(&client_side, &upstream_side, &c2).await });
        let sizes = [
            1,
            63,
            64,
            RELAY_BUFFER_BYTES - 1,
            RELAY_BUFFER_BYTES,
            RELAY_BUFFER_BYTES + 1,
            200_000,
        ];
        let sent: Vec<u8> = sizes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| std::iter::repeat_n(i as u8, *n))
            .collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut at = 0;
                for n in sizes {
                    client.write_all(&sent[at..at + n]).await.unwrap();
                    at += n;
                }
                client.shutdown().await.unwrap();
                client
            })
        };
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), backend.read_to_end(&mut got))
            .await
            .expect("the relay stalled: end of stream not delivered")
            .unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes reordered or corrupted");
        drop(writer.await.unwrap());
        drop(backend);
        let stats = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("relay did not finish")
            .unwrap();
        assert_eq!(stats.client_to_upstream, sent.len() as u64);
    }

    #[tokio::test]
    async fn relays_both_ways_with_early_bytes_and_half_close() {
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut backend) = pair().await;
        let close = Arc::new(CloseSignal::default());
        let c2 = close.clone();
        let relay = tokio::spawn(async move {
            relay_tcp(
                &client_side,
                b"early-up ",
                &upstream_side,
                b"early-down ",
                &c2,
                Duration::ZERO,
            )
            .await
        });

        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap(); // half-close: client is done sending
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early-up hello");

        // The other direction still flows after the client's half-close.
        backend.write_all(b"world").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early-down world");

        let stats = relay.await.unwrap();
        assert_eq!(stats.end, TunnelEnd::Closed);
        assert_eq!(stats.client_to_upstream, 14);
        assert_eq!(stats.upstream_to_client, 16);
    }

    #[tokio::test]
    async fn close_notification_ends_the_tunnel() {
        let (mut client, client_side) = pair().await;
        let (upstream_side, _backend) = pair().await;
        let close = Arc::new(CloseSignal::default());
        let c2 = close.clone();
        let relay =
            tokio::spawn(async move { relay_plain(&client_side, &upstream_side, &c2).await });
        close.close(CloseCause::Policy);
        let stats = relay.await.unwrap();
        assert_eq!(stats.end, TunnelEnd::ClosedByPolicy);
        // The client sees the connection end.
        let mut buf = [0u8; 8];
        let n = client.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn idle_tunnels_are_closed_and_active_ones_are_not() {
        let (client, client_side) = pair().await;
        let (upstream_side, backend) = pair().await;
        let close = CloseSignal::default();
        let idle = Duration::from_millis(300);
        // The relay owns the sockets, as in the proxy: they close when it ends.
        let relay =
            async move { relay_tcp(&client_side, b"", &upstream_side, b"", &close, idle).await };
        assert_closed_only_once_idle(relay, client, backend, idle).await;
    }

    #[tokio::test]
    async fn the_buffered_relay_also_closes_only_idle_tunnels() {
        let (client, client_side) = pair().await;
        let (upstream_side, backend) = pair().await;
        let close = Arc::new(CloseSignal::default());
        let idle = Duration::from_millis(300);
        let relay = relay_generic(client_side, b"", upstream_side, b"", close, idle);
        assert_closed_only_once_idle(relay, client, backend, idle).await;
    }

    /// TLS tunnels take the buffered relay: between messages it must hold no buffer, and it
    /// must still deliver early bytes, both directions and the half-close.
    #[tokio::test]
    async fn the_buffered_relay_holds_no_buffer_while_idle() {
        let (mut client, client_side) = tokio::io::duplex(64 * 1024);
        let (upstream_side, mut backend) = tokio::io::duplex(64 * 1024);
        let close = Arc::new(CloseSignal::default());
        let idle = Duration::ZERO;
        let relay = tokio::spawn(relay_generic(
            client_side,
            b"early ",
            upstream_side,
            b"",
            close,
            idle,
        ));
        let mut got = [0u8; 11];
        client.write_all(b"hello").await.unwrap();
        backend.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"early hello");
        backend.write_all(b"world").await.unwrap();
        client.read_exact(&mut got[..5]).await.unwrap();
        assert_eq!(&got[..5], b"world");
        // This runtime has one thread: yielding lets the relay run until it waits for more.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            ON_LOAN.with(|n| n.get()),
            0,
            "an idle tunnel holds a buffer"
        );
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "half-close passed on as end of stream");
        backend.write_all(b"late").await.unwrap();
        backend.shutdown().await.unwrap();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"late", "the other direction kept flowing");
        let stats = relay.await.unwrap();
        assert_eq!(stats.end, TunnelEnd::Closed);
        assert_eq!(
            (stats.client_to_upstream, stats.upstream_to_client),
            (11, 9)
        );
    }

    /// Small pipes force partial writes and waits on both sides of the buffered relay.
    #[tokio::test]
    async fn the_buffered_relay_is_exact_under_backpressure() {
        let (client, client_side) = tokio::io::duplex(1000);
        let (upstream_side, backend) = tokio::io::duplex(700);
        let close = Arc::new(CloseSignal::default());
        let relay = tokio::spawn(relay_generic(
            client_side,
            b"",
            upstream_side,
            b"",
            close,
            Duration::ZERO,
        ));
        const EACH_WAY: usize = 300_000;
        exchange_both_ways(client, backend, EACH_WAY).await;
        let stats = relay.await.unwrap();
        assert_eq!(stats.end, TunnelEnd::Closed);
        assert_eq!(stats.client_to_upstream, EACH_WAY as u64);
    }

    /// Keeps a tunnel busy for three idle periods (a byte each third of a period), then goes
    /// quiet: the relay must end with an idle timeout, and not before the traffic stopped.
    async fn assert_closed_only_once_idle(
        relay: impl std::future::Future<Output = TunnelStats>,
        mut client: TcpStream,
        mut backend: TcpStream,
        idle: Duration,
    ) {
        let chatter = async {
            for _ in 0..9 {
                client.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                backend.read_exact(&mut b).await.unwrap();
                tokio::time::sleep(idle / 3).await;
            }
            std::future::pending::<()>().await
        };
        let started = std::time::Instant::now();
        let stats = tokio::select! {
            s = relay => s,
            _ = chatter => unreachable!(),
        };
        assert_eq!(stats.end, TunnelEnd::IdleTimeout);
        assert!(
            started.elapsed() >= idle * 3,
            "closed while active after {:?}",
            started.elapsed()
        );
        assert_eq!(stats.client_to_upstream, 9);
    }

    /// Sends `each_way` patterned bytes from both ends at once, in 1000-byte writes, then
    /// half-closes each; checks that each end got exactly the other's bytes. Fails if a
    /// direction stalls.
    async fn exchange_both_ways<C, B>(client: C, backend: B, each_way: usize)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite,
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    {
        let pattern = move |seed: u8| (0..each_way).map(move |i| (i % 251) as u8 ^ seed);
        let both = async {
            tokio::join!(
                send_and_receive(client, pattern(1).collect()),
                send_and_receive(backend, pattern(2).collect())
            )
        };
        let (at_client, at_backend) = tokio::time::timeout(Duration::from_secs(20), both)
            .await
            .expect("a direction stalled");
        assert!(at_backend.into_iter().eq(pattern(1)), "client to backend");
        assert!(at_client.into_iter().eq(pattern(2)), "backend to client");
    }

    async fn send_and_receive<S>(socket: S, data: Vec<u8>) -> Vec<u8>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    {
        let (mut reader, mut writer) = tokio::io::split(socket);
        let send = async {
            for piece in data.chunks(1000) {
                writer.write_all(piece).await.unwrap();
            }
            writer.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, received) = tokio::join!(send, reader.read_to_end(&mut got));
        received.unwrap();
        got
    }

    /// Both directions busy at once, on two threads: each direction is polled only on its own
    /// wake-ups, so a wake-up lost between them would stall one side here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_directions_at_once_lose_no_wake_up() {
        let (client, client_side) = pair().await;
        let (upstream_side, backend) = pair().await;
        let relay = tokio::spawn(async move {
            let close = CloseSignal::default();
            let idle = Duration::from_secs(30);
            relay_tcp(&client_side, b"", &upstream_side, b"", &close, idle).await
        });
        const EACH_WAY: usize = 2_000_000;
        exchange_both_ways(client, backend, EACH_WAY).await;
        let stats = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("relay did not end")
            .unwrap();
        assert_eq!(stats.end, TunnelEnd::Closed);
        assert_eq!(stats.client_to_upstream, EACH_WAY as u64);
        assert_eq!(stats.upstream_to_client, EACH_WAY as u64);
    }

    /// Sends `len` bytes of a repeating pattern (mod `modulus`) from `client`, then half-closes;
    /// returns the bytes to expect and the writer (which keeps the socket).
    fn send_pattern(
        mut client: TcpStream,
        len: u32,
        modulus: u32,
    ) -> (Vec<u8>, tokio::task::JoinHandle<TcpStream>) {
        let data: Vec<u8> = (0..len).map(|i| (i % modulus) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        (expected, writer)
    }

    #[tokio::test]
    async fn a_full_socket_is_waited_on_and_nothing_is_lost() {
        // A small send buffer on the backend leg and a backend that reads little at a time:
        // the relay's direct sends find the socket full, and the bytes must still arrive exact.
        let (client, client_side) = pair().await;
        let (upstream_side, mut backend) = pair().await;
        let _ = socket2::SockRef::from(&upstream_side).set_send_buffer_size(4096);
        let (expected, writer) = send_pattern(client, 2_000_000, 253);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 2048];
            loop {
                let n = backend.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&chunk[..n]);
                tokio::task::yield_now().await;
            }
            // Closing the backend ends the other direction, and with it the relay.
            got
        });
        let close = CloseSignal::default();
        let relay = relay_plain(&client_side, &upstream_side, &close);
        let (stats, read) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(relay, reader)
        })
        .await
        .expect("relay stalled");
        let got = read.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
        assert_eq!(stats.client_to_upstream, expected.len() as u64);
        assert!(
            WAITED_FOR_ROOM.with(|n| n.get()) > 0,
            "the backend socket never filled: the test did not exercise waiting for room"
        );
        drop(writer);
    }

    #[tokio::test]
    async fn large_transfers_are_exact() {
        let (client, client_side) = pair().await;
        let (upstream_side, mut backend) = pair().await;
        let close = CloseSignal::default();
        let (expected, writer) = send_pattern(client, 3_000_000, 251);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            // Keep the backend socket open: dropping it would (rightly) end the relay.
            (got, backend)
        });
        let stats = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            relay_plain(&client_side, &upstream_side, &close),
        );
        // The backend never closes its side here, so the relay is still running: only check bytes.
        let (got, _backend) = tokio::select! {
            g = reader => g.unwrap(),
            _ = stats => panic!("relay ended before the transfer completed"),
        };
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
        drop(writer);
    }
}
