//! Every open tunnel, with what it was admitted as, so that a rule change or a kill-switch
//! entry can find and close exactly the connections it no longer admits, and so that the
//! admin census can show what the fleet is running right now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::rules::VersionInput;

/// What kind of exchange is tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackedKind {
    /// An upgraded connection (WebSocket): closed at shutdown, spread over the grace period.
    Tunnel,
    /// An in-flight HTTP request: left to finish at shutdown.
    Request,
}

/// What the registry knows about one open connection.
#[derive(Debug)]
pub struct Tracked {
    /// Tunnel or request.
    pub kind: TrackedKind,
    /// The version it presented.
    pub version: VersionInput,
    /// Its request path (rules may have a `path_prefix`); shared with the access log.
    pub path: Arc<str>,
    /// The rule that admitted it.
    pub rule: Arc<str>,
    /// Signalled to close it.
    pub close: Arc<CloseSignal>,
    /// When it was admitted.
    pub opened: Instant,
}

/// Why fwgate closes a connection it admitted. Carried by the [`CloseSignal`], so that the
/// connection's end can say why (the access log's `end=`, metrics, and a WebSocket close
/// frame where one is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseCause {
    /// The rules in force no longer admit it (a reload with `close_existing`).
    Policy = 1,
    /// A kill-switch entry refuses it.
    KillSwitch = 2,
    /// fwgate is shutting down.
    Shutdown = 3,
}

impl CloseCause {
    fn from_u8(v: u8) -> Option<CloseCause> {
        match v {
            1 => Some(CloseCause::Policy),
            2 => Some(CloseCause::KillSwitch),
            3 => Some(CloseCause::Shutdown),
            _ => None,
        }
    }
}

/// Tells one tracked connection to close, and why. Latched: a signal sent before the
/// connection waits for it is seen when it does (the first cause sent is kept, with its
/// reason). Each signal has a single waiter (the task serving that connection), so one byte
/// and one waker slot do the work of a `Notify`'s waiter list without its lock: every
/// forwarded request and every tunnel waits on one.
#[derive(Debug, Default)]
pub struct CloseSignal {
    /// 0 while open, [`CLAIMED`] while the first closer stores its reason, else a
    /// [`CloseCause`].
    cause: AtomicU8,
    /// What a WebSocket tunnel tells its device in its Close frame (set by the first closer,
    /// before its cause is published, so whoever sees the cause sees this too).
    reason: OnceLock<Arc<str>>,
    waker: atomic_waker::AtomicWaker,
}

/// [`CloseSignal::cause`] while the first closer is storing its reason: not closed yet.
const CLAIMED: u8 = u8::MAX;

/// Longest reason a WebSocket Close frame carries (RFC 6455 §5.5: a control frame's payload
/// is at most 125 bytes, two of them the code).
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

/// A close reason cut to [`MAX_CLOSE_REASON_BYTES`] on a character boundary, shared by every
/// connection a close plan closes (one allocation per plan, none per connection).
pub fn close_reason(text: &str) -> Arc<str> {
    Arc::from(cut_to(text, MAX_CLOSE_REASON_BYTES))
}

/// The longest start of `text` of at most `max` bytes that ends on a character boundary.
pub fn cut_to(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl CloseSignal {
    /// Asks the connection to close for `cause`, without a reason.
    pub fn close(&self, cause: CloseCause) {
        self.close_with(cause, None);
    }

    /// Asks the connection to close for `cause`; a WebSocket tunnel sends `reason` to its
    /// device in the Close frame. Only the first call counts.
    pub fn close_with(&self, cause: CloseCause, reason: Option<Arc<str>>) {
        if self
            .cause
            .compare_exchange(0, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        if let Some(reason) = reason {
            let _ = self.reason.set(reason);
        }
        self.cause.store(cause as u8, Ordering::Release);
        self.waker.wake();
    }

    /// Why the connection was asked to close; None while it was not.
    pub fn cause(&self) -> Option<CloseCause> {
        CloseCause::from_u8(self.cause.load(Ordering::Acquire))
    }

    /// Whether a close was asked for: one load, for the relay's check before every read.
    #[inline]
    pub fn is_closing(&self) -> bool {
        self.cause.load(Ordering::Acquire) != 0
    }

    /// The reason given with the close, if any (read once [`CloseSignal::cause`] is Some).
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(|r| &**r)
    }

    /// Ready once [`CloseSignal::close`] was called; otherwise wakes `cx` when it is.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_closing() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Checked again: a close between the first check and the registration woke nothing.
        if self.is_closing() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Resolves once the connection is asked to close.
    pub async fn closed(&self) {
        std::future::poll_fn(|cx| self.poll_closed(cx)).await
    }
}

/// Hashes the registry's ids: sequential numbers fwgate picks itself (never attacker-chosen),
/// so one multiplication spreads them well enough and is far cheaper than SipHash, which
/// matters because every forwarded request registers and unregisters.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type OpenMap = HashMap<u64, Tracked, std::hash::BuildHasherDefault<IdHasher>>;

/// The set of open tunnels and in-flight requests.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    open: Mutex<OpenMap>,
}

/// Keeps a connection registered; dropping it unregisters (whatever way the tunnel ends).
#[derive(Debug)]
pub struct Registration {
    id: u64,
    registry: Arc<Registry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// How to close one connection: when (a drain period, spread by [`Registry::plan_close`]),
/// why, and what a WebSocket device is told.
#[derive(Debug, Clone)]
pub struct CloseOrder {
    /// Over how long the closes of one plan are spread (then: this connection's delay).
    pub drain: Duration,
    /// Why.
    pub cause: CloseCause,
    /// The Close frame's reason (see [`close_reason`]); shared by the plan's connections.
    pub reason: Option<Arc<str>>,
}

/// Connections to close and how to spread their closing.
#[derive(Debug, Default)]
pub struct ClosePlan {
    /// (close handle, what to do: its `drain` is the delay from now) for each connection.
    pub targets: Vec<(Arc<CloseSignal>, CloseOrder)>,
}

impl ClosePlan {
    /// How many connections the plan closes.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether it closes nothing.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Closes each connection at its delay, in a background task (never blocks the caller).
    pub fn execute(self, on_close: impl Fn() + Send + 'static) {
        if self.targets.is_empty() {
            return;
        }
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for (close, order) in self.targets {
                tokio::time::sleep_until(start + order.drain).await;
                close.close_with(order.cause, order.reason);
                on_close();
            }
        });
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, OpenMap> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection admitted at `opened` (the caller's clock reading, so that a
    /// request reads the clock once); returns its registration and close handle.
    pub fn register(
        self: &Arc<Self>,
        kind: TrackedKind,
        version: VersionInput,
        path: Arc<str>,
        rule: Arc<str>,
        opened: Instant,
    ) -> (Registration, Arc<CloseSignal>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(CloseSignal::default());
        self.lock().insert(
            id,
            Tracked {
                kind,
                version,
                path,
                rule,
                close: close.clone(),
                opened,
            },
        );
        (
            Registration {
                id,
                registry: self.clone(),
            },
            close,
        )
    }

    /// Number of open connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Plans closing every connection for which `refuses` returns an order: the closures are
    /// spread evenly over the longest drain so a fleet does not reconnect in one wave.
    pub fn plan_close(&self, mut refuses: impl FnMut(&Tracked) -> Option<CloseOrder>) -> ClosePlan {
        let open = self.lock();
        let mut picked: Vec<(Arc<CloseSignal>, CloseOrder)> = open
            .values()
            .filter_map(|t| refuses(t).map(|order| (t.close.clone(), order)))
            .collect();
        drop(open);
        let n = picked.len() as u32;
        for (i, (_, order)) in picked.iter_mut().enumerate() {
            order.drain = order.drain.mul_f64(i as f64 / f64::from(n.max(1)));
        }
        ClosePlan { targets: picked }
    }

    /// Visits every open connection (for the census); holds the lock while visiting.
    pub fn for_each(&self, mut f: impl FnMut(&Tracked)) {
        for t in self.lock().values() {
            f(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_is_removed_on_drop() {
        let r = Arc::new(Registry::default());
        let (a, _) = r.register(
            TrackedKind::Tunnel,
            VersionInput::Missing,
            Arc::from("/"),
            Arc::from("x"),
            Instant::now(),
        );
        let (b, _) = r.register(
            TrackedKind::Tunnel,
            VersionInput::Missing,
            Arc::from("/"),
            Arc::from("x"),
            Instant::now(),
        );
        assert_eq!(r.len(), 2);
        drop(a);
        assert_eq!(r.len(), 1);
        drop(b);
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn a_close_signal_is_latched_and_wakes_its_waiter() {
        let early = CloseSignal::default();
        early.close(CloseCause::Shutdown);
        assert_eq!(early.cause(), Some(CloseCause::Shutdown));
        early.close(CloseCause::Policy);
        assert_eq!(
            early.cause(),
            Some(CloseCause::Shutdown),
            "the first cause is kept"
        );
        tokio::time::timeout(Duration::from_secs(5), early.closed())
            .await
            .expect("a close sent before the wait was lost");

        let signal = Arc::new(CloseSignal::default());
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.closed().await }
        });
        // On this single-threaded runtime, yielding runs the waiter until it waits.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "finished before any close");
        signal.close(CloseCause::KillSwitch);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter was not woken")
            .unwrap();
    }

    #[test]
    fn the_first_close_keeps_its_reason_with_its_cause() {
        let signal = CloseSignal::default();
        assert_eq!((signal.cause(), signal.reason()), (None, None));
        signal.close_with(CloseCause::KillSwitch, Some(close_reason("entry k-1")));
        signal.close_with(CloseCause::Shutdown, Some(close_reason("later")));
        assert_eq!(signal.cause(), Some(CloseCause::KillSwitch));
        assert_eq!(signal.reason(), Some("entry k-1"));
    }

    #[test]
    fn a_close_reason_fits_a_close_frame_and_is_cut_between_characters() {
        assert_eq!(&*close_reason("short"), "short");
        let long = "ü".repeat(100);
        let cut = close_reason(&long);
        assert_eq!(cut.len(), 122, "61 two-byte characters fit 123 bytes");
        assert!(cut.chars().all(|c| c == 'ü'));
    }

    #[test]
    fn close_plan_spreads_over_the_drain() {
        let r = Arc::new(Registry::default());
        let regs: Vec<_> = (0..4)
            .map(|i| {
                r.register(
                    TrackedKind::Request,
                    VersionInput::Missing,
                    Arc::from(if i % 2 == 0 { "/a" } else { "/b" }),
                    Arc::from("x"),
                    Instant::now(),
                )
            })
            .collect();
        let plan = r.plan_close(|t| {
            (&*t.path == "/a").then(|| CloseOrder {
                drain: Duration::from_secs(10),
                cause: CloseCause::Policy,
                reason: None,
            })
        });
        assert_eq!(plan.len(), 2);
        let mut delays: Vec<_> = plan.targets.iter().map(|(_, o)| o.drain).collect();
        delays.sort();
        assert_eq!(delays, vec![Duration::ZERO, Duration::from_secs(5)]);
        drop(regs);
    }
}
